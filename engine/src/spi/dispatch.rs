//! Completion dispatch: how a work completion becomes the op's result.
//!
//! One receive's way out: a CQ is drained by [`Inner::progress`] (on a
//! thread that waits for or polls an op of the socket, in either mode; in
//! threads mode also on the dispatcher thread, from the rings the poller
//! threads fill while nobody waits, `poller.rs`) → [`Inner::dispatch`] takes the op's state out of its
//! slot, frees its registrations, writes the overlapped result and makes the
//! one `complete_overlapped_request` upcall (or stores the result for a
//! polled op) → the op leaves the socket's close gate (`close.rs`).
//!
//! A thread that dispatches may be inside an upcall: its reap buffer is
//! borrowed then ([`dispatching`]), which refuses nested progress on it, so
//! per-socket completion order holds, and waits only it could satisfy do not
//! block.

use super::dup_state::DupCompletion;
use super::ops::{release_done_regs, OpState, OvPtr};
use super::socket::{OpSocket, Socket};
use super::{lock, Inner, Overlapped, Provider, ProviderSocket, Running};
use crate::coarse::CoarseDeadline;
use crate::config::PollerMode;
use crate::error::{WsaError, WsaResult};
use crate::fabric::{Waker, WcStatus, WorkCompletion};
use crate::poller::{IdleLoop, Idled, ReapBuf, Sleep, POLL_BATCH};
use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the run-to-completion upcall helper first leaves a completion
/// to the threads that poll before it reports it itself (see
/// `Inner::upcall_helper_main`): the delay of an upcall nobody polled for.
const HELPER_STEP_ASIDE: Duration = Duration::from_micros(200);

/// The longest step the upcall helper takes aside while other threads keep
/// reaping: each step in which they reaped doubles the next one up to this.
/// It bounds the delay of an upcall on a CQ that none of those threads
/// polls, and the helper's wake-ups are then one per this long, not one
/// per [`HELPER_STEP_ASIDE`] (a wake-up takes a core from a polling thread;
/// under emulation, as in the Soft-RoCE VM, it costs tens of
/// microseconds).
const HELPER_STEP_ASIDE_MAX: Duration = Duration::from_micros(3200);

/// How long the upcall helper first steps aside after a wake: it learns
/// from its last wakes how long the polling threads leave the CQs alone.
///
/// Each wake starts at the step the last one ended with (the others reaped
/// through every shorter one), so a helper woken again and again while
/// threads poll, with gaps between their reaps longer than
/// [`HELPER_STEP_ASIDE`] (a ping-pong in the Soft-RoCE VM: a round trip
/// there is hundreds of microseconds, longer with a preemption), soon stays
/// aside [`HELPER_STEP_ASIDE_MAX`] at a time instead of arming the CQs and
/// being woken once per message, which cost each side of a stream
/// ping-pong there a CQ arm (an `ioctl`), a completion event and two
/// thread wake-ups (on the vCPUs the spinning threads run on) per
/// iteration or two. A pass in which the helper itself reports a
/// completion (nobody else polled for it) halves the first step again, down
/// to [`HELPER_STEP_ASIDE`]: a helper that is the only reaper keeps
/// reporting within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FirstStep(Duration);

impl FirstStep {
    fn new() -> FirstStep {
        FirstStep(HELPER_STEP_ASIDE)
    }

    /// The step after `step`, in which the others reaped.
    fn after(step: Duration) -> Duration {
        (step * 2).min(HELPER_STEP_ASIDE_MAX)
    }

    /// The helper left its steps aside with a step of `last` in which
    /// nobody reaped: the next wake starts there.
    fn left_at(&mut self, last: Duration) {
        debug_assert!((HELPER_STEP_ASIDE..=HELPER_STEP_ASIDE_MAX).contains(&last));
        self.0 = last;
    }

    /// The helper's own pass reported completions nobody polled for.
    fn reported(&mut self) {
        self.0 = (self.0 / 2).max(HELPER_STEP_ASIDE);
    }
}

