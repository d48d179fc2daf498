//! The `verbs` fabric: the [`Nic`](super::Nic) trait over libibverbs RC queue
//! pairs and librdmacm connection management (through `rdma-sys`), for
//! InfiniBand, RoCE and Soft-RoCE (`rdma_rxe`) alike. Feature `verbs`.
//!
//! # Mapping
//!
//! | trait | verbs |
//! |---|---|
//! | [`VerbsNic::open`] | `rdma_get_devices` (librdmacm's own device contexts, so that the PD matches the QPs rdma_cm creates), port query, one PD |
//! | `register` / `deregister` | `ibv_reg_mr` / `ibv_dereg_mr`; the base MR never carries remote rights |
//! | `bind_remote` / `unbind_remote` | a type-2 memory window bound through the queue pair's send queue (so only that QP's peer can use the rkey) / `ibv_dealloc_mw`; without MW support: a second MR with remote rights / its deregistration (see below) |
//! | `create_cq`, `poll`, `arm` | `ibv_create_cq` on the NIC's completion channel, `ibv_poll_cq`, `ibv_req_notify_cq` |
//! | `listen`, `connect`, `accept`, `reject` | `rdma_listen`, `rdma_resolve_addr` → `rdma_resolve_route` → `rdma_connect`, `rdma_accept`, `rdma_reject` (RC, `RDMA_PS_TCP`, by IPv4 address) |
//! | `post_send`, `post_recv` | `ibv_post_send` (signaled; inline when the payload fits `max_inline_data`), `ibv_post_recv` |
//! | `set_error` | QP → `IBV_QPS_ERR` (the NIC flushes every posted request) + `rdma_disconnect` |
//! | `abandon` | `set_error`, its windows deallocated, then `rdma_destroy_qp` (no DMA after it returned) |
//! | `QpEvents::disconnected` | `RDMA_CM_EVENT_DISCONNECTED` (peer closed or its process died) |
//!
//! # Threads
//!
//! Each NIC runs two small threads, both blocked in `poll(2)` until there is
//! something to do (neither ever spins):
//!
//! - the **CM thread** reads the rdma_cm event channel, acknowledges each
//!   event at once (so `rdma_destroy_id` elsewhere never waits on it), and
//!   drives connection set-up, failing a connection request the peer left
//!   unanswered for `connect_timeout` (its poll then waits at most until the
//!   next such deadline); every callback (`ConnectDone`,
//!   `ListenerEvents`, `QpEvents`) runs on it with no lock held. Callbacks
//!   must not block waiting for another connection event.
//! - the **notify thread** reads the NIC's one completion channel, shared by
//!   all its CQs (`ibv_get_cq_event` names the CQ), acknowledges the event
//!   and wakes that CQ's waker. One thread and one fd per NIC rather than per
//!   CQ: the engine creates few CQs, and wake-ups are off the hot path
//!   (busy polling is the poller's job; a wake-up only follows `arm`).
//!
//! Dropping the [`VerbsNic`] stops both; resources still referenced (QPs,
//! CQs) stay valid but see no more connection events or wake-ups, so drop
//! the NIC last.
//!
//! # Memory windows and MEM-7
//!
//! With type-2 windows (rxe in Linux 6.1, where it is tested; mlx5; ...) a remote key works
//! only through the queue pair it was bound on, and revoking it is
//! `ibv_dealloc_mw`, synchronous in the kernel: accesses after
//! `unbind_remote` returned fail with a remote access error (which, as verbs
//! prescribes, also breaks that connection). Binding posts an *unsignaled*
//! `IBV_WR_BIND_MW` on the QP's send queue with the reserved work-request id
//! [`RESERVED_WR_ID`]: it executes in order before any later request on that
//! QP (in particular before the message that carries the key to the peer); a
//! successful bind produces no completion, a failed or flushed one is dropped
//! by [`CompletionQueue::poll`](super::CompletionQueue::poll). Each QP's send
//! queue has [`BIND_SLACK`] extra entries for these.
//!
//! Without window support (or with [`MemoryWindows::Off`]) `bind_remote`
//! fails [`FabricError::Unsupported`]: the only other way to make a remote
//! key, a second registration with the remote rights, gives a key valid
//! through *every* queue pair of the protection domain, so MEM-7 (a key
//! usable only by the peer it was given to) would not hold. With
//! [`MemoryWindows::SharedKeys`] (opt-in) it does that anyway; unbinding
//! deregisters the second MR, so revocation (deregistration, close) still
//! works.
//!
//! # Close
//!
//! `set_error` moves the QP to the error state under its post lock (so no
//! post can slip past it), then disconnects; requests posted afterwards are
//! not handed to the NIC at all but completed `Flushed` in software (rxe in
//! Linux 6.1 does not flush receives posted to a QP already in error).
//! Dropping the last reference to a QP destroys it and its rdma_cm id; the
//! engine does that after the flushes were polled and the registrations
//! released: error → flushed → disconnect → deregister → destroy. When the
//! flushes do not come within `close.quiesce_timeout_ms`, the engine calls
//! `abandon` instead, which destroys the QP at once (under the post lock,
//! so no post is inside it): once `ibv_destroy_qp` returned the device does
//! no DMA for it, and the engine completes the ops itself; completions of
//! the destroyed QP still in the CQ are dropped by the engine.

