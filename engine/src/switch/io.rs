//! The switch's `unsafe` (but for creating `ready`'s eventfd): a
//! connection's [`Wire`] (its socket, pools, rings and overlapped records)
//! with the provider's data calls (which take memory
//! the switch owns) and copies between the registered pools and application
//! buffers. Every block rests on the same invariants, kept by
//! [`super::connection`] and the protocol machine:
//!
//! 1. **Pools and overlapped records outlive their ops.** A connection's
//!    pool of receive and send slots (with their tails), its rings and its
//!    `Overlapped` array live in its [`Wire`], which the runtime's handle
//!    table keeps alive until the provider's
//!    `close_socket_handle` upcall — made only after every op of the socket
//!    completed (spec §6.1, CLOSE-5). The protocol machine never posts a slot
//!    or an RDMA record again before its previous op completed. Some sends
//!    and every staged ring write (from the send ring) make no upcall
//!    (`hEvent` bit 0): such a record is posted again only after a send
//!    posted after it on the same queue pair reported its completion, and
//!    a queue pair's sends complete
//!    (and the provider dispatches them) in posting order.
//! 2. **Application buffers outlive their use.** An application buffer is
//!    entered in the connection's table (as an [`AppBuf`]) by the call that
//!    borrows it, which does not return before the machine completed or
//!    withdrew the op (removing the entry under the same lock). The machine
//!    completes an op only when no RDMA op and no exposure uses its buffer
//!    any more; an exposure ends with `deregister_rdma_memory` or with
//!    `close_socket`, after which the peer cannot reach it (CLOSE-10).
//! 3. **No aliasing access.** A byte range is never at the same time the
//!    target of a copy and of an RDMA op (the machine serialises them per
//!    op), and the application thread does not touch its buffer while its
//!    call is pending.
//! 4. **The NIC is done with a pool slot the switch copies** (its head and
//!    its tail alike). A receive slot
//!    is read only between its receive's completion and its re-post (the
//!    machine yields a slot's copy-outs before its `PostRecv`); a send slot
//!    is written only while no send of it is posted (the machine hands a
//!    slot out again only after its previous send completed). The NIC's
//!    writes into a receive slot happen before the completion is published,
//!    and the provider hands the completion to the upcall through the CQ (or
//!    its ring) with release/acquire ordering, so a plain `memcpy` is not a
//!    data race: nothing writes the bytes while they are copied.
//! 5. **The rings.** The receive ring's bytes `at..end` are copied out only
//!    after the DATA announcing them completed; the peer RDMA-wrote them
//!    before it sent that DATA, and the provider delivers a connection's
//!    messages after its earlier RDMA writes (RC ordering), so they are in
//!    place. The peer does not write them again before this side's ack said
//!    they were consumed (a peer that does only garbles the bytes of its own
//!    stream: the copy reads plain bytes, never pointers or lengths). A send
//!    ring range is written by the CPU only when the machine hands it out
//!    for a new DATA, which it does once the peer acked the range: the RDMA
//!    write that read it before was delivered.
//! 6. **Cached registrations of application memory** (`regcache.rs`). A
//!    local registration of the pages of an application buffer outlives the
//!    call that lent the buffer: the connection's cache keeps it until the
//!    application releases the memory (`Runtime::release_memory`), the
//!    entry is evicted, or the socket closes. That is sound because the
//!    fabric touches registered memory only for an op that names it, and
//!    every op names a range of a buffer lent by a pending call (invariant
//!    2); the registration itself gives nobody access (it is local: the
//!    peer reaches memory only through an exposure, which ends with its
//!    transfer). The cache is on by default only on the fabrics whose NIC
//!    reaches registered memory by virtual address at the time of the op
//!    (soft, shm); on verbs a registration pins the pages it found, so a
//!    buffer unmapped and mapped again at the same address would be read
//!    from the old pages: there it is off unless the application releases
//!    memory before unmapping it.
//! 7. **A record leads back to its connection.** Each record's `hEvent`
//!    holds the address of the [`Wire`] it belongs to (bit 0 aside, the
//!    provider's no-upcall flag), and the wire holds a weak reference to
//!    the connection around it ([`Wire::into_owner`], whose `make` keeps the
//!    wire in the value it builds, the one place a `Wire` lives once it has
//!    an owner). The runtime publishes the wire's address in the handle
//!    table's slot after the slot's entry took the connection's `Arc`, and
//!    withdraws it in `close_socket_handle` before it lets the `Arc` go; the
//!    provider makes that upcall only after every other upcall for the
//!    socket returned (an op's upcall comes before the op leaves the
//!    socket's close gate, spec §6.1). So during a completion upcall for a
//!    socket, the address its slot publishes names a live wire inside a live
//!    connection, and a record whose `hEvent` names that address is one of
//!    that wire's (checked against its array): the upcall reaches the
//!    connection with no lookup, lock or reference count.

