//! The SAN socket object and the descriptor table.
//!
//! A socket is an `Arc`. The descriptor table holds one reference from
//! publication until close removed the socket (after which lookups fail
//! `WSAENOTSOCK`) *and* its slot's pins and close-gate count are gone: a
//! data call enters the gate on the slot for its duration, its op stays in
//! it until its completion was signalled, and the removal leaves a pin of
//! its own that the socket's finalization gives back, after the gate's
//! count reached 0 (see [`SocketTable`]). Control calls and close hold
//! `Arc`s. Nothing of a socket is released before `close_socket` (spec
//! §6.1 step 5): peer-detected failures only change `fail`.

use super::dup_state::DupState;
use super::gate::CloseGate;
use super::qp_cell::QpCell;
use super::slots::Slots;
use super::types::{NetworkEvents, ProviderSocket, SwitchHandle, FD_ACCEPT, FD_CONNECT};
use super::Running;
use crate::error::{WsaError, WsaResult};
use crate::event::Event;
use crate::fabric::{ConnectAttempt, Listener, ListenerEvents, QpEvents, QueuePair};
use crate::mem::table::OwnerRegs;
use crate::sync::{
    AtomicU64, CachePadded, Mutex as ModelMutex, MutexGuard as ModelGuard, UnsafeCell,
};
use std::net::SocketAddrV4;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

/// Where a socket is in its life (control path only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Open,
    Bound,
    Listening,
    Connecting,
    Connected,
}

/// Control-path state, under `Socket::ctl`.
pub struct Control {
    pub phase: Phase,
    pub local: Option<SocketAddrV4>,
    pub peer: Option<SocketAddrV4>,
    pub backlog: u32,
    pub listener: Option<Arc<dyn Listener>>,
    pub attempt: Option<Arc<dyn ConnectAttempt>>,
    /// `WSPEventSelect` registration; cleared by close so that no `FD_*`
    /// event is signalled after `close_socket` returned (CLOSE-11).
    pub event: Option<(Arc<Event>, i32)>,
    /// Recorded network events, read and cleared by `enum_network_events`.
    pub recorded: NetworkEvents,
}

impl Control {
    /// Records `FD_*` event `bit` with `code` and signals the registered
    /// event if it asked for it.
    pub fn record(&mut self, bit: usize, code: i32) {
        self.recorded.network_events |= 1 << bit;
        self.recorded.error_codes[bit] = code;
        if let Some((ev, mask)) = &self.event {
            if mask & (1 << bit) != 0 {
                ev.set();
            }
        }
    }
}

/// Socket options the provider keeps.
#[derive(Debug, Default)]
pub struct Options {
    pub debug: AtomicBool,
    pub nodelay: AtomicBool,
}

pub struct Socket {
    pub desc: ProviderSocket,
    pub handle: SwitchHandle,
    /// The engine the socket was created in: its switch owns `handle` (the
    /// final upcall goes to it even if the provider was cleaned up before
    /// the socket's teardown ended), its progress serves `progress_socket`.
    pub run: Arc<Running>,
    /// Close against op start and completion: ops started after close fail,
    /// completions processed after it report `WSA_OPERATION_ABORTED`, and
    /// finalization runs once, after the last op (see [`CloseGate`]).
    pub gate: CloseGate,
    /// First failure of the connection (Winsock code), 0 while healthy.
    /// Later calls fail with it (spec §7-5).
    pub fail: AtomicI32,
    /// This socket's registrations (data-path lookups take only its lock).
    pub regs: Arc<OwnerRegs>,
    /// The connection's queue pair, set when connected (replaced only when
    /// the peer of a duplicated connection re-establishes it, `dup.rs`).
    pub qp: QpCell,
    /// Socket duplication (spec §4.8) this socket takes part in.
    pub dup: DupState,
    pub ctl: Mutex<Control>,
    pub opts: Options,
    /// Socket-level `SO_RDMA_THRESHOLD_SIZE` (settable by the switch).
    pub rdma_threshold: AtomicU32,
    /// Index of the CQ the socket's queue pair uses (`usize::MAX` before a
    /// connection); set before the queue pair exists.
    pub cq: AtomicUsize,
}

impl Socket {
    pub fn new(
        desc: ProviderSocket,
        handle: SwitchHandle,
        run: Arc<Running>,
        regs: Arc<OwnerRegs>,
        rdma_threshold: u32,
    ) -> Socket {
        Socket {
            desc,
            handle,
            run,
            gate: CloseGate::default(),
            fail: AtomicI32::new(0),
            regs,
            qp: QpCell::default(),
            dup: DupState::default(),
            ctl: Mutex::new(Control {
                phase: Phase::Open,
                local: None,
                peer: None,
                backlog: 0,
                listener: None,
                attempt: None,
                event: None,
                recorded: NetworkEvents::default(),
            }),
            opts: Options::default(),
            rdma_threshold: AtomicU32::new(rdma_threshold),
            cq: AtomicUsize::new(usize::MAX),
        }
    }

    /// The socket's CQ index, or some value when it has none: a hint for
    /// the op slab's free lists (`OpSlab::reserve`), which take any.
    #[inline(always)]
    pub fn cq_hint(&self) -> usize {
        self.cq.load(Ordering::Relaxed)
    }

    /// The socket's CQ index, once it has a queue pair (or is getting one).
    pub fn cq_index(&self) -> Option<usize> {
        match self.cq.load(Ordering::Relaxed) {
            usize::MAX => None,
            i => Some(i),
        }
    }

    pub fn ctl(&self) -> MutexGuard<'_, Control> {
        // Control is updated field by field under the lock; a panic inside
        // a critical section is a bug, and the remaining state is still the
        // best information there is.
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the connection's first failure.
    pub fn record_failure(&self, code: WsaError) {
        let _ = self
            .fail
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire);
    }

    /// The first failure, if any.
    #[inline]
    pub fn failure(&self) -> Option<WsaError> {
        match self.fail.load(Ordering::Acquire) {
            0 => None,
            c => Some(WsaError::from_code(c).unwrap_or(WsaError::WSAECONNABORTED)),
        }
    }

    /// The queue pair of a connected, healthy socket.
    pub fn connected_qp(&self) -> WsaResult<&Arc<dyn QueuePair>> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.qp.get().ok_or(WsaError::WSAENOTCONN)
    }
}

/// Connection events of a socket's queue pair: the socket, and which of
/// its queue pairs this is (see [`DupState::ignores_events_of`]).
pub struct SocketQpEvents {
    pub socket: Weak<Socket>,
    pub epoch: u32,
}

