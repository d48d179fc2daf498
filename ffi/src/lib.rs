//! C ABI of the sanpath provider (issue 4): what a Windows Sockets Direct SAN
//! service provider DLL exports, on top of the [`sanpath`] engine.
//!
//! - [`WSPStartupEx`]: the entry point; copies the switch's upcall table
//!   (wrapped as the engine's `Switch`, module `switch`), starts the
//!   process-wide provider (module `global`, config from `SANPATH_CONFIG`)
//!   and fills `WSPPROC_TABLE` with the 30 `WSP*` functions (module `wsp`).
//! - `WSPIoctl` hands out the SAN extension functions (module `ext`).
//! - `sanpath_event_*`: `WSAEVENT` objects for Linux (module `event`).
//! - `sanpath_provider_stats`: the provider's counters (module `stats`).
//! - [`win`]: the Windows x64 structures and types, `#[repr(C)]`.
//!
//! Header: `include/sanpath.h`, generated from these definitions by cbindgen
//! (`SANPATH_BLESS=1 cargo test -p sanpath-ffi --test header` refreshes it).
//! No panic crosses the ABI; every exported function maps engine errors to
//! the SPI's return conventions (see `abi`).

#[cfg(not(target_pointer_width = "64"))]
compile_error!("sanpath-ffi implements the Windows x64 layouts: 64-bit targets only");

mod abi;
mod event;
mod ext;
mod global;
mod stats;
mod switch;
#[cfg(not(sanpath_winsock_headers))]
pub mod win;
mod wsp;

pub use abi::PANIC_ERROR;
pub use event::{
    sanpath_event_close, sanpath_event_create, sanpath_event_reset, sanpath_event_set,
    sanpath_event_set_count, sanpath_event_wait, SANPATH_INFINITE, SANPATH_WAIT_FAILED,
    SANPATH_WAIT_SIGNALED, SANPATH_WAIT_TIMEOUT,
};
pub use ext::{
    extension_function, WSPDeregisterMemory, WSPDeregisterRdmaMemory, WSPIoctl,
    WSPMemoryRegistrationCacheCallback, WSPRdmaRead, WSPRdmaWrite, WSPRegisterMemory,
    WSPRegisterRdmaMemory, SANPATH_MAX_DESCRIPTOR_LEN, SANPATH_RDMA_DESCRIPTOR_LEN,
};
pub use global::CONFIG_ENV;
pub use stats::{sanpath_provider_stats, SanpathStats};
pub use wsp::*;
