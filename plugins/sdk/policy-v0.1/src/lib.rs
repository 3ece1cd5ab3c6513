//! vhost-plug SDK for the `policy-plugin` world of the frozen `vhost-plug:plugin@0.1.0`
//! (build with `--target wasm32-wasip2`). The same API as `vhost-plug-sdk-policy` without the
//! request's `peer`; a plugin switches by renaming the dependency (see port-allowlist-v1).
//!
//! Plugins may use `std`; the host gives them a WASI context with nothing granted (no files, no
//! environment, no sockets, stdio discarded). Log with [`log`] instead of `println!`.

#[doc(hidden)]
pub mod world {
    wit_bindgen::generate!({
        world: "policy-plugin",
        path: "../../../wit/0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "vhost_plug_sdk_policy::world",
        additional_derives: [PartialEq],
    });
}

/// All WIT types of the package.
pub use world::vhost_plug::plugin::types;

/// Log through the daemon's logger (tagged with plugin and VM name).
pub fn log(level: LogLevel, msg: &str) {
    world::vhost_plug::plugin::host::log(level, msg)
}

/// Monotonic nanoseconds from the host (arbitrary origin).
pub fn now_ns() -> u64 {
    world::vhost_plug::plugin::host::now_ns()
}

/// This plugin's configuration string (`config=...`), possibly empty.
pub fn config() -> String {
    world::vhost_plug::plugin::host::config()
}

pub use crate::world::vhost_plug::plugin::host::LogLevel;
pub use crate::world::vhost_plug::plugin::types::{
    ConnRequest, ConnStats, Endpoint, PluginState, Route, SocketType, Verdict,
};
pub use vhost_plug_sdk::{config_items, StateReader, StateWriter};

/// A connection policy. Only `on_connect` is required; the defaults make a stateless plugin.
///
/// Functions take no `self`: keep state in a `static` (`thread_local!` + `RefCell` works, a
/// plugin instance is single-threaded).
pub trait PolicyPlugin {
    fn on_connect(req: ConnRequest) -> Verdict;
    fn on_close(_id: u64, _stats: ConnStats) {}
    fn export_state() -> PluginState {
        PluginState {
            schema: 0,
            data: Vec::new(),
        }
    }
    fn import_state(s: PluginState) -> Result<(), String> {
        if s.data.is_empty() {
            Ok(())
        } else {
            Err(format!("stateless plugin got state schema {}", s.schema))
        }
    }
}

/// Export a [`PolicyPlugin`] implementation as the plugin's `policy-plugin` world.
#[macro_export]
macro_rules! export_policy {
    ($t:ty) => {
        const _: () = {
            use $crate::world::exports::vhost_plug::plugin::{policy, stateful};
            use $crate::world::vhost_plug::plugin::types;
            struct __VhostPlugPolicy;
            impl policy::Guest for __VhostPlugPolicy {
                fn on_connect(req: types::ConnRequest) -> types::Verdict {
                    <$t as $crate::PolicyPlugin>::on_connect(req)
                }
                fn on_close(id: u64, stats: types::ConnStats) {
                    <$t as $crate::PolicyPlugin>::on_close(id, stats)
                }
            }
            impl stateful::Guest for __VhostPlugPolicy {
                fn export_state() -> types::PluginState {
                    <$t as $crate::PolicyPlugin>::export_state()
                }
                fn import_state(s: types::PluginState) -> Result<(), String> {
                    <$t as $crate::PolicyPlugin>::import_state(s)
                }
            }
    $crate::world::__export_world!(__VhostPlugPolicy with_types_in $crate::world);
        };
    };
}
