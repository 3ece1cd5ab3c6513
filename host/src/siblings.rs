//! Routing between sibling VMs served by this daemon.
//!
//! A guest connection to a sibling's CID becomes a unix socketpair: one end stays with the
//! connecting VM, the other is mailed to the sibling, which offers it to its guest exactly as
//! if a host program had connected. Both VMs then move bytes with the same socket data path
//! they use for host programs.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vsock::header::SockType;

/// Connection requests a VM can have waiting in its mailbox.
pub const MAILBOX_DEPTH: usize = 256;

/// A guest of `from_cid` connects from `from_port` to `to_port` of the receiving VM.
pub struct SiblingConnect {
    pub from_cid: u64,
    pub from_port: u32,
    pub to_port: u32,
    pub kind: SockType,
    pub fd: OwnedFd,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no VM with CID {0}")]
    Unknown(u64),
    #[error("CID {0} shares no group with CID {1}")]
    NotInGroup(u64, u64),
    #[error("VM with CID {0} has no active frontend")]
    Offline(u64),
    #[error("mailbox of CID {0} is full")]
    Busy(u64),
}

struct Mailbox {
    tx: SyncSender<SiblingConnect>,
    wake: Arc<EventFd>,
}

struct Entry {
    groups: Vec<String>,
    mailbox: Option<Mailbox>,
}

/// The receiving end a VM polls while its frontend is connected.
pub struct Inbox {
    pub rx: Receiver<SiblingConnect>,
    pub wake: Arc<EventFd>,
}

/// All VMs of this daemon by CID, with their groups.
#[derive(Default)]
pub struct Registry {
    vms: RwLock<HashMap<u64, Entry>>,
}

impl Registry {
    /// Declares a configured VM and its groups.
    pub fn add_vm(&self, cid: u64, groups: Vec<String>) {
        if let Ok(mut vms) = self.vms.write() {
            vms.insert(
                cid,
                Entry {
                    groups,
                    mailbox: None,
                },
            );
        }
    }

    /// Opens the mailbox of `cid` for the lifetime of a frontend session.
    pub fn open(&self, cid: u64) -> std::io::Result<Inbox> {
        let (tx, rx) = sync_channel(MAILBOX_DEPTH);
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let mut vms = self
            .vms
            .write()
            .map_err(|_| std::io::Error::other("sibling registry poisoned"))?;
        let entry = vms.entry(cid).or_insert_with(|| Entry {
            groups: Vec::new(),
            mailbox: None,
        });
        entry.mailbox = Some(Mailbox {
            tx,
            wake: wake.clone(),
        });
        Ok(Inbox { rx, wake })
    }

    /// Closes the mailbox of `cid`; requests still in it are dropped (their sockets close).
    pub fn close(&self, cid: u64) {
        if let Ok(mut vms) = self.vms.write() {
            if let Some(e) = vms.get_mut(&cid) {
                e.mailbox = None;
            }
        }
    }

    /// Whether `a` and `b` are distinct VMs sharing at least one group.
    pub fn check(&self, a: u64, b: u64) -> Result<(), RouteError> {
        let vms = self.vms.read().map_err(|_| RouteError::Unknown(b))?;
        let ea = vms.get(&a).ok_or(RouteError::Unknown(a))?;
        let eb = vms.get(&b).ok_or(RouteError::Unknown(b))?;
        if a == b || !ea.groups.iter().any(|g| eb.groups.contains(g)) {
            return Err(RouteError::NotInGroup(b, a));
        }
        Ok(())
    }

    /// Mails a connection request to VM `to`, after checking the group rule.
    pub fn deliver(&self, to: u64, msg: SiblingConnect) -> Result<(), RouteError> {
        self.check(msg.from_cid, to)?;
        let vms = self.vms.read().map_err(|_| RouteError::Unknown(to))?;
        let mb = vms
            .get(&to)
            .and_then(|e| e.mailbox.as_ref())
            .ok_or(RouteError::Offline(to))?;
        match mb.tx.try_send(msg) {
            Ok(()) => {
                let _ = mb.wake.write(1);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(RouteError::Busy(to)),
            Err(TrySendError::Disconnected(_)) => Err(RouteError::Offline(to)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_decide_reachability() {
        let r = Registry::default();
        r.add_vm(3, vec!["a".into()]);
        r.add_vm(4, vec!["a".into(), "b".into()]);
        r.add_vm(5, vec!["c".into()]);
        assert_eq!(r.check(3, 4), Ok(()));
        assert_eq!(r.check(3, 5), Err(RouteError::NotInGroup(5, 3)));
        assert_eq!(r.check(3, 3), Err(RouteError::NotInGroup(3, 3)));
        assert_eq!(r.check(3, 9), Err(RouteError::Unknown(9)));
    }

    #[test]
    fn delivery_needs_an_open_mailbox() {
        let r = Registry::default();
        r.add_vm(3, vec!["g".into()]);
        r.add_vm(4, vec!["g".into()]);
        let msg = || {
            let (a, _b) = crate::sys::socketpair(crate::sys::UnixKind::Stream).expect("pair");
            SiblingConnect {
                from_cid: 3,
                from_port: 1,
                to_port: 2,
                kind: SockType::Stream,
                fd: a,
            }
        };
        assert_eq!(r.deliver(4, msg()).err(), Some(RouteError::Offline(4)));
        let inbox = r.open(4).expect("open");
        r.deliver(4, msg()).expect("delivered");
        let got = inbox.rx.try_recv().expect("in mailbox");
        assert_eq!((got.from_cid, got.to_port), (3, 2));
        r.close(4);
        assert_eq!(r.deliver(4, msg()).err(), Some(RouteError::Offline(4)));
    }
}
