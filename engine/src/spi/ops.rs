//! Overlapped op slots: a fixed slab allocated at startup, so starting an op
//! allocates nothing. A work request's id names its slot and the slot's
//! generation (`wr_id = generation << 32 | index`), so a completion can never
//! be applied to a later op that reuses the slot.
//!
//! Free slots form lock-free LIFOs (Treiber stacks), one per completion
//! queue: slot `i` always returns to list `i % lists`, and an op takes from
//! the list of its socket's CQ first, so the thread that starts and completes
//! the ops of one CQ (run-to-completion) never shares a cache line with the
//! thread of another (each slot is padded to its own line, too). A slot's
//! state has no lock: its stamp hands it from the starter to the one
//! completion that claims it (see `Slot::stamp`). A head packs the top index with a tag that changes on
//! every successful update, which defeats ABA: a pop that read `next` of a
//! slot that was popped and pushed back meanwhile fails its compare-exchange
//! because the tag moved on.

use super::socket::OpSocket;
use super::types::Overlapped;
use crate::fabric::Sge;
use crate::mem::table::RegRef;
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, CachePadded, Ordering, UnsafeCell};
use std::ptr::NonNull;

/// Most buffers one op may name (the soft NIC's and the config's SGE limit).
pub const MAX_SGE: usize = 16;

/// Entries an op keeps for being posted again (see [`OpState::sges`]); the
/// switch receives into one buffer at a time.
pub const KEPT_SGE: usize = 2;

const NIL: u32 = u32::MAX;

/// The address of the switch's overlapped record of a pending op.
#[derive(Clone, Copy, Debug)]
pub struct OvPtr(NonNull<Overlapped>);

// SAFETY: `Overlapped` consists of atomics, so sharing it between threads is
// sound; the pointer itself is only dereferenced while the record is valid
// (see `OvPtr::new`).
unsafe impl Send for OvPtr {}
// SAFETY: as for Send: only `&Overlapped` (all atomics) is ever produced.
unsafe impl Sync for OvPtr {}

impl OvPtr {
    /// # Safety
    /// `ov` must stay valid until the completion of the op it belongs to has
    /// been reported (the SPI's contract for every overlapped call); only
    /// the op's bookkeeping holds an `OvPtr`, and it is dropped then.
    pub unsafe fn new(ov: &Overlapped) -> OvPtr {
        OvPtr(NonNull::from(ov))
    }

    pub fn get(&self) -> &Overlapped {
        // SAFETY: valid while the op is pending (constructor contract), and an
        // OvPtr lives only in the state of a pending op.
        unsafe { self.0.as_ref() }
    }
}

/// The provider's private state of one pending op — "the op's memory" of
/// spec §6.1 step 2, released before the op's completion is signalled.
pub struct OpState {
    /// The socket the op belongs to, with the table pin that keeps it alive
    /// until the op's completion gives it back.
    pub socket: OpSocket,
    /// The switch's overlapped record.
    pub overlapped: OvPtr,
    /// Registrations the op uses; each holds its registration "in use".
    /// Packed: the `Some`s come first (release them with [`release_regs`]).
    pub regs: [Option<RegRef>; MAX_SGE],
    /// The first [`KEPT_SGE`] entries the op was posted with (as many as
    /// `regs` holds, each covered by the registration at its index): a
    /// receive parked while its connection is re-established is posted
    /// again with them (`dup.rs`). Not all: every op pays for the copy.
    pub sges: [Sge; KEPT_SGE],
    /// A receive (its completion's opcode is not reliable on error).
    pub recv: bool,
}

/// Drops an op's registration holds. They are packed from the front, so
/// the first `None` ends them and the rest of the array needs no look.
pub fn release_regs(mut regs: [Option<RegRef>; MAX_SGE]) {
    for r in &mut regs {
        if r.take().is_none() {
            break;
        }
    }
    debug_assert!(
        regs.iter().all(Option::is_none),
        "op registrations not packed"
    );
    // Every element is `None` now: forgetting the array drops nothing.
    std::mem::forget(regs);
}

