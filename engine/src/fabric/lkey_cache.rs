//! The local regions one queue pair end named lately, so that checking a
//! post's gather list takes no NIC-wide lock and no map lookup on a hit.
//!
//! A software NIC (soft, shm) checks every entry of a work request against
//! its registered regions. Each end keeps this cache under its own post
//! lock; it is valid while the NIC's deregistration `epoch` is unchanged
//! (every deregistration bumps it before returning, so a post that starts
//! after a deregistration returned misses and looks the key up again). A key
//! is reused only after its deregistration, which moves the epoch, so a
//! cached key names the region it was found for.

use super::{Access, Sge};

/// What a check needs of a registered region.
#[derive(Clone, Copy)]
pub(crate) struct CachedRegion {
    pub(crate) lkey: u32,
    pub(crate) addr: usize,
    pub(crate) len: usize,
    pub(crate) access: Access,
}

impl CachedRegion {
    const EMPTY: CachedRegion = CachedRegion {
        lkey: 0,
        addr: 0,
        len: 0,
        access: Access::NONE,
    };

    /// Whether `[s.addr, +s.len)` lies inside the region and the region
    /// allows `need`. `off` wraps to a huge value for an entry below the
    /// region, so two comparisons cover every case without overflow.
    #[inline]
    fn allows(&self, s: &Sge, need: Access) -> bool {
        let off = s.addr.wrapping_sub(self.addr);
        self.access.contains(need) && off <= self.len && s.len as usize <= self.len - off
    }
}

/// Entries a cache holds.
const WAYS: usize = 4;
/// The key of an empty entry: no `u32` key widens to it.
const NO_KEY: u64 = u64::MAX;

/// See the module docs. Owned by one queue pair end, used under its post
/// lock. `repr(C)`: a hit on the first entry reads the epoch, the keys and
/// that entry, the first 64 bytes (one line where the owner aligns it).
#[repr(C)]
pub(crate) struct LkeyCache {
    /// The NIC's deregistration count the entries were found under.
    epoch: u64,
    /// The keys of `regions`, widened ([`NO_KEY`] for an empty entry): a
    /// hit is a scan of one small array of plain integers.
    keys: [u64; WAYS],
    regions: [CachedRegion; WAYS],
    /// Where the next miss goes (round robin).
    next: usize,
}

// The epoch, the keys and the first entry: 64 bytes.
const _: () =
    assert!(std::mem::offset_of!(LkeyCache, regions) + std::mem::size_of::<CachedRegion>() <= 64);

impl Default for LkeyCache {
    fn default() -> LkeyCache {
        LkeyCache {
            epoch: 0,
            keys: [NO_KEY; WAYS],
            regions: [CachedRegion::EMPTY; WAYS],
            next: 0,
        }
    }
}

impl LkeyCache {
    /// Whether every non-empty entry of `sges` lies inside a region allowing
    /// `need`: looked up here first, else through `lookup` (the NIC's
    /// table, under whatever lock it needs), whose answer is kept. `epoch`
    /// is the NIC's deregistration count, read by the caller now.
    ///
    /// The hit path is small enough to inline into a post; a miss or a new
    /// epoch goes through [`LkeyCache::check_missed`], out of line.
    #[inline]
    pub(crate) fn check(
        &mut self,
        epoch: u64,
        sges: &[Sge],
        need: Access,
        mut lookup: impl FnMut(u32) -> Option<CachedRegion>,
    ) -> bool {
        if self.epoch != epoch {
            return self.check_missed(epoch, sges, need, &mut lookup);
        }
        for s in sges {
            if s.len == 0 {
                continue;
            }
            let key = u64::from(s.lkey);
            match self.keys.iter().position(|&k| k == key) {
                Some(at) if self.regions[at].allows(s, need) => {}
                Some(_) => return false,
                None => return self.check_missed(epoch, sges, need, &mut lookup),
            }
        }
        true
    }

    /// [`LkeyCache::check`] after a miss or an epoch change: starts over,
    /// looking up what is not cached.
    #[cold]
    #[inline(never)]
    fn check_missed(
        &mut self,
        epoch: u64,
        sges: &[Sge],
        need: Access,
        lookup: &mut dyn FnMut(u32) -> Option<CachedRegion>,
    ) -> bool {
        if self.epoch != epoch {
            self.epoch = epoch;
            self.keys = [NO_KEY; WAYS];
        }
        for s in sges {
            if s.len == 0 {
                continue;
            }
            let key = u64::from(s.lkey);
            let at = match self.keys.iter().position(|&k| k == key) {
                Some(at) => at,
                None => {
                    let Some(c) = lookup(s.lkey) else {
                        return false;
                    };
                    debug_assert_eq!(c.lkey, s.lkey, "lookup answered another key");
                    let at = self.next % WAYS;
                    self.keys[at] = key;
                    self.regions[at] = c;
                    self.next = self.next.wrapping_add(1);
                    at
                }
            };
            if !self.regions[at].allows(s, need) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(lkey: u32) -> CachedRegion {
        CachedRegion {
            lkey,
            addr: 0x1000 * lkey as usize,
            len: 0x100,
            access: Access::LOCAL_WRITE,
        }
    }

    fn sge(lkey: u32, off: usize, len: u32) -> Sge {
        Sge {
            addr: 0x1000 * lkey as usize + off,
            len,
            lkey,
        }
    }

    #[test]
    fn a_hit_asks_nothing_and_a_new_epoch_asks_again() {
        let mut c = LkeyCache::default();
        let mut asked = 0;
        let mut look = |k| {
            asked += 1;
            Some(region(k))
        };
        assert!(c.check(0, &[sge(1, 0, 8)], Access::LOCAL_WRITE, &mut look));
        assert!(c.check(0, &[sge(1, 8, 8)], Access::NONE, &mut look));
        assert!(c.check(1, &[sge(1, 0, 8)], Access::NONE, &mut look));
        assert_eq!(asked, 2, "one lookup per key per epoch");
    }

    #[test]
    fn bounds_rights_and_unknown_keys_fail() {
        let mut c = LkeyCache::default();
        let look = |k| (k != 9).then(|| region(k));
        assert!(!c.check(0, &[sge(1, 0xf8, 9)], Access::NONE, look));
        assert!(!c.check(0, &[sge(1, 0, 8)], Access::REMOTE_READ, look));
        assert!(!c.check(0, &[sge(2, 0, 8), sge(9, 0, 8)], Access::NONE, look));
        assert!(c.check(0, &[sge(9, 0, 0), sge(1, 0xf8, 8)], Access::NONE, look));
        // Starting below the region, or wrapping the address space.
        let below = Sge {
            addr: 0x1000 - 8,
            len: 16,
            lkey: 1,
        };
        assert!(!c.check(0, &[below], Access::NONE, look));
        let wraps = Sge {
            addr: usize::MAX - 4,
            len: 16,
            lkey: 1,
        };
        assert!(!c.check(0, &[wraps], Access::NONE, look));
        assert!(c.check(0, &[sge(1, 0xff, 1)], Access::NONE, look));
    }

    #[test]
    fn more_keys_than_entries_still_check_right() {
        let mut c = LkeyCache::default();
        let look = |k| Some(region(k));
        for k in 1..=12 {
            assert!(c.check(0, &[sge(k, 0, 8)], Access::NONE, look));
            assert!(!c.check(0, &[sge(k, 0x100, 1)], Access::NONE, look));
        }
    }
}
