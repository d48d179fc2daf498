//! The shm fabric between two real processes: this test binary re-executed
//! as the peer (`SANPATH_SHM_CHILD` names its role, `SANPATH_SHM_DIR` the
//! runtime directory). The child reports on stdout lines starting `SHM:`;
//! a watchdog kills it should a test hang, so every wait fails loudly.
#![cfg(not(loom))]

use sanpath::fabric::shm::{ShmNic, ShmNicConfig};
use sanpath::fabric::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "SANPATH_SHM_CHILD";
const DIR_ENV: &str = "SANPATH_SHM_DIR";
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PORT: u16 = 5000;
const WAIT: Duration = Duration::from_secs(20);

/// A waker the test sleeps on.
#[derive(Default)]
struct Flag {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Waker for Flag {
    fn wake(&self) {
        *self.set.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl ListenerEvents for Flag {
    fn request_arrived(&self) {
        self.wake();
    }
}

impl Flag {
    fn sleep(&self, until: Instant) {
        let mut set = self.set.lock().unwrap();
        while !*set {
            let now = Instant::now();
            if now >= until {
                return;
            }
            set = self.cv.wait_timeout(set, until - now).unwrap().0;
        }
        *set = false;
    }
}

#[derive(Default)]
struct Events {
    disconnected: AtomicBool,
    failed: AtomicBool,
}

impl QpEvents for Events {
    fn disconnected(&self) {
        self.disconnected.store(true, Ordering::SeqCst);
    }
    fn failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }
}

struct Cq {
    cq: Arc<dyn CompletionQueue>,
    flag: Arc<Flag>,
    /// Completions polled but not yet asked for.
    backlog: Vec<WorkCompletion>,
    /// Times `take` slept armed (and was woken).
    sleeps: usize,
}

impl Cq {
    fn new(nic: &ShmNic, depth: u32) -> Cq {
        let flag = Arc::new(Flag::default());
        let cq = nic.create_cq(depth, flag.clone()).unwrap();
        Cq {
            cq,
            flag,
            backlog: Vec::new(),
            sleeps: 0,
        }
    }

    /// Waits (sleeping, armed) for `n` completions; panics at the deadline.
    fn take(&mut self, n: usize, within: Duration) -> Vec<WorkCompletion> {
        let until = Instant::now() + within;
        let mut buf = [WorkCompletion::EMPTY; 64];
        while self.backlog.len() < n {
            let got = self.cq.poll(&mut buf);
            self.backlog.extend_from_slice(&buf[..got]);
            if got > 0 {
                continue;
            }
            assert!(
                Instant::now() < until,
                "timed out with {} of {n} completions: {:?}",
                self.backlog.len(),
                self.backlog
            );
            if !self.cq.arm() {
                self.sleeps += 1;
                self.flag.sleep(until);
            }
        }
        self.backlog.drain(..n).collect()
    }

