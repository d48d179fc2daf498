//! Test-only (cargo feature `perf-marks`, never in a normal build): a call
//! at the store that makes an op visible to its peer, so that a profiler can
//! cut the critical path of an op there (`tools/crit-path` runs callgrind
//! with `--dump-before` on [`published`]). The soft fabric calls it right
//! after the release store of a message's cell sequence word and right after
//! an RDMA write's copy into the peer's memory.

use std::sync::atomic::{AtomicU64, Ordering};

/// What [`published`] increments, so that the call is not optimised away.
static MARKS: AtomicU64 = AtomicU64::new(0);

/// The mark: the op just became visible to its peer.
#[inline(never)]
pub(crate) fn published() {
    MARKS.store(MARKS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}
