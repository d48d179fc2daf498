//! Connected stream sockets over the provider: [`Listener`], [`Stream`]
//! (blocking with timeouts, non-blocking `try_*`, `Read`/`Write`, graceful
//! shutdown, abortive close) and [`CancelToken`], on top of the runtime's
//! connections (`super::connection`).
//!
//! Cancellation (spec §6.2): a cancelled or timed-out blocking connect closes
//! the SAN socket. A send or receive that times out or is cancelled with
//! [`Stream::cancel_pending`] is withdrawn when its buffer is only in switch
//! buffers; when an RDMA op or an exposure uses its buffer, it waits for that
//! up to `rdma_cancel_timeout`, then aborts the connection with
//! `close_socket`, which forces the RDMA's completion, and returns once the
//! fabric no longer touches the buffer.

use super::connection::{lock, proto_io, take_result, wsa_io, Conn, Deadline, Dir};
use super::io::AppBuf;
use super::proto::{self, Role, Stats};
use super::ready::{self, Readiness};
use super::runtime::Runtime;
use crate::error::{WsaError, WsaResult};
use crate::event::Event;
use crate::spi::{Condition, ProviderSocket, FD_ACCEPT, FD_CONNECT, FD_CONNECT_BIT};
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Cancels blocking connects it was given to (from any thread).
#[derive(Clone, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    /// Events of connects waiting on this token (set on cancel).
    events: Mutex<Vec<Weak<Event>>>,
    /// Connections negotiating under this token (woken on cancel).
    conns: Mutex<Vec<Weak<Conn>>>,
}

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Cancels every wait under this token, now and later.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        for e in lock(&self.0.events).iter().filter_map(Weak::upgrade) {
            e.set();
        }
        for c in lock(&self.0.conns).iter().filter_map(Weak::upgrade) {
            c.with_state(|st| st.wake = true);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }
}

/// A listening SAN socket. Its readiness fd (`AsRawFd`, see
/// [`Stream`]'s) is readable when a `try_accept` that failed with
/// `WouldBlock` would find a request.
pub struct Listener {
    rt: Arc<Runtime>,
    sock: ProviderSocket,
    event: Arc<Event>,
    local: SocketAddrV4,
    /// The readiness fd, once asked for; the listen event wakes it.
    ready: OnceLock<Arc<Readiness>>,
    /// `accept` does not wait (`set_nonblocking`).
    nonblocking: AtomicBool,
}

