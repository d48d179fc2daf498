//! Connection management: one `SOCK_SEQPACKET` Unix socket per address of
//! the NIC in the runtime directory, the handshake over it, and the NIC's
//! event thread.
//!
//! # Handshake
//!
//! The connector creates its segment and eventfd, connects to
//! `<dir>/<ip>.sock` of the destination address and sends `REQUEST`
//! (addresses, its pid, its queue sizes, up to `MAX_PRIVATE_DATA` bytes
//! of private data after the fixed part) with both descriptors. The
//! acceptor's event thread answers `REJECT` (no listener at that port,
//! backlog full) or queues the request and answers `QUEUED`; an accept
//! creates the acceptor's segment and eventfd and sends them with `ACCEPT`;
//! a reject sends `REJECT`. The socket then stays open for the life of the
//! connection: its hang-up is the peer's death (or its end's destruction).
//!
//! Errors (spec CONN-3..6): no socket for the address is an unknown host
//! (`HostUnreachable`) on one of our subnets, `NetUnreachable` elsewhere; a
//! socket nobody listens on any more (its process died) is the same unknown
//! host, and the stale file is removed; `REJECT` is `NoListener` or
//! `Refused`; no `QUEUED` within the connect timeout is `TimedOut`.
//!
//! # The event thread
//!
//! One per NIC, blocked in `epoll_wait`: it accepts on the address sockets,
//! reads handshake messages, turns an eventfd signal of a peer into the
//! wake of the end's CQ, and a hang-up of a connection socket into the
//! break of that connection (then removes the dead peer's stale socket
//! file). It never spins.

use super::conn::{Conn, Parts};
use super::seg::{Segment, VERSION};
use super::sys::{self, Epoll};
use super::{lock, NicInner};
use crate::fabric::*;
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

const MAGIC: u32 = 0x5350_4e53;
/// The fixed part of a handshake message; a `REQUEST`'s private data
/// follows it (its length in byte 36).
const MSG_BYTES: usize = 40;
/// The largest handshake message.
const MSG_MAX: usize = MSG_BYTES + MAX_PRIVATE_DATA;
const REQUEST: u8 = 1;
const QUEUED: u8 = 2;
const ACCEPT: u8 = 3;
const REJECT: u8 = 4;
const WHY_REFUSED: u8 = 1;
const WHY_NO_LISTENER: u8 = 2;
/// How long the event thread waits for a peer that hung up to finish
/// exiting before it looks for its stale socket file.
const EXIT_WAIT_MS: i32 = 50;

/// A handshake message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Msg {
    kind: u8,
    why: u8,
    from: Option<SocketAddrV4>,
    to: Option<SocketAddrV4>,
    pid: i32,
    send_depth: u32,
    recv_depth: u32,
    max_sge: u32,
    /// `REQUEST` only: the connector's private data, `data_len` bytes.
    data: [u8; MAX_PRIVATE_DATA],
    data_len: u8,
}

impl Default for Msg {
    fn default() -> Msg {
        Msg {
            kind: 0,
            why: 0,
            from: None,
            to: None,
            pid: 0,
            send_depth: 0,
            recv_depth: 0,
            max_sge: 0,
            data: [0; MAX_PRIVATE_DATA],
            data_len: 0,
        }
    }
}

