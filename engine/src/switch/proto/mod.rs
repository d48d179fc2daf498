//! The reference switch's session protocol as a deterministic state machine
//! (spec §4.1 step 5, §4.2 step 5, §4.3, §4.5, §6.2): no threads, no clocks,
//! no I/O. A driver (the switch's connections, or a test's simulated fabric) feeds
//! a [`Connection`] events — a receive, send or RDMA op completed, an
//! exposure was registered, the application sends, receives, shuts down,
//! cancels or aborts — and executes the [`Action`]s it yields, in order.
//!
//! # The protocol
//!
//! * **Buffers.** Each side posts `recv_slots` receive buffers and owns
//!   `send_slots` send buffers of `slot_size` bytes ([`Config`]) for
//!   messages (at most [`MAX_HEAD`] bytes, or an INLINE's header and
//!   payload), and a receive ring of `ring_size` bytes that the peer
//!   RDMA-writes longer copied sends into (with a local ring of the same
//!   size they are written from). Every message is one send into one
//!   posted receive. A receive is re-posted once what it holds was
//!   consumed: control messages and DATA at once (DATA's bytes stay in the
//!   ring), INLINE once its payload was copied out, an offer or write
//!   request when it was transferred, FIN never; while the peer holds more
//!   than half its credits, a counted message's re-post waits until after
//!   this side's next message (so a reply is not delayed by it), a CREDIT,
//!   the peer's NEED, or a blocking receive that finds nothing to read.
//! * **The ring** (`ring.rs`): a DATA says where in the receiver's ring the
//!   sender wrote its bytes (the next free byte, never across the ring's
//!   end); every header's `ack` returns the ring bytes the sender consumed
//!   so far; a side sends a CREDIT of its own once half the ring is read
//!   and unannounced, also in the middle of a receive (which copies the
//!   ring out a quarter of it at a time), so the sender refills that half
//!   while the reader copies the rest. So 64 KiB is one DATA, and a sender
//!   waits only when the peer's ring is full of unread bytes.
//! * **Negotiation.** The connector posts its receives and sends HELLO at
//!   once (the provider holds it until the acceptor posts). The acceptor
//!   posts its receives, waits for that HELLO and answers with its own.
//!   HELLO carries the receives announced (`recv_slots - SLACK`, the
//!   peer's initial credits), the buffer size, whether the side accepts
//!   RDMA-read offers, and the receive ring (size and RDMA descriptor; the
//!   session uses the smaller size). The connector's HELLO is outside the
//!   credit count; the acceptor's takes one credit. A HELLO of another
//!   protocol [`VERSION`] ends the session with [`Error::VersionMismatch`].
//! * **Credits** (the rules are spelled out in `credit.rs`): a counted
//!   message needs a credit; payload keeps a reserve of [`RESERVE`] for
//!   control answers; the last credit goes only to a message that returns
//!   credits; every header returns the receives re-posted since the last
//!   one (never one not posted yet); a side short of credits sends NEED and the peer answers with
//!   CREDIT_ACK as soon as it has receives to return (both outside the
//!   count, in [`SLACK`] receives). With `credit_batch > 0` a CREDIT also
//!   goes unasked once that many are owed.
//! * **Small sends** (at most `rdma_threshold` bytes, and every
//!   non-blocking send) are copied. What is left of one, if it fits the
//!   smaller `slot_size` of both sides with the header, goes as one INLINE
//!   (the payload right after the header: one send, no ring write); a
//!   longer one through the ring: the driver copies the bytes into its
//!   local ring and RDMA-writes them to the peer's, then sends the DATA.
//!   The send completes when its last DATA or INLINE is handed to the
//!   driver.
//! * **Large sends**, read flow: the sender exposes its buffer and sends
//!   READ_OFFER; the receiver RDMA-reads into its application buffers (one
//!   read per receive, at most `max_rdma_op`), then answers READ_DONE; the
//!   sender unexposes and completes. Write flow (configured, or when the
//!   peer does not read): WRITE_REQUEST; per receive the receiver exposes
//!   its buffer in a WRITE_TARGET; the sender RDMA-writes and answers
//!   WRITE_DONE, which completes that receive. A receive never mixes copied
//!   bytes with an RDMA transfer.
//! * **Order.** Payload messages go in the order of the application's
//!   sends; FIN goes after all of them. The receiver hands bytes out in
//!   that order; after FIN, every receive returns 0.
//! * **Errors.** A malformed message, a broken rule (sequence, credits,
//!   an unexpected message) or a transport error ends the connection: the
//!   machine unexposes its buffers, yields [`Action::Abort`], fails every op
//!   whose buffer the fabric no longer uses (the rest when their RDMA
//!   comes back), and keeps delivering data that arrived before — after a
//!   transport error including messages whose receives complete later,
//!   and FIN, so that a peer's graceful close followed by its reset reads
//!   as end of stream.
//!
//! Wire format: [`Message`] (`wire.rs` documents the layout).

#![deny(missing_docs)]

mod action;
mod config;
mod credit;
mod error;
mod machine;
mod ring;
mod wire;

pub use action::{Access, Action, Payload};
pub use config::{Config, RdmaFlow};
pub use credit::{RESERVE, SLACK};
pub use error::Error;
pub use machine::{CancelOutcome, Connection, Stats};
pub use ring::MIN_RING;
pub use wire::{
    Body, DecodeError, Desc, Head, Message, CAP_RDMA_READ, DESC_LEN, HEADER_LEN, MAGIC, MAX_HEAD,
    VERSION,
};

/// Names one application op (a send or a receive) to the machine; the
/// driver picks unique values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub u64);

/// Which end of the connection a machine is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Connected out: sends HELLO first.
    Connector,
    /// Accepted: answers the connector's HELLO.
    Acceptor,
}
