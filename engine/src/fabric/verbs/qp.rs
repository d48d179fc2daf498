//! Reliable-connected queue pairs (created on an rdma_cm id).

use super::cq::VerbsCq;
use super::id::OwnedId;
use super::sys::{errno, os_error, Raw};
use super::{lock, Shared, BIND_SLACK, RESERVED_WR_ID};
use crate::fabric::{
    FabricError, PostError, QpEvents, QpNum, QpParams, QueuePair, RecvWr, SendOp, SendWr, WcOpcode,
    WcStatus, WorkCompletion,
};
use rdma_sys::*;
use std::mem::MaybeUninit;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

/// Scatter/gather entries per request the stack buffers hold.
const MAX_SGE: usize = 32;

/// Connection state, behind the post lock.
#[derive(Default)]
struct State {
    /// The QP is in (or is being moved to) the error state: posts are
    /// completed `Flushed` in software.
    error: bool,
    /// `rdma_disconnect` was called.
    disconnect_sent: bool,
    /// The connection manager reported the connection established (on the
    /// accepting side this can follow `accept` by a while: until the
    /// connector's RTU arrives, a disconnect cannot be sent yet).
    established: bool,
    /// `set_error` was called here (the peer's disconnect is then no news).
    local_close: bool,
    /// `QpEvents::disconnected` was called (at most once).
    reported: bool,
    /// The ibv QP was destroyed by `abandon` (implies `error`): nothing may
    /// name it any more, and `drop` does not destroy it again.
    destroyed: bool,
}

/// A connected RC queue pair of a [`VerbsNic`](super::VerbsNic).
pub struct VerbsQp {
    shared: Arc<Shared>,
    cq: Arc<VerbsCq>,
    /// The ibv QP, created by `rdma_create_qp` on `id`; destroyed in `drop`
    /// (`rdma_destroy_qp`) before `id` is.
    qp: Raw<ibv_qp>,
    /// The rdma_cm id of the connection (destroyed after the QP, as the
    /// last field drop).
    id: OwnedId,
    num: u32,
    /// rdma_cm id context: the key of this connection in `Shared::tokens`.
    token: u64,
    local: SocketAddrV4,
    peer: SocketAddrV4,
    max_inline: u32,
    max_sge: u32,
    /// CQ entries reserved for this QP (`VerbsCq::reserve`), returned when
    /// it is destroyed.
    cq_entries: usize,
    events: Arc<dyn QpEvents>,
    /// The post lock: posts hold it shared, entering the error state holds
    /// it exclusively, so no post reaches the NIC after the QP left RTS.
    state: RwLock<State>,
}

