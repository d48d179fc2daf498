//! Reliable-connected queue pairs. A connection is one [`Link`] holding both
//! directions under one mutex; a work request executes in the posting thread
//! while it holds that mutex, so the completions of one queue pair reach its
//! CQ in execution order and both ends always agree on the state.

use super::cq::SoftCq;
#[cfg(feature = "fault-injection")]
use super::fault::{EndFaults, Verdict};
use super::mr::{self, check_local, check_remote, copy_lists, total_len};
use super::{lock, NicShared};
use crate::fabric::*;
use std::net::SocketAddrV4;
#[cfg(feature = "fault-injection")]
use std::sync::Condvar;
use std::sync::{Arc, Mutex, MutexGuard};

/// A FIFO of work requests with their scatter/gather lists, allocated once
/// (at queue-pair creation): `cap` slots of `stride` entries each.
pub(super) struct WrRing {
    /// Index of the oldest request.
    head: usize,
    /// Requests held.
    len: usize,
    /// Entries per slot (the poster's `max_sge`).
    stride: usize,
    wr_ids: Box<[WrId]>,
    /// Entries used in each slot.
    counts: Box<[usize]>,
    /// `cap * stride` entries; slot `i` owns `[i*stride, (i+1)*stride)`.
    sges: Box<[Sge]>,
}

const NO_SGE: Sge = Sge {
    addr: 0,
    len: 0,
    lkey: 0,
};

impl WrRing {
    pub(super) fn new(cap: usize, stride: usize) -> WrRing {
        WrRing {
            head: 0,
            len: 0,
            stride,
            wr_ids: vec![0; cap].into_boxed_slice(),
            counts: vec![0; cap].into_boxed_slice(),
            sges: vec![NO_SGE; cap * stride].into_boxed_slice(),
        }
    }

    fn cap(&self) -> usize {
        self.wr_ids.len()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a request. The caller checked `len < cap` and
    /// `sges.len() <= stride`.
    pub(super) fn push_back(&mut self, wr_id: WrId, sges: &[Sge]) {
        assert!(self.len < self.cap() && sges.len() <= self.stride);
        let slot = (self.head + self.len) % self.cap();
        self.wr_ids[slot] = wr_id;
        self.counts[slot] = sges.len();
        self.sges[slot * self.stride..][..sges.len()].copy_from_slice(sges);
        self.len += 1;
    }

    fn front(&self) -> Option<(WrId, &[Sge])> {
        if self.len == 0 {
            return None;
        }
        let slot = self.head;
        let sges = &self.sges[slot * self.stride..][..self.counts[slot]];
        Some((self.wr_ids[slot], sges))
    }

    fn pop_front(&mut self) -> Option<WrId> {
        let (wr_id, _) = self.front()?;
        self.head = (self.head + 1) % self.cap();
        self.len -= 1;
        Some(wr_id)
    }
}

/// One direction's state of a connection, as seen from one end.
pub(super) struct Side {
    /// Receives posted by this end, oldest first (at most `recv_depth`).
    pub(super) recvs: WrRing,
    /// Sends of the *other* end waiting for a receive of this end (RNR
    /// queue), oldest first. Never non-empty while `recvs` is non-empty.
    pub(super) rnr: WrRing,
    /// Most sends that may wait in `rnr` (this end's NIC `rnr_queue_max`).
    pub(super) rnr_max: usize,
    /// Once set, this end is in the error state: every later post completes
    /// at once with this status. Set for both ends when the link breaks.
    pub(super) error: Option<WcStatus>,
    pub(super) send_depth: usize,
    pub(super) recv_depth: usize,
}

/// Everything the link mutex guards.
pub(super) struct LinkState {
    /// Indexed by end: 0 the connector, 1 the acceptor.
    pub(super) sides: [Side; 2],
    /// The connection broke or was closed; from then on no data moves, both
    /// `error`s are set and every ring is empty.
    pub(super) broken: bool,
    /// Faults armed on each end (tests only; see `fault`).
    #[cfg(feature = "fault-injection")]
    pub(super) faults: [EndFaults; 2],
}

/// One connection: both ends' queues under one mutex, plus what never
/// changes after creation.
pub(super) struct Link {
    /// Lock order: taken first on the data path; then the region tables
    /// (lower NIC id first), then the peer's remote keys. CQ pushes are
    /// lock-free; wakers and events run after it is released.
    pub(super) state: Mutex<LinkState>,
    pub(super) cqs: [Arc<SoftCq>; 2],
    pub(super) nics: [Arc<NicShared>; 2],
    pub(super) nums: [QpNum; 2],
    /// Local address of each end.
    pub(super) addrs: [SocketAddrV4; 2],
    pub(super) events: [Arc<dyn QpEvents>; 2],
    /// Paired with `state`: wakes a fault watchdog when a request stalls or
    /// the link breaks (tests only; see `fault`).
    #[cfg(feature = "fault-injection")]
    pub(super) fault_cv: Condvar,
}

/// What to do once the link lock is released.
#[derive(Default)]
pub(super) struct Effects {
    /// CQ of end i must be woken.
    wake: [bool; 2],
    /// End i must be told `disconnected` (or `failed`, see below).
    tell: [bool; 2],
    /// End i broke the connection itself: it is told `failed` instead.
    failed: [bool; 2],
}

/// How a send met a receive.
enum Transfer {
    Done(u32),
    /// The sender's entries failed their check.
    SendBad,
    /// The message is longer than any message can be (`u32::MAX`).
    SendTooLong,
    /// The message is longer than the receive.
    TooLong,
    /// The receiver's entries failed their check.
    RecvBad,
}

impl Link {
    pub(super) fn lock(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }

