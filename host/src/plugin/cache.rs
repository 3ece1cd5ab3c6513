//! On-disk cache of compiled plugins, so that a start after the first one skips Cranelift.
//!
//! Loading an artifact maps native code into the daemon, so an artifact is used only when all
//! of these hold, and is otherwise compiled again from the plugin's bytes (and rewritten):
//! - the directory is ours: a real directory owned by our effective uid that neither group
//!   nor others may write (created with mode 0700);
//! - the file is ours and private: a regular file (not a symlink) owned by our uid, mode 0600;
//! - its name is the SHA-256 of the plugin's bytes and of the engine's compatibility hash
//!   (wasmtime version, compiler settings, CPU features), so it was made from exactly these
//!   bytes by a compatible engine;
//! - its content starts with [`MAGIC`] and the SHA-256 of the artifact that follows, which
//!   catches a torn or corrupted file before wasmtime reads it;
//! - wasmtime recognises it as a precompiled component (`Engine::detect_precompiled`) and
//!   accepts its own engine header on deserializing.
//!
//! The default location is `$CACHE_DIRECTORY` (systemd's `CacheDirectory=`), else
//! `$XDG_CACHE_HOME/vhost-plug`, else `$HOME/.cache/vhost-plug`; trouble with a default
//! location is logged and the daemon compiles in memory, while a directory the operator named
//! (`--plugin-cache`) must work.
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Precompiled};

/// First bytes of an artifact file.
pub const MAGIC: &[u8; 16] = b"vhost-plug-cwasm";
const HEADER: usize = MAGIC.len() + 32;
/// Artifacts larger than this are not read (the first-party ones are well under 2 MiB).
const MAX_ARTIFACT: u64 = 256 << 20;

/// Why an artifact or the cache directory was not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
}

/// Where the cache lives and how much its problems matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheDir {
    pub path: PathBuf,
    /// Chosen by default rather than by the operator: problems are logged, never fatal.
    pub best_effort: bool,
}

impl CacheDir {
    /// A directory the operator asked for.
    pub fn required(path: PathBuf) -> Self {
        CacheDir {
            path,
            best_effort: false,
        }
    }

    /// The default location for this environment, if one can be named.
    pub fn default_location() -> Option<Self> {
        default_path(|k| std::env::var_os(k)).map(|path| CacheDir {
            path,
            best_effort: true,
        })
    }
}

/// `$CACHE_DIRECTORY` (first entry), `$XDG_CACHE_HOME/vhost-plug`, `$HOME/.cache/vhost-plug`;
/// relative values are ignored (the XDG rule).
fn default_path(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let abs = |p: PathBuf| p.is_absolute().then_some(p);
    if let Some(v) = env("CACHE_DIRECTORY") {
        let first = v.to_string_lossy().split(':').next().map(PathBuf::from);
        if let Some(p) = first.and_then(abs) {
            return Some(p);
        }
    }
    if let Some(p) = env("XDG_CACHE_HOME").map(PathBuf::from).and_then(abs) {
        return Some(p.join("vhost-plug"));
    }
    env("HOME")
        .map(PathBuf::from)
        .and_then(abs)
        .map(|h| h.join(".cache/vhost-plug"))
}

/// The artifact cache of one runtime.
pub(crate) struct ArtifactCache {
    dir: CacheDir,
    /// Serializes writes within this process (other processes race harmlessly: each write
    /// is a rename of a complete file).
    write_lock: Mutex<()>,
    /// A best-effort cache that failed once is not tried again (one warning).
    disabled: AtomicBool,
}

/// SHA-256 fed by `std::hash::Hash`, for hashing the engine's compatibility state with a
/// stable function.
struct ShaHasher(Sha256);

impl std::hash::Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ArtifactCache {
    pub(crate) fn new(dir: CacheDir) -> Self {
        ArtifactCache {
            dir,
            write_lock: Mutex::new(()),
            disabled: AtomicBool::new(false),
        }
    }

    pub(crate) fn dir(&self) -> &CacheDir {
        &self.dir
    }

    /// File name of the artifact of `source` for `engine`.
    pub(crate) fn key(engine: &Engine, source: &[u8]) -> String {
        use std::hash::Hash;
        let mut h = ShaHasher(Sha256::new());
        h.0.update(b"vhost-plug artifact v1\0");
        engine.precompile_compatibility_hash().hash(&mut h);
        h.0.update((source.len() as u64).to_le_bytes());
        h.0.update(source);
        format!("{}.cwasm", hex(&h.0.finalize()))
    }