    /// The next completion with `wr_id`, keeping the others.
    fn expect(&mut self, wr_id: WrId) -> WorkCompletion {
        let until = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.backlog.iter().position(|c| c.wr_id == wr_id) {
                return self.backlog.remove(i);
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no completion for {wr_id}: {:?}",
                self.backlog
            );
            let have = self.backlog.len();
            let all = self.take(have + 1, left);
            self.backlog.splice(0..0, all);
        }
    }
}

fn nic(dir: &Path, ip: Ipv4Addr) -> ShmNic {
    ShmNic::new(ShmNicConfig {
        addresses: vec![ip],
        prefix_len: 24,
        connect_timeout: Duration::from_millis(300),
        runtime_dir: Some(dir.to_path_buf()),
    })
    .expect("shm NIC")
}

/// A registered, page-backed buffer.
struct Buf {
    mem: Vec<u8>,
    lkey: u32,
}

impl Buf {
    fn new(nic: &ShmNic, len: usize, access: Access) -> Buf {
        let mem = vec![0u8; len];
        // SAFETY: `mem` lives in this `Buf`, which outlives the NIC's use
        // of it in these tests (deregistered before it drops, or the NIC
        // dropped first).
        let keys = unsafe { nic.register(mem.as_ptr() as usize, len, access) }.unwrap();
        Buf {
            mem,
            lkey: keys.lkey,
        }
    }
    fn sge(&self, off: usize, len: usize) -> Sge {
        assert!(off + len <= self.mem.len());
        Sge {
            addr: self.mem.as_ptr() as usize + off,
            len: len as u32,
            lkey: self.lkey,
        }
    }
}

fn params(cq: &Cq, depth: u32, events: Arc<Events>) -> QpParams {
    QpParams {
        cq: cq.cq.id(),
        send_depth: depth,
        recv_depth: depth,
        max_sge: 4,
        events,
    }
}

const ALL: Access = Access::LOCAL_WRITE
    .union(Access::REMOTE_WRITE)
    .union(Access::REMOTE_READ);

/// A private runtime directory, removed with whatever is left in it when
/// the test ends (the tests assert it is empty first).
struct Dir(PathBuf);

impl std::ops::Deref for Dir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn private_dir(name: &str) -> Dir {
    use std::os::unix::fs::DirBuilderExt;
    let d = std::env::temp_dir().join(format!("sanpath-shm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
    Dir(d)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The re-executed peer; killed on drop, and by a watchdog after a minute.
struct Peer {
    child: Arc<Mutex<Child>>,
    out: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(role: &str, dir: &Path) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, role)
            .env(DIR_ENV, dir)
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .spawn()
            .expect("re-execute the test binary");
        let out = BufReader::new(child.stdout.take().unwrap());
        let child = Arc::new(Mutex::new(child));
        let c = Arc::downgrade(&child);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            if let Some(c) = c.upgrade() {
                let _ = c.lock().unwrap().kill();
            }
        });
        Peer { child, out }
    }

    /// The child's next `SHM:` line (panics if it exits first).
    fn line(&mut self) -> String {
        loop {
            let mut l = String::new();
            let n = self.out.read_line(&mut l).unwrap();
            assert!(n > 0, "the peer exited");
            // libtest may have printed the test's name on the same line.
            if let Some(at) = l.find("SHM:") {
                return l[at + 4..].trim_end().to_string();
            }
        }
    }

    fn kill(&self) {
        self.child.lock().unwrap().kill().unwrap();
    }

    fn wait(&self) -> std::process::ExitStatus {
        self.child.lock().unwrap().wait().unwrap()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.lock().unwrap().kill();
        let _ = self.child.lock().unwrap().wait();
    }
}

fn say(s: &str) {
    let mut o = std::io::stdout();
    writeln!(o, "SHM:{s}").unwrap();
    o.flush().unwrap();
}

fn connect(nic: &ShmNic, p: QpParams) -> Result<Arc<dyn QueuePair>, ConnectError> {
    let (tx, rx) = mpsc::channel();
    let local = SocketAddrV4::new(CLIENT, 0);
    let _attempt = nic.connect(
        local,
        SocketAddrV4::new(SERVER, PORT),
        p,
        Box::new(move |r| tx.send(r).unwrap()),
    )?;
    rx.recv_timeout(WAIT).expect("the connect completes")
}

