//! A connection of the reference switch: the protocol machine of one
//! socket ([`super::proto::Connection`]) driven by whichever thread has a
//! completion or an application call for it, and the threads waiting on it.
//!
//! Upcalls leave each completion in the connection's inbox and feed it to
//! the machine unless another thread holds the machine, which then feeds it
//! before it lets go: an upcall never waits for a lock of ours (also when an
//! SPI call made under that lock dispatches completions inline). Executing
//! the machine's actions (posting receives and sends, copying, exposing,
//! RDMA) happens there and then, through [`Wire`] (`io.rs`, the switch's
//! unsafe).
//!
//! The thread that waits makes the progress: a blocked call polls its own
//! connection's completion queue (`Provider::progress_socket`, which makes
//! the upcalls on that thread), spins up to `poller.spin_budget` empty
//! polls, then sleeps on the connection's notifier (in run-to-completion
//! mode after arming the completion queue with the runtime's [`CqWake`], so
//! that the next completion there wakes it). Sleepers are woken only
//! when something they wait for happened (an op of theirs completed, the
//! session opened or failed, a cancellation); a send completion wakes no
//! one. In run-to-completion mode this is the whole data path while the
//! threads poll (sleepers arm their CQ, see [`Conn::wait_until`]); in threads mode the
//! provider's dispatcher makes the upcalls for connections whose threads
//! sleep. A stream with a readiness fd (`super::ready`) also has its fd
//! written, after the unlock, when an event was fed that may let one of
//! its waiting non-blocking operations go on (`State::want`,
//! `State::events`). No lock of ours is held
//! across a provider call that could wait for an upcall (`close_socket` is
//! always made with the connection unlocked).

use super::inbox_lock::{Held, InboxLock};
use super::io::{AppBuf, OvKind, Owner, Wire};
use super::proto::{self, Action, CancelOutcome, Connection, OpId, Role};
use super::ready::{self, Hub, Readiness};
use super::regcache::{RegCache, RegUse};
use crate::coarse::CoarseDeadline;
use crate::config::PollerMode;
use crate::error::WsaError;
use crate::fabric::Waker;
use crate::poller::Notifier;
use crate::spi::{Provider, ProviderSocket};
use std::cell::Cell;
use std::io;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

/// RDMA ops a connection may have in flight.
pub(super) const RDMA_SLOTS: u16 = 4;

/// First nap of a waiting thread in run-to-completion mode.
const NAP_MIN: Duration = Duration::from_micros(20);
/// Longest nap of a waiting thread in run-to-completion mode: the most a
/// sleeping thread adds to the latency of a completion nobody else polls.
const NAP_MAX: Duration = Duration::from_millis(1);
/// A spinning waiter first checks its deadline after this many empty polls
/// (and always before it sleeps), then at each doubling of its empty
/// polls up to [`CLOCK_MAX_EVERY`].
const CLOCK_FIRST: u32 = 1024;
/// Empty polls between two deadline checks of a long spin.
const CLOCK_MAX_EVERY: u32 = 1 << 16;

/// Whether a wait that has spun `idle` empty polls reads the clock: at
/// [`CLOCK_FIRST`], at each doubling, then every [`CLOCK_MAX_EVERY`]. A
/// spin overshoots its deadline by at most as many polls as it had spun
/// when it last looked (and at most [`CLOCK_MAX_EVERY`]); a wait that
/// sleeps reads the clock before each sleep anyway.
fn clock_due(idle: u32) -> bool {
    idle >= CLOCK_FIRST && (idle.is_power_of_two() || idle % CLOCK_MAX_EVERY == 0)
}

/// When a wait gives up: a [`CoarseDeadline`], which reads the kernel's
/// coarse clock (a vDSO read of the timekeeping page, never a system call)
/// and passes up to three ticks late, never early: the bounds here detect a
/// silent peer or a stuck transfer (handshake, close and RDMA cancellation
/// bounds of seconds, and the streams' read and write timeouts, which like
/// `SO_RCVTIMEO`'s promise no precision). Even so it is read only once a
/// wait has spun [`CLOCK_FIRST`] empty polls (or sleeps), and ever more
/// rarely as it spins on: most waits of a stream's call end before that.
/// The fine clock (`Instant`) is read only to bound a sleep, whose naps of
/// [`NAP_MIN`] to [`NAP_MAX`] are shorter than a tick.
#[derive(Clone, Copy, Debug)]
pub(super) enum Deadline {
    /// Never.
    Never,
    /// When this passes.
    At(CoarseDeadline),
    /// This long after the wait first read the clock: the bound counts
    /// from the first check, at most [`CLOCK_FIRST`] polls after the call
    /// began.
    After(Duration),
}

impl Deadline {
    /// A call's bound: `None` waits for ever.
    pub(super) fn after(timeout: Option<Duration>) -> Deadline {
        timeout.map_or(Deadline::Never, Deadline::After)
    }

    /// `timeout` from now.
    pub(super) fn within(timeout: Duration) -> Deadline {
        Deadline::At(CoarseDeadline::after(timeout))
    }

    /// At `at` of the fine clock (one reading of it, now).
    pub(super) fn until(at: Instant) -> Deadline {
        Deadline::within(at.saturating_duration_since(Instant::now()))
    }

    /// Whether it passed (the first check of an `After` starts it); `Never`
    /// reads no clock.
    fn passed(&mut self) -> bool {
        match *self {
            Deadline::Never => false,
            Deadline::At(d) => d.passed(),
            Deadline::After(t) => {
                *self = Deadline::within(t);
                false
            }
        }
    }

    /// The time left, once known: at least what is left on the fine clock.
    fn remaining(&self) -> Option<Duration> {
        match *self {
            Deadline::At(d) => Some(d.remaining()),
            Deadline::Never | Deadline::After(_) => None,
        }
    }
}

/// What a connection holds for one of its ops: the application buffer it
/// lent, until the op completes; then its result, until the call takes it.
#[derive(Clone, Copy)]
enum OpState {
    Lent(AppBuf),
    Done(Result<u64, proto::Error>),
}

/// The ops of a connection, each with its buffer or result ([`OpState`]):
/// one entry per op from its start until its call took the result, so a
/// completion turns the entry over in place. A stream has at most a send
/// and a receive pending (its calls of one direction pass one at a time,
/// [`Dir`]), so a short list searched in order beats hashing. It allocates
/// at its first op (an idle connection holds nothing) and keeps its
/// capacity.
pub(super) struct Ops(Vec<(OpId, OpState)>);

impl Ops {
    fn new() -> Ops {
        Ops(Vec::new())
    }

    fn find(&self, op: OpId) -> Option<usize> {
        self.0.iter().position(|(o, _)| *o == op)
    }

