//! Tests against the real plugins built by build.rs (plugins/ and examples/).
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::types::*;
use super::*;

pub(super) fn wasm(name: &str) -> Vec<u8> {
    let p = PathBuf::from(builtin::BUILD_DIR).join(format!("{name}.wasm"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Shared runtime. Its deadline is generous so that a test thread descheduled on a loaded CI
/// machine does not turn a legitimate call into a deadline failure; `deadline_is_near_configured`
/// checks a short deadline on its own runtime.
pub(super) fn rt() -> &'static PluginRuntime {
    static RT: OnceLock<PluginRuntime> = OnceLock::new();
    RT.get_or_init(|| {
        PluginRuntime::new(RuntimeConfig {
            call_deadline: Duration::from_millis(250),
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

pub(super) fn load(name: &str, config: &str) -> Plugin {
    rt().load_bytes(name, &wasm(name), config).expect("load")
}

pub(super) fn chain(names: &[(&str, &str)]) -> PolicyChain {
    let plugins: Vec<Plugin> = names.iter().map(|(n, c)| load(n, c)).collect();
    PolicyChain::new(rt(), "vm3", &plugins).expect("chain")
}

pub(super) fn req(id: u64, cid: u64, port: u32) -> ConnRequest {
    ConnRequest {
        id,
        vm: "vm3".into(),
        src: Endpoint {
            cid: 3,
            port: 50000,
        },
        dst: Endpoint { cid, port },
        kind: SocketType::Stream,
        from_guest: true,
        peer: None,
    }
}

pub(super) fn denied(d: &Decision) -> (String, bool) {
    match d {
        Decision::Deny {
            reason, failure, ..
        } => (reason.clone(), *failure),
        other => panic!("expected deny, got {other:?}"),
    }
}

/// Parse a port-allowlist state body: (key, hits) pairs (+ buckets for schema 2).
fn counters(st: &PluginState) -> Vec<(String, u64)> {
    let d = &st.data;
    let mut at = 0;
    let u32_ = |at: &mut usize| {
        let v = u32::from_le_bytes(d[*at..*at + 4].try_into().unwrap());
        *at += 4;
        v
    };
    let n = u32_(&mut at);
    let mut out = Vec::new();
    for _ in 0..n {
        let len = u32_(&mut at) as usize;
        let key = String::from_utf8(d[at..at + len].to_vec()).unwrap();
        at += len;
        let hits = u64::from_le_bytes(d[at..at + 8].try_into().unwrap());
        at += 8;
        out.push((key, hits));
    }
    out
}

#[test]
fn allow_group_allows_everything() {
    let mut c = chain(&[("allow_group", "")]);
    for port in [1, 22, 1234, u32::MAX] {
        assert_eq!(c.decide(&req(port as u64, 2, port)), Decision::Allow);
    }
    let st = c.export_state().unwrap();
    assert_eq!(st[0].state.data.len(), 0);
    // export-state is a call too.
    assert_eq!(c.stats()[0].1.calls, 5);
}

#[test]
fn empty_chain_allows() {
    let mut c = PolicyChain::new(rt(), "vm3", &[]).unwrap();
    assert_eq!(c.decide(&req(1, 2, 22)), Decision::Allow);
}

#[test]
fn port_allowlist_v1_rules() {
    let mut c = chain(&[("port_allowlist_v1", "allow=2:1234,3:*")]);
    assert_eq!(c.decide(&req(1, 2, 1234)), Decision::Allow);
    assert_eq!(c.decide(&req(2, 3, 7)), Decision::Allow);
    let (reason, failure) = denied(&c.decide(&req(3, 2, 80)));
    assert!(reason.contains("2:80 not allowed"), "{reason}");
    assert!(!failure);
    let st = c.export_state().unwrap().remove(0).state;
    assert_eq!(st.schema, 1);
    assert_eq!(counters(&st), vec![("2:1234".into(), 1), ("3:*".into(), 1)]);
    let s = c.stats()[0].1;
    assert_eq!((s.calls, s.denials, s.failures), (4, 1, 0));
    assert!(s.max_call_ns > 0 && s.total_call_ns >= s.max_call_ns);
}

#[test]
fn port_allowlist_bad_config_denies() {
    let mut c = chain(&[("port_allowlist", "allow=2:x")]);
    let (reason, failure) = denied(&c.decide(&req(1, 2, 1234)));
    assert!(reason.contains("bad config"), "{reason}");
    assert!(!failure);
}

#[test]
fn port_allowlist_v2_rate_limit() {
    let mut c = chain(&[("port_allowlist", "allow=2:*;rate=1;burst=3")]);
    for i in 0..3 {
        assert_eq!(c.decide(&req(i, 2, 1234)), Decision::Allow, "call {i}");
    }
    let (reason, _) = denied(&c.decide(&req(9, 2, 1234)));
    assert!(reason.contains("rate limit"), "{reason}");
    // Rule misses are denied before the bucket is touched.
    let (reason, _) = denied(&c.decide(&req(10, 3, 1)));
    assert!(reason.contains("not allowed"), "{reason}");
}

#[test]
fn v1_state_imports_into_v2_with_counters() {
    let cfg = "allow=2:1234,3:*";
    let mut v1 = chain(&[("port_allowlist_v1", cfg)]);
    for i in 0..5 {
        v1.decide(&req(i, 2, 1234));
    }
    v1.decide(&req(9, 3, 22));
    let saved = v1.export_state().unwrap();
    assert_eq!(saved[0].state.schema, 1);

    // Same name in both chains ("port-allowlist"), as after an upgrade.
    let p2 = rt()
        .load_bytes(
            "port-allowlist",
            &wasm("port_allowlist"),
            &format!("{cfg};rate=100"),
        )
        .unwrap();
    let mut v2 = PolicyChain::new(rt(), "vm3", &[p2]).unwrap();
    let named = vec![NamedPluginState {
        name: "port-allowlist".into(),
        state: saved[0].state.clone(),
    }];
    v2.import_state(&named).unwrap();
    v2.decide(&req(10, 2, 1234));
    let st = v2.export_state().unwrap().remove(0).state;
    assert_eq!(st.schema, 2);
    assert_eq!(counters(&st), vec![("2:1234".into(), 6), ("3:*".into(), 1)]);
}

#[test]
fn v2_state_refused_by_v1() {
    let mut v2 = chain(&[("port_allowlist", "allow=2:1234;rate=10")]);
    v2.decide(&req(1, 2, 1234));
    let st = v2.export_state().unwrap();
    let mut v1 = chain(&[("port_allowlist_v1", "allow=2:1234")]);
    v1.decide(&req(1, 2, 1234));
    let renamed = vec![NamedPluginState {
        name: "port_allowlist_v1".into(),
        state: st[0].state.clone(),
    }];
    match v1.import_state(&renamed) {
        Err(PluginError::Refused { message, .. }) => {
            assert!(message.contains("schema 2"), "{message}")
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    // The refusal is an answer, not a failure, and v1 kept its own counters.
    assert_eq!(v1.stats()[0].1.failures, 0);
    assert_eq!(
        counters(&v1.export_state().unwrap()[0].state),
        vec![("2:1234".into(), 1)]
    );
}

#[test]
fn in_place_swap_carries_state() {
    let cfg = "allow=2:1234";
    let mut c = chain(&[("allow_group", ""), ("port_allowlist_v1", cfg)]);
    for i in 0..3 {
        c.decide(&req(i, 2, 1234));
    }
    let v2 = load("port_allowlist", cfg);
    c.replace("port_allowlist_v1", v2).unwrap();
    assert_eq!(c.names(), vec!["allow_group", "port_allowlist"]);
    c.decide(&req(4, 2, 1234));
    let st = c.export_state().unwrap();
    assert_eq!(st[1].state.schema, 2);
    assert_eq!(counters(&st[1].state), vec![("2:1234".into(), 4)]);
    // Downgrade is refused and leaves the chain unchanged.
    let v1 = load("port_allowlist_v1", cfg);
    assert!(matches!(
        c.replace("port_allowlist", v1),
        Err(PluginError::Refused { .. })
    ));
    assert_eq!(c.names(), vec!["allow_group", "port_allowlist"]);
}

fn tcp_routes() -> RoutePolicy {
    let mut allow = RouteAllowlist::new();
    allow.allow_tcp("127.0.0.1:8080").unwrap();
    RoutePolicy {
        allow: Arc::new(allow),
        siblings: Arc::new(NoSiblings),
    }
}

#[test]
fn tcp_bridge_routes_and_refuses() {
    let p = load("tcp_bridge", "map=1234=127.0.0.1:8080,22=10.0.0.1:22");
    let mut b = Bridge::new(rt(), "vm3", &p, tcp_routes()).unwrap();
    assert_eq!(
        b.route(&req(1, 2, 1234)).unwrap(),
        Route::Tcp("127.0.0.1:8080".into())
    );
    match b.route(&req(2, 2, 5)) {
        Err(PluginError::Refused { message, .. }) => {
            assert!(message.contains("no mapping"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // A mapping outside the operator's allowlist fails closed.
    match b.route(&req(3, 2, 22)) {
        Err(PluginError::Call {
            kind: FailureKind::Malformed,
            detail,
            ..
        }) => {
            assert!(detail.contains("allow-route"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    let st = b.export_state().unwrap();
    assert_eq!(st.schema, 1);
    let s = b.stats();
    assert_eq!((s.calls, s.denials, s.failures), (4, 2, 1));
    // State round trip into a fresh instance.
    let mut b2 = Bridge::new(rt(), "vm3", &p, tcp_routes()).unwrap();
    b2.import_state(&st).unwrap();
    assert_eq!(b2.export_state().unwrap(), st);
}

#[test]
fn audit_records_closes() {
    let mut c = chain(&[("audit", "")]);
    assert_eq!(c.decide(&req(7, 2, 1234)), Decision::Allow);
    c.on_close(
        7,
        &ConnStats {
            bytes_to_guest: 100,
            bytes_from_guest: 5,
            duration_ms: 42,
            reset: false,
        },
    );
    c.on_close(
        8,
        &ConnStats {
            bytes_to_guest: 1,
            bytes_from_guest: 2,
            duration_ms: 3,
            reset: true,
        },
    );
    let st = c.export_state().unwrap().remove(0).state;
    assert_eq!(st.schema, 2);
    let u64_at = |i: usize| u64::from_le_bytes(st.data[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!((u64_at(0), u64_at(1), u64_at(2), u64_at(3)), (2, 1, 101, 7));
    // Carried into a new instance (e.g. after migration).
    let mut c2 = chain(&[("audit", "")]);
    c2.import_state(&[NamedPluginState {
        name: "audit".into(),
        state: st.clone(),
    }])
    .unwrap();
    assert_eq!(c2.export_state().unwrap()[0].state, st);
}

#[test]
fn example_deny_ports() {
    let mut c = chain(&[("deny_ports", "deny=22,23")]);
    assert_eq!(c.decide(&req(1, 2, 80)), Decision::Allow);
    let (reason, _) = denied(&c.decide(&req(2, 2, 22)));
    assert!(reason.contains("port 22"), "{reason}");
}

fn sample_state() -> DeviceState {
    DeviceState {
        guest_cid: 3,
        acked_features: 1 << 32 | 2,
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
        connections: vec![Connection {
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
            owed: OwedOps::RESPONSE | OwedOps::CREDIT_UPDATE,
            credit_requested: true,
            bytes_to_guest: 1 << 40,
            bytes_from_guest: 12345,
        }],
    }
}

#[test]
fn serializers_round_trip() {
    let st = sample_state();
    for name in ["serializer_postcard", "serializer_json"] {
        let mut s = Serializer::new(rt(), "vm3", &load(name, "")).unwrap();
        let blob = s.encode(&st).unwrap();
        assert_eq!(s.decode(&blob).unwrap(), st, "{name}");
        assert!(
            matches!(s.decode(b"garbage"), Err(PluginError::Refused { .. })),
            "{name}"
        );
        if name == "serializer_json" {
            let text = String::from_utf8(blob.clone()).unwrap();
            assert!(
                text.contains("\"guest_cid\": 3") && text.contains("68656c6c6f"),
                "{text}"
            );
        } else {
            assert!(blob.len() < 96, "postcard blob is {} bytes", blob.len());
            let mut newer = blob.clone();
            newer[4] = 2;
            match s.decode(&newer) {
                Err(PluginError::Refused { message, .. }) => {
                    assert!(message.contains("schema 2"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

/// A serializer built against WIT 0.1.0 loads, reports its version, round-trips a device
/// state (connection table included) through the converted bindings, and writes the same
/// bytes as its current build: each reads the other's blobs.
#[test]
fn serializer_built_against_0_1_0_round_trips() {
    let st = sample_state();
    let v1_plugin = load("serializer_postcard_v1", "");
    assert_eq!(v1_plugin.info().version, WitVersion::V0_1);
    let mut v1 = Serializer::new(rt(), "vm3", &v1_plugin).unwrap();
    let blob = v1.encode(&st).unwrap();
    assert_eq!(v1.decode(&blob).unwrap(), st);
    assert!(matches!(
        v1.decode(b"garbage"),
        Err(PluginError::Refused { .. })
    ));
    let mut v2 = Serializer::new(rt(), "vm3", &load("serializer_postcard", "")).unwrap();
    assert_eq!(v2.encode(&st).unwrap(), blob);
    assert_eq!(v2.decode(&blob).unwrap(), st);
    let mut bad = sample_state();
    bad.guest_cid = 2;
    let blob = v1.encode(&bad).unwrap();
    assert!(matches!(
        v1.decode(&blob),
        Err(PluginError::InvalidState(_))
    ));
}

#[test]
fn decoded_state_is_validated() {
    let mut s = Serializer::new(rt(), "vm3", &load("serializer_postcard", "")).unwrap();
    let mut bad = sample_state();
    bad.guest_cid = 2;
    let blob = s.encode(&bad).unwrap();
    assert!(matches!(s.decode(&blob), Err(PluginError::InvalidState(_))));
    let mut bad = sample_state();
    bad.connections[0].fd_index = Some(5);
    let blob = s.encode(&bad).unwrap();
    assert!(matches!(s.decode(&blob), Err(PluginError::InvalidState(_))));
}

mod runtime;
mod sandbox;
