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
//! # Polling only the ends that have work
//!
//! A poll visits the CQ's *hot* ends, not every end attached, so its cost
//! does not grow with the connections that share the CQ. An end is in
//! exactly one of three places:
//!
//! - **hot**: in the consumer's list, visited by every poll;
//! - **announced**: on `CqShared`'s ready list, put there by a producer;
//! - **idle**: its `Presence` says so (`notify`); visited by no poll.
//!
//! An end starts hot. After [`IDLE_POLLS`] visits in a row that found
//! nothing (fewer when many ends are hot: [`quiet_limit`]), the consumer
//! stores `idle`, fences (once for all the ends of a poll that go quiet)
//! and looks for work once more: if it finds none the end leaves the hot
//! list. A producer, after publishing work and the light fence it issues
//! anyway for `armed` (`Link::wake`, see `fence`), reads `idle`; only if it
//! is set does it swap it back (one of possibly several producers wins)
//! and push the end on the ready list (`notify`). The next poll moves
//! announced ends to the hot list. While an end stays busy a producer pays one plain load
//! for this, no locked instruction (the dirty-list idea of epoll's ready
//! list and of a NIC's doorbell coalescing, with the arm/re-check of a
//! sleeping poller).
//!
//! By default the producer's fence is a full one (`fence`): with the
//! consumer's after `idle`, one of the two sees the other, and an end the
//! re-check found empty is parked for good. With asymmetric fences
//! (`SANPATH_SOFT_FENCES=asymmetric`) the producer's fence is only a
//! compiler fence, and an end going idle must not pay the heavy fence
//! that would pair with it (a `membarrier` per message on a CQ of many
//! connections each woken now and then). So
//! the two may miss each other: the producer's load of `idle` passes its
//! store of the work, the consumer's re-check comes before that store is
//! visible, and the end is parked with work nobody announced. Such an end
//! is *cooling*: every end parked since the consumer's last heavy fence is
//! listed in `Consumer::cooling`, and each poll re-checks a few of them
//! ([`COOLING_CHECKS`]): the work's store becomes visible within a moment
//! (as a spin loop's flag does), and the re-check that sees it takes the
//! end back. An end re-checked once it has cooled for [`COOLING_TICKS`]
//! (far longer than a store takes to drain), and at least
//! [`COOLING_MIN_CHECKS`] times, moves to `Consumer::cooled`,
//! which polls leave alone: on a CQ of 10,000 connections nearly every
//! end is parked, and re-checking old ones on every poll touched two cold
//! ends per poll (conn_scale's latency at 10,000 doubled). `arm`, whose
//! heavy fence makes every earlier store visible and every later producer
//! see `idle`, re-checks both lists before the consumer sleeps and empties
//! them: nothing is left on an idle end with its consumer asleep. A
//! consumer that never sleeps issues that fence itself once `cooled`
//! holds [`COOLED_MAX`] ends (one heavy fence per that many parks).
//!
//! # Displacement
//!
//! When a poll takes ends in (announced or attached), every end already
//! hot is *displaced*: it leaves at its first visit that finds nothing,
//! whatever [`quiet_limit`] says. (The consumer counts its take-ins and
//! each end keeps the count it came in at: one store per take-in, not one
//! per hot end, which on a CQ of thousands closing at once, each drop
//! announcing its end, was a walk of the hot list per poll.) The newest ends are the ones a thread
//! waits on (a server's round robin over many connections brings one in per
//! request); an older end that went quiet is one whose exchange is over,
//! and each visit it keeps getting is a poll that only finds nothing (at
//! 100 pairs round robin, 9 visits per round trip where 3 find work). An
//! end alone on the list keeps [`IDLE_POLLS`], whenever it came in, and a
//! connection that is never parked never displaces another: a ping-pong
//! on one connection announces nothing. So the end a thread waits on stays hot while it
//! waits: with the last round's end beside it on the list, both used to
//! leave after 8 quiet visits, and the reply it waited for then had to
//! announce it, from the other core, on the path of the reply.
//!
//! An end whose oldest send waits for a peer that does not poll (see
//! `HELP_AFTER` in `link`) stays hot: it matches that send itself after
//! enough polls.
//!
//! Capacity: creating a queue pair reserves `send_depth + recv_depth`
//! entries, and no queue pair holds more uncompleted requests than that, so
//! the completions a CQ owes never exceed its depth (the admission a
//! hardware CQ needs to not overflow).

