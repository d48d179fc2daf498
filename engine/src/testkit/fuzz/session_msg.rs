//! Fuzz target `session_msg`: the reference switch's session messages are
//! untrusted bytes a peer sends (issue 3: "malformed session messages end
//! the connection with a clear error").
//!
//! The input is a sequence of records, each a little-endian `u16` byte count
//! `n` followed by up to `MAX_HEAD` bytes of the message's head: a receive
//! that completed with `n` bytes, of which the switch sees the head. Each
//! record is
//!
//! 1. decoded on its own: decoding never panics, and a message that decodes
//!    encodes back to the same header and body bytes and decodes again to
//!    itself;
//! 2. delivered, in order, to a protocol machine (acceptor, then connector
//!    on the same input) as the completion of its oldest posted receive,
//!    with a minimal driver completing every send, ring write, exposure and
//!    RDMA it asks for. The machine never panics, never asks for a send,
//!    receive or RDMA slot it does not have, never copies outside its ring,
//!    outside a receive buffer or from one that is posted, never writes
//!    outside the peer's ring or sends more than a buffer holds, never
//!    completes an op it was not given, never loops, and once it reports an
//!    error it has asked for the abort.
//!
//! A record's head is a session message (protocol version 2: 20-byte
//! header with the ring ack; HELLO announces the ring; DATA names a ring
//! offset and carries no payload; INLINE's payload follows the header, and
//! only its length matters here).

use crate::switch::proto::{
    Action, Config, Connection, Message, OpId, Role, DESC_LEN, HEADER_LEN, MAX_HEAD, MIN_RING,
};
use std::collections::VecDeque;

/// The code a flushed receive completes with after a close.
const WSA_OPERATION_ABORTED: u32 = 995;

/// Runs one input (see the module docs).
pub fn session_msg(data: &[u8]) {
    let records = split(data);
    for (n, head) in &records {
        round_trip(head, *n);
    }
    for role in [Role::Acceptor, Role::Connector] {
        drive(role, &records);
    }
}

/// The input's records: (received byte count, head bytes).
fn split(mut data: &[u8]) -> Vec<(usize, &[u8])> {
    let mut out = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<2>() {
        let n = usize::from(u16::from_le_bytes(*len));
        let take = rest.len().min(MAX_HEAD).min(n.max(1));
        out.push((n, &rest[..take]));
        data = &rest[take..];
    }
    out
}

fn round_trip(head: &[u8], n: usize) {
    let Ok(m) = Message::decode(head, n) else {
        return;
    };
    let mut out = [0u8; MAX_HEAD];
    let len = m.encode(&mut out);
    assert!(
        len <= head.len().min(n),
        "decoded more bytes than it was given"
    );
    assert_eq!(&out[..len], &head[..len], "encode(decode(x)) != x");
    assert_eq!(
        Message::decode(&out[..len], n),
        Ok(m),
        "decode(encode(m)) != m"
    );
}

/// Small buffers and both RDMA flows reachable.
fn config() -> Config {
    Config {
        recv_slots: 6,
        send_slots: 4,
        slot_size: 256,
        ring_size: MIN_RING,
        rdma_threshold: 512,
        max_rdma_op: 4096,
        rdma_slots: 2,
        ..Config::default()
    }
}

/// Feeds `records` to a machine of `role` as its receives' completions;
/// returns the machine.
fn drive(role: Role, records: &[(usize, &[u8])]) -> Connection {
    let cfg = config();
    let mut m = Connection::new(cfg.clone(), role, [0xa5; DESC_LEN]).expect("a valid config");
    // The application wants to read and to write (through the ring, then
    // inline), so that data, offers and write requests from the peer have
    // somewhere to go.
    m.app_recv(OpId(1), 1 << 20, false);
    m.app_send(OpId(2), 1000, false);
    m.app_send(OpId(3), 100, false);
    let mut d = Driver::default();
    d.run(&mut m, &cfg);
    for (n, head) in records {
        let Some(slot) = d.posted.pop_front() else {
            break;
        };
        m.recv_done(slot, Ok((head, *n)));
        d.run(&mut m, &cfg);
    }
    if m.error().is_some() {
        assert!(d.aborted, "an error without an abort: {:?}", m.error());
    }
    m
}

/// Executes a machine's actions the way a well-behaved provider would.
#[derive(Default)]
struct Driver {
    /// Receive slots posted, oldest first.
    posted: VecDeque<u16>,
    /// The machine asked to abort the connection.
    aborted: bool,
}

