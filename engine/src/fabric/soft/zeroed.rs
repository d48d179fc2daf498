//! Arrays of zero values whose memory costs only what is touched. A
//! connection's rings and queues are sized for its full depth, but an idle
//! connection uses their first entries only: an array of a page or more is
//! its own anonymous mapping, whose pages the OS maps (zeroed) at first
//! touch, so a connection costs resident memory as traffic reaches deeper
//! into its queues, and setting one up writes nothing. The pages come from
//! the process's pool (`mem::pool::Chunk`), which releases the arrays of
//! closed connections in batches: an `munmap` each made tearing down
//! 10,000 connections mostly TLB shootdowns. (The allocator's
//! `alloc_zeroed` would clear reused heap memory, and memory aligned beyond
//! 16 bytes, by writing it: every page resident at once.)
//!
//! Cache colours: an idle connection's hot entries are its arrays' first
//! ones, and if every array began at a page boundary, the first lines of
//! ten thousand connections' rings would all fall in the 1/64 of the cache
//! sets that page-aligned lines map to (the set index takes address bits
//! 6 and up, the page offset bits 6-11 among them; physical and virtual
//! agree on those), a 32 MiB last-level cache holding only 512 KiB of
//! them. So each mapped array starts a rotating multiple of 64 bytes into
//! its mapping ([`COLOURS`] of them, all in the first quarter of the page,
//! so that the first 3 KiB of an array still keep to one page: a stream
//! connection's eight posted receives, or a cell, touch one page).

use std::ops::Deref;
use std::ptr::NonNull;

/// Types whose all-zero bytes are a valid value equal to their `Default`.
///
/// # Safety
/// Implement only for types for which all-zero bytes are a valid value
/// equal to `T::default()` and that need no drop (integers, std atomics,
/// and structs of such fields).
pub(super) unsafe trait Zeroable: Default {}

/// Arrays from this size on get their own mapping.
#[cfg(not(loom))]
const MAP_FROM: usize = 4096;

/// Start offsets of mapped arrays, in cache lines (module docs).
#[cfg(not(loom))]
const COLOURS: usize = 16;

/// The colour the next mapped array gets (relaxed: any spread will do).
#[cfg(not(loom))]
static NEXT_COLOUR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `n` default (zero) values, their pages untouched (see module docs).
pub(super) struct Zeroed<T> {
    /// The first value; `len` values from here live as long as `_owner`.
    ptr: NonNull<T>,
    len: usize,
    /// Held for its drop only.
    _owner: Owner<T>,
}

/// What holds a [`Zeroed`]'s memory (the values do not move with it).
enum Owner<T> {
    /// Small arrays, and every array under loom (whose atomics are not
    /// plain memory): values made one by one.
    Boxed(#[allow(dead_code)] Box<[T]>),
    /// A chunk of the process's page pool (`mem::pool::Chunk`): zero
    /// pages, mapped at first touch, given back in batches.
    #[cfg(not(loom))]
    Mapped(#[allow(dead_code)] crate::mem::Chunk),
}

// SAFETY: a `Zeroed<T>` owns its values like a `Box<[T]>` (the pointer
// names memory `_owner` holds), so it moves and shares between threads as
// one does.
unsafe impl<T: Send> Send for Zeroed<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Zeroed<T> {}

/// `n` default (zero) values.
pub(super) fn slice<T: Zeroable>(n: usize) -> Zeroed<T> {
    #[cfg(not(loom))]
    {
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .expect("array size overflows");
        debug_assert!(std::mem::align_of::<T>() <= 64);
        let colour = NEXT_COLOUR.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % COLOURS;
        let offset = colour * 64;
        // Out of mappings (`vm.max_map_count`): the heap, resident at once.
        if let Some(map) = (bytes >= MAP_FROM)
            .then(|| crate::mem::Chunk::new(bytes + offset, crate::config::MlockPolicy::Off).ok())
            .flatten()
        {
            // The chunk is page-aligned, so `offset` (a multiple of 64) is
            // aligned for `T`; it holds `n` values' bytes after `offset` and
            // starts as zero bytes, a valid `T` each (`Zeroable`).
            let ptr = NonNull::new(map.as_ptr().wrapping_add(offset).cast::<T>())
                .expect("a chunk is not null");
            return Zeroed {
                ptr,
                len: n,
                _owner: Owner::Mapped(map),
            };
        }
    }
    let mut b: Box<[T]> = (0..n).map(|_| T::default()).collect();
    Zeroed {
        ptr: NonNull::new(b.as_mut_ptr()).expect("a Box is not null"),
        len: n,
        _owner: Owner::Boxed(b),
    }
}

impl<T> Deref for Zeroed<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` names `len` valid values that live as long as
        // `_owner`, hence `self`; they are only written through `&T`
        // (atomics, cells), so they always hold valid values.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Word(AtomicU64);

    // SAFETY: one atomic, zero as zero bytes, as `default` makes it.
    unsafe impl Zeroable for Word {}

    /// Pages of `[addr, addr + len)` resident (`mincore`).
    fn resident(addr: *const u8, len: usize) -> usize {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `addr` is page-aligned and `[addr, addr + len)` is one
        // live mapping; `vec` has a byte per page of it.
        let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn a_large_array_is_resident_only_where_touched() {
        let n = 64 * 4096 / 8;
        let a = slice::<Word>(n);
        let start = a.as_ptr() as usize;
        let (base, len) = (start & !4095, start % 4096 + n * 8);
        let base = base as *const u8;
        assert_eq!(resident(base, len), 0, "nothing written at creation");
        assert_eq!(a[0].0.load(Ordering::Relaxed), 0);
        a[0].0.store(7, Ordering::Relaxed);
        a[n - 1].0.store(9, Ordering::Relaxed);
        assert_eq!(resident(base, len), 2, "the two pages written");
        assert!(a
            .iter()
            .skip(1)
            .take(n - 2)
            .all(|w| w.0.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn mapped_arrays_start_at_different_lines_of_their_first_quarter_page() {
        let arrays: Vec<_> = (0..COLOURS).map(|_| slice::<Word>(4096 / 8)).collect();
        let offsets: std::collections::BTreeSet<usize> =
            arrays.iter().map(|a| a.as_ptr() as usize % 4096).collect();
        assert!(
            offsets.iter().all(|o| o % 64 == 0 && *o < 1024),
            "{offsets:?}"
        );
        // Other tests' arrays take colours too, but not 15 between each two
        // of these.
        assert!(offsets.len() > 1, "every array at offset {offsets:?}");
    }

    #[test]
    fn a_small_array_is_plain_values() {
        let a = slice::<Word>(4);
        assert_eq!(a.len(), 4);
        a[3].0.store(1, Ordering::Relaxed);
        assert_eq!(
            a.iter().map(|w| w.0.load(Ordering::Relaxed)).sum::<u64>(),
            1
        );
    }
}
