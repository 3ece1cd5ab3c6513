//! Hostile test plugin: allocates and touches 1 GiB when the destination port is 666; allows anything else (so tests can
//! check that the next call is served by a fresh instance).
use vhost_plug_sdk_policy::*;

struct Hostile;

impl PolicyPlugin for Hostile {
    fn on_connect(req: ConnRequest) -> Verdict {
        if req.dst.port != 666 {
            return Verdict::Allow;
        }
        let v = vec![1u8; 1 << 30];
        Verdict::Deny(format!("allocated {}", std::hint::black_box(&v).len()))
    }
}

vhost_plug_sdk_policy::export_policy!(Hostile);
