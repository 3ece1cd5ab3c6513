//! The daemon's own hop on every vhost-user connection: whole messages from the frontend are
//! forwarded to `vhost-user-backend`'s handler over an internal socket, its replies go back,
//! and the setup state the frontend configured is recorded on the way.
//!
//! Why: `vhost-user-backend` 0.24 has no way to adopt a session another process negotiated.
//! With the relay the daemon (a) can stop with no request in flight: it stops reading the
//! frontend, sends a marker `GET_FEATURES` of its own and forwards the handler's replies up to
//! the marker's (requests are answered in order), and (b) holds a [`Record`] of the setup messages (with duplicates of their fds)
//! that a new process replays into its own handler to rebuild the session, while the
//! frontend's socket itself is handed over and never notices.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// vhost-user message codes the relay looks at.
pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const RESET_DEVICE: u32 = 34;
}

const HDR: usize = 12;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// Largest body accepted (the vhost crate's `MAX_MSG_SIZE`).
const MAX_BODY: usize = 0x1000;
/// Most fds one message may carry (the vhost crate's `MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;
/// Virtio feature bit of `VHOST_USER_F_PROTOCOL_FEATURES` and protocol bit of REPLY_ACK.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const P_REPLY_ACK: u64 = 1 << 3;

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("vhost-user socket: {0}")]
    Io(#[from] io::Error),
    #[error("the other side closed the vhost-user socket")]
    Closed,
    #[error("malformed vhost-user message: {0}")]
    Malformed(&'static str),
    #[error("the handler refused replayed request {code} (ring {index})")]
    Refused { code: u32, index: u32 },
    #[error("ring {0} is out of range")]
    Ring(u32),
}

/// One vhost-user message: header, body and the fds that came with it.
#[derive(Debug)]
pub struct Msg {
    pub code: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    pub fn new(code: u32, body: Vec<u8>, fds: Vec<OwnedFd>) -> Msg {
        Msg {
            code,
            flags: VERSION,
            body,
            fds,
        }
    }

    fn is_reply(&self) -> bool {
        self.flags & REPLY != 0
    }

    /// The ring index a per-ring request names (first u32; the low byte for KICK/CALL/ERR).
    pub fn ring(&self) -> Option<u32> {
        let b: [u8; 4] = self.body.get(..4)?.try_into().ok()?;
        let v = u32::from_le_bytes(b);
        Some(match self.code {
            code::SET_VRING_KICK | code::SET_VRING_CALL | code::SET_VRING_ERR => v & 0xff,
            _ => v,
        })
    }

    /// The u64 payload of a reply (features, acks).
    fn u64(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.body.get(..8)?.try_into().ok()?))
    }

    fn try_clone(&self) -> io::Result<Msg> {
        Ok(Msg {
            code: self.code,
            flags: self.flags,
            body: self.body.clone(),
            fds: self
                .fds
                .iter()
                .map(|f| f.try_clone())
                .collect::<io::Result<_>>()?,
        })
    }
}

/// Reads one whole message. `Ok(None)`: the peer closed the socket between messages.
pub fn read_msg(s: &UnixStream) -> Result<Option<Msg>, RelayError> {
    let mut hdr = [0u8; HDR];
    let (n, fds) = crate::scm::recv_with_fds(s, &mut hdr, MAX_FDS)?;
    if n == 0 {
        return Ok(None);
    }
    read_exact(s, &mut hdr[n..])?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let size = word(8) as usize;
    if size > MAX_BODY {
        return Err(RelayError::Malformed("body larger than 4 KiB"));
    }
    let mut body = vec![0u8; size];
    read_exact(s, &mut body)?;
    Ok(Some(Msg {
        code: word(0),
        flags: word(4),
        body,
        fds,
    }))
}

