//! DUP-1..3: socket duplication (spec §4.8). The source and target
//! "processes" are two providers on one NIC ([`Host::sibling`], as two
//! processes of one machine share its HCA); the peer is another host. The
//! token's record is per process id, so both claim as this test process.

use crate::harness::*;
use sanpath::config::Config;
use sanpath::spi::*;
use sanpath::WsaError;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// The pid the target claims as: this process.
fn me() -> u32 {
    std::process::id()
}

/// A connection from `h` (client) to `peer` (server) on `port`.
fn connect_to(h: &Host, peer: &Host, port: u16) -> (ProviderSocket, ProviderSocket) {
    let (l, ev) = peer.listener(port, 4);
    let c = h.socket();
    let connected = std::sync::Arc::new(sanpath::event::Event::new());
    h.p.event_select(c, Some(connected.clone()), FD_CONNECT)
        .unwrap();
    h.p.connect(c, peer.addr(port), &[]).unwrap();
    let s = accept_one(peer, l, &ev);
    assert!(connected.wait(TIMEOUT), "FD_CONNECT not signalled");
    let ne = h.p.enum_network_events(c, Some(&connected)).unwrap();
    assert_eq!(ne.error_codes[FD_CONNECT_BIT], 0, "connect failed");
    h.p.event_select(c, None, 0).unwrap();
    peer.p.close_socket(l).unwrap();
    (c, s)
}

/// Sends `msg` from `s` on `h` and waits for the send.
/// `WSPSocket` with a duplication value (`dwProviderReserved`) on `h`.
fn claim(h: &Host, value: u64) -> sanpath::WsaResult<ProviderSocket> {
    h.p.socket(
        AF_INET,
        SOCK_STREAM,
        IPPROTO_TCP,
        0,
        WSA_FLAG_OVERLAPPED,
        value,
    )
}

fn send_msg(h: &Host, s: ProviderSocket, msg: &[u8]) {
    let b = buf(h, s, 4096, MEM_READWRITE);
    // SAFETY: the buffer is ours and outlives the send (waited for).
    unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), b.ptr(), msg.len()) };
    let ov = Overlapped::new(0);
    send(h, s, &b, 0, msg.len() as u32, &ov).unwrap();
    assert_eq!(wait_ov(h, &ov), (OK, msg.len() as u32), "send");
    // Before the memory goes: a later buffer at the same address must not
    // find this registration (on verbs its pages are pinned).
    h.p.deregister_memory(s, b.handle).unwrap();
}

/// DUP-1: every receive pending on the duplicated socket completes, once,
/// with success and 0 bytes, by the time `WSPDuplicateSocket` returned; the
/// value is non-zero.
#[test]
fn dup_1_duplicate_completes_pending_receives_with_success_and_zero_bytes() {
    let h = Host::new();
    let peer = h.peer(PEER);
    let target = h.sibling();
    let (a, p) = connect_to(&h, &peer, 6100);
    let b = buf(&h, a, 4096, MEM_READWRITE);
    b.fill(0xEE);
    let before = b.bytes(0, 192);
    let ovs: Vec<Overlapped> = (0..3).map(|_| Overlapped::new(0)).collect();
    for (i, ov) in ovs.iter().enumerate() {
        recv(&h, a, &b, i * 64, 64, ov).unwrap();
    }
    let token = h.p.duplicate_socket(a, me()).unwrap();
    assert_ne!(token, 0);
    for ov in &ovs {
        assert_eq!(done_ov(ov), (OK, 0), "a pending receive after duplication");
        assert_eq!(h.sw.completions_of(ov), 1);
    }
    assert_eq!(b.bytes(0, 192), before, "nothing was written");
    // The target takes it, so the peer's socket goes on (DUP-2 checks it).
    let t = claim(&target, token).unwrap();
    target.p.close_socket(t).unwrap();
    h.p.close_socket(a).unwrap();
    peer.p.close_socket(p).unwrap();
}

