//! Connected stream sockets over the provider: the driver of the session
//! protocol ([`super::proto`]), using only the public SPI ([`Provider`]).
//!
//! A [`Runtime`] owns a started provider and is its [`Switch`]: the upcalls
//! hand out switch handles, which index a slot table (no table-wide lock per
//! upcall), and each completion upcall leaves its completion in its
//! connection's inbox and feeds it to the connection's protocol machine
//! unless another thread holds the machine, which then feeds it before it
//! lets go; executing the machine's actions (posting receives and sends,
//! copying, exposing, RDMA) happens there and then.
//!
//! The thread that waits makes the progress: a blocked call polls its own
//! connection's completion queue (`Provider::progress_socket`, which makes
//! the upcalls on that thread), spins up to `poller.spin_budget` empty
//! polls, then sleeps on the connection's wait word. Sleepers are woken only
//! when something they wait for happened (an op of theirs completed, the
//! session opened or failed, a cancellation); a send completion wakes no
//! one. In run-to-completion mode this is the whole data path, with no
//! engine thread; in threads mode the provider's dispatcher also makes the
//! upcalls for connections whose threads sleep. No lock of ours is held
//! across a provider call that could wait for an upcall (`close_socket` is
//! always made with the connection unlocked), and an upcall never waits for
//! a lock of ours.
//!
//! Cancellation (spec §6.2): a cancelled or timed-out blocking connect closes
//! the SAN socket. A send or receive that times out or is cancelled with
//! [`Stream::cancel_pending`] is withdrawn when its buffer is only in switch
//! buffers; when an RDMA op or an exposure uses its buffer, it waits for that
//! up to `rdma_cancel_timeout`, then aborts the connection with
//! `close_socket`, which forces the RDMA's completion, and returns once the
//! fabric no longer touches the buffer.

use super::io::AppBuf;
use super::proto::{self, Action, CancelOutcome, Connection, OpId, RdmaFlow, Role, Stats};
use crate::config::{Config, PollerMode};
use crate::error::{WsaError, WsaResult};
use crate::event::Event;
use crate::fabric::Nic;
use crate::mem::region::Region;
use crate::poller::Notifier;
use crate::spi::{
    Condition, Extension, Overlapped, Provider, ProviderSocket, Switch, SwitchHandle, AF_INET,
    FD_ACCEPT, FD_CONNECT, FD_CONNECT_BIT, IPPROTO_TCP, SOCK_STREAM, SOL_SOCKET, SO_MAX_MSG_SIZE,
    SO_MAX_RDMA_SIZE, SO_RDMA_THRESHOLD_SIZE, WSA_FLAG_OVERLAPPED, WSD_VERSION,
};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

/// Catalog entry id the runtime starts its provider with.
const CATALOG_ENTRY_ID: u32 = 0x5357;

/// RDMA ops a connection may have in flight.
const RDMA_SLOTS: u16 = 4;

/// First nap of a waiting thread in run-to-completion mode.
const NAP_MIN: Duration = Duration::from_micros(20);
/// Longest nap of a waiting thread in run-to-completion mode: the most a
/// sleeping thread adds to the latency of a completion nobody else polls.
const NAP_MAX: Duration = Duration::from_millis(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Settings of the reference switch.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchOptions {
    /// Receive buffers per connection (the credits the peer gets); the
    /// peer gets credits back unasked once half of them were re-posted.
    pub recv_slots: u16,
    /// Send buffers per connection.
    pub send_slots: u16,
    /// Bytes per control buffer (the largest message), clamped to
    /// `SO_MAX_MSG_SIZE`.
    pub slot_size: u32,
    /// Sends above this many bytes go by RDMA; `None`: the provider's
    /// `SO_RDMA_THRESHOLD_SIZE`. Per stream: [`Stream::set_rdma_threshold`].
    pub rdma_threshold: Option<u32>,
    /// The flow this side uses for large sends.
    pub rdma_flow: RdmaFlow,
    /// Accept RDMA-read offers (when the provider supports RDMA read).
    pub accept_rdma_read: bool,
    /// Listen backlog.
    pub backlog: i32,
    /// Bound on a blocking connect (connection manager and negotiation).
    pub connect_timeout: Duration,
    /// Bound on the negotiation of an accepted connection.
    pub handshake_timeout: Duration,
    /// Default bound on `accept`; `None` waits for ever.
    pub accept_timeout: Option<Duration>,
    /// Default bound on a blocking receive; `None` waits for ever.
    pub read_timeout: Option<Duration>,
    /// Default bound on a blocking send; `None` waits for ever.
    pub write_timeout: Option<Duration>,
    /// How long a cancelled transfer whose buffer is in an RDMA in flight
    /// waits for it before the connection is aborted.
    pub rdma_cancel_timeout: Duration,
    /// How long a graceful close waits for FIN and queued messages to leave.
    pub close_timeout: Duration,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        SwitchOptions {
            recv_slots: 16,
            send_slots: 16,
            slot_size: 8192,
            rdma_threshold: None,
            rdma_flow: RdmaFlow::Read,
            accept_rdma_read: true,
            backlog: 128,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            accept_timeout: None,
            read_timeout: None,
            write_timeout: None,
            rdma_cancel_timeout: Duration::from_secs(2),
            close_timeout: Duration::from_secs(2),
        }
    }
}

