//! A test hook of a connection end (unit tests only): holds its poller
//! after it took a message, before it publishes the consumed index, and
//! tells when a break waits for a `busy` word.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a held poller waits for the test to release it.
const HOLD_MAX: Duration = Duration::from_secs(30);

#[derive(Default)]
struct State {
    armed: bool,
    held: bool,
    released: bool,
    break_waited: bool,
}

#[derive(Default)]
pub(super) struct Hook {
    state: Mutex<State>,
    changed: Condvar,
}

impl Hook {
    fn wait(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !done(&s) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Holds the poller after the next message it takes.
    pub(super) fn hold_after_next_message(&self) {
        self.update(|s| s.armed = true);
    }

    pub(super) fn wait_held(&self, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.held)
    }

    /// Whether a break waited for a `busy` word (or [`Hook::note_break`]).
    pub(super) fn wait_break(&self, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.break_waited)
    }

    pub(super) fn release(&self) {
        self.update(|s| s.released = true);
    }

    pub(super) fn took(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !s.armed {
            return;
        }
        s.armed = false;
        s.held = true;
        self.changed.notify_all();
        drop(s);
        // Bounded: a test that failed before releasing must not leave its
        // poller held for ever.
        assert!(
            self.wait(HOLD_MAX, |s| s.released),
            "the test never released the held poller"
        );
    }

    /// A break waits for a `busy` word, or returned.
    pub(super) fn note_break(&self) {
        self.update(|s| s.break_waited = true);
    }
}