    pub(super) fn complete(
        &self,
        end: usize,
        wr_id: WrId,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u32,
        fx: &mut Effects,
    ) {
        let wc = WorkCompletion {
            wr_id,
            status,
            opcode,
            byte_len,
        };
        fx.wake[end] |= self.cqs[end].push(wc);
    }

    /// Breaks the connection because end `failed` failed (or closed): its
    /// outstanding requests complete `Flushed`, the other end's
    /// `RemoteDisconnected`. Returns whether it was intact before.
    fn break_link(&self, st: &mut LinkState, failed: usize, fx: &mut Effects) -> bool {
        if st.broken {
            return false;
        }
        st.broken = true;
        st.sides[failed].error = Some(WcStatus::Flushed);
        st.sides[1 - failed].error = Some(WcStatus::RemoteDisconnected);
        for end in 0..2 {
            let status = if end == failed {
                WcStatus::Flushed
            } else {
                WcStatus::RemoteDisconnected
            };
            while let Some(id) = st.sides[end].recvs.pop_front() {
                self.complete(end, id, status, WcOpcode::Recv, 0, fx);
            }
            // This end's sends wait in the other end's RNR queue.
            while let Some(id) = st.sides[1 - end].rnr.pop_front() {
                self.complete(end, id, status, WcOpcode::Send, 0, fx);
            }
        }
        #[cfg(feature = "fault-injection")]
        self.fault_broken(st, failed, fx);
        true
    }

    /// A request of end `failed` failed with `status`: break, and tell both
    /// ends. The failing end is told `failed` when it detected the error
    /// itself, `disconnected` when the peer did (it rejected a remote key or
    /// a message); the other end is told `disconnected`.
    pub(super) fn fail(
        &self,
        st: &mut LinkState,
        failed: usize,
        status: WcStatus,
        fx: &mut Effects,
    ) {
        if self.break_link(st, failed, fx) {
            fx.tell = [true, true];
            fx.failed[failed] = detected_locally(status);
        }
    }

