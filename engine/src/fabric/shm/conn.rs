//! One end of a shared-memory connection in this process: its work
//! queues, the outgoing ring (in its own segment) and the incoming ring (in
//! the peer's), the keys it exposed to the peer, and the seal.
//!
//! # Who does what
//!
//! Everything local sits under one lock (`st`): posting, and the
//! progress and reaping done when the end's CQ is polled. A send of up to
//! [`INLINE_MAX`](crate::fabric::soft::cell::INLINE_MAX) bytes is copied into its cell; a longer one, and every
//! RDMA request, travels as the poster's gather list. The *receiving*
//! process executes what arrives, in order, when its CQ is polled: a send
//! fills the next posted receive (inline bytes copied from the cell, a long
//! payload read once from the sender with `process_vm_readv`); an RDMA
//! write or read is checked against the keys this end exposed to this
//! connection (its `window`, whose lock is held across the copy, so an
//! unbind waits for it) and copied with `process_vm_readv` /
//! `process_vm_writev`: the owner of the memory checks the key and moves
//! the bytes. A request is done once the peer consumed its cell (the
//! ring's consumed index), so every send-queue request completes in order.
//!
//! # Breaking and the seal
//!
//! An end that breaks the connection (close, a refused request, a failed
//! copy, garbage in a cell) stores its state word, then waits until the
//! peer's `busy` word is clear; the peer sets `busy`, fences, and copies
//! from or into this end's memory only while both states are intact (an
//! inline send, which reads only the cell, does without: `SealSide`). So once the break returned, the peer
//! touches none of this end's memory, and the outstanding requests are
//! flushed. A peer that died (its socket hung up) copies nothing more.

