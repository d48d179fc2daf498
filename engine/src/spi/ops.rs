//! Overlapped op slots. A work request's id names its slot and the slot's
//! generation (`wr_id = generation << 32 | index`), so a completion can never
//! be applied to a later op that reuses the slot.
//!
//! The slab grows with use: its address space, `capacity` slots, is taken
//! at startup (one mapping the kernel makes resident only as it is
//! touched, in huge pages: see `SlotMemory`), and slots are initialised a batch at a time, when every
//! initialised one is in use, up to that capacity. So starting an op
//! allocates nothing, a slot never moves, and a provider allowed a million
//! ops in flight costs only the slots it ever used.
//!
//! A slot's state has no lock: its stamp hands it from the starter to the
//! one completion that claims it (see `Slot::stamp`). Free slots form
//! lock-free LIFOs (Treiber stacks), one per completion queue: slot `i`
//! always returns to list `i % lists`, and an op takes from the list of its
//! socket's CQ first, so the thread that starts and completes the ops of
//! one CQ (run-to-completion) never shares a cache line with the thread of
//! another (each slot is padded to its own lines, too), and the slot an op
//! gets is the one its list freed last, whose lines are the warmest. A head
//! packs the top index with a tag that changes on every successful update,
//! which defeats ABA: a pop that read `next` of a slot that was popped and
//! pushed back meanwhile fails its compare-exchange because the tag moved
//! on. A reservation and a release cost one compare-exchange each, however
//! many slots are in use: a scan for a free stamp costs a cache miss per
//! busy slot it passes, milliseconds with ten thousand receives pending.
//!
//! A thread also keeps up to [`CACHED`] slots it freed for its own next
//! ops ([`ThreadCache`]): taking one back and giving one up are plain loads
//! and stores, so a thread that starts and completes its ops (run to
//! completion) reserves and releases without a locked instruction. The
//! price: those slots are not free for other threads meanwhile, so a full
//! slab may refuse an op up to `CACHED` slots early per thread that keeps
//! some (at most [`CACHING_THREADS`] threads do); a slab of fewer than
//! [`CACHE_FROM`] slots keeps none, and its limit is exact.
//!
//! The state stays in its slot for the op's whole life: the starter builds
//! it there ([`OpSlab::fill`]) and the completion works on it there
//! ([`OpSlab::complete`]); only cold paths (a close's scan, a cancel, a
//! parked receive of socket duplication) move it out. Between ops a slot
//! keeps its last state, emptied: its registrations are all `None`.

use super::socket::OpSocket;
use super::types::Overlapped;
use crate::fabric::Sge;
use crate::mem::table::RegRef;
use crate::sync::{AtomicU32, AtomicU64, AtomicUsize, CachePadded, Mutex, Ordering, UnsafeCell};
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::PoisonError;

/// Most buffers one op may name (the soft NIC's and the config's SGE limit).
pub const MAX_SGE: usize = 16;

/// Entries an op keeps for being posted again (see [`OpState::sges`]); the
/// switch receives into one buffer at a time.
pub const KEPT_SGE: usize = 2;

/// The registration holds of one op, packed from the front.
pub type Regs = [Option<RegRef>; MAX_SGE];

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

    /// The placeholder an idle slot's state holds: never dereferenced,
    /// since only the state of a pending op is read.
    fn idle() -> OvPtr {
        OvPtr(NonNull::dangling())
    }

    pub fn get(&self) -> &Overlapped {
        // SAFETY: valid while the op is pending (constructor contract), and
        // only the `OvPtr` of a pending op is read (an idle slot's
        // placeholder never is).
        unsafe { self.0.as_ref() }
    }
}

/// The provider's private state of one pending op — "the op's memory" of
/// spec §6.1 step 2, released before the op's completion is signalled.
/// It lives in the op's slot; the small fields come first, so that an op
/// of one or two buffers touches the slot's first two cache lines only.
#[repr(C)]
pub struct OpState {
    /// The socket the op belongs to, kept alive by the op's entry in its
    /// close gate (see `socket::SocketTable`), which it leaves once its
    /// completion was signalled.
    pub socket: OpSocket,
    /// The switch's overlapped record.
    pub overlapped: OvPtr,
    /// A receive (its completion's opcode is not reliable on error).
    pub recv: bool,
    /// A receive's first [`KEPT_SGE`] entries (as many as `regs` holds,
    /// each covered by the registration at its index): a receive parked
    /// while its connection is re-established is posted again with them
    /// (`dup.rs`). Not all: every receive pays for the copy. Other ops
    /// leave what the slot had (never parked, never posted again).
    pub sges: [Sge; KEPT_SGE],
    /// Registrations the op uses; each holds its registration "in use".
    /// Packed: the `Some`s come first (release them with [`release_regs`]).
    /// All `None` in an idle slot, so a starter puts its holds in one by
    /// one, dropping nothing ([`OpState::push_reg`]).
    pub regs: Regs,
}

impl Default for OpState {
    /// An idle slot's state: no registrations, placeholders elsewhere.
    fn default() -> OpState {
        OpState {
            socket: OpSocket::idle(),
            overlapped: OvPtr::idle(),
            recv: false,
            sges: [Sge {
                addr: 0,
                len: 0,
                lkey: 0,
            }; KEPT_SGE],
            regs: Default::default(),
        }
    }
}

impl OpState {
    /// Puts the starter's hold `r` at index `n` of `regs`, where the holds
    /// packed before it end: over a `None` (an idle slot's), so nothing is
    /// dropped.
    #[inline(always)]
    pub fn push_reg(&mut self, n: usize, r: RegRef) {
        debug_assert!(n == 0 || self.regs[n - 1].is_some(), "holds not packed");
        let mine = &mut self.regs[n];
        debug_assert!(mine.is_none(), "an idle slot kept a hold");
        std::mem::forget(mine.replace(r));
    }

