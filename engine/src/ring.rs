//! The completion ring from a poller thread to the front end: a bounded
//! single-producer single-consumer queue of `Copy` records (Lamport's ring
//! buffer, with each side caching the other side's index as in the
//! "FastForward"-style refinements, so the shared indices are read only when
//! the cached view says full or empty).
//!
//! Indices are free-running `usize` counters (slot = index & mask); the ring
//! holds `tail - head` items. Slot `i` belongs to the producer while
//! `i ∈ [tail, head + cap)` and to the consumer while `i ∈ [head, tail)`. The
//! producer publishes written slots with one release store of `tail` (a batch
//! costs one store); the consumer frees slots with one release store of
//! `head`. Nothing allocates after `channel`. `Producer` and `Consumer` are
//! not `Clone`: the types enforce one of each.

use crate::sync::{Arc, AtomicUsize, CachePadded, Ordering, UnsafeCell};
use std::mem::MaybeUninit;

struct Shared<T> {
    /// Next slot the consumer reads. Written only by the consumer (release),
    /// read by the producer (acquire) when its cached copy says full.
    head: CachePadded<AtomicUsize>,
    /// Next slot the producer writes. Written only by the producer (release)
    /// after the slots below it are written, read by the consumer (acquire).
    tail: CachePadded<AtomicUsize>,
    /// `cap` slots, `cap` a power of two; ownership as in the module docs.
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
}

// SAFETY: each slot is accessed by exactly one side at a time (module docs);
// the release/acquire pairs on head and tail order those accesses. T: Send
// because values cross threads.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: as above; the boxed slots move with the Arc.
unsafe impl<T: Send> Send for Shared<T> {}

/// The producing end (one poller thread).
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// Our `tail` (the shared one equals it after every publish).
    tail: usize,
    /// Last `head` read from the consumer; `head_cache <= head`.
    head_cache: usize,
}

/// The consuming end (the front end).
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// Our `head` (the shared one equals it after every release).
    head: usize,
    /// Last `tail` read from the producer; `tail_cache <= tail`.
    tail_cache: usize,
}

/// A ring holding `capacity` items (rounded up to a power of two, at least
/// 2). Panics if the rounded capacity overflows `usize`.
pub fn channel<T: Copy + Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let cap = capacity
        .max(2)
        .checked_next_power_of_two()
        .expect("ring capacity overflows usize");
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots: (0..cap)
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect(),
        mask: cap - 1,
    });
    (
        Producer {
            shared: shared.clone(),
            tail: 0,
            head_cache: 0,
        },
        Consumer {
            shared,
            head: 0,
            tail_cache: 0,
        },
    )
}

impl<T: Copy> Producer<T> {
    pub fn capacity(&self) -> usize {
        self.shared.mask + 1
    }

    /// Free slots, conservatively: the cached view may under-count, but it
    /// is refreshed when it shows none, so 0 means the ring is full.
    pub fn free(&mut self) -> usize {
        let cap = self.capacity();
        if self.tail.wrapping_sub(self.head_cache) == cap {
            self.head_cache = self.shared.head.load(Ordering::Acquire);
        }
        cap - self.tail.wrapping_sub(self.head_cache)
    }

    /// Pushes one item; `Err(v)` when full.
    pub fn push(&mut self, v: T) -> Result<(), T> {
        match self.push_slice(std::slice::from_ref(&v)) {
            1 => Ok(()),
            _ => Err(v),
        }
    }

    /// Copies as many items as fit and publishes them with one store.
    pub fn push_slice(&mut self, items: &[T]) -> usize {
        let cap = self.capacity();
        if cap - self.tail.wrapping_sub(self.head_cache) < items.len() {
            self.head_cache = self.shared.head.load(Ordering::Acquire);
        }
        let n = items
            .len()
            .min(cap - self.tail.wrapping_sub(self.head_cache));
        for (i, v) in items[..n].iter().enumerate() {
            let slot = &self.shared.slots[self.tail.wrapping_add(i) & self.shared.mask];
            // SAFETY: slot tail+i < head_cache + cap <= head + cap, so it is
            // the producer's; the consumer reads it only after the release
            // store of tail below.
            slot.with_mut(|p| unsafe { (*p).write(*v) });
        }
        if n > 0 {
            self.tail = self.tail.wrapping_add(n);
            self.shared.tail.store(self.tail, Ordering::Release);
        }
        n
    }
}

impl<T: Copy> Consumer<T> {
    /// Items ready (reads the producer's index).
    pub fn len(&mut self) -> usize {
        self.tail_cache = self.shared.tail.load(Ordering::Acquire);
        self.tail_cache.wrapping_sub(self.head)
    }

    /// Whether nothing is ready; reads the producer's index only when the
    /// cached view is empty.
    pub fn is_empty(&mut self) -> bool {
        if self.tail_cache == self.head {
            self.tail_cache = self.shared.tail.load(Ordering::Acquire);
        }
        self.tail_cache == self.head
    }

