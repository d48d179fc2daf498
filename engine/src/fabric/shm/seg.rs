//! The segment one end of a connection shares with its peer: a `memfd`
//! holding that end's outgoing cell ring and its control words, created by
//! the end and mapped by both (each end owns the segment it sends through).
//!
//! Layout (`repr(C)`, little-endian, 128-byte aligned parts): a
//! [`Header`] line — identity and geometry, written once by the owner
//! before the segment is sent — then the three lines of [`Control`] words
//! (state, busy, armed: each changes for one reason), then the ring
//! ([`RingLayout`]). The receiver checks the magic, version,
//! geometry and size once at mapping time and keeps its own copy of the
//! geometry: later writes to the header cannot move its accesses out of
//! bounds.

use super::sys::{sealed_memfd, sealed_size, Mapping};
use crate::fabric::soft::cell::{self, CellConsumer, CellProducer, RingLayout, RING_ALIGN};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

/// "SANPSHM1".
const MAGIC: u64 = 0x314d_4853_504e_4153;
/// Layout version; a peer with another one is refused. 2: the control
/// words on three lines (state, busy, armed), and cells carry
/// acknowledgements. 3: the same layout; `busy` covers every pass that
/// takes messages and a break stops its own poller before it stores its
/// state word (`conn`), which a version-2 peer does not.
pub(super) const VERSION: u32 = 3;
/// Largest ring a peer may ask us to map.
const MAX_CELLS: usize = 1 << 20;
/// Largest gather stride (the soft fabric's `max_sge` limit).
pub(super) const MAX_STRIDE: usize = super::sys::MAX_IOV;

/// The segment's first line: identity and ring geometry.
#[repr(C, align(128))]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    /// Cells of the ring (a power of two).
    cells: AtomicU32,
    /// Gather entries per cell.
    stride: AtomicU32,
    /// `FLAG_*` bits; a peer that predates a bit leaves it 0.
    flags: AtomicU32,
}

/// The owner issues a heavy fence ([`super::sys::heavy_fence`]) between
/// storing `armed` and looking for work, so a peer whose process takes part
/// in asymmetric fences needs only a compiler fence between publishing
/// work and loading `armed`.
const FLAG_HEAVY_ARM: u32 = 1;

/// The owner's state, as its peer sees it: three lines, each written by
/// the owner for one reason only, so that a word changing for one reason
/// does not pull away the line the peer polls for another. Each word is
/// written by one side only, as noted (but `armed`, which the one waker
/// clears); the other side only reads it.
#[repr(C)]
pub(super) struct Control {
    /// Read by the peer on every poll; written when the connection breaks.
    pub(super) link: LinkLine,
    /// Non-zero while the owner's poller takes messages from the peer
    /// (copying to or from the peer's memory, publishing the consumed
    /// index); set before and cleared after each pass, so a breaking peer
    /// can wait for it (the seal). Written by the owner only; read by the
    /// peer only when it breaks the connection.
    pub(super) busy: Line<AtomicU32>,
    /// 1 while the owner sleeps and wants an `eventfd` wake-up for new
    /// work. Set by the owner (`arm`); cleared by the one waker (peer,
    /// swap) or by the owner when it wakes. Read by the peer after each
    /// publication of work; unchanged while the owner polls.
    pub(super) armed: Line<AtomicU32>,
}

/// One word on a line of its own ([`RING_ALIGN`] bytes: the pair of lines
/// an adjacent-line prefetcher moves together).
#[repr(C, align(128))]
pub(super) struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The connection's state as the owner sees it.
#[repr(C, align(128))]
pub(super) struct LinkLine {
    /// The owner's view of the connection (`STATE_*`). Written by the owner
    /// only; grows.
    pub(super) state: AtomicU32,
    /// `(index + 1) << 8 | status` of the peer's message the owner refused
    /// (0: none). Written by the owner before `state`.
    pub(super) refused: AtomicU64,
}

impl LinkLine {
    /// The peer's message the owner refused and the status it gave, if
    /// `refused` names one (any other value, a corrupt owner's, names none).
    pub(super) fn refused(&self) -> Option<(u64, crate::fabric::WcStatus)> {
        let w = self.refused.load(std::sync::atomic::Ordering::Relaxed);
        let index = (w >> 8).checked_sub(1)?;
        Some((index, super::status_from(w as u8)))
    }
}

/// The connection is intact.
pub(super) const STATE_INTACT: u32 = 0;
/// The owner closed (`set_error`) or lost the connection.
pub(super) const STATE_CLOSED: u32 = 1;
/// The owner refused a request of the peer (`refused`): the peer failed.
pub(super) const STATE_PEER_FAILED: u32 = 2;
/// A request of the owner failed at the peer's side... as seen by the
/// owner (its receive could not take the message): the owner failed.
pub(super) const STATE_OWNER_FAILED: u32 = 3;

