//! The transport: protection domain (memory registration), completion queues,
//! reliable-connected queue pairs and connection management, as a trait the
//! SPI front end drives. Backends: [`soft`] (a software NIC between threads of
//! one process, the default) and `verbs` (libibverbs + rdma_cm, feature
//! `verbs`, a later issue).
//!
//! The model is RC verbs: a work request posted to a queue pair is executed
//! by the NIC and produces exactly one work completion on the queue pair's
//! completion queue — success, an error, or `Flushed` once the queue pair is
//! in the error state. Nothing here knows about sockets or Winsock.

mod cq_budget;
mod lkey_cache;
#[cfg(all(target_os = "linux", not(loom)))]
mod membarrier;
#[cfg(not(loom))]
pub mod shm;
pub mod soft;
#[cfg(feature = "verbs")]
pub mod verbs;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

/// Caller-chosen id of a work request, returned in its completion.
pub type WrId = u64;

/// Access rights of a memory region (verbs `IBV_ACCESS_*` subset). Local read
/// is always allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Access(u8);

impl Access {
    pub const NONE: Access = Access(0);
    /// The NIC may write the region on behalf of local work requests (receive
    /// sink, RDMA read sink).
    pub const LOCAL_WRITE: Access = Access(1);
    /// The peer may RDMA-write into the region (through a bound remote key).
    pub const REMOTE_WRITE: Access = Access(2);
    /// The peer may RDMA-read from the region (through a bound remote key).
    pub const REMOTE_READ: Access = Access(4);

    pub const fn bits(self) -> u8 {
        self.0
    }
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        self.union(rhs)
    }
}

/// Keys of a registered memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MrKeys {
    /// Names the region in local scatter/gather entries.
    pub lkey: u32,
}

/// One scatter/gather entry: a range of a registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    pub addr: usize,
    pub len: u32,
    pub lkey: u32,
}

/// What a send-queue work request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    /// Two-sided send into the peer's next posted receive.
    Send,
    /// One-sided write of the local entries to `[remote_addr, +len)` of the
    /// peer region named by `rkey`.
    RdmaWrite { remote_addr: u64, rkey: u32 },
    /// One-sided read of `[remote_addr, +len)` of the peer region into the
    /// local entries.
    RdmaRead { remote_addr: u64, rkey: u32 },
}

/// A send-queue work request. The entries are read at post time: the slice
/// need not outlive the call, the memory it names must until completion.
#[derive(Clone, Copy, Debug)]
pub struct SendWr<'a> {
    pub wr_id: WrId,
    pub op: SendOp,
    pub sges: &'a [Sge],
}

/// A receive-queue work request.
#[derive(Clone, Copy, Debug)]
pub struct RecvWr<'a> {
    pub wr_id: WrId,
    pub sges: &'a [Sge],
}

/// Outcome of a work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WcStatus {
    Success = 0,
    /// The queue pair was in (or entered) the error state before the request
    /// executed.
    Flushed,
    /// The connection went away under the request: the peer closed or its
    /// queue pair failed.
    RemoteDisconnected,
    /// A received message was larger than the posted receive.
    LocalLengthError,
    /// A local entry is not covered by its region or lacks the access right.
    LocalProtectionError,
    /// The peer rejected a remote key, range or access right.
    RemoteAccessError,
    /// The peer could not execute the request (e.g. its receive was too
    /// small for our send).
    RemoteInvalidRequest,
    /// The peer had no posted receive for longer than the NIC retries.
    RnrRetryExceeded,
    /// Transport retries exhausted (link down, peer vanished).
    RetryExceeded,
}

impl WcStatus {
    /// Every status, in the order of their `u8` values.
    const ALL: [WcStatus; 9] = [
        WcStatus::Success,
        WcStatus::Flushed,
        WcStatus::RemoteDisconnected,
        WcStatus::LocalLengthError,
        WcStatus::LocalProtectionError,
        WcStatus::RemoteAccessError,
        WcStatus::RemoteInvalidRequest,
        WcStatus::RnrRetryExceeded,
        WcStatus::RetryExceeded,
    ];

    /// The status whose `u8` value is `v` (`status as u8` undone).
    pub fn from_u8(v: u8) -> Option<WcStatus> {
        let s = *Self::ALL.get(usize::from(v))?;
        debug_assert_eq!(s as u8, v);
        Some(s)
    }
}

