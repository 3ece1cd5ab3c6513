//! Plugin runtime micro-benchmarks (harness = false): prints a table.
//!
//!     cargo bench -p vhost-plug --bench plugins
//!
//! Per-decision latency through `PolicyChain::decide` for 0, 1 and 3 plugins, `on_close`,
//! state export, serializer encode/decode and instantiation (`PolicyChain::new` from the
//! precompiled/linked plugin), with the pooling allocator and without.
use std::hint::black_box;
use std::time::{Duration, Instant};

use vhost_plug::plugin::types::*;
use vhost_plug::plugin::{builtin, Plugin, PluginRuntime, PolicyChain, RuntimeConfig, Serializer};

fn req(id: u64) -> ConnRequest {
    ConnRequest {
        id,
        vm: "vm3".into(),
        src: Endpoint {
            cid: 3,
            port: 50000,
        },
        dst: Endpoint { cid: 2, port: 1234 },
        kind: SocketType::Stream,
        from_guest: true,
        peer: None,
    }
}

/// A host program's CONNECT with its identity, as the gate builds it.
fn host_req(id: u64) -> ConnRequest {
    ConnRequest {
        src: Endpoint { cid: 2, port: 1024 },
        dst: Endpoint { cid: 3, port: 1234 },
        from_guest: false,
        peer: Some(PeerIdentity {
            pid: 4242,
            uid: 1000,
            gid: 1000,
            cgroup: Some("/system.slice/agent.service".into()),
            security_label: None,
        }),
        ..req(id)
    }
}

