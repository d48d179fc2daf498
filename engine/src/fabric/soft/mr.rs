//! Protection domain of one soft NIC: registered regions, remote keys, the
//! checks every scatter/gather entry passes, and the copy engine.
//!
//! Keys (lkeys and rkeys alike) are `generation << 20 | slot`. A slot's
//! generation grows by one on every reuse and a slot whose generation reached
//! the maximum is retired instead of reused, so a stale key never names a
//! newer entry; the first generation is 1, so key 0 is never valid.

use super::lock;
use crate::fabric::lkey_cache::{CachedRegion, LkeyCache};
use crate::fabric::{Access, FabricError, QpNum, Sge};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

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
    /// The queue pairs whose posts may have the region in their
    /// [`LkeyCache`]: those a deregistration waits for.
    users: Mutex<Users>,
}

/// Queue pairs that looked a region up (see [`Region::users`]). Written by
/// a post's cache miss (under the region table's read lock); read by the
/// deregistration (under its write lock, so no miss is in progress).
#[derive(Default)]
struct Users {
    /// Queue-pair numbers, each once, at most [`MAX_USERS`].
    qps: Vec<u32>,
    /// More than [`MAX_USERS`] queue pairs used the region: a
    /// deregistration waits for the posts of every queue pair.
    all: bool,
}

/// Queue pairs a region remembers by number before its deregistration
/// waits for all of them instead.
const MAX_USERS: usize = 64;

impl Region {
    fn note_user(&self, qp: u32) {
        let mut u = lock(&self.users);
        if u.all || u.qps.contains(&qp) {
            return;
        }
        if u.qps.len() == MAX_USERS {
            u.all = true;
            u.qps = Vec::new();
        } else {
            u.qps.push(qp);
        }
    }
}

/// The posts a deregistration waits for.
pub(super) enum Quiesce {
    /// The posts of these queue pairs (by number).
    Qps(Vec<u32>),
    /// The posts of every queue pair of the NIC.
    All,
}

/// A connection whose ends each hold a [`Window`] (`link::Link`): what
/// binding a remote key and revoking it need of the connection.
pub(super) trait WindowHost: Send + Sync {
    /// Runs `f` on the window of end `dir`, under the lock that end's RDMA
    /// holds across each access (its post lock).
    fn with_window(&self, dir: usize, f: &mut dyn FnMut(&mut Window));
}

/// A remote key: exposes a region to the peer of one queue pair.
pub(super) struct RemoteKey {
    lkey: u32,
    /// The connection whose window holds the key, and the direction (the
    /// peer's end) whose RDMA may use it.
    window: Weak<dyn WindowHost>,
    dir: usize,
}

/// A key taken out of the tables, still to be taken out of its window.
struct Revoked {
    window: Weak<dyn WindowHost>,
    dir: usize,
    rkey: u32,
}

impl Revoked {
    /// Takes the key out of its connection's window, under the post lock of
    /// the end whose RDMA uses the window: waits for an RDMA in progress to
    /// finish, and none starts with the key after. Called with no table
    /// lock held (the post path takes the post lock, then `regions`).
    fn revoke(self) {
        if let Some(host) = self.window.upgrade() {
            host.with_window(self.dir, &mut |w| w.remove(self.rkey));
        }
    }
}

impl RemoteKey {
    fn revoked(self, rkey: u32) -> Revoked {
        Revoked {
            window: self.window,
            dir: self.dir,
            rkey,
        }
    }
}

/// The remote keys one end of a connection exposed to the other, as its
/// RDMA checks them: kept with the end's posting state, so the post lock an
/// RDMA holds anyway is held across each access.
#[derive(Default)]
pub(super) struct Window {
    keys: Vec<WindowKey>,
}

struct WindowKey {
    rkey: u32,
    addr: usize,
    len: usize,
    access: Access,
}

impl Window {
    fn remove(&mut self, rkey: u32) {
        self.keys.retain(|k| k.rkey != rkey);
    }

    /// The local address of `[addr, addr+len)` if `rkey` allows `need` on
    /// all of it.
    pub(super) fn check(&self, rkey: u32, addr: u64, len: usize, need: Access) -> Option<usize> {
        let k = self.keys.iter().find(|k| k.rkey == rkey)?;
        let addr = usize::try_from(addr).ok()?;
        let inside = addr >= k.addr && addr.checked_add(len).is_some_and(|e| e <= k.addr + k.len);
        (k.access.contains(need) && inside).then_some(addr)
    }
}

