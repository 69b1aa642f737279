"""Steps (:mod:`idem_core.steps`) on Redis: fields of the record's own hash.

Step ``name`` is the field ``t:<name>`` of the record's hash, holding ``<until>:<data>``. Being
in the record's key, a step is written by one script on one key (one hash slot on a Cluster),
under the same ``holds`` condition as ``complete``, and goes with the key: on expiry, on
``delete``, and when a claim replaces an expired record. A takeover or a claim after a release
keeps the fields (the claim script only deletes an expired record), so the successor resumes.
"""

from __future__ import annotations

from typing import Any

from idem_core import machine
from idem_core.errors import CorruptRecord

from . import common
from .common import translate
from .scripts import Script

# ARGV: fence, name, data, until
_RECORD = """
local cur = read()
if not holds(cur, ARGV[1]) then
  return reply(0, cur, false)
end
redis.call('HSET', key, 't:' .. ARGV[2], ARGV[4] .. ':' .. ARGV[3])
return reply(1, nil, false)
"""

_LOAD = """
local all = redis.call('HGETALL', key)
local out = {}
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) == 't:' then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
"""

assert "PUBLISH" not in _RECORD + _LOAD  # so one text serves standalone and Cluster

RECORD = Script("record_step", _RECORD, "PUBLISH")
LOAD = Script("load_steps", _LOAD, "PUBLISH")


def record_args(fence: int, name: str, data: bytes, until: int) -> tuple[str, str, bytes, str]:
    return str(fence), name, bytes(data), str(until)


def record_result(key: str, fence: int, reply: Any) -> None:
    applied, now, found = common._split(key, reply)
    if not applied:
        machine.after_failed_renew(found, key, fence, now)  # raises LeaseLost


def load_result(key: str, reply: Any) -> dict[str, tuple[int, bytes]]:
    if not isinstance(reply, list | tuple) or len(reply) % 2:
        raise CorruptRecord(f"unexpected steps reply for key {key!r}: {reply!r}")
    steps: dict[str, tuple[int, bytes]] = {}
    for i in range(0, len(reply), 2):
        field, value = reply[i], reply[i + 1]
        try:
            name = (field.decode() if isinstance(field, bytes) else str(field))[2:]
            raw = value if isinstance(value, bytes) else str(value).encode()
            until, _, data = raw.partition(b":")
            steps[name] = (int(until), data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptRecord(f"a step of the Redis record {key!r} is corrupt: {exc}") from exc
    return steps


def record_step(store: Any, key: str, fence: int, name: str, data: bytes, until: int) -> None:
    common.check_size(key, data, store.max_result_size)
    with translate("record_step", store._budget):
        reply = store._run(RECORD, store._k(key), *record_args(fence, name, data, until))
    record_result(key, fence, reply)


def load_steps(store: Any, key: str) -> dict[str, tuple[int, bytes]]:
    with translate("load_steps", store._budget):
        reply = store._run(LOAD, store._k(key))
    return load_result(key, reply)


async def arecord_step(
    store: Any, key: str, fence: int, name: str, data: bytes, until: int
) -> None:
    common.check_size(key, data, store.max_result_size)
    with translate("record_step", store._budget):
        reply = await store._run(RECORD, store._k(key), *record_args(fence, name, data, until))
    record_result(key, fence, reply)


async def aload_steps(store: Any, key: str) -> dict[str, tuple[int, bytes]]:
    with translate("load_steps", store._budget):
        reply = await store._run(LOAD, store._k(key))
    return load_result(key, reply)
