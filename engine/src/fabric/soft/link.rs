//! One soft connection: both ends' work queues, one cell ring per direction,
//! the remote-access window of each end, and the connection state (with,
//! under feature `fault-injection`, the faults armed on each end).
//!
//! # Who does what
//!
//! - **Posting** (`qp`): a post runs in the posting thread under its end's
//!   post lock (uncontended unless two threads post on one queue pair). A
//!   send of up to [`cell::INLINE_MAX`] bytes is copied into the next cell
//!   of its direction's ring; a longer one goes as its gather list. RDMA
//!   writes and reads execute at once, in the posting thread (the posting
//!   CPU is the DMA engine), under that post lock, which also holds the
//!   end's window: the remote keys the peer bound to this connection (so
//!   an RDMA takes no lock beyond the post's own).
//! - **Matching**: the *matcher* of a direction consumes its cells in order
//!   and fills the receiving end's posted receives in order, copying the
//!   payload (from the cell, or straight from the sender's registered
//!   memory for a long message: the one copy). A message that finds no
//!   posted receive stays in its cell: that is the receiver-not-ready hold,
//!   bounded by the sender, which fails `RnrRetryExceeded` once more than
//!   `rnr_queue_max` of its sends wait. The matcher is normally the
//!   receiving end's reaper; when the receiving end is not reaped (no thread
//!   polls its CQ) the sending end's reaper takes over after
//!   [`HELP_AFTER`] polls, as a NIC moves data without the host's CPU.
//!   It does not while the matcher is at work (its lock held: copying a
//!   long message takes tens of microseconds): it may sleep, as the matcher
//!   publishes and wakes both ends when done, and one that leaves without
//!   consuming anything wakes the sender. A sender spinning through such a
//!   copy took the CPU time, on a shared machine, that the copier needed.
//! - **Reaping**: each CQ is written by one thread only, its consumer: the
//!   completions of an end are not queued anywhere but read off its send and
//!   receive queues in posting order when its CQ is polled (a send is done
//!   once its cell was consumed; a receive once it was filled). A poll that
//!   completes receives reports the sends their messages acknowledged at
//!   the next poll: a reply is acted on before its request's send is
//!   reaped (`Link::reap`).
//!
//! # Breaking and sealing
//!
//! A failure or a local close breaks the connection: the state word goes
//! `INTACT → BROKEN` under the control lock (which records who failed and
//! any request that failed with its own status), so no matcher starts a copy
//! and no RDMA starts. The breaker then takes and releases both matcher locks
//! and both post locks, so none is still copying, and stores `SEALED`. Only
//! a sealed connection's outstanding requests are flushed by the reapers:
//! once `set_error` returned (it waits for the seal) and its flushed
//! completions were polled, nothing touches the memory those requests named.
//! Every request completes exactly once: each sits in exactly one queue
//! slot, and a reaper pops a slot only when it emits its completion.
//!
//! # Wake-ups
//!
//! A CQ's `armed` word is set by a sleeper (`arm`) and cleared by the one
//! waker that wakes it; on the data path it is only read. Whoever makes work
//! for a CQ (a cell, a consumed index, a receive, a post-time completion, a
//! seal) publishes it, then issues a fence and reads `armed`; the sleeper
//! stores `armed`, fences, then looks for work. One of the two sees the
//! other. The fences are asymmetric (`fence`): the producer's, on every
//! post and match, is a compiler fence; the sleeper's, paid only when a
//! thread is about to sleep, makes every thread of the process pass a full
//! barrier. Between the fence and `armed` the producer reads the end's
//! `idle` flag and announces an idle end to its CQ, which visits only the
//! ends that have work (`cq`: the same re-check per end, whose misses the
//! CQ re-checks until its next heavy fence).

use super::cell::{CellConsumer, CellProducer, CellRing};
use super::clock::ticks;
use super::mr::{copy_flat, total_len, Window, WindowHost};
use super::notify::{CqShared, Presence};
use super::post_lock::PostLock;
use super::wq::{EndQueues, RecvView, RqPoster, RqReaper, SqKind, SqPoster, SqReaper};
use super::{lock, NicShared};
use crate::fabric::lkey_cache::LkeyCache;
use crate::fabric::*;
use crate::spin::{SpinGuard, SpinLock};
use crossbeam_utils::CachePadded;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
#[cfg(feature = "fault-injection")]
use std::time::{Duration, Instant};

/// Polls during which a sending end's reaper waits for the receiving end to
/// consume a message it could take, before it matches the message itself.
pub(super) const HELP_AFTER: u32 = 256;

