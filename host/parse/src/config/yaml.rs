//! The YAML config file.
//!
//! Schema (the peer's, with field names spelled with `_`):
//!
//! ```yaml
//! vms:
//!   - guest_cid: 3            # optional, default 3
//!     socket: /tmp/vhost3.socket
//!     uds_path: /tmp/vm3.sock  # or the vsock forwarding backend:
//!     # forward_cid: 1          #   guest connections go to host AF_VSOCK CID 1
//!     # forward_listen: 9001+9002  # host AF_VSOCK ports forwarded into the guest
//!     tx_buffer_size: 65536   # optional
//!     queue_size: 1024        # optional
//!     groups: group1+groupA   # optional, '+'-joined (ours: a YAML list also works)
//!     max_connections: 16384  # optional, ours
//!     connect_wait: 5s        # optional, ours: retry a refused host CONNECT until then
//! ```
//!
//! Compatibility: like the peer, unknown fields are ignored and `null` means "not given".
//! Unlike the peer, a field spelled with `-` (`guest-cid`) is read (the peer silently ignores
//! it), with a warning; the `_` spelling wins when both are given. Other top-level keys than
//! `vms` are ignored with a warning (the peer fails on most of them).
//!
//! Deserialization is hand-written so that every error keeps serde_yaml's position (line and
//! column of the offending value) and we know which field it concerns.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{
    check_forward_cid, check_guest_cid, check_max_connections, check_path, check_queue_size,
    check_tx_buffer_size, parse_forward_listen, split_groups, ConfigError, VmSpec,
};

pub(super) struct Loaded {
    pub specs: Vec<VmSpec>,
    pub warnings: Vec<String>,
}

pub(super) fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(path, &text)
}

/// Parses `text` as the content of the config file `path` (named in errors and warnings).
pub(super) fn parse_str(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let ctx = Ctx::default();
    match (DocSeed { ctx: &ctx }).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(specs) => Ok(Loaded {
            specs,
            warnings: ctx
                .warnings
                .into_inner()
                .into_iter()
                .map(|w| format!("{}: {w}", path.display()))
                .collect(),
        }),
        Err(e) => Err(yaml_error(path, ctx.field.into_inner(), &e)),
    }
}

fn yaml_error(path: &Path, field: Option<String>, e: &serde_yaml::Error) -> ConfigError {
    let mut message = e.to_string();
    let Some(loc) = e.location() else {
        return ConfigError::ConfigFile {
            path: path.to_path_buf(),
            message,
        };
    };
    // serde_yaml's message is "<path>: <message> at line L column C" (syntax errors: no path,
    // and possibly more text after the position); keep only <message>.
    let at = format!(" at line {} column {}", loc.line(), loc.column());
    message = message.replacen(&at, "", 1);
    if let Some(f) = &field {
        if let Some(rest) = message.strip_prefix(&format!("{f}: ")) {
            message = rest.to_string();
        }
    }
    ConfigError::Yaml {
        path: path.to_path_buf(),
        field,
        line: loc.line(),
        column: loc.column(),
        message,
    }
}

/// Which field is being read (serde_yaml's path syntax: `vms[1].guest_cid`) and the warnings.
#[derive(Default)]
struct Ctx {
    field: RefCell<Option<String>>,
    warnings: RefCell<Vec<String>>,
}

impl Ctx {
    fn at(&self, field: Option<String>) {
        *self.field.borrow_mut() = field;
    }

    fn warn(&self, warning: String) {
        self.warnings.borrow_mut().push(warning);
    }
}

/// The document: a mapping with a `vms` list.
struct DocSeed<'a> {
    ctx: &'a Ctx,
}

impl<'de> DeserializeSeed<'de> for DocSeed<'_> {
    type Value = Vec<VmSpec>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_> {
    type Value = Vec<VmSpec>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with a `vms` list")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let mut vms = None;
        loop {
            ctx.at(None);
            let Some(key) = map.next_key::<String>()? else {
                break;
            };
            ctx.at(Some(key.clone()));
            if key == "vms" {
                if vms.is_some() {
                    ctx.warn("`vms` is given twice; the last one is used".into());
                }
                vms = Some(map.next_value_seed(VmsSeed { ctx })?);
            } else {
                ctx.warn(format!("unknown top-level key `{key}` is ignored"));
                map.next_value::<IgnoredAny>()?;
            }
        }
        ctx.at(None);
        vms.ok_or_else(|| de::Error::missing_field("vms"))
    }
}

