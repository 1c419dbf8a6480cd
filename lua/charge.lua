-- Charges units after the fact (cost reported by the upstream), whether or
-- not they fit: the work is done. Every window of one key, like the lease
-- scripts. KEYS[i]: base key of window i.
-- ARGV[1] algorithm (fixed_window | sliding_window | gcra), ARGV[2] n,
-- then per window: limit, window (microseconds), units.
-- Needs prelude.lua in front.
local now = now_us()
local algo = ARGV[1]
local n = tonumber(ARGV[2])
for i = 1, n do
  local a = 2 + (i - 1) * 3
  local limit, window, units = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if algo == 'gcra' then
    local key = KEYS[i] .. ':gcra'
    local interval = math.max(math.floor(window / limit), 1)
    local tat = math.max(tonumber(redis.call('GET', key) or '0'), now) + units * interval
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  else
    local start, stop = period(now, window)
    local key = period_key(KEYS[i], start)
    redis.call('INCRBY', key, units)
    local life = stop - now
    if algo == 'sliding_window' and window > 0 then life = life + window end
    redis.call('PEXPIRE', key, expire_ms(key, life, window))
  end
end
return n
