//! The post lock of an end: a spin lock biased towards the one thread that
//! posts on the end, which then takes and drops it with no locked
//! instruction.
//!
//! # Why
//!
//! A socket is nearly always posted on by one thread, yet every post paid
//! an atomic swap for the lock (~14 cycles of an 8-byte RDMA write's ~155
//! up to its copy). Biased locking moves that cost to the rare thread that
//! is not the owner: a second posting thread, a deregistration waiting for
//! posts (`quiesce_posts`), a remote key bound or revoked (`with_window`),
//! a break sealing the link, a test's fault hook.
//!
//! # Protocol
//!
//! `word` holds the lock bit, the owner's tag (0: none) and how often the
//! bias moved, which numbers the owner's *tenure*; `busy[t]` is the flag
//! of tenure `t`'s owner, set while it is inside the lock without the lock
//! bit. A tenure has one owner (a tag is never reused, and a tenure's
//! number is never given again), so no two threads write one `busy` flag:
//! one flag for all would let a former owner, whose stale look at `word`
//! still named it, clear the flag of the owner that replaced it while that
//! one is inside (the loom model below finds it).
//!
//! - **Owner** (`word` is its tag in tenure `t`, lock bit clear): stores
//!   `busy[t] = true`, issues a compiler fence ([`fence::biased_light`]:
//!   a lock is biased only where `membarrier` works, so the fast path
//!   does not look at the fence mode again), then loads `word` (Acquire).
//!   Unchanged: it holds the lock; dropping the guard stores
//!   `busy[t] = false` (Release). Otherwise it clears `busy[t]` and takes
//!   the slow path below.
//! - **Everyone else**, and the owner's slow path: sets the lock bit by a
//!   compare-and-swap (Acquire). If the bias names another thread, in
//!   tenure `t`, it then issues [`fence::rare_heavy`] (`membarrier`: every
//!   running thread of the process passes a full barrier) and waits until
//!   `busy[t]` is false (Acquire). Dropping the guard stores the new `word`
//!   without the lock bit (Release).
//!
//! Invariant: a thread touches the value only while it holds the lock
//! bit, or while it is the owner of tenure `t` with `busy[t]` set and saw
//! `word` unchanged (lock bit clear) after setting `busy[t]`. The two ways
//! exclude each other by the store-then-load rule of Dekker, made
//! asymmetric as in `fence`: either the heavy fence's barrier ran in the
//! owner between its store of `busy[t]` and its load of `word` (a full
//! fence there), or after its load (then its `busy[t] = true` is visible to
//! the waiter, which waits for the Release that ends the section), or
//! before its store (then its load sees the lock bit, set before the
//! barrier). A tenure that ended never comes back (`word` never takes its
//! value again), so an owner of an earlier tenure cannot pass its check.
//! The lock bit itself is a plain spin lock among the other threads.
//!
//! # Bias
//!
//! Only a posting thread ([`PostLock::lock`]) takes the bias: the first
//! one to post, and, after another thread's post took it away, that other
//! thread, for [`MOVES`] tenures in all; the next move makes the lock
//! *shared* for good (no owner: each taker pays the compare-and-swap,
//! nobody pays a `membarrier`), so two threads that keep posting on one
//! end pay the heavy fence a bounded number of times. Control paths
//! ([`PostLock::lock_control`]) revoke the bias for their section and
//! leave it where it was. Without `membarrier` (not Linux, an old kernel,
//! a seccomp filter: `fence`) no thread is ever given the bias.
//!
//! A thread's tag is a number drawn once from a process-wide counter, never
//! reused (a thread that exits cannot pass its bias to a stranger); a
//! thread that finds the counter exhausted never takes the bias.
//!
//! The loom models below check the protocol (with the heavy fence as a
//! `SeqCst` fence, which is what it provides).

use super::fence;
use crate::sync::{AtomicBool, AtomicU32, Ordering};
use std::ops::{Deref, DerefMut};

#[cfg(loom)]
use loom::cell::UnsafeCell;
#[cfg(not(loom))]
use std::cell::UnsafeCell;

