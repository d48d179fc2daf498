//! Readiness: the eventfd a [`super::Stream`] or [`super::Listener`] hands
//! out through `AsRawFd`, so that one thread can serve many of them with
//! epoll, mio or tokio's `AsyncFd`, and the runtime's [`Hub`], which makes
//! sure somebody reaps the completion queues while no thread is inside a
//! stream call.
//!
//! # What the fd says
//!
//! The eventfd is readable (`POLLIN`) when an operation that last failed
//! with `WouldBlock` may now go on: a `try_recv` (data, end of stream or an
//! error arrived), a `try_send` (send buffers or credits came back, or the
//! connection ended), a `try_accept` (a connection request is queued). Only
//! `POLLIN` means anything (an eventfd is always writable): register it for
//! reading (`Interest::READABLE`), whichever operations you wait for.
//!
//! - **Readable from the start**: a fresh fd says "try": nothing waits
//!   yet.
//! - **Interest is armed by `WouldBlock`**, per operation, as Windows'
//!   `WSAEventSelect` re-enables `FD_READ` after `WSAEWOULDBLOCK`: an
//!   operation that never failed with `WouldBlock`, or succeeded since, is
//!   not waited for, so a stream that can always send does not keep the fd
//!   readable for a task that waits to receive.
//! - **Set when it may go on:** the fd is written once the connection
//!   processed an event that may let a waited-for operation go on (a
//!   receive or send completion, the peer's FIN or reset, an abort), by the
//!   thread that processed it. This may be spurious (a completion that
//!   carried only credits wakes a waiting receive): the operation then
//!   fails with `WouldBlock` again, which arms it again.
//! - **Cleared by the next `WouldBlock`:** a `try_*` call reads the fd's
//!   counter back to zero before it looks, unless another waited-for
//!   operation had an event that nobody tried since (then the fd stays
//!   readable and, after the `WouldBlock`, is written once more, so an
//!   edge-triggered poller sees a fresh edge). A successful call does not
//!   clear it: the fd may stay readable until the next `WouldBlock` (one
//!   spurious wake-up for level-triggered epoll); it only forgets the
//!   events of its own operation.
//!
//! So: try an operation first and wait for the fd only after it failed with
//! `WouldBlock`, and serve a readable stream until its calls return
//! `WouldBlock`, as with edge-triggered sockets. One task per stream that
//! loops "wait for the fd, try" does that (the fd starts readable, and only
//! a `WouldBlock` clears it); separate reading and writing tasks on one
//! stream must try before they wait, since one's `WouldBlock` may clear
//! what the other's success left. Level-triggered epoll works (readable
//! until a `try_*` hits `WouldBlock` with nothing else pending), and
//! edge-triggered pollers (mio, tokio) get an edge for every event that
//! arrives after the `WouldBlock` they saw. The user never reads the fd.
//!
//! Not non-blocking: `try_accept` negotiates the accepted connection (it
//! waits for the peer's HELLO, bounded by `handshake_timeout`), a
//! `try_recv` that meets a large transfer waits for its RDMA read (bounded
//! by `rdma_cancel_timeout`), and dropping a stream waits for its FIN to
//! leave (bounded by `close_timeout`).
//!
//! # Who makes the progress
//!
//! With poller threads (`[poller] mode = "threads"`) the provider's
//! dispatcher delivers every completion, and the connection it reaches
//! writes the fd. When the provider runs to completion, completions wait in
//! the completion queue until a thread reaps it: a stream whose `try_*`
//! failed with `WouldBlock` enlists in its runtime's [`Hub`] and arms its
//! completion queue for the hub (`Provider::arm_socket`). The next
//! completion wakes the hub on the thread that completed the request (the
//! peer's, in the soft fabric), which writes the fd of one enlisted stream,
//! oldest first, marking it to reap: its next `try_*` call reaps every
//! completion queue of the provider, which writes the fds of the streams
//! those completions were for, and arms the queue again while streams are
//! enlisted. One fd write and one wake-up per wake, whatever the number of
//! waiting streams (though the completion may be for another stream, or a
//! send completion nobody waits for: a spurious wake-up of the picked one);
//! nothing else is added: a stream that never asked for its fd writes
//! none, and arms nothing. A stream dropped while marked to reap passes
//! the mark on. The picked stream's owner is expected to serve it (that is
//! what its fd asks); if it does not, the provider's upcall helper reaps
//! the queue after its step aside (200 us) and the other streams' fds are
//! written then.