fn put_addr(b: &mut [u8], a: Option<SocketAddrV4>) {
    let a = a.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    b[..4].copy_from_slice(&a.ip().octets());
    b[4..6].copy_from_slice(&a.port().to_le_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    SocketAddrV4::new(ip, u16::from_le_bytes([b[4], b[5]]))
}

impl Msg {
    /// The connector's private data.
    fn private_data(&self) -> &[u8] {
        &self.data[..self.data_len as usize]
    }

    /// Writes the message into `b`; returns its length.
    fn encode(&self, b: &mut [u8; MSG_MAX]) -> usize {
        b[..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&(VERSION as u16).to_le_bytes());
        b[6] = self.kind;
        b[7] = self.why;
        put_addr(&mut b[8..14], self.from);
        put_addr(&mut b[14..20], self.to);
        b[20..24].copy_from_slice(&self.pid.to_le_bytes());
        b[24..28].copy_from_slice(&self.send_depth.to_le_bytes());
        b[28..32].copy_from_slice(&self.recv_depth.to_le_bytes());
        b[32..36].copy_from_slice(&self.max_sge.to_le_bytes());
        let data = self.private_data();
        b[36] = data.len() as u8;
        b[37..MSG_BYTES].fill(0);
        b[MSG_BYTES..MSG_BYTES + data.len()].copy_from_slice(data);
        MSG_BYTES + data.len()
    }

    fn decode(b: &[u8]) -> Option<Msg> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if b.len() < MSG_BYTES || u32_at(0) != MAGIC || b[4..6] != (VERSION as u16).to_le_bytes() {
            return None;
        }
        let data_len = b[36];
        if data_len as usize > MAX_PRIVATE_DATA
            || b.len() != MSG_BYTES + data_len as usize
            || (data_len > 0 && b[6] != REQUEST)
        {
            return None;
        }
        let mut data = [0; MAX_PRIVATE_DATA];
        data[..data_len as usize].copy_from_slice(&b[MSG_BYTES..]);
        Some(Msg {
            kind: b[6],
            why: b[7],
            from: Some(get_addr(&b[8..14])),
            to: Some(get_addr(&b[14..20])),
            pid: u32_at(20) as i32,
            send_depth: u32_at(24),
            recv_depth: u32_at(28),
            max_sge: u32_at(32),
            data,
            data_len,
        })
    }
}

fn send(sock: &OwnedFd, m: Msg, fds: &[&OwnedFd]) -> std::io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut b = [0u8; MSG_MAX];
    let n = m.encode(&mut b);
    sys::send_msg(sock.as_raw_fd(), &b[..n], &raw)
}

/// The socket file of `ip` in `dir`.
pub(super) fn socket_path(dir: &Path, ip: Ipv4Addr) -> PathBuf {
    dir.join(format!("{ip}.sock"))
}

