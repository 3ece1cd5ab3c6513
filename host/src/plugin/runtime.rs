//! The engine: configuration, epoch ticker, compilation (with an optional on-disk cache of
//! precompiled artifacts) and world detection (`check`).
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder,
};

use super::bindings::{policy_world, v0_1, v0_2};
use super::cache::{ArtifactCache, CacheDir};
use super::detect::KindPre;
use super::dispatch::WitVersion;
use super::store::HostState;
use super::{PluginError, PluginKind, PluginSource, PluginSpec};

/// Limits on what a plugin may return; anything beyond is a malformed answer (fails closed).
#[derive(Debug, Clone)]
pub struct ReturnLimits {
    /// Deny reasons and bridge error strings (bytes).
    pub max_reason: usize,
    /// `plugin-state.data` (bytes).
    pub max_state: usize,
    /// Serializer output and input blobs (bytes).
    pub max_blob: usize,
    /// Connections in a decoded device state.
    pub max_connections: usize,
    /// Plugin states in a decoded device state.
    pub max_plugin_states: usize,
    /// Bytes pending per direction per connection in a decoded device state.
    pub max_pending: usize,
}

impl Default for ReturnLimits {
    fn default() -> Self {
        Self {
            max_reason: 256,
            max_state: 4 << 20,
            max_blob: 256 << 20,
            max_connections: 65_536,
            max_plugin_states: 64,
            max_pending: 4 << 20,
        }
    }
}

/// Pooling-allocator sizing (slots are reserved up front, virtual memory only).
#[derive(Debug, Clone)]
pub struct PoolingLimits {
    /// Live plugin instances across the whole daemon (all VMs, all plugins).
    pub component_instances: u32,
}

/// Default CPU budget of a call: 100 million fuel, about 7 ms of a tight wasm loop on the
/// development machine (`plugin::tests::fuel_budget_stops_a_loop` prints it); policy
/// decisions use 300 to 11,000.
pub const DEFAULT_CALL_FUEL: u64 = 100_000_000;

/// Runtime settings. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// CPU budget of one plugin call in wasmtime fuel (about one unit per wasm instruction).
    /// Counting instructions instead of time keeps a busy host from failing plugins that
    /// did nothing wrong.
    pub call_fuel: u64,
    /// Wall-clock backstop of one plugin call (default 1 s), for a host so starved of CPU
    /// that even a well-behaved call cannot finish.
    pub call_deadline: Duration,
    /// Epoch ticker period (default 1 ms); deadlines are enforced to this granularity.
    pub epoch_tick: Duration,
    /// Linear memory cap per plugin instance (default 64 MiB).
    pub memory_limit: usize,
    /// Table elements per table (default 20 000).
    pub table_elements: usize,
    /// Core instances, tables and memories per store (default 32 each).
    pub instances: usize,
    /// Consecutive failures before a plugin is quarantined (default 5).
    pub max_consecutive_failures: u32,
    /// `None` (default) = on-demand allocation: no limit on live instances, so the number
    /// of VMs is not capped (instances are made when a frontend attaches, about 20 us each).
    /// `Some` = pooling allocator with that fixed capacity; falls back to on-demand
    /// allocation with a warning if the pool cannot be reserved.
    pub pooling: Option<PoolingLimits>,
    /// Directory for precompiled artifacts (see `plugin::cache`); `None` = compile in memory.
    pub cache: Option<CacheDir>,
    pub returns: ReturnLimits,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            call_fuel: DEFAULT_CALL_FUEL,
            call_deadline: Duration::from_secs(1),
            epoch_tick: Duration::from_millis(1),
            memory_limit: 64 << 20,
            table_elements: 20_000,
            instances: 32,
            max_consecutive_failures: 5,
            pooling: None,
            cache: None,
            returns: ReturnLimits::default(),
        }
    }
}

