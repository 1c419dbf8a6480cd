-- Fixed window: lease units of every window of one key, or none, and keep
-- the calling instance's ledger for each period (see `settle` in the
-- prelude).
--
-- KEYS[i]  base key of window i: <prefix>rl:{<key>}:<window seconds | day | month>
--          (the window's start in seconds is appended; the ledger is that
--          key with ":l"; every key of one call shares the {<key>} hash tag,
--          so they sit on one cluster slot)
-- ARGV[1]  number of windows n; ARGV[2] the calling instance's id; then for
--          each window, 10 values:
--          limit, window (microseconds; -1 a calendar day, -2 a calendar
--          month, UTC), need, divisor, max_chunk, period (start in
--          microseconds of the period the instance's lease counts in; -1
--          none), floor, back, consumed (units the instance admitted in that
--          period, reported for the quota view; -1 unknown), incarnation
--          (the lease's name: the ledger field is "<instance>:<incarnation>",
--          so a lease made again in a period never reads an old one's)
--          grant = max(need, min(max_chunk, floor(available / divisor)))
--          capped at what is available; a window with less than `need`
--          available refuses, and then nothing is granted anywhere (floors
--          and hand-backs still apply).
-- Returns  6 integers per window: granted, available after the grant,
--          microseconds to the period's end, microseconds until `need` fits,
--          the period's start (microseconds), the instance's ledger after
--          the call.
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
  local key = period_key(KEYS[i], start)
  local ledger = key .. ':l'
  local was = tonumber(redis.call('GET', key) or '0')
  local who = me .. ':' .. ARGV[a + 10]
  local was_mine = tonumber(redis.call('HGET', ledger, who) or '0')
  local used, mine = settle(was, was_mine, pstart, start, floor, back)
  local avail = math.max(limit - used, 0)
  local grant = 0
  if avail >= need then
    grant = math.max(need, math.min(max_chunk, math.floor(avail / divisor)))
    grant = math.min(grant, avail)
  else
    ok = false
  end
  plan[i] = { key, ledger, grant, avail, stop - now, need, window, start, pstart, was, used, was_mine, mine, consumed, who }
end
local out = {}
for i = 1, n do
  local p = plan[i]
  local grant = 0
  if ok then grant = p[3] end
  local mine = p[13] + grant
  store(p[1], p[2], p[15], p[11] + grant - p[10], mine, p[12], p[14], p[9], p[8], p[5], p[7])
  local retry = 0
  if p[4] < p[6] then retry = p[5] end
  out[#out + 1] = grant
  out[#out + 1] = p[4] - grant
  out[#out + 1] = p[5]
  out[#out + 1] = retry
  out[#out + 1] = p[8]
  out[#out + 1] = mine
end
return out
