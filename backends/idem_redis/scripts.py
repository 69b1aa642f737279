"""The Lua scripts: one per transition, each touching exactly one key (Cluster-safe).

A record is one hash; its fields are single letters to keep every reply short:

====  ======================  ==========================================
s     status                  ``i`` (in progress) or ``c`` (completed)
p     fingerprint
f     fence                   decimal integer
l     lease_expires_at        microseconds; ``0`` once released
e     expires_at              microseconds; the key's own expiry follows it
a     attempt
c     created_at
u     updated_at
r     result                  present once completed
====  ======================  ==========================================

Each script reads the server's clock (``TIME``; Redis 7 replicates a script's effects, not
the script, so a non-deterministic read is allowed) and implements only the *write condition*
of :mod:`idem_core.machine` (``takeable`` for claims, ``holds`` for the others) and the fence
rule. It returns the server time and the record it found, and Python hands both to the
machine's functions to decide the outcome, so the rules are written once.

Replies, as arrays: ``[applied, now, s, p, f, l, e, a, c, u, r?]`` where ``applied`` is 1
when the script wrote, and the record fields are those *before* the write (absent when there
was no record). Numbers travel as integers in replies; in the hash they are written with
``%.0f`` because Lua's default number formatting keeps only 14 significant digits.
"""

from __future__ import annotations

import hashlib

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

DELETE = """
redis.call('DEL', key)
redis.call(PUBLISH, key, 'd')
return 1
"""


class Script:
    """A script's text for one flavour of server, and its SHA1 for EVALSHA."""

    __slots__ = ("name", "sha", "text")

    def __init__(self, name: str, body: str, publish: str) -> None:
        self.name = name
        # The channel of a key is the key's own name: it hashes to the key's slot, which a
        # script's SPUBLISH on Redis Cluster requires.
        self.text = (_PRELUDE + body).replace("redis.call(PUBLISH,", f"redis.call('{publish}',")
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()


class Scripts:
    __slots__ = ("claim", "complete", "delete", "get", "release", "renew")

    def __init__(self, cluster: bool) -> None:
        publish = "SPUBLISH" if cluster else "PUBLISH"
        self.claim = Script("claim", CLAIM, publish)
        self.complete = Script("complete", COMPLETE, publish)
        self.release = Script("release", RELEASE, publish)
        self.renew = Script("renew", RENEW, publish)
        self.get = Script("get", GET, publish)
        self.delete = Script("delete", DELETE, publish)


STANDALONE = Scripts(cluster=False)
CLUSTER = Scripts(cluster=True)


def vars_of(scripts: Scripts) -> list[Script]:
    return [getattr(scripts, name) for name in Scripts.__slots__]
