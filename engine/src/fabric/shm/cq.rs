//! Completion queues of the shared-memory fabric. As in the soft fabric a
//! CQ stores nothing: polling it runs each attached connection end (which
//! executes what arrived from the peer) and reads the completions off its
//! queues. `arm` marks every attached end as sleeping in its own segment,
//! so the peer signals that end's eventfd for new work; the NIC's event
//! thread turns the signal into this CQ's wake. One fence serves all the
//! ends (a `membarrier` where the processes take part in asymmetric fences,
//! which spares the peers' wakes theirs: [`arm_fence`]).

use super::conn::{Conn, PollSide};
use super::sys;
use crate::fabric::cq_budget::CqBudget;
use crate::fabric::{CompletionQueue, CqId, Waker, WorkCompletion};
use crate::spin::SpinLock;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

/// The fence of an arm between its stores of `armed` ([`Conn::mark_armed`],
/// on each end of the CQ) and its look for work ([`Conn::has_work`]): a
/// heavy one where this process takes part in asymmetric fences (its
/// segments say so, `seg::FLAG_HEAVY_ARM`, and its peers' wakes go without
/// a fence), else a full fence. `false` if the heavy fence failed (not seen
/// once it worked): the caller must not sleep then, a wake-up may be lost.
fn arm_fence() -> bool {
    if sys::asymmetric_fences() {
        sys::heavy_fence()
    } else {
        fence(Ordering::SeqCst);
        true
    }
}

/// An attached end: the connection, and what only its poller touches.
struct End {
    conn: Arc<Conn>,
    poll: PollSide,
}

pub(super) struct CqInner {
    pub(super) id: CqId,
    /// Entries promised to the queue pairs of this CQ.
    pub(super) budget: CqBudget,
    /// A sleeper asked for a wake-up not sent yet: set by `arm`, cleared
    /// by the one waker that sends it.
    armed: AtomicBool,
    waker: Arc<dyn Waker>,
    /// Attached connection ends with their poll sides; the one consumer
    /// polls them (its lock, a spin lock: held for a poll, which never
    /// blocks but for a break's bounded seal). The only lock a poll takes.
    ends: SpinLock<Vec<End>>,
    /// Set after an end's handle dropped (its `dropped` store first): the
    /// poll looks for ends to forget only then.
    sweep: AtomicBool,
}

impl CqInner {
    /// Adds a new end. A sleeper that armed before it came did not mark it
    /// (`Conn::arm`), so the peer's work on it would wake nobody: the
    /// sleeper is woken to poll and arm again, the new end included.
    pub(super) fn attach(&self, conn: Arc<Conn>, poll: PollSide) {
        self.ends.lock().push(End { conn, poll });
        self.wake();
    }

    /// An attached end's handle dropped: forget it once it is drained.
    pub(super) fn end_dropped(&self) {
        self.sweep.store(true, Ordering::Release);
    }

    /// Wakes the sleeper, once per arm.
    pub(super) fn wake(&self) {
        if self.armed.load(Ordering::SeqCst) && self.armed.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

pub(super) struct ShmCq(pub(super) Arc<CqInner>);

impl ShmCq {
    pub(super) fn new(id: CqId, depth: usize, waker: Arc<dyn Waker>) -> ShmCq {
        ShmCq(Arc::new(CqInner {
            id,
            budget: CqBudget::new(depth),
            armed: AtomicBool::new(false),
            waker,
            ends: SpinLock::new(Vec::new()),
            sweep: AtomicBool::new(false),
        }))
    }
}

impl Drop for ShmCq {
    fn drop(&mut self) {
        // Each attached end holds this CQ's shared part: without a poll to
        // forget them, a cycle.
        self.0.ends.lock().clear();
    }
}

impl CompletionQueue for ShmCq {
    fn id(&self) -> CqId {
        self.0.id
    }

    fn poll(&self, out: &mut [WorkCompletion]) -> usize {
        let mut ends = self.0.ends.lock();
        let mut n = 0;
        for e in ends.iter_mut() {
            if n == out.len() {
                break;
            }
            n += e.conn.poll(&mut e.poll, &mut out[n..]);
        }
        let sweep = &self.0.sweep;
        if sweep.load(Ordering::Relaxed) && sweep.swap(false, Ordering::Acquire) {
            ends.retain(|e| !(e.conn.dropped.load(Ordering::Acquire) && e.conn.drained()));
            if ends.iter().any(|e| e.conn.dropped.load(Ordering::Relaxed)) {
                // Not drained yet: look again at the next poll.
                sweep.store(true, Ordering::Relaxed);
            }
        }
        n
    }

    fn arm(&self) -> bool {
        self.0.armed.store(true, Ordering::SeqCst);
        let mut ends = self.0.ends.lock();
        if ends.is_empty() {
            return false;
        }
        for e in ends.iter() {
            e.conn.mark_armed();
        }
        // One fence for all the ends, between their marks and the looks.
        if !arm_fence() {
            return true;
        }
        let mut ready = false;
        for e in ends.iter_mut() {
            ready |= e.conn.has_work(&mut e.poll);
        }
        ready
    }
}
