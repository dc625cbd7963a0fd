"""The chaos run in its reduced form (bench/chaos.py has the engine and the full form): 150 jobs
through 2 workers killed with SIGKILL every ~13 s, one Redis restart, a webhook receiver that is
down, then answers 500, then recovers; and a batch of 120 lines through all of it. Every accepted
job ends once, with one final result and at most one terminal-webhook id; the batch completes with
every custom_id once in its result files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.chaos import Chaos, ChaosPlan

pytestmark = pytest.mark.service  # workers, the API and Redis, killed and restarted


def test_chaos_reduced(model_dir: Path, tmp_path: Path) -> None:
    plan = ChaosPlan.reduced()
    started = time.monotonic()
    ledger = Chaos(plan, tmp_path, model_dir).run()
    print(f"\n{ledger.table()}\nin {time.monotonic() - started:.0f} s; logs in {tmp_path / 'logs'}")

    assert ledger.accepted >= 0.9 * plan.jobs, ledger.refused  # only the Redis restart may refuse some
    assert ledger.kills >= 2
    assert [what for _, what in ledger.timeline if what.startswith("receiver")] == [
        "receiver down",
        "receiver error",
        "receiver up",
    ]
    assert any(what.startswith("redis started again") for _, what in ledger.timeline)
    assert ledger.answered[500] > 0  # the receiver's error phase was hit, and retried past
    assert ledger.violations() == {}
    assert ledger.missing_hooks == []  # every terminal webhook arrived once the receiver was back
    assert ledger.orphans_lingering == []  # the engine of a killed consumer ends by itself
    assert ledger.batch_status == "completed" and ledger.batch_counts["total"] == plan.batch_lines
