//! Tests of the soft NIC through the `Nic` trait only. Every blocking wait
//! has a timeout that fails the test; nothing sleeps to synchronise.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};

const WAIT: Duration = Duration::from_secs(10);

/// Counts calls and signals each one on a channel; a waker, QP-event and
/// listener-event sink at once.
struct Probe {
    calls: AtomicUsize,
    tx: Mutex<Sender<()>>,
}

impl Probe {
    fn new() -> (Arc<Probe>, Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let p = Arc::new(Probe {
            calls: AtomicUsize::new(0),
            tx: Mutex::new(tx),
        });
        (p, rx)
    }
    fn hit(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _ = lock(&self.tx).send(());
    }
    fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Waker for Probe {
    fn wake(&self) {
        self.hit();
    }
}
impl QpEvents for Probe {
    fn disconnected(&self) {
        self.hit();
    }
}
impl ListenerEvents for Probe {
    fn request_arrived(&self) {
        self.hit();
    }
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn nic_on(net: &Arc<SoftNetwork>, addr: Ipv4Addr, rnr: u32) -> Arc<SoftNic> {
    net.attach(SoftNicConfig {
        addresses: vec![addr],
        prefix_len: 24,
        connect_timeout: Duration::from_millis(50),
        rnr_queue_max: rnr,
    })
    .unwrap()
}

/// One end of a test connection.
struct End {
    qp: Arc<dyn QueuePair>,
    cq: Arc<dyn CompletionQueue>,
    events: Arc<Probe>,
}

impl End {
    fn poll(&self) -> Vec<WorkCompletion> {
        let mut out = [WorkCompletion::EMPTY; 64];
        let n = self.cq.poll(&mut out);
        out[..n].to_vec()
    }

    /// Polls until completions come (fails after [`WAIT`]): a sender
    /// learns that the peer took its message from the peer's consumed
    /// index, which it reads after `link::ACK_AFTER` polls or a few
    /// microseconds, so how many polls that takes depends on their speed.
    fn poll_some(&self) -> Vec<WorkCompletion> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let got = self.poll();
            if !got.is_empty() {
                return got;
            }
            assert!(std::time::Instant::now() < deadline, "no completion");
        }
    }
}

fn params(cq: &Arc<dyn CompletionQueue>, events: &Arc<Probe>, depth: u32) -> QpParams {
    QpParams {
        cq: cq.id(),
        send_depth: depth,
        recv_depth: depth,
        max_sge: 4,
        events: events.clone(),
    }
}

/// Connects `a` to a listener of `b` at `to`: (connector end, acceptor end).
fn pair(a: &SoftNic, b: &SoftNic, to: SocketAddrV4) -> (End, End) {
    let (lev, lrx) = Probe::new();
    let l = b.listen(to, 4, lev.clone()).unwrap();
    let acq = a.create_cq(256, Probe::new().0).unwrap();
    let bcq = b.create_cq(256, Probe::new().0).unwrap();
    let (aev, bev) = (Probe::new().0, Probe::new().0);
    let (tx, rx) = mpsc::channel();
    let from = sa(a.addresses()[0], 40000 + to.port());
    a.connect(
        from,
        to,
        params(&acq, &aev, 8),
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    lrx.recv_timeout(WAIT).expect("request_arrived");
    assert_eq!(l.pending(), 1);
    let req = l.peek().unwrap();
    assert_eq!(req.peer_addr(), from);
    assert_eq!(req.local_addr(), to);
    let bqp = req.accept(params(&bcq, &bev, 8)).unwrap();
    let aqp = rx.recv_timeout(WAIT).expect("done").unwrap();
    assert_eq!(l.pending(), 0);
    assert!(l.peek().is_none());
    assert_eq!((aqp.local_addr(), aqp.peer_addr()), (from, to));
    assert_eq!((bqp.local_addr(), bqp.peer_addr()), (to, from));
    (
        End {
            qp: aqp,
            cq: acq,
            events: aev,
        },
        End {
            qp: bqp,
            cq: bcq,
            events: bev,
        },
    )
}

/// A heap buffer registered with a NIC. After registration every access
/// (the NIC's and the test's writes) goes through `ptr`.
struct Buf {
    mem: Vec<u8>,
    ptr: *mut u8,
    lkey: u32,
}

// SAFETY: `Buf` owns its heap buffer and `ptr` points into it; the tests
// order every access through `ptr` with the completions of the requests
// naming the buffer.
unsafe impl Send for Buf {}
// SAFETY: as for `Send`.
unsafe impl Sync for Buf {}

impl Buf {
    fn with(nic: &SoftNic, len: usize, access: Access, fill: impl Fn(usize) -> u8) -> Buf {
        let mut mem: Vec<u8> = (0..len).map(fill).collect();
        let ptr = mem.as_mut_ptr();
        // SAFETY: `mem` lives as long as the `Buf`, which every test keeps
        // until its NIC use is over, and is not touched while a request
        // naming it is outstanding.
        let keys = unsafe { nic.register(ptr as usize, len, access) }.unwrap();
        Buf {
            mem,
            ptr,
            lkey: keys.lkey,
        }
    }
    fn new(nic: &SoftNic, len: usize, access: Access) -> Buf {
        Buf::with(nic, len, access, |i| (i * 7 + 3) as u8)
    }
    fn zeroed(nic: &SoftNic, len: usize, access: Access) -> Buf {
        Buf::with(nic, len, access, |_| 0)
    }
    fn sge(&self, off: usize, len: u32) -> Sge {
        assert!(off + len as usize <= self.mem.len());
        Sge {
            addr: self.ptr as usize + off,
            len,
            lkey: self.lkey,
        }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

fn send(qp: &Arc<dyn QueuePair>, wr_id: WrId, sges: &[Sge]) {
    qp.post_send(&SendWr {
        wr_id,
        op: SendOp::Send,
        sges,
    })
    .unwrap();
}

fn recv(qp: &Arc<dyn QueuePair>, wr_id: WrId, sges: &[Sge]) {
    qp.post_recv(&RecvWr { wr_id, sges }).unwrap();
}

fn statuses(wcs: &[WorkCompletion]) -> Vec<(WrId, WcStatus)> {
    wcs.iter().map(|w| (w.wr_id, w.status)).collect()
}

#[test]
fn loopback_on_one_nic_and_across_two_nics() {
    let net = SoftNetwork::new();
    let n1 = nic_on(&net, ip(198, 18, 1, 1), 4);
    let n2 = nic_on(&net, ip(198, 18, 1, 2), 4);
    let (a, b) = pair(&n1, &n1, sa(ip(198, 18, 1, 1), 1));
    assert_ne!(a.qp.num(), b.qp.num());
    let (c, d) = pair(&n1, &n2, sa(ip(198, 18, 1, 2), 2));
    assert_eq!(n1.stats().live_qps, 3);
    assert_eq!(n2.stats().live_qps, 1);
    // Data moves both ways on both connections.
    for (x, y, nx, ny) in [(&a, &b, &n1, &n1), (&c, &d, &n1, &n2)] {
        let src = Buf::new(nx, 64, Access::NONE);
        let dst = Buf::new(ny, 64, Access::LOCAL_WRITE);
        recv(&y.qp, 1, &[dst.sge(0, 64)]);
        send(&x.qp, 2, &[src.sge(0, 64)]);
        assert_eq!(statuses(&y.poll()), vec![(1, WcStatus::Success)]);
        assert_eq!(statuses(&x.poll()), vec![(2, WcStatus::Success)]);
        assert_eq!(dst.mem, src.mem);
        let src2 = Buf::new(ny, 8, Access::NONE);
        let dst2 = Buf::new(nx, 8, Access::LOCAL_WRITE);
        recv(&x.qp, 3, &[dst2.sge(0, 8)]);
        send(&y.qp, 4, &[src2.sge(0, 8)]);
        assert_eq!(statuses(&x.poll()), vec![(3, WcStatus::Success)]);
        assert_eq!(statuses(&y.poll()), vec![(4, WcStatus::Success)]);
        assert_eq!(dst2.mem, src2.mem);
    }
    drop((a, b, c, d));
    assert_eq!(n1.stats().live_qps, 0);
    assert_eq!(n2.stats().live_qps, 0);
}

#[test]
fn wildcard_listener_and_address_rules() {
    let net = SoftNetwork::new();
    let n = net
        .attach(SoftNicConfig {
            addresses: vec![ip(198, 18, 2, 1), ip(198, 18, 3, 1)],
            prefix_len: 24,
            connect_timeout: Duration::from_millis(50),
            rnr_queue_max: 4,
        })
        .unwrap();
    // Attach conflicts, and addresses freed by a drop.
    let cfg = |a| SoftNicConfig {
        addresses: vec![a],
        prefix_len: 24,
        connect_timeout: Duration::from_millis(50),
        rnr_queue_max: 4,
    };
    assert_eq!(
        net.attach(cfg(ip(198, 18, 3, 1))).err(),
        Some(FabricError::AddressInUse)
    );
    assert!(matches!(
        net.attach(SoftNicConfig {
            addresses: vec![],
            ..cfg(ip(1, 1, 1, 1))
        }),
        Err(FabricError::Invalid(_))
    ));
    let other = net.attach(cfg(ip(198, 18, 2, 9))).unwrap();
    drop(other);
    let again = net.attach(cfg(ip(198, 18, 2, 9))).unwrap();

    let ev = Probe::new().0;
    let wild = n
        .listen(sa(Ipv4Addr::UNSPECIFIED, 7), 2, ev.clone())
        .unwrap();
    assert_eq!(
        n.listen(sa(ip(198, 18, 3, 1), 7), 2, ev.clone()).err(),
        Some(FabricError::AddressInUse)
    );
    assert_eq!(
        n.listen(sa(Ipv4Addr::UNSPECIFIED, 7), 2, ev.clone()).err(),
        Some(FabricError::AddressInUse)
    );
    assert_eq!(
        n.listen(sa(ip(198, 18, 2, 9), 8), 2, ev.clone()).err(),
        Some(FabricError::AddressNotAvailable)
    );
    let exact = n.listen(sa(ip(198, 18, 2, 1), 8), 2, ev.clone()).unwrap();
    assert_eq!(
        n.listen(sa(Ipv4Addr::UNSPECIFIED, 8), 2, ev.clone()).err(),
        Some(FabricError::AddressInUse)
    );
    // The wildcard catches both addresses of the NIC.
    let cq = again.create_cq(64, Probe::new().0).unwrap();
    let qev = Probe::new().0;
    for target in [ip(198, 18, 2, 1), ip(198, 18, 3, 1)] {
        again
            .connect(
                sa(ip(198, 18, 2, 9), 1),
                sa(target, 7),
                params(&cq, &qev, 4),
                Box::new(|_| {}),
            )
            .unwrap();
    }
    assert_eq!(wild.pending(), 2);
    assert_eq!(exact.pending(), 0);
    // Closing makes room again (and is idempotent).
    wild.close();
    wild.close();
    assert_eq!(wild.pending(), 0);
    let again_wild = n.listen(sa(Ipv4Addr::UNSPECIFIED, 7), 2, ev).unwrap();
    drop(again_wild);
}

/// Receives of more buffers than a receive slot holds itself, posted one
/// after the other: each keeps its own outer entries.
#[test]
fn queued_receives_of_many_entries_each_keep_their_own() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 4, 2), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 4, 2), 1));
    let src = Buf::new(&n, 64, Access::NONE);
    let dst = Buf::zeroed(&n, 64, Access::LOCAL_WRITE);
    // Receive k scatters 4 bytes over 4 one-byte pieces at 16 k + 0..4.
    for k in 0..3 {
        let pieces: Vec<_> = (0..4).map(|j| dst.sge(16 * k + j, 1)).collect();
        recv(&b.qp, k as u64, &pieces);
    }
    for k in 0..3 {
        send(&a.qp, 10 + k as u64, &[src.sge(4 * k, 4)]);
    }
    let mut got = Vec::new();
    for _ in 0..1000 {
        got.extend(statuses(&b.poll()));
        if got.len() == 3 {
            break;
        }
    }
    assert_eq!(
        got,
        (0..3).map(|k| (k, WcStatus::Success)).collect::<Vec<_>>()
    );
    for k in 0..3 {
        assert_eq!(dst.mem[16 * k..16 * k + 4], src.mem[4 * k..4 * k + 4]);
    }
}

