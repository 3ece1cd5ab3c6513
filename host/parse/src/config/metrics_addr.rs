//! The `--metrics` listen address.
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where `--metrics` listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = s.parse().map_err(|_| {
            format!("expected unix:PATH or a loopback IP:PORT (like 127.0.0.1:9100), got `{s}`")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{addr} is not a loopback address: the metrics endpoint has no authentication, \
                 so it only listens on 127.0.0.0/8 or ::1 (or a unix socket); expose it \
                 further with a proxy you control"
            ));
        }
        Ok(MetricsAddr::Tcp(addr))
    }
}
