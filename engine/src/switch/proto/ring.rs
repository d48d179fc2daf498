//! Byte-ring accounting of one side: where the next copied stream bytes go
//! in the peer's receive ring, and which bytes of this side's ring hold
//! unread data.
//!
//! Each side owns a receive ring, exposed to the peer for RDMA writes and
//! announced in HELLO. Both sides use the first `size` bytes of it, `size`
//! being the smaller of the two HELLOs' ring sizes (so the sender's local
//! copy of the ring, from which it RDMA-writes, mirrors the peer's ring
//! offset for offset). The sender writes stream bytes in order, never
//! across the ring's end (a send that reaches the end continues at 0 in
//! the next DATA), and only into space the receiver gave back: the `ack`
//! field of every header carries the bytes the receiver consumed so far (a
//! wrapping u32 count). The receiver publishes it lazily: in whatever
//! message it sends anyway, or in a CREDIT once half the ring is consumed
//! and unannounced. Every index and length from the peer is checked: a DATA
//! elsewhere than the next free byte, larger than the free space or
//! crossing the ring's end, or an ack beyond what was written, ends the
//! connection.

use super::error::Error;

/// The smallest ring a side may have or accept from its peer.
pub const MIN_RING: u32 = 4096;

/// The sending direction: space in the peer's ring.
#[derive(Clone, Debug, Default)]
pub(super) struct RingTx {
    /// Bytes of the ring both sides use (0 until the peer's HELLO).
    size: u32,
    /// Bytes written into the ring so far (announced by DATA).
    sent: u64,
    /// Bytes the peer consumed (its latest ack). Invariant:
    /// `acked <= sent <= acked + size`.
    acked: u64,
}

impl RingTx {
    /// The session's ring size (the smaller of both HELLOs').
    pub(super) fn open(&mut self, size: u32) {
        self.size = size;
    }

    /// Where the next `want` bytes go: `(offset, len)` with `len <= want`
    /// the contiguous free bytes there, or `None` when the ring is full.
    pub(super) fn next(&self, want: u64) -> Option<(u32, u32)> {
        if self.size == 0 {
            return None;
        }
        let size = u64::from(self.size);
        let free = size - (self.sent - self.acked);
        let at = self.sent % size;
        let len = want.min(free).min(size - at);
        (len > 0).then_some((at as u32, len as u32))
    }

    /// `len` bytes at the offset [`RingTx::next`] gave were written.
    pub(super) fn wrote(&mut self, len: u32) {
        self.sent += u64::from(len);
        debug_assert!(self.sent - self.acked <= u64::from(self.size));
    }

    /// The peer's header says it consumed `ack` bytes (wrapping).
    pub(super) fn on_ack(&mut self, ack: u32) -> Result<(), Error> {
        let delta = u64::from(ack.wrapping_sub(self.acked as u32));
        if delta > self.sent - self.acked {
            return Err(Error::Protocol("ring ack beyond the bytes written"));
        }
        self.acked += delta;
        Ok(())
    }

    /// Bytes written that the peer has not consumed yet.
    pub(super) fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }
}

/// The receiving direction: unread bytes of this side's ring.
#[derive(Clone, Debug, Default)]
pub(super) struct RingRx {
    /// Bytes of the ring both sides use (0 until the peer's HELLO).
    size: u32,
    /// Bytes announced by DATA so far.
    received: u64,
    /// Bytes copied out. Invariant: `consumed <= received <= consumed + size`.
    consumed: u64,
    /// Bytes consumed as of the last ack sent. Invariant:
    /// `published <= consumed`.
    published: u64,
}

impl RingRx {
    /// The session's ring size (the smaller of both HELLOs').
    pub(super) fn open(&mut self, size: u32) {
        self.size = size;
    }

