-- Sets the "blocked" flag of a stored token record, keeping its TTL.
-- KEYS[1] <prefix>token:<api_key>; ARGV[1] "1" to block, "0" to unblock.
-- Returns 1, or 0 when no such token is stored.
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, record = pcall(cjson.decode, v)
if not ok or type(record) ~= 'table' then record = { token = v } end
record.blocked = (ARGV[1] == '1')
redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
return 1
