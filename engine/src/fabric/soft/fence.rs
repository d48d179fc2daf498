//! Asymmetric fences for the soft fabric's wake-up rule (`link`, "Wake-ups").
//!
//! The rule is Dekker's: a producer publishes work, then reads a sleeper's
//! flag (`armed` of a CQ, `idle` of an end); the sleeper raises its flag,
//! then looks for work. Each side's store must be ordered before its load,
//! or both may miss the other (on x86 a load may pass an earlier store
//! still in the store buffer) and the work waits with its consumer asleep.
//! A full fence on both sides does it, but the producer's side runs on
//! every post and every match (three per send/receive pair), the sleeper's
//! only when a thread is about to sleep.
//!
//! So the cost goes to the sleeper: it raises its flag and issues a
//! [`heavy`] fence, `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which
//! returns only after every running thread of this process passed a full
//! barrier (and a thread not running passed one when it was switched out);
//! the producer issues a [`light`] fence, a compiler fence, free at run
//! time. Either the heavy fence's barrier reached the producer between its
//! store and its load (a full fence there), or after its load, so the
//! producer's store is visible to the sleeper's re-check; or before its
//! store, so the producer's load sees the raised flag. The asymmetric
//! Dekker of liburcu's and folly's `asymmetricHeavyBarrier`.
//!
//! The asymmetric fences are opt-in: `SANPATH_SOFT_FENCES=asymmetric` in
//! the environment, read once per process. Every `membarrier` interrupts
//! the process's other running threads, and a consumer arms whenever it
//! runs out of spin budget: 1 MiB send_bw (each message a ~30 us copy the
//! waiting side arms through) fell from 32 to 26 GB/s with them, while
//! 8 B send_lat gained less than the run-to-run noise on this machine.
//! By default, and where `membarrier` is missing (not Linux, a kernel
//! before 4.14, a seccomp filter), both sides issue a full fence, decided
//! once per process before any side relies on it.
//!
//! A rule whose sleeping side is rare ([`rare_light`], [`rare_heavy`]: an
//! `arm` that finds another thread dispatching the CQ's completions, which
//! the dispatching thread checks for at the end of every dispatch) uses
//! `membarrier` wherever it works, whatever the environment says: the
//! heavy side runs only before a sleep, never per message.
//!
//! Under loom, which cannot model the heavy
//! side, both are SeqCst fences: the model checks the rule's order of
//! stores, fences and loads (`loom_models` below).

#[cfg(not(loom))]
use std::sync::atomic::{AtomicU8, Ordering};

/// Not decided yet; else `DECIDED` with the bits below.
#[cfg(not(loom))]
const UNKNOWN: u8 = 0;
#[cfg(not(loom))]
const DECIDED: u8 = 1;
/// `membarrier` works: [`rare_light`] and [`rare_heavy`] use it.
#[cfg(not(loom))]
const MEMBARRIER: u8 = 2;
/// `SANPATH_SOFT_FENCES=asymmetric` too: [`light`] and [`heavy`] use it.
#[cfg(not(loom))]
const ASYMMETRIC: u8 = 4;

/// Which fences this process uses. Written once, from `UNKNOWN`, by the
/// first side that needs to know (all deciders compute the same value: a
/// race only repeats the registration); read by both sides.
#[cfg(not(loom))]
static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

#[cfg(all(target_os = "linux", not(loom)))]
use crate::fabric::membarrier::{
    membarrier, CMD_PRIVATE_EXPEDITED as MEMBARRIER_CMD_PRIVATE_EXPEDITED,
    CMD_REGISTER_PRIVATE_EXPEDITED as MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
};

#[cfg(not(loom))]
#[cold]
#[inline(never)]
fn decide() -> u8 {
    #[cfg(target_os = "linux")]
    let works = membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
        && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
    #[cfg(not(target_os = "linux"))]
    let works = false;
    let mut mode = DECIDED;
    if works {
        mode |= MEMBARRIER;
        #[cfg(target_os = "linux")]
        if std::env::var_os("SANPATH_SOFT_FENCES").is_some_and(|v| v == "asymmetric") {
            mode |= ASYMMETRIC;
        }
    }
    // Release: a side that reads MEMBARRIER runs after the registration.
    MODE.store(mode, Ordering::Release);
    mode
}

#[cfg(not(loom))]
#[inline(always)]
fn mode() -> u8 {
    match MODE.load(Ordering::Acquire) {
        UNKNOWN => decide(),
        m => m,
    }
}

