-- GCRA over one or more limits, all or nothing, on the server's clock.
--
-- KEYS[i]         the theoretical arrival time (TAT) of limit i, in µs
-- ARGV[3i-2]      emission interval T of limit i, in µs
-- ARGV[3i-1]      burst tolerance tau of limit i (burst × T), in µs
-- ARGV[3i]        units n charged to limit i
--
-- Answers {1, 0} when every limit admits its n units (and charges them
-- all), or {0, wait_µs} when one does not (and charges nothing).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local tau = tonumber(ARGV[3 * i - 1])
  local n = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then
    tat = now
  end
  local new_tat = tat + n * interval
  local over = new_tat - tau - now
  if over > 0 then
    if over > wait then
      wait = over
    end
  end
  tats[i] = new_tat
end
if wait > 0 then
  return {0, math.ceil(wait)}
end
for i = 1, #KEYS do
  -- The key expires once the bucket has refilled: idle tenants cost nothing.
  local ttl_ms = math.ceil((tats[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', ttl_ms)
end
return {1, 0}
