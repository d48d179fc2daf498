//! A connection's cache of local registrations of application memory, so
//! that a ring write or an RDMA op reads or writes the application's buffer
//! itself without registering it for every transfer (and without the
//! deregistration after it).
//!
//! Entries are keyed by the pages a buffer spans and by direction (`write`:
//! registered `MEM_WRITE`, the sink of RDMA reads; else `MEM_READ`, the
//! source of RDMA writes): a later op on a range inside an entry's pages
//! uses its handle. An entry is *pinned* while ops use it, counted per op;
//! only an unpinned entry is deregistered. It stays registered until one of:
//! - the application says the memory goes away (`Runtime::release_memory`,
//!   [`RegCache::forget`]): unpinned entries overlapping the range are
//!   dropped at once, pinned ones (`doomed`) when their last op completes;
//! - it is the least recently used when a new entry needs its place
//!   ([`RegCache::insert`]);
//! - the socket closes (the provider releases every registration of the
//!   socket, and the connection clears the cache).
//!
//! Bookkeeping only: the registration calls are made by the connection
//! (`io.rs`), which documents why a registration may outlive the call that
//! lent the buffer (invariant 6 there).

/// One cached registration.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// First byte of the registered pages (page aligned).
    start: usize,
    /// End of the registered pages (page aligned, `> start`).
    end: usize,
    /// Registered `MEM_WRITE` (else `MEM_READ`).
    write: bool,
    /// The provider's registration handle (unique among entries).
    handle: u64,
    /// Ops using the registration now.
    pins: u32,
    /// Use clock of the last pin (larger: more recent).
    last: u64,
    /// Released by the application while pinned: deregistered, never
    /// reused, once the last op unpins it.
    doomed: bool,
}

/// A connection's registration cache; see the module docs. Lives in the
/// connection's state, under its lock.
#[derive(Debug)]
pub(super) struct RegCache {
    /// At most `max` entries (none: the cache is off).
    entries: Vec<Entry>,
    /// Entries kept; 0 turns the cache off.
    max: usize,
    /// Use clock, bumped per pin.
    tick: u64,
    /// Page size (a power of two).
    page: usize,
}

/// What an op's registration is: a pinned cache entry, or a registration
/// of its own, deregistered when the op completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RegUse {
    pub(super) handle: u64,
    pub(super) cached: bool,
}

impl RegCache {
    /// A cache of at most `max` entries (0: off).
    pub(super) fn new(max: usize) -> RegCache {
        RegCache {
            entries: Vec::new(),
            max,
            tick: 0,
            page: crate::mem::region::page_size(),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.max > 0
    }

    /// The pages `[start, end)` that `len > 0` bytes at `addr` span.
    pub(super) fn span(&self, addr: usize, len: usize) -> Option<(usize, usize)> {
        let mask = self.page - 1;
        let end = addr.checked_add(len)?.checked_add(mask)? & !mask;
        Some((addr & !mask, end))
    }

    /// The handle of a live entry covering `[start, end)` in direction
    /// `write`, pinned for one more op.
    pub(super) fn pin(&mut self, start: usize, end: usize, write: bool) -> Option<u64> {
        self.tick += 1;
        let tick = self.tick;
        let e = self
            .entries
            .iter_mut()
            .find(|e| !e.doomed && e.write == write && e.start <= start && end <= e.end)?;
        e.pins += 1;
        e.last = tick;
        Some(e.handle)
    }

    /// Enters a fresh registration of `[start, end)`, pinned for the op
    /// that made it. Returns the handles to deregister now: the least
    /// recently used unpinned entry when the cache was full. When every
    /// entry is pinned, the new one is entered doomed (it goes when its op
    /// completes).
    pub(super) fn insert(
        &mut self,
        start: usize,
        end: usize,
        write: bool,
        handle: u64,
    ) -> Vec<u64> {
        debug_assert!(start < end && start % self.page == 0 && end % self.page == 0);
        debug_assert!(self.entries.iter().all(|e| e.handle != handle));
        self.tick += 1;
        let mut evicted = Vec::new();
        let mut doomed = false;
        if self.entries.len() >= self.max {
            let lru = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last)
                .map(|(i, _)| i);
            match lru {
                Some(i) => evicted.push(self.entries.swap_remove(i).handle),
                None => doomed = true,
            }
        }
        self.entries.push(Entry {
            start,
            end,
            write,
            handle,
            pins: 1,
            last: self.tick,
            doomed,
        });
        evicted
    }

