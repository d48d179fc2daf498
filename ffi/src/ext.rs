//! `WSPIoctl` and the SAN extension functions it hands out (spec §3.1,
//! §4.7): memory registration, RDMA write/read, the registration-cache
//! callback.

#![allow(non_snake_case, clippy::too_many_arguments)]

use crate::abi::*;
use crate::global::provider;
use crate::win::*;
use crate::wsp::read_bufs;
use sanpath::spi::{Extension, ProviderSocket, WsaBufEx, MAX_SGE, RDMA_DESCRIPTOR_LEN};
use sanpath::{WsaError, WsaResult};
use std::ffi::c_void;
use std::mem::{offset_of, size_of};
use std::ptr::null_mut;

/// Size of the RDMA buffer descriptor `WSPRegisterRdmaMemory` writes (the
/// fixed little-endian layout of spec §7-1).
pub const SANPATH_RDMA_DESCRIPTOR_LEN: DWORD = 32;
const _: () = assert!(SANPATH_RDMA_DESCRIPTOR_LEN as usize == RDMA_DESCRIPTOR_LEN);

/// Descriptor blocks longer than this are not descriptors of this provider
/// (`WSAEINVAL`); shorter ones are copied whole and checked by the engine.
pub const SANPATH_MAX_DESCRIPTOR_LEN: DWORD = 256;

/// The address of an extension function, as `SIO_GET_EXTENSION_FUNCTION_POINTER`
/// returns it.
pub fn extension_function(ext: Extension) -> *const c_void {
    match ext {
        Extension::RegisterMemory => WSPRegisterMemory as *const c_void,
        Extension::DeregisterMemory => WSPDeregisterMemory as *const c_void,
        Extension::RegisterRdmaMemory => WSPRegisterRdmaMemory as *const c_void,
        Extension::DeregisterRdmaMemory => WSPDeregisterRdmaMemory as *const c_void,
        Extension::RdmaWrite => WSPRdmaWrite as *const c_void,
        Extension::RdmaRead => WSPRdmaRead as *const c_void,
        Extension::MemoryRegistrationCacheCallback => {
            WSPMemoryRegistrationCacheCallback as *const c_void
        }
    }
}

fn sock(s: SOCKET) -> ProviderSocket {
    ProviderSocket(s)
}

