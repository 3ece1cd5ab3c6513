#!/usr/bin/env bash
# RUSTC_WRAPPER for the fuzz build (host/fuzz/run.sh): keeps cargo-fuzz's coverage
# instrumentation (the sancov pass) for the code under test, the parsers it builds on and the
# fuzz targets themselves (generic code such as ChainBuf::new is compiled into the crate that
# instantiates it), and drops it for everything else. Instrumenting wasmtime and cranelift too
# makes libFuzzer scan their coverage counters after every input (~75% of the state_blob
# target's time) and slows the build.
rustc="$1"
shift
crate=
prev=
for a in "$@"; do
    [ "$prev" = "--crate-name" ] && crate="$a"
    prev="$a"
done
case "$crate" in
vhost_plug_parse | vm_memory | virtio_queue | serde_yaml | unsafe_libyaml | \
    header | chain | connect_line | state_blob | vm_arg | yaml_config)
    exec "$rustc" "$@"
    ;;
esac
args=()
for a in "$@"; do
    [ "$a" = "-Cpasses=sancov-module" ] || args+=("$a")
done
exec "$rustc" "${args[@]}"
