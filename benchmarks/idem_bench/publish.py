"""Put a committed run into the docs: ``python -m idem_bench.publish benchmarks/results/DATE``.

Copies the run's plots to ``docs/img/bench/`` and replaces everything from the
``### The figures`` heading of ``docs/benchmarks.md`` to its end with the run's ``report.md``
(headings one level down, plot paths pointing at the copies). The prose above that heading is
written by hand and says which run it describes.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

MARKER = "### The figures"


def figures_section(report: str) -> str:
    """``report.md`` as the docs' figures section."""
    lines = report.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]  # the report's title: the docs have their own
    out = [MARKER]
    for line in lines:
        if line.startswith("#"):
            line = "##" + line
        out.append(re.sub(r"!\[([^]]*)\]\(([^)/]+\.png)\)", r"![\1](img/bench/\2)", line))
    return "\n".join(out).rstrip() + "\n"


def publish(run: Path, docs: Path) -> None:
    page = docs / "benchmarks.md"
    text = page.read_text()
    if MARKER not in text:
        raise SystemExit(f"{page} has no {MARKER!r} heading to replace from")
    images = docs / "img" / "bench"
    images.mkdir(parents=True, exist_ok=True)
    for plot in sorted(run.glob("*.png")):
        shutil.copyfile(plot, images / plot.name)
    head = text[: text.index(MARKER)]
    page.write_text(head + figures_section((run / "report.md").read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idem_bench.publish", description=__doc__)
    parser.add_argument("run", type=Path, help="a run folder written by idem bench --out")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    publish(args.run, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
