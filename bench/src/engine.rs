//! The engine benchmarks: one connected socket pair on the soft fabric,
//! driven through the public SPI exactly as a switch would (registered
//! buffers, overlapped ops with `hEvent` bit 0 set, i.e. polled).

use crate::stats::{Bw, Lat};
use crate::Mode;
use sanpath::config::{FabricKind, MlockPolicy, PollerMode};
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::testkit::{self, CompletingSwitch};
use sanpath::{Config, WsaError};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

/// Largest message (the -a sweep goes to 8 MiB).
const MAX: usize = 8 << 20;
/// Outstanding ops in bandwidth tests (perftest's default tx depth is 128
/// on hardware; 64 keeps the soft NIC's receiver-not-ready hold small).
pub const WINDOW: usize = 64;
/// hEvent with bit 0 set: no upcall, the benchmark polls.
const POLLED: usize = 1;

/// Settings the benchmark needs on top of the user's config.
pub fn tune(c: &mut Config, mode: Mode) {
    c.poller.mode = match mode {
        Mode::Rtc => PollerMode::RunToCompletion,
        Mode::Threads => PollerMode::Threads,
    };
    c.mem.mlock = MlockPolicy::Off;
    c.poller.count = match mode {
        // One CQ per side, so that each side's thread polls only its own.
        Mode::Rtc => 2,
        // One poller thread: with the two benchmark threads that is already
        // more threads than this machine's two cores (they block, it spins
        // only up to its budget).
        Mode::Threads => 1,
    };
    // A sender with a full window may run ahead of the receiver's reposts:
    // the soft NIC holds at most this many sends before it breaks the link.
    c.qp.rnr_queue_max = c.qp.rnr_queue_max.max(WINDOW as u32);
    c.limits.max_msg_size = c.limits.max_msg_size.max(MAX as u32);
    c.fabric.soft.addresses = vec![Ipv4Addr::new(198, 18, 250, 1)];
    if c.fabric.kind == FabricKind::Verbs {
        // A real NIC's send queue: no receiver-not-ready queue of 4096.
        c.qp.send_depth = c.qp.send_depth.max(WINDOW as u32 * 2);
    }
}

/// One side of the connection: its socket and buffers.
struct Side {
    sock: ProviderSocket,
    /// Local buffer (2 × MAX): send/RDMA source at 0, receive sink at MAX.
    local: Region,
    handle: u64,
    /// Buffer exposed to the peer for its RDMA (MAX), and its descriptor.
    exposed: Region,
    desc: Vec<u8>,
}

pub struct Bench {
    p: Provider,
    /// Cores of the client and server threads (`None`: not pinned).
    cores: Option<(usize, usize)>,
    /// Whether memory polling must yield (more threads than cores).
    yielding: bool,
    c: Side,
    s: Side,
}

