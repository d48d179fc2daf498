//! A simulated fabric between two protocol machines: receive queues, RC
//! in-order wires, send/receive/RDMA completion queues, exposures with
//! access checks, application buffers. Every step is an explicit event, so
//! tests choose the delivery order (scripted, FIFO or seeded random). The
//! simulator checks the rules the real provider enforces or relies on:
//! a message after negotiation must find a posted receive (the provider
//! holds only the connector's HELLO), messages fit the receive buffer, a
//! ring write targets the peer's ring within its bounds and lands before
//! the DATA sent after it (same wire, in order), RDMA uses a live exposure
//! with the right access and bounds, an application
//! buffer is not released while an RDMA op or exposure still uses it, and
//! (independently of the machines' own counts) no side sends without credit
//! or spends its last credit on a message that returns none, and no side
//! announces a receive it has not posted: whenever a side sends a header
//! or a message lands in one of its receives, its posted receives cover
//! every counted message the peer may still send.

use sanpath::switch::proto::*;
use std::collections::{HashMap, VecDeque};

pub const ABORTED: u32 = 995;
pub const RESET: u32 = 10054;
pub const NOTSOCK: u32 = 10038;

/// xorshift64*: deterministic schedules from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The byte at stream offset `off` of side `side`'s outgoing stream.
pub fn pattern(side: usize, off: u64) -> u8 {
    (off.wrapping_mul(31) ^ (off >> 9) ^ (side as u64 * 0x5B)) as u8
}

pub struct Wire {
    pub bytes: Vec<u8>,
    pub send_slot: u16,
    /// A ring write to this offset of the peer's ring (not a message).
    pub ring: Option<u32>,
    /// Its completion is reported to the machine (a message, or a direct
    /// ring write; a staged ring write is covered by its DATA's send).
    pub report: bool,
}

#[derive(Debug)]
pub struct RdmaJob {
    pub rdma: u16,
    pub write: bool,
    pub op: OpId,
    pub op_offset: u64,
    pub len: u32,
    pub desc: Desc,
    pub remote_offset: u32,
}

pub struct Exp {
    pub op: OpId,
    pub offset: u64,
    pub len: u32,
    pub access: Access,
}

/// One application op as the simulated app sees it.
pub struct AppOp {
    pub send: bool,
    pub buf: Vec<u8>,
}

#[derive(Default)]
pub struct Side {
    pub m: Option<Connection>,
    pub cfg: Config,
    pub recv_mem: Vec<Vec<u8>>,
    /// The receive ring the peer writes into.
    pub ring_mem: Vec<u8>,
    pub posted: VecDeque<u16>,
    /// Messages that found no posted receive (the provider holds them).
    pub held: VecDeque<Wire>,
    pub recv_cq: VecDeque<(u16, Result<Vec<u8>, u32>)>,
    pub send_cq: VecDeque<(u16, Result<(), u32>)>,
    pub ring_cq: VecDeque<(u16, Result<(), u32>)>,
    /// Ring writes in flight that read their send op's buffer itself
    /// (`direct`), by send buffer: the op may not complete before them.
    pub direct_ring: HashMap<u16, OpId>,
    pub rdma_jobs: VecDeque<RdmaJob>,
    pub rdma_cq: VecDeque<(u16, Result<(), u32>)>,
    pub exposures: HashMap<u64, Exp>,
    pub ops: HashMap<OpId, AppOp>,
    pub results: Vec<(OpId, bool, Result<u64, Error>)>,
    pub connected: bool,
    pub aborted: Option<Error>,
    /// Our socket was closed (abort): posts fail.
    pub closed: bool,
    /// The peer closed: the connection is down, posts complete in error.
    pub disconnected: bool,
    pub received: Vec<u8>,
    pub eof: bool,
    pub violations: Vec<String>,
    // Independent credit accounting from the messages themselves.
    pub sim_sent: i64,
    pub sim_peer_announced: i64,
    /// Receives this side announced (HELLO and `credits` fields sent).
    pub sim_announced: i64,
    /// Counted messages that landed in this side's receives.
    pub sim_landed: i64,
    pub held_non_hello: usize,
}

impl Side {
    pub fn m(&mut self) -> &mut Connection {
        self.m.as_mut().expect("machine created")
    }
}

pub struct Sim {
    pub sides: [Side; 2],
    /// `wires[i]`: messages from side i not yet delivered.
    pub wires: [VecDeque<Wire>; 2],
    pub next_op: u64,
    pub steps: u64,
}

