//! `soft`: a software RDMA NIC between threads of one process.
//!
//! Not a mock: it keeps the verbs model. Memory regions are registered with
//! access rights and named by keys (a slot index plus a generation, so a
//! stale key never names a newer region); remote keys are bound to one queue
//! pair, like type-2 memory windows. A connection is a `Link` holding both
//! directions under one mutex: a work request executes in the posting thread
//! at post time — the posting CPU is the DMA engine and makes the one copy a
//! NIC would make, between registered regions, after checking every entry
//! against the region tables. Completions go to bounded lock-free CQs whose
//! capacity is reserved per queue pair, so they never overflow.
//!
//! RC semantics: in order, reliable, message-preserving; a send that finds
//! no posted receive waits in the receiver's RNR queue (receiver-not-ready
//! retry) until one is posted, up to `rnr_queue_max` sends; beyond that the
//! send fails `RnrRetryExceeded` and the connection breaks. Any error breaks
//! the connection: the failing side's other requests flush, the peer's
//! complete `RemoteDisconnected`, both are told once. `set_error` (local
//! close) flushes everything of the closing side and disconnects the peer.
//!
//! Addresses: a `SoftNetwork` is the wire shared by NICs of one process, with
//! IPv4 addresses and SAN subnets; hosts reachable only over TCP/IP can be
//! declared, so connection failures have their real causes (no listener,
//! refused, host unreachable, timed out).
//!
//! Lock order: network → NIC listeners → listener queue → request; link
//! state → region table → remote-key table → CQ reservation. A remote
//! access runs with the peer's region and key tables read-locked, so a
//! revocation never overlaps an access that passed its check. Events are delivered with
//! no lock held; wakers run under the link lock and only unpark or notify.
use crate::fabric::*;
use crossbeam_queue::ArrayQueue;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

const MAX_SGE: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Settings of one soft NIC.
pub struct SoftNicConfig {
    pub addresses: Vec<Ipv4Addr>,
    pub prefix_len: u8,
    pub connect_timeout: Duration,
    pub rnr_queue_max: u32,
}

/// The wire: NICs and hosts of one process.
pub struct SoftNetwork {
    state: Mutex<NetState>,
}

#[derive(Default)]
struct NetState {
    /// Attached NICs; a dropped NIC's addresses become free.
    nics: Vec<Weak<NicInner>>,
    /// Hosts that answer only over TCP/IP (connects time out, CONN-6).
    tcp_only: HashSet<Ipv4Addr>,
}

/// The process-wide network `Provider::new` attaches to.
pub fn default_network() -> Arc<SoftNetwork> {
    static NET: OnceLock<Arc<SoftNetwork>> = OnceLock::new();
    NET.get_or_init(SoftNetwork::new).clone()
}

impl SoftNetwork {
    pub fn new() -> Arc<SoftNetwork> {
        Arc::new(SoftNetwork {
            state: Mutex::new(NetState::default()),
        })
    }

    pub fn attach(self: &Arc<Self>, cfg: SoftNicConfig) -> Result<Arc<SoftNic>, FabricError> {
        if cfg.addresses.is_empty() {
            return Err(FabricError::Invalid("a soft NIC needs an address"));
        }
        let mut st = lock(&self.state);
        st.nics.retain(|n| n.strong_count() > 0);
        for n in st.nics.iter().filter_map(Weak::upgrade) {
            if n.addresses.iter().any(|a| cfg.addresses.contains(a)) {
                return Err(FabricError::AddressInUse);
            }
        }
        let inner = Arc::new(NicInner {
            network: self.clone(),
            addresses: cfg.addresses,
            prefix_len: cfg.prefix_len,
            connect_timeout: cfg.connect_timeout,
            rnr_max: cfg.rnr_queue_max as usize,
            mrs: RwLock::new(Slab::default()),
            rkeys: RwLock::new(Slab::default()),
            listeners: Mutex::new(HashMap::new()),
            qps: Mutex::new(HashSet::new()),
            cqs: Mutex::new(HashMap::new()),
            next_qp: AtomicU32::new(1),
            next_cq: AtomicU32::new(1),
            registrations: AtomicU64::new(0),
        });
        st.nics.push(Arc::downgrade(&inner));
        Ok(Arc::new(SoftNic { inner }))
    }

    pub fn add_tcp_only_host(&self, ip: Ipv4Addr) {
        lock(&self.state).tcp_only.insert(ip);
    }

    fn resolve(&self, ip: Ipv4Addr) -> Resolve {
        let st = lock(&self.state);
        let nics: Vec<Arc<NicInner>> = st.nics.iter().filter_map(Weak::upgrade).collect();
        if let Some(n) = nics.iter().find(|n| n.addresses.contains(&ip)) {
            return Resolve::San(n.clone());
        }
        if st.tcp_only.contains(&ip) {
            return Resolve::TcpOnly;
        }
        let on_subnet = nics.iter().any(|n| {
            let mask = prefix_mask(n.prefix_len);
            n.addresses
                .iter()
                .any(|a| u32::from(*a) & mask == u32::from(ip) & mask)
        });
        if on_subnet {
            Resolve::Nobody
        } else {
            Resolve::OffNet
        }
    }
}

fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

enum Resolve {
    San(Arc<NicInner>),
    TcpOnly,
    Nobody,
    OffNet,
}

// ---------------------------------------------------------------------------
// Keys: 20-bit slot index + 12-bit generation; a stale key never names a newer
// entry of the same slot (until 4096 reuses).
// ---------------------------------------------------------------------------

struct Slab<T> {
    slots: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

const KEY_INDEX_BITS: u32 = 20;

impl<T> Slab<T> {
    fn insert(&mut self, v: T) -> Option<u32> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() >= (1 << KEY_INDEX_BITS) {
                    return None;
                }
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.0 = (slot.0 + 1) & 0xFFF;
        slot.1 = Some(v);
        Some((slot.0 << KEY_INDEX_BITS) | index)
    }

