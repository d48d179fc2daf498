//! loom models of the completion ring: every interleaving (bounded
//! preemptions) of one producer and one consumer keeps order, loses nothing
//! and never reads an unpublished slot.
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p sanpath --test loom_ring --release`.
#![cfg(loom)]

use sanpath::ring::channel;

#[test]
fn batch_publish_then_single_pops_keep_order() {
    loom::model(|| {
        let (mut p, mut c) = channel::<u32>(4);
        let t = loom::thread::spawn(move || {
            assert_eq!(p.push_slice(&[1, 2]), 2);
            assert!(p.push(3).is_ok());
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match c.pop() {
                Some(v) => got.push(v),
                None => loom::thread::yield_now(),
            }
        }
        assert_eq!(got, [1, 2, 3]);
        t.join().unwrap();
    });
}

#[test]
fn full_ring_drains_and_refills_concurrently() {
    loom::model(|| {
        let (mut p, mut c) = channel::<u32>(2);
        let t = loom::thread::spawn(move || {
            let mut next = 0;
            while next < 4 {
                if p.push(next).is_ok() {
                    next += 1;
                } else {
                    loom::thread::yield_now();
                }
            }
        });
        let mut buf = [0u32; 2];
        let mut expect = 0;
        while expect < 4 {
            let n = c.pop_into(&mut buf);
            if n == 0 {
                loom::thread::yield_now();
            }
            for v in &buf[..n] {
                assert_eq!(*v, expect);
                expect += 1;
            }
        }
        t.join().unwrap();
    });
}