/// Polls during which a sending end's reaper waits for an acknowledgement
/// carried by an incoming message before it reads the peer's `consumed`
/// line itself (reading it on every poll would pull that line away from the
/// peer each time the peer writes it)...
const ACK_AFTER: u32 = 32;
/// ...or this many ticks of [`ticks`] (about 1-4 us) since the last read,
/// whichever comes first: a caller that polls rarely still learns at once.
/// In a ping-pong (the last wait ended with the acknowledgement a reply
/// carried, `Reaper::replied`) the ticks count from the wait's first poll
/// if that is later: in one whose round trip is shorter, the first poll
/// after most sends found them passed since the last read and read
/// `consumed`, and the peer's next store of it, with the fence of its wake
/// right behind, waited for the line on the path of its reply (sanbench
/// send_lat 8 B, median of 9 interleaved runs: 0.255 us, now 0.220).
pub(super) const ACK_AFTER_TICKS: u64 = 4096;

const INTACT: u32 = 0;
const BROKEN: u32 = 1;
const SEALED: u32 = 2;

/// What the posting threads of one end share (under the end's post lock).
///
/// Laid out by hand (`repr(C)`, after the lock words, see `PostLock`) so
/// that a post of a connection idle for long, whose lines are all cold,
/// touches three: the lock words with what a send needs first (the queue of
/// messages, the cell ring's producer, the queues' pointer and the bound
/// on the peer's receives), then the other two queues, then the local keys'
/// first entry (the asserts below keep them there).
#[repr(C)]
pub(super) struct Poster {
    /// Sends travelling as messages of the outgoing ring.
    pub(super) sends: SqPoster,
    /// The producer of this end's outgoing cell ring.
    pub(super) cells: CellProducer,
    /// This end's queues, passed to every call of the three posters.
    pub(super) queues: Arc<EndQueues>,
    /// Send-queue requests done (or failed) at post time, and stalled ones.
    pub(super) sq: SqPoster,
    pub(super) rq: RqPoster,
    /// Last count read of the peer's posted receives, `<=` the real one.
    pub(super) peer_posted: u64,
    /// Local keys this end checked lately.
    pub(super) lkeys: LkeyCache,
    /// Keys the peer exposed to this end, checked by its RDMA (under the
    /// post lock, which a revocation takes: `mr`).
    pub(super) window: Window,
}

// The lines of the `Poster` docs, with the 8 bytes of the lock words before
// it: the send's fields in the first 56 bytes, the other two queues and the
// peer's count in the next line, the local keys from the third.
#[cfg(not(loom))]
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(Poster, sq) == 56);
    assert!(offset_of!(Poster, lkeys) == 120);
    assert!(std::mem::align_of::<Poster>() == 8);
};

impl Poster {
    /// Whether one more send-queue request fits `depth`.
    pub(super) fn sq_room(&mut self, depth: usize) -> bool {
        let depth = depth as u64;
        if self.sq.pending() + self.sends.pending() < depth {
            return true;
        }
        self.sq.refresh(&self.queues);
        self.sends.refresh(&self.queues);
        self.sq.pending() + self.sends.pending() < depth
    }
}

/// What the consumer of one end's CQ owns (kept in the CQ's list of
/// ends, under its consumer lock).
pub(super) struct Reaper {
    pub(super) sq: SqReaper,
    pub(super) sends: SqReaper,
    pub(super) rq: RqReaper,
    /// Consecutive polls in which the oldest unfinished send stayed
    /// unacknowledged (see [`ACK_AFTER`], [`HELP_AFTER`]).
    stalled_polls: u32,
    /// Messages of this end known consumed by the peer, `<=` the peer's
    /// `consumed`.
    sent: u64,
    /// When (in [`ticks`]) `sent` was last read from the peer's `consumed`,
    /// or, in a ping-pong (`replied`), when the wait for the oldest
    /// unfinished send's acknowledgement began (its first stalled poll) if
    /// that is later.
    waited_from: u64,
    /// The last wait for an acknowledgement ended with one a message of
    /// the peer carried, before this end read `consumed`: a ping-pong,
    /// whose next wait with a receive posted waits [`ACK_AFTER_TICKS`] for
    /// the reply before it reads `consumed`. Cleared by a wait that had to
    /// read it.
    replied: bool,
    /// Set by `arm`: match the stuck message at the next poll.
    help_now: bool,
}

/// What a post did, for the work to do once the post lock is released.
#[derive(Default)]
pub(super) struct Posted {
    /// The connection must break: this end failed with that status.
    pub(super) fail: Option<WcStatus>,
    /// A message went to the peer.
    pub(super) to_peer: bool,
}

/// One end of the connection.
pub(super) struct End {
    pub(super) post: CachePadded<PostLock<Poster>>,
    /// This end's posted receives (read by the matcher of its incoming ring
    /// and, for the receiver-not-ready bound, by the peer's posts).
    pub(super) rq: Arc<EndQueues>,
    /// Most uncompleted send-queue requests.
    pub(super) send_depth: usize,
    pub(super) max_sge: usize,
    /// Sends of the *other* end that may wait for a receive of this end
    /// (this end's NIC `rnr_queue_max`).
    pub(super) rnr_max: u64,
    /// Completion entries this end reserved on its CQ.
    pub(super) reserved: usize,
    /// Set when the queue pair was destroyed: once drained, its CQ forgets
    /// the end.
    pub(super) dropped: AtomicBool,
    /// Whether the end's CQ polls it, and how to make it (see `cq`).
    pub(super) presence: Presence,
}

