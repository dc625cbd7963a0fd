"""A worker: three processes (workers/messages.py draws them). The Celery consumer (`main`,
`tasks`: the claim), the runtime (`runtime_proc`, `runtime`: the relay, heartbeats, cancels, the
reaper, metrics) and the engine's own (`engine_proc`, `engine_loop`, `engine_setup`); and the
webhook worker (`webhooks`). Built on `scheduler`, `moe_core` and `host`; never imports `api`,
`moe_build` or the roof, `localmoe` (tests/test_layers.py).
"""