    /// Enters op `op` (a fresh id, [`State::new_op`]), which lends `buf`.
    pub(super) fn lend(&mut self, op: OpId, buf: AppBuf) {
        debug_assert!(self.find(op).is_none(), "op {op:?} entered twice");
        // The other direction's op at most: this one's gate is taken.
        debug_assert!(self.0.len() < 2, "more ops than directions");
        self.0.push((op, OpState::Lent(buf)));
    }

    /// The buffer `op` lent, while it is pending.
    pub(super) fn buf(&self, op: OpId) -> Option<AppBuf> {
        self.0.iter().find_map(|&(o, s)| match s {
            OpState::Lent(b) if o == op => Some(b),
            _ => None,
        })
    }

    /// `op` completed with `r`: its buffer is no longer used.
    fn complete(&mut self, op: OpId, r: Result<u64, proto::Error>) {
        match self.find(op) {
            Some(i) => self.0[i].1 = OpState::Done(r),
            None => self.0.push((op, OpState::Done(r))),
        }
    }

    /// Takes `op`'s result (and its entry), once it completed.
    pub(super) fn take_result(&mut self, op: OpId) -> Option<Result<u64, proto::Error>> {
        let i = self.find(op)?;
        match self.0[i].1 {
            OpState::Done(r) => {
                self.0.swap_remove(i);
                Some(r)
            }
            OpState::Lent(_) => None,
        }
    }

