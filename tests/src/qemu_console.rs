//! A QEMU guest's serial console as a stream of `@@` marker lines: the guest's `/init`
//! (`tests/guest/init`) and its helpers report on it, and the host tests wait on it.
//! Shared by the single-guest rig ([`crate::qemu::QemuRig`]) and the sibling pair
//! ([`crate::qemu_pair::GuestPair`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::qemu::Qemu;

/// One `@@ <kind> <scenario> <rest>` line of the serial console.
#[derive(Clone, Debug)]
pub struct Marker {
    pub kind: String,
    pub scenario: String,
    pub rest: String,
}

impl Marker {
    pub fn parse(line: &str) -> Option<Marker> {
        let at = line.find("@@ ")?;
        let mut words = line[at + 3..].trim_end().splitn(3, ' ');
        Some(Marker {
            kind: words.next()?.to_string(),
            scenario: words.next().unwrap_or("").to_string(),
            rest: words.next().unwrap_or("").to_string(),
        })
    }

    /// `key=value` words of the rest of the line.
    pub fn values(&self) -> BTreeMap<String, String> {
        self.rest
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn value(&self, key: &str) -> Result<String> {
        self.values().remove(key).with_context(|| {
            format!(
                "no {key}= in `@@ {} {} {}`",
                self.kind, self.scenario, self.rest
            )
        })
    }
}

/// What ended a wait for the next marker.
#[derive(Debug)]
pub enum Next {
    Marker(Marker),
    /// QEMU exited and every line it wrote has been consumed.
    Exited(ExitStatus),
    TimedOut,
}

/// The markers of one boot's serial log, consumed in order.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    consumed: usize,
}

impl Console {
    pub fn new(path: &Path) -> Console {
        Console {
            path: path.to_path_buf(),
            consumed: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every marker on complete lines so far (the last line may still be being written).
    pub fn markers(&self) -> Vec<Marker> {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let complete = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => "",
        };
        complete.lines().filter_map(Marker::parse).collect()
    }

    /// The next unconsumed marker, waiting until `deadline`; `qemu` (the console's writer)
    /// exiting ends the wait once its last lines are consumed.
    pub fn next(&mut self, deadline: Instant, mut qemu: Option<&mut Qemu>) -> Next {
        loop {
            let markers = self.markers();
            if let Some(m) = markers.get(self.consumed) {
                self.consumed += 1;
                return Next::Marker(m.clone());
            }
            if let Some(st) = qemu.as_mut().and_then(|q| q.exited()) {
                // Lines written just before the exit are on disk now.
                if self.markers().len() == self.consumed {
                    return Next::Exited(st);
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Next::TimedOut;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` lines of the log.
    pub fn tail(&self, n: usize) -> String {
        tail(&std::fs::read(&self.path).unwrap_or_default(), n)
    }
}

/// The last `n` lines of `bytes`.
pub fn tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse() {
        let m = Marker::parse("[  1.0] @@ OK h2g bytes=5 sha256=ab\r").expect("marker");
        assert_eq!((m.kind.as_str(), m.scenario.as_str()), ("OK", "h2g"));
        assert_eq!(m.value("bytes").expect("bytes"), "5");
        assert!(m.value("nope").is_err());
        let up = Marker::parse("@@ UP").expect("UP");
        assert_eq!((up.kind.as_str(), up.scenario.as_str()), ("UP", ""));
        assert!(Marker::parse("no marker").is_none());
        assert_eq!(tail(b"a\nb\nc\n", 2), "b\nc");
    }

    #[test]
    fn console_consumes_complete_lines_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        std::fs::write(&path, "boot noise\n@@ UP\n@@ OK a x=1\n@@ PART").expect("write");
        let mut c = Console::new(&path);
        let soon = Instant::now() + Duration::from_millis(200);
        let kinds: Vec<String> = (0..3)
            .map(|_| match c.next(soon, None) {
                Next::Marker(m) => m.kind,
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["UP", "OK", "TimedOut"]);
    }
}