    /// A DATA says `len` bytes are at `offset`: checks that they are the
    /// next bytes, fit the free space and do not cross the ring's end.
    pub(super) fn on_data(&mut self, offset: u32, len: u32) -> Result<(), Error> {
        if self.size == 0 {
            return Err(Error::Protocol("DATA before the ring is known"));
        }
        let size = u64::from(self.size);
        if u64::from(offset) != self.received % size {
            return Err(Error::Protocol("DATA at a ring offset other than the next"));
        }
        if u64::from(offset) + u64::from(len) > size {
            return Err(Error::Protocol("DATA crossing the end of the ring"));
        }
        if self.received - self.consumed + u64::from(len) > size {
            return Err(Error::Protocol("DATA beyond the free ring space"));
        }
        self.received += u64::from(len);
        Ok(())
    }

    /// `len` unread bytes were copied out.
    pub(super) fn consumed(&mut self, len: u32) {
        self.consumed += u64::from(len);
        debug_assert!(self.consumed <= self.received);
    }

    /// The ack the next header carries (publishes it).
    pub(super) fn take_ack(&mut self) -> u32 {
        self.published = self.consumed;
        self.consumed as u32
    }

    /// Half the ring or more is consumed and not announced: worth a
    /// CREDIT of its own.
    pub(super) fn ack_due(&self) -> bool {
        self.size > 0 && self.consumed - self.published >= u64::from(self.size / 2)
    }

    /// The most bytes one copy-out takes from the ring: a quarter of it, so
    /// that a receive that drains a full ring gives half of it back (after
    /// two copies) while it copies the rest, and the sender refills that
    /// half meanwhile.
    pub(super) fn copy_step(&self) -> u32 {
        (self.size / 4).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_wraps_at_the_end_and_waits_for_acks() {
        let mut t = RingTx::default();
        assert_eq!(t.next(10), None, "no ring before HELLO");
        t.open(100);
        assert_eq!(t.next(60), Some((0, 60)));
        t.wrote(60);
        // 40 contiguous bytes to the end.
        assert_eq!(t.next(60), Some((60, 40)));
        t.wrote(40);
        assert_eq!(t.next(1), None, "full");
        assert_eq!(t.on_ack(30), Ok(()));
        assert_eq!(t.next(50), Some((0, 30)));
        assert_eq!(t.in_flight(), 70);
    }

    #[test]
    fn acks_beyond_what_was_written_are_refused() {
        let mut t = RingTx::default();
        t.open(100);
        t.wrote(50);
        assert!(t.on_ack(51).is_err());
        assert_eq!(t.on_ack(50), Ok(()));
        // A stale (smaller) ack wraps to a huge delta: refused too.
        assert!(t.on_ack(49).is_err());
    }

    #[test]
    fn acks_wrap_with_the_u32_count() {
        let mut t = RingTx::default();
        t.open(MIN_RING);
        for _ in 0..(1u64 << 32) / u64::from(MIN_RING) + 3 {
            let (_, n) = t.next(u64::from(MIN_RING)).expect("space");
            t.wrote(n);
            assert_eq!(t.on_ack((t.sent) as u32), Ok(()));
        }
        assert!(t.sent > u64::from(u32::MAX));
    }

    #[test]
    fn receiver_checks_offsets_space_and_the_end() {
        let mut r = RingRx::default();
        assert!(r.on_data(0, 1).is_err(), "no ring before HELLO");
        r.open(100);
        assert!(r.on_data(5, 10).is_err(), "not the next byte");
        assert!(r.on_data(0, 101).is_err(), "crosses the end");
        assert_eq!(r.on_data(0, 80), Ok(()));
        assert!(r.on_data(80, 30).is_err(), "crosses the end");
        assert_eq!(r.on_data(80, 20), Ok(()));
        assert!(r.on_data(0, 1).is_err(), "no free space");
        r.consumed(50);
        assert!(r.ack_due());
        assert_eq!(r.take_ack(), 50);
        assert!(!r.ack_due());
        assert_eq!(r.on_data(0, 50), Ok(()));
        assert!(r.on_data(50, 1).is_err(), "full again");
    }
}
