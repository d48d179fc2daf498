//! Fuzz target `spi_calls`: the input is a program of SPI calls with
//! arbitrary arguments and handles (live, closed, never issued), run against
//! a run-to-completion provider on a private soft network, with the spec's
//! invariants checked after every call.
//!
//! # Input format
//!
//! Byte 0 picks the configuration (bit 0: registration cache on; bit 1: two
//! completion queues instead of one). Then each call is an opcode byte
//! (taken modulo the number of calls, see [`Call::decode`]) followed by its
//! operands; reads past the end give zeros, at most [`MAX_CALLS`] calls run.
//!
//! # Invariants checked
//!
//! - no panic in the engine; every error is a Winsock code the call may
//!   return (never `WSAEINPROGRESS`, `WSA_IO_PENDING` or `WSAEDISCON`);
//! - a call on a descriptor that is not live fails `WSAENOTSOCK` (or
//!   `WSANOTINITIALISED` after the last cleanup); `close_socket` of a live
//!   one succeeds (CLOSE-1, CLOSE-7);
//! - new descriptors are fresh, get exactly one `create_socket_handle` and a
//!   switch handle distinct from the descriptor (SOCK-1);
//! - every op that was started completes exactly once: one upcall if
//!   `hEvent` bit 0 is clear, none if it is set, never a second completion
//!   (XFER-6/7); an op that failed to start never completes (RDMA-3);
//!   successful sends and RDMA report the full length, receives at most it;
//! - no upcall names a handle after its `close_socket_handle`, and that
//!   upcall comes exactly once per handle (CLOSE-5/6);
//! - when `close_socket` (or the last `cleanup`) returns, every op of the
//!   socket that was pending is complete with `WSA_OPERATION_ABORTED` and
//!   the handle was closed (CLOSE-3, START-7);
//! - at the end, after the last cleanup: no socket, op, registration (live
//!   or cached), remote key or queue pair is left, and no connect timer
//!   thread keeps running.
//!
//! With `SANPATH_FUZZ_TRACE` set in the environment, every call and its
//! result are printed to stderr (for reading a reproducer).

use super::input::Input;
use crate::config::{Config, MlockPolicy, PollerMode};
use crate::error::{WsaError, WsaResult};
use crate::event::Event;
use crate::fabric::soft::{SoftNetwork, SoftNic};
use crate::fabric::Nic;
use crate::mem::region::Region;
use crate::spi::*;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most calls one input runs.
pub const MAX_CALLS: usize = 256;

/// Bytes of caller memory the program may register and transfer from.
const ARENA: usize = 16 << 10;

/// The provider's own address, a TCP-only host, an unknown host on the
/// SAN subnet, and an address on no subnet of the network.
const OWN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const TCP_ONLY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);
const UNKNOWN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 3);
const OTHER_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);

/// Addresses in the upper half of the address space: never mapped in a
/// user process, so registering them must fail and nothing may touch them.
const KERNEL_HALF: usize = 0xFFFF_8000_0000_0000;

/// Marks an op whose completion the driver already checked: a later write
/// of `Internal` would be a second completion.
const SEEN: usize = 0x5EE_5EE;

/// The configuration a program runs with: small limits so that resource
/// exhaustion (sockets, op slots, queue depth, CQ room) is reachable.
fn config(flags: u8) -> Config {
    let mut c = Config::default();
    c.poller.mode = PollerMode::RunToCompletion;
    c.poller.count = if flags & 2 != 0 { 2 } else { 1 };
    c.poller.spin_budget = 4;
    c.mem.mlock = MlockPolicy::Off;
    c.ops.slab_size = 24;
    c.ops.max_sockets = 8;
    c.qp.send_depth = 4;
    c.qp.recv_depth = 4;
    c.qp.max_sge = 4;
    c.qp.cq_depth = 24;
    c.qp.rnr_queue_max = 2;
    c.mr_cache.enabled = flags & 1 != 0;
    c.mr_cache.max_entries = 3;
    c.mr_cache.max_bytes = 8 << 10;
    // Bounds, never reached when the engine is right: a close that has to
    // wait fails the check after it.
    c.close.wait_ms = 10_000;
    c.close.quiesce_timeout_ms = 10_000;
    // Attempts toward the TCP-only host stay pending (their timer thread
    // waits) until closed: the program never depends on time.
    c.connect.timeout_ms = 600_000;
    c.connect.backlog_max = 2;
    c.limits.max_msg_size = 4096;
    c.limits.max_rdma_size = 8192;
    c.limits.rdma_threshold = 1024;
    c
}

/// Runs `data` as a program of SPI calls; panics when an invariant fails.
pub fn spi_calls(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut d = Driver::new(config(flags));
    let mut n = 0;
    while !input.is_empty() && n < MAX_CALLS {
        let call = Call::decode(&mut input);
        d.run(call);
        n += 1;
    }
    d.finish();
}

// ----------------------------------------------------------------------
// The program
// ----------------------------------------------------------------------

/// A socket argument: an index into every descriptor handed out so far
/// (live or closed), or a raw value.
#[derive(Clone, Copy, Debug)]
enum Sock {
    Known(u8),
    Raw(usize),
}

