//! `shm`: a fabric between processes of one host, through shared memory.
//!
//! Each process owns a NIC with one or more IPv4 addresses. A connection
//! is two segments (`memfd`s, [`seg`]), one per direction, each holding
//! the soft fabric's cell ring (`soft::cell`, laid in the segment) and its
//! owner's control words; both processes map both. Connection management
//! runs over a `SOCK_SEQPACKET` Unix socket per address in the runtime
//! directory, the descriptors passed with `SCM_RIGHTS` ([`cm`]).
//!
//! - **Data** ([`conn`]): a send of up to 168 bytes is copied into its
//!   cell; a longer one, and every RDMA request, carries the poster's
//!   gather list, and the receiving process moves the bytes with ONE
//!   `process_vm_readv` / `process_vm_writev`. RDMA is executed by the
//!   owner of the target memory, which checks the remote key in the window
//!   of keys it bound to that connection (`bind_remote`), with the access
//!   right, under the window's lock: an unbind or deregistration waits for
//!   a copy in progress, and a key dies with its connection.
//! - **Progress**: what arrives is executed when the receiving end's CQ is
//!   polled (the engine's pollers poll, or arm and sleep). A small message
//!   moves one cache line each way: its cell, whose header also
//!   acknowledges the messages of the other direction ([`conn`]).
//! - **Wake-ups**: a CQ that arms ([`cq`]) marks each of its ends as
//!   sleeping in the end's own segment; a peer that published work for a
//!   sleeping end clears the mark and signals the end's eventfd, which the
//!   NIC's event thread turns into the CQ's wake (through the CQ's shared
//!   part, which the ends hold: [`notify`]). An awake end costs its peer a
//!   load and a compiler fence: the sleeper's side of that Dekker handshake
//!   is a `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)` between its marks
//!   and its look for work, which every registered process's threads pass
//!   as a full fence (both processes register when their first segment is
//!   made; a segment's header says whether its owner arms that way, and a
//!   process that cannot keeps full fences on both sides).
//! - **Failure**: a close, a refused request, garbage in a cell, or the
//!   peer's death (its socket hangs up) breaks the connection; every
//!   posted request still completes exactly once (success if the peer
//!   took it, else `Flushed`, or `RemoteDisconnected` for what the peer's
//!   side broke), and a break waits for its own poller's pass and the
//!   peer's before flushing (the seal: `conn`).
//! - **Untrusted peer memory**: everything read from the peer's segment
//!   is bounds-checked (`Message::decode`, gather totals, geometry checked
//!   once at mapping time); the segments are sealed against resizing.
//!   (A peer can always write our memory through CMA itself: the checks
//!   keep a faulty peer from crashing us, not a hostile one out.)
//! - **Permissions**: CMA needs the right to ptrace the peer: both
//!   processes run as the same user, and a NIC lifts the Yama restriction
//!   to descendants (`PR_SET_PTRACER_ANY`), so that sibling processes can
//!   be peers (Yama scope 2 or 3 forbids the fabric).
//! - **Runtime directory**: `fabric.shm.runtime_dir`, else
//!   `$XDG_RUNTIME_DIR/sanpath`, else `sanpath-<uid>` (mode 0700) under
//!   the temp dir. It holds only the address sockets: removed by a NIC's
//!   drop, and a dead process's by whoever finds them stale (a peer seeing
//!   its connection hang up, a connector refused, a NIC taking the
//!   address).
//!
//! Not (yet) like the soft fabric: a send waits in its cell for a receive
//! without a receiver-not-ready bound (`rnr_queue_max` is not enforced), and
//! an RDMA request waits behind a send that waits.

mod cm;
mod conn;
mod cq;
#[cfg(test)]
mod hook;
mod notify;
mod seg;
mod sys;
#[cfg(test)]
mod tests;
mod wq;