mod cm;
mod cq;
mod id;
mod mr;
mod qp;
mod sys;

pub use cq::VerbsCq;
pub use qp::VerbsQp;

use self::cm::Tokens;
use self::mr::Registrations;
use self::sys::{errno, gid_ipv4, os_error, Raw};
use super::{
    Access, CompletionQueue, ConnectAttempt, ConnectDone, ConnectError, CqId, FabricError,
    Listener, ListenerEvents, MrKeys, Nic, NicStats, QpNum, QpParams, Waker,
};
use rdma_sys::*;
use std::collections::HashMap;
use std::ffi::CStr;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// Work-request id reserved for the backend's own unsignaled requests
/// (memory-window binds). Completions carrying it are never returned by
/// `poll`. The engine's ids (`generation << 32 | slot`) never reach it: its
/// slot index would have to be `u32::MAX`.
pub const RESERVED_WR_ID: u64 = u64::MAX;

/// Extra send-queue entries of every QP, for memory-window binds.
pub const BIND_SLACK: u32 = 16;

/// Extra CQ entries beyond the requested depth (flushed binds).
const CQ_SLACK: u32 = 64;

pub use crate::config::MemoryWindows;

/// Settings of a verbs NIC.
#[derive(Clone, Debug)]
pub struct VerbsConfig {
    /// Device name (`rxe0`, `mlx5_0`); `None`: the first device whose
    /// `port` is active.
    pub device: Option<String>,
    /// Port number (1-based).
    pub port: u8,
    /// The NIC's IPv4 addresses; empty: the IPv4-mapped GIDs of the port
    /// (RoCE v2), i.e. the addresses of its network device.
    pub addresses: Vec<Ipv4Addr>,
    /// rdma_cm address and route resolution timeout, each, and how long a
    /// connection request waits for the peer's answer (then the attempt
    /// fails `TimedOut`: a host without an RDMA CM never answers).
    pub connect_timeout: Duration,
    /// Local ACK timeout exponent: 4.096 µs × 2^n per transport retry.
    /// 14 ≈ 67 ms, so a dead peer or link fails a request after about
    /// (retry_count + 1) × 67 ms ≈ 0.5 s.
    pub ack_timeout: u8,
    /// Transport retries (0–7).
    pub retry_count: u8,
    /// Receiver-not-ready retries (7 = retry forever).
    pub rnr_retry: u8,
    /// Minimal RNR NAK timer code this side advertises (IB encoding: 1 =
    /// 0.01 ms, 7 = 0.12 ms, 12 = 0.64 ms, 0 = 655 ms, rdma_cm's default).
    pub min_rnr_timer: u8,
    /// Inline data size asked for each QP (a device that refuses it is
    /// asked for half, down to 16 B, then for none). The
    /// default, 128 B, carries a stream socket's 64-byte message with its
    /// 20-byte header inline, as an rsocket's 64 B goes.
    pub max_inline: u32,
    pub memory_windows: MemoryWindows,
    /// `open` fails when RLIMIT_MEMLOCK is below this many bytes and the
    /// process lacks CAP_IPC_LOCK. 0: no check.
    pub min_memlock: u64,
}

impl Default for VerbsConfig {
    fn default() -> Self {
        VerbsConfig {
            device: None,
            port: 1,
            addresses: Vec::new(),
            connect_timeout: Duration::from_millis(3000),
            ack_timeout: 14,
            retry_count: 7,
            rnr_retry: 7,
            min_rnr_timer: 7,
            max_inline: 128,
            memory_windows: MemoryWindows::Auto,
            min_memlock: 64 << 20,
        }
    }
}