    /// Pops one item.
    pub fn pop(&mut self) -> Option<T> {
        let mut one = [MaybeUninit::<T>::uninit()];
        // SAFETY: pop_uninit writes the first `n` entries.
        (self.pop_uninit(&mut one) == 1).then(|| unsafe { one[0].assume_init() })
    }

    /// Moves up to `out.len()` items into `out`, freeing their slots with
    /// one store; returns how many.
    pub fn pop_into(&mut self, out: &mut [T]) -> usize {
        if self.tail_cache.wrapping_sub(self.head) < out.len() {
            self.tail_cache = self.shared.tail.load(Ordering::Acquire);
        }
        let n = out.len().min(self.tail_cache.wrapping_sub(self.head));
        for (i, o) in out[..n].iter_mut().enumerate() {
            let slot = &self.shared.slots[self.head.wrapping_add(i) & self.shared.mask];
            // SAFETY: slot head+i < tail_cache <= tail was written and
            // published (acquire above) by the producer, and is ours until
            // the release store of head below.
            *o = slot.with(|p| unsafe { (*p).assume_init() });
        }
        self.release(n);
        n
    }

    fn pop_uninit(&mut self, out: &mut [MaybeUninit<T>]) -> usize {
        if self.tail_cache.wrapping_sub(self.head) < out.len() {
            self.tail_cache = self.shared.tail.load(Ordering::Acquire);
        }
        let n = out.len().min(self.tail_cache.wrapping_sub(self.head));
        for (i, o) in out[..n].iter_mut().enumerate() {
            let slot = &self.shared.slots[self.head.wrapping_add(i) & self.shared.mask];
            // SAFETY: as in pop_into.
            o.write(slot.with(|p| unsafe { (*p).assume_init() }));
        }
        self.release(n);
        n
    }

    fn release(&mut self, n: usize) {
        if n > 0 {
            self.head = self.head.wrapping_add(n);
            self.shared.head.store(self.head, Ordering::Release);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn fills_drains_and_wraps() {
        let (mut p, mut c) = channel::<u32>(3);
        assert_eq!(p.capacity(), 4);
        assert_eq!(p.push_slice(&[1, 2, 3, 4, 5]), 4);
        assert_eq!(p.push(6), Err(6));
        let mut out = [0; 3];
        assert_eq!(c.pop_into(&mut out), 3);
        assert_eq!(out, [1, 2, 3]);
        for v in 10..13 {
            p.push(v).unwrap();
        }
        assert_eq!(c.pop(), Some(4));
        assert_eq!(c.pop_into(&mut out), 3);
        assert_eq!(out, [10, 11, 12]);
        assert!(c.is_empty());
    }

    #[test]
    fn two_threads_keep_order_and_lose_nothing() {
        const N: u64 = 200_000;
        let (mut p, mut c) = channel::<u64>(64);
        let t = std::thread::spawn(move || {
            let mut next = 0;
            while next < N {
                if p.push(next).is_ok() {
                    next += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let mut buf = [0u64; 16];
        let mut expect = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while expect < N {
            assert!(std::time::Instant::now() < deadline, "ring stalled");
            let n = c.pop_into(&mut buf);
            if n == 0 {
                std::thread::yield_now();
            }
            for v in &buf[..n] {
                assert_eq!(*v, expect);
                expect += 1;
            }
        }
        t.join().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u16),
        PushSlice(Vec<u16>),
        Pop,
        PopInto(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<u16>().prop_map(Op::Push),
            proptest::collection::vec(any::<u16>(), 0..12).prop_map(Op::PushSlice),
            Just(Op::Pop),
            (0usize..12).prop_map(Op::PopInto),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_bounded_fifo(cap in 1usize..17, ops in proptest::collection::vec(op(), 0..200)) {
            let (mut p, mut c) = channel::<u16>(cap);
            let cap = p.capacity();
            let mut model = VecDeque::new();
            for o in ops {
                match o {
                    Op::Push(v) => {
                        let r = p.push(v);
                        if model.len() < cap { model.push_back(v); prop_assert!(r.is_ok()); } else { prop_assert_eq!(r, Err(v)); }
                    }
                    Op::PushSlice(vs) => {
                        let n = p.push_slice(&vs);
                        prop_assert_eq!(n, vs.len().min(cap - model.len()));
                        model.extend(&vs[..n]);
                    }
                    Op::Pop => prop_assert_eq!(c.pop(), model.pop_front()),
                    Op::PopInto(k) => {
                        let mut out = vec![0; k];
                        let n = c.pop_into(&mut out);
                        prop_assert_eq!(n, k.min(model.len()));
                        for v in &out[..n] { prop_assert_eq!(Some(*v), model.pop_front()); }
                    }
                }
                let free = p.free();
                prop_assert!(free <= cap - model.len());
                prop_assert_eq!(free == 0, model.len() == cap);
                prop_assert_eq!(c.len(), model.len());
            }
        }
    }
}
