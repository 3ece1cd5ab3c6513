//! Route allowlists as the operator writes them (`--allow-route`, TOML `[routes]`): parsing
//! and the lexical checks a plugin-chosen route must pass before it is compared with them.
use std::path::{Component, Path, PathBuf};

/// Longest unix socket path (`sun_path` is 108 bytes including the NUL).
pub const MAX_UNIX_PATH: usize = 107;
/// Longest `host:port` (253-byte DNS name, brackets, colon, 5-digit port).
pub const MAX_TCP_TARGET: usize = 261;

/// Why a route was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("unix socket path `{0}` is not absolute")]
    NotAbsolute(String),
    #[error("unix socket path `{0}` contains `..`")]
    DotDot(String),
    #[error("unix socket path is {0} bytes (max {MAX_UNIX_PATH}) or contains NUL")]
    BadPath(usize),
    #[error("unix socket `{0}` is outside every allowed directory")]
    UnixNotAllowed(String),
    #[error("tcp target `{0}` is not HOST:PORT")]
    BadTcp(String),
    #[error("tcp target `{0}` is not in the --allow-route list")]
    TcpNotAllowed(String),
    #[error("vsock cid {0} is not a sibling of this VM")]
    NotSibling(u64),
    #[error("vsock cid {0} is reserved")]
    ReservedCid(u64),
}

/// What plugins may route to. Empty (the default) allows only `Route::Default`.
#[derive(Debug, Clone, Default)]
pub struct RouteAllowlist {
    unix_dirs: Vec<PathBuf>,
    /// (lowercase host, port; `None` = any port)
    tcp: Vec<(String, Option<u16>)>,
}

/// Lexically normalize an absolute path: drop `.` and repeated `/`; refuse `..` outright (a `..`
/// after a symlink does not mean what it seems, so no attempt is made to resolve it).
fn normalize(p: &str) -> Result<PathBuf, RouteError> {
    if p.len() > MAX_UNIX_PATH || p.contains('\0') {
        return Err(RouteError::BadPath(p.len()));
    }
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(RouteError::NotAbsolute(p.into()));
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => out.push(s),
            Component::ParentDir => return Err(RouteError::DotDot(p.into())),
            Component::Prefix(_) => return Err(RouteError::NotAbsolute(p.into())),
        }
    }
    Ok(out)
}

fn parse_tcp(s: &str) -> Result<(String, Option<u16>), RouteError> {
    let bad = || RouteError::BadTcp(s.into());
    if s.len() > MAX_TCP_TARGET {
        return Err(bad());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port = match port {
        "*" => None,
        p => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
    };
    let inner = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let ok = match inner {
        Some(v6) => {
            !v6.is_empty()
                && v6
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        }
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        }
    };
    if !ok {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// The port of a `host:port` / `host:*` TCP route (`None`: any port), checked as
/// [`RouteAllowlist::allow_tcp`] checks it.
pub fn tcp_route_port(target: &str) -> Result<Option<u16>, RouteError> {
    parse_tcp(target).map(|(_, port)| port)
}

impl RouteAllowlist {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allow unix sockets anywhere below `dir` (absolute, no `..`).
    pub fn allow_unix_dir(&mut self, dir: impl AsRef<Path>) -> Result<&mut Self, RouteError> {
        let d = dir.as_ref().to_string_lossy().into_owned();
        self.unix_dirs.push(normalize(&d)?);
        Ok(self)
    }

    /// Allow a TCP target, `host:port` or `host:*` (an `--allow-route` entry).
    pub fn allow_tcp(&mut self, target: &str) -> Result<&mut Self, RouteError> {
        self.tcp.push(parse_tcp(target)?);
        Ok(self)
    }

    /// Whether a unix socket `path` lies below an allowed directory.
    pub fn allows_unix(&self, path: &str) -> Result<(), RouteError> {
        let p = normalize(path)?;
        if self.unix_dirs.iter().any(|d| p.starts_with(d) && p != *d) {
            Ok(())
        } else {
            Err(RouteError::UnixNotAllowed(path.into()))
        }
    }

    /// Whether a TCP target `host:port` is allowed (a port is required here).
    pub fn allows_tcp(&self, target: &str) -> Result<(), RouteError> {
        let (host, port) = parse_tcp(target)?;
        let port = port.ok_or_else(|| RouteError::BadTcp(target.into()))?;
        if self
            .tcp
            .iter()
            .any(|(h, p)| *h == host && p.is_none_or(|p| p == port))
        {
            Ok(())
        } else {
            Err(RouteError::TcpNotAllowed(target.into()))
        }
    }
}
