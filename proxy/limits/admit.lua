-- The limits' admit script: a batch of admits checked and counted in order, atomically.
-- Layout of KEYS and ARGV, and the answers: proxy/limits/script.py, which
-- also writes the replay time (in seconds) into the SET below when it loads the script.
-- A batch runs once: redis-py sends a command again when its connection breaks, and the
-- reply of a batch Redis ran may be what was lost. The second time, the first answers.
local done = redis.call('GET', KEYS[1])
if done then return cjson.decode(done) end
local A = {}
for value in string.gmatch(ARGV[1], '[^\31]+') do A[#A + 1] = value end
local ncalls, nr, nn = tonumber(A[1]), tonumber(A[2]), tonumber(A[3])
local ttl, concurrent = tonumber(A[4]), tonumber(A[5])
local max_fields, other, once_ttl = tonumber(A[6]), A[7], tonumber(A[8])

local function bump(key, field, amount, expire_at)
  if redis.call('HEXISTS', key, field) == 0 and redis.call('HLEN', key) >= max_fields then
    field = string.sub(field, 1, 2) .. other
  end
  if string.sub(field, 1, 2) == 'u:' then  -- units are decimal; generations and spend whole
    redis.call('HINCRBYFLOAT', key, field, amount)
  else
    redis.call('HINCRBY', key, field, amount)
  end
  redis.call('EXPIREAT', key, expire_at)
end

-- What earlier calls owe: a slot given back here is free for this batch.
-- Each in pcall: one Redis refuses (a key of another type) must not hold up the rest.
local k, a = 2, 9
for i = 0, nr - 1 do redis.pcall('ZREM', KEYS[k + i], A[a + i]) end
k, a = k + nr, a + nr
-- Units, spend and budget settlements: (usage, once, budget * m) and
-- (app, units, micros, expire_at, m, (delta, budget expire_at) * m).
for i = 1, nn do
  local m = tonumber(A[a + 4])
  -- Units of one fal request count once, whichever replica saw its result first.
  local once = KEYS[k + 1]
  if once == '-' or redis.pcall('SET', once, '1', 'NX', 'EX', once_ttl) then
    if tonumber(A[a + 1]) > 0 then pcall(bump, KEYS[k], 'u:' .. A[a], A[a + 1], A[a + 3]) end
    if tonumber(A[a + 2]) > 0 then pcall(bump, KEYS[k], 's:' .. A[a], A[a + 2], A[a + 3]) end
    for j = 1, m do
      -- The period the estimate was counted in, still current (the replica sends no other);
      -- never below nothing, as in memory.
      local key, delta = KEYS[k + 1 + j], tonumber(A[a + 3 + 2 * j])
      local used = tonumber(redis.call('GET', key) or '0') or 0
      redis.pcall('INCRBY', key, math.max(delta, -used))
      redis.pcall('EXPIREAT', key, A[a + 4 + 2 * j])
    end
  end
  k, a = k + 2 + m, a + 5 + 2 * m
end

-- One admit: its leases key at KEYS[k], its arguments from A[a].
local function admit(k, a, nw, nq, nu)
  local now, lease_id = tonumber(A[a]), A[a + 1]
  local kw, aw = k + 1, a + 5
  local kq, aq = kw + 2 * nw, aw + 2 * nw
  local ku, au = kq + nq, aq + 3 * nq
  -- Blocked by the operator (the admin API): refused first, on every replica at once.
  if redis.call('EXISTS', KEYS[ku + 2 * nu]) == 1 then return {5} end
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
  -- Admitted: {0, used * nq}, what each quota holds once this call is counted.
  local answer = {0}
  for i = 0, nq - 1 do
    -- A quota counts 1; a budget its call's estimate, and has room when nothing of it
    -- is spent up and the estimate fits (proxy/limits/spend.py).
    local used = tonumber(redis.call('GET', KEYS[kq + i]) or '0')
    local limit, amount = tonumber(A[aq + 3 * i]), tonumber(A[aq + 3 * i + 2])
    if used >= limit or used + amount > limit then return {2, i, used} end
    answer[i + 2] = used
  end
  if concurrent > 0 and lease_id ~= '-' then  -- '-': a generation counted without a slot
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
    local amount = tonumber(A[aq + 3 * i + 2])
    if amount > 0 then
      local used = redis.call('INCRBY', KEYS[kq + i], amount)
      if used == amount then redis.call('EXPIREAT', KEYS[kq + i], A[aq + 3 * i + 1]) end
      answer[i + 2] = used
    end
  end
  for i = 0, nu - 1 do
    local usage, expire_at = KEYS[ku + 2 * i], A[au + 3 * i + 1]
    if redis.call('EXISTS', usage) == 0 then
      -- The caller's first usage this month: its id, by digest, for the admin listing.
      redis.call('HSET', KEYS[ku + 2 * i + 1], string.sub(usage, -32), A[au + 3 * i + 2])
      redis.call('EXPIREAT', KEYS[ku + 2 * i + 1], expire_at)
    end
    bump(usage, A[au + 3 * i], 1, expire_at)
  end
  return answer
end

local answers = {}
for c = 1, ncalls do
  local nw, nq, nu = tonumber(A[a + 2]), tonumber(A[a + 3]), tonumber(A[a + 4])
  -- An error (a key of another type) fails this call only, as if it had been alone.
  local ok, answer = pcall(admit, k, a, nw, nq, nu)
  answers[c] = ok and answer or {4}
  k = k + 2 + 2 * nw + nq + 2 * nu
  a = a + 5 + 2 * nw + 3 * nq + 3 * nu
end
redis.call('SET', KEYS[1], cjson.encode(answers), 'EX', REPLAY_TTL)
return answers
