"""The benchmark harness itself: well-formed results on memory://, and race scenarios that
catch a store breaking the fence and lease rules."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from idem_bench import cli, latency, races, report, rigs
from idem_bench.targets import Target

from idem_core import machine
from idem_core.memory import MemoryStore
from idem_core.record import ClaimRequest, ClaimResult, Record

MEMORY = Target("memory", "memory://", "memory")
QUICK = latency.Settings(
    concurrency=(1, 4), latency_seconds=0.15, cell_seconds=0.1, max_ops=2000, warmup=3
)


def _check_cells(scenarios: dict[str, Any], sync: bool = False) -> None:
    expected = {"first", "replay", "conflict", "claim_many", "steps"}
    pinned = scenarios.pop("first_one_cpu", None)
    if sync and latency.one_cpu() is not None:
        # the sync first calls again, every thread on one CPU
        assert pinned is not None and pinned.pop("cpu") == min(latency.one_cpu() or ())
        scenarios = {**scenarios, "first_one_cpu": pinned}
        expected.add("first_one_cpu")
    assert set(scenarios) == expected
    for cells in scenarios.values():
        assert set(cells) == {"1", "4"}
        for cell in cells.values():
            assert "error" not in cell, cell
            assert cell["ops"] > 0
            assert cell["throughput"] > 0
            assert cell["cpu_us"] > 0  # the client's CPU per call
            ps = [cell[f"p{p:g}_us"] for p in latency.PERCENTILES] + [cell["max_us"]]
            assert all(p > 0 for p in ps)
            assert ps == sorted(ps)
    cdf = scenarios["first"]["1"]["cdf"]
    assert [p for p, _ in cdf] == list(latency.CDF_POINTS)


def test_sync_section_on_memory_is_well_formed() -> None:
    scenarios, counts = latency.sync_section(
        lambda tag, counting: rigs.ours_sync(MEMORY, tag, counting),
        rigs.run_tag(),
        QUICK,
        latency.Progress(),
        "memory",
    )
    _check_cells(scenarios, sync=True)
    # claim + complete on a first call, one claim on a replay, on a conflict and per batch
    assert counts["first"]["store_ops"] == 2
    assert counts["replay"]["store_ops"] == 1
    assert counts["conflict"]["store_ops"] == 1
    assert counts["claim_many"]["store_ops"] == 1
    # claim, one read of the recorded steps, a record per step, complete
    assert counts["steps"]["store_ops"] == 3 + rigs.STEPS


def test_sync_cells_on_one_cpu_run_every_thread_there() -> None:
    cpus = latency.one_cpu()
    if cpus is None:
        pytest.skip("this process may run on one CPU only: there is nothing to choose")
    before = os.sched_getaffinity(0)
    seen: set[frozenset[int]] = set()
    cell = latency.sync_cell(
        lambda i: seen.add(frozenset(os.sched_getaffinity(0))), 4, 0.05, 400, False, cpus
    )
    assert cell["ops"] > 0 and seen == {frozenset(cpus)}
    assert os.sched_getaffinity(0) == before  # the caller's thread is left where it was


def test_async_section_on_memory_is_well_formed() -> None:
    scenarios, counts = asyncio.run(
        latency.async_section(
            lambda tag, counting: rigs.ours_async(MEMORY, tag, counting),
            rigs.run_tag(),
            QUICK,
            latency.Progress(),
            "memory",
        )
    )
    _check_cells(scenarios)
    assert counts["first"]["store_ops"] == 2
    assert counts["replay"]["store_ops"] == 1
    assert counts["steps"]["store_ops"] == 3 + rigs.STEPS


def test_cli_writes_results_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--no-embedded", "--url", "memory://", "--quick", "--out", str(out)]
    argv += ["--scenario", "first", "--scenario", "replay", "--scenario", "zombie"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["versions"]["python"]
    assert results["meta"]["machine"]
    sections = results["latency"]
    assert [(s["target"], s["mode"]) for s in sections] == [("memory", "sync"), ("memory", "async")]
    pinned = {"first_one_cpu"} if latency.one_cpu() is not None else set()
    for section in sections:
        extra = pinned if section["mode"] == "sync" else set()
        assert set(section["scenarios"]) == {"first", "replay", *extra}
    [race] = results["races"]
    assert race["results"]["zombie"]["ok"] is True
    assert race["results"]["zombie"]["zombie_accepted"] == 0
    report = (out / "report.md").read_text()
    assert "## Latency" in report and "## Races" in report
    for png in ("latency_cdf.png", "throughput.png", "races.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FencelessStore(MemoryStore):
    """Broken on purpose: complete() skips the fence check, so a zombie overwrites."""

    def complete(
        self,
        key: str,
        fence: int,
        result: bytes,
        ttl: float,
        *,
        with_items: Sequence[Any] | None = None,
    ) -> Record:
        with self._stripe(key).lock:
            now = self._clock()
            rec = machine.completed(self._records[key], result, ttl, now)
            self._records[key] = rec
            return rec


class LeaselessStore(MemoryStore):
    """Broken on purpose: a claim takes over any in-progress record, live lease or not."""

    def claim(self, request: ClaimRequest) -> ClaimResult:
        with self._stripe(request.key).lock:
            current = self._records.get(request.key)
            if current is not None and current.status.value == "in_progress":
                del self._records[request.key]
        return super().claim(request)


def _spec(store: MemoryStore) -> races.Spec:
    return races.Spec("idem-core", MEMORY, rigs.run_tag(), lease=0.3, store=store)


def test_zombie_race_passes_on_the_reference_store() -> None:
    result = races.zombie(_spec(MemoryStore()))
    assert result["ok"] is True
    assert result["zombie_accepted"] == 0
    assert result["a"] == "lease_lost"
    assert result["final"] == "B"


def test_zombie_race_detects_a_store_that_skips_the_fence_check() -> None:
    result = races.zombie(_spec(FencelessStore()))
    assert result["ok"] is False
    assert result["zombie_accepted"] == 1
    assert result["final"] == "A"
    assert result["consistent"] is False


def test_storm_detects_a_store_that_ignores_live_leases() -> None:
    good = races.storm(_spec(MemoryStore()), keys=10, procs=2, threads=4)
    assert good["ok"] is True and good["keys_not_exactly_once"] == 0
    bad = races.storm(_spec(LeaselessStore()), keys=10, procs=2, threads=4)
    assert bad["ok"] is False
    assert bad["max_executions_per_key"] > 1


@pytest.mark.parametrize("scenario", ["crash", "waiters"])
def test_other_races_run_on_memory(scenario: str) -> None:
    spec = _spec(MemoryStore())
    if scenario == "waiters":
        # The first call holds the key 0.3 s: its lease must outlive that, or a waiter woken
        # at the lease's end rightly takes the key over.
        spec = races.Spec("idem-core", MEMORY, rigs.run_tag(), lease=2.0, store=MemoryStore())
    result = races.run_races(spec, (scenario,))[scenario]
    assert result["ok"] is True, result


def test_peers_report_idem_cores_client_cpu_as_a_multiple_of_theirs() -> None:
    def section(system: str, first: tuple[float, float], replay: tuple[float, float]) -> Any:
        cells = {
            sc: {"1": {"p50_us": p50, "cpu_us": cpu}}
            for sc, (p50, cpu) in (("first", first), ("replay", replay))
        }
        return {"target": "dynamodb", "system": system, "mode": "sync", "scenarios": cells}

    results: dict[str, Any] = {
        "latency": [
            section("idem-core", (900.0, 300.0), (500.0, 120.0)),
            section("powertools", (1000.0, 1200.0), (600.0, 600.0)),
        ]
    }
    report.ratios(results)
    peer = results["latency"][1]
    assert peer["cpu_idem_core_to_peer"] == {"first": 0.25, "replay": 0.2}
    assert peer["to_idem_core"]["first"] == round(1000 / 900, 2)