fn desc_for(side: usize, xfer: u64) -> Desc {
    let mut d = [0u8; DESC_LEN];
    d[0..4].copy_from_slice(b"SIMD");
    d[4] = side as u8;
    d[8..16].copy_from_slice(&xfer.to_le_bytes());
    d
}

fn desc_parse(d: &Desc) -> Option<(usize, u64)> {
    (&d[0..4] == b"SIMD").then(|| {
        (
            usize::from(d[4]),
            u64::from_le_bytes(d[8..16].try_into().unwrap()),
        )
    })
}

/// The descriptor of side `side`'s receive ring.
pub fn ring_desc(side: usize) -> Desc {
    desc_for(side, 0)
}

/// Events a scheduler may pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ev {
    Deliver(usize),
    RecvCq(usize),
    SendCq(usize),
    RingCq(usize),
    RdmaExec(usize),
    RdmaCq(usize),
    StartAcceptor,
}

impl Sim {
    /// Side 0 connects (HELLO goes on the wire at once); side 1's machine
    /// is created by `start_acceptor` (or at once with `accept_now`).
    pub fn new(a: Config, b: Config, accept_now: bool) -> Sim {
        let mut sim = Sim {
            sides: [Side::default(), Side::default()],
            wires: [VecDeque::new(), VecDeque::new()],
            next_op: 1,
            steps: 0,
        };
        for (i, cfg) in [a, b].into_iter().enumerate() {
            sim.sides[i].recv_mem = vec![vec![0; cfg.slot_size as usize]; cfg.recv_slots.into()];
            sim.sides[i].ring_mem = vec![0; cfg.ring_size as usize];
            sim.sides[i].cfg = cfg;
        }
        sim.sides[0].m =
            Some(Connection::new(sim.sides[0].cfg.clone(), Role::Connector, ring_desc(0)).unwrap());
        sim.drain(0);
        if accept_now {
            sim.start_acceptor();
        }
        sim
    }

    pub fn start_acceptor(&mut self) {
        assert!(self.sides[1].m.is_none());
        self.sides[1].m =
            Some(Connection::new(self.sides[1].cfg.clone(), Role::Acceptor, ring_desc(1)).unwrap());
        self.drain(1);
    }

    pub fn m(&mut self, i: usize) -> &mut Connection {
        self.sides[i].m()
    }

