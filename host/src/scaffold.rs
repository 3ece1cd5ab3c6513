//! `vhost-plug plugin new`: a plugin crate that builds on its own.
//!
//! The crate gets copies of the WIT package and of the SDK this binary was built with (taken
//! in at compile time with `include_str!`), and the plugins workspace's `Cargo.lock` so that it
//! resolves to the dependency versions the first-party plugins are tested with. Nothing in it
//! points back at the vhost-plug repository: `cargo build --release --target wasm32-wasip2`
//! works wherever it is created.
//!
//! Layout (the vendored SDK sits at `vendor/sdk/<world>` so that its
//! `wit_bindgen::generate!(path: "../../../wit")` finds the crate's own `wit/`):
//!
//! ```text
//! NAME/Cargo.toml  Cargo.lock  README.md  .gitignore
//! NAME/src/lib.rs                 the plugin (policy, bridge or serializer template)
//! NAME/wit/{types,policy,worlds}.wit
//! NAME/vendor/sdk/                vhost-plug-sdk (helpers)
//! NAME/vendor/sdk/<world>/        vhost-plug-sdk-<world> (bindings, trait, export macro)
//! ```

use std::path::{Path, PathBuf};

use crate::plugin::PluginKind;

/// Why a plugin crate could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "`{0}` is not a usable crate name: use 1 to 64 ASCII letters, digits, '-' or '_', \
         starting with a letter"
    )]
    BadName(String),
    #[error("{} already exists; choose another name or --dir", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The `wit-bindgen` dependency of the plugins workspace (the SDK's only dependency).
const WIT_BINDGEN: &str = r#"wit-bindgen = { version = "0.46", default-features = false, features = ["macros", "realloc", "std", "bitflags"] }"#;

/// Same size-first release profile as the first-party plugins.
const RELEASE_PROFILE: &str = r#"[profile.release]
opt-level = "s"
lto = true
strip = true
codegen-units = 1
panic = "abort"
"#;

const WIT: &[(&str, &str)] = &[
    ("types.wit", include_str!("../../wit/types.wit")),
    ("policy.wit", include_str!("../../wit/policy.wit")),
    ("worlds.wit", include_str!("../../wit/worlds.wit")),
];

const LOCKFILE: &str = include_str!("../../plugins/Cargo.lock");
const SDK_MANIFEST: &str = include_str!("../../plugins/sdk/Cargo.toml");
const SDK_LIB: &str = include_str!("../../plugins/sdk/src/lib.rs");

/// Files of one world: the SDK crate (manifest, source), the plugin source, extra plugin
/// files and extra dependency lines.
struct World {
    sdk_manifest: &'static str,
    sdk_lib: &'static str,
    plugin: &'static str,
    extra_files: &'static [(&'static str, &'static str)],
    extra_deps: &'static str,
    /// What the template does, for the README.
    about: &'static str,
    /// A `--plugin` example for the README.
    usage: &'static str,
}

fn world(kind: PluginKind) -> World {
    match kind {
        PluginKind::Policy => World {
            sdk_manifest: include_str!("../../plugins/sdk/policy/Cargo.toml"),
            sdk_lib: include_str!("../../plugins/sdk/policy/src/lib.rs"),
            plugin: include_str!("../templates/policy.rs"),
            extra_files: &[],
            extra_deps: "",
            about: "refuses the destination ports listed in `config=deny=P,Q` and counts the \
                    refusals in a versioned state",
            usage: "--plugin policy=PATH,config=deny=22,23",
        },
        PluginKind::Bridge => World {
            sdk_manifest: include_str!("../../plugins/sdk/bridge/Cargo.toml"),
            sdk_lib: include_str!("../../plugins/sdk/bridge/src/lib.rs"),
            plugin: include_str!("../templates/bridge.rs"),
            extra_files: &[],
            extra_deps: "",
            about: "routes destination ports by `config=map=PORT=tcp:HOST:PORT,PORT=unix:PATH`",
            usage: "--plugin bridge=PATH,config=map=80=tcp:127.0.0.1:8080 \
                    --allow-route tcp:127.0.0.1:8080",
        },
        PluginKind::Serializer => World {
            sdk_manifest: include_str!("../../plugins/sdk/serializer/Cargo.toml"),
            sdk_lib: include_str!("../../plugins/sdk/serializer/src/lib.rs"),
            // The default serializer is the template: a complete, schema-versioned encoder.
            plugin: include_str!("../../plugins/serializer-postcard/src/lib.rs"),
            extra_files: &[(
                "src/model.rs",
                include_str!("../../plugins/serializer-postcard/src/model.rs"),
            )],
            extra_deps: "serde = { version = \"1\", default-features = false, features = \
                         [\"derive\", \"alloc\"] }\npostcard = { version = \"1\", \
                         default-features = false, features = [\"alloc\"] }\n",
            about: "is a copy of the built-in serializer-postcard (magic `VPPC`, schema 1, \
                    postcard body); change the magic and the model in src/model.rs",
            usage: "--plugin serializer=PATH",
        },
    }
}

