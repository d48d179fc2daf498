//! The reference switch's session protocol (`sanpath::switch::proto`) as a
//! state machine: two machines against a simulated fabric (`sim`), in
//! scripted delivery orders and in seeded random ones (proptest), plus
//! decoding of arbitrary bytes.

mod sim;

use proptest::prelude::*;
use sanpath::switch::proto::*;
use sim::*;

fn cfg() -> Config {
    Config {
        recv_slots: 8,
        send_slots: 8,
        slot_size: 512,
        ring_size: MIN_RING,
        rdma_threshold: 1000,
        max_rdma_op: 1 << 20,
        ..Config::default()
    }
}

fn cfg_write() -> Config {
    Config {
        rdma_flow: RdmaFlow::Write,
        ..cfg()
    }
}

fn connected(a: Config, b: Config) -> Sim {
    let mut s = Sim::new(a, b, true);
    s.settle();
    assert!(s.sides[0].connected && s.sides[1].connected);
    s
}

fn ok(sim: &Sim, i: usize, op: OpId) -> u64 {
    match sim.result(i, op) {
        Some(Ok(n)) => n,
        other => panic!("side {i} {op:?}: {other:?}"),
    }
}

fn no_violations(sim: &Sim) {
    let v = sim.violations();
    assert!(v.is_empty(), "violations: {v:?}");
}

// ----------------------------------------------------------------------
// Negotiation
// ----------------------------------------------------------------------

#[test]
fn hello_before_the_acceptor_posted_is_held_and_lands_later() {
    let mut s = Sim::new(cfg(), cfg(), false);
    // The connector's HELLO reaches a host whose switch has not accepted yet.
    s.step(Ev::Deliver(0));
    assert_eq!(s.sides[1].held.len(), 1, "the provider holds the HELLO");
    assert!(!s.sides[1].connected);
    s.start_acceptor();
    s.settle();
    assert!(s.sides[0].connected && s.sides[1].connected);
    assert_eq!(s.sides[1].held_non_hello, 0);
    no_violations(&s);
    // Initial credits: the acceptor's HELLO is counted, the connector's not.
    // 8 receives posted, 2 of them slack for NEED and CREDIT_ACK.
    assert_eq!(s.m(0).credits(), 6);
    assert_eq!(s.m(1).credits(), 5);
}

#[test]
fn a_peer_speaking_another_version_gets_a_clear_error() {
    let mut s = Sim::new(cfg(), cfg(), true);
    let r0 = s.app_recv(0, 10, false);
    // The connector's HELLO, as a peer of protocol version 9 would send it.
    let hello = s.wires[0].front_mut().expect("the connector's HELLO");
    assert_eq!(hello.bytes[2], VERSION);
    hello.bytes[2] = 9;
    s.settle();
    let e = s.sides[1]
        .aborted
        .expect("the acceptor refuses the session");
    assert_eq!(
        e,
        Error::VersionMismatch {
            ours: VERSION,
            theirs: 9
        }
    );
    let text = e.to_string();
    assert!(
        text.contains("version 9") && text.contains(&format!("version {VERSION}")),
        "{text}"
    );
    assert!(!s.sides[1].connected && !s.sides[0].connected);
    // The connector's pending receive ends with the reset, not a hang.
    assert_eq!(s.result(0, r0), Some(Err(Error::Transport(RESET))));
}

#[test]
fn acceptor_does_not_answer_before_the_hello() {
    let mut s = Sim::new(cfg(), cfg(), true);
    assert!(s.wires[1].is_empty(), "acceptor replies only to a HELLO");
    s.settle();
    assert!(s.sides[1].connected);
}

#[test]
fn data_before_connected_waits_for_the_hello() {
    let mut s = Sim::new(cfg(), cfg(), false);
    let op = s.app_send(0, 0, 10, false);
    assert!(
        s.wires[0].len() == 1,
        "only the HELLO goes before negotiation"
    );
    s.start_acceptor();
    s.settle();
    assert_eq!(ok(&s, 0, op), 10);
    let r = s.app_recv(1, 64, false);
    assert_eq!(ok(&s, 1, r), 10);
    assert_eq!(s.sides[1].received, s.expected(1, 10));
}

// ----------------------------------------------------------------------
// Data paths
// ----------------------------------------------------------------------

#[test]
fn small_payload_goes_in_data_messages_and_is_copied_out() {
    let mut s = connected(cfg(), cfg());
    let op = s.app_send(0, 0, 1000, false);
    assert_eq!(ok(&s, 0, op), 1000, "a copied send completes at once");
    s.settle();
    let mut got = 0;
    while got < 1000 {
        let r = s.app_recv(1, 300, false);
        s.settle();
        got += ok(&s, 1, r);
    }
    assert_eq!(s.sides[1].received, s.expected(1, 1000));
    let st = s.m(0).stats();
    assert_eq!(st.data_msgs, 1, "1000 bytes are one DATA through the ring");
    assert_eq!(st.msgs_sent, 1 + 1, "HELLO and the DATA");
    no_violations(&s);
}

/// The largest INLINE payload of two sides with `cfg()` buffers.
const INLINE_MAX: usize = 512 - HEADER_LEN;

