//! World detection, loading, specs, route allowlists, the compile cache and pooling.
use super::*;
use crate::blob;

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
    assert_eq!(info.world, "vhost-plug:plugin/serializer-plugin@0.3.0");
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
            matches!(bad.parse::<PluginSpec>(), Err(SpecError { .. })),
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
fn instances_beyond_the_pooling_default() {
    // On-demand allocation (the default) has no instance limit: 300 live instances are more
    // than the 256 a default pooling allocator would hold.
    let p = load("allow_group", "");
    let chains: Vec<PolicyChain> = (0..300)
        .map(|i| PolicyChain::new(rt(), &format!("vm{i}"), std::slice::from_ref(&p)).unwrap())
        .collect();
    assert_eq!(chains.len(), 300);
    assert!(!rt().pooling());
    // The pooling allocator stays available, with its fixed capacity.
    let pooled = PluginRuntime::new(RuntimeConfig {
        pooling: Some(PoolingLimits {
            component_instances: 4,
        }),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    assert!(pooled.pooling());
    let p = pooled
        .load_bytes("allow_group", &wasm("allow_group"), "")
        .expect("load");
    let held: Vec<PolicyChain> = (0..4)
        .map(|i| PolicyChain::new(&pooled, &format!("vm{i}"), std::slice::from_ref(&p)).unwrap())
        .collect();
    let over = PolicyChain::new(&pooled, "vm5", std::slice::from_ref(&p));
    match over {
        Err(PluginError::Call { .. }) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a fifth instance fit in a pool of four"),
    }
    drop(held);
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