use super::clock::ticks;
use super::fence;
use super::link::{Link, Reaper};
use super::lock;
use super::notify::{CqShared, NO_SLOT};
use crate::fabric::{CompletionQueue, CqId, Waker, WorkCompletion};
use crate::spin::SpinLock;
use crate::sync::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Visits in a row that find nothing before an end leaves the hot list. A
/// waiting thread polls many times per round trip, so an end in use never
/// goes idle; one that does costs its next producer one announcement.
pub(super) const IDLE_POLLS: u32 = 64;

/// Cooling ends (module docs) a poll re-checks at most, round robin.
const COOLING_CHECKS: usize = 2;

/// Ticks of `clock::ticks` (a few microseconds) after its parking from
/// which a cooling end's re-check finding nothing moves it to
/// `Consumer::cooled`.
pub(super) const COOLING_TICKS: u64 = 16384;

/// Re-checks a cooling end gets at least before it moves to
/// `Consumer::cooled` (however slowly the polls run).
pub(super) const COOLING_MIN_CHECKS: u32 = 8;

/// Cooled ends after which a poll issues the heavy fence and re-checks
/// them all (module docs).
const COOLED_MAX: usize = 1024;

/// Quiet visits in a row after which an end of a hot list of `hot` ends
/// leaves it: [`IDLE_POLLS`] divided by the cube of the power of two at or
/// below `hot` (a shift, not a division), at least one. One end alone (a
/// CQ per connection) keeps the full count, two or three 8; from four on
/// an end leaves at its first visit that finds nothing. On a CQ shared by
/// thousands of connections that each wake now and then (a server's round
/// robin) every end on the list but the one with work costs each poll a
/// visit that only finds that nothing came: a list of `h` ends each kept
/// for `IDLE_POLLS / h` quiet visits held about
/// `8 * sqrt(ends woken per poll)` of them (at 10,000 pairs round robin,
/// 27 visits per round trip where 3 find work, 3,000 of the round's 10,000
/// instructions), the cube about three. An end leaving costs the poll one
/// fence (for all that leave in it) and the end's next producer one
/// announcement, which the next message of such a connection pays anyway.
#[inline]
fn quiet_limit(hot: usize) -> u32 {
    (IDLE_POLLS >> (3 * hot.max(1).ilog2()).min(31)).max(1)
}

/// An end attached to a CQ. A hot one is held by the hot list itself, so
/// that a poll reaches it without a lookup (on a one-connection ping-pong,
/// a poll is on the path of every message); a parked one waits at its slot
/// of `Consumer::parked`, where the ready list and the cooling lists name
/// it.
struct Attached {
    link: Arc<Link>,
    /// Which end of `link`.
    end: usize,
    r: Reaper,
    /// Visits in a row that found nothing, up to the poll's [`quiet_limit`].
    quiet: u32,
    /// The end's slot in `Consumer::parked`, its own until it is forgotten.
    slot: u32,
    /// `Consumer::took_in` when the end last went hot: an older one is
    /// displaced, and leaves the hot list at its first visit that finds
    /// nothing while other ends are hot (module docs, "Displacement").
    came_in: u32,
    /// `Consumer::settle` raised the end's `idle` and re-checks it after
    /// the fence.
    marked: bool,
    /// Times the end was parked: names a stay off the hot list, so a
    /// `Consumer::cooling` entry of an earlier stay is recognised as stale.
    stay: u32,
}

/// What the consumer owns.
struct Consumer {
    /// The hot ends, visited by every poll.
    hot: Vec<Attached>,
    /// The idle and announced ends by slot; `None` at the slot of a hot
    /// end and at a free slot (listed in `free`).
    parked: Vec<Option<Attached>>,
    free: Vec<u32>,
    /// Where the next poll starts in `hot` (round robin between ends).
    cursor: usize,
    /// Take-ins of ends so far (wrapping): bumped by each poll that takes
    /// ends off the ready list, so that every end hot before it is
    /// displaced, in one store rather than one per hot end.
    took_in: u32,
    /// Ends parked since the last heavy fence (`arm`), by slot, stay, the
    /// tick of their parking and the re-checks they had: they may hold work a producer did not
    /// announce (module docs). An entry whose end went hot since, or
    /// came back for another stay, is stale and dropped when met.
    cooling: Vec<(u32, u32, u64, u32)>,
    /// Where the next poll's re-checks start in `cooling`.
    cooling_at: usize,
    /// Ends of `cooling` re-checked after [`COOLING_TICKS`] (module
    /// docs): re-checked again only after a heavy fence.
    cooled: Vec<(u32, u32, u64, u32)>,
    /// Ends visited by polls so far (tests check that idle ones are not).
    #[cfg(test)]
    visits: u64,
}

