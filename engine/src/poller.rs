//! Completion progress. The engine has `poller.count` completion queues; a
//! socket's queue pair is attached to one of them.
//!
//! - `threads` mode: one pinned poller thread per CQ, a dispatcher thread,
//!   and the threads that wait share the work (the [`lane`] of each CQ):
//!   - a thread that waits for (or polls) an op of its socket reaps the
//!     socket's CQ itself when nobody else works on it: it dispatches what
//!     the poller had reaped into the ring, then what it reaps, on its own
//!     thread ([`Progress::drain`] with the CQ's index), spins its budget,
//!     then sleeps until the dispatcher reports the op;
//!   - while waiters reap a CQ, its poller steps aside: it sleeps a step at
//!     a time ([`STEP_ASIDE`]) and leaves the CQ unarmed, so completing a
//!     request wakes no thread and the waiters keep the cores;
//!   - otherwise (nobody waits: upcall-driven ops, and waiters that went to
//!     sleep, which hand the CQ back first) the poller busy-polls its CQ
//!     for up to `spin_budget` empty polls, then arms the CQ and parks
//!     until the CQ wakes it. Reaped completions go into the poller's SPSC
//!     [`ring`], published in batches; when the ring is full the poller
//!     stops reaping (completions wait in the CQ, nothing is dropped).
//!     The dispatcher drains the rings ([`Progress::drain`] without an
//!     index) and makes the upcalls. Pollers never make upcalls.
//!
//!   Why each completion is dispatched once and in CQ order, and why none
//!   waits with every thread asleep, is in [`lane`]'s docs.
//! - `run_to_completion` mode: no poller threads. A thread that needs
//!   progress calls [`Progress::drain`], which polls the CQs directly (no
//!   handoff); while it has nothing to do it may [`Progress::arm`] the CQs
//!   and wait on the notifier they wake (the front end's upcall helper does
//!   only that).
//!
//! Either way the front end gets completions from [`Progress::drain`].
//!
//! Every thread that polls for work (the pollers, the front end's
//! dispatcher, its waits and upcall helper) idles the same
//! way, with an [`IdleLoop`]: spin a budget, announce the sleep, re-check,
//! sleep.

mod lane;

use crate::config::{Config, PollerMode};
use crate::fabric::{CompletionQueue, CqId, FabricError, Nic, Waker, WorkCompletion};
use crate::ring::{self, Producer};
use crate::spin::SpinLock;
use crate::sync;
use crossbeam_utils::CachePadded;
use lane::{HandBack, Lane};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// The spin-then-sleep rule every thread that polls for work follows:
/// spin up to `spin_budget` empty polls, then announce the sleep, re-check
/// for work, and sleep only if the re-check found none; progress starts a
/// new budget. The poller threads, the dispatcher and the run-to-completion
/// waits use it with a budget, the upcall helper with none.
///
/// No wake-up is lost as long as the waker publishes its work before it
/// wakes (and the [`Sleep`] keeps a wake-up given after `announce`): either
/// the re-check sees the work, or the waker sees the announcement. The loom
/// model at the bottom checks that for [`ParkWaker`]'s [`SleepFlag`].
///
/// The first [`UNPAUSED_SPINS`] empty polls after progress go back to back
/// even with `poller.spin_pause`: a pause delays the next look at the
/// memory that announces a completion by its own length (measured on the
/// benchmark host, an AMD EPYC under KVM: about 50 ns, as long as a cache
/// line's trip between the cores), which a request/response wait pays on
/// every message; a longer wait pauses from there on.
#[derive(Debug)]
pub struct IdleLoop {
    spin_budget: u32,
    /// Whether a spin past the first [`UNPAUSED_SPINS`] executes a pause
    /// (`poller.spin_pause`).
    pause: bool,
    /// The longest one sleep may last, if bounded.
    guard: Option<Duration>,
    /// Empty polls since the last progress or sleep.
    empty: u32,
}

