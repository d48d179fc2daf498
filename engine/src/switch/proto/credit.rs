//! Credit accounting of one side: what it may send, what it announced, what
//! it owes.
//!
//! A *credit* is one receive the peer posted and announced. Counted
//! messages (all but the connector's HELLO, NEED and CREDIT_ACK) each take
//! one; the receiver re-posts the buffer once the message is consumed and
//! announces it again in the `credits` field of a later header, never
//! before the re-post (a credit is a posted receive: the peer's message
//! never finds none). The rules that keep a connection free of deadlock:
//!
//! * **Payload** (DATA, READ_OFFER, WRITE_REQUEST, FIN) needs more than
//!   [`RESERVE`] credits: unread data can never fill the last `RESERVE`
//!   receives, which stay for control messages, consumed at once.
//! * **Control answers** (READ_DONE, WRITE_TARGET, WRITE_DONE) need 2
//!   credits, or 1 when they return credits.
//! * **CREDIT** needs 1 and always returns credits. So the last credit is
//!   only ever spent on a message that returns credits.
//! * **NEED / CREDIT_ACK** are outside the count: a side short of credits
//!   sends one NEED; the peer answers with one CREDIT_ACK (returning
//!   credits) as soon as it has re-posted receives. At most one of each is
//!   in flight per direction, so [`SLACK`] receives beyond those announced
//!   always hold them.
//! * **Re-posts may wait**, off the path of a reply (the machine's
//!   `repost`): the receive of a consumed counted message may stay
//!   un-posted, and so unannounced, while the peer holds more than half of
//!   this side's HELLO announcement and more than `RESERVE + 1` credits
//!   ([`Credits::may_hold_back`]).
//!   So holding receives back never leaves the peer short of credits, and
//!   a NEED, which is answered only once they are posted, still finds them.

use super::error::Error;

/// Credits a payload message must leave unspent.
pub const RESERVE: u32 = 2;

/// Receives posted but never announced: room for one NEED and one
/// CREDIT_ACK (and the connector's HELLO before that).
pub const SLACK: u32 = 2;

/// Which credit rule a message follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// DATA, READ_OFFER, WRITE_REQUEST, FIN.
    Payload,
    /// READ_DONE, WRITE_TARGET, WRITE_DONE, and the acceptor's HELLO.
    Control,
    /// CREDIT.
    Credit,
}

/// Both directions' counts. All counts are totals over the connection's
/// life (u64: they never wrap).
#[derive(Clone, Debug, Default)]
pub(super) struct Credits {
    /// Counted messages this side may still send: receives the peer
    /// announced minus counted messages sent. Invariant: `send <= peer_max`.
    send: u64,
    /// The peer's HELLO announcement: the most credits it can ever grant
    /// (a return beyond it is [`Error::CreditOverflow`]).
    peer_max: u64,
    /// Receives this side announced: its HELLO count plus every `credits`
    /// field it sent.
    announced: u64,
    /// Its HELLO count (`recv_slots - SLACK`).
    hello: u64,
    /// Counted messages received. The peer keeps `received <= announced`;
    /// more is [`Error::CreditViolation`].
    received: u64,
    /// Receives re-posted after a counted message, not yet announced.
    /// Invariant: `announced + pending - received` is the receives posted
    /// for counted messages.
    pending: u64,
}

impl Credits {
    /// This side announces `n` receives in its HELLO.
    pub(super) fn announce_hello(&mut self, n: u64) {
        self.announced = n;
        self.hello = n;
    }

    /// The peer's HELLO announced `n` receives.
    pub(super) fn peer_hello(&mut self, n: u64) {
        self.send = n;
        self.peer_max = n;
    }

    /// Credits this side holds.
    pub(super) fn send(&self) -> u64 {
        self.send
    }

    /// Re-posted receives not yet announced.
    pub(super) fn pending(&self) -> u64 {
        self.pending
    }

