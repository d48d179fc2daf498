//! Connection management: listeners with a FIFO backlog, connection
//! requests (accept / reject / cancel), timed-out attempts toward TCP-only
//! hosts, and the creation of the two queue pairs of a new connection.
//!
//! A request leaves the `Pending` state exactly once, under its listener's
//! backlog lock and then its own state lock, and is removed from the backlog
//! in the same critical section; whoever makes that transition (accept,
//! reject, cancel, listener close) owns the connector's `done` callback and
//! calls it — or, for cancel, drops it — after releasing every lock.

use super::link::{EndParams, Link};
use super::qp::SoftQp;
use super::{lock, NicShared, MAX_SGE_LIMIT};
use crate::fabric::*;
use std::collections::VecDeque;
use std::net::SocketAddrV4;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Most scatter/gather entries preallocated for one queue of one end.
const MAX_RING_SGES: usize = 1 << 22;

/// The queue of a listener.
pub(super) struct Backlog {
    /// Pending requests, oldest first; every one is in state `Pending`.
    pub(super) reqs: VecDeque<Arc<Request>>,
    /// Set once by `close`; no request is queued afterwards.
    pub(super) closed: bool,
}

pub(super) struct ListenerShared {
    /// The NIC listening (weak: the NIC's listener table points here).
    pub(super) nic: Weak<NicShared>,
    pub(super) addr: SocketAddrV4,
    /// Most pending requests (at least 1).
    pub(super) backlog: usize,
    /// Lock order: after the NIC's listener table, before request states.
    pub(super) queue: Mutex<Backlog>,
    pub(super) events: Arc<dyn ListenerEvents>,
}

impl ListenerShared {
    fn close(self: &Arc<Self>) {
        if let Some(nic) = self.nic.upgrade() {
            nic.unlisten(self);
        }
        let mut done = Vec::new();
        {
            let mut q = lock(&self.queue);
            q.closed = true;
            for r in q.reqs.drain(..) {
                if let Some((_, d)) = r.leave_pending() {
                    done.push(d);
                }
            }
        }
        for d in done {
            d(Err(ConnectError::Refused));
        }
    }
}

/// The listener handed out; dropping it closes.
pub(super) struct SoftListener(pub(super) Arc<ListenerShared>);

impl Listener for SoftListener {
    fn peek(&self) -> Option<Arc<dyn ConnRequest>> {
        let q = lock(&self.0.queue);
        q.reqs.front().map(|r| r.clone() as Arc<dyn ConnRequest>)
    }

    fn pending(&self) -> usize {
        lock(&self.0.queue).reqs.len()
    }

    fn close(&self) {
        self.0.close();
    }
}

impl Drop for SoftListener {
    fn drop(&mut self) {
        self.0.close();
    }
}

enum ReqState {
    Pending {
        params: QpParams,
        done: ConnectDone,
    },
    /// Accepted, rejected, refused or cancelled.
    Finished,
}

/// An incoming connection request; also the connector's attempt handle.
pub(super) struct Request {
    /// The connecting NIC (weak: requests sit in the listener's NIC).
    connector: Weak<NicShared>,
    /// The listening NIC.
    acceptor: Weak<NicShared>,
    listener: Weak<ListenerShared>,
    from: SocketAddrV4,
    to: SocketAddrV4,
    /// The connector's private data.
    private_data: Vec<u8>,
    /// Written only by `leave_pending`, under the backlog lock.
    state: Mutex<ReqState>,
}

impl Request {
    /// Leaves `Pending` (the caller holds the backlog lock if the request
    /// may still be queued); returns the connector's parameters and callback
    /// if this call made the transition.
    fn leave_pending(&self) -> Option<(QpParams, ConnectDone)> {
        match std::mem::replace(&mut *lock(&self.state), ReqState::Finished) {
            ReqState::Pending { params, done } => Some((params, done)),
            ReqState::Finished => None,
        }
    }

    /// Takes the request out of its backlog and out of `Pending`.
    fn take(&self) -> Option<(QpParams, ConnectDone)> {
        match self.listener.upgrade() {
            Some(l) => {
                let mut q = lock(&l.queue);
                let taken = self.leave_pending();
                if taken.is_some() {
                    q.reqs.retain(|r| !std::ptr::eq(Arc::as_ptr(r), self));
                }
                taken
            }
            // A listener that is gone was closed: every request is finished.
            None => self.leave_pending(),
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
        &self.private_data
    }

    /// `Err(Cancelled)` also when the request was already accepted, rejected
    /// or refused: it is gone either way.
    fn accept(&self, params: QpParams) -> Result<Arc<dyn QueuePair>, ConnectError> {
        let (cparams, done) = self.take().ok_or(ConnectError::Cancelled)?;
        let made = match (self.connector.upgrade(), self.acceptor.upgrade()) {
            (Some(c), Some(a)) => make_link(&c, cparams, &a, params, self.from, self.to),
            _ => Err(ConnectError::NoResources),
        };
        match made {
            Ok((cqp, aqp)) => {
                done(Ok(cqp));
                Ok(aqp)
            }
            Err(e) => {
                done(Err(e));
                Err(e)
            }
        }
    }

    fn reject(&self) {
        if let Some((_, done)) = self.take() {
            done(Err(ConnectError::Refused));
        }
    }
}

impl ConnectAttempt for Request {
    fn cancel(&self) -> bool {
        // The callback is dropped unrun.
        self.take().is_some()
    }
}

/// Queues a request from `from` at listener `l` of NIC `acceptor`; the
/// request is also the connector's attempt.
#[allow(clippy::too_many_arguments)]
pub(super) fn queue_request(
    connector: &Arc<NicShared>,
    acceptor: &Arc<NicShared>,
    l: &Arc<ListenerShared>,
    from: SocketAddrV4,
    to: SocketAddrV4,
    params: QpParams,
    private_data: &[u8],
    done: ConnectDone,
) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
    let req = Arc::new(Request {
        connector: Arc::downgrade(connector),
        acceptor: Arc::downgrade(acceptor),
        listener: Arc::downgrade(l),
        from,
        to,
        private_data: private_data.to_vec(),
        state: Mutex::new(ReqState::Pending { params, done }),
    });
    {
        let mut q = lock(&l.queue);
        if q.closed || q.reqs.len() >= l.backlog {
            // `done` is dropped with `req`, never called.
            return Err(ConnectError::Refused);
        }
        q.reqs.push_back(req.clone());
    }
    l.events.request_arrived();
    Ok(req)
}

