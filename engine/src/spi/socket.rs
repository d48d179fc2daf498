//! The SAN socket object and the descriptor table.
//!
//! A socket is reference counted: the table holds one reference until
//! `close_socket` removes it (after which lookups fail `WSAENOTSOCK`), each
//! pending op holds one, and a call that looked the socket up holds one for
//! its duration. Nothing of a socket is released before `close_socket`
//! (spec §6.1 step 5): peer-detected failures only change `fail`.

use super::gate::CloseGate;
use super::types::{NetworkEvents, ProviderSocket, SwitchHandle, FD_ACCEPT, FD_CONNECT};
use super::Running;
use crate::error::{WsaError, WsaResult};
use crate::event::Event;
use crate::fabric::{ConnectAttempt, Listener, ListenerEvents, QpEvents, QueuePair};
use crate::mem::table::OwnerRegs;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

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
    /// The connection's queue pair, set once when connected.
    pub qp: OnceLock<Arc<dyn QueuePair>>,
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
            qp: OnceLock::new(),
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

/// Connection events of a socket's queue pair.
pub struct SocketQpEvents(pub Weak<Socket>);

impl QpEvents for SocketQpEvents {
    /// The peer tore the connection down (spec §7-5: `WSAECONNRESET`).
    fn disconnected(&self) {
        if let Some(s) = self.0.upgrade() {
            s.record_failure(WsaError::WSAECONNRESET);
        }
    }

    /// Our own queue pair failed: a local transport failure (§7-5:
    /// `WSAECONNABORTED`), also for the ops it flushed.
    fn failed(&self) {
        if let Some(s) = self.0.upgrade() {
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

struct TableSlot {
    /// Generation of the descriptor that owns (or last owned) the slot.
    generation: AtomicU32,
    /// The socket, from publication until close removes it.
    socket: Mutex<Option<Arc<Socket>>>,
}

/// Descriptor → socket. A descriptor is `generation << 32 | (index + 1)`:
/// never 0, never `INVALID_SOCKET`, and a closed descriptor's value does not
/// come back until its slot's 32-bit generation wraps.
pub struct SocketTable {
    /// Padded: threads spinning on different sockets never share a line.
    slots: Box<[crossbeam_utils::CachePadded<TableSlot>]>,
    /// Indices of unused slots.
    free: Mutex<Vec<u32>>,
}

#[cfg(not(target_pointer_width = "64"))]
compile_error!("sanpath's descriptor encoding assumes 64-bit pointers");

impl SocketTable {
    pub fn new(capacity: usize) -> SocketTable {
        SocketTable {
            slots: (0..capacity)
                .map(|_| {
                    crossbeam_utils::CachePadded::new(TableSlot {
                        generation: AtomicU32::new(0),
                        socket: Mutex::new(None),
                    })
                })
                .collect(),
            free: Mutex::new((0..capacity as u32).rev().collect()),
        }
    }

    /// Reserves a slot and returns the descriptor it will have.
    pub fn reserve(&self) -> WsaResult<ProviderSocket> {
        let index = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or(WsaError::WSAEMFILE)?;
        let slot = &self.slots[index as usize];
        let generation = slot.generation.load(Ordering::Relaxed).wrapping_add(1);
        slot.generation.store(generation, Ordering::Relaxed);
        Ok(ProviderSocket(
            ((generation as usize) << 32) | (index as usize + 1),
        ))
    }

    /// Returns a reserved slot that was never published.
    pub fn unreserve(&self, desc: ProviderSocket) {
        if let Some(index) = self.index(desc) {
            self.free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(index);
        }
    }

    /// Makes a reserved descriptor live.
    pub fn publish(&self, socket: Arc<Socket>) {
        if let Some(index) = self.index(socket.desc) {
            *self.lock(index) = Some(socket);
        }
    }

    pub fn get(&self, desc: ProviderSocket) -> WsaResult<Arc<Socket>> {
        let index = self.index(desc).ok_or(WsaError::WSAENOTSOCK)?;
        self.lock(index).clone().ok_or(WsaError::WSAENOTSOCK)
    }

    /// Removes a live socket: later lookups fail `WSAENOTSOCK`.
    pub fn remove(&self, desc: ProviderSocket) -> WsaResult<Arc<Socket>> {
        let index = self.index(desc).ok_or(WsaError::WSAENOTSOCK)?;
        let socket = self.lock(index).take().ok_or(WsaError::WSAENOTSOCK)?;
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(index);
        Ok(socket)
    }

    /// Every live socket.
    pub fn all(&self) -> Vec<Arc<Socket>> {
        (0..self.slots.len())
            .filter_map(|i| self.lock(i as u32).clone())
            .collect()
    }

    /// The slot index of a descriptor whose generation is current.
    fn index(&self, desc: ProviderSocket) -> Option<u32> {
        let low = (desc.0 & 0xFFFF_FFFF) as u32;
        let generation = (desc.0 >> 32) as u32;
        let index = low.checked_sub(1)?;
        let slot = self.slots.get(index as usize)?;
        (slot.generation.load(Ordering::Relaxed) == generation).then_some(index)
    }

    fn lock(&self, index: u32) -> MutexGuard<'_, Option<Arc<Socket>>> {
        self.slots[index as usize]
            .socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