#[test]
fn send_recv_is_byte_exact_with_several_entries_and_zero_length() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 4, 1), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 4, 1), 1));
    let src = Buf::new(&n, 1000, Access::NONE);
    let dst = Buf::zeroed(&n, 1000, Access::LOCAL_WRITE);
    // 3 gather pieces (100 + 0 + 250 bytes) into 3 scatter pieces.
    recv(
        &b.qp,
        10,
        &[dst.sge(0, 30), dst.sge(500, 20), dst.sge(700, 300)],
    );
    send(
        &a.qp,
        20,
        &[src.sge(10, 100), src.sge(0, 0), src.sge(400, 250)],
    );
    let rw = b.poll();
    assert_eq!(rw.len(), 1);
    assert_eq!(
        (rw[0].wr_id, rw[0].status, rw[0].opcode, rw[0].byte_len),
        (10, WcStatus::Success, WcOpcode::Recv, 350)
    );
    let sw = a.poll();
    assert_eq!(
        (sw[0].wr_id, sw[0].status, sw[0].opcode, sw[0].byte_len),
        (20, WcStatus::Success, WcOpcode::Send, 350)
    );
    let mut message = src.mem[10..110].to_vec();
    message.extend_from_slice(&src.mem[400..650]);
    let mut landed = dst.mem[0..30].to_vec();
    landed.extend_from_slice(&dst.mem[500..520]);
    landed.extend_from_slice(&dst.mem[700..1000]);
    assert_eq!(&landed[..350], &message[..]);
    assert!(
        dst.mem[30..500].iter().all(|x| *x == 0),
        "outside untouched"
    );
    // Zero-length messages: no entries at all, into no entries.
    recv(&b.qp, 11, &[]);
    send(&a.qp, 21, &[]);
    assert_eq!(b.poll()[0].byte_len, 0);
    assert_eq!(statuses(&a.poll()), vec![(21, WcStatus::Success)]);
    // Too many entries: refused, nothing queued.
    let many = [src.sge(0, 1); 5];
    assert_eq!(
        a.qp.post_send(&SendWr {
            wr_id: 1,
            op: SendOp::Send,
            sges: &many
        }),
        Err(PostError::TooManySge)
    );
    assert_eq!(
        b.qp.post_recv(&RecvWr {
            wr_id: 1,
            sges: &many
        }),
        Err(PostError::TooManySge)
    );
    assert!(a.poll().is_empty() && b.poll().is_empty());
}

/// A connection from a NIC to itself, at 198.18.5.`host` of a network of
/// its own, with a 64-byte source and a 64-byte sink registered on it.
struct OneNic {
    a: End,
    b: End,
    src: Buf,
    dst: Buf,
    _nic: Arc<SoftNic>,
    _net: Arc<SoftNetwork>,
}

fn one_nic(host: u8) -> OneNic {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 5, host), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 5, host), 1));
    OneNic {
        a,
        b,
        src: Buf::new(&n, 64, Access::NONE),
        dst: Buf::new(&n, 64, Access::LOCAL_WRITE),
        _nic: n,
        _net: net,
    }
}

#[test]
fn sends_wait_for_receives_in_order() {
    let OneNic { a, b, src, dst, .. } = one_nic(1);
    for i in 0..3u64 {
        send(&a.qp, i, &[src.sge(i as usize * 10, 10)]);
    }
    assert!(a.poll().is_empty(), "parked until receives are posted");
    for i in 0..3u64 {
        recv(&b.qp, 100 + i, &[dst.sge(i as usize * 20, 20)]);
        // Each receive takes the oldest parked send at once.
        let got = b.poll();
        assert_eq!(statuses(&got), vec![(100 + i, WcStatus::Success)]);
        assert_eq!(got[0].byte_len, 10);
        assert_eq!(statuses(&a.poll_some()), vec![(i, WcStatus::Success)]);
        let at = i as usize;
        assert_eq!(
            dst.mem[at * 20..at * 20 + 10],
            src.mem[at * 10..at * 10 + 10]
        );
    }
    assert_eq!(a.events.count() + b.events.count(), 0);
}

/// A ping-pong's requester: the reply completes at the poll that finds
/// it, and the request's send, which the reply acknowledged, at the next
/// poll (not before the thread can act on the reply); a send known done
/// before a poll is reported by it alongside its receives.
#[test]
fn a_reply_is_reported_before_the_send_it_acknowledges() {
    let OneNic { a, b, src, dst, .. } = one_nic(2);
    for round in 0..3u64 {
        let (req, rep) = (10 * round, 10 * round + 1);
        recv(&a.qp, rep, &[dst.sge(0, 8)]);
        recv(&b.qp, req + 100, &[dst.sge(8, 8)]);
        send(&a.qp, req, &[src.sge(0, 8)]);
        assert_eq!(statuses(&b.poll()), vec![(req + 100, WcStatus::Success)]);
        send(&b.qp, rep + 100, &[src.sge(8, 8)]);
        // The reply alone, though it carries the request's acknowledgement.
        assert_eq!(statuses(&a.poll()), vec![(rep, WcStatus::Success)]);
        assert_eq!(statuses(&a.poll()), vec![(req, WcStatus::Success)]);
        assert!(a.poll().is_empty());
        // B learns of its reply from A's consumed index, which it reads
        // after some polls: then with no receive of its own completing.
        assert_eq!(
            statuses(&b.poll_some()),
            vec![(rep + 100, WcStatus::Success)]
        );
    }
    // Not starved by replies that keep coming: a send known done before a
    // poll goes with that poll's receive.
    recv(&a.qp, 1000, &[dst.sge(0, 8)]);
    recv(&a.qp, 1001, &[dst.sge(0, 8)]);
    recv(&b.qp, 1100, &[dst.sge(8, 8)]);
    send(&a.qp, 1002, &[src.sge(0, 8)]);
    assert_eq!(statuses(&b.poll()), vec![(1100, WcStatus::Success)]);
    send(&b.qp, 1101, &[src.sge(8, 8)]);
    assert_eq!(statuses(&a.poll()), vec![(1000, WcStatus::Success)]);
    send(&b.qp, 1102, &[src.sge(8, 8)]);
    assert_eq!(
        statuses(&a.poll()),
        vec![(1001, WcStatus::Success), (1002, WcStatus::Success)]
    );
    assert_eq!(a.events.count() + b.events.count(), 0);
}

/// A requester in a ping-pong (its last wait ended with the
/// acknowledgement the reply carried) learns that its next request was
/// taken from the next reply too: the first poll of its wait does not read
/// the peer's consumed index (the line the peer writes as it takes the
/// request, whose store would then wait for it on the path of the reply),
/// however long ago the last read was.
#[test]
fn a_requester_in_a_ping_pong_waits_for_the_replys_acknowledgement() {
    let OneNic { a, b, src, dst, .. } = one_nic(9);
    // A round whose reply comes after A looked once (and read consumed).
    recv(&a.qp, 1, &[dst.sge(0, 8)]);
    recv(&b.qp, 100, &[dst.sge(8, 8)]);
    send(&a.qp, 2, &[src.sge(0, 8)]);
    assert!(a.poll().is_empty());
    assert_eq!(statuses(&b.poll()), vec![(100, WcStatus::Success)]);
    send(&b.qp, 101, &[src.sge(8, 8)]);
    assert_eq!(statuses(&a.poll()), vec![(1, WcStatus::Success)]);
    assert_eq!(statuses(&a.poll()), vec![(2, WcStatus::Success)]);
    // Long after that read, the next request.
    let start = clock::ticks();
    while clock::ticks().wrapping_sub(start) < 2 * link::ACK_AFTER_TICKS {
        std::hint::spin_loop();
    }
    recv(&a.qp, 3, &[dst.sge(0, 8)]);
    recv(&b.qp, 102, &[dst.sge(8, 8)]);
    send(&a.qp, 4, &[src.sge(0, 8)]);
    assert_eq!(statuses(&b.poll()), vec![(102, WcStatus::Success)]);
    assert!(a.poll().is_empty(), "the wait's first poll read consumed");
    send(&b.qp, 103, &[src.sge(8, 8)]);
    assert_eq!(statuses(&a.poll()), vec![(3, WcStatus::Success)]);
    assert_eq!(statuses(&a.poll()), vec![(4, WcStatus::Success)]);
    assert_eq!(a.events.count() + b.events.count(), 0);
}

#[test]
fn rnr_overflow_fails_the_newest_send_and_breaks_both_ends() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 6, 1), 2);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 6, 1), 1));
    let src = Buf::new(&n, 64, Access::NONE);
    let dst = Buf::new(&n, 64, Access::LOCAL_WRITE);
    recv(&a.qp, 50, &[dst.sge(0, 8)]); // outstanding on the failing end
    for i in 0..3u64 {
        send(&a.qp, i, &[src.sge(0, 1)]);
    }
    let got = statuses(&a.poll());
    assert_eq!(
        got,
        vec![
            (50, WcStatus::Flushed),
            (2, WcStatus::RnrRetryExceeded),
            (0, WcStatus::Flushed),
            (1, WcStatus::Flushed),
        ]
    );
    assert!(b.poll().is_empty());
    assert_eq!((a.events.count(), b.events.count()), (1, 1));
    // Both ends are broken: later posts complete with their error status.
    send(&a.qp, 3, &[]);
    recv(&b.qp, 4, &[dst.sge(0, 8)]);
    assert_eq!(statuses(&a.poll()), vec![(3, WcStatus::Flushed)]);
    assert_eq!(statuses(&b.poll()), vec![(4, WcStatus::RemoteDisconnected)]);
    assert_eq!((a.events.count(), b.events.count()), (1, 1));
}

