//! A connection's state lock with its inbox: a mutex that the threads which
//! may not wait for it (the upcalls: the holder may be their own caller
//! further up the stack) never wait for. Such a thread delivers its item
//! instead ([`InboxLock::deliver`]): it takes the state if it is free, else
//! leaves the item in the inbox, where the holder takes it before it lets
//! go ([`InboxLock::pop`]), or looks again just after ([`InboxLock::look`]).
//!
//! # Protocol
//!
//! The inbox is a queue under a mutex of its own, with its length in an
//! atomic (`len`) that the state's holder and the looks read without that
//! mutex. A thread that finds the state locked pushes its item, then looks;
//! a holder, once it unlocked, looks. A look is a `SeqCst` fence, a load of
//! `len`, and, if that is not 0, a `try_lock` of the state: Dekker's
//! pattern between the pusher (store `len`, fence, read the state's lock
//! word) and the holder (write the lock word, fence, load `len`). Of the
//! two fences in their single total order, if the pusher's comes first the
//! holder's load sees the item; if the holder's does, the pusher's
//! `try_lock` sees the unlock, or a later lock, whose holder looks in turn
//! after its own unlock. Either way some thread takes the state with the
//! item in the inbox and pops it: no item stays in the inbox while nobody
//! holds the state, and since only holders pop, each is popped once. Both
//! fences are needed, and neither can be weaker: a release or acquire fence
//! orders nothing between a store and a later load (the loom models below
//! fail with either fence left out, or both made `Release`, `Acquire` or
//! `AcqRel`).
//!
//! A thread that takes the state and finds the inbox empty keeps its item
//! ([`InboxLock::deliver`] gives it back) and feeds it at once, as if it had
//! passed through: items delivered one after the other (each delivery
//! happens before the next, as a completion queue's completions are
//! dispatched one by one by whichever thread holds its drain) are popped
//! or given back in delivery order.
//!
//! # Contract
//!
//! A holder ([`Held`]) pops the inbox until [`InboxLock::pop`] gives none
//! before it unlocks, and looks after it unlocked (and, if the look gives it the state, does
//! both again). The exception is a holder from [`InboxLock::try_lock`] that
//! only reads the state: it need not pop or look if its thread takes the
//! state by [`InboxLock::lock`] and follows the contract afterwards (an item
//! delivered meanwhile waits only until then).

use crate::sync::{fence, AtomicUsize, Mutex, MutexGuard, Ordering};
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{PoisonError, TryLockError};

/// A state `S` under a lock, and the inbox of items `T` delivered while the
/// state was held (module docs).
pub(super) struct InboxLock<S, T> {
    /// The state. Whoever holds it follows the contract (module docs): it
    /// alone pops `q`, and it looks after it unlocks.
    state: Mutex<S>,
    /// The items delivered while the state was held, in delivery order:
    /// pushed by a thread whose `try_lock` of the state failed, or queued
    /// by the holder behind the items already there; popped only by the
    /// state's holder. It never grows past the capacity it was made with
    /// (the caller's bound on items in flight): no delivery allocates.
    q: Mutex<VecDeque<T>>,
    /// `q.len()`, stored under `q`'s lock at each change (Release); read
    /// without it:
    /// - by the holder before it pops ([`InboxLock::pop`]): a stale 0 only
    ///   leaves the item to the look after the unlock;
    /// - by a look ([`InboxLock::look`]), after a `SeqCst` fence that pairs
    ///   with the other side's (module docs, Protocol);
    /// - by a delivering thread that took the state, to keep its item when
    ///   nothing waits ([`InboxLock::deliver`]): the earlier deliveries it
    ///   must queue behind happened before this load, which sees their
    ///   stores (or the pops after them).
    len: AtomicUsize,
}

/// The state of an [`InboxLock`], locked: what shows [`InboxLock::pop`]
/// that its caller holds the state (checked in debug builds).
pub(super) struct Held<'a, S>(MutexGuard<'a, S>);

