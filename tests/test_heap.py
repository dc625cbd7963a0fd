"""host/heap.py: what a long-lived process's collector walks once it has loaded (each case in a
process of its own: freezing is for the whole process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_after_freeze_heap_a_full_collection_walks_only_what_was_made_since(module: str) -> None:
    out = run(f"""
        import gc, time, {module}
        from host.heap import GC_GEN0, freeze_heap
        before = len(gc.get_objects())
        frozen = freeze_heap()
        made = [{{"n": i}} for i in range(1000)]
        print(before, frozen, len(gc.get_objects()), gc.get_threshold()[0])
    """)
    before, frozen, after, gen0 = map(int, out.split())
    assert before > 50_000  # what importing it made
    assert frozen >= before * 0.9  # nearly all of it lives as long as the process
    assert after < 2_000  # the 1,000 dicts made since and little else
    assert gen0 == 50_000


def test_thaw_heap_lets_a_collection_free_cycles_made_before_the_freeze() -> None:
    """What an engine's close relies on: a model in reference cycles, loaded before the process
    froze its heap, is freed by the collection that follows thaw_heap, and only then."""
    out = run("""
        import gc, weakref
        from host.heap import freeze_heap, thaw_heap
        class Node: pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        ref = weakref.ref(a)
        freeze_heap()
        del a, b
        gc.collect()
        frozen_kept = ref() is not None
        thaw_heap()
        gc.collect()
        print(frozen_kept, ref() is None)
    """)
    assert out == "True True"
