//! Close under load: worker threads each drive a connection with random
//! sends, receives, RDMA writes and RDMA reads, closing and reopening it at
//! random moments, while a closer thread closes random sockets of theirs at
//! random times (racing the posts). Afterwards:
//!
//! - every started op completed exactly once (one upcall for each op that
//!   asked for one, none for polled ones), within a deadline;
//! - every message a receive completed is intact (it carries its own
//!   checksum);
//! - no buffer was touched after its connection was closed and drained: the
//!   buffers are then poisoned and kept in quarantine, and must still hold
//!   only poison at the end (a late receive or RDMA write into released
//!   memory would show; a late read of it would deliver poison, which fails
//!   the receiver's checksum);
//! - no op slot, socket, NIC region or remote key is left behind, and the
//!   engine's threads and file descriptors are gone after cleanup.
//!
//! Bounded: `SOAK_SECS` seconds per poller mode if set (CI's soak step),
//! else `SOAK_ROUNDS` rounds per worker (default 3000, the quick run of
//! `cargo test`); every wait has a deadline.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::fabric::Nic;
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::testkit;
use sanpath::{Config, WsaError, WsaResult};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts completion upcalls per overlapped record.
#[derive(Default)]
struct CountingSwitch {
    next: AtomicU64,
    completions: Mutex<HashMap<usize, u32>>,
    closed: Mutex<Vec<SwitchHandle>>,
}

impl Switch for CountingSwitch {
    fn create_socket_handle(&self, _: u32, _: usize) -> WsaResult<SwitchHandle> {
        Ok(SwitchHandle(
            0x4000_0000 + self.next.fetch_add(1, Ordering::Relaxed) as usize,
        ))
    }
    fn close_socket_handle(&self, h: SwitchHandle) -> WsaResult<()> {
        self.closed.lock().unwrap().push(h);
        Ok(())
    }
    fn query_socket_handle_context(&self, _: SwitchHandle) -> WsaResult<usize> {
        Err(WsaError::WSAENOTSOCK)
    }
    fn complete_overlapped_request(
        &self,
        _: SwitchHandle,
        ov: &Overlapped,
        e: u32,
        b: u32,
    ) -> WsaResult<()> {
        *self
            .completions
            .lock()
            .unwrap()
            .entry(ov as *const Overlapped as usize)
            .or_default() += 1;
        ov.complete(e, b);
        Ok(())
    }
}

const MSG: usize = 256;
const SLOTS: usize = 16;

/// One connection's buffers and the ops started on it.
struct Conn {
    c: ProviderSocket,
    s: ProviderSocket,
    rc: Region,
    rs: Region,
    desc: Vec<u8>,
    handle_c: u64,
    /// Started ops: (overlapped, is a receive into slot i of rs).
    ops: Vec<(Box<Overlapped>, Option<usize>)>,
    /// Index in `ops` of the newest send from slot i of rc: its buffer
    /// stays untouched until that send completed (the NIC may read it
    /// until then).
    send_from: [Option<usize>; SLOTS],
}

impl Conn {
    /// Whether a send from slot `i` of rc may still read it.
    fn sending_from(&self, i: usize) -> bool {
        self.send_from[i].is_some_and(|j| self.ops[j].0.is_pending())
    }
}

/// What `start_random` started.
enum Started {
    /// A receive into slot i of rs.
    Recv(usize),
    /// A send from slot i of rc.
    Send(usize),
    Rdma,
}

