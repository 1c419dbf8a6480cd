-- Fixed window: lease `grant` units of every window of one key, or none.
--
-- KEYS[i]  base key of window i: <prefix>rl:{<key>}:<window seconds | day | month>
--          (the window's start in seconds is appended; every key of one call
--          shares the {<key>} hash tag, so they sit on one cluster slot)
-- ARGV[1]  number of windows n; then for each window, 5 values:
--          limit, window (microseconds; -1 a calendar day, -2 a calendar
--          month, UTC), need, divisor, max_chunk
--          grant = max(need, min(max_chunk, floor(available / divisor)))
--          capped at what is available; a window with less than `need`
--          available refuses, and then nothing is granted anywhere.
-- Returns  4 integers per window: granted, available after the grant,
--          microseconds to the window's end, microseconds until `need` fits.
-- Needs prelude.lua (now_us, period, period_key, expire_ms) in front.
local now = now_us()
local n = tonumber(ARGV[1])
local plan = {}
local ok = true
for i = 1, n do
  local a = 1 + (i - 1) * 5
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local need, divisor, max_chunk = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local start, stop = period(now, window)
  local key = period_key(KEYS[i], start)
  local used = tonumber(redis.call('GET', key) or '0')
  local avail = math.max(limit - used, 0)
  local reset = stop - now
  local grant = 0
  if avail >= need then
    grant = math.max(need, math.min(max_chunk, math.floor(avail / divisor)))
    grant = math.min(grant, avail)
  else
    ok = false
  end
  plan[i] = { key, grant, avail, reset, need, window }
end
local out = {}
for i = 1, n do
  local p = plan[i]
  local grant = 0
  if ok then grant = p[2] end
  if grant > 0 then
    redis.call('INCRBY', p[1], grant)
    redis.call('PEXPIRE', p[1], expire_ms(p[1], p[4], p[6]))
  end
  local retry = 0
  if p[3] < p[5] then retry = p[4] end
  out[#out + 1] = grant
  out[#out + 1] = p[3] - grant
  out[#out + 1] = p[4]
  out[#out + 1] = retry
end
return out
