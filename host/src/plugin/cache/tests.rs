//! The artifact cache uses only artifacts that are ours, intact and made for this engine;
//! anything else is compiled again, never loaded and never a crash.
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{ArtifactCache, CacheDir, MAGIC};
use crate::plugin::{builtin, PluginError, PluginRuntime, RuntimeConfig};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "vhost-plug-cache-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runtime(cache: CacheDir) -> PluginRuntime {
    PluginRuntime::new(RuntimeConfig {
        cache: Some(cache),
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

const SOURCE: &[u8] = builtin::ALLOW_GROUP;

fn artifact_path(rt: &PluginRuntime, dir: &Path) -> PathBuf {
    dir.join(ArtifactCache::key(&rt.shared.engine, SOURCE))
}

/// Loads SOURCE and checks the plugin answers a decision.
fn load_and_use(rt: &PluginRuntime) {
    let p = rt.load_bytes("allow-group", SOURCE, "").expect("load");
    let chain = crate::plugin::PolicyChain::new(rt, "vm3", &[p]).expect("instantiate");
    assert!(chain.names() == ["allow-group"]);
}

fn inode(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).expect("artifact").ino()
}

/// The file is a valid artifact of ours again: header, checksum, mode 0600.
fn assert_rewritten(p: &Path) {
    let b = std::fs::read(p).expect("artifact");
    assert_eq!(&b[..MAGIC.len()], MAGIC);
    assert_eq!(Sha256::digest(&b[48..])[..], b[16..48]);
    let mode = std::fs::metadata(p).expect("meta").mode() & 0o777;
    assert_eq!(mode, 0o600);
}

fn wrap(artifact: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&Sha256::digest(artifact));
    f.extend_from_slice(artifact);
    f
}

#[test]
fn artifacts_are_private_and_reused() {
    let t = TempDir::new("reuse");
    let dir = t.0.join("cache");
    let rt = runtime(CacheDir::required(dir.clone()));
    load_and_use(&rt);
    let art = artifact_path(&rt, &dir);
    assert_rewritten(&art);
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    // A second runtime (a later start) takes the artifact as it is.
    let ino = inode(&art);
    let rt2 = runtime(CacheDir::required(dir.clone()));
    load_and_use(&rt2);
    assert_eq!(inode(&art), ino, "artifact was rewritten instead of reused");
}

/// Writes `content` where the artifact goes, loads, and checks that it was replaced by a
/// fresh compile.
fn rejected_and_recompiled(tag: &str, content: &[u8], mode: u32) {
    let t = TempDir::new(tag);
    let dir = t.0.join("cache");
    let rt = runtime(CacheDir::required(dir.clone()));
    crate::sys::create_private_dir(&dir).unwrap();
    let art = artifact_path(&rt, &dir);
    std::fs::write(&art, content).unwrap();
    std::fs::set_permissions(&art, std::fs::Permissions::from_mode(mode)).unwrap();
    let ino = inode(&art);
    load_and_use(&rt);
    assert_ne!(inode(&art), ino, "{tag}: the bad artifact was kept");
    assert_rewritten(&art);
}

#[test]
fn corrupt_artifacts_are_recompiled() {
    let good = {
        let t = TempDir::new("unused");
        let rt = runtime(CacheDir::required(t.0.clone()));
        rt.shared
            .engine
            .precompile_component(SOURCE)
            .expect("precompile")
    };
    rejected_and_recompiled("garbage", b"\x7fELF not really an artifact", 0o600);
    rejected_and_recompiled("empty", b"", 0o600);
    rejected_and_recompiled("raw", &good, 0o600);
    let mut truncated = wrap(&good);
    truncated.truncate(truncated.len() / 2);
    rejected_and_recompiled("truncated", &truncated, 0o600);
    let mut flipped = wrap(&good);
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    rejected_and_recompiled("bitflip", &flipped, 0o600);
    // Intact, but writable by others: not ours to trust.
    rejected_and_recompiled("loose-mode", &wrap(&good), 0o666);
}

#[test]
fn foreign_artifacts_are_recompiled() {
    // Intact and well-formed, but made by an engine with other settings (no fuel, no epochs:
    // its code would run plugins without their CPU budget).
    let mut cfg = wasmtime::Config::new();
    cfg.wasm_component_model(true);
    let other = wasmtime::Engine::new(&cfg).expect("engine");
    let foreign = other.precompile_component(SOURCE).expect("precompile");
    rejected_and_recompiled("foreign-engine", &wrap(&foreign), 0o600);
    // A core module, not a component.
    let module = other
        .precompile_module(b"\0asm\x01\0\0\0")
        .expect("precompile module");
    rejected_and_recompiled("module", &wrap(&module), 0o600);
}

#[test]
fn symlinked_artifact_is_not_followed() {
    let t = TempDir::new("symlink");
    let dir = t.0.join("cache");
    let rt = runtime(CacheDir::required(dir.clone()));
    load_and_use(&rt);
    let art = artifact_path(&rt, &dir);
    let elsewhere = t.0.join("elsewhere.cwasm");
    std::fs::rename(&art, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &art).unwrap();
    load_and_use(&rt);
    // Replaced by a regular file of its own.
    assert!(std::fs::symlink_metadata(&art).unwrap().is_file());
    assert_rewritten(&art);
}

#[test]
fn directory_others_can_write_is_refused() {
    let t = TempDir::new("loose-dir");
    let dir = t.0.join("cache");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Named by the operator: an error that says why.
    let rt = runtime(CacheDir::required(dir.clone()));
    match rt.load_bytes("allow-group", SOURCE, "") {
        Err(PluginError::Cache { reason, .. }) => assert!(reason.contains("777"), "{reason}"),
        other => panic!("expected a cache error, got {other:?}"),
    }
    // The default location: compiled in memory, nothing written there.
    let rt = runtime(CacheDir {
        path: dir.clone(),
        best_effort: true,
    });
    load_and_use(&rt);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // The daemon never loosens or tightens a directory it did not create.
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o777);
}

#[test]
fn default_location_that_cannot_be_created_compiles_in_memory() {
    let t = TempDir::new("no-dir");
    std::fs::create_dir_all(&t.0).unwrap();
    // A regular file where the directory should be.
    let file = t.0.join("cache");
    std::fs::write(&file, b"x").unwrap();
    let rt = runtime(CacheDir {
        path: file.join("sub"),
        best_effort: true,
    });
    load_and_use(&rt);
    let rt = runtime(CacheDir::required(file.join("sub")));
    assert!(matches!(
        rt.load_bytes("allow-group", SOURCE, ""),
        Err(PluginError::Cache { .. })
    ));
}