/// A message: 8-byte sequence, 8-byte FNV-1a checksum of the rest, payload.
fn fill(buf: &mut [u8], seq: u64) {
    for (i, b) in buf[16..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    let sum = fnv(&buf[16..]);
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&sum.to_le_bytes());
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

fn intact(buf: &[u8]) -> bool {
    u64::from_le_bytes(buf[8..16].try_into().unwrap()) == fnv(&buf[16..])
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn open(p: &Provider, ip: Ipv4Addr, port: u16) -> Conn {
    let (c, s) = testkit::connected_pair(p, SocketAddrV4::new(ip, port)).unwrap();
    // rc: send and RDMA-write sources, then RDMA-read sinks (apart, so that
    // a read never rewrites the buffer of a send still waiting for its
    // receive).
    let rc = Region::new(2 * SLOTS * MSG, MlockPolicy::Off).unwrap();
    let rs = Region::new(2 * SLOTS * MSG, MlockPolicy::Off).unwrap();
    let mut desc = vec![0u8; RDMA_DESCRIPTOR_LEN];
    // SAFETY: the regions live in the Conn until both sockets are closed
    // and every op on them completed (`drain`), then in quarantine.
    let handle_c = unsafe {
        p.register_memory(s, rs.as_ptr(), (SLOTS * MSG) as u32, MEM_READWRITE)
            .unwrap();
        p.register_rdma_memory(
            s,
            rs.as_ptr().add(SLOTS * MSG),
            (SLOTS * MSG) as u32,
            MEM_READWRITE,
            &mut desc,
        )
        .unwrap();
        p.register_memory(c, rc.as_ptr(), (2 * SLOTS * MSG) as u32, MEM_READWRITE)
            .unwrap()
    };
    Conn {
        c,
        s,
        rc,
        rs,
        desc,
        handle_c,
        ops: Vec::new(),
        send_from: [None; SLOTS],
    }
}

/// Waits for every op of `conn` and checks each completed exactly once.
fn drain(p: &Provider, sw: &CountingSwitch, conn: &Conn) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut ok, mut failed) = (0, 0);
    for (ov, recv_slot) in &conn.ops {
        while ov.is_pending() {
            assert!(Instant::now() < deadline, "op never completed");
            p.progress();
            std::thread::yield_now();
        }
        let n = sw
            .completions
            .lock()
            .unwrap()
            .remove(&(&**ov as *const Overlapped as usize));
        let want = if ov.wants_upcall() { Some(1) } else { None };
        assert_eq!(n, want, "one upcall per notified op, none for polled ones");
        if ov.offset_high.load(Ordering::Acquire) == 0 {
            ok += 1;
            if let Some(i) = recv_slot {
                let mut m = vec![0u8; MSG];
                conn.rs.read_at(i * MSG, &mut m).unwrap();
                assert!(intact(&m), "received message corrupted");
            }
        } else {
            failed += 1;
        }
    }
    (ok, failed)
}

const POISON: u8 = 0xDB;

/// Buffers of closed, drained connections, poisoned: nothing may write
/// them any more.
#[derive(Default)]
struct Quarantine(Vec<Region>);

impl Quarantine {
    /// Keeps at most this many regions per worker (the oldest is checked
    /// and freed when a new one comes).
    const KEEP: usize = 64;

    fn admit(&mut self, r: Region) {
        r.write_at(0, &vec![POISON; r.len()]).unwrap();
        if self.0.len() == Self::KEEP {
            check_poison(&self.0.remove(0));
        }
        self.0.push(r);
    }

    fn check_all(&self) {
        self.0.iter().for_each(check_poison);
    }
}

fn check_poison(r: &Region) {
    let mut b = vec![0u8; r.len()];
    r.read_at(0, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == POISON),
        "a buffer was written after its connection was closed and drained"
    );
}

/// What a run did.
#[derive(Default)]
struct Totals {
    ok: u64,
    failed: u64,
    reconnects: u64,
    closer_closes: u64,
}

/// A worker's current connection as the closer sees it.
struct Live {
    c: ProviderSocket,
    s: ProviderSocket,
    /// The end the closer closed (at most one). The worker then stops using
    /// the connection: the number may already name another worker's socket.
    closed: Option<ProviderSocket>,
}

/// The worker's current connection, shared with the closer thread. The
/// worker holds the lock while it posts, the closer while it closes, so no
/// op is ever posted on a number the closer freed.
type Current = Mutex<Option<Live>>;

/// Closes the ends the closer left open, waits for every op, poisons the
/// buffers.
fn retire(
    p: &Provider,
    sw: &CountingSwitch,
    conn: Conn,
    closed: Option<ProviderSocket>,
    q: &mut Quarantine,
    t: &Mutex<Totals>,
) {
    for s in [conn.c, conn.s] {
        if Some(s) != closed {
            p.close_socket(s).unwrap();
        }
    }
    let (ok, failed) = drain(p, sw, &conn);
    let mut tt = t.lock().unwrap();
    tt.ok += ok;
    tt.failed += failed;
    tt.reconnects += 1;
    drop(tt);
    q.admit(conn.rc);
    q.admit(conn.rs);
}