use crate::fabric::Waker;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

/// A receive waits.
pub(super) const READ: u8 = 1;
/// A send waits.
pub(super) const WRITE: u8 = 2;
/// An accept waits.
pub(super) const ACCEPT: u8 = 4;
/// Not an operation: the [`Hub`] picked this stream to reap.
const REAP: u8 = 8;
/// Every operation: for events that end the connection.
pub(super) const ALL: u8 = READ | WRITE | ACCEPT;

/// The readiness of one stream or listener: its eventfd and what was
/// signalled on it.
pub(super) struct Readiness {
    /// The eventfd (non-blocking, close-on-exec).
    fd: File,
    signal: Mutex<Signal>,
    /// The stream or listener still exists (cleared by [`Readiness::retire`]);
    /// the hub skips a retired one.
    alive: AtomicBool,
    /// In the hub's queue: set by [`Hub::enlist`], cleared by the wake that
    /// takes it out.
    enlisted: AtomicBool,
    /// Listeners: an accept failed with `WouldBlock` (set before it looks,
    /// so a request queued after its look finds it), cleared when an
    /// accept succeeds. Read by the listen event's `set` ([`Waker::wake`]).
    want_accept: AtomicBool,
}

/// What was signalled on the fd. Changed only under the lock, together with
/// the fd's counter, so the two agree: `raised` iff the counter is not 0.
struct Signal {
    /// Operations (and [`REAP`]) signalled and not tried since.
    pending: u8,
    /// The counter is not 0.
    raised: bool,
}

impl Readiness {
    pub(super) fn new() -> io::Result<Arc<Readiness>> {
        // SAFETY: `eventfd` takes no pointers; it returns a new descriptor
        // or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid descriptor that nothing else owns: it was
        // just returned by `eventfd`.
        let fd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let r = Readiness {
            fd,
            signal: Mutex::new(Signal {
                pending: 0,
                raised: true,
            }),
            alive: AtomicBool::new(true),
            enlisted: AtomicBool::new(false),
            want_accept: AtomicBool::new(false),
        };
        // Readable from the start: nothing waits yet, try first.
        r.write();
        Ok(Arc::new(r))
    }

    pub(super) fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn lock(&self) -> MutexGuard<'_, Signal> {
        self.signal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one to the counter: readable, and a new edge.
    fn write(&self) {
        // Fails only when the counter would overflow (it is read back to 0
        // long before) or the fd is bad (it is ours): nothing to do then.
        let _ = (&self.fd).write(&1u64.to_ne_bytes());
    }

    /// `ops` may go on: makes the fd readable (one write, unless it is
    /// already).
    pub(super) fn raise(&self, ops: u8) {
        let mut s = self.lock();
        s.pending |= ops;
        if !s.raised {
            self.write();
            s.raised = true;
        }
    }

    /// A `try_*` call for `op` starts: `op` is being tried, so it is no
    /// longer pending; the fd is cleared unless another pending operation
    /// keeps it readable. Returns whether the hub picked this stream to
    /// reap (the caller reaps every completion queue).
    pub(super) fn begin(&self, op: u8) -> bool {
        let mut s = self.lock();
        let reap = s.pending & REAP != 0;
        s.pending &= !(op | REAP);
        if s.pending == 0 && s.raised {
            let mut counter = [0u8; 8];
            // Reads the counter back to 0; `WouldBlock` if it is 0 already.
            let _ = (&self.fd).read(&mut counter);
            s.raised = false;
        }
        reap
    }

