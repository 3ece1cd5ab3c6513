//! The per-VM connection gate: every new connection (guest, host or sibling initiated) is
//! put to the policy chain, and then to the bridge plugin if there is one, before any packet
//! is answered. The answer becomes a [`Target`] the device knows how to connect to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use crate::config::RouteSpec;
use crate::peer::PeerIdentity;
use crate::plugin::cache::CacheDir;
use crate::plugin::types as wit;
use crate::plugin::types::{ConnRequest, ConnStats, Endpoint, NamedPluginState, Route, SocketType};
use crate::plugin::{
    Bridge, Decision, Plugin, PluginError, PluginKind, PluginRuntime, PluginSpec, PolicyChain,
    RouteAllowlist, RoutePolicy, RuntimeConfig, Serializer,
};
use crate::siblings::Registry;
use crate::stats::{Outcome, Verdict, VmStats};
use crate::vsock::header::SockType;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Where an admitted connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// What the daemon does without plugins: `<uds_path>_<port>` for the host, the sibling
    /// VM for its CID, the guest port asked for in a CONNECT line.
    Default,
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// A vsock endpoint: a sibling VM, or for host-initiated connections another port of
    /// this guest.
    Vsock {
        cid: u64,
        port: u32,
    },
    /// Like `Unix` and `Tcp`, but the connection starts with a PROXY protocol v2 header
    /// naming the guest ([`crate::proxy`]). Guest-initiated connections only.
    ProxyUnix(PathBuf),
    ProxyTcp(SocketAddr),
    /// An AF_VSOCK address of the host kernel (`host-vsock` route): reached with an
    /// AF_VSOCK connect like the forwarding backend's, whatever backend the VM has.
    HostVsock {
        cid: u32,
        port: u32,
    },
}

/// The gate's answer for one connection.
pub enum Admission {
    Admit { id: u64, target: Target },
    Refuse(String),
}

/// One connection as the gate sees it.
pub struct Request {
    pub src: (u64, u32),
    pub dst: (u64, u32),
    pub kind: SockType,
    pub from_guest: bool,
    /// The host program behind a host-initiated connection (`None` for guest connections).
    pub peer: Option<PeerIdentity>,
}

pub struct Gate {
    vm: String,
    chain: PolicyChain,
    bridge: Option<Bridge>,
    /// Where verdicts are counted (the VM's shared stats).
    stats: Option<Arc<VmStats>>,
}

/// Statistics of a connection when it closes.
pub struct Closed {
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
    pub opened: Instant,
    pub reset: bool,
}

impl Gate {
    pub fn new(vm: String, chain: PolicyChain, bridge: Option<Bridge>) -> Self {
        Gate {
            vm,
            chain,
            bridge,
            stats: None,
        }
    }

    /// Counts the policy verdicts of this gate in `stats`.
    pub fn set_stats(&mut self, stats: Arc<VmStats>) {
        self.stats = Some(stats);
    }

    fn count(&self, from_guest: bool, d: &Decision) {
        if let Some(s) = &self.stats {
            let (v, o) = match d {
                Decision::Allow => (Verdict::Allow, Outcome::Allow),
                Decision::Deny { failure: false, .. } => (Verdict::Deny, Outcome::Deny),
                Decision::Deny { failure: true, .. } => (Verdict::Deny, Outcome::Failure),
                Decision::Redirect { .. } => (Verdict::Redirect, Outcome::Redirect),
            };
            s.counters.verdict(v);
            s.counters.decision(from_guest, o);
        }
    }

    /// Live counters of the VM's policy and bridge plugins (for the metrics endpoint).
    pub fn plugin_counters(&self) -> Vec<(String, Arc<crate::plugin::PluginCounters>)> {
        let mut out = self.chain.counters();
        if let Some(b) = &self.bridge {
            out.push((b.name().to_string(), b.counters()));
        }
        out
    }