/// Starts one random op on `conn`.
fn start_random(
    p: &Provider,
    conn: &Conn,
    rng: &mut Rng,
    seq: &mut u64,
    ov: &Overlapped,
) -> WsaResult<Started> {
    let i = (rng.next() as usize) % SLOTS;
    let mut kind = rng.next() % 4;
    if kind == 1 && conn.sending_from(i) {
        // The slot's last send may still be read: write it by RDMA instead.
        kind = 2;
    }
    match kind {
        0 => {
            let b = [WsaBuf {
                len: MSG as u32,
                buf: conn.rs.as_ptr().wrapping_add(i * MSG),
            }];
            // SAFETY: rs outlives the op (drained before it is released).
            unsafe { p.recv(conn.s, &b, ov) }.map(|_| Started::Recv(i))
        }
        1 => {
            let mut m = vec![0u8; MSG];
            fill(&mut m, *seq);
            *seq += 1;
            // No send from this slot is pending (checked above): nothing
            // reads it now.
            conn.rc.write_at(i * MSG, &m).unwrap();
            let b = [WsaBuf {
                len: MSG as u32,
                buf: conn.rc.as_ptr().wrapping_add(i * MSG),
            }];
            // SAFETY: rc outlives the op (drained before it is released).
            unsafe { p.send(conn.c, &b, 0, ov) }.map(|_| Started::Send(i))
        }
        k => {
            let sink = if k == 2 { 0 } else { SLOTS };
            let b = [WsaBufEx {
                len: MSG as u32,
                buf: conn.rc.as_ptr().wrapping_add((sink + i) * MSG),
                handle: conn.handle_c as usize,
            }];
            let at = (i * MSG) as u32;
            // SAFETY: rc outlives the op (drained before it is released).
            unsafe {
                if k == 2 {
                    p.rdma_write(conn.c, &b, &conn.desc, at, 0, ov)
                } else {
                    p.rdma_read(conn.c, &b, &conn.desc, at, 0, ov)
                }
            }
            .map(|_| Started::Rdma)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn worker(
    p: Provider,
    sw: Arc<CountingSwitch>,
    ip: Ipv4Addr,
    port: Arc<AtomicU64>,
    current: Arc<Current>,
    totals: Arc<Mutex<Totals>>,
    seed: u64,
    until: Bound,
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
    let mut quarantine = Quarantine::default();
    let take_closed = || current.lock().unwrap().take().and_then(|l| l.closed);
    let reopen = |old: Option<Conn>, q: &mut Quarantine| {
        if let Some(old) = old {
            retire(&p, &sw, old, take_closed(), q, &totals);
        }
        // Ports 20000..60000 in turn: a long run reuses them, long after
        // their listeners were closed.
        let n = port.fetch_add(1, Ordering::Relaxed);
        let conn = open(&p, ip, 20000 + (n % 40000) as u16);
        *current.lock().unwrap() = Some(Live {
            c: conn.c,
            s: conn.s,
            closed: None,
        });
        conn
    };
    let mut conn = reopen(None, &mut quarantine);
    let mut seq = 0u64;
    let mut round = 0u64;
    while !until.reached(round) {
        round += 1;
        if rng.next() % 64 == 0 || conn.ops.len() > 200 {
            conn = reopen(Some(conn), &mut quarantine);
            continue;
        }
        if rng.next() % 2 == 0 {
            // As a switch does between calls (the only progress there is in
            // run-to-completion mode); ops still pending at a close abort.
            p.progress();
        }
        let live = current.lock().unwrap();
        if live.as_ref().is_some_and(|l| l.closed.is_some()) {
            drop(live);
            conn = reopen(Some(conn), &mut quarantine);
            continue;
        }
        let ov = Box::new(Overlapped::new(if rng.next() % 2 == 0 { 0 } else { 1 }));
        let started = start_random(&p, &conn, &mut rng, &mut seq, &ov);
        drop(live);
        match started {
            Ok(started) => {
                let slot = match started {
                    Started::Recv(i) => Some(i),
                    Started::Send(i) => {
                        conn.send_from[i] = Some(conn.ops.len());
                        None
                    }
                    Started::Rdma => None,
                };
                conn.ops.push((ov, slot));
            }
            // Refused at the door: the connection broke (the closer closed
            // its other end) or the queue is full. Nothing may have started.
            Err(e) => assert!(
                matches!(
                    e,
                    WsaError::WSAENOBUFS | WsaError::WSAECONNRESET | WsaError::WSAECONNABORTED
                ),
                "unexpected {e}"
            ),
        }
    }
    retire(&p, &sw, conn, take_closed(), &mut quarantine, &totals);
    quarantine.check_all();
}

/// When a run ends.
#[derive(Clone, Copy)]
enum Bound {
    Rounds(u64),
    Until(Instant),
}

impl Bound {
    fn from_env() -> Bound {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        match var("SOAK_SECS") {
            Some(s) => Bound::Until(Instant::now() + Duration::from_secs(s)),
            None => Bound::Rounds(var("SOAK_ROUNDS").unwrap_or(3000)),
        }
    }

    fn reached(&self, round: u64) -> bool {
        match *self {
            Bound::Rounds(n) => round >= n,
            Bound::Until(t) => round % 64 == 0 && Instant::now() >= t,
        }
    }
}

/// Threads of this process whose name starts with `sanpath` or `soft`
/// (the engine's pollers and dispatcher, the soft NIC's timers).
fn engine_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("sanpath") || name.starts_with("soft"))
        .count()
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |r| r.count())
}