#[test]
fn message_longer_than_the_receive_is_a_length_error() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 7, 1), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 7, 1), 1));
    let src = Buf::new(&n, 64, Access::NONE);
    let dst = Buf::zeroed(&n, 64, Access::LOCAL_WRITE);
    recv(&b.qp, 1, &[dst.sge(0, 8), dst.sge(8, 8)]);
    recv(&b.qp, 2, &[dst.sge(16, 8)]);
    send(&a.qp, 3, &[src.sge(0, 17)]);
    assert_eq!(
        statuses(&b.poll()),
        vec![(1, WcStatus::LocalLengthError), (2, WcStatus::Flushed)]
    );
    assert_eq!(
        statuses(&a.poll()),
        vec![(3, WcStatus::RemoteInvalidRequest)]
    );
    assert!(dst.mem.iter().all(|x| *x == 0), "nothing landed");
    assert_eq!((a.events.count(), b.events.count()), (1, 1));
}

#[test]
fn rdma_write_and_read_at_an_offset_are_byte_exact() {
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 8, 1), 4),
        nic_on(&net, ip(198, 18, 8, 2), 4),
    );
    let (a, b) = pair(&n1, &n2, sa(ip(198, 18, 8, 2), 1));
    let local = Buf::new(&n1, 256, Access::LOCAL_WRITE);
    let target = Buf::zeroed(
        &n2,
        4096,
        Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
    );
    let rkey = n2
        .bind_remote(
            target.lkey,
            b.qp.num(),
            Access::REMOTE_WRITE | Access::REMOTE_READ,
        )
        .unwrap();
    assert_eq!(n2.stats().live_remote_keys, 1);
    a.qp.post_send(&SendWr {
        wr_id: 1,
        op: SendOp::RdmaWrite {
            remote_addr: target.addr() + 1000,
            rkey,
        },
        sges: &[local.sge(0, 100), local.sge(200, 50)],
    })
    .unwrap();
    let wc = a.poll();
    assert_eq!(
        (wc[0].status, wc[0].opcode, wc[0].byte_len),
        (WcStatus::Success, WcOpcode::RdmaWrite, 150)
    );
    assert!(b.poll().is_empty(), "one-sided");
    assert_eq!(target.mem[1000..1100], local.mem[0..100]);
    assert_eq!(target.mem[1100..1150], local.mem[200..250]);
    assert!(target.mem[..1000]
        .iter()
        .chain(&target.mem[1150..])
        .all(|x| *x == 0));
    // Read it back into another place.
    let sink = Buf::new(&n1, 150, Access::LOCAL_WRITE);
    a.qp.post_send(&SendWr {
        wr_id: 2,
        op: SendOp::RdmaRead {
            remote_addr: target.addr() + 1000,
            rkey,
        },
        sges: &[sink.sge(0, 150)],
    })
    .unwrap();
    let wc = a.poll();
    assert_eq!(
        (wc[0].status, wc[0].opcode, wc[0].byte_len),
        (WcStatus::Success, WcOpcode::RdmaRead, 150)
    );
    assert_eq!(sink.mem[..], target.mem[1000..1150]);
    // Out of the region's range: remote access error, nothing written.
    let before = target.mem.clone();
    a.qp.post_send(&SendWr {
        wr_id: 3,
        op: SendOp::RdmaWrite {
            remote_addr: target.addr() + 4000,
            rkey,
        },
        sges: &[local.sge(0, 100)],
    })
    .unwrap();
    assert_eq!(statuses(&a.poll()), vec![(3, WcStatus::RemoteAccessError)]);
    assert_eq!(target.mem, before);
    assert_eq!((a.events.count(), b.events.count()), (1, 1));
}

fn rdma(
    qp: &Arc<dyn QueuePair>,
    wr_id: WrId,
    write: bool,
    remote_addr: u64,
    rkey: u32,
    sges: &[Sge],
) {
    let op = if write {
        SendOp::RdmaWrite { remote_addr, rkey }
    } else {
        SendOp::RdmaRead { remote_addr, rkey }
    };
    qp.post_send(&SendWr { wr_id, op, sges }).unwrap();
}

#[test]
fn remote_keys_are_bound_to_one_connection_and_revocable() {
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 9, 1), 4),
        nic_on(&net, ip(198, 18, 9, 2), 4),
    );
    let (a, b) = pair(&n1, &n2, sa(ip(198, 18, 9, 2), 1));
    let (a2, _b2) = pair(&n1, &n2, sa(ip(198, 18, 9, 2), 2));
    let src = Buf::new(&n1, 16, Access::NONE);
    let target = Buf::zeroed(&n2, 256, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let rkey = n2
        .bind_remote(target.lkey, b.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    rdma(&a.qp, 1, true, target.addr(), rkey, &[src.sge(0, 16)]);
    assert_eq!(statuses(&a.poll()), vec![(1, WcStatus::Success)]);
    rdma(
        &a2.qp,
        2,
        true,
        target.addr() + 100,
        rkey,
        &[src.sge(0, 16)],
    );
    assert_eq!(
        statuses(&a2.poll()),
        vec![(2, WcStatus::RemoteAccessError)],
        "a key bound to another connection"
    );
    assert!(target.mem[100..116].iter().all(|x| *x == 0));
    // A fresh connection for the revocation check (the first one still
    // works; a2's broke).
    n2.unbind_remote(rkey);
    n2.unbind_remote(rkey);
    assert_eq!(n2.stats().live_remote_keys, 0);
    rdma(&a.qp, 3, true, target.addr() + 100, rkey, &[src.sge(0, 16)]);
    assert_eq!(
        statuses(&a.poll()),
        vec![(3, WcStatus::RemoteAccessError)],
        "revoked"
    );
    assert!(target.mem[100..116].iter().all(|x| *x == 0));
}

#[test]
fn deregistration_revokes_keys_and_stale_keys_never_alias() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 10, 1), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 10, 1), 1));
    let src = Buf::new(&n, 16, Access::NONE);
    let target = Buf::new(&n, 64, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let rkey = n
        .bind_remote(target.lkey, b.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    assert_eq!(n.stats().live_regions, 2);
    n.deregister(target.lkey);
    n.deregister(target.lkey);
    assert_eq!(n.stats().live_regions, 1);
    assert_eq!(n.stats().live_remote_keys, 0);
    // The slot is reused with a new generation: the old keys stay dead.
    let again = Buf::new(&n, 64, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    assert_ne!(again.lkey, target.lkey);
    let rkey2 = n
        .bind_remote(again.lkey, b.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    assert_ne!(rkey2, rkey);
    assert_eq!(n.stats().registrations, 3);
    rdma(&a.qp, 1, true, again.addr(), rkey, &[src.sge(0, 16)]);
    assert_eq!(statuses(&a.poll()), vec![(1, WcStatus::RemoteAccessError)]);
    // A stale lkey in a local entry is a local protection error.
    let (c, _d) = pair(&n, &n, sa(ip(198, 18, 10, 1), 2));
    let stale = Sge {
        addr: target.ptr as usize,
        len: 8,
        lkey: target.lkey,
    };
    send(&c.qp, 2, &[stale]);
    assert_eq!(
        statuses(&c.poll()),
        vec![(2, WcStatus::LocalProtectionError)]
    );
}

#[test]
fn access_rights_are_enforced() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 11, 1), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 11, 1), 1));
    let ro = Buf::new(&n, 64, Access::NONE);
    let rw = Buf::new(&n, 64, Access::LOCAL_WRITE | Access::REMOTE_READ);
    let bad_rw = Buf::new(&n, 64, Access::REMOTE_WRITE);
    let num = b.qp.num();
    for (lkey, access) in [
        (rw.lkey, Access::REMOTE_WRITE), // region lacks it
        (rw.lkey, Access::NONE),
        (rw.lkey, Access::LOCAL_WRITE),      // not a remote right
        (bad_rw.lkey, Access::REMOTE_WRITE), // remote write needs local write
        (0, Access::REMOTE_READ),
    ] {
        assert!(
            matches!(
                n.bind_remote(lkey, num, access),
                Err(FabricError::Invalid(_))
            ),
            "{access:?}"
        );
    }
    assert!(matches!(
        n.bind_remote(rw.lkey, QpNum(9999), Access::REMOTE_READ),
        Err(FabricError::Invalid(_))
    ));
    let rkey = n.bind_remote(rw.lkey, num, Access::REMOTE_READ).unwrap();
    // The key allows reading only.
    rdma(&a.qp, 1, true, rw.addr(), rkey, &[ro.sge(0, 8)]);
    assert_eq!(statuses(&a.poll()), vec![(1, WcStatus::RemoteAccessError)]);
    // A read needs a writable local sink.
    let (c, d) = pair(&n, &n, sa(ip(198, 18, 11, 1), 2));
    let rkey = n
        .bind_remote(rw.lkey, d.qp.num(), Access::REMOTE_READ)
        .unwrap();
    rdma(&c.qp, 2, false, rw.addr(), rkey, &[ro.sge(0, 8)]);
    assert_eq!(
        statuses(&c.poll()),
        vec![(2, WcStatus::LocalProtectionError)]
    );
    // A receive needs a writable sink, an entry must lie in its region.
    let (e, f) = pair(&n, &n, sa(ip(198, 18, 11, 1), 3));
    recv(&f.qp, 3, &[ro.sge(0, 8)]);
    assert_eq!(
        statuses(&f.poll()),
        vec![(3, WcStatus::LocalProtectionError)]
    );
    assert_eq!((e.events.count(), f.events.count()), (1, 1));
    let (g, _h) = pair(&n, &n, sa(ip(198, 18, 11, 1), 4));
    let mut beyond = ro.sge(60, 4);
    beyond.len = 8;
    send(&g.qp, 4, &[beyond]);
    assert_eq!(
        statuses(&g.poll()),
        vec![(4, WcStatus::LocalProtectionError)]
    );
}

#[test]
fn set_error_flushes_everything_once_and_tells_the_peer() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 12, 1), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 12, 1), 1));
    let buf = Buf::new(&n, 64, Access::LOCAL_WRITE);
    for i in 0..3 {
        recv(&a.qp, i, &[buf.sge(0, 8)]);
        recv(&b.qp, 10 + i, &[buf.sge(8, 8)]);
    }
    // Use up b's receives, so that a's next send waits at b.
    for i in 0..3 {
        send(&a.qp, 20 + i, &[buf.sge(16, 4)]);
    }
    assert_eq!(b.poll().len(), 3);
    assert_eq!(a.poll().len(), 3);
    send(&a.qp, 30, &[buf.sge(16, 4)]); // parked at b
    send(&b.qp, 31, &[buf.sge(16, 4)]); // lands in a's receive 0
    assert_eq!(statuses(&a.poll()), vec![(0, WcStatus::Success)]);
    assert_eq!(statuses(&b.poll()), vec![(31, WcStatus::Success)]);
    a.qp.set_error();
    a.qp.set_error();
    assert_eq!(
        statuses(&a.poll()),
        vec![
            (1, WcStatus::Flushed),
            (2, WcStatus::Flushed),
            (30, WcStatus::Flushed)
        ]
    );
    assert!(b.poll().is_empty(), "b had nothing outstanding");
    assert_eq!(b.events.count(), 1);
    assert_eq!(a.events.count(), 0, "the closing end is not told");
    send(&a.qp, 40, &[]);
    recv(&a.qp, 41, &[]);
    assert_eq!(
        statuses(&a.poll()),
        vec![(41, WcStatus::Flushed), (40, WcStatus::Flushed)]
    );
    send(&b.qp, 42, &[]);
    assert_eq!(
        statuses(&b.poll()),
        vec![(42, WcStatus::RemoteDisconnected)]
    );
    // The peer closing too: marked locally, nothing new to tell.
    b.qp.set_error();
    send(&b.qp, 43, &[]);
    assert_eq!(statuses(&b.poll()), vec![(43, WcStatus::Flushed)]);
    assert_eq!((a.events.count(), b.events.count()), (0, 1));
}

