//! Device-state blobs as the daemon writes them on SAVE: the frame of
//! `host/parse/src/blob.rs` (an independent reading of it, as [`crate::packet`] is of the wire
//! format), saving a running VM, and the plugin states inside a serializer-json payload.
//!
//! Frame: magic "VHPLUGST" | format u16 LE (=1) | name-len u8 | name | payload-len u64 LE |
//! crc32 (IEEE) of payload u32 LE | payload.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::harness::TestVm;
use crate::sim::{QueueSet, SimConfig, VringBases};

pub const MAGIC: &[u8; 8] = b"VHPLUGST";
pub const FORMAT: u16 = 1;

/// A simulated-VMM config that negotiates the DEVICE_STATE protocol feature.
pub fn state_cfg(queues: QueueSet) -> SimConfig {
    SimConfig {
        queues,
        extra_protocol_features: VhostUserProtocolFeatures::DEVICE_STATE,
        ..SimConfig::default()
    }
}

/// A framed state blob taken apart.
pub struct Frame {
    /// Serializer that wrote the payload.
    pub name: String,
    pub payload: Vec<u8>,
    /// Offset of the payload-len field.
    pub len_at: usize,
}

/// Checks magic, format, length and checksum.
pub fn parse_frame(blob: &[u8]) -> Result<Frame> {
    ensure!(
        blob.len() >= 11,
        "blob of {} bytes is too short",
        blob.len()
    );
    ensure!(&blob[..8] == MAGIC, "blob magic is {:?}", &blob[..8]);
    let format = u16::from_le_bytes([blob[8], blob[9]]);
    ensure!(format == FORMAT, "blob format {format}");
    let n = blob[10] as usize;
    let name = std::str::from_utf8(blob.get(11..11 + n).context("short name")?)?.to_string();
    let len_at = 11 + n;
    let len = u64::from_le_bytes(blob.get(len_at..len_at + 8).context("short")?.try_into()?);
    let crc = u32::from_le_bytes(
        blob.get(len_at + 8..len_at + 12)
            .context("short")?
            .try_into()?,
    );
    let payload = blob[len_at + 12..].to_vec();
    ensure!(payload.len() as u64 == len, "payload length field {len}");
    ensure!(crc32fast::hash(&payload) == crc, "blob checksum mismatch");
    Ok(Frame {
        name,
        payload,
        len_at,
    })
}

/// Frames `payload` as written by serializer `name`.
pub fn frame(name: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(23 + name.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Suspends a running VM (GET_VRING_BASE on every ring), saves its state and resumes it.
/// The VMM must have been connected with [`state_cfg`].
pub fn snapshot(vm: &mut TestVm, timeout: Duration) -> Result<Vec<u8>> {
    vm.guest.pause_interrupts()?;
    let (bases, blob) = suspend_and_save(vm, timeout)?;
    vm.sim.resume_vrings(&bases)?;
    vm.guest.resume_interrupts();
    Ok(blob)
}

/// Suspends a running VM and saves its state; returns the bases to resume with.
pub fn suspend_and_save(vm: &mut TestVm, timeout: Duration) -> Result<(VringBases, Vec<u8>)> {
    let bases = vm.sim.stop_vrings().context("suspending")?;
    let blob = vm.sim.save_state(timeout).context("SAVE")?;
    Ok((bases, blob))
}

/// One plugin's state as found in a serializer-json blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginState {
    pub name: String,
    pub schema: u32,
    pub data: Vec<u8>,
}

/// The plugin states of a blob written by serializer-json (byte strings are lowercase hex).
pub fn json_plugin_states(blob: &[u8]) -> Result<Vec<PluginState>> {
    let f = parse_frame(blob)?;
    let v: serde_json::Value =
        serde_json::from_slice(&f.payload).context("serializer-json payload is not JSON")?;
    let plugins = v
        .pointer("/state/plugins")
        .and_then(|p| p.as_array())
        .context("no state.plugins array in the JSON state")?;
    plugins
        .iter()
        .map(|p| {
            let name = p["name"].as_str().context("plugin without a name")?;
            let schema = p["schema"].as_u64().context("plugin without a schema")?;
            let hex = p["data"]
                .as_str()
                .context("plugin data is not a hex string")?;
            Ok(PluginState {
                name: name.to_string(),
                schema: u32::try_from(schema)?,
                data: from_hex(hex)?,
            })
        })
        .collect()
}

fn from_hex(s: &str) -> Result<Vec<u8>> {
    ensure!(s.len().is_multiple_of(2), "odd-length hex string");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex digit"))
        .collect()
}

/// Reader for the little-endian layout of the SDK's `StateWriter` (plugin state data).
pub struct StateReader<'a> {
    buf: &'a [u8],
}

impl<'a> StateReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        StateReader { buf }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        ensure!(self.buf.len() >= N, "plugin state ends early");
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        Ok(head.try_into()?)
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    /// Length-prefixed (u32) bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        ensure!(self.buf.len() >= n, "plugin state ends early");
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
