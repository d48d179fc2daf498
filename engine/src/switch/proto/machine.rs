//! The per-connection state machine: [`Connection`].
//!
//! Events come in through the `recv_done`, `send_done`, `rdma_done`,
//! `exposed`, `closed` and `app_*` methods; each updates the state and
//! queues [`Action`]s, which the driver takes with [`Connection::poll_action`]
//! and executes in order. Every event ends with one `progress` pass: serve
//! the pending receives from the incoming stream, post RDMA writes for a
//! write target, then send what credits, send buffers and ring space allow
//! (CREDIT_ACK, control answers, payload in application order and FIN,
//! CREDIT, NEED).

use super::action::{Access, Action, Payload};
use super::config::{Config, RdmaFlow};
use super::credit::{Class, Credits, RESERVE, SLACK};
use super::error::Error;
use super::ring::{RingRx, RingTx, MIN_RING};
use super::wire::{
    Body, DecodeError, Desc, Head, Message, CAP_RDMA_READ, HEADER_LEN, MAX_HEAD, VERSION,
};
use super::{OpId, Role};
use std::collections::VecDeque;

/// What [`Connection::app_cancel`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The op is not pending (it completed, or never existed).
    NotFound,
    /// The op was withdrawn; no completion follows. `done` bytes of a send
    /// are in the stream already (the peer receives them); a receive got
    /// nothing.
    Cancelled {
        /// Bytes the op moved before it was withdrawn.
        done: u64,
    },
    /// The op's buffer is exposed to the peer or in an RDMA op, or its
    /// transfer was announced: it completes normally, or with the error of
    /// an [`abort`](Connection::abort) once the fabric let go of it.
    InFlight,
}

/// Counters of one connection (this side's view).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages sent, of every kind.
    pub msgs_sent: u64,
    /// Messages received and decoded.
    pub msgs_received: u64,
    /// DATA and INLINE messages sent.
    pub data_msgs: u64,
    /// INLINE messages sent (of `data_msgs`).
    pub inline_msgs: u64,
    /// Payload bytes sent in DATA and INLINE messages copied into a send
    /// ring or message buffer.
    pub bytes_copied_in: u64,
    /// Payload bytes sent in DATA whose ring write read the application's
    /// buffer itself (no copy on the sending side).
    pub bytes_direct: u64,
    /// Payload bytes copied from the receive ring and receive buffers to
    /// application buffers.
    pub bytes_copied_out: u64,
    /// READ_OFFERs sent.
    pub read_offers: u64,
    /// WRITE_REQUESTs sent.
    pub write_requests: u64,
    /// RDMA reads posted.
    pub rdma_reads: u64,
    /// RDMA writes posted.
    pub rdma_writes: u64,
    /// Bytes moved by the RDMA ops this side posted.
    pub bytes_rdma: u64,
    /// CREDIT and CREDIT_ACK messages sent.
    pub credit_msgs: u64,
    /// NEED messages sent.
    pub need_msgs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the peer's HELLO.
    AwaitHello,
    /// HELLOs exchanged.
    Open,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvSlot {
    /// Posted to the fabric: the next message may land in it.
    Posted,
    /// Holds an item of the incoming stream not yet consumed.
    Held,
    /// Its counted message was consumed; the re-post waits (in
    /// `Connection::unposted`, see `Connection::repost`).
    Consumed,
    /// Neither (completed after the connection failed).
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fin {
    /// Not shut down.
    No,
    /// Shut down; FIN goes after every payload already queued.
    Queued,
    /// FIN is in flight in this send buffer.
    Sent(u16),
    /// FIN's send completed: it is in the peer's receive buffer.
    Delivered,
}

/// A ring write in flight straight from send op `op`'s buffer (see
/// `Connection::ring_busy`): its `len` bytes settle when it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirectWrite {
    op: OpId,
    len: u32,
}

/// Who uses an RDMA op slot.
#[derive(Clone, Copy, Debug)]
enum RdmaUse {
    /// A read into receive op `op`.
    Read { op: OpId, len: u32 },
    /// A write from send op `op` (part of a write target).
    Write { op: OpId, len: u32 },
}

#[derive(Clone, Copy, Debug)]
enum ExpState {
    /// `Expose` queued, `exposed` not yet called.
    Pending,
    /// Registered: the peer may reach it through this descriptor.
    Live(Desc),
}

/// A buffer (part) exposed to the peer.
#[derive(Clone, Copy, Debug)]
struct Exposure {
    /// Its id in `Expose`, `exposed` and `Unexpose`.
    xfer: u64,
    /// Whose buffer.
    op: OpId,
    /// Pending until `exposed`, then live until unexposed or the socket
    /// closed.
    state: ExpState,
}

/// One application send, from `app_send` until it completes.
#[derive(Debug)]
struct SendOp {
    /// The application op.
    op: OpId,
    /// Bytes to send (> 0).
    len: u64,
    /// Bytes put into the stream (in DATA, or announced by an offer or a
    /// write request). Invariant: `settled <= queued <= len`.
    queued: u64,
    /// Bytes whose delivery is settled: copied into DATA, or transfers that
    /// finished. The op completes when `settled == len`.
    settled: u64,
    /// Sent by copy (small, non-blocking, or its exposure failed).
    by_copy: bool,
    /// Copied through the ring straight from the application's buffer
    /// (blocking, at least `direct_min` bytes): its DATA bytes settle when
    /// their ring write completed, not when they are handed to the driver.
    direct: bool,
    /// A `try_send`: completes within `app_send` with what fit.
    nonblocking: bool,
    /// Read flow: the exposure of the next transfer, before its offer.
    prep: Option<Prep>,
}

#[derive(Clone, Copy, Debug)]
enum Prep {
    Exposing { xfer: u64, len: u32 },
    Ready { xfer: u64, len: u32, desc: Desc },
}

/// A write target the peer gave for the oldest write request.
#[derive(Debug)]
struct Target {
    /// Bytes the target takes.
    len: u32,
    /// The peer's exposure.
    desc: Desc,
    /// Bytes handed to RDMA writes. Invariant: `done <= posted <= len`.
    posted: u32,
    /// Bytes whose writes completed.
    done: u32,
}

#[derive(Debug)]
enum TransferKind {
    /// Waiting for READ_DONE; the buffer is exposure `xfer`.
    Offer { xfer: u64, desc: Desc },
    /// Waiting for write targets; `written` bytes done so far.
    Request {
        written: u32,
        target: Option<Target>,
    },
}

/// A large transfer announced to the peer and not finished (oldest first:
/// the peer serves them in stream order).
#[derive(Debug)]
struct Transfer {
    /// The send op whose bytes it carries.
    op: OpId,
    /// Offset of the transfer in the op's buffer.
    op_offset: u64,
    /// Bytes announced.
    len: u32,
    /// Offer or write request, and its progress.
    kind: TransferKind,
}

#[derive(Debug)]
enum ItemKind {
    /// Unread stream bytes `at..end` of the receive ring.
    Data { at: u32, end: u32 },
    /// Unread stream bytes `at..end` of the item's receive buffer (an
    /// INLINE's payload).
    Inline { at: u32, end: u32 },
    /// An offer; `read` bytes read so far.
    Offer { len: u32, desc: Desc, read: u32 },
    /// A write request; `written` bytes received so far.
    WriteReq { len: u32, written: u32 },
    /// End of stream.
    Fin,
}

