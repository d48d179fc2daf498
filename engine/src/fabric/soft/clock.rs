//! A cheap monotonic clock for the soft NIC's pollers, which read it on
//! every pass: the link's reaper to pace its reads of the peer's
//! acknowledgements, the CQ to age its cooling ends.

#[cfg(not(target_arch = "x86_64"))]
use std::time::Instant;

/// A cheap monotonic tick count: the time-stamp counter where there is one
/// (a few cycles, where a clock read costs tens of nanoseconds, which a
/// spinning poll pays on every pass), else nanoseconds of a process clock.
pub(super) fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86-64 processor and has no
        // memory effects.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}
