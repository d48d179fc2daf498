//! An rdma_cm id this process owns: created on the NIC's event channel
//! with a token as its context, destroyed when dropped. Connection
//! management ([`super::cm`]) creates and drives ids; a queue pair
//! ([`super::qp`]) keeps its id, since the QP lives on it.

use super::sys::{errno, from_sockaddr, sockaddr_in, Raw};
use super::Shared;
use rdma_sys::*;
use std::net::SocketAddrV4;

/// `RDMA_OPTION_ID` / `RDMA_OPTION_ID_ACK_TIMEOUT` of `<rdma/rdma_cma.h>`
/// (anonymous enums the bindings do not carry).
const RDMA_OPTION_ID: i32 = 0;
const RDMA_OPTION_ID_ACK_TIMEOUT: i32 = 3;

/// An rdma_cm id we own; destroyed when dropped.
pub(crate) struct OwnedId(Raw<rdma_cm_id>);

impl OwnedId {
    pub(super) fn create(shared: &Shared, token: u64) -> Result<OwnedId, i32> {
        let mut id = std::ptr::null_mut();
        // SAFETY: valid channel; the token is stored as the id's context and
        // never dereferenced.
        let rc = unsafe {
            rdma_create_id(
                shared.cm_channel.get(),
                &mut id,
                token as usize as *mut _,
                rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(errno());
        }
        Ok(OwnedId(Raw(id)))
    }

    /// Takes ownership of an id librdmacm created for this process (a
    /// connection request's).
    ///
    /// # Safety
    /// `id` is live and nothing else owns it: it is destroyed when the
    /// result drops.
    pub(super) unsafe fn adopt(id: Raw<rdma_cm_id>) -> OwnedId {
        OwnedId(id)
    }

    pub fn get(&self) -> *mut rdma_cm_id {
        self.0.get()
    }

    /// Local and peer address of the id (valid once the address is bound or
    /// resolved, and for ids of connection requests).
    ///
    /// # Safety
    /// None beyond the id being live, which owning it guarantees; `unsafe`
    /// marks that the route is read without synchronisation with librdmacm
    /// (call it only when no rdma_cm call on this id is in progress).
    pub unsafe fn addresses(&self) -> (SocketAddrV4, SocketAddrV4) {
        // SAFETY: the id is live; the addr unions hold sockaddr_storage-sized
        // plain data.
        unsafe {
            let a = &(*self.get()).route.addr;
            (
                from_sockaddr(&a.src_addr_union.src_storage),
                from_sockaddr(&a.dst_addr_union.dst_storage),
            )
        }
    }

    pub(super) fn set_ack_timeout(&self, t: u8) {
        let mut v = t;
        // SAFETY: live id; the option value is one u8, as the API documents.
        unsafe {
            rdma_set_option(
                self.get(),
                RDMA_OPTION_ID,
                RDMA_OPTION_ID_ACK_TIMEOUT,
                (&mut v as *mut u8).cast(),
                1,
            )
        };
    }

    pub(super) fn bind(&self, addr: SocketAddrV4) -> Result<(), i32> {
        let mut sin = sockaddr_in(addr);
        // SAFETY: live id; sin is a valid sockaddr_in read during the call.
        let rc = unsafe { rdma_bind_addr(self.get(), (&mut sin as *mut libc::sockaddr_in).cast()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    }
}

impl Drop for OwnedId {
    fn drop(&mut self) {
        // SAFETY: we own the id and destroy it once; its QP (if any) was
        // destroyed before (VerbsQp drops it first). The CM thread acks every
        // event at once, so this never waits long.
        unsafe { rdma_destroy_id(self.get()) };
    }
}
