//! What the producers of a completion queue's work hold of it: the CQ's
//! shared part ([`CqShared`]: the sleeper's `armed` word, the ready list of
//! announced idle ends, and the entries its queue pairs reserved) and, per
//! end, its [`Presence`] (whether the end is idle, its slot, and its link
//! in the ready list). A producer publishes its work, issues the light
//! fence, then reads both words, and only when one is set announces the end
//! or wakes the sleeper (`link`, "Wake-ups"). The consumer's side of the
//! same words, and why an end goes idle, are `cq`'s.
//!
//! # The ready list
//!
//! One word ([`CqShared`]'s `ready`) is the list of announced ends: a
//! stack linked through the ends' [`Presence`] (Treiber's, with a consumer
//! that only ever takes the whole stack, so no ABA), and a flag for ends
//! attached since the consumer last looked. A producer that won an end's
//! `idle` swap writes the end's `next` (the stack's top, or none) on the
//! line it just wrote, then swings the word to the end with one
//! compare-and-swap; the consumer reads the word on every poll (one line,
//! written only by announcements and attachments) and, when it is not
//! empty, swaps it empty and walks the ends. A stack of one end says so in
//! the word (`LONE`), so taking it reads no line of the producer's but the
//! word. An end is on the stack at most once: it is pushed only by the
//! producer whose swap cleared its `idle`, and `idle` is raised again only
//! by the consumer, once it took the end off the stack. (Before, the list
//! was a vector under a spin lock: a producer's lock, push and unlock and
//! the consumer's lock and swap moved the lock's line and the vector's
//! buffer line between the two cores, on the path of the message that
//! woke the end.)

use super::fence;
use crate::fabric::cq_budget::CqBudget;
use crate::fabric::Waker;
use crate::sync::{AtomicBool, AtomicU32, AtomicU64};
use crossbeam_utils::CachePadded;
use std::sync::atomic::Ordering;
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
    /// The slot of the end below this one on the ready list ([`NO_SLOT`]:
    /// none). Written by the producer whose swap cleared `idle`, before
    /// its push publishes the end; read by the consumer that took the list.
    next: AtomicU32,
}

/// No slot: the end of the ready list.
pub(super) const NO_SLOT: u32 = u32::MAX;

/// `CqShared::ready`: the top end's slot + 1 (0: the list is empty).
const TOP: u64 = 0xffff_ffff;
/// `CqShared::ready`: the top end is the only one (its `next` need not be
/// read).
const LONE: u64 = 1 << 32;
/// `CqShared::ready`: ends were attached since the consumer last looked.
const ATTACHED: u64 = 1 << 33;

impl Presence {
    pub(super) fn new() -> Presence {
        Presence {
            idle: AtomicBool::new(false),
            slot: AtomicU32::new(NO_SLOT),
            next: AtomicU32::new(NO_SLOT),
        }
    }

