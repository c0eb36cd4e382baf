-- Settles a GCRA charge on the server's clock: moves the theoretical
-- arrival time (TAT) of one limit by a signed number of units.
--
-- KEYS[1]   the TAT of the limit, in µs
-- ARGV[1]   emission interval T, in µs
-- ARGV[2]   units to add (an overdraft, > 0) or give back (a refund, < 0)
--
-- A refund never moves the TAT before now (no credit beyond a full
-- bucket); an overdraft may move it past the burst tolerance, so the next
-- charges wait until it is paid off. Answers the new TAT minus now, in µs.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + units * interval
if new_tat <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return math.ceil(new_tat - now)