#[test]
fn a_small_send_is_one_inline_message_held_in_its_receive_until_read() {
    let mut s = connected(cfg(), cfg());
    let op = s.app_send(0, 0, INLINE_MAX, false);
    assert_eq!(ok(&s, 0, op), INLINE_MAX as u64, "completes once copied");
    s.settle();
    let st = s.m(0).stats();
    assert_eq!((st.inline_msgs, st.data_msgs), (1, 1));
    assert_eq!(st.msgs_sent, 2, "HELLO and the INLINE: no ring write");
    let posted = s.sides[1].posted.len();
    // Read in pieces: the payload is copied out of the receive buffer,
    // which is re-posted only after its last byte.
    let mut got = 0;
    while got < INLINE_MAX as u64 {
        assert_eq!(s.sides[1].posted.len(), posted, "held while unread");
        let r = s.app_recv(1, 100, false);
        s.settle();
        got += ok(&s, 1, r);
    }
    assert_eq!(
        s.sides[1].posted.len(),
        posted,
        "read: the re-post waits for the reader's next message or wait"
    );
    s.app_recv(1, 100, false);
    assert_eq!(
        s.sides[1].posted.len(),
        posted + 1,
        "re-posted once the reader waits"
    );
    assert_eq!(s.sides[1].received, s.expected(1, INLINE_MAX));
    no_violations(&s);
}

/// The driver takes the lines of the send buffer the next message will be
/// copied into while it waits (`next_send_buffer`): that must be the one
/// the machine then gives the message, also after send completions (which
/// return buffers) arrived in between.
#[test]
fn the_next_send_buffer_is_the_one_the_next_message_takes() {
    let mut s = connected(cfg(), cfg());
    let mut distinct = std::collections::BTreeSet::new();
    for round in 0..40u64 {
        let want = s.m(0).next_send_buffer();
        assert!(want.is_some(), "round {round}: a free send buffer");
        let op = s.app_send(0, round * 100, 100, false);
        let took = s.wires[0].back().map(|w| w.send_slot);
        assert_eq!(took, want, "round {round}");
        distinct.extend(took);
        // Deliver and read; completions come back from time to time.
        s.settle();
        assert_eq!(ok(&s, 0, op), 100);
        let r = s.app_recv(1, 1000, false);
        s.settle();
        assert_eq!(ok(&s, 1, r), 100);
    }
    assert!(distinct.len() > 1, "completions changed the next buffer");
    no_violations(&s);
}

#[test]
fn one_byte_more_than_fits_inline_goes_through_the_ring() {
    let mut s = connected(cfg(), cfg());
    let op = s.app_send(0, 0, INLINE_MAX + 1, false);
    ok(&s, 0, op);
    s.settle();
    let st = s.m(0).stats();
    assert_eq!((st.inline_msgs, st.data_msgs), (0, 1));
    let r = s.app_recv(1, 1000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), INLINE_MAX as u64 + 1);
    assert_eq!(s.sides[1].received, s.expected(1, INLINE_MAX + 1));
    no_violations(&s);
}

#[test]
fn inline_size_is_the_smaller_buffer_of_both_sides() {
    let small = Config {
        slot_size: 256,
        ..cfg()
    };
    let mut s = connected(cfg(), small);
    // Side 0's buffers take 492 bytes, side 1's only 236.
    let op = s.app_send(0, 0, 256 - HEADER_LEN + 1, false);
    ok(&s, 0, op);
    s.settle();
    assert_eq!(s.m(0).stats().inline_msgs, 0, "too long for side 1");
    let op = s.app_send(1, 0, 256 - HEADER_LEN, false);
    ok(&s, 1, op);
    s.settle();
    assert_eq!(s.m(1).stats().inline_msgs, 1);
    let r = s.app_recv(1, 1000, false);
    let r0 = s.app_recv(0, 1000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), 256 - HEADER_LEN as u64 + 1);
    assert_eq!(ok(&s, 0, r0), 256 - HEADER_LEN as u64);
    no_violations(&s);
}

#[test]
fn inline_and_ring_data_keep_stream_order_in_one_receive() {
    let mut s = connected(cfg_copy(), cfg_copy());
    let mut off = 0u64;
    for len in [100, 700, 1, 3000, 50] {
        let op = s.app_send(0, off, len, false);
        off += len as u64;
        s.settle();
        ok(&s, 0, op);
    }
    let st = s.m(0).stats();
    assert_eq!((st.inline_msgs, st.data_msgs), (3, 5));
    let r = s.app_recv(1, 10_000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), off, "one receive takes both kinds");
    assert_eq!(s.sides[1].received, s.expected(1, off as usize));
    no_violations(&s);
}

#[test]
fn an_inline_longer_than_the_receive_buffer_ends_the_connection() {
    for (len, received) in [(512 - HEADER_LEN as u32 + 1, 513), (10, 29)] {
        let mut s = connected(cfg(), cfg());
        let m = Message {
            credits: 0,
            seq: 1,
            ack: 0,
            body: Body::Inline { len },
        };
        let mut head = [0u8; MAX_HEAD];
        let n = m.encode(&mut head);
        let slot = s.sides[1].posted.pop_front().unwrap();
        // `received` bytes arrived: more than a buffer, or fewer than the
        // header says.
        s.m(1).recv_done(slot, Ok((&head[..n], received)));
        s.drain(1);
        assert!(
            matches!(
                s.sides[1].aborted,
                Some(Error::Protocol(_)) | Some(Error::Malformed(_))
            ),
            "{len} in {received}: {:?}",
            s.sides[1].aborted
        );
    }
}

#[test]
fn a_send_reaching_the_end_of_the_ring_continues_at_its_start() {
    let mut s = connected(cfg_copy(), cfg_copy());
    let ring = MIN_RING as usize;
    let a = s.app_send(0, 0, ring - 100, false);
    s.settle();
    ok(&s, 0, a);
    let r = s.app_recv(1, ring, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), (ring - 100) as u64);
    // 100 bytes to the end, the other 600 (too many for an INLINE) at the
    // start: two DATAs.
    let b = s.app_send(0, (ring - 100) as u64, 700, false);
    s.settle();
    ok(&s, 0, b);
    assert_eq!(s.m(0).stats().data_msgs, 3);
    assert_eq!(s.m(0).stats().inline_msgs, 0);
    let mut got = 0;
    while got < 700 {
        let r = s.app_recv(1, 1000, false);
        s.settle();
        got += ok(&s, 1, r);
    }
    assert_eq!(s.sides[1].received, s.expected(1, ring + 600));
    no_violations(&s);
}

