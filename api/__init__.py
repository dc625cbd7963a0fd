"""The API's process (FastAPI, `main`): intake and jobs (`jobs`, `admission`, `store`), streams
(`streams`, `sse`, `stream_hub`), the OpenAI-compatible routes (`openai/`), keys, webhooks, live
config, health and metrics. Built on `scheduler` and `host`; never imports `workers`, `moe_build`
or the roof, `localmoe` (tests/test_layers.py).
"""
