"""Operators' tools (issue 15), run the same way on every store's real server.

A store's test module gives a store URL, the open store and a ``load(records)`` that writes
records in bulk in the store's own format (pipelines, ``executemany``, batch writes). The
scenarios then drive ``Idempotency.key_of/inspect/release/forget`` and the ``idem`` commands
against 10,000 records: ``ls`` filters and streams, ``stuck`` returns the oldest lapses first.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from idem_core import Idempotency, Record, Status
from idem_core.cli import main
from idem_core.events import Event, EventKind
from idem_core.operate import RecordNotFound, ReleaseRefused
from idem_core.scanning import ScanFilter

S = 1_000_000
N_COMPLETED, N_STUCK, N_LIVE, N_RELEASED = 6000, 3000, 990, 10
TOTAL = N_COMPLETED + N_STUCK + N_LIVE + N_RELEASED  # 10,000

Loader = Callable[[Sequence[Record]], None]


def bulk_records(head: str, now: int) -> list[Record]:
    """10,000 records under ``head``: completed (``c``), lapsed leases (``s``: ``s00000``
    lapsed first), live leases (``l``) and released claims (``r``)."""
    out: list[Record] = []

    def rec(key: str, status: Status, lease: int, created: int) -> Record:
        return Record(
            key=f"{head}{key}",
            status=status,
            fingerprint="0" * 32,
            fence=created,
            lease_expires_at=lease,
            expires_at=now + 3600 * S,
            attempt=f"bulk-{key}",
            created_at=created,
            updated_at=created,
            result=b"\x01\xc0" if status is Status.COMPLETED else None,
        )

    for i in range(N_COMPLETED):
        out.append(rec(f"c{i:05d}", Status.COMPLETED, 0, now - 7200 * S + i))
    for i in range(N_STUCK):
        lapse = now - 60 * S - (N_STUCK - i) * 1000  # s00000 lapsed the longest ago
        out.append(rec(f"s{i:05d}", Status.IN_PROGRESS, lapse, lapse - 30 * S))
    for i in range(N_LIVE):
        out.append(rec(f"l{i:05d}", Status.IN_PROGRESS, now + 600 * S, now - i))
    for i in range(N_RELEASED):
        out.append(rec(f"r{i:05d}", Status.IN_PROGRESS, 0, now - 10 * S - i))
    return out


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def api_scenario(store: Any) -> None:
    """key_of, inspect (decoded and raw), release (refused over a live lease, allowed with
    the fence or once lapsed) and forget, with their events."""
    events: list[Event] = []
    idem = Idempotency(store, namespace=f"ops{uuid.uuid4().hex[:8]}", on_event=events.append)
    ran: list[str] = []

    @idem.idempotent(key="order_id", lease=0.5)
    def pay(order_id: str, amount: int) -> dict[str, int]:
        ran.append(order_id)
        return {"amount": amount}

    key = idem.key_of(pay, "42", amount=7)
    assert key == idem.key_of(pay, order_id="42", amount=7) == idem.key_of(pay, "42", 7)
    assert key.startswith(f"{idem.namespace}:") and key.endswith(":42")
    pay("42", 7)
    info = idem.inspect(key, dict[str, int])
    assert (info.status, info.lease, info.result) == ("completed", None, {"amount": 7})
    assert info.created_at.tzinfo is not None and info.expires_at > info.read_at
    raw = idem.inspect(key)
    assert isinstance(raw.result, bytes)
    with pytest.raises(ReleaseRefused, match="completed"):
        idem.release(key)
    assert idem.forget(key) is True
    assert [e.kind for e in events if e.key == key][-1] is EventKind.FORGOTTEN
    with pytest.raises(RecordNotFound):
        idem.inspect(key)
    pay("42", 7)
    assert ran == ["42", "42"]  # forgotten: ran again, deliberately

    # A claim held by a "crashed" worker: a live lease is never released without its fence.
    call = idem.claim("job", scope="ops", lease=0.5).__enter__()
    job = idem.key_for("job", scope="ops")
    assert job == call.key
    with pytest.raises(ReleaseRefused, match="live lease"):
        idem.release(job)
    with pytest.raises(ReleaseRefused, match="not 1"):
        idem.release(job, fence=1)
    released = idem.release(job, fence=call.fence)
    assert released.lease == "released"
    assert [e.kind for e in events if e.key == job][-1] is EventKind.RELEASED_BY_OPERATOR
    # Claimed again, then left to lapse: released without naming the fence.
    again = idem.claim("job", scope="ops", lease=0.3).__enter__()
    time.sleep(0.6)
    assert idem.inspect(job).lease == "lapsed"
    assert idem.release(job).fence == again.fence
    with pytest.raises(ReleaseRefused, match="already released"):
        idem.release(job)
    assert idem.forget(job) is True
    assert idem.forget(job) is False


def bulk_scenario(
    url: str,
    store: Any,
    load: Loader,
    capsys: pytest.CaptureFixture[str],
    head: str,
    page: int = 250,
    thorough: bool = True,
) -> None:
    """10,000 records: ``ls`` (filters, limit, JSON, streaming by page), ``stuck``,
    ``inspect``, ``release`` and ``forget`` through the command line. ``thorough=False``
    leaves out the listings that only repeat a filter (for servers where each full listing
    takes half a minute: moto)."""
    now = store.now()
    load(bulk_records(head, now))

    # The scan holds at most one page: 10,000 records come in pages of at most ``page``.
    pages = [len(p) for p in store.scan(ScanFilter(prefix=head), page)]
    assert max(pages) <= page and len(pages) >= TOTAL // page and sum(pages) == TOTAL

    size = ("--page-size", str(page))
    code, out, err = cli(capsys, "ls", url, "--prefix", head, "--json", *size)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    assert len(rows) == TOTAL and len({r["key"] for r in rows}) == TOTAL, out[-2000:]
    if thorough:
        code, out, err = cli(capsys, "ls", url, "--prefix", head, "--status", "completed", *size)
        assert code == 0, err
        assert len(out.splitlines()) == N_COMPLETED, out[-2000:]
        code, out, err = cli(
            capsys,
            "ls",
            url,
            "--prefix",
            head,
            "--status",
            "in_progress",
            "--older-than",
            "1h",
            *size,
        )
        assert code == 0, err
        assert out == "", out[-2000:]
    code, out, err = cli(capsys, "ls", url, "--prefix", f"{head}s", "--older-than", "1m", *size)
    assert code == 0, err
    assert len(out.splitlines()) == N_STUCK, out[-2000:]
    code, out, err = cli(capsys, "ls", url, "--prefix", head, "--limit", "7")
    assert code == 0, err
    assert len(out.splitlines()) == 7, out[-2000:]

    code, out, err = cli(capsys, "stuck", url, "--prefix", head, "--limit", "5", "--json", *size)
    stuck = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    assert [r["key"] for r in stuck] == [f"{head}s{i:05d}" for i in range(5)], out[-2000:]
    assert all(r["lease"] == "lapsed" for r in stuck)
    if thorough:
        code, out, err = cli(capsys, "stuck", url, "--prefix", head, "--limit", "20000", *size)
        assert code == 0, err
        assert len(out.splitlines()) == N_STUCK, out[-2000:]

    first = f"{head}s00000"
    code, out, err = cli(capsys, "inspect", url, first, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "in_progress", out[-2000:]
    code, out, err = cli(capsys, "release", url, f"{head}l00000")
    assert code == 2 and "live lease" in err and err.count("\n") == 1 and not out
    code, out, err = cli(capsys, "release", url, first)
    assert code == 0, err
    assert "released" in out, out[-2000:]
    code, out, err = cli(capsys, "stuck", url, "--prefix", head, "--limit", "1", "--json", *size)
    assert json.loads(out)["key"] == f"{head}s00001"
    live = store.get(f"{head}l00001")
    code, out, err = cli(capsys, "release", url, live.key, "--fence", str(live.fence), "--json")
    assert code == 0, err
    assert json.loads(out)["lease"] == "released", out[-2000:]
    code, out, err = cli(capsys, "forget", url, f"{head}c00000", f"{head}nope", "--json")
    assert code == 0, err
    assert [json.loads(x)["forgotten"] for x in out.splitlines()] == [True, False], out[-2000:]
    code, out, err = cli(capsys, "inspect", url, f"{head}c00000")
    assert code == 1 and "no record" in err and err.count("\n") == 1


def errors_scenario(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing key and a wrong option are one line each, no traceback."""
    code, _, err = cli(capsys, "inspect", url, f"absent-{uuid.uuid4().hex}")
    assert code == 1 and "no record" in err and "Traceback" not in err
    code, _out, err = cli(capsys, "release", url, f"absent-{uuid.uuid4().hex}")
    assert code == 1 and err.count("\n") == 1


async def async_api_scenario(idem: Idempotency) -> None:
    """``ainspect``/``arelease``/``aforget`` on the async store: the same rules."""
    ran: list[str] = []

    @idem.idempotent(key="order_id")
    async def pay(order_id: str) -> int:
        ran.append(order_id)
        return 5

    order = uuid.uuid4().hex[:8]
    key = idem.key_of(pay, order)
    await pay(order)
    info = await idem.ainspect(key, int)
    assert (info.status, info.result) == ("completed", 5)
    with pytest.raises(ReleaseRefused, match="completed"):
        await idem.arelease(key)
    assert await idem.aforget(key) is True
    with pytest.raises(RecordNotFound):
        await idem.ainspect(key)
    await pay(order)
    assert ran == [order, order]
    async with idem.aclaim(f"job-{order}", scope="ops", lease=30) as call:
        job = call.key
        with pytest.raises(ReleaseRefused, match="live lease"):
            await idem.arelease(job)
        assert (await idem.arelease(job, fence=call.fence)).lease == "released"
        assert await idem.aforget(job) is True
