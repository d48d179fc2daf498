//! A fixed array of slots whose memory becomes resident as it is used:
//! [`Slots`].
//!
//! The descriptor table must allow tens of thousands of sockets (a server
//! holds thousands of mostly idle connections) without a provider that
//! holds two of them paying for all of them, and a lookup must stay an
//! index into one array (it is on every data call). So the table is one
//! anonymous mapping (the kernel makes a page resident, zeroed, only when it
//! is first touched), and a slot's initial state is all zero bits. A
//! provider with a handful of sockets makes its first page resident; the 65,536
//! slots of the default capacity cost 8 MiB of address space. The caller
//! vouches for the zero bits ([`Slots::new`] is unsafe).
//!
//! TLB reach: a lookup of a socket idle since ten thousand others were used
//! finds its slot's page cold, and with 4 KiB pages ten thousand sockets'
//! slots need more translation entries than a core keeps. So the memory of
//! a slot array ([`SlotMemory`], also the op slab's) is advised as
//! transparent huge pages (`MADV_HUGEPAGE`) and aligned to them: the slots
//! of 16,384 sockets share one 2 MiB page, one entry. The price: memory
//! becomes resident 2 MiB at a time where the kernel has huge pages (a
//! provider's first socket makes the table's first 2 MiB resident), and
//! never more than the huge pages the slots in use reach.
//!
//! Under loom the slots are made by a constructor instead (loom's atomics
//! and cells are not plain memory); its models use a few slots.

#[cfg(not(loom))]
use std::alloc::Layout;
use std::ptr::NonNull;

/// Bytes of a transparent huge page (x86-64 and arm64 with 4 KiB pages).
#[cfg(not(loom))]
const HUGE_PAGE: usize = 2 << 20;

/// Zero bytes for an array of slots, at a fixed address for as long as this
/// lives: an anonymous mapping aligned to [`HUGE_PAGE`] and advised as huge
/// pages (module docs), resident only where touched.
#[cfg(not(loom))]
pub(crate) struct SlotMemory {
    /// The first byte (`layout.size()` of them, aligned for `layout`);
    /// dangling for a zero size.
    first: NonNull<u8>,
    /// Keeps `first`'s bytes mapped; `None` for a zero size.
    _map: Option<memmap2::MmapMut>,
}

#[cfg(not(loom))]
impl SlotMemory {
    /// Zero bytes for `layout` (whose alignment must not exceed a page);
    /// fails if the address space cannot be had.
    pub(crate) fn new(layout: Layout) -> std::io::Result<SlotMemory> {
        debug_assert!(layout.align() <= 4096);
        if layout.size() == 0 {
            return Ok(SlotMemory {
                first: NonNull::new(layout.align() as *mut u8).expect("an alignment is not 0"),
                _map: None,
            });
        }
        // Room to start at a huge-page boundary and to advise whole huge
        // pages up to the end of the array.
        let span = layout
            .size()
            .checked_next_multiple_of(HUGE_PAGE)
            .and_then(|s| s.checked_add(HUGE_PAGE))
            .ok_or(std::io::ErrorKind::OutOfMemory)?;
        let map = memmap2::MmapMut::map_anon(span)?;
        let base = map.as_ptr() as usize;
        let skip = base.next_multiple_of(HUGE_PAGE) - base;
        // Advice only: where the kernel has no huge pages (or THP is off)
        // the array keeps 4 KiB pages, as before.
        let _ = map.advise_range(memmap2::Advice::HugePage, skip, span - skip);
        let first = NonNull::new(map.as_ptr().wrapping_add(skip).cast_mut())
            .expect("a mapping is not null");
        Ok(SlotMemory {
            first,
            _map: Some(map),
        })
    }

    /// The first byte.
    pub(crate) fn first(&self) -> NonNull<u8> {
        self.first
    }
}

/// `capacity` slots of `T`, allocated once, at fixed addresses until the
/// array is dropped.
pub struct Slots<T> {
    /// The first of `capacity` initialised slots (dangling when the
    /// capacity is 0). Owned: freed by `drop` only (under loom; natively by
    /// `memory`'s).
    first: NonNull<T>,
    capacity: usize,
    /// Holds the slots' memory.
    #[cfg(not(loom))]
    _memory: SlotMemory,
}

// SAFETY: the array owns its `T`s and hands out only `&T` (shared between
// threads, so `T: Sync`).
unsafe impl<T: Send + Sync> Sync for Slots<T> {}
// SAFETY: as above: moving the array moves the ownership of its `T`s.
unsafe impl<T: Send> Send for Slots<T> {}

