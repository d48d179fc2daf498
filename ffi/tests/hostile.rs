//! Every exported function called with hostile arguments: NULL and
//! misaligned pointers, negative and huge lengths, garbage and stale
//! handles, wrong GUIDs and GUID sizes. Each call must return its documented
//! error (and never crash or hang); proptest drives the parts with many
//! inputs.
//!
//! The tests share the process-wide provider: each holds one startup for its
//! duration (the engine refcounts them). Garbage socket values are chosen so
//! that they can never name a live socket of a concurrently running test
//! (engine descriptors are `generation << 32 | index + 1`, generation ≥ 1).

#![allow(non_snake_case)]

use proptest::prelude::*;
use sanpath_ffi::win::*;
use sanpath_ffi::*;
use std::ffi::c_void;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// A minimal switch: the four upcalls the provider makes.
// ---------------------------------------------------------------------------

const SWITCH_BIT: usize = 1 << 62;

unsafe extern "system" fn create_handle(_cat: DWORD, ctx: DWORD_PTR, _err: *mut INT) -> SOCKET {
    ctx | SWITCH_BIT
}

unsafe extern "system" fn close_handle(_s: SOCKET, _err: *mut INT) -> INT {
    0
}

unsafe extern "system" fn query_context(s: SOCKET, ctx: *mut DWORD_PTR, _err: *mut INT) -> INT {
    // SAFETY: the provider passes a pointer to its own DWORD_PTR.
    unsafe { *ctx = s & !SWITCH_BIT };
    0
}

unsafe extern "system" fn complete(
    _s: SOCKET,
    ov: *mut WSAOVERLAPPED,
    error: DWORD,
    bytes: DWORD,
    _err: *mut INT,
) -> INT {
    // SAFETY: the provider passes the switch's own aligned, live record; the
    // switch side writes it atomically (bytes, then status with release).
    unsafe {
        AtomicUsize::from_ptr(std::ptr::addr_of_mut!((*ov).InternalHigh))
            .store(bytes as usize, Ordering::Relaxed);
        AtomicUsize::from_ptr(std::ptr::addr_of_mut!((*ov).Internal))
            .store(error as usize, Ordering::Release);
    }
    0
}

fn upcalls() -> WSPUPCALLTABLEEX {
    WSPUPCALLTABLEEX {
        lpWPUCloseEvent: None,
        lpWPUCloseSocketHandle: Some(close_handle),
        lpWPUCreateEvent: None,
        lpWPUCreateSocketHandle: Some(create_handle),
        lpWPUFDIsSet: None,
        lpWPUGetProviderPath: None,
        lpWPUModifyIFSHandle: None,
        lpWPUPostMessage: None,
        lpWPUQueryBlockingCallback: None,
        lpWPUQuerySocketHandleContext: Some(query_context),
        lpWPUQueueApc: None,
        lpWPUResetEvent: None,
        lpWPUSetEvent: None,
        lpWPUOpenCurrentThread: None,
        lpWPUCloseThread: None,
        lpWPUCompleteOverlappedRequest: Some(complete),
    }
}

/// One startup, paired with a cleanup on drop.
struct Started;

