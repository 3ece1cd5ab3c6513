//! tcp-bridge: route guest connections by destination port to TCP endpoints or to AF_VSOCK
//! addresses of the host.
//!
//! Config: `map=1234=127.0.0.1:8080,5000=db.internal:5432,6000=vsock:1:7000`. `HOST:PORT` is a
//! TCP endpoint; `vsock:CID:PORT` an AF_VSOCK address in the host kernel's vsock namespace
//! (CID 1 is the host itself, or an enclave's or the outer host's CID; never a sibling VM).
//! A port without a mapping is refused. The host still checks every returned target against
//! its `--allow-route` list (`tcp:HOST:PORT`, `vsock:CID:PORT`).
//! State: schema 1 = per-mapping routed-connection counters.

use std::cell::RefCell;
use vhost_plug_sdk_bridge::*;

struct Map {
    port: u32,
    target: Route,
    routed: u64,
}

thread_local! {
    static MAPS: RefCell<Option<Result<Vec<Map>, String>>> = const { RefCell::new(None) };
}

fn load() -> Result<Vec<Map>, String> {
    let cfg = config();
    let mut maps = Vec::new();
    for (k, v) in config_items(&cfg) {
        if k != "map" {
            return Err(format!("unknown config key `{k}`"));
        }
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (port, target) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected PORT=HOST:PORT"))?;
            let port = port
                .trim()
                .parse()
                .map_err(|_| format!("bad port `{port}`"))?;
            maps.push(Map {
                port,
                target: parse_target(target.trim())?,
                routed: 0,
            });
        }
    }
    Ok(maps)
}

/// `HOST:PORT` (TCP) or `vsock:CID:PORT` (host AF_VSOCK).
fn parse_target(t: &str) -> Result<Route, String> {
    if let Some(addr) = t.strip_prefix("vsock:") {
        let bad = || format!("`{t}`: expected vsock:CID:PORT");
        let (cid, port) = addr.split_once(':').ok_or_else(bad)?;
        let cid: u32 = cid.parse().map_err(|_| bad())?;
        let port: u32 = port.parse().map_err(|_| bad())?;
        return Ok(Route::HostVsock(Endpoint {
            cid: u64::from(cid),
            port,
        }));
    }
    if !t.contains(':') {
        return Err(format!("`{t}`: expected HOST:PORT or vsock:CID:PORT"));
    }
    Ok(Route::Tcp(t.to_string()))
}

fn with_maps<R>(f: impl FnOnce(&mut Result<Vec<Map>, String>) -> R) -> R {
    MAPS.with(|c| f(c.borrow_mut().get_or_insert_with(load)))
}

struct TcpBridge;

impl BridgePlugin for TcpBridge {
    fn route(req: ConnRequest) -> Result<Route, String> {
        with_maps(|maps| {
            let maps = maps
                .as_mut()
                .map_err(|e| format!("tcp-bridge: bad config: {e}"))?;
            match maps.iter_mut().find(|m| m.port == req.dst.port) {
                Some(m) => {
                    m.routed += 1;
                    Ok(m.target.clone())
                }
                None => Err(format!("tcp-bridge: no mapping for port {}", req.dst.port)),
            }
        })
    }

    fn export_state() -> PluginState {
        with_maps(|maps| {
            let mut w = StateWriter::new();
            let maps = maps.as_deref().unwrap_or_default();
            w.u32(maps.len() as u32);
            for m in maps {
                w.u32(m.port).u64(m.routed);
            }
            PluginState {
                schema: 1,
                data: w.finish(),
            }
        })
    }

    fn import_state(s: PluginState) -> Result<(), String> {
        if s.schema != 1 {
            return Err(format!("tcp-bridge reads state schema 1, got {}", s.schema));
        }
        let mut r = StateReader::new(&s.data);
        let n = r.u32()?;
        let mut got = Vec::new();
        for _ in 0..n {
            got.push((r.u32()?, r.u64()?));
        }
        r.end()?;
        with_maps(|maps| {
            let maps = maps.as_mut().map_err(|e| format!("bad config: {e}"))?;
            for (port, routed) in got {
                if let Some(m) = maps.iter_mut().find(|m| m.port == port) {
                    m.routed = routed;
                }
            }
            Ok(())
        })
    }
}

vhost_plug_sdk_bridge::export_bridge!(TcpBridge);
