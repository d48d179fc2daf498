//! The registration table: per-socket registrations of caller memory, the
//! shared NIC registrations behind them, and the cache of registrations whose
//! count dropped to zero (spec §3.1, §5, §7-2, §7-13, §7-19).
//!
//! # Model
//!
//! * An **entry** is one NIC registration of `[addr, addr+len)` with one set
//!   of NIC access rights — the refcount key of spec §7-13. Overlapping but
//!   non-identical ranges are independent entries. An entry's *total* is the
//!   sum of the counts of the associations naming it.
//! * An **association** is one socket's registration of an entry:
//!   - a *local* one (`WSPRegisterMemory`) has a [`RegHandle`], the
//!     `MEM_READ`/`MEM_WRITE` flags it was registered with, and a count
//!     (registering the same buffer with the same flags again on the same
//!     socket returns the same handle and counts 2);
//!   - an *exposure* (`WSPRegisterRdmaMemory`) has a remote key bound to the
//!     socket's queue pair (so its descriptor works on that connection only,
//!     MEM-7), a generation, and a count.
//! * Only the deregistration that drops an entry's total to zero releases
//!   it (MEM-2) — to the cache when caching is on, else to the NIC.
//!   Exposures unbind their remote key as soon as their own count reaches
//!   zero, so a cached entry is never reachable by a peer (MEM-6).
//! * Data operations borrow local associations as [`RegRef`]s: a clone of an
//!   `Arc`, no allocation, one atomic add (the `Arc`'s count is also the
//!   in-use count, see `OwnerState::op_refs`). While a `RegRef` of an association lives, that
//!   association is *in use* and cannot be deregistered (MEM-3). In-use is
//!   tracked **per association** (socket + entry + flags), so another
//!   socket's transfers never block this socket's deregistration. A `RegRef`
//!   also keeps the NIC registration itself alive: the NIC registration is
//!   owned by a reference-counted `NicRegion` whose drop deregisters, so
//!   no path — not even [`RegistrationTable::release_owner`] called too
//!   early — can release memory an op still names.
//!
//! # Locking
//!
//! Two kinds of lock, always taken in this order:
//!
//! 1. the **table lock** (`RegistrationTable::state`), taken only by
//!    register, deregister, release and cache operations;
//! 2. an **owner lock** (`OwnerRegs::state`), one per socket.
//!
//! The data path ([`RegistrationTable::acquire_covering`],
//! [`RegistrationTable::acquire_handle`]) takes only the owner lock, and
//! the SPI's ([`RegistrationTable::acquire_pinned`]) takes none when its
//! query repeats the last one of its direction (see [`Hit`]). NIC
//! calls (`register`, `deregister`, `bind_remote`, `unbind_remote`) may be
//! made with either or both held; the NIC never calls back into the table.
//!
//! # The hit, a lookup without the lock
//!
//! Each owner remembers its last successful lookup per direction (buffers
//! read by the NIC, buffers written by it: a socket's sends and receives)
//! in a [`Hit`]: the query's handle and flags, the association it found,
//! and the range within which every buffer gets that same answer (the
//! association's whole range when that is exact, see `OwnerState::hit`,
//! else the query's buffer). A query with that handle and those flags
//! whose buffer lies in the range takes a hold through the hit, one atomic
//! add on the hit's `held` count and no lock; the hold is given back by one atomic subtraction
//! when the op's `RegRef` is dropped. The association a hit names is in
//! use while its `held` count is not zero, as while its `Arc` has
//! `RegRef`s (`OwnerRegs::in_use`). The protocol, for each hit:
//!
//! * Writers hold the owner lock. Before they look at `held` or change the
//!   hit, they stop it (`seq` odd, then a `SeqCst` fence); they start it
//!   again (`seq` even and moved on) when done.
//! * A reader checks the query against the hit with `seq` even, adds to
//!   `held` (`SeqCst`), then loads `seq` again: changed, it gives the hold
//!   back and takes the lock instead.
//! * Both sides write one location and then read the other's, `SeqCst`:
//!   a writer that reads `held` at 0 has stopped every reader that did not
//!   add to it yet, and a writer never changes a hit while `held` is not
//!   zero (a lookup that misses then just does not remember its answer).
//!   So a hold always names the association the hit names, which the hit
//!   keeps (`OwnerState::hit`) as long as holds remain: the NIC
//!   registration outlives every op that uses it.
//!
//! The loom model `loom_hit_hold_racing_deregistration` checks it.
//!
//! # Cache
//!
//! With [`MrCacheConfig::enabled`], an entry whose total drops to zero stays
//! NIC-registered in an LRU bounded by `max_entries` and `max_bytes`
//! (oldest evicted first). A later registration of the same key is a hit and
//! makes no NIC registration (CACHE-1); an exposure hit still binds a fresh
//! remote key. [`RegistrationTable::cache_callback`] drops cached entries
//! overlapping a range (CACHE-2) and marks live ones *doomed*: a doomed entry
//! is released, never cached, when its total reaches zero, and new
//! registrations of its key get a fresh entry. Each cached entry remembers
//! the socket that released it last; closing that socket releases it
//! (CACHE-3).

use crate::config::MrCacheConfig;
use crate::error::{WsaError, WsaResult};
use crate::fabric::{Access, FabricError, Nic, QpNum};
use crate::mem::descriptor::Descriptor;
use crate::mem::region::check_mapped;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU64;
use std::ptr::NonNull;
// The refcount protocol (`OwnerState::op_refs`, the locks, the shared NIC
// registration) goes through the sync facade so that loom can check it; the
// owner handles and the NIC stay plain `std::sync::Arc`s.
use crate::sync::{self, Mutex, MutexGuard, Ordering};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError};

/// Names a socket for the table. Never reused within a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(pub u64);

/// `MEM_READ` / `MEM_WRITE` flags of a registration.
///
/// For a local registration `READ` means the buffer may be the source of
/// sends and RDMA writes, `WRITE` that it may be the sink of receives and
/// RDMA reads. For an exposure `WRITE` means the peer may RDMA-write it,
/// `READ` that the peer may RDMA-read it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemFlags(u32);

impl MemFlags {
    /// `MEM_READ` (1).
    pub const READ: MemFlags = MemFlags(1);
    /// `MEM_WRITE` (2).
    pub const WRITE: MemFlags = MemFlags(2);
    /// `MEM_READWRITE` (3).
    pub const READWRITE: MemFlags = MemFlags(3);

    /// Validates SPI flags: anything but 1, 2, 3 → `WSAEINVAL`.
    pub fn from_raw(raw: u32) -> WsaResult<MemFlags> {
        match raw {
            1..=3 => Ok(MemFlags(raw)),
            _ => Err(WsaError::WSAEINVAL),
        }
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn contains(self, other: MemFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// NIC rights of a local registration: local write iff `MEM_WRITE`
    /// (local read is always allowed).
    fn local_access(self) -> Access {
        if self.contains(MemFlags::WRITE) {
            Access::LOCAL_WRITE
        } else {
            Access::NONE
        }
    }

    /// Rights of an exposure's remote key: `MEM_WRITE` → the peer may
    /// write, `MEM_READ` → the peer may read.
    fn remote_access(self) -> Access {
        let mut a = Access::NONE;
        if self.contains(MemFlags::WRITE) {
            a = a | Access::REMOTE_WRITE;
        }
        if self.contains(MemFlags::READ) {
            a = a | Access::REMOTE_READ;
        }
        a
    }

    /// NIC rights of an exposure's registration: the remote rights, plus
    /// local write when the peer may write (verbs requires it).
    fn exposure_access(self) -> Access {
        if self.contains(MemFlags::WRITE) {
            self.remote_access() | Access::LOCAL_WRITE
        } else {
            self.remote_access()
        }
    }
}

impl fmt::Debug for MemFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "MEM_READ",
            2 => "MEM_WRITE",
            3 => "MEM_READWRITE",
            _ => "MEM_?",
        };
        f.write_str(name)
    }
}

/// The handle `WSPRegisterMemory` returns: unique within a table, never
/// reused, valid only with the [`OwnerRegs`] that obtained it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegHandle(NonZeroU64);

impl RegHandle {
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// `None` for 0 (the SPI's NULL handle).
    pub fn from_raw(raw: u64) -> Option<RegHandle> {
        NonZeroU64::new(raw).map(RegHandle)
    }
}

/// Counters of a table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Entries with at least one registration (total > 0).
    pub live_entries: usize,
    /// Entries held by the cache (total 0, still NIC-registered).
    pub cached_entries: usize,
    /// Bytes held by the cache.
    pub cached_bytes: u64,
    /// Registrations served from the cache without a NIC registration.
    pub cache_hits: u64,
    /// NIC registrations this table made.
    pub nic_registrations: u64,
    /// Registrations that looked the pages of their range up (`mincore`,
    /// a system call) and found them mapped: those that found no entry of
    /// their key, live or cached.
    pub mapping_checks: u64,
    /// Bytes of the entries with at least one registration (each NIC
    /// registration counted once, however many sockets share it).
    pub registered_bytes: u64,
}

/// One NIC registration; dropping the last reference deregisters it.
///
/// Shared by the table's entry and every [`RegRef`] taken from it, so the
/// NIC registration outlives every op that names its lkey.
struct NicRegion {
    /// The NIC that made the registration. Immutable.
    nic: Arc<dyn Nic>,
    /// The registration's local key. Immutable.
    lkey: u32,
}

impl Drop for NicRegion {
    fn drop(&mut self) {
        self.nic.deregister(self.lkey);
    }
}

/// The refcount key of an entry (spec §7-13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct EntryKey {
    addr: usize,
    len: usize,
    /// Rights of the NIC registration.
    access: Access,
}

impl EntryKey {
    fn end(&self) -> usize {
        // Validated at registration: addr + len does not overflow.
        self.addr + self.len
    }
}

/// Identifies an entry within a table (never reused).
type EntryId = u64;

/// Where a cached entry sits in the LRU, and who released it last.
#[derive(Clone, Copy, Debug)]
struct CacheSlot {
    /// Key of the entry in `TableState::lru` (larger = more recent).
    stamp: u64,
    /// The owner whose deregistration dropped the total to zero (CACHE-3).
    last_owner: OwnerId,
}

/// One shared registration.
struct Entry {
    /// Range and rights. Immutable.
    key: EntryKey,
    /// The NIC registration. Immutable; the entry's reference is dropped
    /// when the entry is removed from the table.
    region: sync::Arc<NicRegion>,
    /// Sum of the counts of all associations naming this entry. Invariant:
    /// `total == 0` ⇔ `cached.is_some()` (an entry that reaches zero and is
    /// not cached is removed at once).
    total: u64,
    /// Set by `cache_callback` on a live entry: release (never cache) at
    /// total zero. Invariant: a doomed entry is not in `TableState::by_key`.
    doomed: bool,
    /// `Some` while in the cache.
    cached: Option<CacheSlot>,
}

/// Everything behind the table lock.
struct TableState {
    /// Key → the entry new registrations of that key join. Invariant: names
    /// exactly the entries that are not doomed.
    by_key: HashMap<EntryKey, EntryId>,
    /// Every entry still NIC-registered through the table: live (total > 0,
    /// possibly doomed) or cached.
    entries: HashMap<EntryId, Entry>,
    /// Cached entries by recency stamp, oldest first. Invariant: holds
    /// exactly the entries whose `cached` is `Some`, under that stamp.
    lru: BTreeMap<u64, EntryId>,
    /// Sum of the lengths of the cached entries.
    cached_bytes: u64,
    /// Next entry id; ids start at 1 and are never reused, so an
    /// association's id names its own entry even after a doomed entry and a
    /// fresh one with the same key coexist.
    next_entry: EntryId,
    /// Next LRU stamp; strictly increasing.
    next_stamp: u64,
    /// Next handle value; handles start at 1 and are never reused.
    next_handle: u64,
    /// Next exposure generation; never 0, wraps after 2^32 - 1 exposures.
    next_generation: u32,
    /// Registrations served by reviving a cached entry. Only grows.
    cache_hits: u64,
    /// Successful `Nic::register` calls. Only grows.
    nic_registrations: u64,
    /// Ranges found mapped by `RegistrationTable::lock_mapped`'s look.
    /// Only grows.
    mapping_checks: u64,
}

/// The part of a local association a [`RegRef`] needs, shared with it.
struct LocalShared {
    /// Immutable copies of the association's identity.
    lkey: u32,
    addr: usize,
    len: usize,
    flags: MemFlags,
    /// Keeps the NIC registration alive while any `RegRef` exists.
    _region: sync::Arc<NicRegion>,
}

/// A local association (`WSPRegisterMemory`) of one owner.
struct LocalAssoc {
    /// The entry this association counts in (present in
    /// `TableState::entries` with `total >= count` while the association
    /// exists).
    entry: EntryId,
    /// Registrations of this buffer with these flags by this owner (≥ 1).
    count: u64,
    /// Identity, in-use counter and NIC registration, shared with the
    /// association's `RegRef`s.
    shared: sync::Arc<LocalShared>,
}

/// An exposure (`WSPRegisterRdmaMemory`) of one owner.
///
/// All fields but `count` are immutable; the exposure is identified by its
/// descriptor (remote key + generation + range).
struct Exposure {
    /// The entry this exposure counts in (as `LocalAssoc::entry`).
    entry: EntryId,
    /// The connection's queue pair the remote key is bound to.
    qp: QpNum,
    /// The flags it was registered with (determine the entry's rights).
    flags: MemFlags,
    /// Remote key bound to `qp`; bound exactly while the exposure exists
    /// (unbound when `count` reaches zero or the owner is released).
    rkey: u32,
    /// Unique among the table's live exposures (global counter), so a stale
    /// descriptor whose remote key was reused does not match.
    generation: u32,
    /// The exposed range.
    addr: usize,
    len: usize,
    /// Registrations of this exposure by this owner (≥ 1).
    count: u64,
}

impl Exposure {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            rkey: self.rkey,
            addr: self.addr as u64,
            len: self.len as u64,
            generation: self.generation,
        }
    }
}

/// Everything behind an owner lock.
struct OwnerState {
    /// Set once by `release_owner`; afterwards every call fails
    /// `WSAENOTSOCK` and the maps stay empty.
    released: bool,
    /// Local associations by handle value (iteration = registration order,
    /// which makes the covering lookup deterministic).
    locals: BTreeMap<u64, LocalAssoc>,
    /// Exposures; few per socket, searched linearly.
    exposures: Vec<Exposure>,
    /// The association each of `OwnerRegs::hits` names: set when a hit
    /// is (re)written, cleared when the association leaves `locals` (or the
    /// owner is released) and no hold through the hit remains, kept
    /// otherwise, so that the holds keep the NIC registration alive.
    ///
    /// A hit is exact: every query it answers gets the association the
    /// locked lookup would return. When it is written, for every buffer in
    /// its range (`Hit::addr`, `Hit::len`):
    /// * a handle query's answer is the handle's association, whatever the
    ///   buffer inside its range: the hit's range is the association's;
    /// * a covering query's answer is the first association in `locals`
    ///   (handle order) whose flags contain `need` and which covers the
    ///   buffer. With F that answer for the query's buffer, F's whole
    ///   range is remembered only if no association before F whose flags
    ///   contain `need` meets F, closed ends included
    ///   (`RegistrationTable::acquire_covering`): an earlier A covers some
    ///   buffer inside F (empty ones too) exactly when `A.addr <= F.end`
    ///   and `F.addr <= A.end`, so then none does and F is the answer for
    ///   every buffer inside F. Otherwise the hit's range is the query's
    ///   buffer alone.
    ///
    /// And it stays exact: a later registration gets a larger handle (a
    /// repeat of an existing one counts on its handle) and comes after F in
    /// `locals`, so it is not an earlier match; a removal from `locals`
    /// only takes earlier matches away, and the removal of F itself clears
    /// the hits that name it (`OwnerRegs::drop_hits`, `release_owner`). A
    /// handle names one association until it leaves `locals`.
    hit: [Option<sync::Arc<LocalShared>>; HITS],
}

