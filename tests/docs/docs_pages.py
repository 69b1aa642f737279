"""Reads the ```python fences of the documentation and the ``docs-test`` markers around them.

The conventions are described in ``tests/docs/test_examples.py``; this module only parses.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: the servers a page may name with ``<!-- docs-test: server=NAME -->``
SERVERS = ("redis", "postgresql", "mariadb", "rabbitmq", "dynamodb")
#: directives that concern the whole page, and those that concern the next fence
PAGE_DIRECTIVES = ("server", "files-from")
FENCE_DIRECTIVES = ("skip", "file")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")
_MARKER = re.compile(r"^[ \t]*<!--[ \t]*docs-test:(?P<body>.*?)-->[ \t]*$")
_SKIP = re.compile(r"^skip[ \t]*\((?P<reason>.+)\)$")


class MarkerError(ValueError):
    """A ``docs-test`` marker that does not parse: fails the page rather than being ignored."""


@dataclasses.dataclass(frozen=True)
class Fence:
    page: Path
    #: 1-based line of the first line of code (the line after the opening fence)
    line: int
    code: str
    #: ``skip (reason)``: the reason; None when the fence runs
    skip: str | None = None
    #: ``file=NAME``: the fence is that file's content, written to the working directory
    file: str | None = None
    #: False for another language's fence, collected only for its ``file=``
    python: bool = True

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclasses.dataclass
class Page:
    path: Path
    fences: list[Fence]
    servers: list[str]
    #: pages whose ``file=`` fences are written to this page's working directory first
    files_from: list[Path]

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))


def doc_paths() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _directives(body: str, where: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for part in (p.strip() for p in body.split(";")):
        if not part:
            continue
        skip = _SKIP.match(part)
        if skip:
            found.append(("skip", skip.group("reason").strip()))
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name == "skip":
            raise MarkerError(f"{where}: `skip` needs a reason: <!-- docs-test: skip (why) -->")
        if name not in PAGE_DIRECTIVES + FENCE_DIRECTIVES or not eq or not value:
            raise MarkerError(f"{where}: unknown docs-test directive {part!r}")
        found.append((name, value))
    return found


def parse(path: Path, text: str | None = None) -> Page:
    """Every ```python fence of one Markdown file, in order, with the markers that apply."""
    lines = (path.read_text() if text is None else text).splitlines()
    fences: list[Fence] = []
    servers: list[str] = []
    files_from: list[Path] = []
    pending: list[tuple[str, str]] = []  # fence directives waiting for their fence
    i = 0
    while i < len(lines):
        where = f"{path.relative_to(ROOT) if path.is_absolute() else path}:{i + 1}"
        marker = _MARKER.match(lines[i])
        opening = _FENCE.match(lines[i])
        if marker:
            for name, value in _directives(marker.group("body"), where):
                if name == "server":
                    for server in (s.strip() for s in value.split(",")):
                        if server not in SERVERS:
                            raise MarkerError(f"{where}: unknown server {server!r} ({SERVERS})")
                        servers.append(server)
                elif name == "files-from":
                    files_from.append((path.parent / value).resolve())
                else:
                    pending.append((name, value))
            i += 1
            continue
        if opening is None:
            if lines[i].strip() and pending:
                raise MarkerError(f"{where}: a fence marker must come right before its fence")
            i += 1
            continue
        indent, ticks = opening.group("indent"), opening.group("ticks")
        info = opening.group("info").lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(ticks) and closing.strip(ticks[0]) == "":
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        options = dict(pending)
        python = info in ("python", "py", "python3")
        if python or (options and set(options) == {"file"}):
            fences.append(
                Fence(
                    path,
                    i + 2,
                    textwrap.dedent("\n".join(body)) + "\n",
                    skip=options.get("skip"),
                    file=options.get("file"),
                    python=python,
                )
            )
        elif pending:
            raise MarkerError(f"{where}: only `file=` applies to a fence that is not ```python")
        pending = []
        i = j + 1
    if pending:
        raise MarkerError(f"{path}: a docs-test marker at the end of the page has no fence")
    return Page(path, fences, servers, files_from)
