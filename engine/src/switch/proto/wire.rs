//! The session protocol's wire format: every message is one fixed
//! [`HEADER_LEN`]-byte little-endian header, then a body whose size the
//! message kind fixes, then (INLINE only) the payload. Small copied sends
//! travel as INLINE, their bytes right after the header; larger ones go
//! into the peer's receive ring by RDMA write before the DATA message that
//! announces them.
//!
//! Header:
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0..2   | [`MAGIC`] |
//! | 2      | [`VERSION`] |
//! | 3      | kind (1 HELLO, 2 DATA, 3 CREDIT, 4 READ_OFFER, 5 READ_DONE, 6 WRITE_REQUEST, 7 WRITE_TARGET, 8 WRITE_DONE, 9 FIN, 10 NEED, 11 CREDIT_ACK) |
//! | 4..6   | credits: receives the sender re-posted since its previous message and announces now |
//! | 6..8   | reserved, 0 |
//! | 8..12  | sequence number: 0 for HELLO, then +1 per message (wrapping) |
//! | 12..16 | length: the kind's byte count (payload bytes, transfer bytes); 0 for kinds without one |
//! | 16..20 | ring ack: bytes the sender consumed from its receive ring so far (wrapping count; 0 in HELLO) |
//!
//! Bodies after the header:
//!
//! | kind | body |
//! |------|------|
//! | HELLO | `recv_slots` u32, `slot_size` u32, `caps` u32, `ring_size` u32, the receive ring's [`DESC_LEN`]-byte RDMA descriptor |
//! | READ_OFFER, WRITE_TARGET | the provider's [`DESC_LEN`]-byte RDMA descriptor |
//! | DATA | `offset` u32: where in the receiver's ring the `length` bytes start |
//! | INLINE | `length` payload bytes |
//! | others | none |
//!
//! [`Message::decode`] checks every field and every length against the
//! received byte count and never panics, whatever the input.

use std::fmt;

/// First two header bytes (little-endian `"SW"`).
pub const MAGIC: u16 = u16::from_le_bytes(*b"SW");

/// The protocol version this module speaks (header byte 2). Version 1 had
/// 16-byte headers, all copied payload inside DATA messages and no receive
/// ring.
pub const VERSION: u8 = 2;

/// Bytes of the fixed header every message starts with.
pub const HEADER_LEN: usize = 20;

/// Bytes of an RDMA descriptor as the provider produces it
/// (`register_rdma_memory`); opaque to the protocol.
pub const DESC_LEN: usize = 32;

/// An RDMA descriptor: names an exposed buffer to the peer's provider.
pub type Desc = [u8; DESC_LEN];

/// The longest encoded message without payload (header and the largest
/// body): the buffer [`Message::encode`] writes to, and enough bytes of a
/// received message to decode it (an INLINE's payload follows its
/// [`HEADER_LEN`]-byte header).
pub const MAX_HEAD: usize = HEADER_LEN + HELLO_BODY;

/// HELLO capability bit: the sender accepts READ_OFFERs (it RDMA-reads
/// large payloads from the offering side's buffer).
pub const CAP_RDMA_READ: u32 = 1;

const HELLO_BODY: usize = 16 + DESC_LEN;
const DATA_BODY: usize = 4;

const K_HELLO: u8 = 1;
const K_DATA: u8 = 2;
const K_CREDIT: u8 = 3;
const K_READ_OFFER: u8 = 4;
const K_READ_DONE: u8 = 5;
const K_WRITE_REQUEST: u8 = 6;
const K_WRITE_TARGET: u8 = 7;
const K_WRITE_DONE: u8 = 8;
const K_FIN: u8 = 9;
const K_NEED: u8 = 10;
const K_CREDIT_ACK: u8 = 11;
const K_INLINE: u8 = 12;

