//! Tests against the real plugins built by build.rs (plugins/ and examples/).
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::types::*;
use super::*;

fn wasm(name: &str) -> Vec<u8> {
    let p = PathBuf::from(builtin::BUILD_DIR).join(format!("{name}.wasm"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Shared runtime. Its deadline is generous so that a test thread descheduled on a loaded CI
/// machine does not turn a legitimate call into a deadline failure; `deadline_is_near_configured`
/// checks a short deadline on its own runtime.
fn rt() -> &'static PluginRuntime {
    static RT: OnceLock<PluginRuntime> = OnceLock::new();
    RT.get_or_init(|| {
        PluginRuntime::new(RuntimeConfig {
            call_deadline: Duration::from_millis(250),
            ..RuntimeConfig::default()
        })
        .expect("runtime")
    })
}

fn load(name: &str, config: &str) -> Plugin {
    rt().load_bytes(name, &wasm(name), config).expect("load")
}

fn chain(names: &[(&str, &str)]) -> PolicyChain {
    let plugins: Vec<Plugin> = names.iter().map(|(n, c)| load(n, c)).collect();
    PolicyChain::new(rt(), "vm3", &plugins).expect("chain")
}

fn req(id: u64, cid: u64, port: u32) -> ConnRequest {
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
    }
}

fn denied(d: &Decision) -> (String, bool) {
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
    assert_eq!(st.schema, 1);
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

/// A hostile plugin misbehaving on port 666 fails closed with `kind`, the next call is served by
/// a fresh instance, and another VM's chain is unaffected.
fn fails_closed(name: &str, kind: FailureKind) {
    let mut c = chain(&[(name, "")]);
    let mut other = chain(&[("allow_group", "")]);
    let t0 = Instant::now();
    let d = c.decide(&req(1, 2, 666));
    let took = t0.elapsed();
    let (reason, failure) = denied(&d);
    assert!(failure, "{name}: {reason}");
    assert!(reason.contains(&kind.to_string()), "{name}: {reason}");
    assert!(reason.len() < 1024, "{name}: reason {} bytes", reason.len());
    assert!(took < Duration::from_secs(2), "{name}: took {took:?}");
    assert_eq!(
        c.decide(&req(2, 2, 80)),
        Decision::Allow,
        "{name}: next call"
    );
    assert_eq!(other.decide(&req(3, 2, 666)), Decision::Allow);
    let s = c.stats()[0].1;
    // A wasm-level failure drops the instance; a malformed answer leaves it usable.
    let inst = if kind == FailureKind::Malformed { 1 } else { 2 };
    assert_eq!(
        (s.calls, s.failures, s.denials, s.instantiations),
        (2, 1, 1, inst),
        "{name}"
    );
}

#[test]
fn hostile_loop_hits_deadline() {
    fails_closed("hostile_loop", FailureKind::Deadline);
}

#[test]
fn hostile_sleep_is_cut_off() {
    fails_closed("hostile_sleep", FailureKind::Trap);
    let mut c = chain(&[("hostile_sleep", "")]);
    let (reason, _) = denied(&c.decide(&req(1, 2, 666)));
    assert!(reason.contains("plugins may not wait"), "{reason}");
}

#[test]
fn hostile_trap_fails_closed() {
    fails_closed("hostile_trap", FailureKind::Trap);
}

#[test]
fn hostile_alloc_hits_memory_limit() {
    fails_closed("hostile_alloc", FailureKind::MemoryLimit);
}

#[test]
fn hostile_huge_deny_is_malformed() {
    fails_closed("hostile_huge_deny", FailureKind::Malformed);
}

#[test]
fn hostile_redirects_outside_allowlist() {
    let mut c = chain(&[("hostile_bad_redirect", "")]);
    let mut allow = RouteAllowlist::new();
    allow.allow_unix_dir("/run/vhost-plug").unwrap();
    allow.allow_tcp("127.0.0.1:*").unwrap();
    c.set_routes(RoutePolicy {
        allow: Arc::new(allow),
        siblings: Arc::new(|_: &ConnRequest, cid| cid == 4),
    });
    for (src_port, want) in [(1, "`..`"), (2, "sibling"), (3, "allow-route")] {
        let mut r = req(src_port as u64, 2, 666);
        r.src.port = src_port;
        let (reason, failure) = denied(&c.decide(&r));
        assert!(
            failure && reason.contains("malformed") && reason.contains(want),
            "{reason}"
        );
    }
}

#[test]
fn deadline_is_near_configured() {
    let rt = PluginRuntime::new(RuntimeConfig {
        call_deadline: Duration::from_millis(20),
        // The wall-clock backstop alone: no CPU budget.
        call_fuel: u64::MAX,
        ..Default::default()
    })
    .unwrap();
    let p = rt.load_bytes("loop", &wasm("hostile_loop"), "").unwrap();
    let mut c = PolicyChain::new(&rt, "vm3", &[p]).unwrap();
    let t0 = Instant::now();
    denied(&c.decide(&req(1, 2, 666)));
    let t = t0.elapsed();
    assert!(
        t >= Duration::from_millis(19) && t < Duration::from_millis(500),
        "{t:?}"
    );
}

/// The CPU budget stops an endless loop however long the wall clock allows; the time it
/// takes is printed (it calibrates `DEFAULT_CALL_FUEL`).
#[test]
fn fuel_budget_stops_a_loop() {
    let rt = PluginRuntime::new(RuntimeConfig {
        call_deadline: Duration::from_secs(60),
        ..Default::default()
    })
    .unwrap();
    let p = rt.load_bytes("loop", &wasm("hostile_loop"), "").unwrap();
    let mut c = PolicyChain::new(&rt, "vm3", &[p]).unwrap();
    let t0 = Instant::now();
    let (reason, failure) = denied(&c.decide(&req(1, 2, 666)));
    let t = t0.elapsed();
    assert!(failure && reason.contains("CPU budget used up"), "{reason}");
    eprintln!(
        "[fuel] {} fuel of an endless loop took {t:?}",
        crate::plugin::DEFAULT_CALL_FUEL
    );
    assert_eq!(c.decide(&req(2, 2, 80)), Decision::Allow);
}

#[test]
fn quarantine_after_consecutive_failures_until_replaced() {
    let mut c = chain(&[("hostile_trap", "")]);
    for i in 0..5 {
        assert!(denied(&c.decide(&req(i, 2, 666))).1);
    }
    let (reason, failure) = denied(&c.decide(&req(9, 2, 80)));
    assert!(failure && reason.contains("quarantined"), "{reason}");
    let s = c.stats()[0].1;
    assert!(s.quarantined);
    assert_eq!((s.failures, s.quarantine_refusals), (5, 1));
    c.replace("hostile_trap", load("allow_group", "")).unwrap();
    assert_eq!(c.decide(&req(10, 2, 666)), Decision::Allow);
}

#[test]
fn success_resets_consecutive_failures() {
    let mut c = chain(&[("hostile_trap", "")]);
    for i in 0..20 {
        let port = if i % 2 == 0 { 666 } else { 80 };
        c.decide(&req(i, 2, port));
    }
    assert!(!c.stats()[0].1.quarantined);
    assert_eq!(c.decide(&req(99, 2, 80)), Decision::Allow);
}

#[test]
fn chain_order_first_deny_then_first_redirect() {
    let mut allow = RouteAllowlist::new();
    allow.allow_tcp("evil.example.com:22").unwrap();
    let routes = RoutePolicy {
        allow: Arc::new(allow),
        siblings: Arc::new(NoSiblings),
    };
    let mut c = chain(&[("hostile_bad_redirect", ""), ("allow_group", "")]);
    c.set_routes(routes.clone());
    let mut r = req(1, 2, 666);
    r.src.port = 3;
    assert_eq!(
        c.decide(&r),
        Decision::Redirect {
            plugin: "hostile_bad_redirect".into(),
            route: Route::Tcp("evil.example.com:22".into())
        }
    );
    let mut c = chain(&[
        ("hostile_bad_redirect", ""),
        ("port_allowlist", "allow=2:1"),
    ]);
    c.set_routes(routes);
    let d = c.decide(&r);
    assert!(
        matches!(&d, Decision::Deny { plugin, failure: false, .. } if plugin == "port_allowlist"),
        "{d:?}"
    );
    // First deny wins: later plugins are not called.
    let mut c = chain(&[("port_allowlist", "allow=2:1"), ("audit", "")]);
    denied(&c.decide(&req(1, 2, 5)));
    assert_eq!(c.stats()[1].1.calls, 0);
}

#[test]
fn check_reports_worlds() {
    assert_eq!(
        rt().check(&wasm("allow_group")).unwrap().kind,
        PluginKind::Policy
    );
    assert_eq!(
        rt().check(&wasm("tcp_bridge")).unwrap().kind,
        PluginKind::Bridge
    );
    let info = rt().check(&wasm("serializer_json")).unwrap();
    assert_eq!(info.kind, PluginKind::Serializer);
    assert_eq!(info.world, "vhost-plug:plugin/serializer-plugin@0.1.0");
    assert!(info.wasi_imports.iter().all(|i| i.starts_with("wasi:")));
    assert!(
        !info
            .imports
            .iter()
            .any(|i| i.starts_with("wasi:filesystem") || i.starts_with("wasi:sockets")),
        "{:?}",
        info.imports
    );
    assert_eq!(info.sha256.len(), 64);
}

#[test]
fn check_wrong_world_says_what_is_wrong() {
    let err = check(&wasm("hostile_wrong_world")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::NotAPlugin { .. }), "{msg}");
    assert!(msg.contains("policy-plugin"), "{msg}");
    assert!(msg.contains("does not have export `on-close`"), "{msg}");
}

#[test]
fn check_policy_without_stateful_names_the_missing_export() {
    let err = check(&wasm("hostile_no_stateful")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::NotAPlugin { .. }), "{msg}");
    assert!(
        msg.contains(
            "policy-plugin@0.1.0 world: missing export `vhost-plug:plugin/stateful@0.1.0`"
        ),
        "{msg}"
    );
}

