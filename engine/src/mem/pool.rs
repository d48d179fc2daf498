//! A process-wide pool of page-aligned, zero-filled memory ([`Chunk`]) for
//! what every connection maps and unmaps: the reference switch's buffers
//! and the soft fabric's queue and link arrays.
//!
//! Chunks of one length are carved from arenas of [`ARENA_BYTES`]; a
//! dropped chunk waits for its length's next release batch
//! ([`RELEASE_BYTES`]), so closing thousands of connections makes a few
//! hundred `munmap` and `process_madvise` calls instead of one `munmap`
//! (and one TLB shootdown) per buffer. The contract is [`Region`]'s:
//! page-aligned, zero bytes when handed out, resident at first touch,
//! deregistered by whoever registered it before it is dropped.
//!
//! [`Region`]: super::region::Region

use super::region::{lock, whole_pages, ByteSize, MemError, Pages};
use crate::config::MlockPolicy;
use memmap2::{MmapMut, MmapOptions};
use std::collections::BTreeMap;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Mutex;

/// Address space of a pool arena (or one chunk, if larger): 65 chunks of a
/// stream connection's 252 KiB, 2,048 of a soft queue's 8 KiB; only what
/// is touched is resident.
const ARENA_BYTES: usize = 16 << 20;

/// Bytes of dropped chunks a length class collects before it releases
/// their pages in one batch: the most that stays resident, per class, for
/// chunks nobody holds (32 chunks of 252 KiB).
const RELEASE_BYTES: usize = 8 << 20;

/// Most chunks released by one `process_madvise` (the kernel's `UIO_MAXIOV`).
const RELEASE_MAX: usize = 1024;

/// `pidfd` naming the calling thread (`PIDFD_SELF_THREAD`, Linux 6.15 and
/// later): `process_madvise` on it advises this process's own memory.
const PIDFD_SELF_THREAD: libc::c_int = -10000;

/// Page-aligned, zero-filled anonymous memory carved from a process-wide
/// pool: [`Region`]'s contract, without a mapping of its own.
///
/// Why: a connection's buffers used to be one mapping each, and closing
/// 10,000 connections made 20,000 `munmap` calls, each a page-table walk, a
/// split of the merged mapping around it and a TLB shootdown of every core
/// that ran a thread of the process. The pool keeps chunks of one length in
/// arenas of [`ARENA_BYTES`]; a dropped chunk is released with its class's
/// next batch ([`RELEASE_BYTES`]): an arena none of whose chunks is in use
/// any more is unmapped whole, the other chunks' pages are dropped with one
/// `process_madvise(MADV_DONTNEED)` for the whole batch (one TLB flush; a
/// `madvise` each on kernels without it). Only released chunks are handed
/// out again, so a chunk always starts as zero bytes, as a fresh mapping
/// does; pages become resident at first touch.
///
/// The owner must be done with the memory when it drops the chunk: whoever
/// registered it with a NIC deregisters it first, as for a [`Region`].
pub struct Chunk {
    /// The chunk, inside its arena's mapping.
    pages: Pages,
}

// SAFETY: a Chunk owns its bytes of an arena mapping, which the pool keeps
// mapped until the chunk is back in it; like `Region`, it hands out only a
// raw pointer, so sharing it between threads creates no data race itself.
unsafe impl Send for Chunk {}
// SAFETY: as above.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// `len` bytes rounded up to whole pages, zero-filled, locked according
    /// to `policy`.
    pub fn new(len: usize, policy: MlockPolicy) -> Result<Chunk, MemError> {
        let rounded = whole_pages(len, isize::MAX as usize / 2)?;
        let ptr = take(rounded)?;
        let mut chunk = Chunk {
            pages: Pages {
                ptr,
                len: rounded,
                locked: false,
            },
        };
        // SAFETY: [ptr, ptr+rounded) is the chunk this value owns (on an
        // error it goes back to the pool, unlocked).
        chunk.pages.locked = unsafe { lock(ptr, rounded, policy) }?;
        Ok(chunk)
    }
}

impl std::ops::Deref for Chunk {
    type Target = Pages;

    fn deref(&self) -> &Pages {
        &self.pages
    }
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Chunk").field(&self.pages).finish()
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // Unlocked before another thread may release its pages.
        self.pages.unlock();
        give_back(self.pages.addr(), self.pages.len);
    }
}

/// The chunks of one length.
struct Class {
    len: usize,
    /// Chunks per arena: `ARENA_BYTES / len`, at least one.
    per_arena: usize,
    /// Dropped chunks released together: `RELEASE_BYTES / len`, 1 to
    /// [`RELEASE_MAX`].
    batch: usize,
    /// The arenas, by start address.
    arenas: BTreeMap<usize, Arena>,
    /// Clean chunks over all arenas (the sum of their `clean` lengths).
    clean: usize,
    /// Chunks dropped since the last release (start addresses): handed out
    /// to nobody until released.
    dirty: Vec<usize>,
}