use crate::fabric::lkey_cache::{CachedRegion, LkeyCache};
use crate::fabric::*;
use conn::Conn;
use cq::{CqInner, ShmCq};
pub(crate) use seg::fuzz_segment;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Settings of one shared-memory NIC.
#[derive(Clone, Debug)]
pub struct ShmNicConfig {
    /// The NIC's IPv4 addresses (at least one), each a socket in `dir`.
    pub addresses: Vec<Ipv4Addr>,
    /// Length of the SAN subnet prefix of each address.
    pub prefix_len: u8,
    /// How long a connect waits for the listening process to queue it.
    pub connect_timeout: Duration,
    /// The runtime directory; `None`: the default (module docs).
    pub runtime_dir: Option<PathBuf>,
}

/// The default runtime directory, created (mode 0700) if missing.
pub fn runtime_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) if !x.is_empty() => PathBuf::from(x).join("sanpath"),
        // SAFETY: getuid has no preconditions.
        _ => std::env::temp_dir().join(format!("sanpath-{}", unsafe { libc::getuid() })),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(&dir)?;
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    if !m.is_dir() || m.uid() != me || m.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not a private directory of this user", dir.display()),
        ));
    }
    Ok(dir)
}

/// A registered region.
struct Region {
    addr: usize,
    len: usize,
    access: Access,
}

/// A bound remote key: its region and the connection it is bound to.
struct RemoteKey {
    lkey: u32,
    conn: Weak<Conn>,
}

/// Regions and remote keys. Lock order: `regions` → `rkeys` → a
/// connection's window.
struct Pd {
    regions: RwLock<HashMap<u32, Region>>,
    rkeys: Mutex<HashMap<u32, RemoteKey>>,
    /// Last key handed out (lkeys and rkeys alike; 0 is never one).
    last_key: AtomicU32,
    registrations: AtomicU64,
    /// Deregistrations since creation: a change invalidates every end's
    /// [`LkeyCache`](crate::fabric::lkey_cache::LkeyCache). Bumped under the
    /// `regions` write lock.
    epoch: AtomicU64,
}

impl Pd {
    fn new_key(&self) -> u32 {
        loop {
            let k = self
                .last_key
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if k != 0 {
                return k;
            }
        }
    }

    /// Whether every non-empty entry lies in a region allowing `need`,
    /// looked up in `cache` first (the caller holds the post lock the cache
    /// belongs to). The region need not stay registered after: a request
    /// is only executed (by the peer, later) while the engine keeps what it
    /// names registered (`Nic::deregister` contract).
    fn check(&self, cache: &mut LkeyCache, sges: &[Sge], need: Access) -> bool {
        cache.check(self.epoch.load(Ordering::Acquire), sges, need, |lkey| {
            let regions = self.regions.read().unwrap_or_else(PoisonError::into_inner);
            regions.get(&lkey).map(|r| CachedRegion {
                lkey,
                addr: r.addr,
                len: r.len,
                access: r.access,
            })
        })
    }

    /// Takes `rkey` out of its connection's window (waiting for a copy
    /// through it).
    fn revoke(rkey: u32, k: &RemoteKey) {
        if let Some(c) = k.conn.upgrade() {
            c.window.lock().retain(|w| w.rkey != rkey);
        }
    }
}

/// State of one NIC shared by its handle, its connections, its listeners
/// and its event thread.
struct NicInner {
    addresses: Vec<Ipv4Addr>,
    prefix_len: u8,
    connect_timeout: Duration,
    dir: PathBuf,
    pd: Pd,
    listeners: Mutex<HashMap<SocketAddrV4, Arc<cm::ListenerShared>>>,
    /// Live connection ends by queue-pair number.
    conns: Mutex<HashMap<u32, Weak<Conn>>>,
    last_qp: AtomicU32,
    cqs: Mutex<HashMap<u32, Weak<CqInner>>>,
    last_cq: AtomicU32,
    events: cm::Events,
}

