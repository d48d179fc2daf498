//! Two-process runs, perftest style: `sanbench --server` serves the tests a
//! `sanbench HOST` client asks for. Test parameters go over a TCP control
//! connection; the data over the chosen fabric, between two providers (one
//! per process); the client measures.
//!
//! # Control protocol, version [`VERSION`]
//! Lines of UTF-8 text, each at most [`MAX_LINE`] bytes. The client opens
//! with `sanbench-control <version>`; the server answers
//! `sanbench-control <version> ok`, or `error: <why>` and closes (another
//! version, or not a sanbench client at all). Then JSON objects, one a line,
//! the client asking (`op`) and the server answering `{"ok": true, ...}` or
//! `{"ok": false, "error": "..."}` (after which it closes):
//! - `{"op":"setup","fabric":F,"pid":P}`: the server starts a provider on
//!   fabric F (which must be its own; the soft fabric only when P, the
//!   client's process id, is the server's) and listens on its NIC; answers
//!   `{"addr":"IP:PORT"}`, then accepts the client's data connection
//!   (within [`ACCEPT_TIMEOUT`]).
//! - `{"op":"peer","desc":HEX}`: the client's exposed-buffer descriptor;
//!   answered with the server's (`"desc":HEX`). Both sides can then RDMA.
//! - `{"op":"stream"}`: as setup, for a pair of the reference switch's
//!   streams (`"addr"`).
//! - `{"op":"run","test":T,"size":S,"count":N}`: the server prepares its
//!   half (posts its receives) and answers `{"ready":true}`, runs its half,
//!   then answers `{"done":true}` (one-sided tests: at once).
//! - `{"op":"bye"}`: answered, then the session ends.
//!
//! A silent client is dropped after [`HELLO_TIMEOUT`] before the greeting and
//! [`IDLE_TIMEOUT`] between requests; no input makes the server panic.

use crate::baseline::Cores;
use crate::engine::{self, Side};
use crate::stats::{Bw, Lat};
use crate::stream;
use crate::{name, Test};
use sanpath::config::FabricKind;
use sanpath::event::Event;
use sanpath::spi::{
    Condition, Provider, ProviderSocket, AF_INET, FD_ACCEPT, FD_CONNECT, FD_CONNECT_BIT,
    IPPROTO_TCP, SOCK_STREAM, WSA_FLAG_OVERLAPPED,
};
use sanpath::switch::{Listener, Runtime, Stream};
use sanpath::Config;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The control protocol's version; a peer speaking another is refused.
pub const VERSION: u32 = 1;
/// The greeting's first word.
const GREETING: &str = "sanbench-control";
/// Longest control line (a JSON request is a few hundred bytes).
pub const MAX_LINE: usize = 4096;
/// perftest's default port.
pub const DEFAULT_PORT: u16 = 18515;
/// How long a server waits for a new client's greeting.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the other's next control line (a test
/// runs between a request and its answer).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a client whose half of a test failed waits for the server's
/// reason.
const FAILED_PEER_WAIT: Duration = Duration::from_secs(5);
/// How long the server waits for the data connection it announced.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A NIC address for a provider of a soft-network fabric (the soft one's
/// process-wide network, which joins a server and a client that run as
/// threads of one process, as the tests do; or a host-wide one, whose
/// processes each own their addresses): servers take 198.18.251.1-127,
/// clients .128-254, spread by process and distinct within one.
fn next_soft_ip(server: bool) -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed)) % 127;
    Ipv4Addr::new(198, 18, 251, if server { 1 } else { 128 } + n as u8)
}

/// The fabric's name as the config spells it (`soft`, `verbs`, ...).
pub fn fabric_name(kind: FabricKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{kind:?}"))
}

/// One side's engine config: the process's, with a soft NIC address of its
/// own.
fn side_config(config: &Config, server: bool) -> Config {
    let mut c = config.clone();
    c.fabric.soft.addresses = vec![next_soft_ip(server)];
    c
}

/// A control connection: line reads bounded in length and time.
struct Control {
    r: BufReader<TcpStream>,
    w: TcpStream,
    peer: String,
}

impl Control {
    fn new(s: TcpStream) -> io::Result<Control> {
        let peer = s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
        Ok(Control {
            w: s.try_clone()?,
            r: BufReader::new(s),
            peer,
        })
    }