    fn get(&self, key: u32) -> Option<&T> {
        let (index, gen) = (key & ((1 << KEY_INDEX_BITS) - 1), key >> KEY_INDEX_BITS);
        let slot = self.slots.get(index as usize)?;
        (slot.0 == gen).then_some(())?;
        slot.1.as_ref()
    }

    fn remove(&mut self, key: u32) -> Option<T> {
        let (index, gen) = (key & ((1 << KEY_INDEX_BITS) - 1), key >> KEY_INDEX_BITS);
        let slot = self.slots.get_mut(index as usize)?;
        if slot.0 != gen {
            return None;
        }
        let v = slot.1.take()?;
        self.free.push(index);
        Some(v)
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

struct Mr {
    addr: usize,
    len: usize,
    access: Access,
    rkeys: Vec<u32>,
}

struct RKey {
    lkey: u32,
    qp: QpNum,
    access: Access,
}

struct NicInner {
    /// The wire this NIC is attached to (kept alive by its NICs).
    network: Arc<SoftNetwork>,
    addresses: Vec<Ipv4Addr>,
    prefix_len: u8,
    connect_timeout: Duration,
    rnr_max: usize,
    /// Registered regions by lkey.
    mrs: RwLock<Slab<Mr>>,
    /// Remote keys by rkey.
    rkeys: RwLock<Slab<RKey>>,
    /// Listeners by port: exact addresses and the wildcard.
    listeners: Mutex<HashMap<SocketAddrV4, Arc<ListenerInner>>>,
    /// Numbers of live queue pairs.
    qps: Mutex<HashSet<u32>>,
    /// CQs of this NIC by id.
    cqs: Mutex<HashMap<u32, Weak<SoftCq>>>,
    next_qp: AtomicU32,
    next_cq: AtomicU32,
    registrations: AtomicU64,
}

impl NicInner {
    /// Checks local entries: registered here, in range, with `need`.
    fn check_local(&self, sges: &[Sge], need: Access) -> bool {
        let mrs = self.mrs.read().unwrap_or_else(PoisonError::into_inner);
        sges.iter().all(|s| {
            s.len == 0
                || mrs.get(s.lkey).is_some_and(|mr| {
                    mr.access.contains(need)
                        && s.addr >= mr.addr
                        && s.addr
                            .checked_add(s.len as usize)
                            .is_some_and(|e| e <= mr.addr + mr.len)
                })
        })
    }

    /// The address range a remote access may touch, if the key allows it.
    /// Runs `access(remote address)` if `rkey` lets the peer `qp` touch
    /// `[addr, addr+len)` with `need`, holding the region and key tables
    /// (read) throughout, so that a concurrent deregistration or revocation
    /// either happens before the check or waits until the copy is done: once
    /// `unbind_remote`/`deregister` returned, no access through the key
    /// happens (MEM-6, CLOSE-10). Returns whether it ran.
    fn with_remote(
        &self,
        rkey: u32,
        qp: QpNum,
        addr: u64,
        len: usize,
        need: Access,
        access: impl FnOnce(usize),
    ) -> bool {
        // Lock order: regions, then remote keys (as everywhere).
        let mrs = self.mrs.read().unwrap_or_else(PoisonError::into_inner);
        let rkeys = self.rkeys.read().unwrap_or_else(PoisonError::into_inner);
        let Some(rk) = rkeys.get(rkey) else {
            return false;
        };
        if rk.qp != qp || !rk.access.contains(need) {
            return false;
        }
        let Some(mr) = mrs.get(rk.lkey) else {
            return false;
        };
        let Ok(a) = usize::try_from(addr) else {
            return false;
        };
        let inside = a >= mr.addr && a.checked_add(len).is_some_and(|e| e <= mr.addr + mr.len);
        if inside {
            access(a);
        }
        inside
    }

    fn listener_for(&self, addr: SocketAddrV4) -> Option<Arc<ListenerInner>> {
        let l = lock(&self.listeners);
        l.get(&addr)
            .or_else(|| l.get(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, addr.port())))
            .cloned()
    }
}

/// The soft NIC.
pub struct SoftNic {
    inner: Arc<NicInner>,
}

// ---------------------------------------------------------------------------
// Completion queues
// ---------------------------------------------------------------------------

struct SoftCq {
    id: CqId,
    queue: ArrayQueue<WorkCompletion>,
    armed: AtomicBool,
    waker: Arc<dyn Waker>,
    /// Completions reserved by the queue pairs attached to this CQ.
    reserved: Mutex<u64>,
}

impl SoftCq {
    fn push(&self, wc: WorkCompletion) {
        // Reservations make overflow impossible.
        let pushed = self.queue.push(wc).is_ok();
        debug_assert!(pushed, "CQ overflow despite reservations");
        if self.armed.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }
}

impl CompletionQueue for SoftCq {
    fn id(&self) -> CqId {
        self.id
    }

