//! icount: the engine's single-thread run-to-completion data path, one
//! operation kind at a time, for counting instructions per op under
//! valgrind (`tools/icount-gate` runs it under callgrind).
//!
//! One thread drives both ends of a connected socket pair on a private soft
//! network, in run-to-completion mode, through the public SPI only (the
//! soft NIC executes a work request in the posting thread, so nothing else
//! runs while an op is in flight). After `--warmup` ops it runs `--ops` more
//! inside `measure_OP`, a function of its own: callgrind, started with
//! collection off and `--toggle-collect` on that function, counts exactly
//! the instructions of those ops, all engine code they reach included.
//!
//! Operations (8-byte messages, completions through the switch upcall, as
//! an overlapped record without `hEvent` bit 0 reports them):
//! - `send_recv`: post a receive on one end, a send on the other, wait for
//!   both completions (`get_overlapped_result` with `fWait`);
//! - `rdma_write`, `rdma_read`: one RDMA op into / from the peer's exposed
//!   buffer, wait for its completion.
//!
//! `--fabric shm` runs the same pair over the shared-memory fabric (one
//! NIC of this process connected to itself through its Unix socket, in a
//! private runtime directory): its cell rings, key checks and completions,
//! without a second process (the receive side's copies are the same code).
//!
//! With the cargo feature `marks` (`tools/crit-path`), two more: the
//! critical path of a ping-pong's half round trip, cut where the engine
//! marks the op visible to its peer:
//! - `crit_send`: the echoing side finds the peer's message (its previous
//!   reply still unreaped, as in a ping-pong), then posts its reply;
//! - `crit_write`: one RDMA write, up to its copy into the peer's memory.
//!
//! Usage: `icount OP [--ops N] [--warmup N] [--fabric soft|shm]`; with the cargo feature
//! `slowdown` also `[--slowdown K] [--slowdown-locks L]` (the engine's
//! test-only extra work and extra locked instructions, see
//! `sanpath::perf_gate_slowdown`). Prints nothing on success; exits 1 with
//! the reason on any error.

use sanpath::config::{FabricKind, MlockPolicy, PollerMode};
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::testkit::{self, CompletingSwitch};
use sanpath::Config;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

/// Bytes each op moves.
const SIZE: u32 = 8;
/// Bytes of each registered buffer.
const BUF: usize = 1 << 16;
/// `hEvent` 0: completion reported by the `complete_overlapped_request` upcall.
const UPCALL: usize = 0;

/// The operations this harness measures (the names `tools/icount-gate` uses).
const OPS: [&str; 3] = ["send_recv", "rdma_write", "rdma_read"];
/// The critical paths it cuts out with the cargo feature `marks`.
const CRIT_OPS: [&str; 2] = ["crit_send", "crit_write"];

/// A connected pair on a private soft network, with registered buffers.
struct Pair {
    p: Provider,
    client: ProviderSocket,
    server: ProviderSocket,
    /// Client buffer: send and RDMA source/sink, registered as `handle`.
    client_buf: Region,
    handle: usize,
    /// Server buffer: receive sink at 0, exposed for RDMA at `BUF / 2`.
    server_buf: Region,
    descriptor: Vec<u8>,
    /// The target of an RDMA op must poll for it to happen (shm: the owner
    /// of the memory makes the copy when it polls).
    target_polls: bool,
    /// `crit_send`: the server's replies, one per round in turn, and the
    /// rounds run; a reply is reaped in the next round, after the step.
    #[cfg(feature = "marks")]
    replies: [Overlapped; 2],
    #[cfg(feature = "marks")]
    rounds: std::cell::Cell<usize>,
}

type Res<T> = Result<T, String>;

fn wsa(what: &'static str) -> impl Fn(sanpath::WsaError) -> String {
    move |e| format!("{what}: {e}")
}

