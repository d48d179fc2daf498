//! What a provider holds and has done: [`Provider::stats`].
//!
//! Nothing here costs the data path: the counters count only cold events
//! (ops that failed, posts the fabric refused, sockets published, closes
//! deferred, final upcalls), and the rest is derived when asked: ops
//! started from the op slab's generations, ops that succeeded as started
//! minus pending minus failed, sockets by state by walking the table.

use super::socket::Phase;
use super::{Inner, Provider};
use crate::error::WsaError;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a provider's counters (tests, benchmarks, `sanbench
/// --stats`, the C function `sanpath_provider_stats`). Read without
/// stopping the provider: fields taken while ops complete may disagree by
/// the ops completing meanwhile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProviderStats {
    /// Op slots in use (pending ops).
    pub ops_in_use: usize,
    /// Live (not closed) sockets: the sum of the five states below.
    pub sockets: usize,
    /// Sockets created, not bound.
    pub sockets_open: usize,
    /// Bound, not listening or connecting.
    pub sockets_bound: usize,
    pub sockets_listening: usize,
    pub sockets_connecting: usize,
    pub sockets_connected: usize,
    /// Closed by the switch, their last upcall (`close_socket_handle`) not
    /// made yet: ops still coming back, or a close deferred.
    pub sockets_closing: usize,
    /// Ops started (posted to the fabric).
    pub ops_started: u64,
    /// Ops completed with success.
    pub completed_ok: u64,
    /// Ops completed `WSA_OPERATION_ABORTED` (local close).
    pub completed_aborted: u64,
    /// Ops completed `WSAECONNRESET` (the peer's teardown).
    pub completed_reset: u64,
    /// Ops completed with any other error (`WSAECONNABORTED`, ...).
    pub completed_failed: u64,
    /// Closes whose last steps were left to the completion of their
    /// last op (called from an upcall, or ops still pending at the
    /// quiesce timeout).
    pub deferred_closes: u64,
    /// Memory registrations live (NIC registrations held by sockets).
    pub registrations: usize,
    /// Bytes those registrations cover.
    pub registered_bytes: u64,
}

impl ProviderStats {
    /// Whether the provider holds nothing: no socket (live or closing), no
    /// pending op, no registration. The totals (ops started, completions,
    /// deferred closes) only grow and do not count.
    pub fn holds_nothing(&self) -> bool {
        self.sockets == 0
            && self.sockets_closing == 0
            && self.ops_in_use == 0
            && self.registrations == 0
            && self.registered_bytes == 0
    }
}

/// The cold-path counters a provider keeps. Each is written with relaxed
/// adds by whichever thread sees the event and read only by
/// [`Provider::stats`]; they only grow.
#[derive(Default)]
pub(super) struct Counters {
    /// Sockets published in the table (`socket`, `accept`).
    published: AtomicU64,
    /// Sockets whose last upcall was made (`finalize`).
    finalized: AtomicU64,
    deferred: AtomicU64,
    /// Reservations the fabric refused to post (never started).
    refused: AtomicU64,
    aborted: AtomicU64,
    reset: AtomicU64,
    failed: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(super) fn published(&self) {
        bump(&self.published);
    }
    pub(super) fn finalized(&self) {
        bump(&self.finalized);
    }
    pub(super) fn deferred(&self) {
        bump(&self.deferred);
    }
    pub(super) fn refused(&self) {
        bump(&self.refused);
    }

    /// An op completed with Winsock error `code` (not 0).
    #[cold]
    pub(super) fn failed(&self, code: u32) {
        let c = if code == WsaError::WSA_OPERATION_ABORTED.code() as u32 {
            &self.aborted
        } else if code == WsaError::WSAECONNRESET.code() as u32 {
            &self.reset
        } else {
            &self.failed
        };
        bump(c);
    }
}

impl Provider {
    /// The provider's counters now (walks the socket table and the op
    /// slab: for monitoring, not for every op).
    pub fn stats(&self) -> ProviderStats {
        let inner: &Inner = &self.inner;
        let c = &inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = ProviderStats::default();
        for sock in inner.sockets.all() {
            let phase = sock.ctl().phase;
            *match phase {
                Phase::Open => &mut s.sockets_open,
                Phase::Bound => &mut s.sockets_bound,
                Phase::Listening => &mut s.sockets_listening,
                Phase::Connecting => &mut s.sockets_connecting,
                Phase::Connected => &mut s.sockets_connected,
            } += 1;
            s.sockets += 1;
        }
        let gone = load(&c.finalized) as usize + s.sockets;
        s.sockets_closing = (load(&c.published) as usize).saturating_sub(gone);
        s.ops_in_use = inner.ops.in_use();
        s.ops_started = inner.ops.reserved_total().saturating_sub(load(&c.refused));
        s.completed_aborted = load(&c.aborted);
        s.completed_reset = load(&c.reset);
        s.completed_failed = load(&c.failed);
        s.completed_ok = s.ops_started.saturating_sub(
            s.ops_in_use as u64 + s.completed_aborted + s.completed_reset + s.completed_failed,
        );
        s.deferred_closes = load(&c.deferred);
        let t = inner.table.stats();
        s.registrations = t.live_entries;
        s.registered_bytes = t.registered_bytes;
        s
    }
}
