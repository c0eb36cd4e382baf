-- ack / nack / extend on leases.
-- ARGV: prefix, action, then:
--   'ack', n, member...                      -> {acked, invalid}
--   'retry', member, after ms, reason, max attempts -> {status}
--   'dead', member, reason                   -> {status}
--   'release', member                        -> {status}
--   'extend', member, lease ms               -> {status}
local action = ARGV[2]
local now = now_ms()
if action == 'ack' then
  -- ARGV after the action: n, then n lease members, n levels, n entry ids
  -- (split by the client, so no pattern matching here).
  local n = tonumber(ARGV[3])
  local members = {}
  for i = 1, n do
    members[i] = ARGV[3 + i]
  end
  local scores = redis.call('ZMSCORE', K_LEASES, unpack(members))
  local valid = {}
  local seen = {}
  local by_level = {}
  for i = 1, n do
    local score = scores[i]
    local member = members[i]
    if score and tonumber(score) > now and not seen[member] then
      seen[member] = true
      local level = ARGV[3 + n + i]
      valid[#valid + 1] = member
      local eids = by_level[level]
      if not eids then
        eids = {}
        by_level[level] = eids
      end
      eids[#eids + 1] = ARGV[3 + 2 * n + i]
    end
  end
  if #valid > 0 then
    for level, eids in pairs(by_level) do
      local sk = stream_key(level)
      redis.call('XACK', sk, GROUP, unpack(eids))
      redis.call('XDEL', sk, unpack(eids))
    end
    redis.call('ZREM', K_LEASES, unpack(valid))
    redis.call('DECRBY', K_SIZE, #valid)
  end
  return {#valid, n - #valid}
end

local member = ARGV[3]
if not lease_valid(member, now) then
  return {'invalid'}
end
if action == 'extend' then
  redis.call('ZADD', K_LEASES, 'XX', now + tonumber(ARGV[4]), member)
  return {'ok'}
end
local m = take_leased(member)
if not m then
  return {'invalid'}
end
if action == 'release' then
  -- Untried: back to the tail of its level without counting the delivery,
  -- so the next one repeats its attempt number. Never dead-letters.
  push_ready(m)
  return {'released'}
end
m.a = tostring(tonumber(m.a) + 1)
if action == 'dead' then
  kill(m, ARGV[4], now)
  return {'dead'}
end
-- retry
local after = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[6])
if tonumber(m.a) >= max_attempts then
  kill(m, 'max attempts (' .. max_attempts .. ') exceeded: ' .. ARGV[5], now)
  return {'dead'}
end
if after > 0 then
  push_delayed(m, now + after)
else
  push_ready(m)
end
return {'retry'}
