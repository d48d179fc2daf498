//! Many connections in one provider (issue 16): thousands of connected
//! socket pairs on the soft fabric, each with a receive pending; every
//! configured limit answered with its Winsock code (the socket table
//! `WSAEMFILE`, the op slab and the completion queues' room `WSAENOBUFS`),
//! never a panic or a hang; then every socket closed while its receive is
//! pending, and every one of those receives completed exactly once, every
//! switch handle closed once, nothing left in the provider.
//!
//! Not timed: `sanbench conn_scale` measures the same at up to 10,000
//! connections. `SCALE_CONNS` sets the number of pairs (default 1,000: a
//! debug build on two cores; 2,000 takes about 90 s there).

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::event::Event;
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::testkit;
use sanpath::{Config, WsaError, WsaResult};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound on every wait: a lost connect or completion fails loudly.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Each socket's slice of the shared buffer.
const SLICE: usize = 64;
/// Queue depths of every queue pair (small: the test is about counts).
const DEPTH: u32 = 4;

/// Counts completion upcalls per overlapped record and handle closes.
#[derive(Default)]
struct CountingSwitch {
    next: AtomicUsize,
    completions: Mutex<HashMap<usize, (u32, u32)>>,
    closed: Mutex<HashMap<usize, u32>>,
}

impl Switch for CountingSwitch {
    fn create_socket_handle(&self, _: u32, _: usize) -> WsaResult<SwitchHandle> {
        Ok(SwitchHandle(
            0x1000 + self.next.fetch_add(1, Ordering::Relaxed),
        ))
    }
    fn close_socket_handle(&self, h: SwitchHandle) -> WsaResult<()> {
        *self.closed.lock().unwrap().entry(h.0).or_default() += 1;
        Ok(())
    }
    fn query_socket_handle_context(&self, _: SwitchHandle) -> WsaResult<usize> {
        Err(WsaError::WSAENOTSOCK)
    }
    fn complete_overlapped_request(
        &self,
        _: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        let key = ov as *const Overlapped as usize;
        let mut m = self.completions.lock().unwrap();
        let e = m.entry(key).or_default();
        e.0 += 1;
        e.1 = error;
        drop(m);
        ov.complete(error, bytes);
        Ok(())
    }
}

