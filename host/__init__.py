"""The ground floor: what this box is and how LocalMoE is set on it.

`settings` (the typed settings of every process, from YAML and the environment), `config_store`
(their live, versioned overrides in Redis), `allowlist` (the webhook allowlist setting's syntax),
`keys` (the Redis key prefix and the config store's keys), `gpus` (this box's GPUs through NVML),
`instance` (one `up` per home, children tied to their parent, process names) and `metric_names`
(every Prometheus metric exported). Every other package may import these; they import none of
LocalMoE's other packages (tests/test_layers.py).
"""
