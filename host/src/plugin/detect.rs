//! Which world, of which WIT package version, a component implements, and its linked,
//! type-checked `InstancePre` for that world.

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{bridge_world, policy_world, serializer_world, v0_1, v0_2};
use super::cache::hex;
use super::dispatch::WitVersion;
use super::runtime::PluginInfo;
use super::store::HostState;
use super::{PluginError, PluginKind, PluginRuntime};

/// A linked plugin of one kind and version, ready to instantiate.
pub(crate) enum KindPre {
    Policy(policy_world::PolicyPluginPre<HostState>),
    Bridge(bridge_world::BridgePluginPre<HostState>),
    Serializer(serializer_world::SerializerPluginPre<HostState>),
    PolicyV0_1(v0_1::policy_world::PolicyPluginPre<HostState>),
    BridgeV0_1(v0_1::bridge_world::BridgePluginPre<HostState>),
    SerializerV0_1(v0_1::serializer_world::SerializerPluginPre<HostState>),
    PolicyV0_2(v0_2::policy_world::PolicyPluginPre<HostState>),
    BridgeV0_2(v0_2::bridge_world::BridgePluginPre<HostState>),
    SerializerV0_2(v0_2::serializer_world::SerializerPluginPre<HostState>),
}

const PACKAGE: &str = "vhost-plug:plugin/";

/// The interface name and package version of an export of our package:
/// `vhost-plug:plugin/policy@0.2.1` is (`policy`, `Some(Ok(V0_2))`); `Some(Err(v))` is a
/// version this daemon does not know; `None` an unversioned name.
fn our_export(export: &str) -> Option<(&str, Option<Result<WitVersion, &str>>)> {
    let rest = export.strip_prefix(PACKAGE)?;
    Some(match rest.split_once('@') {
        None => (rest, None),
        Some((name, v)) if v.starts_with("0.1.") => (name, Some(Ok(WitVersion::V0_1))),
        Some((name, v)) if v.starts_with("0.2.") => (name, Some(Ok(WitVersion::V0_2))),
        Some((name, v)) if v.starts_with("0.3.") => (name, Some(Ok(WitVersion::V0_3))),
        Some((name, v)) => (name, Some(Err(v))),
    })
}

impl PluginRuntime {
    /// Finds the world from the component's exports (the distinguishing interface decides the
    /// kind and the package version), or says precisely why it implements none.
    pub(crate) fn inspect(
        &self,
        component: &Component,
        bytes: &[u8],
    ) -> Result<(PluginInfo, KindPre), PluginError> {
        let engine = &self.shared.engine;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        // Version of an export of `iface`; unversioned names count as the current version.
        let version_of = |iface: &str| -> Option<Result<WitVersion, String>> {
            exports.iter().find_map(|e| match our_export(e) {
                Some((name, v)) if name == iface => Some(match v {
                    None => Ok(WitVersion::V0_3),
                    Some(Ok(v)) => Ok(v),
                    Some(Err(v)) => Err(v.to_string()),
                }),
                _ => None,
            })
        };
        let candidates = [
            (PluginKind::Policy, &["policy", "stateful"][..]),
            (PluginKind::Bridge, &["bridge", "stateful"][..]),
            (PluginKind::Serializer, &["serializer"][..]),
        ];
        let mut problems = Vec::new();
        let matching: Vec<_> = candidates
            .iter()
            .filter_map(|(k, ifs)| version_of(ifs[0]).map(|v| (*k, *ifs, v)))
            .collect();
        if matching.is_empty() {
            problems.push(format!(
                "exports none of `{PACKAGE}policy`, `{PACKAGE}bridge`, `{PACKAGE}serializer` \
                 of version 0.1, 0.2 or 0.3 (exports: [{}])",
                exports.join(", "),
            ));
        }
        if matching.len() > 1 {
            problems.push(format!(
                "exports more than one plugin interface: [{}]",
                exports.join(", ")
            ));
        }
        if let [(kind, ifs, v)] = &matching[..] {
            let (kind, ifs) = (*kind, *ifs);
            let version = match v {
                Ok(v) => Some(*v),
                Err(v) => {
                    problems.push(format!(
                        "exports `{PACKAGE}{}@{v}`: this daemon loads versions 0.1.x, 0.2.x and 0.3.x",
                        ifs[0]
                    ));
                    None
                }
            };
            if let Some(version) = version {
                for i in &ifs[1..] {
                    if version_of(i).and_then(Result::ok) != Some(version) {
                        problems.push(format!(
                            "{} world: missing export `{PACKAGE}{i}@{}`",
                            kind.world(version),
                            version.as_str()
                        ));
                    }
                }
                if problems.is_empty() {
                    match self.pre(component, kind, version) {
                        Ok(pre) => {
                            let wasi_imports = imports
                                .iter()
                                .filter(|i| i.starts_with("wasi:"))
                                .cloned()
                                .collect();
                            let info = PluginInfo {
                                kind,
                                version,
                                world: kind.world(version),
                                imports,
                                exports,
                                wasi_imports,
                                size: bytes.len(),
                                sha256: hex(&Sha256::digest(bytes)),
                            };
                            return Ok((info, pre));
                        }
                        Err(e) => problems.push(format!("{} world: {e}", kind.world(version))),
                    }
                }
            }
        }
        Err(PluginError::NotAPlugin { problems })
    }

