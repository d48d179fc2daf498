//! stream_icount: one thread moves a stream of `--size`-byte writes through
//! a connected pair of the reference switch's streams (`sanpath::switch`)
//! on a private soft network, in run-to-completion mode, for counting what
//! a message costs under valgrind: instructions and locked instructions
//! (callgrind, as `tools/icount-gate` counts the engine's ops), bytes
//! copied (`memcpy`/`memmove` calls and their instructions), syscalls
//! (`strace -c`). Only the non-blocking calls can run on one thread, so
//! this is the copied path (INLINE up to the message buffer, the ring
//! above), whatever the size.
//!
//! Each message: `try_send` on the client until all of it is taken, each
//! attempt followed by `try_recv` on the server until it would block, so
//! the reader frees ring space as a second thread would. After `--warmup`
//! messages it sends `--msgs` more inside `measure_stream` (callgrind:
//! `--collect-atstart=no --toggle-collect='*measure_stream*'`), then prints
//! the reader's and writer's protocol counters (`Stream::stats`) per
//! message.
//!
//! With `--blocking 1`, a second thread reads (blocking `recv` of up to 1
//! MiB) while the first writes with blocking `write_all`, as `sanbench
//! stream_bw` does: the paths only blocking sends take (the direct ring
//! write from the application's buffer, and RDMA above the threshold), for
//! counting copies and syscalls per message (`strace -c -f`: `mincore` is
//! a registration; callgrind's memcpy instructions over the bytes moved,
//! since `rep movsb` counts one instruction per byte). Instruction counts
//! of this mode include the reader's polling, which depends on scheduling.
//!
//! With `--pingpong 1`, one thread plays both ends of `sanbench
//! stream_lat`'s ping-pong with the blocking calls it makes: the client's
//! `write_all`, the server's `read_exact` and `write_all` of the echo, the
//! client's `read_exact`; each message is on the peer's completion queue
//! before its reader asks, so no call waits, spins or sleeps, and the
//! counts are deterministic. Counts are per message (half a round trip);
//! this is the path the Soft-RoCE VM's stream latency takes, without the
//! empty polls of a reader that waits. The server's half is `echo`, whose
//! critical path `tools/crit-path` cuts out (built with the cargo feature
//! `marks`).
//!
//! `--reg-cache N` sets `SwitchOptions::reg_cache` (0: every transfer
//! registers its buffer and every DATA is staged in the send ring, the
//! switch before the cache).
//!
//! Usage: `stream_icount [--size B] [--msgs N] [--warmup N] [--blocking 0|1]
//! [--pingpong 0|1] [--reg-cache N]`.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::fabric::soft::SoftNetwork;
use sanpath::switch::proto::Stats;
use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream, SwitchOptions};
use sanpath::Config;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

type Res<T> = Result<T, String>;

struct Pair {
    client: Stream,
    server: Stream,
    /// Keeps the provider up while the streams live.
    _rt: Arc<Runtime>,
}

fn pair(reg_cache: Option<u16>) -> Res<Pair> {
    let e = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    let mut engine = Config::default();
    engine.poller.mode = PollerMode::RunToCompletion;
    engine.mem.mlock = MlockPolicy::Off;
    let ip = Ipv4Addr::new(198, 18, 252, 1);
    let rc = RuntimeConfig {
        switch: SwitchOptions {
            reg_cache,
            ..SwitchOptions::bounded(Duration::from_secs(10))
        },
        engine,
    };
    let nic = SoftNetwork::new()
        .attach(rc.engine.soft_nic(vec![ip]))
        .map_err(|e| e.to_string())?;
    let rt = Runtime::with_nic(rc, nic).map_err(e("runtime"))?;
    let listener = Listener::bind(&rt, SocketAddrV4::new(ip, 4792)).map_err(e("listen"))?;
    let addr = listener.local_addr();
    let (client, server) = std::thread::scope(|s| {
        let server = s.spawn(|| listener.accept().map(|(s, _)| s));
        let client = Stream::connect(&rt, addr);
        (client, server.join().expect("accepting thread"))
    });
    Ok(Pair {
        client: client.map_err(e("connect"))?,
        server: server.map_err(e("accept"))?,
        _rt: rt,
    })
}