impl Listener {
    /// Binds and listens on `addr` (port 0: an ephemeral port).
    pub fn bind(rt: &Arc<Runtime>, addr: SocketAddrV4) -> io::Result<Listener> {
        let p = &rt.provider;
        let s = rt.socket()?;
        let setup = || -> WsaResult<(Arc<Event>, SocketAddrV4)> {
            p.bind(s, addr)?;
            p.listen(s, rt.opts.backlog)?;
            let ev = Arc::new(Event::new());
            p.event_select(s, Some(ev.clone()), FD_ACCEPT)?;
            let local = p.local_addr(s)?.unwrap_or(addr);
            Ok((ev, local))
        };
        match setup() {
            Ok((event, local)) => Ok(Listener {
                rt: rt.clone(),
                sock: s,
                event,
                local,
                ready: OnceLock::new(),
                nonblocking: AtomicBool::new(false),
            }),
            Err(e) => {
                let _ = p.close_socket(s);
                Err(wsa_io(e))
            }
        }
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Accepts the next connection (bounded by `accept_timeout`), or fails
    /// with `WouldBlock` at once if there is none and the listener is
    /// non-blocking.
    pub fn accept(&self) -> io::Result<(Stream, SocketAddrV4)> {
        if self.nonblocking.load(Ordering::Relaxed) {
            return self.try_accept();
        }
        self.accept_timeout(self.rt.opts.accept_timeout)
    }

    /// Makes `accept` non-blocking (as `try_accept`). Turning it on creates
    /// the readiness fd, so the error of that, if any, comes here.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        if nonblocking {
            self.readiness()?;
        }
        self.nonblocking.store(nonblocking, Ordering::Relaxed);
        Ok(())
    }

    /// The readiness fd, created on first use and woken by the listen
    /// event from then on.
    fn readiness(&self) -> io::Result<&Arc<Readiness>> {
        if let Some(r) = self.ready.get() {
            return Ok(r);
        }
        let fresh = Readiness::new()?;
        let r = self.ready.get_or_init(|| fresh);
        self.event.wake_on_set(r.clone());
        Ok(r)
    }

    /// Accepts the next connection that completes negotiation, waiting at
    /// most `timeout` (`None`: for ever). A request whose negotiation fails
    /// is closed and skipped.
    pub fn accept_timeout(&self, timeout: Option<Duration>) -> io::Result<(Stream, SocketAddrV4)> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.try_accept() {
                Ok(x) => return Ok(x),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let wait = match deadline {
                        Some(d) => match d.checked_duration_since(Instant::now()) {
                            Some(w) if !w.is_zero() => w,
                            _ => {
                                return Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    "no connection within the accept timeout",
                                ))
                            }
                        },
                        None => Duration::from_secs(3600),
                    };
                    self.event.wait(wait);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::InvalidData
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts a queued request if there is one (`WouldBlock` otherwise)
    /// and negotiates (waiting for the peer's HELLO, bounded by
    /// `handshake_timeout`).
    pub fn try_accept(&self) -> io::Result<(Stream, SocketAddrV4)> {
        let Some(ready) = self.ready.get() else {
            return self.accept_now();
        };
        ready.begin(ready::ACCEPT);
        // Before the look: a request queued after it wakes the fd.
        ready.want_accept(true);
        let r = self.accept_now();
        let waits = is_would_block(&r);
        if !waits {
            ready.want_accept(false);
        }
        ready.end(ready::ACCEPT, waits);
        r
    }

    fn accept_now(&self) -> io::Result<(Stream, SocketAddrV4)> {
        let p = &self.rt.provider;
        let (s, peer) = p
            .accept(self.sock, &mut |_| Condition::Accept)
            .map_err(wsa_io)?;
        let local = p.local_addr(s).ok().flatten().unwrap_or(self.local);
        let conn = match self.rt.open(s, Role::Acceptor, local, peer) {
            Ok(c) => c,
            Err(e) => {
                let _ = p.close_socket(s);
                return Err(e);
            }
        };
        let deadline = Instant::now() + self.rt.opts.handshake_timeout;
        handshake(&conn, deadline, None)?;
        Ok((Stream::new(self.rt.clone(), conn), peer))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.rt.provider.close_socket(self.sock);
    }
}

/// The readiness fd (see [`Stream`]'s), created on first use; it stays
/// the same until the listener is dropped.
///
/// # Panics
/// If the eventfd cannot be created (out of file descriptors): call
/// [`Listener::set_nonblocking`] first, which reports that as an error.
impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self.readiness() {
            Ok(r) => r.as_fd(),
            Err(e) => panic!("listener readiness eventfd: {e}"),
        }
    }
}

/// [`AsFd`]'s descriptor.
impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// Waits for the peer's HELLO; closes the socket on failure.
fn handshake(conn: &Arc<Conn>, deadline: Instant, cancel: Option<&CancelToken>) -> io::Result<()> {
    if let Some(c) = cancel {
        lock(&c.0.conns).push(Arc::downgrade(conn));
    }
    let done = conn
        .wait_until(
            Deadline::until(deadline),
            |st| (st.connected || st.m.error().is_some()).then_some(()),
            |_| cancel.is_some_and(CancelToken::is_cancelled),
        )
        .is_some();
    let (connected, error) = conn.with_state(|st| (st.connected, st.m.error()));
    if connected {
        // Negotiated, even if the connection failed right after: the data
        // and FIN it brought are the application's to read, then the error
        // (as with a TCP connection reset after it was established).
        return Ok(());
    }
    match (done, error) {
        (true, None) => Ok(()),
        (_, e) => {
            conn.close_socket();
            Err(match e {
                Some(e) => proto_io(e),
                None if cancel.is_some_and(CancelToken::is_cancelled) => {
                    io::Error::new(io::ErrorKind::Interrupted, "connect cancelled")
                }
                None => io::Error::new(io::ErrorKind::TimedOut, "session negotiation timed out"),
            })
        }
    }
}