/// Regions and remote keys of one NIC.
///
/// Lock order: an end's post lock (which holds its window) before `regions`
/// before `rkeys`. The data path takes none of the tables on a hit of its
/// [`LkeyCache`] (a miss read-locks `regions` briefly); remote keys are
/// checked in the window of the connection end they are bound to, under its
/// post lock, which `unbind` and `deregister` take to revoke a key once
/// they released the tables: revocation waits for an access in progress
/// and no access starts after it returned. `bind` takes the post lock
/// first, so a key is in its window before a deregistration of its region
/// can find it.
pub(super) struct Pd {
    /// Registered regions by lkey. Written by register, deregister,
    /// bind/unbind (the region's key list); read by the data path.
    regions: RwLock<Slab<Region>>,
    /// Remote keys by rkey. Written by bind/unbind/deregister; read for
    /// statistics.
    rkeys: RwLock<Slab<RemoteKey>>,
    /// Successful registrations since creation (statistics only).
    registrations: AtomicU64,
    /// Deregistrations since creation: a change invalidates every
    /// [`LkeyCache`]. Bumped under the `regions` write lock.
    epoch: AtomicU64,
}

pub(super) type RegionsGuard<'a> = RwLockReadGuard<'a, Slab<Region>>;
pub(super) type RkeysGuard<'a> = RwLockReadGuard<'a, Slab<RemoteKey>>;

impl Pd {
    pub(super) fn new() -> Pd {
        Pd {
            regions: RwLock::new(Slab::new()),
            rkeys: RwLock::new(Slab::new()),
            registrations: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
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
                users: Mutex::default(),
            })
            .ok_or(FabricError::NoResources("memory region keys"))?;
        self.registrations.fetch_add(1, Ordering::Relaxed);
        Ok(lkey)
    }

    /// Removes a region and every remote key bound to it (waiting for an
    /// RDMA through one of them to finish). Unknown keys are ignored.
    /// Returns the posts that may have the region cached, which the caller
    /// then waits for.
    pub(super) fn deregister(&self, lkey: u32) -> Quiesce {
        let mut regions = self.write_regions();
        let Some(region) = regions.remove(lkey) else {
            return Quiesce::Qps(Vec::new());
        };
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let revoked: Vec<Revoked> = {
            let mut rkeys = self.write_rkeys();
            region
                .rkeys
                .iter()
                .filter_map(|&k| Some(rkeys.remove(k)?.revoked(k)))
                .collect()
        };
        drop(regions);
        revoked.into_iter().for_each(Revoked::revoke);
        let users = region
            .users
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        if users.all {
            Quiesce::All
        } else {
            Quiesce::Qps(users.qps)
        }
    }

    /// Binds a new remote key for `lkey`, usable by RDMA of end `dir` of
    /// `link` (whose other end is a live queue pair of this NIC).
    pub(super) fn bind<H: WindowHost + 'static>(
        &self,
        lkey: u32,
        link: &Arc<H>,
        dir: usize,
        access: Access,
    ) -> Result<u32, FabricError> {
        let remote = Access::REMOTE_READ | Access::REMOTE_WRITE;
        if access == Access::NONE || !remote.contains(access) {
            return Err(FabricError::Invalid(
                "remote access must be REMOTE_READ and/or REMOTE_WRITE",
            ));
        }
        let host: Weak<dyn WindowHost> = Arc::downgrade(link) as Weak<H>;
        let mut bound = None;
        link.with_window(dir, &mut |window| {
            bound = Some(self.bind_in(lkey, window, host.clone(), dir, access));
        });
        bound.expect("with_window runs its closure")
    }

    /// `bind` under the post lock of end `dir`, which holds its `window`.
    fn bind_in(
        &self,
        lkey: u32,
        window: &mut Window,
        host: Weak<dyn WindowHost>,
        dir: usize,
        access: Access,
    ) -> Result<u32, FabricError> {
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
            .insert(RemoteKey {
                lkey,
                window: host,
                dir,
            })
            .ok_or(FabricError::NoResources("remote keys"))?;
        region.rkeys.push(rkey);
        window.keys.push(WindowKey {
            rkey,
            addr: region.addr,
            len: region.len,
            access,
        });
        Ok(rkey)
    }

    /// Revokes a remote key (waiting for an RDMA through it to finish).
    /// Unknown keys are ignored.
    pub(super) fn unbind(&self, rkey: u32) {
        let revoked = {
            let mut regions = self.write_regions();
            let Some(key) = self.write_rkeys().remove(rkey) else {
                return;
            };
            if let Some(region) = regions.get_mut(key.lkey) {
                region.rkeys.retain(|k| *k != rkey);
            }
            key.revoked(rkey)
        };
        revoked.revoke();
    }

    /// Whether every entry lies inside a region allowing `need`, looked up
    /// in `cache` first (the caller holds the post lock the cache belongs
    /// to, which a deregistration waits for: see `NicShared::quiesce_posts`,
    /// so a region found in the cache stays registered until the post that
    /// found it there is over). A miss records queue pair `qp`, the
    /// cache's owner, among the region's users.
    #[inline]
    pub(super) fn check_cached(
        &self,
        cache: &mut LkeyCache,
        qp: QpNum,
        sges: &[Sge],
        need: Access,
    ) -> bool {
        cache.check(self.epoch.load(Ordering::Acquire), sges, need, |lkey| {
            let regions = self.read_regions();
            let r = regions.get(lkey)?;
            r.note_user(qp.0);
            Some(CachedRegion {
                lkey,
                addr: r.addr,
                len: r.len,
                access: r.access,
            })
        })
    }

    pub(super) fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }
}