impl Consumer {
    /// Re-checks cooling ends (module docs), round robin from
    /// `cooling_at`: up to [`COOLING_CHECKS`] of them, moving those that
    /// cooled long enough to `cooled`; after [`COOLED_MAX`] of those, the
    /// heavy fence and [`Consumer::recheck_all`]. Returns whether an end
    /// had work.
    fn recheck_cooling(&mut self) -> bool {
        let mut found = false;
        let mut checked = 0;
        let mut i = self.cooling_at;
        while checked < COOLING_CHECKS && !self.cooling.is_empty() {
            if i >= self.cooling.len() {
                i = 0;
            }
            let (slot, stay, since, checks) = self.cooling[i];
            checked += 1;
            match self.recheck(slot, stay) {
                Some(false)
                    if checks + 1 < COOLING_MIN_CHECKS
                        || ticks().wrapping_sub(since) < COOLING_TICKS =>
                {
                    self.cooling[i].3 = checks + 1;
                    i += 1;
                }
                Some(false) => {
                    self.cooled.push(self.cooling.swap_remove(i));
                }
                Some(true) => {
                    found = true;
                    self.cooling.swap_remove(i);
                }
                None => {
                    self.cooling.swap_remove(i);
                }
            }
        }
        self.cooling_at = i;
        if self.cooled.len() >= COOLED_MAX {
            fence::heavy();
            found |= self.recheck_all();
        }
        found
    }

    /// After a heavy fence: re-checks every cooling and cooled end and
    /// empties both lists. Returns whether an end had work.
    fn recheck_all(&mut self) -> bool {
        let mut found = false;
        let mut lists = [
            std::mem::take(&mut self.cooling),
            std::mem::take(&mut self.cooled),
        ];
        for list in &mut lists {
            for &(slot, stay, _, _) in list.iter() {
                found |= self.recheck(slot, stay) == Some(true);
            }
            list.clear();
        }
        // Give the buffers back: no allocation once they have grown.
        [self.cooling, self.cooled] = lists;
        self.cooling_at = 0;
        found
    }

    /// Re-checks the parked end of `slot` in its stay `stay`: `None` if the
    /// entry is stale, else whether the end had work (or drained), in
    /// which case it goes back to the hot list, unless a producer's
    /// announcement took it (it is on the ready list then).
    fn recheck(&mut self, slot: u32, stay: u32) -> Option<bool> {
        let a = self.parked[slot as usize]
            .as_mut()
            .filter(|a| a.stay == stay)?;
        if !a.link.has_work(a.end, &mut a.r, false) && !a.link.drained(a.end, &a.r) {
            return Some(false);
        }
        if a.link.ends[a.end].presence.take_back() {
            let mut a = self.parked[slot as usize]
                .take()
                .expect("a cooling end is parked");
            a.came_in = self.took_in;
            self.hot.push(a);
        }
        Some(true)
    }

