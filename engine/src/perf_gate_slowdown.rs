//! Test-only (cargo feature `perf-gate-slowdown`, never in a normal build):
//! extra work on the data path, so that the instruction-count gate
//! (`tools/icount-gate --self-test`) can show it fails on a slower engine.
//! Each registration lookup of a data call (one per buffer of every send,
//! receive and RDMA op) runs `burn`; the work is 0 until a test sets it.
//! It can also add locked instructions (atomic read-modify-writes), which
//! cost cycles far beyond their share of the instruction count.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Iterations of `burn`'s loop; written by the test, read by the data path.
static EXTRA_WORK: AtomicU32 = AtomicU32::new(0);
/// Locked instructions `burn` adds; written by the test, read by the data path.
static EXTRA_LOCKS: AtomicU32 = AtomicU32::new(0);
/// What the extra locked instructions increment.
static SINK: AtomicU64 = AtomicU64::new(0);

/// Makes every later `burn` loop `iterations` times.
pub fn set_extra_work(iterations: u32) {
    EXTRA_WORK.store(iterations, Ordering::Relaxed);
}

/// Makes every later `burn` run `n` locked additions.
pub fn set_extra_locks(n: u32) {
    EXTRA_LOCKS.store(n, Ordering::Relaxed);
}

/// The extra work: a loop the optimiser cannot remove, then the locked
/// additions.
#[inline(never)]
pub(crate) fn burn() {
    let mut x = 0u32;
    for i in 0..EXTRA_WORK.load(Ordering::Relaxed) {
        x = std::hint::black_box(x.wrapping_add(i));
    }
    for _ in 0..EXTRA_LOCKS.load(Ordering::Relaxed) {
        SINK.fetch_add(1, Ordering::Relaxed);
    }
}
