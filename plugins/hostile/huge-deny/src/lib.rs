//! Hostile test plugin: returns a 1 MiB deny reason when the destination port is 666; allows anything else (so tests can
//! check that the next call is served by a fresh instance).
use vhost_plug_sdk_policy::*;

struct Hostile;

impl PolicyPlugin for Hostile {
    fn on_connect(req: ConnRequest) -> Verdict {
        if req.dst.port != 666 {
            return Verdict::Allow;
        }
        Verdict::Deny("x".repeat(1 << 20))
    }
}

vhost_plug_sdk_policy::export_policy!(Hostile);