/// Phases of a slot, in the low bits of its stamp.
const FREE: u64 = 0;
/// Popped by a starter; its state is being filled.
const RESERVED: u64 = 1;
/// Filled: the op may be posted and completed.
const PENDING: u64 = 2;
/// Claimed by the completion (or the starter's cancel) taking the state.
const TAKING: u64 = 3;

/// One op slot, alone on its cache line(s): the slots of different threads
/// never share a line.
struct Slot<S> {
    /// `generation << 32 | phase`. The phase goes `FREE → RESERVED` (pop,
    /// by the starter, which also bumps the generation), `RESERVED →
    /// PENDING` (fill, by the starter, release: the state is visible to
    /// whoever claims it), `PENDING → TAKING` (a compare-exchange by the
    /// completer or the starter's cancel: exactly one claims the state of
    /// one generation) and `TAKING → FREE` (the claimer, before pushing the
    /// slot back). A completion whose generation or phase does not match
    /// claims nothing.
    stamp: AtomicU64,
    /// Next free slot while this one is on the free list; meaningless
    /// otherwise. Written by the pusher before the head CAS publishes it.
    next: AtomicU32,
    /// Who the pending op belongs to (the SPI: its socket's address), so
    /// that a close can find its ops ([`OpSlab::take_owned`]). Written by
    /// the starter before its `PENDING` store (which publishes it), read by
    /// that scan after it saw `PENDING`.
    owner: AtomicUsize,
    /// The op's private state: written only by the starter between its pop
    /// and its `PENDING` store, read and taken only by the thread whose
    /// compare-exchange claimed it. No lock: the stamp orders the two.
    state: UnsafeCell<Option<S>>,
}

/// A fixed set of op slots, each holding the private state `S` of a pending
/// op (the SPI's [`OpState`]; the loom models use plain numbers).
pub struct OpSlab<S = OpState> {
    slots: Box<[CachePadded<Slot<S>>]>,
    /// Free-list heads: low 32 bits the top slot index (or `NIL`), high 32
    /// bits a tag incremented by every successful push or pop. List `l` holds
    /// only slots `i` with `i % heads.len() == l`.
    heads: Box<[CachePadded<AtomicU64>]>,
}

// SAFETY: a slot's state is accessed by one thread at a time, handed over
// through its stamp (see `Slot::state`); `S` crosses threads by value.
unsafe impl<S: Send> Sync for OpSlab<S> {}

/// A slot reserved for a new op, not yet holding state.
#[derive(Debug)]
pub struct Reserved {
    index: u32,
    generation: u32,
}

impl Reserved {
    /// The work-request id naming this op.
    pub fn wr_id(&self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }
}

fn stamp(generation: u32, phase: u64) -> u64 {
    (u64::from(generation) << 32) | phase
}

impl<S> OpSlab<S> {
    /// `size` slots spread over `lists` free lists.
    pub fn new(size: usize, lists: usize) -> OpSlab<S> {
        assert!(size > 0 && size < NIL as usize, "op slab size out of range");
        let lists = lists.clamp(1, size);
        let slots: Box<[CachePadded<Slot<S>>]> = (0..size)
            .map(|i| {
                CachePadded::new(Slot {
                    stamp: AtomicU64::new(stamp(0, FREE)),
                    next: AtomicU32::new(if i + lists < size {
                        (i + lists) as u32
                    } else {
                        NIL
                    }),
                    owner: AtomicUsize::new(0),
                    state: UnsafeCell::new(None),
                })
            })
            .collect();
        OpSlab {
            slots,
            heads: (0..lists)
                .map(|l| CachePadded::new(AtomicU64::new(l as u64)))
                .collect(),
        }
    }

    /// Takes a free slot, from list `hint` first, or `None` when every slot
    /// is in use.
    pub fn reserve(&self, hint: usize) -> Option<Reserved> {
        let n = self.heads.len();
        (0..n).find_map(|k| self.pop((hint + k) % n))
    }

