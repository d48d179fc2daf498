//! The Windows x64 types, constants and function-pointer types of the SPI
//! (`winsock2.h`, `ws2spi.h`, `ddk/ws2san.h`), as `#[repr(C)]` Rust
//! definitions with explicit widths: `DWORD`/`ULONG`/`INT`/`LONG` are 32-bit,
//! `ULONG_PTR`/`SOCKET`/`HANDLE` pointer-sized. Names and field names are the
//! Windows ones, so that the generated header reads like the SDK and the
//! layout test can compare every field with `offsetof` against mingw-w64.
//!
//! Everything in this module is emitted into `include/sanpath.h` inside
//! `#if !defined(SANPATH_USE_WINSOCK_HEADERS)`: a C file that already includes
//! the real Windows headers defines that macro and gets only the sanpath
//! functions (whose prototypes are then checked against the Windows types).
//! The `sanpath_winsock_headers` cfg is never set for Rust builds.

#![allow(non_camel_case_types, non_snake_case)]

use std::ffi::{c_char, c_void};

// ---------------------------------------------------------------------------
// Scalar types (Windows x64: LLP64)
// ---------------------------------------------------------------------------

pub type CHAR = c_char;
/// UTF-16 code unit (`wchar_t` on Windows).
pub type WCHAR = u16;
pub type WORD = u16;
pub type USHORT = u16;
pub type DWORD = u32;
pub type ULONG = u32;
pub type UINT = u32;
pub type INT = i32;
/// `long` is 32-bit on Windows x64.
pub type LONG = i32;
/// Win32 `BOOL` (`int`): `FALSE` = 0, anything else true.
pub type BOOL = i32;
pub type ULONG_PTR = usize;
pub type DWORD_PTR = ULONG_PTR;
pub type UINT_PTR = usize;
pub type LONG_PTR = isize;
pub type SIZE_T = ULONG_PTR;
pub type WPARAM = UINT_PTR;
pub type LPARAM = LONG_PTR;
pub type HANDLE = *mut c_void;
pub type HWND = *mut c_void;
/// An event object. On Linux: a handle from `sanpath_event_create`.
pub type WSAEVENT = HANDLE;
/// A socket descriptor or switch handle (opaque, pointer-sized).
pub type SOCKET = UINT_PTR;
pub type GROUP = UINT;
pub type ADDRESS_FAMILY = USHORT;
pub type LPWSTR = *mut WCHAR;

// ---------------------------------------------------------------------------
// Structures
// ---------------------------------------------------------------------------

/// `GUID` (16 bytes; `Data1..3` little endian in memory).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GUID {
    pub Data1: u32,
    pub Data2: u16,
    pub Data3: u16,
    pub Data4: [u8; 8],
}

impl GUID {
    /// The 16 bytes of the GUID as they lie in memory on Windows.
    pub const fn to_bytes(&self) -> [u8; 16] {
        let a = self.Data1.to_le_bytes();
        let b = self.Data2.to_le_bytes();
        let c = self.Data3.to_le_bytes();
        let d = self.Data4;
        [
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ]
    }
}

/// `WSPDATA` (516 bytes): what `WSPStartupEx` reports about the provider.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WSPDATA {
    /// Version the switch should use (low byte major, high byte minor).
    pub wVersion: WORD,
    pub wHighVersion: WORD,
    /// NUL-terminated UTF-16 description.
    pub szDescription: [WCHAR; 256],
}

/// `WSAPROTOCOLCHAIN` (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WSAPROTOCOLCHAIN {
    pub ChainLen: INT,
    pub ChainEntries: [DWORD; 7],
}

/// `WSAPROTOCOL_INFOW` (628 bytes). `WSPSocket` reads `dwProviderReserved`
/// (non-zero: re-creation of a duplicated socket); `WSPStartupEx` reads
/// `dwCatalogEntryId`; `WSPDuplicateSocket` writes `dwProviderReserved`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WSAPROTOCOL_INFOW {
    pub dwServiceFlags1: DWORD,
    pub dwServiceFlags2: DWORD,
    pub dwServiceFlags3: DWORD,
    pub dwServiceFlags4: DWORD,
    pub dwProviderFlags: DWORD,
    pub ProviderId: GUID,
    pub dwCatalogEntryId: DWORD,
    pub ProtocolChain: WSAPROTOCOLCHAIN,
    pub iVersion: INT,
    pub iAddressFamily: INT,
    pub iMaxSockAddr: INT,
    pub iMinSockAddr: INT,
    pub iSocketType: INT,
    pub iProtocol: INT,
    pub iProtocolMaxOffset: INT,
    pub iNetworkByteOrder: INT,
    pub iSecurityScheme: INT,
    pub dwMessageSize: DWORD,
    pub dwProviderReserved: DWORD,
    pub szProtocol: [WCHAR; 256],
}