    /// The slot below this end on the ready list the consumer took (see
    /// [`Announced`]).
    #[inline]
    pub(super) fn next(&self) -> u32 {
        self.next.load(Ordering::Relaxed)
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

/// The part of a CQ the links of its queue pairs hold.
pub(super) struct CqShared {
    /// Entries promised to the queue pairs of this CQ.
    pub(super) budget: CqBudget,
    /// A sleeper asked for a wake that was not sent yet. Set by `arm`;
    /// cleared by the one producer that sends the wake; read by every
    /// producer after it published work.
    armed: CachePadded<AtomicBool>,
    /// The ready list (module docs): the top announced end's slot + 1 and
    /// the `LONE` and `ATTACHED` flags. Pushed to by producers only when an
    /// end was idle, and by `attach`; read by the consumer at each poll and
    /// swapped empty when it is not.
    ready: CachePadded<AtomicU64>,
    waker: Arc<dyn Waker>,
}

impl CqShared {
    /// A CQ of `capacity` entries whose sleeper `waker` wakes.
    pub(super) fn new(capacity: usize, waker: Arc<dyn Waker>) -> CqShared {
        CqShared {
            budget: CqBudget::new(capacity),
            armed: CachePadded::new(AtomicBool::new(false)),
            ready: CachePadded::new(AtomicU64::new(0)),
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
        debug_assert!(slot != NO_SLOT, "an end goes idle only once taken in");
        let mut old = self.ready.load(Ordering::Relaxed);
        loop {
            let top = old & TOP;
            let (next, lone) = match top {
                0 => (NO_SLOT, LONE),
                t => ((t - 1) as u32, 0),
            };
            p.next.store(next, Ordering::Relaxed);
            let new = (old & ATTACHED) | lone | (u64::from(slot) + 1);
            // Release: the consumer that takes the list sees every `next`.
            match self
                .ready
                .compare_exchange_weak(old, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
        // Orders the push before the caller's read of `armed` (an `arm`
        // raises `armed`, then reads the list).
        fence::light();
    }

    /// The sleeper's word, for the consumer's `arm` (`SoftCq::arm`).
    pub(super) fn armed(&self) -> &AtomicBool {
        &self.armed
    }

    /// Whether an end was announced or attached since the consumer last
    /// took the list (read by the consumer on every poll: one load of a
    /// line that only announcements and attachments write).
    #[inline]
    pub(super) fn has_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) != 0
    }

    /// An end was attached (pushed on `SoftCq`'s list of attached ends, before
    /// this): the next poll takes it in.
    pub(super) fn note_attached(&self) {
        self.ready.fetch_or(ATTACHED, Ordering::Release);
    }

    /// The consumer takes the ready list, leaving it empty.
    pub(super) fn take_ready(&self) -> Announced {
        let word = self.ready.swap(0, Ordering::Acquire);
        Announced {
            top: match word & TOP {
                0 => NO_SLOT,
                t => (t - 1) as u32,
            },
            lone: word & LONE != 0,
            attached: word & ATTACHED != 0,
        }
    }
}

/// The ready list as the consumer took it ([`CqShared::take_ready`]).
pub(super) struct Announced {
    /// The slot of the last end announced, [`NO_SLOT`] if none.
    top: u32,
    /// `top` is the only end announced: its `next` is [`NO_SLOT`] without
    /// reading it.
    lone: bool,
    /// Ends were attached: they wait in `SoftCq`'s list.
    pub(super) attached: bool,
}

impl Announced {
    /// Walks the ends taken, the last announced first: `take` is called with
    /// each one's slot and whether the walk needs its [`Presence::next`]
    /// (it must return it then, and may return anything else otherwise).
    pub(super) fn walk(self, mut take: impl FnMut(u32, bool) -> u32) {
        let (mut slot, mut lone) = (self.top, self.lone);
        while slot != NO_SLOT {
            let next = take(slot, !lone);
            (slot, lone) = (if lone { NO_SLOT } else { next }, false);
        }
    }
}

/// loom models of the ready list: ends announced by concurrent producers
/// while the consumer takes the list are each taken exactly once, and an
/// end parked while a producer publishes work for it is seen by the
/// consumer's re-check, announced, or (the consumer about to sleep) its
/// sleeper woken. Checked to fail with the push's `Release` made `Relaxed`
/// (the consumer reads a stale `next` and loses an end) and with the
/// producer's fence after the push left out (the consumer sleeps through
/// the work).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::sync::{fence, thread, Arc, AtomicUsize};

    struct Wakes(AtomicUsize);

    impl Waker for Wakes {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn cq() -> (Arc<CqShared>, std::sync::Arc<Wakes>) {
        let wakes = std::sync::Arc::new(Wakes(AtomicUsize::new(0)));
        (Arc::new(CqShared::new(0, wakes.clone())), wakes)
    }

    /// An end at `slot` that its consumer parked.
    fn parked(slot: u32) -> Presence {
        let p = Presence::new();
        p.set_slot(slot);
        p.raise_idle();
        p
    }

    /// The slots of the ends on `cq`'s list, taken by the consumer.
    fn take(cq: &CqShared, ends: &[Presence], into: &mut Vec<u32>) {
        cq.take_ready().walk(|slot, linked| {
            into.push(slot);
            if linked {
                ends[slot as usize].next()
            } else {
                NO_SLOT
            }
        });
    }

    #[test]
    fn loom_ready_list_takes_each_announced_end_once() {
        crate::sync::model("ready_list_takes_each_announced_end_once", 3, || {
            let (cq, _) = cq();
            let ends = Arc::new([parked(0), parked(1), parked(2)]);
            // Two producers announce three ends, one of them twice (only
            // the first wins its `idle`).
            let producers: Vec<_> = [[0, 1], [2, 0]]
                .into_iter()
                .map(|slots| {
                    let (cq, ends) = (cq.clone(), ends.clone());
                    thread::spawn(move || {
                        for s in slots {
                            cq.announce(&ends[s]);
                        }
                    })
                })
                .collect();
            let mut got = Vec::new();
            take(&cq, &ends[..], &mut got);
            for p in producers {
                p.join().unwrap();
            }
            take(&cq, &ends[..], &mut got);
            got.sort_unstable();
            assert_eq!(got, [0, 1, 2], "each announced end taken once");
            assert!(!cq.has_ready());
        });
    }

    #[test]
    fn loom_work_on_a_parking_end_is_not_lost() {
        crate::sync::model("work_on_a_parking_end_is_not_lost", 3, || {
            let (cq, wakes) = cq();
            let end = Arc::new(Presence::new());
            end.set_slot(0);
            let work = Arc::new(AtomicBool::new(false));
            let producer = {
                let (cq, end, work) = (cq.clone(), end.clone(), work.clone());
                thread::spawn(move || {
                    // `Link::wake` after a post.
                    work.store(true, Ordering::Release);
                    fence::light();
                    if end.is_idle() {
                        cq.announce(&end);
                    }
                    if cq.is_armed() {
                        cq.wake();
                    }
                })
            };
            // `Consumer::settle`: raise, fence, re-check.
            end.raise_idle();
            fence(Ordering::SeqCst);
            let mut hot = work.load(Ordering::Acquire) && end.take_back();
            let mut found = hot;
            // `SoftCq::arm`: raise `armed`, then look at the list and the
            // hot ends.
            fence::raise(cq.armed());
            found |= cq.has_ready() || (hot && work.load(Ordering::Acquire));
            producer.join().unwrap();
            let mut taken = Vec::new();
            take(&cq, &[], &mut taken);
            hot |= taken == [0];
            assert!(hot, "the end with work neither kept nor announced");
            assert!(
                found || wakes.0.load(Ordering::Relaxed) == 1,
                "the consumer slept through work nobody woke it for"
            );
        });
    }
}
