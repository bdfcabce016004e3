"""Medians over the rounds, the targets with PASS/MISS, the table and the plot."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.fanout.phases import Result

Key = tuple[str, str, int, int]  # system, phase, clients, size


def medians(results: list[Result]) -> dict[Key, dict[str, float]]:
    groups: dict[Key, list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.system, r.phase, r.clients, r.size)].append(r)
    out: dict[Key, dict[str, float]] = {}
    for key, rs in groups.items():
        row: dict[str, float] = {"runs": float(len(rs))}
        for name in (
            "per_s", "cpu_us", "server_cpu_pct", "client_cpu_pct_max", "p50_ms", "p99_ms",
            "max_ms", "rss_mb", "rss_per_conn_kb", "others", "failed", "clients",
        ):  # fmt: skip
            values = [float(getattr(r, name)) for r in rs]
            row[name] = statistics.median(values)
            row[name + "_lo"], row[name + "_hi"] = min(values), max(values)
        out[key] = row
    return out


def fmt(v: float, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def span(row: dict[str, float], name: str, digits: int = 1) -> str:
    lo, hi = row[name + "_lo"], row[name + "_hi"]
    if row["runs"] > 1 and fmt(lo, digits) != fmt(hi, digits):
        return f"{fmt(row[name], digits)} ({fmt(lo, digits)}-{fmt(hi, digits)})"
    return fmt(row[name], digits)


def table(meds: dict[Key, dict[str, float]], labels: dict[str, str]) -> str:
    lines = [
        "| system | phase | clients | event B | deliveries/s | server CPU µs/delivery "
        "| p50 / p99 / max ms | server RSS MB | busiest client CPU % | non-event frames |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"rate": 0, "flat": 1}
    for key in sorted(
        (k for k in meds if k[1] in order), key=lambda k: (order[k[1]], k[2], k[3], k[0])
    ):
        system, phase, clients, size = key
        m = meds[key]
        lat = (
            f"{fmt(m['p50_ms'], 2)} / {span(m, 'p99_ms', 2)} / {fmt(m['max_ms'], 1)}"
            if phase == "rate"
            else "-"
        )
        lines.append(
            f"| {labels.get(system, system)} | {'10k/s' if phase == 'rate' else 'flat out'} "
            f"| {clients:,} | {size:,} | {span(m, 'per_s', 0)} | {span(m, 'cpu_us')} | {lat} "
            f"| {fmt(m['rss_mb'], 0)} | {fmt(m['client_cpu_pct_max'], 0)} | {fmt(m['others'], 0)} |"
        )
    return "\n".join(lines)


def idle_table(meds: dict[Key, dict[str, float]], labels: dict[str, str]) -> str:
    lines = [
        "| system | idle connections | RSS MB | RSS per connection KiB |",
        "|---|---|---|---|",
    ]
    for key in sorted(k for k in meds if k[1] == "idle"):
        m = meds[key]
        lines.append(
            f"| {labels.get(key[0], key[0])} | {m['clients']:,.0f} | {span(m, 'rss_mb', 0)} "
            f"| {span(m, 'rss_per_conn_kb')} |"
        )
    return "\n".join(lines)


def targets(meds: dict[Key, dict[str, float]], relay: str = "relay") -> list[str]:
    """Every target of the issue with PASS/MISS and by how much."""
    out: list[str] = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    for phase in ("rate", "flat"):
        for clients in (100, 1000):
            r = meds.get((relay, phase, clients, 200))
            c = meds.get(("ceiling", phase, clients, 200))
            b = meds.get(("broadcaster", phase, clients, 200))
            where = f"{'10k deliveries/s' if phase == 'rate' else 'flat out'}, {clients:,} clients"
            if r and c:
                ratio = r["cpu_us"] / c["cpu_us"]
                out.append(
                    f"{verdict(ratio <= 1.3)}  CPU/delivery <= 1.3x ceiling ({where}): "
                    f"{r['cpu_us']:.1f} vs {c['cpu_us']:.1f} µs = {ratio:.2f}x"
                    + ("" if ratio <= 1.3 else f" (missed by {(ratio / 1.3 - 1) * 100:.0f}%)")
                )
            if r and b:
                ratio = r["cpu_us"] / b["cpu_us"]
                out.append(
                    f"{verdict(ratio <= 0.75)}  CPU/delivery <= 0.75x broadcaster ({where}): "
                    f"{r['cpu_us']:.1f} vs {b['cpu_us']:.1f} µs = {ratio:.2f}x"
                    + ("" if ratio <= 0.75 else f" (missed by {(ratio / 0.75 - 1) * 100:.0f}%)")
                )
    for clients in (100, 1000):
        r = meds.get((relay, "rate", clients, 200))
        if r:
            out.append(
                f"{verdict(r['p99_ms'] <= 10)}  p99 <= 10 ms at 10k deliveries/s, {clients:,} "
                f"clients: {r['p99_ms']:.2f} ms"
            )
    idle = [k for k in meds if k[0] == relay and k[1] == "idle"]
    for key in idle:
        m = meds[key]
        ok = m["rss_mb"] <= 250 and m["clients"] - m["failed"] >= 10_000
        out.append(
            f"{verdict(ok)}  10,000 idle WebSockets "
            f"in <= 250 MB: {m['clients'] - m['failed']:,.0f} connected, {m['rss_mb']:.0f} MB "
            f"({m['rss_per_conn_kb']:.1f} KiB each)"
        )
    resume = [k for k in meds if k[0] == relay and k[1] == "resume"]
    for key in resume:
        ms = meds[key]["max_ms"]
        out.append(f"{verdict(ms < 500)}  10,000-event backlog resumes in < 0.5 s: {ms:.0f} ms")
    return out


def plot(meds: dict[Key, dict[str, float]], labels: dict[str, str], path: Path) -> Path | None:
    """CPU per delivery by system (flat out and 10k/s, 100 and 1,000 clients), cost vs
    clients and vs event size. Needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    systems = sorted({k[0] for k in meds if k[1] in ("rate", "flat") and k[3] == 200})
    cases = [("rate", 100), ("rate", 1000), ("flat", 100), ("flat", 1000)]
    width = 0.8 / max(1, len(systems))
    ax = axes[0]
    for i, system in enumerate(systems):
        values = [meds.get((system, p, c, 200), {}).get("cpu_us", 0.0) for p, c in cases]
        ax.bar(
            [x + i * width for x in range(len(cases))],
            values,
            width,
            label=labels.get(system, system),
        )
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(cases))])
    ax.set_xticklabels([f"{'10k/s' if p == 'rate' else 'flat'}\n{c} clients" for p, c in cases])
    ax.set_ylabel("server CPU µs per delivery (lower is better)")
    ax.legend(fontsize=7)
    ax.set_title("200 B events")
    for ax, axis, title in (
        (axes[1], 2, "flat out, 200 B: vs clients"),
        (axes[2], 3, "flat out, 100 clients: vs event size"),
    ):
        for system in systems:
            pts = sorted(
                (k[axis], v["cpu_us"])
                for k, v in meds.items()
                if k[0] == system
                and k[1] == "flat"
                and ((axis == 2 and k[3] == 200) or (axis == 3 and k[2] == 100))
            )
            if len(pts) >= 2:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=labels.get(system, system),
                )
        ax.set_xscale("log")
        ax.set_xlabel("clients" if axis == 2 else "event bytes")
        ax.set_ylabel("server CPU µs per delivery")
        ax.set_title(title)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    return [r.row() for r in results]