    /// Checks both lists and copies a message of end `from` into a receive
    /// of the other end.
    fn transfer(&self, from: usize, send: &[Sge], recv: &[Sge]) -> Transfer {
        let to = 1 - from;
        let Some(len) = total_len(send) else {
            return Transfer::SendTooLong;
        };
        let tables = RegionTables::lock(&self.nics[from], &self.nics[to]);
        if !check_local(tables.of(&self.nics[from]), send, Access::NONE) {
            return Transfer::SendBad;
        }
        let room: u64 = recv.iter().map(|s| u64::from(s.len)).sum();
        if u64::from(len) > room {
            return Transfer::TooLong;
        }
        if !check_local(tables.of(&self.nics[to]), recv, Access::LOCAL_WRITE) {
            return Transfer::RecvBad;
        }
        // SAFETY: both lists were just checked against the region tables of
        // their NICs, whose read locks `tables` holds until after the copy,
        // so every range is registered (hence valid memory) throughout; the
        // receive's ranges have LOCAL_WRITE.
        unsafe { copy_lists(send, recv) };
        Transfer::Done(len)
    }

    /// A receive posted now by the other end of `from` (already admitted)
    /// takes the oldest send `from` parked there.
    fn deliver_parked(
        &self,
        st: &mut LinkState,
        from: usize,
        recv: (WrId, &[Sge]),
        fx: &mut Effects,
    ) {
        let to = 1 - from;
        let Some((send_id, send_sges)) = st.sides[to].rnr.front() else {
            unreachable!("deliver_parked needs a parked send");
        };
        let outcome = self.transfer(from, send_sges, recv.1);
        st.sides[to].rnr.pop_front();
        self.settle(st, from, send_id, recv.0, false, outcome, fx);
    }

    /// A send posted now by `from` (already admitted) goes into the oldest
    /// receive of the other end.
    fn deliver_now(&self, st: &mut LinkState, from: usize, send: (WrId, &[Sge]), fx: &mut Effects) {
        let to = 1 - from;
        let Some((recv_id, recv_sges)) = st.sides[to].recvs.front() else {
            unreachable!("deliver_now needs a posted receive");
        };
        let outcome = self.transfer(from, send.1, recv_sges);
        self.settle(st, from, send.0, recv_id, true, outcome, fx);
    }

    /// Completes a send/receive pair after `transfer`. The send is out of
    /// every queue already; the receive is the oldest of the other end's
    /// `recvs` if `recv_queued`, else it was posted now and never queued.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        st: &mut LinkState,
        from: usize,
        send_id: WrId,
        recv_id: WrId,
        recv_queued: bool,
        outcome: Transfer,
        fx: &mut Effects,
    ) {
        let to = 1 - from;
        let (send_status, recv_status, failed) = match outcome {
            Transfer::Done(len) => {
                if recv_queued {
                    st.sides[to].recvs.pop_front();
                }
                self.complete(to, recv_id, WcStatus::Success, WcOpcode::Recv, len, fx);
                self.complete(from, send_id, WcStatus::Success, WcOpcode::Send, len, fx);
                return;
            }
            // The sender failed; the receive is flushed like every other
            // outstanding request of the peer.
            Transfer::SendBad => (
                WcStatus::LocalProtectionError,
                WcStatus::RemoteDisconnected,
                from,
            ),
            Transfer::SendTooLong => (
                WcStatus::LocalLengthError,
                WcStatus::RemoteDisconnected,
                from,
            ),
            Transfer::TooLong => (
                WcStatus::RemoteInvalidRequest,
                WcStatus::LocalLengthError,
                to,
            ),
            Transfer::RecvBad => (
                WcStatus::RemoteInvalidRequest,
                WcStatus::LocalProtectionError,
                to,
            ),
        };
        if recv_queued {
            st.sides[to].recvs.pop_front();
        }
        self.complete(to, recv_id, recv_status, WcOpcode::Recv, 0, fx);
        self.complete(from, send_id, send_status, WcOpcode::Send, 0, fx);
        let status = if failed == from {
            send_status
        } else {
            recv_status
        };
        self.fail(st, failed, status, fx);
    }

