//! Per-VM plugin instances: the policy chain, a bridge and a serializer.
use std::sync::Arc;

use super::dispatch::{BridgeImpl, PolicyImpl, SerializerImpl, Stateful, World};
use super::instance::{PluginCounters, PluginStats, Slot};
use super::route::{NoSiblings, RouteAllowlist, RouteCheck, SiblingCheck};
use super::types::{
    ConnRequest, ConnStats, DeviceState, NamedPluginState, PluginState, Route, Verdict,
};
use super::{validate, Plugin, PluginError, PluginKind, PluginRuntime};

/// The outcome of a policy chain for one connection request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refuse (RST). `failure` = the plugin failed (trap, deadline, limit, bad answer,
    /// quarantine) rather than answering `deny`.
    Deny {
        plugin: String,
        reason: String,
        failure: bool,
    },
    /// Allow, but connect to `route` (already checked against the allowlist).
    Redirect {
        plugin: String,
        route: Route,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Decision::Deny { .. })
    }
}

/// Routes plugins may choose, and the sibling relation for vsock routes.
#[derive(Clone)]
pub struct RoutePolicy {
    pub allow: Arc<RouteAllowlist>,
    pub siblings: Arc<dyn SiblingCheck>,
}

impl Default for RoutePolicy {
    /// Nothing but `Route::Default` is allowed.
    fn default() -> Self {
        Self {
            allow: Arc::new(RouteAllowlist::new()),
            siblings: Arc::new(NoSiblings),
        }
    }
}

impl RoutePolicy {
    fn check(&self, req: &ConnRequest, route: &Route) -> Result<(), String> {
        validate::route_shape(route)?;
        self.allow
            .check(req, route, &*self.siblings)
            .map_err(|e| e.to_string())
    }
}

impl<W: World + Stateful> Slot<W> {
    fn export_state(&mut self, limits: &super::ReturnLimits) -> Result<PluginState, PluginError> {
        self.call(
            "export-state",
            |s, w| w.export(s),
            |st| {
                validate::plugin_state(&st, limits)?;
                Ok(st)
            },
        )
    }

    fn import_state(&mut self, st: &PluginState) -> Result<(), PluginError> {
        let r = self.call("import-state", |s, w| w.import(s, st), Ok)?;
        r.map_err(|m| PluginError::Refused {
            plugin: self.name().to_string(),
            message: validate::truncate(m, 1024),
        })
    }
}

fn expect_kind(p: &Plugin, kind: PluginKind) -> Result<(), PluginError> {
    if p.kind() != kind {
        return Err(PluginError::WrongKind {
            name: p.name().into(),
            expected: kind,
            actual: p.kind(),
        });
    }
    Ok(())
}

/// Ordered policy plugins of one VM. The first `deny` wins (later plugins are not asked); else
/// the first `redirect` wins; else allow. An empty chain allows everything.
pub struct PolicyChain {
    rt: PluginRuntime,
    vm: String,
    slots: Vec<Slot<PolicyImpl>>,
    routes: RoutePolicy,
}

impl PolicyChain {
    /// Instantiate `plugins` (all of kind policy) for VM `vm`.
    pub fn new(rt: &PluginRuntime, vm: &str, plugins: &[Plugin]) -> Result<Self, PluginError> {
        let mut slots = Vec::with_capacity(plugins.len());
        for p in plugins {
            expect_kind(p, PluginKind::Policy)?;
            slots.push(Slot::new(rt, p.clone(), vm)?);
        }
        Ok(Self {
            rt: rt.clone(),
            vm: vm.into(),
            slots,
            routes: RoutePolicy::default(),
        })
    }

    /// Like [`PolicyChain::new`], but the instances are made by the first decision or by
    /// [`PolicyChain::start`]: a VM without a frontend holds none.
    pub fn deferred(rt: &PluginRuntime, vm: &str, plugins: &[Plugin]) -> Result<Self, PluginError> {
        let mut slots = Vec::with_capacity(plugins.len());
        for p in plugins {
            expect_kind(p, PluginKind::Policy)?;
            slots.push(Slot::deferred(rt, p.clone(), vm));
        }
        Ok(Self {
            rt: rt.clone(),
            vm: vm.into(),
            slots,
            routes: RoutePolicy::default(),
        })
    }

    /// Makes sure every plugin of the chain has an instance.
    pub fn start(&mut self) -> Result<(), PluginError> {
        self.slots.iter_mut().try_for_each(|s| s.start())
    }

