-- Shared by every keel-queue script. ARGV[1] is the queue's key prefix,
-- `keel:{<name>}`: every key below shares its hash tag, so one queue lives in
-- one slot of a Redis Cluster. KEYS[1] is always `<prefix>:delayed`,
-- declared so the script is routed to that slot.
--
-- Leases live in the consumer group's pending entries list (PEL): a job
-- delivered with a lease of L ms is pending under the consumer named `L`,
-- and its lease has expired once its idle time reaches L.
local prefix = ARGV[1]
if KEYS[1] ~= prefix .. ':delayed' then
  return redis.error_reply('ERR keel-queue script called with key ' .. tostring(KEYS[1]) ..
    ' for prefix ' .. tostring(prefix) .. ' (the declared key must be <prefix>:delayed)')
end
local GROUP = 'keel'
local K_DELAYED = prefix .. ':delayed'
local K_DEAD = prefix .. ':dead'
local K_DEAD_INDEX = prefix .. ':dead-index'
-- Gets an entry when a read gave entries back by rewinding its group (an
-- XREAD on the streams would not see them: their ids are old).
local K_WAKE = prefix .. ':wake'
-- Work done per call on due jobs and expired leases is bounded, so one call
-- stays short however large the backlog.
local MAINTAIN_BATCH = 256
-- A lease class (consumer) with nothing pending and no use for this long is
-- removed from the group, so one-off lease lengths do not pile up.
local IDLE_CONSUMER_MS = 600000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function stream_key(level)
  return prefix .. ':p:' .. level
end

local function fields_to_map(f)
  local m = {}
  for i = 1, #f, 2 do
    m[f[i]] = f[i + 1]
  end
  return m
end

-- A stream entry is {'m', '<id>|<previous attempts>|<enqueued ms>|<level>',
-- 'p', payload[, 'h', headers][, 'd', deadline ms]}: few fields keep the hot
-- path cheap. Jobs as Lua tables: {id, a, t, r, p, h, d}.
local function parse_entry(f)
  local e = fields_to_map(f)
  local id, a, t, r = string.match(e.m or '', '^(.*)|(%d+)|(%d+)|(%d+)$')
  return {id = id, a = a, t = t, r = r, p = e.p, h = e.h, d = e.d}
end

