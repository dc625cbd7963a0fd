"""The spine, end to end through real processes: API (uvicorn) → Redis → Celery worker → engine
→ Redis stream → SSE / websocket. No mocks on this path."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from websockets.sync.client import connect

from scheduler import keys
from tests.conftest import wait_done, wait_for

PROMPT = "def fibonacci(n):\n"


def submit(http: httpx.Client, **body: object) -> dict:  # type: ignore[type-arg]
    r = http.post("/v1/jobs", json={"prompt": PROMPT, **body})
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def sse_events(
    http: httpx.Client, job_id: str, last_event_id: str | None = None, limit: int | None = None
) -> list[tuple[str, str, dict]]:  # type: ignore[type-arg]
    """(id, event, data) triples from the SSE endpoint; stops after `limit` events (a disconnect)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out: list[tuple[str, str, dict]] = []  # type: ignore[type-arg]
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        ev: dict[str, str] = {}
        for line in r.iter_lines():
            if line == "":
                if "data" in ev:
                    out.append((ev["id"], ev["event"], json.loads(ev["data"])))
                    if limit is not None and len(out) >= limit:
                        return out
                ev = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(":")
                ev[key] = value.removeprefix(" ")
    return out


def test_submit_poll_result(http: httpx.Client, worker: str, rclient: redis.Redis) -> None:
    created = submit(http, max_tokens=24)
    assert created["status"] == "queued"
    assert created["links"]["events"] == f"/v1/jobs/{created['id']}/events"
    job = wait_done(http, created["id"])
    assert job["status"] == "succeeded"
    assert job["finish_reason"] in ("stop", "length")
    assert job["usage"]["prompt_tokens"] > 0
    assert 0 < job["usage"]["completion_tokens"] <= 24
    assert job["worker"] == worker and job["engine"] == "torch"
    assert job["modality"] == "code" and job["language"] == "python"
    t = job["timings"]
    assert t["queued_at"] <= t["started_at"] <= t["first_token_at"] <= t["finished_at"]
    assert job["attempt"] == 1
    # routed onto the worker's own queue, with the reason; its cost left the worker's backlog
    assert job["queue"] == keys.worker_queue(worker)
    assert job["route_reason"].startswith(f"{worker}: earliest expected completion")
    assert job["cost"] == 24 + 0.0625 * job["usage"]["prompt_tokens"]
    assert rclient.hlen(keys.queued(worker)) == 0


def test_a_stated_modality_skips_detection(http: httpx.Client) -> None:
    created = submit(http, max_tokens=2, modality="text")  # PROMPT is Python code
    assert created["modality"] == "text" and created["language"] is None
    assert wait_done(http, created["id"])["status"] == "succeeded"


