//! Close under load: threads each drive their own connections with random
//! sends, receives and RDMA writes while another thread closes sockets at
//! random moments (racing the posts). Afterwards: every started op completed
//! exactly once, every received message is intact (it carries its own
//! checksum), and no op slot, region or remote key is left behind.
//!
//! Bounded: a fixed number of rounds per thread (SOAK_ROUNDS to change it),
//! every wait has a deadline.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::fabric::Nic;
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::testkit;
use sanpath::{Config, WsaError, WsaResult};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
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
    let rc = Region::new(SLOTS * MSG, MlockPolicy::Off).unwrap();
    let rs = Region::new(2 * SLOTS * MSG, MlockPolicy::Off).unwrap();
    let mut desc = vec![0u8; RDMA_DESCRIPTOR_LEN];
    // SAFETY: the regions live in the Conn until both sockets are closed
    // and every op on them completed (`drain`).
    let handle_c = unsafe {
        p.register_memory(s, rs.as_ptr(), (SLOTS * MSG) as u32, MEM_READWRITE)
            .unwrap();
        p.register_rdma_memory(
            s,
            rs.as_ptr().add(SLOTS * MSG),
            (SLOTS * MSG) as u32,
            MEM_WRITE,
            &mut desc,
        )
        .unwrap();
        p.register_memory(c, rc.as_ptr(), (SLOTS * MSG) as u32, MEM_READWRITE)
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

fn soak(mode: PollerMode) {
    let rounds: u64 = std::env::var("SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut config = Config::default();
    config.poller.mode = mode;
    config.poller.spin_budget = 100;
    config.mem.mlock = MlockPolicy::Off;
    config.qp.rnr_queue_max = 64;
    let ip = Ipv4Addr::new(198, 18, 7, 1);
    let sw = Arc::new(CountingSwitch::default());
    let (p, nic, _net) = testkit::soft_provider(config, ip, sw.clone()).unwrap();
    let port = Arc::new(AtomicU16::new(20000));
    let totals = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (p, sw, port, totals) = (p.clone(), sw.clone(), port.clone(), totals.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                let mut conn = open(&p, ip, port.fetch_add(1, Ordering::Relaxed));
                let mut seq = 0u64;
                for _ in 0..rounds {
                    let i = (rng.next() as usize) % SLOTS;
                    let ov = Box::new(Overlapped::new(if rng.next() % 2 == 0 { 0 } else { 1 }));
                    let started = match rng.next() % 32 {
                        0..=11 => {
                            let b = [WsaBuf {
                                len: MSG as u32,
                                buf: conn.rs.as_ptr().wrapping_add(i * MSG),
                            }];
                            // SAFETY: rs outlives the op (drained before drop).
                            unsafe { p.recv(conn.s, &b, &ov) }.map(|_| Some(i))
                        }
                        12..=23 => {
                            let mut m = vec![0u8; MSG];
                            fill(&mut m, seq);
                            seq += 1;
                            // Every op of a connection runs on this thread and
                            // the soft NIC copies at post time or at the
                            // receive's post, both here: no concurrent reader.
                            conn.rc.write_at(i * MSG, &m).unwrap();
                            let b = [WsaBuf {
                                len: MSG as u32,
                                buf: conn.rc.as_ptr().wrapping_add(i * MSG),
                            }];
                            // SAFETY: rc outlives the op (drained before drop).
                            unsafe { p.send(conn.c, &b, 0, &ov) }.map(|_| None)
                        }
                        24..=30 => {
                            let b = [WsaBufEx {
                                len: MSG as u32,
                                buf: conn.rc.as_ptr().wrapping_add(i * MSG),
                                handle: conn.handle_c as usize,
                            }];
                            // SAFETY: rc outlives the op (drained before drop).
                            unsafe {
                                p.rdma_write(conn.c, &b, &conn.desc, (i * MSG) as u32, 0, &ov)
                            }
                            .map(|_| None)
                        }
                        _ => {
                            // Close one end at a random moment, then the
                            // other; ops still pending must abort or reset.
                            let (first, second) = if rng.next() % 2 == 0 {
                                (conn.c, conn.s)
                            } else {
                                (conn.s, conn.c)
                            };
                            p.close_socket(first).unwrap();
                            p.close_socket(second).unwrap();
                            let (ok, failed) = drain(&p, &sw, &conn);
                            let mut tt = totals.lock().unwrap();
                            tt.0 += ok;
                            tt.1 += failed;
                            tt.2 += 1;
                            drop(tt);
                            conn = open(&p, ip, port.fetch_add(1, Ordering::Relaxed));
                            continue;
                        }
                    };
                    match started {
                        Ok(slot) => conn.ops.push((ov, slot)),
                        // Refused at the door: the connection broke or the
                        // queue is full. Nothing may have started.
                        Err(e) => assert!(
                            matches!(
                                e,
                                WsaError::WSAENOBUFS
                                    | WsaError::WSAECONNRESET
                                    | WsaError::WSAECONNABORTED
                            ),
                            "unexpected {e}"
                        ),
                    }
                    if conn.ops.len() > 200 {
                        p.close_socket(conn.c).unwrap();
                        p.close_socket(conn.s).unwrap();
                        let (ok, failed) = drain(&p, &sw, &conn);
                        let mut tt = totals.lock().unwrap();
                        tt.0 += ok;
                        tt.1 += failed;
                        tt.2 += 1;
                        drop(tt);
                        conn = open(&p, ip, port.fetch_add(1, Ordering::Relaxed));
                    }
                }
                p.close_socket(conn.c).unwrap();
                p.close_socket(conn.s).unwrap();
                let (ok, failed) = drain(&p, &sw, &conn);
                let mut tt = totals.lock().unwrap();
                tt.0 += ok;
                tt.1 += failed;
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (ok, failed, closes) = *totals.lock().unwrap();
    assert!(ok > 0, "nothing succeeded");
    assert_eq!(p.stats().ops_in_use, 0, "op slots leaked");
    assert_eq!(p.stats().sockets, 0);
    let st = nic.stats();
    assert_eq!(st.live_regions, 0, "regions leaked");
    assert_eq!(st.live_remote_keys, 0, "remote keys leaked");
    eprintln!("soak {mode:?}: {ok} ops ok, {failed} failed by closes, {closes} mid-run closes");
    p.cleanup().unwrap();
}

#[test]
fn soak_close_under_load_threads_mode() {
    soak(PollerMode::Threads);
}

#[test]
fn soak_close_under_load_run_to_completion_mode() {
    soak(PollerMode::RunToCompletion);
}
