//! The entries of a completion queue promised to its queue pairs. A queue
//! pair reserves its send and receive depths on its CQ when it is created
//! and gives them back when it is destroyed, so the queue pairs of a CQ can
//! never have more completions outstanding than it holds: a CQ that
//! overran would lose completions (on verbs it breaks every queue pair on
//! it). Every backend's CQ keeps one.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The entries of a CQ of `capacity`, as promised to live queue pairs.
#[derive(Debug)]
pub(crate) struct CqBudget {
    /// Entries the CQ holds. Immutable.
    capacity: usize,
    /// Entries reserved by live queue pairs, `<=` `capacity`. Changed by
    /// `reserve` (queue pair creation) and `release` (its destruction).
    reserved: AtomicUsize,
}

impl CqBudget {
    pub(crate) fn new(capacity: usize) -> CqBudget {
        CqBudget {
            capacity,
            reserved: AtomicUsize::new(0),
        }
    }

    /// Reserves `n` entries for a new queue pair; false (nothing taken) if
    /// the CQ could not hold them beside those already promised.
    pub(crate) fn reserve(&self, n: usize) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(n).filter(|t| *t <= self.capacity)
            })
            .is_ok()
    }

    /// Gives back what `reserve` took, once the queue pair is destroyed.
    pub(crate) fn release(&self, n: usize) {
        let before = self.reserved.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "released {n} of {before} reserved entries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_exceed_the_capacity_and_come_back() {
        let b = CqBudget::new(10);
        assert!(b.reserve(6));
        assert!(!b.reserve(5), "over-committed");
        assert!(b.reserve(4));
        assert!(!b.reserve(1));
        b.release(6);
        assert!(b.reserve(6));
        assert!(!b.reserve(usize::MAX), "overflow taken as room");
    }
}
