//! Completion queues and the NIC's notify thread.

use super::sys::{errno, os_error, wc_opcode, wc_status, Raw};
use super::{lock, wait_readable, Shared, CQ_SLACK, RESERVED_WR_ID};
use crate::fabric::cq_budget::CqBudget;
use crate::fabric::{CompletionQueue, CqId, FabricError, Waker, WorkCompletion};
use rdma_sys::*;
use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Entries read from the hardware CQ per `ibv_poll_cq` call.
const POLL_BATCH: usize = 32;

/// A completion queue of a [`VerbsNic`](super::VerbsNic).
pub struct VerbsCq {
    shared: Arc<Shared>,
    /// Owned: destroyed in `drop`, after every QP using it (they hold an
    /// `Arc<VerbsCq>`).
    cq: Raw<ibv_cq>,
    id: CqId,
    waker: Arc<dyn Waker>,
    /// Completions to hand out before the hardware CQ's: the one `arm`
    /// peeked, and those made in software for requests posted after
    /// `set_error` (see the `verbs` docs). Any thread pushes; the poller pops.
    pending: Mutex<VecDeque<WorkCompletion>>,
    /// `pending.len()`, readable without the lock (poll's fast path).
    pending_len: AtomicUsize,
    /// Set by `arm`, cleared by the wake-up it asked for (hardware event or
    /// a software completion), so each arm wakes at most once. While it is
    /// set, the hardware CQ's notification request is still pending (no
    /// event was read since it was made, and a failed request clears it),
    /// so `arm` makes no new one: that would be a system call (an `ioctl`
    /// on rxe) asking for what is already asked for.
    armed: AtomicBool,
    /// Entries promised to the queue pairs on this CQ (the sum of their
    /// send and receive queue sizes), within what the device gave the CQ
    /// (`ibv_cq::cqe`).
    pub(crate) budget: CqBudget,
}

impl VerbsCq {
    pub(crate) fn create(
        shared: &Arc<Shared>,
        id: CqId,
        depth: u32,
        waker: Arc<dyn Waker>,
    ) -> Result<Arc<VerbsCq>, FabricError> {
        let depth = match depth {
            0 => crate::fabric::DEFAULT_CQ_DEPTH,
            d => d,
        };
        let want = depth
            .saturating_add(CQ_SLACK)
            .min(shared.caps.max_cqe.max(1));
        // SAFETY: valid context and completion channel (they live as long as
        // `shared`, which the CQ holds); cq_context carries our id, which the
        // notify thread maps back (it never dereferences it).
        let cq = unsafe {
            ibv_create_cq(
                shared.ctx.get(),
                i32::try_from(want).unwrap_or(i32::MAX),
                id.0 as usize as *mut _,
                shared.comp_channel.get(),
                0,
            )
        };
        if cq.is_null() {
            return Err(match errno() {
                libc::ENOMEM => FabricError::NoResources("completion queue"),
                libc::EINVAL => FabricError::Invalid("completion queue depth"),
                _ => FabricError::Unavailable(os_error("ibv_create_cq")),
            });
        }
        // SAFETY: the CQ was just created; `cqe` is the size the device
        // gave it (at least the requested one).
        let cqe = unsafe { (*cq).cqe };
        let inner = Arc::new(VerbsCq {
            shared: shared.clone(),
            cq: Raw(cq),
            id,
            waker,
            pending: Mutex::new(VecDeque::with_capacity(POLL_BATCH)),
            pending_len: AtomicUsize::new(0),
            armed: AtomicBool::new(false),
            budget: CqBudget::new(usize::try_from(cqe).unwrap_or(0)),
        });
        lock(&shared.cqs).insert(id.0, Arc::downgrade(&inner));
        Ok(inner)
    }

    pub(crate) fn raw(&self) -> *mut ibv_cq {
        self.cq.get()
    }

    /// Adds a completion made in software and wakes the CQ if armed.
    pub(crate) fn push_soft(&self, wc: WorkCompletion) {
        let mut p = lock(&self.pending);
        p.push_back(wc);
        self.pending_len.store(p.len(), Ordering::Release);
        drop(p);
        self.wake_if_armed();
    }