/// `word`: a thread other than a biased owner in its fast path holds the
/// lock.
const LOCKED: u32 = 1;
/// `word`: how often the bias was taken from one posting thread by
/// another, the owner's tenure (`MOVES` once the lock is shared).
const MOVES_MASK: u32 = 0b110;
const MOVES_SHIFT: u32 = 1;
/// Tenures of owners; the move after the last makes the lock shared.
const MOVES: u32 = 3;
/// `word`: the owner's tag (a thread number shifted here), 0 for none.
const OWNER_SHIFT: u32 = 3;
/// The largest thread number a tag holds.
const MAX_THREAD: u32 = u32::MAX >> OWNER_SHIFT;
/// The tag of a thread that has none (ever): no `word` with its moves
/// bits cleared equals it.
const NO_TAG: u32 = u32::MAX;
/// A thread's tag before it is drawn: as [`NO_TAG`], no `word` with its
/// moves bits cleared equals it (its bit 1 is set), so the owner's fast
/// path needs no test for it.
const UNDRAWN: u32 = u32::MAX - 1;
/// `busy`'s length: one flag per tenure, and one more that no tenure uses
/// (`MOVES`, a shared word's), so that every value of the moves bits
/// indexes it without a bounds check.
const BUSY: usize = MOVES as usize + 1;

/// A lock for an end's posting side (see the module docs). `repr(C)`: the
/// two words first, sharing a line with the start of the value, as
/// `SpinLock` does.
#[repr(C)]
pub(super) struct PostLock<T> {
    /// `owner tag | moves | LOCKED`. The lock bit is set by a compare-and-
    /// swap (Acquire) and cleared by the holder's store (Release), which
    /// alone changes the owner and the moves.
    word: AtomicU32,
    /// Whether the owner of tenure `t` is inside the lock by its fast path
    /// (`busy[t]`). Written by that owner only; read by a taker of the lock
    /// bit that revokes the bias. `busy[MOVES]` is never written (a shared
    /// word has no owner).
    busy: [AtomicBool; BUSY],
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, and one guard exists
// at a time (module docs, "Invariant"), so it moves between threads as a
// `Mutex`'s does.
unsafe impl<T: Send> Sync for PostLock<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for PostLock<T> {}

/// How a guard releases its lock.
#[derive(Clone, Copy)]
enum Unlock {
    /// The owner's fast path, in this tenure: clear its `busy` flag.
    Fast(usize),
    /// Store this `word` (the lock bit clear).
    Word(u32),
}

/// Exclusive access to the value of a [`PostLock`].
pub(super) struct PostGuard<'a, T> {
    lock: &'a PostLock<T>,
    /// How the drop releases the lock.
    unlock: Unlock,
    #[cfg(loom)]
    ptr: loom::cell::MutPtr<T>,
}

impl<T> PostLock<T> {
    pub(super) fn new(value: T) -> PostLock<T> {
        PostLock {
            word: AtomicU32::new(0),
            busy: std::array::from_fn(|_| AtomicBool::new(false)),
            value: UnsafeCell::new(value),
        }
    }