#[test]
fn check_garbage_and_core_modules() {
    assert!(matches!(
        check(b"not wasm at all"),
        Err(PluginError::Compile(_))
    ));
    // A core module (not a component).
    let core = [0u8, b'a', b's', b'm', 1, 0, 0, 0];
    assert!(matches!(check(&core), Err(PluginError::Compile(_))));
}

#[test]
fn load_checks_kind() {
    let spec: PluginSpec = format!("policy={}/tcp_bridge.wasm", builtin::BUILD_DIR)
        .parse()
        .unwrap();
    match rt().load(&spec) {
        Err(PluginError::WrongKind {
            expected, actual, ..
        }) => {
            assert_eq!((expected, actual), (PluginKind::Policy, PluginKind::Bridge))
        }
        other => panic!("{other:?}"),
    }
    let p = rt()
        .load(
            &"bridge=builtin:tcp-bridge,config=map=1=a:1"
                .parse()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(p.name(), "tcp-bridge");
    assert!(matches!(
        rt().load(&"policy=builtin:nope".parse().unwrap()),
        Err(PluginError::UnknownBuiltin(_))
    ));
    assert!(matches!(
        rt().load(&"policy=/nonexistent.wasm".parse().unwrap()),
        Err(PluginError::Io { .. })
    ));
}

#[test]
fn builtins_and_defaults_load() {
    for name in builtin::NAMES {
        let p = rt()
            .load_bytes(name, builtin::get(name).unwrap(), "")
            .unwrap();
        assert_eq!(p.name(), *name);
    }
    let kinds: Vec<PluginKind> = PluginSpec::defaults()
        .iter()
        .map(|s| rt().load(s).unwrap().kind())
        .collect();
    assert_eq!(kinds, vec![PluginKind::Policy, PluginKind::Serializer]);
}

#[test]
fn spec_parsing() {
    let s: PluginSpec = "policy=/x/y/port_allowlist.wasm,name=pa,config=allow=2:1234,3:*"
        .parse()
        .unwrap();
    assert_eq!(s.kind, PluginKind::Policy);
    assert_eq!(
        s.source,
        PluginSource::Path("/x/y/port_allowlist.wasm".into())
    );
    assert_eq!(s.name(), "pa");
    assert_eq!(s.config, "allow=2:1234,3:*");
    let s: PluginSpec = "serializer=builtin:serializer-json".parse().unwrap();
    assert_eq!(
        (s.name(), s.config.as_str()),
        ("serializer-json".to_string(), "")
    );
    let s: PluginSpec = "bridge=/p/tcp_bridge.wasm".parse().unwrap();
    assert_eq!(s.name(), "tcp-bridge");
    for bad in [
        "",
        "policy",
        "policy=",
        "filter=/a.wasm",
        "policy=/a.wasm,colour=red",
    ] {
        assert!(
            matches!(bad.parse::<PluginSpec>(), Err(PluginError::Spec { .. })),
            "{bad}"
        );
    }
}

#[test]
fn route_allowlist() {
    let mut a = RouteAllowlist::new();
    a.allow_unix_dir("/run/vsock/").unwrap();
    a.allow_tcp("127.0.0.1:8080").unwrap();
    a.allow_tcp("DB.internal:*").unwrap();
    assert!(a.allow_unix_dir("relative").is_err());
    assert!(a.allow_tcp("nohost").is_err());
    let r = req(1, 2, 1);
    let sib = |_: &ConnRequest, cid: u64| cid == 5;
    let ok = |route: Route| a.check(&r, &route, &sib);
    assert_eq!(ok(Route::Default), Ok(()));
    assert_eq!(ok(Route::UnixSocket("/run/vsock/a.sock".into())), Ok(()));
    assert_eq!(ok(Route::UnixSocket("/run//vsock/./sub/b".into())), Ok(()));
    assert!(matches!(
        ok(Route::UnixSocket("/run/vsock/../shadow".into())),
        Err(RouteError::DotDot(_))
    ));
    assert!(matches!(
        ok(Route::UnixSocket("/run/vsock/a/../../x".into())),
        Err(RouteError::DotDot(_))
    ));
    assert!(matches!(
        ok(Route::UnixSocket("/run/vsock".into())),
        Err(RouteError::UnixNotAllowed(_))
    ));
    assert!(matches!(
        ok(Route::UnixSocket("/run/vsockx/a".into())),
        Err(RouteError::UnixNotAllowed(_))
    ));
    assert!(matches!(
        ok(Route::UnixSocket("run/vsock/a".into())),
        Err(RouteError::NotAbsolute(_))
    ));
    assert!(matches!(
        ok(Route::UnixSocket(format!("/run/vsock/{}", "a".repeat(200)))),
        Err(RouteError::BadPath(_))
    ));
    assert_eq!(ok(Route::Tcp("127.0.0.1:8080".into())), Ok(()));
    assert_eq!(ok(Route::Tcp("db.INTERNAL:5432".into())), Ok(()));
    assert!(matches!(
        ok(Route::Tcp("127.0.0.1:8081".into())),
        Err(RouteError::TcpNotAllowed(_))
    ));
    assert!(matches!(
        ok(Route::Tcp("127.0.0.1".into())),
        Err(RouteError::BadTcp(_))
    ));
    assert!(matches!(
        ok(Route::Tcp("db.internal:*".into())),
        Err(RouteError::BadTcp(_))
    ));
    assert!(matches!(
        ok(Route::Tcp("a b:1".into())),
        Err(RouteError::BadTcp(_))
    ));
    assert_eq!(ok(Route::Vsock(Endpoint { cid: 5, port: 1 })), Ok(()));
    assert!(matches!(
        ok(Route::Vsock(Endpoint { cid: 6, port: 1 })),
        Err(RouteError::NotSibling(6))
    ));
    assert!(matches!(
        ok(Route::Vsock(Endpoint { cid: 2, port: 1 })),
        Err(RouteError::ReservedCid(2))
    ));
    assert!(matches!(
        ok(Route::Vsock(Endpoint {
            cid: u32::MAX as u64,
            port: 1
        })),
        Err(RouteError::ReservedCid(_))
    ));
    // Empty allowlist: only the default route.
    let none = RouteAllowlist::new();
    assert!(none
        .check(&r, &Route::Tcp("127.0.0.1:8080".into()), &NoSiblings)
        .is_err());
}

#[test]
fn precompiled_cache() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("vhost-plug-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = PluginRuntime::new(RuntimeConfig {
        cache_dir: Some(dir.clone()),
        pooling: None,
        ..Default::default()
    })
    .unwrap();
    let bytes = wasm("allow_group");
    rt.load_bytes("a", &bytes, "").unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Second load comes from the artifact and works.
    let p = rt.load_bytes("a", &bytes, "").unwrap();
    let mut c = PolicyChain::new(&rt, "vm", &[p]).unwrap();
    assert_eq!(c.decide(&req(1, 2, 3)), Decision::Allow);
    // A group-writable artifact is refused.
    std::fs::set_permissions(&files[0], std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(matches!(
        rt.load_bytes("a", &bytes, ""),
        Err(PluginError::Cache { .. })
    ));
    // Precompile matches what the engine accepts.
    assert!(!rt.precompile(&bytes).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn many_instances_with_pooling() {
    let p = load("allow_group", "");
    let chains: Vec<PolicyChain> = (0..50)
        .map(|i| PolicyChain::new(rt(), &format!("vm{i}"), std::slice::from_ref(&p)).unwrap())
        .collect();
    assert_eq!(chains.len(), 50);
    assert!(rt().pooling());
}

#[test]
fn other_instances_run_while_one_spins() {
    let mut spinning = chain(&[("hostile_loop", "")]);
    let t = std::thread::spawn(move || spinning.decide(&req(1, 2, 666)));
    let mut c = chain(&[("allow_group", "")]);
    let t0 = Instant::now();
    for i in 0..100 {
        assert_eq!(c.decide(&req(i, 2, 80)), Decision::Allow);
    }
    let took = t0.elapsed();
    assert!(denied(&t.join().unwrap()).1);
    assert!(took < Duration::from_millis(200), "{took:?}");
}

#[test]
fn serializer_output_framed_for_transfer() {
    let mut s = Serializer::new(rt(), "vm3", &load("serializer_postcard", "")).unwrap();
    let payload = s.encode(&sample_state()).unwrap();
    let framed = blob::wrap(s.name(), &payload).unwrap();
    let (name, payload) = blob::unwrap(&framed).unwrap();
    assert_eq!(name, "serializer_postcard");
    assert_eq!(s.decode(payload).unwrap(), sample_state());
}

#[test]
fn idle_ticker_parks_and_wakes_for_the_next_call() {
    let rt = PluginRuntime::new(RuntimeConfig {
        call_deadline: Duration::from_millis(50),
        call_fuel: u64::MAX,
        pooling: None,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let p = rt
        .load_bytes("hostile_loop", &wasm("hostile_loop"), "")
        .expect("load");
    let mut c = PolicyChain::new(&rt, "vm3", &[p]).expect("chain");
    // No call for a while: the ticker stops waking up.
    let t0 = Instant::now();
    while !rt.shared.ticker_parked() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "ticker never parked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next call wakes it, so an endless loop still meets its deadline.
    let (reason, failure) = denied(&c.decide(&req(1, 2, 666)));
    assert!(
        failure && reason.contains(&FailureKind::Deadline.to_string()),
        "{reason}"
    );
    assert_eq!(c.decide(&req(2, 2, 80)), Decision::Allow);
}