const HEADER_BYTES: usize = 4 * RING_ALIGN;
const _: () = assert!(std::mem::size_of::<Header>() == RING_ALIGN);
const _: () = assert!(std::mem::size_of::<Control>() == 3 * RING_ALIGN);
const _: () = assert!(std::mem::offset_of!(Control, busy) == RING_ALIGN);
const _: () = assert!(std::mem::offset_of!(Control, armed) == 2 * RING_ALIGN);

/// A mapped segment: the control words and the ring's handles.
pub(super) struct Segment {
    map: Arc<Mapping>,
    pub(super) layout: RingLayout,
}

impl Segment {
    /// Creates a segment for a ring of `capacity` cells of `stride` entries;
    /// the descriptor to send to the peer, and the mapped segment.
    pub(super) fn create(capacity: usize, stride: usize) -> std::io::Result<(OwnedFd, Segment)> {
        let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let layout = RingLayout::new(capacity, stride).ok_or_else(bad)?;
        if layout.cells > MAX_CELLS || stride > MAX_STRIDE {
            return Err(bad());
        }
        let len = HEADER_BYTES + layout.bytes();
        let fd = sealed_memfd(len)?;
        let map = Arc::new(Mapping::new(&fd, len)?);
        let seg = Segment { map, layout };
        let h = seg.header();
        h.magic.store(MAGIC, std::sync::atomic::Ordering::Relaxed);
        h.version
            .store(VERSION, std::sync::atomic::Ordering::Relaxed);
        h.cells
            .store(layout.cells as u32, std::sync::atomic::Ordering::Relaxed);
        h.stride
            .store(stride as u32, std::sync::atomic::Ordering::Relaxed);
        let flags = if super::sys::asymmetric_fences() {
            FLAG_HEAVY_ARM
        } else {
            0
        };
        h.flags.store(flags, std::sync::atomic::Ordering::Relaxed);
        Ok((fd, seg))
    }

