-- Sliding window (two fixed windows, the previous one weighted by how much
-- of it still lies inside the sliding window): lease units of every window of
-- one key, or none.
--
-- KEYS / ARGV / return: as in fixed_window.lua.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local plan = {}
local ok = true
for i = 1, n do
  local a = 1 + (i - 1) * 5
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local need, divisor, max_chunk = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local start = now - (now % window)
  local elapsed = now - start
  local cur_key = KEYS[i] .. ':' .. string.format('%.0f', start / 1000000)
  local prev_key = KEYS[i] .. ':' .. string.format('%.0f', (start - window) / 1000000)
  local cur = tonumber(redis.call('GET', cur_key) or '0')
  local prev = tonumber(redis.call('GET', prev_key) or '0')
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
  plan[i] = { cur_key, grant, avail, window - elapsed, retry, 2 * window - elapsed }
end
local out = {}
for i = 1, n do
  local p = plan[i]
  local grant = 0
  if ok then grant = p[2] end
  if grant > 0 then
    redis.call('INCRBY', p[1], grant)
    -- The current window is read as "previous" during the next one.
    redis.call('PEXPIRE', p[1], math.floor(p[6] / 1000) + 1000)
  end
  out[#out + 1] = grant
  out[#out + 1] = p[3] - grant
  out[#out + 1] = p[4]
  out[#out + 1] = p[5]
end
return out