/// Total length of a list, if it fits a message (`u32`). One entry, the
/// common post, skips the loop (whose set-up costs more than its one turn).
#[inline]
pub(super) fn total_len(sges: &[Sge]) -> Option<u32> {
    if let [one] = sges {
        return Some(one.len);
    }
    let total: u64 = sges.iter().map(|s| u64::from(s.len)).sum();
    u32::try_from(total).ok()
}

/// Copies the bytes of the gather list `src` into the scatter list `dst`, in
/// order, until either ends; one `ptr::copy` per contiguous piece.
///
/// # Safety
/// Every byte range of both lists is valid memory for the whole call
/// (registered, and kept registered by the caller's protocol), and nothing
/// else accesses the destination ranges meanwhile.
#[inline(always)]
pub(super) unsafe fn copy_lists(
    mut src: impl Iterator<Item = Sge>,
    mut dst: impl Iterator<Item = Sge>,
) {
    let (mut s, mut d) = (src.next(), dst.next());
    let (mut soff, mut doff) = (0usize, 0usize);
    while let (Some(sv), Some(dv)) = (s, d) {
        let n = (sv.len as usize - soff).min(dv.len as usize - doff);
        if n > 0 {
            // SAFETY: `[sv.addr+soff, +n)` and `[dv.addr+doff, +n)` lie
            // inside the entries, valid memory for the call (caller). A
            // `memmove` because a program may register overlapping ranges
            // and send between them.
            unsafe {
                super::cell::copy_bytes(
                    (sv.addr + soff) as *const u8,
                    (dv.addr + doff) as *mut u8,
                    n,
                )
            };
        }
        soff += n;
        doff += n;
        if soff == sv.len as usize {
            s = src.next();
            soff = 0;
        }
        if doff == dv.len as usize {
            d = dst.next();
            doff = 0;
        }
    }
}

/// Copies between the entries of `list`, in order, and the one range of
/// their total length at `flat`: into that range if `to_flat`, else out of
/// it (an RDMA write or read: the remote side is one range of one region).
///
/// # Safety
/// As [`copy_lists`], with `[flat, +total)` for the flat side.
#[inline]
pub(super) unsafe fn copy_flat(list: &[Sge], flat: usize, to_flat: bool) {
    let mut at = flat;
    for s in list {
        let (from, to) = if to_flat { (s.addr, at) } else { (at, s.addr) };
        // SAFETY: both ranges lie inside memory valid for the call
        // (caller); a `memmove`: a program may register overlapping
        // ranges.
        unsafe { super::cell::copy_bytes(from as *const u8, to as *mut u8, s.len as usize) };
        at += s.len as usize;
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