/// Device limits read at open.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caps {
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    /// RDMA read depth offered in both directions.
    pub rd_atom: u8,
    /// Type-2 memory windows in use.
    pub windows: bool,
    /// Without windows: remote keys are second registrations valid through
    /// every QP of the PD (`MemoryWindows::SharedKeys`); else exposure is
    /// refused.
    pub shared_keys: bool,
}

/// What every object of a NIC shares; freed when the last of them is gone.
pub(crate) struct Shared {
    pub name: String,
    pub port: u8,
    pub cfg: VerbsConfig,
    pub caps: Caps,
    pub addresses: Vec<Ipv4Addr>,
    /// librdmacm's device list; `ctx` points into it. Freed in `drop`.
    devices: Raw<*mut ibv_context>,
    /// The device context (owned by librdmacm, shared with rdma_cm ids).
    pub ctx: Raw<ibv_context>,
    /// The protection domain of every MR, window and QP of this NIC.
    pub pd: Raw<ibv_pd>,
    /// The rdma_cm event channel of every id of this NIC.
    pub cm_channel: Raw<rdma_event_channel>,
    /// The completion channel of every CQ of this NIC.
    pub comp_channel: Raw<ibv_comp_channel>,
    pub regs: Mutex<Registrations>,
    /// Live CQs by id (notify thread, `QpParams::cq` lookups).
    pub cqs: Mutex<HashMap<u32, Weak<VerbsCq>>>,
    /// Live QPs by number (`bind_remote`).
    pub qps: Mutex<HashMap<u32, Weak<VerbsQp>>>,
    /// rdma_cm id contexts → their owners (CM thread dispatch).
    pub tokens: Tokens,
    next_cq: AtomicU32,
    pub live_qps: AtomicU64,
}

/// `SANPATH_VERBS_TRACE=1`: connection events are printed to stderr.
pub(crate) fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SANPATH_VERBS_TRACE").is_some_and(|v| v == "1"))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn cq(&self, id: CqId) -> Option<Arc<VerbsCq>> {
        lock(&self.cqs).get(&id.0).and_then(Weak::upgrade)
    }

    pub fn qp(&self, num: u32) -> Option<Arc<VerbsQp>> {
        lock(&self.qps).get(&num).and_then(Weak::upgrade)
    }

    pub fn owns(&self, ip: Ipv4Addr) -> bool {
        self.addresses.contains(&ip)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every MR, window, QP, CQ and rdma_cm id holds an `Arc<Shared>`, so
        // all of them are gone by now except registrations the engine never
        // released.
        lock(&self.regs).release_all();
        // SAFETY: all ids on the channel were destroyed (their owners held
        // Arc<Shared>), all CQs on the completion channel too, and all MRs,
        // windows and QPs of the PD; nothing else uses these objects.
        unsafe {
            ibv_dealloc_pd(self.pd.get());
            ibv_destroy_comp_channel(self.comp_channel.get());
            rdma_destroy_event_channel(self.cm_channel.get());
            rdma_free_devices(self.devices.get());
        }
    }
}

/// A verbs NIC: one port of one RDMA device. See the module docs.
pub struct VerbsNic {
    shared: Arc<Shared>,
    /// Wakes the two threads for shutdown (an eventfd).
    stop: Arc<OwnedFd>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for VerbsNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsNic")
            .field("device", &self.shared.name)
            .field("port", &self.shared.port)
            .field("addresses", &self.shared.addresses)
            .field("memory_windows", &self.shared.caps.windows)
            .finish()
    }
}

