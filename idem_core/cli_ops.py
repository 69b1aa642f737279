"""``idem inspect | ls | stuck | release | forget``: the operators' commands.

Each opens the store by URL, does one thing and prints plain lines, or one JSON object per
line with ``--json``. ``ls`` and ``stuck`` stream: a line is printed as soon as its page has
arrived, and the process holds one page of records (``stuck``: plus the N it keeps).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from .events import Emitter
from .operate import (
    RecordNotFound,
    describe,
    forget,
    inspect,
    release,
    scan,
    scanner,
    stuck,
)
from .record import MICROS, Record, Status
from .registry import open_store
from .scanning import DEFAULT_PAGE, ScanFilter

COMMANDS = ("inspect", "ls", "stuck", "release", "forget")

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d``, ``500ms`` as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30s, 10m, 2h, 1d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show one record: status, fence, lease, times, result")
    p.add_argument("url")
    p.add_argument("key", help="the stored key (Idempotency.key_of computes it)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = sub.add_parser(
        "ls",
        help="list records, streamed a page at a time (DynamoDB and Redis: a full scan, paged)",
    )
    p.add_argument("url")
    p.add_argument("--status", choices=[s.value for s in Status])
    p.add_argument("--older-than", type=duration, help="last written before now minus this")
    p.add_argument(
        "--created-before", type=duration, metavar="AGE", help="created before now minus AGE"
    )
    p.add_argument("--prefix", default="", help="stored keys starting with this")
    p.add_argument("--limit", type=_positive)
    p.add_argument("--page-size", type=_positive, default=DEFAULT_PAGE)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser(
        "stuck", help="records in progress whose lease lapsed and nobody took over, oldest first"
    )
    p.add_argument("url")
    p.add_argument("--prefix", default="")
    p.add_argument("--limit", type=_positive, default=100, help="keep the N oldest (100)")
    p.add_argument("--page-size", type=_positive, default=DEFAULT_PAGE)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser(
        "release", help="release a claim so the next call runs (lapsed, or the named fence)"
    )
    p.add_argument("url")
    p.add_argument("key")
    p.add_argument("--fence", type=int, help="release this live claim (from idem inspect)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("forget", help="delete records whatever their state")
    p.add_argument("url")
    p.add_argument("keys", nargs="+", metavar="key")
    p.add_argument("--json", action="store_true")


def _emitter(key: str) -> Emitter:
    # The namespace is the stored key's first part (idem_core.keys).
    return Emitter(key.split(":", 1)[0], [])


def _line(info: Any) -> str:
    lease = info.lease or "-"
    if info.lease_expires_at is not None:
        lease += f" until {info.lease_expires_at:%Y-%m-%d %H:%M:%S}"
    return (
        f"{info.key}  {info.status}  fence={info.fence}  lease={lease}  "
        f"updated={info.updated_at:%Y-%m-%d %H:%M:%S}  expires={info.expires_at:%Y-%m-%d %H:%M:%S}"
    )


def _print_record(rec: Record, now: int, as_json: bool, out: Any) -> None:
    info = describe(rec, now)
    if as_json:
        data = info.to_json()
        data.pop("result", None)
        print(json.dumps(data), file=out)
    else:
        print(_line(info), file=out)


def run(args: argparse.Namespace, out: Any = None, err: Any = None) -> int:
    # Looked up now, not at import: tests and callers may have replaced them since.
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    store = open_store(args.url)
    try:
        return _COMMAND[args.command](store, args, out, err)
    finally:
        store.close()


def _inspect(store: Any, args: argparse.Namespace, out: Any, err: Any) -> int:
    info = inspect(store, args.key)
    if args.json:
        print(json.dumps(info.to_json()), file=out)
        return 0
    for name, value in info.to_json().items():
        print(f"{name}: {value}", file=out)
    return 0


def _note_full_scan(store: Any, err: Any) -> None:
    note = getattr(store, "scan_note", None)
    if note:
        print(f"note: {note}", file=err)


def _ls(store: Any, args: argparse.Namespace, out: Any, err: Any) -> int:
    scanner(store)  # says so at once when the store cannot list
    now = store.now()  # and a store that does not answer fails before the note
    _note_full_scan(store, err)
    where = ScanFilter(
        status=None if args.status is None else Status(args.status),
        prefix=args.prefix,
        updated_before=None if args.older_than is None else now - int(args.older_than * MICROS),
        created_before=(
            None if args.created_before is None else now - int(args.created_before * MICROS)
        ),
        alive_at=now,
    )
    # Flushed once a page has been printed (and at the end), not per line.
    for count, rec in enumerate(scan(store, where, args.limit, args.page_size), 1):
        _print_record(rec, now, args.json, out)
        if count % args.page_size == 0:
            out.flush()
    out.flush()
    return 0


def _stuck(store: Any, args: argparse.Namespace, out: Any, err: Any) -> int:
    scanner(store)
    found, now = stuck(store, args.limit, args.prefix, args.page_size)
    _note_full_scan(store, err)
    for rec in found:
        _print_record(rec, now, args.json, out)
    if not found and not args.json:
        print("no stuck records", file=out)
    return 0


def _release(store: Any, args: argparse.Namespace, out: Any, err: Any) -> int:
    info = release(store, args.key, args.fence, _emitter(args.key))
    if args.json:
        print(json.dumps(info.to_json()), file=out)
    else:
        print(f"released {args.key} (fence {info.fence}): the next call runs again", file=out)
    return 0


def _forget(store: Any, args: argparse.Namespace, out: Any, err: Any) -> int:
    for key in args.keys:
        existed = forget(store, key, _emitter(key))
        if args.json:
            print(json.dumps({"key": key, "forgotten": existed}), file=out)
        else:
            print(f"forgot {key}" if existed else f"{key}: no record (nothing to forget)", file=out)
    return 0


_COMMAND = {
    "inspect": _inspect,
    "ls": _ls,
    "stuck": _stuck,
    "release": _release,
    "forget": _forget,
}

__all__ = ["COMMANDS", "RecordNotFound", "add_parsers", "duration", "run"]
