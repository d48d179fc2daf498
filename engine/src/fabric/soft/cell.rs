//! The cell ring: one direction of a soft connection, the messages of one
//! end's sends on their way to the other end's receives.
//!
//! A single-producer/single-consumer ring of fixed-size cells. The producer
//! (the sending end, under its post lock) writes a cell's header and payload,
//! then publishes it by storing its **sequence word** (`index + 1`, Release).
//! The consumer (the matcher of the receiving end) waits for exactly that
//! value at its head (Acquire), so it reads the producer's writes and never
//! a producer index: a small message moves one cache line between the two
//! cores, the cell's first, which holds the sequence word, the header and
//! the first 48 payload bytes. A stale cell of the previous lap carries
//! `index + 1 - capacity` and never looks ready.
//!
//! The consumer gives cells back by publishing how many it consumed
//! (`consumed`, its own padded line, Release); the producer caches that
//! value and reloads it only when the ring looks full (the rtrb / Lamport
//! ring with cached indices, and the lap-tagged slot of Vyukov's bounded
//! queue for publication). Each cell also carries an acknowledgement: how
//! many messages of the opposite direction its sender had consumed when it
//! wrote the cell, so that in a request/response exchange the sender of the
//! request learns its send is done from the response's own line, without
//! reading the peer's `consumed` (TCP's piggybacked ACK).
//!
//! Messages up to [`INLINE_MAX`] bytes travel in the cell. A longer one
//! travels as the sender's gather list (stored beside the cells, one stride
//! of entries per cell): the consumer copies straight from the sender's
//! registered memory into the receive, the one copy a NIC would make.
//!
//! Layout: `repr(C)`, 64-byte aligned cells of [`CELL_BYTES`] — the layout the
//! shared-memory fabric maps into both processes.

use crate::fabric::Sge;
use crate::sync::{AtomicU32, AtomicU64, CachePadded, Ordering, UnsafeCell};
use std::sync::Arc;

/// Bytes of one cell (three cache lines).
pub(super) const CELL_BYTES: usize = 192;
/// Header bytes before the inline payload.
const HEADER_BYTES: usize = 24;
/// Longest message carried inside its cell.
pub(super) const INLINE_MAX: usize = CELL_BYTES - HEADER_BYTES;

/// One message slot. Only `payload` is plain memory; its accesses are
/// ordered by `seq` (producer writes, then Release-stores `seq`; consumer
/// Acquire-loads `seq`, then reads) and by `consumed` (the consumer's reads
/// happen before it publishes the cell as free; the producer writes the
/// cell again only after it saw that).
#[repr(C, align(64))]
struct Cell {
    /// `index + 1` of the message the cell holds once published (0 before
    /// the first lap). Written by the producer only.
    seq: AtomicU64,
    /// Message length in bytes. Written by the producer before `seq`.
    len: AtomicU32,
    /// 0: the payload is inline; `n > 0`: the message is the `n` gather
    /// entries of this cell in [`CellRing::gathers`]. Written by the
    /// producer before `seq`.
    nsge: AtomicU32,
    /// Messages of the opposite direction the producer's end had consumed
    /// when it wrote the cell. Written by the producer before `seq`.
    ack: AtomicU64,
    /// Inline payload (first `len` bytes meaningful when `nsge == 0`).
    payload: UnsafeCell<[u8; INLINE_MAX]>,
}

// loom's atomics are larger than the native ones.
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<Cell>() == CELL_BYTES);

impl Default for Cell {
    fn default() -> Cell {
        Cell {
            seq: AtomicU64::new(0),
            len: AtomicU32::new(0),
            nsge: AtomicU32::new(0),
            ack: AtomicU64::new(0),
            payload: UnsafeCell::new([0; INLINE_MAX]),
        }
    }
}

// SAFETY: every field is an atomic or plain bytes, valid as zero bytes,
// which is what `default` makes (natively; loom builds never zero).
unsafe impl super::zeroed::Zeroable for Cell {}

/// A gather entry stored with atomics (written by the producer before the
/// cell's `seq`, read by the consumer after it).
#[derive(Default)]
struct AtomicSge {
    addr: AtomicU64,
    /// `len` in the low 32 bits, `lkey` in the high.
    len_lkey: AtomicU64,
}

// SAFETY: two atomics, zero as zero bytes, as `default` makes them.
unsafe impl super::zeroed::Zeroable for AtomicSge {}

