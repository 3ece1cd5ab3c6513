//! A vhost-plug policy plugin, made by `vhost-plug plugin new`.
//!
//! `on_connect` sees every connection request of a VM before anything is connected and
//! answers `Allow`, `Deny(reason)` or `Redirect(route)`. This one refuses the destination ports
//! listed in its config string (`--plugin policy=PATH,config=deny=22,23`), logs each refusal
//! and counts them. The count survives a plugin swap (`vhost-plug ctl swap`), a daemon handover
//! and a migration through `export_state` / `import_state`.
use std::cell::Cell;

use vhost_plug_sdk_policy::*;

/// Version of the state `export_state` writes. Bump it when the format changes, and keep
/// reading the older versions in `import_state`.
const STATE_SCHEMA: u32 = 1;

thread_local! {
    /// Connections refused so far (an instance is single-threaded: no locking needed).
    static DENIED: Cell<u64> = const { Cell::new(0) };
}

struct Plugin;

impl PolicyPlugin for Plugin {
    fn on_connect(req: ConnRequest) -> Verdict {
        // `config()` is the `config=...` string; `config_items` splits `a=1;b=2`.
        let cfg = config();
        let denied = config_items(&cfg)
            .into_iter()
            .filter(|(k, _)| *k == "deny")
            .flat_map(|(_, v)| v.split(','))
            .any(|p| p.trim().parse() == Ok(req.dst.port));
        if !denied {
            return Verdict::Allow;
        }
        let n = DENIED.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        log(
            LogLevel::Info,
            &format!("vm {}: port {} refused ({n} so far)", req.vm, req.dst.port),
        );
        Verdict::Deny(format!("port {} is closed", req.dst.port))
    }

    fn on_close(_id: u64, _stats: ConnStats) {
        // Called once for every connection `on_connect` saw, with its byte counts.
    }

    fn export_state() -> PluginState {
        let mut w = StateWriter::new();
        w.u64(DENIED.with(Cell::get));
        PluginState {
            schema: STATE_SCHEMA,
            data: w.finish(),
        }
    }

    fn import_state(s: PluginState) -> Result<(), String> {
        match s.schema {
            // What a stateless plugin exports: start from zero.
            0 if s.data.is_empty() => Ok(()),
            1 => {
                let mut r = StateReader::new(&s.data);
                let denied = r.u64()?;
                r.end()?;
                DENIED.with(|d| d.set(denied));
                Ok(())
            }
            // Never half-load a state: an error keeps the old plugin's state in force.
            other => Err(format!(
                "state schema {other} is not one this plugin reads (0 or {STATE_SCHEMA})"
            )),
        }
    }
}

export_policy!(Plugin);
