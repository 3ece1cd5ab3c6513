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

echo "== build"
cargo build --release --workspace --all-targets

echo "== test"
cargo test --release --workspace --no-fail-fast
