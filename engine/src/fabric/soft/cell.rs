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
//! reading the peer's `consumed` (TCP's piggybacked ACK). The shared-memory
//! fabric relies on the same: its sender reads `consumed` only when the
//! ring looks full or no acknowledgement comes.
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
use std::ptr::NonNull;
use std::sync::Arc;

/// Bytes of one cell (three cache lines).
pub(crate) const CELL_BYTES: usize = 192;
/// Header bytes before the inline payload.
const HEADER_BYTES: usize = 24;
/// Longest message carried inside its cell.
pub(crate) const INLINE_MAX: usize = CELL_BYTES - HEADER_BYTES;

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
#[repr(C)]
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

/// Where a ring's cells, gather entries and consumed index live (held
/// for its drop only).
#[allow(dead_code)]
enum Memory {
    /// Allocated by [`ring`]: the owners of the memory the ring's pointers
    /// name (which does not move with them), freed when the ring drops.
    Heap(
        super::zeroed::Zeroed<Cell>,
        super::zeroed::Zeroed<AtomicSge>,
        Box<CachePadded<AtomicU64>>,
    ),
    /// Inside memory that this value keeps mapped (a segment shared with
    /// another process, see [`external`]).
    #[cfg(not(loom))]
    External(Arc<dyn Send + Sync>),
}

/// The shared part of a ring.
pub(crate) struct CellRing {
    /// `mask + 1` cells.
    cells: NonNull<Cell>,
    /// Gather entries of long messages: cell `i` owns
    /// `[i * stride, (i + 1) * stride)`.
    gathers: NonNull<AtomicSge>,
    /// Cells consumed since creation. Written by the consumer only
    /// (Release, after it finished reading those cells); read by the
    /// producer (room) and by the sending end's reaper (its sends are done).
    consumed: NonNull<AtomicU64>,
    /// Cells minus one (the count is a power of two). Never read from the
    /// cells' memory, so a slot index is always in bounds.
    mask: u64,
    /// Gather entries per cell (the sender's `max_sge`).
    stride: usize,
    /// Owns or keeps mapped what the pointers name (only dropped).
    #[allow(dead_code)]
    memory: Memory,
}

// SAFETY: the only non-atomic state is each cell's payload, accessed under
// the publication protocol of the module docs by the one producer and the
// one consumer (each a unique handle); the pointers name memory the ring
// owns or keeps mapped (`memory`).
unsafe impl Sync for CellRing {}
// SAFETY: as above; the ring owns plain bytes and atomics.
unsafe impl Send for CellRing {}

impl CellRing {
    /// The cell of message `index`.
    fn cell(&self, index: u64) -> &Cell {
        // SAFETY: `index & mask` is below the cell count; the cells live as
        // long as the ring.
        unsafe { &*self.cells.as_ptr().add((index & self.mask) as usize) }
    }

    /// The gather entries of cell `slot` (`slot <= mask`).
    fn gathers(&self, slot: usize) -> &[AtomicSge] {
        debug_assert!(slot as u64 <= self.mask);
        // SAFETY: cell `slot` owns `stride` entries from `slot * stride`,
        // inside the `(mask + 1) * stride` entries that live as long as the
        // ring.
        unsafe {
            std::slice::from_raw_parts(self.gathers.as_ptr().add(slot * self.stride), self.stride)
        }
    }

    fn consumed_word(&self) -> &AtomicU64 {
        // SAFETY: the word lives as long as the ring.
        unsafe { self.consumed.as_ref() }
    }

    /// Cells consumed so far (Acquire: the consumer's reads of them, and
    /// whatever it wrote before publishing, happen before).
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed_word().load(Ordering::Acquire)
    }

    /// Overwrites the consumed index, as a corrupt or late peer could
    /// leave it (tests only).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn set_consumed(&self, v: u64) {
        self.consumed_word().store(v, Ordering::Release);
    }

    /// Whether message `index` is published (it may be consumed already).
    pub(crate) fn has(&self, index: u64) -> bool {
        self.ready(index).is_some()
    }

    /// The message at `index`, if published (whoever holds the consumer
    /// handle is the only one to read it: see [`CellConsumer::peek`]).
    fn ready(&self, index: u64) -> Option<&Cell> {
        let cell = self.cell(index);
        (cell.seq.load(Ordering::Acquire) == index + 1).then_some(cell)
    }

    fn handles(ring: Arc<CellRing>) -> (CellProducer, CellConsumer) {
        (
            CellProducer {
                ring: ring.clone(),
                tail: 0,
                cached_consumed: 0,
            },
            CellConsumer { ring, head: 0 },
        )
    }
}

