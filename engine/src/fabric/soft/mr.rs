//! Protection domain of one soft NIC: registered regions, remote keys, the
//! checks every scatter/gather entry passes, and the copy engine.
//!
//! Keys (lkeys and rkeys alike) are `generation << 20 | slot`. A slot's
//! generation grows by one on every reuse and a slot whose generation reached
//! the maximum is retired instead of reused, so a stale key never names a
//! newer entry; the first generation is 1, so key 0 is never valid.

use crate::fabric::{Access, FabricError, QpNum, Sge};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

const INDEX_BITS: u32 = 20;
const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;
const GEN_MAX: u32 = u32::MAX >> INDEX_BITS;

/// Entries named by keys; see the module docs.
pub(super) struct Slab<T> {
    /// Every slot ever used; a slot's index never changes.
    slots: Vec<Slot<T>>,
    /// Free slots that may be reused, least recently freed first.
    free: VecDeque<u32>,
    /// Occupied slots.
    live: usize,
}

struct Slot<T> {
    /// Generation of the current (or last) occupant, `1..=GEN_MAX`.
    gen: u32,
    value: Option<T>,
}

impl<T> Slab<T> {
    pub(super) fn new() -> Self {
        Slab {
            slots: Vec::new(),
            free: VecDeque::new(),
            live: 0,
        }
    }

