//! What one plugin instance's store holds: a WASI context with nothing granted, the host
//! functions of the `host` interface (log, clock, config) and the limiter that reports which
//! limit a plugin hit.
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{host, policy_world, v0_1, v0_2};
use super::{compat, compat_v0_2};

/// Per-store host data: WASI context with nothing granted, limits and the plugin's identity.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    plugin: Arc<str>,
    vm: Arc<str>,
    config: Arc<str>,
    clock: Instant,
    logs_left: u32,
}

const MAX_LOG_LINES_PER_CALL: u32 = 32;
const MAX_LOG_BYTES: usize = 1024;

impl HostState {
    pub(crate) fn new(
        limits: StoreLimits,
        clock: Instant,
        plugin: Arc<str>,
        vm: Arc<str>,
        config: Arc<str>,
    ) -> Self {
        // Nothing granted: no preopened dirs, no env/args, stdio not inherited (stdin empty,
        // stdout/stderr discarded), no TCP/UDP/name lookup. Clocks and random remain (WASI
        // always provides them; they reveal nothing the host clock doesn't).
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                inner: limits,
                hit: None,
            },
            plugin,
            vm,
            config,
            clock,
            logs_left: MAX_LOG_LINES_PER_CALL,
        }
    }

    pub(crate) fn begin_call(&mut self) {
        self.logs_left = MAX_LOG_LINES_PER_CALL;
        self.limiter.hit = None;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl policy_world::vhost_plug::plugin::types::Host for HostState {}
impl v0_1::types::Host for HostState {}
impl v0_2::types::Host for HostState {}

/// A 0.1.0 plugin gets the same host functions.
impl v0_1::host::Host for HostState {
    fn log(&mut self, level: v0_1::host::LogLevel, msg: String) {
        v0_2::host::Host::log(self, compat::log_level(level), msg)
    }

    fn now_ns(&mut self) -> u64 {
        host::Host::now_ns(self)
    }

    fn config(&mut self) -> String {
        host::Host::config(self)
    }
}

/// A 0.2.0 plugin gets the same host functions.
impl v0_2::host::Host for HostState {
    fn log(&mut self, level: v0_2::host::LogLevel, msg: String) {
        host::Host::log(self, compat_v0_2::log_level(level), msg)
    }

    fn now_ns(&mut self) -> u64 {
        host::Host::now_ns(self)
    }

    fn config(&mut self) -> String {
        host::Host::config(self)
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: host::LogLevel, msg: String) {
        if self.logs_left == 0 {
            return;
        }
        self.logs_left -= 1;
        let mut msg = msg;
        if msg.len() > MAX_LOG_BYTES {
            let mut end = MAX_LOG_BYTES;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            msg.truncate(end);
            msg.push_str("...");
        }
        let (plugin, vm) = (&*self.plugin, &*self.vm);
        match level {
            host::LogLevel::Trace => tracing::trace!(plugin, vm, "{msg}"),
            host::LogLevel::Debug => tracing::debug!(plugin, vm, "{msg}"),
            host::LogLevel::Info => tracing::info!(plugin, vm, "{msg}"),
            host::LogLevel::Warn => tracing::warn!(plugin, vm, "{msg}"),
            host::LogLevel::Error => tracing::error!(plugin, vm, "{msg}"),
        }
    }

    fn now_ns(&mut self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }
}

/// `StoreLimits` that remembers when a limit was hit, to report "memory limit" rather than a
/// generic trap.
pub(crate) struct Limiter {
    inner: StoreLimits,
    pub(crate) hit: Option<String>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.hit = Some(format!(
                "memory grow from {current} to {desired} bytes refused"
            ));
        }
        r
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.table_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.hit = Some(format!(
                "table grow from {current} to {desired} elements refused"
            ));
        }
        r
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}