/// One mapping of its class's `per_arena` chunks.
struct Arena {
    map: MmapMut,
    /// Chunks handed out, dirty or being released: those not in `clean`.
    /// An arena is unmapped when a release would leave it at 0.
    used: usize,
    /// Indices of chunks that read as zero bytes and nobody holds.
    /// (`u32`: a 16 MiB arena has at most 4,096 pages, and this list is
    /// part of what a connection costs.)
    clean: Vec<u32>,
}

/// Every length class of the pool (a process has one or a few: a
/// runtime's connections share theirs).
static POOL: Mutex<Vec<Class>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Class>> {
    // Every update below leaves the state consistent before it can panic.
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A clean chunk of `len` bytes (a page multiple): of an arena that has
/// one, else of the chunks dropped since the last release (released now),
/// else of a new arena.
fn take(len: usize) -> Result<NonNull<u8>, MemError> {
    let mut classes = pool();
    let at = match classes.iter().position(|c| c.len == len) {
        Some(at) => at,
        None => {
            classes.push(Class {
                len,
                per_arena: (ARENA_BYTES / len).max(1),
                batch: (RELEASE_BYTES / len).clamp(1, RELEASE_MAX),
                arenas: BTreeMap::new(),
                clean: 0,
                dirty: Vec::new(),
            });
            classes.len() - 1
        }
    };
    if classes[at].clean == 0 && !classes[at].dirty.is_empty() {
        let dirty = std::mem::take(&mut classes[at].dirty);
        classes = release(classes, at, dirty);
    }
    let class = &mut classes[at];
    if class.clean == 0 {
        let size = len * class.per_arena;
        let mut map = MmapOptions::new()
            .len(size)
            .map_anon()
            .map_err(|source| MemError::Map {
                size: ByteSize(size as u64),
                source,
            })?;
        let base = map.as_mut_ptr() as usize;
        class.arenas.insert(
            base,
            Arena {
                map,
                used: 0,
                clean: (0..class.per_arena as u32).rev().collect(),
            },
        );
        class.clean += class.per_arena;
    }
    let (&base, arena) = class
        .arenas
        .iter_mut()
        .find(|(_, a)| !a.clean.is_empty())
        .expect("a class with clean chunks has an arena with one");
    let index = arena.clean.pop().expect("found non-empty") as usize;
    arena.used += 1;
    class.clean -= 1;
    debug_assert_eq!(
        class.clean,
        class.arenas.values().map(|a| a.clean.len()).sum::<usize>()
    );
    Ok(NonNull::new((base + index * len) as *mut u8).expect("inside a mapping"))
}

/// A chunk of `len` bytes at `addr` is no longer used: it joins its class's
/// dirty chunks, which are released once there are a batch of them.
fn give_back(addr: usize, len: usize) {
    let mut classes = pool();
    let at = classes
        .iter()
        .position(|c| c.len == len)
        .expect("a chunk's class outlives it");
    classes[at].dirty.push(addr);
    if classes[at].dirty.len() >= classes[at].batch {
        let dirty = std::mem::take(&mut classes[at].dirty);
        drop(release(classes, at, dirty));
    }
}

/// Releases the pages of chunks `dirty` of class `at`, with the pool lock
/// given up around the system calls (the chunks are in nobody's hands and
/// on no list meanwhile, so no other thread touches them or unmaps their
/// arena): arenas left with no chunk in use are unmapped, the others'
/// chunks advised away, then marked clean (and their arena unmapped if
/// that left it with none in use). An arena is mapped only while one of
/// its chunks is held or waits to be released. Returns the lock.
fn release(
    mut classes: std::sync::MutexGuard<'static, Vec<Class>>,
    at: usize,
    dirty: Vec<usize>,
) -> std::sync::MutexGuard<'static, Vec<Class>> {
    let class = &mut classes[at];
    let (len, span) = (class.len, class.len * class.per_arena);
    let arena_of = |arenas: &BTreeMap<usize, Arena>, addr: usize| {
        let (&base, _) = arenas
            .range(..=addr)
            .next_back()
            .expect("a dirty chunk lies in an arena");
        debug_assert!(addr < base + span);
        base
    };
    let dirty: Vec<(usize, usize)> = dirty
        .into_iter()
        .map(|addr| (addr, arena_of(&class.arenas, addr)))
        .collect();
    let mut in_batch: BTreeMap<usize, usize> = BTreeMap::new();
    for &(_, base) in &dirty {
        *in_batch.entry(base).or_default() += 1;
    }
    let mut unmap = Vec::new();
    for (&base, &n) in &in_batch {
        if class.arenas[&base].used == n {
            let a = class.arenas.remove(&base).expect("counted above");
            class.clean -= a.clean.len();
            unmap.push(a.map);
        }
    }
    let advise: Vec<(usize, usize)> = dirty
        .into_iter()
        .filter(|(_, base)| class.arenas.contains_key(base))
        .collect();
    drop(classes);
    drop(unmap);
    dont_need(advise.iter().map(|&(addr, _)| addr), len);
    let mut classes = pool();
    let class = &mut classes[at];
    for (addr, base) in advise {
        let arena = class
            .arenas
            .get_mut(&base)
            .expect("arena of a chunk in use");
        arena.used -= 1;
        arena.clean.push(((addr - base) / len) as u32);
        class.clean += 1;
    }
    // Arenas left with nothing in use (the batch released their last
    // chunks together with those of arenas still in use): unmapped too.
    let empty: Vec<usize> = in_batch
        .into_keys()
        .filter(|base| class.arenas.get(base).is_some_and(|a| a.used == 0))
        .collect();
    let unmap: Vec<MmapMut> = empty
        .iter()
        .map(|base| {
            let a = class.arenas.remove(base).expect("found above");
            class.clean -= a.clean.len();
            a.map
        })
        .collect();
    if unmap.is_empty() {
        return classes;
    }
    drop(classes);
    drop(unmap);
    pool()
}

