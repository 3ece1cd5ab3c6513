//! Helpers shared by vhost-plug plugins of every world (no bindings here).
//!
//! A plugin depends on the crate of its world instead — `vhost-plug-sdk-policy`,
//! `vhost-plug-sdk-bridge` or `vhost-plug-sdk-serializer` — which re-export these helpers together
//! with the world's types, the host functions (`log`, `now_ns`, `config`), a trait to implement and
//! an `export_*!` macro. (One crate per world: the bindings of a world carry a component-type
//! section, and a plugin must link exactly one.)

/// Split a config string of the form `key=value;key=value` (whitespace around items trimmed,
/// empty items skipped; an item without `=` gives an empty value).
pub fn config_items(cfg: &str) -> Vec<(&str, &str)> {
    cfg.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (item, ""),
        })
        .collect()
}

/// Minimal little-endian encoder for plugin state blobs.
#[derive(Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Length-prefixed (u32) bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Decoder matching [`StateWriter`]; every read is bounds-checked.
pub struct StateReader<'a> {
    buf: &'a [u8],
}

impl<'a> StateReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!(
                "state truncated: need {n} bytes, {} left",
                self.buf.len()
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| format!("state: bad utf-8: {e}"))
    }
    /// Fails unless every byte was consumed.
    pub fn end(&self) -> Result<(), String> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("state: {} trailing bytes", self.buf.len()))
        }
    }
}