#[test]
fn large_payload_read_flow_reads_into_the_receive_buffer() {
    let mut s = connected(cfg(), cfg());
    let op = s.app_send(0, 0, 5000, false);
    s.settle();
    assert_eq!(s.sides[0].exposures.len(), 1, "sender exposed its buffer");
    assert_eq!(s.result(0, op), None, "send completes on READ_DONE only");
    let r1 = s.app_recv(1, 3000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r1), 3000);
    assert_eq!(s.result(0, op), None);
    let r2 = s.app_recv(1, 3000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r2), 2000);
    assert_eq!(ok(&s, 0, op), 5000);
    assert!(s.sides[0].exposures.is_empty(), "sender unexposed");
    assert_eq!(s.sides[1].received, s.expected(1, 5000));
    assert_eq!(s.m(0).stats().read_offers, 1);
    assert_eq!(s.m(1).stats().rdma_reads, 2);
    assert_eq!(s.m(1).stats().bytes_copied_out, 0);
    no_violations(&s);
}

#[test]
fn large_payload_write_flow_writes_into_exposed_receive_buffers() {
    let mut s = connected(cfg_write(), cfg_write());
    let op = s.app_send(0, 0, 5000, false);
    s.settle();
    assert!(
        s.sides[0].exposures.is_empty(),
        "write flow exposes nothing on the sender"
    );
    let r1 = s.app_recv(1, 4096, false);
    s.settle();
    assert_eq!(ok(&s, 1, r1), 4096);
    assert!(
        s.sides[1].exposures.is_empty(),
        "receiver unexposed after WRITE_DONE"
    );
    let r2 = s.app_recv(1, 4096, false);
    s.settle();
    assert_eq!(ok(&s, 1, r2), 904);
    assert_eq!(ok(&s, 0, op), 5000);
    assert_eq!(s.sides[1].received, s.expected(1, 5000));
    assert_eq!(s.m(0).stats().write_requests, 1);
    assert_eq!(s.m(0).stats().rdma_writes, 2);
    no_violations(&s);
}

#[test]
fn read_flow_falls_back_to_write_when_the_peer_cannot_read() {
    let b = Config {
        can_rdma_read: false,
        ..cfg()
    };
    let mut s = connected(cfg(), b);
    assert!(!s.m(0).uses_read_flow());
    let op = s.app_send(0, 0, 3000, false);
    let r = s.app_recv(1, 8000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), 3000);
    assert_eq!(ok(&s, 0, op), 3000);
    assert_eq!(s.m(0).stats().write_requests, 1);
    assert_eq!(s.m(0).stats().read_offers, 0);
}

#[test]
fn transfers_are_split_by_the_largest_rdma_op() {
    for flow in [RdmaFlow::Read, RdmaFlow::Write] {
        let c = Config {
            max_rdma_op: 700,
            rdma_flow: flow,
            ..cfg()
        };
        let mut s = connected(c.clone(), c);
        let op = s.app_send(0, 0, 2500, false);
        let mut got = 0;
        while got < 2500 {
            let r = s.app_recv(1, 5000, false);
            s.settle();
            let n = ok(&s, 1, r);
            assert!(n <= 700);
            got += n;
        }
        assert_eq!(ok(&s, 0, op), 2500);
        assert_eq!(s.sides[1].received, s.expected(1, 2500), "{flow:?}");
        no_violations(&s);
    }
}

#[test]
fn receive_stops_at_a_transfer_boundary() {
    let mut s = connected(cfg(), cfg());
    let a = s.app_send(0, 0, 100, false);
    let b = s.app_send(0, 100, 2000, false);
    s.settle();
    let r = s.app_recv(1, 5000, false);
    s.settle();
    assert_eq!(
        ok(&s, 1, r),
        100,
        "copied data is not merged with an RDMA transfer"
    );
    let r = s.app_recv(1, 5000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), 2000);
    ok(&s, 0, a);
    assert_eq!(ok(&s, 0, b), 2000);
    assert_eq!(s.sides[1].received, s.expected(1, 2100));
}

#[test]
fn try_send_copies_what_the_ring_takes() {
    let mut s = connected(cfg(), cfg());
    // The peer's ring is empty: all of it.
    let room = u64::from(MIN_RING);
    let op = s.app_send(0, 0, 10_000, true);
    assert_eq!(ok(&s, 0, op), room);
    // Too long for an INLINE: it needs ring space.
    let op = s.app_send(0, room, 600, true);
    assert_eq!(s.result(0, op), Some(Err(Error::WouldBlock)));
    s.settle();
    let r = s.app_recv(1, 100_000, true);
    assert_eq!(ok(&s, 1, r), room);
    no_violations(&s);
}

#[test]
fn a_direct_send_completes_when_its_ring_write_did_and_is_in_flight_until_then() {
    let direct = Config {
        direct_min: 600,
        ..cfg_copy()
    };
    let mut s = connected(direct, cfg_copy());
    let op = s.app_send(0, 0, 2000, false);
    assert_eq!(
        s.result(0, op),
        None,
        "the ring write reads the application's buffer until it completes"
    );
    assert_eq!(s.m(0).stats().bytes_direct, 2000);
    assert_eq!(s.m(0).stats().bytes_copied_in, 0);
    assert_eq!(s.m(0).app_cancel(op), CancelOutcome::InFlight);
    s.settle();
    assert_eq!(ok(&s, 0, op), 2000);
    // Below `direct_min`, and non-blocking sends, stay staged.
    let small = s.app_send(0, 2000, 599, false);
    assert_eq!(ok(&s, 0, small), 599);
    let mut got = 0;
    while got < 2599 {
        let r = s.app_recv(1, 10_000, false);
        s.settle();
        got += ok(&s, 1, r);
    }
    assert_eq!(s.sides[1].received, s.expected(1, 2599));
    // A staged send of the same size completes as soon as it is queued.
    let mut t = connected(cfg_copy(), cfg_copy());
    let op = t.app_send(0, 0, 2000, false);
    assert_eq!(ok(&t, 0, op), 2000);
    no_violations(&s);
    no_violations(&t);
}

