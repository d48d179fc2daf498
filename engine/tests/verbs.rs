//! The `verbs` fabric on a real RDMA stack. These tests need an RDMA device
//! (Soft-RoCE `rxe0`, and `rxe1` for the two-device tests); on a machine
//! without one they print "skipped" and pass, unless
//! `SANPATH_VERBS_REQUIRE=1` (which `tools/rxe-vm/test` sets inside the VM).
//!
//! `tools/rxe-vm/test` runs them in one Soft-RoCE VM:
//! - `rxe0 ↔ rxe0` (two NIC objects on one device: loopback),
//! - `rxe0 ↔ rxe1` over the veth pair (two devices as two hosts),
//! - the `fault_*` tests (link down, peer killed) only with
//!   `SANPATH_VERBS_FAULTS=1`, since they take the link down.
//!
//! Sizes are small: under QEMU's TCG everything is 10–30× slower.
#![cfg(feature = "verbs")]

use sanpath::fabric::verbs::{device_names, VerbsConfig, VerbsNic};
use sanpath::fabric::{
    Access, CompletionQueue, ConnectError, ListenerEvents, Nic, QpEvents, QpParams, QueuePair,
    RecvWr, SendOp, SendWr, Sge, Waker, WcOpcode, WcStatus, WorkCompletion,
};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Generous: connection set-up and retries under TCG.
const LIMIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------- helpers --

fn have(dev: &str) -> bool {
    if device_names().iter().any(|d| d == dev) {
        return true;
    }
    if std::env::var("SANPATH_VERBS_REQUIRE").as_deref() == Ok("1") {
        panic!(
            "RDMA device {dev} required but absent (present: {:?})",
            device_names()
        );
    }
    eprintln!("skipped: no RDMA device {dev}");
    false
}

fn faults_enabled() -> bool {
    let on = std::env::var("SANPATH_VERBS_FAULTS").as_deref() == Ok("1");
    if !on {
        eprintln!("skipped: set SANPATH_VERBS_FAULTS=1 (takes links down)");
    }
    on
}

fn open(dev: &str) -> Arc<VerbsNic> {
    VerbsNic::open(VerbsConfig {
        device: Some(dev.into()),
        ..VerbsConfig::default()
    })
    .unwrap_or_else(|e| panic!("open {dev}: {e}"))
}

/// Distinct ports for tests running in parallel.
fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    20000 + (std::process::id() % 1000) as u16 * 20 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A counter with a condition variable: a CQ waker, QP events and listener
/// events all in one.
#[derive(Default)]
struct Signal {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    fn get(&self) -> u64 {
        *self.count.lock().unwrap()
    }

    /// Waits until the count differs from `seen` or `d` passed.
    fn wait_change(&self, seen: u64, d: Duration) -> u64 {
        let g = self.count.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, d, |c| *c == seen).unwrap();
        *g
    }

    fn fire(&self) {
        *self.count.lock().unwrap() += 1;
        self.cv.notify_all();
    }
}

impl Waker for Signal {
    fn wake(&self) {
        self.fire();
    }
}
impl QpEvents for Signal {
    fn disconnected(&self) {
        self.fire();
    }
}
impl ListenerEvents for Signal {
    fn request_arrived(&self) {
        self.fire();
    }
}

struct Cq {
    cq: Arc<dyn CompletionQueue>,
    sig: Arc<Signal>,
}

impl Cq {
    fn new(nic: &Arc<VerbsNic>) -> Cq {
        let sig = Arc::new(Signal::default());
        let cq = nic.create_cq(256, sig.clone()).expect("create_cq");
        Cq { cq, sig }
    }

    /// The next completion, sleeping on the CQ's wake-up (arm) in between.
    fn next(&self, limit: Duration) -> WorkCompletion {
        let end = Instant::now() + limit;
        let mut out = [WorkCompletion::EMPTY];
        loop {
            if self.cq.poll(&mut out) == 1 {
                return out[0];
            }
            let seen = self.sig.get();
            if self.cq.arm() {
                continue;
            }
            let now = Instant::now();
            assert!(now < end, "no completion within {limit:?}");
            self.sig.wait_change(seen, end - now);
        }
    }

    fn expect_none(&self, d: Duration) {
        std::thread::sleep(d);
        let mut out = [WorkCompletion::EMPTY];
        assert_eq!(
            self.cq.poll(&mut out),
            0,
            "unexpected completion {:?}",
            out[0]
        );
    }
}

/// A registered buffer.
struct Buf {
    mem: Vec<u8>,
    lkey: u32,
}

impl Buf {
    fn new(nic: &Arc<VerbsNic>, len: usize, access: Access) -> Buf {
        let mut mem = vec![0u8; len];
        // SAFETY: the Vec is neither moved nor freed before `free`
        // deregisters it (tests call free before dropping).
        let keys =
            unsafe { nic.register(mem.as_mut_ptr() as usize, len, access) }.expect("register");
        Buf {
            mem,
            lkey: keys.lkey,
        }
    }

    fn sge(&self, off: usize, len: usize) -> Sge {
        Sge {
            addr: self.mem.as_ptr() as usize + off,
            len: len as u32,
            lkey: self.lkey,
        }
    }