    /// Whether a message of class `class` may be sent now.
    pub(super) fn may_send(&self, class: Class) -> bool {
        let returns = self.pending > 0;
        match class {
            Class::Payload => self.send > u64::from(RESERVE),
            Class::Control => self.send >= 2 || (self.send >= 1 && returns),
            Class::Credit => self.send >= 1 && returns,
        }
    }

    /// Takes what the next header announces (all pending, at most what the
    /// field holds).
    pub(super) fn take_returns(&mut self) -> u16 {
        let n = self.pending.min(u64::from(u16::MAX));
        self.pending -= n;
        self.announced += n;
        n as u16
    }

    /// A counted message was sent.
    pub(super) fn spend(&mut self) {
        debug_assert!(self.send > 0);
        self.send = self.send.saturating_sub(1);
    }

    /// A counted message arrived.
    pub(super) fn on_counted(&mut self) -> Result<(), Error> {
        self.received += 1;
        if self.received > self.announced {
            return Err(Error::CreditViolation {
                received: self.received,
                announced: self.announced,
            });
        }
        Ok(())
    }

    /// The peer returned `n` credits.
    pub(super) fn on_returned(&mut self, n: u16) -> Result<(), Error> {
        self.send += u64::from(n);
        if self.send > self.peer_max {
            return Err(Error::CreditOverflow);
        }
        Ok(())
    }

    /// A receive that held a counted message was re-posted.
    pub(super) fn reposted(&mut self) {
        self.pending += 1;
    }

    /// Whether the receive of a counted message just consumed may wait to
    /// be re-posted: the peer holds more than half of this side's HELLO
    /// announcement, and more than `RESERVE + 1` credits (announced, less
    /// the counted messages received: re-posts not announced yet do not
    /// count).
    pub(super) fn may_hold_back(&self) -> bool {
        let peer = self.announced.saturating_sub(self.received);
        2 * peer > self.hello && peer > u64::from(RESERVE) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_credit_only_for_messages_that_return_credits() {
        let mut c = Credits::default();
        c.peer_hello(3);
        assert!(c.may_send(Class::Payload));
        c.spend();
        assert!(!c.may_send(Class::Payload));
        assert!(c.may_send(Class::Control));
        c.spend();
        assert!(!c.may_send(Class::Control), "1 credit, nothing to return");
        assert!(!c.may_send(Class::Credit));
        c.reposted();
        assert!(c.may_send(Class::Control) && c.may_send(Class::Credit));
        assert_eq!(c.take_returns(), 1);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn a_re_post_waits_only_while_the_peer_keeps_more_than_half() {
        let mut c = Credits::default();
        c.announce_hello(6);
        c.peer_hello(6);
        for _ in 0..2 {
            assert_eq!(c.on_counted(), Ok(()));
        }
        assert!(c.may_hold_back(), "4 of 6 left");
        assert_eq!(c.on_counted(), Ok(()));
        assert!(!c.may_hold_back(), "3 of 6 left: half");
        c.reposted();
        assert!(!c.may_hold_back(), "a re-post counts once announced");
        assert_eq!(c.take_returns(), 1);
        assert!(c.may_hold_back());
        // A small announcement keeps RESERVE + 1 beyond what is held back.
        let mut c = Credits::default();
        c.announce_hello(4);
        assert!(c.may_hold_back());
        assert_eq!(c.on_counted(), Ok(()));
        assert!(!c.may_hold_back(), "3 left: RESERVE + 1");
    }

    #[test]
    fn violations_are_detected() {
        let mut c = Credits::default();
        c.announce_hello(1);
        c.peer_hello(2);
        assert_eq!(c.on_counted(), Ok(()));
        assert_eq!(
            c.on_counted(),
            Err(Error::CreditViolation {
                received: 2,
                announced: 1
            })
        );
        assert_eq!(c.on_returned(0), Ok(()));
        assert_eq!(c.on_returned(1), Err(Error::CreditOverflow));
    }
}
