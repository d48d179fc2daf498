//! A completion queue's *lane* in threads mode: who polls the CQ and who
//! dispatches what it yields, when the CQ's poller thread and the threads
//! that wait for its completions share the work (DESIGN.md: the thread that
//! waits makes the progress; helper threads are for callers that cannot
//! poll).
//!
//! # Two rights in one word
//!
//! - `REAPING`, the right to poll the CQ. The poller thread takes it for
//!   each poll and pushes what it reaped into the lane's ring.
//! - `CONSUMING`, the right to pop the ring. The dispatcher (or a thread
//!   in `Provider::progress`) takes it to dispatch what the poller reaped.
//! - A waiter takes both at once, and only while nobody holds either (one
//!   compare-exchange from 0). It dispatches what the ring holds first
//!   (reaped earlier, so older), then polls the CQ and dispatches what it
//!   reaps itself, then gives both back at once (one store of 0).
//!
//! # Every completion dispatched once, in CQ order
//!
//! The CQ hands each completion out once, to the holder of `REAPING`. The
//! poller pushes it into the ring, a single-producer single-consumer queue
//! popped in order by the holder of `CONSUMING`; a waiter dispatches it
//! straight away. A waiter's own dispatches follow every ring item: its
//! Acquire compare-exchange reads the poller's Release of `REAPING`, so it
//! sees every push made before; it empties the ring; and while it holds
//! `REAPING` nothing joins the ring. So it gives the lane back with the
//! ring empty.
//!
//! # No completion left in a ring with the dispatcher asleep
//!
//! The poller, after a push and the Release of `REAPING`, fences and wakes
//! the dispatcher if its sleep flag is raised; the dispatcher raises it,
//! fences and looks at every ring ([`Lane::is_empty`], whoever consumes
//! it). One of the two sees the other. A ring found non-empty while
//! another thread consumes it keeps the dispatcher awake until that thread
//! emptied it.
//!
//! # The poller steps aside while waiters reap
//!
//! Waiters count their passes over the lane. The poller thread, seeing the
//! count move (or finding the lane taken), sleeps for a step instead of
//! polling, without arming the CQ, so that completing a request wakes
//! nobody, and looks again; after a step without a pass it polls, spins
//! its budget, arms and sleeps as usual. A completion nobody waits for is
//! so reported at most about a step after the last waiter left.
//!
//! A waiter that spun its budget and is about to sleep stops reaping, so
//! it depends on the poller: it counts itself among the lane's sleepers,
//! then wakes the poller if it announced a sleep ([`HandBack`]). The
//! poller, before it steps aside, announces its sleep and re-checks the
//! sleepers: one sees the other (SeqCst read-modify-write and fences on
//! both sides), and the poller does not step aside while a waiter sleeps.
//!
//! The loom model at the bottom checks all of it with a poller, a
//! dispatcher, a waiter and the NIC producing completions.

use super::Sleep;
use crate::fabric::Waker;
use crate::ring::{Consumer, Watch};
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, CachePadded, Ordering, UnsafeCell};
use std::time::{Duration, Instant};

/// The poller thread or a waiter polls the CQ.
const REAPING: u32 = 1;
/// The dispatcher, a `progress` call or a waiter pops the ring.
const CONSUMING: u32 = 2;

/// One CQ's lane (module docs).
pub(crate) struct Lane<T> {
    /// `REAPING | CONSUMING` bits. `REAPING` is set by the poller's
    /// compare-exchange and cleared by its `fetch_and`; `CONSUMING`
    /// likewise by a consumer; both are set together by a waiter's
    /// compare-exchange from 0 and cleared together by its store of 0
    /// (while it holds both, no other thread writes the word: a failed
    /// compare-exchange writes nothing). Read by everyone who
    /// tries to take a right. Its own line: waiters write it twice a pass.
    state: CachePadded<AtomicU32>,
    /// The ring's consumer end: touched only by the holder of `CONSUMING`.
    consumer: UnsafeCell<Consumer<T>>,
    /// The ring's indices, for anyone (the dispatcher's re-check).
    watch: Watch<T>,
    /// What the waiters tell the poller, on a line the poller only reads.
    waiters: CachePadded<Waiters>,
}

