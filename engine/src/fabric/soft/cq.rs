//! Completion queues. A soft CQ stores no completions: polling it reads
//! them off the work queues of the ends attached to it, in posting order per
//! queue (`Link::reap`), so the CQ is written by one thread only, its
//! consumer. Whatever produces work for it publishes the work first and then
//! wakes the CQ only if a sleeper asked for it (`armed`; see the wake-up
//! rule in `link`). As with verbs' notification request, an arm lasts until
//! the wake it asked for, whoever polls meanwhile: the sleeper sets `armed`,
//! the first waker after it clears it (one write per sleep, none per
//! message), every other producer only reads it.
//!
//! Capacity: creating a queue pair reserves `send_depth + recv_depth`
//! entries, and no queue pair holds more uncompleted requests than that, so
//! the completions a CQ owes never exceed its depth (the admission a
//! hardware CQ needs to not overflow).

use super::link::{Link, Reaper};
use super::lock;
use crate::fabric::{CompletionQueue, CqId, Waker, WorkCompletion};
use crate::spin::SpinLock;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The part of a CQ the links of its queue pairs hold.
pub(super) struct CqShared {
    capacity: usize,
    /// Entries reserved by live queue pairs of this CQ, `<=` the capacity.
    /// Changed by `reserve` (QP creation) and `release` (QP destruction).
    reserved: AtomicUsize,
    /// A sleeper asked for a wake that was not sent yet. Set by `arm`;
    /// cleared by the one producer that sends the wake; read by every
    /// producer after it published work.
    armed: CachePadded<AtomicBool>,
    waker: Arc<dyn Waker>,
}

impl CqShared {
    /// Reserves `n` entries for a new queue pair; false if that would
    /// over-commit the queue.
    pub(super) fn reserve(&self, n: usize) -> bool {
        let cap = self.capacity;
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

    /// Whether the consumer sleeps (the caller fenced after publishing).
    pub(super) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Wakes the sleeper, once per arm (the caller saw `is_armed`).
    pub(super) fn wake(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

/// An end attached to a CQ: its link, which end, and its reaper state.
type Attached = (Arc<Link>, usize, Reaper);

/// The ends a CQ's consumer polls.
struct Consumer {
    ends: Vec<Attached>,
    /// Where the next poll starts (round robin between ends).
    cursor: usize,
}

pub(super) struct SoftCq {
    id: CqId,
    shared: Arc<CqShared>,
    /// Held by `poll` and `arm`: one consumer at a time.
    consumer: SpinLock<Consumer>,
    /// Ends attached since the consumer last looked.
    incoming: Mutex<Vec<Attached>>,
    /// Set when `incoming` is not empty.
    incoming_pending: AtomicBool,
}

impl SoftCq {
    pub(super) fn new(id: CqId, depth: usize, waker: Arc<dyn Waker>) -> SoftCq {
        SoftCq {
            id,
            shared: Arc::new(CqShared {
                capacity: depth,
                reserved: AtomicUsize::new(0),
                armed: CachePadded::new(AtomicBool::new(false)),
                waker,
            }),
            consumer: SpinLock::new(Consumer {
                ends: Vec::new(),
                cursor: 0,
            }),
            incoming: Mutex::new(Vec::new()),
            incoming_pending: AtomicBool::new(false),
        }
    }

    pub(super) fn shared(&self) -> &Arc<CqShared> {
        &self.shared
    }

    /// Adds end `end` of `link`, with its reaper state, to the ends this
    /// CQ polls.
    pub(super) fn attach(&self, link: &Arc<Link>, end: usize, r: Reaper) {
        lock(&self.incoming).push((link.clone(), end, r));
        self.incoming_pending.store(true, Ordering::Release);
    }

    fn take_incoming(&self, c: &mut Consumer) {
        if self.incoming_pending.load(Ordering::Acquire) {
            let mut inc = lock(&self.incoming);
            self.incoming_pending.store(false, Ordering::Relaxed);
            c.ends.append(&mut inc);
        }
    }
}

impl CompletionQueue for SoftCq {
    fn id(&self) -> CqId {
        self.id
    }

    fn poll(&self, out: &mut [WorkCompletion]) -> usize {
        let Some(mut guard) = self.consumer.try_lock() else {
            return 0;
        };
        let c = &mut *guard;
        self.take_incoming(c);
        let mut n = 0;
        let mut seal = None;
        let mut drained = false;
        let count = c.ends.len();
        let start = if c.cursor < count { c.cursor } else { 0 };
        for visited in 0..count {
            if n == out.len() {
                break;
            }
            let at = start + visited;
            let (link, end, r) = &mut c.ends[if at < count { at } else { at - count }];
            let (k, s) = link.reap(*end, r, &mut out[n..]);
            n += k;
            if s {
                seal = Some(link.clone());
                break;
            }
            drained |= link.drained(*end, r);
        }
        if drained {
            c.ends.retain(|(link, end, r)| !link.drained(*end, r));
        }
        c.cursor = start + 1;
        drop(guard);
        match seal {
            Some(link) => {
                link.seal();
                // The sealed link's flushed requests are due now.
                n + self.poll(&mut out[n..])
            }
            None => n,
        }
    }

    fn arm(&self) -> bool {
        let mut guard = self.consumer.lock();
        let c = &mut *guard;
        self.take_incoming(c);
        self.shared.armed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        c.ends
            .iter_mut()
            .any(|(link, end, r)| link.has_work(*end, r))
    }
}