/// Empty polls an [`IdleLoop`] makes back to back after progress before it
/// pauses between them (when it pauses at all): about a microsecond of
/// polling, many times a request/response round trip over shared memory.
pub const UNPAUSED_SPINS: u32 = 64;

/// What one [`IdleLoop::idle`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idled {
    /// Within the spin budget: spun once.
    Spun,
    /// The re-check after announcing the sleep found work.
    Rechecked,
    /// Slept, until woken or the deadline.
    Slept,
}

impl IdleLoop {
    pub fn new(spin_budget: u32) -> IdleLoop {
        IdleLoop {
            spin_budget,
            pause: true,
            guard: None,
            empty: 0,
        }
    }

    /// Spins back to back, without a pause, unless `pause`
    /// (`poller.spin_pause`).
    pub fn with_pause(mut self, pause: bool) -> IdleLoop {
        self.pause = pause;
        self
    }

    /// Bounds every sleep to `guard`, whatever the deadline: for sleepers
    /// that must look at something no wake-up announces.
    pub fn with_guard(mut self, guard: Duration) -> IdleLoop {
        self.guard = Some(guard);
        self
    }

    /// Progress was made: the next empty poll starts a new spin budget.
    pub fn progress(&mut self) {
        self.empty = 0;
    }

    /// Counts one empty poll; true while it is within the spin budget.
    pub fn within_budget(&mut self) -> bool {
        self.empty = self.empty.saturating_add(1);
        self.empty < self.spin_budget
    }

    /// After an empty poll: spins while within the budget; past it,
    /// announces the sleep on `sleeper`, runs `recheck` (true: work, or a
    /// reason to stop, is there) and sleeps until a wake-up or `deadline`
    /// unless it found some (or the guard, if any, passes first). Either
    /// way past the budget, the next empty poll starts a new one.
    pub fn idle<S: Sleep + ?Sized>(
        &mut self,
        sleeper: &S,
        deadline: Option<Instant>,
        recheck: impl FnOnce() -> bool,
    ) -> Idled {
        if self.within_budget() {
            if self.pause && self.empty > UNPAUSED_SPINS {
                std::hint::spin_loop();
            }
            return Idled::Spun;
        }
        self.empty = 0;
        let ticket = sleeper.announce();
        if recheck() {
            sleeper.cancel(ticket);
            Idled::Rechecked
        } else {
            let until = match (self.guard, deadline) {
                (Some(g), d) => {
                    let g = Instant::now() + g;
                    Some(d.map_or(g, |d| d.min(g)))
                }
                (None, d) => d,
            };
            sleeper.sleep(ticket, until);
            Idled::Slept
        }
    }
}