impl AtomicSge {
    fn store(&self, s: &Sge) {
        self.addr.store(s.addr as u64, Ordering::Relaxed);
        let v = u64::from(s.len) | u64::from(s.lkey) << 32;
        self.len_lkey.store(v, Ordering::Relaxed);
    }

    fn load(&self) -> Sge {
        let v = self.len_lkey.load(Ordering::Relaxed);
        Sge {
            addr: self.addr.load(Ordering::Relaxed) as usize,
            len: v as u32,
            lkey: (v >> 32) as u32,
        }
    }
}

/// The shared part of a ring.
pub(super) struct CellRing {
    cells: Box<[Cell]>,
    /// `cells.len() - 1` (the length is a power of two).
    mask: u64,
    /// Gather entries of long messages: cell `i` owns
    /// `[i * stride, (i + 1) * stride)`.
    gathers: Box<[AtomicSge]>,
    /// Gather entries per cell (the sender's `max_sge`).
    stride: usize,
    /// Cells consumed since creation. Written by the consumer only
    /// (Release, after it finished reading those cells); read by the
    /// producer (room) and by the sending end's reaper (its sends are done).
    consumed: CachePadded<AtomicU64>,
}

// SAFETY: the only non-atomic state is each cell's payload, accessed under
// the publication protocol of the module docs by the one producer and the
// one consumer (each a unique handle).
unsafe impl Sync for CellRing {}
// SAFETY: as above; the ring owns plain bytes and atomics.
unsafe impl Send for CellRing {}

impl CellRing {
    /// Cells consumed so far (Acquire: the consumer's reads of them, and
    /// whatever it wrote before publishing, happen before).
    pub(super) fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Acquire)
    }

    /// Whether message `index` is published (it may be consumed already).
    pub(super) fn has(&self, index: u64) -> bool {
        self.ready(index).is_some()
    }

    /// The message at `index`, if published (whoever holds the consumer
    /// handle is the only one to read it: see [`CellConsumer::peek`]).
    fn ready(&self, index: u64) -> Option<&Cell> {
        let cell = &self.cells[(index & self.mask) as usize];
        (cell.seq.load(Ordering::Acquire) == index + 1).then_some(cell)
    }
}

/// Creates a ring of at least `capacity` cells (rounded up to a power of
/// two) for messages of up to `stride` gather entries.
pub(super) fn ring(capacity: usize, stride: usize) -> (CellProducer, CellConsumer) {
    let cap = capacity.max(1).next_power_of_two();
    let cells = super::zeroed::slice(cap);
    let gathers = super::zeroed::slice(cap * stride);
    let ring = Arc::new(CellRing {
        cells,
        mask: cap as u64 - 1,
        gathers,
        stride,
        consumed: CachePadded::new(AtomicU64::new(0)),
    });
    (
        CellProducer {
            ring: ring.clone(),
            tail: 0,
            cached_consumed: 0,
        },
        CellConsumer { ring, head: 0 },
    )
}

/// The producer handle (one per ring; its owner serialises the sends).
pub(super) struct CellProducer {
    ring: Arc<CellRing>,
    /// Messages published so far (the next message's index).
    tail: u64,
    /// Last value read from `consumed`, `<= consumed`.
    cached_consumed: u64,
}

impl CellProducer {
    pub(super) fn ring(&self) -> &Arc<CellRing> {
        &self.ring
    }

    /// Index the next message gets.
    pub(super) fn tail(&self) -> u64 {
        self.tail
    }

    /// Whether a cell is free, reloading the consumer's index only when the
    /// cached one says full.
    fn room(&mut self) -> bool {
        let cap = self.ring.mask + 1;
        if self.tail - self.cached_consumed < cap {
            return true;
        }
        self.cached_consumed = self.ring.consumed();
        self.tail - self.cached_consumed < cap
    }

