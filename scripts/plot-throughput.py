#!/usr/bin/env python3
"""Throughput by write size, both daemons and the reference (docs/bench-throughput.png).

Usage: plot-throughput.py SWEEP_CSV OUT_PNG MACHINE_TXT [WINDOW_SWEEP_CSV [WINDOW_LABEL]]
SWEEP_CSV is bench's sweep.csv at each daemon's defaults; WINDOW_SWEEP_CSV (dashed lines) the
sweep of a second run with one tx-buffer-size for both daemons. Called by scripts/bench.sh.
"""
import csv, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src, dst, machine, window = sys.argv[1:5]
# Label of the dashed lines: the window both daemons had in the second run.
wlabel = sys.argv[5] if len(sys.argv) > 5 else "tx-buffer-size 1 MiB"
rows = list(csv.DictReader(open(src)))
wrows = list(csv.DictReader(open(window))) if os.path.exists(window) else []
info = dict(l.split(": ", 1) for l in open(machine).read().splitlines() if ": " in l)
styles = {
    "vhost-plug": dict(color="tab:blue", marker="o"),
    "vhost-device-vsock": dict(color="tab:orange", marker="s"),
    "socketpair+memcpy": dict(color="gray", marker="", linestyle="--"),
}
titles = {"h2g": "host -> guest", "g2h": "guest -> host"}
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
for ax, d in zip(axes, ["h2g", "g2h"]):
    for who, st in styles.items():
        pts = sorted((int(r["write_bytes"]), float(r["mib_s"]))
                     for r in rows if r["daemon"] == who and r["direction"] == d)
        if not pts:
            continue
        xs, ys = zip(*pts)
        label = who if who != "socketpair+memcpy" else "reference: socketpair + 1 memcpy"
        ax.plot(xs, ys, label=label, **st)
        if who != "socketpair+memcpy":
            below = who == "vhost-device-vsock"
            for x, y in pts:
                ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points",
                            xytext=(0, -13 if below else 6),
                            ha="center", fontsize=8, color=st["color"])
            wpts = sorted((int(r["write_bytes"]), float(r["mib_s"]))
                          for r in wrows if r["daemon"] == who and r["direction"] == d)
            if wpts:
                xs, ys = zip(*wpts)
                ax.plot(xs, ys, label=f"{who}, {wlabel}", color=st["color"],
                        marker=st["marker"], linestyle=":", alpha=0.5, markersize=4)
    ax.set_xscale("log", base=2)
    xt = sorted({int(r["write_bytes"]) for r in rows})
    ax.set_xticks(xt)
    ax.set_xticklabels([f"{x // 1024} KiB" for x in xt])
    ax.set_title(titles[d])
    ax.set_xlabel("write size (one connection)")
    ax.grid(True, alpha=0.3)
# After all lines are drawn: the y axis is shared, so an earlier limit would cut them off.
axes[0].set_ylim(bottom=0)
axes[0].set_ylabel("MiB/s (median)")
axes[1].legend(loc="upper left", fontsize=8)
fig.suptitle("vhost-user vsock stream throughput, simulated VMM + guest driver, checksummed"
             f"\n{info.get('nproc', '?')} cores, {info.get('cpu', '?')}, {info.get('date', '')}",
             fontsize=10)
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
