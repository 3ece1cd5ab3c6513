//! Prometheus metrics: `--metrics unix:PATH` or `--metrics IP:PORT` (loopback only).
//!
//! The data path only bumps atomics (`Relaxed`, one writer per VM: its worker thread) in
//! [`VmCounters`] and in the plugins' [`PluginCounters`]. Nothing is registered per
//! connection and no lock is taken there: at scrape time a `prometheus-client` collector reads
//! the atomics of every VM and encodes them. Plugin counters are reached through the VM's gate
//! (its lock is held only to clone the counters' `Arc`s); a plugin swapped in starts from zero,
//! which Prometheus treats as a counter reset.
//!
//! The endpoint is served by one thread that handles one request at a time with read and write
//! timeouts and a bounded request head, so a slow or hostile local client costs at most one
//! timeout and no memory or threads (a general HTTP server such as tiny_http starts a thread
//! per concurrent client). Only `GET /metrics` is answered; the Prometheus text format 0.0.4
//! is the default, OpenMetrics text when the scraper asks for it in `Accept`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::MetricsAddr;
use crate::conn::Initiator;
use crate::gate::Gate;
use crate::plugin::{PluginCounters, LATENCY_BUCKETS_NS};
use crate::stats::VmStats;
use crate::vm::VmHandle;

/// Longest request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long one scraper may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the endpoint waits for a scraper before it looks at the upgrade gate again.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// Most request headers parsed.
const MAX_HEADERS: usize = 32;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// The metrics endpoint, bound and ready to [`run`](MetricsServer::run).
pub struct MetricsServer {
    listener: Listener,
    registry: Registry,
    /// The bound address (with the real port when 0 was asked for).
    local: String,
    path: Option<PathBuf>,
}

impl MetricsServer {
    /// Binds `addr` (a unix socket is created 0600, like the control socket), or serves on
    /// `inherited`, the listening socket a live upgrade handed over, if it is bound there.
    pub fn bind(
        addr: &MetricsAddr,
        inherited: Option<OwnedFd>,
        vms: Vec<VmHandle>,
    ) -> Result<Self, MetricsError> {
        let err = |source| MetricsError::Listen {
            addr: format!("{addr:?}"),
            source,
        };
        let inherited = inherited.and_then(|fd| match adopt(addr, fd) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "metrics listener of the old daemon not used; binding again");
                None
            }
        });
        let listener = match (inherited, addr) {
            (Some(l), _) => l,
            (None, MetricsAddr::Unix(p)) => Listener::Unix(bind_private_unix(p).map_err(err)?),
            (None, MetricsAddr::Tcp(a)) => Listener::Tcp(TcpListener::bind(a).map_err(err)?),
        };
        match &listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(err)?;
        let (local, path) = match (&listener, addr) {
            (Listener::Tcp(l), _) => (l.local_addr().map_err(err)?.to_string(), None),
            (Listener::Unix(_), MetricsAddr::Unix(p)) => {
                (format!("unix:{}", p.display()), Some(p.clone()))
            }
            (Listener::Unix(_), MetricsAddr::Tcp(a)) => (a.to_string(), None),
        };
        let mut registry = Registry::with_prefix("vhost_plug");
        registry.register_collector(Box::new(VmCollector {
            vms: vms
                .into_iter()
                .map(|v| VmSource {
                    cid: v.cid.to_string(),
                    gate: v.gate,
                    stats: v.stats,
                })
                .collect(),
        }));
        Ok(MetricsServer {
            listener,
            registry,
            local,
            path,
        })
    }

    /// A duplicate of the listening socket, for a live upgrade to hand over.
    pub fn listener_dup(&self) -> std::io::Result<OwnedFd> {
        match &self.listener {
            Listener::Unix(l) => l.try_clone().map(OwnedFd::from),
            Listener::Tcp(l) => l.try_clone().map(OwnedFd::from),
        }
    }

    /// The unix socket this server created, to remove on exit.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The metrics text as a scrape would get it (`openmetrics`: OpenMetrics text format).
    pub fn render(&self, openmetrics: bool) -> String {
        render(&self.registry, openmetrics)
    }

    /// Serves scrapers forever, one at a time. The listening socket is non-blocking and
    /// polled: during a live upgrade it is shared with the other daemon, and this one stops
    /// accepting while [`crate::listenset::metrics_gate`] says so (scrapers wait in the backlog
    /// for the new daemon; none is accepted here and then dropped by this one's exit).
    pub fn run(self) {
        info!(addr = %self.local, "metrics endpoint ready");
        let fd = match &self.listener {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        loop {
            if !readable(fd, ACCEPT_POLL) {
                continue;
            }
            let paused = crate::listenset::metrics_gate();
            if *paused {
                drop(paused);
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            let r = match &self.listener {
                Listener::Unix(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_read_timeout(Some(CLIENT_TIMEOUT));
                    let _ = s.set_write_timeout(Some(CLIENT_TIMEOUT));
                    serve(s, &self.registry)
                }),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_read_timeout(Some(CLIENT_TIMEOUT));
                    let _ = s.set_write_timeout(Some(CLIENT_TIMEOUT));
                    let _ = s.set_nodelay(true);
                    serve(s, &self.registry)
                }),
            };
            drop(paused);
            match r {
                Ok(Err(e)) => debug!(error = %e, "metrics client"),
                Ok(Ok(())) => {}
                // The other daemon of a live upgrade took it first.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    // EMFILE and friends: do not spin.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Whether `fd` became readable within `t`.
fn readable(fd: std::os::fd::RawFd, t: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, t.as_millis() as libc::c_int) > 0 }
}

