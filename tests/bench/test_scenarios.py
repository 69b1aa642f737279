"""The keyspace, footprint and cold-start scenarios, run small against real servers: the
report's fields exist and are sane (never timing targets)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from idem_bench import cli, coldstart, fill, footprint, keyspace, latency, targets
from idem_bench.targets import Target, port_open
from sqlalchemy import inspect

from idem_core import Idempotency

SMALL = 2000


def _sane_cell(cell: dict[str, Any]) -> None:
    assert "error" not in cell, cell
    assert cell["ops"] > 0
    assert 0 < cell["p50_us"] <= cell["p99_us"] <= cell["max_us"]


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def test_keyspace_fills_measures_and_purges(keyspace_target: Target) -> None:
    result = keyspace.run(keyspace_target, SMALL, seconds=0.1)
    assert "error" not in result, result
    assert result["records"] == SMALL
    assert result["fill"]["seconds"] > 0 and result["fill"]["records_per_s"] > 0
    for phase in ("empty", "full"):
        for scenario in ("first", "replay"):
            _sane_cell(result[phase][scenario])
    if keyspace_target.kind == "redis":
        # N records on a private server the bench started and stopped, not the shared one
        assert result["keys_after_fill"] >= SMALL
        assert "the bench started" in result["server"]
        assert not port_open("127.0.0.1", _port_of(result["server"].rsplit("(", 1)[1]))
        assert "skipped" in result["purge"]
        return
    # the live records, their template and the replay pool
    assert result["rows_after_fill"] >= SMALL + 1
    purge = result["purge"]
    assert "error" not in purge, purge
    assert purge["records"] == SMALL + 1  # the copies and their expired template
    assert purge["records_per_s"] > 0
    _sane_cell(purge["claims"])
    # what is left is live: the copies, the pool, every first call made since the fill
    # (the expired template, counted after the fill, is purged)
    left = result["rows_after_fill"] - 1 + _first_calls(result)
    assert result["rows_after_purge"] == left
    engine = fill.sql_engine(keyspace_target)
    try:
        assert result["table"] not in inspect(engine).get_table_names()  # dropped after
    finally:
        engine.dispose()
    if keyspace_target.database == "sqlite":  # and the file shrunk back
        path = Path(keyspace_target.url.split(":///", 1)[1])
        assert path.stat().st_size < 200 * SMALL


def _first_calls(result: dict[str, Any]) -> int:
    return int(result["full"]["first"]["ops"] + result["purge"]["claims"]["ops"])


def test_fill_finds_no_template_loudly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}?table=t_fill"
    with Idempotency.from_url(url) as idem:
        fill.make_template(idem.store, "tpl", b"x", 60)
        target = Target("sqlite", url, "sql", database="sqlite")
        engine = fill.sql_engine(target)
        try:
            columns, keyed = fill.key_columns(engine, "t_fill", "tpl")
            assert keyed and set(keyed) <= set(columns)
            with pytest.raises(RuntimeError, match="0 rows"):
                fill.key_columns(engine, "t_fill", "absent")
            took = fill.fill_sql(engine, "t_fill", "tpl", "c", 10, (columns, keyed))
            assert took > 0 and fill.count_rows(engine, "t_fill") == 11
            fill.check_sample(idem.store, "c", 10, samples=10)
        finally:
            engine.dispose()


def test_footprint_of_sql_and_redis(keyspace_target: Target) -> None:
    result = footprint.run(keyspace_target, calls=50, disk_rows=500)
    assert "error" not in result, result
    rec = result["record"]
    assert rec["result_bytes"] == 200
    if keyspace_target.kind == "redis":
        assert 200 < rec["bytes"] < 10_000
        assert rec["keys"] and all(k["bytes"] > 0 and k["encoding"] for k in rec["keys"])
        time = result["server_time"]
        assert "RESETSTAT" in time["method"]  # a server of the bench's own
        for phase in ("first", "replay"):
            assert time[phase]["scripts_per_call"] > 0
            assert time[phase]["us_per_script"] > 0
            assert time[phase]["commands"]
        return
    assert 200 < rec["row_bytes"] < 2_000
    assert rec["disk_rows"] == 501
    assert rec["disk_bytes_per_row"] > 200 and rec["index_bytes_per_row"] > 0


def test_redis_server_time_on_a_given_server_never_resets_its_counters(
    redis_target: Target,
) -> None:
    target = redis_target
    target.shared = False  # as if given with --url: the bench must only read the counters
    client = footprint._redis_client(target)
    try:
        before = footprint.commandstats(client)
        result = footprint.redis_server_time(target, False, 30)
        after = footprint.commandstats(client)
    finally:
        client.close()
    assert "difference" in result["method"]
    assert result["first"]["scripts_per_call"] > 0
    assert all(after[name]["calls"] >= seen["calls"] for name, seen in before.items())


def test_dynamodb_item_size_rules() -> None:
    assert footprint.item_size({"pk": {"S": "abc"}}) == 5
    assert footprint.item_size({"b": {"B": b"\x00" * 10}}) == 11
    assert footprint.item_size({"n": {"N": "123"}}) == 1 + 3  # 3 digits: 2 bytes + 1
    assert footprint.item_size({"n": {"N": "1000"}}) == 1 + 2  # trailing zeros trimmed
    assert footprint.item_size({"n": {"N": "0.0012"}}) == 1 + 2
    assert footprint.item_size({"t": {"BOOL": True}}) == 2
    assert footprint.item_size({"m": {"M": {"a": {"S": "xy"}}}}) == 1 + 3 + 1 + 1 + 2
    assert footprint.item_size({"l": {"L": [{"S": "xy"}, {"NULL": True}]}}) == 1 + 3 + 3 + 2
    assert footprint.write_units(0, 1024) == 1
    assert footprint.write_units(1025, 10) == 2


def test_footprint_of_dynamodb(ddb_target: Target) -> None:
    result = footprint.run(ddb_target)
    assert "error" not in result, result
    rec = result["record"]
    assert rec["item_bytes"] > rec["item_bytes_in_progress"] > 0
    assert rec["item_bytes"] > 200
    assert rec["write_units_first_call"] >= 2  # a claim and a completion, 1 KB each at least
    assert rec["write_units_measured"] is None or rec["write_units_measured"] > 0


def test_cold_start(ddb_target: Target) -> None:
    result = coldstart.run(ddb_target, peers=True, runs=1)
    assert "error" not in result, result
    assert result["python_ms"] > 0
    systems = result["systems"]
    expected = {"idem-core"} | ({"powertools"} if coldstart.powertools_available() else set())
    assert set(systems) == expected
    for phases in systems.values():
        assert all(phases[f] > 0 for f in coldstart.FIELDS)
        assert phases["process_ms"] >= phases["in_process_ms"]
    if "powertools" in systems:
        assert result["to_powertools"]["in_process_ms"] > 0


def test_keyspace_is_opt_in() -> None:
    assert "keyspace" not in cli.chosen_scenarios(cli.parse([]))
    assert "keyspace" in cli.chosen_scenarios(cli.parse(["--scenario", "keyspace"]))
    chosen = cli.chosen_scenarios(cli.parse(["--keyspace", "10", "--scenario", "first"]))
    assert chosen == {"first", "keyspace"}


def test_cli_reports_the_new_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "out"
    db = tmp_path / "bench.db"
    argv = ["--no-embedded", "--url", f"sqlite:///{db}", "--url", "memory://"]
    argv += ["--duration", "0.1", "--concurrency", "1,4,16,64", "--out", str(out)]
    argv += ["--scenario", "first", "--scenario", "footprint", "--keyspace", str(SMALL)]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["settings"]["keyspace_records"] == SMALL
    [ks] = results["keyspace"]
    assert ks["target"] == "sqlite" and ks["purge"]["records"] == SMALL + 1
    [fp] = results["footprint"]
    assert fp["record"]["row_bytes"] > 200
    rows = {(r["target"], r["mode"]): r for r in results["scaling"]}
    modes = ("threads", "async tasks", *(("threads, one CPU",) if latency.one_cpu() else ()))
    assert set(rows) == {(t, m) for t in ("sqlite", "memory") for m in modes}
    for row in rows.values():
        assert all(row["throughput"][c] > 0 for c in ("1", "4", "16", "64"))
        assert row["ratio_64_1"] == round(row["throughput"]["64"] / row["throughput"]["1"], 2)
    report = (out / "report.md").read_text()
    for title in ("Throughput against concurrency", "Bytes per record", "keyspace grows"):
        assert title in report
    assert not list(scratch.iterdir())  # the run's temporary folder is gone
    for png in ("scaling.png", "keyspace.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report


def test_keyspace_never_fills_the_shared_redis(
    monkeypatch: pytest.MonkeyPatch, redis_target: Target
) -> None:
    target = redis_target  # shared, as --local finds it
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)  # no private server
    result = keyspace.run(target, SMALL, seconds=0.1)
    assert "skipped" in result and "full" not in result


def test_keyspace_on_a_given_redis_deletes_its_copies(redis_target: Target) -> None:
    import redis

    target = redis_target
    target.shared = False  # as if given with --url: filled, then cleaned
    result = keyspace.run(target, SMALL, seconds=0.05)
    assert "error" not in result, result
    assert result["server"] == "the target's own server"
    assert result["keys_after_fill"] >= SMALL
    client = redis.Redis.from_url(target.url)
    try:
        assert not list(client.scan_iter(match=result["prefix"] + "*", count=1000))
    finally:
        client.close()