/// A way for an [`IdleLoop`] to sleep: after [`Sleep::announce`], a
/// wake-up is not lost, even one that comes before [`Sleep::sleep`].
pub trait Sleep {
    /// An announced sleep, ended by `cancel` or `sleep`.
    type Ticket<'a>
    where
        Self: 'a;
    /// Announces that the caller is about to sleep. The caller re-checks
    /// for work after this, and wakers must see either that work or the
    /// announcement.
    fn announce(&self) -> Self::Ticket<'_>;
    /// Abandons the announced sleep: the re-check found work.
    fn cancel(&self, ticket: Self::Ticket<'_>);
    /// Sleeps until a wake-up since `announce` (returns at once if one
    /// came already) or `deadline`.
    fn sleep(&self, ticket: Self::Ticket<'_>, deadline: Option<Instant>);
}

/// The flag a sleeper raises to say "wake me", read by wakers: the
/// sleeper's half of the no-lost-wake-up handshake of [`ParkWaker`].
/// Built on [`crate::sync`], so loom checks it.
#[derive(Debug, Default)]
pub struct SleepFlag {
    raised: sync::AtomicBool,
}

impl SleepFlag {
    /// The sleeper, before it re-checks for work. The SeqCst store and
    /// fence pair with the fence in [`SleepFlag::is_raised`]: a waker that
    /// published work before it looks either is seen by the re-check, or
    /// sees the flag.
    pub fn raise(&self) {
        self.raised.store(true, sync::Ordering::SeqCst);
        sync::fence(sync::Ordering::SeqCst);
    }

    /// The sleeper, once it found work or woke.
    pub fn lower(&self) {
        self.raised.store(false, sync::Ordering::Relaxed);
    }

    /// The waker, after publishing its work: true if the sleeper may be
    /// asleep (or about to be) and must be woken.
    pub fn is_raised(&self) -> bool {
        sync::fence(sync::Ordering::SeqCst);
        self.raised.load(sync::Ordering::SeqCst)
    }
}

/// Wakes one parked thread, cheaply when it is not asleep.
#[derive(Default)]
pub struct ParkWaker {
    /// The thread to unpark; set once by that thread before it first sleeps.
    thread: OnceLock<Thread>,
    /// Raised from just before the thread re-checks for work until it runs
    /// again.
    sleeping: SleepFlag,
}

impl ParkWaker {
    /// Registers the calling thread as the one to wake.
    pub fn register_current(&self) {
        let _ = self.thread.set(std::thread::current());
    }

    /// Unparks the thread unconditionally (shutdown).
    pub fn unpark(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// Sleeps by parking the registered thread (the one that calls `sleep`).
impl Sleep for ParkWaker {
    type Ticket<'a> = ();

    fn announce(&self) {
        self.sleeping.raise();
    }

    fn cancel(&self, (): ()) {
        self.sleeping.lower();
    }

    fn sleep(&self, (): (), deadline: Option<Instant>) {
        // An unpark since `announce` makes the park return at once.
        match deadline {
            Some(d) => std::thread::park_timeout(d.saturating_duration_since(Instant::now())),
            None => std::thread::park(),
        }
        self.sleeping.lower();
    }
}

impl Waker for ParkWaker {
    fn wake(&self) {
        if self.sleeping.is_raised() {
            self.unpark();
        }
    }
}

/// A wake-up many threads can wait for (op completions, close drains, CQ
/// notifications), cheap to signal when nobody waits. Usage: take a token
/// with [`Notifier::prepare`], re-check the condition, then
/// [`WaitToken::wait`]; a `notify` after `prepare` is never lost.
#[derive(Default)]
pub struct Notifier {
    /// Bumped by every notify that found a waiter.
    seq: Mutex<u64>,
    cond: Condvar,
    /// Threads between `prepare` and the end of `wait`; `notify` skips the
    /// lock when 0.
    waiters: AtomicUsize,
}

/// A registration as waiter of a [`Notifier`]; consumed by `wait`.
#[must_use]
pub struct WaitToken<'a> {
    notifier: &'a Notifier,
    seen: u64,
}

impl Notifier {
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        *self.seq.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.cond.notify_all();
    }

    /// Registers the caller as a waiter.
    pub fn prepare(&self) -> WaitToken<'_> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let seen = *self.seq.lock().unwrap_or_else(PoisonError::into_inner);
        WaitToken {
            notifier: self,
            seen,
        }
    }

    /// Waits until `done()` holds or `deadline` passes; returns `done()`.
    /// `done` must become true only together with a `notify`.
    pub fn wait_until(&self, deadline: Option<Instant>, mut done: impl FnMut() -> bool) -> bool {
        loop {
            let token = self.prepare();
            if done() {
                return true;
            }
            if !token.wait(deadline) {
                return done();
            }
        }
    }
}

impl WaitToken<'_> {
    /// Sleeps until a `notify` since `prepare`, or `deadline`; returns false
    /// on timeout. Dropping a token without waiting unregisters it.
    pub fn wait(self, deadline: Option<Instant>) -> bool {
        let n = self.notifier;
        let mut seq = n.seq.lock().unwrap_or_else(PoisonError::into_inner);
        let notified = loop {
            if *seq != self.seen {
                break true;
            }
            // Without a deadline, wake periodically as a guard; correctness
            // does not depend on it.
            let timeout = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(t) if !t.is_zero() => t,
                    _ => break false,
                },
                None => Duration::from_millis(100),
            };
            seq = n
                .cond
                .wait_timeout(seq, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        notified
    }
}

