//! Fault injection in the soft fabric, driven through the public SPI: for
//! each fault, several ops in flight (sends, receives, RDMA write and read)
//! and then: every op completes exactly once with the Winsock code of spec
//! §7-5 / §7-8, later calls fail with the connection's first failure, close
//! returns promptly and finalizes the socket, and no registered memory
//! changes after close returned. Every wait is bounded by [`TIMEOUT`] and
//! fails loudly; nothing sleeps to synchronise.
//!
//! Needs the engine's `fault-injection` feature, which its dev-dependency on
//! itself turns on for every test build.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::event::Event;
use sanpath::fabric::soft::{Fault, QpFaults, SoftNetwork, SoftNic, WorkQueue};
use sanpath::fabric::WcStatus;
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::{Config, WsaError, WsaResult};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long any wait for something that should happen promptly may take.
const TIMEOUT: Duration = Duration::from_secs(10);

const OK: u32 = 0;
const ABORTED: u32 = WsaError::WSA_OPERATION_ABORTED.code() as u32;
const CONNABORTED: u32 = WsaError::WSAECONNABORTED.code() as u32;
const CONNRESET: u32 = WsaError::WSAECONNRESET.code() as u32;

#[derive(Default)]
struct Log {
    /// Completion upcalls per overlapped record: `(error, bytes)` each.
    completions: HashMap<usize, Vec<(u32, u32)>>,
    closed: HashSet<SwitchHandle>,
    /// Completions after their socket's close-handle upcall.
    late: usize,
}

/// A switch that records every completion and close-handle upcall.
#[derive(Default)]
struct Recorder {
    log: Mutex<Log>,
    cond: Condvar,
}

impl Switch for Recorder {
    fn create_socket_handle(&self, _: u32, context: usize) -> WsaResult<SwitchHandle> {
        Ok(SwitchHandle(context | 1 << 62))
    }
    fn close_socket_handle(&self, h: SwitchHandle) -> WsaResult<()> {
        let mut log = self.log.lock().unwrap();
        assert!(log.closed.insert(h), "close_socket_handle twice for {h:?}");
        drop(log);
        self.cond.notify_all();
        Ok(())
    }
    fn query_socket_handle_context(&self, h: SwitchHandle) -> WsaResult<usize> {
        Ok(h.0 & !(1 << 62))
    }
    fn complete_overlapped_request(
        &self,
        h: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        let mut log = self.log.lock().unwrap();
        if log.closed.contains(&h) {
            log.late += 1;
        }
        let key = ov as *const Overlapped as usize;
        log.completions.entry(key).or_default().push((error, bytes));
        drop(log);
        // Logged before the record shows the op complete: a test that saw it
        // complete finds it counted.
        ov.complete(error, bytes);
        self.cond.notify_all();
        Ok(())
    }
}

