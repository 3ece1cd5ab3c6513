//! vhost-plug SDK for the `bridge-plugin` world of the frozen `vhost-plug:plugin@0.2.0`
//! (build with `--target wasm32-wasip2`). The same API as `vhost-plug-sdk-bridge` without the
//! `host-vsock` route; a plugin switches by renaming the dependency (see proxy-bridge-v2).
//!
//! Plugins may use `std`; the host gives them a WASI context with nothing granted (no files, no
//! environment, no sockets, stdio discarded). Log with [`log`] instead of `println!`.

#[doc(hidden)]
pub mod world {
    wit_bindgen::generate!({
        world: "bridge-plugin",
        path: "../../../wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "vhost_plug_sdk_bridge::world",
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
    ConnRequest, Endpoint, PeerIdentity, PluginState, Route, SocketType,
};
pub use vhost_plug_sdk::{config_items, StateReader, StateWriter};

/// A router. `Err(reason)` refuses the connection.
pub trait BridgePlugin {
    fn route(req: ConnRequest) -> Result<Route, String>;
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

/// Export a [`BridgePlugin`] implementation as the plugin's `bridge-plugin` world.
#[macro_export]
macro_rules! export_bridge {
    ($t:ty) => {
        const _: () = {
            use $crate::world::exports::vhost_plug::plugin::{bridge, stateful};
            use $crate::world::vhost_plug::plugin::types;
            struct __VhostPlugBridge;
            impl bridge::Guest for __VhostPlugBridge {
                fn route(req: types::ConnRequest) -> Result<types::Route, String> {
                    <$t as $crate::BridgePlugin>::route(req)
                }
            }
            impl stateful::Guest for __VhostPlugBridge {
                fn export_state() -> types::PluginState {
                    <$t as $crate::BridgePlugin>::export_state()
                }
                fn import_state(s: types::PluginState) -> Result<(), String> {
                    <$t as $crate::BridgePlugin>::import_state(s)
                }
            }
    $crate::world::__export_world!(__VhostPlugBridge with_types_in $crate::world);
        };
    };
}
