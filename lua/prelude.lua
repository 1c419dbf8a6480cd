-- Shared by the window scripts: joined in front of each one when it is
-- loaded (concat! of include_str! in src/ratelimit/remote.rs).
--
-- now_us()             Redis server time in microseconds: time comes from
--                      Redis, never from the callers' clocks.
-- period(now, window)  start and end (exclusive), in microseconds, of the
--                      period that holds `now`: every `window` microseconds
--                      from the epoch when window > 0; the UTC calendar day
--                      for -1 and month for -2 (the civil-date arithmetic of
--                      src/ratelimit/algo.rs, days_from_civil/civil_from_days).
-- expire_ms(key, life, window)
--                      milliseconds until a period's key may go (PEXPIRE).
local DAY = 86400000000

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function period(now, window)
  if window > 0 then
    local start = now - (now % window)
    return start, start + window
  end
  local days = math.floor(now / DAY)
  if window == -1 then
    return days * DAY, (days + 1) * DAY
  end
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * DAY, days_from_civil(ny, nm, 1) * DAY
end

-- The key of the period that starts at `start`: <base>:<start in seconds>.
local function period_key(base, start)
  return base .. ':' .. string.format('%.0f', start / 1000000)
end

-- Milliseconds a period's key lives: the period's remaining `life`
-- (microseconds), a second of slack, and up to a whole window (at most a
-- minute) that the key's name picks. Without that share every key of one
-- window would expire at the same instant, and Redis, deleting them in
-- cycles of up to 25 ms, held every caller's calls that long at each
-- window's end (bench/memory.py, 200,000 keys in 20 s windows; spread over
-- a quarter of the window it still did). The cost: a window's keys stay in
-- Redis half a window longer on average.
local SPREAD_MAX_MS = 60000
local function expire_ms(key, life, window)
  local spread = SPREAD_MAX_MS
  if window > 0 then spread = math.min(math.floor(window / 1000), SPREAD_MAX_MS) end
  local pick = tonumber(string.sub(redis.sha1hex(key), 1, 7), 16)
  return math.ceil(life / 1000) + 1000 + pick % (spread + 1)
end

-- The ledger of one period: a hash beside the period's count, one field per
-- lease of an instance ("<instance>:<lease>") holding the units the count
-- holds for it (held or admitted), and "<instance>:<lease>:u", the units it
-- said it had admitted. It lives as
-- long as the count.
--
-- settle(used, mine, pstart, start, floor, back)
--                      the count and this instance's ledger after what the
--                      instance says of the period it names: `floor` units
--                      it has counted for itself there (admitted or held)
--                      are counted here too, whether or not they fit (Redis
--                      lost them in a restart, or the instance admitted them
--                      while it could not reach Redis: those requests were
--                      served), and `back` unused units are handed back
--                      (never below the floor). Nothing applies to a period
--                      the instance does not name: a late hand-back never
--                      lands in the next period.
local function settle(used, mine, pstart, start, floor, back)
  if pstart ~= start then return used, mine end
  local target = math.max(mine - back, floor)
  return math.max(used + target - mine, 0), target
end

-- Writes what a lease call changed: the count (its delta, with the period's
-- expiry) and this instance's ledger fields.
local function store(key, ledger, me, delta, mine, was_mine, consumed, pstart, start, life, window)
  local ms = expire_ms(key, life, window)
  if delta ~= 0 then
    redis.call('INCRBY', key, delta)
    redis.call('PEXPIRE', key, ms)
  end
  if mine ~= was_mine or (pstart == start and consumed >= 0) then
    redis.call('HSET', ledger, me, mine)
    if pstart == start and consumed >= 0 then
      redis.call('HSET', ledger, me .. ':u', consumed)
    end
    redis.call('PEXPIRE', ledger, ms)
  end
end
