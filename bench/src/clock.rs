//! Time stamps of latency samples, cheap wherever the benchmark runs.
//!
//! A sample's interval contains about one reading of the clock (the end of
//! the first and the start of the second). With the kernel's clock on the
//! TSC that is a vDSO call of tens of nanoseconds; where the kernel reads
//! another clock source it is a system call and a device read: in the
//! Soft-RoCE VM (TCG, whose kernel finds the vCPUs' TSCs unsynchronized and
//! falls back to the HPET) `clock_gettime` takes 3-5 µs, about 2 µs of every
//! ~40 µs half round trip. perftest stamps with the TSC (`rdtsc`, 15 ns
//! there) and converts with the CPU's frequency. So does a [`Clock`] on
//! x86-64 when one reading of the OS clock costs more than
//! [`SLOW_OS_CLOCK_NS`]; it converts ticks with the rate it measures against
//! the OS clock over the test itself (from [`Clock::start`] to
//! [`Clock::ns_per_tick`]). Elsewhere it stamps with the OS clock, in
//! nanoseconds.

use crate::stats::Lat;
use std::time::Instant;

/// An OS clock reading above this (mean of a few) counts as slow.
pub const SLOW_OS_CLOCK_NS: f64 = 200.0;

/// Readings timed to decide.
const PROBES: u32 = 64;

/// A test's clock: started when the test starts, asked for its rate when
/// it ends.
pub struct Clock {
    t0: Instant,
    /// The TSC at `t0`, when stamping with the TSC.
    tsc0: Option<u64>,
}

impl Clock {
    /// Times the OS clock and picks the time stamp source.
    pub fn start() -> Clock {
        let t = Instant::now();
        for _ in 0..PROBES {
            std::hint::black_box(Instant::now());
        }
        let per_read = t.elapsed().as_nanos() as f64 / f64::from(PROBES + 1);
        Clock::new(per_read > SLOW_OS_CLOCK_NS)
    }

    /// A clock stamping with the TSC if `use_tsc` and there is one, else
    /// with the OS clock.
    pub fn new(use_tsc: bool) -> Clock {
        Clock {
            t0: Instant::now(),
            tsc0: use_tsc.then(tsc).flatten(),
        }
    }

    /// What the stamps count: `"tsc"` or `"os"`.
    pub fn source(&self) -> &'static str {
        if self.tsc0.is_some() {
            "tsc"
        } else {
            "os"
        }
    }

    /// A time stamp, in ticks. Subtract with `saturating_sub`: an unpinned
    /// thread that moved to a core whose TSC lags reads an earlier one.
    #[inline]
    pub fn now(&self) -> u64 {
        match self.tsc0 {
            Some(_) => tsc().unwrap_or(0),
            None => self.t0.elapsed().as_nanos() as u64,
        }
    }

    /// Nanoseconds per tick, measured from `start` until now (call it
    /// once the samples are taken: the longer the test, the closer).
    pub fn ns_per_tick(&self) -> f64 {
        let Some(c0) = self.tsc0 else { return 1.0 };
        let ticks = tsc().unwrap_or(c0).saturating_sub(c0);
        let ns = self.t0.elapsed().as_nanos() as f64;
        if ticks == 0 {
            1.0
        } else {
            ns / ticks as f64
        }
    }
}

impl Clock {
    /// The latency distribution of samples of `ticks` each, times `k`
    /// (1/2 for a half round trip).
    pub fn lat(&self, ticks: &[u64], k: f64) -> Lat {
        let ns = self.ns_per_tick() * k;
        Lat::new(ticks.iter().map(|&t| t as f64 * ns).collect())
    }
}

/// The time-stamp counter, where there is one.
#[inline]
fn tsc() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc exists on every x86-64 CPU and has no side effect.
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Either source's ticks, converted, measure a sleep as the OS clock
    /// measured it around them (no more, and at least half: a preemption
    /// between the stamps and the OS readings adds to the latter only).
    #[test]
    fn stamps_convert_to_the_os_clocks_nanoseconds() {
        for use_tsc in [false, true] {
            let c = Clock::new(use_tsc);
            let t = Instant::now();
            let a = c.now();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let b = c.now();
            let os = t.elapsed().as_nanos() as f64;
            let ns = b.saturating_sub(a) as f64 * c.ns_per_tick();
            assert!(
                (0.5 * os..=1.01 * os).contains(&ns),
                "{ns} ns for {os} ns by the OS clock ({})",
                c.source()
            );
        }
        assert_eq!(Clock::new(false).source(), "os");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(Clock::new(true).source(), "tsc");
    }
}