/// The child's side: `echo` serves the data-path test, `sleeper` accepts
/// and then posts nothing until it is killed.
#[test]
fn child() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR_ENV).unwrap());
    let nic = nic(&dir, SERVER);
    let mut cq = Cq::new(&nic, 4096);
    let lflag = Arc::new(Flag::default());
    let l = nic
        .listen(SocketAddrV4::new(SERVER, PORT), 4, lflag.clone())
        .unwrap();
    say("ready");
    let until = Instant::now() + WAIT;
    let req = loop {
        if let Some(r) = l.peek() {
            break r;
        }
        assert!(Instant::now() < until, "no connection request");
        lflag.sleep(until);
    };
    let events = Arc::new(Events::default());
    let depth = if role == "sleeper" { 512 } else { 16 };
    let qp = req.accept(params(&cq, depth, events.clone())).unwrap();
    if role == "sleeper" {
        say("accepted");
        // Blocks until killed.
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
        std::process::exit(3);
    }
    let window = Buf::new(&nic, 1 << 20, ALL);
    let remote = Access::REMOTE_READ | Access::REMOTE_WRITE;
    let rkey = nic.bind_remote(window.lkey, qp.num(), remote).unwrap();
    const SLOT: usize = 128 << 10;
    let recvs = Buf::new(&nic, 8 * SLOT, Access::LOCAL_WRITE);
    for i in 0..8 {
        let s = [recvs.sge(i * SLOT, SLOT)];
        qp.post_recv(&RecvWr {
            wr_id: 100 + i as u64,
            sges: &s,
        })
        .unwrap();
    }
    let mut out = Buf::new(&nic, SLOT, Access::NONE);
    let mut next_send = 1u64;
    // Each send is awaited before `out` is written again.
    let send = |cq: &mut Cq, next: &mut u64, out: &mut Buf, bytes: &[u8]| {
        out.mem[..bytes.len()].copy_from_slice(bytes);
        let s = [out.sge(0, bytes.len())];
        let id = *next;
        *next += 1;
        qp.post_send(&SendWr {
            wr_id: id,
            op: SendOp::Send,
            sges: &s,
        })
        .unwrap();
        assert_eq!(cq.expect(id).status, WcStatus::Success);
    };
    let mut hello = Vec::new();
    hello.extend_from_slice(&(window.mem.as_ptr() as u64).to_le_bytes());
    hello.extend_from_slice(&rkey.to_le_bytes());
    hello.extend_from_slice(&(window.mem.len() as u32).to_le_bytes());
    send(&mut cq, &mut next_send, &mut out, &hello);
    loop {
        let c = cq.take(1, WAIT)[0];
        if c.opcode != WcOpcode::Recv {
            continue;
        }
        if c.status != WcStatus::Success {
            break;
        }
        let i = (c.wr_id - 100) as usize;
        let msg = recvs.mem[i * SLOT..i * SLOT + c.byte_len as usize].to_vec();
        if msg == b"REVOKE" {
            nic.unbind_remote(rkey);
            send(&mut cq, &mut next_send, &mut out, b"REVOKED");
        } else {
            send(&mut cq, &mut next_send, &mut out, &msg);
        }
        let s = [recvs.sge(i * SLOT, SLOT)];
        qp.post_recv(&RecvWr {
            wr_id: c.wr_id,
            sges: &s,
        })
        .unwrap();
    }
    assert!(events.disconnected.load(Ordering::SeqCst));
    drop(qp);
    drop(l);
    drop(nic);
    say("bye");
}