/// DUP-1, the failure clause of §4.8 step 4: a duplication nobody claims
/// leaves the peer's receives completed with `WSAECONNRESET` once the
/// bound passed, and the peer's socket reset.
#[test]
fn dup_1_unclaimed_duplication_resets_the_peers_receives() {
    let h = Host::new();
    let mut config: Config = test_config(h.p.config().poller.mode);
    config.connect.dup_timeout_ms = 300;
    let peer = h.peer_with(PEER, config);
    let (a, p) = connect_to(&h, &peer, 6110);
    let pb = buf(&peer, p, 4096, MEM_READWRITE);
    let ov = Overlapped::new(0);
    recv(&peer, p, &pb, 0, 64, &ov).unwrap();
    let started = Instant::now();
    h.p.duplicate_socket(a, me()).unwrap();
    assert_eq!(wait_ov(&peer, &ov), (CONNRESET, 0));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "reset before the bound: {:?}",
        started.elapsed()
    );
    assert_eq!(peer.sw.completions_of(&ov), 1);
    assert_eq!(
        recv(&peer, p, &pb, 0, 64, &ov).unwrap_err(),
        WsaError::WSAECONNRESET
    );
    h.p.close_socket(a).unwrap();
    peer.p.close_socket(p).unwrap();
}

/// DUP-2: in the target, `WSPSocket` with the value yields a socket
/// connected to the same peer; the peer's socket is the same descriptor,
/// its receives posted before the duplication get the target's messages
/// in order, exactly once; data flows both ways. On shm the peer is
/// another process ([`crate::xproc`]): the suspension and the rejoin cross
/// to its provider's service.
#[test]
fn dup_2_the_target_socket_is_in_the_same_connection_state() {
    crate::xproc::two_hosts(
        "dup::dup_2_the_target_socket_is_in_the_same_connection_state",
        PEER,
        |h, link| {
            let target = h.sibling();
            let to = std::net::SocketAddrV4::new(PEER, 6120);
            link.expect("listening");
            let a = h.socket();
            assert_eq!(connect_result(h, a, to), Ok(()));
            h.p.event_select(a, None, 0).unwrap();
            link.expect("posted");
            let token = h.p.duplicate_socket(a, me()).unwrap();
            let t = claim(&target, token).unwrap();
            assert!(target.p.local_addr(t).unwrap().is_some(), "connected");
            assert_eq!(
                claim(&target, token).unwrap_err(),
                WsaError::WSAEINVAL,
                "claimed twice"
            );
            assert_eq!(
                target.p.connect(t, to, &[]).unwrap_err(),
                WsaError::WSAEISCONN
            );
            // The peer's receives were kept: the target's messages land in
            // them, in posting order (checked there).
            send_msg(&target, t, b"first");
            send_msg(&target, t, b"second");
            link.expect("received");
            // And the other way.
            let tb = buf(&target, t, 4096, MEM_READWRITE);
            let tov = Overlapped::new(0);
            recv(&target, t, &tb, 0, 1024, &tov).unwrap();
            link.send("send back");
            assert_eq!(wait_ov(&target, &tov), (OK, 4));
            assert_eq!(tb.bytes(0, 4), b"back");
            // The connection closes as any other: the peer sees the
            // target's close.
            link.expect("posted again");
            target.p.close_socket(t).unwrap();
            link.expect("reset");
            h.p.close_socket(a).unwrap();
        },
        |peer, link| {
            let (l, lev) = peer.listener(6120, 4);
            link.send("listening");
            let p = accept_one(peer, l, &lev);
            peer.p.close_socket(l).unwrap();
            let pb = buf(peer, p, 4096, MEM_READWRITE);
            let povs: Vec<Overlapped> = (0..2).map(|_| Overlapped::new(0)).collect();
            for (i, ov) in povs.iter().enumerate() {
                recv(peer, p, &pb, i * 1024, 1024, ov).unwrap();
            }
            link.send("posted");
            assert_eq!(wait_ov(peer, &povs[0]), (OK, 5));
            assert_eq!(wait_ov(peer, &povs[1]), (OK, 6));
            assert_eq!(pb.bytes(0, 5), b"first");
            assert_eq!(pb.bytes(1024, 6), b"second");
            for ov in &povs {
                assert_eq!(peer.sw.completions_of(ov), 1);
            }
            link.send("received");
            link.expect("send back");
            send_msg(peer, p, b"back");
            let pov = Overlapped::new(0);
            recv(peer, p, &pb, 0, 64, &pov).unwrap();
            link.send("posted again");
            assert_eq!(wait_ov(peer, &pov).0, CONNRESET);
            link.send("reset");
            peer.p.close_socket(p).unwrap();
        },
    );
}