    /// Makes sure every policy and bridge plugin has an instance (done when a frontend
    /// attaches; a failure refuses that frontend).
    pub fn start(&mut self) -> Result<(), PluginError> {
        self.chain.start()?;
        match &mut self.bridge {
            Some(b) => b.start(),
            None => Ok(()),
        }
    }

    pub fn chain_mut(&mut self) -> &mut PolicyChain {
        &mut self.chain
    }

    /// Names of the VM's plugins, policy chain first.
    pub fn plugin_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self.chain.names().iter().map(|n| n.to_string()).collect();
        if let Some(b) = &self.bridge {
            out.push(b.name().to_string());
        }
        out
    }

    /// Counters of the VM's plugins.
    pub fn plugin_stats(&self) -> Vec<(String, crate::plugin::PluginStats)> {
        let mut out = self.chain.stats();
        if let Some(b) = &self.bridge {
            out.push((b.name().to_string(), b.stats()));
        }
        out
    }

    /// States of the VM's policy and bridge plugins, by plugin name.
    pub fn export_state(&mut self) -> Result<Vec<NamedPluginState>, PluginError> {
        let mut out = self.chain.export_state()?;
        if let Some(b) = &mut self.bridge {
            out.push(NamedPluginState {
                name: b.name().to_string(),
                state: b.export_state()?,
            });
        }
        Ok(out)
    }

    /// Imports saved states into the plugins of the same name. A state without a plugin of
    /// its name here is reported and left out (the operator changed the plugin set).
    pub fn import_state(&mut self, states: &[NamedPluginState]) -> Result<(), PluginError> {
        let mut known: Vec<String> = self.chain.names().iter().map(|n| n.to_string()).collect();
        self.chain.import_state(states)?;
        if let Some(b) = &mut self.bridge {
            if let Some(st) = states.iter().find(|s| s.name == b.name()) {
                b.import_state(&st.state)?;
            }
            known.push(b.name().to_string());
        }
        for s in states.iter().filter(|s| !known.contains(&s.name)) {
            warn!(vm = %self.vm, plugin = %s.name, "saved state of a plugin not loaded here; left out");
        }
        Ok(())
    }

    /// Keeps ids of connections adopted from another daemon unique: new ids start above them.
    pub fn reserve_ids(max_adopted: u64) {
        NEXT_CONN_ID.fetch_max(max_adopted.saturating_add(1), Ordering::Relaxed);
    }

    /// Asks the plugins about a new connection.
    pub fn admit(&mut self, r: Request) -> Admission {
        let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
        let req = ConnRequest {
            id,
            vm: self.vm.clone(),
            src: Endpoint {
                cid: r.src.0,
                port: r.src.1,
            },
            dst: Endpoint {
                cid: r.dst.0,
                port: r.dst.1,
            },
            kind: match r.kind {
                SockType::Stream => SocketType::Stream,
                SockType::Seqpacket => SocketType::Seqpacket,
            },
            from_guest: r.from_guest,
            peer: r.peer.map(|p| wit::PeerIdentity {
                pid: p.pid,
                uid: p.uid,
                gid: p.gid,
                cgroup: p.cgroup,
                security_label: p.security_label,
            }),
        };
        let decision = self.chain.decide(&req);
        self.count(req.from_guest, &decision);
        let route = match decision {
            Decision::Deny {
                plugin,
                reason,
                failure,
            } => {
                // A host program is named by its credentials (the reason may not say).
                let peer = req.peer.as_ref().map(|p| (p.pid, p.uid, p.gid));
                if failure {
                    warn!(vm = %self.vm, %plugin, %reason, ?peer, "plugin failed; connection refused");
                } else {
                    info!(vm = %self.vm, %plugin, %reason, ?peer, "connection denied by policy");
                }
                return self.refuse(id, reason);
            }
            Decision::Redirect { route, .. } => route,
            Decision::Allow => match &mut self.bridge {
                None => Route::Default,
                Some(b) => match b.route(&req) {
                    Ok(route) => route,
                    Err(e) => {
                        info!(vm = %self.vm, error = %e, "bridge refused the connection");
                        return self.refuse(id, e.to_string());
                    }
                },
            },
        };
        match target_of(route) {
            Ok(target) => Admission::Admit { id, target },
            Err(why) => self.refuse(id, why),
        }
    }

    /// Refuses connection `id`; its `on-close` follows at once (every request the policy saw
    /// gets one).
    fn refuse(&mut self, id: u64, why: String) -> Admission {
        self.never_opened(id);
        Admission::Refuse(why)
    }

    /// Reports an admitted connection that could not be opened (e.g. nothing listens there).
    pub fn never_opened(&mut self, id: u64) {
        self.closed(
            id,
            &Closed {
                bytes_to_guest: 0,
                bytes_from_guest: 0,
                opened: Instant::now(),
                reset: true,
            },
        );
    }

    /// Reports a closed connection to the policy plugins.
    pub fn closed(&mut self, id: u64, c: &Closed) {
        let stats = ConnStats {
            bytes_to_guest: c.bytes_to_guest,
            bytes_from_guest: c.bytes_from_guest,
            duration_ms: c.opened.elapsed().as_millis().min(u128::from(u64::MAX)) as u64,
            reset: c.reset,
        };
        self.chain.on_close(id, &stats);
    }
}