    /// The guard of a thread that posts: by the fast path if the lock is
    /// biased to this thread, else by the slow path, which may give it the
    /// bias (module docs, "Bias").
    #[inline(always)]
    pub(super) fn lock(&self) -> PostGuard<'_, T> {
        if let Some(g) = self.lock_fast(seen_tag()) {
            return g;
        }
        self.lock_slow(thread_tag(), true)
    }

    /// The guard of a thread that does not post (a control path): the bias
    /// stays where it was.
    pub(super) fn lock_control(&self) -> PostGuard<'_, T> {
        self.lock_slow(thread_tag(), false)
    }

    /// The owner's fast path, for the thread tagged `tag` (or [`UNDRAWN`]).
    #[inline(always)]
    fn lock_fast(&self, tag: u32) -> Option<PostGuard<'_, T>> {
        // A plain look first: a thread that is not the owner pays no
        // fence (where `membarrier` is missing, nobody is).
        let word = self.word.load(Ordering::Relaxed);
        if word & !MOVES_MASK != tag {
            return None;
        }
        let busy = &self.busy[tenure(word)];
        busy.store(true, Ordering::Relaxed);
        // Only a lock whose slow path found `membarrier` working was biased
        // (`biasable`), and the fence mode never changes once decided: the
        // other side's `rare_heavy` is a `membarrier`.
        fence::biased_light();
        // Acquire: what the last holder of the lock bit wrote.
        if self.word.load(Ordering::Acquire) == word {
            return Some(self.guard(Unlock::Fast(tenure(word))));
        }
        // Release: a taker that waits for the flag reads what this thread
        // did in its previous fast-path section by then (it read those).
        busy.store(false, Ordering::Release);
        None
    }

    /// Takes the lock bit, revoking another thread's bias; `post`: a
    /// posting thread, which may take the bias.
    #[cold]
    #[inline(never)]
    fn lock_slow(&self, tag: u32, post: bool) -> PostGuard<'_, T> {
        let mut spins = 0u32;
        let word = loop {
            let w = self.word.load(Ordering::Relaxed);
            if w & LOCKED == 0
                && self
                    .word
                    .compare_exchange_weak(w, w | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break w;
            }
            backoff(&mut spins);
        };
        let owner = word >> OWNER_SHIFT;
        if owner != 0 && word & !MOVES_MASK != tag {
            // Biased to another thread, which may be inside by its fast
            // path: make it see the lock bit, or see it inside.
            fence::rare_heavy();
            let mut spins = 0u32;
            while self.busy[tenure(word)].load(Ordering::Acquire) {
                backoff(&mut spins);
            }
        }
        let moves = (word & MOVES_MASK) >> MOVES_SHIFT;
        let biasable = tag != NO_TAG && fence::rare_is_asymmetric();
        let unlock = if !post || word & !MOVES_MASK == tag || moves == MOVES {
            // A control path, the owner itself, or shared for good.
            word
        } else if biasable && owner == 0 {
            // The first posting thread (moves is 0: only a shared word has
            // no owner and moves).
            tag
        } else if biasable && moves + 1 < MOVES {
            tag | (moves + 1) << MOVES_SHIFT
        } else {
            MOVES << MOVES_SHIFT
        };
        debug_assert_eq!(unlock & LOCKED, 0, "the unlocked word has the lock bit");
        self.guard(Unlock::Word(unlock))
    }

    fn guard(&self, unlock: Unlock) -> PostGuard<'_, T> {
        PostGuard {
            lock: self,
            unlock,
            #[cfg(loom)]
            ptr: self.value.get_mut(),
        }
    }
}

impl<T> Deref for PostGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        #[cfg(not(loom))]
        // SAFETY: this guard is the only one (module docs, "Invariant"),
        // and its taking read what earlier holders wrote (Acquire).
        return unsafe { &*self.lock.value.get() };
        #[cfg(loom)]
        // SAFETY: as above; loom checks the claim.
        return unsafe { self.ptr.deref() };
    }
}

impl<T> DerefMut for PostGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        #[cfg(not(loom))]
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        return unsafe { &mut *self.lock.value.get() };
        #[cfg(loom)]
        // SAFETY: as above; loom checks the claim.
        return unsafe { self.ptr.deref() };
    }
}

impl<T> Drop for PostGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        match self.unlock {
            Unlock::Fast(t) => self.lock.busy[t].store(false, Ordering::Release),
            Unlock::Word(w) => self.lock.word.store(w, Ordering::Release),
        }
    }
}

/// The tenure a `word` with an owner names, an index of `busy` (below
/// [`BUSY`] for every `word`: no bounds check).
#[inline(always)]
fn tenure(word: u32) -> usize {
    let t = ((word & MOVES_MASK) >> MOVES_SHIFT) as usize;
    debug_assert!(t < MOVES as usize, "a shared word has no tenure");
    t
}

