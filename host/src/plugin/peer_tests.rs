//! Host peer identity in policy requests: plugins of WIT 0.2.0 and later see it (peer-allowlist, audit),
//! 0.1.0 plugins load and decide as before without it.
use super::tests::{chain, denied, load, req};
use super::types::*;
use super::*;

fn peer(uid: u32, gid: u32, cgroup: Option<&str>) -> PeerIdentity {
    PeerIdentity {
        pid: 4242,
        uid,
        gid,
        cgroup: cgroup.map(str::to_string),
        security_label: Some("unconfined".into()),
    }
}

/// A host program's `CONNECT port` to guest 3.
fn host_req(id: u64, port: u32, p: Option<PeerIdentity>) -> ConnRequest {
    ConnRequest {
        src: Endpoint { cid: 2, port: 1024 },
        dst: Endpoint { cid: 3, port },
        from_guest: false,
        peer: p,
        ..req(id, 3, port)
    }
}

#[test]
fn versions_are_detected() {
    let v1 = load("port_allowlist_v1", "");
    assert_eq!(v1.info().version, WitVersion::V0_1);
    assert_eq!(v1.info().world, "vhost-plug:plugin/policy-plugin@0.1.0");
    let v3 = load("port_allowlist", "");
    assert_eq!(v3.info().version, WitVersion::V0_3);
    assert_eq!(v3.info().world, "vhost-plug:plugin/policy-plugin@0.3.0");
    assert!(v3
        .info()
        .imports
        .iter()
        .any(|i| i == "vhost-plug:plugin/types@0.3.0"));
    let v2 = load("proxy_bridge_v2", "");
    assert_eq!(v2.info().version, WitVersion::V0_2);
    assert_eq!(v2.info().world, "vhost-plug:plugin/bridge-plugin@0.2.0");
}

/// The same rules give the same answers from a 0.1.0 build (port-allowlist v1) and a 0.2.0
/// build (v2), whether or not the request carries an identity.
#[test]
fn v0_1_plugin_decides_unchanged() {
    let cfg = "allow=2:1234,3:5000";
    let mut old = chain(&[("port_allowlist_v1", cfg)]);
    let mut new = chain(&[("port_allowlist", cfg)]);
    let reqs = [
        req(1, 2, 1234),
        req(2, 2, 1235),
        host_req(3, 5000, Some(peer(0, 0, Some("/a")))),
        host_req(4, 5001, Some(peer(0, 0, None))),
        host_req(5, 5000, None),
    ];
    for r in &reqs {
        assert_eq!(
            old.decide(r).is_allowed(),
            new.decide(r).is_allowed(),
            "{r:?}"
        );
    }
    assert!(old.decide(&reqs[0]).is_allowed());
    let (reason, failure) = denied(&old.decide(&reqs[1]));
    assert_eq!(reason, "port-allowlist: 2:1235 not allowed");
    assert!(!failure);
    // Both versions in one chain; the 0.1.0 plugin's state comes through its conversion.
    let mut both = chain(&[("port_allowlist_v1", cfg), ("peer_allowlist", "allow=*:*")]);
    assert!(both.decide(&reqs[2]).is_allowed());
    assert!(!both.decide(&reqs[3]).is_allowed());
    let st = both.export_state().expect("export");
    assert_eq!(st[0].state.schema, 1);
    both.import_state(&st).expect("import");
}

