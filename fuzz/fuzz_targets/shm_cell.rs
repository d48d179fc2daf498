//! A shared-memory segment written by a faulty peer; see
//! `sanpath::testkit::fuzz::shm_cell`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sanpath::testkit::fuzz::shm_cell(data));