    fn pop(&self, list: usize) -> Option<Reserved> {
        let head_cell = &self.heads[list];
        let mut head = head_cell.load(Ordering::Acquire);
        loop {
            let index = head as u32;
            if index == NIL {
                return None;
            }
            let next = self.slots[index as usize].next.load(Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            match head_cell.compare_exchange_weak(
                head,
                (tag << 32) | u64::from(next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let slot = &self.slots[index as usize];
                    let was = slot.stamp.load(Ordering::Relaxed);
                    debug_assert_eq!(was & 3, FREE, "a listed slot is in use");
                    let generation = ((was >> 32) as u32).wrapping_add(1);
                    slot.stamp
                        .store(stamp(generation, RESERVED), Ordering::Relaxed);
                    return Some(Reserved { index, generation });
                }
                Err(actual) => head = actual,
            }
        }
    }

    /// Stores the op's state in its reserved slot (before posting), with
    /// the `owner` [`OpSlab::take_owned`] finds it by.
    /// Always inlined: `state` is moved straight into the slot, not copied
    /// into the call first (it is large: the op's registrations).
    #[inline(always)]
    pub fn fill(&self, r: &Reserved, owner: usize, state: S) {
        let slot = &self.slots[r.index as usize];
        debug_assert_eq!(
            slot.stamp.load(Ordering::Relaxed),
            stamp(r.generation, RESERVED)
        );
        slot.owner.store(owner, Ordering::Relaxed);
        // SAFETY: the slot is RESERVED by the caller (it popped it): no
        // other thread reads or writes the state until the PENDING store.
        slot.state.with_mut(|p| unsafe { *p = Some(state) });
        slot.stamp
            .store(stamp(r.generation, PENDING), Ordering::Release);
    }

    /// Returns a reserved slot whose op was never started, with the state
    /// it was filled with. `None` for a filled slot means a close's
    /// [`OpSlab::take_owned`] took the op first (and freed the slot): it
    /// completed the op, which therefore counts as started.
    pub fn cancel(&self, r: Reserved) -> Option<S> {
        let slot = &self.slots[r.index as usize];
        let now = slot.stamp.load(Ordering::Relaxed);
        if now == stamp(r.generation, RESERVED) {
            self.release(r.index, r.generation);
            return None;
        }
        let state = self.claim(r.index, r.generation)?;
        self.release(r.index, r.generation);
        Some(state)
    }

    /// Takes the state of the op named by `wr_id` and frees its slot. `None`
    /// if the id is stale or unknown (never for a completion of a posted op).
    pub fn complete(&self, wr_id: u64) -> Option<S> {
        let index = wr_id as u32;
        let generation = (wr_id >> 32) as u32;
        self.slots.get(index as usize)?;
        let state = self.claim(index, generation)?;
        self.release(index, generation);
        Some(state)
    }

    /// Claims the state of generation `generation` of slot `index` (one
    /// compare-exchange; a stale id fails it and touches no state).
    fn claim(&self, index: u32, generation: u32) -> Option<S> {
        let slot = &self.slots[index as usize];
        // Acquire: pairs with fill's release, so the state is visible.
        slot.stamp
            .compare_exchange(
                stamp(generation, PENDING),
                stamp(generation, TAKING),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        // SAFETY: our compare-exchange claimed the state of this generation
        // alone; the starter no longer writes it (it stored PENDING after
        // its write), and nobody else can claim it.
        slot.state.with_mut(|p| unsafe { (*p).take() })
    }

    /// Takes the state of every pending op filled with `owner`, frees its
    /// slot and hands the state to `f`; returns how many. A scan of the
    /// whole slab, for a close whose NIC did not flush (`spi/close.rs`).
    /// Each op is taken once, by this or by its completion, whichever
    /// claims it first; an op filled after the scan passed its slot is not
    /// seen.
    pub fn take_owned(&self, owner: usize, f: &mut dyn FnMut(S)) -> usize {
        let mut n = 0;
        for (index, slot) in self.slots.iter().enumerate() {
            // Acquire: pairs with fill's release, so `owner` is the op's.
            let now = slot.stamp.load(Ordering::Acquire);
            if now & 3 != PENDING || slot.owner.load(Ordering::Relaxed) != owner {
                continue;
            }
            let generation = (now >> 32) as u32;
            // A claim fails if the op completed (or the slot moved on) since.
            if let Some(state) = self.claim(index as u32, generation) {
                self.release(index as u32, generation);
                f(state);
                n += 1;
            }
        }
        n
    }

    /// Slots currently allocated (a scan; for tests and stats).
    pub fn in_use(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.stamp.load(Ordering::Relaxed) & 3 != FREE)
            .count()
    }

    /// Reservations made since the slab was created: each takes its slot
    /// to the next generation. Reads every slot (statistics, not the data
    /// path); counts modulo 2^32 per slot.
    pub fn reserved_total(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.stamp.load(Ordering::Relaxed) >> 32)
            .sum()
    }