impl OwnerState {
    /// How many `Arc` [`RegRef`]s hold `s` (one of this owner's
    /// associations); holds through a hit are counted apart (see
    /// `OwnerRegs::in_use`). Besides `RegRef`s only this state holds `s`'s
    /// `Arc`, once in its association and once more per hit naming it.
    /// Called with the owner lock held, under which no `Arc` `RegRef` is
    /// made, so a zero stays zero until the lock is released.
    fn op_refs(&self, s: &sync::Arc<LocalShared>) -> usize {
        let hits = self
            .hit
            .iter()
            .filter(|h| h.as_ref().is_some_and(|h| sync::Arc::ptr_eq(h, s)))
            .count();
        let held = sync::Arc::strong_count(s);
        // Acquire: an op's use of the buffer happens before a
        // deregistration that sees its `RegRef` dropped (the `Arc`'s
        // decrement is a release).
        sync::fence(Ordering::Acquire);
        let own = 1 + hits;
        debug_assert!(held >= own, "association held less than its owner holds it");
        held - own
    }
}

/// Hits per owner: one for buffers the NIC reads (sends, RDMA writes), one
/// for buffers it writes (receives, RDMA reads).
const HITS: usize = 2;

/// `Hit::need`'s bit for "the hit holds a query".
const HIT_VALID: u32 = 1 << 31;

/// The hit a lookup needing `need` uses.
fn hit_index(need: MemFlags) -> usize {
    usize::from(need.contains(MemFlags::WRITE))
}

/// Between a `SeqCst` read-modify-write of one location and a `SeqCst`
/// load of another, in the hit's protocol (a reader adds to `held` then
/// loads `seq`, a writer adds to `seq` then loads `held`). Natively nothing
/// is needed: all four are `SeqCst`, so they fall in one total order
/// consistent with program order, in which a load that missed the other
/// side's write would have to come both before and after it. loom models
/// `SeqCst` accesses as `AcqRel` (it reports this protocol broken without
/// a fence), but models `SeqCst` fences: its builds add one here, so the
/// model checks the same ordering.
#[inline(always)]
fn seqcst_rmw_then_load() {
    #[cfg(loom)]
    sync::fence(Ordering::SeqCst);
}

/// The last successful lookup of one direction, readable without the owner
/// lock (module docs, "The hit"). Every field is written only under the
/// owner lock, while `seq` is odd, except `held`.
struct Hit {
    /// Even while the hit may be used, odd while a writer stops it; moves
    /// on by 2 with every stop, so a reader that saw it even before a stop
    /// sees a different value after it.
    seq: sync::AtomicU64,
    /// The query: `HIT_VALID | need` (0: no query), the handle (0 for a
    /// covering lookup), and the range `[addr, addr+len)` every buffer of
    /// the query with this handle and `need` gets the same answer in
    /// (`OwnerState::hit`); the range does not wrap.
    need: sync::AtomicU32,
    handle: sync::AtomicU64,
    addr: sync::AtomicUsize,
    len: sync::AtomicUsize,
    /// The association found: a `*const LocalShared` of the `Arc` in
    /// `OwnerState::hit`, unchanged while `held` is not zero.
    shared: sync::AtomicUsize,
    /// The association's local key (`LocalShared::lkey` of `shared`), on
    /// the query's line: what a post reads of a hold taken through the
    /// hit, without a look at the association.
    lkey: sync::AtomicU32,
    /// Holds taken through the hit and not given back: each is a live
    /// [`RegRef`]. Added to by lock-free readers (then validated against
    /// `seq`), taken from by `RegRef` drops; read by writers after a stop.
    held: sync::AtomicUsize,
}

impl Hit {
    fn new() -> Hit {
        Hit {
            seq: sync::AtomicU64::new(0),
            need: sync::AtomicU32::new(0),
            handle: sync::AtomicU64::new(0),
            addr: sync::AtomicUsize::new(0),
            len: sync::AtomicUsize::new(0),
            shared: sync::AtomicUsize::new(0),
            lkey: sync::AtomicU32::new(0),
            held: sync::AtomicUsize::new(0),
        }
    }

    /// The lock-free lookup: a hold on the hit's association if the hit
    /// holds this handle and `need` and `[addr, addr+len)` lies in its
    /// range, else `None` (take the lock).
    #[inline]
    fn get(&self, handle: u64, addr: usize, len: usize, need: MemFlags) -> Option<RegRef> {
        let seq = self.seq.load(Ordering::Acquire);
        if seq & 1 != 0
            || self.need.load(Ordering::Relaxed) != HIT_VALID | need.bits()
            || self.handle.load(Ordering::Relaxed) != handle
        {
            return None;
        }
        // Inside `[start, start+span)` without an overflow: a buffer below
        // `start` wraps `off` past `span` (the range does not wrap), and a
        // buffer whose end would wrap is longer than `span - off`.
        let off = addr.wrapping_sub(self.addr.load(Ordering::Relaxed));
        let span = self.len.load(Ordering::Relaxed);
        if off > span || len > span - off {
            return None;
        }
        // The query's loads happen before the validation below.
        sync::fence(Ordering::Acquire);
        self.held.fetch_add(1, Ordering::SeqCst);
        seqcst_rmw_then_load();
        if self.seq.load(Ordering::SeqCst) != seq {
            // A writer stopped the hit meanwhile (and may not see us).
            self.held.fetch_sub(1, Ordering::Release);
            return None;
        }
        #[cfg(feature = "perf-gate-slowdown")]
        crate::perf_gate_slowdown::burn();
        Some(RegRef(Held::Hit(NonNull::from(self))))
    }

    /// Stops the hit (the owner lock is held): no reader takes a new hold
    /// until [`Hit::start`]. Returns the holds still taken through it.
    fn stop(&self) -> usize {
        // A SeqCst read-modify-write, then a SeqCst load of `held`: against
        // the reader's add to `held` and load of `seq`, one of the two sees
        // the other (both are in the one total order of SeqCst operations).
        let was = self.seq.fetch_add(1, Ordering::SeqCst);
        debug_assert_eq!(was & 1, 0, "a hit stopped twice");
        seqcst_rmw_then_load();
        // SeqCst (so also acquire): the ops' uses of their buffers happen
        // before the deregistration that sees their holds given back.
        self.held.load(Ordering::SeqCst)
    }

    /// Lets readers use the hit again, as it is now.
    fn start(&self) {
        let seq = self.seq.load(Ordering::Relaxed);
        debug_assert_eq!(seq & 1, 1, "a hit started twice");
        self.seq.store(seq + 1, Ordering::Release);
    }

    /// Forgets the query (the hit is stopped).
    fn clear(&self) {
        self.need.store(0, Ordering::Relaxed);
    }

    /// Writes a query, the range it is answered in and its association
    /// (the hit is stopped and holds nothing).
    fn set(&self, handle: u64, addr: usize, len: usize, need: MemFlags, s: &LocalShared) {
        self.need.store(HIT_VALID | need.bits(), Ordering::Relaxed);
        self.handle.store(handle, Ordering::Relaxed);
        self.addr.store(addr, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.shared
            .store(s as *const LocalShared as usize, Ordering::Relaxed);
        self.lkey.store(s.lkey, Ordering::Relaxed);
    }
}

/// One socket's registrations. Created by [`RegistrationTable::new_owner`]
/// and stored by the socket; its lock is the only one the data path takes.
pub struct OwnerRegs {
    /// The socket. Immutable.
    owner: OwnerId,
    /// Identity of the table that created these regs. Immutable.
    table: u64,
    /// Lock order: after the table lock, never before.
    state: Mutex<OwnerState>,
    /// The hits (module docs), on their own line: written by the threads
    /// that start and complete this socket's ops.
    hits: sync::CachePadded<[Hit; HITS]>,
}

impl OwnerRegs {
    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// Whether association `s` is in use: by `Arc` `RegRef`s, or by holds
    /// through a hit naming it. The owner lock is held (`o`). Stops those
    /// hits and returns their indices in `stopped`: the caller starts them
    /// again ([`OwnerRegs::start_hits`]) once it changed what it meant to,
    /// so that no hold is taken on an association it is removing.
    fn in_use(
        &self,
        o: &OwnerState,
        s: &sync::Arc<LocalShared>,
        stopped: &mut [bool; HITS],
    ) -> bool {
        let mut held = 0;
        for (i, h) in o.hit.iter().enumerate() {
            if h.as_ref().is_some_and(|h| sync::Arc::ptr_eq(h, s)) {
                stopped[i] = true;
                held += self.hits[i].stop();
            }
        }
        held != 0 || o.op_refs(s) != 0
    }

    /// Starts the hits [`OwnerRegs::in_use`] stopped.
    fn start_hits(&self, stopped: &[bool; HITS]) {
        for (i, &s) in stopped.iter().enumerate() {
            if s {
                self.hits[i].start();
            }
        }
    }

    /// Forgets the hits naming association `s`, which is leaving `locals`:
    /// they were stopped by [`OwnerRegs::in_use`], which found no hold.
    fn drop_hits(&self, o: &mut OwnerState, s: &sync::Arc<LocalShared>) {
        for (i, h) in o.hit.iter_mut().enumerate() {
            if h.as_ref().is_some_and(|h| sync::Arc::ptr_eq(h, s)) {
                self.hits[i].clear();
                *h = None;
            }
        }
    }

    /// Remembers a lookup's answer in its direction's hit, for every buffer
    /// in `[addr, addr+len)` (exact: `OwnerState::hit`), unless holds are
    /// still taken through that hit (the lookup then goes on without it).
    fn remember(
        &self,
        o: &mut OwnerState,
        handle: u64,
        addr: usize,
        len: usize,
        need: MemFlags,
        s: &sync::Arc<LocalShared>,
    ) {
        let i = hit_index(need);
        let hit = &self.hits[i];
        // Holds taken through the hit: it cannot change (a hint, checked
        // again after the stop).
        if hit.held.load(Ordering::Relaxed) != 0 {
            return;
        }
        if hit.stop() == 0 {
            hit.set(handle, addr, len, need, s);
            o.hit[i] = Some(s.clone());
        }
        hit.start();
    }

    fn lock(&self) -> MutexGuard<'_, OwnerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for OwnerRegs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("OwnerRegs")
            .field("owner", &self.owner)
            .field("released", &s.released)
            .field("locals", &s.locals.len())
            .field("exposures", &s.exposures.len())
            .finish()
    }
}

/// A data operation's hold on a local registration: keeps the association
/// "in use" (it cannot be deregistered) and the NIC registration alive until
/// dropped. Taking or dropping one costs one atomic add: either on the
/// association's `Arc` count (`OwnerState::op_refs`), or, for a hold taken
/// through a hit, on the hit's `held` count (module docs, "The hit"). A
/// clone of an existing `RegRef` never makes an association in use behind
/// a deregistration's back, since the original already does.
pub struct RegRef(Held);

enum Held {
    /// A reference to the association.
    Shared(sync::Arc<LocalShared>),
    /// A hold counted in this hit's `held`: the hit names the association
    /// (and keeps it) until the hold is given back. Valid while the
    /// `OwnerRegs` of the hit lives ([`RegistrationTable::acquire_pinned`]'s
    /// contract).
    Hit(NonNull<Hit>),
}

// SAFETY: a `RegRef` shares only atomics (`Hit`) and immutable data
// (`LocalShared`) between threads, and the `Hit` it may point to outlives
// it (`acquire_pinned`'s contract), whichever thread drops it.
unsafe impl Send for RegRef {}
// SAFETY: as above; `&RegRef` reads only immutable data.
unsafe impl Sync for RegRef {}

impl RegRef {
    /// Drops two holds, given back with one subtraction if both were taken
    /// through the same hit, where a drop each would cost a locked
    /// instruction each (an op whose two buffers lie in one registration,
    /// such as a receive into a pool slot's head and tail): the count falls
    /// the same, and Release orders the op's uses of both before it.
    #[inline(always)]
    pub fn release_pair(a: RegRef, b: RegRef) {
        if let (Held::Hit(x), Held::Hit(y)) = (&a.0, &b.0) {
            if x == y {
                let hit = *x;
                std::mem::forget(a);
                std::mem::forget(b);
                // SAFETY: as in `shared`; both holds are counted in `held`
                // (their drops are forgotten).
                unsafe { hit.as_ref() }.held.fetch_sub(2, Ordering::Release);
            }
        }
    }

    /// The association's shared part.
    fn shared(&self) -> &LocalShared {
        match &self.0 {
            Held::Shared(s) => s,
            Held::Hit(hit) => {
                // SAFETY: the hit outlives the hold (`acquire_pinned`'s
                // contract), and names the association, whose `Arc` it
                // keeps in `OwnerState::hit`, while the hold is counted in
                // `held` (module docs, "The hit").
                unsafe {
                    let hit = hit.as_ref();
                    &*(hit.shared.load(Ordering::Relaxed) as *const LocalShared)
                }
            }
        }
    }

    /// The association's `Arc` of a hold taken under the owner lock.
    fn arc(&self) -> &sync::Arc<LocalShared> {
        match &self.0 {
            Held::Shared(s) => s,
            Held::Hit(_) => unreachable!("a hold taken under the lock is an Arc"),
        }
    }

    /// The local key for scatter/gather entries.
    #[inline]
    pub fn lkey(&self) -> u32 {
        match &self.0 {
            Held::Shared(s) => s.lkey,
            // SAFETY: as in `shared`; the hit's `lkey` is its
            // association's while the hold is counted.
            Held::Hit(hit) => unsafe { hit.as_ref() }.lkey.load(Ordering::Relaxed),
        }
    }

    /// Start of the registered range the op is covered by.
    pub fn addr(&self) -> usize {
        self.shared().addr
    }

    /// Length of the registered range.
    pub fn len(&self) -> usize {
        self.shared().len
    }

    /// Registrations are never empty; for clippy.
    pub fn is_empty(&self) -> bool {
        self.shared().len == 0
    }

    /// Flags of the registration.
    pub fn flags(&self) -> MemFlags {
        self.shared().flags
    }
}

