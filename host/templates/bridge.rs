//! A vhost-plug bridge plugin, made by `vhost-plug plugin new`.
//!
//! `route` is called for each connection the policy chain allowed and says where it goes. This
//! one reads a port map from its config string,
//! `--plugin bridge=PATH,config=map=80=tcp:127.0.0.1:8080,22=unix:/run/svc/ssh.sock,5000=vsock:1:5000`
//! (`vsock:CID:PORT` is an AF_VSOCK address of the host, not a sibling VM),
//! sends mapped destination ports there and leaves the others on their default route. The
//! daemon only follows a route the operator allowed (`--allow-route`, TOML `[routes]`).
use vhost_plug_sdk_bridge::*;

struct Plugin;

impl BridgePlugin for Plugin {
    fn route(req: ConnRequest) -> Result<Route, String> {
        // Parsed on every call to keep the example short; a real plugin would keep the parsed
        // map in a `thread_local!` (see the first-party tcp-bridge).
        let cfg = config();
        for (key, value) in config_items(&cfg) {
            if key != "map" {
                return Err(format!("unknown config key `{key}`"));
            }
            for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (port, target) = item
                    .split_once('=')
                    .ok_or_else(|| format!("`{item}`: expected PORT=tcp:HOST:PORT, PORT=unix:PATH or PORT=vsock:CID:PORT"))?;
                if port.trim().parse() != Ok(req.dst.port) {
                    continue;
                }
                log(LogLevel::Debug, &format!("vm {}: port {port} -> {target}", req.vm));
                return match target.trim().split_once(':') {
                    Some(("tcp", host_port)) => Ok(Route::Tcp(host_port.to_string())),
                    Some(("unix", path)) => Ok(Route::UnixSocket(path.to_string())),
                    Some(("vsock", addr)) => match addr.split_once(':') {
                        Some((cid, port)) => match (cid.parse(), port.parse()) {
                            (Ok(cid), Ok(port)) => Ok(Route::HostVsock(Endpoint { cid, port })),
                            _ => Err(format!("`{target}`: expected vsock:CID:PORT")),
                        },
                        None => Err(format!("`{target}`: expected vsock:CID:PORT")),
                    },
                    // `Err` refuses the connection (the guest sees RST).
                    _ => Err(format!("`{target}`: expected tcp:HOST:PORT, unix:PATH or vsock:CID:PORT")),
                };
            }
        }
        Ok(Route::Default)
    }
}

export_bridge!(Plugin);