impl Sock {
    fn decode(i: &mut Input) -> Sock {
        match i.u8() {
            b @ 0..=0xEF => Sock::Known(b),
            0xF0 => Sock::Raw(0),
            0xF1 => Sock::Raw(INVALID_SOCKET),
            b => Sock::Raw((i.u32() as usize) << 32 | usize::from(b & 0xF)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Ip {
    Own,
    Any,
    TcpOnly,
    Unknown,
    OtherNet,
    Broadcast,
}

impl Ip {
    fn decode(i: &mut Input) -> Ip {
        match i.u8() % 8 {
            0..=2 => Ip::Own,
            3 => Ip::Any,
            4 => Ip::TcpOnly,
            5 => Ip::Unknown,
            6 => Ip::OtherNet,
            _ => Ip::Broadcast,
        }
    }

    fn addr(self) -> Ipv4Addr {
        match self {
            Ip::Own => OWN_IP,
            Ip::Any => Ipv4Addr::UNSPECIFIED,
            Ip::TcpOnly => TCP_ONLY_IP,
            Ip::Unknown => UNKNOWN_IP,
            Ip::OtherNet => OTHER_NET_IP,
            Ip::Broadcast => Ipv4Addr::BROADCAST,
        }
    }
}

/// Ports: a few fixed ones so that binds, listens and connects meet.
fn decode_port(i: &mut Input) -> u16 {
    match i.u8() % 8 {
        0 => 0,
        b @ 1..=5 => 7000 + u16::from(b),
        _ => i.u16(),
    }
}

/// Where a buffer or registration lies.
#[derive(Clone, Copy, Debug)]
enum Addr {
    /// At this offset into the arena (taken modulo its size).
    Arena(u16),
    Null,
    /// Never-mapped memory.
    Kernel(u16),
}

impl Addr {
    fn get(self, arena: &Region) -> usize {
        match self {
            Addr::Arena(off) => arena.addr() + usize::from(off) % ARENA,
            Addr::Null => 0,
            Addr::Kernel(off) => KERNEL_HALF + usize::from(off),
        }
    }
}

/// A memory handle argument: an index into the handles `register_memory`
/// returned (on any socket), or a raw value.
#[derive(Clone, Copy, Debug)]
enum Handle {
    Known(u8),
    Raw(u64),
}

impl Handle {
    fn decode(i: &mut Input) -> Handle {
        match i.u8() {
            b @ 0..=0xEF => Handle::Known(b),
            0xF0 => Handle::Raw(0),
            _ => Handle::Raw(u64::from(i.u32())),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Buf {
    at: Addr,
    len: u32,
    handle: Handle,
}

/// Decodes a buffer list; `with_handle` for `WSABUFEX` lists.
fn decode_bufs(i: &mut Input, with_handle: bool) -> Vec<Buf> {
    let n = match i.u8() {
        0xF8..=0xFF => MAX_SGE + 1,
        c => usize::from(c % 5),
    };
    (0..n)
        .map(|_| {
            let kind = i.u8();
            let off = i.u16();
            let len = match kind % 8 {
                5 => i.u32(),
                _ => u32::from(i.u16()) % 4096,
            };
            let at = match kind % 8 {
                6 => Addr::Null,
                7 => Addr::Kernel(off),
                _ => Addr::Arena(off),
            };
            let handle = if with_handle {
                Handle::decode(i)
            } else {
                Handle::Raw(0)
            };
            Buf { at, len, handle }
        })
        .collect()
}

/// A range to register: inside the arena (clamped to it, the caller's
/// contract), or one that is not memory at all.
#[derive(Clone, Copy, Debug)]
enum Range {
    Arena { off: u16, len: u16 },
    Null { len: u16 },
    Kernel { len: u16 },
    Wrapping,
}

impl Range {
    fn decode(i: &mut Input) -> Range {
        let kind = i.u8();
        let (off, len) = (i.u16(), i.u16());
        match kind % 16 {
            13 => Range::Null { len },
            14 => Range::Kernel { len },
            15 => Range::Wrapping,
            _ => Range::Arena { off, len },
        }
    }

    /// `(address, length)`; an arena range never leaves the arena.
    fn get(self, arena: &Region) -> (usize, usize) {
        match self {
            Range::Arena { off, len } => {
                let off = usize::from(off) % ARENA;
                (arena.addr() + off, usize::from(len).min(ARENA - off))
            }
            Range::Null { len } => (0, usize::from(len)),
            Range::Kernel { len } => (KERNEL_HALF, usize::from(len)),
            Range::Wrapping => (usize::MAX - 4095, 8192),
        }
    }
}

/// Memory registration flags: mostly valid ones.
fn decode_mem_flags(i: &mut Input) -> u32 {
    match i.u8() % 8 {
        0..=1 => MEM_READ,
        2..=3 => MEM_WRITE,
        4..=5 => MEM_READWRITE,
        6 => 0,
        _ => i.u32(),
    }
}

/// An RDMA descriptor argument: one that `register_rdma_memory` wrote (any
/// socket's), optionally with one byte changed, cut to `len` bytes.
#[derive(Clone, Copy, Debug)]
struct Desc {
    index: u8,
    flip: Option<(u8, u8)>,
    len: u8,
}

impl Desc {
    fn decode(i: &mut Input) -> Desc {
        let index = i.u8();
        let m = i.u8();
        let flip = (m & 0x80 != 0).then(|| (m % 32, i.u8()));
        let len = match m & 0x60 {
            0x60 => i.u8() % 40,
            _ => 32,
        };
        Desc { index, flip, len }
    }
}

/// Options: the ones the provider knows and a few it does not.
fn decode_opt(i: &mut Input) -> (i32, i32) {
    let level = match i.u8() % 4 {
        0 | 1 => SOL_SOCKET,
        2 => IPPROTO_TCP,
        _ => i.u8().into(),
    };
    let name = match i.u8() % 10 {
        0 => SO_MAX_MSG_SIZE,
        1 => SO_MAX_RDMA_SIZE,
        2 | 3 => SO_RDMA_THRESHOLD_SIZE,
        4 => SO_DEBUG,
        5 => TCP_NODELAY,
        6 => SO_GROUP_ID,
        7 => SO_GROUP_PRIORITY,
        _ => i.u16().into(),
    };
    (level, name)
}

#[derive(Clone, Debug)]
enum Call {
    Socket {
        af: i32,
        ty: i32,
        protocol: i32,
        group: u32,
        flags: u32,
        dup: u64,
    },
    Bind {
        s: Sock,
        ip: Ip,
        port: u16,
    },
    Listen {
        s: Sock,
        backlog: i32,
    },
    Connect {
        s: Sock,
        ip: Ip,
        port: u16,
        caller_data: bool,
    },
    Accept {
        s: Sock,
        condition: Condition,
    },
    EventSelect {
        s: Sock,
        event: Option<u8>,
        mask: i32,
    },
    EnumEvents {
        s: Sock,
        event: Option<u8>,
    },
    Register {
        s: Sock,
        range: Range,
        flags: u32,
    },
    Deregister {
        s: Sock,
        handle: Handle,
    },
    RegisterRdma {
        s: Sock,
        range: Range,
        flags: u32,
        block: u8,
    },
    DeregisterRdma {
        s: Sock,
        desc: Desc,
    },
    CacheCallback {
        range: Range,
    },
    Send {
        s: Sock,
        bufs: Vec<Buf>,
        flags: u32,
        poll: bool,
    },
    Recv {
        s: Sock,
        bufs: Vec<Buf>,
        poll: bool,
    },
    Rdma {
        write: bool,
        s: Sock,
        bufs: Vec<Buf>,
        desc: Desc,
        offset: u32,
        flags: u32,
        poll: bool,
    },
    GetOpt {
        s: Sock,
        level: i32,
        name: i32,
        len: u8,
    },
    SetOpt {
        s: Sock,
        level: i32,
        name: i32,
        value: u32,
        len: u8,
    },
    OverlappedResult {
        op: u8,
        s: Option<Sock>,
    },
    Progress {
        s: Option<Sock>,
    },
    Close {
        s: Sock,
    },
    Query {
        s: Sock,
        what: u8,
        guid: u8,
    },
    /// A connected pair on `port` (listener closed again): the fast way
    /// into the data path.
    Pair {
        port: u16,
    },
    Startup,
    Cleanup,
}

impl Call {
    const COUNT: u8 = 24;

    fn decode(i: &mut Input) -> Call {
        match i.u8() % Call::COUNT {
            0 => {
                let v = i.u8();
                if v < 0xE0 {
                    Call::Socket {
                        af: AF_INET,
                        ty: SOCK_STREAM,
                        protocol: if v & 1 == 0 { IPPROTO_TCP } else { 0 },
                        group: 0,
                        flags: WSA_FLAG_OVERLAPPED,
                        dup: 0,
                    }
                } else {
                    let w = i.u32();
                    Call::Socket {
                        af: if v & 1 != 0 {
                            (w & 0xFF) as i32
                        } else {
                            AF_INET
                        },
                        ty: if v & 2 != 0 {
                            (w >> 8 & 0xFF) as i32
                        } else {
                            SOCK_STREAM
                        },
                        protocol: if v & 4 != 0 {
                            (w >> 16 & 0xFF) as i32
                        } else {
                            IPPROTO_TCP
                        },
                        group: u32::from(v & 8 != 0),
                        flags: if v & 16 != 0 { w } else { WSA_FLAG_OVERLAPPED },
                        dup: u64::from(v & 0x10 != 0 && w & 1 != 0),
                    }
                }
            }
            1 => Call::Bind {
                s: Sock::decode(i),
                ip: Ip::decode(i),
                port: decode_port(i),
            },
            2 => Call::Listen {
                s: Sock::decode(i),
                backlog: match i.u8() {
                    0xFF => SOMAXCONN,
                    0xFE => i32::MIN,
                    b => i32::from(b % 4),
                },
            },
            3 => Call::Connect {
                s: Sock::decode(i),
                ip: Ip::decode(i),
                port: decode_port(i),
                caller_data: i.u8() == 0xFF,
            },
            4 => Call::Accept {
                s: Sock::decode(i),
                condition: match i.u8() % 8 {
                    0..=4 => Condition::Accept,
                    5 | 6 => Condition::Reject,
                    _ => Condition::Defer,
                },
            },
            5 => Call::EventSelect {
                s: Sock::decode(i),
                event: match i.u8() % 3 {
                    2 => None,
                    e => Some(e),
                },
                mask: match i.u8() % 5 {
                    0 => FD_ACCEPT,
                    1 => FD_CONNECT,
                    2 => FD_ACCEPT | FD_CONNECT,
                    3 => 0,
                    _ => i.u16().into(),
                },
            },
            6 => Call::EnumEvents {
                s: Sock::decode(i),
                event: match i.u8() % 3 {
                    2 => None,
                    e => Some(e),
                },
            },
            7 => Call::Register {
                s: Sock::decode(i),
                range: Range::decode(i),
                flags: decode_mem_flags(i),
            },
            8 => Call::Deregister {
                s: Sock::decode(i),
                handle: Handle::decode(i),
            },
            9 => Call::RegisterRdma {
                s: Sock::decode(i),
                range: Range::decode(i),
                flags: decode_mem_flags(i),
                block: match i.u8() {
                    b @ 0xF0..=0xFF => b % 40,
                    _ => 32,
                },
            },
            10 => Call::DeregisterRdma {
                s: Sock::decode(i),
                desc: Desc::decode(i),
            },
            11 => Call::CacheCallback {
                range: Range::decode(i),
            },
            12 | 13 => {
                let s = Sock::decode(i);
                let bufs = decode_bufs(i, false);
                let f = i.u8();
                Call::Send {
                    s,
                    bufs,
                    flags: if f == 0xFF { 1 } else { 0 },
                    poll: f & 1 != 0,
                }
            }
            14 | 15 => {
                let s = Sock::decode(i);
                let bufs = decode_bufs(i, false);
                Call::Recv {
                    s,
                    bufs,
                    poll: i.bool(),
                }
            }
            16 => {
                let s = Sock::decode(i);
                let bufs = decode_bufs(i, true);
                let desc = Desc::decode(i);
                let f = i.u8();
                let offset = match f & 0x30 {
                    0x30 => i.u32(),
                    _ => u32::from(i.u16()) % 4096,
                };
                Call::Rdma {
                    write: f & 2 == 0,
                    s,
                    bufs,
                    desc,
                    offset,
                    flags: if f == 0xFF { 1 } else { 0 },
                    poll: f & 1 != 0,
                }
            }
            17 => {
                let s = Sock::decode(i);
                let (level, name) = decode_opt(i);
                Call::GetOpt {
                    s,
                    level,
                    name,
                    len: i.u8() % 9,
                }
            }
            18 => {
                let s = Sock::decode(i);
                let (level, name) = decode_opt(i);
                Call::SetOpt {
                    s,
                    level,
                    name,
                    value: i.u32(),
                    len: i.u8() % 9,
                }
            }
            19 => {
                let op = i.u8();
                let s = i.bool().then(|| Sock::decode(i));
                Call::OverlappedResult { op, s }
            }
            20 => Call::Progress {
                s: i.bool().then(|| Sock::decode(i)),
            },
            21 => Call::Close { s: Sock::decode(i) },
            22 => Call::Query {
                s: Sock::decode(i),
                what: i.u8(),
                guid: i.u8(),
            },
            _ => match i.u8() % 8 {
                0 => Call::Startup,
                1 => Call::Cleanup,
                p => Call::Pair {
                    port: 7100 + u16::from(p),
                },
            },
        }
    }
}

// ----------------------------------------------------------------------
// The switch double
// ----------------------------------------------------------------------

#[derive(Default)]
struct Books {
    next: usize,
    /// Live switch handles and the descriptor each was created for.
    live: HashMap<SwitchHandle, usize>,
    /// Handles already closed.
    closed: HashSet<SwitchHandle>,
    /// Descriptor → its switch handle (last one created).
    by_context: HashMap<usize, SwitchHandle>,
    /// Completion upcalls per overlapped record (by address).
    completions: HashMap<usize, u32>,
    violations: Vec<String>,
}

/// Keeps the books of every upcall and notes each rule an upcall breaks;
/// the driver fails on the first violation after the call that caused it.
#[derive(Default)]
struct BookSwitch {
    books: Mutex<Books>,
}

impl BookSwitch {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Switch for BookSwitch {
    fn create_socket_handle(&self, _: u32, context: usize) -> WsaResult<SwitchHandle> {
        let mut b = self.books();
        b.next += 1;
        // Upper bits set: never equal to a descriptor (SOCK-1).
        let h = SwitchHandle(0x5A00_0000_0000_0000 | b.next);
        if context == 0 || context == INVALID_SOCKET {
            b.violations
                .push(format!("create_socket_handle with context {context:#x}"));
        }
        if b.live.values().any(|&c| c == context) {
            b.violations
                .push(format!("second live handle for descriptor {context:#x}"));
        }
        b.live.insert(h, context);
        b.by_context.insert(context, h);
        Ok(h)
    }

    fn close_socket_handle(&self, h: SwitchHandle) -> WsaResult<()> {
        let mut b = self.books();
        if b.live.remove(&h).is_none() {
            b.violations
                .push(format!("close_socket_handle of a dead handle {h:?}"));
        }
        b.closed.insert(h);
        Ok(())
    }

    fn query_socket_handle_context(&self, h: SwitchHandle) -> WsaResult<usize> {
        self.books()
            .live
            .get(&h)
            .copied()
            .ok_or(WsaError::WSAENOTSOCK)
    }

    fn complete_overlapped_request(
        &self,
        h: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        let mut b = self.books();
        if !b.live.contains_key(&h) {
            b.violations
                .push(format!("completion upcall with a dead handle {h:?}"));
        }
        if !ov.wants_upcall() {
            b.violations
                .push("completion upcall for an op with hEvent bit 0 set".into());
        }
        if let Err(e) = completion_code(error) {
            b.violations.push(e);
        }
        let n = b.completions.entry(ov as *const _ as usize).or_default();
        *n += 1;
        let n = *n;
        if n > 1 {
            b.violations
                .push(format!("op completed {n} times (error {error})"));
        }
        drop(b);
        ov.complete(error, bytes);
        Ok(())
    }
}

/// Whether `code` may be an op's completion status.
fn completion_code(code: u32) -> Result<(), String> {
    let e = match i32::try_from(code).ok().map(WsaError::from_code) {
        _ if code == 0 => return Ok(()),
        Some(Some(e)) => e,
        _ => return Err(format!("completion status {code} is no Winsock code")),
    };
    match e {
        WsaError::WSA_IO_PENDING
        | WsaError::WSA_IO_INCOMPLETE
        | WsaError::WSAEINPROGRESS
        | WsaError::WSAEDISCON
        | WsaError::WSAEWOULDBLOCK => Err(format!("completion status {e}")),
        _ => Ok(()),
    }
}

// ----------------------------------------------------------------------
// The driver
// ----------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Send,
    Recv,
    Rdma,
}

/// An op the driver started (or tried to).
struct Op {
    ov: usize,
    sock: ProviderSocket,
    kind: Kind,
    total: u64,
    started: bool,
    /// Completion seen and checked; `Internal` is [`SEEN`] since.
    seen: bool,
}

/// Memory the provider may still point into: the arena and the overlapped
/// records. Released only after a clean finish; if a check panicked, it
/// is leaked instead, since the provider may still hold pointers into it.
struct Keep {
    arena: Option<Region>,
    /// Boxed: the provider keeps pointers to records while `ovs` grows.
    #[allow(clippy::vec_box)]
    ovs: Vec<Box<Overlapped>>,
}

impl Drop for Keep {
    fn drop(&mut self) {
        if std::thread::panicking() {
            std::mem::forget(self.arena.take());
            std::mem::forget(std::mem::take(&mut self.ovs));
        }
    }
}

struct Driver {
    // Field order is drop order: the provider goes before the memory.
    p: Provider,
    nic: Arc<SoftNic>,
    _net: Arc<SoftNetwork>,
    sw: Arc<BookSwitch>,
    /// Our startup count (the provider's refcount).
    started: u32,
    /// Every descriptor handed out, in order.
    socks: Vec<ProviderSocket>,
    live: HashSet<ProviderSocket>,
    handles: Vec<u64>,
    descs: Vec<[u8; 32]>,
    events: [Arc<Event>; 2],
    ops: Vec<Op>,
    /// Indices into `ops` of ops not yet seen complete.
    pending: Vec<usize>,
    /// A connect toward the TCP-only host started a timer thread.
    timers: bool,
    /// An op that wants an upcall was asked for, so (run-to-completion
    /// mode) the provider's upcall helper thread may run: it reports completions on its
    /// own schedule, also while a close begins.
    upcall_helper: bool,
    /// Calls run so far, for the failure report.
    history: Vec<Call>,
    /// Print every call and its result (`SANPATH_FUZZ_TRACE` set).
    trace: bool,
    keep: Keep,
}

impl Driver {
    fn new(config: Config) -> Driver {
        let net = SoftNetwork::new();
        net.add_tcp_only_host(TCP_ONLY_IP);
        let nic = net
            .attach(config.soft_nic(vec![OWN_IP]))
            .expect("attach a soft NIC");
        let p = Provider::with_nic(config, nic.clone()).expect("provider");
        let sw = Arc::new(BookSwitch::default());
        p.startup(WSD_VERSION, sw.clone(), 1).expect("startup");
        let arena = Region::new(ARENA, MlockPolicy::Off).expect("arena");
        Driver {
            p,
            nic,
            _net: net,
            sw,
            started: 1,
            socks: Vec::new(),
            live: HashSet::new(),
            handles: Vec::new(),
            descs: Vec::new(),
            events: [Arc::new(Event::new()), Arc::new(Event::new())],
            ops: Vec::new(),
            pending: Vec::new(),
            timers: false,
            upcall_helper: false,
            history: Vec::new(),
            trace: std::env::var_os("SANPATH_FUZZ_TRACE").is_some(),
            keep: Keep {
                arena: Some(arena),
                ovs: Vec::new(),
            },
        }
    }

    /// Fails the run with the program so far.
    #[track_caller]
    fn fail(&self, what: String) -> ! {
        let mut trace = String::new();
        for (i, c) in self.history.iter().enumerate() {
            trace.push_str(&format!("\n  {i:3}: {c:?}"));
        }
        panic!("spi_calls invariant broken: {what}\nprogram so far:{trace}");
    }

    #[track_caller]
    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(what());
        }
    }

    fn arena(&self) -> &Region {
        self.keep.arena.as_ref().expect("arena kept until the end")
    }

    fn sock(&self, s: Sock) -> ProviderSocket {
        match s {
            Sock::Known(i) if self.socks.is_empty() => ProviderSocket(usize::from(i) + 1),
            Sock::Known(i) => self.socks[usize::from(i) % self.socks.len()],
            Sock::Raw(v) => ProviderSocket(v),
        }
    }

    fn handle(&self, h: Handle) -> u64 {
        match h {
            Handle::Known(_) if self.handles.is_empty() => 1,
            Handle::Known(i) => self.handles[usize::from(i) % self.handles.len()],
            Handle::Raw(v) => v,
        }
    }

    fn desc(&self, d: Desc) -> Vec<u8> {
        let mut bytes = if self.descs.is_empty() {
            [0u8; 32]
        } else {
            self.descs[usize::from(d.index) % self.descs.len()]
        };
        if let Some((at, x)) = d.flip {
            bytes[usize::from(at) % 32] ^= x;
        }
        let mut v = bytes.to_vec();
        v.resize(usize::from(d.len), 0);
        v
    }

    /// Checks a result against what any call may return, and a call on a
    /// descriptor that is not live against CLOSE-7.
    #[track_caller]
    fn result<T: std::fmt::Debug>(&self, s: Option<ProviderSocket>, r: &WsaResult<T>) {
        if self.trace {
            if let Some(c) = self.history.last() {
                eprintln!("{:3} {c:?}\n    -> {r:?}", self.history.len() - 1);
            }
        }
        if let Err(e) = r {
            self.check(
                !matches!(
                    e,
                    WsaError::WSAEINPROGRESS | WsaError::WSA_IO_PENDING | WsaError::WSAEDISCON
                ),
                || format!("a call returned {e}"),
            );
        }
        if let Some(s) = s {
            if !self.live.contains(&s) {
                let dead_ok = match r {
                    Err(WsaError::WSAENOTSOCK) => true,
                    Err(WsaError::WSANOTINITIALISED) => self.started == 0,
                    _ => false,
                };
                self.check(dead_ok, || {
                    format!("call on non-live descriptor {s:?} gave {r:?}")
                });
            }
        }
    }

    /// A descriptor the provider just handed out (socket or accept).
    fn new_socket(&mut self, s: ProviderSocket) {
        self.check(s.0 != 0 && s.0 != INVALID_SOCKET, || {
            format!("descriptor {s:?}")
        });
        self.check(!self.socks.contains(&s), || {
            format!("descriptor {s:?} handed out twice")
        });
        let h = self.sw.books().by_context.get(&s.0).copied();
        let got = self.p.switch_handle(s);
        self.check(h.is_some() && got == Ok(h.unwrap()), || {
            format!("switch handle of {s:?}: provider says {got:?}, switch made {h:?}")
        });
        self.socks.push(s);
        self.live.insert(s);
    }

    /// A fresh overlapped record, kept until the end of the run.
    fn new_ov(&mut self, poll: bool) -> usize {
        self.keep.ovs.push(Box::new(Overlapped::new(if poll {
            0x1001
        } else {
            0x1000
        })));
        self.keep.ovs.len() - 1
    }

    /// Records a data call's outcome.
    fn op_started(
        &mut self,
        ov: usize,
        s: ProviderSocket,
        kind: Kind,
        total: u64,
        r: WsaResult<()>,
    ) {
        self.result(Some(s), &r);
        let started = r.is_ok();
        if started {
            self.check(self.live.contains(&s), || {
                "op started on a dead socket".into()
            });
        }
        self.ops.push(Op {
            ov,
            sock: s,
            kind,
            total,
            started,
            seen: false,
        });
        if started {
            self.pending.push(self.ops.len() - 1);
        }
        // The provider starts its helper before it validates the buffers,
        // so an op that failed may have started it too.
        self.upcall_helper |= self.keep.ovs[ov].wants_upcall();
    }

    /// Checks every op that completed since the last look.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            let op = &self.ops[self.pending[i]];
            let ov = &self.keep.ovs[op.ov];
            if ov.is_pending() {
                i += 1;
                continue;
            }
            let status = ov.internal.load(Ordering::Acquire);
            let bytes = ov.internal_high.load(Ordering::Acquire) as u64;
            let err = ov.offset_high.load(Ordering::Acquire) as usize;
            let upcalls = self
                .sw
                .books()
                .completions
                .get(&(&**ov as *const Overlapped as usize))
                .copied()
                .unwrap_or(0);
            let want = u32::from(ov.wants_upcall());
            let (kind, total) = (op.kind, op.total);
            self.check(upcalls == want, || {
                format!("{kind:?} op completed with {upcalls} upcalls, want {want}")
            });
            self.check(status == err, || {
                format!("{kind:?} op: Internal {status} but error {err}")
            });
            if let Err(e) = completion_code(status as u32) {
                self.fail(e);
            }
            if status == 0 {
                let fits = match kind {
                    Kind::Recv => bytes <= total,
                    Kind::Send | Kind::Rdma => bytes == total,
                };
                self.check(fits, || {
                    format!("{kind:?} op of {total} bytes reported {bytes}")
                });
            }
            ov.internal.store(SEEN, Ordering::Release);
            let idx = self.pending.swap_remove(i);
            self.ops[idx].seen = true;
        }
    }

    /// Ops of `s` not yet seen complete.
    fn pending_of(&self, s: ProviderSocket) -> Vec<usize> {
        self.pending
            .iter()
            .copied()
            .filter(|&i| self.ops[i].sock == s)
            .collect()
    }

    /// After `s` was closed (by close_socket or the last cleanup): its
    /// pending ops are complete with `WSA_OPERATION_ABORTED` (or, where
    /// `raced`, possibly with their own result: see the callers), its handle
    /// closed.
    fn closed(&mut self, s: ProviderSocket, pending: &[usize], raced: bool) {
        for &i in pending {
            let ov = &self.keep.ovs[self.ops[i].ov];
            let kind = self.ops[i].kind;
            self.check(!ov.is_pending(), || {
                format!("{kind:?} op of {s:?} still pending after close")
            });
            let status = ov.internal.load(Ordering::Acquire);
            let aborted = WsaError::WSA_OPERATION_ABORTED.code() as usize;
            self.check(status == aborted || raced, || {
                format!("{kind:?} op pending at close of {s:?} completed with {status}")
            });
        }
        let b = self.sw.books();
        let h = b.by_context.get(&s.0).copied();
        let ok = h.is_some_and(|h| b.closed.contains(&h) && !b.live.contains_key(&h));
        drop(b);
        self.check(ok, || {
            format!("handle {h:?} of {s:?} not closed when close returned")
        });
        self.live.remove(&s);
    }

    fn run(&mut self, call: Call) {
        self.history.push(call.clone());
        match call {
            Call::Socket {
                af,
                ty,
                protocol,
                group,
                flags,
                dup,
            } => {
                let r = self.p.socket(af, ty, protocol, group, flags, dup);
                self.result(None, &r);
                if self.started == 0 {
                    self.check(r == Err(WsaError::WSANOTINITIALISED), || {
                        format!("socket before startup: {r:?}")
                    });
                }
                if let Ok(s) = r {
                    self.new_socket(s);
                }
            }
            Call::Bind { s, ip, port } => {
                let s = self.sock(s);
                let r = self.p.bind(s, SocketAddrV4::new(ip.addr(), port));
                self.result(Some(s), &r);
            }
            Call::Listen { s, backlog } => {
                let s = self.sock(s);
                let r = self.p.listen(s, backlog);
                self.result(Some(s), &r);
            }
            Call::Connect {
                s,
                ip,
                port,
                caller_data,
            } => {
                let s = self.sock(s);
                let data: &[u8] = if caller_data { b"hello" } else { b"" };
                let r = self.p.connect(s, SocketAddrV4::new(ip.addr(), port), data);
                self.result(Some(s), &r);
                if r.is_ok() && matches!(ip, Ip::TcpOnly) {
                    self.timers = true;
                }
            }
            Call::Accept { s, condition } => {
                let s = self.sock(s);
                let mut asked = false;
                let r = self.p.accept(s, &mut |_| {
                    asked = true;
                    condition
                });
                self.result(Some(s), &r);
                match (&r, condition) {
                    (Ok((new, _)), Condition::Accept) => self.new_socket(*new),
                    (Ok(_), _) => self.fail(format!("accept with {condition:?} gave {r:?}")),
                    (Err(WsaError::WSAECONNREFUSED), Condition::Reject) => {}
                    (Err(WsaError::WSATRY_AGAIN), Condition::Defer) => {}
                    (Err(e), _) => self.check(
                        !asked
                            || condition == Condition::Accept
                                && matches!(e, WsaError::WSAEMFILE | WsaError::WSAENOBUFS),
                        || format!("accept asked the condition ({condition:?}), then {e}"),
                    ),
                }
            }
            Call::EventSelect { s, event, mask } => {
                let s = self.sock(s);
                let ev = event.map(|e| self.events[usize::from(e)].clone());
                let r = self.p.event_select(s, ev, mask);
                self.result(Some(s), &r);
            }
            Call::EnumEvents { s, event } => {
                let s = self.sock(s);
                let ev = event.map(|e| self.events[usize::from(e)].clone());
                let r = self.p.enum_network_events(s, ev.as_deref());
                self.result(Some(s), &r);
                if let Ok(ne) = r {
                    for (bit, &code) in ne.error_codes.iter().enumerate() {
                        let valid = code == 0 || WsaError::from_code(code).is_some();
                        self.check(valid, || format!("FD bit {bit} with code {code}"));
                        self.check(code == 0 || ne.network_events & 1 << bit != 0, || {
                            format!("FD bit {bit} has code {code} but is not recorded")
                        });
                    }
                }
            }
            Call::Register { s, range, flags } => {
                let s = self.sock(s);
                let (addr, len) = range.get(self.arena());
                // SAFETY: an arena range lies inside the arena, which lives
                // until after the provider's last cleanup (and is leaked if
                // the run fails); any other range is not memory, which the
                // provider must refuse without touching it.
                let r = unsafe {
                    self.p
                        .register_memory(s, addr as *mut u8, len as u32, flags)
                };
                self.result(Some(s), &r);
                if let Ok(h) = r {
                    self.check(h != 0, || "memory handle 0".into());
                    self.check(matches!(range, Range::Arena { .. }) && len > 0, || {
                        format!("registered {range:?} ({addr:#x}+{len})")
                    });
                    self.handles.push(h);
                }
            }
            Call::Deregister { s, handle } => {
                let s = self.sock(s);
                let h = self.handle(handle);
                let r = self.p.deregister_memory(s, h);
                self.result(Some(s), &r);
            }
            Call::RegisterRdma {
                s,
                range,
                flags,
                block,
            } => {
                let s = self.sock(s);
                let (addr, len) = range.get(self.arena());
                let mut out = vec![0u8; usize::from(block)];
                // SAFETY: as for Register.
                let r = unsafe {
                    self.p
                        .register_rdma_memory(s, addr as *mut u8, len as u32, flags, &mut out)
                };
                self.result(Some(s), &r);
                if let Ok(n) = r {
                    self.check(n == 32 && out.len() >= 32, || {
                        format!("descriptor of {n} bytes into a block of {block}")
                    });
                    let d: [u8; 32] = out[..32].try_into().expect("32 bytes");
                    self.descs.push(d);
                }
            }
            Call::DeregisterRdma { s, desc } => {
                let s = self.sock(s);
                let d = self.desc(desc);
                let r = self.p.deregister_rdma_memory(s, &d);
                self.result(Some(s), &r);
            }
            Call::CacheCallback { range } => {
                let (addr, len) = range.get(self.arena());
                let r = self
                    .p
                    .memory_registration_cache_callback(addr as *mut u8, len);
                self.result(None, &r);
            }
            Call::Send {
                s,
                bufs,
                flags,
                poll,
            } => {
                let s = self.sock(s);
                let arena = self.arena();
                let wsabufs: Vec<WsaBuf> = bufs
                    .iter()
                    .map(|b| WsaBuf {
                        len: b.len,
                        buf: b.at.get(arena) as *mut u8,
                    })
                    .collect();
                let total = bufs.iter().map(|b| u64::from(b.len)).sum();
                let ov = self.new_ov(poll);
                let ovr: &Overlapped = &self.keep.ovs[ov];
                // SAFETY: buffers the provider accepts lie in registered
                // arena memory (it refuses the others without touching
                // them); the arena and the boxed record live until after
                // the last cleanup completed every op.
                let r = unsafe { self.p.send(s, &wsabufs, flags, ovr) };
                self.op_started(ov, s, Kind::Send, total, r);
            }
            Call::Recv { s, bufs, poll } => {
                let s = self.sock(s);
                let arena = self.arena();
                let wsabufs: Vec<WsaBuf> = bufs
                    .iter()
                    .map(|b| WsaBuf {
                        len: b.len,
                        buf: b.at.get(arena) as *mut u8,
                    })
                    .collect();
                let total = bufs.iter().map(|b| u64::from(b.len)).sum();
                let ov = self.new_ov(poll);
                let ovr: &Overlapped = &self.keep.ovs[ov];
                // SAFETY: as for Send.
                let r = unsafe { self.p.recv(s, &wsabufs, ovr) };
                self.op_started(ov, s, Kind::Recv, total, r);
            }
            Call::Rdma {
                write,
                s,
                bufs,
                desc,
                offset,
                flags,
                poll,
            } => {
                let s = self.sock(s);
                let arena = self.arena();
                let bufs: Vec<WsaBufEx> = bufs
                    .iter()
                    .map(|b| WsaBufEx {
                        len: b.len,
                        buf: b.at.get(arena) as *mut u8,
                        handle: self.handle(b.handle) as usize,
                    })
                    .collect();
                let total = bufs.iter().map(|b| u64::from(b.len)).sum();
                let d = self.desc(desc);
                let ov = self.new_ov(poll);
                let ovr: &Overlapped = &self.keep.ovs[ov];
                // SAFETY: as for Send; the peer side of the transfer is an
                // exposed arena range, or the provider refuses it.
                let r = unsafe {
                    if write {
                        self.p.rdma_write(s, &bufs, &d, offset, flags, ovr)
                    } else {
                        self.p.rdma_read(s, &bufs, &d, offset, flags, ovr)
                    }
                };
                self.op_started(ov, s, Kind::Rdma, total, r);
            }
            Call::GetOpt {
                s,
                level,
                name,
                len,
            } => {
                let s = self.sock(s);
                let mut out = [0u8; 8];
                let r = self
                    .p
                    .get_sockopt(s, level, name, &mut out[..usize::from(len)]);
                self.result(Some(s), &r);
                if let Ok(n) = r {
                    self.check(n <= usize::from(len), || {
                        format!("get_sockopt wrote {n} bytes into {len}")
                    });
                }
            }
            Call::SetOpt {
                s,
                level,
                name,
                value,
                len,
            } => {
                let s = self.sock(s);
                let mut v = [0u8; 8];
                v[..4].copy_from_slice(&value.to_le_bytes());
                let r = self.p.set_sockopt(s, level, name, &v[..usize::from(len)]);
                self.result(Some(s), &r);
            }
            Call::OverlappedResult { op, s } => {
                let started: Vec<usize> = (0..self.ops.len())
                    .filter(|&i| self.ops[i].started)
                    .collect();
                if started.is_empty() {
                    return self.after();
                }
                let i = started[usize::from(op) % started.len()];
                let s = s.map_or(self.ops[i].sock, |s| self.sock(s));
                let ov: &Overlapped = &self.keep.ovs[self.ops[i].ov];
                let was_pending = ov.is_pending();
                let r = self.p.get_overlapped_result(s, ov, false);
                if r != Err(WsaError::WSA_IO_INCOMPLETE) {
                    self.result(Some(s), &r);
                }
                if self.live.contains(&s) {
                    // In run-to-completion mode the call itself may complete
                    // the op it was asked about (it polls the socket's CQ).
                    let err = ov.offset_high.load(Ordering::Acquire);
                    let ok = match r {
                        Err(WsaError::WSA_IO_INCOMPLETE) => was_pending,
                        Ok(_) => !ov.is_pending() && err == 0,
                        Err(e) => !ov.is_pending() && e.code() as u32 == err,
                    };
                    self.check(ok, || {
                        format!("get_overlapped_result {r:?}, pending {was_pending}, error {err}")
                    });
                }
            }
            Call::Progress { s } => {
                match s {
                    Some(s) => {
                        let s = self.sock(s);
                        self.p.progress_socket(s)
                    }
                    None => self.p.progress(),
                };
            }
            Call::Close { s } => {
                let s = self.sock(s);
                let pending = self.pending_of(s);
                let r = self.p.close_socket(s);
                self.result(Some(s), &r);
                if self.live.contains(&s) {
                    self.check(r.is_ok(), || format!("close_socket of live {s:?}: {r:?}"));
                    // The upcall helper may have reported an op's own
                    // completion between our last look and the close marking
                    // the socket (the completion was there first).
                    let raced = self.upcall_helper;
                    self.closed(s, &pending, raced);
                }
            }
            Call::Query { s, what, guid } => {
                let s = self.sock(s);
                match what % 6 {
                    0 => {
                        let g = match Extension::ALL.get(usize::from(guid) % 9) {
                            Some(e) => e.guid(),
                            None => [guid; 16],
                        };
                        let r = self.p.extension(&g);
                        self.result(None, &r);
                    }
                    1 => {
                        let r = self.p.address_list();
                        self.result(None, &r);
                        if let Ok(a) = r {
                            self.check(a == [OWN_IP], || format!("address list {a:?}"));
                        }
                    }
                    2 => {
                        let r = self.p.get_qos_by_name(s);
                        self.result(Some(s), &r);
                        self.check(r.is_err(), || "QoS is not supported".into());
                    }
                    3 => {
                        // For another process: the socket's receives end
                        // (0 bytes), its peer's wait for a rejoin that never
                        // comes (until close or the reset).
                        let r = self.p.duplicate_socket(s, 1);
                        self.result(Some(s), &r);
                    }
                    4 => {
                        let r = self.p.local_addr(s);
                        self.result(Some(s), &r);
                    }
                    _ => {
                        let r = self.p.switch_handle(s);
                        self.result(Some(s), &r);
                    }
                }
            }
            // Its sub-calls follow it in the history.
            Call::Pair { port } => self.pair(port),
            Call::Startup => {
                if self.started < 3 {
                    let r = self.p.startup(WSD_VERSION, self.sw.clone(), 1);
                    self.check(r.is_ok(), || format!("startup: {r:?}"));
                    self.started += 1;
                }
            }
            Call::Cleanup => {
                let r = self.p.cleanup();
                if self.started == 0 {
                    self.check(r == Err(WsaError::WSANOTINITIALISED), || {
                        format!("cleanup without startup: {r:?}")
                    });
                } else {
                    self.check(r.is_ok(), || format!("cleanup: {r:?}"));
                    self.started -= 1;
                    if self.started == 0 {
                        self.all_closed();
                    }
                }
            }
        }
        self.after();
    }

    /// After the last cleanup: every socket was closed.
    fn all_closed(&mut self) {
        let live: Vec<ProviderSocket> = self.live.iter().copied().collect();
        for s in live {
            let pending = self.pending_of(s);
            // The cleanup closes the sockets one after another: a completion
            // reaped while an earlier one closes is reported with its own
            // result if its socket was not closing yet.
            self.closed(s, &pending, true);
        }
        let stats = self.p.stats();
        self.check(stats.holds_nothing(), || {
            format!("after the last cleanup: {stats:?}")
        });
    }

    /// A connected pair through a listener on `port`, each step checked.
    fn pair(&mut self, port: u16) {
        let socket = Call::Socket {
            af: AF_INET,
            ty: SOCK_STREAM,
            protocol: IPPROTO_TCP,
            group: 0,
            flags: WSA_FLAG_OVERLAPPED,
            dup: 0,
        };
        let last = |d: &Driver| Sock::Raw(d.socks.last().map_or(0, |s| s.0));
        let n = self.socks.len();
        self.run(socket.clone());
        if self.socks.len() == n {
            return;
        }
        let l = last(self);
        self.run(Call::Bind {
            s: l,
            ip: Ip::Own,
            port,
        });
        self.run(Call::Listen { s: l, backlog: 1 });
        let n = self.socks.len();
        self.run(socket);
        if self.socks.len() > n {
            let c = last(self);
            self.run(Call::Connect {
                s: c,
                ip: Ip::Own,
                port,
                caller_data: false,
            });
            self.run(Call::Accept {
                s: l,
                condition: Condition::Accept,
            });
        }
        self.run(Call::Close { s: l });
    }

    /// Checks after every call.
    fn after(&mut self) {
        let v = std::mem::take(&mut self.sw.books().violations);
        if !v.is_empty() {
            self.fail(v.join("; "));
        }
        self.reap();
    }

    /// Drains, cleans up, and checks that nothing is left.
    fn finish(mut self) {
        self.p.progress();
        self.after();
        while self.started > 0 {
            self.run(Call::Cleanup);
        }
        for op in &self.ops {
            let ov = &self.keep.ovs[op.ov];
            let kind = op.kind;
            if op.started {
                self.check(op.seen, || format!("{kind:?} op never completed"));
                let status = ov.internal.load(Ordering::Acquire);
                self.check(status == SEEN, || {
                    format!("{kind:?} op completed again ({status}) after it was checked")
                });
            } else {
                let status = ov.internal.load(Ordering::Acquire);
                let upcalls = self
                    .sw
                    .books()
                    .completions
                    .get(&(&**ov as *const Overlapped as usize))
                    .copied();
                self.check(status == 0 && upcalls.is_none(), || {
                    format!("{kind:?} op that failed to start completed ({status}, {upcalls:?})")
                });
            }
        }
        let b = self.sw.books();
        let left = b.live.len();
        drop(b);
        self.check(left == 0, || format!("{left} switch handles never closed"));
        let t = self.p.registration_stats();
        self.check(t.live_entries == 0 && t.cached_entries == 0, || {
            format!("registrations left after cleanup: {t:?}")
        });
        if self.timers {
            self.check(timers_stop(), || {
                "connect timer threads keep running".into()
            });
        }
        // A connect the cleanup cancelled may still deliver its queue pair
        // on the thread that completes it, which sees the socket closed and
        // tears the queue pair down: released soon after the cleanup
        // returned, not left. A leak stays past the bound.
        let nic = &self.nic;
        let released = || {
            let n = nic.stats();
            n.live_regions == 0 && n.live_remote_keys == 0 && n.live_qps == 0
        };
        self.check(settles(released), || {
            format!("NIC resources left after cleanup: {:?}", nic.stats())
        });
    }
}

/// Waits (bounded) until no soft connect-timer thread runs in the process.
fn timers_stop() -> bool {
    settles(|| timer_threads() == 0)
}

/// Waits (bounded: 5 s) until `done()`; whether it came.
fn settles(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    for round in 0u32.. {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // What it waits for is another thread finishing (a cancelled timer
        // exits as soon as it is scheduled): yield first, then nap.
        if round < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    unreachable!("the loop returns by the deadline")
}

fn timer_threads() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end() == "soft-cm-timer")
        })
        .count()
}
