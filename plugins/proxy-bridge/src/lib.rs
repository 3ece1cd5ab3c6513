//! proxy-bridge: one listener for every guest. Guest connections to the mapped host ports go
//! to one unix socket or TCP address, each starting with a PROXY protocol v2 header that names
//! the guest (CID and ports; the bytes are in docs/plugins.md). Loaded for every VM
//! (`--plugin` / TOML `[plugins]`), it sends the guests of all VMs to the same listener.
//!
//! Config: `map=PORT=unix:/PATH|tcp:IP:PORT[,...]`, e.g.
//! `map=1234=unix:/run/agent/all-vms.sock,8125=tcp:127.0.0.1:8125`. Every other connection
//! (other ports, host-initiated ones) keeps its default target. The host still checks each
//! target against its `--allow-route` list. Stateless.

use std::cell::RefCell;
use vhost_plug_sdk_bridge::*;

/// The host CID: only guest connections to the host are proxied.
const HOST_CID: u64 = 2;

struct Map {
    port: u32,
    route: Route,
}

thread_local! {
    static MAPS: RefCell<Option<Result<Vec<Map>, String>>> = const { RefCell::new(None) };
}

fn target(t: &str) -> Result<Route, String> {
    if let Some(path) = t.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("`{t}`: the unix socket path must be absolute"));
        }
        return Ok(Route::ProxyUnix(path.to_string()));
    }
    if let Some(addr) = t.strip_prefix("tcp:") {
        if !addr.contains(':') {
            return Err(format!("`{t}`: expected tcp:IP:PORT"));
        }
        return Ok(Route::ProxyTcp(addr.to_string()));
    }
    Err(format!("`{t}`: expected unix:/PATH or tcp:IP:PORT"))
}

fn load() -> Result<Vec<Map>, String> {
    let cfg = config();
    let mut maps: Vec<Map> = Vec::new();
    for (k, v) in config_items(&cfg) {
        if k != "map" {
            return Err(format!("unknown config key `{k}`"));
        }
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (port, to) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected PORT=unix:/PATH or PORT=tcp:IP:PORT"))?;
            let port = port
                .trim()
                .parse()
                .map_err(|_| format!("bad port `{port}`"))?;
            if maps.iter().any(|m| m.port == port) {
                return Err(format!("port {port} mapped twice"));
            }
            maps.push(Map {
                port,
                route: target(to.trim())?,
            });
        }
    }
    Ok(maps)
}

struct ProxyBridge;

impl BridgePlugin for ProxyBridge {
    fn route(req: ConnRequest) -> Result<Route, String> {
        MAPS.with(|c| {
            let mut slot = c.borrow_mut();
            let maps = slot
                .get_or_insert_with(load)
                .as_ref()
                .map_err(|e| format!("proxy-bridge: bad config: {e}"))?;
            if !req.from_guest || req.dst.cid != HOST_CID {
                return Ok(Route::Default);
            }
            Ok(maps
                .iter()
                .find(|m| m.port == req.dst.port)
                .map_or(Route::Default, |m| m.route.clone()))
        })
    }
}

vhost_plug_sdk_bridge::export_bridge!(ProxyBridge);