    /// Forgets `op` (withdrawn: no result follows).
    pub(super) fn forget(&mut self, op: OpId) {
        if let Some(i) = self.find(op) {
            self.0.swap_remove(i);
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn wsa_io(e: WsaError) -> io::Error {
    let kind = match e {
        WsaError::WSAECONNREFUSED => io::ErrorKind::ConnectionRefused,
        WsaError::WSAECONNRESET => io::ErrorKind::ConnectionReset,
        WsaError::WSAECONNABORTED | WsaError::WSA_OPERATION_ABORTED => {
            io::ErrorKind::ConnectionAborted
        }
        WsaError::WSAETIMEDOUT => io::ErrorKind::TimedOut,
        WsaError::WSAEADDRINUSE => io::ErrorKind::AddrInUse,
        WsaError::WSAEADDRNOTAVAIL => io::ErrorKind::AddrNotAvailable,
        // `ErrorKind::{Host,Network}Unreachable` are named only from Rust
        // 1.83 on (the MSRV is 1.80): take them from the OS error codes.
        WsaError::WSAEHOSTUNREACH => io::Error::from_raw_os_error(libc::EHOSTUNREACH).kind(),
        WsaError::WSAENETUNREACH => io::Error::from_raw_os_error(libc::ENETUNREACH).kind(),
        WsaError::WSAENOTCONN => io::ErrorKind::NotConnected,
        WsaError::WSAEWOULDBLOCK => io::ErrorKind::WouldBlock,
        WsaError::WSAENOBUFS => io::ErrorKind::OutOfMemory,
        WsaError::WSAEINVAL | WsaError::WSAEFAULT => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{} ({})", e.name(), e.code()))
}

pub(super) fn proto_io(e: proto::Error) -> io::Error {
    let kind = match e {
        proto::Error::WouldBlock => io::ErrorKind::WouldBlock,
        proto::Error::Shutdown => io::ErrorKind::BrokenPipe,
        proto::Error::TimedOut => io::ErrorKind::TimedOut,
        proto::Error::Aborted => io::ErrorKind::ConnectionAborted,
        proto::Error::NoBuffers => io::ErrorKind::OutOfMemory,
        proto::Error::Transport(c) if c == WsaError::WSAECONNRESET.code() as u32 => {
            io::ErrorKind::ConnectionReset
        }
        proto::Error::Transport(_) => io::ErrorKind::ConnectionAborted,
        proto::Error::VersionMismatch { .. }
        | proto::Error::Malformed(_)
        | proto::Error::Protocol(_)
        | proto::Error::CreditViolation { .. }
        | proto::Error::CreditOverflow => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

/// The waker a runtime arms its completion queues with in run-to-completion
/// mode: it wakes the readiness hub and every thread that went to sleep in
/// [`Conn::wait_until`] since the last wake. One waker serves both because a
/// completion queue keeps one (a later arm replaces the earlier waker). Runs
/// on the thread that completed the request: it only notifies.
pub(super) struct CqWake {
    hub: Arc<Hub>,
    /// Notifiers of the connections whose threads sleep; taken by a wake,
    /// entered by each thread before it arms the queue and sleeps.
    sleepers: Mutex<Vec<Weak<Notifier>>>,
}

impl CqWake {
    pub(super) fn new(hub: Arc<Hub>) -> CqWake {
        CqWake {
            hub,
            sleepers: Mutex::new(Vec::new()),
        }
    }

    fn enlist(&self, n: &Arc<Notifier>) {
        let mut v = lock(&self.sleepers);
        if !v.iter().any(|w| w.as_ptr() == Arc::as_ptr(n)) {
            v.push(Arc::downgrade(n));
        }
    }
}

impl Waker for CqWake {
    fn wake(&self) {
        self.hub.wake();
        let sleepers = std::mem::take(&mut *lock(&self.sleepers));
        for n in sleepers.iter().filter_map(Weak::upgrade) {
            n.notify();
        }
    }
}

/// One connection: its wire (socket, pools, records), the machine and the
/// waiting threads.
pub(super) struct Conn {
    /// The socket, its pools and overlapped records, and the unsafe calls
    /// that use them.
    wire: Wire,
    /// The state, and in its inbox the completions the upcalls delivered,
    /// in dispatch order, not yet fed to the machine: an upcall that finds
    /// the state locked (by an application thread, possibly its own caller
    /// further up the stack) leaves its completion there for the holder,
    /// which feeds it before it unlocks, and looks again after (see
    /// [`Conn::settle`], and `inbox_lock.rs` for the protocol); an upcall
    /// that takes the state and finds the inbox empty feeds its completion
    /// at once (as if it had passed through). At most one entry per
    /// overlapped record, so the inbox never grows past `ovs.len()`.
    state: InboxLock<State, Done>,
    /// Threads sleeping for this connection (a blocked call, a close). A
    /// notify costs one load when nobody sleeps; it is made only when an op
    /// result, the session state or a cancellation changed (never for a
    /// send completion, unless a close waits for quiescence).
    sleepers: Arc<Notifier>,
    /// Run to completion: the runtime's waker, which the thread arms the
    /// completion queue with before it sleeps (and as `dyn Waker`).
    cq_wake: Option<(Arc<CqWake>, Arc<dyn Waker>)>,
    /// Empty polls of the connection's completion queue before a waiting
    /// thread sleeps (`poller.spin_budget`).
    spin_budget: u32,
    /// The provider runs to completion: a sleeper may not be woken by a
    /// completion, so sleeps are bounded naps (see [`Conn::wait_until`]).
    rtc: bool,
    /// The stream's readiness fd, once asked for (`super::ready`): written
    /// by whoever feeds an event to an operation that waits for it.
    pub(super) ready: OnceLock<Arc<Readiness>>,
    pub(super) local: SocketAddrV4,
    pub(super) peer: SocketAddrV4,
}

pub(super) struct State {
    pub(super) m: Connection,
    /// Buffers of pending ops, results of completed ones not yet taken.
    pub(super) ops: Ops,
    /// The id of the connection's next op.
    next_op: u64,
    /// Local registration of each RDMA op's buffer.
    pub(super) rdma_regs: Vec<Option<RegUse>>,
    /// Registration of the application buffer a send slot's direct ring
    /// write reads (none for a staged one).
    pub(super) ring_regs: Vec<Option<RegUse>>,
    /// Cached registrations of application buffers (`regcache.rs`).
    pub(super) cache: RegCache,
    pub(super) connected: bool,
    /// `close_socket` was called (or is being called).
    pub(super) socket_closed: bool,
    /// The machine aborted while an upcall fed it: the socket is closed by
    /// the next thread that settles the state outside an upcall (a waiting
    /// call, the next call, or the stream's close). Closing inside the
    /// upcall would make the provider defer the close to its closer thread,
    /// which polls every deferred socket until each one finalizes.
    close_due: bool,
    /// Bumped by `cancel_pending`: blocking calls started before give up.
    pub(super) cancel_gen: u64,
    /// Something a sleeping thread may wait for changed: notify after
    /// unlocking, if a thread sleeps (`sleeping`).
    pub(super) wake: bool,
    /// Threads of [`Conn::wait`] that may be asleep on `Conn::sleepers`: at
    /// least the number between the look before their sleep and the next
    /// look after it, each of which counts under this lock. A wake is
    /// notified only when it is not 0: the look before a sleep comes after
    /// the sleeper's `Notifier::prepare`, so a change made under the lock
    /// after it sees the count, and one made before it is seen by the look
    /// itself. The lock orders the two; the notifier's fence is paid only
    /// when someone may sleep. Too high only costs a notify.
    sleeping: u32,
    /// A close waits for quiescence: every completion is worth a wake.
    pub(super) watch_all: bool,
    /// Readiness: the operations (`ready::READ`, `ready::WRITE`) whose last
    /// non-blocking try failed with `WouldBlock`; set by the try (before the
    /// machine looks), cleared when one succeeds. 0 unless the stream's fd
    /// was asked for.
    pub(super) want: u8,
    /// The directions ([`Dir::bit`]) whose gate a call holds: set by
    /// [`State::pass`] under the lock that starts the call's op, cleared by
    /// [`State::open`] under the lock that takes its result (or withdraws
    /// the op). At most one op per direction is in `ops` or the machine.
    busy: u8,
    /// Blocking calls waiting for a gate ([`Conn::enter`]): an opening
    /// wakes the sleepers while one waits.
    gated: u32,
    /// Bytes the last INLINE took in its send buffer (header and payload):
    /// how much of the next send buffer a waiting thread takes for writing
    /// ([`Conn::prefetch_next_send`]). 0 until the first INLINE.
    inline_len: usize,
    /// Readiness: operations that events fed since the last unlock may let
    /// go on; taken by [`Conn::settle`], which writes the fd for those in
    /// `want`.
    pub(super) events: u8,
}

/// A direction of a stream's calls. Calls of one direction pass its gate
/// one at a time (`State::busy`): taken under the state lock that starts
/// the call's op, opened under the one that takes its result or withdraws
/// it, so a call pays no lock of its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Dir {
    Send,
    Recv,
}

impl Dir {
    /// The direction's bit in `State::busy`, which is also its readiness
    /// event (`ready::WRITE`, `ready::READ`).
    fn bit(self) -> u8 {
        match self {
            Dir::Send => ready::WRITE,
            Dir::Recv => ready::READ,
        }
    }
}

/// One completion an upcall delivered: the index of its overlapped record
/// and the result.
#[derive(Clone, Copy)]
struct Done {
    index: usize,
    error: u32,
    bytes: u32,
}

/// An op's result, as the machine completes it.
type OpResult = Result<u64, proto::Error>;

/// The op a blocked call of this thread waits for while the thread polls
/// its connection's completion queue ([`Conn::wait`]).
#[derive(Clone, Copy)]
struct Claim {
    /// The connection (its address).
    conn: usize,
    op: OpId,
    dir: Dir,
    nonblocking: bool,
}

/// A wait's claim on an op's result ([`Conn::wait`]), and how its value is
/// made of the result.
type Claimed<R> = Option<(Claim, fn(OpResult) -> R)>;

/// The hand-off between a blocked call and the completion upcalls its own
/// poll makes on its thread (see [`HANDOFF`]).
#[derive(Clone, Copy)]
enum Handoff {
    /// No call of this thread polls for an op.
    Idle,
    /// A call polls for this op.
    Waits(Claim),
    /// An upcall of the poll took the op's result for the call.
    Taken(OpResult),
}

thread_local! {
    /// Set by a blocked call of this thread around each poll of its
    /// completion queue ([`Conn::poll_claiming`]): an upcall that the poll
    /// makes on this thread for the same connection, once it fed its
    /// completion, takes the op's result under the state lock it holds
    /// anyway, as the call's next look would ([`State::finish`]), and
    /// leaves it here; the call returns it without locking the state again.
    /// Only this thread reads or writes it; upcalls on other threads leave
    /// the result for the call's look.
    static HANDOFF: Cell<Handoff> = const { Cell::new(Handoff::Idle) };
}

impl State {
    /// A fresh id for an op of this connection.
    pub(super) fn new_op(&mut self) -> OpId {
        self.next_op += 1;
        OpId(self.next_op)
    }

    /// Takes `dir`'s gate for the calling call, if no call holds it.
    fn pass(&mut self, dir: Dir) -> bool {
        if self.busy & dir.bit() != 0 {
            return false;
        }
        self.busy |= dir.bit();
        true
    }

    /// The call holding `dir`'s gate is over: the next one may pass (a
    /// call waiting for it is woken).
    fn open(&mut self, dir: Dir) {
        debug_assert!(self.busy & dir.bit() != 0, "{dir:?} gate opened twice");
        self.busy &= !dir.bit();
        if self.gated > 0 {
            self.wake = true;
        }
    }

    /// Takes `op`'s result, if it completed, and ends its call
    /// ([`State::end_call`]).
    fn finish(
        &mut self,
        dir: Dir,
        op: OpId,
        nonblocking: bool,
    ) -> Option<Result<u64, proto::Error>> {
        let r = self.ops.take_result(op)?;
        self.end_call(dir, nonblocking, r == Err(proto::Error::WouldBlock));
        Some(r)
    }

    /// The call of direction `dir` is over: its gate opens. A non-blocking
    /// call that did not fail with `WouldBlock` no longer wants `dir`'s
    /// readiness (`State::want`).
    fn end_call(&mut self, dir: Dir, nonblocking: bool, would_block: bool) {
        if nonblocking && !would_block {
            self.want &= !dir.bit();
        }
        self.open(dir);
    }
}

impl Conn {
    /// A connection on connected socket `sock`, not started: its pools are
    /// registered, nothing is posted yet (the caller enters it in the
    /// handle table first, then calls [`Conn::start`]).
    /// `cache_entries`: registrations of application buffers it keeps (0:
    /// none, every transfer registers its own).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        provider: &Provider,
        sock: ProviderSocket,
        cfg: proto::Config,
        cache_entries: usize,
        cq_wake: Option<Arc<CqWake>>,
        role: Role,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> io::Result<Arc<Conn>> {
        let (n_recv, n_send) = (usize::from(cfg.recv_slots), usize::from(cfg.send_slots));
        let mut wire = Wire::new(
            provider,
            sock,
            cfg.slot_size as usize,
            n_recv,
            n_send,
            usize::from(cfg.rdma_slots),
            cfg.ring_size as usize,
        )?;
        let ring = match wire.register() {
            Ok(desc) => desc,
            Err(e) => {
                // Closed before the pools are dropped: nothing stays
                // registered.
                let _ = provider.close_socket(sock);
                return Err(wsa_io(e));
            }
        };
        let n_ov = wire.records();
        let rdma_slots = usize::from(cfg.rdma_slots);
        let send_slots = usize::from(cfg.send_slots);
        let m = Connection::new(cfg, role, ring)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = wire.into_owner(|wire| Conn {
            wire,
            state: InboxLock::new(
                n_ov,
                State {
                    m,
                    ops: Ops::new(),
                    next_op: 0,
                    rdma_regs: vec![None; rdma_slots],
                    ring_regs: vec![None; send_slots],
                    cache: RegCache::new(cache_entries),
                    connected: false,
                    socket_closed: false,
                    close_due: false,
                    cancel_gen: 0,
                    wake: false,
                    sleeping: 0,
                    watch_all: false,
                    want: 0,
                    busy: 0,
                    gated: 0,
                    inline_len: 0,
                    events: 0,
                },
            ),
            sleepers: Arc::default(),
            cq_wake: cq_wake.map(|w| {
                let dyn_w: Arc<dyn Waker> = w.clone();
                (w, dyn_w)
            }),
            spin_budget: provider.config().poller.spin_budget,
            rtc: provider.config().poller.mode == PollerMode::RunToCompletion,
            ready: OnceLock::new(),
            local,
            peer,
        });
        Ok(conn)
    }

    /// The address the handle table publishes for the connection's wire,
    /// which its records lead back to (`io.rs`, invariant 7).
    pub(super) fn wire_addr(&self) -> usize {
        self.wire.addr()
    }

    /// Bytes of the connection's buffers (control pools and both rings),
    /// all allocated and registered when it was set up.
    pub(super) fn buffer_bytes(&self) -> usize {
        self.wire.buffer_bytes()
    }

    /// Resident bytes of the buffers, and whether any is locked.
    #[cfg(test)]
    pub(super) fn resident_bytes(&self) -> (usize, bool) {
        self.wire.resident_bytes()
    }

    /// Starts the protocol: receives posted, HELLO sent by the connector.
    pub(super) fn start(&self) {
        self.with_state(|_| ());
    }

    fn lock(&self) -> Held<'_, State> {
        self.state.lock()
    }

    /// Runs `f` on the state, executes the machine's actions and unlocks
    /// ([`Conn::settle`]).
    pub(super) fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st);
        self.settle(st);
        r
    }

    /// Executes the machine's actions and feeds it the completions waiting
    /// in the inbox until both are exhausted, then unlocks; wakes sleepers if
    /// something they wait for changed and closes the socket if the machine
    /// aborted. Once unlocked, takes the state again if a completion arrived
    /// meanwhile and nobody else holds it: an upcall that found the state
    /// locked left its completion in the inbox before this thread's last look
    /// or before this unlock, so either this loop or the upcall's own
    /// `try_lock` feeds it.
    fn settle<'a>(&'a self, st: Held<'a, State>) {
        self.settle_then(st, |_| ());
    }

    /// [`Conn::settle`] inside an upcall: an abort leaves the close to the
    /// next settle outside one (`State::close_due`). If a blocked call of
    /// this thread polls for an op of this connection that is now
    /// complete, takes its result for the call ([`HANDOFF`]), unless a
    /// close is due: the call's own look makes it.
    fn settle_in_upcall<'a>(&'a self, st: Held<'a, State>) {
        self.settle_as(st, true, |st| {
            HANDOFF.with(|h| {
                if let Handoff::Waits(c) = h.get() {
                    if c.conn == self as *const Conn as usize && !st.close_due {
                        if let Some(r) = st.finish(c.dir, c.op, c.nonblocking) {
                            h.set(Handoff::Taken(r));
                        }
                    }
                }
            })
        });
    }

