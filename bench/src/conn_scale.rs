//! `conn_scale`: what N connected socket pairs cost, and whether the data
//! path stays flat as N grows.
//!
//! On the soft fabric both ends of every pair are in one provider; on verbs
//! the accepting ends are in a provider on the `-d` device and the
//! connecting ends in a second one on `--peer-dev` (rxe0 <-> rxe1 in the
//! VM; the same device by default), so every connection crosses the NIC.
//! Either way every queue pair of a provider is on its few shared CQs
//! (`poller.count`, round robin), and on verbs the queues are kept short
//! (`VERBS_DEPTH`), so that N of them fit the device's CQ size.
//!
//! For each N: connect N pairs one after the other (client and accepted
//! server socket, the client connected once FD_CONNECT says so), each
//! socket with its own registered 64-byte buffer and one receive always
//! pending; then an 8 B send
//! ping-pong whose active connection goes round robin over all N (so every
//! round touches a connection that was idle for N - 1 rounds); then close
//! all 2N sockets while each still has its receive pending, and check that
//! every one of those receives completed exactly once: each record says
//! aborted or reset, the providers' completion counters grew by exactly 2N
//! (none failed, none twice), and no socket, op or registration is left.
//! `close_s` runs from the first close until all of that holds.
//!
//! Streams (the reference switch) are measured on the soft fabric only.
//!
//! `bytes_per_conn` is the growth of the process's resident set over the
//! set-up of the N pairs, divided by N (one connection = both its sockets
//! and everything the engine keeps for them); `reg_bytes_per_conn` the
//! memory registered for them, over N.

use crate::clock::Clock;
use crate::engine::tune;
use crate::stats::Lat;
use crate::Mode;
use sanpath::config::{FabricKind, MlockPolicy};
use sanpath::fabric::soft::SoftNetwork;
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream, SwitchOptions};
use sanpath::testkit::{self, CompletingSwitch};
use sanpath::{Config, WsaError};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// hEvent with bit 0 set: no upcall, the benchmark polls.
const POLLED: usize = 1;
/// Each socket's slice of the shared buffer: send source at 0, receive
/// sink at `SLICE / 2`.
const SLICE: usize = 64;
/// Message size of the ping-pong.
pub const MSG: usize = 8;
/// Send and receive queue depth of every verbs queue pair here: one op of
/// each is ever outstanding. The backend promises each QP its send depth,
/// its memory-window slack (16) and its receive depth on a shared CQ: 32
/// entries, so 1,000 QPs fit one CQ of rxe's 32,767.
const VERBS_DEPTH: u32 = 8;
/// Control port of the listener.
const PORT: u16 = 18600;
/// Bound on every wait of the raw pairs (a connection, a completion the
/// close owes): a broken run fails, never hangs.
const RAW_TIMEOUT: Duration = Duration::from_secs(30);

/// The sockets a run of `conn_scale` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Api {
    /// Raw SPI sockets (`spi_send` rows).
    SpiSend,
    /// The reference switch's streams (`stream` rows; soft fabric only).
    Stream,
}

/// One connection count's figures.
pub struct Scale {
    /// `spi_send` (raw SPI sockets) or `stream` (the reference switch).
    pub api: &'static str,
    pub conns: usize,
    pub lat: Lat,
    pub bytes_per_conn: f64,
    pub reg_bytes_per_conn: f64,
    pub connect_s: f64,
    pub close_s: f64,
    /// The provider's counters with every pair connected and a receive
    /// pending on each socket (`--stats`).
    pub peak: Option<ProviderStats>,
}

impl Scale {
    pub fn json(&self, mode: &str) -> Value {
        json!({
            "test": "conn_scale", "api": self.api, "mode": mode, "conns": self.conns,
            "size": MSG, "lat_ns": self.lat.json(), "bytes_per_conn": self.bytes_per_conn,
            "reg_bytes_per_conn": self.reg_bytes_per_conn, "connect_s": self.connect_s,
            "close_s": self.close_s, "stats": self.peak,
        })
    }
}