fn pin(core: Option<usize>) {
    if let Some(id) = core {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// Spins on a condition; if `yielding`, gives the core away after a short
/// spin (threads mode: a poller thread needs the core too).
fn spin_until(yielding: bool, mut done: impl FnMut() -> bool) {
    let mut n = 0u32;
    while !done() {
        n = n.wrapping_add(1);
        if yielding && n > 256 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

type Res<T> = Result<T, WsaError>;

impl Bench {
    pub fn new(config: Config, cores: Option<(usize, usize)>) -> Result<Bench, String> {
        let yielding = config.poller.mode == PollerMode::Threads;
        let p = match config.fabric.kind {
            FabricKind::Soft => {
                let ip = config.fabric.soft.addresses[0];
                testkit::soft_provider(config, ip, Arc::new(CompletingSwitch))?.0
            }
            FabricKind::Verbs => {
                let p = Provider::new(config).map_err(|e| e.to_string())?;
                p.startup(WSD_VERSION, Arc::new(CompletingSwitch), 1)
                    .map_err(|e| e.to_string())?;
                p
            }
        };
        let ip = *p
            .address_list()
            .map_err(|e| e.to_string())?
            .first()
            .ok_or("the NIC has no IPv4 address")?;
        let (c, s) = testkit::connected_pair(&p, SocketAddrV4::new(ip, 18515))
            .map_err(|e| format!("connecting the benchmark pair: {e}"))?;
        let c = side(&p, c)?;
        let s = side(&p, s)?;
        Ok(Bench {
            p,
            cores,
            yielding,
            c,
            s,
        })
    }

    /// Waits for an op of `side` the way a switch would: with
    /// `WSPGetOverlappedResult(fWait = TRUE)`. In run-to-completion mode
    /// that polls only the socket's own CQ, spinning up to the configured
    /// budget before it sleeps; in threads mode it blocks until the
    /// dispatcher completed the op.
    fn wait(&self, side: &Side, ov: &Overlapped) -> Res<u32> {
        self.p
            .get_overlapped_result(side.sock, ov, true)
            .map(|(bytes, _)| bytes)
    }

    fn send(&self, side: &Side, len: usize, ov: &Overlapped) -> Res<()> {
        let b = [WsaBuf {
            len: len as u32,
            buf: side.local.as_ptr(),
        }];
        // SAFETY: the buffer lives in `self` and `ov` outlives the op (every
        // op is waited for before its record goes out of scope).
        unsafe { self.p.send(side.sock, &b, 0, ov) }
    }

    fn recv(&self, side: &Side, len: usize, ov: &Overlapped) -> Res<()> {
        let b = [WsaBuf {
            len: len as u32,
            buf: side.local.as_ptr().wrapping_add(MAX),
        }];
        // SAFETY: as in `send`.
        unsafe { self.p.recv(side.sock, &b, ov) }
    }

    fn rdma(&self, from: &Side, to: &Side, len: usize, write: bool, ov: &Overlapped) -> Res<()> {
        let off = if write { 0 } else { MAX };
        let b = [WsaBufEx {
            len: len as u32,
            buf: from.local.as_ptr().wrapping_add(off),
            handle: from.handle as usize,
        }];
        // SAFETY: as in `send`.
        unsafe {
            if write {
                self.p.rdma_write(from.sock, &b, &to.desc, 0, 0, ov)
            } else {
                self.p.rdma_read(from.sock, &b, &to.desc, 0, 0, ov)
            }
        }
    }

    /// Two-sided ping-pong; half round trip per sample.
    pub fn send_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        let warm = iters / 10;
        std::thread::scope(|sc| {
            let server = sc.spawn(|| -> Res<()> {
                pin(self.cores.map(|c| c.1));
                let rov = [Overlapped::new(POLLED), Overlapped::new(POLLED)];
                let sov = Overlapped::new(POLLED);
                self.recv(&self.s, size, &rov[0])?;
                for i in 0..warm + iters {
                    self.wait(&self.s, &rov[i % 2])?;
                    // No receive outlives the loop (its record is on this
                    // stack): the last round posts none.
                    if i + 1 < warm + iters {
                        self.recv(&self.s, size, &rov[(i + 1) % 2])?;
                    }
                    self.send(&self.s, size, &sov)?;
                    self.wait(&self.s, &sov)?;
                }
                Ok(())
            });
            pin(self.cores.map(|c| c.0));
            let (rov, sov) = (Overlapped::new(POLLED), Overlapped::new(POLLED));
            let mut samples = Vec::with_capacity(iters);
            self.recv(&self.c, size, &rov)?;
            for i in 0..warm + iters {
                let t0 = Instant::now();
                self.send(&self.c, size, &sov)?;
                self.wait(&self.c, &rov)?;
                let ns = t0.elapsed().as_nanos() as f64 / 2.0;
                if i + 1 < warm + iters {
                    self.recv(&self.c, size, &rov)?;
                }
                self.wait(&self.c, &sov)?;
                if i >= warm {
                    samples.push(ns);
                }
            }
            server.join().expect("server thread")?;
            Ok(Lat::new(samples))
        })
    }

    /// perftest-style write ping-pong: each side RDMA-writes the peer's
    /// exposed buffer and polls the last byte of its own; half round trip.
    pub fn write_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        let size = size.max(1);
        let warm = iters / 10;
        let mark = |side: &Side, v: u8| {
            // SAFETY: in bounds of the local region; no op reads it now.
            unsafe { side.local.as_ptr().add(size - 1).write_volatile(v) }
        };
        let seen = |side: &Side| {
            // SAFETY: in bounds of the exposed region. The peer's NIC writes
            // it concurrently: this polls DMA-written memory, byte-sized.
            unsafe { side.exposed.as_ptr().add(size - 1).read_volatile() }
        };
        std::thread::scope(|sc| {
            let server = sc.spawn(|| -> Res<()> {
                pin(self.cores.map(|c| c.1));
                let wov = Overlapped::new(POLLED);
                for i in 0..warm + iters {
                    let v = (i % 255) as u8 + 1;
                    spin_until(self.yielding, || seen(&self.s) == v);
                    mark(&self.s, v);
                    self.rdma(&self.s, &self.c, size, true, &wov)?;
                    self.wait(&self.s, &wov)?;
                }
                Ok(())
            });
            pin(self.cores.map(|c| c.0));
            let wov = Overlapped::new(POLLED);
            let mut samples = Vec::with_capacity(iters);
            for i in 0..warm + iters {
                let v = (i % 255) as u8 + 1;
                let t0 = Instant::now();
                mark(&self.c, v);
                self.rdma(&self.c, &self.s, size, true, &wov)?;
                // Memory only, as perftest: the write's own completion is
                // reaped after the sample.
                spin_until(self.yielding, || seen(&self.c) == v);
                let ns = t0.elapsed().as_nanos() as f64 / 2.0;
                self.wait(&self.c, &wov)?;
                if i >= warm {
                    samples.push(ns);
                }
            }
            server.join().expect("server thread")?;
            Ok(Lat::new(samples))
        })
    }

    /// RDMA read of the peer's buffer; full round trip per sample.
    pub fn read_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        pin(self.cores.map(|c| c.0));
        let ov = Overlapped::new(POLLED);
        let warm = iters / 10;
        let mut samples = Vec::with_capacity(iters);
        for i in 0..warm + iters {
            let t0 = Instant::now();
            self.rdma(&self.c, &self.s, size, false, &ov)?;
            self.wait(&self.c, &ov)?;
            if i >= warm {
                samples.push(t0.elapsed().as_nanos() as f64);
            }
        }
        Ok(Lat::new(samples))
    }

    /// Streaming sends with a window; the receiver keeps a window posted.
    pub fn send_bw(&self, size: usize, msgs: usize) -> Res<Bw> {
        std::thread::scope(|sc| {
            let server = sc.spawn(|| -> Res<()> {
                pin(self.cores.map(|c| c.1));
                let ovs: Vec<Overlapped> = (0..WINDOW).map(|_| Overlapped::new(POLLED)).collect();
                let mut posted = 0;
                for ov in &ovs {
                    if posted < msgs {
                        self.recv(&self.s, size, ov)?;
                        posted += 1;
                    }
                }
                for i in 0..msgs {
                    let ov = &ovs[i % WINDOW];
                    self.wait(&self.s, ov)?;
                    if posted < msgs {
                        self.recv(&self.s, size, ov)?;
                        posted += 1;
                    }
                }
                Ok(())
            });
            pin(self.cores.map(|c| c.0));
            let t0 = Instant::now();
            self.window(msgs, |ov| self.send(&self.c, size, ov))?;
            server.join().expect("server thread")?;
            Ok(Bw {
                bytes: (size * msgs) as u64,
                msgs: msgs as u64,
                secs: t0.elapsed().as_secs_f64(),
            })
        })
    }

    pub fn write_bw(&self, size: usize, msgs: usize) -> Res<Bw> {
        pin(self.cores.map(|c| c.0));
        let t0 = Instant::now();
        self.window(msgs, |ov| self.rdma(&self.c, &self.s, size, true, ov))?;
        Ok(Bw {
            bytes: (size * msgs) as u64,
            msgs: msgs as u64,
            secs: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn read_bw(&self, size: usize, msgs: usize) -> Res<Bw> {
        pin(self.cores.map(|c| c.0));
        let t0 = Instant::now();
        self.window(msgs, |ov| self.rdma(&self.c, &self.s, size, false, ov))?;
        Ok(Bw {
            bytes: (size * msgs) as u64,
            msgs: msgs as u64,
            secs: t0.elapsed().as_secs_f64(),
        })
    }

    /// Keeps `WINDOW` ops of the client outstanding until `msgs` completed.
    fn window(&self, msgs: usize, post: impl Fn(&Overlapped) -> Res<()>) -> Res<()> {
        let ovs: Vec<Overlapped> = (0..WINDOW).map(|_| Overlapped::new(POLLED)).collect();
        let mut posted = 0;
        for ov in &ovs {
            if posted < msgs {
                post(ov)?;
                posted += 1;
            }
        }
        for i in 0..msgs {
            let ov = &ovs[i % WINDOW];
            self.wait(&self.c, ov)?;
            if posted < msgs {
                post(ov)?;
                posted += 1;
            }
        }
        Ok(())
    }
}

fn side(p: &Provider, sock: ProviderSocket) -> Result<Side, String> {
    let e = |e: WsaError| e.to_string();
    let local = Region::new(2 * MAX, MlockPolicy::Off).map_err(|e| e.to_string())?;
    let exposed = Region::new(MAX, MlockPolicy::Off).map_err(|e| e.to_string())?;
    let mut desc = vec![0u8; RDMA_DESCRIPTOR_LEN];
    // SAFETY: both regions live in the Bench until the provider is cleaned
    // up (Drop), which closes the sockets first.
    let handle = unsafe {
        let h = p
            .register_memory(sock, local.as_ptr(), (2 * MAX) as u32, MEM_READWRITE)
            .map_err(e)?;
        p.register_rdma_memory(sock, exposed.as_ptr(), MAX as u32, MEM_READWRITE, &mut desc)
            .map_err(e)?;
        h
    };
    Ok(Side {
        sock,
        local,
        handle,
        exposed,
        desc,
    })
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Closes both sockets (aborting the server's last posted receive)
        // before the regions are unmapped.
        let _ = self.p.cleanup();
    }
}
