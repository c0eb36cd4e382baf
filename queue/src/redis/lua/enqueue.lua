-- ARGV: prefix, capacity (0 = unbounded), priority levels, dedup window ms,
-- enqueue time ms (the client's clock), job count, then per job: id, level, delay ms,
-- idempotency key ('' = none), payload, headers, deadline ms ('' = none),
-- and the entry's meta field, built by the client.
-- Answers one string per job: '' when enqueued, the first job's id for a
-- duplicate, '!' when full (and stops there). Flat, to keep the reply cheap.
local capacity = tonumber(ARGV[2])
local levels = tonumber(ARGV[3])
local dedup_ms = tonumber(ARGV[4])
local now = ARGV[5]
local n = tonumber(ARGV[6])
-- The server's clock, read only if a job is delayed.
local server_now = nil
local stream_keys = {}
-- How many more jobs fit; nil when unbounded. It may be negative (a
-- replay or a lowered bound left the queue over capacity): then none fit.
local room = nil
if capacity > 0 then
  -- Jobs held: every stream entry (acked entries are deleted at once, so
  -- these are ready or leased) and every delayed job.
  local held = redis.call('ZCARD', K_DELAYED)
  for level = 0, levels - 1 do
    held = held + redis.call('XLEN', stream_key(level))
  end
  room = capacity - held
end
local added = 0
local out = {}
for i = 0, n - 1 do
  local b = 7 + i * 8
  local id, level, delay_ms, idem = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2]), ARGV[b + 3]
  local existing = false
  if idem ~= '' then
    existing = redis.call('GET', prefix .. ':idem:' .. idem)
  end
  if existing then
    out[#out + 1] = existing
  elseif room and added >= room then
    out[#out + 1] = '!'
    break
  else
    if idem ~= '' then
      redis.call('SET', prefix .. ':idem:' .. idem, id, 'PX', dedup_ms)
    end
    added = added + 1
    local h, d = ARGV[b + 5], ARGV[b + 6]
    if delay_ms > 0 then
      server_now = server_now or now_ms()
      push_delayed({id = id, p = ARGV[b + 4], h = h, a = '0', t = now, r = level, d = d}, server_now + delay_ms)
    elseif h == '' and d == '' then
      -- The common case, without building a table or a string.
      local sk = stream_keys[level]
      if not sk then
        sk = stream_key(level)
        stream_keys[level] = sk
      end
      redis.call('XADD', sk, '*', 'm', ARGV[b + 7], 'p', ARGV[b + 4])
    else
      push_ready({id = id, p = ARGV[b + 4], h = h, a = '0', t = now, r = level, d = d})
    end
    out[#out + 1] = ''
  end
end
return out