/// `WSAOVERLAPPED` (32 bytes). Owned by the switch; see the header's notes
/// on which fields the provider writes. `hEvent` bit 0 set = "do not
/// notify": the provider makes no `WPUCompleteOverlappedRequest` upcall and
/// the switch polls `WSPGetOverlappedResult`.
#[repr(C)]
#[derive(Debug)]
pub struct WSAOVERLAPPED {
    /// `WSS_OPERATION_IN_PROGRESS` (0x103) while the op is pending, then its
    /// status.
    pub Internal: ULONG_PTR,
    /// Bytes transferred.
    pub InternalHigh: ULONG_PTR,
    /// Result flags, written by the provider at completion.
    pub Offset: DWORD,
    /// Winsock error of the op (0 = success), written by the provider.
    pub OffsetHigh: DWORD,
    pub hEvent: WSAEVENT,
}

/// `WSABUF` (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WSABUF {
    pub len: ULONG,
    pub buf: *mut CHAR,
}

/// `WSABUFEX` (24 bytes): a buffer and its `WSPRegisterMemory` handle.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WSABUFEX {
    pub len: ULONG,
    pub buf: *mut CHAR,
    pub handle: HANDLE,
}

/// `WSATHREADID` (16 bytes). Ignored by this provider (no APCs).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct WSATHREADID {
    pub ThreadHandle: HANDLE,
    pub Reserved: DWORD_PTR,
}

/// `WSANETWORKEVENTS` (44 bytes): `FD_CONNECT`'s result is in
/// `iErrorCode[FD_CONNECT_BIT]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WSANETWORKEVENTS {
    pub lNetworkEvents: LONG,
    pub iErrorCode: [INT; 10],
}

/// `SOCKADDR` (`struct sockaddr`, 16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SOCKADDR {
    pub sa_family: ADDRESS_FAMILY,
    pub sa_data: [CHAR; 14],
}

/// `IN_ADDR` (4 bytes), network byte order. Windows spells the field
/// `S_un.S_addr` with a `s_addr` macro; here it is the field itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IN_ADDR {
    pub s_addr: ULONG,
}

/// `SOCKADDR_IN` (`struct sockaddr_in`, 16 bytes); port and address in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SOCKADDR_IN {
    pub sin_family: ADDRESS_FAMILY,
    pub sin_port: USHORT,
    pub sin_addr: IN_ADDR,
    pub sin_zero: [CHAR; 8],
}

/// `SOCKET_ADDRESS` (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SOCKET_ADDRESS {
    pub lpSockaddr: *mut SOCKADDR,
    pub iSockaddrLength: INT,
}

/// `SOCKET_ADDRESS_LIST`: `iAddressCount` entries follow (the declared
/// array has one element, as in the SDK).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SOCKET_ADDRESS_LIST {
    pub iAddressCount: INT,
    pub Address: [SOCKET_ADDRESS; 1],
}

/// `QOS`: never read by this provider (QoS is not supported).
pub struct QOS {
    _opaque: [u8; 0],
}

/// `fd_set` (only in the types of the unsupported `WSPSelect`).
pub struct FD_SET {
    _opaque: [u8; 0],
}

/// `struct timeval` (only in the types of the unsupported `WSPSelect`).
pub struct TIMEVAL {
    _opaque: [u8; 0],
}

// ---------------------------------------------------------------------------
// Callbacks passed by the switch
// ---------------------------------------------------------------------------

/// `WSPAccept`'s condition function: returns `CF_ACCEPT`, `CF_REJECT` or
/// `CF_DEFER`.
pub type LPCONDITIONPROC = Option<
    unsafe extern "system" fn(
        lpCallerId: *mut WSABUF,
        lpCallerData: *mut WSABUF,
        lpSQOS: *mut QOS,
        lpGQOS: *mut QOS,
        lpCalleeId: *mut WSABUF,
        lpCalleeData: *mut WSABUF,
        g: *mut GROUP,
        dwCallbackData: DWORD_PTR,
    ) -> INT,
>;
pub type LPWSAOVERLAPPED_COMPLETION_ROUTINE = Option<
    unsafe extern "system" fn(
        dwError: DWORD,
        cbTransferred: DWORD,
        lpOverlapped: *mut WSAOVERLAPPED,
        dwFlags: DWORD,
    ),
>;
pub type LPBLOCKINGCALLBACK = Option<unsafe extern "system" fn(dwContext: DWORD_PTR) -> BOOL>;
pub type LPWSAUSERAPC = Option<unsafe extern "system" fn(dwContext: DWORD_PTR)>;

// ---------------------------------------------------------------------------
// Upcalls (spec §2.2): WSPUPCALLTABLEEX
// ---------------------------------------------------------------------------

pub type LPWPUCLOSEEVENT =
    Option<unsafe extern "system" fn(hEvent: WSAEVENT, lpErrno: *mut INT) -> BOOL>;
pub type LPWPUCLOSESOCKETHANDLE =
    Option<unsafe extern "system" fn(s: SOCKET, lpErrno: *mut INT) -> INT>;
pub type LPWPUCREATEEVENT = Option<unsafe extern "system" fn(lpErrno: *mut INT) -> WSAEVENT>;
pub type LPWPUCREATESOCKETHANDLE = Option<
    unsafe extern "system" fn(
        dwCatalogEntryId: DWORD,
        dwContext: DWORD_PTR,
        lpErrno: *mut INT,
    ) -> SOCKET,