impl Recorder {
    /// Waits for the first completion of `ov` and returns `(error, bytes)`.
    fn wait(&self, ov: &Overlapped) -> (u32, u32) {
        let key = ov as *const Overlapped as usize;
        let deadline = Instant::now() + TIMEOUT;
        let mut log = self.log.lock().unwrap();
        loop {
            if let Some(c) = log.completions.get(&key) {
                return c[0];
            }
            let now = Instant::now();
            assert!(now < deadline, "op {key:#x} never completed");
            log = self.cond.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// How many completion upcalls `ov` got.
    fn count(&self, ov: &Overlapped) -> usize {
        let key = ov as *const Overlapped as usize;
        self.log
            .lock()
            .unwrap()
            .completions
            .get(&key)
            .map_or(0, Vec::len)
    }

    fn closed(&self, h: SwitchHandle) -> bool {
        self.log.lock().unwrap().closed.contains(&h)
    }

    fn late(&self) -> usize {
        self.log.lock().unwrap().late
    }
}

/// One provider with its soft NIC and recording switch.
struct Host {
    p: Provider,
    nic: Arc<SoftNic>,
    sw: Arc<Recorder>,
    ip: Ipv4Addr,
}

fn config() -> Config {
    let mut c = Config::default();
    c.poller.mode = PollerMode::Threads;
    c.poller.count = 1;
    c.poller.spin_budget = 200;
    c.mem.mlock = MlockPolicy::Off;
    c.close.wait_ms = 5000;
    c.close.quiesce_timeout_ms = 5000;
    c
}

impl Host {
    fn on(net: &Arc<SoftNetwork>, ip: Ipv4Addr) -> Host {
        let mut config = config();
        config.fabric.soft.addresses = vec![ip];
        let nic = net.attach(config.soft_nic(vec![ip])).expect("attach");
        let p = Provider::with_nic(config, nic.clone()).expect("provider");
        let sw = Arc::new(Recorder::default());
        p.startup(WSD_VERSION, sw.clone(), 1).expect("startup");
        Host { p, nic, sw, ip }
    }

    fn socket(&self) -> ProviderSocket {
        self.p
            .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
            .unwrap()
    }

    /// The fault handle of `s`, whose peer is at `peer`.
    fn faults(&self, s: ProviderSocket, peer: SocketAddrV4) -> QpFaults {
        let local = self.p.local_addr(s).unwrap().expect("connected");
        self.nic
            .qp_faults(local, peer)
            .expect("queue pair of the socket")
    }

    /// Closes `s`: returns 0 promptly, and every op of `s` has completed
    /// and the close-handle upcall was made by the time it returned.
    fn close(&self, s: ProviderSocket, ops: &[&Overlapped]) {
        let h = self.p.switch_handle(s).unwrap();
        let t = Instant::now();
        self.p.close_socket(s).unwrap();
        assert!(t.elapsed() < TIMEOUT, "close took {:?}", t.elapsed());
        assert!(self.sw.closed(h), "close returned before finalizing");
        for ov in ops {
            assert!(!ov.is_pending(), "an op outlived close");
            assert_eq!(self.sw.count(ov), 1, "op completed more than once");
        }
        assert_eq!(
            // SAFETY: no buffer; the call fails before starting anything.
            unsafe { self.p.send(s, &[], 0, &Overlapped::new(0)) }.unwrap_err(),
            WsaError::WSAENOTSOCK
        );
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.p.cleanup().unwrap();
            assert_eq!(self.sw.late(), 0, "completion after close_socket_handle");
        }
    }
}

/// `(client on a, server on b)` through a listener of `b` at `port`.
fn connect(a: &Host, b: &Host, port: u16) -> (ProviderSocket, ProviderSocket) {
    let l = b.socket();
    b.p.bind(l, SocketAddrV4::new(b.ip, port)).unwrap();
    b.p.listen(l, 4).unwrap();
    let lev = Arc::new(Event::new());
    b.p.event_select(l, Some(lev.clone()), FD_ACCEPT).unwrap();
    let c = a.socket();
    let cev = Arc::new(Event::new());
    a.p.event_select(c, Some(cev.clone()), FD_CONNECT).unwrap();
    a.p.connect(c, SocketAddrV4::new(b.ip, port), &[]).unwrap();
    assert!(lev.wait(TIMEOUT), "no connection request");
    let (s, _) = b.p.accept(l, &mut |_| Condition::Accept).unwrap();
    assert!(cev.wait(TIMEOUT), "FD_CONNECT not signalled");
    let ne = a.p.enum_network_events(c, Some(&cev)).unwrap();
    assert_eq!(ne.error_codes[FD_CONNECT_BIT], 0, "connect failed");
    b.p.close_socket(l).unwrap();
    (c, s)
}

/// A registered buffer filled with a pattern.
struct Buf {
    r: Region,
    handle: u64,
}

impl Buf {
    fn new(h: &Host, s: ProviderSocket, len: usize, seed: u8) -> Buf {
        let r = Region::new(len, MlockPolicy::Off).unwrap();
        let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
        r.write_at(0, &data).unwrap();
        // SAFETY: the region outlives the socket (closed before the end of
        // each test) and is touched only through `snapshot` while no op
        // names it.
        let handle = unsafe {
            h.p.register_memory(s, r.as_ptr(), len as u32, MEM_READWRITE)
        }
        .expect("register_memory");
        Buf { r, handle }
    }

    fn wsabuf(&self, off: usize, len: u32) -> [WsaBuf; 1] {
        assert!(off + len as usize <= self.r.len());
        // SAFETY: in bounds (asserted).
        let buf = unsafe { self.r.as_ptr().add(off) };
        [WsaBuf { len, buf }]
    }

