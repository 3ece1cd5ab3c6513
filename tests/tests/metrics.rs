//! The Prometheus endpoint (`--metrics`), scraped over a unix socket and over loopback TCP
//! while traffic runs; the text exposition is parsed (prometheus-parse) and every counter is
//! checked against the traffic the test made: connections by initiator, bytes each way,
//! policy verdicts of a denying plugin, plugin call latency, ring stops, state transfers.
//!
//! Run: `cargo test -p vhost-plug-tests --release --test metrics -- --nocapture`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use prometheus_parse::{Scrape, Value};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_plug_tests::harness::recv_exact;
use vhost_plug_tests::harness::Setup;
use vhost_plug_tests::host::{accept_timeout, host_connect, host_listen, HOST_TIMEOUT};
use vhost_plug_tests::packet::HOST_CID;
use vhost_plug_tests::{ConnectError, DaemonKind, DriverConfig, SimConfig, SockType, VmSpec};

const PROMPT: Duration = Duration::from_secs(10);
/// Bytes sent host -> guest while scraping.
const BULK: usize = 1 << 20;
const XFER: Duration = Duration::from_secs(10);
/// The denying policy: only host port 1234 and guest port 5000.
const POLICY: &str = "policy=builtin:port-allowlist,name=acl,config=allow=2:1234,3:5000";

#[derive(Clone, Copy, Debug)]
enum Transport {
    Unix,
    Tcp,
}

/// Where to reach the endpoint, once the daemon runs.
#[derive(Clone)]
enum Endpoint {
    Unix(std::path::PathBuf),
    Tcp(String),
}

/// One HTTP GET; returns the status line, the headers and the body.
fn get(ep: &Endpoint, path: &str) -> Result<(String, String, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    match ep {
        Endpoint::Unix(p) => {
            let mut s = UnixStream::connect(p).with_context(|| format!("{}", p.display()))?;
            s.set_read_timeout(Some(PROMPT))?;
            s.write_all(req.as_bytes())?;
            s.read_to_end(&mut raw)?;
        }
        Endpoint::Tcp(a) => {
            let mut s = std::net::TcpStream::connect(a).with_context(|| a.clone())?;
            s.set_read_timeout(Some(PROMPT))?;
            s.write_all(req.as_bytes())?;
            s.read_to_end(&mut raw)?;
        }
    }
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_string(), body.to_string()))
}

fn scrape(ep: &Endpoint) -> Result<Scrape> {
    let (status, headers, body) = get(ep, "/metrics")?;
    ensure!(status == "HTTP/1.1 200 OK", "status {status}");
    ensure!(
        headers.contains("text/plain; version=0.0.4"),
        "content type: {headers}"
    );
    Ok(Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?)
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
        .collect();
    match found[..] {
        [v] => Ok(v),
        [] => bail!("no sample {name}{labels:?}"),
        _ => bail!("{} samples {name}{labels:?}", found.len()),
    }
}

