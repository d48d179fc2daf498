//! conn_touch: what one message exchange touches when it goes to one of N
//! connections that were idle for N - 1 rounds, counted rather than timed.
//!
//! One thread drives both ends of N connected socket pairs in one soft
//! provider, in run-to-completion mode, through the public SPI only, with
//! the settings `sanbench conn_scale` uses (two CQs, a registered 64-byte
//! slice and one receive always pending per socket). A round is what a
//! ping-pong sample of `conn_scale` does on connection `k` (round robin):
//! the client sends 8 B, the server reaps it, posts its receive again and
//! answers, the client reaps the answer, posts its receive again and reaps
//! its send.
//!
//! After `--warmup` rounds (default N: every connection carried a message
//! once) it runs `--rounds` more inside `measure_rounds`, a function of its
//! own, for callgrind (`--toggle-collect=*measure_rounds*
//! --cache-sim=yes`): its first-level data misses per round are the lines a
//! round touches that were not touched since the connection's last round.
//! Then, unless `--no-pages`, it counts the pages a round touches (the TLB
//! entries it needs): clear the pages' referenced bits
//! (`/proc/self/clear_refs`), flush the TLB ([`flush_tlb`]), run one round,
//! read what is referenced (`/proc/self/smaps`), minus the 4 KiB pages the
//! reading alone references;
//! the median over `--page-samples` rounds, each on a connection idle since
//! the warm-up, and apart by kind of mapping (heap, anonymous, files,
//! other). Transparent huge pages are counted apart (per mapping that
//! holds any, its referenced bytes in 2 MiB pages). And the page faults
//! per measured round (`/proc/self/stat`'s minor faults over
//! `measure_rounds`): first touches of queue pages that traffic reaches
//! for the first time, each a fault (tens of microseconds in a VM).
//!
//! With `--streams`, the N pairs are the reference switch's streams
//! (`sanpath::switch`, default options, as `conn_scale`'s stream rows) and
//! a round is their ping-pong as `conn_scale` makes it: the client sends
//! 8 B, the server reads them and sends 8 B back, the client reads them
//! (blocking calls that never wait: each message is on its reader's
//! completion queue before the read); what a stream round costs beyond a
//! raw one is the difference of the two runs.
//!
//! Usage: `conn_touch [--conns N] [--rounds R] [--warmup W]
//! [--page-samples S] [--no-pages] [--streams]`. Prints one line of figures; exits 1
//! with the reason on any error.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::fabric::soft::SoftNetwork;
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream, SwitchOptions};
use sanpath::testkit::{self, CompletingSwitch};
use sanpath::Config;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

/// hEvent with bit 0 set: no upcall, the harness reaps.
const POLLED: usize = 1;
/// Each socket's slice of the shared buffer: send source at 0, receive
/// sink at `SLICE / 2` (as in `conn_scale`).
const SLICE: usize = 64;
/// Message size.
const MSG: u32 = 8;
/// Listening ports: connection `k` is set up through port `PORT0 + k`.
const PORT0: u16 = 20_000;

type Res<T> = Result<T, String>;

fn wsa(what: &'static str) -> impl Fn(sanpath::WsaError) -> String {
    move |e| format!("{what}: {e}")
}

/// One socket of a pair and its two records.
struct End {
    sock: ProviderSocket,
    rov: Overlapped,
    sov: Overlapped,
}

struct Pairs {
    p: Provider,
    buf: Region,
    /// `(client, server)` per connection.
    ends: Vec<(End, End)>,
}

impl Pairs {
    fn new(n: usize) -> Res<Pairs> {
        if n == 0 || n > usize::from(u16::MAX - PORT0) {
            return Err(format!(
                "--conns takes 1 to {}",
                usize::from(u16::MAX - PORT0)
            ));
        }
        let c = engine_config(n, 2);
        let ip = Ipv4Addr::new(198, 18, 254, 1);
        let (p, _nic, _net) = testkit::soft_provider(c, ip, Arc::new(CompletingSwitch))?;
        let buf = Region::new(2 * n * SLICE, MlockPolicy::Off).map_err(|e| e.to_string())?;
        let end = |sock| End {
            sock,
            rov: Overlapped::new(POLLED),
            sov: Overlapped::new(POLLED),
        };
        let mut ends = Vec::with_capacity(n);
        for k in 0..n {
            let addr = SocketAddrV4::new(ip, PORT0 + k as u16);
            let (c, s) = testkit::connected_pair(&p, addr).map_err(wsa("connect"))?;
            ends.push((end(c), end(s)));
        }
        let pairs = Pairs { p, buf, ends };
        for k in 0..n {
            for server in [false, true] {
                let e = pairs.end(k, server);
                // SAFETY: the slice lives in `pairs.buf`, which outlives the
                // sockets (`Drop` cleans the provider up first).
                unsafe {
                    pairs
                        .p
                        .register_memory(
                            e.sock,
                            pairs.slice(k, server),
                            SLICE as u32,
                            MEM_READWRITE,
                        )
                        .map_err(wsa("register"))?;
                }
                pairs.recv(k, server)?;
            }
        }
        Ok(pairs)
    }

