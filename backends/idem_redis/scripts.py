"""The Lua scripts: one per transition, each touching exactly one key (Cluster-safe).

A record is one string value, laid out as :mod:`.records` describes: a fixed binary header
(kind, fence, lease end, expiry, created, updated, two lengths) that the scripts read and
write with Lua's ``struct`` library, then the ids, the result and the steps, which they copy
as opaque bytes. A script does one ``GET``, one ``SET`` with the key's expiry (``PXAT``) and
nothing else on the hot path: no loops, no string formatting of numbers, no JSON.

Each script reads the server's clock (``TIME``; Redis 7 replicates a script's effects, not
the script, so a non-deterministic read is allowed) and implements only the *write condition*
of :mod:`idem_core.machine` (``takeable`` for claims, ``holds`` for the others) and the fence
rule. It returns the server time and the record it found, and Python hands both to the
machine's functions to decide the outcome, so the rules are written once.

Replies, as arrays: ``[applied, now, head?]`` where ``applied`` is 1 when the script wrote,
and ``head`` is the record *before* the write (absent when there was none): its header and
ids, and its result where the caller needs it (a replay, a failed complete), never its steps.

A key holding a record of the earlier layout (a hash, :data:`.records.LEGACY_FIELDS`) is
converted in place by the first script that reads it (``legacy``), keeping its expiry; a
hash that is not such a record, or a value of another type, raises ``IDEMCORRUPT`` and is
left as it is.
"""

from __future__ import annotations

import hashlib

from .records import COMPLETED, HEADER, IN_PROGRESS, LUA_HEADER

# Every script starts here: the clock, then the record, read with one GET (a key of the
# earlier layout answers WRONGTYPE and is converted in place first). No helper functions:
# a closure is made on every run of a script, and costs more than the inlined lines.
_PRELUDE = f"""
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local key = KEYS[1]
local H = {HEADER.size}
local FMT = '{LUA_HEADER}'
local v = redis.pcall('GET', key)
if type(v) == 'table' then
  if redis.call('TYPE', key)['ok'] ~= 'hash' then
    return redis.error_reply('IDEMCORRUPT not a record (another type) at ' .. key)
  end
  local h = redis.call('HGETALL', key)
  local m, steps = {{}}, {{}}
  for i = 1, #h, 2 do
    local name, x = h[i], h[i + 1]
    if string.sub(name, 1, 2) == 't:' then
      local at = string.find(x, ':', 1, true)
      local b = at and tonumber(string.sub(x, 1, at - 1))
      if b == nil then return redis.error_reply('IDEMCORRUPT a bad step in record ' .. key) end
      local n, data = string.sub(name, 3), string.sub(x, at + 1)
      steps[#steps + 1] = struct.pack('<H', #n) .. n .. struct.pack('<i8I4', b, #data) .. data
    else
      m[name] = x
    end
  end
  local kind = ({{i = {IN_PROGRESS}, c = {COMPLETED}}})[m.s or '']
  local nf, nl, ne = tonumber(m.f), tonumber(m.l), tonumber(m.e)
  local nc, nu = tonumber(m.c), tonumber(m.u)
  if not (kind and m.p and m.a and nf and nl and ne and nc and nu) then
    return redis.error_reply('IDEMCORRUPT a field is missing or not a number in record ' .. key)
  end
  local r = ''
  if kind == {COMPLETED} then r = m.r or '' end
  local ids = struct.pack('<BI4', 0, #m.p) .. m.p .. m.a
  v = struct.pack(FMT, kind, nf, nl, ne, nc, nu, #ids, #r) .. ids .. r .. table.concat(steps)
  redis.call('SET', key, v, 'KEEPTTL')
end
local k, f, l, e, c, u, il, rl
if v then
  if #v < H then return redis.error_reply('IDEMCORRUPT a value too short at ' .. key) end
  k, f, l, e, c, u, il, rl = struct.unpack(FMT, v)
  if (k ~= {IN_PROGRESS} and k ~= {COMPLETED}) or #v < H + il + rl then
    return redis.error_reply('IDEMCORRUPT a value of another layout at ' .. key)
  end
end
"""