>;
pub type LPWPUFDISSET = Option<unsafe extern "system" fn(s: SOCKET, fdset: *mut FD_SET) -> INT>;
pub type LPWPUGETPROVIDERPATH = Option<
    unsafe extern "system" fn(
        lpProviderId: *mut GUID,
        lpszProviderDllPath: *mut WCHAR,
        lpProviderDllPathLen: *mut INT,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWPUMODIFYIFSHANDLE = Option<
    unsafe extern "system" fn(
        dwCatalogEntryId: DWORD,
        ProposedHandle: SOCKET,
        lpErrno: *mut INT,
    ) -> SOCKET,
>;
pub type LPWPUPOSTMESSAGE = Option<
    unsafe extern "system" fn(hWnd: HWND, Msg: UINT, wParam: WPARAM, lParam: LPARAM) -> BOOL,
>;
pub type LPWPUQUERYBLOCKINGCALLBACK = Option<
    unsafe extern "system" fn(
        dwCatalogEntryId: DWORD,
        lplpfnCallback: *mut LPBLOCKINGCALLBACK,
        lpdwContext: *mut DWORD_PTR,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWPUQUERYSOCKETHANDLECONTEXT = Option<
    unsafe extern "system" fn(s: SOCKET, lpContext: *mut DWORD_PTR, lpErrno: *mut INT) -> INT,
>;
pub type LPWPUQUEUEAPC = Option<
    unsafe extern "system" fn(
        lpThreadId: *mut WSATHREADID,
        lpfnUserApc: LPWSAUSERAPC,
        dwContext: DWORD_PTR,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWPURESETEVENT =
    Option<unsafe extern "system" fn(hEvent: WSAEVENT, lpErrno: *mut INT) -> BOOL>;
pub type LPWPUSETEVENT =
    Option<unsafe extern "system" fn(hEvent: WSAEVENT, lpErrno: *mut INT) -> BOOL>;
pub type LPWPUOPENCURRENTTHREAD =
    Option<unsafe extern "system" fn(lpThreadId: *mut WSATHREADID, lpErrno: *mut INT) -> INT>;
pub type LPWPUCLOSETHREAD =
    Option<unsafe extern "system" fn(lpThreadId: *mut WSATHREADID, lpErrno: *mut INT) -> INT>;
pub type LPWPUCOMPLETEOVERLAPPEDREQUEST = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpOverlapped: *mut WSAOVERLAPPED,
        dwError: DWORD,
        cbTransferred: DWORD,
        lpErrno: *mut INT,
    ) -> INT,
>;

/// `WSPUPCALLTABLEEX` (16 pointers, 128 bytes), in `ddk/ws2san.h` order.
/// `WSPStartupEx` copies it; this provider calls only
/// `lpWPUCreateSocketHandle`, `lpWPUCloseSocketHandle`,
/// `lpWPUQuerySocketHandleContext` and `lpWPUCompleteOverlappedRequest`,
/// which must therefore be non-NULL.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WSPUPCALLTABLEEX {
    pub lpWPUCloseEvent: LPWPUCLOSEEVENT,
    pub lpWPUCloseSocketHandle: LPWPUCLOSESOCKETHANDLE,
    pub lpWPUCreateEvent: LPWPUCREATEEVENT,
    pub lpWPUCreateSocketHandle: LPWPUCREATESOCKETHANDLE,
    pub lpWPUFDIsSet: LPWPUFDISSET,
    pub lpWPUGetProviderPath: LPWPUGETPROVIDERPATH,
    pub lpWPUModifyIFSHandle: LPWPUMODIFYIFSHANDLE,
    pub lpWPUPostMessage: LPWPUPOSTMESSAGE,
    pub lpWPUQueryBlockingCallback: LPWPUQUERYBLOCKINGCALLBACK,
    pub lpWPUQuerySocketHandleContext: LPWPUQUERYSOCKETHANDLECONTEXT,
    pub lpWPUQueueApc: LPWPUQUEUEAPC,
    pub lpWPUResetEvent: LPWPURESETEVENT,
    pub lpWPUSetEvent: LPWPUSETEVENT,
    pub lpWPUOpenCurrentThread: LPWPUOPENCURRENTTHREAD,
    pub lpWPUCloseThread: LPWPUCLOSETHREAD,
    pub lpWPUCompleteOverlappedRequest: LPWPUCOMPLETEOVERLAPPEDREQUEST,
}

// ---------------------------------------------------------------------------
// Procedure table (spec §2.4): WSPPROC_TABLE
// ---------------------------------------------------------------------------

pub type LPWSPACCEPT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        addr: *mut SOCKADDR,
        addrlen: *mut INT,
        lpfnCondition: LPCONDITIONPROC,
        dwCallbackData: DWORD_PTR,
        lpErrno: *mut INT,
    ) -> SOCKET,
