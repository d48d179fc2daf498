//! The engine benchmarks: one connected socket pair, driven through the
//! public SPI exactly as a switch would (registered buffers, overlapped ops
//! with `hEvent` bit 0 set, i.e. polled). Each test is two halves on two
//! [`Side`]s: the measuring one (client) and the echoing or receiving one
//! (server); [`Bench`] runs both as threads of this process, `remote.rs`
//! one in each of two processes.

use crate::clock::Clock;
use crate::stats::{Bw, Lat};
use crate::Mode;
use sanpath::coarse::CoarseDeadline;
use sanpath::config::{FabricKind, MlockPolicy, PollerMode};
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::testkit::{self, CompletingSwitch};
use sanpath::{Config, WsaError};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest message (the -a sweep goes to 8 MiB).
pub const MAX: usize = 8 << 20;
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
    // One CQ per side, so that each side's thread polls only its own (in
    // threads mode too: a waiting side reaps its CQ itself, and the CQ's
    // poller thread steps aside meanwhile).
    c.poller.count = 2;
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

/// One side of a connection: its socket, buffers and the peer's exposed
/// buffer. The same code drives a side whether its peer is a thread of this
/// process (`Bench`) or another process (`sanbench --server` / `HOST`).
pub struct Side {
    p: Arc<Provider>,
    sock: ProviderSocket,
    /// Local buffer (2 × MAX): send/RDMA source at 0, receive sink at MAX.
    local: Region,
    handle: u64,
    /// Buffer exposed to the peer for its RDMA (MAX), and its descriptor.
    exposed: Region,
    desc: Vec<u8>,
    /// The peer's exposed buffer: the target of this side's RDMA.
    peer: Vec<u8>,
    /// The core this side's thread runs on (`None`: not pinned).
    core: Option<usize>,
    /// Whether memory polling must yield (more threads than cores).
    yielding: bool,
    /// Whether the peer's RDMA into this side's memory needs this side's
    /// progress: on the shared-memory fabric the owner of the target memory
    /// checks the key and makes the copy when it polls its completion queue
    /// (a process cannot be written by its peer behind its back), so a side
    /// polling memory for a write must also poll its socket.
    target_progress: bool,
}

/// The two sides of a connection in one process, on one provider.
pub struct Bench {
    p: Arc<Provider>,
    c: Side,
    s: Side,
}