/// An attempt toward a host that never answers on the SAN: a thread fails
/// it with `TimedOut` at the deadline unless it is cancelled first.
struct TimerAttempt {
    shared: Arc<TimerShared>,
}

struct TimerShared {
    /// Set once, by the timer (timed out) or by `cancel`.
    finished: Mutex<bool>,
    /// Signalled by `cancel` so the thread exits at once.
    cv: Condvar,
}

impl ConnectAttempt for TimerAttempt {
    fn cancel(&self) -> bool {
        let mut finished = lock(&self.shared.finished);
        if *finished {
            return false;
        }
        *finished = true;
        self.shared.cv.notify_all();
        true
    }
}

pub(super) fn start_timer(
    timeout: Duration,
    done: ConnectDone,
) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
    let shared = Arc::new(TimerShared {
        finished: Mutex::new(false),
        cv: Condvar::new(),
    });
    let s = shared.clone();
    let deadline = Instant::now() + timeout;
    std::thread::Builder::new()
        .name("soft-cm-timer".into())
        .spawn(move || {
            let mut finished = lock(&s.finished);
            loop {
                if *finished {
                    return; // cancelled: `done` is dropped unrun
                }
                let now = Instant::now();
                if now >= deadline {
                    *finished = true;
                    drop(finished);
                    done(Err(ConnectError::TimedOut));
                    return;
                }
                finished =
                    s.cv.wait_timeout(finished, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
            }
        })
        .map_err(|_| ConnectError::NoResources)?;
    Ok(Arc::new(TimerAttempt { shared }))
}

/// The connector's and the acceptor's queue pairs of a new connection.
type QpPair = (Arc<dyn QueuePair>, Arc<dyn QueuePair>);

/// Checks one end's parameters against the limits of the preallocated
/// queues.
fn check_limits(p: &QpParams) -> Result<(), ConnectError> {
    let sges = |depth: u32| (depth as usize).checked_mul(p.max_sge as usize);
    let fits = |n: Option<usize>| n.is_some_and(|n| n <= MAX_RING_SGES);
    if p.max_sge > MAX_SGE_LIMIT || !fits(sges(p.send_depth)) || !fits(sges(p.recv_depth)) {
        return Err(ConnectError::NoResources);
    }
    Ok(())
}

/// Creates both ends: reserves CQ room, numbers the queue pairs and
/// preallocates every queue (no allocation per work request afterwards).
pub(super) fn make_link(
    cnic: &Arc<NicShared>,
    cparams: QpParams,
    anic: &Arc<NicShared>,
    aparams: QpParams,
    from: SocketAddrV4,
    to: SocketAddrV4,
) -> Result<QpPair, ConnectError> {
    check_limits(&cparams)?;
    check_limits(&aparams)?;
    let ccq = cnic.cq(cparams.cq).ok_or(ConnectError::NoResources)?;
    let acq = anic.cq(aparams.cq).ok_or(ConnectError::NoResources)?;
    let need = |p: &QpParams| p.send_depth as usize + p.recv_depth as usize;
    let (cneed, aneed) = (need(&cparams), need(&aparams));
    if !ccq.shared().budget.reserve(cneed) {
        return Err(ConnectError::NoResources);
    }
    if !acq.shared().budget.reserve(aneed) {
        ccq.shared().budget.release(cneed);
        return Err(ConnectError::NoResources);
    }
    let end = |p: &QpParams, nic: &NicShared, reserved: usize| EndParams {
        send_depth: p.send_depth as usize,
        recv_depth: p.recv_depth as usize,
        max_sge: p.max_sge as usize,
        rnr_max: nic.rnr_max as u64,
        reserved,
    };
    let nums = [cnic.new_qp_num(), anic.new_qp_num()];
    let (link, reapers) = Link::new(
        [end(&cparams, cnic, cneed), end(&aparams, anic, aneed)],
        [ccq.shared().clone(), acq.shared().clone()],
        [cnic.clone(), anic.clone()],
        nums,
        [from, to],
        [cparams.events.clone(), aparams.events.clone()],
    );
    for (i, (cq, r)) in [&ccq, &acq].into_iter().zip(reapers).enumerate() {
        cq.attach(&link, i, r);
    }
    cnic.register_qp(nums[0], &link, 0);
    anic.register_qp(nums[1], &link, 1);
    #[cfg(feature = "fault-injection")]
    {
        cnic.track_link(&link);
        if !Arc::ptr_eq(cnic, anic) {
            anic.track_link(&link);
        }
    }
    let c: Arc<dyn QueuePair> = Arc::new(SoftQp {
        link: link.clone(),
        end: 0,
    });
    let a: Arc<dyn QueuePair> = Arc::new(SoftQp { link, end: 1 });
    Ok((c, a))
}
