//! Writes the committed seed corpus (`corpus/<target>/seed-*`): a handful of meaningful inputs
//! per fuzz target. Rerun after a format change:
//! `cargo run --release -p vhost-plug --example gen_fuzz_seeds`.

use std::path::Path;

use vhost_plug::blob;
use vhost_plug::plugin::types::{
    ConnState, Connection, Credit, DeviceState, EventQueueOwner, EventQueueState, NamedPluginState,
    OwedOps, PluginState, ShutdownFlags, SocketType,
};
use vhost_plug::plugin::{PluginKind, PluginRuntime, PluginSpec, RuntimeConfig, Serializer};
use vhost_plug::vsock::header::*;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

fn hdr(op: u16, type_: u16, len: u32, flags: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1025,
        dst_port: 1234,
        len,
        type_,
        op,
        flags,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

fn headers() {
    for (name, h) in [
        ("request", hdr(OP_REQUEST, TYPE_STREAM, 0, 0)),
        ("rw", hdr(OP_RW, TYPE_STREAM, 5, 0)),
        (
            "seqpacket-eom",
            hdr(OP_RW, TYPE_SEQPACKET, 9, SEQ_EOM | SEQ_EOR),
        ),
        (
            "shutdown",
            hdr(OP_SHUTDOWN, TYPE_STREAM, 0, SHUTDOWN_RCV | SHUTDOWN_SEND),
        ),
        ("credit-update", hdr(OP_CREDIT_UPDATE, TYPE_STREAM, 0, 0)),
        ("rst", hdr(OP_RST, TYPE_STREAM, 0, 0)),
    ] {
        write("header", name, &h.to_le_bytes());
    }
}

fn connect_lines() {
    for (name, line) in [
        ("port", &b"CONNECT 1234"[..]),
        ("crlf", b"CONNECT 80\r"),
        ("max", b"CONNECT 4294967295"),
        ("overflow", b"CONNECT 4294967296"),
        ("plus", b"CONNECT +7"),
        ("two-words", b"CONNECT 1 2"),
    ] {
        write("connect_line", name, line);
    }
}

/// One chain input (layout in fuzz_targets/chain.rs): 12 fixed bytes, the descriptors, data.
struct ChainSeed {
    write: bool,
    queue_log2: u8,
    head: u16,
    cap: u32,
    probe: (u16, u16),
    descs: Vec<(u64, u32, u16, u16)>,
    data: Vec<u8>,
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Guest address of the data area in the chain target.
const DATA: u64 = 0x1_0000;
const CAP: u32 = (HDR_LEN + 64 * 1024) as u32;

impl ChainSeed {
    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![u8::from(self.write) | (self.queue_log2 << 1)];
        b.extend_from_slice(&self.head.to_le_bytes());
        b.extend_from_slice(&self.cap.to_le_bytes());
        b.extend_from_slice(&self.probe.0.to_le_bytes());
        b.extend_from_slice(&self.probe.1.to_le_bytes());
        b.push(self.descs.len() as u8);
        for &(addr, len, flags, next) in &self.descs {
            b.extend_from_slice(&raw_desc(addr, len, flags, next));
        }
        b.extend_from_slice(&self.data);
        b
    }
}

fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

fn chains() {
    let mut packet = hdr(OP_RW, TYPE_STREAM, 5, 0).to_le_bytes().to_vec();
    packet.extend_from_slice(b"hello");
    let split = ChainSeed {
        write: false,
        queue_log2: 4,
        head: 0,
        cap: CAP,
        probe: (40, 8),
        descs: vec![
            (DATA, 10, F_NEXT, 1),
            (DATA + 10, 20, F_NEXT, 2),
            (DATA + 30, 19, 0, 0),
        ],
        data: packet.clone(),
    };
    write("chain", "tx-header-split", &split.bytes());

    let rx = ChainSeed {
        write: true,
        queue_log2: 8,
        head: 3,
        cap: CAP,
        probe: (0, 100),
        descs: vec![
            (0, 0, 0, 0),
            (0, 0, 0, 0),
            (0, 0, 0, 0),
            (DATA, 44, F_WRITE | F_NEXT, 4),
            (0x2_1000, 4096, F_WRITE, 0),
        ],
        data: Vec::new(),
    };
    write("chain", "rx-buffers", &rx.bytes());

    // An indirect table at DATA + 0x200 pointing at the packet at DATA + 0x100.
    let mut data = vec![0u8; 0x100];
    data.extend_from_slice(&packet);
    data.resize(0x200, 0);
    data.extend_from_slice(&raw_desc(DATA + 0x100, 44, F_NEXT, 1));
    data.extend_from_slice(&raw_desc(DATA + 0x100 + 44, 5, 0, 0));
    let indirect = ChainSeed {
        write: false,
        queue_log2: 2,
        head: 0,
        cap: CAP,
        probe: (44, 5),
        descs: vec![(DATA + 0x200, 32, F_INDIRECT, 0)],
        data,
    };
    write("chain", "indirect", &indirect.bytes());

    let across = ChainSeed {
        write: false,
        queue_log2: 1,
        head: 0,
        cap: CAP,
        probe: (0, 64),
        descs: vec![(0x1_fff0, 64, F_NEXT, 1), (0x3_fff0, 16, 0, 0)],
        data: Vec::new(),
    };
    write("chain", "region-boundary-and-hole", &across.bytes());

    let looping = ChainSeed {
        write: false,
        queue_log2: 11,
        head: 0,
        cap: CAP,
        probe: (0, 0),
        descs: vec![(DATA, 40, F_NEXT, 1), (DATA + 40, 40, F_NEXT, 0)],
        data: packet.clone(),
    };
    write("chain", "loop-over-segment-cap", &looping.bytes());

    let event = ChainSeed {
        write: true,
        queue_log2: 3,
        head: 0,
        cap: 4,
        probe: (0, 4),
        descs: vec![(DATA, 8, F_WRITE, 0)],
        data: Vec::new(),
    };
    write("chain", "event-buffer", &event.bytes());
}

fn sample_state(connections: bool) -> DeviceState {
    DeviceState {
        guest_cid: 3,
        acked_features: 1 << 32 | 1 << 29 | 1,
        event_queue: EventQueueState {
            owner: EventQueueOwner::Backend,
            driver_live: true,
        },
        plugins: vec![NamedPluginState {
            name: "port-allowlist".into(),
            state: PluginState {
                schema: 2,
                data: vec![1, 2, 3, 255],
            },
        }],
        connections: if connections {
            vec![Connection {
                local_cid: 2,
                local_port: 1025,
                peer_port: 1234,
                kind: SocketType::Seqpacket,
                state: ConnState::Established,
                credit: Credit {
                    rx_cnt: 10,
                    fwd_cnt: 9,
                    last_fwd_sent: 8,
                    tx_cnt: u32::MAX,
                    peer_buf_alloc: 262144,
                    peer_fwd_cnt: 7,
                },
                peer_shutdown: ShutdownFlags::NO_MORE_SEND,
                local_shutdown: ShutdownFlags::empty(),
                pending_to_guest: b"hello".to_vec(),
                pending_to_host: vec![0; 3],
                fd_index: Some(0),
                id: 7,
                owed: OwedOps::CREDIT_UPDATE,
                credit_requested: false,
                bytes_to_guest: 5,
                bytes_from_guest: 3,
            }]
        } else {
            Vec::new()
        },
    }
}

fn state_blobs() {
    let rt = PluginRuntime::new(RuntimeConfig {
        pooling: None,
        ..RuntimeConfig::default()
    })
    .expect("plugin runtime");
    let load = |name: &str| {
        let spec = PluginSpec::builtin(PluginKind::Serializer, name, "");
        let plugin = rt.load(&spec).expect("load serializer");
        Serializer::new(&rt, "seeds", &plugin).expect("instantiate serializer")
    };
    let mut postcard = load("serializer-postcard");
    for (name, state) in [
        ("migration", sample_state(false)),
        ("handover", sample_state(true)),
        (
            "other-cid",
            DeviceState {
                guest_cid: 4,
                ..sample_state(false)
            },
        ),
    ] {
        let payload = postcard.encode(&state).expect("encode");
        // Mode byte 1: payload only (the target frames it); mode 0: the whole blob.
        write(
            "state_blob",
            &format!("payload-{name}"),
            &[&[1u8][..], &payload].concat(),
        );
        let framed = blob::wrap(postcard.name(), &payload).expect("frame");
        write(
            "state_blob",
            &format!("framed-{name}"),
            &[&[0u8][..], &framed].concat(),
        );
    }
    let mut json = load("serializer-json");
    let payload = json.encode(&sample_state(true)).expect("encode");
    let framed = blob::wrap(json.name(), &payload).expect("frame");
    write("state_blob", "framed-json", &[&[0u8][..], &framed].concat());
}

fn vm_args() {
    for (name, arg) in [
        ("minimal", &b"socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock"[..]),
        (
            "all-keys",
            b"guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock,tx-buffer-size=65536,queue-size=1024,groups=group1+group2,max-connections=100",
        ),
        (
            "underscores",
            b" guest_cid=4,socket=/s4,uds_path=/u4,tx_buffer_size=1,queue_size=1,groups=,max_connections=1 ",
        ),
        (
            "two-vms",
            b"guest-cid=3,socket=/s3,uds-path=/u3\0guest-cid=4,socket=/s4,uds-path=/u4",
        ),
        (
            "duplicate-path",
            b"guest-cid=3,socket=/s,uds-path=/u\0guest-cid=4,socket=/u,uds-path=/v",
        ),
        ("forward", b"socket=/s,uds-path=/u,forward-listen=1234"),
    ] {
        write("vm_arg", name, arg);
    }
}

fn yaml_configs() {
    for (name, text) in [
        (
            "peer-example",
            "vms:\n  - guest_cid: 3\n    socket: /tmp/vhost3.socket\n    uds_path: /tmp/vm3.sock\n    tx_buffer_size: 65536\n    queue_size: 1024\n    groups: group1+groupA\n",
        ),
        (
            "two-vms-ours",
            "vms:\n  - guest_cid: 3\n    socket: /s3\n    uds_path: /u3\n    max_connections: 10\n    groups: [a, b]\n    plugins:\n      - policy=builtin:port-allowlist,config=allow=2:1234\n  - guest-cid: 4\n    socket: /s4\n    uds-path: /u4\n    queue_size: null\n",
        ),
        (
            "anchors-and-unknown",
            "x: &a /s\nvms:\n  - socket: *a\n    uds_path: /u\n    forward_listen: 9\n    extra: {k: [1, 2]}\nvms: []\n",
        ),
        (
            "refused",
            "vms:\n  - guest_cid: 2\n    socket: ''\n    uds_path: /u\n    forward_cid: 1\n",
        ),
    ] {
        write("yaml_config", name, text.as_bytes());
    }
}

fn main() {
    headers();
    connect_lines();
    chains();
    state_blobs();
    vm_args();
    yaml_configs();
}