impl VerbsQp {
    /// Creates the QP of connection `id` (address and route resolved, or a
    /// connection request) with `params`.
    pub(crate) fn create(
        shared: &Arc<Shared>,
        id: OwnedId,
        token: u64,
        params: &QpParams,
    ) -> Result<Arc<VerbsQp>, FabricError> {
        let cq = shared
            .cq(params.cq)
            .ok_or(FabricError::Invalid("unknown completion queue"))?;
        let caps = shared.caps;
        let max_sge = params.max_sge.clamp(1, caps.max_sge.min(MAX_SGE as u32));
        let max_send_wr = params
            .send_depth
            .max(1)
            .saturating_add(BIND_SLACK)
            .min(caps.max_qp_wr);
        let max_recv_wr = params.recv_depth.max(1).min(caps.max_qp_wr);
        // Every request of this QP may sit completed in the CQ at once.
        let cq_entries = max_send_wr as usize + max_recv_wr as usize;
        if !cq.budget.reserve(cq_entries) {
            return Err(FabricError::NoResources(
                "completion queue full (its queue pairs' depths add up to its size)",
            ));
        }
        let mut inline = shared.cfg.max_inline;
        let created = loop {
            // SAFETY: ibv_qp_init_attr is plain data (null pointers valid).
            let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
            attr.send_cq = cq.raw();
            attr.recv_cq = cq.raw();
            attr.qp_type = ibv_qp_type::IBV_QPT_RC;
            attr.sq_sig_all = 0;
            attr.cap = ibv_qp_cap {
                max_send_wr,
                max_recv_wr,
                max_send_sge: max_sge,
                max_recv_sge: max_sge,
                max_inline_data: inline,
            };
            // SAFETY: id is a live id bound to our device; the PD and CQ
            // belong to the same device context and outlive the QP (it holds
            // Arcs to both); attr is a valid init_attr.
            let rc = unsafe { rdma_create_qp(id.get(), shared.pd.get(), &mut attr) };
            if rc == 0 {
                // SAFETY: on success rdma_create_qp stored the QP in the id.
                break Ok((unsafe { (*id.get()).qp }, attr.cap));
            }
            if inline > 0 {
                // The device may give less inline data, or none: halve the
                // ask (down to 16 B, then none) and retry.
                inline = if inline > 16 { inline / 2 } else { 0 };
                continue;
            }
            break Err(match errno() {
                libc::ENOMEM => FabricError::NoResources("queue pair"),
                libc::EINVAL => FabricError::Invalid("queue pair size"),
                _ => FabricError::Unavailable(os_error("rdma_create_qp")),
            });
        };
        let (qp, cap) = created.inspect_err(|_| cq.budget.release(cq_entries))?;
        // SAFETY: the id is live; its route holds the resolved addresses.
        let (local, peer) = unsafe { id.addresses() };
        // SAFETY: valid QP.
        let num = unsafe { (*qp).qp_num };
        let q = Arc::new(VerbsQp {
            shared: shared.clone(),
            cq,
            qp: Raw(qp),
            id,
            num,
            token,
            local,
            peer,
            max_inline: cap.max_inline_data.min(inline),
            max_sge,
            cq_entries,
            events: params.events.clone(),
            state: RwLock::new(State::default()),
        });
        lock(&shared.qps).insert(num, Arc::downgrade(&q));
        shared.live_qps.fetch_add(1, Ordering::Relaxed);
        Ok(q)
    }

    pub(crate) fn id(&self) -> &OwnedId {
        &self.id
    }