impl Drop for WaitToken<'_> {
    fn drop(&mut self) {
        self.notifier.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Waker for Notifier {
    fn wake(&self) {
        self.notify();
    }
}

/// Sleeps on a wait token: any number of threads at once.
impl Sleep for Notifier {
    type Ticket<'a> = WaitToken<'a>;

    fn announce(&self) -> WaitToken<'_> {
        self.prepare()
    }

    fn cancel(&self, ticket: WaitToken<'_>) {
        drop(ticket);
    }

    fn sleep(&self, ticket: WaitToken<'_>, deadline: Option<Instant>) {
        let _ = ticket.wait(deadline);
    }
}

/// The waker of a run-to-completion CQ: the front end's (the upcall helper
/// and the threads waiting in the front end), and the one-shot waker of
/// [`Progress::arm_once`], if one was asked for.
struct CqWake {
    front: Arc<dyn Waker>,
    /// Taken by the next wake; set by `arm_once`.
    once: Mutex<Option<Arc<dyn Waker>>>,
    /// Set by `arm_once` before it arms the CQ, cleared by the wake that
    /// takes `once`: while set, the CQ is armed or its wake is under way,
    /// so `arm_once` need not arm it again. A wake takes the lock of
    /// `once` only when it is set: nothing is added to wakes nobody asked a
    /// one-shot waker for.
    armed_once: AtomicBool,
}

impl Waker for CqWake {
    fn wake(&self) {
        self.front.wake();
        if self.armed_once.swap(false, Ordering::SeqCst) {
            let once = self
                .once
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(w) = once {
                w.wake();
            }
        }
    }
}

struct PollerThread {
    waker: Arc<ParkWaker>,
    handle: Option<JoinHandle<()>>,
}

/// The CQs and whatever drives them.
pub struct Progress {
    mode: PollerMode,
    cqs: Vec<Arc<dyn CompletionQueue>>,
    /// Threads mode: poller threads, one per CQ; emptied by `shutdown`.
    pollers: Mutex<Vec<PollerThread>>,
    /// Threads mode: each CQ's lane (who reaps it, who pops its ring),
    /// shared with its poller thread; empty in run-to-completion mode.
    lanes: Vec<Arc<Lane<WorkCompletion>>>,
    /// Threads mode: each CQ's poller's waker (a waiter that goes to sleep
    /// wakes the poller it let step aside).
    poller_wakers: Vec<Arc<ParkWaker>>,
    /// Run-to-completion mode: one reaper per CQ at a time (CQs are single
    /// consumer, and a reaper dispatches what it reaped before the next
    /// one reaps), for the CQs that do not serialise their drains
    /// themselves (`None` for those that do: the soft CQ's consumer lock is
    /// the one right, one locked instruction per reap, not two). Padded:
    /// the threads spinning on different CQs each try-lock their own, and
    /// must not bounce one line between them.
    rtc_reapers: Vec<Option<CachePadded<SpinLock<()>>>>,
    /// Run-to-completion mode: each CQ's waker (empty in threads mode).
    wakes: Vec<Arc<CqWake>>,
    stop: Arc<AtomicBool>,
    /// Next CQ to hand out (round robin).
    next_cq: AtomicUsize,
}