/// Engine and switch settings of a [`Runtime`].
#[derive(Clone, Debug, PartialEq)]
pub struct RuntimeConfig {
    pub engine: Config,
    pub switch: SwitchOptions,
}

impl Default for RuntimeConfig {
    /// The engine's defaults with queue pairs sized for the switch (so that
    /// more connections share one completion queue), run to completion: the
    /// streams' own threads make the progress.
    fn default() -> Self {
        let mut engine = Config::default();
        engine.poller.mode = PollerMode::RunToCompletion;
        engine.qp.recv_depth = 64;
        engine.qp.send_depth = 64;
        RuntimeConfig {
            engine,
            switch: SwitchOptions::default(),
        }
    }
}

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

/// Switch handles per chunk of the handle table.
const CHUNK: usize = 64;
/// Chunks: at most `CHUNK * CHUNKS` sockets of one runtime at once.
const CHUNKS: usize = 1024;

/// `CHUNK` slots of the handle table.
type Chunk = Box<[Mutex<Entry>]>;

/// One switch handle's entry: what the upcalls need.
#[derive(Default)]
struct Entry {
    /// The handle this entry belongs to (0: free); a stale handle (the
    /// slot was reused) does not match.
    handle: usize,
    /// The provider's context for `query_socket_handle_context`.
    context: usize,
    /// The connection, once the socket has one. The entry keeps it (pools,
    /// overlapped records) alive until `close_socket_handle`, the
    /// provider's last upcall for the socket.
    conn: Option<Arc<Conn>>,
}

/// The switch handle table, shared by the runtime and the provider (which
/// holds it as its `Switch`). A handle names its slot (low 32 bits: the
/// index plus one; high bits: a generation), so an upcall finds its
/// connection without a table-wide lock: it locks only its own slot, which
/// no other connection touches. Chunks are allocated on first use and never
/// freed; free slots are kept in a list touched only by socket creation
/// and the final close.
struct Upcalls {
    chunks: Box<[OnceLock<Chunk>]>,
    /// Slots never used yet start here.
    fresh: AtomicUsize,
    /// Slots whose socket was closed, for reuse.
    free: Mutex<Vec<usize>>,
    /// Generation of the next handle (bumped per creation).
    generation: AtomicUsize,
}

impl Upcalls {
    fn new() -> Upcalls {
        Upcalls {
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
            fresh: AtomicUsize::new(0),
            free: Mutex::new(Vec::new()),
            generation: AtomicUsize::new(1),
        }
    }

    fn slot(&self, index: usize) -> Option<&Mutex<Entry>> {
        let chunk = self.chunks.get(index / CHUNK)?;
        let chunk = chunk.get_or_init(|| (0..CHUNK).map(|_| Mutex::default()).collect());
        chunk.get(index % CHUNK)
    }

    /// The live entry of handle `h`, locked.
    fn entry(&self, h: SwitchHandle) -> Option<MutexGuard<'_, Entry>> {
        let index = (h.0 & 0xffff_ffff).checked_sub(1)?;
        let e = lock(self.slot(index)?);
        (e.handle == h.0 && h.0 != 0).then_some(e)
    }

    fn conn(&self, h: SwitchHandle) -> Option<Arc<Conn>> {
        self.entry(h).and_then(|e| e.conn.clone())
    }

    /// Enters `conn` as the connection of handle `h`.
    fn attach(&self, h: SwitchHandle, conn: Arc<Conn>) -> WsaResult<()> {
        let mut e = self.entry(h).ok_or(WsaError::WSAENOTSOCK)?;
        e.conn = Some(conn);
        Ok(())
    }
}

