//! The SAN socket object and the descriptor table.
//!
//! A socket is an `Arc`. The descriptor table holds one reference from
//! publication until close removed the socket (after which lookups fail
//! `WSAENOTSOCK`) *and* the last pin on its slot is gone: a data call pins
//! the slot for its duration, and the removal leaves a pin of its own that
//! the socket's finalization gives back, after its last op left the close
//! gate (see [`SocketTable`]). So a pending op needs no pin: its entry in
//! the gate keeps the socket. Control calls and close hold `Arc`s. Nothing of a socket is released before `close_socket` (spec §6.1
//! step 5): peer-detected failures only change `fail`.

use super::dup::DupState;
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
/// Removed by close: lookups fail; the last unpin releases the slot.
const REMOVED: u64 = 2 << 30;
const STATE: u64 = 3 << 30;
/// The low bits: pins held (calls inside, the teardown's of a removed
/// socket, stale lookups about to undo theirs).
const PINS: u64 = LIVE - 1;

fn word_state(word: u64) -> u64 {
    word & STATE
}

fn word_generation(word: u64) -> u32 {
    (word >> 32) as u32
}

struct TableSlot<T> {
    /// `generation << 32 | state | pins`. The generation changes only in
    /// `reserve` (state `FREE`); the state goes `FREE → LIVE` in `publish`,
    /// `LIVE → REMOVED` in `remove`, and `REMOVED → FREE` by the one thread
    /// that sees the pins at 0 after removal (`release`). Pins are added by
    /// every lookup (a single `fetch_add`, whatever the state, which is why
    /// the slot memory lives as long as the table) and taken away by its
    /// unpin. While a pin taken on a `LIVE` slot of the right generation is
    /// held, `socket` is `Some` and is not changed.
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
/// The data path looks a socket up with [`SocketTable::pin`]: one atomic
/// add on the slot's word, no lock and no reference count. The pin keeps the
/// socket object alive (the table's reference is dropped only once removal
/// happened and every pin is gone). A successful [`SocketTable::remove`]
/// leaves its pin on the slot: the socket's teardown gives it back
/// ([`SocketTable::unpin_removed`]) once it is done with the socket, which
/// the SPI does after the close-handle upcall, when every op has left the
/// close gate. So an op that started needs no pin of its own: until it
/// leaves the gate the socket cannot be finalized, hence not released.
/// Control calls take an `Arc` the same way ([`SocketTable::get`]).
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

impl<T> Pinned<'_, T> {
    /// The socket for the state of an op this call starts. It holds no pin:
    /// the op's entry in the socket's close gate keeps the socket alive
    /// until the op leaves it (see [`SocketTable`]).
    pub fn op_socket(&self) -> OpSocket<T> {
        OpSocket { ptr: self.ptr }
    }
}

impl<T> Drop for Pinned<'_, T> {
    fn drop(&mut self) {
        self.table.unpin(self.slot, self.index);
    }
}

/// The socket of a pending op. Plain data: the op's entry in the socket's
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
        assert!(capacity < PINS as usize, "socket table too large");
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
            let next = (u64::from(word_generation(word).wrapping_add(1)) << 32) | (word & PINS);
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
    #[inline]
    pub fn pin(&self, desc: ProviderSocket) -> Option<Pinned<'_, T>> {
        let (index, generation, slot) = self.locate(desc)?;
        // Acquire: pairs with publish's release, so the socket is visible.
        let was = slot.word.fetch_add(1, Ordering::Acquire);
        debug_assert!(was & PINS < PINS - 1, "socket slot pin overflow");
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
        if word_state(was) == REMOVED && was & PINS == 1 {
            self.release(slot, index, was - 1);
        }
    }

    /// Frees a removed slot whose pins reached 0 (`word`), unless a lookup
    /// pinned it again meanwhile (its unpin then comes here).
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

    #[test]
    fn a_removed_socket_lives_until_its_teardown_and_every_call_is_done() {
        let table = SocketTable::<u32>::new(1);
        let a = table.reserve().unwrap();
        let socket = Arc::new(7);
        table.publish(a, socket.clone());
        let call = table.pin(a).unwrap();
        // An op started by the call holds no pin, only a pointer.
        let op = call.op_socket();
        drop(table.remove(a).unwrap());
        table.unpin_removed(a);
        assert_eq!(Arc::strong_count(&socket), 2, "the call's pin keeps it");
        assert_eq!(*call, 7);
        drop(call);
        assert_eq!(Arc::strong_count(&socket), 1, "released with the last pin");
        assert!(table.reserve().is_ok());
        let _ = op;
        let b = table.reserve();
        assert!(b.is_err(), "one slot");
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

    /// Two closes race a call that started an op, whose completion runs on
    /// another thread, possibly before the call returned from its post. The
    /// op holds no pin: its entry in the close gate (here a count) keeps the
    /// socket, since the close that wins finalizes (gives the removal's pin
    /// back) only once the op left the gate. The call's pin keeps the socket
    /// until the call is done; the slot is released once, after both.
    #[test]
    fn loom_an_op_in_the_gate_outlives_racing_closes() {
        crate::sync::model("an_op_in_the_gate_outlives_racing_closes", 3, || {
            let table = loom::sync::Arc::new(SocketTable::<u32>::new(1));
            let desc = table.reserve().unwrap();
            let first = Arc::new(1u32);
            table.publish(desc, first.clone());
            let in_gate = loom::sync::Arc::new(crate::sync::AtomicUsize::new(1));
            let call = table.pin(desc).unwrap();
            let op = call.op_socket();
            let completion = {
                let (probe, in_gate) = (first.clone(), in_gate.clone());
                thread::spawn(move || {
                    // SAFETY: the op has not left the gate yet.
                    assert_eq!(unsafe { *op.get() }, 1);
                    assert!(Arc::strong_count(&probe) >= 3, "released under an op");
                    in_gate.fetch_sub(1, Ordering::Release);
                })
            };
            let close = move |table: &SocketTable<u32>, in_gate: &crate::sync::AtomicUsize| {
                if table.remove(desc).is_err() {
                    return false;
                }
                while in_gate.load(Ordering::Acquire) != 0 {
                    thread::yield_now();
                }
                table.unpin_removed(desc);
                true
            };
            let closer = {
                let (table, in_gate) = (table.clone(), in_gate.clone());
                thread::spawn(move || close(&table, &in_gate))
            };
            let mine = close(&table, &in_gate);
            // Still inside the call: its pin keeps the socket.
            assert_eq!(*call, 1);
            assert!(Arc::strong_count(&first) >= 2, "released under the call");
            drop(call);
            let theirs = closer.join().unwrap();
            assert!(mine ^ theirs, "exactly one close removes the socket");
            completion.join().unwrap();
            assert_eq!(Arc::strong_count(&first), 1, "the table kept its reference");
            assert!(table.reserve().is_ok(), "the slot was not released");
        });
    }
}
