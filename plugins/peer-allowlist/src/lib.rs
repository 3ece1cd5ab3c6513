//! peer-allowlist: which host programs may connect to which guest ports, by the identity the
//! kernel gives for the program's socket (uid, gid, cgroup). Only connections a host program
//! opens with `CONNECT <port>` are judged; guest-initiated ones are allowed (other plugins
//! judge those) unless `guest=deny`.
//!
//! Config: `allow=WHO:PORT[,WHO:PORT...][;guest=allow|deny]`, where WHO is `uid=N`, `gid=N`,
//! `cgroup=/PREFIX` or `*`, and PORT is a guest port or `*`. A cgroup prefix matches whole path
//! components: `cgroup=/system.slice` matches `/system.slice` and `/system.slice/a.service`,
//! not `/system.slicex`. A program whose cgroup is unknown matches no cgroup rule. A host
//! connection that matches no rule, or carries no identity, is denied.
//!
//! Example: `allow=uid=0:*,cgroup=/system.slice/agent.service:1024,gid=2001:5000`.
//! Stateless. Tested through the daemon (`host/src/plugin/peer_tests.rs`).

use std::cell::RefCell;
use vhost_plug_sdk_policy::*;

#[derive(Debug, PartialEq)]
enum Who {
    Any,
    Uid(u32),
    Gid(u32),
    /// Normalized: starts with `/`, no trailing `/` (except the root itself).
    Cgroup(String),
}

#[derive(Debug, PartialEq)]
struct Rule {
    who: Who,
    port: Option<u32>,
}

struct Config {
    rules: Vec<Rule>,
    deny_guest: bool,
}

thread_local! {
    static CONFIG: RefCell<Option<Result<Config, String>>> = const { RefCell::new(None) };
}

fn parse_who(s: &str) -> Result<Who, String> {
    if s == "*" {
        return Ok(Who::Any);
    }
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected uid=N, gid=N, cgroup=/PATH or *"))?;
    let num = |v: &str| v.parse::<u32>().map_err(|_| format!("bad {k} `{v}`"));
    match k {
        "uid" => Ok(Who::Uid(num(v)?)),
        "gid" => Ok(Who::Gid(num(v)?)),
        "cgroup" if v.starts_with('/') => {
            let t = v.trim_end_matches('/');
            Ok(Who::Cgroup(if t.is_empty() {
                "/".into()
            } else {
                t.into()
            }))
        }
        "cgroup" => Err(format!("cgroup `{v}` must start with /")),
        other => Err(format!("unknown selector `{other}` (uid, gid, cgroup)")),
    }
}

fn parse_rules(list: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // The port is after the last `:` (a cgroup path may contain `:`).
        let (who, port) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("rule `{item}`: expected WHO:PORT"))?;
        let port = match port.trim() {
            "*" => None,
            p => Some(p.parse().map_err(|_| format!("bad port `{p}`"))?),
        };
        rules.push(Rule {
            who: parse_who(who.trim())?,
            port,
        });
    }
    Ok(rules)
}

fn parse(cfg: &str) -> Result<Config, String> {
    let mut c = Config {
        rules: Vec::new(),
        deny_guest: false,
    };
    for (k, v) in config_items(cfg) {
        match (k, v) {
            ("allow", v) => c.rules = parse_rules(v)?,
            ("guest", "allow") => c.deny_guest = false,
            ("guest", "deny") => c.deny_guest = true,
            ("guest", v) => return Err(format!("guest=`{v}`: expected allow or deny")),
            (other, _) => return Err(format!("unknown config key `{other}`")),
        }
    }
    Ok(c)
}

/// `prefix` (normalized) covers `path` whole components at a time.
fn cgroup_under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Rule {
    fn matches(&self, p: &PeerIdentity, port: u32) -> bool {
        self.port.is_none_or(|q| q == port)
            && match &self.who {
                Who::Any => true,
                Who::Uid(u) => *u == p.uid,
                Who::Gid(g) => *g == p.gid,
                Who::Cgroup(prefix) => p.cgroup.as_deref().is_some_and(|c| cgroup_under(c, prefix)),
            }
    }
}

fn decide(c: &Config, req: &ConnRequest) -> Verdict {
    if req.from_guest {
        return if c.deny_guest {
            Verdict::Deny("peer-allowlist: guest-initiated connections are denied".into())
        } else {
            Verdict::Allow
        };
    }
    let Some(peer) = &req.peer else {
        return Verdict::Deny("peer-allowlist: host connection without peer identity".into());
    };
    if c.rules.iter().any(|r| r.matches(peer, req.dst.port)) {
        return Verdict::Allow;
    }
    let mut why = format!(
        "peer-allowlist: pid {} uid {} gid {} cgroup {} may not connect to port {}",
        peer.pid,
        peer.uid,
        peer.gid,
        peer.cgroup.as_deref().unwrap_or("(unknown)"),
        req.dst.port
    );
    // Deny reasons are capped at 256 bytes by the host.
    if why.len() > 256 {
        let mut end = 253;
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        why.truncate(end);
        why.push_str("...");
    }
    Verdict::Deny(why)
}

struct PeerAllowlist;

impl PolicyPlugin for PeerAllowlist {
    fn on_connect(req: ConnRequest) -> Verdict {
        CONFIG.with(|cell| {
            let mut slot = cell.borrow_mut();
            match slot.get_or_insert_with(|| parse(&config())) {
                Err(e) => Verdict::Deny(format!("peer-allowlist: bad config: {e}")),
                Ok(c) => decide(c, &req),
            }
        })
    }
}

vhost_plug_sdk_policy::export_policy!(PeerAllowlist);