/// Checks `name` is a crate name cargo takes and that makes a sane directory name.
pub fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ScaffoldError::BadName(name.to_string()))
    }
}

/// The `.wasm` file cargo makes for crate `name` (`-` becomes `_`).
pub fn wasm_file_name(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

/// Creates the crate `parent/name` for a plugin of `kind` and returns its directory. Refuses
/// to touch a directory that already exists.
pub fn new_plugin(name: &str, kind: PluginKind, parent: &Path) -> Result<PathBuf, ScaffoldError> {
    check_name(name)?;
    let root = parent.join(name);
    if root.symlink_metadata().is_ok() {
        return Err(ScaffoldError::Exists(root));
    }
    let w = world(kind);
    let mut files: Vec<(String, String)> = vec![
        ("Cargo.toml".into(), manifest(name, kind, &w)),
        ("Cargo.lock".into(), LOCKFILE.into()),
        ("README.md".into(), readme(name, kind, &w)),
        (".gitignore".into(), "/target\n".into()),
        ("src/lib.rs".into(), w.plugin.into()),
        ("vendor/sdk/Cargo.toml".into(), SDK_MANIFEST.into()),
        ("vendor/sdk/src/lib.rs".into(), SDK_LIB.into()),
        (
            format!("vendor/sdk/{kind}/Cargo.toml"),
            w.sdk_manifest.into(),
        ),
        (format!("vendor/sdk/{kind}/src/lib.rs"), w.sdk_lib.into()),
    ];
    files.extend(
        WIT.iter()
            .map(|(f, text)| (format!("wit/{f}"), text.to_string())),
    );
    files.extend(
        w.extra_files
            .iter()
            .map(|(f, t)| (f.to_string(), t.to_string())),
    );
    // `create_dir` (not `create_dir_all`) for the root: a racing creator makes us fail, not
    // write into its directory.
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScaffoldError::Io { path, source }
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    std::fs::create_dir(&root).map_err(io(&root))?;
    for (rel, text) in files {
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(root)
}

fn manifest(name: &str, kind: PluginKind, w: &World) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let wasm = wasm_file_name(name);
    let extra = w.extra_deps;
    format!(
        r#"# A vhost-plug {kind} plugin, made by `vhost-plug plugin new` ({version}).
#   cargo build --release --target wasm32-wasip2
#   -> target/wasm32-wasip2/release/{wasm}
# vendor/ (the SDK) and wit/ (the WIT package) are copies of what vhost-plug {version} was
# built with; Cargo.lock pins the versions its first-party plugins are tested with.
[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
vhost-plug-sdk-{kind} = {{ path = "vendor/sdk/{kind}" }}
{extra}
# The vendored SDK crates (members by being path dependencies inside this directory) take
# their package fields and dependencies from here.
[workspace]
resolver = "2"

[workspace.package]
version = "{version}"
edition = "2021"
license = "Apache-2.0 OR BSD-3-Clause"
publish = false

[workspace.dependencies]
{WIT_BINDGEN}
vhost-plug-sdk = {{ path = "vendor/sdk" }}

{RELEASE_PROFILE}"#
    )
}

fn readme(name: &str, kind: PluginKind, w: &World) -> String {
    let wasm = wasm_file_name(name);
    let (about, usage) = (w.about, w.usage);
    let toml = match kind {
        PluginKind::Policy => r#"policy = [{ path = "PATH", config = "deny=22" }]"#,
        PluginKind::Bridge => r#"bridge = { path = "PATH", config = "map=80=tcp:127.0.0.1:8080" }"#,
        PluginKind::Serializer => r#"serializer = { path = "PATH" }"#,
    };
    format!(
        r#"# {name}

A vhost-plug {kind} plugin. As created, it {about}.

```sh
rustup target add wasm32-wasip2            # once
cargo build --release --target wasm32-wasip2
vhost-plug plugin check target/wasm32-wasip2/release/{wasm}
```

Load it with `vhost-plug ... {usage}` (PATH = the `.wasm` above), or from a TOML config
file (`vhost-plug --config FILE.toml`), in `[plugins]` or a VM's `[vm.plugins]`:

```toml
{toml}
```

- `src/lib.rs` is the plugin; `vendor/sdk/{kind}` the SDK (trait, `export_*!` macro, host
  functions `log`, `now_ns`, `config`); `wit/` the interface it implements.
- The plugin runs sandboxed: no files, network or environment, no waiting (sleep traps);
  64 MiB of memory and a CPU budget of 100 million wasm instructions per call. A trap, an
  exhausted budget or an invalid answer fails closed (that connection is refused).
- The plugin author guide is docs/plugins.md in the vhost-plug repository.
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["p", "my-policy", "My_Policy2"] {
            check_name(good).expect(good);
        }
        for bad in ["", "1abc", "-x", "a/b", "..", "a b", "é", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(wasm_file_name("my-policy"), "my_policy.wasm");
    }

    #[test]
    fn the_vendored_dependency_matches_the_plugins_workspace() {
        let workspace = include_str!("../../plugins/Cargo.toml");
        assert!(
            workspace.lines().any(|l| l == WIT_BINDGEN),
            "plugins/Cargo.toml changed its wit-bindgen line; update scaffold::WIT_BINDGEN"
        );
        assert!(
            workspace.contains(RELEASE_PROFILE),
            "release profile drifted"
        );
        // The SDK finds the WIT package three levels up: vendor/sdk/<world> -> the crate root.
        for kind in [
            PluginKind::Policy,
            PluginKind::Bridge,
            PluginKind::Serializer,
        ] {
            assert!(world(kind).sdk_lib.contains(r#"path: "../../../wit""#));
        }
    }

    #[test]
    fn creates_every_file_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, kind) in [
            ("p1", PluginKind::Policy),
            ("b-1", PluginKind::Bridge),
            ("s_1", PluginKind::Serializer),
        ] {
            let root = new_plugin(name, kind, dir.path()).expect("scaffold");
            assert_eq!(root, dir.path().join(name));
            for f in [
                "Cargo.toml",
                "Cargo.lock",
                "README.md",
                ".gitignore",
                "src/lib.rs",
                "wit/types.wit",
                "wit/policy.wit",
                "wit/worlds.wit",
                "vendor/sdk/Cargo.toml",
                "vendor/sdk/src/lib.rs",
            ] {
                assert!(root.join(f).is_file(), "{name}: {f} missing");
            }
            let sdk = root.join(format!("vendor/sdk/{kind}"));
            assert!(sdk.join("Cargo.toml").is_file() && sdk.join("src/lib.rs").is_file());
            let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("manifest");
            assert!(manifest.contains(&format!("name = \"{name}\"")));
            assert!(manifest.contains(&format!("vhost-plug-sdk-{kind} = {{ path")));
            // Nothing of this machine leaks into the crate.
            assert!(!manifest.contains(env!("CARGO_MANIFEST_DIR")));
            assert!(matches!(
                new_plugin(name, kind, dir.path()),
                Err(ScaffoldError::Exists(_))
            ));
        }
        assert!(dir.path().join("s_1/src/model.rs").is_file());
        assert!(matches!(
            new_plugin("../x", PluginKind::Policy, dir.path()),
            Err(ScaffoldError::BadName(_))
        ));
    }
}