/// Names of the devices librdmacm sees (for messages and tests).
pub fn device_names() -> Vec<String> {
    let mut n = 0;
    // SAFETY: rdma_get_devices returns a NULL-terminated array of n
    // contexts (or NULL), freed by rdma_free_devices below.
    let list = unsafe { rdma_get_devices(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: i < n entries of the array are valid contexts.
        let ctx = unsafe { *list.add(i) };
        // SAFETY: a valid context has a valid device with a NUL-terminated name.
        names.push(unsafe { device_name(ctx) });
    }
    // SAFETY: the list came from rdma_get_devices and is not used afterwards.
    unsafe { rdma_free_devices(list) };
    names
}

/// # Safety
/// `ctx` must be a valid device context.
unsafe fn device_name(ctx: *mut ibv_context) -> String {
    // SAFETY: the caller guarantees ctx; libibverbs returns a NUL-terminated
    // name that lives as long as the device.
    unsafe { CStr::from_ptr(ibv_get_device_name((*ctx).device)) }
        .to_string_lossy()
        .into_owned()
}

fn unavailable(msg: String) -> FabricError {
    FabricError::Unavailable(msg)
}

/// Fails when locked memory is limited below `min` and the process cannot
/// exceed the limit (no CAP_IPC_LOCK).
fn check_memlock(min: u64) -> Result<(), FabricError> {
    if min == 0 {
        return Ok(());
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Ok(());
    }
    if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= min {
        return Ok(());
    }
    // CAP_IPC_LOCK (bit 14) in the effective set lifts the limit.
    let cap_ipc_lock = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 14) != 0);
    if cap_ipc_lock {
        return Ok(());
    }
    Err(unavailable(format!(
        "locked-memory limit too low for RDMA: RLIMIT_MEMLOCK is {} KiB, the verbs fabric \
         needs at least {} KiB (min_memlock) to register memory; raise it (`ulimit -l \
         unlimited`, `memlock` in /etc/security/limits.conf, LimitMEMLOCK= for a systemd \
         unit) or grant CAP_IPC_LOCK",
        lim.rlim_cur / 1024,
        min / 1024
    )))
}

/// # Safety
/// `ctx` must be a valid device context.
unsafe fn port_state(ctx: *mut ibv_context, port: u8) -> Result<ibv_port_attr, i32> {
    // SAFETY: ibv_port_attr is plain data; all-zero is valid.
    let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: ctx is valid (caller); attr is a writable ibv_port_attr.
    let rc = unsafe { ___ibv_query_port(ctx, port, &mut attr) };
    if rc != 0 {
        return Err(rc);
    }
    Ok(attr)
}

fn port_state_name(s: ibv_port_state::Type) -> &'static str {
    use ibv_port_state::*;
    match s {
        IBV_PORT_DOWN => "DOWN",
        IBV_PORT_INIT => "INIT",
        IBV_PORT_ARMED => "ARMED",
        IBV_PORT_ACTIVE => "ACTIVE",
        IBV_PORT_ACTIVE_DEFER => "ACTIVE_DEFER",
        _ => "NOP",
    }
}

/// # Safety
/// `ctx` must be a valid device context.
unsafe fn ipv4_gids(ctx: *mut ibv_context, port: u8, len: i32) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for i in 0..len {
        // SAFETY: ibv_gid is plain data.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is valid (caller), i < the port's GID table length.
        if unsafe { ibv_query_gid(ctx, port, i, &mut gid) } != 0 {
            continue;
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        if let Some(ip) = gid_ipv4(unsafe { gid.raw }) {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// Makes `fd` non-blocking.
fn set_nonblocking(fd: i32) -> Result<(), FabricError> {
    // SAFETY: fcntl on an fd we own; F_GETFL/F_SETFL touch only its flags.
    let ok = unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(unavailable(os_error("fcntl(O_NONBLOCK)")))
    }
}

/// Waits until `fd` is readable or `stop` was signalled; returns `false` on
/// stop.
pub(crate) fn wait_readable(fd: i32, stop: &OwnedFd) -> bool {
    wait_readable_for(fd, stop, None)
}

/// [`wait_readable`], also returning (`true`) once `timeout` passed.
pub(crate) fn wait_readable_for(fd: i32, stop: &OwnedFd, timeout: Option<Duration>) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // Rounded up: a deadline is never reported early.
        let ms = timeout.map_or(-1, |t| {
            i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
        });
        // SAFETY: fds is a valid array of 2 pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return fds[1].revents == 0;
    }
}

