//! The work queues of one connection end: requests handed from the posting
//! threads (serialised by the end's post lock) to the poller of the end's
//! CQ, which completes them in posting order.
//!
//! Each queue is a single-producer/single-consumer ring of slots made of
//! atomics (Lamport's ring, as `ring.rs`): the producer writes a slot, then
//! publishes it by a Release store of `tail`; the consumer loads `tail`
//! (Acquire), reads the slots below it and gives them back by a Release
//! store of `head`; the producer writes a slot again only after an Acquire
//! load of `head` showed it free. The two indices live on lines of their
//! own, so a poster on one core and a poller on another do not share a
//! line beside the slots. Relaxed atomics cost plain moves: the slots need
//! no `unsafe`.

use crate::fabric::{Sge, WcOpcode, WcStatus, WrId};
use crate::sync::CachePadded;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The two indices of a ring.
struct Indices {
    /// Slots published. Written by the producer only (Release).
    tail: CachePadded<AtomicU64>,
    /// Slots given back, `<= tail`. Written by the consumer only (Release).
    head: CachePadded<AtomicU64>,
}

impl Indices {
    fn new() -> Indices {
        Indices {
            tail: CachePadded::new(AtomicU64::new(0)),
            head: CachePadded::new(AtomicU64::new(0)),
        }
    }
}

/// How a send-queue request completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SqKind {
    /// It went to the ring as message `index`: done once the peer consumed
    /// it, else as the broken connection says.
    Ring(u64),
    /// Posted on a broken connection: with the break's status.
    Flush,
    /// Failed at post time with its own status (the end breaks).
    Failed(WcStatus),
}

/// A send-queue request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SqEntry {
    pub(super) wr_id: WrId,
    pub(super) opcode: WcOpcode,
    /// Bytes it moves (reported on success).
    pub(super) len: u32,
    pub(super) kind: SqKind,
}

#[derive(Default)]
struct SqSlot {
    wr_id: AtomicU64,
    /// The message index of `SqKind::Ring`.
    index: AtomicU64,
    /// `len | opcode << 32 | tag << 40 | status << 48` (tag 0: ring, 1:
    /// flush, 2: failed).
    word: AtomicU64,
}

/// The send queue.
pub(super) struct SendQueue {
    /// A power of two `>= depth` slots.
    slots: Box<[SqSlot]>,
    depth: u64,
    ix: Indices,
}

impl SendQueue {
    pub(super) fn new(depth: usize) -> SendQueue {
        let n = depth.max(1).next_power_of_two();
        SendQueue {
            slots: (0..n).map(|_| SqSlot::default()).collect(),
            depth: depth as u64,
            ix: Indices::new(),
        }
    }

    #[inline]
    fn slot(&self, i: u64) -> &SqSlot {
        &self.slots[(i & (self.slots.len() as u64 - 1)) as usize]
    }

    /// Producer: whether a request can be published now.
    #[inline]
    pub(super) fn has_room(&self) -> bool {
        let tail = self.ix.tail.load(Ordering::Relaxed);
        tail - self.ix.head.load(Ordering::Acquire) < self.depth
    }

    /// Producer: publishes `e`, or gives it back if the queue is full.
    #[inline]
    pub(super) fn push(&self, e: SqEntry) -> Result<(), SqEntry> {
        if !self.has_room() {
            return Err(e);
        }
        let tail = self.ix.tail.load(Ordering::Relaxed);
        let s = self.slot(tail);
        let (tag, status, index) = match e.kind {
            SqKind::Ring(i) => (0u64, 0u64, i),
            SqKind::Flush => (1, 0, 0),
            SqKind::Failed(st) => (2, st as u64, 0),
        };
        s.wr_id.store(e.wr_id, Ordering::Relaxed);
        s.index.store(index, Ordering::Relaxed);
        let word = u64::from(e.len) | (e.opcode as u64) << 32 | tag << 40 | status << 48;
        s.word.store(word, Ordering::Relaxed);
        self.ix.tail.store(tail + 1, Ordering::Release);
        Ok(())
    }

