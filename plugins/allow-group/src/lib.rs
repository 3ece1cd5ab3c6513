//! Default policy: allow every connection the host already permits (CID checks, sibling groups
//! and listeners are enforced by the host before plugins are asked). Stateless.
use vhost_plug_sdk_policy::*;

struct AllowGroup;

impl PolicyPlugin for AllowGroup {
    fn on_connect(_req: ConnRequest) -> Verdict {
        Verdict::Allow
    }
}

vhost_plug_sdk_policy::export_policy!(AllowGroup);