impl SocketQpEvents {
    /// The socket's live queue pair, if the event is about it.
    fn socket(&self) -> Option<Arc<Socket>> {
        self.socket
            .upgrade()
            .filter(|s| !s.dup.ignores_events_of(self.epoch))
    }
}

impl QpEvents for SocketQpEvents {
    /// The peer tore the connection down (spec §7-5: `WSAECONNRESET`).
    fn disconnected(&self) {
        if let Some(s) = self.socket() {
            s.record_failure(WsaError::WSAECONNRESET);
        }
    }

    /// Our own queue pair failed: a local transport failure (§7-5:
    /// `WSAECONNABORTED`), also for the ops it flushed.
    fn failed(&self) {
        if let Some(s) = self.socket() {
            s.record_failure(WsaError::WSAECONNABORTED);
        }
    }
}

/// Listener events of a listening socket: `FD_ACCEPT` (CONN-9).
pub struct SocketListenerEvents(pub Weak<Socket>);

impl ListenerEvents for SocketListenerEvents {
    fn request_arrived(&self) {
        if let Some(s) = self.0.upgrade() {
            if s.gate.is_closing() {
                return;
            }
            let mut c = s.ctl();
            if !s.gate.is_closing() {
                c.record(super::types::FD_ACCEPT_BIT, 0);
            }
        }
    }
}

/// Records an outgoing connection's result (`FD_CONNECT`, CONN-2).
pub fn record_connect(c: &mut Control, result: WsaResult<()>) {
    c.attempt = None;
    let code = match result {
        Ok(()) => {
            c.phase = Phase::Connected;
            0
        }
        Err(e) => {
            c.phase = if c.local.is_some() {
                Phase::Bound
            } else {
                Phase::Open
            };
            e.code()
        }
    };
    c.record(super::types::FD_CONNECT_BIT, code);
}

const _: () = assert!(FD_ACCEPT == 1 << super::types::FD_ACCEPT_BIT);
const _: () = assert!(FD_CONNECT == 1 << super::types::FD_CONNECT_BIT);

/// The life of a descriptor table slot, in bits 30..32 of its word.
const FREE: u64 = 0;
/// Published: lookups with the slot's generation succeed.
const LIVE: u64 = 1 << 30;
/// Removed by close: lookups fail; once the socket was finalized, the last
/// unpin (or gate leave) releases the slot.
const REMOVED: u64 = 2 << 30;
const STATE: u64 = 3 << 30;
/// Close gave up waiting for the gate's count (bit 29): whoever brings it
/// to 0 finalizes. Set only on a `REMOVED` slot; cleared by `reserve`.
const DEFERRED: u64 = 1 << 29;
/// The socket's finalization was claimed (bit 28): exactly once per life
/// of the slot. Cleared by `reserve`.
const FINALIZED: u64 = 1 << 28;
/// One unit of the close gate's count (bits 12..28): a data call inside
/// holds one for its op, a posted op one.
const GATE: u64 = 1 << 12;
/// The close gate's count, in units of [`GATE`].
const GATE_COUNT: u64 = FINALIZED - GATE;
/// A call that finds this many units in the gate is refused (`WSAENOBUFS`),
/// so the count never carries into the flags: half the field, the other
/// half is room for calls that add before they see it.
const GATE_LIMIT: u64 = 1 << 15;
/// The generation, in the high half of the word.
const GENERATION: u64 = !0 << 32;
/// The low bits: pins held (control calls inside, the teardown's of a
/// removed socket, stale lookups about to undo theirs).
const PINS: u64 = GATE - 1;
/// A lookup that finds this many pins (a bit: half the field) waits for
/// some to go (see `SocketTable::pin`), and a data call is refused, so that
/// pins never carry into the gate's count.
const PIN_LIMIT: u64 = GATE / 2;

// The limits are the top bits of the gate's count and of the pins, which
// `enter` tests.
const _: () = assert!(GATE_LIMIT * GATE * 2 == FINALIZED && PIN_LIMIT * 2 == GATE);

/// What a data call adds to its slot's word in [`SocketTable::enter`]: its
/// op's unit in the close gate, which the op keeps once posted (until its
/// completion was signalled), and a pin, which the call gives back when its
/// post returned ([`SocketTable::posted`]). The pin, because the op's
/// completion may be dispatched on another thread before the post returns
/// and even finalize the socket: the pin keeps the socket and its queue
/// pair alive through the post. Not a second gate unit, because a
/// duplication's swap counts the ops in the gate (`dup.rs`).
const CALL: u64 = GATE + 1;

fn word_state(word: u64) -> u64 {
    word & STATE
}

fn word_generation(word: u64) -> u32 {
    (word >> 32) as u32
}

struct TableSlot<T> {
    /// `generation << 32 | state | DEFERRED | FINALIZED | gate count |
    /// pins`. The generation changes only in `reserve` (state `FREE`); the
    /// state goes `FREE → LIVE` in `publish`, `LIVE → REMOVED` in `remove`,
    /// and `REMOVED → FREE` by the one thread that sees the pins and the
    /// gate's count at 0 after removal (`release`). Pins are added by every
    /// control lookup, gate units by every data call (each a single
    /// `fetch_add`, whatever the state, which is why the slot memory lives
    /// as long as the table), and taken away by their unpin or leave. While
    /// a pin or a gate unit taken on a `LIVE` slot of the right generation
    /// is held, `socket` is `Some` and is not changed. All read-modify-
    /// writes of the word are totally ordered, so a call entering the gate
    /// and a close removing the socket cannot miss each other (whichever
    /// comes second sees the first), nor a leave and a deferral both
    /// believe they came last.
    word: AtomicU64,
    /// The table's reference to the socket (`Arc::into_raw`), from
    /// `publish` until `release`. Written only by the reserver of a `FREE`
    /// slot (publish) and by the thread whose compare-exchange took it from
    /// `REMOVED` to `FREE` (release, or the table's drop); read by pin
    /// holders.
    socket: UnsafeCell<Option<NonNull<T>>>,
    /// The socket's completion queue index + 1 (0: none yet), for callers
    /// that look it up without a pin ([`SocketTable::live_cq`]). Written by
    /// the socket's connect or accept before its queue pair exists
    /// ([`SocketTable::set_cq`]) and cleared by `reserve`; a reader that
    /// races a close and the slot's reuse may read the next socket's, which
    /// only makes it poll another queue.
    cq: AtomicU32,
}

