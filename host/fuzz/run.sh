#!/usr/bin/env bash
# Brief fuzzing pass over every cargo-fuzz target (part of tests/run.sh; see docs/fuzzing.md).
#
#   host/fuzz/run.sh [TARGET...]        all targets when none is named
#
# Installs cargo-fuzz into target/cargo-fuzz if missing, builds the targets once (stable
# toolchain, no sanitizer), then runs each from its committed seeds for FUZZ_SECONDS (default
# 20) seconds, or for FUZZ_RUNS inputs when that is set (long runs). The grown corpus goes to
# target/fuzz/corpus/<target>, crashes to target/fuzz/artifacts/<target>/, the log to
# target/fuzz/<target>.log. Fails if any target crashes, goes past the RSS limit or takes more
# than 10 s on one input.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

CARGO_FUZZ_VERSION=0.13.2
seconds="${FUZZ_SECONDS:-20}"
if [ -n "${FUZZ_RUNS:-}" ]; then bound=(-runs="$FUZZ_RUNS"); else bound=(-max_total_time="$seconds"); fi
tools="$root/target/cargo-fuzz"
out="$root/target/fuzz"
triple="$(rustc -vV | sed -n 's/^host: //p')"
all_targets=(header chain connect_line state_blob vm_arg yaml_config)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

if ! "$tools/bin/cargo-fuzz" --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$tools"
fi

# With --sanitizer none cargo-fuzz passes only stable rustc flags, so the stable toolchain
# builds the targets. rustc-wrapper.sh instruments only the code under test; --codegen-units 16
# keeps the build (wasmtime included) short on 2 cores. The wasm plugins are shared with the
# main build's target dir.
echo "== building fuzz targets"
RUSTC_WRAPPER="$here/rustc-wrapper.sh" \
    VHOST_PLUG_WASM_TARGET_DIR="${VHOST_PLUG_WASM_TARGET_DIR:-$root/target/wasm-plugins}" \
    "$tools/bin/cargo-fuzz" build --sanitizer none --codegen-units 16 --target-dir "$out"
bin_dir="$out/$triple/release"

passed=0
failed=()
for t in "${targets[@]}"; do
    bin="$bin_dir/$t"
    if [ ! -x "$bin" ]; then
        echo "fuzz target $t was not built" >&2
        failed+=("$t")
        continue
    fi
    mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
    log="$out/$t.log"
    echo "== fuzzing $t (${bound[*]})"
    # New inputs go to the first (uncommitted) corpus dir; the seeds are only read.
    if "$bin" "$out/corpus/$t" "corpus/$t" "${bound[@]}" -timeout=10 \
        -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
        >"$log" 2>&1; then
        passed=$((passed + 1))
        { grep -E '^Done [0-9]+ runs|^stat::(average_exec_per_sec|peak_rss_mb)' "$log" || true; } |
            sed "s/^/  $t: /"
        { grep -E 'cov: [0-9]+' "$log" || true; } | tail -n 1 | sed "s/^/  $t: /"
    else
        echo "FUZZ FAILURE in $t (log: $log):" >&2
        grep -E -A 30 '^==[0-9]+== ERROR|panicked at|^SUMMARY|Test unit written' "$log" | head -n 60 >&2 || tail -n 40 "$log" >&2
        failed+=("$t")
    fi
done

echo "fuzz: $passed passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed targets: ${failed[*]}; reproduce with: $bin_dir/TARGET CRASH_FILE" >&2
    exit 1
fi