impl VerbsNic {
    /// Opens the device and port `cfg` names and starts the NIC's threads.
    /// Errors say what is missing: no RDMA device, the port not active, no
    /// IPv4 address, locked memory limited, no memory windows when required.
    pub fn open(cfg: VerbsConfig) -> Result<Arc<VerbsNic>, FabricError> {
        let mut n = 0;
        // SAFETY: see device_names; the list is kept until Shared drops (or
        // freed below on failure), as `ctx` points into it.
        let list = unsafe { rdma_get_devices(&mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if list.is_null() || n == 0 {
            if !list.is_null() {
                // SAFETY: from rdma_get_devices, unused afterwards.
                unsafe { rdma_free_devices(list) };
            }
            return Err(unavailable(
                "no RDMA device found (librdmacm lists none): load a driver, e.g. for \
                 Soft-RoCE `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev IFACE`, \
                 and check /dev/infiniband is accessible"
                    .into(),
            ));
        }
        let free = |e: FabricError| {
            // SAFETY: from rdma_get_devices, unused after this error.
            unsafe { rdma_free_devices(list) };
            e
        };
        // SAFETY: the first n entries are valid contexts.
        let ctxs: Vec<*mut ibv_context> = (0..n).map(|i| unsafe { *list.add(i) }).collect();
        // SAFETY: valid contexts.
        let names: Vec<String> = ctxs.iter().map(|&c| unsafe { device_name(c) }).collect();
        let mut chosen = None;
        let mut why = Vec::new();
        for (i, &ctx) in ctxs.iter().enumerate() {
            if cfg.device.as_ref().is_some_and(|d| *d != names[i]) {
                continue;
            }
            // SAFETY: valid context.
            match unsafe { port_state(ctx, cfg.port) } {
                Ok(a) if a.state == ibv_port_state::IBV_PORT_ACTIVE => {
                    chosen = Some((ctx, names[i].clone(), a));
                    break;
                }
                Ok(a) => why.push(format!(
                    "port {} of {} is {}",
                    cfg.port,
                    names[i],
                    port_state_name(a.state)
                )),
                Err(_) => why.push(format!("{} has no port {}", names[i], cfg.port)),
            }
        }
        let Some((ctx, name, port_attr)) = chosen else {
            let msg = match &cfg.device {
                Some(d) if !names.contains(d) => {
                    format!("RDMA device {d} not found (present: {})", names.join(", "))
                }
                _ => format!(
                    "no active RDMA port: {} (check the link and `rdma link show`)",
                    why.join("; ")
                ),
            };
            return Err(free(unavailable(msg)));
        };
        check_memlock(cfg.min_memlock).map_err(free)?;
        // SAFETY: ibv_device_attr is plain data.
        let mut dev: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context, writable attr.
        if unsafe { ibv_query_device(ctx, &mut dev) } != 0 {
            return Err(free(unavailable(os_error("ibv_query_device"))));
        }
        let mw_caps = ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2A.0
            | ibv_device_cap_flags::IBV_DEVICE_MEM_WINDOW_TYPE_2B.0;
        let has_mw = dev.max_mw > 0 && dev.device_cap_flags & mw_caps != 0;
        let windows = match cfg.memory_windows {
            MemoryWindows::Off | MemoryWindows::SharedKeys => false,
            MemoryWindows::Auto => has_mw,
            MemoryWindows::Required if has_mw => true,
            MemoryWindows::Required => {
                return Err(free(unavailable(format!(
                    "{name} has no type-2 memory windows (memory_windows = required)"
                ))))
            }
        };
        let addresses = if cfg.addresses.is_empty() {
            // SAFETY: valid context and port.
            unsafe { ipv4_gids(ctx, cfg.port, port_attr.gid_tbl_len) }
        } else {
            cfg.addresses.clone()
        };
        if addresses.is_empty() {
            return Err(free(unavailable(format!(
                "{name} port {} has no IPv4 address (no IPv4-mapped GID): give its network \
                 device an IPv4 address, or set the addresses explicitly",
                cfg.port
            ))));
        }
        let clamp = |v: i32| u32::try_from(v).unwrap_or(0);
        let caps = Caps {
            max_qp_wr: clamp(dev.max_qp_wr),
            max_sge: clamp(dev.max_sge),
            max_cqe: clamp(dev.max_cqe),
            rd_atom: u8::try_from(dev.max_qp_rd_atom.min(dev.max_qp_init_rd_atom).clamp(0, 16))
                .unwrap_or(1),
            windows,
            shared_keys: cfg.memory_windows == MemoryWindows::SharedKeys,
        };
        // SAFETY: valid context; the PD is released in Shared::drop or below.
        let pd = unsafe { ibv_alloc_pd(ctx) };
        if pd.is_null() {
            return Err(free(unavailable(os_error("ibv_alloc_pd"))));
        }
        // SAFETY: creates a channel; released in Shared::drop or below.
        let cm_channel = unsafe { rdma_create_event_channel() };
        // SAFETY: valid context; released in Shared::drop or below.
        let comp_channel = unsafe { ibv_create_comp_channel(ctx) };
        // SAFETY: creates an eventfd we own from here on.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if cm_channel.is_null() || comp_channel.is_null() || efd < 0 {
            let e = unavailable(os_error("creating the rdma_cm/completion channels"));
            // SAFETY: each object was created above and is not used again.
            unsafe {
                if !comp_channel.is_null() {
                    ibv_destroy_comp_channel(comp_channel);
                }
                if !cm_channel.is_null() {
                    rdma_destroy_event_channel(cm_channel);
                }
                if efd >= 0 {
                    libc::close(efd);
                }
                ibv_dealloc_pd(pd);
            }
            return Err(free(e));
        }
        // SAFETY: efd is a fresh descriptor nobody else owns.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let shared = Arc::new(Shared {
            name,
            port: cfg.port,
            caps,
            addresses,
            devices: Raw(list),
            ctx: Raw(ctx),
            pd: Raw(pd),
            cm_channel: Raw(cm_channel),
            comp_channel: Raw(comp_channel),
            regs: Mutex::new(Registrations::default()),
            cqs: Mutex::new(HashMap::new()),
            qps: Mutex::new(HashMap::new()),
            tokens: Tokens::default(),
            next_cq: AtomicU32::new(1),
            live_qps: AtomicU64::new(0),
            cfg,
        });
        // SAFETY: both channels are valid for the life of `shared`.
        let (cm_fd, comp_fd) = unsafe { ((*cm_channel).fd, (*comp_channel).fd) };
        set_nonblocking(cm_fd)?;
        set_nonblocking(comp_fd)?;
        let mut threads = Vec::new();
        for (what, f) in [
            ("cm", cm::run as fn(Arc<Shared>, Arc<OwnedFd>)),
            ("notify", cq::run_notify as fn(Arc<Shared>, Arc<OwnedFd>)),
        ] {
            let (s, st) = (shared.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("verbs-{what}-{}", shared.name))
                .spawn(move || f(s, st))
                .map_err(|e| unavailable(format!("spawning the {what} thread: {e}")));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let nic = VerbsNic {
                        shared,
                        stop,
                        threads: Mutex::new(threads),
                    };
                    drop(nic);
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(VerbsNic {
            shared,
            stop,
            threads: Mutex::new(threads),
        }))
    }

    /// The device name (`rxe0`).
    pub fn device(&self) -> &str {
        &self.shared.name
    }

    /// Whether remote keys are type-2 memory windows (MEM-7 enforced by the
    /// NIC) rather than extra registrations.
    pub fn uses_memory_windows(&self) -> bool {
        self.shared.caps.windows
    }
}