    /// Takes the op's socket out of the state, leaving the placeholder.
    #[inline]
    pub fn take_socket(&mut self) -> OpSocket {
        std::mem::replace(&mut self.socket, OpSocket::idle())
    }
}

/// Drops an op's registration holds, in place. They are packed from the
/// front, so the first `None` ends them and the rest of the array needs no
/// look.
#[inline]
pub fn release_regs(regs: &mut Regs) {
    for r in regs.iter_mut() {
        if r.take().is_none() {
            break;
        }
    }
    debug_assert!(
        regs.iter().all(Option::is_none),
        "op registrations not packed"
    );
}

/// [`release_regs`] for a completed op, on the completion's path: the
/// first two holds go together ([`RegRef::release_pair`]), one locked
/// instruction for an op whose two buffers lie in one registration.
#[inline(always)]
pub fn release_done_regs(regs: &mut Regs) {
    if let Some(first) = regs[0].take() {
        match regs[1].take() {
            Some(second) => {
                RegRef::release_pair(first, second);
                for r in &mut regs[2..] {
                    if r.take().is_none() {
                        break;
                    }
                }
            }
            None => drop(first),
        }
    }
    debug_assert!(
        regs.iter().all(Option::is_none),
        "op registrations not packed"
    );
}

/// Phases of a slot, in the low bits of its stamp.
const FREE: u64 = 0;
/// Taken by a starter; its state is being filled.
const RESERVED: u64 = 1;
/// Filled: the op may be posted and completed.
const PENDING: u64 = 2;
/// Claimed by the completion (or the starter's cancel) taking the state.
const TAKING: u64 = 3;

/// One op slot, alone on its cache line(s): the slots of different threads
/// never share a line.
struct Slot<S> {
    /// `generation << 32 | phase`. The phase goes `FREE → RESERVED` (by
    /// the starter whose pop took the slot off its free list, which also
    /// bumps the generation), `RESERVED → PENDING` (fill,
    /// by the starter, release: the state is visible to whoever claims it),
    /// `PENDING → TAKING` (a compare-exchange by the completer or the
    /// starter's cancel: exactly one claims the state of one generation)
    /// and `TAKING → FREE` (the claimer, before its push, whose release
    /// the next popper acquires: it is done with the state before the next
    /// starter writes it). A starter that never filled its slot frees it `RESERVED →
    /// FREE`. A completion whose generation or phase does not match claims
    /// nothing.
    stamp: AtomicU64,
    /// Next free slot of the list while this one is on it; meaningless
    /// otherwise. Written by the pusher before the head CAS publishes it.
    next: AtomicU32,
    /// Who the pending op belongs to (the SPI: its socket's address), so
    /// that a close can find its ops ([`OpSlab::take_owned`]). Written by
    /// the starter before its `PENDING` store (which publishes it), read by
    /// that scan after it saw `PENDING`.
    owner: AtomicUsize,
    /// The op's private state: written only by the starter between its
    /// reservation and its `PENDING` store, then read, worked on and
    /// emptied only by the thread whose compare-exchange claimed it, until
    /// its `FREE` store. No lock: the stamp orders them.
    state: UnsafeCell<S>,
}

/// A slab of op slots, each holding the private state `S` of a pending op
/// (the SPI's [`OpState`]; the loom models use plain numbers).
pub struct OpSlab<S = OpState> {
    /// Room for `capacity` slots, of which `0..grown` are initialised.
    /// Owned: allocated by `new`, freed by `drop`; a slot never moves.
    slots: NonNull<CachePadded<Slot<S>>>,
    /// Holds `slots`' memory, advised as huge pages (see `SlotMemory`).
    #[cfg(not(loom))]
    _memory: super::slots::SlotMemory,
    capacity: u32,
    /// Initialised slots. Only grows: stored (release) by `grow` after the
    /// slots, before they are pushed on the free lists; read (acquire) by
    /// whoever indexes a slot it did not reserve (a completion's id, the
    /// scans).
    grown: AtomicU32,
    /// Serialises `grow` (cold: once per doubling).
    growing: Mutex<()>,
    /// Free-list heads: low 32 bits the top slot index (or `NIL`), high 32
    /// bits a tag incremented by every successful push or pop. List `l`
    /// holds only initialised slots `i` with `i % heads.len() == l`.
    heads: Box<[CachePadded<AtomicU64>]>,
    /// The slots each caching thread keeps, by its [`thread_index`]; none
    /// for a slab of fewer than [`CACHE_FROM`] slots. An array: an index
    /// below [`CACHING_THREADS`] needs no other bound.
    caches: Option<Box<[CachePadded<ThreadCache>; CACHING_THREADS]>>,
}

/// Free slots a thread keeps for its next reservations.
pub const CACHED: usize = 4;
/// Threads that keep free slots; the others use the free lists only.
pub const CACHING_THREADS: usize = 64;
/// The smallest slab whose threads keep free slots.
pub const CACHE_FROM: usize = 1024;

/// The free slots one thread keeps ([`OpSlab::caches`]): initialised,
/// `FREE` and on no free list. Read and written only by the thread whose
/// [`thread_index`] names it, which the index makes one thread at a time:
/// a thread takes its index before its first use and gives it back only
/// when it exits, under `INDICES`' lock, which orders its last use before
/// the next owner's first. No other thread sees these slots (a close's scan
/// and the statistics read only stamps, `FREE` here).
#[derive(Default)]
struct ThreadCache {
    /// `slots[..len]` are kept; `len <= CACHED`.
    len: std::cell::Cell<u32>,
    slots: [std::cell::Cell<u32>; CACHED],
}

