//! `PluginKind` and `PluginSpec` (what the command line's plugin flag parses to).
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A `--plugin` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plugin spec `{spec}`: {reason}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

/// Names accepted by `builtin:NAME` (the plugins embedded in the daemon binary).
pub const BUILTIN_NAMES: &[&str] = &[
    "allow-group",
    "port-allowlist",
    "port-allowlist-v1",
    "peer-allowlist",
    "tcp-bridge",
    "proxy-bridge",
    "audit",
    "serializer-postcard",
    "serializer-json",
];

/// The versions of the WIT package `vhost-plug:plugin` the daemon loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WitVersion {
    /// `vhost-plug:plugin@0.1.0`: no peer identity in `conn-request`.
    V0_1,
    /// `vhost-plug:plugin@0.2.0`: no `host-vsock` route.
    V0_2,
    /// `vhost-plug:plugin@0.3.0` (current).
    V0_3,
}

impl WitVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "0.1.0",
            WitVersion::V0_2 => "0.2.0",
            WitVersion::V0_3 => "0.3.0",
        }
    }
}

/// The three plugin worlds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum PluginKind {
    Policy,
    Bridge,
    Serializer,
}

impl PluginKind {
    /// Fully qualified WIT world name in package version `v`.
    pub fn world(self, v: WitVersion) -> &'static str {
        match (self, v) {
            (PluginKind::Policy, WitVersion::V0_3) => "vhost-plug:plugin/policy-plugin@0.3.0",
            (PluginKind::Bridge, WitVersion::V0_3) => "vhost-plug:plugin/bridge-plugin@0.3.0",
            (PluginKind::Serializer, WitVersion::V0_3) => {
                "vhost-plug:plugin/serializer-plugin@0.3.0"
            }
            (PluginKind::Policy, WitVersion::V0_2) => "vhost-plug:plugin/policy-plugin@0.2.0",
            (PluginKind::Bridge, WitVersion::V0_2) => "vhost-plug:plugin/bridge-plugin@0.2.0",
            (PluginKind::Serializer, WitVersion::V0_2) => {
                "vhost-plug:plugin/serializer-plugin@0.2.0"
            }
            (PluginKind::Policy, WitVersion::V0_1) => "vhost-plug:plugin/policy-plugin@0.1.0",
            (PluginKind::Bridge, WitVersion::V0_1) => "vhost-plug:plugin/bridge-plugin@0.1.0",
            (PluginKind::Serializer, WitVersion::V0_1) => {
                "vhost-plug:plugin/serializer-plugin@0.1.0"
            }
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::Policy => "policy",
            PluginKind::Bridge => "bridge",
            PluginKind::Serializer => "serializer",
        })
    }
}

impl FromStr for PluginKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "policy" => Ok(PluginKind::Policy),
            "bridge" => Ok(PluginKind::Bridge),
            "serializer" => Ok(PluginKind::Serializer),
            other => Err(format!(
                "unknown plugin kind `{other}` (policy, bridge, serializer)"
            )),
        }
    }
}

/// Where a plugin's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    Path(PathBuf),
    /// One of [`BUILTIN_NAMES`], embedded in the binary.
    Builtin(String),
}

/// A plugin to load: `KIND=SOURCE[,name=NAME][,config=CONFIG]`.
///
/// `SOURCE` is a file path or `builtin:NAME`. `config=` must come last and takes the rest of the
/// string verbatim, commas included: `policy=builtin:port-allowlist,config=allow=2:1234,3:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    pub kind: PluginKind,
    pub source: PluginSource,
    /// Name used in logs, metrics and state records; default: builtin name or file stem.
    pub name: Option<String>,
    pub config: String,
}

impl PluginSpec {
    pub fn builtin(kind: PluginKind, name: &str, config: &str) -> Self {
        Self {
            kind,
            source: PluginSource::Builtin(name.into()),
            name: None,
            config: config.into(),
        }
    }

    pub fn name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match &self.source {
            PluginSource::Builtin(n) => n.clone(),
            PluginSource::Path(p) => p
                .file_stem()
                .map(|s| s.to_string_lossy().replace('_', "-"))
                .unwrap_or_else(|| p.display().to_string()),
        }
    }

    /// What the daemon loads with no plugin flags: the `allow-group` policy and the
    /// `serializer-postcard` serializer, both built in.
    pub fn defaults() -> Vec<PluginSpec> {
        vec![
            PluginSpec::builtin(PluginKind::Policy, "allow-group", ""),
            PluginSpec::builtin(PluginKind::Serializer, "serializer-postcard", ""),
        ]
    }
}

impl FromStr for PluginSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = |reason: &str| SpecError {
            spec: s.into(),
            reason: reason.into(),
        };
        let (head, config) = match s.find(",config=") {
            Some(i) => (&s[..i], s[i + ",config=".len()..].to_string()),
            None => (s, String::new()),
        };
        let mut parts = head.split(',');
        let first = parts.next().unwrap_or_default();
        let (kind, src) = first
            .split_once('=')
            .ok_or_else(|| err("expected KIND=PATH"))?;
        let kind: PluginKind = kind.trim().parse().map_err(|e: String| err(&e))?;
        let src = src.trim();
        if src.is_empty() {
            return Err(err("empty plugin path"));
        }
        let source = match src.strip_prefix("builtin:") {
            Some(n) => PluginSource::Builtin(n.into()),
            None => PluginSource::Path(PathBuf::from(src)),
        };
        let mut name = None;
        for p in parts {
            match p.split_once('=') {
                Some(("name", n)) if !n.is_empty() => name = Some(n.to_string()),
                _ => return Err(err(&format!("unknown option `{p}` (name=, config=)"))),
            }
        }
        Ok(PluginSpec {
            kind,
            source,
            name,
            config,
        })
    }
}
