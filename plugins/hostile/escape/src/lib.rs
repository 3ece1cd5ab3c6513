//! Hostile test plugin: for destination port 666 it tries to get out of its sandbox — read a
//! file, list the root directory, connect to `127.0.0.1:<config port>`, read the environment —
//! and allows the connection only if any of that worked. Anything else is allowed.
use vhost_plug_sdk_policy::*;

struct Escape;

impl PolicyPlugin for Escape {
    fn on_connect(req: ConnRequest) -> Verdict {
        if req.dst.port != 666 {
            return Verdict::Allow;
        }
        let port: u16 = config().trim().parse().unwrap_or(9);
        let file = std::fs::read("/etc/hostname").map(|b| b.len());
        let dir = std::fs::read_dir("/").map(|d| d.count());
        let net = std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| ());
        let env = std::env::vars().count();
        let report = format!(
            "file: {:?}; dir: {:?}; net: {:?}; env vars: {env}",
            file.as_ref().map_err(|e| e.kind()),
            dir.as_ref().map_err(|e| e.kind()),
            net.as_ref().map_err(|e| e.kind()),
        );
        if file.is_ok() || dir.is_ok() || net.is_ok() || env > 0 {
            log(LogLevel::Error, &format!("sandbox escaped: {report}"));
            Verdict::Allow
        } else {
            Verdict::Deny(format!("sandbox held: {report}"))
        }
    }
}

vhost_plug_sdk_policy::export_policy!(Escape);