#[test]
fn two_processes_send_recv_and_rdma_with_key_checks() {
    let dir = private_dir("data");
    let mut peer = Peer::spawn("echo", &dir);
    assert_eq!(peer.line(), "ready");
    let nic = nic(&dir, CLIENT);
    let mut cq = Cq::new(&nic, 256);
    let events = Arc::new(Events::default());
    let qp = connect(&nic, params(&cq, 16, events.clone())).expect("connected");
    assert_eq!(qp.peer_addr(), SocketAddrV4::new(SERVER, PORT));

    const SLOT: usize = 128 << 10;
    let recvs = Buf::new(&nic, 4 * SLOT, Access::LOCAL_WRITE);
    let post_recv = |i: usize| {
        let s = [recvs.sge(i * SLOT, SLOT)];
        qp.post_recv(&RecvWr {
            wr_id: 100 + i as u64,
            sges: &s,
        })
        .unwrap()
    };
    for i in 0..4 {
        post_recv(i);
    }
    let recv = |cq: &mut Cq, i: usize| -> Vec<u8> {
        let c = cq.expect(100 + i as u64);
        assert_eq!((c.status, c.opcode), (WcStatus::Success, WcOpcode::Recv));
        let v = recvs.mem[i * SLOT..i * SLOT + c.byte_len as usize].to_vec();
        post_recv(i);
        v
    };
    let hello = recv(&mut cq, 0);
    assert_eq!(hello.len(), 16);
    let raddr = u64::from_le_bytes(hello[..8].try_into().unwrap());
    let rkey = u32::from_le_bytes(hello[8..12].try_into().unwrap());
    let rlen = u32::from_le_bytes(hello[12..].try_into().unwrap()) as u64;

    // Sends: inline (8 B) and gathered from two entries, moved by CMA.
    let src = Buf::new(&nic, 200_000, Access::LOCAL_WRITE);
    let mut src = src;
    for (i, b) in src.mem.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let cases: [(&[Sge], usize); 2] = [
        (&[src.sge(0, 8)], 8),
        (&[src.sge(0, 60_000), src.sge(70_000, 40_000)], 100_000),
    ];
    let mut want_slot = 1;
    for (n, (sges, len)) in cases.iter().enumerate() {
        qp.post_send(&SendWr {
            wr_id: n as u64,
            op: SendOp::Send,
            sges,
        })
        .unwrap();
        let c = cq.expect(n as u64);
        assert_eq!((c.status, c.byte_len as usize), (WcStatus::Success, *len));
        let echoed = recv(&mut cq, want_slot);
        want_slot = (want_slot + 1) % 4;
        let mut want = Vec::new();
        for s in sges.iter() {
            let off = s.addr - src.mem.as_ptr() as usize;
            want.extend_from_slice(&src.mem[off..off + s.len as usize]);
        }
        assert_eq!(echoed.len(), *len);
        assert!(echoed == want, "echo of {len} bytes differs");
    }

    // RDMA write then read back, through the peer's key check.
    let sink = Buf::new(&nic, 8192, Access::LOCAL_WRITE);
    let w = [src.sge(1000, 4096)];
    qp.post_send(&SendWr {
        wr_id: 10,
        op: SendOp::RdmaWrite {
            remote_addr: raddr + 100,
            rkey,
        },
        sges: &w,
    })
    .unwrap();
    let r = [sink.sge(0, 4096)];
    qp.post_send(&SendWr {
        wr_id: 11,
        op: SendOp::RdmaRead {
            remote_addr: raddr + 100,
            rkey,
        },
        sges: &r,
    })
    .unwrap();
    assert_eq!(cq.expect(10).status, WcStatus::Success);
    let c = cq.expect(11);
    assert_eq!((c.status, c.byte_len), (WcStatus::Success, 4096));
    assert!(
        sink.mem[..4096] == src.mem[1000..5096],
        "RDMA read back differs"
    );
    assert_eq!(rlen, 1 << 20);

    // The peer revokes the key: a read through it is refused, the
    // connection breaks, and the peer exits cleanly.
    let cmd = b"REVOKE";
    let mut cmdbuf = Buf::new(&nic, 64, Access::NONE);
    cmdbuf.mem[..cmd.len()].copy_from_slice(cmd);
    let s = [cmdbuf.sge(0, cmd.len())];
    qp.post_send(&SendWr {
        wr_id: 20,
        op: SendOp::Send,
        sges: &s,
    })
    .unwrap();
    assert_eq!(cq.expect(20).status, WcStatus::Success);
    assert_eq!(recv(&mut cq, want_slot), b"REVOKED");
    qp.post_send(&SendWr {
        wr_id: 21,
        op: SendOp::RdmaRead {
            remote_addr: raddr,
            rkey,
        },
        sges: &r,
    })
    .unwrap();
    assert_eq!(cq.expect(21).status, WcStatus::RemoteAccessError);
    // The posted receives flush; the refusal is the peer's answer, so the
    // end was told of a disconnection, not of a failure of its own.
    let rest = cq.take(4, WAIT);
    assert!(
        rest.iter().all(|c| c.status == WcStatus::Flushed),
        "{rest:?}"
    );
    assert!(events.disconnected.load(Ordering::SeqCst));
    assert!(!events.failed.load(Ordering::SeqCst));
    assert_eq!(peer.line(), "bye");
    assert!(peer.wait().success());
    drop(qp);
    drop(cq);
    drop(nic);
    assert_eq!(
        entries(&dir),
        Vec::<String>::new(),
        "left in the runtime dir"
    );
}

