"""The backlog: jobs admitted and not yet claimed by a worker, counted for backpressure.

Admission (the API) and release (a worker's claim, a cancel while queued, a failed enqueue) go
through Lua scripts, so counts move exactly once per job: a job enters QUEUED_JOBS once, and
only the script that removes it from there decrements the counters.

QUEUED_JOBS   hash  job id → "<tokens> <owner>"
QUEUED_COUNT  hash  "*" and owner id → jobs waiting
QUEUED_TOKENS hash  "*" and owner id → their tokens (prompt + max_tokens)
rate(owner)   string, the owner's GCRA theoretical arrival time (unix seconds), expires when idle
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from scheduler import keys

# A Lua function every script that takes a job off the queue starts with. KEYS of the caller:
# QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS at the positions it passes in.
RELEASE_LUA = """
local function release(jobs, count, tokens, id)
  local v = redis.call('HGET', jobs, id)
  if not v then return 0 end
  redis.call('HDEL', jobs, id)
  local n, owner = string.match(v, '^(%d+) (.*)$')
  n = tonumber(n)
  redis.call('HINCRBY', count, '*', -1)
  redis.call('HINCRBY', tokens, '*', -n)
  if owner ~= '' then
    redis.call('HINCRBY', count, owner, -1)
    redis.call('HINCRBY', tokens, owner, -n)
  end
  return 1
end
"""

RELEASE_KEYS = [keys.QUEUED_JOBS, keys.QUEUED_COUNT, keys.QUEUED_TOKENS]

# KEYS: QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS, rate(owner), then for a job of the batch tier
#       each fresh worker's running hash.
# ARGV: job id, tokens, owner, max jobs, max tokens, key max jobs, key max tokens, rate per second,
#       burst, and for a job of the batch tier the slots it may fill (-1: any other job).
# → {0} admitted | {1, retry-after ms} rate limited | {2..5, current value} over a backlog limit |
#   {6, jobs} no spare capacity: the jobs waiting and those the workers claimed (their engines'
#   running and waiting ones) fill the slots. Counted with the job's own admission, in one
#   script: jobs of the batch tier admitted at once by many API processes never overfill them.
# The rate limiter reads Redis's clock: scripts run one at a time, so its `now` only moves forward.
# A caller's clock read before the call can be late by the time the script runs (a busy API:
# measured > 1 s), behind another caller's: GCRA then saw a burst that never happened and refused.
ADMIT = """
local n = tonumber(ARGV[2])
local owner = ARGV[3]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local interval = 1 / tonumber(ARGV[8])
local tolerance = tonumber(ARGV[9]) * interval
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {1, math.ceil((new_tat - now - tolerance) * 1000)}
end
local all_jobs = tonumber(redis.call('HGET', KEYS[2], '*') or '0')
local all_tokens = tonumber(redis.call('HGET', KEYS[3], '*') or '0')
local key_jobs = tonumber(redis.call('HGET', KEYS[2], owner) or '0')
local key_tokens = tonumber(redis.call('HGET', KEYS[3], owner) or '0')
if all_jobs + 1 > tonumber(ARGV[4]) then return {2, all_jobs} end
if all_tokens + n > tonumber(ARGV[5]) then return {3, all_tokens} end
if key_jobs + 1 > tonumber(ARGV[6]) then return {4, key_jobs} end
if key_tokens + n > tonumber(ARGV[7]) then return {5, key_tokens} end
local slots = tonumber(ARGV[10])
if slots >= 0 then
  local busy = all_jobs
  for i = 5, #KEYS do busy = busy + redis.call('HLEN', KEYS[i]) end
  if busy + 1 > slots then return {6, busy} end
end
redis.call('SET', KEYS[4], string.format('%.6f', new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. owner)
redis.call('HINCRBY', KEYS[2], '*', 1)
redis.call('HINCRBY', KEYS[3], '*', n)
redis.call('HINCRBY', KEYS[2], owner, 1)
redis.call('HINCRBY', KEYS[3], owner, n)
return {0}
"""

# KEYS: QUEUED_JOBS, QUEUED_COUNT, QUEUED_TOKENS. ARGV: job id. → 1 if it was in the backlog.
RELEASE = RELEASE_LUA + "return release(KEYS[1], KEYS[2], KEYS[3], ARGV[1])"


class Verdict(IntEnum):
    ADMITTED = 0
    RATE_LIMITED = 1
    TOO_MANY_JOBS = 2
    TOO_MANY_TOKENS = 3
    KEY_TOO_MANY_JOBS = 4
    KEY_TOO_MANY_TOKENS = 5
    NO_SPARE = 6  # a job of the batch tier: the workers have no spare capacity


@dataclass(frozen=True)
class Limits:
    """The ceilings one admission is checked against (the server's, with the key's overrides)."""

    max_jobs: int
    max_tokens: int
    key_max_jobs: int
    key_max_tokens: int
    rate_per_s: float
    burst: int

    def argv(self) -> list[str | int | float]:
        return [
            self.max_jobs,
            self.max_tokens,
            self.key_max_jobs,
            self.key_max_tokens,
            self.rate_per_s,
            self.burst,
        ]
