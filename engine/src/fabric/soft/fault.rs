//! Fault injection (cargo feature `fault-injection`, for tests only): faults
//! armed on one end of a soft connection, which then fails the way an RC
//! queue pair of mlx5 or rxe fails, or (`StallRdma`) keeps its RDMA
//! requests in flight, as on a slow wire, until the test releases them.
//!
//! What every other fault ends in is the soft NIC's ordinary error path
//! (module docs of [`super`], "Errors"): the request that fails completes
//! with its own status, every other outstanding request of its end
//! completes `Flushed`, the peer's complete `RemoteDisconnected`, the
//! failing end is told [`QpEvents::failed`] and the peer
//! [`QpEvents::disconnected`], and later posts complete at once with the
//! end's error status. No fault loses or duplicates a completion, and no
//! fault touches memory a request does not name (a request that fails
//! moves at most a prefix of its own bytes).
//!
//! Faults live in the link's control block (`link::EndFaults`, part of the
//! connection's state), under its lock; a post of an end with faults armed
//! takes that lock (the slow path). When none is armed the post path pays
//! one relaxed load of a flag that only arming writes (`Link::faults_armed`);
//! without the feature the hooks are compiled out.
//!
//! A test finds the end of a connection with [`SoftNic::qp_faults`] (by its
//! local and peer address, which the SPI reports) and arms it with
//! [`QpFaults::arm`] or overruns its completion queue with
//! [`QpFaults::overrun_cq`]; [`QpFaults::release_rdma`] lets the RDMA
//! requests held by [`Fault::StallRdma`] go, [`QpFaults::release_flush`]
//! the flushes withheld by [`Fault::NoFlush`].

use super::link::{Cause, Control, HeldRdma, Link, Posted, Poster};
use super::wq::{SqEntry, SqKind};
use super::{lock, SoftNic};
use crate::fabric::*;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
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
    /// This end's RDMA writes and reads are held unexecuted (they touch no
    /// memory and stay pending) while everything else, its sends in
    /// particular, keeps flowing: an RDMA in flight on the wire. Until
    /// [`QpFaults::release_rdma`] executes them in posting order (checking
    /// their keys then, as the NIC would) and completes them with their
    /// real status, or the link breaks and they complete with the flush
    /// status. Held requests bypass the other faults of the send queue,
    /// except a silence (`StopResponding`), which stalls them first.
    StallRdma,
    /// The NIC does not flush this end: once its connection broke (a local
    /// close included), its outstanding requests neither execute nor
    /// complete, as with a NIC whose flush never comes, until
    /// [`QpFaults::release_flush`]. Combined with `StallRdma`, an RDMA in
    /// flight at the close stays pending. Stays armed across the break.
    NoFlush,
}

/// What a fault hook decided about one post.
pub(super) enum Verdict {
    /// No fault applies: the post takes its normal course.
    Proceed,
    /// The fault handled the post (completed or stalled it).
    Done(Posted),
    /// Only for RDMA: execute it with the local entries cut to this many
    /// bytes, then fail with the status (`ErrorAfterBytes`).
    Partial(u32, WcStatus),
    /// Only for RDMA: fail the remote-key check.
    BadRkey,
}

impl Link {
    /// Recomputes the armed flag of `me` after a fault fired.
    fn rearm(&self, c: &Control, me: usize) {
        self.faults_armed[me].store(c.faults[me].any(), Ordering::Relaxed);
    }