#[test]
fn peer_outstanding_requests_complete_remote_disconnected() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 13, 1), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 13, 1), 1));
    let buf = Buf::new(&n, 64, Access::LOCAL_WRITE);
    recv(&b.qp, 1, &[buf.sge(0, 8)]);
    recv(&b.qp, 2, &[buf.sge(0, 8)]);
    send(&b.qp, 3, &[buf.sge(0, 4)]); // parked at a
    let (_, b_gone) = (a.events.clone(), b.events.clone());
    drop(a.qp); // dropping the last handle closes
    assert_eq!(
        statuses(&b.poll()),
        vec![
            (1, WcStatus::RemoteDisconnected),
            (2, WcStatus::RemoteDisconnected),
            (3, WcStatus::RemoteDisconnected)
        ]
    );
    assert_eq!(b_gone.count(), 1);
    assert_eq!(n.stats().live_qps, 1);
}

#[test]
fn depth_limits_refuse_posts_without_side_effects() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 14, 1), 16);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 14, 1), 1));
    let buf = Buf::new(&n, 64, Access::LOCAL_WRITE);
    for i in 0..8 {
        recv(&b.qp, i, &[buf.sge(0, 8)]);
    }
    assert_eq!(
        b.qp.post_recv(&RecvWr {
            wr_id: 99,
            sges: &[buf.sge(0, 8)]
        }),
        Err(PostError::QueueFull)
    );
    for i in 0..8 {
        send(&b.qp, 10 + i, &[buf.sge(0, 1)]); // parked at a (send depth 8)
    }
    assert_eq!(
        b.qp.post_send(&SendWr {
            wr_id: 98,
            op: SendOp::Send,
            sges: &[]
        }),
        Err(PostError::QueueFull)
    );
    assert!(a.poll().is_empty() && b.poll().is_empty());
    // All of it completes exactly once on close.
    b.qp.set_error();
    let got = b.poll();
    assert_eq!(got.len(), 16);
    assert!(got.iter().all(|w| w.status == WcStatus::Flushed));
    assert!(!got.iter().any(|w| w.wr_id >= 98));
}

#[test]
fn cq_reservations_and_admission_prevent_overflow() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 15, 1), 4);
    let (lev, _lrx) = Probe::new();
    let l = n.listen(sa(ip(198, 18, 15, 1), 1), 4, lev).unwrap();
    let small = n.create_cq(4, Probe::new().0).unwrap();
    let big = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let p = |cq: &Arc<dyn CompletionQueue>| QpParams {
        cq: cq.id(),
        send_depth: 2,
        recv_depth: 2,
        max_sge: 1,
        events: ev.clone(),
    };
    let (tx, rx) = mpsc::channel();
    let connect = |cq: &Arc<dyn CompletionQueue>| {
        let tx = tx.clone();
        n.connect(
            sa(ip(198, 18, 15, 1), 9),
            sa(ip(198, 18, 15, 1), 1),
            p(cq),
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
    };
    // The connector end takes all 4 entries of `small`.
    connect(&small);
    let b = l.peek().unwrap().accept(p(&big)).unwrap();
    let a = rx.recv_timeout(WAIT).unwrap().unwrap();
    // A second queue pair on `small` cannot be made: both sides learn it.
    connect(&small);
    assert_eq!(
        l.peek().unwrap().accept(p(&big)).err(),
        Some(ConnectError::NoResources)
    );
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap().err(),
        Some(ConnectError::NoResources)
    );
    assert_eq!(l.pending(), 0);
    assert_eq!(n.stats().live_qps, 2);
    // More uncompleted requests than the send queue holds (and so than
    // the CQ reserved for it) are refused, not lost.
    let src = Buf::new(&n, 8, Access::NONE);
    let target = Buf::zeroed(&n, 8, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let rkey = n
        .bind_remote(target.lkey, b.num(), Access::REMOTE_WRITE)
        .unwrap();
    let write = |wr_id| {
        a.post_send(&SendWr {
            wr_id,
            op: SendOp::RdmaWrite {
                remote_addr: target.addr(),
                rkey,
            },
            sges: &[src.sge(0, 8)],
        })
    };
    for i in 0..2 {
        write(i).unwrap();
    }
    assert_eq!(write(2), Err(PostError::QueueFull));
    let mut out = [WorkCompletion::EMPTY; 8];
    assert_eq!(small.poll(&mut out[..1]), 1);
    write(3).unwrap();
    assert_eq!(small.poll(&mut out), 2);
    let ids: Vec<_> = out[..2].iter().map(|w| w.wr_id).collect();
    assert_eq!(ids, vec![1, 3]);
    // Destroying the queue pair frees its reservation.
    drop(a);
    connect(&small);
    let _b2 = l.peek().unwrap().accept(p(&big)).unwrap();
    let _a2 = rx.recv_timeout(WAIT).unwrap().unwrap();
    drop(b);
}

#[test]
fn backlog_full_refuses_without_an_event() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 16, 1), 4);
    let (lev, lrx) = Probe::new();
    let l = n.listen(sa(ip(198, 18, 16, 1), 1), 1, lev.clone()).unwrap();
    let cq = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let to = sa(ip(198, 18, 16, 1), 1);
    let from = sa(ip(198, 18, 16, 1), 2);
    let (tx, rx) = mpsc::channel();
    n.connect(
        from,
        to,
        params(&cq, &ev, 4),
        Box::new(move |r| tx.send(r.err()).unwrap()),
    )
    .unwrap();
    lrx.recv_timeout(WAIT).unwrap();
    let second = n.connect(from, to, params(&cq, &ev, 4), Box::new(|_| panic!("never")));
    assert_eq!(second.err(), Some(ConnectError::Refused));
    assert_eq!(lev.count(), 1);
    assert_eq!(l.pending(), 1);
    // Closing refuses the queued one through its callback.
    l.close();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Some(ConnectError::Refused));
    assert_eq!(
        n.connect(from, to, params(&cq, &ev, 4), Box::new(|_| {}))
            .err(),
        Some(ConnectError::NoListener)
    );
}

#[test]
fn cancel_and_reject() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 17, 1), 4);
    let (lev, _lrx) = Probe::new();
    let l = n.listen(sa(ip(198, 18, 17, 1), 1), 4, lev).unwrap();
    let cq = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let to = sa(ip(198, 18, 17, 1), 1);
    let from = sa(ip(198, 18, 17, 1), 2);
    // Cancel before accept: the callback is dropped unrun.
    let (tx, rx) = mpsc::channel::<()>();
    let attempt = n
        .connect(
            from,
            to,
            params(&cq, &ev, 4),
            Box::new(move |_| tx.send(()).unwrap()),
        )
        .unwrap();
    let req = l.peek().unwrap();
    assert!(attempt.cancel());
    assert!(!attempt.cancel());
    assert_eq!(rx.recv_timeout(WAIT), Err(RecvTimeoutError::Disconnected));
    assert_eq!(l.pending(), 0);
    assert_eq!(
        req.accept(params(&cq, &ev, 4)).err(),
        Some(ConnectError::Cancelled)
    );
    assert_eq!(n.stats().live_qps, 0);
    // Reject: the connector is refused; cancel afterwards is too late.
    let (tx, rx) = mpsc::channel();
    let attempt = n
        .connect(
            from,
            to,
            params(&cq, &ev, 4),
            Box::new(move |r| tx.send(r.err()).unwrap()),
        )
        .unwrap();
    l.peek().unwrap().reject();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), Some(ConnectError::Refused));
    assert!(!attempt.cancel());
    // Accept: cancel afterwards is too late as well.
    let (tx, rx) = mpsc::channel();
    let attempt = n
        .connect(
            from,
            to,
            params(&cq, &ev, 4),
            Box::new(move |r| tx.send(r.map(|_| ()).err()).unwrap()),
        )
        .unwrap();
    let req = l.peek().unwrap();
    let _qp = req.accept(params(&cq, &ev, 4)).unwrap();
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), None);
    assert!(!attempt.cancel());
    assert_eq!(
        req.accept(params(&cq, &ev, 4)).err(),
        Some(ConnectError::Cancelled)
    );
}

#[test]
fn address_resolution_failures() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 18, 1), 4);
    let _other = nic_on(&net, ip(198, 19, 0, 1), 4);
    let cq = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let from = sa(ip(198, 18, 18, 1), 1);
    let try_connect = |to: Ipv4Addr| {
        n.connect(
            from,
            sa(to, 5),
            params(&cq, &ev, 4),
            Box::new(|_| panic!("direct")),
        )
        .err()
    };
    assert_eq!(
        try_connect(ip(198, 18, 18, 1)),
        Some(ConnectError::NoListener)
    );
    assert_eq!(
        try_connect(ip(198, 19, 0, 1)),
        Some(ConnectError::NoListener)
    );
    assert_eq!(
        try_connect(ip(198, 18, 18, 7)),
        Some(ConnectError::HostUnreachable)
    );
    assert_eq!(
        try_connect(ip(198, 19, 0, 7)),
        Some(ConnectError::HostUnreachable)
    );
    assert_eq!(
        try_connect(ip(10, 9, 9, 9)),
        Some(ConnectError::NetUnreachable)
    );
}

#[test]
fn tcp_only_host_times_out_unless_cancelled() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 19, 1), 4);
    net.add_tcp_only_host(ip(198, 18, 19, 9));
    net.add_tcp_only_host(ip(10, 0, 0, 9)); // off every SAN subnet
    let cq = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let from = sa(ip(198, 18, 19, 1), 1);
    for host in [ip(198, 18, 19, 9), ip(10, 0, 0, 9)] {
        let (tx, rx) = mpsc::channel();
        let attempt = n
            .connect(
                from,
                sa(host, 5),
                params(&cq, &ev, 4),
                Box::new(move |r| tx.send(r.err()).unwrap()),
            )
            .unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), Some(ConnectError::TimedOut));
        assert!(!attempt.cancel());
    }
    // Cancelled: the timer thread drops the callback unrun (the channel
    // disconnects) long before the 10 s timeout.
    let slow = net
        .attach(SoftNicConfig {
            addresses: vec![ip(198, 18, 19, 2)],
            prefix_len: 24,
            connect_timeout: Duration::from_secs(3600),
            rnr_queue_max: 4,
        })
        .unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let attempt = slow
        .connect(
            sa(ip(198, 18, 19, 2), 1),
            sa(ip(198, 18, 19, 9), 5),
            params(&cq, &ev, 4),
            Box::new(move |_| tx.send(()).unwrap()),
        )
        .unwrap();
    assert!(attempt.cancel());
    assert_eq!(rx.recv_timeout(WAIT), Err(RecvTimeoutError::Disconnected));
}