/// Round trips of 8 bytes where both processes sleep, armed, for every
/// message: each is delivered by the other side's wake-up (a wake skips
/// its fence where the sleeper arms with `membarrier`), so a lost wake-up
/// stalls the exchange and fails the wait. The client counts its sleeps
/// and goes on until it slept `SLEEPS` times: the exchange really ran on
/// wake-ups, however often the echo came back before the client armed
/// (that share moves with the load: asked for a sleep in half of 2,000
/// rounds, a loaded machine fell short about every other run).
#[test]
fn a_ping_pong_with_both_sides_asleep_loses_no_wake_up() {
    const SLEEPS: usize = 1000;
    const MAX_ROUNDS: usize = 40 * SLEEPS;
    let dir = private_dir("pingpong");
    let mut peer = Peer::spawn("echo", &dir);
    assert_eq!(peer.line(), "ready");
    let nic = nic(&dir, CLIENT);
    let mut cq = Cq::new(&nic, 256);
    let events = Arc::new(Events::default());
    let qp = connect(&nic, params(&cq, 16, events.clone())).expect("connected");
    let recvs = Buf::new(&nic, 4 * 64, Access::LOCAL_WRITE);
    let post_recv = |i: usize| {
        let s = [recvs.sge(i * 64, 64)];
        qp.post_recv(&RecvWr {
            wr_id: 100 + i as u64,
            sges: &s,
        })
        .unwrap()
    };
    for i in 0..4 {
        post_recv(i);
    }
    let hello = cq.expect(100);
    assert_eq!(hello.status, WcStatus::Success);
    post_recv(0);
    let mut src = Buf::new(&nic, 8, Access::NONE);
    let mut slot = 1;
    let sleeps_before = cq.sleeps;
    let mut rounds = 0;
    for round in 0..MAX_ROUNDS {
        if cq.sleeps - sleeps_before >= SLEEPS {
            break;
        }
        rounds += 1;
        src.mem.copy_from_slice(&(round as u64).to_le_bytes());
        let s = [src.sge(0, 8)];
        qp.post_send(&SendWr {
            wr_id: round as u64,
            op: SendOp::Send,
            sges: &s,
        })
        .unwrap();
        let c = cq.expect(100 + slot as u64);
        assert_eq!(
            (c.status, c.byte_len),
            (WcStatus::Success, 8),
            "round {round}"
        );
        let got = u64::from_le_bytes(recvs.mem[slot * 64..slot * 64 + 8].try_into().unwrap());
        assert_eq!(got, round as u64, "the echo of round {round}");
        assert_eq!(cq.expect(round as u64).status, WcStatus::Success);
        post_recv(slot);
        slot = (slot + 1) % 4;
    }
    let slept = cq.sleeps - sleeps_before;
    assert!(
        slept >= SLEEPS,
        "the client slept {slept} times in {rounds} round trips: not a test of wake-ups"
    );
    drop(qp);
    assert_eq!(peer.line(), "bye");
    assert!(peer.wait().success());
    drop(cq);
    drop(nic);
    assert_eq!(
        entries(&dir),
        Vec::<String>::new(),
        "left in the runtime dir"
    );
}

#[test]
fn sigkill_of_the_peer_flushes_every_posted_request() {
    let dir = private_dir("kill");
    let mut peer = Peer::spawn("sleeper", &dir);
    assert_eq!(peer.line(), "ready");
    let nic = nic(&dir, CLIENT);
    let mut cq = Cq::new(&nic, 1024);
    let events = Arc::new(Events::default());
    let qp = connect(&nic, params(&cq, 500, events.clone())).expect("connected");
    assert_eq!(peer.line(), "accepted");
    let buf = Buf::new(&nic, 500 * 64, Access::LOCAL_WRITE);
    // 500 sends (the peer posted no receive: they wait in their cells)
    // and 500 receives: 1,000 requests pending.
    for i in 0..500u64 {
        let s = [buf.sge(i as usize * 64, 8)];
        qp.post_send(&SendWr {
            wr_id: i,
            op: SendOp::Send,
            sges: &s,
        })
        .unwrap();
        let r = [buf.sge(i as usize * 64 + 8, 56)];
        qp.post_recv(&RecvWr {
            wr_id: 1000 + i,
            sges: &r,
        })
        .unwrap();
    }
    assert!(
        cq.cq.poll(&mut [WorkCompletion::EMPTY; 4]) == 0,
        "nothing completes while the peer lives"
    );
    let t0 = Instant::now();
    peer.kill();
    let done = cq.take(1000, WAIT);
    let elapsed = t0.elapsed();
    let mut ids: Vec<u64> = done.iter().map(|c| c.wr_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "every request completes exactly once");
    assert!(
        done.iter().all(|c| c.status != WcStatus::Success),
        "{done:?}"
    );
    assert!(events.disconnected.load(Ordering::SeqCst));
    eprintln!("1000 requests flushed {elapsed:?} after SIGKILL");
    assert!(
        elapsed < Duration::from_secs(1),
        "flushed after {elapsed:?}"
    );
    assert!(!peer.wait().success());
    // The dead peer's socket was removed by this side; ours goes with the NIC.
    assert_eq!(entries(&dir), vec![format!("{CLIENT}.sock")]);
    drop(qp);
    drop(cq);
    drop(nic);
    assert_eq!(
        entries(&dir),
        Vec::<String>::new(),
        "left in the runtime dir"
    );
}