impl Progress {
    /// Creates the CQs and, in threads mode, starts the pollers. `front` is
    /// woken whenever completions were published for the front end (threads
    /// mode) or a CQ armed with [`Progress::arm`] got a completion
    /// (run-to-completion mode).
    pub fn start(
        nic: &dyn Nic,
        config: &Config,
        front: Arc<dyn Waker>,
    ) -> Result<Progress, FabricError> {
        let pc = &config.poller;
        let stop = Arc::new(AtomicBool::new(false));
        let mut cqs = Vec::with_capacity(pc.count);
        let mut pollers = Vec::new();
        let mut lanes = Vec::new();
        let mut poller_wakers = Vec::new();
        let mut wakes = Vec::new();
        for i in 0..pc.count {
            match pc.mode {
                PollerMode::RunToCompletion => {
                    let wake = Arc::new(CqWake {
                        front: front.clone(),
                        once: Mutex::new(None),
                        armed_once: AtomicBool::new(false),
                    });
                    cqs.push(nic.create_cq(config.qp.cq_depth, wake.clone())?);
                    wakes.push(wake);
                }
                PollerMode::Threads => {
                    let waker = Arc::new(ParkWaker::default());
                    let cq = nic.create_cq(config.qp.cq_depth, waker.clone())?;
                    let (producer, consumer) = ring::channel(config.ring.capacity);
                    let lane = Arc::new(Lane::new(consumer));
                    lanes.push(lane.clone());
                    let ctx = PollerCtx {
                        cq: cq.clone(),
                        producer,
                        lane,
                        waker: waker.clone(),
                        front: front.clone(),
                        stop: stop.clone(),
                        spin_budget: pc.spin_budget,
                        spin_pause: pc.spin_pause,
                        batch: pc.batch.min(POLL_BATCH),
                        core: pc.cores.get(i).copied(),
                    };
                    let handle = std::thread::Builder::new()
                        .name(format!("sanpath-poll{i}"))
                        .spawn(move || ctx.run())
                        .map_err(|e| FabricError::Unavailable(format!("poller thread: {e}")))?;
                    poller_wakers.push(waker.clone());
                    pollers.push(PollerThread {
                        waker,
                        handle: Some(handle),
                    });
                    cqs.push(cq);
                }
            }
        }
        let rtc_reapers = cqs
            .iter()
            .map(|cq| (!cq.serialises_drains()).then(|| CachePadded::new(SpinLock::new(()))))
            .collect();
        Ok(Progress {
            mode: pc.mode,
            cqs,
            pollers: Mutex::new(pollers),
            lanes,
            poller_wakers,
            rtc_reapers,
            wakes,
            stop,
            next_cq: AtomicUsize::new(0),
        })
    }

    pub fn mode(&self) -> PollerMode {
        self.mode
    }

    /// The id of CQ `index` (as [`Progress::assign_cq`] numbers them).
    pub fn cq_id(&self, index: usize) -> CqId {
        self.cqs[index % self.cqs.len()].id()
    }

    /// The CQ for a new queue pair (round robin): its index and id.
    pub fn assign_cq(&self) -> (usize, CqId) {
        let i = self.next_cq.fetch_add(1, Ordering::Relaxed) % self.cqs.len();
        (i, self.cqs[i].id())
    }

    /// Hands available completions to `f`, oldest first per CQ; never
    /// blocks. Run-to-completion: straight from the CQs (only CQ `only` if
    /// given: the one a waiting thread's socket uses). Threads mode with
    /// `only`: the CQ's ring, then the CQ itself, if no other thread works
    /// on that CQ (a waiter's pass, [`lane`]); without: the rings of all
    /// CQs (the dispatcher). The right to a CQ (or ring) is held while `f`
    /// runs, so two threads never interleave the completions of one CQ; `f`
    /// must not call `drain` again (the front end refuses nested progress:
    /// its thread's `buf` is borrowed then). Completions are reaped into
    /// `buf`, the caller's (kept per thread and initialised once, so that a
    /// drain that finds nothing writes no memory for it). Returns how many
    /// completions were handed out.
    ///
    /// In line, the run-to-completion wait's drain of its own CQ (the data
    /// path's) costs no call of its own; the other drains are one call.
    #[inline(always)]
    pub fn drain(
        &self,
        buf: &mut ReapBuf,
        only: Option<usize>,
        f: &mut dyn FnMut(&WorkCompletion),
    ) -> usize {
        match (self.mode, only) {
            (PollerMode::RunToCompletion, Some(i)) => self.reap(i, buf, f),
            _ => self.drain_into(buf, only, f),
        }
    }