impl Driver {
    fn run(&mut self, m: &mut Connection, cfg: &Config) {
        // Bounded: each round answers what the machine asked for; a machine
        // that keeps asking for ever is a bug too.
        for _ in 0..10_000 {
            let Some(a) = m.poll_action() else {
                return;
            };
            match a {
                Action::PostRecv { slot } => {
                    assert!(slot < cfg.recv_slots, "receive slot {slot} out of range");
                    assert!(!self.posted.contains(&slot), "slot {slot} posted twice");
                    self.posted.push_back(slot);
                }
                // A reported send also completes the unreported ones before
                // it.
                Action::Send { slot, report, .. } => {
                    assert!(slot < cfg.send_slots, "send slot {slot} out of range");
                    if report {
                        m.send_done(slot, Ok(()));
                    }
                }
                Action::SendInline {
                    slot,
                    payload,
                    report,
                    ..
                } => {
                    assert!(slot < cfg.send_slots, "send slot {slot} out of range");
                    assert!(
                        payload.op == OpId(2) || payload.op == OpId(3),
                        "inline send of unknown {payload:?}"
                    );
                    assert!(
                        HEADER_LEN + payload.len as usize <= cfg.slot_size as usize,
                        "INLINE larger than a buffer"
                    );
                    if report {
                        m.send_done(slot, Ok(()));
                    }
                }
                Action::RingWrite {
                    slot,
                    payload,
                    ring_offset,
                    direct,
                    ..
                } => {
                    assert!(slot < cfg.send_slots, "send slot {slot} out of range");
                    assert!(
                        payload.op == OpId(2) || payload.op == OpId(3),
                        "ring write of unknown {payload:?}"
                    );
                    let end = u64::from(ring_offset) + u64::from(payload.len);
                    assert!(
                        end <= u64::from(MIN_RING),
                        "ring write beyond the peer's ring"
                    );
                    // A staged write is not reported (its DATA's send is).
                    if direct {
                        m.ring_write_done(slot, Ok(()));
                    }
                }
                Action::CopyOut {
                    ring_offset, len, ..
                } => {
                    let end = u64::from(ring_offset) + u64::from(len);
                    assert!(end <= u64::from(cfg.ring_size), "copy beyond the ring");
                }
                Action::CopyInline {
                    slot,
                    slot_offset,
                    len,
                    ..
                } => {
                    assert!(slot < cfg.recv_slots, "receive slot {slot} out of range");
                    assert!(!self.posted.contains(&slot), "copy from a posted receive");
                    let end = u64::from(slot_offset) + u64::from(len);
                    assert!(end <= u64::from(cfg.slot_size), "copy beyond the buffer");
                }
                Action::Expose { xfer, .. } => m.exposed(xfer, Ok([0x5a; DESC_LEN])),
                Action::RdmaRead { rdma, .. } | Action::RdmaWrite { rdma, .. } => {
                    assert!(rdma < cfg.rdma_slots, "rdma slot {rdma} out of range");
                    m.rdma_done(rdma, Ok(()));
                }
                Action::SendComplete { op, .. } | Action::RecvComplete { op, .. } => {
                    assert!((1..=3).contains(&op.0), "completion of unknown {op:?}");
                }
                Action::Abort { .. } => {
                    // The driver closes the socket; the receives it had
                    // posted come back flushed.
                    self.aborted = true;
                    m.closed();
                    for slot in std::mem::take(&mut self.posted) {
                        m.recv_done(slot, Err(WSA_OPERATION_ABORTED));
                    }
                }
                Action::Unexpose { .. } | Action::Connected => {}
            }
        }
        panic!("the machine asked for more than 10000 actions in a row");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::proto::{Body, Message};

    fn record(m: Message) -> Vec<u8> {
        let mut head = [0u8; MAX_HEAD];
        let n = m.encode(&mut head);
        let mut out = (n as u16).to_le_bytes().to_vec();
        out.extend_from_slice(&head[..n]);
        out
    }

    /// The harness is not vacuous: a well-formed conversation reaches the
    /// machine and is accepted, and a bad message aborts it.
    #[test]
    fn a_valid_conversation_is_accepted_and_a_bad_one_aborts() {
        let hello = Message {
            credits: 0,
            seq: 0,
            ack: 0,
            body: Body::Hello {
                recv_slots: 4,
                slot_size: 256,
                caps: 1,
                ring_size: MIN_RING,
                ring: [1; DESC_LEN],
            },
        };
        let data = Message {
            credits: 0,
            seq: 1,
            ack: 0,
            body: Body::Data { offset: 0, len: 5 },
        };
        // An INLINE's head, without its 7 payload bytes.
        let inline = Message {
            credits: 0,
            seq: 2,
            ack: 0,
            body: Body::Inline { len: 7 },
        };
        let mut inline = record(inline);
        inline[..2].copy_from_slice(&(HEADER_LEN as u16 + 7).to_le_bytes());
        let input = [record(hello), record(data), inline].concat();
        let records = split(&input);
        assert_eq!(records.len(), 3);
        let mut m = drive(Role::Acceptor, &records);
        assert_eq!(m.error(), None);
        assert_eq!(m.stats().msgs_received, 3);
        // The first read took the DATA; the next takes the INLINE from its
        // receive buffer, after the header.
        m.app_recv(OpId(9), 100, false);
        let actions: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::CopyInline {
                    slot_offset,
                    len: 7,
                    ..
                } if *slot_offset as usize == HEADER_LEN
            )),
            "{actions:?}"
        );
        assert_eq!(m.stats().bytes_copied_out, 5 + 7);
        let bad = Message { seq: 7, ..data };
        let input = [record(hello), record(bad)].concat();
        let m = drive(Role::Acceptor, &split(&input));
        assert!(m.error().is_some(), "an out-of-sequence message was taken");
        let elsewhere = Message {
            body: Body::Data { offset: 9, len: 5 },
            ..data
        };
        let input = [record(hello), record(elsewhere)].concat();
        let m = drive(Role::Acceptor, &split(&input));
        assert!(m.error().is_some(), "DATA at a bogus ring offset was taken");
    }
}
