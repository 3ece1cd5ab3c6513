//! First-party plugins embedded in the binary (built by host/build.rs), so the daemon works with
//! no plugin flags.

macro_rules! wasm {
    ($file:literal) => {
        include_bytes!(concat!(env!("VHOST_PLUG_PLUGIN_DIR"), "/", $file, ".wasm"))
    };
}

pub const ALLOW_GROUP: &[u8] = wasm!("allow_group");
pub const PORT_ALLOWLIST: &[u8] = wasm!("port_allowlist");
/// The previous version, kept so an upgrade from it can be rehearsed and saved states of it read.
/// Built against the frozen `vhost-plug:plugin@0.1.0`, so it also shows plugins of that version
/// loading and deciding.
pub const PORT_ALLOWLIST_V1: &[u8] = wasm!("port_allowlist_v1");
pub const PEER_ALLOWLIST: &[u8] = wasm!("peer_allowlist");
pub const TCP_BRIDGE: &[u8] = wasm!("tcp_bridge");
pub const PROXY_BRIDGE: &[u8] = wasm!("proxy_bridge");
pub const AUDIT: &[u8] = wasm!("audit");
pub const SERIALIZER_POSTCARD: &[u8] = wasm!("serializer_postcard");
pub const SERIALIZER_JSON: &[u8] = wasm!("serializer_json");

/// Names accepted by `builtin:NAME`.
pub use crate::spec::BUILTIN_NAMES as NAMES;

pub fn get(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "allow-group" => ALLOW_GROUP,
        "port-allowlist" => PORT_ALLOWLIST,
        "port-allowlist-v1" => PORT_ALLOWLIST_V1,
        "peer-allowlist" => PEER_ALLOWLIST,
        "tcp-bridge" => TCP_BRIDGE,
        "proxy-bridge" => PROXY_BRIDGE,
        "audit" => AUDIT,
        "serializer-postcard" => SERIALIZER_POSTCARD,
        "serializer-json" => SERIALIZER_JSON,
        _ => return None,
    })
}

/// Directory of every plugin built with this binary, hostile test fixtures included
/// (`<name>.wasm`, underscores). Only meaningful on the build machine (tests, benches).
pub const BUILD_DIR: &str = env!("VHOST_PLUG_PLUGIN_DIR");