/// CONN-3..6 as the shm fabric reports them (one process: no peer needed).
#[test]
fn connect_errors_keep_their_meanings() {
    let dir = private_dir("errors");
    let nic = ShmNic::new(ShmNicConfig {
        addresses: vec![SERVER],
        prefix_len: 24,
        connect_timeout: Duration::from_millis(200),
        runtime_dir: Some(dir.to_path_buf()),
    })
    .unwrap();
    let cq = Cq::new(&nic, 64);
    let p = || params(&cq, 4, Arc::new(Events::default()));
    let try_connect = |to: SocketAddrV4| -> Result<Arc<dyn QueuePair>, ConnectError> {
        let (tx, rx) = mpsc::channel();
        let _a = nic.connect(
            SocketAddrV4::new(SERVER, 0),
            to,
            p(),
            Box::new(move |r| tx.send(r).unwrap()),
        )?;
        rx.recv_timeout(WAIT).expect("the connect completes")
    };
    // No host with that address on our subnet; no subnet of ours at all.
    let unknown = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 9), PORT);
    assert_eq!(
        try_connect(unknown).err(),
        Some(ConnectError::HostUnreachable)
    );
    let far = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), PORT);
    assert_eq!(try_connect(far).err(), Some(ConnectError::NetUnreachable));
    // A socket file whose process is gone: unknown host, and the file goes.
    let stale = dir.join("10.77.0.8.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 8), PORT);
    assert_eq!(try_connect(to).err(), Some(ConnectError::HostUnreachable));
    assert!(!stale.exists(), "the stale socket was removed");
    // Our own address: nothing listens at the port.
    let me = SocketAddrV4::new(SERVER, PORT);
    assert_eq!(try_connect(me).err(), Some(ConnectError::NoListener));
    // A full backlog refuses; a rejected request is refused.
    let l = nic.listen(me, 1, Arc::new(Flag::default())).unwrap();
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    let _a = nic
        .connect(
            SocketAddrV4::new(SERVER, 0),
            me,
            p(),
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
    let until = Instant::now() + WAIT;
    while l.pending() == 0 {
        assert!(Instant::now() < until, "the request was never queued");
        std::thread::yield_now();
    }
    assert_eq!(try_connect(me).err(), Some(ConnectError::Refused));
    l.peek().unwrap().reject();
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap().err(),
        Some(ConnectError::Refused)
    );
    drop(tx2);
    // A process that never answers: timed out.
    let silent = dir.join("10.77.0.7.sock");
    let fd = silent_listener(&silent);
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 7), PORT);
    assert_eq!(try_connect(to).err(), Some(ConnectError::TimedOut));
    drop(fd);
    std::fs::remove_file(&silent).unwrap();
    drop(l);
    drop(nic);
    assert_eq!(entries(&dir), Vec::<String>::new());
}

/// A `SOCK_SEQPACKET` listener at `path` that never accepts.
fn silent_listener(path: &Path) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain socket calls with a live, NUL-padded sockaddr_un; the
    // descriptor is fresh and handed to an OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
        assert!(fd >= 0);
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in a.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&a as *const libc::sockaddr_un).cast(), len),
            0
        );
        assert_eq!(libc::listen(fd, 4), 0);
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }
}