    /// Link imports and type-check exports for one world. Errors name the unsatisfied import or
    /// the export whose type does not match.
    fn pre(
        &self,
        component: &Component,
        kind: PluginKind,
        version: WitVersion,
    ) -> Result<KindPre, String> {
        let ipre = self
            .shared
            .linker
            .instantiate_pre(component)
            .map_err(|e| format!("{e:#}"))?;
        let e = |e: wasmtime::Error| format!("{e:#}");
        Ok(match (kind, version) {
            (PluginKind::Policy, WitVersion::V0_3) => {
                KindPre::Policy(policy_world::PolicyPluginPre::new(ipre).map_err(e)?)
            }
            (PluginKind::Bridge, WitVersion::V0_3) => {
                KindPre::Bridge(bridge_world::BridgePluginPre::new(ipre).map_err(e)?)
            }
            (PluginKind::Serializer, WitVersion::V0_3) => {
                KindPre::Serializer(serializer_world::SerializerPluginPre::new(ipre).map_err(e)?)
            }
            (PluginKind::Policy, WitVersion::V0_2) => {
                KindPre::PolicyV0_2(v0_2::policy_world::PolicyPluginPre::new(ipre).map_err(e)?)
            }
            (PluginKind::Bridge, WitVersion::V0_2) => {
                KindPre::BridgeV0_2(v0_2::bridge_world::BridgePluginPre::new(ipre).map_err(e)?)
            }
            (PluginKind::Serializer, WitVersion::V0_2) => KindPre::SerializerV0_2(
                v0_2::serializer_world::SerializerPluginPre::new(ipre).map_err(e)?,
            ),
            (PluginKind::Policy, WitVersion::V0_1) => {
                KindPre::PolicyV0_1(v0_1::policy_world::PolicyPluginPre::new(ipre).map_err(e)?)
            }
            (PluginKind::Bridge, WitVersion::V0_1) => {
                KindPre::BridgeV0_1(v0_1::bridge_world::BridgePluginPre::new(ipre).map_err(e)?)
            }
            (PluginKind::Serializer, WitVersion::V0_1) => KindPre::SerializerV0_1(
                v0_1::serializer_world::SerializerPluginPre::new(ipre).map_err(e)?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names() {
        let v =
            |e| our_export(e).map(|(n, v)| (n.to_string(), v.map(|r| r.map_err(str::to_string))));
        assert_eq!(
            v("vhost-plug:plugin/policy@0.1.0"),
            Some(("policy".into(), Some(Ok(WitVersion::V0_1))))
        );
        assert_eq!(
            v("vhost-plug:plugin/bridge@0.2.3"),
            Some(("bridge".into(), Some(Ok(WitVersion::V0_2))))
        );
        assert_eq!(
            v("vhost-plug:plugin/policy@1.0.0"),
            Some(("policy".into(), Some(Err("1.0.0".into()))))
        );
        assert_eq!(
            v("vhost-plug:plugin/serializer@0.3.0"),
            Some(("serializer".into(), Some(Ok(WitVersion::V0_3))))
        );
        assert_eq!(v("vhost-plug:plugin/policy"), Some(("policy".into(), None)));
        assert_eq!(v("wasi:io/poll@0.2.6"), None);
    }
}
