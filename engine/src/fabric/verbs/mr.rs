//! Memory registrations and remote keys (type-2 memory windows, or extra
//! registrations without them; see the module docs of `verbs`).

use super::sys::{base_mr_flags, errno, remote_flags, Raw};
use super::{lock, Shared};
use crate::fabric::{Access, FabricError, MrKeys, QpNum};
use rdma_sys::*;
use std::collections::HashMap;

/// One registered region.
struct Region {
    mr: Raw<ibv_mr>,
    addr: usize,
    len: usize,
    access: Access,
    /// Remote keys bound to this region (revoked with it).
    rkeys: Vec<u32>,
}

/// How a remote key is implemented.
enum RemoteKey {
    /// A type-2 window bound on QP `qp`; revoked by deallocating it.
    Window { mw: Raw<ibv_mw>, lkey: u32, qp: u32 },
    /// A second registration with remote rights; revoked by deregistering.
    Registration { mr: Raw<ibv_mr>, lkey: u32 },
}

impl RemoteKey {
    fn lkey(&self) -> u32 {
        match self {
            RemoteKey::Window { lkey, .. } | RemoteKey::Registration { lkey, .. } => *lkey,
        }
    }

    fn release(&self) {
        match self {
            // SAFETY: the window came from ibv_alloc_mw and was removed from
            // the table, so it is deallocated exactly once.
            RemoteKey::Window { mw, .. } => unsafe {
                ibv_dealloc_mw(mw.get());
            },
            // SAFETY: the MR came from ibv_reg_mr and was removed from the
            // table, so it is deregistered exactly once.
            RemoteKey::Registration { mr, .. } => unsafe {
                ibv_dereg_mr(mr.get());
            },
        }
    }
}

/// The NIC's registration table (behind `Shared::regs`). Every verbs call
/// that creates or destroys an MR or window runs under its lock.
#[derive(Default)]
pub(crate) struct Registrations {
    regions: HashMap<u32, Region>,
    remote: HashMap<u32, RemoteKey>,
    /// Successful `register` calls.
    pub registrations: u64,
}

impl Registrations {
    pub fn live_regions(&self) -> u64 {
        self.regions.len() as u64
    }

    pub fn live_remote_keys(&self) -> u64 {
        self.remote.len() as u64
    }

    fn revoke(&mut self, rkey: u32) {
        if let Some(k) = self.remote.remove(&rkey) {
            if let Some(r) = self.regions.get_mut(&k.lkey()) {
                r.rkeys.retain(|&x| x != rkey);
            }
            k.release();
        }
    }

    /// Revokes the windows bound on QP `qp` (before it is destroyed: a bound
    /// window keeps the QP alive in the kernel, and rxe would then block
    /// `ibv_destroy_qp` for its whole cleanup timeout).
    pub fn revoke_qp(&mut self, qp: u32) {
        let keys: Vec<u32> = self
            .remote
            .iter()
            .filter(|(_, k)| matches!(k, RemoteKey::Window { qp: q, .. } if *q == qp))
            .map(|(&rkey, _)| rkey)
            .collect();
        for rkey in keys {
            self.revoke(rkey);
        }
    }

    /// Releases everything (NIC teardown).
    pub fn release_all(&mut self) {
        for (_, k) in self.remote.drain() {
            k.release();
        }
        for (_, r) in self.regions.drain() {
            // SAFETY: each MR is deregistered once, after its windows.
            unsafe { ibv_dereg_mr(r.mr.get()) };
        }
    }
}

fn reg_error(what: &str) -> FabricError {
    match errno() {
        libc::ENOMEM | libc::EPERM | libc::EAGAIN => FabricError::NoResources(
            "memory registration refused: locked-memory limit (RLIMIT_MEMLOCK) or NIC \
             resources exhausted",
        ),
        libc::EINVAL | libc::EFAULT => FabricError::Invalid("memory range cannot be registered"),
        _ => FabricError::Unavailable(super::sys::os_error(what)),
    }
}