use super::proto::{Desc, DESC_LEN};
use crate::config::{FabricKind, MlockPolicy};
use crate::error::{WsaError, WsaResult};
use crate::mem::pool::Chunk;
use crate::spi::{
    Overlapped, Provider, ProviderSocket, WsaBuf, WsaBufEx, MEM_READ, MEM_READWRITE, MEM_WRITE,
};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};

/// One part of a connection's mapping (the pool or a ring): `len` bytes at
/// offset `at`, both whole pages.
#[derive(Clone, Copy, Debug)]
struct Area {
    at: usize,
    len: usize,
}

impl Area {
    /// Start of the area in `mem`.
    fn ptr(self, mem: &Chunk) -> *mut u8 {
        debug_assert!(self.at + self.len <= mem.len());
        mem.as_ptr().wrapping_add(self.at)
    }

    /// Address of `len` bytes at `at` of the area in `mem`, checked against
    /// the area.
    fn range(self, mem: &Chunk, at: usize, len: usize) -> WsaResult<*mut u8> {
        match at.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.ptr(mem).wrapping_add(at)),
            _ => Err(WsaError::WSAEFAULT),
        }
    }
}

/// An application buffer lent to a pending op: address and length of the
/// slice the blocked call borrowed (`&[u8]` for sends, `&mut [u8]` for
/// receives).
#[derive(Clone, Copy, Debug)]
pub(super) struct AppBuf {
    addr: usize,
    len: usize,
}

impl AppBuf {
    pub(super) fn of(buf: &[u8]) -> AppBuf {
        AppBuf {
            addr: buf.as_ptr() as usize,
            len: buf.len(),
        }
    }

    pub(super) fn of_mut(buf: &mut [u8]) -> AppBuf {
        AppBuf {
            addr: buf.as_mut_ptr() as usize,
            len: buf.len(),
        }
    }

    /// Address and length of the whole buffer.
    pub(super) fn whole(&self) -> (usize, usize) {
        (self.addr, self.len)
    }

    /// Address of `off..off+len`, checked against the buffer.
    fn range(&self, off: u64, len: u32) -> WsaResult<*mut u8> {
        let end = off.checked_add(u64::from(len)).ok_or(WsaError::WSAEFAULT)?;
        if end > self.len as u64 {
            return Err(WsaError::WSAEFAULT);
        }
        Ok((self.addr + off as usize) as *mut u8)
    }
}

/// What an overlapped record is for.
#[derive(Clone, Copy)]
pub(super) enum OvKind {
    Recv(u16),
    Send(u16),
    RingWrite(u16),
    Rdma(u16),
}

/// The most bytes of a slot kept in the pool, where the slots' first
/// bytes are packed (see [`Wire::recv_at`]); the rest of a longer receive
/// slot is its tail, in a separate area, and a send slot has a buffer of
/// the whole slot there for messages longer than its head. Every control
/// message, and data of up to 236 bytes with its header, fits a head. Receives complete in the order
/// they were posted, so a connection's small messages go through all its
/// receive slots in turn: with heads of 256 bytes the default 8 + 8 slots
/// keep them in one page, where heads of 1 KiB took four (a stream's
/// message faulted a new page in every other time until all four were
/// resident, and a round robin over 10,000 connections found each one's
/// next page cold).
const SLOT_HEAD: usize = 256;

/// Bytes of a cache line, the unit [`prefetch_write`] steps by.
const LINE: usize = 64;

/// Whether the CPU has a prefetch for writing: `prefetchw` on x86-64 (CPUID
/// `8000_0001h`, ECX bit 8: every x86-64 CPU but Intel's before Broadwell),
/// `prfm pstl1keep` on every aarch64 CPU; asked once per process (CPUID
/// may exit to the hypervisor).
fn can_prefetch_write() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            // SAFETY: every x86-64 CPU has CPUID, and leaf 8000_0001h is
            // asked only if leaf 8000_0000h says it exists. (`unsafe` for the
            // MSRV, whose `__cpuid` is still an unsafe fn.)
            #[allow(unused_unsafe)]
            unsafe {
                __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            true
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    })
}

