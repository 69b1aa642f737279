"""The documentation's examples run: every ```python fence of README.md and docs/**/*.md.

CONTRIBUTING: writing examples that run
=======================================

Each page is one test. Its ```python fences run in order in one namespace (a fresh module per
page), the way a reader pastes them into one file, in a temporary working directory, with
``IDEM_URL=memory://`` set. A failure names the page and the line of the fence that failed;
tracebacks point at the Markdown lines themselves.

- **Self-contained.** A page defines what it uses (``Receipt``, ``idem``...). Show what a reader
  must add; never rely on another page's namespace.
- **Assert what the prose claims.** If the text says the second call replays, the example ends
  with ``assert`` lines that check it (a counter that stays 1, ``call.replayed``).
- **Rerunnable.** The suite runs several times in a row on the same servers, and other tests
  share them: on a real server use fresh keys (``uuid.uuid4()``) or names, create what a fresh
  server lacks (``store.setup()``, ``CREATE TABLE IF NOT EXISTS``) and close what you open.
  Never flush or drop shared data.
- **Servers.** A page that needs a real server says so once, anywhere on the page (conventionally
  under its title), as an HTML comment (invisible in the built site)::

      <!-- docs-test: server=redis -->            (several: server=redis,rabbitmq)

  Known servers: ``redis`` 127.0.0.1:6379, ``postgresql`` postgres@127.0.0.1:5432/test,
  ``mariadb`` root@127.0.0.1:3306/test, ``rabbitmq`` guest/guest 127.0.0.1:5672, and
  ``dynamodb``: moto's server, started by the test on a free port and reached through
  ``AWS_ENDPOINT_URL_DYNAMODB`` (boto3 reads it; fake credentials and ``us-east-1`` are set),
  so examples keep the plain ``dynamodb://TABLE?region=...`` URLs. A missing server skips the
  page loudly, and fails it under ``CI=true``.
- **Files.** ``<!-- docs-test: file=NAME -->`` right before a fence (blank lines allowed in
  between) writes the fence to ``NAME`` in the working directory instead of running it (a second
  fence with the same name appends), so later fences can ``import`` it or run it; it also works
  on a fence of another language (a ``pyproject.toml`` for the tests, say). Written files
  named ``test_*.py`` are run with pytest in a subprocess once the page's fences have run, and
  must pass. ``<!-- docs-test: files-from=OTHER.md -->`` (a path relative to the page) first
  writes the ``file=`` fences of another page (except its ``test_*.py``), e.g. a handler that
  a testing page tests.
- **Opting out** (rare: pseudo-code, a fragment of a bigger file): ``<!-- docs-test: skip
  (reason) -->`` right before the fence. Skipped fences are counted and reported; keep
  ``MAX_SKIPS`` at the number there really are (today: none). Non-Python examples (shell, TOML,
  console sessions) use their own fence language and are not run.
"""

from __future__ import annotations

import subprocess
import sys
import traceback
import types
import uuid
import warnings
from pathlib import Path

import pytest
from docs_pages import ROOT, Fence, Page, doc_paths, parse

#: deliberate fragments among the documentation's ```python fences
MAX_SKIPS = 0

PAGES = [parse(path) for path in doc_paths()]
RUNNABLE = [page for page in PAGES if page.fences]


class ExampleFailed(Exception):
    pass


def run_page(page: Page, workdir: Path) -> list[Fence]:
    """Run one page's fences in order in one fresh module; return the skipped fences.

    Raises ExampleFailed naming the fence's line on the first failure."""
    skipped: list[Fence] = []
    written: list[Path] = []
    for other in page.files_from:
        for fence in parse(other).fences:
            if fence.file and not fence.file.startswith("test_"):  # that page runs its tests
                _write(workdir / fence.file, fence, [])
    name = f"docs_example_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    module.__file__ = str(workdir / f"{name}.py")
    sys.modules[name] = module
    sys.path.insert(0, str(workdir))
    try:
        for fence in page.fences:
            if fence.skip is not None:
                skipped.append(fence)
                continue
            if not fence.python:
                _write(workdir / str(fence.file), fence, written)
                continue
            try:
                # Padding keeps the Markdown's line numbers: tracebacks quote the page itself.
                code = compile("\n" * (fence.line - 1) + fence.code, str(fence.page), "exec")
                if fence.file is not None:  # checked for syntax; run when imported or tested
                    _write(workdir / fence.file, fence, written)
                    continue
                exec(code, module.__dict__)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                trace = "".join(traceback.format_exception(exc))
                raise ExampleFailed(
                    f"{fence.where}: the example starting at line {fence.line} raised "
                    f"{type(exc).__name__}: {exc}\n\n{trace}"
                ) from exc
        tests = [path for path in written if path.name.startswith("test_")]
        if tests:
            _pytest(page, workdir, tests)
    finally:
        _close_leftovers(module)
        sys.path.remove(str(workdir))
        for mod_name, mod in list(sys.modules.items()):
            file = getattr(mod, "__file__", None) or ""
            if mod_name == name or file.startswith(str(workdir)):
                del sys.modules[mod_name]
    return skipped


