"""Publishing a run into the docs page."""

from __future__ import annotations

from pathlib import Path

from idem_bench.publish import MARKER, publish


def test_publish_replaces_the_figures_and_copies_the_plots(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# idem bench: x\n\n## Versions\n\n- a\n\n![p.png](p.png)\n")
    (run / "p.png").write_bytes(b"\x89PNG")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text(f"# Benchmarks\n\nprose\n\n{MARKER}\n\nold figures\n")
    publish(run, docs)
    page = (docs / "benchmarks.md").read_text()
    assert page.startswith("# Benchmarks\n\nprose\n\n")
    assert "old figures" not in page and "idem bench: x" not in page
    assert "#### Versions" in page
    assert "![p.png](img/bench/p.png)" in page
    assert (docs / "img" / "bench" / "p.png").read_bytes() == b"\x89PNG"
