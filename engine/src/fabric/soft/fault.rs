//! Fault injection (cargo feature `fault-injection`, for tests only): faults
//! armed on one end of a soft connection, which then fails the way an RC
//! queue pair of mlx5 or rxe fails.
//!
//! What every fault ends in is the soft NIC's ordinary error path (module
//! docs of [`super`], "Errors"): the request that fails completes with its
//! own status, every other outstanding request of its end completes
//! `Flushed`, the peer's complete `RemoteDisconnected`, the failing end is
//! told [`QpEvents::failed`] and the peer [`QpEvents::disconnected`], and
//! later posts complete at once with the end's error status. No fault loses
//! or duplicates a completion, and no fault touches memory a request does not
//! name (a request that fails moves at most a prefix of its own bytes).
//!
//! Faults live in the link state, under the link lock, next to the queues
//! they act on. When none is armed on an end the post path of that end pays
//! one branch on a `bool` it already holds the lock for
//! ([`EndFaults::armed`]); without the feature the hooks are compiled out.
//!
//! A test finds the end of a connection with [`SoftNic::qp_faults`] (by its
//! local and peer address, which the SPI reports) and arms it with
//! [`QpFaults::arm`] or overruns its completion queue with
//! [`QpFaults::overrun_cq`].

use super::qp::{Effects, Link, LinkState};
use super::{lock, SoftNic};
use crate::fabric::*;
use std::net::SocketAddrV4;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Which work queue of an end a counted fault watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkQueue {
    /// Sends, RDMA writes and RDMA reads.
    Send,
    /// Receives.
    Recv,
}

/// A fault to arm on one end of a connection. Each kind is armed at most
/// once per end at a time (arming it again replaces it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The `nth` request posted from now on to `queue` (1 = the next one)
    /// executes nothing and completes with `status` (any error status); the
    /// queue pair goes to the error state and the connection breaks, as
    /// after a work-request error of a real NIC.
    FailRequest {
        queue: WorkQueue,
        nth: u32,
        status: WcStatus,
    },
    /// The next RDMA write or read of this end is refused by the peer's
    /// remote-key check: it completes `RemoteAccessError` and the
    /// connection breaks (the peer NIC NAKs it; both queue pairs go to the
    /// error state).
    RemoteKeyError,
    /// The queue pair goes to the error state in the middle of the request
    /// during which this end's send queue has moved `bytes` more bytes
    /// (sends, RDMA writes and reads count their length): an RDMA request
    /// moves only the bytes up to the budget (its prefix; a send delivers
    /// nothing, the receive it would fill completes with an error) and
    /// completes with `status`.
    ErrorAfterBytes { bytes: u64, status: WcStatus },
    /// This end's NIC stops answering: nothing this end posts executes and
    /// nothing the peer sends or RDMAs reaches it (no acknowledgement comes
    /// back). `timeout` after the peer's oldest unanswered send-queue
    /// request was posted, that request completes `RetryExceeded` (the
    /// transport retry counter ran out) and the connection breaks: the peer
    /// fails, this end sees a disconnect. A peer that posts no send-queue
    /// request never notices, as on a real fabric without keep-alives.
    StopResponding { timeout: Duration },
}

/// Faults armed on one end, in its [`LinkState`], under the link lock.
#[derive(Default)]
pub(super) struct EndFaults {
    /// Whether any field below is set (or a stalled request waits). False
    /// means the post path of this end takes its normal course after one
    /// branch. Set by `arm`, cleared once every fault fired.
    pub(super) armed: bool,
    /// `(posts left before the failing one, status)` per queue: 0 left means
    /// the next post fails. Cleared when it fires.
    fail_send: Option<(u32, WcStatus)>,
    fail_recv: Option<(u32, WcStatus)>,
    /// The next RDMA request fails its remote-key check. Cleared when it
    /// fires.
    rkey_error: bool,
    /// `(bytes the send queue may still move, status)`. Cleared when it
    /// fires.
    byte_budget: Option<(u64, WcStatus)>,
    /// This end answers nothing (`StopResponding` armed on it). Stays set
    /// until the link breaks.
    silent: bool,
    /// The peer is silent: this end's send-queue requests stall in
    /// `stalled`, and its oldest one fails after `timeout`.
    peer_silent: Option<Duration>,
    /// Send-queue requests of this end that wait for an answer that never
    /// comes, oldest first: `(wr_id, opcode)`. Room for the end's send depth
    /// is reserved when `StopResponding` is armed, so pushing never
    /// allocates. Emptied (each completed once) when the link breaks.
    stalled: Vec<(WrId, WcOpcode)>,
    /// When the oldest entry of `stalled` was posted, while the peer is
    /// silent and `stalled` is non-empty; the watchdog fires at
    /// `since + timeout`.
    stall_since: Option<Instant>,
}