fn read_exact(s: &UnixStream, mut buf: &mut [u8]) -> Result<(), RelayError> {
    use std::io::Read;
    while !buf.is_empty() {
        match (&*s).read(buf) {
            Ok(0) => return Err(RelayError::Closed),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes one whole message (header and body in one `sendmsg`, the fds with it).
pub fn write_msg(s: &UnixStream, m: &Msg) -> Result<(), RelayError> {
    if m.fds.len() > MAX_FDS {
        return Err(RelayError::Malformed("more than 32 fds"));
    }
    let mut buf = Vec::with_capacity(HDR + m.body.len());
    buf.extend_from_slice(&m.code.to_le_bytes());
    buf.extend_from_slice(&m.flags.to_le_bytes());
    buf.extend_from_slice(&(m.body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&m.body);
    let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < buf.len() {
        let fds: &[RawFd] = if sent == 0 { &raw } else { &[] };
        sent += crate::scm::send_with_fds(s, &buf[sent..], fds)?;
    }
    Ok(())
}

fn marker() -> Msg {
    Msg::new(code::GET_FEATURES, Vec::new(), Vec::new())
}

/// Sends `m` to the handler, then the marker, and returns the handler's messages up to the
/// marker's reply: when this returns, the handler has finished with `m`.
pub fn exchange(internal: &UnixStream, m: &Msg) -> Result<Vec<Msg>, RelayError> {
    write_msg(internal, m)?;
    // A GET_FEATURES of the frontend gets its own reply before the marker's.
    drain(
        internal,
        usize::from(m.code == code::GET_FEATURES && !m.is_reply()),
    )
}

/// Sends the marker and returns the handler's messages up to the marker's reply (skipping
/// `skip` earlier GET_FEATURES replies, which belong to requests already sent): when this
/// returns, the handler has answered everything sent before.
pub fn drain(internal: &UnixStream, mut skip: usize) -> Result<Vec<Msg>, RelayError> {
    write_msg(internal, &marker())?;
    let mut out = Vec::new();
    loop {
        let r = read_msg(internal)?.ok_or(RelayError::Closed)?;
        if r.code == code::GET_FEATURES && r.is_reply() {
            if skip == 0 {
                return Ok(out);
            }
            skip -= 1;
        }
        out.push(r);
    }
}

/// The setup a frontend gave one session: the latest message of each kind (per ring for the
/// ring messages), with its fds.
#[derive(Default)]
pub struct Record {
    owner: bool,
    global: BTreeMap<u32, Msg>,
    rings: BTreeMap<(u32, u32), Msg>,
}

/// Messages that are part of the record.
const RING_CODES: [u32; 7] = [
    code::SET_VRING_NUM,
    code::SET_VRING_ADDR,
    code::SET_VRING_BASE,
    code::SET_VRING_ERR,
    code::SET_VRING_CALL,
    code::SET_VRING_KICK,
    code::SET_VRING_ENABLE,
];
const GLOBAL_CODES: [u32; 4] = [
    code::SET_FEATURES,
    code::SET_PROTOCOL_FEATURES,
    code::SET_MEM_TABLE,
    code::SET_LOG_BASE,
];

impl Record {
    /// Notes a frontend request before it goes to the handler.
    pub fn note(&mut self, m: &Msg) -> io::Result<()> {
        match m.code {
            code::SET_OWNER => self.owner = true,
            code::RESET_OWNER | code::RESET_DEVICE => {
                self.rings.clear();
            }
            code::GET_VRING_BASE => {
                // The ring stops: the handler drops its kick and call fds.
                if let Some(i) = m.ring() {
                    self.rings.remove(&(code::SET_VRING_KICK, i));
                    self.rings.remove(&(code::SET_VRING_CALL, i));
                }
            }
            c if GLOBAL_CODES.contains(&c) => {
                self.global.insert(c, m.try_clone()?);
            }
            c if RING_CODES.contains(&c) => {
                if let Some(i) = m.ring() {
                    self.rings.insert((c, i), m.try_clone()?);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether a request of this kind changes what [`Record::note`] keeps.
    pub fn changes(code: u32) -> bool {
        matches!(
            code,
            code::SET_OWNER | code::RESET_OWNER | code::RESET_DEVICE | code::GET_VRING_BASE
        ) || GLOBAL_CODES.contains(&code)
            || RING_CODES.contains(&code)
    }

    /// Whether the frontend set up any ring (the guest driver has been live).
    pub fn has_rings(&self) -> bool {
        !self.rings.is_empty()
    }

    /// Rings the handler is running (a kick fd was given since the last stop).
    pub fn started_rings(&self) -> Vec<u32> {
        self.rings
            .keys()
            .filter(|(c, _)| *c == code::SET_VRING_KICK)
            .map(|(_, i)| *i)
            .collect()
    }

    fn reply_ack(&self) -> bool {
        let f = self.global.get(&code::SET_FEATURES).and_then(Msg::u64);
        let p = self
            .global
            .get(&code::SET_PROTOCOL_FEATURES)
            .and_then(Msg::u64);
        f.is_some_and(|f| f & F_PROTOCOL_FEATURES != 0) && p.is_some_and(|p| p & P_REPLY_ACK != 0)
    }

    /// The requests that rebuild this setup in a handler, in order; `bases` replaces
    /// the next avail index of the rings that were running when they were stopped.
    /// `fresh`: the handler is new (a session being adopted), so it is claimed first; a
    /// handler resuming its own session is already claimed and would refuse that.
    pub fn replay(&self, bases: &BTreeMap<u32, u16>, fresh: bool) -> io::Result<Vec<Msg>> {
        let mut out = Vec::new();
        if self.owner && fresh {
            out.push(Msg::new(code::SET_OWNER, Vec::new(), Vec::new()));
        }
        for c in GLOBAL_CODES {
            if let Some(m) = self.global.get(&c) {
                out.push(m.try_clone()?);
            }
        }
        let rings: std::collections::BTreeSet<u32> = self.rings.keys().map(|k| k.1).collect();
        for i in rings {
            for c in RING_CODES {
                let m = match (c, bases.get(&i)) {
                    (code::SET_VRING_BASE, Some(b)) => {
                        let mut body = i.to_le_bytes().to_vec();
                        body.extend_from_slice(&u32::from(*b).to_le_bytes());
                        Msg::new(c, body, Vec::new())
                    }
                    _ => match self.rings.get(&(c, i)) {
                        Some(m) => m.try_clone()?,
                        None => continue,
                    },
                };
                out.push(m);
            }
        }
        if self.reply_ack() {
            for m in out.iter_mut().filter(|m| m.code != code::SET_LOG_BASE) {
                m.flags = (m.flags & !(REPLY | NEED_REPLY)) | NEED_REPLY;
            }
        }
        Ok(out)
    }

    /// The record as plain data plus its fds in order, to hand to another process.
    pub fn export(&self) -> io::Result<(WireRecord, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        let mut msgs = Vec::new();
        for m in self.global.values().chain(self.rings.values()) {
            msgs.push(WireMsg {
                code: m.code,
                flags: m.flags,
                body: m.body.clone(),
                fds: m.fds.len(),
            });
            for f in &m.fds {
                fds.push(f.try_clone()?);
            }
        }
        Ok((
            WireRecord {
                owner: self.owner,
                msgs,
            },
            fds,
        ))
    }

    /// Rebuilds a record another process exported.
    pub fn import(w: &WireRecord, fds: Vec<OwnedFd>) -> Result<Record, RelayError> {
        let need: usize = w.msgs.iter().map(|m| m.fds).sum();
        if need != fds.len() {
            return Err(RelayError::Malformed("record fd count"));
        }
        let mut fds = fds.into_iter();
        let mut r = Record {
            owner: w.owner,
            ..Record::default()
        };
        for m in &w.msgs {
            if m.body.len() > MAX_BODY || m.fds > MAX_FDS {
                return Err(RelayError::Malformed("record message too large"));
            }
            let msg = Msg {
                code: m.code,
                flags: m.flags,
                body: m.body.clone(),
                fds: fds.by_ref().take(m.fds).collect(),
            };
            if GLOBAL_CODES.contains(&m.code) {
                r.global.insert(m.code, msg);
            } else if RING_CODES.contains(&m.code) {
                let i = msg.ring().ok_or(RelayError::Malformed("ring message"))?;
                r.rings.insert((m.code, i), msg);
            } else {
                return Err(RelayError::Malformed("record holds an unexpected request"));
            }
        }
        Ok(r)
    }

    /// For each running ring, the used index the guest can see, read from guest memory
    /// through the recorded memory table: where a backend restarting without its
    /// predecessor's word resumes (next avail = used idx, as QEMU does when a backend
    /// without inflight tracking comes back). Buffers the predecessor took but never
    /// returned are processed again.
    pub fn used_indices(&self) -> Result<BTreeMap<u32, u16>, RelayError> {
        use std::os::unix::fs::FileExt;
        let mut out = BTreeMap::new();
        let started = self.started_rings();
        if started.is_empty() {
            return Ok(out);
        }
        let table = self
            .global
            .get(&code::SET_MEM_TABLE)
            .ok_or(RelayError::Malformed(
                "running rings without a memory table",
            ))?;
        let regions = mem_regions(&table.body)?;
        for i in started {
            let addr = self
                .rings
                .get(&(code::SET_VRING_ADDR, i))
                .ok_or(RelayError::Ring(i))?;
            // struct vhost_vring_addr: index, flags (u32), desc, used, avail, log (u64).
            let used = le_u64(&addr.body, 16).ok_or(RelayError::Malformed("SET_VRING_ADDR"))?;
            // struct vring_used: flags (u16), idx (u16), ring.
            let at = used.checked_add(2).ok_or(RelayError::Ring(i))?;
            let (k, r) = regions
                .iter()
                .enumerate()
                .find(|(_, r)| at >= r.user && at + 2 <= r.user.saturating_add(r.size))
                .ok_or(RelayError::Ring(i))?;
            let fd = table
                .fds
                .get(k)
                .ok_or(RelayError::Malformed("memory table fds"))?;
            let file = std::fs::File::from(fd.try_clone()?);
            let mut b = [0u8; 2];
            file.read_exact_at(&mut b, r.offset + (at - r.user))?;
            out.insert(i, u16::from_le_bytes(b));
        }
        Ok(out)
    }

    /// Writes once to the kick and call eventfds of every running ring: the handler looks
    /// at the rings (a kick its predecessor consumed is not lost) and the driver at its
    /// used entries (an interrupt its predecessor owed is not lost). Both are harmless
    /// when there was nothing to do.
    pub fn wake_rings(&self) {
        for i in self.started_rings() {
            for c in [code::SET_VRING_KICK, code::SET_VRING_CALL] {
                if let Some(fd) = self.rings.get(&(c, i)).and_then(|m| m.fds.first()) {
                    signal(fd);
                }
            }
        }
    }

    /// Fds the record holds (the per-VM cost of being ready to hand the session over).
    pub fn fd_count(&self) -> usize {
        self.global
            .values()
            .chain(self.rings.values())
            .map(|m| m.fds.len())
            .sum()
    }
}

/// One region of a `SET_MEM_TABLE`: where it sits in the frontend's address space and in
/// its fd.
struct Region {
    size: u64,
    user: u64,
    offset: u64,
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The regions of a `SET_MEM_TABLE` body: u32 count, u32 padding, then per region guest
/// address, size, frontend address and mmap offset (u64 each).
fn mem_regions(body: &[u8]) -> Result<Vec<Region>, RelayError> {
    let bad = RelayError::Malformed("SET_MEM_TABLE");
    let n = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(RelayError::Malformed("SET_MEM_TABLE"))? as usize;
    if n > MAX_FDS {
        return Err(bad);
    }
    (0..n)
        .map(|k| {
            let at = 8 + k * 32;
            Some(Region {
                size: le_u64(body, at + 8)?,
                user: le_u64(body, at + 16)?,
                offset: le_u64(body, at + 24)?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or(bad)
}

/// A record message as data: its fds travel beside it, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireMsg {
    pub code: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    pub fds: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WireRecord {
    pub owner: bool,
    pub msgs: Vec<WireMsg>,
}

/// Replays `msgs` into the handler behind `internal`; any negative ack or a closed socket
/// fails the replay.
pub fn replay(internal: &UnixStream, msgs: &[Msg]) -> Result<(), RelayError> {
    for m in msgs {
        for r in exchange(internal, m)? {
            let nack = r.code == m.code
                && m.code != code::SET_LOG_BASE
                && r.body.len() == 8
                && r.u64() != Some(0);
            if nack {
                return Err(RelayError::Refused {
                    code: m.code,
                    index: m.ring().unwrap_or(0),
                });
            }
        }
    }
    Ok(())
}

/// Stops ring `index` in the handler (its own `GET_VRING_BASE`): the backend finishes the
/// packet it is on and publishes its used entries. Returns the next avail index.
pub fn stop_ring(internal: &UnixStream, index: u32) -> Result<u16, RelayError> {
    let mut body = index.to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    let m = Msg::new(code::GET_VRING_BASE, body, Vec::new());
    for r in exchange(internal, &m)? {
        if r.code == code::GET_VRING_BASE && r.body.len() == 8 {
            let v = u32::from_le_bytes([r.body[4], r.body[5], r.body[6], r.body[7]]);
            return Ok(v as u16);
        }
    }
    Err(RelayError::Ring(index))
}

/// Adds 1 to an eventfd (a call fd); errors are ignored (the fd may be the frontend's
/// non-eventfd placeholder, or already closed on its side).
pub fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an fd we hold.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Duplicates a socket's fd as a `UnixStream`.
pub fn dup_stream(s: &impl AsFd) -> io::Result<UnixStream> {
    Ok(UnixStream::from(s.as_fd().try_clone_to_owned()?))
}