    /// [`Conn::progress`] for a blocked call waiting for op `claim`: the
    /// number of completions dispatched, and the op's result if an upcall
    /// on this thread took it ([`HANDOFF`]).
    fn poll_claiming(&self, claim: Claim) -> (usize, Option<OpResult>) {
        HANDOFF.with(|h| {
            debug_assert!(matches!(h.get(), Handoff::Idle), "nested claims");
            h.set(Handoff::Waits(claim));
            let n = self.progress();
            match h.replace(Handoff::Idle) {
                Handoff::Taken(r) => (n, Some(r)),
                _ => (n, None),
            }
        })
    }

    /// Runs `f` on the state with direction `dir`'s gate taken (waiting for
    /// it as long as the call holding it), executes the machine's actions
    /// and feeds the waiting completions, then runs `then` on the state
    /// with `f`'s value (it sees the results they produced), opens the gate
    /// and unlocks: for a call whose op completes within `f` (a
    /// non-blocking send).
    pub(super) fn gated_then<A, R>(
        &self,
        dir: Dir,
        f: impl FnOnce(&mut State) -> A,
        then: impl FnOnce(&mut State, A) -> R,
    ) -> io::Result<R> {
        let mut st = self.enter(dir, None)?;
        let a = f(&mut st);
        Ok(self.settle_then(st, |st| {
            let r = then(st, a);
            st.open(dir);
            r
        }))
    }

