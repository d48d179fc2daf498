//! The SPI front end: the provider side of the WSD SAN SPI as a Rust API.
//!
//! [`Provider`] implements every function marked R in spec §2.4 and the
//! extension functions of §3.1. Calls that take memory the switch owns
//! (buffers, overlapped records) are `unsafe fn` whose safety contract is the
//! SPI's own: the memory stays valid until the op completed or the
//! registration ended. Everything else is safe.
//!
//! Data flow of an op: validate → reserve an op slot (no allocation) → post a
//! work request whose id names the slot → `Ok` (the C ABI reports
//! `WSA_IO_PENDING`). The completion comes back through [`crate::poller`] and
//! `dispatch.rs`, which takes the op's state out of its slot (freeing it),
//! writes the overlapped result, and makes the one
//! `complete_overlapped_request` upcall (unless `hEvent` bit 0 is set).
//!
//! Close (spec §6.1) lives in `close.rs`, beside the close gate (`gate.rs`)
//! that orders it against ops starting and completing.

mod close;
use close::Call;
mod dispatch;
mod dup;
mod dup_state;
mod gate;
mod ops;
mod qp_cell;
mod slots;
mod socket;
mod stats;
mod types;

#[cfg(feature = "fault-injection")]
pub use dup::hooks as dup_hooks;
pub use ops::MAX_SGE;
pub use stats::ProviderStats;
pub use types::*;

use crate::config::{Config, FabricKind, PollerMode};
use crate::error::{WsaError, WsaResult};
use crate::event::Event;
use crate::fabric::soft::default_network;
use crate::fabric::{
    ConnectError, FabricError, Nic, PostError, QpParams, QueuePair, RecvWr, SendOp, SendWr, Sge,
    Waker,
};
use crate::mem::descriptor::{Descriptor, DESCRIPTOR_LEN};
use crate::mem::table::{MemFlags, OwnerId, RegistrationTable};
use crate::poller::{Notifier, ParkWaker, Progress};
use ops::{release_regs, OpSlab, OvPtr, KEPT_SGE};
use socket::{
    record_connect, Phase, Pinned, Socket, SocketListenerEvents, SocketQpEvents, SocketTable,
};
use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

thread_local! {
    /// The running engine this thread used last, with its [`Running::id`]
    /// (see [`Inner::with_running`]): a plain pair, so reading it costs a
    /// load. Names what `RUN_HELD` holds, or nothing (id 0).
    static RUN_SEEN: Cell<(u64, *const Running)> = const { Cell::new((0, std::ptr::null())) };
    /// The reference that keeps `RUN_SEEN`'s engine alive.
    static RUN_HELD: RunHeld = const { RunHeld(RefCell::new(None)) };
}

/// This thread's reference to the engine it used last.
struct RunHeld(RefCell<Option<Arc<Running>>>);

impl Drop for RunHeld {
    /// Thread exit: nothing names the engine once it may be dropped.
    fn drop(&mut self) {
        let _ = RUN_SEEN.try_with(|s| s.set((0, std::ptr::null())));
    }
}

/// Size of the RDMA descriptor `register_rdma_memory` writes (spec §7-1).
pub const RDMA_DESCRIPTOR_LEN: usize = DESCRIPTOR_LEN;

/// Description reported in `WSPDATA`.
pub const DESCRIPTION: &str = "sanpath WSD SAN provider";

/// The SAN provider. Cheap to clone; all clones are the same provider.
///
/// Pair every successful [`Provider::startup`] with one
/// [`Provider::cleanup`]: the last cleanup closes the remaining sockets and
/// stops the engine's threads. Dropping the handles without it leaves those
/// threads (and the sockets) running, as an unloaded provider DLL would.
#[derive(Clone)]
pub struct Provider {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    nic: Arc<dyn Nic>,
    table: RegistrationTable,
    ops: OpSlab,
    sockets: SocketTable,
    /// Startup refcount and the running engine; taken by startup/cleanup.
    life: Mutex<Life>,
    /// The running engine, read by calls that need the switch or progress.
    running: RwLock<Option<Arc<Running>>>,
    /// [`Running::id`] of the engine in `running`, 0 when there is none:
    /// what a thread compares its cached engine with (see
    /// [`Inner::with_running`]). Written under `life` after `running`.
    run_id: AtomicU64,
    /// Source of socket ids (never reused).
    next_owner: AtomicU64,
    /// Next ephemeral port.
    next_port: AtomicU16,
    /// Threads mode: notified after every dispatched batch (op completions,
    /// close drains), for the threads waiting in `wait_for`. Run-to-
    /// completion waits sleep on the CQs' notifier instead, so a batch
    /// reaped in that mode notifies nothing here.
    completed: Notifier,
    /// Cold-path counters behind [`Provider::stats`].
    counters: stats::Counters,
}

#[derive(Default)]
struct Life {
    refcount: u32,
}

pub(crate) struct Running {
    /// Unique in the process (never 0): names this engine in the threads'
    /// caches of it (see [`Inner::with_running`]).
    id: u64,
    switch: Arc<dyn Switch>,
    catalog_entry_id: u32,
    progress: Progress,
    /// Threads mode: the dispatcher thread's waker (pollers wake it).
    dispatcher_waker: Arc<ParkWaker>,
    /// Run-to-completion mode: woken by armed CQs.
    rtc_notifier: Arc<Notifier>,
    /// Threads mode: the dispatcher thread. Run-to-completion mode: the
    /// upcall helper, once started.
    dispatcher: Mutex<Option<JoinHandle<()>>>,
    /// Run-to-completion mode: set by the first op that wants an upcall,
    /// which starts the upcall helper. Threads mode: set from the start
    /// (the dispatcher thread makes the upcalls), so that an op's check is
    /// this load alone.
    helper_started: std::sync::atomic::AtomicBool,
    /// Run-to-completion mode: bumped by every progress pass that reported
    /// something, so the upcall helper sees another thread reaping. Its
    /// own line: written per pass, read by the helper now and then.
    reaped: crate::sync::CachePadded<AtomicU64>,
    /// Closes that returned before their teardown ended (`close.rs`).
    closer: close::Closer,
    stop: std::sync::atomic::AtomicBool,
    /// The rejoin service of socket duplication (`dup.rs`), one listener
    /// per address it runs on; closed by the last cleanup.
    dup_service: Mutex<Vec<Arc<dyn crate::fabric::Listener>>>,
}