>;
pub type LPWSPADDRESSTOSTRING = Option<
    unsafe extern "system" fn(
        lpsaAddress: *mut SOCKADDR,
        dwAddressLength: DWORD,
        lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
        lpszAddressString: LPWSTR,
        lpdwAddressStringLength: *mut DWORD,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPASYNCSELECT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        hWnd: HWND,
        wMsg: UINT,
        lEvent: LONG,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPBIND = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        name: *const SOCKADDR,
        namelen: INT,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPCANCELBLOCKINGCALL = Option<unsafe extern "system" fn(lpErrno: *mut INT) -> INT>;
pub type LPWSPCLEANUP = Option<unsafe extern "system" fn(lpErrno: *mut INT) -> INT>;
pub type LPWSPCLOSESOCKET = Option<unsafe extern "system" fn(s: SOCKET, lpErrno: *mut INT) -> INT>;
pub type LPWSPCONNECT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        name: *const SOCKADDR,
        namelen: INT,
        lpCallerData: *mut WSABUF,
        lpCalleeData: *mut WSABUF,
        lpSQOS: *mut QOS,
        lpGQOS: *mut QOS,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPDUPLICATESOCKET = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        dwProcessId: DWORD,
        lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPENUMNETWORKEVENTS = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        hEventObject: WSAEVENT,
        lpNetworkEvents: *mut WSANETWORKEVENTS,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPEVENTSELECT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        hEventObject: WSAEVENT,
        lNetworkEvents: LONG,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPGETOVERLAPPEDRESULT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpcbTransfer: *mut DWORD,
        fWait: BOOL,
        lpdwFlags: *mut DWORD,
        lpErrno: *mut INT,
    ) -> BOOL,
>;
pub type LPWSPGETPEERNAME = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        name: *mut SOCKADDR,
        namelen: *mut INT,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPGETSOCKNAME = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        name: *mut SOCKADDR,
        namelen: *mut INT,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPGETSOCKOPT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        level: INT,
        optname: INT,
        optval: *mut CHAR,
        optlen: *mut INT,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPGETQOSBYNAME = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpQOSName: *mut WSABUF,
        lpQOS: *mut QOS,
        lpErrno: *mut INT,
    ) -> BOOL,
>;
pub type LPWSPIOCTL = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        dwIoControlCode: DWORD,
        lpvInBuffer: *mut c_void,
        cbInBuffer: DWORD,
        lpvOutBuffer: *mut c_void,
        cbOutBuffer: DWORD,
        lpcbBytesReturned: *mut DWORD,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
        lpThreadId: *mut WSATHREADID,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPJOINLEAF = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        name: *const SOCKADDR,
        namelen: INT,
        lpCallerData: *mut WSABUF,
        lpCalleeData: *mut WSABUF,
        lpSQOS: *mut QOS,
        lpGQOS: *mut QOS,
        dwFlags: DWORD,
        lpErrno: *mut INT,
    ) -> SOCKET,
>;
pub type LPWSPLISTEN =
    Option<unsafe extern "system" fn(s: SOCKET, backlog: INT, lpErrno: *mut INT) -> INT>;
