//! `membarrier(2)`, the heavy side of the software fabrics' asymmetric
//! fences: the soft fabric's among the threads of one process
//! (`soft::fence`), the shm fabric's among the processes of one host
//! (`shm::sys`).

/// Commands (`linux/membarrier.h`).
pub(in crate::fabric) const CMD_GLOBAL_EXPEDITED: libc::c_int = 1 << 1;
pub(in crate::fabric) const CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_int = 1 << 2;
pub(in crate::fabric) const CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
pub(in crate::fabric) const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Issues `membarrier(cmd)`; whether the kernel accepted it.
pub(in crate::fabric) fn membarrier(cmd: libc::c_int) -> bool {
    // SAFETY: membarrier takes integers only and touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        ) == 0
    }
}
