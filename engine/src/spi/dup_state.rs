//! A socket's duplication state (spec §4.8): whether it was duplicated
//! away or its peer is moving its connection, which of its queue pairs is
//! current, and the suspension a swap works under. The socket holds it;
//! `dup` runs the protocol on it; the completion path reads it (one relaxed
//! load while no duplication is under way) and gets a [`DupCompletion`]
//! back for an engaged socket.

use super::lock;
use super::ops::OpState;
use crate::fabric::QueuePair;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// `DupState::flags`: this descriptor was duplicated away (source side).
pub(super) const SOURCE: u8 = 1;
/// `DupState::flags`: the peer of this connection is moving it (peer side).
pub(super) const SUSPENDED: u8 = 2;

/// Per-socket duplication state.
#[derive(Default)]
pub struct DupState {
    /// `SOURCE | SUSPENDED`. Set and cleared under `state`'s lock; read
    /// without it by the completion path (one relaxed load while 0: the
    /// common case costs nothing more) and by queue-pair events.
    pub(super) flags: AtomicU8,
    /// Which queue pair of the socket is current: 0 for the first, bumped
    /// (under `state`'s lock, before `SUSPENDED` is cleared) by each swap.
    /// Queue-pair events carry the epoch they were created with.
    pub(super) epoch: AtomicU32,
    pub(super) state: Mutex<Suspension>,
    /// Signalled when a suspension ends (the watcher thread waits on it).
    pub(super) ended: Condvar,
}

/// Peer side, under `DupState::state`.
#[derive(Default)]
pub(super) struct Suspension {
    /// Numbers suspensions; a watcher acts only on its own.
    pub(super) round: u64,
    /// The SUSPEND's secret, which the REJOIN must present.
    pub(super) secret: u64,
    /// Receives whose queue pair went away, in completion (= posting) order.
    pub(super) parked: Vec<OpState>,
    /// The accepted REJOIN's queue pair, until it is swapped in.
    pub(super) rejoined: Option<Arc<dyn QueuePair>>,
    /// The SUSPEND's acknowledgement, kept until the suspension ends: the
    /// source tears it down once connected; ours breaking it at once could
    /// fail the source's connect before it is established (rdma_cm).
    pub(super) ack: Option<Arc<dyn QueuePair>>,
}

impl DupState {
    /// Whether the socket takes part in a duplication (completion path).
    #[inline]
    pub fn engaged(&self) -> bool {
        self.flags.load(Ordering::Relaxed) != 0
    }

    /// The epoch for the events of the socket's next queue pair.
    pub fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether an event of the queue pair of `epoch` is stale: that queue
    /// pair was replaced, or it is being replaced.
    pub fn ignores_events_of(&self, epoch: u32) -> bool {
        let current = self.epoch.load(Ordering::Acquire);
        epoch < current || (epoch == current && self.flags.load(Ordering::Acquire) & SUSPENDED != 0)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Suspension> {
        lock(&self.state)
    }
}

/// What the completion path does with a completion of an engaged socket.
pub enum DupCompletion {
    /// Report as usual.
    Normal(OpState),
    /// Report with this `(error, bytes)`.
    Report(OpState, u32, u32),
    /// Kept for the new queue pair.
    Parked,
}