/// # Safety
/// As [`Nic::register`](crate::fabric::Nic::register).
pub(crate) unsafe fn register(
    shared: &Shared,
    addr: usize,
    len: usize,
    access: Access,
) -> Result<MrKeys, FabricError> {
    if len == 0 {
        return Err(FabricError::Invalid("empty region"));
    }
    let flags = base_mr_flags(access, shared.caps.windows);
    let mut regs = lock(&shared.regs);
    // SAFETY: the caller keeps [addr, addr+len) valid until deregister; the
    // PD lives as long as `shared`. The flag value fits a c_int.
    let mr = unsafe { ibv_reg_mr(shared.pd.get(), addr as *mut _, len, flags as i32) };
    if mr.is_null() {
        return Err(reg_error("ibv_reg_mr"));
    }
    // SAFETY: a non-null MR from ibv_reg_mr is valid until deregistered.
    let lkey = unsafe { (*mr).lkey };
    regs.regions.insert(
        lkey,
        Region {
            mr: Raw(mr),
            addr,
            len,
            access,
            rkeys: Vec::new(),
        },
    );
    regs.registrations += 1;
    Ok(MrKeys { lkey })
}

pub(crate) fn deregister(shared: &Shared, lkey: u32) {
    let mut regs = lock(&shared.regs);
    let Some(r) = regs.regions.get(&lkey) else {
        return;
    };
    for rkey in r.rkeys.clone() {
        regs.revoke(rkey);
    }
    if let Some(r) = regs.regions.remove(&lkey) {
        // SAFETY: the MR is valid, its windows were deallocated above
        // (ibv_dereg_mr refuses an MR with bound windows), and it is
        // deregistered once.
        unsafe { ibv_dereg_mr(r.mr.get()) };
    }
}

pub(crate) fn bind_remote(
    shared: &Shared,
    lkey: u32,
    qp: QpNum,
    access: Access,
) -> Result<u32, FabricError> {
    let qp_num = qp.0;
    let wanted = access.bits() & (Access::REMOTE_READ | Access::REMOTE_WRITE).bits();
    if wanted == 0 || wanted != access.bits() {
        return Err(FabricError::Invalid(
            "remote access must be REMOTE_READ and/or REMOTE_WRITE",
        ));
    }
    let mut regs = lock(&shared.regs);
    let region = regs
        .regions
        .get(&lkey)
        .ok_or(FabricError::Invalid("unknown lkey"))?;
    if !region.access.contains(access) {
        return Err(FabricError::Invalid(
            "the region does not allow that access",
        ));
    }
    let (mr, addr, len) = (region.mr, region.addr, region.len);
    let key = if shared.caps.windows {
        let qp = shared
            .qp(qp_num)
            .ok_or(FabricError::Invalid("unknown queue pair"))?;
        // SAFETY: the PD is valid; the window is released by `revoke`.
        let mw = unsafe { ibv_alloc_mw(shared.pd.get(), ibv_mw_type::IBV_MW_TYPE_2) }
            .filter(|p| !p.is_null())
            .ok_or(FabricError::NoResources("memory windows"))?;
        // SAFETY: mw is a valid window; ibv_inc_rkey is pure arithmetic.
        let rkey = unsafe { ibv_inc_rkey((*mw).rkey) };
        let info = ibv_mw_bind_info {
            mr: mr.get(),
            addr: addr as u64,
            length: len as u64,
            mw_access_flags: remote_flags(access),
        };
        if let Err(e) = qp.post_bind(mw, rkey, info) {
            // SAFETY: the window was never bound nor shared; freed once.
            unsafe { ibv_dealloc_mw(mw) };
            return Err(e);
        }
        (
            rkey,
            RemoteKey::Window {
                mw: Raw(mw),
                lkey,
                qp: qp_num,
            },
        )
    } else if !shared.caps.shared_keys {
        return Err(FabricError::Unsupported(
            "no type-2 memory windows: a remote key would work through every connection \
             of the NIC (MEM-7); set fabric.verbs.memory_windows = \"shared_keys\" to allow it",
        ));
    } else {
        let flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 | remote_flags(access);
        // SAFETY: the range is the registered region's, valid until it is
        // deregistered, which revokes this key first.
        let mr2 = unsafe { ibv_reg_mr(shared.pd.get(), addr as *mut _, len, flags as i32) };
        if mr2.is_null() {
            return Err(reg_error("ibv_reg_mr (remote key)"));
        }
        // SAFETY: valid MR.
        let rkey = unsafe { (*mr2).rkey };
        (rkey, RemoteKey::Registration { mr: Raw(mr2), lkey })
    };
    let (rkey, k) = key;
    regs.remote.insert(rkey, k);
    if let Some(r) = regs.regions.get_mut(&lkey) {
        r.rkeys.push(rkey);
    }
    Ok(rkey)
}

pub(crate) fn unbind_remote(shared: &Shared, rkey: u32) {
    lock(&shared.regs).revoke(rkey);
}