    fn wsabufex(&self, off: usize, len: u32) -> [WsaBufEx; 1] {
        let [b] = self.wsabuf(off, len);
        [WsaBufEx {
            len,
            buf: b.buf,
            handle: self.handle as usize,
        }]
    }

    fn snapshot(&self) -> Vec<u8> {
        snapshot(&self.r)
    }
}

fn snapshot(r: &Region) -> Vec<u8> {
    let mut v = vec![0; r.len()];
    r.read_at(0, &mut v).unwrap();
    v
}

/// A region of `s` exposed to its peer for RDMA (read and write), zeroed.
fn expose(h: &Host, s: ProviderSocket, len: usize) -> (Region, Vec<u8>) {
    let r = Region::new(len, MlockPolicy::Off).unwrap();
    let mut d = [0u8; RDMA_DESCRIPTOR_LEN];
    // SAFETY: as `Buf::new`.
    let n = unsafe {
        h.p.register_rdma_memory(s, r.as_ptr(), len as u32, MEM_READWRITE, &mut d)
    }
    .expect("register_rdma_memory");
    (r, d[..n].to_vec())
}

// The data calls, with the SPI's contract met by the tests: every buffer
// and overlapped record outlives its op (each test waits for every op, and
// closes the sockets, before they are dropped).

fn send(h: &Host, s: ProviderSocket, b: &Buf, off: usize, len: u32, ov: &Overlapped) {
    // SAFETY: see above.
    unsafe { h.p.send(s, &b.wsabuf(off, len), 0, ov) }.expect("send started");
}

fn recv(h: &Host, s: ProviderSocket, b: &Buf, off: usize, len: u32, ov: &Overlapped) {
    // SAFETY: see above.
    unsafe { h.p.recv(s, &b.wsabuf(off, len), ov) }.expect("recv started");
}

#[allow(clippy::too_many_arguments)]
fn write(
    h: &Host,
    s: ProviderSocket,
    b: &Buf,
    off: usize,
    len: u32,
    d: &[u8],
    at: u32,
    ov: &Overlapped,
) {
    // SAFETY: see above.
    unsafe { h.p.rdma_write(s, &b.wsabufex(off, len), d, at, 0, ov) }.expect("write started");
}

#[allow(clippy::too_many_arguments)]
fn read(
    h: &Host,
    s: ProviderSocket,
    b: &Buf,
    off: usize,
    len: u32,
    d: &[u8],
    at: u32,
    ov: &Overlapped,
) {
    // SAFETY: see above.
    unsafe { h.p.rdma_read(s, &b.wsabufex(off, len), d, at, 0, ov) }.expect("read started");
}

fn ovs<const N: usize>() -> [Overlapped; N] {
    std::array::from_fn(|_| Overlapped::new(0))
}

/// Two hosts on one network.
fn hosts() -> (Host, Host) {
    let net = SoftNetwork::new();
    let a = Host::on(&net, Ipv4Addr::new(198, 18, 7, 1));
    let b = Host::on(&net, Ipv4Addr::new(198, 18, 7, 2));
    (a, b)
}

fn addr(h: &Host, s: ProviderSocket) -> SocketAddrV4 {
    h.p.local_addr(s).unwrap().unwrap()
}

/// Closes both ends, then checks that none of `bufs` changes any more.
fn close_both(
    a: &Host,
    c: ProviderSocket,
    a_ops: &[&Overlapped],
    b: &Host,
    s: ProviderSocket,
    b_ops: &[&Overlapped],
    regions: &[&Region],
) {
    a.close(c, a_ops);
    b.close(s, b_ops);
    let before: Vec<Vec<u8>> = regions.iter().map(|r| snapshot(r)).collect();
    // Whatever the engines still had to do is done by now (cleanup joins
    // their threads); the memory must be exactly as close left it.
    a.p.progress();
    b.p.progress();
    let after: Vec<Vec<u8>> = regions.iter().map(|r| snapshot(r)).collect();
    assert!(before == after, "registered memory changed after close");
}

#[test]
fn wr_error_on_the_third_request_fails_it_connaborted_flushes_the_rest_connaborted_and_resets_the_peer(
) {
    let (a, b) = hosts();
    let (c, s) = connect(&a, &b, 7001);
    let bc = Buf::new(&a, c, 1 << 16, 1);
    let bs = Buf::new(&b, s, 1 << 16, 2);
    let (rs, d) = expose(&b, s, 1 << 16);
    a.faults(c, addr(&b, s)).arm(Fault::FailRequest {
        queue: WorkQueue::Send,
        nth: 3,
        status: WcStatus::LocalProtectionError,
    });
    let [cr1, cr2, sr1, sr2, op1, op2, op3] = ovs();
    recv(&a, c, &bc, 0, 256, &cr1);
    recv(&a, c, &bc, 256, 256, &cr2);
    recv(&b, s, &bs, 0, 256, &sr1);
    recv(&b, s, &bs, 256, 256, &sr2);
    send(&a, c, &bc, 4096, 100, &op1);
    write(&a, c, &bc, 8192, 4096, &d, 0, &op2);
    read(&a, c, &bc, 16384, 4096, &d, 0, &op3);
    assert_eq!(a.sw.wait(&op1), (OK, 100));
    assert_eq!(b.sw.wait(&sr1), (OK, 100));
    assert_eq!(a.sw.wait(&op2), (OK, 4096));
    assert_eq!(a.sw.wait(&op3), (CONNABORTED, 0), "the failed request");
    assert_eq!(a.sw.wait(&cr1), (CONNABORTED, 0), "flushed with it");
    assert_eq!(a.sw.wait(&cr2), (CONNABORTED, 0), "flushed with it");
    assert_eq!(b.sw.wait(&sr2), (CONNRESET, 0), "the peer sees a reset");
    assert_eq!(snapshot(&rs)[..4096], bc.snapshot()[8192..12288]);
    // New calls fail with the first failure of their end, start nothing.
    // SAFETY: nothing is started (asserted).
    unsafe {
        let later = Overlapped::new(0);
        let e = a.p.send(c, &bc.wsabuf(0, 8), 0, &later).unwrap_err();
        assert_eq!(e, WsaError::WSAECONNABORTED);
        let e = b.p.recv(s, &bs.wsabuf(0, 8), &later).unwrap_err();
        assert_eq!(e, WsaError::WSAECONNRESET);
    }
    close_both(
        &a,
        c,
        &[&cr1, &cr2, &op1, &op2, &op3],
        &b,
        s,
        &[&sr1, &sr2],
        &[&bc.r, &bs.r, &rs],
    );
}

#[test]
fn wr_error_on_the_second_receive_fails_it_and_its_queue_connaborted_and_resets_the_sender() {
    let (a, b) = hosts();
    let (c, s) = connect(&a, &b, 7002);
    let bc = Buf::new(&a, c, 1 << 16, 1);
    let bs = Buf::new(&b, s, 1 << 16, 2);
    b.faults(s, addr(&a, c)).arm(Fault::FailRequest {
        queue: WorkQueue::Recv,
        nth: 2,
        status: WcStatus::LocalLengthError,
    });
    let [cr, cs1, cs2, sr1, sr2] = ovs();
    recv(&a, c, &bc, 0, 256, &cr);
    // Two sends wait in the peer's receiver-not-ready queue.
    send(&a, c, &bc, 4096, 10, &cs1);
    send(&a, c, &bc, 4096, 20, &cs2);
    recv(&b, s, &bs, 0, 256, &sr1); // takes the first
    recv(&b, s, &bs, 256, 256, &sr2); // fails
    assert_eq!(a.sw.wait(&cs1), (OK, 10));
    assert_eq!(b.sw.wait(&sr1), (OK, 10));
    assert_eq!(b.sw.wait(&sr2), (CONNABORTED, 0), "the failed receive");
    assert_eq!(a.sw.wait(&cs2), (CONNRESET, 0), "the parked send");
    assert_eq!(a.sw.wait(&cr), (CONNRESET, 0));
    close_both(
        &a,
        c,
        &[&cr, &cs1, &cs2],
        &b,
        s,
        &[&sr1, &sr2],
        &[&bc.r, &bs.r],
    );
}

#[test]
fn cq_overrun_breaks_every_connection_on_that_cq_connaborted_here_and_connreset_at_the_peers() {
    let (a, b) = hosts();
    let (c1, s1) = connect(&a, &b, 7003);
    let (c2, s2) = connect(&a, &b, 7004);
    let b1 = Buf::new(&a, c1, 1 << 16, 1);
    let b2 = Buf::new(&a, c2, 1 << 16, 3);
    let bs1 = Buf::new(&b, s1, 1 << 16, 2);
    let bs2 = Buf::new(&b, s2, 1 << 16, 4);
    let (rs1, d1) = expose(&b, s1, 1 << 16);
    let [r1, r2, w1, x2, p1, p2, q1, q2] = ovs();
    // In flight on both connections of `a`: receives, parked sends, and
    // on `b`: receives.
    recv(&a, c1, &b1, 0, 128, &r1);
    recv(&a, c2, &b2, 0, 128, &r2);
    send(&a, c1, &b1, 4096, 64, &p1);
    send(&a, c2, &b2, 4096, 64, &p2);
    write(&a, c1, &b1, 8192, 4096, &d1, 0, &w1);
    assert_eq!(a.sw.wait(&w1), (OK, 4096));
    recv(&b, s1, &bs1, 0, 128, &q1); // takes p1
    assert_eq!(a.sw.wait(&p1), (OK, 64));
    recv(&b, s2, &bs2, 0, 128, &q2); // takes p2
    assert_eq!(a.sw.wait(&p2), (OK, 64));
    let [q1b, q2b] = ovs();
    recv(&b, s1, &bs1, 256, 128, &q1b);
    recv(&b, s2, &bs2, 256, 128, &q2b);
    let [x1] = ovs();
    send(&a, c1, &b1, 4096, 8, &x1); // lands in q1b
    assert_eq!(b.sw.wait(&q1b), (OK, 8));
    a.faults(c1, addr(&b, s1)).overrun_cq();
    assert_eq!(a.sw.wait(&r1), (CONNABORTED, 0));
    assert_eq!(
        a.sw.wait(&r2),
        (CONNABORTED, 0),
        "same CQ, other connection"
    );
    assert_eq!(b.sw.wait(&q2b), (CONNRESET, 0));
    // A request posted after the overrun starts nothing.
    // SAFETY: nothing is started (asserted).
    let e = unsafe { a.p.rdma_read(c2, &b2.wsabufex(0, 64), &d1, 0, 0, &x2) }.unwrap_err();
    assert_eq!(e, WsaError::WSAECONNABORTED);
    a.close(c1, &[&r1, &w1, &p1, &x1]);
    a.close(c2, &[&r2, &p2]);
    close_both(
        &a,
        a.socket(),
        &[],
        &b,
        s1,
        &[&q1, &q1b],
        &[&b1.r, &b2.r, &rs1],
    );
    b.close(s2, &[&q2, &q2b]);
}

#[test]
fn qp_error_mid_rdma_write_moves_only_the_prefix_and_fails_it_connaborted_with_the_rest_flushed() {
    let (a, b) = hosts();
    let (c, s) = connect(&a, &b, 7005);
    let bc = Buf::new(&a, c, 1 << 16, 5);
    let bs = Buf::new(&b, s, 1 << 16, 6);
    let (rs, d) = expose(&b, s, 1 << 16);
    a.faults(c, addr(&b, s)).arm(Fault::ErrorAfterBytes {
        bytes: 3000,
        status: WcStatus::RetryExceeded,
    });
    let [cr, sr, w1, w2] = ovs();
    recv(&a, c, &bc, 0, 256, &cr);
    recv(&b, s, &bs, 0, 256, &sr);
    write(&a, c, &bc, 4096, 2048, &d, 0, &w1);
    write(&a, c, &bc, 8192, 8192, &d, 16384, &w2);
    assert_eq!(a.sw.wait(&w1), (OK, 2048));
    assert_eq!(a.sw.wait(&w2), (CONNABORTED, 0), "failed mid-transfer");
    assert_eq!(a.sw.wait(&cr), (CONNABORTED, 0));
    assert_eq!(b.sw.wait(&sr), (CONNRESET, 0));
    let (src, dst) = (bc.snapshot(), snapshot(&rs));
    assert_eq!(dst[..2048], src[4096..6144]);
    assert_eq!(
        dst[16384..16384 + 952],
        src[8192..8192 + 952],
        "the prefix landed"
    );
    assert!(
        dst[16384 + 952..16384 + 8192].iter().all(|&x| x == 0),
        "nothing beyond it"
    );
    close_both(&a, c, &[&cr, &w1, &w2], &b, s, &[&sr], &[&bc.r, &bs.r, &rs]);
}

#[test]
fn remote_key_error_on_the_next_rdma_fails_it_connreset_and_resets_both_ends() {
    let (a, b) = hosts();
    let (c, s) = connect(&a, &b, 7006);
    let bc = Buf::new(&a, c, 1 << 16, 7);
    let bs = Buf::new(&b, s, 1 << 16, 8);
    let (rs, d) = expose(&b, s, 1 << 16);
    rs.write_at(0, &[0x5a; 4096]).unwrap();
    a.faults(c, addr(&b, s)).arm(Fault::RemoteKeyError);
    let [cr, sr1, sr2, s1, x] = ovs();
    recv(&a, c, &bc, 0, 256, &cr);
    recv(&b, s, &bs, 0, 256, &sr1);
    recv(&b, s, &bs, 256, 256, &sr2);
    send(&a, c, &bc, 4096, 32, &s1); // not RDMA: unaffected
    let before = bc.snapshot();
    read(&a, c, &bc, 8192, 4096, &d, 0, &x);
    assert_eq!(a.sw.wait(&s1), (OK, 32));
    assert_eq!(b.sw.wait(&sr1), (OK, 32));
    // §7-8: a remote-detected RDMA error breaks the connection; the op and
    // every pending op complete WSAECONNRESET.
    assert_eq!(a.sw.wait(&x), (CONNRESET, 0));
    assert_eq!(a.sw.wait(&cr), (CONNRESET, 0));
    assert_eq!(b.sw.wait(&sr2), (CONNRESET, 0));
    assert!(bc.snapshot() == before, "the refused read wrote nothing");
    close_both(
        &a,
        c,
        &[&cr, &s1, &x],
        &b,
        s,
        &[&sr1, &sr2],
        &[&bc.r, &bs.r, &rs],
    );
}

#[test]
fn peer_stops_responding_requests_time_out_connaborted_after_the_retry_time_and_the_peer_is_reset()
{
    let (a, b) = hosts();
    let (c, s) = connect(&a, &b, 7007);
    let bc = Buf::new(&a, c, 1 << 16, 9);
    let bs = Buf::new(&b, s, 1 << 16, 10);
    let (rs, d) = expose(&b, s, 1 << 16);
    let timeout = Duration::from_millis(200);
    b.faults(s, addr(&a, c))
        .arm(Fault::StopResponding { timeout });
    let [cr, sr, s1, w, x] = ovs();
    recv(&a, c, &bc, 0, 256, &cr);
    recv(&b, s, &bs, 0, 256, &sr); // never filled
    let t = Instant::now();
    send(&a, c, &bc, 4096, 64, &s1);
    write(&a, c, &bc, 8192, 4096, &d, 0, &w);
    read(&a, c, &bc, 16384, 4096, &d, 0, &x);
    assert_eq!(a.sw.wait(&s1), (CONNABORTED, 0), "retries exhausted");
    assert!(t.elapsed() >= timeout, "failed before the retry time");
    assert_eq!(a.sw.wait(&w), (CONNABORTED, 0));
    assert_eq!(a.sw.wait(&x), (CONNABORTED, 0));
    assert_eq!(a.sw.wait(&cr), (CONNABORTED, 0));
    assert_eq!(
        b.sw.wait(&sr),
        (CONNRESET, 0),
        "the silent end sees a disconnect"
    );
    assert!(
        snapshot(&rs).iter().all(|&x| x == 0),
        "the silent peer took no write"
    );
    close_both(
        &a,
        c,
        &[&cr, &s1, &w, &x],
        &b,
        s,
        &[&sr],
        &[&bc.r, &bs.r, &rs],
    );
}

#[test]
fn peer_stops_responding_then_close_aborts_the_stalled_ops_at_once_without_waiting_for_the_timeout()
{
    let (a, b) = hosts();
    let (c, s) = connect(&a, &b, 7008);
    let bc = Buf::new(&a, c, 1 << 16, 11);
    let bs = Buf::new(&b, s, 1 << 16, 12);
    let (rs, d) = expose(&b, s, 1 << 16);
    b.faults(s, addr(&a, c)).arm(Fault::StopResponding {
        timeout: Duration::from_secs(3600),
    });
    let [cr, sr, s1, w, x] = ovs();
    recv(&a, c, &bc, 0, 256, &cr);
    recv(&b, s, &bs, 0, 256, &sr);
    send(&a, c, &bc, 4096, 64, &s1);
    write(&a, c, &bc, 8192, 4096, &d, 0, &w);
    read(&a, c, &bc, 16384, 4096, &d, 0, &x);
    assert!(s1.is_pending() && w.is_pending() && x.is_pending() && cr.is_pending());
    let t = Instant::now();
    a.close(c, &[&cr, &s1, &w, &x]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "close waited for the transport"
    );
    for ov in [&cr, &s1, &w, &x] {
        assert_eq!(a.sw.wait(ov), (ABORTED, 0));
    }
    assert_eq!(b.sw.wait(&sr), (CONNRESET, 0));
    close_both(&a, a.socket(), &[], &b, s, &[&sr], &[&bc.r, &bs.r, &rs]);
}

#[test]
fn wr_error_while_closing_the_other_end_still_completes_every_op_once() {
    // The fault fires on one end while the peer is being closed: whichever
    // wins, each op completes once (aborted at the closing end, reset or
    // aborted at the other) and neither close hangs.
    for round in 0..20 {
        let (a, b) = hosts();
        let (c, s) = connect(&a, &b, 7100 + round);
        let bc = Buf::new(&a, c, 1 << 16, 13);
        let bs = Buf::new(&b, s, 1 << 16, 14);
        let (rs, d) = expose(&b, s, 1 << 16);
        a.faults(c, addr(&b, s)).arm(Fault::FailRequest {
            queue: WorkQueue::Send,
            nth: 2,
            status: WcStatus::RetryExceeded,
        });
        let [cr, sr, w1, w2] = ovs();
        recv(&a, c, &bc, 0, 256, &cr);
        recv(&b, s, &bs, 0, 256, &sr);
        write(&a, c, &bc, 4096, 1024, &d, 0, &w1);
        std::thread::scope(|t| {
            t.spawn(|| b.close(s, &[&sr]));
            // The write may find the connection intact (and fail) or
            // already torn down (and not start, with the reset).
            // SAFETY: buffers and record outlive the op (waited for below).
            match unsafe { a.p.rdma_write(c, &bc.wsabufex(0, 64), &d, 0, 0, &w2) } {
                Ok(()) => {
                    let (e, _) = a.sw.wait(&w2);
                    assert!(e == CONNABORTED || e == CONNRESET, "write: {e}");
                }
                Err(e) => assert_eq!(e, WsaError::WSAECONNRESET),
            }
        });
        assert_eq!(a.sw.wait(&w1), (OK, 1024));
        let (e, _) = a.sw.wait(&cr);
        assert!(e == CONNABORTED || e == CONNRESET, "recv: {e}");
        // Reset if the fault completed it before the close began.
        let (e, _) = b.sw.wait(&sr);
        assert!(e == ABORTED || e == CONNRESET, "peer recv: {e}");
        let done: Vec<&Overlapped> = [&cr, &w1, &w2]
            .into_iter()
            .filter(|ov| a.sw.count(ov) > 0)
            .collect();
        a.close(c, &done);
        assert!(!w2.is_pending() || a.sw.count(&w2) == 0);
        drop((bc, bs, rs));
    }
}

#[test]
fn held_rdma_lets_sends_pass_then_runs_in_order_at_release_with_its_keys_checked_then() {
    let (a, b) = hosts();
    let (c, s) = connect(&a, &b, 7009);
    let bc = Buf::new(&a, c, 1 << 16, 15);
    let bs = Buf::new(&b, s, 1 << 16, 16);
    let (rs, d) = expose(&b, s, 1 << 16);
    let (gone, dg) = expose(&b, s, 4096);
    let held = a.faults(c, addr(&b, s));
    held.arm(Fault::StallRdma);
    let [w, x, s1, sr, w2, after] = ovs();
    write(&a, c, &bc, 0, 4096, &d, 0, &w);
    read(&a, c, &bc, 4096, 4096, &d, 0, &x); // what the write writes
    recv(&b, s, &bs, 0, 64, &sr);
    send(&a, c, &bc, 100, 64, &s1);
    assert_eq!(a.sw.wait(&s1), (OK, 64));
    assert_eq!(b.sw.wait(&sr), (OK, 64));
    assert_eq!(bs.snapshot()[..64], bc.snapshot()[100..164]);
    let (rs_before, bc_before) = (snapshot(&rs), bc.snapshot());
    assert!(
        rs_before[..4096].iter().all(|&v| v == 0),
        "a held write ran"
    );
    assert!(w.is_pending() && x.is_pending());
    // Executed in order at release: the write, then the read.
    held.release_rdma();
    assert_eq!(a.sw.wait(&w), (OK, 4096));
    assert_eq!(a.sw.wait(&x), (OK, 4096));
    assert_eq!(snapshot(&rs)[..4096], bc_before[..4096]);
    assert_eq!(bc.snapshot()[4096..8192], bc_before[..4096]);
    // Held again, its key revoked before the release: the NIC checks it
    // then, so the write fails the remote-key check (§7-8: reset) and
    // writes nothing.
    held.arm(Fault::StallRdma);
    write(&a, c, &bc, 0, 4096, &dg, 0, &w2);
    b.p.deregister_rdma_memory(s, &dg).unwrap();
    held.release_rdma();
    assert_eq!(a.sw.wait(&w2), (CONNRESET, 0));
    assert!(
        snapshot(&gone).iter().all(|&v| v == 0),
        "a refused write ran"
    );
    // SAFETY: see `send`; the call fails without starting.
    let e = unsafe { a.p.send(c, &bc.wsabuf(0, 8), 0, &after) }.unwrap_err();
    assert_eq!(e, WsaError::WSAECONNRESET);
    close_both(
        &a,
        c,
        &[&w, &x, &s1, &w2],
        &b,
        s,
        &[&sr],
        &[&bc.r, &bs.r, &rs, &gone],
    );
}

#[test]
fn held_rdma_released_while_closing_completes_once_whole_or_not_at_all_and_not_after_close() {
    // The release races the close: each held op completes once, OK with
    // its bytes in place, or aborted (CLOSE-3: the engine aborts every op
    // pending at close, even one the NIC ran just before it broke the
    // link); it ran whole or not at all, and nothing changes once close
    // returned.
    for round in 0..20 {
        let (a, b) = hosts();
        let (c, s) = connect(&a, &b, 7200 + round);
        let bc = Buf::new(&a, c, 1 << 16, 17);
        let (rs, d) = expose(&b, s, 1 << 16);
        rs.write_at(8192, &[0x33; 4096]).unwrap();
        let held = a.faults(c, addr(&b, s));
        held.arm(Fault::StallRdma);
        let [w, x] = ovs();
        write(&a, c, &bc, 0, 4096, &d, 0, &w);
        read(&a, c, &bc, 4096, 4096, &d, 8192, &x);
        let before = bc.snapshot();
        let (rs_now, bc_now) = std::thread::scope(|t| {
            t.spawn(|| held.release_rdma());
            a.close(c, &[&w, &x]);
            (snapshot(&rs), bc.snapshot())
        });
        let wrote = rs_now[..4096] == before[..4096];
        assert!(
            wrote || rs_now[..4096].iter().all(|&v| v == 0),
            "part of the write ran"
        );
        match a.sw.wait(&w) {
            (OK, 4096) => assert!(wrote, "the write completed OK without its bytes"),
            (ABORTED, 0) => {}
            r => panic!("write: {r:?}"),
        }
        let read_ = bc_now[4096..8192].iter().all(|&v| v == 0x33);
        assert!(
            read_ || bc_now[4096..8192] == before[4096..8192],
            "part of the read ran"
        );
        match a.sw.wait(&x) {
            (OK, 4096) => assert!(read_, "the read completed OK without its bytes"),
            (ABORTED, 0) => {}
            r => panic!("read: {r:?}"),
        }
        // Released again after the close: nothing left to run.
        held.release_rdma();
        a.p.progress();
        assert!(
            snapshot(&rs) == rs_now,
            "the peer's memory changed after close"
        );
        assert!(bc.snapshot() == bc_now, "the buffer changed after close");
        b.close(s, &[]);
        drop((bc, rs));
    }
}
