"""The `localmoe` command. Every flag has an environment twin (shown in --help)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx

from localmoe import batches
from localmoe.client import api_client, refused


def _env_flag(args: argparse.Namespace, attr: str, env: str) -> None:
    """A flag given on the command line wins over its environment twin."""
    value = getattr(args, attr, None)
    if value is not None:
        os.environ[env] = str(value)


def cmd_model_init(args: argparse.Namespace) -> int:
    from host.settings import get_settings
    from moe_build.checkpoint import MAX_CONTEXT, build_checkpoint, is_checkpoint

    # Not the embedded model's place: a random model must not stand in for the trained one.
    out = Path(args.out) if args.out else get_settings().home / "models" / f"{args.size}-{args.arch}"
    if is_checkpoint(out) and not args.force:
        print(f"{out} already holds a model (use --force to rebuild)")
        return 0
    build_checkpoint(
        out,
        arch=args.arch,
        seed=args.seed,
        progress=True,
        size=args.size,
        vocab_size=args.vocab_size,
        context=MAX_CONTEXT if args.context is None else args.context,
    )
    return 0


def cmd_model_pack(args: argparse.Namespace) -> int:
    from moe_build.checkpoint import is_checkpoint
    from moe_build.packed import EMBEDDED, pack

    src, out = Path(args.model), Path(args.out) if args.out else EMBEDDED
    if not is_checkpoint(src):
        raise SystemExit(f"{src} is not a model directory (config.json, *.safetensors, tokenizer.json)")
    if out.exists() and any(out.iterdir()):
        if not args.force:
            raise SystemExit(f"{out} is not empty (use --force to replace it)")
        shutil.rmtree(out)
    pack(src, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"packed {src} into {out} ({size / 2**20:.1f} MiB)")
    return 0


def cmd_model_train(args: argparse.Namespace) -> int:
    from host.settings import get_settings
    from moe_build.checkpoint import is_checkpoint
    from moe_build.train import instruct_from, train

    out = Path(args.out) if args.out else get_settings().default_model_dir
    if is_checkpoint(out) and not args.force:
        print(f"{out} already holds a model (use --force to replace it)")
        return 0
    if args.pre_trained:
        # its progress and result lines are the stage's own
        instruct_from(Path(args.pre_trained), out, args.device, args.instruct_minutes, overwrite=args.force)
        return 0
    report = train(
        out,
        device=args.device,
        minutes=args.minutes,
        size=args.size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        corpus_bytes=args.corpus_bytes,
        seed=args.seed,
        aux_loss_coef=args.aux_loss_coef,
        balance=args.balance,
        max_steps=args.max_steps,
        instruct_minutes=args.instruct_minutes,
        overwrite=args.force,
        progress=True,
    )
    best = report.best
    assert best is not None
    print(
        f"{report.steps} steps, {report.tokens_seen / 1e6:.1f} M tokens, {report.tokens_per_s:,.0f} tokens/s "
        f"({report.stopped_because}); best held-out loss at step {best.step}: code {best.code:.3f}, "
        f"prose {best.prose:.3f}"
    )
    if (stage := report.instruct) is not None:
        print(
            f"instruction stage: {stage.steps} steps on {sum(stage.pairs.values())} pairs; held-out answers "
            f"{stage.answers_before:.3f} → {stage.answers_after:.3f}, code {stage.code_before:.3f} → "
            f"{stage.code_after:.3f} nats/token"
        )
    return 0


def cmd_tune_moe(args: argparse.Namespace) -> int:
    from host.settings import get_settings
    from moe_build import moe_tuning
    from moe_core import moe_configs, vllm_engine
    from moe_core.loader import resolve_dtype

    s = get_settings()
    v = s.engine.vllm
    ok, why = vllm_engine.available()
    import torch

    if not ok or not torch.cuda.is_available():
        reason = why if not ok else "no CUDA GPU is visible"
        print(f"tune-moe tunes vLLM's GPU kernels and needs a CUDA GPU with vLLM: {reason}", file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir) if args.model_dir else s.resolved_model_dir
    dtype = str(resolve_dtype("cuda", s.engine.dtype)).removeprefix("torch.")
    shape = moe_configs.moe_shape(
        model_dir,
        tensor_parallel_size=args.tp or v.tensor_parallel_size,
        enable_expert_parallel=args.ep or v.enable_expert_parallel,
        dtype=dtype,
    )
    batch_sizes = (
        [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else moe_tuning.BATCH_SIZES
    )
    out = Path(args.out) if args.out else v.tuned_config_dir
    assert out is not None  # filled by Settings
    print(f"tuning vLLM's fused-MoE kernel for {shape} at M in {list(batch_sizes)}", flush=True)
    path, result = moe_tuning.tune_on_gpu(
        shape,
        batch_sizes,
        out,
        max_rounds=args.max_rounds,
        time_budget_s=args.time_budget_s,
        progress=lambda line: print(line, flush=True),
    )
    print(
        json.dumps(
            {
                "file": str(path),
                "seconds": round(result.seconds, 1),
                "speedup": {t.m: round(t.speedup, 3) for t in result.tuned},
            }
        )
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from host.settings import get_settings
    from localmoe import up

    return up.run(get_settings())


def cmd_status(args: argparse.Namespace) -> int:
    """What the `localmoe up` of this home runs: its pid, URLs, processes, workers and their queues.
    Exit status 3 when none runs (as `systemctl status` says "inactive")."""
    from host.instance import children, cmdline, read_holder
    from host.settings import get_settings

    s = get_settings()
    holder = read_holder(s.home)
    if holder is None:
        print(f"no `localmoe up` runs for {s.home}")
        return 3
    print(f"localmoe up   pid {holder.pid}, home {holder.home}")
    print(f"API           {holder.api_url}  (docs {holder.api_url}/docs)\nFlower        {holder.flower_url}")
    for pid in sorted(children(holder.pid)):
        print(f"  pid {pid:<8} {_role(cmdline(pid))}")
    with api_client(timeout=5) as http:
        try:
            r = http.get("/v1/workers")
        except httpx.HTTPError as e:
            print(f"the API does not answer: {e}")
            return 1
    if r.status_code != 200:
        return refused(r)
    workers = r.json()
    for w in workers:
        state = "ready" if w["ready"] else "loading"
        print(f"worker {w['name']:<12} {state:<7} {w['engine']:<9} {w['device']:<8} "
              f"running {w['running']:>3}  waiting {w['waiting']:>3}")  # fmt: skip
    waiting, running = sum(w["waiting"] for w in workers), sum(w["running"] for w in workers)
    print(f"queue         {waiting} waiting, {running} running")
    return 0


def _role(argv: list[str]) -> str:
    """A child of `up`, by its command line."""
    line = " ".join(argv)
    for mark, role in (("redis-server", "redis"), ("localmoe api", "api"), ("workers.webhooks", "webhooks"),
                       ("flower", "flower"), ("localmoe worker", "worker")):  # fmt: skip
        if mark in line:
            return f"{role:<9} {line[:90]}"
    return line[:100]


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the `localmoe up` of this home from another terminal, as Ctrl-C would: SIGTERM, then
    wait until it has let go of the home's lock (every child stopped)."""
    from host.instance import held, read_holder
    from host.settings import get_settings

    s = get_settings()
    holder = read_holder(s.home)
    if holder is None or holder.pid == 0:
        print(f"no `localmoe up` runs for {s.home}")
        return 0
    os.kill(holder.pid, signal.SIGTERM)
    print(f"stopping localmoe up (pid {holder.pid})...", flush=True)
    deadline = time.monotonic() + args.timeout
    while held(s.home):
        if time.monotonic() > deadline:
            print(f"still running after {args.timeout:.0f} s (pid {holder.pid})", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print("stopped")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from host.settings import get_settings
    from workers.main import serve

    serve(get_settings(), name=args.name)
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from host.settings import get_settings
    from localmoe.flower import serve

    serve(get_settings())
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from api.serve import serve
    from host.settings import get_settings

    s = get_settings()
    serve(s, reuse_port=args.reuse_port or s.api_reuse_port)
    return 0


def _sse(response: httpx.Response) -> object:
    """Yields (event, data) pairs from a text/event-stream response."""
    event, data = "message", list[str]()
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", list[str]()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def cmd_keys_bootstrap(args: argparse.Namespace) -> int:
    """The first admin key of a deployment without `localmoe up` (compose, several boxes):
    written straight to the Redis that LOCALMOE_REDIS_URL names."""
    import redis

    from api.auth import Scope, create_key
    from host.settings import get_settings

    client = redis.Redis.from_url(get_settings().require_redis_url(), decode_responses=True)
    made = create_key(client, args.name, Scope.ADMIN)
    print(f"admin key {made.key.id} for {made.key.name!r} (shown once):")
    print(made.secret)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    with api_client() as http:
        if args.keys_command == "create":
            limits = {
                k: v
                for k, v in {
                    "max_priority": args.max_priority,
                    "max_queued_jobs": args.max_queued_jobs,
                    "max_queued_tokens": args.max_queued_tokens,
                    "rate_per_s": args.rate_per_s,
                    "burst": args.burst,
                    "max_batches": args.max_batches,
                    "batch_lines_in_flight": args.batch_lines_in_flight,
                }.items()
                if v is not None
            }
            r = http.post("/v1/keys", json={"name": args.name, "scope": args.scope, "limits": limits})
            if r.status_code != 201:
                return refused(r)
            made = r.json()
            print(f"key {made['key']['id']} ({made['key']['scope']}) for {made['key']['name']!r}:")
            print(made["secret"])
            print("(shown once: LocalMoE keeps only its hash)", file=sys.stderr)
        elif args.keys_command == "list":
            r = http.get("/v1/keys")
            if r.status_code != 200:
                return refused(r)
            for k in r.json():
                state = "revoked" if k["revoked_at"] else "active"
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"]))
                print(f"{k['id']}  {k['scope']:<5}  {state:<7}  {made}  {k['name']}")
        else:
            r = http.delete(f"/v1/keys/{args.key_id}")
            if r.status_code != 200:
                return refused(r)
            print(f"revoked {args.key_id}")
    return 0


def _value(text: str) -> object:
    """A value on the command line: JSON when it parses (5, 0.5, true, null, ["a"]), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_config(args: argparse.Namespace) -> int:
    with api_client() as http:
        if args.config_command == "show":
            r = http.get("/v1/config")
        elif args.config_command == "history":
            r = http.get("/v1/config/history")
            if r.status_code != 200:
                return refused(r)
            for v in r.json():
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["at"]))
                note = f"  ({v['note']})" if v["note"] else ""
                print(f"v{v['number']:<4} {when}  {v['by']}{note}\n      {json.dumps(v['overrides'])}")
            return 0
        elif args.config_command == "set":
            changes: dict[str, object] = {}
            for pair in args.pairs:
                key, sep, text = pair.partition("=")
                if not sep:
                    print(f"expected KEY=VALUE, got {pair!r}", file=sys.stderr)
                    return 2
                changes[key] = _value(text)
            r = http.patch("/v1/config", json={"set": changes, "note": args.note})
        else:
            r = http.post("/v1/config/rollback", json={"version": args.version})
        if r.status_code != 200:
            return refused(r)
        print(json.dumps(r.json(), indent=2))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with api_client() as http:
        if args.jobs_command == "list":
            params: dict[str, str | int | bool] = {"limit": args.limit}
            if args.status:
                params["status"] = args.status
            if args.all:
                params["everyone"] = True
            r = http.get("/v1/jobs", params=params)
            if r.status_code != 200:
                return refused(r)
            for j in r.json()["jobs"]:
                when = time.strftime("%m-%d %H:%M:%S", time.localtime(j["timings"]["queued_at"] or 0))
                head = (j["output"] or j["spec"]["prompt"]).replace("\n", " ")[:50]
                print(f"{j['id']}  {j['status']:<9}  {when}  {j['modality']:<5}  {j['priority']:<6}  {head}")
            return 0
        if args.jobs_command == "show":
            r = http.get(f"/v1/jobs/{args.job_id}")
        else:
            r = http.delete(f"/v1/jobs/{args.job_id}")
        if r.status_code not in (200, 202):
            return refused(r)
        print(json.dumps(r.json(), indent=2))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    with api_client() as http:
        r = http.get("/v1/workers")
        if r.status_code != 200:
            return refused(r)
        if args.json:
            print(json.dumps(r.json(), indent=2))
            return 0
        for w in r.json():
            gpus = ", ".join(f"gpu{g['index']} {g.get('temperature_c', '?')}°C" for g in w.get("gpus", []))
            state = "ready" if w["ready"] else "loading"
            print(
                f"{w['name']:<12} {state:<7} {w['engine']:<9} {w['device']:<8} running {w['running']:>3}  "
                f"waiting {w['waiting']:>3}  {w['tokens_per_s']:8.1f} tok/s  {gpus}"
            )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    body: dict[str, object] = {
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
    }
    if args.seed is not None:
        body["seed"] = args.seed
    if args.stop:
        body["stop"] = args.stop
    if args.priority:
        body["priority"] = args.priority
    with api_client(httpx.Timeout(30, read=None)) as http:
        r = http.post("/v1/jobs", json=body)
        if r.status_code != 202:
            return refused(r)
        job_id = r.json()["id"]
        if args.stream:
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
                for event, data in _sse(resp):  # type: ignore[attr-defined]
                    if event == "token":
                        print(data["text"], end="", flush=True)
                    elif event == "done":
                        print(flush=True)
                        print(
                            f"[{data['status']}, {data['finish_reason']}, {data['usage']}]", file=sys.stderr
                        )
            return 0
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        print(job["output"] or "")
        print(f"[{job['status']}, {job['finish_reason']}, {job['usage']}]", file=sys.stderr)
        return 0 if job["status"] == "succeeded" else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localmoe", description="On-premises inference for MoE language models.")
    p.add_argument("--config", help="YAML settings file (env LOCALMOE_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model checkpoints").add_subparsers(
        dest="model_command", required=True
    )
    init = model.add_parser("init", help="build the small MoE checkpoint (no hub needed)")
    # moe_build.checkpoint.ARCHS (not imported here: it imports transformers; a test keeps them equal)
    archs = ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "phimoe", "granitemoe", "deepseek_v2"]
    archs += ["deepseek_v3", "glm4_moe", "gpt_oss"]
    init.add_argument("--arch", default="mixtral", choices=archs)
    init.add_argument("--out", help="output directory (default: LOCALMOE_HOME/models/SIZE-ARCH)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "reference", "large"],
        help="tiny: 4.4 M parameters, float32; reference: the 4.76 B GPU reference model, bf16; "
        "large: 23.5 B parameters, bf16 (47 GB; a GPU-bound step: Mixtral 8x7B's widths, 16 layers)",
    )
    init.add_argument("--vocab-size", type=int, default=4096)
    init.add_argument(
        "--context", type=int, help="its longest sequence in tokens, prompt and output (default: 2,048)"
    )
    init.add_argument("--force", action="store_true", help="rebuild even if the directory holds a model")
    init.set_defaults(func=cmd_model_init)

    fit = model.add_parser("train", help="train the small MoE from scratch on this machine's code and docs")
    fit.add_argument(
        "--out",
        help="output directory (default: the embedded model's place in LOCALMOE_HOME: `up` serves it)",
    )
    fit.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    fit.add_argument("--minutes", type=float, help="wall-clock budget of the whole run (default: the size's)")
    fit.add_argument(
        "--size",
        default="small",
        choices=["cpu-test", "small"],
        help="small: 27 M parameters for a GPU (9–14 min); cpu-test: 0.3 M parameters, for tests",
    )
    fit.add_argument("--seq-len", type=int, help="tokens per training sequence (default: the size's)")
    fit.add_argument("--batch-size", type=int, help="sequences per step (default: the size's)")
    fit.add_argument("--lr", type=float, help="peak learning rate (default: the size's)")
    fit.add_argument("--corpus-bytes", type=int, help="training text to read (default: the size's)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--aux-loss-coef", type=float, default=0.02, help="router load-balancing loss weight")
    fit.add_argument(
        "--balance",
        default="pooled",
        choices=["pooled", "per_layer"],
        help="balance loss over all layers at once (transformers') or per layer (experts specialize more)",
    )
    fit.add_argument("--max-steps", type=int, help="stop after this many steps (cosine schedule over steps)")
    fit.add_argument(
        "--instruct-minutes",
        type=float,
        help="of --minutes, the chat instruction stage's at the end (default: the size's; 0: none)",
    )
    fit.add_argument(
        "--from",
        dest="pre_trained",
        metavar="DIR",
        help="only the instruction stage (--instruct-minutes long), on DIR: a model this command "
        "pre-trained with --instruct-minutes 0",
    )
    fit.add_argument("--force", action="store_true", help="replace a model already in the directory")
    fit.set_defaults(func=cmd_model_train)

    packing = model.add_parser(
        "pack", help="int8-pack a checkpoint to ship it (default: as the embedded model, moe_build/assets)"
    )
    packing.add_argument("model", help="a checkpoint directory (e.g. written by `localmoe model train`)")
    packing.add_argument("--out", help="where the packed model goes (default: the embedded model's folder)")
    packing.add_argument("--force", action="store_true", help="replace what is there")
    packing.set_defaults(func=cmd_model_pack)

    tune = sub.add_parser(
        "tune-moe", help="search vLLM's fused-MoE kernel configs for the model on this GPU (CUDA + vLLM)"
    )
    tune.add_argument("--model-dir", help="the model to tune for (env LOCALMOE_MODEL_DIR)")
    tune.add_argument("--out", help="folder vLLM reads them from (default: engine.vllm.tuned_config_dir)")
    tune.add_argument(
        "--batch-sizes", help="comma-separated tokens per step to search (default: vLLM's grid, 1 to 4096)"
    )
    tune.add_argument("--max-rounds", type=int, default=3, help="coordinate-descent rounds per batch size")
    tune.add_argument(
        "--time-budget-s", type=float, help="stop starting new batch sizes after this long (they keep vLLM's)"
    )
    tune.add_argument("--tp", type=int, help="tensor-parallel size served (default: engine.vllm's)")
    tune.add_argument("--ep", action="store_true", default=None, help="expert parallelism is on")
    tune.set_defaults(func=cmd_tune_moe)

    up = sub.add_parser("up", help="start Redis, workers, the API and Flower")
    up.add_argument("--port", dest="api_port", type=int, help="API port (env LOCALMOE_API_PORT)")
    up.add_argument("--model-dir", help="serve this model directory (env LOCALMOE_MODEL_DIR)")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="what `localmoe up` runs here: pids, URLs, workers, queues")
    status.set_defaults(func=cmd_status)
    down = sub.add_parser("down", help="stop the `localmoe up` of this home (from another terminal)")
    down.add_argument("--timeout", type=float, default=90, help="seconds to wait for every child to stop")
    down.set_defaults(func=cmd_down)

    worker = sub.add_parser("worker", help="run one worker (normally started by `up`)")
    worker.add_argument("--name", help="worker name; its queue is localmoe.worker.NAME")
    worker.set_defaults(func=cmd_worker)

    flower = sub.add_parser(
        "flower", help="run Flower: each job a task, basic auth, history kept (normally started by `up`)"
    )
    flower.set_defaults(func=cmd_flower)

    api = sub.add_parser("api", help="run an API process (normally started by `up`)")
    api.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, so that several API processes share api_port (LOCALMOE_API_REUSE_PORT)",
    )
    api.set_defaults(func=cmd_api)

    submit = sub.add_parser("submit", help="submit a job and print its output")
    submit.add_argument("prompt")
    submit.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    submit.add_argument("--max-tokens", type=int, default=64)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--top-p", type=float, default=1.0)
    submit.add_argument("--top-k", type=int, default=0)
    submit.add_argument("--seed", type=int)
    submit.add_argument("--stop", action="append", help="stop string (repeatable)")
    submit.add_argument("--priority", choices=["high", "normal", "low", "batch"])
    submit.add_argument("--url", dest="api_url", help="API base URL (env LOCALMOE_API_URL)")
    submit.set_defaults(func=cmd_submit)

    keys = sub.add_parser("keys", help="API keys (needs an admin key)").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="make a key and print it once")
    create.add_argument("name", help="who or what uses it")
    create.add_argument("--scope", default="user", choices=["user", "admin"])
    create.add_argument("--max-priority", choices=["high", "normal", "low", "batch"])
    create.add_argument("--max-queued-jobs", type=int)
    create.add_argument("--max-queued-tokens", type=int)
    create.add_argument("--rate-per-s", type=float)
    create.add_argument("--burst", type=int)
    create.add_argument("--max-batches", type=int, help="batches not yet ended")
    create.add_argument("--batch-lines-in-flight", type=int, help="lines of its batches running at once")
    keys.add_parser("list", help="every key: id, scope, state, made, name")
    revoke = keys.add_parser("revoke", help="stop a key working (within a second)")
    revoke.add_argument("key_id")
    for k in (create, revoke):
        k.add_argument("--url", dest="api_url", help="API base URL (env LOCALMOE_API_URL)")
    keys.choices["list"].add_argument("--url", dest="api_url", help="API base URL (env LOCALMOE_API_URL)")
    for k in keys.choices.values():
        k.set_defaults(func=cmd_keys)
    boot = keys.add_parser(
        "bootstrap", help="make an admin key directly in Redis (LOCALMOE_REDIS_URL), without `up`"
    )
    boot.add_argument("--name", default="admin (bootstrap)")
    boot.set_defaults(func=cmd_keys_bootstrap)

    jobs = sub.add_parser("jobs", help="your jobs (an admin key sees everyone's with --all)").add_subparsers(
        dest="jobs_command", required=True
    )
    listing = jobs.add_parser("list", help="newest first: id, status, queued at, modality, priority, text")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--all", action="store_true", help="every key's jobs (admin)")
    listing.set_defaults(func=cmd_jobs)
    for verb, text in (("show", "one job as JSON"), ("cancel", "cancel a queued or running job")):
        one = jobs.add_parser(verb, help=text)
        one.add_argument("job_id")
        one.set_defaults(func=cmd_jobs)

    batches.add_commands(sub)

    workers = sub.add_parser("workers", help="the worker registry: engine, load, speed, GPU health")
    workers.add_argument("--json", action="store_true", help="everything the heartbeats carry")
    workers.set_defaults(func=cmd_workers)

    config = sub.add_parser(
        "config",
        help="live settings (admin): routing, limits, webhooks, engine preference; versioned in Redis",
    ).add_subparsers(dest="config_command", required=True)
    config.add_parser("show", help="the current version and the hot sections in effect").set_defaults(
        func=cmd_config
    )
    setting = config.add_parser(
        "set", help="a new version: KEY=VALUE... (dotted keys, JSON values), e.g. limits.max_queued_jobs=500"
    )
    setting.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    setting.add_argument("--note", help="why, kept with the version")
    setting.set_defaults(func=cmd_config)
    config.add_parser("history", help="every version: who, when, what").set_defaults(func=cmd_config)
    back = config.add_parser("rollback", help="a new version equal to version N (0: the start settings)")
    back.add_argument("version", type=int)
    back.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _env_flag(args, "config", "LOCALMOE_CONFIG")
    _env_flag(args, "api_port", "LOCALMOE_API_PORT")
    _env_flag(args, "model_dir", "LOCALMOE_MODEL_DIR")
    _env_flag(args, "api_url", "LOCALMOE_API_URL")
    level = os.environ.get("LOCALMOE_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    code: int = args.func(args)
    return code
