//! Helpers of the live-upgrade tests (tests/tests/upgrade.rs, guest_upgrade.rs).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::harness::ctl;
use crate::state::{json_plugin_states, StateReader};

/// Daemons started by upgrades are not children of the test: this ends the last one.
pub struct Current(pub Option<u32>);

impl Drop for Current {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill on a pid this test learned from `ctl upgrade`.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

/// `ctl upgrade`; returns the new daemon's pid and its answer.
pub fn upgrade(control: &Path, extra: &[&str]) -> Result<(u32, serde_json::Value)> {
    let mut args = vec!["upgrade"];
    args.extend_from_slice(extra);
    let (ok, v) = ctl(control, &args)?;
    ensure!(ok, "ctl upgrade: {v}");
    let pid = v["pid"].as_u64().context("no pid in the answer")? as u32;
    Ok((pid, v))
}

pub fn rule_hits(blob: &[u8], rule: &str) -> Result<u64> {
    let states = json_plugin_states(blob)?;
    let st = states
        .iter()
        .find(|p| p.name == "allowlist")
        .with_context(|| format!("no allowlist state among {states:?}"))?;
    let mut r = StateReader::new(&st.data);
    for _ in 0..r.u32()? {
        let key = r.bytes()?;
        let hits = r.u64()?;
        if key == rule.as_bytes() {
            return Ok(hits);
        }
    }
    bail!("no rule `{rule}` in the allowlist state")
}

/// The hits of `rule` in the `allowlist` plugin's state, from a `ctl save` of the daemon.
pub fn saved_hits(control: &Path, dir: &Path, name: &str, rule: &str) -> Result<u64> {
    let file = dir.join(name);
    let f = file.display().to_string();
    let (ok, v) = ctl(control, &["save", &f])?;
    ensure!(ok, "ctl save: {v}");
    rule_hits(&std::fs::read(&file)?, rule)
}
