//! Error types of the plugin runtime.
use super::PluginKind;

/// Why one plugin call failed. Every failure fails closed (the decision becomes a deny).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The per-call deadline (epoch interruption) expired.
    Deadline,
    /// The plugin trapped (panic, `unreachable`, out-of-bounds access, ...).
    Trap,
    /// The plugin hit its memory or table limit.
    MemoryLimit,
    /// The plugin returned something the host refuses (too long, invalid route, bad state).
    Malformed,
    /// A fresh instance could not be created.
    Instantiate,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureKind::Deadline => "deadline expired",
            FailureKind::Trap => "trap",
            FailureKind::MemoryLimit => "memory limit",
            FailureKind::Malformed => "malformed result",
            FailureKind::Instantiate => "instantiation failed",
        })
    }
}

/// Errors of the plugin runtime.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("reading plugin {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error("unknown built-in plugin `{0}`")]
    UnknownBuiltin(String),
    #[error("configuring the wasm engine: {0}")]
    Engine(String),
    #[error("not a loadable WebAssembly component: {0}")]
    Compile(String),
    /// The component implements none of the plugin worlds; `problems` says what is missing/wrong.
    #[error("not a vhost-plug plugin: {}", problems.join("; "))]
    NotAPlugin { problems: Vec<String> },
    #[error("plugin `{name}` is a {actual} plugin, expected a {expected} plugin")]
    WrongKind {
        name: String,
        expected: PluginKind,
        actual: PluginKind,
    },
    #[error("precompiled artifact {path}: {reason}")]
    Cache { path: String, reason: String },
    #[error("plugin `{plugin}` failed ({kind}): {detail}")]
    Call {
        plugin: String,
        kind: FailureKind,
        detail: String,
    },
    #[error(
        "plugin `{plugin}` is quarantined after {failures} consecutive failures (last: {last})"
    )]
    Quarantined {
        plugin: String,
        failures: u32,
        last: String,
    },
    /// The plugin ran fine and answered with an error of its own (e.g. `import-state` refusing a
    /// schema, `decode` refusing a blob).
    #[error("plugin `{plugin}`: {message}")]
    Refused { plugin: String, message: String },
    #[error("no plugin named `{0}` in this chain")]
    NoSuchPlugin(String),
    #[error("invalid device state: {0}")]
    InvalidState(String),
}

impl PluginError {
    /// Whether this error is a failure of the plugin (as opposed to its regular answer).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            PluginError::Call { .. } | PluginError::Quarantined { .. }
        )
    }
}
