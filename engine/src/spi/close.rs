//! Close (spec §6.1): `WSPCloseSocket` and the last steps of a socket.
//!
//! Remove the descriptor → shut the gate (`gate.rs`) → cancel a pending
//! connect, close a listener → revoke the socket's remote keys (§6.1 step
//! 1: from here on the peer's RDMA into its exposed regions fails, CLOSE-10)
//! → move the queue pair to error so the fabric flushes every posted
//! request → wait, at most `close.wait_ms`, until every op came back and was
//! completed with `WSA_OPERATION_ABORTED`, its memory freed first →
//! [`Inner::finalize`]: `close_socket_handle`, the socket's last upcall.
//! Whoever sees the gate go quiet last (the close, or the dispatch of the
//! last op) finalizes, exactly once.
//!
//! # A close that outlives `close_socket`
//!
//! If the flushes do not all come back within `close.wait_ms` (or the close
//! runs inside an upcall, on the thread that must dispatch them), the close
//! returns 0 anyway and **defers**: the socket goes on the engine's
//! [`Closer`] list, and the dispatch of its last op finalizes it. A NIC
//! that never flushes must not leave those ops (and the close-handle upcall)
//! hanging, so the closer thread waits for them at most
//! `close.quiesce_timeout_ms` after the close and then ends the close
//! itself ([`Inner::force_close`]):
//!
//! 1. [`QueuePair::abandon`]: once it returned the NIC touches none of the
//!    memory any request of the queue pair named, and never will (the soft
//!    NIC refuses to execute on a sealed link; verbs destroys the queue
//!    pair, after which the device does no DMA for it). Only then is it
//!    safe to release an op's memory and report the op.
//! 2. Every op of the socket still in the op slab is taken out of it
//!    ([`OpSlab::take_owned`]) and completed as the dispatch of a flush
//!    would: its memory freed, then `WSA_OPERATION_ABORTED`. A completion
//!    the NIC delivers later for such an op finds its slot taken and is
//!    dropped, so each op completes exactly once.
//! 3. An op caught between the gate and its post when the queue pair was
//!    abandoned is not in the slab yet; its post completes `Flushed` in
//!    software (abandoned queue pairs take posts that way), or, if the scan
//!    took it already, the post finds it taken and reports it started. The
//!    closer looks again [`FORCE_AGAIN`] later until the socket finalized.
//!
//! The last `WSPCleanup` closes every socket without waiting, then ends
//! every deferred close the same way ([`Inner::end_deferred_closes`]), so no
//! socket loses its close-handle upcall and cleanup is bounded by
//! `close.quiesce_timeout_ms`.
//!
//! [`QueuePair::abandon`]: crate::fabric::QueuePair::abandon
//! [`OpSlab::take_owned`]: super::ops::OpSlab::take_owned

use super::dispatch::{as_dispatch, dispatching};
use super::socket::{Entry, OpSocket, Socket};
use super::{lock, Inner, Provider, ProviderSocket, Running};
use crate::error::WsaResult;
use crate::fabric::WcStatus;
use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long after forcing a close the closer looks at it again, should an
/// op have been between the gate and its post (module docs, step 3).
const FORCE_AGAIN: Duration = Duration::from_millis(10);

/// The op-slab owner of `sock`'s ops: the socket's address, unique while
/// any op of it is pending (an op in the close gate keeps the socket).
pub(super) fn owner_tag(sock: &Socket) -> usize {
    sock as *const Socket as usize
}

/// A data call inside its socket's close gate (`Inner::enter`): its op's
/// unit and a pin. Dropped, it gives both back (it posted nothing);
/// [`Call::posted`] gives back the pin and leaves the op's unit to the op.
/// Whoever brings a deferred close's count to 0 finalizes the socket.
pub(super) struct Call<'a> {
    pub(super) inner: &'a Inner,
    pub(super) entry: Entry<'a>,
}

impl std::ops::Deref for Call<'_> {
    type Target = Socket;

    fn deref(&self) -> &Socket {
        &self.entry
    }
}

