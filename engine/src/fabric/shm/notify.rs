//! What the producers of a completion queue's work hold of it
//! ([`CqShared`]): the sleeper's `armed` word and its waker, the entries
//! its queue pairs reserved, and the note that an end's handle dropped. A
//! producer is whatever gives a CQ's ends something to do while its
//! consumer may sleep: a post that completed at once or a receive that a
//! waiting message may match (`conn`), a break, a queue pair's drop, a new
//! end attached (`cq`), and the NIC's event thread turning a peer's signal
//! or death into the wake (`cm`). Each publishes its work first, then
//! wakes the CQ, once per arm. The consumer's side of the same words, and
//! the list of ends it polls, are `cq`'s. This module knows no connection
//! end, so an end holds its CQ's shared part without the two modules, or
//! the end and the CQ, holding each other.

use crate::fabric::cq_budget::CqBudget;
use crate::fabric::Waker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The part of a CQ its connection ends and its NIC hold.
pub(super) struct CqShared {
    /// Entries promised to the queue pairs of this CQ: reserved when an end
    /// is made (`cm`), given back when its handle drops.
    pub(super) budget: CqBudget,
    /// A sleeper asked for a wake-up not sent yet: set by the consumer's
    /// `arm` ([`CqShared::ask_wake`]), cleared by the one producer that
    /// sends it ([`CqShared::wake`]), read by every producer.
    armed: AtomicBool,
    waker: Arc<dyn Waker>,
    /// Set after an end's handle dropped (its `dropped` store first),
    /// cleared by the consumer's poll that looks for ends to forget
    /// ([`CqShared::take_sweep`]).
    sweep: AtomicBool,
}

impl CqShared {
    /// A CQ of `capacity` entries whose sleeper `waker` wakes.
    pub(super) fn new(capacity: usize, waker: Arc<dyn Waker>) -> CqShared {
        CqShared {
            budget: CqBudget::new(capacity),
            armed: AtomicBool::new(false),
            waker,
            sweep: AtomicBool::new(false),
        }
    }

    /// Wakes the sleeper, once per arm (the caller published its work).
    pub(super) fn wake(&self) {
        if self.armed.load(Ordering::SeqCst) && self.armed.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// An end's handle dropped (the caller stored the end's `dropped`
    /// first): the consumer forgets it once it is drained.
    pub(super) fn end_dropped(&self) {
        self.sweep.store(true, Ordering::Release);
    }

    /// The consumer asks for a wake-up, the first step of its `arm` (then
    /// it marks its ends and looks for work).
    pub(super) fn ask_wake(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// The consumer: whether an end dropped since it last looked (then it
    /// sees that end's `dropped`), clearing the note.
    #[inline]
    pub(super) fn take_sweep(&self) -> bool {
        self.sweep.load(Ordering::Relaxed) && self.sweep.swap(false, Ordering::Acquire)
    }

    /// The consumer found a dropped end not drained yet: it looks again at
    /// its next poll.
    pub(super) fn sweep_again(&self) {
        self.sweep.store(true, Ordering::Relaxed);
    }
}