/// The kind of request a completion belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WcOpcode {
    Send = 0,
    RdmaWrite,
    RdmaRead,
    Recv,
}

/// One completion-queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkCompletion {
    pub wr_id: WrId,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    /// Bytes received (receives), transferred (RDMA), or sent.
    pub byte_len: u32,
}

impl WorkCompletion {
    /// A placeholder for preallocated completion arrays.
    pub const EMPTY: WorkCompletion = WorkCompletion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Send,
        byte_len: 0,
    };
}

/// Why a work request could not be posted (nothing was queued).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("work queue full")]
    QueueFull,
    #[error("too many scatter/gather entries")]
    TooManySge,
}

/// Why a fabric resource could not be created.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FabricError {
    #[error("out of resources: {0}")]
    NoResources(&'static str),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("address not available on this NIC")]
    AddressNotAvailable,
    #[error("address already in use")]
    AddressInUse,
    #[error("{0}")]
    Unavailable(String),
    /// The NIC cannot do this with the guarantees the engine needs.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
}

/// Result of an outgoing connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The remote listener (or its backlog, or its condition function)
    /// refused the request.
    #[error("connection refused")]
    Refused,
    /// The remote host has a SAN NIC but nothing listens on that port.
    #[error("no listener at that port")]
    NoListener,
    /// No host has that address on the SAN subnet.
    #[error("host unreachable")]
    HostUnreachable,
    /// The address is on no SAN subnet this NIC reaches.
    #[error("network unreachable")]
    NetUnreachable,
    /// No SAN answer within the connection-manager timeout.
    #[error("timed out")]
    TimedOut,
    #[error("out of resources")]
    NoResources,
    /// The attempt was cancelled locally.
    #[error("cancelled")]
    Cancelled,
}

/// Identifies a completion queue of one NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CqId(pub u32);

/// Something a completion queue or connection event wakes.
/// Whether a listener on `addr` clashes with one of `listening` (the rule
/// of the in-host fabrics): the same address, a wildcard on its port, or,
/// for a wildcard, any address on its port.
pub(crate) fn listen_clash<V>(
    listening: &std::collections::HashMap<std::net::SocketAddrV4, V>,
    addr: std::net::SocketAddrV4,
) -> bool {
    let wildcard = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, addr.port());
    listening.contains_key(&addr)
        || listening.contains_key(&wildcard)
        || (addr.ip().is_unspecified() && listening.keys().any(|k| k.port() == addr.port()))
}

pub trait Waker: Send + Sync {
    fn wake(&self);
}

/// A completion queue. Single consumer: at most one thread polls a given CQ
/// at a time (the engine guarantees it).
pub trait CompletionQueue: Send + Sync {
    fn id(&self) -> CqId;
    /// Moves up to `out.len()` completions into `out`, oldest first; returns
    /// how many. Never blocks.
    fn poll(&self, out: &mut [WorkCompletion]) -> usize;
    /// Requests one wake-up: the next completion added after this call wakes
    /// the CQ's waker. Returns `true` if completions are already waiting (the
    /// caller should poll rather than sleep; the request stays armed).
    fn arm(&self) -> bool;

    /// Whether [`CompletionQueue::drain`] holds a consumer right of the
    /// CQ's own across its calls of `f`, so that callers need none: two
    /// threads draining at once never interleave the CQ's completions.
    /// Without it (the default) the caller serialises its drains itself.
    fn serialises_drains(&self) -> bool {
        false
    }

    /// Hands the available completions to `f`, oldest first: polls
    /// `buf.len()` at a time until a poll returns fewer. Returns how many,
    /// or `None` if another thread drains the CQ (only a CQ that
    /// [serialises its drains](CompletionQueue::serialises_drains) says
    /// so). Never blocks; `f` must not drain this CQ.
    fn drain(
        &self,
        buf: &mut [WorkCompletion],
        f: &mut dyn FnMut(&WorkCompletion),
    ) -> Option<usize> {
        Some(poll_each(self, buf, f))
    }
}

/// Polls `cq` into `buf` until a poll returns fewer than `buf` holds,
/// handing each completion to `f`; how many. The caller holds the right to
/// consume `cq` across the calls.
#[inline(always)]
pub fn poll_each<C: CompletionQueue + ?Sized>(
    cq: &C,
    buf: &mut [WorkCompletion],
    f: &mut dyn FnMut(&WorkCompletion),
) -> usize {
    let mut total = 0;
    loop {
        let n = cq.poll(buf);
        buf[..n].iter().for_each(&mut *f);
        total += n;
        if n < buf.len() {
            return total;
        }
    }
}