/// The engine settings N pairs need on top of the benchmark's: table, op
/// slab and CQ room for every socket, one receive pending on each.
pub fn config(base: &Config, mode: Mode, conns: usize) -> Config {
    let mut c = base.clone();
    tune(&mut c, mode);
    let sockets = 2 * conns + 2;
    c.ops.max_sockets = c.ops.max_sockets.max(sockets);
    c.ops.slab_size = c.ops.slab_size.max(2 * sockets);
    if c.fabric.kind == FabricKind::Verbs {
        c.qp.send_depth = VERBS_DEPTH;
        c.qp.recv_depth = VERBS_DEPTH;
    }
    let per_qp = u64::from(c.qp.send_depth) + u64::from(c.qp.recv_depth);
    // Both ends of every pair are this provider's (soft), on its CQs (all
    // on one, at worst); a verbs device caps it at its own maximum.
    let need = per_qp * sockets as u64;
    c.qp.cq_depth = c.qp.cq_depth.max(u32::try_from(need).unwrap_or(u32::MAX));
    c.connect.backlog_max = c.connect.backlog_max.max(16);
    c.fabric.soft.addresses = vec![Ipv4Addr::new(198, 18, 251, 1)];
    c
}

/// Resident set size of this process in bytes (Linux `/proc/self/status`).
fn rss() -> Result<u64, String> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "/proc/self/status: no VmRSS".into())
}

/// One side of a connection: socket, receive record, send record.
struct End {
    sock: ProviderSocket,
    /// Whether it is an accepted socket (of `Pairs::servers_p`).
    server: bool,
    rov: Overlapped,
    sov: Overlapped,
}

struct Pairs {
    /// The provider of the connecting sockets.
    clients_p: Arc<Provider>,
    /// The provider of the accepted sockets: the same one on soft.
    servers_p: Arc<Provider>,
    /// Kept alive with the providers: the soft NIC's network.
    _net: Option<Arc<SoftNetwork>>,
    buf: Region,
    clients: Vec<End>,
    servers: Vec<End>,
}

type Res<T> = Result<T, String>;

fn wsa(what: &'static str) -> impl Fn(WsaError) -> String {
    move |e| format!("conn_scale: {what}: {e}")
}

impl Pairs {
    fn p(&self, end: &End) -> &Provider {
        if end.server {
            &self.servers_p
        } else {
            &self.clients_p
        }
    }

    /// The distinct providers (one on soft, two on verbs).
    fn providers(&self) -> Vec<&Provider> {
        let mut v = vec![&*self.clients_p];
        if !Arc::ptr_eq(&self.clients_p, &self.servers_p) {
            v.push(&self.servers_p);
        }
        v
    }

    /// The providers' counters, added up.
    fn stats(&self) -> ProviderStats {
        let mut t = ProviderStats::default();
        for s in self.providers().iter().map(|p| p.stats()) {
            t.ops_in_use += s.ops_in_use;
            t.sockets += s.sockets;
            t.sockets_open += s.sockets_open;
            t.sockets_bound += s.sockets_bound;
            t.sockets_listening += s.sockets_listening;
            t.sockets_connecting += s.sockets_connecting;
            t.sockets_connected += s.sockets_connected;
            t.sockets_closing += s.sockets_closing;
            t.ops_started += s.ops_started;
            t.completed_ok += s.completed_ok;
            t.completed_aborted += s.completed_aborted;
            t.completed_reset += s.completed_reset;
            t.completed_failed += s.completed_failed;
            t.deferred_closes += s.deferred_closes;
            t.registrations += s.registrations;
            t.registered_bytes += s.registered_bytes;
        }
        t
    }

    fn slice(&self, conn: usize, server: bool) -> *mut u8 {
        self.buf
            .as_ptr()
            .wrapping_add((2 * conn + usize::from(server)) * SLICE)
    }

    /// Registers the socket's slice and posts its first receive.
    fn arm(&self, end: &End, at: *mut u8) -> Res<()> {
        // SAFETY: the slice lives in `self.buf`, which outlives every socket
        // (the sockets are closed before `Pairs` drops).
        unsafe {
            self.p(end)
                .register_memory(end.sock, at, SLICE as u32, MEM_READWRITE)
                .map_err(wsa("register"))?;
        }
        self.recv(end, at)
    }

    fn recv(&self, end: &End, at: *mut u8) -> Res<()> {
        let b = [WsaBuf {
            len: MSG as u32,
            buf: at.wrapping_add(SLICE / 2),
        }];
        // SAFETY: registered slice (see `arm`); `end.rov` lives in the
        // `Vec` that is never resized while ops are pending.
        unsafe { self.p(end).recv(end.sock, &b, &end.rov) }.map_err(wsa("recv"))
    }

