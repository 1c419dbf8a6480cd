-- The fleet: how many instances share this Redis. Each instance registers
-- every few seconds; an instance not seen for `ttl` no longer counts.
-- KEYS[1] <prefix>instances (sorted set: instance id -> last seen, ms)
-- ARGV[1] this instance's id, ARGV[2] ttl (ms)
-- Returns the number of instances seen within ttl (this one included).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