impl<T> TableSlot<T> {
    /// A `FREE` slot of generation 0: all zero bits (see `Slots`).
    fn new() -> CachePadded<TableSlot<T>> {
        CachePadded::new(TableSlot {
            word: AtomicU64::new(FREE),
            socket: UnsafeCell::new(None),
            cq: AtomicU32::new(0),
        })
    }
}

/// Free slots, under `SocketTable::free`.
struct Free {
    /// Slots released and not reserved again.
    indices: Vec<u32>,
    /// Slots `fresh..` were never reserved. Its capacity is kept at least
    /// `fresh`, so a push (also from a dispatching thread) never allocates.
    fresh: u32,
}

/// Descriptor → socket. A descriptor is `generation << 32 | (index + 1)`:
/// never 0, never `INVALID_SOCKET`, and a closed descriptor's value does not
/// come back until its slot's 32-bit generation wraps.
///
/// The data path looks a socket up with [`SocketTable::enter`]: one atomic
/// add on the slot's word, no lock and no reference count, which both keeps
/// the socket object alive and enters the socket's close gate (spec §6.1
/// steps 3-5, `gate.rs`): the count of the slot's word counts the data
/// calls inside and the ops they posted. The call gives back its unit when
/// its post returned, the op its own once its completion was signalled
/// ([`SocketTable::leave`]); close removes the socket (later calls are
/// refused) and waits until the count is 0 ([`SocketTable::is_quiet`]), or
/// defers ([`SocketTable::defer`]): whoever brings the count to 0 then
/// finalizes. A successful [`SocketTable::remove`] leaves its pin on the
/// slot: the socket's teardown gives it back ([`SocketTable::unpin_removed`])
/// once it is done with the socket, which the SPI does after the
/// close-handle upcall. So the table's reference is dropped only once the
/// socket was removed, every op left the gate and every pin is gone.
/// Control calls pin ([`SocketTable::pin`]) or take an `Arc`
/// ([`SocketTable::get`]).
pub struct SocketTable<T = Socket> {
    /// Padded: threads spinning on different sockets never share a line.
    /// Resident as used (see `Slots`), never freed before the table: a
    /// lookup may add to any slot's word.
    slots: Slots<CachePadded<TableSlot<T>>>,
    free: ModelMutex<Free>,
}

// SAFETY: the cells hold `Arc<T>`s that are shared between threads only as
// `&T` (T: Sync) and moved out by one thread at a time (the release
// protocol on `word`), as with `Arc<T>` itself.
unsafe impl<T: Send + Sync> Sync for SocketTable<T> {}
// SAFETY: as above; the table owns the `Arc`s.
unsafe impl<T: Send + Sync> Send for SocketTable<T> {}

#[cfg(not(target_pointer_width = "64"))]
compile_error!("sanpath's descriptor encoding assumes 64-bit pointers");

/// A pinned socket: valid while this lives (see [`SocketTable`]).
pub struct Pinned<'a, T = Socket> {
    table: &'a SocketTable<T>,
    /// The slot `index` names, so that the drop needs no lookup.
    slot: &'a TableSlot<T>,
    index: u32,
    /// The socket, kept alive by the pin.
    ptr: NonNull<T>,
}

impl<T> std::ops::Deref for Pinned<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the pin this guard holds keeps the object alive.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for Pinned<'_, T> {
    fn drop(&mut self) {
        self.table.unpin(self.slot, self.index);
    }
}

/// A data call inside its socket's close gate, holding its op's unit and a
/// pin (see [`SocketTable::enter`]). It has no drop: whoever holds it gives
/// them back with [`SocketTable::posted`] (the op keeps its unit) or
/// [`SocketTable::leave_entry`], which may hand it the socket's
/// finalization.
#[must_use]
pub struct Entry<'a, T = Socket> {
    /// The slot the descriptor names.
    slot: &'a TableSlot<T>,
    index: u32,
    /// The socket, kept alive by the gate's count.
    ptr: NonNull<T>,
}

impl<T> std::ops::Deref for Entry<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the entry's units in the gate keep the object alive.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Entry<'_, T> {
    /// The socket for the state of the op this call posts, which keeps one
    /// of the entry's units (see [`SocketTable`]).
    pub fn op_socket(&self) -> OpSocket<T> {
        OpSocket { ptr: self.ptr }
    }
}

/// A refused [`SocketTable::enter`].
pub struct Refused<T = Socket> {
    /// `WSAENOTSOCK`, or `WSAENOBUFS` when the gate is full.
    pub error: WsaError,
    /// The refused call brought a deferred close's count to 0: the caller
    /// must finalize this socket.
    pub finalize: Option<NonNull<T>>,
}

/// The socket of a pending op. Plain data: the op's unit in the socket's
/// close gate, not a pin, keeps the socket alive (see [`SocketTable`]).
pub struct OpSocket<T = Socket> {
    ptr: NonNull<T>,
}

// SAFETY: shares only `&T` (T: Sync) between threads.
unsafe impl<T: Sync> Send for OpSocket<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for OpSocket<T> {}

impl<T> OpSocket<T> {
    /// The placeholder an idle op slot holds: never dereferenced (only a
    /// pending op's socket is).
    pub fn idle() -> OpSocket<T> {
        OpSocket {
            ptr: NonNull::dangling(),
        }
    }