    /// The next line, without its newline; `what` names it in errors.
    fn line(&mut self, timeout: Duration, what: &str) -> Result<String, String> {
        self.r
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("control connection: {e}"))?;
        let mut buf = Vec::new();
        let n = Read::take(&mut self.r, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                    "no {what} from {} within {} s",
                    self.peer,
                    timeout.as_secs()
                ),
                io::ErrorKind::ConnectionReset => format!(
                    "{} closed the control connection (waiting for {what})",
                    self.peer
                ),
                _ => format!("control connection to {}: {e}", self.peer),
            })?;
        if n == 0 {
            return Err(format!(
                "{} closed the control connection (waiting for {what})",
                self.peer
            ));
        }
        if buf.last() != Some(&b'\n') {
            return Err(if n > MAX_LINE {
                format!(
                    "{what} from {}: a line longer than {MAX_LINE} bytes",
                    self.peer
                )
            } else {
                format!("{} closed the control connection mid-line", self.peer)
            });
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        String::from_utf8(buf).map_err(|_| format!("{what} from {}: not UTF-8 text", self.peer))
    }

    /// Runs `progress` until the peer's next line starts to arrive (or the
    /// connection ends, or `timeout` passes: the read that follows reports
    /// either), for a side whose fabric needs it to make progress while it
    /// waits (see `engine::Side::make_target_progress`).
    fn wait_making_progress(&mut self, timeout: Duration, mut progress: impl FnMut()) {
        if !self.r.buffer().is_empty() {
            return;
        }
        let s = self.r.get_ref();
        if s.set_nonblocking(true).is_err() {
            return;
        }
        let until = Instant::now() + timeout;
        let mut byte = [0u8; 1];
        while Instant::now() < until {
            match s.peek(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    progress();
                    std::thread::yield_now();
                }
                _ => break,
            }
        }
        let _ = s.set_nonblocking(false);
    }

    fn send_line(&mut self, line: &str) -> Result<(), String> {
        self.w
            .set_write_timeout(Some(IDLE_TIMEOUT))
            .and_then(|_| self.w.write_all(format!("{line}\n").as_bytes()))
            .map_err(|e| format!("control connection to {}: {e}", self.peer))
    }

    fn send(&mut self, v: Value) -> Result<(), String> {
        self.send_line(&v.to_string())
    }

    /// The next JSON object.
    fn recv(&mut self, timeout: Duration, what: &str) -> Result<Value, String> {
        let line = self.line(timeout, what)?;
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(format!(
                "{what} from {}: not a JSON object: {}",
                self.peer,
                clip(&line)
            )),
        }
    }

    /// The server's next answer: its fields when `ok`, else its error.
    fn answer(&mut self, timeout: Duration, what: &str) -> Result<Value, String> {
        let v = self.recv(timeout, what)?;
        match v["ok"].as_bool() {
            Some(true) => Ok(v),
            _ => Err(format!(
                "the server: {}",
                v["error"].as_str().unwrap_or("a malformed answer")
            )),
        }
    }
}

/// A line shortened for an error message.
fn clip(s: &str) -> String {
    let mut c: String = s.chars().take(60).collect();
    if c.len() < s.len() {
        c.push_str("...");
    }
    format!("{c:?}")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 || s.len() > 2 * MAX_LINE {
        return Err("a malformed descriptor".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a malformed descriptor".to_string())
        })
        .collect()
}

/// The server's settings.
pub struct ServerOpts {
    /// The engine config (the benchmark's settings applied); its fabric is
    /// the one clients must ask for.
    pub config: Config,
    /// The core the serving thread runs on.
    pub core: Option<usize>,
    /// How long to wait for a new client's greeting.
    pub hello_timeout: Duration,
}

/// Fails at once, with the engine's reason, when a provider on the
/// server's fabric cannot start (no such device, no `verbs` feature):
/// not only when the first client comes.
pub fn check_fabric(config: &Config) -> Result<(), String> {
    let p = engine::provider(side_config(config, true), false)?;
    drop(Data { p, side: None });
    Ok(())
}

