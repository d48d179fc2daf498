//! RDMA descriptor decoding; see `sanpath::testkit::fuzz::descriptor`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sanpath::testkit::fuzz::descriptor(data));