struct Waiters {
    /// Passes waiters made over the lane: bumped (a load and a store, no
    /// locked instruction) by the waiter holding the whole lane, so no
    /// bump is lost; read by the poller, which only asks whether it moved.
    passes: AtomicU64,
    /// Waiters asleep until another thread reports their op: raised by a
    /// waiter before it sleeps, lowered after. Read by the poller before
    /// it steps aside (SeqCst, after announcing its own sleep).
    sleepers: AtomicUsize,
}

// SAFETY: the consumer, the only field that is not `Sync`, is reached only
// by the thread holding `CONSUMING` (taken with Acquire, given back with
// Release), one at a time, as a lock would hand it over; `T: Send` because
// items move from the thread that pushed them to the one that pops them.
unsafe impl<T: Send> Sync for Lane<T> {}

/// The right to poll the CQ and push into the ring; given back on drop.
pub(crate) struct Reaping<'a, T> {
    lane: &'a Lane<T>,
}

impl<T> Drop for Reaping<'_, T> {
    fn drop(&mut self) {
        self.lane.state.fetch_and(!REAPING, Ordering::Release);
    }
}

/// Gives back `CONSUMING` on drop (also if a dispatch panics).
struct ConsumingGuard<'a, T> {
    lane: &'a Lane<T>,
}

impl<T> Drop for ConsumingGuard<'_, T> {
    fn drop(&mut self) {
        self.lane.state.fetch_and(!CONSUMING, Ordering::Release);
    }
}

/// Gives back the whole lane on drop (also if a dispatch panics).
struct WholeGuard<'a, T> {
    lane: &'a Lane<T>,
}

impl<T> Drop for WholeGuard<'_, T> {
    fn drop(&mut self) {
        debug_assert_eq!(self.lane.state.load(Ordering::Relaxed), REAPING | CONSUMING);
        self.lane.state.store(0, Ordering::Release);
    }
}

impl<T: Copy + Send> Lane<T> {
    pub(crate) fn new(consumer: Consumer<T>) -> Lane<T> {
        Lane {
            state: CachePadded::new(AtomicU32::new(0)),
            watch: consumer.watch(),
            consumer: UnsafeCell::new(consumer),
            waiters: CachePadded::new(Waiters {
                passes: AtomicU64::new(0),
                sleepers: AtomicUsize::new(0),
            }),
        }
    }