    /// [`Progress::drain`]'s other cases: threads mode, and every CQ.
    #[inline(never)]
    fn drain_into(
        &self,
        buf: &mut ReapBuf,
        only: Option<usize>,
        f: &mut dyn FnMut(&WorkCompletion),
    ) -> usize {
        let mut total = 0;
        match self.mode {
            PollerMode::Threads => match only {
                Some(i) => {
                    let (Some(lane), Some(cq)) = (self.lanes.get(i), self.cqs.get(i)) else {
                        return 0;
                    };
                    total = lane
                        .reap_and_consume(buf, &mut |b| cq.poll(b), f)
                        .unwrap_or(0);
                }
                None => {
                    for lane in &self.lanes {
                        total += lane.consume(buf, f);
                    }
                }
            },
            PollerMode::RunToCompletion => match only {
                Some(i) => total = self.reap(i, buf, f),
                None => {
                    for i in 0..self.cqs.len() {
                        total += self.reap(i, buf, f);
                    }
                }
            },
        }
        total
    }

    /// Run-to-completion mode: polls CQ `i` until it is empty, unless
    /// another thread is reaping it (or there is no such CQ).
    #[inline]
    fn reap(&self, i: usize, buf: &mut ReapBuf, f: &mut dyn FnMut(&WorkCompletion)) -> usize {
        let (Some(cq), Some(lock)) = (self.cqs.get(i), self.rtc_reapers.get(i)) else {
            return 0;
        };
        match lock {
            Some(lock) => match lock.try_lock() {
                Some(_guard) => crate::fabric::poll_each(&**cq, buf, f),
                None => 0,
            },
            None => cq.drain(buf, f).unwrap_or(0),
        }
    }

    /// Prepares to sleep: run-to-completion mode arms every CQ; returns true
    /// if completions are already waiting (do not sleep). Threads mode: true
    /// if a ring is non-empty, whoever pops it (the dispatcher's re-check:
    /// every push is followed by a wake of the dispatcher, see [`lane`]).
    pub fn arm(&self) -> bool {
        match self.mode {
            PollerMode::Threads => self.lanes.iter().any(|l| !l.is_empty()),
            PollerMode::RunToCompletion => {
                let mut ready = false;
                for cq in &self.cqs {
                    ready |= cq.arm();
                }
                ready
            }
        }
    }

    /// Prepares a run-to-completion wait that polls only CQ `only` to
    /// sleep: arms that CQ alone, the one whose completions it reaps (as
    /// [`Progress::arm`] without it). Another CQ would wake it for
    /// completions it leaves to others, and one that another thread is
    /// polling says "completions waiting" (see `arm`), which kept the
    /// waiter from ever sleeping while any other thread polled.
    pub fn arm_only(&self, only: Option<usize>) -> bool {
        match (self.mode, only) {
            (PollerMode::RunToCompletion, Some(i)) => self.cqs.get(i).is_some_and(|cq| cq.arm()),
            _ => self.arm(),
        }
    }

