//! The system calls of the shared-memory fabric, each behind a safe
//! function: sealed `memfd` segments and their mappings, `eventfd`s,
//! `SOCK_SEQPACKET` messages carrying descriptors (`SCM_RIGHTS`), cross
//! memory copies (`process_vm_readv` / `process_vm_writev`) and `epoll`.
//! Every `unsafe` block of the fabric outside the cell ring is here.

use crate::fabric::membarrier::{membarrier, CMD_GLOBAL_EXPEDITED, CMD_REGISTER_GLOBAL_EXPEDITED};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(rc: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a non-negative return of a descriptor-creating call is a
    // fresh descriptor that nothing else owns.
    check(rc).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A `memfd` of `len` bytes, sealed against shrinking and growing (so a
/// peer cannot make our mapping fault) and against further sealing.
pub(super) fn sealed_memfd(len: usize) -> io::Result<OwnedFd> {
    let name = c"sanpath-shm";
    // SAFETY: `name` is a NUL-terminated string.
    let fd = owned(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain system calls on a descriptor we own.
    unsafe {
        check(libc::ftruncate(fd.as_raw_fd(), len))?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        check(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals))?;
    }
    Ok(fd)
}

/// The size of a segment a peer sent, if it is sealed against shrinking
/// (else a mapping of it could fault later).
pub(super) fn sealed_size(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: plain system calls on a descriptor we own; `st` is written by
    // fstat before it is read.
    unsafe {
        let seals = check(libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS))?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::fstat(fd.as_raw_fd(), &mut st))?;
        usize::try_from(st.st_size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// A shared read-write mapping of a whole segment; unmapped on drop.
pub(super) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory, accessed only through atomics and
// the cell ring's protocol; the handle itself is an address and a length.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(super) fn new(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping chosen by the kernel; nothing else
        // refers to that range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p as *mut u8).ok_or(io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Mapping { base, len })
    }

    pub(super) fn base(&self) -> NonNull<u8> {
        self.base
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is our mapping, and the rings and control
        // blocks that point into it hold this mapping alive (`Arc`).
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len) };
    }
}

pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: no pointers involved.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Adds one to an eventfd (a wake-up); errors (a full counter) are moot.
pub(super) fn signal(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd; whether it was signalled.
pub(super) fn drain(fd: RawFd) -> bool {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) == 8 }
}

/// Most descriptors one message carries.
const MAX_FDS: usize = 2;

/// Sends one message with `fds` attached.
pub(super) fn send_msg(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
    let mut ctl = [0u64; 8];
    debug_assert!(space <= std::mem::size_of_val(&ctl));
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = ctl.as_mut_ptr().cast();
        // SAFETY: as above.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as _;
        // SAFETY: the control buffer has room for one header and
        // `fds.len()` descriptors (`space`), and is 8-aligned.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                fds.len(),
            );
        }
    }
    // SAFETY: `msg` names live buffers for the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok(())
}

/// Receives one message into `buf` (non-blocking socket): its length
/// (0 = the peer hung up) and the descriptors it carried.
pub(super) fn recv_msg(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut ctl = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&ctl) as _;
    // SAFETY: `msg` names live buffers for the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `ctl` with
    // well-formed headers; each SCM_RIGHTS payload is descriptors it
    // installed for us, which we now own (and close if unused).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, fds))
}

/// Most entries of either list of [`cma`] (the largest `max_sge`).
pub(super) const MAX_IOV: usize = 256;

/// Which way a cross-memory copy goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Cma {
    /// From the peer's memory into ours.
    Read,
    /// From our memory into the peer's.
    Write,
}

/// Copies between the local list `local` and the peer process's list
/// `remote` (the same total length), following partial transfers; an error
/// if the kernel moved less (a range not mapped in either process, or the
/// peer gone).
///
/// Memory safety: the kernel checks both sides' mappings; only the local
/// ranges matter to this process, and the caller names ranges of a region
/// registered for the access (whose owner keeps them valid while they are
/// registered).
///
/// One entry on each side (an RDMA, most long sends) takes a path of its
/// own: two iovecs on the stack, no list to build.
pub(super) fn cma(
    dir: Cma,
    pid: libc::pid_t,
    local: &[crate::fabric::Sge],
    remote: &[crate::fabric::Sge],
) -> io::Result<()> {
    match (local, remote) {
        ([l], [r]) => cma_one(dir, pid, l, r),
        _ => cma_lists(dir, pid, local, remote),
    }
}

