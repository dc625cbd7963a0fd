"""Prometheus metrics, scraped from real processes: the API's /metrics, a worker's exporter and the
webhook worker's exporter, parsed with prometheus_client's own parser."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from host import metric_names
from localmoe.redis_server import free_port
from scheduler import keys
from scheduler.queue import make_celery
from scheduler.webhooks import WebhookEventType, enqueue_delivery, register_endpoint
from tests.conftest import Stack, private_stack, wait_done, wait_for

CODE = "def fibonacci(n):\n"


class Scrape:
    """One scrape: its families' names and its samples."""

    def __init__(self, text: str) -> None:
        families = list(text_string_to_metric_families(text))
        self.samples: list[Sample] = [s for f in families for s in f.samples]
        self.names = {f.name for f in families} | {s.name for s in self.samples}
        self.names |= {f.name + "_total" for f in families if f.type == "counter"}

    def value(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def scrape(url: str, key: str | None = None) -> Scrape:
    r = httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


@pytest.fixture(scope="module")
def served(service_env: dict[str, str]) -> Iterator[tuple[Stack, str]]:
    """A service with a worker whose exporter is on a free port: (the stack, the exporter's URL)."""
    port = free_port()
    with private_stack(service_env, worker=True, LOCALMOE_METRICS__WORKER_PORT=str(port)) as stack:
        yield stack, f"http://127.0.0.1:{port}/metrics"


def new_key(http: httpx.Client, **limits: float) -> str:
    r = http.post("/v1/keys", json={"name": f"metrics {uuid.uuid4().hex[:6]}", "limits": limits})
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def test_api_metrics_need_an_admin_key(served: tuple[Stack, str]) -> None:
    stack, _ = served
    assert httpx.get(f"{stack.api}/metrics").status_code == 401
    with stack.http() as admin:
        user = new_key(admin)
    assert httpx.get(f"{stack.api}/metrics", headers={"Authorization": f"Bearer {user}"}).status_code == 403
    scrape(f"{stack.api}/metrics", stack.admin_key)


def test_jobs_move_the_api_and_worker_metrics(served: tuple[Stack, str]) -> None:
    stack, exporter = served
    api = f"{stack.api}/metrics"
    api0, worker0 = scrape(api, stack.admin_key), scrape(exporter)
    bodies = [
        {"prompt": CODE, "max_tokens": 12},
        {"prompt": CODE, "max_tokens": 6},
        {"prompt": "The weather today", "max_tokens": 8, "modality": "text", "priority": "low"},
    ]
    with stack.http() as http:
        created = [http.post("/v1/jobs", json=b) for b in bodies]
        assert [r.status_code for r in created] == [202] * 3
        jobs = [wait_done(http, r.json()["id"]) for r in created]
        assert http.get("/no/such/path").status_code == 404
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    api1 = scrape(api, stack.admin_key)

    def moved(name: str, **labels: str) -> float:
        return api1.value(name, **labels) - api0.value(name, **labels)

    assert moved("localmoe_jobs_submitted_total", modality="code", priority="normal") == 2
    assert moved("localmoe_jobs_submitted_total", modality="text", priority="low") == 1
    # route labels are templates: a job's id never becomes a label value
    assert moved("localmoe_http_requests_total", route="/v1/jobs", method="POST", status="202") == 3
    assert moved("localmoe_http_requests_total", route="/v1/jobs/{job_id}", method="GET", status="200") >= 3
    assert moved("localmoe_http_requests_total", route="other", method="GET", status="404") == 1
    assert moved("localmoe_http_request_duration_seconds_count", route="/v1/jobs", method="POST") == 3
    routes = {labels["route"] for labels in api1.labels("localmoe_http_requests_total")}
    assert not any(j["id"] in route for j in jobs for route in routes), routes
    assert api1.value("localmoe_workers", state="ready") == 1
    assert api1.value("localmoe_queue_depth", queue=keys.SHARED_QUEUE) == 0

    worker1 = scrape(exporter)

    def done(name: str, **labels: str) -> float:
        return worker1.value(name, **labels) - worker0.value(name, **labels)

    name = jobs[0]["worker"]
    completion = sum(j["usage"]["completion_tokens"] for j in jobs)
    assert done("localmoe_generation_tokens_total", worker=name) >= completion > 0
    assert done("localmoe_prompt_tokens_total") == sum(j["usage"]["prompt_tokens"] for j in jobs)
    assert done("localmoe_time_to_first_token_seconds_count") == 3
    assert done("localmoe_e2e_request_latency_seconds_count") == 3
    assert done("localmoe_request_queue_time_seconds_count") == 3
    assert done("localmoe_request_success_total") == 3
    assert (
        done("localmoe_request_success_total", finish_reason="stop")
        + done("localmoe_request_success_total", finish_reason="length")
        == 3
    )
    assert done("localmoe_inter_token_latency_seconds_count") > 0
    assert done("localmoe_batch_size_count") > 0
    assert worker1.value("localmoe_engine_info", engine="torch", device="cpu", worker=name) == 1

    def experts() -> bool:  # the engine's telemetry reaches the heartbeat within a second or two
        expert = scrape(exporter).labels("localmoe_expert_tokens_total")
        return {"code", "text"} <= {labels["modality"] for labels in expert}

    wait_for(experts, 10, "expert token counters of both modalities")
    sample = scrape(exporter).labels("localmoe_expert_tokens_total")[0]
    assert sample["worker"] == name and sample["layer"].isdigit() and sample["expert"].isdigit()


def test_every_exported_name_appears(served: tuple[Stack, str]) -> None:
    """metric_names lists what dashboards use; a rename on either side fails here."""
    stack, exporter = served
    port = free_port()
    env = {**stack.env, "LOCALMOE_METRICS__WEBHOOK_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "workers.webhooks"], env=env)
    webhooks = f"http://127.0.0.1:{port}/metrics"
    try:

        def exporting() -> bool:
            assert proc.poll() is None, f"webhook worker exited with {proc.returncode}"
            try:
                return httpx.get(webhooks, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(exporting, 30, "the webhook worker's exporter")
        # 127.0.0.2 is not on the allowlist (127.0.0.1): one attempt, refused
        app = make_celery(stack.env["LOCALMOE_REDIS_URL"])
        endpoint = register_endpoint(stack.client, "metrics-test", "http://127.0.0.2:9/hook")
        enqueue_delivery(app, endpoint, uuid.uuid4().hex, WebhookEventType.COMPLETED, {"status": "succeeded"})
        app.close()

        def refused() -> bool:
            return scrape(webhooks).value("localmoe_webhook_deliveries_total", outcome="refused") == 1

        wait_for(refused, 30, "a refused delivery counted")
        names = scrape(f"{stack.api}/metrics", stack.admin_key).names | scrape(exporter).names
        names |= scrape(webhooks).names
    finally:
        proc.terminate()
        proc.wait(20)
    assert set(metric_names.ALL) <= names, sorted(set(metric_names.ALL) - names)
    unlisted = {n for n in names if n.startswith("localmoe_")} - _exposed()
    assert not unlisted, f"exported, not in metric_names: {sorted(unlisted)}"


def _exposed() -> set[str]:
    """Every sample and family name metric_names' entries expose."""
    out = set(metric_names.ALL)
    for name in metric_names.ALL:
        if name.endswith("_total"):
            out.add(name.removesuffix("_total"))
        out |= {name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return out


def test_each_refusal_is_counted_with_its_reason(service_env: dict[str, str]) -> None:
    """No worker: admitted jobs stay queued, so every backlog limit can be reached."""
    limits = {"LOCALMOE_LIMITS__MAX_QUEUED_JOBS": "3", "LOCALMOE_LIMITS__MAX_QUEUED_TOKENS": "100"}
    with private_stack(service_env, worker=False, **limits) as stack, stack.http() as admin:
        slow = new_key(admin, rate_per_s=0.001, burst=1)
        one_job = new_key(admin, max_queued_jobs=1)
        few_tokens = new_key(admin, max_queued_tokens=20)

        def submit(key: str, max_tokens: int = 4, priority: str = "normal") -> int:
            body = {
                "prompt": "Hello there",
                "max_tokens": max_tokens,
                "modality": "text",
                "priority": priority,
            }
            with stack.http(key) as http:
                return http.post("/v1/jobs", json=body).status_code

        assert [submit(slow, priority="low"), submit(slow)] == [202, 429]  # rate_limit
        assert [submit(one_job), submit(one_job)] == [202, 429]  # key_backlog_jobs
        assert submit(stack.admin_key, max_tokens=200) == 429  # backlog_tokens
        assert submit(few_tokens, max_tokens=50) == 429  # key_backlog_tokens
        assert [submit(stack.admin_key, priority="high"), submit(stack.admin_key)] == [
            202,
            429,
        ]  # backlog_jobs
        metrics = scrape(f"{stack.api}/metrics", stack.admin_key)
    reasons = ("rate_limit", "backlog_jobs", "backlog_tokens", "key_backlog_jobs", "key_backlog_tokens")
    assert {r: metrics.value("localmoe_jobs_rejected_total", reason=r) for r in reasons} == dict.fromkeys(
        reasons, 1
    )
    assert metrics.value("localmoe_jobs_submitted_total", modality="text") == 3
    # three waiting jobs, one per priority list (`name`, `name:1`, `name:2`), summed per queue
    assert metrics.value("localmoe_queue_depth", queue=keys.SHARED_QUEUE) == 3
    assert metrics.value("localmoe_backlog_jobs") == 3
    assert metrics.value("localmoe_backlog_tokens") > 3 * 4
    assert metrics.value("localmoe_workers", state="ready") == 0
