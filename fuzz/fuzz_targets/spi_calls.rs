//! Programs of SPI calls on the soft fabric; see
//! `sanpath::testkit::fuzz::spi_calls`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sanpath::testkit::fuzz::spi_calls(data));
