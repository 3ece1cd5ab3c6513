//! Guest memory for the simulated VMM: one memfd-backed region mapped shared, so the backend
//! daemon can map the same pages through `SET_MEM_TABLE`, plus a bump allocator that hands out
//! aligned, non-overlapping areas (rings, buffers) inside it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use anyhow::{bail, Context, Result};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Default guest memory size: 64 MiB.
pub const DEFAULT_MEM_SIZE: usize = 64 << 20;

/// Guest memory plus its allocator.
pub struct GuestMem {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
    next: u64,
}

impl GuestMem {
    /// Creates `size` bytes of zeroed guest memory at guest physical address 0, backed by a
    /// memfd sealed against shrinking and growing, as QEMU's memory-backend-memfd does by
    /// default (`seal=on`).
    pub fn new(size: usize) -> Result<Self> {
        Self::create(size, true)
    }

    /// Like [`GuestMem::new`], with a memfd its owner may still resize.
    pub fn new_unsealed(size: usize) -> Result<Self> {
        Self::create(size, false)
    }

    fn create(size: usize, seal: bool) -> Result<Self> {
        if size < 1 << 20 {
            bail!("guest memory of {size} bytes is too small (minimum 1 MiB)");
        }
        let name = CString::new("vhost-plug-guest").context("memfd name")?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are
        // valid memfd_create flags. The return value is checked before use.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .context("sizing guest memory memfd")?;
        if seal {
            // SAFETY: F_ADD_SEALS on a memfd we own; no memory is passed.
            let r = unsafe {
                libc::fcntl(
                    file.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error()).context("sealing guest memory");
            }
        }
        let region_file = file.try_clone().context("dup guest memory memfd")?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(region_file, 0)),
        )])
        .context("mapping guest memory")?;
        Ok(GuestMem {
            mem,
            file,
            size: size as u64,
            // Keep guest page 0 unused so that a zero address in a descriptor is always a bug.
            next: 4096,
        })
    }

    /// Another handle on the same guest memory (same memfd, same mapping), as the destination
    /// VMM of a simulated migration sees it: the pages are shared, so nothing needs copying.
    /// The allocator position is copied; allocate from only one of the two handles.
    pub fn share(&self) -> Result<Self> {
        Ok(GuestMem {
            mem: self.mem.clone(),
            file: self.file.try_clone().context("dup guest memory memfd")?,
            size: self.size,
            next: self.next,
        })
    }

    /// A copy of all guest memory (for before/after comparisons).
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        use vm_memory::Bytes;
        let mut v = vec![0u8; self.size as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(0))
            .context("reading guest memory")?;
        Ok(v)
    }

    /// The mapped memory (cheap to clone: regions are reference counted).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd backing the memory.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Total size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes not yet handed out by the allocator.
    pub fn remaining(&self) -> u64 {
        self.size - self.next
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress> {
        if !align.is_power_of_two() {
            bail!("alignment {align} is not a power of two");
        }
        let start = self
            .next
            .checked_add(align - 1)
            .map(|v| v & !(align - 1))
            .context("guest memory allocator overflow")?;
        let end = start
            .checked_add(len)
            .context("guest memory allocator overflow")?;
        if end > self.size {
            bail!(
                "guest memory exhausted: need {len} bytes at {start:#x}, memory is {} bytes \
                 (raise SimConfig::mem_size)",
                self.size
            );
        }
        self.next = end;
        Ok(GuestAddress(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn alloc_is_aligned_and_bounded() {
        let mut m = GuestMem::new(1 << 20).unwrap();
        let a = m.alloc(10, 4096).unwrap();
        assert_eq!(a.0 % 4096, 0);
        let b = m.alloc(10, 16).unwrap();
        assert!(b.0 >= a.0 + 10);
        assert_eq!(b.0 % 16, 0);
        assert!(m.alloc(2 << 20, 8).is_err());
        m.memory().write_obj(0xabcd_u16, b).unwrap();
        assert_eq!(m.memory().read_obj::<u16>(b).unwrap(), 0xabcd);
    }
}
