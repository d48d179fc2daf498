//! The runtime: a started provider with the reference switch on top, the
//! factory of [`super::Listener`]s and [`super::Stream`]s, and the switch's
//! side of the SPI. The upcalls find their connection through the switch
//! handle, which indexes a slot table: a completion upcall reaches its
//! connection through the slot's published wire and the completed record
//! (`io.rs`, invariant 7), without a lock; the other upcalls lock only their
//! own slot, never a table-wide lock.

use super::connection::{lock, wsa_io, Conn, CqWake, RDMA_SLOTS};
use super::io::Wire;
use super::proto::{self, RdmaFlow, Role};
use super::ready::{Hub, Readiness};
use crate::config::PollerMode;
use crate::config::{Config, FabricKind};
use crate::error::{WsaError, WsaResult};
use crate::fabric::{Nic, Waker};
use crate::spi::{
    Extension, Overlapped, Provider, ProviderSocket, Switch, SwitchHandle, AF_INET, IPPROTO_TCP,
    SOCK_STREAM, SOL_SOCKET, SO_MAX_MSG_SIZE, SO_MAX_RDMA_SIZE, SO_RDMA_THRESHOLD_SIZE,
    WSA_FLAG_OVERLAPPED, WSD_VERSION,
};
use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Catalog entry id the runtime starts its provider with.
const CATALOG_ENTRY_ID: u32 = 0x5357;

/// Settings of the reference switch.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchOptions {
    /// Receive buffers per connection (the credits the peer gets).
    pub recv_slots: u16,
    /// Credits go back to the peer unasked once this many receives were
    /// re-posted; `None`: half of `recv_slots`; `Some(0)`: only in the
    /// headers of other messages and in answers to the peer's NEED.
    pub credit_batch: Option<u16>,
    /// Send buffers per connection.
    pub send_slots: u16,
    /// Bytes per message buffer (the largest message), clamped to
    /// `SO_MAX_MSG_SIZE`: copied sends that fit with the header travel
    /// inline, longer ones through the rings. Past its first 256 bytes a
    /// buffer lies apart from the others' first 256 bytes, so small
    /// messages keep one page resident. The default, 4 KiB and the header, makes a copied
    /// send of up to 4 KiB one message (one send on the fabric, as an
    /// rsocket's RDMA write with immediate), not a ring write and a DATA.
    pub slot_size: u32,
    /// Bytes of each of a connection's two rings (copied stream bytes in
    /// flight); the session uses the smaller of both sides'.
    pub ring_size: u32,
    /// Sends above this many bytes go by RDMA; `None`: the provider's
    /// `SO_RDMA_THRESHOLD_SIZE`. Per stream: [`super::Stream::set_rdma_threshold`].
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
    /// Default bound on a blocking receive; `None` waits for ever. Read
    /// and write timeouts end up to three ticks of the kernel's coarse clock
    /// late (`crate::coarse`), never early.
    pub read_timeout: Option<Duration>,
    /// Default bound on a blocking send; `None` waits for ever.
    pub write_timeout: Option<Duration>,
    /// How long a cancelled transfer whose buffer is in an RDMA in flight
    /// waits for it before the connection is aborted.
    pub rdma_cancel_timeout: Duration,
    /// How long a graceful close waits for FIN and queued messages to leave.
    pub close_timeout: Duration,
    /// Local registrations of application buffers each connection keeps,
    /// so that transfers from and into the same buffer do not register it
    /// again (0: none; every transfer registers its buffer and deregisters
    /// it after). `None`: 8 on the soft and shm fabrics, 0 on verbs, where
    /// a cached registration keeps the pages it pinned: turn it on there
    /// only if the program calls [`Runtime::release_memory`] before it
    /// unmaps memory it sent from or received into.
    pub reg_cache: Option<u16>,
    /// Whether the provider keeps a buffer's NIC registration after the
    /// exposure (or local registration) that made it ended — the engine's
    /// `mr_cache` — so that the next large transfer from the same buffer
    /// only binds a remote key to it and unbinds it after (the peer loses
    /// access when the transfer ends either way, spec MEM-6). On soft that
    /// saves a page-table walk (`mincore`) and a region-table insertion and
    /// removal per transfer. `None`:
    /// on for the soft and shm fabrics, whose NIC reaches registered memory
    /// by virtual address at the time of each op, else as
    /// `RuntimeConfig::engine` says; on verbs the cache keeps the pages a
    /// registration pinned, so turn it on there only if the program calls
    /// [`Runtime::release_memory`] before it unmaps memory it sent from or
    /// received into.
    pub exposure_cache: Option<bool>,
    /// Blocking sends from this many bytes up to the RDMA threshold are
    /// RDMA-written into the peer's ring straight from the application's
    /// buffer (one copy fewer; the call returns once the write completed)
    /// when the registration cache is on; smaller ones are copied into the
    /// send ring first.
    pub direct_min: u32,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        SwitchOptions {
            recv_slots: 8,
            credit_batch: None,
            send_slots: 8,
            slot_size: 4096 + proto::HEADER_LEN as u32,
            // With the buffers (4 KiB of first 256 bytes and 64 KiB of
            // the rest), 252 KiB per connection.
            ring_size: 92 << 10,
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
            reg_cache: None,
            exposure_cache: None,
            direct_min: 16 << 10,
        }
    }
}

