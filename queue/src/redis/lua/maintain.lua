-- Housekeeping before a read: promote due delayed jobs and, when asked,
-- take back expired leases.
-- ARGV: prefix, max attempts, levels, reclaim ('1' or '0'), idle ('1' or '0').
-- Answers {now ms, moved}; with idle set (the caller found nothing to read)
-- also the ms until the next delayed job or lease expiry (-1 when none) and
-- each level's last delivered id and the last id of the wake stream, from
-- which the caller blocks with XREAD.
local max_attempts = tonumber(ARGV[2])
local levels = tonumber(ARGV[3])
local idle = ARGV[5] == '1'
local now = now_ms()
local moved = promote_due(now)
local next_lease = nil
if ARGV[4] == '1' then
  local reclaimed
  reclaimed, next_lease = reclaim(now, max_attempts, levels, idle)
  moved = moved + reclaimed
  -- The estimate can be late when a lease was shortened: look again at
  -- least every second while jobs are leased.
  if next_lease then
    next_lease = math.min(next_lease, 1000)
  end
end
if not idle then
  return {now, moved}
end

local wake = next_lease
local d = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
if #d > 0 then
  local due_in = math.max(tonumber(d[2]) - now, 1)
  if not wake or due_in < wake then
    wake = due_in
  end
end
local last_ids = {}
for level = 0, levels - 1 do
  last_ids[#last_ids + 1] = last_delivered(stream_key(level)) or '0-0'
end
local wake_entry = redis.call('XREVRANGE', K_WAKE, '+', '-', 'COUNT', 1)
last_ids[#last_ids + 1] = (wake_entry[1] and wake_entry[1][1]) or '0-0'
return {now, moved, wake or -1, last_ids}
