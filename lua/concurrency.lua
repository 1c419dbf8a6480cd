-- Concurrency slots of one key, shared by a fleet: each instance holds a
-- number of slots for a while; the holders' slots never add up to more than
-- the limit, so neither do the requests in flight.
--
-- KEYS[1]  the key's hash: <prefix>cc:{<key>}, one field per instance,
--          "<slots>:<expiry in ms>"
-- ARGV[1]  this instance's id
-- ARGV[2]  slots this instance wants to hold (0 hands them all back)
-- ARGV[3]  the limit
-- ARGV[4]  how long a holding lasts without renewal (ms): the slots of an
--          instance that died come back after it
-- Returns  the slots this instance holds now: what it asked for, or less
--          (what it held before, if that still fits, or what is free).
-- Time comes from the Redis server.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, want = ARGV[1], tonumber(ARGV[2])
local limit, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local holder, value = fields[i], fields[i + 1]
  local sep = string.find(value, ':', 1, true)
  local slots = tonumber(string.sub(value, 1, sep - 1))
  local expiry = tonumber(string.sub(value, sep + 1))
  if expiry <= now then
    redis.call('HDEL', KEYS[1], holder)
  elseif holder ~= me then
    others = others + slots
  end
end
local held = math.max(math.min(want, limit - others), 0)
if held == 0 then
  redis.call('HDEL', KEYS[1], me)
else
  redis.call('HSET', KEYS[1], me, held .. ':' .. (now + ttl))
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
end
return held