impl Call<'_> {
    /// The socket for the state of the op this call posts (see
    /// [`Entry::op_socket`]).
    pub(super) fn op_socket(&self) -> OpSocket {
        self.entry.op_socket()
    }

    /// The call's op was posted: the call leaves, its op stays in the gate
    /// (until [`Inner::op_finished`]).
    #[inline(always)]
    pub(super) fn posted(self) {
        let call = ManuallyDrop::new(self);
        call.inner.sockets.posted(&call.entry);
    }
}

impl Drop for Call<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if self.inner.sockets.leave_entry(&self.entry) {
            self.inner.finalize(&self.entry);
        }
    }
}

/// Closes that returned before their socket's teardown ended, and the
/// thread that ends them (one per running engine, started by the first
/// deferral).
#[derive(Default)]
pub(super) struct Closer {
    /// Deferred closes whose socket may not be finalized yet. Pushed by
    /// `close_socket`; pruned (finalized ones) and forced (overdue ones) by
    /// the closer thread and by the last cleanup. Never locked across an
    /// upcall or a wait.
    deferred: Mutex<Vec<Deferred>>,
    /// The closer thread, once started; joined by the last cleanup.
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Deferred {
    sock: Arc<Socket>,
    /// When the closer stops waiting for the NIC's flushes and forces the
    /// close (then `FORCE_AGAIN` later, until the socket finalized).
    force_at: Instant,
}

impl Provider {
    /// `WSPCloseSocket`: abortive, never lingers, returns 0 in every state,
    /// within `close.wait_ms` (plus the fabric's own teardown calls).
    pub fn close_socket(&self, s: ProviderSocket) -> WsaResult<()> {
        self.close_with(s, self.inner.config.close_wait())
    }

    /// `close_socket`, waiting at most `wait` for the socket's ops.
    pub(super) fn close_with(&self, s: ProviderSocket, wait: Duration) -> WsaResult<()> {
        let run = self.inner.running()?;
        let sock = self.inner.sockets.remove(s)?;
        let closed_at = Instant::now();
        // Calls entering from now on find the socket removed; the gate's
        // count (on its table slot) holds every call and op before.
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
        // Remote access ends first (§6.1 step 1): the registrations stay on
        // the NIC as long as a pending op still names them.
        self.inner.table.release_owner(&sock.regs);
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
        // Called from an upcall on the thread that dispatches, the flushed
        // completions can only be processed after we return.
        if !dispatching()
            && self
                .inner
                .wait_for(&run, Some(closed_at + wait), sock.cq_index(), || {
                    self.inner.sockets.is_quiet(s)
                })
        {
            if self.inner.sockets.claim_finalize(s) {
                self.inner.finalize(&sock);
            }
            return Ok(());
        }
        let force_at = closed_at + self.inner.config.close_quiesce_timeout();
        self.inner.defer_close(&sock, force_at);
        Ok(())
    }
}

impl Inner {
    /// A posted op of `sock` is over (its completion was signalled): it
    /// leaves the close gate.
    #[inline]
    pub(super) fn op_finished(&self, sock: &Socket) {
        if self.sockets.leave(sock.desc) {
            self.finalize(sock);
        }
    }

    /// Close returns before `sock`'s ops are over: the last op to leave
    /// finalizes, and the closer forces the rest at `force_at`.
    fn defer_close(self: &Arc<Self>, sock: &Arc<Socket>, force_at: Instant) {
        self.counters.deferred();
        if self.sockets.defer(sock.desc) {
            self.finalize(sock);
            return;
        }
        let run = &sock.run;
        lock(&run.closer.deferred).push(Deferred {
            sock: sock.clone(),
            force_at,
        });
        self.start_closer(run);
        // The closer sleeps on `completed` while it has nothing to do.
        self.completed.notify();
    }

