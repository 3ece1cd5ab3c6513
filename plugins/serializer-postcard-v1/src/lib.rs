//! serializer-postcard built against the frozen `vhost-plug:plugin@0.1.0` (test fixture): the
//! same code and format as serializer-postcard, so the daemon's tests can load a 0.1.0
//! serializer, round-trip device state through it, and read its blobs with the 0.2.0 one.

#[path = "../../serializer-postcard/src/lib.rs"]
mod postcard_v1;