/// Serves clients on `listener`: one session, or (`persistent`) every
/// session until an accept fails. A connection that fails the greeting is
/// refused and does not count as a session.
pub fn serve(listener: &TcpListener, opts: &ServerOpts, persistent: bool) -> Result<(), String> {
    loop {
        let (s, from) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        match session(s, opts) {
            Err(Refused(e)) => eprintln!("sanbench server: refused {from}: {e}"),
            Ok(Ok(())) => {
                println!("sanbench server: session with {from} done");
                if !persistent {
                    return Ok(());
                }
            }
            Ok(Err(e)) => {
                if !persistent {
                    return Err(format!("session with {from}: {e}"));
                }
                eprintln!("sanbench server: session with {from}: {e}");
            }
        }
    }
}

/// A connection that did not pass the greeting.
pub struct Refused(pub String);

/// One client: the greeting, then its requests until `bye`. The outer
/// error: refused at the greeting; the inner: the session failed.
pub fn session(s: TcpStream, opts: &ServerOpts) -> Result<Result<(), String>, Refused> {
    let mut ctl = Control::new(s).map_err(|e| Refused(e.to_string()))?;
    let hello = ctl.line(opts.hello_timeout, "greeting").map_err(Refused)?;
    if let Err(e) = check_greeting(&hello) {
        let _ = ctl.send_line(&format!("error: {e}"));
        return Err(Refused(e));
    }
    ctl.send_line(&format!("{GREETING} {VERSION} ok"))
        .map_err(Refused)?;
    let mut srv = Served {
        opts,
        data: None,
        streams: None,
    };
    let r = srv.requests(&mut ctl);
    if let Err(e) = &r {
        let _ = ctl.send(json!({"ok": false, "error": e}));
    }
    Ok(r)
}

/// Checks a client's greeting line.
fn check_greeting(line: &str) -> Result<(), String> {
    let mut words = line.split(' ');
    if words.next() != Some(GREETING) {
        return Err(format!(
            "not a sanbench client (it sent {}; expected \"{GREETING} {VERSION}\")",
            clip(line)
        ));
    }
    match words.next().map(str::parse::<u32>) {
        Some(Ok(VERSION)) if words.next().is_none() => Ok(()),
        Some(Ok(v)) => Err(format!(
            "control protocol version {v} is not supported: this server speaks version \
             {VERSION} (run the same sanbench version on both sides)"
        )),
        _ => Err(format!("a malformed greeting {}", clip(line))),
    }
}

/// A provider and its connected side (on the server: for one session).
struct Data {
    p: Arc<Provider>,
    side: Option<Side>,
}

impl Drop for Data {
    fn drop(&mut self) {
        // Closes the socket (aborting any posted receive) before the side's
        // regions are unmapped.
        let _ = self.p.cleanup();
    }
}

/// A session's state on the server.
struct Served<'a> {
    opts: &'a ServerOpts,
    data: Option<Data>,
    streams: Option<(Arc<Runtime>, Stream)>,
}