fn pin(core: Option<usize>) {
    if let Some(id) = core {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// How long a side polling memory waits for its peer's write before it
/// gives up: a peer that died or stopped makes no completion to fail on.
const PEER_SILENCE: Duration = Duration::from_secs(10);

/// Spins between two readings of the clock in [`spin_until`].
///
/// perftest's memory polling reads no clock at all; this one must, to fail
/// a silent peer, but rarely. It reads the kernel's coarse clock
/// ([`CoarseDeadline`]: a vDSO read, never a system call; `PEER_SILENCE`
/// is seconds, so its few ticks of lateness does not matter), where a fine
/// reading in the Soft-RoCE VM (QEMU TCG, clock source HPET) is a system
/// call and an emulated device read of 3-5 µs: reading that every 4096
/// spins cost about one reading per ~90 µs wait of a write ping-pong, 8% of
/// the VM's CPU time in `read_hpet` (perf). The spins between two readings
/// stay as many as for the fine clock: at 2^18 a reading comes every ~1 ms
/// natively and every few ms there, and a yielding spinner (threads mode) still notices
/// `PEER_SILENCE` within a fraction of it.
const SPINS_PER_CLOCK_READ: u32 = 1 << 18;

/// Spins on a condition; if `yielding`, gives the core away after a short
/// spin (threads mode: a poller thread needs the core too). Fails with
/// `WSAETIMEDOUT` after `PEER_SILENCE` (the clock is read every
/// [`SPINS_PER_CLOCK_READ`] spins; the bound counts from the first).
///
/// Not yielding, it spins without a pause instruction, as perftest's
/// memory polling does: a pause delays seeing the peer's write (by up to
/// ~140 cycles on recent x86 cores), and under emulation (QEMU TCG, the
/// Soft-RoCE VM) every pause leaves the vCPU's translated code for QEMU's
/// main loop and its global lock.
fn spin_until(yielding: bool, mut done: impl FnMut() -> bool) -> Res<()> {
    let mut n = 0u32;
    let mut silence: Option<CoarseDeadline> = None;
    while !done() {
        n = n.wrapping_add(1);
        if n % SPINS_PER_CLOCK_READ == 0 {
            match silence {
                None => silence = Some(CoarseDeadline::after(PEER_SILENCE)),
                Some(d) if d.passed() => return Err(WsaError::WSAETIMEDOUT),
                Some(_) => {}
            }
        }
        if yielding {
            if n > 256 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
    Ok(())
}

pub type Res<T> = Result<T, WsaError>;

/// A started provider on the NIC `config` selects. The one-process run's
/// soft NIC sits on a network of its own; every other provider (a remote
/// side: any fabric kind, the soft one on the process-wide network) comes
/// from `Provider::new`, so a new fabric kind needs nothing here.
pub fn provider(config: Config, private_soft: bool) -> Result<Arc<Provider>, String> {
    let p = if private_soft && config.fabric.kind == FabricKind::Soft {
        let ip = config.fabric.soft.addresses[0];
        testkit::soft_provider(config, ip, Arc::new(CompletingSwitch))?.0
    } else {
        let p = Provider::new(config).map_err(|e| e.to_string())?;
        p.startup(WSD_VERSION, Arc::new(CompletingSwitch), 1)
            .map_err(|e| e.to_string())?;
        p
    };
    Ok(Arc::new(p))
}

/// The first IPv4 address of the provider's NIC.
pub fn address(p: &Provider) -> Result<Ipv4Addr, String> {
    p.address_list()
        .map_err(|e| e.to_string())?
        .first()
        .copied()
        .ok_or_else(|| "the NIC has no IPv4 address".into())
}

/// Warm-up iterations before `iters` measured ones (both sides agree).
fn warmup(iters: usize) -> usize {
    iters / 10
}

impl Bench {
    pub fn new(config: Config, cores: Option<(usize, usize)>) -> Result<Bench, String> {
        let yielding = config.poller.mode == PollerMode::Threads;
        let p = provider(config, true)?;
        let ip = address(&p)?;
        let (c, s) = testkit::connected_pair(&p, SocketAddrV4::new(ip, 18515))
            .map_err(|e| format!("connecting the benchmark pair: {e}"))?;
        let mut c = Side::new(p.clone(), c, cores.map(|c| c.0), yielding)?;
        let mut s = Side::new(p.clone(), s, cores.map(|c| c.1), yielding)?;
        c.set_peer(s.desc().to_vec());
        s.set_peer(c.desc().to_vec());
        Ok(Bench { p, c, s })
    }

    /// The provider's counters (`sanbench --stats`).
    pub fn stats(&self) -> ProviderStats {
        self.p.stats()
    }

    /// Two-sided ping-pong; half round trip per sample.
    pub fn send_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        std::thread::scope(|sc| {
            let server = sc.spawn(|| self.s.serve_send_lat(size, iters, || {}));
            let lat = self.c.send_lat(size, iters);
            server.join().expect("server thread")?;
            lat
        })
    }

    /// perftest-style write ping-pong; half round trip.
    pub fn write_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        self.c.clear_mark(size);
        self.s.clear_mark(size);
        std::thread::scope(|sc| {
            let server = sc.spawn(|| self.s.serve_write_lat(size, iters, || {}));
            let lat = self.c.write_lat(size, iters);
            server.join().expect("server thread")?;
            lat
        })
    }

    /// RDMA read of the peer's buffer; full round trip per sample.
    pub fn read_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        self.with_target_progress(|| self.c.read_lat(size, iters))
    }

    /// Streaming sends with a window; the receiver keeps a window posted.
    /// Timed until the receiver has every message.
    pub fn send_bw(&self, size: usize, msgs: usize) -> Res<Bw> {
        std::thread::scope(|sc| {
            let server = sc.spawn(|| self.s.serve_send_bw(size, msgs, || {}));
            pin(self.c.core);
            let t0 = Instant::now();
            self.c.send_window(size, msgs)?;
            server.join().expect("server thread")?;
            Ok(bw(size, msgs, t0))
        })
    }

    pub fn write_bw(&self, size: usize, msgs: usize) -> Res<Bw> {
        self.with_target_progress(|| self.c.rdma_bw(size, msgs, true))
    }

    pub fn read_bw(&self, size: usize, msgs: usize) -> Res<Bw> {
        self.with_target_progress(|| self.c.rdma_bw(size, msgs, false))
    }

    /// Runs `client`, a one-sided test's initiator, while the target side
    /// polls its socket on its own core when the fabric needs it for the
    /// initiator's RDMA to land (`Side::target_progress`: shm), as the
    /// two-process server does; else runs `client` alone.
    fn with_target_progress<T>(&self, client: impl FnOnce() -> T) -> T {
        if !self.s.needs_target_progress() {
            return client();
        }
        /// Tells the target's thread to stop when the client returns or
        /// unwinds, so that the scope's join never waits forever.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let done = AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                pin(self.s.core);
                while !done.load(Ordering::Acquire) {
                    self.s.make_target_progress();
                    if self.s.yielding {
                        std::thread::yield_now();
                    }
                }
            });
            let _stop = Stop(&done);
            client()
        })
    }
}

