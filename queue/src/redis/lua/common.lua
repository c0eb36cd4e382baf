-- Shared by every keel-queue script. ARGV[1] is the queue's key prefix,
-- `keel:{<name>}`: every key below shares its hash tag, so one queue lives in
-- one slot of a Redis Cluster. KEYS[1] is always `<prefix>:size`, declared so
-- the script is routed to that slot.
local prefix = ARGV[1]
local GROUP = 'keel'
local K_DELAYED = prefix .. ':delayed'
local K_LEASES = prefix .. ':leases'
local K_DEAD = prefix .. ':dead'
local K_DEAD_INDEX = prefix .. ':dead-index'
local K_SIZE = prefix .. ':size'
-- Work done per call on due jobs and expired leases is bounded, so one call
-- stays short however large the backlog.
local MAINTAIN_BATCH = 256

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

-- The deadline of a raw entry, without building a table (hot path).
local function entry_deadline(f)
  for i = 5, #f, 2 do
    if f[i] == 'd' then
      return tonumber(f[i + 1])
    end
  end
  return nil
end

local function push_ready(m)
  redis.call('XADD', stream_key(m.r), '*', unpack(entry_fields(m)))
end

local function push_delayed(m, due)
  redis.call('HSET', prefix .. ':d:' .. m.id, unpack(entry_fields(m)))
  redis.call('ZADD', K_DELAYED, due, m.id)
end

local function kill(m, reason, now)
  local eid = redis.call('XADD', K_DEAD, '*', 'id', m.id, 'p', m.p, 'h', m.h or '',
    'a', m.a, 't', m.t, 'r', m.r, 'reason', reason, 'f', tostring(now))
  redis.call('HSET', K_DEAD_INDEX, m.id, eid)
  redis.call('DECR', K_SIZE)
end

-- Removes a leased entry from its stream and answers its fields (nil if gone).
local function take_leased(member)
  local level, eid = string.match(member, '^(%d+):(.+)$')
  if not level then
    return nil
  end
  local sk = stream_key(level)
  local e = redis.call('XRANGE', sk, eid, eid)
  redis.call('XACK', sk, GROUP, eid)
  redis.call('XDEL', sk, eid)
  redis.call('ZREM', K_LEASES, member)
  if #e == 0 then
    return nil
  end
  return parse_entry(e[1][2])
end

-- Promotes due delayed jobs and takes back expired leases.
local function maintain(now, max_attempts)
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
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, MAINTAIN_BATCH)
  for _, member in ipairs(expired) do
    local m = take_leased(member)
    if m then
      m.a = tostring(tonumber(m.a) + 1)
      if tonumber(m.a) >= max_attempts then
        kill(m, 'max attempts (' .. max_attempts .. ') exceeded: lease expired on attempt ' .. m.a ..
          ' (consumer crashed or too slow)', now)
      else
        push_ready(m)
      end
    end
  end
  return #expired
end

-- A lease is valid while its member is in the lease set with a future expiry.
local function lease_valid(member, now)
  local score = redis.call('ZSCORE', K_LEASES, member)
  return score and tonumber(score) > now
end