def _close_leftovers(module: types.ModuleType) -> None:
    """Close what a page left open (its connections would otherwise warn at garbage
    collection, during some later test); a page should close what it opens, as a script
    would at exit."""
    from idem_core import Idempotency

    for value in list(vars(module).values()):
        if isinstance(value, Idempotency):
            try:
                value.close()
            except Exception as exc:  # e.g. closed twice: the page's own close() came first
                warnings.warn(f"closing {value!r} after the page: {exc!r}", stacklevel=1)


def _write(path: Path, fence: Fence, written: list[Path]) -> None:
    with path.open("a" if path in written else "w") as out:
        out.write(fence.code)
    if path not in written:
        written.append(path)


def _pytest(page: Page, workdir: Path, tests: list[Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, tests)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if proc.returncode != 0:
        names = ", ".join(p.name for p in tests)
        raise ExampleFailed(
            f"{page.name}: pytest on the page's {names} exited {proc.returncode}\n"
            f"{proc.stdout}\n{proc.stderr}"
        )


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IDEM_URL", "memory://")
    return tmp_path


@pytest.mark.parametrize(
    ("page", "docs_servers"),
    [pytest.param(page, page.servers, id=page.name) for page in RUNNABLE],
    indirect=["docs_servers"],
)
def test_page_examples_run(
    page: Page, docs_servers: dict[str, str], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in docs_servers.items():
        monkeypatch.setenv(key, value)
    try:
        skipped = run_page(page, workdir)
    except ExampleFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    for fence in skipped:
        warnings.warn(f"docs example NOT RUN: {fence.where} ({fence.skip})", stacklevel=1)


def test_skipped_examples_are_counted() -> None:
    skipped = [f"{f.where} ({f.skip})" for page in PAGES for f in page.fences if f.skip]
    print(f"{len(skipped)} documentation example(s) not run:", *skipped, sep="\n  ")
    assert len(skipped) <= MAX_SKIPS, f"more examples opt out than MAX_SKIPS allows: {skipped}"


def test_every_page_with_code_is_collected() -> None:
    names = {page.name for page in RUNNABLE}
    assert "README.md" in names
    assert "docs/usage.md" in names
    assert sum(f.python for page in PAGES for f in page.fences) >= 25


# -- the collector itself ----------------------------------------------------------------------


def _fake_page(tmp_path: Path, text: str) -> Page:
    path = ROOT / "docs" / "_fake.md"  # parse() never reads it: the text is given
    page = parse(path, text)
    assert page.path == path
    return page


def test_a_failing_block_names_its_line(tmp_path: Path, workdir: Path) -> None:
    text = "# t\n\n```python\nx = 1\n```\n\nprose\n\n```python\n\nassert x == 2, 'x is 1'\n```\n"
    page = _fake_page(tmp_path, text)
    with pytest.raises(ExampleFailed) as info:
        run_page(page, workdir)
    message = str(info.value)
    assert "docs/_fake.md:10: the example starting at line 10 raised AssertionError" in message
    assert 'docs/_fake.md", line 11' in message  # the traceback quotes the Markdown's line


def test_fences_share_one_namespace_and_markers_apply(tmp_path: Path, workdir: Path) -> None:
    text = (
        "<!-- docs-test: server=redis -->\n"
        "```python\nimport json\n```\n"
        "<!-- docs-test: file=helper.py -->\n\n"
        "```python\nVALUE = 41\n```\n"
        "<!-- docs-test: skip (pseudo-code) -->\n"
        "```python\nthis is not python\n```\n"
        "```sh\nnot python either\n```\n"
        "<!-- docs-test: file=notes.txt -->\n```text\nkept as a file\n```\n"
        "```python\nimport helper\nassert json.loads(str(helper.VALUE + 1)) == 42\n```\n"
    )
    page = _fake_page(tmp_path, text)
    assert page.servers == ["redis"]
    assert [f.skip for f in page.fences] == [None, None, "pseudo-code", None, None]
    skipped = run_page(page, workdir)
    assert [f.line for f in skipped] == [12]
    assert (workdir / "notes.txt").read_text() == "kept as a file\n"
    assert "helper" not in sys.modules  # the page's own modules are forgotten afterwards


@pytest.mark.parametrize(
    "text",
    [
        "<!-- docs-test: skip -->\n```python\nx\n```\n",
        "<!-- docs-test: server=oracle -->\n",
        "<!-- docs-test: serverr=redis -->\n",
        "<!-- docs-test: file=a.py -->\nprose\n```python\nx\n```\n",
        "<!-- docs-test: skip (shell) -->\n```sh\nls\n```\n",
    ],
)
def test_bad_markers_are_refused(tmp_path: Path, text: str) -> None:
    from docs_pages import MarkerError

    with pytest.raises(MarkerError):
        _fake_page(tmp_path, text)