#[test]
fn a_direct_send_outlives_a_failure_until_its_ring_write_came_back() {
    let direct = Config {
        direct_min: 600,
        ..cfg_copy()
    };
    let mut s = connected(direct, cfg_copy());
    let op = s.app_send(0, 0, 2000, false);
    // The connection fails while the write is in flight: the op completes
    // only once the write came back (the simulator flags a completion
    // while `direct_ring` still names the op).
    assert!(s.sides[0].direct_ring.values().any(|o| *o == op));
    s.m(0).abort(Error::Aborted);
    assert_eq!(s.result(0, op), None);
    s.settle();
    // The write itself had left: its bytes count as sent.
    assert_eq!(s.result(0, op), Some(Ok(2000)));
    no_violations(&s);
}

#[test]
fn try_recv_would_block_without_data() {
    let mut s = connected(cfg(), cfg());
    let r = s.app_recv(1, 100, true);
    assert_eq!(s.result(1, r), Some(Err(Error::WouldBlock)));
}

// ----------------------------------------------------------------------
// Credits
// ----------------------------------------------------------------------

/// Copy path only (a high RDMA threshold).
fn cfg_copy() -> Config {
    Config {
        rdma_threshold: 1 << 20,
        ..cfg()
    }
}

#[test]
fn a_reader_returns_ring_space_and_the_writer_never_overruns() {
    let mut s = connected(cfg_copy(), cfg_copy());
    let op = s.app_send(0, 0, 50 * 496, false);
    s.settle();
    assert_eq!(s.result(0, op), None, "blocked on ring space");
    assert_eq!(
        s.m(0).stats().bytes_copied_in,
        u64::from(MIN_RING),
        "exactly the ring is in flight"
    );
    let mut got = 0;
    while got < 50 * 496 {
        let r = s.app_recv(1, 496, false);
        s.settle();
        got += ok(&s, 1, r);
    }
    assert_eq!(ok(&s, 0, op), 50 * 496);
    assert_eq!(s.sides[1].received, s.expected(1, 50 * 496));
    assert!(
        s.m(1).stats().credit_msgs > 0,
        "explicit CREDITs gave ring space back"
    );
    no_violations(&s);
}

#[test]
fn a_receive_draining_the_ring_gives_half_of_it_back_before_copying_the_rest() {
    let ring = MIN_RING as usize;
    let mut s = connected(cfg_copy(), cfg_copy());
    let full = s.app_send(0, 0, ring, false);
    let more = s.app_send(0, ring as u64, 600, false);
    s.settle();
    ok(&s, 0, full);
    assert_eq!(s.result(0, more), None, "side 1's ring is full");
    let (r, actions) = s.app_recv_actions(1, 2 * ring, false);
    let copies: Vec<usize> = (0..actions.len())
        .filter(|&k| matches!(actions[k], Action::CopyOut { .. }))
        .collect();
    let credit = actions
        .iter()
        .position(|a| matches!(a, Action::Send { .. }))
        .expect("a CREDIT gives the ring space back");
    assert!(
        copies.len() > 1,
        "the ring is copied out in steps: {actions:?}"
    );
    assert!(
        credit < *copies.last().unwrap(),
        "half the ring goes back before the last copy-out: {actions:?}"
    );
    s.settle();
    assert_eq!(ok(&s, 1, r), ring as u64);
    assert_eq!(
        ok(&s, 0, more),
        600,
        "the writer refilled the space given back"
    );
    let r = s.app_recv(1, ring, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), 600);
    assert_eq!(s.sides[1].received, s.expected(1, ring + 600));
    no_violations(&s);
}

#[test]
fn control_answers_are_not_starved_by_unread_data() {
    // Side 0 fills side 1 with DATA that side 1 does not read while it sends
    // a large RDMA-read payload that side 0 reads: READ_DONE must still go.
    let mut s = connected(cfg_copy(), cfg());
    let small = s.app_send(0, 0, MIN_RING as usize, false);
    s.settle();
    ok(&s, 0, small);
    let stuck = s.app_send(0, MIN_RING.into(), 600, false);
    s.settle();
    assert_eq!(s.result(0, stuck), None, "side 1's ring is full");
    let big = s.app_send(1, 0, 4000, false);
    s.settle();
    let r = s.app_recv(0, 4000, false);
    s.settle();
    assert_eq!(ok(&s, 0, r), 4000);
    assert_eq!(ok(&s, 1, big), 4000, "READ_DONE went out on the reserve");
    no_violations(&s);
}

/// The `credits` field of the message side `i` sent last in `actions`.
fn credits_sent(s: &mut Sim, i: usize, actions: &[Action]) -> u16 {
    let (slot, payload) = actions
        .iter()
        .rev()
        .find_map(|a| match *a {
            Action::Send { slot, .. } => Some((slot, 0)),
            Action::SendInline { slot, payload, .. } => Some((slot, payload.len as usize)),
            _ => None,
        })
        .expect("a message was sent");
    let head = s.m(i).head(slot).to_vec();
    Message::decode(&head, head.len() + payload)
        .expect("a valid header")
        .credits
}