/// DUP-2 for a listener (§4.8 step 4): the target's socket listens on the
/// same address and accepts the next connection; the source's no longer
/// does.
#[test]
fn dup_2_a_duplicated_listener_listens_on_the_same_address() {
    let h = Host::new();
    let peer = h.peer(PEER);
    let target = h.sibling();
    let (l, _) = h.listener(6130, 4);
    let token = h.p.duplicate_socket(l, me()).unwrap();
    if on_shm() {
        // On shm an address belongs to one process (its socket in the
        // runtime directory): a listener moves only to a process that owns
        // its address. The target (198.18.0.3) gets the bind error.
        let e = claim(&target, token).unwrap_err();
        assert_eq!(e, WsaError::WSAEADDRNOTAVAIL);
        h.p.close_socket(l).unwrap();
        return;
    }
    let tl = claim(&target, token).unwrap();
    assert_eq!(target.p.local_addr(tl).unwrap(), Some(h.addr(6130)));
    let ev = std::sync::Arc::new(sanpath::event::Event::new());
    target
        .p
        .event_select(tl, Some(ev.clone()), FD_ACCEPT)
        .unwrap();
    let c = peer.socket();
    peer.p.connect(c, h.addr(6130), &[]).unwrap();
    let s = accept_one(&target, tl, &ev);
    assert_eq!(
        h.p.accept(l, &mut |_| Condition::Accept).unwrap_err(),
        WsaError::WSAEINVAL,
        "the source still accepts"
    );
    for (host, s) in [(&target, s), (&target, tl), (&peer, c), (&h, l)] {
        host.p.close_socket(s).unwrap();
    }
}

/// DUP-2: a value for another process, or no value written, is refused.
#[test]
fn dup_2_a_value_for_another_process_is_refused() {
    let h = Host::new();
    let target = h.sibling();
    let s = h.socket();
    h.p.bind(s, h.addr(6140)).unwrap();
    let token = h.p.duplicate_socket(s, me().wrapping_add(1)).unwrap();
    let create = |v| claim(&target, v);
    assert_eq!(create(token).unwrap_err(), WsaError::WSAEINVAL);
    assert_eq!(
        create(token ^ 0x5a5a_5a5a).unwrap_err(),
        WsaError::WSAEINVAL
    );
    // An open socket moves too.
    let token = h.p.duplicate_socket(h.socket(), me()).unwrap();
    let t = create(token).unwrap();
    assert_eq!(target.p.local_addr(t).unwrap(), None, "an open socket");
    target.p.close_socket(t).unwrap();
    h.p.close_socket(s).unwrap();
}

