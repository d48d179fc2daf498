//! Work queues of one end of a soft connection: the send queue (every
//! send-queue request, in posting order, until its completion is reaped;
//! kept as two queues, requests done at post time and sends that travel as
//! messages, see `link`) and the receive queue (posted receives, filled by
//! the matcher, reaped in order).
//!
//! Each is a single-producer ring of fixed slots made of atomics: the
//! poster (under the end's post lock) writes a slot with Relaxed stores and
//! publishes it by a Release store of its tail; readers Acquire-load the
//! tail before reading a slot. The reaper (the consumer of the end's CQ)
//! gives slots back by a Release store of its head, which the poster reads
//! (cached) before it reuses one. No slot is plain memory.
//!
//! # Layout
//!
//! An end's three queues are one [`EndQueues`], laid out for the fewest
//! cache lines per message: a connection idle since thousands of others
//! were used is cold, each line a miss. The posters' line holds the three
//! tails and where each queue's slots are (so a post, a peek or a match
//! reads one line to find any slot); the reaper's line holds the three
//! heads, which the posters read only when a queue looks full. A message
//! then touches, per end, these two lines and the slots it uses, where
//! three rings of their own took a line for each index and a heap header
//! each.

use super::zeroed::{Zeroable, Zeroed};
use crate::fabric::{Sge, WcOpcode, WcStatus, WrId};
use crate::sync::{AtomicU64, CachePadded, Ordering};
use std::ptr::NonNull;
use std::sync::Arc;

/// How a send-queue request completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SqKind {
    /// Executed (or failed) at post time.
    Done { status: WcStatus, len: u32 },
    /// A send carried by message `index` of the end's outgoing cell ring:
    /// done once the peer consumed it.
    Cell { index: u64, len: u32 },
    /// Held by an injected fault (tests only) until the link breaks, or,
    /// for a held RDMA, until the fault releases it and it turns `Done`.
    Stalled,
}

/// One send-queue request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SqEntry {
    pub(super) wr_id: WrId,
    pub(super) opcode: WcOpcode,
    pub(super) kind: SqKind,
}

/// Slot encoding: `meta` = kind (bits 0-7) | opcode (8-15) | status
/// (16-23) | len (32-63); `index` the cell index of a `Cell`.
#[derive(Default)]
struct SqSlot {
    wr_id: AtomicU64,
    meta: AtomicU64,
    index: AtomicU64,
}

// SAFETY: a struct of atomics, zero as zero bytes, as `default` makes it.
unsafe impl Zeroable for SqSlot {}
// SAFETY: as above.
unsafe impl Zeroable for RqSlot {}
// SAFETY: as above.
unsafe impl Zeroable for RqSge {}

const KIND_DONE: u64 = 0;
const KIND_CELL: u64 = 1;
const KIND_STALLED: u64 = 2;

/// A status stored as its `u8` value (written from a `WcStatus`, so always
/// valid; `Flushed` stands in should a slot ever hold another byte).
pub(super) fn status_from(v: u8) -> WcStatus {
    WcStatus::from_u8(v).unwrap_or(WcStatus::Flushed)
}

fn opcode_from(v: u8) -> WcOpcode {
    match v {
        0 => WcOpcode::Send,
        1 => WcOpcode::RdmaWrite,
        2 => WcOpcode::RdmaRead,
        _ => WcOpcode::Recv,
    }
}

/// Which queue of an [`EndQueues`]: an index into its tails and heads.
#[derive(Clone, Copy)]
enum Which {
    /// Send-queue requests done (or failed) at post time, and stalled ones.
    Sq = 0,
    /// Sends travelling as messages.
    Sends = 1,
    /// Receives.
    Rq = 2,
}

/// The three queues of one end (module docs, "Layout").
pub(super) struct EndQueues {
    published: CachePadded<Published>,
    /// Entries reaped of each queue (by [`Which`]; Release by the reaper).
    heads: CachePadded<[AtomicU64; 3]>,
    /// Entries beyond the first [`INLINE_SGES`] of each receive: slot `i`
    /// owns `[i * more_stride, (i + 1) * more_stride)`.
    more: Zeroed<RqSge>,
    more_stride: usize,
    /// Own the slots `published` points to (held for their drop only; the
    /// memory does not move with them).
    _owners: (Zeroed<SqSlot>, Zeroed<SqSlot>, Zeroed<RqSlot>),
}