    /// The poller thread: the right to poll the CQ and push what it reaps
    /// into the ring, unless a waiter holds the lane (`None`).
    #[inline]
    pub(crate) fn try_reap(&self) -> Option<Reaping<'_, T>> {
        self.take(REAPING).then(|| Reaping { lane: self })
    }

    /// Sets `bit` unless it is set. A compare-exchange, not a `fetch_or`:
    /// an attempt that fails writes nothing, so a waiter that holds the
    /// whole lane may give it back with a plain store (nothing else writes
    /// the word meanwhile).
    #[inline]
    fn take(&self, bit: u32) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & bit != 0 {
                return false;
            }
            match self
                .state
                .compare_exchange(s, s | bit, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
    }

    /// Pops the ring's completions to `f`, `buf.len()` at a time, unless
    /// another thread consumes it (then 0: that thread empties it). The
    /// dispatcher's part; no compare-exchange at all when the ring is
    /// empty.
    #[inline]
    pub(crate) fn consume(&self, buf: &mut [T], f: &mut dyn FnMut(&T)) -> usize {
        if self.watch.is_empty() || !self.take(CONSUMING) {
            return 0;
        }
        let _g = ConsumingGuard { lane: self };
        self.consumer.with_mut(|c| {
            // SAFETY: `CONSUMING` is ours until `_g` drops; no other
            // thread reaches the consumer meanwhile.
            let c = unsafe { &mut *c };
            pop_all(c, buf, f)
        })
    }

    /// A waiter's pass: if nobody works on the lane, takes all of it,
    /// dispatches the ring's completions to `f`, then polls the CQ with
    /// `poll` (which fills the front of a buffer and returns how many) and
    /// dispatches what it returns, until a poll returns less than `buf`
    /// holds; gives the lane back. `None` if the lane was taken.
    #[inline]
    pub(crate) fn reap_and_consume(
        &self,
        buf: &mut [T],
        poll: &mut dyn FnMut(&mut [T]) -> usize,
        f: &mut dyn FnMut(&T),
    ) -> Option<usize> {
        if self.state.load(Ordering::Relaxed) != 0
            || self
                .state
                .compare_exchange(0, REAPING | CONSUMING, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let _g = WholeGuard { lane: self };
        let passes = &self.waiters.passes;
        passes.store(
            passes.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
        let total = self.consumer.with_mut(|c| {
            // SAFETY: the whole lane, `CONSUMING` included, is ours until
            // `_g` drops.
            let c = unsafe { &mut *c };
            pop_all(c, buf, f)
        });
        // The ring is empty, and stays so while we hold `REAPING`: what
        // the CQ yields now is younger than all it held.
        Some(total + reap_all(buf, poll, f))
    }

    /// Whether the ring held no completion (whoever consumes it): the
    /// dispatcher's re-check before it sleeps, after the fence of its
    /// announcement.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.watch.is_empty()
    }

    /// Passes waiters made over the lane so far.
    #[inline]
    pub(crate) fn passes(&self) -> u64 {
        self.waiters.passes.load(Ordering::Relaxed)
    }

    /// The poller thread, before it polls: if waiters made passes since
    /// `seen` (updated), or `busy` (it found the lane taken), and none of
    /// them sleeps, sleeps on `sleeper` for `step` (or until woken) instead
    /// of polling; returns whether it did. `stop` ends it early.
    pub(crate) fn step_aside<S: Sleep + ?Sized>(
        &self,
        seen: &mut u64,
        busy: bool,
        sleeper: &S,
        step: Duration,
        stop: impl FnOnce() -> bool,
    ) -> bool {
        let now = self.passes();
        if now == *seen && !busy {
            return false;
        }
        *seen = now;
        let ticket = sleeper.announce();
        // After the announcement's fence: a waiter that counted itself a
        // sleeper before it is seen here; one after it sees the
        // announcement and wakes us (`HandBack::announce`).
        if self.waiters.sleepers.load(Ordering::SeqCst) != 0 || stop() {
            sleeper.cancel(ticket);
            return false;
        }
        sleeper.sleep(ticket, Some(Instant::now() + step));
        true
    }
}

/// Pops everything the ring holds to `f`.
#[inline]
fn pop_all<T: Copy>(c: &mut Consumer<T>, buf: &mut [T], f: &mut dyn FnMut(&T)) -> usize {
    let mut total = 0;
    loop {
        let n = c.pop_into(buf);
        buf[..n].iter().for_each(&mut *f);
        total += n;
        if n < buf.len() {
            return total;
        }
    }
}

/// Polls with `poll` until it returns less than `buf` holds, handing what
/// it returns to `f`.
#[inline]
fn reap_all<T>(
    buf: &mut [T],
    poll: &mut dyn FnMut(&mut [T]) -> usize,
    f: &mut dyn FnMut(&T),
) -> usize {
    let mut total = 0;
    loop {
        let n = poll(buf);
        buf[..n].iter().for_each(&mut *f);
        total += n;
        if n < buf.len() {
            return total;
        }
    }
}

/// How a waiter sleeps on `then` in threads mode: it stops reaping, so it
/// first counts itself among the lane's sleepers and wakes the lane's
/// poller (`poller`) if that announced a sleep, which then takes the CQ
/// back rather than step aside (module docs).
pub(crate) struct HandBack<'a, T, W: ?Sized, S: ?Sized> {
    pub(crate) lane: &'a Lane<T>,
    pub(crate) poller: &'a W,
    pub(crate) then: &'a S,
}