    pub fn violations(&self) -> Vec<String> {
        self.sides
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.violations.iter().map(move |v| format!("side {i}: {v}")))
            .collect()
    }

    fn violation(&mut self, i: usize, v: String) {
        self.sides[i].violations.push(v);
    }

    /// Executes every pending action of side `i`.
    pub fn drain(&mut self, i: usize) {
        while let Some(a) = self.sides[i].m.as_mut().and_then(Connection::poll_action) {
            self.exec(i, a);
        }
    }

    fn exec(&mut self, i: usize, a: Action) {
        let peer = 1 - i;
        match a {
            Action::PostRecv { slot } => {
                let s = &mut self.sides[i];
                if s.closed {
                    s.m().recv_done(slot, Err(NOTSOCK));
                } else if s.disconnected {
                    s.recv_cq.push_back((slot, Err(RESET)));
                } else {
                    if s.posted.contains(&slot) {
                        self.violation(i, format!("slot {slot} posted twice"));
                    }
                    self.sides[i].posted.push_back(slot);
                    if let Some(w) = self.sides[i].held.pop_front() {
                        self.land(peer, i, w);
                    }
                }
            }
            Action::RingWrite {
                slot,
                payload: p,
                ring_offset,
                desc,
                direct,
            } => {
                if direct {
                    self.sides[i].direct_ring.insert(slot, p.op);
                }
                let bytes = match self.sides[i].ops.get(&p.op) {
                    Some(op) if op.send => {
                        let end = p.offset as usize + p.len as usize;
                        if end > op.buf.len() {
                            self.violation(i, format!("payload beyond op buffer {p:?}"));
                            return;
                        }
                        op.buf[p.offset as usize..end].to_vec()
                    }
                    _ => {
                        self.violation(i, format!("payload of a dead op {p:?}"));
                        return;
                    }
                };
                if desc != ring_desc(peer) {
                    self.violation(
                        i,
                        "ring write to another buffer than the peer's ring".into(),
                    );
                }
                let s = &mut self.sides[i];
                if s.closed {
                    if direct {
                        s.direct_ring.remove(&slot);
                        s.m().ring_write_done(slot, Err(NOTSOCK));
                    }
                } else if s.disconnected {
                    if direct {
                        s.ring_cq.push_back((slot, Err(RESET)));
                    }
                } else {
                    self.wires[i].push_back(Wire {
                        bytes,
                        send_slot: slot,
                        ring: Some(ring_offset),
                        report: direct,
                    });
                }
            }
            Action::Send { .. } | Action::SendInline { .. } => {
                let (slot, payload, report) = match a {
                    Action::Send { slot, report } => (slot, None, report),
                    Action::SendInline {
                        slot,
                        payload,
                        report,
                    } => (slot, Some(payload), report),
                    _ => unreachable!(),
                };
                // A send buffer's record is posted again only once its send
                // completed (reported, or covered by a later report).
                let in_flight = self.wires[i]
                    .iter()
                    .any(|w| w.ring.is_none() && w.send_slot == slot)
                    || self.sides[peer].held.iter().any(|w| w.send_slot == slot);
                if in_flight {
                    self.violation(i, format!("send buffer {slot} posted while its send flies"));
                }
                let mut bytes = self.sides[i].m().head(slot).to_vec();
                if let Some(p) = payload {
                    match self.sides[i].ops.get(&p.op) {
                        Some(op)
                            if op.send && p.offset + u64::from(p.len) <= op.buf.len() as u64 =>
                        {
                            let at = p.offset as usize;
                            bytes.extend_from_slice(&op.buf[at..at + p.len as usize]);
                        }
                        _ => {
                            self.violation(i, format!("inline payload of a bad op {p:?}"));
                            return;
                        }
                    }
                }
                self.check_credit_rule(i, &bytes);
                let s = &mut self.sides[i];
                if bytes.len() > s.cfg.slot_size as usize {
                    self.violation(i, format!("message of {} bytes", bytes.len()));
                }
                let s = &mut self.sides[i];
                if s.closed {
                    s.m().send_done(slot, Err(NOTSOCK));
                } else if s.disconnected {
                    if report {
                        s.send_cq.push_back((slot, Err(RESET)));
                    }
                } else {
                    self.check_announced(i, &bytes);
                    self.wires[i].push_back(Wire {
                        bytes,
                        send_slot: slot,
                        ring: None,
                        report,
                    });
                }
            }
            Action::CopyOut {
                ring_offset,
                op,
                op_offset,
                len,
            } => {
                let end = ring_offset as usize + len as usize;
                if end > self.sides[i].ring_mem.len() {
                    self.violation(i, format!("copy-out beyond the ring: {ring_offset}+{len}"));
                    return;
                }
                let src = self.sides[i].ring_mem[ring_offset as usize..end].to_vec();
                match self.sides[i].ops.get_mut(&op) {
                    Some(o) if !o.send => {
                        o.buf[op_offset as usize..op_offset as usize + len as usize]
                            .copy_from_slice(&src);
                    }
                    _ => self.violation(i, format!("copy into a dead op {op:?}")),
                }
            }
            Action::CopyInline {
                slot,
                slot_offset,
                op,
                op_offset,
                len,
            } => {
                let s = &self.sides[i];
                if s.posted.contains(&slot) {
                    self.violation(i, format!("copy-out of posted receive {slot}"));
                    return;
                }
                let end = slot_offset as usize + len as usize;
                let Some(mem) = s.recv_mem.get(usize::from(slot)).filter(|m| end <= m.len()) else {
                    self.violation(i, format!("copy-out beyond receive {slot}: {end}"));
                    return;
                };
                let src = mem[slot_offset as usize..end].to_vec();
                match self.sides[i].ops.get_mut(&op) {
                    Some(o) if !o.send => {
                        o.buf[op_offset as usize..op_offset as usize + len as usize]
                            .copy_from_slice(&src);
                    }
                    _ => self.violation(i, format!("copy into a dead op {op:?}")),
                }
            }
            Action::Expose {
                xfer,
                op,
                offset,
                len,
                access,
            } => {
                let ok = match self.sides[i].ops.get(&op) {
                    Some(o) => {
                        o.send == (access == Access::Read)
                            && offset + u64::from(len) <= o.buf.len() as u64
                    }
                    None => false,
                };
                if !ok {
                    self.violation(i, format!("bad exposure of {op:?}"));
                }
                self.sides[i].exposures.insert(
                    xfer,
                    Exp {
                        op,
                        offset,
                        len,
                        access,
                    },
                );
                self.sides[i].m().exposed(xfer, Ok(desc_for(i, xfer)));
            }
            Action::Unexpose { xfer, desc } => {
                if desc != desc_for(i, xfer) || self.sides[i].exposures.remove(&xfer).is_none() {
                    self.violation(i, format!("unexpose of unknown {xfer}"));
                }
            }
            Action::RdmaRead {
                rdma,
                op,
                op_offset,
                len,
                desc,
                remote_offset,
            }
            | Action::RdmaWrite {
                rdma,
                op,
                op_offset,
                len,
                desc,
                remote_offset,
            } => {
                let write = matches!(a, Action::RdmaWrite { .. });
                let s = &mut self.sides[i];
                if s.closed {
                    s.m().rdma_done(rdma, Err(NOTSOCK));
                } else if s.disconnected {
                    s.rdma_cq.push_back((rdma, Err(RESET)));
                } else {
                    s.rdma_jobs.push_back(RdmaJob {
                        rdma,
                        write,
                        op,
                        op_offset,
                        len,
                        desc,
                        remote_offset,
                    });
                }
            }
            Action::SendComplete { op, result } | Action::RecvComplete { op, result } => {
                let send = matches!(a, Action::SendComplete { .. });
                let in_use = self.sides[i].exposures.values().any(|e| e.op == op)
                    || self.sides[i].rdma_jobs.iter().any(|j| j.op == op)
                    || self.sides[i].direct_ring.values().any(|o| *o == op);
                if in_use {
                    self.violation(i, format!("{op:?} completed while the fabric uses it"));
                }
                let Some(o) = self.sides[i].ops.remove(&op) else {
                    self.violation(i, format!("completion of unknown {op:?}"));
                    return;
                };
                if o.send != send {
                    self.violation(i, format!("{op:?} completed as the wrong kind"));
                }
                if !send {
                    match result {
                        Ok(0) => self.sides[i].eof = true,
                        Ok(n) => {
                            if self.sides[i].eof {
                                self.violation(i, "data after end of stream".into());
                            }
                            let s = &mut self.sides[i];
                            s.received.extend_from_slice(&o.buf[..n as usize]);
                        }
                        Err(_) => {}
                    }
                }
                self.sides[i].results.push((op, send, result));
            }
            Action::Connected => self.sides[i].connected = true,
            Action::Abort { error } => {
                self.sides[i].aborted = Some(error);
                self.close(i);
            }
        }
    }

    /// Local close of side `i` (what `close_socket` does to the fabric).
    pub fn close(&mut self, i: usize) {
        if self.sides[i].closed {
            return;
        }
        let peer = 1 - i;
        let s = &mut self.sides[i];
        s.closed = true;
        for slot in std::mem::take(&mut s.posted) {
            s.recv_cq.push_back((slot, Err(ABORTED)));
        }
        for j in std::mem::take(&mut s.rdma_jobs) {
            s.rdma_cq.push_back((j.rdma, Err(ABORTED)));
        }
        s.exposures.clear();
        for w in std::mem::take(&mut self.wires[i])
            .into_iter()
            .filter(|w| w.report)
        {
            let s = &mut self.sides[i];
            let cq = if w.ring.is_some() {
                &mut s.ring_cq
            } else {
                &mut s.send_cq
            };
            cq.push_back((w.send_slot, Err(ABORTED)));
        }
        for w in std::mem::take(&mut self.sides[i].held) {
            if w.report {
                self.sides[peer]
                    .send_cq
                    .push_back((w.send_slot, Err(RESET)));
            }
        }
        // The peer learns of the teardown.
        let p = &mut self.sides[peer];
        if !p.closed && !p.disconnected {
            p.disconnected = true;
            for slot in std::mem::take(&mut p.posted) {
                p.recv_cq.push_back((slot, Err(RESET)));
            }
            for j in std::mem::take(&mut p.rdma_jobs) {
                p.rdma_cq.push_back((j.rdma, Err(RESET)));
            }
            for w in std::mem::take(&mut self.wires[peer])
                .into_iter()
                .filter(|w| w.report)
            {
                let p = &mut self.sides[peer];
                let cq = if w.ring.is_some() {
                    &mut p.ring_cq
                } else {
                    &mut p.send_cq
                };
                cq.push_back((w.send_slot, Err(RESET)));
            }
        }
        if let Some(m) = self.sides[i].m.as_mut() {
            m.closed();
        }
        self.drain(i);
    }

    /// Independent check of the credit rules from the bytes sent.
    fn check_credit_rule(&mut self, i: usize, bytes: &[u8]) {
        let Ok(m) = Message::decode(bytes, bytes.len()) else {
            self.violation(i, "sent an undecodable message".into());
            return;
        };
        let counted = match m.body {
            Body::Hello { .. } => self.sides[i].m.as_ref().unwrap().role() == Role::Acceptor,
            Body::Need | Body::CreditAck => false,
            _ => true,
        };
        if counted {
            let s = &mut self.sides[i];
            s.sim_sent += 1;
            let left = s.sim_peer_announced - s.sim_sent;
            // The acceptor's HELLO is sent knowing the connector's count.
            if left < 0 {
                self.violation(i, format!("sent {m:?} without credit"));
            } else if left == 0 && m.credits == 0 {
                self.violation(i, format!("spent the last credit on {m:?}"));
            }
        }
    }

    /// Side `i` sends `bytes`: the receives it announced, this header's
    /// included, must all be posted, but for those the peer's counted
    /// messages already took.
    fn check_announced(&mut self, i: usize, bytes: &[u8]) {
        let Ok(m) = Message::decode(bytes, bytes.len()) else {
            return;
        };
        let s = &mut self.sides[i];
        s.sim_announced += i64::from(m.credits);
        if let Body::Hello { recv_slots, .. } = m.body {
            s.sim_announced += i64::from(recv_slots);
        }
        self.check_posted(i, &format!("sending {m:?}"));
    }

    /// Side `i`'s posted receives cover every counted message its peer may
    /// still send (`when` names the event).
    fn check_posted(&mut self, i: usize, when: &str) {
        let s = &self.sides[i];
        let owed = s.sim_announced - s.sim_landed;
        if (s.posted.len() as i64) < owed {
            let posted = s.posted.len();
            self.violation(
                i,
                format!("{owed} receives announced, {posted} posted, {when}"),
            );
        }
    }

    /// Message `w` from side `from` lands in side `to`'s next posted receive.
    fn land(&mut self, from: usize, to: usize, w: Wire) {
        let t = &mut self.sides[to];
        let slot = t.posted.pop_front().expect("caller checked");
        let mem = &mut t.recv_mem[usize::from(slot)];
        if w.bytes.len() > mem.len() {
            self.violation(to, "message longer than the receive buffer".into());
            return;
        }
        mem[..w.bytes.len()].copy_from_slice(&w.bytes);
        if let Ok(m) = Message::decode(&w.bytes, w.bytes.len()) {
            // `from`'s announcements are `to`'s credits.
            self.sides[to].sim_peer_announced += i64::from(m.credits);
            if let Body::Hello { recv_slots, .. } = m.body {
                self.sides[to].sim_peer_announced += i64::from(recv_slots);
            }
            let counted = match m.body {
                // Side 1 accepts: its HELLO is counted.
                Body::Hello { .. } => from == 1,
                Body::Need | Body::CreditAck => false,
                _ => true,
            };
            if counted {
                self.sides[to].sim_landed += 1;
            }
            self.check_posted(to, &format!("after {m:?} landed"));
        }
        self.sides[to].recv_cq.push_back((slot, Ok(w.bytes)));
        if w.report {
            self.sides[from].send_cq.push_back((w.send_slot, Ok(())));
        }
    }

    fn deliver(&mut self, from: usize) {
        let to = 1 - from;
        let w = self.wires[from].pop_front().expect("caller checked");
        if let Some(at) = w.ring {
            let result = if self.sides[to].closed {
                Err(RESET)
            } else {
                let end = at as usize + w.bytes.len();
                let ring = &mut self.sides[to].ring_mem;
                if end > ring.len() {
                    self.violation(from, format!("ring write beyond the peer's ring: {end}"));
                    Err(RESET)
                } else {
                    ring[at as usize..end].copy_from_slice(&w.bytes);
                    Ok(())
                }
            };
            if w.report {
                self.sides[from].ring_cq.push_back((w.send_slot, result));
            }
            return;
        }
        if self.sides[to].closed {
            if w.report {
                self.sides[from]
                    .send_cq
                    .push_back((w.send_slot, Err(RESET)));
            }
            return;
        }
        if self.sides[to].posted.is_empty() {
            let is_hello = matches!(
                Message::decode(&w.bytes, w.bytes.len()),
                Ok(Message {
                    body: Body::Hello { .. },
                    ..
                })
            );
            if !is_hello {
                self.sides[to].held_non_hello += 1;
                self.violation(to, "a message found no posted receive".into());
            }
            self.sides[to].held.push_back(w);
            return;
        }
        self.land(from, to, w);
    }

    fn rdma_exec(&mut self, i: usize) {
        let peer = 1 - i;
        let j = self.sides[i].rdma_jobs.pop_front().expect("caller checked");
        let target = desc_parse(&j.desc)
            .filter(|(side, _)| *side == peer)
            .and_then(|(_, xfer)| self.sides[peer].exposures.get(&xfer));
        let ok = match target {
            Some(e)
                if e.access == if j.write { Access::Write } else { Access::Read }
                    && u64::from(j.remote_offset) + u64::from(j.len) <= u64::from(e.len) =>
            {
                let (rop, roff) = (e.op, e.offset + u64::from(j.remote_offset));
                if j.write {
                    let src = self.sides[i].ops[&j.op].buf
                        [j.op_offset as usize..(j.op_offset + u64::from(j.len)) as usize]
                        .to_vec();
                    self.sides[peer].ops.get_mut(&rop).unwrap().buf
                        [roff as usize..roff as usize + src.len()]
                        .copy_from_slice(&src);
                } else {
                    let src = self.sides[peer].ops[&rop].buf
                        [roff as usize..(roff + u64::from(j.len)) as usize]
                        .to_vec();
                    self.sides[i].ops.get_mut(&j.op).unwrap().buf
                        [j.op_offset as usize..j.op_offset as usize + src.len()]
                        .copy_from_slice(&src);
                }
                true
            }
            _ => false,
        };
        if ok {
            self.sides[i].rdma_cq.push_back((j.rdma, Ok(())));
        } else {
            self.violation(i, format!("RDMA without a valid exposure: {j:?}"));
            self.sides[i].rdma_cq.push_back((j.rdma, Err(RESET)));
        }
    }

    /// Enabled fabric events.
    pub fn enabled(&self) -> Vec<Ev> {
        let mut v = Vec::new();
        if self.sides[1].m.is_none() {
            v.push(Ev::StartAcceptor);
        }
        for i in 0..2 {
            if self.sides[i].m.is_none() {
                continue;
            }
            if !self.wires[i].is_empty() {
                v.push(Ev::Deliver(i));
            }
            let s = &self.sides[i];
            if !s.recv_cq.is_empty() {
                v.push(Ev::RecvCq(i));
            }
            if !s.send_cq.is_empty() {
                v.push(Ev::SendCq(i));
            }
            if !s.ring_cq.is_empty() {
                v.push(Ev::RingCq(i));
            }
            if !s.rdma_jobs.is_empty() {
                v.push(Ev::RdmaExec(i));
            }
            if !s.rdma_cq.is_empty() {
                v.push(Ev::RdmaCq(i));
            }
        }
        v
    }

    pub fn step(&mut self, ev: Ev) {
        self.steps += 1;
        match ev {
            Ev::StartAcceptor => self.start_acceptor(),
            Ev::Deliver(i) => self.deliver(i),
            Ev::RdmaExec(i) => self.rdma_exec(i),
            Ev::RecvCq(i) => {
                let (slot, r) = self.sides[i].recv_cq.pop_front().unwrap();
                match r {
                    Ok(bytes) => {
                        let n = bytes.len();
                        self.m(i).recv_done(slot, Ok((&bytes, n)));
                    }
                    Err(c) => self.m(i).recv_done(slot, Err(c)),
                }
                self.drain(i);
            }
            Ev::SendCq(i) => {
                let (slot, r) = self.sides[i].send_cq.pop_front().unwrap();
                self.m(i).send_done(slot, r);
                self.drain(i);
            }
            Ev::RingCq(i) => {
                let (slot, r) = self.sides[i].ring_cq.pop_front().unwrap();
                self.sides[i].direct_ring.remove(&slot);
                self.m(i).ring_write_done(slot, r);
                self.drain(i);
            }
            Ev::RdmaCq(i) => {
                let (rdma, r) = self.sides[i].rdma_cq.pop_front().unwrap();
                self.m(i).rdma_done(rdma, r);
                self.drain(i);
            }
        }
    }

    /// Runs fabric events (first enabled each time) until none is left.
    pub fn settle(&mut self) {
        while let Some(&ev) = self.enabled().first() {
            self.step(ev);
        }
    }

    // ------------------------------------------------------------------
    // Application side
    // ------------------------------------------------------------------

    fn new_op(&mut self) -> OpId {
        let id = OpId(self.next_op);
        self.next_op += 1;
        id
    }

    /// Side `i` sends `len` bytes of its stream starting at `stream_off`.
    pub fn app_send(&mut self, i: usize, stream_off: u64, len: usize, nonblocking: bool) -> OpId {
        self.app_send_actions(i, stream_off, len, nonblocking).0
    }

    /// [`Sim::app_send`], also returning the actions side `i` yielded for
    /// it, in order (each executed before the next is polled).
    pub fn app_send_actions(
        &mut self,
        i: usize,
        stream_off: u64,
        len: usize,
        nonblocking: bool,
    ) -> (OpId, Vec<Action>) {
        let op = self.new_op();
        let buf = (0..len as u64)
            .map(|k| pattern(i, stream_off + k))
            .collect();
        self.sides[i].ops.insert(op, AppOp { send: true, buf });
        self.m(i).app_send(op, len as u64, nonblocking);
        (op, self.drain_seen(i))
    }

    pub fn app_recv(&mut self, i: usize, cap: usize, nonblocking: bool) -> OpId {
        self.app_recv_actions(i, cap, nonblocking).0
    }

    /// [`Sim::app_recv`], also returning the actions side `i` yielded for
    /// it, in order (each executed before the next is polled).
    pub fn app_recv_actions(
        &mut self,
        i: usize,
        cap: usize,
        nonblocking: bool,
    ) -> (OpId, Vec<Action>) {
        let op = self.new_op();
        self.sides[i].ops.insert(
            op,
            AppOp {
                send: false,
                buf: vec![0; cap],
            },
        );
        self.m(i).app_recv(op, cap as u64, nonblocking);
        (op, self.drain_seen(i))
    }

    /// [`Sim::drain`], returning the actions executed.
    fn drain_seen(&mut self, i: usize) -> Vec<Action> {
        let mut seen = Vec::new();
        while let Some(a) = self.sides[i].m.as_mut().and_then(Connection::poll_action) {
            seen.push(a);
            self.exec(i, a);
        }
        seen
    }

    pub fn result(&self, i: usize, op: OpId) -> Option<Result<u64, Error>> {
        self.sides[i]
            .results
            .iter()
            .find(|(o, _, _)| *o == op)
            .map(|(_, _, r)| *r)
    }

    /// The stream side `i` must have received from its peer, up to `len`.
    pub fn expected(&self, i: usize, len: usize) -> Vec<u8> {
        (0..len as u64).map(|k| pattern(1 - i, k)).collect()
    }
}