/// The posters' line of an [`EndQueues`].
struct Published {
    /// Entries published of each queue (by [`Which`]; Release by the
    /// queue's poster).
    tails: [AtomicU64; 3],
    /// The slots of each queue (`masks[q] + 1` of them, a power of two):
    /// of the two send queues by [`Which`], then of the receive queue;
    /// never change.
    sq: [NonNull<SqSlot>; 2],
    rq: NonNull<RqSlot>,
    /// Slots minus one of each queue (by [`Which`]); never change.
    masks: [u32; 3],
}

// One line: everything a post, a peek or a match needs to find a slot.
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<Published>() <= 64);

// SAFETY: the pointers name slots of atomics owned by `_owners` (which
// hold them like a `Box<[T]>` and are `Send` and `Sync`), reached only as
// `&T`.
unsafe impl Send for EndQueues {}
// SAFETY: as above.
unsafe impl Sync for EndQueues {}

/// Slots for `depth` entries (a power of two), zero.
fn slots<T: Zeroable>(depth: usize) -> (Zeroed<T>, u32) {
    let cap = depth.max(1).next_power_of_two();
    let mask = u32::try_from(cap - 1).expect("fewer than 2^32 slots per queue");
    (super::zeroed::slice(cap), mask)
}

impl EndQueues {
    /// The slot of entry `index` of a send queue.
    #[inline]
    fn sq_slot(&self, which: Which, index: u64) -> &SqSlot {
        debug_assert!(!matches!(which, Which::Rq));
        let p = &*self.published;
        let (base, mask) = (p.sq[which as usize], p.masks[which as usize]);
        // SAFETY: `index & mask` is below the slot count of that queue,
        // whose slots `_owners` keeps alive as long as `self`.
        unsafe { &*base.as_ptr().add((index & u64::from(mask)) as usize) }
    }

    /// The slot of receive `index`.
    #[inline]
    fn rq_slot(&self, index: u64) -> &RqSlot {
        let p = &*self.published;
        // SAFETY: as in `sq_slot`.
        unsafe { &*p.rq.as_ptr().add((index & u64::from(p.masks[2])) as usize) }
    }

    #[inline]
    fn tail(&self, which: Which) -> &AtomicU64 {
        &self.published.tails[which as usize]
    }

    #[inline]
    fn head(&self, which: Which) -> &AtomicU64 {
        &self.heads[which as usize]
    }
}

/// The handles of one end's queues.
pub(super) struct Queues {
    pub(super) sq: (SqPoster, SqReaper),
    pub(super) sends: (SqPoster, SqReaper),
    pub(super) rq: (RqPoster, RqReaper),
    /// The queues themselves: what the posters pass to each call, and
    /// what the matcher of the end's incoming ring reads.
    pub(super) shared: Arc<EndQueues>,
}

/// Creates the queues of an end: send queues holding up to `send_depth`
/// uncompleted requests each, a receive queue of `recv_depth` receives of
/// up to `stride` entries.
pub(super) fn end_queues(send_depth: usize, recv_depth: usize, stride: usize) -> Queues {
    let (sq, sq_mask) = slots::<SqSlot>(send_depth);
    let (sends, sends_mask) = slots::<SqSlot>(send_depth);
    let (rq, rq_mask) = slots::<RqSlot>(recv_depth);
    let more_stride = stride.saturating_sub(INLINE_SGES);
    let q = Arc::new(EndQueues {
        published: CachePadded::new(Published {
            tails: Default::default(),
            sq: [NonNull::from(&*sq).cast(), NonNull::from(&*sends).cast()],
            rq: NonNull::from(&*rq).cast(),
            masks: [sq_mask, sends_mask, rq_mask],
        }),
        heads: CachePadded::new(Default::default()),
        more: super::zeroed::slice((rq_mask as usize + 1) * more_stride),
        more_stride,
        _owners: (sq, sends, rq),
    });
    let send = |which| {
        (
            SqPoster {
                tail: 0,
                cached_head: 0,
                depth: u32::try_from(send_depth).expect("a send depth below 2^32"),
                which,
            },
            SqReaper {
                q: q.clone(),
                which,
                head: 0,
            },
        )
    };
    Queues {
        sq: send(Which::Sq),
        sends: send(Which::Sends),
        rq: (
            RqPoster {
                tail: 0,
                cached_head: 0,
                depth: recv_depth as u64,
                stride,
            },
            RqReaper {
                q: q.clone(),
                head: 0,
            },
        ),
        shared: q,
    }
}