#[test]
fn a_consumed_receive_is_re_posted_after_the_reply_and_announced_by_the_next() {
    // Side 1 echoes side 0's messages as `sanbench stream_lat` does: the
    // receive its read consumed is re-posted after the reply is posted,
    // so the reply returns the one consumed a round before.
    let mut s = connected(cfg(), cfg());
    let announced = s.m(0).credits();
    let mut off = [0u64; 2];
    for round in 0..40 {
        let op = s.app_send(0, off[0], 8, false);
        ok(&s, 0, op);
        off[0] += 8;
        s.settle();
        let (r, actions) = s.app_recv_actions(1, 8, false);
        assert_eq!(ok(&s, 1, r), 8);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::PostRecv { .. })),
            "round {round}: the read re-posts nothing: {actions:?}"
        );
        let (w, actions) = s.app_send_actions(1, off[1], 8, false);
        ok(&s, 1, w);
        off[1] += 8;
        let send = actions
            .iter()
            .position(|a| matches!(a, Action::SendInline { .. }))
            .expect("the reply is an INLINE");
        let post = actions
            .iter()
            .position(|a| matches!(a, Action::PostRecv { .. }))
            .expect("the consumed receive is re-posted");
        assert!(send < post, "round {round}: reply first: {actions:?}");
        // The sim: no receive was announced before it was posted.
        no_violations(&s);
        let returned = credits_sent(&mut s, 1, &actions);
        assert_eq!(returned, u16::from(round > 0), "round {round}");
        s.settle();
        let r = s.app_recv(0, 8, false);
        s.settle();
        assert_eq!(ok(&s, 0, r), 8);
    }
    assert!(
        s.m(0).credits() + 2 >= announced,
        "side 0 keeps its credits"
    );
    assert_eq!(s.sides[1].received, s.expected(1, 40 * 8));
    assert_eq!(s.sides[0].received, s.expected(0, 40 * 8));
    for i in 0..2 {
        let st = s.m(i).stats();
        assert_eq!((st.need_msgs, st.credit_msgs), (0, 0), "side {i}");
    }
    no_violations(&s);
}

#[test]
fn holding_receives_back_never_leaves_the_peer_short() {
    // Side 0 sends bursts that use half its credits; side 1 reads each
    // burst, then answers once: the answer returns every receive the burst
    // took (none held back once the peer is down to half), so the next
    // burst needs no NEED.
    let mut s = connected(cfg(), cfg());
    let burst = s.m(0).credits() / 2;
    let mut off = [0u64; 2];
    for _ in 0..10 {
        for _ in 0..burst {
            let op = s.app_send(0, off[0], 8, false);
            ok(&s, 0, op);
            off[0] += 8;
        }
        s.settle();
        for _ in 0..burst {
            let r = s.app_recv(1, 8, false);
            assert_eq!(ok(&s, 1, r), 8);
        }
        let op = s.app_send(1, off[1], 8, false);
        ok(&s, 1, op);
        off[1] += 8;
        s.settle();
        let r = s.app_recv(0, 8, false);
        s.settle();
        assert_eq!(ok(&s, 0, r), 8);
    }
    assert_eq!(s.sides[1].received, s.expected(1, off[0] as usize));
    assert_eq!(s.m(0).stats().need_msgs, 0);
    no_violations(&s);
}

#[test]
fn a_receive_held_back_goes_back_to_a_need_without_further_calls() {
    // Side 1 reads one message and then makes no call: its receive is held
    // back. Side 0 sends until it is short of credits and asks with NEED;
    // side 1's machine posts the receive and returns it in CREDIT_ACK.
    let mut s = connected(cfg(), cfg());
    let op = s.app_send(0, 0, 8, false);
    ok(&s, 0, op);
    s.settle();
    let r = s.app_recv(1, 8, false);
    assert_eq!(ok(&s, 1, r), 8);
    let posted = s.sides[1].posted.len();
    let mut off = 8;
    let stuck = loop {
        let op = s.app_send(0, off, 8, false);
        off += 8;
        if s.result(0, op).is_none() {
            break op;
        }
        s.settle();
        assert!(off < 100, "side 0 never ran short");
    };
    assert_eq!(s.m(0).stats().need_msgs, 1, "short of credits, side 0 asks");
    s.settle();
    assert_eq!(s.m(1).stats().credit_msgs, 1, "a CREDIT_ACK answered");
    assert_eq!(ok(&s, 0, stuck), 8, "the receive it returned took the rest");
    let unread = (off / 8 - 1) as usize;
    assert_eq!(
        s.sides[1].posted.len(),
        posted + 1 - unread,
        "the held-back receive was posted, the unread ones hold their messages"
    );
    no_violations(&s);
}

/// Lands `m` (and `payload` after its header) in one of side `i`'s posted
/// receives, as if the peer had sent it, and executes what side `i` does
/// about it.
fn deliver(s: &mut Sim, i: usize, m: Message, payload: &[u8]) {
    let mut head = [0u8; MAX_HEAD];
    let n = m.encode(&mut head);
    let bytes = [&head[..n], payload].concat();
    let slot = s.sides[i].posted.pop_front().expect("a posted receive");
    s.m(i).recv_done(slot, Ok((&bytes, bytes.len())));
    s.drain(i);
}

/// The peer's message `seq`, returning no credits.
fn no_credits(seq: u32, body: Body) -> Message {
    Message {
        credits: 0,
        seq,
        ack: 0,
        body,
    }
}

