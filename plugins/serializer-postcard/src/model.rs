//! Serde mirror of `device-state`, schema 1. Shared by serializer-postcard and serializer-json.
//! (The connection table is filled only by same-host handover; its fields were settled with it,
//! before any schema-1 state carried a connection.)
//! Byte strings are raw bytes in binary formats and lowercase hex in human-readable ones.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use vhost_plug_sdk_serializer::*;

pub const SCHEMA: u32 = 1;

#[derive(Serialize, Deserialize)]
pub struct StateV1 {
    pub guest_cid: u64,
    pub acked_features: u64,
    pub event_queue_owned_by_backend: bool,
    pub driver_live: bool,
    pub plugins: Vec<PluginV1>,
    pub connections: Vec<ConnV1>,
}

#[derive(Serialize, Deserialize)]
pub struct PluginV1 {
    pub name: String,
    pub schema: u32,
    pub data: Bytes,
}

#[derive(Serialize, Deserialize)]
pub struct ConnV1 {
    pub local_cid: u64,
    pub local_port: u32,
    pub peer_port: u32,
    pub seqpacket: bool,
    /// 0 connecting, 1 established, 2 closing
    pub state: u8,
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    pub last_fwd_sent: u32,
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// SHUTDOWN flag bits (bit 0 no-more-receive, bit 1 no-more-send)
    pub peer_shutdown: u8,
    pub local_shutdown: u8,
    pub pending_to_guest: Bytes,
    pub pending_to_host: Bytes,
    pub fd_index: Option<u32>,
    pub id: u64,
    /// owed-ops bits (request, response, rst, shutdown, credit-update, credit-request)
    pub owed: u8,
    pub credit_requested: bool,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut out = String::with_capacity(self.0.len() * 2);
            for b in &self.0 {
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
            s.serialize_str(&out)
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

struct BytesVisitor;

impl<'de> de::Visitor<'de> for BytesVisitor {
    type Value = Bytes;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("bytes or a hex string")
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
        if !v.len().is_multiple_of(2) {
            return Err(E::custom("odd-length hex string"));
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(E::custom("bad hex digit")),
        };
        v.as_bytes()
            .chunks(2)
            .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
            .collect::<Result<Vec<u8>, E>>()
            .map(Bytes)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut v = Vec::new();
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Bytes(v))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        if d.is_human_readable() {
            d.deserialize_str(BytesVisitor)
        } else {
            d.deserialize_bytes(BytesVisitor)
        }
    }
}

pub fn from_wit(s: DeviceState) -> StateV1 {
    StateV1 {
        guest_cid: s.guest_cid,
        acked_features: s.acked_features,
        event_queue_owned_by_backend: s.event_queue.owner == EventQueueOwner::Backend,
        driver_live: s.event_queue.driver_live,
        plugins: s
            .plugins
            .into_iter()
            .map(|p| PluginV1 {
                name: p.name,
                schema: p.state.schema,
                data: Bytes(p.state.data),
            })
            .collect(),
        connections: s
            .connections
            .into_iter()
            .map(|c| ConnV1 {
                local_cid: c.local_cid,
                local_port: c.local_port,
                peer_port: c.peer_port,
                seqpacket: c.kind == SocketType::Seqpacket,
                state: match c.state {
                    ConnState::Connecting => 0,
                    ConnState::Established => 1,
                    ConnState::Closing => 2,
                },
                rx_cnt: c.credit.rx_cnt,
                fwd_cnt: c.credit.fwd_cnt,
                last_fwd_sent: c.credit.last_fwd_sent,
                tx_cnt: c.credit.tx_cnt,
                peer_buf_alloc: c.credit.peer_buf_alloc,
                peer_fwd_cnt: c.credit.peer_fwd_cnt,
                peer_shutdown: c.peer_shutdown.bits(),
                local_shutdown: c.local_shutdown.bits(),
                pending_to_guest: Bytes(c.pending_to_guest),
                pending_to_host: Bytes(c.pending_to_host),
                fd_index: c.fd_index,
                id: c.id,
                owed: c.owed.bits(),
                credit_requested: c.credit_requested,
                bytes_to_guest: c.bytes_to_guest,
                bytes_from_guest: c.bytes_from_guest,
            })
            .collect(),
    }
}

fn flags(bits: u8) -> Result<ShutdownFlags, String> {
    ShutdownFlags::from_bits(bits).ok_or_else(|| format!("bad shutdown flags {bits:#x}"))
}

pub fn to_wit(s: StateV1) -> Result<DeviceState, String> {
    let mut connections = Vec::with_capacity(s.connections.len());
    for c in s.connections {
        connections.push(Connection {
            local_cid: c.local_cid,
            local_port: c.local_port,
            peer_port: c.peer_port,
            kind: if c.seqpacket {
                SocketType::Seqpacket
            } else {
                SocketType::Stream
            },
            state: match c.state {
                0 => ConnState::Connecting,
                1 => ConnState::Established,
                2 => ConnState::Closing,
                x => return Err(format!("bad connection state {x}")),
            },
            credit: Credit {
                rx_cnt: c.rx_cnt,
                fwd_cnt: c.fwd_cnt,
                last_fwd_sent: c.last_fwd_sent,
                tx_cnt: c.tx_cnt,
                peer_buf_alloc: c.peer_buf_alloc,
                peer_fwd_cnt: c.peer_fwd_cnt,
            },
            peer_shutdown: flags(c.peer_shutdown)?,
            local_shutdown: flags(c.local_shutdown)?,
            pending_to_guest: c.pending_to_guest.0,
            pending_to_host: c.pending_to_host.0,
            fd_index: c.fd_index,
            id: c.id,
            owed: OwedOps::from_bits(c.owed)
                .ok_or_else(|| format!("bad owed ops {:#x}", c.owed))?,
            credit_requested: c.credit_requested,
            bytes_to_guest: c.bytes_to_guest,
            bytes_from_guest: c.bytes_from_guest,
        });
    }
    Ok(DeviceState {
        guest_cid: s.guest_cid,
        acked_features: s.acked_features,
        event_queue: EventQueueState {
            owner: if s.event_queue_owned_by_backend {
                EventQueueOwner::Backend
            } else {
                EventQueueOwner::Frontend
            },
            driver_live: s.driver_live,
        },
        plugins: s
            .plugins
            .into_iter()
            .map(|p| NamedPluginState {
                name: p.name,
                state: PluginState {
                    schema: p.schema,
                    data: p.data.0,
                },
            })
            .collect(),
        connections,
    })
}