/// One direction: messages of end `d` to end `1 - d`.
pub(super) struct Dir {
    /// The consumer of the ring, held by whoever matches (see module
    /// docs), and what the matching learns, on one line.
    matcher: CachePadded<Matching>,
    pub(super) ring: Arc<CellRing>,
}

/// What the matcher of a direction owns, and what it publishes for the
/// opposite direction's sender (the receiving end here).
struct Matching {
    consumer: SpinLock<CellConsumer>,
    /// The highest acknowledgement of the *opposite* direction's messages
    /// carried by this direction's messages. Written by this direction's
    /// matcher; read by the receiving end's reaper, which is normally that
    /// matcher: the line its reap reads is the one its matching wrote (a
    /// line of its own was a miss per message at 10,000 connections).
    acked: AtomicU64,
}

/// How the connection broke, and the requests that failed with their own
/// status (everything else outstanding completes with `flush[end]`).
#[derive(Default)]
pub(super) struct Control {
    pub(super) broken: bool,
    /// Status of each end's requests outstanding at the break.
    flush: [Option<WcStatus>; 2],
    /// `(cell index, status)` of a send of end i that the peer refused.
    cell_fail: [Option<(u64, WcStatus)>; 2],
    /// `(receive index, status)` of a receive of end i that failed.
    recv_fail: [Option<(u64, WcStatus)>; 2],
    /// `(send-queue index, status)` of a request of end i that failed
    /// after it was queued (a stalled request timing out, or a held RDMA
    /// failing at its release).
    sq_fail: [Option<(u64, WcStatus)>; 2],
    /// Ends to tell `disconnected` / `failed` at the seal.
    tell: [bool; 2],
    failed: [bool; 2],
    #[cfg(feature = "fault-injection")]
    pub(super) faults: [EndFaults; 2],
}

/// Faults armed on one end (`fault`), in the link's [`Control`], under its
/// lock: cleared by a break.
#[cfg(feature = "fault-injection")]
#[derive(Default)]
pub(super) struct EndFaults {
    /// `(posts left before the failing one, status)` per queue: 0 left means
    /// the next post fails. Cleared when it fires.
    pub(super) fail_send: Option<(u32, WcStatus)>,
    pub(super) fail_recv: Option<(u32, WcStatus)>,
    /// The next RDMA request fails its remote-key check. Cleared when it
    /// fires.
    pub(super) rkey_error: bool,
    /// `(bytes the send queue may still move, status)`. Cleared when it
    /// fires.
    pub(super) byte_budget: Option<(u64, WcStatus)>,
    /// This end answers nothing (`StopResponding` armed on it). Stays set
    /// until the link breaks.
    pub(super) silent: bool,
    /// The peer is silent: this end's send-queue requests stall (as
    /// `SqKind::Stalled` entries), and its oldest one fails after `timeout`.
    pub(super) peer_silent: Option<Duration>,
    /// Send-queue indices of this end's stalled requests, oldest first.
    /// Room for the end's send depth is reserved when `StopResponding` is
    /// armed, so pushing never allocates.
    pub(super) stalled: Vec<u64>,
    /// When the oldest entry of `stalled` was posted, while the peer is
    /// silent and `stalled` is non-empty; the watchdog fires at
    /// `since + timeout`.
    pub(super) stall_since: Option<Instant>,
    /// `StallRdma` armed: this end's RDMA requests are held.
    pub(super) hold_rdma: bool,
    /// The held requests, oldest first, and their local entries (each
    /// request's in a range of `held_sges`). Room for the end's send depth
    /// of requests with its most entries each is reserved when `StallRdma`
    /// is armed, so holding never allocates.
    pub(super) held: Vec<HeldRdma>,
    pub(super) held_sges: Vec<Sge>,
}

/// An RDMA request held by `StallRdma`: what it needs to execute later.
#[cfg(feature = "fault-injection")]
pub(super) struct HeldRdma {
    /// Its send-queue index (a `SqKind::Stalled` entry).
    pub(super) index: u64,
    /// Its local entries, `held_sges[sges]`. They stay registered until
    /// the request completes (`Nic::deregister` contract); they are checked
    /// again at release.
    pub(super) sges: std::ops::Range<usize>,
    pub(super) remote_addr: u64,
    pub(super) rkey: u32,
    pub(super) write: bool,
}

#[cfg(feature = "fault-injection")]
impl EndFaults {
    /// Whether any fault is still armed.
    pub(super) fn any(&self) -> bool {
        self.fail_send.is_some()
            || self.fail_recv.is_some()
            || self.rkey_error
            || self.byte_budget.is_some()
            || self.silent
            || self.peer_silent.is_some()
            || self.hold_rdma
    }
}

/// The completion statuses of a sealed end, copied out of [`Control`].
#[derive(Clone, Copy)]
struct Flush {
    status: WcStatus,
    cell_fail: Option<(u64, WcStatus)>,
    recv_fail: Option<(u64, WcStatus)>,
    sq_fail: Option<(u64, WcStatus)>,
}