    /// An op using entry `handle` completed. Returns the handle if it must
    /// now be deregistered (doomed, and this was its last op).
    pub(super) fn unpin(&mut self, handle: u64) -> Option<u64> {
        let i = self.entries.iter().position(|e| e.handle == handle)?;
        let e = &mut self.entries[i];
        debug_assert!(e.pins > 0, "unpin of an entry no op uses");
        e.pins = e.pins.saturating_sub(1);
        if e.pins == 0 && e.doomed {
            self.entries.swap_remove(i);
            return Some(handle);
        }
        None
    }

    /// The application releases `[addr, addr+len)`: returns the handles of
    /// the unpinned entries overlapping it, to deregister now, and dooms
    /// the pinned ones.
    pub(super) fn forget(&mut self, addr: usize, len: usize) -> Vec<u64> {
        let end = addr.saturating_add(len);
        let mut gone = Vec::new();
        self.entries.retain_mut(|e| {
            if e.end <= addr || end <= e.start {
                return true;
            }
            if e.pins > 0 {
                e.doomed = true;
                return true;
            }
            gone.push(e.handle);
            false
        });
        gone
    }

    /// Forgets every entry (the socket closed: the provider released
    /// them).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Entries held (cached or doomed and still pinned).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_inside_an_entry_hits_and_other_directions_miss() {
        let mut c = RegCache::new(4);
        let p = c.page;
        let (s, e) = c.span(p + 10, 2 * p).unwrap();
        assert_eq!((s, e), (p, 4 * p));
        assert_eq!(c.pin(s, e, false), None);
        assert!(c.insert(s, e, false, 7).is_empty());
        assert_eq!(c.pin(2 * p, 3 * p, false), Some(7), "inside");
        assert_eq!(c.pin(2 * p, 3 * p, true), None, "other direction");
        assert_eq!(c.pin(0, 2 * p, false), None, "not covered");
        assert_eq!(c.unpin(7), None);
        assert_eq!(c.unpin(7), None);
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_unpinned_entry() {
        let mut c = RegCache::new(2);
        let p = c.page;
        assert!(c.insert(0, p, false, 1).is_empty());
        assert!(c.insert(p, 2 * p, false, 2).is_empty());
        c.unpin(1);
        c.unpin(2);
        assert_eq!(c.pin(0, p, false), Some(1));
        c.unpin(1);
        assert_eq!(c.insert(2 * p, 3 * p, false, 3), vec![2], "2 is older");
        // Everything pinned: the new entry is doomed, not cached for long.
        assert_eq!(c.pin(0, p, false), Some(1));
        assert_eq!(c.insert(3 * p, 4 * p, false, 4), Vec::<u64>::new());
        assert_eq!(c.unpin(4), Some(4));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn released_memory_leaves_the_cache_when_no_op_uses_it() {
        let mut c = RegCache::new(4);
        let p = c.page;
        assert!(c.insert(0, 2 * p, false, 1).is_empty());
        assert!(c.insert(4 * p, 5 * p, true, 2).is_empty());
        c.unpin(1);
        // Entry 2 is still in an op: doomed, deregistered at its unpin.
        assert_eq!(c.forget(p, 4 * p), vec![1]);
        assert_eq!(c.pin(0, p, false), None, "released");
        assert_eq!(
            c.pin(4 * p, 5 * p, true),
            None,
            "doomed entries serve no new op"
        );
        assert_eq!(c.unpin(2), Some(2));
        assert_eq!(c.len(), 0);
        assert!(c.forget(0, usize::MAX).is_empty());
    }
}