    fn end(&self, k: usize, server: bool) -> &End {
        let (c, s) = &self.ends[k];
        if server {
            s
        } else {
            c
        }
    }

    fn slice(&self, k: usize, server: bool) -> *mut u8 {
        self.buf
            .as_ptr()
            .wrapping_add((2 * k + usize::from(server)) * SLICE)
    }

    fn recv(&self, k: usize, server: bool) -> Res<()> {
        let e = self.end(k, server);
        let b = [WsaBuf {
            len: MSG,
            buf: self.slice(k, server).wrapping_add(SLICE / 2),
        }];
        // SAFETY: a registered slice of `buf`; the record lives in `ends`,
        // which never moves while an op is pending.
        unsafe { self.p.recv(e.sock, &b, &e.rov) }.map_err(wsa("recv"))
    }

    fn send(&self, k: usize, server: bool) -> Res<()> {
        let e = self.end(k, server);
        let b = [WsaBuf {
            len: MSG,
            buf: self.slice(k, server),
        }];
        // SAFETY: as in `recv`.
        unsafe { self.p.send(e.sock, &b, 0, &e.sov) }.map_err(wsa("send"))
    }

    fn wait(&self, k: usize, server: bool, recv: bool) -> Res<()> {
        let e = self.end(k, server);
        let ov = if recv { &e.rov } else { &e.sov };
        match self.p.get_overlapped_result(e.sock, ov, true) {
            Ok((MSG, _)) => Ok(()),
            Ok((n, _)) => Err(format!("an op moved {n} bytes, not {MSG}")),
            Err(e) => Err(format!("an op failed: {e}")),
        }
    }

    /// One ping-pong on connection `k`, in the order a two-thread run
    /// makes it (the receiving end reaps first: its CQ's consumer moves the
    /// message).
    fn round(&self, k: usize) -> Res<()> {
        self.send(k, false)?;
        self.wait(k, true, true)?;
        self.recv(k, true)?;
        self.send(k, true)?;
        self.wait(k, false, true)?;
        self.recv(k, false)?;
        self.wait(k, false, false)?;
        self.wait(k, true, false)
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        let _ = self.p.cleanup();
    }
}

/// The engine settings of `n` pairs: run to completion on two CQs, room
/// for every socket and `ops_per_socket` ops in flight on each.
fn engine_config(n: usize, ops_per_socket: usize) -> Config {
    let mut c = Config::default();
    c.poller.mode = PollerMode::RunToCompletion;
    c.poller.count = 2;
    c.mem.mlock = MlockPolicy::Off;
    let sockets = 2 * n + 2;
    c.ops.max_sockets = c.ops.max_sockets.max(sockets);
    c.ops.slab_size = c.ops.slab_size.max(ops_per_socket * sockets);
    c
}

/// N connected pairs of the reference switch's streams in one provider.
struct StreamPairs {
    /// `(client, server)` per connection.
    pairs: Vec<(Stream, Stream)>,
    /// Keeps the provider up while the streams live.
    _rt: Arc<Runtime>,
}

impl StreamPairs {
    fn new(n: usize) -> Res<StreamPairs> {
        let e = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
        // Every blocking call bounded: a broken run fails, never hangs.
        let switch = SwitchOptions::bounded(Duration::from_secs(30));
        // An op slot per receive a stream keeps posted and per send in
        // flight (as `conn_scale` sizes it).
        let per_stream = usize::from(switch.recv_slots) + usize::from(switch.send_slots);
        let rc = RuntimeConfig {
            switch,
            engine: engine_config(n, per_stream),
        };
        let ip = Ipv4Addr::new(198, 18, 254, 2);
        let nic = SoftNetwork::new()
            .attach(rc.engine.soft_nic(vec![ip]))
            .map_err(|e| e.to_string())?;
        let rt = Runtime::with_nic(rc, nic).map_err(e("runtime"))?;
        let listener = Listener::bind(&rt, SocketAddrV4::new(ip, PORT0)).map_err(e("listen"))?;
        let addr = listener.local_addr();
        let (clients, servers) = std::thread::scope(|sc| {
            let acceptor = sc.spawn(|| -> Res<Vec<Stream>> {
                (0..n)
                    .map(|_| listener.accept().map(|(s, _)| s).map_err(e("accept")))
                    .collect()
            });
            let clients: Res<Vec<Stream>> = (0..n)
                .map(|_| Stream::connect(&rt, addr).map_err(e("connect")))
                .collect();
            (clients, acceptor.join().expect("accepting thread"))
        });
        // A failed connect leaves the acceptor waiting for it: its error
        // is the cause.
        let clients = clients?;
        Ok(StreamPairs {
            pairs: clients.into_iter().zip(servers?).collect(),
            _rt: rt,
        })
    }

