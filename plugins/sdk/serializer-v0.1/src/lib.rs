//! vhost-plug SDK for the `serializer-plugin` world of the frozen `vhost-plug:plugin@0.1.0`
//! (build with `--target wasm32-wasip2`). The same API as `vhost-plug-sdk-serializer`: the
//! device state did not change in 0.2.0; a plugin switches by renaming the dependency (see
//! serializer-postcard-v1).
//!
//! Plugins may use `std`; the host gives them a WASI context with nothing granted (no files, no
//! environment, no sockets, stdio discarded). Log with [`log`] instead of `println!`.

#[doc(hidden)]
pub mod world {
    wit_bindgen::generate!({
        world: "serializer-plugin",
        path: "../../../wit/0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "vhost_plug_sdk_serializer::world",
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
    ConnState, Connection, Credit, DeviceState, EventQueueOwner, EventQueueState, NamedPluginState,
    OwedOps, PluginState, ShutdownFlags, SocketType,
};
pub use vhost_plug_sdk::{config_items, StateReader, StateWriter};

pub trait SerializerPlugin {
    fn encode(s: DeviceState) -> Result<Vec<u8>, String>;
    fn decode(b: Vec<u8>) -> Result<DeviceState, String>;
}

/// Export a [`SerializerPlugin`] implementation as the `serializer-plugin` world.
#[macro_export]
macro_rules! export_serializer {
    ($t:ty) => {
        const _: () = {
            use $crate::world::exports::vhost_plug::plugin::serializer;
            use $crate::world::vhost_plug::plugin::types;
            struct __VhostPlugSerializer;
            impl serializer::Guest for __VhostPlugSerializer {
                fn encode(s: types::DeviceState) -> Result<Vec<u8>, String> {
                    <$t as $crate::SerializerPlugin>::encode(s)
                }
                fn decode(b: Vec<u8>) -> Result<types::DeviceState, String> {
                    <$t as $crate::SerializerPlugin>::decode(b)
                }
            }
    $crate::world::__export_world!(__VhostPlugSerializer with_types_in $crate::world);
        };
    };
}