impl Switch for Upcalls {
    fn create_socket_handle(&self, _: u32, context: usize) -> WsaResult<SwitchHandle> {
        let reused = lock(&self.free).pop();
        let index = match reused {
            Some(i) => i,
            None => {
                let i = self.fresh.fetch_add(1, Ordering::Relaxed);
                if i >= CHUNK * CHUNKS {
                    self.fresh.fetch_sub(1, Ordering::Relaxed);
                    return Err(WsaError::WSAENOBUFS);
                }
                i
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
        let h = (generation << 32) | (index + 1);
        let slot = self.slot(index).ok_or(WsaError::WSAENOBUFS)?;
        *lock(slot) = Entry {
            handle: h,
            context,
            conn: None,
        };
        Ok(SwitchHandle(h))
    }

    fn close_socket_handle(&self, h: SwitchHandle) -> WsaResult<()> {
        let conn = {
            let mut e = self.entry(h).ok_or(WsaError::WSAENOTSOCK)?;
            let conn = e.conn.take();
            *e = Entry::default();
            conn
        };
        lock(&self.free).push((h.0 & 0xffff_ffff) - 1);
        // The connection goes after the slot is unlocked.
        drop(conn);
        Ok(())
    }

    fn query_socket_handle_context(&self, h: SwitchHandle) -> WsaResult<usize> {
        self.entry(h)
            .map(|e| e.context)
            .ok_or(WsaError::WSAENOTSOCK)
    }

    fn complete_overlapped_request(
        &self,
        h: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        ov.complete(error, bytes);
        if let Some(c) = self.conn(h) {
            c.on_completion(ov, error, bytes);
        }
        Ok(())
    }
}

/// A started provider with the reference switch on top: the factory of
/// [`Listener`]s and [`Stream`]s. The provider is cleaned up when the last
/// `Arc<Runtime>` (streams and listeners hold one) goes.
pub struct Runtime {
    provider: Provider,
    upcalls: Arc<Upcalls>,
    opts: SwitchOptions,
    can_rdma_read: bool,
}

impl Runtime {
    /// A runtime on the NIC `config.engine` selects (the soft fabric's
    /// process-wide network by default).
    pub fn start(config: RuntimeConfig) -> io::Result<Arc<Runtime>> {
        Self::check(&config)?;
        let p = Provider::new(config.engine.clone()).map_err(io::Error::other)?;
        Self::start_with(p, config.switch)
    }

    /// A runtime on a given NIC (e.g. one of a private soft network).
    pub fn with_nic(config: RuntimeConfig, nic: Arc<dyn Nic>) -> io::Result<Arc<Runtime>> {
        Self::check(&config)?;
        let p = Provider::with_nic(config.engine.clone(), nic).map_err(io::Error::other)?;
        Self::start_with(p, config.switch)
    }

    fn check(config: &RuntimeConfig) -> io::Result<()> {
        let invalid = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        let o = &config.switch;
        let q = &config.engine.qp;
        if q.recv_depth < u32::from(o.recv_slots)
            || q.send_depth < u32::from(o.send_slots) + u32::from(RDMA_SLOTS)
        {
            return invalid(format!(
                "queue pairs too shallow for {} receives and {} sends",
                o.recv_slots, o.send_slots
            ));
        }
        proto::Config {
            recv_slots: o.recv_slots,
            send_slots: o.send_slots,
            slot_size: o.slot_size,
            ..proto::Config::default()
        }
        .validate()
        .or_else(invalid)
    }

    fn start_with(provider: Provider, opts: SwitchOptions) -> io::Result<Arc<Runtime>> {
        let upcalls = Arc::new(Upcalls::new());
        provider
            .startup(WSD_VERSION, upcalls.clone(), CATALOG_ENTRY_ID)
            .map_err(wsa_io)?;
        let can_rdma_read = provider.extension(&Extension::RdmaRead.guid()).is_ok();
        Ok(Arc::new(Runtime {
            provider,
            upcalls,
            opts,
            can_rdma_read,
        }))
    }

    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    pub fn options(&self) -> &SwitchOptions {
        &self.opts
    }

    fn socket(&self) -> io::Result<ProviderSocket> {
        self.provider
            .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
            .map_err(wsa_io)
    }

    fn sockopt(&self, s: ProviderSocket, name: i32) -> Option<u32> {
        let mut v = [0u8; 4];
        self.provider
            .get_sockopt(s, SOL_SOCKET, name, &mut v)
            .ok()?;
        Some(u32::from_le_bytes(v))
    }
}

/// The runtime is the switch of its provider; the provider itself holds the
/// handle table (not the runtime, which owns the provider).
impl Switch for Runtime {
    fn create_socket_handle(&self, id: u32, context: usize) -> WsaResult<SwitchHandle> {
        self.upcalls.create_socket_handle(id, context)
    }
    fn close_socket_handle(&self, h: SwitchHandle) -> WsaResult<()> {
        self.upcalls.close_socket_handle(h)
    }
    fn query_socket_handle_context(&self, h: SwitchHandle) -> WsaResult<usize> {
        self.upcalls.query_socket_handle_context(h)
    }
    fn complete_overlapped_request(
        &self,
        h: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        self.upcalls
            .complete_overlapped_request(h, ov, error, bytes)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        while self.provider.is_started() {
            if self.provider.cleanup().is_err() {
                break;
            }
        }
    }
}

fn wsa_io(e: WsaError) -> io::Error {
    let kind = match e {
        WsaError::WSAECONNREFUSED => io::ErrorKind::ConnectionRefused,
        WsaError::WSAECONNRESET => io::ErrorKind::ConnectionReset,
        WsaError::WSAECONNABORTED | WsaError::WSA_OPERATION_ABORTED => {
            io::ErrorKind::ConnectionAborted
        }
        WsaError::WSAETIMEDOUT => io::ErrorKind::TimedOut,
        WsaError::WSAEADDRINUSE => io::ErrorKind::AddrInUse,
        WsaError::WSAEADDRNOTAVAIL => io::ErrorKind::AddrNotAvailable,
        // `ErrorKind::{Host,Network}Unreachable` are named only from Rust
        // 1.83 on (the MSRV is 1.80): take them from the OS error codes.
        WsaError::WSAEHOSTUNREACH => io::Error::from_raw_os_error(libc::EHOSTUNREACH).kind(),
        WsaError::WSAENETUNREACH => io::Error::from_raw_os_error(libc::ENETUNREACH).kind(),
        WsaError::WSAENOTCONN => io::ErrorKind::NotConnected,
        WsaError::WSAEWOULDBLOCK => io::ErrorKind::WouldBlock,
        WsaError::WSAENOBUFS => io::ErrorKind::OutOfMemory,
        WsaError::WSAEINVAL | WsaError::WSAEFAULT => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{} ({})", e.name(), e.code()))
}

fn proto_io(e: proto::Error) -> io::Error {
    let kind = match e {
        proto::Error::WouldBlock => io::ErrorKind::WouldBlock,
        proto::Error::Shutdown => io::ErrorKind::BrokenPipe,
        proto::Error::TimedOut => io::ErrorKind::TimedOut,
        proto::Error::Aborted => io::ErrorKind::ConnectionAborted,
        proto::Error::NoBuffers => io::ErrorKind::OutOfMemory,
        proto::Error::Transport(c) if c == WsaError::WSAECONNRESET.code() as u32 => {
            io::ErrorKind::ConnectionReset
        }
        proto::Error::Transport(_) => io::ErrorKind::ConnectionAborted,
        proto::Error::Malformed(_)
        | proto::Error::Protocol(_)
        | proto::Error::CreditViolation { .. }
        | proto::Error::CreditOverflow => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

// ----------------------------------------------------------------------
// Connections
// ----------------------------------------------------------------------

/// One connection's shared state: pools, overlapped records, the machine.
pub(super) struct Conn {
    pub(super) provider: Provider,
    pub(super) sock: ProviderSocket,
    pub(super) slot_size: usize,
    n_recv: usize,
    n_send: usize,
    pub(super) recv_pool: Region,
    pub(super) send_pool: Region,
    /// Receive slots, then send slots, then RDMA ops.
    pub(super) ovs: Box<[Overlapped]>,
    state: Mutex<State>,
    /// Completions the upcalls delivered, in dispatch order, not yet fed to
    /// the machine: an upcall that finds the state locked (by an
    /// application thread, possibly its own caller further up the stack)
    /// leaves its completion here for the holder, which feeds it before it
    /// unlocks, and looks again after (see [`Conn::with_state`]). At most one
    /// entry per overlapped record, so it never grows past `ovs.len()`.
    inbox: Mutex<VecDeque<Done>>,
    /// Threads sleeping for this connection (a blocked call, a close). A
    /// notify costs one load when nobody sleeps; it is made only when an op
    /// result, the session state or a cancellation changed (never for a
    /// send completion, unless a close waits for quiescence).
    sleepers: Notifier,
    /// Empty polls of the connection's completion queue before a waiting
    /// thread sleeps (`poller.spin_budget`).
    spin_budget: u32,
    /// The provider runs to completion: nothing dispatches while every
    /// thread sleeps, so sleeps are bounded naps (see [`Conn::wait_until`]).
    rtc: bool,
    local: SocketAddrV4,
    peer: SocketAddrV4,
}

struct State {
    m: Connection,
    /// Application buffers of pending ops.
    bufs: HashMap<OpId, AppBuf>,
    /// Results of completed ops not yet collected.
    results: HashMap<OpId, Result<u64, proto::Error>>,
    /// Local registration of each RDMA op's buffer.
    rdma_regs: Vec<Option<u64>>,
    connected: bool,
    /// `close_socket` was called (or is being called).
    socket_closed: bool,
    /// Bumped by `cancel_pending`: blocking calls started before give up.
    cancel_gen: u64,
    /// Something a sleeping thread may wait for changed: notify after
    /// unlocking.
    wake: bool,
    /// A close waits for quiescence: every completion is worth a wake.
    watch_all: bool,
}

/// One completion an upcall delivered: the index of its overlapped record
/// and the result.
#[derive(Clone, Copy)]
struct Done {
    index: usize,
    error: u32,
    bytes: u32,
}

#[derive(Clone, Copy)]
enum OvKind {
    Recv(u16),
    Send(u16),
    Rdma(u16),
}

static NEXT_OP: AtomicU64 = AtomicU64::new(1);

fn new_op() -> OpId {
    OpId(NEXT_OP.fetch_add(1, Ordering::Relaxed))
}

impl Conn {
    /// Sets up the protocol on a connected socket: pools registered, the
    /// connection entered in the handle table, receives posted (and HELLO
    /// sent by the connector).
    fn new(
        rt: &Runtime,
        sock: ProviderSocket,
        role: Role,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> io::Result<Arc<Conn>> {
        let o = &rt.opts;
        let p = &rt.provider;
        let max_msg = rt.sockopt(sock, SO_MAX_MSG_SIZE).unwrap_or(u32::MAX);
        let slot = o.slot_size.min(max_msg);
        let threshold = o
            .rdma_threshold
            .or_else(|| rt.sockopt(sock, SO_RDMA_THRESHOLD_SIZE))
            .unwrap_or(64 << 10);
        let max_rdma = rt.sockopt(sock, SO_MAX_RDMA_SIZE).unwrap_or(1 << 30).max(1);
        let cfg = proto::Config {
            recv_slots: o.recv_slots,
            send_slots: o.send_slots,
            slot_size: slot,
            rdma_threshold: u64::from(threshold),
            max_rdma_op: max_rdma,
            rdma_flow: o.rdma_flow,
            can_rdma_read: rt.can_rdma_read && o.accept_rdma_read,
            credit_batch: (o.recv_slots / 2).max(2),
            rdma_slots: RDMA_SLOTS,
        };
        let m = Connection::new(cfg, role)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let (n_recv, n_send) = (usize::from(o.recv_slots), usize::from(o.send_slots));
        let slot = slot as usize;
        let policy = p.config().mem.mlock;
        let pool = |n: usize| Region::new(n * slot, policy).map_err(io::Error::other);
        let (recv_pool, send_pool) = (pool(n_recv)?, pool(n_send)?);
        let n_ov = n_recv + n_send + usize::from(RDMA_SLOTS);
        let conn = Arc::new(Conn {
            provider: p.clone(),
            sock,
            slot_size: slot,
            n_recv,
            n_send,
            recv_pool,
            send_pool,
            ovs: (0..n_ov).map(|_| Overlapped::new(0)).collect(),
            state: Mutex::new(State {
                m,
                bufs: HashMap::new(),
                results: HashMap::new(),
                rdma_regs: vec![None; usize::from(RDMA_SLOTS)],
                connected: false,
                socket_closed: false,
                cancel_gen: 0,
                wake: false,
                watch_all: false,
            }),
            inbox: Mutex::new(VecDeque::with_capacity(n_ov)),
            sleepers: Notifier::default(),
            spin_budget: p.config().poller.spin_budget,
            rtc: p.config().poller.mode == PollerMode::RunToCompletion,
            local,
            peer,
        });
        if let Err(e) = conn.register_pools() {
            // Closed before the pools are dropped: nothing stays registered.
            let _ = p.close_socket(sock);
            return Err(wsa_io(e));
        }
        let h = p.switch_handle(sock).map_err(wsa_io)?;
        rt.upcalls.attach(h, conn.clone()).map_err(wsa_io)?;
        conn.with_state(|_| ());
        Ok(conn)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn recv_ov(&self, slot: u16) -> usize {
        usize::from(slot)
    }

    pub(super) fn send_ov(&self, slot: u16) -> usize {
        self.n_recv + usize::from(slot)
    }

    pub(super) fn rdma_ov(&self, rdma: u16) -> usize {
        self.n_recv + self.n_send + usize::from(rdma)
    }

    /// Index of `ov` in `ovs`, if it is one of ours.
    fn ov_index(&self, ov: &Overlapped) -> Option<usize> {
        let base = self.ovs.as_ptr() as usize;
        let at = ov as *const Overlapped as usize;
        let size = std::mem::size_of::<Overlapped>();
        if at < base || at >= base + self.ovs.len() * size {
            return None;
        }
        Some((at - base) / size)
    }

    fn ov_kind(&self, i: usize) -> OvKind {
        if i < self.n_recv {
            OvKind::Recv(i as u16)
        } else if i < self.n_recv + self.n_send {
            OvKind::Send((i - self.n_recv) as u16)
        } else {
            OvKind::Rdma((i - self.n_recv - self.n_send) as u16)
        }
    }

    /// Runs `f` on the state, executes the machine's actions and unlocks
    /// ([`Conn::settle`]).
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st);
        self.settle(st);
        r
    }

    /// Executes the machine's actions and feeds it the completions waiting
    /// in the inbox until both are exhausted, then unlocks; wakes sleepers if
    /// something they wait for changed and closes the socket if the machine
    /// aborted. Once unlocked, takes the state again if a completion arrived
    /// meanwhile and nobody else holds it: an upcall that found the state
    /// locked left its completion in the inbox before this thread's last look
    /// or before this unlock, so either this loop or the upcall's own
    /// `try_lock` feeds it.
    fn settle<'a>(&'a self, mut st: MutexGuard<'a, State>) {
        loop {
            let mut abort = false;
            loop {
                abort |= self.run(&mut st);
                let Some(d) = lock(&self.inbox).pop_front() else {
                    break;
                };
                self.feed(&mut st, d);
            }
            let wake = std::mem::take(&mut st.wake);
            drop(st);
            if wake {
                self.sleepers.notify();
            }
            if abort {
                self.close_socket();
            }
            st = match self.try_state() {
                Some(st) => st,
                None => return,
            };
        }
    }

    /// The state, if a completion waits in the inbox and no other thread
    /// holds the state (that thread feeds it before it unlocks).
    fn try_state(&self) -> Option<MutexGuard<'_, State>> {
        if lock(&self.inbox).is_empty() {
            return None;
        }
        match self.state.try_lock() {
            Ok(st) => Some(st),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// A completion upcall for one of our records.
    fn on_completion(&self, ov: &Overlapped, error: u32, bytes: u32) {
        let Some(index) = self.ov_index(ov) else {
            return;
        };
        lock(&self.inbox).push_back(Done {
            index,
            error,
            bytes,
        });
        // Never waits for the state inside an upcall: whoever holds it
        // (perhaps this thread's own caller) feeds the completion.
        if let Some(st) = self.try_state() {
            self.settle(st);
        }
    }

    /// Feeds one delivered completion to the machine (state locked).
    fn feed(&self, st: &mut State, d: Done) {
        let result = if d.error == 0 { Ok(()) } else { Err(d.error) };
        let kind = self.ov_kind(d.index);
        if st.watch_all {
            st.wake = true;
        }
        match kind {
            OvKind::Recv(slot) => match result {
                Ok(()) => {
                    let n = d.bytes as usize;
                    let mut head = [0u8; proto::MAX_HEAD];
                    let k = n.min(proto::MAX_HEAD).min(self.slot_size);
                    if self.read_head(slot, &mut head[..k]).is_ok() {
                        st.m.recv_done(slot, Ok((&head[..k], n)));
                    } else {
                        st.m.recv_done(slot, Err(WsaError::WSAEFAULT.code() as u32));
                    }
                }
                Err(e) => st.m.recv_done(slot, Err(e)),
            },
            OvKind::Send(slot) => st.m.send_done(slot, result),
            OvKind::Rdma(rdma) => {
                if let Some(h) = st.rdma_regs[usize::from(rdma)].take() {
                    let _ = self.provider.deregister_memory(self.sock, h);
                }
                st.m.rdma_done(rdma, result);
            }
        }
    }

    /// Executes the machine's pending actions (state locked). Returns
    /// whether the connection must now be aborted (`close_socket`, to be
    /// called unlocked).
    fn run(&self, st: &mut State) -> bool {
        let mut abort = false;
        while let Some(a) = st.m.poll_action() {
            let code = |e: WsaError| e.code() as u32;
            match a {
                Action::PostRecv { slot } => {
                    if let Err(e) = self.post_recv(slot) {
                        st.m.recv_done(slot, Err(code(e)));
                    }
                }
                Action::Send {
                    slot,
                    head,
                    payload,
                } => {
                    let payload =
                        payload.and_then(|p| st.bufs.get(&p.op).map(|b| (*b, p.offset, p.len)));
                    if let Err(e) = self.post_send(slot, head.as_bytes(), payload) {
                        st.m.send_done(slot, Err(code(e)));
                    }
                }
                Action::CopyOut {
                    slot,
                    slot_offset,
                    op,
                    op_offset,
                    len,
                } => {
                    if let Some(b) = st.bufs.get(&op) {
                        if self
                            .copy_out(slot, slot_offset, *b, op_offset, len)
                            .is_err()
                        {
                            st.m.abort(proto::Error::Protocol("copy outside the receive buffer"));
                        }
                    }
                }
                Action::Expose {
                    xfer,
                    op,
                    offset,
                    len,
                    access,
                } => {
                    let r = match st.bufs.get(&op) {
                        Some(b) => self.expose(*b, offset, len, access == proto::Access::Write),
                        None => Err(WsaError::WSAEFAULT),
                    };
                    st.m.exposed(xfer, r.map_err(code));
                }
                Action::Unexpose { desc, .. } => {
                    let _ = self.provider.deregister_rdma_memory(self.sock, &desc);
                }
                Action::RdmaRead {
                    rdma,
                    op,
                    op_offset,
                    len,
                    desc,
                    remote_offset,
                }
                | Action::RdmaWrite {
                    rdma,
                    op,
                    op_offset,
                    len,
                    desc,
                    remote_offset,
                } => {
                    let write = matches!(a, Action::RdmaWrite { .. });
                    let r = match st.bufs.get(&op) {
                        Some(b) => {
                            self.post_rdma(rdma, write, *b, op_offset, len, &desc, remote_offset)
                        }
                        None => Err(WsaError::WSAEFAULT),
                    };
                    match r {
                        Ok(h) => st.rdma_regs[usize::from(rdma)] = Some(h),
                        Err(e) => st.m.rdma_done(rdma, Err(code(e))),
                    }
                }
                Action::SendComplete { op, result } | Action::RecvComplete { op, result } => {
                    st.bufs.remove(&op);
                    st.results.insert(op, result);
                    st.wake = true;
                }
                Action::Connected => {
                    st.connected = true;
                    st.wake = true;
                }
                Action::Abort { .. } => {
                    abort = !st.socket_closed;
                    st.wake = true;
                }
            }
        }
        abort
    }

    /// Closes the SAN socket (abortive, once), then tells the machine. Must
    /// be called with the state unlocked: outside an upcall `close_socket`
    /// waits until the provider dispatched the flushed completions.
    fn close_socket(&self) {
        let first = self.with_state(|st| !std::mem::replace(&mut st.socket_closed, true));
        if !first {
            return;
        }
        let _ = self.provider.close_socket(self.sock);
        self.with_state(|st| st.m.closed());
    }

    /// Dispatches the completions waiting in this connection's completion
    /// queue on the calling thread (never with the state locked).
    fn progress(&self) -> usize {
        self.provider.progress_socket(self.sock)
    }

    /// Waits until `done(state)` or `deadline`, or until `give_up(state)`
    /// (cancellation); returns whether `done` holds. The waiting thread
    /// makes the progress: it polls the connection's completion queue itself
    /// (the provider dispatches the completions to the upcalls on this
    /// thread), up to `spin_budget` empty polls, then registers as a sleeper
    /// and sleeps until a completion it waits for is delivered (by another
    /// thread's progress or the provider's dispatcher) or the deadline.
    ///
    /// In run-to-completion mode nothing dispatches while every thread
    /// sleeps, and the public SPI has no call that sleeps until a socket's
    /// completion queue has work with a deadline; so there the sleep is a
    /// nap of [`NAP_MIN`] doubling up to [`NAP_MAX`], after which the thread
    /// polls again.
    fn wait_until(
        &self,
        deadline: Option<Instant>,
        mut done: impl FnMut(&mut State) -> bool,
        mut give_up: impl FnMut(&State) -> bool,
    ) -> bool {
        let mut idle = 0u32;
        let mut nap = NAP_MIN;
        loop {
            let (ok, stop) = self.with_state(|st| (done(st), give_up(st)));
            if ok {
                return true;
            }
            if stop {
                return false;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return false;
            }
            if self.progress() > 0 {
                idle = 0;
                nap = NAP_MIN;
                continue;
            }
            if idle < self.spin_budget {
                idle += 1;
                std::hint::spin_loop();
                continue;
            }
            let token = self.sleepers.prepare();
            // Registered: a completion delivered from here on notifies.
            if self.progress() > 0 || self.with_state(|st| done(st) || give_up(st)) {
                drop(token);
                idle = 0;
                continue;
            }
            let until = if self.rtc {
                let n = now + nap;
                nap = (nap * 2).min(NAP_MAX);
                Some(deadline.map_or(n, |d| d.min(n)))
            } else {
                deadline
            };
            token.wait(until);
            idle = 0;
        }
    }

    /// Starts an op with `start` and waits for its result; on timeout or
    /// cancellation takes the cancel path (spec §6.2).
    fn blocking(
        &self,
        op: OpId,
        timeout: Option<Duration>,
        rdma_cancel: Duration,
        start: impl FnOnce(&mut State),
    ) -> io::Result<u64> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let gen = self.with_state(|st| {
            start(st);
            st.cancel_gen
        });
        let done = self.wait_until(
            deadline,
            |st| st.results.contains_key(&op),
            |st| st.cancel_gen != gen,
        );
        if done {
            return self.with_state(|st| take_result(st, op));
        }
        let mut st = self.lock();
        let kind = if st.cancel_gen != gen {
            io::ErrorKind::Interrupted
        } else {
            io::ErrorKind::TimedOut
        };
        let outcome = st.m.app_cancel(op);
        match outcome {
            CancelOutcome::NotFound => {
                let r = take_result(&mut st, op);
                self.settle(st);
                r
            }
            CancelOutcome::Cancelled { done } => {
                st.bufs.remove(&op);
                self.settle(st);
                if done > 0 {
                    Ok(done)
                } else {
                    Err(io::Error::new(kind, "transfer cancelled"))
                }
            }
            CancelOutcome::InFlight => {
                self.settle(st);
                // The buffer is in an RDMA op or exposed: wait for it, then
                // abort the connection, which forces its completion.
                let until = Instant::now() + rdma_cancel;
                if self.wait_until(Some(until), |st| st.results.contains_key(&op), |_| false) {
                    return self.with_state(|st| take_result(st, op));
                }
                self.with_state(|st| st.m.abort(proto::Error::TimedOut));
                // After close_socket the fabric no longer touches the buffer
                // and the machine completes the op once its RDMA came back
                // flushed (CLOSE-3): the wait below ends (no deadline, since
                // returning earlier would free a buffer the NIC may use).
                self.wait_until(None, |st| st.results.contains_key(&op), |_| false);
                self.with_state(|st| st.results.remove(&op));
                Err(io::Error::new(
                    kind,
                    "transfer cancelled while its buffer was in an RDMA op; connection aborted",
                ))
            }
        }
    }
}

fn take_result(st: &mut State, op: OpId) -> io::Result<u64> {
    match st.results.remove(&op) {
        Some(Ok(n)) => Ok(n),
        Some(Err(e)) => Err(proto_io(e)),
        None => Err(io::Error::other("op result missing")),
    }
}

// ----------------------------------------------------------------------
// Listener
// ----------------------------------------------------------------------

/// A listening SAN socket.
pub struct Listener {
    rt: Arc<Runtime>,
    sock: ProviderSocket,
    event: Arc<Event>,
    local: SocketAddrV4,
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

    /// Accepts the next connection (bounded by `accept_timeout`).
    pub fn accept(&self) -> io::Result<(Stream, SocketAddrV4)> {
        self.accept_timeout(self.rt.opts.accept_timeout)
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
    /// and negotiates (bounded by `handshake_timeout`).
    pub fn try_accept(&self) -> io::Result<(Stream, SocketAddrV4)> {
        let p = &self.rt.provider;
        let (s, peer) = p
            .accept(self.sock, &mut |_| Condition::Accept)
            .map_err(wsa_io)?;
        let local = p.local_addr(s).ok().flatten().unwrap_or(self.local);
        let conn = match Conn::new(&self.rt, s, Role::Acceptor, local, peer) {
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

/// Waits for the peer's HELLO; closes the socket on failure.
fn handshake(conn: &Arc<Conn>, deadline: Instant, cancel: Option<&CancelToken>) -> io::Result<()> {
    if let Some(c) = cancel {
        lock(&c.0.conns).push(Arc::downgrade(conn));
    }
    let done = conn.wait_until(
        Some(deadline),
        |st| st.connected || st.m.error().is_some(),
        |_| cancel.is_some_and(CancelToken::is_cancelled),
    );
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

// ----------------------------------------------------------------------
// Stream
// ----------------------------------------------------------------------

/// A connected stream socket over the SAN (`Read`/`Write`, blocking with
/// timeouts, or non-blocking `try_*`). `Sync`: one thread may send while
/// another receives; concurrent sends (or receives) are serialised.
pub struct Stream {
    rt: Arc<Runtime>,
    conn: Arc<Conn>,
    send_lock: Mutex<()>,
    recv_lock: Mutex<()>,
    /// (read, write) timeouts.
    timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
    closed: AtomicBool,
}

impl Stream {
    fn new(rt: Arc<Runtime>, conn: Arc<Conn>) -> Stream {
        let t = (rt.opts.read_timeout, rt.opts.write_timeout);
        Stream {
            rt,
            conn,
            send_lock: Mutex::new(()),
            recv_lock: Mutex::new(()),
            timeouts: Mutex::new(t),
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
        let conn = match Conn::new(rt, s, Role::Connector, local, addr) {
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
        lock(&self.timeouts).0 = t;
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) {
        lock(&self.timeouts).1 = t;
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
        let t = lock(&self.timeouts).1;
        self.send_timeout(buf, t)
    }

    pub fn send_timeout(&self, buf: &[u8], timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _g = lock(&self.send_lock);
        let op = new_op();
        let app = AppBuf::of(buf);
        let len = buf.len() as u64;
        self.conn
            .blocking(op, timeout, self.rt.opts.rdma_cancel_timeout, |st| {
                st.bufs.insert(op, app);
                st.m.app_send(op, len, false);
            })
            .map(|n| n as usize)
    }

    /// Sends what credits allow now, by copy (`WouldBlock` if nothing).
    pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _g = lock(&self.send_lock);
        // Credits returned by the peer may wait in the completion queue.
        self.conn.progress();
        let op = new_op();
        let app = AppBuf::of(buf);
        self.conn.with_state(|st| {
            st.bufs.insert(op, app);
            st.m.app_send(op, buf.len() as u64, true);
            // A non-blocking send completes within `app_send`.
        });
        self.conn
            .with_state(|st| {
                st.bufs.remove(&op);
                take_result(st, op)
            })
            .map(|n| n as usize)
    }

    /// Receives at least one byte (blocking, bounded by the read timeout);
    /// 0 at end of stream.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let t = lock(&self.timeouts).0;
        self.recv_timeout(buf, t)
    }

    pub fn recv_timeout(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _g = lock(&self.recv_lock);
        let op = new_op();
        let len = buf.len() as u64;
        let app = AppBuf::of_mut(buf);
        self.conn
            .blocking(op, timeout, self.rt.opts.rdma_cancel_timeout, |st| {
                st.bufs.insert(op, app);
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
        let _g = lock(&self.recv_lock);
        // What arrived may wait in the completion queue.
        self.conn.progress();
        let op = new_op();
        let len = buf.len() as u64;
        let app = AppBuf::of_mut(buf);
        let bound = self.rt.opts.rdma_cancel_timeout;
        self.conn
            .blocking(op, Some(bound), bound, |st| {
                st.bufs.insert(op, app);
                st.m.app_recv(op, len, true);
            })
            .map(|n| n as usize)
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
        let graceful = !abortive
            && self.conn.with_state(|st| {
                let ok = !st.m.has_pending_data() && st.m.error().is_none();
                if ok {
                    let _ = st.m.app_shutdown();
                }
                ok
            });
        if graceful {
            let deadline = Instant::now() + self.rt.opts.close_timeout;
            self.conn.with_state(|st| st.watch_all = true);
            self.conn.wait_until(
                Some(deadline),
                |st| st.m.error().is_some() || (st.m.fin_delivered() && st.m.is_quiescent()),
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
