-- The live job's state machine (common/jobs.py). The only Lua that reads or writes a job hash's
-- 'state': the plain claim (claim.lua) and the limited admission (acquire.lua) both start a job
-- with job_check + job_start, so the queued -> running claim exists once.
--
--   queued --job_start--> running --job_settle--> succeeded | failed | cancelled
--     |                    ^ (lease lapsed: its worker died) job_start again on redelivery
--     +--job_check after the deadline--> expired       (the worker never calls upstream)
--     +--withdraw--> expired | cancelled               (the API gave up waiting / the caller left)
--     +--job_check, its API process dead--> cancelled  (a sync caller nobody can answer)
--   running (lease lapsed) --job_check, abandoned or API process dead--> cancelled  (never run again)
--   running --job_requeue (its own execution)--> queued on another deployment's queue (move.lua)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function stamp(ms) return string.format('%.6f', ms / 1000) end

-- A sync job's caller is gone when its API process's heartbeat (the reply channel's name + ':alive',
-- api/dispatcher.py) lapsed: nobody would read the answer. Async jobs (no reply channel) never are.
local function caller_gone(job)
  local reply_to = redis.call('HGET', job, 'reply_to')
  if not reply_to or reply_to == '' then return false end
  return redis.call('EXISTS', reply_to .. ':alive') == 0
end

local function settle_unrun(job, now)
  redis.call('HSET', job, 'state', 'cancelled', 'finished_at', stamp(now))
  budget_settle(job, '0', '0')
  return 'orphaned'
end

-- Why a delivered job may not start now: nil if it may; else 'missing', 'expired' (it was queued
-- past its deadline: moved to expired here), 'busy' (running, its worker's lease alive),
-- 'orphaned' (moved to cancelled here: its caller was answered without it — 'abandoned' — or its
-- API process died) or the terminal state it is in. Second value: the attempt a dead worker lost
-- (running, lease lapsed), else 0 — whoever re-claims the job records it (attempt_lost).
local function job_check(job, lease, now)
  local state = redis.call('HGET', job, 'state')
  if not state then return 'missing', 0 end
  if state == 'queued' then
    if now > tonumber(redis.call('HGET', job, 'deadline')) * 1000 then
      redis.call('HSET', job, 'state', 'expired', 'finished_at', stamp(now))
      budget_settle(job, '0', '0')
      return 'expired', 0
    end
    if caller_gone(job) then return settle_unrun(job, now), 0 end
    return nil, 0
  end
  if state == 'running' then
    if redis.call('EXISTS', lease) == 1 then return 'busy', 0 end
    -- its worker died: it runs again as the next attempt, unless nobody can use a second run
    local lost = tonumber(redis.call('HGET', job, 'attempts') or '0')
    if redis.call('HEXISTS', job, 'abandoned') == 1 or caller_gone(job) then
      return settle_unrun(job, now), lost
    end
    return nil, lost
  end
  return state, 0
end

-- Start a job job_check let through: running, one more attempt, our lease, and `holder` = the worker
-- process (its heartbeat P:lim:proc:<holder>) that holds the delivery (workers/leases.py reads it).
-- -> attempt, queue wait (s)
local function job_start(job, lease, execution, lease_ms, now, holder)
  if redis.call('HGET', job, 'state') == 'queued' then
    redis.call('HSET', job, 'state', 'running', 'started_at', stamp(now))
  end
  if holder and holder ~= '' then redis.call('HSET', job, 'holder', holder) end
  local attempt = redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('SET', lease, execution, 'PX', lease_ms)
  local created = tonumber(redis.call('HGET', job, 'created_at'))
  return attempt, string.format('%.6f', now / 1000 - created)
end

-- Settle a running (or still queued) job into a final state and drop our lease; false if it was
-- settled already (then nothing else may be emitted for it).
local function job_settle(job, lease, state, execution, now)
  local current = redis.call('HGET', job, 'state')
  if current and current ~= 'running' and current ~= 'queued' then return false end
  redis.call('HSET', job, 'state', state, 'finished_at', stamp(now))
  if redis.call('GET', lease) == execution then redis.call('DEL', lease) end
  return true
end

-- Send a running job back to 'queued' with a new spec (another deployment: common/routing), only by
-- the execution whose lease it holds. It keeps its id, reply_to (its waiting caller), deadline and
-- attempts; false if it is not ours to move (settled, abandoned, or another execution's).
local function job_requeue(job, lease, execution, spec)
  if redis.call('HGET', job, 'state') ~= 'running' then return false end
  if redis.call('GET', lease) ~= execution then return false end
  if redis.call('HEXISTS', job, 'abandoned') == 1 then return false end
  redis.call('HSET', job, 'state', 'queued', 'spec', spec)
  redis.call('DEL', lease)
  return true
end