/// What `check` found out about a component.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub kind: PluginKind,
    /// The WIT package version the component was built against.
    pub version: WitVersion,
    /// WIT world name, e.g. `vhost-plug:plugin/policy-plugin@0.3.0`.
    pub world: &'static str,
    /// Component imports (interface names).
    pub imports: Vec<String>,
    /// Component exports (interface names).
    pub exports: Vec<String>,
    /// Subset of `imports` that are WASI interfaces (served with nothing granted).
    pub wasi_imports: Vec<String>,
    /// Size of the component in bytes.
    pub size: usize,
    /// SHA-256 of the component bytes (hex).
    pub sha256: String,
}

/// Ticks after the last plugin call before the epoch ticker parks (about 100 ms).
const IDLE_TICKS: u32 = 100;

/// What plugin calls tell the epoch ticker, so that an idle daemon has no timer wakeups.
#[derive(Default)]
pub(crate) struct TickerCtl {
    /// Calls running now.
    active: AtomicUsize,
    /// A call started since the ticker last looked.
    busy: AtomicBool,
    /// The ticker is parked until the next call.
    parked: AtomicBool,
}

/// Stops the epoch ticker when the last runtime handle goes away.
struct Ticker {
    stop: Arc<AtomicBool>,
    ctl: Arc<TickerCtl>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Marks a call as running; wakes the ticker if it was parked, so the call's deadline
    /// is enforced.
    fn call_started(&self) {
        self.ctl.active.fetch_add(1, Ordering::SeqCst);
        self.ctl.busy.store(true, Ordering::Relaxed);
        if self.ctl.parked.swap(false, Ordering::SeqCst) {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }

    fn call_finished(&self) {
        self.ctl.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.ctl.parked.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

pub(crate) struct RuntimeShared {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    pub(crate) cfg: RuntimeConfig,
    deadline_ticks: u64,
    clock: Instant,
    pooling: bool,
    cache: Option<ArtifactCache>,
    _ticker: Ticker,
}

impl RuntimeShared {
    /// Brackets a plugin call for the epoch ticker (see [`TickerCtl`]).
    pub(crate) fn call_started(&self) {
        self._ticker.call_started();
    }

    pub(crate) fn call_finished(&self) {
        self._ticker.call_finished();
    }

    /// Whether the epoch ticker is parked for lack of calls.
    #[cfg(test)]
    pub(crate) fn ticker_parked(&self) -> bool {
        self._ticker.ctl.parked.load(Ordering::SeqCst)
    }

    pub(crate) fn new_store(
        &self,
        plugin: Arc<str>,
        vm: Arc<str>,
        config: Arc<str>,
    ) -> Store<HostState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.cfg.memory_limit)
            .table_elements(self.cfg.table_elements)
            .instances(self.cfg.instances)
            .tables(self.cfg.instances)
            .memories(self.cfg.instances)
            .trap_on_grow_failure(true)
            .build();
        let state = HostState::new(limits, self.clock, plugin, vm, config);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store
    }

    /// Gives `store` `calls` call budgets: fuel and the wall-clock backstop (instantiation
    /// and serializer calls get several).
    pub(crate) fn set_budgets(&self, store: &mut Store<HostState>, calls: u64) {
        store.set_epoch_deadline(self.deadline_ticks.saturating_mul(calls));
        // Cannot fail: fuel consumption is enabled on every engine this runtime builds.
        let _ = store.set_fuel(self.cfg.call_fuel.saturating_mul(calls));
    }
}

/// The plugin runtime: one per daemon. Cheap to clone (shared engine, linker and ticker).
#[derive(Clone)]
pub struct PluginRuntime {
    pub(crate) shared: Arc<RuntimeShared>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime")
            .field("cfg", &self.shared.cfg)
            .field("pooling", &self.shared.pooling)
            .finish()
    }
}