/// Creates a ring of at least `capacity` cells (rounded up to a power of
/// two) for messages of up to `stride` gather entries.
pub(super) fn ring(capacity: usize, stride: usize) -> (CellProducer, CellConsumer) {
    let cap = capacity.max(1).next_power_of_two();
    let cells = super::zeroed::slice::<Cell>(cap);
    let gathers = super::zeroed::slice::<AtomicSge>(cap * stride);
    let padded = Box::new(CachePadded::new(AtomicU64::new(0)));
    let ring = Arc::new(CellRing {
        cells: NonNull::from(&*cells).cast(),
        gathers: NonNull::from(&*gathers).cast(),
        consumed: NonNull::from(&**padded),
        mask: cap as u64 - 1,
        stride,
        memory: Memory::Heap(cells, gathers, padded),
    });
    CellRing::handles(ring)
}

/// Byte layout of a ring laid in memory of its own ([`external`]): the
/// cells, then the gather entries, then the consumed index on a line of its
/// own; every part [`RING_ALIGN`]-aligned.
#[cfg(not(loom))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingLayout {
    /// Cells (a power of two).
    pub(crate) cells: usize,
    /// Gather entries per cell.
    pub(crate) stride: usize,
}

/// Alignment of an external ring and of each of its parts.
#[cfg(not(loom))]
pub(crate) const RING_ALIGN: usize = 128;

#[cfg(not(loom))]
impl RingLayout {
    /// At least `capacity` cells (rounded up to a power of two); `None` if
    /// the ring would not fit the address space.
    pub(crate) fn new(capacity: usize, stride: usize) -> Option<RingLayout> {
        let l = RingLayout {
            cells: capacity.max(1).checked_next_power_of_two()?,
            stride,
        };
        l.try_bytes().map(|_| l)
    }

    fn gathers_at(&self) -> usize {
        self.cells * CELL_BYTES
    }

    fn consumed_at(&self) -> usize {
        let g = self.gathers_at() + self.cells * self.stride * std::mem::size_of::<AtomicSge>();
        g.next_multiple_of(RING_ALIGN)
    }

    fn try_bytes(&self) -> Option<usize> {
        let g = self.cells.checked_mul(CELL_BYTES)?;
        let s = self
            .cells
            .checked_mul(self.stride)?
            .checked_mul(std::mem::size_of::<AtomicSge>())?;
        g.checked_add(s)?
            .checked_next_multiple_of(RING_ALIGN)?
            .checked_add(RING_ALIGN)
    }

    /// Bytes the ring takes (a multiple of [`RING_ALIGN`]).
    pub(crate) fn bytes(&self) -> usize {
        self.consumed_at() + RING_ALIGN
    }
}

/// A ring in the `layout.bytes()` bytes at `base`, which `keep` keeps
/// mapped; the producer and consumer handles start at message 0. Used
/// across processes, one handle in each: the atomics work on shared
/// mappings, and whatever the other process writes there is read only
/// through [`Message::decode`] and checked.
///
/// # Safety
/// `base` is [`RING_ALIGN`]-aligned and names `layout.bytes()` bytes of
/// readable and writable memory, zero when the ring is first used, that stay
/// mapped while `keep` lives and that nothing in this process accesses but
/// rings made by this function (with the same layout).
#[cfg(not(loom))]
pub(crate) unsafe fn external(
    base: NonNull<u8>,
    layout: RingLayout,
    keep: Arc<dyn Send + Sync>,
) -> (CellProducer, CellConsumer) {
    debug_assert_eq!(base.as_ptr() as usize % RING_ALIGN, 0);
    // SAFETY: the offsets are inside `layout.bytes()` (caller), each part
    // aligned for its type; zero bytes are valid cells, entries and words.
    let at = |off: usize| unsafe { NonNull::new_unchecked(base.as_ptr().add(off)) };
    let ring = Arc::new(CellRing {
        cells: at(0).cast(),
        gathers: at(layout.gathers_at()).cast(),
        consumed: at(layout.consumed_at()).cast(),
        mask: layout.cells as u64 - 1,
        stride: layout.stride,
        memory: Memory::External(keep),
    });
    CellRing::handles(ring)
}

