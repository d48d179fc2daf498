//! Helpers every exported function uses: panic containment, error
//! reporting through `lpErrno`, and checked reads/writes of caller memory.
//!
//! Rules (the header states them for C callers):
//! - No panic crosses the ABI: a panic becomes `WSAENETDOWN`.
//! - Plain data the caller passes in or out (`sockaddr`, GUIDs, lengths,
//!   tables, `lpErrno`) is accessed with unaligned reads/writes, so any
//!   alignment works; NULL where memory is required is `WSAEFAULT`.
//! - Records the engine keeps referring to after the call returns
//!   (`WSAOVERLAPPED`) must be non-NULL and 8-byte aligned, else `WSAEFAULT`.
//! - Lengths the caller claims are never turned into slices larger than the
//!   call needs: data is copied through small local buffers.

use crate::win::*;
use sanpath::spi::Overlapped;
use sanpath::{WsaError, WsaResult};
use std::mem::{align_of, offset_of, size_of};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The code a caught panic is reported as.
pub const PANIC_ERROR: WsaError = WsaError::WSAENETDOWN;

// The ABI's WSAOVERLAPPED and the engine's Overlapped are the same record.
const _: () = {
    assert!(size_of::<WSAOVERLAPPED>() == size_of::<Overlapped>());
    assert!(align_of::<WSAOVERLAPPED>() == align_of::<Overlapped>());
    assert!(offset_of!(WSAOVERLAPPED, Internal) == offset_of!(Overlapped, internal));
    assert!(offset_of!(WSAOVERLAPPED, InternalHigh) == offset_of!(Overlapped, internal_high));
    assert!(offset_of!(WSAOVERLAPPED, Offset) == offset_of!(Overlapped, offset));
    assert!(offset_of!(WSAOVERLAPPED, OffsetHigh) == offset_of!(Overlapped, offset_high));
    assert!(offset_of!(WSAOVERLAPPED, hEvent) == offset_of!(Overlapped, h_event));
};

/// Runs `f`, turning a panic into [`PANIC_ERROR`].
pub fn catch<T>(f: impl FnOnce() -> WsaResult<T>) -> WsaResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(PANIC_ERROR))
}

/// Stores `e` into `*lp_errno` (NULL: nothing to report into).
///
/// # Safety
/// `lp_errno` is NULL or points to 4 writable bytes (any alignment).
pub unsafe fn set_errno(lp_errno: *mut INT, e: WsaError) {
    if !lp_errno.is_null() {
        // SAFETY: non-NULL and writable by the caller's contract; unaligned
        // write, so any alignment is fine.
        unsafe { lp_errno.write_unaligned(e.code()) }
    }
}

/// The `int`-returning convention: `Ok(v)` → `v`; `Err(e)` → `SOCKET_ERROR`
/// with `*lpErrno = e`.
///
/// # Safety
/// As [`set_errno`].
pub unsafe fn ret_int(lp_errno: *mut INT, r: WsaResult<INT>) -> INT {
    match r {
        Ok(v) => v,
        Err(e) => {
            // SAFETY: forwarded contract.
            unsafe { set_errno(lp_errno, e) };
            SOCKET_ERROR
        }
    }
}

/// The `SOCKET`-returning convention: `Err(e)` → `INVALID_SOCKET`.
///
/// # Safety
/// As [`set_errno`].
pub unsafe fn ret_socket(lp_errno: *mut INT, r: WsaResult<SOCKET>) -> SOCKET {
    match r {
        Ok(v) => v,
        Err(e) => {
            // SAFETY: forwarded contract.
            unsafe { set_errno(lp_errno, e) };
            INVALID_SOCKET
        }
    }
}

/// The `BOOL`-returning convention: `Ok` → `TRUE`, `Err(e)` → `FALSE`.
///
/// # Safety
/// As [`set_errno`].
pub unsafe fn ret_bool(lp_errno: *mut INT, r: WsaResult<()>) -> BOOL {
    match r {
        Ok(()) => TRUE,
        Err(e) => {
            // SAFETY: forwarded contract.
            unsafe { set_errno(lp_errno, e) };
            FALSE
        }
    }
}

