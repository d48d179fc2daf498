//! Baselines measured in the same run: the cache-line ping-pong floor,
//! memcpy bandwidth, and the same patterns over TCP loopback.

use crate::stats::{Bw, Lat};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn pin(core: usize) {
    core_affinity::set_for_current(core_affinity::CoreId { id: core });
}

/// Half round trip of one cache line bounced between two threads.
pub fn pingpong(cores: (usize, usize), iters: usize) -> Lat {
    let line = Arc::new(AtomicU64::new(0));
    let l2 = line.clone();
    let n = iters as u64;
    let t = std::thread::spawn(move || {
        pin(cores.1);
        for i in 0..n {
            while l2.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            l2.store(2 * i + 2, Ordering::Release);
        }
    });
    pin(cores.0);
    let mut samples = Vec::with_capacity(iters);
    for i in 0..n {
        let t0 = Instant::now();
        line.store(2 * i + 1, Ordering::Release);
        while line.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
        samples.push(t0.elapsed().as_nanos() as f64 / 2.0);
    }
    t.join().unwrap();
    Lat::new(samples)
}

/// memcpy bandwidth at `size` (the single-copy floor).
pub fn memcpy_bw(size: usize, iters: usize) -> Bw {
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    let iters = iters.clamp(16, (4usize << 30) / size.max(1)).max(16);
    let t0 = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
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

/// Ping-pong of `size` bytes over TCP loopback: half round trip (full if
/// `full`).
pub fn tcp_lat(size: usize, iters: usize, full: bool) -> Lat {
    let (mut a, mut b) = tcp_pair();
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        for _ in 0..iters {
            b.read_exact(&mut buf).unwrap();
            b.write_all(&buf).unwrap();
        }
    });
    let mut buf = vec![7u8; size];
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        a.write_all(&buf).unwrap();
        a.read_exact(&mut buf).unwrap();
        let ns = t0.elapsed().as_nanos() as f64;
        samples.push(if full { ns } else { ns / 2.0 });
    }
    t.join().unwrap();
    Lat::new(samples)
}

/// One-way streaming of `total` bytes in `size` writes over TCP loopback.
pub fn tcp_bw(size: usize, total: usize) -> Bw {
    let (mut a, mut b) = tcp_pair();
    // Bounded message count: tiny sizes would otherwise be millions of
    // syscalls for no better estimate.
    let msgs = (total / size).clamp(1, 200_000);
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut left = msgs * size;
        while left > 0 {
            let n = b.read(&mut buf[..left.min(1 << 20)]).unwrap();
            assert!(n > 0, "tcp peer closed early");
            left -= n;
        }
    });
    let buf = vec![3u8; size];
    let t0 = Instant::now();
    for _ in 0..msgs {
        a.write_all(&buf).unwrap();
    }
    t.join().unwrap();
    Bw {
        bytes: (msgs * size) as u64,
        msgs: msgs as u64,
        secs: t0.elapsed().as_secs_f64(),
    }
}