pub type LPWSPRECV = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffers: *mut WSABUF,
        dwBufferCount: DWORD,
        lpNumberOfBytesRecvd: *mut DWORD,
        lpFlags: *mut DWORD,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
        lpThreadId: *mut WSATHREADID,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPRECVDISCONNECT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpInboundDisconnectData: *mut WSABUF,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPRECVFROM = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffers: *mut WSABUF,
        dwBufferCount: DWORD,
        lpNumberOfBytesRecvd: *mut DWORD,
        lpFlags: *mut DWORD,
        lpFrom: *mut SOCKADDR,
        lpFromlen: *mut INT,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
        lpThreadId: *mut WSATHREADID,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPSELECT = Option<
    unsafe extern "system" fn(
        nfds: INT,
        readfds: *mut FD_SET,
        writefds: *mut FD_SET,
        exceptfds: *mut FD_SET,
        timeout: *mut TIMEVAL,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPSEND = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffers: *mut WSABUF,
        dwBufferCount: DWORD,
        lpNumberOfBytesSent: *mut DWORD,
        dwFlags: DWORD,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
        lpThreadId: *mut WSATHREADID,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPSENDDISCONNECT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpOutboundDisconnectData: *mut WSABUF,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPSENDTO = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffers: *mut WSABUF,
        dwBufferCount: DWORD,
        lpNumberOfBytesSent: *mut DWORD,
        dwFlags: DWORD,
        lpTo: *const SOCKADDR,
        iTolen: INT,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
        lpThreadId: *mut WSATHREADID,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPSETSOCKOPT = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        level: INT,
        optname: INT,
        optval: *const CHAR,
        optlen: INT,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPWSPSHUTDOWN =
    Option<unsafe extern "system" fn(s: SOCKET, how: INT, lpErrno: *mut INT) -> INT>;
pub type LPWSPSOCKET = Option<
    unsafe extern "system" fn(
        af: INT,
        type_: INT,
        protocol: INT,
        lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
        g: GROUP,
        dwFlags: DWORD,
        lpErrno: *mut INT,
    ) -> SOCKET,
>;
pub type LPWSPSTRINGTOADDRESS = Option<
    unsafe extern "system" fn(
        AddressString: LPWSTR,
        AddressFamily: INT,
        lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
        lpAddress: *mut SOCKADDR,
        lpAddressLength: *mut INT,
        lpErrno: *mut INT,
    ) -> INT,
>;

/// `WSPPROC_TABLE` (30 pointers, 240 bytes), in `ws2spi.h` order.
/// `WSPStartupEx` fills every slot; the functions a SAN provider need not
/// implement fail `SOCKET_ERROR` + `WSAEOPNOTSUPP`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WSPPROC_TABLE {
    pub lpWSPAccept: LPWSPACCEPT,
    pub lpWSPAddressToString: LPWSPADDRESSTOSTRING,
    pub lpWSPAsyncSelect: LPWSPASYNCSELECT,
    pub lpWSPBind: LPWSPBIND,
    pub lpWSPCancelBlockingCall: LPWSPCANCELBLOCKINGCALL,
    pub lpWSPCleanup: LPWSPCLEANUP,
    pub lpWSPCloseSocket: LPWSPCLOSESOCKET,
    pub lpWSPConnect: LPWSPCONNECT,
    pub lpWSPDuplicateSocket: LPWSPDUPLICATESOCKET,
    pub lpWSPEnumNetworkEvents: LPWSPENUMNETWORKEVENTS,
    pub lpWSPEventSelect: LPWSPEVENTSELECT,
    pub lpWSPGetOverlappedResult: LPWSPGETOVERLAPPEDRESULT,
    pub lpWSPGetPeerName: LPWSPGETPEERNAME,
    pub lpWSPGetSockName: LPWSPGETSOCKNAME,
    pub lpWSPGetSockOpt: LPWSPGETSOCKOPT,
    pub lpWSPGetQOSByName: LPWSPGETQOSBYNAME,
    pub lpWSPIoctl: LPWSPIOCTL,
    pub lpWSPJoinLeaf: LPWSPJOINLEAF,
    pub lpWSPListen: LPWSPLISTEN,
    pub lpWSPRecv: LPWSPRECV,
    pub lpWSPRecvDisconnect: LPWSPRECVDISCONNECT,
    pub lpWSPRecvFrom: LPWSPRECVFROM,
    pub lpWSPSelect: LPWSPSELECT,
    pub lpWSPSend: LPWSPSEND,
    pub lpWSPSendDisconnect: LPWSPSENDDISCONNECT,
    pub lpWSPSendTo: LPWSPSENDTO,
    pub lpWSPSetSockOpt: LPWSPSETSOCKOPT,
    pub lpWSPShutdown: LPWSPSHUTDOWN,
    pub lpWSPSocket: LPWSPSOCKET,
    pub lpWSPStringToAddress: LPWSPSTRINGTOADDRESS,
}

// ---------------------------------------------------------------------------
// Entry point and extension functions (ddk/ws2san.h)
// ---------------------------------------------------------------------------

pub type LPWSPSTARTUPEX = Option<
    unsafe extern "system" fn(
        wVersionRequested: WORD,
        lpWSPData: *mut WSPDATA,
        lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
        lpUpcallTable: *mut WSPUPCALLTABLEEX,
        lpProcTable: *mut WSPPROC_TABLE,
    ) -> INT,
>;
pub type LPFN_WSPREGISTERMEMORY = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffer: *mut c_void,
        dwBufferLength: DWORD,
        dwFlags: DWORD,
        lpErrno: *mut INT,
    ) -> HANDLE,
>;
pub type LPFN_WSPDEREGISTERMEMORY =
    Option<unsafe extern "system" fn(s: SOCKET, Handle: HANDLE, lpErrno: *mut INT) -> INT>;
/// (`ws2san.h` declares this typedef's result as `int`, like the function.)
pub type LPFN_WSPREGISTERRDMAMEMORY = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffer: *mut c_void,
        dwBufferLength: DWORD,
        dwFlags: DWORD,
        lpRdmaBufferDescriptor: *mut c_void,
        lpdwDescriptorLength: *mut DWORD,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPFN_WSPDEREGISTERRDMAMEMORY = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpRdmaBufferDescriptor: *mut c_void,
        dwDescriptorLength: DWORD,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPFN_WSPRDMAWRITE = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffers: *mut WSABUFEX,
        dwBufferCount: DWORD,
        lpTargetBufferDescriptor: *mut c_void,
        dwTargetDescriptorLength: DWORD,
        dwTargetBufferOffset: DWORD,
        lpdwNumberOfBytesWritten: *mut DWORD,
        dwFlags: DWORD,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
        lpThreadId: *mut WSATHREADID,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPFN_WSPRDMAREAD = Option<
    unsafe extern "system" fn(
        s: SOCKET,
        lpBuffers: *mut WSABUFEX,
        dwBufferCount: DWORD,
        lpTargetBufferDescriptor: *mut c_void,
        dwTargetDescriptorLength: DWORD,
        dwTargetBufferOffset: DWORD,
        lpdwNumberOfBytesRead: *mut DWORD,
        dwFlags: DWORD,
        lpOverlapped: *mut WSAOVERLAPPED,
        lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
        lpThreadId: *mut WSATHREADID,
        lpErrno: *mut INT,
    ) -> INT,
