//! virtio-vsock wire format: packet header and descriptor chains.
pub mod chain;
pub mod header;

/// Largest payload of one packet we build or accept (Linux uses 64 KiB).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
