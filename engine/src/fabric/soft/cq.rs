//! Completion queues: a bounded lock-free MPMC queue plus a one-shot arm flag.
//!
//! Capacity is enforced twice. Creating a queue pair reserves
//! `send_depth + recv_depth` entries (`reserved`, an admission check), and
//! every post that returns `Ok` first takes one unit of `inflight`, which
//! `poll` gives back: each completion belongs to exactly one accepted post,
//! so `queue.len() <= inflight <= depth` at all times and a push can never
//! find the queue full, whatever the consumer does.
//!
//! Wake-up protocol (no lost wake-ups): `arm` sets `armed`, then looks at the
//! queue; a producer pushes, then swaps `armed` to false and wakes if it was
//! set. Both sides use `SeqCst`, so either the arming consumer sees the new
//! entry or the producer sees the flag.

use crate::fabric::{CompletionQueue, CqId, Waker, WorkCompletion};
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub(super) struct SoftCq {
    id: CqId,
    /// Completions not yet polled, oldest first. Pushed by posting threads
    /// (under the link lock of the queue pair the completion belongs to);
    /// popped by the single consumer.
    queue: ArrayQueue<WorkCompletion>,
    /// Accepted posts on queue pairs of this CQ whose completion was not yet
    /// polled. Incremented by `admit` (never above the capacity), decremented
    /// by `poll` after popping. Always `>= queue.len()`.
    inflight: AtomicUsize,
    /// Entries reserved by live queue pairs of this CQ, `<=` the capacity.
    /// Changed by `reserve` (QP creation) and `release` (QP destruction).
    reserved: AtomicUsize,
    /// Set by `arm`, cleared by the first push after it (which wakes).
    armed: AtomicBool,
    waker: Arc<dyn Waker>,
}

impl SoftCq {
    pub(super) fn new(id: CqId, depth: usize, waker: Arc<dyn Waker>) -> SoftCq {
        SoftCq {
            id,
            queue: ArrayQueue::new(depth),
            inflight: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            armed: AtomicBool::new(false),
            waker,
        }
    }

    /// Reserves `n` entries for a new queue pair; false if that would
    /// over-commit the queue.
    pub(super) fn reserve(&self, n: usize) -> bool {
        let cap = self.queue.capacity();
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(n).filter(|t| *t <= cap)
            })
            .is_ok()
    }

    /// Gives back a reservation of a destroyed queue pair.
    pub(super) fn release(&self, n: usize) {
        self.reserved.fetch_sub(n, Ordering::AcqRel);
    }

    /// Takes room for the completion of one post; false if the queue holds
    /// (or owes) as many completions as it can store.
    pub(super) fn admit(&self) -> bool {
        let cap = self.queue.capacity();
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// Adds a completion admitted earlier; returns whether the waker must be
    /// called (the caller does so once it holds no lock, see `wake`).
    #[must_use]
    pub(super) fn push(&self, wc: WorkCompletion) -> bool {
        if self.queue.push(wc).is_err() {
            // `queue.len() <= inflight <= capacity` (module docs) makes this
            // unreachable; losing a completion silently would hang the
            // engine, so fail loudly.
            panic!("soft NIC: completion queue overflow despite admission");
        }
        self.armed.swap(false, Ordering::SeqCst)
    }

    pub(super) fn wake(&self) {
        self.waker.wake();
    }
}

impl CompletionQueue for SoftCq {
    fn id(&self) -> CqId {
        self.id
    }

    fn poll(&self, out: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(wc) = self.queue.pop() else { break };
            out[n] = wc;
            n += 1;
        }
        if n > 0 {
            self.inflight.fetch_sub(n, Ordering::AcqRel);
        }
        n
    }

    fn arm(&self) -> bool {
        self.armed.store(true, Ordering::SeqCst);
        !self.queue.is_empty()
    }
}