    fn poll(&self, out: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            match self.queue.pop() {
                Some(wc) => {
                    out[n] = wc;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    fn arm(&self) -> bool {
        self.armed.store(true, Ordering::SeqCst);
        !self.queue.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Queue pairs: a link per connection holding both directions under one lock.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Sgl {
    n: u8,
    sges: [Sge; MAX_SGE],
}

impl Sgl {
    fn new(sges: &[Sge]) -> Sgl {
        let mut s = Sgl {
            n: sges.len() as u8,
            sges: [Sge {
                addr: 0,
                len: 0,
                lkey: 0,
            }; MAX_SGE],
        };
        s.sges[..sges.len()].copy_from_slice(sges);
        s
    }
    fn as_slice(&self) -> &[Sge] {
        &self.sges[..self.n as usize]
    }
    fn total(&self) -> usize {
        self.as_slice().iter().map(|s| s.len as usize).sum()
    }
}

struct Posted {
    wr_id: WrId,
    sgl: Sgl,
}

struct Side {
    /// Receives posted by this side, in order.
    recvs: VecDeque<Posted>,
    /// Sends of the *other* side waiting for a receive here.
    parked: VecDeque<Posted>,
    /// Status of later posts once in error.
    error: Option<WcStatus>,
    send_depth: usize,
    recv_depth: usize,
    max_sge: usize,
}

struct LinkState {
    sides: [Side; 2],
    /// The connection broke (or was closed): no more data moves.
    broken: bool,
}

/// One connection: side 0 is the connector, side 1 the acceptor.
struct Link {
    /// Both directions; every post takes it, so completions of one queue
    /// pair reach its CQ in execution order.
    state: Mutex<LinkState>,
    cqs: [Arc<SoftCq>; 2],
    nics: [Arc<NicInner>; 2],
    nums: [QpNum; 2],
    events: [Arc<dyn QpEvents>; 2],
    /// Whether side i was told `disconnected` (exactly once).
    told: [AtomicBool; 2],
    rnr_max: usize,
}

struct SoftQp {
    link: Arc<Link>,
    side: usize,
    local: SocketAddrV4,
    peer: SocketAddrV4,
}

fn wc(wr_id: WrId, status: WcStatus, opcode: WcOpcode, byte_len: u32) -> WorkCompletion {
    WorkCompletion {
        wr_id,
        status,
        opcode,
        byte_len,
    }
}

/// Copies a gather list into a scatter list (lengths already checked).
///
/// # Safety
/// Every entry names registered, valid memory (checked against the region
/// tables by the caller, and kept valid by `Nic::register`'s contract).
unsafe fn copy_sgl(src: &[Sge], dst: &[Sge]) {
    let (mut si, mut so, mut di, mut doff) = (0, 0usize, 0, 0usize);
    while si < src.len() && di < dst.len() {
        let s = &src[si];
        let d = &dst[di];
        let n = (s.len as usize - so).min(d.len as usize - doff);
        if n > 0 {
            // SAFETY: both ranges lie inside registered regions (caller);
            // distinct registrations may overlap only if the switch made them
            // overlap, which `copy` (memmove) tolerates.
            unsafe { std::ptr::copy((s.addr + so) as *const u8, (d.addr + doff) as *mut u8, n) };
        }
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

/// Copies between a local list and a flat remote range.
///
/// # Safety
/// As `copy_sgl`; the remote range was checked against its region.
unsafe fn copy_flat(sgl: &[Sge], remote: usize, to_remote: bool) {
    let mut off = 0;
    for s in sgl {
        let (a, b) = (s.addr as *mut u8, (remote + off) as *mut u8);
        // SAFETY: both ranges are registered and checked (caller).
        unsafe {
            if to_remote {
                std::ptr::copy(a, b, s.len as usize);
            } else {
                std::ptr::copy(b, a, s.len as usize);
            }
        }
        off += s.len as usize;
    }
}

impl Link {
    fn st(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }

    /// Breaks the connection: `side` failed (its later posts get `own`), the
    /// other side sees the remote go away. Returns which sides to tell.
    fn break_link(&self, st: &mut LinkState, side: usize, own: WcStatus) -> [bool; 2] {
        let other = 1 - side;
        if st.sides[side].error.is_none() {
            st.sides[side].error = Some(own);
        }
        if st.sides[other].error.is_none() {
            st.sides[other].error = Some(WcStatus::RemoteDisconnected);
        }
        let was_broken = st.broken;
        st.broken = true;
        for s in 0..2 {
            let status = if s == side {
                WcStatus::Flushed
            } else {
                WcStatus::RemoteDisconnected
            };
            while let Some(p) = st.sides[s].recvs.pop_front() {
                self.cqs[s].push(wc(p.wr_id, status, WcOpcode::Recv, 0));
            }
            // Sends of side s parked at the other side.
            while let Some(p) = st.sides[1 - s].parked.pop_front() {
                self.cqs[s].push(wc(p.wr_id, status, WcOpcode::Send, 0));
            }
        }
        if was_broken {
            [false, false]
        } else {
            [true, true]
        }
    }

    fn tell(&self, which: [bool; 2]) {
        for (s, t) in which.iter().enumerate() {
            if *t && !self.told[s].swap(true, Ordering::SeqCst) {
                self.events[s].disconnected();
            }
        }
    }

    /// Delivers a send from `from` into a receive of the other side.
    fn deliver(&self, st: &mut LinkState, from: usize, send: &Posted, recv: Posted) -> [bool; 2] {
        let to = 1 - from;
        let len = send.sgl.total();
        if len > recv.sgl.total() {
            self.cqs[to].push(wc(
                recv.wr_id,
                WcStatus::LocalLengthError,
                WcOpcode::Recv,
                0,
            ));
            self.cqs[from].push(wc(
                send.wr_id,
                WcStatus::RemoteInvalidRequest,
                WcOpcode::Send,
                0,
            ));
            let t = self.break_link(st, to, WcStatus::Flushed);
            return t;
        }
        // SAFETY: both lists were checked against their NICs' region tables
        // when posted, and registrations stay valid while a WR names them.
        unsafe { copy_sgl(send.sgl.as_slice(), recv.sgl.as_slice()) };
        self.cqs[to].push(wc(
            recv.wr_id,
            WcStatus::Success,
            WcOpcode::Recv,
            len as u32,
        ));
        self.cqs[from].push(wc(
            send.wr_id,
            WcStatus::Success,
            WcOpcode::Send,
            len as u32,
        ));
        [false, false]
    }
}

impl QueuePair for SoftQp {
    fn num(&self) -> QpNum {
        self.link.nums[self.side]
    }
    fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }
    fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError> {
        let (me, other) = (self.side, 1 - self.side);
        let link = &self.link;
        let mut st = link.st();
        if wr.sges.len() > st.sides[me].max_sge {
            return Err(PostError::TooManySge);
        }
        let opcode = match wr.op {
            SendOp::Send => WcOpcode::Send,
            SendOp::RdmaWrite { .. } => WcOpcode::RdmaWrite,
            SendOp::RdmaRead { .. } => WcOpcode::RdmaRead,
        };
        if let Some(status) = st.sides[me].error {
            link.cqs[me].push(wc(wr.wr_id, status, opcode, 0));
            return Ok(());
        }
        let need = if matches!(wr.op, SendOp::RdmaRead { .. }) {
            Access::LOCAL_WRITE
        } else {
            Access::NONE
        };
        if !link.nics[me].check_local(wr.sges, need) {
            link.cqs[me].push(wc(wr.wr_id, WcStatus::LocalProtectionError, opcode, 0));
            let t = link.break_link(&mut st, me, WcStatus::Flushed);
            drop(st);
            link.tell(t);
            return Ok(());
        }
        let posted = Posted {
            wr_id: wr.wr_id,
            sgl: Sgl::new(wr.sges),
        };
        let tell = match wr.op {
            SendOp::Send => {
                if let Some(recv) = st.sides[other].recvs.pop_front() {
                    link.deliver(&mut st, me, &posted, recv)
                } else if st.sides[other].parked.len() >= link.rnr_max {
                    link.cqs[me].push(wc(wr.wr_id, WcStatus::RnrRetryExceeded, opcode, 0));
                    link.break_link(&mut st, me, WcStatus::Flushed)
                } else if st.sides[other].parked.len() >= st.sides[me].send_depth {
                    return Err(PostError::QueueFull);
                } else {
                    st.sides[other].parked.push_back(posted);
                    [false, false]
                }
            }
            SendOp::RdmaWrite { remote_addr, rkey } | SendOp::RdmaRead { remote_addr, rkey } => {
                let write = matches!(wr.op, SendOp::RdmaWrite { .. });
                let len = posted.sgl.total();
                let need = if write {
                    Access::REMOTE_WRITE
                } else {
                    Access::REMOTE_READ
                };
                let done = link.nics[other].with_remote(
                    rkey,
                    link.nums[other],
                    remote_addr,
                    len,
                    need,
                    |remote| {
                        // SAFETY: the local entries were checked against our
                        // region table above (and stay registered while the
                        // request is posted); the remote range was checked
                        // against the peer's tables, which stay read-locked
                        // during this copy.
                        unsafe { copy_flat(posted.sgl.as_slice(), remote, write) }
                    },
                );
                if done {
                    link.cqs[me].push(wc(wr.wr_id, WcStatus::Success, opcode, len as u32));
                    [false, false]
                } else {
                    link.cqs[me].push(wc(wr.wr_id, WcStatus::RemoteAccessError, opcode, 0));
                    link.break_link(&mut st, me, WcStatus::Flushed)
                }
            }
        };
        drop(st);
        link.tell(tell);
        Ok(())
    }

    fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError> {
        let (me, other) = (self.side, 1 - self.side);
        let link = &self.link;
        let mut st = link.st();
        if wr.sges.len() > st.sides[me].max_sge {
            return Err(PostError::TooManySge);
        }
        if let Some(status) = st.sides[me].error {
            link.cqs[me].push(wc(wr.wr_id, status, WcOpcode::Recv, 0));
            return Ok(());
        }
        if !link.nics[me].check_local(wr.sges, Access::LOCAL_WRITE) {
            link.cqs[me].push(wc(
                wr.wr_id,
                WcStatus::LocalProtectionError,
                WcOpcode::Recv,
                0,
            ));
            let t = link.break_link(&mut st, me, WcStatus::Flushed);
            drop(st);
            link.tell(t);
            return Ok(());
        }
        let posted = Posted {
            wr_id: wr.wr_id,
            sgl: Sgl::new(wr.sges),
        };
        let tell = if let Some(send) = st.sides[me].parked.pop_front() {
            link.deliver(&mut st, other, &send, posted)
        } else if st.sides[me].recvs.len() >= st.sides[me].recv_depth {
            return Err(PostError::QueueFull);
        } else {
            st.sides[me].recvs.push_back(posted);
            [false, false]
        };
        drop(st);
        link.tell(tell);
        Ok(())
    }

    fn set_error(&self) {
        let mut st = self.link.st();
        let t = self.link.break_link(&mut st, self.side, WcStatus::Flushed);
        st.sides[self.side].error = Some(WcStatus::Flushed);
        drop(st);
        // The closing side is not told about its own close.
        self.link
            .tell([self.side == 1 && t[0], self.side == 0 && t[1]]);
    }
}

impl Drop for SoftQp {
    fn drop(&mut self) {
        self.set_error();
        let nic = &self.link.nics[self.side];
        lock(&nic.qps).remove(&self.link.nums[self.side].0);
        let d = {
            let st = self.link.st();
            let side = &st.sides[self.side];
            (side.send_depth + side.recv_depth) as u64
        };
        let mut r = lock(&self.link.cqs[self.side].reserved);
        *r = r.saturating_sub(d);
    }
}

// ---------------------------------------------------------------------------
// Connection management
// ---------------------------------------------------------------------------

enum ReqState {
    Pending,
    Done,
}

struct Request {
    id: u64,
    state: Mutex<ReqState>,
    connector: Arc<NicInner>,
    from: SocketAddrV4,
    to: SocketAddrV4,
    params: Mutex<Option<QpParams>>,
    done: Mutex<Option<ConnectDone>>,
    listener: Weak<ListenerInner>,
}

struct ListenerInner {
    nic: Weak<NicInner>,
    addr: SocketAddrV4,
    backlog: usize,
    queue: Mutex<VecDeque<Arc<Request>>>,
    events: Arc<dyn ListenerEvents>,
    closed: AtomicBool,
}

impl ListenerInner {
    fn remove(&self, id: u64) {
        lock(&self.queue).retain(|r| r.id != id);
    }
}

struct SoftListener(Arc<ListenerInner>);

impl Listener for SoftListener {
    fn peek(&self) -> Option<Arc<dyn ConnRequest>> {
        lock(&self.0.queue)
            .front()
            .map(|r| Arc::new(ReqHandle(r.clone())) as Arc<dyn ConnRequest>)
    }
    fn pending(&self) -> usize {
        lock(&self.0.queue).len()
    }
    fn close(&self) {
        if self.0.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(nic) = self.0.nic.upgrade() {
            let mut l = lock(&nic.listeners);
            if l.get(&self.0.addr).is_some_and(|x| Arc::ptr_eq(x, &self.0)) {
                l.remove(&self.0.addr);
            }
        }
        let reqs: Vec<_> = lock(&self.0.queue).drain(..).collect();
        for r in reqs {
            ReqHandle(r).reject();
        }
    }
}

impl Drop for SoftListener {
    fn drop(&mut self) {
        self.close();
    }
}

struct ReqHandle(Arc<Request>);

impl ReqHandle {
    /// Pending → done; false if someone else finished it.
    fn finish(&self) -> bool {
        let mut s = lock(&self.0.state);
        match *s {
            ReqState::Pending => {
                *s = ReqState::Done;
                true
            }
            ReqState::Done => false,
        }
    }
}

static NEXT_REQ: AtomicU64 = AtomicU64::new(1);

impl ConnRequest for ReqHandle {
    fn peer_addr(&self) -> SocketAddrV4 {
        self.0.from
    }
    fn local_addr(&self) -> SocketAddrV4 {
        self.0.to
    }

    fn accept(&self, params: QpParams) -> Result<Arc<dyn QueuePair>, ConnectError> {
        let r = &self.0;
        let Some(l) = r.listener.upgrade() else {
            return Err(ConnectError::Cancelled);
        };
        let Some(nic) = l.nic.upgrade() else {
            return Err(ConnectError::Cancelled);
        };
        if !self.finish() {
            l.remove(r.id);
            return Err(ConnectError::Cancelled);
        }
        l.remove(r.id);
        let cparams = lock(&r.params)
            .take()
            .expect("pending request keeps its params");
        let done = lock(&r.done).take();
        match make_link(&r.connector, cparams, &nic, params, r.from, r.to) {
            Ok((cqp, aqp)) => {
                if let Some(d) = done {
                    d(Ok(cqp));
                }
                Ok(aqp)
            }
            Err(e) => {
                if let Some(d) = done {
                    d(Err(e));
                }
                Err(e)
            }
        }
    }

    fn reject(&self) {
        let r = &self.0;
        if let Some(l) = r.listener.upgrade() {
            l.remove(r.id);
        }
        if self.finish() {
            if let Some(d) = lock(&r.done).take() {
                d(Err(ConnectError::Refused));
            }
        }
    }
}

struct RequestAttempt(Arc<Request>);

impl ConnectAttempt for RequestAttempt {
    fn cancel(&self) -> bool {
        if !ReqHandle(self.0.clone()).finish() {
            return false;
        }
        if let Some(l) = self.0.listener.upgrade() {
            l.remove(self.0.id);
        }
        lock(&self.0.done).take();
        true
    }
}

struct TimerAttempt {
    state: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl ConnectAttempt for TimerAttempt {
    fn cancel(&self) -> bool {
        let mut fired = lock(&self.state.0);
        if *fired {
            return false;
        }
        *fired = true;
        self.state.1.notify_all();
        true
    }
}

fn reserve(cq: &SoftCq, n: u64, depth: u64) -> bool {
    let mut r = lock(&cq.reserved);
    if *r + n > depth {
        return false;
    }
    *r += n;
    true
}

/// The connector's and the acceptor's queue pairs of a new connection.
type QpPair = (Arc<dyn QueuePair>, Arc<dyn QueuePair>);

fn make_link(
    cnic: &Arc<NicInner>,
    cparams: QpParams,
    anic: &Arc<NicInner>,
    aparams: QpParams,
    from: SocketAddrV4,
    to: SocketAddrV4,
) -> Result<QpPair, ConnectError> {
    let ccq = cnic.cq(cparams.cq).ok_or(ConnectError::NoResources)?;
    let acq = anic.cq(aparams.cq).ok_or(ConnectError::NoResources)?;
    let cn = u64::from(cparams.send_depth) + u64::from(cparams.recv_depth);
    let an = u64::from(aparams.send_depth) + u64::from(aparams.recv_depth);
    if !reserve(&ccq, cn, ccq.queue.capacity() as u64) {
        return Err(ConnectError::NoResources);
    }
    if !reserve(&acq, an, acq.queue.capacity() as u64) {
        *lock(&ccq.reserved) -= cn;
        return Err(ConnectError::NoResources);
    }
    let side = |p: &QpParams| Side {
        recvs: VecDeque::with_capacity(p.recv_depth as usize),
        parked: VecDeque::with_capacity(cnic.rnr_max.max(anic.rnr_max) + 1),
        error: None,
        send_depth: p.send_depth as usize,
        recv_depth: p.recv_depth as usize,
        max_sge: (p.max_sge as usize).min(MAX_SGE),
    };
    let nums = [
        QpNum(cnic.next_qp.fetch_add(1, Ordering::Relaxed)),
        QpNum(anic.next_qp.fetch_add(1, Ordering::Relaxed)),
    ];
    lock(&cnic.qps).insert(nums[0].0);
    lock(&anic.qps).insert(nums[1].0);
    let link = Arc::new(Link {
        state: Mutex::new(LinkState {
            sides: [side(&cparams), side(&aparams)],
            broken: false,
        }),
        cqs: [ccq, acq],
        nics: [cnic.clone(), anic.clone()],
        nums,
        events: [cparams.events.clone(), aparams.events.clone()],
        told: [AtomicBool::new(false), AtomicBool::new(false)],
        rnr_max: anic.rnr_max.min(cnic.rnr_max),
    });
    let c: Arc<dyn QueuePair> = Arc::new(SoftQp {
        link: link.clone(),
        side: 0,
        local: from,
        peer: to,
    });
    let a: Arc<dyn QueuePair> = Arc::new(SoftQp {
        link,
        side: 1,
        local: to,
        peer: from,
    });
    Ok((c, a))
}

impl NicInner {
    fn cq(&self, id: CqId) -> Option<Arc<SoftCq>> {
        lock(&self.cqs).get(&id.0).and_then(Weak::upgrade)
    }
}

impl Nic for SoftNic {
    fn addresses(&self) -> Vec<Ipv4Addr> {
        self.inner.addresses.clone()
    }

    fn create_cq(
        &self,
        depth: u32,
        waker: Arc<dyn Waker>,
    ) -> Result<Arc<dyn CompletionQueue>, FabricError> {
        if depth == 0 {
            return Err(FabricError::Invalid("CQ depth 0"));
        }
        let cq = Arc::new(SoftCq {
            id: CqId(self.inner.next_cq.fetch_add(1, Ordering::Relaxed)),
            queue: ArrayQueue::new(depth as usize),
            armed: AtomicBool::new(false),
            waker,
            reserved: Mutex::new(0),
        });
        let mut cqs = lock(&self.inner.cqs);
        cqs.retain(|_, v| v.strong_count() > 0);
        cqs.insert(cq.id.0, Arc::downgrade(&cq));
        Ok(cq)
    }

    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<MrKeys, FabricError> {
        if addr == 0 || len == 0 || addr.checked_add(len).is_none() {
            return Err(FabricError::Invalid("empty or wrapping range"));
        }
        if !crate::mem::region::check_mapped(addr, len) {
            return Err(FabricError::Invalid("range not mapped"));
        }
        let lkey = self
            .inner
            .mrs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(Mr {
                addr,
                len,
                access,
                rkeys: Vec::new(),
            })
            .ok_or(FabricError::NoResources("memory regions"))?;
        self.inner.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(MrKeys { lkey })
    }

    fn deregister(&self, lkey: u32) {
        let mr = self
            .inner
            .mrs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(lkey);
        if let Some(mr) = mr {
            let mut rk = self
                .inner
                .rkeys
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for k in mr.rkeys {
                rk.remove(k);
            }
        }
    }

    fn bind_remote(&self, lkey: u32, qp: QpNum, access: Access) -> Result<u32, FabricError> {
        let remote = Access::REMOTE_READ | Access::REMOTE_WRITE;
        if access.bits() == 0 || !remote.contains(access) {
            return Err(FabricError::Invalid("remote access rights"));
        }
        if !lock(&self.inner.qps).contains(&qp.0) {
            return Err(FabricError::Invalid("no such queue pair"));
        }
        let mut mrs = self
            .inner
            .mrs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mr = mrs
            .slots
            .get_mut((lkey & ((1 << KEY_INDEX_BITS) - 1)) as usize);
        let Some((gen, Some(mr))) = mr else {
            return Err(FabricError::Invalid("no such region"));
        };
        if *gen != lkey >> KEY_INDEX_BITS || !mr.access.contains(access) {
            return Err(FabricError::Invalid("region does not allow that access"));
        }
        let rkey = self
            .inner
            .rkeys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(RKey { lkey, qp, access })
            .ok_or(FabricError::NoResources("remote keys"))?;
        mr.rkeys.push(rkey);
        Ok(rkey)
    }

    fn unbind_remote(&self, rkey: u32) {
        // Lock order: regions, then remote keys.
        let mut mrs = self
            .inner
            .mrs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let removed = self
            .inner
            .rkeys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(rkey);
        if let Some(rk) = removed {
            let idx = (rk.lkey & ((1 << KEY_INDEX_BITS) - 1)) as usize;
            if let Some((_, Some(mr))) = mrs.slots.get_mut(idx) {
                mr.rkeys.retain(|k| *k != rkey);
            }
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
        let wild = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, addr.port());
        let clash = ls.contains_key(&addr)
            || ls.contains_key(&wild)
            || (ip.is_unspecified() && ls.keys().any(|k| k.port() == addr.port()));
        if clash {
            return Err(FabricError::AddressInUse);
        }
        let inner = Arc::new(ListenerInner {
            nic: Arc::downgrade(&self.inner),
            addr,
            backlog: backlog.max(1) as usize,
            queue: Mutex::new(VecDeque::new()),
            events,
            closed: AtomicBool::new(false),
        });
        ls.insert(addr, inner.clone());
        Ok(Arc::new(SoftListener(inner)))
    }

    fn connect(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        match self.inner.network.resolve(*remote.ip()) {
            Resolve::OffNet => Err(ConnectError::NetUnreachable),
            Resolve::Nobody => Err(ConnectError::HostUnreachable),
            Resolve::TcpOnly => {
                let state = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
                let s2 = state.clone();
                let timeout = self.inner.connect_timeout;
                std::thread::Builder::new()
                    .name("sanpath-cm-timer".into())
                    .spawn(move || {
                        let deadline = Instant::now() + timeout;
                        let mut fired = lock(&s2.0);
                        while !*fired {
                            let now = Instant::now();
                            if now >= deadline {
                                *fired = true;
                                drop(fired);
                                done(Err(ConnectError::TimedOut));
                                return;
                            }
                            fired =
                                s2.1.wait_timeout(fired, deadline - now)
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .0;
                        }
                    })
                    .map_err(|_| ConnectError::NoResources)?;
                Ok(Arc::new(TimerAttempt { state }))
            }
            Resolve::San(target) => {
                let l = target
                    .listener_for(remote)
                    .ok_or(ConnectError::NoListener)?;
                let req = Arc::new(Request {
                    id: NEXT_REQ.fetch_add(1, Ordering::Relaxed),
                    state: Mutex::new(ReqState::Pending),
                    connector: self.inner.clone(),
                    from: local,
                    to: remote,
                    params: Mutex::new(Some(params)),
                    done: Mutex::new(Some(done)),
                    listener: Arc::downgrade(&l),
                });
                {
                    let mut q = lock(&l.queue);
                    if l.closed.load(Ordering::SeqCst) || q.len() >= l.backlog {
                        return Err(ConnectError::Refused);
                    }
                    q.push_back(req.clone());
                }
                l.events.request_arrived();
                Ok(Arc::new(RequestAttempt(req)))
            }
        }
    }

    fn stats(&self) -> NicStats {
        NicStats {
            registrations: self.inner.registrations.load(Ordering::Relaxed),
            live_regions: self
                .inner
                .mrs
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len() as u64,
            live_remote_keys: self
                .inner
                .rkeys
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len() as u64,
            live_qps: lock(&self.inner.qps).len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct NoWake;
    impl Waker for NoWake {
        fn wake(&self) {}
    }
    struct Count(AtomicU32);
    impl QpEvents for Count {
        fn disconnected(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl ListenerEvents for Count {
        fn request_arrived(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct End {
        qp: Arc<dyn QueuePair>,
        cq: Arc<dyn CompletionQueue>,
        ev: Arc<Count>,
    }

    fn nic(net: &Arc<SoftNetwork>, ip: [u8; 4]) -> Arc<SoftNic> {
        net.attach(SoftNicConfig {
            addresses: vec![Ipv4Addr::from(ip)],
            prefix_len: 24,
            connect_timeout: Duration::from_millis(50),
            rnr_queue_max: 2,
        })
        .unwrap()
    }

    fn params(cq: &Arc<dyn CompletionQueue>, ev: &Arc<Count>) -> QpParams {
        QpParams {
            cq: cq.id(),
            send_depth: 8,
            recv_depth: 8,
            max_sge: 4,
            events: ev.clone(),
        }
    }

    /// A connected pair: (connector end, acceptor end).
    fn pair(a: &SoftNic, b: &SoftNic, to: SocketAddrV4) -> (End, End) {
        let lev = Arc::new(Count(AtomicU32::new(0)));
        let l = b.listen(to, 4, lev.clone()).unwrap();
        let (acq, bcq) = (
            a.create_cq(64, Arc::new(NoWake)).unwrap(),
            b.create_cq(64, Arc::new(NoWake)).unwrap(),
        );
        let (aev, bev) = (
            Arc::new(Count(AtomicU32::new(0))),
            Arc::new(Count(AtomicU32::new(0))),
        );
        let (tx, rx) = mpsc::channel();
        let from = SocketAddrV4::new(a.addresses()[0], 1000);
        a.connect(
            from,
            to,
            params(&acq, &aev),
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
        assert_eq!(lev.0.load(Ordering::SeqCst), 1);
        let bqp = l.peek().unwrap().accept(params(&bcq, &bev)).unwrap();
        let aqp = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
        (
            End {
                qp: aqp,
                cq: acq,
                ev: aev,
            },
            End {
                qp: bqp,
                cq: bcq,
                ev: bev,
            },
        )
    }

    fn reg(n: &SoftNic, buf: &mut [u8], access: Access) -> u32 {
        // SAFETY: the buffers outlive the NIC use in each test.
        unsafe { n.register(buf.as_mut_ptr() as usize, buf.len(), access) }
            .unwrap()
            .lkey
    }

    fn sge(buf: &[u8], off: usize, len: u32, lkey: u32) -> Sge {
        Sge {
            addr: buf.as_ptr() as usize + off,
            len,
            lkey,
        }
    }

    fn poll(cq: &Arc<dyn CompletionQueue>) -> Vec<WorkCompletion> {
        let mut out = [WorkCompletion::EMPTY; 32];
        let n = cq.poll(&mut out);
        out[..n].to_vec()
    }

    #[test]
    fn sends_wait_for_receives_in_order_and_overflow_breaks() {
        let net = SoftNetwork::new();
        let n = nic(&net, [198, 18, 1, 1]);
        let (a, b) = pair(&n, &n, SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 1), 5));
        let mut src = vec![0u8; 4096];
        src.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        let mut dst = vec![0u8; 4096];
        let (ls, ld) = (
            reg(&n, &mut src, Access::NONE),
            reg(&n, &mut dst, Access::LOCAL_WRITE),
        );
        for i in 0..2u64 {
            a.qp.post_send(&SendWr {
                wr_id: i,
                op: SendOp::Send,
                sges: &[sge(&src, i as usize * 10, 10, ls)],
            })
            .unwrap();
        }
        assert!(poll(&a.cq).is_empty(), "parked until a receive is posted");
        for i in 0..2u64 {
            b.qp.post_recv(&RecvWr {
                wr_id: 10 + i,
                sges: &[sge(&dst, i as usize * 100, 100, ld)],
            })
            .unwrap();
        }
        let got = poll(&b.cq);
        assert_eq!(
            got.iter()
                .map(|w| (w.wr_id, w.status, w.byte_len))
                .collect::<Vec<_>>(),
            vec![(10, WcStatus::Success, 10), (11, WcStatus::Success, 10)]
        );
        assert_eq!(&dst[100..110], &src[10..20]);
        assert_eq!(poll(&a.cq).len(), 2);
        // Three sends with no receive: the third exceeds the RNR bound.
        for i in 0..3u64 {
            a.qp.post_send(&SendWr {
                wr_id: 20 + i,
                op: SendOp::Send,
                sges: &[sge(&src, 0, 1, ls)],
            })
            .unwrap();
        }
        let st: Vec<_> = poll(&a.cq).iter().map(|w| (w.wr_id, w.status)).collect();
        assert!(st.contains(&(22, WcStatus::RnrRetryExceeded)), "{st:?}");
        assert!(
            st.contains(&(20, WcStatus::Flushed)) && st.contains(&(21, WcStatus::Flushed)),
            "{st:?}"
        );
        assert_eq!(a.ev.0.load(Ordering::SeqCst), 1);
        assert_eq!(b.ev.0.load(Ordering::SeqCst), 1);
        n.deregister(ls);
        n.deregister(ld);
    }

    #[test]
    fn remote_keys_are_bound_to_one_connection_and_revocable() {
        let net = SoftNetwork::new();
        let (n1, n2) = (nic(&net, [198, 18, 2, 1]), nic(&net, [198, 18, 2, 2]));
        let to = SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 2), 7);
        let (a, b) = pair(&n1, &n2, to);
        let (a2, _b2) = pair(&n1, &n2, SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 2), 8));
        let mut src = vec![7u8; 256];
        let mut target = vec![0u8; 256];
        let ls = reg(&n1, &mut src, Access::NONE);
        let lt = reg(&n2, &mut target, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
        let rkey = n2
            .bind_remote(lt, b.qp.num(), Access::REMOTE_WRITE)
            .unwrap();
        let write = |qp: &Arc<dyn QueuePair>, at: u64| {
            qp.post_send(&SendWr {
                wr_id: 1,
                op: SendOp::RdmaWrite {
                    remote_addr: target.as_ptr() as u64 + at,
                    rkey,
                },
                sges: &[sge(&src, 0, 16, ls)],
            })
            .unwrap();
        };
        write(&a.qp, 8);
        assert_eq!(poll(&a.cq)[0].status, WcStatus::Success);
        assert_eq!(&target[8..24], &[7u8; 16]);
        write(&a2.qp, 100);
        assert_eq!(
            poll(&a2.cq)[0].status,
            WcStatus::RemoteAccessError,
            "key of another connection"
        );
        assert_eq!(target[100], 0);
        n2.unbind_remote(rkey);
        write(&a.qp, 100);
        assert_eq!(
            poll(&a.cq)[0].status,
            WcStatus::RemoteAccessError,
            "revoked key"
        );
        assert_eq!(target[100], 0);
        assert!(
            n2.bind_remote(lt, b.qp.num(), Access::REMOTE_READ).is_err(),
            "region lacks the right"
        );
    }

    #[test]
    fn set_error_flushes_everything_once_and_tells_the_peer() {
        let net = SoftNetwork::new();
        let n = nic(&net, [198, 18, 3, 1]);
        let (a, b) = pair(&n, &n, SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, 1), 9));
        let mut buf = vec![0u8; 64];
        let l = reg(&n, &mut buf, Access::LOCAL_WRITE);
        for i in 0..3 {
            a.qp.post_recv(&RecvWr {
                wr_id: i,
                sges: &[sge(&buf, 0, 8, l)],
            })
            .unwrap();
            b.qp.post_recv(&RecvWr {
                wr_id: 10 + i,
                sges: &[sge(&buf, 8, 8, l)],
            })
            .unwrap();
        }
        a.qp.set_error();
        a.qp.set_error();
        let fa = poll(&a.cq);
        assert_eq!(fa.len(), 3);
        assert!(fa.iter().all(|w| w.status == WcStatus::Flushed));
        let fb = poll(&b.cq);
        assert_eq!(fb.len(), 3);
        assert!(fb.iter().all(|w| w.status == WcStatus::RemoteDisconnected));
        assert_eq!(b.ev.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            a.ev.0.load(Ordering::SeqCst),
            0,
            "the closing side is not told"
        );
        a.qp.post_send(&SendWr {
            wr_id: 99,
            op: SendOp::Send,
            sges: &[],
        })
        .unwrap();
        assert_eq!(poll(&a.cq)[0].status, WcStatus::Flushed);
        b.qp.post_send(&SendWr {
            wr_id: 98,
            op: SendOp::Send,
            sges: &[],
        })
        .unwrap();
        assert_eq!(poll(&b.cq)[0].status, WcStatus::RemoteDisconnected);
    }

    #[test]
    fn connection_manager_failures_and_cancel() {
        let net = SoftNetwork::new();
        let n = nic(&net, [198, 18, 4, 1]);
        net.add_tcp_only_host(Ipv4Addr::new(198, 18, 4, 9));
        let cq = n.create_cq(64, Arc::new(NoWake)).unwrap();
        let ev = Arc::new(Count(AtomicU32::new(0)));
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 4, 1), 1);
        let try_connect = |ip: [u8; 4], port| {
            n.connect(
                from,
                SocketAddrV4::new(Ipv4Addr::from(ip), port),
                params(&cq, &ev),
                Box::new(|_| {}),
            )
            .err()
        };
        assert_eq!(
            try_connect([198, 18, 4, 1], 5),
            Some(ConnectError::NoListener)
        );
        assert_eq!(
            try_connect([198, 18, 4, 7], 5),
            Some(ConnectError::HostUnreachable)
        );
        assert_eq!(
            try_connect([10, 9, 9, 9], 5),
            Some(ConnectError::NetUnreachable)
        );
        let (tx, rx) = mpsc::channel();
        n.connect(
            from,
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 4, 9), 5),
            params(&cq, &ev),
            Box::new(move |r| tx.send(r.err()).unwrap()),
        )
        .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Some(ConnectError::TimedOut)
        );
        // Backlog 1: the second request is refused without an event.
        let lev = Arc::new(Count(AtomicU32::new(0)));
        let l = n
            .listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 6), 1, lev.clone())
            .unwrap();
        let to = SocketAddrV4::new(Ipv4Addr::new(198, 18, 4, 1), 6);
        let first = n
            .connect(
                from,
                to,
                params(&cq, &ev),
                Box::new(|_| panic!("cancelled attempts never complete")),
            )
            .unwrap();
        assert_eq!(
            n.connect(from, to, params(&cq, &ev), Box::new(|_| {}))
                .err(),
            Some(ConnectError::Refused)
        );
        assert_eq!(lev.0.load(Ordering::SeqCst), 1);
        let req = l.peek().unwrap();
        assert!(first.cancel());
        assert!(!first.cancel());
        assert_eq!(
            req.accept(params(&cq, &ev)).err(),
            Some(ConnectError::Cancelled)
        );
        assert_eq!(l.pending(), 0);
    }
}
