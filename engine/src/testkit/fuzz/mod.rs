//! The bodies of the fuzz targets (`fuzz/` at the repository root, run with
//! cargo-fuzz and libFuzzer), kept here so that ordinary `cargo test` replays
//! the committed corpora and crash reproducers through the very same code
//! (`engine/tests/fuzz_replay.rs`).
//!
//! Each target is one function taking the raw input bytes. It panics (the
//! fuzzer's notion of a crash) when an invariant fails and returns normally
//! otherwise, whatever the bytes are.
//!
//! | target | function | what it drives |
//! |---|---|---|
//! | `descriptor` | [`descriptor`] | RDMA descriptor decoding ([`crate::mem::Descriptor::decode`]) |
//! | `spi_calls` | [`spi_calls`] | a program of SPI calls against a provider on a private soft network |
//! | `session_msg` | [`session_msg`] | the reference switch's session messages: decoding, and a protocol machine fed them |
//! | `shm_cell` | [`shm_cell`] | a shared-memory segment a peer wrote: the receiver's checks and cell decoder (`fabric::shm`) |

mod descriptor;
mod input;
mod session_msg;
mod shm_cell;
mod spi_calls;

pub use descriptor::descriptor;
pub use session_msg::session_msg;
pub use shm_cell::shm_cell;
pub use spi_calls::spi_calls;

/// A target's body: runs one input, panics if an invariant fails.
pub type Target = fn(&[u8]);

/// Every fuzz target by name, with its body: what `fuzz_replay` walks.
pub const TARGETS: &[(&str, Target)] = &[
    ("descriptor", descriptor),
    ("spi_calls", spi_calls),
    ("session_msg", session_msg),
    ("shm_cell", shm_cell),
];
