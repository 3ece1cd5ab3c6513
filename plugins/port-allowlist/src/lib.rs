//! port-allowlist v2: v1's rules plus a per-VM connection rate limit (token bucket).
//!
//! Config: `allow=2:1234,3:*;rate=50;burst=100` — `rate` connections per second per VM refill,
//! `burst` bucket size (default = rate). Without `rate` there is no limit (behaves like v1).
//! State: schema 2 = v1 counters + buckets. Imports schema 1 (counters kept, buckets full) and 2.

mod rules;

use rules::Rule;
use std::cell::RefCell;
use std::collections::BTreeMap;
use vhost_plug_sdk_policy::*;

/// Token counts are kept in millitokens to stay in integers.
const MILLI: u64 = 1000;
/// A VM name longer than this is cut for the bucket key (and state).
const MAX_VM_KEY: usize = 128;
/// At most this many buckets; beyond, the least recently used one is dropped.
const MAX_BUCKETS: usize = 4096;

struct Bucket {
    millitokens: u64,
    last_ns: u64,
}

struct Plugin {
    rules: Vec<Rule>,
    /// (rate per second, burst)
    limit: Option<(u64, u64)>,
    buckets: BTreeMap<String, Bucket>,
}

thread_local! {
    static STATE: RefCell<Option<Result<Plugin, String>>> = const { RefCell::new(None) };
}

fn with_plugin<R>(f: impl FnOnce(&mut Result<Plugin, String>) -> R) -> R {
    STATE.with(|cell| f(cell.borrow_mut().get_or_insert_with(load)))
}

fn load() -> Result<Plugin, String> {
    let cfg = config();
    let (mut rules, mut rate, mut burst) = (Vec::new(), None, None);
    for (k, v) in config_items(&cfg) {
        match k {
            "allow" => rules = rules::parse_rules(v)?,
            "rate" => rate = Some(v.parse::<u64>().map_err(|_| format!("bad rate `{v}`"))?),
            "burst" => burst = Some(v.parse::<u64>().map_err(|_| format!("bad burst `{v}`"))?),
            other => return Err(format!("unknown config key `{other}`")),
        }
    }
    let limit = match rate {
        Some(0) => return Err("rate must be > 0".into()),
        Some(r) => Some((r, burst.unwrap_or(r).max(1))),
        None => None,
    };
    Ok(Plugin {
        rules,
        limit,
        buckets: BTreeMap::new(),
    })
}

fn vm_key(vm: &str) -> String {
    let mut end = vm.len().min(MAX_VM_KEY);
    while !vm.is_char_boundary(end) {
        end -= 1;
    }
    vm[..end].to_string()
}

impl Plugin {
    /// Take one token from the VM's bucket; false if empty.
    fn take_token(&mut self, vm: &str, now: u64) -> bool {
        let Some((rate, burst)) = self.limit else {
            return true;
        };
        let cap = burst * MILLI;
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(vm) {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last_ns)
                .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        let b = self.buckets.entry(vm_key(vm)).or_insert(Bucket {
            millitokens: cap,
            last_ns: now,
        });
        let elapsed = now.saturating_sub(b.last_ns);
        // rate tokens/s = rate millitokens/ms.
        let refill = (elapsed / 1_000_000).saturating_mul(rate);
        if refill > 0 {
            b.millitokens = b.millitokens.saturating_add(refill).min(cap);
            b.last_ns = now - elapsed % 1_000_000;
        }
        if b.millitokens >= MILLI {
            b.millitokens -= MILLI;
            true
        } else {
            false
        }
    }
}

struct PortAllowlistV2;

impl PolicyPlugin for PortAllowlistV2 {
    fn on_connect(req: ConnRequest) -> Verdict {
        with_plugin(|p| {
            let p = match p {
                Err(e) => return Verdict::Deny(format!("port-allowlist: bad config: {e}")),
                Ok(p) => p,
            };
            if rules::find(&mut p.rules, &req.dst).is_none() {
                return Verdict::Deny(format!(
                    "port-allowlist: {}:{} not allowed",
                    req.dst.cid, req.dst.port
                ));
            }
            if !p.take_token(&vm_key(&req.vm), now_ns()) {
                return Verdict::Deny(format!("port-allowlist: rate limit for vm `{}`", req.vm));
            }
            if let Some(rule) = rules::find(&mut p.rules, &req.dst) {
                rule.hits += 1;
            }
            Verdict::Allow
        })
    }

    fn export_state() -> PluginState {
        with_plugin(|p| {
            let mut w = StateWriter::new();
            match p {
                Ok(p) => {
                    rules::write_counters(&mut w, &p.rules);
                    w.u32(p.buckets.len() as u32);
                    for (vm, b) in &p.buckets {
                        w.str(vm).u64(b.millitokens);
                    }
                }
                Err(_) => {
                    w.u32(0).u32(0);
                }
            }
            PluginState {
                schema: 2,
                data: w.finish(),
            }
        })
    }

    fn import_state(s: PluginState) -> Result<(), String> {
        if s.schema == 0 || s.schema > 2 {
            return Err(format!(
                "port-allowlist v2 reads state schemas 1-2, got schema {}",
                s.schema
            ));
        }
        with_plugin(|p| {
            let p = p.as_mut().map_err(|e| format!("bad config: {e}"))?;
            let mut r = StateReader::new(&s.data);
            // Parse everything first: a failed import leaves the current state untouched.
            let got = rules::read_counters(&mut r)?;
            let mut buckets = BTreeMap::new();
            if s.schema == 2 {
                let n = r.u32()?;
                let now = now_ns();
                for _ in 0..n {
                    let vm = vm_key(r.str()?);
                    let millitokens = r.u64()?;
                    if buckets.len() < MAX_BUCKETS {
                        buckets.insert(
                            vm,
                            Bucket {
                                millitokens,
                                last_ns: now,
                            },
                        );
                    }
                }
            }
            r.end()?;
            if let Some((_, burst)) = p.limit {
                for b in buckets.values_mut() {
                    b.millitokens = b.millitokens.min(burst * MILLI);
                }
            }
            rules::apply_counters(&mut p.rules, got);
            p.buckets = buckets;
            Ok(())
        })
    }
}

vhost_plug_sdk_policy::export_policy!(PortAllowlistV2);
