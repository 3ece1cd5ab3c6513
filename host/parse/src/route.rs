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
    #[error(
        "host vsock target `{0}` is not CID:PORT (CID below 4294967295, PORT a number or `*`)"
    )]
    BadVsock(String),
    #[error("host vsock address {0}:{1} is not in the --allow-route list")]
    VsockNotAllowed(u64, u32),
}

/// What plugins may route to. Empty (the default) allows only `Route::Default`.
#[derive(Debug, Clone, Default)]
pub struct RouteAllowlist {
    unix_dirs: Vec<PathBuf>,
    /// (lowercase host, port; `None` = any port)
    tcp: Vec<(String, Option<u16>)>,
    /// Host AF_VSOCK addresses: (CID, port; `None` = any port).
    vsock: Vec<(u32, Option<u32>)>,
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

/// Parses a host AF_VSOCK allowlist entry `CID:PORT` or `CID:*` (`None`: any port). The CID
/// is the host kernel's (`VMADDR_CID_LOCAL` 1, the host 2, an enclave's); `VMADDR_CID_ANY`
/// (4294967295) names no peer and is refused, as is a port of `VMADDR_PORT_ANY`.
pub fn parse_vsock(s: &str) -> Result<(u32, Option<u32>), RouteError> {
    let bad = || RouteError::BadVsock(s.into());
    let (cid, port) = s.split_once(':').ok_or_else(bad)?;
    let number = |v: &str| {
        if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse::<u32>().ok().filter(|n| *n != u32::MAX)
    };
    let cid = number(cid).ok_or_else(bad)?;
    let port = match port {
        "*" => None,
        p => Some(number(p).ok_or_else(bad)?),
    };
    Ok((cid, port))
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

    /// Allow a host AF_VSOCK address, `CID:PORT` or `CID:*` (an `--allow-route vsock:` entry).
    pub fn allow_vsock(&mut self, target: &str) -> Result<&mut Self, RouteError> {
        self.vsock.push(parse_vsock(target)?);
        Ok(self)
    }

    /// Whether host AF_VSOCK address (`cid`, `port`) is allowed. Only a listed CID is: a
    /// route cannot reach `VMADDR_CID_ANY` or a CID wider than 32 bits; `VMADDR_PORT_ANY`
    /// names no port.
    pub fn allows_vsock(&self, cid: u64, port: u32) -> Result<(), RouteError> {
        if port == u32::MAX {
            return Err(RouteError::BadVsock(format!("{cid}:{port}")));
        }
        let listed = u32::try_from(cid).is_ok_and(|c| {
            self.vsock
                .iter()
                .any(|(lc, lp)| *lc == c && lp.is_none_or(|lp| lp == port))
        });
        if listed {
            Ok(())
        } else {
            Err(RouteError::VsockNotAllowed(cid, port))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_entries_parse() {
        assert_eq!(parse_vsock("1:5000"), Ok((1, Some(5000))));
        assert_eq!(parse_vsock("16:*"), Ok((16, None)));
        assert_eq!(parse_vsock("0:1"), Ok((0, Some(1))));
        for bad in [
            "",
            "1",
            ":1",
            "1:",
            "x:1",
            "1:x",
            "-1:2",
            "+1:2",
            "1:5000:6",
            "4294967295:1",
            "1:4294967295",
            "4294967296:1",
            "1: 2",
            "*:1",
            "01234567890:1",
        ] {
            assert_eq!(
                parse_vsock(bad),
                Err(RouteError::BadVsock(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn vsock_routes_must_be_listed() {
        let mut a = RouteAllowlist::new();
        assert_eq!(
            a.allows_vsock(1, 5000),
            Err(RouteError::VsockNotAllowed(1, 5000))
        );
        a.allow_vsock("1:5000")
            .unwrap()
            .allow_vsock("16:*")
            .unwrap();
        assert_eq!(a.allows_vsock(1, 5000), Ok(()));
        assert_eq!(
            a.allows_vsock(1, 5001),
            Err(RouteError::VsockNotAllowed(1, 5001))
        );
        assert_eq!(
            a.allows_vsock(2, 5000),
            Err(RouteError::VsockNotAllowed(2, 5000))
        );
        assert_eq!(a.allows_vsock(16, 1), Ok(()));
        assert_eq!(
            a.allows_vsock(16, u32::MAX),
            Err(RouteError::BadVsock("16:4294967295".into()))
        );
        // The CID is the host kernel's 32-bit one: a wider value never matches a listed CID.
        assert_eq!(
            a.allows_vsock(u64::from(u32::MAX) + 17, 1),
            Err(RouteError::VsockNotAllowed(u64::from(u32::MAX) + 17, 1))
        );
        // Entries of other kinds allow no vsock address.
        let mut t = RouteAllowlist::new();
        t.allow_tcp("127.0.0.1:*").unwrap();
        t.allow_unix_dir("/run").unwrap();
        assert!(t.allows_vsock(1, 5000).is_err());
        assert!(a.allow_vsock("1:5000:1").is_err());
    }
}