/// A connected stream socket over the SAN (`Read`/`Write`, blocking with
/// timeouts, or non-blocking `try_*` and `set_nonblocking`). `Sync`: one
/// thread may send while another receives; concurrent sends (or receives)
/// are serialised: a blocking call waits for the one in progress within
/// its own timeout, a non-blocking one as long as that call.
///
/// `AsRawFd` gives its readiness fd, an eventfd that is readable when a
/// `try_recv`/`try_send` (or non-blocking `read`/`write`) that failed with
/// `WouldBlock` may now go on, for epoll, mio or tokio's `AsyncFd`
/// (register it for reading only). It is armed per operation by
/// `WouldBlock`, written by whichever thread processes the event, and
/// cleared by the next `WouldBlock`; serve a readable stream until its
/// calls return `WouldBlock`. The full rules: the `switch::ready` module
/// docs. A stream whose fd nobody asked for pays nothing for it.
pub struct Stream {
    rt: Arc<Runtime>,
    conn: Arc<Conn>,
    read_timeout: Timeout,
    write_timeout: Timeout,
    /// `recv`/`send` (and `Read`/`Write`) do not wait (`set_nonblocking`).
    nonblocking: AtomicBool,
    closed: AtomicBool,
}

impl Stream {
    fn new(rt: Arc<Runtime>, conn: Arc<Conn>) -> Stream {
        Stream {
            read_timeout: Timeout::new(rt.opts.read_timeout),
            write_timeout: Timeout::new(rt.opts.write_timeout),
            rt,
            conn,
            nonblocking: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// Connects to `addr`, bounded by `connect_timeout`.
    pub fn connect(rt: &Arc<Runtime>, addr: SocketAddrV4) -> io::Result<Stream> {
        Self::connect_with(rt, addr, Some(rt.opts.connect_timeout), None)
    }

    /// Connects to `addr` within `timeout` (`None`: the configured one),
    /// giving up when `cancel` is cancelled. A cancelled or timed-out
    /// connect closes the SAN socket (spec §6.2).
    pub fn connect_with(
        rt: &Arc<Runtime>,
        addr: SocketAddrV4,
        timeout: Option<Duration>,
        cancel: Option<&CancelToken>,
    ) -> io::Result<Stream> {
        let deadline = Instant::now() + timeout.unwrap_or(rt.opts.connect_timeout);
        let p = &rt.provider;
        let s = rt.socket()?;
        let fail = |e: io::Error| {
            let _ = p.close_socket(s);
            Err(e)
        };
        let ev = Arc::new(Event::new());
        if let Some(c) = cancel {
            lock(&c.0.events).push(Arc::downgrade(&ev));
        }
        if let Err(e) = p.event_select(s, Some(ev.clone()), FD_CONNECT) {
            return fail(wsa_io(e));
        }
        match p.connect(s, addr, &[]) {
            Ok(()) | Err(WsaError::WSAEWOULDBLOCK) => {}
            Err(e) => return fail(wsa_io(e)),
        }
        loop {
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return fail(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "connect cancelled",
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return fail(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            if ev.wait(deadline - now) && !cancel.is_some_and(CancelToken::is_cancelled) {
                break;
            }
        }
        let ne = match p.enum_network_events(s, Some(&ev)) {
            Ok(ne) => ne,
            Err(e) => return fail(wsa_io(e)),
        };
        if ne.network_events & FD_CONNECT == 0 {
            return fail(io::Error::other("FD_CONNECT not recorded"));
        }
        match ne.error_codes[FD_CONNECT_BIT] {
            0 => {}
            code => {
                let e = WsaError::from_code(code).unwrap_or(WsaError::WSAECONNABORTED);
                return fail(wsa_io(e));
            }
        }
        let local = p.local_addr(s).ok().flatten().unwrap_or(addr);
        let conn = match rt.open(s, Role::Connector, local, addr) {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        handshake(&conn, deadline, cancel)?;
        Ok(Stream::new(rt.clone(), conn))
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.conn.local
    }

    pub fn peer_addr(&self) -> SocketAddrV4 {
        self.conn.peer
    }

    /// The runtime this stream belongs to.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) {
        self.read_timeout.set(t);
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) {
        self.write_timeout.set(t);
    }

    /// Makes `recv`/`send` and `Read`/`Write` non-blocking (as
    /// `try_recv`/`try_send`: `WouldBlock` instead of waiting). Turning it
    /// on creates the readiness fd, so the error of that, if any, comes
    /// here.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        if nonblocking {
            self.readiness()?;
        }
        self.nonblocking.store(nonblocking, Ordering::Relaxed);
        Ok(())
    }

    /// The readiness fd, created on first use.
    fn readiness(&self) -> io::Result<&Arc<Readiness>> {
        if let Some(r) = self.conn.ready.get() {
            return Ok(r);
        }
        let fresh = Readiness::new()?;
        Ok(self.conn.ready.get_or_init(|| fresh))
    }

    /// Before a non-blocking call for `op`: makes progress on the stream's
    /// completion queue, or on every one if the hub picked this stream to
    /// reap (`super::ready`).
    fn reap(&self, ready: Option<&Arc<Readiness>>, op: u8) {
        match ready {
            Some(r) if r.begin(op) => self.rt.provider.progress(),
            _ => self.conn.progress(),
        };
    }

    /// After a non-blocking call for `op` of a stream with a readiness fd:
    /// the fd learns how it ended; the completion queue stays armed while
    /// streams wait.
    fn after(&self, ready: &Arc<Readiness>, op: u8, r: &io::Result<usize>) {
        let waits = is_would_block(r);
        ready.end(op, waits);
        self.rt.keep_armed(&self.conn, ready, waits);
    }

    /// The stream's connection (for the connection's own tests).
    #[cfg(test)]
    pub(super) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Bytes of this stream's buffers: its control pools and its two rings
    /// (`SwitchOptions::{recv_slots, send_slots, slot_size, ring_size}`).
    pub fn buffer_bytes(&self) -> usize {
        self.conn.buffer_bytes()
    }

    /// Sends above this many bytes go by RDMA.
    pub fn rdma_threshold(&self) -> usize {
        self.conn.with_state(|st| st.m.rdma_threshold() as usize)
    }

    /// Overrides the threshold taken from `SO_RDMA_THRESHOLD_SIZE`.
    pub fn set_rdma_threshold(&self, bytes: usize) {
        self.conn
            .with_state(|st| st.m.set_rdma_threshold(bytes as u64));
    }

    /// Whether large sends use the RDMA-read flow (else RDMA write).
    pub fn uses_read_flow(&self) -> bool {
        self.conn.with_state(|st| st.m.uses_read_flow())
    }

    /// Protocol counters.
    pub fn stats(&self) -> Stats {
        self.conn.with_state(|st| st.m.stats())
    }

    /// Sends all of `buf` (blocking, bounded by the write timeout). Small
    /// payloads are copied into control messages and the call returns once
    /// they are queued; large ones are read (or written) by RDMA straight
    /// from `buf` and the call returns when the peer has them. On timeout
    /// the bytes already sent are reported (`Ok(n)`, `n < buf.len()`), or
    /// `TimedOut` if none.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        if self.nonblocking.load(Ordering::Relaxed) {
            return self.try_send(buf);
        }
        self.send_timeout(buf, self.write_timeout.get())
    }