    fn release(&self, index: u32, generation: u32) {
        let list = index as usize % self.heads.len();
        let slot = &self.slots[index as usize];
        slot.stamp.store(stamp(generation, FREE), Ordering::Relaxed);
        let head_cell = &self.heads[list];
        let mut head = head_cell.load(Ordering::Relaxed);
        loop {
            slot.next.store(head as u32, Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            // Release: the state was taken before the next popper fills it.
            match head_cell.compare_exchange_weak(
                head,
                (tag << 32) | u64::from(index),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => head = actual,
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reserve_all_then_exhausted_then_reuse_with_new_generation() {
        let slab = OpSlab::<u32>::new(3, 2);
        let a = slab.reserve(0).unwrap();
        let b = slab.reserve(0).unwrap();
        let c = slab.reserve(1).unwrap();
        assert!(slab.reserve(1).is_none());
        assert_eq!(slab.in_use(), 3);
        let old = a.wr_id();
        slab.cancel(a);
        let d = slab.reserve(1).unwrap();
        assert_ne!(d.wr_id(), old, "a reused slot gets a new generation");
        assert!(slab.complete(old).is_none(), "stale ids are ignored");
        for r in [b, c, d] {
            slab.cancel(r);
        }
        assert_eq!(slab.in_use(), 0);
        assert_eq!(slab.reserved_total(), 4, "every reservation counted once");
    }

    #[test]
    fn take_owned_takes_only_the_owners_pending_ops_once() {
        let slab = OpSlab::<u32>::new(4, 1);
        let a = slab.reserve(0).unwrap();
        slab.fill(&a, 7, 1);
        let b = slab.reserve(0).unwrap();
        slab.fill(&b, 8, 2);
        let c = slab.reserve(0).unwrap();
        slab.fill(&c, 7, 3);
        let unfilled = slab.reserve(0).unwrap();
        let mut taken = Vec::new();
        assert_eq!(slab.take_owned(7, &mut |s| taken.push(s)), 2);
        taken.sort_unstable();
        assert_eq!(taken, [1, 3]);
        assert!(slab.complete(a.wr_id()).is_none(), "taken once");
        assert_eq!(slab.cancel(c), None, "the starter sees its op taken");
        assert_eq!(slab.take_owned(7, &mut |_| panic!("taken twice")), 0);
        assert_eq!(slab.complete(b.wr_id()), Some(2), "another owner's op");
        assert_eq!(slab.cancel(unfilled), None);
        assert_eq!(slab.in_use(), 0);
    }

    #[test]
    fn concurrent_reserve_release_never_hands_out_a_slot_twice() {
        let slab = Arc::new(OpSlab::<u32>::new(8, 2));
        let owners: Arc<Vec<AtomicU32>> = Arc::new((0..8).map(|_| AtomicU32::new(0)).collect());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let slab = slab.clone();
                let owners = owners.clone();
                std::thread::spawn(move || {
                    for k in 0..20_000 {
                        if let Some(r) = slab.reserve(k % 3) {
                            let prev = owners[r.index as usize].fetch_add(1, Ordering::SeqCst);
                            assert_eq!(prev, 0, "slot handed out twice");
                            owners[r.index as usize].fetch_sub(1, Ordering::SeqCst);
                            slab.cancel(r);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(slab.in_use(), 0);
    }
}

/// loom models of the slab: slots are never handed out twice, and a
/// completion takes its op's state exactly once, never a later op's.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::thread;

    /// Two threads reserve and release from one free list of two slots
    /// (the ABA pattern: a pop whose `next` went stale must fail its CAS);
    /// each checks it owns its slot alone while it holds it.
    #[test]
    fn loom_concurrent_reserve_release_never_shares_a_slot() {
        crate::sync::model("concurrent_reserve_release_never_shares_a_slot", 3, || {
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(2, 1));
            let worker = |slab: loom::sync::Arc<OpSlab<u32>>, me: u32| {
                for _ in 0..2 {
                    if let Some(r) = slab.reserve(0) {
                        slab.fill(&r, 0, me);
                        assert_eq!(slab.cancel(r), Some(me), "slot shared");
                    }
                }
            };
            let other = slab.clone();
            let t = thread::spawn(move || worker(other, 1));
            worker(slab.clone(), 2);
            t.join().unwrap();
            assert_eq!(slab.in_use(), 0);
            let a = slab.reserve(0).unwrap();
            let b = slab.reserve(0).unwrap();
            assert_ne!(a.index, b.index, "free list corrupted");
            assert!(slab.reserve(0).is_none(), "a slot listed twice");
        });
    }

    /// A close's scan (`take_owned`) races the op's own completion and the
    /// starter's cancel of a failed post: each op's state is taken exactly
    /// once, another owner's op is never taken, and a cancel that finds its
    /// op taken frees nothing (the slot goes back once).
    #[test]
    fn loom_take_owned_racing_completion_and_cancel() {
        crate::sync::model("take_owned_racing_completion_and_cancel", 3, || {
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(3, 1));
            let a = slab.reserve(0).unwrap();
            slab.fill(&a, 7, 1);
            let b = slab.reserve(0).unwrap();
            slab.fill(&b, 7, 2);
            let other = slab.reserve(0).unwrap();
            slab.fill(&other, 8, 3);
            let a_id = a.wr_id();
            let completer = {
                let slab = slab.clone();
                thread::spawn(move || slab.complete(a_id))
            };
            let starter = {
                let slab = slab.clone();
                thread::spawn(move || slab.cancel(b))
            };
            let mut taken = Vec::new();
            slab.take_owned(7, &mut |s| taken.push(s));
            let by_completion = completer.join().unwrap();
            let by_cancel = starter.join().unwrap();
            let mut all: Vec<u32> = taken
                .into_iter()
                .chain(by_completion)
                .chain(by_cancel)
                .collect();
            all.sort_unstable();
            assert_eq!(all, [1, 2], "each op taken exactly once");
            assert_eq!(slab.in_use(), 1, "only the other owner's op is left");
            assert_eq!(slab.cancel(other), Some(3));
            assert_eq!(slab.in_use(), 0);
        });
    }

    /// A completion (on a poller thread) races the reuse of its slot: an op
    /// is started and completed, and a stale completion for it arrives while
    /// another thread reserves the slot for a new op. The new op's state is
    /// never taken by the stale id, and each state is taken once.
    #[test]
    fn loom_stale_completion_never_takes_a_later_op() {
        crate::sync::model("stale_completion_never_takes_a_later_op", 3, || {
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(1, 1));
            let first = slab.reserve(0).unwrap();
            let old_id = first.wr_id();
            slab.fill(&first, 0, 1);
            let poller = {
                let slab = slab.clone();
                thread::spawn(move || {
                    let a = slab.complete(old_id);
                    let b = slab.complete(old_id);
                    (a, b)
                })
            };
            let starter = {
                let slab = slab.clone();
                thread::spawn(move || {
                    let r = slab.reserve(0)?;
                    slab.fill(&r, 0, 2);
                    Some(r.wr_id())
                })
            };
            let (a, b) = poller.join().unwrap();
            let new_id = starter.join().unwrap();
            assert_eq!(a, Some(1), "the completion takes its own op");
            assert_eq!(b, None, "exactly once");
            if let Some(id) = new_id {
                assert_ne!(id, old_id);
                assert_eq!(slab.complete(id), Some(2), "the new op is intact");
            }
            assert_eq!(slab.in_use(), 0);
        });
    }
}
