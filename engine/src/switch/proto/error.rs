//! Why an operation or a connection failed.

use super::wire::DecodeError;
use std::fmt;

/// The result of a failed application op, or the reason a connection ended
/// (the first error a connection meets is the one every later op gets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A non-blocking op could not make progress now (nothing arrived, no
    /// credit).
    WouldBlock,
    /// A send after the sending side was shut down.
    Shutdown,
    /// The driver gave up waiting (a cancelled op whose buffer the fabric
    /// used; the connection was aborted).
    TimedOut,
    /// The connection was aborted locally.
    Aborted,
    /// The buffer of an op could not be exposed for RDMA.
    NoBuffers,
    /// The fabric failed an op of the connection (the provider's error
    /// code, e.g. `WSAECONNRESET` when the peer reset it).
    Transport(u32),
    /// The peer speaks another version of the session protocol (the
    /// version byte of its HELLO, or of any later message, is not ours).
    VersionMismatch {
        /// The version this side speaks ([`super::VERSION`]).
        ours: u8,
        /// The version the peer's message carries.
        theirs: u8,
    },
    /// The peer sent bytes that are not a message.
    Malformed(DecodeError),
    /// The peer broke the protocol.
    Protocol(&'static str),
    /// The peer sent more counted messages than receives were announced to
    /// it.
    CreditViolation {
        /// Counted messages received.
        received: u64,
        /// Receives announced to the peer.
        announced: u64,
    },
    /// The peer returned more credits than it could hold receives for.
    CreditOverflow,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::WouldBlock => f.write_str("operation would block"),
            Error::Shutdown => f.write_str("the sending side was shut down"),
            Error::TimedOut => f.write_str("timed out; the connection was aborted"),
            Error::Aborted => f.write_str("connection aborted locally"),
            Error::NoBuffers => f.write_str("no buffer space: registration failed"),
            Error::Transport(code) => write!(f, "transport error {code}"),
            Error::VersionMismatch { ours, theirs } => write!(
                f,
                "the peer speaks session protocol version {theirs}, this side speaks version \
                 {ours}: upgrade one of them"
            ),
            Error::Malformed(e) => write!(f, "malformed message from the peer: {e}"),
            Error::Protocol(what) => write!(f, "protocol error by the peer: {what}"),
            Error::CreditViolation {
                received,
                announced,
            } => write!(
                f,
                "credit violation: the peer sent {received} counted messages on {announced} \
                 receives announced"
            ),
            Error::CreditOverflow => {
                f.write_str("credit overflow: the peer returned more credits than it announced")
            }
        }
    }
}

impl std::error::Error for Error {}