/// Median of `rounds` runs of `iters` iterations, in ns per iteration.
fn bench(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    for i in 0..iters / 10 + 1 {
        f(i);
    }
    let mut per: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for i in 0..iters {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    per.sort_by(|a, b| a.partial_cmp(b).unwrap());
    per[per.len() / 2]
}

fn row(what: &str, ns: f64) {
    println!("| {what:<52} | {:>10.2} |", ns / 1000.0);
}

fn main() {
    let rt = PluginRuntime::new(RuntimeConfig::default()).expect("runtime");
    let rt_plain = PluginRuntime::new(RuntimeConfig {
        pooling: None,
        ..Default::default()
    })
    .expect("runtime");
    let load = |rt: &PluginRuntime, name: &str, cfg: &str| -> Plugin {
        let t = Instant::now();
        let p = rt
            .load_bytes(name, builtin::get(name).unwrap(), cfg)
            .unwrap();
        if std::ptr::eq(rt, &rt_plain) {
            eprintln!("compiled {name} in {:?}", t.elapsed());
        }
        p
    };
    let allow = load(&rt, "allow-group", "");
    let ports = load(&rt, "port-allowlist", "allow=2:1234,3:*;rate=1000000000");
    let audit = load(&rt, "audit", "");
    let peers = load(
        &rt,
        "peer-allowlist",
        "allow=uid=0:*,gid=5:22,cgroup=/system.slice/agent.service:1234",
    );
    let ports_v1 = load(&rt, "port-allowlist-v1", "allow=2:1234,3:*");

    println!("pooling allocator: {}", rt.pooling());
    println!("| {:<52} | {:>10} |", "operation", "us/op");
    println!("|{}|{}|", "-".repeat(54), "-".repeat(12));
    let n = 200_000;
    for (label, plugins) in [
        ("decide, 0 plugins", vec![]),
        ("decide, 1 plugin (allow-group)", vec![allow.clone()]),
        (
            "decide, 3 plugins (allow-group, port-allowlist, audit)",
            vec![allow.clone(), ports.clone(), audit.clone()],
        ),
    ] {
        let mut c = PolicyChain::new(&rt, "vm3", &plugins).unwrap();
        let r = req(1);
        row(
            label,
            bench(n, |_| {
                black_box(c.decide(black_box(&r)));
            }),
        );
    }
    for (label, plugins) in [
        (
            "decide host CONNECT with identity, 1 plugin (peer-allowlist)",
            vec![peers.clone()],
        ),
        (
            "decide host CONNECT with identity, 1 plugin (audit)",
            vec![audit.clone()],
        ),
        (
            "decide host CONNECT, 1 WIT 0.1.0 plugin (port-allowlist-v1)",
            vec![ports_v1.clone()],
        ),
    ] {
        let mut c = PolicyChain::new(&rt, "vm3", &plugins).unwrap();
        let r = host_req(1);
        assert_eq!(c.decide(&r), vhost_plug::plugin::Decision::Allow, "{label}");
        row(
            label,
            bench(n, |_| {
                black_box(c.decide(black_box(&r)));
            }),
        );
    }
    {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        row(
            "read a host peer's identity at accept (cred, pidfd, cgroup)",
            bench(20_000, |_| {
                black_box(vhost_plug::peer::PeerIdentity::of_socket(fd));
            }),
        );
    }
    {
        let mut c = PolicyChain::new(&rt, "vm3", std::slice::from_ref(&audit)).unwrap();
        let stats = ConnStats {
            bytes_to_guest: 1,
            bytes_from_guest: 2,
            duration_ms: 3,
            reset: false,
        };
        row(
            "on_close, 1 plugin (audit)",
            bench(n, |i| c.on_close(i, &stats)),
        );
        row(
            "export_state, audit (64 records)",
            bench(20_000, |_| {
                black_box(c.export_state().unwrap());
            }),
        );
    }
    for (label, rt) in [("pooling", &rt), ("on-demand", &rt_plain)] {
        let p = if label == "pooling" {
            allow.clone()
        } else {
            load(rt, "allow-group", "")
        };
        let three = [
            p.clone(),
            load(rt, "port-allowlist", "allow=2:*"),
            load(rt, "audit", ""),
        ];
        row(
            &format!("instantiate 1 plugin ({label})"),
            bench(2_000, |_| {
                black_box(PolicyChain::new(rt, "vm3", std::slice::from_ref(&p)).unwrap());
            }),
        );
        row(
            &format!("instantiate 3 plugins ({label})"),
            bench(1_000, |_| {
                black_box(PolicyChain::new(rt, "vm3", &three).unwrap());
            }),
        );
    }
    {
        let ser = load(&rt, "serializer-postcard", "");
        let mut s = Serializer::new(&rt, "vm3", &ser).unwrap();
        let st = DeviceState {
            guest_cid: 3,
            acked_features: 3,
            event_queue: EventQueueState {
                owner: EventQueueOwner::Backend,
                driver_live: true,
            },
            plugins: vec![],
            connections: (0..1000)
                .map(|i| Connection {
                    local_cid: 2,
                    local_port: 1024 + i,
                    peer_port: 1234,
                    kind: SocketType::Stream,
                    state: ConnState::Established,
                    credit: Credit {
                        rx_cnt: 1,
                        fwd_cnt: 1,
                        last_fwd_sent: 1,
                        tx_cnt: 1,
                        peer_buf_alloc: 1 << 18,
                        peer_fwd_cnt: 0,
                    },
                    peer_shutdown: ShutdownFlags::empty(),
                    local_shutdown: ShutdownFlags::empty(),
                    pending_to_guest: vec![],
                    pending_to_host: vec![7; (i % 7) as usize + 1],
                    fd_index: Some(i),
                    id: u64::from(i) + 1,
                    owed: OwedOps::empty(),
                    credit_requested: false,
                    bytes_to_guest: 0,
                    bytes_from_guest: u64::from(i % 7) + 1,
                })
                .collect(),
        };
        let blob = s.encode(&st).unwrap();
        row(
            "postcard encode, 1,000 connections (handover state)",
            bench(500, |_| {
                black_box(s.encode(&st).unwrap());
            }),
        );
        row(
            "postcard decode + validate, same",
            bench(500, |_| {
                black_box(s.decode(&blob).unwrap());
            }),
        );
        eprintln!("postcard blob for 1,000 connections: {} bytes", blob.len());
    }
    let t = Instant::now();
    let _ = rt_plain
        .load_bytes("x", builtin::SERIALIZER_JSON, "")
        .unwrap();
    eprintln!("compile serializer-json (137 KB): {:?}", t.elapsed());
    let _ = Duration::ZERO;
}