/// The engine on the shm fabric, chosen by a TOML config: a connection of
/// the provider to its own address (through its own socket and segments),
/// a send and receive beyond the inline size (moved by CMA), an RDMA write
/// through a descriptor, and a close with a receive pending.
#[test]
fn provider_over_shm_from_a_toml_config() {
    use sanpath::mem::region::Region;
    use sanpath::spi::*;
    use sanpath::testkit::{connected_pair, CompletingSwitch};
    let dir = private_dir("provider");
    let toml = format!(
        "[fabric]\nkind = \"shm\"\n[fabric.shm]\naddresses = [\"10.77.1.1\"]\nruntime_dir = \"{}\"\n\
         [poller]\nmode = \"run_to_completion\"\n[mem]\nmlock = \"off\"\n",
        dir.display()
    );
    let config = sanpath::Config::from_toml(&toml).expect("config");
    let p = Provider::new(config).expect("provider on shm");
    p.startup(WSD_VERSION, Arc::new(CompletingSwitch), 1)
        .unwrap();
    let ip = p.address_list().unwrap()[0];
    assert_eq!(ip, Ipv4Addr::new(10, 77, 1, 1));
    assert_eq!(entries(&dir), vec!["10.77.1.1.sock".to_string()]);
    let (c, s) = connected_pair(&p, SocketAddrV4::new(ip, 7000)).expect("connected pair");
    let off = sanpath::config::MlockPolicy::Off;
    let (rc, rs, target) = (
        Region::new(1 << 16, off).unwrap(),
        Region::new(1 << 16, off).unwrap(),
        Region::new(1 << 16, off).unwrap(),
    );
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    rc.write_at(0, &pattern).unwrap();
    let mut desc = [0u8; RDMA_DESCRIPTOR_LEN];
    let wait = |ov: &Overlapped| {
        let deadline = Instant::now() + WAIT;
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
        let rb = [WsaBuf {
            len: 8192,
            buf: rs.as_ptr(),
        }];
        p.recv(s, &rb, &r).unwrap();
        let wb = [WsaBuf {
            len: 4096,
            buf: rc.as_ptr(),
        }];
        p.send(c, &wb, 0, &w).unwrap();
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
        let rb = [WsaBuf {
            len: 64,
            buf: rs.as_ptr(),
        }];
        p.recv(s, &rb, &pending).unwrap()
    };
    p.close_socket(s).unwrap();
    assert_eq!(wait(&pending), 995, "pending receive aborted by close");
    p.close_socket(c).unwrap();
    assert_eq!(p.stats().ops_in_use, 0);
    p.cleanup().unwrap();
    drop(p);
    assert_eq!(
        entries(&dir),
        Vec::<String>::new(),
        "left in the runtime dir"
    );
}

/// A send that waits for a receive does not keep the receiver's CQ awake
/// (an armed poller would spin on it); posting the receive wakes it, and
/// the message lands. One process, connected to itself.
#[test]
fn a_send_waiting_for_a_receive_lets_the_receiver_sleep() {
    let dir = private_dir("held");
    let nic = nic(&dir, SERVER);
    let (mut ccq, mut scq) = (Cq::new(&nic, 64), Cq::new(&nic, 64));
    let lflag = Arc::new(Flag::default());
    let me = SocketAddrV4::new(SERVER, PORT);
    let l = nic.listen(me, 1, lflag.clone()).unwrap();
    let (tx, rx) = mpsc::channel();
    let _a = nic
        .connect(
            SocketAddrV4::new(SERVER, 0),
            me,
            params(&ccq, 4, Arc::new(Events::default())),
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
    let until = Instant::now() + WAIT;
    let req = loop {
        if let Some(r) = l.peek() {
            break r;
        }
        assert!(Instant::now() < until, "no request");
        lflag.sleep(until);
    };
    let server = req
        .accept(params(&scq, 4, Arc::new(Events::default())))
        .unwrap();
    let client = rx.recv_timeout(WAIT).unwrap().unwrap();
    let buf = Buf::new(&nic, 64, Access::LOCAL_WRITE);
    let s = [buf.sge(0, 8)];
    client
        .post_send(&SendWr {
            wr_id: 1,
            op: SendOp::Send,
            sges: &s,
        })
        .unwrap();
    // The message is in the server's ring, with no receive for it.
    let mut none = [WorkCompletion::EMPTY; 4];
    assert_eq!(scq.cq.poll(&mut none), 0);
    assert!(!scq.cq.arm(), "a held send kept the receiver awake");
    *scq.flag.set.lock().unwrap() = false;
    let r = [buf.sge(32, 32)];
    server.post_recv(&RecvWr { wr_id: 2, sges: &r }).unwrap();
    assert!(
        *scq.flag.set.lock().unwrap(),
        "the receive's post woke the CQ"
    );
    let c = scq.expect(2);
    assert_eq!((c.status, c.byte_len), (WcStatus::Success, 8));
    assert_eq!(ccq.expect(1).status, WcStatus::Success);
}