impl Drop for VerbsNic {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let me = std::thread::current().id();
        for t in lock(&self.threads).drain(..) {
            // A callback on one of our threads may drop the last handle:
            // that thread ends by itself after the callback returns.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        // Pending attempts and listeners hold Arc<Shared>: release them.
        self.shared.tokens.clear();
    }
}

impl Nic for VerbsNic {
    fn addresses(&self) -> Vec<Ipv4Addr> {
        self.shared.addresses.clone()
    }

    fn create_cq(
        &self,
        depth: u32,
        waker: Arc<dyn Waker>,
    ) -> Result<Arc<dyn CompletionQueue>, FabricError> {
        let id = CqId(self.shared.next_cq.fetch_add(1, Ordering::Relaxed));
        let cq: Arc<dyn CompletionQueue> = VerbsCq::create(&self.shared, id, depth, waker)?;
        Ok(cq)
    }

    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<MrKeys, FabricError> {
        // SAFETY: forwarded contract: the range stays valid until deregister.
        unsafe { mr::register(&self.shared, addr, len, access) }
    }

    fn deregister(&self, lkey: u32) {
        mr::deregister(&self.shared, lkey);
    }

    fn bind_remote(&self, lkey: u32, qp: QpNum, access: Access) -> Result<u32, FabricError> {
        mr::bind_remote(&self.shared, lkey, qp, access)
    }

    fn unbind_remote(&self, rkey: u32) {
        mr::unbind_remote(&self.shared, rkey);
    }

    fn listen(
        &self,
        addr: SocketAddrV4,
        backlog: u32,
        events: Arc<dyn ListenerEvents>,
    ) -> Result<Arc<dyn Listener>, FabricError> {
        cm::listen(&self.shared, addr, backlog, events)
    }

    fn connect(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        cm::connect(&self.shared, local, remote, params, &[], done)
    }

    fn connect_with_data(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        private_data: &[u8],
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        cm::connect(&self.shared, local, remote, params, private_data, done)
    }

    fn stats(&self) -> NicStats {
        let regs = lock(&self.shared.regs);
        NicStats {
            registrations: regs.registrations,
            live_regions: regs.live_regions(),
            live_remote_keys: regs.live_remote_keys(),
            live_qps: self.shared.live_qps.load(Ordering::Relaxed),
        }
    }
}