impl Clone for RegRef {
    fn clone(&self) -> RegRef {
        match &self.0 {
            Held::Shared(s) => RegRef(Held::Shared(s.clone())),
            Held::Hit(hit) => {
                // SAFETY: as in `shared`. The hold being cloned keeps
                // `held` above 0, so the hit cannot change meanwhile.
                unsafe { hit.as_ref() }.held.fetch_add(1, Ordering::Relaxed);
                RegRef(Held::Hit(*hit))
            }
        }
    }
}

impl Drop for RegRef {
    fn drop(&mut self) {
        if let Held::Hit(hit) = &self.0 {
            // SAFETY: as in `shared`. Release: the op's use of the buffer
            // happens before a writer that sees the hold given back.
            unsafe { hit.as_ref() }.held.fetch_sub(1, Ordering::Release);
        }
    }
}

impl fmt::Debug for RegRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.shared();
        f.debug_struct("RegRef")
            .field("lkey", &s.lkey)
            .field("addr", &format_args!("{:#x}", s.addr))
            .field("len", &s.len)
            .field("flags", &s.flags)
            .field("through_hit", &matches!(self.0, Held::Hit(_)))
            .finish()
    }
}

/// The registration table of one provider (one NIC).
pub struct RegistrationTable {
    /// The NIC registrations are made on. Immutable.
    nic: Arc<dyn Nic>,
    /// Cache settings. Immutable.
    cache: MrCacheConfig,
    /// Identity stamped into every `OwnerRegs` this table creates.
    id: u64,
    /// The table lock; first in the lock order.
    state: Mutex<TableState>,
}

static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

fn register_error(e: FabricError) -> WsaError {
    match e {
        FabricError::NoResources(_) => WsaError::WSAENOBUFS,
        FabricError::Invalid(_) => WsaError::WSAEFAULT,
        FabricError::Unavailable(_) => WsaError::WSAENETDOWN,
        FabricError::Unsupported(_) => WsaError::WSAEOPNOTSUPP,
        FabricError::AddressNotAvailable | FabricError::AddressInUse => WsaError::WSAENOBUFS,
    }
}

fn bind_error(e: FabricError) -> WsaError {
    match e {
        FabricError::NoResources(_) => WsaError::WSAENOBUFS,
        FabricError::Unavailable(_) => WsaError::WSAENETDOWN,
        FabricError::Unsupported(_) => WsaError::WSAEOPNOTSUPP,
        FabricError::Invalid(_) | FabricError::AddressNotAvailable | FabricError::AddressInUse => {
            WsaError::WSAEINVAL
        }
    }
}

/// The checks every registration makes before taking a lock: non-null,
/// non-empty, not wrapping (`WSAEFAULT`). Whether the range is mapped is
/// checked by [`RegistrationTable::lock_mapped`].
fn validate_range(addr: usize, len: usize) -> WsaResult<()> {
    if addr == 0 || len == 0 || addr.checked_add(len).is_none() {
        return Err(WsaError::WSAEFAULT);
    }
    Ok(())
}

impl TableState {
    /// Joins the current entry of `key` (reviving it from the cache on a
    /// hit) or makes a new NIC registration; adds 1 to its total.
    ///
    /// # Safety
    /// As [`Nic::register`]: the range stays valid memory while registered.
    unsafe fn obtain(&mut self, nic: &Arc<dyn Nic>, key: EntryKey) -> WsaResult<EntryId> {
        if let Some(&id) = self.by_key.get(&key) {
            let e = self
                .entries
                .get_mut(&id)
                .expect("by_key names live entries");
            if let Some(slot) = e.cached.take() {
                self.lru.remove(&slot.stamp);
                self.cached_bytes -= key.len as u64;
                self.cache_hits += 1;
            }
            e.total += 1;
            return Ok(id);
        }
        // SAFETY: forwarded caller contract.
        let keys =
            unsafe { nic.register(key.addr, key.len, key.access) }.map_err(register_error)?;
        self.nic_registrations += 1;
        let id = self.next_entry;
        self.next_entry += 1;
        self.entries.insert(
            id,
            Entry {
                key,
                region: sync::Arc::new(NicRegion {
                    nic: nic.clone(),
                    lkey: keys.lkey,
                }),
                total: 1,
                doomed: false,
                cached: None,
            },
        );
        self.by_key.insert(key, id);
        Ok(id)
    }

    /// Drops `n` from the entry's total; at zero the entry goes to the
    /// cache (if `may_cache`, caching is on, it is not doomed and fits) or
    /// is released.
    fn put(&mut self, id: EntryId, n: u64, owner: OwnerId, may_cache: bool, cfg: &MrCacheConfig) {
        let e = self
            .entries
            .get_mut(&id)
            .expect("associations name live entries");
        debug_assert!(e.total >= n && e.cached.is_none());
        e.total -= n;
        if e.total > 0 {
            return;
        }
        let len = e.key.len as u64;
        let fits = cfg.max_entries > 0 && len <= cfg.max_bytes;
        if may_cache && cfg.enabled && !e.doomed && fits {
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            e.cached = Some(CacheSlot {
                stamp,
                last_owner: owner,
            });
            self.lru.insert(stamp, id);
            self.cached_bytes += len;
            while self.lru.len() > cfg.max_entries || self.cached_bytes > cfg.max_bytes {
                let (_, oldest) = self.lru.pop_first().expect("over a limit means non-empty");
                self.remove(oldest, false);
            }
        } else {
            self.remove(id, false);
        }
    }

    /// Removes an entry (dropping the table's reference to its NIC
    /// registration). `in_lru`: also unlink it from the LRU.
    fn remove(&mut self, id: EntryId, in_lru: bool) {
        let e = self.entries.remove(&id).expect("removing a live entry");
        if let Some(slot) = e.cached {
            if in_lru {
                self.lru.remove(&slot.stamp);
            }
            self.cached_bytes -= e.key.len as u64;
        }
        if self.by_key.get(&e.key) == Some(&id) {
            self.by_key.remove(&e.key);
        }
        // `e.region` drops here: the NIC deregistration happens now unless
        // a RegRef still holds it.
    }

    fn next_handle(&mut self) -> RegHandle {
        let h = self.next_handle;
        self.next_handle += 1;
        RegHandle::from_raw(h).expect("handles start at 1")
    }

    fn next_generation(&mut self) -> u32 {
        let g = self.next_generation;
        self.next_generation = match g.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        g
    }
}

