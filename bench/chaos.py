"""Chaos: jobs through workers that are SIGKILLed every ~10 s, a Redis restart, a webhook receiver
that is down, then answers 500, then recovers — and a ledger that checks the promise at the end.

The promise: an accepted job (202) reaches exactly one terminal state, with exactly one final
result and at most one completed-webhook id (repeated deliveries of that id are allowed). Beside
the jobs, one OpenAI batch (`batch_lines` chat lines, created first, run by the batch tier through
all of it) completes with every custom_id exactly once in its output and error files.

    python -m bench.chaos --jobs 2000 --workers 2     # the full form (10-20 min on 2 cores)
    pytest tests/test_chaos.py                        # the reduced form, same engine (ChaosPlan.reduced)

The run starts its own Redis (fixed port, AOF), N workers (restarted by this script ~2 s after
each kill, with the same name, as `localmoe up` would), the API and the webhook worker; every
process logs to <workdir>/logs. Kills rotate over three ways a worker dies: its Celery consumer,
its engine process (the runtime process between them follows either), or both at once. The ledger
reads Redis (job records and their event streams), the SSE text of a sample of jobs and every
delivery the receiver saw.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpx
import redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bench.batch_tier import CHAT, create_batch
from bench.harness import auth, service_env
from localmoe.redis_server import RedisServer, free_port
from scheduler import keys
from scheduler.jobs import JobStatus
from scheduler.queue import make_celery
from scheduler.registry import WorkerInfo
from scheduler.stream import DoneEvent, Fence, TokenEvent

Log = Callable[[str], None]
TERMINAL = {s.value for s in JobStatus if s.terminal}
EXPECTED_HOOK = {"succeeded": "job.completed", "failed": "job.failed", "cancelled": "job.cancelled"}
TERMINAL_HOOKS = set(EXPECTED_HOOK.values())
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "The history of the city begins",
    "class Stack:\n    def push(self, item):",
    "for i in range(10):\n",
    "Dear team, the quarterly results",
]
KILL_MODES = ("consumer", "engine", "both")


@dataclass
class ChaosPlan:
    """What a run does. Times in seconds from the first submission; `at` fractions are of the
    submission window (jobs / rate_per_s)."""

    jobs: int = 2000
    workers: int = 2
    rate_per_s: float = 4.0  # submissions per second, steady
    kill_every_s: float = 10.0  # a worker is SIGKILLed this often (± kill_jitter_s)
    kill_jitter_s: float = 2.0
    first_kill_s: float = 8.0
    restart_after_s: float = 2.0  # a killed worker is started again this long after it died
    redis_restart_at: float = 0.6
    redis_down_s: float = 2.0
    receiver_down_at: float = 0.15  # connection refused from here...
    receiver_error_at: float = 0.3  # ...then 500 from here...
    receiver_up_at: float = 0.45  # ...then 200 again
    long_fraction: float = 0.35  # jobs of 96-320 tokens; the rest take 4-24
    ignore_eos_fraction: float = 0.4
    cancel_fraction: float = 0.08  # cancelled by the client 0-3 s after submission
    high_fraction: float = 0.05  # priority high
    sse_fraction: float = 0.05  # read over SSE as they run
    drain_timeout_s: float = 300.0  # after the last submission: every job terminal by then
    webhook_timeout_s: float = 120.0  # then: every terminal webhook delivered by then
    max_batch_size: int = 16
    step_delay_s: float = 0.02  # per engine step: long jobs run for seconds, so kills find them running
    batch_lines: int = 2000  # one batch of this many lines beside the jobs (0: none)
    batch_timeout_s: float = 600.0  # after the jobs drained: the batch terminal by then
    seed: int = 20261129

    @classmethod
    def reduced(cls) -> ChaosPlan:
        """The CI form: 150 jobs in ~50 s, 3 kills, one Redis restart, the receiver's three phases."""
        return cls(
            jobs=150,
            rate_per_s=3.0,
            kill_every_s=13.0,
            kill_jitter_s=1.0,
            first_kill_s=7.0,
            sse_fraction=0.1,
            drain_timeout_s=90.0,
            webhook_timeout_s=45.0,
            batch_lines=120,
            batch_timeout_s=120.0,
        )

    @property
    def window_s(self) -> float:
        return self.jobs / self.rate_per_s


