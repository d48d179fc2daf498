//! Arrays allocated zeroed. A connection's rings and queues are allocated
//! at once with `alloc_zeroed`, so the OS maps their pages only when traffic
//! first touches them: a connection costs memory as it is used, and setting
//! one up writes nothing.

#[cfg(not(loom))]
use std::alloc::{alloc_zeroed, handle_alloc_error, Layout};

/// Types whose all-zero bytes are a valid value equal to their `Default`.
///
/// # Safety
/// Implement only for types for which all-zero bytes are a valid value
/// equal to `T::default()` (integers, std atomics, and structs of such
/// fields).
pub(super) unsafe trait Zeroable: Default {}

/// A boxed slice of `n` default (zero) values, its pages untouched. Under
/// loom, whose atomics are not plain memory, the values are made one by one.
pub(super) fn slice<T: Zeroable>(n: usize) -> Box<[T]> {
    if cfg!(loom) || n == 0 || std::mem::size_of::<T>() == 0 {
        return (0..n).map(|_| T::default()).collect();
    }
    zeroed(n)
}

#[cfg(loom)]
fn zeroed<T: Zeroable>(_: usize) -> Box<[T]> {
    unreachable!("loom builds make their values one by one")
}

#[cfg(not(loom))]
fn zeroed<T: Zeroable>(n: usize) -> Box<[T]> {
    let layout = Layout::array::<T>(n).expect("array size overflows");
    // SAFETY: `layout` has a non-zero size (n > 0, T not zero-sized).
    let p = unsafe { alloc_zeroed(layout) } as *mut T;
    if p.is_null() {
        handle_alloc_error(layout);
    }
    // SAFETY: `p` is a fresh allocation of `layout` (the global allocator,
    // size and alignment of `[T; n]`, as `Box<[T]>` frees it), and its `n`
    // elements of zero bytes are valid values (`T: Zeroable`).
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n)) }
}