/// Writes a pattern into every page of `r`, so that the tests move real
/// memory. A page of an anonymous mapping that was never written is the
/// kernel's one shared zero page: a source read from it hits the same 4 KiB
/// of L1 cache for every page, and a copy from it runs at store speed,
/// twice a real `memcpy` of 1 MiB on the 2-vCPU test VM (54-60 against
/// 25-31 GB/s): `write_bw` and `send_bw` read their source, and `read_bw`
/// the peer's exposed buffer, from here.
fn fill(r: &Region) -> Result<(), String> {
    let chunk = vec![0xa5u8; 1 << 20];
    for at in (0..r.len()).step_by(chunk.len()) {
        let n = chunk.len().min(r.len() - at);
        r.write_at(at, &chunk[..n]).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn bw(size: usize, msgs: usize, t0: Instant) -> Bw {
    Bw {
        bytes: (size * msgs) as u64,
        msgs: msgs as u64,
        secs: t0.elapsed().as_secs_f64(),
    }
}

impl Side {
    /// Registers the side's buffers on `sock`, a connected socket of `p`.
    /// The regions live as long as the side; its owner cleans the provider
    /// up (closing the socket) before dropping it.
    pub fn new(
        p: Arc<Provider>,
        sock: ProviderSocket,
        core: Option<usize>,
        yielding: bool,
    ) -> Result<Side, String> {
        let e = |e: WsaError| e.to_string();
        let local = Region::new(2 * MAX, MlockPolicy::Off).map_err(|e| e.to_string())?;
        let exposed = Region::new(MAX, MlockPolicy::Off).map_err(|e| e.to_string())?;
        fill(&local)?;
        fill(&exposed)?;
        let mut desc = vec![0u8; RDMA_DESCRIPTOR_LEN];
        // SAFETY: both regions live in the Side, whose owner cleans the
        // provider up (closing the socket, deregistering) before dropping it.
        let handle = unsafe {
            let h = p
                .register_memory(sock, local.as_ptr(), (2 * MAX) as u32, MEM_READWRITE)
                .map_err(e)?;
            p.register_rdma_memory(sock, exposed.as_ptr(), MAX as u32, MEM_READWRITE, &mut desc)
                .map_err(e)?;
            h
        };
        let target_progress = p.config().fabric.kind == FabricKind::Shm;
        Ok(Side {
            p,
            sock,
            local,
            handle,
            exposed,
            desc,
            peer: Vec::new(),
            core,
            yielding,
            target_progress,
        })
    }

    /// The descriptor of this side's exposed buffer (for the peer).
    pub fn desc(&self) -> &[u8] {
        &self.desc
    }

    /// Sets the peer's exposed-buffer descriptor, the target of RDMA.
    pub fn set_peer(&mut self, desc: Vec<u8>) {
        self.peer = desc;
    }

    /// Zeroes the byte of the exposed buffer a write ping-pong of `size`
    /// polls; before either side of the test starts (a previous run may
    /// have left the value the next run waits for).
    pub fn clear_mark(&self, size: usize) {
        // SAFETY: in bounds of the exposed region; no test runs, so the
        // peer writes no part of it now.
        unsafe {
            self.exposed
                .as_ptr()
                .add(size.clamp(1, MAX) - 1)
                .write_volatile(0)
        }
    }

    /// Waits for an op the way a switch would: with
    /// `WSPGetOverlappedResult(fWait = TRUE)`. In run-to-completion mode
    /// that polls only the socket's own CQ, spinning up to the configured
    /// budget before it sleeps; so does threads mode, whose poller and
    /// dispatcher threads then step aside.
    fn wait(&self, ov: &Overlapped) -> Res<u32> {
        self.p
            .get_overlapped_result(self.sock, ov, true)
            .map(|(bytes, _)| bytes)
    }

    fn send(&self, len: usize, ov: &Overlapped) -> Res<()> {
        let b = [WsaBuf {
            len: len as u32,
            buf: self.local.as_ptr(),
        }];
        // SAFETY: the buffer lives in `self` and `ov` outlives the op (every
        // op is waited for before its record goes out of scope).
        unsafe { self.p.send(self.sock, &b, 0, ov) }
    }

    fn recv(&self, len: usize, ov: &Overlapped) -> Res<()> {
        let b = [WsaBuf {
            len: len as u32,
            buf: self.local.as_ptr().wrapping_add(MAX),
        }];
        // SAFETY: as in `send`.
        unsafe { self.p.recv(self.sock, &b, ov) }
    }

    fn rdma(&self, len: usize, write: bool, ov: &Overlapped) -> Res<()> {
        let off = if write { 0 } else { MAX };
        let b = [WsaBufEx {
            len: len as u32,
            buf: self.local.as_ptr().wrapping_add(off),
            handle: self.handle as usize,
        }];
        // SAFETY: as in `send`.
        unsafe {
            if write {
                self.p.rdma_write(self.sock, &b, &self.peer, 0, 0, ov)
            } else {
                self.p.rdma_read(self.sock, &b, &self.peer, 0, 0, ov)
            }
        }
    }

    /// The measuring half of the send ping-pong; half round trip per sample.
    pub fn send_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        pin(self.core);
        let total = warmup(iters) + iters;
        let (rov, sov) = (Overlapped::new(POLLED), Overlapped::new(POLLED));
        let clock = Clock::start();
        let mut ticks = Vec::with_capacity(iters);
        self.recv(size, &rov)?;
        for i in 0..total {
            let t0 = clock.now();
            self.send(size, &sov)?;
            self.wait(&rov)?;
            let t = clock.now().saturating_sub(t0);
            if i + 1 < total {
                self.recv(size, &rov)?;
            }
            self.wait(&sov)?;
            if i >= warmup(iters) {
                ticks.push(t);
            }
        }
        Ok(clock.lat(&ticks, 0.5))
    }

    /// The echoing half of the send ping-pong; `ready` runs once the first
    /// receives are posted.
    ///
    /// Between seeing a message and answering it this side does nothing
    /// else, as the measuring half does nothing else between its send and
    /// its sample: two receives stay posted, so that the one the next
    /// message needs is there before the reply goes, and the receive a
    /// message used is replaced after the reply, while the peer works; a
    /// reply's own completion is reaped after the next reply (the peer
    /// acknowledges it with its next message).
    pub fn serve_send_lat(&self, size: usize, iters: usize, ready: impl FnOnce()) -> Res<()> {
        pin(self.core);
        let total = warmup(iters) + iters;
        let rov = [Overlapped::new(POLLED), Overlapped::new(POLLED)];
        let sov = [Overlapped::new(POLLED), Overlapped::new(POLLED)];
        for ov in rov.iter().take(total) {
            self.recv(size, ov)?;
        }
        ready();
        for i in 0..total {
            self.wait(&rov[i % 2])?;
            self.send(size, &sov[i % 2])?;
            // For round i + 2 (round i + 1's is posted). No op outlives the
            // loop (its record is on this stack).
            if i + 2 < total {
                self.recv(size, &rov[i % 2])?;
            }
            if i > 0 {
                self.wait(&sov[(i + 1) % 2])?;
            }
        }
        match total {
            0 => Ok(()),
            n => self.wait(&sov[(n - 1) % 2]).map(drop),
        }
    }

    fn mark(&self, size: usize, v: u8) {
        // SAFETY: in bounds of the local region; no op reads it now.
        unsafe { self.local.as_ptr().add(size - 1).write_volatile(v) }
    }

    /// Whether the peer's RDMA on this side's memory needs this side to
    /// poll (see `target_progress`).
    pub fn needs_target_progress(&self) -> bool {
        self.target_progress
    }

    /// Polls this side's socket once, so that the peer's RDMA on this
    /// side's memory makes progress (see `target_progress`).
    pub fn make_target_progress(&self) {
        self.p.progress_socket(self.sock);
    }

    /// Whether the peer's write of `v` into the last byte of the exposed
    /// buffer landed (making the progress it needs, see `target_progress`).
    fn landed(&self, size: usize, v: u8) -> bool {
        if self.target_progress {
            self.make_target_progress();
        }
        self.seen(size) == v
    }

    fn seen(&self, size: usize) -> u8 {
        // SAFETY: in bounds of the exposed region. The peer's NIC writes
        // it concurrently: this polls DMA-written memory, byte-sized.
        unsafe { self.exposed.as_ptr().add(size - 1).read_volatile() }
    }

    /// The measuring half of the write ping-pong: RDMA-writes the peer's
    /// exposed buffer and polls the last byte of its own; half round trip.
    pub fn write_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        pin(self.core);
        let size = size.max(1);
        let wov = Overlapped::new(POLLED);
        let clock = Clock::start();
        let mut ticks = Vec::with_capacity(iters);
        for i in 0..warmup(iters) + iters {
            let v = (i % 255) as u8 + 1;
            let t0 = clock.now();
            self.mark(size, v);
            self.rdma(size, true, &wov)?;
            // Memory only, as perftest: the write's own completion is
            // reaped after the sample.
            spin_until(self.yielding, || self.landed(size, v))?;
            let t = clock.now().saturating_sub(t0);
            self.wait(&wov)?;
            if i >= warmup(iters) {
                ticks.push(t);
            }
        }
        Ok(clock.lat(&ticks, 0.5))
    }

    /// The echoing half of the write ping-pong.
    pub fn serve_write_lat(&self, size: usize, iters: usize, ready: impl FnOnce()) -> Res<()> {
        pin(self.core);
        let size = size.max(1);
        let wov = Overlapped::new(POLLED);
        ready();
        for i in 0..warmup(iters) + iters {
            let v = (i % 255) as u8 + 1;
            spin_until(self.yielding, || self.landed(size, v))?;
            self.mark(size, v);
            self.rdma(size, true, &wov)?;
            self.wait(&wov)?;
        }
        Ok(())
    }

    /// RDMA read of the peer's buffer; full round trip per sample.
    pub fn read_lat(&self, size: usize, iters: usize) -> Res<Lat> {
        pin(self.core);
        let ov = Overlapped::new(POLLED);
        let clock = Clock::start();
        let mut ticks = Vec::with_capacity(iters);
        for i in 0..warmup(iters) + iters {
            let t0 = clock.now();
            self.rdma(size, false, &ov)?;
            self.wait(&ov)?;
            if i >= warmup(iters) {
                ticks.push(clock.now().saturating_sub(t0));
            }
        }
        Ok(clock.lat(&ticks, 1.0))
    }

    /// The receiving half of send_bw: keeps a window of receives posted
    /// until `msgs` arrived; `ready` runs once the first window is posted.
    pub fn serve_send_bw(&self, size: usize, msgs: usize, ready: impl FnOnce()) -> Res<()> {
        pin(self.core);
        let ovs: Vec<Overlapped> = (0..WINDOW).map(|_| Overlapped::new(POLLED)).collect();
        let mut posted = 0;
        for ov in &ovs {
            if posted < msgs {
                self.recv(size, ov)?;
                posted += 1;
            }
        }
        ready();
        for i in 0..msgs {
            let ov = &ovs[i % WINDOW];
            self.wait(ov)?;
            if posted < msgs {
                self.recv(size, ov)?;
                posted += 1;
            }
        }
        Ok(())
    }

    /// Sends `msgs` messages with `WINDOW` outstanding (pinned by the
    /// caller).
    pub fn send_window(&self, size: usize, msgs: usize) -> Res<()> {
        self.window(msgs, |ov| self.send(size, ov))
    }

    /// RDMA writes (or reads) of the peer's buffer with `WINDOW`
    /// outstanding; timed until the last completed.
    pub fn rdma_bw(&self, size: usize, msgs: usize, write: bool) -> Res<Bw> {
        pin(self.core);
        let t0 = Instant::now();
        self.window(msgs, |ov| self.rdma(size, write, ov))?;
        Ok(bw(size, msgs, t0))
    }

    /// Keeps `WINDOW` ops outstanding until `msgs` completed.
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
            self.wait(ov)?;
            if posted < msgs {
                post(ov)?;
                posted += 1;
            }
        }
        Ok(())
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Closes both sockets (aborting the server's last posted receive)
        // before the regions are unmapped.
        let _ = self.p.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// One-sided tests on the shm fabric in one process, run to completion
    /// (no engine thread polls for the target): the initiator's RDMA lands
    /// only if the target side polls, which `Bench` does for it. Bounded:
    /// without that progress the first op never completes. (The target's
    /// thread spins; on a loaded machine the test only takes longer.)
    #[test]
    fn one_sided_tests_on_shm_in_one_process_end() {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut c = Config::default();
            c.fabric.kind = FabricKind::Shm;
            tune(&mut c, Mode::Rtc);
            let b = Bench::new(c, None).expect("a connected pair on shm");
            let r = (
                b.write_bw(4096, 256).map(|bw| bw.msgs),
                b.read_bw(4096, 256).map(|bw| bw.msgs),
                b.read_lat(8, 50).map(|lat| lat.count()),
            );
            let _ = tx.send(r);
        });
        let (w, r, l) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("write_bw, read_bw and read_lat on shm ended within 60 s");
        assert_eq!(w.expect("write_bw"), 256);
        assert_eq!(r.expect("read_bw"), 256);
        assert_eq!(l.expect("read_lat"), 50);
    }
}