/// A compiler fence if `bit` of the mode is set, else a full fence.
#[cfg(not(loom))]
#[inline(always)]
fn light_if(bit: u8) {
    if mode() & bit != 0 {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    } else {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// A full fence, and `membarrier` if `bit` of the mode is set.
#[cfg(not(loom))]
#[inline]
fn heavy_if(bit: u8) {
    std::sync::atomic::fence(Ordering::SeqCst);
    #[cfg(target_os = "linux")]
    if mode() & bit != 0 && !membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
        // It worked when the mode was decided (registered); a failure
        // now would break the rule, and nothing can stand in for it.
        panic!("membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) failed after it worked");
    }
}

/// The producer's fence, between publishing work and reading a sleeper's
/// flag: a compiler fence where sleepers issue [`heavy`] fences.
#[inline(always)]
pub(super) fn light() {
    #[cfg(not(loom))]
    light_if(ASYMMETRIC);
    #[cfg(loom)]
    crate::sync::fence(crate::sync::Ordering::SeqCst);
}

/// Whether [`light`] is a full fence (the default, symmetric fences): a
/// sleeper's full fence alone then orders the rule, and a re-check after it
/// that finds no work is final (`cq` keeps no cooling ends).
#[inline(always)]
pub(super) fn light_is_full() -> bool {
    #[cfg(not(loom))]
    return mode() & ASYMMETRIC == 0;
    #[cfg(loom)]
    true
}

/// The sleeper's fence, between raising its flag and looking for work:
/// every thread of the process passes a full barrier before it returns.
#[inline]
pub(super) fn heavy() {
    #[cfg(not(loom))]
    heavy_if(ASYMMETRIC);
    #[cfg(loom)]
    crate::sync::fence(crate::sync::Ordering::SeqCst);
}

/// [`light`] for a rule whose other side is rare (a thread about to sleep
/// while another holds what it needs): a compiler fence wherever
/// `membarrier` works, whatever `SANPATH_SOFT_FENCES` says, since the
/// [`rare_heavy`] it pairs with is paid seldom.
#[inline(always)]
pub(super) fn rare_light() {
    #[cfg(not(loom))]
    light_if(MEMBARRIER);
    #[cfg(loom)]
    crate::sync::fence(crate::sync::Ordering::SeqCst);
}

/// [`rare_light`] where [`rare_is_asymmetric`] was seen true (the mode
/// never changes once decided): a compiler fence, without a look at the
/// mode. For a side that is reached only after such a look (a post lock's
/// biased owner, `post_lock`).
#[inline(always)]
pub(super) fn biased_light() {
    #[cfg(not(loom))]
    {
        debug_assert!(rare_is_asymmetric(), "biased without membarrier");
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
    #[cfg(loom)]
    crate::sync::fence(crate::sync::Ordering::SeqCst);
}

/// Whether [`rare_light`] is only a compiler fence (`membarrier` works):
/// what a rule that relies on [`rare_heavy`] alone needs (`post_lock`).
#[inline]
pub(super) fn rare_is_asymmetric() -> bool {
    #[cfg(not(loom))]
    return mode() & MEMBARRIER != 0;
    #[cfg(loom)]
    true
}

/// The other side of [`rare_light`]: a full fence, and `membarrier`
/// wherever it works.
#[inline]
pub(super) fn rare_heavy() {
    #[cfg(not(loom))]
    heavy_if(MEMBARRIER);
    #[cfg(loom)]
    crate::sync::fence(crate::sync::Ordering::SeqCst);
}

/// Raises a sleeper's `flag` and issues the [`heavy`] fence: the caller
/// then looks for work, and a producer that published work it does not see
/// sees the flag (after its [`light`] fence).
#[inline]
pub(super) fn raise(flag: &crate::sync::AtomicBool) {
    flag.store(true, crate::sync::Ordering::Relaxed);
    heavy();
}

/// loom model of the wake-up rule with these fences: a producer publishes
/// work for an end, then (after [`light`]) reads the end's `idle` flag and
/// its CQ's `armed` flag, as `Link::wake` does; the consumer parks the end
/// (raises `idle` with a full fence, re-checks, as `cq`'s `settle`: no
/// heavy fence there, so the two may miss each other), then arms the CQ
/// (raises `armed`, re-checks its ends, the cooling one included, as
/// `SoftCq::arm`) and would sleep. The work must be seen by a re-check or
/// announced, and a sleeper that did not see it must be woken. Checked to
/// fail with the producer's `light` left out (its load passes its store:
/// both miss).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::sync::{fence, thread, Arc, AtomicBool, AtomicU32, Ordering};

    #[derive(Default)]
    struct End {
        work: AtomicU32,
        idle: AtomicBool,
        armed: AtomicBool,
    }

    #[test]
    fn loom_wake_rule_with_asymmetric_fences() {
        crate::sync::model("wake_rule_with_asymmetric_fences", 3, || {
            let e = Arc::new(End::default());
            let producer = {
                let e = e.clone();
                thread::spawn(move || {
                    e.work.store(1, Ordering::Release);
                    light();
                    let idle = e.idle.load(Ordering::Relaxed);
                    let armed = e.armed.load(Ordering::Relaxed);
                    (idle, armed)
                })
            };
            e.idle.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let idle_recheck_found = e.work.load(Ordering::Acquire) == 1;
            raise(&e.armed);
            let arm_recheck_found = e.work.load(Ordering::Acquire) == 1;
            let (saw_idle, saw_armed) = producer.join().unwrap();
            assert!(
                idle_recheck_found || arm_recheck_found || saw_idle,
                "work left on an idle end"
            );
            assert!(
                arm_recheck_found || saw_armed,
                "a sleeper missed the work and nobody woke it"
            );
        });
    }
}
