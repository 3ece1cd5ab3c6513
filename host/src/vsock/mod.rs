//! virtio-vsock wire format: packet header and descriptor chains.
pub mod chain;
pub mod header;