# The record before the write: header and ids (+ result), never the steps.
_FOUND = """
if not v then return {{{applied}, now}} end
return {{{applied}, now, string.sub(v, 1, H + il{result})}}
"""


def found(applied: int, result: bool) -> str:
    return _FOUND.format(applied=applied, result=" + rl" if result else "")


HELD = f"""
if not (v and k == {IN_PROGRESS} and f == tonumber(ARGV[1]) and l ~= 0 and e > now) then
"""

# ARGV: ids (records.ids), lease_us, life_us (= micros(max(lease, ttl)))
CLAIM = f"""
local fence, tail = now, ''
if v then
  -- not takeable: live, and completed or leased
  if e > now and (k ~= {IN_PROGRESS} or l > now) then
    return {{0, now, string.sub(v, 1, H + il + rl)}}
  end
  fence = math.max(now, f + 1)
  -- A takeover or a claim after a release keeps the steps so the successor resumes;
  -- an expired record goes whole.
  if e > now then tail = string.sub(v, H + il + rl + 1) end
end
local x = now + ARGV[3]
local head = struct.pack(FMT, {IN_PROGRESS}, fence, now + ARGV[2], x, now, now, #ARGV[1], 0)
redis.call('SET', key, head .. ARGV[1] .. tail, 'PXAT', math.ceil(x / 1000))
""" + found(1, result=False)

# ARGV: fence, result, ttl_us
COMPLETE = (
    HELD
    + found(0, result=True)
    + f"""end
local x = now + ARGV[3]
redis.call('SET', key,
  struct.pack(FMT, {COMPLETED}, f, l, x, c, now, il, #ARGV[2]) .. string.sub(v, H + 1, H + il)
    .. ARGV[2] .. string.sub(v, H + il + rl + 1),
  'PXAT', math.ceil(x / 1000))
redis.call(PUBLISH, key, 'c')
"""
    + found(1, result=False)
)

# ARGV: fence
RELEASE = (
    HELD
    + found(0, result=False)
    + """end
redis.call('SET', key, struct.pack(FMT, k, f, 0, e, c, now, il, rl) .. string.sub(v, H + 1),
  'KEEPTTL')
redis.call(PUBLISH, key, 'r')
return {1, now}
"""
)

# ARGV: fence, lease_us
RENEW = (
    HELD
    + found(0, result=False)
    + """end
local nl = now + ARGV[2]
local x = math.max(e, nl)
redis.call('SET', key, struct.pack(FMT, k, f, nl, x, c, now, il, rl) .. string.sub(v, H + 1),
  'PXAT', math.ceil(x / 1000))
"""
    + found(1, result=False)
)

GET = found(0, result=True)

# Without the prelude: a corrupt value can be deleted.
DELETE = """
local key = KEYS[1]
redis.call('DEL', key)
redis.call(PUBLISH, key, 'd')
return 1
"""


class Script:
    """A script's text for one flavour of server, and its SHA1 for EVALSHA."""

    __slots__ = ("name", "sha", "text")

    def __init__(self, name: str, body: str, publish: str, prelude: bool = True) -> None:
        self.name = name
        # The channel of a key is the key's own name: it hashes to the key's slot, which a
        # script's SPUBLISH on Redis Cluster requires.
        self.text = ((_PRELUDE if prelude else "") + body).replace(
            "redis.call(PUBLISH,", f"redis.call('{publish}',"
        )
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
        self.delete = Script("delete", DELETE, publish, prelude=False)


STANDALONE = Scripts(cluster=False)
CLUSTER = Scripts(cluster=True)


def vars_of(scripts: Scripts) -> list[Script]:
    return [getattr(scripts, name) for name in Scripts.__slots__]
