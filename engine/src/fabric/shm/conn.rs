//! One end of a shared-memory connection in this process: its work
//! queues, the outgoing ring (in its own segment) and the incoming ring (in
//! the peer's), the keys it exposed to the peer, and the seal. Of its CQ
//! it holds only the shared part ([`CqShared`]: what wakes the CQ, and
//! the entries the end reserved), not the CQ, whose list of ends holds it.
//!
//! # Who does what
//!
//! Posting threads take the end's post lock (`post`: the outgoing ring's
//! producer, the registration cache) and hand their requests to the poller
//! through the work queues ([`wq`](super::wq), lock-free). What the poll
//! side owns ([`PollSide`]: the incoming ring's consumer, how far the
//! receives were filled) lives in the CQ's list of ends, under the CQ's
//! consumer lock: a poll takes no lock of the end's. A send of up to
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
//! A poll takes messages in a *pass* (`SealSide`): it raises its `busy`
//! word, fences, and takes nothing if either end broke; it publishes the
//! consumed index before it clears `busy`. An end that breaks the
//! connection (close, a refused request, a failed copy, garbage in a cell)
//! first stops its own poller (`stopping`, a fence, then it waits for its
//! own `busy` to clear), then stores its state word, fences, and waits
//! until the peer's `busy` is clear. So once the break returned the peer
//! touches none of this end's memory, and the consumed indexes of both
//! directions are final: an end that sees the other's state word broken
//! reads, after it, every message the other took, and its requests the
//! peer took complete with success, the others flushed (each exactly
//! once, with the status the peer's side agrees with). A peer that died
//! (its socket hung up) takes nothing more.
//!
//! The first break, from whichever thread (a close, a post that failed its
//! checks, the poller refusing a message or following the peer's break or
//! death), writes the record of how the outstanding requests complete
//! (`broken`, under its lock, held across the seal), then raises
//! `is_broken`, which the hot paths read instead. A post that raced the
//! break went to the ring (consumed by the peer: success; else flushed), or
//! completes with the break's status; a receive that failed its own check
//! is never filled (the poller stops at it until the break lands).
//!
//! # Cache lines per message
//!
//! One line moves per direction for a small message, as in UCX's
//! shared-memory FIFO: an inline send of up to 40 bytes writes its cell's
//! first line (sequence word, header with the acknowledgement, payload),
//! and the receiver's poll reads only that line of the peer's memory
//! (besides the peer's state word, which changes only when the connection
//! breaks). A request is done once the peer consumed its cell; the sender
//! learns it from the acknowledgement in the peer's next message (how many
//! of ours it had consumed), so in a request/response exchange the answer
//! carries it. The receiver also publishes the ring's consumed index
//! after each poll that took messages, a line that stays in its own cache
//! as long as the sender does not read it: the sender reads it when its
//! ring looks full, when the peer acknowledges nothing (a one-way flow),
//! and when an acknowledgement is overdue (`Conn::read_consumed`). The
//! wake-up word (`armed`) is read after each publication, from the
//! reader's own cache while the peer polls; it changes only around a
//! sleep, and `busy` only around a CMA copy, each on a line of its own.
//! Everything else a post or a poll touches is the process's own (work
//! queues, the poll side, the CQ).

