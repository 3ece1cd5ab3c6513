//! vhost-plug: a vhost-user virtio-vsock backend.
pub mod backend;
pub mod config;
pub mod conn;
pub mod control;
pub mod daemon;
pub mod device;
pub mod gate;
pub mod mem;
pub mod migration;
pub mod plugin;
pub mod scaffold;
pub mod siblings;
pub mod sys;
pub mod vm;
pub mod vsock;
