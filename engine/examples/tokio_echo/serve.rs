//! The `tokio_echo` example's server and clients, shared with the test that
//! checks it (`engine/tests/readiness.rs`).
//!
//! The server serves every connection of a listener from one thread: a
//! current-thread tokio runtime, one task per stream, each stream (and the
//! listener) wrapped in `tokio::io::unix::AsyncFd` through its readiness fd
//! and driven by `try_accept`/`try_recv`/`try_send`. The clients are
//! ordinary blocking streams on a few threads of another runtime (another
//! host of the same soft network), each sending its connections messages
//! and checking what comes back.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::fabric::soft::SoftNetwork;
use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream, SwitchOptions};
use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What one run does.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Client connections, all open at once.
    pub connections: usize,
    /// Messages each connection sends (and reads back), in rounds: every
    /// connection of a client thread sends, then every one reads its echo.
    pub rounds: usize,
    /// Client threads.
    pub client_threads: usize,
    /// How the server's provider makes progress.
    pub server_mode: PollerMode,
}

/// What a run served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Connections the server served to their end of stream.
    pub served: usize,
    /// Bytes the server echoed.
    pub echoed: u64,
}

/// Bound on every blocking call of the clients and on the handshakes.
pub const TIMEOUT: Duration = Duration::from_secs(60);

const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 7, 1), 7000);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);

/// Bytes of message `round` of connection `conn` (1 to 5000, so some take
/// one control buffer and some several).
fn message(conn: usize, round: usize) -> Vec<u8> {
    let len = (conn * 131 + round * 977) % 5000 + 1;
    (0..len)
        .map(|i| (i as u64 ^ (conn as u64 * 7919) ^ (round as u64 * 104_729)) as u8)
        .collect()
}

/// A runtime owning `ip` on `net`, with connections small enough that a
/// thousand of them (on each side) fit: 8 receive and 8 send buffers of
/// 4 KiB (64 KiB per connection), queue pairs sized to match, and room for
/// their sockets and posted ops.
fn runtime(net: &Arc<SoftNetwork>, ip: Ipv4Addr, mode: PollerMode) -> io::Result<Arc<Runtime>> {
    let mut c = RuntimeConfig::default();
    c.engine.poller.mode = mode;
    // Blocked calls sleep soon: the client threads (and the server's, while
    // it negotiates an accepted connection) must not take the cores from
    // each other on a small machine.
    c.engine.poller.spin_budget = 20;
    // A soft completion queue looks at each of its queue pairs when polled:
    // spread a thousand over 16.
    c.engine.poller.count = 16;
    c.engine.mem.mlock = MlockPolicy::Off;
    c.engine.fabric.soft.addresses = vec![ip];
    c.engine.qp.recv_depth = 8;
    // Each send slot may have a send and its DATA's ring write posted,
    // plus 4 RDMA ops.
    c.engine.qp.send_depth = 20;
    c.engine.qp.cq_depth = 1 << 16;
    // Every connection keeps its receives posted: 8 op slots each.
    c.engine.ops.slab_size = 1 << 15;
    c.engine.ops.max_sockets = 2048;
    c.engine.connect.backlog_max = 1024;
    c.engine.connect.timeout_ms = 30_000;
    c.switch = SwitchOptions {
        recv_slots: 8,
        send_slots: 8,
        slot_size: 4096,
        // Echoes of at most 5000 bytes: small rings keep a thousand
        // connections' buffers small.
        ring_size: 8 << 10,
        backlog: 1024,
        connect_timeout: TIMEOUT,
        handshake_timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT),
        read_timeout: Some(TIMEOUT),
        write_timeout: Some(TIMEOUT),
        ..SwitchOptions::default()
    };
    let nic = net
        .attach(c.engine.soft_nic(vec![ip]))
        .map_err(io::Error::other)?;
    Runtime::with_nic(c, nic)
}

/// Runs the server on one thread and the clients on their own; returns
/// what the server served, or the first error (a client's wrong echo is
/// `InvalidData`).
pub fn run(plan: Plan) -> io::Result<Report> {
    let net = SoftNetwork::new();
    let server_rt = runtime(&net, *SERVER.ip(), plan.server_mode)?;
    let client_rt = runtime(&net, CLIENT_IP, PollerMode::RunToCompletion)?;
    let listener = Listener::bind(&server_rt, SERVER)?;
    let clients: Vec<_> = (0..plan.client_threads)
        .map(|t| {
            let rt = client_rt.clone();
            let conns: Vec<usize> = (t..plan.connections).step_by(plan.client_threads).collect();
            thread::spawn(move || client(&rt, &conns, plan.rounds))
        })
        .collect();
    let server = thread::spawn(move || {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        tokio.block_on(serve(listener, plan.connections))
    });
    // The clients first: if one fails, the server may wait for ever for
    // its connections; its error is the answer then.
    for c in clients {
        c.join()
            .map_err(|_| io::Error::other("a client thread panicked"))??;
    }
    server
        .join()
        .map_err(|_| io::Error::other("the server thread panicked"))?
}

