//! Conversions between the types of `vhost-plug:plugin@0.1.0` and `@0.2.0`.
//!
//! The two packages differ only in `conn-request` (0.2.0 added `peer`) and `route` (0.2.0 added
//! `proxy-unix` and `proxy-tcp`), but the component model
//! names every type by its package version, so each version has Rust types of its own. Requests
//! go down (the 0.1.0 plugin does not see `peer`); answers come up unchanged (0.2.0's `route`
//! is a superset: it added the proxied routes). A 0.1.0 plugin's values then go on through
//! [`super::compat_v0_2`] to the current package (0.3.0).

use super::bindings::v0_1::{host as old_host, types as old};
use super::bindings::v0_2::{host, types as new};

/// Copies a flags value field by field (both sides have the same flag names).
macro_rules! flags {
    ($src:expr, $from:ty => $to:ty: $($f:ident),+) => {{
        let s = $src;
        let mut d = <$to>::empty();
        $(if s.contains(<$from>::$f) { d |= <$to>::$f; })+
        d
    }};
}

pub(crate) fn conn_request(r: &new::ConnRequest) -> old::ConnRequest {
    old::ConnRequest {
        id: r.id,
        vm: r.vm.clone(),
        src: endpoint_down(r.src),
        dst: endpoint_down(r.dst),
        kind: socket_type_down(r.kind),
        from_guest: r.from_guest,
    }
}

fn endpoint_down(e: new::Endpoint) -> old::Endpoint {
    old::Endpoint {
        cid: e.cid,
        port: e.port,
    }
}

fn endpoint_up(e: old::Endpoint) -> new::Endpoint {
    new::Endpoint {
        cid: e.cid,
        port: e.port,
    }
}

fn socket_type_down(k: new::SocketType) -> old::SocketType {
    match k {
        new::SocketType::Stream => old::SocketType::Stream,
        new::SocketType::Seqpacket => old::SocketType::Seqpacket,
    }
}

fn socket_type_up(k: old::SocketType) -> new::SocketType {
    match k {
        old::SocketType::Stream => new::SocketType::Stream,
        old::SocketType::Seqpacket => new::SocketType::Seqpacket,
    }
}

pub(crate) fn route(r: old::Route) -> new::Route {
    match r {
        old::Route::Default => new::Route::Default,
        old::Route::UnixSocket(p) => new::Route::UnixSocket(p),
        old::Route::Tcp(t) => new::Route::Tcp(t),
        old::Route::Vsock(e) => new::Route::Vsock(endpoint_up(e)),
    }
}

pub(crate) fn verdict(v: old::Verdict) -> new::Verdict {
    match v {
        old::Verdict::Allow => new::Verdict::Allow,
        old::Verdict::Deny(r) => new::Verdict::Deny(r),
        old::Verdict::Redirect(r) => new::Verdict::Redirect(route(r)),
    }
}

pub(crate) fn conn_stats(s: new::ConnStats) -> old::ConnStats {
    old::ConnStats {
        bytes_to_guest: s.bytes_to_guest,
        bytes_from_guest: s.bytes_from_guest,
        duration_ms: s.duration_ms,
        reset: s.reset,
    }
}

pub(crate) fn plugin_state_down(s: &new::PluginState) -> old::PluginState {
    old::PluginState {
        schema: s.schema,
        data: s.data.clone(),
    }
}

pub(crate) fn plugin_state_up(s: old::PluginState) -> new::PluginState {
    new::PluginState {
        schema: s.schema,
        data: s.data,
    }
}

pub(crate) fn log_level(l: old_host::LogLevel) -> host::LogLevel {
    match l {
        old_host::LogLevel::Trace => host::LogLevel::Trace,
        old_host::LogLevel::Debug => host::LogLevel::Debug,
        old_host::LogLevel::Info => host::LogLevel::Info,
        old_host::LogLevel::Warn => host::LogLevel::Warn,
        old_host::LogLevel::Error => host::LogLevel::Error,
    }
}

/// A device state for a 0.1.0 serializer (a copy: saving is rare, and the copy is freed as
/// soon as the plugin has encoded it).
pub(crate) fn device_state_down(s: &new::DeviceState) -> old::DeviceState {
    old::DeviceState {
        guest_cid: s.guest_cid,
        acked_features: s.acked_features,
        event_queue: old::EventQueueState {
            owner: match s.event_queue.owner {
                new::EventQueueOwner::Frontend => old::EventQueueOwner::Frontend,
                new::EventQueueOwner::Backend => old::EventQueueOwner::Backend,
            },
            driver_live: s.event_queue.driver_live,
        },
        plugins: s
            .plugins
            .iter()
            .map(|p| old::NamedPluginState {
                name: p.name.clone(),
                state: plugin_state_down(&p.state),
            })
            .collect(),
        connections: s.connections.iter().map(connection_down).collect(),
    }
}