/// Asks the CPU to bring the cache lines of `[p, p + len)` into this core's
/// cache in the state a write needs (owned, every other core's copy
/// invalidated), without waiting for them: a hint, which reads and writes
/// nothing the program can observe and cannot fault, whatever the address.
fn prefetch_write(p: *const u8, len: usize) {
    if len == 0 || !can_prefetch_write() {
        return;
    }
    let end = p as usize + len;
    let mut line = p as usize & !(LINE - 1);
    while line < end {
        // SAFETY: a prefetch accesses no memory in the program's sense (it
        // is not ordered with fences or locked instructions, and a bad
        // address is ignored, never a fault); the CPU has the instruction
        // (`can_prefetch_write`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("prefetchw byte ptr [{}]", in(reg) line, options(nomem, nostack, preserves_flags));
        }
        // SAFETY: as above; `prfm` is in the base aarch64 instruction set.
        #[cfg(target_arch = "aarch64")]
        unsafe {
            std::arch::asm!("prfm pstl1keep, [{}]", in(reg) line, options(nomem, nostack, preserves_flags));
        }
        line += LINE;
    }
}

/// What an upcall hands the completion of one of a wire's records to: the
/// connection that holds the wire (invariant 7).
pub(super) trait Owner: Send + Sync {
    /// Record `index` (see [`Wire::ov_kind`]) completed with `error` and
    /// `bytes`.
    fn completed(&self, index: usize, error: u32, bytes: u32);
}

/// A connection's socket, its registered pools and rings, and its
/// overlapped records: receive slots, then send slots, then the ring write
/// of each send slot, then RDMA ops.
pub(super) struct Wire {
    pub(super) provider: Provider,
    pub(super) sock: ProviderSocket,
    /// Bytes of each slot (the largest message): its head in the pool and
    /// its tail, if any.
    pub(super) slot_size: usize,
    /// Bytes of a slot in the pool: `min(slot_size, SLOT_HEAD)`.
    head: usize,
    n_recv: usize,
    n_send: usize,
    /// One chunk holds the pool, the slots' tails, the send ring and the
    /// receive ring, in that order: carved from the process's pool of
    /// equal chunks (`mem::pool::Chunk`), whose pages go back in batches,
    /// where a mapping per connection made closing 10,000 connections
    /// mostly `munmap` and TLB shootdowns. The pool, the tails and the send
    /// ring are one local registration; the receive ring is exposed.
    mem: Chunk,
    /// The heads of the receive and send slots: see [`Wire::recv_at`].
    pool: Area,
    /// For slots longer than [`SLOT_HEAD`] (empty for shorter ones): the
    /// receive slots' tails, then a buffer of `slot_size` bytes per send
    /// slot. A message that fits a head, as every small one does, touches
    /// no page here, so an idle or lightly used connection keeps its
    /// resident pages in the pool, while a message of a few KiB still
    /// travels as one send into one receive: the receive takes the head and
    /// the tail as two buffers; the send writes a message longer than a
    /// head whole into the slot's buffer here and sends it as one (one
    /// copy and one registration lookup, not two of each).
    tails: Area,
    /// The receive ring: the peer RDMA-writes stream bytes into it.
    recv_ring: Area,
    /// The send ring: stream bytes are copied into it and RDMA-written from
    /// it to the same offset of the peer's ring.
    send_ring: Area,
    /// The local registration of the pool and the send ring (set by
    /// [`Wire::register`]).
    send_ring_handle: u64,
    ovs: Box<[Overlapped]>,
    /// The connection holding this wire, which its records lead back to
    /// (invariant 7); set once, by [`Wire::into_owner`].
    owner: Option<Weak<dyn Owner>>,
}

impl Wire {
    /// Pools for `n_recv` receive and `n_send` send slots of `slot_size`
    /// bytes, two rings of `ring_size` bytes, and records for the slots,
    /// their ring writes and `n_rdma` RDMA ops (not registered yet).
    pub(super) fn new(
        provider: &Provider,
        sock: ProviderSocket,
        slot_size: usize,
        n_recv: usize,
        n_send: usize,
        n_rdma: usize,
        ring_size: usize,
    ) -> io::Result<Wire> {
        // Locking would make every idle connection's pools and rings
        // resident (256 KiB with the defaults). Only a NIC's DMA needs the
        // pages in place, and verbs registration pins what it registers
        // anyway; on the soft and shm fabrics they stay lazy: a page becomes
        // resident when traffic first touches it.
        let config = provider.config();
        let policy = match config.fabric.kind {
            FabricKind::Verbs => config.mem.mlock,
            FabricKind::Soft | FabricKind::Shm => MlockPolicy::Off,
        };
        let page = crate::mem::region::page_size();
        let pages = |n: usize| n.div_ceil(page) * page;
        let head = slot_size.min(SLOT_HEAD);
        let pool = Area {
            at: 0,
            len: pages((n_recv + n_send) * head),
        };
        let long_sends = if slot_size > head {
            n_send * slot_size
        } else {
            0
        };
        let tails = Area {
            at: pool.len,
            len: pages(n_recv * (slot_size - head) + long_sends),
        };
        let send_ring = Area {
            at: tails.at + tails.len,
            len: pages(ring_size),
        };
        let recv_ring = Area {
            at: send_ring.at + send_ring.len,
            len: send_ring.len,
        };
        let mem = Chunk::new(recv_ring.at + recv_ring.len, policy).map_err(io::Error::other)?;
        Ok(Wire {
            provider: provider.clone(),
            sock,
            slot_size,
            head,
            n_recv,
            n_send,
            mem,
            pool,
            tails,
            recv_ring,
            send_ring,
            send_ring_handle: 0,
            ovs: (0..n_recv + 2 * n_send + n_rdma)
                .map(|_| Overlapped::new(0))
                .collect(),
            owner: None,
        })
    }

