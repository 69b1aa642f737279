"""The report's sections for concurrency scaling, bytes per record, Redis server time, Lambda
cold starts and the keyspace scenario: one function computing rows, used by both the terminal
summary and report.md, so the two never disagree."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

LEVELS = ("1", "4", "16", "64")


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def scaling(results: dict[str, Any]) -> list[dict[str, Any]]:
    """First-call throughput per concurrency level, per idem-core section, with c=64 / c=1
    (threads for the sync store, tasks of one loop for the async one)."""
    rows = []
    for s in results.get("latency", []):
        if s.get("system") != "idem-core" or "scenarios" not in s:
            continue
        modes = [("threads" if s["mode"] == "sync" else "async tasks", "first")]
        if s["scenarios"].get("first_one_cpu"):
            modes.append(("threads, one CPU", "first_one_cpu"))
        for mode, scenario in modes:
            cells = s["scenarios"].get(scenario, {})
            thr = {c: cells.get(c, {}).get("throughput") for c in LEVELS}
            one = thr["1"]
            rows.append(
                {
                    "target": s["target"],
                    "mode": mode,
                    "throughput": thr,
                    "ratio_64_1": round(thr["64"] / one, 2) if one and thr["64"] else None,
                    "min_ratio_over_1": round(
                        min(v for c, v in thr.items() if c != "1" and v) / one, 2
                    )
                    if one and any(v for c, v in thr.items() if c != "1")
                    else None,
                }
            )
    return rows


def _scaling_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target", "mode", *(f"c={c}" for c in LEVELS), "c=64 / c=1", "worst c>1 / c=1"]
    body = []
    for r in results.get("scaling") or scaling(results):
        ratio = r["ratio_64_1"]
        body.append(
            [
                r["target"],
                r["mode"],
                *(_n(r["throughput"][c]) for c in LEVELS),
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if r["min_ratio_over_1"] is None else f"{r['min_ratio_over_1']:.2f}x",
            ]
        )
    return head, body


def _footprint_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target", "bytes per record", "how", "write units per first call", "on disk per row"]
    body = []
    for f in results.get("footprint", []):
        rec = f.get("record")
        if rec is None:
            body.append([f["target"], f.get("error") or f.get("skipped", ""), "", "", ""])
            continue
        if "keys" in rec:  # Redis
            enc = ", ".join(f"{k['type']}/{k['encoding']}" for k in rec["keys"])
            how = f"MEMORY USAGE, {len(rec['keys'])} key(s): {enc}"
            body.append([f["target"], _n(rec["bytes"]), how, "-", "-"])
        elif "item_bytes" in rec:  # DynamoDB
            units = _n(rec["write_units_first_call"])
            if rec.get("write_units_measured") is not None:
                units += f" (server: {rec['write_units_measured']:g})"
            how = f"item size by DynamoDB's rules ({rec['item_bytes_in_progress']} in progress)"
            body.append([f["target"], _n(rec["item_bytes"]), how, units, "-"])
        else:
            disk = (
                f"{_n(rec.get('disk_bytes_per_row'))} + {_n(rec.get('index_bytes_per_row'))} "
                f"index ({_n(rec.get('disk_rows'))} rows)"
            )
            body.append([f["target"], _n(rec["row_bytes"]), rec["row_measure"], "-", disk])
    return head, body


def _server_time_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target", "call", "µs per script", "scripts per call", "script µs per call"]
    head.append("every command (per call x µs each; a script's commands counted in it too)")
    body = []
    for f in results.get("footprint", []):
        st = f.get("server_time")
        if not st:
            continue
        for phase in ("first", "replay"):
            p = st.get(phase)
            if not p:
                continue
            cmds = "; ".join(
                f"{name} {c['calls'] / st['calls']:g} x {c['usec_per_call']:g}"
                for name, c in sorted(p["commands"].items(), key=lambda x: -x[1]["calls"])
            )
            body.append(
                [
                    f["target"],
                    phase,
                    _n(p["us_per_script"], 1),
                    f"{p['scripts_per_call']:g}",
                    _n(p["script_us_per_call"], 1),
                    cmds,
                ]
            )
    return head, body


def _coldstart_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target", "system", "import", "open", "first call", "in process", "process"]
    head.append("vs Powertools")
    body = []
    for c in results.get("coldstart", []):
        if "error" in c:
            body.append([c["target"], "error: " + c["error"][:80], *[""] * 6])
            continue
        for system, m in c["systems"].items():
            ratio = "-"
            if system == "idem-core" and c.get("to_powertools"):
                ratio = f"{c['to_powertools'].get('in_process_ms', '-')}x"
            body.append(
                [
                    c["target"],
                    system,
                    *(
                        _n(m[f], 1)
                        for f in ("import_ms", "open_ms", "first_call_ms", "in_process_ms")
                    ),
                    _n(m["process_ms"], 1),
                    ratio,
                ]
            )
    return head, body


def _keyspace_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["target", "records", "fill (records/s)", "first p50 empty → full"]
    head += ["replay p50 empty → full", "purge (records/s)", "first p50 / p99 during purge"]
    body = []
    for k in results.get("keyspace", []):
        if "error" in k or "skipped" in k:
            body.append([k["target"], k.get("error") or k.get("skipped", ""), *[""] * 5])
            continue
        e, f = k.get("empty", {}), k.get("full", {})

        def move(sc: str, e: dict[str, Any] = e, f: dict[str, Any] = f) -> str:
            a, b = e.get(sc, {}).get("p50_us"), f.get(sc, {}).get("p50_us")
            if a is None or b is None:
                return "-"
            return f"{_n(a, 1)} → {_n(b, 1)} µs ({b / a:.2f}x)"

        purge = k.get("purge", {})
        if "records" in purge:
            rate = f"{_n(purge['records_per_s'])} ({_n(purge['records'])} in {purge['seconds']} s)"
            c = purge["claims"]
            during = f"{_n(c.get('p50_us'), 1)} / {_n(c.get('p99_us'), 1)} µs ({c['ops']} calls)"
            base = f.get("first", {}).get("p99_us")
            if base is not None:
                during += f"; p99 before: {_n(base, 1)} µs"
        else:
            rate, during = purge.get("skipped") or purge.get("error", "-"), "-"
        fill = k.get("fill", {})
        body.append(
            [
                k["target"],
                _n(k["records"]),
                f"{_n(fill.get('records_per_s'))} ({fill.get('seconds')} s)",
                move("first"),
                move("replay"),
                rate,
                during,
            ]
        )
    return head, body


SECTIONS = (
    (
        "Throughput against concurrency: first calls per second",
        "idem-core's first calls on new keys; threads share one sync store, async tasks one "
        "event loop. The issue's targets: c=64 at least 3x c=1 on Redis and PostgreSQL, and "
        "memory:// threads at c=4, 16 and 64 at least its c=1.",
        _scaling_rows,
    ),
    (
        "Bytes per record",
        "One completed record with a 200-byte result, made through the store, measured by the "
        "server. Write units: claim + complete of one first call, by DynamoDB's rules from "
        "the item's sizes (and as the server returned them where requests go through "
        "botocore). SQL on disk: table and indexes divided by the rows, with copies of the "
        "record filling the table.",
        _footprint_rows,
    ),
    (
        "Redis server time per call",
        "INFO commandstats around sequential first calls and replays of the same keys.",
        _server_time_rows,
    ),
    (
        "Lambda cold start on DynamoDB (median ms of fresh processes)",
        "A new Python process imports the library, opens the store (the DynamoDB client "
        "included) and makes one first call; 'in process' adds these up, 'process' is the "
        "process's start to exit as the bench saw it (the interpreter's own included).",
        _coldstart_rows,
    ),
    (
        "Cost as the keyspace grows",
        "p50 at concurrency 1 on a table (or Redis) holding a handful of records, then the "
        "given number of live completed records; then as many expired records and `idem "
        "purge` (batch 1000) deleting them while first calls run.",
        _keyspace_rows,
    ),
)


def markdown(results: dict[str, Any], h2: str) -> list[str]:
    lines: list[str] = []
    for title, intro, rows in SECTIONS:
        head, body = rows(results)
        if not body:
            continue
        lines += ["", f"{h2} {title}", "", intro, ""]
        if title.startswith("Lambda"):
            for c in results.get("coldstart", []):
                if "python_ms" in c:
                    lines += [f"A bare `python -c pass` on {c['target']}: {c['python_ms']} ms.", ""]
        if title.startswith("Redis server"):
            for f in results.get("footprint", []):
                st = f.get("server_time")
                if st:
                    lines += [f"{f['target']}: {st['method']}; {st['calls']} calls each.", ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def console(results: dict[str, Any], out: Console) -> None:
    for title, _intro, rows in SECTIONS:
        head, body = rows(results)
        if not body:
            continue
        table = Table(title=title)
        for col in head:
            table.add_column(col)
        for row in body:
            table.add_row(*row)
        out.print(table)


def plot(results: dict[str, Any], out: Any) -> list[str]:
    """scaling.png (first calls/s at c=1, 16, 64 per store and mode) and, with the keyspace
    scenario, keyspace.png (p50 with a handful of records and with N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    rows = results.get("scaling") or scaling(results)
    if rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4))
        width = 0.27
        for j, c in enumerate(("1", "16", "64")):
            xs = [i + (j - 1) * width for i in range(len(rows))]
            ys = [r["throughput"].get(c) or 0 for r in rows]
            ax.bar(xs, ys, width, label=f"c={c}")
        labels = [f"{r['target']}\n{r['mode']}" for r in rows]
        ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30)
        ax.set_yscale("log")
        ax.set_ylabel("first calls / s (log)")
        ax.set_title("First-call throughput at concurrency 1, 16 and 64")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=90)
        plt.close(fig)
        made.append("scaling.png")
    done = [k for k in results.get("keyspace", []) if "full" in k]
    if done:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(done) + 2), 4))
        bars = [
            ("first, empty", "empty", "first"),
            ("first, full", "full", "first"),
            ("replay, empty", "empty", "replay"),
            ("replay, full", "full", "replay"),
        ]
        width = 0.2
        for j, (label, phase, sc) in enumerate(bars):
            xs = [i + (j - 1.5) * width for i in range(len(done))]
            ys = [k[phase][sc].get("p50_us") or 0 for k in done]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(done)), [f"{k['target']}\n{k['records']:,}" for k in done])
        ax.set_yscale("log")
        ax.set_ylabel("p50 µs (log)")
        ax.set_title("Latency with a handful of records and with N live records")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "keyspace.png", dpi=90)
        plt.close(fig)
        made.append("keyspace.png")
    return made