thread_local! {
    /// The buffer this thread's progress reaps into, borrowed while the
    /// thread dispatches completions (and so may be inside an upcall):
    /// borrowed, it says so ([`dispatching`]), nested progress is refused so
    /// per-socket completion order holds, and waits that only this thread
    /// could satisfy do not block. One thread-local for both: a pass takes
    /// the borrow once. Initialised once: a pass that finds nothing writes
    /// no memory for it.
    static REAP: RefCell<ReapBuf> = const { RefCell::new([WorkCompletion::EMPTY; POLL_BATCH]) };
}

/// Whether this thread dispatches completions now (see [`REAP`]).
pub(super) fn dispatching() -> bool {
    REAP.with(|r| r.try_borrow_mut().is_err())
}

/// Runs `f` as a dispatch (see [`REAP`]): `dispatching()` holds inside
/// (and stops holding when `f` returns, even by a panic of an upcall).
pub(super) fn as_dispatch<R>(f: impl FnOnce() -> R) -> R {
    REAP.with(|r| {
        let _held = r.try_borrow_mut();
        f()
    })
}

impl Provider {
    /// `WSPGetOverlappedResult`: `(bytes, flags)` of a completed op, the op's
    /// error if it failed, `WSA_IO_INCOMPLETE` if pending and `!wait`. With
    /// `wait` it waits for the op itself, not for `hEvent` (§7-7); called
    /// from inside an upcall it does not wait (nothing could complete).
    pub fn get_overlapped_result(
        &self,
        s: ProviderSocket,
        ov: &Overlapped,
        wait: bool,
    ) -> WsaResult<(u32, u32)> {
        if !ov.is_pending() {
            // Reported already: only the descriptor needs checking (CLOSE-7),
            // and a load does that; a pin would cost two locked instructions.
            if !self.inner.sockets.is_live(s) {
                return Err(WsaError::WSAENOTSOCK);
            }
            return overlapped_result(ov);
        }
        // Neither a pin nor the provider's `running` lock: the wait needs
        // the socket's CQ, which its table slot tells, and the engine, which
        // this thread's cache of it holds.
        let cq = self.inner.sockets.live_cq(s).ok_or(WsaError::WSAENOTSOCK)?;
        let waited = self
            .inner
            .with_running(|run| self.wait_pending(run, cq, ov, wait));
        match waited {
            Some(r) => r,
            None => {
                let sock = self.inner.pin(s)?;
                self.wait_pending(&sock.run, sock.cq_index(), ov, wait)
            }
        }
    }

    /// [`Provider::get_overlapped_result`] of an op that was pending a
    /// moment ago, on CQ `cq` of engine `run`.
    #[inline(always)]
    fn wait_pending(
        &self,
        run: &Running,
        cq: Option<usize>,
        ov: &Overlapped,
        wait: bool,
    ) -> WsaResult<(u32, u32)> {
        // The caller that polls makes the progress: in run-to-completion
        // mode a polled op (hEvent bit 0 set) has no other thread to
        // report it; in threads mode this saves the handoff through the
        // poller and dispatcher threads. Not checked again first: should
        // another thread have reported the op since, this only reaps.
        self.inner.progress(run, cq);
        if ov.is_pending() {
            if !wait || dispatching() {
                return Err(WsaError::WSA_IO_INCOMPLETE);
            }
            self.inner.wait_for(run, None, cq, || !ov.is_pending());
        }
        overlapped_result(ov)
    }

    /// Reaps and dispatches available completions on the calling thread
    /// (run-to-completion mode; harmless in threads mode). Returns how many
    /// were dispatched; 0 when called from inside an upcall.
    pub fn progress(&self) -> usize {
        match self.inner.running() {
            Ok(run) => self.inner.progress(&run, None),
            Err(_) => 0,
        }
    }

