-- acquire.lua: one tenant's rate-limit decision, atomically.
--
-- Refills the token bucket from the server clock (TIME, the clock of record), then consumes
-- `cost` from the bucket, from the UTC day's counter and (optionally) from the rolling window
-- only if all of them have room: all or nothing. A rejection consumes nothing: it leaves the
-- bucket and the day's counter as they were (it may still seed a missing counter, drop
-- window entries that have expired and push out the bucket's expiry, which changes no limit).
--
-- KEYS[1] rl:{t}:tb             hash  tokens (float, %.17g), ts (server time, microseconds),
--                                     xe (when the key expires, server time, microseconds)
-- KEYS[2] rl:{t}:day:YYYYMMDD   int   units used on that UTC day
-- KEYS[3] rl:{t}:win            zset  rolling-window log: member "<seq>:<cost>", score = ts (us)
-- KEYS[4] rl:{t}:win:meta       hash  sum (units in the log), seq (last member number)
--         (KEYS[3] and KEYS[4] are given, and read, only for a quota with a window)
-- ARGV: cost, rate_per_sec, burst, daily_limit, window_limit (0 = none), window_seconds,
--       seed ("" = none given), day_grace_seconds
--
-- The day in KEYS[2] must be the server's UTC day; otherwise nothing is counted and the
-- script answers WRONG_DAY with the server's day, so a client with a skewed clock never
-- counts into the wrong day. A missing day counter is seeded with ARGV[7]; with no seed given
-- the script answers NEED_SEED and changes nothing. An existing counter below a seed given is
-- raised to it (the first decision of a tenant after the server changed: see limiter/core.py).
--
-- Reply: {status, reason, tokens, retry_ms, daily_used, window_used, server_day, now_s}
--   tokens: the whole tokens left (floored; a double holds them exactly up to 2^53, where
--   milli-tokens lost the last one from a burst of ~9e12 on)
--   status 1 allowed, 0 rejected, -1 WRONG_DAY, -2 NEED_SEED
--   reason 0 ok, 1 bucket, 2 daily, 3 window, 4 cost exceeds burst, 5 cost exceeds window,
--   6 cost exceeds the daily limit;
--          for WRONG_DAY: the day the key names (days since 1970-01-01)
--   server_day: days since 1970-01-01 (UTC) by the server clock

-- Cost notes (Redis runs every decision; benchmarks/bench_script_cost.py counts the instructions
-- Redis executes per call: ~119k for an allowed decision before these, ~108k after): each
-- tonumber() of a string is a strtod (~1.6k instructions), a string.sub makes and interns a
-- string, and math.floor is two table lookups and a call. So the arguments needed only on some
-- paths (window, seed, grace) are read there, the key's date is one tonumber, and integer
-- divisions use `%` (Lua's % is a floored modulo, so (x - x % n) / n == floor(x / n) exactly for
-- integers). A number given to redis.call is written with %.17g by Redis itself (the shortest
-- round-trip form from 7.2 on), so the bucket's float needs no string.format to stay exact.
local cost = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local daily_limit = tonumber(ARGV[4])
local window_limit = tonumber(ARGV[5])
local window_us = 0
if window_limit > 0 then window_us = tonumber(ARGV[6]) * 1000000 end

local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now = now_s * 1000000 + tonumber(t[2])
local server_day = (now_s - now_s % 86400) / 86400

-- The day the key names, from its YYYYMMDD suffix (days_from_civil, proleptic Gregorian).
local ymd = tonumber(string.sub(KEYS[2], -8))
local d = ymd % 100
local m = ((ymd - d) / 100) % 100
local y = (ymd - ymd % 10000) / 10000
if m <= 2 then y = y - 1 end
local yoe = y % 400
local era = (y - yoe) / 400
local mp = (m > 2) and (m - 3) or (m + 9)
local doy = (153 * mp + 2 - (153 * mp + 2) % 5) / 5 + d - 1
local doe = yoe * 365 + (yoe - yoe % 4) / 4 - (yoe - yoe % 100) / 100 + doy
local key_day = era * 146097 + doe - 719468
if key_day ~= server_day then
  return {-1, key_day, 0, 0, 0, 0, server_day, now_s}
end

-- Daily counter (seeded when missing, expiring after the day is over plus grace).
local used = redis.call('GET', KEYS[2])
if not used then
  local seed = ARGV[7]
  if seed == '' then
    return {-2, 0, 0, 0, 0, 0, server_day, now_s}
  end
  used = tonumber(seed)
  redis.call('SET', KEYS[2], used, 'EXAT', (server_day + 1) * 86400 + tonumber(ARGV[8]))