/// Connection events of a queue pair, delivered with no NIC lock held.
pub trait QpEvents: Send + Sync {
    /// The peer closed, or the connection failed. Posted work requests have
    /// completed (or will complete) with an error; later posts flush.
    fn disconnected(&self);

    /// Like `disconnected`, when this queue pair itself broke the connection
    /// (one of its requests failed: a local error, transport retries
    /// exhausted, its CQ overran) rather than the peer. A backend that
    /// cannot tell the two apart calls `disconnected`.
    fn failed(&self) {
        self.disconnected();
    }
}

/// Events of a listener, delivered with no NIC lock held.
pub trait ListenerEvents: Send + Sync {
    /// A connection request was queued (not called for requests refused
    /// because the backlog was full).
    fn request_arrived(&self);
}

/// Resources for the queue pair of a new connection.
#[derive(Clone)]
pub struct QpParams {
    pub cq: CqId,
    pub send_depth: u32,
    pub recv_depth: u32,
    pub max_sge: u32,
    pub events: Arc<dyn QpEvents>,
}

/// Numbers a queue pair within its NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QpNum(pub u32);

/// A connected reliable queue pair.
pub trait QueuePair: Send + Sync {
    fn num(&self) -> QpNum;
    fn local_addr(&self) -> SocketAddrV4;
    fn peer_addr(&self) -> SocketAddrV4;
    /// Queues a send-queue request. After `Ok` exactly one completion follows.
    fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError>;
    /// Queues a receive. After `Ok` exactly one completion follows.
    fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError>;
    /// Moves the queue pair to the error state and disconnects: every posted
    /// request completes `Flushed` (those already executing finish first),
    /// later posts complete `Flushed`, and the peer is told. Idempotent. Once
    /// this returned and all the flushed completions were polled, the NIC
    /// touches none of the memory those requests named.
    fn set_error(&self);
    /// Ends the queue pair's use of memory for good, whether or not its
    /// requests were flushed (a NIC that does not flush, or takes too
    /// long): implies `set_error`, and once this returned the NIC touches
    /// none of the memory any request posted to it named, nor ever will.
    /// The completions of requests not yet completed may still come, or
    /// never: the caller completes those requests itself. Later posts
    /// complete `Flushed` without touching memory. Idempotent; may block
    /// while the NIC finishes an access already under way.
    fn abandon(&self);
}

/// Most bytes of private data a connection request carries (what rdma_cm
/// guarantees for a reliable-connected request over InfiniBand).
pub const MAX_PRIVATE_DATA: usize = 56;

/// A pending incoming connection request.
pub trait ConnRequest: Send + Sync {
    fn peer_addr(&self) -> SocketAddrV4;
    fn local_addr(&self) -> SocketAddrV4;
    /// The private data the connector sent with the request (empty if none;
    /// a backend may pad it with zeros up to its transport's unit).
    fn private_data(&self) -> &[u8] {
        &[]
    }
    /// Accepts: creates the local queue pair, removes the request from the
    /// backlog and completes the connector's attempt successfully.
    /// `Err(Cancelled)` if the connector gave up meanwhile (the request is
    /// gone then too).
    fn accept(&self, params: QpParams) -> Result<Arc<dyn QueuePair>, ConnectError>;
    /// Refuses: removes the request; the connector fails with `Refused`.
    fn reject(&self);
}

/// A listening endpoint.
pub trait Listener: Send + Sync {
    /// The oldest queued request that is still pending, without removing it.
    fn peek(&self) -> Option<Arc<dyn ConnRequest>>;
    /// Number of queued pending requests.
    fn pending(&self) -> usize;
    /// Stops listening: every queued request is refused. Idempotent.
    fn close(&self);
}

/// An outgoing connection attempt in progress.
pub trait ConnectAttempt: Send + Sync {
    /// Abandons the attempt if it has not completed yet: the completion
    /// callback will not run and the remote side sees no connection. Returns
    /// `false` if the attempt already completed (or its callback is running).
    fn cancel(&self) -> bool;
}

