//! Page-aligned memory for registration: anonymous mappings, optionally
//! locked into RAM, and a probe that tells whether a range is mapped.
//!
//! A [`Region`] is memory the NIC may read and write behind the program's
//! back once it is registered. The region therefore never hands out Rust
//! references to its bytes: it exposes a raw pointer for registration and
//! work requests, and copies in and out through [`Region::write_at`] and
//! [`Region::read_at`], which use relaxed word-sized atomic accesses so that
//! two threads copying concurrently never form a data race between
//! themselves. Keeping those copies from racing with NIC access to the same
//! bytes (a receive landing, an RDMA write arriving) is the caller's job, as
//! the registration contract of [`crate::fabric::Nic::register`] says.

use crate::config::MlockPolicy;
use memmap2::{MmapMut, MmapOptions};
use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Why a region could not be created or a copy was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// A region of zero bytes was requested.
    #[error("a registered-memory region must not be empty")]
    Empty,
    /// The length overflows when rounded up to the page size.
    #[error("a region of {0} bytes is too large")]
    TooLarge(usize),
    /// The anonymous mapping failed.
    #[error("cannot map {size} of registered memory: {source}")]
    Map {
        size: ByteSize,
        #[source]
        source: io::Error,
    },
    /// `mlock` failed under [`MlockPolicy::Require`].
    #[error(
        "cannot lock {requested} of registered memory: RLIMIT_MEMLOCK is {limit} \
         (raise it with `ulimit -l` or set mem.mlock = \"try\")"
    )]
    Lock {
        requested: ByteSize,
        /// The soft `RLIMIT_MEMLOCK` at the time of the failure.
        limit: MemlockLimit,
        #[source]
        source: io::Error,
    },
    /// A copy named bytes outside the region.
    #[error("{len} bytes at offset {offset} are outside a region of {region_len} bytes")]
    OutOfRange {
        offset: usize,
        len: usize,
        region_len: usize,
    },
}

/// A byte count printed the way people read limits: `64 MiB`, `12 KiB`,
/// `100 bytes` (the largest binary unit that divides it exactly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        let n = self.0;
        for (unit, name) in UNITS {
            if n >= unit && n % unit == 0 {
                return write!(f, "{} {}", n / unit, name);
            }
        }
        write!(f, "{n} bytes")
    }
}

/// A soft `RLIMIT_MEMLOCK` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemlockLimit {
    Unlimited,
    Bytes(u64),
    /// `getrlimit` itself failed.
    Unknown,
}

impl MemlockLimit {
    /// The current soft limit of this process.
    pub fn current() -> MemlockLimit {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable `rlimit` for the duration of
        // the call; getrlimit only writes it.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
        if rc != 0 {
            MemlockLimit::Unknown
        } else if lim.rlim_cur == libc::RLIM_INFINITY {
            MemlockLimit::Unlimited
        } else {
            MemlockLimit::Bytes(lim.rlim_cur)
        }
    }
}

impl fmt::Display for MemlockLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemlockLimit::Unlimited => f.write_str("unlimited"),
            MemlockLimit::Bytes(n) => ByteSize(*n).fmt(f),
            MemlockLimit::Unknown => f.write_str("unknown"),
        }
    }
}

/// The system page size (a power of two).
pub fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    let cached = PAGE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if raw > 0 && (raw as usize).is_power_of_two() {
        raw as usize
    } else {
        4096
    };
    PAGE.store(page, Ordering::Relaxed);
    page
}

/// Whether every page of `[addr, addr+len)` is mapped in this process
/// (`mincore` over the page-aligned span; `ENOMEM` means a hole). An empty
/// range is trivially mapped; a range that wraps the address space is not.
/// Mapped but inaccessible pages (`PROT_NONE`) count as mapped.
pub fn check_mapped(addr: usize, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    let page = page_size();
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let start = addr & !(page - 1);
    let Some(end) = end.checked_add(page - 1).map(|e| e & !(page - 1)) else {
        return false;
    };
    // mincore writes one byte per page; probe in bounded chunks so the
    // vector lives on the stack whatever the range's size.
    const CHUNK_PAGES: usize = 512;
    let mut vec = [0u8; CHUNK_PAGES];
    let mut at = start;
    while at < end {
        let pages = ((end - at) / page).min(CHUNK_PAGES);
        let span = pages * page;
        // SAFETY: `at` is page-aligned and `vec` has room for the `pages`
        // bytes mincore writes for a span of `pages` pages. mincore only
        // inspects the page tables; it never dereferences the range.
        let rc = unsafe { libc::mincore(at as *mut libc::c_void, span, vec.as_mut_ptr()) };
        if rc != 0 {
            // ENOMEM: part of the span is unmapped (or beyond the user
            // address space). Anything else: we cannot vouch for it either.
            return false;
        }
        at += span;
    }
    true
}