/// What a message says (its kind and the kind's fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// Opens the session (sequence 0): the receives announced to the peer
    /// (its initial credits), the size of each (the largest message the
    /// peer may send), capability bits ([`CAP_RDMA_READ`]) and the receive
    /// ring the peer RDMA-writes copied stream bytes into.
    Hello {
        /// Receives announced: the peer's initial credits.
        recv_slots: u32,
        /// Bytes of each receive buffer.
        slot_size: u32,
        /// Capability bits.
        caps: u32,
        /// Bytes of the receive ring.
        ring_size: u32,
        /// The receive ring, exposed for the peer's RDMA writes.
        ring: Desc,
    },
    /// The next `len` stream bytes are in the receiver's ring at `offset`
    /// (written by RDMA before this message was sent).
    Data {
        /// Offset in the receiver's ring.
        offset: u32,
        /// Bytes (at least 1).
        len: u32,
    },
    /// The next `len` stream bytes follow the header (a small copied send:
    /// one message, no ring write).
    Inline {
        /// Payload bytes (at least 1).
        len: u32,
    },
    /// Returns credits and ring space only (those in the header).
    Credit,
    /// The next `len` stream bytes are in the sender's buffer that `desc`
    /// exposes for RDMA read; answered by READ_DONE once all were read.
    ReadOffer {
        /// Bytes offered (at least 1).
        len: u32,
        /// The exposed buffer.
        desc: Desc,
    },
    /// All `len` bytes of the oldest outstanding READ_OFFER were read.
    ReadDone {
        /// Bytes read: the offer's length.
        len: u32,
    },
    /// The next `len` stream bytes are waiting at the sender for RDMA-write
    /// targets (WRITE_TARGET).
    WriteRequest {
        /// Bytes to transfer (at least 1).
        len: u32,
    },
    /// Write the next `len` bytes of the oldest outstanding WRITE_REQUEST
    /// into the receive buffer `desc` exposes; answered by WRITE_DONE.
    WriteTarget {
        /// Bytes the target takes (at least 1).
        len: u32,
        /// The exposed receive buffer.
        desc: Desc,
    },
    /// The `len` bytes of the oldest outstanding WRITE_TARGET were written.
    WriteDone {
        /// Bytes written: the target's length.
        len: u32,
    },
    /// End of the sender's stream: no DATA, offer or request follows.
    Fin,
    /// The sender is short of credits: answer with CREDIT_ACK as soon as
    /// there are receives to return. Outside the credit count.
    Need,
    /// Answers a NEED, returning credits in its header. Outside the credit
    /// count.
    CreditAck,
}

impl Body {
    fn kind(&self) -> u8 {
        match self {
            Body::Hello { .. } => K_HELLO,
            Body::Data { .. } => K_DATA,
            Body::Inline { .. } => K_INLINE,
            Body::Credit => K_CREDIT,
            Body::ReadOffer { .. } => K_READ_OFFER,
            Body::ReadDone { .. } => K_READ_DONE,
            Body::WriteRequest { .. } => K_WRITE_REQUEST,
            Body::WriteTarget { .. } => K_WRITE_TARGET,
            Body::WriteDone { .. } => K_WRITE_DONE,
            Body::Fin => K_FIN,
            Body::Need => K_NEED,
            Body::CreditAck => K_CREDIT_ACK,
        }
    }

    /// The header's length field.
    fn len_field(&self) -> u32 {
        match *self {
            Body::Data { len, .. }
            | Body::Inline { len }
            | Body::ReadOffer { len, .. }
            | Body::ReadDone { len }
            | Body::WriteRequest { len }
            | Body::WriteTarget { len, .. }
            | Body::WriteDone { len } => len,
            Body::Hello { .. } | Body::Credit | Body::Fin | Body::Need | Body::CreditAck => 0,
        }
    }
}

/// Size of the body after the header, by kind; `None` for an unknown kind.
fn body_len(kind: u8) -> Option<usize> {
    match kind {
        K_HELLO => Some(HELLO_BODY),
        K_READ_OFFER | K_WRITE_TARGET => Some(DESC_LEN),
        K_DATA => Some(DATA_BODY),
        K_INLINE | K_CREDIT | K_READ_DONE | K_WRITE_REQUEST | K_WRITE_DONE | K_FIN | K_NEED
        | K_CREDIT_ACK => Some(0),
        _ => None,
    }
}

/// One session message: header fields and body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// Receives the sender re-posted and announces with this message.
    pub credits: u16,
    /// Sequence number: 0 for HELLO, then +1 per message (wrapping).
    pub seq: u32,
    /// Bytes the sender consumed from its receive ring so far (wrapping).
    pub ack: u32,
    /// Kind and fields.
    pub body: Body,
}

