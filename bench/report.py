"""The report of a run: the targets as ratios, the tables and the plots.

``report()`` rewrites the part of docs/benchmarks.md between its two ``results``
markers (the prose around them is written by hand) and the PNGs in docs/img/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

START, END = "<!-- results:start -->", "<!-- results:end -->"
MiB = 2**20


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, its figure in this run, and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(target: str, figure: str, met: bool) -> None:
        out.append({"target": target, "figure": figure, "met": bool(met)})

    rr = scenarios.get("rr")
    if rr:
        for encoding in ("json", "msgpack"):
            gateway = rr[f"gateway-{encoding}"]["requests_per_s"]
            for peer, factor in (("trio-websocket", 2.0), ("websockets-asyncio", 1.25)):
                ratio = gateway / rr[peer]["requests_per_s"]
                add(
                    f"request/reply ({encoding}) >= {factor:g}x the {peer} echo",
                    f"{gateway:,.0f}/s = {ratio:.2f}x",
                    ratio >= factor,
                )
    latency = scenarios.get("latency")
    if latency:
        peer_p50 = latency.get("websockets-asyncio", {}).get("p50_ms")
        for encoding in ("json", "msgpack"):
            result = latency[f"gateway-{encoding}"]
            p50, p99 = result["p50_ms"], result["p99_ms"]
            if peer_p50:
                add(
                    f"p50 at 5,000 requests/s ({encoding}) <= the websockets-asyncio echo's",
                    f"{p50:.3f} ms against {peer_p50:.3f} ms",
                    p50 <= peer_p50,
                )
            add(f"p99 at 5,000 requests/s ({encoding}) < 1 ms", f"{p99:.2f} ms", p99 < 1)
    for scenario, factor, what in (
        ("fanout", 1.0, "paced, 4 undelivered"),
        ("burst", 2.0, "burst, 200 undelivered"),
    ):
        for key, result in scenarios.get(scenario, {}).items():
            name, _, subscribers = key.partition("@")
            if not name.startswith("gateway"):
                continue
            peer_key = f"websockets-asyncio@{subscribers}" if subscribers else "websockets-asyncio"
            peer = scenarios[scenario].get(peer_key)
            if peer:
                ratio = result["deliveries_per_s"] / peer["deliveries_per_s"]
                add(
                    f"fan-out to {subscribers or result['subscribers']} ({name[8:]}, {what}) "
                    f">= {factor:g}x websockets broadcast()",
                    f"{result['deliveries_per_s']:,.0f}/s = {ratio:.2f}x",
                    ratio >= factor,
                )
    idle = scenarios.get("idle")
    if idle:
        counts = sorted(int(key.split("@")[1]) for key in idle if key.startswith("gateway"))
        for count in counts:
            result = idle[f"gateway-json@{count}"]
            kib = result["kib_per_connection"]
            add(f"idle {count}: <= 10 KiB per connection", f"{kib:.1f} KiB", kib <= 10)
        if counts:
            cpu = idle[f"gateway-json@{counts[-1]}"]["server_cpu"]
            add(f"idle {counts[-1]}: < 5% CPU", f"{cpu * 100:.2f}%", cpu < 0.05)
    churn = scenarios.get("churn", {}).get("gateway-json")
    if churn:
        grew = churn["rss_after"] - churn["rss_before"]
        add(
            "churn leaves wsgate_tasks where it started",
            f"{churn['tasks_before']:.0f} -> {churn['tasks_after']:.0f}",
            churn["tasks_after"] <= churn["tasks_before"],
        )
        add(
            "churn leaves RSS where it started (within 2 MiB or 5%)",
            f"{churn['rss_before'] / MiB:.1f} -> {churn['rss_after'] / MiB:.1f} MiB",
            grew <= max(2 * MiB, 0.05 * churn["rss_before"]),
        )
    herd = scenarios.get("herd", {}).get("gateway-json")
    if herd:
        bound = herd["drain_timeout"] + 10
        within = herd["resumed_within_s"]
        add(
            f"herd of {herd['clients']}: all back within drain timeout + 10 s ({bound:g} s)",
            f"{herd['reconnected']} back, the last after {within or float('nan'):.1f} s",
            herd["reconnected"] == herd["clients"] and within is not None and within <= bound,
        )
        add("herd: zero messages lost", f"{herd['lost']} lost", herd["lost"] == 0)
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def _markdown(results: dict[str, Any]) -> str:
    scenarios = results["scenarios"]
    machine = results["machine"]
    parts = [
        f"Run of {machine['date']} at commit `{machine['commit']}`"
        + (" (**--quick**: smaller counts, shorter windows)" if results["quick"] else "")
        + f", {results['seconds']:.0f} s in all. Machine: {machine['cpu']}, "
        f"{machine['cpus']} CPUs, Python {machine['python']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
        + ". Figures of this run only; `bench/results.json` has every one.",
        "### Targets\n\n"
        + _table(
            ["target", "this run", "met"],
            [
                [t["target"], t["figure"], "yes" if t["met"] else "**no**"]
                for t in results["targets"]
            ],
        ),
    ]
    rr = scenarios.get("rr")
    if rr:
        gj, gm = rr["gateway-json"]["requests_per_s"], rr["gateway-msgpack"]["requests_per_s"]
        rows = [
            [
                name,
                f"{r['requests_per_s']:,.0f}",
                f"{r.get('server_cpu', 0) * 100:.0f}%",
                f"{r['generator_busy'] * 100:.0f}%",
                _x(_ratio(gj, r["requests_per_s"])),
                _x(_ratio(gm, r["requests_per_s"])),
            ]
            for name, r in rr.items()
        ]
        parts.append(
            "### 1. Request/reply (100 connections, 8 in flight each, 64-byte payloads)\n\n"
            "The gateway runs the full protocol (hello, sequenced `msg`, the handler, "
            "`reply`, acks); the peers echo.\n\n"
            + _table(
                [
                    "server",
                    "requests/s",
                    "server CPU",
                    "generator busy",
                    "gateway json ÷",
                    "gateway msgpack ÷",
                ],
                rows,
            )
            + "\n\n![request/reply](img/bench-rr.png)"
        )
    latency = scenarios.get("latency")
    if latency:
        rows = [
            [
                name,
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['p999_ms']:.3f}",
                f"{r.get('server_cpu', 0) * 100:.0f}%",
                _x(_ratio(latency["gateway-json"]["p99_ms"], r["p99_ms"])),
            ]
            for name, r in latency.items()
        ]
        parts.append(
            "### 2. Latency at 5,000 requests/s (100 connections)\n\n"
            + _table(
                ["server", "p50 ms", "p99 ms", "p99.9 ms", "server CPU", "gateway json p99 ÷"],
                rows,
            )
            + "\n\n![latency](img/bench-latency.png)"
        )
    fanout = scenarios.get("fanout")
    if fanout:
        rows = []
        for key, r in fanout.items():
            name, subscribers = key.split("@")
            peer = fanout.get(f"websockets-asyncio@{subscribers}")
            rows.append(
                [
                    name,
                    subscribers,
                    f"{r['deliveries_per_s']:,.0f}",
                    f"{r.get('p99_ms', 0):.1f}",
                    f"{r['generator_busy'] * 100:.0f}%",
                    _x(_ratio(r["deliveries_per_s"], peer and peer["deliveries_per_s"])),
                ]
            )
        parts.append(
            "### 3. Fan-out (one topic; the publisher keeps 4 publications undelivered)\n\n"
            + _table(
                [
                    "server",
                    "subscribers",
                    "deliveries/s",
                    "p99 delivery ms",
                    "generator busy",
                    "÷ websockets broadcast()",
                ],
                rows,
            )
            + "\n\n![fan-out](img/bench-fanout.png)"
        )
    burst = scenarios.get("burst")
    if burst:
        peer = burst.get("websockets-asyncio")
        rows = [
            [
                name,
                f"{r['deliveries_per_s']:,.0f}",
                f"{r.get('p99_ms', 0):.1f}",
                f"{r['generator_busy'] * 100:.0f}%",
                _x(_ratio(r["deliveries_per_s"], peer and peer["deliveries_per_s"])),
            ]
            for name, r in burst.items()
        ]
        parts.append(
            "### 3b. Fan-out in bursts (1,000 subscribers; the publisher keeps 200 "
            "publications undelivered)\n\n"
            + _table(
                [
                    "server",
                    "deliveries/s",
                    "p99 delivery ms",
                    "generator busy",
                    "÷ websockets broadcast()",
                ],
                rows,
            )
        )
    idle = scenarios.get("idle")
    if idle:
        rows = [
            [
                key.split("@")[0],
                key.split("@")[1],
                f"{r['kib_per_connection']:.1f}",
                f"{r.get('server_cpu', 0) * 100:.2f}%",
                f"{r['seconds']:.0f}",
                f"{r['still_open']}",
            ]
            for key, r in idle.items()
        ]
        parts.append(
            "### 4. Idle connections, heartbeats on\n\n"
            + _table(
                [
                    "server",
                    "connections",
                    "KiB per connection",
                    "server CPU",
                    "window s",
                    "open at the end",
                ],
                rows,
            )
            + "\n\n![idle](img/bench-idle.png)"
        )
    churn = scenarios.get("churn")
    if churn:
        gateway = churn["gateway-json"]["cycles_per_s"]
        rows = [
            [
                name,
                f"{r['cycles_per_s']:,.0f}",
                f"{r['failures']}",
                _x(_ratio(gateway, r["cycles_per_s"])),
                f"{r['tasks_before']:.0f} -> {r['tasks_after']:.0f}" if "tasks_before" in r else "",
                f"{r['rss_before'] / MiB:.1f} -> {r['rss_after'] / MiB:.1f}"
                if "rss_before" in r
                else "",
            ]
            for name, r in churn.items()
        ]
        parts.append(
            "### 5. Churn (50 at a time: open, hello, bye, close)\n\n"
            + _table(
                ["server", "connections/s", "failures", "gateway ÷", "wsgate_tasks", "RSS MiB"],
                rows,
            )
        )
    herd = scenarios.get("herd", {}).get("gateway-json")
    if herd:
        parts.append(
            "### 6. Drain and reconnect herd (two nodes, Redis)\n\n"
            + _table(
                [
                    "clients",
                    "all connected again after",
                    "half after",
                    "generator busy meanwhile",
                    "peak reconnects/s",
                    "sessions resumed",
                    "sessions lost (topic recovered)",
                    "publications (refused: 503)",
                    "messages lost",
                ],
                [
                    [
                        f"{herd['clients']}",
                        f"{herd['resumed_within_s'] or float('nan'):.2f} s",
                        f"{herd.get('resumed_p50_s') or float('nan'):.2f} s",
                        f"{herd.get('generator_busy_in_herd', float('nan')):.0%}",
                        f"{herd['peak_reconnects_per_s']:,}",
                        f"{herd['sessions_resumed']}",
                        f"{herd['sessions_lost']}",
                        f"{herd['publications']} ({herd.get('publications_refused', 0)})",
                        f"{herd['lost']}",
                    ]
                ],
            )
        )
    return "\n\n".join(parts)


def _plots(results: dict[str, Any], img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = results["scenarios"]

    def bars(name: str, title: str, ylabel: str, data: dict[str, float]) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = list(data)
        colors = ["tab:blue" if label.startswith("gateway") else "tab:gray" for label in labels]
        ax.bar(labels, list(data.values()), color=colors)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        fig.tight_layout()
        fig.savefig(img / f"bench-{name}.png", dpi=90)
        plt.close(fig)

    if "rr" in scenarios:
        bars(
            "rr",
            "Request/reply, 100 connections x 8 in flight",
            "requests/s",
            {k: v["requests_per_s"] for k, v in scenarios["rr"].items()},
        )
    if "fanout" in scenarios:
        bars(
            "fanout",
            "Fan-out deliveries/s",
            "deliveries/s",
            {k: v["deliveries_per_s"] for k, v in scenarios["fanout"].items()},
        )
    if "idle" in scenarios:
        bars(
            "idle",
            "Idle: memory per connection",
            "KiB",
            {k: v["kib_per_connection"] for k, v in scenarios["idle"].items()},
        )
    if "latency" in scenarios:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(scenarios["latency"])
        for offset, (key, label) in enumerate(
            [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]
        ):
            ax.bar(
                [i + offset * 0.27 for i in range(len(names))],
                [scenarios["latency"][n][key] for n in names],
                width=0.27,
                label=label,
            )
        ax.set_xticks([i + 0.27 for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel("ms")
        ax.set_title("Latency at 5,000 requests/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / "bench-latency.png", dpi=90)
        plt.close(fig)


def report(results: dict[str, Any], docs: Path) -> None:
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    _plots(results, img)
    page = docs / "benchmarks.md"
    text = page.read_text() if page.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    generated = f"{START}\n{_markdown(results)}\n{END}"
    page.write_text(
        re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: generated, text, flags=re.S)
    )