// SAFETY: each cache is used by one thread at a time (see `ThreadCache`).
unsafe impl Sync for ThreadCache {}

/// Indices of the threads that keep slots: a thread takes one at its first
/// reservation or release and gives it back when it exits. `(free, next)`:
/// indices given back, and the first never handed out.
#[cfg(not(loom))]
static INDICES: std::sync::Mutex<(Vec<usize>, usize)> = std::sync::Mutex::new((Vec::new(), 0));

/// `THREAD_INDEX` before the thread's first use.
#[cfg(not(loom))]
const UNSET: usize = usize::MAX;
/// `THREAD_INDEX` of a thread that keeps no slots (too many threads, or it
/// is exiting).
#[cfg(not(loom))]
const NO_INDEX: usize = usize::MAX - 1;

#[cfg(not(loom))]
thread_local! {
    /// This thread's index among the caching threads, [`UNSET`] or
    /// [`NO_INDEX`]: a plain word, so reading it costs a load.
    static THREAD_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(UNSET) };
    /// Gives the index back when the thread exits.
    static INDEX_GUARD: IndexGuard = const { IndexGuard };
}

/// Gives this thread's index back when it exits: the slots it kept pass to
/// the next thread that gets the index (no slot is lost).
#[cfg(not(loom))]
struct IndexGuard;

#[cfg(not(loom))]
impl Drop for IndexGuard {
    fn drop(&mut self) {
        let Ok(i) = THREAD_INDEX.try_with(|t| t.replace(NO_INDEX)) else {
            return;
        };
        if i < CACHING_THREADS {
            INDICES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0
                .push(i);
        }
    }
}

/// This thread's index among the caching threads; `None` if it keeps no
/// slots. Under loom none keeps any: the caches are thread-private, and the
/// models check the free lists.
#[inline]
fn thread_index() -> Option<usize> {
    #[cfg(not(loom))]
    {
        let i = THREAD_INDEX.with(std::cell::Cell::get);
        if i < CACHING_THREADS {
            return Some(i);
        }
        if i == UNSET {
            return take_thread_index();
        }
        None
    }
    #[cfg(loom)]
    None
}

/// A thread's first use: takes an index (if one is left) and arms the
/// guard that gives it back.
#[cfg(not(loom))]
#[cold]
#[inline(never)]
fn take_thread_index() -> Option<usize> {
    // Touching the guard registers its destructor; an exiting thread, whose
    // guard is gone, takes none.
    if INDEX_GUARD.try_with(|_| ()).is_err() {
        let _ = THREAD_INDEX.try_with(|t| t.set(NO_INDEX));
        return None;
    }
    let i = {
        let mut g = INDICES.lock().unwrap_or_else(PoisonError::into_inner);
        let (free, next) = &mut *g;
        free.pop().unwrap_or_else(|| {
            if *next < CACHING_THREADS {
                *next += 1;
                *next - 1
            } else {
                NO_INDEX
            }
        })
    };
    THREAD_INDEX.with(|t| t.set(i));
    (i < CACHING_THREADS).then_some(i)
}

/// The end of a free list.
const NIL: u32 = u32::MAX;

// SAFETY: a slot's state is accessed by one thread at a time, handed over
// through its stamp (see `Slot::state`); `S` crosses threads by value. The
// slab owns its slots (`slots` is a unique allocation).
unsafe impl<S: Send> Sync for OpSlab<S> {}
// SAFETY: as above: moving the slab moves the ownership of its slots.
unsafe impl<S: Send> Send for OpSlab<S> {}

/// Slots a slab initialises first, per list (then it doubles). One under
/// loom, so that its models grow the slab.
#[cfg(not(loom))]
const FIRST_GROWTH: usize = 64;
#[cfg(loom)]
const FIRST_GROWTH: usize = 1;

/// The op slab's address space could not be allocated.
#[derive(Debug)]
pub struct SlabTooLarge;

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