impl Pair {
    fn new(fabric: &Fabric) -> Res<Pair> {
        let mut config = Config::default();
        config.poller.mode = PollerMode::RunToCompletion;
        // One CQ per socket, as sanbench's run-to-completion mode has it.
        config.poller.count = 2;
        config.mem.mlock = MlockPolicy::Off;
        let ip = Ipv4Addr::new(198, 18, 253, 1);
        let p = match fabric {
            Fabric::Soft => {
                let (p, _nic, _net) =
                    testkit::soft_provider(config, ip, Arc::new(CompletingSwitch))?;
                p
            }
            Fabric::Shm(dir) => {
                config.fabric.kind = FabricKind::Shm;
                config.fabric.shm.addresses = vec![ip];
                config.fabric.shm.runtime_dir = dir.path.display().to_string();
                let p = Provider::new(config).map_err(|e| e.to_string())?;
                p.startup(WSD_VERSION, Arc::new(CompletingSwitch), 1)
                    .map_err(wsa("startup"))?;
                p
            }
        };
        let (client, server) =
            testkit::connected_pair(&p, SocketAddrV4::new(ip, 4791)).map_err(wsa("connect"))?;
        let client_buf = Region::new(BUF, MlockPolicy::Off).map_err(|e| e.to_string())?;
        let server_buf = Region::new(BUF, MlockPolicy::Off).map_err(|e| e.to_string())?;
        let mut descriptor = vec![0u8; RDMA_DESCRIPTOR_LEN];
        // SAFETY: both regions live in the Pair, whose Drop cleans the
        // provider up (closing the sockets) before they are unmapped.
        let handle = unsafe {
            p.register_memory(server, server_buf.as_ptr(), BUF as u32 / 2, MEM_READWRITE)
                .map_err(wsa("register the receive buffer"))?;
            p.register_rdma_memory(
                server,
                server_buf.as_ptr().wrapping_add(BUF / 2),
                BUF as u32 / 2,
                MEM_READWRITE,
                &mut descriptor,
            )
            .map_err(wsa("expose the RDMA buffer"))?;
            p.register_memory(client, client_buf.as_ptr(), BUF as u32, MEM_READWRITE)
                .map_err(wsa("register the client buffer"))?
        };
        Ok(Pair {
            p,
            client,
            server,
            client_buf,
            handle: handle as usize,
            server_buf,
            descriptor,
            target_polls: matches!(fabric, Fabric::Shm(_)),
            #[cfg(feature = "marks")]
            replies: [Overlapped::new(UPCALL), Overlapped::new(UPCALL)],
            #[cfg(feature = "marks")]
            rounds: std::cell::Cell::new(0),
        })
    }

    /// Waits for `ov` as a switch does (`WSPGetOverlappedResult`, `fWait`);
    /// checks it moved `SIZE` bytes.
    fn wait(&self, s: ProviderSocket, ov: &Overlapped) -> Res<()> {
        match self.p.get_overlapped_result(s, ov, true) {
            Ok((SIZE, _)) => Ok(()),
            Ok((n, _)) => Err(format!("an op moved {n} bytes, not {SIZE}")),
            Err(e) => Err(format!("an op failed: {e}")),
        }
    }

    fn send_recv(&self) -> Res<()> {
        let (rov, sov) = (Overlapped::new(UPCALL), Overlapped::new(UPCALL));
        let rb = [WsaBuf {
            len: SIZE,
            buf: self.server_buf.as_ptr(),
        }];
        let sb = [WsaBuf {
            len: SIZE,
            buf: self.client_buf.as_ptr(),
        }];
        // SAFETY: the buffers live in `self`; both records are waited for
        // below before they go out of scope.
        unsafe {
            self.p.recv(self.server, &rb, &rov).map_err(wsa("recv"))?;
            self.p
                .send(self.client, &sb, 0, &sov)
                .map_err(wsa("send"))?;
        }
        // The receive first: its CQ's consumer is who moves the message (a
        // sender left waiting alone takes over only after a while, see the
        // soft fabric's `link::HELP_AFTER`).
        self.wait(self.server, &rov)?;
        self.wait(self.client, &sov)
    }