/// The posting side of a send queue (one per queue). A queue pair has two,
/// requests done at post time and sends that travel as messages, which
/// complete independently (see `Link`); the poster bounds their sum.
/// Holds no pointer to its [`EndQueues`]: the end's poster holds one for
/// its three queues, and passes it to each call (24 bytes, not 40: the
/// posting side of an end fits fewer lines).
pub(super) struct SqPoster {
    tail: u64,
    cached_head: u64,
    /// Most uncompleted requests, `<=` the slot count.
    depth: u32,
    which: Which,
}

impl SqPoster {
    /// Index the next request gets (a fault records stalled requests).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    pub(super) fn tail(&self) -> u64 {
        self.tail
    }

    /// Requests not known to be reaped (an upper bound: the reaper's index
    /// is reloaded by [`SqPoster::refresh`] only).
    pub(super) fn pending(&self) -> u64 {
        self.tail - self.cached_head
    }

    /// Reloads the reaper's index.
    pub(super) fn refresh(&mut self, q: &EndQueues) {
        self.cached_head = q.head(self.which).load(Ordering::Acquire);
    }

    /// Whether one more request fits.
    fn room(&mut self, q: &EndQueues) -> bool {
        if self.pending() < u64::from(self.depth) {
            return true;
        }
        self.refresh(q);
        self.pending() < u64::from(self.depth)
    }

    /// Appends and publishes an entry; the caller checked `room`.
    #[inline]
    pub(super) fn push(&mut self, q: &EndQueues, e: SqEntry) {
        assert!(self.room(q), "send queue overflow");
        let slot = q.sq_slot(self.which, self.tail);
        let (kind, status, len, index) = match e.kind {
            SqKind::Done { status, len } => (KIND_DONE, status as u64, len, 0),
            SqKind::Cell { index, len } => (KIND_CELL, 0, len, index),
            SqKind::Stalled => (KIND_STALLED, 0, 0, 0),
        };
        slot.wr_id.store(e.wr_id, Ordering::Relaxed);
        slot.index.store(index, Ordering::Relaxed);
        let meta = kind | (e.opcode as u64) << 8 | status << 16 | u64::from(len) << 32;
        slot.meta.store(meta, Ordering::Relaxed);
        self.tail += 1;
        q.tail(self.which).store(self.tail, Ordering::Release);
    }

    /// Turns the `Stalled` entry `index` (published, not reaped: a reaper
    /// pops a stalled entry only once the link is sealed, and the caller
    /// saw it intact under its control lock) into `Done`. Release: whatever
    /// the request wrote is visible to the reaper that sees it done.
    #[cfg(feature = "fault-injection")]
    pub(super) fn complete(&mut self, q: &EndQueues, index: u64, status: WcStatus, len: u32) {
        let slot = q.sq_slot(self.which, index);
        let meta = slot.meta.load(Ordering::Relaxed);
        debug_assert_eq!(meta & 0xff, KIND_STALLED, "only a stalled entry completes");
        let kept = meta & 0xff00;
        let meta = KIND_DONE | kept | (status as u64) << 16 | u64::from(len) << 32;
        slot.meta.store(meta, Ordering::Release);
    }
}

/// The reaping side of a send queue (one per queue, owned by the consumer
/// of the end's CQ).
pub(super) struct SqReaper {
    q: Arc<EndQueues>,
    which: Which,
    head: u64,
}

impl SqReaper {
    /// Index of the oldest uncompleted request.
    pub(super) fn head(&self) -> u64 {
        self.head
    }

