//! The SPI's vocabulary: the two socket handles (spec §2.3), the overlapped
//! record (§4.4), buffers, constants (§0.1), and the `Switch` upcall trait
//! (§2.2, the ★ upcalls).

use crate::error::WsaResult;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Our descriptor for a SAN socket: what the switch passes *to* the provider.
/// Never 0 and never `INVALID_SOCKET`; a closed descriptor is not reused for
/// the life of the provider's socket slot generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderSocket(pub usize);

/// The switch's handle for a socket, from `WPUCreateSocketHandle`: what the
/// provider passes in every upcall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SwitchHandle(pub usize);

/// `SOCKET_ERROR`.
pub const SOCKET_ERROR: i32 = -1;
/// `INVALID_SOCKET`.
pub const INVALID_SOCKET: usize = !0;
/// `WSS_OPERATION_IN_PROGRESS`: `Internal` of an op still pending.
pub const WSS_OPERATION_IN_PROGRESS: usize = 0x103;
pub const WSA_FLAG_OVERLAPPED: u32 = 0x01;
pub const AF_INET: i32 = 2;
pub const SOCK_STREAM: i32 = 1;
pub const IPPROTO_TCP: i32 = 6;
pub const SOL_SOCKET: i32 = 0xFFFF;
pub const TCP_NODELAY: i32 = 1;
pub const SO_DEBUG: i32 = 0x0001;
pub const SO_GROUP_ID: i32 = 0x2001;
pub const SO_GROUP_PRIORITY: i32 = 0x2002;
pub const SO_MAX_MSG_SIZE: i32 = 0x2003;
pub const SO_MAX_RDMA_SIZE: i32 = 0x700D;
pub const SO_RDMA_THRESHOLD_SIZE: i32 = 0x700E;
pub const SOMAXCONN: i32 = 0x7FFF_FFFF;
pub const FD_ACCEPT_BIT: usize = 3;
pub const FD_CONNECT_BIT: usize = 4;
pub const FD_ACCEPT: i32 = 1 << FD_ACCEPT_BIT;
pub const FD_CONNECT: i32 = 1 << FD_CONNECT_BIT;
pub const FD_MAX_EVENTS: usize = 10;
pub const MEM_READ: u32 = 1;
pub const MEM_WRITE: u32 = 2;
pub const MEM_READWRITE: u32 = 3;
pub const SIO_GET_EXTENSION_FUNCTION_POINTER: u32 = 0xC800_0006;
pub const SIO_ADDRESS_LIST_QUERY: u32 = 0x4800_0016;
/// SPI version 2.2 (low byte major, high byte minor).
pub const WSD_VERSION: u16 = 0x0202;

/// `WSAOVERLAPPED` in the Windows x64 layout (32 bytes). The switch owns it;
/// the provider writes `Offset`/`OffsetHigh` at completion and, when it makes
/// no upcall, `InternalHigh` then `Internal` (spec §4.4, §7-4). Fields are
/// atomics because the completing thread and a polling
/// `get_overlapped_result` run concurrently.
#[repr(C)]
#[derive(Debug)]
pub struct Overlapped {
    /// `WSS_OPERATION_IN_PROGRESS` while pending, then the completion status
    /// (stored last, with release ordering).
    pub internal: AtomicUsize,
    /// Bytes transferred; written before `internal`.
    pub internal_high: AtomicUsize,
    /// Result flags (written by the provider at completion).
    pub offset: AtomicU32,
    /// Winsock error of the op, 0 = success (written by the provider).
    pub offset_high: AtomicU32,
    /// `hEvent`; bit 0 set = do not notify (the switch polls).
    pub h_event: AtomicUsize,
}

impl Overlapped {
    /// A fresh record whose `hEvent` is `h_event`.
    pub const fn new(h_event: usize) -> Overlapped {
        Overlapped {
            internal: AtomicUsize::new(0),
            internal_high: AtomicUsize::new(0),
            offset: AtomicU32::new(0),
            offset_high: AtomicU32::new(0),
            h_event: AtomicUsize::new(h_event),
        }
    }

    /// Whether completion must be reported through
    /// `complete_overlapped_request` (`hEvent` bit 0 clear).
    pub fn wants_upcall(&self) -> bool {
        self.h_event.load(Ordering::Relaxed) & 1 == 0
    }

    /// Whether the op is still in progress (`Internal == 0x103`).
    pub fn is_pending(&self) -> bool {
        self.internal.load(Ordering::Acquire) == WSS_OPERATION_IN_PROGRESS
    }

    /// Marks the op started (spec §4.4 step 1).
    pub(crate) fn start(&self) {
        self.internal_high.store(0, Ordering::Relaxed);
        self.internal
            .store(WSS_OPERATION_IN_PROGRESS, Ordering::Release);
    }

    /// What `WPUCompleteOverlappedRequest` does with the record: bytes into
    /// `InternalHigh`, then `Internal` = status (release). Switch
    /// implementations call this from their upcall; the provider calls it
    /// itself for ops that make no upcall (§7-4).
    pub fn complete(&self, error: u32, bytes: u32) {
        self.internal_high.store(bytes as usize, Ordering::Relaxed);
        // The status must differ from 0x103; Winsock codes never equal it.
        self.internal.store(error as usize, Ordering::Release);
    }
}