/// One system call's worth of [`cma`]; the bytes moved.
///
/// # Safety
/// The local iovecs name memory this process may write (a read) or read
/// (a write) for the call.
unsafe fn cma_call(
    dir: Cma,
    pid: libc::pid_t,
    lv: &[libc::iovec],
    rv: &[libc::iovec],
) -> io::Result<usize> {
    let call = match dir {
        Cma::Read => libc::process_vm_readv,
        Cma::Write => libc::process_vm_writev,
    };
    // SAFETY: the kernel validates both lists against the two address
    // spaces; the local ranges are ours to use (caller).
    let n = unsafe {
        call(
            pid,
            lv.as_ptr(),
            lv.len() as _,
            rv.as_ptr(),
            rv.len() as _,
            0,
        )
    };
    match n {
        n if n > 0 => Ok(n as usize),
        0 => Err(io::Error::from_raw_os_error(libc::EFAULT)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// [`cma`] between one local and one remote entry.
#[inline(never)]
fn cma_one(
    dir: Cma,
    pid: libc::pid_t,
    local: &crate::fabric::Sge,
    remote: &crate::fabric::Sge,
) -> io::Result<()> {
    let total = local.len as usize;
    let mut done = 0usize;
    while done < total {
        let lv = libc::iovec {
            iov_base: (local.addr + done) as *mut libc::c_void,
            iov_len: total - done,
        };
        let rv = libc::iovec {
            iov_base: (remote.addr + done) as *mut libc::c_void,
            iov_len: (remote.len as usize).saturating_sub(done),
        };
        // SAFETY: forwarded from the caller of `cma` (module docs there).
        done += unsafe { cma_call(dir, pid, &[lv], &[rv])? };
    }
    Ok(())
}

/// [`cma`] between lists. Never inlined: its two arrays of `MAX_IOV`
/// iovecs would otherwise land in the frame of every poll, which then
/// probes 8 KiB of stack per call.
#[inline(never)]
fn cma_lists(
    dir: Cma,
    pid: libc::pid_t,
    local: &[crate::fabric::Sge],
    remote: &[crate::fabric::Sge],
) -> io::Result<()> {
    let total: usize = local.iter().map(|s| s.len as usize).sum();
    let too_many = || io::Error::from_raw_os_error(libc::EINVAL);
    let (mut lbuf, mut rbuf) = (
        [MaybeUninit::uninit(); MAX_IOV],
        [MaybeUninit::uninit(); MAX_IOV],
    );
    let l = iovecs(&mut lbuf, local).ok_or_else(too_many)?;
    let r = iovecs(&mut rbuf, remote).ok_or_else(too_many)?;
    let mut done = 0usize;
    while done < total {
        let (lv, rv) = (skip(l, done), skip(r, done));
        // SAFETY: forwarded from the caller of `cma` (module docs there).
        done += unsafe { cma_call(dir, pid, lv, rv)? };
    }
    Ok(())
}

/// Writes an iovec for each non-empty entry of `list` to the front of
/// `buf`, and returns them; `None` if there are more than [`MAX_IOV`]. The
/// rest of `buf` stays uninitialised: zeroing two lists of [`MAX_IOV`]
/// would cost more than the copy of a small message.
fn iovecs<'a>(
    buf: &'a mut [MaybeUninit<libc::iovec>; MAX_IOV],
    list: &[crate::fabric::Sge],
) -> Option<&'a mut [libc::iovec]> {
    let mut n = 0;
    for s in list.iter().filter(|s| s.len > 0) {
        buf.get_mut(n)?.write(libc::iovec {
            iov_base: s.addr as *mut libc::c_void,
            iov_len: s.len as usize,
        });
        n += 1;
    }
    // SAFETY: the first `n` entries were written just above, and
    // `MaybeUninit<T>` has the layout of `T`.
    Some(unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<libc::iovec>(), n) })
}

/// The part of `v` after its first `n` bytes (entries trimmed in place).
fn skip(v: &mut [libc::iovec], mut n: usize) -> &[libc::iovec] {
    let mut i = 0;
    while i < v.len() && n >= v[i].iov_len {
        n -= v[i].iov_len;
        i += 1;
    }
    if i < v.len() && n > 0 {
        v[i].iov_base = (v[i].iov_base as usize + n) as *mut libc::c_void;
        v[i].iov_len -= n;
    }
    &v[i..]
}