impl Started {
    fn new() -> Started {
        let mut data = std::mem::MaybeUninit::<WSPDATA>::zeroed();
        let mut table = std::mem::MaybeUninit::<WSPPROC_TABLE>::zeroed();
        let mut up = upcalls();
        // SAFETY: valid, writable objects of the right types.
        let rc = unsafe {
            WSPStartupEx(
                0x0202,
                data.as_mut_ptr(),
                null_mut(),
                &mut up,
                table.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "WSPStartupEx");
        Started
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let mut err = 0;
        // SAFETY: `err` is a valid INT.
        assert_eq!(unsafe { WSPCleanup(&mut err) }, 0, "WSPCleanup: {err}");
    }
}

/// Socket values that can never be a live descriptor.
const GARBAGE: [SOCKET; 6] = [
    0,
    1,
    0xdead_beef,
    0xFFFF_FFFF,
    0x7FFF_FFF0_0000_0001,
    INVALID_SOCKET,
];

fn errno_of(f: impl FnOnce(*mut INT) -> i64) -> (i64, INT) {
    let mut err: INT = 0;
    let rc = f(&mut err);
    (rc, err)
}

fn new_socket() -> SOCKET {
    let mut err = 0;
    // SAFETY: NULL protocol info is allowed; `err` valid.
    let s = unsafe {
        WSPSocket(
            AF_INET,
            SOCK_STREAM,
            IPPROTO_TCP,
            null_mut(),
            0,
            WSA_FLAG_OVERLAPPED,
            &mut err,
        )
    };
    assert_ne!(s, INVALID_SOCKET, "WSPSocket: {err}");
    s
}

fn sin(ip: [u8; 4], port: u16) -> SOCKADDR_IN {
    SOCKADDR_IN {
        sin_family: AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: IN_ADDR {
            s_addr: u32::from_be_bytes(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

const OUR_IP: [u8; 4] = [198, 18, 0, 1];

static NEXT_PORT: AtomicU16 = AtomicU16::new(7000);

/// A connected pair `(client, accepted, listener)` on the soft fabric.
fn pair() -> (SOCKET, SOCKET, SOCKET) {
    let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    let mut err = 0;
    let l = new_socket();
    let a = sin(OUR_IP, port);
    // SAFETY: valid arguments throughout.
    unsafe {
        assert_eq!(
            WSPBind(l, (&a as *const SOCKADDR_IN).cast(), 16, &mut err),
            0,
            "{err}"
        );
        assert_eq!(WSPListen(l, 8, &mut err), 0, "{err}");
        let evl = sanpath_event_create();
        let evc = sanpath_event_create();
        assert_eq!(WSPEventSelect(l, evl, FD_ACCEPT, &mut err), 0, "{err}");
        let c = new_socket();
        assert_eq!(WSPEventSelect(c, evc, FD_CONNECT, &mut err), 0, "{err}");
        let rc = WSPConnect(
            c,
            (&a as *const SOCKADDR_IN).cast(),
            16,
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            &mut err,
        );
        assert!(rc == 0 || err == WSAEWOULDBLOCK, "connect {rc} {err}");
        assert_eq!(sanpath_event_wait(evl, 10_000), SANPATH_WAIT_SIGNALED);
        let s = WSPAccept(l, null_mut(), null_mut(), None, 0, &mut err);
        assert_ne!(s, INVALID_SOCKET, "accept {err}");
        assert_eq!(sanpath_event_wait(evc, 10_000), SANPATH_WAIT_SIGNALED);
        let mut ne = WSANETWORKEVENTS::default();
        assert_eq!(WSPEnumNetworkEvents(c, evc, &mut ne, &mut err), 0);
        assert_eq!(ne.iErrorCode[FD_CONNECT_BIT as usize], 0, "connect result");
        sanpath_event_close(evl);
        sanpath_event_close(evc);
        (c, s, l)
    }
}

fn close(s: SOCKET) {
    let mut err = 0;
    // SAFETY: `err` valid.
    assert_eq!(unsafe { WSPCloseSocket(s, &mut err) }, 0, "close {err}");
}

fn ov(h_event: usize) -> Box<WSAOVERLAPPED> {
    Box::new(WSAOVERLAPPED {
        Internal: 0,
        InternalHigh: 0,
        Offset: 0,
        OffsetHigh: 0,
        hEvent: h_event as WSAEVENT,
    })
}

// ---------------------------------------------------------------------------
// Startup and cleanup
// ---------------------------------------------------------------------------

#[test]
fn startup_rejects_bad_versions_and_pointers() {
    let mut data = std::mem::MaybeUninit::<WSPDATA>::zeroed();
    let mut table = std::mem::MaybeUninit::<WSPPROC_TABLE>::zeroed();
    let mut up = upcalls();
    let d = data.as_mut_ptr();
    let t = table.as_mut_ptr();
    // SAFETY: every non-NULL pointer is a valid object; NULLs are checked.
    unsafe {
        for v in [0u16, 0x0001, 0x0101, 0x0102, 0x0002, 0x0201] {
            assert_eq!(
                WSPStartupEx(v, d, null_mut(), &mut up, t),
                WSAVERNOTSUPPORTED,
                "{v:#x}"
            );
        }
        assert_eq!(
            WSPStartupEx(0x0202, null_mut(), null_mut(), &mut up, t),
            WSAEFAULT
        );
        assert_eq!(
            WSPStartupEx(0x0202, d, null_mut(), &mut up, null_mut()),
            WSAEFAULT
        );
        assert_eq!(
            WSPStartupEx(0x0202, d, null_mut(), null_mut(), t),
            WSAEFAULT
        );
        // Each upcall the provider needs, missing.
        for i in 0..4 {
            let mut bad = upcalls();
            match i {
                0 => bad.lpWPUCreateSocketHandle = None,
                1 => bad.lpWPUCloseSocketHandle = None,
                2 => bad.lpWPUQuerySocketHandleContext = None,
                _ => bad.lpWPUCompleteOverlappedRequest = None,
            }
            assert_eq!(
                WSPStartupEx(0x0202, d, null_mut(), &mut bad, t),
                WSAEFAULT,
                "{i}"
            );
        }
    }
}

#[test]
fn startup_writes_misaligned_outputs_and_fills_every_slot() {
    // Unaligned WSPDATA / WSPPROC_TABLE / upcall table / protocol info.
    let mut data_buf = vec![0u8; std::mem::size_of::<WSPDATA>() + 1];
    let mut table_buf = vec![0u8; std::mem::size_of::<WSPPROC_TABLE>() + 1];
    let mut up_buf = vec![0u8; std::mem::size_of::<WSPUPCALLTABLEEX>() + 1];
    let mut pi_buf = vec![0u8; std::mem::size_of::<WSAPROTOCOL_INFOW>() + 1];
    let d = data_buf[1..].as_mut_ptr().cast::<WSPDATA>();
    let t = table_buf[1..].as_mut_ptr().cast::<WSPPROC_TABLE>();
    let u = up_buf[1..].as_mut_ptr().cast::<WSPUPCALLTABLEEX>();
    let p = pi_buf[1..].as_mut_ptr().cast::<WSAPROTOCOL_INFOW>();
    // SAFETY: the buffers have room for each object; all accesses unaligned.
    unsafe {
        u.write_unaligned(upcalls());
        assert_eq!(WSPStartupEx(0x0202, d, p, u, t), 0);
        let data = d.read_unaligned();
        assert_eq!((data.wVersion, data.wHighVersion), (0x0202, 0x0202));
        let table = t.read_unaligned();
        let slots: [usize; 30] = std::mem::transmute(table);
        assert!(slots.iter().all(|&s| s != 0), "START-2");
        let mut err = 0;
        assert_eq!(WSPCleanup(&mut err), 0);
    }
}

/// Each slot holds the function of its name (the types are checked by the
/// compiler; this checks the mapping).
#[test]
fn procedure_table_slots_hold_their_functions() {
    let t = proc_table();
    macro_rules! same {
        ($($slot:ident => $f:ident),* $(,)?) => {$(
            assert_eq!(t.$slot.map(|f| f as usize), Some($f as *const () as usize), stringify!($slot));
        )*};
    }
    same!(
        lpWSPAccept => WSPAccept, lpWSPAddressToString => WSPAddressToString,
        lpWSPAsyncSelect => WSPAsyncSelect, lpWSPBind => WSPBind,
        lpWSPCancelBlockingCall => WSPCancelBlockingCall, lpWSPCleanup => WSPCleanup,
        lpWSPCloseSocket => WSPCloseSocket, lpWSPConnect => WSPConnect,
        lpWSPDuplicateSocket => WSPDuplicateSocket,
        lpWSPEnumNetworkEvents => WSPEnumNetworkEvents, lpWSPEventSelect => WSPEventSelect,
        lpWSPGetOverlappedResult => WSPGetOverlappedResult, lpWSPGetPeerName => WSPGetPeerName,
        lpWSPGetSockName => WSPGetSockName, lpWSPGetSockOpt => WSPGetSockOpt,
        lpWSPGetQOSByName => WSPGetQOSByName, lpWSPIoctl => WSPIoctl,
        lpWSPJoinLeaf => WSPJoinLeaf, lpWSPListen => WSPListen, lpWSPRecv => WSPRecv,
        lpWSPRecvDisconnect => WSPRecvDisconnect, lpWSPRecvFrom => WSPRecvFrom,
        lpWSPSelect => WSPSelect, lpWSPSend => WSPSend,
        lpWSPSendDisconnect => WSPSendDisconnect, lpWSPSendTo => WSPSendTo,
        lpWSPSetSockOpt => WSPSetSockOpt, lpWSPShutdown => WSPShutdown,
        lpWSPSocket => WSPSocket, lpWSPStringToAddress => WSPStringToAddress,
    );
}

// ---------------------------------------------------------------------------
// Functions a SAN provider need not implement
// ---------------------------------------------------------------------------

#[test]
fn unsupported_functions_fail_cleanly_with_any_arguments() {
    let junk = 0x10 as *mut c_void;
    // SAFETY: these functions touch nothing but lpErrno (NULL or valid).
    unsafe {
        for errno in [null_mut(), &mut 0 as *mut INT] {
            let r = [
                WSPAddressToString(
                    junk.cast(),
                    99,
                    junk.cast(),
                    junk.cast(),
                    junk.cast(),
                    errno,
                ),
                WSPAsyncSelect(7, junk, 1, -1, errno),
                WSPCancelBlockingCall(errno),
                WSPGetPeerName(7, junk.cast(), junk.cast(), errno),
                WSPGetSockName(7, junk.cast(), junk.cast(), errno),
                WSPRecvDisconnect(7, junk.cast(), errno),
                WSPRecvFrom(
                    7,
                    junk.cast(),
                    999,
                    junk.cast(),
                    junk.cast(),
                    junk.cast(),
                    junk.cast(),
                    junk.cast(),
                    None,
                    junk.cast(),
                    errno,
                ),
                WSPSelect(
                    -1,
                    junk.cast(),
                    junk.cast(),
                    junk.cast(),
                    junk.cast(),
                    errno,
                ),
                WSPSendDisconnect(7, junk.cast(), errno),
                WSPSendTo(
                    7,
                    junk.cast(),
                    999,
                    junk.cast(),
                    0,
                    junk.cast(),
                    -5,
                    junk.cast(),
                    None,
                    junk.cast(),
                    errno,
                ),
                WSPShutdown(7, 99, errno),
                WSPStringToAddress(junk.cast(), 2, junk.cast(), junk.cast(), junk.cast(), errno),
            ];
            assert!(r.iter().all(|&v| v == SOCKET_ERROR));
            let s = WSPJoinLeaf(
                7,
                junk.cast(),
                -1,
                junk.cast(),
                junk.cast(),
                junk.cast(),
                junk.cast(),
                0,
                errno,
            );
            assert_eq!(s, INVALID_SOCKET);
            if !errno.is_null() {
                assert_eq!(*errno, WSAEOPNOTSUPP);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Garbage and stale sockets
// ---------------------------------------------------------------------------

/// Calls every socket function with `s` and otherwise valid arguments;
/// returns the codes.
fn all_socket_calls(s: SOCKET) -> Vec<(&'static str, INT)> {
    let mut out = Vec::new();
    let mut err: INT;
    let a = sin(OUR_IP, 9);
    let mut buf = [0u8; 64];
    let mut w = WSABUF {
        len: 64,
        buf: buf.as_mut_ptr().cast(),
    };
    let mut wx = WSABUFEX {
        len: 64,
        buf: buf.as_mut_ptr().cast(),
        handle: 0x1000 as HANDLE,
    };
    let mut o = ov(0);
    let mut n: DWORD = 0;
    let mut flags: DWORD = 0;
    // SAFETY: all-zero is a valid WSAPROTOCOL_INFOW (plain integers).
    let mut pi: WSAPROTOCOL_INFOW = unsafe { std::mem::zeroed() };
    let mut ne = WSANETWORKEVENTS::default();
    let mut optlen: INT = 4;
    let mut desc = [0u8; 32];
    let mut dlen: DWORD = 32;
    let sa = (&a as *const SOCKADDR_IN).cast::<SOCKADDR>();
    // SAFETY: every pointer is a valid local of the right size.
    unsafe {
        macro_rules! call {
            ($name:literal, $e:expr) => {{
                err = 0;
                let _ = $e;
                out.push(($name, err));
            }};
        }
        call!("bind", WSPBind(s, sa, 16, &mut err));
        call!("listen", WSPListen(s, 5, &mut err));
        call!(
            "connect",
            WSPConnect(
                s,
                sa,
                16,
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                &mut err
            )
        );
        call!(
            "accept",
            WSPAccept(s, null_mut(), null_mut(), None, 0, &mut err)
        );
        call!("event_select", WSPEventSelect(s, null_mut(), 0, &mut err));
        call!(
            "enum_network_events",
            WSPEnumNetworkEvents(s, null_mut(), &mut ne, &mut err)
        );
        call!(
            "send",
            WSPSend(s, &mut w, 1, &mut n, 0, &mut *o, None, null_mut(), &mut err)
        );
        call!(
            "recv",
            WSPRecv(
                s,
                &mut w,
                1,
                &mut n,
                &mut flags,
                &mut *o,
                None,
                null_mut(),
                &mut err
            )
        );
        call!(
            "get_overlapped_result",
            WSPGetOverlappedResult(s, &mut *o, &mut n, FALSE, &mut flags, &mut err)
        );
        call!(
            "getsockopt",
            WSPGetSockOpt(
                s,
                SOL_SOCKET,
                SO_MAX_MSG_SIZE,
                buf.as_mut_ptr().cast(),
                &mut optlen,
                &mut err
            )
        );
        call!(
            "setsockopt",
            WSPSetSockOpt(s, SOL_SOCKET, SO_DEBUG, buf.as_ptr().cast(), 4, &mut err)
        );
        call!("duplicate", WSPDuplicateSocket(s, 1, &mut pi, &mut err));
        call!("qos", WSPGetQOSByName(s, null_mut(), null_mut(), &mut err));
        call!(
            "ioctl",
            WSPIoctl(
                s,
                SIO_ADDRESS_LIST_QUERY,
                null_mut(),
                0,
                buf.as_mut_ptr().cast(),
                64,
                &mut n,
                null_mut(),
                None,
                null_mut(),
                &mut err
            )
        );
        call!(
            "register",
            WSPRegisterMemory(s, buf.as_mut_ptr().cast(), 64, MEM_READ, &mut err)
        );
        call!(
            "deregister",
            WSPDeregisterMemory(s, 0x1000 as HANDLE, &mut err)
        );
        call!(
            "register_rdma",
            WSPRegisterRdmaMemory(
                s,
                buf.as_mut_ptr().cast(),
                64,
                MEM_WRITE,
                desc.as_mut_ptr().cast(),
                &mut dlen,
                &mut err
            )
        );
        call!(
            "deregister_rdma",
            WSPDeregisterRdmaMemory(s, desc.as_mut_ptr().cast(), 32, &mut err)
        );
        call!(
            "rdma_write",
            WSPRdmaWrite(
                s,
                &mut wx,
                1,
                desc.as_mut_ptr().cast(),
                32,
                0,
                &mut n,
                0,
                &mut *o,
                None,
                null_mut(),
                &mut err
            )
        );
        call!(
            "rdma_read",
            WSPRdmaRead(
                s,
                &mut wx,
                1,
                desc.as_mut_ptr().cast(),
                32,
                0,
                &mut n,
                0,
                &mut *o,
                None,
                null_mut(),
                &mut err
            )
        );
        call!("close", WSPCloseSocket(s, &mut err));
    }
    assert_eq!(o.Internal, 0, "no op was started on a bad socket");
    out
}

#[test]
fn garbage_sockets_are_not_sockets() {
    let _s = Started::new();
    for s in GARBAGE {
        for (name, err) in all_socket_calls(s) {
            assert_eq!(err, WSAENOTSOCK, "{name}({s:#x})");
        }
    }
}

#[test]
fn closed_sockets_are_not_sockets_close_7() {
    let _s = Started::new();
    let s = new_socket();
    close(s);
    for (name, err) in all_socket_calls(s) {
        assert_eq!(err, WSAENOTSOCK, "{name} after close");
    }
    // A connected pair, closed from one side.
    let (c, a, l) = pair();
    close(a);
    for (name, err) in all_socket_calls(a) {
        assert_eq!(err, WSAENOTSOCK, "{name} on the closed end");
    }
    close(c);
    close(l);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Values below 2^32 have generation 0, which no descriptor has.
    #[test]
    fn random_small_sockets_are_not_sockets(s in 0usize..(1 << 32), backlog in any::<i32>()) {
        let _g = Started::new();
        let (rc, err) = errno_of(|e| unsafe_listen(s, backlog, e));
        prop_assert_eq!((rc, err), (i64::from(SOCKET_ERROR), WSAENOTSOCK));
        let (rc, err) = errno_of(|e| unsafe_close(s, e));
        prop_assert_eq!((rc, err), (i64::from(SOCKET_ERROR), WSAENOTSOCK));
    }
}

fn unsafe_listen(s: SOCKET, backlog: INT, e: *mut INT) -> i64 {
    // SAFETY: `e` is a valid INT.
    i64::from(unsafe { WSPListen(s, backlog, e) })
}

fn unsafe_close(s: SOCKET, e: *mut INT) -> i64 {
    // SAFETY: `e` is a valid INT.
    i64::from(unsafe { WSPCloseSocket(s, e) })
}

// ---------------------------------------------------------------------------
// Pointer and length arguments
// ---------------------------------------------------------------------------

#[test]
fn bind_and_connect_check_the_address() {
    let _g = Started::new();
    let s = new_socket();
    let good = sin(OUR_IP, 0);
    let mut six = good;
    six.sin_family = 23;
    let mut err = 0;
    // SAFETY: NULL or valid SOCKADDR_INs of 16 bytes; the lengths lie only
    // downwards (never beyond the object).
    unsafe {
        let p = (&good as *const SOCKADDR_IN).cast::<SOCKADDR>();
        for len in [i32::MIN, -1, 0, 1, 8, 15] {
            assert_eq!(WSPBind(s, p, len, &mut err), SOCKET_ERROR);
            assert_eq!(err, WSAEFAULT, "bind namelen {len}");
            let rc = WSPConnect(
                s,
                p,
                len,
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                &mut err,
            );
            assert_eq!(
                (rc, err),
                (SOCKET_ERROR, WSAEFAULT),
                "connect namelen {len}"
            );
        }
        assert_eq!(WSPBind(s, null(), 16, &mut err), SOCKET_ERROR);
        assert_eq!(err, WSAEFAULT);
        let p6 = (&six as *const SOCKADDR_IN).cast::<SOCKADDR>();
        assert_eq!(WSPBind(s, p6, 16, &mut err), SOCKET_ERROR);
        assert_eq!(err, WSAEFAULT, "family");
        // Misaligned but valid: accepted.
        let mut raw = [0u8; 17];
        std::ptr::copy_nonoverlapping(
            (&good as *const SOCKADDR_IN).cast::<u8>(),
            raw[1..].as_mut_ptr(),
            16,
        );
        assert_eq!(
            WSPBind(s, raw[1..].as_ptr().cast(), 16, &mut err),
            0,
            "{err}"
        );
        // Caller data is not supported (spec 7-11).
        let mut data = [1u8; 4];
        let mut cd = WSABUF {
            len: 4,
            buf: data.as_mut_ptr().cast(),
        };
        let target = sin(OUR_IP, 1);
        let rc = WSPConnect(
            s,
            (&target as *const SOCKADDR_IN).cast(),
            16,
            &mut cd,
            null_mut(),
            null_mut(),
            null_mut(),
            &mut err,
        );
        assert_eq!((rc, err), (SOCKET_ERROR, WSAEINVAL));
    }
    close(s);
}

#[test]
fn sockopt_lengths() {
    let _g = Started::new();
    let s = new_socket();
    let mut v = [0u8; 8];
    let mut err = 0;
    // SAFETY: `v` has 8 bytes; the lengths claimed are at most 8 or negative.
    unsafe {
        let mut len: INT = -1;
        assert_eq!(
            WSPGetSockOpt(
                s,
                SOL_SOCKET,
                SO_MAX_MSG_SIZE,
                v.as_mut_ptr().cast(),
                &mut len,
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        len = i32::MIN;
        assert_eq!(
            WSPGetSockOpt(
                s,
                SOL_SOCKET,
                SO_MAX_MSG_SIZE,
                v.as_mut_ptr().cast(),
                &mut len,
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPGetSockOpt(
                s,
                SOL_SOCKET,
                SO_MAX_MSG_SIZE,
                v.as_mut_ptr().cast(),
                null_mut(),
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        len = 8;
        assert_eq!(
            WSPGetSockOpt(
                s,
                SOL_SOCKET,
                SO_MAX_MSG_SIZE,
                null_mut(),
                &mut len,
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        for short in 0..4 {
            len = short;
            assert_eq!(
                WSPGetSockOpt(
                    s,
                    SOL_SOCKET,
                    SO_MAX_MSG_SIZE,
                    v.as_mut_ptr().cast(),
                    &mut len,
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEFAULT, "SOCK-5 optlen {short}");
        }
        len = 8;
        assert_eq!(
            WSPGetSockOpt(
                s,
                SOL_SOCKET,
                SO_MAX_MSG_SIZE,
                v.as_mut_ptr().cast(),
                &mut len,
                &mut err
            ),
            0
        );
        assert_eq!(len, 4);
        len = 8;
        assert_eq!(
            WSPGetSockOpt(
                s,
                0x1234,
                SO_MAX_MSG_SIZE,
                v.as_mut_ptr().cast(),
                &mut len,
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEINVAL, "bad level");
        assert_eq!(
            WSPGetSockOpt(
                s,
                SOL_SOCKET,
                0x7777,
                v.as_mut_ptr().cast(),
                &mut len,
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAENOPROTOOPT);
        // Set.
        assert_eq!(
            WSPSetSockOpt(s, SOL_SOCKET, SO_DEBUG, v.as_ptr().cast(), -1, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPSetSockOpt(s, SOL_SOCKET, SO_DEBUG, null(), 4, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPSetSockOpt(s, SOL_SOCKET, SO_DEBUG, v.as_ptr().cast(), 0, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPSetSockOpt(s, SOL_SOCKET, SO_DEBUG, v.as_ptr().cast(), 4, &mut err),
            0,
            "{err}"
        );
        // NULL lpErrno: the error is returned, nothing is written.
        assert_eq!(
            WSPSetSockOpt(s, SOL_SOCKET, SO_DEBUG, null(), 4, null_mut()),
            SOCKET_ERROR
        );
    }
    close(s);
}

#[test]
fn events_and_network_events_check_their_handles() {
    let _g = Started::new();
    let s = new_socket();
    let mut err = 0;
    let mut ne = WSANETWORKEVENTS::default();
    let ev = sanpath_event_create();
    // SAFETY: valid locals; the event handles are only looked up.
    unsafe {
        for bad in [0x10usize, 0xdead_beef, usize::MAX, 8] {
            let h = bad as WSAEVENT;
            assert_eq!(WSPEventSelect(s, h, FD_CONNECT, &mut err), SOCKET_ERROR);
            assert_eq!(err, WSAEINVAL, "event select {bad:#x}");
            assert_eq!(WSPEnumNetworkEvents(s, h, &mut ne, &mut err), SOCKET_ERROR);
            assert_eq!(err, WSAEINVAL, "enum {bad:#x}");
        }
        assert_eq!(
            WSPEventSelect(s, null_mut(), FD_CONNECT, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEINVAL, "NULL event with events");
        assert_eq!(
            WSPEnumNetworkEvents(s, ev, null_mut(), &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(WSPEventSelect(s, ev, FD_CONNECT, &mut err), 0);
        assert_eq!(WSPEnumNetworkEvents(s, ev, &mut ne, &mut err), 0);
        assert_eq!(ne, WSANETWORKEVENTS::default());
        // A stale event handle.
        assert_eq!(sanpath_event_close(ev), TRUE);
        assert_eq!(WSPEventSelect(s, ev, FD_CONNECT, &mut err), SOCKET_ERROR);
        assert_eq!(err, WSAEINVAL);
    }
    close(s);
}

#[test]
fn accept_checks_its_arguments() {
    let _g = Started::new();
    let mut err = 0;
    let l = new_socket();
    let mut addr = sin(OUR_IP, 0);
    let a = (&mut addr as *mut SOCKADDR_IN).cast::<SOCKADDR>();
    // SAFETY: valid locals or NULL.
    unsafe {
        assert_eq!(
            WSPAccept(l, a, null_mut(), None, 0, &mut err),
            INVALID_SOCKET
        );
        assert_eq!(err, WSAEFAULT, "addr without addrlen");
        for len in [i32::MIN, -1, 0, 15] {
            let mut n = len;
            assert_eq!(WSPAccept(l, a, &mut n, None, 0, &mut err), INVALID_SOCKET);
            assert_eq!(err, WSAEFAULT, "addrlen {len}");
        }
        // Not listening.
        let mut n = 16;
        assert_eq!(WSPAccept(l, a, &mut n, None, 0, &mut err), INVALID_SOCKET);
        assert_eq!(err, WSAEINVAL);
    }
    close(l);
}

#[test]
fn data_calls_check_overlapped_and_buffers() {
    let _g = Started::new();
    let (c, a, l) = pair();
    let mut err = 0;
    let mut buf = vec![0u8; 4096];
    let mut n: DWORD = 0;
    let mut flags: DWORD = 0;
    // SAFETY: valid locals; hostile values are checked before any access.
    unsafe {
        let h = WSPRegisterMemory(c, buf.as_mut_ptr().cast(), 4096, MEM_READWRITE, &mut err);
        assert!(!h.is_null(), "{err}");
        let mut w = WSABUF {
            len: 64,
            buf: buf.as_mut_ptr().cast(),
        };
        let mut o = ov(0);
        // NULL and misaligned overlapped records.
        assert_eq!(
            WSPSend(
                c,
                &mut w,
                1,
                &mut n,
                0,
                null_mut(),
                None,
                null_mut(),
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        let mut raw = [0u64; 6];
        let odd = raw.as_mut_ptr().cast::<u8>().add(4).cast::<WSAOVERLAPPED>();
        assert_eq!(
            WSPSend(c, &mut w, 1, &mut n, 0, odd, None, null_mut(), &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPRecv(
                c,
                &mut w,
                1,
                &mut n,
                &mut flags,
                odd,
                None,
                null_mut(),
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        // Buffer arrays: NULL with a count, huge counts.
        assert_eq!(
            WSPSend(
                c,
                null_mut(),
                1,
                &mut n,
                0,
                &mut *o,
                None,
                null_mut(),
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        for count in [17, 1000, u32::MAX] {
            assert_eq!(
                WSPSend(
                    c,
                    &mut w,
                    count,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEINVAL, "count {count}");
            assert_eq!(
                WSPRecv(
                    c,
                    &mut w,
                    count,
                    &mut n,
                    &mut flags,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEINVAL, "count {count}");
        }
        // A buffer that is not registered (spec 7-2).
        let mut other = [0u8; 64];
        let mut wo = WSABUF {
            len: 64,
            buf: other.as_mut_ptr().cast(),
        };
        assert_eq!(
            WSPSend(
                c,
                &mut wo,
                1,
                &mut n,
                0,
                &mut *o,
                None,
                null_mut(),
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT, "unregistered buffer");
        // Receive flags must be 0.
        flags = MSG_OOB as DWORD;
        assert_eq!(
            WSPRecv(
                c,
                &mut w,
                1,
                &mut n,
                &mut flags,
                &mut *o,
                None,
                null_mut(),
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEOPNOTSUPP);
        assert_eq!(o.Internal, 0, "nothing was started");
        // WSPGetOverlappedResult's pointers.
        let mut fl: DWORD = 0;
        assert_eq!(
            WSPGetOverlappedResult(c, null_mut(), &mut n, FALSE, &mut fl, &mut err),
            FALSE
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPGetOverlappedResult(c, odd, &mut n, FALSE, &mut fl, &mut err),
            FALSE
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPGetOverlappedResult(c, &mut *o, null_mut(), FALSE, &mut fl, &mut err),
            FALSE
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPGetOverlappedResult(c, &mut *o, &mut n, FALSE, null_mut(), &mut err),
            FALSE
        );
        assert_eq!(err, WSAEFAULT);
        // A started receive, then its result while pending.
        let mut ro = ov(1);
        assert_eq!(
            WSPRecv(
                c,
                &mut w,
                1,
                &mut n,
                null_mut(),
                &mut *ro,
                None,
                null_mut(),
                &mut err
            ),
            SOCKET_ERROR
        );
        assert_eq!(err, WSA_IO_PENDING, "XFER-1");
        assert_eq!(ro.Internal, WSS_OPERATION_IN_PROGRESS, "XFER-3");
        assert_eq!(
            WSPGetOverlappedResult(c, &mut *ro, &mut n, FALSE, &mut fl, &mut err),
            FALSE
        );
        assert_eq!(err, WSA_IO_INCOMPLETE);
        // Close aborts it; Internal shows the result (bit 0 set: no upcall).
        close(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        while AtomicUsize::from_ptr(std::ptr::addr_of_mut!(ro.Internal)).load(Ordering::Acquire)
            == WSS_OPERATION_IN_PROGRESS
        {
            assert!(Instant::now() < deadline, "abort completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ro.Internal, WSA_OPERATION_ABORTED as usize, "CLOSE-3");
    }
    close(a);
    close(l);
}

#[test]
fn registration_and_rdma_check_their_arguments() {
    let _g = Started::new();
    let (c, a, l) = pair();
    let mut err = 0;
    let mut buf = vec![0u8; 8192];
    let mut desc = [0u8; 64];
    let mut n: DWORD = 0;
    // SAFETY: valid locals; hostile values are checked before any access.
    unsafe {
        let p = buf.as_mut_ptr().cast::<c_void>();
        assert!(WSPRegisterMemory(c, null_mut(), 64, MEM_READ, &mut err).is_null());
        assert_eq!(err, WSAEFAULT);
        for flags in [0, 4, 7, u32::MAX] {
            assert!(WSPRegisterMemory(c, p, 64, flags, &mut err).is_null());
            assert_eq!(err, WSAEINVAL, "MEM-1 flags {flags}");
        }
        assert!(WSPRegisterMemory(l, p, 64, MEM_READ, &mut err).is_null());
        assert_eq!(err, WSAENOTCONN, "MEM-1 listener");
        assert_eq!(
            WSPDeregisterMemory(c, 0x1234 as HANDLE, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEINVAL, "MEM-3 unknown handle");
        assert_eq!(WSPDeregisterMemory(c, null_mut(), &mut err), SOCKET_ERROR);
        assert_eq!(err, WSAEINVAL, "MEM-3 NULL handle");

        // MEM-4 and the descriptor-length pointer.
        let dp = desc.as_mut_ptr().cast::<c_void>();
        assert_eq!(
            WSPRegisterRdmaMemory(a, p, 4096, MEM_WRITE, dp, null_mut(), &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        for small in [0, 1, 31] {
            let mut len: DWORD = small;
            assert_eq!(
                WSPRegisterRdmaMemory(a, p, 4096, MEM_WRITE, dp, &mut len, &mut err),
                SOCKET_ERROR
            );
            assert_eq!(
                (err, len),
                (WSAEFAULT, SANPATH_RDMA_DESCRIPTOR_LEN),
                "MEM-4 block {small}"
            );
        }
        let mut len: DWORD = 64;
        assert_eq!(
            WSPRegisterRdmaMemory(a, p, 4096, MEM_WRITE, null_mut(), &mut len, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT, "NULL block");
        assert_eq!(
            WSPRegisterRdmaMemory(a, null_mut(), 4096, MEM_WRITE, dp, &mut len, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT, "NULL buffer");
        assert_eq!(
            WSPRegisterRdmaMemory(a, p, 4096, MEM_WRITE, dp, &mut len, &mut err),
            0,
            "{err}"
        );
        assert_eq!(len, SANPATH_RDMA_DESCRIPTOR_LEN);

        // Descriptor blocks: NULL, huge, truncated, garbage.
        assert_eq!(
            WSPDeregisterRdmaMemory(a, null_mut(), 32, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEFAULT);
        assert_eq!(
            WSPDeregisterRdmaMemory(a, dp, u32::MAX, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEINVAL);
        // Shorter than a descriptor: WSAEFAULT (the engine's decoding rule).
        assert_eq!(WSPDeregisterRdmaMemory(a, dp, 0, &mut err), SOCKET_ERROR);
        assert_eq!(err, WSAEFAULT);
        assert_eq!(WSPDeregisterRdmaMemory(a, dp, 16, &mut err), SOCKET_ERROR);
        assert_eq!(err, WSAEFAULT);
        let mut junk = [0xA5u8; 32];
        assert_eq!(
            WSPDeregisterRdmaMemory(a, junk.as_mut_ptr().cast(), 32, &mut err),
            SOCKET_ERROR
        );
        assert_eq!(err, WSAEINVAL, "garbage descriptor");

        // RDMA with hostile arguments.
        let h = WSPRegisterMemory(c, p, 8192, MEM_READWRITE, &mut err);
        assert!(!h.is_null(), "{err}");
        let mut wx = WSABUFEX {
            len: 64,
            buf: buf.as_mut_ptr().cast(),
            handle: h,
        };
        let mut o = ov(0);
        let rdma_calls: [LPFN_WSPRDMAWRITE; 2] = [Some(WSPRdmaWrite), Some(WSPRdmaRead)];
        for f in rdma_calls.into_iter().flatten() {
            assert_eq!(
                f(
                    c,
                    &mut wx,
                    1,
                    dp,
                    32,
                    0,
                    &mut n,
                    0,
                    null_mut(),
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEFAULT, "NULL overlapped");
            assert_eq!(
                f(
                    c,
                    null_mut(),
                    1,
                    dp,
                    32,
                    0,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEFAULT, "NULL buffers");
            assert_eq!(
                f(
                    c,
                    &mut wx,
                    99,
                    dp,
                    32,
                    0,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEINVAL, "buffer count");
            assert_eq!(
                f(
                    c,
                    &mut wx,
                    1,
                    null_mut(),
                    32,
                    0,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEFAULT, "NULL descriptor");
            assert_eq!(
                f(
                    c,
                    &mut wx,
                    1,
                    dp,
                    100_000,
                    0,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEINVAL, "huge descriptor length");
            assert_eq!(
                f(
                    c,
                    &mut wx,
                    1,
                    junk.as_mut_ptr().cast(),
                    32,
                    0,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert_eq!(err, WSAEINVAL, "garbage descriptor");
            // Beyond the exposed region (4096 bytes).
            assert_eq!(
                f(
                    c,
                    &mut wx,
                    1,
                    dp,
                    32,
                    4090,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert!(
                err == WSAEINVAL || err == WSAEFAULT,
                "offset beyond the region: {err}"
            );
            // A handle that is not a registration.
            let mut bad = wx;
            bad.handle = 0x4242 as HANDLE;
            assert_eq!(
                f(
                    c,
                    &mut bad,
                    1,
                    dp,
                    32,
                    0,
                    &mut n,
                    0,
                    &mut *o,
                    None,
                    null_mut(),
                    &mut err
                ),
                SOCKET_ERROR
            );
            assert!(err == WSAEINVAL || err == WSAEFAULT, "bad handle: {err}");
        }
        assert_eq!(o.Internal, 0, "nothing was started");
        assert_eq!(WSPDeregisterRdmaMemory(a, dp, 32, &mut err), 0, "{err}");
    }
    close(c);
    close(a);
    close(l);
}

#[test]
fn duplication_values_of_others_are_refused_and_qos_is_not_supported() {
    let _g = Started::new();
    let s = new_socket();
    let mut err = 0;
    // SAFETY: valid locals or NULL.
    unsafe {
        let mut pi: WSAPROTOCOL_INFOW = std::mem::zeroed();
        assert_eq!(WSPDuplicateSocket(s, 1, null_mut(), &mut err), SOCKET_ERROR);
        assert_eq!(err, WSAEFAULT);
        // Duplicated for process 1: only process 1 may claim it.
        assert_eq!(WSPDuplicateSocket(s, 1, &mut pi, &mut err), 0);
        assert_ne!(pi.dwProviderReserved, 0);
        let d = WSPSocket(
            AF_INET,
            SOCK_STREAM,
            IPPROTO_TCP,
            &mut pi,
            0,
            WSA_FLAG_OVERLAPPED,
            &mut err,
        );
        assert_eq!(d, INVALID_SOCKET);
        assert_eq!(err, WSAEINVAL, "a value for another process");
        assert_eq!(WSPGetQOSByName(s, null_mut(), null_mut(), &mut err), FALSE);
        assert_eq!(err, WSAEOPNOTSUPP, "START-8");
        // WSPSocket with a value nobody wrote is refused.
        pi.dwProviderReserved = 77;
        let d = WSPSocket(
            AF_INET,
            SOCK_STREAM,
            IPPROTO_TCP,
            &mut pi,
            0,
            WSA_FLAG_OVERLAPPED,
            &mut err,
        );
        assert_eq!(d, INVALID_SOCKET);
        assert_eq!(err, WSAEINVAL);
        // Other WSPSocket arguments.
        for (af, ty, proto, g, flags, want) in [
            (
                23,
                SOCK_STREAM,
                IPPROTO_TCP,
                0,
                WSA_FLAG_OVERLAPPED,
                WSAEAFNOSUPPORT,
            ),
            (
                AF_INET,
                2,
                IPPROTO_TCP,
                0,
                WSA_FLAG_OVERLAPPED,
                WSAESOCKTNOSUPPORT,
            ),
            (
                AF_INET,
                SOCK_STREAM,
                17,
                0,
                WSA_FLAG_OVERLAPPED,
                WSAEPROTONOSUPPORT,
            ),
            (
                AF_INET,
                SOCK_STREAM,
                IPPROTO_TCP,
                5,
                WSA_FLAG_OVERLAPPED,
                WSAEINVAL,
            ),
        ] {
            let d = WSPSocket(af, ty, proto, null_mut(), g, flags, &mut err);
            assert_eq!((d, err), (INVALID_SOCKET, want));
        }
    }
    close(s);
}

// ---------------------------------------------------------------------------
// WSPIoctl
// ---------------------------------------------------------------------------

/// `WSPIoctl` on a made-up socket (only the extension-pointer code works
/// there, §7-12).
#[allow(clippy::too_many_arguments)]
fn ioctl(
    code: DWORD,
    input: *mut c_void,
    cb_in: DWORD,
    output: *mut c_void,
    cb_out: DWORD,
    ret: *mut DWORD,
    ovp: *mut WSAOVERLAPPED,
) -> (INT, INT) {
    ioctl_on(0xBAD, code, input, cb_in, output, cb_out, ret, ovp)
}

#[allow(clippy::too_many_arguments)]
fn ioctl_on(
    s: SOCKET,
    code: DWORD,
    input: *mut c_void,
    cb_in: DWORD,
    output: *mut c_void,
    cb_out: DWORD,
    ret: *mut DWORD,
    ovp: *mut WSAOVERLAPPED,
) -> (INT, INT) {
    let mut err = 0;
    // SAFETY: the tests pass buffers at least as large as the sizes they
    // claim, or NULL.
    let rc = unsafe {
        WSPIoctl(
            s,
            code,
            input,
            cb_in,
            output,
            cb_out,
            ret,
            ovp,
            None,
            null_mut(),
            &mut err,
        )
    };
    (rc, err)
}

#[test]
fn extension_pointer_ioctl_checks_sizes_and_guids() {
    let _g = Started::new();
    let mut guid = WSAID_RDMAWRITE.to_bytes();
    let mut big = [0u8; 64];
    big[..16].copy_from_slice(&guid);
    let mut out = [0usize; 2];
    let mut ret: DWORD = 0;
    let gp = guid.as_mut_ptr().cast::<c_void>();
    let op = out.as_mut_ptr().cast::<c_void>();
    let code = SIO_GET_EXTENSION_FUNCTION_POINTER;
    for cb_in in [0, 1, 15] {
        assert_eq!(
            ioctl(code, gp, cb_in, op, 8, &mut ret, null_mut()),
            (SOCKET_ERROR, WSAEFAULT)
        );
    }
    for cb_in in [17, 64] {
        let bp = big.as_mut_ptr().cast();
        assert_eq!(
            ioctl(code, bp, cb_in, op, 8, &mut ret, null_mut()),
            (SOCKET_ERROR, WSAEFAULT)
        );
    }
    assert_eq!(
        ioctl(code, null_mut(), 16, op, 8, &mut ret, null_mut()),
        (SOCKET_ERROR, WSAEFAULT)
    );
    for cb_out in [0, 1, 7] {
        assert_eq!(
            ioctl(code, gp, 16, op, cb_out, &mut ret, null_mut()),
            (SOCKET_ERROR, WSAEFAULT)
        );
    }
    assert_eq!(
        ioctl(code, gp, 16, null_mut(), 8, &mut ret, null_mut()),
        (SOCKET_ERROR, WSAEFAULT)
    );
    // Overlapped ioctls are not supported.
    let mut o = ov(0);
    assert_eq!(
        ioctl(code, gp, 16, op, 8, &mut ret, &mut *o),
        (SOCKET_ERROR, WSAEOPNOTSUPP)
    );
    // Success, misaligned output, NULL cbRet.
    assert_eq!(ioctl(code, gp, 16, op, 8, &mut ret, null_mut()), (0, 0));
    assert_eq!((out[0], ret), (WSPRdmaWrite as *const () as usize, 8));
    let mut raw = [0u8; 9];
    let rp = raw[1..].as_mut_ptr().cast();
    assert_eq!(ioctl(code, gp, 16, rp, 8, null_mut(), null_mut()), (0, 0));
    assert_eq!(
        usize::from_ne_bytes(raw[1..].try_into().unwrap()),
        WSPRdmaWrite as *const () as usize
    );
    // Every GUID.
    for (g, f) in [
        (
            WSAID_REGISTERMEMORY,
            WSPRegisterMemory as *const () as usize,
        ),
        (
            WSAID_DEREGISTERMEMORY,
            WSPDeregisterMemory as *const () as usize,
        ),
        (
            WSAID_REGISTERRDMAMEMORY,
            WSPRegisterRdmaMemory as *const () as usize,
        ),
        (
            WSAID_DEREGISTERRDMAMEMORY,
            WSPDeregisterRdmaMemory as *const () as usize,
        ),
        (WSAID_RDMAWRITE, WSPRdmaWrite as *const () as usize),
        (WSAID_RDMAREAD, WSPRdmaRead as *const () as usize),
    ] {
        let mut b = g.to_bytes();
        assert_eq!(
            ioctl(code, b.as_mut_ptr().cast(), 16, op, 8, &mut ret, null_mut()),
            (0, 0)
        );
        assert_eq!(out[0], f, "EXT-1 {g:?}");
    }
    let mut cache = WSAID_MEMORYREGISTRATIONCACHECALLBACK.to_bytes();
    let cp = cache.as_mut_ptr().cast();
    assert_eq!(
        ioctl(code, cp, 16, op, 8, &mut ret, null_mut()),
        (SOCKET_ERROR, WSAEOPNOTSUPP),
        "EXT-3"
    );
    // Unknown codes: on a live socket WSAEINVAL, on a made-up one
    // WSAENOTSOCK (CLOSE-7).
    let s = new_socket();
    for c in [
        0,
        1,
        SIO_GET_QOS,
        SIO_SET_QOS,
        SIO_GET_GROUP_QOS,
        SIO_SET_GROUP_QOS,
        u32::MAX,
    ] {
        assert_eq!(
            ioctl_on(s, c, gp, 16, op, 8, &mut ret, null_mut()),
            (SOCKET_ERROR, WSAEINVAL),
            "{c:#x}"
        );
        assert_eq!(
            ioctl(c, gp, 16, op, 8, &mut ret, null_mut()),
            (SOCKET_ERROR, WSAENOTSOCK),
            "{c:#x}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_guids_are_unknown(mut guid in any::<[u8; 16]>()) {
        let _g = Started::new();
        let known = [
            WSAID_REGISTERMEMORY, WSAID_DEREGISTERMEMORY, WSAID_REGISTERRDMAMEMORY,
            WSAID_DEREGISTERRDMAMEMORY, WSAID_RDMAWRITE, WSAID_RDMAREAD,
            WSAID_MEMORYREGISTRATIONCACHECALLBACK,
        ];
        prop_assume!(known.iter().all(|g| g.to_bytes() != guid));
        let mut out = 0usize;
        let mut ret = 0;
        let r = ioctl(
            SIO_GET_EXTENSION_FUNCTION_POINTER,
            guid.as_mut_ptr().cast(),
            16,
            (&mut out as *mut usize).cast(),
            8,
            &mut ret,
            null_mut(),
        );
        prop_assert_eq!(r, (SOCKET_ERROR, WSAEINVAL));
        prop_assert_eq!(out, 0);
    }

    /// Any code and sizes (with buffers as large as claimed): success or a
    /// documented error, never a crash.
    #[test]
    fn random_ioctls_fail_cleanly(
        code in prop_oneof![
            Just(SIO_GET_EXTENSION_FUNCTION_POINTER),
            Just(SIO_ADDRESS_LIST_QUERY),
            any::<u32>(),
        ],
        cb_in in 0u32..64,
        cb_out in 0u32..128,
        input in any::<[u8; 64]>(),
        null_in in any::<bool>(),
        null_out in any::<bool>(),
    ) {
        let _g = Started::new();
        let mut input = input;
        let mut output = [0u8; 128];
        let mut ret = 0;
        let ip = if null_in { null_mut() } else { input.as_mut_ptr().cast() };
        let op = if null_out { null_mut() } else { output.as_mut_ptr().cast() };
        let (rc, err) = ioctl(code, ip, cb_in, op, cb_out, &mut ret, null_mut());
        if rc == 0 {
            prop_assert!(ret <= cb_out);
        } else {
            prop_assert_eq!(rc, SOCKET_ERROR);
            prop_assert!(
                [WSAEFAULT, WSAEINVAL, WSAEOPNOTSUPP, WSAENOTSOCK].contains(&err),
                "{}",
                err
            );
        }
    }
}

#[test]
fn address_list_query_sizes() {
    let _g = Started::new();
    let s = new_socket();
    let ioctl = |code, input, cb_in, output, cb_out, ret, ovp| {
        ioctl_on(s, code, input, cb_in, output, cb_out, ret, ovp)
    };
    let mut ret: DWORD = 0;
    let mut out = [0u64; 8];
    let op = out.as_mut_ptr().cast();
    let code = SIO_ADDRESS_LIST_QUERY;
    assert_eq!(
        ioctl(code, null_mut(), 0, null_mut(), 0, &mut ret, null_mut()),
        (SOCKET_ERROR, WSAEFAULT)
    );
    assert_eq!(ret, 40, "needed for one address");
    ret = 0;
    assert_eq!(
        ioctl(code, null_mut(), 0, op, 39, &mut ret, null_mut()),
        (SOCKET_ERROR, WSAEFAULT)
    );
    assert_eq!(ret, 40);
    assert_eq!(
        ioctl(code, null_mut(), 0, op, 40, null_mut(), null_mut()),
        (0, 0)
    );
    assert_eq!(out[0] & 0xFFFF_FFFF, 1, "iAddressCount");
    // Misaligned output buffer: still written (unaligned).
    let mut raw = [0u8; 41];
    assert_eq!(
        ioctl(
            code,
            null_mut(),
            0,
            raw[1..].as_mut_ptr().cast(),
            40,
            &mut ret,
            null_mut()
        ),
        (0, 0)
    );
    assert_eq!(raw[1], 1);
    let sa = &raw[1 + 24..1 + 40];
    assert_eq!(&sa[..2], &(AF_INET as u16).to_ne_bytes());
    assert_eq!(&sa[4..8], &OUR_IP);
}

// ---------------------------------------------------------------------------
// The cache callback
// ---------------------------------------------------------------------------

#[test]
fn cache_callback_on_ranges_never_cached() {
    let _g = Started::new();
    let mut err = 0;
    for (addr, size) in [
        (0usize, 0usize),
        (0x1000, 4096),
        (usize::MAX - 10, 100),
        (0x10, usize::MAX),
    ] {
        // SAFETY: the range is only used as numbers; `err` valid.
        let rc = unsafe { WSPMemoryRegistrationCacheCallback(addr as *mut c_void, size, &mut err) };
        assert_eq!(
            (rc, err),
            (SOCKET_ERROR, WSAEINVAL),
            "CACHE-2 {addr:#x}+{size:#x}"
        );
    }
}