/// Waits a little: spins, then yields the core (on two cores the holder
/// may need it; under loom, always, so the model moves on).
fn backoff(spins: &mut u32) {
    *spins += 1;
    if cfg!(not(loom)) && *spins < 64 {
        std::hint::spin_loop();
    } else {
        crate::sync::thread::yield_now();
    }
}

#[cfg(not(loom))]
thread_local! {
    /// This thread's tag: [`UNDRAWN`] until [`thread_tag`] draws it.
    static TAG: std::cell::Cell<u32> = const { std::cell::Cell::new(UNDRAWN) };
}

/// This thread's tag if it was drawn, else [`UNDRAWN`]: what the owner's
/// fast path compares (one thread-local load; a thread without its tag is
/// no owner).
#[cfg(not(loom))]
#[inline(always)]
fn seen_tag() -> u32 {
    TAG.with(std::cell::Cell::get)
}

/// This thread's tag in a `word` (its number shifted into the owner's
/// place), drawn on first use; [`NO_TAG`] once the numbers ran out.
#[cfg(not(loom))]
fn thread_tag() -> u32 {
    use std::sync::atomic::AtomicU32;
    /// The last thread number drawn.
    static LAST: AtomicU32 = AtomicU32::new(0);
    #[cold]
    fn draw() -> u32 {
        let n = LAST
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_THREAD).then_some(n + 1)
            })
            .map_or(NO_TAG, |n| (n + 1) << OWNER_SHIFT);
        TAG.with(|t| t.set(n));
        n
    }
    match seen_tag() {
        UNDRAWN => draw(),
        t => t,
    }
}

/// Under loom: as [`thread_tag`] (loom's thread locals are not `const`).
#[cfg(loom)]
fn seen_tag() -> u32 {
    thread_tag()
}

/// Under loom: each model thread's tag, from its loom thread id.
#[cfg(loom)]
fn thread_tag() -> u32 {
    loom::thread_local! {
        static TAG: std::cell::Cell<u32> = std::cell::Cell::new(UNDRAWN);
    }
    static LAST: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    TAG.with(|t| {
        if t.get() == UNDRAWN {
            let n = LAST.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % MAX_THREAD + 1;
            t.set(n << OWNER_SHIFT);
        }
        t.get()
    })
}

/// loom models of the protocol, the heavy fence modelled as the `SeqCst`
/// fence it provides. loom checks that no two sections touch the value at
/// once (each guard holds loom's tracked pointer to it), the counts that
/// nothing is lost. Both checked to fail with the taker's wait for `busy`
/// left out, and the second with one `busy` flag for all tenures.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::sync::{thread, Arc};

    /// The lock biased to this thread, which posted once.
    fn biased() -> Arc<PostLock<u32>> {
        let l = Arc::new(PostLock::new(0u32));
        *l.lock() += 1;
        assert_eq!(
            l.word.load(Ordering::Relaxed),
            thread_tag(),
            "the first post takes the bias"
        );
        l
    }

    #[test]
    fn loom_post_lock_owner_fast_path_against_a_control_path() {
        crate::sync::model("post_lock_owner_against_control", 3, || {
            let l = biased();
            let control = {
                let l = l.clone();
                thread::spawn(move || *l.lock_control() += 1)
            };
            *l.lock() += 1;
            *l.lock() += 1;
            control.join().unwrap();
            assert_eq!(*l.lock(), 4);
            assert_eq!(
                l.word.load(Ordering::Relaxed),
                thread_tag(),
                "a control path leaves the bias where it was"
            );
        });
    }

    #[test]
    fn loom_post_lock_a_second_posting_thread_moves_the_bias() {
        crate::sync::model("post_lock_second_poster", 3, || {
            let l = biased();
            let poster = {
                let l = l.clone();
                thread::spawn(move || {
                    *l.lock() += 1;
                    *l.lock() += 1;
                })
            };
            *l.lock() += 1;
            *l.lock() += 1;
            poster.join().unwrap();
            assert_eq!(*l.lock(), 5);
        });
    }
}