    /// Like [`Provider::progress`], but in run-to-completion mode polls only
    /// the completion queue of socket `s`: the thread that waits for `s`'s
    /// ops polls its own CQ, without touching other threads' CQs.
    pub fn progress_socket(&self, s: ProviderSocket) -> usize {
        // As a pending op's wait: the CQ from the socket's table slot (a
        // load) and the engine from this thread's cache of it, so a thread
        // spinning on its socket takes neither a pin (two locked
        // instructions a poll) nor a provider-wide lock.
        let Some(cq) = self.inner.sockets.live_cq(s) else {
            return 0;
        };
        match self.inner.with_running(|run| self.inner.progress(run, cq)) {
            Some(n) => n,
            None => match self.inner.pin(s) {
                Ok(sock) => self.inner.progress(&sock.run, sock.cq_index()),
                Err(_) => 0,
            },
        }
    }

    /// Run-to-completion mode: asks for one wake of `waker` by the next
    /// completion queued on socket `s`'s completion queue, so that a
    /// program that waits for several sockets outside the provider (epoll)
    /// learns when to make progress with [`Provider::progress_socket`]. The
    /// CQ may serve other sockets too: any of their completions wakes it.
    /// One such waker per CQ (a later call replaces it); the waker runs on
    /// the thread that completes the request, must not call the provider,
    /// and is woken once per arm. Returns true if completions are waiting
    /// already (poll them instead; the arm stays). Threads mode: `false`,
    /// nothing to arm (the dispatcher reports every completion).
    pub fn arm_socket(&self, s: ProviderSocket, waker: &Arc<dyn Waker>) -> WsaResult<bool> {
        let sock = self.inner.pin(s)?;
        Ok(match sock.cq_index() {
            Some(i) => sock.run.progress.arm_once(i, waker),
            None => false,
        })
    }
}

/// The result `dispatch` wrote into a reported op's overlapped record:
/// `(bytes, flags)`, or the op's error.
fn overlapped_result(ov: &Overlapped) -> WsaResult<(u32, u32)> {
    let error = ov.offset_high.load(Ordering::Acquire);
    let bytes = ov.internal_high.load(Ordering::Acquire) as u32;
    let flags = ov.offset.load(Ordering::Acquire);
    match error {
        0 => Ok((bytes, flags)),
        e => Err(WsaError::from_code(e as i32).unwrap_or(WsaError::WSAECONNABORTED)),
    }
}

/// A completion's `(error, bytes)` for a socket that is not being closed.
fn completion_result(wc: &WorkCompletion, sock: &Socket) -> (u32, u32) {
    if wc.status == WcStatus::Success {
        (0, wc.byte_len)
    } else {
        (completion_error(wc.status, sock).code() as u32, 0)
    }
}

/// Work-completion status → the op's Winsock error (§7-5, §7-8), for a
/// socket that is not being closed.
fn completion_error(status: WcStatus, sock: &Socket) -> WsaError {
    let code = match status {
        WcStatus::Success => unreachable!("success has no error"),
        WcStatus::Flushed => return sock.failure().unwrap_or(WsaError::WSAECONNABORTED),
        WcStatus::RemoteDisconnected
        | WcStatus::RemoteAccessError
        | WcStatus::RemoteInvalidRequest => WsaError::WSAECONNRESET,
        WcStatus::LocalLengthError
        | WcStatus::LocalProtectionError
        | WcStatus::RnrRetryExceeded
        | WcStatus::RetryExceeded => WsaError::WSAECONNABORTED,
    };
    sock.record_failure(code);
    sock.failure().unwrap_or(code)
}

/// Empties a claimed op's state (in its slot): releases its registrations
/// first (CLOSE-4: the op's memory goes before it is signalled) and returns
/// its socket pin and overlapped record. For a socket in a duplication it
/// moves the whole state into `engaged` instead (`dup.rs` may park it or
/// post it again) and returns `None`.
#[inline(always)]
fn take_op(op: &mut OpState, engaged: &mut Option<OpState>) -> Option<(OpSocket, OvPtr)> {
    // SAFETY: the op is claimed and not yet reported: it is still in its
    // socket's close gate.
    let socket = unsafe { op.socket.get() };
    if socket.dup.engaged() && !socket.gate.is_closing() {
        *engaged = Some(std::mem::take(op));
        return None;
    }
    release_done_regs(&mut op.regs);
    Some((op.take_socket(), op.overlapped))
}