impl<T, W: Waker + ?Sized, S: Sleep + ?Sized> Sleep for HandBack<'_, T, W, S> {
    type Ticket<'b>
        = S::Ticket<'b>
    where
        Self: 'b;

    fn announce(&self) -> S::Ticket<'_> {
        // SeqCst, paired with the fence of the poller's announcement
        // before it reads `sleepers` (`Lane::step_aside`); `wake` fences
        // before it reads the poller's flag.
        self.lane.waiters.sleepers.fetch_add(1, Ordering::SeqCst);
        self.poller.wake();
        self.then.announce()
    }

    fn cancel(&self, ticket: S::Ticket<'_>) {
        self.then.cancel(ticket);
        self.lane.waiters.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    fn sleep(&self, ticket: S::Ticket<'_>, deadline: Option<Instant>) {
        self.then.sleep(ticket, deadline);
        self.lane.waiters.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// loom model of the reaping handoff: a poller thread, a dispatcher and a
/// waiter share one lane, as `PollerCtx::run`, `Inner::dispatcher_main`
/// and `Inner::wait_for` drive it, while the NIC thread completes requests
/// on the CQ. Every completion must be dispatched exactly once and in CQ
/// order; a lost wake-up leaves every thread parked, which loom reports as
/// a deadlock. Preemptions are bounded at 1: five threads with loops are
/// already 275,000 executions (about a minute); at 2 the model did not end
/// in 20 minutes. Checked to fail: without the re-check of the sleepers in
/// `step_aside` (deadlock: the poller steps aside while the waiter sleeps),
/// and with a waiter that skips the ring (completion 1 before 0).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::poller::loom_models::LoomPark;
    use crate::poller::{IdleLoop, Idled};
    use crate::ring;
    use crate::sync::{fence, thread, Arc, AtomicBool, Mutex};

    /// The model's CQ: completions `0, 1, ...` published by the NIC thread,
    /// handed out in order to whoever holds `REAPING`, armed as the soft
    /// CQ is (`fabric/soft/cq.rs`).
    #[derive(Default)]
    struct Cq {
        /// Completions published so far (the NIC's Release).
        produced: AtomicUsize,
        /// The next completion to hand out. A cell, not an atomic: loom
        /// fails the model if two threads poll at once.
        cursor: UnsafeCell<usize>,
        /// `cursor`, published for `arm`, which may run beside a poll.
        taken: AtomicUsize,
        /// A sleeper asked for a wake (set by `arm`, cleared by the wake).
        armed: AtomicBool,
    }

    impl Cq {
        fn poll(&self, out: &mut [u32]) -> usize {
            let avail = self.produced.load(Ordering::Acquire);
            self.cursor.with_mut(|c| {
                // SAFETY: none needed beyond loom's check that polls do not
                // overlap: the pointer is the cell's own, used here only.
                let c = unsafe { &mut *c };
                let n = (avail - *c).min(out.len());
                for (k, o) in out[..n].iter_mut().enumerate() {
                    *o = (*c + k) as u32;
                }
                *c += n;
                self.taken.store(*c, Ordering::Release);
                n
            })
        }

        /// As `CompletionQueue::arm`: true if completions wait already.
        fn arm(&self) -> bool {
            self.armed.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            self.produced.load(Ordering::SeqCst) > self.taken.load(Ordering::SeqCst)
        }

        /// The NIC completes one request: publish, then wake the CQ's
        /// waker (the poller) once per arm.
        fn complete(&self, poller: &LoomPark) {
            self.produced.fetch_add(1, Ordering::Release);
            fence(Ordering::SeqCst);
            if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::AcqRel) {
                poller.wake();
            }
        }
    }

    struct Model {
        cq: Cq,
        lane: Lane<u32>,
        /// Completions dispatched, in order.
        log: Mutex<Vec<u32>>,
        stop: AtomicBool,
        poller: LoomPark,
        dispatcher: LoomPark,
        waiter: LoomPark,
    }

    impl Model {
        /// Dispatches one completion: it must be the next one.
        fn dispatch(&self, c: u32) {
            let mut log = self.log.lock().unwrap();
            assert_eq!(c as usize, log.len(), "dispatched twice or out of order");
            log.push(c);
        }

        fn dispatched(&self) -> usize {
            self.log.lock().unwrap().len()
        }

        fn stopping(&self) -> bool {
            self.stop.load(Ordering::SeqCst)
        }
    }

    /// `PollerCtx::run` on the model CQ (the ring never fills here). Like
    /// the other threads it yields where the real one spins on (a spin
    /// budget, or a re-check that found work another thread holds): loom
    /// runs a thread that never yields for good.
    fn poller(m: &Model, mut producer: ring::Producer<u32>) {
        let mut idle = IdleLoop::new(1);
        let mut seen = m.lane.passes();
        let step = Duration::from_micros(200);
        let mut buf = [0u32; 1];
        while !m.stopping() {
            if m.lane
                .step_aside(&mut seen, false, &m.poller, step, || m.stopping())
            {
                idle.progress();
                continue;
            }
            let Some(reaping) = m.lane.try_reap() else {
                if !m
                    .lane
                    .step_aside(&mut seen, true, &m.poller, step, || m.stopping())
                    && idle.idle(&m.poller, None, || m.cq.arm() || m.stopping()) != Idled::Slept
                {
                    thread::yield_now();
                }
                continue;
            };
            let n = m.cq.poll(&mut buf);
            if n > 0 {
                assert_eq!(producer.push_slice(&buf[..n]), n);
                drop(reaping);
                m.dispatcher.wake();
                idle.progress();
                continue;
            }
            drop(reaping);
            if idle.idle(&m.poller, None, || m.cq.arm() || m.stopping()) != Idled::Slept {
                thread::yield_now();
            }
        }
    }

    /// `Inner::dispatcher_main`: pops the ring, then notifies waiters.
    fn dispatcher(m: &Model) {
        let mut idle = IdleLoop::new(1);
        let mut buf = [0u32; 1];
        while !m.stopping() {
            if m.lane.consume(&mut buf, &mut |&c| m.dispatch(c)) > 0 {
                m.waiter.wake();
                idle.progress();
                continue;
            }
            let recheck = || !m.lane.is_empty() || m.stopping();
            if idle.idle(&m.dispatcher, None, recheck) != Idled::Slept {
                thread::yield_now();
            }
        }
    }

    /// `Inner::wait_for` in threads mode, until all `n` were dispatched;
    /// then stops the engine.
    fn waiter(m: &Model, n: usize, spin_budget: u32) {
        let _ = m.waiter.thread.set(thread::current());
        let mut idle = IdleLoop::new(spin_budget);
        let sleep = HandBack {
            lane: &m.lane,
            poller: &m.poller,
            then: &m.waiter,
        };
        let mut buf = [0u32; 1];
        while m.dispatched() < n {
            let reaped = m
                .lane
                .reap_and_consume(&mut buf, &mut |b| m.cq.poll(b), &mut |&c| m.dispatch(c))
                .unwrap_or(0);
            if reaped > 0 {
                idle.progress();
                continue;
            }
            if idle.idle(&sleep, None, || m.dispatched() >= n) != Idled::Slept {
                thread::yield_now();
            }
        }
        m.stop.store(true, Ordering::SeqCst);
        m.poller.unpark();
        m.dispatcher.unpark();
    }

    /// The NIC completes `n` requests while the three threads run.
    fn handoff(n: usize, spin_budget: u32) {
        let (producer, consumer) = ring::channel::<u32>(n.max(2));
        let m = Arc::new(Model {
            cq: Cq::default(),
            lane: Lane::new(consumer),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            poller: LoomPark::default(),
            dispatcher: LoomPark::default(),
            waiter: LoomPark::default(),
        });
        // The helpers are registered before anyone may wake them (the
        // waiter's stop unparks them whether they announced a sleep or not).
        let helpers = [
            {
                let m = m.clone();
                thread::spawn(move || poller(&m, producer))
            },
            {
                let m = m.clone();
                thread::spawn(move || dispatcher(&m))
            },
        ];
        let _ = m.poller.thread.set(helpers[0].thread().clone());
        let _ = m.dispatcher.thread.set(helpers[1].thread().clone());
        let others = [
            {
                let m = m.clone();
                thread::spawn(move || waiter(&m, n, spin_budget))
            },
            {
                let m = m.clone();
                thread::spawn(move || (0..n).for_each(|_| m.cq.complete(&m.poller)))
            },
        ];
        for t in helpers.into_iter().chain(others) {
            t.join().unwrap();
        }
        assert_eq!(*m.log.lock().unwrap(), (0..n as u32).collect::<Vec<_>>());
    }

    /// One completion; the waiter sleeps at once when it finds nothing.
    #[test]
    fn loom_lane_one_completion() {
        crate::sync::model("lane_one_completion", 1, || handoff(1, 0));
    }

    /// Two completions: the poller may reap the first into the ring and
    /// the waiter the second, which it must dispatch after the first.
    #[test]
    fn loom_lane_two_completions() {
        crate::sync::model("lane_two_completions", 1, || handoff(2, 0));
    }
}