/// The WASI `wasi:io/poll` interface the runtime links (wasmtime-wasi 48).
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// WASI lets a component wait: `poll` and `pollable.block` (a sleep, a read from an empty
/// stream). The epoch deadline cannot interrupt host code, so a plugin waiting there would
/// hold its VM's connection dispatch for as long as it likes. Plugins answer at once; both
/// functions trap instead, and the call fails closed like any other trap.
fn deny_waiting(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    for name in ["poll", "[method]pollable.block"] {
        poll.func_new(name, move |_, _, _, _| {
            Err(wasmtime::Error::msg(format!(
                "plugins may not wait: {WASI_POLL}#{name} refused"
            )))
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

fn engine_config(cfg: &RuntimeConfig, pooling: Option<&PoolingLimits>) -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true);
    // The async component-model machinery costs ~3x per call; plugins are synchronous.
    c.concurrency_support(false);
    c.epoch_interruption(true);
    c.consume_fuel(true);
    if let Some(p) = pooling {
        let n = p.component_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(4))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .max_memory_size(cfg.memory_limit)
            .table_elements(cfg.table_elements)
            .max_core_instances_per_component(cfg.instances as u32)
            .max_memories_per_component(cfg.instances as u32)
            .max_tables_per_component(cfg.instances as u32);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

impl PluginRuntime {
    /// Create the engine, the linker (host functions + WASI with nothing granted) and start the
    /// epoch ticker thread.
    pub fn new(cfg: RuntimeConfig) -> Result<Self, PluginError> {
        let tick = cfg.epoch_tick.max(Duration::from_micros(100));
        let (engine, pooling) = match cfg.pooling.as_ref() {
            Some(p) => match Engine::new(&engine_config(&cfg, Some(p))) {
                Ok(e) => (e, true),
                Err(e) => {
                    tracing::warn!(
                        "pooling allocator unavailable ({e}); using on-demand allocation"
                    );
                    (Self::plain_engine(&cfg)?, false)
                }
            },
            None => (Self::plain_engine(&cfg)?, false),
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(format!("wasi: {e}")))?;
        deny_waiting(&mut linker).map_err(|e| PluginError::Engine(format!("wasi poll: {e}")))?;
        policy_world::PolicyPlugin::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| PluginError::Engine(format!("host functions: {e}")))?;
        v0_1::policy_world::PolicyPlugin::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| PluginError::Engine(format!("host functions (0.1.0): {e}")))?;
        v0_2::policy_world::PolicyPlugin::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| PluginError::Engine(format!("host functions (0.2.0): {e}")))?;

        let stop = Arc::new(AtomicBool::new(false));
        let ctl = Arc::new(TickerCtl::default());
        let thread = {
            let engine = engine.clone();
            let stop = stop.clone();
            let ctl = ctl.clone();
            std::thread::Builder::new()
                .name("plugin-epoch".into())
                .spawn(move || {
                    let mut idle = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(tick);
                        engine.increment_epoch();
                        if ctl.busy.swap(false, Ordering::Relaxed)
                            || ctl.active.load(Ordering::SeqCst) > 0
                        {
                            idle = 0;
                            continue;
                        }
                        idle += 1;
                        if idle >= IDLE_TICKS {
                            // Park until a call starts; re-check after announcing it, so a
                            // call that began in between is never left without ticks.
                            ctl.parked.store(true, Ordering::SeqCst);
                            if ctl.active.load(Ordering::SeqCst) == 0 {
                                while ctl.parked.load(Ordering::SeqCst)
                                    && !stop.load(Ordering::Relaxed)
                                {
                                    std::thread::park();
                                }
                            }
                            ctl.parked.store(false, Ordering::SeqCst);
                            idle = 0;
                        }
                    }
                })
                .map_err(|e| PluginError::Engine(format!("epoch thread: {e}")))?
        };
        // A deadline of N ticks fires between N-1 and N ticks after it is set: add one.
        let deadline_ticks =
            (cfg.call_deadline.as_nanos().div_ceil(tick.as_nanos()) as u64).max(1) + 1;
        let cache = cfg.cache.clone();
        Ok(Self {
            shared: Arc::new(RuntimeShared {
                engine,
                linker,
                cfg,
                deadline_ticks,
                clock: Instant::now(),
                pooling,
                cache: cache.map(ArtifactCache::new),
                _ticker: Ticker {
                    stop,
                    ctl,
                    thread: Some(thread),
                },
            }),
        })
    }

    fn plain_engine(cfg: &RuntimeConfig) -> Result<Engine, PluginError> {
        Engine::new(&engine_config(cfg, None)).map_err(|e| PluginError::Engine(e.to_string()))
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.cfg
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.shared.pooling
    }

    /// Compile `bytes` to a precompiled artifact for this engine (what the cache stores).
    pub fn precompile(&self, bytes: &[u8]) -> Result<Vec<u8>, PluginError> {
        self.shared
            .engine
            .precompile_component(bytes)
            .map_err(|e| PluginError::Compile(format!("{e:#}")))
    }

    /// Tell which world a component implements, or precisely why it implements none.
    pub fn check(&self, bytes: &[u8]) -> Result<PluginInfo, PluginError> {
        let component = Component::new(&self.shared.engine, bytes)
            .map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        self.inspect(&component, bytes).map(|(info, _)| info)
    }

    /// Read and compile a plugin (through the cache when configured) and check that it is of
    /// the kind `spec` asks for.
    pub fn load(&self, spec: &PluginSpec) -> Result<Plugin, PluginError> {
        let bytes: std::borrow::Cow<'static, [u8]> = match &spec.source {
            PluginSource::Path(p) => std::fs::read(p)
                .map_err(|source| PluginError::Io {
                    path: p.display().to_string(),
                    source,
                })?
                .into(),
            PluginSource::Builtin(name) => super::builtin::get(name)
                .ok_or_else(|| PluginError::UnknownBuiltin(name.clone()))?
                .into(),
        };
        let plugin = self.load_bytes(&spec.name(), &bytes, &spec.config)?;
        if plugin.kind() != spec.kind {
            return Err(PluginError::WrongKind {
                name: plugin.name().to_string(),
                expected: spec.kind,
                actual: plugin.kind(),
            });
        }
        Ok(plugin)
    }

    /// Compile a plugin from bytes; its kind is detected from its exports.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        config: &str,
    ) -> Result<Plugin, PluginError> {
        let component = self.compile_cached(bytes)?;
        let (info, pre) = self.inspect(&component, bytes)?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                name: name.into(),
                config: config.into(),
                info,
                pre,
            }),
        })
    }

    /// Compiles `bytes`, or takes the artifact a previous start left in the cache.
    fn compile_cached(&self, bytes: &[u8]) -> Result<Component, PluginError> {
        let engine = &self.shared.engine;
        let cache_err = |e: super::cache::CacheError| PluginError::Cache {
            path: self
                .shared
                .cache
                .as_ref()
                .map(|c| c.dir().path.display().to_string())
                .unwrap_or_default(),
            reason: e.to_string(),
        };
        if let Some(cache) = &self.shared.cache {
            if let Some(c) = cache.load(engine, bytes).map_err(cache_err)? {
                return Ok(c);
            }
        }
        let component =
            Component::new(engine, bytes).map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        if let Some(cache) = &self.shared.cache {
            let art = component
                .serialize()
                .map_err(|e| PluginError::Compile(format!("serializing: {e:#}")))?;
            cache.store(engine, bytes, &art).map_err(cache_err)?;
        }
        Ok(component)
    }
}

pub(crate) struct PluginInner {
    pub(crate) name: Arc<str>,
    pub(crate) config: Arc<str>,
    pub(crate) info: PluginInfo,
    pub(crate) pre: KindPre,
}

/// A compiled, linked and type-checked plugin, ready to be instantiated per VM. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    pub(crate) inner: Arc<PluginInner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name())
            .field("kind", &self.kind())
            .finish()
    }
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    pub fn kind(&self) -> PluginKind {
        self.inner.info.kind
    }
    pub fn info(&self) -> &PluginInfo {
        &self.inner.info
    }
    pub fn config(&self) -> &str {
        &self.inner.config
    }
}
