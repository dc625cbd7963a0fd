"""What listing a relay batch in the feed costs Redis, per token, three ways in one run.

Each variant is one Lua script call per batch of `--batch` token entries (one per job stream), as
the relay writes them, `--batches` times, on a Redis of its own; Redis's own accounting
(`INFO commandstats`, reset before each variant) gives the µs per token:

* xadd:  the token entries alone, no feed (the baseline);
* cjson: FEED_LUA's `append` per entry (a Lua table per record, cjson-encoded), then `publish`;
* relay: what workers/relay.py does: XADD, then `stage` with the record's JSON built in Python
  (scheduler/stream.py feed_record_json), then `publish`.

    python -m bench.feed_cost [--batches 200] [--batch 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import redis

from localmoe.redis_server import RedisServer
from scheduler import keys
from scheduler.stream import FEED_KEYS, FEED_LUA, feed_record_json, token_fields

# KEYS: the batch's streams, then FEED_KEYS. ARGV: text, then per entry its head and tail.
VARIANTS = {
    "xadd": """
for i = 1, #KEYS - 2 do
  redis.call('XADD', KEYS[i], '*', 'type', 'token', 'text', ARGV[1], 'n', '1', 'a', '1', 's', '1')
end
""",
    "cjson": FEED_LUA
    + """
for i = 1, #KEYS - 2 do
  append(KEYS[i], {'type', 'token', 'text', ARGV[1], 'n', '1', 'a', '1', 's', '1'})
end
publish()
""",
    "relay": FEED_LUA
    + """
for i = 1, #KEYS - 2 do
  local id = redis.call('XADD', KEYS[i], '*', 'type', 'token', 'text', ARGV[1], 'n', '1', 'a', '1', 's', '1')
  stage(ARGV[2 * i], id, ARGV[2 * i + 1])
end
publish()
""",
}


def measure(client: redis.Redis, lua: str, batches: int, batch: int) -> float:
    """Redis µs per token entry for `batches` calls of `lua` over `batch` fresh streams."""
    script = client.register_script(lua)
    streams = [keys.events(f"feed-cost-{i:06d}") for i in range(batch)]
    args: list[str] = [" hello"]
    for stream in streams:
        args += feed_record_json(stream, token_fields(" hello", 1, 1, 1))
    client.delete(*streams, *FEED_KEYS)
    client.config_resetstat()
    for _ in range(batches):
        script(keys=[*streams, *FEED_KEYS], args=args)
    usec = client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0)
    client.delete(*streams, *FEED_KEYS)
    return float(usec) / (batches * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256, help="token entries per call (jobs in a relay batch)")
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="localmoe-feed-cost-"))
    with RedisServer(tmp / "redis") as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        result: dict[str, float] = {}
        for i, (name, lua) in enumerate(VARIANTS.items(), 1):
            print(f"[{i}/{len(VARIANTS)}] {name}: {args.batches} calls × {args.batch} entries", flush=True)
            result[name] = measure(client, lua, args.batches, args.batch)
        client.close()
    base = result["xadd"]
    for name, us in result.items():
        print(f"  {name:6s} {us:6.2f} µs per token ({us - base:+.2f} against xadd)")
    if args.out:
        Path(args.out).write_text(json.dumps({"batch": args.batch, "us_per_token": result}, indent=2))


if __name__ == "__main__":
    main()
