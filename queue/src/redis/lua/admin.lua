-- Stats and dead-letter administration.
-- ARGV: prefix, action, then:
--   'stats', levels, max attempts -> {ready, delayed, in_flight, dead, oldest ready age ms or -1}
--   'replay', id...               -> replayed count
--   'purge'                       -> purged count
--   'purge-waiting', levels, limit -> waiting jobs removed (at most limit)
--   'delete-step', cursor, pattern, count -> {next cursor, keys removed}: one
--       SCAN step over the node's keys matching the queue's prefix, unlinking
--       them (run as a script so that, on a Redis Cluster, it runs on the
--       node holding the queue's slot)
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
elseif action == 'purge-waiting' then
  -- Removes up to `limit` waiting jobs: stream entries the group has not
  -- handed out (past its last delivered id) and delayed jobs. Leased
  -- entries stay. Answers how many went; the caller repeats until 0.
  local levels, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
  local removed = 0
  for level = 0, levels - 1 do
    if removed < limit then
      local sk = stream_key(level)
      local from = last_delivered(sk) or '0-0'
      local entries = redis.call('XRANGE', sk, '(' .. from, '+', 'COUNT', limit - removed)
      local eids = {}
      for _, e in ipairs(entries) do
        eids[#eids + 1] = e[1]
      end
      if #eids > 0 then
        redis.call('XDEL', sk, unpack(eids))
      end
      removed = removed + #eids
    end
  end
  if removed < limit then
    local slots = redis.call('ZRANGE', K_DELAYED, 0, limit - removed - 1)
    for _, slot in ipairs(slots) do
      redis.call('DEL', prefix .. ':d:' .. slot)
      redis.call('ZREM', K_DELAYED, slot)
    end
    removed = removed + #slots
  end
  return removed
elseif action == 'delete-step' then
  local found = redis.call('SCAN', ARGV[3], 'MATCH', ARGV[4], 'COUNT', tonumber(ARGV[5]))
  local keys = found[2]
  for i = 1, #keys, 500 do
    redis.call('UNLINK', unpack(keys, i, math.min(i + 499, #keys)))
  end
  return {found[1], #keys}
elseif action == 'purge' then
  local n = redis.call('XLEN', K_DEAD)
  redis.call('UNLINK', K_DEAD, K_DEAD_INDEX)
  return n
end
return redis.error_reply('unknown admin action ' .. tostring(action))
