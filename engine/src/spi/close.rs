//! Close (spec §6.1): `WSPCloseSocket` and the last steps of a socket.
//!
//! Remove the descriptor → shut the gate (`gate.rs`) → cancel a pending
//! connect, close a listener, move the queue pair to error so the fabric
//! flushes every posted request → wait (bounded) until every op came back
//! and was completed with `WSA_OPERATION_ABORTED`, its memory freed first →
//! [`Inner::finalize`]: release the registrations, then `close_socket_handle`,
//! the socket's last upcall. Whoever sees the gate go quiet last (the close,
//! or the dispatch of the last op) finalizes, exactly once.

use super::dispatch::DISPATCHING;
use super::socket::Socket;
use super::{Inner, Provider, ProviderSocket};
use crate::error::WsaResult;
use std::cell::Cell;
use std::time::Instant;

impl Provider {
    /// `WSPCloseSocket`: abortive, never lingers, returns 0 in every state.
    pub fn close_socket(&self, s: ProviderSocket) -> WsaResult<()> {
        let run = self.inner.running()?;
        let sock = self.inner.sockets.remove(s)?;
        sock.gate.shut();
        let (listener, attempt) = {
            let mut c = sock.ctl();
            c.event = None;
            (c.listener.take(), c.attempt.take())
        };
        if let Some(a) = attempt {
            // If the attempt completed meanwhile, connect_done sees `closing`
            // and tears the new queue pair down itself.
            a.cancel();
        }
        if let Some(l) = listener {
            l.close();
        }
        // The ctl lock orders this read after a concurrent connect_done.
        let qp = {
            let _c = sock.ctl();
            sock.qp.get().cloned()
        };
        if let Some(qp) = qp {
            qp.set_error();
        }
        // A connection its peer is moving (dup.rs): parked receives are
        // aborted here, since no queue pair will flush them.
        self.inner.dup_abort(&sock);
        if DISPATCHING.with(Cell::get) {
            // Called from an upcall on the thread that dispatches: the
            // flushed completions can only be processed after we return.
            self.inner.defer_finalize(&sock);
            return Ok(());
        }
        let deadline = Instant::now() + self.inner.config.close_quiesce_timeout();
        if self
            .inner
            .wait_for(&run, Some(deadline), sock.cq_index(), || {
                sock.gate.is_quiet()
            })
        {
            if sock.gate.claim_finalize() {
                self.inner.finalize(&sock);
            }
        } else {
            self.inner.defer_finalize(&sock);
        }
        Ok(())
    }
}

impl Inner {
    /// An op of `sock` is over (completed, or never started).
    pub(super) fn op_finished(&self, sock: &Socket) {
        let left = sock.gate.leave();
        self.finish_close(sock, left.finalize);
    }

    /// Finalizes `sock` if the gate handed this thread the finalization.
    pub(super) fn finish_close(&self, sock: &Socket, finalize: bool) {
        if finalize {
            self.finalize(sock);
        }
    }

    pub(super) fn defer_finalize(&self, sock: &Socket) {
        let now = sock.gate.defer();
        self.finish_close(sock, now);
    }

    /// Last steps of close, once no op of `sock` is outstanding: release its
    /// registrations, then the final upcall (through the socket's own switch,
    /// so it happens even when the provider was cleaned up meanwhile). Called
    /// exactly once per socket, by whoever claimed it from the gate.
    pub(super) fn finalize(&self, sock: &Socket) {
        self.table.release_owner(&sock.regs);
        let _ = sock.run.switch.close_socket_handle(sock.handle);
        self.completed.notify();
    }
}