/// One client thread: connects `conns`, then for each round sends every
/// connection its message and reads every echo back, then shuts each down
/// and reads its end of stream.
fn client(rt: &Arc<Runtime>, conns: &[usize], rounds: usize) -> io::Result<()> {
    let streams = conns
        .iter()
        .map(|c| Stream::connect(rt, SERVER).map_err(|e| context(e, "connect", *c)))
        .collect::<io::Result<Vec<_>>>()?;
    for round in 0..rounds {
        for (s, &c) in streams.iter().zip(conns) {
            io::Write::write_all(&mut &*s, &message(c, round))
                .map_err(|e| context(e, "send", c))?;
        }
        for (s, &c) in streams.iter().zip(conns) {
            let want = message(c, round);
            let mut got = vec![0u8; want.len()];
            io::Read::read_exact(&mut &*s, &mut got).map_err(|e| context(e, "receive", c))?;
            if got != want {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("connection {c}, round {round}: wrong echo"),
                ));
            }
        }
    }
    for s in &streams {
        s.shutdown()?;
        let mut end = [0u8; 1];
        if s.recv(&mut end)? != 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "data after the echo",
            ));
        }
    }
    Ok(())
}

/// `e`, saying which call of which connection failed.
fn context(e: io::Error, call: &str, conn: usize) -> io::Error {
    io::Error::new(e.kind(), format!("connection {conn}: {call}: {e}"))
}

/// Accepts `n` connections on `listener` and echoes each until its end of
/// stream, every one on this thread; returns once all `n` were served.
pub async fn serve(listener: Listener, n: usize) -> io::Result<Report> {
    listener.set_nonblocking(true)?;
    let listener = register(listener)?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut accepted = 0;
    while accepted < n {
        let mut ready = listener.readable().await?;
        match ready.try_io(|l| l.get_ref().try_accept()) {
            Ok(Ok((stream, _peer))) => {
                accepted += 1;
                tasks.spawn(echo(stream));
            }
            // A request whose negotiation failed is skipped.
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    ErrorKind::InvalidData
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::TimedOut
                ) => {}
            Ok(Err(e)) => return Err(e),
            // `WouldBlock`: `try_io` cleared the readiness; wait again.
            Err(_would_block) => {}
        }
    }
    let mut report = Report {
        served: 0,
        echoed: 0,
    };
    while let Some(done) = tasks.join_next().await {
        report.echoed += done.map_err(io::Error::other)??;
        report.served += 1;
    }
    Ok(report)
}

/// Registers the readiness fd of `io` (a stream or listener) with tokio's
/// reactor, for reading: its `POLLIN` is the only signal, also for sends.
fn register<T: AsRawFd>(io: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: a stream's or listener's readiness fd is open, and the same
    // descriptor, from its first `as_raw_fd` until the stream or listener
    // is dropped, and the `AsyncFd` owns it until then.
    Ok(unsafe { AsyncFd::register_with_interest(io, Interest::READABLE) }?)
}

/// Echoes `stream` until its end of stream, then shuts it down; returns
/// the bytes echoed.
async fn echo(stream: Stream) -> io::Result<u64> {
    stream.set_nonblocking(true)?;
    let stream = register(stream)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut echoed = 0;
    loop {
        let n = recv(&stream, &mut buf).await?;
        if n == 0 {
            break;
        }
        send_all(&stream, &buf[..n]).await?;
        echoed += n as u64;
    }
    stream.get_ref().shutdown()?;
    Ok(echoed)
}

/// Receives what has arrived, waiting for the readiness fd while there is
/// nothing.
async fn recv(stream: &AsyncFd<Stream>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut ready = stream.readable().await?;
        if let Ok(r) = ready.try_io(|s| s.get_ref().try_recv(buf)) {
            return r;
        }
    }
}

/// Sends all of `buf`, waiting for the readiness fd while credits or send
/// buffers are short (the same fd: readable means "try again").
async fn send_all(stream: &AsyncFd<Stream>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut ready = stream.readable().await?;
        if let Ok(r) = ready.try_io(|s| s.get_ref().try_send(buf)) {
            buf = &buf[r?..];
        }
    }
    Ok(())
}
