//! The `shm_cell` target: a shared-memory segment as a faulty peer could
//! have written it, opened and decoded by the receiving side
//! (`fabric::shm`'s segment check and the cell decoder it uses).

/// Runs one input: the whole segment's bytes.
pub fn shm_cell(data: &[u8]) {
    #[cfg(not(loom))]
    crate::fabric::shm::fuzz_segment(data);
    #[cfg(loom)]
    let _ = data;
}