    pub fn send_timeout(&self, buf: &[u8], timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let app = AppBuf::of(buf);
        let len = buf.len() as u64;
        let bound = self.rt.opts.rdma_cancel_timeout;
        self.conn
            .blocking(Dir::Send, false, timeout, bound, |st, op| {
                st.ops.lend(op, app);
                st.m.app_send(op, len, false);
            })
            .map(|n| n as usize)
    }

    /// Sends what credits allow now, by copy (`WouldBlock` if nothing).
    pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let ready = self.conn.ready.get();
        // Credits returned by the peer may wait in the completion queue.
        self.reap(ready, ready::WRITE);
        let app = AppBuf::of(buf);
        let r = self
            .conn
            .gated_then(
                Dir::Send,
                |st| {
                    if ready.is_some() {
                        // Before the machine looks: an event fed after it
                        // wakes the fd.
                        st.want |= ready::WRITE;
                    }
                    let op = st.new_op();
                    st.ops.lend(op, app);
                    st.m.app_send(op, buf.len() as u64, true);
                    op
                },
                // A non-blocking send completes within `app_send`.
                |st, op| {
                    let r = take_result(st, op);
                    if !is_would_block(&r) {
                        st.want &= !ready::WRITE;
                    }
                    r
                },
            )
            .and_then(|r| r)
            .map(|n| n as usize);
        if let Some(ready) = ready {
            self.after(ready, ready::WRITE, &r);
        }
        r
    }

    /// Receives at least one byte (blocking, bounded by the read timeout);
    /// 0 at end of stream.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.nonblocking.load(Ordering::Relaxed) {
            return self.try_recv(buf);
        }
        self.recv_timeout(buf, self.read_timeout.get())
    }

    pub fn recv_timeout(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = buf.len() as u64;
        let app = AppBuf::of_mut(buf);
        let bound = self.rt.opts.rdma_cancel_timeout;
        self.conn
            .blocking(Dir::Recv, false, timeout, bound, |st, op| {
                st.ops.lend(op, app);
                st.m.app_recv(op, len, false);
            })
            .map(|n| n as usize)
    }

    /// Receives what has arrived (`WouldBlock` if nothing). A large transfer
    /// at the head of the stream is pulled by RDMA, which needs nothing from
    /// the peer's application; the call waits for that op (bounded).
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let ready = self.conn.ready.get();
        // What arrived may wait in the completion queue.
        self.reap(ready, ready::READ);
        let len = buf.len() as u64;
        let app = AppBuf::of_mut(buf);
        let bound = self.rt.opts.rdma_cancel_timeout;
        let r = self
            .conn
            .blocking(Dir::Recv, true, Some(bound), bound, |st, op| {
                if ready.is_some() {
                    // Before the machine looks: an event fed after it
                    // wakes the fd.
                    st.want |= ready::READ;
                }
                st.ops.lend(op, app);
                st.m.app_recv(op, len, true);
            })
            .map(|n| n as usize);
        if let Some(ready) = ready {
            self.after(ready, ready::READ, &r);
        }
        r
    }

    /// Graceful shutdown of the sending side: FIN goes after all data sent
    /// so far; the peer reads everything, then end of stream. Receiving
    /// continues. Does not wait.
    pub fn shutdown(&self) -> io::Result<()> {
        self.conn
            .with_state(|st| st.m.app_shutdown())
            .map_err(proto_io)
    }

    /// Makes blocking sends and receives in progress on other threads give
    /// up (`Interrupted`): withdrawn if their buffer is only in switch
    /// buffers, else after the RDMA in flight (or an abort of the
    /// connection past `rdma_cancel_timeout`).
    pub fn cancel_pending(&self) {
        self.conn.with_state(|st| {
            st.cancel_gen += 1;
            st.wake = true;
        });
    }

    /// Closes the stream. Graceful when nothing is pending (FIN, then the
    /// SAN socket is closed once queued messages left, bounded by
    /// `close_timeout`); abortive (the peer sees a reset) when received data
    /// is unread or sent data is not yet delivered.
    pub fn close(self) {
        self.close_inner(false);
    }

    /// Closes the stream abortively at once.
    pub fn abort(self) {
        self.close_inner(true);
    }

    fn close_inner(&self, abortive: bool) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.conn.ready.get().is_some_and(|r| r.retire()) {
            // Picked to reap and gone before it did: the next one reaps.
            crate::fabric::Waker::wake(&*self.rt.hub);
        }
        let graceful = !abortive
            && self.conn.with_state(|st| {
                let ok = !st.m.has_pending_data() && st.m.error().is_none();
                if ok {
                    let _ = st.m.app_shutdown();
                }
                ok
            });
        if graceful {
            self.conn.with_state(|st| st.watch_all = true);
            self.conn.wait_until(
                Deadline::within(self.rt.opts.close_timeout),
                |st| {
                    (st.m.error().is_some() || (st.m.fin_delivered() && st.m.is_quiescent()))
                        .then_some(())
                },
                |_| false,
            );
        }
        self.conn.with_state(|st| {
            if st.m.error().is_none() {
                st.m.abort(proto::Error::Aborted);
            }
        });
        self.conn.close_socket();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.close_inner(false);
    }
}

