//! Connection management over librdmacm: listeners, incoming requests,
//! outgoing attempts, and the CM thread that drives them.
//!
//! Every rdma_cm id of a NIC lives on the NIC's one event channel; its
//! `context` is a token (a number, never dereferenced) that [`Tokens`] maps
//! to the id's owner. The CM thread copies what it needs from an event and
//! acknowledges it before acting, so an id can be destroyed from any thread
//! at any time (`rdma_destroy_id` waits only for unacknowledged events).
//! The owners' own mutexes serialise the CM thread with API calls on the
//! same id.

use super::id::OwnedId;
use super::qp::VerbsQp;
use super::sys::{errno, sockaddr_in, Raw};
use super::{lock, wait_readable_for, Shared};
use crate::fabric::{
    ConnRequest, ConnectAttempt, ConnectDone, ConnectError, FabricError, Listener, ListenerEvents,
    QpParams, QueuePair, MAX_PRIVATE_DATA,
};
use rdma_sys::*;
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// IB CM reject reasons (`status` of `RDMA_CM_EVENT_REJECTED` on IB/RoCE).
const REJ_INVALID_SERVICE_ID: i32 = 8;
/// Kernel listen backlog of every listening id (ours is enforced above it).
const KERNEL_BACKLOG: i32 = 128;

/// The owner of an rdma_cm id, by token.
pub(crate) enum CmTarget {
    Listener(Weak<VerbsListener>),
    Request(Weak<VerbsRequest>),
    /// Held strongly: an attempt lives until it completes or is cancelled,
    /// whether or not the caller keeps its handle.
    Attempt(Arc<Attempt>),
    Qp(Weak<VerbsQp>),
}

enum Target {
    Listener(Arc<VerbsListener>),
    Request(Arc<VerbsRequest>),
    Attempt(Arc<Attempt>),
    Qp(Arc<VerbsQp>),
}

/// Token → owner map (see the module docs).
#[derive(Default)]
pub(crate) struct Tokens {
    next: AtomicU64,
    map: Mutex<HashMap<u64, CmTarget>>,
}

