//! audit: allow every connection and keep an audit trail of closed connections.
//!
//! State (schema 1): totals (connections, resets, bytes each way) and the last 64 closed
//! connections (id, destination, bytes, duration, reset). Exported with the device state, so the
//! trail survives plugin swaps, handover and migration. Config: none.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use vhost_plug_sdk_policy::*;

const KEEP: usize = 64;
/// Open connections remembered (for their destination); beyond this the oldest are forgotten.
const MAX_OPEN: usize = 65_536;

#[derive(Clone)]
struct Record {
    id: u64,
    dst_cid: u64,
    dst_port: u32,
    to_guest: u64,
    from_guest: u64,
    duration_ms: u64,
    reset: bool,
}

#[derive(Default)]
struct Audit {
    connections: u64,
    resets: u64,
    bytes_to_guest: u64,
    bytes_from_guest: u64,
    open: BTreeMap<u64, (u64, u32)>,
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
            a.open.insert(req.id, (req.dst.cid, req.dst.port));
        });
        Verdict::Allow
    }

    fn on_close(id: u64, stats: ConnStats) {
        AUDIT.with(|a| {
            let mut a = a.borrow_mut();
            let (dst_cid, dst_port) = a.open.remove(&id).unwrap_or((0, 0));
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
            }
            PluginState {
                schema: 1,
                data: w.finish(),
            }
        })
    }

    fn import_state(s: PluginState) -> Result<(), String> {
        if s.schema != 1 {
            return Err(format!("audit reads state schema 1, got {}", s.schema));
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