local function entry_fields(m)
  local out = {'m', m.id .. '|' .. m.a .. '|' .. m.t .. '|' .. m.r, 'p', m.p}
  if m.h and m.h ~= '' then
    out[#out + 1] = 'h'
    out[#out + 1] = m.h
  end
  if m.d and m.d ~= '' then
    out[#out + 1] = 'd'
    out[#out + 1] = m.d
  end
  return out
end

local function push_ready(m)
  redis.call('XADD', stream_key(m.r), '*', unpack(entry_fields(m)))
end

-- A delayed job is held under a number of its own, not its id: ids may be
-- chosen by callers, and two jobs under one id must not share a slot.
local function push_delayed(m, due)
  local slot = tostring(redis.call('INCR', prefix .. ':delay-seq'))
  redis.call('HSET', prefix .. ':d:' .. slot, unpack(entry_fields(m)))
  redis.call('ZADD', K_DELAYED, due, slot)
end

local function kill(m, reason, now)
  local eid = redis.call('XADD', K_DEAD, '*', 'id', m.id, 'p', m.p, 'h', m.h or '',
    'a', m.a, 't', m.t, 'r', m.r, 'reason', reason, 'f', tostring(now))
  redis.call('HSET', K_DEAD_INDEX, m.id, eid)
end

-- XINFO GROUPS of our group on stream `sk` as a map, or nil when the
-- stream or the group does not exist.
local function group_info(sk)
  local groups = redis.pcall('XINFO', 'GROUPS', sk)
  if type(groups) ~= 'table' or groups.err then
    return nil
  end
  for _, g in ipairs(groups) do
    local gm = fields_to_map(g)
    if gm['name'] == GROUP then
      return gm
    end
  end
  return nil
end

-- The id of the last entry the group handed out from stream `sk`, or nil.
local function last_delivered(sk)
  local info = group_info(sk)
  return info and info['last-delivered-id']
end

-- True while entry `eid` of stream `sk` is pending under a lease that has
-- not run out.
local function live_lease(sk, eid)
  -- (No group or stream: the server lost the queue's data; nothing is live.)
  local p = redis.pcall('XPENDING', sk, GROUP, eid, eid, 1)
  if type(p) ~= 'table' or p.err or #p == 0 then
    return false
  end
  local lease = tonumber(p[1][2])
  return lease ~= nil and p[1][3] < lease
end

-- Removes entries of stream `sk` from the pending list and the stream.
local function drop(sk, eids)
  if #eids > 0 then
    redis.call('XACK', sk, GROUP, unpack(eids))
    redis.call('XDEL', sk, unpack(eids))
  end
end

-- Removes an entry from the pending list and its stream; answers its job
-- (nil if the entry is gone).
local function take(sk, eid)
  local e = redis.call('XRANGE', sk, eid, eid)
  drop(sk, {eid})
  if #e == 0 then
    return nil
  end
  return parse_entry(e[1][2])
end

-- A lease ran out: the job goes back to the tail of its level with one more
-- attempt counted, or to the dead letters after max attempts.
local function expire(m, now, max_attempts)
  m.a = tostring(tonumber(m.a) + 1)
  if tonumber(m.a) >= max_attempts then
    kill(m, 'max attempts (' .. max_attempts .. ') exceeded: lease expired on attempt ' .. m.a ..
      ' (consumer crashed or too slow)', now)
  else
    push_ready(m)
  end
end

-- Promotes due delayed jobs (bounded); answers how many moved.
local function promote_due(now)
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, MAINTAIN_BATCH)
  for _, id in ipairs(due) do
    local k = prefix .. ':d:' .. id
    local f = redis.call('HGETALL', k)
    redis.call('ZREM', K_DELAYED, id)
    redis.call('DEL', k)
    if #f > 0 then
      push_ready(parse_entry(f))
    end
  end
  return #due
end

-- Takes back the expired leases of lease class `name` (`lease` ms) in
-- stream `sk`, at most `budget`; answers how many. When it is the only
-- class with pending entries, one `XAUTOCLAIM` with the lease as its idle
-- threshold finds them and hands over their fields; otherwise that
-- threshold would also catch longer leases, so `XPENDING … IDLE` scans this
-- class alone.
local function reclaim_class(sk, name, lease, budget, only_class, now, max_attempts)
  local moved = 0
  if only_class then
    local cursor = '0-0'
    for _ = 1, 4 do
      local r = redis.call('XAUTOCLAIM', sk, GROUP, name, lease, cursor, 'COUNT', budget - moved)
      local eids = {}
      for _, e in ipairs(r[2]) do
        eids[#eids + 1] = e[1]
        -- (Redis 6.2 reports an entry deleted meanwhile with no fields.)
        if e[2] then
          expire(parse_entry(e[2]), now, max_attempts)
        end
      end
      drop(sk, eids)
      moved = moved + #eids
      cursor = r[1]
      if cursor == '0-0' or moved >= budget then
        return moved
      end
    end
    -- XAUTOCLAIM looks at ten entries per one asked for, so a long run of
    -- live leases can hide expired ones behind it: scan for those instead.
    budget = budget - moved
  end
  local expired = redis.call('XPENDING', sk, GROUP, 'IDLE', lease, '-', '+', budget, name)
  for _, row in ipairs(expired) do
    local m = take(sk, row[1])
    if m then
      expire(m, now, max_attempts)
    end
  end
  return moved + #expired
end

-- Takes back expired leases of every level (bounded). Answers how many
-- moved and, when `estimate` is set, an estimate of ms until the next lease
-- runs out (nil when nothing is leased): the oldest pending entry per class,
-- which is exact unless a later entry's lease was shortened.
local function reclaim(now, max_attempts, levels, estimate)
  local moved = 0
  local next_in = nil
  local budget = MAINTAIN_BATCH
  for level = 0, levels - 1 do
    local sk = stream_key(level)
    local consumers = redis.pcall('XINFO', 'CONSUMERS', sk, GROUP)
    if type(consumers) == 'table' and not consumers.err then
      local classes = {}
      for _, c in ipairs(consumers) do
        local cm = fields_to_map(c)
        local name, pending = cm['name'], tonumber(cm['pending'])
        local lease = tonumber(name)
        if pending > 0 and lease then
          classes[#classes + 1] = {name = name, lease = lease, pending = pending}
        elseif pending == 0 and tonumber(cm['idle']) > IDLE_CONSUMER_MS then
          redis.call('XGROUP', 'DELCONSUMER', sk, GROUP, name)
        end
      end
      for _, class in ipairs(classes) do
        if budget > 0 then
          local n = reclaim_class(sk, class.name, class.lease, budget, #classes == 1, now, max_attempts)
          moved = moved + n
          budget = budget - n
          class.pending = class.pending - n
        end
        if estimate and class.pending > 0 then
          local first = redis.call('XPENDING', sk, GROUP, '-', '+', 1, class.name)
          if #first > 0 then
            local left = math.max(class.lease - first[1][3], 1)
            if not next_in or left < next_in then
              next_in = left
            end
          end
        end
      end
    end
  end
  return moved, next_in
end
