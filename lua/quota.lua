-- The quota view of one key: per window, what Redis counts and what the
-- instances said they admitted (every instance but the caller, which adds
-- its own). Fixed and sliding windows; GCRA keeps no count (see gcra.lua).
-- KEYS[i] base key of window i; ARGV[1] n, ARGV[2] the caller's id, then per
-- window: window (microseconds; -1 day, -2 month)
-- Returns 3 integers per window: units counted (held or admitted by the
-- fleet), units the other instances reported admitted (ledger fields are
-- "<instance>:<lease>" and "<instance>:<lease>:u"), µs to the period's end.
-- Needs prelude.lua in front.
local now = now_us()
local n = tonumber(ARGV[1])
local me = ARGV[2]
local out = {}
for i = 1, n do
  local window = tonumber(ARGV[2 + i])
  local start, stop = period(now, window)
  local key = period_key(KEYS[i], start)
  local counted = tonumber(redis.call('GET', key) or '0')
  local admitted = 0
  local fields = redis.call('HGETALL', key .. ':l')
  for f = 1, #fields, 2 do
    local name = fields[f]
    if string.sub(name, -2) == ':u' and string.sub(name, 1, #me + 1) ~= me .. ':' then
      admitted = admitted + tonumber(fields[f + 1])
    end
  end
  out[#out + 1] = counted
  out[#out + 1] = admitted
  out[#out + 1] = stop - now
end
return out