/// A loopback connection on one NIC at 198.18.`octet`.1 whose accepting
/// end `b` completes on `cq`, woken through the counting `waker`.
struct Watched {
    n: Arc<SoftNic>,
    cq: Arc<dyn CompletionQueue>,
    waker: Arc<Probe>,
    woken: Receiver<()>,
    a: Arc<dyn QueuePair>,
    b: Arc<dyn QueuePair>,
    /// Kept for the test's length: the connecting end's CQ, the listener,
    /// the network.
    _keep: (
        Arc<dyn CompletionQueue>,
        Arc<dyn Listener>,
        Arc<SoftNetwork>,
    ),
}

fn watched_loopback(octet: u8) -> Watched {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, octet, 1), 4);
    let (lev, _lrx) = Probe::new();
    let l = n.listen(sa(ip(198, 18, octet, 1), 1), 4, lev).unwrap();
    let (waker, woken) = Probe::new();
    let cq = n.create_cq(64, waker.clone()).unwrap();
    let other_cq = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let (tx, rx) = mpsc::channel();
    n.connect(
        sa(ip(198, 18, octet, 1), 2),
        sa(ip(198, 18, octet, 1), 1),
        params(&other_cq, &ev, 8),
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    let b = l.peek().unwrap().accept(params(&cq, &ev, 8)).unwrap();
    let a = rx.recv_timeout(WAIT).unwrap().unwrap();
    Watched {
        n,
        cq,
        waker,
        woken,
        a,
        b,
        _keep: (other_cq, l, net),
    }
}

#[test]
fn arm_does_not_lose_wake_ups() {
    let Watched {
        n,
        cq,
        waker,
        woken,
        a,
        b,
        _keep,
    } = watched_loopback(20);
    let buf = Arc::new(Buf::new(&n, 64, Access::LOCAL_WRITE));
    // Nothing there: arm reports empty; a completion from another thread
    // wakes exactly once, even with two completions.
    assert!(!cq.arm());
    recv(&b, 1, &[buf.sge(0, 8)]);
    recv(&b, 2, &[buf.sge(8, 8)]);
    let t = {
        let buf = buf.clone();
        std::thread::spawn(move || {
            send(&a, 3, &[buf.sge(32, 4)]);
            send(&a, 4, &[buf.sge(32, 4)]);
            a
        })
    };
    woken.recv_timeout(WAIT).expect("armed CQ was not woken");
    let a = t.join().unwrap();
    let mut out = [WorkCompletion::EMPTY; 8];
    assert_eq!(cq.poll(&mut out), 2);
    assert_eq!(waker.count(), 1, "one wake per arm");
    // Entries already present: arm says so (and stays armed, whoever
    // polls meanwhile).
    recv(&b, 5, &[buf.sge(0, 8)]);
    send(&a, 6, &[]);
    assert!(cq.arm());
    assert_eq!(cq.poll(&mut out), 1);
    recv(&b, 7, &[]);
    send(&a, 8, &[]);
    woken.recv_timeout(WAIT).expect("still armed");
    assert_eq!(waker.count(), 2);
    assert_eq!(cq.poll(&mut out), 1);
    // Not armed: no wake.
    recv(&b, 9, &[]);
    send(&a, 10, &[]);
    assert_eq!(waker.count(), 2);
}

/// A thread that arms a CQ while another thread's `drain` dispatches its
/// completions (an upcall that takes long) may sleep rather than spin
/// through the upcall, and is not left asleep with work the dispatching
/// thread can no longer see: the end of the dispatch wakes it.
#[test]
fn arm_during_another_threads_dispatch_sleeps_and_the_dispatch_end_wakes() {
    let Watched {
        n,
        cq,
        waker,
        woken,
        a,
        b,
        _keep,
    } = watched_loopback(21);
    let buf = Buf::new(&n, 64, Access::LOCAL_WRITE);
    recv(&b, 1, &[buf.sge(0, 8)]);
    send(&a, 2, &[buf.sge(32, 4)]);
    let (in_upcall, upcall_entered) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let dispatcher = {
        let cq = cq.clone();
        std::thread::spawn(move || {
            let mut out = [WorkCompletion::EMPTY; 8];
            let mut seen = Vec::new();
            let mut f = |wc: &WorkCompletion| {
                seen.push(wc.wr_id);
                in_upcall.send(()).unwrap();
                released
                    .recv_timeout(WAIT)
                    .expect("the test releases the upcall");
            };
            let n = cq.drain(&mut out, &mut f);
            (n, seen)
        })
    };
    upcall_entered
        .recv_timeout(WAIT)
        .expect("the drain dispatches the first receive");
    // Work the dispatching thread polled before: nobody is armed, so the
    // producer wakes nobody.
    recv(&b, 3, &[buf.sge(8, 8)]);
    send(&a, 4, &[buf.sge(32, 4)]);
    assert_eq!(waker.count(), 0);
    assert!(
        !cq.arm(),
        "an arm during another thread's dispatch lets its caller sleep"
    );
    release.send(()).unwrap();
    let (drained, seen) = dispatcher.join().unwrap();
    assert_eq!((drained, seen), (Some(1), vec![1]));
    woken
        .recv_timeout(WAIT)
        .expect("the dispatch's end wakes the CQ armed during it");
    assert_eq!(waker.count(), 1);
    let mut out = [WorkCompletion::EMPTY; 8];
    assert_eq!(cq.poll(&mut out), 1);
    assert_eq!(statuses(&out[..1]), vec![(3, WcStatus::Success)]);
    // Without a dispatch running, an arm with nothing waiting sleeps and
    // nothing wakes it.
    assert!(!cq.arm());
    assert_eq!(waker.count(), 1);
}

#[test]
fn two_threads_stream_through_rnr_and_wakes() {
    const N: u64 = 2000;
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 21, 1), 8),
        nic_on(&net, ip(198, 18, 21, 2), 8),
    );
    let (lev, _lrx) = Probe::new();
    let l = n2.listen(sa(ip(198, 18, 21, 2), 1), 4, lev).unwrap();
    let (aw, arx) = Probe::new();
    let (bw, brx) = Probe::new();
    let acq = n1.create_cq(64, aw).unwrap();
    let bcq = n2.create_cq(64, bw).unwrap();
    let ev = Probe::new().0;
    let (tx, rx) = mpsc::channel();
    n1.connect(
        sa(ip(198, 18, 21, 1), 1),
        sa(ip(198, 18, 21, 2), 1),
        params(&acq, &ev, 8),
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    let bqp = l.peek().unwrap().accept(params(&bcq, &ev, 8)).unwrap();
    let aqp = rx.recv_timeout(WAIT).unwrap().unwrap();
    let src = Buf::new(&n1, 8 * 8, Access::NONE);
    let dst = Buf::new(&n2, 8 * 8, Access::LOCAL_WRITE);

    /// Waits for at least one completion: poll, else arm and sleep on the
    /// waker's channel (with a deadline).
    fn reap(
        cq: &Arc<dyn CompletionQueue>,
        woken: &Receiver<()>,
        out: &mut [WorkCompletion],
    ) -> usize {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let n = cq.poll(out);
            if n > 0 {
                return n;
            }
            if !cq.arm() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match woken.recv_timeout(left) {
                    Ok(()) => {}
                    Err(e) => panic!("no completion: {e:?}"),
                }
            }
        }
    }

    std::thread::scope(|s| {
        let (src, dst) = (&src, &dst);
        s.spawn(move || {
            // Sender: at most 8 sends outstanding (its send depth); each
            // carries its sequence number.
            let mut out = [WorkCompletion::EMPTY; 16];
            let (mut posted, mut done) = (0u64, 0u64);
            while done < N {
                while posted < N && posted - done < 8 {
                    let slot = (posted % 8) as usize;
                    // SAFETY: slot `slot` of `src` is not named by any
                    // outstanding send (at most 8 in flight, in order).
                    unsafe { (src.ptr.add(slot * 8) as *mut u64).write_unaligned(posted) };
                    send(&aqp, posted, &[src.sge(slot * 8, 8)]);
                    posted += 1;
                }
                let n = reap(&acq, &arx, &mut out);
                for wc in &out[..n] {
                    assert_eq!((wc.wr_id, wc.status), (done, WcStatus::Success));
                    done += 1;
                }
            }
        });
        s.spawn(move || {
            // Receiver: 8 receives in flight, refilled as they complete.
            let mut out = [WorkCompletion::EMPTY; 16];
            let (mut posted, mut got) = (0u64, 0u64);
            while got < N {
                while posted < N && posted - got < 8 {
                    let slot = (posted % 8) as usize;
                    recv(&bqp, posted, &[dst.sge(slot * 8, 8)]);
                    posted += 1;
                }
                let n = reap(&bcq, &brx, &mut out);
                for wc in &out[..n] {
                    assert_eq!(
                        (wc.wr_id, wc.status, wc.byte_len),
                        (got, WcStatus::Success, 8)
                    );
                    let slot = (got % 8) as usize;
                    // SAFETY: receive `got` completed and slot `slot` is not
                    // named by another posted receive until it is refilled.
                    let v = unsafe { (dst.ptr.add(slot * 8) as *const u64).read_unaligned() };
                    assert_eq!(v, got, "message {got} in order and intact");
                    got += 1;
                }
            }
        });
    });
}

#[test]
fn registration_checks_the_range() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 22, 1), 4);
    // SAFETY: every range below is rejected, so none stays registered.
    unsafe {
        assert!(matches!(
            n.register(0, 8, Access::NONE),
            Err(FabricError::Invalid(_))
        ));
        let v = [0u8; 8];
        assert!(matches!(
            n.register(v.as_ptr() as usize, 0, Access::NONE),
            Err(FabricError::Invalid(_))
        ));
        assert!(matches!(
            n.register(usize::MAX - 4, 16, Access::NONE),
            Err(FabricError::Invalid(_))
        ));
    }
    // A hole: map three pages, unmap the middle one.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    // SAFETY: a fresh anonymous private mapping, checked for failure.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let base = base as usize;
    // SAFETY: the middle page belongs to the mapping made above and nothing
    // refers to it.
    let rc = unsafe { libc::munmap((base + page) as *mut libc::c_void, page) };
    assert_eq!(rc, 0);
    // SAFETY: rejected ranges are not kept; the accepted one is deregistered
    // before the mapping goes away.
    unsafe {
        assert_eq!(
            n.register(base, 3 * page, Access::LOCAL_WRITE).err(),
            Some(FabricError::Invalid("range not mapped"))
        );
        assert!(n.register(base + page - 1, 2, Access::NONE).is_err());
        let ok = n
            .register(base + 2 * page, page, Access::LOCAL_WRITE)
            .unwrap();
        n.deregister(ok.lkey);
    }
    assert_eq!(n.stats().live_regions, 0);
    assert_eq!(n.stats().registrations, 1);
    for p in [base, base + 2 * page] {
        // SAFETY: the remaining pages of our mapping, no longer registered.
        assert_eq!(unsafe { libc::munmap(p as *mut libc::c_void, page) }, 0);
    }
}