    /// Fault hook of a send-queue post of end `me` (not in the error
    /// state), under its post lock.
    pub(super) fn fault_send(
        &self,
        p: &mut Poster,
        me: usize,
        wr: &SendWr<'_>,
        opcode: WcOpcode,
    ) -> Verdict {
        let mut c = lock(&self.control);
        if c.broken {
            return Verdict::Proceed;
        }
        let fail = |p: &mut Poster, status| {
            p.sq.push(
                &p.queues,
                SqEntry {
                    wr_id: wr.wr_id,
                    opcode,
                    kind: SqKind::Done { status, len: 0 },
                },
            );
            Verdict::Done(Posted {
                fail: Some(status),
                to_peer: false,
            })
        };
        // Queues the request as stalled (it completes when the fault ends);
        // its send-queue index.
        let stall = |p: &mut Poster| {
            let index = p.sq.tail();
            p.sq.push(
                &p.queues,
                SqEntry {
                    wr_id: wr.wr_id,
                    opcode,
                    kind: SqKind::Stalled,
                },
            );
            index
        };
        let f = &mut c.faults[me];
        if f.silent || f.peer_silent.is_some() {
            let index = stall(p);
            f.stalled.push(index);
            if f.peer_silent.is_some() && f.stall_since.is_none() {
                f.stall_since = Some(Instant::now());
                self.fault_cv.notify_all();
            }
            return Verdict::Done(Posted::default());
        }
        let held = match wr.op {
            SendOp::RdmaWrite { remote_addr, rkey } => Some((remote_addr, rkey, true)),
            SendOp::RdmaRead { remote_addr, rkey } => Some((remote_addr, rkey, false)),
            SendOp::Send => None,
        };
        if let (true, Some((remote_addr, rkey, write))) = (f.hold_rdma, held) {
            let index = stall(p);
            let start = f.held_sges.len();
            f.held_sges.extend_from_slice(wr.sges);
            f.held.push(HeldRdma {
                index,
                sges: start..f.held_sges.len(),
                remote_addr,
                rkey,
                write,
            });
            return Verdict::Done(Posted::default());
        }
        if let Some((left, status)) = f.fail_send {
            if left > 0 {
                f.fail_send = Some((left - 1, status));
            } else {
                f.fail_send = None;
                self.rearm(&c, me);
                return fail(p, status);
            }
        }
        let f = &mut c.faults[me];
        let rdma = opcode != WcOpcode::Send;
        if rdma && f.rkey_error {
            f.rkey_error = false;
            self.rearm(&c, me);
            return Verdict::BadRkey;
        }
        let len = super::mr::total_len(wr.sges);
        if let (Some((budget, status)), Some(len)) = (f.byte_budget, len) {
            if u64::from(len) <= budget {
                f.byte_budget = Some((budget - u64::from(len), status));
            } else {
                f.byte_budget = None;
                self.rearm(&c, me);
                if rdma {
                    return Verdict::Partial(budget as u32, status);
                }
                return fail(p, status);
            }
        }
        Verdict::Proceed
    }

    /// Fault hook of a receive posted by end `me` (not in the error
    /// state), under its post lock.
    pub(super) fn fault_recv(&self, p: &mut Poster, me: usize, wr: &RecvWr<'_>) -> Verdict {
        let mut c = lock(&self.control);
        if c.broken {
            return Verdict::Proceed;
        }
        let f = &mut c.faults[me];
        if let Some((left, status)) = f.fail_recv {
            if left > 0 {
                f.fail_recv = Some((left - 1, status));
            } else {
                f.fail_recv = None;
                self.rearm(&c, me);
                p.rq.push(&p.queues, wr.wr_id, &[], Some(status));
                return Verdict::Done(Posted {
                    fail: Some(status),
                    to_peer: false,
                });
            }
        }
        // A silent end's receives are queued as usual: the peer's sends
        // stall instead of reaching them.
        Verdict::Proceed
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
                    let intact = link.is_intact();
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
        let link = &self.link;
        // Posts of this end check the flag under their post lock: take it
        // so no post of this end is half-way through the normal path.
        let _post = link.ends[me].post.lock_control();
        let mut c = lock(&link.control);
        if c.broken {
            return;
        }
        if fault == Fault::NoFlush {
            link.withhold_flush[me].store(true, Ordering::Release);
            return;
        }
        match fault {
            Fault::FailRequest { queue, nth, status } => {
                assert!(nth > 0, "nth counts from 1");
                assert_ne!(status, WcStatus::Success, "a failure needs an error status");
                let f = Some((nth - 1, status));
                match queue {
                    WorkQueue::Send => c.faults[me].fail_send = f,
                    WorkQueue::Recv => c.faults[me].fail_recv = f,
                }
            }
            Fault::RemoteKeyError => c.faults[me].rkey_error = true,
            Fault::ErrorAfterBytes { bytes, status } => {
                assert_ne!(status, WcStatus::Success, "a failure needs an error status");
                c.faults[me].byte_budget = Some((bytes, status));
            }
            Fault::StopResponding { timeout } => {
                let peer = 1 - me;
                for end in [me, peer] {
                    let depth = link.ends[end].send_depth;
                    c.faults[end].stalled.reserve_exact(depth);
                }
                c.faults[me].silent = true;
                c.faults[peer].peer_silent = Some(timeout);
                link.faults_armed[peer].store(true, Ordering::Relaxed);
                let weak = Arc::downgrade(link);
                std::thread::Builder::new()
                    .name("soft-fault-watchdog".into())
                    .spawn(move || watchdog(weak, peer))
                    .expect("spawn the fault watchdog");
            }
            Fault::StallRdma => {
                let end = &link.ends[me];
                let f = &mut c.faults[me];
                f.held
                    .reserve_exact(end.send_depth.saturating_sub(f.held.len()));
                let room = end.send_depth * end.max_sge;
                f.held_sges
                    .reserve_exact(room.saturating_sub(f.held_sges.len()));
                f.hold_rdma = true;
            }
            Fault::NoFlush => unreachable!("armed above"),
        }
        link.faults_armed[me].store(true, Ordering::Relaxed);
    }

