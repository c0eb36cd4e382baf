-- ack / nack / extend on leases.
-- ARGV: prefix, action, then:
--   'ack', n, then n triples level, entry id, receipt expiry ms -> {acked, invalid}
--   'retry', level, entry id, after ms, reason, max attempts   -> {status}
--   'dead', level, entry id, reason                            -> {status}
--   'release', level, entry id                                 -> {status}
--   'extend', level, entry id, lease ms                        -> {status}
--   'unread', level, id before the first, entry ids...         -> {status}
--   'reject', reason, (level, entry id)...                     -> {dead-lettered}
local action = ARGV[2]
local now = now_ms()
if action == 'ack' then
  -- A receipt whose expiry (taken from the server clock just before the
  -- read) is still ahead is live if its entry is pending: XACK tells. An
  -- entry id is delivered only once, and anything that takes an entry back
  -- (nack, lease reclaim) deletes it, so XDEL after XACK is safe for every
  -- id. Older receipts may have had their lease extended: those check the
  -- pending list.
  local n = tonumber(ARGV[3])
  local by_level = {}
  for i = 0, n - 1 do
    local b = 4 + i * 3
    local level, eid = ARGV[b], ARGV[b + 1]
    if tonumber(ARGV[b + 2]) > now or live_lease(stream_key(level), eid) then
      local eids = by_level[level]
      if not eids then
        eids = {}
        by_level[level] = eids
      end
      eids[#eids + 1] = eid
    end
  end
  local acked = 0
  for level, eids in pairs(by_level) do
    local sk = stream_key(level)
    acked = acked + redis.call('XACK', sk, GROUP, unpack(eids))
    redis.call('XDEL', sk, unpack(eids))
  end
  return {acked, n - acked}
end

if action == 'unread' then
  -- ARGV after the action: level, the id just before the first entry, then
  -- the entries (ascending) a read took past what it could hand out.
  local sk = stream_key(ARGV[3])
  local entries = {}
  for i = 5, #ARGV do
    entries[#entries + 1] = ARGV[i]
  end
  if last_delivered(sk) == entries[#entries] then
    -- Nobody read after them: forget the deliveries and rewind the group,
    -- so they are read again in their place.
    redis.call('XACK', sk, GROUP, unpack(entries))
    redis.call('XGROUP', 'SETID', sk, GROUP, ARGV[4])
    redis.call('XADD', K_WAKE, 'MAXLEN', 1, '*', 'w', '1')
    return {'rewound'}
  end
  -- Others read on since: back to the tail, untried.
  for _, eid in ipairs(entries) do
    local m = take(sk, eid)
    if m then
      push_ready(m)
    end
  end
  return {'released'}
end

if action == 'reject' then
  -- ARGV after the action: the reason, then pairs of level and entry id
  -- just read by the caller and not deliverable (past their deadline, or
  -- not a job this library wrote). No lease check: the reader holds them.
  local n = 0
  for i = 4, #ARGV, 2 do
    local level, eid = ARGV[i], ARGV[i + 1]
    local m = take(stream_key(level), eid)
    if m then
      m.id, m.a, m.t, m.r, m.p = m.id or eid, m.a or '0', m.t or '0', m.r or level, m.p or ''
      kill(m, ARGV[3], now)
      n = n + 1
    end
  end
  return {n}
end

local sk, eid = stream_key(ARGV[3]), ARGV[4]
if not live_lease(sk, eid) then
  return {'invalid'}
end
if action == 'extend' then
  -- Moves the entry to the lease class of the new length and restarts its
  -- idle clock (JUSTID: the delivery count stays).
  redis.call('XCLAIM', sk, GROUP, ARGV[5], 0, eid, 'JUSTID')
  return {'ok'}
end
local m = take(sk, eid)
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
  kill(m, ARGV[5], now)
  return {'dead'}
end
-- retry
local after = tonumber(ARGV[5])
local max_attempts = tonumber(ARGV[7])
if tonumber(m.a) >= max_attempts then
  kill(m, 'max attempts (' .. max_attempts .. ') exceeded: ' .. ARGV[6], now)
  return {'dead'}
end
if after > 0 then
  push_delayed(m, now + after)
else
  push_ready(m)
end
return {'retry'}
