//! Reliable-connected queue pairs: the posting side of one end of a
//! [`Link`]. A post runs under the end's post lock, checks its entries
//! against the NIC's regions (through the end's [`LkeyCache`]), and either
//! queues a message in the outgoing cell ring or executes an RDMA request at
//! once; every accepted post takes one slot of the send or receive queue,
//! where its completion is found when the end's CQ is polled.
//!
//! [`LkeyCache`]: crate::fabric::lkey_cache::LkeyCache

#[cfg(feature = "fault-injection")]
use super::fault::Verdict;
use super::link::{Cause, Link, Posted, Poster};
use super::mr::total_len;
use super::wq::{SqEntry, SqKind};
use crate::fabric::*;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One end of a connection.
pub(super) struct SoftQp {
    pub(super) link: Arc<Link>,
    /// 0 (connector) or 1 (acceptor).
    pub(super) end: usize,
}

pub(super) fn opcode_of(op: &SendOp) -> WcOpcode {
    match op {
        SendOp::Send => WcOpcode::Send,
        SendOp::RdmaWrite { .. } => WcOpcode::RdmaWrite,
        SendOp::RdmaRead { .. } => WcOpcode::RdmaRead,
    }
}

impl SoftQp {
    fn me(&self) -> usize {
        self.end
    }

    /// Queues a send as a message of the outgoing ring; the status of an
    /// immediate failure otherwise. `Err(None)`: the ring is full (nothing
    /// done).
    fn send(&self, p: &mut Poster, wr: &SendWr<'_>) -> Result<(u64, u32), Option<WcStatus>> {
        let link = &*self.link;
        let (me, peer) = (self.me(), 1 - self.me());
        let len = total_len(wr.sges).ok_or(Some(WcStatus::LocalLengthError))?;
        if !link.nics[me]
            .pd
            .check_cached(&mut p.lkeys, link.nums[me], wr.sges, Access::NONE)
        {
            return Err(Some(WcStatus::LocalProtectionError));
        }
        // Receiver not ready: this send waits if the peer has no receive
        // left for it, and fails if `rnr_max` sends wait already. The cached
        // count of the peer's receives can only under-count, so the peer's
        // line is read only when the cached one says the bound may be hit.
        let tail = p.cells.tail();
        let rnr_max = link.ends[peer].rnr_max;
        if tail >= p.peer_posted + rnr_max {
            p.peer_posted = link.ends[peer].rq.posted();
            if tail >= p.peer_posted + rnr_max {
                return Err(Some(WcStatus::RnrRetryExceeded));
            }
        }
        // Piggybacked: what this end consumed of the peer's messages.
        let ack = link.dirs[peer].ring.consumed();
        // SAFETY: the entries were just checked against this NIC's regions
        // and stay registered for the call (the post lock is held, which a
        // deregistration waits for); `len` is their total.
        let index = unsafe { p.cells.push(wr.sges, len, ack) }.ok_or(None)?;
        Ok((index, len))
    }

    /// Executes an RDMA request a fault cuts short: `Partial` moves the
    /// first bytes of the local entries (up to the budget), `BadRkey` fails
    /// the remote-key check. Returns the completion's status.
    #[cfg(feature = "fault-injection")]
    fn rdma_fault(
        &self,
        p: &mut Poster,
        local: &[Sge],
        remote_addr: u64,
        rkey: u32,
        write: bool,
        v: Verdict,
    ) -> WcStatus {
        let Verdict::Partial(budget, status) = v else {
            return WcStatus::RemoteAccessError;
        };
        let mut cut = [Sge {
            addr: 0,
            len: 0,
            lkey: 0,
        }; super::MAX_SGE_LIMIT as usize];
        let (mut n, mut left) = (0, budget);
        for s in local {
            if left == 0 {
                break;
            }
            cut[n] = Sge {
                len: s.len.min(left),
                ..*s
            };
            left -= cut[n].len;
            n += 1;
        }
        // Whatever the prefix met (even its own error) the request fails
        // with the armed status: the queue pair went to error mid-request.
        let _ = self
            .link
            .rdma(self.me(), p, &cut[..n], remote_addr, rkey, write);
        status
    }

