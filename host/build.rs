//! Builds the first-party WebAssembly plugins (plugins/ and examples/) for `wasm32-wasip2` with a
//! nested cargo and tells the crate where they are:
//! - `VHOST_PLUG_PLUGIN_DIR` (rustc env): directory holding every built `*.wasm`, used by tests,
//!   benches and `plugin::builtin` (which embeds the defaults with `include_bytes!`).
//!
//! The nested build has its own target dir next to the outer one (`<target>/wasm-plugins`), so it
//! never competes for the outer build's lock. Set `VHOST_PLUG_WASM_TARGET_DIR` to override.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=VHOST_PLUG_WASM_TARGET_DIR");
    for p in ["wit", "plugins", "examples"] {
        watch(&root.join(p));
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    check_target_installed(&rustc);

    // OUT_DIR = <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out
    let target_dir = env::var_os("VHOST_PLUG_WASM_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            out_dir
                .ancestors()
                .nth(4)
                .map(|t| t.join("wasm-plugins"))
                .unwrap_or_else(|| out_dir.join("wasm-plugins"))
        });
    let manifests = [
        root.join("plugins/Cargo.toml"),
        root.join("examples/deny-ports/Cargo.toml"),
    ];
    for manifest in &manifests {
        build_workspace(&cargo, manifest, &target_dir);
    }
    let wasm_dir = target_dir.join(WASM_TARGET).join("release");
    for name in EXPECTED {
        let f = wasm_dir.join(format!("{name}.wasm"));
        if !f.is_file() {
            panic!("plugin build did not produce {}", f.display());
        }
    }
    println!(
        "cargo:rustc-env=VHOST_PLUG_PLUGIN_DIR={}",
        wasm_dir.display()
    );
}

/// Plugins the host crate embeds or its tests load.
const EXPECTED: &[&str] = &[
    "allow_group",
    "port_allowlist",
    "port_allowlist_v1",
    "peer_allowlist",
    "tcp_bridge",
    "proxy_bridge",
    "proxy_bridge_v2",
    "audit",
    "serializer_postcard",
    "serializer_json",
    "serializer_postcard_v1",
    "hostile_loop",
    "hostile_trap",
    "hostile_alloc",
    "hostile_huge_deny",
    "hostile_bad_redirect",
    "hostile_wrong_world",
    "hostile_no_stateful",
    "hostile_escape",
    "hostile_sleep",
    "hostile_big_memory",
    "deny_ports",
];

fn watch(dir: &Path) {
    // Cargo scans a directory's whole tree for changes; skip build outputs that a developer may
    // have created inside (plugins/target, examples/*/target).
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            watch(&p);
        } else {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}

fn target_installed(rustc: &str) -> bool {
    match Command::new(rustc).args(["--print", "sysroot"]).output() {
        Ok(o) if o.status.success() => {
            let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Path::new(&sysroot)
                .join("lib/rustlib")
                .join(WASM_TARGET)
                .is_dir()
        }
        _ => false,
    }
}

/// Makes sure the wasm target exists, adding it with rustup when it is missing, so that a plain
/// `cargo build` works on a fresh machine.
fn check_target_installed(rustc: &str) {
    if target_installed(rustc) {
        return;
    }
    eprintln!("vhost-plug: installing the Rust target {WASM_TARGET} (rustup target add)");
    let added = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .is_ok_and(|s| s.success());
    if !added || !target_installed(rustc) {
        panic!(
            "\n\nThe Rust target `{WASM_TARGET}` is not installed; the plugins in plugins/ are built for it.\n\
             Run:  rustup target add {WASM_TARGET}\n\n"
        );
    }
}

fn build_workspace(cargo: &str, manifest: &Path, target_dir: &Path) {
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
    ])
    .arg(manifest)
    .arg("--target-dir")
    .arg(target_dir);
    // Settings meant for the outer (host) build must not leak into the wasm build.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    // Build-script stdout is parsed by cargo: keep the nested build on stderr.
    cmd.stdout(std::process::Stdio::from(std::io::stderr()));
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cargo}: {e}"));
    if !status.success() {
        panic!(
            "building the wasm plugins in {} failed ({status})",
            manifest.display()
        );
    }
}
