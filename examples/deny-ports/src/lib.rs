//! Example policy: refuse connections to the destination ports listed in the config string
//! (`config=deny=22,23`), log each refusal, allow everything else.
use vhost_plug_sdk_policy::*;

struct DenyPorts;

impl PolicyPlugin for DenyPorts {
    fn on_connect(req: ConnRequest) -> Verdict {
        let cfg = config();
        let denied = config_items(&cfg)
            .into_iter()
            .filter(|(k, _)| *k == "deny")
            .flat_map(|(_, v)| v.split(','))
            .any(|p| p.trim().parse() == Ok(req.dst.port));
        if denied {
            log(
                LogLevel::Info,
                &format!("vm {}: port {} refused", req.vm, req.dst.port),
            );
            return Verdict::Deny(format!("port {} is closed by deny-ports", req.dst.port));
        }
        Verdict::Allow
    }
}

export_policy!(DenyPorts);
