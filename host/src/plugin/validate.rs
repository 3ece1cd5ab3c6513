//! Checks on everything a plugin returns (plugins are as untrusted as guests).
use super::route::{MAX_TCP_TARGET, MAX_UNIX_PATH};
use super::runtime::ReturnLimits;
use super::types::{DeviceState, PluginState, Route};

pub(crate) fn reason(s: &str, limits: &ReturnLimits) -> Result<(), String> {
    if s.len() > limits.max_reason {
        return Err(format!(
            "reason is {} bytes (max {})",
            s.len(),
            limits.max_reason
        ));
    }
    Ok(())
}

/// Shape only; the allowlist check is separate.
pub(crate) fn route_shape(r: &Route) -> Result<(), String> {
    match r {
        Route::UnixSocket(p) | Route::ProxyUnix(p) if p.len() > MAX_UNIX_PATH => Err(format!(
            "unix socket path is {} bytes (max {MAX_UNIX_PATH})",
            p.len()
        )),
        Route::Tcp(t) | Route::ProxyTcp(t) if t.len() > MAX_TCP_TARGET => Err(format!(
            "tcp target is {} bytes (max {MAX_TCP_TARGET})",
            t.len()
        )),
        _ => Ok(()),
    }
}

pub(crate) fn plugin_state(s: &PluginState, limits: &ReturnLimits) -> Result<(), String> {
    if s.data.len() > limits.max_state {
        return Err(format!(
            "state is {} bytes (max {})",
            s.data.len(),
            limits.max_state
        ));
    }
    Ok(())
}

/// Cut an error message a plugin sent with a regular (non-failure) answer.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// Structural checks of a device state (decoded from an untrusted blob): counts and sizes
/// within limits, a guest CID that can be a guest's, unique plugin names and fd indices.
/// Semantic checks (features offered, queue sizes) belong to the device.
pub fn device_state(s: &DeviceState, limits: &ReturnLimits) -> Result<(), String> {
    if s.guest_cid < 3 || s.guest_cid >= u64::from(u32::MAX) {
        return Err(format!("guest cid {} is not a guest cid", s.guest_cid));
    }
    if s.plugins.len() > limits.max_plugin_states {
        return Err(format!(
            "{} plugin states (max {})",
            s.plugins.len(),
            limits.max_plugin_states
        ));
    }
    let mut names = std::collections::HashSet::new();
    for p in &s.plugins {
        if p.name.is_empty() || p.name.len() > 64 {
            return Err(format!("plugin name of {} bytes (1-64)", p.name.len()));
        }
        if !names.insert(p.name.as_str()) {
            return Err(format!("plugin `{}` twice", p.name));
        }
        plugin_state(&p.state, limits).map_err(|e| format!("plugin `{}`: {e}", p.name))?;
    }
    if s.connections.len() > limits.max_connections {
        return Err(format!(
            "{} connections (max {})",
            s.connections.len(),
            limits.max_connections
        ));
    }
    let mut fds = std::collections::HashSet::new();
    let mut ports = std::collections::HashSet::new();
    for (i, c) in s.connections.iter().enumerate() {
        if c.pending_to_guest.len() > limits.max_pending
            || c.pending_to_host.len() > limits.max_pending
        {
            return Err(format!(
                "connection {i}: pending bytes over {}",
                limits.max_pending
            ));
        }
        if let Some(fd) = c.fd_index {
            if fd as usize >= s.connections.len() || !fds.insert(fd) {
                return Err(format!(
                    "connection {i}: fd index {fd} out of range or reused"
                ));
            }
        }
        if !ports.insert((c.local_cid, c.local_port, c.peer_port)) {
            return Err(format!(
                "connection {i}: duplicate ({}, {}, {})",
                c.local_cid, c.local_port, c.peer_port
            ));
        }
    }
    Ok(())
}