# --- the webhook receiver ------------------------------------------------------------------------


@dataclass
class Hit:
    webhook_id: str
    type: str
    job_id: str
    valid: bool  # the Standard Webhooks signature checked out
    answered: int | None  # None: never answered (the receiver was down)
    at: float


class HookReceiver:
    """A webhook receiver on a fixed loopback port with phases: up (200), down (the listening
    socket closed: connection refused), error (500). Every request that reaches it is a Hit."""

    def __init__(self, t0: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.secret = ""  # the endpoint's signing secret, once registered
        self.phase = "up"
        self.hits: list[Hit] = []
        self.t0 = t0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._open()

    def _open(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = receiver.record({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def record(self, headers: dict[str, str], body: bytes) -> int:
        status = 500 if self.phase == "error" else 200
        try:
            Webhook(self.secret).verify(body, headers)
            valid = True
        except WebhookVerificationError:
            valid = False
        payload = json.loads(body)
        hit = Hit(
            headers.get("webhook-id", ""),
            payload.get("type", ""),
            payload.get("data", {}).get("id", ""),
            valid,
            status,
            time.monotonic() - self.t0,
        )
        with self._lock:
            self.hits.append(hit)
        return status

    def set_phase(self, phase: str) -> None:
        if phase == "down" and self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        elif phase != "down" and self._server is None:
            self._open()
        self.phase = phase

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def close(self) -> None:
        self.set_phase("down")


# --- processes -----------------------------------------------------------------------------------


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    out = log_path.open("ab")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _spawned(parent: int) -> int | None:
    """parent's child running multiprocessing's spawn_main, if any."""
    for child in _children(parent):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


def runtime_pid(consumer_pid: int) -> int | None:
    """The worker's runtime process: the consumer's spawned child (its heartbeats carry its pid)."""
    return _spawned(consumer_pid)


def engine_pid(consumer_pid: int) -> int | None:
    """The worker's engine process: the runtime's spawned child."""
    runtime = runtime_pid(consumer_pid)
    return _spawned(runtime) if runtime is not None else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone"


@dataclass
class Slot:
    """One worker name and its current process; restarted by `Workers.supervise` when it dies."""

    name: str
    proc: subprocess.Popen[bytes]
    died_at: float | None = None
    starts: int = 1


class Workers:
    """The run's workers, supervised: a dead one is started again restart_after_s later."""

    def __init__(self, env: dict[str, str], n: int, logs: Path, restart_after_s: float, say: Log) -> None:
        self.env, self.logs, self.restart_after_s, self.say = env, logs, restart_after_s, say
        self.slots = [Slot(f"chaos{i}", self._start(f"chaos{i}")) for i in range(n)]
        self.orphans: list[int] = []  # a killed consumer's runtime and engine: they must exit by themselves
        self.stopping = False
        self.lock = threading.Lock()

    def _start(self, name: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "localmoe", "worker", "--name", name]
        return _spawn(argv, self.env, self.logs / f"{name}.log")

    def supervise(self) -> None:
        while not self.stopping:
            with self.lock:
                for slot in self.slots:
                    code = slot.proc.poll()
                    if code is None:
                        continue
                    now = time.monotonic()
                    if slot.died_at is None:
                        slot.died_at = now
                        self.say(f"{slot.name} exited ({code})")
                    elif now - slot.died_at >= self.restart_after_s and not self.stopping:
                        slot.proc, slot.died_at = self._start(slot.name), None
                        slot.starts += 1
                        self.say(f"{slot.name} restarted (start #{slot.starts})")
            time.sleep(0.1)

    def ready(self, client: redis.Redis, slot: Slot) -> bool:
        """Alive, and its current engine has reported ready."""
        if slot.proc.poll() is not None:
            return False
        runtime = runtime_pid(slot.proc.pid)
        raw = client.get(keys.worker(slot.name))
        if runtime is None or raw is None:
            return False
        info = WorkerInfo.model_validate_json(raw)
        return info.ready and info.pid == runtime

    def kill(self, slot: Slot, mode: str) -> str:
        """SIGKILL the worker's consumer, its engine process, or both; → what was killed. (The
        runtime process between them dies with either: of its engine's death, or of its pipe's.)"""
        with self.lock:
            consumer, runtime = slot.proc.pid, runtime_pid(slot.proc.pid)
            engine = _spawned(runtime) if runtime is not None else None
            if engine is None:
                mode = "consumer"
            if mode in ("engine", "both") and engine is not None:
                os.kill(engine, signal.SIGKILL)
            if mode in ("consumer", "both"):
                os.kill(consumer, signal.SIGKILL)
            if mode == "consumer":
                self.orphans += [pid for pid in (runtime, engine) if pid is not None]
            return f"{mode} (consumer {consumer}, engine {engine})"

    def stop(self) -> list[int]:
        """Stop every worker; → orphaned engines still alive (each is SIGKILLed here)."""
        self.stopping = True
        with self.lock:
            engines = [
                p
                for s in self.slots
                if s.proc.poll() is None
                for p in (runtime_pid(s.proc.pid), engine_pid(s.proc.pid))
                if p is not None
            ]
            for slot in self.slots:
                if slot.proc.poll() is None:
                    slot.proc.terminate()
            for slot in self.slots:
                try:
                    slot.proc.wait(30)
                except subprocess.TimeoutExpired:
                    slot.proc.kill()
                    slot.proc.wait()
        lingering = [pid for pid in self.orphans if _alive(pid)]
        for pid in lingering + [e for e in engines if _alive(e)]:
            os.kill(pid, signal.SIGKILL)
        return lingering


# --- jobs ----------------------------------------------------------------------------------------


@dataclass
class Accepted:
    id: str
    max_tokens: int
    ignore_eos: bool
    priority: str
    cancel_after_s: float | None
    sse: bool
    sse_events: list[dict[str, Any]] = field(default_factory=list)
    sse_error: str | None = None


def job_body(rng: random.Random, plan: ChaosPlan, hook_url: str) -> dict[str, Any]:
    long = rng.random() < plan.long_fraction
    return {
        "prompt": rng.choice(PROMPTS),
        "max_tokens": rng.randint(96, 320) if long else rng.randint(4, 24),
        "ignore_eos": rng.random() < plan.ignore_eos_fraction,
        "priority": "high" if rng.random() < plan.high_fraction else "normal",
        "webhook": {"url": hook_url, "events": ["completed", "failed", "cancelled"]},
    }


def read_sse(http: httpx.Client, job: Accepted) -> None:
    try:
        with http.stream("GET", f"/v1/jobs/{job.id}/events", timeout=300) as r:
            event = ""
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    job.sse_events.append({"event": event, **json.loads(line[5:])})
    except httpx.HTTPError as e:
        job.sse_error = f"{type(e).__name__}: {e}"


# --- the ledger ----------------------------------------------------------------------------------


@dataclass
class Ledger:
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # submissions not accepted, by answer
    status: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # the job's record is gone
    stuck: list[str] = field(default_factory=list)  # not terminal after the drain
    duplicate_finals: list[str] = field(default_factory=list)  # more than one done entry
    no_final: list[str] = field(default_factory=list)  # terminal, but no done entry
    output_mismatch: list[str] = field(default_factory=list)  # output ≠ the streamed text
    sse_mismatch: list[str] = field(default_factory=list)  # SSE text ≠ output, or done ≠ 1
    sse_checked: int = 0
    multi_completed: list[str] = field(default_factory=list)  # > 1 distinct completed-webhook id
    multi_terminal: list[str] = field(default_factory=list)  # > 1 distinct terminal-webhook id
    wrong_hook: list[str] = field(default_factory=list)  # a terminal webhook of another status
    missing_hooks: list[str] = field(default_factory=list)  # terminal, no acknowledged terminal hook
    bad_signatures: int = 0
    deliveries: int = 0  # requests that reached the receiver
    answered: Counter[int] = field(default_factory=Counter)
    webhook_ids: int = 0
    repeated_deliveries: int = 0  # deliveries of an id already seen (retries and duplicates)
    acked_twice: int = 0  # ids answered 200 more than once (at-least-once duplicates)
    attempts: Counter[int] = field(default_factory=Counter)
    failed_reasons: Counter[str] = field(default_factory=Counter)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    kills: int = 0
    window_s: float = 0.0
    drain_s: float = 0.0
    tokens: int = 0
    orphans_lingering: list[int] = field(default_factory=list)
    batch_lines: int = 0  # the batch's lines (0: no batch)
    batch_status: str = ""  # where the batch ended
    batch_counts: dict[str, int] = field(default_factory=dict)  # its request_counts
    batch_missing: list[str] = field(default_factory=list)  # custom_ids in neither result file
    batch_twice: list[str] = field(default_factory=list)  # custom_ids in the result files more than once
    batch_failed_lines: int = 0  # lines answered with an error (their jobs failed)

    def violations(self) -> dict[str, list[str]]:
        """The invariants that failed: name → the job ids (or a count) that break it."""
        batch_end = [self.batch_status] if self.batch_lines and self.batch_status != "completed" else []
        checks = {
            "batch not completed": batch_end,
            "batch lines in no result file": self.batch_missing,
            "batch lines more than once": self.batch_twice,
            "lost": self.lost,
            "stuck": self.stuck,
            "duplicate finals": self.duplicate_finals,
            "terminal without a final": self.no_final,
            "output differs from the stream": self.output_mismatch,
            "SSE differs from the output": self.sse_mismatch,
            "> 1 completed-webhook id": self.multi_completed,
            "> 1 terminal-webhook id": self.multi_terminal,
            "terminal webhook of another status": self.wrong_hook,
            "bad signatures": [str(self.bad_signatures)] if self.bad_signatures else [],
        }
        return {k: v for k, v in checks.items() if v}

    def table(self) -> str:
        elapsed = max(self.window_s + self.drain_s, 1e-9)
        s = self.status
        rows = [
            ("accepted (202)", self.accepted),
            ("refused at submission", dict(self.refused) or 0),
            ("succeeded / failed / cancelled", f"{s['succeeded']} / {s['failed']} / {s['cancelled']}"),
            ("lost", len(self.lost)),
            ("stuck", len(self.stuck)),
            ("duplicate finals", len(self.duplicate_finals)),
            ("terminal without a final", len(self.no_final)),
            ("output ≠ streamed text", len(self.output_mismatch)),
            (f"SSE ≠ output (of {self.sse_checked} read)", len(self.sse_mismatch)),
            ("jobs with > 1 completed-webhook id", len(self.multi_completed)),
            ("jobs with > 1 terminal-webhook id", len(self.multi_terminal)),
            ("terminal webhook of another status", len(self.wrong_hook)),
            ("terminal jobs without a delivered terminal webhook", len(self.missing_hooks)),
            ("webhook requests received (answers)", f"{self.deliveries} {dict(self.answered)}"),
            (
                "distinct webhook ids / repeated deliveries",
                f"{self.webhook_ids} / {self.repeated_deliveries}",
            ),
            ("ids acknowledged (200) more than once", self.acked_twice),
            ("bad signatures", self.bad_signatures),
            ("attempts (attempt: jobs)", dict(sorted(self.attempts.items()))),
            ("kills", self.kills),
            (
                f"batch of {self.batch_lines} lines: status, counts, lines failed",
                f"{self.batch_status or '-'}, {self.batch_counts}, {self.batch_failed_lines}",
            ),
            ("submission window / drain", f"{self.window_s:.0f} s / {self.drain_s:.0f} s"),
            (
                "terminal jobs / s, tokens / s",
                f"{sum(s.values()) / elapsed:.2f} / {self.tokens / elapsed:.0f}",
            ),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if self.failed_reasons:
            lines.append("failed because: " + "; ".join(f"{n}× {r}" for r, n in self.failed_reasons.items()))
        if self.orphans_lingering:
            lines.append(f"engines of killed consumers still alive at the end: {self.orphans_lingering}")
        for name, ids in self.violations().items():
            lines.append(f"VIOLATION {name}: {ids[:20]}")
        if self.missing_hooks:
            lines.append(f"missing terminal webhooks: {self.missing_hooks[:20]}")
        return "\n".join(lines)


def _stream(client: redis.Redis, job_id: str) -> tuple[str, int]:
    """(the text a reader sees, the number of done entries) of a job's event stream."""
    fence, text, done = Fence(), [], 0
    for _, fields in cast(list[tuple[str, dict[str, str]]], client.xrange(keys.events(job_id))):
        event = fence.visible(fields)
        if isinstance(event, TokenEvent):
            text.append(event.text)
        elif isinstance(event, DoneEvent):
            done += 1
    return "".join(text), done


def audit(client: redis.Redis, jobs: list[Accepted], hits: list[Hit], ledger: Ledger) -> None:
    """Fill the ledger from Redis, the SSE reads and the receiver's hits."""
    terminal: dict[str, str] = {}
    for job in jobs:
        fields = cast(dict[str, str], client.hgetall(keys.job(job.id)))
        if not fields:
            ledger.lost.append(job.id)
            continue
        status = json.loads(fields["status"])
        ledger.status[status] += 1
        ledger.attempts[int(json.loads(fields.get("attempt", "0")))] += 1
        if status not in TERMINAL:
            ledger.stuck.append(job.id)
            continue
        terminal[job.id] = status
        output = json.loads(fields.get("output", "null"))
        ledger.tokens += int(json.loads(fields.get("usage.completion_tokens", "0")))
        if status == "failed":
            ledger.failed_reasons[str(json.loads(fields.get("error", "null")))[:80]] += 1
        text, done = _stream(client, job.id)
        if done > 1:
            ledger.duplicate_finals.append(job.id)
        elif done == 0:
            ledger.no_final.append(job.id)
        if output is not None and output != text:
            ledger.output_mismatch.append(job.id)
        if job.sse:
            ledger.sse_checked += 1
            seen = "".join(str(e.get("text", "")) for e in job.sse_events if e["event"] == "token")
            finals = [e["event"] for e in job.sse_events].count("done")
            if job.sse_error or finals != 1 or (output is not None and seen != output):
                ledger.sse_mismatch.append(job.id)
    _audit_hooks(hits, terminal, ledger)


def _audit_hooks(hits: list[Hit], terminal: dict[str, str], ledger: Ledger) -> None:
    ledger.deliveries = len(hits)
    ledger.answered = Counter(h.answered or 0 for h in hits)
    ledger.bad_signatures = sum(not h.valid for h in hits)
    per_id = Counter(h.webhook_id for h in hits)
    ledger.webhook_ids = len(per_id)
    ledger.repeated_deliveries = sum(n - 1 for n in per_id.values())
    acked = Counter(h.webhook_id for h in hits if h.answered == 200)
    ledger.acked_twice = sum(1 for n in acked.values() if n > 1)
    completed: dict[str, set[str]] = {}
    terminal_ids: dict[str, set[str]] = {}
    delivered: dict[str, set[str]] = {}  # job → terminal types acknowledged
    for h in hits:
        if h.type not in TERMINAL_HOOKS:
            continue
        terminal_ids.setdefault(h.job_id, set()).add(h.webhook_id)
        if h.type == "job.completed":
            completed.setdefault(h.job_id, set()).add(h.webhook_id)
        if h.answered == 200:
            delivered.setdefault(h.job_id, set()).add(h.type)
    ledger.multi_completed = [j for j, ids in completed.items() if len(ids) > 1]
    ledger.multi_terminal = [j for j, ids in terminal_ids.items() if len(ids) > 1]
    for job_id, status in terminal.items():
        got = delivered.get(job_id, set())
        if got - {EXPECTED_HOOK[status]}:
            ledger.wrong_hook.append(job_id)
        if EXPECTED_HOOK[status] not in got:
            ledger.missing_hooks.append(job_id)


# --- the run -------------------------------------------------------------------------------------


class Chaos:
    """One run of a ChaosPlan; `run()` → the Ledger. workdir holds Redis's data and the logs."""

    def __init__(self, plan: ChaosPlan, workdir: Path, model: Path, say: Log = print) -> None:
        self.plan, self.workdir, self.model = plan, workdir, model
        self.rng = random.Random(plan.seed)  # the jobs (main thread)
        self.chaos_rng = random.Random(plan.seed + 1)  # kill times and victims (chaos thread)
        self._count = threading.Lock()
        self.t0 = time.monotonic()
        self.ledger = Ledger(window_s=plan.window_s)
        self._say = say
        self.jobs: list[Accepted] = []
        self.submitted = 0
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def say(self, what: str) -> None:
        t = time.monotonic() - self.t0
        self.ledger.timeline.append((t, what))
        self._say(f"[{t:7.1f} s] {what}")

    def run(self) -> Ledger:
        plan = self.plan
        self.server = RedisServer(self.workdir / "redis", port=free_port())  # the port stays on restart
        self.server.start()
        self.client = redis.Redis.from_url(self.server.url, decode_responses=True)
        settings = {
            "LOCALMOE_WEBHOOKS__ALLOW": '["127.0.0.1"]',
            "LOCALMOE_WEBHOOKS__BASE_BACKOFF_S": "0.2",
            "LOCALMOE_WEBHOOKS__MAX_BACKOFF_S": "3",
            "LOCALMOE_ENGINE__MAX_BATCH_SIZE": str(plan.max_batch_size),
            "LOCALMOE_ENGINE__CPU_THREADS": "1",
            "LOCALMOE_ENGINE__STEP_DELAY_S": str(plan.step_delay_s),
            "LOCALMOE_METRICS__WORKER_PORT": "0",
            "LOCALMOE_METRICS__WEBHOOK_PORT": "0",
            "LOCALMOE_LOG_LEVEL": "warning",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONUNBUFFERED": "1",
        }
        self.env = service_env(self.server.url, self.model, self.workdir, **settings)
        self.receiver = HookReceiver(self.t0)
        others: list[subprocess.Popen[bytes]] = []
        self.workers = Workers(self.env, plan.workers, self.logs, plan.restart_after_s, self.say)
        try:
            others.append(self._start_webhook_worker())
            self._wait(
                lambda: all(self.workers.ready(self.client, s) for s in self.workers.slots), 180, "workers"
            )
            api, url = self._start_api()
            others.append(api)
            self.http = httpx.Client(base_url=url, headers=auth(self.env), timeout=30)
            endpoint = self.http.post("/v1/webhooks", json={"url": self.receiver.url})
            endpoint.raise_for_status()
            self.receiver.secret = endpoint.json()["secret"]
            self.say(f"ready: {plan.workers} workers, API {url}, receiver {self.receiver.url}")
            self.batch_id = self._create_batch() if plan.batch_lines else None
            self._chaos_and_submit()
            self._drain()
            if self.batch_id is not None:
                self._audit_batch(self.batch_id)
        finally:
            self.ledger.orphans_lingering = self.workers.stop()
            for proc in others:
                proc.terminate()
            for proc in others:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.receiver.close()
            self.client.close()
            self.server.stop()
        return self.ledger

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.2)
        self.say(f"timed out after {timeout:.0f} s waiting for {what}")
        return False

    def _start_webhook_worker(self) -> subprocess.Popen[bytes]:
        proc = _spawn([sys.executable, "-m", "workers.webhooks"], self.env, self.logs / "webhooks.log")
        app = make_celery(self.server.url)

        def up() -> bool:
            assert proc.poll() is None, "the webhook worker exited"
            replies = app.control.ping(timeout=0.3) or []
            return any(name.startswith("webhooks@") for reply in replies for name in reply)

        self._wait(up, 60, "the webhook worker")
        app.close()
        return proc

    def _start_api(self) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)]
        proc = _spawn([*argv, "--log-level", "warning", "--no-access-log"], self.env, self.logs / "api.log")
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, "the API exited"
            try:
                return httpx.get(f"{url}/readyz", headers=auth(self.env), timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait(ready, 60, "the API")
        return proc, url

    # --- the batch ----------------------------------------------------------------------------
    def _create_batch(self) -> str:
        lines = [
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": CHAT,
                "body": {
                    "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
                    "max_tokens": self.rng.randint(4, 24),
                    "temperature": 0,
                },
            }
            for i in range(self.plan.batch_lines)
        ]
        batch_id = create_batch(self.http, lines)
        self.ledger.batch_lines = len(lines)
        self.say(f"batch {batch_id}: {len(lines)} lines")
        return batch_id

    def _audit_batch(self, batch_id: str) -> None:
        """Waits for the batch to end, then reads both result files: each custom_id once."""
        batch: dict[str, Any] = {}

        def ended() -> bool:
            nonlocal batch
            try:
                batch = self.http.get(f"/v1/batches/{batch_id}").json()
            except httpx.HTTPError:
                return False
            return batch.get("status") in ("completed", "failed", "expired", "cancelled")

        self._wait(ended, self.plan.batch_timeout_s, "the batch to end")
        ledger = self.ledger
        ledger.batch_status = str(batch.get("status"))
        ledger.batch_counts = dict(batch.get("request_counts") or {})
        seen: Counter[str] = Counter()
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            content = self.http.get(f"/v1/files/{file_id}/content")
            content.raise_for_status()
            for raw in content.text.splitlines():
                line = json.loads(raw)
                seen[line["custom_id"]] += 1
                response = line.get("response") or {}
                ledger.batch_failed_lines += response.get("status_code") != 200
        ledger.batch_missing = [f"line-{i}" for i in range(ledger.batch_lines) if f"line-{i}" not in seen]
        ledger.batch_twice = [c for c, n in seen.items() if n > 1]
        self.say(f"batch {ledger.batch_status}: {ledger.batch_counts}")

    # --- submission and chaos, side by side -------------------------------------------------
    def _schedule(self) -> list[tuple[float, str]]:
        plan, w = self.plan, self.plan.window_s
        events = [
            (plan.receiver_down_at * w, "receiver down"),
            (plan.receiver_error_at * w, "receiver error"),
            (plan.receiver_up_at * w, "receiver up"),
            (plan.redis_restart_at * w, "redis restart"),
        ]
        t = plan.first_kill_s
        while t < w:
            events.append((t, "kill"))
            t += plan.kill_every_s + self.chaos_rng.uniform(-plan.kill_jitter_s, plan.kill_jitter_s)
        return sorted(events)

    def _chaos_and_submit(self) -> None:
        start = time.monotonic()
        done = threading.Event()
        threading.Thread(target=self.workers.supervise, name="supervisor", daemon=True).start()
        chaos = threading.Thread(target=self._chaos, args=(start, done), name="chaos", daemon=True)
        chaos.start()
        progress = threading.Thread(target=self._progress, args=(done,), name="progress", daemon=True)
        progress.start()
        with ThreadPoolExecutor(8, thread_name_prefix="submit") as pool:
            for i in range(self.plan.jobs):
                time.sleep(max(0.0, start + i / self.plan.rate_per_s - time.monotonic()))
                pool.submit(
                    self._submit_one, job_body(self.rng, self.plan, self.receiver.url), self.rng.random()
                )
        self.ledger.window_s = time.monotonic() - start
        done.set()
        chaos.join()
        if self.receiver.phase != "up":
            self._act("receiver up")
        self.say(f"submission over: {self.ledger.accepted} accepted of {self.submitted}")

    def _submit_one(self, body: dict[str, Any], draw: float) -> None:
        plan = self.plan
        with self._count:
            self.submitted += 1
        try:
            r = self.http.post("/v1/jobs", json=body)
            answer = str(r.status_code)
        except httpx.HTTPError as e:
            answer = type(e).__name__
        if answer != "202":
            with self._count:
                self.ledger.refused[answer] += 1
            return
        cancel = draw < plan.cancel_fraction
        sse = plan.cancel_fraction <= draw < plan.cancel_fraction + plan.sse_fraction
        job = Accepted(
            r.json()["id"],
            body["max_tokens"],
            body["ignore_eos"],
            body["priority"],
            draw / plan.cancel_fraction * 3.0 if cancel else None,
            sse,
        )
        with self._count:
            self.jobs.append(job)
            self.ledger.accepted += 1
        if sse:
            threading.Thread(target=read_sse, args=(self.http, job), daemon=True).start()
        if job.cancel_after_s is not None:
            threading.Timer(job.cancel_after_s, self._cancel, args=(job.id,)).start()

    def _cancel(self, job_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError):  # the ledger judges the job either way
            self.http.delete(f"/v1/jobs/{job_id}")

    def _chaos(self, start: float, done: threading.Event) -> None:
        for at, action in self._schedule():
            if done.wait(max(0.0, start + at - time.monotonic())):
                return
            self._act(action)

    def _act(self, action: str) -> None:
        if action.startswith("receiver"):
            self.receiver.set_phase(action.split()[1])
            self.say(action)
        elif action == "redis restart":
            self.say("redis stopping")
            self.server.stop()
            time.sleep(self.plan.redis_down_s)
            self.server.start()
            self.say("redis started again (same port, AOF)")
        elif action == "kill":
            try:
                ready = [s for s in self.workers.slots if self.workers.ready(self.client, s)]
            except redis.RedisError:
                ready = []
            if not ready:
                self.say("kill skipped: no ready worker")
                return
            victim = self.chaos_rng.choice(ready)
            mode = KILL_MODES[self.ledger.kills % len(KILL_MODES)]
            self.ledger.kills += 1
            self.say(f"kill -9 {victim.name}: {self.workers.kill(victim, mode)}")

    def _progress(self, done: threading.Event) -> None:
        while not done.wait(10.0):
            self.say(self._status_line())

    def _status_line(self) -> str:
        try:
            counts = Counter(self._statuses().values())
        except redis.RedisError:
            counts = Counter({"redis down": 1})
        alive = sum(s.proc.poll() is None for s in self.workers.slots)
        return (
            f"accepted {self.ledger.accepted}/{self.submitted}; {dict(counts)}; workers alive {alive}; "
            f"receiver {self.receiver.phase}, {len(self.receiver.hits)} requests"
        )

    def _statuses(self) -> dict[str, str]:
        jobs = list(self.jobs)
        pipe = self.client.pipeline(transaction=False)
        for job in jobs:
            pipe.hget(keys.job(job.id), "status")
        return {j.id: json.loads(s) if s else "gone" for j, s in zip(jobs, pipe.execute(), strict=True)}

    # --- the end ------------------------------------------------------------------------------
    def _drain(self) -> None:
        start = time.monotonic()

        said, last_end, left_before = start, start, -1  # last_end: when a job last ended

        def drained() -> bool:
            nonlocal said, last_end, left_before
            left = [s for s in self._statuses().values() if s not in TERMINAL and s != "gone"]
            if len(left) != left_before:
                last_end, left_before = time.monotonic(), len(left)
            if time.monotonic() - said > 10:
                said = time.monotonic()
                self.say(f"draining: {len(left)} not terminal; {self._status_line()}")
            return not left

        self._wait(drained, self.plan.drain_timeout_s, "every job to end")
        self.ledger.drain_s = last_end - start  # stuck jobs do not stretch the throughput's time

        def hooks_in() -> bool:
            statuses = self._statuses()
            acked = {(h.job_id, h.type) for h in self.receiver.snapshot() if h.answered == 200}
            return all((i, EXPECTED_HOOK[s]) in acked for i, s in statuses.items() if s in EXPECTED_HOOK)

        self._wait(hooks_in, self.plan.webhook_timeout_s, "every terminal webhook")
        for job in self.jobs:  # SSE readers of terminal jobs have their done event by now
            deadline = time.monotonic() + 5
            while (
                job.sse
                and not job.sse_error
                and time.monotonic() < deadline
                and not any(e["event"] == "done" for e in job.sse_events)
            ):
                time.sleep(0.1)
        time.sleep(1.0)  # a duplicate delivery in flight lands in the ledger too
        audit(self.client, self.jobs, self.receiver.snapshot(), self.ledger)
        self.say("ledger done")


def main() -> None:
    from moe_build.checkpoint import build_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=ChaosPlan.rate_per_s, help="submissions per second")
    ap.add_argument("--kill-every", type=float, default=ChaosPlan.kill_every_s, help="seconds")
    ap.add_argument("--seed", type=int, default=ChaosPlan.seed)
    ap.add_argument("--batch-lines", type=int, default=ChaosPlan.batch_lines, help="0: no batch")
    ap.add_argument("--reduced", action="store_true", help="the CI form (tests/test_chaos.py)")
    args = ap.parse_args()
    if args.reduced:
        plan = ChaosPlan.reduced()
    else:
        plan = ChaosPlan(
            jobs=args.jobs,
            workers=args.workers,
            rate_per_s=args.rate,
            kill_every_s=args.kill_every,
            seed=args.seed,
            batch_lines=args.batch_lines,
        )
    workdir = Path(tempfile.mkdtemp(prefix="localmoe-chaos-"))
    print(f"chaos: {plan}\nworkdir (Redis data, logs): {workdir}", flush=True)
    model = build_checkpoint(workdir / "model", progress=False)
    ledger = Chaos(plan, workdir, model, say=lambda s: print(s, flush=True)).run()
    print("\n" + ledger.table(), flush=True)
    failed = ledger.violations()
    print(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'PASS: every invariant holds'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