    /// Runs `f` on the state once every action was executed and every
    /// waiting completion fed: it sees the results they produced.
    fn with_driven<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        self.settle_then(self.lock(), f)
    }

    /// [`Conn::settle`], running `then` on the state after its first
    /// round of actions and completions, before it unlocks (`then` queues
    /// no actions: it looks, or takes a result).
    fn settle_then<'a, R>(&'a self, st: Held<'a, State>, then: impl FnOnce(&mut State) -> R) -> R {
        self.settle_as(st, false, then)
    }

    /// [`Conn::settle_then`]; `upcall`: the thread is inside an upcall, so
    /// an abort only marks the close due.
    fn settle_as<'a, R>(
        &'a self,
        mut st: Held<'a, State>,
        upcall: bool,
        then: impl FnOnce(&mut State) -> R,
    ) -> R {
        let mut then = Some(then);
        let mut r = None;
        loop {
            let mut abort = false;
            loop {
                if st.m.has_actions() {
                    abort |= self.run(&mut st);
                }
                let Some(d) = self.state.pop(&st) else {
                    break;
                };
                self.feed(&mut st, d);
            }
            if upcall {
                st.close_due |= abort;
                abort = false;
            } else {
                abort |= std::mem::take(&mut st.close_due);
            }
            if let Some(f) = then.take() {
                r = Some(f(&mut st));
            }
            let wake = std::mem::take(&mut st.wake) && st.sleeping > 0;
            let fire = std::mem::take(&mut st.events) & st.want;
            drop(st);
            if wake {
                self.sleepers.notify();
            }
            if fire != 0 {
                if let Some(r) = self.ready.get() {
                    r.raise(fire);
                }
            }
            if abort {
                self.close_socket();
            }
            st = match self.state.look() {
                Some(st) => st,
                None => return r.expect("`then` ran in the first round"),
            };
        }
    }

    /// A completion upcall for our record `index`.
    fn on_completion(&self, index: usize, error: u32, bytes: u32) {
        let d = Done {
            index,
            error,
            bytes,
        };
        // Never waits for the state inside an upcall: whoever holds it
        // (perhaps this thread's own caller) feeds the completion.
        let Some((mut st, d)) = self.state.deliver(d) else {
            return;
        };
        // Holding the state (whose actions the last holder executed): with
        // nothing in the inbox before it, the completion is fed at once;
        // else it queued behind what is there.
        if let Some(d) = d {
            self.feed(&mut st, d);
        }
        self.settle_in_upcall(st);
    }

    /// Feeds one delivered completion to the machine (state locked).
    fn feed(&self, st: &mut State, d: Done) {
        let result = if d.error == 0 { Ok(()) } else { Err(d.error) };
        let kind = self.wire.ov_kind(d.index);
        if st.watch_all {
            st.wake = true;
        }
        // A receive may bring data, credits or the end; a send or ring
        // write completion frees a send buffer; an RDMA op ends a transfer
        // either way.
        st.events |= match kind {
            OvKind::Recv(_) | OvKind::Rdma(_) => ready::READ | ready::WRITE,
            OvKind::Send(_) | OvKind::RingWrite(_) => ready::WRITE,
        };
        match kind {
            OvKind::Recv(slot) => match result {
                Ok(()) => {
                    let n = d.bytes as usize;
                    let k = n.min(proto::MAX_HEAD).min(self.wire.slot_size);
                    // Decoded in the slot: the machine only queues its
                    // re-post, which `run` executes after this.
                    let m = &mut st.m;
                    let fed = self
                        .wire
                        .with_recv_head(slot, k, |head| m.recv_done(slot, Ok((head, n))));
                    if fed.is_err() {
                        st.m.recv_done(slot, Err(WsaError::WSAEFAULT.code() as u32));
                    }
                }
                Err(e) => st.m.recv_done(slot, Err(e)),
            },
            OvKind::Send(slot) => st.m.send_done(slot, result),
            OvKind::RingWrite(slot) => {
                if let Some(r) = st.ring_regs[usize::from(slot)].take() {
                    self.drop_reg(st, r);
                }
                st.m.ring_write_done(slot, result);
            }
            OvKind::Rdma(rdma) => {
                if let Some(r) = st.rdma_regs[usize::from(rdma)].take() {
                    self.drop_reg(st, r);
                }
                st.m.rdma_done(rdma, result);
            }
        }
    }

    /// Executes the machine's pending actions (state locked). Returns
    /// whether the connection must now be aborted (`close_socket`, to be
    /// called unlocked).
    fn run(&self, st: &mut State) -> bool {
        let mut abort = false;
        while let Some(a) = st.m.poll_action() {
            let code = |e: WsaError| e.code() as u32;
            match a {
                Action::PostRecv { slot } => {
                    if let Err(e) = self.wire.post_recv(slot) {
                        st.m.recv_done(slot, Err(code(e)));
                    }
                }
                Action::Send { slot, report } => {
                    if let Err(e) = self.wire.post_send(slot, st.m.head(slot), None, report) {
                        st.m.send_done(slot, Err(code(e)));
                    }
                }
                Action::SendInline {
                    slot,
                    payload: p,
                    report,
                } => {
                    st.inline_len = proto::HEADER_LEN + p.len as usize;
                    let r = match st.ops.buf(p.op) {
                        Some(b) => self.wire.post_send(
                            slot,
                            st.m.head(slot),
                            Some((b, p.offset, p.len)),
                            report,
                        ),
                        None => Err(WsaError::WSAEFAULT),
                    };
                    if let Err(e) = r {
                        st.m.send_done(slot, Err(code(e)));
                    }
                }
                Action::RingWrite {
                    slot,
                    payload: p,
                    ring_offset,
                    desc,
                    direct,
                } => {
                    let r = match st.ops.buf(p.op) {
                        // Straight from the application's buffer when its
                        // registration is cached; else staged in the ring
                        // (reported all the same: the machine settles a
                        // direct write's bytes at its report).
                        Some(b) if direct && st.cache.enabled() => {
                            match self.app_reg(st, b, p.offset, p.len, false) {
                                Ok(reg) => {
                                    let r = self.wire.post_ring_write_direct(
                                        slot,
                                        b,
                                        p.offset,
                                        p.len,
                                        reg.handle,
                                        ring_offset,
                                        &desc,
                                    );
                                    match r {
                                        Ok(()) => st.ring_regs[usize::from(slot)] = Some(reg),
                                        Err(_) => self.drop_reg(st, reg),
                                    }
                                    r
                                }
                                Err(_) => self.wire.post_ring_write(
                                    slot,
                                    b,
                                    p.offset,
                                    p.len,
                                    ring_offset,
                                    &desc,
                                    true,
                                ),
                            }
                        }
                        Some(b) => self.wire.post_ring_write(
                            slot,
                            b,
                            p.offset,
                            p.len,
                            ring_offset,
                            &desc,
                            direct,
                        ),
                        None => Err(WsaError::WSAEFAULT),
                    };
                    match r {
                        Ok(()) => {}
                        Err(e) if direct => st.m.ring_write_done(slot, Err(code(e))),
                        Err(e) => st.m.abort(proto::Error::Transport(code(e))),
                    }
                }
                Action::CopyOut {
                    ring_offset,
                    op,
                    op_offset,
                    len,
                } => {
                    if let Some(b) = st.ops.buf(op) {
                        if self.wire.copy_out(ring_offset, b, op_offset, len).is_err() {
                            st.m.abort(proto::Error::Protocol("copy outside the receive buffer"));
                        }
                    }
                }
                Action::CopyInline {
                    slot,
                    slot_offset,
                    op,
                    op_offset,
                    len,
                } => {
                    if let Some(b) = st.ops.buf(op) {
                        if self
                            .wire
                            .copy_inline(slot, slot_offset, b, op_offset, len)
                            .is_err()
                        {
                            st.m.abort(proto::Error::Protocol("copy outside the receive buffer"));
                        }
                    }
                }
                Action::Expose {
                    xfer,
                    op,
                    offset,
                    len,
                    access,
                } => {
                    let r = match st.ops.buf(op) {
                        Some(b) => self
                            .wire
                            .expose(b, offset, len, access == proto::Access::Write),
                        None => Err(WsaError::WSAEFAULT),
                    };
                    st.m.exposed(xfer, r.map_err(code));
                }
                Action::Unexpose { desc, .. } => {
                    let _ = self
                        .wire
                        .provider
                        .deregister_rdma_memory(self.wire.sock, &desc);
                }
                Action::RdmaRead {
                    rdma,
                    op,
                    op_offset,
                    len,
                    desc,
                    remote_offset,
                }
                | Action::RdmaWrite {
                    rdma,
                    op,
                    op_offset,
                    len,
                    desc,
                    remote_offset,
                } => {
                    let write = matches!(a, Action::RdmaWrite { .. });
                    // The local side of the transfer: the application's
                    // buffer, read by a write or written by a read.
                    let r = match st.ops.buf(op) {
                        Some(b) => self.app_reg(st, b, op_offset, len, !write).and_then(|reg| {
                            let r = self.wire.post_rdma(
                                rdma,
                                write,
                                b,
                                op_offset,
                                len,
                                reg.handle,
                                &desc,
                                remote_offset,
                            );
                            if r.is_err() {
                                self.drop_reg(st, reg);
                            }
                            r.map(|()| reg)
                        }),
                        None => Err(WsaError::WSAEFAULT),
                    };
                    match r {
                        Ok(reg) => st.rdma_regs[usize::from(rdma)] = Some(reg),
                        Err(e) => st.m.rdma_done(rdma, Err(code(e))),
                    }
                }
                Action::SendComplete { op, result } | Action::RecvComplete { op, result } => {
                    st.ops.complete(op, result);
                    st.wake = true;
                }
                Action::Connected => {
                    st.connected = true;
                    st.wake = true;
                    st.events |= ready::ALL;
                }
                Action::Abort { .. } => {
                    abort = !st.socket_closed;
                    st.wake = true;
                    st.events |= ready::ALL;
                }
            }
        }
        abort
    }

    /// Closes the SAN socket (abortive, once), then tells the machine. Must
    /// be called with the state unlocked: outside an upcall `close_socket`
    /// waits until the provider dispatched the flushed completions.
    pub(super) fn close_socket(&self) {
        let first = self.with_state(|st| !std::mem::replace(&mut st.socket_closed, true));
        if !first {
            return;
        }
        let _ = self.wire.provider.close_socket(self.wire.sock);
        self.with_state(|st| {
            // The provider released the socket's registrations.
            st.cache.clear();
            st.m.closed();
            st.events |= ready::ALL;
        });
    }

    /// A registration of `len` bytes at `off` of application buffer `app`
    /// for one op (`write`: the op writes into it): a pinned cache entry
    /// covering its pages, a fresh one of the pages of the whole buffer
    /// entered in the cache (so the other ops of a transfer split over
    /// several, e.g. by a ring with room for part of it, find it there), or
    /// (cache off) a registration of exactly that range for this op alone.
    fn app_reg(
        &self,
        st: &mut State,
        app: AppBuf,
        off: u64,
        len: u32,
        write: bool,
    ) -> Result<RegUse, WsaError> {
        let addr = self.wire.app_addr(app, off, len)?;
        if !st.cache.enabled() {
            let handle = self.wire.register_app(addr, addr + len as usize, write)?;
            return Ok(RegUse {
                handle,
                cached: false,
            });
        }
        let (start, end) = st
            .cache
            .span(addr, len as usize)
            .ok_or(WsaError::WSAEFAULT)?;
        if let Some(handle) = st.cache.pin(start, end, write) {
            return Ok(RegUse {
                handle,
                cached: true,
            });
        }
        let (whole, whole_len) = app.whole();
        let (start, end) = st
            .cache
            .span(whole, whole_len)
            .filter(|&(s, e)| u32::try_from(e - s).is_ok())
            .unwrap_or((start, end));
        let handle = self.wire.register_app(start, end, write)?;
        for old in st.cache.insert(start, end, write, handle) {
            let _ = self.wire.provider.deregister_memory(self.wire.sock, old);
        }
        Ok(RegUse {
            handle,
            cached: true,
        })
    }

    /// The op that used registration `r` completed (or was not posted).
    fn drop_reg(&self, st: &mut State, r: RegUse) {
        let gone = if r.cached {
            st.cache.unpin(r.handle)
        } else {
            Some(r.handle)
        };
        if let Some(h) = gone {
            let _ = self.wire.provider.deregister_memory(self.wire.sock, h);
        }
    }

    /// The application releases `[addr, addr+len)`: cached registrations
    /// overlapping it are deregistered now, or when the op using them
    /// completes (a release while a call lends that memory is the
    /// application's bug; the op still completes first).
    pub(super) fn release_memory(&self, addr: usize, len: usize) {
        self.with_state(|st| {
            if st.socket_closed {
                return;
            }
            for h in st.cache.forget(addr, len) {
                let _ = self.wire.provider.deregister_memory(self.wire.sock, h);
            }
        });
    }

    /// Dispatches the completions waiting in this connection's completion
    /// queue on the calling thread (never with the state locked).
    pub(super) fn progress(&self) -> usize {
        self.wire.provider.progress_socket(self.wire.sock)
    }

    /// Arms this connection's completion queue for `waker`
    /// (`Provider::arm_socket`); returns whether completions wait there
    /// already.
    pub(super) fn arm(&self, waker: &Arc<dyn crate::fabric::Waker>) -> bool {
        self.wire
            .provider
            .arm_socket(self.wire.sock, waker)
            .unwrap_or(false)
    }

    /// Waits until `done(state)` gives a value or `deadline`, or until
    /// `give_up(state)` (cancellation); returns `done`'s value, `None` if
    /// it gave up. Each look at the state comes after the actions and
    /// completions waiting there were processed. The waiting thread makes
    /// the progress: it polls the connection's completion queue itself (the
    /// provider dispatches the completions to the upcalls on this thread),
    /// up to `spin_budget` empty polls, then registers as a sleeper and
    /// sleeps until a completion it waits for is delivered (by another
    /// thread's progress or the provider's dispatcher) or the deadline.
    ///
    /// In run-to-completion mode nobody else polls the connection's CQ, so
    /// the thread arms it with the runtime's [`CqWake`] before it sleeps:
    /// the next completion queued there wakes it. The public SPI has no
    /// call that sleeps on one socket's CQ with a deadline, and another
    /// thread may have taken the CQ's one wake, so the sleep is still a
    /// nap of [`NAP_MIN`] doubling up to [`NAP_MAX`], after which the
    /// thread polls again.
    pub(super) fn wait_until<R>(
        &self,
        deadline: Deadline,
        done: impl FnMut(&mut State) -> Option<R>,
        give_up: impl FnMut(&State) -> bool,
    ) -> Option<R> {
        self.wait(deadline, true, None, done, give_up)
    }

    /// [`Conn::wait_until`]; `look_first: false` when the caller has just
    /// looked (and unlocked): the wait starts with a poll of the completion
    /// queue, not with a second look at the state. `claim`: the wait is for
    /// that op's result (`done` takes it with [`State::finish`]), which an
    /// upcall of the wait's own poll may take for it ([`HANDOFF`]), `R`
    /// made of it by the function given.
    fn wait<R>(
        &self,
        mut deadline: Deadline,
        look_first: bool,
        claim: Claimed<R>,
        mut done: impl FnMut(&mut State) -> Option<R>,
        mut give_up: impl FnMut(&State) -> bool,
    ) -> Option<R> {
        let mut skip_look = !look_first;
        let mut idle = 0u32;
        let mut nap = NAP_MIN;
        // Whether this thread is counted in `State::sleeping`.
        let mut counted = false;
        // `Some(outcome)` once the wait is over; `sleep`: the look before a
        // sleep, which counts this thread as sleeping unless the wait is
        // over (the next look uncounts it).
        let mut look = |sleep: bool, counted: &mut bool| {
            self.with_driven(|st| {
                if std::mem::take(counted) {
                    st.sleeping -= 1;
                }
                let outcome = match done(st) {
                    Some(r) => Some(Some(r)),
                    None if give_up(st) => Some(None),
                    None => None,
                };
                if sleep && outcome.is_none() {
                    st.sleeping += 1;
                    *counted = true;
                }
                outcome
            })
        };
        loop {
            if !std::mem::take(&mut skip_look) {
                if let Some(outcome) = look(false, &mut counted) {
                    return outcome;
                }
            }
            // The clock is read after `CLOCK_FIRST` empty polls, ever more
            // rarely after, and before a sleep, not on every poll: even the
            // coarse clock's vDSO call is not free next to a poll.
            if clock_due(idle) && deadline.passed() {
                return None;
            }
            // A thread counted as sleeping polls unclaimed: its look
            // uncounts it.
            let polled = match claim {
                Some((c, made)) if !counted => match self.poll_claiming(c) {
                    (_, Some(r)) => return Some(made(r)),
                    (n, None) => n,
                },
                _ => self.progress(),
            };
            if polled > 0 {
                idle = 0;
                nap = NAP_MIN;
                continue;
            }
            if idle == 0 {
                self.prefetch_next_send();
            }
            if idle < self.spin_budget {
                idle += 1;
                std::hint::spin_loop();
                continue;
            }
            if deadline.passed() {
                return None;
            }
            let token = self.sleepers.prepare();
            // Registered: a completion delivered from here on notifies, and
            // (run to completion) the next one queued on the completion
            // queue wakes this thread through the armed waker.
            let waiting = match &self.cq_wake {
                Some((w, dyn_w)) => {
                    w.enlist(&self.sleepers);
                    self.arm(dyn_w)
                }
                None => false,
            };
            if waiting || self.progress() > 0 {
                drop(token);
                idle = 0;
                continue;
            }
            if let Some(outcome) = look(true, &mut counted) {
                return outcome;
            }
            let sleep = if self.rtc {
                let n = nap;
                nap = (nap * 2).min(NAP_MAX);
                Some(deadline.remaining().map_or(n, |d| d.min(n)))
            } else {
                deadline.remaining()
            };
            token.wait(sleep.map(|t| Instant::now() + t));
            idle = 0;
        }
    }

    /// Before a wait spins: takes the lines of the send buffer the next
    /// INLINE will be copied into ([`Wire::prefetch_send`]), as many as the
    /// last one took, so that the peer core's copies are invalidated while
    /// this thread waits, not when it sends (in a ping-pong of 4 KiB on the
    /// soft fabric, 1.76 -> 1.52 us a half round trip). Taken after each
    /// completion that ended a spin, since a send completion changes which
    /// buffer is next. Skipped if another thread holds the state: a hint is
    /// not worth a wait. It lets go without settling (`InboxLock::try_lock`):
    /// its wait looks at the state next, or returns to a caller that does.
    fn prefetch_next_send(&self) {
        let Some(st) = self.state.try_lock() else {
            return;
        };
        if st.inline_len > 0 {
            if let Some(slot) = st.m.next_send_buffer() {
                self.wire.prefetch_send(slot, st.inline_len);
            }
        }
    }

    /// The state, locked, with `dir`'s gate taken for the caller: at once
    /// if no call holds it, else once the holder's call is over, waiting
    /// as [`Conn::wait_until`] does (`TimedOut` past `timeout`, `None`:
    /// no bound; `Interrupted` if cancelled meanwhile).
    #[inline]
    fn enter(&self, dir: Dir, timeout: Option<Duration>) -> io::Result<Held<'_, State>> {
        let mut st = self.lock();
        if st.pass(dir) {
            return Ok(st);
        }
        self.wait_gate(st, dir, timeout)
    }

    /// [`Conn::enter`] once `dir`'s gate was found taken (`st`).
    #[cold]
    fn wait_gate<'a>(
        &'a self,
        mut st: Held<'a, State>,
        dir: Dir,
        timeout: Option<Duration>,
    ) -> io::Result<Held<'a, State>> {
        st.gated += 1;
        let gen = st.cancel_gen;
        self.settle(st);
        let passed = self.wait_until(
            Deadline::after(timeout),
            |st| st.pass(dir).then_some(()),
            |st| st.cancel_gen != gen,
        );
        let mut st = self.lock();
        st.gated -= 1;
        if passed.is_some() {
            return Ok(st);
        }
        let kind = if st.cancel_gen != gen {
            io::ErrorKind::Interrupted
        } else {
            io::ErrorKind::TimedOut
        };
        self.settle(st);
        Err(io::Error::new(
            kind,
            "another call of this direction is in progress",
        ))
    }

    /// Starts an op of direction `dir` with `start` (given its id, the
    /// direction's gate taken: [`Conn::enter`]) and waits for its result;
    /// on timeout or cancellation takes the cancel path (spec §6.2). The
    /// gate opens under the lock that takes the result or withdraws the
    /// op. A blocking call waits for the gate within `timeout`, a
    /// `nonblocking` one (whose `timeout` only bounds an RDMA op) as long
    /// as the blocking call holding it. An op that completes within `start`
    /// (a copied send, data already there) takes one lock and no clock read.
    pub(super) fn blocking(
        &self,
        dir: Dir,
        nonblocking: bool,
        timeout: Option<Duration>,
        rdma_cancel: Duration,
        start: impl FnOnce(&mut State, OpId),
    ) -> io::Result<u64> {
        let mut st = self.enter(dir, if nonblocking { None } else { timeout })?;
        let op = st.new_op();
        start(&mut st, op);
        let gen = st.cancel_gen;
        let finish = move |st: &mut State| st.finish(dir, op, nonblocking);
        if let Some(r) = self.settle_then(st, finish) {
            return op_result(r);
        }
        // Just looked: the wait starts by polling.
        let claim = Claim {
            conn: self as *const Conn as usize,
            op,
            dir,
            nonblocking,
        };
        let done = self.wait(
            Deadline::after(timeout),
            false,
            Some((claim, |r| r)),
            finish,
            |st| st.cancel_gen != gen,
        );
        if let Some(r) = done {
            return op_result(r);
        }
        let mut st = self.lock();
        let kind = if st.cancel_gen != gen {
            io::ErrorKind::Interrupted
        } else {
            io::ErrorKind::TimedOut
        };
        let outcome = st.m.app_cancel(op);
        match outcome {
            CancelOutcome::NotFound => {
                let r = take_result(&mut st, op);
                let would_block = matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
                st.end_call(dir, nonblocking, would_block);
                self.settle(st);
                r
            }
            CancelOutcome::Cancelled { done } => {
                st.ops.forget(op);
                st.end_call(dir, nonblocking, false);
                self.settle(st);
                if done > 0 {
                    Ok(done)
                } else {
                    Err(io::Error::new(kind, "transfer cancelled"))
                }
            }
            CancelOutcome::InFlight => {
                self.settle(st);
                // The buffer is in an RDMA op or exposed: wait for it, then
                // abort the connection, which forces its completion.
                let until = Deadline::within(rdma_cancel);
                if let Some(r) = self.wait_until(until, finish, |_| false) {
                    return op_result(r);
                }
                self.with_state(|st| st.m.abort(proto::Error::TimedOut));
                // After close_socket the fabric no longer touches the buffer
                // and the machine completes the op once its RDMA came back
                // flushed (CLOSE-3): the wait below ends (no deadline, since
                // returning earlier would free a buffer the NIC may use).
                self.wait_until(Deadline::Never, finish, |_| false);
                Err(io::Error::new(
                    kind,
                    "transfer cancelled while its buffer was in an RDMA op; connection aborted",
                ))
            }
        }
    }
}