fn connection_down(c: &new::Connection) -> old::Connection {
    old::Connection {
        local_cid: c.local_cid,
        local_port: c.local_port,
        peer_port: c.peer_port,
        kind: socket_type_down(c.kind),
        state: match c.state {
            new::ConnState::Connecting => old::ConnState::Connecting,
            new::ConnState::Established => old::ConnState::Established,
            new::ConnState::Closing => old::ConnState::Closing,
        },
        credit: old::Credit {
            rx_cnt: c.credit.rx_cnt,
            fwd_cnt: c.credit.fwd_cnt,
            last_fwd_sent: c.credit.last_fwd_sent,
            tx_cnt: c.credit.tx_cnt,
            peer_buf_alloc: c.credit.peer_buf_alloc,
            peer_fwd_cnt: c.credit.peer_fwd_cnt,
        },
        peer_shutdown: flags!(c.peer_shutdown, new::ShutdownFlags => old::ShutdownFlags:
            NO_MORE_RECEIVE, NO_MORE_SEND),
        local_shutdown: flags!(c.local_shutdown, new::ShutdownFlags => old::ShutdownFlags:
            NO_MORE_RECEIVE, NO_MORE_SEND),
        pending_to_guest: c.pending_to_guest.clone(),
        pending_to_host: c.pending_to_host.clone(),
        fd_index: c.fd_index,
        id: c.id,
        owed: flags!(c.owed, new::OwedOps => old::OwedOps:
            REQUEST, RESPONSE, RST, SHUTDOWN, CREDIT_UPDATE, CREDIT_REQUEST),
        credit_requested: c.credit_requested,
        bytes_to_guest: c.bytes_to_guest,
        bytes_from_guest: c.bytes_from_guest,
    }
}

pub(crate) fn device_state_up(s: old::DeviceState) -> new::DeviceState {
    new::DeviceState {
        guest_cid: s.guest_cid,
        acked_features: s.acked_features,
        event_queue: new::EventQueueState {
            owner: match s.event_queue.owner {
                old::EventQueueOwner::Frontend => new::EventQueueOwner::Frontend,
                old::EventQueueOwner::Backend => new::EventQueueOwner::Backend,
            },
            driver_live: s.event_queue.driver_live,
        },
        plugins: s
            .plugins
            .into_iter()
            .map(|p| new::NamedPluginState {
                name: p.name,
                state: plugin_state_up(p.state),
            })
            .collect(),
        connections: s.connections.into_iter().map(connection_up).collect(),
    }
}

fn connection_up(c: old::Connection) -> new::Connection {
    new::Connection {
        local_cid: c.local_cid,
        local_port: c.local_port,
        peer_port: c.peer_port,
        kind: socket_type_up(c.kind),
        state: match c.state {
            old::ConnState::Connecting => new::ConnState::Connecting,
            old::ConnState::Established => new::ConnState::Established,
            old::ConnState::Closing => new::ConnState::Closing,
        },
        credit: new::Credit {
            rx_cnt: c.credit.rx_cnt,
            fwd_cnt: c.credit.fwd_cnt,
            last_fwd_sent: c.credit.last_fwd_sent,
            tx_cnt: c.credit.tx_cnt,
            peer_buf_alloc: c.credit.peer_buf_alloc,
            peer_fwd_cnt: c.credit.peer_fwd_cnt,
        },
        peer_shutdown: flags!(c.peer_shutdown, old::ShutdownFlags => new::ShutdownFlags:
            NO_MORE_RECEIVE, NO_MORE_SEND),
        local_shutdown: flags!(c.local_shutdown, old::ShutdownFlags => new::ShutdownFlags:
            NO_MORE_RECEIVE, NO_MORE_SEND),
        pending_to_guest: c.pending_to_guest,
        pending_to_host: c.pending_to_host,
        fd_index: c.fd_index,
        id: c.id,
        owed: flags!(c.owed, old::OwedOps => new::OwedOps:
            REQUEST, RESPONSE, RST, SHUTDOWN, CREDIT_UPDATE, CREDIT_REQUEST),
        credit_requested: c.credit_requested,
        bytes_to_guest: c.bytes_to_guest,
        bytes_from_guest: c.bytes_from_guest,
    }
}
