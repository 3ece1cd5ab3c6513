#!/usr/bin/env bash
# Side-by-side benchmark of vhost-plug and vhost-device-vsock 0.3.0 (design.md section 6):
# builds in release mode, installs the reference daemon if missing, runs every scenario for
# both daemons in one run (tests/src/bin/bench.rs), then writes the table and the plot.
#
#   bash scripts/bench.sh [bench args...]    e.g. --quick, --reps 5 (output dir: BENCH_OUT)
#
# The run ends with the QEMU section: the same kinds of figures through a real Linux guest
# under QEMU/TCG (tests/src/bench/qemu.rs), a few minutes.
#
# Output: target/bench/{table.md,sweep.csv,raw.csv,machine.txt,load.txt,vmstat.txt},
# target/bench/txbuf-256k/ (throughput with tx-buffer-size 256 KiB for both daemons; BENCH_WINDOW
# sets another, BENCH_SKIP_WINDOW=1 skips it) and
# docs/bench-throughput.png (throughput by write size, both daemons and the reference) and
# docs/bench-density.png (start-up time, RSS and threads by number of VMs, both daemons).
# Run it on a quiet machine: it has 2 cores and every scenario keeps both busy.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${BENCH_OUT:-target/bench}
PLOT=docs/bench-throughput.png
PEER_VERSION=0.3.0
PEER_ROOT=target/peer

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "== installing the wasm32-wasip2 target (plugins)"
    rustup target add wasm32-wasip2
fi
if [ ! -x "$PEER_ROOT/bin/vhost-device-vsock" ]; then
    echo "== installing vhost-device-vsock $PEER_VERSION (reference daemon) into $PEER_ROOT"
    cargo install vhost-device-vsock --locked --version "$PEER_VERSION" --root "$PEER_ROOT"
fi

# The QEMU section (bench group `qemu`) boots a real Linux guest under TCG, built from these
# Debian packages by tests/guest/build.sh; without them (and not root) it is skipped.
GUEST_PKGS="qemu-system-x86 linux-image-amd64 busybox-static socat"
if ! command -v qemu-system-x86_64 >/dev/null || ! compgen -G '/boot/vmlinuz-*' >/dev/null ||
    ! command -v busybox >/dev/null || ! command -v socat >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "== installing $GUEST_PKGS (QEMU section)"
        apt-get update
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $GUEST_PKGS
    else
        echo "warning: $GUEST_PKGS missing and not root: the QEMU section will fail" >&2
    fi
fi

echo "== build (release)"
cargo build --release -p vhost-plug --bin vhost-plug
cargo build --release -p vhost-plug-tests --bin bench

mkdir -p "$OUT" docs
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -r)"
    echo "rustc: $(rustc --version)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# Machine load around the run: load averages and a CPU sample every 2 s (vmstat's us+sy
# includes the benchmark itself; the "before" line is the background load).
# Percentage of the machine's CPU time that was busy over 5 s (from /proc/stat).
cpu_busy() {
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat)
    sleep 5
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat)
    echo "$a $b" | awk '{busy=$3-$1; idle=$4-$2; printf "%.0f%%", 100*busy/(busy+idle)}'
}
BUSY_BEFORE=$(cpu_busy)
{
    echo "background CPU busy before the run (5 s): $BUSY_BEFORE"
    echo "loadavg before: $(cat /proc/loadavg)"
    top -bn1 | sed -n '1,12p'
} > "$OUT/load.txt"
if [ "${BUSY_BEFORE%\%}" -gt 10 ]; then
    echo "warning: the machine is already $BUSY_BEFORE busy; figures will be noisy" >&2
fi
vmstat 2 > "$OUT/vmstat.txt" 2>/dev/null &
VMSTAT=$!
trap 'kill "$VMSTAT" 2>/dev/null || true' EXIT

# The density group creates thousands of sockets: on a tmpfs, as under /run on most hosts,
# rather than on the disk filesystem of the target dir.
if [ -z "${BENCH_SOCKET_DIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export BENCH_SOCKET_DIR=/dev/shm
fi

echo "== run"
target/release/bench --out "$OUT" "$@"
# Supplement: the same throughput sweep with one per-connection buffer for both daemons
# (tx-buffer-size, advertised to the guest as buf_alloc; BENCH_WINDOW bytes, default 256 KiB,
# Linux's default), so the daemons are compared at equal credit windows as well as at their
# defaults (vhost-plug 256 KiB, vhost-device-vsock 64 KiB).
WINDOW=${BENCH_WINDOW:-262144}
WINDOW_OUT="$OUT/txbuf-$((WINDOW / 1024))k"
if [ "${BENCH_SKIP_WINDOW:-0}" != 1 ]; then
    echo "== run (tx-buffer-size $WINDOW for both)"
    target/release/bench --out "$WINDOW_OUT" --only tput --tx-buffer-size "$WINDOW" "$@"
fi

kill "$VMSTAT" 2>/dev/null || true
{
    echo "loadavg after: $(cat /proc/loadavg)"
    echo "background CPU busy after the run (5 s): $(cpu_busy)"
} >> "$OUT/load.txt"

echo "== plot"
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    python3 -m pip install --quiet matplotlib
fi
python3 scripts/plot-throughput.py "$OUT/sweep.csv" "$PLOT" "$OUT/machine.txt" \
    "$WINDOW_OUT/sweep.csv" "tx-buffer-size $((WINDOW / 1024)) KiB for both"

if [ -f "$OUT/density.csv" ]; then
python3 - "$OUT/density.csv" docs/bench-density.png "$OUT/machine.txt" <<'EOF'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

src, dst, machine = sys.argv[1:4]
rows = list(csv.DictReader(open(src)))
info = dict(l.split(": ", 1) for l in open(machine).read().splitlines() if ": " in l)
styles = {"vhost-plug": dict(color="tab:blue", marker="o"),
          "vhost-device-vsock": dict(color="tab:orange", marker="s")}
panels = [("ready_ms", "time until every socket exists (ms)"),
          ("rss_kib", "RSS, idle (KiB)"),
          ("threads", "threads, idle")]
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
for ax, (col, title) in zip(axes, panels):
    for who, st in styles.items():
        pts = sorted((int(r["vms"]), float(r[col])) for r in rows if r["daemon"] == who)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=who, **st)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("VMs in one daemon")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
axes[0].legend(fontsize=8)
fig.suptitle(f"density: one daemon, N idle VMs (medians)\n{info.get('nproc', '?')} cores, "
             f"{info.get('cpu', '?')}, {info.get('date', '')}", fontsize=10)
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
EOF
fi

echo "== table ($OUT/table.md)"
cat "$OUT/table.md"