/// The `vms` list.
struct VmsSeed<'a> {
    ctx: &'a Ctx,
}

impl<'de> DeserializeSeed<'de> for VmsSeed<'_> {
    type Value = Vec<VmSpec>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for VmsSeed<'_> {
    type Value = Vec<VmSpec>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of VMs")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let mut vms = Vec::new();
        loop {
            let index = vms.len();
            ctx.at(Some(format!("vms[{index}]")));
            match seq.next_element_seed(VmSeed { ctx, index })? {
                Some(vm) => vms.push(vm),
                None => break,
            }
        }
        ctx.at(Some("vms".into()));
        if vms.is_empty() {
            return Err(de::Error::custom("the list of VMs is empty"));
        }
        Ok(vms)
    }
}

/// A value set by a field that has two spellings.
struct Slot<T> {
    value: Option<T>,
    /// The key that set it.
    key: Option<String>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            value: None,
            key: None,
        }
    }
}

impl<T> Slot<T> {
    /// Stores `value` read from `key`, unless an `_` spelling already set it and `key` is the
    /// `-` spelling (the peer only knows the `_` one).
    fn put(&mut self, ctx: &Ctx, prefix: &str, key: &str, value: Option<T>) {
        let dashed = key.contains('-');
        match &self.key {
            Some(old) if old == key => {
                ctx.warn(format!(
                    "{prefix}.{key} is given twice; the last value is used"
                ));
            }
            Some(old) if dashed => {
                ctx.warn(format!("{prefix}.{key} is ignored: {old} is also given"));
                return;
            }
            Some(old) => {
                ctx.warn(format!("{prefix}.{old} is ignored: {key} is also given"));
            }
            None if dashed => ctx.warn(format!(
                "{prefix}.{key} is read as {} (vhost-device-vsock 0.3.0 ignores fields spelled \
                 with '-' in config files)",
                key.replace('-', "_")
            )),
            None => {}
        }
        self.value = value;
        self.key = Some(key.to_string());
    }
}