    fn wake_if_armed(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Reads up to `out.len()` entries from the hardware CQ, dropping the
    /// backend's own (reserved id).
    fn poll_hw(&self, out: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        // Not zeroed: this runs on every empty poll of a spinning waiter,
        // and the device writes every entry it returns.
        let mut wcs: [MaybeUninit<ibv_wc>; POLL_BATCH] =
            [const { MaybeUninit::uninit() }; POLL_BATCH];
        while n < out.len() {
            let want = (out.len() - n).min(POLL_BATCH);
            // SAFETY: the CQ is valid; wcs has room for `want` entries (an
            // ibv_wc array, MaybeUninit being layout-transparent); the
            // engine guarantees a single consumer per CQ.
            let got = unsafe { ibv_poll_cq(self.cq.get(), want as i32, wcs.as_mut_ptr().cast()) };
            let got = usize::try_from(got).unwrap_or(0).min(want);
            for wc in &wcs[..got] {
                // SAFETY: ibv_poll_cq wrote the first `got` entries.
                let wc = unsafe { wc.assume_init_ref() };
                if wc.wr_id == RESERVED_WR_ID {
                    continue;
                }
                out[n] = WorkCompletion {
                    wr_id: wc.wr_id,
                    status: wc_status(wc.status),
                    opcode: wc_opcode(wc.opcode),
                    byte_len: wc.byte_len,
                };
                n += 1;
            }
            if got < want {
                break;
            }
        }
        n
    }
}

impl Drop for VerbsCq {
    fn drop(&mut self) {
        lock(&self.shared.cqs).remove(&self.id.0);
        // SAFETY: no QP uses the CQ any more (each held an Arc to us); the
        // notify thread acknowledges every event as soon as it reads it, so
        // ibv_destroy_cq's wait for acknowledgements ends.
        unsafe { ibv_destroy_cq(self.cq.get()) };
    }
}

impl CompletionQueue for VerbsCq {
    fn id(&self) -> CqId {
        self.id
    }

    fn poll(&self, out: &mut [WorkCompletion]) -> usize {
        let cq = self;
        let mut n = 0;
        if cq.pending_len.load(Ordering::Acquire) != 0 {
            let mut p = lock(&cq.pending);
            while n < out.len() {
                let Some(wc) = p.pop_front() else { break };
                out[n] = wc;
                n += 1;
            }
            cq.pending_len.store(p.len(), Ordering::Release);
        }
        n + cq.poll_hw(&mut out[n..])
    }

    fn arm(&self) -> bool {
        let cq = self;
        // Still armed: the request made then wakes at the next completion
        // (or its event is being read and wakes now), as a new one would.
        let asked = cq.armed.swap(true, Ordering::AcqRel)
            // SAFETY: valid CQ created on a completion channel.
            || unsafe { ibv_req_notify_cq(cq.cq.get(), 0) } == 0;
        if !asked {
            // Could not arm: tell the caller to poll rather than sleep, and
            // the next arm to ask again.
            cq.armed.store(false, Ordering::Release);
            return true;
        }
        if cq.pending_len.load(Ordering::Acquire) != 0 {
            return true;
        }
        // Completions that arrived before the request do not raise an
        // event: peek one into `pending`.
        let mut one = [WorkCompletion::EMPTY];
        if cq.poll_hw(&mut one) == 1 {
            let mut p = lock(&cq.pending);
            p.push_front(one[0]);
            cq.pending_len.store(p.len(), Ordering::Release);
            return true;
        }
        false
    }
}

/// The notify thread: reads CQ events from the NIC's completion channel,
/// acknowledges each at once and wakes the CQ's waker.
///
/// One event per wait: the channel stays readable while more are queued,
/// so the next `poll` returns at once, and the usual single event costs a
/// `poll` and a `read`, not also a second `read` that finds the channel
/// empty (under emulation each system call takes microseconds of a vCPU the
/// polling threads run on).
pub(crate) fn run_notify(shared: Arc<Shared>, stop: Arc<OwnedFd>) {
    let ch = shared.comp_channel.get();
    // SAFETY: the channel lives as long as `shared`.
    let fd = unsafe { (*ch).fd };
    while wait_readable(fd, &stop) {
        let mut cq: *mut ibv_cq = std::ptr::null_mut();
        let mut ctx: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: valid channel (non-blocking fd: returns -1 when empty).
        if unsafe { ibv_get_cq_event(ch, &mut cq, &mut ctx) } != 0 {
            continue;
        }
        // SAFETY: the event names a CQ that cannot be destroyed before this
        // acknowledgement (ibv_destroy_cq waits for it).
        unsafe { ibv_ack_cq_events(cq, 1) };
        let id = ctx as usize as u32;
        let target = lock(&shared.cqs).get(&id).and_then(|w| w.upgrade());
        if let Some(c) = target {
            // Every hardware event wakes (a stale one costs one spurious
            // poll); it also ends the request `armed` stands for.
            c.armed.store(false, Ordering::Release);
            c.waker.wake();
        }
    }
}
