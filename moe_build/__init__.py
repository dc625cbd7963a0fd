"""Building models: a checkpoint's initialiser (`checkpoint`), the trainer (`train`), the packed
embedded model (`packed`) and fused-MoE kernel tuning (`moe_tuning`, which names its configs as
moe_core.moe_configs reads them). Used by the CLI and `localmoe up` only; knows no queue, no Redis
and no API.
"""