/// Removes the socket file at `path` if nobody listens there any more.
pub(super) fn remove_if_stale(path: &Path) {
    if let Err(e) = sys::connect_to(path) {
        if e.raw_os_error() == Some(libc::ECONNREFUSED) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the event thread watches, by token.
enum Watch {
    /// An address socket of this NIC.
    Address(OwnedFd),
    /// An accepted socket whose `REQUEST` has not come yet.
    Incoming(OwnedFd),
    /// A queued request (its socket hanging up cancels it).
    Queued(Arc<Request>),
    /// An outgoing attempt waiting for `QUEUED` / `ACCEPT` / `REJECT`.
    Attempt(Arc<Attempt>),
    /// A connection's socket (hang-up: the peer is gone).
    ConnSock(Weak<Conn>),
    /// A connection's eventfd (the peer woke us).
    ConnEvent(Weak<Conn>),
    /// Signalled to make the thread look again (a new deadline) or, with
    /// `stopping` set, return.
    Kick(OwnedFd),
}

/// The event thread's registry.
pub(super) struct Events {
    epoll: Epoll,
    watches: Mutex<HashMap<u64, Watch>>,
    next: AtomicU64,
    kick_fd: Mutex<Option<i32>>,
    stopping: AtomicBool,
}

impl Events {
    pub(super) fn new() -> std::io::Result<Events> {
        Ok(Events {
            epoll: Epoll::new()?,
            watches: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            kick_fd: Mutex::new(None),
            stopping: AtomicBool::new(false),
        })
    }

    fn add(&self, fd: i32, w: Watch) -> std::io::Result<u64> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.watches).insert(token, w);
        if let Err(e) = self.epoll.add(fd, token) {
            lock(&self.watches).remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    fn remove(&self, token: u64) -> Option<Watch> {
        let w = lock(&self.watches).remove(&token)?;
        let fd = match &w {
            Watch::Address(f) | Watch::Incoming(f) | Watch::Kick(f) => f.as_raw_fd(),
            Watch::Queued(r) => r.raw,
            Watch::Attempt(a) => a.raw,
            Watch::ConnSock(c) => {
                return c.upgrade().map(|c| {
                    self.epoll.remove(c.sock.as_raw_fd());
                    w
                })
            }
            Watch::ConnEvent(c) => {
                return c.upgrade().map(|c| {
                    self.epoll.remove(c.my_event.as_raw_fd());
                    w
                })
            }
        };
        self.epoll.remove(fd);
        Some(w)
    }

    pub(super) fn add_address(&self, fd: OwnedFd) -> std::io::Result<()> {
        let raw = fd.as_raw_fd();
        self.add(raw, Watch::Address(fd)).map(drop)
    }

    pub(super) fn add_conn(&self, c: &Arc<Conn>) -> std::io::Result<(u64, u64)> {
        let s = self.add(c.sock.as_raw_fd(), Watch::ConnSock(Arc::downgrade(c)))?;
        let e = self.add(c.my_event.as_raw_fd(), Watch::ConnEvent(Arc::downgrade(c)))?;
        Ok((s, e))
    }

    pub(super) fn forget(&self, tokens: &[u64]) {
        for t in tokens {
            self.remove(*t);
        }
    }

    /// Starts the event thread; `stop` makes it return.
    pub(super) fn start(nic: &Arc<NicInner>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let kick = sys::eventfd()?;
        *lock(&nic.events.kick_fd) = Some(kick.as_raw_fd());
        let raw = kick.as_raw_fd();
        nic.events.add(raw, Watch::Kick(kick))?;
        let weak = Arc::downgrade(nic);
        std::thread::Builder::new()
            .name("sanpath-shm".into())
            .spawn(move || run(weak))
    }

    /// Makes the thread recompute its deadline.
    fn kick(&self) {
        if let Some(fd) = *lock(&self.kick_fd) {
            sys::signal(fd);
        }
    }

    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.kick();
    }
}

fn run(nic: Weak<NicInner>) {
    let mut ready = Vec::new();
    loop {
        let timeout = match nic.upgrade() {
            Some(n) => n.next_deadline_ms(),
            None => return,
        };
        {
            let Some(n) = nic.upgrade() else { return };
            n.events.epoll.wait(&mut ready, timeout);
        }
        let Some(n) = nic.upgrade() else { return };
        for &(token, hup) in &ready {
            if !n.handle(token, hup) {
                return;
            }
        }
        n.expire_attempts();
    }
}

/// An outgoing attempt.
pub(super) struct Attempt {
    nic: Weak<NicInner>,
    /// The socket (moved into the connection once accepted).
    sock: Mutex<Option<OwnedFd>>,
    raw: i32,
    token: Mutex<u64>,
    from: SocketAddrV4,
    to: SocketAddrV4,
    /// Until `QUEUED`; `None` after it.
    deadline: Mutex<Option<Instant>>,
    /// Taken by whoever finishes the attempt.
    pending: Mutex<Option<Pending>>,
}

struct Pending {
    params: QpParams,
    done: ConnectDone,
    seg: Segment,
    event: OwnedFd,
}

impl ConnectAttempt for Attempt {
    fn cancel(&self) -> bool {
        let taken = lock(&self.pending).take().is_some();
        if taken {
            if let Some(n) = self.nic.upgrade() {
                n.events.remove(*lock(&self.token));
            }
            // Closing the socket tells the acceptor.
            drop(lock(&self.sock).take());
        }
        taken
    }
}

/// An incoming request queued at a listener.
pub(super) struct Request {
    nic: Weak<NicInner>,
    listener: Weak<ListenerShared>,
    /// The socket (moved into the connection once accepted).
    sock: Mutex<Option<OwnedFd>>,
    raw: i32,
    token: Mutex<u64>,
    from: SocketAddrV4,
    to: SocketAddrV4,
    pid: i32,
    /// The `REQUEST` as it came (for its private data).
    msg: Msg,
    /// The connector's segment and eventfd, until accepted or refused.
    fds: Mutex<Option<(OwnedFd, OwnedFd)>>,
}

impl Request {
    /// Takes the request out of its backlog; whether it was still there.
    fn take(&self) -> bool {
        if let Some(n) = self.nic.upgrade() {
            n.events.remove(*lock(&self.token));
        }
        match self.listener.upgrade() {
            Some(l) => {
                let mut q = lock(&l.queue);
                let before = q.reqs.len();
                q.reqs.retain(|r| !std::ptr::eq(Arc::as_ptr(r), self));
                before != q.reqs.len()
            }
            None => false,
        }
    }
}

impl Request {
    /// Tells the connector `Refused` and closes the socket.
    fn refuse(&self) {
        if let Some(sock) = lock(&self.sock).take() {
            let m = Msg {
                kind: REJECT,
                why: WHY_REFUSED,
                ..Msg::default()
            };
            let _ = send(&sock, m, &[]);
        }
    }
}

impl ConnRequest for Request {
    fn peer_addr(&self) -> SocketAddrV4 {
        self.from
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.to
    }

    fn private_data(&self) -> &[u8] {
        self.msg.private_data()
    }

    fn accept(&self, params: QpParams) -> Result<Arc<dyn QueuePair>, ConnectError> {
        if !self.take() {
            return Err(ConnectError::Cancelled);
        }
        let nic = self.nic.upgrade().ok_or(ConnectError::Cancelled)?;
        let (seg_fd, ev_fd) = lock(&self.fds).take().ok_or(ConnectError::Cancelled)?;
        let theirs = Segment::open(&seg_fd).map_err(|_| ConnectError::NoResources)?;
        let (my_seg_fd, mine) =
            Segment::create(params.send_depth as usize, params.max_sge as usize)
                .map_err(|_| ConnectError::NoResources)?;
        let my_event = sys::eventfd().map_err(|_| ConnectError::NoResources)?;
        let sock = lock(&self.sock).take().ok_or(ConnectError::Cancelled)?;
        let m = Msg {
            kind: ACCEPT,
            pid: sys::pid(),
            ..Msg::default()
        };
        if send(&sock, m, &[&my_seg_fd, &my_event]).is_err() {
            return Err(ConnectError::Cancelled);
        }
        let conn = nic.make_conn(
            self.to, self.from, mine, theirs, self.pid, my_event, ev_fd, sock, params,
        )?;
        Ok(Arc::new(super::ShmQp(conn)))
    }

    fn reject(&self) {
        if self.take() {
            self.refuse();
        }
    }
}

/// The queue of a listener.
pub(super) struct Backlog {
    pub(super) reqs: VecDeque<Arc<Request>>,
    pub(super) closed: bool,
}

pub(super) struct ListenerShared {
    pub(super) nic: Weak<NicInner>,
    pub(super) addr: SocketAddrV4,
    pub(super) backlog: usize,
    pub(super) queue: Mutex<Backlog>,
    pub(super) events: Arc<dyn ListenerEvents>,
}

impl ListenerShared {
    fn close(self: &Arc<Self>) {
        if let Some(nic) = self.nic.upgrade() {
            nic.unlisten(self);
        }
        let reqs: Vec<_> = {
            let mut q = lock(&self.queue);
            q.closed = true;
            q.reqs.drain(..).collect()
        };
        for r in reqs {
            if let Some(n) = r.nic.upgrade() {
                n.events.remove(*lock(&r.token));
            }
            r.refuse();
        }
    }
}

pub(super) struct ShmListener(pub(super) Arc<ListenerShared>);

impl Listener for ShmListener {
    fn peek(&self) -> Option<Arc<dyn ConnRequest>> {
        lock(&self.0.queue)
            .reqs
            .front()
            .map(|r| r.clone() as Arc<dyn ConnRequest>)
    }

    fn pending(&self) -> usize {
        lock(&self.0.queue).reqs.len()
    }

    fn close(&self) {
        self.0.close();
    }
}

impl Drop for ShmListener {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl NicInner {
    /// Starts a connection attempt (see the module docs for the errors).
    pub(super) fn connect(
        self: &Arc<Self>,
        from: SocketAddrV4,
        to: SocketAddrV4,
        params: QpParams,
        private_data: &[u8],
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        if private_data.len() > MAX_PRIVATE_DATA {
            return Err(ConnectError::NoResources);
        }
        let path = socket_path(&self.dir, *to.ip());
        let unknown = || {
            if self.on_subnet(*to.ip()) {
                ConnectError::HostUnreachable
            } else {
                ConnectError::NetUnreachable
            }
        };
        let sock = match sys::connect_to(&path) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                remove_if_stale(&path);
                return Err(unknown());
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Err(ConnectError::TimedOut),
            Err(_) => return Err(unknown()),
        };
        let (seg_fd, seg) = Segment::create(params.send_depth as usize, params.max_sge as usize)
            .map_err(|_| ConnectError::NoResources)?;
        let event = sys::eventfd().map_err(|_| ConnectError::NoResources)?;
        let mut m = Msg {
            kind: REQUEST,
            from: Some(from),
            to: Some(to),
            pid: sys::pid(),
            send_depth: params.send_depth,
            recv_depth: params.recv_depth,
            max_sge: params.max_sge,
            ..Msg::default()
        };
        m.data[..private_data.len()].copy_from_slice(private_data);
        m.data_len = private_data.len() as u8;
        send(&sock, m, &[&seg_fd, &event]).map_err(|_| unknown())?;
        let a = Arc::new(Attempt {
            nic: Arc::downgrade(self),
            raw: sock.as_raw_fd(),
            sock: Mutex::new(Some(sock)),
            token: Mutex::new(0),
            from,
            to,
            deadline: Mutex::new(Some(Instant::now() + self.connect_timeout)),
            pending: Mutex::new(Some(Pending {
                params,
                done,
                seg,
                event,
            })),
        });
        let token = self
            .events
            .add(a.raw, Watch::Attempt(a.clone()))
            .map_err(|_| ConnectError::NoResources)?;
        *lock(&a.token) = token;
        self.events.kick();
        Ok(a)
    }

    fn next_deadline_ms(&self) -> i32 {
        let w = lock(&self.events.watches);
        let now = Instant::now();
        w.values()
            .filter_map(|w| match w {
                Watch::Attempt(a) => *lock(&a.deadline),
                _ => None,
            })
            .map(|d| d.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1)
            .min()
            .unwrap_or(-1)
    }

    fn expire_attempts(&self) {
        let now = Instant::now();
        let late: Vec<(u64, Arc<Attempt>)> = lock(&self.events.watches)
            .iter()
            .filter_map(|(t, w)| match w {
                Watch::Attempt(a) if lock(&a.deadline).is_some_and(|d| d <= now) => {
                    Some((*t, a.clone()))
                }
                _ => None,
            })
            .collect();
        for (t, a) in late {
            self.events.remove(t);
            if let Some(p) = lock(&a.pending).take() {
                (p.done)(Err(ConnectError::TimedOut));
            }
        }
    }

    /// Handles one ready descriptor; false to stop the thread.
    fn handle(self: &Arc<Self>, token: u64, hup: bool) -> bool {
        enum Do {
            Accept(i32),
            Incoming(i32),
            Queued(Arc<Request>),
            Attempt(Arc<Attempt>),
            Sock(Weak<Conn>),
            Event(Weak<Conn>),
            Kick(i32),
        }
        let what = match lock(&self.events.watches).get(&token) {
            None => return true,
            Some(Watch::Address(f)) => Do::Accept(f.as_raw_fd()),
            Some(Watch::Incoming(f)) => Do::Incoming(f.as_raw_fd()),
            Some(Watch::Queued(r)) => Do::Queued(r.clone()),
            Some(Watch::Attempt(a)) => Do::Attempt(a.clone()),
            Some(Watch::ConnSock(c)) => Do::Sock(c.clone()),
            Some(Watch::ConnEvent(c)) => Do::Event(c.clone()),
            Some(Watch::Kick(f)) => Do::Kick(f.as_raw_fd()),
        };
        match what {
            Do::Kick(fd) => {
                sys::drain(fd);
                if self.events.stopping.load(Ordering::SeqCst) {
                    return false;
                }
            }
            Do::Accept(fd) => {
                while let Some(s) = sys::accept(fd) {
                    let raw = s.as_raw_fd();
                    let _ = self.events.add(raw, Watch::Incoming(s));
                }
            }
            Do::Incoming(fd) => {
                let mut buf = [0u8; MSG_MAX + 1];
                let got = sys::recv_msg(fd, &mut buf);
                if matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) && !hup {
                    return true;
                }
                let Some(Watch::Incoming(sock)) = self.events.remove(token) else {
                    return true;
                };
                if let Ok((n, fds)) = got {
                    self.incoming(sock, &buf[..n], fds);
                }
            }
            Do::Queued(r) => {
                // The connector cancelled or died: the request is gone.
                r.take();
                drop(lock(&r.fds).take());
                drop(lock(&r.sock).take());
            }
            Do::Attempt(a) => self.attempt_reply(token, &a, hup),
            Do::Sock(c) => {
                if let Some(c) = c.upgrade() {
                    self.events.remove(token);
                    // A peer that hung up without closing died: its
                    // process closes its descriptors (this socket, then
                    // its address sockets) before it becomes a zombie.
                    // Once it is one, its socket file is stale: removed
                    // first, so that whoever sees the flushed completions
                    // finds it gone.
                    if c.peer_died() {
                        if let Some(p) = &c.peer_proc {
                            if sys::readable_within(p.as_raw_fd(), EXIT_WAIT_MS) {
                                remove_if_stale(&socket_path(&self.dir, *c.peer.ip()));
                            }
                        }
                    }
                    c.peer_gone.store(true, Ordering::Release);
                    c.cq.wake();
                } else {
                    lock(&self.events.watches).remove(&token);
                }
            }
            Do::Event(c) => match c.upgrade() {
                Some(c) => {
                    sys::drain(c.my_event.as_raw_fd());
                    c.cq.wake();
                }
                None => {
                    lock(&self.events.watches).remove(&token);
                }
            },
        }
        true
    }

    /// A `REQUEST` arrived on `sock`.
    fn incoming(self: &Arc<Self>, sock: OwnedFd, data: &[u8], fds: Vec<OwnedFd>) {
        let reject = |why| {
            let m = Msg {
                kind: REJECT,
                why,
                ..Msg::default()
            };
            let _ = send(&sock, m, &[]);
        };
        let Some(m) = Msg::decode(data).filter(|m| m.kind == REQUEST) else {
            return;
        };
        let (Some(from), Some(to)) = (m.from, m.to) else {
            return;
        };
        let mut fds = fds.into_iter();
        let (Some(seg), Some(ev)) = (fds.next(), fds.next()) else {
            return;
        };
        let Some(l) = self.listener_for(to) else {
            return reject(WHY_NO_LISTENER);
        };
        let r = Arc::new(Request {
            nic: Arc::downgrade(self),
            listener: Arc::downgrade(&l),
            raw: sock.as_raw_fd(),
            sock: Mutex::new(Some(sock)),
            token: Mutex::new(0),
            from,
            to,
            pid: m.pid,
            msg: m,
            fds: Mutex::new(Some((seg, ev))),
        });
        {
            let mut q = lock(&l.queue);
            if q.closed || q.reqs.len() >= l.backlog {
                drop(q);
                r.refuse();
                return;
            }
            let queued = Msg {
                kind: QUEUED,
                ..Msg::default()
            };
            let sent = lock(&r.sock).as_ref().map(|s| send(s, queued, &[]));
            if !matches!(sent, Some(Ok(()))) {
                return;
            }
            match self.events.add(r.raw, Watch::Queued(r.clone())) {
                Ok(t) => *lock(&r.token) = t,
                Err(_) => return,
            }
            q.reqs.push_back(r);
        }
        l.events.request_arrived();
    }

    /// A reply (or hang-up) on an attempt's socket.
    fn attempt_reply(self: &Arc<Self>, token: u64, a: &Arc<Attempt>, hup: bool) {
        let mut buf = [0u8; MSG_MAX + 1];
        let (n, fds) = match sys::recv_msg(a.raw, &mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !hup => return,
            Err(_) => (0, Vec::new()),
        };
        let m = Msg::decode(&buf[..n]);
        if m.is_some_and(|m| m.kind == QUEUED) {
            *lock(&a.deadline) = None;
            return;
        }
        self.events.remove(token);
        let Some(p) = lock(&a.pending).take() else {
            return;
        };
        let r = match m {
            Some(m) if m.kind == ACCEPT => {
                self.connected(a, p.params.clone(), p.seg, p.event, m, fds)
            }
            Some(m) if m.kind == REJECT && m.why == WHY_NO_LISTENER => {
                Err(ConnectError::NoListener)
            }
            Some(m) if m.kind == REJECT => Err(ConnectError::Refused),
            // The acceptor's process died or sent garbage.
            _ => Err(ConnectError::HostUnreachable),
        };
        (p.done)(r);
    }

    #[allow(clippy::too_many_arguments)]
    fn connected(
        self: &Arc<Self>,
        a: &Attempt,
        params: QpParams,
        mine: Segment,
        my_event: OwnedFd,
        m: Msg,
        fds: Vec<OwnedFd>,
    ) -> Result<Arc<dyn QueuePair>, ConnectError> {
        let mut fds = fds.into_iter();
        let (Some(seg), Some(ev)) = (fds.next(), fds.next()) else {
            return Err(ConnectError::Refused);
        };
        let theirs = Segment::open(&seg).map_err(|_| ConnectError::Refused)?;
        let sock = lock(&a.sock).take().ok_or(ConnectError::Cancelled)?;
        let conn = self.make_conn(
            a.from, a.to, mine, theirs, m.pid, my_event, ev, sock, params,
        )?;
        Ok(Arc::new(super::ShmQp(conn)))
    }
}