impl Served<'_> {
    fn requests(&mut self, ctl: &mut Control) -> Result<(), String> {
        loop {
            // A one-sided test of the client's runs while we wait here.
            if let Some(side) = self.data.as_ref().and_then(|d| d.side.as_ref()) {
                if side.needs_target_progress() {
                    ctl.wait_making_progress(IDLE_TIMEOUT, || side.make_target_progress());
                }
            }
            let req = ctl.recv(IDLE_TIMEOUT, "request")?;
            match req["op"].as_str() {
                Some("setup") => self.setup(ctl, &req)?,
                Some("peer") => {
                    let desc = unhex(req["desc"].as_str().unwrap_or(""))?;
                    let side = self.side_mut()?;
                    side.set_peer(desc);
                    let mine = hex(side.desc());
                    ctl.send(json!({"ok": true, "desc": mine}))?;
                }
                Some("stream") => self.stream(ctl)?,
                Some("run") => self.run(ctl, &req)?,
                Some("bye") => return ctl.send(json!({"ok": true})),
                _ => return Err(format!("an unknown request {}", clip(&req.to_string()))),
            }
        }
    }

    fn side_mut(&mut self) -> Result<&mut Side, String> {
        self.data
            .as_mut()
            .and_then(|d| d.side.as_mut())
            .ok_or_else(|| "no data connection yet (setup first)".into())
    }

    /// The address to listen on: the NIC address the client reached us at
    /// when it is one (two-host runs), else the NIC's first.
    fn listen_ip(p: &Provider, ctl: &Control) -> Result<Ipv4Addr, String> {
        let mine = p.address_list().map_err(|e| e.to_string())?;
        match ctl.w.local_addr() {
            Ok(SocketAddr::V4(a)) if mine.contains(a.ip()) => Ok(*a.ip()),
            _ => engine::address(p),
        }
    }

    fn setup(&mut self, ctl: &mut Control, req: &Value) -> Result<(), String> {
        let fabric = fabric_name(self.opts.config.fabric.kind);
        if req["fabric"].as_str() != Some(fabric.as_str()) {
            return Err(format!(
                "the client asks for fabric {}; this server runs --fabric {fabric}",
                req["fabric"]
            ));
        }
        if self.data.is_some() {
            return Err("setup twice in one session".into());
        }
        let me = u64::from(std::process::id());
        if self.opts.config.fabric.kind == FabricKind::Soft && req["pid"].as_u64() != Some(me) {
            return Err(
                "--fabric soft connects only the providers of one process, and this server \
                 is another process than the client (use --fabric verbs across processes)"
                    .into(),
            );
        }
        let p = engine::provider(side_config(&self.opts.config, true), false)?;
        let data = self.data.insert(Data { p, side: None });
        let p = data.p.clone();
        let ip = Self::listen_ip(&p, ctl)?;
        let e = |what: &'static str| {
            move |e: sanpath::WsaError| format!("data connection: {what}: {e}")
        };
        let l = p
            .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
            .map_err(e("socket"))?;
        p.bind(l, SocketAddrV4::new(ip, 0)).map_err(e("bind"))?;
        p.listen(l, 1).map_err(e("listen"))?;
        let ev = Arc::new(Event::new());
        p.event_select(l, Some(ev.clone()), FD_ACCEPT)
            .map_err(e("event_select"))?;
        let addr = p
            .local_addr(l)
            .map_err(e("local address"))?
            .ok_or("data connection: the listener has no address")?;
        ctl.send(json!({"ok": true, "addr": addr.to_string()}))?;
        if !ev.wait(ACCEPT_TIMEOUT) {
            return Err(format!(
                "data connection: the client did not connect to {addr} within {} s",
                ACCEPT_TIMEOUT.as_secs()
            ));
        }
        let (s, _): (ProviderSocket, _) = p
            .accept(l, &mut |_| Condition::Accept)
            .map_err(e("accept"))?;
        let _ = p.close_socket(l);
        let yielding = self.opts.config.poller.mode == sanpath::config::PollerMode::Threads;
        data.side = Some(Side::new(p, s, self.opts.core, yielding)?);
        Ok(())
    }

    fn stream(&mut self, ctl: &mut Control) -> Result<(), String> {
        if self.streams.is_some() {
            return Err("a second stream pair in one session".into());
        }
        let rt = stream::runtime(side_config(&self.opts.config, true), false)?;
        let ip = Self::listen_ip(rt.provider(), ctl)?;
        let l = Listener::bind(&rt, SocketAddrV4::new(ip, 0))
            .map_err(|e| format!("stream listener: {e}"))?;
        ctl.send(json!({"ok": true, "addr": l.local_addr().to_string()}))?;
        let (s, _) = l
            .accept_timeout(Some(ACCEPT_TIMEOUT))
            .map_err(|e| format!("stream accept: {e}"))?;
        self.streams = Some((rt, s));
        Ok(())
    }

    fn run(&mut self, ctl: &mut Control, req: &Value) -> Result<(), String> {
        let t = req["test"]
            .as_str()
            .and_then(parse_test)
            .ok_or_else(|| format!("an unknown test {}", req["test"]))?;
        let size = req["size"]
            .as_u64()
            .filter(|s| *s as usize <= engine::MAX)
            .ok_or_else(|| format!("size {} is not 0..={}", req["size"], engine::MAX))?
            as usize;
        let count = req["count"]
            .as_u64()
            .filter(|n| *n <= 1 << 32)
            .ok_or_else(|| format!("count {} is not 0..=2^32", req["count"]))?
            as usize;
        let core = self.opts.core;
        // `ready` tells the client the half is prepared; its error (the
        // control connection broke) ends the run right after.
        let mut ready_err = Ok(());
        let mut ready = || ready_err = ctl.send(json!({"ok": true, "ready": true}));
        let r = if crate::is_stream(t) {
            let (_, s) = self
                .streams
                .as_ref()
                .ok_or("no stream pair yet (stream first)")?;
            ready();
            match t {
                Test::StreamLat => stream::serve_lat(s, core, size, count),
                _ => stream::serve_bw(s, core, size, count),
            }
            .map_err(|e| e.to_string())
        } else {
            let side = self
                .data
                .as_ref()
                .and_then(|d| d.side.as_ref())
                .ok_or("no data connection yet (setup first)")?;
            match t {
                Test::SendLat => side.serve_send_lat(size, count, ready),
                Test::WriteLat => {
                    side.clear_mark(size);
                    side.serve_write_lat(size, count, ready)
                }
                Test::SendBw => side.serve_send_bw(size, count, ready),
                // One-sided: the client's RDMA needs nothing of this side.
                _ => {
                    ready();
                    Ok(())
                }
            }
            .map_err(|e| e.to_string())
        };
        ready_err?;
        r.map_err(|e| format!("{} {size} B: {e}", name(t)))?;
        ctl.send(json!({"ok": true, "done": true}))
    }
}

