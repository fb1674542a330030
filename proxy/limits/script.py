"""The Lua script of :class:`~proxy.limits.redis_backend.RedisLimiter`: a batch of admits in one call.

One call of :data:`ADMIT` applies what the replica owes Redis (lease releases, billable
units), then checks and counts each admit of the batch in order, exactly as
:class:`~proxy.limits.memory.MemoryLimiter` would one after the other: the windows, every
matching quota, a concurrency lease, and only if all have room the counts and usage.
Redis runs a script atomically, so the batch is as if its calls had come one by one.

Why a batch: one ``EVALSHA`` costs the proxy ~100 µs of redis-py and event-loop work and
redis-server a read and a reply, whatever the script does; the admits that one turn of
the event loop produces share them (under load, most turns carry several).

Layout. Every argument comes in ``ARGV[1]``, joined by ``\\x1f`` (:func:`joined`): redis-py
packs each argument of a command in Python, and one string instead of ~30 saved ~10 % of
a call's client CPU. None may be empty or hold the separator.

* Arguments: ``ncalls, nr, nn, lease_ttl, concurrent, max_fields, other``, then
  ``lease_id * nr`` and ``(field, amount, expire_at) * nn`` (what is owed), then per call
  ``now, lease_id, nw, nq, nu, (limit, period) * nw, (limit, expire_at) * nq,
  (field, expire_at) * nu``.
* KEYS: the batch's own key (its answers, kept ``REPLAY_TTL`` seconds), ``leases * nr,
  usage * nn`` (what is owed), then per call ``leases, (window current, window previous)
  * nw, quota * nq, usage * nu``.
* Returns one answer per call: ``{0}`` admitted, ``{1, i, previous, current}`` window
  ``i`` full, ``{2, i}`` quota ``i`` used up, ``{3}`` no concurrency slot, ``{4}`` Redis
  refused one of the call's commands (its key holds another type).

Run twice (redis-py resends a command once when its connection breaks, and what broke may
have been the reply), a batch answers the second time with the first time's answers,
kept under its key, and counts nothing again.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = "\x1f"
REPLAY_TTL = 10  # s a batch's answers are kept: redis-py resends at once, within its timeout


ADMIT = """
-- A batch runs once: redis-py sends a command again when its connection breaks, and the
-- reply of a batch Redis ran may be what was lost. The second time, the first answers.
local done = redis.call('GET', KEYS[1])
if done then return cjson.decode(done) end
local A = {}
for value in string.gmatch(ARGV[1], '[^\\31]+') do A[#A + 1] = value end
local ncalls, nr, nn = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
local ttl, concurrent = tonumber(A[4]), tonumber(A[5])
local max_fields, other = tonumber(A[6]), A[7]

local function bump(key, field, amount, expire_at)
  if redis.call('HEXISTS', key, field) == 0 and redis.call('HLEN', key) >= max_fields then
    field = string.sub(field, 1, 2) .. other
  end
  if string.sub(field, 1, 2) == 'u:' then
    redis.call('HINCRBYFLOAT', key, field, amount)
  else
    redis.call('HINCRBY', key, field, amount)
  end
  redis.call('EXPIREAT', key, expire_at)
end

-- What earlier calls owe: a slot given back here is free for this batch.
-- Each in pcall: one Redis refuses (a key of another type) must not hold up the rest.
local k, a = 2, 8
for i = 0, nr - 1 do redis.pcall('ZREM', KEYS[k + i], A[a + i]) end
k, a = k + nr, a + nr
for i = 0, nn - 1 do pcall(bump, KEYS[k + i], A[a + 3 * i], A[a + 3 * i + 1], A[a + 3 * i + 2]) end
k, a = k + nn, a + 3 * nn

-- One admit: its leases key at KEYS[k], its arguments from A[a].
local function admit(k, a, nw, nq, nu)
  local now, lease_id = tonumber(A[a]), A[a + 1]
  local kw, aw = k + 1, a + 5
  local kq, aq = kw + 2 * nw, aw + 2 * nw
  local ku, au = kq + nq, aq + 2 * nq
  for i = 0, nw - 1 do
    local limit, period = tonumber(A[aw + 2 * i]), tonumber(A[aw + 2 * i + 1])
    local current = tonumber(redis.call('GET', KEYS[kw + 2 * i]) or '0')
    local previous = tonumber(redis.call('GET', KEYS[kw + 2 * i + 1]) or '0')
    local left = 0
    if previous > 0 then
      local x = (now - period) / period
      left = (1 - (x - math.floor(x))) * period
    end
    if math.floor(previous * left / period + current) + 1 > limit then
      return {1, i, previous, current}
    end
  end
  for i = 0, nq - 1 do
    if tonumber(redis.call('GET', KEYS[kq + i]) or '0') >= tonumber(A[aq + 2 * i]) then
      return {2, i}
    end
  end
  if concurrent > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
    if redis.call('ZCARD', KEYS[k]) >= concurrent then return {3} end
    redis.call('ZADD', KEYS[k], now + ttl, lease_id)
    redis.call('EXPIRE', KEYS[k], math.ceil(ttl) + 1)
  end
  for i = 0, nw - 1 do
    if redis.call('INCR', KEYS[kw + 2 * i]) == 1 then
      redis.call('EXPIRE', KEYS[kw + 2 * i], 2 * tonumber(A[aw + 2 * i + 1]))
    end
  end
  for i = 0, nq - 1 do
    if redis.call('INCR', KEYS[kq + i]) == 1 then
      redis.call('EXPIREAT', KEYS[kq + i], A[aq + 2 * i + 1])
    end
  end
  for i = 0, nu - 1 do bump(KEYS[ku + i], A[au + 2 * i], 1, A[au + 2 * i + 1]) end
  return {0}
end

local answers = {}
for c = 1, ncalls do
  local nw, nq, nu = tonumber(A[a + 2]), tonumber(A[a + 3]), tonumber(A[a + 4])
  -- An error (a key of another type) fails this call only, as if it had been alone.
  local ok, answer = pcall(admit, k, a, nw, nq, nu)
  answers[c] = ok and answer or {4}
  k = k + 1 + 2 * nw + nq + nu
  a = a + 5 + 2 * nw + 2 * nq + 2 * nu
end
redis.call('SET', KEYS[1], cjson.encode(answers), 'EX', REPLAY_TTL)
return answers
""".replace("REPLAY_TTL", str(REPLAY_TTL))


def joined(args: list[Any]) -> str:
    """The script's arguments as its one ``ARGV`` string (see the module doc)."""
    return SEPARATOR.join(map(str, args))
