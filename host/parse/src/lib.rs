//! Parsers of everything untrusted that reaches vhost-plug, as plain values.
//!
//! This crate is the bottom layer of the daemon (see docs/architecture.md): it imports no other
//! part of vhost-plug, runs no plugin and opens no socket. Everything a guest, a host program, a
//! VMM's state pipe or an operator's config can send is parsed and bounded here first.
pub mod blob;
pub mod config;
pub mod connect;
pub mod mem;
pub mod route;
pub mod spec;
pub mod vsock;
