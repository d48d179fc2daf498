//! The close gate of a socket: the count and flags through which `close_socket`,
//! the threads starting ops and the threads completing them agree on when a
//! socket's last op is over and its teardown may finish (spec §6.1 steps
//! 3-5).
//!
//! # Protocol
//!
//! - An op **enters** before it is posted. If the gate is shut it leaves at
//!   once and is never posted.
//! - Close **shuts** the gate before it forces the socket's outstanding
//!   work requests to complete (queue pair to error).
//! - An op **leaves** after its completion was signalled to the switch.
//! - Close then waits (bounded) until no op is in flight and **finalizes**
//!   (makes the close-handle upcall).
//!   If it cannot wait — the bound passed, or it runs on the thread that
//!   must dispatch the completions — it **defers**: whoever brings the
//!   count to 0 with the deferral set finalizes, be it the last op leaving
//!   or close itself when nothing is in flight. An op the front end
//!   completes itself after a NIC did not flush (`close.rs`) leaves like
//!   any other.
//!
//! # One word
//!
//! The count of ops in flight and the three flags share one atomic word,
//! and every transition is a single read-modify-write that returns the word
//! as it was. All read-modify-writes of one location are totally ordered
//! (its modification order), so an entering op and a shutting close cannot
//! miss each other — whichever comes second sees the first — without the
//! `SeqCst` store-then-load pattern (Dekker) of separate flags, and a leave
//! and a deferral cannot both believe they came last. It is also one atomic
//! instruction per enter and per leave on the data path.
//!
//! The loom models at the bottom check the protocol for every interleaving
//! of ops starting and completing against a close (`RUSTFLAGS="--cfg loom"
//! cargo test -p sanpath --lib --release loom_`).

use crate::sync::{AtomicUsize, Ordering};

/// Set by close (or cleanup), never cleared: ops entering after it are
/// refused; completions dispatched after it report `WSA_OPERATION_ABORTED`.
const CLOSING: usize = 1 << (usize::BITS - 1);
/// Close did not wait for the count to reach 0: whoever brings it to 0 (or
/// close, if it already is) finalizes. Never cleared.
const DEFERRED: usize = 1 << (usize::BITS - 2);
/// Finalization was claimed. Never cleared.
const FINALIZED: usize = 1 << (usize::BITS - 3);
/// The low bits: ops entered and not yet left.
const COUNT: usize = FINALIZED - 1;

/// The close gate of one socket (see the module docs).
#[derive(Debug, Default)]
pub struct CloseGate {
    /// `CLOSING | DEFERRED | FINALIZED | count`. Changed only by
    /// read-modify-writes (`AcqRel`): the count goes up in `enter` and down
    /// in `leave`, the flags are set once each. Whoever finalizes saw the
    /// count at 0 through this word, so it acquired every leaving op's
    /// release: the ops' completions happen before the finalization.
    state: AtomicUsize,
}

impl CloseGate {
    /// Enters an op: `Ok` if it may be posted; `Err` if the gate is shut
    /// (the op has then left already, and the caller must finalize if the
    /// returned [`Leave`] says so).
    pub fn enter(&self) -> Result<(), Leave> {
        // SeqCst (free where a read-modify-write fences anyway): a
        // duplication's swap reads the count after a SeqCst store of its
        // flag, which the op loads after entering (`dup.rs`).
        let was = self.state.fetch_add(1, Ordering::SeqCst);
        debug_assert!(was & COUNT < COUNT, "close gate count overflow");
        if was & CLOSING != 0 {
            return Err(self.leave());
        }
        Ok(())
    }

    /// An entered op is over (completed and signalled, or never posted).
    pub fn leave(&self) -> Leave {
        let was = self.state.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(was & COUNT > 0, "close gate left more often than entered");
        Leave {
            finalize: was & COUNT == 1 && was & DEFERRED != 0 && self.claim_finalize(),
        }
    }

    /// Shuts the gate: later `enter`s fail. Idempotent.
    pub fn shut(&self) {
        self.state.fetch_or(CLOSING, Ordering::AcqRel);
    }

    /// Whether the gate was shut.
    pub fn is_closing(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSING != 0
    }

    /// Ops entered and not yet left.
    pub fn in_flight(&self) -> usize {
        self.state.load(Ordering::Acquire) & COUNT
    }

    /// No op is in flight.
    pub fn is_quiet(&self) -> bool {
        self.state.load(Ordering::Acquire) & COUNT == 0
    }

    /// Finalization was claimed (the socket's teardown is done or being
    /// done by its claimer).
    pub fn is_finalized(&self) -> bool {
        self.state.load(Ordering::Acquire) & FINALIZED != 0
    }

    /// Close gives up waiting: the last op to leave finalizes. Returns
    /// `true` if the caller must finalize now (nothing is in flight and
    /// nobody claimed it yet).
    #[must_use]
    pub fn defer(&self) -> bool {
        let was = self.state.fetch_or(DEFERRED, Ordering::AcqRel);
        was & COUNT == 0 && self.claim_finalize()
    }

    /// Claims finalization: `true` for exactly one caller over the gate's
    /// life. Callers claim only once they saw the count at 0 after the gate
    /// was shut, so the claim comes after every op's completion.
    #[must_use]
    pub fn claim_finalize(&self) -> bool {
        self.state.fetch_or(FINALIZED, Ordering::AcqRel) & FINALIZED == 0
    }
}