    /// Starts the closer thread of `run` if it is not running. If it cannot
    /// be started, the deferred close still ends: with its last op's
    /// completion, or at the last cleanup.
    fn start_closer(self: &Arc<Self>, run: &Arc<Running>) {
        let mut slot = lock(&run.closer.thread);
        if slot.is_some() || run.stop.load(Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        let r = run.clone();
        *slot = std::thread::Builder::new()
            .name("sanpath-close".into())
            .spawn(move || while inner.serve_deferred(&r, false) {})
            .ok();
    }

    /// The last cleanup, before the engine stops: ends every deferred close
    /// (waiting for each until its `force_at` at most, then forcing it).
    pub(super) fn end_deferred_closes(&self, run: &Running) {
        while self.serve_deferred(run, true) {}
    }

    /// The last cleanup, once the engine stopped: the closer thread exits.
    pub(super) fn stop_closer(&self, run: &Running) {
        self.completed.notify();
        let h = lock(&run.closer.thread).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// One round of the closer: drops finalized closes, waits until one of
    /// the others finalizes, a new one comes or the earliest is due, then
    /// forces the due ones. Returns `false` when there is nothing left to
    /// do: the list is empty and `drain` is set or the engine stops.
    fn serve_deferred(&self, run: &Running, drain: bool) -> bool {
        let (count, due, only) = {
            let mut d = lock(&run.closer.deferred);
            d.retain(|x| !x.sock.gate.is_finalized());
            let only = match d.as_slice() {
                [one] => one.sock.cq_index(),
                _ => None,
            };
            (d.len(), d.iter().map(|x| x.force_at).min(), only)
        };
        let stopping = || run.stop.load(Ordering::SeqCst);
        let Some(due) = due else {
            if drain || stopping() {
                return false;
            }
            // Nothing to force: sleep without polling any CQ until a close
            // defers (or the engine stops).
            self.completed.wait_until(None, || {
                stopping() || !lock(&run.closer.deferred).is_empty()
            });
            return true;
        };
        // In run-to-completion mode this reaps the flushes too.
        self.wait_for(run, Some(due), only, || {
            let d = lock(&run.closer.deferred);
            d.len() != count || d.iter().any(|x| x.sock.gate.is_finalized())
        });
        let now = Instant::now();
        let overdue: Vec<Arc<Socket>> = lock(&run.closer.deferred)
            .iter_mut()
            .filter(|x| x.force_at <= now)
            .map(|x| {
                x.force_at = now + FORCE_AGAIN;
                x.sock.clone()
            })
            .collect();
        for sock in overdue {
            self.force_close(&sock);
        }
        true
    }

    /// Ends the close of `sock` whose NIC did not flush in time (module
    /// docs): abandons the queue pair, then completes every op of the
    /// socket still outstanding, `WSA_OPERATION_ABORTED`.
    fn force_close(&self, sock: &Socket) {
        debug_assert!(sock.gate.is_closing(), "forcing an open socket");
        if let Some(qp) = sock.qp.get() {
            qp.abandon();
        }
        // The upcalls below are dispatches: a close from inside one defers.
        as_dispatch(|| {
            self.ops.take_owned(owner_tag(sock), &mut |op| {
                self.finish_op(&sock.run, op, WcStatus::Flushed, 0);
            })
        });
    }

    /// Last step of close, once no op of `sock` is outstanding: the final
    /// upcall (through the socket's own switch, so it happens even when the
    /// provider was cleaned up meanwhile). Called exactly once per socket,
    /// by whoever claimed it from the gate. The socket's registrations were
    /// released by close; what its ops held went with their completions.
    pub(super) fn finalize(&self, sock: &Socket) {
        sock.gate.set_finalized();
        let _ = sock.run.switch.close_socket_handle(sock.handle);
        self.counters.finalized();
        tracing::debug!(socket = sock.desc.0, "closed");
        self.completed.notify();
        // The removal's pin (`close_with`): the socket may be released now,
        // so this is the last use of `sock` here.
        self.sockets.unpin_removed(sock.desc);
    }
}
