//! `sanpath_provider_stats`: the provider's counters for a C caller
//! (monitoring a provider that holds thousands of connections).

use crate::abi::{catch, ret_int};
use crate::global;
use crate::win::*;
use sanpath::WsaError;

/// What `sanpath_provider_stats` fills: a snapshot of the process's
/// provider (see the engine's `ProviderStats`; fields read while ops
/// complete may disagree by the ops completing meanwhile). Every field is
/// 64 bits, so the layout is the same on every 64-bit target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SanpathStats {
    /// Live (not closed) sockets: the sum of the five states below.
    pub sockets: u64,
    /// Created, not bound.
    pub sockets_open: u64,
    /// Bound, not listening or connecting.
    pub sockets_bound: u64,
    pub sockets_listening: u64,
    pub sockets_connecting: u64,
    pub sockets_connected: u64,
    /// Closed by the switch, `WPUCloseSocketHandle` not called yet.
    pub sockets_closing: u64,
    /// Overlapped ops pending.
    pub ops_in_flight: u64,
    /// Overlapped ops started.
    pub ops_started: u64,
    /// Ops completed with success.
    pub completed_ok: u64,
    /// Ops completed `WSA_OPERATION_ABORTED` (local close).
    pub completed_aborted: u64,
    /// Ops completed `WSAECONNRESET` (the peer's teardown).
    pub completed_reset: u64,
    /// Ops completed with another error.
    pub completed_failed: u64,
    /// Closes finished later, by the completion of their last op.
    pub deferred_closes: u64,
    /// Memory registrations live.
    pub registrations: u64,
    /// Bytes those registrations cover.
    pub registered_bytes: u64,
}

impl From<sanpath::spi::ProviderStats> for SanpathStats {
    fn from(s: sanpath::spi::ProviderStats) -> SanpathStats {
        let n = |v: usize| v as u64;
        SanpathStats {
            sockets: n(s.sockets),
            sockets_open: n(s.sockets_open),
            sockets_bound: n(s.sockets_bound),
            sockets_listening: n(s.sockets_listening),
            sockets_connecting: n(s.sockets_connecting),
            sockets_connected: n(s.sockets_connected),
            sockets_closing: n(s.sockets_closing),
            ops_in_flight: n(s.ops_in_use),
            ops_started: s.ops_started,
            completed_ok: s.completed_ok,
            completed_aborted: s.completed_aborted,
            completed_reset: s.completed_reset,
            completed_failed: s.completed_failed,
            deferred_closes: s.deferred_closes,
            registrations: n(s.registrations),
            registered_bytes: s.registered_bytes,
        }
    }
}

/// Fills `*out` with the provider's counters and returns 0. Fails
/// `SOCKET_ERROR` with `*lpErrno` = `WSANOTINITIALISED` before the first
/// `WSPStartupEx`, `WSAEFAULT` if `out` is NULL. Works after the last
/// `WSPCleanup` too (then every socket and op count is 0). Walks the
/// provider's socket table: for monitoring, not for every op.
///
/// # Safety
/// `out` is NULL or points to a writable `SanpathStats` (any alignment);
/// `lp_errno` as `lpErrno` of the `WSP*` functions.
#[no_mangle]
pub unsafe extern "system" fn sanpath_provider_stats(
    out: *mut SanpathStats,
    lp_errno: *mut INT,
) -> INT {
    let r = catch(|| {
        let p = global::provider()?;
        if out.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        let s = SanpathStats::from(p.stats());
        // SAFETY: non-NULL and writable by the caller's contract; unaligned
        // write, so any alignment is fine.
        unsafe { out.write_unaligned(s) };
        Ok(0)
    });
    // SAFETY: forwarded contract.
    unsafe { ret_int(lp_errno, r) }
}
