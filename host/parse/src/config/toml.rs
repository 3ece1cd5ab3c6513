//! Our own config file format: `--config FILE.toml` (chosen by the `.toml` extension; any
//! other file is the vhost-device-vsock YAML of [`super::yaml`]).
//!
//! One file describes the whole daemon (`examples/vhost-plug.toml` is a commented example):
//!
//! ```toml
//! control-socket = "/run/vhost-plug/control.sock"   # optional, --control-socket
//! plugin-cache = "/var/cache/vhost-plug"            # optional, --plugin-cache
//!
//! [limits]
//! max-connections = 16384          # optional: default for every VM, --max-connections
//! max-buffered = 268435456         # optional: bytes of guest data held daemon-wide,
//!                                  # --max-buffered
//!
//! [routes]                         # optional: where plugins may route (--allow-route)
//! unix = ["/run/vsock-services"]   # sockets inside these directories
//! tcp = ["127.0.0.1:8080", "127.0.0.1:*"]
//! vsock = ["1:5000", "16:*"]       # host AF_VSOCK CID:PORT (not sibling VMs)
//!
//! [plugins]                        # optional: plugins of every VM (--plugin); absent means
//! policy = [                       # the built-in defaults
//!   { builtin = "allow-group" },
//!   { path = "plugins/deny_ports.wasm", name = "deny", config = "deny=22" },
//! ]
//! bridge = { builtin = "tcp-bridge", config = "map=1234=127.0.0.1:8080" }
//! serializer = { builtin = "serializer-postcard" }
//!
//! [[vm]]
//! guest-cid = 3                    # optional, default 3
//! socket = "/run/vhost-plug/vm3.socket"
//! uds-path = "/run/vhost-plug/vm3.vsock"   # or the vsock forwarding backend:
//! # forward-cid = 1                #   guest connections go to host AF_VSOCK CID 1
//! # forward-listen = [9001, 9002]  #   host AF_VSOCK ports into the guest ("9001+9002" too)
//! tx-buffer-size = 65536           # optional
//! queue-size = 1024                # optional
//! groups = ["default"]             # optional
//! max-connections = 1024           # optional
//! connect-wait = "5s"              # optional: retry a host CONNECT the guest refuses
//! routes = { unix = ["/run/vm3-services"] }   # optional: on top of [routes], this VM only
//! plugins = { policy = [{ builtin = "port-allowlist", config = "allow=2:22" }] }
//! ```
//!
//! Rules: unknown keys are errors (not warnings as in the YAML file, which must stay
//! compatible with the peer). Relative paths are relative to the directory of the config file.
//! A `plugins` table replaces the plugins it would otherwise inherit (for a VM: the daemon's;
//! for the daemon: the built-in defaults) and must name at least one plugin; without a
//! serializer, `serializer-postcard` is used. Command-line flags given next to the file win:
//! `--plugin` replaces `[plugins]`, `--allow-route` adds to `[routes]`, `--control-socket`,
//! `--plugin-cache` and `--max-connections` replace the file's values.
//!
//! Every error names the file, the field (`vm[1].plugins.policy[0].path`) and the line and
//! column of the offending value: schema errors come from serde through
//! `serde_path_to_error` (field) and toml (position); rules checked after parsing (duplicate
//! CIDs and socket paths, routes, plugin files) use the value's [`Spanned`] position.

use std::ops::Range;
use std::path::{Path, PathBuf};

use ::toml::Spanned;
use serde::Deserialize;

use super::{
    check_forward_cid, check_forward_ports, check_guest_cid, check_max_buffered,
    check_max_connections, check_queue_size, check_tx_buffer_size, parse_forward_listen,
    ConfigError, RouteSpec, VmSpec,
};
use crate::route::RouteAllowlist;
use crate::spec::{PluginKind, PluginSource, PluginSpec, BUILTIN_NAMES};