/// Completion callback of [`Nic::connect`], called exactly once unless the
/// attempt is cancelled first; never with a NIC lock held.
pub type ConnectDone = Box<dyn FnOnce(Result<Arc<dyn QueuePair>, ConnectError>) + Send>;

/// One RDMA NIC: protection domain, CQs, connection management.
/// The depth of a CQ created with depth 0 where the fabric must fix one
/// (verbs: the device's array of completion entries).
pub const DEFAULT_CQ_DEPTH: u32 = 16384;

pub trait Nic: Send + Sync {
    /// The IPv4 addresses of this NIC (what `SIO_ADDRESS_LIST_QUERY` reports).
    fn addresses(&self) -> Vec<Ipv4Addr>;

    /// The process is exiting without dropping this NIC (an embedder that
    /// keeps its provider in a static, as the C ABI does): removes what
    /// would outlive the process outside it (the shm NIC's address sockets).
    /// Nothing else may be used after; the default does nothing.
    fn process_exiting(&self) {}

    /// Creates a completion queue that admits queue pairs while the
    /// completions they can owe (their send and receive depths) fit in
    /// `depth`; `waker` is woken when it is armed and a completion arrives.
    /// `depth` 0 is the fabric's choice: no bound on the soft and shm
    /// fabrics, whose CQs hold no completions of their own (each queue
    /// pair's are in its own queues), [`DEFAULT_CQ_DEPTH`] on verbs, where
    /// the CQ is an array the device writes.
    fn create_cq(
        &self,
        depth: u32,
        waker: Arc<dyn Waker>,
    ) -> Result<Arc<dyn CompletionQueue>, FabricError>;

    /// Registers `[addr, addr+len)` with `access`.
    ///
    /// # Safety
    /// The range must stay valid memory until [`Nic::deregister`] returned
    /// for the returned key, and the caller must not access it in ways that
    /// race with work requests naming it.
    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<MrKeys, FabricError>;

    /// Removes a registration; its lkey and every remote key bound to it stop
    /// working. Must not be called while a posted request names it.
    fn deregister(&self, lkey: u32);

    /// Exposes a registered region to the peer of `qp` only, with `access`
    /// (`REMOTE_READ` and/or `REMOTE_WRITE`, which the region must allow);
    /// returns the remote key. Like a type-2 memory window. A NIC that cannot
    /// limit the key to `qp` fails `Unsupported` (unless configured to).
    fn bind_remote(&self, lkey: u32, qp: QpNum, access: Access) -> Result<u32, FabricError>;

    /// Revokes a remote key: later peer accesses with it fail with a remote
    /// access error. Idempotent.
    fn unbind_remote(&self, rkey: u32);

    /// Starts listening on `addr` (IP `0.0.0.0` = every address of this NIC)
    /// with room for `backlog` queued requests; a request arriving with the
    /// backlog full is refused without an event.
    fn listen(
        &self,
        addr: SocketAddrV4,
        backlog: u32,
        events: Arc<dyn ListenerEvents>,
    ) -> Result<Arc<dyn Listener>, FabricError>;

    /// Starts connecting from `local` to `remote`; `done` gets the queue pair
    /// or the failure. Errors known at once are returned directly.
    fn connect(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError>;

    /// [`Nic::connect`] with up to [`MAX_PRIVATE_DATA`] bytes of private
    /// data, which the listener side reads in
    /// [`ConnRequest::private_data`]. A backend without private data
    /// refuses non-empty data with `NoResources`.
    fn connect_with_data(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        private_data: &[u8],
        done: ConnectDone,
    ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
        if !private_data.is_empty() {
            return Err(ConnectError::NoResources);
        }
        self.connect(local, remote, params, done)
    }

    /// NIC counters (for tests and benchmarks).
    fn stats(&self) -> NicStats;
}

/// Counters of a NIC since its creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Successful `register` calls (memory pinned and registered).
    pub registrations: u64,
    /// Regions currently registered.
    pub live_regions: u64,
    /// Remote keys currently bound.
    pub live_remote_keys: u64,
    /// Queue pairs currently not destroyed.
    pub live_qps: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_u8() {
        for s in WcStatus::ALL {
            assert_eq!(WcStatus::from_u8(s as u8), Some(s));
        }
        assert_eq!(WcStatus::from_u8(WcStatus::ALL.len() as u8), None);
    }
}