#[test]
fn a_receive_consumed_after_a_need_is_posted_at_once_and_answered() {
    // Side 1 holds a consumed receive back only while side 0 can do
    // without it. An unanswered NEED says it cannot, even while side 0
    // still holds most of its credits by side 1's count: the INLINE read
    // after the NEED is re-posted at once and returned in a CREDIT_ACK.
    let mut s = connected(cfg(), cfg());
    deliver(&mut s, 1, no_credits(1, Body::Need), &[]);
    assert_eq!(
        s.m(1).stats().credit_msgs,
        0,
        "nothing consumed yet to return"
    );
    deliver(&mut s, 1, no_credits(2, Body::Inline { len: 1 }), &[7]);
    let (r, actions) = s.app_recv_actions(1, 8, false);
    assert_eq!(ok(&s, 1, r), 1);
    assert!(
        actions.iter().any(|a| matches!(a, Action::PostRecv { .. })),
        "the consumed receive is re-posted, not held back: {actions:?}"
    );
    assert_eq!(s.m(1).stats().credit_msgs, 1, "the CREDIT_ACK went out");
    assert_eq!(
        credits_sent(&mut s, 1, &actions),
        1,
        "returning that receive"
    );
    assert!(s.sides[1].aborted.is_none());
}

#[test]
fn credit_violation_ends_the_connection() {
    let mut s = connected(cfg(), cfg());
    // A rogue peer keeps sending DATA and ignores the credits it gets
    // back; the victim's app reads everything, so receives are re-posted
    // (the rogue lands in receives posted but not announced).
    let mut err = None;
    for seq in 1..=100u32 {
        let r = s.app_recv(1, 10, false);
        let data = Body::Data {
            offset: seq - 1,
            len: 1,
        };
        deliver(&mut s, 1, no_credits(seq, data), &[]);
        if let Some(e) = s.sides[1].aborted {
            err = Some(e);
            break;
        }
        assert_eq!(ok(&s, 1, r), 1);
    }
    match err {
        Some(Error::CreditViolation {
            received,
            announced,
        }) => assert_eq!(received, announced + 1),
        other => panic!("{other:?}"),
    }
    assert!(err.unwrap().to_string().contains("credit violation"));
}

#[test]
fn peer_returning_too_many_credits_is_a_violation() {
    let mut s = connected(cfg(), cfg());
    let m = Message {
        credits: 50,
        seq: 1,
        ack: 0,
        body: Body::Credit,
    };
    deliver(&mut s, 1, m, &[]);
    assert_eq!(s.sides[1].aborted, Some(Error::CreditOverflow));
}

// ----------------------------------------------------------------------
// Shutdown, errors, reset, cancellation
// ----------------------------------------------------------------------

#[test]
fn fin_follows_all_data_then_end_of_stream() {
    let mut s = connected(cfg(), cfg());
    let a = s.app_send(0, 0, 300, false);
    let b = s.app_send(0, 300, 3000, false);
    s.m(0).app_shutdown().unwrap();
    s.drain(0);
    assert_eq!(s.m(0).app_shutdown(), Ok(()), "idempotent");
    let late = s.app_send(0, 3300, 5, false);
    assert_eq!(s.result(0, late), Some(Err(Error::Shutdown)));
    s.settle();
    assert!(s.m(1).fin_received());
    let mut got = 0;
    loop {
        let r = s.app_recv(1, 1000, false);
        s.settle();
        match ok(&s, 1, r) {
            0 => break,
            n => got += n,
        }
    }
    assert_eq!(got, 3300);
    assert_eq!(s.sides[1].received, s.expected(1, 3300));
    ok(&s, 0, a);
    ok(&s, 0, b);
    assert!(s.m(0).fin_delivered());
    let again = s.app_recv(1, 10, false);
    assert_eq!(ok(&s, 1, again), 0, "end of stream stays");
    // The other direction still works after a half close.
    let back = s.app_send(1, 0, 10, false);
    let r = s.app_recv(0, 10, false);
    s.settle();
    assert_eq!(ok(&s, 0, r), 10);
    ok(&s, 1, back);
    no_violations(&s);
}

#[test]
fn malformed_message_fails_pending_ops_with_a_clear_error() {
    let mut s = connected(cfg(), cfg());
    let r = s.app_recv(1, 10, false);
    let slot = s.sides[1].posted.pop_front().unwrap();
    let garbage = [0xFFu8; 40];
    s.m(1).recv_done(slot, Ok((&garbage, 40)));
    s.drain(1);
    let e = s.sides[1].aborted.expect("aborted");
    assert!(
        matches!(e, Error::Malformed(DecodeError::BadMagic(_))),
        "{e}"
    );
    assert!(e.to_string().contains("malformed"));
    assert_eq!(s.result(1, r), Some(Err(e)));
    s.settle();
    // The peer sees the reset.
    let r0 = s.app_recv(0, 10, false);
    s.settle();
    assert_eq!(s.result(0, r0), Some(Err(Error::Transport(RESET))));
}

#[test]
fn out_of_sequence_message_is_rejected() {
    let mut s = connected(cfg(), cfg());
    deliver(&mut s, 1, no_credits(7, Body::Fin), &[]);
    assert_eq!(
        s.sides[1].aborted,
        Some(Error::Protocol("message out of sequence"))
    );
}

#[test]
fn unexpected_messages_are_protocol_errors() {
    let bodies = [
        Body::ReadDone { len: 5 },
        Body::WriteTarget {
            len: 5,
            desc: [0; 32],
        },
        Body::WriteDone { len: 5 },
        Body::Hello {
            recv_slots: 8,
            slot_size: 512,
            caps: 0,
            ring_size: MIN_RING,
            ring: [0; 32],
        },
    ];
    for body in bodies {
        let mut s = connected(cfg(), cfg());
        deliver(&mut s, 1, no_credits(1, body), &[]);
        assert!(
            matches!(s.sides[1].aborted, Some(Error::Protocol(_))),
            "{body:?}: {:?}",
            s.sides[1].aborted
        );
    }
}

