-- GCRA (generic cell rate algorithm, a leaky bucket): one key per window
-- holding the theoretical arrival time (TAT) in microseconds. `limit` units
-- per `window`, one every window/limit, with bursts up to `limit`.
--
-- KEYS[i]  base key of window i: <prefix>rl:{<key>}:<window seconds> (":gcra" is appended)
-- ARGV / return: as in fixed_window.lua ("microseconds to the window's end"
-- is the time until the bucket is empty again).
-- Needs prelude.lua in front (calendar windows are refused for gcra).
local now = now_us()
local n = tonumber(ARGV[1])
local plan = {}
local ok = true
for i = 1, n do
  local a = 1 + (i - 1) * 5
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local need, divisor, max_chunk = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local interval = math.max(math.floor(window / limit), 1)
  local key = KEYS[i] .. ':gcra'
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local avail = math.max(math.floor((window - (tat - now)) / interval), 0)
  local grant = 0
  local retry = 0
  if avail >= need then
    grant = math.max(need, math.min(max_chunk, math.floor(avail / divisor)))
    grant = math.min(grant, avail)
  else
    ok = false
    retry = tat + need * interval - now - window
  end
  plan[i] = { key, grant, avail, tat, interval, retry }
end
local out = {}
for i = 1, n do
  local p = plan[i]
  local grant = 0
  if ok then grant = p[2] end
  local tat = p[4]
  if grant > 0 then
    tat = tat + grant * p[5]
    redis.call('SET', p[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  end
  out[#out + 1] = grant
  out[#out + 1] = p[3] - grant
  out[#out + 1] = tat - now
  out[#out + 1] = p[6]
end
return out
