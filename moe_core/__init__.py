"""Serving: the engines (`engine`: the interface; `torch_engine`, `vllm_engine`,
`deepspeed_engine`, `tensor_parallel`), loading, sampling and detokenizing. Knows no queue, no
Redis, no API and no model building (`moe_build`).
"""
