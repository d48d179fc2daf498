//! The completion ring from a poller thread to the front end: a bounded,
//! lock-free, wait-free single-producer single-consumer queue of `Copy`
//! records (the engine sends 16-byte work completions through it).
//!
//! ```
//! let (mut tx, mut rx) = sanpath::ring::channel::<u64>(3); // rounded up to 4
//! assert_eq!(tx.capacity(), 4);
//! assert_eq!(tx.push_slice(&[1, 2, 3, 4, 5]), 4); // one publish for all four
//! assert_eq!(tx.push(6), Err(6)); // full
//! let mut out = [0; 8];
//! assert_eq!(rx.pop_into(&mut out), 4); // one release for all four
//! assert_eq!(out[..4], [1, 2, 3, 4]);
//! assert_eq!(rx.pop(), None);
//! ```
//!
//! # Algorithm
//!
//! Lamport's circular buffer for one producer and one consumer: an array of
//! slots and two indices, `tail` (next slot to write), advanced only by the
//! producer, and `head` (next slot to read), advanced only by the consumer.
//! Neither side ever writes the other's index, so no read-modify-write
//! instruction is needed. On top of it, the refinement described in the
//! FastForward and MCRingBuffer papers and in Erik Rigtorp's notes on his
//! SPSC queue: each side keeps a private *cached copy* of the other side's
//! index and reads the shared one only when the cached copy says the ring is
//! full (producer) or empty (consumer), or holds too little for the batch at
//! hand. In steady state the two index cache lines then move between cores
//! about once per batch instead of once per item, and `head` and `tail` sit
//! in separate [`CachePadded`] lines so the two sides never contend for one.
//!
//! # Slot ownership (the invariant every `unsafe` block relies on)
//!
//! Indices are free-running `usize` counters; the slot of index `i` is
//! `slots[i & (cap - 1)]`, `cap` being a power of two. With `head` and `tail`
//! the values of the shared indices, `head <= tail <= head + cap` always, and
//!
//! - index `i` with `tail <= i < head + cap` is a **free** slot, owned by the
//!   producer, which may write it;
//! - index `i` with `head <= i < tail` is a **full** slot, owned by the
//!   consumer, which may read it.
//!
//! A slot changes hands only through the owner's store of its own index: the
//! producer writes slots, then publishes them with one `Release` store of
//! `tail` (however many: *batch publish*); the consumer sees them after an
//! `Acquire` load of `tail`. Symmetrically the consumer copies items out,
//! then frees their slots with one `Release` store of `head`; the producer
//! reuses them only after an `Acquire` load of `head`, so the consumer's
//! reads happen before the producer's next writes. The cached copies only
//! lag (`head_cache <= head`, `tail_cache <= tail`), so a stale cache can
//! under-report free or ready slots, never over-report them.
//!
//! # Wrap-around
//!
//! The counters wrap modulo `2^usize::BITS` (on 64-bit targets never in
//! practice; on 32-bit ones after 2^32 items, which a busy ring reaches in
//! minutes). This is harmless: `cap` divides `2^usize::BITS`, so
//! `i & (cap - 1)` names the same slot before and after the wrap, and all
//! comparisons are done on `tail.wrapping_sub(head)`, which is the exact item
//! count since it never exceeds `cap < 2^usize::BITS`.
//!
//! # Guarantees
//!
//! - No allocation after [`channel`]; `push`, `pop` and their batch forms
//!   never block, lock or make a system call.
//! - [`Producer`] and [`Consumer`] are `Send` but neither `Clone` nor `Sync`,
//!   and every operation takes `&mut self`: the type system admits exactly
//!   one producer and one consumer.
//! - Items are `Copy`, so a slot never needs dropping and dropping a ring
//!   with items still in it is fine.
//! - Either end can tell whether the other was dropped
//!   ([`Producer::is_abandoned`], [`Consumer::is_abandoned`]).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::{self, MaybeUninit};

use crate::sync::{Arc, AtomicBool, AtomicUsize, CachePadded, Ordering, UnsafeCell};