>;
pub type LPFN_WSPMEMORYREGISTRATIONCACHECALLBACK = Option<
    unsafe extern "system" fn(lpvAddress: *mut c_void, Size: SIZE_T, lpErrno: *mut INT) -> INT,
>;

// ---------------------------------------------------------------------------
// Constants (spec §0.1) — values as in the Windows headers
// ---------------------------------------------------------------------------

pub const FALSE: BOOL = 0;
pub const TRUE: BOOL = 1;
pub const SOCKET_ERROR: INT = -1;
pub const INVALID_SOCKET: SOCKET = 0xFFFF_FFFF_FFFF_FFFF;
pub const WSS_OPERATION_IN_PROGRESS: ULONG_PTR = 0x103;
pub const WSPDESCRIPTION_LEN: INT = 255;
pub const WSAPROTOCOL_LEN: INT = 255;
pub const MAX_PROTOCOL_CHAIN: INT = 7;
pub const WSA_FLAG_OVERLAPPED: DWORD = 0x01;
pub const AF_INET: INT = 2;
pub const SOCK_STREAM: INT = 1;
pub const IPPROTO_TCP: INT = 6;
pub const SOL_SOCKET: INT = 0xFFFF;
pub const TCP_NODELAY: INT = 0x0001;
pub const SO_DEBUG: INT = 0x0001;
pub const SO_GROUP_ID: INT = 0x2001;
pub const SO_GROUP_PRIORITY: INT = 0x2002;
pub const SO_MAX_MSG_SIZE: INT = 0x2003;
pub const SO_MAX_RDMA_SIZE: INT = 0x700D;
pub const SO_RDMA_THRESHOLD_SIZE: INT = 0x700E;
pub const SOMAXCONN: INT = 0x7FFF_FFFF;
pub const FD_ACCEPT_BIT: INT = 3;
pub const FD_CONNECT_BIT: INT = 4;
pub const FD_ACCEPT: LONG = 0x08;
pub const FD_CONNECT: LONG = 0x10;
pub const FD_MAX_EVENTS: INT = 10;
pub const MEM_READ: DWORD = 1;
pub const MEM_WRITE: DWORD = 2;
pub const MEM_READWRITE: DWORD = 3;
pub const MSG_OOB: INT = 0x1;
pub const SIO_GET_EXTENSION_FUNCTION_POINTER: DWORD = 0xC800_0006;
pub const SIO_ADDRESS_LIST_QUERY: DWORD = 0x4800_0016;
pub const SIO_GET_QOS: DWORD = 0xC800_0007;
pub const SIO_GET_GROUP_QOS: DWORD = 0xC800_0008;
pub const SIO_SET_QOS: DWORD = 0x8800_000B;
pub const SIO_SET_GROUP_QOS: DWORD = 0x8800_000C;
pub const CF_ACCEPT: INT = 0x0000;
pub const CF_REJECT: INT = 0x0001;
pub const CF_DEFER: INT = 0x0002;

// Error codes (spec §0.2); the unit test checks them against the engine.
pub const NO_ERROR: INT = 0;
pub const WSA_INVALID_HANDLE: INT = 6;
pub const WSA_OPERATION_ABORTED: INT = 995;
pub const WSA_IO_INCOMPLETE: INT = 996;
pub const WSA_IO_PENDING: INT = 997;
pub const WSAEACCES: INT = 10013;
pub const WSAEFAULT: INT = 10014;
pub const WSAEINVAL: INT = 10022;
pub const WSAEMFILE: INT = 10024;
pub const WSAEWOULDBLOCK: INT = 10035;
pub const WSAEINPROGRESS: INT = 10036;
pub const WSAEALREADY: INT = 10037;
pub const WSAENOTSOCK: INT = 10038;
pub const WSAEMSGSIZE: INT = 10040;
pub const WSAEPROTOTYPE: INT = 10041;
pub const WSAENOPROTOOPT: INT = 10042;
pub const WSAEPROTONOSUPPORT: INT = 10043;
pub const WSAESOCKTNOSUPPORT: INT = 10044;
pub const WSAEOPNOTSUPP: INT = 10045;
pub const WSAEAFNOSUPPORT: INT = 10047;
pub const WSAEADDRINUSE: INT = 10048;
pub const WSAEADDRNOTAVAIL: INT = 10049;
pub const WSAENETDOWN: INT = 10050;
pub const WSAENETUNREACH: INT = 10051;
pub const WSAENETRESET: INT = 10052;
pub const WSAECONNABORTED: INT = 10053;
pub const WSAECONNRESET: INT = 10054;
pub const WSAENOBUFS: INT = 10055;
pub const WSAEISCONN: INT = 10056;
pub const WSAENOTCONN: INT = 10057;
pub const WSAESHUTDOWN: INT = 10058;
pub const WSAETIMEDOUT: INT = 10060;
pub const WSAECONNREFUSED: INT = 10061;
pub const WSAEHOSTUNREACH: INT = 10065;
pub const WSAEPROCLIM: INT = 10067;
pub const WSASYSNOTREADY: INT = 10091;
pub const WSAVERNOTSUPPORTED: INT = 10092;
pub const WSANOTINITIALISED: INT = 10093;
pub const WSAEDISCON: INT = 10101;
pub const WSATRY_AGAIN: INT = 11002;

