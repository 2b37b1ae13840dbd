#!/usr/bin/env python3
"""Plots the adaptive upload limit of one `upload` run (peers.sh --trace FILE): the limit and the
throughput (files/s, from the `completed` count of successive windows) over time, to a PNG.

usage: scripts/bench/plot_trace.py TRACE.jsonl OUT.png [--title TEXT]
Needs matplotlib (pip install matplotlib).
"""
import json
import sys
from datetime import datetime

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    args = sys.argv[1:]
    title = "adaptive upload limit"
    if "--title" in args:
        i = args.index("--title")
        title = args[i + 1]
        del args[i : i + 2]
    src, out = args
    t, limit, done, lat = [], [], [], []
    for line in open(src):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        f = rec.get("fields", {})
        if f.get("message") != "Limit.":
            continue
        t.append(datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp())
        limit.append(f["limit"])
        done.append(f["completed"])
        lat.append(f["short_ms"])
    if not t:
        sys.exit(f"no limiter windows in {src} (run with RUST_LOG=...limiter=debug --log-format json)")
    t0 = t[0]
    xs = [x - t0 for x in t]
    # Throughput over ~0.5 s spans of windows (single windows are a few ms apart: too noisy).
    rate_x, rate_y = [], []
    j = 0
    for i in range(len(xs)):
        while xs[i] - xs[j] > 0.5:
            j += 1
        if i > j and xs[i] > xs[j]:
            rate_x.append(xs[i])
            rate_y.append((done[i] - done[j]) / (xs[i] - xs[j]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(xs, limit, color="tab:blue", label="limit (uploads in flight allowed)")
    ax.set_xlabel("seconds since the first window")
    ax.set_ylabel("limit", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(rate_x, rate_y, color="tab:orange", alpha=0.8, label="files/s (0.5 s spans)")
    ax2.set_ylabel("files/s", color="tab:orange")
    ax.set_title(title)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"{out}: {len(xs)} windows over {xs[-1]:.1f} s, limit {min(limit):.0f}..{max(limit):.0f}, "
          f"median latency {sorted(lat)[len(lat) // 2]:.0f} ms")


if __name__ == "__main__":
    main()
