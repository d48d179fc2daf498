//! Settings of one side of a session.

use super::credit::{RESERVE, SLACK};
use super::ring::MIN_RING;
use super::wire::MAX_HEAD;

/// How a side moves a large send (above [`Config::rdma_threshold`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RdmaFlow {
    /// Expose the send buffer and offer it (READ_OFFER); the receiver
    /// RDMA-reads it into its receive buffer. Falls back to [`Write`] when
    /// the peer's HELLO says it does not read.
    ///
    /// [`Write`]: RdmaFlow::Write
    #[default]
    Read,
    /// Announce the bytes (WRITE_REQUEST); the receiver exposes its receive
    /// buffer (WRITE_TARGET) and the sender RDMA-writes into it.
    Write,
}

/// Settings of one side; both sides may differ (HELLO tells the peer what
/// it needs to know).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Receive buffers posted. All but [`SLACK`] are announced to the peer
    /// as its initial credits.
    pub recv_slots: u16,
    /// Send buffers: messages in flight at once.
    pub send_slots: u16,
    /// Bytes of each send and receive buffer: at least [`MAX_HEAD`]. A
    /// copied send of at most the smaller of both sides' sizes less the
    /// header travels as one INLINE message; longer ones go through the
    /// ring.
    pub slot_size: u32,
    /// Bytes of the receive ring the peer RDMA-writes copied stream bytes
    /// into (and of the local ring they are written from): at most this
    /// many bytes are in flight. The session uses the smaller of the two
    /// sides' sizes; at least [`MIN_RING`].
    pub ring_size: u32,
    /// Sends of more bytes than this go by RDMA from the application's
    /// buffer (unless non-blocking); smaller ones are copied through the
    /// ring.
    pub rdma_threshold: u64,
    /// Largest single RDMA op this side posts or targets
    /// (`SO_MAX_RDMA_SIZE`).
    pub max_rdma_op: u32,
    /// The flow this side prefers for its large sends.
    pub rdma_flow: RdmaFlow,
    /// This side can RDMA-read, so it accepts READ_OFFERs.
    pub can_rdma_read: bool,
    /// Return credits in a CREDIT message as soon as this many receives are
    /// re-posted and unannounced; 0: never unasked (credits then travel in
    /// the headers of other messages and in answers to NEED). Not 1, which
    /// would answer every CREDIT with a CREDIT.
    pub credit_batch: u16,
    /// RDMA ops this side may have in flight at once.
    pub rdma_slots: u16,
    /// Blocking copied sends of at least this many bytes have their DATA
    /// written into the peer's ring straight from the application's buffer
    /// ([`Action::RingWrite`]'s `direct`) and settle when that write
    /// completed; `u64::MAX`: never (every DATA is staged in the send
    /// ring). Local only: the peer sees the same DATA either way.
    ///
    /// [`Action::RingWrite`]: super::Action::RingWrite
    pub direct_min: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            recv_slots: 16,
            send_slots: 16,
            slot_size: 1024,
            ring_size: 112 << 10,
            rdma_threshold: 64 << 10,
            max_rdma_op: 1 << 30,
            rdma_flow: RdmaFlow::Read,
            can_rdma_read: true,
            credit_batch: 0,
            rdma_slots: 4,
            direct_min: u64::MAX,
        }
    }
}

impl Config {
    /// The smallest `recv_slots`: the slack, the reserve and one receive
    /// for payload.
    pub const MIN_RECV_SLOTS: u16 = SLACK as u16 + RESERVE as u16 + 1;

    /// Checks that the settings can work.
    pub fn validate(&self) -> Result<(), String> {
        if self.recv_slots < Self::MIN_RECV_SLOTS {
            return Err(format!(
                "recv_slots must be at least {} (2 slack receives, a reserve of {RESERVE} for \
                 control messages, 1 for data), not {}",
                Self::MIN_RECV_SLOTS,
                self.recv_slots
            ));
        }
        if self.send_slots == 0 {
            return Err("send_slots must be at least 1".into());
        }
        if (self.slot_size as usize) < MAX_HEAD {
            return Err(format!(
                "slot_size must be at least {MAX_HEAD} bytes (the largest control message), \
                 not {}",
                self.slot_size
            ));
        }
        if self.ring_size < MIN_RING {
            return Err(format!(
                "ring_size must be at least {MIN_RING} bytes, not {}",
                self.ring_size
            ));
        }
        if self.max_rdma_op == 0 {
            return Err("max_rdma_op must be positive".into());
        }
        if self.rdma_slots == 0 {
            return Err("rdma_slots must be at least 1".into());
        }
        if self.credit_batch == 1 {
            return Err("credit_batch must be 0 or at least 2".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_limits_are_checked() {
        assert_eq!(Config::default().validate(), Ok(()));
        for bad in [
            Config {
                recv_slots: Config::MIN_RECV_SLOTS - 1,
                ..Config::default()
            },
            Config {
                send_slots: 0,
                ..Config::default()
            },
            Config {
                slot_size: MAX_HEAD as u32 - 1,
                ..Config::default()
            },
            Config {
                credit_batch: 1,
                ..Config::default()
            },
            Config {
                rdma_slots: 0,
                ..Config::default()
            },
            Config {
                ring_size: MIN_RING - 1,
                ..Config::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