#[test]
fn peer_reset_mid_transfer_fails_both_sides_without_touching_buffers() {
    for flow in [RdmaFlow::Read, RdmaFlow::Write] {
        let c = Config {
            rdma_flow: flow,
            ..cfg()
        };
        let mut s = connected(c.clone(), c);
        let big = s.app_send(0, 0, 6000, false);
        s.settle();
        let r = s.app_recv(1, 6000, false);
        // Process until the RDMA op is posted, but not executed.
        while s.sides[0].rdma_jobs.is_empty() && s.sides[1].rdma_jobs.is_empty() {
            let ev = *s.enabled().first().expect("progress");
            s.step(ev);
        }
        // The sender's switch aborts (e.g. its app closed the socket).
        s.m(0).abort(Error::Aborted);
        s.drain(0);
        s.settle();
        assert_eq!(s.result(0, big), Some(Err(Error::Aborted)), "{flow:?}");
        let rr = s.result(1, r).expect("receive completed");
        assert!(
            matches!(rr, Err(Error::Transport(c)) if c == RESET || c == ABORTED),
            "{flow:?}: {rr:?}"
        );
        // The simulator checked no buffer was released while in use.
        no_violations(&s);
    }
}

#[test]
fn data_received_before_a_reset_is_still_delivered() {
    let mut s = connected(cfg(), cfg());
    let a = s.app_send(0, 0, 100, false);
    s.settle();
    ok(&s, 0, a);
    s.close(0);
    s.settle();
    let r = s.app_recv(1, 1000, false);
    assert_eq!(ok(&s, 1, r), 100);
    let r = s.app_recv(1, 1000, false);
    assert_eq!(s.result(1, r), Some(Err(Error::Transport(RESET))));
}

#[test]
fn fin_completing_after_a_transport_error_still_ends_the_stream() {
    let mut s = connected(cfg(), cfg());
    let a = s.app_send(0, 0, 100, false);
    s.m(0).app_shutdown().unwrap();
    s.drain(0);
    // DATA and FIN land in side 1's receives; their completions wait.
    while !s.wires[0].is_empty() {
        s.step(Ev::Deliver(0));
    }
    // Side 1 learns of a reset first (a re-post failing at once, as the
    // provider does once it saw the peer go).
    let slot = s.sides[1].posted.pop_front().unwrap();
    s.m(1).recv_done(slot, Err(RESET));
    s.drain(1);
    assert_eq!(
        s.sides[1].aborted, None,
        "abort waits for the posted receives"
    );
    let r = s.app_recv(1, 1000, false);
    assert_eq!(s.result(1, r), None, "more may still arrive");
    s.close(0);
    s.settle();
    assert_eq!(ok(&s, 1, r), 100);
    let r = s.app_recv(1, 1000, false);
    assert_eq!(ok(&s, 1, r), 0, "FIN arrived before the reset");
    assert_eq!(s.sides[1].aborted, Some(Error::Transport(RESET)));
    ok(&s, 0, a);
    no_violations(&s);
}

#[test]
fn credit_batch_returns_credits_unasked() {
    let c = Config {
        credit_batch: 3,
        ..cfg_copy()
    };
    let mut s = connected(c.clone(), c.clone());
    let op = s.app_send(0, 0, 30 * 496, false);
    let mut got = 0;
    while got < 30 * 496 {
        let r = s.app_recv(1, 496, false);
        s.settle();
        got += ok(&s, 1, r);
    }
    assert_eq!(ok(&s, 0, op), 30 * 496);
    assert_eq!(s.sides[1].received, s.expected(1, 30 * 496));
    assert!(s.m(1).stats().credit_msgs > 0);
    no_violations(&s);
    // Random schedules with batched returns on one or both sides.
    for seed in 0..40u64 {
        let b = Config {
            credit_batch: if seed % 2 == 0 { 2 } else { 0 },
            ..cfg()
        };
        let script = Script {
            sends: [
                vec![(3000, false), (700, true), (1, false), (2500, false)],
                vec![(496 * 9, false), (1200, false)],
            ],
            caps: [vec![100, 4000], vec![1, 496, 3000]],
            write_then_read: seed % 3 == 0,
            max_pending_sends: 2,
        };
        run_random(Sim::new(c.clone(), b, seed % 4 < 2), &script, seed);
    }
}

#[test]
fn cancel_paths() {
    let mut s = connected(cfg_copy(), cfg());
    // A receive waiting for data is withdrawn cleanly.
    let r = s.app_recv(1, 100, false);
    assert_eq!(s.m(1).app_cancel(r), CancelOutcome::Cancelled { done: 0 });
    // A copied send blocked on ring space keeps what it sent.
    let room = u64::from(MIN_RING);
    let op = s.app_send(0, 0, 20 * 496, false);
    assert_eq!(
        s.m(0).app_cancel(op),
        CancelOutcome::Cancelled { done: room }
    );
    s.settle();
    let r = s.app_recv(1, 100_000, false);
    s.settle();
    assert_eq!(ok(&s, 1, r), room);
    // An RDMA-read transfer announced to the peer is in flight.
    s.m(0).set_rdma_threshold(1000);
    let big = s.app_send(0, room, 4000, false);
    s.settle();
    assert_eq!(s.m(0).app_cancel(big), CancelOutcome::InFlight);
    // A receive whose buffer is the target of an RDMA read is in flight.
    let r2 = s.app_recv(1, 10_000, false);
    assert!(!s.sides[1].rdma_jobs.is_empty());
    assert_eq!(s.m(1).app_cancel(r2), CancelOutcome::InFlight);
    s.settle();
    assert_eq!(ok(&s, 1, r2), 4000);
    assert_eq!(ok(&s, 0, big), 4000);
    assert_eq!(s.m(0).app_cancel(big), CancelOutcome::NotFound);
    assert_eq!(s.sides[1].received, s.expected(1, room as usize + 4000));
    no_violations(&s);
}

