//! Gives back the memory that only starting the daemon needed.
//!
//! Starting runs code that an idle daemon never runs again: argument and TOML parsing, the
//! wasm engine's setup, loading and type-checking plugins. Those pages of the executable
//! stay mapped (and counted in RSS) long after, although they are clean copies of the file
//! in the page cache. Once every VM is ready the daemon unmaps them (`MADV_DONTNEED` on the
//! executable's read-only, file-backed mappings); code that runs later faults back in from
//! the page cache (a minor fault). Pages the process wrote (relocated data, anything
//! anonymous) are never touched, and freed heap is returned with `malloc_trim`.
use std::io;

/// What [`release_startup_pages`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Mappings of the executable unmapped.
    pub mappings: usize,
    /// Their size in bytes (resident or not).
    pub bytes: usize,
}

/// One mapping from `/proc/self/smaps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    writable: bool,
    path: String,
    /// `Anonymous:` kB: private copies the process made (relocations); must be kept.
    anonymous_kib: u64,
}

/// Parses the mappings of `/proc/self/smaps` text.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                let perms = words.next().unwrap_or("");
                // offset, device, inode, then the path (which may contain spaces).
                let path = words.skip(3).collect::<Vec<_>>().join(" ");
                out.push(Mapping {
                    start,
                    end,
                    writable: perms.as_bytes().get(1) == Some(&b'w'),
                    path,
                    anonymous_kib: 0,
                });
                continue;
            }
        }
        if first == "Anonymous:" {
            if let (Some(m), Some(kib)) = (out.last_mut(), words.next()) {
                // Unparsable means "unknown": keep the mapping.
                m.anonymous_kib = kib.parse().unwrap_or(u64::MAX);
            }
        }
    }
    out
}

/// The mappings that may be dropped: the executable's, read-only, with no private pages.
fn releasable<'a>(maps: &'a [Mapping], exe: &'a str) -> impl Iterator<Item = &'a Mapping> {
    maps.iter()
        .filter(move |m| m.path == exe && !m.writable && m.anonymous_kib == 0)
}

/// Unmaps the executable's clean pages and trims the heap (see the module comment).
pub fn release_startup_pages() -> io::Result<Released> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let maps = parse_smaps(&smaps);
    let mut done = Released::default();
    for m in releasable(&maps, &exe) {
        let len = m.end - m.start;
        // SAFETY: the range is one whole mapping of the executable file, read-only and with no
        // anonymous (private, written) pages, so MADV_DONTNEED only drops page-table entries
        // of clean page-cache pages: later accesses fault the same bytes back in from the
        // file. No Rust object lives in it (it is code and read-only data), and mappings
        // cannot become writable behind our back (nothing in the daemon calls mprotect).
        let r = unsafe { libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        done.mappings += 1;
        done.bytes += len;
    }
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it has no
    // preconditions.
    unsafe { libc::malloc_trim(0) };
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 123 /usr/bin/vhost plug
Size:               1024 kB
Anonymous:             0 kB
55d0a0100000-55d0a0200000 r-xp 00100000 fd:01 123 /usr/bin/vhost plug
Anonymous:             0 kB
55d0a0200000-55d0a0210000 r--p 00200000 fd:01 123 /usr/bin/vhost plug
Anonymous:            64 kB
55d0a0210000-55d0a0211000 rw-p 00210000 fd:01 123 /usr/bin/vhost plug
Anonymous:             4 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 456 /usr/lib/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Anonymous:           512 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_executable() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 6);
        let picked: Vec<usize> = releasable(&maps, "/usr/bin/vhost plug")
            .map(|m| m.start)
            .collect();
        // Text and rodata; not the relocated (anonymous) part, not .data, not libc.
        assert_eq!(picked, [0x55d0a0000000, 0x55d0a0100000]);
    }

    #[test]
    fn releasing_keeps_the_process_working() {
        let r = release_startup_pages().expect("release");
        assert!(r.mappings >= 1, "{r:?}");
        // Code and constant data still work after their pages were dropped.
        let v: Vec<String> = (0..100).map(|i| format!("{i:04}")).collect();
        assert_eq!(v[42], "0042");
    }
}