    /// Sets this side's RNR NAK timer (rdma_cm leaves 0 = 655 ms). Allowed
    /// in the RTS → RTS transition; failure only costs latency.
    pub(crate) fn tune(&self) {
        // SAFETY: ibv_qp_attr is plain data.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.min_rnr_timer = self.shared.cfg.min_rnr_timer;
        // SAFETY: valid QP; the mask names the one attribute set.
        unsafe {
            ibv_modify_qp(
                self.qp.get(),
                &mut attr,
                ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0 as i32,
            )
        };
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Error state + disconnect, with the post lock held exclusively.
    fn enter_error(&self, st: &mut State) {
        if !st.error {
            st.error = true;
            // SAFETY: ibv_qp_attr is plain data.
            let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
            attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
            // SAFETY: valid QP; moving to ERR is allowed from every state.
            unsafe {
                ibv_modify_qp(
                    self.qp.get(),
                    &mut attr,
                    ibv_qp_attr_mask::IBV_QP_STATE.0 as i32,
                )
            };
        }
        if st.established {
            self.send_disconnect(st);
        }
        // Else `on_established` sends it, or the connection never completes.
    }

    fn send_disconnect(&self, st: &mut State) {
        if !st.disconnect_sent {
            st.disconnect_sent = true;
            // SAFETY: the id is live (we own it).
            unsafe { rdma_disconnect(self.id.get()) };
        }
    }

    /// `RDMA_CM_EVENT_ESTABLISHED`: sends the disconnect `set_error` had to
    /// hold back (the IB CM sends a DREQ only for an established connection;
    /// before that the peer would never hear of the close).
    pub(crate) fn on_established(&self) {
        let mut st = self.write_state();
        st.established = true;
        if st.error {
            self.send_disconnect(&mut st);
        }
    }

    /// `RDMA_CM_EVENT_DISCONNECTED` (or another end of the connection seen
    /// by the CM thread).
    ///
    /// The owner hears of the peer's teardown *before* the QP enters the
    /// error state: the requests that state flushes are then reported as
    /// the peer's doing (`WSAECONNRESET`), not as a local failure, whichever
    /// thread reaps them first.
    pub(crate) fn on_disconnected(&self) {
        let report = {
            let mut st = self.write_state();
            let r = !st.local_close && !st.reported;
            st.reported = true;
            r
        };
        if report {
            self.events.disconnected();
        }
        let mut st = self.write_state();
        self.enter_error(&mut st);
        // Answers the peer's DREQ (DREP) whatever state we thought the
        // connection was in.
        self.send_disconnect(&mut st);
    }

    fn flush_soft(&self, wr_id: u64, opcode: WcOpcode) {
        self.cq.push_soft(WorkCompletion {
            wr_id,
            status: WcStatus::Flushed,
            opcode,
            byte_len: 0,
        });
    }

    /// Posts an unsignaled type-2 window bind (see the `verbs` docs).
    pub(crate) fn post_bind(
        &self,
        mw: *mut ibv_mw,
        rkey: u32,
        info: ibv_mw_bind_info,
    ) -> Result<(), FabricError> {
        let st = self.read_state();
        if st.error {
            return Err(FabricError::Invalid("queue pair is not connected"));
        }
        // SAFETY: ibv_send_wr is plain data (null pointers, zero unions).
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = RESERVED_WR_ID;
        wr.opcode = ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.bind_mw_tso_union.bind_mw = bind_mw_t {
            mw,
            rkey,
            bind_info: info,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: valid QP (state checked under the post lock); the WR is
        // read during the call only; mw and info.mr are live objects of our PD.
        let rc = unsafe { ibv_post_send(self.qp.get(), &mut wr, &mut bad) };
        drop(st);
        match rc {
            0 => Ok(()),
            libc::ENOMEM => Err(FabricError::NoResources("send queue full (window bind)")),
            e => Err(FabricError::Unavailable(format!(
                "memory window bind: {}",
                std::io::Error::from_raw_os_error(e)
            ))),
        }
    }
}

/// Scatter/gather entries as the device reads them: only the first
/// `num_sge` are written (no zeroing of the rest on every post).
type SgeBuf = [MaybeUninit<ibv_sge>; MAX_SGE];

/// Fills the first entries of `out` (at most [`MAX_SGE`]; the caller
/// checked `max_sge`); returns their number and total length.
fn fill_sges(sges: &[crate::fabric::Sge], out: &mut SgeBuf) -> (usize, u64) {
    let mut total = 0u64;
    for (o, s) in out.iter_mut().zip(sges) {
        o.write(ibv_sge {
            addr: s.addr as u64,
            length: s.len,
            lkey: s.lkey,
        });
        total += u64::from(s.len);
    }
    (sges.len().min(MAX_SGE), total)
}

impl QueuePair for VerbsQp {
    fn num(&self) -> QpNum {
        QpNum(self.num)
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge as usize {
            return Err(PostError::TooManySge);
        }
        let (opcode, wc_op, remote) = match wr.op {
            SendOp::Send => (ibv_wr_opcode::IBV_WR_SEND, WcOpcode::Send, None),
            SendOp::RdmaWrite { remote_addr, rkey } => (
                ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                WcOpcode::RdmaWrite,
                Some((remote_addr, rkey)),
            ),
            SendOp::RdmaRead { remote_addr, rkey } => (
                ibv_wr_opcode::IBV_WR_RDMA_READ,
                WcOpcode::RdmaRead,
                Some((remote_addr, rkey)),
            ),
        };
        let st = self.read_state();
        if st.error {
            self.flush_soft(wr.wr_id, wc_op);
            return Ok(());
        }
        let mut sg: SgeBuf = [const { MaybeUninit::uninit() }; MAX_SGE];
        let (n, total) = fill_sges(wr.sges, &mut sg);
        // SAFETY: ibv_send_wr is plain data (null pointers, zero unions).
        let mut w: ibv_send_wr = unsafe { std::mem::zeroed() };
        w.wr_id = wr.wr_id;
        w.sg_list = sg.as_mut_ptr().cast();
        w.num_sge = n as i32;
        w.opcode = opcode;
        w.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        if wc_op != WcOpcode::RdmaRead && total > 0 && total <= u64::from(self.max_inline) {
            w.send_flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        if let Some((remote_addr, rkey)) = remote {
            w.wr.rdma = rdma_t { remote_addr, rkey };
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: valid QP, not in error (checked under the post lock); the
        // WR and its first `n` entries (written by fill_sges; the device
        // reads no more) are read during the call only (inline data is
        // copied); the memory they name is the caller's to keep valid.
        let rc = unsafe { ibv_post_send(self.qp.get(), &mut w, &mut bad) };
        drop(st);
        match rc {
            0 => Ok(()),
            libc::ENOMEM => Err(PostError::QueueFull),
            _ => {
                // The QP cannot take requests (e.g. it failed meanwhile): the
                // request completes like one posted in the error state.
                self.flush_soft(wr.wr_id, wc_op);
                Ok(())
            }
        }
    }

    fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.max_sge as usize {
            return Err(PostError::TooManySge);
        }
        let st = self.read_state();
        if st.error {
            self.flush_soft(wr.wr_id, WcOpcode::Recv);
            return Ok(());
        }
        let mut sg: SgeBuf = [const { MaybeUninit::uninit() }; MAX_SGE];
        let (n, _) = fill_sges(wr.sges, &mut sg);
        let mut w = ibv_recv_wr {
            wr_id: wr.wr_id,
            next: std::ptr::null_mut(),
            sg_list: sg.as_mut_ptr().cast(),
            num_sge: n as i32,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: as in post_send (the first `n` entries are written).
        let rc = unsafe { ibv_post_recv(self.qp.get(), &mut w, &mut bad) };
        drop(st);
        match rc {
            0 => Ok(()),
            libc::ENOMEM => Err(PostError::QueueFull),
            _ => {
                self.flush_soft(wr.wr_id, WcOpcode::Recv);
                Ok(())
            }
        }
    }

    fn set_error(&self) {
        let mut st = self.write_state();
        st.local_close = true;
        self.enter_error(&mut st);
    }

    /// Error state, then the QP destroyed: once `ibv_destroy_qp` returned
    /// the device does no more DMA for it (rxe, for one, waits for its
    /// requester, responder and completer tasks). Its windows go first
    /// (a window keeps its QP referenced). The rdma_cm id lives on until
    /// `drop`; later posts are completed `Flushed` in software, and
    /// completions already in the CQ stay there.
    fn abandon(&self) {
        lock(&self.shared.regs).revoke_qp(self.num);
        let mut st = self.write_state();
        st.local_close = true;
        self.enter_error(&mut st);
        if !st.destroyed {
            st.destroyed = true;
            // SAFETY: the QP was created on this id and is destroyed once
            // (`destroyed`); the post lock is held exclusively, so no post
            // is inside it, and every later one sees `error` and does not
            // name it; `tune` runs only while connecting, before a socket
            // has ops to abandon.
            unsafe { rdma_destroy_qp(self.id.get()) };
        }
    }
}

impl Drop for VerbsQp {
    fn drop(&mut self) {
        {
            let mut st = self.write_state();
            st.local_close = true;
            self.enter_error(&mut st);
        }
        lock(&self.shared.qps).remove(&self.num);
        lock(&self.shared.regs).revoke_qp(self.num);
        self.shared.tokens.remove(self.token);
        self.shared.live_qps.fetch_sub(1, Ordering::Relaxed);
        if !self.write_state().destroyed {
            // SAFETY: the QP was created on this id and is destroyed once
            // (`abandon` did not); no post can race (we are the last
            // reference). Completions already in the CQ stay there and
            // remain pollable.
            unsafe { rdma_destroy_qp(self.id.get()) };
        }
        // Its completions were all reaped by now: the engine drops a QP only
        // after every op on it completed (its flushed binds use the CQ's
        // own slack). After an `abandon` the engine completed some ops
        // itself, and completions the device wrote before the destroy may
        // still wait in the CQ (polled and dropped later): they briefly
        // hold entries released here, a rare case (a NIC that did not
        // flush within the close's quiesce time) the CQ's slack covers
        // only in part.
        self.cq.budget.release(self.cq_entries);
        // `id` is destroyed by its own drop, after this.
    }
}