    /// The socket.
    ///
    /// # Safety
    /// The op must not have left its socket's close gate yet: it is
    /// pending, or this is its completion before the gate's `leave`.
    pub unsafe fn get(&self) -> &T {
        // SAFETY: the caller guarantees the op is still in the gate, so the
        // socket is not finalized, so the removal's pin on its slot (or the
        // table's publication, if not removed) keeps the object alive.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> SocketTable<T> {
    /// A table of up to `capacity` sockets; the memory of their slots
    /// becomes resident as they are first used.
    pub fn new(capacity: usize) -> SocketTable<T> {
        assert!(capacity < 1 << 31, "socket table too large");
        SocketTable {
            // SAFETY: `TableSlot::new` is all zero bits: FREE is 0, `None`
            // of a `NonNull` is the null pointer, the padding is padding.
            slots: unsafe { Slots::new(capacity, TableSlot::new) },
            free: ModelMutex::new(Free {
                indices: Vec::new(),
                fresh: 0,
            }),
        }
    }

    /// Reserves a slot and returns the descriptor it will have:
    /// `WSAEMFILE` when `capacity` sockets are live or closing.
    pub fn reserve(&self) -> WsaResult<ProviderSocket> {
        let index = {
            let mut free = lock(&self.free);
            match free.indices.pop() {
                Some(index) => index,
                None if (free.fresh as usize) < self.slots.len() => {
                    let index = free.fresh;
                    free.fresh += 1;
                    // Every slot reserved so far may come back at once.
                    let room = free.fresh as usize - free.indices.len();
                    free.indices.reserve(room);
                    index
                }
                None => return Err(WsaError::WSAEMFILE),
            }
        };
        let slot = self.slot(index);
        slot.cq.store(0, Ordering::Relaxed);
        // Stale lookups may add and undo pins meanwhile; the state stays
        // FREE, which only this reserver changes.
        let mut word = slot.word.load(Ordering::Relaxed);
        loop {
            debug_assert_eq!(word_state(word), FREE);
            let next = (u64::from(word_generation(word).wrapping_add(1)) << 32)
                | (word & (GATE_COUNT | PINS));
            match slot
                .word
                .compare_exchange_weak(word, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Ok(ProviderSocket(
                        ((word_generation(next) as usize) << 32) | (index as usize + 1),
                    ))
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Returns a reserved slot that was never published.
    pub fn unreserve(&self, desc: ProviderSocket) {
        if let Some((index, _, _)) = self.locate(desc) {
            lock(&self.free).indices.push(index);
        }
    }

    /// Makes a reserved descriptor live.
    pub fn publish(&self, desc: ProviderSocket, socket: Arc<T>) {
        let Some((_, generation, slot)) = self.locate(desc) else {
            return;
        };
        // SAFETY: the slot is FREE and reserved by the caller: no pin holder
        // reads the cell and no release writes it (module docs of the word).
        slot.socket
            .with_mut(|p| unsafe { *p = NonNull::new(Arc::into_raw(socket).cast_mut()) });
        let mut word = slot.word.load(Ordering::Relaxed);
        loop {
            debug_assert_eq!(word_state(word), FREE);
            debug_assert_eq!(word_generation(word), generation);
            // Release: a pin that sees LIVE sees the socket.
            match slot.word.compare_exchange_weak(
                word,
                word | LIVE,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    /// Whether `desc` names a live socket now: one load, no pin, for a call
    /// that must validate its descriptor but reaches nothing of the socket.
    pub fn is_live(&self, desc: ProviderSocket) -> bool {
        self.locate(desc).is_some_and(|(_, generation, slot)| {
            let word = slot.word.load(Ordering::Acquire);
            word_state(word) == LIVE && word_generation(word) == generation
        })
    }

    /// Records the completion queue of the socket `desc` names (see
    /// `TableSlot::cq`).
    pub fn set_cq(&self, desc: ProviderSocket, cq: usize) {
        if let Some((_, _, slot)) = self.locate(desc) {
            let v = u32::try_from(cq).map_or(0, |c| c.wrapping_add(1));
            slot.cq.store(v, Ordering::Relaxed);
        }
    }

    /// For a call that needs the socket's completion queue but nothing of
    /// the socket itself: `None` if `desc` names no live socket now, else
    /// its CQ index (`None` before it has one). Loads only, no pin.
    #[inline]
    pub fn live_cq(&self, desc: ProviderSocket) -> Option<Option<usize>> {
        let (_, generation, slot) = self.locate(desc)?;
        let word = slot.word.load(Ordering::Acquire);
        if word_state(word) != LIVE || word_generation(word) != generation {
            return None;
        }
        Some(match slot.cq.load(Ordering::Relaxed) {
            0 => None,
            c => Some(c as usize - 1),
        })
    }

    /// Pins the live socket `desc` names: `None` if it is not (or no longer)
    /// live. No lock, one atomic add (two on failure).
    #[inline(always)]
    pub fn pin(&self, desc: ProviderSocket) -> Option<Pinned<'_, T>> {
        let (index, generation, slot) = self.locate(desc)?;
        // Acquire: pairs with publish's release, so the socket is visible.
        let was = slot.word.fetch_add(1, Ordering::Acquire);
        if was & PIN_LIMIT != 0 {
            self.unpin(slot, index);
            return self.pin_crowded(desc);
        }
        if word_state(was) == LIVE && word_generation(was) == generation {
            // SAFETY: pinned on a LIVE slot of this generation: the cell
            // holds the socket and keeps it until our unpin.
            let ptr = slot.socket.with(|p| unsafe { *p });
            debug_assert!(ptr.is_some(), "live slot without a socket");
            if let Some(ptr) = ptr {
                return Some(Pinned {
                    table: self,
                    slot,
                    index,
                    ptr,
                });
            }
        }
        self.unpin(slot, index);
        None
    }

    /// [`SocketTable::pin`] of a slot that thousands of threads pin at
    /// once: waits for some of them to go.
    #[cold]
    #[inline(never)]
    fn pin_crowded(&self, desc: ProviderSocket) -> Option<Pinned<'_, T>> {
        crate::sync::thread::yield_now();
        self.pin(desc)
    }

    /// Enters a data call into the close gate of the live socket `desc`
    /// (one atomic add of its op's gate unit and a pin on its slot's word,
    /// no lock): the socket is alive, and close waits for the op, until
    /// they are given back ([`SocketTable::posted`] and
    /// [`SocketTable::leave`], or [`SocketTable::leave_entry`]).
    #[inline(always)]
    pub fn enter(&self, desc: ProviderSocket) -> Result<Entry<'_, T>, Refused<T>> {
        let Some((index, generation, slot)) = self.locate(desc) else {
            return Err(Refused {
                error: WsaError::WSAENOTSOCK,
                finalize: None,
            });
        };
        // Acquire: pairs with publish's release, so the socket is visible.
        // SeqCst (the instruction is the same): a duplication's swap reads
        // the count after a SeqCst store of its flag, which the call loads
        // after entering (`dup.rs`).
        let was = slot.word.fetch_add(CALL, Ordering::SeqCst);
        // One test: LIVE, this generation, and the count and the pins
        // below their limits (their top bits clear).
        let expect = (u64::from(generation) << 32) | LIVE;
        if (was ^ expect) & (GENERATION | STATE | (GATE_LIMIT * GATE) | PIN_LIMIT) == 0 {
            // SAFETY: entered on a LIVE slot of this generation: the cell
            // holds the socket and keeps it until the units are given back.
            if let Some(ptr) = slot.socket.with(|p| unsafe { *p }) {
                return Ok(Entry { slot, index, ptr });
            }
            debug_assert!(false, "live slot without a socket");
        }
        Err(self.refuse(slot, index, was, generation))
    }

    /// Undoes a refused [`SocketTable::enter`] (the word as the add found
    /// it: `was`).
    #[cold]
    #[inline(never)]
    fn refuse(&self, slot: &TableSlot<T>, index: u32, was: u64, generation: u32) -> Refused<T> {
        let live = word_state(was) == LIVE && word_generation(was) == generation;
        Refused {
            error: if live {
                WsaError::WSAENOBUFS
            } else {
                WsaError::WSAENOTSOCK
            },
            finalize: self
                .leave_units(slot, index, CALL)
                // SAFETY: the finalization was claimed by this thread, so
                // the removal's pin is held: the cell keeps the socket.
                .then(|| slot.socket.with(|p| unsafe { *p }))
                .flatten(),
        }
    }

    /// A call that posted nothing gives back all it entered with. `true`:
    /// the caller brought a deferred close's count to 0 and must finalize
    /// the socket (which is alive until then).
    #[inline(always)]
    #[must_use]
    pub fn leave_entry(&self, entry: &Entry<'_, T>) -> bool {
        self.leave_units(entry.slot, entry.index, CALL)
    }

    /// The call posted its op: it gives back its pin, the op keeps its
    /// unit in the gate (until [`SocketTable::leave`]).
    #[inline(always)]
    pub fn posted(&self, entry: &Entry<'_, T>) {
        self.unpin(entry.slot, entry.index);
    }

    /// A posted op of the socket `desc` names is over (its completion was
    /// signalled): its unit leaves the gate. `true` as for
    /// [`SocketTable::leave_entry`].
    #[inline]
    #[must_use]
    pub fn leave(&self, desc: ProviderSocket) -> bool {
        match self.locate(desc) {
            Some((index, _, slot)) => self.leave_units(slot, index, GATE),
            None => {
                debug_assert!(false, "an op of a socket the table never had");
                false
            }
        }
    }

    /// Takes `delta` ([`GATE`] or [`CALL`]) off the slot's word.
    #[inline(always)]
    fn leave_units(&self, slot: &TableSlot<T>, index: u32, delta: u64) -> bool {
        // Release: the call's or op's use of the socket (its completion
        // signalled) happens before whoever sees the count at 0 finalizes.
        let was = slot.word.fetch_sub(delta, Ordering::Release);
        debug_assert!(was & GATE_COUNT >= GATE, "left the gate more than entered");
        let now = was - delta;
        // Only a removed socket can be deferred or released; a stale call
        // leaving a slot released already (FREE) must touch nothing.
        if now & (GATE_COUNT | STATE) == REMOVED {
            return self.last_out(slot, index, now);
        }
        false
    }

    /// The gate's count went to 0 on a removed slot (`now`): a deferred
    /// close is finalized by this thread (if no one claimed it), or, if the
    /// socket is finalized and unpinned already (the units were a stale
    /// call's), the slot is released.
    #[cold]
    #[inline(never)]
    fn last_out(&self, slot: &TableSlot<T>, index: u32, now: u64) -> bool {
        if now & PINS == 0 {
            self.release(slot, index, now);
            return false;
        }
        now & DEFERRED != 0 && Self::claim(slot, word_generation(now))
    }

    /// Claims the finalization of the removed socket of `generation` in
    /// this slot: `true` once per life of the slot. A compare-exchange, not
    /// an `or`: a thread that saw the count reach 0 may claim late, when
    /// another finalized the socket meanwhile and the slot went on to the
    /// next socket, whose word must stay untouched.
    fn claim(slot: &TableSlot<T>, generation: u32) -> bool {
        let mut word = slot.word.load(Ordering::Relaxed);
        loop {
            if word_generation(word) != generation
                || word_state(word) != REMOVED
                || word & FINALIZED != 0
            {
                return false;
            }
            // Acquire: every leave's release (one release sequence on the
            // word) happens before the finalization.
            match slot.word.compare_exchange_weak(
                word,
                word | FINALIZED,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// Whether no data call and no op of the removed socket `desc` is in
    /// its close gate (also when the slot went on to another socket: that
    /// one's ops are not `desc`'s).
    pub fn is_quiet(&self, desc: ProviderSocket) -> bool {
        self.in_flight(desc) == 0
    }

    /// Ops in the close gate of the socket `desc` names: entered, posted
    /// or about to be, and not yet signalled (0 once the slot went on to
    /// another socket).
    pub fn in_flight(&self, desc: ProviderSocket) -> usize {
        let Some((_, generation, slot)) = self.locate(desc) else {
            return 0;
        };
        let word = slot.word.load(Ordering::SeqCst);
        if word_generation(word) != generation || word_state(word) == FREE {
            return 0;
        }
        ((word & GATE_COUNT) / GATE) as usize
    }

    /// Close of the removed socket `desc` gives up waiting: the call or op
    /// that brings the gate's count to 0 finalizes. `true` if the caller
    /// must finalize now (nothing is in the gate and nobody claimed it).
    #[must_use]
    pub fn defer(&self, desc: ProviderSocket) -> bool {
        let Some((_, generation, slot)) = self.locate(desc) else {
            return false;
        };
        debug_assert_eq!(word_state(slot.word.load(Ordering::Relaxed)), REMOVED);
        let was = slot.word.fetch_or(DEFERRED, Ordering::AcqRel);
        was & GATE_COUNT == 0 && Self::claim(slot, generation)
    }

    /// Claims the finalization of the removed socket `desc` after its gate
    /// was seen quiet: `true` for exactly one caller (a close that waited,
    /// a deferral, the last to leave a deferred gate).
    #[must_use]
    pub fn claim_finalize(&self, desc: ProviderSocket) -> bool {
        self.locate(desc).is_some_and(|(_, generation, slot)| {
            debug_assert_eq!(word_state(slot.word.load(Ordering::Relaxed)), REMOVED);
            Self::claim(slot, generation)
        })
    }

    /// Gives back the pin a successful [`SocketTable::remove`] of `desc`
    /// left on its slot: the caller is done with the socket (which may be
    /// released now, if no other pin is held).
    pub fn unpin_removed(&self, desc: ProviderSocket) {
        let Some((index, _, slot)) = self.locate(desc) else {
            debug_assert!(false, "no slot for a removed socket");
            return;
        };
        debug_assert_eq!(word_state(slot.word.load(Ordering::Relaxed)), REMOVED);
        self.unpin(slot, index);
    }

    /// The socket as an `Arc` (control calls).
    pub fn get(&self, desc: ProviderSocket) -> WsaResult<Arc<T>> {
        let pinned = self.pin(desc).ok_or(WsaError::WSAENOTSOCK)?;
        Ok(self.arc(&pinned))
    }

    /// Removes a live socket: later lookups fail `WSAENOTSOCK`. Exactly one
    /// of concurrent removals succeeds; it leaves a pin on the slot, which
    /// the caller gives back with [`SocketTable::unpin_removed`] when the
    /// socket's teardown is done (the last unpin releases the slot).
    pub fn remove(&self, desc: ProviderSocket) -> WsaResult<Arc<T>> {
        let pinned = self.pin(desc).ok_or(WsaError::WSAENOTSOCK)?;
        let socket = self.arc(&pinned);
        let slot = pinned.slot;
        let mut word = slot.word.load(Ordering::Relaxed);
        loop {
            if word_state(word) != LIVE {
                return Err(WsaError::WSAENOTSOCK);
            }
            match slot.word.compare_exchange_weak(
                word,
                (word & !STATE) | REMOVED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // The teardown's pin, from now on.
                    std::mem::forget(pinned);
                    return Ok(socket);
                }
                Err(actual) => word = actual,
            }
        }
    }

    /// Every live socket.
    pub fn all(&self) -> Vec<Arc<T>> {
        let fresh = lock(&self.free).fresh as usize;
        (0..fresh)
            .filter_map(|i| {
                let word = self.slots.get(i)?.word.load(Ordering::Relaxed);
                let desc = ((word_generation(word) as usize) << 32) | (i + 1);
                self.get(ProviderSocket(desc)).ok()
            })
            .collect()
    }

    fn arc(&self, pinned: &Pinned<'_, T>) -> Arc<T> {
        let ptr = pinned.ptr.as_ptr().cast_const();
        // SAFETY: pinned, so the cell still holds the table's reference, an
        // `Arc::into_raw` of this pointer: taking one more is sound.
        unsafe {
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        }
    }

    /// Gives back a pin on slot `index` (`slot`).
    #[inline]
    fn unpin(&self, slot: &TableSlot<T>, index: u32) {
        // Release: this pin's use of the socket happens before its release.
        let was = slot.word.fetch_sub(1, Ordering::Release);
        debug_assert!(was & PINS >= 1, "socket slot unpinned more than pinned");
        if word_state(was) == REMOVED && was & (PINS | GATE_COUNT) == 1 {
            self.release(slot, index, was - 1);
        }
    }

    /// Frees a removed slot whose pins and gate count reached 0 (`word`),
    /// unless a lookup pinned or entered it again meanwhile (its unpin or
    /// leave then comes here).
    #[cold]
    #[inline(never)]
    fn release(&self, slot: &TableSlot<T>, index: u32, word: u64) {
        // Acquire: every earlier unpin's release (the RMWs on the word form
        // one release sequence) happens before the socket is dropped.
        if slot
            .word
            .compare_exchange(word, word & !STATE, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // SAFETY: this thread moved the slot to FREE with no pin held: no
        // reader of the cell is left, and none can come (a pin now sees
        // FREE), nor can a reserve before the index is pushed below.
        let socket = slot.socket.with_mut(|p| unsafe { (*p).take() });
        lock(&self.free).indices.push(index);
        // SAFETY: the table's reference, made by `Arc::into_raw` in publish
        // and taken out of the cell above, so given back once.
        drop(socket.map(|p| unsafe { Arc::from_raw(p.as_ptr().cast_const()) }));
    }

    /// The slot index, generation and slot a descriptor names (the
    /// generation not checked against the slot's): `None` if the table
    /// never grew that far.
    #[inline]
    fn locate(&self, desc: ProviderSocket) -> Option<(u32, u32, &TableSlot<T>)> {
        let low = (desc.0 & 0xFFFF_FFFF) as u32;
        let generation = (desc.0 >> 32) as u32;
        let index = low.checked_sub(1)?;
        let slot = self.slots.get(index as usize)?;
        Some((index, generation, slot))
    }

    /// A slot the caller knows was grown (it reserved it).
    fn slot(&self, index: u32) -> &TableSlot<T> {
        self.slots
            .get(index as usize)
            .expect("a reserved slot exists")
    }
}

impl<T> Drop for SocketTable<T> {
    /// Gives back the references the table still holds (sockets never
    /// closed, or closed with a pin that was never given back).
    fn drop(&mut self) {
        let fresh = lock(&self.free).fresh as usize;
        for i in 0..fresh {
            let Some(slot) = self.slots.get(i) else { break };
            // SAFETY: `&mut self`: no pin holder or releaser is left.
            if let Some(p) = slot.socket.with_mut(|p| unsafe { (*p).take() }) {
                // SAFETY: the table's reference (`Arc::into_raw` in publish),
                // taken out of its cell, so given back once.
                drop(unsafe { Arc::from_raw(p.as_ptr().cast_const()) });
            }
        }
    }
}

fn lock<T>(m: &ModelMutex<T>) -> ModelGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_closed_descriptor_never_finds_the_slots_next_socket() {
        let table = SocketTable::<u32>::new(1);
        let a = table.reserve().unwrap();
        assert!(table.pin(a).is_none(), "reserved, not yet published");
        assert!(!table.is_live(a), "reserved, not yet published");
        table.publish(a, Arc::new(1));
        assert_eq!(table.pin(a).map(|p| *p), Some(1));
        assert!(table.is_live(a));
        assert_eq!(table.reserve().unwrap_err(), WsaError::WSAEMFILE);
        assert_eq!(*table.remove(a).unwrap(), 1);
        assert_eq!(table.remove(a).unwrap_err(), WsaError::WSAENOTSOCK);
        assert!(table.pin(a).is_none());
        assert_eq!(
            table.reserve().unwrap_err(),
            WsaError::WSAEMFILE,
            "the removal's pin keeps the slot"
        );
        table.unpin_removed(a);
        let b = table.reserve().unwrap();
        assert_ne!(a, b);
        table.publish(b, Arc::new(2));
        assert!(table.pin(a).is_none(), "stale descriptor");
        assert!(!table.is_live(a), "stale descriptor live");
        assert!(table.is_live(b));
        assert_eq!(table.get(b).map(|s| *s), Ok(2));
        assert_eq!(table.all().len(), 1);
    }

    #[test]
    fn the_table_grows_with_use_up_to_its_capacity() {
        let cap = 100;
        let table = SocketTable::<usize>::new(cap);
        // A descriptor naming a slot the table has not grown yet is no
        // socket (and no crash).
        let far = ProviderSocket((1 << 32) | (cap - 1 + 1));
        assert!(table.pin(far).is_none() && !table.is_live(far));
        assert_eq!(table.remove(far).unwrap_err(), WsaError::WSAENOTSOCK);
        let descs: Vec<_> = (0..cap)
            .map(|k| {
                let d = table.reserve().unwrap();
                table.publish(d, Arc::new(k));
                d
            })
            .collect();
        assert_eq!(table.reserve().unwrap_err(), WsaError::WSAEMFILE);
        for (k, &d) in descs.iter().enumerate() {
            assert_eq!(table.pin(d).map(|p| *p), Some(k));
        }
        assert_eq!(table.all().len(), cap);
        // Every slot comes back, and the free list holds them all.
        for &d in &descs {
            drop(table.remove(d).unwrap());
            table.unpin_removed(d);
        }
        assert!(table.all().is_empty());
        assert_eq!(lock(&table.free).indices.len(), cap);
        assert!(table.reserve().is_ok());
    }

    #[test]
    fn a_dropped_table_gives_back_every_socket_it_held() {
        let socket = Arc::new(5);
        let table = SocketTable::<u32>::new(4);
        for _ in 0..3 {
            let d = table.reserve().unwrap();
            table.publish(d, socket.clone());
        }
        let closed = table.reserve().unwrap();
        table.publish(closed, socket.clone());
        drop(table.remove(closed).unwrap());
        assert_eq!(
            Arc::strong_count(&socket),
            5,
            "three live, one closed but not torn down"
        );
        drop(table);
        assert_eq!(Arc::strong_count(&socket), 1);
    }

    /// A call's units and its op's keep a removed socket, close's deferral
    /// hands the finalization to whoever leaves last, once, and the slot is
    /// released only after the teardown's unpin.
    #[test]
    fn the_gate_on_the_slot_counts_calls_and_ops_and_the_last_out_finalizes() {
        let table = SocketTable::<u32>::new(1);
        let a = table.reserve().unwrap();
        let socket = Arc::new(7);
        table.publish(a, socket.clone());
        let call = table.enter(a).ok().unwrap();
        assert_eq!((*call, table.in_flight(a)), (7, 1));
        let op = call.op_socket();
        table.posted(&call);
        assert_eq!(table.in_flight(a), 1, "posted: the op keeps its unit");
        drop(table.remove(a).unwrap());
        let refused = table.enter(a).err().unwrap();
        assert_eq!(refused.error, WsaError::WSAENOTSOCK, "removed");
        assert!(refused.finalize.is_none());
        assert!(!table.is_quiet(a), "the op is in flight");
        assert!(!table.defer(a), "close defers while the op is in flight");
        // SAFETY: the op has not left the gate.
        assert_eq!(unsafe { *op.get() }, 7);
        assert!(table.leave(a), "the last op out after a deferral finalizes");
        assert!(table.is_quiet(a));
        assert!(!table.claim_finalize(a), "exactly once");
        assert_eq!(Arc::strong_count(&socket), 2, "the removal's pin keeps it");
        table.unpin_removed(a);
        assert_eq!(Arc::strong_count(&socket), 1, "released with the last pin");
        let b = table.reserve().unwrap();
        assert!(
            table.is_quiet(a) && table.in_flight(a) == 0,
            "the next life"
        );
        assert!(table.reserve().is_err(), "one slot");
        table.publish(b, Arc::new(8));
        assert!(table.enter(a).is_err(), "a stale descriptor");
        assert_eq!(table.in_flight(b), 0, "the stale call left");
    }

    /// A call refused on a removed socket may be the one that brings a
    /// deferred close's count to 0 (its add hid the count from the op that
    /// left before it): it must then finalize.
    #[test]
    fn a_refused_call_that_leaves_last_finalizes() {
        let table = SocketTable::<u32>::new(1);
        let a = table.reserve().unwrap();
        table.publish(a, Arc::new(3));
        let call = table.enter(a).ok().unwrap();
        table.posted(&call);
        drop(table.remove(a).unwrap());
        assert!(!table.defer(a));
        // A call's add lands; the op leaves; then the call sees REMOVED.
        let (index, generation, slot) = table.locate(a).unwrap();
        let was = slot.word.fetch_add(CALL, Ordering::Acquire);
        assert!(!table.leave(a), "the refused call's units still count");
        let refused = table.refuse(slot, index, was, generation);
        assert_eq!(refused.error, WsaError::WSAENOTSOCK);
        // SAFETY: this thread was handed the finalization.
        assert_eq!(refused.finalize.map(|p| unsafe { *p.as_ref() }), Some(3));
        assert!(!table.claim_finalize(a), "exactly once");
        table.unpin_removed(a);
        assert!(table.reserve().is_ok(), "released");
    }

    /// A full gate refuses calls with `WSAENOBUFS`, and the count never
    /// reaches the flags.
    #[test]
    fn a_full_gate_refuses_calls_without_touching_the_flags() {
        let table = SocketTable::<u32>::new(1);
        let a = table.reserve().unwrap();
        table.publish(a, Arc::new(1));
        let (_, _, slot) = table.locate(a).unwrap();
        slot.word
            .fetch_add((GATE_LIMIT - 1) * GATE, Ordering::Relaxed);
        let call = table.enter(a).ok().expect("one below the limit");
        let refused = table.enter(a).err().unwrap();
        assert_eq!(refused.error, WsaError::WSAENOBUFS);
        assert!(refused.finalize.is_none());
        assert!(!table.leave_entry(&call));
        let word = slot.word.load(Ordering::Relaxed);
        assert_eq!(word & (DEFERRED | FINALIZED), 0);
        assert_eq!(table.in_flight(a), GATE_LIMIT as usize - 1);
        assert!(table.pin(a).is_some(), "pins are apart from the count");
    }
}

/// loom models of the descriptor table: a pin keeps the socket alive, the
/// slot is released exactly once (by whoever drops the last pin after
/// removal), and a stale descriptor never reaches the slot's next socket.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::thread;

    /// A lookup races close and the reuse of the slot. While the lookup's
    /// pin is held, the table still holds its reference (the probe `Arc`
    /// counts it); the stale descriptor never finds the new socket; at the
    /// end the table holds no reference to the first socket.
    #[test]
    fn loom_pin_racing_remove_and_reuse() {
        crate::sync::model("pin_racing_remove_and_reuse", 3, || {
            let table = loom::sync::Arc::new(SocketTable::<u32>::new(1));
            let desc = table.reserve().unwrap();
            let first = Arc::new(1u32);
            table.publish(desc, first.clone());
            let lookup = {
                let table = table.clone();
                let probe = first.clone();
                thread::spawn(move || {
                    if let Some(p) = table.pin(desc) {
                        assert_eq!(*p, 1, "a stale descriptor reached a later socket");
                        // Ours, the main thread's and the table's.
                        assert!(Arc::strong_count(&probe) >= 3, "released while pinned");
                    }
                })
            };
            drop(table.remove(desc).unwrap());
            assert!(table.remove(desc).is_err(), "removed twice");
            table.unpin_removed(desc);
            // The slot comes back once the lookup's pin (if any) is gone.
            if let Ok(next) = table.reserve() {
                assert_ne!(next, desc);
                table.publish(next, Arc::new(2));
                assert!(table.pin(desc).is_none());
                assert_eq!(table.pin(next).map(|p| *p), Some(2));
            }
            lookup.join().unwrap();
            assert_eq!(Arc::strong_count(&first), 1, "the table kept its reference");
        });
    }

    /// A socket's finalization in the models: it happens once, after
    /// every op's completion, and gives the removal's pin back.
    struct Teardown {
        table: loom::sync::Arc<SocketTable<u32>>,
        desc: ProviderSocket,
        /// Ops completed (signalled), and whether the socket was finalized.
        log: crate::sync::Mutex<(u32, bool)>,
    }

    impl Teardown {
        fn finalize(&self, started: &crate::sync::AtomicUsize) {
            let mut log = self.log.lock().unwrap();
            assert!(!log.1, "finalized twice");
            assert_eq!(
                log.0 as usize,
                started.load(Ordering::Relaxed),
                "finalized before every started op completed"
            );
            log.1 = true;
            drop(log);
            self.table.unpin_removed(self.desc);
        }

        /// The completion of a posted op: signalled, then it leaves.
        fn complete(&self, started: &crate::sync::AtomicUsize) {
            self.log.lock().unwrap().0 += 1;
            if self.table.leave(self.desc) {
                self.finalize(started);
            }
        }
    }

    /// A call posts an op whose completion runs on another thread, possibly
    /// before the call's post returned; a close removes the socket and
    /// either waits once or defers. The socket is finalized exactly once,
    /// after the op's completion (if it started), by whoever came last;
    /// the call's unit keeps the socket through its post; the slot is
    /// released at the end.
    #[test]
    fn loom_a_call_its_completion_and_a_close() {
        for wait in [false, true] {
            crate::sync::model("a_call_its_completion_and_a_close", 3, move || {
                let table = loom::sync::Arc::new(SocketTable::<u32>::new(1));
                let desc = table.reserve().unwrap();
                let first = Arc::new(1u32);
                table.publish(desc, first.clone());
                let t = loom::sync::Arc::new(Teardown {
                    table: table.clone(),
                    desc,
                    log: crate::sync::Mutex::new((0, false)),
                });
                let started = loom::sync::Arc::new(crate::sync::AtomicUsize::new(0));
                // The fabric: a posted op, completed by the dispatcher.
                let posted = loom::sync::Arc::new(crate::sync::Mutex::new(false));
                let caller = {
                    let (t, started, posted, probe) =
                        (t.clone(), started.clone(), posted.clone(), first.clone());
                    thread::spawn(move || match t.table.enter(t.desc) {
                        Ok(call) => {
                            started.store(1, Ordering::Relaxed);
                            *posted.lock().unwrap() = true;
                            // Still inside the post: the call's unit.
                            assert_eq!(*call, 1);
                            assert!(Arc::strong_count(&probe) >= 3, "released in a post");
                            t.table.posted(&call);
                        }
                        Err(refused) => {
                            if refused.finalize.is_some() {
                                t.finalize(&started);
                            }
                        }
                    })
                };
                let dispatcher = {
                    let (t, started, posted) = (t.clone(), started.clone(), posted.clone());
                    thread::spawn(move || {
                        let op = std::mem::take(&mut *posted.lock().unwrap());
                        if op {
                            t.complete(&started);
                        }
                    })
                };
                drop(t.table.remove(desc).unwrap());
                if wait && table.is_quiet(desc) {
                    if table.claim_finalize(desc) {
                        t.finalize(&started);
                    }
                } else if table.defer(desc) {
                    t.finalize(&started);
                }
                caller.join().unwrap();
                dispatcher.join().unwrap();
                // The NIC flushes what is left.
                let op = std::mem::take(&mut *posted.lock().unwrap());
                if op {
                    t.complete(&started);
                }
                let log = *t.log.lock().unwrap();
                assert_eq!(log.0 as usize, started.load(Ordering::Relaxed));
                if !wait {
                    assert!(log.1, "a deferred close was never finalized");
                } else if !log.1 {
                    // The close that looked once found the op in flight and
                    // gave up: the deferral the real close then makes.
                    if table.defer(desc) {
                        t.finalize(&started);
                    }
                    assert!(t.log.lock().unwrap().1, "never finalized");
                }
                assert_eq!(Arc::strong_count(&first), 1, "the table kept its reference");
                assert!(table.reserve().is_ok(), "the slot was not released");
            });
        }
    }

    /// A stale call on a slot being closed and reused: its units never
    /// make a socket finalized twice or released early, and it never
    /// reaches the next socket.
    #[test]
    fn loom_a_stale_call_racing_a_deferred_close_and_reuse() {
        crate::sync::model("a_stale_call_racing_a_deferred_close_and_reuse", 3, || {
            let table = loom::sync::Arc::new(SocketTable::<u32>::new(1));
            let desc = table.reserve().unwrap();
            let first = Arc::new(1u32);
            table.publish(desc, first.clone());
            let finals = loom::sync::Arc::new(crate::sync::Mutex::new(0));
            let stale = {
                let (table, finals) = (table.clone(), finals.clone());
                thread::spawn(move || match table.enter(desc) {
                    Ok(call) => {
                        assert_eq!(*call, 1, "a stale descriptor reached a later socket");
                        if table.leave_entry(&call) {
                            *finals.lock().unwrap() += 1;
                            table.unpin_removed(desc);
                        }
                    }
                    Err(refused) => {
                        if refused.finalize.is_some() {
                            *finals.lock().unwrap() += 1;
                            table.unpin_removed(desc);
                        }
                    }
                })
            };
            drop(table.remove(desc).unwrap());
            if table.defer(desc) {
                *finals.lock().unwrap() += 1;
                table.unpin_removed(desc);
            }
            if let Ok(next) = table.reserve() {
                table.publish(next, Arc::new(2));
                assert_eq!(table.pin(next).map(|p| *p), Some(2));
            }
            stale.join().unwrap();
            assert_eq!(*finals.lock().unwrap(), 1, "finalized once");
            assert_eq!(Arc::strong_count(&first), 1, "the table kept its reference");
        });
    }
}
