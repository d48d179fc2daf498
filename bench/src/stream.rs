//! The stream benchmarks: one connected pair of the reference switch's
//! streams (`sanpath::switch`), used as an application uses a socket:
//! blocking `write_all` / `read_exact` / `recv`, the same patterns as the
//! TCP-loopback baselines in `baseline.rs`.

use crate::baseline::{pin, Cores};
use crate::stats::{Bw, Lat};
use sanpath::config::FabricKind;
use sanpath::fabric::soft::SoftNetwork;
use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream, SwitchOptions};
use sanpath::Config;
use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
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

impl StreamBench {
    /// A runtime on its own NIC (a private soft network, or the verbs
    /// device) and a connected pair through it, in the poller mode `config`
    /// selects (run to completion: each stream's thread polls its own
    /// connection's completion queue).
    pub fn new(config: Config, cores: Cores) -> Result<StreamBench, String> {
        let e = |what: &'static str| move |e: io::Error| format!("stream pair: {what}: {e}");
        let kind = config.fabric.kind;
        let ip = config.fabric.soft.addresses[0];
        let rc = RuntimeConfig {
            switch: SwitchOptions {
                connect_timeout: TIMEOUT,
                handshake_timeout: TIMEOUT,
                accept_timeout: Some(TIMEOUT),
                read_timeout: Some(TIMEOUT),
                write_timeout: Some(TIMEOUT),
                ..SwitchOptions::default()
            },
            engine: config,
        };
        let rt = match kind {
            FabricKind::Soft => {
                let nic = SoftNetwork::new()
                    .attach(rc.engine.soft_nic(vec![ip]))
                    .map_err(|e| e.to_string())?;
                Runtime::with_nic(rc, nic)
            }
            FabricKind::Verbs => Runtime::start(rc),
        }
        .map_err(e("runtime"))?;
        let ip = *rt
            .provider()
            .address_list()
            .map_err(|e| e.to_string())?
            .first()
            .ok_or("the NIC has no IPv4 address")?;
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
        match (size > self.rdma_threshold(), self.client.uses_read_flow()) {
            (false, _) => "copy",
            (true, true) => "rdma_read",
            (true, false) => "rdma_write",
        }
    }

    /// Ping-pong of `size` bytes (`write_all`, then `read_exact` of the
    /// echo); half round trip per sample.
    pub fn lat(&self, size: usize, iters: usize) -> io::Result<Lat> {
        let size = size.max(1);
        let warm = iters / 10;
        std::thread::scope(|sc| {
            let server = sc.spawn(|| -> io::Result<()> {
                pin(self.cores.map(|c| c.1));
                let mut s = &self.server;
                let mut buf = vec![0u8; size];
                for _ in 0..warm + iters {
                    s.read_exact(&mut buf)?;
                    s.write_all(&buf)?;
                }
                Ok(())
            });
            pin(self.cores.map(|c| c.0));
            let mut c = &self.client;
            let mut buf = vec![7u8; size];
            let mut samples = Vec::with_capacity(iters);
            for i in 0..warm + iters {
                let t0 = Instant::now();
                c.write_all(&buf)?;
                c.read_exact(&mut buf)?;
                if i >= warm {
                    samples.push(t0.elapsed().as_nanos() as f64 / 2.0);
                }
            }
            server.join().expect("stream server thread")?;
            Ok(Lat::new(samples))
        })
    }

    /// One-way stream of `msgs` writes of `size` bytes; the reader takes
    /// what has arrived in receives of up to 1 MiB. Timed until the reader
    /// has every byte.
    pub fn bw(&self, size: usize, msgs: usize) -> io::Result<Bw> {
        let size = size.max(1);
        let total = (size * msgs) as u64;
        std::thread::scope(|sc| {
            let reader = sc.spawn(|| -> io::Result<Instant> {
                pin(self.cores.map(|c| c.1));
                let mut buf = vec![0u8; READ_CHUNK];
                let mut got = 0u64;
                while got < total {
                    match self.server.recv(&mut buf)? {
                        0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                        n => got += n as u64,
                    }
                }
                Ok(Instant::now())
            });
            pin(self.cores.map(|c| c.0));
            let mut c = &self.client;
            let buf = vec![3u8; size];
            let t0 = Instant::now();
            for _ in 0..msgs {
                c.write_all(&buf)?;
            }
            let t1 = reader.join().expect("stream reader thread")?;
            Ok(Bw {
                bytes: total,
                msgs: msgs as u64,
                secs: (t1 - t0).as_secs_f64(),
            })
        })
    }
}