    /// Stops holding this end's RDMA requests (`Fault::StallRdma`) and
    /// executes the held ones in posting order, each completing with its
    /// real status. The first that fails (a key no longer valid, say) fails
    /// as at post time: the connection breaks and the requests after it
    /// complete with the flush status. Does nothing on a broken connection
    /// (its held requests were flushed).
    pub fn release_rdma(&self) {
        let me = self.end;
        let link = &*self.link;
        let seal = {
            // As a post: the post lock keeps the local entries registered
            // for the copies; the control lock keeps the link intact, so no
            // close seals it (and flushes the held requests) meanwhile.
            let mut guard = link.ends[me].post.lock_control();
            let p = &mut *guard;
            let mut c = lock(&link.control);
            if c.broken {
                return;
            }
            let f = &mut c.faults[me];
            f.hold_rdma = false;
            let held = std::mem::take(&mut f.held);
            let sges = std::mem::take(&mut f.held_sges);
            let mut seal = false;
            for h in &held {
                let local = &sges[h.sges.clone()];
                match link.rdma(me, p, local, h.remote_addr, h.rkey, h.write) {
                    Ok(len) => p.sq.complete(&p.queues, h.index, WcStatus::Success, len),
                    Err(status) => {
                        seal = link.fail_queued(me, h.index, status, &mut c);
                        break;
                    }
                }
            }
            link.rearm(&c, me);
            seal
        };
        if seal {
            link.seal();
        }
        link.wake([me == 0, me == 1]);
    }

    /// Requests posted on this end whose completion its CQ has not
    /// produced yet (completions polled and dropped count as produced).
    pub fn outstanding(&self) -> u64 {
        let mut guard = self.link.ends[self.end].post.lock_control();
        let p = &mut *guard;
        p.sq.refresh(&p.queues);
        p.sends.refresh(&p.queues);
        p.sq.pending() + p.sends.pending() + p.rq.pending(&p.queues)
    }

    /// Ends `Fault::NoFlush`: a sealed end's outstanding requests complete
    /// with the flush status now.
    pub fn release_flush(&self) {
        self.link.withhold_flush[self.end].store(false, Ordering::Release);
        self.link.wake([self.end == 0, self.end == 1]);
    }

    /// The completion queue of this end overflows now. A real NIC reports a
    /// CQ error and moves every queue pair attached to that CQ to the error
    /// state; so does this one: every connection with an end on this CQ
    /// breaks with that end failing (its outstanding requests complete
    /// `Flushed`, the peers' `RemoteDisconnected`). Unlike hardware, the
    /// soft CQ still delivers those completions instead of dropping them
    /// (what a driver that re-creates the CQ would synthesise for its
    /// consumer).
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
                    // A local fault: this end failed, the peers were reset.
                    link.fail(end, Cause::Failed(WcStatus::Flushed));
                }
            }
        }
    }
}

/// Fails the oldest stalled request of `end` (whose peer is silent)
/// `timeout` after it was posted; exits once the link broke or is gone.
fn watchdog(link: Weak<Link>, end: usize) {
    let Some(link) = link.upgrade() else { return };
    let first = {
        let mut c = lock(&link.control);
        loop {
            if c.broken {
                return;
            }
            let f = &c.faults[end];
            let (Some(timeout), Some(since)) = (f.peer_silent, f.stall_since) else {
                c = link
                    .fault_cv
                    .wait(c)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            };
            let now = Instant::now();
            if now >= since + timeout {
                break;
            }
            c = link
                .fault_cv
                .wait_timeout(c, since + timeout - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let index = c.faults[end].stalled[0];
        link.fail_queued(end, index, WcStatus::RetryExceeded, &mut c)
    };
    if first {
        link.seal();
    }
}
