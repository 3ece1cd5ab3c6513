//! audit: allow every connection and keep an audit trail of closed connections.
//!
//! State (schema 2): totals (connections, resets, bytes each way) and the last 64 closed
//! connections (id, destination, bytes, duration, reset, and for a connection a host program
//! opened its identity: pid, uid, gid, cgroup). Exported with the device state, so the trail
//! survives plugin swaps, handover and migration. Reads schema 1 (no identities). Config:
//! none.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use vhost_plug_sdk_policy::*;

const KEEP: usize = 64;
/// Open connections remembered (for their destination); beyond this the oldest are forgotten.
const MAX_OPEN: usize = 65_536;
/// Longest cgroup path kept per record (longer ones are cut), so the trail stays small.
const MAX_CGROUP: usize = 128;

/// A host program's identity as recorded.
#[derive(Clone, Default)]
struct Peer {
    pid: u32,
    uid: u32,
    gid: u32,
    /// Empty when unknown.
    cgroup: String,
}

impl Peer {
    fn of(p: &PeerIdentity) -> Self {
        let mut cgroup = p.cgroup.clone().unwrap_or_default();
        if cgroup.len() > MAX_CGROUP {
            let mut end = MAX_CGROUP;
            while !cgroup.is_char_boundary(end) {
                end -= 1;
            }
            cgroup.truncate(end);
        }
        Peer {
            pid: p.pid,
            uid: p.uid,
            gid: p.gid,
            cgroup,
        }
    }
}

/// What is remembered of an open connection until it closes.
struct Open {
    dst_cid: u64,
    dst_port: u32,
    peer: Option<Peer>,
}

#[derive(Clone)]
struct Record {
    id: u64,
    dst_cid: u64,
    dst_port: u32,
    to_guest: u64,
    from_guest: u64,
    duration_ms: u64,
    reset: bool,
    peer: Option<Peer>,
}

#[derive(Default)]
struct Audit {
    connections: u64,
    resets: u64,
    bytes_to_guest: u64,
    bytes_from_guest: u64,
    open: BTreeMap<u64, Open>,
    last: VecDeque<Record>,
}

thread_local! {
    static AUDIT: RefCell<Audit> = RefCell::new(Audit::default());
}

struct AuditPolicy;

impl PolicyPlugin for AuditPolicy {
    fn on_connect(req: ConnRequest) -> Verdict {
        AUDIT.with(|a| {
            let mut a = a.borrow_mut();
            if a.open.len() >= MAX_OPEN {
                a.open.pop_first();
            }
            let peer = req.peer.as_ref().map(Peer::of);
            a.open.insert(
                req.id,
                Open {
                    dst_cid: req.dst.cid,
                    dst_port: req.dst.port,
                    peer,
                },
            );
        });
        Verdict::Allow
    }

    fn on_close(id: u64, stats: ConnStats) {
        AUDIT.with(|a| {
            let mut a = a.borrow_mut();
            let (dst_cid, dst_port, peer) = match a.open.remove(&id) {
                Some(o) => (o.dst_cid, o.dst_port, o.peer),
                None => (0, 0, None),
            };
            a.connections += 1;
            a.resets += stats.reset as u64;
            a.bytes_to_guest = a.bytes_to_guest.wrapping_add(stats.bytes_to_guest);
            a.bytes_from_guest = a.bytes_from_guest.wrapping_add(stats.bytes_from_guest);
            if a.last.len() == KEEP {
                a.last.pop_front();
            }
            a.last.push_back(Record {
                id,
                dst_cid,
                dst_port,
                to_guest: stats.bytes_to_guest,
                from_guest: stats.bytes_from_guest,
                duration_ms: stats.duration_ms,
                reset: stats.reset,
                peer,
            });
        });
    }

    fn export_state() -> PluginState {
        AUDIT.with(|a| {
            let a = a.borrow();
            let mut w = StateWriter::new();
            w.u64(a.connections)
                .u64(a.resets)
                .u64(a.bytes_to_guest)
                .u64(a.bytes_from_guest);
            w.u32(a.last.len() as u32);
            for r in &a.last {
                w.u64(r.id).u64(r.dst_cid).u32(r.dst_port);
                w.u64(r.to_guest)
                    .u64(r.from_guest)
                    .u64(r.duration_ms)
                    .u32(r.reset as u32);
                match &r.peer {
                    None => {
                        w.u32(0);
                    }
                    Some(p) => {
                        w.u32(1).u32(p.pid).u32(p.uid).u32(p.gid).str(&p.cgroup);
                    }
                }
            }
            PluginState {
                schema: 2,
                data: w.finish(),
            }
        })
    }

    fn import_state(s: PluginState) -> Result<(), String> {
        if s.schema != 1 && s.schema != 2 {
            return Err(format!("audit reads state schemas 1-2, got {}", s.schema));
        }
        let mut r = StateReader::new(&s.data);
        let mut a = Audit {
            connections: r.u64()?,
            resets: r.u64()?,
            bytes_to_guest: r.u64()?,
            bytes_from_guest: r.u64()?,
            ..Audit::default()
        };
        let n = r.u32()? as usize;
        for _ in 0..n {
            let rec = Record {
                id: r.u64()?,
                dst_cid: r.u64()?,
                dst_port: r.u32()?,
                to_guest: r.u64()?,
                from_guest: r.u64()?,
                duration_ms: r.u64()?,
                reset: r.u32()? != 0,
                peer: None,
            };
            let rec = if s.schema == 2 && r.u32()? != 0 {
                let peer = Peer::of(&PeerIdentity {
                    pid: r.u32()?,
                    uid: r.u32()?,
                    gid: r.u32()?,
                    cgroup: Some(r.str()?.to_string()),
                    security_label: None,
                });
                Record {
                    peer: Some(peer),
                    ..rec
                }
            } else {
                rec
            };
            if a.last.len() == KEEP {
                a.last.pop_front();
            }
            a.last.push_back(rec);
        }
        r.end()?;
        AUDIT.with(|cur| {
            // Connections open now stay tracked.
            a.open = std::mem::take(&mut cur.borrow_mut().open);
            *cur.borrow_mut() = a;
        });
        Ok(())
    }
}

vhost_plug_sdk_policy::export_policy!(AuditPolicy);
