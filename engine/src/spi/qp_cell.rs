//! A socket's queue pair: set once when the socket connects, and replaced
//! when the peer of a duplicated connection re-establishes it (`dup.rs`).
//!
//! The data path reads it with one acquire load and gets a plain
//! `&Arc<dyn QueuePair>`, as from a `OnceLock`. That reference stays valid
//! for as long as the cell lives, because no queue pair the cell ever held
//! is dropped before the cell: a replaced one is retired, not freed. A
//! socket's queue pairs are few (one per duplication it went through).

use crate::fabric::QueuePair;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

type Qp = Arc<dyn QueuePair>;

#[derive(Default)]
pub struct QpCell {
    /// The current queue pair: null until the first `set`, then a pointer
    /// into one of the boxes of `all`. Written only under `all`'s lock
    /// (release: the box's contents are visible to whoever loads it); read
    /// by anyone (acquire).
    current: AtomicPtr<Qp>,
    /// Every queue pair the cell was given, boxed so that its address does
    /// not move when the vector grows. Only appended to, under the lock;
    /// dropped with the cell.
    #[allow(clippy::vec_box)] // the boxes' fixed addresses are the point
    all: Mutex<Vec<Box<Qp>>>,
}

impl QpCell {
    /// The current queue pair, if any.
    #[inline]
    pub fn get(&self) -> Option<&Qp> {
        let p = self.current.load(Ordering::Acquire);
        // SAFETY: a non-null `current` points into a box of `all`, which
        // is neither freed nor mutated before the cell is dropped, and the
        // acquire load pairs with the release store that published it.
        unsafe { p.as_ref() }
    }

    /// Sets the first queue pair; `Err` (giving it back) if one is set.
    pub fn set(&self, qp: Qp) -> Result<(), Qp> {
        let mut all = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.current.load(Ordering::Relaxed).is_null() {
            return Err(qp);
        }
        Self::publish(&self.current, &mut all, qp);
        Ok(())
    }

    /// Makes `qp` the current queue pair; the previous one stays alive (and
    /// reachable through references taken before) until the cell is dropped.
    pub fn replace(&self, qp: Qp) {
        let mut all = self.all.lock().unwrap_or_else(PoisonError::into_inner);
        Self::publish(&self.current, &mut all, qp);
    }

    #[allow(clippy::vec_box)] // see `all`
    fn publish(current: &AtomicPtr<Qp>, all: &mut Vec<Box<Qp>>, qp: Qp) {
        let mut boxed = Box::new(qp);
        let p: *mut Qp = &mut *boxed;
        all.push(boxed);
        current.store(p, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::{PostError, QpNum, RecvWr, SendWr};
    use std::net::SocketAddrV4;

    struct Fake(u32);

    impl QueuePair for Fake {
        fn num(&self) -> QpNum {
            QpNum(self.0)
        }
        fn local_addr(&self) -> SocketAddrV4 {
            SocketAddrV4::new([0; 4].into(), 0)
        }
        fn peer_addr(&self) -> SocketAddrV4 {
            SocketAddrV4::new([0; 4].into(), 0)
        }
        fn post_send(&self, _: &SendWr<'_>) -> Result<(), PostError> {
            Ok(())
        }
        fn post_recv(&self, _: &RecvWr<'_>) -> Result<(), PostError> {
            Ok(())
        }
        fn set_error(&self) {}
        fn abandon(&self) {}
    }

    #[test]
    fn a_reference_to_a_replaced_queue_pair_stays_valid() {
        let cell = QpCell::default();
        assert!(cell.get().is_none());
        assert!(cell.set(Arc::new(Fake(1))).is_ok());
        assert!(cell.set(Arc::new(Fake(2))).is_err(), "set twice");
        let first = cell.get().unwrap();
        cell.replace(Arc::new(Fake(3)));
        assert_eq!(first.num(), QpNum(1), "retired, not freed");
        assert_eq!(cell.get().unwrap().num(), QpNum(3));
    }
}
