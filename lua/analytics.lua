-- Adds a batch of per-key request counts to the usage analytics.
-- KEYS[1] <prefix>{stats}:requests          (sorted set, all time)
-- KEYS[2] <prefix>{stats}:unique            (HyperLogLog of keys seen)
-- KEYS[3] <prefix>{stats}:requests:hour:    (prefix of the hourly sorted sets)
-- ARGV    api_key, count, api_key, count, ...
-- The hour comes from the Redis clock; hourly sets live two hours.
local t = redis.call('TIME')
local hour = KEYS[3] .. string.format('%.0f', math.floor(tonumber(t[1]) / 3600))
local seen = {}
for i = 1, #ARGV, 2 do
  local key, count = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZINCRBY', KEYS[1], count, key)
  redis.call('ZINCRBY', hour, count, key)
  seen[#seen + 1] = key
end
-- One PFADD for the whole batch (callers send at most a few hundred keys).
if #seen > 0 then
  redis.call('PFADD', KEYS[2], unpack(seen))
end
redis.call('EXPIRE', hour, 7200)
return hour