impl<T> Slots<T> {
    /// Slot `index`, or `None` beyond the capacity.
    #[inline]
    pub fn get(&self, index: usize) -> Option<&T> {
        // SAFETY: `index < capacity`: an initialised slot of the array,
        // which lives until `drop` (excluded by `&self`).
        (index < self.capacity).then(|| unsafe { &*self.first.as_ptr().add(index) })
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.capacity
    }
}

#[cfg(not(loom))]
impl<T> Slots<T> {
    /// `capacity` slots, all zero bits; the memory is resident only where
    /// touched. `make` is the value the zero bits stand for, which loom's
    /// builds call instead.
    ///
    /// # Safety
    /// All zero bits must be a valid `T`, the value `make` returns. (That
    /// `T` needs no drop, since the array frees its memory without running
    /// one, is checked when this compiles.)
    pub unsafe fn new(capacity: usize, _make: impl Fn() -> T) -> Slots<T> {
        const { assert!(!std::mem::needs_drop::<T>()) };
        let layout = Layout::array::<T>(capacity).expect("slot array too large");
        let memory =
            SlotMemory::new(layout).unwrap_or_else(|_| std::alloc::handle_alloc_error(layout));
        Slots {
            first: memory.first().cast(),
            capacity,
            _memory: memory,
        }
    }
}

#[cfg(loom)]
impl<T> Slots<T> {
    /// `capacity` slots made by `make`.
    ///
    /// # Safety
    /// None here; the native build's contract applies to callers.
    pub unsafe fn new(capacity: usize, make: impl Fn() -> T) -> Slots<T> {
        let slots: Box<[T]> = (0..capacity).map(|_| make()).collect();
        let first = NonNull::new(Box::into_raw(slots).cast::<T>()).expect("a boxed slice");
        Slots { first, capacity }
    }
}

#[cfg(loom)]
impl<T> Drop for Slots<T> {
    fn drop(&mut self) {
        // SAFETY: made from a `Box<[T]>` of `capacity` slots in `new`, freed
        // only here; `&mut self` leaves no reference into it.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.first.as_ptr(),
                self.capacity,
            ))
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Probe(AtomicU64);

    fn probes(n: usize) -> Slots<Probe> {
        // SAFETY: an atomic integer: zero bits are `AtomicU64::new(0)`.
        unsafe { Slots::new(n, || Probe(AtomicU64::new(0))) }
    }

    #[test]
    fn every_slot_starts_zero_and_keeps_its_address() {
        let slots = probes(100_000);
        assert_eq!(slots.len(), 100_000);
        for i in [0, 1, 4095, 99_999] {
            let s = slots.get(i).unwrap();
            assert_eq!(s.0.load(Ordering::Relaxed), 0);
            s.0.store(i as u64 + 1, Ordering::Relaxed);
        }
        assert_eq!(slots.get(4095).unwrap().0.load(Ordering::Relaxed), 4096);
        assert!(slots.get(100_000).is_none());
        assert!(slots.get(usize::MAX).is_none());
        assert!(probes(0).get(0).is_none());
    }

    /// The `VmFlags` of the mapping holding `addr` (`/proc/self/smaps`).
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            // A mapping's block starts with its range, `lo-hi` in hex.
            let range = l.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((lo, hi)) = range {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if let Some(flags) = l.strip_prefix("VmFlags:").filter(|_| inside) {
                return flags.trim().to_string();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn slot_memory_starts_on_a_huge_page_advised_as_huge() {
        let layout = Layout::array::<u64>(5 << 17).unwrap();
        let m = SlotMemory::new(layout).unwrap();
        let first = m.first().as_ptr();
        assert_eq!(first as usize % HUGE_PAGE, 0, "aligned to a huge page");
        // SAFETY: the memory holds `layout.size()` zero bytes, all
        // writable, and nothing else refers to it.
        let words = unsafe { std::slice::from_raw_parts_mut(first.cast::<u64>(), 5 << 17) };
        assert!(words.iter().step_by(512).all(|w| *w == 0));
        words[(5 << 17) - 1] = 7;
        for at in [0, layout.size() - 1] {
            let flags = vm_flags(first as usize + at);
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "MADV_HUGEPAGE at byte {at}: VmFlags {flags}"
            );
        }
        let empty = SlotMemory::new(Layout::new::<()>()).unwrap();
        assert_eq!(empty.first(), NonNull::dangling());
    }
}