    /// The `try_*` call for `op` ended. If it failed with `WouldBlock` and
    /// an operation is pending (another one, or this one again: an event
    /// came after it looked), writes the fd again for a fresh edge (an
    /// edge-triggered poller clears its readiness after this `WouldBlock`).
    /// If it went on, `op` is no longer pending: an event raised for it
    /// while it ran must not keep the fd readable for the other operations
    /// (which would make their every `WouldBlock` a new edge: a busy loop).
    pub(super) fn end(&self, op: u8, would_block: bool) {
        let mut s = self.lock();
        if !would_block {
            s.pending &= !op;
        } else if s.pending != 0 {
            self.write();
            s.raised = true;
        }
    }

    /// An accept is about to look for a request.
    pub(super) fn want_accept(&self, want: bool) {
        self.want_accept.store(want, Ordering::SeqCst);
    }

    /// The stream or listener goes: the hub skips it from now on. Returns
    /// whether it was picked to reap and had not yet (the caller passes
    /// that on).
    pub(super) fn retire(&self) -> bool {
        self.alive.store(false, Ordering::SeqCst);
        self.lock().pending & REAP != 0
    }

    /// Whether the fd is readable now (tests).
    #[cfg(test)]
    fn is_raised(&self) -> bool {
        self.lock().raised
    }
}

/// The listen event was set (a connection request was queued): readable
/// if an accept waits.
impl Waker for Readiness {
    fn wake(&self) {
        if self.want_accept.load(Ordering::SeqCst) {
            self.raise(ACCEPT);
        }
    }
}

/// A runtime's streams that wait for completions, and the waker their
/// completion queues are armed with (see the module docs).
#[derive(Default)]
pub(super) struct Hub {
    /// Enlisted streams, oldest first; a stream is in it at most once.
    queue: Mutex<VecDeque<Weak<Readiness>>>,
    /// `queue.len()`, for [`Hub::has_waiters`] without the lock.
    len: AtomicUsize,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Weak<Readiness>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enlists `r` (once) to be picked by a wake.
    pub(super) fn enlist(&self, r: &Arc<Readiness>) {
        if !r.enlisted.swap(true, Ordering::SeqCst) {
            let mut q = self.lock();
            q.push_back(Arc::downgrade(r));
            self.len.store(q.len(), Ordering::SeqCst);
        }
    }

    /// Streams are enlisted: their completion queues must stay armed.
    pub(super) fn has_waiters(&self) -> bool {
        self.len.load(Ordering::SeqCst) > 0
    }
}

