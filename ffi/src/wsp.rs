//! `WSPStartupEx` and the 30 functions of `WSPPROC_TABLE` (spec §2, §3).
//!
//! Each function validates what crosses the ABI, calls the engine, and maps
//! the result to the SPI's convention: `Err(e)` → `SOCKET_ERROR` /
//! `INVALID_SOCKET` / `FALSE` with `*lpErrno = e`; an overlapped op the engine
//! started (`Ok(())`) → `SOCKET_ERROR` + `WSA_IO_PENDING` (spec §7-3); a
//! connect under way → `SOCKET_ERROR` + `WSAEWOULDBLOCK`. The functions a SAN
//! provider need not implement ("N" in spec §2.4) fail `WSAEOPNOTSUPP`.
//!
//! Calling convention: `extern "system"` (`WSPAPI`); on the 64-bit targets
//! this crate builds for it is the platform's C convention.

#![allow(non_snake_case, clippy::too_many_arguments)]

use crate::abi::*;
use crate::event;
use crate::ext::*;
use crate::global::{provider, provider_or_create};
use crate::switch::CSwitch;
use crate::win::*;
use sanpath::spi::{Condition, ConnectRequestInfo, ProviderSocket, WsaBuf, WspData, MAX_SGE};
use sanpath::{WsaError, WsaResult};
use std::mem::size_of;
use std::ptr::{addr_of_mut, null_mut};
use std::sync::Arc;

/// Bytes of option value `WSPGetSockOpt`/`WSPSetSockOpt` pass through (every
/// option this provider knows is a 4-byte integer).
const OPT_MAX: usize = 64;

/// The procedure table `WSPStartupEx` hands out: all 30 slots non-NULL.
pub fn proc_table() -> WSPPROC_TABLE {
    WSPPROC_TABLE {
        lpWSPAccept: Some(WSPAccept),
        lpWSPAddressToString: Some(WSPAddressToString),
        lpWSPAsyncSelect: Some(WSPAsyncSelect),
        lpWSPBind: Some(WSPBind),
        lpWSPCancelBlockingCall: Some(WSPCancelBlockingCall),
        lpWSPCleanup: Some(WSPCleanup),
        lpWSPCloseSocket: Some(WSPCloseSocket),
        lpWSPConnect: Some(WSPConnect),
        lpWSPDuplicateSocket: Some(WSPDuplicateSocket),
        lpWSPEnumNetworkEvents: Some(WSPEnumNetworkEvents),
        lpWSPEventSelect: Some(WSPEventSelect),
        lpWSPGetOverlappedResult: Some(WSPGetOverlappedResult),
        lpWSPGetPeerName: Some(WSPGetPeerName),
        lpWSPGetSockName: Some(WSPGetSockName),
        lpWSPGetSockOpt: Some(WSPGetSockOpt),
        lpWSPGetQOSByName: Some(WSPGetQOSByName),
        lpWSPIoctl: Some(WSPIoctl),
        lpWSPJoinLeaf: Some(WSPJoinLeaf),
        lpWSPListen: Some(WSPListen),
        lpWSPRecv: Some(WSPRecv),
        lpWSPRecvDisconnect: Some(WSPRecvDisconnect),
        lpWSPRecvFrom: Some(WSPRecvFrom),
        lpWSPSelect: Some(WSPSelect),
        lpWSPSend: Some(WSPSend),
        lpWSPSendDisconnect: Some(WSPSendDisconnect),
        lpWSPSendTo: Some(WSPSendTo),
        lpWSPSetSockOpt: Some(WSPSetSockOpt),
        lpWSPShutdown: Some(WSPShutdown),
        lpWSPSocket: Some(WSPSocket),
        lpWSPStringToAddress: Some(WSPStringToAddress),
    }
}

fn wsp_data(d: &WspData) -> WSPDATA {
    let mut desc = [0 as WCHAR; 256];
    // At most 255 units: the last one stays NUL.
    for (dst, src) in desc.iter_mut().zip(d.description.encode_utf16().take(255)) {
        *dst = src;
    }
    WSPDATA {
        wVersion: d.version,
        wHighVersion: d.high_version,
        szDescription: desc,
    }
}

