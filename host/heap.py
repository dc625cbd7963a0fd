"""The garbage collector's settings for LocalMoE's long-lived processes (API, runtime, engine).

CPython collects the oldest generation, every object the process tracks, once the objects that
survived into it since the last full collection reach a quarter of those already there. A process
that has imported torch, transformers and vLLM tracks 0.7-1 M objects; a full collection of those
takes about 0.3 s on the 2-core box (`python -m bench.gc_pause`), and in the engine process it stops
every step, so each running request's tokens and each new one's first token, for that long. Nearly
all of these objects live as long as the process (modules, the model's Python side, the tokenizer):
after a process has loaded, they are moved out of every collection (`gc.freeze`), as vLLM's own
server does, and a full collection walks only what has been made since.
"""

from __future__ import annotations

import gc

# The collector's youngest generation is examined every GC_GEN0 allocations (700 by default): a
# request makes a few thousand objects, nearly all freed by reference counting, so the default
# walks the young objects several times per request for cycles that are rarely there.
GC_GEN0 = 50_000


def freeze_heap() -> int:
    """Call once a process has loaded what it keeps: collect, then move every object still tracked
    out of all later collections, and examine the youngest generation every GC_GEN0 allocations.
    → the objects frozen. Objects frozen stay until the process ends, even in cycles: code that
    drops a large structure and collects to free it (an engine's close) calls `thaw_heap` first."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Return the frozen objects to the oldest generation, where the next full collection sees them
    (before a collection that must free a structure made before freeze_heap, e.g. a model)."""
    gc.unfreeze()
