//! Completion queues of the shared-memory fabric. As in the soft fabric a
//! CQ stores nothing: polling it runs each attached connection end (which
//! executes what arrived from the peer) and reads the completions off its
//! queues. This module is the consumer's side: the list of attached ends
//! with their poll sides, the poll, the sweep of dropped ends and the arm.
//! What the ends and the NIC hold of a CQ to wake it, and the entries its
//! queue pairs reserved, are `notify`'s ([`CqShared`]).
//!
//! `arm` marks every attached end as sleeping in its own segment, so the
//! peer signals that end's eventfd for new work; the NIC's event thread
//! turns the signal into this CQ's wake. One fence serves all the ends (a
//! `membarrier` where the processes take part in asymmetric fences, which
//! spares the peers' wakes theirs: [`arm_fence`]).

use super::conn::{Conn, PollSide};
use super::notify::CqShared;
use super::sys;
use crate::fabric::{CompletionQueue, CqId, Waker, WorkCompletion};
use crate::spin::SpinLock;
use std::sync::atomic::{fence, Ordering};
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

/// The consumer's part of a CQ, and the NIC's way to its shared part.
pub(super) struct CqInner {
    id: CqId,
    /// What the ends and the NIC hold of this CQ.
    pub(super) shared: Arc<CqShared>,
    /// Attached connection ends with their poll sides; the one consumer
    /// polls them (its lock, a spin lock: held for a poll, which never
    /// blocks but for a break's bounded seal). The only lock a poll takes.
    /// The ends hold `shared`, not this: dropping the CQ drops them.
    ends: SpinLock<Vec<End>>,
}

impl CqInner {
    /// Adds a new end. A sleeper that armed before it came did not mark
    /// it (`Conn::mark_armed`), so the peer's work on it would wake nobody:
    /// the sleeper is woken to poll and arm again, the new end included.
    pub(super) fn attach(&self, conn: Arc<Conn>, poll: PollSide) {
        self.ends.lock().push(End { conn, poll });
        self.shared.wake();
    }
}

/// The CQ handed out; the NIC keeps a weak reference to its inner part,
/// to attach the ends made for it.
pub(super) struct ShmCq(pub(super) Arc<CqInner>);

impl ShmCq {
    pub(super) fn new(id: CqId, depth: usize, waker: Arc<dyn Waker>) -> ShmCq {
        ShmCq(Arc::new(CqInner {
            id,
            shared: Arc::new(CqShared::new(depth, waker)),
            ends: SpinLock::new(Vec::new()),
        }))
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
        if self.0.shared.take_sweep() {
            ends.retain(|e| !(e.conn.dropped.load(Ordering::Acquire) && e.conn.drained()));
            if ends.iter().any(|e| e.conn.dropped.load(Ordering::Relaxed)) {
                // Not drained yet: look again at the next poll.
                self.0.shared.sweep_again();
            }
        }
        n
    }

    fn arm(&self) -> bool {
        self.0.shared.ask_wake();
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