    /// Publishes a message of `len` bytes gathered from `src`: inline when
    /// it fits a cell (copied now), else as the gather list itself, with the
    /// acknowledgement `ack` (see the module docs). Returns
    /// the message's index, or `None` if the ring is full or `src` has more
    /// entries than the ring's stride (nothing is written then).
    ///
    /// # Safety
    /// When `len <= INLINE_MAX`, every entry of `src` names readable memory
    /// for the duration of the call, and `len` is their total length.
    pub(super) unsafe fn push(&mut self, src: &[Sge], len: u32, ack: u64) -> Option<u64> {
        if src.len() > self.ring.stride || !self.room() {
            return None;
        }
        let index = self.tail;
        let slot = (index & self.ring.mask) as usize;
        let cell = &self.ring.cells[slot];
        if len as usize <= INLINE_MAX {
            cell.payload.with_mut(|p| {
                let mut at = 0usize;
                for s in src {
                    let n = s.len as usize;
                    // SAFETY: the caller guarantees `[s.addr, +n)` is
                    // readable; `at + n <= len <= INLINE_MAX` keeps the
                    // destination inside the payload, which no one else
                    // accesses: the consumer gave this cell back (`room`)
                    // and reads it again only after `seq` below.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            s.addr as *const u8,
                            (p as *mut u8).add(at),
                            n,
                        )
                    };
                    at += n;
                }
                debug_assert_eq!(at, len as usize);
            });
            cell.nsge.store(0, Ordering::Relaxed);
        } else {
            let base = slot * self.ring.stride;
            for (g, s) in self.ring.gathers[base..].iter().zip(src) {
                g.store(s);
            }
            cell.nsge.store(src.len() as u32, Ordering::Relaxed);
        }
        cell.len.store(len, Ordering::Relaxed);
        cell.ack.store(ack, Ordering::Relaxed);
        cell.seq.store(index + 1, Ordering::Release);
        self.tail += 1;
        Some(index)
    }
}

/// The consumer handle (one per ring; its owner serialises the matching).
pub(super) struct CellConsumer {
    ring: Arc<CellRing>,
    /// Messages consumed so far (the next one's index); published to
    /// `consumed` by [`CellConsumer::publish`].
    head: u64,
}

/// A published message at the consumer's head.
pub(super) struct Message<'a> {
    ring: &'a CellRing,
    cell: &'a Cell,
    slot: usize,
}

impl CellConsumer {
    /// Index of the next message to consume.
    pub(super) fn head(&self) -> u64 {
        self.head
    }

    /// The next message, if the producer published it.
    pub(super) fn peek(&self) -> Option<Message<'_>> {
        let cell = self.ring.ready(self.head)?;
        Some(Message {
            ring: &self.ring,
            cell,
            slot: (self.head & self.ring.mask) as usize,
        })
    }

    /// Consumes the message at the head (after `peek` showed it). The
    /// producer learns of it at the next [`CellConsumer::publish`].
    pub(super) fn pop(&mut self) {
        debug_assert!(self.ring.ready(self.head).is_some(), "pop of an empty ring");
        self.head += 1;
    }

    /// Makes every `pop` so far visible to the producer and to the sending
    /// end's reaper; returns whether that moved the published index.
    pub(super) fn publish(&self) -> bool {
        let r = &self.ring.consumed;
        if r.load(Ordering::Relaxed) == self.head {
            return false;
        }
        r.store(self.head, Ordering::Release);
        true
    }
}