    /// Set what redirects may point to (default: nothing but `Route::Default`).
    pub fn set_routes(&mut self, routes: RoutePolicy) {
        self.routes = routes;
    }

    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name()).collect()
    }

    pub fn decide(&mut self, req: &ConnRequest) -> Decision {
        let limits = &self.rt.shared.cfg.returns;
        let routes = &self.routes;
        let mut redirect: Option<(String, Route)> = None;
        for slot in &mut self.slots {
            let r = slot.call(
                "on-connect",
                |s, w| w.on_connect(s, req),
                |v| {
                    match &v {
                        Verdict::Allow => {}
                        Verdict::Deny(reason) => validate::reason(reason, limits)?,
                        Verdict::Redirect(route) => routes.check(req, route)?,
                    }
                    Ok(v)
                },
            );
            let deny = |slot: &Slot<_>, reason: String, failure: bool| {
                slot.counters
                    .denials
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Decision::Deny {
                    plugin: slot.name().to_string(),
                    reason,
                    failure,
                }
            };
            match r {
                Ok(Verdict::Allow) | Ok(Verdict::Redirect(Route::Default)) => {}
                Ok(Verdict::Deny(reason)) => return deny(slot, reason, false),
                Ok(Verdict::Redirect(route)) => {
                    if redirect.is_none() {
                        redirect = Some((slot.name().to_string(), route));
                    }
                }
                Err(e) => return deny(slot, e.to_string(), true),
            }
        }
        match redirect {
            Some((plugin, route)) => Decision::Redirect { plugin, route },
            None => Decision::Allow,
        }
    }

    /// Report a closed connection to every plugin (failures are counted, nothing else).
    pub fn on_close(&mut self, id: u64, stats: &ConnStats) {
        for slot in &mut self.slots {
            let _ = slot.notify("on-close", |s, w| w.on_close(s, id, *stats));
        }
    }

    /// Every plugin's state, by name.
    pub fn export_state(&mut self) -> Result<Vec<NamedPluginState>, PluginError> {
        let limits = self.rt.shared.cfg.returns.clone();
        self.slots
            .iter_mut()
            .map(|s| {
                Ok(NamedPluginState {
                    name: s.name().to_string(),
                    state: s.export_state(&limits)?,
                })
            })
            .collect()
    }

    /// Give each plugin the state saved under its name (plugins without one keep theirs).
    /// Stops at the first refusal and returns it.
    pub fn import_state(&mut self, states: &[NamedPluginState]) -> Result<(), PluginError> {
        for slot in &mut self.slots {
            if let Some(st) = states.iter().find(|s| s.name == slot.name()) {
                slot.import_state(&st.state)?;
            }
        }
        Ok(())
    }

    /// In-place swap: export the state of plugin `name`, instantiate `new`, import the state
    /// into it and put it in the old one's place. If `new` refuses the state, nothing changes.
    /// A quarantined plugin's state is not carried over (it may be what broke it).
    pub fn replace(&mut self, name: &str, new: Plugin) -> Result<(), PluginError> {
        expect_kind(&new, PluginKind::Policy)?;
        let i = self
            .slots
            .iter()
            .position(|s| s.name() == name)
            .ok_or_else(|| PluginError::NoSuchPlugin(name.into()))?;
        let limits = self.rt.shared.cfg.returns.clone();
        let old = &mut self.slots[i];
        let state = if old.quarantined() {
            None
        } else {
            Some(old.export_state(&limits)?)
        };
        let mut slot = Slot::new(&self.rt, new, &self.vm)?;
        if let Some(st) = &state {
            slot.import_state(st)?;
        }
        tracing::info!(vm = %self.vm, old = name, new = slot.name(), "policy plugin replaced");
        self.slots[i] = slot;
        Ok(())
    }

    pub fn stats(&self) -> Vec<(String, PluginStats)> {
        self.slots
            .iter()
            .map(|s| (s.name().to_string(), s.counters.snapshot()))
            .collect()
    }

    /// Live counters (to register with a metrics exporter).
    pub fn counters(&self) -> Vec<(String, Arc<PluginCounters>)> {
        self.slots
            .iter()
            .map(|s| (s.name().to_string(), s.counters.clone()))
            .collect()
    }
}

/// A bridge plugin instance of one VM.
pub struct Bridge {
    rt: PluginRuntime,
    slot: Slot<BridgeImpl>,
    routes: RoutePolicy,
}

impl Bridge {
    pub fn new(
        rt: &PluginRuntime,
        vm: &str,
        plugin: &Plugin,
        routes: RoutePolicy,
    ) -> Result<Self, PluginError> {
        expect_kind(plugin, PluginKind::Bridge)?;
        Ok(Self {
            rt: rt.clone(),
            slot: Slot::new(rt, plugin.clone(), vm)?,
            routes,
        })
    }

    /// Like [`Bridge::new`], instantiated by the first call or by [`Bridge::start`].
    pub fn deferred(
        rt: &PluginRuntime,
        vm: &str,
        plugin: &Plugin,
        routes: RoutePolicy,
    ) -> Result<Self, PluginError> {
        expect_kind(plugin, PluginKind::Bridge)?;
        Ok(Self {
            rt: rt.clone(),
            slot: Slot::deferred(rt, plugin.clone(), vm),
            routes,
        })
    }

