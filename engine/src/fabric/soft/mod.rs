//! `soft`: a software RDMA NIC between threads of one process.
//!
//! Not a mock: it keeps the verbs model, and the engine cannot tell it from a
//! NIC except by speed.
//!
//! # Model
//!
//! - **Wire** ([`SoftNetwork`]): NICs attach with IPv4 addresses and a prefix
//!   length. A destination owned by a NIC is reachable; one declared with
//!   [`SoftNetwork::add_tcp_only_host`] exists but never answers on the SAN
//!   (connects time out); any other address on a SAN subnet is an unknown
//!   host; the rest is an unreachable network. A dropped [`SoftNic`] frees
//!   its addresses at once.
//! - **Protection domain** (`mr`): regions registered with access rights and
//!   named by lkeys; remote keys bound to one queue pair (like type-2 memory
//!   windows). Keys are a slot index plus a generation and never alias.
//! - **Queue pairs** (`qp`, `link`, `wq`, `cell`): a connection is one
//!   `Link`: per end a send queue and a receive queue, per direction a
//!   single-producer/single-consumer ring of cells. A send of up to
//!   `cell::INLINE_MAX` bytes is copied into its cell at post time; a longer
//!   one travels as its gather list and the receiving side copies it
//!   straight from the sender's registered memory (the one copy a NIC would
//!   make). The *matcher* of a direction (normally the receiving end's CQ
//!   consumer, the sending end's when the receiver is not polled) fills the
//!   receiver's posted receives in order. RDMA writes and reads execute in
//!   the posting thread at post time (the posting CPU is the DMA engine),
//!   their remote key checked in the connection's window of keys the peer
//!   bound to it. Every entry is checked against its NIC's regions when
//!   posted. RC semantics: in order, reliable, message-preserving. A send
//!   finding no posted receive waits in its cell (receiver-not-ready retry:
//!   nothing is dropped, order is kept, the sender's buffer is untouched
//!   until the message moves) up to `rnr_queue_max` sends; the next one
//!   fails `RnrRetryExceeded`. One simplification of RC: an RDMA request
//!   posted behind a waiting send executes and completes at once instead of
//!   waiting behind it (the engine's flow control is meant to keep sends
//!   from waiting).
//! - **Errors**: a failing request breaks the connection (after the
//!   messages posted before it that have receives were delivered): it
//!   completes with its own status, the other outstanding requests of its
//!   end `Flushed`,
//!   the peer's `RemoteDisconnected`, and each end is told once: the
//!   failing one `failed`, the other `disconnected`. `set_error` (local close) flushes the closing end and disconnects
//!   the peer, which alone is told. Later posts complete at once with the
//!   end's error status (`Flushed` after a local `set_error`).
//! - **Completion queues** (`cq`, and `notify` for what producers hold of
//!   one): a CQ stores nothing; polling reads the completions off the
//!   queues of its ends that have work (a ready list: an idle end is
//!   announced by whoever makes work for it), so a poll
//!   costs the same however many ends share the CQ (receive queue first, then the
//!   requests done at post time, then the sends, each in posting order), so
//!   each CQ is written by its consumer alone. Every post that returns `Ok`
//!   produces exactly one completion, and a CQ never owes more than its
//!   depth: a QP reserves `send_depth + recv_depth` entries at creation and
//!   holds at most that many uncompleted requests (a post beyond its queue's
//!   depth fails `QueueFull`).
//! - **Connection management** (`cm`): listeners with a FIFO backlog;
//!   requests accepted, rejected or cancelled exactly once.
//!
//! Guarantee: every post that returned `Ok` yields exactly one completion,
//! and once `set_error` returned and its flushed completions were polled,
//! the NIC never touches the memory those requests named (`link`, "Breaking
//! and sealing": a broken connection flushes only once no matcher and no
//! RDMA is running on it, and `set_error` returns only then).
//!
//! # Choices the trait leaves open
//!
//! - `connect` returns `NoListener`, `HostUnreachable`, `NetUnreachable` and
//!   `Refused` (backlog full or listener closing) directly as `Err`; `done`
//!   then never runs. Only a queued request (accepted, rejected, refused by
//!   a listener close) and `TimedOut` complete through `done`.
//! - `connect` does not check `local` (the engine passes one of the NIC's
//!   addresses); it is reported as the queue pairs' local address.
//! - A backlog of 0 is taken as 1.
//! - `accept` of a request that is no longer pending (cancelled, rejected,
//!   accepted, refused by close) returns `Err(Cancelled)`.
//! - Queue-pair creation fails `NoResources` if a CQ is unknown or would be
//!   over-committed, or `max_sge` exceeds 256.
//! - Zero-length entries name no memory and are not checked; a zero-length
//!   RDMA request still needs a valid remote key.
//!
//! # Lock order
//!
//! network state (alone) · NIC listener table → listener backlog → request
//! state · post lock of an end (which holds the end's window of remote
//! keys) → region table (read, on a key-cache miss) · post lock → link
//! control · CQ consumer → an end's reaper → a direction's matcher → link
//! control · post lock → region table → remote-key table (bind; unbind and
//! deregister take the tables, release them, then the post lock to revoke)
//! · region table (read) → a region's users (a key-cache miss)
//! · a CQ's ready list (alone: an announcement; or under the CQ consumer) ·
//! NIC queue-pair map and CQ table (alone). A deregistration
//! takes each end's post lock after releasing the tables. Wakers,
//! `QpEvents`, `ListenerEvents` and `done` callbacks run with no lock of
//! this module held.
//!
//! # Fault injection
//!
//! With the cargo feature `fault-injection` (tests only), `fault` arms
//! faults on one end of a connection (`SoftNic::qp_faults`): a failing
//! work request, a remote-key error, an error mid-transfer, a peer that stops
//! responding, a CQ overrun: each ends in the error path above. And RDMA
//! requests held in flight until the test releases them. Without an
//! armed fault a post pays one branch; without the feature, nothing.
//!
//! # No allocation per work request
//!
//! Every queue of a link is a ring preallocated at queue-pair creation
//! (`recv_depth` receives, `send_depth` requests and `send_depth` cells
//! with room for `max_sge` gather entries each), each of a page or more an
//! anonymous mapping resident only as traffic touches it (`zeroed`);
//! completions are written straight into the poller's array. Only connection set-up, registration,
//! key binding and timers allocate.