use super::notify::CqShared;
use super::seg::{Segment, STATE_CLOSED, STATE_INTACT, STATE_OWNER_FAILED, STATE_PEER_FAILED};
use super::sys::{self, Cma};
use super::wq::{RecvQueue, RqKind, SendQueue, SqEntry, SqKind};
use super::NicInner;
use crate::fabric::lkey_cache::LkeyCache;
use crate::fabric::soft::cell::{copy_bytes, CellConsumer, CellOp, CellProducer, CellRing};
use crate::fabric::*;
use crate::spin::SpinLock;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{compiler_fence, fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a break waits for a live peer's copy in progress.
const SEAL_WAIT: Duration = Duration::from_secs(1);

/// How long (in [`sys::ticks`], about 4-8 us) a ring request waits for the
/// peer's acknowledgement before its end reads the consumed index
/// (`Conn::read_consumed`): well above a round trip, so that a peer that
/// answers is never asked, and short enough for a peer that sends nothing
/// back, until [`UNACKED_READS`] such reads in a row say so.
const ACK_WAIT_TICKS: u64 = 16384;
/// Requests found done by reading the consumed index after
/// [`ACK_WAIT_TICKS`], in a row, after which the end reads it at the first
/// poll of each wait: the peer does not answer.
const UNACKED_READS: u8 = 2;

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

/// What the posting threads share, under `Conn::post`.
struct PostSide {
    out: CellProducer,
    /// The regions this end's posts named lately.
    lkeys: LkeyCache,
}

/// What the poller of the end's CQ owns: kept in the CQ's list of ends,
/// reached only under the CQ's consumer lock.
pub(super) struct PollSide {
    inc: CellConsumer,
    /// Receives filled by a message, `head <= filled <= tail` of the
    /// receive queue.
    filled: u64,
    /// The results of the filled receives not given back yet, by receive
    /// index modulo the length (a power of two above the depth).
    results: Box<[(WcStatus, u32)]>,
    /// Whether `QpEvents` was told of the break.
    told: bool,
    /// Messages of this end the peer acknowledged in its own messages
    /// (the highest `ack` of a cell executed): `<=` what it consumed, but
    /// for a corrupt peer's, which completes no more than the requests
    /// this end has.
    acked: u64,
    /// Messages of this end known consumed from the last read of the
    /// outgoing ring's consumed index.
    read: u64,
    /// `index + 1` of the ring request whose acknowledgement is awaited
    /// (0: none), and the [`sys::ticks`] of the wait's start or of the last
    /// read of the consumed index.
    waiting: u64,
    wait_since: u64,
    /// Requests in a row found done by reading the consumed index, not by
    /// an acknowledgement, up to [`UNACKED_READS`]: from there on, the
    /// peer is taken to send nothing back, and each wait reads the index
    /// at its first poll.
    unacked_reads: u8,
    /// The peer's gather list of the message being executed (up to
    /// `MAX_IOV` entries, checked).
    gather: Vec<Sge>,
    /// The entries of the receive being filled.
    dst: Vec<Sge>,
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
    /// The outgoing ring, for its consumed index (the producer is in
    /// `post`).
    pub(super) out_ring: Arc<CellRing>,
    /// The incoming ring, for its consumed index: what a post
    /// acknowledges (the consumer is in the poll side).
    in_ring: Arc<CellRing>,
    pub(super) peer_pid: libc::pid_t,
    /// Signalled by the peer to wake us; watched by the NIC's event thread.
    pub(super) my_event: OwnedFd,
    /// Signalled by us to wake the peer.
    peer_event: OwnedFd,
    /// Whether waking the peer needs only a compiler fence: this process
    /// takes part in asymmetric fences and the peer arms with a heavy one
    /// (read once from its segment's header). Sound because this process
    /// registered before it made its segment (`Segment::create` asks
    /// `sys::asymmetric_fences`), and the peer arms this connection only
    /// after it mapped that segment: every heavy fence the peer issues for
    /// it reaches this process's threads.
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
    /// The CQ's shared part: woken after a post, a receive or a break gave
    /// its poller work; `reserved` entries of its budget are this end's.
    pub(super) cq: Arc<CqShared>,
    events: Arc<dyn QpEvents>,
    max_sge: usize,
    /// Entries reserved on the CQ.
    pub(super) reserved: usize,
    /// Set when the queue pair handle dropped.
    pub(super) dropped: AtomicBool,
    /// Posting (module docs). A spin lock: one locked instruction to take,
    /// none to release, where a `Mutex` pays two. Its holder never blocks.
    post: SpinLock<PostSide>,
    /// Send-queue requests, posted under `post`, completed by the poller.
    sq: SendQueue,
    /// Receives, posted under `post`, filled and completed by the poller.
    rq: RecvQueue,
    /// How outstanding requests complete once broken: set once, by the
    /// first break (whoever makes it holds the lock across the seal).
    broken: Mutex<Option<Broken>>,
    /// Whether `broken` is set (Release after it is): what the hot paths
    /// read instead of the lock.
    is_broken: AtomicBool,
    /// Set by this end's break before it waits for its own poller and then
    /// stores its state word: the poller takes no message once it raised
    /// `busy` and saw it (`SealSide::enter`).
    stopping: AtomicBool,
    /// Test hook: holds the poller after a message was taken.
    #[cfg(test)]
    pub(super) hook: super::hook::Hook,
    /// Keys this end exposed to the peer; locked across each RDMA the peer
    /// asked for.
    /// A spin lock: the poller takes it once per RDMA (one locked
    /// instruction, where a `Mutex` pays two); a binding, an unbinding or
    /// a deregistration takes it rarely, and waits (yielding) for a copy in
    /// progress, as it must.
    pub(super) window: SpinLock<Vec<WindowKey>>,
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
    pub(super) cq: Arc<CqShared>,
}

impl Conn {
    /// The end, and its poll side (for its CQ's list of ends).
    pub(super) fn new(nic: Arc<NicInner>, p: Parts) -> (Arc<Conn>, PollSide) {
        let (out, _) = p.mine.ring();
        let (_, inc) = p.theirs.ring();
        let in_ring = inc.ring().clone();
        let light_wake = sys::asymmetric_fences() && p.theirs.heavy_arm();
        let recv_depth = p.params.recv_depth as usize;
        let max_sge = p.params.max_sge as usize;
        let poll = PollSide {
            inc,
            filled: 0,
            results: vec![(WcStatus::Success, 0); recv_depth.max(1).next_power_of_two()]
                .into_boxed_slice(),
            told: false,
            acked: 0,
            read: 0,
            waiting: 0,
            wait_since: 0,
            unacked_reads: UNACKED_READS,
            gather: vec![
                Sge {
                    addr: 0,
                    len: 0,
                    lkey: 0
                };
                sys::MAX_IOV
            ],
            dst: Vec::with_capacity(max_sge),
        };
        let conn = Arc::new(Conn {
            nic,
            num: p.num,
            local: p.local,
            peer: p.peer,
            out_ring: out.ring().clone(),
            in_ring,
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
            max_sge,
            reserved: p.reserved,
            dropped: AtomicBool::new(false),
            post: SpinLock::new(PostSide {
                out,
                lkeys: LkeyCache::default(),
            }),
            sq: SendQueue::new(p.params.send_depth as usize),
            rq: RecvQueue::new(recv_depth, max_sge),
            broken: Mutex::new(None),
            is_broken: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            #[cfg(test)]
            hook: super::hook::Hook::default(),
            window: SpinLock::new(Vec::new()),
        });
        (conn, poll)
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

    /// Asks the peer for a wake-up on new work: the first step of the
    /// CQ's arm (then its fence, once for all its ends, then
    /// [`Conn::has_work`]).
    pub(super) fn mark_armed(&self) {
        self.mine.control().armed.store(1, Ordering::Relaxed);
    }

    /// The break's record, once broken.
    fn broken(&self) -> Option<Broken> {
        if !self.is_broken.load(Ordering::Acquire) {
            return None;
        }
        *lock(&self.broken)
    }

    /// Whether a poll would find something to do. A send waiting for a
    /// receive is not work (a poller would spin on it): the receive's post
    /// wakes the CQ.
    pub(super) fn has_work(&self, ps: &mut PollSide) -> bool {
        if self.is_broken.load(Ordering::Acquire) {
            return !ps.told || !self.sq.is_empty() || !self.rq.is_empty();
        }
        if self.peer_gone.load(Ordering::Acquire)
            || self.theirs.control().link.state.load(Ordering::Acquire) != STATE_INTACT
            || ps.filled > self.rq.head()
        {
            return true;
        }
        let can_match = self.rq.tail() > ps.filled;
        let arrived = ps.inc.peek().is_some_and(|m| {
            m.decode()
                .map_or(true, |d| d.op != CellOp::Send || can_match)
        });
        arrived
            || self.sq.front().is_some_and(|e| match e.kind {
                // Read for the poll that follows too: an end that sleeps
                // between polls would otherwise not learn it until the
                // acknowledgement is overdue.
                SqKind::Ring(i) => {
                    ps.read = ps.read.max(self.out_ring.consumed());
                    i < ps.acked || i < ps.read
                }
                _ => true,
            })
    }

    fn check_local(&self, post: &mut PostSide, sges: &[Sge], need: Access) -> bool {
        self.nic.pd.check(&mut post.lkeys, sges, need)
    }

    pub(super) fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge {
            return Err(PostError::TooManySge);
        }
        let mut post = self.post.lock();
        if !self.sq.has_room() {
            return Err(PostError::QueueFull);
        }
        if self.is_broken.load(Ordering::Acquire) {
            return self.post_done(post, wr, SqKind::Flush);
        }
        let len: u64 = wr.sges.iter().map(|s| u64::from(s.len)).sum();
        let Ok(len) = u32::try_from(len) else {
            return self.post_done(post, wr, SqKind::Failed(WcStatus::LocalLengthError));
        };
        let need = match wr.op {
            SendOp::RdmaRead { .. } => Access::LOCAL_WRITE,
            _ => Access::NONE,
        };
        if !self.check_local(&mut post, wr.sges, need) {
            return self.post_done(post, wr, SqKind::Failed(WcStatus::LocalProtectionError));
        }
        // Piggybacked: how many of the peer's messages this end consumed
        // (the word its poll side publishes, in the peer's segment).
        let ack = self.in_ring.consumed();
        let index = match wr.op {
            // SAFETY: the entries were just checked against our regions,
            // which stay registered while a request names them
            // (`Nic::deregister` contract); `len` is their total.
            SendOp::Send => unsafe { post.out.push(wr.sges, len, ack) },
            SendOp::RdmaWrite { remote_addr, rkey } => {
                post.out
                    .push_rdma(CellOp::Write { remote_addr, rkey }, wr.sges, len, ack)
            }
            SendOp::RdmaRead { remote_addr, rkey } => {
                post.out
                    .push_rdma(CellOp::Read { remote_addr, rkey }, wr.sges, len, ack)
            }
        };
        // The ring has a cell per send-queue slot, and the queue had room.
        let index = index.ok_or(PostError::QueueFull)?;
        let pushed = self.sq.push(SqEntry {
            wr_id: wr.wr_id,
            opcode: super::opcode_of(&wr.op),
            len,
            kind: SqKind::Ring(index),
        });
        debug_assert!(pushed.is_ok(), "room was checked under the post lock");
        drop(post);
        self.wake_peer();
        Ok(())
    }

    /// A send-queue request completed at once, without the ring: posted on
    /// a broken connection, or failed (then the end breaks).
    #[cold]
    #[inline(never)]
    fn post_done(
        &self,
        post: crate::spin::SpinGuard<'_, PostSide>,
        wr: &SendWr<'_>,
        kind: SqKind,
    ) -> Result<(), PostError> {
        let pushed = self.sq.push(SqEntry {
            wr_id: wr.wr_id,
            opcode: super::opcode_of(&wr.op),
            len: 0,
            kind,
        });
        debug_assert!(pushed.is_ok(), "room was checked under the post lock");
        drop(post);
        if kind != SqKind::Flush {
            self.break_conn(STATE_CLOSED, true);
        }
        self.cq.wake();
        Ok(())
    }

    pub(super) fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge {
            return Err(PostError::TooManySge);
        }
        let mut post = self.post.lock();
        let bad = !self.check_local(&mut post, wr.sges, Access::LOCAL_WRITE);
        let broken = self.is_broken.load(Ordering::Acquire);
        let kind = if broken {
            RqKind::Flush
        } else if bad {
            RqKind::Failed(WcStatus::LocalProtectionError)
        } else {
            RqKind::Posted
        };
        if !self.rq.push(wr.wr_id, wr.sges, kind) {
            return Err(PostError::QueueFull);
        }
        drop(post);
        // A receive completed at once is reaped with those before it.
        if bad && !broken {
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
        self.break_with(state, None, tell_failed);
        self.cq.wake();
    }

    fn break_with(&self, state: u32, refused: Option<(u64, WcStatus)>, tell_failed: bool) {
        let mut b = lock(&self.broken);
        if b.is_some() {
            return;
        }
        let c = self.mine.control();
        // Our poller first: it takes no message after it saw `stopping`,
        // and one taking messages now published the consumed index before
        // it clears `busy`. So the state word below comes after every
        // message this end took: a peer that saw it reads the final index.
        // (From the poller itself `busy` is clear already.)
        self.stopping.store(true, Ordering::Relaxed);
        seal_fence();
        self.wait_clear(&c.busy);
        if let Some((index, status)) = refused {
            c.link
                .refused
                .store((index + 1) << 8 | status as u64, Ordering::Relaxed);
        }
        c.link.state.store(state, Ordering::SeqCst);
        seal_fence();
        // The seal: no copy of the peer's is running once `busy` is clear,
        // and what the peer took is in the consumed index.
        self.wait_clear(&self.theirs.control().busy);
        *b = Some(match state {
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
        self.is_broken.store(true, Ordering::Release);
        drop(b);
        sys::signal(self.peer_event.as_raw_fd());
    }

    /// Waits (bounded by [`SEAL_WAIT`], and not for a dead peer) until a
    /// `busy` word is clear.
    fn wait_clear(&self, busy: &std::sync::atomic::AtomicU32) {
        let deadline = Instant::now() + SEAL_WAIT;
        while busy.load(Ordering::Acquire) != 0
            && !self.peer_gone.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            #[cfg(test)]
            self.hook.note_break();
            std::thread::yield_now();
        }
    }

    /// Reacts to the peer's state word or its death (on the poll side):
    /// whether the peer is intact and alive (else the connection is
    /// broken now, if it was not).
    #[inline(always)]
    fn follow_peer(&self) -> bool {
        let peer_state = self.theirs.control().link.state.load(Ordering::Acquire);
        if peer_state != STATE_INTACT || self.peer_gone.load(Ordering::Acquire) {
            self.peer_broke(peer_state);
            return false;
        }
        true
    }

    #[cold]
    #[inline(never)]
    fn peer_broke(&self, peer_state: u32) {
        let theirs = self.theirs.control();
        let mut b = lock(&self.broken);
        if b.is_some() {
            return;
        }
        let own = theirs.link.refused();
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
            .link
            .state
            .store(STATE_CLOSED, Ordering::SeqCst);
        *b = Some(Broken {
            status: if refused_ours {
                WcStatus::Flushed
            } else {
                WcStatus::RemoteDisconnected
            },
            own: own.filter(|_| peer_state != STATE_CLOSED),
            tell: Some(failed),
        });
        self.is_broken.store(true, Ordering::Release);
    }

    /// Executes what arrived, then moves up to `out.len()` completions
    /// into `out`; how many. The caller holds the CQ's consumer lock, under
    /// which `ps` lives.
    pub(super) fn poll(&self, ps: &mut PollSide, out: &mut [WorkCompletion]) -> usize {
        // A local break that lands after this load is seen by the pass's
        // seal (`stopping`, raised before the break's state word).
        let consumed =
            !self.is_broken.load(Ordering::Acquire) && self.follow_peer() && self.progress(ps);
        let broken = self.broken();
        let n = self.reap(ps, broken, out);
        let tell = match broken {
            Some(b) if !ps.told => {
                ps.told = true;
                b.tell
            }
            _ => None,
        };
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

    /// Matches incoming messages while receives (or RDMA) let it, and
    /// publishes the consumed index; whether any was consumed. Inside the
    /// seal (`busy` raised, then either end's break seen), so a break
    /// waits for the pass and the index it publishes.
    fn progress(&self, ps: &mut PollSide) -> bool {
        // Nothing arrived: nothing to take.
        if ps.inc.peek().is_none() {
            return false;
        }
        let seal = SealSide::enter(self);
        if !seal.open {
            seal.leave();
            return false;
        }
        let mut moved = false;
        let rq_tail = self.rq.tail();
        while let Some(r) = self.step(ps, rq_tail) {
            match r {
                Ok(()) => {
                    moved = true;
                    #[cfg(test)]
                    self.hook.took();
                }
                Err((index, status, state)) => {
                    // What was taken before is the peer's to see as done:
                    // published before the break's state word.
                    if moved {
                        ps.inc.publish();
                    }
                    seal.leave();
                    let failed = state == STATE_OWNER_FAILED;
                    self.break_with(state, Some((index, status)), failed);
                    return moved;
                }
            }
        }
        if moved {
            ps.inc.publish();
        }
        seal.leave();
        moved
    }

    /// Fills the next receive with `result`.
    fn fill(&self, ps: &mut PollSide, result: (WcStatus, u32)) {
        let mask = ps.results.len() as u64 - 1;
        ps.results[(ps.filled & mask) as usize] = result;
        ps.filled += 1;
    }

    /// Executes the message at the head of the incoming ring: `None` if
    /// there is none or it must wait for a receive; `Err` with the cell
    /// index, the peer's status and our new state if it failed. An inline
    /// send is the hot path; the rest is out of line.
    #[allow(clippy::type_complexity)]
    #[inline(always)]
    fn step(&self, ps: &mut PollSide, rq_tail: u64) -> Option<Result<(), (u64, WcStatus, u32)>> {
        let index = ps.inc.head();
        let msg = ps.inc.peek()?;
        let Some(d) = msg.decode() else {
            return Some(Err((
                index,
                WcStatus::RemoteInvalidRequest,
                STATE_PEER_FAILED,
            )));
        };
        let ack = msg.ack();
        let r = if d.op == CellOp::Send {
            if ps.filled == rq_tail {
                return None;
            }
            let recv = self.rq.get(ps.filled);
            // A receive that failed at its post: the break follows.
            if recv.kind != RqKind::Posted {
                return None;
            }
            if u64::from(d.len) > recv.room {
                self.fill(ps, (WcStatus::LocalLengthError, 0));
                Err((index, WcStatus::RemoteInvalidRequest, STATE_OWNER_FAILED))
            } else if d.nsge == 0 {
                // Straight from the cell: no staging copy. The peer may
                // rewrite the bytes meanwhile (only a corrupt one does),
                // which gives the receive garbage, nothing worse.
                let src = msg.inline_src(&d);
                match self.rq.single(ps.filled) {
                    // SAFETY: `src` lies in the cell's payload, mapped and
                    // not given back before `inc.pop()` below; the
                    // receive's entries were checked against our regions
                    // (LOCAL_WRITE) at post time, stay registered until it
                    // completes, and nothing else writes them meanwhile
                    // (`Nic::register`); `d.len <= room`, the length of
                    // the one entry.
                    Some(dst) => unsafe {
                        copy_bytes(src.addr as *const u8, dst as *mut u8, src.len as usize)
                    },
                    None => {
                        self.rq.sges_into(ps.filled, &mut ps.dst);
                        // SAFETY: as above, over the receive's entries.
                        unsafe { super::copy_local(&[src], &ps.dst) }
                    }
                }
                self.fill(ps, (WcStatus::Success, d.len));
                Ok(())
            } else {
                match msg.gather_into(&d, &mut ps.gather) {
                    None => Err((index, WcStatus::RemoteInvalidRequest, STATE_PEER_FAILED)),
                    Some(_) => self.read_send(ps, index, d.len, d.nsge),
                }
            }
        } else {
            match msg.gather_into(&d, &mut ps.gather) {
                None => Err((index, WcStatus::RemoteInvalidRequest, STATE_PEER_FAILED)),
                Some(_) => self
                    .rdma(&ps.gather[..d.nsge], d.op, d.len)
                    .map_err(|s| (index, s, STATE_PEER_FAILED)),
            }
        };
        if r.is_ok() {
            // An acknowledgement beyond what this end sent (only a corrupt
            // peer's) completes no more than the requests it has.
            ps.acked = ps.acked.max(ack);
            ps.inc.pop();
        }
        Some(r)
    }

    /// A long send: one `process_vm_readv` from the sender's gather list
    /// (the first `nsge` of `ps.gather`) into the next receive.
    #[inline(never)]
    fn read_send(
        &self,
        ps: &mut PollSide,
        index: u64,
        len: u32,
        nsge: usize,
    ) -> Result<(), (u64, WcStatus, u32)> {
        self.rq.sges_into(ps.filled, &mut ps.dst);
        match read_long(self.peer_pid, &ps.dst, len, &ps.gather[..nsge]) {
            Ok(()) => {
                self.fill(ps, (WcStatus::Success, len));
                Ok(())
            }
            Err(_) => Err((index, WcStatus::LocalProtectionError, STATE_PEER_FAILED)),
        }
    }

    /// An RDMA write or read the peer asked for, against the keys this end
    /// exposed (the window locked across the copy, so an unbind waits).
    #[inline(never)]
    fn rdma(&self, remote: &[Sge], op: CellOp, len: u32) -> Result<(), WcStatus> {
        let (write, remote_addr, rkey) = match op {
            CellOp::Write { remote_addr, rkey } => (true, remote_addr, rkey),
            CellOp::Read { remote_addr, rkey } => (false, remote_addr, rkey),
            CellOp::Send => return Err(WcStatus::RemoteInvalidRequest),
        };
        let need = if write {
            Access::REMOTE_WRITE
        } else {
            Access::REMOTE_READ
        };
        let window = self.window.lock();
        let addr = check_window(&window, rkey, remote_addr, len as usize, need)
            .ok_or(WcStatus::RemoteAccessError)?;
        let here = [Sge { addr, len, lkey: 0 }];
        let dir = if write { Cma::Read } else { Cma::Write };
        sys::cma(dir, self.peer_pid, &here, remote).map_err(|_| WcStatus::LocalProtectionError)
    }

    /// Moves completions into `out`: receives, then send-queue requests,
    /// each in posting order.
    fn reap(&self, ps: &mut PollSide, broken: Option<Broken>, out: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        let head = self.rq.head();
        // Nothing filled and nothing to flush: no receive to look at.
        let tail = if ps.filled == head && broken.is_none() {
            head
        } else {
            self.rq.tail()
        };
        let mut i = head;
        let mask = ps.results.len() as u64 - 1;
        while n < out.len() && i < tail {
            let r = self.rq.get(i);
            let (status, len) = if i < ps.filled {
                ps.results[(i & mask) as usize]
            } else {
                match (r.kind, broken) {
                    (RqKind::Failed(s), Some(_)) => (s, 0),
                    (_, Some(b)) => (b.status, 0),
                    (_, None) => break,
                }
            };
            out[n] = WorkCompletion {
                wr_id: r.wr_id,
                status,
                opcode: WcOpcode::Recv,
                byte_len: len,
            };
            n += 1;
            i += 1;
        }
        if i != head {
            ps.filled = ps.filled.max(i);
            self.rq.release_to(i);
        }
        while n < out.len() {
            let Some(e) = self.sq.front() else { break };
            let (status, len) = match (e.kind, broken) {
                (SqKind::Failed(s), _) => (s, 0),
                (SqKind::Flush, Some(b)) => (b.status, 0),
                (SqKind::Flush, None) => break,
                (SqKind::Ring(i), _) if i < ps.acked => {
                    ps.unacked_reads = 0;
                    (WcStatus::Success, e.len)
                }
                (SqKind::Ring(i), _) if self.read_consumed(ps, i, broken.is_some()) => {
                    (WcStatus::Success, e.len)
                }
                (SqKind::Ring(i), Some(b)) => match b.own {
                    Some((f, s)) if f == i => (s, 0),
                    _ => (b.status, 0),
                },
                (SqKind::Ring(_), None) => break,
            };
            out[n] = WorkCompletion {
                wr_id: e.wr_id,
                status,
                opcode: e.opcode,
                byte_len: len,
            };
            n += 1;
            self.sq.pop();
        }
        n
    }

    /// Whether ring request `i`, not acknowledged by the peer's messages,
    /// is known consumed from the outgoing ring's consumed index. The peer
    /// writes that line for every message it takes, so reading it while
    /// the peer answers would pull it across once per message: the index
    /// is read at once only on a broken connection or while the peer
    /// acknowledges nothing (`unacked_reads`), else once the request waited
    /// [`ACK_WAIT_TICKS`] ([`Conn::await_ack`]).
    #[inline]
    fn read_consumed(&self, ps: &mut PollSide, i: u64, broken: bool) -> bool {
        if i < ps.read {
            return true;
        }
        if ps.unacked_reads < UNACKED_READS && !broken {
            return self.await_ack(ps, i);
        }
        ps.read = self.out_ring.consumed().max(ps.read);
        i < ps.read
    }

    /// [`Conn::read_consumed`] while an acknowledgement is expected: reads
    /// the index once request `i` waited [`ACK_WAIT_TICKS`], then again at
    /// that pace.
    #[inline(never)]
    fn await_ack(&self, ps: &mut PollSide, i: u64) -> bool {
        let now = sys::ticks();
        if ps.waiting != i + 1 {
            ps.waiting = i + 1;
            ps.wait_since = now;
            return false;
        }
        if now.wrapping_sub(ps.wait_since) < ACK_WAIT_TICKS {
            return false;
        }
        ps.wait_since = now;
        ps.read = self.out_ring.consumed().max(ps.read);
        let done = i < ps.read;
        if done {
            ps.unacked_reads += 1;
        }
        done
    }

    /// Whether the peer hung up without closing first: it died (or its
    /// process is exiting).
    pub(super) fn peer_died(&self) -> bool {
        self.theirs.control().link.state.load(Ordering::Acquire) == STATE_INTACT
    }

    /// Whether nothing is outstanding (a dropped end can be forgotten).
    pub(super) fn drained(&self) -> bool {
        self.sq.is_empty() && self.rq.is_empty()
    }
}

/// The fence of a break between its store (`stopping`, the state word) and
/// its load of a `busy` word: a heavy one where this process takes part in
/// asymmetric fences (a poller of a peer that does too, or of ours, then
/// needs only a compiler fence in [`SealSide::enter`]), else a full one.
fn seal_fence() {
    if !sys::asymmetric_fences() || !sys::heavy_fence() {
        fence(Ordering::SeqCst);
    }
}

/// This end's side of the seal (module docs) during one `progress`: `busy`
/// raised, a fence, then both ends' breaks looked at; cleared once the
/// pass published what it took. Against a break (its store, its fence,
/// then its load of `busy`) either the pass sees the break and takes
/// nothing, or the break sees `busy` and waits for the pass: its copies
/// from or into the peer's memory, and the consumed index. The fence is a
/// compiler fence where both processes take part in asymmetric fences (the
/// breaks' are heavy: `light_wake`), so a small message pays two plain
/// stores for it.
struct SealSide<'a> {
    conn: &'a Conn,
    /// Whether neither end broke: the pass may take messages.
    open: bool,
}

impl<'a> SealSide<'a> {
    #[inline(always)]
    fn enter(conn: &'a Conn) -> SealSide<'a> {
        conn.mine.control().busy.store(1, Ordering::Relaxed);
        if conn.light_wake {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        let open = !conn.stopping.load(Ordering::Relaxed)
            && conn.theirs.control().link.state.load(Ordering::Acquire) == STATE_INTACT;
        SealSide { conn, open }
    }

    /// Done (Release: the copies and the consumed index's publication
    /// happen before a break sees `busy` clear).
    #[inline(always)]
    fn leave(self) {
        self.conn.mine.control().busy.store(0, Ordering::Release);
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