#[test]
fn cancel_racing_accept_settles_exactly_once() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 23, 1), 4);
    let (lev, _lrx) = Probe::new();
    let to = sa(ip(198, 18, 23, 1), 1);
    let l = n.listen(to, 4, lev).unwrap();
    let cq = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let (mut cancelled, mut accepted) = (0, 0);
    for _ in 0..200 {
        let (tx, rx) = mpsc::channel();
        let attempt = n
            .connect(
                sa(ip(198, 18, 23, 1), 2),
                to,
                params(&cq, &ev, 4),
                Box::new(move |r| tx.send(r).unwrap()),
            )
            .unwrap();
        let req = l.peek().unwrap();
        let barrier = std::sync::Barrier::new(2);
        let (won_cancel, accept) = std::thread::scope(|s| {
            let c = s.spawn(|| {
                barrier.wait();
                attempt.cancel()
            });
            barrier.wait();
            let accept = req.accept(params(&cq, &ev, 4));
            (c.join().unwrap(), accept)
        });
        drop(req);
        match (won_cancel, accept) {
            (true, Err(ConnectError::Cancelled)) => {
                cancelled += 1;
                assert!(
                    matches!(rx.recv_timeout(WAIT), Err(RecvTimeoutError::Disconnected)),
                    "a cancelled attempt's callback never runs"
                );
            }
            (false, Ok(_qp)) => {
                accepted += 1;
                assert!(rx.recv_timeout(WAIT).unwrap().is_ok());
                assert!(matches!(
                    rx.recv_timeout(WAIT),
                    Err(RecvTimeoutError::Disconnected)
                ));
            }
            (c, a) => panic!("inconsistent: cancel {c}, accept {:?}", a.err()),
        }
        assert_eq!(l.pending(), 0);
    }
    assert_eq!(cancelled + accepted, 200);
    assert_eq!(n.stats().live_qps, 0);
}

#[test]
fn set_error_racing_posts_completes_every_post_exactly_once() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 24, 1), 4);
    let (a, b) = pair(&n, &n, sa(ip(198, 18, 24, 1), 1));
    let src = Buf::new(&n, 64, Access::NONE);
    let target = Buf::zeroed(&n, 64, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let rkey = n
        .bind_remote(target.lkey, b.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    for i in 0..4 {
        recv(&a.qp, 1_000_000 + i, &[target.sge(0, 8)]);
    }
    const N: u64 = 200;
    let oks = std::thread::scope(|s| {
        let poster = s.spawn(|| {
            let mut oks = Vec::new();
            for i in 0..N {
                let r = a.qp.post_send(&SendWr {
                    wr_id: i,
                    op: SendOp::RdmaWrite {
                        remote_addr: target.addr(),
                        rkey,
                    },
                    sges: &[src.sge(0, 8)],
                });
                if r.is_ok() {
                    oks.push(i);
                }
            }
            oks
        });
        a.qp.set_error();
        poster.join().unwrap()
    });
    let mut seen = Vec::new();
    loop {
        let got = a.poll();
        if got.is_empty() {
            break;
        }
        for wc in got {
            assert!(
                matches!(wc.status, WcStatus::Success | WcStatus::Flushed),
                "{wc:?}"
            );
            seen.push(wc.wr_id);
        }
    }
    let mut expected = oks;
    expected.extend(1_000_000..1_000_004);
    seen.sort_unstable();
    expected.sort_unstable();
    assert_eq!(seen, expected, "one completion per accepted post");
    assert_eq!((a.events.count(), b.events.count()), (0, 1));
}

#[test]
fn private_data_reaches_the_listener_and_is_bounded() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 17, 1), 4);
    let (lev, lrx) = Probe::new();
    let to = sa(ip(198, 18, 17, 1), 1);
    let l = n.listen(to, 4, lev.clone()).unwrap();
    let cq = n.create_cq(64, Probe::new().0).unwrap();
    let ev = Probe::new().0;
    let from = sa(ip(198, 18, 17, 1), 2);
    let data: Vec<u8> = (0..MAX_PRIVATE_DATA as u8).collect();
    n.connect_with_data(from, to, params(&cq, &ev, 4), &data, Box::new(|_| {}))
        .unwrap();
    lrx.recv_timeout(WAIT).unwrap();
    assert_eq!(l.peek().unwrap().private_data(), &data[..]);
    l.peek().unwrap().reject();
    // None without it; more than the limit is refused up front.
    n.connect(from, to, params(&cq, &ev, 4), Box::new(|_| {}))
        .unwrap();
    lrx.recv_timeout(WAIT).unwrap();
    assert!(l.peek().unwrap().private_data().is_empty());
    l.peek().unwrap().reject();
    let long = vec![0u8; MAX_PRIVATE_DATA + 1];
    let refused = n.connect_with_data(from, to, params(&cq, &ev, 4), &long, Box::new(|_| {}));
    assert_eq!(refused.err(), Some(ConnectError::NoResources));
    assert_eq!(l.pending(), 0);
}

/// `m` connections from `a` to `b`, the connector ends on one CQ of `a`,
/// the acceptor ends on one CQ of `b`: (connector QPs, acceptor QPs, the
/// two CQs and their wakers' probes and channels).
#[allow(clippy::type_complexity)]
fn pairs_on_shared_cqs(
    a: &SoftNic,
    b: &SoftNic,
    to: SocketAddrV4,
    m: usize,
) -> (
    Vec<Arc<dyn QueuePair>>,
    Vec<Arc<dyn QueuePair>>,
    [(Arc<dyn CompletionQueue>, Arc<Probe>, Receiver<()>); 2],
) {
    let (lev, lrx) = Probe::new();
    let l = b.listen(to, 4, lev).unwrap();
    let (aw, arx) = Probe::new();
    let (bw, brx) = Probe::new();
    let depth = 16 * m as u32;
    let acq = a.create_cq(depth, aw.clone()).unwrap();
    let bcq = b.create_cq(depth, bw.clone()).unwrap();
    let ev = Probe::new().0;
    let (mut qa, mut qb) = (Vec::new(), Vec::new());
    for i in 0..m {
        let (tx, rx) = mpsc::channel();
        let from = sa(a.addresses()[0], 20000 + i as u16);
        a.connect(
            from,
            to,
            params(&acq, &ev, 8),
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
        lrx.recv_timeout(WAIT).expect("request_arrived");
        qb.push(l.peek().unwrap().accept(params(&bcq, &ev, 8)).unwrap());
        qa.push(rx.recv_timeout(WAIT).expect("done").unwrap());
    }
    (qa, qb, [(acq, aw, arx), (bcq, bw, brx)])
}

/// `m` connected pairs between two NICs of `198.18.{subnet}.0/24`, the
/// connecting ends on one shared CQ and the accepting ends on another, an
/// 8-byte send source on the first NIC and `m` 8-byte receive slots on the
/// second: the round robins of the hot-list tests. Fields drop in order,
/// the network last.
struct RoundRobin {
    dst: Buf,
    src: Buf,
    sa_cq: Arc<SoftCq>,
    sb_cq: Arc<SoftCq>,
    qa: Vec<Arc<dyn QueuePair>>,
    qb: Vec<Arc<dyn QueuePair>>,
    acq: Arc<dyn CompletionQueue>,
    bcq: Arc<dyn CompletionQueue>,
    _nics: [Arc<SoftNic>; 2],
    _net: Arc<SoftNetwork>,
}

fn round_robin(subnet: u8, m: usize) -> RoundRobin {
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, subnet, 1), 8),
        nic_on(&net, ip(198, 18, subnet, 2), 8),
    );
    let (qa, qb, [(acq, ..), (bcq, ..)]) =
        pairs_on_shared_cqs(&n1, &n2, sa(ip(198, 18, subnet, 2), 1), m);
    RoundRobin {
        dst: Buf::new(&n2, 8 * m, Access::LOCAL_WRITE),
        src: Buf::new(&n1, 8, Access::NONE),
        sa_cq: soft_cq(&n1, &acq),
        sb_cq: soft_cq(&n2, &bcq),
        qa,
        qb,
        acq,
        bcq,
        _nics: [n1, n2],
        _net: net,
    }
}

/// The soft CQ behind a `dyn` one of `nic`.
fn soft_cq(nic: &SoftNic, cq: &Arc<dyn CompletionQueue>) -> Arc<SoftCq> {
    nic.shared.cq(cq.id()).expect("a live CQ of this NIC")
}

#[test]
fn a_cq_dropped_before_any_poll_frees_its_connections() {
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 23, 1), 8),
        nic_on(&net, ip(198, 18, 23, 2), 8),
    );
    let (qa, qb, [(acq, aw, _), (bcq, bw, _)]) =
        pairs_on_shared_cqs(&n1, &n2, sa(ip(198, 18, 23, 2), 1), 2);
    // Attached, never polled: the CQs hold the ends, the ends the CQs.
    drop((qa, qb, acq, bcq));
    assert_eq!(
        Arc::strong_count(&aw),
        1,
        "the first CQ's shared part leaked"
    );
    assert_eq!(
        Arc::strong_count(&bw),
        1,
        "the second CQ's shared part leaked"
    );
}

#[test]
fn a_poll_visits_only_the_ends_with_work() {
    const M: usize = 200;
    // Owned: the test drops the queue pairs; the NICs live to its end.
    let RoundRobin {
        qa,
        qb,
        acq,
        bcq,
        sa_cq,
        sb_cq,
        src,
        dst,
        _nics,
        _net,
    } = round_robin(22, M);
    // A receive pending on every acceptor end, as a server holds them.
    for (k, qp) in qb.iter().enumerate() {
        recv(qp, k as u64, &[dst.sge(8 * k, 8)]);
    }
    let mut out = [WorkCompletion::EMPTY; 16];
    // Every end starts hot; with this many hot, a visit that finds
    // nothing idles an end.
    assert_eq!(sb_cq.ends(), (0, 0), "attached, not yet taken in");
    assert_eq!(bcq.poll(&mut out), 0);
    assert_eq!(sb_cq.ends(), (M, 0));
    for _ in 0..=cq::IDLE_POLLS {
        assert_eq!(acq.poll(&mut out), 0);
        assert_eq!(bcq.poll(&mut out), 0);
    }
    assert_eq!(sa_cq.ends(), (M, 0), "quiet ends leave the hot list");
    assert_eq!(sb_cq.ends(), (M, 0));
    // Idle, they cost a poll nothing.
    let (va, vb) = (sa_cq.visits(), sb_cq.visits());
    for _ in 0..100 {
        assert_eq!(acq.poll(&mut out), 0);
        assert_eq!(bcq.poll(&mut out), 0);
    }
    assert_eq!((sa_cq.visits(), sb_cq.visits()), (va, vb));
    // One message on connection k: each side's polls visit that end only.
    for k in [7, M - 1, 0] {
        let (va, vb) = (sa_cq.visits(), sb_cq.visits());
        send(&qa[k], 1000 + k as u64, &[src.sge(0, 8)]);
        let (mut polls, mut got) = (0u64, Vec::new());
        while got.len() < 2 {
            assert!(polls < 10_000, "completions of connection {k} lost");
            polls += 1;
            let n = bcq.poll(&mut out);
            got.extend(statuses(&out[..n]));
            let n = acq.poll(&mut out);
            got.extend(statuses(&out[..n]));
        }
        got.sort_by_key(|(id, _)| *id);
        assert_eq!(
            got,
            [
                (k as u64, WcStatus::Success),
                (1000 + k as u64, WcStatus::Success)
            ]
        );
        assert!(sa_cq.visits() - va <= polls, "a polls one end at most");
        assert!(sb_cq.visits() - vb <= polls, "b polls one end at most");
        for _ in 0..=cq::IDLE_POLLS {
            acq.poll(&mut out);
            bcq.poll(&mut out);
        }
        assert_eq!((sa_cq.ends().1, sb_cq.ends().1), (0, 0));
    }
    // Destroyed queue pairs flush their receives and are forgotten.
    drop(qa);
    drop(qb);
    let mut flushed = 0;
    for _ in 0..=cq::IDLE_POLLS {
        flushed += bcq.poll(&mut out);
        acq.poll(&mut out);
    }
    assert_eq!(flushed, M - 3);
    assert_eq!(sa_cq.ends(), (0, 0));
    assert_eq!(sb_cq.ends(), (0, 0));
}

