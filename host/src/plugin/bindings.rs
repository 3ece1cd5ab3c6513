//! Host-side bindings generated from `wit/` (one `bindgen!` per world; the later ones reuse the
//! first one's `types` and `host` modules so every world shares one set of Rust types).
//!
//! [`v0_2`] and [`v0_1`] hold the same three worlds of the frozen `vhost-plug:plugin@0.2.0`
//! (`wit/0.2.0/`) and `@0.1.0` (`wit/0.1.0/`), so that plugins built against them keep
//! loading; [`super::compat`] converts between their types and the current ones (0.3.0).

pub(crate) mod policy_world {
    wasmtime::component::bindgen!({
        world: "policy-plugin",
        path: "../wit",
        additional_derives: [PartialEq, Eq],
    });
}

pub(crate) mod bridge_world {
    wasmtime::component::bindgen!({
        world: "bridge-plugin",
        path: "../wit",
        with: {
            "vhost-plug:plugin/types": super::policy_world::vhost_plug::plugin::types,
            "vhost-plug:plugin/host": super::policy_world::vhost_plug::plugin::host,
        },
    });
}

pub(crate) mod serializer_world {
    wasmtime::component::bindgen!({
        world: "serializer-plugin",
        path: "../wit",
        with: {
            "vhost-plug:plugin/types": super::policy_world::vhost_plug::plugin::types,
            "vhost-plug:plugin/host": super::policy_world::vhost_plug::plugin::host,
        },
    });
}

pub(crate) use policy_world::vhost_plug::plugin::{host, types};

/// Bindings of `vhost-plug:plugin@0.2.0`.
pub(crate) mod v0_2 {
    pub(crate) mod policy_world {
        wasmtime::component::bindgen!({
            world: "policy-plugin",
            path: "../wit/0.2.0",
            additional_derives: [PartialEq, Eq],
        });
    }

    pub(crate) mod bridge_world {
        wasmtime::component::bindgen!({
            world: "bridge-plugin",
            path: "../wit/0.2.0",
            with: {
                "vhost-plug:plugin/types": super::policy_world::vhost_plug::plugin::types,
                "vhost-plug:plugin/host": super::policy_world::vhost_plug::plugin::host,
            },
        });
    }

    pub(crate) mod serializer_world {
        wasmtime::component::bindgen!({
            world: "serializer-plugin",
            path: "../wit/0.2.0",
            with: {
                "vhost-plug:plugin/types": super::policy_world::vhost_plug::plugin::types,
                "vhost-plug:plugin/host": super::policy_world::vhost_plug::plugin::host,
            },
        });
    }

    pub(crate) use policy_world::vhost_plug::plugin::{host, types};
}

/// Bindings of `vhost-plug:plugin@0.1.0`.
pub(crate) mod v0_1 {
    pub(crate) mod policy_world {
        wasmtime::component::bindgen!({
            world: "policy-plugin",
            path: "../wit/0.1.0",
            additional_derives: [PartialEq, Eq],
        });
    }

    pub(crate) mod bridge_world {
        wasmtime::component::bindgen!({
            world: "bridge-plugin",
            path: "../wit/0.1.0",
            with: {
                "vhost-plug:plugin/types": super::policy_world::vhost_plug::plugin::types,
                "vhost-plug:plugin/host": super::policy_world::vhost_plug::plugin::host,
            },
        });
    }

    pub(crate) mod serializer_world {
        wasmtime::component::bindgen!({
            world: "serializer-plugin",
            path: "../wit/0.1.0",
            with: {
                "vhost-plug:plugin/types": super::policy_world::vhost_plug::plugin::types,
                "vhost-plug:plugin/host": super::policy_world::vhost_plug::plugin::host,
            },
        });
    }

    pub(crate) use policy_world::vhost_plug::plugin::{host, types};
}