    /// Threads mode: how a thread that reaped CQ `index` while it waited
    /// sleeps on `then` once it spun its budget: it hands the CQ back to the
    /// CQ's poller first ([`lane`]). `None` in run-to-completion mode.
    pub(crate) fn waiter_sleep<'a, S: Sleep + ?Sized>(
        &'a self,
        index: usize,
        then: &'a S,
    ) -> Option<HandBack<'a, WorkCompletion, ParkWaker, S>> {
        Some(HandBack {
            lane: self.lanes.get(index)?,
            poller: self.poller_wakers.get(index)?,
            then,
        })
    }

    /// Run-to-completion mode: asks for one wake of `waker` by the next
    /// completion of CQ `index` (whichever queue pair it is for), beside the
    /// front end's; one such waker per CQ, a later one replaces it. Returns
    /// true if completions are waiting already (poll rather than sleep; the
    /// request stays). While an earlier request has not been woken yet, the
    /// CQ is still armed and this only swaps the waker. Threads mode: the
    /// pollers reap every completion, there is nothing to arm: false.
    pub fn arm_once(&self, index: usize, waker: &Arc<dyn Waker>) -> bool {
        let (Some(wake), Some(cq)) = (self.wakes.get(index), self.cqs.get(index)) else {
            return false;
        };
        *wake.once.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
        if wake.armed_once.swap(true, Ordering::SeqCst) {
            return false;
        }
        cq.arm()
    }

    /// Stops and joins the poller threads. Idempotent.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let pollers =
            std::mem::take(&mut *self.pollers.lock().unwrap_or_else(PoisonError::into_inner));
        for mut p in pollers {
            p.waker.unpark();
            if let Some(h) = p.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How long a threads-mode poller leaves its CQ to the threads that wait
/// before it looks again (`lane`): about the longest a completion nobody
/// waits for waits once the last waiter left.
pub const STEP_ASIDE: Duration = Duration::from_micros(200);

/// Completions reaped per poll call at most (reap buffer size).
pub const POLL_BATCH: usize = 64;

/// The buffer [`Progress::drain`] reaps into.
pub type ReapBuf = [WorkCompletion; POLL_BATCH];

struct PollerCtx {
    cq: Arc<dyn CompletionQueue>,
    producer: Producer<WorkCompletion>,
    /// Who reaps the CQ: this thread, or a waiter (module docs).
    lane: Arc<Lane<WorkCompletion>>,
    waker: Arc<ParkWaker>,
    front: Arc<dyn Waker>,
    stop: Arc<AtomicBool>,
    spin_budget: u32,
    spin_pause: bool,
    batch: usize,
    core: Option<usize>,
}

impl PollerCtx {
    fn run(mut self) {
        if let Some(id) = self.core {
            // Best effort: a core missing from this machine leaves the thread
            // unpinned.
            core_affinity::set_for_current(core_affinity::CoreId { id });
        }
        self.waker.register_current();
        let mut buf = [WorkCompletion::EMPTY; POLL_BATCH];
        let mut idle = IdleLoop::new(self.spin_budget).with_pause(self.spin_pause);
        let mut seen = self.lane.passes();
        let stop = || self.stop.load(Ordering::SeqCst);
        while !self.stop.load(Ordering::Relaxed) {
            // Waiters reap the CQ themselves: leave it (and the cores) to
            // them for a step.
            if self
                .lane
                .step_aside(&mut seen, false, &*self.waker, STEP_ASIDE, stop)
            {
                idle.progress();
                continue;
            }
            let free = self.producer.free();
            if free == 0 {
                // Ring full: leave completions in the CQ until the front end
                // catches up. Back off rather than spin; the front end wakes
                // nobody when it makes room, so no arming here.
                self.front.wake();
                if idle.within_budget() {
                    std::thread::yield_now();
                } else {
                    std::thread::park_timeout(Duration::from_micros(200));
                }
                continue;
            }
            let Some(reaping) = self.lane.try_reap() else {
                // A waiter holds the CQ: step aside, unless a waiter
                // sleeps (then this is an empty poll).
                if !self
                    .lane
                    .step_aside(&mut seen, true, &*self.waker, STEP_ASIDE, stop)
                {
                    idle.idle(&*self.waker, None, || self.cq.arm() || stop());
                }
                continue;
            };
            let n = self.cq.poll(&mut buf[..free.min(self.batch)]);
            if n > 0 {
                let pushed = self.producer.push_slice(&buf[..n]);
                debug_assert_eq!(pushed, n, "ring had room for what was reaped");
                // Give the CQ back before the wake: the dispatcher's
                // re-check (or a waiter) may find the lane free at once.
                drop(reaping);
                self.front.wake();
                idle.progress();
                continue;
            }
            drop(reaping);
            idle.idle(&*self.waker, None, || self.cq.arm() || stop());
        }
    }
}

/// loom models of the idle loop's no-lost-wake-up rule: a sleeper in an
/// [`IdleLoop`] on a "work published" word, against wakers that publish,
/// then wake. A lost wake-up leaves the sleeper parked for good, which loom
/// reports as a deadlock.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::sync::{thread, Arc, AtomicUsize, Ordering};

    /// [`ParkWaker`] with the modelled thread's park: the same
    /// [`SleepFlag`], and a park that has no timeout (a timed sleep is
    /// modelled as one only a wake ends: the model must not depend on the
    /// timeout).
    #[derive(Default)]
    pub(super) struct LoomPark {
        sleeping: SleepFlag,
        /// Set by the sleeper before it first announces a sleep.
        pub(super) thread: OnceLock<thread::Thread>,
    }

    impl Sleep for LoomPark {
        type Ticket<'a> = ();

        fn announce(&self) {
            self.sleeping.raise();
        }

        fn cancel(&self, (): ()) {
            self.sleeping.lower();
        }

        fn sleep(&self, (): (), _deadline: Option<Instant>) {
            thread::park();
            self.sleeping.lower();
        }
    }

    impl LoomPark {
        /// Unparks the thread, if it registered (the model's stop).
        pub(super) fn unpark(&self) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }

    /// As [`ParkWaker`]'s.
    impl Waker for LoomPark {
        fn wake(&self) {
            if self.sleeping.is_raised() {
                self.thread.get().expect("registered").unpark();
            }
        }
    }

    /// A sleeper thread idles until `work` reaches `wakers`; as many
    /// threads each publish one unit of work, then wake it. (The sleeper
    /// is a spawned thread, not the model's main one, because loom's `join`
    /// on a thread that parked trips an assertion of loom's own:
    /// tokio-rs/loom#249.)
    fn sleeper_against(wakers: usize, spin_budget: u32) {
        let park = Arc::new(LoomPark::default());
        let work = Arc::new(AtomicUsize::new(0));
        let sleeper = {
            let (park, work) = (park.clone(), work.clone());
            thread::spawn(move || {
                let _ = park.thread.set(thread::current());
                let mut idle = IdleLoop::new(spin_budget);
                let mut seen = 0;
                while seen < wakers {
                    let now = work.load(Ordering::Acquire);
                    if now > seen {
                        seen = now;
                        idle.progress();
                        continue;
                    }
                    let rechecked = || work.load(Ordering::Acquire) > seen;
                    if idle.idle(&*park, None, rechecked) == Idled::Spun {
                        thread::yield_now();
                    }
                }
            })
        };
        let handles: Vec<_> = (0..wakers)
            .map(|_| {
                let (park, work) = (park.clone(), work.clone());
                thread::spawn(move || {
                    work.fetch_add(1, Ordering::Release);
                    park.wake();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        sleeper.join().unwrap();
    }

    /// One waker; the sleeper goes straight to sleep (the upcall helper).
    #[test]
    fn loom_idle_one_waker() {
        crate::sync::model("idle_one_waker", 3, || sleeper_against(1, 0));
    }

    /// Two wakers, one spin before each sleep: the sleeper may wake
    /// for the first unit of work and must sleep again for the second.
    #[test]
    fn loom_idle_two_wakers_after_a_spin() {
        crate::sync::model("idle_two_wakers_after_a_spin", 3, || sleeper_against(2, 2));
    }
}