/// `WSABUF` in the Windows x64 layout (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WsaBuf {
    pub len: u32,
    pub buf: *mut u8,
}

/// `WSABUFEX` in the Windows x64 layout (24 bytes): a buffer with the handle
/// `register_memory` returned for it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WsaBufEx {
    pub len: u32,
    pub buf: *mut u8,
    pub handle: usize,
}

/// `WSANETWORKEVENTS`: recorded network events and their error codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkEvents {
    pub network_events: i32,
    pub error_codes: [i32; FD_MAX_EVENTS],
}

/// What `WSPStartupEx` reports in `WSPDATA`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WspData {
    pub version: u16,
    pub high_version: u16,
    pub description: &'static str,
}

/// The switch side of the SPI: the upcalls a SAN provider makes (spec §2.2,
/// the ★ entries). Upcalls may come from engine threads; the provider never
/// holds one of its locks across an upcall, so implementations may call back
/// into the provider (§7-15).
pub trait Switch: Send + Sync {
    /// `WPUCreateSocketHandle`: the switch handle for a new socket whose
    /// context is `context` (the provider passes its own descriptor).
    fn create_socket_handle(
        &self,
        catalog_entry_id: u32,
        context: usize,
    ) -> WsaResult<SwitchHandle>;
    /// `WPUCloseSocketHandle`: the last upcall for `handle`.
    fn close_socket_handle(&self, handle: SwitchHandle) -> WsaResult<()>;
    /// `WPUQuerySocketHandleContext`.
    fn query_socket_handle_context(&self, handle: SwitchHandle) -> WsaResult<usize>;
    /// `WPUCompleteOverlappedRequest`: store `bytes` and `error` in `ov` (as
    /// [`Overlapped::complete`] does) and signal its event / completion port.
    fn complete_overlapped_request(
        &self,
        handle: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()>;
}

/// The switch's answer from the accept condition function (§4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// `CF_ACCEPT`.
    Accept,
    /// `CF_REJECT`.
    Reject,
    /// `CF_DEFER`: keep the request queued (§7-10).
    Defer,
}

/// What the condition function learns about an incoming request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRequestInfo {
    pub caller: std::net::SocketAddrV4,
    pub callee: std::net::SocketAddrV4,
}

/// The extension functions of spec §3.1, by GUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Extension {
    RegisterMemory,
    DeregisterMemory,
    RegisterRdmaMemory,
    DeregisterRdmaMemory,
    RdmaWrite,
    RdmaRead,
    MemoryRegistrationCacheCallback,
}

impl Extension {
    pub const ALL: [Extension; 7] = [
        Extension::RegisterMemory,
        Extension::DeregisterMemory,
        Extension::RegisterRdmaMemory,
        Extension::DeregisterRdmaMemory,
        Extension::RdmaWrite,
        Extension::RdmaRead,
        Extension::MemoryRegistrationCacheCallback,
    ];

    /// The GUID as the 16 bytes of a Windows `GUID` struct (Data1..3 little
    /// endian, Data4 as is).
    pub const fn guid(self) -> [u8; 16] {
        let (d1, d2, d3, d4): (u32, u16, u16, [u8; 8]) = match self {
            Extension::MemoryRegistrationCacheCallback => (
                0xE5DA_4AF8,
                0xD824,
                0x48CD,
                [0xA7, 0x99, 0x63, 0x37, 0xA9, 0x8E, 0xD2, 0xAF],
            ),
            other => (
                0xC0B4_22F5 + other as u32,
                0xF58C,
                0x11D1,
                [0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D],
            ),
        };
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        [
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ]
    }

    /// The extension a GUID names, if any.
    pub fn from_guid(guid: &[u8; 16]) -> Option<Extension> {
        Extension::ALL.into_iter().find(|e| &e.guid() == guid)
    }
}

/// One entry of `SIO_ADDRESS_LIST_QUERY`'s answer.
pub type LocalAddress = Ipv4Addr;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_x64_layouts() {
        assert_eq!(std::mem::size_of::<Overlapped>(), 32);
        assert_eq!(std::mem::size_of::<WsaBuf>(), 16);
        assert_eq!(std::mem::size_of::<WsaBufEx>(), 24);
    }

    #[test]
    fn extension_guids_match_ws2san() {
        // {C0B422F9-F58C-11D1-AD6C-00C04FA34A2D} = WSAID_RDMAWRITE
        assert_eq!(
            Extension::RdmaWrite.guid(),
            [
                0xF9, 0x22, 0xB4, 0xC0, 0x8C, 0xF5, 0xD1, 0x11, 0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3,
                0x4A, 0x2D
            ]
        );
        for e in Extension::ALL {
            assert_eq!(Extension::from_guid(&e.guid()), Some(e));
        }
        assert_eq!(Extension::from_guid(&[0; 16]), None);
    }
}