/// DUP-3: the source's descriptor stays valid, and is not handed out
/// again, until `WSPCloseSocket`; calls on it other than close fail
/// without disturbing the moved connection; closing it does not either.
#[test]
fn dup_3_the_old_descriptor_stays_valid_until_closed() {
    let h = Host::new();
    let peer = h.peer(PEER);
    let target = h.sibling();
    let (a, p) = connect_to(&h, &peer, 6150);
    let token = h.p.duplicate_socket(a, me()).unwrap();
    let t = claim(&target, token).unwrap();
    assert!(h.p.local_addr(a).is_ok(), "the old descriptor is gone");
    let fresh: Vec<_> = (0..4).map(|_| h.socket()).collect();
    assert!(!fresh.contains(&a), "the old descriptor was reused");
    let mut data = [0u8; 8];
    let wsabuf = WsaBuf {
        len: 8,
        buf: data.as_mut_ptr(),
    };
    let ov = Overlapped::new(0);
    // SAFETY: the buffer and record outlive the call (it fails at once).
    let e = unsafe { h.p.send(a, &[wsabuf], 0, &ov) }.unwrap_err();
    assert_eq!(e, WsaError::WSAENOTCONN);
    assert_eq!(
        h.p.duplicate_socket(a, me()).unwrap_err(),
        WsaError::WSAEINVAL,
        "duplicated twice"
    );
    h.p.close_socket(a).unwrap();
    assert_eq!(h.p.local_addr(a).unwrap_err(), WsaError::WSAENOTSOCK);
    // The moved connection is untouched by the old descriptor's close.
    let pb = buf(&peer, p, 4096, MEM_READWRITE);
    let pov = Overlapped::new(0);
    recv(&peer, p, &pb, 0, 64, &pov).unwrap();
    send_msg(&target, t, b"still here");
    assert_eq!(wait_ov(&peer, &pov), (OK, 10));
    for s in fresh {
        h.p.close_socket(s).unwrap();
    }
    target.p.close_socket(t).unwrap();
    peer.p.close_socket(p).unwrap();
}

/// DUP-2, the swap's race: the peer's receive that started before the
/// target rejoined and reaches the post only after the peer swapped the
/// connection (held there by a hook) is posted on the new connection, and
/// gets the target's message; read before, the replaced queue pair would
/// flush it and the target's send would wait forever.
#[test]
fn dup_2_a_receive_started_across_the_swap_lands_on_the_new_connection() {
    use sanpath::spi::dup_hooks;
    const PORT: u16 = 6160;
    let h = Host::new();
    let peer = h.peer(PEER);
    let target = h.sibling();
    let (a, p) = connect_to(&h, &peer, PORT);
    let pb = buf(&peer, p, 4096, MEM_READWRITE);
    let token = h.p.duplicate_socket(a, me()).unwrap();
    dup_hooks::hold_next_op_on(PORT);
    let pov = Overlapped::new(0);
    let t = std::thread::scope(|scope| {
        let posting = scope.spawn(|| recv(&peer, p, &pb, 0, 64, &pov));
        assert!(
            dup_hooks::wait_held(PORT, TIMEOUT),
            "the receive was not held"
        );
        let t = claim(&target, token).unwrap();
        let swapped = dup_hooks::wait_swapped(PORT, TIMEOUT);
        dup_hooks::release(PORT);
        assert!(swapped, "the peer did not swap the connection");
        posting.join().unwrap().unwrap();
        t
    });
    let tb = buf(&target, t, 4096, MEM_READWRITE);
    // SAFETY: the buffer is ours and outlives the send (waited for).
    unsafe { std::ptr::copy_nonoverlapping(b"across".as_ptr(), tb.ptr(), 6) };
    let tov = Overlapped::new(0);
    send(&target, t, &tb, 0, 6, &tov).unwrap();
    assert_eq!(wait_ov(&peer, &pov), (OK, 6), "the peer's receive");
    assert_eq!(pb.bytes(0, 6), b"across");
    assert_eq!(peer.sw.completions_of(&pov), 1);
    assert_eq!(wait_ov(&target, &tov), (OK, 6), "the target's send");
    target.p.close_socket(t).unwrap();
    h.p.close_socket(a).unwrap();
    peer.p.close_socket(p).unwrap();
}