/// The upcall reaches the connection through the completed record
/// (`io.rs`, invariant 7).
impl Owner for Conn {
    fn completed(&self, index: usize, error: u32, bytes: u32) {
        self.on_completion(index, error, bytes);
    }
}

/// An op's result as the stream call returns it.
fn op_result(r: Result<u64, proto::Error>) -> io::Result<u64> {
    r.map_err(proto_io)
}

pub(super) fn take_result(st: &mut State, op: OpId) -> io::Result<u64> {
    match st.ops.take_result(op) {
        Some(r) => op_result(r),
        None => {
            st.ops.forget(op);
            Err(io::Error::other("op result missing"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upcall hands a result over ([`HANDOFF`]) only to a call of its
    /// own connection that polls on its thread: a claim naming another
    /// connection leaves the result where it is, for its own call's look.
    #[test]
    fn an_upcall_takes_a_result_only_for_its_own_connections_claim() {
        let (_rt, client, server) = crate::switch::stream::connected(41);
        let (a, b) = (client.conn(), server.conn());

        // A non-blocking send of `b`'s, completed and not taken yet, its
        // gate held as by its call.
        let data = [7u8; 8];
        let op = b.with_state(|st| {
            assert!(st.pass(Dir::Send));
            let op = st.new_op();
            st.ops.lend(op, AppBuf::of(&data));
            st.m.app_send(op, data.len() as u64, true);
            op
        });
        let claim = |conn: &Arc<Conn>| Claim {
            conn: Arc::as_ptr(conn) as usize,
            op,
            dir: Dir::Send,
            nonblocking: true,
        };
        HANDOFF.with(|h| h.set(Handoff::Waits(claim(a))));
        b.settle_in_upcall(b.lock());
        let left = HANDOFF.with(|h| h.replace(Handoff::Idle));
        assert!(
            matches!(left, Handoff::Waits(_)),
            "taken for another connection's call"
        );
        HANDOFF.with(|h| h.set(Handoff::Waits(claim(b))));
        b.settle_in_upcall(b.lock());
        let taken = HANDOFF.with(|h| h.replace(Handoff::Idle));
        assert!(
            matches!(taken, Handoff::Taken(Ok(8))),
            "its own connection's call gets the result"
        );
        assert!(b.lock().pass(Dir::Send), "the gate opened with the result");
    }

    /// A spinning wait reads the clock once at `CLOCK_FIRST`, then at each
    /// doubling, and never more than `CLOCK_MAX_EVERY` polls apart.
    #[test]
    fn a_spinning_wait_reads_the_clock_rarely_and_regularly() {
        let due: Vec<u32> = (0..=1 << 20).filter(|&i| clock_due(i)).collect();
        assert_eq!(due[0], CLOCK_FIRST);
        assert_eq!(&due[..7], &[1024, 2048, 4096, 8192, 16384, 32768, 65536]);
        // From 2^16 to 2^20: every 65,536 polls.
        assert_eq!(due.len(), 7 + 15);
        assert!(due.windows(2).all(|w| w[1] - w[0] <= CLOCK_MAX_EVERY));
    }
}
