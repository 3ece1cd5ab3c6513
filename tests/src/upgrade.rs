//! Helpers of the live-upgrade tests (tests/tests/upgrade.rs, guest_upgrade.rs).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::harness::{ctl, TestVm};
use crate::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use crate::packet::HOST_CID;
use crate::{GuestSocket, SockType};

const PROMPT: Duration = Duration::from_secs(10);
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

/// One VM's open connections (tests/tests/upgrade_crash.rs, upgrade_partial.rs): guest -> host and host -> guest.
pub struct Conns {
    pub g2h: (GuestSocket, UnixStream),
    pub h2g: (UnixStream, GuestSocket),
}

pub fn open_conns(vm: &TestVm, port: u32) -> Result<Conns> {
    let uds = vm.spec.uds_path.clone();
    let hl = host_listen(&uds, port)?;
    let g = vm
        .guest
        .connect_timeout(HOST_CID, port, SockType::Stream, PROMPT)
        .map_err(|e| anyhow::anyhow!("guest connect {port}: {e}"))?;
    let h = accept_timeout(&hl, HOST_TIMEOUT)?;
    h.set_read_timeout(Some(PROMPT))?;
    let gl = vm.guest.listen(port + 1, SockType::Stream)?;
    let (h2, _) = host_connect(&uds, port + 1)?;
    h2.set_read_timeout(Some(PROMPT))?;
    let g2 = gl.accept(PROMPT)?;
    let mut c = Conns {
        g2h: (g, h),
        h2g: (h2, g2),
    };
    both_ways(&mut c, "before")?;
    Ok(c)
}

/// Bytes both ways on both connections.
pub fn both_ways(c: &mut Conns, tag: &str) -> Result<()> {
    let msg = format!("{tag}: guest first");
    (&c.g2h.0).write_all(msg.as_bytes())?;
    let mut got = vec![0u8; msg.len()];
    c.g2h.1.read_exact(&mut got)?;
    ensure!(got == msg.as_bytes(), "{tag}: guest -> host got {got:?}");
    c.g2h.1.write_all(b"pong")?;
    let mut r = [0u8; 4];
    (&c.g2h.0).read_exact(&mut r)?;
    ensure!(&r == b"pong", "{tag}: host -> guest");
    let msg = format!("{tag}: host first");
    c.h2g.0.write_all(msg.as_bytes())?;
    let mut got = vec![0u8; msg.len()];
    (&c.h2g.1).read_exact(&mut got)?;
    ensure!(got == msg.as_bytes(), "{tag}: host -> guest got {got:?}");
    (&c.h2g.1).write_all(b"ping")?;
    let mut r = [0u8; 4];
    c.h2g.0.read_exact(&mut r)?;
    ensure!(&r == b"ping", "{tag}: guest -> host");
    Ok(())
}

/// The new daemon's pid, from the old daemon's log.
pub fn new_pid(log: &str) -> Result<u32> {
    let line = log
        .lines()
        .find(|l| l.contains("new daemon started"))
        .context("no `new daemon started` in the log")?;
    let at = line.find("pid=").context("no pid= in the log line")? + 4;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Ok(digits.parse()?)
}

/// `ctl status` once the new daemon of an upgrade has bound the control socket, waiting at
/// most `timeout`.
pub fn status_when_up(control: &Path, timeout: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((true, v)) = ctl(control, &["status"]) {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("ctl does not reach the new daemon");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