impl NicInner {
    fn on_subnet(&self, ip: Ipv4Addr) -> bool {
        let mask = match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n.min(32))),
        };
        self.addresses
            .iter()
            .any(|a| u32::from(*a) & mask == u32::from(ip) & mask)
    }

    fn cq(&self, id: CqId) -> Option<Arc<CqInner>> {
        lock(&self.cqs).get(&id.0).and_then(Weak::upgrade)
    }

    fn new_qp_num(&self) -> QpNum {
        let conns = lock(&self.conns);
        loop {
            let n = self.last_qp.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if n != 0 && !conns.get(&n).is_some_and(|c| c.strong_count() > 0) {
                return QpNum(n);
            }
        }
    }

    fn listener_for(&self, addr: SocketAddrV4) -> Option<Arc<cm::ListenerShared>> {
        let ls = lock(&self.listeners);
        ls.get(&addr)
            .or_else(|| ls.get(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, addr.port())))
            .cloned()
    }

    fn unlisten(&self, l: &Arc<cm::ListenerShared>) {
        let mut ls = lock(&self.listeners);
        if ls.get(&l.addr).is_some_and(|x| Arc::ptr_eq(x, l)) {
            ls.remove(&l.addr);
        }
    }
}

/// A shared-memory NIC; dropping it stops its event thread (its queue pairs
/// get no more wake-ups nor news of a peer's death: drop them first) and
/// removes its address sockets.
pub struct ShmNic {
    inner: Arc<NicInner>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ShmNic {
    /// Creates the NIC: binds a socket per address in the runtime
    /// directory (`AddressInUse` if a live process holds one) and starts
    /// its event thread.
    pub fn new(cfg: ShmNicConfig) -> Result<ShmNic, FabricError> {
        if cfg.addresses.is_empty() {
            return Err(FabricError::Invalid("an shm NIC needs an address"));
        }
        if cfg.addresses.iter().any(|a| a.is_unspecified()) {
            return Err(FabricError::Invalid("0.0.0.0 is not a NIC address"));
        }
        if cfg.prefix_len > 32 {
            return Err(FabricError::Invalid("prefix length above 32"));
        }
        let unavailable = |e: std::io::Error| FabricError::Unavailable(format!("shm fabric: {e}"));
        let dir = match cfg.runtime_dir {
            Some(d) => d,
            None => runtime_dir().map_err(unavailable)?,
        };
        let events = cm::Events::new().map_err(unavailable)?;
        sys::allow_peer_access();
        let inner = Arc::new(NicInner {
            addresses: cfg.addresses.clone(),
            prefix_len: cfg.prefix_len,
            connect_timeout: cfg.connect_timeout,
            dir,
            pd: Pd {
                regions: RwLock::new(HashMap::new()),
                rkeys: Mutex::new(HashMap::new()),
                last_key: AtomicU32::new(0),
                registrations: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
            },
            listeners: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            last_qp: AtomicU32::new(0),
            cqs: Mutex::new(HashMap::new()),
            last_cq: AtomicU32::new(0),
            events,
        });
        let mut nic = ShmNic {
            inner: inner.clone(),
            thread: None,
        };
        let mut bound = Vec::new();
        for ip in &cfg.addresses {
            let path = cm::socket_path(&inner.dir, *ip);
            cm::remove_if_stale(&path);
            let fd = match sys::listen_at(&path) {
                Ok(fd) => fd,
                Err(e) => {
                    for p in bound {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(if e.raw_os_error() == Some(libc::EADDRINUSE) {
                        FabricError::AddressInUse
                    } else {
                        unavailable(e)
                    });
                }
            };
            bound.push(path);
            inner.events.add_address(fd).map_err(unavailable)?;
        }
        nic.thread = Some(cm::Events::start(&inner).map_err(unavailable)?);
        Ok(nic)
    }
}

impl ShmNic {
    fn remove_address_sockets(&self) {
        for ip in &self.inner.addresses {
            let _ = std::fs::remove_file(cm::socket_path(&self.inner.dir, *ip));
        }
    }
}

impl Drop for ShmNic {
    fn drop(&mut self) {
        self.remove_address_sockets();
        self.inner.events.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Nic for ShmNic {
    fn addresses(&self) -> Vec<Ipv4Addr> {
        self.inner.addresses.clone()
    }

    fn process_exiting(&self) {
        self.remove_address_sockets();
    }

    fn create_cq(
        &self,
        depth: u32,
        waker: Arc<dyn Waker>,
    ) -> Result<Arc<dyn CompletionQueue>, FabricError> {
        let mut cqs = lock(&self.inner.cqs);
        cqs.retain(|_, cq| cq.strong_count() > 0);
        let id = loop {
            let n = self
                .inner
                .last_cq
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if !cqs.contains_key(&n) {
                break n;
            }
        };
        let capacity = match depth {
            0 => usize::MAX,
            d => d as usize,
        };
        let cq = ShmCq::new(CqId(id), capacity, waker);
        cqs.insert(id, Arc::downgrade(&cq.0));
        Ok(Arc::new(cq))
    }

    /// Fails `Invalid` for a null address, a zero length or a range that
    /// wraps around.
    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<MrKeys, FabricError> {
        if addr == 0 || len == 0 || addr.checked_add(len).is_none() {
            return Err(FabricError::Invalid("empty range, null address or wrap"));
        }
        let pd = &self.inner.pd;
        let lkey = pd.new_key();
        pd.regions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(lkey, Region { addr, len, access });
        pd.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(MrKeys { lkey })
    }

    fn deregister(&self, lkey: u32) {
        let pd = &self.inner.pd;
        let mut regions = pd.regions.write().unwrap_or_else(PoisonError::into_inner);
        if regions.remove(&lkey).is_some() {
            pd.epoch.fetch_add(1, Ordering::AcqRel);
            let mut rkeys = lock(&pd.rkeys);
            rkeys.retain(|rkey, k| {
                let mine = k.lkey == lkey;
                if mine {
                    Pd::revoke(*rkey, k);
                }
                !mine
            });
        }
    }

    fn bind_remote(&self, lkey: u32, qp: QpNum, access: Access) -> Result<u32, FabricError> {
        let remote = Access::REMOTE_READ | Access::REMOTE_WRITE;
        if access == Access::NONE || !remote.contains(access) {
            return Err(FabricError::Invalid(
                "remote access must be REMOTE_READ and/or REMOTE_WRITE",
            ));
        }
        let conn = lock(&self.inner.conns)
            .get(&qp.0)
            .and_then(Weak::upgrade)
            .ok_or(FabricError::Invalid("no such queue pair"))?;
        let pd = &self.inner.pd;
        let regions = pd.regions.read().unwrap_or_else(PoisonError::into_inner);
        let r = regions
            .get(&lkey)
            .ok_or(FabricError::Invalid("no such region"))?;
        if !r.access.contains(access) {
            return Err(FabricError::Invalid(
                "the region does not allow that access",
            ));
        }
        if access.contains(Access::REMOTE_WRITE) && !r.access.contains(Access::LOCAL_WRITE) {
            return Err(FabricError::Invalid("remote write needs local write"));
        }
        let rkey = pd.new_key();
        lock(&pd.rkeys).insert(
            rkey,
            RemoteKey {
                lkey,
                conn: Arc::downgrade(&conn),
            },
        );
        conn.window.lock().push(conn::WindowKey {
            rkey,
            addr: r.addr,
            len: r.len,
            access,
        });
        Ok(rkey)
    }

    fn unbind_remote(&self, rkey: u32) {
        let pd = &self.inner.pd;
        let _regions = pd.regions.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = lock(&pd.rkeys).remove(&rkey) {
            Pd::revoke(rkey, &k);
        }
    }

    fn listen(
        &self,
        addr: SocketAddrV4,
        backlog: u32,
        events: Arc<dyn ListenerEvents>,
    ) -> Result<Arc<dyn Listener>, FabricError> {
        let ip = *addr.ip();
        if !ip.is_unspecified() && !self.inner.addresses.contains(&ip) {
            return Err(FabricError::AddressNotAvailable);
        }
        let mut ls = lock(&self.inner.listeners);
        if crate::fabric::listen_clash(&ls, addr) {
            return Err(FabricError::AddressInUse);
        }
        let l = Arc::new(cm::ListenerShared {
            nic: Arc::downgrade(&self.inner),
            addr,
            backlog: backlog.max(1) as usize,
            queue: Mutex::new(cm::Backlog {
                reqs: Default::default(),
                closed: false,
            }),
            events,
        });
        ls.insert(addr, l.clone());
        Ok(Arc::new(cm::ShmListener(l)))
    }

    fn connect(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        self.inner.connect(local, remote, params, &[], done)
    }

    fn connect_with_data(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        private_data: &[u8],
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        self.inner
            .connect(local, remote, params, private_data, done)
    }

    fn stats(&self) -> NicStats {
        let pd = &self.inner.pd;
        let live_qps = lock(&self.inner.conns)
            .values()
            .filter(|c| c.strong_count() > 0)
            .count();
        NicStats {
            registrations: pd.registrations.load(Ordering::Relaxed),
            live_regions: pd
                .regions
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len() as u64,
            live_remote_keys: lock(&pd.rkeys)
                .values()
                .filter(|k| k.conn.strong_count() > 0)
                .count() as u64,
            live_qps: live_qps as u64,
        }
    }
}

/// The queue pair handed out: one connection end.
struct ShmQp(Arc<Conn>);

impl QueuePair for ShmQp {
    fn num(&self) -> QpNum {
        self.0.num
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.0.local
    }

    fn peer_addr(&self) -> SocketAddrV4 {
        self.0.peer
    }

    fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError> {
        self.0.post_send(wr)
    }

    fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError> {
        self.0.post_recv(wr)
    }

    fn set_error(&self) {
        self.0.break_conn(seg::STATE_CLOSED, false);
    }

    /// Breaking the connection is the seal already: it waits until no copy
    /// of the peer's into or out of our memory runs (the peer's `busy` word),
    /// and the peer starts none once it sees the broken state; our own
    /// copies run only on a connection that is not broken. The one gap is
    /// a peer that stays busy past `SEAL_WAIT` without dying (stopped, not
    /// killed): the seal gives up on it after that bound.
    fn abandon(&self) {
        self.set_error();
    }
}

impl Drop for ShmQp {
    fn drop(&mut self) {
        self.set_error();
        let c = &self.0;
        let nic = &c.nic;
        lock(&nic.conns).remove(&c.num.0);
        lock(&nic.pd.rkeys).retain(|_, k| !std::ptr::eq(k.conn.as_ptr(), Arc::as_ptr(c)));
        nic.events.forget(&lock(&c.tokens));
        c.cq.budget.release(c.reserved);
        c.dropped.store(true, Ordering::Release);
        c.cq.end_dropped();
        c.cq.wake();
    }
}

fn opcode_of(op: &SendOp) -> WcOpcode {
    match op {
        SendOp::Send => WcOpcode::Send,
        SendOp::RdmaWrite { .. } => WcOpcode::RdmaWrite,
        SendOp::RdmaRead { .. } => WcOpcode::RdmaRead,
    }
}

fn status_from(v: u8) -> WcStatus {
    WcStatus::from_u8(v).unwrap_or(WcStatus::RemoteInvalidRequest)
}

/// Copies the bytes of `src` into `dst`, in order, until either ends.
///
/// # Safety
/// Every range of both lists is valid memory for the call, and nothing
/// else accesses the destination ranges meanwhile.
unsafe fn copy_local(src: &[Sge], dst: &[Sge]) {
    let (mut si, mut di, mut so, mut doff) = (0, 0, 0usize, 0usize);
    while si < src.len() && di < dst.len() {
        let (s, d) = (src[si], dst[di]);
        let n = (s.len as usize - so).min(d.len as usize - doff);
        // SAFETY: both ranges lie inside their entries (caller).
        unsafe { std::ptr::copy((s.addr + so) as *const u8, (d.addr + doff) as *mut u8, n) };
        so += n;
        doff += n;
        if so == s.len as usize {
            si += 1;
            so = 0;
        }
        if doff == d.len as usize {
            di += 1;
            doff = 0;
        }
    }
}
