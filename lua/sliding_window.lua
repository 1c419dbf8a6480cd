-- Sliding window (two fixed windows, the previous one weighted by how much
-- of it still lies inside the sliding window): lease units of every window of
-- one key, or none.
--
-- KEYS / ARGV / return: as in fixed_window.lua. Calendar windows (window
-- -1 or -2) count as fixed windows on the calendar: no previous period.
-- Needs prelude.lua in front.
local now = now_us()
local n = tonumber(ARGV[1])
local plan = {}
local ok = true
for i = 1, n do
  local a = 1 + (i - 1) * 5
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local need, divisor, max_chunk = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local start, stop = period(now, window)
  local elapsed = now - start
  local cur_key = period_key(KEYS[i], start)
  local cur = tonumber(redis.call('GET', cur_key) or '0')
  local prev = 0
  local life = stop - now
  if window > 0 then
    prev = tonumber(redis.call('GET', period_key(KEYS[i], start - window)) or '0')
    -- The current window is read as "previous" during the next one.
    life = life + window
  else
    window = stop - start
  end
  -- Rounded up: the estimate never under-counts.
  local weighted = math.ceil(prev * (window - elapsed) / window)
  local avail = math.max(limit - weighted - cur, 0)
  local grant = 0
  local retry = 0
  if avail >= need then
    grant = math.max(need, math.min(max_chunk, math.floor(avail / divisor)))
    grant = math.min(grant, avail)
  else
    ok = false
    if cur + need > limit then
      retry = window - elapsed
    else
      local room = weighted + cur + need - limit
      retry = math.min(math.ceil(room * window / math.max(prev, 1)), window - elapsed)
    end
  end
  plan[i] = { cur_key, grant, avail, window - elapsed, retry, life, window }
end
local out = {}
for i = 1, n do
  local p = plan[i]
  local grant = 0
  if ok then grant = p[2] end
  if grant > 0 then
    redis.call('INCRBY', p[1], grant)
    redis.call('PEXPIRE', p[1], expire_ms(p[1], p[6], p[7]))
  end
  out[#out + 1] = grant
  out[#out + 1] = p[3] - grant
  out[#out + 1] = p[4]
  out[#out + 1] = p[5]
end
return out