fn pick(over: Option<(u64, WcStatus)>, index: u64, default: WcStatus) -> WcStatus {
    match over {
        Some((i, s)) if i == index => s,
        _ => default,
    }
}

/// Why a connection breaks.
#[derive(Clone, Copy, Debug)]
pub(super) enum Cause {
    /// `set_error`: the closing end flushes, the peer alone is told.
    Close,
    /// A request of the end failed with this status; both ends are told.
    Failed(WcStatus),
}

pub(super) struct Link {
    pub(super) ends: [End; 2],
    /// `dirs[d]` carries end `d`'s messages.
    pub(super) dirs: [Dir; 2],
    /// `INTACT`, `BROKEN` or `SEALED`; only grows. Written under `control`.
    state: CachePadded<AtomicU32>,
    /// Status later posts of each end complete with (`status + 1`, 0 while
    /// intact). Written under `control`.
    post_status: [AtomicU8; 2],
    pub(super) control: Mutex<Control>,
    /// Whether faults are armed on each end (tests only).
    #[cfg(feature = "fault-injection")]
    pub(super) faults_armed: [AtomicBool; 2],
    /// Paired with `control`: wakes a fault watchdog (tests only).
    #[cfg(feature = "fault-injection")]
    pub(super) fault_cv: std::sync::Condvar,
    /// `Fault::NoFlush` on each end: a sealed end's outstanding requests
    /// are not flushed (tests only). Set by arming, cleared by
    /// `QpFaults::release_flush`; read by the end's reaper. Not part of
    /// `Control::faults`, which a break clears.
    #[cfg(feature = "fault-injection")]
    pub(super) withhold_flush: [AtomicBool; 2],
    pub(super) cqs: [Arc<CqShared>; 2],
    pub(super) nics: [Arc<NicShared>; 2],
    pub(super) nums: [QpNum; 2],
    /// Local address of each end.
    pub(super) addrs: [SocketAddrV4; 2],
    pub(super) events: [Arc<dyn QpEvents>; 2],
}

/// What one end asked for at connection set-up.
pub(super) struct EndParams {
    pub(super) send_depth: usize,
    pub(super) recv_depth: usize,
    pub(super) max_sge: usize,
    pub(super) rnr_max: u64,
    pub(super) reserved: usize,
}

/// The two elements of `v`, as an array.
fn pair<T>(v: Vec<T>) -> [T; 2] {
    let mut v = v.into_iter();
    let a = v.next().expect("two elements");
    let b = v.next().expect("two elements");
    [a, b]
}

fn status_code(s: WcStatus) -> u8 {
    s as u8 + 1
}

impl Link {
    /// Executes an RDMA write or read of end `me` between `local` and the peer's
    /// `[remote_addr, +len)` named by `rkey`; the length moved or the
    /// status it failed with. The caller holds the end's post lock.
    pub(super) fn rdma(
        &self,
        me: usize,
        p: &mut Poster,
        local: &[Sge],
        remote_addr: u64,
        rkey: u32,
        write: bool,
    ) -> Result<u32, WcStatus> {
        let len = total_len(local).ok_or(WcStatus::LocalLengthError)?;
        let (local_need, remote_need) = if write {
            (Access::NONE, Access::REMOTE_WRITE)
        } else {
            (Access::LOCAL_WRITE, Access::REMOTE_READ)
        };
        if !self.nics[me]
            .pd
            .check_cached(&mut p.lkeys, self.nums[me], local, local_need)
        {
            return Err(WcStatus::LocalProtectionError);
        }
        // The post lock is held: a seal waits for it, so the link stays
        // unsealed for the copy if it is intact now.
        if !self.is_intact() {
            return Err(self.post_status(me).unwrap_or(WcStatus::Flushed));
        }
        let remote = p
            .window
            .check(rkey, remote_addr, len as usize, remote_need)
            .ok_or(WcStatus::RemoteAccessError)?;
        // SAFETY: `local` was checked against our regions and stays
        // registered for the call (post lock, see `send`); `[remote, +len)`
        // lies in a region the peer exposed to this connection with the
        // needed right, and the post lock, which holds the window, is held
        // until after the copy, so the key cannot be revoked (nor its region
        // deregistered: a deregistration revokes first) meanwhile.
        unsafe { copy_flat(local, remote, write) };
        #[cfg(feature = "perf-marks")]
        crate::perf_marks::published();
        Ok(len)
    }

