//! Control-socket requests (one JSON object per line), shared by the server, the `ctl` client
//! and the handover sender.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// VMs, their frontends and connection counts, and their plugins.
    Status,
    /// Per-plugin counters: calls, denials, failures, latency.
    Plugins,
    /// Replaces a policy plugin in place, carrying its state over.
    Swap {
        spec: String,
        /// Name of the plugin to replace (default: the new plugin's name).
        replace: Option<String>,
        /// Only this VM (default: every VM).
        vm: Option<u64>,
    },
    /// Writes the VM's state (device facts and plugin states, as a migration SAVE would) to
    /// `file` on the daemon's side.
    Save { file: PathBuf, vm: Option<u64> },
    /// Loads the plugin states of a state file written by `save` (or a SAVE) into the
    /// running VM; the device part is for a VMM's LOAD and is only checked here.
    Load { file: PathBuf, vm: Option<u64> },
    /// Old daemon: the next SAVE of the VM (or of every VM) is a same-host handover to the
    /// daemon serving control socket `to`: the state carries the connection table and the
    /// sockets go to `to`.
    Handover { to: PathBuf, vm: Option<u64> },
    /// New daemon: `count` sockets for the state blob with SHA-256 `digest` follow over this
    /// connection (SCM_RIGHTS), once the daemon answered `ok`.
    HandoverFds {
        vm: u64,
        digest: String,
        count: usize,
    },
    /// Live upgrade to a new daemon process started from `binary` (default: this daemon's
    /// own executable path), with this daemon's arguments.
    Upgrade { binary: Option<PathBuf> },
    /// Open connections with their byte counts and credit.
    Conns {
        /// Only this VM (default: every VM).
        vm: Option<u64>,
    },
}
