//! Rules shared by port-allowlist v1 and v2: `allow=CID:PORT[,CID:PORT...]`, `*` for any CID or
//! port, matched against the connection's destination. Each rule keeps a hit counter.

use vhost_plug_sdk_policy::*;

pub struct Rule {
    /// Normalized text, the key under which the counter is saved (`2:1234`, `3:*`).
    pub key: String,
    pub cid: Option<u64>,
    pub port: Option<u32>,
    pub hits: u64,
}

impl Rule {
    pub fn matches(&self, ep: &Endpoint) -> bool {
        self.cid.is_none_or(|c| c == ep.cid) && self.port.is_none_or(|p| p == ep.port)
    }
}

fn part<T: std::str::FromStr>(s: &str, what: &str) -> Result<Option<T>, String> {
    if s == "*" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| format!("bad {what} `{s}`"))
}

/// Parse the `allow=` value.
pub fn parse_rules(list: &str) -> Result<Vec<Rule>, String> {
    let mut rules: Vec<Rule> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (c, p) = item
            .split_once(':')
            .ok_or_else(|| format!("rule `{item}`: expected CID:PORT"))?;
        let cid = part::<u64>(c.trim(), "cid")?;
        let port = part::<u32>(p.trim(), "port")?;
        let key = format!(
            "{}:{}",
            cid.map_or("*".into(), |v| v.to_string()),
            port.map_or("*".into(), |v| v.to_string())
        );
        if !rules.iter().any(|r| r.key == key) {
            rules.push(Rule {
                key,
                cid,
                port,
                hits: 0,
            });
        }
    }
    Ok(rules)
}

/// First matching rule for the destination, if any.
pub fn find<'a>(rules: &'a mut [Rule], ep: &Endpoint) -> Option<&'a mut Rule> {
    rules.iter_mut().find(|r| r.matches(ep))
}

/// Schema-1 body: u32 count, then (key str, hits u64) per rule.
pub fn write_counters(w: &mut StateWriter, rules: &[Rule]) {
    w.u32(rules.len() as u32);
    for r in rules {
        w.str(&r.key).u64(r.hits);
    }
}

/// Read a schema-1 body: (rule key, hits) pairs.
pub fn read_counters(r: &mut StateReader) -> Result<Vec<(String, u64)>, String> {
    let n = r.u32()?;
    let mut got = Vec::new();
    for _ in 0..n {
        let key = r.str()?.to_string();
        let hits = r.u64()?;
        got.push((key, hits));
    }
    Ok(got)
}

/// Apply counters to rules with the same key; counters of rules no longer configured are dropped.
pub fn apply_counters(rules: &mut [Rule], got: Vec<(String, u64)>) {
    for (key, hits) in got {
        if let Some(rule) = rules.iter_mut().find(|x| x.key == key) {
            rule.hits = hits;
        }
    }
}