    fn send(&self, end: &End, at: *mut u8) -> Res<()> {
        let b = [WsaBuf {
            len: MSG as u32,
            buf: at,
        }];
        // SAFETY: as in `recv`.
        unsafe { self.p(end).send(end.sock, &b, 0, &end.sov) }.map_err(wsa("send"))
    }

    fn wait(&self, end: &End, ov: &Overlapped) -> Res<()> {
        self.p(end)
            .get_overlapped_result(end.sock, ov, true)
            .map(|_| ())
            .map_err(wsa("completion"))
    }
}

/// The provider of the connecting ends, that of the accepting ends, and
/// the soft network they are on (if soft).
type Providers = (Arc<Provider>, Arc<Provider>, Option<Arc<SoftNetwork>>);

/// The providers of the two ends: one soft provider for both, or on verbs
/// one on the configured device (accepting) and one on `peer_dev`
/// (connecting; the same device when `None`).
fn providers(config: Config, peer_dev: Option<&str>) -> Res<Providers> {
    if config.fabric.kind == FabricKind::Soft {
        let ip = config.fabric.soft.addresses[0];
        let (p, _nic, net) = testkit::soft_provider(config, ip, Arc::new(CompletingSwitch))?;
        let p = Arc::new(p);
        return Ok((p.clone(), p, Some(net)));
    }
    let mut client = config.clone();
    if let Some(d) = peer_dev {
        client.fabric.verbs.device = d.to_string();
    }
    let servers = crate::engine::provider(config, false)?;
    let clients = crate::engine::provider(client, false)?;
    Ok((clients, servers, None))
}

/// Connects `n` pairs, one after the other; returns them and the seconds
/// it took.
fn connect(config: Config, peer_dev: Option<&str>, n: usize) -> Res<(Pairs, f64)> {
    let (cp, sp, net) = providers(config, peer_dev)?;
    let buf = Region::new(2 * n * SLICE, MlockPolicy::Off).map_err(|e| e.to_string())?;
    let addr = SocketAddrV4::new(crate::engine::address(&sp)?, PORT);
    let socket = |p: &Provider| {
        p.socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
            .map_err(wsa("socket"))
    };
    let t0 = Instant::now();
    let l = socket(&sp)?;
    sp.bind(l, addr).map_err(wsa("bind"))?;
    sp.listen(l, 16).map_err(wsa("listen"))?;
    let ev = Arc::new(sanpath::event::Event::new());
    sp.event_select(l, Some(ev.clone()), FD_ACCEPT)
        .map_err(wsa("event_select"))?;
    let connected = Arc::new(sanpath::event::Event::new());
    let mut clients = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    let end = |sock, server| End {
        sock,
        server,
        rov: Overlapped::new(POLLED),
        sov: Overlapped::new(POLLED),
    };
    for k in 0..n {
        let c = socket(&cp)?;
        // On a fabric whose connector learns of the accept later (verbs),
        // the client is connected only once FD_CONNECT says so.
        cp.event_select(c, Some(connected.clone()), FD_CONNECT)
            .map_err(wsa("event_select"))?;
        cp.connect(c, addr, &[]).map_err(wsa("connect"))?;
        clients.push(end(c, false));
        let s = loop {
            match sp.accept(l, &mut |_| Condition::Accept) {
                Ok((s, _)) => break s,
                Err(WsaError::WSAEWOULDBLOCK) => {
                    if !ev.wait(RAW_TIMEOUT) {
                        return Err(format!(
                            "conn_scale: connection {k}: no connect request within {} s",
                            RAW_TIMEOUT.as_secs()
                        ));
                    }
                }
                Err(e) => return Err(wsa("accept")(e)),
            }
        };
        servers.push(end(s, true));
        if !connected.wait(RAW_TIMEOUT) {
            return Err(format!(
                "conn_scale: connection {k}: accepted, but not connected within {} s",
                RAW_TIMEOUT.as_secs()
            ));
        }
        let got = cp
            .enum_network_events(c, Some(&connected))
            .map_err(wsa("enum_network_events"))?;
        if got.error_codes[FD_CONNECT_BIT] != 0 {
            return Err(format!(
                "conn_scale: connection {k}: connect failed with error {}",
                got.error_codes[FD_CONNECT_BIT]
            ));
        }
        cp.event_select(c, None, 0).map_err(wsa("event_select"))?;
    }
    sp.close_socket(l).map_err(wsa("close listener"))?;
    let connect_s = t0.elapsed().as_secs_f64();
    let pairs = Pairs {
        clients_p: cp,
        servers_p: sp,
        _net: net,
        buf,
        clients,
        servers,
    };
    for k in 0..n {
        pairs.arm(&pairs.clients[k], pairs.slice(k, false))?;
        pairs.arm(&pairs.servers[k], pairs.slice(k, true))?;
    }
    Ok((pairs, connect_s))
}

