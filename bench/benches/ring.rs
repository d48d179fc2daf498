//! The completion ring (poller → front end) against crossbeam's ArrayQueue
//! and crossbeam-channel, in one group each: single handoff latency (one
//! item bounced between two threads through two queues, per round trip)
//! and batch throughput (one producer, one consumer, batches of 32; the
//! crossbeam queues have no batch API, so they move one item at a time, and
//! so does `sanpath_ring_one_by_one` to show what batching alone is worth).
//!
//! Targets (issue 6): the ring's round trip within 1.2x of the cache-line
//! floor, its batch throughput at least 2x ArrayQueue's. Run with
//! `cargo bench -p sanpath-bench --bench ring`; the two sides are pinned to
//! cores 0 and 1.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use std::hint::spin_loop;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 32;

fn pin(core: usize) {
    core_affinity::set_for_current(core_affinity::CoreId { id: core });
}

/// Runs `iters` round trips: `send` to the echo thread, `recv` the echo.
fn round_trips<A: Send + 'static, B: Send + 'static>(
    iters: u64,
    (mut to, mut from_echo): (A, B),
    echo: impl FnOnce(u64) + Send + 'static,
    mut step: impl FnMut(&mut A, &mut B, u64),
) -> Duration {
    let t = std::thread::spawn(move || {
        pin(1);
        echo(iters)
    });
    pin(0);
    let t0 = Instant::now();
    for i in 0..iters {
        step(&mut to, &mut from_echo, i);
    }
    let d = t0.elapsed();
    t.join().unwrap();
    d
}

fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff_round_trip");
    // The floor: one cache line bounced between the same two threads.
    g.bench_function("cache_line_floor", |b| {
        b.iter_custom(|iters| {
            let line = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let l2 = line.clone();
            let echo = move |n: u64| {
                for i in 0..n {
                    while l2.load(std::sync::atomic::Ordering::Acquire) != 2 * i + 1 {
                        spin_loop();
                    }
                    l2.store(2 * i + 2, std::sync::atomic::Ordering::Release);
                }
            };
            round_trips(iters, (line, ()), echo, |l, _, i| {
                l.store(2 * i + 1, std::sync::atomic::Ordering::Release);
                while l.load(std::sync::atomic::Ordering::Acquire) != 2 * i + 2 {
                    spin_loop();
                }
            })
        })
    });
    g.bench_function("sanpath_ring", |b| {
        b.iter_custom(|iters| {
            let (p1, mut c1) = sanpath::ring::channel::<u64>(64);
            let (mut p2, c2) = sanpath::ring::channel::<u64>(64);
            let echo = move |n: u64| {
                for _ in 0..n {
                    let v = loop {
                        if let Some(v) = c1.pop() {
                            break v;
                        }
                        spin_loop();
                    };
                    while p2.push(v).is_err() {
                        spin_loop();
                    }
                }
            };
            round_trips(iters, (p1, c2), echo, |p, c, i| {
                while p.push(i).is_err() {
                    spin_loop();
                }
                while c.pop().is_none() {
                    spin_loop();
                }
            })
        })
    });
    g.bench_function("crossbeam_array_queue", |b| {
        b.iter_custom(|iters| {
            let (q1, q2) = (Arc::new(ArrayQueue::new(64)), Arc::new(ArrayQueue::new(64)));
            let (e1, e2) = (q1.clone(), q2.clone());
            let echo = move |n: u64| {
                for _ in 0..n {
                    let v = loop {
                        if let Some(v) = e1.pop() {
                            break v;
                        }
                        spin_loop();
                    };
                    while e2.push(v).is_err() {
                        spin_loop();
                    }
                }
            };
            round_trips(iters, (q1, q2), echo, |a, b, i| {
                while a.push(i).is_err() {
                    spin_loop();
                }
                while b.pop().is_none() {
                    spin_loop();
                }
            })
        })
    });
    g.bench_function("crossbeam_channel", |b| {
        b.iter_custom(|iters| {
            let (s1, r1) = crossbeam_channel::bounded::<u64>(64);
            let (s2, r2) = crossbeam_channel::bounded::<u64>(64);
            let echo = move |n: u64| {
                for _ in 0..n {
                    s2.send(r1.recv().unwrap()).unwrap();
                }
            };
            round_trips(iters, (s1, r2), echo, |s, r, i| {
                s.send(i).unwrap();
                r.recv().unwrap();
            })
        })
    });
    g.finish();
}

fn batch(c: &mut Criterion) {
    let n: u64 = 1 << 20;
    let mut g = c.benchmark_group("batch_throughput");
    g.throughput(Throughput::Elements(n));
    g.bench_function("sanpath_ring", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut p, mut c) = sanpath::ring::channel::<u64>(1024);
                let t = std::thread::spawn(move || {
                    pin(1);
                    let items = [7u64; BATCH];
                    let mut sent = 0;
                    while sent < n {
                        let k = ((n - sent) as usize).min(BATCH);
                        sent += p.push_slice(&items[..k]) as u64;
                    }
                });
                pin(0);
                let t0 = Instant::now();
                let mut buf = [0u64; BATCH];
                let mut got = 0;
                while got < n {
                    got += c.pop_into(&mut buf) as u64;
                }
                total += t0.elapsed();
                t.join().unwrap();
            }
            total
        })
    });
    // The same ring one item at a time: how much of its lead is batching.
    g.bench_function("sanpath_ring_one_by_one", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut p, mut c) = sanpath::ring::channel::<u64>(1024);
                let t = std::thread::spawn(move || {
                    pin(1);
                    for _ in 0..n {
                        while p.push(7).is_err() {
                            spin_loop();
                        }
                    }
                });
                pin(0);
                let t0 = Instant::now();
                let mut got = 0;
                while got < n {
                    if c.pop().is_some() {
                        got += 1;
                    }
                }
                total += t0.elapsed();
                t.join().unwrap();
            }
            total
        })
    });
    g.bench_function("crossbeam_array_queue", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let q = Arc::new(ArrayQueue::new(1024));
                let q2 = q.clone();
                let t = std::thread::spawn(move || {
                    pin(1);
                    for _ in 0..n {
                        while q2.push(7u64).is_err() {
                            spin_loop();
                        }
                    }
                });
                pin(0);
                let t0 = Instant::now();
                let mut got = 0;
                while got < n {
                    if q.pop().is_some() {
                        got += 1;
                    }
                }
                total += t0.elapsed();
                t.join().unwrap();
            }
            total
        })
    });
    g.bench_function("crossbeam_channel", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (s, r) = crossbeam_channel::bounded::<u64>(1024);
                let t = std::thread::spawn(move || {
                    pin(1);
                    for _ in 0..n {
                        s.send(7).unwrap();
                    }
                });
                pin(0);
                let t0 = Instant::now();
                for _ in 0..n {
                    r.recv().unwrap();
                }
                total += t0.elapsed();
                t.join().unwrap();
            }
            total
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! { name = benches; config = config(); targets = handoff, batch }
criterion_main!(benches);