    fn addr(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    fn free(self, nic: &Arc<VerbsNic>) {
        nic.deregister(self.lkey);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One side of a connection.
struct Side {
    nic: Arc<VerbsNic>,
    cq: Cq,
    qp: Arc<dyn QueuePair>,
    events: Arc<Signal>,
}

fn params(cq: &Cq, events: &Arc<Signal>) -> QpParams {
    QpParams {
        cq: cq.cq.id(),
        send_depth: 64,
        recv_depth: 64,
        max_sge: 4,
        events: events.clone(),
    }
}

/// Connects `client` to a fresh listener of `server`; returns (server side,
/// client side).
fn pair(server: &Arc<VerbsNic>, client: &Arc<VerbsNic>) -> (Side, Side) {
    let sip = server.addresses()[0];
    let cip = client.addresses()[0];
    let lsig = Arc::new(Signal::default());
    let at = SocketAddrV4::new(sip, port());
    let listener = server.listen(at, 4, lsig.clone()).expect("listen");
    let (ccq, cev) = (Cq::new(client), Arc::new(Signal::default()));
    let (tx, rx) = mpsc::channel();
    let _attempt = client
        .connect(
            SocketAddrV4::new(cip, 0),
            at,
            params(&ccq, &cev),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .expect("connect");
    let end = Instant::now() + LIMIT;
    let req = loop {
        let seen = lsig.get();
        if let Some(r) = listener.peek() {
            break r;
        }
        assert!(Instant::now() < end, "no connection request");
        lsig.wait_change(seen, Duration::from_millis(200));
    };
    assert_eq!(req.peer_addr().ip(), &cip);
    assert_eq!(req.local_addr(), at);
    let (scq, sev) = (Cq::new(server), Arc::new(Signal::default()));
    let sqp = req.accept(params(&scq, &sev)).expect("accept");
    assert_eq!(listener.pending(), 0);
    let cqp = rx
        .recv_timeout(LIMIT)
        .expect("connect callback")
        .expect("connected");
    assert_eq!(cqp.peer_addr(), at);
    assert_eq!(sqp.peer_addr(), cqp.local_addr());
    listener.close();
    (
        Side {
            nic: server.clone(),
            cq: scq,
            qp: sqp,
            events: sev,
        },
        Side {
            nic: client.clone(),
            cq: ccq,
            qp: cqp,
            events: cev,
        },
    )
}

fn send(side: &Side, wr_id: u64, sges: &[Sge]) {
    side.qp
        .post_send(&SendWr {
            wr_id,
            op: SendOp::Send,
            sges,
        })
        .expect("post_send");
}

fn recv(side: &Side, wr_id: u64, sges: &[Sge]) {
    side.qp
        .post_recv(&RecvWr { wr_id, sges })
        .expect("post_recv");
}

fn expect_ok(wc: WorkCompletion, wr_id: u64, opcode: WcOpcode, len: u32) {
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode, wc.byte_len),
        (wr_id, WcStatus::Success, opcode, len),
        "{wc:?}"
    );
}

/// Closes a connection the engine's way: error state, reap the flushes
/// (counted by the caller), drop.
fn close(side: Side) {
    side.qp.set_error();
    let t = Instant::now();
    drop(side.qp);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "QP destroy took {:?}",
        t.elapsed()
    );
}

// --------------------------------------------------------------- tests --

#[test]
fn open_reports_device_and_addresses() {
    if !have("rxe0") {
        return;
    }
    let nic = open("rxe0");
    assert_eq!(nic.device(), "rxe0");
    assert!(
        nic.addresses().contains(&Ipv4Addr::new(198, 18, 0, 1)),
        "{nic:?}"
    );
    eprintln!("{nic:?}");
    let err = VerbsNic::open(VerbsConfig {
        device: Some("nonexistent0".into()),
        ..VerbsConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

fn send_recv_byte_exact(server: &Arc<VerbsNic>, client: &Arc<VerbsNic>) {
    let (s, c) = pair(server, client);
    let sizes = [1usize, 60, 1000, 4096, 65536];
    let rbuf = Buf::new(&s.nic, 65536 * sizes.len(), Access::LOCAL_WRITE);
    let mut sbuf = Buf::new(&c.nic, 65536 * sizes.len(), Access::NONE);
    for (i, &n) in sizes.iter().enumerate() {
        recv(&s, 100 + i as u64, &[rbuf.sge(i * 65536, 65536)]);
        sbuf.mem[i * 65536..i * 65536 + n].copy_from_slice(&pattern(n, i as u8));
    }
    for (i, &n) in sizes.iter().enumerate() {
        send(&c, 200 + i as u64, &[sbuf.sge(i * 65536, n)]);
    }
    for (i, &n) in sizes.iter().enumerate() {
        expect_ok(c.cq.next(LIMIT), 200 + i as u64, WcOpcode::Send, n as u32);
    }
    for (i, &n) in sizes.iter().enumerate() {
        expect_ok(s.cq.next(LIMIT), 100 + i as u64, WcOpcode::Recv, n as u32);
        assert!(
            rbuf.mem[i * 65536..i * 65536 + n] == pattern(n, i as u8)[..],
            "message {i}"
        );
    }
    // Two gather entries into two scatter entries.
    recv(&s, 300, &[rbuf.sge(0, 10), rbuf.sge(100, 90)]);
    send(&c, 301, &[sbuf.sge(65536, 50), sbuf.sge(0, 50)]);
    expect_ok(c.cq.next(LIMIT), 301, WcOpcode::Send, 100);
    expect_ok(s.cq.next(LIMIT), 300, WcOpcode::Recv, 100);
    let mut want = sbuf.mem[65536..65536 + 50].to_vec();
    want.extend_from_slice(&sbuf.mem[..50]);
    assert_eq!(&rbuf.mem[..10], &want[..10]);
    assert_eq!(&rbuf.mem[100..190], &want[10..]);
    c.cq.expect_none(Duration::from_millis(50));
    close(c);
    close(s);
    rbuf.free(server);
    sbuf.free(client);
}

#[test]
fn rxe0_loopback_send_recv_byte_exact() {
    if !have("rxe0") {
        return;
    }
    send_recv_byte_exact(&open("rxe0"), &open("rxe0"));
}

#[test]
fn rxe0_rxe1_send_recv_byte_exact() {
    if !have("rxe0") || !have("rxe1") {
        return;
    }
    send_recv_byte_exact(&open("rxe1"), &open("rxe0"));
}

/// An arm repeated before the wake-up it asked for (the CQ still armed, so
/// no second notification request) still wakes at the next completion; and
/// the first arm after that wake asks again, so the completion after it
/// wakes too.
#[test]
fn an_arm_repeated_while_armed_wakes_and_the_arm_after_the_wake_asks_again() {
    if !have("rxe0") {
        return;
    }
    let nic = open("rxe0");
    let (s, c) = pair(&nic, &nic);
    let rbuf = Buf::new(&s.nic, 64, Access::LOCAL_WRITE);
    let sbuf = Buf::new(&c.nic, 64, Access::NONE);
    let mut out = [WorkCompletion::EMPTY];
    for round in 0..3u64 {
        recv(&s, 10 + round, &[rbuf.sge(0, 64)]);
        let seen = s.cq.sig.get();
        assert!(!s.cq.cq.arm(), "round {round}: nothing completed yet");
        assert!(
            !s.cq.cq.arm(),
            "round {round}: armed again, nothing completed"
        );
        send(&c, 20 + round, &[sbuf.sge(0, 8)]);
        let now = s.cq.sig.wait_change(seen, LIMIT);
        assert_ne!(now, seen, "round {round}: the completion woke nobody");
        assert_eq!(s.cq.cq.poll(&mut out), 1, "round {round}");
        expect_ok(out[0], 10 + round, WcOpcode::Recv, 8);
        expect_ok(c.cq.next(LIMIT), 20 + round, WcOpcode::Send, 8);
    }
    close(c);
    close(s);
    rbuf.free(&nic);
    sbuf.free(&nic);
}

fn rdma_write_read(server: &Arc<VerbsNic>, client: &Arc<VerbsNic>) {
    let (s, c) = pair(server, client);
    let n = 16384;
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
    let target = Buf::new(&s.nic, n, access);
    let rkey = s
        .nic
        .bind_remote(
            target.lkey,
            s.qp.num(),
            Access::REMOTE_WRITE | Access::REMOTE_READ,
        )
        .expect("bind_remote");
    let mut src = Buf::new(&c.nic, n, Access::NONE);
    src.mem.copy_from_slice(&pattern(n, 7));
    let sink = Buf::new(&c.nic, n, Access::LOCAL_WRITE);
    // Small write (inline), then the rest.
    for (id, off, len) in [(1u64, 0usize, 16usize), (2, 16, n - 16)] {
        c.qp.post_send(&SendWr {
            wr_id: id,
            op: SendOp::RdmaWrite {
                remote_addr: target.addr() + off as u64,
                rkey,
            },
            sges: &[src.sge(off, len)],
        })
        .unwrap();
    }
    expect_ok(c.cq.next(LIMIT), 1, WcOpcode::RdmaWrite, 16);
    expect_ok(c.cq.next(LIMIT), 2, WcOpcode::RdmaWrite, (n - 16) as u32);
    c.qp.post_send(&SendWr {
        wr_id: 3,
        op: SendOp::RdmaRead {
            remote_addr: target.addr(),
            rkey,
        },
        sges: &[sink.sge(0, n)],
    })
    .unwrap();
    expect_ok(c.cq.next(LIMIT), 3, WcOpcode::RdmaRead, n as u32);
    assert!(target.mem == src.mem, "written bytes differ");
    assert!(sink.mem == src.mem, "read bytes differ");
    // One-sided: nothing on the target's CQ.
    s.cq.expect_none(Duration::from_millis(50));
    assert_eq!(s.nic.stats().live_remote_keys, 1);
    s.nic.unbind_remote(rkey);
    assert_eq!(s.nic.stats().live_remote_keys, 0);
    close(c);
    close(s);
    target.free(server);
    src.free(client);
    sink.free(client);
}

#[test]
fn rxe0_loopback_rdma_write_read() {
    if !have("rxe0") {
        return;
    }
    rdma_write_read(&open("rxe0"), &open("rxe0"));
}

#[test]
fn rxe0_rxe1_rdma_write_read() {
    if !have("rxe0") || !have("rxe1") {
        return;
    }
    rdma_write_read(&open("rxe1"), &open("rxe0"));
}

#[test]
fn remote_key_rejected_after_unbind() {
    if !have("rxe0") {
        return;
    }
    let (server, client) = (open("rxe0"), open("rxe0"));
    let (s, c) = pair(&server, &client);
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    let target = Buf::new(&server, 4096, access);
    let src = Buf::new(&client, 4096, Access::NONE);
    let write = |id: u64, rkey: u32| {
        c.qp.post_send(&SendWr {
            wr_id: id,
            op: SendOp::RdmaWrite {
                remote_addr: target.addr(),
                rkey,
            },
            sges: &[src.sge(0, 4096)],
        })
        .unwrap();
    };
    // A key without the right: read access only.
    let ro = Buf::new(&server, 4096, Access::REMOTE_READ);
    assert!(server
        .bind_remote(ro.lkey, s.qp.num(), Access::REMOTE_WRITE)
        .is_err());
    let rkey = server
        .bind_remote(target.lkey, s.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    write(1, rkey);
    expect_ok(c.cq.next(LIMIT), 1, WcOpcode::RdmaWrite, 4096);
    server.unbind_remote(rkey);
    server.unbind_remote(rkey); // idempotent
    write(2, rkey);
    let wc = c.cq.next(LIMIT);
    assert_eq!(
        (wc.wr_id, wc.status),
        (2, WcStatus::RemoteAccessError),
        "{wc:?}"
    );
    // The failed access broke the connection (verbs semantics): later posts
    // flush, and the target side's QP is in error too.
    write(3, rkey);
    assert_eq!(c.cq.next(LIMIT).status, WcStatus::Flushed);
    eprintln!("memory windows: {}", server.uses_memory_windows());
    close(c);
    close(s);
    for b in [target, ro] {
        b.free(&server);
    }
    src.free(&client);
}

/// MEM-7 without type-2 windows: `off` refuses to make a remote key at all
/// (`Unsupported`, naming the reason); `shared_keys` makes one that works
/// through another connection too (why it is opt-in), and revoking it
/// still works.
#[test]
fn without_memory_windows_remote_keys_are_refused_unless_shared_keys() {
    use sanpath::fabric::verbs::MemoryWindows;
    use sanpath::fabric::FabricError;
    if !have("rxe0") {
        return;
    }
    let open_with = |mw| {
        VerbsNic::open(VerbsConfig {
            device: Some("rxe0".into()),
            memory_windows: mw,
            ..VerbsConfig::default()
        })
        .unwrap()
    };
    let client = open("rxe0");
    let server = open_with(MemoryWindows::Off);
    assert!(!server.uses_memory_windows());
    let (s1, c1) = pair(&server, &client);
    let target = Buf::new(&server, 4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    match server.bind_remote(target.lkey, s1.qp.num(), Access::REMOTE_WRITE) {
        Err(FabricError::Unsupported(why)) => assert!(why.contains("MEM-7"), "{why}"),
        other => panic!("a shared remote key was made: {other:?}"),
    }
    assert_eq!(server.stats().live_remote_keys, 0);
    for side in [c1, s1] {
        close(side);
    }
    target.free(&server);

    let server = open_with(MemoryWindows::SharedKeys);
    let (s1, c1) = pair(&server, &client);
    let (s2, c2) = pair(&server, &client);
    let target = Buf::new(&server, 4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let src = Buf::new(&client, 4096, Access::NONE);
    let rkey = server
        .bind_remote(target.lkey, s1.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    let write = |c: &Side, id: u64| {
        c.qp.post_send(&SendWr {
            wr_id: id,
            op: SendOp::RdmaWrite {
                remote_addr: target.addr(),
                rkey,
            },
            sges: &[src.sge(0, 64)],
        })
        .unwrap();
    };
    write(&c2, 1);
    expect_ok(c2.cq.next(LIMIT), 1, WcOpcode::RdmaWrite, 64);
    server.unbind_remote(rkey);
    write(&c1, 2);
    assert_eq!(c1.cq.next(LIMIT).status, WcStatus::RemoteAccessError);
    for side in [c1, c2, s1, s2] {
        close(side);
    }
    target.free(&server);
    src.free(&client);
}

#[test]
fn remote_key_works_only_on_its_queue_pair() {
    if !have("rxe0") {
        return;
    }
    let (server, client) = (open("rxe0"), open("rxe0"));
    if !server.uses_memory_windows() {
        eprintln!("skipped: no memory windows (MEM-7 not enforced by the NIC)");
        return;
    }
    let (s1, c1) = pair(&server, &client);
    let (s2, c2) = pair(&server, &client);
    let target = Buf::new(&server, 4096, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let src = Buf::new(&client, 4096, Access::NONE);
    let rkey = server
        .bind_remote(target.lkey, s1.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    let write = |c: &Side, id: u64| {
        c.qp.post_send(&SendWr {
            wr_id: id,
            op: SendOp::RdmaWrite {
                remote_addr: target.addr(),
                rkey,
            },
            sges: &[src.sge(0, 64)],
        })
        .unwrap();
    };
    write(&c1, 1);
    expect_ok(c1.cq.next(LIMIT), 1, WcOpcode::RdmaWrite, 64);
    write(&c2, 2);
    assert_eq!(c2.cq.next(LIMIT).status, WcStatus::RemoteAccessError);
    server.unbind_remote(rkey);
    for side in [c1, c2, s1, s2] {
        close(side);
    }
    target.free(&server);
    src.free(&client);
}

#[test]
fn set_error_flushes_everything_and_peer_sees_disconnect() {
    if !have("rxe0") {
        return;
    }
    let (server, client) = (open("rxe0"), open("rxe0"));
    let (s, c) = pair(&server, &client);
    let rbuf = Buf::new(&server, 8 * 1024, Access::LOCAL_WRITE);
    let crbuf = Buf::new(&client, 1024, Access::LOCAL_WRITE);
    for i in 0..8 {
        recv(&s, i, &[rbuf.sge(i as usize * 1024, 1024)]);
    }
    recv(&c, 50, &[crbuf.sge(0, 1024)]);
    let seen = c.events.get();
    s.qp.set_error();
    s.qp.set_error(); // idempotent
                      // Posts after set_error complete Flushed too.
    recv(&s, 8, &[rbuf.sge(0, 1024)]);
    send(&s, 9, &[rbuf.sge(0, 16)]);
    let mut got: Vec<u64> = (0..10)
        .map(|_| {
            let wc = s.cq.next(LIMIT);
            assert_eq!(wc.status, WcStatus::Flushed, "{wc:?}");
            wc.wr_id
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    s.cq.expect_none(Duration::from_millis(50));
    // The peer is told, and its pending receive completes in error.
    let t = Instant::now();
    assert_ne!(
        c.events.wait_change(seen, LIMIT),
        seen,
        "peer saw no disconnect"
    );
    eprintln!("peer saw the disconnect after {:?}", t.elapsed());
    let wc = c.cq.next(LIMIT);
    assert_eq!(wc.wr_id, 50);
    assert_ne!(wc.status, WcStatus::Success);
    // The local side is not told about its own close.
    assert_eq!(s.events.get(), 0);
    close(s);
    close(c);
    rbuf.free(&server);
    crbuf.free(&client);
    assert_eq!(server.stats().live_qps, 0);
    assert_eq!(server.stats().live_regions, 0);
}

#[test]
fn connect_errors() {
    if !have("rxe0") {
        return;
    }
    let (server, client) = (open("rxe0"), open("rxe0"));
    let cq = Cq::new(&client);
    let ev = Arc::new(Signal::default());
    let local = SocketAddrV4::new(client.addresses()[0], 0);
    let attempt = |to: SocketAddrV4| {
        let (tx, rx) = mpsc::channel();
        let a = client
            .connect(
                local,
                to,
                params(&cq, &ev),
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .expect("connect");
        let r = rx.recv_timeout(LIMIT).expect("callback");
        drop(a);
        r.map(|_| ()).unwrap_err()
    };
    // Nobody listens there.
    let e = attempt(SocketAddrV4::new(server.addresses()[0], port()));
    assert!(
        matches!(e, ConnectError::NoListener | ConnectError::Refused),
        "{e:?}"
    );
    // The listener refuses.
    let lsig = Arc::new(Signal::default());
    let at = SocketAddrV4::new(server.addresses()[0], port());
    let listener = server.listen(at, 4, lsig.clone()).unwrap();
    let l2 = listener.clone();
    let refuser = std::thread::spawn(move || {
        let end = Instant::now() + LIMIT;
        while Instant::now() < end {
            let seen = lsig.get();
            if let Some(r) = l2.peek() {
                r.reject();
                return;
            }
            lsig.wait_change(seen, Duration::from_millis(100));
        }
    });
    assert_eq!(attempt(at), ConnectError::Refused);
    refuser.join().unwrap();
    // Listening twice on one address fails.
    assert!(server.listen(at, 4, Arc::new(Signal::default())).is_err());
    listener.close();
    // Cancel: the callback runs if and only if cancel came too late (on a
    // loopback to a port nobody listens on, the reject can beat a thread
    // descheduled for a few milliseconds).
    let (tx, rx) = mpsc::channel::<()>();
    let a = client
        .connect(
            local,
            SocketAddrV4::new(server.addresses()[0], port()),
            params(&cq, &ev),
            Box::new(move |_| {
                let _ = tx.send(());
            }),
        )
        .unwrap();
    let cancelled = a.cancel();
    assert!(!a.cancel());
    let called = rx.recv_timeout(Duration::from_millis(500)).is_ok();
    assert_ne!(
        cancelled, called,
        "cancelled {cancelled}, callback ran {called}"
    );
}

/// Server and client queue pair of one connection.
type QpPair = (Arc<dyn QueuePair>, Arc<dyn QueuePair>);

/// A CQ never takes on more queue pairs than it has entries for (their
/// send and receive depths added up): the accept that would over-commit it
/// fails `NoResources` (a verbs CQ overrun would lose completions and break
/// every queue pair on it), and destroying a queue pair gives its share
/// back.
#[test]
fn cq_admission_refuses_queue_pairs_beyond_its_size() {
    if !have("rxe0") {
        return;
    }
    let (server, client) = (open("rxe0"), open("rxe0"));
    let sig = Arc::new(Signal::default());
    // 64 + 16 (bind slack) + 64 entries per queue pair below; the device
    // gives at least the 200 + 64 (slack) asked for.
    let small = server.create_cq(200, sig.clone()).expect("create_cq");
    let sev = Arc::new(Signal::default());
    // The client's CQ is roomy: only the server's is meant to fill.
    let big = client.create_cq(8192, sig.clone()).expect("create_cq");
    let cev = Arc::new(Signal::default());
    let lsig = Arc::new(Signal::default());
    let at = SocketAddrV4::new(server.addresses()[0], port());
    let listener = server.listen(at, 8, lsig.clone()).expect("listen");
    // Connects once; the server accepts onto `small`. Returns the server's
    // queue pair, or the accept's error (the connector is then refused).
    let connect_one = || -> Result<QpPair, ConnectError> {
        let (tx, rx) = mpsc::channel();
        let _attempt = client
            .connect(
                SocketAddrV4::new(client.addresses()[0], 0),
                at,
                QpParams {
                    cq: big.id(),
                    send_depth: 64,
                    recv_depth: 64,
                    max_sge: 4,
                    events: cev.clone(),
                },
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .expect("connect");
        let end = Instant::now() + LIMIT;
        let req = loop {
            let seen = lsig.get();
            if let Some(r) = listener.peek() {
                break r;
            }
            assert!(Instant::now() < end, "no connection request");
            lsig.wait_change(seen, Duration::from_millis(200));
        };
        let accepted = req.accept(QpParams {
            cq: small.id(),
            send_depth: 64,
            recv_depth: 64,
            max_sge: 4,
            events: sev.clone(),
        });
        let done = rx.recv_timeout(LIMIT).expect("connect callback");
        match accepted {
            Ok(sqp) => Ok((sqp, done.expect("connected"))),
            Err(e) => {
                assert!(done.is_err(), "the connector of a failed accept is refused");
                Err(e)
            }
        }
    };
    let mut live = Vec::new();
    let refused = loop {
        match connect_one() {
            Ok(pair) => live.push(pair),
            Err(e) => break e,
        }
        assert!(
            live.len() < 64,
            "the CQ of ~264 entries took 64 queue pairs of 144"
        );
    };
    assert_eq!(refused, ConnectError::NoResources);
    assert!(!live.is_empty(), "not even one queue pair fit");
    // Give one share back: the next accept fits again.
    let (sqp, cqp) = live.pop().unwrap();
    for q in [&sqp, &cqp] {
        q.set_error();
    }
    drop((sqp, cqp));
    let (sqp, cqp) = connect_one().expect("accept after a queue pair was destroyed");
    live.push((sqp, cqp));
    for (s, c) in live {
        s.set_error();
        c.set_error();
    }
    listener.close();
}

// ---------------------------------------------------------------- faults --

/// Takes `dev` down, then up again when dropped. Not all comes back: after
/// a link went down mid-transfer, rdma_cm between rxe1 and rxe0 stays
/// broken for the rest of the boot: rxe1 receives nothing more (its
/// `rcvd_pkts` counter stops; re-creating rxe1 repairs it), which is why
/// tools/rxe-vm/test runs the fault tests last.
struct LinkDown(&'static str);

impl LinkDown {
    fn new(dev: &'static str) -> LinkDown {
        ip_link(dev, "down");
        LinkDown(dev)
    }
}

impl Drop for LinkDown {
    fn drop(&mut self) {
        ip_link(self.0, "up");
        // A link going down takes its routes along: restore the policy
        // routes tools/rxe-vm/run sets up for two devices (no-ops when the
        // tables are not in use), then wait for the ports.
        for args in [
            "-4 route replace 198.18.0.2 dev rxe_veth0 src 198.18.0.1 table 10",
            "-4 route replace 198.18.0.1 dev rxe_veth1 src 198.18.0.2 table 11",
            "-6 route replace fe80::/64 dev rxe_veth0 table 10",
            "-6 route replace fe80::/64 dev rxe_veth1 table 11",
        ] {
            let _ = std::process::Command::new("ip")
                .args(args.split(' '))
                .status();
        }
        let end = Instant::now() + LIMIT;
        for dev in ["rxe0", "rxe1"] {
            let path = format!("/sys/class/infiniband/{dev}/ports/1/state");
            while std::fs::read_to_string(&path).is_ok_and(|s| !s.contains("ACTIVE"))
                && Instant::now() < end
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn ip_link(dev: &str, state: &str) {
    let st = std::process::Command::new("ip")
        .args(["link", "set", dev, state])
        .status()
        .expect("ip link");
    assert!(st.success(), "ip link set {dev} {state}");
}

#[test]
fn fault_link_down_mid_transfer() {
    if !faults_enabled() || !have("rxe0") || !have("rxe1") {
        return;
    }
    let (server, client) = (open("rxe1"), open("rxe0"));
    let (s, c) = pair(&server, &client);
    let n = 32 * 1024;
    let target = Buf::new(&server, n, Access::LOCAL_WRITE | Access::REMOTE_WRITE);
    let rkey = server
        .bind_remote(target.lkey, s.qp.num(), Access::REMOTE_WRITE)
        .unwrap();
    let rbuf = Buf::new(&server, 1024, Access::LOCAL_WRITE);
    recv(&s, 900, &[rbuf.sge(0, 1024)]);
    let src = Buf::new(&client, n, Access::NONE);
    let ops = 16u64;
    let mut link = None;
    for i in 0..ops {
        c.qp.post_send(&SendWr {
            wr_id: i,
            op: SendOp::RdmaWrite {
                remote_addr: target.addr(),
                rkey,
            },
            sges: &[src.sge(0, n)],
        })
        .unwrap();
        if i == 2 {
            link = Some(LinkDown::new("rxe_veth1"));
        }
    }
    // Every write completes — some may have made it — and the first one that
    // did not fails with a transport error; the rest are flushed.
    let t = Instant::now();
    let mut errors = Vec::new();
    for _ in 0..ops {
        let wc = c.cq.next(LIMIT);
        eprintln!(
            "  {:?}: {wc:?} (disconnect events: {})",
            t.elapsed(),
            c.events.get()
        );
        if wc.status != WcStatus::Success {
            errors.push(wc.status);
        }
    }
    let took = t.elapsed();
    eprintln!(
        "link down: {} of {ops} writes failed after {took:?}",
        errors.len()
    );
    assert!(
        !errors.is_empty(),
        "all writes succeeded with the link down"
    );
    assert!(
        c.events.get() >= 1,
        "no disconnect reported after the link went down"
    );
    // Close never hangs, with the link still down.
    let t = Instant::now();
    s.qp.set_error();
    assert_eq!(s.cq.next(LIMIT).status, WcStatus::Flushed);
    eprintln!("  server flushed after {:?}", t.elapsed());
    close(c);
    eprintln!("  client closed after {:?}", t.elapsed());
    close(s);
    eprintln!("  server closed after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "close took {:?}",
        t.elapsed()
    );
    // Either the transport gave up first (RetryExceeded, the rest flushed)
    // or the connection manager declared the peer unreachable first (rxe in
    // Linux 6.1: RDMA_CM_EVENT_UNREACHABLE after ~3 s; all flushed).
    assert!(
        errors.iter().all(|e| matches!(
            e,
            WcStatus::RetryExceeded | WcStatus::RemoteDisconnected | WcStatus::Flushed
        )),
        "{errors:?}"
    );
    assert!(took < LIMIT, "pending ops took {took:?}");
    drop(link);
    target.free(&server);
    rbuf.free(&server);
    src.free(&client);
    let t = Instant::now();
    drop(server);
    drop(client);
    eprintln!("  NICs dropped after {:?}", t.elapsed());
}

/// The peer process of `fault_peer_killed` (runs only when spawned by it).
#[test]
fn fault_peer_child() {
    let Ok(port) = std::env::var("SANPATH_VERBS_CHILD_PORT") else {
        return;
    };
    let nic = open("rxe0");
    let at = SocketAddrV4::new(nic.addresses()[0], port.parse().unwrap());
    let lsig = Arc::new(Signal::default());
    let listener = nic.listen(at, 4, lsig.clone()).unwrap();
    println!("READY");
    let end = Instant::now() + LIMIT;
    let req = loop {
        let seen = lsig.get();
        if let Some(r) = listener.peek() {
            break r;
        }
        assert!(Instant::now() < end);
        lsig.wait_change(seen, Duration::from_millis(100));
    };
    let cq = Cq::new(&nic);
    let ev = Arc::new(Signal::default());
    let qp = req.accept(params(&cq, &ev)).unwrap();
    let buf = Buf::new(&nic, 4096, Access::LOCAL_WRITE);
    for i in 0..4 {
        qp.post_recv(&RecvWr {
            wr_id: i,
            sges: &[buf.sge(0, 4096)],
        })
        .unwrap();
    }
    println!("ACCEPTED");
    // Wait to be killed.
    std::thread::sleep(LIMIT * 4);
}

#[test]
fn fault_peer_killed() {
    use std::io::BufRead;
    if !faults_enabled() || !have("rxe0") {
        return;
    }
    let p = port();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fault_peer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SANPATH_VERBS_CHILD_PORT", p.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut wait_for = |what: &str| loop {
        let l = lines.next().expect("child output").unwrap();
        if l.contains(what) {
            return;
        }
    };
    wait_for("READY");
    let client = open("rxe0");
    let cq = Cq::new(&client);
    let ev = Arc::new(Signal::default());
    let (tx, rx) = mpsc::channel();
    let _a = client
        .connect(
            SocketAddrV4::new(client.addresses()[0], 0),
            SocketAddrV4::new(client.addresses()[0], p),
            params(&cq, &ev),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
    let qp = rx
        .recv_timeout(LIMIT)
        .unwrap()
        .expect("connected to the child");
    wait_for("ACCEPTED");
    let buf = Buf::new(&client, 4096, Access::LOCAL_WRITE);
    for i in 0..4 {
        qp.post_recv(&RecvWr {
            wr_id: i,
            sges: &[buf.sge(0, 4096)],
        })
        .unwrap();
    }
    qp.post_send(&SendWr {
        wr_id: 10,
        op: SendOp::Send,
        sges: &[buf.sge(0, 100)],
    })
    .unwrap();
    let wc = cq.next(LIMIT);
    assert_eq!((wc.wr_id, wc.status), (10, WcStatus::Success));
    let seen = ev.get();
    let t = Instant::now();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_ne!(
        ev.wait_change(seen, LIMIT),
        seen,
        "no disconnect after the peer died"
    );
    eprintln!("peer killed: disconnected() after {:?}", t.elapsed());
    // Pending receives complete in error, within a bound.
    for _ in 0..4 {
        let wc = cq.next(LIMIT);
        assert_ne!(wc.status, WcStatus::Success);
    }
    // Later posts flush; close does not hang.
    qp.post_send(&SendWr {
        wr_id: 11,
        op: SendOp::Send,
        sges: &[buf.sge(0, 100)],
    })
    .unwrap();
    assert_eq!(cq.next(LIMIT).status, WcStatus::Flushed);
    eprintln!("peer killed: all pending ops done after {:?}", t.elapsed());
    let t = Instant::now();
    qp.set_error();
    drop(qp);
    assert!(t.elapsed() < Duration::from_secs(5));
    buf.free(&client);
}

// ------------------------------------------------- the provider on verbs --

/// The whole SPI path on the real device: connect through rdma_cm, send and
/// receive, RDMA write to an exposed buffer, then close with a receive still
/// pending (CLOSE-3: it completes WSA_OPERATION_ABORTED, once).
#[test]
fn provider_over_verbs_transfers_and_closes() {
    use sanpath::config::{FabricKind, MlockPolicy, PollerMode};
    use sanpath::mem::region::Region;
    use sanpath::spi::*;
    use sanpath::testkit::{connected_pair, CompletingSwitch};
    if !have("rxe0") {
        return;
    }
    let mut config = sanpath::Config::default();
    config.fabric.kind = FabricKind::Verbs;
    config.fabric.verbs.device = "rxe0".into();
    config.poller.mode = PollerMode::RunToCompletion;
    config.mem.mlock = MlockPolicy::Off;
    let p = Provider::new(config).expect("provider on rxe0");
    p.startup(WSD_VERSION, Arc::new(CompletingSwitch), 1)
        .unwrap();
    let ip = p.address_list().unwrap()[0];
    let (c, s) = connected_pair(&p, SocketAddrV4::new(ip, port())).expect("connected pair");
    let (rc, rs, target) = (
        Region::new(1 << 16, MlockPolicy::Off).unwrap(),
        Region::new(1 << 16, MlockPolicy::Off).unwrap(),
        Region::new(1 << 16, MlockPolicy::Off).unwrap(),
    );
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    rc.write_at(0, &pattern).unwrap();
    let mut desc = [0u8; RDMA_DESCRIPTOR_LEN];
    let wait = |ov: &Overlapped| {
        let deadline = Instant::now() + LIMIT;
        while ov.is_pending() {
            assert!(Instant::now() < deadline, "op did not complete");
            p.progress();
        }
        ov.offset_high.load(Ordering::Acquire)
    };
    // SAFETY: the regions outlive the sockets (closed below, before drop).
    let hc = unsafe {
        p.register_memory(s, rs.as_ptr(), 1 << 16, MEM_READWRITE)
            .unwrap();
        p.register_rdma_memory(s, target.as_ptr(), 1 << 16, MEM_WRITE, &mut desc)
            .unwrap();
        p.register_memory(c, rc.as_ptr(), 1 << 16, MEM_READWRITE)
            .unwrap()
    };
    let (r, w, x) = (Overlapped::new(1), Overlapped::new(1), Overlapped::new(1));
    // SAFETY: buffers and records outlive the ops (waited for).
    unsafe {
        p.recv(
            s,
            &[WsaBuf {
                len: 8192,
                buf: rs.as_ptr(),
            }],
            &r,
        )
        .unwrap();
        p.send(
            c,
            &[WsaBuf {
                len: 4096,
                buf: rc.as_ptr(),
            }],
            0,
            &w,
        )
        .unwrap();
    }
    assert_eq!((wait(&r), wait(&w)), (0, 0));
    assert_eq!(r.internal_high.load(Ordering::Acquire), 4096);
    let mut got = vec![0u8; 4096];
    rs.read_at(0, &mut got).unwrap();
    assert_eq!(got, pattern, "received bytes");
    // SAFETY: as above.
    unsafe {
        let b = [WsaBufEx {
            len: 4096,
            buf: rc.as_ptr(),
            handle: hc as usize,
        }];
        p.rdma_write(c, &b, &desc, 1000, 0, &x).unwrap();
    }
    assert_eq!(wait(&x), 0);
    target.read_at(1000, &mut got).unwrap();
    assert_eq!(got, pattern, "RDMA-written bytes at offset 1000");
    let pending = Overlapped::new(1);
    // SAFETY: as above.
    unsafe {
        p.recv(
            s,
            &[WsaBuf {
                len: 64,
                buf: rs.as_ptr(),
            }],
            &pending,
        )
        .unwrap()
    };
    p.close_socket(s).unwrap();
    assert_eq!(wait(&pending), 995, "pending receive aborted by close");
    p.close_socket(c).unwrap();
    assert_eq!(p.stats().ops_in_use, 0);
    p.cleanup().unwrap();
}
