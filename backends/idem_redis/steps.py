"""Steps (:mod:`idem_core.steps`) on Redis: entries at the end of the record's own value.

Step ``name`` is an entry appended to the record's value (:func:`.records.step_entry`: the
name, ``until`` and the data); an entry written again (a retried write) counts as the last
one. Being in the record's key, a step is written by one script on one key (one hash slot
on a Cluster), under the same ``holds`` condition as ``complete``, and goes with the key: on
expiry, on ``delete``, and when a claim replaces an expired record. A takeover or a claim
after a release keeps the entries (the claim script copies them), and so does ``complete``.
"""

from __future__ import annotations

from typing import Any

from idem_core import machine
from idem_core.errors import CorruptRecord

from . import common, records
from .common import translate
from .scripts import HELD, Script, found

# ARGV: fence, entry (records.step_entry). APPEND keeps the key's expiry.
_RECORD = (
    HELD
    + found(0, result=False)
    + """end
redis.call('APPEND', key, ARGV[2])
return {1, now}
"""
)

_LOAD = """
if not v then return '' end
return string.sub(v, H + il + rl + 1)
"""

assert "PUBLISH" not in _RECORD + _LOAD  # so one text serves standalone and Cluster

RECORD = Script("record_step", _RECORD, "PUBLISH")
LOAD = Script("load_steps", _LOAD, "PUBLISH")


def record_args(fence: int, name: str, data: bytes, until: int) -> tuple[str, bytes]:
    return str(fence), records.step_entry(name, until, bytes(data))


def record_result(key: str, fence: int, reply: Any) -> None:
    applied, now, current = common._split(key, reply)
    if not applied:
        machine.after_failed_renew(current, key, fence, now)  # raises LeaseLost


def load_result(key: str, reply: Any) -> dict[str, tuple[int, bytes]]:
    if not isinstance(reply, bytes):
        raise CorruptRecord(f"unexpected steps reply for key {key!r}: {reply!r}")
    return records.decode_steps(key, reply)


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