    /// The oldest uncompleted request, if any.
    pub(super) fn peek(&self) -> Option<SqEntry> {
        if self.head >= self.q.tail(self.which).load(Ordering::Acquire) {
            return None;
        }
        let slot = self.q.sq_slot(self.which, self.head);
        // Acquire: a stalled entry may turn `Done` after it was published
        // (`SqPoster::complete`).
        let meta = slot.meta.load(Ordering::Acquire);
        let len = (meta >> 32) as u32;
        let kind = match meta & 0xff {
            KIND_DONE => SqKind::Done {
                status: status_from((meta >> 16) as u8),
                len,
            },
            KIND_CELL => SqKind::Cell {
                index: slot.index.load(Ordering::Relaxed),
                len,
            },
            _ => SqKind::Stalled,
        };
        Some(SqEntry {
            wr_id: slot.wr_id.load(Ordering::Relaxed),
            opcode: opcode_from((meta >> 8) as u8),
            kind,
        })
    }

    /// The cell index of the oldest request, if any: a cheaper `peek` for
    /// the queue of sends travelling as messages, where every entry is a
    /// [`SqKind::Cell`].
    pub(super) fn peek_cell(&self) -> Option<u64> {
        if self.head >= self.q.tail(self.which).load(Ordering::Acquire) {
            return None;
        }
        let slot = self.q.sq_slot(self.which, self.head);
        debug_assert_eq!(
            slot.meta.load(Ordering::Relaxed) & 0xff,
            KIND_CELL,
            "a queue of messages"
        );
        Some(slot.index.load(Ordering::Relaxed))
    }

    /// Completes the oldest request (after `peek` returned it).
    pub(super) fn pop(&mut self) {
        self.head += 1;
        self.q.head(self.which).store(self.head, Ordering::Release);
    }

    /// Whether every published request was reaped.
    pub(super) fn is_empty(&self) -> bool {
        self.head >= self.q.tail(self.which).load(Ordering::Acquire)
    }
}

/// Scatter entries a receive slot holds itself; the rest of a receive's
/// entries live in `EndQueues::more`.
const INLINE_SGES: usize = 2;

/// A receive slot, one cache line: `meta` holds the number of entries (bits
/// 0-15) and the preset status plus one (bits 16-23, 0 for none); `len` the
/// filled length (written by the matcher before it publishes the receive as
/// filled); then the first entries. A receive of up to [`INLINE_SGES`]
/// buffers (the switch posts one) touches one line and one page, where a
/// header array beside an entry array took two pages per idle queue.
#[derive(Default)]
#[repr(C, align(64))]
struct RqSlot {
    wr_id: AtomicU64,
    meta: AtomicU64,
    len: AtomicU64,
    sges: [RqSge; INLINE_SGES],
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<RqSlot>() == 64);

/// An atomic scatter entry.
#[derive(Default)]
struct RqSge {
    addr: AtomicU64,
    len_lkey: AtomicU64,
}

impl EndQueues {
    /// Entry `j` of receive `index`.
    #[inline]
    fn sge(&self, index: u64, j: usize) -> &RqSge {
        match j.checked_sub(INLINE_SGES) {
            None => &self.rq_slot(index).sges[j],
            Some(k) => {
                let i = (index & u64::from(self.published.masks[2])) as usize;
                &self.more[i * self.more_stride + k]
            }
        }
    }
}

/// The posting side of a receive queue (one per queue; holds no pointer
/// to its [`EndQueues`], as [`SqPoster`]).
pub(super) struct RqPoster {
    tail: u64,
    cached_head: u64,
    depth: u64,
    /// Most entries a receive may have.
    stride: usize,
}

impl RqPoster {
    /// Receives not reaped yet (reloads the reaper's index).
    #[cfg(feature = "fault-injection")]
    pub(super) fn pending(&mut self, q: &EndQueues) -> u64 {
        self.cached_head = q.head(Which::Rq).load(Ordering::Acquire);
        self.tail - self.cached_head
    }

    pub(super) fn room(&mut self, q: &EndQueues) -> bool {
        if self.tail - self.cached_head < self.depth {
            return true;
        }
        self.cached_head = q.head(Which::Rq).load(Ordering::Acquire);
        self.tail - self.cached_head < self.depth
    }