/// A completion arrived on an armed completion queue: the oldest enlisted
/// stream that still exists is picked to reap.
impl Waker for Hub {
    fn wake(&self) {
        loop {
            let next = {
                let mut q = self.lock();
                let next = q.pop_front();
                self.len.store(q.len(), Ordering::SeqCst);
                next
            };
            let Some(weak) = next else {
                return;
            };
            if let Some(r) = weak.upgrade() {
                r.enlisted.store(false, Ordering::SeqCst);
                if r.alive.load(Ordering::SeqCst) {
                    r.raise(REAP);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn readable(r: &Readiness) -> bool {
        let mut p = libc::pollfd {
            fd: r.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        assert!(n >= 0, "poll: {}", io::Error::last_os_error());
        p.revents & libc::POLLIN != 0
    }

    #[test]
    fn the_fd_follows_raise_and_begin() {
        let r = Readiness::new().unwrap();
        assert!(readable(&r), "a fresh fd says: try");
        assert!(!r.begin(READ));
        assert!(!readable(&r), "nothing pending: cleared");
        r.raise(READ);
        assert!(readable(&r) && r.is_raised());
        r.raise(READ);
        // A WRITE pending keeps it readable while a read is tried.
        r.raise(WRITE);
        assert!(!r.begin(READ));
        assert!(readable(&r), "the send was not tried yet");
        assert!(!r.begin(WRITE));
        assert!(!readable(&r) && !r.is_raised(), "nothing pending: cleared");
        r.end(WRITE, true);
        assert!(!readable(&r), "nothing pending: no new edge");
        // A WouldBlock of a read while a send is pending writes the fd
        // again: a fresh edge for an edge-triggered poller.
        r.raise(WRITE);
        assert!(!r.begin(READ));
        r.end(READ, true);
        let mut counter = [0u8; 8];
        assert_eq!((&r.fd).read(&mut counter).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(counter), 2, "one write per edge");
    }

    /// Run to completion, a stream that waits enlists, and the peer's send
    /// (whose completion lands on the armed queue) picks it through the
    /// hub, on the peer's thread: the fd is readable when the send returns,
    /// and no helper thread was needed.
    #[test]
    fn a_waiting_stream_is_picked_by_the_completion_that_concerns_it() {
        use crate::config::MlockPolicy;
        use crate::fabric::soft::SoftNetwork;
        use crate::switch::{Listener, Runtime, RuntimeConfig, Stream};
        use std::net::{Ipv4Addr, SocketAddrV4};

        let net = SoftNetwork::new();
        let rt = |ip: Ipv4Addr| {
            let mut c = RuntimeConfig::default();
            c.engine.mem.mlock = MlockPolicy::Off;
            c.engine.fabric.soft.addresses = vec![ip];
            let nic = net.attach(c.engine.soft_nic(vec![ip])).unwrap();
            Runtime::with_nic(c, nic).unwrap()
        };
        let (crt, srt) = (
            rt(Ipv4Addr::new(198, 18, 6, 1)),
            rt(Ipv4Addr::new(198, 18, 6, 2)),
        );
        let addr = SocketAddrV4::new(Ipv4Addr::new(198, 18, 6, 2), 7200);
        let l = Listener::bind(&srt, addr).unwrap();
        let acceptor = std::thread::spawn(move || l.accept().unwrap().0);
        let client = Stream::connect(&crt, addr).unwrap();
        let server = acceptor.join().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = server.as_raw_fd();
        let mut buf = [0u8; 8];
        assert_eq!(
            server.try_recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(srt.hub.has_waiters(), "the waiting stream enlisted");
        client.send(b"hi").unwrap();
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // The server's completion reaches its hub on the thread that drains
        // its CQ, which need not be done when the client's send returns:
        // the fd the pick raises says when.
        // SAFETY: one valid pollfd; waits at most 10 s.
        let n = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(n, 1, "not readable within 10 s");
        assert!(!srt.hub.has_waiters(), "picked by the hub");
        // The message is there; a reap can still find its completion in the
        // hands of the provider's upcall helper (a spurious wake-up, as
        // epoll users expect): the fd is raised again once it is dispatched.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let got = loop {
            match server.try_recv(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "never readable");
                    // SAFETY: as above; waits at most 100 ms.
                    unsafe { libc::poll(&mut p, 1, 100) };
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(got, 2);
    }

    #[test]
    fn an_event_for_an_operation_that_went_on_is_forgotten() {
        let r = Readiness::new().unwrap();
        assert!(!r.begin(WRITE));
        // Raised while the send ran, which then went on.
        r.raise(WRITE);
        r.end(WRITE, false);
        assert!(!r.begin(READ));
        assert!(!readable(&r), "the send is not pending: cleared");
        r.end(READ, true);
        assert!(!readable(&r), "no edge for a send that is not pending");
    }

    #[test]
    fn the_hub_picks_the_oldest_live_stream_once() {
        let hub = Hub::default();
        let (a, b) = (Readiness::new().unwrap(), Readiness::new().unwrap());
        // Both tried a read: their fds are clear.
        a.begin(READ);
        b.begin(READ);
        hub.enlist(&a);
        hub.enlist(&a);
        hub.enlist(&b);
        assert!(hub.has_waiters());
        assert!(!a.retire(), "not picked yet");
        hub.wake();
        assert!(!readable(&a), "a retired stream is skipped");
        assert!(readable(&b));
        assert!(!hub.has_waiters());
        assert!(b.begin(READ), "picked to reap");
        assert!(!readable(&b));
        assert!(!b.begin(READ), "once");
    }
}
