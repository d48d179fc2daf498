//! The stream benchmarks: one connected pair of the reference switch's
//! streams (`sanpath::switch`), used as an application uses a socket:
//! blocking `write_all` / `read_exact` / `recv`, the same patterns as the
//! TCP-loopback baselines in `baseline.rs`. As in `engine.rs`, each test is
//! a measuring half and a serving half, run as two threads here or in two
//! processes by `remote.rs`.

use crate::baseline::{pin, Cores};
use crate::clock::Clock;
use crate::stats::{Bw, Lat};
use sanpath::config::FabricKind;
use sanpath::fabric::soft::SoftNetwork;
use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream, SwitchOptions};
use sanpath::Config;
use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bound on every blocking call: a broken run fails instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Receive size of the bandwidth test's reader (as the TCP baseline's).
const READ_CHUNK: usize = 1 << 20;

pub struct StreamBench {
    client: Stream,
    server: Stream,
    cores: Cores,
}

/// Runtime settings: every blocking call bounded by `TIMEOUT`.
fn runtime_config(config: Config) -> RuntimeConfig {
    RuntimeConfig {
        switch: SwitchOptions {
            connect_timeout: TIMEOUT,
            handshake_timeout: TIMEOUT,
            accept_timeout: Some(TIMEOUT),
            read_timeout: Some(TIMEOUT),
            write_timeout: Some(TIMEOUT),
            ..SwitchOptions::default()
        },
        engine: config,
    }
}

/// A runtime on the NIC `config` selects: with `private_soft`, a soft NIC
/// on a network of its own; else `Runtime::start` (any fabric kind; the
/// soft one on the process-wide network).
pub fn runtime(config: Config, private_soft: bool) -> Result<Arc<Runtime>, String> {
    let e = |e: io::Error| format!("stream runtime: {e}");
    if private_soft && config.fabric.kind == FabricKind::Soft {
        let ip = config.fabric.soft.addresses[0];
        let rc = runtime_config(config);
        let nic = SoftNetwork::new()
            .attach(rc.engine.soft_nic(vec![ip]))
            .map_err(|e| e.to_string())?;
        Runtime::with_nic(rc, nic).map_err(e)
    } else {
        Runtime::start(runtime_config(config)).map_err(e)
    }
}

impl StreamBench {
    /// A runtime on its own NIC (a private soft network, or the verbs
    /// device) and a connected pair through it, in the poller mode `config`
    /// selects (run to completion: each stream's thread polls its own
    /// connection's completion queue).
    pub fn new(config: Config, cores: Cores) -> Result<StreamBench, String> {
        let e = |what: &'static str| move |e: io::Error| format!("stream pair: {what}: {e}");
        let rt = runtime(config, true)?;
        let ip = crate::engine::address(rt.provider())?;
        let listener = Listener::bind(&rt, SocketAddrV4::new(ip, 18516)).map_err(e("listen"))?;
        let addr = listener.local_addr();
        let (client, server) = std::thread::scope(|s| {
            let server = s.spawn(|| listener.accept().map(|(s, _)| s));
            let client = Stream::connect(&rt, addr);
            (client, server.join().expect("accepting thread"))
        });
        Ok(StreamBench {
            client: client.map_err(e("connect"))?,
            server: server.map_err(e("accept"))?,
            cores,
        })
    }

    /// Sends above this many bytes go by RDMA.
    pub fn rdma_threshold(&self) -> usize {
        self.client.rdma_threshold()
    }

    /// How a `size`-byte send moves.
    pub fn path(&self, size: usize) -> &'static str {
        path(&self.client, size)
    }

    /// Ping-pong of `size` bytes; half round trip per sample.
    pub fn lat(&self, size: usize, iters: usize) -> io::Result<Lat> {
        std::thread::scope(|sc| {
            let server = sc.spawn(|| serve_lat(&self.server, self.cores.map(|c| c.1), size, iters));
            let lat = lat(&self.client, self.cores.map(|c| c.0), size, iters);
            server.join().expect("stream server thread")?;
            lat
        })
    }

    /// One-way stream of `msgs` writes of `size` bytes.
    pub fn bw(&self, size: usize, msgs: usize) -> io::Result<Bw> {
        std::thread::scope(|sc| {
            let reader = sc.spawn(|| serve_bw(&self.server, self.cores.map(|c| c.1), size, msgs));
            let bw = bw(&self.client, self.cores.map(|c| c.0), size, msgs);
            reader.join().expect("stream reader thread")?;
            bw
        })
    }
}

/// How a `size`-byte send on `s` moves.
pub fn path(s: &Stream, size: usize) -> &'static str {
    match (size > s.rdma_threshold(), s.uses_read_flow()) {
        (false, _) => "copy",
        (true, true) => "rdma_read",
        (true, false) => "rdma_write",
    }
}

/// The measuring half of the ping-pong of `size` bytes (`write_all`, then
/// `read_exact` of the echo); half round trip per sample, stamped as the
/// engine's latency tests stamp theirs ([`Clock`]: the TSC where the OS
/// clock is slow, as in the Soft-RoCE VM).
pub fn lat(mut c: &Stream, core: Option<usize>, size: usize, iters: usize) -> io::Result<Lat> {
    pin(core);
    let size = size.max(1);
    let warm = iters / 10;
    let mut buf = vec![7u8; size];
    let mut ticks = Vec::with_capacity(iters);
    let clock = Clock::start();
    for i in 0..warm + iters {
        let t0 = clock.now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        if i >= warm {
            ticks.push(clock.now().saturating_sub(t0));
        }
    }
    Ok(clock.lat(&ticks, 0.5))
}

/// The echoing half of the ping-pong.
pub fn serve_lat(mut s: &Stream, core: Option<usize>, size: usize, iters: usize) -> io::Result<()> {
    pin(core);
    let size = size.max(1);
    let mut buf = vec![0u8; size];
    for _ in 0..iters / 10 + iters {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
    Ok(())
}

/// The writing half of a one-way stream of `msgs` writes of `size` bytes;
/// timed until the reader's one-byte acknowledgement of the last byte.
pub fn bw(mut c: &Stream, core: Option<usize>, size: usize, msgs: usize) -> io::Result<Bw> {
    pin(core);
    let size = size.max(1);
    let buf = vec![3u8; size];
    let t0 = Instant::now();
    for _ in 0..msgs {
        c.write_all(&buf)?;
    }
    c.read_exact(&mut [0u8])?;
    Ok(Bw {
        bytes: (size * msgs) as u64,
        msgs: msgs as u64,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// The reading half: takes what has arrived in receives of up to 1 MiB
/// until it has every byte, then acknowledges with one byte.
pub fn serve_bw(mut s: &Stream, core: Option<usize>, size: usize, msgs: usize) -> io::Result<()> {
    pin(core);
    let total = (size.max(1) * msgs) as u64;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut got = 0u64;
    while got < total {
        match s.recv(&mut buf)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n as u64,
        }
    }
    s.write_all(&[1])
}