    /// Builds a link whose ends complete on `cqs`, and the reaper state of
    /// each end, which the caller attaches to that end's CQ (`SoftCq::attach`).
    pub(super) fn new(
        p: [EndParams; 2],
        cqs: [Arc<CqShared>; 2],
        nics: [Arc<NicShared>; 2],
        nums: [QpNum; 2],
        addrs: [SocketAddrV4; 2],
        events: [Arc<dyn QpEvents>; 2],
    ) -> (Arc<Link>, [Reaper; 2]) {
        let mut producers = Vec::with_capacity(2);
        let mut dirs = Vec::with_capacity(2);
        for q in &p {
            let (prod, cons) = super::cell::ring(q.send_depth, q.max_sge);
            dirs.push(Dir {
                ring: prod.ring().clone(),
                matcher: CachePadded::new(Matching {
                    consumer: SpinLock::new(cons),
                    acked: AtomicU64::new(0),
                }),
            });
            producers.push(prod);
        }
        let mut ends = Vec::with_capacity(2);
        let mut reapers = Vec::with_capacity(2);
        for (q, cells) in p.iter().zip(producers) {
            let queues = super::wq::end_queues(q.send_depth, q.recv_depth, q.max_sge);
            let ((sqp, sqr), (sendp, sendr)) = (queues.sq, queues.sends);
            let ((rqp, rqr), rq) = (queues.rq, queues.shared);
            ends.push(End {
                post: CachePadded::new(PostLock::new(Poster {
                    sends: sendp,
                    cells,
                    queues: rq.clone(),
                    sq: sqp,
                    rq: rqp,
                    peer_posted: 0,
                    lkeys: LkeyCache::default(),
                    window: Window::default(),
                })),
                rq,
                send_depth: q.send_depth,
                max_sge: q.max_sge,
                rnr_max: q.rnr_max,
                reserved: q.reserved,
                dropped: AtomicBool::new(false),
                presence: Presence::new(),
            });
            reapers.push(Reaper {
                sq: sqr,
                sends: sendr,
                rq: rqr,
                stalled_polls: 0,
                sent: 0,
                waited_from: 0,
                replied: false,
                help_now: false,
            });
        }
        let link = Arc::new(Link {
            ends: pair(ends),
            dirs: pair(dirs),
            state: CachePadded::new(AtomicU32::new(INTACT)),
            post_status: [AtomicU8::new(0), AtomicU8::new(0)],
            control: Mutex::new(Control::default()),
            #[cfg(feature = "fault-injection")]
            faults_armed: [AtomicBool::new(false), AtomicBool::new(false)],
            #[cfg(feature = "fault-injection")]
            fault_cv: std::sync::Condvar::new(),
            #[cfg(feature = "fault-injection")]
            withhold_flush: [AtomicBool::new(false), AtomicBool::new(false)],
            cqs,
            nics,
            nums,
            addrs,
            events,
        });
        (link, pair(reapers))
    }

    fn state(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }

    pub(super) fn is_intact(&self) -> bool {
        self.state() == INTACT
    }