/// Turns a route (already checked against the operator's allowlist by the runtime) into a
/// target. TCP targets must be IP addresses (or `localhost`): the worker thread never waits
/// on name resolution.
fn target_of(route: Route) -> Result<Target, String> {
    Ok(match route {
        Route::Default => Target::Default,
        Route::UnixSocket(p) => Target::Unix(PathBuf::from(p)),
        Route::Tcp(t) => Target::Tcp(parse_tcp_target(&t)?),
        Route::Vsock(e) => Target::Vsock {
            cid: e.cid,
            port: e.port,
        },
        Route::ProxyUnix(p) => Target::ProxyUnix(PathBuf::from(p)),
        Route::ProxyTcp(t) => Target::ProxyTcp(parse_tcp_target(&t)?),
        Route::HostVsock(e) => Target::HostVsock {
            cid: u32::try_from(e.cid).map_err(|_| format!("host vsock cid {} too wide", e.cid))?,
            port: e.port,
        },
    })
}

fn parse_tcp_target(t: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = t
        .rsplit_once(':')
        .ok_or_else(|| format!("tcp route without port: {t}"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("tcp route with a bad port: {t}"))?;
    let ip = match host.trim_start_matches('[').trim_end_matches(']') {
        h if h.eq_ignore_ascii_case("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => h
            .parse()
            .map_err(|_| format!("tcp route host must be an IP address: {t}"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_targets() {
        assert_eq!(
            parse_tcp_target("127.0.0.1:80"),
            Ok("127.0.0.1:80".parse().expect("addr"))
        );
        assert_eq!(
            parse_tcp_target("localhost:8080"),
            Ok("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(
            parse_tcp_target("[::1]:9"),
            Ok("[::1]:9".parse().expect("addr"))
        );
        assert!(parse_tcp_target("example.com:80").is_err());
        assert!(parse_tcp_target("127.0.0.1").is_err());
        assert!(parse_tcp_target("127.0.0.1:99999").is_err());
    }
}

/// The plugins of the daemon, compiled once, from which each VM's gate is instantiated.
pub struct PluginSet {
    rt: PluginRuntime,
    policies: Vec<Plugin>,
    bridge: Option<Plugin>,
    serializer: Plugin,
    routes: RoutePolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginSetError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("--allow-route {0}: {1}")]
    Route(String, String),
    #[error("more than one {0} plugin given")]
    Duplicate(&'static str),
}

impl PluginSet {
    /// Loads `specs` (the built-in defaults when empty) and the operator's route allowlist.
    pub fn load(
        specs: &[PluginSpec],
        allow: &[RouteSpec],
        cache: Option<CacheDir>,
        registry: Arc<Registry>,
    ) -> Result<Self, PluginSetError> {
        let rt = PluginRuntime::new(RuntimeConfig {
            cache,
            ..RuntimeConfig::default()
        })?;
        Self::with_runtime(rt, specs, allow, registry)
    }

    /// Another set (a VM's own plugins) on the same runtime.
    pub fn sibling_set(
        &self,
        specs: &[PluginSpec],
        allow: &[RouteSpec],
        registry: Arc<Registry>,
    ) -> Result<Self, PluginSetError> {
        Self::with_runtime(self.rt.clone(), specs, allow, registry)
    }

    fn with_runtime(
        rt: PluginRuntime,
        specs: &[PluginSpec],
        allow: &[RouteSpec],
        registry: Arc<Registry>,
    ) -> Result<Self, PluginSetError> {
        let defaults;
        let specs = if specs.is_empty() {
            defaults = PluginSpec::defaults();
            &defaults[..]
        } else {
            specs
        };
        let (mut policies, mut bridge, mut serializer) = (Vec::new(), None, None);
        for spec in specs {
            let p = rt.load(spec)?;
            info!(plugin = p.name(), kind = %p.kind(), "plugin loaded");
            match p.kind() {
                PluginKind::Policy => policies.push(p),
                PluginKind::Bridge if bridge.is_some() => {
                    return Err(PluginSetError::Duplicate("bridge"))
                }
                PluginKind::Bridge => bridge = Some(p),
                PluginKind::Serializer if serializer.is_some() => {
                    return Err(PluginSetError::Duplicate("serializer"))
                }
                PluginKind::Serializer => serializer = Some(p),
            }
        }
        let serializer = match serializer {
            Some(s) => s,
            None => rt.load(&PluginSpec::builtin(
                PluginKind::Serializer,
                "serializer-postcard",
                "",
            ))?,
        };
        let mut list = RouteAllowlist::new();
        for r in allow {
            let res = match r {
                RouteSpec::UnixDir(d) => list.allow_unix_dir(d).map(|_| ()),
                RouteSpec::Tcp(t) => list.allow_tcp(t).map(|_| ()),
                RouteSpec::Vsock(v) => list.allow_vsock(v).map(|_| ()),
            };
            res.map_err(|e| PluginSetError::Route(format!("{r:?}"), e.to_string()))?;
        }
        let siblings = move |req: &ConnRequest, cid: u64| registry.check(req.src.cid, cid).is_ok();
        Ok(PluginSet {
            rt,
            policies,
            bridge,
            serializer,
            routes: RoutePolicy {
                allow: Arc::new(list),
                siblings: Arc::new(siblings),
            },
        })
    }

    /// The serializer of the VM named `vm` (`serializer-postcard` unless another was
    /// given), instantiated when first used.
    pub fn serializer_for(&self, vm: &str) -> Result<Serializer, PluginError> {
        Serializer::deferred(&self.rt, vm, &self.serializer)
    }

    /// A fresh gate for the VM named `vm`. Its plugin instances are made by
    /// [`Gate::start`] when a frontend attaches (or by the first call), so an idle VM costs
    /// no plugin memory.
    pub fn gate(&self, vm: &str) -> Result<Gate, PluginError> {
        let mut chain = PolicyChain::deferred(&self.rt, vm, &self.policies)?;
        chain.set_routes(self.routes.clone());
        let bridge = match &self.bridge {
            Some(b) => Some(Bridge::deferred(&self.rt, vm, b, self.routes.clone())?),
            None => None,
        };
        Ok(Gate::new(vm.to_string(), chain, bridge))
    }

    pub fn runtime(&self) -> &PluginRuntime {
        &self.rt
    }
}
