"""The scripts of the previous record layout (one hash per key), verbatim from idem-core
before the lean layout: the tests use them to write records exactly as a running older
version would, then check that the current store reads, converts and keeps them."""

from __future__ import annotations

from typing import Any

import redis

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local key = KEYS[1]
local function fmt(x) return string.format('%.0f', x) end
local function num(x)
  local v = tonumber(x)
  if v == nil then
    return error({err = 'IDEMCORRUPT field is not a number in record ' .. key})
  end
  return v
end
local function expire_at(e)
  redis.call('PEXPIREAT', key, fmt(math.ceil(e / 1000)))
end
local FIELDS = {'s', 'p', 'f', 'l', 'e', 'a', 'c', 'u'}
local function read()
  local cur = redis.call('HMGET', key, unpack(FIELDS))
  if not cur[1] then
    if redis.call('EXISTS', key) == 1 then
      return error({err = 'IDEMCORRUPT record without a status at ' .. key})
    end
    return nil
  end
  if cur[1] ~= 'i' and cur[1] ~= 'c' then
    return error({err = 'IDEMCORRUPT unknown status in record ' .. key})
  end
  return cur
end
local function holds(cur, fence)
  return cur ~= nil and cur[1] == 'i' and cur[3] == fence
    and num(cur[4]) ~= 0 and num(cur[5]) > now
end
local function reply(applied, cur, with_result)
  local out = {applied, now}
  if cur ~= nil then
    for i = 1, 8 do out[i + 2] = cur[i] end
    if with_result then out[11] = redis.call('HGET', key, 'r') end
  end
  return out
end
"""

# ARGV: fingerprint, attempt, lease_us, life_us (= micros(max(lease, ttl)))
CLAIM = """
local cur = read()
local fence = now
if cur ~= nil then
  -- takeable: expired, or in progress with a lapsed (or released) lease
  if num(cur[5]) > now and (cur[1] ~= 'i' or num(cur[4]) > now) then
    return reply(0, cur, true)
  end
  fence = math.max(now, num(cur[3]) + 1)
end
local e = now + tonumber(ARGV[4])
-- An expired record goes whole; a takeover or a claim after a release keeps the steps
-- (the ``t:`` fields, see steps.py) so the successor resumes.
if cur ~= nil and num(cur[5]) <= now then redis.call('DEL', key) end
redis.call('HSET', key, 's', 'i', 'p', ARGV[1], 'f', fmt(fence),
  'l', fmt(now + tonumber(ARGV[3])), 'e', fmt(e), 'a', ARGV[2], 'c', fmt(now), 'u', fmt(now))
expire_at(e)
return reply(1, cur, false)
"""

# ARGV: fence, result, ttl_us
COMPLETE = """
local cur = read()
if not holds(cur, ARGV[1]) then
  return reply(0, cur, true)
end
local e = now + tonumber(ARGV[3])
redis.call('HSET', key, 's', 'c', 'e', fmt(e), 'u', fmt(now), 'r', ARGV[2])
expire_at(e)
redis.call(PUBLISH, key, 'c')
return reply(1, cur, false)
"""

# ARGV: fence
RELEASE = """
local cur = read()
if not holds(cur, ARGV[1]) then
  return reply(0, cur, false)
end
redis.call('HSET', key, 'l', '0', 'u', fmt(now))
redis.call(PUBLISH, key, 'r')
return reply(1, nil, false)
"""

# ARGV: fence, lease_us
RENEW = """
local cur = read()
if not holds(cur, ARGV[1]) then
  return reply(0, cur, false)
end
local l = now + tonumber(ARGV[2])
local e = math.max(num(cur[5]), l)
redis.call('HSET', key, 'l', fmt(l), 'e', fmt(e), 'u', fmt(now))
expire_at(e)
return reply(1, cur, false)
"""

GET = """
return reply(0, read(), true)
"""

# ARGV: fence, name, data, until
RECORD_STEP = """
local cur = read()
if not holds(cur, ARGV[1]) then
  return reply(0, cur, false)
end
redis.call('HSET', key, 't:' .. ARGV[2], ARGV[4] .. ':' .. ARGV[3])
return reply(1, nil, false)
"""


def run(client: redis.Redis | redis.RedisCluster, body: str, key: str, *args: Any) -> Any:
    """Run one of the old scripts on ``key`` (its reply: ``[applied, now, fields...]``)."""
    text = (_PRELUDE + body).replace("redis.call(PUBLISH,", "redis.call('PUBLISH',")
    return client.eval(text, 1, key, *args)