    fn rdma(&self, write: bool) -> Res<()> {
        let ov = Overlapped::new(UPCALL);
        let b = [WsaBufEx {
            len: SIZE,
            buf: self.client_buf.as_ptr(),
            handle: self.handle,
        }];
        let (p, d) = (&self.p, &self.descriptor);
        // SAFETY: as in `send_recv`.
        unsafe {
            if write {
                p.rdma_write(self.client, &b, d, 0, 0, &ov)
                    .map_err(wsa("rdma_write"))?
            } else {
                p.rdma_read(self.client, &b, d, 0, 0, &ov)
                    .map_err(wsa("rdma_read"))?
            }
        }
        if self.target_polls {
            p.progress_socket(self.server);
        }
        self.wait(self.client, &ov)
    }

    /// One round of `crit_send`, in the state of a ping-pong's: the
    /// client's message waits at the server, and acknowledges the server's
    /// reply of the round before, not reaped yet (as a ping-pong's echoing
    /// side reaps it once it answered); [`crit_send_step`] is the server's
    /// half round trip. Never inlined: callgrind zeroes its counts at its
    /// entry too.
    #[cfg(feature = "marks")]
    #[inline(never)]
    fn crit_send(&self) -> Res<()> {
        let round = self.rounds.get();
        self.rounds.set(round + 1);
        let (crov, csov, srov) = (
            Overlapped::new(UPCALL),
            Overlapped::new(UPCALL),
            Overlapped::new(UPCALL),
        );
        let buf = |r: &Region| {
            [WsaBuf {
                len: SIZE,
                buf: r.as_ptr(),
            }]
        };
        let (cb, sb) = (buf(&self.client_buf), buf(&self.server_buf));
        let (reply, last) = (&self.replies[round % 2], &self.replies[(round + 1) % 2]);
        // SAFETY: as in `send_recv`: every record is waited for below, the
        // replies (in `self`) at the next round or in `Drop`.
        unsafe {
            self.p.recv(self.client, &cb, &crov).map_err(wsa("recv"))?;
            self.p.recv(self.server, &sb, &srov).map_err(wsa("recv"))?;
            self.p
                .send(self.client, &cb, 0, &csov)
                .map_err(wsa("send"))?;
            crit_send_step(self, &srov, &sb, reply)?;
        }
        if round > 0 {
            self.wait(self.server, last)?;
        }
        self.wait(self.client, &crov)?;
        self.wait(self.client, &csov)
    }