/// What a fault hook decided about one post.
pub(super) enum Verdict {
    /// No fault applies: the post takes its normal course.
    Proceed,
    /// The fault handled the post (completed or stalled it).
    Done(Result<(), PostError>),
    /// Only for RDMA: execute it with the local entries cut to this many
    /// bytes, then fail with the status (`ErrorAfterBytes`).
    Partial(u32, WcStatus),
    /// Only for RDMA: fail the remote-key check.
    BadRkey,
}

impl Link {
    /// Fault hook of a send-queue post of end `me`, which is not in the
    /// error state. `len` is the request's length (None: too long, the
    /// normal path fails it).
    pub(super) fn fault_send(
        &self,
        st: &mut LinkState,
        me: usize,
        wr_id: WrId,
        opcode: WcOpcode,
        len: Option<u32>,
        fx: &mut Effects,
    ) -> Verdict {
        let f = &mut st.faults[me];
        if f.silent || f.peer_silent.is_some() {
            return self.stall(st, me, wr_id, opcode, fx);
        }
        if let Some((left, status)) = f.fail_send {
            if left > 0 {
                f.fail_send = Some((left - 1, status));
            } else {
                f.fail_send = None;
                f.rearm();
                return self.fail_post(st, me, wr_id, opcode, status, fx);
            }
        }
        let rdma = opcode != WcOpcode::Send;
        if rdma && f.rkey_error {
            f.rkey_error = false;
            f.rearm();
            return Verdict::BadRkey;
        }
        if let (Some((budget, status)), Some(len)) = (f.byte_budget, len) {
            if u64::from(len) <= budget {
                f.byte_budget = Some((budget - u64::from(len), status));
            } else {
                f.byte_budget = None;
                f.rearm();
                if rdma {
                    return Verdict::Partial(budget as u32, status);
                }
                return self.fail_post(st, me, wr_id, opcode, status, fx);
            }
        }
        Verdict::Proceed
    }

    /// Fault hook of a receive posted by end `me`, not in the error state.
    pub(super) fn fault_recv(
        &self,
        st: &mut LinkState,
        me: usize,
        wr: &RecvWr<'_>,
        fx: &mut Effects,
    ) -> Verdict {
        let f = &mut st.faults[me];
        if let Some((left, status)) = f.fail_recv {
            if left > 0 {
                f.fail_recv = Some((left - 1, status));
            } else {
                f.fail_recv = None;
                f.rearm();
                return self.fail_post(st, me, wr.wr_id, WcOpcode::Recv, status, fx);
            }
        }
        if f.silent {
            // Queued but never filled: the peer's sends stall instead.
            let side = &mut st.sides[me];
            if side.recvs.len() >= side.recv_depth {
                return Verdict::Done(Err(PostError::QueueFull));
            }
            if !self.cqs[me].admit() {
                return Verdict::Done(Err(PostError::QueueFull));
            }
            side.recvs.push_back(wr.wr_id, wr.sges);
            return Verdict::Done(Ok(()));
        }
        Verdict::Proceed
    }

    /// Completes a post of `me` with `status` and breaks the link.
    fn fail_post(
        &self,
        st: &mut LinkState,
        me: usize,
        wr_id: WrId,
        opcode: WcOpcode,
        status: WcStatus,
        fx: &mut Effects,
    ) -> Verdict {
        if !self.cqs[me].admit() {
            return Verdict::Done(Err(PostError::QueueFull));
        }
        self.complete(me, wr_id, status, opcode, 0, fx);
        self.fail(st, me, status, fx);
        Verdict::Done(Ok(()))
    }

    /// Holds a send-queue request of `me` that will never be answered.
    fn stall(
        &self,
        st: &mut LinkState,
        me: usize,
        wr_id: WrId,
        opcode: WcOpcode,
        _fx: &mut Effects,
    ) -> Verdict {
        let f = &mut st.faults[me];
        if f.stalled.len() >= st.sides[me].send_depth {
            return Verdict::Done(Err(PostError::QueueFull));
        }
        if !self.cqs[me].admit() {
            return Verdict::Done(Err(PostError::QueueFull));
        }
        f.stalled.push((wr_id, opcode));
        if f.peer_silent.is_some() && f.stall_since.is_none() {
            f.stall_since = Some(Instant::now());
            self.fault_cv.notify_all();
        }
        Verdict::Done(Ok(()))
    }

    /// Called by `break_link` (link just broken by end `failed`): completes
    /// every stalled request once and disarms everything.
    pub(super) fn fault_broken(&self, st: &mut LinkState, failed: usize, fx: &mut Effects) {
        for end in 0..2 {
            let status = if end == failed {
                WcStatus::Flushed
            } else {
                WcStatus::RemoteDisconnected
            };
            let stalled = std::mem::take(&mut st.faults[end].stalled);
            for &(id, opcode) in &stalled {
                self.complete(end, id, status, opcode, 0, fx);
            }
            st.faults[end] = EndFaults::default();
        }
        self.fault_cv.notify_all();
    }
}

impl EndFaults {
    /// Recomputes `armed` after a fault fired.
    fn rearm(&mut self) {
        self.armed = self.fail_send.is_some()
            || self.fail_recv.is_some()
            || self.rkey_error
            || self.byte_budget.is_some()
            || self.silent
            || self.peer_silent.is_some();
    }
}