/// The handed-over listening socket `fd`, if it is what `addr` asks for: the same kind and
/// the same path, or the same address (any port when `addr` asks for port 0).
fn adopt(addr: &MetricsAddr, fd: OwnedFd) -> std::io::Result<Listener> {
    let other = |what: String| std::io::Error::other(what);
    match addr {
        MetricsAddr::Unix(p) => {
            let l = UnixListener::from(fd);
            let at = l.local_addr()?;
            if at.as_pathname() != Some(p.as_path()) {
                return Err(other(format!("it listens on {at:?}")));
            }
            Ok(Listener::Unix(l))
        }
        MetricsAddr::Tcp(a) => {
            let l = TcpListener::from(fd);
            let at = l.local_addr()?;
            if at.ip() != a.ip() || (a.port() != 0 && at.port() != a.port()) {
                return Err(other(format!("it listens on {at}")));
            }
            Ok(Listener::Tcp(l))
        }
    }
}

/// A unix listener created with mode 0600 from the start.
fn bind_private_unix(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // SAFETY: umask only changes this process's file creation mask; restored below.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn render(registry: &Registry, openmetrics: bool) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let r = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
    };
    if r.is_err() {
        // Writing to a String cannot fail; an encoder error means a bad metric name.
        warn!("metrics encoding failed");
    }
    out
}

/// Reads one request head (bounded), answers it and closes.
fn serve<S: Read + Write>(mut s: S, registry: &Registry) -> std::io::Result<()> {
    let mut buf = [0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    let (status, ctype, body) = loop {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break answer(&req, registry),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            Ok(httparse::Status::Partial) => {
                break (
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "request head too large\n".to_string(),
                )
            }
            Err(e) => break ("400 Bad Request", "text/plain", format!("{e}\n")),
        }
    };
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

fn answer(
    req: &httparse::Request<'_, '_>,
    registry: &Registry,
) -> (&'static str, &'static str, String) {
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path != "/metrics" {
        return ("404 Not Found", "text/plain", "try /metrics\n".into());
    }
    if req.method != Some("GET") {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    let openmetrics = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("accept")
            && std::str::from_utf8(h.value)
                .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    let ctype = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    };
    ("200 OK", ctype, render(registry, openmetrics))
}

struct VmSource {
    cid: String,
    gate: Arc<Mutex<Gate>>,
    stats: Arc<VmStats>,
}

/// Reads every VM's counters at scrape time.
struct VmCollector {
    vms: Vec<VmSource>,
}

impl std::fmt::Debug for VmCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCollector")
            .field("vms", &self.vms.len())
            .finish()
    }
}

/// One family: descriptor once, then one sample per label set.
fn family<'a>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in samples {
        let mut s = m.encode_family(&labels)?;
        match ty {
            MetricType::Counter => s.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => s.encode_gauge(&(v as i64))?,
        }
    }
    Ok(())
}

const INITIATORS: [(Initiator, &str); 3] = [
    (Initiator::Guest, "guest"),
    (Initiator::Host, "host"),
    (Initiator::Sibling, "sibling"),
];
const VERDICTS: [&str; 3] = ["allow", "deny", "redirect"];
const OUTCOMES: [&str; 4] = ["allow", "deny", "redirect", "failure"];
const DECIDED_FOR: [&str; 2] = ["guest", "host"];
const QUEUES: [&str; 3] = ["rx", "tx", "event"];
const TRANSFER_DIRS: [&str; 2] = ["save", "load"];
const RESULTS: [&str; 2] = ["ok", "failed"];