    /// Makes sure the plugin has an instance.
    pub fn start(&mut self) -> Result<(), PluginError> {
        self.slot.start()
    }

    /// Where `req` goes. `Err(Refused)` = the plugin refused it; `Err(Call | Quarantined)` =
    /// the plugin failed (or chose a route outside the allowlist). Either way: refuse.
    pub fn route(&mut self, req: &ConnRequest) -> Result<Route, PluginError> {
        let limits = &self.rt.shared.cfg.returns;
        let routes = &self.routes;
        let r = self.slot.call(
            "route",
            |s, w| w.route(s, req),
            |r| {
                match &r {
                    Ok(route) => routes.check(req, route)?,
                    Err(reason) => validate::reason(reason, limits)?,
                }
                Ok(r)
            },
        );
        match r {
            Ok(Ok(route)) => Ok(route),
            Ok(Err(message)) => {
                self.slot
                    .counters
                    .denials
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(PluginError::Refused {
                    plugin: self.slot.name().to_string(),
                    message,
                })
            }
            Err(e) => {
                self.slot
                    .counters
                    .denials
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(e)
            }
        }
    }

    pub fn export_state(&mut self) -> Result<PluginState, PluginError> {
        let limits = self.rt.shared.cfg.returns.clone();
        self.slot.export_state(&limits)
    }

    pub fn import_state(&mut self, st: &PluginState) -> Result<(), PluginError> {
        self.slot.import_state(st)
    }

    pub fn name(&self) -> &str {
        self.slot.name()
    }

    pub fn stats(&self) -> PluginStats {
        self.slot.counters.snapshot()
    }

    pub fn counters(&self) -> Arc<PluginCounters> {
        self.slot.counters.clone()
    }
}

/// A serializer plugin instance (one per VM is enough; save/restore is rare).
pub struct Serializer {
    rt: PluginRuntime,
    slot: Slot<SerializerImpl>,
}

impl Serializer {
    pub fn new(rt: &PluginRuntime, vm: &str, plugin: &Plugin) -> Result<Self, PluginError> {
        expect_kind(plugin, PluginKind::Serializer)?;
        Ok(Self {
            rt: rt.clone(),
            slot: Slot::new(rt, plugin.clone(), vm)?,
        })
    }

    /// Like [`Serializer::new`], instantiated by the first call: saving and restoring are
    /// rare, so most VMs never hold a serializer instance.
    pub fn deferred(rt: &PluginRuntime, vm: &str, plugin: &Plugin) -> Result<Self, PluginError> {
        expect_kind(plugin, PluginKind::Serializer)?;
        Ok(Self {
            rt: rt.clone(),
            slot: Slot::deferred(rt, plugin.clone(), vm),
        })
    }

    pub fn encode(&mut self, state: &DeviceState) -> Result<Vec<u8>, PluginError> {
        let limits = &self.rt.shared.cfg.returns;
        let r = self.slot.call(
            "encode",
            |s, w| w.encode(s, state),
            |r| {
                if let Ok(b) = &r {
                    if b.len() > limits.max_blob {
                        return Err(format!(
                            "blob is {} bytes (max {})",
                            b.len(),
                            limits.max_blob
                        ));
                    }
                }
                Ok(r)
            },
        )?;
        r.map_err(|m| PluginError::Refused {
            plugin: self.slot.name().into(),
            message: validate::truncate(m, 1024),
        })
    }

    /// Decode an untrusted blob inside the sandbox, then check the result structurally
    /// ([`validate::device_state`]); an invalid record is `InvalidState`.
    pub fn decode(&mut self, blob: &[u8]) -> Result<DeviceState, PluginError> {
        let limits = &self.rt.shared.cfg.returns;
        if blob.len() > limits.max_blob {
            return Err(PluginError::InvalidState(format!(
                "blob is {} bytes (max {})",
                blob.len(),
                limits.max_blob
            )));
        }
        let r = self.slot.call("decode", |s, w| w.decode(s, blob), Ok)?;
        let state = r.map_err(|m| PluginError::Refused {
            plugin: self.slot.name().into(),
            message: validate::truncate(m, 1024),
        })?;
        validate::device_state(&state, limits).map_err(PluginError::InvalidState)?;
        Ok(state)
    }

    pub fn name(&self) -> &str {
        self.slot.name()
    }

    pub fn stats(&self) -> PluginStats {
        self.slot.counters.snapshot()
    }

    /// Live counters (for the metrics endpoint).
    pub fn counters(&self) -> Arc<PluginCounters> {
        self.slot.counters.clone()
    }
}

/// Instances move to the VM's thread.
const _: () = {
    const fn is_send<T: Send>() {}
    is_send::<PolicyChain>();
    is_send::<Bridge>();
    is_send::<Serializer>();
};