/// Waits until `name{labels}` equals `want` (the device counts on its own thread).
fn expect(ep: &Endpoint, name: &str, labels: &[(&str, &str)], want: f64) -> Result<Scrape> {
    let deadline = Instant::now() + PROMPT;
    loop {
        let s = scrape(ep)?;
        let v = value(&s, name, labels)?;
        if v == want {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            bail!("{name}{labels:?} = {v}, want {want}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scenario(transport: Transport) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let metrics_arg = match transport {
        Transport::Unix => format!("unix:{}", dir.path().join("metrics.sock").display()),
        Transport::Tcp => "127.0.0.1:0".to_string(),
    };
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &["--metrics", &metrics_arg, "--plugin", POLICY],
    )?;
    let ep = match transport {
        Transport::Unix => {
            let p = dir.path().join("metrics.sock");
            let mode = std::fs::metadata(&p)?.permissions().mode() & 0o777;
            ensure!(mode == 0o600, "metrics socket mode {mode:o}");
            Endpoint::Unix(p)
        }
        Transport::Tcp => Endpoint::Tcp(s.daemon.metrics_addr(PROMPT)?),
    };
    let r = (|| -> Result<()> {
        // Before any VMM: the families are there, at zero.
        let s0 = scrape(&ep)?;
        ensure!(value(&s0, "vhost_plug_frontend_connected", &[("cid", "3")])? == 0.0);
        let (status, _, _) = get(&ep, "/")?;
        ensure!(status.starts_with("HTTP/1.1 404"), "GET /: {status}");

        let mut vm = s.boot_with(
            0,
            SimConfig {
                extra_protocol_features: VhostUserProtocolFeatures::DEVICE_STATE,
                ..SimConfig::default()
            },
            DriverConfig::default(),
        )?;
        let uds = vm.spec.uds_path.clone();
        expect(&ep, "vhost_plug_frontend_connected", &[("cid", "3")], 1.0)?;

        // Guest -> host on the allowed port: 10,000 bytes up, 7,000 down.
        let l = host_listen(&uds, 1234)?;
        let g = vm
            .guest
            .connect_timeout(HOST_CID, 1234, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("connect 1234: {e}"))?;
        let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
        let up: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        g.send(&up)?;
        let mut got = vec![0u8; up.len()];
        h.read_exact(&mut got)?;
        ensure!(got == up, "host got other bytes");
        let down = vec![7u8; 7_000];
        h.write_all(&down)?;
        ensure!(recv_exact(&g, down.len())? == down, "guest got other bytes");

        // 1 MiB host -> guest while another thread scrapes: the byte counter only grows.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scraper = {
            let (ep, stop) = (ep.clone(), stop.clone());
            std::thread::spawn(move || -> Result<(usize, Duration)> {
                let (mut n, mut last, mut slowest) = (0, 0.0, Duration::ZERO);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let sc = scrape(&ep)?;
                    slowest = slowest.max(t0.elapsed());
                    let v = value(
                        &sc,
                        "vhost_plug_bytes_total",
                        &[("cid", "3"), ("direction", "host_to_guest")],
                    )?;
                    ensure!(v >= last, "bytes counter went back from {last} to {v}");
                    last = v;
                    n += 1;
                }
                Ok((n, slowest))
            })
        };
        let bulk = vec![9u8; BULK];
        let writer = {
            let mut h = h.try_clone()?;
            std::thread::spawn(move || h.write_all(&bulk))
        };
        let got = recv_exact(&g, BULK);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        ensure!(got?.iter().all(|b| *b == 9), "guest got other bytes");
        let (scrapes, slowest) = scraper
            .join()
            .map_err(|_| anyhow::anyhow!("scraper panicked"))??;
        eprintln!(
            "[metrics {transport:?}] {scrapes} scrapes during a 1 MiB transfer, slowest {slowest:?}"
        );

        // Denied by the plugin: guest -> host 1235.
        match vm
            .guest
            .connect_timeout(HOST_CID, 1235, SockType::Stream, PROMPT)
        {
            Err(ConnectError::Refused) => {}
            Err(e) => bail!("1235: {e}"),
            Ok(_) => bail!("1235 must be denied"),
        }
        // Host -> guest on the allowed guest port.
        let gl = vm.guest.listen(5000, SockType::Stream)?;
        let (mut h2, _assigned) = host_connect(&uds, 5000)?;
        let g2 = gl.accept(PROMPT)?;
        h2.write_all(b"hello")?;
        ensure!(recv_exact(&g2, 5)? == b"hello");

        // Scraped while both connections are open.
        let sc = expect(
            &ep,
            "vhost_plug_bytes_total",
            &[("cid", "3"), ("direction", "host_to_guest")],
            (7_005 + BULK) as f64,
        )?;
        let v = |name: &str, labels: &[(&str, &str)]| value(&sc, name, labels);
        ensure!(v("vhost_plug_connections_open", &[("cid", "3")])? == 2.0);
        for (dir, n) in [("guest", 1.0), ("host", 1.0), ("sibling", 0.0)] {
            let got = v(
                "vhost_plug_connections_opened_total",
                &[("cid", "3"), ("direction", dir)],
            )?;
            ensure!(got == n, "opened by {dir}: {got}, want {n}");
        }
        ensure!(
            v(
                "vhost_plug_bytes_total",
                &[("cid", "3"), ("direction", "guest_to_host")]
            )? == 10_000.0
        );
        for (verdict, n) in [("allow", 2.0), ("deny", 1.0), ("redirect", 0.0)] {
            let got = v(
                "vhost_plug_policy_verdicts_total",
                &[("cid", "3"), ("verdict", verdict)],
            )?;
            ensure!(got == n, "verdict {verdict}: {got}, want {n}");
        }
        let acl = [("cid", "3"), ("plugin", "acl")];
        ensure!(v("vhost_plug_plugin_denials_total", &acl)? == 1.0);
        ensure!(v("vhost_plug_plugin_failures_total", &acl)? == 0.0);
        ensure!(v("vhost_plug_plugin_quarantined", &acl)? == 0.0);
        // Three on-connect calls at least (on-close calls come on top).
        let calls = v("vhost_plug_plugin_call_duration_seconds_count", &acl)?;
        let sum = v("vhost_plug_plugin_call_duration_seconds_sum", &acl)?;
        let inf = v("vhost_plug_plugin_call_duration_seconds", &acl)?;
        ensure!(
            calls >= 3.0 && inf == calls,
            "calls {calls}, +Inf bucket {inf}"
        );
        ensure!(sum > 0.0, "latency sum {sum}");
        eprintln!(
            "[metrics {transport:?}] acl: {calls} calls, mean {:.1} us",
            sum / calls * 1e6
        );

        // Stop the rings, save, load in place (and a refused load), then look again.
        vm.guest.pause_interrupts()?;
        let bases = vm.sim.stop_vrings()?;
        let stopped = bases.0.iter().filter(|b| b.is_some()).count();
        let blob = vm.sim.save_state(XFER)?;
        let ok = vm.sim.load_state(&blob, XFER)?;
        ensure!(ok.check.is_ok(), "LOAD of a fresh save: {:?}", ok.check);
        let bad = vm.sim.load_state(b"not a state", XFER)?;
        ensure!(bad.check.is_err(), "garbage must be refused");
        let sc = scrape(&ep)?;
        let v = |name: &str, labels: &[(&str, &str)]| value(&sc, name, labels);
        let mut stops = 0.0;
        for q in ["rx", "tx", "event"] {
            stops += v("vhost_plug_ring_stops_total", &[("cid", "3"), ("queue", q)])?;
        }
        ensure!(
            stops == stopped as f64,
            "{stops} ring stops counted, {stopped} GET_VRING_BASE sent"
        );
        for (dir, res, n) in [
            ("save", "ok", 1.0),
            ("save", "failed", 0.0),
            ("load", "ok", 1.0),
            ("load", "failed", 1.0),
        ] {
            let got = v(
                "vhost_plug_state_transfers_total",
                &[("cid", "3"), ("direction", dir), ("result", res)],
            )?;
            ensure!(got == n, "transfers {dir}/{res}: {got}, want {n}");
        }
        // The serializer's calls are timed too: one encode, one decode.
        let ser = [("cid", "3"), ("plugin", "serializer-postcard")];
        ensure!(v("vhost_plug_plugin_call_duration_seconds_count", &ser)? == 2.0);
        vm.sim.resume_vrings(&bases)?;
        vm.guest.resume_interrupts();
        drop((g, g2, h, h2));
        Ok(())
    })();
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