pub(in crate::fabric) mod cell;
mod clock;
mod cm;
mod cq;
#[cfg(feature = "fault-injection")]
mod fault;
mod fence;
mod link;
mod mr;
mod network;
mod notify;
mod post_lock;
mod qp;
#[cfg(test)]
mod tests;
mod wq;
mod zeroed;

#[cfg(feature = "fault-injection")]
pub use fault::{Fault, QpFaults, WorkQueue};
pub use network::{default_network, SoftNetwork};

use crate::fabric::*;
use cq::SoftCq;
use mr::Pd;
use network::Route;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

/// Most scatter/gather entries per work request a soft queue pair accepts.
const MAX_SGE_LIMIT: u32 = 256;
/// Largest CQ a soft NIC creates.
const MAX_CQ_DEPTH: u32 = 1 << 24;

/// Locks a mutex; a panic elsewhere never wedges the NIC.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Settings of one soft NIC.
#[derive(Clone, Debug)]
pub struct SoftNicConfig {
    /// The NIC's IPv4 addresses (at least one).
    pub addresses: Vec<Ipv4Addr>,
    /// Length of the SAN subnet prefix of each address.
    pub prefix_len: u8,
    /// How long a connect toward a TCP-only host waits before `TimedOut`.
    pub connect_timeout: Duration,
    /// Sends that may wait for a receive of one queue pair of this NIC
    /// before the next one fails `RnrRetryExceeded`.
    pub rnr_queue_max: u32,
}

/// State of one NIC shared by its handle, its links and its listeners.
struct NicShared {
    /// Process-unique; orders the locking of two NICs' region tables.
    id: u64,
    addresses: Vec<Ipv4Addr>,
    prefix_len: u8,
    connect_timeout: Duration,
    rnr_max: usize,
    /// Regions and remote keys.
    pd: Pd,
    /// Listeners by address (IP `0.0.0.0` = wildcard). Written by listen and
    /// listener close; read by connect. Lock order: before backlogs.
    listeners: Mutex<HashMap<SocketAddrV4, Arc<cm::ListenerShared>>>,
    /// The live queue pairs by number: their connection and end. Read by
    /// `bind_remote` and `deregister`, written at queue-pair creation and
    /// drop.
    qps: Mutex<HashMap<u32, (Weak<link::Link>, usize)>>,
    /// Last queue-pair number handed out.
    last_qp: AtomicU32,
    /// CQs by id (weak: the engine owns them). Written by `create_cq`, read
    /// at queue-pair creation.
    cqs: Mutex<HashMap<u32, Weak<SoftCq>>>,
    /// Last CQ id handed out.
    last_cq: AtomicU32,
    /// Every link with an end on this NIC (weak; dead entries are pruned at
    /// each insertion), for tests to find a queue pair to arm faults on.
    #[cfg(feature = "fault-injection")]
    fault_links: Mutex<Vec<Weak<link::Link>>>,
}