/// Why bytes are not a valid message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header and body of the kind need.
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The first two bytes are not [`MAGIC`].
    BadMagic(u16),
    /// A version this module does not speak.
    BadVersion(u8),
    /// An unknown kind byte.
    UnknownKind(u8),
    /// The reserved header field is not 0.
    Reserved(u16),
    /// The length field is 0 for a kind that carries bytes.
    ZeroLength(u8),
    /// The length field (or the body) disagrees with the received byte
    /// count.
    LengthMismatch {
        /// Kind byte.
        kind: u8,
        /// Bytes the header implies.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::Truncated { have, need } => {
                write!(f, "truncated: {have} bytes, {need} needed")
            }
            DecodeError::BadMagic(m) => write!(f, "bad magic {m:#06x}"),
            DecodeError::BadVersion(v) => write!(f, "unsupported version {v}"),
            DecodeError::UnknownKind(k) => write!(f, "unknown kind {k}"),
            DecodeError::Reserved(r) => write!(f, "reserved field {r:#06x} is not 0"),
            DecodeError::ZeroLength(k) => write!(f, "zero length in a kind-{k} message"),
            DecodeError::LengthMismatch {
                kind,
                expected,
                received,
            } => write!(
                f,
                "kind-{kind} message of {received} bytes, its header implies {expected}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// An encoded header and body (no payload), as a send buffer's
/// [`Action::Send`] sends it: `len` valid bytes of `bytes`.
///
/// [`Action::Send`]: super::Action::Send
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Head {
    bytes: [u8; MAX_HEAD],
    /// Invariant: `len <= MAX_HEAD`.
    len: u8,
}

impl Head {
    /// Encodes `m` in place (no new buffer to fill and move).
    pub fn set(&mut self, m: &Message) {
        self.len = m.encode(&mut self.bytes) as u8;
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Default for Head {
    /// No message (empty).
    fn default() -> Head {
        Head {
            bytes: [0; MAX_HEAD],
            len: 0,
        }
    }
}

impl fmt::Debug for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Message::decode(self.as_bytes(), self.as_bytes().len()) {
            Ok(m) => write!(f, "Head({m:?})"),
            // An INLINE head decodes only with its payload length.
            Err(_) => write!(f, "Head({:02x?})", self.as_bytes()),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Message {
    /// Writes header and body (not an INLINE payload) to `out`; returns the
    /// bytes written (`HEADER_LEN` plus the kind's body).
    pub fn encode(&self, out: &mut [u8; MAX_HEAD]) -> usize {
        let kind = self.body.kind();
        out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        out[2] = VERSION;
        out[3] = kind;
        out[4..6].copy_from_slice(&self.credits.to_le_bytes());
        out[6..8].copy_from_slice(&0u16.to_le_bytes());
        out[8..12].copy_from_slice(&self.seq.to_le_bytes());
        out[12..16].copy_from_slice(&self.body.len_field().to_le_bytes());
        out[16..20].copy_from_slice(&self.ack.to_le_bytes());
        let body = &mut out[HEADER_LEN..];
        match self.body {
            Body::Hello {
                recv_slots,
                slot_size,
                caps,
                ring_size,
                ring,
            } => {
                body[0..4].copy_from_slice(&recv_slots.to_le_bytes());
                body[4..8].copy_from_slice(&slot_size.to_le_bytes());
                body[8..12].copy_from_slice(&caps.to_le_bytes());
                body[12..16].copy_from_slice(&ring_size.to_le_bytes());
                body[16..16 + DESC_LEN].copy_from_slice(&ring);
                HEADER_LEN + HELLO_BODY
            }
            Body::Data { offset, .. } => {
                body[0..4].copy_from_slice(&offset.to_le_bytes());
                HEADER_LEN + DATA_BODY
            }
            Body::ReadOffer { desc, .. } | Body::WriteTarget { desc, .. } => {
                body[..DESC_LEN].copy_from_slice(&desc);
                HEADER_LEN + DESC_LEN
            }
            _ => HEADER_LEN,
        }
    }

    /// Decodes a received message of `len` bytes in all, of which `bytes`
    /// holds the first ones (at least header and body; an INLINE payload
    /// may be absent or partial). Bytes of `bytes` beyond `len` are
    /// ignored.
    pub fn decode(bytes: &[u8], len: usize) -> Result<Message, DecodeError> {
        let b = &bytes[..bytes.len().min(len)];
        if b.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                have: b.len(),
                need: HEADER_LEN,
            });
        }
        let magic = u16_at(b, 0);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if b[2] != VERSION {
            return Err(DecodeError::BadVersion(b[2]));
        }
        let kind = b[3];
        let Some(body_len) = body_len(kind) else {
            return Err(DecodeError::UnknownKind(kind));
        };
        let reserved = u16_at(b, 6);
        if reserved != 0 {
            return Err(DecodeError::Reserved(reserved));
        }
        let credits = u16_at(b, 4);
        let seq = u32_at(b, 8);
        let n = u32_at(b, 12);
        let ack = u32_at(b, 16);
        let need = HEADER_LEN + body_len;
        if b.len() < need {
            return Err(DecodeError::Truncated {
                have: b.len(),
                need,
            });
        }
        let expected = need as u64 + if kind == K_INLINE { u64::from(n) } else { 0 };
        if expected != len as u64 {
            return Err(DecodeError::LengthMismatch {
                kind,
                expected,
                received: len as u64,
            });
        }
        let with_len = matches!(
            kind,
            K_DATA
                | K_INLINE
                | K_READ_OFFER
                | K_READ_DONE
                | K_WRITE_REQUEST
                | K_WRITE_TARGET
                | K_WRITE_DONE
        );
        if with_len && n == 0 {
            return Err(DecodeError::ZeroLength(kind));
        }
        if !with_len && n != 0 {
            return Err(DecodeError::LengthMismatch {
                kind,
                expected: need as u64,
                received: need as u64 + u64::from(n),
            });
        }
        let body = &b[HEADER_LEN..need];
        let desc_at = |at: usize| {
            let mut d = [0u8; DESC_LEN];
            d.copy_from_slice(&body[at..at + DESC_LEN]);
            d
        };
        let desc = || desc_at(0);
        let body = match kind {
            K_HELLO => Body::Hello {
                recv_slots: u32_at(body, 0),
                slot_size: u32_at(body, 4),
                caps: u32_at(body, 8),
                ring_size: u32_at(body, 12),
                ring: desc_at(16),
            },
            K_DATA => Body::Data {
                offset: u32_at(body, 0),
                len: n,
            },
            K_INLINE => Body::Inline { len: n },
            K_CREDIT => Body::Credit,
            K_READ_OFFER => Body::ReadOffer {
                len: n,
                desc: desc(),
            },
            K_READ_DONE => Body::ReadDone { len: n },
            K_WRITE_REQUEST => Body::WriteRequest { len: n },
            K_WRITE_TARGET => Body::WriteTarget {
                len: n,
                desc: desc(),
            },
            K_WRITE_DONE => Body::WriteDone { len: n },
            K_FIN => Body::Fin,
            K_NEED => Body::Need,
            _ => Body::CreditAck,
        };
        Ok(Message {
            credits,
            seq,
            ack,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_is_a_header_and_needs_its_payload_length() {
        let m = Message {
            credits: 1,
            seq: 4,
            ack: 9,
            body: Body::Inline { len: 8 },
        };
        let mut out = [0u8; MAX_HEAD];
        assert_eq!(m.encode(&mut out), HEADER_LEN);
        assert_eq!(Message::decode(&out[..HEADER_LEN], HEADER_LEN + 8), Ok(m));
        for wrong in [HEADER_LEN, HEADER_LEN + 7, HEADER_LEN + 9] {
            assert!(matches!(
                Message::decode(&out[..HEADER_LEN], wrong),
                Err(DecodeError::LengthMismatch { .. })
            ));
        }
        let empty = Message {
            body: Body::Inline { len: 0 },
            ..m
        };
        assert_eq!(empty.encode(&mut out), HEADER_LEN);
        assert_eq!(
            Message::decode(&out[..HEADER_LEN], HEADER_LEN),
            Err(DecodeError::ZeroLength(K_INLINE))
        );
    }

    #[test]
    fn data_is_a_header_and_a_ring_offset_without_payload() {
        let m = Message {
            credits: 3,
            seq: 9,
            ack: 77,
            body: Body::Data {
                offset: 4096,
                len: 100,
            },
        };
        let mut out = [0u8; MAX_HEAD];
        let n = m.encode(&mut out);
        assert_eq!(n, HEADER_LEN + 4);
        assert_eq!(Message::decode(&out[..n], n), Ok(m));
        assert!(matches!(
            Message::decode(&out[..n], n + 100),
            Err(DecodeError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn hello_carries_the_ring() {
        let m = Message {
            credits: 0,
            seq: 0,
            ack: 0,
            body: Body::Hello {
                recv_slots: 14,
                slot_size: 128,
                caps: CAP_RDMA_READ,
                ring_size: 1 << 17,
                ring: [7; DESC_LEN],
            },
        };
        let mut out = [0u8; MAX_HEAD];
        let n = m.encode(&mut out);
        assert_eq!(n, MAX_HEAD);
        assert_eq!(out[2], VERSION);
        assert_eq!(Message::decode(&out[..n], n), Ok(m));
    }

    #[test]
    fn short_inputs_fail_cleanly() {
        let m = Message {
            credits: 0,
            seq: 0,
            ack: 5,
            body: Body::ReadOffer {
                len: 7,
                desc: [5; DESC_LEN],
            },
        };
        let mut out = [0u8; MAX_HEAD];
        let n = m.encode(&mut out);
        for k in 0..n {
            assert!(Message::decode(&out[..k], n).is_err());
            assert!(Message::decode(&out[..n], k).is_err());
        }
        assert_eq!(Message::decode(&out[..n], n), Ok(m));
    }
}
