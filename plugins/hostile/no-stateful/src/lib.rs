//! Hostile test plugin: a correct `policy` export and the `host` import, but no `stateful`
//! export, so `check` must name the missing interface. Built against the 0.1.0 interfaces
//! (wit/0.1.0), which the daemon still loads.

wit_bindgen::generate!({
    path: "../../../wit/0.1.0",
    inline: r#"
        package vhost-plug:fixture;
        world no-stateful {
            import vhost-plug:plugin/host@0.1.0;
            export vhost-plug:plugin/policy@0.1.0;
        }
    "#,
    world: "vhost-plug:fixture/no-stateful",
    generate_all,
});

use exports::vhost_plug::plugin::policy::{ConnRequest, ConnStats, Guest, Verdict};

struct NoState;

impl Guest for NoState {
    fn on_connect(_req: ConnRequest) -> Verdict {
        Verdict::Allow
    }

    fn on_close(_id: u64, _stats: ConnStats) {}
}

export!(NoState);