else
  if not string.match(used, '^%-?%d+$') then
    -- Something else wrote here: refused before any write (the client decides by its fail
    -- mode and logs it), not an error at INCRBY after the bucket was taken from. Only what
    -- INCRBY takes passes (tonumber would take '5.0', ' 5', '1e2', '0x10').
    return redis.error_reply('limiter: ' .. KEYS[2] .. ' holds no whole count')
  end
  used = tonumber(used)
  -- A seed given for a counter that exists: the client found the server changed (restarted,
  -- restored, failed over): a counter from an older snapshot than the quota DB's backfill is
  -- raised to it (the usage it already counted), never lowered. "0" and "" change nothing.
  local seed = ARGV[7]
  if seed ~= '' and seed ~= '0' then
    seed = tonumber(seed)
    if seed > used then
      used = seed
      redis.call('SET', KEYS[2], used, 'KEEPTTL')
    end
  end
end

-- Token bucket, refilled by elapsed server time, capped at burst.
local tb = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'xe')
local tokens = tonumber(tb[1])
local ts = tonumber(tb[2])
if tokens == nil or ts == nil then
  tokens = burst
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
end

-- Rolling window: drop entries older than the window, subtracting their cost from the sum.
local win_used = 0
if window_limit > 0 then
  local horizon = now - window_us
  win_used = tonumber(redis.call('HGET', KEYS[4], 'sum') or '0')
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', horizon)
  if #expired > 0 then
    for i = 1, #expired do
      local member = expired[i]
      win_used = win_used - tonumber(string.sub(member, string.find(member, ':', 1, true) + 1))
    end
    if win_used < 0 then win_used = 0 end
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', horizon)
    redis.call('HSET', KEYS[4], 'sum', win_used)
  end
end

-- Decide: every limit must have room for the whole cost.
local reason = 0
local retry_us = 0
if used + cost > daily_limit then
  if cost > daily_limit then
    reason = 6  -- no day can take it: no wait
  else
    reason = 2
    retry_us = ((server_day + 1) * 86400) * 1000000 - now
  end
end
if window_limit > 0 and win_used + cost > window_limit then
  if cost > window_limit then
    if reason == 0 then reason = 5 end
  else
    -- Wait until enough of the oldest entries have left the window (read oldest first, a few
    -- at a time: usually the first one frees enough, and a full log is never read whole).
    local need = win_used + cost - window_limit
    local freed = 0
    local wait = window_us
    local first = 0
    local found = false
    while not found do
      local entries = redis.call('ZRANGE', KEYS[3], first, first + 31, 'WITHSCORES')
      if #entries == 0 then break end
      for i = 1, #entries, 2 do
        local member = entries[i]
        freed = freed + tonumber(string.sub(member, string.find(member, ':', 1, true) + 1))
        if freed >= need then
          wait = tonumber(entries[i + 1]) + window_us - now
          found = true
          break
        end
      end
      first = first + 32
    end
    if reason == 0 then reason = 3 end
    if wait > retry_us then retry_us = wait end
  end
end
if tokens < cost then
  local wait
  if cost > burst then
    wait = 0
    if reason == 0 then reason = 4 end
  else
    wait = (cost - tokens) * 1000000 / rate
    if reason == 0 then reason = 1 end
  end
  if wait > retry_us then retry_us = wait end
end

-- The bucket may vanish once it would be full again: at most full_us after a write under the
-- current quota. Its expiry is pushed out to twice that (and xe with it) only when less than
-- full_us of it is left, which saves a write on most calls while the key always outlives its
-- refill time. Measuring what is left against the current quota matters once the rate was
-- lowered: the expiry set under the faster rate is pushed out by the next call, even a rejected
-- one, instead of letting the key vanish and come back as a full bucket.
if reason ~= 0 then
  if tokens < burst then
    local full_us = math.ceil(burst * 1000000 / rate) + 1000000
    if (tonumber(tb[3]) or 0) - now <= full_us then
      redis.call('HSET', KEYS[1], 'xe', now + 2 * full_us)
      redis.call('PEXPIRE', KEYS[1], math.ceil(2 * full_us / 1000))
    end
  end
  return {0, reason, math.floor(tokens), math.ceil(retry_us / 1000), used, win_used,
          server_day, now_s}
end

-- Consume from all of them.
tokens = tokens - cost
local full_us = math.ceil(burst * 1000000 / rate) + 1000000
if (tonumber(tb[3]) or 0) - now <= full_us then
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now, 'xe', now + 2 * full_us)
  redis.call('PEXPIRE', KEYS[1], math.ceil(2 * full_us / 1000))
else
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
end
if cost > 0 then
  used = redis.call('INCRBY', KEYS[2], cost)
end
if window_limit > 0 and cost > 0 then
  local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
  -- ARGV[1], the cost as the client wrote it: a number would be written with %.14g.
  redis.call('ZADD', KEYS[3], now, seq .. ':' .. ARGV[1])
  win_used = win_used + cost
  redis.call('HSET', KEYS[4], 'sum', win_used)
  local ttl = math.ceil(window_us / 1000) + 1000
  redis.call('PEXPIRE', KEYS[3], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
return {1, 0, math.floor(tokens), 0, used, win_used, server_day, now_s}