/// Reads `count` buffer descriptors into `local` (any alignment), mapping
/// each with `map`. More than `MAX_SGE` → `WSAEINVAL`; NULL with a non-zero
/// count → `WSAEFAULT`.
///
/// # Safety
/// `p` is NULL or points to `count` readable `T`s.
pub(crate) unsafe fn read_bufs<T: Copy, U: Copy>(
    p: *const T,
    count: DWORD,
    local: &mut [U; MAX_SGE],
    map: impl Fn(T) -> U,
) -> WsaResult<usize> {
    let n = count as usize;
    if n > MAX_SGE {
        return Err(WsaError::WSAEINVAL);
    }
    if n > 0 && p.is_null() {
        return Err(WsaError::WSAEFAULT);
    }
    for (i, slot) in local.iter_mut().enumerate().take(n) {
        // SAFETY: `p` has `count` readable elements (caller contract) and
        // i < count; unaligned read.
        *slot = map(unsafe { p.add(i).read_unaligned() });
    }
    Ok(n)
}

fn sock(s: SOCKET) -> ProviderSocket {
    ProviderSocket(s)
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

/// The provider's entry point (spec §2.1). Returns 0 or the error code
/// itself (no `lpErrno`): `WSAVERNOTSUPPORTED` for a version below 2.2,
/// `WSAEFAULT` for a NULL `lpWSPData`/`lpProcTable`/`lpUpcallTable` or an
/// upcall table whose `lpWPUCreateSocketHandle`, `lpWPUCloseSocketHandle`,
/// `lpWPUQuerySocketHandleContext` or `lpWPUCompleteOverlappedRequest` is
/// NULL, `WSASYSNOTREADY` if the engine cannot start.
///
/// The upcall table is copied; the first successful startup's copy is used
/// until the matching last `WSPCleanup` (spec §7-14). `lpProtocolInfo` may be
/// NULL; its `dwCatalogEntryId` is what `WPUCreateSocketHandle` receives.
/// Every call that returns 0 must be paired with one `WSPCleanup`.
///
/// # Safety
/// Non-NULL pointers point to valid objects of their types (any alignment).
#[no_mangle]
pub unsafe extern "system" fn WSPStartupEx(
    wVersionRequested: WORD,
    lpWSPData: *mut WSPDATA,
    lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
    lpUpcallTable: *mut WSPUPCALLTABLEEX,
    lpProcTable: *mut WSPPROC_TABLE,
) -> INT {
    let r = catch(|| {
        let (major, minor) = (wVersionRequested & 0xFF, wVersionRequested >> 8);
        if (major, minor) < (2, 2) {
            return Err(WsaError::WSAVERNOTSUPPORTED);
        }
        if lpWSPData.is_null() || lpProcTable.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        // SAFETY: NULL or a valid table (caller contract); copied here, the
        // caller's table is never read again (START-4).
        let table = unsafe { read_in(lpUpcallTable)? };
        let switch = CSwitch::new(table).ok_or(WsaError::WSAEFAULT)?;
        let catalog_entry_id = if lpProtocolInfo.is_null() {
            0
        } else {
            // SAFETY: non-NULL, so a valid WSAPROTOCOL_INFOW (caller contract).
            unsafe { read_in(lpProtocolInfo)? }.dwCatalogEntryId
        };
        let provider = provider_or_create()?;
        let data = provider.startup(wVersionRequested, Arc::new(switch), catalog_entry_id)?;
        // SAFETY: both checked non-NULL above; valid per caller contract.
        unsafe {
            write_out(lpWSPData, wsp_data(&data))?;
            write_out(lpProcTable, proc_table())?;
        }
        Ok(())
    });
    match r {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

// ---------------------------------------------------------------------------
// Required functions ("R" in spec §2.4)
// ---------------------------------------------------------------------------

/// `WSPCleanup`: pairs one successful `WSPStartupEx`; the last one closes
/// every socket (pending ops complete `WSA_OPERATION_ABORTED`) and stops the
/// engine. Without a prior startup: `WSANOTINITIALISED`.
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPCleanup(lpErrno: *mut INT) -> INT {
    let r = catch(|| {
        provider()?.cleanup()?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPSocket`: a new SAN socket (one `WPUCreateSocketHandle` upcall); our
/// descriptor, distinct from the switch handle. `lpProtocolInfo` may be
/// NULL; a non-zero `dwProviderReserved` re-creates a socket duplicated for
/// this process by `WSPDuplicateSocket` (an unknown, foreign or expired
/// value: `WSAEINVAL`).
///
/// # Safety
/// Non-NULL pointers point to valid objects (any alignment).
#[no_mangle]
pub unsafe extern "system" fn WSPSocket(
    af: INT,
    type_: INT,
    protocol: INT,
    lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
    g: GROUP,
    dwFlags: DWORD,
    lpErrno: *mut INT,
) -> SOCKET {
    let r = catch(|| {
        let dup = if lpProtocolInfo.is_null() {
            0
        } else {
            // SAFETY: non-NULL, so a valid WSAPROTOCOL_INFOW (caller contract).
            unsafe { read_in(lpProtocolInfo)? }.dwProviderReserved
        };
        let s = provider()?.socket(af, type_, protocol, g, dwFlags, u64::from(dup))?;
        Ok(s.0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_socket(lpErrno, r) }
}

/// `WSPBind`: `name` is a `SOCKADDR_IN` (`AF_INET`, `namelen` ≥ 16, else
/// `WSAEFAULT`) with one of our addresses or the wildcard.
///
/// # Safety
/// `name` is NULL or has `namelen` readable bytes; `lpErrno` NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPBind(
    s: SOCKET,
    name: *const SOCKADDR,
    namelen: INT,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        // SAFETY: caller contract on `name`/`namelen`.
        let addr = unsafe { read_sockaddr_in(name, namelen)? };
        provider()?.bind(sock(s), addr)?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPListen`: `SOMAXCONN` and large backlogs are clamped.
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPListen(s: SOCKET, backlog: INT, lpErrno: *mut INT) -> INT {
    let r = catch(|| {
        provider()?.listen(sock(s), backlog)?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPEventSelect`: `hEventObject` must be NULL (with `lNetworkEvents` = 0:
/// deselect) or a live `sanpath_event_create` handle, else `WSAEINVAL`.
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPEventSelect(
    s: SOCKET,
    hEventObject: WSAEVENT,
    lNetworkEvents: LONG,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        let ev = event::lookup(hEventObject)?;
        provider()?.event_select(sock(s), ev, lNetworkEvents)?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPEnumNetworkEvents`: copies and clears the recorded events and resets
/// `hEventObject` (NULL, or a live `sanpath_event_create` handle, else
/// `WSAEINVAL`). NULL `lpNetworkEvents` → `WSAEFAULT`.
///
/// # Safety
/// `lpNetworkEvents` NULL or writable; `lpErrno` NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPEnumNetworkEvents(
    s: SOCKET,
    hEventObject: WSAEVENT,
    lpNetworkEvents: *mut WSANETWORKEVENTS,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        let ev = event::lookup(hEventObject)?;
        if lpNetworkEvents.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        let ne = provider()?.enum_network_events(sock(s), ev.as_deref())?;
        let out = WSANETWORKEVENTS {
            lNetworkEvents: ne.network_events,
            iErrorCode: ne.error_codes,
        };
        // SAFETY: non-NULL and writable (caller contract).
        unsafe { write_out(lpNetworkEvents, out)? };
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPConnect`, never blocking: an attempt under way is `SOCKET_ERROR` +
/// `WSAEWOULDBLOCK`, its result comes as `FD_CONNECT`. `name` as for
/// `WSPBind`. Non-empty `lpCallerData` → `WSAEINVAL` (spec §7-11);
/// `lpCalleeData->len` is set to 0; QoS arguments are ignored.
///
/// # Safety
/// Non-NULL pointers point to valid objects; `name` has `namelen` bytes.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPConnect(
    s: SOCKET,
    name: *const SOCKADDR,
    namelen: INT,
    lpCallerData: *mut WSABUF,
    lpCalleeData: *mut WSABUF,
    lpSQOS: *mut QOS,
    lpGQOS: *mut QOS,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        // SAFETY: caller contract on `name`/`namelen`.
        let addr = unsafe { read_sockaddr_in(name, namelen)? };
        if !lpCallerData.is_null() {
            // SAFETY: non-NULL, so a readable WSABUF (caller contract).
            let caller = unsafe { read_in(lpCallerData)? };
            if caller.len != 0 {
                return Err(WsaError::WSAEINVAL);
            }
        }
        if !lpCalleeData.is_null() {
            // SAFETY: non-NULL, so a writable WSABUF (caller contract); only
            // its `len` field is written (unaligned).
            unsafe { addr_of_mut!((*lpCalleeData).len).write_unaligned(0) };
        }
        provider()?.connect(sock(s), addr, &[])?;
        Err::<INT, _>(WsaError::WSAEWOULDBLOCK)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPAccept`: takes the oldest queued request and calls `lpfnCondition`
/// (on this thread, before answering the remote) with the caller's and our
/// address as `SOCKADDR_IN` in `lpCallerId`/`lpCalleeId`, NULL caller data,
/// QoS and callee data, and `dwCallbackData`. NULL `lpfnCondition` accepts.
/// `CF_ACCEPT` → the new descriptor, `addr`/`*addrlen` filled when `addr` is
/// non-NULL (`*addrlen` must be ≥ 16, else `WSAEFAULT` before anything is
/// accepted); `CF_REJECT` → `WSAECONNREFUSED`; `CF_DEFER` → `WSATRY_AGAIN`
/// (the request stays queued); any other answer → `WSAEINVAL` (request
/// stays queued). Nothing queued → `WSAEWOULDBLOCK`.
///
/// # Safety
/// `addr` NULL or `*addrlen` writable bytes; `addrlen`, `lpErrno` NULL or
/// valid; `lpfnCondition` NULL or a function of that type.
#[no_mangle]
pub unsafe extern "system" fn WSPAccept(
    s: SOCKET,
    addr: *mut SOCKADDR,
    addrlen: *mut INT,
    lpfnCondition: LPCONDITIONPROC,
    dwCallbackData: DWORD_PTR,
    lpErrno: *mut INT,
) -> SOCKET {
    let r = catch(|| {
        if !addr.is_null() {
            // SAFETY: NULL or a readable INT (caller contract).
            let len = unsafe { read_in(addrlen)? };
            if len < size_of::<SOCKADDR_IN>() as INT {
                return Err(WsaError::WSAEFAULT);
            }
        }
        let mut bad_answer = false;
        let mut condition = |info: &ConnectRequestInfo| -> Condition {
            let Some(f) = lpfnCondition else {
                return Condition::Accept;
            };
            let mut caller = to_sockaddr_in(info.caller);
            let mut callee = to_sockaddr_in(info.callee);
            let mut caller_id = WSABUF {
                len: size_of::<SOCKADDR_IN>() as ULONG,
                buf: (&mut caller as *mut SOCKADDR_IN).cast(),
            };
            let mut callee_id = WSABUF {
                len: size_of::<SOCKADDR_IN>() as ULONG,
                buf: (&mut callee as *mut SOCKADDR_IN).cast(),
            };
            let mut group: GROUP = 0;
            // SAFETY: the switch's condition function (caller contract);
            // every pointer is to a local that outlives the call, or NULL.
            let answer = unsafe {
                f(
                    &mut caller_id,
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    &mut callee_id,
                    null_mut(),
                    &mut group,
                    dwCallbackData,
                )
            };
            match answer {
                CF_ACCEPT => Condition::Accept,
                CF_REJECT => Condition::Reject,
                CF_DEFER => Condition::Defer,
                _ => {
                    bad_answer = true;
                    Condition::Defer
                }
            }
        };
        let result = provider()?.accept(sock(s), &mut condition);
        let (new, peer) = match result {
            Err(WsaError::WSATRY_AGAIN) if bad_answer => return Err(WsaError::WSAEINVAL),
            r => r?,
        };
        if !addr.is_null() {
            // SAFETY: `addr` has `*addrlen` ≥ 16 writable bytes and `addrlen`
            // is writable (checked above; caller contract).
            unsafe {
                write_out(addr.cast::<SOCKADDR_IN>(), to_sockaddr_in(peer))?;
                write_out(addrlen, size_of::<SOCKADDR_IN>() as INT)?;
            }
        }
        Ok(new.0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_socket(lpErrno, r) }
}

/// `WSPSend`: one message from registered buffers (at most 16), always
/// overlapped (NULL or misaligned `lpOverlapped` → `WSAEFAULT`); started →
/// `SOCKET_ERROR` + `WSA_IO_PENDING`. `dwFlags` must be 0. The completion
/// routine and thread id are ignored (the switch never passes them).
///
/// # Safety
/// The SPI contract: buffers lie in memory registered on `s` and, like
/// `*lpOverlapped`, stay valid until the op's completion was reported.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPSend(
    s: SOCKET,
    lpBuffers: *mut WSABUF,
    dwBufferCount: DWORD,
    lpNumberOfBytesSent: *mut DWORD,
    dwFlags: DWORD,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
    lpThreadId: *mut WSATHREADID,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        // SAFETY: caller contract on the overlapped record.
        let ov = unsafe { overlapped(lpOverlapped)? };
        let mut bufs = [empty_buf(); MAX_SGE];
        // SAFETY: caller contract on the buffer array.
        let n = unsafe { read_bufs(lpBuffers.cast_const(), dwBufferCount, &mut bufs, to_buf)? };
        // SAFETY: forwarded SPI contract (buffers and `ov` valid until
        // completion).
        pending(unsafe { provider()?.send(sock(s), &bufs[..n], dwFlags, ov) })
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPRecv`: posts one receive into registered buffers (at most 16);
/// as `WSPSend`. `*lpFlags` (if given) must be 0, else `WSAEOPNOTSUPP`; the
/// result flags come from `WSPGetOverlappedResult`.
///
/// # Safety
/// As [`WSPSend`]; `lpFlags` NULL or readable.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPRecv(
    s: SOCKET,
    lpBuffers: *mut WSABUF,
    dwBufferCount: DWORD,
    lpNumberOfBytesRecvd: *mut DWORD,
    lpFlags: *mut DWORD,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
    lpThreadId: *mut WSATHREADID,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        // SAFETY: caller contract on the overlapped record.
        let ov = unsafe { overlapped(lpOverlapped)? };
        if !lpFlags.is_null() {
            // SAFETY: non-NULL, so readable (caller contract).
            if unsafe { read_in(lpFlags)? } != 0 {
                return Err(WsaError::WSAEOPNOTSUPP);
            }
        }
        let mut bufs = [empty_buf(); MAX_SGE];
        // SAFETY: caller contract on the buffer array.
        let n = unsafe { read_bufs(lpBuffers.cast_const(), dwBufferCount, &mut bufs, to_buf)? };
        // SAFETY: forwarded SPI contract.
        pending(unsafe { provider()?.recv(sock(s), &bufs[..n], ov) })
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

fn empty_buf() -> WsaBuf {
    WsaBuf {
        len: 0,
        buf: null_mut(),
    }
}

fn to_buf(b: WSABUF) -> WsaBuf {
    WsaBuf {
        len: b.len,
        buf: b.buf.cast(),
    }
}

/// `WSPGetOverlappedResult` (spec §4.4): `TRUE` with `*lpcbTransfer` and
/// `*lpdwFlags` for a completed op; `FALSE` with the op's error, or with
/// `WSA_IO_INCOMPLETE` while pending and `fWait` is `FALSE`. With `fWait` it
/// waits for the op itself. NULL/misaligned `lpOverlapped` or NULL out
/// pointers → `WSAEFAULT`.
///
/// # Safety
/// Non-NULL pointers valid; `lpOverlapped` a record of an op on `s`.
#[no_mangle]
pub unsafe extern "system" fn WSPGetOverlappedResult(
    s: SOCKET,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpcbTransfer: *mut DWORD,
    fWait: BOOL,
    lpdwFlags: *mut DWORD,
    lpErrno: *mut INT,
) -> BOOL {
    let r = catch(|| {
        // SAFETY: caller contract on the overlapped record.
        let ov = unsafe { overlapped(lpOverlapped)? };
        if lpcbTransfer.is_null() || lpdwFlags.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        let (bytes, flags) = provider()?.get_overlapped_result(sock(s), ov, fWait != FALSE)?;
        // SAFETY: both non-NULL and writable (caller contract).
        unsafe {
            write_out(lpcbTransfer, bytes)?;
            write_out(lpdwFlags, flags)?;
        }
        Ok(())
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_bool(lpErrno, r) }
}

/// `WSPGetSockOpt`: on success `*optlen` = bytes written. NULL `optlen` or
/// `optval`, negative or too small `*optlen` → `WSAEFAULT`; unknown option →
/// `WSAENOPROTOOPT`; unknown level → `WSAEINVAL`.
///
/// # Safety
/// `optlen` NULL or valid; `optval` NULL or `*optlen` writable bytes.
#[no_mangle]
pub unsafe extern "system" fn WSPGetSockOpt(
    s: SOCKET,
    level: INT,
    optname: INT,
    optval: *mut CHAR,
    optlen: *mut INT,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        // SAFETY: NULL or a readable INT (caller contract).
        let len = unsafe { read_in(optlen)? };
        if len < 0 || optval.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        let mut local = [0u8; OPT_MAX];
        let room = (len as usize).min(OPT_MAX);
        let n = provider()?.get_sockopt(sock(s), level, optname, &mut local[..room])?;
        let n = n.min(room);
        // SAFETY: `optval` has `*optlen` ≥ `room` ≥ `n` writable bytes
        // (caller contract); `local` is ours, so no overlap.
        unsafe { std::ptr::copy_nonoverlapping(local.as_ptr(), optval.cast::<u8>(), n) };
        // SAFETY: `optlen` is writable (caller contract).
        unsafe { write_out(optlen, n as INT)? };
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPSetSockOpt`: negative `optlen`, or NULL `optval` with `optlen` > 0 →
/// `WSAEFAULT`.
///
/// # Safety
/// `optval` NULL or `optlen` readable bytes.
#[no_mangle]
pub unsafe extern "system" fn WSPSetSockOpt(
    s: SOCKET,
    level: INT,
    optname: INT,
    optval: *const CHAR,
    optlen: INT,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        if optlen < 0 {
            return Err(WsaError::WSAEFAULT);
        }
        let mut local = [0u8; OPT_MAX];
        let len = (optlen as usize).min(OPT_MAX);
        // SAFETY: `optval` has `optlen` ≥ `len` readable bytes (caller
        // contract).
        let value = unsafe { copy_in(optval.cast(), len, &mut local, WsaError::WSAEFAULT)? };
        provider()?.set_sockopt(sock(s), level, optname, value)?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPDuplicateSocket` (spec §4.8): completes the socket's pending
/// receives with success and 0 bytes and stores the token that only process
/// `dwProcessId` can pass to `WSPSocket` in
/// `lpProtocolInfo->dwProviderReserved` (see the engine's `spi::dup`).
/// NULL `lpProtocolInfo` → `WSAEFAULT`.
///
/// # Safety
/// `lpProtocolInfo` NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPDuplicateSocket(
    s: SOCKET,
    dwProcessId: DWORD,
    lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        if lpProtocolInfo.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        let value = provider()?.duplicate_socket(sock(s), dwProcessId)?;
        let value = DWORD::try_from(value).map_err(|_| WsaError::WSAENOBUFS)?;
        // SAFETY: non-NULL, so a writable WSAPROTOCOL_INFOW (caller
        // contract); only `dwProviderReserved` is written (unaligned).
        unsafe { addr_of_mut!((*lpProtocolInfo).dwProviderReserved).write_unaligned(value) };
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPGetQOSByName`: QoS is not supported: `FALSE` + `WSAEOPNOTSUPP`
/// (START-8; `WSAENOTSOCK` for a socket that is not ours).
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPGetQOSByName(
    s: SOCKET,
    lpQOSName: *mut WSABUF,
    lpQOS: *mut QOS,
    lpErrno: *mut INT,
) -> BOOL {
    let r = catch(|| provider()?.get_qos_by_name(sock(s)));
    // SAFETY: lpErrno per contract.
    unsafe { ret_bool(lpErrno, r) }
}

/// `WSPCloseSocket`: abortive close (spec §6.1); 0 in every state of a live
/// socket, `WSAENOTSOCK` for one that is not (or no longer) ours.
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPCloseSocket(s: SOCKET, lpErrno: *mut INT) -> INT {
    let r = catch(|| {
        provider()?.close_socket(sock(s))?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

// ---------------------------------------------------------------------------
// Functions a SAN provider need not implement ("N"): SOCKET_ERROR (or
// INVALID_SOCKET) + WSAEOPNOTSUPP. Never NULL in the table.
// ---------------------------------------------------------------------------

/// # Safety
/// `lp_errno` is NULL or writable.
unsafe fn unsupported(lp_errno: *mut INT) -> INT {
    // SAFETY: forwarded contract.
    unsafe { ret_int(lp_errno, catch(|| Err(WsaError::WSAEOPNOTSUPP))) }
}

/// Not supported: `SOCKET_ERROR` + `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPAddressToString(
    lpsaAddress: *mut SOCKADDR,
    dwAddressLength: DWORD,
    lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
    lpszAddressString: LPWSTR,
    lpdwAddressStringLength: *mut DWORD,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported: `SOCKET_ERROR` + `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPAsyncSelect(
    s: SOCKET,
    hWnd: HWND,
    wMsg: UINT,
    lEvent: LONG,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (the switch never calls it, spec §7-18): `SOCKET_ERROR` +
/// `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPCancelBlockingCall(lpErrno: *mut INT) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (names are cached by the switch): `SOCKET_ERROR` +
/// `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPGetPeerName(
    s: SOCKET,
    name: *mut SOCKADDR,
    namelen: *mut INT,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (names are cached by the switch): `SOCKET_ERROR` +
/// `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPGetSockName(
    s: SOCKET,
    name: *mut SOCKADDR,
    namelen: *mut INT,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (multipoint): `INVALID_SOCKET` + `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPJoinLeaf(
    s: SOCKET,
    name: *const SOCKADDR,
    namelen: INT,
    lpCallerData: *mut WSABUF,
    lpCalleeData: *mut WSABUF,
    lpSQOS: *mut QOS,
    lpGQOS: *mut QOS,
    dwFlags: DWORD,
    lpErrno: *mut INT,
) -> SOCKET {
    // SAFETY: lpErrno per contract.
    unsafe { ret_socket(lpErrno, catch(|| Err(WsaError::WSAEOPNOTSUPP))) }
}

/// Not supported (graceful close is the switch's): `SOCKET_ERROR` +
/// `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPRecvDisconnect(
    s: SOCKET,
    lpInboundDisconnectData: *mut WSABUF,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (no datagrams): `SOCKET_ERROR` + `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPRecvFrom(
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
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (select is the switch's): `SOCKET_ERROR` + `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPSelect(
    nfds: INT,
    readfds: *mut FD_SET,
    writefds: *mut FD_SET,
    exceptfds: *mut FD_SET,
    timeout: *mut TIMEVAL,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (graceful close is the switch's): `SOCKET_ERROR` +
/// `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPSendDisconnect(
    s: SOCKET,
    lpOutboundDisconnectData: *mut WSABUF,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (no datagrams): `SOCKET_ERROR` + `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPSendTo(
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
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (shutdown is the switch's): `SOCKET_ERROR` +
/// `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPShutdown(s: SOCKET, how: INT, lpErrno: *mut INT) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}

/// Not supported (conversion goes to TCP/IP): `SOCKET_ERROR` +
/// `WSAEOPNOTSUPP`.
///
/// # Safety
/// `lpErrno` is NULL or writable; nothing else is accessed.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPStringToAddress(
    AddressString: LPWSTR,
    AddressFamily: INT,
    lpProtocolInfo: *mut WSAPROTOCOL_INFOW,
    lpAddress: *mut SOCKADDR,
    lpAddressLength: *mut INT,
    lpErrno: *mut INT,
) -> INT {
    // SAFETY: lpErrno per contract.
    unsafe { unsupported(lpErrno) }
}