    /// Consumer: the oldest request not given back, if any.
    pub(super) fn front(&self) -> Option<SqEntry> {
        let head = self.ix.head.load(Ordering::Relaxed);
        if head == self.ix.tail.load(Ordering::Acquire) {
            return None;
        }
        let s = self.slot(head);
        let word = s.word.load(Ordering::Relaxed);
        let opcode = match (word >> 32) as u8 {
            0 => WcOpcode::Send,
            1 => WcOpcode::RdmaWrite,
            _ => WcOpcode::RdmaRead,
        };
        let kind = match (word >> 40) as u8 {
            0 => SqKind::Ring(s.index.load(Ordering::Relaxed)),
            1 => SqKind::Flush,
            _ => SqKind::Failed(super::status_from((word >> 48) as u8)),
        };
        Some(SqEntry {
            wr_id: s.wr_id.load(Ordering::Relaxed),
            opcode,
            len: word as u32,
            kind,
        })
    }

    /// Consumer: gives the front back (after [`SendQueue::front`] showed it).
    pub(super) fn pop(&self) {
        let head = self.ix.head.load(Ordering::Relaxed);
        debug_assert!(head < self.ix.tail.load(Ordering::Relaxed));
        self.ix.head.store(head + 1, Ordering::Release);
    }

    /// Whether every request published was given back.
    pub(super) fn is_empty(&self) -> bool {
        self.ix.head.load(Ordering::Acquire) == self.ix.tail.load(Ordering::Acquire)
    }
}

/// How a posted receive stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RqKind {
    /// Waiting for a message.
    Posted,
    /// Posted on a broken connection: with the break's status.
    Flush,
    /// Failed at post time with its own status (the end breaks).
    Failed(WcStatus),
}

/// A gather entry of a posted receive, in atomics.
#[derive(Default)]
struct SlotSge {
    addr: AtomicU64,
    len: AtomicU32,
}

#[derive(Default)]
struct RqSlot {
    wr_id: AtomicU64,
    /// Total bytes of the receive's entries.
    room: AtomicU64,
    /// `nsge | tag << 16 | status << 24` (tag 0: posted, 1: flush, 2:
    /// failed).
    word: AtomicU32,
}

/// A posted receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RqEntry {
    pub(super) wr_id: WrId,
    pub(super) room: u64,
    pub(super) kind: RqKind,
}

/// The receive queue; the consumer also tracks how many of the published
/// receives it filled (`PollSide`).
pub(super) struct RecvQueue {
    slots: Box<[RqSlot]>,
    /// `max_sge` entries per slot.
    sges: Box<[SlotSge]>,
    stride: usize,
    depth: u64,
    ix: Indices,
}

impl RecvQueue {
    pub(super) fn new(depth: usize, max_sge: usize) -> RecvQueue {
        let n = depth.max(1).next_power_of_two();
        RecvQueue {
            slots: (0..n).map(|_| RqSlot::default()).collect(),
            sges: (0..n * max_sge).map(|_| SlotSge::default()).collect(),
            stride: max_sge,
            depth: depth as u64,
            ix: Indices::new(),
        }
    }

    #[inline]
    fn at(&self, i: u64) -> usize {
        (i & (self.slots.len() as u64 - 1)) as usize
    }

    /// Producer: publishes a receive of `sges` (at most `max_sge`), or
    /// `false` if the queue is full.
    #[inline]
    pub(super) fn push(&self, wr_id: WrId, sges: &[Sge], kind: RqKind) -> bool {
        let tail = self.ix.tail.load(Ordering::Relaxed);
        if tail - self.ix.head.load(Ordering::Acquire) >= self.depth {
            return false;
        }
        let at = self.at(tail);
        let n = sges.len().min(self.stride);
        let mut room = 0u64;
        for (d, g) in self.sges[at * self.stride..][..n].iter().zip(sges) {
            d.addr.store(g.addr as u64, Ordering::Relaxed);
            d.len.store(g.len, Ordering::Relaxed);
            room += u64::from(g.len);
        }
        let tag = match kind {
            RqKind::Posted => 0,
            RqKind::Flush => 1 << 16,
            RqKind::Failed(st) => 2 << 16 | (st as u32) << 24,
        };
        let s = &self.slots[at];
        s.wr_id.store(wr_id, Ordering::Relaxed);
        s.room.store(room, Ordering::Relaxed);
        s.word.store(n as u32 | tag, Ordering::Relaxed);
        self.ix.tail.store(tail + 1, Ordering::Release);
        true
    }

    /// Consumer: receives published so far (an index past the last).
    pub(super) fn tail(&self) -> u64 {
        self.ix.tail.load(Ordering::Acquire)
    }

    /// Consumer: receives given back so far.
    pub(super) fn head(&self) -> u64 {
        self.ix.head.load(Ordering::Relaxed)
    }