impl SwitchOptions {
    /// The defaults with every blocking call bounded by `t`: connect, its
    /// handshake, accept, reads and writes (for tools and benchmarks that
    /// must fail rather than hang).
    pub fn bounded(t: Duration) -> SwitchOptions {
        SwitchOptions {
            connect_timeout: t,
            handshake_timeout: t,
            accept_timeout: Some(t),
            read_timeout: Some(t),
            write_timeout: Some(t),
            ..SwitchOptions::default()
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

/// Whether the NIC of fabric `kind` reaches registered memory by virtual
/// address at the time of each op (soft, shm), not through pages pinned at
/// registration (verbs): a registration kept after use cannot go stale.
fn by_address(kind: FabricKind) -> bool {
    matches!(kind, FabricKind::Soft | FabricKind::Shm)
}

/// Switch handles per chunk of the handle table.
const CHUNK: usize = 64;
/// Chunks: at most `CHUNK * CHUNKS` sockets of one runtime at once.
const CHUNKS: usize = 1024;

/// `CHUNK` slots of the handle table.
type Chunk = Box<[Slot]>;

/// One slot of the handle table.
#[derive(Default)]
struct Slot {
    entry: Mutex<Entry>,
    /// The address of the wire of `entry.conn` ([`Conn::wire_addr`]), 0
    /// while the slot has no connection: stored (release) after `entry`
    /// took the connection, cleared before `close_socket_handle` lets it
    /// go, read (acquire) by the completion upcalls, which reach the
    /// connection through it without the lock (`io.rs`, invariant 7).
    wire: AtomicUsize,
}

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

    fn slot(&self, index: usize) -> Option<&Slot> {
        let chunk = self.chunks.get(index / CHUNK)?;
        let chunk = chunk.get_or_init(|| (0..CHUNK).map(|_| Slot::default()).collect());
        chunk.get(index % CHUNK)
    }

    /// The slot handle `h` names, if its chunk exists (the slot may be
    /// another handle's if `h` is stale; a handle was made with its chunk,
    /// so no live one names a slot of a chunk not made).
    fn slot_of(&self, h: SwitchHandle) -> Option<&Slot> {
        let index = (h.0 & 0xffff_ffff).checked_sub(1)?;
        self.chunks.get(index / CHUNK)?.get()?.get(index % CHUNK)
    }

    /// The live entry of handle `h`, locked.
    fn entry(&self, h: SwitchHandle) -> Option<MutexGuard<'_, Entry>> {
        let e = lock(&self.slot_of(h)?.entry);
        (e.handle == h.0 && h.0 != 0).then_some(e)
    }

    /// Every live connection (each slot locked in turn, briefly).
    fn conns(&self) -> Vec<Arc<Conn>> {
        let used = self.fresh.load(Ordering::Relaxed).min(CHUNK * CHUNKS);
        (0..used)
            .filter_map(|i| {
                let chunk = self.chunks.get(i / CHUNK)?.get()?;
                lock(&chunk.get(i % CHUNK)?.entry).conn.clone()
            })
            .collect()
    }

    /// Enters `conn` as the connection of handle `h`.
    fn attach(&self, h: SwitchHandle, conn: Arc<Conn>) -> WsaResult<()> {
        let mut e = self.entry(h).ok_or(WsaError::WSAENOTSOCK)?;
        let wire = conn.wire_addr();
        e.conn = Some(conn);
        if let Some(slot) = self.slot_of(h) {
            slot.wire.store(wire, Ordering::Release);
        }
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
        *lock(&slot.entry) = Entry {
            handle: h,
            context,
            conn: None,
        };
        Ok(SwitchHandle(h))
    }

    fn close_socket_handle(&self, h: SwitchHandle) -> WsaResult<()> {
        let conn = {
            let mut e = self.entry(h).ok_or(WsaError::WSAENOTSOCK)?;
            if let Some(slot) = self.slot_of(h) {
                slot.wire.store(0, Ordering::Release);
            }
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
        if let Some(slot) = self.slot_of(h) {
            Wire::deliver(slot.wire.load(Ordering::Acquire), ov, error, bytes);
        }
        Ok(())
    }
}

/// A started provider with the reference switch on top: the factory of
/// [`super::Listener`]s and [`super::Stream`]s. The provider is cleaned up when the last
/// `Arc<Runtime>` (streams and listeners hold one) goes.
pub struct Runtime {
    pub(super) provider: Provider,
    upcalls: Arc<Upcalls>,
    pub(super) opts: SwitchOptions,
    can_rdma_read: bool,
    /// The provider runs to completion: readiness needs the [`Hub`].
    rtc: bool,
    /// The streams waiting for completions through their readiness fd.
    pub(super) hub: Arc<Hub>,
    /// The waker completion queues are armed with (run to completion): it
    /// wakes `hub` and the stream threads asleep in a blocking call.
    cq_wake: Arc<CqWake>,
    /// `cq_wake`, as the `dyn Waker` arms take.
    cq_waker: Arc<dyn Waker>,
    /// Entries of each connection's registration cache (0: off).
    reg_cache: usize,
}

impl Runtime {
    /// A runtime on the NIC `config.engine` selects (the soft fabric's
    /// process-wide network by default).
    pub fn start(config: RuntimeConfig) -> io::Result<Arc<Runtime>> {
        Self::check(&config)?;
        let p = Provider::new(Self::engine(&config)).map_err(io::Error::other)?;
        Self::start_with(p, config.switch)
    }

    /// A runtime on a given NIC (e.g. one of a private soft network).
    pub fn with_nic(config: RuntimeConfig, nic: Arc<dyn Nic>) -> io::Result<Arc<Runtime>> {
        Self::check(&config)?;
        let p = Provider::with_nic(Self::engine(&config), nic).map_err(io::Error::other)?;
        Self::start_with(p, config.switch)
    }

    /// The engine settings the provider starts with: `config.engine`, with
    /// the registration cache as [`SwitchOptions::exposure_cache`] says.
    fn engine(config: &RuntimeConfig) -> Config {
        let mut engine = config.engine.clone();
        engine.mr_cache.enabled = config
            .switch
            .exposure_cache
            .unwrap_or(engine.mr_cache.enabled || by_address(engine.fabric.kind));
        engine
    }

    fn check(config: &RuntimeConfig) -> io::Result<()> {
        let invalid = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        let o = &config.switch;
        let q = &config.engine.qp;
        // Each send slot may have a send and its DATA's ring write posted.
        if q.recv_depth < u32::from(o.recv_slots)
            || q.send_depth < 2 * u32::from(o.send_slots) + u32::from(RDMA_SLOTS)
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
            ring_size: o.ring_size,
            credit_batch: o.credit_batch.unwrap_or(0),
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
        let rtc = provider.config().poller.mode == PollerMode::RunToCompletion;
        let hub = Arc::new(Hub::default());
        let reg_cache = usize::from(opts.reg_cache.unwrap_or(
            if by_address(provider.config().fabric.kind) {
                8
            } else {
                0
            },
        ));
        let cq_wake = Arc::new(CqWake::new(hub.clone()));
        Ok(Arc::new(Runtime {
            reg_cache,
            cq_waker: cq_wake.clone(),
            cq_wake,
            provider,
            upcalls,
            opts,
            can_rdma_read,
            rtc,
            hub,
        }))
    }

    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    pub fn options(&self) -> &SwitchOptions {
        &self.opts
    }

    /// Sets up the protocol on connected socket `sock`: a connection with
    /// its pools registered, entered in the handle table, started.
    pub(super) fn open(
        &self,
        sock: ProviderSocket,
        role: Role,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> io::Result<Arc<Conn>> {
        let o = &self.opts;
        let max_msg = self.sockopt(sock, SO_MAX_MSG_SIZE).unwrap_or(u32::MAX);
        let threshold = o
            .rdma_threshold
            .or_else(|| self.sockopt(sock, SO_RDMA_THRESHOLD_SIZE))
            .unwrap_or(64 << 10);
        let max_rdma = self
            .sockopt(sock, SO_MAX_RDMA_SIZE)
            .unwrap_or(1 << 30)
            .max(1);
        let cfg = proto::Config {
            recv_slots: o.recv_slots,
            send_slots: o.send_slots,
            slot_size: o.slot_size.min(max_msg),
            ring_size: o.ring_size,
            rdma_threshold: u64::from(threshold),
            max_rdma_op: max_rdma,
            rdma_flow: o.rdma_flow,
            can_rdma_read: self.can_rdma_read && o.accept_rdma_read,
            credit_batch: o.credit_batch.unwrap_or((o.recv_slots / 2).max(2)),
            rdma_slots: RDMA_SLOTS,
            direct_min: if self.reg_cache > 0 {
                u64::from(o.direct_min)
            } else {
                u64::MAX
            },
        };
        let wake = self.rtc.then(|| self.cq_wake.clone());
        let conn = Conn::new(
            &self.provider,
            sock,
            cfg,
            self.reg_cache,
            wake,
            role,
            local,
            peer,
        )?;
        let h = self.provider.switch_handle(sock).map_err(wsa_io)?;
        self.upcalls.attach(h, conn.clone()).map_err(wsa_io)?;
        conn.start();
        Ok(conn)
    }

    /// Readiness, after a non-blocking call of `conn`'s stream (whose fd
    /// is `ready`; `waits`: it failed with `WouldBlock`). Run to completion,
    /// a waiting stream enlists in the hub, and while any stream is
    /// enlisted, its completion queue stays armed for the hub; completions
    /// found waiting are reaped now. Threads mode: nothing (the dispatcher
    /// delivers every completion).
    pub(super) fn keep_armed(&self, conn: &Conn, ready: &Arc<Readiness>, waits: bool) {
        if !self.rtc {
            return;
        }
        if waits {
            self.hub.enlist(ready);
        }
        if self.hub.has_waiters() && conn.arm(&self.cq_waker) {
            conn.progress();
        }
    }

    /// The program is about to unmap, free or re-protect `[addr,
    /// addr+len)`: every connection of the runtime forgets its cached
    /// registrations overlapping it (deregistered now, or as soon as the
    /// op using one completes), then the provider drops the NIC
    /// registrations it keeps of the range (`WSPMemoryRegistrationCacheCallback`).
    /// Call it from an unmap hook, or before freeing a buffer streams sent
    /// from or received into, when a registration cache is on for a fabric
    /// that pins memory (see [`SwitchOptions::reg_cache`] and
    /// [`SwitchOptions::exposure_cache`]); on soft and shm it keeps the
    /// registered set small.
    pub fn release_memory(&self, addr: *const u8, len: usize) {
        for c in self.upcalls.conns() {
            c.release_memory(addr as usize, len);
        }
        // `WSAEINVAL` when nothing of the range was cached: nothing to do.
        let _ = self
            .provider
            .memory_registration_cache_callback(addr.cast_mut(), len);
    }

    pub(super) fn socket(&self) -> io::Result<ProviderSocket> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_handles_name_their_slot_and_go_stale_when_closed() {
        let u = Upcalls::new();
        let a = u.create_socket_handle(1, 10).unwrap();
        let b = u.create_socket_handle(1, 20).unwrap();
        assert_ne!(a, b);
        assert_eq!(u.query_socket_handle_context(a), Ok(10));
        assert_eq!(u.query_socket_handle_context(b), Ok(20));
        u.close_socket_handle(a).unwrap();
        assert_eq!(u.query_socket_handle_context(a), Err(WsaError::WSAENOTSOCK));
        assert_eq!(u.close_socket_handle(a), Err(WsaError::WSAENOTSOCK));
        // The slot is reused under a new generation: the old handle stays
        // stale, the new one works.
        let c = u.create_socket_handle(1, 30).unwrap();
        assert_eq!(c.0 & 0xffff_ffff, a.0 & 0xffff_ffff);
        assert_ne!(c, a);
        assert_eq!(u.query_socket_handle_context(a), Err(WsaError::WSAENOTSOCK));
        assert_eq!(u.query_socket_handle_context(c), Ok(30));
        for bogus in [0, 1 << 32, usize::MAX, (1 << 32) | (CHUNK * CHUNKS + 1)] {
            assert_eq!(
                u.query_socket_handle_context(SwitchHandle(bogus)),
                Err(WsaError::WSAENOTSOCK),
                "{bogus:#x}"
            );
        }
    }

    /// A completion upcall reaches a connection only through one of its
    /// own records (`io.rs`, invariant 7): a record the switch did not post
    /// (its `hEvent` empty, or naming the connection's wire from outside
    /// its array) is ignored, and the streams go on as if it never came.
    #[test]
    fn a_completion_upcall_reaches_only_the_connection_whose_record_it_is() {
        use std::io::{Read, Write};

        let (rt, mut client, mut server) = crate::switch::stream::connected(40);

        // The two connections' handles and published wires (the listener's
        // socket has no connection).
        let u = &rt.upcalls;
        let chunk = u.chunks[0].get().unwrap();
        let live: Vec<(SwitchHandle, usize)> = chunk
            .iter()
            .filter_map(|s| {
                let wire = s.wire.load(Ordering::Acquire);
                (wire != 0).then(|| (SwitchHandle(lock(&s.entry).handle), wire))
            })
            .collect();
        assert_eq!(live.len(), 2);
        for &(h, wire) in &live {
            for forged in [
                Overlapped::new(0),
                Overlapped::new(wire),
                Overlapped::new(wire | 1),
            ] {
                u.complete_overlapped_request(h, &forged, 0, 8).unwrap();
            }
        }
        let mut buf = [0u8; 5];
        client.write_all(b"hello").unwrap();
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        server.write_all(b"olleh").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"olleh");
    }

    #[test]
    fn handles_span_chunks() {
        let u = Upcalls::new();
        let hs: Vec<_> = (0..3 * CHUNK)
            .map(|i| u.create_socket_handle(1, i).unwrap())
            .collect();
        for (i, h) in hs.iter().enumerate() {
            assert_eq!(u.query_socket_handle_context(*h), Ok(i));
        }
        for h in hs {
            u.close_socket_handle(h).unwrap();
        }
    }
}