/// Reads on the server until it would block; returns the bytes read.
fn drain(s: &Stream, buf: &mut [u8]) -> Res<usize> {
    let mut got = 0;
    loop {
        match s.try_recv(buf) {
            Ok(0) => return Err("end of stream".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(got),
            Err(e) => return Err(format!("try_recv: {e}")),
        }
    }
}

/// Moves one message of `msg.len()` bytes from client to server.
fn one(p: &Pair, msg: &[u8], sink: &mut [u8]) -> Res<()> {
    let (mut sent, mut got) = (0, 0);
    let mut tries = 0;
    while got < msg.len() {
        if sent < msg.len() {
            match p.client.try_send(&msg[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("try_send: {e}")),
            }
        }
        got += drain(&p.server, sink)?;
        tries += 1;
        if tries > 1_000_000 {
            return Err(format!("stuck: {sent} sent, {got} read"));
        }
    }
    Ok(())
}

#[inline(never)]
fn measure_stream(p: &Pair, msgs: usize, msg: &[u8], sink: &mut [u8]) -> Res<()> {
    (0..msgs).try_for_each(|_| one(p, msg, sink))
}

/// Reads `total` bytes on the server with blocking receives (callgrind:
/// `--toggle-collect='*read_all*'` too, for the reader's thread).
#[inline(never)]
fn read_all(s: &Stream, total: usize, sink: &mut [u8]) -> Res<()> {
    let mut got = 0;
    while got < total {
        match s.recv(sink) {
            Ok(0) => return Err("end of stream".into()),
            Ok(n) => got += n,
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    Ok(())
}

/// `msgs` blocking writes of `msg` while another thread reads them.
#[inline(never)]
fn measure_stream_blocking(p: &Pair, msgs: usize, msg: &[u8], sink: &mut [u8]) -> Res<()> {
    let mut c = &p.client;
    std::thread::scope(|sc| {
        let reader = sc.spawn(|| read_all(&p.server, msgs * msg.len(), sink));
        for _ in 0..msgs {
            c.write_all(msg).map_err(|e| format!("write_all: {e}"))?;
        }
        reader.join().map_err(|_| "reader panicked".to_string())?
    })
}

/// One round trip of `buf` as `sanbench stream_lat` makes it, both ends on
/// this thread: two messages.
fn round_trip(p: &Pair, buf: &mut [u8]) -> Res<()> {
    ping(&p.client, buf)?;
    echo(&p.server, buf)?;
    let mut c = &p.client;
    c.read_exact(buf)
        .map_err(|e| format!("client read_exact: {e}"))
}

/// The client's message of a round trip (`tools/crit-path` zeroes
/// callgrind's counts at its entry: what it publishes is not the path
/// measured).
#[inline(never)]
fn ping(mut c: &Stream, buf: &[u8]) -> Res<()> {
    c.write_all(buf)
        .map_err(|e| format!("client write_all: {e}"))
}

/// The server's half round trip: reads the message, writes it back. From
/// its entry to the store that publishes the reply (the soft fabric's
/// `perf_marks::published`, with the cargo feature `marks`) is the
/// critical path `tools/crit-path` counts as `crit_stream`; what the reply's
/// calls do after that store overlaps the peer's half.
#[inline(never)]
fn echo(mut s: &Stream, buf: &mut [u8]) -> Res<()> {
    s.read_exact(buf)
        .map_err(|e| format!("server read_exact: {e}"))?;
    s.write_all(buf)
        .map_err(|e| format!("server write_all: {e}"))
}

/// `msgs` messages of the ping-pong (`msgs / 2` round trips).
#[inline(never)]
fn measure_stream_pingpong(p: &Pair, msgs: usize, buf: &mut [u8]) -> Res<()> {
    (0..msgs / 2).try_for_each(|_| round_trip(p, buf))
}

fn run() -> Res<()> {
    let usage = || {
        "usage: stream_icount [--size B] [--msgs N] [--warmup N] [--blocking 0|1] \
         [--pingpong 0|1] [--reg-cache N]"
            .to_string()
    };
    let (mut size, mut msgs, mut warmup, mut blocking) = (65536usize, 100usize, 20usize, false);
    let mut pingpong = false;
    let mut reg_cache = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: usize = it.next().and_then(|v| v.parse().ok()).ok_or_else(usage)?;
        match flag.as_str() {
            "--size" => size = v.max(1),
            "--msgs" => msgs = v,
            "--warmup" => warmup = v,
            "--blocking" => blocking = v != 0,
            "--pingpong" => pingpong = v != 0,
            "--reg-cache" => reg_cache = Some(u16::try_from(v).map_err(|_| usage())?),
            _ => return Err(usage()),
        }
    }
    let p = pair(reg_cache)?;
    let msg = vec![5u8; size];
    let mut sink = vec![0u8; 1 << 20];
    let mut echo = msg.clone();
    if pingpong {
        measure_stream_pingpong(&p, warmup, &mut echo)?;
    } else if blocking {
        measure_stream_blocking(&p, warmup, &msg, &mut sink)?;
    } else {
        for _ in 0..warmup {
            one(&p, &msg, &mut sink)?;
        }
    }
    let (c0, s0) = (p.client.stats(), p.server.stats());
    if pingpong {
        measure_stream_pingpong(&p, msgs, &mut echo)?;
    } else if blocking {
        measure_stream_blocking(&p, msgs, &msg, &mut sink)?;
    } else {
        measure_stream(&p, msgs, &msg, &mut sink)?;
    }
    let (c1, s1) = (p.client.stats(), p.server.stats());
    let per = |a: u64, b: u64| (b - a) as f64 / msgs.max(1) as f64;
    if pingpong {
        // Both ends write and read: the protocol messages of both per
        // payload message.
        let both = |f: fn(&Stats) -> u64| per(f(&c0) + f(&s0), f(&c1) + f(&s1));
        println!(
            "per {size} B message of the ping-pong: {:.2} protocol messages sent ({:.2} DATA/INLINE, \
             {:.2} INLINE, {:.2} CREDIT, {:.2} NEED), {:.0} B copied in, {:.0} B copied out",
            both(|s| s.msgs_sent),
            both(|s| s.data_msgs),
            both(|s| s.inline_msgs),
            both(|s| s.credit_msgs),
            both(|s| s.need_msgs),
            both(|s| s.bytes_copied_in),
            both(|s| s.bytes_copied_out),
        );
        return Ok(());
    }
    println!(
        "per {size} B message: writer copied {:.0} B into its rings, wrote {:.0} B straight from \
         the application's buffer, moved {:.0} B by RDMA ({:.2} reads, {:.2} offers); reader \
         copied {:.0} B out, moved {:.0} B by RDMA ({:.2} reads)",
        per(c0.bytes_copied_in, c1.bytes_copied_in),
        per(c0.bytes_direct, c1.bytes_direct),
        per(c0.bytes_rdma, c1.bytes_rdma),
        per(c0.rdma_reads, c1.rdma_reads),
        per(c0.read_offers, c1.read_offers),
        per(s0.bytes_copied_out, s1.bytes_copied_out),
        per(s0.bytes_rdma, s1.bytes_rdma),
        per(s0.rdma_reads, s1.rdma_reads),
    );
    println!(
        "per {size} B message: writer sent {:.2} messages ({:.2} DATA/INLINE, {:.2} CREDIT, {:.2} NEED), \
         reader sent {:.2} ({:.2} CREDIT, {:.2} NEED)",
        per(c0.msgs_sent, c1.msgs_sent),
        per(c0.data_msgs, c1.data_msgs),
        per(c0.credit_msgs, c1.credit_msgs),
        per(c0.need_msgs, c1.need_msgs),
        per(s0.msgs_sent, s1.msgs_sent),
        per(s0.credit_msgs, s1.credit_msgs),
        per(s0.need_msgs, s1.need_msgs),
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("stream_icount: {e}");
        std::process::exit(1);
    }
}