// Extension function GUIDs (spec §3.1).
pub const WSAID_REGISTERMEMORY: GUID = GUID {
    Data1: 0xC0B4_22F5,
    Data2: 0xF58C,
    Data3: 0x11D1,
    Data4: [0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D],
};
pub const WSAID_DEREGISTERMEMORY: GUID = GUID {
    Data1: 0xC0B4_22F6,
    Data2: 0xF58C,
    Data3: 0x11D1,
    Data4: [0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D],
};
pub const WSAID_REGISTERRDMAMEMORY: GUID = GUID {
    Data1: 0xC0B4_22F7,
    Data2: 0xF58C,
    Data3: 0x11D1,
    Data4: [0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D],
};
pub const WSAID_DEREGISTERRDMAMEMORY: GUID = GUID {
    Data1: 0xC0B4_22F8,
    Data2: 0xF58C,
    Data3: 0x11D1,
    Data4: [0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D],
};
pub const WSAID_RDMAWRITE: GUID = GUID {
    Data1: 0xC0B4_22F9,
    Data2: 0xF58C,
    Data3: 0x11D1,
    Data4: [0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D],
};
pub const WSAID_RDMAREAD: GUID = GUID {
    Data1: 0xC0B4_22FA,
    Data2: 0xF58C,
    Data3: 0x11D1,
    Data4: [0xAD, 0x6C, 0x00, 0xC0, 0x4F, 0xA3, 0x4A, 0x2D],
};
pub const WSAID_MEMORYREGISTRATIONCACHECALLBACK: GUID = GUID {
    Data1: 0xE5DA_4AF8,
    Data2: 0xD824,
    Data3: 0x48CD,
    Data4: [0xA7, 0x99, 0x63, 0x37, 0xA9, 0x8E, 0xD2, 0xAF],
};

#[cfg(test)]
mod tests {
    use super::*;
    use sanpath::spi::{self, Extension};
    use sanpath::WsaError;
    use std::mem::{align_of, size_of};

    #[test]
    fn windows_x64_sizes() {
        assert_eq!(size_of::<WSPDATA>(), 516);
        assert_eq!(size_of::<WSAPROTOCOLCHAIN>(), 32);
        assert_eq!(size_of::<WSAPROTOCOL_INFOW>(), 628);
        assert_eq!(size_of::<WSAOVERLAPPED>(), 32);
        assert_eq!(size_of::<WSABUF>(), 16);
        assert_eq!(size_of::<WSABUFEX>(), 24);
        assert_eq!(size_of::<WSATHREADID>(), 16);
        assert_eq!(size_of::<WSANETWORKEVENTS>(), 44);
        assert_eq!(size_of::<SOCKADDR>(), 16);
        assert_eq!(size_of::<SOCKADDR_IN>(), 16);
        assert_eq!(size_of::<SOCKET_ADDRESS>(), 16);
        assert_eq!(size_of::<SOCKET_ADDRESS_LIST>(), 24);
        assert_eq!(size_of::<GUID>(), 16);
        assert_eq!(size_of::<WSPUPCALLTABLEEX>(), 16 * 8);
        assert_eq!(size_of::<WSPPROC_TABLE>(), 30 * 8);
        assert_eq!(align_of::<WSAOVERLAPPED>(), 8);
    }

    #[test]
    fn error_constants_match_the_engine() {
        let table: &[(INT, WsaError)] = &[
            (WSA_INVALID_HANDLE, WsaError::WSA_INVALID_HANDLE),
            (WSA_OPERATION_ABORTED, WsaError::WSA_OPERATION_ABORTED),
            (WSA_IO_INCOMPLETE, WsaError::WSA_IO_INCOMPLETE),
            (WSA_IO_PENDING, WsaError::WSA_IO_PENDING),
            (WSAEACCES, WsaError::WSAEACCES),
            (WSAEFAULT, WsaError::WSAEFAULT),
            (WSAEINVAL, WsaError::WSAEINVAL),
            (WSAEMFILE, WsaError::WSAEMFILE),
            (WSAEWOULDBLOCK, WsaError::WSAEWOULDBLOCK),
            (WSAEINPROGRESS, WsaError::WSAEINPROGRESS),
            (WSAEALREADY, WsaError::WSAEALREADY),
            (WSAENOTSOCK, WsaError::WSAENOTSOCK),
            (WSAEMSGSIZE, WsaError::WSAEMSGSIZE),
            (WSAEPROTOTYPE, WsaError::WSAEPROTOTYPE),
            (WSAENOPROTOOPT, WsaError::WSAENOPROTOOPT),
            (WSAEPROTONOSUPPORT, WsaError::WSAEPROTONOSUPPORT),
            (WSAESOCKTNOSUPPORT, WsaError::WSAESOCKTNOSUPPORT),
            (WSAEOPNOTSUPP, WsaError::WSAEOPNOTSUPP),
            (WSAEAFNOSUPPORT, WsaError::WSAEAFNOSUPPORT),
            (WSAEADDRINUSE, WsaError::WSAEADDRINUSE),
            (WSAEADDRNOTAVAIL, WsaError::WSAEADDRNOTAVAIL),
            (WSAENETDOWN, WsaError::WSAENETDOWN),
            (WSAENETUNREACH, WsaError::WSAENETUNREACH),
            (WSAENETRESET, WsaError::WSAENETRESET),
            (WSAECONNABORTED, WsaError::WSAECONNABORTED),
            (WSAECONNRESET, WsaError::WSAECONNRESET),
            (WSAENOBUFS, WsaError::WSAENOBUFS),
            (WSAEISCONN, WsaError::WSAEISCONN),
            (WSAENOTCONN, WsaError::WSAENOTCONN),
            (WSAESHUTDOWN, WsaError::WSAESHUTDOWN),
            (WSAETIMEDOUT, WsaError::WSAETIMEDOUT),
            (WSAECONNREFUSED, WsaError::WSAECONNREFUSED),
            (WSAEHOSTUNREACH, WsaError::WSAEHOSTUNREACH),
            (WSAEPROCLIM, WsaError::WSAEPROCLIM),
            (WSASYSNOTREADY, WsaError::WSASYSNOTREADY),
            (WSAVERNOTSUPPORTED, WsaError::WSAVERNOTSUPPORTED),
            (WSANOTINITIALISED, WsaError::WSANOTINITIALISED),
            (WSAEDISCON, WsaError::WSAEDISCON),
            (WSATRY_AGAIN, WsaError::WSATRY_AGAIN),
        ];
        for &(code, e) in table {
            assert_eq!(code, e.code(), "{e}");
        }
        assert_eq!(
            table.len(),
            WsaError::ALL.len(),
            "every engine code has a constant"
        );
    }