/// A server's round robin over many connections of one CQ: each message
/// wakes an idle end. The ends that had a message stay hot only for a
/// share of `IDLE_POLLS` quiet visits, so a poll visits the end with work
/// and about two more, not every end that had a message in the last
/// `IDLE_POLLS` polls.
#[test]
fn round_robin_over_many_ends_keeps_the_hot_list_short() {
    const M: usize = 256;
    const ROUNDS: usize = 4 * M;
    let rr = &round_robin(24, M);
    for (k, qp) in rr.qb.iter().enumerate() {
        recv(qp, k as u64, &[rr.dst.sge(8 * k, 8)]);
    }
    let mut out = [WorkCompletion::EMPTY; 16];
    let (mut visits, mut polls) = (0, 0);
    for round in 0..ROUNDS {
        let k = round % M;
        if round == M {
            // Counted from the second lap on, every end idle since its
            // last message.
            (visits, polls) = (rr.sa_cq.visits() + rr.sb_cq.visits(), 0);
        }
        send(&rr.qa[k], (M + k) as u64, &[rr.src.sge(0, 8)]);
        let mut got = 0;
        while got < 2 {
            assert!(polls < 100 * ROUNDS as u64, "completions of {k} lost");
            polls += 2;
            got += rr.bcq.poll(&mut out);
            got += rr.acq.poll(&mut out);
        }
        recv(&rr.qb[k], k as u64, &[rr.dst.sge(8 * k, 8)]);
    }
    let per_poll = (rr.sa_cq.visits() + rr.sb_cq.visits() - visits) as f64 / polls as f64;
    // Each end kept hot for `IDLE_POLLS` quiet visits: 65 visits per poll
    // here; with them divided by the hot ends: 8.5; by their cube: 3 (the
    // end with work and two that had some).
    assert!(
        per_poll < 4.0,
        "a poll visits {per_poll:.1} ends on average ({polls} polls)"
    );
}

/// A thread that keeps polling while it waits on a connection whose end
/// just came in (a round robin: a server waiting for the rest of a
/// request, a client for its reply): the end of the last round, busy until
/// then, is displaced by the new one and leaves the hot list at its first
/// quiet visit, and the new end, alone on the list, stays hot for
/// `IDLE_POLLS` quiet visits, so that the work it waits for needs no
/// announcement. Two ends hot without displacement both left after 8
/// quiet visits, the awaited one with them.
#[test]
fn a_round_robin_displaces_the_last_rounds_end_and_keeps_the_new_one_hot() {
    const M: usize = 64;
    const ROUNDS: usize = 4 * M;
    /// Polls of the receiving CQ per round while its new end has nothing.
    const WAIT_POLLS: u64 = 16;
    let rr = &round_robin(25, M);
    let mut out = [WorkCompletion::EMPTY; 16];
    for round in 0..ROUNDS {
        let k = round % M;
        // The message waits for its receive: its end comes in with nothing
        // to reap, while the last round's end had its completion last.
        send(&rr.qa[k], (M + k) as u64, &[rr.src.sge(0, 8)]);
        let visits = rr.sb_cq.visits();
        for _ in 0..WAIT_POLLS {
            assert_eq!(rr.bcq.poll(&mut out), 0);
        }
        if round >= M {
            let visits = rr.sb_cq.visits() - visits;
            assert!(
                visits <= WAIT_POLLS + 1,
                "round {round}: {visits} visits in {WAIT_POLLS} polls"
            );
            assert_eq!(
                rr.sb_cq.ends().1,
                1,
                "round {round}: the new end is not hot"
            );
        }
        recv(&rr.qb[k], k as u64, &[rr.dst.sge(8 * k, 8)]);
        let mut got = 0;
        for _ in 0..100 {
            got += rr.bcq.poll(&mut out);
            got += rr.acq.poll(&mut out);
            if got == 2 {
                break;
            }
        }
        assert_eq!(got, 2, "round {round}: completions lost");
    }
}

#[test]
fn ends_idle_and_announced_across_threads_lose_no_wake_up() {
    const M: usize = 48;
    const ROUNDS: usize = 40;
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 23, 1), 8),
        nic_on(&net, ip(198, 18, 23, 2), 8),
    );
    let (qa, qb, [(acq, _, arx), (bcq, _, brx)]) =
        pairs_on_shared_cqs(&n1, &n2, sa(ip(198, 18, 23, 2), 1), M);
    let abuf = Buf::new(&n1, 16 * M, Access::LOCAL_WRITE);
    let bbuf = Buf::new(&n2, 16 * M, Access::LOCAL_WRITE);
    for k in 0..M {
        recv(&qa[k], k as u64, &[abuf.sge(16 * k, 8)]);
        recv(&qb[k], k as u64, &[bbuf.sge(16 * k, 8)]);
    }
    const SENT: u64 = 1 << 32;

    /// The next completion: poll, else arm and sleep on the waker's
    /// channel (deadline: fail).
    fn next(cq: &Arc<dyn CompletionQueue>, woken: &Receiver<()>) -> WorkCompletion {
        let deadline = std::time::Instant::now() + WAIT;
        let mut out = [WorkCompletion::EMPTY; 1];
        loop {
            if cq.poll(&mut out) == 1 {
                assert_eq!(out[0].status, WcStatus::Success);
                return out[0];
            }
            if !cq.arm() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                woken.recv_timeout(left).expect("a completion was lost");
            }
        }
    }

    std::thread::scope(|s| {
        let (qa, qb, abuf, bbuf) = (&qa, &qb, &abuf, &bbuf);
        // Echo side: every message comes back on its connection.
        s.spawn(move || {
            let mut sends_due = 0;
            for _ in 0..M * ROUNDS {
                let wc = loop {
                    let wc = next(&bcq, &brx);
                    if wc.wr_id & SENT == 0 {
                        break wc;
                    }
                    sends_due -= 1;
                };
                let k = wc.wr_id as usize;
                recv(&qb[k], k as u64, &[bbuf.sge(16 * k, 8)]);
                send(&qb[k], SENT | k as u64, &[bbuf.sge(16 * k, 8)]);
                sends_due += 1;
            }
            while sends_due > 0 {
                assert_ne!(next(&bcq, &brx).wr_id & SENT, 0);
                sends_due -= 1;
            }
        });
        // Round robin: each connection is idle for M - 1 round trips.
        for i in 0..M * ROUNDS {
            let k = i % M;
            send(&qa[k], SENT | k as u64, &[abuf.sge(16 * k + 8, 8)]);
            let mut got = [false; 2];
            while got != [true, true] {
                let wc = next(&acq, &arx);
                assert_eq!(wc.wr_id & !SENT, k as u64, "round {i}");
                got[usize::from(wc.wr_id & SENT != 0)] = true;
            }
            recv(&qa[k], k as u64, &[abuf.sge(16 * k, 8)]);
        }
    });
}

#[test]
fn deregistration_waits_only_for_the_queue_pairs_that_used_the_region() {
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 24, 1), 4);
    let (a, _a2) = pair(&n, &n, sa(ip(198, 18, 24, 1), 1));
    let (b, _b2) = pair(&n, &n, sa(ip(198, 18, 24, 1), 2));
    let buf = Buf::new(&n, 64, Access::LOCAL_WRITE);
    recv(&a.qp, 1, &[buf.sge(0, 8)]);
    // A post on b's queue pair in progress (its post lock held): the
    // region only a's posts looked up does not wait for it.
    let (link, end) = lock(&n.shared.qps)[&b.qp.num().0].clone();
    let link = link.upgrade().expect("b is live");
    let posting = link.ends[end].post.lock();
    let (tx, rx) = mpsc::channel();
    let nic = n.clone();
    let lkey = buf.lkey;
    let t = std::thread::spawn(move || {
        nic.deregister(lkey);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(WAIT)
        .expect("deregistration waited for a queue pair that never used the region");
    drop(posting);
    t.join().unwrap();
    // a's receive still completes (flushed at close) once; the key is gone.
    let err = a.qp.post_recv(&RecvWr {
        wr_id: 2,
        sges: &[buf.sge(0, 8)],
    });
    assert!(err.is_ok());
    a.qp.set_error();
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(statuses(&a.poll()));
    }
    assert_eq!(
        got,
        [(1, WcStatus::Flushed), (2, WcStatus::LocalProtectionError)]
    );
}

/// Queues a send of `src` on `qp`'s outgoing ring the way a post does, but
/// without its wake: as if the post's load of the receiving end's `idle`
/// had passed its store of the message (the producer's fence is only a
/// compiler fence, `fence`), so the idle end is not announced.
fn send_unannounced(nic: &SoftNic, qp: &Arc<dyn QueuePair>, wr_id: WrId, src: &Buf) {
    let (link, end) = lock(&nic.shared.qps)[&qp.num().0].clone();
    let link = link.upgrade().expect("a live queue pair");
    let mut guard = link.ends[end].post.lock();
    let p = &mut *guard;
    let sges = [src.sge(0, 8)];
    // SAFETY: `src` is registered and lives until the test ends, after the
    // message was consumed.
    let index = unsafe { p.cells.push(&sges, 8, 0) }.expect("room in the ring");
    p.sends.push(
        &p.queues,
        wq::SqEntry {
            wr_id,
            opcode: WcOpcode::Send,
            kind: wq::SqKind::Cell { index, len: 8 },
        },
    );
}