/// `WSPIoctl`. Synchronous codes only (non-NULL `lpOverlapped` or
/// completion routine → `WSAEOPNOTSUPP`). `s` must be a live socket
/// (else `WSAENOTSOCK`) for every code but
/// `SIO_GET_EXTENSION_FUNCTION_POINTER`, which does not look at it.
///
/// - `SIO_GET_EXTENSION_FUNCTION_POINTER`: in = a 16-byte `GUID`
///   (`cbInBuffer` must be 16), out = one function pointer (`cbOutBuffer` ≥ 8),
///   else `WSAEFAULT`. Unknown GUID → `WSAEINVAL`; the cache callback while
///   registration caching is disabled → `WSAEOPNOTSUPP`.
/// - `SIO_ADDRESS_LIST_QUERY`: out = a `SOCKET_ADDRESS_LIST` whose
///   `lpSockaddr` pointers point to `SOCKADDR_IN`s stored in the same buffer
///   after the array (8 + 32 × count bytes). Too small → `WSAEFAULT` with
///   `*lpcbBytesReturned` = bytes needed.
/// - any other code → `WSAEINVAL`.
///
/// `*lpcbBytesReturned` (if non-NULL) receives the bytes written.
///
/// # Safety
/// Non-NULL buffers have the given sizes; pointers are valid.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPIoctl(
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
) -> INT {
    let r = catch(|| {
        provider()?.ioctl_check(sock(s), dwIoControlCode)?;
        if !lpOverlapped.is_null() || lpCompletionRoutine.is_some() {
            return Err(WsaError::WSAEOPNOTSUPP);
        }
        let written = if dwIoControlCode == SIO_GET_EXTENSION_FUNCTION_POINTER {
            // SAFETY: caller contract on the buffers and their sizes.
            unsafe { extension_pointer(lpvInBuffer, cbInBuffer, lpvOutBuffer, cbOutBuffer)? }
        } else {
            // SAFETY: caller contract on the buffers and their sizes.
            unsafe { address_list(lpvOutBuffer, cbOutBuffer, lpcbBytesReturned)? }
        };
        if !lpcbBytesReturned.is_null() {
            // SAFETY: non-NULL, so writable (caller contract).
            unsafe { write_out(lpcbBytesReturned, written)? };
        }
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// # Safety
/// As [`WSPIoctl`].
unsafe fn extension_pointer(
    input: *mut c_void,
    cb_in: DWORD,
    output: *mut c_void,
    cb_out: DWORD,
) -> WsaResult<DWORD> {
    const PTR: usize = size_of::<*const c_void>();
    if input.is_null() || cb_in as usize != size_of::<GUID>() {
        return Err(WsaError::WSAEFAULT);
    }
    if output.is_null() || (cb_out as usize) < PTR {
        return Err(WsaError::WSAEFAULT);
    }
    // SAFETY: 16 readable bytes (cbInBuffer, caller contract); unaligned.
    let guid = unsafe { read_in(input.cast::<[u8; 16]>())? };
    let ext = provider()?.extension(&guid)?;
    // SAFETY: at least 8 writable bytes (cbOutBuffer, caller contract).
    unsafe { write_out(output.cast::<*const c_void>(), extension_function(ext))? };
    Ok(PTR as DWORD)
}

/// # Safety
/// As [`WSPIoctl`].
unsafe fn address_list(output: *mut c_void, cb_out: DWORD, cb_ret: *mut DWORD) -> WsaResult<DWORD> {
    let addrs = provider()?.address_list()?;
    let head = offset_of!(SOCKET_ADDRESS_LIST, Address);
    let entry = size_of::<SOCKET_ADDRESS>();
    let sin_len = size_of::<SOCKADDR_IN>();
    let needed = head + addrs.len() * (entry + sin_len);
    let needed_dw = DWORD::try_from(needed).map_err(|_| WsaError::WSAENOBUFS)?;
    if output.is_null() || (cb_out as usize) < needed {
        if !cb_ret.is_null() {
            // SAFETY: non-NULL, so writable (caller contract).
            unsafe { write_out(cb_ret, needed_dw)? };
        }
        return Err(WsaError::WSAEFAULT);
    }
    let base = output.cast::<u8>();
    let storage = head + addrs.len() * entry;
    // SAFETY: every write below stays inside the first `needed` ≤
    // `cbOutBuffer` bytes of the caller's buffer (caller contract); all
    // writes are unaligned.
    unsafe {
        write_out(base.cast::<INT>(), addrs.len() as INT)?;
        for (i, ip) in addrs.iter().enumerate() {
            let sa = base.add(storage + i * sin_len);
            write_out(
                sa.cast::<SOCKADDR_IN>(),
                to_sockaddr_in(std::net::SocketAddrV4::new(*ip, 0)),
            )?;
            write_out(
                base.add(head + i * entry).cast::<SOCKET_ADDRESS>(),
                SOCKET_ADDRESS {
                    lpSockaddr: sa.cast::<SOCKADDR>(),
                    iSockaddrLength: sin_len as INT,
                },
            )?;
        }
    }
    Ok(needed_dw)
}

/// `WSPRegisterMemory` (`WSAID_REGISTERMEMORY`): registers a local buffer
/// for a connected socket; a non-NULL handle or NULL with the error
/// (`WSAENOTCONN`, `WSAEINVAL` for flags outside `MEM_READ|MEM_WRITE`,
/// `WSAEFAULT` for a NULL or unmapped range, `WSAENOBUFS`).
///
/// # Safety
/// `[lpBuffer, lpBuffer + dwBufferLength)` stays valid until deregistered
/// or the socket is closed.
#[no_mangle]
pub unsafe extern "system" fn WSPRegisterMemory(
    s: SOCKET,
    lpBuffer: *mut c_void,
    dwBufferLength: DWORD,
    dwFlags: DWORD,
    lpErrno: *mut INT,
) -> HANDLE {
    let r = catch(|| {
        if lpBuffer.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        // SAFETY: forwarded SPI contract on the range.
        let h = unsafe {
            provider()?.register_memory(sock(s), lpBuffer.cast(), dwBufferLength, dwFlags)?
        };
        let h = usize::try_from(h).map_err(|_| WsaError::WSAENOBUFS)?;
        // The engine's handle is an opaque non-zero token, never dereferenced.
        Ok(h as HANDLE)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_handle(lpErrno, r) }
}

/// `WSPDeregisterMemory` (`WSAID_DEREGISTERMEMORY`): unknown handle or
/// memory in use by a transfer → `WSAEINVAL`.
///
/// # Safety
/// `lpErrno` is NULL or writable.
#[no_mangle]
pub unsafe extern "system" fn WSPDeregisterMemory(
    s: SOCKET,
    Handle: HANDLE,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        provider()?.deregister_memory(sock(s), Handle as usize as u64)?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPRegisterRdmaMemory` (`WSAID_REGISTERRDMAMEMORY`): exposes a buffer to
/// the connection's peer and writes its descriptor. `*lpdwDescriptorLength`
/// in = block size, out = bytes written; a block smaller than
/// `SANPATH_RDMA_DESCRIPTOR_LEN` → `WSAEFAULT` with the required size stored
/// in `*lpdwDescriptorLength` (MEM-4). NULL length pointer, block or buffer
/// → `WSAEFAULT`.
///
/// # Safety
/// As [`WSPRegisterMemory`]; the block has `*lpdwDescriptorLength` bytes.
#[no_mangle]
pub unsafe extern "system" fn WSPRegisterRdmaMemory(
    s: SOCKET,
    lpBuffer: *mut c_void,
    dwBufferLength: DWORD,
    dwFlags: DWORD,
    lpRdmaBufferDescriptor: *mut c_void,
    lpdwDescriptorLength: *mut DWORD,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        // SAFETY: NULL or a readable DWORD (caller contract).
        let room = unsafe { read_in(lpdwDescriptorLength)? };
        if room < SANPATH_RDMA_DESCRIPTOR_LEN {
            // SAFETY: non-NULL (read above), so writable.
            unsafe { write_out(lpdwDescriptorLength, SANPATH_RDMA_DESCRIPTOR_LEN)? };
            return Err(WsaError::WSAEFAULT);
        }
        if lpRdmaBufferDescriptor.is_null() || lpBuffer.is_null() {
            return Err(WsaError::WSAEFAULT);
        }
        let mut local = [0u8; RDMA_DESCRIPTOR_LEN];
        // SAFETY: forwarded SPI contract on the range.
        let n = unsafe {
            provider()?.register_rdma_memory(
                sock(s),
                lpBuffer.cast(),
                dwBufferLength,
                dwFlags,
                &mut local,
            )?
        };
        let n = n.min(RDMA_DESCRIPTOR_LEN);
        // SAFETY: the block has `room` ≥ RDMA_DESCRIPTOR_LEN ≥ n writable
        // bytes (caller contract); `local` is ours, no overlap. The length
        // pointer is writable.
        unsafe {
            std::ptr::copy_nonoverlapping(local.as_ptr(), lpRdmaBufferDescriptor.cast::<u8>(), n);
            write_out(lpdwDescriptorLength, n as DWORD)?;
        }
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPDeregisterRdmaMemory` (`WSAID_DEREGISTERRDMAMEMORY`): unknown or
/// malformed descriptor, or a block longer than `SANPATH_MAX_DESCRIPTOR_LEN`
/// → `WSAEINVAL`; NULL or shorter than `SANPATH_RDMA_DESCRIPTOR_LEN` →
/// `WSAEFAULT`.
///
/// # Safety
/// The block is NULL or has `dwDescriptorLength` readable bytes.
#[no_mangle]
pub unsafe extern "system" fn WSPDeregisterRdmaMemory(
    s: SOCKET,
    lpRdmaBufferDescriptor: *mut c_void,
    dwDescriptorLength: DWORD,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        let mut local = [0u8; SANPATH_MAX_DESCRIPTOR_LEN as usize];
        // SAFETY: caller contract on the block.
        let d = unsafe {
            copy_in(
                lpRdmaBufferDescriptor.cast_const().cast(),
                dwDescriptorLength as usize,
                &mut local,
                WsaError::WSAEINVAL,
            )?
        };
        provider()?.deregister_rdma_memory(sock(s), d)?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

enum Rdma {
    Write,
    Read,
}

/// # Safety
/// As [`WSPRdmaWrite`].
unsafe fn rdma(
    kind: Rdma,
    s: SOCKET,
    lpBuffers: *mut WSABUFEX,
    dwBufferCount: DWORD,
    lpTargetBufferDescriptor: *mut c_void,
    dwTargetDescriptorLength: DWORD,
    dwTargetBufferOffset: DWORD,
    dwFlags: DWORD,
    lpOverlapped: *mut WSAOVERLAPPED,
) -> WsaResult<INT> {
    // SAFETY: caller contract on the overlapped record.
    let ov = unsafe { overlapped(lpOverlapped)? };
    let mut bufs = [WsaBufEx {
        len: 0,
        buf: null_mut(),
        handle: 0,
    }; MAX_SGE];
    let to_bufex = |b: WSABUFEX| WsaBufEx {
        len: b.len,
        buf: b.buf.cast(),
        handle: b.handle as usize,
    };
    // SAFETY: caller contract on the buffer array.
    let n = unsafe { read_bufs(lpBuffers.cast_const(), dwBufferCount, &mut bufs, to_bufex)? };
    let mut local = [0u8; SANPATH_MAX_DESCRIPTOR_LEN as usize];
    // SAFETY: caller contract on the descriptor block.
    let d = unsafe {
        copy_in(
            lpTargetBufferDescriptor.cast_const().cast(),
            dwTargetDescriptorLength as usize,
            &mut local,
            WsaError::WSAEINVAL,
        )?
    };
    let p = provider()?;
    // SAFETY: forwarded SPI contract (registered buffers and `ov` stay valid
    // until completion).
    pending(unsafe {
        match kind {
            Rdma::Write => p.rdma_write(sock(s), &bufs[..n], d, dwTargetBufferOffset, dwFlags, ov),
            Rdma::Read => p.rdma_read(sock(s), &bufs[..n], d, dwTargetBufferOffset, dwFlags, ov),
        }
    })
}

/// `WSPRdmaWrite` (`WSAID_RDMAWRITE`): writes the registered `WSABUFEX`
/// buffers (at most 16, each with its `WSPRegisterMemory` handle) to the
/// peer buffer named by the descriptor, at `dwTargetBufferOffset`. Always
/// overlapped (NULL/misaligned `lpOverlapped` → `WSAEFAULT`); started →
/// `SOCKET_ERROR` + `WSA_IO_PENDING`. `dwFlags` must be 0.
///
/// # Safety
/// As [`crate::WSPSend`]; the descriptor block has
/// `dwTargetDescriptorLength` readable bytes.
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPRdmaWrite(
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
) -> INT {
    let r = catch(|| {
        // SAFETY: forwarded caller contract.
        unsafe {
            rdma(
                Rdma::Write,
                s,
                lpBuffers,
                dwBufferCount,
                lpTargetBufferDescriptor,
                dwTargetDescriptorLength,
                dwTargetBufferOffset,
                dwFlags,
                lpOverlapped,
            )
        }
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPRdmaRead` (`WSAID_RDMAREAD`): fills the registered buffers from the
/// peer buffer named by the descriptor; otherwise as [`WSPRdmaWrite`].
///
/// # Safety
/// As [`WSPRdmaWrite`].
#[allow(unused_variables)]
#[no_mangle]
pub unsafe extern "system" fn WSPRdmaRead(
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
) -> INT {
    let r = catch(|| {
        // SAFETY: forwarded caller contract.
        unsafe {
            rdma(
                Rdma::Read,
                s,
                lpBuffers,
                dwBufferCount,
                lpTargetBufferDescriptor,
                dwTargetDescriptorLength,
                dwTargetBufferOffset,
                dwFlags,
                lpOverlapped,
            )
        }
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}

/// `WSPMemoryRegistrationCacheCallback`
/// (`WSAID_MEMORYREGISTRATIONCACHECALLBACK`, only handed out when the
/// registration cache is enabled): drops every cached registration covering
/// the range; a range never cached → `WSAEINVAL`.
///
/// # Safety
/// `lpErrno` is NULL or writable; the range is only used as numbers.
#[no_mangle]
pub unsafe extern "system" fn WSPMemoryRegistrationCacheCallback(
    lpvAddress: *mut c_void,
    Size: SIZE_T,
    lpErrno: *mut INT,
) -> INT {
    let r = catch(|| {
        provider()?.memory_registration_cache_callback(lpvAddress.cast(), Size)?;
        Ok(0)
    });
    // SAFETY: lpErrno per contract.
    unsafe { ret_int(lpErrno, r) }
}