impl<S> Deref for Held<'_, S> {
    type Target = S;
    #[inline(always)]
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<S> DerefMut for Held<'_, S> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0
    }
}

impl<S, T> InboxLock<S, T> {
    /// `state`, unlocked, with an empty inbox that holds up to `capacity`
    /// items without allocating.
    pub(super) fn new(capacity: usize, state: S) -> InboxLock<S, T> {
        InboxLock {
            state: Mutex::new(state),
            q: Mutex::new(VecDeque::with_capacity(capacity)),
            len: AtomicUsize::new(0),
        }
    }

    /// The state, once no other thread holds it (poisoning ignored, as by
    /// the switch's other locks).
    #[inline]
    pub(super) fn lock(&self) -> Held<'_, S> {
        Held(self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The state, if no other thread holds it; for a holder that only reads
    /// it (module docs, Contract).
    #[inline]
    pub(super) fn try_lock(&self) -> Option<Held<'_, S>> {
        match self.state.try_lock() {
            Ok(st) => Some(Held(st)),
            Err(TryLockError::Poisoned(p)) => Some(Held(p.into_inner())),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Delivers `item` without waiting for the state. If the state is free,
    /// this thread takes it, with `item` given back if nothing waits in the
    /// inbox (the caller feeds it at once), else queued behind what waits
    /// (`None`: the caller pops it). If another thread holds the state, the
    /// item goes into the inbox and this thread looks
    /// ([`InboxLock::look`]): it gets the state (with `None`) only if the
    /// holder let go meanwhile; if not, the holder pops the item.
    #[inline]
    pub(super) fn deliver(&self, item: T) -> Option<(Held<'_, S>, Option<T>)> {
        let st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.push(item);
                return self.look().map(|st| (st, None));
            }
        };
        Some((Held(st), self.queue_behind(item)))
    }

    /// The oldest item in the inbox, if `len` says there is one; for the
    /// state's holder (`holder`), before it unlocks.
    #[inline]
    pub(super) fn pop(&self, holder: &Held<'_, S>) -> Option<T> {
        debug_assert!(self.holds(holder), "a pop without holding the state");
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut q = self.inbox();
        let item = q.pop_front();
        self.len.store(q.len(), Ordering::Release);
        item
    }

    /// The look of a thread that just unlocked the state, or pushed an item
    /// while another thread held it: the state, if an item waits in the
    /// inbox and no other thread holds it (one that does looks after its
    /// unlock). The fence is the one the protocol pairs (module docs).
    #[inline]
    pub(super) fn look(&self) -> Option<Held<'_, S>> {
        fence(Ordering::SeqCst);
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.try_lock()
    }

    /// Enters `item` in the inbox (the state was found held).
    fn push(&self, item: T) {
        let mut q = self.inbox();
        debug_assert!(q.len() < q.capacity(), "inbox over its capacity");
        q.push_back(item);
        self.len.store(q.len(), Ordering::Release);
    }

    /// `item`, delivered by the state's holder: queued behind the items in
    /// the inbox, if any; else given back.
    fn queue_behind(&self, item: T) -> Option<T> {
        if self.len.load(Ordering::Acquire) == 0 {
            return Some(item);
        }
        let mut q = self.inbox();
        if q.is_empty() {
            return Some(item);
        }
        debug_assert!(q.len() < q.capacity(), "inbox over its capacity");
        q.push_back(item);
        self.len.store(q.len(), Ordering::Release);
        None
    }

    /// Whether `st` is a guard of this lock: the state it reaches lies
    /// inside `state`.
    fn holds(&self, st: &Held<'_, S>) -> bool {
        let at = std::ptr::from_ref::<S>(st) as usize;
        let lock = std::ptr::from_ref(&self.state) as usize;
        (lock..lock + std::mem::size_of::<Mutex<S>>()).contains(&at)
    }

    fn inbox(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.q.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Items in the inbox; `len` agrees once the deliveries are over.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let q = self.inbox();
        assert_eq!(self.len.load(Ordering::Relaxed), q.len(), "len is q.len()");
        q.len()
    }
}