impl RegistrationTable {
    pub fn new(nic: Arc<dyn Nic>, cache: MrCacheConfig) -> RegistrationTable {
        RegistrationTable {
            nic,
            cache,
            id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(TableState {
                by_key: HashMap::new(),
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                cached_bytes: 0,
                next_entry: 1,
                next_stamp: 1,
                next_handle: 1,
                next_generation: 1,
                cache_hits: 0,
                nic_registrations: 0,
                mapping_checks: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the table lock then the owner lock (the lock order), failing
    /// `WSAENOTSOCK` once the owner was released.
    fn lock_both<'a>(
        &'a self,
        regs: &'a OwnerRegs,
    ) -> WsaResult<(MutexGuard<'a, TableState>, MutexGuard<'a, OwnerState>)> {
        debug_assert_eq!(regs.table, self.id, "OwnerRegs of another table");
        let t = self.lock();
        let o = regs.lock();
        if o.released {
            return Err(WsaError::WSAENOTSOCK);
        }
        Ok((t, o))
    }

    /// Both locks ([`RegistrationTable::lock_both`]) for a registration of
    /// `key`, once its range is known to be mapped (else `WSAEFAULT`). An
    /// entry of `key`, live or cached, says so without a look: a live one
    /// is registered, and its registrant keeps the memory valid while it
    /// is (the SPI's contract); a cached one stays only as long as the
    /// program has not changed the range's mapping, which it must report
    /// through the cache callback (`WSPMemoryRegistrationCacheCallback`,
    /// the switch's `release_memory`) before it does: the same promise on
    /// which a hit revives the entry's NIC registration. Otherwise the
    /// pages are looked up (`mincore`, a system call) with no lock held.
    /// So registering a range again that the cache kept (a stream's
    /// exposure of the same send buffer, each large transfer) makes no
    /// system call.
    fn lock_mapped<'a>(
        &'a self,
        regs: &'a OwnerRegs,
        key: EntryKey,
    ) -> WsaResult<(MutexGuard<'a, TableState>, MutexGuard<'a, OwnerState>)> {
        {
            let (t, o) = self.lock_both(regs)?;
            if t.by_key.contains_key(&key) {
                return Ok((t, o));
            }
        }
        if !check_mapped(key.addr, key.len) {
            return Err(WsaError::WSAEFAULT);
        }
        let (mut t, o) = self.lock_both(regs)?;
        t.mapping_checks += 1;
        Ok((t, o))
    }

    /// A fresh, empty set of registrations for a socket.
    pub fn new_owner(&self, owner: OwnerId) -> Arc<OwnerRegs> {
        Arc::new(OwnerRegs {
            owner,
            table: self.id,
            state: Mutex::new(OwnerState {
                released: false,
                locals: BTreeMap::new(),
                exposures: Vec::new(),
                hit: Default::default(),
            }),
            hits: sync::CachePadded::new([Hit::new(), Hit::new()]),
        })
    }

    /// Whether registrations are cached (and the cache callback is
    /// meaningful).
    pub fn cache_enabled(&self) -> bool {
        self.cache.enabled
    }

    /// `WSPRegisterMemory`: bad flags → `WSAEINVAL`; null, empty, wrapping
    /// or unmapped range → `WSAEFAULT`; NIC out of resources → `WSAENOBUFS`;
    /// released owner → `WSAENOTSOCK`. The same buffer with the same flags
    /// on the same owner returns the same handle and counts once more.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay valid memory while registered (the
    /// SPI's contract); the NIC reads and writes it on behalf of ops.
    pub unsafe fn register_memory(
        &self,
        regs: &OwnerRegs,
        addr: usize,
        len: usize,
        flags: u32,
    ) -> WsaResult<RegHandle> {
        let flags = MemFlags::from_raw(flags)?;
        validate_range(addr, len)?;
        let key = EntryKey {
            addr,
            len,
            access: flags.local_access(),
        };
        let (mut t, mut o) = self.lock_mapped(regs, key)?;
        if let Some(&id) = t.by_key.get(&key) {
            let found = o
                .locals
                .iter_mut()
                .find(|(_, a)| a.entry == id && a.shared.flags == flags);
            if let Some((&h, a)) = found {
                a.count += 1;
                t.entries.get_mut(&id).expect("live entry").total += 1;
                return Ok(RegHandle::from_raw(h).expect("stored handles are non-zero"));
            }
        }
        // SAFETY: forwarded caller contract.
        let id = unsafe { t.obtain(&self.nic, key)? };
        let region = t.entries[&id].region.clone();
        let handle = t.next_handle();
        o.locals.insert(
            handle.get(),
            LocalAssoc {
                entry: id,
                count: 1,
                shared: sync::Arc::new(LocalShared {
                    lkey: region.lkey,
                    addr,
                    len,
                    flags,
                    _region: region,
                }),
            },
        );
        Ok(handle)
    }

    /// `WSPDeregisterMemory`: unknown, foreign or 0 handle → `WSAEINVAL`;
    /// association in use by a transfer → `WSAEINVAL` (nothing changes).
    pub fn deregister_memory(&self, regs: &OwnerRegs, handle: u64) -> WsaResult<()> {
        let (mut t, mut o) = self.lock_both(regs)?;
        let a = o.locals.get(&handle).ok_or(WsaError::WSAEINVAL)?;
        let mut stopped = [false; HITS];
        if regs.in_use(&o, &a.shared, &mut stopped) {
            regs.start_hits(&stopped);
            return Err(WsaError::WSAEINVAL);
        }
        let a = o.locals.get_mut(&handle).ok_or(WsaError::WSAEINVAL)?;
        let entry = a.entry;
        a.count -= 1;
        if a.count == 0 {
            if let Some(gone) = o.locals.remove(&handle) {
                regs.drop_hits(&mut o, &gone.shared);
            }
        }
        regs.start_hits(&stopped);
        t.put(entry, 1, regs.owner, true, &self.cache);
        Ok(())
    }

    /// `WSPRegisterRdmaMemory`: exposes `[addr, addr+len)` to the peer of
    /// `qp` and returns its descriptor. Errors as
    /// [`RegistrationTable::register_memory`]; a failed remote-key bind maps
    /// `NoResources` → `WSAENOBUFS`, otherwise `WSAEINVAL`. The same buffer
    /// and flags on the same owner and queue pair return the same
    /// descriptor and count once more.
    ///
    /// # Safety
    /// As [`RegistrationTable::register_memory`]; in addition the peer may
    /// read or write the range while it is exposed.
    pub unsafe fn register_rdma_memory(
        &self,
        regs: &OwnerRegs,
        qp: QpNum,
        addr: usize,
        len: usize,
        flags: u32,
    ) -> WsaResult<Descriptor> {
        let flags = MemFlags::from_raw(flags)?;
        validate_range(addr, len)?;
        let key = EntryKey {
            addr,
            len,
            access: flags.exposure_access(),
        };
        let (mut t, mut o) = self.lock_mapped(regs, key)?;
        if let Some(&id) = t.by_key.get(&key) {
            if let Some(x) = o.exposures.iter_mut().find(|x| x.entry == id && x.qp == qp) {
                debug_assert_eq!(x.flags, flags);
                x.count += 1;
                t.entries.get_mut(&id).expect("live entry").total += 1;
                return Ok(x.descriptor());
            }
        }
        // SAFETY: forwarded caller contract.
        let id = unsafe { t.obtain(&self.nic, key)? };
        let lkey = t.entries[&id].region.lkey;
        let remote = flags.remote_access();
        let rkey = match self.nic.bind_remote(lkey, qp, remote) {
            Ok(rkey) => rkey,
            Err(e) => {
                t.put(id, 1, regs.owner, true, &self.cache);
                return Err(bind_error(e));
            }
        };
        let generation = t.next_generation();
        let x = Exposure {
            entry: id,
            qp,
            flags,
            rkey,
            generation,
            addr,
            len,
            count: 1,
        };
        let d = x.descriptor();
        o.exposures.push(x);
        Ok(d)
    }

    /// `WSPDeregisterRdmaMemory`: the descriptor must be one this owner got
    /// and still holds (remote key, generation, range) → else `WSAEINVAL`;
    /// decode errors as [`Descriptor::decode`]. The exposed memory in use by
    /// a pending op of this owner (a local association overlapping it that
    /// an op holds) → `WSAEINVAL`, nothing changes (spec §3.1, §7-13): the
    /// peer's one-sided RDMA is invisible here, the owner's own ops are not.
    /// When the exposure's count reaches zero its remote key is unbound
    /// (MEM-6), whether or not the entry stays cached.
    pub fn deregister_rdma_memory(&self, regs: &OwnerRegs, descriptor: &[u8]) -> WsaResult<()> {
        let d = Descriptor::decode(descriptor)?;
        let (mut t, mut o) = self.lock_both(regs)?;
        let i = o
            .exposures
            .iter()
            .position(|x| x.descriptor() == d)
            .ok_or(WsaError::WSAEINVAL)?;
        let (start, end) = (
            o.exposures[i].addr,
            o.exposures[i].addr + o.exposures[i].len,
        );
        // Under the owner lock no op starts holding an association but
        // through a hit, which `in_use` stops.
        let mut stopped = [false; HITS];
        let busy = o.locals.values().any(|a| {
            let s = &a.shared;
            s.addr < end && start < s.addr + s.len && regs.in_use(&o, s, &mut stopped)
        });
        regs.start_hits(&stopped);
        if busy {
            return Err(WsaError::WSAEINVAL);
        }
        let x = &mut o.exposures[i];
        let entry = x.entry;
        x.count -= 1;
        if x.count == 0 {
            self.nic.unbind_remote(x.rkey);
            o.exposures.swap_remove(i);
        }
        t.put(entry, 1, regs.owner, true, &self.cache);
        Ok(())
    }

    /// The data-path lookup for a plain `WSABUF` (spec §7-2): a local
    /// association of this owner whose range contains `[addr, addr+len)` and
    /// whose flags include `need` (first in registration order); none →
    /// `WSAEFAULT`. Takes only the owner lock; allocates nothing.
    pub fn acquire_covering(
        &self,
        regs: &OwnerRegs,
        addr: usize,
        len: usize,
        need: MemFlags,
    ) -> WsaResult<RegRef> {
        debug_assert_eq!(regs.table, self.id, "OwnerRegs of another table");
        let end = addr.checked_add(len).ok_or(WsaError::WSAEFAULT)?;
        let mut o = regs.lock();
        if o.released {
            return Err(WsaError::WSAENOTSOCK);
        }
        let (&h, found) = o
            .locals
            .iter()
            .find(|(_, a)| {
                let s = &a.shared;
                s.flags.contains(need) && s.addr <= addr && end <= s.addr + s.len
            })
            .ok_or(WsaError::WSAEFAULT)?;
        let found = &found.shared;
        let (lo, span) = (found.addr, found.len);
        let r = take_ref(found);
        // The whole association is the answer for every buffer inside it
        // unless an earlier match meets it (`OwnerState::hit`).
        let alone = !o.locals.range(..h).any(|(_, a)| {
            let s = &a.shared;
            s.flags.contains(need) && s.addr <= lo + span && lo <= s.addr + s.len
        });
        let (at, n) = if alone { (lo, span) } else { (addr, len) };
        regs.remember(&mut o, 0, at, n, need, r.arc());
        Ok(r)
    }

    /// The SPI's lookup: [`RegistrationTable::acquire_covering`] for
    /// `handle` 0, else [`RegistrationTable::acquire_handle`], answered
    /// without the owner lock when its handle and flags are those of the
    /// last query of its direction and its buffer lies in the hit's range
    /// (module docs, "The hit").
    ///
    /// # Safety
    /// The returned [`RegRef`] must be dropped before `regs` is: a hold
    /// taken through a hit points into it.
    #[inline]
    pub unsafe fn acquire_pinned(
        &self,
        regs: &OwnerRegs,
        handle: u64,
        addr: usize,
        len: usize,
        need: MemFlags,
    ) -> WsaResult<RegRef> {
        if let Some(r) = regs.hits[hit_index(need)].get(handle, addr, len, need) {
            return Ok(r);
        }
        match handle {
            0 => self.acquire_covering(regs, addr, len, need),
            h => self.acquire_handle(regs, h, addr, len, need),
        }
    }

    /// The data-path lookup for a `WSABUFEX`: `handle` must be a local
    /// registration of this owner (else `WSAEINVAL`) that contains
    /// `[addr, addr+len)` and allows `need` (else `WSAEFAULT`). Takes only
    /// the owner lock; allocates nothing.
    pub fn acquire_handle(
        &self,
        regs: &OwnerRegs,
        handle: u64,
        addr: usize,
        len: usize,
        need: MemFlags,
    ) -> WsaResult<RegRef> {
        debug_assert_eq!(regs.table, self.id, "OwnerRegs of another table");
        let mut o = regs.lock();
        if o.released {
            return Err(WsaError::WSAENOTSOCK);
        }
        let s = &o.locals.get(&handle).ok_or(WsaError::WSAEINVAL)?.shared;
        let fits = addr
            .checked_add(len)
            .is_some_and(|end| s.addr <= addr && end <= s.addr + s.len);
        if !fits || !s.flags.contains(need) {
            return Err(WsaError::WSAEFAULT);
        }
        // Any buffer inside the handle's association gets it.
        let (at, n) = (s.addr, s.len);
        let r = take_ref(s);
        regs.remember(&mut o, handle, at, n, need, r.arc());
        Ok(r)
    }

    /// Socket close, once its ops were quiesced: drops every association of
    /// the owner (unbinding remote keys), releases entries whose total drops
    /// to zero, then releases the cached entries this owner released last
    /// (CACHE-3). Idempotent; afterwards every call with `regs` fails
    /// `WSAENOTSOCK`. An association still in use (a `RegRef` outlived the
    /// quiesce) is dropped all the same; its NIC registration then lives on
    /// until the last `RegRef` is dropped, or, held through a hit, until
    /// `regs` is dropped (with its socket, after the socket's last op).
    pub fn release_owner(&self, regs: &OwnerRegs) {
        let Ok((mut t, mut o)) = self.lock_both(regs) else {
            return;
        };
        o.released = true;
        let owner = regs.owner;
        for x in std::mem::take(&mut o.exposures) {
            self.nic.unbind_remote(x.rkey);
            t.put(x.entry, x.count, owner, false, &self.cache);
        }
        // Holds still taken through a hit keep its association (and so
        // the NIC registration) until they are given back: the hit's `Arc`
        // stays, and goes with `regs`.
        for (i, hit) in regs.hits.iter().enumerate() {
            if hit.stop() == 0 {
                o.hit[i] = None;
            }
            hit.clear();
            hit.start();
        }
        for (_, a) in std::mem::take(&mut o.locals) {
            t.put(a.entry, a.count, owner, false, &self.cache);
        }
        let mine: Vec<EntryId> = t
            .lru
            .values()
            .copied()
            .filter(|id| t.entries[id].cached.is_some_and(|c| c.last_owner == owner))
            .collect();
        for id in mine {
            t.remove(id, true);
        }
    }

    /// `WSPMemoryRegistrationCacheCallback`: releases every cached entry
    /// overlapping `[addr, addr+size)` from the NIC and the cache; live
    /// overlapping entries are doomed (released, not cached, at count zero;
    /// new registrations of their key start afresh). `WSAEINVAL` if no
    /// cached entry overlapped (an empty range overlaps nothing).
    pub fn cache_callback(&self, addr: usize, size: usize) -> WsaResult<()> {
        if size == 0 {
            return Err(WsaError::WSAEINVAL);
        }
        let end = addr.saturating_add(size);
        let mut t = self.lock();
        let hits: Vec<EntryId> = t
            .entries
            .iter()
            .filter(|(_, e)| e.key.addr < end && addr < e.key.end())
            .map(|(&id, _)| id)
            .collect();
        let mut dropped = false;
        for id in hits {
            let e = t.entries.get_mut(&id).expect("collected above");
            if e.cached.is_some() {
                t.remove(id, true);
                dropped = true;
            } else if !e.doomed {
                e.doomed = true;
                let key = e.key;
                if t.by_key.get(&key) == Some(&id) {
                    t.by_key.remove(&key);
                }
            }
        }
        if dropped {
            Ok(())
        } else {
            Err(WsaError::WSAEINVAL)
        }
    }

    pub fn stats(&self) -> TableStats {
        let t = self.lock();
        TableStats {
            live_entries: t.entries.len() - t.lru.len(),
            cached_entries: t.lru.len(),
            cached_bytes: t.cached_bytes,
            cache_hits: t.cache_hits,
            nic_registrations: t.nic_registrations,
            mapping_checks: t.mapping_checks,
            registered_bytes: t
                .entries
                .values()
                .filter(|e| e.cached.is_none())
                .map(|e| e.key.len as u64)
                .sum(),
        }
    }
}

/// Marks the association in use and hands out a reference to it. Called
/// with the owner lock held (see `OwnerState::op_refs`).
fn take_ref(s: &sync::Arc<LocalShared>) -> RegRef {
    #[cfg(feature = "perf-gate-slowdown")]
    crate::perf_gate_slowdown::burn();
    RegRef(Held::Shared(s.clone()))
}

impl fmt::Debug for RegistrationTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationTable")
            .field("cache", &self.cache)
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MlockPolicy;
    use crate::fabric::{
        CompletionQueue, ConnectAttempt, ConnectDone, ConnectError, Listener, ListenerEvents,
        MrKeys, NicStats, QpParams, Waker,
    };
    use crate::mem::region::Region;
    use std::net::{Ipv4Addr, SocketAddrV4};

    /// A test-only NIC: records registrations and remote keys, hands out
    /// keys (freed remote keys are reused, newest first, so stale
    /// descriptors meet a reused key), and panics on misuse the real NIC
    /// would tolerate but the table must never commit: deregistering an
    /// unknown key, or a region that still has remote keys bound.
    #[derive(Default)]
    struct FakeNic {
        s: Mutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        next_lkey: u32,
        next_rkey: u32,
        /// lkey → (addr, len, access)
        regions: HashMap<u32, (usize, usize, Access)>,
        /// rkey → (lkey, qp, access)
        rkeys: HashMap<u32, (u32, QpNum, Access)>,
        free_rkeys: Vec<u32>,
        registrations: u64,
        fail_register: Option<FabricError>,
        fail_bind: Option<FabricError>,
    }

    impl FakeNic {
        fn st(&self) -> MutexGuard<'_, FakeState> {
            self.s.lock().unwrap()
        }
        fn region(&self, lkey: u32) -> Option<(usize, usize, Access)> {
            self.st().regions.get(&lkey).copied()
        }
        fn rkey(&self, rkey: u32) -> Option<(u32, QpNum, Access)> {
            self.st().rkeys.get(&rkey).copied()
        }
    }

    impl Nic for FakeNic {
        fn addresses(&self) -> Vec<Ipv4Addr> {
            Vec::new()
        }
        fn create_cq(
            &self,
            _: u32,
            _: Arc<dyn Waker>,
        ) -> Result<Arc<dyn CompletionQueue>, FabricError> {
            Err(FabricError::Unavailable("fake".into()))
        }
        unsafe fn register(
            &self,
            addr: usize,
            len: usize,
            access: Access,
        ) -> Result<MrKeys, FabricError> {
            let mut s = self.st();
            if let Some(e) = s.fail_register.clone() {
                return Err(e);
            }
            s.next_lkey += 1;
            let lkey = s.next_lkey;
            s.regions.insert(lkey, (addr, len, access));
            s.registrations += 1;
            Ok(MrKeys { lkey })
        }
        fn deregister(&self, lkey: u32) {
            let mut s = self.st();
            assert!(s.regions.remove(&lkey).is_some(), "unknown lkey {lkey}");
            assert!(
                s.rkeys.values().all(|&(l, _, _)| l != lkey),
                "region deregistered with remote keys still bound"
            );
        }
        fn bind_remote(&self, lkey: u32, qp: QpNum, access: Access) -> Result<u32, FabricError> {
            let mut s = self.st();
            if let Some(e) = s.fail_bind.clone() {
                return Err(e);
            }
            let (_, _, allowed) = *s.regions.get(&lkey).ok_or(FabricError::Invalid("lkey"))?;
            if !allowed.contains(access) || access.contains(Access::LOCAL_WRITE) {
                return Err(FabricError::Invalid("access"));
            }
            let rkey = match s.free_rkeys.pop() {
                Some(k) => k,
                None => {
                    s.next_rkey += 1;
                    0x1000 + s.next_rkey
                }
            };
            s.rkeys.insert(rkey, (lkey, qp, access));
            Ok(rkey)
        }
        fn unbind_remote(&self, rkey: u32) {
            let mut s = self.st();
            if s.rkeys.remove(&rkey).is_some() {
                s.free_rkeys.push(rkey);
            }
        }
        fn listen(
            &self,
            _: SocketAddrV4,
            _: u32,
            _: Arc<dyn ListenerEvents>,
        ) -> Result<Arc<dyn Listener>, FabricError> {
            Err(FabricError::Unavailable("fake".into()))
        }
        fn connect(
            &self,
            _: SocketAddrV4,
            _: SocketAddrV4,
            _: QpParams,
            _: ConnectDone,
        ) -> Result<Arc<dyn ConnectAttempt>, ConnectError> {
            Err(ConnectError::NoResources)
        }
        fn stats(&self) -> NicStats {
            let s = self.st();
            NicStats {
                registrations: s.registrations,
                live_regions: s.regions.len() as u64,
                live_remote_keys: s.rkeys.len() as u64,
                live_qps: 0,
            }
        }
    }

    /// Needs no right: matches any registration covering the range.
    const ANY: MemFlags = MemFlags(0);
    const QP: QpNum = QpNum(7);
    const R: u32 = 1;
    const W: u32 = 2;
    const RW: u32 = 3;

    fn cache_cfg(enabled: bool) -> MrCacheConfig {
        MrCacheConfig {
            enabled,
            max_entries: 16,
            max_bytes: 1 << 20,
        }
    }

    struct Fx {
        nic: Arc<FakeNic>,
        t: RegistrationTable,
        mem: Region,
    }

    impl Fx {
        fn new(cache: MrCacheConfig) -> Fx {
            let nic = Arc::new(FakeNic::default());
            let t = RegistrationTable::new(nic.clone(), cache);
            let mem = Region::new(16 * 4096, MlockPolicy::Off).unwrap();
            Fx { nic, t, mem }
        }
        fn at(&self, off: usize) -> usize {
            self.mem.addr() + off
        }
        fn reg(&self, o: &OwnerRegs, off: usize, len: usize, flags: u32) -> WsaResult<u64> {
            // SAFETY: `mem` outlives every registration: the owners are
            // test locals dropped before the fixture, and within `Fx` the
            // table drops before `mem` (declaration order).
            unsafe { self.t.register_memory(o, self.at(off), len, flags) }.map(RegHandle::get)
        }
        fn expose(
            &self,
            o: &OwnerRegs,
            qp: QpNum,
            off: usize,
            len: usize,
            flags: u32,
        ) -> WsaResult<Descriptor> {
            // SAFETY: as `reg`.
            unsafe { self.t.register_rdma_memory(o, qp, self.at(off), len, flags) }
        }
        fn live(&self) -> u64 {
            self.nic.stats().live_regions
        }
        fn rkeys(&self) -> u64 {
            self.nic.stats().live_remote_keys
        }
        fn nic_regs(&self) -> u64 {
            self.nic.stats().registrations
        }
    }