/// True when `path` names a TOML config file (extension `.toml`, any case).
pub(super) fn is_toml(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

/// What a TOML file says, checked, with relative paths resolved.
#[derive(Debug)]
pub(super) struct Loaded {
    pub specs: Vec<VmSpec>,
    /// `[plugins]`; empty when the table is absent.
    pub plugins: Vec<PluginSpec>,
    /// `[routes]`.
    pub allow_routes: Vec<RouteSpec>,
    pub control_socket: Option<PathBuf>,
    pub plugin_cache: Option<PathBuf>,
    /// `[limits] max-connections`.
    pub max_connections: Option<usize>,
    /// `[limits] max-buffered`.
    pub max_buffered: Option<usize>,
    /// `[sandbox] landlock`.
    pub landlock: bool,
    /// `[sandbox] writable`.
    pub landlock_rw: Vec<PathBuf>,
}

/// Largest config file read (a config file this big is a mistake, not a config).
const MAX_FILE_SIZE: u64 = 4 << 20;

pub(super) fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let read_err = |source| ConfigError::ReadConfig {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_FILE_SIZE {
        return Err(ConfigError::ConfigFile {
            path: path.to_path_buf(),
            message: format!("{size} bytes is more than the {MAX_FILE_SIZE} a config may have"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse_str(path, &text)
}

/// Parses `text` as the content of the config file `path` (named in errors; its directory
/// anchors relative paths).
pub(super) fn parse_str(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let file = File { path, text };
    let de = ::toml::Deserializer::parse(text).map_err(|e| file.toml_error(None, &e))?;
    let doc: Doc = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = clean_field_path(&e.path().to_string());
        file.toml_error(field, e.inner())
    })?;
    file.check(doc)
}

/// serde_path_to_error's path, minus the fields [`Spanned`] uses internally; `None` for the
/// document itself.
fn clean_field_path(raw: &str) -> Option<String> {
    let cleaned = raw
        .split('.')
        .filter(|seg| !seg.starts_with("$__serde_spanned"))
        .collect::<Vec<_>>()
        .join(".");
    (!matches!(cleaned.as_str(), "" | "." | "?")).then_some(cleaned)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Doc {
    control_socket: Option<Spanned<String>>,
    plugin_cache: Option<Spanned<String>>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    sandbox: Sandbox,
    #[serde(default)]
    routes: Routes,
    plugins: Option<Spanned<Plugins>>,
    // Not `Spanned`: serde_path_to_error loses the list index inside one.
    #[serde(default)]
    vm: Vec<Vm>,
}

/// `[sandbox]`: the daemon's Landlock self-sandbox (`--landlock`, `--landlock-rw`).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Sandbox {
    #[serde(default)]
    landlock: Option<Spanned<bool>>,
    #[serde(default)]
    writable: Vec<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Limits {
    max_connections: Option<Spanned<u64>>,
    max_buffered: Option<Spanned<u64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Routes {
    #[serde(default)]
    unix: Vec<Spanned<String>>,
    #[serde(default)]
    tcp: Vec<Spanned<String>>,
    #[serde(default)]
    vsock: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plugins {
    /// The policy chain, in call order.
    #[serde(default)]
    policy: Vec<Spanned<PluginEntry>>,
    bridge: Option<Spanned<PluginEntry>>,
    serializer: Option<Spanned<PluginEntry>>,
}

/// One plugin: exactly one of `path` and `builtin`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginEntry {
    path: Option<Spanned<String>>,
    builtin: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    #[serde(default)]
    config: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Vm {
    guest_cid: Option<Spanned<u64>>,
    socket: Spanned<String>,
    uds_path: Option<Spanned<String>>,
    forward_cid: Option<Spanned<u64>>,
    forward_listen: Option<Spanned<Ports>>,
    tx_buffer_size: Option<Spanned<u64>>,
    queue_size: Option<Spanned<u64>>,
    groups: Option<Vec<String>>,
    max_connections: Option<Spanned<u64>>,
    connect_wait: Option<Spanned<String>>,
    routes: Option<Routes>,
    plugins: Option<Spanned<Plugins>>,
}

/// `forward-listen`: a list of ports, or the peer's `"9001+9002"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Ports {
    List(Vec<u64>),
    Joined(String),
}

/// The file being read, for positions and relative paths.
struct File<'a> {
    path: &'a Path,
    text: &'a str,
}

impl File<'_> {
    /// 1-based line and column (in characters) of byte `offset`.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    fn error(&self, span: Range<usize>, field: impl Into<String>, message: String) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        ConfigError::Toml {
            path: self.path.to_path_buf(),
            field: Some(field.into()),
            line,
            column,
            message,
        }
    }

    fn toml_error(&self, field: Option<String>, e: &::toml::de::Error) -> ConfigError {
        let (line, column) = self.line_col(e.span().map_or(0, |s| s.start));
        ConfigError::Toml {
            path: self.path.to_path_buf(),
            field,
            line,
            column,
            message: e.message().trim_end().to_string(),
        }
    }

    /// `p` as written, or joined to the config file's directory when relative.
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// A non-empty path field, resolved.
    fn path_field(&self, v: &Spanned<String>, field: &str) -> Result<PathBuf, ConfigError> {
        if v.get_ref().is_empty() {
            return Err(self.error(v.span(), field, "path must not be empty".into()));
        }
        Ok(self.resolve(v.get_ref()))
    }

    fn number<T>(
        &self,
        v: &Option<Spanned<u64>>,
        field: &str,
        check: fn(u64) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        v.as_ref()
            .map(|v| check(*v.get_ref()).map_err(|m| self.error(v.span(), field, m)))
            .transpose()
    }

    fn routes(&self, r: &Routes, prefix: &str) -> Result<Vec<RouteSpec>, ConfigError> {
        // The same parser the daemon uses when it builds the allowlist, so what passes here
        // loads there.
        let mut probe = RouteAllowlist::new();
        let mut out = Vec::with_capacity(r.unix.len() + r.tcp.len() + r.vsock.len());
        for (i, d) in r.unix.iter().enumerate() {
            let field = format!("{prefix}unix[{i}]");
            let dir = d.get_ref();
            if !Path::new(dir).is_absolute() {
                return Err(self.error(
                    d.span(),
                    field,
                    format!("unix route directory `{dir}` must be absolute"),
                ));
            }
            probe
                .allow_unix_dir(dir)
                .map_err(|e| self.error(d.span(), field, e.to_string()))?;
            out.push(RouteSpec::UnixDir(PathBuf::from(dir)));
        }
        for (i, t) in r.tcp.iter().enumerate() {
            let field = format!("{prefix}tcp[{i}]");
            probe.allow_tcp(t.get_ref()).map_err(|e| {
                self.error(
                    t.span(),
                    field,
                    format!("{e} (expected IP:PORT, localhost:PORT or HOST:*)"),
                )
            })?;
            out.push(RouteSpec::Tcp(t.get_ref().clone()));
        }
        for (i, v) in r.vsock.iter().enumerate() {
            let field = format!("{prefix}vsock[{i}]");
            probe
                .allow_vsock(v.get_ref())
                .map_err(|e| self.error(v.span(), field, e.to_string()))?;
            out.push(RouteSpec::Vsock(v.get_ref().clone()));
        }
        Ok(out)
    }

    fn plugin(
        &self,
        entry: &Spanned<PluginEntry>,
        kind: PluginKind,
        field: &str,
    ) -> Result<PluginSpec, ConfigError> {
        let e = entry.get_ref();
        let source = match (&e.path, &e.builtin) {
            (Some(p), None) => {
                let resolved = self.path_field(p, &format!("{field}.path"))?;
                match std::fs::metadata(&resolved) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(self.error(
                            p.span(),
                            format!("{field}.path"),
                            format!("{} is not a file", resolved.display()),
                        ))
                    }
                    Err(err) => {
                        return Err(self.error(
                            p.span(),
                            format!("{field}.path"),
                            format!("plugin file {}: {err}", resolved.display()),
                        ))
                    }
                }
                PluginSource::Path(resolved)
            }
            (None, Some(b)) => {
                if !BUILTIN_NAMES.contains(&b.get_ref().as_str()) {
                    return Err(self.error(
                        b.span(),
                        format!("{field}.builtin"),
                        format!(
                            "no built-in plugin `{}` (built in: {})",
                            b.get_ref(),
                            BUILTIN_NAMES.join(", ")
                        ),
                    ));
                }
                PluginSource::Builtin(b.get_ref().clone())
            }
            (Some(_), Some(_)) | (None, None) => {
                return Err(self.error(
                    entry.span(),
                    field,
                    "give exactly one of `path` (a .wasm component) and `builtin` (a built-in \
                     plugin's name)"
                        .into(),
                ))
            }
        };
        let name = match &e.name {
            Some(n) if n.get_ref().is_empty() || n.get_ref().contains(',') => {
                return Err(self.error(
                    n.span(),
                    format!("{field}.name"),
                    "a plugin name must be non-empty and without ','".into(),
                ))
            }
            Some(n) => Some(n.get_ref().clone()),
            None => None,
        };
        Ok(PluginSpec {
            kind,
            source,
            name,
            config: e.config.clone(),
        })
    }

    /// A `plugins` table as specs in load order: policies (chain order), bridge, serializer.
    fn plugins(&self, p: &Spanned<Plugins>, prefix: &str) -> Result<Vec<PluginSpec>, ConfigError> {
        let t = p.get_ref();
        let mut specs = Vec::new();
        for (i, e) in t.policy.iter().enumerate() {
            specs.push(self.plugin(e, PluginKind::Policy, &format!("{prefix}.policy[{i}]"))?);
        }
        if let Some(e) = &t.bridge {
            specs.push(self.plugin(e, PluginKind::Bridge, &format!("{prefix}.bridge"))?);
        }
        if let Some(e) = &t.serializer {
            specs.push(self.plugin(e, PluginKind::Serializer, &format!("{prefix}.serializer"))?);
        }
        if specs.is_empty() {
            return Err(self.error(
                p.span(),
                prefix,
                "names no plugin; leave the table out to inherit the plugins instead".into(),
            ));
        }
        // Names key plugin state and `ctl swap`; two plugins of one set must not share one.
        let mut names: Vec<String> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.name();
            if names.contains(&name) {
                let field = match spec.kind {
                    PluginKind::Policy => format!("{prefix}.policy[{i}]"),
                    kind => format!("{prefix}.{kind}"),
                };
                let span = match spec.kind {
                    PluginKind::Policy => t.policy[i].span(),
                    PluginKind::Bridge => t.bridge.as_ref().map_or(p.span(), |e| e.span()),
                    PluginKind::Serializer => t.serializer.as_ref().map_or(p.span(), |e| e.span()),
                };
                return Err(self.error(
                    span,
                    field,
                    format!("a second plugin named `{name}`; give one a `name`"),
                ));
            }
            names.push(name);
        }
        Ok(specs)
    }

    fn check(&self, doc: Doc) -> Result<Loaded, ConfigError> {
        let control_socket = doc
            .control_socket
            .as_ref()
            .map(|s| self.path_field(s, "control-socket"))
            .transpose()?;
        let plugin_cache = doc
            .plugin_cache
            .as_ref()
            .map(|s| self.path_field(s, "plugin-cache"))
            .transpose()?;
        let max_connections = self.number(
            &doc.limits.max_connections,
            "limits.max-connections",
            check_max_connections,
        )?;
        let max_buffered = self.number(
            &doc.limits.max_buffered,
            "limits.max-buffered",
            check_max_buffered,
        )?;
        let landlock = doc.sandbox.landlock.as_ref().is_some_and(|v| *v.get_ref());
        let landlock_rw = doc
            .sandbox
            .writable
            .iter()
            .enumerate()
            .map(|(i, v)| self.path_field(v, &format!("sandbox.writable[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if let (false, Some(first)) = (landlock, doc.sandbox.writable.first()) {
            return Err(self.error(
                first.span(),
                "sandbox.writable",
                "writable directories need `landlock = true`".into(),
            ));
        }
        let allow_routes = self.routes(&doc.routes, "routes.")?;
        let plugins = match &doc.plugins {
            Some(p) => self.plugins(p, "plugins")?,
            None => Vec::new(),
        };
        if doc.vm.is_empty() {
            return Err(self.error(0..0, "vm", "no VM to serve: add a [[vm]] table".into()));
        }

        // Paths and CIDs already taken, with where they were given.
        let mut paths: Vec<(PathBuf, String, Range<usize>)> = Vec::new();
        if let (Some(path), Some(v)) = (&control_socket, &doc.control_socket) {
            paths.push((path.clone(), "control-socket".into(), v.span()));
        }
        let mut cids: Vec<(u64, String)> = Vec::new();
        let mut specs = Vec::with_capacity(doc.vm.len());
        for (i, vm) in doc.vm.iter().enumerate() {
            let p = format!("vm[{i}]");
            let guest_cid =
                self.number(&vm.guest_cid, &format!("{p}.guest-cid"), check_guest_cid)?;
            let cid = guest_cid.unwrap_or(super::DEFAULT_GUEST_CID);
            if let Some((_, first)) = cids.iter().find(|(c, _)| *c == cid) {
                let (span, field) = match &vm.guest_cid {
                    Some(c) => (c.span(), format!("{p}.guest-cid")),
                    None => (vm.socket.span(), p.clone()),
                };
                return Err(self.error(
                    span,
                    field,
                    format!("guest CID {cid} is already given to {first}"),
                ));
            }
            let (line, _) = self.line_col(vm.socket.span().start);
            cids.push((cid, format!("{p} (line {line})")));

            let socket = self.path_field(&vm.socket, &format!("{p}.socket"))?;
            let uds_path = vm
                .uds_path
                .as_ref()
                .map(|u| {
                    self.path_field(u, &format!("{p}.uds-path"))
                        .map(|path| (path, u))
                })
                .transpose()?;
            let forward_cid = self.number(
                &vm.forward_cid,
                &format!("{p}.forward-cid"),
                check_forward_cid,
            )?;
            let forward_listen = match &vm.forward_listen {
                None => None,
                Some(v) => {
                    let ports = match v.get_ref() {
                        Ports::Joined(s) => parse_forward_listen(s),
                        Ports::List(l) => l
                            .iter()
                            .map(|n| {
                                u32::try_from(*n).map_err(|_| format!("port {n} is out of range"))
                            })
                            .collect::<Result<Vec<_>, _>>()
                            .and_then(|ports| check_forward_ports(&ports).map(|()| ports)),
                    };
                    let ports = ports
                        .map_err(|m| self.error(v.span(), format!("{p}.forward-listen"), m))?;
                    Some(ports)
                }
            };
            let mut named = vec![(&socket, &vm.socket, "socket")];
            if let Some((path, v)) = &uds_path {
                named.push((path, v, "uds-path"));
            }
            for (path, v, name) in named {
                let field = format!("{p}.{name}");
                if let Some((_, first, first_span)) = paths.iter().find(|(q, ..)| q == path) {
                    let (line, _) = self.line_col(first_span.start);
                    return Err(self.error(
                        v.span(),
                        field,
                        format!(
                            "path {} is already used as {first} (line {line})",
                            path.display()
                        ),
                    ));
                }
                paths.push((path.clone(), field, v.span()));
            }
            let plugins = match &vm.plugins {
                Some(t) => Some(self.plugins(t, &format!("{p}.plugins"))?),
                None => None,
            };
            let routes = match &vm.routes {
                Some(r) => self.routes(r, &format!("{p}.routes."))?,
                None => Vec::new(),
            };
            let mut spec = VmSpec {
                guest_cid,
                socket: Some(socket),
                uds_path: uds_path.map(|(path, _)| path),
                forward_cid,
                forward_listen,
                tx_buffer_size: self.number(
                    &vm.tx_buffer_size,
                    &format!("{p}.tx-buffer-size"),
                    check_tx_buffer_size,
                )?,
                queue_size: self.number(
                    &vm.queue_size,
                    &format!("{p}.queue-size"),
                    check_queue_size,
                )?,
                groups: vm.groups.clone(),
                max_connections: self.number(
                    &vm.max_connections,
                    &format!("{p}.max-connections"),
                    check_max_connections,
                )?,
                plugins,
                allow_routes: routes,
                connect_wait: match &vm.connect_wait {
                    Some(v) => super::parse_connect_wait(v.get_ref())
                        .map_err(|m| self.error(v.span(), format!("{p}.connect-wait"), m))?,
                    None => None,
                },
                warnings: Vec::new(),
            };
            // Our own format: a forward-listen next to a uds-path is an error, not ignored.
            if spec.uds_path.is_some() && spec.forward_listen.is_some() {
                let span = vm.forward_listen.as_ref().map_or(0..0, |v| v.span());
                return Err(self.error(
                    span,
                    format!("{p}.forward-listen"),
                    "forward-listen needs forward-cid instead of uds-path".into(),
                ));
            }
            spec.check_backend("forward-listen", "uds-path")
                .map_err(|m| self.error(vm.socket.span(), p.clone(), m))?;
            specs.push(spec);
        }
        Ok(Loaded {
            specs,
            plugins,
            allow_routes,
            control_socket,
            plugin_cache,
            max_connections,
            max_buffered,
            landlock,
            landlock_rw,
        })
    }
}

#[cfg(test)]
mod tests;