/// An item of the incoming stream.
#[derive(Debug)]
struct Item {
    /// The receive buffer that holds it, `Held` until the item is consumed
    /// (none for DATA: its bytes are in the ring, its receive re-posted).
    /// Invariant: `Some` for every kind but DATA.
    slot: Option<u16>,
    /// What it is, and how much of it was consumed.
    kind: ItemKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Busy {
    /// Waiting for stream bytes.
    No,
    /// Its buffer is the target of RDMA read `rdma`.
    Reading { rdma: u16 },
    /// Its buffer is (being) exposed as write target `xfer`; `sent` once
    /// WRITE_TARGET was queued.
    Target { xfer: u64, len: u32, sent: bool },
}

/// One application receive, from `app_recv` until it completes.
#[derive(Debug)]
struct RecvOp {
    /// The application op.
    op: OpId,
    /// Buffer bytes (> 0).
    cap: u64,
    /// A `try_recv`: fails with `WouldBlock` if nothing is there.
    nonblocking: bool,
    /// Invariant: only the first receive of the queue is ever busy.
    busy: Busy,
}

/// The actions for the driver, in order: a vector read from the front and
/// emptied when read to its end. The driver takes every action after each
/// event, so the vector restarts at 0 each time, and a push and a take are
/// cheaper than a ring buffer's, which wraps its indices on each.
#[derive(Debug)]
struct Actions {
    v: Vec<Action>,
    /// The next action to take. Invariant: `next < v.len()`, or both are 0.
    next: usize,
}

impl Actions {
    fn with_capacity(n: usize) -> Actions {
        Actions {
            v: Vec::with_capacity(n),
            next: 0,
        }
    }

    #[inline]
    fn push_back(&mut self, a: Action) {
        if self.next > 0 && self.v.len() == self.v.capacity() {
            // A driver that leaves actions untaken: reuse the space of the
            // taken ones before growing.
            self.v.drain(..self.next);
            self.next = 0;
        }
        self.v.push(a);
    }

    #[inline]
    fn pop_front(&mut self) -> Option<Action> {
        let a = *self.v.get(self.next)?;
        self.next += 1;
        if self.next == self.v.len() {
            self.v.clear();
            self.next = 0;
        }
        Some(a)
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.v.is_empty()
    }
}

/// One side of a session: the protocol state of one connection. See the
/// [module docs](super) for the protocol; [`Action`] for what the driver
/// must do.
#[derive(Debug)]
pub struct Connection {
    /// This side's settings (validated).
    cfg: Config,
    /// Which end this is; fixes whether our HELLO is counted.
    role: Role,
    /// Negotiation state; nothing but HELLO is sent before `Open`.
    phase: Phase,
    /// Why the connection ended; once set, never changes.
    error: Option<Error>,
    /// The driver closed the socket (`closed`): exposures are gone, posts
    /// fail.
    socket_closed: bool,
    /// `Action::Abort` was queued (at most once).
    abort_sent: bool,
    /// Actions for the driver, in order.
    actions: Actions,
    /// Credits both ways (see `credit.rs`).
    credits: Credits,
    /// Sends of more bytes go by RDMA.
    threshold: u64,
    /// This side's receive ring, exposed to the peer (announced in HELLO).
    ring: Desc,
    /// The peer's receive ring (from its HELLO).
    peer_ring: Desc,
    /// Space in the peer's ring.
    ring_tx: RingTx,
    /// Unread bytes of this side's ring.
    ring_rx: RingRx,
    /// The largest INLINE payload: the smaller buffer of both sides less
    /// the header (0 until the peer's HELLO). Longer copied sends go
    /// through the ring.
    inline_max: u32,
    /// The peer's HELLO said it accepts READ_OFFERs.
    peer_reads: bool,
    /// Sequence number of the next message sent.
    send_seq: u32,
    /// Sequence number the next message received must carry.
    recv_seq: u32,
    /// The message each send buffer's latest `Send`/`SendInline` sends,
    /// encoded: rewritten only when the buffer is handed out again, after
    /// its send completed, so after the driver executed that action.
    heads: Vec<Head>,
    /// Free send buffers. Invariant: exactly the indices with
    /// neither `send_busy[i]` nor `ring_busy[i]`.
    free_send: Vec<u16>,
    /// Send buffers with a send in flight.
    send_busy: Vec<bool>,
    /// The sends in flight in posting order, and whether the driver reports
    /// each one's completion (`Action::Send`'s `report`). The fabric
    /// completes a queue pair's sends in that order, so a reported
    /// completion also completes every send before it. Invariant: exactly
    /// the buffers of `send_busy`; whenever fewer than half the send
    /// buffers are free, the last send of this queue is reported (so a
    /// side short of buffers always has a report coming).
    sends_posted: VecDeque<(u16, bool)>,
    /// Send buffers whose DATA's ring write reads the application's buffer
    /// and is in flight. Invariant: a buffer is free when neither its send
    /// nor such a write is. A write from the send ring is not tracked: the
    /// DATA's send, which follows it on the same queue pair, completes
    /// after it.
    ring_busy: Vec<Option<DirectWrite>>,
    /// State of each receive buffer.
    recv_slots: Vec<RecvSlot>,
    /// The `Consumed` receive buffers, to post (and then announce) after
    /// this side's next message, before a CREDIT, when the peer's NEED
    /// arrives or a receive may not wait, or when the application waits
    /// for data (see `repost`). Never holds more than the peer can miss
    /// (`Credits::may_hold_back`); empty once the connection failed.
    unposted: Vec<u16>,
    /// Free RDMA op slots. Invariant: exactly the `None`s of `rdma_use`.
    free_rdma: Vec<u16>,
    /// What each RDMA op slot is used for.
    rdma_use: Vec<Option<RdmaUse>>,
    /// Next exposure id.
    next_xfer: u64,
    /// Live and pending exposures.
    exposures: Vec<Exposure>,
    /// Application sends in order; the first with `queued < len` is the
    /// one that sends next.
    sends: VecDeque<SendOp>,
    /// Shutdown of the sending side; FIN is sent only once every op of
    /// `sends` has `queued == len`.
    fin: Fin,
    /// Large transfers announced and not finished, oldest first.
    transfers: VecDeque<Transfer>,
    /// Control answers waiting for credits or a send buffer.
    control: VecDeque<Body>,
    /// This side sent NEED and has not had the CREDIT_ACK yet.
    need_outstanding: bool,
    /// The peer's NEED is not answered yet.
    need_from_peer: bool,
    /// The incoming stream, in order.
    inbox: VecDeque<Item>,
    /// FIN arrived (it may still be behind unread items).
    fin_received: bool,
    /// Application receives, in order.
    recvs: VecDeque<RecvOp>,
    /// Counters.
    stats: Stats,
}

impl Connection {
    /// A machine for one side of a connected socket whose receive ring (of
    /// `cfg.ring_size` bytes) the driver exposed for the peer's RDMA writes
    /// as `ring`: posts every receive and, as the connector, sends HELLO.
    /// Fails if `cfg` is invalid.
    pub fn new(cfg: Config, role: Role, ring: Desc) -> Result<Connection, String> {
        cfg.validate()?;
        let n_recv = usize::from(cfg.recv_slots);
        let n_send = cfg.send_slots;
        let n_rdma = cfg.rdma_slots;
        let mut c = Connection {
            role,
            phase: Phase::AwaitHello,
            error: None,
            socket_closed: false,
            abort_sent: false,
            actions: Actions::with_capacity(n_recv + 8),
            credits: Credits::default(),
            threshold: cfg.rdma_threshold,
            ring,
            peer_ring: [0; super::DESC_LEN],
            ring_tx: RingTx::default(),
            ring_rx: RingRx::default(),
            inline_max: 0,
            peer_reads: false,
            send_seq: 0,
            recv_seq: 0,
            heads: vec![Head::default(); usize::from(n_send)],
            free_send: (0..n_send).rev().collect(),
            send_busy: vec![false; usize::from(n_send)],
            sends_posted: VecDeque::with_capacity(usize::from(n_send)),
            ring_busy: vec![None; usize::from(n_send)],
            recv_slots: vec![RecvSlot::Posted; n_recv],
            unposted: Vec::with_capacity(n_recv),
            free_rdma: (0..n_rdma).rev().collect(),
            rdma_use: vec![None; usize::from(n_rdma)],
            next_xfer: 1,
            exposures: Vec::new(),
            sends: VecDeque::new(),
            fin: Fin::No,
            transfers: VecDeque::new(),
            control: VecDeque::new(),
            need_outstanding: false,
            need_from_peer: false,
            inbox: VecDeque::with_capacity(n_recv),
            fin_received: false,
            recvs: VecDeque::new(),
            stats: Stats::default(),
            cfg,
        };
        for slot in 0..c.cfg.recv_slots {
            c.actions.push_back(Action::PostRecv { slot });
        }
        c.credits.announce_hello(u64::from(c.announce()));
        if role == Role::Connector {
            c.emit(c.hello(), None);
        }
        Ok(c)
    }

