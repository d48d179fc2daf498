//! Small helpers around the raw bindings: owned-pointer wrappers that may
//! cross threads, errno, socket-address conversion, and the pure mappings
//! between the trait's types and verbs constants (unit-tested on any host).

use crate::fabric::{Access, WcOpcode, WcStatus};
use rdma_sys::*;
use std::net::{Ipv4Addr, SocketAddrV4};

/// A raw verbs/rdma_cm object pointer that may be sent between threads.
///
/// libibverbs and librdmacm objects are thread-safe (rdma-core documents
/// every verb as callable from any thread; providers lock internally), so
/// the pointer itself may move freely. Who may *free* the object is the
/// owner's business, documented at each field holding one.
pub(crate) struct Raw<T>(pub *mut T);

impl<T> Raw<T> {
    pub fn get(&self) -> *mut T {
        self.0
    }
}

impl<T> Clone for Raw<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Raw<T> {}

// SAFETY: see the type's doc: rdma-core objects are usable from any thread;
// `Raw` adds no aliasing of Rust data.
unsafe impl<T> Send for Raw<T> {}
// SAFETY: as above; shared references only hand out the pointer value.
unsafe impl<T> Sync for Raw<T> {}

/// The calling thread's errno.
pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// "what failed: error text" for the current errno.
pub(crate) fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// `struct sockaddr_in` for an IPv4 socket address.
pub(crate) fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The IPv4 address of a `sockaddr_storage`, or `0.0.0.0:0` if it is not
/// IPv4 (an IPv4-mapped IPv6 address is unwrapped).
pub(crate) fn from_sockaddr(s: &libc::sockaddr_storage) -> SocketAddrV4 {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            SocketAddrV4::new(
                ip.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
                u16::from_be(sin6.sin6_port),
            )
        }
        _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    }
}

/// The IPv4 address an IPv4-mapped GID (`::ffff:a.b.c.d`, RoCE v2) names.
pub(crate) fn gid_ipv4(raw: [u8; 16]) -> Option<Ipv4Addr> {
    let ip = std::net::Ipv6Addr::from(raw).to_ipv4_mapped()?;
    (!ip.is_unspecified()).then_some(ip)
}

/// `IBV_ACCESS_*` flags of the base registration of a region with `access`.
///
/// Remote rights are never put on the base MR: they are granted per queue
/// pair by memory windows (or, without them, by a second registration per
/// bind), so the base MR's own rkey opens nothing. A region the peer may
/// write must also be locally writable (a verbs rule for MRs and for
/// binding a window with remote write).
pub(crate) fn base_mr_flags(access: Access, windows: bool) -> u32 {
    let mut f = 0;
    if access.contains(Access::LOCAL_WRITE) || access.contains(Access::REMOTE_WRITE) {
        f |= ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    }
    if windows && (access.contains(Access::REMOTE_WRITE) || access.contains(Access::REMOTE_READ)) {
        f |= ibv_access_flags::IBV_ACCESS_MW_BIND.0;
    }
    f
}

/// `IBV_ACCESS_REMOTE_*` flags for a remote key with `access`.
pub(crate) fn remote_flags(access: Access) -> u32 {
    let mut f = 0;
    if access.contains(Access::REMOTE_WRITE) {
        f |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
    }
    if access.contains(Access::REMOTE_READ) {
        f |= ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    }
    f
}

/// The trait's status for a verbs work-completion status.
pub(crate) fn wc_status(s: ibv_wc_status::Type) -> WcStatus {
    use ibv_wc_status::*;
    match s {
        IBV_WC_SUCCESS => WcStatus::Success,
        IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
        IBV_WC_LOC_LEN_ERR => WcStatus::LocalLengthError,
        IBV_WC_LOC_PROT_ERR | IBV_WC_LOC_ACCESS_ERR | IBV_WC_MW_BIND_ERR | IBV_WC_LOC_QP_OP_ERR => {
            WcStatus::LocalProtectionError
        }
        IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccessError,
        IBV_WC_REM_INV_REQ_ERR
        | IBV_WC_REM_OP_ERR
        | IBV_WC_REM_INV_RD_REQ_ERR
        | IBV_WC_BAD_RESP_ERR => WcStatus::RemoteInvalidRequest,
        IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceeded,
        IBV_WC_RETRY_EXC_ERR | IBV_WC_RESP_TIMEOUT_ERR => WcStatus::RetryExceeded,
        // REM_ABORT, FATAL, GENERAL and the rest: the connection is gone.
        _ => WcStatus::RemoteDisconnected,
    }
}

/// The trait's opcode for a verbs work-completion opcode. Verbs defines the
/// opcode only for successful completions; rxe fills it in for errors too,
/// other providers may not (the engine identifies ops by `wr_id` anyway).
pub(crate) fn wc_opcode(op: ibv_wc_opcode::Type) -> WcOpcode {
    use ibv_wc_opcode::*;
    match op {
        IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
        IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
        IBV_WC_RECV | IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::Recv,
        _ => WcOpcode::Send,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_trait() {
        use ibv_wc_status::*;
        assert_eq!(wc_status(IBV_WC_SUCCESS), WcStatus::Success);
        assert_eq!(wc_status(IBV_WC_WR_FLUSH_ERR), WcStatus::Flushed);
        assert_eq!(
            wc_status(IBV_WC_REM_ACCESS_ERR),
            WcStatus::RemoteAccessError
        );
        assert_eq!(wc_status(IBV_WC_RETRY_EXC_ERR), WcStatus::RetryExceeded);
        assert_eq!(
            wc_status(IBV_WC_RNR_RETRY_EXC_ERR),
            WcStatus::RnrRetryExceeded
        );
        assert_eq!(wc_status(IBV_WC_LOC_LEN_ERR), WcStatus::LocalLengthError);
        assert_eq!(
            wc_status(IBV_WC_LOC_PROT_ERR),
            WcStatus::LocalProtectionError
        );
        assert_eq!(
            wc_status(IBV_WC_REM_INV_REQ_ERR),
            WcStatus::RemoteInvalidRequest
        );
        assert_eq!(wc_status(IBV_WC_FATAL_ERR), WcStatus::RemoteDisconnected);
    }

    #[test]
    fn access_flags() {
        let lw = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        let bind = ibv_access_flags::IBV_ACCESS_MW_BIND.0;
        assert_eq!(base_mr_flags(Access::NONE, true), 0);
        assert_eq!(base_mr_flags(Access::LOCAL_WRITE, true), lw);
        assert_eq!(base_mr_flags(Access::REMOTE_WRITE, true), lw | bind);
        assert_eq!(base_mr_flags(Access::REMOTE_READ, true), bind);
        assert_eq!(base_mr_flags(Access::REMOTE_READ, false), 0);
        assert_eq!(
            remote_flags(Access::REMOTE_READ | Access::REMOTE_WRITE),
            ibv_access_flags::IBV_ACCESS_REMOTE_READ.0
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
        );
    }

    #[test]
    fn addresses_round_trip() {
        let a = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 4791);
        let sin = sockaddr_in(a);
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: sockaddr_in fits in sockaddr_storage; both are plain data.
        unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin) };
        assert_eq!(from_sockaddr(&st), a);
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[198, 18, 0, 2]);
        assert_eq!(gid_ipv4(g), Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(
            gid_ipv4([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
            None
        );
    }
}