/// Why a provider could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    /// The address space of `ops.slab_size` op slots could not be had.
    #[error("no memory for an op slab of {0} slots (ops.slab_size)")]
    OpSlab(usize),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Provider {
    /// A provider on the NIC the config selects: the soft fabric's process-
    /// wide network with `fabric.soft.addresses`.
    pub fn new(config: Config) -> Result<Provider, ProviderError> {
        config.validate()?;
        let nic: Arc<dyn Nic> = match config.fabric.kind {
            FabricKind::Soft => {
                default_network().attach(config.soft_nic(config.fabric.soft.addresses.clone()))?
            }
            #[cfg(not(loom))]
            FabricKind::Shm => Arc::new(crate::fabric::shm::ShmNic::new(config.shm_nic())?),
            #[cfg(loom)]
            FabricKind::Shm => {
                return Err(FabricError::Unavailable("no shm fabric in loom builds".into()).into())
            }
            #[cfg(feature = "verbs")]
            FabricKind::Verbs => {
                use crate::fabric::verbs::{VerbsConfig, VerbsNic};
                let v = &config.fabric.verbs;
                VerbsNic::open(VerbsConfig {
                    device: (!v.device.is_empty()).then(|| v.device.clone()),
                    port: v.port.max(1),
                    memory_windows: v.memory_windows,
                    connect_timeout: config.connect_timeout(),
                    ..VerbsConfig::default()
                })?
            }
            #[cfg(not(feature = "verbs"))]
            FabricKind::Verbs => {
                return Err(FabricError::Unavailable(
                    "this engine was built without the verbs fabric (cargo feature `verbs`)".into(),
                )
                .into())
            }
        };
        Provider::with_nic(config, nic)
    }

    /// A provider on a given NIC.
    pub fn with_nic(config: Config, nic: Arc<dyn Nic>) -> Result<Provider, ProviderError> {
        config.validate()?;
        let table = RegistrationTable::new(nic.clone(), config.mr_cache.clone());
        Ok(Provider {
            inner: Arc::new(Inner {
                table,
                ops: OpSlab::new(config.ops.slab_size, config.poller.count)
                    .map_err(|ops::SlabTooLarge| ProviderError::OpSlab(config.ops.slab_size))?,
                sockets: SocketTable::new(config.ops.max_sockets),
                life: Mutex::new(Life::default()),
                running: RwLock::new(None),
                run_id: AtomicU64::new(0),
                next_owner: AtomicU64::new(1),
                next_port: AtomicU16::new(first_ephemeral()),
                completed: Notifier::default(),
                counters: stats::Counters::default(),
                nic,
                config,
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn nic(&self) -> &Arc<dyn Nic> {
        &self.inner.nic
    }

    /// Statistics of the registration table.
    pub fn registration_stats(&self) -> crate::mem::table::TableStats {
        self.inner.table.stats()
    }

    // ------------------------------------------------------------------
    // Startup and cleanup (§2.1, §2.5)
    // ------------------------------------------------------------------

    /// `WSPStartupEx`. `version` is the highest version the switch speaks
    /// (low byte major, high byte minor); 2.2 is required. The first call
    /// keeps `switch`; later calls only count (§7-14).
    pub fn startup(
        &self,
        version: u16,
        switch: Arc<dyn Switch>,
        catalog_entry_id: u32,
    ) -> WsaResult<WspData> {
        let (major, minor) = (version & 0xFF, version >> 8);
        if (major, minor) < (2, 2) {
            return Err(WsaError::WSAVERNOTSUPPORTED);
        }
        let mut life = lock(&self.inner.life);
        if life.refcount == 0 {
            let run = self.inner.start(switch, catalog_entry_id)?;
            *self
                .inner
                .running
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Some(run.clone());
            self.inner.run_id.store(run.id, Ordering::Release);
            *lock(&run.dup_service) = self.inner.start_dup_service();
        }
        life.refcount += 1;
        Ok(WspData {
            version: WSD_VERSION,
            high_version: WSD_VERSION,
            description: DESCRIPTION,
        })
    }

    /// `WSPCleanup`. The last call closes every socket (pending ops complete
    /// `WSA_OPERATION_ABORTED`), ends every close still under way, its own
    /// and earlier ones (each socket gets its `close_socket_handle`), within
    /// `close.quiesce_timeout_ms`, and stops the engine threads.
    pub fn cleanup(&self) -> WsaResult<()> {
        let mut life = lock(&self.inner.life);
        if life.refcount == 0 {
            return Err(WsaError::WSANOTINITIALISED);
        }
        life.refcount -= 1;
        if life.refcount > 0 {
            return Ok(());
        }
        // Mark every socket first, so that a socket torn down by its peer's
        // close still reports its ops as aborted, not reset (START-7).
        let sockets = self.inner.sockets.all();
        for s in &sockets {
            s.gate.shut();
        }
        // None waits here: the closes end together below.
        for s in sockets {
            let _ = self.close_with(s.desc, std::time::Duration::ZERO);
        }
        self.inner.run_id.store(0, Ordering::Release);
        let run = self
            .inner
            .running
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(run) = run {
            for l in std::mem::take(&mut *lock(&run.dup_service)) {
                l.close();
            }
            self.inner.end_deferred_closes(&run);
            run.stop.store(true, Ordering::SeqCst);
            run.dispatcher_waker.unpark();
            run.rtc_notifier.notify();
            if let Some(h) = lock(&run.dispatcher).take() {
                h.thread().unpark();
                let _ = h.join();
            }
            self.inner.stop_closer(&run);
            run.progress.shutdown();
        }
        Ok(())
    }

    /// Whether `startup` succeeded more often than `cleanup` was called.
    pub fn is_started(&self) -> bool {
        lock(&self.inner.life).refcount > 0
    }

    // ------------------------------------------------------------------
    // Sockets (§3)
    // ------------------------------------------------------------------

    /// `WSPSocket`. `dup_reserved` is `WSAPROTOCOL_INFOW::dwProviderReserved`:
    /// non-zero re-creates a socket duplicated for this process (§4.8,
    /// `dup.rs`); an unknown, expired or foreign value fails `WSAEINVAL`.
    pub fn socket(
        &self,
        af: i32,
        ty: i32,
        protocol: i32,
        group: u32,
        flags: u32,
        dup_reserved: u64,
    ) -> WsaResult<ProviderSocket> {
        let run = self.inner.running()?;
        if af != AF_INET {
            return Err(WsaError::WSAEAFNOSUPPORT);
        }
        if ty != SOCK_STREAM {
            return Err(WsaError::WSAESOCKTNOSUPPORT);
        }
        if protocol != 0 && protocol != IPPROTO_TCP {
            return Err(WsaError::WSAEPROTONOSUPPORT);
        }
        if group != 0 || flags & !WSA_FLAG_OVERLAPPED != 0 {
            return Err(WsaError::WSAEINVAL);
        }
        if dup_reserved != 0 {
            return self.recreate(&run, dup_reserved);
        }
        let sock = self.inner.new_socket(&run)?;
        self.inner.sockets.publish(sock.desc, sock.clone());
        self.inner.counters.published();
        Ok(sock.desc)
    }

    /// `WSPBind`: `addr` must be one of our NIC addresses or the wildcard.
    pub fn bind(&self, s: ProviderSocket, addr: SocketAddrV4) -> WsaResult<()> {
        let sock = self.inner.socket(s)?;
        let ip = *addr.ip();
        if !ip.is_unspecified() && !self.inner.nic.addresses().contains(&ip) {
            return Err(WsaError::WSAEADDRNOTAVAIL);
        }
        let mut c = sock.ctl();
        if c.phase != Phase::Open || c.local.is_some() {
            return Err(WsaError::WSAEINVAL);
        }
        let port = if addr.port() == 0 {
            self.inner.ephemeral_port()
        } else {
            addr.port()
        };
        c.local = Some(SocketAddrV4::new(ip, port));
        c.phase = Phase::Bound;
        Ok(())
    }

    /// `WSPListen`. `SOMAXCONN` (or anything above `connect.backlog_max`) is
    /// clamped to `connect.backlog_max`.
    pub fn listen(&self, s: ProviderSocket, backlog: i32) -> WsaResult<()> {
        let sock = self.inner.socket(s)?;
        let max = self.inner.config.connect.backlog_max;
        let backlog = (backlog.max(1) as u32).min(max);
        let mut c = sock.ctl();
        match c.phase {
            Phase::Listening => return Ok(()),
            Phase::Bound => {}
            Phase::Connected | Phase::Connecting => return Err(WsaError::WSAEISCONN),
            Phase::Open => return Err(WsaError::WSAEINVAL),
        }
        let local = c.local.ok_or(WsaError::WSAEINVAL)?;
        let events = Arc::new(SocketListenerEvents(Arc::downgrade(&sock)));
        let listener = self
            .inner
            .nic
            .listen(local, backlog, events)
            .map_err(|e| match e {
                FabricError::AddressInUse => WsaError::WSAEADDRINUSE,
                FabricError::AddressNotAvailable => WsaError::WSAEADDRNOTAVAIL,
                FabricError::NoResources(_) => WsaError::WSAENOBUFS,
                _ => WsaError::WSAENETDOWN,
            })?;
        c.listener = Some(listener);
        c.backlog = backlog;
        c.phase = Phase::Listening;
        Ok(())
    }

    /// `WSPEventSelect`: records `event` and the `FD_*` mask; an event that
    /// is already recorded and selected signals at once.
    pub fn event_select(
        &self,
        s: ProviderSocket,
        event: Option<Arc<Event>>,
        network_events: i32,
    ) -> WsaResult<()> {
        let sock = self.inner.socket(s)?;
        let mut c = sock.ctl();
        match event {
            Some(ev) if network_events != 0 => {
                if c.recorded.network_events & network_events != 0 {
                    ev.set();
                }
                c.event = Some((ev, network_events));
            }
            Some(_) => c.event = None,
            None if network_events == 0 => c.event = None,
            None => return Err(WsaError::WSAEINVAL),
        }
        Ok(())
    }

    /// `WSPEnumNetworkEvents`: copies and clears the recorded events and
    /// resets `event` (if given).
    pub fn enum_network_events(
        &self,
        s: ProviderSocket,
        event: Option<&Event>,
    ) -> WsaResult<NetworkEvents> {
        let sock = self.inner.socket(s)?;
        let mut c = sock.ctl();
        let out = std::mem::take(&mut c.recorded);
        if let Some(ev) = event {
            ev.reset();
        }
        Ok(out)
    }

    /// `WSPConnect`, always non-blocking (§4.1): `Ok(())` means the attempt
    /// is under way and its result comes as `FD_CONNECT`; failures known at
    /// once are returned directly. Caller/callee data are not supported:
    /// non-empty `caller_data` fails `WSAEINVAL` (§7-11).
    pub fn connect(
        &self,
        s: ProviderSocket,
        addr: SocketAddrV4,
        caller_data: &[u8],
    ) -> WsaResult<()> {
        let sock = self.inner.socket(s)?;
        let run = self.inner.running()?;
        if !caller_data.is_empty() {
            return Err(WsaError::WSAEINVAL);
        }
        if addr.ip().is_unspecified() || addr.port() == 0 || addr.ip().is_broadcast() {
            return Err(WsaError::WSAEADDRNOTAVAIL);
        }
        let mut c = sock.ctl();
        match c.phase {
            Phase::Open | Phase::Bound => {}
            Phase::Connecting => return Err(WsaError::WSAEALREADY),
            Phase::Connected => return Err(WsaError::WSAEISCONN),
            Phase::Listening => return Err(WsaError::WSAEINVAL),
        }
        let local = self.inner.local_for_connect(c.local, *addr.ip())?;
        let params = self.inner.qp_params(&run, &sock);
        let weak = Arc::downgrade(&sock);
        let done = Box::new(move |result: Result<Arc<dyn QueuePair>, ConnectError>| {
            let Some(sock) = weak.upgrade() else { return };
            connect_done(&sock, result);
        });
        // Not under the ctl lock: a NIC may answer inside `connect` (the soft
        // NIC's in-process services do), and `done` takes that lock.
        let before = (c.phase, c.local);
        c.local = Some(local);
        c.peer = Some(addr);
        c.phase = Phase::Connecting;
        drop(c);
        let started = self.inner.nic.connect(local, addr, params, done);
        let mut c = sock.ctl();
        match started {
            // Close ran meanwhile and found no attempt to cancel.
            Ok(attempt) if sock.gate.is_closing() => {
                attempt.cancel();
                Ok(())
            }
            Ok(attempt) => {
                // Unless `done` has already run.
                if c.phase == Phase::Connecting && c.attempt.is_none() {
                    c.attempt = Some(attempt);
                }
                Ok(())
            }
            Err(e) => {
                (c.phase, c.local) = before;
                c.peer = None;
                Err(connect_error(e))
            }
        }
    }

    /// `WSPAccept`: takes the oldest queued request, asks `condition` on the
    /// calling thread, and only then answers the remote (§4.2, CONN-10).
    /// Returns the new socket and the caller's address.
    pub fn accept(
        &self,
        s: ProviderSocket,
        condition: &mut dyn FnMut(&ConnectRequestInfo) -> Condition,
    ) -> WsaResult<(ProviderSocket, SocketAddrV4)> {
        let sock = self.inner.socket(s)?;
        let run = self.inner.running()?;
        let (listener, event) = {
            let c = sock.ctl();
            if c.phase != Phase::Listening {
                return Err(WsaError::WSAEINVAL);
            }
            (
                c.listener.clone().ok_or(WsaError::WSAEINVAL)?,
                c.event.as_ref().map(|(e, _)| e.clone()),
            )
        };
        // The listen event is re-armed for the next request (CONN-11).
        if let Some(ev) = &event {
            ev.reset();
        }
        let result = loop {
            let Some(req) = listener.peek() else {
                break Err(WsaError::WSAEWOULDBLOCK);
            };
            let info = ConnectRequestInfo {
                caller: req.peer_addr(),
                callee: req.local_addr(),
            };
            match condition(&info) {
                Condition::Reject => {
                    req.reject();
                    break Err(WsaError::WSAECONNREFUSED);
                }
                Condition::Defer => break Err(WsaError::WSATRY_AGAIN),
                Condition::Accept => {}
            }
            let new = self.inner.new_socket(&run)?;
            let params = self.inner.qp_params(&run, &new);
            match req.accept(params) {
                Ok(qp) => {
                    {
                        let mut c = new.ctl();
                        c.local = Some(info.callee);
                        c.peer = Some(info.caller);
                        c.phase = Phase::Connected;
                    }
                    let _ = new.qp.set(qp);
                    self.inner.sockets.publish(new.desc, new.clone());
                    self.inner.counters.published();
                    tracing::debug!(socket = new.desc.0, peer = %info.caller, "accepted");
                    break Ok((new.desc, info.caller));
                }
                Err(e) => {
                    // The connector gave up (or resources ran out): undo the
                    // new socket, handle included, and try the next request.
                    self.inner.sockets.unreserve(new.desc);
                    self.inner.table.release_owner(&new.regs);
                    let _ = run.switch.close_socket_handle(new.handle);
                    tracing::debug!(peer = %info.caller, error = ?e, "accept failed");
                    if e != ConnectError::Cancelled {
                        break Err(connect_error(e));
                    }
                }
            }
        };
        if listener.pending() > 0 && !sock.gate.is_closing() {
            let mut c = sock.ctl();
            c.record(FD_ACCEPT_BIT, 0);
        }
        result
    }

    /// `WSPGetSockOpt`: writes the value into `out` and returns its length.
    pub fn get_sockopt(
        &self,
        s: ProviderSocket,
        level: i32,
        name: i32,
        out: &mut [u8],
    ) -> WsaResult<usize> {
        let sock = self.inner.socket(s)?;
        let limits = &self.inner.config.limits;
        let value: u32 = match (level, name) {
            (SOL_SOCKET, SO_MAX_MSG_SIZE) => limits.max_msg_size,
            (SOL_SOCKET, SO_MAX_RDMA_SIZE) => limits.max_rdma_size,
            (SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE) => sock.rdma_threshold.load(Ordering::Relaxed),
            (SOL_SOCKET, SO_DEBUG) => sock.opts.debug.load(Ordering::Relaxed) as u32,
            (IPPROTO_TCP, TCP_NODELAY) => sock.opts.nodelay.load(Ordering::Relaxed) as u32,
            (SOL_SOCKET, _) | (IPPROTO_TCP, _) => return Err(WsaError::WSAENOPROTOOPT),
            _ => return Err(WsaError::WSAEINVAL),
        };
        let bytes = value.to_le_bytes();
        let dst = out.get_mut(..4).ok_or(WsaError::WSAEFAULT)?;
        dst.copy_from_slice(&bytes);
        Ok(4)
    }

    /// `WSPSetSockOpt`: `SO_DEBUG`, `TCP_NODELAY` (kept; a SAN has no Nagle)
    /// and `SO_RDMA_THRESHOLD_SIZE`; QoS group options are not supported.
    pub fn set_sockopt(
        &self,
        s: ProviderSocket,
        level: i32,
        name: i32,
        value: &[u8],
    ) -> WsaResult<()> {
        let sock = self.inner.socket(s)?;
        let known = matches!(
            (level, name),
            (SOL_SOCKET, SO_DEBUG)
                | (SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE)
                | (IPPROTO_TCP, TCP_NODELAY)
        );
        if !known {
            return match level {
                SOL_SOCKET | IPPROTO_TCP => Err(WsaError::WSAENOPROTOOPT),
                _ => Err(WsaError::WSAEINVAL),
            };
        }
        // Every option we keep is a 4-byte value: shorter is WSAEFAULT (SOCK-5).
        let v = match value {
            [a, b, c, d, ..] => u32::from_le_bytes([*a, *b, *c, *d]),
            _ => return Err(WsaError::WSAEFAULT),
        };
        match (level, name) {
            (SOL_SOCKET, SO_DEBUG) => sock.opts.debug.store(v != 0, Ordering::Relaxed),
            (IPPROTO_TCP, TCP_NODELAY) => sock.opts.nodelay.store(v != 0, Ordering::Relaxed),
            _ => sock.rdma_threshold.store(v, Ordering::Relaxed),
        }
        Ok(())
    }

    /// `SIO_GET_EXTENSION_FUNCTION_POINTER` (§7-12): which extension a GUID
    /// names; RDMA read is supported, the cache callback only when the
    /// registration cache is enabled.
    pub fn extension(&self, guid: &[u8; 16]) -> WsaResult<Extension> {
        let ext = Extension::from_guid(guid).ok_or(WsaError::WSAEINVAL)?;
        if ext == Extension::MemoryRegistrationCacheCallback && !self.inner.table.cache_enabled() {
            return Err(WsaError::WSAEOPNOTSUPP);
        }
        Ok(ext)
    }

    /// `WSPIoctl`'s check of its socket: any code but
    /// `SIO_GET_EXTENSION_FUNCTION_POINTER` (§7-12: not validated) on a
    /// closed or unknown socket fails `WSAENOTSOCK` (CLOSE-7); codes other
    /// than that one and `SIO_ADDRESS_LIST_QUERY` fail `WSAEINVAL`.
    pub fn ioctl_check(&self, s: ProviderSocket, code: u32) -> WsaResult<()> {
        if code == SIO_GET_EXTENSION_FUNCTION_POINTER {
            return Ok(());
        }
        self.inner.socket(s)?;
        match code {
            SIO_ADDRESS_LIST_QUERY => Ok(()),
            _ => Err(WsaError::WSAEINVAL),
        }
    }

    /// `SIO_ADDRESS_LIST_QUERY`: the IPv4 addresses of our NIC (EXT-4).
    pub fn address_list(&self) -> WsaResult<Vec<Ipv4Addr>> {
        self.inner.running()?;
        Ok(self.inner.nic.addresses())
    }

    /// `WSPGetQOSByName`: QoS is not supported (START-8).
    pub fn get_qos_by_name(&self, s: ProviderSocket) -> WsaResult<()> {
        self.inner.socket(s)?;
        Err(WsaError::WSAEOPNOTSUPP)
    }

    /// The local address a socket is bound or connected to.
    pub fn local_addr(&self, s: ProviderSocket) -> WsaResult<Option<SocketAddrV4>> {
        Ok(self.inner.socket(s)?.ctl().local)
    }

    /// The switch handle of a socket (SOCK-1/2 checks).
    pub fn switch_handle(&self, s: ProviderSocket) -> WsaResult<SwitchHandle> {
        Ok(self.inner.socket(s)?.handle)
    }

    // ------------------------------------------------------------------
    // Memory registration (§3.1, §5)
    // ------------------------------------------------------------------

    /// `WSPRegisterMemory` on a connected socket; returns the handle.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay valid memory until it is deregistered or
    /// the socket is closed, and the caller must not touch it while an op
    /// that uses it is pending.
    pub unsafe fn register_memory(
        &self,
        s: ProviderSocket,
        addr: *mut u8,
        len: u32,
        flags: u32,
    ) -> WsaResult<u64> {
        let sock = self.inner.socket(s)?;
        sock.connected_qp()?;
        // SAFETY: forwarded caller contract.
        let h = unsafe {
            self.inner
                .table
                .register_memory(&sock.regs, addr as usize, len as usize, flags)?
        };
        Ok(h.get())
    }

    /// `WSPDeregisterMemory`.
    pub fn deregister_memory(&self, s: ProviderSocket, handle: u64) -> WsaResult<()> {
        let sock = self.inner.socket(s)?;
        self.inner.table.deregister_memory(&sock.regs, handle)
    }

    /// `WSPRegisterRdmaMemory`: exposes the buffer to this connection's peer
    /// and writes the descriptor into `descriptor`, returning its length. A
    /// block shorter than [`RDMA_DESCRIPTOR_LEN`] fails `WSAEFAULT` (the C ABI
    /// then reports the required size, MEM-4).
    ///
    /// # Safety
    /// As [`Provider::register_memory`]; the peer may access the range while
    /// it is registered.
    pub unsafe fn register_rdma_memory(
        &self,
        s: ProviderSocket,
        addr: *mut u8,
        len: u32,
        flags: u32,
        descriptor: &mut [u8],
    ) -> WsaResult<usize> {
        let sock = self.inner.socket(s)?;
        let qp = sock.connected_qp()?;
        if descriptor.len() < DESCRIPTOR_LEN {
            return Err(WsaError::WSAEFAULT);
        }
        // SAFETY: forwarded caller contract.
        let d = unsafe {
            self.inner.table.register_rdma_memory(
                &sock.regs,
                qp.num(),
                addr as usize,
                len as usize,
                flags,
            )?
        };
        descriptor[..DESCRIPTOR_LEN].copy_from_slice(&d.encode());
        Ok(DESCRIPTOR_LEN)
    }

    /// `WSPDeregisterRdmaMemory`.
    pub fn deregister_rdma_memory(&self, s: ProviderSocket, descriptor: &[u8]) -> WsaResult<()> {
        let sock = self.inner.socket(s)?;
        self.inner
            .table
            .deregister_rdma_memory(&sock.regs, descriptor)
    }

    /// `WSPMemoryRegistrationCacheCallback`.
    pub fn memory_registration_cache_callback(&self, addr: *mut u8, size: usize) -> WsaResult<()> {
        self.inner.running()?;
        self.inner.table.cache_callback(addr as usize, size)
    }

    // ------------------------------------------------------------------
    // Data transfer (§4.3, §4.4). Ok(()) = started, i.e. WSA_IO_PENDING.
    // ------------------------------------------------------------------

    /// `WSPSend`: one message made of `bufs`, delivered whole into one posted
    /// receive of the peer. `flags` must be 0.
    ///
    /// # Safety
    /// Every buffer must lie in memory registered on `s` and stay valid, and
    /// `ov` must stay valid, until the op's completion was reported.
    pub unsafe fn send(
        &self,
        s: ProviderSocket,
        bufs: &[WsaBuf],
        flags: u32,
        ov: &Overlapped,
    ) -> WsaResult<()> {
        let sock = self.inner.enter(s)?;
        if flags != 0 {
            return Err(WsaError::WSAEOPNOTSUPP);
        }
        let max = self.inner.config.limits.max_msg_size;
        let it = bufs.iter().map(|b| (b.buf as usize, b.len, None));
        // SAFETY: forwarded caller contract.
        unsafe {
            self.inner
                .start_op(sock, it, MemFlags::READ, max, ov, false, |qp, id, sges| {
                    qp.post_send(&SendWr {
                        wr_id: id,
                        op: SendOp::Send,
                        sges,
                    })
                })
        }
    }

    /// `WSPRecv`: posts one receive made of `bufs`.
    ///
    /// # Safety
    /// As [`Provider::send`].
    pub unsafe fn recv(
        &self,
        s: ProviderSocket,
        bufs: &[WsaBuf],
        ov: &Overlapped,
    ) -> WsaResult<()> {
        let sock = self.inner.enter(s)?;
        let it = bufs.iter().map(|b| (b.buf as usize, b.len, None));
        // SAFETY: forwarded caller contract.
        unsafe {
            self.inner.start_op(
                sock,
                it,
                MemFlags::WRITE,
                u32::MAX,
                ov,
                true,
                |qp, id, sges| qp.post_recv(&RecvWr { wr_id: id, sges }),
            )
        }
    }

    /// `WSPRdmaWrite`: writes `bufs` to the peer buffer named by `descriptor`
    /// at `offset`.
    ///
    /// # Safety
    /// As [`Provider::send`]; each buffer's `handle` must come from
    /// `register_memory` on `s`.
    pub unsafe fn rdma_write(
        &self,
        s: ProviderSocket,
        bufs: &[WsaBufEx],
        descriptor: &[u8],
        offset: u32,
        flags: u32,
        ov: &Overlapped,
    ) -> WsaResult<()> {
        // SAFETY: forwarded caller contract.
        unsafe { self.rdma(s, bufs, descriptor, offset, flags, ov, RdmaDir::Write) }
    }

    /// `WSPRdmaRead`: fills `bufs` from the peer buffer named by `descriptor`
    /// at `offset`.
    ///
    /// # Safety
    /// As [`Provider::rdma_write`].
    pub unsafe fn rdma_read(
        &self,
        s: ProviderSocket,
        bufs: &[WsaBufEx],
        descriptor: &[u8],
        offset: u32,
        flags: u32,
        ov: &Overlapped,
    ) -> WsaResult<()> {
        // SAFETY: forwarded caller contract.
        unsafe { self.rdma(s, bufs, descriptor, offset, flags, ov, RdmaDir::Read) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn rdma(
        &self,
        s: ProviderSocket,
        bufs: &[WsaBufEx],
        descriptor: &[u8],
        offset: u32,
        flags: u32,
        ov: &Overlapped,
        dir: RdmaDir,
    ) -> WsaResult<()> {
        let sock = self.inner.enter(s)?;
        if flags != 0 {
            return Err(WsaError::WSAEOPNOTSUPP);
        }
        let d = Descriptor::decode(descriptor)?;
        // One buffer, the common op, without the loop's set-up.
        let total: u64 = match bufs {
            [one] => u64::from(one.len),
            _ => bufs.iter().map(|b| u64::from(b.len)).sum(),
        };
        let max = self.inner.config.limits.max_rdma_size;
        if total > u64::from(max) {
            return Err(WsaError::WSAEMSGSIZE);
        }
        let remote_addr = d.target(u64::from(offset), total)?;
        let (need, op) = match dir {
            RdmaDir::Write => (
                MemFlags::READ,
                SendOp::RdmaWrite {
                    remote_addr,
                    rkey: d.rkey,
                },
            ),
            RdmaDir::Read => (
                MemFlags::WRITE,
                SendOp::RdmaRead {
                    remote_addr,
                    rkey: d.rkey,
                },
            ),
        };
        let it = bufs.iter().map(|b| (b.buf as usize, b.len, Some(b.handle)));
        // SAFETY: forwarded caller contract. The total was checked above:
        // no second bound (one buffer's length is never above it).
        unsafe {
            self.inner
                .start_op(sock, it, need, u32::MAX, ov, false, |qp, id, sges| {
                    qp.post_send(&SendWr {
                        wr_id: id,
                        op,
                        sges,
                    })
                })
        }
    }
}

#[derive(Clone, Copy)]
enum RdmaDir {
    Write,
    Read,
}

/// Outcome of an outgoing connection attempt, on whatever thread completed
/// it (an acceptor, a timer).
fn connect_done(sock: &Socket, result: Result<Arc<dyn QueuePair>, ConnectError>) {
    let mut c = sock.ctl();
    // Under the ctl lock: close either already marked the socket (we tear
    // the new connection down, signal nothing) or will find the queue pair.
    if sock.gate.is_closing() {
        drop(c);
        if let Ok(qp) = result {
            qp.set_error();
        }
        return;
    }
    let result = result.map(|qp| {
        let _ = sock.qp.set(qp);
    });
    match &result {
        Ok(()) => tracing::debug!(socket = sock.desc.0, peer = ?c.peer, "connected"),
        Err(e) => {
            tracing::debug!(socket = sock.desc.0, peer = ?c.peer, error = ?e, "connect failed")
        }
    }
    record_connect(&mut c, result.map_err(connect_error));
}

/// Where a new provider's ephemeral ports start (an offset into the
/// dynamic range): spread by process and by provider, so that providers on
/// one RDMA device (rdma_cm's port space is the host's), in two processes or
/// in one, do not all bind 49152 for their first connect.
fn first_ephemeral() -> u16 {
    static PROVIDERS: AtomicU16 = AtomicU16::new(0);
    let process = std::process::id().wrapping_mul(0x9E37_79B9) >> 18;
    (process as u16).wrapping_add(PROVIDERS.fetch_add(1021, Ordering::Relaxed))
}

/// Connection-manager failure → the `FD_CONNECT` / `WSPConnect` code whose
/// fallback meaning the switch expects (§4.1 step 4).
fn connect_error(e: ConnectError) -> WsaError {
    match e {
        ConnectError::Refused => WsaError::WSAECONNREFUSED,
        ConnectError::NoListener => WsaError::WSAECONNRESET,
        ConnectError::HostUnreachable => WsaError::WSAEHOSTUNREACH,
        ConnectError::NetUnreachable => WsaError::WSAENETUNREACH,
        ConnectError::TimedOut => WsaError::WSAETIMEDOUT,
        ConnectError::NoResources => WsaError::WSAENOBUFS,
        ConnectError::Cancelled => WsaError::WSAECONNABORTED,
    }
}

impl Inner {
    fn start(
        self: &Arc<Self>,
        switch: Arc<dyn Switch>,
        catalog_entry_id: u32,
    ) -> WsaResult<Arc<Running>> {
        let dispatcher_waker = Arc::new(ParkWaker::default());
        let rtc_notifier = Arc::new(Notifier::default());
        let front: Arc<dyn Waker> = match self.config.poller.mode {
            PollerMode::Threads => dispatcher_waker.clone(),
            PollerMode::RunToCompletion => rtc_notifier.clone(),
        };
        let progress = Progress::start(&*self.nic, &self.config, front)
            .map_err(|_| WsaError::WSASYSNOTREADY)?;
        static NEXT_RUN: AtomicU64 = AtomicU64::new(1);
        let run = Arc::new(Running {
            id: NEXT_RUN.fetch_add(1, Ordering::Relaxed),
            switch,
            catalog_entry_id,
            progress,
            dispatcher_waker,
            rtc_notifier,
            dispatcher: Mutex::new(None),
            helper_started: std::sync::atomic::AtomicBool::new(
                self.config.poller.mode == PollerMode::Threads,
            ),
            reaped: crate::sync::CachePadded::new(AtomicU64::new(0)),
            closer: close::Closer::default(),
            stop: std::sync::atomic::AtomicBool::new(false),
            dup_service: Mutex::new(Vec::new()),
        });
        if self.config.poller.mode == PollerMode::Threads {
            let inner = self.clone();
            let r = run.clone();
            let core = self.config.poller.dispatcher_core;
            let h = std::thread::Builder::new()
                .name("sanpath-dispatch".into())
                .spawn(move || inner.dispatcher_main(&r, core))
                .map_err(|_| WsaError::WSASYSNOTREADY)?;
            *lock(&run.dispatcher) = Some(h);
        }
        Ok(run)
    }

    fn running(&self) -> WsaResult<Arc<Running>> {
        self.running
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(WsaError::WSANOTINITIALISED)
    }

    /// Runs `f` with the running engine, from this thread's cache of it:
    /// no lock and no reference count taken when the cache is fresh (the
    /// data path's waits). The cache keeps the last engine this thread used
    /// alive (its threads stopped, its queues empty once cleaned up) until
    /// the thread uses another or exits. `None` if the provider is not
    /// started, or if the cache is stale and this thread is dispatching
    /// (then the caller pins its socket instead).
    #[inline(always)]
    fn with_running<R>(&self, f: impl FnOnce(&Running) -> R) -> Option<R> {
        let id = self.run_id.load(Ordering::Acquire);
        if id == 0 {
            return None;
        }
        let (seen, run) = RUN_SEEN.with(Cell::get);
        let run = if seen == id {
            run
        } else {
            self.refresh_running()?
        };
        // SAFETY: `RUN_HELD` holds the `Arc` `run` came from (`RUN_SEEN`
        // names only what it holds, and is cleared before it is dropped),
        // and replaces it only in `refresh_running`, which no thread runs
        // while a frame of its own uses the engine (see there).
        Some(f(unsafe { &*run }))
    }

    /// Refills this thread's cache of the running engine: the engine, or
    /// `None` if there is none, or the thread is dispatching, or its cache
    /// is gone (thread exit).
    ///
    /// The engine it replaces may be in use further up this thread's stack
    /// only if this call came from an upcall (the callers of
    /// `with_running` reach no other provider call but through one), and an
    /// upcall runs dispatching (`dispatch::dispatching`): so then it
    /// refreshes nothing.
    #[cold]
    #[inline(never)]
    fn refresh_running(&self) -> Option<*const Running> {
        if dispatch::dispatching() {
            return None;
        }
        let run = self.running().ok()?;
        let ptr = Arc::as_ptr(&run);
        let id = run.id;
        RUN_HELD
            .try_with(|held| {
                // Named before the old engine is dropped: never a freed one.
                let old = held.0.replace(Some(run));
                RUN_SEEN.with(|s| s.set((id, ptr)));
                drop(old);
            })
            .ok()?;
        Some(ptr)
    }

    fn socket(&self, s: ProviderSocket) -> WsaResult<Arc<Socket>> {
        self.sockets.get(s)
    }

    /// A control call's lookup (progress, arm): a pin on the socket's table
    /// slot, no lock and no reference count.
    #[inline(always)]
    fn pin(&self, s: ProviderSocket) -> WsaResult<Pinned<'_>> {
        self.sockets.pin(s).ok_or(WsaError::WSAENOTSOCK)
    }

    /// A data call's lookup, which also enters the socket's close gate
    /// (`gate.rs`): one atomic add on the socket's table slot.
    #[inline(always)]
    fn enter(&self, s: ProviderSocket) -> WsaResult<Call<'_>> {
        #[cfg(feature = "fault-injection")]
        if let Ok(sock) = self.sockets.get(s) {
            dup::hooks::before_enter(&sock);
        }
        match self.sockets.enter(s) {
            Ok(entry) => Ok(Call { inner: self, entry }),
            Err(refused) => {
                if let Some(sock) = refused.finalize {
                    // SAFETY: the table handed this thread the socket's
                    // finalization, before which it is not released.
                    self.finalize(unsafe { sock.as_ref() });
                }
                Err(refused.error)
            }
        }
    }

    /// Creates a socket object with its switch handle (one
    /// `create_socket_handle` upcall, no lock held), not yet published.
    fn new_socket(&self, run: &Arc<Running>) -> WsaResult<Arc<Socket>> {
        let desc = self.sockets.reserve()?;
        let handle = match run
            .switch
            .create_socket_handle(run.catalog_entry_id, desc.0)
        {
            Ok(h) => h,
            Err(e) => {
                self.sockets.unreserve(desc);
                return Err(e);
            }
        };
        let id = OwnerId(self.next_owner.fetch_add(1, Ordering::Relaxed));
        let regs = self.table.new_owner(id);
        Ok(Arc::new(Socket::new(
            desc,
            handle,
            run.clone(),
            regs,
            self.config.limits.rdma_threshold,
        )))
    }

    fn qp_params(&self, run: &Running, sock: &Arc<Socket>) -> QpParams {
        let q = &self.config.qp;
        let (index, cq) = run.progress.assign_cq();
        sock.cq.store(index, Ordering::Relaxed);
        self.sockets.set_cq(sock.desc, index);
        QpParams {
            cq,
            send_depth: q.send_depth,
            recv_depth: q.recv_depth,
            max_sge: q.max_sge.min(MAX_SGE as u32),
            events: Arc::new(SocketQpEvents {
                socket: Arc::downgrade(sock),
                epoch: sock.dup.epoch(),
            }),
        }
    }

    fn ephemeral_port(&self) -> u16 {
        // 49152..=65534, the IANA dynamic range less 65535 (the default
        // `connect.dup_port`).
        49152 + self.next_port.fetch_add(1, Ordering::Relaxed) % 16383
    }

    /// The local address for a connect: the bound one (a wildcard IP becomes
    /// the NIC address on the target's subnet, else the first), or a fresh one.
    fn local_for_connect(
        &self,
        bound: Option<SocketAddrV4>,
        target: Ipv4Addr,
    ) -> WsaResult<SocketAddrV4> {
        let addrs = self.nic.addresses();
        let pick = || {
            let prefix = self.config.fabric.soft.prefix_len;
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            addrs
                .iter()
                .copied()
                .find(|a| u32::from(*a) & mask == u32::from(target) & mask)
                .or_else(|| addrs.first().copied())
                .ok_or(WsaError::WSAENETDOWN)
        };
        match bound {
            Some(a) if !a.ip().is_unspecified() => Ok(a),
            Some(a) => Ok(SocketAddrV4::new(pick()?, a.port())),
            None => Ok(SocketAddrV4::new(pick()?, self.ephemeral_port())),
        }
    }

    /// Validates the buffers, reserves an op slot and posts.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn start_op(
        self: &Arc<Self>,
        sock: Call<'_>,
        bufs: impl ExactSizeIterator<Item = (usize, u32, Option<usize>)>,
        need: MemFlags,
        max_total: u32,
        ov: &Overlapped,
        recv: bool,
        post: impl FnOnce(&dyn QueuePair, u64, &[Sge]) -> Result<(), PostError>,
    ) -> WsaResult<()> {
        // Most ops name one or two buffers: their entries are then set up
        // in arrays of that size, which cost less to clear than MAX_SGE.
        if bufs.len() <= KEPT_SGE {
            // SAFETY: forwarded caller contract.
            unsafe { self.start_op_n::<KEPT_SGE>(sock, bufs, need, max_total, ov, recv, post) }
        } else {
            // SAFETY: forwarded caller contract.
            unsafe { self.start_op_n::<MAX_SGE>(sock, bufs, need, max_total, ov, recv, post) }
        }
    }

    /// [`Inner::start_op`] with room for `N >= bufs.len()` entries (more
    /// fail `WSAEINVAL`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn start_op_n<const N: usize>(
        self: &Arc<Self>,
        sock: Call<'_>,
        bufs: impl ExactSizeIterator<Item = (usize, u32, Option<usize>)>,
        need: MemFlags,
        max_total: u32,
        ov: &Overlapped,
        recv: bool,
        post: impl FnOnce(&dyn QueuePair, u64, &[Sge]) -> Result<(), PostError>,
    ) -> WsaResult<()> {
        const { assert!(N >= KEPT_SGE && N <= MAX_SGE) };
        let loaded = sock.connected_qp()?;
        if ov.wants_upcall() {
            self.ensure_upcall_helper(&sock.run)?;
        }
        if bufs.len() > N || bufs.len() > self.config.qp.max_sge as usize {
            return Err(WsaError::WSAEINVAL);
        }
        // Read once entered: a duplication's swap either counts this op or
        // made its queue pair current (dup.rs).
        let qp = sock.posting_qp(loaded);
        let Some(slot) = self.ops.reserve(sock.cq_hint()) else {
            return Err(WsaError::WSAENOBUFS);
        };
        let mut sges = [Sge {
            addr: 0,
            len: 0,
            lkey: 0,
        }; N];
        // The holds go straight into the reserved slot's state, whose own
        // are all `None`; on an error they are dropped there again.
        let found = self.ops.prepare(&slot, |op| {
            let mut n = 0;
            let mut total: u64 = 0;
            for (addr, len, handle) in bufs {
                if len == 0 {
                    continue;
                }
                let reg = if addr == 0 {
                    Err(WsaError::WSAEFAULT)
                } else {
                    match handle {
                        // Not a handle `register_memory` returns.
                        Some(0) => {
                            self.table
                                .acquire_handle(&sock.regs, 0, addr, len as usize, need)
                        }
                        // SAFETY: the entered socket holds `regs`, and the
                        // op's registration holds are dropped while the
                        // socket lives: here on an error, else when the op
                        // completes, before it leaves the close gate
                        // (`dispatch.rs`).
                        h => unsafe {
                            self.table.acquire_pinned(
                                &sock.regs,
                                h.map_or(0, |h| h as u64),
                                addr,
                                len as usize,
                                need,
                            )
                        },
                    }
                };
                let reg = match reg {
                    Ok(reg) => reg,
                    Err(e) => {
                        release_regs(&mut op.regs);
                        return Err(e);
                    }
                };
                sges[n] = Sge {
                    addr,
                    len,
                    lkey: reg.lkey(),
                };
                op.push_reg(n, reg);
                n += 1;
                total += u64::from(len);
            }
            if total > u64::from(max_total) {
                release_regs(&mut op.regs);
                return Err(WsaError::WSAEMSGSIZE);
            }
            Ok(n)
        });
        let n = match found {
            Ok(n) => n,
            Err(e) => {
                // Never filled: the slot just goes back.
                let _ = self.ops.cancel(slot);
                return Err(e);
            }
        };
        // Marked started before the post, since the completion may be
        // dispatched before `post` returns; a post that fails puts the
        // record back as it was: the op never started (RDMA-3).
        let before = (
            ov.internal.load(Ordering::Relaxed),
            ov.internal_high.load(Ordering::Relaxed),
        );
        ov.start();
        // Built in the slot: only the fields an op uses are written (in
        // line: a call would spill every captured reference to the stack).
        self.ops.fill(
            &slot,
            close::owner_tag(&sock),
            #[inline(always)]
            |op| {
                op.socket = sock.op_socket();
                // SAFETY: the caller guarantees `ov` outlives the op.
                op.overlapped = unsafe { OvPtr::new(ov) };
                op.recv = recv;
                // Only a parked receive is posted again with them.
                if recv {
                    op.sges.copy_from_slice(&sges[..KEPT_SGE]);
                }
            },
        );
        match post(&**qp, slot.wr_id(), &sges[..n]) {
            // The op's completion (maybe already dispatched) may have left
            // the gate, even finalized the socket: the call's pin kept the
            // socket and its queue pair alive through the post.
            Ok(()) => {
                sock.posted();
                Ok(())
            }
            Err(e) => {
                let Some(state) = self.ops.cancel(slot) else {
                    // A close that abandoned the queue pair completed the op
                    // meanwhile (`close.rs`): it started, and is over.
                    sock.posted();
                    return Ok(());
                };
                drop(state);
                self.counters.refused();
                ov.internal_high.store(before.1, Ordering::Relaxed);
                ov.internal.store(before.0, Ordering::Release);
                // The call gives its op's unit and its pin back (dropped).
                Err(match e {
                    PostError::QueueFull => WsaError::WSAENOBUFS,
                    PostError::TooManySge => WsaError::WSAEINVAL,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `get_overlapped_result` of a pending op looks its socket up without
    /// a pin: a descriptor that names no live socket is still refused, and
    /// the op's own descriptor still waits (`fWait` false: incomplete).
    #[cfg(not(loom))]
    #[test]
    fn a_pending_ops_result_through_a_descriptor_that_is_no_socket_is_refused() {
        use crate::config::MlockPolicy;
        use crate::mem::region::Region;
        let mut config = Config::default();
        config.poller.mode = PollerMode::RunToCompletion;
        config.mem.mlock = MlockPolicy::Off;
        let ip = Ipv4Addr::new(198, 18, 252, 1);
        let (p, _nic, _net) =
            crate::testkit::soft_provider(config, ip, Arc::new(crate::testkit::CompletingSwitch))
                .unwrap();
        let (client, server) =
            crate::testkit::connected_pair(&p, SocketAddrV4::new(ip, 4791)).unwrap();
        let buf = Region::new(4096, MlockPolicy::Off).unwrap();
        let ov = Overlapped::new(1);
        let b = [WsaBuf {
            len: 64,
            buf: buf.as_ptr(),
        }];
        // SAFETY: `buf` and `ov` outlive the op, which the cleanup below
        // completes.
        unsafe {
            p.register_memory(server, buf.as_ptr(), 4096, MEM_READWRITE)
                .unwrap();
            p.recv(server, &b, &ov).unwrap();
        }
        let stale = ProviderSocket(server.0 + (1 << 32));
        for bad in [stale, ProviderSocket(12345), client] {
            let r = p.get_overlapped_result(bad, &ov, false);
            if bad == client {
                // Another live socket: its CQ is polled, the op stays pending.
                assert_eq!(r, Err(WsaError::WSA_IO_INCOMPLETE));
            } else {
                assert_eq!(r, Err(WsaError::WSAENOTSOCK), "{bad:?}");
            }
        }
        assert_eq!(
            p.get_overlapped_result(server, &ov, false),
            Err(WsaError::WSA_IO_INCOMPLETE)
        );
        p.cleanup().unwrap();
        assert!(!ov.is_pending());
    }

    #[test]
    fn version_below_2_2_is_refused() {
        let net = crate::fabric::soft::SoftNetwork::new();
        let nic = net
            .attach(Config::default().soft_nic(vec![Ipv4Addr::new(198, 18, 200, 1)]))
            .unwrap();
        let p = Provider::with_nic(Config::default(), nic).unwrap();
        struct Nop;
        impl Switch for Nop {
            fn create_socket_handle(&self, _: u32, c: usize) -> WsaResult<SwitchHandle> {
                Ok(SwitchHandle(c ^ 1))
            }
            fn close_socket_handle(&self, _: SwitchHandle) -> WsaResult<()> {
                Ok(())
            }
            fn query_socket_handle_context(&self, _: SwitchHandle) -> WsaResult<usize> {
                Ok(0)
            }
            fn complete_overlapped_request(
                &self,
                _: SwitchHandle,
                ov: &Overlapped,
                e: u32,
                b: u32,
            ) -> WsaResult<()> {
                ov.complete(e, b);
                Ok(())
            }
        }
        assert_eq!(
            p.startup(0x0102, Arc::new(Nop), 1).unwrap_err(),
            WsaError::WSAVERNOTSUPPORTED
        );
        assert_eq!(p.cleanup().unwrap_err(), WsaError::WSANOTINITIALISED);
        p.startup(0x0202, Arc::new(Nop), 1).unwrap();
        p.cleanup().unwrap();
    }
}
