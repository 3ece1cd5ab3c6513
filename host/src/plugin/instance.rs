//! One plugin instance for one VM: store + bindings, the fail-closed call wrapper, counters and
//! quarantine.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use wasmtime::Store;

use super::dispatch::World;
use super::runtime::RuntimeShared;
use super::store::HostState;
use super::{FailureKind, Plugin, PluginError, PluginRuntime};

/// Upper bounds (ns) of the call-latency histogram buckets; a last bucket takes the rest.
/// From 1 us (a warm policy call) to 10 ms (about the default CPU budget of a call).
pub const LATENCY_BUCKETS_NS: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Per-instance counters, readable from any thread (for metrics).
#[derive(Debug, Default)]
pub struct PluginCounters {
    pub calls: AtomicU64,
    pub denials: AtomicU64,
    pub failures: AtomicU64,
    /// Calls refused without running because the plugin is quarantined.
    pub quarantine_refusals: AtomicU64,
    pub instantiations: AtomicU64,
    pub total_call_ns: AtomicU64,
    pub max_call_ns: AtomicU64,
    pub quarantined: AtomicBool,
    /// Calls per latency bucket ([`LATENCY_BUCKETS_NS`], then one for anything slower); not
    /// cumulative.
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
}

/// A point-in-time copy of [`PluginCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PluginStats {
    pub calls: u64,
    pub denials: u64,
    pub failures: u64,
    pub quarantine_refusals: u64,
    pub instantiations: u64,
    pub total_call_ns: u64,
    pub max_call_ns: u64,
    pub quarantined: bool,
}

impl PluginCounters {
    pub fn snapshot(&self) -> PluginStats {
        let r = Ordering::Relaxed;
        PluginStats {
            calls: self.calls.load(r),
            denials: self.denials.load(r),
            failures: self.failures.load(r),
            quarantine_refusals: self.quarantine_refusals.load(r),
            instantiations: self.instantiations.load(r),
            total_call_ns: self.total_call_ns.load(r),
            max_call_ns: self.max_call_ns.load(r),
            quarantined: self.quarantined.load(r),
        }
    }
}

pub(crate) struct Slot<W: World> {
    pub(crate) plugin: Plugin,
    rt: Arc<RuntimeShared>,
    vm: Arc<str>,
    live: Option<(Store<HostState>, W)>,
    pub(crate) counters: Arc<PluginCounters>,
    consecutive: u32,
    quarantine: Option<String>,
    /// An instance was made before: a new one means the plugin's state was lost.
    started: bool,
}

/// Call deadlines an instantiation may take: setting up memory and running start code takes
/// longer than a call, and a daemon starting on a loaded host must not fail its plugins.
const INSTANTIATE_DEADLINES: u64 = 50;

impl<W: World> Slot<W> {
    /// Instantiate right away so that a plugin that cannot even start is reported at once.
    pub(crate) fn new(rt: &PluginRuntime, plugin: Plugin, vm: &str) -> Result<Self, PluginError> {
        let mut slot = Self::deferred(rt, plugin, vm);
        slot.live = Some(slot.instantiate().map_err(|detail| PluginError::Call {
            plugin: slot.plugin.name().to_string(),
            kind: FailureKind::Instantiate,
            detail,
        })?);
        slot.started = true;
        Ok(slot)
    }

    /// A slot whose instance is made by the first call or by [`Slot::start`]: an idle VM
    /// holds no store, no linear memory and no instance.
    pub(crate) fn deferred(rt: &PluginRuntime, plugin: Plugin, vm: &str) -> Self {
        Slot {
            plugin,
            rt: rt.shared.clone(),
            vm: vm.into(),
            live: None,
            counters: Arc::default(),
            consecutive: 0,
            quarantine: None,
            started: false,
        }
    }

    /// Makes sure an instance exists. A failure counts like a failed call; a quarantined
    /// plugin is refused.
    pub(crate) fn start(&mut self) -> Result<(), PluginError> {
        if let Some(last) = &self.quarantine {
            self.counters
                .quarantine_refusals
                .fetch_add(1, Ordering::Relaxed);
            return Err(PluginError::Quarantined {
                plugin: self.name().to_string(),
                failures: self.consecutive,
                last: last.clone(),
            });
        }
        if self.live.is_none() {
            match self.instantiate() {
                Ok(l) => {
                    if self.started {
                        tracing::info!(
                            plugin = self.name(),
                            vm = &*self.vm,
                            "plugin re-instantiated (previous state lost)"
                        );
                    }
                    self.started = true;
                    self.live = Some(l);
                }
                Err(detail) => return Err(self.fail(FailureKind::Instantiate, detail)),
            }
        }
        Ok(())
    }