/// An epoll instance.
pub(super) struct Epoll(OwnedFd);

impl Epoll {
    pub(super) fn new() -> io::Result<Epoll> {
        // SAFETY: no pointers involved.
        owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(Epoll)
    }

    /// Watches `fd` for input and hang-up, reporting `token`.
    pub(super) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `ev` is live for the call.
        check(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    pub(super) fn remove(&self, fd: RawFd) {
        // SAFETY: no event pointer is needed for a removal.
        unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits up to `timeout_ms` (-1: forever); the tokens of ready
    /// descriptors, with whether each hung up.
    pub(super) fn wait(&self, out: &mut Vec<(u64, bool)>, timeout_ms: i32) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 32];
        // SAFETY: `evs` has room for the 32 events the kernel may write.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 32, timeout_ms) };
        out.clear();
        for e in &evs[..n.max(0) as usize] {
            let hup = e.events & (libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLERR) as u32 != 0;
            out.push((e.u64, hup));
        }
    }
}

/// This process's id.
pub(super) fn pid() -> libc::pid_t {
    // SAFETY: no preconditions.
    unsafe { libc::getpid() }
}

fn sockaddr(path: &std::path::Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: zero is a valid sockaddr_un.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok((
        a,
        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
    ))
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: no pointers involved.
    owned(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })
}

/// A listening `SOCK_SEQPACKET` socket bound at `path` (non-blocking).
pub(super) fn listen_at(path: &std::path::Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    let (a, len) = sockaddr(path)?;
    // SAFETY: `a` is a live sockaddr_un of `len` bytes.
    unsafe {
        check(libc::bind(
            fd.as_raw_fd(),
            (&a as *const libc::sockaddr_un).cast(),
            len,
        ))?;
        check(libc::listen(fd.as_raw_fd(), 128))?;
    }
    Ok(fd)
}

/// A socket connected to the listener at `path` (non-blocking).
pub(super) fn connect_to(path: &std::path::Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    let (a, len) = sockaddr(path)?;
    // SAFETY: `a` is a live sockaddr_un of `len` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) })?;
    Ok(fd)
}

/// The next connection queued at a listening socket, if any.
pub(super) fn accept(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: null address pointers are allowed.
    owned(unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    })
    .ok()
}

/// A pidfd of process `pid` (readable once it exited).
pub(super) fn pidfd(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: no pointers involved; the result is a fresh descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    owned(fd as libc::c_int)
}

/// Waits up to `ms` for `fd` to be readable; whether it is.
pub(super) fn readable_within(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// Lets processes of this user read and write this process's memory with
/// `process_vm_*` where the Yama LSM would allow only ancestors (scope 1):
/// the peers of the shm fabric are usually siblings. Without Yama, a no-op
/// (the call fails, harmlessly).
pub(super) fn allow_peer_access() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
}

/// Whether this process takes part in asymmetric fences across processes:
/// it registered for `MEMBARRIER_CMD_GLOBAL_EXPEDITED` (so another
/// process's [`heavy_fence`] reaches its threads) and issuing one works
/// (Linux 4.16 and later, unless a seccomp filter forbids it). Decided
/// once per process, at the first call.
pub(super) fn asymmetric_fences() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        membarrier(CMD_REGISTER_GLOBAL_EXPEDITED) && membarrier(CMD_GLOBAL_EXPEDITED)
    })
}

/// The heavy side of an asymmetric fence: once this returned, every
/// running thread of every registered process passed a full memory
/// barrier after this thread's earlier stores became visible, and a thread
/// not running passed one when it was switched out; so a registered
/// thread's store and later load, separated by a compiler fence only,
/// cannot straddle this call. Only valid where [`asymmetric_fences`] is;
/// whether it worked (it did once: a failure now is not expected).
pub(super) fn heavy_fence() -> bool {
    membarrier(CMD_GLOBAL_EXPEDITED)
}

/// A cheap monotonic tick count: the time-stamp counter where there is one
/// (a few cycles, where a clock read costs tens of nanoseconds), else
/// nanoseconds of a process clock.
pub(super) fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86-64 processor and has no memory
        // effects.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}
