#!/usr/bin/env bash
# Brief fuzzing pass over every libFuzzer target (part of tests/run.sh; see docs/fuzzing.md).
#
#   host/fuzz/run.sh [TARGET...]        all targets when none is named
#
# Builds the targets once with cargo and the rustc flags cargo-fuzz uses for
# `--sanitizer none` (stable toolchain; no cargo-fuzz install needed), then runs each from its
# committed seeds for FUZZ_SECONDS (default 20) seconds, or for FUZZ_RUNS inputs when that is
# set (long runs), FUZZ_JOBS (default: the number of cores) targets at a time. The grown
# corpus goes to target/fuzz/corpus/<target>, crashes to target/fuzz/artifacts/<target>/, the
# log to target/fuzz/<target>.log. Fails if any target crashes, goes past the RSS limit or
# takes more than 10 s on one input.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

seconds="${FUZZ_SECONDS:-20}"
jobs="${FUZZ_JOBS:-$(nproc)}"
if [ -n "${FUZZ_RUNS:-}" ]; then bound=(-runs="$FUZZ_RUNS"); else bound=(-max_total_time="$seconds"); fi
out="$root/target/fuzz"
triple="$(rustc -vV | sed -n 's/^host: //p')"
all_targets=(header chain connect_line state_blob vm_arg yaml_config)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

# The flags `cargo fuzz build --sanitizer none` passes (cargo-fuzz 0.13 src/project.rs), plus
# debug assertions and overflow checks so arithmetic overflow is a finding. `--target` keeps
# them away from build scripts and proc macros; rustc-wrapper.sh keeps the coverage pass only
# for the code under test. The targets depend on vhost-plug-parse alone: no wasmtime here.
sancov="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
sancov+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
sancov+=" -Cllvm-args=-sanitizer-coverage-pc-table"
sancov+=" -Cllvm-args=-sanitizer-coverage-trace-compares"
sancov+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0"
sancov+=" -Cllvm-args=-sanitizer-coverage-stack-depth"
sancov+=" --cfg fuzzing -Clink-dead-code -Cdebug-assertions -Coverflow-checks"
echo "== building fuzz targets"
CARGO_FUZZ=1 RUSTFLAGS="$sancov ${RUSTFLAGS:-}" RUSTC_WRAPPER="$here/rustc-wrapper.sh" \
    cargo build --manifest-path "$here/Cargo.toml" --locked --release --bins \
    --target "$triple" --target-dir "$out" --config profile.release.debug=true
bin_dir="$out/$triple/release"

# Runs one target; prints its summary, and its failure to stderr.
fuzz_one() {
    local t="$1" bin="$bin_dir/$1" log="$out/$1.log"
    if [ ! -x "$bin" ]; then
        echo "fuzz target $t was not built" >&2
        return 1
    fi
    mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
    # New inputs go to the first (uncommitted) corpus dir; the seeds are only read.
    if "$bin" "$out/corpus/$t" "corpus/$t" "${bound[@]}" -timeout=10 \
        -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
        >"$log" 2>&1; then
        { grep -E '^Done [0-9]+ runs|^stat::(average_exec_per_sec|peak_rss_mb)' "$log" || true; } |
            sed "s/^/  $t: /"
        { grep -E 'cov: [0-9]+' "$log" || true; } | tail -n 1 | sed "s/^/  $t: /"
    else
        echo "FUZZ FAILURE in $t (log: $log):" >&2
        grep -E -A 30 '^==[0-9]+== ERROR|panicked at|^SUMMARY|Test unit written' "$log" | head -n 60 >&2 || tail -n 40 "$log" >&2
        return 1
    fi
}

echo "== fuzzing ${targets[*]} (${bound[*]}, $jobs at a time)"
passed=0
failed=()
pids=()
names=()
reap() {
    if wait "${pids[0]}"; then passed=$((passed + 1)); else failed+=("${names[0]}"); fi
    pids=("${pids[@]:1}")
    names=("${names[@]:1}")
}
for t in "${targets[@]}"; do
    [ ${#pids[@]} -lt "$jobs" ] || reap
    fuzz_one "$t" >"$out/$t.summary" 2>&1 &
    pids+=($!)
    names+=("$t")
done
while [ ${#pids[@]} -gt 0 ]; do reap; done
for t in "${targets[@]}"; do cat "$out/$t.summary" 2>/dev/null || true; done

echo "fuzz: $passed targets passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed targets: ${failed[*]}; reproduce with: $bin_dir/TARGET CRASH_FILE" >&2
    exit 1
fi
