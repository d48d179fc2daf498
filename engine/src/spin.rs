//! `SpinLock`: a lock for state one thread at a time works on, where the
//! holder never blocks and contention is the exception (a CQ's consumer
//! side, a direction's matcher, the right to reap a CQ in
//! run-to-completion mode; an end's posting side has a biased variant,
//! `fabric::soft::post_lock`). Taking it is one
//! atomic swap, releasing it one plain store (a `std::sync::Mutex` pays a
//! second locked instruction to release, to find sleepers to wake); a
//! thread that finds it taken spins briefly, then yields.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

/// `repr(C)`: the lock word first, so that it shares its cache line with
/// the start of the value, which whoever takes the lock reads next (left to
/// the compiler it goes after the value, a line of its own for a value of a
/// line or more).
#[repr(C)]
pub(crate) struct SpinLock<T> {
    /// Whether a guard exists. Set by the Acquire swap that creates the
    /// guard, cleared by the Release store that drops it.
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, and at most one guard
// exists at a time (`locked`), so it moves between threads like a `Mutex`'s.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SpinLock<T> {}

/// Exclusive access to the value of a [`SpinLock`].
pub(crate) struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    pub(crate) fn new(value: T) -> SpinLock<T> {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The guard, if nobody holds one. A taken lock is only read, not
    /// written (test and test-and-set).
    pub(crate) fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        if self.locked.load(Ordering::Relaxed) || self.locked.swap(true, Ordering::Acquire) {
            return None;
        }
        Some(SpinGuard { lock: self })
    }

    /// Whether a guard exists now (a hint: it may be dropped or taken
    /// right after).
    pub(crate) fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// The guard, waiting for the holder (spinning a little, then yielding
    /// the core: on two cores the holder may need it).
    pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
        let mut spins = 0u32;
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the only one (`locked`), and the Acquire
        // swap that made it saw every write of the previous holder.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn one_guard_at_a_time_and_increments_are_not_lost() {
        let l = SpinLock::new(0u64);
        let g = l.try_lock().unwrap();
        assert!(l.try_lock().is_none(), "a second guard while one exists");
        drop(g);
        let l = Arc::new(l);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 40_000);
    }
}