/// One entry of `vms`.
struct VmSeed<'a> {
    ctx: &'a Ctx,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for VmSeed<'_> {
    type Value = VmSpec;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for VmSeed<'_> {
    type Value = VmSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping describing a VM")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let prefix = format!("vms[{}]", self.index);
        let mut guest_cid = Slot::default();
        let mut socket = Slot::default();
        let mut uds_path = Slot::default();
        let mut tx_buffer_size = Slot::default();
        let mut queue_size = Slot::default();
        let mut groups = Slot::default();
        let mut max_connections = Slot::default();
        let mut plugins = Slot::default();
        let mut connect_wait = Slot::default();
        let mut forward_cid = Slot::default();
        let mut forward_listen = Slot::default();
        loop {
            ctx.at(Some(prefix.clone()));
            let Some(key) = map.next_key::<String>()? else {
                break;
            };
            ctx.at(Some(format!("{prefix}.{key}")));
            match key.as_str() {
                "guest_cid" | "guest-cid" => {
                    let v = map.next_value_seed(Number(check_guest_cid, "a guest CID"))?;
                    guest_cid.put(ctx, &prefix, &key, v);
                }
                "socket" => {
                    let v = map.next_value_seed(PathSeed)?;
                    socket.put(ctx, &prefix, &key, v);
                }
                "uds_path" | "uds-path" => {
                    let v = map.next_value_seed(PathSeed)?;
                    uds_path.put(ctx, &prefix, &key, v);
                }
                "tx_buffer_size" | "tx-buffer-size" => {
                    let v = map.next_value_seed(Number(check_tx_buffer_size, "a size in bytes"))?;
                    tx_buffer_size.put(ctx, &prefix, &key, v);
                }
                "queue_size" | "queue-size" => {
                    let v = map.next_value_seed(Number(check_queue_size, "a queue size"))?;
                    queue_size.put(ctx, &prefix, &key, v);
                }
                "groups" => {
                    let v = map.next_value_seed(GroupsSeed)?;
                    groups.put(ctx, &prefix, &key, v);
                }
                "max_connections" | "max-connections" => {
                    let v = map.next_value_seed(Number(check_max_connections, "a count"))?;
                    max_connections.put(ctx, &prefix, &key, v);
                }
                "plugins" => {
                    let v = map.next_value_seed(PluginsSeed)?;
                    plugins.put(ctx, &prefix, &key, v);
                }
                "connect_wait" | "connect-wait" => {
                    let v = match map.next_value::<Option<String>>()? {
                        Some(t) => super::parse_connect_wait(&t).map_err(de::Error::custom)?,
                        None => None,
                    };
                    connect_wait.put(ctx, &prefix, &key, v);
                }
                "forward_cid" | "forward-cid" => {
                    let v = map.next_value_seed(Number(check_forward_cid, "a vsock CID"))?;
                    forward_cid.put(ctx, &prefix, &key, v);
                }
                "forward_listen" | "forward-listen" => {
                    let v = map.next_value_seed(PortsSeed)?;
                    forward_listen.put(ctx, &prefix, &key, v);
                }
                _ => {
                    ctx.warn(format!("{prefix}.{key}: unknown field, ignored"));
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        ctx.at(Some(prefix.clone()));
        if socket.value.is_none() {
            return Err(de::Error::missing_field("socket"));
        }
        let mut spec = VmSpec {
            guest_cid: guest_cid.value,
            socket: socket.value,
            uds_path: uds_path.value,
            tx_buffer_size: tx_buffer_size.value,
            queue_size: queue_size.value,
            groups: groups.value,
            max_connections: max_connections.value,
            plugins: plugins.value,
            allow_routes: Vec::new(),
            connect_wait: connect_wait.value,
            forward_cid: forward_cid.value,
            forward_listen: forward_listen.value,
            warnings: Vec::new(),
        };
        if spec.uds_path.is_none() && spec.forward_cid.is_none() {
            return Err(de::Error::missing_field("uds_path"));
        }
        spec.check_backend(&format!("{prefix}.forward_listen"), "uds_path")
            .map_err(de::Error::custom)?;
        for w in std::mem::take(&mut spec.warnings) {
            ctx.warn(w);
        }
        Ok(spec)
    }
}

/// Ours: the VM's own plugin list, `--plugin` specs as strings; replaces the global plugins.
struct PluginsSeed;

impl<'de> DeserializeSeed<'de> for PluginsSeed {
    type Value = Option<Vec<crate::spec::PluginSpec>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let Some(list) = <Option<Vec<String>> as serde::Deserialize>::deserialize(d)? else {
            return Ok(None);
        };
        list.iter()
            .map(|s| {
                s.parse()
                    .map_err(|e: crate::spec::SpecError| de::Error::custom(e))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// An optional non-negative integer, checked where it is read so errors point at it.
struct Number<T>(fn(u64) -> Result<T, String>, &'static str);

impl<'de, T> DeserializeSeed<'de> for Number<T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, T> Visitor<'de> for Number<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (a non-negative integer)", self.1)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_u64(self)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        (self.0)(v).map(Some).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }
}

/// An optional, non-empty path.
struct PathSeed;

impl<'de> DeserializeSeed<'de> for PathSeed {
    type Value = Option<PathBuf>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for PathSeed {
    type Value = Option<PathBuf>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a path")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let path = PathBuf::from(v);
        check_path(&path).map_err(E::custom)?;
        Ok(Some(path))
    }
}

/// Optional groups: `a+b` (the peer's form, trimmed first as the peer does) or a list.
struct GroupsSeed;

impl<'de> DeserializeSeed<'de> for GroupsSeed {
    type Value = Option<Vec<String>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for GroupsSeed {
    type Value = Option<Vec<String>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("group names joined by '+', or a list of group names")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(split_groups(v.trim())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut groups = Vec::new();
        while let Some(g) = seq.next_element::<String>()? {
            groups.push(g);
        }
        Ok(Some(groups))
    }
}

/// `forward_listen`: ports joined by `+` (`9001+9002`), or one port as a number; `null` is
/// "not given".
struct PortsSeed;

impl<'de> DeserializeSeed<'de> for PortsSeed {
    type Value = Option<Vec<u32>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PortsSeed {
    type Value = Option<Vec<u32>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("vsock ports joined by '+' (like 9001+9002)")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_forward_listen(v).map(Some).map_err(E::custom)
    }
}