/// Round-robin ping-pong over all pairs, `iters` samples after a warm-up
/// round over every pair; half round trip per sample.
fn ping_pong(pairs: &Pairs, iters: usize) -> Res<Lat> {
    let n = pairs.clients.len();
    let warm = n.max(iters / 10);
    let total = warm + iters;
    std::thread::scope(|sc| {
        let server = sc.spawn(|| -> Res<()> {
            crate::baseline::pin(Some(1));
            for i in 0..total {
                let k = i % n;
                let (end, at) = (&pairs.servers[k], pairs.slice(k, true));
                pairs.wait(end, &end.rov)?;
                pairs.recv(end, at)?;
                pairs.send(end, at)?;
                pairs.wait(end, &end.sov)?;
            }
            Ok(())
        });
        crate::baseline::pin(Some(0));
        let clock = Clock::start();
        let mut ticks = Vec::with_capacity(iters);
        for i in 0..total {
            let k = i % n;
            let (end, at) = (&pairs.clients[k], pairs.slice(k, false));
            let t0 = clock.now();
            pairs.send(end, at)?;
            pairs.wait(end, &end.rov)?;
            let t = clock.now().saturating_sub(t0);
            pairs.recv(end, at)?;
            pairs.wait(end, &end.sov)?;
            if i >= warm {
                ticks.push(t);
            }
        }
        server.join().expect("server thread")?;
        Ok(clock.lat(&ticks, 0.5))
    })
}

/// Closes every socket while its receive is pending; checks each receive
/// completed exactly once, as aborted (our close) or reset (the peer's):
/// the records say so, the completion counters grew by exactly one per
/// socket, none failed, and no socket, op or registration is left.
/// Returns the seconds from the first close until all of that held.
fn close_all(pairs: &Pairs) -> Res<f64> {
    let ends = || pairs.clients.iter().chain(&pairs.servers);
    if let Some(e) = ends().find(|e| !e.rov.is_pending()) {
        return Err(format!(
            "conn_scale: socket {:?} has no receive pending before close",
            e.sock
        ));
    }
    let before = pairs.stats();
    let t0 = Instant::now();
    for e in ends() {
        pairs.p(e).close_socket(e.sock).map_err(wsa("close"))?;
    }
    // A fabric that flushes in the NIC (verbs) may complete the last ops,
    // and finish the last closes, after `close_socket` returned.
    let deadline = t0 + RAW_TIMEOUT;
    let after = loop {
        let st = pairs.stats();
        if st.holds_nothing() {
            break st;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "conn_scale: left {} s after closing all: {st:?}",
                RAW_TIMEOUT.as_secs()
            ));
        }
        for p in pairs.providers() {
            p.progress();
        }
        std::thread::yield_now();
    };
    let close_s = t0.elapsed().as_secs_f64();
    let aborted = WsaError::WSA_OPERATION_ABORTED.code() as usize;
    let reset = WsaError::WSAECONNRESET.code() as usize;
    for e in ends() {
        let status = e.rov.internal.load(std::sync::atomic::Ordering::Acquire);
        if status != aborted && status != reset {
            return Err(format!(
                "conn_scale: a receive pending at close ended with status {status:#x}"
            ));
        }
    }
    let sockets = 2 * pairs.clients.len() as u64;
    let ended = (after.completed_aborted + after.completed_reset)
        - (before.completed_aborted + before.completed_reset);
    let all = |s: &ProviderStats| {
        s.completed_ok + s.completed_aborted + s.completed_reset + s.completed_failed
    };
    if ended != sockets
        || all(&after) - all(&before) != sockets
        || after.ops_started != before.ops_started
    {
        return Err(format!(
            "conn_scale: closing {sockets} sockets, each with one receive pending, completed \
             {ended} aborted or reset ({} in all, {} ops started meanwhile); before: \
             {before:?}, after: {after:?}",
            all(&after) - all(&before),
            after.ops_started - before.ops_started
        ));
    }
    Ok(close_s)
}

