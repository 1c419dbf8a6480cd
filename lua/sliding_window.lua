-- Sliding window (two fixed windows, the previous one weighted by how much
-- of it still lies inside the sliding window): lease units of every window of
-- one key, or none, and keep the calling instance's ledger of the current
-- fixed window.
--
-- KEYS / ARGV / return: as in fixed_window.lua ("period" is the current
-- fixed window). Calendar windows (window -1 or -2) count as fixed windows
-- on the calendar: no previous period.
-- Needs prelude.lua in front.
local now = now_us()
local n = tonumber(ARGV[1])
local me = ARGV[2]
local plan = {}
local ok = true
for i = 1, n do
  local a = 2 + (i - 1) * 10
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local need, divisor, max_chunk = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local pstart, floor, back, consumed = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local start, stop = period(now, window)
  local elapsed = now - start
  local cur_key = period_key(KEYS[i], start)
  local ledger = cur_key .. ':l'
  local was = tonumber(redis.call('GET', cur_key) or '0')
  local who = me .. ':' .. ARGV[a + 10]
  local was_mine = tonumber(redis.call('HGET', ledger, who) or '0')
  local cur, mine = settle(was, was_mine, pstart, start, floor, back)
  local prev = 0
  local life = stop - now
  local length = window
  if window > 0 then
    prev = tonumber(redis.call('GET', period_key(KEYS[i], start - window)) or '0')
    -- The current window is read as "previous" during the next one.
    life = life + window
  else
    length = stop - start
  end
  -- Rounded up: the estimate never under-counts.
  local weighted = math.ceil(prev * (length - elapsed) / length)
  local avail = math.max(limit - weighted - cur, 0)
  local grant = 0
  local retry = 0
  if avail >= need then
    grant = math.max(need, math.min(max_chunk, math.floor(avail / divisor)))
    grant = math.min(grant, avail)
  else
    ok = false
    if cur + need > limit then
      retry = length - elapsed
    else
      -- The first moment the previous period's weight, rounded up, leaves
      -- room: ceil(prev * (length - t) / length) <= limit - cur - need.
      local room = limit - cur - need
      local at = length - math.floor(room * length / math.max(prev, 1))
      retry = math.min(math.max(at - elapsed, 1), length - elapsed)
    end
  end
  plan[i] = { cur_key, ledger, grant, avail, length - elapsed, retry, life, window, start, pstart, was, cur, was_mine, mine, consumed, who }
end
local out = {}
for i = 1, n do
  local p = plan[i]
  local grant = 0
  if ok then grant = p[3] end
  local mine = p[14] + grant
  store(p[1], p[2], p[16], p[12] + grant - p[11], mine, p[13], p[15], p[10], p[9], p[7], p[8])
  out[#out + 1] = grant
  out[#out + 1] = p[4] - grant
  out[#out + 1] = p[5]
  out[#out + 1] = p[6]
  out[#out + 1] = p[9]
  out[#out + 1] = mine
end
return out
