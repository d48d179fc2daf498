//! loom models of the completion ring: in every interleaving of one producer
//! and one consumer (and every reordering the memory model allows), items
//! arrive in order, none is lost or duplicated, and no slot is read before
//! it is published or overwritten before it is read (loom checks every
//! `UnsafeCell` access against the happens-before order).
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p sanpath --test loom_ring --release`
//! (add `-- --nocapture` to see how many executions each model explored).
#![cfg(loom)]

use loom::thread;
use sanpath::ring::channel;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Runs `body` under loom's exhaustive scheduler and prints how many
/// executions it explored and how long that took.
fn model(name: &str, body: impl Fn() + Sync + Send + 'static) {
    // A std atomic on purpose: loom must not model the counter itself.
    let executions = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&executions);
    let start = Instant::now();
    loom::model(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        body();
    });
    eprintln!(
        "loom model {name}: {} executions in {:.2?}",
        executions.load(Ordering::Relaxed),
        start.elapsed()
    );
}

/// (a) A batch publish of two items then a single push; the consumer pops
/// one at a time until it has all three.
#[test]
fn batch_publish_then_single_pops_keep_order() {
    model("batch_publish_then_single_pops_keep_order", || {
        let (mut p, mut c) = channel::<u32>(4);
        let producer = thread::spawn(move || {
            assert_eq!(p.push_slice(&[1, 2]), 2);
            assert_eq!(p.push(3), Ok(()));
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match c.pop() {
                Some(v) => got.push(v),
                None => thread::yield_now(),
            }
        }
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(c.pop(), None);
        producer.join().unwrap();
    });
}

/// (b) A capacity-2 ring filled to full by one batch, then refilled item by
/// item while the consumer drains it in batches: the producer must see the
/// consumer's frees, and slots are reused only after they were read.
#[test]
fn full_ring_drains_and_refills_concurrently() {
    model("full_ring_drains_and_refills_concurrently", || {
        let (mut p, mut c) = channel::<u32>(2);
        let producer = thread::spawn(move || {
            assert_eq!(p.push_slice(&[0, 1, 2]), 2, "an empty ring takes 2");
            let mut next = 2;
            while next < 4 {
                match p.push(next) {
                    Ok(()) => next += 1,
                    Err(_) => thread::yield_now(),
                }
            }
        });
        let mut buf = [u32::MAX; 2];
        let mut expect = 0;
        while expect < 4 {
            let n = c.pop_into(&mut buf);
            if n == 0 {
                thread::yield_now();
            }
            for v in &buf[..n] {
                assert_eq!(*v, expect);
                expect += 1;
            }
        }
        assert!(c.is_empty());
        producer.join().unwrap();
    });
}

/// (c) Once the consumer sees the producer dropped, every item the producer
/// pushed is visible: draining then gets all of them.
#[test]
fn abandoned_ring_still_drains_completely() {
    model("abandoned_ring_still_drains_completely", || {
        let (mut p, mut c) = channel::<u32>(2);
        let producer = thread::spawn(move || {
            assert_eq!(p.push_slice(&[1, 2]), 2);
            drop(p);
        });
        let mut got = Vec::new();
        loop {
            let abandoned = c.is_abandoned();
            while let Some(v) = c.pop() {
                got.push(v);
            }
            if abandoned {
                break;
            }
            thread::yield_now();
        }
        assert_eq!(got, [1, 2]);
        producer.join().unwrap();
    });
}
