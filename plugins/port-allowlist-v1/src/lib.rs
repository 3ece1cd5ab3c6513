//! port-allowlist v1: allow a connection only if its destination matches a rule.
//!
//! Config: `allow=2:1234,3:*` (CID:PORT, `*` = any). No rule matches => deny.
//! State: schema 1 = per-rule hit counters. Refuses schema 2 (written by v2) with an error.

#[path = "../../port-allowlist/src/rules.rs"]
mod rules;

use rules::Rule;
use std::cell::RefCell;
use vhost_plug_sdk_policy::*;

thread_local! {
    static RULES: RefCell<Option<Result<Vec<Rule>, String>>> = const { RefCell::new(None) };
}

fn with_rules<R>(f: impl FnOnce(&mut Result<Vec<Rule>, String>) -> R) -> R {
    RULES.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rules = slot.get_or_insert_with(load);
        f(rules)
    })
}

fn load() -> Result<Vec<Rule>, String> {
    let cfg = config();
    let mut rules = Vec::new();
    for (k, v) in config_items(&cfg) {
        match k {
            "allow" => rules = rules::parse_rules(v)?,
            other => return Err(format!("unknown config key `{other}`")),
        }
    }
    Ok(rules)
}

struct PortAllowlist;

impl PolicyPlugin for PortAllowlist {
    fn on_connect(req: ConnRequest) -> Verdict {
        with_rules(|rules| match rules {
            Err(e) => Verdict::Deny(format!("port-allowlist: bad config: {e}")),
            Ok(rules) => match rules::find(rules, &req.dst) {
                Some(rule) => {
                    rule.hits += 1;
                    Verdict::Allow
                }
                None => Verdict::Deny(format!(
                    "port-allowlist: {}:{} not allowed",
                    req.dst.cid, req.dst.port
                )),
            },
        })
    }

    fn export_state() -> PluginState {
        with_rules(|rules| {
            let mut w = StateWriter::new();
            rules::write_counters(&mut w, rules.as_deref().unwrap_or_default());
            PluginState {
                schema: 1,
                data: w.finish(),
            }
        })
    }

    fn import_state(s: PluginState) -> Result<(), String> {
        if s.schema != 1 {
            return Err(format!(
                "port-allowlist v1 reads state schema 1 only, got schema {} (written by a newer version; upgrade the plugin)",
                s.schema
            ));
        }
        with_rules(|rules| {
            let rules = rules.as_mut().map_err(|e| format!("bad config: {e}"))?;
            let mut r = StateReader::new(&s.data);
            let got = rules::read_counters(&mut r)?;
            r.end()?;
            rules::apply_counters(rules, got);
            Ok(())
        })
    }
}

vhost_plug_sdk_policy::export_policy!(PortAllowlist);