    pub(crate) fn name(&self) -> &str {
        self.plugin.name()
    }

    fn instantiate(&self) -> Result<(Store<HostState>, W), String> {
        let inner = &self.plugin.inner;
        let mut store =
            self.rt
                .new_store(inner.name.clone(), self.vm.clone(), inner.config.clone());
        store.data_mut().begin_call();
        self.rt.set_budgets(&mut store, INSTANTIATE_DEADLINES);
        self.counters.instantiations.fetch_add(1, Ordering::Relaxed);
        // Instantiation runs the component's start code: under a (longer) deadline too.
        self.rt.call_started();
        let r = W::instantiate(&inner.pre, &mut store);
        self.rt.call_finished();
        match r {
            Ok(w) => Ok((store, w)),
            Err(e) => Err(describe(&store, &e).1),
        }
    }

    pub(crate) fn quarantined(&self) -> bool {
        self.quarantine.is_some()
    }

    /// Run one call under the deadline, then validate its result with `check`. Any failure is
    /// counted, poisons the instance if it came from inside wasm (a fresh one serves the next
    /// call) and after `max_consecutive_failures` quarantines the plugin.
    pub(crate) fn call<R, T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Store<HostState>, &W) -> wasmtime::Result<R>,
        check: impl FnOnce(R) -> Result<T, String>,
    ) -> Result<T, PluginError> {
        self.run(what, f, check, true)
    }

    /// Like [`Slot::call`] for a notification (no answer to act on): failures count the same,
    /// but a success does not end a run of consecutive failures, so a plugin whose decisions
    /// keep failing is quarantined even though the notifications after them succeed.
    pub(crate) fn notify(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Store<HostState>, &W) -> wasmtime::Result<()>,
    ) -> Result<(), PluginError> {
        self.run(what, f, Ok, false)
    }

    fn run<R, T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Store<HostState>, &W) -> wasmtime::Result<R>,
        check: impl FnOnce(R) -> Result<T, String>,
        success_clears: bool,
    ) -> Result<T, PluginError> {
        self.start()?;
        let (store, w) = self.live.as_mut().expect("instance present");
        store.data_mut().begin_call();
        self.rt.call_started();
        self.rt.set_budgets(store, W::CALL_BUDGETS);
        let t0 = Instant::now();
        let r = f(store, w);
        let ns = t0.elapsed().as_nanos() as u64;
        self.rt.call_finished();
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        self.counters.total_call_ns.fetch_add(ns, Ordering::Relaxed);
        self.counters.max_call_ns.fetch_max(ns, Ordering::Relaxed);
        let bucket = LATENCY_BUCKETS_NS.partition_point(|&b| b < ns);
        self.counters.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(v) => match check(v) {
                Ok(t) => {
                    if success_clears {
                        self.consecutive = 0;
                    }
                    Ok(t)
                }
                Err(detail) => Err(self.fail(FailureKind::Malformed, format!("{what}: {detail}"))),
            },
            Err(e) => {
                let (kind, detail) = describe(store, &e);
                // A component that trapped cannot be entered again: drop it (and its store).
                self.live = None;
                Err(self.fail(kind, format!("{what}: {detail}")))
            }
        }
    }

    fn fail(&mut self, kind: FailureKind, detail: String) -> PluginError {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive += 1;
        let plugin = self.name().to_string();
        tracing::warn!(
            plugin,
            vm = &*self.vm,
            failures = self.consecutive,
            "plugin failure ({kind}): {detail}"
        );
        if self.consecutive >= self.rt.cfg.max_consecutive_failures.max(1) {
            tracing::error!(plugin, vm = &*self.vm, "plugin quarantined after {} consecutive failures; every decision is deny until it is replaced", self.consecutive);
            self.quarantine = Some(format!("{kind}: {detail}"));
            self.counters.quarantined.store(true, Ordering::Relaxed);
            self.live = None;
        }
        PluginError::Call {
            plugin,
            kind,
            detail,
        }
    }
}

fn describe(store: &Store<HostState>, e: &wasmtime::Error) -> (FailureKind, String) {
    if let Some(hit) = &store.data().limiter.hit {
        return (FailureKind::MemoryLimit, hit.clone());
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => (
            FailureKind::Deadline,
            "deadline expired (wall-clock backstop)".into(),
        ),
        Some(wasmtime::Trap::OutOfFuel) => (
            FailureKind::Deadline,
            "deadline expired (CPU budget used up)".into(),
        ),
        Some(t) => (FailureKind::Trap, t.to_string()),
        None => (FailureKind::Trap, format!("{e:#}")),
    }
}
