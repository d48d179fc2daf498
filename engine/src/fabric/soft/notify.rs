//! What the producers of a completion queue's work hold of it: the CQ's
//! shared part ([`CqShared`]: the sleeper's `armed` word, the ready list of
//! announced idle ends, and the entries its queue pairs reserved) and, per
//! end, its [`Presence`] (whether the end is idle, and its slot). A
//! producer publishes its work, issues the light fence, then reads both
//! words, and only when one is set announces the end or wakes the sleeper
//! (`link`, "Wake-ups"). The consumer's side of the same words, and why an
//! end goes idle, are `cq`'s.

use super::fence;
use crate::fabric::cq_budget::CqBudget;
use crate::fabric::Waker;
use crate::spin::SpinLock;
use crate::sync::AtomicBool;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// How an idle end gets its CQ to poll it again (kept in `link::End`).
pub(super) struct Presence {
    /// The end is idle (see `cq`). Set by the consumer as the end leaves
    /// its hot list; cleared by the one swap that announces it (a
    /// producer) or keeps it hot (the consumer, finding work at the
    /// re-check). Read by every producer after its fence.
    idle: AtomicBool,
    /// The end's slot in its CQ's consumer. Written by the consumer when it
    /// takes the end in, before `idle` is first set; read by the producer
    /// whose swap cleared `idle`.
    slot: AtomicU32,
}

impl Presence {
    pub(super) fn new() -> Presence {
        Presence {
            idle: AtomicBool::new(false),
            slot: AtomicU32::new(u32::MAX),
        }
    }

    /// Whether the end is idle (the caller issued the light fence after
    /// publishing work).
    #[inline]
    pub(super) fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// The consumer took the end in at `slot` (before it first goes idle).
    #[inline]
    pub(super) fn set_slot(&self, slot: u32) {
        self.slot.store(slot, Ordering::Relaxed);
    }

    /// The consumer raises `idle` (it fences, then re-checks the end).
    #[inline]
    pub(super) fn raise_idle(&self) {
        self.idle.store(true, Ordering::Relaxed);
    }

    /// The consumer, having found work on an idle end, takes it back:
    /// whether it won (else a producer's announcement has it, and the end
    /// is on the ready list).
    #[inline]
    pub(super) fn take_back(&self) -> bool {
        self.idle.swap(false, Ordering::AcqRel)
    }
}

/// Ends announced, and ends attached, since the consumer last looked.
struct Ready {
    /// Set by an announcement (under `slots`) and by an attachment (after
    /// it pushed on `SoftCq`'s list of attached ends); cleared by the
    /// consumer (under `slots`) before it takes both lists. The consumer
    /// reads it without a lock on every poll, so a lock is taken only when
    /// there is something.
    pending: AtomicBool,
    slots: SpinLock<Vec<u32>>,
}

/// The part of a CQ the links of its queue pairs hold.
pub(super) struct CqShared {
    /// Entries promised to the queue pairs of this CQ.
    pub(super) budget: CqBudget,
    /// A sleeper asked for a wake that was not sent yet. Set by `arm`;
    /// cleared by the one producer that sends the wake; read by every
    /// producer after it published work.
    armed: CachePadded<AtomicBool>,
    /// Idle ends with work (`cq`). Written by producers only when an end
    /// was idle, read by the consumer at each poll.
    ready: CachePadded<Ready>,
    waker: Arc<dyn Waker>,
}

impl CqShared {
    /// A CQ of `capacity` entries whose sleeper `waker` wakes.
    pub(super) fn new(capacity: usize, waker: Arc<dyn Waker>) -> CqShared {
        CqShared {
            budget: CqBudget::new(capacity),
            armed: CachePadded::new(AtomicBool::new(false)),
            ready: CachePadded::new(Ready {
                pending: AtomicBool::new(false),
                slots: SpinLock::new(Vec::new()),
            }),
            waker,
        }
    }

    /// Whether the consumer sleeps (the caller issued the light fence after
    /// publishing).
    pub(super) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Wakes the sleeper, once per arm (the caller saw `is_armed`).
    pub(super) fn wake(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Puts an idle end (the caller saw [`Presence::is_idle`] after
    /// publishing work for it and fencing) on the ready list, unless
    /// another producer or the consumer took it back first.
    #[cold]
    pub(super) fn announce(&self, p: &Presence) {
        if !p.idle.swap(false, Ordering::AcqRel) {
            return;
        }
        let slot = p.slot.load(Ordering::Relaxed);
        let mut slots = self.ready.slots.lock();
        slots.push(slot);
        self.ready.pending.store(true, Ordering::Relaxed);
        drop(slots);
        // Orders `pending` before the caller's read of `armed` (an `arm`
        // raises `armed`, then reads `pending`).
        fence::light();
    }

    /// The sleeper's word, for the consumer's `arm` (`SoftCq::arm`).
    pub(super) fn armed(&self) -> &AtomicBool {
        &self.armed
    }

    /// Whether an end was announced or attached since the consumer last
    /// took them (read by the consumer on every poll, without a lock).
    #[inline]
    pub(super) fn pending(&self, order: Ordering) -> bool {
        self.ready.pending.load(order)
    }

    /// An end was attached (pushed on `SoftCq`'s list): the next poll takes
    /// it in.
    pub(super) fn note_attached(&self) {
        self.ready.pending.store(true, Ordering::Release);
    }

    /// The consumer takes the announced slots into `taken` (empty; the
    /// buffers swap, so nothing allocates once both have grown) and clears
    /// `pending`, before it takes the attached ends too.
    pub(super) fn take_announced(&self, taken: &mut Vec<u32>) {
        let mut slots = self.ready.slots.lock();
        self.ready.pending.store(false, Ordering::Relaxed);
        std::mem::swap(&mut *slots, taken);
    }
}