#[test]
fn peer_allowlist_rules() {
    let mut c = chain(&[(
        "peer_allowlist",
        "allow=uid=1000:5000,gid=27:*,cgroup=/system.slice/agent.service:6000",
    )]);
    let ok = |c: &mut PolicyChain, port, p| c.decide(&host_req(1, port, p)).is_allowed();
    // uid rule: one port only.
    assert!(ok(&mut c, 5000, Some(peer(1000, 1000, None))));
    assert!(!ok(&mut c, 5001, Some(peer(1000, 1000, None))));
    // gid rule: any port.
    assert!(ok(&mut c, 1, Some(peer(5, 27, None))));
    // cgroup prefix, whole components only; an unknown cgroup matches no cgroup rule.
    let agent = "/system.slice/agent.service";
    assert!(ok(&mut c, 6000, Some(peer(5, 5, Some(agent)))));
    assert!(ok(
        &mut c,
        6000,
        Some(peer(5, 5, Some("/system.slice/agent.service/sub")))
    ));
    assert!(!ok(
        &mut c,
        6000,
        Some(peer(5, 5, Some("/system.slice/agent.services")))
    ));
    assert!(!ok(&mut c, 6000, Some(peer(5, 5, None))));
    assert!(!ok(&mut c, 6001, Some(peer(5, 5, Some(agent)))));
    // No identity: denied. Guest connections: not this plugin's business.
    assert!(!ok(&mut c, 5000, None));
    assert!(c.decide(&req(9, 2, 80)).is_allowed());
    let (reason, failure) = denied(&c.decide(&host_req(2, 7, Some(peer(1, 2, Some("/u"))))));
    assert_eq!(
        reason,
        "peer-allowlist: pid 4242 uid 1 gid 2 cgroup /u may not connect to port 7"
    );
    assert!(!failure);

    let mut strict = chain(&[("peer_allowlist", "allow=*:22;guest=deny")]);
    assert!(!strict.decide(&req(1, 2, 80)).is_allowed());
    assert!(strict
        .decide(&host_req(2, 22, Some(peer(1, 1, None))))
        .is_allowed());
    // A root-wide cgroup prefix and a path containing `:` (the port is after the last one).
    let mut cg = chain(&[("peer_allowlist", "allow=cgroup=/:1,cgroup=/a:b/:2")]);
    assert!(cg
        .decide(&host_req(1, 1, Some(peer(1, 1, Some("/x")))))
        .is_allowed());
    assert!(cg
        .decide(&host_req(2, 2, Some(peer(1, 1, Some("/a:b/c")))))
        .is_allowed());
}

#[test]
fn peer_allowlist_bad_config_denies() {
    for cfg in [
        "allow=uid=x:1",
        "allow=cgroup=relative:1",
        "allow=pid=1:1",
        "allow=uid=1",
        "allow=uid=1:port",
        "guest=maybe",
        "colour=blue",
    ] {
        let mut c = chain(&[("peer_allowlist", cfg)]);
        let (reason, _) = denied(&c.decide(&host_req(1, 1, Some(peer(1, 1, None)))));
        assert!(
            reason.starts_with("peer-allowlist: bad config: "),
            "{cfg}: {reason}"
        );
    }
}

