//! Deadlines for spin loops, read from the kernel's coarse monotonic clock.
//!
//! A spinning wait checks its timeout now and then, and the check must cost
//! little next to a poll. `Instant::now()` reads `CLOCK_MONOTONIC`: a vDSO
//! call of tens of nanoseconds where the kernel's clock source is the TSC,
//! but a system call and a device read where the vDSO cannot read the clock
//! source (the Soft-RoCE VM: QEMU TCG, clock source HPET, several
//! microseconds per reading). `CLOCK_MONOTONIC_COARSE` is the same clock as
//! of the kernel's last timekeeping update: the vDSO answers it from the
//! timekeeping data page whatever the clock source (Linux
//! `lib/vdso/gettimeofday.c`, `do_coarse`), no system call and no device
//! read, at the resolution of one tick (`clock_getres`: 1-10 ms with
//! `CONFIG_HZ` 1000-100).
//!
//! A [`CoarseDeadline`] made for `t` passes once the coarse clock reads its
//! reading at creation plus `t` plus [`PAD_TICKS`] resolutions. The coarse
//! clock is the fine clock's value at the last timekeeping update, so it
//! trails the fine clock by up to a tick plus however late that tick's
//! interrupt came: one resolution of padding is not enough (on a KVM guest
//! with 4 ms ticks, a 4 ms deadline padded by one tick passed after
//! 3.993 ms on the fine clock in 5 of 55 test runs), two are while no
//! tick comes a whole tick late. Then the deadline never passes before `t`
//! elapsed on the fine clock, and it passes less than three ticks after
//! (the padding, and how far the reading that sees it trails), plus the
//! time between the loop's checks. A tick a whole tick late (a vCPU the
//! host did not run for milliseconds; Linux makes another CPU update after
//! five stalled ticks) lets a deadline made meanwhile pass early by the
//! excess. So: for timeouts that detect a dead peer or a stuck operation,
//! where a few ticks do not matter; never for measuring time or for sleeps
//! shorter than a few ticks.

use std::time::Duration;

/// Resolutions of the coarse clock a deadline is padded by (module docs).
pub const PAD_TICKS: u32 = 2;

/// A point on the coarse monotonic clock by which a spinning wait gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoarseDeadline {
    /// The coarse clock's reading from which on the deadline has passed
    /// (creation's reading + timeout + [`PAD_TICKS`] resolutions).
    at: Duration,
}

impl CoarseDeadline {
    /// The deadline `t` from now: passes at least `t` later, less than
    /// three ticks after that (module docs).
    pub fn after(t: Duration) -> CoarseDeadline {
        CoarseDeadline {
            at: now()
                .saturating_add(t)
                .saturating_add(resolution() * PAD_TICKS),
        }
    }

    /// Whether it passed: one reading of the coarse clock.
    #[inline]
    pub fn passed(&self) -> bool {
        now() >= self.at
    }

    /// How long until it passes as the coarse clock sees it now: at least
    /// the time left on the fine clock, less than three ticks more.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_sub(now())
    }
}

/// The coarse clock's step: a tick (`clock_getres`), read once.
pub fn resolution() -> Duration {
    static RES: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *RES.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the call's
        // duration; CLOCK_MONOTONIC_COARSE exists on every Linux since
        // 2.6.32, and on an error `ts` keeps its zeros.
        unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        timespec(ts)
    })
}

/// The coarse monotonic clock, since boot: the fine clock as of the last
/// tick.
#[inline]
fn now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `resolution`; the vDSO answers without a system call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    timespec(ts)
}

fn timespec(ts: libc::timespec) -> Duration {
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// How late past its three ticks a deadline may be seen here (the median
    /// of 40): the loop checks on every pass, but a loaded 2-core machine
    /// does not always run it.
    const SLACK: Duration = Duration::from_millis(50);

    /// The coarse clock's step is a tick of a sane kernel (1-10 ms).
    #[test]
    fn the_resolution_is_a_tick() {
        let r = resolution();
        assert!(
            r >= Duration::from_micros(100) && r <= Duration::from_millis(10),
            "{r:?}"
        );
    }

    /// A coarse deadline never passes before its time on the fine clock
    /// and passes within three ticks (+ slack) after it, for timeouts
    /// shorter, as long as and longer than a tick.
    #[test]
    fn a_coarse_deadline_is_never_early_and_at_most_three_ticks_late() {
        let tick = resolution();
        let mut lateness = Vec::new();
        for t in [Duration::ZERO, tick / 3, tick, 3 * tick + tick / 2]
            .into_iter()
            .cycle()
            .take(40)
        {
            let start = Instant::now();
            let d = CoarseDeadline::after(t);
            let give_up = start + t + 3 * tick + Duration::from_secs(5);
            loop {
                let passed = d.passed();
                // Read after the check that passed: "fired < t" would
                // mean it passed early.
                let fired = Instant::now() - start;
                if passed {
                    assert!(fired >= t, "{t:?} deadline passed after {fired:?}");
                    lateness.push(fired - t);
                    break;
                }
                assert!(start + fired < give_up, "{t:?} deadline never passed");
            }
        }
        lateness.sort();
        let median = lateness[lateness.len() / 2];
        assert!(median < 3 * tick + SLACK, "lateness {lateness:?}");
    }

    /// What is left shrinks to zero exactly when the deadline passes.
    #[test]
    fn remaining_is_zero_once_passed() {
        let d = CoarseDeadline::after(Duration::from_secs(3600));
        assert!(!d.passed());
        assert!(d.remaining() > Duration::from_secs(3599));
        let past = CoarseDeadline { at: Duration::ZERO };
        assert!(past.passed());
        assert_eq!(past.remaining(), Duration::ZERO);
    }
}