/// Drops the pages of the chunks of `len` bytes at `addrs`, which nobody
/// uses: their next touch maps zero pages. One `process_madvise` per
/// [`RELEASE_MAX`] chunks; a `madvise` each where the kernel refuses it (before 6.15), and
/// where even that fails, zero bytes written over them.
fn dont_need(addrs: impl Iterator<Item = usize>, len: usize) {
    let iov: Vec<libc::iovec> = addrs
        .map(|a| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    for group in iov.chunks(RELEASE_MAX) {
        // SAFETY: every range is a whole chunk of a live arena mapping that
        // no one holds (`release`); dropping its pages only makes its bytes
        // read as zero again. The iovec array outlives the call.
        let done = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                PIDFD_SELF_THREAD,
                group.as_ptr(),
                group.len(),
                libc::MADV_DONTNEED,
                0,
            )
        };
        if done == (len * group.len()) as libc::c_long {
            continue;
        }
        for v in group {
            // SAFETY: as above, one chunk.
            let rc = unsafe { libc::madvise(v.iov_base, len, libc::MADV_DONTNEED) };
            if rc != 0 {
                // SAFETY: the chunk is mapped and writable, and nobody else
                // reads or writes it while it is being released.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, len) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::region::{check_mapped, page_size};

    /// Chunks of `pages` pages: a length no other test uses, so that
    /// tests running in parallel do not share the class.
    fn chunks(pages: usize, n: usize) -> Vec<Chunk> {
        (0..n)
            .map(|_| Chunk::new(pages * page_size(), MlockPolicy::Off).unwrap())
            .collect()
    }

    #[test]
    fn pool_chunks_are_disjoint_pages_and_zero_when_handed_out_again() {
        let page = page_size();
        let pages = 37;
        // One arena's worth; the last stays held, so the arena stays
        // mapped and the others come back from it: one release batch while
        // they are dropped, the rest when they are taken again.
        let per_arena = ARENA_BYTES / (pages * page);
        let mut first = chunks(pages, per_arena);
        let held = first.pop().expect("an arena holds chunks");
        let mut starts: Vec<usize> = first.iter().map(|c| c.as_ptr() as usize).collect();
        starts.sort_unstable();
        assert!(starts.iter().all(|a| a % page == 0));
        assert!(starts.windows(2).all(|w| w[1] - w[0] >= pages * page));
        for c in &first {
            assert_eq!(c.len(), pages * page);
            for p in 0..pages {
                // SAFETY: inside the chunk, which nobody else uses.
                unsafe { c.as_ptr().add(p * page).write_volatile(0xa5) };
            }
        }
        drop(first);
        let again = chunks(pages, per_arena - 1);
        let mut reused: Vec<usize> = again.iter().map(|c| c.as_ptr() as usize).collect();
        reused.sort_unstable();
        assert_eq!(reused, starts, "the same arena's chunks");
        for c in &again {
            for p in 0..pages {
                // SAFETY: as above.
                let b = unsafe { c.as_ptr().add(p * page).read_volatile() };
                assert_eq!(b, 0, "page {p} of a chunk handed out again");
            }
        }
        drop(held);
    }

    #[test]
    fn pool_unmaps_an_arena_once_none_of_its_chunks_is_held() {
        let page = page_size();
        // An arena of two release batches: the first is advised away, the
        // second leaves the arena with nothing held.
        let pages = 128;
        assert_eq!(
            ARENA_BYTES / (pages * page),
            2 * (RELEASE_BYTES / (pages * page))
        );
        let per_arena = ARENA_BYTES / (pages * page);
        let held = chunks(pages, per_arena);
        let first = held[0].as_ptr() as usize;
        assert!(check_mapped(first, page));
        drop(held);
        assert!(
            !check_mapped(first, page),
            "an arena whose {per_arena} chunks were all dropped is still mapped"
        );
    }
}
