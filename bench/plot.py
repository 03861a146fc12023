#!/usr/bin/env python3
"""Draws the README's performance chart (an SVG bar chart) from benchmark output.

    bench/plot.py OUT.svg RUN.log...

Reads every `result key=value ...` line the bench scripts print, takes the median of each
`*_ratio` figure over all runs given, and draws one bar per ratio against the native
reference of the same run (rates pgferry / native, latencies native / pgferry: higher is
better either way) with the issue's floors and the 1.0 line. Standard library only.
"""
import re
import statistics
import sys

LABELS = {
    "capture_ratio": ("capture", 0.8),
    "replica_catchup_ratio": ("replica catch-up", 0.8),
    "mm_catchup_ratio": ("multi-master catch-up", 0.5),
    "mm_conflict_heavy_ratio": ("multi-master, conflict-heavy", None),
    "mm_local_write_ratio": ("multi-master local writes", None),
    "replica_2_latency_p50_ratio": ("replica latency p50, 1/2 max", None),
    "replica_2_latency_p99_ratio": ("replica latency p99, 1/2 max", None),
    "replica_10_latency_p50_ratio": ("replica latency p50, 1/10 max", None),
    "replica_10_latency_p99_ratio": ("replica latency p99, 1/10 max", None),
    "mm_2_latency_p50_ratio": ("multi-master latency p50, 1/2 max", None),
    "mm_2_latency_p99_ratio": ("multi-master latency p99, 1/2 max", None),
    "mm_10_latency_p50_ratio": ("multi-master latency p50, 1/10 max", None),
    "mm_10_latency_p99_ratio": ("multi-master latency p99, 1/10 max", None),
}


def figures(paths):
    values = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.startswith("result "):
                    continue
                for key, value in re.findall(r"(\w+)=([0-9.]+)", line):
                    values.setdefault(key, []).append(float(value))
    return values


def svg(medians, runs):
    rows = [(k, medians[k]) for k in LABELS if k in medians]
    width, bar_h, gap, left, top = 720, 26, 14, 230, 54
    scale = 380  # pixels per 1.0
    height = top + len(rows) * (bar_h + gap) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="13">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="22" font-weight="bold">pgferry against the native reference, same '
        f'run (median of {runs} run{"s" if runs != 1 else ""}; higher is better)</text>',
        f'<text x="10" y="38" fill="#555">rates: pgferry / native; latencies: native / '
        'pgferry</text>',
    ]
    x1 = left + scale
    out.append(f'<line x1="{x1}" y1="{top - 8}" x2="{x1}" y2="{height - 30}" stroke="#444" '
               'stroke-dasharray="4 3"/>')
    out.append(f'<text x="{x1 - 8}" y="{top - 10}">1.0</text>')
    for i, (key, value) in enumerate(rows):
        label, floor = LABELS[key]
        y = top + i * (bar_h + gap)
        w = max(1, min(value, 1.8) * scale)
        colour = "#68a" if floor is None else ("#2a7" if value >= floor else "#d73")
        out.append(f'<text x="{left - 10}" y="{y + 18}" text-anchor="end">{label}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.0f}" height="{bar_h}" fill="{colour}"/>')
        out.append(f'<text x="{left + w + 6:.0f}" y="{y + 18}">{value:.2f}</text>')
        if floor is not None:
            fx = left + floor * scale
            out.append(f'<line x1="{fx}" y1="{y - 3}" x2="{fx}" y2="{y + bar_h + 3}" '
                       'stroke="black" stroke-width="2"/>')
    out.append(f'<text x="10" y="{height - 14}" fill="#555">black tick: the floor of '
               'issue 11; red: below it, green: at or above, blue: no floor</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    values = figures(sys.argv[2:])
    if not values:
        sys.exit("no `result` lines in the given files")
    medians = {k: statistics.median(v) for k, v in values.items()}
    runs = max(len(v) for k, v in values.items() if k in LABELS)
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write(svg(medians, runs))
    for k in LABELS:
        if k in values:
            print(f"{k}: median {medians[k]:.3f} of {values[k]}")


if __name__ == "__main__":
    main()
