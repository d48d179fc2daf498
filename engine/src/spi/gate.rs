//! The close gate of a socket: how `close_socket`, the data calls starting
//! ops and the threads completing them agree on when a socket's last op is
//! over and its teardown may finish (spec §6.1 steps 3-5).
//!
//! # Protocol
//!
//! - A data call **enters** before it posts: one atomic add on its socket's
//!   descriptor-table slot, which is also its lookup of the socket
//!   (`SocketTable::enter`). A removed socket refuses it.
//! - Close **removes** the socket from the table (later calls are refused)
//!   and **shuts** this gate (the flag completions read) before it forces
//!   the socket's outstanding work requests to complete (queue pair to
//!   error).
//! - A posted op **leaves** after its completion was signalled to the
//!   switch; the call that posted it leaves when its post returned (or at
//!   once, if it posted nothing).
//! - Close then waits (bounded) until the gate's count is 0 and
//!   **finalizes** (makes the close-handle upcall).
//!   If it cannot wait — the bound passed, or it runs on the thread that
//!   must dispatch the completions — it **defers**: whoever brings the
//!   count to 0 with the deferral set finalizes, be it the last op or call
//!   leaving or close itself when nothing is in flight. An op the front end
//!   completes itself after a NIC did not flush (`close.rs`) leaves like
//!   any other.
//!
//! # One word
//!
//! The gate's count and its deferral and finalization flags live in the
//! word of the socket's table slot, beside the slot's life state and pins
//! (`socket.rs`), and every transition is a single read-modify-write that
//! returns the word as it was. All read-modify-writes of one location are
//! totally ordered, so an entering call and a removing close cannot miss
//! each other — whichever comes second sees the first — without the
//! `SeqCst` store-then-load pattern (Dekker) of separate flags, and a leave
//! and a deferral cannot both believe they came last. The lookup of the
//! socket and the entry are one atomic instruction, and so is a leave.
//!
//! What stays here, in the socket, is what outlives its table slot (which
//! goes to the next socket once this one is released): whether it was shut
//! (read by completions and by connection events that hold the socket) and
//! whether it was finalized (read by the closer's list of deferred closes).
//!
//! The loom models of `socket.rs` check the protocol for every interleaving
//! of calls entering, ops completing and closes (`RUSTFLAGS="--cfg loom"
//! cargo test -p sanpath --lib --release loom_`).

use crate::sync::{AtomicUsize, Ordering};

/// Set by close (or cleanup), never cleared: calls that see it are
/// refused; completions dispatched after it report `WSA_OPERATION_ABORTED`.
const CLOSING: usize = 1;
/// The socket was finalized (its close-handle upcall made). Never cleared.
const FINALIZED: usize = 2;

/// The flags of a socket's close gate that outlive its table slot (see the
/// module docs).
#[derive(Debug, Default)]
pub struct CloseGate {
    /// `CLOSING | FINALIZED`, each set once by a read-modify-write.
    state: AtomicUsize,
}

impl CloseGate {
    /// Shuts the gate: later calls are refused. Idempotent.
    pub fn shut(&self) {
        self.state.fetch_or(CLOSING, Ordering::AcqRel);
    }

    /// Whether the gate was shut.
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSING != 0
    }

    /// Records that the socket was finalized (by the one thread that
    /// claimed it on the table slot).
    pub fn set_finalized(&self) {
        self.state.fetch_or(FINALIZED, Ordering::Release);
    }

    /// Whether the socket was finalized.
    pub fn is_finalized(&self) -> bool {
        self.state.load(Ordering::Acquire) & FINALIZED != 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_set_once_and_stay() {
        let g = CloseGate::default();
        assert!(!g.is_closing() && !g.is_finalized());
        g.shut();
        g.shut();
        assert!(g.is_closing() && !g.is_finalized());
        g.set_finalized();
        assert!(g.is_closing() && g.is_finalized());
    }
}