/// One end of a live soft connection, to arm faults on.
#[derive(Clone)]
pub struct QpFaults {
    link: Arc<Link>,
    /// 0 (connector) or 1 (acceptor).
    end: usize,
}

impl SoftNic {
    /// The end of a connection of this NIC whose local address is `local`
    /// and whose peer is `peer` (the newest such end whose connection is
    /// still intact, else the newest one).
    pub fn qp_faults(&self, local: SocketAddrV4, peer: SocketAddrV4) -> Option<QpFaults> {
        let links = lock(&self.shared.fault_links);
        let mut found: Option<QpFaults> = None;
        for link in links.iter().rev().filter_map(Weak::upgrade) {
            for end in 0..2 {
                let mine = Arc::ptr_eq(&link.nics[end], &self.shared);
                if mine && link.addrs[end] == local && link.addrs[1 - end] == peer {
                    let intact = !link.lock().broken;
                    let q = QpFaults {
                        link: link.clone(),
                        end,
                    };
                    if intact {
                        return Some(q);
                    }
                    found.get_or_insert(q);
                }
            }
        }
        found
    }
}

impl QpFaults {
    /// The queue-pair number of this end.
    pub fn qp_num(&self) -> QpNum {
        self.link.nums[self.end]
    }

    /// Arms `fault` on this end. Panics on a `Success` status or a zero
    /// `nth` (a test bug). Does nothing on a broken connection.
    pub fn arm(&self, fault: Fault) {
        let me = self.end;
        let mut st = self.link.lock();
        if st.broken {
            return;
        }
        match fault {
            Fault::FailRequest { queue, nth, status } => {
                assert!(nth > 0, "nth counts from 1");
                assert_ne!(status, WcStatus::Success, "a failure needs an error status");
                let f = Some((nth - 1, status));
                match queue {
                    WorkQueue::Send => st.faults[me].fail_send = f,
                    WorkQueue::Recv => st.faults[me].fail_recv = f,
                }
            }
            Fault::RemoteKeyError => st.faults[me].rkey_error = true,
            Fault::ErrorAfterBytes { bytes, status } => {
                assert_ne!(status, WcStatus::Success, "a failure needs an error status");
                st.faults[me].byte_budget = Some((bytes, status));
            }
            Fault::StopResponding { timeout } => {
                let peer = 1 - me;
                for end in [me, peer] {
                    let depth = st.sides[end].send_depth;
                    st.faults[end].stalled.reserve_exact(depth);
                }
                st.faults[me].silent = true;
                st.faults[peer].peer_silent = Some(timeout);
                st.faults[peer].armed = true;
                let link = Arc::downgrade(&self.link);
                std::thread::Builder::new()
                    .name("soft-fault-watchdog".into())
                    .spawn(move || watchdog(link, peer))
                    .expect("spawn the fault watchdog");
            }
        }
        st.faults[me].armed = true;
    }

    /// The completion queue of this end overflows now. A real NIC reports a
    /// CQ error and moves every queue pair attached to that CQ to the error
    /// state; so does this one: every connection with an end on this CQ
    /// breaks with that end failing (its outstanding requests complete
    /// `Flushed`, the peers' `RemoteDisconnected`). Unlike hardware, the
    /// soft CQ reserved room for every admitted request, so it still
    /// delivers those completions instead of dropping them (what a driver
    /// that re-creates the CQ would synthesise for its consumer).
    pub fn overrun_cq(&self) {
        let cq = &self.link.cqs[self.end];
        let nic = &self.link.nics[self.end];
        let links: Vec<Arc<Link>> = lock(&nic.fault_links)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for link in links {
            for end in 0..2 {
                if Arc::ptr_eq(&link.cqs[end], cq) {
                    let mut fx = Effects::default();
                    {
                        let mut st = link.lock();
                        // A local fault: this end failed, the peers were reset.
                        link.fail(&mut st, end, WcStatus::Flushed, &mut fx);
                    }
                    link.apply(fx);
                }
            }
        }
    }
}

/// Fails the oldest stalled request of `end` (whose peer is silent)
/// `timeout` after it was posted; exits once the link broke or is gone.
fn watchdog(link: Weak<Link>, end: usize) {
    let Some(link) = link.upgrade() else { return };
    let mut fx = Effects::default();
    {
        let mut st = link.lock();
        loop {
            if st.broken {
                return;
            }
            let f = &st.faults[end];
            let (Some(timeout), Some(since)) = (f.peer_silent, f.stall_since) else {
                st = link
                    .fault_cv
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            };
            let now = Instant::now();
            if now >= since + timeout {
                break;
            }
            st = link
                .fault_cv
                .wait_timeout(st, since + timeout - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let (id, opcode) = st.faults[end].stalled.remove(0);
        link.complete(end, id, WcStatus::RetryExceeded, opcode, 0, &mut fx);
        link.fail(&mut st, end, WcStatus::RetryExceeded, &mut fx);
    }
    link.apply(fx);
}