    /// Maps a segment a peer sent, checking it (sealed size, magic,
    /// version, geometry within limits and within the size).
    pub(super) fn open(fd: &OwnedFd) -> std::io::Result<Segment> {
        let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let len = sealed_size(fd)?;
        if len < HEADER_BYTES {
            return Err(bad());
        }
        let map = Arc::new(Mapping::new(fd, len)?);
        let probe = Segment {
            map,
            layout: RingLayout::new(1, 0).ok_or_else(bad)?,
        };
        let h = probe.header();
        let o = std::sync::atomic::Ordering::Relaxed;
        let (cells, stride) = (h.cells.load(o) as usize, h.stride.load(o) as usize);
        if h.magic.load(o) != MAGIC || h.version.load(o) != VERSION {
            return Err(bad());
        }
        let layout = RingLayout::new(cells, stride).ok_or_else(bad)?;
        if layout.cells != cells || cells > MAX_CELLS || stride > MAX_STRIDE {
            return Err(bad());
        }
        if HEADER_BYTES + layout.bytes() > len {
            return Err(bad());
        }
        Ok(Segment {
            map: probe.map,
            layout,
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least `HEADER_BYTES` long (checked at
        // creation and opening), page aligned, and a header of atomics is
        // valid for any bytes.
        unsafe { self.map.base().cast::<Header>().as_ref() }
    }

    /// Whether the owner says it arms with a heavy fence (`FLAG_HEAVY_ARM`).
    /// Read once per connection: a peer that changes it later misleads
    /// only its own wake-ups.
    pub(super) fn heavy_arm(&self) -> bool {
        self.header()
            .flags
            .load(std::sync::atomic::Ordering::Relaxed)
            & FLAG_HEAVY_ARM
            != 0
    }

    /// The owner's control words.
    pub(super) fn control(&self) -> &Control {
        debug_assert!(self.map.len() >= HEADER_BYTES);
        // SAFETY: as in `header`, at offset `RING_ALIGN`, aligned for it.
        unsafe { &*(self.map.base().as_ptr().add(RING_ALIGN) as *const Control) }
    }

    /// The ring's handles (the caller uses one: the producer if it owns
    /// the segment, the consumer otherwise).
    pub(super) fn ring(&self) -> (CellProducer, CellConsumer) {
        // SAFETY: the ring's bytes follow the header inside the mapping
        // (checked: `HEADER_BYTES + layout.bytes() <= len`), aligned to
        // `RING_ALIGN`; the mapping stays alive with the ring (`keep`);
        // this process touches them only through this ring, made once per
        // segment.
        unsafe {
            let base = std::ptr::NonNull::new_unchecked(self.map.base().as_ptr().add(HEADER_BYTES));
            cell::external(base, self.layout, self.map.clone())
        }
    }
}

/// The body of the `shm_cell` fuzz target: `data` is the whole segment a
/// peer sent (header, control words, ring), sealed in a `memfd`; it is
/// opened as a receiver opens a peer's segment, and the receiver decodes
/// every published message the way the data path does (header, gather
/// list, inline payload, acknowledgement), after the control words a poll
/// reads of a broken peer. Whatever the bytes, nothing panics, and what
/// the decoder accepts is within the ring's bounds. Returns the messages
/// accepted and the highest acknowledgement they carried.
pub(crate) fn fuzz_segment(data: &[u8]) -> (usize, u64) {
    use crate::fabric::soft::cell::{CellOp, INLINE_MAX};
    use crate::fabric::Sge;
    let Ok(fd) = sealed_memfd(data.len()) else {
        return (0, 0);
    };
    if !data.is_empty() {
        let Ok(map) = Mapping::new(&fd, data.len()) else {
            return (0, 0);
        };
        // SAFETY: the mapping is `data.len()` bytes long, fresh, and only
        // this copy touches it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), map.base().as_ptr(), data.len()) };
    }
    let Ok(seg) = Segment::open(&fd) else {
        return (0, 0);
    };
    // The words a poll reads of a broken peer; any value is taken.
    let link = &seg.control().link;
    let _ = (
        link.state.load(std::sync::atomic::Ordering::Relaxed),
        link.refused(),
    );
    let (_, mut inc) = seg.ring();
    let mut acked = 0u64;
    let mut scratch = [Sge {
        addr: 0,
        len: 0,
        lkey: 0,
    }; MAX_STRIDE];
    let mut bytes = [0u8; INLINE_MAX];
    let mut accepted = 0;
    for _ in 0..2 * seg.layout.cells {
        let Some(m) = inc.peek() else { break };
        let Some(d) = m.decode() else { break };
        assert!(d.nsge <= seg.layout.stride, "more entries than the stride");
        if d.op == CellOp::Send && d.nsge == 0 {
            assert!(d.len as usize <= INLINE_MAX, "inline message too long");
            m.copy_inline(&d, &mut bytes);
        } else {
            match m.gather_into(&d, &mut scratch) {
                Some(g) => {
                    let total: u64 = g.iter().map(|s| u64::from(s.len)).sum();
                    assert_eq!(total, u64::from(d.len), "gather list total");
                }
                None => break,
            }
        }
        acked = acked.max(m.ack());
        accepted += 1;
        inc.pop();
        inc.publish();
    }
    (accepted, acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/shm_cell/");
        std::fs::read(format!("{root}{name}")).expect("a committed seed")
    }

    #[test]
    fn the_decoder_takes_well_formed_cells_and_stops_at_the_first_bad_one() {
        for (name, accepted) in [
            ("inline_then_gathered", 2),
            ("rdma_write_read", 2),
            ("wrapped_lap", 0),
            ("inline_too_long", 0),
            ("too_many_entries", 0),
            ("gather_total_mismatch", 0),
            ("bad_tag", 0),
            ("bad_magic", 0),
            ("bad_version", 0),
            ("not_power_of_two", 0),
            ("huge_geometry", 0),
            ("truncated", 0),
            ("empty", 0),
        ] {
            assert_eq!(fuzz_segment(&seed(name)).0, accepted, "{name}");
        }
    }

    #[test]
    fn acknowledgements_of_any_value_are_taken_and_a_bogus_refusal_names_nothing() {
        assert_eq!(fuzz_segment(&seed("acks_and_refused")), (3, u64::MAX));
        let (_, seg) = Segment::create(2, 1).unwrap();
        let link = &seg.control().link;
        let o = std::sync::atomic::Ordering::Relaxed;
        // Index + 1 of 0: no message (a corrupt owner's word).
        link.refused.store(0x12, o);
        assert_eq!(link.refused(), None);
        link.refused.store((7 + 1) << 8 | 2, o);
        assert_eq!(
            link.refused(),
            Some((7, crate::fabric::WcStatus::from_u8(2).unwrap()))
        );
    }

    #[test]
    fn a_segment_opens_with_the_geometry_it_was_made_with() {
        let (fd, made) = Segment::create(5, 3).unwrap();
        assert_eq!((made.layout.cells, made.layout.stride), (8, 3));
        let opened = Segment::open(&fd).unwrap();
        assert_eq!(opened.layout, made.layout);
        // Written by one mapping, read through the other.
        made.control()
            .busy
            .store(7, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            opened
                .control()
                .busy
                .load(std::sync::atomic::Ordering::SeqCst),
            7
        );
    }
}
