-- ARGV: prefix, consumer, count, lease ms, max attempts, priority levels.
-- Answers {wake_after_ms, {last ids per level}, {deliveries}}; each delivery
-- is {lease member, raw entry fields}. wake_after_ms is -1 when nothing is scheduled; the last
-- ids (only when nothing was delivered) let the client block with XREAD for
-- entries added after this call.
local consumer = ARGV[2]
local count = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local max_attempts = tonumber(ARGV[5])
local levels = tonumber(ARGV[6])
local now = now_ms()
-- One lease expiry for the whole batch, formatted once (a Lua number passed
-- to redis.call is formatted per argument).
local expiry = string.format('%d', now + lease_ms)
maintain(now, max_attempts)

local function read(sk, want)
  local r = redis.pcall('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', want, 'STREAMS', sk, '>')
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'NOGROUP') then
      -- First use, or the server lost its data (a restart without
      -- persistence): recreate the group and read again.
      redis.call('XGROUP', 'CREATE', sk, GROUP, '0', 'MKSTREAM')
      r = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', want, 'STREAMS', sk, '>')
    else
      return redis.error_reply(r.err)
    end
  end
  if not r then
    return {}
  end
  return r[1][2]
end

local out = {}
local leases = {}
for level = levels - 1, 0, -1 do
  local sk = stream_key(level)
  -- Read again when expired deadlines ate part of a read (bounded).
  for _ = 1, 4 do
    local want = count - #out
    if want <= 0 then
      break
    end
    local entries = read(sk, want)
    local killed = 0
    for _, e in ipairs(entries) do
      local eid, f = e[1], e[2]
      local deadline = entry_deadline(f)
      if deadline and deadline <= now then
        redis.call('XACK', sk, GROUP, eid)
        redis.call('XDEL', sk, eid)
        kill(parse_entry(f), 'deadline exceeded before delivery', now)
        killed = killed + 1
      else
        local member = level .. ':' .. eid
        leases[#leases + 1] = expiry
        leases[#leases + 1] = member
        out[#out + 1] = {member, f}
      end
    end
    -- Only read again when expired jobs took the place of live ones.
    if #entries < want or killed == 0 then
      break
    end
  end
  if #out >= count then
    break
  end
end
if #leases > 0 then
  redis.call('ZADD', K_LEASES, unpack(leases))
end

local wake = -1
local last_ids = {}
if #out == 0 then
  local d = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
  local l = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
  local next_at = nil
  if #d > 0 then next_at = tonumber(d[2]) end
  if #l > 0 and (not next_at or tonumber(l[2]) < next_at) then next_at = tonumber(l[2]) end
  if next_at then
    wake = math.max(next_at - now, 1)
  end
  for level = 0, levels - 1 do
    local info = redis.pcall('XINFO', 'STREAM', stream_key(level))
    local last = '$'
    if type(info) == 'table' and not info.err then
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
          last = info[i + 1]
        end
      end
    end
    last_ids[#last_ids + 1] = last
  end
end
return {tostring(wake), last_ids, out}