impl Collector for VmCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = Ordering::Relaxed;
        let vms = &self.vms;
        family(
            &mut enc,
            "frontend_connected",
            "1 while a VMM is connected to the VM's vhost-user socket.",
            MetricType::Gauge,
            vms.iter().map(|v| {
                (
                    vec![("cid", v.cid.as_str())],
                    u64::from(v.stats.frontend.load(r)),
                )
            }),
        )?;
        family(
            &mut enc,
            "connections_open",
            "Connections in the VM's table (handshakes included).",
            MetricType::Gauge,
            vms.iter().map(|v| {
                (
                    vec![("cid", v.cid.as_str())],
                    v.stats.connections.load(r) as u64,
                )
            }),
        )?;
        family(
            &mut enc,
            "connections_opened",
            "Connections entered in the VM's table, by initiator (guest, host program, sibling VM).",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                INITIATORS.iter().map(move |(who, name)| {
                    (
                        vec![("cid", v.cid.as_str()), ("direction", *name)],
                        v.stats.counters.opened[*who as usize].load(r),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "bytes",
            "Payload bytes: guest_to_host = sent by the guest, host_to_guest = delivered to it.",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                let c = &v.stats.counters;
                [
                    ("guest_to_host", c.bytes_from_guest.load(r)),
                    ("host_to_guest", c.bytes_to_guest.load(r)),
                ]
                .into_iter()
                .map(move |(d, n)| (vec![("cid", v.cid.as_str()), ("direction", d)], n))
            }),
        )?;
        family(
            &mut enc,
            "afvsock_connections_opened",
            "Connections over a host AF_VSOCK socket (forwarding backend, host-vsock route), by initiator (guest, host program).",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                DECIDED_FOR.iter().enumerate().map(move |(i, who)| {
                    (
                        vec![("cid", v.cid.as_str()), ("initiator", *who)],
                        v.stats.counters.afvsock_opened[i].load(r),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "afvsock_bytes",
            "Payload bytes of closed AF_VSOCK connections (added when a connection closes): guest_to_host = sent by the guest, host_to_guest = delivered to it.",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                let c = &v.stats.counters;
                [
                    ("guest_to_host", c.afvsock_bytes[0].load(r)),
                    ("host_to_guest", c.afvsock_bytes[1].load(r)),
                ]
                .into_iter()
                .map(move |(d, n)| (vec![("cid", v.cid.as_str()), ("direction", d)], n))
            }),
        )?;
        family(
            &mut enc,
            "policy_verdicts",
            "Decisions of the VM's policy-plugin chain.",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                VERDICTS.iter().enumerate().map(move |(i, name)| {
                    (
                        vec![("cid", v.cid.as_str()), ("verdict", *name)],
                        v.stats.counters.verdicts[i].load(r),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "policy_decisions",
            "Decisions of the VM's policy-plugin chain by who opened the connection (guest, host program) and outcome (failure: a plugin failed, the connection was refused).",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                DECIDED_FOR.iter().enumerate().flat_map(move |(w, who)| {
                    OUTCOMES.iter().enumerate().map(move |(o, name)| {
                        (
                            vec![
                                ("cid", v.cid.as_str()),
                                ("initiator", *who),
                                ("outcome", *name),
                            ],
                            v.stats.counters.decisions[w][o].load(r),
                        )
                    })
                })
            }),
        )?;
        family(
            &mut enc,
            "ring_stops",
            "GET_VRING_BASE requests (the VMM stopping a vring), by queue.",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                QUEUES.iter().enumerate().map(move |(i, q)| {
                    (
                        vec![("cid", v.cid.as_str()), ("queue", *q)],
                        v.stats.counters.ring_stops[i].load(r),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "state_transfers",
            "Device-state transfers (SET_DEVICE_STATE_FD), by direction and outcome.",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                TRANSFER_DIRS.iter().enumerate().flat_map(move |(d, dir)| {
                    RESULTS.iter().enumerate().map(move |(o, res)| {
                        (
                            vec![
                                ("cid", v.cid.as_str()),
                                ("direction", *dir),
                                ("result", *res),
                            ],
                            v.stats.counters.transfers[d][o].load(r),
                        )
                    })
                })
            }),
        )?;
        family(
            &mut enc,
            "plugin_swaps",
            "In-place plugin swaps through the control socket, by outcome.",
            MetricType::Counter,
            vms.iter().flat_map(|v| {
                RESULTS.iter().enumerate().map(move |(o, res)| {
                    (
                        vec![("cid", v.cid.as_str()), ("result", *res)],
                        v.stats.counters.swaps[o].load(r),
                    )
                })
            }),
        )?;
        self.encode_plugins(&mut enc)
    }
}

impl VmCollector {
    /// Every VM's plugin instances (policy chain, bridge, serializer) and their counters.
    fn plugins(&self) -> Vec<(&str, String, Arc<PluginCounters>)> {
        let mut out = Vec::new();
        for v in &self.vms {
            let gate = v.gate.lock().unwrap_or_else(|p| p.into_inner());
            let list = gate.plugin_counters();
            drop(gate);
            out.extend(list.into_iter().map(|(n, c)| (v.cid.as_str(), n, c)));
            if let Some((n, c)) = v.stats.counters.serializer.get() {
                out.push((v.cid.as_str(), n.clone(), c.clone()));
            }
        }
        out
    }

    fn encode_plugins(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let r = Ordering::Relaxed;
        let plugins = self.plugins();
        let mut m = enc.encode_descriptor(
            "plugin_call_duration_seconds",
            "Wall time of plugin calls (instantiation excluded).",
            None,
            MetricType::Histogram,
        )?;
        for (cid, name, c) in &plugins {
            let set = [("cid", *cid), ("plugin", name.as_str())];
            let mut count = 0u64;
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_NS
                .iter()
                .map(|ns| *ns as f64 / 1e9)
                .chain([f64::INFINITY])
                .zip(c.latency_buckets.iter())
                .map(|(le, n)| {
                    let n = n.load(r);
                    count += n;
                    (le, n)
                })
                .collect();
            let sum = c.total_call_ns.load(r) as f64 / 1e9;
            m.encode_family(&set)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        for (name, help, get) in [
            (
                "plugin_failures",
                "Plugin calls that failed (trap, deadline, limit, invalid answer).",
                (|c: &PluginCounters| c.failures.load(Ordering::Relaxed))
                    as fn(&PluginCounters) -> u64,
            ),
            (
                "plugin_quarantine_refusals",
                "Calls refused without running because the plugin is quarantined.",
                |c| c.quarantine_refusals.load(Ordering::Relaxed),
            ),
            (
                "plugin_denials",
                "Connections the plugin denied (failures included).",
                |c| c.denials.load(Ordering::Relaxed),
            ),
        ] {
            family(
                enc,
                name,
                help,
                MetricType::Counter,
                plugins
                    .iter()
                    .map(|(cid, n, c)| (vec![("cid", *cid), ("plugin", n.as_str())], get(c))),
            )?;
        }
        family(
            enc,
            "plugin_quarantined",
            "1 while the plugin is quarantined (every call refused until it is replaced).",
            MetricType::Gauge,
            plugins.iter().map(|(cid, n, c)| {
                (
                    vec![("cid", *cid), ("plugin", n.as_str())],
                    u64::from(c.quarantined.load(r)),
                )
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses() {
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(MetricsAddr::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:9100".parse(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9100".parse().expect("addr")))
        );
        assert_eq!(
            "[::1]:9100".parse(),
            Ok(MetricsAddr::Tcp("[::1]:9100".parse().expect("addr")))
        );
        let e = "0.0.0.0:9100".parse::<MetricsAddr>().expect_err("refused");
        assert!(e.contains("not a loopback"), "{e}");
        assert!("10.1.2.3:80".parse::<MetricsAddr>().is_err());
        assert!("localhost:9100".parse::<MetricsAddr>().is_err());
        assert!("unix:".parse::<MetricsAddr>().is_err());
        assert!("9100".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn http_requests() {
        let reg = Registry::with_prefix("vhost_plug");
        let ask = |req: &str| {
            let mut io = std::io::Cursor::new(req.as_bytes().to_vec());
            let mut out = Vec::new();
            let mut rw = Duplex {
                input: &mut io,
                output: &mut out,
            };
            serve(&mut rw, &reg).expect("serve");
            String::from_utf8(out).expect("utf-8")
        };
        assert!(ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 200 OK"));
        assert!(ask("GET /metrics?x=1 HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200 OK"));
        assert!(ask("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(ask("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(ask("\x01\x02 nonsense\r\n\r\n").starts_with("HTTP/1.1 400"));
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert!(ask(&big).starts_with("HTTP/1.1 431"));
        let om = ask("GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n");
        assert!(
            om.contains("openmetrics-text") && om.ends_with("# EOF\n"),
            "{om}"
        );
    }

    struct Duplex<'a> {
        input: &'a mut std::io::Cursor<Vec<u8>>,
        output: &'a mut Vec<u8>,
    }

    impl Read for Duplex<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Duplex<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