    /// Consumer: receive `i` (`head <= i < tail`).
    pub(super) fn get(&self, i: u64) -> RqEntry {
        let s = &self.slots[self.at(i)];
        let word = s.word.load(Ordering::Relaxed);
        let kind = match (word >> 16) as u8 {
            0 => RqKind::Posted,
            1 => RqKind::Flush,
            _ => RqKind::Failed(super::status_from((word >> 24) as u8)),
        };
        RqEntry {
            wr_id: s.wr_id.load(Ordering::Relaxed),
            room: s.room.load(Ordering::Relaxed),
            kind,
        }
    }

    /// Consumer: the address of the one entry of receive `i`, if it has
    /// exactly one.
    pub(super) fn single(&self, i: u64) -> Option<usize> {
        let at = self.at(i);
        if self.slots[at].word.load(Ordering::Relaxed) & 0xffff != 1 {
            return None;
        }
        Some(self.sges[at * self.stride].addr.load(Ordering::Relaxed) as usize)
    }

    /// Consumer: the entries of receive `i` into `out` (cleared first).
    pub(super) fn sges_into(&self, i: u64, out: &mut Vec<Sge>) {
        let at = self.at(i);
        let n = (self.slots[at].word.load(Ordering::Relaxed) & 0xffff) as usize;
        out.clear();
        out.extend(
            self.sges[at * self.stride..][..n.min(self.stride)]
                .iter()
                .map(|g| Sge {
                    addr: g.addr.load(Ordering::Relaxed) as usize,
                    len: g.len.load(Ordering::Relaxed),
                    lkey: 0,
                }),
        );
    }

    /// Consumer: gives back every receive below `head`.
    pub(super) fn release_to(&self, head: u64) {
        debug_assert!(head <= self.ix.tail.load(Ordering::Relaxed));
        self.ix.head.store(head, Ordering::Release);
    }

    /// Whether every receive published was given back.
    pub(super) fn is_empty(&self) -> bool {
        self.ix.head.load(Ordering::Acquire) == self.ix.tail.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_queue_keeps_order_and_refuses_beyond_its_depth() {
        let q = SendQueue::new(3);
        let e = |i: u64, kind| SqEntry {
            wr_id: i,
            opcode: WcOpcode::RdmaRead,
            len: i as u32 * 10,
            kind,
        };
        for (i, k) in [
            SqKind::Ring(7),
            SqKind::Flush,
            SqKind::Failed(WcStatus::LocalLengthError),
        ]
        .into_iter()
        .enumerate()
        {
            q.push(e(i as u64, k)).unwrap();
        }
        assert!(q.push(e(9, SqKind::Flush)).is_err(), "depth 3");
        assert_eq!(q.front(), Some(e(0, SqKind::Ring(7))));
        q.pop();
        q.push(e(3, SqKind::Ring(8))).unwrap();
        for (i, k) in [
            (1, SqKind::Flush),
            (2, SqKind::Failed(WcStatus::LocalLengthError)),
            (3, SqKind::Ring(8)),
        ] {
            assert_eq!(q.front(), Some(e(i, k)));
            q.pop();
        }
        assert!(q.front().is_none() && q.is_empty());
    }

    #[test]
    fn the_receive_queue_keeps_entries_and_room() {
        let q = RecvQueue::new(2, 2);
        let g = |a: usize, l: u32| Sge {
            addr: a,
            len: l,
            lkey: 5,
        };
        assert!(q.push(1, &[g(100, 8), g(200, 4)], RqKind::Posted));
        assert!(q.push(2, &[], RqKind::Failed(WcStatus::LocalProtectionError)));
        assert!(!q.push(3, &[], RqKind::Flush), "depth 2");
        let r = q.get(0);
        assert_eq!((r.wr_id, r.room, r.kind), (1, 12, RqKind::Posted));
        let mut out = Vec::new();
        q.sges_into(0, &mut out);
        // The keys were checked at post time: not kept.
        assert_eq!(out, [g(100, 8), g(200, 4)].map(|s| Sge { lkey: 0, ..s }));
        assert_eq!(q.single(0), None, "two entries");
        assert_eq!(
            q.get(1).kind,
            RqKind::Failed(WcStatus::LocalProtectionError)
        );
        q.release_to(2);
        assert!(q.is_empty());
        assert!(q.push(3, &[], RqKind::Flush));
        assert_eq!((q.tail(), q.head()), (3, 2));
        assert!(q.push(4, &[g(300, 16)], RqKind::Posted));
        assert_eq!(q.single(3), Some(300));
    }
}