fn conns() -> usize {
    std::env::var("SCALE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Room for `n` pairs and a listener exactly: the table holds `2n + 1`
/// sockets plus `spare`, the slab one op per socket, the CQ `2n` queue pairs.
fn config(mode: PollerMode, n: usize, spare: usize) -> Config {
    let mut c = Config::default();
    c.poller.mode = mode;
    c.poller.count = 1;
    c.poller.spin_budget = 200;
    c.mem.mlock = MlockPolicy::Off;
    c.ops.max_sockets = 2 * n + 1 + spare;
    c.ops.slab_size = 2 * n;
    c.qp.send_depth = DEPTH;
    c.qp.recv_depth = DEPTH;
    c.qp.cq_depth = (2 * n) as u32 * 2 * DEPTH;
    c.close.quiesce_timeout_ms = 10_000;
    c
}

fn socket(p: &Provider) -> WsaResult<ProviderSocket> {
    p.socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
}

/// A listener on `addr` and the event its `FD_ACCEPT` signals.
fn listen(p: &Provider, addr: SocketAddrV4) -> (ProviderSocket, Arc<Event>) {
    let l = socket(p).unwrap();
    p.bind(l, addr).unwrap();
    p.listen(l, 8).unwrap();
    let lev = Arc::new(Event::new());
    p.event_select(l, Some(lev.clone()), FD_ACCEPT).unwrap();
    (l, lev)
}

/// Connects `s` to `addr` and accepts it on `l`: the accepted socket, or
/// the code the connect failed with (directly or through `FD_CONNECT`).
fn connect_one(
    p: &Provider,
    s: ProviderSocket,
    addr: SocketAddrV4,
    l: ProviderSocket,
    lev: &Event,
) -> WsaResult<ProviderSocket> {
    let ev = Arc::new(Event::new());
    p.event_select(s, Some(ev.clone()), FD_CONNECT).unwrap();
    p.connect(s, addr, &[])?;
    let deadline = Instant::now() + TIMEOUT;
    let accepted = loop {
        match p.accept(l, &mut |_| Condition::Accept) {
            Ok((a, _)) => break Ok(a),
            Err(WsaError::WSAEWOULDBLOCK) => {
                assert!(Instant::now() < deadline, "no connect request arrived");
                lev.wait(Duration::from_millis(100));
            }
            Err(e) => break Err(e),
        }
    };
    assert!(ev.wait(TIMEOUT), "FD_CONNECT not signalled");
    let ne = p.enum_network_events(s, Some(&ev)).unwrap();
    match ne.error_codes[FD_CONNECT_BIT] {
        0 => accepted,
        c => {
            let e = WsaError::from_code(c).expect("a Winsock code");
            assert_eq!(accepted.err(), Some(e), "accept and connect disagree");
            Err(e)
        }
    }
}

fn many_connections(mode: PollerMode) {
    let n = conns();
    // Two sockets beyond the pairs: one whose connect finds no CQ room,
    // one more to fill the table.
    let sw = Arc::new(CountingSwitch::default());
    let ip = Ipv4Addr::new(198, 18, 16, 1);
    let (p, _nic, _net) = testkit::soft_provider(config(mode, n, 2), ip, sw.clone()).unwrap();
    let addr = SocketAddrV4::new(ip, 16000);
    let (l, lev) = listen(&p, addr);

    let mut socks = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let c = socket(&p).unwrap();
        let s = connect_one(&p, c, addr, l, &lev).expect("a pair within the limits");
        socks.extend([c, s]);
    }
    let st = p.stats();
    assert_eq!(
        (st.sockets, st.sockets_connected, st.sockets_listening),
        (2 * n + 1, 2 * n, 1),
        "{st:?}"
    );

    // The CQ holds exactly the 2n queue pairs: one more connection has no
    // room on either end.
    let extra = socket(&p).unwrap();
    assert_eq!(
        connect_one(&p, extra, addr, l, &lev).unwrap_err(),
        WsaError::WSAENOBUFS,
        "a connection beyond the CQ's room"
    );
    // The table is full now.
    let last = socket(&p).unwrap();
    assert_eq!(socket(&p).unwrap_err(), WsaError::WSAEMFILE);
    p.close_socket(last).unwrap();
    p.close_socket(extra).unwrap();
    p.close_socket(l).unwrap();

    // One receive pending on every socket fills the op slab.
    let buf = Region::new(socks.len() * SLICE, MlockPolicy::Off).unwrap();
    let ovs: Vec<Overlapped> = (0..socks.len()).map(|_| Overlapped::new(0)).collect();
    for (k, (&s, ov)) in socks.iter().zip(&ovs).enumerate() {
        let at = buf.as_ptr().wrapping_add(k * SLICE);
        let b = [WsaBuf {
            len: SLICE as u32,
            buf: at,
        }];
        // SAFETY: the slice lives in `buf`, the records in `ovs`, both
        // until after every socket was closed and its op completed.
        unsafe {
            p.register_memory(s, at, SLICE as u32, MEM_READWRITE)
                .unwrap();
            p.recv(s, &b, ov).unwrap();
        }
    }
    let st = p.stats();
    assert_eq!((st.ops_in_use, st.ops_started), (2 * n, 2 * n as u64));
    assert_eq!(
        (st.registrations, st.registered_bytes),
        (2 * n, (2 * n * SLICE) as u64)
    );
    let spare = Overlapped::new(0);
    let b = [WsaBuf {
        len: SLICE as u32,
        buf: buf.as_ptr(),
    }];
    // SAFETY: as above; the op is refused, so nothing keeps the record.
    let refused = unsafe { p.recv(socks[0], &b, &spare) };
    assert_eq!(refused.unwrap_err(), WsaError::WSAENOBUFS, "a full op slab");
    assert!(!spare.is_pending(), "a refused op left its record pending");

    // Close everything while the receives are pending.
    for &s in &socks {
        p.close_socket(s).unwrap();
    }
    let deadline = Instant::now() + TIMEOUT;
    while ovs.iter().any(Overlapped::is_pending) {
        assert!(Instant::now() < deadline, "a receive never completed");
        p.progress();
        std::thread::yield_now();
    }
    let completions = sw.completions.lock().unwrap().clone();
    for ov in &ovs {
        let (count, error) = completions[&(ov as *const Overlapped as usize)];
        assert_eq!(count, 1, "a receive completed {count} times");
        assert!(
            error == WsaError::WSA_OPERATION_ABORTED.code() as u32
                || error == WsaError::WSAECONNRESET.code() as u32,
            "a receive pending at close ended with {error}"
        );
    }
    assert_eq!(completions.len(), ovs.len(), "completions of unknown ops");
    let closed = sw.closed.lock().unwrap().clone();
    // The pairs, the listener, `extra`, `last`, and the socket the refused
    // accept made and undid.
    assert_eq!(closed.len(), 2 * n + 4, "every handle closed");
    assert!(closed.values().all(|&k| k == 1), "a handle closed twice");
    let st = p.stats();
    assert_eq!(
        (
            st.sockets,
            st.sockets_closing,
            st.ops_in_use,
            st.registrations
        ),
        (0, 0, 0, 0),
        "{st:?}"
    );
    assert_eq!(
        st.ops_started,
        2 * n as u64,
        "the refused receive never started"
    );
    assert_eq!(
        (st.completed_ok, st.completed_failed),
        (0, 0),
        "every receive ended by a close: {st:?}"
    );
    assert_eq!(st.completed_aborted + st.completed_reset, 2 * n as u64);
    p.cleanup().unwrap();
}

#[test]
fn many_connections_run_to_completion() {
    many_connections(PollerMode::RunToCompletion);
}

#[test]
fn many_connections_threads() {
    many_connections(PollerMode::Threads);
}

/// The default config holds tens of thousands of sockets (the table grows
/// with use): every one of `ops.max_sockets` opens, the next fails
/// `WSAEMFILE`, and a closed one makes room again.
#[test]
fn the_default_socket_table_opens_its_whole_capacity() {
    let c = Config::default();
    let max = c.ops.max_sockets;
    assert!(max >= 10_000, "the default allows {max} sockets");
    let sw = Arc::new(CountingSwitch::default());
    let (p, _nic, _net) =
        testkit::soft_provider(c, Ipv4Addr::new(198, 18, 16, 2), sw.clone()).unwrap();
    let mut socks: Vec<_> = (0..max).map(|_| socket(&p).unwrap()).collect();
    assert_eq!(p.stats().sockets, max);
    assert_eq!(socket(&p).unwrap_err(), WsaError::WSAEMFILE);
    p.close_socket(socks.swap_remove(max / 2)).unwrap();
    socks.push(socket(&p).unwrap());
    assert_eq!(socket(&p).unwrap_err(), WsaError::WSAEMFILE);
    for s in socks {
        p.close_socket(s).unwrap();
    }
    assert!(p.stats().holds_nothing(), "{:?}", p.stats());
    assert_eq!(sw.closed.lock().unwrap().len(), max + 1);
}

/// With the default config a soft provider's one completion queue takes
/// far more than the 32 queue pairs a 16,384-entry CQ would (`cq_depth`
/// 0: no bound where a CQ holds no completions of its own): 300 pairs
/// connect, each carries a message, and all close clean.
#[test]
fn the_default_completion_queue_takes_hundreds_of_queue_pairs() {
    const PAIRS: usize = 300;
    let c = Config::default();
    assert_eq!((c.qp.cq_depth, c.poller.count), (0, 1));
    let sw = Arc::new(CountingSwitch::default());
    let ip = Ipv4Addr::new(198, 18, 16, 3);
    let (p, _nic, _net) = testkit::soft_provider(c, ip, sw.clone()).unwrap();
    let addr = SocketAddrV4::new(ip, 16001);
    let (l, lev) = listen(&p, addr);
    let mut pairs = Vec::with_capacity(PAIRS);
    for _ in 0..PAIRS {
        let c = socket(&p).unwrap();
        let s = connect_one(&p, c, addr, l, &lev).expect("a pair with the defaults");
        pairs.push((c, s));
    }
    assert_eq!(p.stats().sockets_connected, 2 * PAIRS);
    // One message over each pair, the last connected first.
    let buf = Region::new(2 * SLICE, MlockPolicy::Off).unwrap();
    let (tx, rx) = (buf.as_ptr(), buf.as_ptr().wrapping_add(SLICE));
    for &(c, s) in pairs.iter().rev() {
        let (send_ov, recv_ov) = (Overlapped::new(0), Overlapped::new(0));
        // SAFETY: both halves of `buf` and both records outlive the ops,
        // which complete before the next round.
        unsafe {
            p.register_memory(c, tx, SLICE as u32, MEM_READWRITE)
                .unwrap();
            p.register_memory(s, rx, SLICE as u32, MEM_READWRITE)
                .unwrap();
            let b = |at| [WsaBuf { len: 8, buf: at }];
            p.recv(s, &b(rx), &recv_ov).unwrap();
            p.send(c, &b(tx), 0, &send_ov).unwrap();
        }
        for (sock, ov) in [(c, &send_ov), (s, &recv_ov)] {
            let deadline = Instant::now() + TIMEOUT;
            let done = loop {
                match p.get_overlapped_result(sock, ov, false) {
                    Ok(r) => break r,
                    Err(WsaError::WSA_IO_INCOMPLETE) => {
                        assert!(Instant::now() < deadline, "a message was lost");
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("op failed: {e:?}"),
                }
            };
            assert_eq!(done.0, 8);
        }
    }
    for (c, s) in pairs {
        p.close_socket(c).unwrap();
        p.close_socket(s).unwrap();
    }
    p.close_socket(l).unwrap();
    assert!(p.stats().holds_nothing(), "{:?}", p.stats());
}
