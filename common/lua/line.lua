-- A provider's line (common/limits.py): the jobs its workers hold but have not started, in fair-queue
-- order. Only the head may start. Whoever changes the head publishes the new head's id on the wake
-- channel, so only the head keeps a timer.
--
-- A *key block* (P:lim:keyblock: API key -> until, ms) marks an API key whose own limits are full: its
-- jobs keep their places, but the turn passes over them to the first job of another key. With no key
-- limits configured (L.keyed false) nothing is blocked and the head is simply the first job.
--
-- A line is a table: {line, vt, owner, keyof, blocks, keyed, wake, job_prefix, proc_prefix}; a
-- script fills in only the keys it uses. Looking for the head reads the job hash and the worker
-- heartbeat of the members it passes (job_prefix .. id, proc_prefix .. proc): which members those
-- are is only known inside the script.

local SCAN = 200   -- at most this many blocked jobs are passed over in one look at a line

local function block_of(L, member, now)
  local k = redis.call('HGET', L.keyof, member)
  if not k then return 0 end
  local u = tonumber(redis.call('HGET', L.blocks, k) or '0')
  if u > now then return u end
  return 0
end

local function first_unblocked(L, now)
  if not L.keyed then return redis.call('ZRANGE', L.line, 0, 0)[1] end
  for _, m in ipairs(redis.call('ZRANGE', L.line, 0, SCAN - 1)) do
    if block_of(L, m, now) == 0 then return m end
  end
  return nil
end

local function wake_head(L, now)
  local head = first_unblocked(L, now)
  if head then redis.call('PUBLISH', L.wake, head) end
end

local function drop(L, member)
  redis.call('ZREM', L.line, member)
  redis.call('HDEL', L.owner, member)
  redis.call('HDEL', L.keyof, member)
end

-- Take a job out of the line; a job that leaves from the head hands the turn on.
local function line_leave(L, job_id, now)
  local was_head = first_unblocked(L, now) == job_id
  drop(L, job_id)
  if was_head then wake_head(L, now) end
end

-- Join the line once: start-time fair queueing, tag = max(V, the key's last tag) + 1/weight. A job
-- back after an upstream 429 (rewait) goes to the head: it already had its turn.
local function line_join(L, job_id, key, weight, proc, rewait)
  local V = tonumber(redis.call('HGET', L.vt, 'V') or '0')
  if not redis.call('ZSCORE', L.line, job_id) then
    local tag
    if rewait then
      tag = V - 1e-6
    else
      local last = tonumber(redis.call('HGET', L.vt, 'k:' .. key) or '0')
      tag = math.max(V, last) + 1 / weight
      redis.call('HSET', L.vt, 'k:' .. key, tag)
    end
    redis.call('ZADD', L.line, tag, job_id)
  end
  redis.call('HSET', L.owner, job_id, proc)
  if L.keyed then redis.call('HSET', L.keyof, job_id, key) end
end

-- A member may start only while it still waits: queued (or re-waiting, running) and its worker alive.
local function is_waiting(L, member)
  local state = redis.call('HGET', L.job_prefix .. member, 'state')
  if state ~= 'queued' and state ~= 'running' then return false end
  local proc = redis.call('HGET', L.owner, member)
  return proc and redis.call('EXISTS', L.proc_prefix .. proc) == 1
end

-- nil if job_id is the head; else {'wait', rank, wait_ms}. Drops the members no longer waiting that
-- it passes (withdrawn, expired, or their worker died), and wakes the new head if it dropped any.
local function line_turn(L, job_id, now)
  local head, first_blocked
  local dropped, i = false, 0
  for _ = 1, SCAN do
    local m = redis.call('ZRANGE', L.line, i, i)[1]
    if m == nil then break end
    if m ~= job_id and not is_waiting(L, m) then
      drop(L, m)
      dropped = true
    elseif L.keyed and block_of(L, m, now) > 0 then
      first_blocked = first_blocked or m
      i = i + 1
    else
      head = m
      break
    end
  end
  if head == job_id then return nil end
  if dropped and head then redis.call('PUBLISH', L.wake, head) end
  local wait = 0
  -- the first job of a blocked key keeps a timer for when its key's block ends
  if first_blocked == job_id then wait = block_of(L, job_id, now) - now end
  return {'wait', redis.call('ZRANK', L.line, job_id), wait}
end

-- The head starts: it leaves the line, the virtual clock advances to its tag, the next head is woken.
local function line_admit(L, job_id, now)
  local tag = tonumber(redis.call('ZSCORE', L.line, job_id))
  if tag > tonumber(redis.call('HGET', L.vt, 'V') or '0') then redis.call('HSET', L.vt, 'V', tag) end
  drop(L, job_id)
  wake_head(L, now)
end

-- An API key at its own quota: block it until `till`, and pass the turn to another key's job.
local function line_block_key(L, key, till, now)
  redis.call('HSET', L.blocks, key, till)
  redis.call('PEXPIRE', L.blocks, 2 * 86400000)   -- no block lasts longer than a day
  wake_head(L, now)
end