impl Tokens {
    fn fresh(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn insert(&self, token: u64, t: CmTarget) {
        let old = lock(&self.map).insert(token, t);
        drop(old); // outside the lock: drops may come back here
    }

    fn get(&self, token: u64) -> Option<Target> {
        let m = lock(&self.map);
        Some(match m.get(&token)? {
            CmTarget::Listener(w) => Target::Listener(w.upgrade()?),
            CmTarget::Request(w) => Target::Request(w.upgrade()?),
            CmTarget::Attempt(a) => Target::Attempt(a.clone()),
            CmTarget::Qp(w) => Target::Qp(w.upgrade()?),
        })
    }

    /// Removes `token` if it still names a queue pair (or is dead).
    pub(crate) fn remove(&self, token: u64) {
        let old = lock(&self.map).remove(&token);
        drop(old);
    }

    /// Removes `token` only while it maps to a request or attempt (not once
    /// the connection's QP took it over).
    fn remove_pending(&self, token: u64) {
        let mut m = lock(&self.map);
        let old = match m.get(&token) {
            Some(CmTarget::Request(_) | CmTarget::Attempt(_)) => m.remove(&token),
            _ => None,
        };
        drop(m);
        drop(old);
    }

    /// The outgoing attempts still registered.
    fn attempts(&self) -> Vec<Arc<Attempt>> {
        lock(&self.map)
            .values()
            .filter_map(|t| match t {
                CmTarget::Attempt(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    /// NIC teardown: fails pending attempts with `Cancelled`, forgets the rest.
    pub(crate) fn clear(&self) {
        let all: Vec<CmTarget> = lock(&self.map).drain().map(|(_, t)| t).collect();
        for t in all {
            if let CmTarget::Attempt(a) = t {
                a.finish(Err(ConnectError::Cancelled));
            }
        }
    }
}

// ----------------------------------------------------------------- listen --

/// A listening endpoint of a [`VerbsNic`](super::VerbsNic): one rdma_cm id
/// per address it listens on.
pub struct VerbsListener {
    shared: Arc<Shared>,
    token: u64,
    /// Listening ids; emptied (destroyed) by `close`.
    ids: Mutex<Vec<OwnedId>>,
    backlog: usize,
    events: Arc<dyn ListenerEvents>,
    /// Pending requests, oldest first. Only the CM thread adds; accept,
    /// reject, the connector's departure and close remove.
    queue: Mutex<VecDeque<Arc<VerbsRequest>>>,
    closed: AtomicBool,
}

fn bind_error(e: i32) -> FabricError {
    match e {
        libc::EADDRINUSE => FabricError::AddressInUse,
        libc::EADDRNOTAVAIL | libc::ENODEV | libc::EINVAL => FabricError::AddressNotAvailable,
        libc::ENOMEM => FabricError::NoResources("rdma_cm id"),
        e => FabricError::Unavailable(format!(
            "rdma_bind_addr/rdma_listen: {}",
            std::io::Error::from_raw_os_error(e)
        )),
    }
}

pub(crate) fn listen(
    shared: &Arc<Shared>,
    addr: SocketAddrV4,
    backlog: u32,
    events: Arc<dyn ListenerEvents>,
) -> Result<Arc<dyn Listener>, FabricError> {
    let ips: Vec<Ipv4Addr> = if addr.ip().is_unspecified() {
        // Not INADDR_ANY: that would also listen on other devices (and
        // collide with other NICs of this process on the same port).
        shared.addresses.clone()
    } else if shared.owns(*addr.ip()) {
        vec![*addr.ip()]
    } else {
        return Err(FabricError::AddressNotAvailable);
    };
    let token = shared.tokens.fresh();
    let mut port = addr.port();
    let mut ids = Vec::new();
    for ip in ips {
        let id = OwnedId::create(shared, token).map_err(bind_error)?;
        id.bind(SocketAddrV4::new(ip, port)).map_err(bind_error)?;
        if port == 0 {
            // SAFETY: live, bound id.
            port = u16::from_be(unsafe { rdma_get_src_port(id.get()) });
        }
        // SAFETY: live, bound id.
        if unsafe { rdma_listen(id.get(), KERNEL_BACKLOG) } != 0 {
            return Err(bind_error(errno()));
        }
        ids.push(id);
    }
    let l = Arc::new(VerbsListener {
        shared: shared.clone(),
        token,
        ids: Mutex::new(ids),
        backlog: backlog.max(1) as usize,
        events,
        queue: Mutex::new(VecDeque::new()),
        closed: AtomicBool::new(false),
    });
    shared
        .tokens
        .insert(token, CmTarget::Listener(Arc::downgrade(&l)));
    Ok(l)
}

impl VerbsListener {
    fn unqueue(&self, r: &VerbsRequest) {
        lock(&self.queue).retain(|x| !std::ptr::eq(&**x, r));
    }

    /// Forgets queued requests whose connector gave up (see
    /// [`VerbsRequest::connector_waiting`]). Probes outside the queue lock:
    /// the request's id lock comes first (as in `accept`).
    fn prune(&self) {
        let queued: Vec<_> = lock(&self.queue).iter().cloned().collect();
        for r in queued {
            if !r.connector_waiting() {
                r.on_gone();
            }
        }
    }
}

impl Listener for VerbsListener {
    fn peek(&self) -> Option<Arc<dyn ConnRequest>> {
        loop {
            let r = lock(&self.queue).front()?.clone();
            if r.connector_waiting() {
                return Some(r);
            }
            r.on_gone();
        }
    }

    fn pending(&self) -> usize {
        self.prune();
        lock(&self.queue).len()
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let ids = std::mem::take(&mut *lock(&self.ids));
        drop(ids);
        self.shared.tokens.remove(self.token);
        let queued: Vec<_> = lock(&self.queue).drain(..).collect();
        for r in queued {
            r.reject();
        }
    }
}

impl Drop for VerbsListener {
    fn drop(&mut self) {
        self.close();
    }
}

// ---------------------------------------------------------------- request --

/// An incoming connection request waiting in a listener's backlog.
pub struct VerbsRequest {
    shared: Arc<Shared>,
    token: u64,
    /// The request's id until it is accepted (moves to the QP), rejected or
    /// the connector leaves (destroyed).
    id: Mutex<Option<OwnedId>>,
    listener: Weak<VerbsListener>,
    local: SocketAddrV4,
    peer: SocketAddrV4,
    /// From the request: the connector's RDMA read depths.
    initiator_depth: u8,
    responder_resources: u8,
    /// From the request: the connector's private data (as the CM delivered
    /// it, zero-padded to its unit).
    private_data: Vec<u8>,
}

impl VerbsRequest {
    fn unqueue(&self) {
        if let Some(l) = self.listener.upgrade() {
            l.unqueue(self);
        }
        self.shared.tokens.remove_pending(self.token);
    }

    /// Whether the connector still waits for our answer. The kernel's ucma
    /// drops every event of a connection request until userspace accepted
    /// it (the accept "will just fail later"), so a connector that gave up
    /// (destroyed its id: its CM sent a reject) is never reported. It shows
    /// here: the request's CM state left REQ_RCVD, and the queue-pair
    /// attributes for the connection can no longer be computed.
    fn connector_waiting(&self) -> bool {
        let slot = lock(&self.id);
        let Some(id) = slot.as_ref() else {
            return false;
        };
        // SAFETY: ibv_qp_attr is plain data; all-zero is valid.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        let mut mask = 0;
        // SAFETY: live id of an unanswered request (held under its lock);
        // attr and mask are written during the call only.
        unsafe { rdma_init_qp_attr(id.get(), &mut attr, &mut mask) == 0 }
    }

    /// The connector left before we answered.
    fn on_gone(&self) {
        let id = lock(&self.id).take();
        drop(id);
        self.unqueue();
    }
}

impl ConnRequest for VerbsRequest {
    fn peer_addr(&self) -> SocketAddrV4 {
        self.peer
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    fn private_data(&self) -> &[u8] {
        &self.private_data
    }

    fn accept(&self, params: QpParams) -> Result<Arc<dyn QueuePair>, ConnectError> {
        if !self.connector_waiting() {
            self.on_gone();
            return Err(ConnectError::Cancelled);
        }
        let mut slot = lock(&self.id);
        let Some(id) = slot.take() else {
            return Err(ConnectError::Cancelled);
        };
        let shared = &self.shared;
        id.set_ack_timeout(shared.cfg.ack_timeout);
        // On failure the id is destroyed, which refuses the connector.
        let qp = match VerbsQp::create(shared, id, self.token, &params) {
            Ok(q) => q,
            Err(_) => {
                drop(slot);
                self.unqueue();
                return Err(ConnectError::NoResources);
            }
        };
        // Route the connection's later events to the QP before accepting.
        shared
            .tokens
            .insert(self.token, CmTarget::Qp(Arc::downgrade(&qp)));
        let rd = shared.caps.rd_atom;
        // SAFETY: rdma_conn_param is plain data.
        let mut p: rdma_conn_param = unsafe { std::mem::zeroed() };
        p.responder_resources = rd.min(self.initiator_depth);
        p.initiator_depth = rd.min(self.responder_resources);
        p.retry_count = shared.cfg.retry_count.min(7);
        p.rnr_retry_count = shared.cfg.rnr_retry.min(7);
        // SAFETY: live id with its QP; p is read during the call.
        let rc = unsafe { rdma_accept(qp.id().get(), &mut p) };
        drop(slot);
        if let Some(l) = self.listener.upgrade() {
            l.unqueue(self);
        }
        if rc != 0 {
            // The connector is gone: dropping the QP destroys the id.
            return Err(ConnectError::Cancelled);
        }
        qp.tune();
        Ok(qp)
    }

    fn reject(&self) {
        let id = lock(&self.id).take();
        if let Some(id) = id {
            // SAFETY: live id of a connection request not yet answered.
            unsafe { rdma_reject(id.get(), std::ptr::null(), 0) };
        }
        self.unqueue();
    }
}

impl Drop for VerbsRequest {
    fn drop(&mut self) {
        if let Some(id) = lock(&self.id).take() {
            // SAFETY: as in reject.
            unsafe { rdma_reject(id.get(), std::ptr::null(), 0) };
        }
        self.shared.tokens.remove_pending(self.token);
    }
}

// ---------------------------------------------------------------- connect --

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Address, then route resolution, then connection in progress.
    Running,
    /// Completed, failed or cancelled: nothing more happens.
    Done,
}

struct AttemptState {
    phase: Phase,
    /// The id until the QP is created on it (which then owns it).
    id: Option<OwnedId>,
    qp: Option<Arc<VerbsQp>>,
    done: Option<ConnectDone>,
    /// Once the connection request is sent: when the attempt fails
    /// `TimedOut` if the peer has not answered (the CM thread enforces it).
    /// rdma_cm's own request retries last minutes; a host with no RDMA CM
    /// (reachable only over TCP/IP) never answers.
    deadline: Option<Instant>,
}

/// An outgoing connection attempt.
pub(crate) struct Attempt {
    shared: Arc<Shared>,
    token: u64,
    params: QpParams,
    /// Sent with the connection request (at most `MAX_PRIVATE_DATA` bytes).
    private_data: Vec<u8>,
    /// Serialises the CM thread's steps with `cancel`.
    state: Mutex<AttemptState>,
}

fn connect_errno(e: i32) -> ConnectError {
    match e {
        libc::ENETUNREACH | libc::EADDRNOTAVAIL | libc::ENODEV => ConnectError::NetUnreachable,
        libc::EHOSTUNREACH => ConnectError::HostUnreachable,
        libc::ETIMEDOUT => ConnectError::TimedOut,
        libc::ECONNREFUSED => ConnectError::Refused,
        _ => ConnectError::NoResources,
    }
}

pub(crate) fn connect(
    shared: &Arc<Shared>,
    local: SocketAddrV4,
    remote: SocketAddrV4,
    params: QpParams,
    private_data: &[u8],
    done: ConnectDone,
) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
    if shared.cq(params.cq).is_none() || private_data.len() > MAX_PRIVATE_DATA {
        return Err(ConnectError::NoResources);
    }
    if !local.ip().is_unspecified() && !shared.owns(*local.ip()) {
        return Err(ConnectError::NetUnreachable);
    }
    let token = shared.tokens.fresh();
    let id = OwnedId::create(shared, token).map_err(|_| ConnectError::NoResources)?;
    id.set_ack_timeout(shared.cfg.ack_timeout);
    if local.port() != 0 {
        id.bind(local).map_err(|_| ConnectError::NoResources)?;
    }
    let a = Arc::new(Attempt {
        shared: shared.clone(),
        token,
        params,
        private_data: private_data.to_vec(),
        state: Mutex::new(AttemptState {
            phase: Phase::Running,
            id: Some(id),
            qp: None,
            done: Some(done),
            deadline: None,
        }),
    });
    // Registered before resolution starts so that its first event finds it;
    // the state lock holds the CM thread back until the call returned.
    let st = lock(&a.state);
    shared.tokens.insert(token, CmTarget::Attempt(a.clone()));
    let mut src = sockaddr_in(local);
    let mut dst = sockaddr_in(remote);
    let timeout = shared.cfg.connect_timeout.as_millis().clamp(1, 60_000) as i32;
    let id = st.id.as_ref().map_or(std::ptr::null_mut(), OwnedId::get);
    let src_ptr: *mut libc::sockaddr = if local.ip().is_unspecified() || local.port() != 0 {
        std::ptr::null_mut() // unbound: any; bound: already bound above
    } else {
        (&mut src as *mut libc::sockaddr_in).cast()
    };
    // SAFETY: live id; the addresses are read during the call.
    let rc = unsafe {
        rdma_resolve_addr(
            id,
            src_ptr,
            (&mut dst as *mut libc::sockaddr_in).cast(),
            timeout,
        )
    };
    if rc != 0 {
        let e = connect_errno(errno());
        drop(st);
        shared.tokens.remove_pending(token);
        // The callback is not called for an error returned directly.
        lock(&a.state).done = None;
        a.finish(Err(e));
        return Err(e);
    }
    drop(st);
    Ok(a)
}

impl Attempt {
    /// Ends the attempt (once): reports `r` unless cancelled, releases the
    /// id or QP on failure.
    fn finish(&self, r: Result<Arc<VerbsQp>, ConnectError>) {
        let mut st = lock(&self.state);
        if st.phase == Phase::Done {
            return;
        }
        st.phase = Phase::Done;
        let done = st.done.take();
        let qp = st.qp.take();
        let id = st.id.take();
        drop(st);
        if r.is_err() {
            self.shared.tokens.remove_pending(self.token);
        }
        drop(qp); // failure: destroys QP and id; success: r holds the QP
        drop(id);
        if let Some(cb) = done {
            cb(r.map(|q| q as Arc<dyn QueuePair>));
        }
    }

    fn on_event(&self, e: &Event) {
        use rdma_cm_event_type::*;
        let shared = &self.shared;
        let mut st = lock(&self.state);
        if st.phase == Phase::Done {
            return;
        }
        let fail = match e.kind {
            RDMA_CM_EVENT_ADDR_RESOLVED => {
                let id = st.id.as_ref().map_or(std::ptr::null_mut(), OwnedId::get);
                let timeout = shared.cfg.connect_timeout.as_millis().clamp(1, 60_000) as i32;
                // SAFETY: live id with a resolved address.
                if unsafe { rdma_resolve_route(id, timeout) } == 0 {
                    return;
                }
                connect_errno(errno())
            }
            RDMA_CM_EVENT_ROUTE_RESOLVED => {
                let Some(id) = st.id.take() else { return };
                // SAFETY: live id with a resolved route.
                if unsafe { (*id.get()).verbs } != shared.ctx.get() {
                    // The route leaves through another device than ours.
                    drop(st);
                    drop(id);
                    self.finish(Err(ConnectError::NetUnreachable));
                    return;
                }
                match VerbsQp::create(shared, id, self.token, &self.params) {
                    Ok(qp) => {
                        let rd = shared.caps.rd_atom;
                        // SAFETY: rdma_conn_param is plain data.
                        let mut p: rdma_conn_param = unsafe { std::mem::zeroed() };
                        p.responder_resources = rd;
                        p.initiator_depth = rd;
                        p.retry_count = shared.cfg.retry_count.min(7);
                        p.rnr_retry_count = shared.cfg.rnr_retry.min(7);
                        if !self.private_data.is_empty() {
                            p.private_data = self.private_data.as_ptr().cast();
                            // At most MAX_PRIVATE_DATA (checked in connect).
                            p.private_data_len = self.private_data.len() as u8;
                        }
                        // SAFETY: live id with its QP; p (and the private
                        // data it points to, owned by self) read during the
                        // call.
                        let rc = unsafe { rdma_connect(qp.id().get(), &mut p) };
                        st.qp = Some(qp);
                        if rc == 0 {
                            st.deadline = Some(Instant::now() + shared.cfg.connect_timeout);
                            return;
                        }
                        connect_errno(errno())
                    }
                    Err(_) => ConnectError::NoResources,
                }
            }
            RDMA_CM_EVENT_ESTABLISHED => {
                let Some(qp) = st.qp.clone() else { return };
                drop(st);
                qp.on_established();
                qp.tune();
                shared
                    .tokens
                    .insert(self.token, CmTarget::Qp(Arc::downgrade(&qp)));
                self.finish(Ok(qp));
                return;
            }
            RDMA_CM_EVENT_ADDR_ERROR => {
                if e.status == -libc::ENETUNREACH {
                    ConnectError::NetUnreachable
                } else {
                    ConnectError::HostUnreachable
                }
            }
            RDMA_CM_EVENT_ROUTE_ERROR => ConnectError::NetUnreachable,
            RDMA_CM_EVENT_UNREACHABLE => {
                if e.status == -libc::ETIMEDOUT {
                    ConnectError::TimedOut
                } else {
                    ConnectError::HostUnreachable
                }
            }
            RDMA_CM_EVENT_REJECTED if e.status == REJ_INVALID_SERVICE_ID => {
                ConnectError::NoListener
            }
            RDMA_CM_EVENT_REJECTED | RDMA_CM_EVENT_CONNECT_ERROR => ConnectError::Refused,
            RDMA_CM_EVENT_DISCONNECTED | RDMA_CM_EVENT_DEVICE_REMOVAL => {
                ConnectError::HostUnreachable
            }
            _ => return,
        };
        drop(st);
        self.finish(Err(fail));
    }
}

impl ConnectAttempt for Attempt {
    fn cancel(&self) -> bool {
        let mut st = lock(&self.state);
        if st.phase == Phase::Done {
            return false;
        }
        st.phase = Phase::Done;
        let (done, qp, id) = (st.done.take(), st.qp.take(), st.id.take());
        drop(st);
        self.shared.tokens.remove_pending(self.token);
        // Destroying the id (with the QP) makes the remote side see a
        // reject or, if it already accepted, a disconnect.
        drop(qp);
        drop(id);
        drop(done);
        true
    }
}

// ---------------------------------------------------------------- thread --

/// What the CM thread keeps of an event (copied before acknowledging it).
struct Event {
    kind: rdma_cm_event_type::Type,
    status: i32,
    id: Raw<rdma_cm_id>,
    token: u64,
    initiator_depth: u8,
    responder_resources: u8,
    /// A connect request's private data (empty for other events).
    private_data: Vec<u8>,
}

/// Fails the attempts whose connection request went unanswered past their
/// deadline; returns the time until the next deadline, if any.
fn expire_attempts(shared: &Shared) -> Option<Duration> {
    let now = Instant::now();
    let mut next: Option<Duration> = None;
    for a in shared.tokens.attempts() {
        let deadline = lock(&a.state).deadline;
        match deadline {
            Some(d) if d <= now => a.finish(Err(ConnectError::TimedOut)),
            Some(d) => next = Some(next.map_or(d - now, |n| n.min(d - now))),
            None => {}
        }
    }
    next
}

/// The CM thread: see the module docs.
pub(crate) fn run(shared: Arc<Shared>, stop: Arc<OwnedFd>) {
    let ch = shared.cm_channel.get();
    // SAFETY: the channel lives as long as `shared`.
    let fd = unsafe { (*ch).fd };
    while wait_readable_for(fd, &stop, expire_attempts(&shared)) {
        loop {
            let mut ev: *mut rdma_cm_event = std::ptr::null_mut();
            // SAFETY: valid channel; non-blocking fd: -1/EAGAIN when empty.
            if unsafe { rdma_get_cm_event(ch, &mut ev) } != 0 {
                break;
            }
            // SAFETY: a reported event and its id are valid until acked; the
            // conn parameters are plain data read for connect requests only,
            // whose private data (`private_data_len` bytes) librdmacm keeps
            // with the event until it is acked.
            let e = unsafe {
                let r = &*ev;
                Event {
                    kind: r.event,
                    status: r.status,
                    id: Raw(r.id),
                    token: (*r.id).context as usize as u64,
                    initiator_depth: r.param.conn.initiator_depth,
                    responder_resources: r.param.conn.responder_resources,
                    private_data: if r.event == rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST
                        && !r.param.conn.private_data.is_null()
                    {
                        std::slice::from_raw_parts(
                            r.param.conn.private_data.cast::<u8>(),
                            usize::from(r.param.conn.private_data_len),
                        )
                        .to_vec()
                    } else {
                        Vec::new()
                    },
                }
            };
            // SAFETY: acknowledges the event we got, once.
            unsafe { rdma_ack_cm_event(ev) };
            if super::trace() {
                // SAFETY: rdma_event_str returns a static NUL-terminated string.
                let name = unsafe { std::ffi::CStr::from_ptr(rdma_event_str(e.kind)) };
                eprintln!(
                    "sanpath verbs {}: {} status {} token {}",
                    shared.name,
                    name.to_string_lossy(),
                    e.status,
                    e.token
                );
            }
            // A panicking callback must not take the NIC's connection
            // management down with it.
            let step = std::panic::AssertUnwindSafe(|| dispatch(&shared, e));
            if std::panic::catch_unwind(step).is_err() {
                eprintln!(
                    "sanpath verbs {}: a connection callback panicked",
                    shared.name
                );
            }
        }
    }
}

fn dispatch(shared: &Arc<Shared>, e: Event) {
    use rdma_cm_event_type::*;
    if e.kind == RDMA_CM_EVENT_CONNECT_REQUEST {
        on_request(shared, e);
        return;
    }
    match shared.tokens.get(e.token) {
        Some(Target::Attempt(a)) => a.on_event(&e),
        Some(Target::Qp(q)) => match e.kind {
            RDMA_CM_EVENT_ESTABLISHED => q.on_established(),
            RDMA_CM_EVENT_DISCONNECTED
            | RDMA_CM_EVENT_CONNECT_ERROR
            | RDMA_CM_EVENT_UNREACHABLE
            | RDMA_CM_EVENT_REJECTED
            | RDMA_CM_EVENT_DEVICE_REMOVAL => q.on_disconnected(),
            _ => {}
        },
        Some(Target::Request(r)) => match e.kind {
            RDMA_CM_EVENT_DISCONNECTED
            | RDMA_CM_EVENT_CONNECT_ERROR
            | RDMA_CM_EVENT_UNREACHABLE
            | RDMA_CM_EVENT_REJECTED
            | RDMA_CM_EVENT_DEVICE_REMOVAL => r.on_gone(),
            _ => {}
        },
        Some(Target::Listener(_)) | None => {}
    }
}

/// `RDMA_CM_EVENT_CONNECT_REQUEST`: `e.id` is a new id (ours now) whose
/// context is still the listener's token.
fn on_request(shared: &Arc<Shared>, e: Event) {
    // SAFETY: a connection request's event carries a new id that belongs
    // to whoever handles the event: this function, once.
    let id = unsafe { OwnedId::adopt(e.id) };
    let listener = match shared.tokens.get(e.token) {
        Some(Target::Listener(l)) if !l.closed.load(Ordering::Acquire) => Some(l),
        _ => None,
    };
    // SAFETY: live id of the request.
    let ours = unsafe { (*id.get()).verbs } == shared.ctx.get();
    let Some(l) = listener.filter(|_| ours) else {
        // SAFETY: live id of an unanswered request; destroyed right after.
        unsafe { rdma_reject(id.get(), std::ptr::null(), 0) };
        return;
    };
    let mut q = lock(&l.queue);
    if q.len() >= l.backlog {
        drop(q);
        // SAFETY: as above (backlog full: refused without an event).
        unsafe { rdma_reject(id.get(), std::ptr::null(), 0) };
        return;
    }
    let token = shared.tokens.fresh();
    // SAFETY: we own the id; only this thread reads contexts, and no event
    // of this id is being processed now.
    unsafe { (*id.get()).context = token as usize as *mut _ };
    // SAFETY: live id; librdmacm filled its route for the request.
    let (local, peer) = unsafe { id.addresses() };
    let r = Arc::new(VerbsRequest {
        shared: shared.clone(),
        token,
        id: Mutex::new(Some(id)),
        listener: Arc::downgrade(&l),
        local,
        peer,
        initiator_depth: e.initiator_depth,
        responder_resources: e.responder_resources,
        private_data: e.private_data,
    });
    shared
        .tokens
        .insert(token, CmTarget::Request(Arc::downgrade(&r)));
    q.push_back(r);
    drop(q);
    l.events.request_arrived();
}
