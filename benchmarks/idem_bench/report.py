"""Turning results into a terminal summary, results.json, report.md and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import tables

LAT_SCENARIOS = ("first", "replay", "conflict", "claim_many", "steps")


def _p50(section: dict[str, Any], scenario: str, c: str = "1") -> float | None:
    cell = section["scenarios"].get(scenario, {}).get(c, {})
    value = cell.get("p50_us")
    return float(value) if value is not None else None


def _cpu(section: dict[str, Any], scenario: str) -> float | None:
    value = section["scenarios"].get(scenario, {}).get("1", {}).get("cpu_us")
    return float(value) if value is not None else None


def _cpu_ratios(peer: dict[str, Any]) -> str:
    r = peer.get("cpu_idem_core_to_peer") or {}
    return "/".join(f"{r[sc]:.2f}x" if sc in r else "-" for sc in ("first", "replay"))


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}{unit}"
    return f"{value:.1f}{unit}" if value >= 10 else f"{value:.2f}{unit}"


def ratios(results: dict[str, Any]) -> None:
    """Adds, in place, each section's p50 ratios to its floor and each peer's to ours."""
    ours = {
        (s["target"], s["mode"]): s
        for s in results["latency"]
        if s["system"] == "idem-core" and "scenarios" in s
    }
    for s in results["latency"]:
        if "scenarios" not in s:
            continue
        floor = _p50(s, "floor")
        if floor is None and s["system"] != "idem-core":
            mine = ours.get((s["target"], s["mode"]))
            floor = _p50(mine, "floor") if mine else None
        s["floor_p50_us"] = floor
        s["to_floor"] = {
            sc: round(v / floor, 2)
            for sc in LAT_SCENARIOS
            if floor and (v := _p50(s, sc)) is not None
        }
        if s["system"] != "idem-core":
            mine = ours.get((s["target"], s["mode"]))
            if mine is None:
                mine = ours.get((s["target"], "async" if s["mode"] == "sync" else "sync"))
            s["to_idem_core"] = {
                sc: round(v / m, 2)
                for sc in LAT_SCENARIOS
                if mine is not None
                and (v := _p50(s, sc)) is not None
                and (m := _p50(mine, sc)) is not None
                and m > 0
            }
            s["compared_with"] = f"idem-core {mine['mode']}" if mine else None
            # the other way round: idem-core's client CPU per call as a multiple of the peer's
            s["cpu_idem_core_to_peer"] = {
                sc: round(m / v, 2)
                for sc in ("first", "replay")
                if mine is not None
                and (v := _cpu(s, sc)) is not None
                and (m := _cpu(mine, sc)) is not None
                and v > 0
            }
        cost = step_cost(s)
        if cost is not None:
            s["step_cost"] = cost
    results["scaling"] = tables.scaling(results)


def step_cost(section: dict[str, Any]) -> dict[str, Any] | None:
    """What one step adds to a call: the ``steps`` call (``STEPS`` steps) minus ``first``,
    per step, in p50 µs, as a multiple of the floor, and in round trips and store operations
    (the call's one read of recorded steps included, spread over its steps)."""
    from .rigs import STEPS

    first, steps = _p50(section, "first"), _p50(section, "steps")
    if first is None or steps is None:
        return None
    floor = section.get("floor_p50_us")
    per = (steps - first) / STEPS
    counts = section.get("round_trips", {})

    def per_step(what: str) -> float | None:
        a, b = counts.get("first"), counts.get("steps")
        if not isinstance(a, dict) or not isinstance(b, dict):
            return None
        if a.get(what) is None or b.get(what) is None:
            return None
        return round((float(b[what]) - float(a[what])) / STEPS, 2)

    return {
        "steps_per_call": STEPS,
        "p50_us": round(per, 2),
        "to_floor": round(per / floor, 2) if floor else None,
        "round_trips": per_step("round_trips"),
        "store_ops": per_step("store_ops"),
    }


def summary(results: dict[str, Any], console: Console) -> None:
    table = Table(title="Latency p50 (µs) at concurrency 1, ratio to the floor, round trips")
    for col in ("target", "system", "mode", "floor", "first", "replay", "conflict"):
        table.add_column(col, justify="left" if col in ("target", "system", "mode") else "right")
    table.add_column("claim_many(100)", justify="right")
    table.add_column("first/floor", justify="right")
    table.add_column("replay/floor", justify="right")
    table.add_column("RT first/replay", justify="right")
    table.add_column("first ops/s c=16", justify="right")
    for s in results["latency"]:
        if "scenarios" not in s:
            table.add_row(s["target"], s["system"], s["mode"], f"[red]{s.get('error', '')[:60]}")
            continue
        rt = s.get("round_trips", {})

        def trips(sc: str, rt: dict[str, Any] = rt) -> str:
            v = rt.get(sc, {}) if isinstance(rt.get(sc), dict) else {}
            n = v.get("round_trips")
            return "-" if n is None else f"{n:g}"

        tf = s.get("to_floor", {})
        thr = s["scenarios"].get("first", {}).get("16", {}).get("throughput")
        floor = s.get("floor_p50_us")
        table.add_row(
            s["target"],
            s["system"],
            s["mode"],
            _fmt(floor),
            _fmt(_p50(s, "first")),
            _fmt(_p50(s, "replay")),
            _fmt(_p50(s, "conflict")),
            _fmt(_p50(s, "claim_many")),
            f"{tf['first']:.2f}x" if "first" in tf else "-",
            f"{tf['replay']:.2f}x" if "replay" in tf else "-",
            f"{trips('first')}/{trips('replay')}",
            _fmt(thr),
        )
    console.print(table)
    peers = [s for s in results["latency"] if s["system"] != "idem-core" and "to_idem_core" in s]
    if peers:
        pt = Table(title="Peers: p50 latency as a multiple of idem-core's in the same run")
        for col in (
            "target",
            "peer",
            "mode",
            "vs",
            "first",
            "replay",
            "conflict",
            "RT first/replay",
            "client CPU: ours/peer first/replay",
        ):
            pt.add_column(col)
        for s in peers:
            t = s["to_idem_core"]
            rt = s.get("round_trips", {})
            rts = "/".join(
                "-"
                if not isinstance(rt.get(sc), dict) or rt[sc].get("round_trips") is None
                else f"{rt[sc]['round_trips']:g}"
                for sc in ("first", "replay")
            )
            pt.add_row(
                s["target"],
                s["system"],
                s["mode"],
                s.get("compared_with") or "-",
                *(f"{t[sc]:.2f}x" if sc in t else "-" for sc in ("first", "replay", "conflict")),
                rts,
                _cpu_ratios(s),
            )
        console.print(pt)
    if results.get("overhead"):
        ot = Table(title="Core overhead on memory:// vs the bare function (µs per call)")
        for col in ("system", "first call", "replay", "bare"):
            ot.add_column(col)
        for name, o in results["overhead"].items():
            if "first_overhead_us" in o:
                ot.add_row(
                    name,
                    f"{o['first_overhead_us']:.2f}",
                    f"{o['replay_overhead_us']:.2f}",
                    f"{o['bare_us']:.2f}",
                )
            else:
                ot.add_row(name, o.get("skipped") or o.get("error", ""), "", "")
        console.print(ot)
    tables.console(results, console)
    if results.get("races"):
        rt_table = Table(title="Races")
        cols = (
            "target",
            "system",
            "storm: keys run ≠1",
            "zombie: accepted",
            "zombie: silent",
            "final = successor's",
            "crash: takeover s",
            "waiters: lag p50 ms",
            "skew",
        )
        for col in cols:
            rt_table.add_column(col)
        for r in results["races"]:
            rt_table.add_row(r["target"], r["system"], *race_cells(r["results"]))
        console.print(rt_table)
    if results.get("skipped"):
        for name, why in results["skipped"].items():
            console.print(f"[yellow]skipped {name}: {why}")


def race_cells(res: dict[str, Any]) -> list[str]:
    def get(name: str, field: str) -> str:
        v = res.get(name, {})
        if "skipped" in v:
            return "n/a"
        if "error" in v:
            return "error"
        x = v.get(field)
        return "-" if x is None else str(x)

    skew = res.get("skew", {})
    if not skew:
        skew_text = "-"
    elif "skipped" in skew or "error" in skew:
        skew_text = "n/a" if "skipped" in skew else "error"
    else:
        dup = [
            k
            for k, v in skew.items()
            if isinstance(v, dict) and v.get("duplicate_under_live_lease")
        ]
        skew_text = "dup at " + ",".join(dup) if dup else "no duplicate"
    return [
        get("storm", "keys_not_exactly_once"),
        get("zombie", "zombie_accepted"),
        get("zombie", "zombie_silent"),
        get("zombie", "consistent"),
        get("crash", "takeover_s"),
        get("waiters", "lag_ms_p50"),
        skew_text,
    ]


def write(results: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    plots = plot(results, out)
    (out / "report.md").write_text(markdown(results, plots))
    return plots


def markdown(results: dict[str, Any], plots: list[str], images: str = "", level: int = 1) -> str:
    """The report; ``images`` prefixes plot paths and ``level`` is the title's heading level
    (the docs embed it one level down, with the plots copied next to the page)."""
    meta = results["meta"]
    h1, h2 = "#" * level, "#" * (level + 1)
    lines = [
        f"{h1} idem bench: {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Load average before/after: {meta.get('load_before')} / "
        f"{meta.get('load_after')}. Wall time: {meta.get('wall_s')} s.",
        "",
        "Absolute times are this machine's; the ratios (to each server's own round trip, and "
        "between libraries measured in the same run) are what carry over.",
        "",
        f"{h2} Versions",
        "",
    ]
    for k, v in meta["versions"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", f"{h2} Latency (p50 µs, concurrency 1) and round trips per call", ""]
    lines.append(
        "| target | system | mode | floor | first | replay | conflict | claim_many(100) "
        "| first/floor | replay/floor | RT first | RT replay | first ops/s c=16 |"
    )
    lines.append("|" + "---|" * 13)
    for s in results["latency"]:
        if "scenarios" not in s:
            lines.append(
                f"| {s['target']} | {s['system']} | {s['mode']} | error: "
                f"{s.get('error', '')[:80]} |" + " |" * 9
            )
            continue
        tf = s.get("to_floor", {})
        rt = s.get("round_trips", {})

        def rts(sc: str, rt: dict[str, Any] = rt) -> str:
            v = rt.get(sc)
            n = v.get("round_trips") if isinstance(v, dict) else None
            return "-" if n is None else f"{n:g}"

        thr = s["scenarios"].get("first", {}).get("16", {}).get("throughput")
        lines.append(
            f"| {s['target']} | {s['system']} | {s['mode']} | {_fmt(s.get('floor_p50_us'))} "
            f"| {_fmt(_p50(s, 'first'))} | {_fmt(_p50(s, 'replay'))} "
            f"| {_fmt(_p50(s, 'conflict'))} | {_fmt(_p50(s, 'claim_many'))} "
            f"| {tf.get('first', '-')} | {tf.get('replay', '-')} | {rts('first')} "
            f"| {rts('replay')} | {_fmt(thr)} |"
        )
    peers = [s for s in results["latency"] if s["system"] != "idem-core" and "to_idem_core" in s]
    if peers:
        lines += ["", f"{h2} Peers: p50 as a multiple of idem-core's (same run, same server)", ""]
        lines.append(
            "| target | peer | mode | compared with | first | replay | conflict "
            "| peer's client CPU µs first/replay | idem-core's CPU / peer's first/replay |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for s in peers:
            t = s["to_idem_core"]
            lines.append(
                f"| {s['target']} | {s['system']} | {s['mode']} | {s.get('compared_with')} "
                f"| {t.get('first', '-')} | {t.get('replay', '-')} | {t.get('conflict', '-')} "
                f"| {_fmt(_cpu(s, 'first'))}/{_fmt(_cpu(s, 'replay'))} | {_cpu_ratios(s)} |"
            )
    costs = [s for s in results["latency"] if s.get("step_cost")]
    if costs:
        lines += ["", f"{h2} Steps: the cost of one step (p50 µs, concurrency 1)", ""]
        lines.append(
            "A call running steps minus the same call without, per step; round trips and "
            "store operations per step include the call's one read of its recorded steps."
        )
        lines += ["", "| target | mode | floor | step | step/floor | RT per step | ops per step |"]
        lines.append("|---|---|---|---|---|---|---|")
        for s in costs:
            c = s["step_cost"]
            lines.append(
                f"| {s['target']} | {s['mode']} | {_fmt(s.get('floor_p50_us'))} "
                f"| {_fmt(c['p50_us'])} | {c['to_floor'] if c['to_floor'] is not None else '-'} "
                f"| {c['round_trips'] if c['round_trips'] is not None else '-'} "
                f"| {c['store_ops'] if c['store_ops'] is not None else '-'} |"
            )
    if results.get("overhead"):
        lines += ["", f"{h2} Core overhead on memory:// (µs per call over the bare function)", ""]
        lines.append("| system | first call | replay | bare function |")
        lines.append("|---|---|---|---|")
        for name, o in results["overhead"].items():
            if "first_overhead_us" in o:
                lines.append(
                    f"| {name} | {o['first_overhead_us']} | {o['replay_overhead_us']} "
                    f"| {o['bare_us']} |"
                )
            else:
                lines.append(f"| {name} | {o.get('skipped') or o.get('error')} | | |")
    lines += tables.markdown(results, h2)
    if results.get("races"):
        lines += ["", f"{h2} Races", ""]
        lines.append(
            "| target | system | storm: keys not run exactly once | zombie completion accepted "
            "| zombie told success | final = successor's result | crash: takeover (s) "
            "| waiters: lag p50 (ms) | clock skew |"
        )
        lines.append("|" + "---|" * 9)
        for r in results["races"]:
            lines.append(
                f"| {r['target']} | {r['system']} | " + " | ".join(race_cells(r["results"])) + " |"
            )
    if results.get("skipped"):
        lines += ["", f"{h2} Skipped", ""]
        for name, why in results["skipped"].items():
            lines.append(f"- {name}: {why}")
    if plots:
        lines += ["", f"{h2} Plots", ""]
        lines += [f"![{p}]({images}{p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    sections = [s for s in results["latency"] if "scenarios" in s]
    targets = list(dict.fromkeys(s["target"] for s in sections))
    if targets:
        cols = min(3, len(targets))
        rows = (len(targets) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
        for ax, target in zip(axes.flat, targets, strict=False):
            for s in sections:
                if s["target"] != target:
                    continue
                for sc, style in (("first", "-"), ("replay", "--"), ("floor", ":")):
                    if sc == "floor" and s["system"] != "idem-core":
                        continue
                    cdf = s["scenarios"].get(sc, {}).get("1", {}).get("cdf")
                    if not cdf:
                        continue
                    xs = [max(v, 0.01) for _, v in cdf]
                    ys = [p for p, _ in cdf]
                    label = (
                        f"floor ({s['mode']} client)"
                        if sc == "floor"
                        else f"{s['system']} {s['mode']} {sc}"
                    )
                    ax.plot(xs, ys, style, label=label)
            ax.set_xscale("log")
            ax.set_title(target)
            ax.set_xlabel("latency (µs, log)")
            ax.set_ylabel("percentile")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(targets) :]:
            ax.axis("off")
        fig.suptitle("Latency CDF at concurrency 1")
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=90)
        plt.close(fig)
        made.append("latency_cdf.png")

        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
        for ax, target in zip(axes.flat, targets, strict=False):
            for s in sections:
                if s["target"] != target:
                    continue
                for sc, style in (("first", "-o"), ("replay", "--s")):
                    cells = s["scenarios"].get(sc, {})
                    pts = sorted(
                        (int(c), v["throughput"]) for c, v in cells.items() if "throughput" in v
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True), style, label=f"{s['system']} {s['mode']} {sc}"
                        )
            ax.set_xscale("log", base=2)
            ax.set_title(target)
            ax.set_xlabel("concurrency")
            ax.set_ylabel("calls / s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(targets) :]:
            ax.axis("off")
        fig.suptitle("Throughput against concurrency (threads for sync, tasks for async)")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=90)
        plt.close(fig)
        made.append("throughput.png")
    made += tables.plot(results, out)
    races = results.get("races") or []
    if races:
        labels = [f"{r['system']} @ {r['target']}" for r in races]
        metrics: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
            ("storm: keys run ≠ 1", lambda r: r.get("storm", {}).get("keys_not_exactly_once")),
            ("zombie accepted", lambda r: r.get("zombie", {}).get("zombie_accepted")),
            ("zombie told success", lambda r: r.get("zombie", {}).get("zombie_silent")),
            (
                "successor's result lost",
                lambda r: (
                    None
                    if r.get("zombie", {}).get("consistent") is None
                    else int(not r["zombie"]["consistent"])
                ),
            ),
            (
                "skew duplicates",
                lambda r: (
                    None
                    if "skipped" in r.get("skew", {})
                    or "error" in r.get("skew", {})
                    or not r.get("skew")
                    else sum(
                        1
                        for v in r["skew"].values()
                        if isinstance(v, dict) and v.get("duplicate_under_live_lease")
                    )
                ),
            ),
        ]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
        grid = []
        for r in races:
            grid.append([m(r["results"]) for _, m in metrics])
        import numpy as np
        from matplotlib.colors import ListedColormap

        # grey: not applicable, green: 0 (correct), red: any count
        data = np.array([[0.5 if v is None else min(float(v), 1.0) for v in row] for row in grid])
        colours = ListedColormap(["#8fd18f", "#dddddd", "#e87b7b"])
        ax.imshow(data, cmap=colours, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "n/a" if v is None else str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(metrics)), [m for m, _ in metrics], rotation=20, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title("Race outcomes (counts; 0 is correct)")
        fig.tight_layout()
        fig.savefig(out / "races.png", dpi=90)
        plt.close(fig)
        made.append("races.png")
    return made