impl NicShared {
    fn new(id: u64, cfg: SoftNicConfig) -> NicShared {
        NicShared {
            id,
            addresses: cfg.addresses,
            prefix_len: cfg.prefix_len,
            connect_timeout: cfg.connect_timeout,
            rnr_max: cfg.rnr_queue_max as usize,
            pd: Pd::new(),
            listeners: Mutex::new(HashMap::new()),
            qps: Mutex::new(HashMap::new()),
            last_qp: AtomicU32::new(0),
            cqs: Mutex::new(HashMap::new()),
            last_cq: AtomicU32::new(0),
            #[cfg(feature = "fault-injection")]
            fault_links: Mutex::new(Vec::new()),
        }
    }

    fn cq(&self, id: CqId) -> Option<Arc<SoftCq>> {
        lock(&self.cqs).get(&id.0).and_then(Weak::upgrade)
    }

    /// A fresh number (not 0, not used by a live queue pair), now live;
    /// [`NicShared::register_qp`] names its connection.
    fn new_qp_num(&self) -> QpNum {
        let mut qps = lock(&self.qps);
        loop {
            let n = self.last_qp.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if n != 0 && !qps.contains_key(&n) {
                qps.insert(n, (Weak::new(), 0));
                return QpNum(n);
            }
        }
    }

    fn register_qp(&self, num: QpNum, link: &Arc<link::Link>, end: usize) {
        lock(&self.qps).insert(num.0, (Arc::downgrade(link), end));
    }

    /// Waits until no post of the queue pairs `q` names that began before
    /// this call is still running (each holds its end's post lock): a
    /// region deregistered before the call, which only those queue pairs
    /// looked up, is then in no post's hands.
    fn quiesce_posts(&self, q: mr::Quiesce) {
        let ends: Vec<_> = {
            let qps = lock(&self.qps);
            let live = |(l, end): &(Weak<link::Link>, usize)| Some((l.upgrade()?, *end));
            match q {
                mr::Quiesce::All => qps.values().filter_map(live).collect(),
                mr::Quiesce::Qps(nums) => nums
                    .iter()
                    .filter_map(|n| qps.get(n))
                    .filter_map(live)
                    .collect(),
            }
        };
        for (link, end) in ends {
            drop(link.ends[end].post.lock_control());
        }
    }

    /// Records a new link for [`SoftNic::qp_faults`].
    #[cfg(feature = "fault-injection")]
    fn track_link(&self, link: &Arc<link::Link>) {
        let mut links = lock(&self.fault_links);
        links.retain(|l| l.strong_count() > 0);
        links.push(Arc::downgrade(link));
    }

    fn forget_qp(&self, num: QpNum) {
        lock(&self.qps).remove(&num.0);
    }

    /// The listener for a request to `addr`: exact address, else wildcard.
    fn listener_for(&self, addr: SocketAddrV4) -> Option<Arc<cm::ListenerShared>> {
        let ls = lock(&self.listeners);
        ls.get(&addr)
            .or_else(|| ls.get(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, addr.port())))
            .cloned()
    }

    /// Unregisters `l` (if it is still the listener at its address).
    fn unlisten(&self, l: &Arc<cm::ListenerShared>) {
        let mut ls = lock(&self.listeners);
        if ls.get(&l.addr).is_some_and(|x| Arc::ptr_eq(x, l)) {
            ls.remove(&l.addr);
        }
    }
}

/// A soft NIC attached to a [`SoftNetwork`]; dropping it detaches it (its
/// addresses become free; existing queue pairs keep working).
pub struct SoftNic {
    network: Arc<SoftNetwork>,
    shared: Arc<NicShared>,
}