/// The audit trail keeps the identity of host programs (schema 2), and reads schema 1.
#[test]
fn audit_records_identity() {
    let mut c = chain(&[("audit", "")]);
    let long = format!("/{}", "c".repeat(300));
    assert!(c
        .decide(&host_req(7, 5000, Some(peer(1000, 100, Some(&long)))))
        .is_allowed());
    let stats = ConnStats {
        bytes_to_guest: 1,
        bytes_from_guest: 2,
        duration_ms: 3,
        reset: false,
    };
    c.on_close(7, &stats);
    assert!(c.decide(&req(8, 2, 80)).is_allowed());
    c.on_close(8, &stats);
    let st = c.export_state().unwrap().remove(0).state;
    assert_eq!(st.schema, 2);
    // Totals (4 x u64), count, then records: id, dst cid, dst port, bytes x2, ms, reset, peer.
    let d = &st.data;
    let u32_at = |i: usize| u32::from_le_bytes(d[i..i + 4].try_into().unwrap());
    assert_eq!(u32_at(32), 2);
    let rec = 36;
    let peer_at = rec + 8 + 8 + 4 + 8 + 8 + 8 + 4;
    assert_eq!(u32_at(peer_at), 1);
    assert_eq!(
        (
            u32_at(peer_at + 4),
            u32_at(peer_at + 8),
            u32_at(peer_at + 12)
        ),
        (4242, 1000, 100)
    );
    let len = u32_at(peer_at + 16) as usize;
    assert_eq!(len, 128, "cgroup cut to 128 bytes");
    assert_eq!(
        &d[peer_at + 20..peer_at + 20 + len],
        &long.as_bytes()[..128]
    );
    let second = peer_at + 20 + len;
    assert_eq!(
        u32_at(second + 8 + 8 + 4 + 8 + 8 + 8 + 4),
        0,
        "guest: no identity"
    );

    // Round trip, and a schema 1 state (no identities) still loads.
    let mut c2 = chain(&[("audit", "")]);
    c2.import_state(&[NamedPluginState {
        name: "audit".into(),
        state: st.clone(),
    }])
    .unwrap();
    assert_eq!(c2.export_state().unwrap()[0].state, st);
    let mut v1 = Vec::new();
    for v in [1u64, 0, 1, 2] {
        v1.extend_from_slice(&v.to_le_bytes());
    }
    v1.extend_from_slice(&1u32.to_le_bytes());
    for v in [9u64, 3] {
        v1.extend_from_slice(&v.to_le_bytes());
    }
    v1.extend_from_slice(&80u32.to_le_bytes());
    for v in [1u64, 2, 3] {
        v1.extend_from_slice(&v.to_le_bytes());
    }
    v1.extend_from_slice(&0u32.to_le_bytes());
    c2.import_state(&[NamedPluginState {
        name: "audit".into(),
        state: PluginState {
            schema: 1,
            data: v1,
        },
    }])
    .expect("schema 1");
    let again = c2.export_state().unwrap().remove(0).state;
    assert_eq!(again.schema, 2);
    let records = u32::from_le_bytes(again.data[32..36].try_into().unwrap());
    assert_eq!(records, 1);
}

/// The conversions 0.1.0 and 0.2.0 serializers go through keep every field of a device state (the
/// fixture `serializer-postcard-v1` is run end to end in `plugin/tests`).
#[test]
fn device_state_conversion_round_trips() {
    let st = DeviceState {
        guest_cid: 9,
        acked_features: 0x1_0000_0003,
        event_queue: EventQueueState {
            owner: EventQueueOwner::Backend,
            driver_live: true,
        },
        plugins: vec![NamedPluginState {
            name: "p".into(),
            state: PluginState {
                schema: 3,
                data: vec![1, 2],
            },
        }],
        connections: vec![Connection {
            local_cid: 2,
            local_port: 1024,
            peer_port: 5000,
            kind: SocketType::Seqpacket,
            state: ConnState::Closing,
            credit: Credit {
                rx_cnt: 1,
                fwd_cnt: 2,
                last_fwd_sent: 3,
                tx_cnt: 4,
                peer_buf_alloc: 5,
                peer_fwd_cnt: 6,
            },
            peer_shutdown: ShutdownFlags::NO_MORE_SEND,
            local_shutdown: ShutdownFlags::NO_MORE_RECEIVE | ShutdownFlags::NO_MORE_SEND,
            pending_to_guest: vec![7],
            pending_to_host: vec![8, 9],
            fd_index: Some(2),
            id: 77,
            owed: OwedOps::RST | OwedOps::CREDIT_REQUEST,
            credit_requested: true,
            bytes_to_guest: 10,
            bytes_from_guest: 11,
        }],
    };
    // 0.3.0 -> 0.2.0 -> 0.3.0, and 0.3.0 -> 0.2.0 -> 0.1.0 -> 0.2.0 -> 0.3.0.
    let v2 = compat_v0_2::device_state_down(&st);
    assert_eq!(compat_v0_2::device_state_up(v2.clone()), st);
    let v1 = compat::device_state_down(&v2);
    let back = compat_v0_2::device_state_up(compat::device_state_up(v1));
    assert_eq!(back, st);
}
