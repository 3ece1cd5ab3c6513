//! One instantiated plugin of any WIT package version, behind one set of calls in the
//! current package's types. A 0.2.0 instance gets its arguments converted down and its answers
//! converted up ([`super::compat_v0_2`]); a 0.1.0 instance goes one step further down and up
//! ([`super::compat`]); a 0.3.0 instance is called directly.

use wasmtime::Store;

use super::bindings::{bridge_world, policy_world, serializer_world, v0_1, v0_2};
use super::detect::KindPre;
use super::store::HostState;
use super::types::{ConnRequest, ConnStats, DeviceState, PluginState, Route, Verdict};
use super::{compat, compat_v0_2 as compat2};

pub use crate::spec::WitVersion;

pub(crate) trait World: Sized + Send {
    /// Call budgets (fuel and wall clock) one call of this world gets.
    const CALL_BUDGETS: u64 = 1;
    fn instantiate(pre: &KindPre, store: &mut Store<HostState>) -> wasmtime::Result<Self>;
}

pub(crate) enum PolicyImpl {
    V0_1(v0_1::policy_world::PolicyPlugin),
    V0_2(v0_2::policy_world::PolicyPlugin),
    V0_3(policy_world::PolicyPlugin),
}

pub(crate) enum BridgeImpl {
    V0_1(v0_1::bridge_world::BridgePlugin),
    V0_2(v0_2::bridge_world::BridgePlugin),
    V0_3(bridge_world::BridgePlugin),
}

pub(crate) enum SerializerImpl {
    V0_1(v0_1::serializer_world::SerializerPlugin),
    V0_2(v0_2::serializer_world::SerializerPlugin),
    V0_3(serializer_world::SerializerPlugin),
}

impl World for PolicyImpl {
    fn instantiate(pre: &KindPre, store: &mut Store<HostState>) -> wasmtime::Result<Self> {
        match pre {
            KindPre::Policy(p) => p.instantiate(store).map(Self::V0_3),
            KindPre::PolicyV0_2(p) => p.instantiate(store).map(Self::V0_2),
            KindPre::PolicyV0_1(p) => p.instantiate(store).map(Self::V0_1),
            _ => wasmtime::bail!("not a policy plugin"),
        }
    }
}

impl World for BridgeImpl {
    fn instantiate(pre: &KindPre, store: &mut Store<HostState>) -> wasmtime::Result<Self> {
        match pre {
            KindPre::Bridge(p) => p.instantiate(store).map(Self::V0_3),
            KindPre::BridgeV0_2(p) => p.instantiate(store).map(Self::V0_2),
            KindPre::BridgeV0_1(p) => p.instantiate(store).map(Self::V0_1),
            _ => wasmtime::bail!("not a bridge plugin"),
        }
    }
}

impl World for SerializerImpl {
    /// A serializer walks the whole connection table (16,384 connections by default: about
    /// 50 million fuel to decode with serializer-postcard), on the save/load thread.
    const CALL_BUDGETS: u64 = 20;
    fn instantiate(pre: &KindPre, store: &mut Store<HostState>) -> wasmtime::Result<Self> {
        match pre {
            KindPre::Serializer(p) => p.instantiate(store).map(Self::V0_3),
            KindPre::SerializerV0_2(p) => p.instantiate(store).map(Self::V0_2),
            KindPre::SerializerV0_1(p) => p.instantiate(store).map(Self::V0_1),
            _ => wasmtime::bail!("not a serializer plugin"),
        }
    }
}

impl PolicyImpl {
    pub(crate) fn on_connect(
        &self,
        s: &mut Store<HostState>,
        req: &ConnRequest,
    ) -> wasmtime::Result<Verdict> {
        match self {
            Self::V0_3(w) => w.vhost_plug_plugin_policy().call_on_connect(s, req),
            Self::V0_2(w) => w
                .vhost_plug_plugin_policy()
                .call_on_connect(s, &compat2::conn_request(req))
                .map(compat2::verdict),
            Self::V0_1(w) => w
                .vhost_plug_plugin_policy()
                .call_on_connect(s, &compat::conn_request(&compat2::conn_request(req)))
                .map(|v| compat2::verdict(compat::verdict(v))),
        }
    }

