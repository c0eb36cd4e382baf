-- ARGV: prefix, capacity (0 = unbounded), dedup window ms, job count, then per
-- job: id, level, delay ms, idempotency key ('' = none), payload, headers,
-- deadline ms ('' = none).
-- Answers one {status, id} per job, stopping after the first 'full'.
local capacity = tonumber(ARGV[2])
local dedup_ms = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local now = tostring(now_ms())
local room = -1
if capacity > 0 then
  room = capacity - tonumber(redis.call('GET', K_SIZE) or '0')
end
local added = 0
local out = {}
for i = 0, n - 1 do
  local b = 5 + i * 7
  local id, level, delay_ms, idem = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2]), ARGV[b + 3]
  local existing = false
  if idem ~= '' then
    existing = redis.call('GET', prefix .. ':idem:' .. idem)
  end
  if existing then
    out[#out + 1] = {'dup', existing}
  elseif room >= 0 and added >= room then
    out[#out + 1] = {'full', ''}
    break
  else
    if idem ~= '' then
      redis.call('SET', prefix .. ':idem:' .. idem, id, 'PX', dedup_ms)
    end
    added = added + 1
    local h, d = ARGV[b + 5], ARGV[b + 6]
    if delay_ms > 0 then
      push_delayed({id = id, p = ARGV[b + 4], h = h, a = '0', t = now, r = level, d = d}, tonumber(now) + delay_ms)
    elseif h == '' and d == '' then
      -- The common case, without building a table.
      redis.call('XADD', stream_key(level), '*', 'm', id .. '|0|' .. now .. '|' .. level, 'p', ARGV[b + 4])
    else
      push_ready({id = id, p = ARGV[b + 4], h = h, a = '0', t = now, r = level, d = d})
    end
    out[#out + 1] = {'ok', id}
  end
end
if added > 0 then
  redis.call('INCRBY', K_SIZE, added)
end
return out
