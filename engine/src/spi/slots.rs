//! A fixed array of slots whose memory becomes resident as it is used:
//! [`Slots`].
//!
//! The descriptor table must allow tens of thousands of sockets (a server
//! holds thousands of mostly idle connections) without a provider that
//! holds two of them paying for all of them, and a lookup must stay an
//! index into one array (it is on every data call). So the table is one
//! allocation of zeroed memory (`alloc_zeroed`: the allocator maps fresh
//! pages for a large one, and the kernel makes a page resident only when it
//! is first touched), and a slot's initial state is all zero bits
//! ([`Zeroed`]). A provider with a handful of sockets touches the first
//! pages; the 65,536 slots of the default capacity cost 8 MiB of address
//! space. The caller vouches for the zero bits ([`Slots::new`] is unsafe).
//!
//! Under loom the slots are made by a constructor instead (loom's atomics
//! and cells are not plain memory); its models use a few slots.

use std::ptr::NonNull;

/// `capacity` slots of `T`, allocated once, at fixed addresses until the
/// array is dropped.
pub struct Slots<T> {
    /// The first of `capacity` initialised slots (dangling when the
    /// capacity is 0). Owned: freed by `drop` only.
    first: NonNull<T>,
    capacity: usize,
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
        let layout = std::alloc::Layout::array::<T>(capacity).expect("slot array too large");
        let first = if layout.size() == 0 {
            NonNull::dangling()
        } else {
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
            NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        };
        Slots { first, capacity }
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

impl<T> Drop for Slots<T> {
    fn drop(&mut self) {
        #[cfg(loom)]
        // SAFETY: made from a `Box<[T]>` of `capacity` slots in `new`, freed
        // only here; `&mut self` leaves no reference into it.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.first.as_ptr(),
                self.capacity,
            ))
        });
        #[cfg(not(loom))]
        {
            let layout = std::alloc::Layout::array::<T>(self.capacity).expect("checked in new");
            if layout.size() != 0 {
                // SAFETY: allocated in `new` with this layout, freed only
                // here; `T` needs no drop (checked in `new`).
                unsafe { std::alloc::dealloc(self.first.as_ptr().cast(), layout) };
            }
        }
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
}