    /// The cached component of `source`, or `None` (absent, or rejected and logged: the
    /// caller compiles and calls [`ArtifactCache::store`]). `Err` only for a required
    /// directory that cannot be used.
    pub(crate) fn load(
        &self,
        engine: &Engine,
        source: &[u8],
    ) -> Result<Option<Component>, CacheError> {
        if self.disabled.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if let Err(e) = self.private_dir(false) {
            return self.give_up(e).map(|()| None);
        }
        let path = self.dir.path.join(Self::key(engine, source));
        let art = match read_trusted(&path) {
            Ok(Some(a)) => a,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!("plugin cache: {e}; compiling again");
                return Ok(None);
            }
        };
        let body = &art[HEADER..];
        if Engine::detect_precompiled(body) != Some(Precompiled::Component) {
            tracing::warn!(path = %path.display(), "plugin cache: not a precompiled component; compiling again");
            return Ok(None);
        }
        // SAFETY: `Component::deserialize` trusts its input to be an artifact made by
        // `Component::serialize` of a compatible wasmtime (it maps native code). The bytes
        // come from a regular file owned by our effective uid, mode 0600, in a directory of
        // ours that no one else may write (`private_dir`, `read_trusted`), so only our user
        // wrote it; its content hash matches the one written with it, so it is the complete
        // artifact that `store` wrote; its name binds it to these source bytes and this
        // engine's compatibility hash; and wasmtime re-checks its own engine header below.
        match unsafe { Component::deserialize(engine, body) } {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                tracing::warn!(path = %path.display(), "plugin cache: artifact refused ({e}); compiling again");
                Ok(None)
            }
        }
    }

    /// Saves the artifact of `source` (made by `Component::serialize`).
    pub(crate) fn store(
        &self,
        engine: &Engine,
        source: &[u8],
        artifact: &[u8],
    ) -> Result<(), CacheError> {
        if self.disabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let path = self.dir.path.join(Self::key(engine, source));
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let res = self.private_dir(true).and_then(|()| {
            let mut file = Vec::with_capacity(HEADER + artifact.len());
            file.extend_from_slice(MAGIC);
            file.extend_from_slice(&Sha256::digest(artifact));
            file.extend_from_slice(artifact);
            crate::sys::write_private_file(&path, &file).map_err(|source| CacheError::Io {
                path: path.clone(),
                source,
            })
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) => self.give_up(e),
        }
    }

    /// A required cache fails; a best-effort one warns once and is switched off.
    fn give_up(&self, e: CacheError) -> Result<(), CacheError> {
        if !self.dir.best_effort {
            return Err(e);
        }
        if !self.disabled.swap(true, Ordering::Relaxed) {
            tracing::warn!("plugin cache off: {e}; plugins are compiled at every start");
        }
        Ok(())
    }

    /// Checks (and with `create`, creates with mode 0700) the directory: a directory of
    /// ours that only we may write.
    fn private_dir(&self, create: bool) -> Result<(), CacheError> {
        let dir = &self.dir.path;
        let io = |source| CacheError::Io {
            path: dir.clone(),
            source,
        };
        let md = match std::fs::symlink_metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                crate::sys::create_private_dir(dir).map_err(io)?;
                std::fs::symlink_metadata(dir).map_err(io)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let untrusted = |reason: String| CacheError::Untrusted {
            path: dir.clone(),
            reason,
        };
        if !md.file_type().is_dir() {
            return Err(untrusted("not a directory".into()));
        }
        let euid = euid();
        if md.uid() != euid {
            return Err(untrusted(format!(
                "owned by uid {} (want {euid}): others could plant native code there",
                md.uid()
            )));
        }
        if md.mode() & 0o022 != 0 {
            return Err(untrusted(format!(
                "mode {:o}: others could plant native code there (want 700)",
                md.mode() & 0o777
            )));
        }
        Ok(())
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The verified content of the artifact at `path` (header included), `None` if there is
/// none, `Err` if there is one that must not be used.
fn read_trusted(path: &Path) -> Result<Option<Vec<u8>>, CacheError> {
    let io = |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    };
    let untrusted = |reason: String| CacheError::Untrusted {
        path: path.to_path_buf(),
        reason,
    };
    let f = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(untrusted("a symbolic link".into()))
        }
        Err(e) => return Err(io(e)),
    };
    // What was opened, not what the path names now.
    let md = f.metadata().map_err(io)?;
    let euid = euid();
    if !md.file_type().is_file() {
        return Err(untrusted("not a regular file".into()));
    }
    if md.uid() != euid || md.mode() & 0o077 != 0 {
        return Err(untrusted(format!(
            "owned by uid {} with mode {:o} (want uid {euid}, mode 600)",
            md.uid(),
            md.mode() & 0o777
        )));
    }
    if md.len() > MAX_ARTIFACT || md.len() < HEADER as u64 {
        return Err(untrusted(format!("{} bytes", md.len())));
    }
    let mut buf = Vec::with_capacity(md.len() as usize);
    f.take(MAX_ARTIFACT).read_to_end(&mut buf).map_err(io)?;
    if buf.len() < HEADER || &buf[..MAGIC.len()] != MAGIC {
        return Err(untrusted("not a vhost-plug artifact (bad header)".into()));
    }
    if Sha256::digest(&buf[HEADER..])[..] != buf[MAGIC.len()..HEADER] {
        return Err(untrusted(
            "content does not match its checksum (corrupt)".into(),
        ));
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod env_tests {
    use super::*;
    use std::ffi::OsString;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn default_locations() {
        let p = |v: &[(&str, &str)]| default_path(env(v));
        assert_eq!(
            p(&[("CACHE_DIRECTORY", "/var/cache/vp:/x"), ("HOME", "/h")]),
            Some("/var/cache/vp".into())
        );
        assert_eq!(
            p(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/h")]),
            Some("/xdg/vhost-plug".into())
        );
        assert_eq!(
            p(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")]),
            Some("/h/.cache/vhost-plug".into())
        );
        assert_eq!(p(&[("CACHE_DIRECTORY", "rel")]), None);
        assert_eq!(p(&[]), None);
    }
}