/// What a message asks of its receiver: the cell's operation tag (bits
/// 24-31 of its `nsge` word; the soft fabric only sends, tag 0).
#[cfg(not(loom))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CellOp {
    /// A two-sided send into the receiver's next posted receive.
    Send,
    /// Write the sender's gather list to `[remote_addr, +len)` of the
    /// receiver's region named by `rkey`.
    Write { remote_addr: u64, rkey: u32 },
    /// Read `[remote_addr, +len)` of the receiver's region named by `rkey`
    /// into the sender's scatter list (carried as the gather list).
    Read { remote_addr: u64, rkey: u32 },
}

#[cfg(not(loom))]
const TAG_SHIFT: u32 = 24;
#[cfg(not(loom))]
const COUNT_MASK: u32 = (1 << TAG_SHIFT) - 1;

/// Copies `n` bytes from `src` to `dst` as `memmove` does: up to 16
/// without a call (a small message's payload, an 8-byte RDMA, where
/// `memmove`'s call and dispatch cost more than the copy), by two possibly
/// overlapping loads (three below 4 bytes) that all come before the
/// stores, so the ranges may overlap, as ranges a program registered twice
/// can.
///
/// # Safety
/// As [`std::ptr::copy`]: `[src, +n)` readable, `[dst, +n)` writable.
#[inline(always)]
pub(crate) unsafe fn copy_bytes(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: each access lies inside `[src, +n)` or `[dst, +n)` (the
    // second of each pair ends at `n`, `n / 2 < n`), which the caller
    // vouches for; unaligned reads and writes need no alignment; every
    // load precedes every store.
    unsafe {
        if n > 16 {
            std::ptr::copy(src, dst, n);
        } else if n >= 8 {
            let (a, b) = (
                src.cast::<u64>().read_unaligned(),
                src.add(n - 8).cast::<u64>().read_unaligned(),
            );
            dst.cast::<u64>().write_unaligned(a);
            dst.add(n - 8).cast::<u64>().write_unaligned(b);
        } else if n >= 4 {
            let (a, b) = (
                src.cast::<u32>().read_unaligned(),
                src.add(n - 4).cast::<u32>().read_unaligned(),
            );
            dst.cast::<u32>().write_unaligned(a);
            dst.add(n - 4).cast::<u32>().write_unaligned(b);
        } else if n > 0 {
            let (a, b, c) = (*src, *src.add(n / 2), *src.add(n - 1));
            *dst = a;
            *dst.add(n / 2) = b;
            *dst.add(n - 1) = c;
        }
    }
}

/// The producer handle (one per ring; its owner serialises the sends).
pub(crate) struct CellProducer {
    ring: Arc<CellRing>,
    /// Messages published so far (the next message's index).
    tail: u64,
    /// Last value read from `consumed`, `<= consumed`.
    cached_consumed: u64,
}

impl CellProducer {
    pub(crate) fn ring(&self) -> &Arc<CellRing> {
        &self.ring
    }

    /// Index the next message gets.
    pub(crate) fn tail(&self) -> u64 {
        self.tail
    }

    /// Whether a cell is free, reloading the consumer's index only when the
    /// cached one says full. A consumer index beyond the tail (only a
    /// corrupt peer writes one) wraps around and reads as full.
    fn room(&mut self) -> bool {
        let cap = self.ring.mask + 1;
        if self.tail.wrapping_sub(self.cached_consumed) < cap {
            return true;
        }
        self.cached_consumed = self.ring.consumed();
        self.tail.wrapping_sub(self.cached_consumed) < cap
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
    #[inline(always)]
    pub(crate) unsafe fn push(&mut self, src: &[Sge], len: u32, ack: u64) -> Option<u64> {
        if src.len() > self.ring.stride || !self.room() {
            return None;
        }
        let index = self.tail;
        let slot = (index & self.ring.mask) as usize;
        let cell = self.ring.cell(index);
        if len as usize <= INLINE_MAX {
            // Inlined: as a call (the shared-memory fabric's post makes one)
            // its saves and restores cost more than an 8-byte payload's copy.
            cell.payload.with_mut(
                #[inline(always)]
                |p| {
                    let mut at = 0usize;
                    for s in src {
                        let n = s.len as usize;
                        // SAFETY: the caller guarantees `[s.addr, +n)` is
                        // readable; `at + n <= len <= INLINE_MAX` keeps the
                        // destination inside the payload, which no one else
                        // accesses: the consumer gave this cell back (`room`)
                        // and reads it again only after `seq` below.
                        unsafe { copy_bytes(s.addr as *const u8, (p as *mut u8).add(at), n) };
                        at += n;
                    }
                    debug_assert_eq!(at, len as usize);
                },
            );
            cell.nsge.store(0, Ordering::Relaxed);
        } else {
            for (g, s) in self.ring.gathers(slot).iter().zip(src) {
                g.store(s);
            }
            cell.nsge.store(src.len() as u32, Ordering::Relaxed);
        }
        cell.len.store(len, Ordering::Relaxed);
        cell.ack.store(ack, Ordering::Relaxed);
        cell.seq.store(index + 1, Ordering::Release);
        #[cfg(feature = "perf-marks")]
        crate::perf_marks::published();
        self.tail += 1;
        Some(index)
    }

    /// Publishes an RDMA request: `op`'s remote address and key in the
    /// payload, the local list `local` (`len` bytes in all) as the gather
    /// list, never copied, with the acknowledgement `ack`. `None` as for
    /// [`CellProducer::push`].
    #[cfg(not(loom))]
    #[inline]
    pub(crate) fn push_rdma(
        &mut self,
        op: CellOp,
        local: &[Sge],
        len: u32,
        ack: u64,
    ) -> Option<u64> {
        let (tag, remote_addr, rkey) = match op {
            CellOp::Send => return None,
            CellOp::Write { remote_addr, rkey } => (1u32, remote_addr, rkey),
            CellOp::Read { remote_addr, rkey } => (2u32, remote_addr, rkey),
        };
        if local.len() > self.ring.stride || !self.room() {
            return None;
        }
        let index = self.tail;
        let slot = (index & self.ring.mask) as usize;
        let cell = self.ring.cell(index);
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&remote_addr.to_le_bytes());
        header[8..].copy_from_slice(&rkey.to_le_bytes());
        cell.payload.with_mut(|p| {
            // SAFETY: 12 bytes fit the payload, which no one else accesses
            // (as in `push`).
            unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), p as *mut u8, 12) }
        });
        for (g, s) in self.ring.gathers(slot).iter().zip(local) {
            g.store(s);
        }
        cell.nsge
            .store(local.len() as u32 | tag << TAG_SHIFT, Ordering::Relaxed);
        cell.len.store(len, Ordering::Relaxed);
        cell.ack.store(ack, Ordering::Relaxed);
        cell.seq.store(index + 1, Ordering::Release);
        self.tail += 1;
        Some(index)
    }
}