    /// Runs the effects once no lock is held.
    pub(super) fn apply(&self, fx: Effects) {
        for end in 0..2 {
            if fx.wake[end] {
                self.cqs[end].wake();
            }
        }
        for end in 0..2 {
            if fx.tell[end] && fx.failed[end] {
                self.events[end].failed();
            } else if fx.tell[end] {
                self.events[end].disconnected();
            }
        }
    }
}

/// Whether an end whose request failed with `status` found the error itself
/// (a local transport failure) rather than being told by the peer.
fn detected_locally(status: WcStatus) -> bool {
    !matches!(
        status,
        WcStatus::RemoteAccessError | WcStatus::RemoteInvalidRequest | WcStatus::RemoteDisconnected
    )
}

/// The region tables of one or two NICs, read-locked in NIC-id order.
struct RegionTables<'a> {
    low_id: u64,
    low: mr::RegionsGuard<'a>,
    /// `None` when both ends are on the same NIC.
    high: Option<mr::RegionsGuard<'a>>,
}

impl<'a> RegionTables<'a> {
    fn lock(a: &'a NicShared, b: &'a NicShared) -> RegionTables<'a> {
        let (lo, hi) = if a.id <= b.id { (a, b) } else { (b, a) };
        let low = lo.pd.read_regions();
        // Never read-lock one RwLock twice in a thread (a waiting writer
        // would deadlock it).
        let high = (hi.id != lo.id).then(|| hi.pd.read_regions());
        RegionTables {
            low_id: lo.id,
            low,
            high,
        }
    }

    fn of(&self, nic: &NicShared) -> &mr::Slab<mr::Region> {
        match &self.high {
            Some(high) if nic.id != self.low_id => high,
            _ => &self.low,
        }
    }
}

/// One end of a connection.
pub(super) struct SoftQp {
    pub(super) link: Arc<Link>,
    /// 0 (connector) or 1 (acceptor).
    pub(super) end: usize,
    /// Copy of this end's `max_sge` (immutable).
    pub(super) max_sge: usize,
    /// CQ entries reserved for this end, released on drop.
    pub(super) reserved: usize,
}

fn opcode_of(op: &SendOp) -> WcOpcode {
    match op {
        SendOp::Send => WcOpcode::Send,
        SendOp::RdmaWrite { .. } => WcOpcode::RdmaWrite,
        SendOp::RdmaRead { .. } => WcOpcode::RdmaRead,
    }
}