    /// Stores `value`; `None` once every key is used up.
    pub(super) fn insert(&mut self, value: T) -> Option<u32> {
        let index = match self.free.pop_front() {
            Some(i) => i,
            None => {
                if self.slots.len() > INDEX_MASK as usize {
                    return None;
                }
                self.slots.push(Slot {
                    gen: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.gen += 1;
        slot.value = Some(value);
        self.live += 1;
        Some((slot.gen << INDEX_BITS) | index)
    }

    fn slot(&self, key: u32) -> Option<&Slot<T>> {
        let slot = self.slots.get((key & INDEX_MASK) as usize)?;
        (slot.gen == key >> INDEX_BITS).then_some(slot)
    }

    pub(super) fn get(&self, key: u32) -> Option<&T> {
        self.slot(key)?.value.as_ref()
    }

    pub(super) fn get_mut(&mut self, key: u32) -> Option<&mut T> {
        let slot = self.slots.get_mut((key & INDEX_MASK) as usize)?;
        if slot.gen != key >> INDEX_BITS {
            return None;
        }
        slot.value.as_mut()
    }

    pub(super) fn remove(&mut self, key: u32) -> Option<T> {
        let index = key & INDEX_MASK;
        let slot = self.slots.get_mut(index as usize)?;
        if slot.gen != key >> INDEX_BITS {
            return None;
        }
        let value = slot.value.take()?;
        self.live -= 1;
        if slot.gen < GEN_MAX {
            self.free.push_back(index);
        }
        Some(value)
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }
}

/// A registered memory range.
pub(super) struct Region {
    pub(super) addr: usize,
    pub(super) len: usize,
    pub(super) access: Access,
    /// Remote keys bound to this region (removed with it).
    rkeys: Vec<u32>,
}

impl Region {
    /// Whether `[addr, addr+len)` lies inside the region.
    fn covers(&self, addr: usize, len: usize) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }
}

/// A remote key: exposes a region to the peer of one queue pair.
pub(super) struct RemoteKey {
    lkey: u32,
    qp: QpNum,
    access: Access,
}

/// Regions and remote keys of one NIC.
///
/// Lock order: `regions` before `rkeys`; across two NICs, the one with the
/// lower id first (see `lock_two`). The data path only takes read locks and
/// holds them across the checks and the copy, so a `deregister` or
/// `unbind_remote` (write locks) either happens before a check or waits until
/// the copy is over.
pub(super) struct Pd {
    /// Registered regions by lkey. Written by register, deregister,
    /// bind/unbind (the region's key list); read by the data path.
    regions: RwLock<Slab<Region>>,
    /// Remote keys by rkey. Written by bind/unbind/deregister; read by the
    /// peer's data path (RDMA).
    rkeys: RwLock<Slab<RemoteKey>>,
    /// Successful registrations since creation (statistics only).
    registrations: AtomicU64,
}

pub(super) type RegionsGuard<'a> = RwLockReadGuard<'a, Slab<Region>>;
pub(super) type RkeysGuard<'a> = RwLockReadGuard<'a, Slab<RemoteKey>>;

impl Pd {
    pub(super) fn new() -> Pd {
        Pd {
            regions: RwLock::new(Slab::new()),
            rkeys: RwLock::new(Slab::new()),
            registrations: AtomicU64::new(0),
        }
    }

    pub(super) fn read_regions(&self) -> RegionsGuard<'_> {
        self.regions.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn read_rkeys(&self) -> RkeysGuard<'_> {
        self.rkeys.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_regions(&self) -> RwLockWriteGuard<'_, Slab<Region>> {
        self.regions.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_rkeys(&self) -> RwLockWriteGuard<'_, Slab<RemoteKey>> {
        self.rkeys.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `[addr, addr+len)`.
    ///
    /// # Safety
    /// As `Nic::register`: the range stays valid memory until `deregister`
    /// returned for the key.
    pub(super) unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<u32, FabricError> {
        if addr == 0 || len == 0 {
            return Err(FabricError::Invalid("empty range or null address"));
        }
        if addr.checked_add(len).is_none() {
            return Err(FabricError::Invalid("range wraps around"));
        }
        if !range_mapped(addr, len) {
            return Err(FabricError::Invalid("range not mapped"));
        }
        let lkey = self
            .write_regions()
            .insert(Region {
                addr,
                len,
                access,
                rkeys: Vec::new(),
            })
            .ok_or(FabricError::NoResources("memory region keys"))?;
        self.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(lkey)
    }

    /// Removes a region and every remote key bound to it. Unknown keys are
    /// ignored.
    pub(super) fn deregister(&self, lkey: u32) {
        let mut regions = self.write_regions();
        if let Some(region) = regions.remove(lkey) {
            let mut rkeys = self.write_rkeys();
            for k in region.rkeys {
                rkeys.remove(k);
            }
        }
    }

    /// Binds a new remote key for `lkey` to `qp` (which the caller checked
    /// is a live queue pair of this NIC).
    pub(super) fn bind(&self, lkey: u32, qp: QpNum, access: Access) -> Result<u32, FabricError> {
        let remote = Access::REMOTE_READ | Access::REMOTE_WRITE;
        if access == Access::NONE || !remote.contains(access) {
            return Err(FabricError::Invalid(
                "remote access must be REMOTE_READ and/or REMOTE_WRITE",
            ));
        }
        let mut regions = self.write_regions();
        let region = regions
            .get_mut(lkey)
            .ok_or(FabricError::Invalid("no such region"))?;
        if !region.access.contains(access) {
            return Err(FabricError::Invalid(
                "the region does not allow that access",
            ));
        }
        if access.contains(Access::REMOTE_WRITE) && !region.access.contains(Access::LOCAL_WRITE) {
            return Err(FabricError::Invalid("remote write needs local write"));
        }
        let rkey = self
            .write_rkeys()
            .insert(RemoteKey { lkey, qp, access })
            .ok_or(FabricError::NoResources("remote keys"))?;
        region.rkeys.push(rkey);
        Ok(rkey)
    }

    /// Revokes a remote key. Unknown keys are ignored.
    pub(super) fn unbind(&self, rkey: u32) {
        let mut regions = self.write_regions();
        if let Some(key) = self.write_rkeys().remove(rkey) {
            if let Some(region) = regions.get_mut(key.lkey) {
                region.rkeys.retain(|k| *k != rkey);
            }
        }
    }

    pub(super) fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }
}

/// Whether every entry lies inside a region of `regions` allowing `need`.
/// Zero-length entries name no memory and always pass.
pub(super) fn check_local(regions: &Slab<Region>, sges: &[Sge], need: Access) -> bool {
    sges.iter().all(|s| {
        s.len == 0
            || regions
                .get(s.lkey)
                .is_some_and(|r| r.access.contains(need) && r.covers(s.addr, s.len as usize))
    })
}

/// The local address of `[addr, addr+len)` if `rkey` lets the peer of `qp`
/// access it with `need`.
pub(super) fn check_remote(
    regions: &Slab<Region>,
    rkeys: &Slab<RemoteKey>,
    rkey: u32,
    qp: QpNum,
    addr: u64,
    len: usize,
    need: Access,
) -> Option<usize> {
    let key = rkeys.get(rkey)?;
    if key.qp != qp || !key.access.contains(need) {
        return None;
    }
    let region = regions.get(key.lkey)?;
    let addr = usize::try_from(addr).ok()?;
    (region.access.contains(need) && region.covers(addr, len)).then_some(addr)
}

/// Total length of a list, if it fits a message (`u32`).
pub(super) fn total_len(sges: &[Sge]) -> Option<u32> {
    let total: u64 = sges.iter().map(|s| u64::from(s.len)).sum();
    u32::try_from(total).ok()
}

/// Copies the bytes of the gather list `src` into the scatter list `dst`, in
/// order, until either ends; one `ptr::copy` per contiguous piece.
///
/// # Safety
/// Every byte range of both lists lies inside a region registered in a table
/// whose read lock the caller holds for the whole call (so each range is
/// valid memory by `Nic::register`'s contract), and nothing else accesses the
/// destination ranges meanwhile (same contract).
pub(super) unsafe fn copy_lists(src: &[Sge], dst: &[Sge]) {
    let (mut si, mut soff) = (0usize, 0usize);
    let (mut di, mut doff) = (0usize, 0usize);
    while si < src.len() && di < dst.len() {
        let (s, d) = (&src[si], &dst[di]);
        let n = (s.len as usize - soff).min(d.len as usize - doff);
        if n > 0 {
            // SAFETY: `[s.addr+soff, +n)` and `[d.addr+doff, +n)` lie inside
            // registered regions that stay registered during the call
            // (caller), hence valid memory. `copy` (memmove) because a
            // program may register overlapping ranges and send between them.
            unsafe { std::ptr::copy((s.addr + soff) as *const u8, (d.addr + doff) as *mut u8, n) };
        }
        soff += n;
        doff += n;
        if soff == s.len as usize {
            si += 1;
            soff = 0;
        }
        if doff == d.len as usize {
            di += 1;
            doff = 0;
        }
    }
}

/// Whether every page of `[addr, addr+len)` is mapped (`mincore`).
pub(super) fn range_mapped(addr: usize, len: usize) -> bool {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if page > 0 { page as usize } else { 4096 };
    let start = addr & !(page - 1);
    let Some(end) = addr
        .checked_add(len)
        .and_then(|e| e.checked_add(page - 1))
        .map(|e| e & !(page - 1))
    else {
        return false;
    };
    let mut residency = [0u8; 256];
    let mut at = start;
    while at < end {
        let pages = ((end - at) / page).min(residency.len());
        // SAFETY: `at` is page aligned; mincore only inspects the mappings
        // of `[at, at + pages*page)` and writes one byte per page into
        // `residency`, which has room for `pages` bytes.
        let rc = unsafe {
            libc::mincore(
                at as *mut libc::c_void,
                pages * page,
                residency.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return false;
        }
        at += pages * page;
    }
    true
}
