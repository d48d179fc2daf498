//! sanpath: the provider side of the Windows Sockets Direct SAN SPI over an
//! RDMA fabric. See `DESIGN.md` in the shared folder for the module map and
//! `spec/WSD-SAN-SPI.md` for the behavioural contract this crate implements.
//!
//! - [`spi`]: the front end (sockets, overlapped I/O, registration, RDMA,
//!   close), driven by the switch through a safe Rust API (calls that take
//!   caller-owned memory are `unsafe fn`, with the SPI's own contract).
//! - [`fabric`]: the transport trait and its software NIC.
//! - [`mem`]: registered regions, the registration table and cache, RDMA
//!   descriptors.
//! - [`poller`], [`ring`]: completion progress (poller threads or run to
//!   completion) and the lock-free poller → front end ring.
//! - [`coarse`]: deadlines for spinning waits that read no fine clock.
//! - [`testkit`]: a completing switch, a provider on a private soft network
//!   and a connected pair, for tests and benchmarks.

pub mod coarse;
pub mod config;
pub mod error;
pub mod event;
pub mod fabric;
pub mod mem;
#[cfg(feature = "perf-gate-slowdown")]
pub mod perf_gate_slowdown;
#[cfg(feature = "perf-marks")]
mod perf_marks;
pub mod poller;
pub mod ring;
pub mod spi;
mod spin;
pub mod switch;
pub mod sync;
pub mod testkit;

pub use config::Config;
pub use error::{WsaError, WsaResult};