    /// One ping-pong on connection `k`, as `conn_scale` makes it.
    fn round(&self, k: usize) -> Res<()> {
        let (c, s) = &self.pairs[k];
        let mut buf = [0u8; MSG as usize];
        for (from, to) in [(c, s), (s, c)] {
            let sent = from.send(&buf).map_err(|e| format!("send: {e}"))?;
            if sent != buf.len() {
                return Err(format!("sent {sent} of {MSG} bytes"));
            }
            let mut got = 0;
            while got < buf.len() {
                match to.recv(&mut buf[got..]).map_err(|e| format!("recv: {e}"))? {
                    0 => return Err("end of stream".into()),
                    n => got += n,
                }
            }
        }
        Ok(())
    }
}

/// The connections whose rounds are counted.
enum Conns {
    Raw(Pairs),
    Streams(StreamPairs),
}

impl Conns {
    fn len(&self) -> usize {
        match self {
            Conns::Raw(p) => p.ends.len(),
            Conns::Streams(s) => s.pairs.len(),
        }
    }

    fn round(&self, k: usize) -> Res<()> {
        match self {
            Conns::Raw(p) => p.round(k),
            Conns::Streams(s) => s.round(k),
        }
    }
}

/// The measured rounds, never inlined, so that callgrind's
/// `--toggle-collect=*measure_rounds*` finds them by name.
#[inline(never)]
fn measure_rounds(pairs: &Conns, from: usize, rounds: usize) -> Res<()> {
    let n = pairs.len();
    (from..from + rounds).try_for_each(|i| pairs.round(i % n))
}

/// What a mapping is, by its `/proc/self/smaps` header: the `[heap]`
/// (small allocations), an anonymous mapping (large allocations, the soft
/// fabric's queues and rings, the SPI's tables), a file (code, data of the
/// binary and its libraries), anything else (`[stack]`, `[vdso]`).
const KINDS: [&str; 4] = ["heap", "anonymous", "files", "other"];

fn kind_of(header: &str) -> usize {
    match header.split_whitespace().nth(5) {
        Some("[heap]") => 0,
        None => 1,
        Some(p) if p.starts_with('/') => 2,
        Some(_) => 3,
    }
}