impl NicInner {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn make_conn(
        self: &Arc<Self>,
        local: SocketAddrV4,
        peer: SocketAddrV4,
        mine: Segment,
        theirs: Segment,
        peer_pid: i32,
        my_event: OwnedFd,
        peer_event: OwnedFd,
        sock: OwnedFd,
        params: QpParams,
    ) -> Result<Arc<Conn>, ConnectError> {
        if params.max_sge as usize > super::seg::MAX_STRIDE {
            return Err(ConnectError::NoResources);
        }
        let cq = self.cq(params.cq).ok_or(ConnectError::NoResources)?;
        let reserved = params.send_depth as usize + params.recv_depth as usize;
        if !cq.shared.budget.reserve(reserved) {
            return Err(ConnectError::NoResources);
        }
        let num = self.new_qp_num();
        let (conn, poll) = Conn::new(
            self.clone(),
            Parts {
                num,
                local,
                peer,
                mine,
                theirs,
                peer_pid,
                my_event,
                peer_event,
                sock,
                params,
                reserved,
                cq: cq.shared.clone(),
            },
        );
        match self.events.add_conn(&conn) {
            Ok(tokens) => *lock(&conn.tokens) = vec![tokens.0, tokens.1],
            Err(_) => {
                cq.shared.budget.release(reserved);
                return Err(ConnectError::NoResources);
            }
        }
        lock(&self.conns).insert(num.0, Arc::downgrade(&conn));
        cq.attach(conn.clone(), poll);
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(data: &[u8]) -> Msg {
        let mut m = Msg {
            kind: REQUEST,
            from: Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 7)),
            to: Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 9)),
            pid: 42,
            send_depth: 3,
            recv_depth: 4,
            max_sge: 2,
            ..Msg::default()
        };
        m.data[..data.len()].copy_from_slice(data);
        m.data_len = data.len() as u8;
        m
    }

    #[test]
    fn a_request_carries_its_private_data() {
        for len in [0, 1, MAX_PRIVATE_DATA] {
            let data: Vec<u8> = (1..=len as u8).collect();
            let m = request(&data);
            let mut b = [0u8; MSG_MAX];
            let n = m.encode(&mut b);
            assert_eq!(n, MSG_BYTES + len);
            let back = Msg::decode(&b[..n]).expect("decodes");
            assert_eq!(back, m);
            assert_eq!(back.private_data(), &data[..]);
        }
    }

    #[test]
    fn a_malformed_length_or_stray_data_is_refused() {
        let mut b = [0u8; MSG_MAX + 1];
        let n = request(&[7; 8]).encode((&mut b[..MSG_MAX]).try_into().unwrap());
        // Cut short, or longer than it says.
        assert_eq!(Msg::decode(&b[..n - 1]), None);
        assert_eq!(Msg::decode(&b[..n + 1]), None);
        // A length beyond the bound, with as many bytes as it claims.
        b[36] = MAX_PRIVATE_DATA as u8 + 1;
        assert_eq!(Msg::decode(&b[..MSG_MAX + 1]), None);
        // Data on a message that is not a request.
        b[36] = 8;
        b[6] = ACCEPT;
        assert_eq!(Msg::decode(&b[..n]), None);
    }
}