def test_greedy_output_equals_transformers_generate(http: httpx.Client, model_dir: Path) -> None:
    job = wait_done(http, submit(http, max_tokens=32)["id"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    assert job["output"] == tok.decode(out)
    assert job["usage"]["completion_tokens"] == len(out) + (job["finish_reason"] == "stop")  # EOS counts


def test_sse_and_websocket_streams_concatenate_to_the_output(http: httpx.Client, api_url: str) -> None:
    job_id = submit(http, max_tokens=40, temperature=0.8, seed=7)["id"]
    sse = sse_events(http, job_id)  # connected while the job runs: live relay
    ws_url = api_url.replace("http://", "ws://") + f"/v1/jobs/{job_id}/stream"
    with connect(ws_url, additional_headers={"Authorization": http.headers["authorization"]}) as ws:
        messages = [json.loads(m) for m in ws]
    job = wait_done(http, job_id)
    assert sse[-1][1] == "done" and sse[-1][2]["status"] == "succeeded"
    assert "".join(d["text"] for _, e, d in sse if e == "token") == job["output"]
    assert messages[-1]["type"] == "done"
    assert "".join(m["text"] for m in messages if m["type"] == "token") == job["output"]
    assert [m["id"] for m in messages] == [i for i, _, _ in sse]  # one stream, one set of ids


def test_logprobs_reach_polling_sse_and_websocket(http: httpx.Client, api_url: str, model_dir: Path) -> None:
    """A job that asks for logprobs: every generated token's, on the job record and in its events
    (SSE and websocket: the same per-event pieces), in order; a job that does not ask gets none."""
    job_id = submit(http, max_tokens=12, logprobs=2, ignore_eos=True)["id"]
    job = wait_done(http, job_id)
    assert len(job["logprobs"]) == job["usage"]["completion_tokens"] == 12
    assert all(lp <= 0 and len(top) == 2 for _, lp, top in job["logprobs"])
    sse = [d for _, e, d in sse_events(http, job_id) if e == "token"]
    assert [x for d in sse for x in d["logprobs"]] == job["logprobs"]
    ws_url = api_url.replace("http://", "ws://") + f"/v1/jobs/{job_id}/stream"
    with connect(ws_url, additional_headers={"Authorization": http.headers["authorization"]}) as ws:
        messages = [json.loads(m) for m in ws]
    assert [x for m in messages if m["type"] == "token" for x in m["logprobs"]] == job["logprobs"]
    # EOS makes no text: its logprob still reaches readers, in an entry of its own at the end
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    ended = wait_done(
        http, submit(http, max_tokens=8, logprobs=0, logit_bias={str(eos): 100}, min_tokens=3)["id"]
    )
    assert [t for t, _, _ in ended["logprobs"]][-1] == eos and len(ended["logprobs"]) == 4
    assert [x for _, e, d in sse_events(http, ended["id"]) if e == "token" for x in d["logprobs"]] == ended[
        "logprobs"
    ]
    plain = wait_done(http, submit(http, max_tokens=4)["id"])
    assert plain["logprobs"] is None
    assert all("logprobs" not in d for _, e, d in sse_events(http, plain["id"]) if e == "token")


def test_32_concurrent_jobs_complete_in_one_batch(http: httpx.Client, api_url: str) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def post(i: int) -> None:
        with httpx.Client(base_url=api_url, timeout=60, headers=http.headers) as c:
            r = c.post("/v1/jobs", json={"prompt": f"{PROMPT}    # variant {i}\n", "max_tokens": 48})
            assert r.status_code == 202
            with lock:
                ids.append(r.json()["id"])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    jobs = [wait_done(http, i) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    # Batched, not serialized: some moment had many jobs generating at once...
    spans = [(j["timings"]["started_at"], j["timings"]["finished_at"]) for j in jobs]
    peak = max(sum(s <= t < f for s, f in spans) for t, _ in spans)
    assert peak >= 8, f"at most {peak} jobs overlapped"
    # ...and the engine itself decoded more than one job per forward pass.
    last = max(f for _, f in spans)
    wait_for(lambda: all(w["heartbeat_at"] > last for w in http.get("/v1/workers").json()), 5, "a heartbeat")
    workers = http.get("/v1/workers").json()
    assert max(w["max_batch_seen"] for w in workers) > 1


def test_cancel_running_job_stops_within_a_step(http: httpx.Client, api_url: str) -> None:
    job_id = submit(http, max_tokens=1000, temperature=1.0, seed=1)["id"]
    first = sse_events(http, job_id, limit=3)  # it is generating
    assert len(first) == 3
    r = http.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 202
    asked = time.monotonic()
    job = wait_done(http, job_id, timeout=10)
    assert time.monotonic() - asked < 2.0
    assert job["status"] == "cancelled" and job["finish_reason"] == "abort"
    assert job["usage"]["completion_tokens"] < 1000
    events = sse_events(http, job_id)
    assert events[-1][1] == "done" and events[-1][2]["status"] == "cancelled"
    assert "".join(d["text"] for _, e, d in events if e == "token") == job["output"]

    def slot_freed() -> bool:
        return all(w["running"] == 0 for w in http.get("/v1/workers").json())

    wait_for(slot_freed, 5, "the batch slot to be freed")
    assert http.delete(f"/v1/jobs/{job_id}").status_code == 200  # finished: unchanged


def test_stream_replay_after_disconnect(http: httpx.Client, api_url: str) -> None:
    job_id = submit(http, max_tokens=48, temperature=0.9, seed=3)["id"]
    head = sse_events(http, job_id, limit=4)  # the client goes away after 4 events
    rest = sse_events(http, job_id, last_event_id=head[-1][0])
    job = wait_done(http, job_id)
    assert rest[-1][1] == "done"
    ids = [i for i, _, _ in head + rest]
    assert len(ids) == len(set(ids))  # no event twice
    assert "".join(d["text"] for _, e, d in head + rest if e == "token") == job["output"]
    assert sse_events(http, job_id) == sse_events(http, job_id, last_event_id="0-0")
    ws_url = api_url.replace("http://", "ws://") + f"/v1/jobs/{job_id}/stream?after={head[1][0]}"
    with connect(ws_url, additional_headers={"Authorization": http.headers["authorization"]}) as ws:
        replay = [json.loads(m) for m in ws]
    assert [m["id"] for m in replay] == ids[2:]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n "}, "empty"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 5000}, "limit"),
        ({"prompt": "word " * 3000}, "context"),
        ({"prompt": "hi", "max_tokens": 1000, "extra": 1}, "extra"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "modality": "video"}, "modality"),
        ({"prompt": 42}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_bad_input_is_422_with_a_reason(http: httpx.Client, body: dict, needle: str) -> None:  # type: ignore[type-arg]
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert needle.lower() in r.text.lower()


def test_invalid_utf8_and_malformed_json_are_4xx(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    bad_utf8 = http.post("/v1/jobs", content=b'{"prompt": "caf\xe9"}', headers=headers)
    assert bad_utf8.status_code == 422, bad_utf8.text
    assert "utf-8" in bad_utf8.text.lower()
    lone_surrogate = http.post("/v1/jobs", content=b'{"prompt": "x\\ud800y"}', headers=headers)
    assert lone_surrogate.status_code == 422, lone_surrogate.text
    assert "unicode" in lone_surrogate.text.lower()
    assert http.post("/v1/jobs", content=b'{"prompt": ', headers=headers).status_code == 422


def test_unknown_job_is_404(http: httpx.Client, api_url: str) -> None:
    for path in ("/v1/jobs/" + "0" * 32, "/v1/jobs/not-a-job", "/v1/jobs/" + "0" * 32 + "/events"):
        r = http.get(path)
        assert r.status_code == 404, path
        assert "no job" in r.text
    assert http.delete("/v1/jobs/" + "a" * 32).status_code == 404


def test_bad_last_event_id_is_422(http: httpx.Client) -> None:
    job_id = submit(http, max_tokens=2)["id"]
    r = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "drop table"})
    assert r.status_code == 422


def test_health_ready_and_workers(http: httpx.Client, worker: str) -> None:
    assert http.get("/healthz").json()["status"] == "ok"
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}  # a probe says no more
    (info,) = [w for w in http.get("/v1/workers").json() if w["name"] == worker]
    assert info["ready"] and info["engine"] == "torch" and info["device"] == "cpu"
    assert info["engine_reason"] == "no GPU (cpu): PyTorch" and (info["offload"], info["cpu_offload_gb"]) == (
        "none",
        0,
    )
    assert info["capacity"] == 64 and info["max_context"] == 2048
    # Expert telemetry: a code job's routed tokens are counted in each layer, and the count
    # reaches the registry with a later heartbeat (counts are read once a second).
    wait_done(http, submit(http, max_tokens=4)["id"])

    def counted_and_idle() -> (
        bool
    ):  # a heartbeat taken after the job: one taken during it counts it in flight
        (w,) = [w for w in http.get("/v1/workers").json() if w["name"] == worker]
        return bool(w["expert_tokens"].get("code")) and w["tokens_in_flight"] == 0 == w["batch_occupancy"]

    wait_for(counted_and_idle, 5, "code tokens in the expert telemetry, nothing in flight")
    (info,) = [w for w in http.get("/v1/workers").json() if w["name"] == worker]
    code = info["expert_tokens"]["code"]
    assert len(code) == 4 and all(len(layer) == 8 for layer in code)
    assert len({sum(layer) for layer in code}) == 1 and sum(code[0]) > 0
    # the embedded Mixtral routes top-2 and has no shared experts: none counted apart
    assert info["experts_per_token"] == 2 and info["shared_experts"] == 0
    assert info["shared_expert_tokens"] == {}
    # what the router plans with: speed measured while busy, the expert-load profile by modality,
    # nothing in flight when idle, no GPU telemetry on a CPU worker
    assert info["step_rate"] > 0 and info["busy_tokens_per_s"] > 0
    assert info["peak_cost_per_s"] > 0  # the work rate the router drains its work ahead at
    assert info["modality_mix"].get("code", 0) > 0 and abs(sum(info["modality_mix"].values()) - 1) < 1e-6
    assert info["tokens_in_flight"] == 0 == info["cost_in_flight"] and info["batch_occupancy"] == 0
    assert info["gpus"] == []
    assert info["kv_usage"] is None  # the torch engine manages no paged KV cache