impl Drop for SoftNic {
    fn drop(&mut self) {
        self.network.detach(self.shared.id);
    }
}

impl Nic for SoftNic {
    fn addresses(&self) -> Vec<Ipv4Addr> {
        self.shared.addresses.clone()
    }

    fn create_cq(
        &self,
        depth: u32,
        waker: Arc<dyn Waker>,
    ) -> Result<Arc<dyn CompletionQueue>, FabricError> {
        if depth > MAX_CQ_DEPTH {
            return Err(FabricError::NoResources("CQ depth"));
        }
        let mut cqs = lock(&self.shared.cqs);
        cqs.retain(|_, cq| cq.strong_count() > 0);
        let id = loop {
            let n = self.shared.last_cq.fetch_add(1, Ordering::Relaxed);
            let n = n.wrapping_add(1);
            if !cqs.contains_key(&n) {
                break n;
            }
        };
        let capacity = match depth {
            0 => usize::MAX,
            d => d as usize,
        };
        let cq = Arc::new(SoftCq::new(CqId(id), capacity, waker));
        cqs.insert(id, Arc::downgrade(&cq));
        Ok(cq)
    }

    /// Fails `Invalid` for a null address, a zero length, or a range that
    /// is not entirely mapped (checked with `mincore`).
    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<MrKeys, FabricError> {
        // SAFETY: forwarded caller contract (the range stays valid while
        // registered).
        let lkey = unsafe { self.shared.pd.register(addr, len, access) }?;
        Ok(MrKeys { lkey })
    }

    fn deregister(&self, lkey: u32) {
        let users = self.shared.pd.deregister(lkey);
        self.shared.quiesce_posts(users);
    }

    fn bind_remote(&self, lkey: u32, qp: QpNum, access: Access) -> Result<u32, FabricError> {
        let found = lock(&self.shared.qps)
            .get(&qp.0)
            .and_then(|(l, end)| Some((l.upgrade()?, *end)));
        let (link, end) = found.ok_or(FabricError::Invalid("no such queue pair"))?;
        // The key is for the RDMA of the peer, the other end's direction.
        self.shared.pd.bind(lkey, &link, 1 - end, access)
    }

    fn unbind_remote(&self, rkey: u32) {
        self.shared.pd.unbind(rkey);
    }

    fn listen(
        &self,
        addr: SocketAddrV4,
        backlog: u32,
        events: Arc<dyn ListenerEvents>,
    ) -> Result<Arc<dyn Listener>, FabricError> {
        let ip = *addr.ip();
        if !ip.is_unspecified() && !self.shared.addresses.contains(&ip) {
            return Err(FabricError::AddressNotAvailable);
        }
        let mut ls = lock(&self.shared.listeners);
        if crate::fabric::listen_clash(&ls, addr) {
            return Err(FabricError::AddressInUse);
        }
        let l = Arc::new(cm::ListenerShared {
            nic: Arc::downgrade(&self.shared),
            addr,
            backlog: backlog.max(1) as usize,
            queue: Mutex::new(cm::Backlog {
                reqs: Default::default(),
                closed: false,
            }),
            events,
        });
        ls.insert(addr, l.clone());
        Ok(Arc::new(cm::SoftListener(l)))
    }

    fn connect(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        self.connect_with_data(local, remote, params, &[], done)
    }

    fn connect_with_data(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        private_data: &[u8],
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        if private_data.len() > MAX_PRIVATE_DATA {
            return Err(ConnectError::NoResources);
        }
        match self.network.route(*remote.ip()) {
            Route::NoNet => Err(ConnectError::NetUnreachable),
            Route::NoHost => Err(ConnectError::HostUnreachable),
            Route::TcpOnly => cm::start_timer(self.shared.connect_timeout, done),
            Route::San(target) => {
                let l = target
                    .listener_for(remote)
                    .ok_or(ConnectError::NoListener)?;
                cm::queue_request(
                    &self.shared,
                    &target,
                    &l,
                    local,
                    remote,
                    params,
                    private_data,
                    done,
                )
            }
        }
    }

    fn stats(&self) -> NicStats {
        let pd = &self.shared.pd;
        NicStats {
            registrations: pd.registrations(),
            live_regions: pd.read_regions().len() as u64,
            live_remote_keys: pd.read_rkeys().len() as u64,
            live_qps: lock(&self.shared.qps).len() as u64,
        }
    }
}