/// The consumer handle (one per ring; its owner serialises the matching).
pub(crate) struct CellConsumer {
    ring: Arc<CellRing>,
    /// Messages consumed so far (the next one's index); published to
    /// `consumed` by [`CellConsumer::publish`].
    head: u64,
}

/// A published message at the consumer's head.
pub(crate) struct Message<'a> {
    ring: &'a CellRing,
    cell: &'a Cell,
    slot: usize,
}

impl CellConsumer {
    #[cfg(not(loom))]
    pub(crate) fn ring(&self) -> &Arc<CellRing> {
        &self.ring
    }

    /// Index of the next message to consume.
    pub(crate) fn head(&self) -> u64 {
        self.head
    }

    /// The next message, if the producer published it.
    pub(crate) fn peek(&self) -> Option<Message<'_>> {
        let cell = self.ring.ready(self.head)?;
        Some(Message {
            ring: &self.ring,
            cell,
            slot: (self.head & self.ring.mask) as usize,
        })
    }

    /// Consumes the message at the head (after `peek` showed it). The
    /// producer learns of it at the next [`CellConsumer::publish`].
    pub(crate) fn pop(&mut self) {
        debug_assert!(self.ring.ready(self.head).is_some(), "pop of an empty ring");
        self.head += 1;
    }

    /// Makes every `pop` so far visible to the producer and to the sending
    /// end's reaper; returns whether that moved the published index.
    pub(crate) fn publish(&self) -> bool {
        let r = self.ring.consumed_word();
        if r.load(Ordering::Relaxed) == self.head {
            return false;
        }
        r.store(self.head, Ordering::Release);
        true
    }
}