impl SoftQp {
    fn post_send_locked(
        &self,
        st: &mut LinkState,
        wr: &SendWr<'_>,
        fx: &mut Effects,
    ) -> Result<(), PostError> {
        let (me, peer) = (self.end, 1 - self.end);
        let link = &*self.link;
        let opcode = opcode_of(&wr.op);
        if let Some(status) = st.sides[me].error {
            if !link.cqs[me].admit() {
                return Err(PostError::QueueFull);
            }
            link.complete(me, wr.wr_id, status, opcode, 0, fx);
            return Ok(());
        }
        #[cfg(feature = "fault-injection")]
        let mut rdma_fault = None;
        #[cfg(feature = "fault-injection")]
        if st.faults[me].armed {
            let len = total_len(wr.sges);
            match link.fault_send(st, me, wr.wr_id, opcode, len, fx) {
                Verdict::Proceed => {}
                Verdict::Done(r) => return r,
                v => rdma_fault = Some(v),
            }
        }
        match wr.op {
            SendOp::Send => {
                let parks = st.sides[peer].recvs.is_empty();
                if parks && st.sides[peer].rnr.len() >= st.sides[me].send_depth {
                    return Err(PostError::QueueFull);
                }
                if !link.cqs[me].admit() {
                    return Err(PostError::QueueFull);
                }
                if !parks {
                    link.deliver_now(st, me, (wr.wr_id, wr.sges), fx);
                    return Ok(());
                }
                // First attempt finds no receive: check the entries now
                // (they are checked again when the message moves).
                let local_error = if total_len(wr.sges).is_none() {
                    Some(WcStatus::LocalLengthError)
                } else if !check_local(&link.nics[me].pd.read_regions(), wr.sges, Access::NONE) {
                    Some(WcStatus::LocalProtectionError)
                } else {
                    None
                };
                if let Some(status) = local_error {
                    link.complete(me, wr.wr_id, status, opcode, 0, fx);
                    link.fail(st, me, status, fx);
                } else if st.sides[peer].rnr.len() >= st.sides[peer].rnr_max {
                    let status = WcStatus::RnrRetryExceeded;
                    link.complete(me, wr.wr_id, status, opcode, 0, fx);
                    link.fail(st, me, status, fx);
                } else {
                    st.sides[peer].rnr.push_back(wr.wr_id, wr.sges);
                }
                Ok(())
            }
            SendOp::RdmaWrite { remote_addr, rkey } | SendOp::RdmaRead { remote_addr, rkey } => {
                if !link.cqs[me].admit() {
                    return Err(PostError::QueueFull);
                }
                let write = matches!(wr.op, SendOp::RdmaWrite { .. });
                #[cfg(feature = "fault-injection")]
                if let Some(v) = rdma_fault {
                    let (status, len) = self.rdma_fault(wr.sges, remote_addr, rkey, write, v);
                    link.complete(me, wr.wr_id, status, opcode, len, fx);
                    link.fail(st, me, status, fx);
                    return Ok(());
                }
                let (status, len) = match self.rdma(wr.sges, remote_addr, rkey, write) {
                    Ok(len) => (WcStatus::Success, len),
                    Err(status) => (status, 0),
                };
                link.complete(me, wr.wr_id, status, opcode, len, fx);
                if status != WcStatus::Success {
                    link.fail(st, me, status, fx);
                }
                Ok(())
            }
        }
    }

    /// Executes an RDMA request a fault cuts short: `Partial` moves the
    /// first bytes of the local entries (up to the budget), `BadRkey` fails
    /// the remote-key check. Returns the completion's status and length.
    #[cfg(feature = "fault-injection")]
    fn rdma_fault(
        &self,
        local: &[Sge],
        remote_addr: u64,
        rkey: u32,
        write: bool,
        v: Verdict,
    ) -> (WcStatus, u32) {
        let Verdict::Partial(budget, status) = v else {
            return (WcStatus::RemoteAccessError, 0);
        };
        let mut cut = [Sge {
            addr: 0,
            len: 0,
            lkey: 0,
        }; super::cm::MAX_SGE_LIMIT as usize];
        let (mut n, mut left) = (0, budget);
        for s in local {
            if left == 0 {
                break;
            }
            cut[n] = Sge {
                len: s.len.min(left),
                ..*s
            };
            left -= cut[n].len;
            n += 1;
        }
        // Whatever the prefix met (even its own error) the request fails
        // with the armed status: the queue pair went to error mid-request.
        let _ = self.rdma(&cut[..n], remote_addr, rkey, write);
        (status, 0)
    }

