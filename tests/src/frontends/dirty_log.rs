//! Cloud Hypervisor's dirty log, as `vu_common_ctrl.rs` builds it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};

/// The vhost-user dirty log covers 4 KiB pages.
const LOG_PAGE: u64 = 4096;

/// Cloud Hypervisor's dirty log: a sealed memfd of one bit per 4 KiB page, replaced by a new
/// one on every read (`update_log_base` in `vu_common_ctrl.rs`).
pub struct CloudHypervisorLog {
    pub(super) file: File,
    pub(super) len: u64,
}

impl CloudHypervisorLog {
    /// A fresh log for guest memory ending at `last_addr`, sized and sealed as Cloud Hypervisor
    /// does: `last_addr / (4096 * 8) + 1` bytes (not a page multiple), grow/shrink/seal seals.
    pub(super) fn create(last_addr: u64) -> Result<CloudHypervisorLog> {
        let name = std::ffi::CString::new("vhost_user_dirty_log").context("memfd name")?;
        // SAFETY: `name` is a valid C string; the flags are valid memfd flags; checked below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create for the log");
        }
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let len = last_addr / (LOG_PAGE * 8) + 1;
        file.set_len(len).context("sizing the dirty log")?;
        // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal bits; no memory is passed.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("sealing the dirty log");
        }
        Ok(CloudHypervisorLog { file, len })
    }

    /// Guest page numbers marked dirty.
    pub fn dirty_pages(&self) -> Result<Vec<u64>> {
        let mut bits = vec![0u8; self.len as usize];
        self.file
            .read_exact_at(&mut bits, 0)
            .context("reading the dirty log")?;
        Ok((0..self.len * 8)
            .filter(|p| bits[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect())
    }
}