/// The caller's side of the contract, as `Conn` runs it, for the tests: a
/// holder pops and feeds (here: records) every waiting item, unlocks and
/// looks, until a look finds nothing; a delivery feeds its item if it is
/// given back, then does the same.
#[cfg(test)]
mod contract {
    use super::{Held, InboxLock};

    /// Items are numbers; feeding one records it in the state.
    pub(super) type Fed = InboxLock<Vec<u32>, u32>;

    /// `Conn::settle`'s part: pops and feeds until the inbox is empty,
    /// unlocks, looks; again while a look gives the state.
    pub(super) fn settle<'a>(l: &'a Fed, mut st: Held<'a, Vec<u32>>) {
        loop {
            while let Some(item) = l.pop(&st) {
                st.push(item);
            }
            drop(st);
            match l.look() {
                Some(again) => st = again,
                None => return,
            }
        }
    }

    /// `Conn::on_completion`'s part: delivers `item`, feeds it if it is
    /// given back, and settles if this thread got the state.
    pub(super) fn deliver(l: &Fed, item: u32) {
        if let Some((mut st, now)) = l.deliver(item) {
            if let Some(item) = now {
                st.push(item);
            }
            settle(l, st);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::contract::{self, Fed};

    #[test]
    fn a_delivery_to_a_free_state_is_given_back_with_it() {
        let l = Fed::new(4, Vec::new());
        let (st, now) = l.deliver(7).expect("the state is free");
        assert_eq!(now, Some(7));
        drop(st);
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn deliveries_while_held_wait_in_order_for_the_holder() {
        let l = Fed::new(4, Vec::new());
        let mut st = l.lock();
        assert!(l.deliver(1).is_none(), "held: the item waits");
        assert!(l.deliver(2).is_none());
        assert_eq!(l.waiting(), 2);
        assert_eq!(l.pop(&st), Some(1));
        assert_eq!(l.pop(&st), Some(2));
        assert_eq!(l.pop(&st), None);
        st.push(0);
        drop(st);
        assert!(l.look().is_none(), "nothing waits");
    }

    /// An item delivered after the holder's last pop is taken by its look
    /// after the unlock (the delivery's own look failed: the state was
    /// held).
    #[test]
    fn the_look_after_an_unlock_takes_what_came_after_the_last_pop() {
        let l = Fed::new(4, Vec::new());
        let st = l.lock();
        assert_eq!(l.pop(&st), None);
        assert!(l.deliver(3).is_none());
        drop(st);
        let st = l.look().expect("an item waits and the state is free");
        assert_eq!(l.pop(&st), Some(3));
    }

    /// A delivery that takes the state while an earlier item waits queues
    /// behind it, and the settle feeds both in delivery order.
    #[test]
    fn a_delivery_that_takes_the_state_queues_behind_what_waits() {
        let l = Fed::new(4, Vec::new());
        let st = l.lock();
        assert!(l.deliver(1).is_none());
        // The holder let go without its look (a reader by `try_lock`).
        drop(st);
        let (st, now) = l.deliver(2).expect("the state is free");
        assert_eq!(now, None, "queued behind 1");
        contract::settle(&l, st);
        assert_eq!(*l.lock(), [1, 2]);
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "a pop without holding the state")]
    fn a_pop_with_another_locks_guard_is_caught() {
        let (a, b) = (Fed::new(1, Vec::new()), Fed::new(1, Vec::new()));
        let st = b.lock();
        let _ = a.pop(&st);
    }

    #[test]
    fn a_settle_feeds_what_was_delivered_from_another_thread() {
        let l = std::sync::Arc::new(Fed::new(64, Vec::new()));
        let pusher = {
            let l = l.clone();
            std::thread::spawn(move || (0..64).for_each(|i| contract::deliver(&l, i)))
        };
        for _ in 0..64 {
            contract::settle(&l, l.lock());
        }
        pusher.join().unwrap();
        assert_eq!(l.waiting(), 0, "nothing stranded");
        assert_eq!(
            *l.lock(),
            (0..64).collect::<Vec<_>>(),
            "each once, in order"
        );
    }
}

/// loom models of the protocol: every delivered item is fed exactly once
/// (in delivery order, for the deliveries of one thread), and none is left
/// in the inbox once the threads are done.
///
/// An item is the completion of a request that an application call posted
/// while it held the state; a thread of upcalls (a completion queue's
/// drain) delivers it only once it sees the request posted. The call posts
/// two requests, popping the inbox after each, as the rounds of a settle
/// run the actions that the completions fed before produced. That second
/// post is what lets loom run an upcall between the call's pop and its
/// unlock: loom does not count a mutex's unlock as an event of its own,
/// so it would try an upcall only before or after the call's lock, never
/// at a `try_lock` that fails for a holder that already popped.
///
/// Each model fails (an item stranded) with the pusher's fence left out,
/// the holder's left out, both made `Release`, `Acquire` or `AcqRel`, or
/// the pusher's look left out; the one-drain model also (items fed out of
/// order) with a delivery that takes the state not queueing behind the
/// waiting items. What loom cannot check: its mutex never shows a thread a
/// stale lock word, so the holder's fence is checked only for its own
/// load of `len`, not for the pusher's `try_lock` reading the unlock.
#[cfg(all(test, loom))]
mod loom_models {
    use super::contract::{self, Fed};
    use super::*;
    use crate::sync::{thread, Arc};

    /// Requests the call posts.
    const REQUESTS: u32 = 2;

    /// A connection: its state lock, and the last request its call posted.
    struct Conn {
        l: Fed,
        posted: AtomicUsize,
    }

    impl Conn {
        fn new() -> Arc<Conn> {
            Arc::new(Conn {
                l: Fed::new(REQUESTS as usize, Vec::new()),
                posted: AtomicUsize::new(0),
            })
        }

        /// The application call: takes the state, posts the requests, the
        /// inbox popped after each, then settles.
        fn call(&self) {
            let mut st = self.l.lock();
            for r in 1..=REQUESTS {
                self.posted.store(r as usize, Ordering::Release);
                while let Some(item) = self.l.pop(&st) {
                    st.push(item);
                }
            }
            contract::settle(&self.l, st);
        }

        /// The upcall of request `r`, if it was posted; whether it was.
        fn upcall(&self, r: u32) -> bool {
            if self.posted.load(Ordering::Acquire) < r as usize {
                return false;
            }
            contract::deliver(&self.l, r);
            true
        }

        /// Once the threads are done: what was fed, in order; nothing is
        /// left in the inbox.
        fn fed(&self) -> Vec<u32> {
            assert_eq!(self.l.waiting(), 0, "an item stranded in the inbox");
            self.l.lock().clone()
        }
    }

    /// One drain delivers the completions of both requests, in order,
    /// against the call.
    #[test]
    fn loom_inbox_a_drain_against_a_call() {
        crate::sync::model("inbox_drain_against_call", 5, || {
            let c = Conn::new();
            let drain = {
                let c = c.clone();
                thread::spawn(move || (1..=REQUESTS).filter(|&r| c.upcall(r)).collect::<Vec<_>>())
            };
            c.call();
            let delivered = drain.join().unwrap();
            assert_eq!(c.fed(), delivered, "each item fed once, in delivery order");
        });
    }

    /// Two drains, one per request, against the call: both may push while
    /// the call holds the state, or one take it while the other pushes.
    #[test]
    fn loom_inbox_two_drains_against_a_call() {
        crate::sync::model("inbox_two_drains_against_call", 4, || {
            let c = Conn::new();
            let drains: Vec<_> = (1..=REQUESTS)
                .map(|r| {
                    let c = c.clone();
                    thread::spawn(move || c.upcall(r).then_some(r))
                })
                .collect();
            c.call();
            let delivered: Vec<u32> = drains
                .into_iter()
                .filter_map(|d| d.join().unwrap())
                .collect();
            let mut fed = c.fed();
            fed.sort_unstable();
            assert_eq!(fed, delivered, "each item fed once");
        });
    }
}
