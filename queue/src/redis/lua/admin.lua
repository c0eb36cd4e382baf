-- Stats and dead-letter administration.
-- ARGV: prefix, action, then:
--   'stats', levels, max attempts -> {ready, delayed, in_flight, dead, oldest ready age ms or -1}
--   'replay', id...               -> replayed count
--   'purge'                       -> purged count
local action = ARGV[2]
local now = now_ms()
if action == 'stats' then
  local levels = tonumber(ARGV[3])
  promote_due(now)
  reclaim(now, tonumber(ARGV[4]), levels, false)
  local ready = 0
  local in_flight = 0
  local oldest = -1
  for level = 0, levels - 1 do
    local sk = stream_key(level)
    local len = redis.call('XLEN', sk)
    if len > 0 then
      local info = group_info(sk) or {}
      local pending = info['pending'] or 0
      local last_delivered = info['last-delivered-id'] or '0-0'
      ready = ready + len - pending
      in_flight = in_flight + pending
      local first = redis.call('XRANGE', sk, '(' .. last_delivered, '+', 'COUNT', 1)
      if #first > 0 then
        local ms = tonumber(string.match(first[1][1], '^(%d+)-'))
        local age = math.max(now - ms, 0)
        if age > oldest then
          oldest = age
        end
      end
    end
  end
  return {ready, redis.call('ZCARD', K_DELAYED), in_flight, redis.call('XLEN', K_DEAD), oldest}
elseif action == 'replay' then
  local replayed = 0
  for i = 3, #ARGV do
    local id = ARGV[i]
    local eid = redis.call('HGET', K_DEAD_INDEX, id)
    if eid then
      local e = redis.call('XRANGE', K_DEAD, eid, eid)
      redis.call('HDEL', K_DEAD_INDEX, id)
      redis.call('XDEL', K_DEAD, eid)
      if #e > 0 then
        local m = fields_to_map(e[1][2])
        push_ready({id = m.id, p = m.p, h = m.h, a = '0', t = m.t, r = m.r})
        replayed = replayed + 1
      end
    end
  end
  return replayed
elseif action == 'purge' then
  local n = redis.call('XLEN', K_DEAD)
  redis.call('UNLINK', K_DEAD, K_DEAD_INDEX)
  return n
end
return redis.error_reply('unknown admin action ' .. tostring(action))