use super::seg::{Segment, STATE_CLOSED, STATE_INTACT, STATE_OWNER_FAILED, STATE_PEER_FAILED};
use super::sys::{self, Cma};
use super::NicInner;
use crate::fabric::lkey_cache::LkeyCache;
use crate::fabric::soft::cell::{CellConsumer, CellOp, CellProducer};
use crate::fabric::*;
use crate::spin::SpinLock;
use std::collections::VecDeque;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{compiler_fence, fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The fence between an arm's stores of `armed` ([`Conn::mark_armed`], on
/// each end of a CQ) and its look for work ([`Conn::has_work`]): a heavy
/// one where this process takes part in asymmetric fences (its segments
/// say so, `seg::FLAG_HEAVY_ARM`, and its peers' wakes go without a fence),
/// else a full fence. `false` if the heavy fence failed (not seen once it
/// worked): the caller must not sleep then, a wake-up may be lost.
pub(super) fn arm_fence() -> bool {
    if sys::asymmetric_fences() {
        sys::heavy_fence()
    } else {
        fence(Ordering::SeqCst);
        true
    }
}

/// How long a break waits for a live peer's copy in progress.
const SEAL_WAIT: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A key this end exposed to the peer.
pub(super) struct WindowKey {
    pub(super) rkey: u32,
    pub(super) addr: usize,
    pub(super) len: usize,
    pub(super) access: Access,
}

struct SqEntry {
    wr_id: WrId,
    opcode: WcOpcode,
    len: u32,
    /// The message's cell index, or the status it completed with at post
    /// time.
    kind: Result<u64, WcStatus>,
}

struct RecvSlot {
    wr_id: WrId,
    sges: Vec<Sge>,
    /// Set once the receive was filled (or failed).
    done: Option<(WcStatus, u32)>,
}

/// How this end's outstanding requests complete once the connection broke.
#[derive(Clone, Copy)]
struct Broken {
    /// Status of every other outstanding request.
    status: WcStatus,
    /// A send-queue request (cell index) of this end that failed with its
    /// own status.
    own: Option<(u64, WcStatus)>,
    /// What to tell `QpEvents`: `failed` (true), `disconnected` (false),
    /// nothing (a local close).
    tell: Option<bool>,
}

struct State {
    out: CellProducer,
    inc: CellConsumer,
    sq: VecDeque<SqEntry>,
    /// Posted receives in posting order; the first `filled` are done.
    rq: VecDeque<RecvSlot>,
    /// Empty slots kept for reuse (their `sges` keep their capacity).
    spare: Vec<RecvSlot>,
    filled: usize,
    broken: Option<Broken>,
    /// Whether `QpEvents` was told.
    told: bool,
    gather: Vec<Sge>,
    /// The regions this end's posts named lately.
    lkeys: LkeyCache,
}

pub(super) struct Conn {
    pub(super) nic: Arc<NicInner>,
    pub(super) num: QpNum,
    pub(super) local: SocketAddrV4,
    pub(super) peer: SocketAddrV4,
    /// Our segment (outgoing ring, our control words).
    mine: Segment,
    /// The peer's segment (incoming ring, its control words).
    theirs: Segment,
    pub(super) peer_pid: libc::pid_t,
    /// Signalled by the peer to wake us; watched by the NIC's event thread.
    pub(super) my_event: OwnedFd,
    /// Signalled by us to wake the peer.
    peer_event: OwnedFd,
    /// Whether waking the peer needs only a compiler fence: this process
    /// takes part in asymmetric fences and the peer arms with a heavy one
    /// (read once from its segment's header).
    light_wake: bool,
    /// The connection's socket: the peer's death hangs it up.
    pub(super) sock: OwnedFd,
    /// The peer process (readable once it exited), if the kernel has
    /// pidfds.
    pub(super) peer_proc: Option<OwnedFd>,
    /// The event thread's tokens of `sock` and `my_event`.
    pub(super) tokens: Mutex<Vec<u64>>,
    /// Set by the NIC's event thread when the socket hung up.
    pub(super) peer_gone: AtomicBool,
    pub(super) cq: Arc<super::cq::CqInner>,
    events: Arc<dyn QpEvents>,
    send_depth: usize,
    max_sge: usize,
    /// Entries reserved on the CQ.
    pub(super) reserved: usize,
    /// Set when the queue pair handle dropped.
    pub(super) dropped: AtomicBool,
    /// Posting, progress and reaping (module docs). A spin lock: one
    /// locked instruction to take, none to release, where a `Mutex` pays
    /// two. Its holder makes at most a CMA copy or, breaking, waits for
    /// the peer's seal (bounded by `SEAL_WAIT`, yielding), and a thread
    /// that finds it taken yields after a few spins.
    st: SpinLock<State>,
    /// Keys this end exposed to the peer; locked across each RDMA the peer
    /// asked for.
    pub(super) window: Mutex<Vec<WindowKey>>,
}

/// What a new connection end is made of.
pub(super) struct Parts {
    pub(super) num: QpNum,
    pub(super) local: SocketAddrV4,
    pub(super) peer: SocketAddrV4,
    pub(super) mine: Segment,
    pub(super) theirs: Segment,
    pub(super) peer_pid: libc::pid_t,
    pub(super) my_event: OwnedFd,
    pub(super) peer_event: OwnedFd,
    pub(super) sock: OwnedFd,
    pub(super) params: QpParams,
    pub(super) reserved: usize,
    pub(super) cq: Arc<super::cq::CqInner>,
}

impl Conn {
    pub(super) fn new(nic: Arc<NicInner>, p: Parts) -> Arc<Conn> {
        let (out, _) = p.mine.ring();
        let (_, inc) = p.theirs.ring();
        let light_wake = sys::asymmetric_fences() && p.theirs.heavy_arm();
        let recv_depth = p.params.recv_depth as usize;
        let max_sge = p.params.max_sge as usize;
        let spare = (0..recv_depth)
            .map(|_| RecvSlot {
                wr_id: 0,
                sges: Vec::with_capacity(max_sge),
                done: None,
            })
            .collect();
        Arc::new(Conn {
            nic,
            num: p.num,
            local: p.local,
            peer: p.peer,
            mine: p.mine,
            theirs: p.theirs,
            peer_pid: p.peer_pid,
            my_event: p.my_event,
            peer_event: p.peer_event,
            light_wake,
            sock: p.sock,
            peer_proc: sys::pidfd(p.peer_pid).ok(),
            tokens: Mutex::new(Vec::new()),
            peer_gone: AtomicBool::new(false),
            cq: p.cq,
            events: p.params.events.clone(),
            send_depth: p.params.send_depth as usize,
            max_sge,
            reserved: p.reserved,
            dropped: AtomicBool::new(false),
            st: SpinLock::new(State {
                out,
                inc,
                sq: VecDeque::with_capacity(p.params.send_depth as usize),
                rq: VecDeque::with_capacity(recv_depth),
                spare,
                filled: 0,
                broken: None,
                told: false,
                gather: Vec::with_capacity(sys::MAX_IOV),
                lkeys: LkeyCache::default(),
            }),
            window: Mutex::new(Vec::new()),
        })
    }

    /// Wakes the peer if it sleeps (after we published work for it). The
    /// store that published the work and the load of `armed` need a full
    /// fence between them (Dekker, with the peer's `arm`), unless the peer
    /// arms with a heavy fence that reaches this process: then a compiler
    /// fence is enough (`light_wake`), and the hot path has no locked
    /// instruction.
    fn wake_peer(&self) {
        if self.light_wake {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        let armed = &self.theirs.control().armed;
        if armed.load(Ordering::Relaxed) != 0 && armed.swap(0, Ordering::AcqRel) != 0 {
            sys::signal(self.peer_event.as_raw_fd());
        }
    }

    /// Asks the peer for a wake-up on new work: the first half of an arm
    /// (then [`arm_fence`], then [`Conn::has_work`]).
    pub(super) fn mark_armed(&self) {
        self.mine.control().armed.store(1, Ordering::Relaxed);
    }

    /// Whether a poll would find something to do. A send waiting for a
    /// receive is not work (a poller would spin on it): the receive's post
    /// wakes the CQ.
    pub(super) fn has_work(&self) -> bool {
        let st = self.st.lock();
        if st.broken.is_some() {
            return !st.told || !st.sq.is_empty() || !st.rq.is_empty();
        }
        if self.peer_gone.load(Ordering::Acquire)
            || self.theirs.control().state.load(Ordering::Acquire) != STATE_INTACT
            || st.rq.front().is_some_and(|r| r.done.is_some())
        {
            return true;
        }
        let can_match = st.rq.len() > st.filled;
        let arrived = st.inc.peek().is_some_and(|m| {
            m.decode()
                .map_or(true, |d| d.op != CellOp::Send || can_match)
        });
        let consumed = st.out.ring().consumed();
        arrived
            || st
                .sq
                .front()
                .is_some_and(|e| e.kind.map_or(true, |i| i < consumed))
    }

    fn check_local(&self, st: &mut State, sges: &[Sge], need: Access) -> bool {
        self.nic.pd.check(&mut st.lkeys, sges, need)
    }

    pub(super) fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge {
            return Err(PostError::TooManySge);
        }
        let mut st = self.st.lock();
        if st.sq.len() >= self.send_depth {
            return Err(PostError::QueueFull);
        }
        let opcode = super::opcode_of(&wr.op);
        let len: u64 = wr.sges.iter().map(|s| u64::from(s.len)).sum();
        let done = |st: &mut State, status| {
            st.sq.push_back(SqEntry {
                wr_id: wr.wr_id,
                opcode,
                len: 0,
                kind: Err(status),
            })
        };
        if let Some(b) = st.broken {
            done(&mut st, b.status);
            drop(st);
            self.cq.wake();
            return Ok(());
        }
        let Ok(len) = u32::try_from(len) else {
            done(&mut st, WcStatus::LocalLengthError);
            drop(st);
            self.break_conn(STATE_CLOSED, true);
            return Ok(());
        };
        let need = match wr.op {
            SendOp::RdmaRead { .. } => Access::LOCAL_WRITE,
            _ => Access::NONE,
        };
        if !self.check_local(&mut st, wr.sges, need) {
            done(&mut st, WcStatus::LocalProtectionError);
            drop(st);
            self.break_conn(STATE_CLOSED, true);
            return Ok(());
        }
        let index = match wr.op {
            // SAFETY: the entries were just checked against our regions,
            // which stay registered while a request names them
            // (`Nic::deregister` contract); `len` is their total.
            SendOp::Send => unsafe { st.out.push(wr.sges, len, 0) },
            SendOp::RdmaWrite { remote_addr, rkey } => {
                st.out
                    .push_rdma(CellOp::Write { remote_addr, rkey }, wr.sges, len)
            }
            SendOp::RdmaRead { remote_addr, rkey } => {
                st.out
                    .push_rdma(CellOp::Read { remote_addr, rkey }, wr.sges, len)
            }
        };
        // The ring has a cell per send-queue slot.
        let index = index.ok_or(PostError::QueueFull)?;
        st.sq.push_back(SqEntry {
            wr_id: wr.wr_id,
            opcode,
            len,
            kind: Ok(index),
        });
        drop(st);
        self.wake_peer();
        Ok(())
    }

    pub(super) fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge {
            return Err(PostError::TooManySge);
        }
        let mut st = self.st.lock();
        let Some(mut slot) = st.spare.pop() else {
            return Err(PostError::QueueFull);
        };
        slot.wr_id = wr.wr_id;
        slot.sges.clear();
        slot.sges.extend_from_slice(wr.sges);
        slot.done = None;
        let bad = !self.check_local(&mut st, wr.sges, Access::LOCAL_WRITE);
        if let Some(b) = st.broken {
            slot.done = Some((b.status, 0));
        } else if bad {
            slot.done = Some((WcStatus::LocalProtectionError, 0));
        }
        st.rq.push_back(slot);
        // A receive completed at once is reaped with those before it.
        let fail = bad && st.broken.is_none();
        drop(st);
        if fail {
            self.break_conn(STATE_CLOSED, true);
        }
        // A message waiting for a receive may match now, here.
        self.cq.wake();
        Ok(())
    }

    /// Breaks the connection from this end with `state` (unless it is
    /// broken already), then waits for the seal.
    /// `tell_failed`: this end failed (else a local close, told nothing).
    pub(super) fn break_conn(&self, state: u32, tell_failed: bool) {
        let mut st = self.st.lock();
        self.break_locked(&mut st, state, None, tell_failed);
        drop(st);
        self.cq.wake();
    }

    fn break_locked(
        &self,
        st: &mut State,
        state: u32,
        refused: Option<(u64, WcStatus)>,
        tell_failed: bool,
    ) {
        if st.broken.is_some() {
            return;
        }
        let c = self.mine.control();
        if let Some((index, status)) = refused {
            c.refused
                .store((index + 1) << 8 | status as u64, Ordering::Relaxed);
        }
        c.state.store(state, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // The seal: no copy of the peer's is running once `busy` is clear.
        let deadline = Instant::now() + SEAL_WAIT;
        while self.theirs.control().busy.load(Ordering::Acquire) != 0
            && !self.peer_gone.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        st.broken = Some(match state {
            // We refused a request of the peer: it failed, we are told.
            STATE_PEER_FAILED => Broken {
                status: WcStatus::RemoteDisconnected,
                own: None,
                tell: Some(false),
            },
            _ => Broken {
                status: WcStatus::Flushed,
                own: None,
                tell: tell_failed.then_some(true),
            },
        });
        sys::signal(self.peer_event.as_raw_fd());
    }

    /// Reacts to the peer's state word or its death (under `st`).
    fn follow_peer(&self, st: &mut State) {
        if st.broken.is_some() {
            return;
        }
        let theirs = self.theirs.control();
        let peer_state = theirs.state.load(Ordering::Acquire);
        let gone = self.peer_gone.load(Ordering::Acquire);
        if peer_state == STATE_INTACT && !gone {
            return;
        }
        let refused = theirs.refused.load(Ordering::Relaxed);
        let own = (refused != 0).then(|| ((refused >> 8) - 1, super::status_from(refused as u8)));
        // The peer refused a request of ours: we failed. A failure is ours
        // to report (`failed`) only if it is one a NIC finds locally (our
        // gather list); a key or access check the owner of the memory
        // refused is the remote side's answer (`disconnected`), as on the
        // soft fabric (spec §7-5: `WSAECONNRESET`, not `WSAECONNABORTED`).
        let remote = |s: WcStatus| {
            matches!(
                s,
                WcStatus::RemoteAccessError | WcStatus::RemoteInvalidRequest
            )
        };
        let refused_ours = peer_state == STATE_PEER_FAILED;
        let failed = refused_ours && !own.is_some_and(|(_, s)| remote(s));
        self.mine
            .control()
            .state
            .store(STATE_CLOSED, Ordering::SeqCst);
        st.broken = Some(Broken {
            status: if refused_ours {
                WcStatus::Flushed
            } else {
                WcStatus::RemoteDisconnected
            },
            own: own.filter(|_| peer_state != STATE_CLOSED),
            tell: Some(failed),
        });
    }

    /// Executes what arrived, then moves up to `out.len()` completions
    /// into `out`; how many.
    pub(super) fn poll(&self, out: &mut [WorkCompletion]) -> usize {
        let mut st = self.st.lock();
        self.follow_peer(&mut st);
        let consumed = st.broken.is_none() && self.progress(&mut st);
        if consumed {
            st.inc.publish();
        }
        let n = self.reap(&mut st, out);
        let tell = match st.broken {
            Some(b) if !st.told => {
                st.told = true;
                b.tell
            }
            _ => None,
        };
        drop(st);
        // Not under the lock: a wake may be a syscall.
        if consumed {
            self.wake_peer();
        }
        match tell {
            Some(true) => self.events.failed(),
            Some(false) => self.events.disconnected(),
            None => {}
        }
        n
    }

    /// Matches incoming messages while receives (or RDMA) let it; whether
    /// any was consumed.
    fn progress(&self, st: &mut State) -> bool {
        // Nothing arrived: nothing to copy.
        if st.inc.peek().is_none() {
            return false;
        }
        // A peer that broke sends nothing more worth taking (a stale read
        // only lets a message in that the break raced with anyway).
        if self.theirs.control().state.load(Ordering::Acquire) != STATE_INTACT {
            return false;
        }
        let mut seal = SealSide {
            conn: self,
            entered: false,
        };
        let mut moved = false;
        while let Some(r) = self.step(st, &mut seal) {
            match r {
                Ok(()) => moved = true,
                Err((index, status, state)) => {
                    seal.leave();
                    let failed = state == STATE_OWNER_FAILED;
                    self.break_locked(st, state, Some((index, status)), failed);
                    return moved;
                }
            }
        }
        seal.leave();
        moved
    }

    /// Executes the message at the head of the incoming ring: `None` if
    /// there is none or it must wait for a receive; `Err` with the cell
    /// index, the peer's status and our new state if it failed.
    #[allow(clippy::type_complexity)]
    fn step(
        &self,
        st: &mut State,
        seal: &mut SealSide<'_>,
    ) -> Option<Result<(), (u64, WcStatus, u32)>> {
        let State {
            inc,
            rq,
            filled,
            gather,
            ..
        } = st;
        let index = inc.head();
        let msg = inc.peek()?;
        let Some(d) = msg.decode() else {
            return Some(Err((
                index,
                WcStatus::RemoteInvalidRequest,
                STATE_PEER_FAILED,
            )));
        };
        gather.resize(
            sys::MAX_IOV,
            Sge {
                addr: 0,
                len: 0,
                lkey: 0,
            },
        );
        let r = match d.op {
            CellOp::Send => {
                let recv = rq.get_mut(*filled)?;
                let room: u64 = recv.sges.iter().map(|s| u64::from(s.len)).sum();
                if u64::from(d.len) > room {
                    recv.done = Some((WcStatus::LocalLengthError, 0));
                    *filled += 1;
                    Err((index, WcStatus::RemoteInvalidRequest, STATE_OWNER_FAILED))
                } else if d.nsge == 0 {
                    // Straight from the cell: no staging copy. The peer
                    // may rewrite the bytes meanwhile (only a corrupt one
                    // does), which gives the receive garbage, nothing worse.
                    let src = msg.inline_src(&d);
                    // SAFETY: `src` lies in the cell's payload, mapped and
                    // not given back before `inc.pop()` below; the
                    // receive's entries were checked against our regions
                    // (LOCAL_WRITE) at post time, stay registered until it
                    // completes, and nothing else writes them meanwhile
                    // (`Nic::register`); `d.len <= room`.
                    unsafe { super::copy_local(&[src], &recv.sges) };
                    recv.done = Some((WcStatus::Success, d.len));
                    *filled += 1;
                    Ok(())
                } else {
                    let Some(src) = msg.gather_into(&d, gather) else {
                        return Some(Err((
                            index,
                            WcStatus::RemoteInvalidRequest,
                            STATE_PEER_FAILED,
                        )));
                    };
                    if !seal.enter() {
                        return None;
                    }
                    match read_long(self.peer_pid, &recv.sges, d.len, src) {
                        Ok(()) => {
                            recv.done = Some((WcStatus::Success, d.len));
                            *filled += 1;
                            Ok(())
                        }
                        Err(_) => Err((index, WcStatus::LocalProtectionError, STATE_PEER_FAILED)),
                    }
                }
            }
            CellOp::Write { remote_addr, rkey } | CellOp::Read { remote_addr, rkey } => {
                let write = matches!(d.op, CellOp::Write { .. });
                let Some(remote) = msg.gather_into(&d, gather) else {
                    return Some(Err((
                        index,
                        WcStatus::RemoteInvalidRequest,
                        STATE_PEER_FAILED,
                    )));
                };
                let need = if write {
                    Access::REMOTE_WRITE
                } else {
                    Access::REMOTE_READ
                };
                if !seal.enter() {
                    return None;
                }
                let window = lock(&self.window);
                let local = check_window(&window, rkey, remote_addr, d.len as usize, need);
                let r = match local {
                    None => Err(WcStatus::RemoteAccessError),
                    Some(addr) => {
                        let here = [Sge {
                            addr,
                            len: d.len,
                            lkey: 0,
                        }];
                        let dir = if write { Cma::Read } else { Cma::Write };
                        sys::cma(dir, self.peer_pid, &here, remote)
                            .map_err(|_| WcStatus::LocalProtectionError)
                    }
                };
                drop(window);
                r.map_err(|s| (index, s, STATE_PEER_FAILED))
            }
        };
        if r.is_ok() {
            inc.pop();
        }
        Some(r)
    }

    /// Moves completions into `out`: receives, then send-queue requests,
    /// each in posting order.
    fn reap(&self, st: &mut State, out: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        let broken = st.broken;
        while n < out.len() {
            let Some(front) = st.rq.front() else { break };
            let (status, len) = match (front.done, broken) {
                (Some(d), _) => d,
                (None, Some(b)) => (b.status, 0),
                (None, None) => break,
            };
            out[n] = WorkCompletion {
                wr_id: front.wr_id,
                status,
                opcode: WcOpcode::Recv,
                byte_len: len,
            };
            n += 1;
            let slot = st.rq.pop_front().expect("a front");
            st.filled = st.filled.saturating_sub(1);
            st.spare.push(slot);
        }
        // The peer writes this line for every message it takes: a poll
        // with nothing outstanding leaves it alone.
        let consumed = if st.sq.is_empty() {
            0
        } else {
            st.out.ring().consumed().min(st.out.tail())
        };
        while n < out.len() {
            let Some(e) = st.sq.front() else { break };
            let (status, len) = match (e.kind, broken) {
                (Err(s), _) => (s, 0),
                (Ok(i), _) if i < consumed => (WcStatus::Success, e.len),
                (Ok(i), Some(b)) => match b.own {
                    Some((f, s)) if f == i => (s, 0),
                    _ => (b.status, 0),
                },
                (Ok(_), None) => break,
            };
            out[n] = WorkCompletion {
                wr_id: e.wr_id,
                status,
                opcode: e.opcode,
                byte_len: len,
            };
            n += 1;
            st.sq.pop_front();
        }
        n
    }

    /// Whether the peer hung up without closing first: it died (or its
    /// process is exiting).
    pub(super) fn peer_died(&self) -> bool {
        self.theirs.control().state.load(Ordering::Acquire) == STATE_INTACT
    }

    /// Whether nothing is outstanding (a dropped end can be forgotten).
    pub(super) fn drained(&self) -> bool {
        let st = self.st.lock();
        st.sq.is_empty() && st.rq.is_empty()
    }
}

/// This end's side of the seal (module docs) during one `progress`: the
/// `busy` word is stored, and fenced, only before the first copy that
/// touches the peer's memory (`process_vm_readv` / `process_vm_writev`). An
/// inline send reads the cell and writes this process's own receive, which
/// the peer's break does not wait for: the common small message pays no
/// store and no fence here.
struct SealSide<'a> {
    conn: &'a Conn,
    /// Whether `busy` is set.
    entered: bool,
}