/// Waits until `f()` holds, for at most 5 s (a joined thread can linger
/// in /proc for a moment); false if it never did.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// The two soak tests count the engine's threads and the process's
/// descriptors, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const WORKERS: u64 = 4;

fn soak(mode: PollerMode) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fds_before = open_fds();
    let started = Instant::now();
    let until = Bound::from_env();
    let mut config = Config::default();
    config.poller.mode = mode;
    config.poller.spin_budget = 100;
    config.mem.mlock = MlockPolicy::Off;
    config.qp.rnr_queue_max = 64;
    let ip = Ipv4Addr::new(198, 18, 7, 1);
    let sw = Arc::new(CountingSwitch::default());
    let (p, nic, net) = testkit::soft_provider(config, ip, sw.clone()).unwrap();
    let port = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let currents: Vec<Arc<Current>> = (0..WORKERS).map(|_| Arc::default()).collect();
    let workers: Vec<_> = (0..WORKERS)
        .map(|t| {
            let args = (
                p.clone(),
                sw.clone(),
                port.clone(),
                currents[t as usize].clone(),
                totals.clone(),
            );
            std::thread::spawn(move || {
                worker(args.0, args.1, ip, args.2, args.3, args.4, t + 1, until)
            })
        })
        .collect();
    // The closer: closes one end of a random worker's connection every
    // fraction of a millisecond (pacing, not synchronisation) until the
    // workers are done, racing the worker's posts on the other end.
    let done = Arc::new(AtomicBool::new(false));
    let closer = {
        let (p, done, totals, currents) =
            (p.clone(), done.clone(), totals.clone(), currents.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0xC105_E000);
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_micros(100 + rng.next() % 900));
                let w = (rng.next() % WORKERS) as usize;
                let mut live = currents[w].lock().unwrap();
                let Some(l) = live.as_mut().filter(|l| l.closed.is_none()) else {
                    continue;
                };
                let victim = if rng.next() % 2 == 0 { l.c } else { l.s };
                p.close_socket(victim).unwrap();
                l.closed = Some(victim);
                drop(live);
                totals.lock().unwrap().closer_closes += 1;
            }
        })
    };
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Release);
    closer.join().unwrap();
    let t = std::mem::take(&mut *totals.lock().unwrap());
    assert!(t.ok > 0, "nothing succeeded");
    assert_eq!(p.stats().ops_in_use, 0, "op slots leaked");
    assert_eq!(p.stats().sockets, 0, "sockets leaked");
    let st = nic.stats();
    assert_eq!(st.live_regions, 0, "regions leaked");
    assert_eq!(st.live_remote_keys, 0, "remote keys leaked");
    assert!(
        sw.completions.lock().unwrap().is_empty(),
        "an upcall for an op nobody started"
    );
    p.cleanup().unwrap();
    drop((p, nic, net));
    assert!(
        eventually(|| engine_threads() == 0),
        "{} engine threads left after cleanup",
        engine_threads()
    );
    assert!(
        eventually(|| open_fds() <= fds_before),
        "file descriptors left after cleanup: {} before, {} after",
        fds_before,
        open_fds()
    );
    eprintln!(
        "soak {mode:?}: {} ops completed exactly once in {:.1?} ({} ok, {} failed by closes), \
         {} reconnects, {} closes by the closer, 0 lost",
        t.ok + t.failed,
        started.elapsed(),
        t.ok,
        t.failed,
        t.reconnects,
        t.closer_closes
    );
}

#[test]
fn soak_close_under_load_threads_mode() {
    soak(PollerMode::Threads);
}

#[test]
fn soak_close_under_load_run_to_completion_mode() {
    soak(PollerMode::RunToCompletion);
}
