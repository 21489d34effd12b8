"""The Redis store's Lua scripts: the store's state machine (absent, claimed, done; and a
publish's begin and finish) run on the server, one key at a time and atomically.

Each script walks KEYS and treats every key on its own (a script runs alone). On a standalone
Redis a whole batch is one call; on Redis Cluster a call carries the keys one master owns
(``redis_shapes.Script.packed``), or one key when slots move; a batch is a pipeline per master.
Times come from the server's clock (``TIME``), so replicas with skewed clocks agree on leases.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
"""


# A key's state is one string, "<done>|<owner>|<lease deadline ms>|<attempt>", with the key's
# TTL as its expiry; a key with failed deliveries (Claim.failures) ends in "<attempt>:<failures>".
# A string costs Redis about a third less CPU per claim and complete than the hash this store
# used before (one GET and one SET ... PX instead of HMGET, HSET and PEXPIRE), and Redis is a
# large share of the CPU of a busy sidecar host. The owner may contain "|"; the pattern takes the
# last two fields as the numbers. A key with no failures reads as it did before failures were
# counted, so only keys with failures need every sidecar sharing the Redis on this version.
_PARSE = """
local function parse(v)
  local d, o, l, a, f = string.match(v, '^(%d)|(.*)|(%d+)|(%d+):?(%d*)$')
  return d, o, tonumber(l), tonumber(a), tonumber(f) or 0
end
local function counts(a, f)
  if f > 0 then return a .. ':' .. f end
  return a
end
"""


# claim_one(key, owner, lease_ms, retention_ms, mode) -> status, attempt, failures. mode is
# ClaimMode: '0' claim, '1' renew (keep the attempt of our own expired claim), '2' redeliver (our
# own claim starts the next attempt, and counts a failure).
_CLAIM_ONE = """
local function claim_one(k, owner, lease, retention, mode)
  local held = '0|' .. owner .. '|' .. string.format('%d', now + lease) .. '|'
  local v = redis.call('GET', k)
  if not v then
    redis.call('SET', k, held .. '1', 'PX', retention)
    return 0, 1, 0
  end
  local done, o, until_ms, attempt, failures = parse(v)
  if done == '1' then return 1, attempt, failures end
  if until_ms > now then
    if o ~= owner then return 2, attempt, failures end
    if mode == '2' then attempt = attempt + 1; failures = failures + 1 end
    redis.call('SET', k, held .. counts(attempt, failures), 'KEEPTTL')
    return 0, attempt, failures
  end
  if mode == '1' and o == owner then
    if attempt < 1 then attempt = 1 end
  else
    attempt = attempt + 1
    if mode == '2' and o == owner then failures = failures + 1 end
  end
  redis.call('SET', k, held .. counts(attempt, failures), 'KEEPTTL')
  if redis.call('PTTL', k) < lease then redis.call('PEXPIRE', k, lease) end
  return 0, attempt, failures
end
"""


# release_one(key, owner, delivered, failed) -> 1 when released. delivered '0' gives the claim's
# attempt back; failed '1' counts a failure. A released claim (lease deadline 0) is not released
# again: its attempt was given back once.
_RELEASE_ONE = """
local function release_one(k, owner, delivered, failed)
  local v = redis.call('GET', k)
  if not v then return 0 end
  local done, o, until_ms, attempt, failures = parse(v)
  if done == '0' and o == owner and until_ms > 0 and (until_ms > now or delivered == '0') then
    if delivered == '0' then
      if attempt > 0 then attempt = attempt - 1 end
    elseif failed == '1' then
      failures = failures + 1
    end
    redis.call('SET', k, '0|' .. o .. '|0|' .. counts(attempt, failures), 'KEEPTTL')
    return 1
  end
  return 0
end
"""


