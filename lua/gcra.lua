-- GCRA (generic cell rate algorithm, a leaky bucket): one key per window
-- holding the theoretical arrival time (TAT) in microseconds. `limit` units
-- per `window`, one every window/limit, with bursts up to `limit`.
--
-- KEYS[i]  base key of window i: <prefix>rl:{<key>}:<window seconds> (":gcra" is appended)
-- ARGV     as in fixed_window.lua (10 values per window), but GCRA keeps no ledger and has no
--          periods: `period` and `consumed` are ignored, `floor` is units
--          to charge as they are (admitted while Redis was unreachable, or
--          reported after the answer), `back` units handed back.
-- Returns  as in fixed_window.lua: "microseconds to the period's end" is
--          the time until the bucket is empty again, the period's start is
--          0 and the ledger -1 (none).
-- Needs prelude.lua in front (calendar windows are refused for gcra).
local now = now_us()
local n = tonumber(ARGV[1])
local plan = {}
local ok = true
for i = 1, n do
  local a = 2 + (i - 1) * 10
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local need, divisor, max_chunk = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local add, back = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local interval = math.max(math.floor(window / limit), 1)
  local key = KEYS[i] .. ':gcra'
  local was = tonumber(redis.call('GET', key) or '0')
  -- A drained bucket starts from now; what is handed back never reaches
  -- into the past.
  local tat = math.max(math.max(was, now) + (add - back) * interval, now)
  local avail = math.max(math.floor((window - (tat - now)) / interval), 0)
  local grant = 0
  local retry = 0
  if avail >= need then
    grant = math.max(need, math.min(max_chunk, math.floor(avail / divisor)))
    grant = math.min(grant, avail)
  else
    ok = false
    -- Capped: a huge need over a long window is past any integer Redis
    -- can return (it would come back as a negative number).
    retry = math.min(tat + need * interval - now - window, 2 ^ 62)
  end
  plan[i] = { key, grant, avail, tat, interval, retry, was }
end
local out = {}
for i = 1, n do
  local p = plan[i]
  local grant = 0
  if ok then grant = p[2] end
  local tat = p[4] + grant * p[5]
  if tat > now then
    if tat ~= p[7] then
      -- Always at least a second: Redis refuses a zero or negative expiry.
      redis.call('SET', p[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    end
  elseif p[7] > 0 then
    redis.call('DEL', p[1])
  end
  out[#out + 1] = grant
  out[#out + 1] = p[3] - grant
  out[#out + 1] = math.min(tat - now, 2 ^ 62)
  out[#out + 1] = p[6]
  out[#out + 1] = 0
  out[#out + 1] = -1
end
return out