/// Measures one connection count (`peer_dev`: see [`providers`]).
pub fn run(
    base: &Config,
    mode: Mode,
    peer_dev: Option<&str>,
    conns: usize,
    iters: usize,
    stats: bool,
) -> Res<Scale> {
    let config = config(base, mode, conns);
    let rss0 = rss()?;
    let (pairs, connect_s) = connect(config, peer_dev, conns)?;
    let armed = pairs.stats();
    let bytes_per_conn = rss()?.saturating_sub(rss0) as f64 / conns as f64;
    let lat = ping_pong(&pairs, iters)?;
    let close_s = close_all(&pairs)?;
    for p in pairs.providers() {
        let _ = p.cleanup();
    }
    Ok(Scale {
        api: "spi_send",
        conns,
        lat,
        bytes_per_conn,
        reg_bytes_per_conn: armed.registered_bytes as f64 / conns as f64,
        connect_s,
        close_s,
        peak: stats.then_some(armed),
    })
}

/// Bound on every blocking stream call: a broken run fails, never hangs.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The same for N pairs of the reference switch's streams (whatever
/// buffers a stream connection has by default): connect, round-robin 8 B
/// ping-pong (blocking `send` / `recv`), then abort all 2N streams, each
/// with its receive buffers posted, and wait until the provider holds no
/// socket and no op.
pub fn run_streams(
    base: &Config,
    mode: Mode,
    conns: usize,
    iters: usize,
    stats: bool,
) -> Res<Scale> {
    let mut engine = config(base, mode, conns);
    engine.fabric.soft.addresses = vec![Ipv4Addr::new(198, 18, 252, 1)];
    // An op slot per receive a stream keeps posted and per send in flight
    // (the default slab, 4,096, holds 128 pairs: then WSAENOBUFS).
    let o = SwitchOptions::default();
    let per_stream = usize::from(o.recv_slots) + usize::from(o.send_slots);
    engine.ops.slab_size = engine.ops.slab_size.max(2 * (conns + 1) * per_stream);
    let ip = engine.fabric.soft.addresses[0];
    let e =
        |what: &'static str| move |e: std::io::Error| format!("conn_scale streams: {what}: {e}");
    let rss0 = rss()?;
    let nic = SoftNetwork::new()
        .attach(engine.soft_nic(vec![ip]))
        .map_err(|e| e.to_string())?;
    let rc = RuntimeConfig {
        switch: SwitchOptions::bounded(STREAM_TIMEOUT),
        engine,
    };
    let rt = Runtime::with_nic(rc, nic).map_err(e("runtime"))?;
    let t0 = Instant::now();
    let listener = Listener::bind(&rt, SocketAddrV4::new(ip, 18601)).map_err(e("listen"))?;
    let addr = listener.local_addr();
    let (clients, servers) = std::thread::scope(|sc| -> Res<(Vec<Stream>, Vec<Stream>)> {
        let acceptor = sc.spawn(|| -> Res<Vec<Stream>> {
            (0..conns)
                .map(|_| listener.accept().map(|(s, _)| s).map_err(e("accept")))
                .collect()
        });
        let clients: Res<Vec<Stream>> = (0..conns)
            .map(|_| Stream::connect(&rt, addr).map_err(e("connect")))
            .collect();
        let servers = acceptor.join().expect("accepting thread");
        // A failed connect leaves the acceptor waiting for it: its error
        // is the cause, the acceptor's timeout only a consequence.
        let clients = clients?;
        Ok((clients, servers?))
    })?;
    drop(listener);
    let connect_s = t0.elapsed().as_secs_f64();
    let peak = rt.provider().stats();
    let bytes_per_conn = rss()?.saturating_sub(rss0) as f64 / conns as f64;
    let exchange = |s: &Stream, out: bool| -> Res<()> {
        let mut buf = [0u8; MSG];
        if out {
            let sent = s.send(&buf).map_err(e("send"))?;
            if sent != MSG {
                return Err(format!("conn_scale streams: sent {sent} of {MSG} bytes"));
            }
        } else {
            let mut got = 0;
            while got < MSG {
                match s.recv(&mut buf[got..]).map_err(e("recv"))? {
                    0 => return Err("conn_scale streams: end of stream".into()),
                    n => got += n,
                }
            }
        }
        Ok(())
    };
    let warm = conns.max(iters / 10);
    let total = warm + iters;
    let lat = std::thread::scope(|sc| -> Res<Lat> {
        let server = sc.spawn(|| -> Res<()> {
            crate::baseline::pin(Some(1));
            for i in 0..total {
                let s = &servers[i % conns];
                exchange(s, false)?;
                exchange(s, true)?;
            }
            Ok(())
        });
        crate::baseline::pin(Some(0));
        let mut samples = Vec::with_capacity(iters);
        for i in 0..total {
            let s = &clients[i % conns];
            let t = Instant::now();
            exchange(s, true)?;
            exchange(s, false)?;
            if i >= warm {
                samples.push(t.elapsed().as_nanos() as f64 / 2.0);
            }
        }
        server.join().expect("server thread")?;
        Ok(Lat::new(samples))
    })?;
    let t1 = Instant::now();
    for s in clients.into_iter().chain(servers) {
        s.abort();
    }
    let deadline = Instant::now() + STREAM_TIMEOUT;
    loop {
        let st = rt.provider().stats();
        if st.sockets == 0 && st.ops_in_use == 0 && st.sockets_closing == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "conn_scale streams: left after aborting all: {st:?}"
            ));
        }
        rt.provider().progress();
        std::thread::yield_now();
    }
    let close_s = t1.elapsed().as_secs_f64();
    Ok(Scale {
        api: "stream",
        conns,
        lat,
        bytes_per_conn,
        reg_bytes_per_conn: peak.registered_bytes as f64 / conns as f64,
        connect_s,
        close_s,
        peak: stats.then_some(peak),
    })
}