#[test]
fn metrics_over_unix_socket_match_traffic() -> Result<()> {
    scenario(Transport::Unix)
}

#[test]
fn metrics_over_loopback_tcp_match_traffic() -> Result<()> {
    scenario(Transport::Tcp)
}

#[test]
fn non_loopback_metrics_address_is_refused() -> Result<()> {
    let out = std::process::Command::new(DaemonKind::VhostPlug.binary()?)
        .args([
            "--socket",
            "/nonexistent/s",
            "--uds-path",
            "/nonexistent/u",
            "--metrics",
            "0.0.0.0:9100",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "daemon started: {err}");
    ensure!(err.contains("not a loopback address"), "stderr: {err}");
    Ok(())
}

/// `ctl upgrade` hands the endpoint's listening socket to the new daemon: the address stays
/// the same (also a kernel-chosen TCP port), a scraper looping through the upgrade is never
/// refused or cut off, and after it the new process answers: the open connection it
/// adopted is there, its byte counters start again from zero (a counter reset, which
/// Prometheus expects of a new process) and count the traffic since.
fn endpoint_across_an_upgrade(transport: Transport) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let control = dir.path().join("ctl");
    let c = control.display().to_string();
    let metrics_arg = match transport {
        Transport::Unix => format!("unix:{}", dir.path().join("metrics.sock").display()),
        Transport::Tcp => "127.0.0.1:0".to_string(),
    };
    let s = Setup::with(
        DaemonKind::VhostPlug,
        |d| vec![VmSpec::new(d, 3)],
        &["--metrics", &metrics_arg, "--control-socket", &c],
    )?;
    let ep = match transport {
        Transport::Unix => Endpoint::Unix(dir.path().join("metrics.sock")),
        Transport::Tcp => Endpoint::Tcp(s.daemon.metrics_addr(PROMPT)?),
    };
    let mut current = vhost_plug_tests::upgrade::Current(None);
    let r = (|| -> Result<()> {
        let vm = s.boot(0)?;
        let uds = vm.spec.uds_path.clone();
        let l = host_listen(&uds, 1234)?;
        let g = vm
            .guest
            .connect_timeout(HOST_CID, 1234, SockType::Stream, PROMPT)
            .map_err(|e| anyhow::anyhow!("connect 1234: {e}"))?;
        let mut h = accept_timeout(&l, HOST_TIMEOUT)?;
        let up = vec![1u8; 10_000];
        g.send(&up)?;
        let mut got = vec![0u8; up.len()];
        h.read_exact(&mut got)?;
        let g2h = [("cid", "3"), ("direction", "guest_to_host")];
        expect(&ep, "vhost_plug_bytes_total", &g2h, 10_000.0)?;

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scraper = {
            let (ep, stop) = (ep.clone(), stop.clone());
            std::thread::spawn(move || -> Result<(usize, Duration)> {
                let (mut n, mut slowest) = (0, Duration::ZERO);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let sc = scrape(&ep).with_context(|| format!("scrape {n}"))?;
                    slowest = slowest.max(t0.elapsed());
                    value(&sc, "vhost_plug_connections_open", &[("cid", "3")])?;
                    n += 1;
                }
                Ok((n, slowest))
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        let old = s.daemon.pid().context("daemon pid")?;
        let (pid, v) = vhost_plug_tests::upgrade::upgrade(&control, &[])?;
        current.0 = Some(pid);
        ensure!(pid != old, "same pid after the upgrade: {v}");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (scrapes, slowest) = scraper
            .join()
            .map_err(|_| anyhow::anyhow!("scraper panicked"))??;
        ensure!(scrapes > 0, "no scrape");
        eprintln!(
            "[metrics {transport:?}] {scrapes} scrapes across an upgrade, slowest {slowest:?}"
        );

        let log = s.daemon.stderr();
        let ready: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("metrics endpoint ready"))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("addr=")))
            .collect();
        ensure!(
            ready.len() == 2 && ready[0] == ready[1],
            "endpoint addresses of the two daemons: {ready:?}"
        );
        let sc = scrape(&ep)?;
        ensure!(value(&sc, "vhost_plug_connections_open", &[("cid", "3")])? == 1.0);
        ensure!(value(&sc, "vhost_plug_frontend_connected", &[("cid", "3")])? == 1.0);
        ensure!(
            value(&sc, "vhost_plug_bytes_total", &g2h)? == 0.0,
            "the new daemon's counters start from zero"
        );
        g.send(&up[..3_000])?;
        h.read_exact(&mut got[..3_000])?;
        expect(&ep, "vhost_plug_bytes_total", &g2h, 3_000.0)?;
        ensure!(
            vm.guest.events().is_empty(),
            "guest events {:?}",
            vm.guest.events()
        );
        Ok(())
    })();
    drop(current);
    r.with_context(|| format!("daemon stderr:\n{}", s.daemon.stderr()))
}

#[test]
fn tcp_metrics_endpoint_is_handed_over_by_an_upgrade() -> Result<()> {
    endpoint_across_an_upgrade(Transport::Tcp)
}

#[test]
fn unix_metrics_endpoint_is_handed_over_by_an_upgrade() -> Result<()> {
    endpoint_across_an_upgrade(Transport::Unix)
}