/// A stream's read or write timeout, read by every blocking call without a
/// lock: nanoseconds, [`Timeout::NONE`] for none (waits for ever). A bound
/// beyond `u64::MAX - 1` ns (584 years) is kept as that.
struct Timeout(AtomicU64);

impl Timeout {
    const NONE: u64 = u64::MAX;

    fn new(t: Option<Duration>) -> Timeout {
        let timeout = Timeout(AtomicU64::new(Self::NONE));
        timeout.set(t);
        timeout
    }

    fn set(&self, t: Option<Duration>) {
        let ns = t.map_or(Self::NONE, |d| {
            u64::try_from(d.as_nanos()).map_or(Self::NONE - 1, |n| n.min(Self::NONE - 1))
        });
        self.0.store(ns, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            Self::NONE => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

fn is_would_block<T>(r: &io::Result<T>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// The readiness fd, created on first use (see [`Stream`]); it stays the
/// same until the stream is dropped.
///
/// # Panics
/// If the eventfd cannot be created (out of file descriptors): call
/// [`Stream::set_nonblocking`] first, which reports that as an error.
impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self.readiness() {
            Ok(r) => r.as_fd(),
            Err(e) => panic!("stream readiness eventfd: {e}"),
        }
    }
}

/// [`AsFd`]'s descriptor.
impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl io::Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

impl io::Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connected client and server stream of a runtime with the default
/// configuration (every blocking call bounded) on its own soft network
/// (address 198.18.7.`host`), and the runtime, to keep while they are used:
/// for the switch's unit tests.
#[cfg(test)]
pub(super) fn connected(host: u8) -> (Arc<Runtime>, Stream, Stream) {
    use super::RuntimeConfig;
    use crate::fabric::soft::SoftNetwork;
    use std::net::Ipv4Addr;

    let net = SoftNetwork::new();
    let ip = Ipv4Addr::new(198, 18, 7, host);
    let mut c = RuntimeConfig::default();
    c.engine.fabric.soft.addresses = vec![ip];
    c.switch = super::SwitchOptions::bounded(Duration::from_secs(10));
    let nic = net.attach(c.engine.soft_nic(vec![ip])).unwrap();
    let rt = Runtime::with_nic(c, nic).unwrap();
    let l = Listener::bind(&rt, SocketAddrV4::new(ip, 7300)).unwrap();
    let addr = l.local_addr();
    let acceptor = std::thread::spawn(move || l.accept().unwrap().0);
    let client = Stream::connect(&rt, addr).unwrap();
    (rt, client, acceptor.join().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switch::SwitchOptions;

    /// A timeout reads back as set: none, zero, sub-microsecond and long
    /// ones, and one beyond what u64 nanoseconds hold saturates instead of
    /// reading as none.
    #[test]
    fn a_stream_timeout_reads_back_as_set() {
        let t = Timeout::new(None);
        assert_eq!(t.get(), None);
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(1500),
            Duration::from_secs(86_400 * 365),
        ] {
            t.set(Some(d));
            assert_eq!(t.get(), Some(d));
        }
        t.set(Some(Duration::MAX));
        assert_eq!(t.get(), Some(Duration::from_nanos(u64::MAX - 1)));
        t.set(None);
        assert_eq!(t.get(), None);
        assert_eq!(
            Timeout::new(Some(Duration::from_secs(3))).get(),
            Some(Duration::from_secs(3))
        );
    }

    /// With the default configuration (`mem.mlock: try`), a connected idle
    /// stream on the soft fabric keeps resident only the page the
    /// handshake touched: the pool's first (HELLO out, HELLO in), none of
    /// the rings, nothing locked.
    #[test]
    fn an_idle_stream_keeps_only_its_handshake_pages_resident() {
        let (_rt, client, server) = connected(1);
        let page = crate::mem::region::page_size();
        for (who, s) in [("client", &client), ("server", &server)] {
            let (resident, locked) = s.conn.resident_bytes();
            assert!(!locked, "{who}: buffers locked");
            assert!(
                resident <= page,
                "{who}: {resident} of {} buffer bytes resident while idle",
                s.buffer_bytes()
            );
        }
    }

    /// Small messages go through every receive slot in turn (receives
    /// complete in posting order), and still keep one page of a
    /// connection's buffers resident: the slots' first bytes share it.
    #[test]
    fn small_messages_through_every_slot_keep_one_page_resident() {
        let (_rt, client, server) = connected(2);
        let o = SwitchOptions::default();
        let laps = 4 * usize::from(o.recv_slots.max(o.send_slots));
        let mut buf = [0u8; 200];
        for i in 0..laps {
            for (from, to) in [(&client, &server), (&server, &client)] {
                buf.fill(i as u8);
                assert_eq!(from.send(&buf).unwrap(), buf.len());
                let mut got = 0;
                while got < buf.len() {
                    got += to.recv(&mut buf[got..]).unwrap();
                }
                assert!(buf.iter().all(|&b| b == i as u8), "message {i} garbled");
            }
        }
        let page = crate::mem::region::page_size();
        for (who, s) in [("client", &client), ("server", &server)] {
            let (resident, _) = s.conn.resident_bytes();
            assert!(
                resident <= page,
                "{who}: {resident} of {} buffer bytes resident after {laps} small round trips",
                s.buffer_bytes()
            );
        }
    }
}