/// `len` rounded up to whole pages: not 0, at most `max`.
pub(super) fn whole_pages(len: usize, max: usize) -> Result<usize, MemError> {
    if len == 0 {
        return Err(MemError::Empty);
    }
    let page = page_size();
    len.checked_add(page - 1)
        .map(|l| l & !(page - 1))
        .filter(|&l| l <= max)
        .ok_or(MemError::TooLarge(len))
}

/// Locks `len` bytes at `ptr` according to `policy`: whether they are
/// locked, or the error `Require` makes of a failure.
///
/// # Safety
/// `[ptr, ptr+len)` is mapped memory the caller owns.
pub(super) unsafe fn lock(
    ptr: NonNull<u8>,
    len: usize,
    policy: MlockPolicy,
) -> Result<bool, MemError> {
    if policy == MlockPolicy::Off {
        return Ok(false);
    }
    // SAFETY: the caller's range (see above); mlock only pins its pages.
    if unsafe { libc::mlock(ptr.as_ptr().cast(), len) } == 0 {
        return Ok(true);
    }
    if policy == MlockPolicy::Require {
        return Err(MemError::Lock {
            requested: ByteSize(len as u64),
            limit: MemlockLimit::current(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(false)
}

/// Page-aligned, zero-filled anonymous memory meant for registration.
///
/// The region owns its mapping; dropping it unlocks (if locked) and unmaps.
/// Whoever registered it with a NIC must deregister it before dropping.
pub struct Region {
    /// The whole mapping, taken once from the owned map at construction.
    pages: Pages,
    /// The mapping. Never dereferenced as a slice after construction: all
    /// access goes through `pages`, so no Rust reference ever aliases
    /// memory the NIC writes.
    _map: MmapMut,
}

/// Page-aligned memory that a [`Region`] or a [`Chunk`](super::pool::Chunk) owns: where it is,
/// how long, whether it is locked.
#[derive(Debug)]
pub struct Pages {
    /// Start (page-aligned).
    pub(super) ptr: NonNull<u8>,
    /// Length: the requested length rounded up to the page size.
    pub(super) len: usize,
    /// Whether `mlock` succeeded (then the owner's drop calls `munlock`).
    pub(super) locked: bool,
}

impl Pages {
    /// Start of the memory (page-aligned). Valid while its owner lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Start address, as registration calls take it.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes (a multiple of the page size, never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: at least one page. (For clippy's
    /// `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the memory is locked into RAM.
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Unlocks the memory if it is locked (its owner's drop).
    pub(super) fn unlock(&self) {
        if self.locked {
            // SAFETY: the owner's range, which it locked and still owns.
            unsafe { libc::munlock(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

// SAFETY: a Region is an owned anonymous mapping (like `MmapMut`, which is
// Send + Sync); its only shared-access methods copy through relaxed atomics,
// so using it from several threads creates no data race on its own.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes rounded up to whole pages, zero-filled, and locks
    /// them according to `policy`.
    pub fn new(len: usize, policy: MlockPolicy) -> Result<Region, MemError> {
        let rounded = whole_pages(len, isize::MAX as usize)?;
        let mut map = MmapOptions::new()
            .len(rounded)
            .map_anon()
            .map_err(|source| MemError::Map {
                size: ByteSize(rounded as u64),
                source,
            })?;
        let ptr = NonNull::new(map.as_mut_ptr()).expect("mmap never returns null");
        // SAFETY: [ptr, ptr+rounded) is exactly the mapping we own.
        let locked = unsafe { lock(ptr, rounded, policy) }?;
        Ok(Region {
            pages: Pages {
                ptr,
                len: rounded,
                locked,
            },
            _map: map,
        })
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.pages.len => Ok(()),
            _ => Err(MemError::OutOfRange {
                offset,
                len,
                region_len: self.pages.len,
            }),
        }
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// Concurrent NIC access to the same bytes (a pending receive or an
    /// exposed RDMA target) is the caller's responsibility; the copy itself
    /// is made with relaxed atomic stores through raw pointers and never
    /// creates a reference to the shared memory.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.check(offset, src.len())?;
        // SAFETY: [offset, offset+src.len()) is inside the mapping (checked),
        // which lives as long as `self`.
        let dst = unsafe { self.pages.as_ptr().add(offset) };
        atomic_copy_in(dst, src);
        Ok(())
    }

    /// Copies bytes of the region at `offset` into `dst`. Same caveat as
    /// [`Region::write_at`].
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.check(offset, dst.len())?;
        // SAFETY: as in `write_at`.
        let src = unsafe { self.pages.as_ptr().add(offset) };
        atomic_copy_out(src, dst);
        Ok(())
    }
}

impl std::ops::Deref for Region {
    type Target = Pages;

    fn deref(&self) -> &Pages {
        &self.pages
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Region").field(&self.pages).finish()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // The map is unmapped only after this, when `_map` drops.
        self.pages.unlock();
    }
}

const WORD: usize = std::mem::size_of::<usize>();

/// Copies `src` to `dst` with relaxed atomic stores: bytes up to the first
/// word boundary, then whole words, then the tail.
///
/// `dst..dst+src.len()` must be inside a live mapping (callers check).
fn atomic_copy_in(dst: *mut u8, src: &[u8]) {
    let head = dst.align_offset(WORD).min(src.len());
    let (bytes, rest) = src.split_at(head);
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: dst+i is in bounds (caller); AtomicU8 has alignment 1 and
        // the mapping is only ever accessed atomically or by the NIC.
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(b, Ordering::Relaxed);
    }
    let mut at = head;
    let mut words = rest.chunks_exact(WORD);
    for w in &mut words {
        let v = usize::from_ne_bytes(w.try_into().expect("chunk is one word"));
        // SAFETY: dst+at is word-aligned (we skipped to the boundary) and
        // the word is in bounds.
        unsafe { AtomicUsize::from_ptr(dst.add(at).cast()) }.store(v, Ordering::Relaxed);
        at += WORD;
    }
    for (i, &b) in words.remainder().iter().enumerate() {
        // SAFETY: in bounds, alignment 1.
        unsafe { AtomicU8::from_ptr(dst.add(at + i)) }.store(b, Ordering::Relaxed);
    }
}

/// Copies into `dst` from `src` with relaxed atomic loads (mirror of
/// [`atomic_copy_in`]).
fn atomic_copy_out(src: *const u8, dst: &mut [u8]) {
    let head = src.align_offset(WORD).min(dst.len());
    let (bytes, rest) = dst.split_at_mut(head);
    for (i, b) in bytes.iter_mut().enumerate() {
        // SAFETY: src+i is in bounds (caller), alignment 1; the atomic type
        // is only used for this load.
        *b = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
    }
    let mut at = head;
    let mut words = rest.chunks_exact_mut(WORD);
    for w in &mut words {
        // SAFETY: src+at is word-aligned and the word is in bounds.
        let v =
            unsafe { AtomicUsize::from_ptr(src.add(at).cast_mut().cast()) }.load(Ordering::Relaxed);
        w.copy_from_slice(&v.to_ne_bytes());
        at += WORD;
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        // SAFETY: in bounds, alignment 1.
        *b = unsafe { AtomicU8::from_ptr(src.add(at + i).cast_mut()) }.load(Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_page_aligned_rounded_and_zeroed() {
        let page = page_size();
        let r = Region::new(page + 1, MlockPolicy::Off).unwrap();
        assert_eq!(r.len(), 2 * page);
        assert_eq!(r.addr() % page, 0);
        assert_eq!(r.addr(), r.as_ptr() as usize);
        assert!(!r.locked());
        let mut all = vec![1u8; r.len()];
        r.read_at(0, &mut all).unwrap();
        assert!(all.iter().all(|&b| b == 0));
        assert!(matches!(
            Region::new(0, MlockPolicy::Off),
            Err(MemError::Empty)
        ));
        assert!(matches!(
            Region::new(usize::MAX, MlockPolicy::Off),
            Err(MemError::TooLarge(_))
        ));
    }

    #[test]
    fn copies_are_bounds_checked_and_round_trip_at_any_alignment() {
        let r = Region::new(4096, MlockPolicy::Off).unwrap();
        for (off, len) in [(0, 0), (1, 3), (3, 29), (7, 64), (4000, 96), (4095, 1)] {
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(7).wrapping_add(off as u8))
                .collect();
            r.write_at(off, &data).unwrap();
            let mut back = vec![0u8; len];
            r.read_at(off, &mut back).unwrap();
            assert_eq!(back, data, "offset {off} len {len}");
        }
        assert!(matches!(
            r.write_at(4090, &[0; 7]),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(r.read_at(usize::MAX, &mut [0; 2]).is_err());
        assert!(r.write_at(4096, &[]).is_ok());
    }

    #[test]
    fn try_policy_never_fails_and_require_names_the_limit() {
        let r = Region::new(1 << 16, MlockPolicy::Try).unwrap();
        assert_eq!(r.len(), 1 << 16);
        drop(r);
        // With CAP_IPC_LOCK (root) mlock ignores the limit, so only check
        // the failure message when it does fail.
        if let MemlockLimit::Bytes(limit) = MemlockLimit::current() {
            let want = (limit as usize).saturating_add(1 << 20);
            if let Err(e) = Region::new(want, MlockPolicy::Require) {
                let msg = e.to_string();
                assert!(msg.contains("RLIMIT_MEMLOCK"), "{msg}");
                assert!(
                    msg.contains(&MemlockLimit::Bytes(limit).to_string()),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn lock_error_message_names_limit_and_size() {
        let e = MemError::Lock {
            requested: ByteSize(64 << 20),
            limit: MemlockLimit::Bytes(8 << 20),
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        assert_eq!(
            e.to_string(),
            "cannot lock 64 MiB of registered memory: RLIMIT_MEMLOCK is 8 MiB \
             (raise it with `ulimit -l` or set mem.mlock = \"try\")"
        );
        assert_eq!(ByteSize(1536 << 10).to_string(), "1536 KiB");
        assert_eq!(ByteSize(100).to_string(), "100 bytes");
        assert_eq!(MemlockLimit::Unlimited.to_string(), "unlimited");
    }

    #[test]
    fn check_mapped_sees_holes() {
        let page = page_size();
        let r = Region::new(3 * page, MlockPolicy::Off).unwrap();
        assert!(check_mapped(r.addr(), r.len()));
        assert!(check_mapped(r.addr() + 5, 10));
        assert!(check_mapped(r.addr(), 0));
        // The first page is never mapped (mmap_min_addr); kernel addresses
        // are outside the user address space; wrapping ranges are refused.
        assert!(!check_mapped(page, 16));
        assert!(!check_mapped(0xffff_f000_0000_0000, 16));
        assert!(!check_mapped(usize::MAX - 4, 16));
        // Punch a hole in the middle page of a fresh mapping. Done in a
        // forked child: in this multi-threaded test process another test
        // could map a page into the hole between munmap and the probe.
        let mut three = MmapOptions::new().len(3 * page).map_anon().unwrap();
        let base = three.as_mut_ptr() as usize;
        // SAFETY: fork has no memory-safety preconditions; the child below
        // only makes syscalls and calls `check_mapped` (no allocation, no
        // locks) before `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: the middle page belongs to `three`, which the child
            // never touches again; it leaves with _exit (no destructors).
            let rc = unsafe { libc::munmap((base + page) as *mut libc::c_void, page) };
            let ok = rc == 0
                && check_mapped(base, page)
                && !check_mapped(base, 3 * page)
                && !check_mapped(base + page + 1, 1)
                && check_mapped(base + 2 * page, page);
            // SAFETY: terminating the child without running parent state's
            // destructors is exactly what _exit is for.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "hole not detected (status {status:#x})"
        );
        assert!(check_mapped(base, 3 * page), "parent mapping untouched");
    }
}