    fn one(&self, op: &str) -> Res<()> {
        match op {
            "send_recv" => self.send_recv(),
            "rdma_write" => self.rdma(true),
            #[cfg(feature = "marks")]
            "crit_send" => self.crit_send(),
            #[cfg(feature = "marks")]
            "crit_write" => crit_write_step(self),
            _ => self.rdma(false),
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        #[cfg(feature = "marks")]
        if let Some(round) = self.rounds.get().checked_sub(1) {
            let _ = self.wait(self.server, &self.replies[round % 2]);
        }
        let _ = self.p.cleanup();
    }
}

// The measured loops: one function per op, never inlined, so that
// callgrind's `--toggle-collect=*measure_OP*` finds each by name.

#[inline(never)]
fn measure_send_recv(pair: &Pair, ops: usize) -> Res<()> {
    (0..ops).try_for_each(|_| pair.send_recv())
}

#[inline(never)]
fn measure_rdma_write(pair: &Pair, ops: usize) -> Res<()> {
    (0..ops).try_for_each(|_| pair.rdma(true))
}

#[inline(never)]
fn measure_rdma_read(pair: &Pair, ops: usize) -> Res<()> {
    (0..ops).try_for_each(|_| pair.rdma(false))
}

// The critical paths (`tools/crit-path`, with the cargo feature `marks`):
// callgrind zeroes its counts at the entry of a step and dumps them where
// the engine marks the op visible to its peer (`perf_marks::published`).

/// The receiver's half of a send ping-pong, from the look at its CQ that
/// finds the peer's message waiting to the store that publishes the reply.
///
/// # Safety
/// `rov` must be posted on the server; `ssov` and `sb` outlive the reply.
#[cfg(feature = "marks")]
#[inline(never)]
unsafe fn crit_send_step(
    pair: &Pair,
    rov: &Overlapped,
    sb: &[WsaBuf],
    ssov: &Overlapped,
) -> Res<()> {
    pair.wait(pair.server, rov)?;
    // SAFETY: forwarded caller contract.
    unsafe { pair.p.send(pair.server, sb, 0, ssov) }.map_err(wsa("send"))
}

/// The writer's half of a write ping-pong, from the call of `rdma_write` to
/// the store of the bytes into the peer's memory (then, not cut off, its
/// completion is reaped).
#[cfg(feature = "marks")]
#[inline(never)]
fn crit_write_step(pair: &Pair) -> Res<()> {
    pair.rdma(true)
}

/// A runtime directory of this process's own, removed at exit.
struct RuntimeDir {
    path: std::path::PathBuf,
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

enum Fabric {
    Soft,
    Shm(RuntimeDir),
}

struct Args {
    op: String,
    fabric: Fabric,
    ops: usize,
    warmup: usize,
    #[cfg(feature = "slowdown")]
    slowdown: u32,
    #[cfg(feature = "slowdown")]
    slowdown_locks: u32,
}

fn parse() -> Res<Args> {
    let usage = || {
        let slow = if cfg!(feature = "slowdown") {
            " [--slowdown K] [--slowdown-locks L]"
        } else {
            ""
        };
        format!(
            "usage: icount {{{}}} [--ops N] [--warmup N] [--fabric soft|shm]{slow}",
            OPS.join("|")
        )
    };
    let mut it = std::env::args().skip(1);
    let op = it.next().filter(|o| {
        OPS.contains(&o.as_str()) || cfg!(feature = "marks") && CRIT_OPS.contains(&o.as_str())
    });
    let mut a = Args {
        op: op.ok_or_else(usage)?,
        fabric: Fabric::Soft,
        ops: 1000,
        warmup: 100,
        #[cfg(feature = "slowdown")]
        slowdown: 0,
        #[cfg(feature = "slowdown")]
        slowdown_locks: 0,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(usage)?;
        let n = || value.parse::<usize>().map_err(|_| usage());
        match flag.as_str() {
            "--ops" => a.ops = n()?,
            "--warmup" => a.warmup = n()?,
            "--fabric" if value == "soft" => a.fabric = Fabric::Soft,
            "--fabric" if value == "shm" => {
                let path = std::env::temp_dir().join(format!("icount-{}", std::process::id()));
                std::fs::create_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                a.fabric = Fabric::Shm(RuntimeDir { path });
            }
            #[cfg(feature = "slowdown")]
            "--slowdown" => a.slowdown = value.parse().map_err(|_| usage())?,
            #[cfg(feature = "slowdown")]
            "--slowdown-locks" => a.slowdown_locks = value.parse().map_err(|_| usage())?,
            _ => return Err(usage()),
        }
    }
    Ok(a)
}

fn run() -> Res<()> {
    let a = parse()?;
    // Dropped before `a`, whose runtime directory it uses.
    let pair = Pair::new(&a.fabric)?;
    for _ in 0..a.warmup {
        pair.one(&a.op)?;
    }
    #[cfg(feature = "slowdown")]
    {
        sanpath::perf_gate_slowdown::set_extra_work(a.slowdown);
        sanpath::perf_gate_slowdown::set_extra_locks(a.slowdown_locks);
    }
    match a.op.as_str() {
        "send_recv" => measure_send_recv(&pair, a.ops),
        "rdma_write" => measure_rdma_write(&pair, a.ops),
        "rdma_read" => measure_rdma_read(&pair, a.ops),
        op => (0..a.ops).try_for_each(|_| pair.one(op)),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("icount: {e}");
        std::process::exit(1);
    }
}