/// Writes a finished op's result into its overlapped record and makes the
/// upcall, or stores the result for polling (`hEvent` bit 0).
#[inline(always)]
fn signal(run: &Running, socket: &Socket, ov: &Overlapped, error: u32, bytes: u32) {
    ov.offset.store(0, Ordering::Relaxed);
    ov.offset_high.store(error, Ordering::Release);
    if ov.wants_upcall() {
        let _ = run
            .switch
            .complete_overlapped_request(socket.handle, ov, error, bytes);
    } else {
        ov.complete(error, bytes);
    }
}

impl Inner {
    /// Run-to-completion mode: starts the upcall helper if it is not
    /// running. An op that wants an upcall must get it even if the switch
    /// never calls the provider again (it may just wait for the upcall).
    /// Threads mode: nothing (`helper_started` is set from the start).
    #[inline]
    pub(super) fn ensure_upcall_helper(self: &Arc<Self>, run: &Arc<Running>) -> WsaResult<()> {
        if run.helper_started.load(Ordering::Acquire) {
            return Ok(());
        }
        debug_assert_eq!(self.config.poller.mode, PollerMode::RunToCompletion);
        self.start_upcall_helper(run)
    }

    #[cold]
    #[inline(never)]
    fn start_upcall_helper(self: &Arc<Self>, run: &Arc<Running>) -> WsaResult<()> {
        let mut slot = lock(&run.dispatcher);
        if run.helper_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let inner = self.clone();
        let r = run.clone();
        let h = std::thread::Builder::new()
            .name("sanpath-upcalls".into())
            .spawn(move || inner.upcall_helper_main(&r))
            .map_err(|_| WsaError::WSAENOBUFS)?;
        *slot = Some(h);
        run.helper_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Applies one completion, in the op's slot: frees the op's memory,
    /// frees the slot, then writes the result, makes the upcall (or stores
    /// the result for polling), and lets close proceed.
    #[inline]
    pub(super) fn dispatch(&self, run: &Running, wc: &WorkCompletion) {
        // No op: a close that abandoned its queue pair completed it already
        // (`close.rs`), and the NIC still delivered its completion.
        let mut engaged = None;
        let Some(taken) = self.ops.complete(wc.wr_id, |op| take_op(op, &mut engaged)) else {
            return;
        };
        match taken {
            Some((socket, overlapped)) => {
                self.finish_taken(run, socket, overlapped, wc.status, wc.byte_len)
            }
            None => self.dispatch_engaged_op(run, wc.status, wc.byte_len, engaged),
        }
    }

    /// Completes `op`, taken out of its slot by a close's scan, with
    /// `status` (`byte_len` if it succeeded), as [`Inner::dispatch`] does.
    pub(super) fn finish_op(
        &self,
        run: &Running,
        mut op: OpState,
        status: WcStatus,
        byte_len: u32,
    ) {
        let mut engaged = None;
        match take_op(&mut op, &mut engaged) {
            Some((socket, overlapped)) => {
                self.finish_taken(run, socket, overlapped, status, byte_len)
            }
            None => self.dispatch_engaged_op(run, status, byte_len, engaged),
        }
    }

    /// The rest of a completion, once `take_op` emptied the op's state:
    /// signals it, then it leaves its socket's close gate. Every completed
    /// op, whoever took it, ends here (or in [`Inner::report`]).
    #[inline(always)]
    fn finish_taken(
        &self,
        run: &Running,
        op_socket: OpSocket,
        overlapped: OvPtr,
        status: WcStatus,
        byte_len: u32,
    ) {
        // SAFETY: the op is in the socket's close gate until `op_finished`
        // below, the socket's last use here.
        let socket: &Socket = unsafe { op_socket.get() };
        let (error, bytes) = if socket.gate.is_closing() {
            (WsaError::WSA_OPERATION_ABORTED.code() as u32, 0)
        } else if status == WcStatus::Success {
            (0, byte_len)
        } else {
            (completion_error(status, socket).code() as u32, 0)
        };
        if error != 0 {
            self.counters.failed(error);
        }
        signal(run, socket, overlapped.get(), error, bytes);
        self.op_finished(socket);
    }

    /// [`Inner::dispatch_engaged`] of the state `take_op` moved out.
    #[cold]
    #[inline(never)]
    fn dispatch_engaged_op(
        &self,
        run: &Running,
        status: WcStatus,
        byte_len: u32,
        op: Option<OpState>,
    ) {
        let op = op.expect("take_op moved the engaged op's state out");
        self.dispatch_engaged(run, status, byte_len, op);
    }

    /// [`Inner::dispatch`] for a socket taking part in a duplication.
    fn dispatch_engaged(&self, run: &Running, status: WcStatus, byte_len: u32, op: OpState) {
        let wc = WorkCompletion {
            status,
            byte_len,
            ..WorkCompletion::EMPTY
        };
        // SAFETY: the op stays in the close gate until it is reported (or
        // for as long as it stays parked).
        let socket: &Socket = unsafe { &*(op.socket.get() as *const Socket) };
        let (op, error, bytes) = match self.dup_completion(socket, &wc, op) {
            DupCompletion::Parked => return,
            DupCompletion::Report(op, error, bytes) => (op, error, bytes),
            DupCompletion::Normal(op) if socket.gate.is_closing() => {
                (op, WsaError::WSA_OPERATION_ABORTED.code() as u32, 0)
            }
            DupCompletion::Normal(op) => {
                let (error, bytes) = completion_result(&wc, socket);
                (op, error, bytes)
            }
        };
        self.report_and(run, op, error, bytes, |s| self.dup_settled(s));
    }

    /// Reports a finished op with `error` (a Winsock code, 0 for success)
    /// and `bytes`: frees its state, writes the overlapped result, makes the
    /// upcall (or stores the result for polling), then lets close proceed.
    pub(super) fn report(&self, run: &Running, op: OpState, error: u32, bytes: u32) {
        self.report_and(run, op, error, bytes, |_| {});
    }

    /// [`Inner::report`], running `then` on the socket after the op left
    /// its close gate.
    fn report_and(
        &self,
        run: &Running,
        mut op: OpState,
        error: u32,
        bytes: u32,
        then: impl FnOnce(&Socket),
    ) {
        // The op's private memory goes first (CLOSE-4).
        release_done_regs(&mut op.regs);
        let op_socket = op.take_socket();
        // SAFETY: the op is in the close gate until `op_finished` below,
        // and a socket is always an `Arc`'s (`SocketTable::publish`): while
        // it is not finalized that `Arc` lives, so one more reference may
        // be taken, which keeps the socket for `then` (a cold path).
        let socket: Arc<Socket> = unsafe {
            let ptr: *const Socket = op_socket.get();
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        };
        signal(run, &socket, op.overlapped.get(), error, bytes);
        self.op_finished(&socket);
        then(&socket);
    }

    /// Reaps and dispatches on this thread (run-to-completion: only CQ
    /// `only` if given); 0 if already dispatching.
    pub(super) fn progress(&self, run: &Running, only: Option<usize>) -> usize {
        let total = REAP.with(|buf| match buf.try_borrow_mut() {
            Ok(mut buf) => run
                .progress
                .drain(&mut buf, only, &mut |wc| self.dispatch(run, wc)),
            // Dispatching already.
            Err(_) => 0,
        });
        if total > 0 {
            match self.config.poller.mode {
                // Only the upcall helper reads `reaped`, and only whether it
                // moved: a lost update of two racing passes still moves it,
                // so a load and a store do, without a locked instruction.
                PollerMode::RunToCompletion => {
                    if run.helper_started.load(Ordering::Relaxed) {
                        let r = run.reaped.load(Ordering::Relaxed);
                        run.reaped.store(r.wrapping_add(1), Ordering::Relaxed);
                    }
                }
                PollerMode::Threads => self.completed.notify(),
            }
        }
        total
    }

    /// Waits until `done()` or `deadline`, making progress itself (on CQ
    /// `only` if given; in threads mode only then, as long as it spins, and
    /// it hands the CQ back to its poller before it sleeps). Returns
    /// `done()`.
    pub(super) fn wait_for(
        &self,
        run: &Running,
        deadline: Option<Instant>,
        only: Option<usize>,
        done: impl FnMut() -> bool,
    ) -> bool {
        match self.config.poller.mode {
            PollerMode::Threads => {
                let Some(sleep) = only.and_then(|i| run.progress.waiter_sleep(i, &self.completed))
                else {
                    return self.completed.wait_until(deadline, done);
                };
                let idle = IdleLoop::new(self.config.poller.spin_budget)
                    .with_pause(self.config.poller.spin_pause);
                // The dispatcher (or another waiter) reports an op: `done`
                // becomes true with a notify.
                self.spin_then_sleep(run, deadline, only, idle, &sleep, || false, done)
            }
            PollerMode::RunToCompletion => {
                let idle = IdleLoop::new(self.config.poller.spin_budget)
                    .with_pause(self.config.poller.spin_pause)
                    .with_guard(Duration::from_millis(50));
                // An armed CQ's completion (or another thread's dispatch)
                // wakes the sleeper.
                let arm = || run.progress.arm_only(only);
                self.spin_then_sleep(run, deadline, only, idle, &*run.rtc_notifier, arm, done)
            }
        }
    }

    /// [`Inner::wait_for`]'s loop: makes progress on CQ `only` while it
    /// finds completions, spins `idle`'s budget, then sleeps on `sleeper`
    /// (bounded by `deadline`) unless `arm()` (which arms what wakes the
    /// sleeper) or `done()` says to look again. Returns `done()`.
    ///
    /// The deadlines are close bounds (`close.wait_ms`, 100 ms by default,
    /// and the quiesce timeout): the spin checks them on every pass against
    /// the coarse clock ([`CoarseDeadline`], up to three ticks late, never
    /// early), where the fine clock would be a system call per poll in a
    /// VM whose clock source the vDSO cannot read; after a sleep, which
    /// costs a system call anyway, against the fine clock, so that a sleep
    /// to the deadline ends the wait.
    #[allow(clippy::too_many_arguments)]
    fn spin_then_sleep<S: Sleep + ?Sized>(
        &self,
        run: &Running,
        deadline: Option<Instant>,
        only: Option<usize>,
        mut idle: IdleLoop,
        sleeper: &S,
        arm: impl Fn() -> bool,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let spin_bound =
            deadline.map(|d| CoarseDeadline::after(d.saturating_duration_since(Instant::now())));
        loop {
            if done() {
                return true;
            }
            if spin_bound.is_some_and(|d| d.passed()) {
                return done();
            }
            if self.progress(run, only) > 0 {
                idle.progress();
                continue;
            }
            if idle.idle(sleeper, deadline, || arm() || done()) == Idled::Slept
                && deadline.is_some_and(|d| Instant::now() >= d)
            {
                return done();
            }
        }
    }

    pub(super) fn dispatcher_main(self: Arc<Self>, run: &Arc<Running>, core: Option<usize>) {
        if let Some(id) = core {
            core_affinity::set_for_current(core_affinity::CoreId { id });
        }
        run.dispatcher_waker.register_current();
        let mut idle =
            IdleLoop::new(self.config.poller.spin_budget).with_pause(self.config.poller.spin_pause);
        while !run.stop.load(Ordering::SeqCst) {
            if self.progress(run, None) > 0 {
                idle.progress();
                continue;
            }
            idle.idle(&*run.dispatcher_waker, None, || {
                run.progress.arm() || run.stop.load(Ordering::SeqCst)
            });
        }
        // Completions still queued at shutdown were already reported by the
        // closes that ran before; drain whatever is left.
        self.progress(run, None);
    }

    /// Run-to-completion mode's upcall helper: reports what no other
    /// thread reported, sleeping on the armed CQs meanwhile; it never
    /// spins. Woken by a completion, it first gives the threads that poll a
    /// step ([`FirstStep`]: [`HELPER_STEP_ASIDE`], longer while its recent
    /// wakes found them reaping) to reap it, and stays aside while they keep
    /// reaping: it arms the CQs again only after a whole step in which
    /// nobody else reaped, since an armed CQ costs the thread that completes
    /// a request a wake-up, which a thread polling for its own ops must not
    /// pay per op. While they reap, each step is twice the last, up to
    /// [`HELPER_STEP_ASIDE_MAX`], and after each the helper polls every CQ
    /// once: a thread polls only its own socket's CQ, so a completion on a
    /// CQ that nobody polls is reported within that bound, however long
    /// the others keep reaping theirs.
    pub(super) fn upcall_helper_main(self: Arc<Self>, run: &Arc<Running>) {
        let mut idle = IdleLoop::new(0);
        let mut first = FirstStep::new();
        while !run.stop.load(Ordering::SeqCst) {
            if self.progress(run, None) > 0 {
                // A thread in `wait_for` may sleep on the CQs' notifier for
                // an op this pass reported.
                run.rtc_notifier.notify();
                first.reported();
            }
            let mut seen = run.reaped.load(Ordering::Relaxed);
            // No spin budget: the helper only ever sleeps; stop ends the
            // loop. Woken by a completion, or finding completions in a CQ
            // as it arms them (they may be a polling thread's, which is
            // reaping them now), it steps aside all the same: looking again
            // at once made a helper among threads that poll a spinner of
            // CQ arms (an `ioctl` each on rxe) and yields, several per
            // message of a stream ping-pong in the Soft-RoCE VM.
            idle.idle(&*run.rtc_notifier, None, || {
                run.stop.load(Ordering::SeqCst) || run.progress.arm()
            });
            let mut step = first.0;
            while !run.stop.load(Ordering::SeqCst) {
                std::thread::park_timeout(step);
                if run.reaped.load(Ordering::Relaxed) == seen {
                    break;
                }
                if self.progress(run, None) > 0 {
                    run.rtc_notifier.notify();
                }
                // After this pass's own count: only the others' reaping
                // keeps the helper aside.
                seen = run.reaped.load(Ordering::Relaxed);
                step = FirstStep::after(step);
            }
            first.left_at(step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_step_grows_while_others_reap_and_shrinks_when_the_helper_reports() {
        let mut first = FirstStep::new();
        assert_eq!(first.0, HELPER_STEP_ASIDE);
        // Woken; the others reaped through two steps, not the third.
        let mut step = first.0;
        for _ in 0..2 {
            step = FirstStep::after(step);
        }
        first.left_at(step);
        assert_eq!(first.0, HELPER_STEP_ASIDE * 4);
        // They keep reaping, wake after wake: the first step stops at the
        // bound on an unpolled CQ's upcall delay.
        for _ in 0..10 {
            first.left_at(FirstStep::after(first.0));
        }
        assert_eq!(first.0, HELPER_STEP_ASIDE_MAX);
        // Passes that report what nobody polled for come back to the start.
        first.reported();
        assert_eq!(first.0, HELPER_STEP_ASIDE_MAX / 2);
        for _ in 0..10 {
            first.reported();
        }
        assert_eq!(first.0, HELPER_STEP_ASIDE);
    }
}
