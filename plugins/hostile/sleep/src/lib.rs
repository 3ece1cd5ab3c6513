//! Hostile test plugin: blocks in WASI (a 30 s sleep, i.e. a monotonic-clock pollable
//! waited on with `poll`) when the destination port is 666; allows anything else.
use vhost_plug_sdk_policy::*;

struct Hostile;

impl PolicyPlugin for Hostile {
    fn on_connect(req: ConnRequest) -> Verdict {
        if req.dst.port != 666 {
            return Verdict::Allow;
        }
        std::thread::sleep(std::time::Duration::from_secs(30));
        Verdict::Allow
    }
}

vhost_plug_sdk_policy::export_policy!(Hostile);
