//! Registered memory: page-aligned regions ([`region`]) and the pool of
//! connections' chunks ([`pool`]), the RDMA buffer
//! descriptor the switch carries to the peer ([`descriptor`]), and the
//! registration table with per-socket refcounts and the registration cache
//! ([`table`]).
//!
//! Invariant this module guards (DESIGN.md): a region an in-flight op still
//! references is never released — a [`table::RegRef`] keeps both the
//! registration "in use" and the NIC registration alive.

pub mod descriptor;
pub mod pool;
pub mod region;
pub mod table;

pub use descriptor::{Descriptor, DESCRIPTOR_LEN};
pub use pool::Chunk;
pub use region::{check_mapped, MemError, Region};
pub use table::{MemFlags, OwnerId, OwnerRegs, RegHandle, RegRef, RegistrationTable, TableStats};
