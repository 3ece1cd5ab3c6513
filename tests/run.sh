#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the machine lacks, builds once in
# release mode, then runs every test (unit, simulated-VMM integration, conformance against the
# reference daemon vhost-device-vsock, real QEMU guests) and a brief fuzzing pass.
#
# Each phase prints its wall time; the last line sums the test results.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
phase_start=$SECONDS
phase() {
    echo "== $1 (previous phase: $((SECONDS - phase_start)) s)"
    phase_start=$SECONDS
}

# The real-guest tests (tests/tests/guest_qemu.rs, guest_pair.rs) boot QEMU (TCG) with a Debian
# kernel and an initramfs of busybox and socat (tests/guest/build.sh); guest_pair.rs boots both
# of Debian's guest kernels, 6.1 (linux-image-amd64) and 6.12; guest_forward.rs packs the
# daemons themselves into a guest with vsock_loopback (tests/guest/build_forward.sh: objcopy,
# xz for 6.12's modules). apt runs in the background while
# the reference daemon compiles: one waits on the network and dpkg, the other on the CPU.
GUEST_PKGS="qemu-system-x86 linux-image-amd64 linux-image-6.12-amd64 busybox-static socat binutils xz-utils"
guest_pkgs_missing=
for p in $GUEST_PKGS; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' ||
        guest_pkgs_missing="$guest_pkgs_missing $p"
done
apt_pid=
apt_log=$(mktemp)
if [ -n "$guest_pkgs_missing" ] || ! command -v qemu-system-x86_64 >/dev/null ||
    ! compgen -G '/boot/vmlinuz-*' >/dev/null || ! command -v busybox >/dev/null ||
    ! command -v socat >/dev/null || ! command -v objcopy >/dev/null ||
    ! command -v xz >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/run.sh: missing${guest_pkgs_missing:- guest tools}; as root run:" >&2
        echo "  apt-get update && apt-get install -y --no-install-recommends $GUEST_PKGS" >&2
        exit 1
    fi
    phase "installing $GUEST_PKGS (real-guest tests) in the background"
    # shellcheck disable=SC2086
    (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
        --no-install-recommends $GUEST_PKGS) >"$apt_log" 2>&1 &
    apt_pid=$!
fi

# Plugins are WebAssembly components built for wasm32-wasip2 during the normal build.
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    phase "installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi

PEER_VERSION=0.3.0
PEER_ROOT=target/peer
if [ ! -x "$PEER_ROOT/bin/vhost-device-vsock" ]; then
    phase "installing vhost-device-vsock $PEER_VERSION (reference daemon) into $PEER_ROOT"
    # On PATH for this command only, so cargo does not warn that it is not.
    PATH="$PWD/$PEER_ROOT/bin:$PATH" cargo install vhost-device-vsock --locked \
        --version "$PEER_VERSION" --root "$PEER_ROOT"
fi

if [ -n "$apt_pid" ]; then
    phase "waiting for apt"
    if ! wait "$apt_pid"; then
        tail -n 40 "$apt_log" >&2
        echo "tests/run.sh: installing $GUEST_PKGS failed" >&2
        exit 1
    fi
fi
rm -f "$apt_log"

phase "build"
cargo build --release --workspace --all-targets

# The README's run command must reuse this build: every dependency of the daemon resolves the
# same features whichever packages are selected (host/workspace-hack).
phase "checking that 'cargo run --release -p vhost-plug' compiles nothing more"
if rebuilt=$(cargo build --release -p vhost-plug 2>&1 | grep -E '^\s+Compiling'); then
    echo "$rebuilt" >&2
    echo "tests/run.sh: building -p vhost-plug alone compiled the crates above again" >&2
    exit 1
fi

phase "test"
test_log=$(mktemp)
status=0
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$test_log" || status=$?

# Brief fuzzing of the untrusted-input parsers (~20 s per target, two at a time;
# docs/fuzzing.md).
phase "fuzz"
fuzz_status=0
host/fuzz/run.sh || fuzz_status=$?

phase "done in $((SECONDS - start)) s"
read -r passed failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$test_log")
rm -f "$test_log"
echo "tests: $passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$fuzz_status" -eq 0 ]