/// One element of the ring; initialised while full (see the module docs).
type Slot<T> = UnsafeCell<MaybeUninit<T>>;

/// The state both ends share, behind one `Arc`.
struct Shared<T> {
    /// Index of the next slot the consumer reads; everything below it has
    /// been read. Written only by the consumer (`Release`, after it has
    /// copied the items out); read by the producer (`Acquire`) when its
    /// cached copy shows too little room. Alone in its cache line.
    head: CachePadded<AtomicUsize>,
    /// Index of the next slot the producer writes; everything below it (and
    /// at or above `head`) holds a published item. Written only by the
    /// producer (`Release`, after writing the slots it publishes); read by
    /// the consumer (`Acquire`) when its cached copy shows too few items.
    /// Alone in its cache line. Invariant: `head <= tail <= head + cap`.
    tail: CachePadded<AtomicUsize>,
    /// The `cap` slots, `cap` a power of two. Slot ownership follows the
    /// indices as in the module docs; never resized, so no allocation after
    /// construction.
    slots: Box<[Slot<T>]>,
    /// `cap - 1`: turns a free-running index into a slot position.
    /// Immutable.
    mask: usize,
    /// Set (`Release`) by each end when it is dropped; read (`Acquire`) by
    /// the other through `is_abandoned`. Written at most twice in the ring's
    /// life, so it needs no line of its own.
    abandoned: AtomicBool,
}

// SAFETY: the only interior mutability not already synchronised is in the
// slots, and each slot is accessed by one side at a time: the producer only
// while it is free, the consumer only while it is full, with the
// release/acquire pairs on `head` and `tail` ordering each hand-over (module
// docs). Items move from the producer's thread to the consumer's, hence
// `T: Send`; no `&T` is ever shared between threads, so `T: Sync` is not
// needed. (`Send` for `Shared` follows automatically from its fields.)
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The slot of free-running index `index`.
    #[inline]
    fn slot(&self, index: usize) -> &Slot<T> {
        &self.slots[index & self.mask]
    }

    /// The slots of indices `[from, from + n)` as two contiguous runs, the
    /// second non-empty only when the range wraps past the end of the array.
    /// Requires `n <= cap`.
    #[inline]
    fn runs(&self, from: usize, n: usize) -> (&[Slot<T>], &[Slot<T>]) {
        let start = from & self.mask;
        let first = n.min(self.slots.len() - start);
        (&self.slots[start..start + first], &self.slots[..n - first])
    }
}

/// The producing end of a ring (a poller thread). `Send`, not `Sync`, not
/// `Clone`.
///
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<sanpath::ring::Producer<u64>>();
/// ```
///
/// ```compile_fail
/// let (tx, _rx) = sanpath::ring::channel::<u64>(2);
/// let _second_producer = tx.clone();
/// ```
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// The producer's own copy of `shared.tail`, which only it writes: the
    /// two are equal between calls.
    tail: usize,
    /// The last value of `shared.head` the producer read: `head_cache <=
    /// head`, so `cap - (tail - head_cache)` is a lower bound on the free
    /// slots. Refreshed only when that bound is too small.
    head_cache: usize,
    /// Makes the type `!Sync` (it stays `Send`).
    _not_sync: PhantomData<Cell<()>>,
}

/// The consuming end of a ring (the front end). `Send`, not `Sync`, not
/// `Clone`.
///
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<sanpath::ring::Consumer<u64>>();
/// ```
///
/// ```compile_fail
/// let (_tx, rx) = sanpath::ring::channel::<u64>(2);
/// let _second_consumer = rx.clone();
/// ```
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// The consumer's own copy of `shared.head`, which only it writes: the
    /// two are equal between calls.
    head: usize,
    /// The last value of `shared.tail` the consumer read: `head <=
    /// tail_cache <= tail`, so `tail_cache - head` is a lower bound on the
    /// ready items. Refreshed only when that bound is too small.
    tail_cache: usize,
    /// Makes the type `!Sync` (it stays `Send`).
    _not_sync: PhantomData<Cell<()>>,
}