impl SealSide<'_> {
    /// Says this end copies (once); whether the peer is still intact, so
    /// the copy may go ahead. Store, full fence, then the peer's state
    /// load: a break (state store, fence, `busy` load) and this see each
    /// other.
    fn enter(&mut self) -> bool {
        if !self.entered {
            self.conn.mine.control().busy.store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            self.entered = true;
        }
        self.conn.theirs.control().state.load(Ordering::SeqCst) == STATE_INTACT
    }

    /// Done copying (Release: the copies happen before the peer's break
    /// sees `busy` clear).
    fn leave(self) {
        if self.entered {
            self.conn.mine.control().busy.store(0, Ordering::Release);
        }
    }
}

/// Reads a long message's `len` bytes from the sender's gather list `src`
/// into the scatter list `dst` (one `process_vm_readv`). Out of line: its
/// arrays of entries would otherwise swell the stack frame of every poll.
#[inline(never)]
fn read_long(pid: libc::pid_t, dst: &[Sge], len: u32, src: &[Sge]) -> std::io::Result<()> {
    let (dst, n) = trim(dst, len);
    sys::cma(Cma::Read, pid, &dst[..n], src)
}

/// The first `len` bytes of a scatter list.
fn trim(sges: &[Sge], mut len: u32) -> ([Sge; sys::MAX_IOV], usize) {
    let mut out = [Sge {
        addr: 0,
        len: 0,
        lkey: 0,
    }; sys::MAX_IOV];
    let mut n = 0;
    for s in sges.iter().take(sys::MAX_IOV) {
        if len == 0 {
            break;
        }
        let take = s.len.min(len);
        out[n] = Sge { len: take, ..*s };
        len -= take;
        n += 1;
    }
    (out, n)
}

/// The local address of `[addr, +len)` if `rkey` allows `need` on all of it.
fn check_window(w: &[WindowKey], rkey: u32, addr: u64, len: usize, need: Access) -> Option<usize> {
    let k = w.iter().find(|k| k.rkey == rkey)?;
    let addr = usize::try_from(addr).ok()?;
    let inside = addr >= k.addr && addr.checked_add(len).is_some_and(|e| e <= k.addr + k.len);
    (k.access.contains(need) && inside).then_some(addr)
}