    /// Takes in a newly attached end; it starts hot.
    fn add(&mut self, mut a: Attached) {
        a.came_in = self.took_in;
        a.slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.parked.push(None);
                u32::try_from(self.parked.len() - 1).expect("fewer than 2^32 ends per CQ")
            }
        };
        a.link.ends[a.end].presence.set_slot(a.slot);
        self.hot.push(a);
    }

    /// After a poll that saw an end drained or long quiet: parks those
    /// quiet for `limit` visits that still have nothing (they are cooling,
    /// see the module docs), and forgets drained ends. The ends that go
    /// quiet raise their `idle` flags first, then one fence serves them
    /// all.
    fn settle(&mut self, limit: u32) {
        let mut marked = false;
        // An end alone on the list is never displaced.
        let alone = self.hot.len() == 1;
        for a in &mut self.hot {
            let limit = if alone {
                limit
            } else {
                a.limit(limit, self.took_in)
            };
            if a.quiet >= limit && !a.link.drained(a.end, &a.r) {
                a.quiet = 0;
                a.marked = true;
                marked = true;
                a.link.ends[a.end].presence.raise_idle();
            }
        }
        if marked {
            std::sync::atomic::fence(Ordering::SeqCst);
        }
        // With full fences on both sides a re-check that finds nothing is
        // final: no end cools.
        let full = fence::light_is_full();
        let mut i = 0;
        while i < self.hot.len() {
            let a = &mut self.hot[i];
            if a.marked {
                a.marked = false;
                if a.leaves() {
                    let mut a = self.hot.swap_remove(i);
                    a.stay = a.stay.wrapping_add(1);
                    if !full {
                        self.cooling.push((a.slot, a.stay, ticks(), 0));
                    }
                    let slot = a.slot as usize;
                    debug_assert!(self.parked[slot].is_none());
                    self.parked[slot] = Some(a);
                    continue;
                }
            }
            let a = &self.hot[i];
            if a.link.drained(a.end, &a.r) {
                self.free.push(a.slot);
                self.hot.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }
}

/// What one visit of an end found.
struct Visit {
    /// Completions written.
    reaped: usize,
    /// The end's link must be sealed (once the consumer lock is released).
    seal: bool,
    /// The end is drained or long quiet: `Consumer::settle` is due.
    settle: bool,
}

impl Attached {
    /// Reaps the end into `out` and keeps its quiet count (`limit`: the
    /// quiet visits after which it leaves, [`Attached::limit`], or
    /// [`IDLE_POLLS`] for an end alone on the list). Inlined into `poll`: a
    /// call's saves and restores cost more than its body's bookkeeping.
    #[inline(always)]
    fn visit(&mut self, out: &mut [WorkCompletion], limit: u32) -> Visit {
        let (reaped, seal) = self.link.reap(self.end, &mut self.r, out);
        if seal {
            return Visit {
                reaped,
                seal,
                settle: false,
            };
        }
        let mut settle = false;
        if reaped == 0 {
            self.quiet += 1;
            settle = self.quiet >= limit;
        } else {
            self.quiet = 0;
        }
        Visit {
            reaped,
            seal,
            settle: settle || self.link.drained(self.end, &self.r),
        }
    }

    /// Quiet visits after which the end leaves the hot list, the poll's
    /// being `limit` and the consumer's take-ins `took_in`: one once it is
    /// displaced.
    #[inline(always)]
    fn limit(&self, limit: u32, took_in: u32) -> u32 {
        if self.came_in == took_in {
            limit
        } else {
            1
        }
    }

    /// The re-check of an end whose `idle` flag `settle` raised, after the
    /// fence: whether it leaves the hot list (idle, or announced by a
    /// producer meanwhile). One that has work, or was drained meanwhile,
    /// stays hot, unless a producer's announcement took it.
    fn leaves(&mut self) -> bool {
        let p = &self.link.ends[self.end].presence;
        if !self.link.has_work(self.end, &mut self.r, false)
            && !self.link.drained(self.end, &self.r)
        {
            return true;
        }
        // Taken back, unless the announcement has it (it is on the ready
        // list then, and the poll that takes it in sees the work).
        !p.take_back()
    }
}

pub(super) struct SoftCq {
    id: CqId,
    shared: Arc<CqShared>,
    /// Held by `poll` and `arm`, and by `drain` across its dispatch: one
    /// consumer at a time, the CQ's one right (run-to-completion mode
    /// takes no other, `CompletionQueue::serialises_drains`).
    consumer: SpinLock<Consumer>,
    /// The holder of `consumer` hands completions to a `drain`'s caller,
    /// which may take long (an upcall): an `arm` that finds the lock taken
    /// may then let its caller sleep, and the holder wakes the CQ at the
    /// end of the dispatch if it was armed meanwhile (see `arm`). Written
    /// by the holder of `consumer` only; read by `arm`s that find it taken.
    dispatching: AtomicBool,
    /// Ends attached since the consumer last looked (`CqShared`'s
    /// `pending` says there are some). Pushed by `attach`, taken by the
    /// consumer.
    incoming: Mutex<Vec<Attached>>,
}

impl SoftCq {
    pub(super) fn new(id: CqId, depth: usize, waker: Arc<dyn Waker>) -> SoftCq {
        SoftCq {
            id,
            shared: Arc::new(CqShared::new(depth, waker)),
            consumer: SpinLock::new(Consumer {
                hot: Vec::new(),
                parked: Vec::new(),
                free: Vec::new(),
                cursor: 0,
                took_in: 0,
                cooling: Vec::new(),
                cooling_at: 0,
                cooled: Vec::new(),
                #[cfg(test)]
                visits: 0,
            }),
            dispatching: AtomicBool::new(false),
            incoming: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn shared(&self) -> &Arc<CqShared> {
        &self.shared
    }

    /// Adds end `end` of `link`, with its reaper state, to the ends this
    /// CQ polls.
    pub(super) fn attach(&self, link: &Arc<Link>, end: usize, r: Reaper) {
        lock(&self.incoming).push(Attached {
            link: link.clone(),
            end,
            r,
            quiet: 0,
            slot: u32::MAX,
            came_in: 0,
            marked: false,
            stay: 0,
        });
        self.shared.note_attached();
    }

    /// Ends visited by polls so far.
    #[cfg(test)]
    pub(super) fn visits(&self) -> u64 {
        self.consumer.lock().visits
    }

    /// Parked ends listed as cooling or cooled.
    #[cfg(test)]
    pub(super) fn cooling(&self) -> usize {
        let c = self.consumer.lock();
        c.cooling.len() + c.cooled.len()
    }

    /// Ends attached and not yet forgotten, and how many of them are hot.
    #[cfg(test)]
    pub(super) fn ends(&self) -> (usize, usize) {
        let c = self.consumer.lock();
        (c.parked.len() - c.free.len(), c.hot.len())
    }

    /// Moves newly attached and announced ends to the hot list.
    #[inline]
    fn take_in(&self, c: &mut Consumer) {
        if self.shared.has_ready() {
            self.take_ready(c);
        }
    }

    #[cold]
    fn take_ready(&self, c: &mut Consumer) {
        // Whatever comes in now is newer than every hot end.
        c.took_in = c.took_in.wrapping_add(1);
        let list = self.shared.take_ready();
        if list.attached {
            // After taking the flag: an end attached later sets it again.
            for a in lock(&self.incoming).drain(..) {
                c.add(a);
            }
        }
        list.walk(|slot, linked| {
            let mut a = c.parked[slot as usize]
                .take()
                .expect("an announced end is parked");
            a.came_in = c.took_in;
            let next = if linked {
                a.link.ends[a.end].presence.next()
            } else {
                NO_SLOT
            };
            c.hot.push(a);
            next
        });
    }
}

impl Drop for SoftCq {
    fn drop(&mut self) {
        // Ends attached but never taken in by a poll hold their link, whose
        // ends hold this CQ's shared part: a cycle, once no poll will come.
        lock(&self.incoming).clear();
    }
}

impl SoftCq {
    /// One poll by the holder of the consumer lock: completions into
    /// `out`, and the link to seal, if one must be (once the lock is
    /// released: a seal tells the engine, with no lock of the NIC held).
    #[inline(always)]
    fn poll_locked(
        &self,
        c: &mut Consumer,
        out: &mut [WorkCompletion],
    ) -> (usize, Option<Arc<Link>>) {
        self.take_in(c);
        if !c.cooling.is_empty() {
            c.recheck_cooling();
        }
        let mut n = 0;
        let mut seal = None;
        let mut settle = false;
        let count = c.hot.len();
        let mut limit = IDLE_POLLS;
        if count == 1 {
            // One hot end (a CQ per connection, the common case): no
            // rotation to keep.
            if !out.is_empty() {
                #[cfg(test)]
                {
                    c.visits += 1;
                }
                let a = &mut c.hot[0];
                // Alone on the list: never displaced.
                let v = a.visit(out, IDLE_POLLS);
                n = v.reaped;
                settle = v.settle;
                if v.seal {
                    seal = Some(a.link.clone());
                }
            }
        } else {
            limit = quiet_limit(count);
            let start = if c.cursor < count { c.cursor } else { 0 };
            for visited in 0..count {
                if n == out.len() {
                    break;
                }
                let at = start + visited;
                #[cfg(test)]
                {
                    c.visits += 1;
                }
                let a = &mut c.hot[if at < count { at } else { at - count }];
                let v = a.visit(&mut out[n..], a.limit(limit, c.took_in));
                n += v.reaped;
                settle |= v.settle;
                if v.seal {
                    seal = Some(a.link.clone());
                    break;
                }
            }
            c.cursor = start + 1;
        }
        if settle {
            c.settle(limit);
        }
        (n, seal)
    }
}

impl SoftCq {
    /// The end of a dispatch by the holder of the consumer lock: an `arm`
    /// that found the lock taken during it let its caller sleep, counting
    /// on this wake (the caller polls again, with the lock free or
    /// dispatching again). Its fence is [`fence::rare_light`]: a compiler
    /// fence wherever `membarrier` works, the sleeper paying for both.
    #[inline]
    fn dispatched(&self) {
        self.dispatching.store(false, Ordering::Relaxed);
        fence::rare_light();
        if self.shared.is_armed() {
            self.shared.wake();
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
        let (n, seal) = self.poll_locked(&mut guard, out);
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

    /// The consumer lock is the one right to the CQ: held by `poll` and
    /// `arm`, and by `drain` across its calls of `f`.
    fn serialises_drains(&self) -> bool {
        true
    }

    /// Holds the consumer lock while `f` runs (the caller's dispatch), so
    /// the engine takes no lock of its own to keep the completions of the
    /// CQ in order: one locked instruction per drain. A seal lets the lock
    /// go (and another thread may take it: the completions handed to `f`
    /// so far are older than any it reaps).
    fn drain(
        &self,
        buf: &mut [WorkCompletion],
        f: &mut dyn FnMut(&WorkCompletion),
    ) -> Option<usize> {
        let mut guard = self.consumer.try_lock()?;
        let mut total = 0;
        loop {
            let (n, seal) = self.poll_locked(&mut guard, buf);
            if n > 0 {
                self.dispatching.store(true, Ordering::Relaxed);
                buf[..n].iter().for_each(&mut *f);
                self.dispatched();
            }
            total += n;
            if let Some(link) = seal {
                drop(guard);
                link.seal();
                // The sealed link's flushed requests are due now.
                match self.consumer.try_lock() {
                    Some(g) => guard = g,
                    None => return Some(total),
                }
            } else if n < buf.len() {
                return Some(total);
            }
        }
    }

    /// Armed all the same if another thread holds the consumer lock (or
    /// this one, from a completion `drain` hands out), whose ends cannot be
    /// looked at now. If the holder is dispatching, which may take long (an
    /// upcall), the caller may sleep: the holder wakes the CQ when the
    /// dispatch ends ([`SoftCq::dispatched`]), so work that came while the
    /// holder could no longer see it is not left with everyone asleep, and
    /// the caller does not spin through another thread's upcall. Otherwise
    /// (a poll holds the lock for a moment) the caller polls again.
    fn arm(&self) -> bool {
        let Some(mut guard) = self.consumer.try_lock() else {
            if !self.dispatching.load(Ordering::Relaxed) {
                fence::raise(self.shared.armed());
                return true;
            }
            // Dekker with `dispatched` (the rare pair of fences: the
            // holder's side runs per dispatch, this one only before a
            // sleep): either this sees the dispatch still running and the
            // holder, clearing it, sees `armed`, or this sees it ended and
            // polls again.
            self.shared.armed().store(true, Ordering::Relaxed);
            fence::rare_heavy();
            return !self.dispatching.load(Ordering::Relaxed);
        };
        let c = &mut *guard;
        self.take_in(c);
        fence::raise(self.shared.armed());
        // After the heavy fence every cooling end is either seen with its
        // work here or announced by its producer: the lists empty.
        let cooled = c.recheck_all();
        if cooled || self.shared.has_ready() {
            return true;
        }
        c.hot
            .iter_mut()
            .any(|a| a.link.has_work(a.end, &mut a.r, true))
    }
}

/// loom model of the dispatch hand-off (`SoftCq::arm` with the consumer
/// lock taken, `SoftCq::dispatched`): a waiter that arms while another
/// thread dispatches, and so may sleep, is woken by the end of that
/// dispatch. Checked to fail with the holder's fence left out.
#[cfg(all(test, loom))]
mod loom_models {
    use super::fence;
    use crate::sync::{thread, Arc, AtomicBool, Ordering};

    #[test]
    fn loom_arm_during_a_dispatch_is_woken_by_its_end() {
        crate::sync::model("arm_during_a_dispatch", 3, || {
            let armed = Arc::new(AtomicBool::new(false));
            // The holder is dispatching when the waiter finds the lock taken.
            let dispatching = Arc::new(AtomicBool::new(true));
            let waiter = {
                let (armed, dispatching) = (armed.clone(), dispatching.clone());
                thread::spawn(move || {
                    armed.store(true, Ordering::Relaxed);
                    fence::rare_heavy();
                    dispatching.load(Ordering::Relaxed)
                })
            };
            dispatching.store(false, Ordering::Relaxed);
            fence::rare_light();
            let woke = armed.load(Ordering::Relaxed);
            let slept = waiter.join().unwrap();
            assert!(!slept || woke, "a waiter slept through the dispatch's end");
        });
    }
}
