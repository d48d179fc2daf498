//! The engine's [`Switch`] (its upcalls) over the switch's C upcall table.
//!
//! `WSPStartupEx` copies the caller's `WSPUPCALLTABLEEX` into a [`CSwitch`]
//! (spec §2.1, START-4), so later changes to the caller's table have no
//! effect. Only the four upcalls a SAN provider makes are used, and
//! [`CSwitch::new`] refuses a table where one of them is NULL.

use crate::win::*;
use sanpath::spi::{Overlapped, Switch, SwitchHandle};
use sanpath::{WsaError, WsaResult};

/// Upcall table copied from the switch.
pub struct CSwitch {
    table: WSPUPCALLTABLEEX,
}

/// The error an upcall reported, or `fallback` if its code is not one the
/// engine knows.
fn upcall_error(code: INT, fallback: WsaError) -> WsaError {
    WsaError::from_code(code).unwrap_or(fallback)
}

impl CSwitch {
    /// `None` if an upcall this provider makes is NULL.
    pub fn new(table: WSPUPCALLTABLEEX) -> Option<CSwitch> {
        let complete = table.lpWPUCreateSocketHandle.is_some()
            && table.lpWPUCloseSocketHandle.is_some()
            && table.lpWPUQuerySocketHandleContext.is_some()
            && table.lpWPUCompleteOverlappedRequest.is_some();
        complete.then_some(CSwitch { table })
    }
}

impl Switch for CSwitch {
    fn create_socket_handle(
        &self,
        catalog_entry_id: u32,
        context: usize,
    ) -> WsaResult<SwitchHandle> {
        let f = self
            .table
            .lpWPUCreateSocketHandle
            .ok_or(WsaError::WSAENOBUFS)?;
        let mut err: INT = 0;
        // SAFETY: a non-NULL upcall from the switch's table; the arguments
        // are plain values and a pointer to our own INT.
        let h = unsafe { f(catalog_entry_id, context, &mut err) };
        if h == INVALID_SOCKET {
            return Err(upcall_error(err, WsaError::WSAENOBUFS));
        }
        Ok(SwitchHandle(h))
    }

    fn close_socket_handle(&self, handle: SwitchHandle) -> WsaResult<()> {
        let f = self
            .table
            .lpWPUCloseSocketHandle
            .ok_or(WsaError::WSAENOTSOCK)?;
        let mut err: INT = 0;
        // SAFETY: a non-NULL upcall from the switch's table; plain arguments.
        match unsafe { f(handle.0, &mut err) } {
            0 => Ok(()),
            _ => Err(upcall_error(err, WsaError::WSAENOTSOCK)),
        }
    }

    fn query_socket_handle_context(&self, handle: SwitchHandle) -> WsaResult<usize> {
        let f = self
            .table
            .lpWPUQuerySocketHandleContext
            .ok_or(WsaError::WSAENOTSOCK)?;
        let mut err: INT = 0;
        let mut ctx: DWORD_PTR = 0;
        // SAFETY: a non-NULL upcall from the switch's table; the pointers
        // are to our own locals.
        match unsafe { f(handle.0, &mut ctx, &mut err) } {
            0 => Ok(ctx),
            _ => Err(upcall_error(err, WsaError::WSAENOTSOCK)),
        }
    }

    fn complete_overlapped_request(
        &self,
        handle: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        let f = self
            .table
            .lpWPUCompleteOverlappedRequest
            .ok_or(WsaError::WSAEINVAL)?;
        let mut err: INT = 0;
        // The record is the switch's own WSAOVERLAPPED (the engine got it
        // from WSPSend/WSPRecv/WSPRdma*); the switch writes it atomically.
        let lp = (ov as *const Overlapped).cast_mut().cast::<WSAOVERLAPPED>();
        // SAFETY: a non-NULL upcall from the switch's table, given back the
        // switch's own overlapped record, which is valid until this
        // completion is reported (SPI contract).
        match unsafe { f(handle.0, lp, error, bytes, &mut err) } {
            0 => Ok(()),
            _ => Err(upcall_error(err, WsaError::WSAEINVAL)),
        }
    }
}