impl<S: Default> OpSlab<S> {
    /// Room for `capacity` slots spread over `lists` free lists; the first
    /// ones are initialised now, the rest as they are needed. Fails if the
    /// address space cannot be had.
    pub fn new(capacity: usize, lists: usize) -> Result<OpSlab<S>, SlabTooLarge> {
        assert!(
            capacity > 0 && capacity < u32::MAX as usize,
            "op slab size out of range"
        );
        let lists = lists.clamp(1, capacity);
        let layout = Layout::array::<CachePadded<Slot<S>>>(capacity).map_err(|_| SlabTooLarge)?;
        #[cfg(not(loom))]
        let memory = super::slots::SlotMemory::new(layout).map_err(|_| SlabTooLarge)?;
        #[cfg(not(loom))]
        let slots = memory.first().cast();
        #[cfg(loom)]
        // SAFETY: a slot is not zero-sized (it has a stamp), so neither is
        // the layout.
        let slots =
            NonNull::new(unsafe { std::alloc::alloc(layout) }.cast()).ok_or(SlabTooLarge)?;
        let slab = OpSlab {
            slots,
            #[cfg(not(loom))]
            _memory: memory,
            capacity: capacity as u32,
            grown: AtomicU32::new(0),
            growing: Mutex::new(()),
            heads: (0..lists)
                .map(|_| CachePadded::new(AtomicU64::new(u64::from(NIL))))
                .collect(),
            caches: (capacity >= CACHE_FROM).then(|| {
                (0..CACHING_THREADS)
                    .map(|_| CachePadded::new(ThreadCache::default()))
                    .collect::<Box<[_]>>()
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("CACHING_THREADS caches were made"))
            }),
        };
        slab.grow(0);
        Ok(slab)
    }

    /// Initialises the next batch of slots (as many again as there are,
    /// at least [`FIRST_GROWTH`] per list, at most up to the capacity),
    /// unless another thread grew the slab since the caller saw `seen`
    /// slots. False when it is at capacity.
    #[cold]
    #[inline(never)]
    fn grow(&self, seen: u32) -> bool {
        let _one = self.growing.lock().unwrap_or_else(PoisonError::into_inner);
        let from = self.grown.load(Ordering::Relaxed);
        if from != seen {
            return true;
        }
        if from == self.capacity {
            return false;
        }
        let lists = self.heads.len();
        let to = (from as usize)
            .saturating_mul(2)
            .max(FIRST_GROWTH * lists)
            .min(self.capacity as usize);
        for i in from as usize..to {
            // SAFETY: `i < capacity`: inside the allocation; slots
            // `grown..` are uninitialised and nobody looks at them (every
            // reader stays below a list's `len` or `grown`), and `growing`
            // makes this the only writer.
            unsafe {
                self.slots.as_ptr().add(i).write(CachePadded::new(Slot {
                    stamp: AtomicU64::new(stamp(0, FREE)),
                    next: AtomicU32::new(NIL),
                    owner: AtomicUsize::new(0),
                    state: UnsafeCell::new(S::default()),
                }));
            }
        }
        // `grown` first: a reservation that pops a new slot (below) must
        // find its completion's id below `grown`. Release: whoever sees it
        // sees the slots.
        self.grown.store(to as u32, Ordering::Release);
        for l in 0..lists {
            // The new slots of list `l`, lowest first on top.
            let first = from as usize + (l + lists - from as usize % lists) % lists;
            if first >= to {
                continue;
            }
            let mut last = first;
            while last + lists < to {
                self.slot(last as u32)
                    .next
                    .store((last + lists) as u32, Ordering::Relaxed);
                last += lists;
            }
            self.push_chain(l, first as u32, last as u32);
        }
        true
    }

    /// Takes a free slot, from list `hint` first, or `None` when every slot
    /// is in use and the slab is at capacity.
    #[inline(always)]
    pub fn reserve(&self, hint: usize) -> Option<Reserved> {
        if let Some(c) = self.cache() {
            let len = c.len.get();
            if len > 0 {
                c.len.set(len - 1);
                // `len <= CACHED`: the modulo only spares a bound check.
                return Some(self.take_free(c.slots[(len as usize - 1) % CACHED].get()));
            }
        }
        let n = self.heads.len();
        let first = if hint < n { hint } else { hint % n };
        if let Some(r) = self.pop(first) {
            return Some(r);
        }
        self.reserve_slow(first)
    }

    /// The other lists, then growth, while the first list was full.
    #[cold]
    #[inline(never)]
    fn reserve_slow(&self, first: usize) -> Option<Reserved> {
        let n = self.heads.len();
        loop {
            let seen = self.grown.load(Ordering::Acquire);
            if let Some(r) = (0..n).find_map(|k| self.pop((first + k) % n)) {
                return Some(r);
            }
            if !self.grow(seen) {
                return None;
            }
        }
    }

    /// Pops the top slot of free list `list`, if any.
    #[inline]
    fn pop(&self, list: usize) -> Option<Reserved> {
        let head_cell = &self.heads[list];
        // Acquire: pairs with the push that listed the top slot, so its
        // `next` (and its initialisation, for a slot of a new batch) and
        // the last claimer's use of its state happened before.
        let mut head = head_cell.load(Ordering::Acquire);
        loop {
            let index = head as u32;
            if index == NIL {
                return None;
            }
            let next = self.slot(index).next.load(Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            match head_cell.compare_exchange_weak(
                head,
                (tag << 32) | u64::from(next),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(self.take_free(index)),
                Err(actual) => head = actual,
            }
        }
    }

    /// Reserves free slot `index`, which this thread took off a free list
    /// or out of its cache: the next generation, `RESERVED`.
    #[inline]
    fn take_free(&self, index: u32) -> Reserved {
        let slot = self.slot(index);
        let was = slot.stamp.load(Ordering::Relaxed);
        debug_assert_eq!(was & 3, FREE, "a free slot is in use");
        let generation = ((was >> 32) as u32).wrapping_add(1);
        slot.stamp
            .store(stamp(generation, RESERVED), Ordering::Relaxed);
        Reserved { index, generation }
    }

    /// Works on the state of a slot this thread reserved, before it fills
    /// it: the starter puts parts of the op's state in place as it finds
    /// them. Whatever `work` leaves in the state is what [`OpSlab::fill`]
    /// builds on, or, if the op does not start, what [`OpSlab::cancel`]
    /// finds (leave it emptied then).
    #[inline(always)]
    pub fn prepare<R>(&self, r: &Reserved, work: impl FnOnce(&mut S) -> R) -> R {
        let slot = self.slot(r.index);
        debug_assert_eq!(
            slot.stamp.load(Ordering::Relaxed),
            stamp(r.generation, RESERVED)
        );
        // SAFETY: the slot is RESERVED by the caller: no other thread reads
        // or writes the state until the PENDING store (see `Slot::state`).
        slot.state.with_mut(|p| work(unsafe { &mut *p }))
    }

    /// Builds the op's state in its reserved slot (before posting): `build`
    /// writes it in place, over the emptied state of the slot's last op
    /// (and what [`OpSlab::prepare`] put there), and `owner` is what
    /// [`OpSlab::take_owned`] finds it by.
    #[inline(always)]
    pub fn fill(&self, r: &Reserved, owner: usize, build: impl FnOnce(&mut S)) {
        let slot = self.slot(r.index);
        debug_assert_eq!(
            slot.stamp.load(Ordering::Relaxed),
            stamp(r.generation, RESERVED)
        );
        slot.owner.store(owner, Ordering::Relaxed);
        // SAFETY: the slot is RESERVED by the caller (its compare-exchange
        // took it): no other thread reads or writes the state until the
        // PENDING store.
        slot.state.with_mut(|p| build(unsafe { &mut *p }));
        slot.stamp
            .store(stamp(r.generation, PENDING), Ordering::Release);
    }

    /// Returns a reserved slot whose op was never started, with the state
    /// it was filled with. `None` for a filled slot means a close's
    /// [`OpSlab::take_owned`] took the op first (and freed the slot): it
    /// completed the op, which therefore counts as started.
    pub fn cancel(&self, r: Reserved) -> Option<S> {
        let slot = self.slot(r.index);
        let now = slot.stamp.load(Ordering::Relaxed);
        if now == stamp(r.generation, RESERVED) {
            // Never filled: the state is the last op's, emptied (by the
            // starter, too, of what it prepared).
            self.release(r.index, r.generation);
            return None;
        }
        self.claim(r.index, r.generation)?;
        let state = self.take_state(r.index);
        self.release(r.index, r.generation);
        Some(state)
    }

    /// Completes the op named by `wr_id`: claims it, runs `finish` on its
    /// state in place (which must leave it emptied), frees the slot and
    /// returns what `finish` did. `None` if the id is stale or unknown
    /// (never for a completion of a posted op): `finish` does not run.
    #[inline]
    pub fn complete<R>(&self, wr_id: u64, finish: impl FnOnce(&mut S) -> R) -> Option<R> {
        let index = wr_id as u32;
        let generation = (wr_id >> 32) as u32;
        if index >= self.grown.load(Ordering::Acquire) {
            return None;
        }
        self.claim(index, generation)?;
        let slot = self.slot(index);
        // SAFETY: our claim made the state ours alone until the release
        // below (see `Slot::state`).
        let r = slot.state.with_mut(|p| finish(unsafe { &mut *p }));
        self.release(index, generation);
        Some(r)
    }

    /// Claims the op of generation `generation` of slot `index` (one
    /// compare-exchange; a stale id fails it and touches no state).
    #[inline]
    fn claim(&self, index: u32, generation: u32) -> Option<()> {
        let slot = self.slot(index);
        // Acquire: pairs with fill's release, so the state is visible.
        slot.stamp
            .compare_exchange(
                stamp(generation, PENDING),
                stamp(generation, TAKING),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()
            .map(drop)
    }

    /// Moves the state of a slot this thread claimed out (a cold path),
    /// leaving an idle state.
    fn take_state(&self, index: u32) -> S {
        // SAFETY: the caller claimed the slot: the state is its alone until
        // it releases the slot.
        self.slot(index)
            .state
            .with_mut(|p| std::mem::take(unsafe { &mut *p }))
    }

    /// Takes the state of every pending op filled with `owner`, frees its
    /// slot and hands the state to `f`; returns how many. A scan of the
    /// whole slab, for a close whose NIC did not flush (`spi/close.rs`).
    /// Each op is taken once, by this or by its completion, whichever
    /// claims it first; an op filled after the scan passed its slot is not
    /// seen.
    pub fn take_owned(&self, owner: usize, f: &mut dyn FnMut(S)) -> usize {
        let mut n = 0;
        for (index, slot) in self.initialised().enumerate() {
            // Acquire: pairs with fill's release, so `owner` is the op's.
            let now = slot.stamp.load(Ordering::Acquire);
            if now & 3 != PENDING || slot.owner.load(Ordering::Relaxed) != owner {
                continue;
            }
            let generation = (now >> 32) as u32;
            // A claim fails if the op completed (or the slot moved on) since.
            if self.claim(index as u32, generation).is_some() {
                let state = self.take_state(index as u32);
                self.release(index as u32, generation);
                f(state);
                n += 1;
            }
        }
        n
    }
}

impl<S> OpSlab<S> {
    /// Slot `index`, which the caller knows is initialised (it reserved or
    /// claimed it, or read `grown` past it).
    #[inline]
    fn slot(&self, index: u32) -> &CachePadded<Slot<S>> {
        debug_assert!(index < self.grown.load(Ordering::Relaxed));
        // SAFETY: initialised (the caller's knowledge, above), and slots
        // live, unmoved, until `drop`.
        unsafe { &*self.slots.as_ptr().add(index as usize) }
    }

    /// The initialised slots, in index order.
    fn initialised(&self) -> impl Iterator<Item = &CachePadded<Slot<S>>> {
        // Acquire: pairs with grow's release.
        (0..self.grown.load(Ordering::Acquire)).map(|i| self.slot(i))
    }

    /// Slots initialised so far.
    #[cfg(all(test, not(loom)))]
    fn grown(&self) -> usize {
        self.grown.load(Ordering::Acquire) as usize
    }

    /// Slots currently allocated (a scan; for tests and stats).
    pub fn in_use(&self) -> usize {
        self.initialised()
            .filter(|s| s.stamp.load(Ordering::Relaxed) & 3 != FREE)
            .count()
    }

    /// Reservations made since the slab was created: each takes its slot
    /// to the next generation. Reads every slot (statistics, not the data
    /// path); counts modulo 2^32 per slot.
    pub fn reserved_total(&self) -> u64 {
        self.initialised()
            .map(|s| s.stamp.load(Ordering::Relaxed) >> 32)
            .sum()
    }

    /// Frees a slot this thread reserved or claimed: back on top of its
    /// list, where the list's next op finds it.
    #[inline]
    fn release(&self, index: u32, generation: u32) {
        self.slot(index)
            .stamp
            .store(stamp(generation, FREE), Ordering::Relaxed);
        if let Some(c) = self.cache() {
            let len = c.len.get();
            if (len as usize) < CACHED {
                c.slots[len as usize].set(index);
                c.len.set(len + 1);
                return;
            }
        }
        self.push_chain(index as usize % self.heads.len(), index, index);
    }

    /// The slots this thread keeps, if it keeps any in this slab.
    #[inline(always)]
    fn cache(&self) -> Option<&ThreadCache> {
        let caches = self.caches.as_deref()?;
        Some(&caches[thread_index()?])
    }

    /// Pushes the chain `first ..= last` (linked by `next`, all of list
    /// `list`) on its free list.
    #[inline]
    fn push_chain(&self, list: usize, first: u32, last: u32) {
        let head_cell = &self.heads[list];
        let last = self.slot(last);
        let mut head = head_cell.load(Ordering::Relaxed);
        loop {
            last.next.store(head as u32, Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            // Release: the chain's links, and our use of each slot's state,
            // happen before the popper's acquire.
            match head_cell.compare_exchange_weak(
                head,
                (tag << 32) | u64::from(first),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => head = actual,
            }
        }
    }
}

impl<S> Drop for OpSlab<S> {
    fn drop(&mut self) {
        let grown = self.grown.load(Ordering::Acquire) as usize;
        // SAFETY: `&mut self`: no reference into the slots is left; slots
        // `0..grown` are initialised and dropped once here (their memory is
        // unmapped after this, with `_memory`).
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.slots.as_ptr(),
                grown,
            ));
        }
        #[cfg(loom)]
        {
            let layout = Layout::array::<CachePadded<Slot<S>>>(self.capacity as usize)
                .expect("checked in new");
            // SAFETY: allocated in `new` with this layout, freed only here,
            // after the slots were dropped.
            unsafe { std::alloc::dealloc(self.slots.as_ptr().cast(), layout) };
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reserve_all_then_exhausted_then_reuse_with_new_generation() {
        let slab = OpSlab::<u32>::new(3, 2).unwrap();
        let a = slab.reserve(0).unwrap();
        let b = slab.reserve(0).unwrap();
        let c = slab.reserve(1).unwrap();
        assert!(slab.reserve(1).is_none());
        assert_eq!(slab.in_use(), 3);
        let old = a.wr_id();
        slab.cancel(a);
        let d = slab.reserve(1).unwrap();
        assert_ne!(d.wr_id(), old, "a reused slot gets a new generation");
        assert!(
            slab.complete(old, std::mem::take).is_none(),
            "stale ids are ignored"
        );
        for r in [b, c, d] {
            slab.cancel(r);
        }
        assert_eq!(slab.in_use(), 0);
        assert_eq!(slab.reserved_total(), 4, "every reservation counted once");
    }

    #[test]
    fn a_release_hands_the_warmest_slot_to_the_next_op_and_busy_slots_are_passed() {
        let slab = OpSlab::<u32>::new(6, 2).unwrap();
        // List 1 holds slots 1, 3 and 5.
        let a = slab.reserve(1).unwrap();
        let b = slab.reserve(1).unwrap();
        assert_eq!((a.index, b.index), (1, 3));
        slab.fill(&a, 0, |s| *s = 10);
        assert_eq!(slab.complete(a.wr_id(), std::mem::take), Some(10));
        let c = slab.reserve(1).unwrap();
        assert_eq!(c.index, 1, "the slot just freed is reused");
        let d = slab.reserve(1).unwrap();
        assert_eq!(d.index, 5, "the busy slot 3 is passed");
        let e = slab.reserve(1).unwrap();
        assert_eq!(e.index % 2, 0, "a full list falls back to the other");
        for r in [b, c, d, e] {
            assert_eq!(slab.cancel(r), None);
        }
        assert_eq!(slab.in_use(), 0);
    }

    #[test]
    fn take_owned_takes_only_the_owners_pending_ops_once() {
        let slab = OpSlab::<u32>::new(4, 1).unwrap();
        let a = slab.reserve(0).unwrap();
        slab.fill(&a, 7, |s| *s = 1);
        let b = slab.reserve(0).unwrap();
        slab.fill(&b, 8, |s| *s = 2);
        let c = slab.reserve(0).unwrap();
        slab.fill(&c, 7, |s| *s = 3);
        let unfilled = slab.reserve(0).unwrap();
        let mut taken = Vec::new();
        assert_eq!(slab.take_owned(7, &mut |s| taken.push(s)), 2);
        taken.sort_unstable();
        assert_eq!(taken, [1, 3]);
        assert!(
            slab.complete(a.wr_id(), std::mem::take).is_none(),
            "taken once"
        );
        assert_eq!(slab.cancel(c), None, "the starter sees its op taken");
        assert_eq!(slab.take_owned(7, &mut |_| panic!("taken twice")), 0);
        assert_eq!(
            slab.complete(b.wr_id(), std::mem::take),
            Some(2),
            "another owner's op"
        );
        assert_eq!(slab.cancel(unfilled), None);
        assert_eq!(slab.in_use(), 0);
    }

    #[test]
    fn the_slab_initialises_slots_as_ops_need_them_up_to_its_capacity() {
        let probe = Arc::new(());
        let slab = OpSlab::<Option<Arc<()>>>::new(1000, 2).unwrap();
        assert_eq!(slab.grown(), 2 * FIRST_GROWTH, "the first batch");
        let mut held: Vec<_> = (0..2 * FIRST_GROWTH)
            .map(|k| slab.reserve(k).unwrap())
            .collect();
        assert_eq!(
            slab.grown(),
            2 * FIRST_GROWTH,
            "no growth while a slot is free"
        );
        assert!(
            slab.complete(2 * FIRST_GROWTH as u64, std::mem::take)
                .is_none(),
            "an id beyond the initialised slots"
        );
        held.push(slab.reserve(0).unwrap());
        assert_eq!(slab.grown(), 4 * FIRST_GROWTH, "doubled");
        while let Some(r) = slab.reserve(1) {
            slab.fill(&r, 0, |s| *s = Some(probe.clone()));
            held.push(r);
        }
        assert_eq!(
            (slab.grown(), held.len(), slab.in_use()),
            (1000, 1000, 1000)
        );
        let filled = 1000 - (2 * FIRST_GROWTH + 1);
        assert_eq!(Arc::strong_count(&probe), 1 + filled);
        // A completion frees a slot, which the next op reuses.
        let r = held.pop().unwrap();
        assert!(slab.complete(r.wr_id(), std::mem::take).unwrap().is_some());
        assert!(slab.reserve(0).is_some());
        // Dropping the slab drops every initialised slot's state once.
        drop(slab);
        assert_eq!(Arc::strong_count(&probe), 1);
    }

    /// Free slots on the free lists and kept by threads; with no thread
    /// using the slab, their sum is every initialised slot not in use.
    fn free_slots(slab: &OpSlab<u32>) -> (usize, usize) {
        let mut listed = 0;
        for head in slab.heads.iter() {
            let mut at = head.load(Ordering::Acquire) as u32;
            while at != NIL {
                listed += 1;
                at = slab.slot(at).next.load(Ordering::Relaxed);
            }
        }
        let kept = slab
            .caches
            .iter()
            .flat_map(|c| c.iter())
            .map(|c| c.len.get() as usize)
            .sum();
        (listed, kept)
    }

    #[test]
    fn a_thread_takes_back_the_slots_it_freed_without_the_free_lists() {
        let slab = OpSlab::<u32>::new(CACHE_FROM, 2).unwrap();
        let a = slab.reserve(0).unwrap();
        let b = slab.reserve(1).unwrap();
        let (ia, ib) = (a.index, b.index);
        let heads: Vec<u64> = slab
            .heads
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect();
        slab.fill(&a, 0, |s| *s = 1);
        assert_eq!(slab.complete(a.wr_id(), std::mem::take), Some(1));
        assert_eq!(slab.cancel(b), None);
        let again = [slab.reserve(1).unwrap(), slab.reserve(0).unwrap()];
        assert_eq!(
            (again[0].index, again[1].index),
            (ib, ia),
            "the slots freed last come back first"
        );
        let now: Vec<u64> = slab
            .heads
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect();
        assert_eq!(heads, now, "the free lists were not touched");
        for r in again {
            slab.cancel(r);
        }
        assert_eq!(slab.in_use(), 0);
    }

    #[test]
    fn a_small_slab_keeps_no_slots_in_threads() {
        let slab = OpSlab::<u32>::new(CACHE_FROM - 1, 1).unwrap();
        let r = slab.reserve(0).unwrap();
        slab.cancel(r);
        assert_eq!(free_slots(&slab), (slab.grown(), 0));
    }

    /// Threads that keep slots start, use the slab and exit, more of them
    /// than keep slots at once: no slot is handed out twice, and once they
    /// are gone every slot is free, listed or kept for the next thread.
    #[test]
    fn slots_kept_by_threads_are_never_shared_nor_lost() {
        let slab = Arc::new(OpSlab::<u32>::new(CACHE_FROM, 2).unwrap());
        let owners: Arc<Vec<AtomicU32>> =
            Arc::new((0..CACHE_FROM).map(|_| AtomicU32::new(0)).collect());
        for round in 0..(CACHING_THREADS / 4 + 2) {
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let (slab, owners) = (slab.clone(), owners.clone());
                    std::thread::spawn(move || {
                        let mut held = Vec::new();
                        for k in 0..2_000 {
                            if k % 3 != 2 && held.len() < 2 * CACHED + 1 {
                                let r = slab.reserve(t).expect("room");
                                let prev = owners[r.index as usize].fetch_add(1, Ordering::SeqCst);
                                assert_eq!(prev, 0, "slot handed out twice (round {round})");
                                slab.fill(&r, 0, |s| *s = r.index);
                                held.push(r);
                            } else if let Some(r) = held.pop() {
                                owners[r.index as usize].fetch_sub(1, Ordering::SeqCst);
                                let id = r.wr_id();
                                assert_eq!(slab.complete(id, std::mem::take), Some(r.index));
                            }
                        }
                        for r in held {
                            owners[r.index as usize].fetch_sub(1, Ordering::SeqCst);
                            slab.cancel(r);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        assert_eq!(slab.in_use(), 0);
        let (listed, kept) = free_slots(&slab);
        assert!(kept <= CACHED * CACHING_THREADS, "{kept} kept");
        assert_eq!(listed + kept, slab.grown(), "a slot was lost");
    }

    #[test]
    fn concurrent_reserve_release_never_hands_out_a_slot_twice() {
        let slab = Arc::new(OpSlab::<u32>::new(8, 2).unwrap());
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

    /// Two threads reserve and release from one free list of two slots,
    /// popping and pushing its head concurrently: each thread checks it
    /// owns its slot alone while it holds it.
    #[test]
    fn loom_concurrent_reserve_release_never_shares_a_slot() {
        crate::sync::model("concurrent_reserve_release_never_shares_a_slot", 3, || {
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(2, 1).unwrap());
            let worker = |slab: loom::sync::Arc<OpSlab<u32>>, me: u32| {
                for _ in 0..2 {
                    if let Some(r) = slab.reserve(0) {
                        slab.fill(&r, 0, |s| *s = me);
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
            assert_ne!(a.index, b.index, "one slot reserved twice");
            assert!(slab.reserve(0).is_none(), "a slot left behind");
        });
    }

    /// A starter holds the one initialised slot of a slab that may grow to
    /// three; another thread's reservation grows it, and the first starter
    /// reserves again meanwhile, perhaps through the length the growth
    /// published on its fast path: whatever slot each finds was initialised
    /// before it looked, no slot is handed out twice, each op keeps its own
    /// state.
    #[test]
    fn loom_growth_racing_a_reservation() {
        crate::sync::model("growth_racing_a_reservation", 3, || {
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(3, 1).unwrap());
            assert_eq!(slab.grown.load(Ordering::Relaxed), 1);
            let held = slab.reserve(0).unwrap();
            slab.fill(&held, 0, |s| *s = 1);
            let other = {
                let slab = slab.clone();
                thread::spawn(move || {
                    let r = slab.reserve(0).expect("room for three");
                    slab.fill(&r, 0, |s| *s = 2);
                    slab.complete(r.wr_id(), std::mem::take)
                })
            };
            let r = slab.reserve(0).expect("room for three");
            slab.fill(&r, 0, |s| *s = 3);
            assert_eq!(slab.complete(r.wr_id(), std::mem::take), Some(3));
            assert_eq!(other.join().unwrap(), Some(2));
            assert_eq!(slab.complete(held.wr_id(), std::mem::take), Some(1));
            assert_eq!(slab.in_use(), 0);
        });
    }

    /// ABA on a free list: one thread's pop reads the top slot and its
    /// `next`, then another pops that slot and the next one and pushes the
    /// first back; the stale pop must fail its compare-exchange (the head's
    /// tag moved on) rather than hand out the second slot again.
    #[test]
    fn loom_a_stale_pop_never_hands_out_a_held_slot() {
        crate::sync::model("a_stale_pop_never_hands_out_a_held_slot", 3, || {
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(3, 1).unwrap());
            // All three slots initialised (the slab grows to them) and free.
            for r in [0, 1, 2].map(|_| slab.reserve(0).unwrap()) {
                slab.cancel(r);
            }
            let other = {
                let slab = slab.clone();
                thread::spawn(move || {
                    let r = slab.reserve(0).expect("a free slot");
                    slab.fill(&r, 0, |s| *s = 1);
                    assert_eq!(slab.cancel(r), Some(1), "slot shared");
                })
            };
            let a = slab.reserve(0).unwrap();
            let b = slab.reserve(0).unwrap();
            slab.fill(&b, 0, |s| *s = 3);
            assert_eq!(slab.cancel(a), None);
            let c = slab.reserve(0).unwrap();
            slab.fill(&c, 0, |s| *s = 4);
            other.join().unwrap();
            assert_eq!(slab.cancel(b), Some(3), "slot shared");
            assert_eq!(slab.cancel(c), Some(4), "slot shared");
            assert_eq!(slab.in_use(), 0);
        });
    }

    /// A close's scan (`take_owned`) races the op's own completion and the
    /// starter's cancel of a failed post: each op's state is taken exactly
    /// once, another owner's op is never taken, and a cancel that finds its
    /// op taken frees nothing (the slot goes back once).
    #[test]
    fn loom_take_owned_racing_completion_and_cancel() {
        crate::sync::model("take_owned_racing_completion_and_cancel", 3, || {
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(3, 1).unwrap());
            let a = slab.reserve(0).unwrap();
            slab.fill(&a, 7, |s| *s = 1);
            let b = slab.reserve(0).unwrap();
            slab.fill(&b, 7, |s| *s = 2);
            let other = slab.reserve(0).unwrap();
            slab.fill(&other, 8, |s| *s = 3);
            let a_id = a.wr_id();
            let completer = {
                let slab = slab.clone();
                thread::spawn(move || slab.complete(a_id, std::mem::take))
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
            let slab = loom::sync::Arc::new(OpSlab::<u32>::new(1, 1).unwrap());
            let first = slab.reserve(0).unwrap();
            let old_id = first.wr_id();
            slab.fill(&first, 0, |s| *s = 1);
            let poller = {
                let slab = slab.clone();
                thread::spawn(move || {
                    let a = slab.complete(old_id, std::mem::take);
                    let b = slab.complete(old_id, std::mem::take);
                    (a, b)
                })
            };
            let starter = {
                let slab = slab.clone();
                thread::spawn(move || {
                    let r = slab.reserve(0)?;
                    slab.fill(&r, 0, |s| *s = 2);
                    Some(r.wr_id())
                })
            };
            let (a, b) = poller.join().unwrap();
            let new_id = starter.join().unwrap();
            assert_eq!(a, Some(1), "the completion takes its own op");
            assert_eq!(b, None, "exactly once");
            if let Some(id) = new_id {
                assert_ne!(id, old_id);
                assert_eq!(
                    slab.complete(id, std::mem::take),
                    Some(2),
                    "the new op is intact"
                );
            }
            assert_eq!(slab.in_use(), 0);
        });
    }
}
