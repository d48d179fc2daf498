//! `WSAEVENT` on Linux: a manual-reset event (spec §0). Set stays set until
//! reset; `wait` returns at once while it is set.

use crate::fabric::Waker;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// A manual-reset event, shared as `Arc<Event>`.
#[derive(Debug, Default)]
pub struct Event {
    /// Signalled state; written under the mutex by `set`/`reset`, read by
    /// waiters under it.
    state: Mutex<EventState>,
    /// Notified (all waiters) on every `set`.
    cond: Condvar,
    /// Also woken by every `set`, after the waiters, if one was given
    /// (`Event::wake_on_set`): a readiness fd that mirrors the event.
    also: OnceLock<Also>,
}

/// The waker an event also wakes.
struct Also(Arc<dyn Waker>);

impl std::fmt::Debug for Also {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Also(..)")
    }
}

#[derive(Debug, Default)]
struct EventState {
    signalled: bool,
    /// Number of `set` calls, counting those on an event already set.
    set_count: u64,
}

impl Event {
    pub fn new() -> Event {
        Event::default()
    }

    /// Signals the event and wakes every waiter.
    pub fn set(&self) {
        let mut s = self.lock();
        s.signalled = true;
        s.set_count += 1;
        drop(s);
        self.cond.notify_all();
        if let Some(Also(w)) = self.also.get() {
            w.wake();
        }
    }

    /// Makes every later `set` also wake `waker` (once per `set`, on the
    /// thread that sets, with no lock held). Only the first call counts;
    /// returns whether it did.
    pub fn wake_on_set(&self, waker: Arc<dyn Waker>) -> bool {
        self.also.set(Also(waker)).is_ok()
    }

    /// Returns the event to the non-signalled state.
    pub fn reset(&self) {
        self.lock().signalled = false;
    }

    pub fn is_set(&self) -> bool {
        self.lock().signalled
    }

    /// How many times `set` was called, also while the event was already
    /// set (for tests that check "signalled exactly once" or "not signalled
    /// again": a signal on a set event changes no state, but is counted).
    pub fn set_count(&self) -> u64 {
        self.lock().set_count
    }

    /// Waits until the event is set or `timeout` passed; returns whether it
    /// is set.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while !s.signalled {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EventState> {
        // The state is a plain flag and counter: a panic elsewhere cannot
        // leave it inconsistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn manual_reset_semantics() {
        let e = Event::new();
        assert!(!e.wait(Duration::from_millis(1)));
        e.set();
        e.set();
        assert!(e.wait(Duration::ZERO));
        assert!(e.wait(Duration::ZERO), "stays set until reset");
        assert_eq!(e.set_count(), 2, "a set on a set event is counted");
        e.reset();
        assert!(!e.is_set());
    }

    #[test]
    fn wakes_a_waiting_thread() {
        let e = Arc::new(Event::new());
        let e2 = e.clone();
        let t = std::thread::spawn(move || e2.wait(Duration::from_secs(10)));
        e.set();
        assert!(t.join().unwrap());
    }
}