#[test]
fn cancel_after_timeout_aborts_and_releases_after_the_rdma_came_back() {
    let mut s = connected(cfg_write(), cfg_write());
    let big = s.app_send(0, 0, 4000, false);
    let r = s.app_recv(1, 4000, false);
    // Run until the sender's RDMA write is posted.
    while s.sides[0].rdma_jobs.is_empty() {
        let ev = *s.enabled().first().expect("progress");
        s.step(ev);
    }
    assert_eq!(s.m(0).app_cancel(big), CancelOutcome::InFlight);
    // The driver's patience runs out: abort. The op completes only after
    // the flushed RDMA completion (the simulator checks the order).
    s.m(0).abort(Error::TimedOut);
    s.drain(0);
    assert_eq!(s.result(0, big), None, "RDMA completion not yet seen");
    s.settle();
    assert_eq!(s.result(0, big), Some(Err(Error::TimedOut)));
    assert!(s.result(1, r).unwrap().is_err());
    no_violations(&s);
}

// ----------------------------------------------------------------------
// Random schedules
// ----------------------------------------------------------------------

fn script_strategy() -> impl Strategy<Value = (Config, Config, Script, u64)> {
    let side_cfg = (
        6u16..10,
        2u16..6,
        prop_oneof![Just(256u32), Just(300), Just(512)],
        prop_oneof![Just(RdmaFlow::Read), Just(RdmaFlow::Write)],
        any::<bool>(),
        prop_oneof![Just(100_000u32), Just(333)],
        prop_oneof![Just(MIN_RING), Just(5000), Just(1 << 16)],
        prop_oneof![Just(u64::MAX), Just(300u64)],
    )
        .prop_map(
            |(n, sends, slot, flow, read, max_op, ring, direct)| Config {
                recv_slots: n,
                send_slots: sends,
                slot_size: slot,
                ring_size: ring,
                rdma_threshold: 600,
                max_rdma_op: max_op,
                rdma_flow: flow,
                can_rdma_read: read,
                credit_batch: 0,
                rdma_slots: 2,
                direct_min: direct,
            },
        );
    let sends = prop::collection::vec(
        (
            prop_oneof![1usize..300, 300usize..1200, 1usize..4000],
            prop::bool::weighted(0.2),
        ),
        0..12,
    );
    let caps = prop::collection::vec(prop_oneof![1usize..50, 50usize..5000], 1..4);
    (
        side_cfg.clone(),
        side_cfg,
        [sends.clone(), sends],
        [caps.clone(), caps],
        any::<bool>(),
        1usize..3,
        any::<u64>(),
    )
        .prop_map(|(a, b, sends, caps, wtr, pending, seed)| {
            (
                a,
                b,
                Script {
                    sends,
                    caps,
                    write_then_read: wtr,
                    max_pending_sends: pending,
                },
                seed,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any schedule of fabric events and application calls delivers both
    /// streams exactly, in order, ending with end of stream, without a
    /// deadlock, a credit-rule break or a buffer released early.
    #[test]
    fn random_schedules_deliver_both_streams((a, b, script, seed) in script_strategy()) {
        let sim = Sim::new(a, b, seed % 2 == 0);
        run_random(sim, &script, seed);
    }

    /// Decoding never panics, whatever the bytes and claimed length.
    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..80), extra in 0usize..100) {
        let _ = Message::decode(&bytes, bytes.len());
        let _ = Message::decode(&bytes, bytes.len() + extra);
        let _ = Message::decode(&bytes, bytes.len().saturating_sub(extra));
    }

    /// Valid headers with random field values round-trip; corrupting one
    /// byte of the header either still decodes or fails cleanly.
    #[test]
    fn encode_decode_round_trip(kind in 0u8..9, credits in any::<u16>(), seq in any::<u32>(),
                                len in 1u32..100_000, desc in any::<[u8; 32]>(), flip in 0usize..20, bits in 1u8..=255,
                                ack in any::<u32>()) {
        let body = match kind {
            0 => Body::Hello { recv_slots: len, slot_size: len, caps: u32::from(credits), ring_size: seq, ring: desc },
            1 => Body::Data { offset: seq, len },
            2 => Body::Credit,
            3 => Body::ReadOffer { len, desc },
            4 => Body::ReadDone { len },
            5 => Body::WriteRequest { len },
            6 => Body::WriteTarget { len, desc },
            7 => Body::WriteDone { len },
            _ => Body::Fin,
        };
        let m = Message { credits, seq, ack, body };
        let mut head = [0u8; MAX_HEAD];
        let n = m.encode(&mut head);
        prop_assert_eq!(Message::decode(&head[..n], n), Ok(m));
        head[flip] ^= bits;
        let _ = Message::decode(&head[..n], n);
    }

    /// A machine fed arbitrary bytes as messages fails cleanly (an Abort
    /// action with a protocol error), never panics.
    #[test]
    fn machine_survives_arbitrary_messages(msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..6),
                                           valid_prefix in any::<bool>()) {
        let mut s = connected(cfg(), cfg());
        let r = s.app_recv(1, 100, false);
        for mut bytes in msgs {
            if valid_prefix && bytes.len() >= HEADER_LEN {
                bytes[0..2].copy_from_slice(&MAGIC.to_le_bytes());
                bytes[2] = VERSION;
            }
            let Some(slot) = s.sides[1].posted.pop_front() else { break };
            let n = bytes.len();
            s.m(1).recv_done(slot, Ok((&bytes, n)));
            s.drain(1);
        }
        if let Some(e) = s.sides[1].aborted {
            prop_assert!(!matches!(e, Error::Transport(_)));
            prop_assert!(s.result(1, r).is_some());
        }
    }
}
