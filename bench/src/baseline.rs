//! Baselines measured in the same run, on the same cores as the engine
//! figures they are printed beside: the cache-line ping-pong floor, memcpy
//! bandwidth, and the same patterns over TCP loopback.

use crate::stats::{Bw, Lat};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Cores of the two sides (`None`: not pinned).
pub type Cores = Option<(usize, usize)>;

pub fn pin(core: Option<usize>) {
    if let Some(id) = core {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// Spins until `done`; after many spins yields, so that two spinning
/// threads sharing one core still make progress (never on two cores: a
/// round trip is a few dozen spins).
fn spin_until(mut done: impl FnMut() -> bool) {
    let mut n = 0u32;
    while !done() {
        n = n.wrapping_add(1);
        if n > 1 << 14 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Half round trip of one cache line bounced between two threads: the
/// latency floor of any handoff between these two cores.
pub fn pingpong(cores: Cores, iters: usize) -> Lat {
    let line = Arc::new(AtomicU64::new(0));
    let l2 = line.clone();
    let n = iters as u64;
    let warm = n / 10;
    std::thread::scope(|sc| {
        sc.spawn(move || {
            pin(cores.map(|c| c.1));
            for i in 0..warm + n {
                spin_until(|| l2.load(Ordering::Acquire) == 2 * i + 1);
                l2.store(2 * i + 2, Ordering::Release);
            }
        });
        pin(cores.map(|c| c.0));
        let mut samples = Vec::with_capacity(iters);
        for i in 0..warm + n {
            let t0 = Instant::now();
            line.store(2 * i + 1, Ordering::Release);
            spin_until(|| line.load(Ordering::Acquire) == 2 * i + 2);
            if i >= warm {
                samples.push(t0.elapsed().as_nanos() as f64 / 2.0);
            }
        }
        Lat::new(samples)
    })
}

/// memcpy bandwidth at `size` between two buffers of that size, repeated
/// for at least `min_time` (the single-copy floor: the soft NIC copies
/// between registered buffers of the same sizes, also repeatedly).
pub fn memcpy_bw(size: usize, min_time: Duration) -> Bw {
    let size = size.max(1);
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    // Batches of about 1 MiB between clock reads.
    let batch = ((1 << 20) / size).max(1);
    let mut iters = 0usize;
    let t0 = Instant::now();
    loop {
        for _ in 0..batch {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
        iters += batch;
        if t0.elapsed() >= min_time {
            break;
        }
    }
    Bw {
        bytes: (size * iters) as u64,
        msgs: iters as u64,
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("tcp listen on loopback");
    let a = TcpStream::connect(l.local_addr().unwrap()).expect("tcp connect on loopback");
    let (b, _) = l.accept().unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

/// Ping-pong of `size` bytes over TCP loopback (TCP_NODELAY, blocking
/// sockets), the two sides on the same cores as the engine's: half round
/// trip, or full if `full`.
pub fn tcp_lat(cores: Cores, size: usize, iters: usize, full: bool) -> Lat {
    let (mut a, mut b) = tcp_pair();
    let size = size.max(1);
    let warm = iters / 10;
    std::thread::scope(|sc| {
        sc.spawn(move || {
            pin(cores.map(|c| c.1));
            let mut buf = vec![0u8; size];
            for _ in 0..warm + iters {
                b.read_exact(&mut buf).unwrap();
                b.write_all(&buf).unwrap();
            }
        });
        pin(cores.map(|c| c.0));
        let mut buf = vec![7u8; size];
        let mut samples = Vec::with_capacity(iters);
        for i in 0..warm + iters {
            let t0 = Instant::now();
            a.write_all(&buf).unwrap();
            a.read_exact(&mut buf).unwrap();
            let ns = t0.elapsed().as_nanos() as f64;
            if i >= warm {
                samples.push(if full { ns } else { ns / 2.0 });
            }
        }
        Lat::new(samples)
    })
}

/// One-way streaming of `size`-byte writes over TCP loopback for about
/// `min_time`, receiver on the other core.
pub fn tcp_bw(cores: Cores, size: usize, min_time: Duration) -> Bw {
    let (mut a, mut b) = tcp_pair();
    let size = size.max(1);
    std::thread::scope(|sc| {
        let rx = sc.spawn(move || {
            pin(cores.map(|c| c.1));
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            loop {
                let n = b.read(&mut buf).unwrap();
                if n == 0 {
                    return (got, Instant::now());
                }
                got += n as u64;
            }
        });
        pin(cores.map(|c| c.0));
        let buf = vec![3u8; size];
        let batch = ((1 << 20) / size).max(1);
        let mut msgs = 0u64;
        let t0 = Instant::now();
        while t0.elapsed() < min_time {
            for _ in 0..batch {
                a.write_all(&buf).unwrap();
            }
            msgs += batch as u64;
        }
        drop(a);
        let (got, t1) = rx.join().expect("tcp receiver");
        assert_eq!(got, msgs * size as u64, "tcp loopback lost bytes");
        Bw {
            bytes: got,
            msgs,
            secs: (t1 - t0).as_secs_f64(),
        }
    })
}