    // ------------------------------------------------------------------
    // Queries
    // ------------------------------------------------------------------

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The encoded message (header and body, without an INLINE's payload)
    /// of the [`Action::Send`] or [`Action::SendInline`] of send buffer
    /// `slot`: valid from that action until the buffer's send completed
    /// (empty for a buffer never used or out of range).
    pub fn head(&self, slot: u16) -> &[u8] {
        self.heads
            .get(usize::from(slot))
            .map_or(&[], Head::as_bytes)
    }

    /// The send buffer the next message will be written into, if one is
    /// free (the free buffers are reused last freed, first taken).
    pub fn next_send_buffer(&self) -> Option<u16> {
        self.free_send.last().copied()
    }

    /// Whether [`Connection::poll_action`] has an action for the driver.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Why the connection ended, if it did.
    pub fn error(&self) -> Option<Error> {
        self.error
    }

    /// Counted messages this side may send now.
    pub fn credits(&self) -> u32 {
        self.credits.send().min(u64::from(u32::MAX)) as u32
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Sends of more bytes than this go by RDMA.
    pub fn rdma_threshold(&self) -> u64 {
        self.threshold
    }

    /// Sets the RDMA threshold for sends that start later.
    pub fn set_rdma_threshold(&mut self, bytes: u64) {
        self.threshold = bytes;
    }

    /// Whether large sends use the read flow (known once connected).
    pub fn uses_read_flow(&self) -> bool {
        self.phase == Phase::Open && self.cfg.rdma_flow == RdmaFlow::Read && self.peer_reads
    }

    /// The peer's FIN arrived.
    pub fn fin_received(&self) -> bool {
        self.fin_received
    }

    /// This side's FIN is in the peer's receive buffer.
    pub fn fin_delivered(&self) -> bool {
        self.fin == Fin::Delivered
    }

    /// Received stream bytes are unread, or sends are not finished: closing
    /// now would lose data.
    pub fn has_pending_data(&self) -> bool {
        !self.sends.is_empty() || self.inbox.iter().any(|i| !matches!(i.kind, ItemKind::Fin))
    }

    /// Nothing is queued to send and nothing is in flight: no send, RDMA op
    /// or exposure.
    pub fn is_quiescent(&self) -> bool {
        self.sends.is_empty()
            && self.control.is_empty()
            && self.transfers.is_empty()
            && self.fin != Fin::Queued
            && self.send_busy.iter().all(|b| !b)
            && self.ring_busy.iter().all(Option::is_none)
            && self.rdma_use.iter().all(Option::is_none)
            && self.exposures.is_empty()
    }

    // ------------------------------------------------------------------
    // Application calls
    // ------------------------------------------------------------------

    /// The application sends `len` bytes of `op`'s buffer. Completes with
    /// [`Action::SendComplete`]: at once for a non-blocking send (what fit,
    /// or `WouldBlock`), when its last DATA is queued for a copied one, when
    /// the peer has the bytes for an RDMA one.
    pub fn app_send(&mut self, op: OpId, len: u64, nonblocking: bool) {
        let early = if let Some(e) = self.error {
            Some(Err(e))
        } else if self.fin != Fin::No {
            Some(Err(Error::Shutdown))
        } else if len == 0 {
            Some(Ok(0))
        } else if nonblocking && (self.phase != Phase::Open || !self.sends.is_empty()) {
            Some(Err(Error::WouldBlock))
        } else {
            None
        };
        if let Some(result) = early {
            self.actions.push_back(Action::SendComplete { op, result });
            return;
        }
        self.sends.push_back(SendOp {
            op,
            len,
            queued: 0,
            settled: 0,
            by_copy: nonblocking || len <= self.threshold,
            direct: !nonblocking && len <= self.threshold && len >= self.cfg.direct_min,
            nonblocking,
            prep: None,
        });
        self.progress();
        if nonblocking {
            if let Some(i) = self.sends.iter().position(|s| s.op == op) {
                self.stop_nonblocking(i);
            }
        }
    }

    /// The application receives into `op`'s buffer of `cap` bytes.
    /// Completes with [`Action::RecvComplete`]: copied bytes as soon as any
    /// arrived (up to a transfer boundary), one RDMA transfer part, 0 at end
    /// of stream; a non-blocking receive fails with `WouldBlock` when
    /// nothing is there.
    pub fn app_recv(&mut self, op: OpId, cap: u64, nonblocking: bool) {
        if cap == 0 {
            let result = Ok(0);
            self.actions.push_back(Action::RecvComplete { op, result });
            return;
        }
        if nonblocking && !self.recvs.is_empty() {
            let result = Err(Error::WouldBlock);
            self.actions.push_back(Action::RecvComplete { op, result });
            return;
        }
        self.recvs.push_back(RecvOp {
            op,
            cap,
            nonblocking,
            busy: Busy::No,
        });
        // With nothing received, a blocking receive just waits: the pass
        // would find nothing to serve, and nothing it sends changed. Its
        // thread has nothing else to do: the receives held back are posted
        // (not at a `try_recv`'s `WouldBlock`, which an event loop meets
        // before it writes its reply).
        if self.inbox.is_empty() && self.error.is_none() && !nonblocking {
            self.post_unposted();
            return;
        }
        self.progress();
    }

    /// Shuts the sending side down: FIN follows everything sent so far.
    /// Idempotent; fails only if the connection ended before.
    pub fn app_shutdown(&mut self) -> Result<(), Error> {
        if self.fin != Fin::No {
            return Ok(());
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        self.fin = Fin::Queued;
        self.progress();
        Ok(())
    }

    /// Withdraws a pending op if its buffer is only in the machine's hands
    /// (spec §6.2).
    pub fn app_cancel(&mut self, op: OpId) -> CancelOutcome {
        if let Some(i) = self.recvs.iter().position(|r| r.op == op) {
            if self.recvs[i].busy != Busy::No {
                return CancelOutcome::InFlight;
            }
            self.recvs.remove(i);
            self.progress();
            return CancelOutcome::Cancelled { done: 0 };
        }
        let Some(i) = self.sends.iter().position(|s| s.op == op) else {
            return CancelOutcome::NotFound;
        };
        if self.transfers.iter().any(|t| t.op == op) || self.in_use_by_rdma(op) {
            return CancelOutcome::InFlight;
        }
        match self.sends[i].prep {
            Some(Prep::Exposing { .. }) => return CancelOutcome::InFlight,
            Some(Prep::Ready { xfer, desc, .. }) => {
                self.exposures.retain(|e| e.xfer != xfer);
                if !self.socket_closed {
                    self.actions.push_back(Action::Unexpose { xfer, desc });
                }
            }
            None => {}
        }
        let s = self.sends.remove(i).expect("index found above");
        self.progress();
        CancelOutcome::Cancelled { done: s.queued }
    }

    /// Aborts the connection with `error` (unless it already ended): see
    /// [`Action::Abort`].
    pub fn abort(&mut self, error: Error) {
        self.fail(error);
        self.progress();
    }

    // ------------------------------------------------------------------
    // Driver events
    // ------------------------------------------------------------------

    /// Receive `slot` completed: `Ok((head, n))` with `n` bytes received of
    /// which `head` holds the first (at least `min(n, MAX_HEAD)`), or the
    /// fabric's error code.
    pub fn recv_done(&mut self, slot: u16, result: Result<(&[u8], usize), u32>) {
        let i = usize::from(slot);
        if self.recv_slots.get(i) != Some(&RecvSlot::Posted) {
            self.fail(Error::Protocol(
                "completion of a receive that was not posted",
            ));
            self.progress();
            return;
        }
        self.recv_slots[i] = RecvSlot::Idle;
        match result {
            Err(code) => self.fail(Error::Transport(code)),
            // A receive posted before a transport error may still complete
            // with data: the stream up to there is kept (see `draining`).
            Ok((head, n)) if self.error.is_some() => {
                if self.draining() {
                    self.on_late_message(slot, head, n);
                }
            }
            Ok((_, n)) if n > self.cfg.slot_size as usize => {
                self.fail(Error::Protocol("message longer than the receive buffer"));
            }
            Ok((head, n)) => match Message::decode(head, n) {
                Ok(m) => self.on_message(slot, m),
                Err(DecodeError::BadVersion(theirs)) => self.fail(Error::VersionMismatch {
                    ours: VERSION,
                    theirs,
                }),
                Err(e) => self.fail(Error::Malformed(e)),
            },
        }
        self.progress();
    }

    /// Send `slot` completed (`Err`: the fabric's error code), and with it
    /// every send posted before it (reported or not).
    pub fn send_done(&mut self, slot: u16, result: Result<(), u32>) {
        let Some(k) = self.sends_posted.iter().position(|&(s, _)| s == slot) else {
            self.fail(Error::Protocol("completion of a send that was not posted"));
            self.progress();
            return;
        };
        for (s, _) in self.sends_posted.drain(..=k) {
            let i = usize::from(s);
            self.send_busy[i] = false;
            if self.ring_busy[i].is_none() {
                self.free_send.push(s);
            }
            if result.is_ok() && self.fin == Fin::Sent(s) {
                self.fin = Fin::Delivered;
            }
        }
        if let Err(code) = result {
            self.fail(Error::Transport(code));
        }
        self.progress();
    }

    /// The direct ring write of send buffer `slot`'s DATA (see
    /// [`Action::RingWrite`]) completed (`Err`: the fabric's error code).
    pub fn ring_write_done(&mut self, slot: u16, result: Result<(), u32>) {
        let i = usize::from(slot);
        let Some(used) = self.ring_busy.get_mut(i).and_then(Option::take) else {
            self.fail(Error::Protocol(
                "completion of a ring write that was not posted",
            ));
            self.progress();
            return;
        };
        if !self.send_busy[i] {
            self.free_send.push(slot);
        }
        match result {
            Err(code) => self.fail(Error::Transport(code)),
            Ok(()) => self.settle(used.op, u64::from(used.len)),
        }
        self.progress();
    }

    /// RDMA op `rdma` completed (`Err`: the fabric's error code).
    pub fn rdma_done(&mut self, rdma: u16, result: Result<(), u32>) {
        let Some(used) = self
            .rdma_use
            .get_mut(usize::from(rdma))
            .and_then(Option::take)
        else {
            self.fail(Error::Protocol(
                "completion of an RDMA op that was not posted",
            ));
            self.progress();
            return;
        };
        self.free_rdma.push(rdma);
        if let RdmaUse::Read { .. } = used {
            for r in self.recvs.iter_mut() {
                if r.busy == (Busy::Reading { rdma }) {
                    r.busy = Busy::No;
                }
            }
        }
        match (used, result) {
            (_, Err(code)) => self.fail(Error::Transport(code)),
            (RdmaUse::Read { op, len }, Ok(())) => self.read_done(op, len),
            (RdmaUse::Write { len, .. }, Ok(())) => self.write_part_done(len),
        }
        self.progress();
    }

    /// The exposure `xfer` asked for by [`Action::Expose`] was registered
    /// (its descriptor) or not (the provider's error code).
    pub fn exposed(&mut self, xfer: u64, result: Result<Desc, u32>) {
        let Some(k) = self
            .exposures
            .iter()
            .position(|e| e.xfer == xfer && matches!(e.state, ExpState::Pending))
        else {
            self.fail(Error::Protocol(
                "report of an exposure that was not asked for",
            ));
            self.progress();
            return;
        };
        let e = self.exposures[k];
        let ok = self.error.is_none() && result.is_ok();
        if ok {
            if let Ok(desc) = result {
                self.exposures[k].state = ExpState::Live(desc);
                self.on_exposed(e, desc);
            }
        } else {
            self.exposures.remove(k);
            if let (Ok(desc), false) = (result, self.socket_closed) {
                self.actions.push_back(Action::Unexpose { xfer, desc });
            }
            self.release_exposure_users(xfer, self.error.is_none());
        }
        self.progress();
    }

    /// The driver closed the socket: every exposure is gone, every post
    /// will fail or has completed in error.
    pub fn closed(&mut self) {
        self.socket_closed = true;
        self.fail(Error::Aborted);
        let live: Vec<u64> = self
            .exposures
            .iter()
            .filter(|e| matches!(e.state, ExpState::Live(_)))
            .map(|e| e.xfer)
            .collect();
        for xfer in live {
            self.exposures.retain(|e| e.xfer != xfer);
            self.release_exposure_users(xfer, false);
        }
        self.progress();
    }

    // ------------------------------------------------------------------
    // Incoming messages
    // ------------------------------------------------------------------

    fn on_message(&mut self, slot: u16, m: Message) {
        self.stats.msgs_received += 1;
        if m.seq != self.recv_seq {
            return self.fail(Error::Protocol("message out of sequence"));
        }
        self.recv_seq = self.recv_seq.wrapping_add(1);
        if self.phase == Phase::AwaitHello {
            return match m.body {
                Body::Hello {
                    recv_slots,
                    slot_size,
                    caps,
                    ring_size,
                    ring,
                } => self.on_hello(
                    slot, m.credits, recv_slots, slot_size, caps, ring_size, ring,
                ),
                _ => self.fail(Error::Protocol("expected HELLO")),
            };
        }
        let counted = !matches!(m.body, Body::Need | Body::CreditAck);
        if counted {
            if let Err(e) = self.credits.on_counted() {
                return self.fail(e);
            }
        }
        if let Err(e) = self.credits.on_returned(m.credits) {
            return self.fail(e);
        }
        let in_flight = self.ring_tx.in_flight();
        if let Err(e) = self.ring_tx.on_ack(m.ack) {
            return self.fail(e);
        }
        let ring_returned = self.ring_tx.in_flight() < in_flight;
        let hold = |c: &mut Connection, kind: ItemKind| {
            if c.fin_received {
                return c.fail(Error::Protocol("payload after FIN"));
            }
            c.recv_slots[usize::from(slot)] = RecvSlot::Held;
            c.inbox.push_back(Item {
                slot: Some(slot),
                kind,
            });
        };
        match m.body {
            Body::Hello { .. } => self.fail(Error::Protocol("HELLO after negotiation")),
            Body::Data { offset, len } => {
                if self.fin_received {
                    return self.fail(Error::Protocol("payload after FIN"));
                }
                if let Err(e) = self.ring_rx.on_data(offset, len) {
                    return self.fail(e);
                }
                self.inbox.push_back(Item {
                    slot: None,
                    kind: ItemKind::Data {
                        at: offset,
                        end: offset + len,
                    },
                });
                self.repost(slot, true);
            }
            // The receive check bounds the payload: `HEADER_LEN + len`
            // bytes arrived in a buffer of `slot_size`.
            Body::Inline { len } => hold(self, Self::inline_item(len)),
            Body::ReadOffer { len, desc } => {
                if !self.cfg.can_rdma_read {
                    return self.fail(Error::Protocol("READ_OFFER to a side that does not read"));
                }
                hold(self, ItemKind::Offer { len, desc, read: 0 });
            }
            Body::WriteRequest { len } => hold(self, ItemKind::WriteReq { len, written: 0 }),
            Body::Fin => {
                hold(self, ItemKind::Fin);
                self.fin_received = true;
            }
            Body::Credit => {
                if m.credits == 0 && !ring_returned {
                    return self.fail(Error::Protocol(
                        "CREDIT returning neither credit nor ring space",
                    ));
                }
                self.repost(slot, true);
            }
            Body::ReadDone { len } => {
                self.repost(slot, true);
                self.on_read_done(len);
            }
            Body::WriteTarget { len, desc } => {
                self.repost(slot, true);
                self.on_write_target(len, desc);
            }
            Body::WriteDone { len } => {
                self.repost(slot, true);
                self.on_write_done(len);
            }
            Body::Need => {
                if self.need_from_peer {
                    return self.fail(Error::Protocol("NEED while one is unanswered"));
                }
                self.need_from_peer = true;
                self.repost(slot, false);
            }
            Body::CreditAck => {
                if !self.need_outstanding {
                    return self.fail(Error::Protocol("CREDIT_ACK without a NEED"));
                }
                self.need_outstanding = false;
                self.repost(slot, false);
            }
        }
    }

    /// A message that completed after a transport error: DATA and FIN in
    /// sequence still join the incoming stream (they arrived before the
    /// teardown); anything else is dropped.
    fn on_late_message(&mut self, slot: u16, head: &[u8], n: usize) {
        let Ok(m) = Message::decode(head, n) else {
            return;
        };
        if self.phase != Phase::Open
            || m.seq != self.recv_seq
            || n > self.cfg.slot_size as usize
            || self.fin_received
        {
            return;
        }
        let (slot, kind) = match m.body {
            Body::Data { offset, len } => {
                if self.ring_rx.on_data(offset, len).is_err() {
                    return;
                }
                let end = offset + len;
                (None, ItemKind::Data { at: offset, end })
            }
            Body::Inline { len } => {
                self.recv_slots[usize::from(slot)] = RecvSlot::Held;
                (Some(slot), Self::inline_item(len))
            }
            Body::Fin => {
                self.fin_received = true;
                self.recv_slots[usize::from(slot)] = RecvSlot::Held;
                (Some(slot), ItemKind::Fin)
            }
            _ => return,
        };
        self.recv_seq = self.recv_seq.wrapping_add(1);
        self.stats.msgs_received += 1;
        self.inbox.push_back(Item { slot, kind });
    }

    /// The unread payload of an INLINE of `len` bytes, in its receive
    /// buffer after the header.
    fn inline_item(len: u32) -> ItemKind {
        let at = HEADER_LEN as u32;
        ItemKind::Inline { at, end: at + len }
    }

    /// After a transport error, receives posted before it are still to
    /// come back (with data or flushed): the incoming stream may not have
    /// ended yet.
    fn draining(&self) -> bool {
        matches!(self.error, Some(Error::Transport(_)))
            && self.recv_slots.contains(&RecvSlot::Posted)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_hello(
        &mut self,
        slot: u16,
        credits: u16,
        recv_slots: u32,
        slot_size: u32,
        caps: u32,
        ring_size: u32,
        ring: Desc,
    ) {
        if (slot_size as usize) < MAX_HEAD {
            return self.fail(Error::Protocol("the peer's receive buffers are too small"));
        }
        if recv_slots <= RESERVE {
            return self.fail(Error::Protocol("the peer announced too few receives"));
        }
        if ring_size < MIN_RING {
            return self.fail(Error::Protocol("the peer's receive ring is too small"));
        }
        self.peer_reads = caps & CAP_RDMA_READ != 0;
        self.inline_max = self.cfg.slot_size.min(slot_size) - HEADER_LEN as u32;
        let size = self.cfg.ring_size.min(ring_size);
        self.ring_tx.open(size);
        self.ring_rx.open(size);
        self.peer_ring = ring;
        self.credits.peer_hello(u64::from(recv_slots));
        // The acceptor's HELLO took one of our announced receives; the
        // connector's took a slack one.
        let counted = self.role == Role::Connector;
        if counted {
            if let Err(e) = self.credits.on_counted() {
                return self.fail(e);
            }
        }
        if let Err(e) = self.credits.on_returned(credits) {
            return self.fail(e);
        }
        self.repost(slot, counted);
        if self.role == Role::Acceptor {
            self.emit(self.hello(), None);
        }
        self.phase = Phase::Open;
        self.actions.push_back(Action::Connected);
    }

    /// READ_DONE: the oldest offer was read entirely.
    fn on_read_done(&mut self, len: u32) {
        let (op, xfer, desc) = match self.transfers.front() {
            Some(Transfer {
                op,
                len: l,
                kind: TransferKind::Offer { xfer, desc },
                ..
            }) if *l == len => (*op, *xfer, *desc),
            _ => return self.fail(Error::Protocol("unexpected READ_DONE")),
        };
        self.transfers.pop_front();
        self.exposures.retain(|e| e.xfer != xfer);
        self.actions.push_back(Action::Unexpose { xfer, desc });
        self.settle(op, u64::from(len));
    }

    /// WRITE_TARGET for the oldest write request.
    fn on_write_target(&mut self, len: u32, desc: Desc) {
        match self.transfers.front_mut() {
            Some(Transfer {
                len: total,
                kind:
                    TransferKind::Request {
                        written,
                        target: target @ None,
                    },
                ..
            }) if len <= *total - *written => {
                *target = Some(Target {
                    len,
                    desc,
                    posted: 0,
                    done: 0,
                });
            }
            _ => self.fail(Error::Protocol("unexpected WRITE_TARGET")),
        }
    }

    /// WRITE_DONE: the first receive's write target is filled.
    fn on_write_done(&mut self, len: u32) {
        let xfer = match self.recvs.front() {
            Some(RecvOp {
                busy:
                    Busy::Target {
                        xfer,
                        len: l,
                        sent: true,
                    },
                ..
            }) if *l == len => *xfer,
            _ => return self.fail(Error::Protocol("unexpected WRITE_DONE")),
        };
        let Some(item) = self.inbox.front_mut() else {
            return self.fail(Error::Protocol("unexpected WRITE_DONE"));
        };
        let ItemKind::WriteReq {
            len: total,
            written,
        } = &mut item.kind
        else {
            return self.fail(Error::Protocol("unexpected WRITE_DONE"));
        };
        *written += len;
        let finished = *written == *total;
        let slot = item.slot;
        if let Some(k) = self.exposures.iter().position(|e| e.xfer == xfer) {
            if let ExpState::Live(desc) = self.exposures.remove(k).state {
                self.actions.push_back(Action::Unexpose { xfer, desc });
            }
        }
        if let Some(r) = self.recvs.pop_front() {
            self.complete_recv(r.op, Ok(u64::from(len)));
        }
        if finished {
            self.inbox.pop_front();
            if let Some(slot) = slot {
                self.repost(slot, true);
            }
        }
    }

    // ------------------------------------------------------------------
    // RDMA and exposures
    // ------------------------------------------------------------------

    /// An RDMA read into receive `op` completed.
    fn read_done(&mut self, op: OpId, len: u32) {
        if self.recvs.front().map(|r| r.op) != Some(op) {
            return self.fail(Error::Protocol("RDMA read for a receive not in progress"));
        }
        let Some(Item {
            slot,
            kind: ItemKind::Offer {
                len: total, read, ..
            },
        }) = self.inbox.front_mut()
        else {
            return self.fail(Error::Protocol("RDMA read without an offer"));
        };
        *read += len;
        let (slot, total, finished) = (*slot, *total, *read == *total);
        self.recvs.pop_front();
        self.complete_recv(op, Ok(u64::from(len)));
        if finished {
            self.inbox.pop_front();
            if self.error.is_none() {
                self.control.push_back(Body::ReadDone { len: total });
            }
            if let Some(slot) = slot {
                self.repost(slot, true);
            }
        }
    }

    /// An RDMA write of `len` bytes into the current write target
    /// completed.
    fn write_part_done(&mut self, len: u32) {
        if self.error.is_some() {
            return;
        }
        let Some(t) = self.transfers.front_mut() else {
            return self.fail(Error::Protocol("RDMA write without a transfer"));
        };
        let TransferKind::Request {
            written,
            target: Some(tg),
        } = &mut t.kind
        else {
            return self.fail(Error::Protocol("RDMA write without a target"));
        };
        tg.done += len;
        if tg.done < tg.len {
            return;
        }
        let n = tg.len;
        *written += n;
        let finished = *written == t.len;
        let (op, total) = (t.op, t.len);
        if let TransferKind::Request { target, .. } = &mut t.kind {
            *target = None;
        }
        self.control.push_back(Body::WriteDone { len: n });
        if finished {
            self.transfers.pop_front();
            self.settle(op, u64::from(total));
        }
    }

    /// Posts RDMA writes for the current write target while op slots are
    /// free.
    fn start_writes(&mut self) {
        let max = self.cfg.max_rdma_op;
        while let Some(t) = self.transfers.front_mut() {
            let TransferKind::Request {
                written,
                target: Some(tg),
            } = &mut t.kind
            else {
                return;
            };
            if tg.posted == tg.len {
                return;
            }
            let Some(rdma) = self.free_rdma.pop() else {
                return;
            };
            let len = (tg.len - tg.posted).min(max);
            let op_offset = t.op_offset + u64::from(*written) + u64::from(tg.posted);
            self.actions.push_back(Action::RdmaWrite {
                rdma,
                op: t.op,
                op_offset,
                len,
                desc: tg.desc,
                remote_offset: tg.posted,
            });
            tg.posted += len;
            self.rdma_use[usize::from(rdma)] = Some(RdmaUse::Write { op: t.op, len });
            self.stats.rdma_writes += 1;
            self.stats.bytes_rdma += u64::from(len);
        }
    }

    /// Exposure `e` is registered.
    fn on_exposed(&mut self, e: Exposure, desc: Desc) {
        for s in self.sends.iter_mut() {
            if let Some(Prep::Exposing { xfer, len }) = s.prep {
                if xfer == e.xfer {
                    s.prep = Some(Prep::Ready { xfer, len, desc });
                    return;
                }
            }
        }
        if let Some(r) = self.recvs.front_mut() {
            if let Busy::Target {
                xfer,
                len,
                sent: false,
            } = r.busy
            {
                if xfer == e.xfer {
                    r.busy = Busy::Target {
                        xfer,
                        len,
                        sent: true,
                    };
                    self.control.push_back(Body::WriteTarget { len, desc });
                }
            }
        }
    }

    /// Exposure `xfer` ended before use (failed, or the connection did):
    /// its send falls back to copying (`retry`) or forgets it; its receive
    /// fails with `NoBuffers` (`retry`) or waits no more.
    fn release_exposure_users(&mut self, xfer: u64, retry: bool) {
        for s in self.sends.iter_mut() {
            match s.prep {
                Some(Prep::Exposing { xfer: x, .. }) | Some(Prep::Ready { xfer: x, .. })
                    if x == xfer =>
                {
                    s.prep = None;
                    if retry {
                        s.by_copy = true;
                    }
                }
                _ => {}
            }
        }
        let front = self.recvs.front().map(|r| (r.op, r.busy));
        if let Some((op, Busy::Target { xfer: x, .. })) = front {
            if x == xfer {
                if retry {
                    self.recvs.pop_front();
                    self.complete_recv(op, Err(Error::NoBuffers));
                } else if let Some(r) = self.recvs.front_mut() {
                    r.busy = Busy::No;
                }
            }
        }
    }

    /// Whether an RDMA op, or a ring write straight from its buffer, uses
    /// `op`'s buffer.
    fn in_use_by_rdma(&self, op: OpId) -> bool {
        self.rdma_use.iter().flatten().any(|u| match *u {
            RdmaUse::Read { op: o, .. } | RdmaUse::Write { op: o, .. } => o == op,
        }) || self
            .ring_busy
            .iter()
            .any(|u| matches!(*u, Some(DirectWrite { op: o, .. }) if o == op))
    }

    /// Whether the fabric may still touch `op`'s buffer.
    fn in_use(&self, op: OpId) -> bool {
        self.in_use_by_rdma(op) || self.exposures.iter().any(|e| e.op == op)
    }

    // ------------------------------------------------------------------
    // Progress
    // ------------------------------------------------------------------

    fn progress(&mut self) {
        let seq = self.send_seq;
        self.serve_recvs();
        if self.error.is_some() {
            self.reap();
            self.ask_abort();
            return;
        }
        self.start_writes();
        self.flush_out();
        if self.send_seq != seq {
            // After this pass's messages: a reply goes out first.
            self.post_unposted();
        }
    }

    /// Sends a CREDIT carrying the ring ack if half the ring was read and
    /// not announced, and a send buffer and a credit are at hand (else
    /// `flush_out` sends it, or asks for credits, later).
    fn ack_ring_early(&mut self) {
        if self.ring_rx.ack_due()
            && self.error.is_none()
            && self.phase == Phase::Open
            && !self.free_send.is_empty()
        {
            self.post_unposted();
            if self.credits.may_send(Class::Control) {
                self.stats.credit_msgs += 1;
                self.emit(Body::Credit, None);
            }
        }
    }

    /// Serves the pending receives from the incoming stream.
    fn serve_recvs(&mut self) {
        while let Some(r) = self.recvs.front() {
            if r.busy != Busy::No {
                return;
            }
            let (op, cap, nonblocking) = (r.op, r.cap, r.nonblocking);
            // Copied bytes, across DATA and INLINE items, up to a transfer
            // boundary.
            let mut n: u64 = 0;
            while n < cap {
                let step = self.ring_rx.copy_step();
                let (from, slot, k, done) = match self.inbox.front_mut() {
                    Some(Item {
                        slot,
                        kind: ItemKind::Data { at, end } | ItemKind::Inline { at, end },
                    }) => {
                        let mut k = u64::from(*end - *at).min(cap - n) as u32;
                        if slot.is_none() {
                            k = k.min(step);
                        }
                        let from = *at;
                        *at += k;
                        (from, *slot, k, *at == *end)
                    }
                    _ => break,
                };
                self.actions.push_back(match slot {
                    None => Action::CopyOut {
                        ring_offset: from,
                        op,
                        op_offset: n,
                        len: k,
                    },
                    Some(slot) => Action::CopyInline {
                        slot,
                        slot_offset: from,
                        op,
                        op_offset: n,
                        len: k,
                    },
                });
                n += u64::from(k);
                self.stats.bytes_copied_out += u64::from(k);
                if slot.is_none() {
                    self.ring_rx.consumed(k);
                    // Give half a ring back as soon as it is copied (the
                    // CREDIT is posted after this copy, before the next):
                    // the sender refills it while this receive copies on.
                    self.ack_ring_early();
                }
                if done {
                    self.inbox.pop_front();
                    if let Some(slot) = slot {
                        // After its copy-outs: the fabric may fill it again.
                        self.repost(slot, true);
                    }
                }
            }
            if n > 0 {
                self.recvs.pop_front();
                self.complete_recv(op, Ok(n));
                continue;
            }
            let failed = self.error;
            match self.inbox.front() {
                Some(Item {
                    kind: ItemKind::Fin,
                    ..
                }) => {
                    self.recvs.pop_front();
                    self.complete_recv(op, Ok(0));
                }
                Some(&Item {
                    kind: ItemKind::Offer { len, desc, read },
                    ..
                }) if failed.is_none() => {
                    let Some(rdma) = self.free_rdma.pop() else {
                        return;
                    };
                    let k = u64::from(len - read)
                        .min(cap)
                        .min(u64::from(self.cfg.max_rdma_op)) as u32;
                    self.actions.push_back(Action::RdmaRead {
                        rdma,
                        op,
                        op_offset: 0,
                        len: k,
                        desc,
                        remote_offset: read,
                    });
                    self.rdma_use[usize::from(rdma)] = Some(RdmaUse::Read { op, len: k });
                    self.stats.rdma_reads += 1;
                    self.stats.bytes_rdma += u64::from(k);
                    if let Some(r) = self.recvs.front_mut() {
                        r.busy = Busy::Reading { rdma };
                    }
                    return;
                }
                Some(&Item {
                    kind: ItemKind::WriteReq { len, written },
                    ..
                }) if failed.is_none() => {
                    let k = u64::from(len - written)
                        .min(cap)
                        .min(u64::from(self.cfg.max_rdma_op)) as u32;
                    let xfer = self.new_xfer(op);
                    self.actions.push_back(Action::Expose {
                        xfer,
                        op,
                        offset: 0,
                        len: k,
                        access: Access::Write,
                    });
                    if let Some(r) = self.recvs.front_mut() {
                        r.busy = Busy::Target {
                            xfer,
                            len: k,
                            sent: false,
                        };
                    }
                    return;
                }
                _ => {
                    let result = match failed {
                        Some(e) if !self.draining() => Err(e),
                        _ if nonblocking => Err(Error::WouldBlock),
                        _ => return,
                    };
                    self.recvs.pop_front();
                    self.complete_recv(op, result);
                }
            }
        }
    }

    /// Sends what credits and send buffers allow, most urgent first.
    fn flush_out(&mut self) {
        if self.error.is_some() || self.phase != Phase::Open || self.nothing_to_send() {
            return;
        }
        let mut short_of_credit = false;
        if self.need_from_peer && self.credits.pending() > 0 && !self.free_send.is_empty() {
            self.need_from_peer = false;
            self.stats.credit_msgs += 1;
            self.emit(Body::CreditAck, None);
        }
        while let Some(&body) = self.control.front() {
            if self.free_send.is_empty() {
                break;
            }
            if !self.credits.may_send(Class::Control) {
                short_of_credit = true;
                break;
            }
            self.control.pop_front();
            self.emit(body, None);
        }
        if self.control.is_empty() {
            short_of_credit |= self.pump();
        }
        let batch = u64::from(self.cfg.credit_batch);
        if batch > 0 && self.owed() >= batch && !self.free_send.is_empty() {
            self.post_unposted();
            if self.credits.may_send(Class::Credit) {
                self.stats.credit_msgs += 1;
                self.emit(Body::Credit, None);
            }
        }
        if self.ring_rx.ack_due() && !self.free_send.is_empty() {
            self.post_unposted();
            // Half the ring is read: give the space back without waiting
            // for a message to carry it.
            if self.credits.may_send(Class::Control) {
                self.stats.credit_msgs += 1;
                self.emit(Body::Credit, None);
            } else {
                short_of_credit = true;
            }
        }
        if short_of_credit && !self.need_outstanding && !self.free_send.is_empty() {
            self.need_outstanding = true;
            self.stats.need_msgs += 1;
            self.emit(Body::Need, None);
        }
    }

    /// Whether `flush_out` has nothing to send: no NEED to answer, no
    /// control answer, no payload or FIN waiting, no CREDIT due (by batch or
    /// by ring). Checked first because most events (a receive completing
    /// with nothing to answer, an application receive) leave it so.
    fn nothing_to_send(&self) -> bool {
        !self.need_from_peer
            && self.control.is_empty()
            && self.sends.is_empty()
            && self.fin != Fin::Queued
            && (self.cfg.credit_batch == 0 || self.owed() < u64::from(self.cfg.credit_batch))
            && !self.ring_rx.ack_due()
    }

    /// Receives consumed and not announced: re-posted, or held back.
    fn owed(&self) -> u64 {
        self.credits.pending() + self.unposted.len() as u64
    }

    /// Sends payload in application order, then FIN. Returns whether it
    /// stopped for lack of credit.
    fn pump(&mut self) -> bool {
        loop {
            let Some(i) = self.next_to_send() else {
                if self.fin != Fin::Queued || self.free_send.is_empty() {
                    return false;
                }
                if !self.credits.may_send(Class::Payload) {
                    return true;
                }
                let slot = self.emit(Body::Fin, None);
                self.fin = Fin::Sent(slot);
                return false;
            };
            let s = &self.sends[i];
            let (op, at, rest, by_copy, direct, prep) = (
                s.op,
                s.queued,
                s.len - s.queued,
                s.by_copy,
                s.direct,
                s.prep,
            );
            let transfer = rest.min(u64::from(u32::MAX)) as u32;
            let body = if by_copy && rest <= u64::from(self.inline_max) {
                Body::Inline { len: rest as u32 }
            } else if by_copy {
                let Some((offset, len)) = self.ring_tx.next(rest) else {
                    // The peer's ring is full: its ack resumes the send.
                    self.stop_nonblocking(i);
                    return false;
                };
                Body::Data { offset, len }
            } else if !self.uses_read_flow() {
                Body::WriteRequest { len: transfer }
            } else {
                match prep {
                    Some(Prep::Ready { len, desc, .. }) => Body::ReadOffer { len, desc },
                    Some(Prep::Exposing { .. }) => return false,
                    None => {
                        let xfer = self.new_xfer(op);
                        self.sends[i].prep = Some(Prep::Exposing {
                            xfer,
                            len: transfer,
                        });
                        self.actions.push_back(Action::Expose {
                            xfer,
                            op,
                            offset: at,
                            len: transfer,
                            access: Access::Read,
                        });
                        return false;
                    }
                }
            };
            if self.free_send.is_empty() {
                self.stop_nonblocking(i);
                return false;
            }
            if !self.credits.may_send(Class::Payload) {
                self.stop_nonblocking(i);
                return true;
            }
            match body {
                Body::Data { len, .. } | Body::Inline { len } => {
                    let payload = Payload {
                        op,
                        offset: at,
                        len,
                    };
                    let direct = direct && matches!(body, Body::Data { .. });
                    if let Body::Data { .. } = body {
                        self.ring_tx.wrote(len);
                    } else {
                        self.stats.inline_msgs += 1;
                    }
                    self.emit_data(body, payload, direct);
                    self.stats.data_msgs += 1;
                    if direct {
                        self.stats.bytes_direct += u64::from(len);
                    } else {
                        self.stats.bytes_copied_in += u64::from(len);
                    }
                    let s = &mut self.sends[i];
                    s.queued += u64::from(len);
                    if direct {
                        // Settles when its ring write completed.
                        continue;
                    }
                    s.settled += u64::from(len);
                    if s.settled == s.len {
                        let n = s.len;
                        self.remove_send(i);
                        self.complete_send(op, Ok(n));
                    }
                }
                Body::ReadOffer { len, desc } => {
                    let Some(Prep::Ready { xfer, .. }) = self.sends[i].prep.take() else {
                        return false;
                    };
                    self.emit(body, None);
                    self.stats.read_offers += 1;
                    self.sends[i].queued += u64::from(len);
                    self.transfers.push_back(Transfer {
                        op,
                        op_offset: at,
                        len,
                        kind: TransferKind::Offer { xfer, desc },
                    });
                }
                Body::WriteRequest { len } => {
                    self.emit(body, None);
                    self.stats.write_requests += 1;
                    self.sends[i].queued += u64::from(len);
                    self.transfers.push_back(Transfer {
                        op,
                        op_offset: at,
                        len,
                        kind: TransferKind::Request {
                            written: 0,
                            target: None,
                        },
                    });
                }
                _ => return false,
            }
        }
    }

    /// The first send with bytes not put into the stream yet: almost always
    /// the first of the queue (those before it wait only for transfers).
    #[inline]
    fn next_to_send(&self) -> Option<usize> {
        match self.sends.front() {
            None => None,
            Some(s) if s.queued < s.len => Some(0),
            Some(_) => self.sends.iter().position(|s| s.queued < s.len),
        }
    }

    /// A non-blocking send that cannot go on completes with what it sent.
    fn stop_nonblocking(&mut self, i: usize) {
        if !self.sends[i].nonblocking {
            return;
        }
        if let Some(s) = self.remove_send(i) {
            let result = if s.queued > 0 {
                Ok(s.queued)
            } else {
                Err(Error::WouldBlock)
            };
            self.complete_send(s.op, result);
        }
    }

    /// `bytes` more of send `op` were delivered.
    fn settle(&mut self, op: OpId, bytes: u64) {
        let Some(i) = self.sends.iter().position(|s| s.op == op) else {
            return;
        };
        let s = &mut self.sends[i];
        s.settled += bytes;
        if s.settled == s.len {
            let n = s.len;
            self.remove_send(i);
            self.complete_send(op, Ok(n));
        }
    }

    /// Takes send `i` out of the queue: almost always the first, which
    /// `pop_front` takes without `remove`'s general shuffle.
    #[inline]
    fn remove_send(&mut self, i: usize) -> Option<SendOp> {
        if i == 0 {
            self.sends.pop_front()
        } else {
            self.sends.remove(i)
        }
    }

    /// Once failed: completes every send the fabric no longer touches.
    fn reap(&mut self) {
        let Some(e) = self.error else {
            return;
        };
        let mut i = 0;
        while i < self.sends.len() {
            let op = self.sends[i].op;
            if self.in_use(op) {
                i += 1;
            } else {
                self.sends.remove(i);
                self.complete_send(op, Err(e));
            }
        }
    }

    /// Ends the connection with `e` (the first error wins): unexposes every
    /// registered buffer while the socket is open, fails what it can now,
    /// and asks the driver to abort.
    fn fail(&mut self, e: Error) {
        if self.error.is_some() {
            return;
        }
        self.error = Some(e);
        self.control.clear();
        self.transfers.clear();
        for slot in std::mem::take(&mut self.unposted) {
            self.recv_slots[usize::from(slot)] = RecvSlot::Idle;
        }
        let live: Vec<(u64, Desc)> = self
            .exposures
            .iter()
            .filter_map(|x| match x.state {
                ExpState::Live(desc) => Some((x.xfer, desc)),
                ExpState::Pending => None,
            })
            .collect();
        for (xfer, desc) in live {
            self.exposures.retain(|x| x.xfer != xfer);
            if !self.socket_closed {
                self.actions.push_back(Action::Unexpose { xfer, desc });
            }
            self.release_exposure_users(xfer, false);
        }
        self.serve_recvs();
        self.reap();
        self.ask_abort();
    }

    /// Queues `Action::Abort` once the connection failed, the socket is
    /// open and, after a transport error, every posted receive came back:
    /// closing the socket earlier could turn a completion with data not yet
    /// reported into a flush.
    fn ask_abort(&mut self) {
        let Some(error) = self.error else {
            return;
        };
        if !self.socket_closed && !self.abort_sent && !self.draining() {
            self.abort_sent = true;
            self.actions.push_back(Action::Abort { error });
        }
    }

    // ------------------------------------------------------------------
    // Helpers
    // ------------------------------------------------------------------

    /// Receives announced in HELLO.
    fn announce(&self) -> u32 {
        u32::from(self.cfg.recv_slots) - SLACK
    }

    fn hello(&self) -> Body {
        Body::Hello {
            recv_slots: self.announce(),
            slot_size: self.cfg.slot_size,
            caps: if self.cfg.can_rdma_read {
                CAP_RDMA_READ
            } else {
                0
            },
            ring_size: self.cfg.ring_size,
            ring: self.ring,
        }
    }

    fn new_xfer(&mut self, op: OpId) -> u64 {
        let xfer = self.next_xfer;
        self.next_xfer += 1;
        self.exposures.push(Exposure {
            xfer,
            op,
            state: ExpState::Pending,
        });
        xfer
    }

    /// Receive `slot`'s message was consumed: re-posts it, or (a counted
    /// message's, while the peer can do without it and has no NEED
    /// unanswered) holds it back in `unposted`. A re-post costs the driver
    /// a provider call, and the message consumed is often one a reply
    /// answers: held back, the re-post follows that reply (`progress`)
    /// instead of delaying it. A counted message's receive is owed to the
    /// peer once re-posted, never before. Not once the connection failed.
    #[inline(always)]
    fn repost(&mut self, slot: u16, counted: bool) {
        let i = usize::from(slot);
        if self.error.is_some() {
            self.recv_slots[i] = RecvSlot::Idle;
            return;
        }
        if counted && !self.need_from_peer && self.credits.may_hold_back() {
            self.recv_slots[i] = RecvSlot::Consumed;
            self.unposted.push(slot);
            return;
        }
        // The peer runs low, asked for credits, or sent NEED or CREDIT_ACK
        // into this slack receive: everything now.
        self.post_unposted();
        self.post_recv(slot, counted);
    }

    /// Posts receive `slot`; a counted message's is owed to the peer.
    #[inline(always)]
    fn post_recv(&mut self, slot: u16, counted: bool) {
        self.recv_slots[usize::from(slot)] = RecvSlot::Posted;
        self.actions.push_back(Action::PostRecv { slot });
        if counted {
            self.credits.reposted();
        }
    }

    /// Posts the receives held back (`unposted`); the next header returns
    /// them.
    #[inline]
    fn post_unposted(&mut self) {
        while let Some(slot) = self.unposted.pop() {
            self.post_recv(slot, true);
        }
    }

    /// Queues one message in a free send buffer (the caller checked there
    /// is one, and the credits): see [`Connection::emit_data`].
    fn emit(&mut self, body: Body, payload: Option<Payload>) -> u16 {
        self.emit_payload(body, payload, false)
    }

    /// Queues a DATA or INLINE carrying `payload` (the caller checked the
    /// send buffer, the credits and, for DATA, the ring space); `direct`:
    /// the DATA's ring write reads the application's buffer itself.
    fn emit_data(&mut self, body: Body, payload: Payload, direct: bool) -> u16 {
        self.emit_payload(body, Some(payload), direct)
    }

    /// Queues one message in a free send buffer: after the ring write of a
    /// DATA's `payload`, or with an INLINE's `payload` behind its header;
    /// returns the buffer.
    fn emit_payload(&mut self, body: Body, payload: Option<Payload>, direct: bool) -> u16 {
        let slot = self
            .free_send
            .pop()
            .expect("caller checked for a free send buffer");
        let counted = match body {
            Body::Need | Body::CreditAck => false,
            Body::Hello { .. } => self.role == Role::Acceptor,
            _ => true,
        };
        let credits = self.credits.take_returns();
        if counted {
            self.credits.spend();
        }
        if let (Some(payload), Body::Data { offset, .. }) = (payload, body) {
            if direct {
                self.ring_busy[usize::from(slot)] = Some(DirectWrite {
                    op: payload.op,
                    len: payload.len,
                });
            }
            self.actions.push_back(Action::RingWrite {
                slot,
                payload,
                ring_offset: offset,
                desc: self.peer_ring,
                direct,
            });
        }
        // The HELLO is sent before the ring is open: its ack is 0.
        let ack = if self.phase == Phase::Open {
            self.ring_rx.take_ack()
        } else {
            0
        };
        let m = Message {
            credits,
            seq: self.send_seq,
            ack,
            body,
        };
        self.send_seq = self.send_seq.wrapping_add(1);
        self.send_busy[usize::from(slot)] = true;
        // Reported: while negotiating or shutting down (FIN and what follows
        // are waited for), and once fewer than half the send buffers are
        // free; else the completion comes with a later report.
        let report = self.phase != Phase::Open
            || self.fin != Fin::No
            || 2 * self.free_send.len() < self.send_busy.len();
        self.sends_posted.push_back((slot, report));
        self.stats.msgs_sent += 1;
        self.heads[usize::from(slot)].set(&m);
        self.actions.push_back(match (payload, body) {
            (Some(payload), Body::Inline { .. }) => Action::SendInline {
                slot,
                payload,
                report,
            },
            _ => Action::Send { slot, report },
        });
        slot
    }

    fn complete_send(&mut self, op: OpId, result: Result<u64, Error>) {
        self.actions.push_back(Action::SendComplete { op, result });
    }

    fn complete_recv(&mut self, op: OpId, result: Result<u64, Error>) {
        self.actions.push_back(Action::RecvComplete { op, result });
    }
}