    /// Appends and publishes a receive (`preset`: completed at once with
    /// that status, never filled). The caller checked `room` and that
    /// `sges` fits the stride.
    #[inline(always)]
    pub(super) fn push(
        &mut self,
        q: &EndQueues,
        wr_id: WrId,
        sges: &[Sge],
        preset: Option<WcStatus>,
    ) {
        assert!(
            self.room(q) && sges.len() <= self.stride,
            "receive queue overflow"
        );
        let slot = q.rq_slot(self.tail);
        for (j, s) in sges.iter().enumerate() {
            let d = q.sge(self.tail, j);
            d.addr.store(s.addr as u64, Ordering::Relaxed);
            let v = u64::from(s.len) | u64::from(s.lkey) << 32;
            d.len_lkey.store(v, Ordering::Relaxed);
        }
        slot.wr_id.store(wr_id, Ordering::Relaxed);
        let p = preset.map_or(0, |s| s as u64 + 1);
        slot.meta
            .store(sges.len() as u64 | p << 16, Ordering::Relaxed);
        self.tail += 1;
        q.tail(Which::Rq).store(self.tail, Ordering::Release);
    }
}

/// A posted receive as the matcher sees it.
pub(super) struct RecvView<'a> {
    q: &'a EndQueues,
    index: u64,
    nsge: usize,
    pub(super) preset: Option<WcStatus>,
}

impl RecvView<'_> {
    /// The receive's scatter list.
    pub(super) fn iter(&self) -> impl Iterator<Item = Sge> + '_ {
        (0..self.nsge).map(|j| {
            let s = self.q.sge(self.index, j);
            let v = s.len_lkey.load(Ordering::Relaxed);
            Sge {
                addr: s.addr.load(Ordering::Relaxed) as usize,
                len: v as u32,
                lkey: (v >> 32) as u32,
            }
        })
    }

    /// Total room of the scatter list.
    pub(super) fn room(&self) -> u64 {
        (0..self.nsge)
            .map(|j| self.q.sge(self.index, j).len_lkey.load(Ordering::Relaxed) & 0xffff_ffff)
            .sum()
    }
}

fn preset_of(meta: u64) -> Option<WcStatus> {
    match (meta >> 16) as u8 {
        0 => None,
        p => Some(status_from(p - 1)),
    }
}

impl EndQueues {
    /// Receives posted so far (Acquire: their slots are readable).
    pub(super) fn posted(&self) -> u64 {
        self.tail(Which::Rq).load(Ordering::Acquire)
    }

    /// Receive `index`, if posted. Only the matcher of the end's incoming
    /// ring reads slots this way, and only slots not yet filled.
    pub(super) fn entry(&self, index: u64) -> Option<RecvView<'_>> {
        if index >= self.posted() {
            return None;
        }
        let meta = self.rq_slot(index).meta.load(Ordering::Relaxed);
        Some(RecvView {
            q: self,
            index,
            nsge: (meta & 0xffff) as usize,
            preset: preset_of(meta),
        })
    }

    /// Records the filled length of receive `index`; the reaper reads it
    /// once the matcher published the fill (Release on the ring's consumed
    /// index).
    pub(super) fn set_len(&self, index: u64, len: u32) {
        self.rq_slot(index)
            .len
            .store(u64::from(len), Ordering::Relaxed);
    }
}

/// The reaping side of a receive queue (owned by the consumer of the end's
/// CQ).
pub(super) struct RqReaper {
    q: Arc<EndQueues>,
    head: u64,
}

/// The oldest uncompleted receive.
pub(super) struct RecvHead {
    pub(super) index: u64,
    pub(super) wr_id: WrId,
    pub(super) preset: Option<WcStatus>,
    /// Filled length (meaningful once the receive was filled).
    pub(super) len: u32,
}

impl RqReaper {
    pub(super) fn peek(&self) -> Option<RecvHead> {
        if self.head >= self.q.posted() {
            return None;
        }
        let slot = self.q.rq_slot(self.head);
        let meta = slot.meta.load(Ordering::Relaxed);
        Some(RecvHead {
            index: self.head,
            wr_id: slot.wr_id.load(Ordering::Relaxed),
            preset: preset_of(meta),
            len: slot.len.load(Ordering::Relaxed) as u32,
        })
    }

    pub(super) fn pop(&mut self) {
        self.head += 1;
        self.q.head(Which::Rq).store(self.head, Ordering::Release);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.head >= self.q.posted()
    }
}