/// A ring holding `capacity` items, rounded up to a power of two and to at
/// least 2; returns its two ends. Allocates the slots once; nothing else
/// ever allocates.
///
/// # Panics
///
/// If `capacity` is 0, or if the rounded capacity does not fit in `usize` or
/// its slots would exceed `isize::MAX` bytes (the allocator's limit). A
/// capacity that passes these checks but that the machine cannot allocate
/// aborts through the global allocator's error handler, as any allocation
/// does.
pub fn channel<T: Copy + Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    channel_from(capacity, 0)
}

/// [`channel`] with both indices starting at `start` instead of 0 (tests
/// use it to cross the `usize` wrap-around quickly).
fn channel_from<T: Copy + Send>(capacity: usize, start: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "ring capacity must be at least 1");
    let cap = capacity
        .max(2)
        .checked_next_power_of_two()
        .filter(|&cap| {
            cap.checked_mul(mem::size_of::<Slot<T>>())
                .is_some_and(|bytes| bytes <= isize::MAX as usize)
        })
        .unwrap_or_else(|| panic!("ring capacity {capacity} is too large"));
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(start)),
        tail: CachePadded::new(AtomicUsize::new(start)),
        slots: (0..cap)
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect(),
        mask: cap - 1,
        abandoned: AtomicBool::new(false),
    });
    let producer = Producer {
        shared: Arc::clone(&shared),
        tail: start,
        head_cache: start,
        _not_sync: PhantomData,
    };
    let consumer = Consumer {
        shared,
        head: start,
        tail_cache: start,
        _not_sync: PhantomData,
    };
    (producer, consumer)
}

impl<T: Copy> Producer<T> {
    /// How many items the ring holds when full.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.shared.slots.len()
    }

    /// Free slots by the cached head, re-reading the shared head only when
    /// that shows fewer than `want`. Never more than the true free count.
    #[inline]
    fn room(&mut self, want: usize) -> usize {
        let cap = self.capacity();
        let free = cap - self.tail.wrapping_sub(self.head_cache);
        if free >= want {
            return free;
        }
        self.head_cache = self.shared.head.load(Ordering::Acquire);
        cap - self.tail.wrapping_sub(self.head_cache)
    }

    /// Free slots: a lower bound (the consumer may have freed more since the
    /// cached head was read), refreshed from the consumer's index only when
    /// the cached view says the ring is full, so 0 means full right now.
    #[inline]
    pub fn free(&mut self) -> usize {
        self.room(1)
    }

    /// Appends one item and publishes it; `Err(v)` if the ring is full.
    #[inline]
    pub fn push(&mut self, v: T) -> Result<(), T> {
        if self.room(1) == 0 {
            return Err(v);
        }
        let slot = self.shared.slot(self.tail);
        // SAFETY: `room` saw `tail < head_cache + cap <= head + cap`, so
        // index `tail` is a free slot, owned by the producer: the consumer
        // does not touch it until the `Release` store of `tail` in `publish`,
        // and its last read of the slot's previous item happened before the
        // `Release` store of `head` that our `Acquire` load read.
        slot.with_mut(|p| unsafe { p.write(MaybeUninit::new(v)) });
        self.publish(1);
        Ok(())
    }

    /// Copies as many items from the front of `items` as fit and publishes
    /// them all with one store of the tail (*batch publish*); returns how
    /// many. The consumer's index is read at most once, and only if the
    /// cached view has room for fewer than `items.len()`.
    #[inline]
    pub fn push_slice(&mut self, items: &[T]) -> usize {
        let n = items.len().min(self.room(items.len()));
        if n == 0 {
            return 0;
        }
        let (run_a, run_b) = self.shared.runs(self.tail, n);
        let (items_a, items_b) = items[..n].split_at(run_a.len());
        for (slot, v) in run_a.iter().zip(items_a).chain(run_b.iter().zip(items_b)) {
            // SAFETY: these are the slots of indices `[tail, tail + n)` with
            // `tail + n <= head_cache + cap <= head + cap` (`room`), all free
            // and owned by the producer until `publish` below, as in `push`.
            slot.with_mut(|p| unsafe { p.write(MaybeUninit::new(*v)) });
        }
        self.publish(n);
        n
    }

    /// Hands the `n` slots written at `tail` to the consumer.
    #[inline]
    fn publish(&mut self, n: usize) {
        self.tail = self.tail.wrapping_add(n);
        self.shared.tail.store(self.tail, Ordering::Release);
    }

    /// Whether the consumer was dropped: nothing pushed from now on will be
    /// read.
    pub fn is_abandoned(&self) -> bool {
        self.shared.abandoned.load(Ordering::Acquire)
    }
}