/// Pages of this process referenced while `f` ran: 4 KiB pages by
/// [`KINDS`] of mapping, and 2 MiB transparent huge pages (a mapping
/// holding any huge page counts its referenced bytes as huge ones).
/// `buf`: the reading's buffer.
fn referenced_over(buf: &mut String, f: impl FnOnce() -> Res<()>) -> Res<([u64; 4], u64)> {
    std::fs::write("/proc/self/clear_refs", "1").map_err(|e| format!("clear_refs: {e}"))?;
    flush_tlb()?;
    f()?;
    buf.clear();
    let mut file = std::fs::File::open("/proc/self/smaps").map_err(|e| format!("smaps: {e}"))?;
    std::io::Read::read_to_string(&mut file, buf).map_err(|e| format!("smaps: {e}"))?;
    let kib = |l: &str, key: &str| {
        l.strip_prefix(key)
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // Each mapping's block starts with its header (the address range in
    // lower-case hex), and lists `Referenced:` before `AnonHugePages:`.
    let (mut small, mut huge, mut referenced, mut kind) = ([0; 4], 0, 0, 0);
    for l in buf.lines() {
        if l.starts_with(|c: char| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
            kind = kind_of(l);
        } else if let Some(r) = kib(l, "Referenced:") {
            referenced = r;
        } else if let Some(h) = kib(l, "AnonHugePages:") {
            if h > 0 {
                huge += referenced.div_ceil(2048);
            } else {
                small[kind] += referenced / 4;
            }
        }
    }
    Ok((small, huge))
}

/// Flushes this thread's CPU's TLB entries of the process. A page's
/// referenced bit is set by a page walk only, and `clear_refs` need not
/// flush the TLB (Linux 6.18 here does not): a page whose translation is
/// still cached is used without a walk and looks untouched. (Without this,
/// a round on one of 1 to 10 connections referenced no page at all; at
/// 100, 18 of its 35.) Unmapping more pages than x86 Linux invalidates
/// one by one (`tlb_single_page_flush_ceiling`, 33) flushes the whole
/// address space's entries instead; each page is written first, so that
/// all are mapped when they go.
fn flush_tlb() -> Res<()> {
    const PAGES: usize = 64;
    let mut map =
        memmap2::MmapMut::map_anon(PAGES * 4096).map_err(|e| format!("TLB flush: {e}"))?;
    map.iter_mut().step_by(4096).for_each(|b| *b = 1);
    drop(map);
    Ok(())
}

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
fn minor_faults() -> Res<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("stat: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields after its closing one (state is field 3).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "/proc/self/stat: no minor fault count".into())
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

struct Args {
    conns: usize,
    rounds: usize,
    warmup: Option<usize>,
    page_samples: usize,
    pages: bool,
    streams: bool,
}

fn parse() -> Res<Args> {
    let usage = || {
        "usage: conn_touch [--conns N] [--rounds R] [--warmup W] [--page-samples S] [--no-pages] \
         [--streams]"
            .to_string()
    };
    let mut a = Args {
        conns: 10_000,
        rounds: 2_000,
        warmup: None,
        page_samples: 51,
        pages: true,
        streams: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-pages" {
            a.pages = false;
            continue;
        }
        if flag == "--streams" {
            a.streams = true;
            continue;
        }
        let n = it
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(usage)?;
        match flag.as_str() {
            "--conns" => a.conns = n,
            "--rounds" => a.rounds = n,
            "--warmup" => a.warmup = Some(n),
            "--page-samples" => a.page_samples = n.max(1),
            _ => return Err(usage()),
        }
    }
    Ok(a)
}

fn run() -> Res<()> {
    let a = parse()?;
    let pairs = if a.streams {
        if a.conns == 0 {
            return Err("--conns takes at least 1".into());
        }
        Conns::Streams(StreamPairs::new(a.conns)?)
    } else {
        Conns::Raw(Pairs::new(a.conns)?)
    };
    let n = a.conns;
    let warm = a.warmup.unwrap_or(n);
    for i in 0..warm {
        pairs.round(i % n)?;
    }
    let faults0 = minor_faults()?;
    measure_rounds(&pairs, warm, a.rounds)?;
    let faults = minor_faults()? - faults0;
    let api = if a.streams { "streams" } else { "raw" };
    let mut line = format!(
        "conn_touch: {api} conns {n} rounds {} warmup {warm}",
        a.rounds
    );
    if a.pages {
        // Under valgrind (`--no-pages`) the faults are the tool's too.
        line += &format!(
            " faults_per_round {:.3}",
            faults as f64 / a.rounds.max(1) as f64
        );
        let mut buf = String::with_capacity(1 << 20);
        let mut small: [Vec<u64>; 4] = Default::default();
        let mut reading: [Vec<u64>; 4] = Default::default();
        let mut huge = Vec::with_capacity(a.page_samples);
        for next in (warm + a.rounds..).take(a.page_samples) {
            let (r, _) = referenced_over(&mut buf, || Ok(()))?;
            let (s, h) = referenced_over(&mut buf, || pairs.round(next % n))?;
            for k in 0..KINDS.len() {
                reading[k].push(r[k]);
                small[k].push(s[k]);
            }
            huge.push(h);
        }
        let total = |v: &[Vec<u64>; 4]| {
            let sums = (0..v[0].len())
                .map(|i| v.iter().map(|k| k[i]).sum())
                .collect();
            median(sums)
        };
        let (s, r, h) = (total(&small), total(&reading), median(huge));
        line += &format!(
            " pages_per_round {} huge_pages_per_round {h} (4 KiB pages referenced {s}, by the \
             reading alone {r}; by mapping, the round's median minus the reading's:",
            s.saturating_sub(r)
        );
        for (k, name) in KINDS.iter().enumerate() {
            let (s, r) = (median(small[k].clone()), median(reading[k].clone()));
            line += &format!(" {name} {}", s.saturating_sub(r));
        }
        line += ")";
    }
    println!("{line}");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("conn_touch: {e}");
        std::process::exit(1);
    }
}