    use WsaError::*;

    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RegRef>();
        check::<OwnerRegs>();
        check::<RegistrationTable>();
        check::<Region>();
    }

    #[test]
    fn flags_validate() {
        for raw in [1, 2, 3] {
            assert_eq!(MemFlags::from_raw(raw).unwrap().bits(), raw);
        }
        for raw in [0, 4, 7, 0x100, u32::MAX] {
            assert_eq!(MemFlags::from_raw(raw), Err(WSAEINVAL));
        }
        assert!(MemFlags::READWRITE.contains(MemFlags::WRITE));
        assert!(!MemFlags::READ.contains(MemFlags::WRITE));
        assert_eq!(RegHandle::from_raw(0), None);
        assert_eq!(RegHandle::from_raw(5).unwrap().get(), 5);
    }

    #[test]
    fn mem_1_bad_flags_and_bad_ranges() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        for bad in [0, 4, 7, 0x100] {
            assert_eq!(f.reg(&o, 0, 4096, bad), Err(WSAEINVAL));
            assert_eq!(f.expose(&o, QP, 0, 4096, bad).unwrap_err(), WSAEINVAL);
        }
        // SAFETY: these calls fail validation before touching memory.
        unsafe {
            for (addr, len) in [
                (0, 4096),                     // NULL
                (f.at(0), 0),                  // empty
                (4096, 4096),                  // never mapped
                (0xffff_f000_0000_0000, 4096), // kernel half
                (usize::MAX - 10, 100),        // wraps
            ] {
                assert_eq!(
                    f.t.register_memory(&o, addr, len, R),
                    Err(WSAEFAULT),
                    "{addr:#x}+{len}"
                );
                assert_eq!(
                    f.t.register_rdma_memory(&o, QP, addr, len, W).unwrap_err(),
                    WSAEFAULT
                );
            }
        }
        assert_eq!(f.nic_regs(), 0, "nothing reached the NIC");
        f.nic.st().fail_register = Some(FabricError::NoResources("mr"));
        assert_eq!(f.reg(&o, 0, 4096, R), Err(WSAENOBUFS));
        f.nic.st().fail_register = Some(FabricError::Invalid("range"));
        assert_eq!(f.reg(&o, 0, 4096, R), Err(WSAEFAULT));
        assert_eq!(f.expose(&o, QP, 0, 4096, R).unwrap_err(), WSAEFAULT);
        f.nic.st().fail_register = None;
        let h = f.reg(&o, 0, 4096, R).unwrap();
        assert_ne!(h, 0);
        assert_eq!(f.t.stats().live_entries, 1);
    }

    #[test]
    fn local_access_rights_follow_the_flags() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        f.reg(&o, 0, 100, R).unwrap();
        f.reg(&o, 4096, 100, W).unwrap();
        f.reg(&o, 8192, 100, RW).unwrap();
        let acc = |off: usize| {
            let r = f.t.acquire_covering(&o, f.at(off), 1, ANY).unwrap();
            f.nic.region(r.lkey()).unwrap().2
        };
        assert_eq!(acc(0), Access::NONE);
        assert_eq!(acc(4096), Access::LOCAL_WRITE);
        assert_eq!(acc(8192), Access::LOCAL_WRITE);
    }

    #[test]
    fn same_buffer_same_owner_same_handle_counts_twice() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        let h1 = f.reg(&o, 0, 4096, RW).unwrap();
        let h2 = f.reg(&o, 0, 4096, RW).unwrap();
        assert_eq!(h1, h2);
        // Other flags with the same NIC rights: a separate association
        // (own handle), same NIC registration.
        let hw = f.reg(&o, 0, 4096, W).unwrap();
        assert_ne!(hw, h1);
        // Other NIC rights: a separate entry.
        let hr = f.reg(&o, 0, 4096, R).unwrap();
        assert_ne!(hr, h1);
        assert_eq!(f.live(), 2);
        f.t.deregister_memory(&o, h1).unwrap();
        assert_eq!(f.live(), 2, "count 2 → 1");
        f.t.deregister_memory(&o, h1).unwrap();
        assert_eq!(f.t.deregister_memory(&o, h1), Err(WSAEINVAL));
        f.t.deregister_memory(&o, hw).unwrap();
        assert_eq!(f.live(), 1);
        f.t.deregister_memory(&o, hr).unwrap();
        assert_eq!(f.live(), 0);
        // Handles are never reused.
        let h3 = f.reg(&o, 0, 4096, RW).unwrap();
        assert!(![h1, hw, hr].contains(&h3));
        assert_eq!(f.t.deregister_memory(&o, 0), Err(WSAEINVAL));
        assert_eq!(f.t.deregister_memory(&o, 0xDEAD), Err(WSAEINVAL));
    }

    #[test]
    fn mem_2_two_owners_share_and_the_last_deregistration_frees() {
        let f = Fx::new(cache_cfg(false));
        let (a, b) = (f.t.new_owner(OwnerId(1)), f.t.new_owner(OwnerId(2)));
        let ha = f.reg(&a, 0, 4096, RW).unwrap();
        let hb = f.reg(&b, 0, 4096, RW).unwrap();
        assert_ne!(ha, hb, "handles are per owner");
        assert_eq!(f.live(), 1, "one NIC registration shared");
        assert_eq!(
            f.t.deregister_memory(&a, hb),
            Err(WSAEINVAL),
            "foreign handle"
        );
        assert_eq!(
            f.t.acquire_handle(&a, hb, f.at(0), 1, MemFlags::READ)
                .unwrap_err(),
            WSAEINVAL
        );
        f.t.deregister_memory(&b, hb).unwrap();
        assert_eq!(f.live(), 1);
        let r =
            f.t.acquire_covering(&a, f.at(0), 128, MemFlags::READ)
                .unwrap();
        assert!(f.nic.region(r.lkey()).is_some());
        assert_eq!(
            f.t.acquire_covering(&b, f.at(0), 128, MemFlags::READ)
                .unwrap_err(),
            WSAEFAULT,
            "no longer registered on b"
        );
        drop(r);
        f.t.deregister_memory(&a, ha).unwrap();
        assert_eq!(f.live(), 0);
        assert_eq!(
            f.t.stats(),
            TableStats {
                nic_registrations: 1,
                mapping_checks: 1,
                ..TableStats::default()
            }
        );
    }

    #[test]
    fn mem_3_deregistering_while_in_use_is_einval_and_changes_nothing() {
        let f = Fx::new(cache_cfg(false));
        let (a, b) = (f.t.new_owner(OwnerId(1)), f.t.new_owner(OwnerId(2)));
        let ha = f.reg(&a, 0, 8192, RW).unwrap();
        let hb = f.reg(&b, 0, 8192, RW).unwrap();
        let r1 =
            f.t.acquire_covering(&a, f.at(100), 50, MemFlags::WRITE)
                .unwrap();
        let r2 =
            f.t.acquire_handle(&a, ha, f.at(4096), 4096, MemFlags::READ)
                .unwrap();
        let r3 = r2.clone();
        assert_eq!(
            (r3.addr(), r3.len(), r3.flags()),
            (f.at(0), 8192, MemFlags::READWRITE)
        );
        assert_eq!(f.t.deregister_memory(&a, ha), Err(WSAEINVAL));
        // Per association: b's registration of the same buffer is free.
        f.t.deregister_memory(&b, hb).unwrap();
        drop(r1);
        drop(r2);
        assert_eq!(
            f.t.deregister_memory(&a, ha),
            Err(WSAEINVAL),
            "a clone still holds it"
        );
        drop(r3);
        assert_eq!(f.live(), 1, "the failed attempts changed nothing");
        f.t.deregister_memory(&a, ha).unwrap();
        assert_eq!(f.live(), 0);
        assert_eq!(f.t.deregister_memory(&a, ha), Err(WSAEINVAL), "unknown now");
    }

    #[test]
    fn last_hit_is_dropped_with_its_registration_and_keeps_the_first_match() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        let h1 = f.reg(&o, 0, 8192, RW).unwrap();
        let get = || f.t.acquire_covering(&o, f.at(64), 64, MemFlags::READ);
        assert_eq!(get().unwrap().len(), 8192);
        // A later registration covering the same buffer comes after the
        // cached one in registration order: the cached answer stays right.
        let h2 = f.reg(&o, 0, 4096, R).unwrap();
        assert_eq!(get().unwrap().len(), 8192, "still the first match");
        f.t.deregister_memory(&o, h1).unwrap();
        assert_eq!(get().unwrap().len(), 4096, "the cached one is gone");
        f.t.deregister_memory(&o, h2).unwrap();
        assert_eq!(get().unwrap_err(), WSAEFAULT, "nothing covers it");
        assert_eq!(f.live(), 0, "the cache keeps no registration alive");
        let h3 = f.reg(&o, 0, 4096, R).unwrap();
        assert!(get().is_ok());
        f.t.release_owner(&o);
        assert_eq!(get().unwrap_err(), WSAENOTSOCK);
        assert_eq!(f.t.deregister_memory(&o, h3), Err(WSAENOTSOCK));
        assert_eq!(f.live(), 0);
    }

    #[test]
    fn mem_3_a_hold_through_the_hit_blocks_deregistration_until_dropped() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        let h = f.reg(&o, 0, 8192, RW).unwrap();
        // SAFETY: every RegRef of this test is dropped before `o`.
        let get = || unsafe { f.t.acquire_pinned(&o, 0, f.at(64), 64, MemFlags::WRITE) };
        let first = get().unwrap();
        assert!(
            matches!(first.0, Held::Shared(_)),
            "a first lookup takes the lock"
        );
        let key = first.lkey();
        drop(first);
        let op = get().unwrap();
        assert!(
            matches!(op.0, Held::Hit(_)),
            "a repeat goes through the hit"
        );
        assert_eq!(op.lkey(), key, "the hit's key is its association's");
        assert_eq!((op.len(), op.flags()), (8192, MemFlags::READWRITE));
        // SAFETY: as for `get`.
        let other = unsafe { f.t.acquire_pinned(&o, h, f.at(128), 64, MemFlags::WRITE) };
        assert!(
            matches!(other.unwrap().0, Held::Shared(_)),
            "another query takes the lock, and a held hit stays"
        );
        let again = op.clone();
        drop(op);
        assert_eq!(
            f.t.deregister_memory(&o, h),
            Err(WSAEINVAL),
            "in use through the hit"
        );
        assert!(f.nic.region(again.lkey()).is_some());
        drop(again);
        f.t.deregister_memory(&o, h).unwrap();
        assert_eq!(
            get().unwrap_err(),
            WSAEFAULT,
            "the hit went with its registration"
        );
        assert_eq!(f.live(), 0);
        // A handle's lookup goes through its direction's hit too.
        let h2 = f.reg(&o, 0, 4096, R).unwrap();
        // SAFETY: as for `get`.
        let by_handle = |h| unsafe { f.t.acquire_pinned(&o, h, f.at(0), 8, MemFlags::READ) };
        let key2 = by_handle(h2).unwrap().lkey();
        assert_ne!(key2, key, "another registration, another key");
        let held = by_handle(h2).unwrap();
        assert!(matches!(held.0, Held::Hit(_)));
        assert_eq!(held.lkey(), key2, "the hit's key moved with it");
        assert_eq!(by_handle(h2 + 1).unwrap_err(), WSAEINVAL, "another handle");
        f.t.release_owner(&o);
        assert_eq!(by_handle(h2).unwrap_err(), WSAENOTSOCK, "released: no hit");
        assert_eq!(f.live(), 1, "the hold keeps the NIC registration");
        drop(held);
        drop(o);
        assert_eq!(f.live(), 0, "released with the owner's registrations");
    }

    /// Two holds an op took through one hit go back with one subtraction
    /// ([`RegRef::release_pair`]): the registration is in use until then
    /// and free after. A pair that is not (a hold taken under the lock and
    /// one through the hit) goes back hold by hold, just as fully.
    #[test]
    fn mem_3_a_pair_of_holds_through_one_hit_goes_back_together() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        let h = f.reg(&o, 0, 8192, RW).unwrap();
        // SAFETY: every RegRef of this test is dropped before `o`.
        let get = |at| unsafe { f.t.acquire_pinned(&o, 0, f.at(at), 64, MemFlags::WRITE) };
        let held = |r: &RegRef| match &r.0 {
            // SAFETY: the hold keeps the hit (the owner lives).
            Held::Hit(hit) => unsafe { hit.as_ref() }.held.load(Ordering::SeqCst),
            Held::Shared(_) => panic!("a hold taken under the lock"),
        };
        let locked = get(0).unwrap();
        let (head, tail) = (get(64).unwrap(), get(4096).unwrap());
        assert_eq!(held(&head), 2, "head and tail through the hit");
        RegRef::release_pair(locked, head);
        assert_eq!(held(&tail), 1, "a mixed pair drops its hit hold");
        let again = get(128).unwrap();
        assert_eq!(held(&again), 2);
        RegRef::release_pair(tail, again);
        assert_eq!(
            get(0).map(|r| held(&r)),
            Ok(1),
            "both given back: only this lookup's hold is counted"
        );
        f.t.deregister_memory(&o, h).unwrap();
        assert_eq!(f.live(), 0);
    }

    #[test]
    fn mem_3_a_buffer_inside_the_hit_s_association_skips_the_lock() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        let h = f.reg(&o, 4096, 8192, R).unwrap();
        // SAFETY: every RegRef of this test is dropped before `o`.
        let get =
            |h, off, len| unsafe { f.t.acquire_pinned(&o, h, f.at(off), len, MemFlags::READ) };
        for h in [0, h] {
            let first = get(h, 4096, 64).unwrap();
            assert!(
                matches!(first.0, Held::Shared(_)),
                "a first lookup takes the lock"
            );
            let key = first.lkey();
            // Other slots of the registered pool, its whole range, and an
            // empty buffer at its end: answered without the lock.
            for (off, len) in [(4096 + 512, 1024), (4096, 8192), (12288 - 8, 8), (12288, 0)] {
                let r = get(h, off, len).unwrap();
                assert!(matches!(r.0, Held::Hit(_)), "inside [{off}, +{len}) hits");
                assert_eq!(r.lkey(), key, "the association's key");
            }
            // Crossing an end, or wrapping: the lock, which refuses them.
            for (off, len) in [(12288 - 8, 16), (4096 - 1, 2)] {
                assert_eq!(get(h, off, len).unwrap_err(), WSAEFAULT, "[{off}, +{len})");
            }
            // SAFETY: as for `get`.
            let wraps = unsafe {
                f.t.acquire_pinned(&o, h, f.at(4096), usize::MAX, MemFlags::READ)
            };
            assert_eq!(wraps.unwrap_err(), WSAEFAULT);
            // Another direction's hit: a write query does not see this one.
            // SAFETY: as for `get`.
            let w = unsafe { f.t.acquire_pinned(&o, h, f.at(4096), 64, MemFlags::WRITE) };
            assert_eq!(w.unwrap_err(), WSAEFAULT, "a read-only registration");
        }
        f.t.deregister_memory(&o, h).unwrap();
        assert_eq!(
            get(0, 4096 + 512, 64).unwrap_err(),
            WSAEFAULT,
            "gone with it"
        );
        assert_eq!(f.live(), 0);
    }

    #[test]
    fn mem_3_a_covering_query_inside_an_earlier_smaller_association_gets_its_key() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        // SAFETY: every RegRef of this test is dropped before `o`.
        let get = |off, len| unsafe { f.t.acquire_pinned(&o, 0, f.at(off), len, MemFlags::READ) };
        let small = f.reg(&o, 4096, 512, R).unwrap();
        let pool = f.reg(&o, 0, 16384, RW).unwrap();
        let small_key = get(4096, 64).unwrap().lkey();
        let pool_key = get(0, 64).unwrap().lkey();
        assert_ne!(small_key, pool_key);
        // The pool's answer holds for its first buffer only: the earlier
        // registration is the first match inside it.
        let inner = get(4096 + 64, 64).unwrap();
        assert_eq!(inner.lkey(), small_key, "the earlier registration's key");
        assert!(matches!(inner.0, Held::Shared(_)), "not the pool's hit");
        drop(inner);
        assert_eq!(get(8192, 64).unwrap().lkey(), pool_key);
        assert!(
            matches!(get(8192, 64).unwrap().0, Held::Hit(_)),
            "the exact query hits"
        );
        // Gone, the earlier registration no longer shadows the pool: a
        // later, smaller one comes after it and does not either.
        f.t.deregister_memory(&o, small).unwrap();
        let later = f.reg(&o, 64, 64, R).unwrap();
        assert_eq!(get(0, 64).unwrap().lkey(), pool_key);
        let r = get(64, 64).unwrap();
        assert!(matches!(r.0, Held::Hit(_)), "the pool's whole range");
        assert_eq!(r.lkey(), pool_key, "before the later one");
        drop(r);
        f.t.deregister_memory(&o, pool).unwrap();
        assert_eq!(get(64, 64).unwrap().len(), 64, "the later one now");
        f.t.deregister_memory(&o, later).unwrap();
        // An earlier registration that only touches the pool's end is the
        // first match for an empty buffer there: ends count.
        let next = f.reg(&o, 8192, 4096, R).unwrap();
        let pool = f.reg(&o, 0, 8192, R).unwrap();
        let next_key = get(8192, 64).unwrap().lkey();
        assert_eq!(get(0, 64).unwrap().addr(), f.at(0), "the pool");
        assert_eq!(get(8192, 0).unwrap().lkey(), next_key, "the earlier one's");
        // Only registrations with the query's flags shadow: a write-only
        // one before the pool does not.
        f.t.deregister_memory(&o, pool).unwrap();
        f.t.deregister_memory(&o, next).unwrap();
        f.reg(&o, 4096, 512, W).unwrap();
        f.reg(&o, 0, 8192, R).unwrap();
        assert_eq!(get(0, 64).unwrap().flags(), MemFlags::READ, "the pool");
        let r = get(4096 + 64, 64).unwrap();
        assert!(matches!(r.0, Held::Hit(_)), "the pool's whole range");
        assert_eq!((r.len(), r.flags()), (8192, MemFlags::READ));
        drop(r);
        f.t.release_owner(&o);
        assert_eq!(f.live(), 0);
    }

    #[test]
    fn acquire_checks_range_access_and_handle() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        let hr = f.reg(&o, 0, 4096, R).unwrap();
        let hw = f.reg(&o, 4096, 4096, W).unwrap();
        f.expose(&o, QP, 8192, 4096, RW).unwrap();
        let t = &f.t;
        assert!(t
            .acquire_covering(&o, f.at(0), 4096, MemFlags::READ)
            .is_ok());
        assert_eq!(
            t.acquire_covering(&o, f.at(0), 4096, MemFlags::WRITE)
                .unwrap_err(),
            WSAEFAULT
        );
        assert_eq!(
            t.acquire_covering(&o, f.at(4096), 10, MemFlags::READ)
                .unwrap_err(),
            WSAEFAULT
        );
        assert!(t
            .acquire_covering(&o, f.at(4096), 10, MemFlags::WRITE)
            .is_ok());
        // Spanning two adjacent registrations is covered by neither.
        assert_eq!(
            t.acquire_covering(&o, f.at(4000), 200, ANY).unwrap_err(),
            WSAEFAULT
        );
        // Exposures are not local registrations.
        assert_eq!(
            t.acquire_covering(&o, f.at(8192), 10, MemFlags::READ)
                .unwrap_err(),
            WSAEFAULT
        );
        assert_eq!(
            t.acquire_covering(&o, usize::MAX, 2, MemFlags::READ)
                .unwrap_err(),
            WSAEFAULT
        );
        assert!(t
            .acquire_handle(&o, hr, f.at(10), 4086, MemFlags::READ)
            .is_ok());
        assert_eq!(
            t.acquire_handle(&o, hr, f.at(10), 4087, MemFlags::READ)
                .unwrap_err(),
            WSAEFAULT
        );
        assert_eq!(
            t.acquire_handle(&o, hr, f.at(10), 1, MemFlags::WRITE)
                .unwrap_err(),
            WSAEFAULT
        );
        assert_eq!(
            t.acquire_handle(&o, hw, f.at(0), 1, MemFlags::WRITE)
                .unwrap_err(),
            WSAEFAULT
        );
        assert_eq!(
            t.acquire_handle(&o, hw, usize::MAX, 2, MemFlags::WRITE)
                .unwrap_err(),
            WSAEFAULT
        );
        assert_eq!(
            t.acquire_handle(&o, 0, f.at(0), 1, MemFlags::READ)
                .unwrap_err(),
            WSAEINVAL
        );
        assert_eq!(
            t.acquire_handle(&o, hw + 100, f.at(0), 1, MemFlags::READ)
                .unwrap_err(),
            WSAEINVAL
        );
        let r = t
            .acquire_handle(&o, hw, f.at(4096), 4096, MemFlags::WRITE)
            .unwrap();
        assert_eq!(
            f.nic.region(r.lkey()),
            Some((f.at(4096), 4096, Access::LOCAL_WRITE))
        );
        drop(r);
        t.release_owner(&o);
    }

    #[test]
    fn exposure_rights_keys_and_descriptors() {
        let f = Fx::new(cache_cfg(false));
        let (a, b) = (f.t.new_owner(OwnerId(1)), f.t.new_owner(OwnerId(2)));
        let dr = f.expose(&a, QP, 0, 4096, R).unwrap();
        let dw = f.expose(&a, QP, 4096, 4096, W).unwrap();
        let drw = f.expose(&a, QP, 8192, 100, RW).unwrap();
        assert_eq!((dr.addr, dr.len), (f.at(0) as u64, 4096));
        let check = |d: &Descriptor, region: Access, remote: Access| {
            let (lkey, qp, acc) = f.nic.rkey(d.rkey).expect("bound");
            assert_eq!((qp, acc), (QP, remote));
            assert_eq!(f.nic.region(lkey).unwrap().2, region);
        };
        check(&dr, Access::REMOTE_READ, Access::REMOTE_READ);
        check(
            &dw,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
            Access::REMOTE_WRITE,
        );
        check(
            &drw,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ,
            Access::REMOTE_WRITE | Access::REMOTE_READ,
        );
        // Same owner, buffer, flags and QP: same descriptor, count 2.
        assert_eq!(f.expose(&a, QP, 0, 4096, R).unwrap(), dr);
        // Another connection (MEM-7): same NIC registration, its own key
        // bound to its own queue pair.
        let db = f.expose(&b, QpNum(9), 0, 4096, R).unwrap();
        assert_ne!(db.rkey, dr.rkey);
        assert_ne!(db.generation, dr.generation);
        assert_eq!(f.nic.rkey(db.rkey).unwrap().1, QpNum(9));
        assert_eq!(f.live(), 3);
        assert_eq!(f.rkeys(), 4);
        // Descriptor validation.
        let bytes = dr.encode();
        assert_eq!(f.t.deregister_rdma_memory(&a, &bytes[..31]), Err(WSAEFAULT));
        let mut bad = bytes;
        bad[0] ^= 0xFF;
        assert_eq!(f.t.deregister_rdma_memory(&a, &bad), Err(WSAEINVAL));
        assert_eq!(
            f.t.deregister_rdma_memory(&b, &bytes),
            Err(WSAEINVAL),
            "foreign"
        );
        let wrong_len = Descriptor { len: 100, ..dr }.encode();
        assert_eq!(f.t.deregister_rdma_memory(&a, &wrong_len), Err(WSAEINVAL));
        // Count 2 → 1 keeps the key; → 0 unbinds it (MEM-6).
        let mut long = bytes.to_vec();
        long.extend_from_slice(&[0; 8]);
        f.t.deregister_rdma_memory(&a, &long).unwrap();
        assert!(f.nic.rkey(dr.rkey).is_some());
        f.t.deregister_rdma_memory(&a, &bytes).unwrap();
        assert!(f.nic.rkey(dr.rkey).is_none());
        assert_eq!(f.t.deregister_rdma_memory(&a, &bytes), Err(WSAEINVAL));
        assert!(f.nic.rkey(db.rkey).is_some(), "b's exposure untouched");
        assert_eq!(f.live(), 3, "still held by b");
        f.t.deregister_rdma_memory(&b, &db.encode()).unwrap();
        assert_eq!(f.live(), 2);
        f.t.release_owner(&a);
        assert_eq!((f.live(), f.rkeys()), (0, 0));
    }

    #[test]
    fn stale_descriptor_with_reused_rkey_is_rejected() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        let old = f.expose(&o, QP, 0, 4096, W).unwrap();
        f.t.deregister_rdma_memory(&o, &old.encode()).unwrap();
        let new = f.expose(&o, QP, 0, 4096, W).unwrap();
        assert_eq!(new.rkey, old.rkey, "the fake NIC reuses the key");
        assert_ne!(new.generation, old.generation);
        assert_eq!(
            f.t.deregister_rdma_memory(&o, &old.encode()),
            Err(WSAEINVAL)
        );
        assert!(f.nic.rkey(new.rkey).is_some());
        f.t.deregister_rdma_memory(&o, &new.encode()).unwrap();
        assert_eq!((f.live(), f.rkeys()), (0, 0));
    }

    #[test]
    fn failed_bind_releases_what_it_took() {
        let f = Fx::new(cache_cfg(false));
        let o = f.t.new_owner(OwnerId(1));
        f.nic.st().fail_bind = Some(FabricError::NoResources("mw"));
        assert_eq!(f.expose(&o, QP, 0, 4096, W).unwrap_err(), WSAENOBUFS);
        f.nic.st().fail_bind = Some(FabricError::Invalid("qp"));
        assert_eq!(f.expose(&o, QP, 0, 4096, W).unwrap_err(), WSAEINVAL);
        assert_eq!((f.live(), f.rkeys()), (0, 0));
        assert_eq!(f.t.stats().live_entries, 0);
    }

    #[test]
    fn mem_6_exposure_unbound_at_count_zero_even_when_cached() {
        let f = Fx::new(cache_cfg(true));
        let o = f.t.new_owner(OwnerId(1));
        let d = f.expose(&o, QP, 0, 4096, RW).unwrap();
        f.t.deregister_rdma_memory(&o, &d.encode()).unwrap();
        assert!(
            f.nic.rkey(d.rkey).is_none(),
            "the peer cannot reach cached memory"
        );
        assert_eq!((f.live(), f.rkeys()), (1, 0));
        assert_eq!(f.t.stats().cached_entries, 1);
        // A hit re-exposes with a fresh key/generation, no NIC registration
        // and no look at the mapping.
        let regs = f.nic_regs();
        assert_eq!(f.t.stats().mapping_checks, 1);
        let d2 = f.expose(&o, QP, 0, 4096, RW).unwrap();
        assert_eq!(f.nic_regs(), regs);
        assert_eq!(f.t.stats().mapping_checks, 1);
        assert_ne!(d2.generation, d.generation);
        assert!(f.nic.rkey(d2.rkey).is_some());
        assert_eq!(f.t.stats().cache_hits, 1);
        f.t.release_owner(&o);
        assert_eq!((f.live(), f.rkeys()), (0, 0));
    }

    #[test]
    fn cache_1_hit_makes_no_nic_registration() {
        let f = Fx::new(cache_cfg(true));
        let (a, b) = (f.t.new_owner(OwnerId(1)), f.t.new_owner(OwnerId(2)));
        let h = f.reg(&a, 0, 8192, RW).unwrap();
        f.t.deregister_memory(&a, h).unwrap();
        assert_eq!(f.live(), 1, "kept");
        let s = f.t.stats();
        assert_eq!(
            (s.live_entries, s.cached_entries, s.cached_bytes),
            (0, 1, 8192)
        );
        let h2 = f.reg(&b, 0, 8192, RW).unwrap();
        assert_eq!(f.nic_regs(), 1, "served from the cache");
        assert_ne!(h2, h);
        let s = f.t.stats();
        assert_eq!((s.live_entries, s.cached_entries, s.cache_hits), (1, 0, 1));
        // Without caching the count-0 entry is released.
        let g = Fx::new(cache_cfg(false));
        let o = g.t.new_owner(OwnerId(1));
        let h = g.reg(&o, 0, 8192, RW).unwrap();
        g.t.deregister_memory(&o, h).unwrap();
        assert_eq!(g.live(), 0);
        g.reg(&o, 0, 8192, RW).unwrap();
        assert_eq!(g.nic_regs(), 2);
        assert!(!g.t.cache_enabled() && f.t.cache_enabled());
    }

    #[test]
    fn cache_2_callback_drops_cached_entries_and_dooms_live_ones() {
        let f = Fx::new(cache_cfg(true));
        let o = f.t.new_owner(OwnerId(1));
        assert_eq!(
            f.t.cache_callback(f.at(0), 8192),
            Err(WSAEINVAL),
            "never cached"
        );
        let h = f.reg(&o, 0, 8192, RW).unwrap();
        assert_eq!(
            f.t.cache_callback(f.at(0), 8192),
            Err(WSAEINVAL),
            "live, not cached"
        );
        f.t.deregister_memory(&o, h).unwrap();
        assert_eq!(f.live(), 0, "doomed: released, not cached");
        let h = f.reg(&o, 0, 8192, RW).unwrap();
        f.t.deregister_memory(&o, h).unwrap();
        assert_eq!(f.live(), 1);
        assert_eq!(
            f.t.cache_callback(f.at(8192), 10),
            Err(WSAEINVAL),
            "adjacent, no overlap"
        );
        assert_eq!(
            f.t.cache_callback(f.at(100), 0),
            Err(WSAEINVAL),
            "empty range"
        );
        f.t.cache_callback(f.at(8191), 10).unwrap();
        assert_eq!(f.live(), 0);
        assert_eq!(f.t.stats().cached_entries, 0);
        f.reg(&o, 0, 8192, RW).unwrap();
        assert_eq!(f.nic_regs(), 3, "registered again");
    }

    #[test]
    fn doomed_entry_is_not_joined_by_new_registrations() {
        let f = Fx::new(cache_cfg(true));
        let (a, b) = (f.t.new_owner(OwnerId(1)), f.t.new_owner(OwnerId(2)));
        let ha = f.reg(&a, 0, 4096, RW).unwrap();
        let _ = f.t.cache_callback(f.at(0), 4096);
        // The VA may map new pages now: a new registration pins afresh,
        // even on the same owner with the same flags.
        let hb = f.reg(&b, 0, 4096, RW).unwrap();
        let ha2 = f.reg(&a, 0, 4096, RW).unwrap();
        assert_ne!(ha2, ha);
        assert_eq!((f.nic_regs(), f.live()), (2, 2));
        f.t.deregister_memory(&a, ha).unwrap();
        assert_eq!(f.live(), 1, "the doomed entry is released");
        f.t.deregister_memory(&b, hb).unwrap();
        f.t.deregister_memory(&a, ha2).unwrap();
        assert_eq!(f.live(), 1, "the fresh entry is cached");
    }

    #[test]
    fn cache_3_release_owner_drops_the_cached_entries_it_released_last() {
        let f = Fx::new(cache_cfg(true));
        let (a, b) = (f.t.new_owner(OwnerId(1)), f.t.new_owner(OwnerId(2)));
        // a releases [0,4096) last; b releases [4096,8192) last although a
        // registered it first.
        let h = f.reg(&a, 0, 4096, RW).unwrap();
        f.t.deregister_memory(&a, h).unwrap();
        let h = f.reg(&a, 4096, 4096, RW).unwrap();
        f.t.deregister_memory(&a, h).unwrap();
        let h = f.reg(&b, 4096, 4096, RW).unwrap();
        f.t.deregister_memory(&b, h).unwrap();
        let d = f.expose(&a, QP, 8192, 4096, W).unwrap();
        let hl = f.reg(&a, 12288, 4096, R).unwrap();
        assert_eq!(f.live(), 4);
        f.t.release_owner(&a);
        assert_eq!(f.live(), 1, "only b's cached entry remains");
        assert_eq!(f.rkeys(), 0);
        assert_eq!(f.t.stats().cached_entries, 1);
        // Idempotent; later calls fail WSAENOTSOCK.
        f.t.release_owner(&a);
        assert_eq!(f.reg(&a, 0, 10, R), Err(WSAENOTSOCK));
        assert_eq!(f.expose(&a, QP, 0, 10, R).unwrap_err(), WSAENOTSOCK);
        assert_eq!(f.t.deregister_memory(&a, hl), Err(WSAENOTSOCK));
        assert_eq!(
            f.t.deregister_rdma_memory(&a, &d.encode()),
            Err(WSAENOTSOCK)
        );
        assert_eq!(
            f.t.acquire_covering(&a, f.at(12288), 1, MemFlags::READ)
                .unwrap_err(),
            WSAENOTSOCK
        );
        assert_eq!(
            f.t.acquire_handle(&a, hl, f.at(12288), 1, MemFlags::READ)
                .unwrap_err(),
            WSAENOTSOCK
        );
        f.t.release_owner(&b);
        assert_eq!(f.live(), 0);
    }

    #[test]
    fn release_owner_keeps_nic_registration_alive_for_a_leftover_ref() {
        let f = Fx::new(cache_cfg(true));
        let o = f.t.new_owner(OwnerId(1));
        f.reg(&o, 0, 4096, W).unwrap();
        let r =
            f.t.acquire_covering(&o, f.at(0), 10, MemFlags::WRITE)
                .unwrap();
        f.t.release_owner(&o);
        assert_eq!(f.t.stats().live_entries + f.t.stats().cached_entries, 0);
        assert_eq!(f.live(), 1, "an op still names the lkey");
        assert!(f.nic.region(r.lkey()).is_some());
        drop(r);
        assert_eq!(f.live(), 0);
    }

    #[test]
    fn lru_respects_entry_and_byte_limits() {
        let f = Fx::new(MrCacheConfig {
            enabled: true,
            max_entries: 2,
            max_bytes: 3 * 4096,
        });
        let o = f.t.new_owner(OwnerId(1));
        let cycle = |off: usize, len: usize| {
            let h = f.reg(&o, off, len, RW).unwrap();
            f.t.deregister_memory(&o, h).unwrap();
        };
        cycle(0, 4096);
        cycle(4096, 4096);
        cycle(8192, 4096); // evicts [0,4096)
        assert_eq!((f.live(), f.t.stats().cached_entries), (2, 2));
        cycle(4096, 4096); // hit, refreshed: now the newest
        assert_eq!(f.nic_regs(), 3);
        cycle(16384, 8192); // 3 pages + 2 pages > max_bytes: evicts [8192..)
        assert_eq!(f.t.stats().cached_bytes, 4096 + 8192);
        cycle(4096, 4096);
        assert_eq!(f.nic_regs(), 4, "[4096,8192) survived both evictions");
        cycle(32768, 4 * 4096); // larger than max_bytes: never cached
        assert_eq!(f.t.stats().cached_entries, 2);
        assert_eq!(f.live(), 2);
    }

    #[test]
    fn concurrent_data_path_and_registrations() {
        let f = Arc::new(Fx::new(cache_cfg(true)));
        let o = f.t.new_owner(OwnerId(1));
        // Count 2: a deregistration that slips in between transfers is
        // undone at once, so the handle never disappears.
        let h = f.reg(&o, 0, 4096, RW).unwrap();
        assert_eq!(f.reg(&o, 0, 4096, RW), Ok(h));
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for i in 0..2000 {
                        let r =
                            f.t.acquire_handle(&o, h, f.at(i % 4000), 64, MemFlags::READ)
                                .unwrap();
                        assert!(f.nic.region(r.lkey()).is_some());
                        let r2 =
                            f.t.acquire_covering(&o, f.at(0), 64, MemFlags::WRITE)
                                .unwrap();
                        drop((r, r2));
                    }
                });
            }
            s.spawn(|| {
                for i in 0..500 {
                    let x = f.reg(&o, 4096 + (i % 3) * 4096, 4096, R).unwrap();
                    match f.t.deregister_memory(&o, h) {
                        Err(e) => assert_eq!(e, WSAEINVAL, "in use"),
                        Ok(()) => assert_eq!(f.reg(&o, 0, 4096, RW), Ok(h)),
                    }
                    f.t.deregister_memory(&o, x).unwrap();
                    let d = f.expose(&o, QP, 8192, 4096, W).unwrap();
                    f.t.deregister_rdma_memory(&o, &d.encode()).unwrap();
                }
            });
        });
        f.t.release_owner(&o);
        let _ = f.t.cache_callback(f.at(0), 16 * 4096);
        assert_eq!((f.live(), f.rkeys()), (0, 0));
    }

    /// Random sequences of every table operation across three owners,
    /// checked step by step against a plain model of entries, associations
    /// and the LRU, and against the fake NIC's live registrations and keys.
    mod model {
        use super::*;
        use proptest::prelude::*;

        /// Buffers (offset, len) in the fixture's region: identical,
        /// overlapping and disjoint ranges.
        const BUFS: [(usize, usize); 4] = [(0, 8192), (4096, 8192), (0, 4096), (12288, 100)];
        const OWNERS: usize = 3;

        #[derive(Clone, Debug)]
        enum Op {
            Reg {
                owner: usize,
                buf: usize,
                flags: u32,
            },
            Dereg {
                owner: usize,
                pick: usize,
            },
            Expose {
                owner: usize,
                buf: usize,
                flags: u32,
                qp: u32,
            },
            Unexpose {
                owner: usize,
                pick: usize,
                mangle: u8,
            },
            Acquire {
                owner: usize,
                buf: usize,
                off: usize,
                len: usize,
                need: u32,
                by_handle: Option<usize>,
                hold: bool,
            },
            DropHeld {
                pick: usize,
            },
            Release {
                owner: usize,
            },
            Callback {
                buf: usize,
            },
        }

        fn raw_flags() -> impl Strategy<Value = u32> {
            prop_oneof![6 => 1u32..=3, 1 => Just(0u32), 1 => Just(4u32)]
        }

        fn op() -> impl Strategy<Value = Op> {
            let o = || 0..OWNERS;
            let b = || 0..BUFS.len();
            let reg = (o(), b(), raw_flags()).prop_map(|(owner, buf, flags)| Op::Reg {
                owner,
                buf,
                flags,
            });
            let dereg = (o(), any::<usize>()).prop_map(|(owner, pick)| Op::Dereg { owner, pick });
            let expose =
                (o(), b(), raw_flags(), 0u32..2).prop_map(|(owner, buf, flags, qp)| Op::Expose {
                    owner,
                    buf,
                    flags,
                    qp,
                });
            let unexpose =
                (o(), any::<usize>(), 0u8..8).prop_map(|(owner, pick, mangle)| Op::Unexpose {
                    owner,
                    pick,
                    mangle,
                });
            let acquire = (
                (o(), b(), 0usize..9000, 0usize..9000),
                (
                    1u32..=3,
                    proptest::option::of(any::<usize>()),
                    any::<bool>(),
                ),
            )
                .prop_map(
                    |((owner, buf, off, len), (need, by_handle, hold))| Op::Acquire {
                        owner,
                        buf,
                        off,
                        len,
                        need,
                        by_handle,
                        hold,
                    },
                );
            prop_oneof![
                4 => reg,
                3 => dereg,
                3 => expose,
                3 => unexpose,
                4 => acquire,
                2 => any::<usize>().prop_map(|pick| Op::DropHeld { pick }),
                1 => o().prop_map(|owner| Op::Release { owner }),
                1 => (0..=BUFS.len()).prop_map(|buf| Op::Callback { buf }),
            ]
        }

        /// NIC rights as raw bits (LOCAL_WRITE 1, REMOTE_WRITE 2,
        /// REMOTE_READ 4), computed independently of the table.
        fn local_bits(flags: u32) -> u8 {
            if flags & 2 != 0 {
                1
            } else {
                0
            }
        }
        fn exposure_bits(flags: u32) -> u8 {
            (if flags & 2 != 0 { 1 | 2 } else { 0 }) | (if flags & 1 != 0 { 4 } else { 0 })
        }

        struct MEntry {
            addr: usize,
            len: usize,
            bits: u8,
            total: u64,
            doomed: bool,
            /// (recency stamp, last owner) while cached.
            cached: Option<(u64, usize)>,
        }
        struct MLocal {
            entry: u64,
            flags: u32,
            count: u64,
            addr: usize,
            len: usize,
            held: usize,
        }
        struct MExp {
            entry: u64,
            qp: u32,
            d: Descriptor,
            count: u64,
        }
        #[derive(Default)]
        struct MOwner {
            released: bool,
            locals: BTreeMap<u64, MLocal>,
            exps: Vec<MExp>,
        }
        struct Model {
            cfg: MrCacheConfig,
            entries: BTreeMap<u64, MEntry>,
            by_key: HashMap<(usize, usize, u8), u64>,
            next_id: u64,
            stamp: u64,
            nic_regs: u64,
            hits: u64,
            owners: Vec<MOwner>,
            handles: Vec<u64>,
            descs: Vec<Descriptor>,
        }

        impl Model {
            fn obtain(&mut self, addr: usize, len: usize, bits: u8) -> u64 {
                if let Some(&id) = self.by_key.get(&(addr, len, bits)) {
                    let e = self.entries.get_mut(&id).unwrap();
                    if e.cached.take().is_some() {
                        self.hits += 1;
                    }
                    e.total += 1;
                    return id;
                }
                self.nic_regs += 1;
                self.next_id += 1;
                let id = self.next_id;
                self.entries.insert(
                    id,
                    MEntry {
                        addr,
                        len,
                        bits,
                        total: 1,
                        doomed: false,
                        cached: None,
                    },
                );
                self.by_key.insert((addr, len, bits), id);
                id
            }
            fn remove(&mut self, id: u64) {
                let e = self.entries.remove(&id).unwrap();
                if self.by_key.get(&(e.addr, e.len, e.bits)) == Some(&id) {
                    self.by_key.remove(&(e.addr, e.len, e.bits));
                }
            }
            fn cached(&self) -> Vec<(u64, u64, usize)> {
                let mut v: Vec<_> = self
                    .entries
                    .iter()
                    .filter_map(|(&id, e)| e.cached.map(|(stamp, o)| (stamp, id, o)))
                    .collect();
                v.sort();
                v
            }
            fn cached_bytes(&self) -> u64 {
                self.entries
                    .values()
                    .filter(|e| e.cached.is_some())
                    .map(|e| e.len as u64)
                    .sum()
            }
            fn put(&mut self, id: u64, n: u64, owner: usize, may_cache: bool) {
                let cfg = self.cfg.clone();
                let e = self.entries.get_mut(&id).unwrap();
                e.total -= n;
                if e.total > 0 {
                    return;
                }
                if may_cache
                    && cfg.enabled
                    && !e.doomed
                    && cfg.max_entries > 0
                    && e.len as u64 <= cfg.max_bytes
                {
                    self.stamp += 1;
                    e.cached = Some((self.stamp, owner));
                    while self.cached().len() > cfg.max_entries
                        || self.cached_bytes() > cfg.max_bytes
                    {
                        let oldest = self.cached()[0].1;
                        self.remove(oldest);
                    }
                } else {
                    self.remove(id);
                }
            }
        }

        fn run(cfg: MrCacheConfig, ops: Vec<Op>) -> Result<(), TestCaseError> {
            let f = Fx::new(cfg.clone());
            let regs: Vec<_> = (0..OWNERS)
                .map(|i| f.t.new_owner(OwnerId(i as u64 + 1)))
                .collect();
            let mut m = Model {
                cfg,
                entries: BTreeMap::new(),
                by_key: HashMap::new(),
                next_id: 0,
                stamp: 0,
                nic_regs: 0,
                hits: 0,
                owners: (0..OWNERS).map(|_| MOwner::default()).collect(),
                handles: Vec::new(),
                descs: Vec::new(),
            };
            let mut held: Vec<(usize, u64, RegRef)> = Vec::new();
            for op in ops {
                match op {
                    Op::Reg { owner, buf, flags } => {
                        let (off, len) = BUFS[buf];
                        let addr = f.at(off);
                        let got = f.reg(&regs[owner], off, len, flags);
                        if !(1..=3).contains(&flags) {
                            prop_assert_eq!(got, Err(WSAEINVAL));
                            continue;
                        }
                        if m.owners[owner].released {
                            prop_assert_eq!(got, Err(WSAENOTSOCK));
                            continue;
                        }
                        let cur = m.by_key.get(&(addr, len, local_bits(flags))).copied();
                        let same = m.owners[owner]
                            .locals
                            .iter_mut()
                            .find(|(_, l)| Some(l.entry) == cur && l.flags == flags);
                        if let Some((&h, l)) = same {
                            l.count += 1;
                            m.entries.get_mut(&l.entry).unwrap().total += 1;
                            prop_assert_eq!(got, Ok(h));
                        } else {
                            let id = m.obtain(addr, len, local_bits(flags));
                            let h = got.unwrap();
                            prop_assert!(h != 0 && !m.handles.contains(&h), "fresh handle");
                            m.handles.push(h);
                            m.owners[owner].locals.insert(
                                h,
                                MLocal {
                                    entry: id,
                                    flags,
                                    count: 1,
                                    addr,
                                    len,
                                    held: 0,
                                },
                            );
                        }
                    }
                    Op::Dereg { owner, pick } => {
                        let h = match pick % 8 {
                            0 => 0,
                            1 => u64::MAX,
                            _ if m.handles.is_empty() => 77,
                            _ => m.handles[pick % m.handles.len()],
                        };
                        let got = f.t.deregister_memory(&regs[owner], h);
                        let o = &mut m.owners[owner];
                        if o.released {
                            prop_assert_eq!(got, Err(WSAENOTSOCK));
                            continue;
                        }
                        match o.locals.get_mut(&h) {
                            None => prop_assert_eq!(got, Err(WSAEINVAL)),
                            Some(l) if l.held > 0 => prop_assert_eq!(got, Err(WSAEINVAL)),
                            Some(l) => {
                                prop_assert_eq!(got, Ok(()));
                                l.count -= 1;
                                let id = l.entry;
                                if l.count == 0 {
                                    o.locals.remove(&h);
                                }
                                m.put(id, 1, owner, true);
                            }
                        }
                    }
                    Op::Expose {
                        owner,
                        buf,
                        flags,
                        qp,
                    } => {
                        let (off, len) = BUFS[buf];
                        let addr = f.at(off);
                        let got = f.expose(&regs[owner], QpNum(qp), off, len, flags);
                        if !(1..=3).contains(&flags) {
                            prop_assert_eq!(got, Err(WSAEINVAL));
                            continue;
                        }
                        if m.owners[owner].released {
                            prop_assert_eq!(got, Err(WSAENOTSOCK));
                            continue;
                        }
                        let bits = exposure_bits(flags);
                        let cur = m.by_key.get(&(addr, len, bits)).copied();
                        let same = m.owners[owner]
                            .exps
                            .iter_mut()
                            .find(|x| Some(x.entry) == cur && x.qp == qp);
                        if let Some(x) = same {
                            x.count += 1;
                            m.entries.get_mut(&x.entry).unwrap().total += 1;
                            prop_assert_eq!(got, Ok(x.d));
                        } else {
                            let id = m.obtain(addr, len, bits);
                            let d = got.unwrap();
                            prop_assert_eq!((d.addr, d.len), (addr as u64, len as u64));
                            prop_assert!(m.descs.iter().all(|o| o.generation != d.generation));
                            let (lkey, bound_qp, acc) = f.nic.rkey(d.rkey).expect("bound");
                            prop_assert_eq!(bound_qp, QpNum(qp));
                            prop_assert_eq!(acc.bits(), bits & !1);
                            prop_assert_eq!(
                                f.nic.region(lkey).map(|r| (r.0, r.1, r.2.bits())),
                                Some((addr, len, bits))
                            );
                            m.descs.push(d);
                            m.owners[owner].exps.push(MExp {
                                entry: id,
                                qp,
                                d,
                                count: 1,
                            });
                        }
                    }
                    Op::Unexpose {
                        owner,
                        pick,
                        mangle,
                    } => {
                        let d = if m.descs.is_empty() {
                            Descriptor {
                                rkey: 5,
                                addr: 4096,
                                len: 1,
                                generation: 9,
                            }
                        } else {
                            m.descs[pick % m.descs.len()]
                        };
                        let mut bytes = d.encode().to_vec();
                        match mangle {
                            6 => bytes.truncate(20),
                            7 => bytes[1] ^= 1,
                            _ => {}
                        }
                        let got = f.t.deregister_rdma_memory(&regs[owner], &bytes);
                        if mangle == 6 {
                            prop_assert_eq!(got, Err(WSAEFAULT));
                            continue;
                        }
                        if mangle == 7 {
                            prop_assert_eq!(got, Err(WSAEINVAL));
                            continue;
                        }
                        let o = &mut m.owners[owner];
                        if o.released {
                            prop_assert_eq!(got, Err(WSAENOTSOCK));
                            continue;
                        }
                        match o.exps.iter().position(|x| x.d == d) {
                            None => prop_assert_eq!(got, Err(WSAEINVAL)),
                            Some(_)
                                if o.locals.values().any(|l| {
                                    let (a, n) = (d.addr as usize, d.len as usize);
                                    l.held > 0 && l.addr < a + n && a < l.addr + l.len
                                }) =>
                            {
                                // Memory a held op uses stays exposed.
                                prop_assert_eq!(got, Err(WSAEINVAL));
                            }
                            Some(i) => {
                                prop_assert_eq!(got, Ok(()));
                                o.exps[i].count -= 1;
                                let id = o.exps[i].entry;
                                if o.exps[i].count == 0 {
                                    o.exps.remove(i);
                                    prop_assert!(f.nic.rkey(d.rkey).is_none(), "unbound at zero");
                                } else {
                                    prop_assert!(f.nic.rkey(d.rkey).is_some());
                                }
                                m.put(id, 1, owner, true);
                            }
                        }
                    }
                    Op::Acquire {
                        owner,
                        buf,
                        off,
                        len,
                        need,
                        by_handle,
                        hold,
                    } => {
                        let (boff, blen) = BUFS[buf];
                        let addr = f.at(boff + off % blen);
                        let need_f = MemFlags(need);
                        let h_asked = by_handle.map(|pick| {
                            if m.handles.is_empty() {
                                3
                            } else {
                                m.handles[pick % m.handles.len()]
                            }
                        });
                        // Through the hit when it answers (MEM-3), so the
                        // model checks that its answers are exact too.
                        // SAFETY: `held` drops before `regs`.
                        let got = unsafe {
                            f.t.acquire_pinned(
                                &regs[owner],
                                h_asked.unwrap_or(0),
                                addr,
                                len,
                                need_f,
                            )
                        };
                        let o = &mut m.owners[owner];
                        if o.released {
                            prop_assert_eq!(got.unwrap_err(), WSAENOTSOCK);
                            continue;
                        }
                        let ok = |l: &MLocal| {
                            l.flags & need == need && l.addr <= addr && addr + len <= l.addr + l.len
                        };
                        let want = match h_asked {
                            Some(h) => match o.locals.get(&h) {
                                None => Err(WSAEINVAL),
                                Some(l) if ok(l) => Ok(h),
                                Some(_) => Err(WSAEFAULT),
                            },
                            None => o
                                .locals
                                .iter()
                                .find(|(_, l)| ok(l))
                                .map(|(&h, _)| h)
                                .ok_or(WSAEFAULT),
                        };
                        match (got, want) {
                            (Ok(r), Ok(h)) => {
                                let l = o.locals.get_mut(&h).unwrap();
                                prop_assert_eq!(
                                    (r.addr(), r.len(), r.flags().bits()),
                                    (l.addr, l.len, l.flags)
                                );
                                let reg = f.nic.region(r.lkey()).expect("lkey live");
                                prop_assert_eq!(
                                    (reg.0, reg.1, reg.2.bits()),
                                    (l.addr, l.len, local_bits(l.flags))
                                );
                                if hold {
                                    l.held += 1;
                                    held.push((owner, h, r));
                                }
                            }
                            (got, want) => {
                                prop_assert_eq!(got.map(|_| ()).unwrap_err(), want.unwrap_err())
                            }
                        }
                    }
                    Op::DropHeld { pick } => {
                        if !held.is_empty() {
                            let (o, h, r) = held.swap_remove(pick % held.len());
                            drop(r);
                            m.owners[o].locals.get_mut(&h).unwrap().held -= 1;
                        }
                    }
                    Op::Release { owner } => {
                        // Close quiesces the socket's ops first.
                        held.retain(|(o, _, _)| *o != owner);
                        f.t.release_owner(&regs[owner]);
                        let o = std::mem::take(&mut m.owners[owner]);
                        m.owners[owner].released = true;
                        if o.released {
                            continue;
                        }
                        for x in o.exps {
                            prop_assert!(f.nic.rkey(x.d.rkey).is_none(), "unbound on release");
                            m.put(x.entry, x.count, owner, false);
                        }
                        for l in o.locals.into_values() {
                            m.put(l.entry, l.count, owner, false);
                        }
                        for (_, id, last) in m.cached() {
                            if last == owner {
                                m.remove(id);
                            }
                        }
                    }
                    Op::Callback { buf } => {
                        let (off, len) = BUFS.get(buf).copied().unwrap_or((0, f.mem.len()));
                        let (addr, end) = (f.at(off), f.at(off) + len);
                        let got = f.t.cache_callback(addr, len);
                        let hits: Vec<u64> = m
                            .entries
                            .iter()
                            .filter(|(_, e)| e.addr < end && addr < e.addr + e.len)
                            .map(|(&id, _)| id)
                            .collect();
                        let mut dropped = false;
                        for id in hits {
                            let e = m.entries.get_mut(&id).unwrap();
                            if e.cached.is_some() {
                                m.remove(id);
                                dropped = true;
                            } else {
                                e.doomed = true;
                                let key = (e.addr, e.len, e.bits);
                                if m.by_key.get(&key) == Some(&id) {
                                    m.by_key.remove(&key);
                                }
                            }
                        }
                        prop_assert_eq!(got, if dropped { Ok(()) } else { Err(WSAEINVAL) });
                    }
                }
                // Step invariants: NIC state and table counters match the model.
                let nic = f.nic.stats();
                prop_assert_eq!(nic.live_regions, m.entries.len() as u64);
                prop_assert_eq!(nic.registrations, m.nic_regs);
                let exps: usize = m.owners.iter().map(|o| o.exps.len()).sum();
                prop_assert_eq!(nic.live_remote_keys, exps as u64);
                let s = f.t.stats();
                let cached = m.cached().len();
                prop_assert_eq!(s.cached_entries, cached);
                prop_assert_eq!(s.live_entries, m.entries.len() - cached);
                prop_assert_eq!(s.cached_bytes, m.cached_bytes());
                prop_assert_eq!(s.cache_hits, m.hits);
                prop_assert_eq!(s.nic_registrations, m.nic_regs);
                prop_assert!(cached <= m.cfg.max_entries && s.cached_bytes <= m.cfg.max_bytes);
            }
            // Teardown: no leak once every owner is released and the cache
            // is flushed.
            held.clear();
            for r in &regs {
                f.t.release_owner(r);
            }
            let _ = f.t.cache_callback(f.at(0), f.mem.len());
            let nic = f.nic.stats();
            prop_assert_eq!((nic.live_regions, nic.live_remote_keys), (0, 0));
            let s = f.t.stats();
            prop_assert_eq!(
                (s.live_entries, s.cached_entries, s.cached_bytes),
                (0, 0, 0)
            );
            Ok(())
        }

        fn cfg() -> impl Strategy<Value = MrCacheConfig> {
            (
                any::<bool>(),
                0usize..4,
                prop_oneof![Just(4096u64), Just(10_000), Just(1 << 20)],
            )
                .prop_map(|(enabled, max_entries, max_bytes)| MrCacheConfig {
                    enabled,
                    max_entries,
                    max_bytes,
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn table_matches_model(cfg in cfg(), ops in proptest::collection::vec(op(), 1..80)) {
                run(cfg, ops)?;
            }
        }
    }

    /// loom models of the registration refcount: two sockets sharing one
    /// NIC registration, a transfer holding it, deregistrations and a cache
    /// invalidation in every interleaving. The fake NIC panics on a double
    /// deregistration or one with remote keys bound.
    #[cfg(loom)]
    mod loom_models {
        use super::*;
        use loom::thread;

        /// Sockets A and B register the same buffer (one entry, total 2).
        /// A's transfer holds the registration while A tries to deregister
        /// (MEM-3: refused), B deregisters (MEM-2: the region stays, A
        /// still counts) and the application invalidates the range
        /// (CACHE-2) — concurrently. The NIC region stays registered while
        /// the transfer holds it, and once everything settled it is
        /// released exactly once, whether the invalidation found it live
        /// (doomed) or cached.
        fn shared_registration(cache: bool) {
            let f = Arc::new(Fx::new(cache_cfg(cache)));
            let (a, b) = (f.t.new_owner(OwnerId(1)), f.t.new_owner(OwnerId(2)));
            let ha = f.reg(&a, 0, 4096, RW).unwrap();
            let hb = f.reg(&b, 0, 4096, RW).unwrap();
            let socket_a = {
                let (f, a) = (f.clone(), a.clone());
                thread::spawn(move || {
                    let op = f.t.acquire_handle(&a, ha, f.at(0), 4096, ANY).unwrap();
                    assert!(
                        f.nic.region(op.lkey()).is_some(),
                        "region released under a transfer"
                    );
                    assert_eq!(f.t.deregister_memory(&a, ha), Err(WSAEINVAL));
                    assert!(f.nic.region(op.lkey()).is_some());
                    drop(op);
                    f.t.deregister_memory(&a, ha).unwrap();
                })
            };
            let socket_b = {
                let (f, b) = (f.clone(), b.clone());
                thread::spawn(move || f.t.deregister_memory(&b, hb).unwrap())
            };
            // Ok if it found the entry cached (and dropped it), EINVAL if
            // the entry was live (then it is doomed).
            let _ = f.t.cache_callback(f.at(0), 4096);
            socket_a.join().unwrap();
            socket_b.join().unwrap();
            let st = f.t.stats();
            assert_eq!(st.live_entries, 0);
            assert_eq!(st.cached_entries, 0, "an invalidated range stays cached");
            assert_eq!(f.live(), 0, "the NIC region leaked");
            assert_eq!(f.nic_regs(), 1, "one NIC registration for both sockets");
        }

        /// A lookup through the hit (lock-free) races the deregistration of
        /// the registration it names (MEM-3): either the deregistration
        /// sees the hold and refuses, or the lookup sees the hit stopped
        /// and takes the lock (and finds nothing once the registration is
        /// gone). The NIC registration is never released under a hold, and
        /// is released exactly once.
        #[test]
        fn loom_hit_hold_racing_deregistration() {
            crate::sync::model("hit_hold_racing_deregistration", 3, || {
                let f = Arc::new(Fx::new(cache_cfg(false)));
                let o = f.t.new_owner(OwnerId(1));
                let h = f.reg(&o, 0, 4096, RW).unwrap();
                // The first lookup takes the lock and sets the hit.
                // SAFETY: the RegRef is dropped before `o`.
                drop(unsafe { f.t.acquire_pinned(&o, 0, f.at(0), 64, ANY) }.unwrap());
                let op = {
                    let (f, o) = (f.clone(), o.clone());
                    thread::spawn(move || {
                        // Another buffer of the registration: the hit
                        // answers it too.
                        // SAFETY: the RegRef is dropped before this `o`.
                        let r = unsafe { f.t.acquire_pinned(&o, 0, f.at(512), 64, ANY) };
                        if let Ok(r) = r {
                            assert!(
                                f.nic.region(r.lkey()).is_some(),
                                "region released under a hold"
                            );
                        }
                    })
                };
                let deregistered = f.t.deregister_memory(&o, h).is_ok();
                op.join().unwrap();
                if !deregistered {
                    f.t.deregister_memory(&o, h).unwrap();
                }
                assert_eq!(f.live(), 0, "the NIC region leaked");
                assert_eq!(f.nic_regs(), 1);
            });
        }

        #[test]
        fn loom_shared_registration_with_cache() {
            crate::sync::model("shared_registration_with_cache", 3, || {
                shared_registration(true)
            });
        }

        #[test]
        fn loom_shared_registration_without_cache() {
            crate::sync::model("shared_registration_without_cache", 3, || {
                shared_registration(false)
            });
        }
    }
}