# ARGV owner, lease_ms, retention_ms, mode. Returns status, attempt, failures per key (flat).
CLAIM = (
    _NOW
    + _PARSE
    + _CLAIM_ONE
    + """
local lease = tonumber(ARGV[2])
for _, k in ipairs(KEYS) do
  local status, attempt, failures = claim_one(k, ARGV[1], lease, ARGV[3], ARGV[4])
  out[#out + 1] = status; out[#out + 1] = attempt; out[#out + 1] = failures
end
return out
"""
)


# ARGV owner, retention_ms. Returns per key 0 (in time), -1 (late) or the ms another owner's live
# claim still runs (rules.complete).
COMPLETE = (
    _NOW
    + _PARSE
    + """
for _, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  local done, o, until_ms, attempt, failures = '0', '', 0, 1, 0
  if v then done, o, until_ms, attempt, failures = parse(v) end
  if done == '1' then
    out[#out + 1] = 0
  else
    redis.call('SET', k, '1|' .. ARGV[1] .. '|0|' .. counts(attempt, failures), 'PX', ARGV[2])
    if not v or until_ms <= now then out[#out + 1] = -1
    elseif o ~= ARGV[1] then out[#out + 1] = until_ms - now
    else out[#out + 1] = 0 end
  end
end
return out
"""
)


# ARGV owner, delivered (1, or 0 to give the claim's attempt back), failed (1 counts a failure).
# Returns 1 per key when released.
RELEASE = (
    _NOW
    + _PARSE
    + _RELEASE_ONE
    + """
for _, k in ipairs(KEYS) do
  out[#out + 1] = release_one(k, ARGV[1], ARGV[2], ARGV[3])
end
return out
"""
)


# A publish keeps its claim and then its record under one key: "~<owner>|<lease deadline ms>" while
# claimed (expiring with the lease), then the record (expiring with the retention). Records start
# with their hex digest, never with "~". Two commands per key per step, where a claim in the
# dedup keyspace beside the record cost seven.
#
# publish_state(value) -> the record; or nil, the claim's owner and its lease deadline (all nil
# when the key is absent).
_PUBLISH_STATE = """
local function publish_state(v)
  if not v then return nil end
  if string.sub(v, 1, 1) ~= '~' then return v end
  local o, until_ms = string.match(v, '^~(.*)|(%d+)$')
  return nil, o, tonumber(until_ms)
end
"""


# KEYS publish keys; ARGV owner, lease_ms. Returns per key (flat) 3 and the record when it has
# one, else the claim's status (0 NEW, 2 BUSY) and 1.
PUBLISH_BEGIN = (
    _NOW
    + _PUBLISH_STATE
    + """
local owner, lease = ARGV[1], tonumber(ARGV[2])
local held = '~' .. owner .. '|' .. string.format('%d', now + lease)
for _, k in ipairs(KEYS) do
  local record, o, until_ms = publish_state(redis.call('GET', k))
  if record then
    out[#out + 1] = 3; out[#out + 1] = record
  elseif o and o ~= owner and until_ms > now then
    out[#out + 1] = 2; out[#out + 1] = 1
  else
    redis.call('SET', k, held, 'PX', lease)
    out[#out + 1] = 0; out[#out + 1] = 1
  end
end
return out
"""
)


# KEYS publish keys; ARGV owner, retention_ms, then one record per key ('' when the produce failed).
# Stores each record unless the key has one (first writer wins), else drops the owner's claim.
# Returns per key 1 when it stored the record given, else the key's record ('' for none).
PUBLISH_FINISH = (
    _PUBLISH_STATE
    + """
local out = {}
for i, k in ipairs(KEYS) do
  local record = ARGV[i + 2]
  local stored, o = publish_state(redis.call('GET', k))
  if stored then
    out[i] = stored
  elseif record ~= '' then
    redis.call('SET', k, record, 'PX', ARGV[2])
    out[i] = 1
  else
    if o == ARGV[1] then redis.call('DEL', k) end
    out[i] = ''
  end
end
return out
"""
)
