//! The reference switch's session messages; see
//! `sanpath::testkit::fuzz::session_msg`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sanpath::testkit::fuzz::session_msg(data));