    fn post_send_locked(&self, p: &mut Poster, wr: &SendWr<'_>) -> Result<Posted, PostError> {
        let me = self.me();
        let link = &*self.link;
        if !p.sq_room(link.ends[me].send_depth) {
            return Err(PostError::QueueFull);
        }
        let opcode = opcode_of(&wr.op);
        let done = |p: &mut Poster, status, len| {
            p.sq.push(
                &p.queues,
                SqEntry {
                    wr_id: wr.wr_id,
                    opcode,
                    kind: SqKind::Done { status, len },
                },
            )
        };
        if let Some(status) = link.post_status(me) {
            done(p, status, 0);
            return Ok(Posted::default());
        }
        #[cfg(feature = "fault-injection")]
        let mut partial = None;
        #[cfg(feature = "fault-injection")]
        if link.faults_armed[me].load(Ordering::Relaxed) {
            match link.fault_send(p, me, wr, opcode) {
                Verdict::Proceed => {}
                Verdict::Done(posted) => return Ok(posted),
                v => partial = Some(v),
            }
        }
        let mut posted = Posted::default();
        match wr.op {
            SendOp::Send => match self.send(p, wr) {
                Ok((index, len)) => {
                    p.sends.push(
                        &p.queues,
                        SqEntry {
                            wr_id: wr.wr_id,
                            opcode,
                            kind: SqKind::Cell { index, len },
                        },
                    );
                    posted.to_peer = true;
                }
                Err(None) => return Err(PostError::QueueFull),
                Err(Some(status)) => {
                    done(p, status, 0);
                    posted.fail = Some(status);
                }
            },
            SendOp::RdmaWrite { remote_addr, rkey } | SendOp::RdmaRead { remote_addr, rkey } => {
                let write = matches!(wr.op, SendOp::RdmaWrite { .. });
                #[cfg(feature = "fault-injection")]
                if let Some(v) = partial {
                    let status = self.rdma_fault(p, wr.sges, remote_addr, rkey, write, v);
                    done(p, status, 0);
                    posted.fail = Some(status);
                    return Ok(posted);
                }
                match link.rdma(me, p, wr.sges, remote_addr, rkey, write) {
                    Ok(len) => done(p, WcStatus::Success, len),
                    Err(status) => {
                        done(p, status, 0);
                        if link.is_intact() {
                            posted.fail = Some(status);
                        }
                    }
                }
            }
        }
        Ok(posted)
    }

    fn post_recv_locked(&self, p: &mut Poster, wr: &RecvWr<'_>) -> Result<Posted, PostError> {
        let me = self.me();
        let link = &*self.link;
        if !p.rq.room(&p.queues) {
            return Err(PostError::QueueFull);
        }
        if let Some(status) = link.post_status(me) {
            p.rq.push(&p.queues, wr.wr_id, &[], Some(status));
            return Ok(Posted::default());
        }
        #[cfg(feature = "fault-injection")]
        if link.faults_armed[me].load(Ordering::Relaxed) {
            if let Verdict::Done(posted) = link.fault_recv(p, me, wr) {
                return Ok(posted);
            }
        }
        if !link.nics[me]
            .pd
            .check_cached(&mut p.lkeys, link.nums[me], wr.sges, Access::LOCAL_WRITE)
        {
            let status = WcStatus::LocalProtectionError;
            p.rq.push(&p.queues, wr.wr_id, &[], Some(status));
            return Ok(Posted {
                fail: Some(status),
                to_peer: false,
            });
        }
        p.rq.push(&p.queues, wr.wr_id, wr.sges, None);
        // A held message may match now, by us or (helping) by the peer.
        Ok(Posted {
            fail: None,
            to_peer: true,
        })
    }

    /// After the post lock is released: break on failure, wake who sleeps.
    /// Inlined into both posts: a call's saves and restores cost more than
    /// its body.
    #[inline(always)]
    fn finish(&self, r: Result<Posted, PostError>) -> Result<(), PostError> {
        let posted = r?;
        let me = self.me();
        if let Some(status) = posted.fail {
            self.link.fail(me, Cause::Failed(status));
        }
        let mut which = [false; 2];
        which[me] = true;
        which[1 - me] = posted.to_peer;
        self.link.wake(which);
        Ok(())
    }
}

impl QueuePair for SoftQp {
    fn num(&self) -> QpNum {
        self.link.nums[self.end]
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.link.addrs[self.end]
    }

    fn peer_addr(&self) -> SocketAddrV4 {
        self.link.addrs[1 - self.end]
    }

    fn post_send(&self, wr: &SendWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.link.ends[self.end].max_sge {
            return Err(PostError::TooManySge);
        }
        let r = self.post_send_locked(&mut self.link.ends[self.end].post.lock(), wr);
        self.finish(r)
    }

    fn post_recv(&self, wr: &RecvWr<'_>) -> Result<(), PostError> {
        if wr.sges.len() > self.link.ends[self.end].max_sge {
            return Err(PostError::TooManySge);
        }
        let r = self.post_recv_locked(&mut self.link.ends[self.end].post.lock(), wr);
        self.finish(r)
    }

    fn set_error(&self) {
        self.link.close(self.end);
    }

    /// The seal that `set_error` waits for already stops this NIC for
    /// good: no RDMA or copy starts on a broken link, and a post completes
    /// at once with the end's error status.
    fn abandon(&self) {
        self.set_error();
    }
}

impl Drop for SoftQp {
    fn drop(&mut self) {
        self.set_error();
        let link = &*self.link;
        let end = &link.ends[self.end];
        link.nics[self.end].forget_qp(link.nums[self.end]);
        link.cqs[self.end].budget.release(end.reserved);
        end.dropped.store(true, Ordering::Release);
        // The CQ forgets a drained end at its next poll.
        link.wake([self.end == 0, self.end == 1]);
    }
}
