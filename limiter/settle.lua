-- settle.lua: correct an allowed decision's cost once the real cost is known, atomically.
--
-- `delta` = actual cost - reserved cost. A positive delta is charged to the day's counter, the
-- token bucket and the rolling window; a negative one is given back to the day's counter and
-- the bucket. No counter goes below zero and the bucket never above its burst. The rolling
-- window only takes extra charges: a refund there could let a later window admit more than
-- its limit, so it is not given back.
--
-- KEYS: as acquire.lua (rl:{t}:tb, rl:{t}:day:YYYYMMDD of the decision's day, rl:{t}:win,
--       rl:{t}:win:meta; the window's two only for a quota with a window)
-- ARGV: delta, rate_per_sec, burst, window_limit (0 = none), window_seconds,
--       today ("" = none: the day of a decision, which may be over; else days since 1970-01-01
--       of the day KEYS[2] names, which must be the server's UTC day)
--
-- A missing day counter is left missing (it expired, or Redis lost it and it will be seeded
-- from the quota DB, which already holds the real usage): reply daily_used = -1.
--
-- A settle for "today" names the day by the client's estimate of the server clock. As in
-- acquire.lua, a day that is not the server's changes nothing: the reply is WRONG_DAY,
-- {-2, server_day, server_time_s}, and the client settles again into the server's day.
--
-- Reply: {daily_used, tokens, window_used} (tokens: whole, floored, as acquire.lua's)

local delta = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local window_limit = tonumber(ARGV[4])
local window_us = tonumber(ARGV[5]) * 1000000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

if ARGV[6] and ARGV[6] ~= '' then
  local now_s = tonumber(t[1])
  local server_day = (now_s - now_s % 86400) / 86400
  if tonumber(ARGV[6]) ~= server_day then
    return {-2, server_day, now_s}
  end
end

local used = redis.call('GET', KEYS[2])
if used then
  used = tonumber(used) + delta
  if used < 0 then used = 0 end
  redis.call('SET', KEYS[2], used, 'KEEPTTL')
else
  used = -1
end

local tb = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'xe')
local tokens = tonumber(tb[1])
local ts = tonumber(tb[2])
if tokens == nil or ts == nil then
  tokens = burst
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
end
tokens = tokens - delta
if tokens < 0 then tokens = 0 end
if tokens > burst then tokens = burst end
-- The same expiry rule as acquire.lua: pushed out to twice the full-refill time when less than
-- that time is left, never brought in (a decision made under a faster, older quota would).
local full_us = math.ceil(burst * 1000000 / rate) + 1000000
if (tonumber(tb[3]) or 0) - now <= full_us then
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', now,
             'xe', now + 2 * full_us)
  redis.call('PEXPIRE', KEYS[1], math.ceil(2 * full_us / 1000))
else
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', now)
end

local win_used = 0
if window_limit > 0 then
  win_used = tonumber(redis.call('HGET', KEYS[4], 'sum') or '0')
  if delta > 0 then
    local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
    -- ARGV[1], the delta as the client wrote it: a number would be written with %.14g.
    redis.call('ZADD', KEYS[3], now, seq .. ':' .. ARGV[1])
    win_used = win_used + delta
    redis.call('HSET', KEYS[4], 'sum', win_used)
    local ttl = math.ceil(window_us / 1000) + 1000
    redis.call('PEXPIRE', KEYS[3], ttl)
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
end
return {used, math.floor(tokens), win_used}