    /// Moves the wire into the connection `make` builds around it, which
    /// must keep it (invariant 7): from then on its records lead back to
    /// that connection ([`Wire::deliver`]).
    pub(super) fn into_owner<T: Owner + 'static>(mut self, make: impl FnOnce(Wire) -> T) -> Arc<T> {
        Arc::new_cyclic(|owner: &Weak<T>| {
            let owner: Weak<dyn Owner> = owner.clone();
            self.owner = Some(owner);
            make(self)
        })
    }

    /// The address a runtime publishes for this wire in its handle table
    /// (invariant 7), once the wire is in its connection.
    pub(super) fn addr(&self) -> usize {
        debug_assert!(self.owner.is_some(), "a wire published before its owner");
        self as *const Wire as usize
    }

    /// The `hEvent` of a record of this wire: its address (invariant 7),
    /// with bit 0 set if the completion makes no upcall.
    fn event(&self, report: bool) -> usize {
        self.addr() | usize::from(!report)
    }

    /// Hands the completion of record `ov` (its result `error`, `bytes`) to
    /// the connection holding the wire at `live`, the address the handle
    /// table publishes for the upcall's socket, if `ov` is one of that
    /// wire's records; else does nothing (a record the switch did not post).
    pub(super) fn deliver(live: usize, ov: &Overlapped, error: u32, bytes: u32) {
        let named = ov.h_event.load(Ordering::Relaxed) & !1;
        if live == 0 || named != live {
            return;
        }
        // SAFETY: invariant 7 — a nonzero address the handle table
        // publishes for a socket during a completion upcall for it is that
        // of a live wire inside a live connection.
        let wire = unsafe { &*(live as *const Wire) };
        let (Some(index), Some(owner)) = (wire.ov_index(ov), &wire.owner) else {
            return;
        };
        // SAFETY: invariant 7 — the wire lives in the connection `owner`
        // refers to (`into_owner`), so that connection is alive while the
        // wire is: its strong count is not 0.
        let owner = unsafe { &*owner.as_ptr() };
        owner.completed(index, error, bytes);
    }

    /// Bytes of the connection's buffers: pools and rings.
    pub(super) fn buffer_bytes(&self) -> usize {
        self.mem.len()
    }

    /// Bytes of the pools and rings that are resident, and whether any of
    /// them is locked.
    #[cfg(test)]
    pub(super) fn resident_bytes(&self) -> (usize, bool) {
        let page = crate::mem::region::page_size();
        let r = &self.mem;
        let mut pages = vec![0u8; r.len() / page];
        // SAFETY: `r` is a live page-aligned chunk of `r.len()` bytes and
        // `pages` holds one byte per page of it.
        let rc = unsafe { libc::mincore(r.as_ptr().cast(), r.len(), pages.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        let resident = pages.iter().filter(|&&p| p & 1 == 1).count() * page;
        (resident, r.locked())
    }

    /// Offset of receive slot `slot`'s head in the pool. Receive and send
    /// slots alternate while both last (`r0 s0 r1 s1 ...`, then the rest of
    /// the longer kind), so that the first ones, which the handshake uses,
    /// share a page: an idle connection keeps one pool page resident, not
    /// two.
    fn recv_at(&self, slot: u16) -> usize {
        let i = usize::from(slot);
        debug_assert!(i < self.n_recv);
        let both = self.n_recv.min(self.n_send);
        (if i < both { 2 * i } else { both + i }) * self.head
    }

    /// Offset of send slot `slot`'s head in the pool (see [`Wire::recv_at`]).
    fn send_at(&self, slot: u16) -> usize {
        let i = usize::from(slot);
        debug_assert!(i < self.n_send);
        let both = self.n_recv.min(self.n_send);
        (if i < both { 2 * i + 1 } else { both + i }) * self.head
    }

    /// Offset of receive slot `slot`'s tail in the tails' area.
    fn tail_at(&self, slot: u16) -> usize {
        debug_assert!(usize::from(slot) < self.n_recv);
        usize::from(slot) * (self.slot_size - self.head)
    }

    /// The buffers of receive slot `slot`: its first `len` bytes (at most
    /// `slot_size`), as the head and, past [`SLOT_HEAD`], the tail.
    fn recv_bufs(&self, slot: u16, len: usize) -> WsaResult<([WsaBuf; 2], usize)> {
        let in_head = len.min(self.head);
        let first = WsaBuf {
            len: in_head as u32,
            buf: self.pool.range(&self.mem, self.recv_at(slot), in_head)?,
        };
        if len <= self.head {
            return Ok(([first, first], 1));
        }
        let rest = len - self.head;
        let second = WsaBuf {
            len: rest as u32,
            buf: self.tails.range(&self.mem, self.tail_at(slot), rest)?,
        };
        Ok(([first, second], 2))
    }

    /// The buffer a message of `len` bytes (at most `slot_size`) takes in
    /// send slot `slot`: its head if the message fits there, else the
    /// slot's buffer in the tails' area (see [`Wire::tails`]).
    fn send_buf(&self, slot: u16, len: usize) -> WsaResult<WsaBuf> {
        let buf = if len <= self.head {
            self.pool.range(&self.mem, self.send_at(slot), len)?
        } else {
            debug_assert!(usize::from(slot) < self.n_send);
            let at =
                self.n_recv * (self.slot_size - self.head) + usize::from(slot) * self.slot_size;
            if len > self.slot_size {
                return Err(WsaError::WSAEFAULT);
            }
            self.tails.range(&self.mem, at, len)?
        };
        Ok(WsaBuf {
            len: len as u32,
            buf,
        })
    }

    /// Copies `len` bytes at `slot_off` of receive slot `slot` into `app`:
    /// what lies before [`SLOT_HEAD`] from the head, the rest from the
    /// tail.
    ///
    /// # Safety
    /// `app` is valid for writing `len` bytes and does not overlap the
    /// slot; nothing else reads or writes either range meanwhile
    /// (invariants 2 to 4).
    unsafe fn copy_from_recv_slot(
        &self,
        slot: u16,
        slot_off: usize,
        app: *mut u8,
        len: usize,
    ) -> WsaResult<()> {
        let head_at = self.recv_at(slot);
        let end = slot_off.checked_add(len).ok_or(WsaError::WSAEFAULT)?;
        if end > self.slot_size {
            return Err(WsaError::WSAEFAULT);
        }
        let in_head = end.min(self.head).saturating_sub(slot_off);
        let in_tail = len - in_head;
        let head = match in_head {
            0 => None,
            n => Some((self.pool.range(&self.mem, head_at + slot_off, n)?, app, n)),
        };
        let tail = match in_tail {
            0 => None,
            n => {
                let off = self.tail_at(slot) + slot_off.max(self.head) - self.head;
                let at = self.tails.range(&self.mem, off, n)?;
                Some((at, app.wrapping_add(in_head), n))
            }
        };
        for (at, a, n) in [head, tail].into_iter().flatten() {
            // SAFETY: `at..at+n` lies in the pool or the tails (checked by
            // `range`), `a..a+n` in the application buffer (the caller's
            // contract); they do not overlap, and nothing else touches
            // either meanwhile (the caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(at, a, n) };
        }
        Ok(())
    }

    /// How many overlapped records there are.
    pub(super) fn records(&self) -> usize {
        self.ovs.len()
    }

    fn recv_ov(&self, slot: u16) -> usize {
        usize::from(slot)
    }

    fn send_ov(&self, slot: u16) -> usize {
        self.n_recv + usize::from(slot)
    }

    fn ring_ov(&self, slot: u16) -> usize {
        self.n_recv + self.n_send + usize::from(slot)
    }

    fn rdma_ov(&self, rdma: u16) -> usize {
        self.n_recv + 2 * self.n_send + usize::from(rdma)
    }

    /// Index of `ov` among the records, if it is one of them.
    fn ov_index(&self, ov: &Overlapped) -> Option<usize> {
        let base = self.ovs.as_ptr() as usize;
        let at = ov as *const Overlapped as usize;
        let size = std::mem::size_of::<Overlapped>();
        if at < base || at >= base + self.ovs.len() * size {
            return None;
        }
        Some((at - base) / size)
    }

    /// What record `i` is for.
    pub(super) fn ov_kind(&self, i: usize) -> OvKind {
        if i < self.n_recv {
            OvKind::Recv(i as u16)
        } else if i < self.n_recv + self.n_send {
            OvKind::Send((i - self.n_recv) as u16)
        } else if i < self.n_recv + 2 * self.n_send {
            OvKind::RingWrite((i - self.n_recv - self.n_send) as u16)
        } else {
            OvKind::Rdma((i - self.n_recv - 2 * self.n_send) as u16)
        }
    }

    /// Registers the pool, the tails and the send ring on the connected
    /// socket and exposes the receive ring to the peer's RDMA writes (the
    /// provider releases all of it when the socket closes); returns the
    /// receive ring's descriptor.
    pub(super) fn register(&mut self) -> WsaResult<Desc> {
        // The pool, the tails and the send ring are adjacent, in that
        // order: one local registration covers them.
        debug_assert_eq!(self.tails.at, self.pool.at + self.pool.len);
        debug_assert_eq!(self.send_ring.at, self.tails.at + self.tails.len);
        let local_len = u32::try_from(self.pool.len + self.tails.len + self.send_ring.len)
            .map_err(|_| WsaError::WSAENOBUFS)?;
        let ring_len = u32::try_from(self.recv_ring.len).map_err(|_| WsaError::WSAENOBUFS)?;
        // SAFETY: invariant 1 — the pool, the tails and the send ring live
        // in this connection, which outlives the socket's ops and its
        // registrations (if this fails, the caller closes the socket before
        // dropping it).
        self.send_ring_handle = unsafe {
            self.provider.register_memory(
                self.sock,
                self.pool.ptr(&self.mem),
                local_len,
                MEM_READWRITE,
            )?
        };
        let mut desc = [0u8; DESC_LEN];
        // SAFETY: invariant 1 — the receive ring lives as long as the socket
        // and its exposure; invariant 5 for the peer's writes into it.
        unsafe {
            self.provider.register_rdma_memory(
                self.sock,
                self.recv_ring.ptr(&self.mem),
                ring_len,
                MEM_WRITE,
                &mut desc,
            )?;
        }
        Ok(desc)
    }

    /// Posts receive slot `slot` (the whole slot: its head, then its
    /// tail).
    pub(super) fn post_recv(&self, slot: u16) -> WsaResult<()> {
        let (bufs, n) = self.recv_bufs(slot, self.slot_size)?;
        let ov = &self.ovs[self.recv_ov(slot)];
        ov.h_event.store(self.event(true), Ordering::Relaxed);
        // SAFETY: invariant 1 — receive slot `slot` (its head in the pool,
        // its tail) and its record live until every op of the socket
        // completed, and it is not posted again before this receive
        // completes.
        unsafe { self.provider.recv(self.sock, &bufs[..n], ov) }
    }

    /// Writes `head` into send slot `slot`, then (an INLINE's payload)
    /// `len` bytes at `off` of an application send buffer, and posts one
    /// send of both; its completion makes an upcall only if `report` (see
    /// invariant 1).
    pub(super) fn post_send(
        &self,
        slot: u16,
        head: &[u8],
        payload: Option<(AppBuf, u64, u32)>,
        report: bool,
    ) -> WsaResult<()> {
        let len = head.len() + payload.map_or(0, |p| p.2 as usize);
        if len > self.slot_size || head.len() > self.head {
            return Err(WsaError::WSAEFAULT);
        }
        // The whole message in one buffer of the slot (`len` checked).
        let buf = self.send_buf(slot, len)?;
        if let Some((app, off, n)) = payload {
            let src = app.range(off, n)?;
            // SAFETY: invariant 2 — the source lies in a send buffer whose
            // call is blocked until this op completes (checked in bounds)
            // and is not the slot; the destination is `buf`'s range past
            // the header (`len` bytes of the pool or the tails, checked by
            // `send_buf`); invariant 4 — no send of this slot is posted, so
            // nothing else reads or writes it.
            unsafe { std::ptr::copy_nonoverlapping(src, buf.buf.add(head.len()), n as usize) };
        }
        // SAFETY: `buf` holds the header at its start (as above); invariant
        // 4 as above.
        unsafe { std::ptr::copy_nonoverlapping(head.as_ptr(), buf.buf, head.len()) };
        let ov = &self.ovs[self.send_ov(slot)];
        debug_assert!(!ov.is_pending(), "send record {slot} posted twice");
        ov.h_event.store(self.event(report), Ordering::Relaxed);
        // SAFETY: invariant 1 for send slot `slot` (its head and its
        // buffer in the tails) and its record.
        unsafe { self.provider.send(self.sock, &[buf], 0, ov) }
    }

    /// Takes the cache lines of the buffer a message of `len` bytes takes in
    /// send slot `slot` ([`Wire::send_buf`]) into this core's cache for writing, without
    /// waiting ([`prefetch_write`]), ahead of a message copied there. Where
    /// the NIC is another core (soft, shm), that core read the slot's lines
    /// when it took the slot's last message, so each line still has a copy
    /// in its cache; a copy into the slot must first invalidate them, one
    /// cross-core round trip per line, which for 4 KiB took longer than
    /// the copy itself (about 450 ns on the 2-vCPU test VM) and came before
    /// the send could be posted. A thread about to wait calls this for the
    /// slot its next message will take, so that the invalidations happen
    /// while it waits. Only addresses: a slot that is posted (by another
    /// thread, meanwhile) is not touched.
    pub(super) fn prefetch_send(&self, slot: u16, len: usize) {
        if let Ok(b) = self.send_buf(slot, len.min(self.slot_size)) {
            prefetch_write(b.buf, b.len as usize);
        }
    }

    /// Copies `len` bytes at `off` of an application send buffer into the
    /// send ring at `ring_off` and posts an RDMA write of them to the same
    /// offset of the peer's receive ring `desc`, on send slot `slot`'s ring
    /// write record; its completion makes an upcall only if `report` (see
    /// invariant 1).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn post_ring_write(
        &self,
        slot: u16,
        app: AppBuf,
        off: u64,
        len: u32,
        ring_off: u32,
        desc: &Desc,
        report: bool,
    ) -> WsaResult<()> {
        let src = app.range(off, len)?;
        let dst = self
            .send_ring
            .range(&self.mem, ring_off as usize, len as usize)?;
        // SAFETY: invariant 2 — the source lies in a send buffer whose call
        // is blocked until this op completes (checked in bounds); invariant
        // 5 — nothing reads or writes this send ring range (checked in
        // bounds) until the write posted below.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len as usize) };
        let buf = WsaBufEx {
            len,
            buf: dst,
            handle: self.send_ring_handle as usize,
        };
        // SAFETY: invariant 1 for the send ring, which `handle` registers.
        unsafe { self.ring_write(slot, buf, ring_off, desc, report) }
    }

    /// Posts the RDMA write of `buf` to `ring_off` of the peer's receive
    /// ring `desc` on send slot `slot`'s ring write record (which is not
    /// posted again before this op completes: invariant 1), with an upcall
    /// at its completion if `report`, else none (`hEvent` bit 0).
    ///
    /// # Safety
    /// `buf` stays valid, unchanged and registered as its `handle` until the
    /// op completes.
    unsafe fn ring_write(
        &self,
        slot: u16,
        buf: WsaBufEx,
        ring_off: u32,
        desc: &Desc,
        report: bool,
    ) -> WsaResult<()> {
        let ov = &self.ovs[self.ring_ov(slot)];
        debug_assert!(!ov.is_pending(), "ring write record {slot} posted twice");
        ov.h_event.store(self.event(report), Ordering::Relaxed);
        // SAFETY: the caller's contract for the buffer; invariant 1 for the
        // record.
        unsafe {
            self.provider
                .rdma_write(self.sock, &[buf], desc, ring_off, 0, ov)
        }
    }

    /// Copies `len` bytes at `ring_off` of the receive ring into an
    /// application receive buffer at `off`.
    pub(super) fn copy_out(&self, ring_off: u32, app: AppBuf, off: u64, len: u32) -> WsaResult<()> {
        let dst = app.range(off, len)?;
        let src = self
            .recv_ring
            .range(&self.mem, ring_off as usize, len as usize)?;
        // SAFETY: invariant 2 — the destination lies in a receive buffer
        // whose call is blocked until this op completes; invariant 3 — no
        // RDMA op targets it during a copy; the source is inside the
        // receive ring (checked), and its bytes are in place (invariant 5).
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len as usize) };
        Ok(())
    }

    /// Copies `len` bytes at `slot_off` of receive slot `slot` (an INLINE's
    /// payload) into an application receive buffer at `off`.
    pub(super) fn copy_inline(
        &self,
        slot: u16,
        slot_off: u32,
        app: AppBuf,
        off: u64,
        len: u32,
    ) -> WsaResult<()> {
        let dst = app.range(off, len)?;
        // SAFETY: invariant 2 — the destination lies in a receive buffer
        // whose call is blocked until this op completes (checked in
        // bounds); invariant 3 — no RDMA op targets it during a copy; the
        // source is inside receive slot `slot` (checked by
        // `copy_from_recv_slot`), which the NIC is done with (invariant 4).
        unsafe { self.copy_from_recv_slot(slot, slot_off as usize, dst, len as usize) }
    }

    /// Runs `f` on the first `len` bytes of receive slot `slot` (a message
    /// that just arrived) where they lie, without copying them out; fails if
    /// they are not all in the slot's head.
    pub(super) fn with_recv_head<R>(
        &self,
        slot: u16,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> WsaResult<R> {
        if len > self.head {
            return Err(WsaError::WSAEFAULT);
        }
        let src = self.pool.range(&self.mem, self.recv_at(slot), len)?;
        // SAFETY: the range is inside receive slot `slot`'s head (checked),
        // in the pool, which lives as long as `self`; the slot's receive
        // completed and it is not re-posted while `f` runs (invariant 4: the
        // machine only queues the `PostRecv`, executed after this returns),
        // so nothing writes the bytes while the slice lives.
        let head = unsafe { std::slice::from_raw_parts(src.cast_const(), len) };
        Ok(f(head))
    }

    /// Exposes `len` bytes of an application buffer at `off` to the peer:
    /// `MEM_READ` for a send buffer, `MEM_WRITE` for a receive buffer.
    pub(super) fn expose(&self, app: AppBuf, off: u64, len: u32, write: bool) -> WsaResult<Desc> {
        let addr = app.range(off, len)?;
        let flags = if write { MEM_WRITE } else { MEM_READ };
        let mut desc = [0u8; DESC_LEN];
        // SAFETY: invariant 2 — the buffer stays valid until the exposure
        // ended (deregistered, or the socket closed) and the op completed.
        unsafe {
            self.provider
                .register_rdma_memory(self.sock, addr, len, flags, &mut desc)?;
        }
        Ok(desc)
    }

    /// Address of `len` bytes at `off` of an application buffer, checked
    /// against it.
    pub(super) fn app_addr(&self, app: AppBuf, off: u64, len: u32) -> WsaResult<usize> {
        app.range(off, len).map(|p| p as usize)
    }

    /// Registers `[start, end)` locally: `MEM_WRITE` (the sink of RDMA
    /// reads) if `write`, else `MEM_READ` (the source of RDMA writes).
    /// The range is, or covers the pages of, a range of an application
    /// buffer lent by a pending call.
    pub(super) fn register_app(&self, start: usize, end: usize, write: bool) -> WsaResult<u64> {
        let len = u32::try_from(end - start).map_err(|_| WsaError::WSAENOBUFS)?;
        let flags = if write { MEM_WRITE } else { MEM_READ };
        // SAFETY: invariant 2 — the range lies in (the pages of) a buffer
        // lent by a pending call, so it is mapped now; invariant 6 — the
        // registration may outlive the call (cached), and no op touches the
        // range but while a call lends it.
        unsafe {
            self.provider
                .register_memory(self.sock, start as *mut u8, len, flags)
        }
    }

    /// Posts RDMA op `rdma` (a read into, or a write from, `len` bytes at
    /// `off` of an application buffer, registered as `handle`) against the
    /// peer's `desc` at `remote_off`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn post_rdma(
        &self,
        rdma: u16,
        write: bool,
        app: AppBuf,
        off: u64,
        len: u32,
        handle: u64,
        desc: &Desc,
        remote_off: u32,
    ) -> WsaResult<()> {
        let addr = app.range(off, len)?;
        let bufs = [WsaBufEx {
            len,
            buf: addr,
            handle: handle as usize,
        }];
        let ov = &self.ovs[self.rdma_ov(rdma)];
        ov.h_event.store(self.event(true), Ordering::Relaxed);
        // SAFETY: invariants 1 and 2 — record `rdma` and the buffer outlive
        // the op (`handle` covers it, invariant 6); invariant 3 — nothing
        // else touches the range meanwhile.
        unsafe {
            if write {
                self.provider
                    .rdma_write(self.sock, &bufs, desc, remote_off, 0, ov)
            } else {
                self.provider
                    .rdma_read(self.sock, &bufs, desc, remote_off, 0, ov)
            }
        }
    }

    /// Posts an RDMA write of `len` bytes at `off` of an application send
    /// buffer, registered as `handle`, to `ring_off` of the peer's receive
    /// ring `desc`, on send slot `slot`'s ring write record: the ring write
    /// without the copy into the send ring.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn post_ring_write_direct(
        &self,
        slot: u16,
        app: AppBuf,
        off: u64,
        len: u32,
        handle: u64,
        ring_off: u32,
        desc: &Desc,
    ) -> WsaResult<()> {
        let src = app.range(off, len)?;
        let buf = WsaBufEx {
            len,
            buf: src,
            handle: handle as usize,
        };
        // SAFETY: invariant 2 — the send op stays pending until this write
        // completed (the machine settles a direct write's bytes at its
        // completion), and `handle` covers the range (invariant 6).
        unsafe { self.ring_write(slot, buf, ring_off, desc, true) }
    }
}
