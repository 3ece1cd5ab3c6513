//! `host-vsock` routes (WIT 0.3.0): checked against the operator's `vsock:CID:PORT` entries,
//! never taken for a sibling VM, and bridge plugins of WIT 0.2.0 keep loading beside them.
use std::sync::Arc;

use super::tests::{load, req, rt};
use super::types::*;
use super::*;

fn host_vsock(cid: u64, port: u32) -> Route {
    Route::HostVsock(Endpoint { cid, port })
}

/// Every CID is a sibling: proves a `host-vsock` route never passes as one.
fn all_siblings(_: &ConnRequest, _: u64) -> bool {
    true
}

fn vsock_routes(entries: &[&str]) -> RouteAllowlist {
    let mut allow = RouteAllowlist::new();
    for e in entries {
        allow.allow_vsock(e).expect("entry");
    }
    allow
}

#[test]
fn host_vsock_routes_need_a_listed_address() {
    let allow = vsock_routes(&["1:5201", "16:*"]);
    let r = req(1, 2, 7001);
    let check = |route: &Route| allow.check(&r, route, &all_siblings);
    assert_eq!(check(&host_vsock(1, 5201)), Ok(()));
    assert_eq!(check(&host_vsock(16, 9)), Ok(()));
    assert_eq!(
        check(&host_vsock(1, 5203)),
        Err(RouteError::VsockNotAllowed(1, 5203))
    );
    // A sibling's CID is another namespace: the group check does not admit a host address.
    assert_eq!(
        check(&host_vsock(5, 5201)),
        Err(RouteError::VsockNotAllowed(5, 5201))
    );
    // And a host entry does not admit a sibling route to the same number.
    assert_eq!(
        check(&Route::Vsock(Endpoint { cid: 1, port: 5201 })),
        Err(RouteError::ReservedCid(1))
    );
    assert_eq!(
        allow.check(
            &r,
            &Route::Vsock(Endpoint { cid: 16, port: 9 }),
            &NoSiblings
        ),
        Err(RouteError::NotSibling(16))
    );
    // Malformed: wider than the kernel's 32-bit CID, or the "any" port.
    let wide = u64::from(u32::MAX) + 2;
    assert_eq!(
        check(&host_vsock(wide, 5201)),
        Err(RouteError::VsockNotAllowed(wide, 5201))
    );
    assert!(matches!(
        check(&host_vsock(16, u32::MAX)),
        Err(RouteError::BadVsock(_))
    ));
    // Without entries nothing is reachable.
    assert!(RouteAllowlist::new()
        .check(&r, &host_vsock(1, 5201), &NoSiblings)
        .is_err());
}

#[test]
fn tcp_bridge_routes_to_listed_host_vsock_addresses_only() {
    let routes = RoutePolicy {
        allow: Arc::new(vsock_routes(&["1:5201", "1:5202"])),
        siblings: Arc::new(all_siblings),
    };
    let p = load(
        "tcp_bridge",
        "map=7001=vsock:1:5201,7002=vsock:1:5202,7003=vsock:1:5203",
    );
    let mut b = Bridge::new(rt(), "vm3", &p, routes.clone()).unwrap();
    assert_eq!(b.route(&req(1, 2, 7001)).unwrap(), host_vsock(1, 5201));
    assert_eq!(b.route(&req(2, 2, 7002)).unwrap(), host_vsock(1, 5202));
    match b.route(&req(3, 2, 7003)) {
        Err(PluginError::Call {
            kind: FailureKind::Malformed,
            detail,
            ..
        }) => assert!(detail.contains("not in the --allow-route list"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // A malformed map entry refuses every connection with the reason.
    for cfg in [
        "map=7001=vsock:1",
        "map=7001=vsock:x:5",
        "map=7001=vsock:1:",
        "map=7001=vsock:4294967296:1",
    ] {
        let bad = load("tcp_bridge", cfg);
        let mut b = Bridge::new(rt(), "vm3", &bad, routes.clone()).unwrap();
        match b.route(&req(4, 2, 7001)) {
            Err(PluginError::Refused { message, .. }) => {
                assert!(message.contains("vsock:CID:PORT"), "{cfg}: {message}")
            }
            other => panic!("{cfg}: {other:?}"),
        }
    }
}

/// A bridge built against WIT 0.2.0 (proxy-bridge's source) loads and routes beside the
/// 0.3.0 ones; its answers come up as the same routes.
#[test]
fn bridge_built_against_0_2_0_still_routes() {
    let mut allow = RouteAllowlist::new();
    allow.allow_unix_dir("/run/agent").unwrap();
    let routes = RoutePolicy {
        allow: Arc::new(allow),
        siblings: Arc::new(NoSiblings),
    };
    let p = load("proxy_bridge_v2", "map=1234=unix:/run/agent/all.sock");
    assert_eq!(p.info().version, WitVersion::V0_2);
    let mut b = Bridge::new(rt(), "vm3", &p, routes).unwrap();
    assert_eq!(
        b.route(&req(1, 2, 1234)).unwrap(),
        Route::ProxyUnix("/run/agent/all.sock".into())
    );
    assert_eq!(b.route(&req(2, 2, 99)).unwrap(), Route::Default);
}