/// What the simulated applications do in a random run.
#[derive(Clone, Debug)]
pub struct Script {
    /// Send sizes of each side, and whether each is a `try_send`.
    pub sends: [Vec<(usize, bool)>; 2],
    /// Receive capacities cycled through by each side's reader.
    pub caps: [Vec<usize>; 2],
    /// Side 0 reads only after all its sends completed.
    pub write_then_read: bool,
    /// Sends a side may have pending at once.
    pub max_pending_sends: usize,
}

struct AppState {
    next_send: usize,
    /// Bytes of the current send item already issued.
    item_sent: u64,
    /// Stream offset of the next byte to issue.
    issue_off: u64,
    /// Pending blocking sends and the bytes each must report.
    pending_sends: Vec<(OpId, u64)>,
    pending_recv: Option<OpId>,
    recvs: usize,
    shut: bool,
    /// A non-blocking attempt would block: the next attempt blocks.
    force_blocking: bool,
}

/// Runs `script` with a schedule drawn from `seed` until both sides saw end
/// of stream; panics (with the machines' state) on a deadlock, a livelock,
/// a rule violation or a data mismatch.
pub fn run_random(mut sim: Sim, script: &Script, seed: u64) -> Sim {
    let mut rng = Rng::new(seed);
    let mut app: Vec<AppState> = (0..2)
        .map(|_| AppState {
            next_send: 0,
            item_sent: 0,
            issue_off: 0,
            pending_sends: Vec::new(),
            pending_recv: None,
            recvs: 0,
            shut: false,
            force_blocking: false,
        })
        .collect();
    let total: [u64; 2] = [0, 1].map(|i| script.sends[i].iter().map(|s| s.0 as u64).sum());
    let limit = 2_000_000u64;
    loop {
        // Collect results of the app's ops.
        for (i, a) in app.iter_mut().enumerate() {
            let mut k = 0;
            while k < a.pending_sends.len() {
                let (op, want) = a.pending_sends[k];
                match sim.result(i, op) {
                    None => k += 1,
                    Some(Ok(n)) if n == want => {
                        a.pending_sends.remove(k);
                    }
                    Some(r) => panic!("side {i} send of {want} bytes ended {r:?}"),
                }
            }
            if let Some(op) = a.pending_recv {
                match sim.result(i, op) {
                    None => {}
                    Some(Ok(_)) => a.pending_recv = None,
                    Some(Err(Error::WouldBlock)) => {
                        a.pending_recv = None;
                        a.force_blocking = true;
                    }
                    Some(Err(e)) => panic!("side {i} recv failed: {e}"),
                }
            }
        }
        let done =
            (0..2).all(|i| sim.sides[i].eof && app[i].shut && app[i].pending_sends.is_empty());
        if done {
            break;
        }
        // App events enabled now.
        let mut app_evs = Vec::new();
        for (i, a) in app.iter().enumerate() {
            if sim.sides[i].m.is_none() || !sim.sides[i].connected {
                continue;
            }
            let sends_left = a.next_send < script.sends[i].len();
            if sends_left && a.pending_sends.len() < script.max_pending_sends {
                app_evs.push((i, 0));
            }
            let all_sent = !sends_left && a.pending_sends.is_empty();
            if all_sent && !a.shut {
                app_evs.push((i, 1));
            }
            let reading = !(i == 0 && script.write_then_read && !all_sent);
            if reading && a.pending_recv.is_none() && !sim.sides[i].eof {
                app_evs.push((i, 2));
            }
        }
        let fabric = sim.enabled();
        let n = fabric.len() + app_evs.len();
        if n == 0 {
            let dump: Vec<String> = (0..2)
                .map(|i| format!("{:#?}", sim.sides[i].m.as_ref()))
                .collect();
            panic!(
                "deadlock after {} steps: received {:?} of {:?}; violations {:?}\n{}",
                sim.steps,
                [sim.sides[0].received.len(), sim.sides[1].received.len()],
                [total[1], total[0]],
                sim.violations(),
                dump.join("\n")
            );
        }
        assert!(sim.steps < limit, "livelock: {} steps", sim.steps);
        let pick = rng.below(n as u64) as usize;
        if pick < fabric.len() {
            sim.step(fabric[pick]);
            continue;
        }
        sim.steps += 1;
        let (i, what) = app_evs[pick - fabric.len()];
        let a = &mut app[i];
        match what {
            0 => {
                let (len, nb) = script.sends[i][a.next_send];
                let rest = len as u64 - a.item_sent;
                let nb = nb && !a.force_blocking && a.pending_sends.is_empty();
                a.force_blocking = false;
                let off = a.issue_off;
                let op = sim.app_send(i, off, rest as usize, nb);
                let a = &mut app[i];
                if nb {
                    match sim.result(i, op) {
                        Some(Ok(n)) => {
                            a.issue_off += n;
                            a.item_sent += n;
                        }
                        Some(Err(Error::WouldBlock)) => a.force_blocking = true,
                        r => panic!("side {i} try_send ended {r:?}"),
                    }
                } else {
                    a.pending_sends.push((op, rest));
                    a.issue_off += rest;
                    a.item_sent += rest;
                }
                if a.item_sent == len as u64 {
                    a.next_send += 1;
                    a.item_sent = 0;
                }
            }
            1 => {
                a.shut = true;
                sim.m(i).app_shutdown().expect("shutdown");
                sim.drain(i);
            }
            _ => {
                let caps = &script.caps[i];
                let cap = caps[a.recvs % caps.len()].max(1);
                let nb = a.recvs % 3 == 1 && !a.force_blocking;
                a.force_blocking = false;
                a.recvs += 1;
                let op = sim.app_recv(i, cap, nb);
                app[i].pending_recv = Some(op);
            }
        }
    }
    for i in 0..2 {
        let want = sim.expected(i, total[1 - i] as usize);
        assert!(
            sim.sides[i].received == want,
            "side {i} received {} bytes, differing from the {} sent",
            sim.sides[i].received.len(),
            want.len()
        );
    }
    let v = sim.violations();
    assert!(v.is_empty(), "rule violations: {v:?}");
    sim
}