impl<T: Copy> Consumer<T> {
    /// How many items the ring holds when full.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.shared.slots.len()
    }

    /// Ready items by the cached tail, re-reading the shared tail only when
    /// that shows fewer than `want`. Never more than the true count.
    #[inline]
    fn ready(&mut self, want: usize) -> usize {
        let ready = self.tail_cache.wrapping_sub(self.head);
        if ready >= want {
            return ready;
        }
        self.tail_cache = self.shared.tail.load(Ordering::Acquire);
        self.tail_cache.wrapping_sub(self.head)
    }

    /// Items ready to pop now. Always reads the producer's index (one
    /// `Acquire` load), so the count is current; the producer may add more
    /// right after.
    pub fn len(&mut self) -> usize {
        self.tail_cache = self.shared.tail.load(Ordering::Acquire);
        self.tail_cache.wrapping_sub(self.head)
    }

    /// Whether no item is ready. Reads the producer's index only when the
    /// cached view is empty, so `false` is cheap and `true` is current.
    #[inline]
    pub fn is_empty(&mut self) -> bool {
        self.ready(1) == 0
    }

    /// Removes and returns the oldest item, or `None` if the ring is empty.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.ready(1) == 0 {
            return None;
        }
        let slot = self.shared.slot(self.head);
        // SAFETY: `ready` saw `head < tail_cache <= tail`, so index `head`
        // is a full slot, owned by the consumer until the `Release` store of
        // `head` in `release`; the producer initialised it before the
        // `Release` store of `tail` that our `Acquire` load read. `T: Copy`,
        // so copying the item out leaves nothing to drop.
        let v = slot.with(|p| unsafe { (*p).assume_init() });
        self.release(1);
        Some(v)
    }

    /// Moves up to `out.len()` of the oldest items into the front of `out`
    /// and frees their slots with one store of the head; returns how many.
    /// The producer's index is read at most once, and only if the cached
    /// view holds fewer than `out.len()` items.
    #[inline]
    pub fn pop_into(&mut self, out: &mut [T]) -> usize {
        let n = out.len().min(self.ready(out.len()));
        if n == 0 {
            return 0;
        }
        let (run_a, run_b) = self.shared.runs(self.head, n);
        let (out_a, out_b) = out[..n].split_at_mut(run_a.len());
        for (slot, o) in run_a.iter().zip(out_a).chain(run_b.iter().zip(out_b)) {
            // SAFETY: these are the slots of indices `[head, head + n)` with
            // `head + n <= tail_cache <= tail` (`ready`), all full, published
            // by the producer and owned by the consumer until `release`
            // below, as in `pop`.
            *o = slot.with(|p| unsafe { (*p).assume_init() });
        }
        self.release(n);
        n
    }

    /// Hands the `n` slots read at `head` back to the producer.
    #[inline]
    fn release(&mut self, n: usize) {
        self.head = self.head.wrapping_add(n);
        self.shared.head.store(self.head, Ordering::Release);
    }

    /// A handle that tells whether the ring holds items, for a thread that
    /// holds neither end.
    pub fn watch(&self) -> Watch<T> {
        Watch {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Whether the producer was dropped: no item will be added any more.
    /// Once this returns `true`, every item the producer pushed is visible:
    /// popping until empty drains the ring completely.
    pub fn is_abandoned(&self) -> bool {
        self.shared.abandoned.load(Ordering::Acquire)
    }
}

/// Reads a ring's two indices, for a thread that holds neither end (one
/// that must know whether another thread's consumer has work). Touches no
/// slot, writes nothing.
pub struct Watch<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Watch<T> {
    /// Whether the ring held no item when the indices were read: a push
    /// whose `Release` store of the tail is ordered before this call (by a
    /// fence pair, or a release/acquire chain) is seen.
    #[inline]
    pub fn is_empty(&self) -> bool {
        let head = self.shared.head.load(Ordering::Acquire);
        self.shared.tail.load(Ordering::Acquire) == head
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        // Release: orders every publish before the flag (see
        // `Consumer::is_abandoned`).
        self.shared.abandoned.store(true, Ordering::Release);
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        self.shared.abandoned.store(true, Ordering::Release);
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.shared.slots.len())
            .field("tail", &self.tail)
            .field("head_cache", &self.head_cache)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.shared.slots.len())
            .field("head", &self.head)
            .field("tail_cache", &self.tail_cache)
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::sync::mpsc::{self, RecvTimeoutError};
    use std::thread;
    use std::time::Duration;

    fn assert_send<T: Send>() {}

    #[test]
    fn ends_are_send() {
        assert_send::<Producer<u64>>();
        assert_send::<Consumer<u64>>();
    }

    #[test]
    fn capacity_rounds_up_to_a_power_of_two_of_at_least_two() {
        for (asked, got) in [(1, 2), (2, 2), (3, 4), (5, 8), (8, 8), (1000, 1024)] {
            let (p, c) = channel::<u64>(asked);
            assert_eq!((p.capacity(), c.capacity()), (got, got), "asked {asked}");
        }
    }

    #[test]
    #[should_panic(expected = "at least 1")]
    fn capacity_zero_panics() {
        let _ = channel::<u64>(0);
    }

    #[test]
    #[should_panic(expected = "too large")]
    fn capacity_beyond_usize_panics() {
        let _ = channel::<u64>(usize::MAX);
    }

    #[test]
    #[should_panic(expected = "too large")]
    fn capacity_beyond_the_allocation_limit_panics() {
        // 2^(BITS-2) slots of 8 bytes is 2^(BITS+1) bytes: over isize::MAX.
        let _ = channel::<u64>(1 << (usize::BITS - 2));
    }

    #[test]
    fn fills_drains_and_wraps_the_array() {
        let (mut p, mut c) = channel::<u32>(3);
        assert_eq!(p.capacity(), 4);
        assert!(c.is_empty());
        assert_eq!(c.pop(), None);
        assert_eq!(p.push_slice(&[1, 2, 3, 4, 5]), 4);
        assert_eq!(p.free(), 0);
        assert_eq!(p.push(6), Err(6));
        assert_eq!(p.push_slice(&[6]), 0);
        assert_eq!(c.len(), 4);
        let mut out = [0; 3];
        assert_eq!(c.pop_into(&mut out), 3);
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(p.free(), 3);
        // These wrap around the end of the slot array.
        assert_eq!(p.push_slice(&[10, 11, 12]), 3);
        assert_eq!(c.pop(), Some(4));
        let mut out = [0; 5];
        assert_eq!(c.pop_into(&mut out), 3);
        assert_eq!(out[..3], [10, 11, 12]);
        assert!(c.is_empty());
        assert_eq!(c.len(), 0);
        assert_eq!(c.pop_into(&mut out), 0);
        assert_eq!(c.pop_into(&mut []), 0);
        assert_eq!(p.push_slice(&[]), 0);
    }

    #[test]
    fn indices_cross_the_usize_wrap_around() {
        let (mut p, mut c) = channel_from::<u64>(4, usize::MAX - 5);
        let mut sent = 0;
        let mut got = 0;
        let mut out = [0; 3];
        for _ in 0..20 {
            sent += p.push_slice(&[sent, sent + 1, sent + 2]) as u64;
            if p.push(sent).is_ok() {
                sent += 1;
            }
            let n = c.pop_into(&mut out);
            for v in &out[..n] {
                assert_eq!(*v, got);
                got += 1;
            }
        }
        while let Some(v) = c.pop() {
            assert_eq!(v, got);
            got += 1;
        }
        assert_eq!(got, sent);
        assert!(p.tail < 100, "the indices wrapped");
    }

    #[test]
    fn holds_zero_sized_items() {
        let (mut p, mut c) = channel::<()>(2);
        assert_eq!(p.push_slice(&[(), (), ()]), 2);
        assert_eq!(c.pop(), Some(()));
        assert_eq!(c.pop_into(&mut [(); 4]), 1);
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn each_end_sees_the_other_dropped() {
        let (mut p, c) = channel::<u8>(2);
        assert!(!p.is_abandoned() && !c.is_abandoned());
        drop(c);
        assert!(p.is_abandoned());
        assert!(
            p.push(1).is_ok(),
            "pushing to an abandoned ring is harmless"
        );

        let (mut p, mut c) = channel::<u8>(4);
        p.push_slice(&[1, 2, 3]);
        drop(p);
        assert!(c.is_abandoned());
        let mut out = [0; 4];
        assert_eq!(c.pop_into(&mut out), 3, "items outlive their producer");
    }

    #[test]
    fn debug_shows_the_indices() {
        let (mut p, c) = channel::<u8>(2);
        p.push(7).unwrap();
        assert_eq!(
            format!("{p:?} {c:?}"),
            "Producer { capacity: 2, tail: 1, head_cache: 0, .. } \
             Consumer { capacity: 2, head: 0, tail_cache: 0, .. }"
        );
    }

    /// A 16-byte record like the engine's completions, carrying a check
    /// word so a torn or stale read shows.
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Record {
        seq: u64,
        check: u64,
    }

    impl Record {
        fn new(seq: u64) -> Record {
            Record {
                seq,
                check: !seq.rotate_left(23),
            }
        }
    }

    /// After a few spins, give the core away: the test must progress on a
    /// 2-core machine shared with other tests, not rely on a dedicated core.
    fn back_off(failures: &mut u32) {
        *failures += 1;
        if *failures < 16 {
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
    }

    /// Runs `f` on a thread and fails the test if it has not finished
    /// within `limit` (rather than hanging the suite).
    fn with_watchdog(limit: Duration, f: impl FnOnce() + Send + 'static) {
        let (done_tx, done_rx) = mpsc::channel();
        let worker = thread::spawn(move || {
            f();
            let _ = done_tx.send(());
        });
        match done_rx.recv_timeout(limit) {
            Ok(()) => worker.join().unwrap(),
            Err(RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(worker.join().unwrap_err())
            }
            Err(RecvTimeoutError::Timeout) => panic!("ring transfer stalled for {limit:?}"),
        }
    }

    /// Sends `total` sequenced records through a ring of `capacity` from one
    /// thread to another, mixing single and batch operations on both sides,
    /// and checks that they arrive whole, once each and in order.
    fn transfer(capacity: usize, total: u64, batch: usize) {
        let (mut p, mut c) = channel::<Record>(capacity);
        let producer = thread::spawn(move || {
            let mut buf = Vec::with_capacity(batch);
            let mut next = 0;
            let mut failures = 0;
            while next < total {
                let sent = if next % 3 == 0 {
                    usize::from(p.push(Record::new(next)).is_ok())
                } else {
                    let k = (total - next).min(batch as u64);
                    buf.clear();
                    buf.extend((next..next + k).map(Record::new));
                    p.push_slice(&buf)
                };
                if sent == 0 {
                    back_off(&mut failures);
                } else {
                    failures = 0;
                    next += sent as u64;
                }
            }
        });
        let mut out = vec![Record::new(0); batch];
        let mut expect = 0;
        let mut failures = 0;
        while expect < total {
            let n = if expect % 5 == 0 {
                match c.pop() {
                    Some(r) => {
                        out[0] = r;
                        1
                    }
                    None => 0,
                }
            } else {
                c.pop_into(&mut out[..1 + expect as usize % batch])
            };
            if n == 0 {
                back_off(&mut failures);
                continue;
            }
            failures = 0;
            for r in &out[..n] {
                assert_eq!(*r, Record::new(expect), "lost, duplicated or torn");
                expect += 1;
            }
        }
        producer.join().unwrap();
        assert!(c.is_empty());
        assert!(c.is_abandoned());
    }

    #[test]
    fn two_threads_transfer_a_million_records_in_order() {
        with_watchdog(Duration::from_secs(300), || transfer(1024, 1_000_000, 64));
    }

    #[test]
    fn two_threads_through_a_tiny_ring() {
        with_watchdog(Duration::from_secs(300), || transfer(2, 100_000, 3));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u16),
        PushSlice(Vec<u16>),
        Pop,
        PopInto(usize),
        Free,
        Len,
        IsEmpty,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => any::<u16>().prop_map(Op::Push),
            3 => vec(any::<u16>(), 0..12).prop_map(Op::PushSlice),
            3 => Just(Op::Pop),
            3 => (0usize..12).prop_map(Op::PopInto),
            1 => Just(Op::Free),
            1 => Just(Op::Len),
            1 => Just(Op::IsEmpty),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Any sequence of operations behaves as a bounded FIFO (a
        /// `VecDeque` model), including across the `usize` wrap-around, and
        /// the cached indices never run ahead of the real ones.
        #[test]
        fn behaves_like_a_bounded_fifo(
            capacity in 1usize..=17,
            start in prop_oneof![Just(0usize), (usize::MAX - 40)..=usize::MAX],
            ops in vec(op(), 0..300),
        ) {
            let (mut p, mut c) = channel_from::<u16>(capacity, start);
            let cap = p.capacity();
            prop_assert_eq!(cap, capacity.max(2).next_power_of_two());
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Op::Push(v) => {
                        let r = p.push(v);
                        if model.len() < cap {
                            prop_assert_eq!(r, Ok(()));
                            model.push_back(v);
                        } else {
                            prop_assert_eq!(r, Err(v));
                        }
                    }
                    Op::PushSlice(vs) => {
                        let n = p.push_slice(&vs);
                        prop_assert_eq!(n, vs.len().min(cap - model.len()));
                        model.extend(&vs[..n]);
                    }
                    Op::Pop => prop_assert_eq!(c.pop(), model.pop_front()),
                    Op::PopInto(k) => {
                        let mut out = vec![u16::MAX; k];
                        let n = c.pop_into(&mut out);
                        prop_assert_eq!(n, k.min(model.len()));
                        let expected: Vec<u16> = model.drain(..n).collect();
                        prop_assert_eq!(&out[..n], &expected[..]);
                        prop_assert!(out[n..].iter().all(|&v| v == u16::MAX));
                    }
                    Op::Free => {
                        let free = p.free();
                        prop_assert!(free <= cap - model.len());
                        prop_assert_eq!(free == 0, model.len() == cap);
                    }
                    Op::Len => prop_assert_eq!(c.len(), model.len()),
                    Op::IsEmpty => prop_assert_eq!(c.is_empty(), model.is_empty()),
                }
                // The shared indices match the private ones and the model;
                // the caches lag but never lead.
                let head = c.shared.head.load(Ordering::Relaxed);
                let tail = c.shared.tail.load(Ordering::Relaxed);
                prop_assert_eq!((head, tail), (c.head, p.tail));
                prop_assert_eq!(tail.wrapping_sub(head), model.len());
                let behind = head.wrapping_sub(p.head_cache);
                prop_assert!(behind <= cap - model.len(), "head_cache ahead of head");
                prop_assert!(c.tail_cache.wrapping_sub(head) <= model.len(),
                    "tail_cache ahead of tail");
            }
        }
    }
}
