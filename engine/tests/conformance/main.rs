//! Conformance tests for spec §8 (WSD-SAN-SPI.md), one test per checklist ID
//! (or a few for IDs with several clauses), named after the ID. They run on
//! the soft fabric through a recording switch double, or on real RDMA devices
//! with `SANPATH_CONFORMANCE_FABRIC=verbs` (feature `verbs`; see
//! `harness::fabric` and `tools/rxe-vm/test`); COVERAGE.md maps every ID to
//! its test(s).

mod harness;

mod block;
mod cache;
mod close;
mod conn;
mod ext;
mod mem;
mod rdma;
mod sock;
mod start;
mod xfer;