    #[test]
    fn other_constants_match_the_engine() {
        assert_eq!(SOCKET_ERROR, spi::SOCKET_ERROR);
        assert_eq!(INVALID_SOCKET, spi::INVALID_SOCKET);
        assert_eq!(WSS_OPERATION_IN_PROGRESS, spi::WSS_OPERATION_IN_PROGRESS);
        assert_eq!(WSA_FLAG_OVERLAPPED, spi::WSA_FLAG_OVERLAPPED);
        assert_eq!(AF_INET, spi::AF_INET);
        assert_eq!(SOCK_STREAM, spi::SOCK_STREAM);
        assert_eq!(IPPROTO_TCP, spi::IPPROTO_TCP);
        assert_eq!(SOL_SOCKET, spi::SOL_SOCKET);
        assert_eq!(TCP_NODELAY, spi::TCP_NODELAY);
        assert_eq!(SO_DEBUG, spi::SO_DEBUG);
        assert_eq!(SO_GROUP_ID, spi::SO_GROUP_ID);
        assert_eq!(SO_GROUP_PRIORITY, spi::SO_GROUP_PRIORITY);
        assert_eq!(SO_MAX_MSG_SIZE, spi::SO_MAX_MSG_SIZE);
        assert_eq!(SO_MAX_RDMA_SIZE, spi::SO_MAX_RDMA_SIZE);
        assert_eq!(SO_RDMA_THRESHOLD_SIZE, spi::SO_RDMA_THRESHOLD_SIZE);
        assert_eq!(SOMAXCONN, spi::SOMAXCONN);
        assert_eq!(FD_ACCEPT, spi::FD_ACCEPT);
        assert_eq!(FD_CONNECT, spi::FD_CONNECT);
        assert_eq!(FD_ACCEPT_BIT as usize, spi::FD_ACCEPT_BIT);
        assert_eq!(FD_CONNECT_BIT as usize, spi::FD_CONNECT_BIT);
        assert_eq!(FD_MAX_EVENTS as usize, spi::FD_MAX_EVENTS);
        assert_eq!(MEM_READ, spi::MEM_READ);
        assert_eq!(MEM_WRITE, spi::MEM_WRITE);
        assert_eq!(MEM_READWRITE, spi::MEM_READWRITE);
        assert_eq!(
            SIO_GET_EXTENSION_FUNCTION_POINTER,
            spi::SIO_GET_EXTENSION_FUNCTION_POINTER
        );
        assert_eq!(SIO_ADDRESS_LIST_QUERY, spi::SIO_ADDRESS_LIST_QUERY);
    }

    #[test]
    fn extension_guids_match_the_engine() {
        let table = [
            (WSAID_REGISTERMEMORY, Extension::RegisterMemory),
            (WSAID_DEREGISTERMEMORY, Extension::DeregisterMemory),
            (WSAID_REGISTERRDMAMEMORY, Extension::RegisterRdmaMemory),
            (WSAID_DEREGISTERRDMAMEMORY, Extension::DeregisterRdmaMemory),
            (WSAID_RDMAWRITE, Extension::RdmaWrite),
            (WSAID_RDMAREAD, Extension::RdmaRead),
            (
                WSAID_MEMORYREGISTRATIONCACHECALLBACK,
                Extension::MemoryRegistrationCacheCallback,
            ),
        ];
        for (guid, ext) in table {
            assert_eq!(guid.to_bytes(), ext.guid(), "{ext:?}");
        }
        assert_eq!(table.len(), Extension::ALL.len());
    }
}