    /// Whether `end`'s requests are flushed once the link is sealed (not
    /// while `Fault::NoFlush` withholds them).
    fn flushes(&self, end: usize) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.withhold_flush[end].load(Ordering::Acquire) {
            return false;
        }
        let _ = end;
        true
    }

    /// The status a post of `end` completes with at once, if the
    /// connection is no longer intact.
    pub(super) fn post_status(&self, end: usize) -> Option<WcStatus> {
        match self.post_status[end].load(Ordering::Acquire) {
            0 => None,
            s => Some(super::wq::status_from(s - 1)),
        }
    }

    /// Wakes the CQs of the ends in `which` that sleep (after the caller
    /// published the work).
    /// An idle end is announced to its CQ first (see `cq`).
    #[inline]
    pub(super) fn wake(&self, which: [bool; 2]) {
        super::fence::light();
        for ((cq, end), wake) in self.cqs.iter().zip(&self.ends).zip(which) {
            if !wake {
                continue;
            }
            if end.presence.is_idle() {
                cq.announce(&end.presence);
            }
            if cq.is_armed() {
                cq.wake();
            }
        }
    }

    /// Breaks the connection (see module docs); `false` if it was broken
    /// already (then a `Close` still makes the end's later posts flush).
    /// The caller must then [`Link::seal`], holding no matcher or post
    /// lock of this link.
    pub(super) fn break_with(&self, end: usize, cause: Cause, c: &mut Control) -> bool {
        if c.broken {
            if matches!(cause, Cause::Close) {
                self.post_status[end].store(status_code(WcStatus::Flushed), Ordering::Release);
            }
            return false;
        }
        c.broken = true;
        let other = 1 - end;
        c.flush[end] = Some(WcStatus::Flushed);
        c.flush[other] = Some(WcStatus::RemoteDisconnected);
        self.post_status[end].store(status_code(WcStatus::Flushed), Ordering::Release);
        self.post_status[other].store(status_code(WcStatus::RemoteDisconnected), Ordering::Release);
        match cause {
            Cause::Close => c.tell[other] = true,
            Cause::Failed(status) => {
                c.tell = [true, true];
                c.failed[end] = detected_locally(status);
            }
        }
        #[cfg(feature = "fault-injection")]
        {
            c.faults = Default::default();
            self.faults_armed[0].store(false, Ordering::Relaxed);
            self.faults_armed[1].store(false, Ordering::Relaxed);
            self.fault_cv.notify_all();
        }
        self.state.store(BROKEN, Ordering::Release);
        true
    }

    /// Breaks because of `cause` and seals (no lock of this link held).
    /// A request that fails does not take down the ones posted before it:
    /// messages that have receives waiting are delivered first.
    pub(super) fn fail(&self, end: usize, cause: Cause) {
        let mut seal = false;
        if matches!(cause, Cause::Failed(_)) {
            seal |= self.run_matcher(0, true);
            seal |= self.run_matcher(1, true);
        }
        let first = self.break_with(end, cause, &mut lock(&self.control));
        if first || seal {
            self.seal();
        } else {
            self.await_seal();
        }
    }

    /// Finishes a break: waits until no matcher copies and no RDMA
    /// accesses either end's memory, tells the ends (before any flushed
    /// completion can be polled, so the engine knows why they flush), then
    /// lets the reapers flush and wakes both CQs.
    pub(super) fn seal(&self) {
        debug_assert_eq!(self.state(), BROKEN);
        for (d, e) in self.dirs.iter().zip(&self.ends) {
            drop(d.matcher.consumer.lock());
            drop(e.post.lock_control());
        }
        let (tell, failed) = {
            let mut c = lock(&self.control);
            (std::mem::take(&mut c.tell), c.failed)
        };
        for end in 0..2 {
            if tell[end] && failed[end] {
                self.events[end].failed();
            } else if tell[end] {
                self.events[end].disconnected();
            }
        }
        self.state.store(SEALED, Ordering::Release);
        self.wake([true, true]);
    }

    /// Waits for another thread's seal to finish.
    fn await_seal(&self) {
        while self.state() != SEALED {
            std::thread::yield_now();
        }
    }

    /// Local close of `end` (`QueuePair::set_error`).
    pub(super) fn close(&self, end: usize) {
        self.fail(end, Cause::Close);
    }

    fn flush_of(&self, end: usize) -> Flush {
        let c = lock(&self.control);
        Flush {
            status: c.flush[end].unwrap_or(WcStatus::Flushed),
            cell_fail: c.cell_fail[end],
            recv_fail: c.recv_fail[end],
            sq_fail: c.sq_fail[end],
        }
    }

    /// The matcher of direction `d`, held as a copier holds it (tests).
    #[cfg(test)]
    pub(super) fn hold_matcher(&self, d: usize) -> SpinGuard<'_, CellConsumer> {
        self.dirs[d].matcher.consumer.lock()
    }

    /// Records that request `sq_index` of `end` failed with `status` after
    /// it was queued (a fault's watchdog), and breaks.
    #[cfg(feature = "fault-injection")]
    pub(super) fn fail_queued(
        &self,
        end: usize,
        sq_index: u64,
        status: WcStatus,
        c: &mut Control,
    ) -> bool {
        if c.broken {
            return false;
        }
        c.sq_fail[end] = Some((sq_index, status));
        self.break_with(end, Cause::Failed(status), c)
    }

    /// Consumes the messages of direction `d` that the receiving end has
    /// receives for. Returns whether the caller must [`Link::seal`] (a
    /// message was too long for its receive), once it holds no lock.
    /// `wait`: take the matcher lock even if another thread holds it.
    fn run_matcher(&self, d: usize, wait: bool) -> bool {
        let matcher = &self.dirs[d].matcher.consumer;
        let mut m = match matcher.try_lock() {
            Some(m) => m,
            None if wait => matcher.lock(),
            None => return false,
        };
        let to = 1 - d;
        let rq = &*self.ends[to].rq;
        let mut seal = false;
        let mut acked = 0;
        while self.state() == INTACT {
            let index = m.head();
            let Some(msg) = m.peek() else { break };
            let Some(recv) = rq.entry(index) else { break };
            if recv.preset.is_some() {
                break;
            }
            let len = msg.len();
            if u64::from(len) > recv.room() {
                let mut c = lock(&self.control);
                if !c.broken {
                    c.cell_fail[d] = Some((index, WcStatus::RemoteInvalidRequest));
                    c.recv_fail[to] = Some((index, WcStatus::LocalLengthError));
                }
                seal = self.break_with(to, Cause::Failed(WcStatus::LocalLengthError), &mut c);
                break;
            }
            fill(&msg, &recv);
            rq.set_len(index, len);
            acked = acked.max(msg.ack());
            m.pop();
        }
        // The acknowledgements are for the opposite direction, whose
        // sender is the receiving end here.
        let pa = &self.dirs[d].matcher.acked;
        if acked > pa.load(Ordering::Relaxed) {
            pa.store(acked, Ordering::Release);
        }
        self.release_matcher(d, m);
        seal
    }

    /// Publishes what the matcher `m` of direction `d` consumed, lets it
    /// go and wakes both ends if it consumed anything. If not, wakes the
    /// sending end: it may have gone to sleep trusting the holder of this
    /// lock with a message the holder did not see (`copying`), and must
    /// take it itself (the rule of the module docs, the lock word as the
    /// work).
    pub(super) fn release_matcher(&self, d: usize, m: SpinGuard<'_, CellConsumer>) {
        let moved = m.publish();
        drop(m);
        if moved {
            self.wake([true, true]);
        } else {
            self.wake([d == 0, d == 1]);
        }
    }

    /// Whether someone holds the matcher of direction `d` (it is matching,
    /// and publishes and wakes both ends when done; a hint, read without
    /// ordering).
    fn copying(&self, d: usize) -> bool {
        self.dirs[d].matcher.consumer.is_locked()
    }

    /// Whether direction `d` has a message its receiver has a receive for.
    fn matchable(&self, d: usize) -> bool {
        let ring = &self.dirs[d].ring;
        let next = ring.consumed();
        ring.has(next) && self.ends[1 - d].rq.posted() > next
    }

    /// Polls end `end` into `out`: its completions in posting order per
    /// queue, the receive queue's first. `r` is the end's reaper state (the caller is its CQ's
    /// consumer). Returns how many were written and whether the caller must
    /// [`Link::seal`] this link once it holds no lock. Inlined into the
    /// CQ's poll (`Attached::visit`): as a call, its saves, restores and
    /// the spills around it were a fifth of a poll's instructions.
    #[inline(always)]
    pub(super) fn reap(
        &self,
        end: usize,
        r: &mut Reaper,
        out: &mut [WorkCompletion],
    ) -> (usize, bool) {
        let mut seal = false;
        let state = self.state();
        let (incoming, outgoing) = (1 - end, end);
        if state == INTACT && self.matchable(incoming) {
            seal |= self.run_matcher(incoming, false);
        }
        let known = r.sent;
        if state == INTACT {
            seal |= self.track_sends(outgoing, r);
        }
        // Read the state before the indices: once sealed they are final.
        let state = self.state();
        let flush = (state == SEALED && self.flushes(end)).then(|| self.flush_of(end));
        if flush.is_some() {
            r.sent = self.dirs[outgoing].ring.consumed();
        }
        let filled = self.dirs[incoming].ring.consumed();
        let mut n = 0;
        while n < out.len() {
            let Some(h) = r.rq.peek() else { break };
            let (status, len) = match (h.preset, flush) {
                (Some(status), _) => (status, 0),
                (None, _) if h.index < filled => (WcStatus::Success, h.len),
                (None, Some(f)) => (pick(f.recv_fail, h.index, f.status), 0),
                (None, None) => break,
            };
            out[n] = WorkCompletion {
                wr_id: h.wr_id,
                status,
                opcode: WcOpcode::Recv,
                byte_len: len,
            };
            n += 1;
            r.rq.pop();
        }
        let received = n;
        while n < out.len() {
            let Some(e) = r.sq.peek() else { break };
            let (status, len) = match (e.kind, flush) {
                (SqKind::Done { status, len }, _) => (status, len),
                (SqKind::Stalled, Some(f)) => (pick(f.sq_fail, r.sq.head(), f.status), 0),
                _ => break,
            };
            out[n] = WorkCompletion {
                wr_id: e.wr_id,
                status,
                opcode: e.opcode,
                byte_len: len,
            };
            n += 1;
            r.sq.pop();
        }
        // A poll that completes receives reports only the sends known
        // consumed before it: the acknowledgement of a request's send comes
        // with the reply, and the thread waiting for that reply then acts
        // on it (answers) before it dispatches the send's completion, at
        // its next poll (the end stays hot: `has_work` sees the send done).
        // One poll later, never starved: the next poll knows them before.
        let sent = if received > 0 && flush.is_none() {
            known
        } else {
            r.sent
        };
        while n < out.len() {
            let Some(e) = r.sends.peek() else { break };
            let (status, len) = match (e.kind, flush) {
                (SqKind::Cell { index, len }, _) if index < sent => (WcStatus::Success, len),
                (SqKind::Cell { index, .. }, Some(f)) => (pick(f.cell_fail, index, f.status), 0),
                _ => break,
            };
            out[n] = WorkCompletion {
                wr_id: e.wr_id,
                status,
                opcode: e.opcode,
                byte_len: len,
            };
            n += 1;
            r.sends.pop();
        }
        (n, seal)
    }

    /// Learns which sends of end `d` the peer consumed: from the
    /// acknowledgements its messages carried, else from the peer's
    /// `consumed`, read every [`ACK_AFTER`] polls or [`ACK_AFTER_TICKS`] of a wait,
    /// and at the first poll that finds the oldest unfinished send waiting
    /// if the end has no receive posted. An end with one expects a reply,
    /// whose cell carries the acknowledgement: reading `consumed` right
    /// after a send would pull the line the peer writes when it takes the
    /// message, and the peer's store of it (and, in store order, of its
    /// reply's cell) would then wait for that line to come back. If that
    /// send is a message the peer could take but has not for
    /// [`HELP_AFTER`] polls (or `arm` asked), matches it here: the
    /// receiving end is not polled. Returns whether the caller must seal.
    #[inline(always)]
    fn track_sends(&self, d: usize, r: &mut Reaper) -> bool {
        // Carried by the messages of the opposite direction.
        let hint = self.dirs[1 - d].matcher.acked.load(Ordering::Acquire);
        r.sent = r.sent.max(hint);
        // The message of the oldest unfinished send, if not known consumed.
        let oldest = match r.sends.peek_cell() {
            Some(index) if index >= r.sent => index,
            _ => {
                // A wait under way ended with a message's acknowledgement.
                r.replied |= r.stalled_polls > 0;
                r.stalled_polls = 0;
                r.help_now = false;
                return false;
            }
        };
        r.stalled_polls += 1;
        // The first poll of a wait looks unless a reply is expected (a
        // poll right after the peer took the message reports it), then
        // every ACK_AFTER-th or ACK_AFTER_TICKS since the last read, or,
        // in a ping-pong, since the wait began.
        let now = ticks();
        if r.stalled_polls == 1 && r.replied {
            r.waited_from = now;
        }
        let due = (r.stalled_polls == 1 && r.rq.is_empty())
            || r.stalled_polls % ACK_AFTER == 0
            || r.help_now
            || now.wrapping_sub(r.waited_from) >= ACK_AFTER_TICKS;
        if !due {
            return false;
        }
        r.sent = r.sent.max(self.dirs[d].ring.consumed());
        r.waited_from = now;
        r.replied = false;
        if oldest < r.sent {
            r.stalled_polls = 0;
            r.help_now = false;
            return false;
        }
        if r.stalled_polls < HELP_AFTER && !r.help_now {
            return false;
        }
        r.stalled_polls = 0;
        r.help_now = false;
        if !self.matchable(d) {
            return false;
        }
        let seal = self.run_matcher(d, false);
        r.sent = r.sent.max(self.dirs[d].ring.consumed());
        seal
    }

    /// Whether a poll of `end` would produce a completion (or make
    /// progress another end waits for). Called by `arm` and before the end
    /// goes idle, with the end's reaper state. `help`: a send the peer
    /// could take but has not is matched at the next poll, without waiting
    /// [`HELP_AFTER`] polls (`arm`: the caller is about to sleep).
    pub(super) fn has_work(&self, end: usize, r: &mut Reaper, help: bool) -> bool {
        // Flushes wait for the seal, which wakes the CQ.
        let state = self.state();
        let sealed = state == SEALED && self.flushes(end);
        if let Some(e) = r.sq.peek() {
            if matches!(e.kind, SqKind::Done { .. }) || sealed {
                return true;
            }
        }
        if let Some(e) = r.sends.peek() {
            r.sent = r.sent.max(self.dirs[end].ring.consumed());
            let sent = r.sent;
            match e.kind {
                SqKind::Cell { index, .. } if index < sent || sealed => return true,
                _ if self.matchable(end) && !self.copying(end) => {
                    // The peer is not taking it: match it ourselves. (A
                    // matcher at work publishes, and wakes this end's CQ,
                    // when done; one that leaves the message wakes it.)
                    r.help_now |= help;
                    return true;
                }
                _ => {}
            }
        }
        if let Some(h) = r.rq.peek() {
            let filled = self.dirs[1 - end].ring.consumed();
            if h.preset.is_some() || h.index < filled || sealed {
                return true;
            }
        }
        state == INTACT && self.matchable(1 - end)
    }

    /// Whether the end is destroyed and every request of it completed.
    pub(super) fn drained(&self, end: usize, r: &Reaper) -> bool {
        self.ends[end].dropped.load(Ordering::Acquire)
            && self.state() == SEALED
            && r.sq.is_empty()
            && r.sends.is_empty()
            && r.rq.is_empty()
    }
}

impl WindowHost for Link {
    fn with_window(&self, dir: usize, f: &mut dyn FnMut(&mut Window)) {
        f(&mut self.ends[dir].post.lock_control().window);
    }
}

/// Copies a message into a receive.
fn fill(msg: &super::cell::Message<'_>, recv: &RecvView<'_>) {
    // SAFETY: the receive's entries were checked against its NIC's region
    // table (LOCAL_WRITE) when it was posted, and a long message's gather
    // entries against the sender's when the send was posted; both stay
    // registered until their requests complete (`Nic::deregister`
    // contract), which is after this copy: the receive completes once the
    // matcher publishes it, the send once it is consumed, and a break waits
    // for the matcher (seal) before anything is flushed. Nothing else
    // writes the receive's memory meanwhile (`Nic::register` contract).
    unsafe { msg.copy_to(recv.iter()) }
}

/// Whether an end whose request failed with `status` found the error itself
/// (a local transport failure) rather than being told by the peer.
fn detected_locally(status: WcStatus) -> bool {
    !matches!(
        status,
        WcStatus::RemoteAccessError | WcStatus::RemoteInvalidRequest | WcStatus::RemoteDisconnected
    )
}
