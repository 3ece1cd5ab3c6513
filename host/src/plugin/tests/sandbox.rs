//! Fail closed: hostile plugins, deadlines, fuel, quarantine and chain order.
use super::*;

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
    allow.allow_vsock("1:22").unwrap();
    c.set_routes(RoutePolicy {
        allow: Arc::new(allow),
        siblings: Arc::new(|_: &ConnRequest, cid| cid == 4),
    });
    for (src_port, want) in [
        (1, "`..`"),
        (2, "sibling"),
        (3, "allow-route"),
        (4, "host vsock address 4:22 is not in"),
    ] {
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
