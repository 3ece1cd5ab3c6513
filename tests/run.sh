#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the machine lacks, builds once in
# release mode, then runs every test (unit, simulated-VMM integration and conformance against
# the reference daemon vhost-device-vsock).
set -euo pipefail
cd "$(dirname "$0")/.."

# Plugins are WebAssembly components built for wasm32-wasip2 during the normal build.
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "== installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi

PEER_VERSION=0.3.0
PEER_ROOT=target/peer
if [ ! -x "$PEER_ROOT/bin/vhost-device-vsock" ]; then
    echo "== installing vhost-device-vsock $PEER_VERSION (reference daemon) into $PEER_ROOT"
    cargo install vhost-device-vsock --locked --version "$PEER_VERSION" --root "$PEER_ROOT"
fi

# The real-guest tests (tests/tests/guest_qemu.rs) boot QEMU (TCG) with a Debian kernel and an
# initramfs of busybox and socat (tests/guest/build.sh).
GUEST_PKGS="qemu-system-x86 linux-image-amd64 busybox-static socat"
guest_pkgs_missing=
for p in $GUEST_PKGS; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' ||
        guest_pkgs_missing="$guest_pkgs_missing $p"
done
if [ -n "$guest_pkgs_missing" ] || ! command -v qemu-system-x86_64 >/dev/null ||
    ! compgen -G '/boot/vmlinuz-*' >/dev/null || ! command -v busybox >/dev/null ||
    ! command -v socat >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/run.sh: missing${guest_pkgs_missing:- guest tools}; as root run:" >&2
        echo "  apt-get update && apt-get install -y --no-install-recommends $GUEST_PKGS" >&2
        exit 1
    fi
    echo "== installing $GUEST_PKGS (real-guest tests)"
    apt-get update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $GUEST_PKGS
fi

echo "== build"
cargo build --release --workspace --all-targets

echo "== test"
cargo test --release --workspace --no-fail-fast

# Brief fuzzing of the untrusted-input parsers (~20 s per target; docs/fuzzing.md).
echo "== fuzz"
host/fuzz/run.sh