    /// Executes an RDMA write or read between `local` and the peer's
    /// `[remote_addr, +len)` named by `rkey`; the length moved or the status.
    fn rdma(
        &self,
        local: &[Sge],
        remote_addr: u64,
        rkey: u32,
        write: bool,
    ) -> Result<u32, WcStatus> {
        let link = &*self.link;
        let (me, peer) = (self.end, 1 - self.end);
        let len = total_len(local).ok_or(WcStatus::LocalLengthError)?;
        let (local_need, remote_need) = if write {
            (Access::NONE, Access::REMOTE_WRITE)
        } else {
            (Access::LOCAL_WRITE, Access::REMOTE_READ)
        };
        let tables = RegionTables::lock(&link.nics[me], &link.nics[peer]);
        if !check_local(tables.of(&link.nics[me]), local, local_need) {
            return Err(WcStatus::LocalProtectionError);
        }
        let rkeys = link.nics[peer].pd.read_rkeys();
        let remote = check_remote(
            tables.of(&link.nics[peer]),
            &rkeys,
            rkey,
            link.nums[peer],
            remote_addr,
            len as usize,
            remote_need,
        )
        .ok_or(WcStatus::RemoteAccessError)?;
        let flat = [Sge {
            addr: remote,
            len,
            lkey: 0,
        }];
        // SAFETY: `local` was checked against our region table and `flat`
        // against the peer's region and remote-key tables; `tables` and
        // `rkeys` stay read-locked until after the copy, so no range can be
        // deregistered or revoked meanwhile and every range is valid memory
        // (`Nic::register` contract). The sink has the needed write right.
        unsafe {
            if write {
                copy_lists(local, &flat);
            } else {
                copy_lists(&flat, local);
            }
        }
        Ok(len)
    }

    fn post_recv_locked(
        &self,
        st: &mut LinkState,
        wr: &RecvWr<'_>,
        fx: &mut Effects,
    ) -> Result<(), PostError> {
        let (me, peer) = (self.end, 1 - self.end);
        let link = &*self.link;
        if let Some(status) = st.sides[me].error {
            if !link.cqs[me].admit() {
                return Err(PostError::QueueFull);
            }
            link.complete(me, wr.wr_id, status, WcOpcode::Recv, 0, fx);
            return Ok(());
        }
        #[cfg(feature = "fault-injection")]
        if st.faults[me].armed {
            if let Verdict::Done(r) = link.fault_recv(st, me, wr, fx) {
                return r;
            }
        }
        let parked = !st.sides[me].rnr.is_empty();
        if !parked && st.sides[me].recvs.len() >= st.sides[me].recv_depth {
            return Err(PostError::QueueFull);
        }
        if !link.cqs[me].admit() {
            return Err(PostError::QueueFull);
        }
        if parked {
            link.deliver_parked(st, peer, (wr.wr_id, wr.sges), fx);
            return Ok(());
        }
        let ok = check_local(
            &link.nics[me].pd.read_regions(),
            wr.sges,
            Access::LOCAL_WRITE,
        );
        if ok {
            st.sides[me].recvs.push_back(wr.wr_id, wr.sges);
        } else {
            let status = WcStatus::LocalProtectionError;
            link.complete(me, wr.wr_id, status, WcOpcode::Recv, 0, fx);
            link.fail(st, me, status, fx);
        }
        Ok(())
    }
}

impl QueuePair for SoftQp {
    fn num(&self) -> QpNum {
        self.link.nums[self.end]
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.link.addrs[self.end]
    }

    fn peer_addr(&self) -> SocketAddrV4 {
        self.link.addrs[1 - self.end]
    }

    fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge {
            return Err(PostError::TooManySge);
        }
        let mut fx = Effects::default();
        let r = self.post_send_locked(&mut self.link.lock(), wr, &mut fx);
        self.link.apply(fx);
        r
    }

    fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge {
            return Err(PostError::TooManySge);
        }
        let mut fx = Effects::default();
        let r = self.post_recv_locked(&mut self.link.lock(), wr, &mut fx);
        self.link.apply(fx);
        r
    }

    fn set_error(&self) {
        let me = self.end;
        let mut fx = Effects::default();
        {
            let mut st = self.link.lock();
            if self.link.break_link(&mut st, me, &mut fx) {
                // The closing end is not told about its own close.
                fx.tell[1 - me] = true;
            }
            st.sides[me].error = Some(WcStatus::Flushed);
        }
        self.link.apply(fx);
    }
}

impl Drop for SoftQp {
    fn drop(&mut self) {
        self.set_error();
        let link = &*self.link;
        link.nics[self.end].forget_qp(link.nums[self.end]);
        link.cqs[self.end].release(self.reserved);
    }
}