/// A message as [`Message::decode`] found it: every field within bounds.
#[cfg(not(loom))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub(crate) op: CellOp,
    /// Bytes the message moves.
    pub(crate) len: u32,
    /// Gather entries (0: a send whose payload is inline).
    pub(crate) nsge: usize,
}

impl Message<'_> {
    /// Message length in bytes.
    pub(crate) fn len(&self) -> u32 {
        self.cell.len.load(Ordering::Relaxed)
    }

    /// The acknowledgement the message carries.
    pub(crate) fn ack(&self) -> u64 {
        self.cell.ack.load(Ordering::Relaxed)
    }

    /// Reads the header of a message another process wrote, checking every
    /// field against the ring's own bounds: `None` for a tag that names no
    /// operation, more gather entries than the stride, or an inline length
    /// above [`INLINE_MAX`]. The gather entries themselves are checked by
    /// [`Message::gather_into`].
    #[cfg(not(loom))]
    pub(crate) fn decode(&self) -> Option<Decoded> {
        let word = self.cell.nsge.load(Ordering::Relaxed);
        let len = self.len();
        let nsge = (word & COUNT_MASK) as usize;
        if nsge > self.ring.stride {
            return None;
        }
        let header = || {
            let mut h = [0u8; 12];
            self.cell.payload.with(|p| {
                // SAFETY: 12 bytes inside the payload; the bytes may change
                // under a corrupt peer, but they are copied as plain bytes
                // and any value is valid.
                unsafe { std::ptr::copy_nonoverlapping(p as *const u8, h.as_mut_ptr(), 12) }
            });
            let addr = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
            let rkey = u32::from_le_bytes(h[8..].try_into().expect("4 bytes"));
            (addr, rkey)
        };
        let op = match word >> TAG_SHIFT {
            0 => {
                if nsge == 0 && len as usize > INLINE_MAX {
                    return None;
                }
                CellOp::Send
            }
            1 => {
                let (remote_addr, rkey) = header();
                CellOp::Write { remote_addr, rkey }
            }
            2 => {
                let (remote_addr, rkey) = header();
                CellOp::Read { remote_addr, rkey }
            }
            _ => return None,
        };
        Some(Decoded { op, len, nsge })
    }

    /// Copies the first `d.nsge` gather entries of the message `d` decoded
    /// into `out` and returns them, if they fit `out` and add up to
    /// exactly `d.len` bytes (read once: what is returned is what was
    /// checked).
    #[cfg(not(loom))]
    pub(crate) fn gather_into<'o>(&self, d: &Decoded, out: &'o mut [Sge]) -> Option<&'o [Sge]> {
        let out = out.get_mut(..d.nsge)?;
        let mut total = 0u64;
        for (o, g) in out.iter_mut().zip(self.ring.gathers(self.slot)) {
            *o = g.load();
            total += u64::from(o.len);
        }
        (total == u64::from(d.len)).then_some(&*out)
    }

    /// Copies the inline payload of the send `d` decoded (`d.nsge == 0`,
    /// so `d.len <= INLINE_MAX`) into `out[..d.len]`.
    #[cfg(not(loom))]
    pub(crate) fn copy_inline(&self, d: &Decoded, out: &mut [u8; INLINE_MAX]) {
        let n = (d.len as usize).min(INLINE_MAX);
        self.cell.payload.with(|p| {
            // SAFETY: `n <= INLINE_MAX` bytes of the payload into `out`; the
            // bytes are plain data whatever a corrupt peer wrote.
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, out.as_mut_ptr(), n) }
        });
    }

    /// Where the inline payload of the send `d` decoded lies (`d.nsge ==
    /// 0`): its first `d.len` bytes (at most [`INLINE_MAX`]), valid until
    /// the consumer pops the message. Another process may write them
    /// meanwhile; whoever copies them takes them as plain bytes, any value
    /// being valid.
    #[cfg(not(loom))]
    pub(crate) fn inline_src(&self, d: &Decoded) -> Sge {
        Sge {
            addr: self.cell.payload.with(|p| p as usize),
            len: d.len.min(INLINE_MAX as u32),
            lkey: 0,
        }
    }

    /// Copies the message into the scatter list `dst` (which the caller
    /// checked has room for `len()` bytes).
    ///
    /// # Safety
    /// Every entry of `dst` names writable memory nobody else accesses
    /// during the call; for a message carried as a gather list, its entries
    /// name readable memory (the sender's registered, posted buffers).
    #[inline]
    pub(super) unsafe fn copy_to(&self, mut dst: impl Iterator<Item = Sge>) {
        let nsge = self.cell.nsge.load(Ordering::Relaxed) as usize;
        if nsge == 0 {
            let len = self.len() as usize;
            let Some(first) = dst.next() else { return };
            self.cell.payload.with(|p| {
                if first.len as usize >= len {
                    // The common case: the receive's first entry holds it.
                    // SAFETY: the payload's first `len` bytes were written
                    // before `seq` was published and stay untouched until
                    // this consumer gives the cell back; `first` is the
                    // caller's, with room for them.
                    unsafe { copy_bytes(p as *const u8, first.addr as *mut u8, len) }
                } else {
                    let src = Sge {
                        addr: p as usize,
                        len: len as u32,
                        lkey: 0,
                    };
                    let dst = std::iter::once(first).chain(dst);
                    // SAFETY: as above; `dst` is the caller's.
                    unsafe { super::mr::copy_lists([src].into_iter(), dst) }
                }
            });
        } else {
            let src = self.ring.gathers(self.slot)[..nsge]
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
    fn copy_bytes_copies_every_length_exactly() {
        let src: Vec<u8> = (1..=40).collect();
        for n in 0..=40 {
            let mut dst = [0u8; 42];
            // SAFETY: `n <= 40` bytes of `src`, into `dst[1..]`.
            unsafe { copy_bytes(src.as_ptr(), dst.as_mut_ptr().add(1), n) };
            assert_eq!(dst[1..=n], src[..n], "{n} bytes");
            assert!(dst[0] == 0 && dst[n + 1..].iter().all(|b| *b == 0), "{n}");
        }
    }

    /// As `memmove`: overlapping ranges, either way round, every length
    /// and shift up to past the inline limit (a program may register a
    /// range twice and RDMA-write within it).
    #[test]
    fn copy_bytes_moves_overlapping_ranges() {
        for n in 0..=40usize {
            for shift in 0..=n {
                for forward in [true, false] {
                    let mut buf: Vec<u8> = (1..=90).collect();
                    let mut want = buf.clone();
                    let (s, d) = if forward { (0, shift) } else { (shift, 0) };
                    want.copy_within(s..s + n, d);
                    let p = buf.as_mut_ptr();
                    // SAFETY: both ranges lie inside `buf` (`shift + n <= 80`).
                    unsafe { copy_bytes(p.add(s), p.add(d), n) };
                    assert_eq!(buf, want, "{n} bytes, shift {shift}, forward {forward}");
                }
            }
        }
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
