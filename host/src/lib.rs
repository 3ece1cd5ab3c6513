//! vhost-plug: a vhost-user virtio-vsock backend.
//!
//! Modules are layered: each imports only modules below it (docs/architecture.md draws the
//! layers; `tests/layers.rs` checks them). The parsers of untrusted input are the crate
//! `vhost-plug-parse`, the bottom layer, re-exported here.

pub use vhost_plug_parse::{blob, config, connect, mem, route, spec, vsock};
pub mod afvsock;
pub mod backend;
pub mod budget;
pub mod conn;
pub mod connlist;
pub mod connwait;
pub mod control;
pub mod ctlproto;
pub mod daemon;
pub mod device;
pub mod frame;
pub mod gate;
pub mod handed;
pub mod handover;
pub mod inspect;
pub mod listenset;
pub mod metrics;
pub mod migration;
pub mod peer;
pub mod plugin;
pub mod proxy;
pub mod relay;
pub mod residency;
pub mod sandbox;
pub mod scaffold;
pub mod scm;
pub mod session;
pub mod siblings;
pub mod stats;
pub mod sys;
pub mod upchan;
pub mod upgrade;
pub mod vm;