/// The `HANDLE`-returning convention: `Err(e)` → NULL.
///
/// # Safety
/// As [`set_errno`].
pub unsafe fn ret_handle(lp_errno: *mut INT, r: WsaResult<HANDLE>) -> HANDLE {
    match r {
        Ok(h) => h,
        Err(e) => {
            // SAFETY: forwarded contract.
            unsafe { set_errno(lp_errno, e) };
            std::ptr::null_mut()
        }
    }
}

/// An overlapped op was started: the ABI reports `SOCKET_ERROR` +
/// `WSA_IO_PENDING` (spec §7-3), so the engine's `Ok(())` becomes this error.
pub fn pending(r: WsaResult<()>) -> WsaResult<INT> {
    r.and(Err(WsaError::WSA_IO_PENDING))
}

/// Reads a `T` the caller passes in (NULL → `WSAEFAULT`).
///
/// # Safety
/// `p` is NULL or points to a readable `T` (any alignment).
pub unsafe fn read_in<T: Copy>(p: *const T) -> WsaResult<T> {
    if p.is_null() {
        return Err(WsaError::WSAEFAULT);
    }
    // SAFETY: non-NULL and readable by the caller's contract; unaligned read.
    Ok(unsafe { p.read_unaligned() })
}

/// Writes a `T` into caller memory (NULL → `WSAEFAULT`).
///
/// # Safety
/// `p` is NULL or points to writable memory for a `T` (any alignment).
pub unsafe fn write_out<T>(p: *mut T, v: T) -> WsaResult<()> {
    if p.is_null() {
        return Err(WsaError::WSAEFAULT);
    }
    // SAFETY: non-NULL and writable by the caller's contract; unaligned write.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// The switch's overlapped record as the engine's [`Overlapped`]: NULL or
/// misaligned → `WSAEFAULT`.
///
/// # Safety
/// `p` is NULL, misaligned, or points to a `WSAOVERLAPPED` that stays valid
/// for `'a` (for a started op: until its completion was reported) and is
/// only accessed atomically by others meanwhile.
pub unsafe fn overlapped<'a>(p: *mut WSAOVERLAPPED) -> WsaResult<&'a Overlapped> {
    if p.is_null() || !p.is_aligned() {
        return Err(WsaError::WSAEFAULT);
    }
    // SAFETY: aligned, valid for 'a (caller contract), and WSAOVERLAPPED has
    // the layout of Overlapped (asserted above), whose fields are atomics of
    // the same widths as the plain fields.
    Ok(unsafe { &*p.cast::<Overlapped>() })
}

/// A `sockaddr_in` passed to `WSPBind`/`WSPConnect`: NULL, `namelen` shorter
/// than 16 bytes, or a family other than `AF_INET` → `WSAEFAULT` (spec §3).
///
/// # Safety
/// `name` is NULL or points to `namelen` readable bytes (any alignment).
pub unsafe fn read_sockaddr_in(name: *const SOCKADDR, namelen: INT) -> WsaResult<SocketAddrV4> {
    if name.is_null() || namelen < size_of::<SOCKADDR_IN>() as INT {
        return Err(WsaError::WSAEFAULT);
    }
    // SAFETY: non-NULL and at least 16 readable bytes (caller contract);
    // unaligned read.
    let sin = unsafe { read_in(name.cast::<SOCKADDR_IN>())? };
    if sin.sin_family != AF_INET as ADDRESS_FAMILY {
        return Err(WsaError::WSAEFAULT);
    }
    Ok(from_sockaddr_in(&sin))
}

/// `SOCKADDR_IN` (network byte order) → address.
pub fn from_sockaddr_in(sin: &SOCKADDR_IN) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

/// Address → `SOCKADDR_IN` (network byte order).
pub fn to_sockaddr_in(a: SocketAddrV4) -> SOCKADDR_IN {
    SOCKADDR_IN {
        sin_family: AF_INET as ADDRESS_FAMILY,
        sin_port: a.port().to_be(),
        sin_addr: IN_ADDR {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Copies `len` bytes of caller memory into `local` (the call's own
/// buffer); a length above `local.len()` is `too_long`.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes.
pub unsafe fn copy_in(
    p: *const u8,
    len: usize,
    local: &mut [u8],
    too_long: WsaError,
) -> WsaResult<&[u8]> {
    if len == 0 {
        return Ok(&local[..0]);
    }
    if p.is_null() {
        return Err(WsaError::WSAEFAULT);
    }
    let dst = local.get_mut(..len).ok_or(too_long)?;
    // SAFETY: `p` has `len` readable bytes (caller contract); `dst` is our own
    // buffer of exactly `len` bytes, so the ranges cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), len) };
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error() {
        let r: WsaResult<i32> = catch(|| panic!("boom"));
        assert_eq!(r, Err(PANIC_ERROR));
        assert_eq!(catch(|| Ok(7)), Ok(7));
    }

    #[test]
    fn conventions() {
        let mut err = 0;
        // SAFETY: `err` is a valid INT.
        unsafe {
            assert_eq!(ret_int(&mut err, Ok(0)), 0);
            assert_eq!(err, 0);
            assert_eq!(ret_int(&mut err, pending(Ok(()))), SOCKET_ERROR);
            assert_eq!(err, WSA_IO_PENDING);
            assert_eq!(
                ret_socket(&mut err, Err(WsaError::WSAENOTSOCK)),
                INVALID_SOCKET
            );
            assert_eq!(err, WSAENOTSOCK);
            assert_eq!(ret_bool(&mut err, Err(WsaError::WSAEINVAL)), FALSE);
            assert_eq!(err, WSAEINVAL);
            assert!(ret_handle(&mut err, Err(WsaError::WSAEFAULT)).is_null());
            assert_eq!(err, WSAEFAULT);
            // NULL lpErrno: nothing written, no crash.
            assert_eq!(
                ret_int(std::ptr::null_mut(), Err(WsaError::WSAEFAULT)),
                SOCKET_ERROR
            );
        }
    }

    #[test]
    fn sockaddr_round_trip_and_checks() {
        let a = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 5000);
        let sin = to_sockaddr_in(a);
        assert_eq!(sin.sin_port, 5000u16.to_be());
        // SAFETY: `sin` is a readable SOCKADDR_IN of 16 bytes.
        unsafe {
            let p = (&sin as *const SOCKADDR_IN).cast::<SOCKADDR>();
            assert_eq!(read_sockaddr_in(p, 16), Ok(a));
            assert_eq!(read_sockaddr_in(p, 15), Err(WsaError::WSAEFAULT));
            assert_eq!(read_sockaddr_in(p, -1), Err(WsaError::WSAEFAULT));
            assert_eq!(
                read_sockaddr_in(std::ptr::null(), 16),
                Err(WsaError::WSAEFAULT)
            );
        }
        let mut bad = sin;
        bad.sin_family = 23; // AF_INET6
                             // SAFETY: as above.
        unsafe {
            let p = (&bad as *const SOCKADDR_IN).cast::<SOCKADDR>();
            assert_eq!(read_sockaddr_in(p, 16), Err(WsaError::WSAEFAULT));
        }
    }

    #[test]
    fn misaligned_overlapped_is_refused() {
        let mut storage = [0u64; 6];
        let base = storage.as_mut_ptr().cast::<u8>();
        // SAFETY: offset 4 stays inside `storage`; the pointer is only checked.
        let odd = unsafe { base.add(4) }.cast::<WSAOVERLAPPED>();
        // SAFETY: misaligned pointers are rejected before any access.
        assert!(unsafe { overlapped(odd) }.is_err());
        // SAFETY: NULL is rejected before any access.
        assert!(unsafe { overlapped(std::ptr::null_mut()) }.is_err());
        // SAFETY: 8-aligned, 48 valid bytes, only used within this test.
        assert!(unsafe { overlapped(base.cast()) }.is_ok());
    }
}