/// With asymmetric fences only (CI runs the soft NIC's tests with them):
/// with full fences a producer cannot miss an idle end (see
/// `parked_ends_do_not_cool_with_full_fences`).
#[test]
fn an_idle_end_with_work_nobody_announced_is_found_by_the_next_polls_and_by_arm() {
    if fence::light_is_full() {
        eprintln!("skipped: needs SANPATH_SOFT_FENCES=asymmetric");
        return;
    }
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 25, 1), 8),
        nic_on(&net, ip(198, 18, 25, 2), 8),
    );
    let (a, b) = pair(&n1, &n2, sa(ip(198, 18, 25, 2), 1));
    let bcq = soft_cq(&n2, &b.cq);
    let src = Buf::with(&n1, 8, Access::NONE, |i| i as u8);
    let dst = Buf::zeroed(&n2, 24, Access::LOCAL_WRITE);
    recv(&b.qp, 1, &[dst.sge(0, 8)]);
    recv(&b.qp, 2, &[dst.sge(8, 8)]);
    recv(&b.qp, 3, &[dst.sge(16, 8)]);
    let park = || {
        for _ in 0..=cq::IDLE_POLLS {
            assert!(b.poll().is_empty());
        }
        assert_eq!(bcq.ends(), (1, 0), "the quiet end left the hot list");
    };
    // Polls: the end is re-checked while it cools, a few polls at most.
    park();
    send_unannounced(&n1, &a.qp, 10, &src);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(statuses(&b.poll()));
    }
    assert_eq!(got, [(1, WcStatus::Success)], "the next polls find it");
    // arm, before a sleep: its re-check finds it at once.
    park();
    send_unannounced(&n1, &a.qp, 11, &src);
    assert!(b.cq.arm(), "arm reports the unannounced work");
    assert_eq!(statuses(&b.poll()), [(2, WcStatus::Success)]);
    // An end that cooled long enough is left to the heavy fence: polls no
    // longer visit it (at 10,000 parked ends they would touch cold ones on
    // every poll), arm still finds its work.
    park();
    let start = clock::ticks();
    while clock::ticks().wrapping_sub(start) < cq::COOLING_TICKS {
        std::hint::spin_loop();
    }
    for _ in 0..cq::COOLING_MIN_CHECKS {
        assert!(
            b.poll().is_empty(),
            "the re-checks that move it find nothing"
        );
    }
    send_unannounced(&n1, &a.qp, 12, &src);
    for _ in 0..4 {
        assert!(b.poll().is_empty(), "polls leave a cooled end alone");
    }
    assert!(b.cq.arm(), "arm reports the cooled end's work");
    assert_eq!(statuses(&b.poll()), [(3, WcStatus::Success)]);
    let mut sent = Vec::new();
    for _ in 0..4 * ACK_POLLS {
        sent.extend(statuses(&a.poll()));
    }
    assert_eq!(
        sent,
        [
            (10, WcStatus::Success),
            (11, WcStatus::Success),
            (12, WcStatus::Success)
        ]
    );
}

/// Polls after which a sender has read its peer's consumed index.
const ACK_POLLS: usize = 32;

/// With full fences (the default) an end's re-check as it goes idle is
/// final: it does not cool, so later polls re-check nothing.
#[test]
fn parked_ends_do_not_cool_with_full_fences() {
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 26, 1), 8),
        nic_on(&net, ip(198, 18, 26, 2), 8),
    );
    let (a, b) = pair(&n1, &n2, sa(ip(198, 18, 26, 2), 1));
    let bcq = soft_cq(&n2, &b.cq);
    let src = Buf::with(&n1, 8, Access::NONE, |i| i as u8);
    let dst = Buf::zeroed(&n2, 8, Access::LOCAL_WRITE);
    recv(&b.qp, 1, &[dst.sge(0, 8)]);
    for _ in 0..=cq::IDLE_POLLS {
        assert!(b.poll().is_empty());
    }
    assert_eq!(bcq.ends(), (1, 0), "the quiet end left the hot list");
    let full = fence::light_is_full();
    assert_eq!(
        bcq.cooling() == 0,
        full,
        "ends cool with asymmetric fences only"
    );
    // The producer's announcement still brings it back.
    send(&a.qp, 10, &[src.sge(0, 8)]);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(statuses(&b.poll()));
    }
    assert_eq!(got, [(1, WcStatus::Success)]);
}

/// A sender whose message the receiving end's matcher is copying (its
/// lock held) may sleep: `arm` does not claim the message for it to match
/// (it spun through every long copy, taking the CPU time the copier needed
/// on a shared machine). The matcher's publish wakes it; a matcher that
/// lets go having consumed nothing wakes it too, and it then takes the
/// message itself.
#[test]
fn a_sender_sleeps_while_the_matcher_copies_and_is_woken_when_it_ends() {
    let Watched {
        n,
        cq,
        waker,
        woken,
        a,
        b,
        _keep,
    } = watched_loopback(26);
    let (link, end) = lock(&n.shared.qps)[&b.num().0].clone();
    let link = link.upgrade().expect("a live queue pair");
    let src = Buf::with(&n, 4096, Access::NONE, |i| i as u8);
    let dst = Buf::zeroed(&n, 2 * 4096, Access::LOCAL_WRITE);
    for (i, wr_id) in [10, 11].into_iter().enumerate() {
        recv(&a, wr_id, &[dst.sge(i * 4096, 4096)]);
        send(&b, wr_id + 10, &[src.sge(0, 4096)]);
    }
    // The receiving end's matcher at work: the sender's CQ may sleep.
    let m = link.hold_matcher(end);
    assert!(
        !cq.arm(),
        "a sender arming while its message is being matched may sleep"
    );
    assert_eq!(waker.count(), 0);
    // It lets go having consumed nothing (it looked before the messages
    // were there): the sender is woken and matches them itself.
    link.release_matcher(end, m);
    woken
        .recv_timeout(WAIT)
        .expect("a matcher leaving the messages wakes the sender");
    assert!(cq.arm(), "nobody matches them now: the sender does");
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while got.len() < 2 {
        let mut out = [WorkCompletion::EMPTY; 8];
        let k = cq.poll(&mut out);
        got.extend(statuses(&out[..k]));
        assert!(std::time::Instant::now() < deadline, "sends not done");
    }
    assert_eq!(got, [(20, WcStatus::Success), (21, WcStatus::Success)]);
    assert_eq!(dst.mem[..4096], src.mem[..]);
    assert_eq!(dst.mem[4096..], src.mem[..]);
}

/// A run-to-completion wait that polls one CQ arms that CQ alone: work on
/// another CQ does not wake it (it would only find nothing to reap), and
/// another CQ being polled does not keep it awake (a soft CQ whose poll
/// holds its lock answers an arm with "completions waiting").
#[test]
fn a_wait_on_one_cq_arms_only_that_cq() {
    use crate::config::{Config, PollerMode};
    use crate::poller::Progress;
    let net = SoftNetwork::new();
    let n = nic_on(&net, ip(198, 18, 27, 1), 4);
    let mut config = Config::default();
    config.poller.mode = PollerMode::RunToCompletion;
    config.poller.count = 2;
    let (front, woken) = Probe::new();
    let progress = Progress::start(&*n, &config, front.clone()).unwrap();
    // A connection whose two ends complete on CQ 1.
    let (lev, _lrx) = Probe::new();
    let l = n.listen(sa(ip(198, 18, 27, 1), 1), 4, lev).unwrap();
    let ev = Probe::new().0;
    let on_cq1 = || QpParams {
        cq: progress.cq_id(1),
        send_depth: 8,
        recv_depth: 8,
        max_sge: 4,
        events: ev.clone(),
    };
    let (tx, rx) = mpsc::channel();
    n.connect(
        sa(ip(198, 18, 27, 1), 2),
        sa(ip(198, 18, 27, 1), 1),
        on_cq1(),
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    let b = l.peek().unwrap().accept(on_cq1()).unwrap();
    let a = rx.recv_timeout(WAIT).unwrap().unwrap();
    let buf = Buf::new(&n, 64, Access::LOCAL_WRITE);
    let exchange = |wr_id: WrId| {
        recv(&b, wr_id, &[buf.sge(0, 8)]);
        send(&a, wr_id + 1, &[buf.sge(32, 8)]);
    };
    assert!(!progress.arm_only(Some(0)));
    exchange(1);
    assert_eq!(front.count(), 0, "CQ 1's work woke a wait on CQ 0");
    // Armed the same way for CQ 1 (which has work already, and says so:
    // the request stays), its work wakes.
    assert!(progress.arm_only(Some(1)));
    exchange(3);
    woken
        .recv_timeout(WAIT)
        .expect("CQ 1's work wakes a wait on CQ 1");
}

/// Two threads posting RDMA writes on one end (the post lock's bias moves
/// between them, then the lock is shared), while a third binds and revokes
/// remote keys for that end (each a control path through its post lock):
/// every write lands when its post returns, and every accepted post
/// completes exactly once.
#[test]
fn two_threads_posting_on_one_end_lose_and_duplicate_nothing() {
    const PER: u64 = 2_000;
    let net = SoftNetwork::new();
    let (n1, n2) = (
        nic_on(&net, ip(198, 18, 30, 1), 4),
        nic_on(&net, ip(198, 18, 30, 2), 4),
    );
    let (a, b) = pair(&n1, &n2, sa(ip(198, 18, 30, 2), 1));
    let local = Buf::zeroed(&n1, 16, Access::NONE);
    let target = Buf::zeroed(&n2, 16, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let rkey = n2
        .bind_remote(target.lkey, b.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    let spare = Buf::zeroed(&n2, 16, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let posting = AtomicUsize::new(2);
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = std::collections::HashSet::new();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (a, local, target, posting) = (&a, &local, &target, &posting);
            s.spawn(move || {
                let slot = t as usize * 8;
                for k in 0..PER {
                    let v = t << 32 | k;
                    // SAFETY: only this thread writes its slot of `local`,
                    // and the NIC reads it only during this thread's post.
                    unsafe { (local.ptr.add(slot) as *mut u64).write_unaligned(v) };
                    let wr = SendWr {
                        wr_id: v,
                        op: SendOp::RdmaWrite {
                            remote_addr: target.addr() + slot as u64,
                            rkey,
                        },
                        sges: &[local.sge(slot, 8)],
                    };
                    loop {
                        match a.qp.post_send(&wr) {
                            Ok(()) => break,
                            Err(PostError::QueueFull) => {
                                assert!(std::time::Instant::now() < deadline, "no room");
                                std::thread::yield_now();
                            }
                            Err(e) => panic!("post {v:#x}: {e:?}"),
                        }
                    }
                    // SAFETY: only this thread's writes reach its slot of
                    // `target`, and the write executed in its post.
                    let got = unsafe { (target.ptr.add(slot) as *const u64).read_unaligned() };
                    assert_eq!(got, v, "write {v:#x} landed");
                }
                posting.fetch_sub(1, Ordering::Release);
            });
        }
        let (n2, b, spare, posting) = (&n2, &b, &spare, &posting);
        s.spawn(move || {
            while posting.load(Ordering::Acquire) != 0 {
                let k = n2
                    .bind_remote(spare.lkey, b.qp.num(), Access::REMOTE_WRITE)
                    .unwrap();
                n2.unbind_remote(k);
            }
        });
        while seen.len() < 2 * PER as usize {
            for wc in a.poll() {
                assert_eq!(wc.status, WcStatus::Success, "write {:#x}", wc.wr_id);
                assert!(
                    seen.insert(wc.wr_id),
                    "write {:#x} completed twice",
                    wc.wr_id
                );
            }
            assert!(std::time::Instant::now() < deadline, "completions missing");
            std::thread::yield_now();
        }
    });
    assert!(a.poll().is_empty(), "more completions than posts");
    assert_eq!(a.events.count() + b.events.count(), 0, "the link stayed up");
}