/// What leaving the gate asks of the caller.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub struct Leave {
    /// The caller took the finalization: it must finalize the socket.
    pub finalize: bool,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn ops_enter_until_shut_and_the_last_leave_after_defer_finalizes() {
        let g = CloseGate::default();
        g.enter().unwrap();
        g.enter().unwrap();
        g.shut();
        assert_eq!(g.enter(), Err(Leave { finalize: false }));
        assert!(!g.defer(), "two ops in flight");
        assert_eq!(g.leave(), Leave { finalize: false });
        assert_eq!(g.leave(), Leave { finalize: true });
        assert!(!g.claim_finalize(), "exactly once");
    }

    #[test]
    fn close_that_waited_claims_once() {
        let g = CloseGate::default();
        g.enter().unwrap();
        g.shut();
        assert_eq!(g.leave(), Leave { finalize: false }, "not deferred");
        assert!(g.is_quiet());
        assert!(g.claim_finalize());
        assert!(!g.defer(), "already finalized");
    }
}

/// loom models: every interleaving of op start, completion and close.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::{Arc, Mutex};
    use loom::thread;

    /// What the switch sees, in order.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Upcall {
        /// Op `n` completed (its memory was freed just before).
        Completed(u32),
        /// The close-handle upcall.
        Closed,
    }

    /// A socket reduced to its gate, the fabric's queue of posted ops and
    /// the switch's log.
    #[derive(Default)]
    struct Model {
        gate: CloseGate,
        /// Posted, not yet completed (the fabric's send queue).
        posted: Mutex<Vec<u32>>,
        /// The switch's view.
        log: Mutex<Vec<Upcall>>,
        /// Op memory live (allocated at start, freed before the completion
        /// upcall).
        live: Mutex<Vec<u32>>,
    }

    impl Model {
        /// `start_op`: enter, then post; refused ops are never posted.
        fn start(&self, op: u32) -> bool {
            match self.gate.enter() {
                Ok(()) => {
                    self.live.lock().unwrap().push(op);
                    self.posted.lock().unwrap().push(op);
                    true
                }
                Err(l) => {
                    self.finish(l);
                    false
                }
            }
        }

        /// One dispatch: take a completed op (if any), free its memory,
        /// signal it, leave.
        fn dispatch_one(&self) -> bool {
            let Some(op) = self.posted.lock().unwrap().pop() else {
                return false;
            };
            self.live.lock().unwrap().retain(|&o| o != op);
            self.log.lock().unwrap().push(Upcall::Completed(op));
            let l = self.gate.leave();
            self.finish(l);
            true
        }

        fn finish(&self, l: Leave) {
            if l.finalize {
                self.finalize();
            }
        }

        fn finalize(&self) {
            assert!(
                self.live.lock().unwrap().is_empty(),
                "finalized while op memory is live"
            );
            self.log.lock().unwrap().push(Upcall::Closed);
        }

        /// `close_socket`: shut, then either one look at `inflight` (a
        /// close whose wait ended at once) or defer.
        fn close(&self, wait: bool) {
            self.gate.shut();
            if wait && self.gate.is_quiet() {
                if self.gate.claim_finalize() {
                    self.finalize();
                }
            } else if self.gate.defer() {
                self.finalize();
            }
        }

        /// After every thread joined: the fabric flushes what is left (a
        /// closed QP completes every posted request), then the checks.
        fn check(&self, started: &[u32]) {
            while self.dispatch_one() {}
            let log = self.log.lock().unwrap().clone();
            let closed: Vec<_> = log.iter().filter(|u| **u == Upcall::Closed).collect();
            assert_eq!(closed.len(), 1, "close-handle upcall exactly once: {log:?}");
            assert_eq!(
                log.last(),
                Some(&Upcall::Closed),
                "close upcall last: {log:?}"
            );
            for op in started {
                let n = log.iter().filter(|u| **u == Upcall::Completed(*op)).count();
                assert_eq!(n, 1, "op {op} completed {n} times: {log:?}");
            }
            assert_eq!(log.len(), started.len() + 1, "{log:?}");
        }
    }

    /// An op starting and completing on one thread races a close that
    /// defers (it runs on the dispatching thread, or its wait timed out).
    #[test]
    fn loom_op_racing_a_deferring_close() {
        crate::sync::model("op_racing_a_deferring_close", 3, || {
            let m = Arc::new(Model::default());
            let m2 = m.clone();
            let t = thread::spawn(move || {
                let started = m2.start(1);
                m2.dispatch_one();
                started
            });
            m.close(false);
            let started = t.join().unwrap();
            m.check(if started { &[1] } else { &[] });
        });
    }

    /// Two ops on two threads, completions dispatched by a third, and a
    /// close that looks once and otherwise defers.
    #[test]
    fn loom_two_ops_dispatcher_and_close() {
        crate::sync::model("two_ops_dispatcher_and_close", 3, || {
            let m = Arc::new(Model::default());
            let (a, b) = (m.clone(), m.clone());
            let ta = thread::spawn(move || a.start(1));
            let tb = thread::spawn(move || {
                let started = b.start(2);
                b.dispatch_one();
                started
            });
            m.close(true);
            let started: Vec<u32> = [(1, ta.join().unwrap()), (2, tb.join().unwrap())]
                .into_iter()
                .filter_map(|(op, s)| s.then_some(op))
                .collect();
            m.check(&started);
        });
    }
}
