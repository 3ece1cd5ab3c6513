//! Hostile test plugin: redirects outside any allowlist when the destination port is 666; allows anything else (so tests can
//! check that the next call is served by a fresh instance).
use vhost_plug_sdk_policy::*;

struct Hostile;

impl PolicyPlugin for Hostile {
    fn on_connect(req: ConnRequest) -> Verdict {
        if req.dst.port != 666 {
            return Verdict::Allow;
        }
        if req.src.port == 1 {
            return Verdict::Redirect(Route::UnixSocket("/run/vhost-plug/../../etc/shadow".into()));
        }
        if req.src.port == 2 {
            return Verdict::Redirect(Route::Vsock(Endpoint { cid: 99, port: 22 }));
        }
        if req.src.port == 4 {
            // A host AF_VSOCK address whose CID is a sibling's: still needs a vsock: entry.
            return Verdict::Redirect(Route::HostVsock(Endpoint { cid: 4, port: 22 }));
        }
        Verdict::Redirect(Route::Tcp("evil.example.com:22".into()))
    }
}

vhost_plug_sdk_policy::export_policy!(Hostile);