    pub(crate) fn on_close(
        &self,
        s: &mut Store<HostState>,
        id: u64,
        stats: ConnStats,
    ) -> wasmtime::Result<()> {
        match self {
            Self::V0_3(w) => w.vhost_plug_plugin_policy().call_on_close(s, id, stats),
            Self::V0_2(w) => {
                w.vhost_plug_plugin_policy()
                    .call_on_close(s, id, compat2::conn_stats(stats))
            }
            Self::V0_1(w) => w.vhost_plug_plugin_policy().call_on_close(
                s,
                id,
                compat::conn_stats(compat2::conn_stats(stats)),
            ),
        }
    }
}

impl BridgeImpl {
    pub(crate) fn route(
        &self,
        s: &mut Store<HostState>,
        req: &ConnRequest,
    ) -> wasmtime::Result<Result<Route, String>> {
        match self {
            Self::V0_3(w) => w.vhost_plug_plugin_bridge().call_route(s, req),
            Self::V0_2(w) => w
                .vhost_plug_plugin_bridge()
                .call_route(s, &compat2::conn_request(req))
                .map(|r| r.map(compat2::route)),
            Self::V0_1(w) => w
                .vhost_plug_plugin_bridge()
                .call_route(s, &compat::conn_request(&compat2::conn_request(req)))
                .map(|r| r.map(|r| compat2::route(compat::route(r)))),
        }
    }
}

impl SerializerImpl {
    pub(crate) fn encode(
        &self,
        s: &mut Store<HostState>,
        state: &DeviceState,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        match self {
            Self::V0_3(w) => w.vhost_plug_plugin_serializer().call_encode(s, state),
            Self::V0_2(w) => w
                .vhost_plug_plugin_serializer()
                .call_encode(s, &compat2::device_state_down(state)),
            Self::V0_1(w) => w.vhost_plug_plugin_serializer().call_encode(
                s,
                &compat::device_state_down(&compat2::device_state_down(state)),
            ),
        }
    }

    pub(crate) fn decode(
        &self,
        s: &mut Store<HostState>,
        blob: &[u8],
    ) -> wasmtime::Result<Result<DeviceState, String>> {
        match self {
            Self::V0_3(w) => w.vhost_plug_plugin_serializer().call_decode(s, blob),
            Self::V0_2(w) => w
                .vhost_plug_plugin_serializer()
                .call_decode(s, blob)
                .map(|r| r.map(compat2::device_state_up)),
            Self::V0_1(w) => w
                .vhost_plug_plugin_serializer()
                .call_decode(s, blob)
                .map(|r| r.map(|d| compat2::device_state_up(compat::device_state_up(d)))),
        }
    }
}

/// Worlds that export `stateful`.
pub(crate) trait Stateful {
    fn export(&self, s: &mut Store<HostState>) -> wasmtime::Result<PluginState>;
    fn import(
        &self,
        s: &mut Store<HostState>,
        st: &PluginState,
    ) -> wasmtime::Result<Result<(), String>>;
}

/// `stateful` is the same interface in every version; only the type paths differ.
macro_rules! stateful {
    ($t:ty) => {
        impl Stateful for $t {
            fn export(&self, s: &mut Store<HostState>) -> wasmtime::Result<PluginState> {
                match self {
                    Self::V0_3(w) => w.vhost_plug_plugin_stateful().call_export_state(s),
                    Self::V0_2(w) => w
                        .vhost_plug_plugin_stateful()
                        .call_export_state(s)
                        .map(compat2::plugin_state_up),
                    Self::V0_1(w) => w
                        .vhost_plug_plugin_stateful()
                        .call_export_state(s)
                        .map(|st| compat2::plugin_state_up(compat::plugin_state_up(st))),
                }
            }
            fn import(
                &self,
                s: &mut Store<HostState>,
                st: &PluginState,
            ) -> wasmtime::Result<Result<(), String>> {
                match self {
                    Self::V0_3(w) => w.vhost_plug_plugin_stateful().call_import_state(s, st),
                    Self::V0_2(w) => w
                        .vhost_plug_plugin_stateful()
                        .call_import_state(s, &compat2::plugin_state_down(st)),
                    Self::V0_1(w) => w.vhost_plug_plugin_stateful().call_import_state(
                        s,
                        &compat::plugin_state_down(&compat2::plugin_state_down(st)),
                    ),
                }
            }
        }
    };
}

stateful!(PolicyImpl);
stateful!(BridgeImpl);