/// Runs every connection count of `conns` for each API of `apis` (both
/// when empty), prints a table and returns one JSON result per count and
/// API (`peer_dev`: see [`providers`]).
#[allow(clippy::too_many_arguments)]
pub fn suite(
    base: &Config,
    mode: Mode,
    peer_dev: Option<&str>,
    conns: &[usize],
    apis: &[Api],
    iters: Option<usize>,
    quick: bool,
    stats: bool,
) -> Res<Vec<Value>> {
    let mode_name = match mode {
        Mode::Rtc => "rtc",
        Mode::Threads => "threads",
    };
    let soft = base.fabric.kind == FabricKind::Soft;
    let dev = |d: &str| {
        if d.is_empty() {
            "the first device".to_string()
        } else {
            d.to_string()
        }
    };
    if soft {
        println!(
            "conn_scale: {MSG} B ping-pong, active connection round robin over N pairs in one \
             provider (spi_send: raw SPI sockets; stream: the reference switch's streams)"
        );
    } else {
        println!(
            "conn_scale: {MSG} B ping-pong, active connection round robin over N pairs of raw SPI \
             sockets (spi_send), accepted on {}, connected from {} (streams: soft fabric only)",
            dev(&base.fabric.verbs.device),
            dev(peer_dev.unwrap_or(&base.fabric.verbs.device))
        );
    }
    println!(
        "{:<8} {:>7} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "api",
        "conns",
        "t_typ ns",
        "p99 ns",
        "x N=1",
        "B/conn rss",
        "B/conn reg",
        "connect s",
        "close s"
    );
    let mut out = Vec::new();
    let mut first = std::collections::HashMap::new();
    for &n in conns {
        if n == 0 {
            return Err("conn_scale: --conns takes counts of at least 1".into());
        }
        let iters = iters.unwrap_or(if quick { 2_000 } else { 20_000 }).max(1);
        let wants = |a| apis.is_empty() || apis.contains(&a);
        let raw = wants(Api::SpiSend)
            .then(|| run(base, mode, peer_dev, n, iters, stats))
            .transpose()?;
        // A stream run that fails (a limit of the switch) still leaves the
        // raw figures of this count, and the next counts, to report.
        let streams = (soft && wants(Api::Stream))
            .then(|| {
                run_streams(base, mode, n, iters, stats)
                    .inspect_err(|e| println!("{:<8} {n:>7} failed: {e}", "stream"))
                    .ok()
            })
            .flatten();
        for s in raw.into_iter().chain(streams) {
            let median = s.lat.median_ns();
            let base_lat = *first.entry(s.api).or_insert(median);
            println!(
                "{:<8} {:>7} {:>10.0} {:>10.0} {:>10.2} {:>12.0} {:>12.0} {:>10.3} {:>10.3}",
                s.api,
                n,
                median,
                s.lat.p(99.0),
                median / base_lat,
                s.bytes_per_conn,
                s.reg_bytes_per_conn,
                s.connect_s,
                s.close_s
            );
            if let Some(p) = &s.peak {
                println!("         stats with all {n} pairs connected: {p:?}");
            }
            out.push(s.json(mode_name));
        }
    }
    Ok(out)
}
