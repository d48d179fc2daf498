//! The synchronisation primitives of the engine's hand-written concurrent
//! structures (the completion [`ring`](crate::ring), the op slab and the
//! close gate of the SPI, the idle loop's sleep flag), behind one facade so the same source runs both natively and under the [loom] model
//! checker.
//!
//! loom explores every interleaving (and every permitted reordering) of a
//! small concurrent program, but only of the operations it can see: atomics,
//! `UnsafeCell` accesses, `Arc` and threads must be loom's own types. Code
//! that imports them from here instead of `std` is checked by loom when built
//! with `RUSTFLAGS="--cfg loom"` and compiles to plain `std` otherwise, at no
//! cost.
//!
//! The one API difference to paper over is `UnsafeCell`: loom's cell hands
//! out its pointer only inside a closure (so it can record the access), so
//! the native build wraps `std::cell::UnsafeCell` in a type with the same
//! `with` / `with_mut` methods.
//!
//! Code that needs none of this (most of the engine, which uses locks or
//! simple flags) imports `std` directly.
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub use loom::{
    cell::UnsafeCell,
    sync::{
        atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread,
};

#[cfg(not(loom))]
pub use std::{
    sync::{
        atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread,
};

/// Pads and aligns a value to the length of a cache line, so that two
/// values written by different threads never share a line. Under loom it is
/// a plain wrapper, which is all the model needs.
pub use crossbeam_utils::CachePadded;

/// `std::cell::UnsafeCell` with loom's closure-based access API, so code
/// written against [`loom::cell::UnsafeCell`] builds natively unchanged.
/// Both methods compile to a plain pointer access.
///
/// [`loom::cell::UnsafeCell`]: https://docs.rs/loom/latest/loom/cell/struct.UnsafeCell.html
#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub struct UnsafeCell<T: ?Sized>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    /// A cell holding `data`.
    pub const fn new(data: T) -> UnsafeCell<T> {
        UnsafeCell(std::cell::UnsafeCell::new(data))
    }

    /// Consumes the cell and returns its contents.
    pub fn into_inner(self) -> T {
        self.0.into_inner()
    }
}

#[cfg(not(loom))]
impl<T: ?Sized> UnsafeCell<T> {
    /// Runs `f` with a read-only pointer to the contents. Dereferencing it
    /// is the caller's responsibility, as with `std::cell::UnsafeCell::get`:
    /// no `&mut` to the contents may be live meanwhile.
    #[inline(always)]
    pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with a mutable pointer to the contents. Dereferencing it is
    /// the caller's responsibility: no other access to the contents may be
    /// live meanwhile.
    #[inline(always)]
    pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Explores `f` with loom's scheduler, preemptions bounded at
/// `preemption_bound`, and prints how many executions that took: the
/// engine's loom models (`RUSTFLAGS="--cfg loom" cargo test --lib loom_`).
#[cfg(all(test, loom))]
pub(crate) fn model(name: &str, preemption_bound: usize, f: impl Fn() + Sync + Send + 'static) {
    // A std atomic on purpose: loom must not model the counter itself.
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemption_bound);
    b.check(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    eprintln!(
        "loom model {name}: {} executions",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn unsafe_cell_with_and_with_mut_reach_the_contents() {
        let cell = UnsafeCell::new(41u32);
        // SAFETY: the cell is local to this thread and no reference to its
        // contents exists while the pointer is used.
        cell.with_mut(|p| unsafe { *p += 1 });
        // SAFETY: as above.
        assert_eq!(cell.with(|p| unsafe { *p }), 42);
        assert_eq!(cell.into_inner(), 42);
    }

    #[test]
    fn cache_padded_spans_a_cache_line() {
        assert!(std::mem::align_of::<CachePadded<AtomicUsize>>() >= 64);
    }
}
