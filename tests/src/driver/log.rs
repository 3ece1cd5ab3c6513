//! Bounded log of the packet headers that crossed the rings, for tests that check what the
//! device sent (RST on a refused connect, nothing forwarded for a spoofed CID, ...).

use std::collections::VecDeque;
use std::time::Instant;

use crate::packet::PacketHeader;

/// Direction of a logged packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Received on the rx queue.
    FromDevice,
    /// Placed on the tx queue.
    ToDevice,
}

/// One logged header.
#[derive(Clone, Copy, Debug)]
pub struct LoggedPacket {
    /// Position in the log; never reused.
    pub seq: u64,
    pub dir: Direction,
    pub hdr: PacketHeader,
    pub at: Instant,
}

pub(crate) struct PacketLog {
    entries: VecDeque<LoggedPacket>,
    cap: usize,
    next_seq: u64,
}

impl PacketLog {
    pub fn new(cap: usize) -> Self {
        PacketLog {
            entries: VecDeque::with_capacity(cap.min(4096)),
            cap: cap.max(1),
            next_seq: 0,
        }
    }

    pub fn push(&mut self, dir: Direction, hdr: PacketHeader) {
        if self.entries.len() == self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back(LoggedPacket {
            seq: self.next_seq,
            dir,
            hdr,
            at: Instant::now(),
        });
        self.next_seq += 1;
    }

    /// Sequence number the next packet will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Entries with `seq >= since` still held (older ones may have been dropped).
    pub fn since(&self, since: u64) -> impl Iterator<Item = &LoggedPacket> {
        let first = self.entries.front().map_or(self.next_seq, |e| e.seq);
        let skip = since.saturating_sub(first) as usize;
        self.entries.iter().skip(skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_seq_addressed() {
        let mut l = PacketLog::new(3);
        for port in 0..5 {
            l.push(
                Direction::FromDevice,
                PacketHeader {
                    src_port: port,
                    ..Default::default()
                },
            );
        }
        assert_eq!(l.next_seq(), 5);
        let all: Vec<u32> = l.since(0).map(|e| e.hdr.src_port).collect();
        assert_eq!(all, vec![2, 3, 4]);
        let tail: Vec<u64> = l.since(4).map(|e| e.seq).collect();
        assert_eq!(tail, vec![4]);
        assert_eq!(l.since(5).count(), 0);
    }
}
