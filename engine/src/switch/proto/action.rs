//! What the machine asks its driver to do.

use super::error::Error;
use super::wire::Desc;
use super::OpId;

/// Access an exposure grants the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The peer RDMA-reads it (a send buffer, read flow).
    Read,
    /// The peer RDMA-writes it (a receive buffer, write flow).
    Write,
}

/// Bytes of an application send buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The send op whose buffer holds them.
    pub op: OpId,
    /// Offset in that buffer.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
}

/// One instruction to the driver, from [`Connection::poll_action`]. The
/// driver executes actions in the order given (the machine relies on it:
/// a ring write is posted before the DATA that announces it, a send's
/// payload is copied into the ring or its send buffer before its op
/// completes, an INLINE's bytes are copied out before its receive buffer
/// is re-posted) and reports the outcome of each posted
/// operation through the matching `*_done` method (or [`exposed`] at once
/// for an exposure).
///
/// [`Connection::poll_action`]: super::Connection::poll_action
/// [`exposed`]: super::Connection::exposed
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Post receive buffer `slot` (all of it); report with `recv_done`.
    PostRecv {
        /// Receive buffer index, `< recv_slots`.
        slot: u16,
    },
    /// Copy the message [`Connection::head`] gives for `slot` into send
    /// buffer `slot` and post one send of it; if `report`, report its
    /// completion with `send_done` (which also completes the unreported
    /// sends posted before it: a queue pair's sends complete in posting
    /// order). An unreported send's completion is not reported (an upcall
    /// saved per message); a failed post is reported either way.
    ///
    /// [`Connection::head`]: super::Connection::head
    Send {
        /// Send buffer index, `< send_slots`.
        slot: u16,
        /// Report the completion.
        report: bool,
    },
    /// Copy the header [`Connection::head`] gives for `slot` and then
    /// `payload` (an INLINE's bytes) into send buffer `slot` and post one
    /// send of both; report as [`Action::Send`] says.
    ///
    /// [`Connection::head`]: super::Connection::head
    SendInline {
        /// Send buffer index, `< send_slots`.
        slot: u16,
        /// Bytes of an application send buffer.
        payload: Payload,
        /// Report the completion.
        report: bool,
    },
    /// Post an RDMA write of `payload` to `ring_offset` of the peer's
    /// receive ring `desc`: from the application's buffer itself if
    /// `direct` and the driver can (a registration of it), else copied into
    /// the local send ring at the same offset and written from there. The
    /// `Send` of the DATA that announces the bytes follows on the same send
    /// buffer `slot` (the fabric delivers it after the write). A `direct`
    /// write is reported with `ring_write_done(slot, ..)`, and its send op
    /// completes only after that. A staged one is not reported (its send op
    /// may complete at once: its bytes are in the send ring): a queue
    /// pair's sends complete in the order they were posted, so the DATA's
    /// send completion, which frees `slot`, comes after the write's. A
    /// staged write that cannot be posted aborts the connection
    /// ([`abort`]).
    ///
    /// [`abort`]: super::Connection::abort
    RingWrite {
        /// The send buffer whose DATA announces the bytes (names the
        /// write's completion).
        slot: u16,
        /// Bytes of an application send buffer.
        payload: Payload,
        /// Offset in both rings.
        ring_offset: u32,
        /// The peer's receive ring.
        desc: Desc,
        /// The send op's buffer stays lent until the report: the write may
        /// read it there.
        direct: bool,
    },
    /// Copy `len` bytes at `ring_offset` of the receive ring into the
    /// buffer of receive op `op` at `op_offset`.
    CopyOut {
        /// Offset in the receive ring.
        ring_offset: u32,
        /// The receive op.
        op: OpId,
        /// Offset in its buffer.
        op_offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Copy `len` bytes at `slot_offset` of receive buffer `slot` (an
    /// INLINE's payload) into the buffer of receive op `op` at `op_offset`.
    CopyInline {
        /// Receive buffer index (its receive completed, not re-posted yet).
        slot: u16,
        /// Offset in that buffer.
        slot_offset: u32,
        /// The receive op.
        op: OpId,
        /// Offset in its buffer.
        op_offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Register `len` bytes of `op`'s buffer at `offset` for the peer's
    /// RDMA with `access`, then report the descriptor with `exposed(xfer,
    /// ..)`.
    Expose {
        /// Names the exposure in `exposed` and `Unexpose`.
        xfer: u64,
        /// Whose buffer.
        op: OpId,
        /// Offset in the buffer.
        offset: u64,
        /// Bytes.
        len: u32,
        /// What the peer may do.
        access: Access,
    },
    /// End exposure `xfer` (deregister `desc`): the peer can no longer
    /// reach the buffer once this returns.
    Unexpose {
        /// The exposure.
        xfer: u64,
        /// Its descriptor.
        desc: Desc,
    },
    /// RDMA-read `len` bytes at `remote_offset` of the peer's `desc` into
    /// `op`'s buffer at `op_offset`; report with `rdma_done(rdma, ..)`.
    RdmaRead {
        /// RDMA op index, `< rdma_slots`.
        rdma: u16,
        /// The receive op whose buffer is the target.
        op: OpId,
        /// Offset in its buffer.
        op_offset: u64,
        /// Bytes.
        len: u32,
        /// The peer's exposure.
        desc: Desc,
        /// Offset in it.
        remote_offset: u32,
    },
    /// RDMA-write `len` bytes of `op`'s buffer at `op_offset` to
    /// `remote_offset` of the peer's `desc`; report with `rdma_done`.
    RdmaWrite {
        /// RDMA op index, `< rdma_slots`.
        rdma: u16,
        /// The send op whose buffer is the source.
        op: OpId,
        /// Offset in its buffer.
        op_offset: u64,
        /// Bytes.
        len: u32,
        /// The peer's exposure.
        desc: Desc,
        /// Offset in it.
        remote_offset: u32,
    },
    /// Send op `op` ended: bytes sent, or why not. The machine no longer
    /// refers to its buffer, and neither does the fabric.
    SendComplete {
        /// The op.
        op: OpId,
        /// Bytes sent, or the error.
        result: Result<u64, Error>,
    },
    /// Receive op `op` ended: bytes received (0: end of stream), or why
    /// not. The machine no longer refers to its buffer, and neither does
    /// the fabric.
    RecvComplete {
        /// The op.
        op: OpId,
        /// Bytes received, or the error.
        result: Result<u64, Error>,
    },
    /// Negotiation completed: the session is open.
    Connected,
    /// The connection failed: close the socket (abortively), then call
    /// `closed`. Comes after the `Unexpose`s of every exposure; after a
    /// transport error, only once every posted receive came back (one may
    /// still hold data that arrived before the teardown).
    Abort {
        /// Why.
        error: Error,
    },
}