/// A test by its name.
fn parse_test(s: &str) -> Option<Test> {
    use clap::ValueEnum;
    Test::from_str(s, false).ok()
}

/// The client: its control connection to the server, its provider and
/// connected side, and (after the first stream test) its stream.
pub struct Client {
    ctl: Mutex<Control>,
    data: Data,
    stream: Option<(Arc<Runtime>, Stream)>,
    config: Config,
    core: Option<usize>,
}

impl Client {
    /// Connects to the server at `host:port`, greets it and sets up the
    /// data connection over `config`'s fabric.
    pub fn connect(host: &str, port: u16, config: &Config, cores: Cores) -> Result<Client, String> {
        let at = format!("{host}:{port}");
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{at}: {e}"))?
            .collect();
        let s = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, ACCEPT_TIMEOUT).ok())
            .ok_or_else(|| {
                format!("{at}: cannot connect (is `sanbench --server -p {port}` running there?)")
            })?;
        let _ = s.set_nodelay(true);
        let mut ctl = Control::new(s).map_err(|e| format!("{at}: {e}"))?;
        ctl.send_line(&format!("{GREETING} {VERSION}"))?;
        let hello = ctl.line(HELLO_TIMEOUT, "greeting")?;
        if hello != format!("{GREETING} {VERSION} ok") {
            return Err(match hello.strip_prefix("error: ") {
                Some(e) => format!("{at} refused: {e}"),
                None => format!(
                    "{at} is not a sanbench server of control protocol version {VERSION} \
                     (it answered {})",
                    clip(&hello)
                ),
            });
        }
        let fabric = fabric_name(config.fabric.kind);
        ctl.send(json!({"op": "setup", "fabric": fabric, "pid": std::process::id()}))?;
        let a = ctl.answer(IDLE_TIMEOUT, "setup answer")?;
        let addr: SocketAddrV4 = a["addr"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("the server: a malformed data address")?;
        let p = engine::provider(side_config(config, false), false)?;
        let mut data = Data { p, side: None };
        let p = data.p.clone();
        let e = |what: &'static str| {
            move |e: sanpath::WsaError| format!("data connection to {addr}: {what}: {e}")
        };
        let s = p
            .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
            .map_err(e("socket"))?;
        let ev = Arc::new(Event::new());
        p.event_select(s, Some(ev.clone()), FD_CONNECT)
            .map_err(e("event_select"))?;
        p.connect(s, addr, &[]).map_err(e("connect"))?;
        if !ev.wait(ACCEPT_TIMEOUT) {
            return Err(format!(
                "data connection to {addr}: not connected within {} s",
                ACCEPT_TIMEOUT.as_secs()
            ));
        }
        let got = p
            .enum_network_events(s, Some(&ev))
            .map_err(e("enum_network_events"))?;
        match got.error_codes[FD_CONNECT_BIT] {
            0 => {}
            code => return Err(format!("data connection to {addr}: error {code}")),
        }
        p.event_select(s, None, 0).map_err(e("event_select"))?;
        let core = cores.map(|c| c.0);
        let yielding = config.poller.mode == sanpath::config::PollerMode::Threads;
        let side = data.side.insert(Side::new(p, s, core, yielding)?);
        ctl.send(json!({"op": "peer", "desc": hex(side.desc())}))?;
        let a = ctl.answer(IDLE_TIMEOUT, "peer answer")?;
        side.set_peer(unhex(a["desc"].as_str().unwrap_or(""))?);
        Ok(Client {
            ctl: Mutex::new(ctl),
            data,
            stream: None,
            config: config.clone(),
            core,
        })
    }

    fn side(&self) -> &Side {
        self.data
            .side
            .as_ref()
            .expect("connected in Client::connect")
    }

    fn ctl(&self) -> std::sync::MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects a stream to one of the server's (before the first stream
    /// test; once).
    pub fn open_stream(&mut self) -> Result<(), String> {
        if self.stream.is_some() {
            return Ok(());
        }
        let rt = stream::runtime(side_config(&self.config, false), false)?;
        let mut ctl = self.ctl();
        ctl.send(json!({"op": "stream"}))?;
        let a = ctl.answer(IDLE_TIMEOUT, "stream answer")?;
        drop(ctl);
        let addr: SocketAddrV4 = a["addr"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("the server: a malformed stream address")?;
        let s = Stream::connect(&rt, addr).map_err(|e| format!("stream to {addr}: {e}"))?;
        self.stream = Some((rt, s));
        Ok(())
    }

    fn stream(&self) -> Result<&Stream, String> {
        self.stream
            .as_ref()
            .map(|(_, s)| s)
            .ok_or_else(|| "no stream connected (open_stream first)".into())
    }

    /// The stream's copy/RDMA threshold and how a `size`-byte send moves
    /// (once a stream test ran).
    pub fn stream_path(&self, size: usize) -> Option<(usize, &'static str)> {
        let (_, s) = self.stream.as_ref()?;
        Some((s.rdma_threshold(), stream::path(s, size)))
    }

    /// Asks the server to run its half of `t`; `f` runs ours once it is
    /// ready; then waits for the server's end.
    fn run<T>(
        &self,
        t: Test,
        size: usize,
        count: usize,
        f: impl FnOnce(&Self) -> Result<T, String>,
    ) -> Result<T, String> {
        if t == Test::WriteLat {
            self.side().clear_mark(size);
        }
        {
            let mut ctl = self.ctl();
            ctl.send(json!({"op": "run", "test": name(t), "size": size, "count": count}))?;
            ctl.answer(IDLE_TIMEOUT, "ready")?;
        }
        let v = match f(self) {
            Ok(v) => v,
            // Our half failed: either the server's failed first (it says
            // why at once), or it is still waiting for us (it fails once
            // this client drops the connection): do not wait long.
            Err(e) => {
                return Err(
                    match self.ctl().answer(FAILED_PEER_WAIT, "end of the test") {
                        Err(s) if s.starts_with("the server: ") => format!("{e} ({s})"),
                        _ => e,
                    },
                )
            }
        };
        self.ctl().answer(IDLE_TIMEOUT, "end of the test")?;
        Ok(v)
    }

    /// A latency test of `count` samples.
    pub fn lat(&self, t: Test, size: usize, count: usize) -> Result<Lat, String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let core = self.core;
        self.run(t, size, count, |c| match t {
            Test::SendLat => c.side().send_lat(size, count).map_err(|x| e(&x)),
            Test::WriteLat => c.side().write_lat(size, count).map_err(|x| e(&x)),
            Test::ReadLat => c.side().read_lat(size, count).map_err(|x| e(&x)),
            _ => stream::lat(c.stream()?, core, size, count).map_err(|x| e(&x)),
        })
    }

    /// A bandwidth test of `count` messages.
    pub fn bw(&self, t: Test, size: usize, count: usize) -> Result<Bw, String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let core = self.core;
        self.run(t, size, count, |c| match t {
            Test::SendBw => {
                crate::baseline::pin(core);
                let t0 = std::time::Instant::now();
                c.side().send_window(size, count).map_err(|x| e(&x))?;
                Ok(Bw {
                    bytes: (size * count) as u64,
                    msgs: count as u64,
                    secs: t0.elapsed().as_secs_f64(),
                })
            }
            Test::WriteBw => c.side().rdma_bw(size, count, true).map_err(|x| e(&x)),
            Test::ReadBw => c.side().rdma_bw(size, count, false).map_err(|x| e(&x)),
            _ => stream::bw(c.stream()?, core, size, count).map_err(|x| e(&x)),
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The server ends the session (a failed send: it is gone already).
        let ctl = self.ctl.get_mut().unwrap_or_else(PoisonError::into_inner);
        if ctl.send(json!({"op": "bye"})).is_ok() {
            let _ = ctl.answer(HELLO_TIMEOUT, "goodbye");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// Every wait in these tests ends within this, or the test fails.
    const BOUND: Duration = Duration::from_secs(60);

    fn config() -> Config {
        let mut c = Config::default();
        // Threads mode: waits park, memory polls yield; nothing here needs
        // a spinning thread to get a core.
        engine::tune(&mut c, crate::Mode::Threads);
        c
    }

    /// A server on an ephemeral control port, in a thread: its port and
    /// the channel its result arrives on.
    fn server(hello_timeout: Duration) -> (u16, mpsc::Receiver<Result<(), String>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a control port");
        let port = l.local_addr().expect("its address").port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let opts = ServerOpts {
                config: config(),
                core: None,
                hello_timeout,
            };
            let _ = tx.send(serve(&l, &opts, false));
        });
        (port, rx)
    }

    /// Runs `f` in a thread and fails the test if it takes longer than
    /// `BOUND` (a data-path wait has no timeout of its own: a server that
    /// did not serve its half would block the client forever).
    fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(BOUND)
            .expect("the client finished within its bound")
    }

    fn ended(rx: &mpsc::Receiver<Result<(), String>>) -> Result<(), String> {
        rx.recv_timeout(BOUND)
            .expect("the server thread ended within its bound")
    }

    /// Speaks raw lines to the control port; returns the server's first
    /// answer line (empty when it closed without one).
    fn raw(port: u16, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(BOUND)).expect("timeout");
        s.write_all(bytes).expect("write");
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .expect("an answer or a close, in time");
        line
    }

    /// Every test runs with its server half in another thread (another
    /// provider on the soft fabric's process-wide network) and gives
    /// figures of the requested size and count.
    #[test]
    fn two_sides_run_every_test_over_the_soft_fabric() {
        let (port, rx) = server(HELLO_TIMEOUT);
        bounded(move || every_test(port));
        ended(&rx).expect("the server's session ended well");
    }

    fn every_test(port: u16) {
        let mut c = Client::connect("127.0.0.1", port, &config(), None).expect("client");
        for t in [Test::SendLat, Test::WriteLat, Test::ReadLat] {
            for size in [8, 4096] {
                let lat = c
                    .lat(t, size, 50)
                    .unwrap_or_else(|e| panic!("{}: {e}", name(t)));
                assert_eq!(lat.count(), 50, "{} {size}", name(t));
            }
        }
        for t in [Test::SendBw, Test::WriteBw, Test::ReadBw] {
            let bw = c
                .bw(t, 65536, 200)
                .unwrap_or_else(|e| panic!("{}: {e}", name(t)));
            assert_eq!((bw.bytes, bw.msgs), (65536 * 200, 200), "{}", name(t));
        }
        c.open_stream().expect("stream");
        for size in [64, 4096] {
            let lat = c.lat(Test::StreamLat, size, 50).expect("stream_lat");
            assert_eq!(lat.count(), 50);
        }
        let bw = c.bw(Test::StreamBw, 100_000, 20).expect("stream_bw");
        assert_eq!(bw.bytes, 2_000_000);
        assert!(c.stream_path(64).is_some());
    }

    /// A request the server cannot serve (an oversized message) gets a
    /// clear error, and the session ends with it, on both sides.
    #[test]
    fn a_bad_request_gets_a_clear_error_and_ends_the_session() {
        let (port, rx) = server(HELLO_TIMEOUT);
        let c = Client::connect("127.0.0.1", port, &config(), None).expect("client");
        let e = c
            .run(Test::SendLat, engine::MAX + 1, 1, |_| Ok(()))
            .expect_err("an oversized message is refused");
        assert!(e.contains("size 8388609 is not 0..=8388608"), "{e}");
        drop(c);
        let e = ended(&rx).expect_err("the session failed");
        assert!(e.contains("size"), "{e}");
    }

    /// A client that asks for a write ping-pong and then does not write
    /// (it died, or hangs): the server's memory poll gives up after its
    /// bound instead of spinning forever, and says so.
    #[test]
    fn a_silent_peer_in_a_write_ping_pong_fails_the_server_in_bounded_time() {
        let (port, rx) = server(HELLO_TIMEOUT);
        let e = bounded(move || {
            let c = Client::connect("127.0.0.1", port, &config(), None).expect("client");
            c.run(Test::WriteLat, 8, 100, |_| Ok(()))
                .expect_err("the server's half fails")
        });
        assert!(
            e.contains("write_lat 8 B") && e.contains("WSAETIMEDOUT"),
            "{e}"
        );
        let e = ended(&rx).expect_err("the session failed");
        assert!(e.contains("WSAETIMEDOUT"), "{e}");
    }

    /// Garbage, another protocol version, an endless line and a silent
    /// client each get a clear error (or are dropped in time); the server
    /// neither crashes nor hangs, and serves the real client after them.
    #[test]
    fn garbage_other_versions_and_silence_are_refused_and_the_server_goes_on() {
        let hello = Duration::from_millis(300);
        let (port, rx) = server(hello);
        let a = raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(a.starts_with("error: not a sanbench client"), "{a}");
        let a = raw(port, b"sanbench-control 2\n");
        assert!(
            a.starts_with(
                "error: control protocol version 2 is not supported: this server speaks version 1"
            ),
            "{a}"
        );
        let a = raw(port, b"sanbench-control one\n");
        assert!(a.starts_with("error: a malformed greeting"), "{a}");
        let a = raw(port, &[b'x'; 2 * MAX_LINE]);
        assert_eq!(a, "", "an endless line: closed without an answer");
        let t0 = Instant::now();
        let a = raw(port, b"");
        assert_eq!(a, "", "a silent client: closed");
        assert!(t0.elapsed() >= hello && t0.elapsed() < BOUND);
        bounded(move || {
            let mut c = Client::connect("127.0.0.1", port, &config(), None).expect("client");
            assert_eq!(c.lat(Test::SendLat, 8, 10).expect("send_lat").count(), 10);
            c.open_stream().expect("stream");
        });
        ended(&rx).expect("the real session ended well");
    }

    /// A setup the server cannot honour (another fabric; the soft fabric
    /// from another process) is answered with a clear error.
    #[test]
    fn a_setup_on_another_fabric_or_process_is_refused() {
        let me = std::process::id();
        for (setup, expect) in [
            (
                json!({"op": "setup", "fabric": "verbs", "pid": me}),
                "the client asks for fabric \"verbs\"; this server runs --fabric soft",
            ),
            (
                json!({"op": "setup", "fabric": "soft", "pid": me + 1}),
                "--fabric soft connects only the providers of one process",
            ),
        ] {
            let (port, rx) = server(HELLO_TIMEOUT);
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(BOUND)).expect("timeout");
            s.write_all(format!("{GREETING} {VERSION}\n{setup}\n").as_bytes())
                .expect("write");
            let mut r = BufReader::new(s);
            let mut hello = String::new();
            r.read_line(&mut hello).expect("greeting");
            assert_eq!(hello, format!("{GREETING} {VERSION} ok\n"));
            let mut answer = String::new();
            r.read_line(&mut answer).expect("answer");
            let v: Value = serde_json::from_str(&answer).expect("JSON");
            assert_eq!(v["ok"], json!(false), "{answer}");
            let e = v["error"].as_str().expect("an error");
            assert!(e.contains(expect), "{e}");
            assert!(ended(&rx).expect_err("the session failed").contains(expect));
        }
    }

    /// A client refuses a server of another version, or something that is
    /// not a sanbench server, with a clear error.
    #[test]
    fn the_client_refuses_other_versions_and_non_servers() {
        for (answer, expect) in [
            (
                "sanbench-control 2 ok\n",
                "is not a sanbench server of control protocol version 1",
            ),
            ("SSH-2.0-OpenSSH_9.2\n", "is not a sanbench server"),
            ("error: busy\n", "refused: busy"),
        ] {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = l.local_addr().expect("addr").port();
            let fake = std::thread::spawn(move || {
                let (mut s, _) = l.accept().expect("accept");
                s.write_all(answer.as_bytes()).expect("answer");
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line);
            });
            let e = Client::connect("127.0.0.1", port, &config(), None)
                .err()
                .expect("refused");
            assert!(e.contains(expect), "{answer:?}: {e}");
            fake.join().expect("fake server");
        }
    }
}