impl Message<'_> {
    /// Message length in bytes.
    pub(super) fn len(&self) -> u32 {
        self.cell.len.load(Ordering::Relaxed)
    }

    /// The acknowledgement the message carries.
    pub(super) fn ack(&self) -> u64 {
        self.cell.ack.load(Ordering::Relaxed)
    }

    /// Copies the message into the scatter list `dst` (which the caller
    /// checked has room for `len()` bytes).
    ///
    /// # Safety
    /// Every entry of `dst` names writable memory nobody else accesses
    /// during the call; for a message carried as a gather list, its entries
    /// name readable memory (the sender's registered, posted buffers).
    pub(super) unsafe fn copy_to(&self, dst: impl Iterator<Item = Sge>) {
        let nsge = self.cell.nsge.load(Ordering::Relaxed) as usize;
        if nsge == 0 {
            let len = self.len() as usize;
            self.cell.payload.with(|p| {
                let src = Sge {
                    addr: p as usize,
                    len: len as u32,
                    lkey: 0,
                };
                // SAFETY: the payload's first `len` bytes were written before
                // `seq` was published and stay untouched until this consumer
                // gives the cell back; `dst` is the caller's.
                unsafe { super::mr::copy_lists([src].into_iter(), dst) }
            });
        } else {
            let base = self.slot * self.ring.stride;
            let src = self.ring.gathers[base..base + nsge]
                .iter()
                .map(AtomicSge::load);
            // SAFETY: the caller guarantees both lists.
            unsafe { super::mr::copy_lists(src, dst) }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn sge(buf: &[u8]) -> Sge {
        Sge {
            addr: buf.as_ptr() as usize,
            len: buf.len() as u32,
            lkey: 1,
        }
    }

    /// Pushes `msg` (split in two entries), pops it into a fresh buffer.
    fn round_trip(p: &mut CellProducer, c: &mut CellConsumer, msg: &[u8], ack: u64) -> Vec<u8> {
        let (a, b) = msg.split_at(msg.len() / 2);
        // SAFETY: both halves are live slices for the call.
        let index = unsafe { p.push(&[sge(a), sge(b)], msg.len() as u32, ack) }.unwrap();
        assert_eq!(index, c.head());
        let m = c.peek().expect("published");
        assert_eq!((m.len() as usize, m.ack()), (msg.len(), ack));
        let mut out = vec![0u8; msg.len()];
        let (x, y) = out.split_at_mut(msg.len() / 3);
        let dst = [sge(x), sge(y)];
        // SAFETY: `out` is ours; a long message's gather list names `msg`,
        // alive for the call.
        unsafe { m.copy_to(dst.into_iter()) };
        c.pop();
        out
    }

    #[test]
    fn messages_inline_and_gathered_cross_laps_intact() {
        let (mut p, mut c) = ring(4, 2);
        for round in 0..11u64 {
            for len in [0, 1, 8, INLINE_MAX, INLINE_MAX + 1, 4096] {
                let msg: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + round) as u8).collect();
                assert_eq!(
                    round_trip(&mut p, &mut c, &msg, round * 100 + len as u64),
                    msg
                );
                c.publish();
            }
        }
        assert!(c.peek().is_none());
    }

    #[test]
    fn full_ring_refuses_until_the_consumer_publishes() {
        let (mut p, mut c) = ring(2, 1);
        let one = [7u8];
        // SAFETY: `one` is alive for each call.
        let push = |p: &mut CellProducer| unsafe { p.push(&[sge(&one)], 1, 0) };
        assert_eq!((push(&mut p), push(&mut p)), (Some(0), Some(1)));
        assert_eq!(push(&mut p), None, "two cells, both taken");
        c.pop();
        assert_eq!(push(&mut p), None, "popped but not published");
        assert!(c.publish());
        assert!(!c.publish(), "nothing new to publish");
        assert_eq!(push(&mut p), Some(2));
        assert_eq!(p.ring().consumed(), 1);
        // Too many entries for the stride: refused, nothing written.
        // SAFETY: as above.
        let wide = unsafe { p.push(&[sge(&one), sge(&one)], 2, 0) };
        assert_eq!(wide, None);
    }

    #[test]
    fn a_stale_cell_of_the_previous_lap_never_looks_ready() {
        let (mut p, mut c) = ring(2, 1);
        let one = [1u8];
        for _ in 0..2 {
            // SAFETY: `one` is alive for the call.
            unsafe { p.push(&[sge(&one)], 1, 0) }.unwrap();
            c.pop();
        }
        c.publish();
        // Head 2 maps to cell 0, which still holds message 0.
        assert!(c.peek().is_none());
        assert!(!p.ring().has(2) && p.ring().has(1));
    }
}

/// loom model: every interleaving of one producer and one consumer moving
/// messages through a two-cell ring, with the consumer giving cells back.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::sync::thread;

    #[test]
    fn cell_ring_publication_and_reuse() {
        crate::sync::model("cell ring", 3, || {
            let (mut p, mut c) = ring(2, 1);
            let producer = thread::spawn(move || {
                for v in 1..=3u8 {
                    let src = [v; 2];
                    let s = Sge {
                        addr: src.as_ptr() as usize,
                        len: 2,
                        lkey: 0,
                    };
                    // SAFETY: `src` is alive for the call.
                    while unsafe { p.push(&[s], 2, u64::from(v)) }.is_none() {
                        thread::yield_now();
                    }
                }
            });
            for v in 1..=3u8 {
                let m = loop {
                    if let Some(m) = c.peek() {
                        break m;
                    }
                    thread::yield_now();
                };
                assert_eq!((m.len(), m.ack()), (2, u64::from(v)));
                let mut out = [0u8; 2];
                let d = Sge {
                    addr: out.as_mut_ptr() as usize,
                    len: 2,
                    lkey: 0,
                };
                // SAFETY: `out` is ours; the message is inline.
                unsafe { m.copy_to([d].into_iter()) };
                assert_eq!(out, [v; 2], "a message read before it was written");
                c.pop();
                c.publish();
            }
            producer.join().unwrap();
        });
    }
}
