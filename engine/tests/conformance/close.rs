use crate::harness::*;
use sanpath::config::PollerMode;
use sanpath::event::Event;
use sanpath::spi::*;
use sanpath::WsaError;
use std::net::SocketAddrV4;
use std::sync::Arc;

#[test]
fn close_1_and_2_close_returns_zero_in_every_state() {
    let h = Host::new();
    let unbound = h.socket();
    h.p.close_socket(unbound).unwrap();
    let bound = h.socket();
    h.p.bind(bound, h.addr(5600)).unwrap();
    h.p.close_socket(bound).unwrap();
    let (listening, _) = h.listener(5601, 4);
    h.p.close_socket(listening).unwrap();
    let ip = h.silent_host();
    let connecting = h.socket();
    h.p.connect(connecting, SocketAddrV4::new(ip, 1), &[])
        .unwrap();
    h.p.close_socket(connecting).unwrap();
    let (c, s) = pair(&h, 5602);
    let b = buf(&h, s, 4096, MEM_READWRITE);
    let ov = Overlapped::new(0);
    recv(&h, s, &b, 0, 64, &ov).unwrap();
    h.p.close_socket(c).unwrap();
    assert_eq!(wait_ov(&h, &ov).0, CONNRESET);
    // Peer-reset socket.
    h.p.close_socket(s).unwrap();
    // NIC error (soft: a work-request error moves the queue pair to the
    // error state, as a real NIC's would).
    let (c, s) = pair(&h, 5651);
    let fault = sanpath::fabric::soft::Fault::FailRequest {
        queue: sanpath::fabric::soft::WorkQueue::Send,
        nth: 1,
        status: sanpath::fabric::WcStatus::LocalProtectionError,
    };
    if h.fault(c, s, fault) {
        let bc = buf(&h, c, 4096, MEM_READWRITE);
        let ov = Overlapped::new(0);
        send(&h, c, &bc, 0, 8, &ov).unwrap();
        let aborted = WsaError::WSAECONNABORTED.code() as u32;
        assert_eq!(wait_ov(&h, &ov).0, aborted);
        assert_eq!(
            send(&h, c, &bc, 0, 8, &ov).unwrap_err(),
            WsaError::WSAECONNABORTED
        );
    }
    h.p.close_socket(c).unwrap();
    h.p.close_socket(s).unwrap();
}

/// Close does not wait for unsent data: sends parked at a peer that posted
/// no receive are aborted at once, and the data never arrives.
#[test]
fn close_2_close_does_not_wait_for_unsent_data() {
    let h = Host::new();
    let (c, s) = pair(&h, 5612);
    let bc = buf(&h, c, 4096, MEM_READWRITE);
    let bs = buf(&h, s, 4096, MEM_READWRITE);
    bc.fill(3);
    let sends: Vec<Overlapped> = (0..3).map(|_| Overlapped::new(0)).collect();
    for (i, ov) in sends.iter().enumerate() {
        send(&h, c, &bc, i * 64, 64, ov).unwrap();
    }
    assert!(sends.iter().all(Overlapped::is_pending));
    let t = std::time::Instant::now();
    h.p.close_socket(c).unwrap();
    let took = t.elapsed();
    assert!(took < prompt(), "close took {took:?}");
    for ov in &sends {
        assert_eq!(done_ov(ov), (ABORTED, 0));
    }
    // The peer's receive posted now gets the reset, not the data.
    let r = Overlapped::new(0);
    match recv(&h, s, &bs, 0, 64, &r) {
        Ok(()) => assert_eq!(wait_ov(&h, &r), (CONNRESET, 0)),
        Err(e) => assert_eq!(e, WsaError::WSAECONNRESET),
    }
    assert!(
        bs.bytes(0, 64).iter().all(|&b| b == 0),
        "unsent data arrived"
    );
}

fn every_pending_op_aborted_once(mode: PollerMode) {
    let h = Host::with_config(test_config(mode));
    let (c, s) = pair(&h, 5603);
    let bc = buf(&h, c, 1 << 16, MEM_READWRITE);
    let target = region(1 << 16);
    let d = expose(&h, s, &target, MEM_READWRITE);
    // Soft fabric: s's end answers nothing, so c's sends and RDMA are
    // really in flight at close (on verbs the sends wait at the peer for a
    // receive, and the RDMA part is left out: a real peer always answers).
    let stalled = h.stall(c, s);
    // Pending on c: 3 receives, 2 sends, a polled receive, and (soft) an
    // RDMA write and read of each kind, notified and polled.
    let recvs: Vec<Overlapped> = (0..3).map(|_| Overlapped::new(0)).collect();
    for (i, ov) in recvs.iter().enumerate() {
        recv(&h, c, &bc, i * 100, 100, ov).unwrap();
    }
    let sends: Vec<Overlapped> = (0..2).map(|_| Overlapped::new(0)).collect();
    for ov in &sends {
        send(&h, c, &bc, 1000, 10, ov).unwrap();
    }
    let polled = Overlapped::new(1);
    recv(&h, c, &bc, 2000, 100, &polled).unwrap();
    let rdma: Vec<Overlapped> = [0, 1, 0, 1].map(Overlapped::new).into();
    if stalled {
        for (i, ov) in rdma.iter().enumerate() {
            let off = 4096 * (i + 1);
            if i < 2 {
                rdma_write(&h, c, &bc, off, 4096, &d, 0, ov).unwrap();
            } else {
                rdma_read(&h, c, &bc, off, 4096, &d, 0, ov).unwrap();
            }
        }
    }
    let started: Vec<&Overlapped> = recvs
        .iter()
        .chain(&sends)
        .chain([&polled])
        .chain(rdma.iter().filter(|_| stalled))
        .collect();
    assert!(started.iter().all(|ov| ov.is_pending()));
    let hc = h.p.switch_handle(c).unwrap();
    h.p.close_socket(c).unwrap();
    // Complete by the time close returned: notified ops with one upcall
    // each, polled ones visible in their record (§7-4).
    for ov in started {
        assert_eq!(done_ov(ov), (ABORTED, 0));
        let want = u32::from(ov.wants_upcall());
        assert_eq!(h.sw.completions_of(ov), want);
    }
    assert!(h.sw.closed(hc));
    assert_eq!(h.p.stats().ops_in_use, 0);
    let mut back = vec![1u8; 1 << 16];
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0), "no stalled write landed");
}

#[test]
fn close_3_every_pending_op_aborted_once() {
    every_pending_op_aborted_once(PollerMode::Threads);
}

#[test]
fn close_3_run_to_completion_mode() {
    every_pending_op_aborted_once(PollerMode::RunToCompletion);
}

#[test]
fn close_4_op_memory_released_before_abort_is_signalled() {
    let h = Host::new();
    let (c, _s) = pair(&h, 5604);
    let b = buf(&h, c, 4096, MEM_READWRITE);
    let k = 5;
    let ovs: Vec<Overlapped> = (0..k).map(|_| Overlapped::new(0)).collect();
    for (i, ov) in ovs.iter().enumerate() {
        recv(&h, c, &b, i * 64, 64, ov).unwrap();
    }
    assert_eq!(h.p.stats().ops_in_use, k);
    let hc = h.p.switch_handle(c).unwrap();
    h.p.close_socket(c).unwrap();
    let seen: Vec<usize> =
        h.sw.upcalls()
            .into_iter()
            .filter_map(|u| match u {
                Upcall::Complete {
                    handle,
                    ops_in_use,
                    error,
                    ..
                } if handle == hc => {
                    assert_eq!(error, ABORTED);
                    Some(ops_in_use)
                }
                _ => None,
            })
            .collect();
    assert_eq!(
        seen,
        (0..k).rev().collect::<Vec<_>>(),
        "slot freed before each upcall"
    );
}

#[test]
fn close_5_and_6_close_handle_exactly_once_and_last() {
    let h = Host::new();
    let (c, s) = pair(&h, 5605);
    let b = buf(&h, c, 4096, MEM_READWRITE);
    let ovs: Vec<Overlapped> = (0..4).map(|_| Overlapped::new(0)).collect();
    for (i, ov) in ovs.iter().enumerate() {
        recv(&h, c, &b, i * 64, 64, ov).unwrap();
    }
    let hc = h.p.switch_handle(c).unwrap();
    h.p.close_socket(c).unwrap();
    h.p.close_socket(s).unwrap();
    let ups = h.sw.upcalls();
    let mine: Vec<_> = ups
        .iter()
        .filter(|u| matches!(u, Upcall::Close { handle } | Upcall::Complete { handle, .. } | Upcall::Create { handle, .. } if *handle == hc))
        .collect();
    assert!(
        matches!(mine.last(), Some(Upcall::Close { .. })),
        "{mine:?}"
    );
    assert_eq!(
        mine.iter()
            .filter(|u| matches!(u, Upcall::Close { .. }))
            .count(),
        1
    );
    // The recorder flags any upcall with a closed handle (checked on drop).
}

#[test]
fn close_7_calls_after_close_are_enotsock() {
    let h = Host::new();
    let (c, _s) = pair(&h, 5606);
    let b = buf(&h, c, 4096, MEM_READWRITE);
    h.p.close_socket(c).unwrap();
    let ov = Overlapped::new(0);
    let mut v = [0u8; 4];
    assert_eq!(h.p.close_socket(c).unwrap_err(), WsaError::WSAENOTSOCK);
    assert_eq!(
        recv(&h, c, &b, 0, 64, &ov).unwrap_err(),
        WsaError::WSAENOTSOCK
    );
    assert_eq!(
        h.p.get_sockopt(c, SOL_SOCKET, SO_MAX_RDMA_SIZE, &mut v)
            .unwrap_err(),
        WsaError::WSAENOTSOCK
    );
    assert_eq!(
        h.p.deregister_memory(c, b.handle).unwrap_err(),
        WsaError::WSAENOTSOCK
    );
    assert_eq!(
        h.p.get_overlapped_result(c, &ov, false).unwrap_err(),
        WsaError::WSAENOTSOCK
    );
    assert_eq!(h.p.bind(c, h.addr(1)).unwrap_err(), WsaError::WSAENOTSOCK);
    assert_eq!(h.p.get_qos_by_name(c).unwrap_err(), WsaError::WSAENOTSOCK);
    // A descriptor value never handed out is not a socket either.
    assert_eq!(
        h.p.close_socket(ProviderSocket(12345)).unwrap_err(),
        WsaError::WSAENOTSOCK
    );
}

/// `WSPIoctl` looks at its socket for every code but the extension-pointer
/// one (§7-12): on a closed or made-up socket it fails `WSAENOTSOCK`.
#[test]
fn close_7_ioctl_on_a_closed_or_unknown_socket_is_enotsock() {
    let h = Host::new();
    let s = h.socket();
    h.p.ioctl_check(s, SIO_ADDRESS_LIST_QUERY).unwrap();
    assert_eq!(
        h.p.ioctl_check(s, 0x1234_5678).unwrap_err(),
        WsaError::WSAEINVAL
    );
    h.p.close_socket(s).unwrap();
    for sock in [s, ProviderSocket(12345)] {
        for code in [SIO_ADDRESS_LIST_QUERY, 0x1234_5678] {
            assert_eq!(
                h.p.ioctl_check(sock, code).unwrap_err(),
                WsaError::WSAENOTSOCK,
                "{sock:?} code {code:#x}"
            );
        }
        h.p.ioctl_check(sock, SIO_GET_EXTENSION_FUNCTION_POINTER)
            .unwrap();
    }
}

#[test]
fn close_8_peer_teardown_keeps_the_socket_until_close() {
    let h = Host::new();
    let (c, s) = pair(&h, 5607);
    let b = buf(&h, s, 4096, MEM_READWRITE);
    let first = Overlapped::new(0);
    recv(&h, s, &b, 0, 64, &first).unwrap();
    h.p.close_socket(c).unwrap();
    assert_eq!(wait_ov(&h, &first).0, CONNRESET);
    let hs = h.p.switch_handle(s).unwrap();
    assert!(!h.sw.closed(hs), "not freed by the peer's teardown");
    for _ in 0..3 {
        let ov = Overlapped::new(0);
        match send(&h, s, &b, 0, 8, &ov) {
            Err(e) => assert_eq!(e, WsaError::WSAECONNRESET),
            Ok(()) => assert_eq!(wait_ov(&h, &ov).0, CONNRESET),
        }
        // A new receive after the teardown fails the same way.
        let ov = Overlapped::new(0);
        match recv(&h, s, &b, 64, 8, &ov) {
            Err(e) => assert_eq!(e, WsaError::WSAECONNRESET),
            Ok(()) => assert_eq!(wait_ov(&h, &ov).0, CONNRESET),
        }
    }
    let mut v = [0u8; 4];
    h.p.get_sockopt(s, SOL_SOCKET, SO_MAX_RDMA_SIZE, &mut v)
        .unwrap();
    h.p.deregister_memory(s, b.handle).unwrap();
    h.p.close_socket(s).unwrap();
    assert!(h.sw.closed(hs));
}

#[test]
fn close_9_closing_one_end_resets_the_other_promptly() {
    let h = Host::new();
    let (c, s) = pair(&h, 5608);
    let b = buf(&h, s, 4096, MEM_READWRITE);
    let ovs: Vec<Overlapped> = (0..4).map(|_| Overlapped::new(0)).collect();
    for (i, ov) in ovs.iter().enumerate() {
        recv(&h, s, &b, i * 64, 64, ov).unwrap();
    }
    h.p.close_socket(c).unwrap();
    for ov in &ovs {
        assert_eq!(wait_ov(&h, ov).0, CONNRESET);
    }
}

/// Seed §6.1 step 3 beyond receives: the peer's pending sends and RDMA
/// (soft: really in flight, this end silenced) complete `WSAECONNRESET`
/// when this end closes, each once.
#[test]
fn close_9_peer_pending_sends_and_rdma_reset_at_teardown() {
    let h = Host::new();
    let (c, s) = pair(&h, 5613);
    let bs = buf(&h, s, 1 << 16, MEM_READWRITE);
    let target = region(1 << 16);
    let d = expose(&h, c, &target, MEM_READWRITE);
    let stalled = h.stall(s, c);
    let ovs: Vec<Overlapped> = (0..6).map(|_| Overlapped::new(0)).collect();
    let mut started = Vec::new();
    for (i, ov) in ovs.iter().enumerate() {
        let off = i * 4096;
        match i % 3 {
            0 => send(&h, s, &bs, off, 64, ov).unwrap(),
            1 if stalled => rdma_write(&h, s, &bs, off, 64, &d, off as u32, ov).unwrap(),
            2 if stalled => rdma_read(&h, s, &bs, off, 64, &d, off as u32, ov).unwrap(),
            _ => continue,
        }
        started.push(ov);
    }
    assert!(started.iter().all(|ov| ov.is_pending()));
    h.p.close_socket(c).unwrap();
    for ov in started {
        assert_eq!(wait_ov(&h, ov), (CONNRESET, 0));
        assert_eq!(h.sw.completions_of(ov), 1);
    }
}

/// Both ends closed at the same moment from two threads: both return 0,
/// every op of either end completes exactly once (aborted, or reset if the
/// other end's teardown reached it first), both handles are closed once.
#[test]
fn close_3_both_ends_closing_at_the_same_moment() {
    for round in 0..10u16 {
        // A host per round: the recorder counts upcalls per address.
        let h = Host::new();
        let (c, s) = pair(&h, 5614 + round);
        let bc = buf(&h, c, 4096, MEM_READWRITE);
        let bs = buf(&h, s, 4096, MEM_READWRITE);
        let ovs: Vec<Overlapped> = (0..4).map(|_| Overlapped::new(0)).collect();
        recv(&h, c, &bc, 0, 64, &ovs[0]).unwrap();
        recv(&h, s, &bs, 0, 64, &ovs[1]).unwrap();
        send(&h, c, &bc, 64, 64, &ovs[2]).unwrap();
        send(&h, s, &bs, 64, 64, &ovs[3]).unwrap();
        let handles = [h.p.switch_handle(c).unwrap(), h.p.switch_handle(s).unwrap()];
        let go = std::sync::Barrier::new(2);
        std::thread::scope(|t| {
            for sock in [c, s] {
                let (h, go) = (&h, &go);
                t.spawn(move || {
                    go.wait();
                    h.p.close_socket(sock).unwrap();
                });
            }
        });
        for ov in &ovs {
            // The receive of one end may have taken the other's send first.
            let (err, _) = done_ov(ov);
            assert!(
                [OK, ABORTED, CONNRESET].contains(&err),
                "round {round}: completed with {err}"
            );
            assert_eq!(h.sw.completions_of(ov), 1, "round {round}");
        }
        for hd in handles {
            assert!(h.sw.closed(hd), "round {round}");
        }
    }
}

/// A close racing other threads' calls on the same socket (§7-16): each
/// call either wins (an op it started completes, aborted, exactly once) or
/// fails `WSAENOTSOCK`; nothing else, nothing hangs.
#[test]
fn close_7_close_racing_calls_on_the_same_socket() {
    for round in 0..10u16 {
        // A host per round: the recorder counts upcalls per address.
        let h = Host::new();
        let (_c, s) = pair(&h, 5630 + round);
        let b = buf(&h, s, 1 << 16, MEM_READWRITE);
        let ovs: Vec<Overlapped> = (0..32).map(|_| Overlapped::new(0)).collect();
        let go = std::sync::Barrier::new(2);
        let started = std::thread::scope(|t| {
            let (h, go, b, ovs) = (&h, &go, &b, &ovs);
            let caller = t.spawn(move || {
                let mut started = Vec::new();
                go.wait();
                for (i, ov) in ovs.iter().enumerate() {
                    match recv(h, s, b, i * 64, 64, ov) {
                        Ok(()) => started.push(ov),
                        Err(e) => {
                            assert_eq!(e, WsaError::WSAENOTSOCK, "round {round}");
                            return started;
                        }
                    }
                    let mut v = [0u8; 4];
                    if let Err(e) = h.p.get_sockopt(s, SOL_SOCKET, SO_MAX_MSG_SIZE, &mut v) {
                        assert_eq!(e, WsaError::WSAENOTSOCK, "round {round}");
                        return started;
                    }
                }
                started
            });
            go.wait();
            h.p.close_socket(s).unwrap();
            caller.join().unwrap()
        });
        for ov in started {
            assert_eq!(done_ov(ov), (ABORTED, 0), "round {round}");
            assert_eq!(h.sw.completions_of(ov), 1);
        }
        assert_eq!(
            recv(&h, s, &b, 0, 64, &Overlapped::new(0)).unwrap_err(),
            WsaError::WSAENOTSOCK
        );
    }
}

/// The op-buffer half of CLOSE-10 (soft: the RDMA really in flight, the
/// peer's end silenced): once the abort completions are reported, the
/// buffers are the switch's again: what it writes there stays, and nothing
/// of an aborted write reaches the peer, through the peer's own close too.
#[test]
fn close_10_aborted_ops_leave_their_buffers_alone() {
    let h = Host::new();
    let (c, s) = pair(&h, 5650);
    let target = region(1 << 16);
    let d = expose(&h, s, &target, MEM_READWRITE);
    let b = buf(&h, c, 1 << 16, MEM_READWRITE);
    b.fill(1);
    if !h.stall(c, s) {
        eprintln!("skipped on verbs: a real peer cannot be silenced");
        return;
    }
    let ovs: Vec<Overlapped> = (0..3).map(|_| Overlapped::new(0)).collect();
    rdma_write(&h, c, &b, 0, 4096, &d, 0, &ovs[0]).unwrap();
    rdma_read(&h, c, &b, 4096, 4096, &d, 4096, &ovs[1]).unwrap();
    recv(&h, c, &b, 8192, 4096, &ovs[2]).unwrap();
    h.p.close_socket(c).unwrap();
    for ov in &ovs {
        assert_eq!(done_ov(ov), (ABORTED, 0));
    }
    b.fill(2);
    let mine = b.bytes(0, 3 * 4096);
    h.p.close_socket(s).unwrap();
    assert_eq!(b.bytes(0, 3 * 4096), mine, "an aborted op's buffer changed");
    let mut back = vec![1u8; 1 << 16];
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0), "an aborted write landed");
}

#[test]
fn close_10_closed_socket_exposures_reject_peer_rdma() {
    let h = Host::new();
    let (c, s) = pair(&h, 5609);
    let target = region(4096);
    let d = expose(&h, s, &target, MEM_WRITE | MEM_READ);
    let src = buf(&h, c, 4096, MEM_READWRITE);
    src.fill(5);
    h.p.close_socket(s).unwrap();
    let ov = Overlapped::new(0);
    match rdma_write(&h, c, &src, 0, 64, &d, 0, &ov) {
        Ok(()) => assert_ne!(wait_ov(&h, &ov).0, OK),
        Err(e) => assert_eq!(e, WsaError::WSAECONNRESET),
    }
    let mut back = vec![1u8; 4096];
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert_eq!(h.p.nic().stats().live_remote_keys, 0);
}

#[test]
fn close_11_no_fd_connect_after_close() {
    let mut cfg = test_config(poller_mode());
    cfg.connect.timeout_ms = 100;
    let h = Host::with_config(cfg);
    let ip = h.silent_host();
    let c = h.socket();
    let ev = Arc::new(Event::new());
    h.p.event_select(c, Some(ev.clone()), FD_CONNECT).unwrap();
    h.p.connect(c, SocketAddrV4::new(ip, 1), &[]).unwrap();
    h.p.close_socket(c).unwrap();
    // Longer than the connection-manager timeout that would have fired.
    assert!(!ev.wait(std::time::Duration::from_millis(500)));
    // Also for a connect that completes after close: accept after the
    // connector closed must not signal it.
    let (l, lev) = h.listener(5610, 4);
    let c2 = h.socket();
    let ev2 = Arc::new(Event::new());
    h.p.event_select(c2, Some(ev2.clone()), FD_CONNECT).unwrap();
    h.p.connect(c2, h.addr(5610), &[]).unwrap();
    assert!(lev.wait(TIMEOUT));
    h.p.close_socket(c2).unwrap();
    let _ = h.p.accept(l, &mut |_| Condition::Accept);
    assert!(!ev2.is_set());
    // FD_ACCEPT: a listener closed while a request was queued (its event
    // set) is signalled no more, whatever arrives afterwards.
    let (l2, lev2) = h.listener(5611, 4);
    let c3 = h.socket();
    h.p.connect(c3, h.addr(5611), &[]).unwrap();
    assert!(lev2.wait(TIMEOUT));
    let signals = lev2.set_count();
    h.p.close_socket(l2).unwrap();
    let c4 = h.socket();
    assert_eq!(
        connect_result(&h, c4, h.addr(5611)),
        Err(WsaError::WSAECONNRESET)
    );
    settle();
    assert_eq!(lev2.set_count(), signals, "FD_ACCEPT after close");
}

/// A connection whose NIC never flushes `c`'s end (soft: `NoFlush`, its
/// RDMA held in flight by `StallRdma`) with, pending on `c`, an RDMA write
/// into `target`, an RDMA read, a send the peer has no receive for, a
/// notified and a polled receive. `None` on verbs: a real NIC flushes.
struct NeverFlushed {
    c: ProviderSocket,
    s: ProviderSocket,
    q: sanpath::fabric::soft::QpFaults,
    target: sanpath::mem::region::Region,
    b: Buf,
    ovs: Vec<Overlapped>,
}

fn never_flushed(h: &Host, port: u16) -> Option<NeverFlushed> {
    let (c, s) = pair(h, port);
    let target = region(1 << 16);
    let d = expose(h, s, &target, MEM_READWRITE);
    let b = buf(h, c, 1 << 16, MEM_READWRITE);
    b.fill(1);
    let q = h.hold_rdma(c, s)?;
    q.arm(sanpath::fabric::soft::Fault::NoFlush);
    let ovs: Vec<Overlapped> = [0, 0, 0, 0, 1].map(Overlapped::new).into();
    rdma_write(h, c, &b, 0, 4096, &d, 0, &ovs[0]).unwrap();
    rdma_read(h, c, &b, 4096, 4096, &d, 4096, &ovs[1]).unwrap();
    send(h, c, &b, 8192, 64, &ovs[2]).unwrap();
    recv(h, c, &b, 12288, 4096, &ovs[3]).unwrap();
    recv(h, c, &b, 16384, 4096, &ovs[4]).unwrap();
    Some(NeverFlushed {
        c,
        s,
        q,
        target,
        b,
        ovs,
    })
}

impl NeverFlushed {
    /// Each op completed exactly once, `WSA_OPERATION_ABORTED`: notified
    /// ones by one upcall, the polled one in its record.
    fn assert_aborted_once(&self, h: &Host) {
        for ov in &self.ovs {
            assert_eq!(done_ov(ov), (ABORTED, 0));
            assert_eq!(h.sw.completions_of(ov), u32::from(ov.wants_upcall()));
        }
    }

    /// The NIC lets go: held RDMA and withheld flushes. Waits until its CQ
    /// produced every completion of `c`'s end.
    fn release_nic(&self) {
        self.q.release_rdma();
        self.q.release_flush();
        let deadline = std::time::Instant::now() + TIMEOUT;
        while self.q.outstanding() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the released NIC's completions were never reaped"
            );
            std::thread::yield_now();
        }
    }

    /// Nothing an aborted op named moved: the switch's bytes
    /// (`Buf::fill(seed)`) in its buffers, the peer's target untouched.
    fn assert_untouched(&self, seed: u8) {
        let mine: Vec<u8> = (0..5 * 4096).map(|i| seed.wrapping_add(i as u8)).collect();
        assert!(
            self.b.bytes(0, 5 * 4096) == mine,
            "an aborted op's buffer changed"
        );
        let mut back = vec![1u8; 1 << 16];
        self.target.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 0), "an aborted write landed");
    }
}

/// CLOSE-2 and BLOCK-4 against a NIC that never flushes: close returns
/// while the NIC still holds every op (a logical bound: the engine does
/// not force anything within this test's hour), the socket is gone
/// (CLOSE-7), and when the flushes come at last each op is aborted once
/// and the close-handle upcall follows; the write held in flight at the
/// close never lands.
#[test]
fn close_2_close_returns_while_the_nic_still_holds_its_ops() {
    let mut cfg = test_config(poller_mode());
    cfg.close.wait_ms = 20;
    cfg.close.quiesce_timeout_ms = 3_600_000;
    let h = Host::with_config(cfg);
    let Some(n) = never_flushed(&h, 5660) else {
        eprintln!("skipped on verbs: a real NIC flushes");
        return;
    };
    let hc = h.p.switch_handle(n.c).unwrap();
    let (p, c) = (h.p.clone(), n.c);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(p.close_socket(c)));
    rx.recv_timeout(TIMEOUT)
        .expect("close waited for the NIC")
        .unwrap();
    assert!(
        n.ovs.iter().all(Overlapped::is_pending),
        "close waited for ops the NIC never flushed"
    );
    assert!(!h.sw.closed(hc), "close-handle upcall before the ops");
    assert_eq!(h.p.close_socket(n.c).unwrap_err(), WsaError::WSAENOTSOCK);
    n.q.release_rdma();
    n.q.release_flush();
    h.sw.wait_for("the close-handle upcall", |u| {
        u.contains(&Upcall::Close { handle: hc })
    });
    n.assert_aborted_once(&h);
    n.release_nic();
    n.assert_untouched(1);
    h.p.close_socket(n.s).unwrap();
}

/// CLOSE-3, CLOSE-4 and CLOSE-10 when the NIC never flushes: past
/// `close.quiesce_timeout_ms` the engine abandons the queue pair and aborts
/// every op itself, each once, its slot freed before its upcall (the slots
/// in use, sampled inside each upcall, count down to 0), then the
/// close-handle upcall. After that nothing moves: the switch's bytes stay
/// in the buffers when the NIC lets go, the held write never lands, and
/// the completions the NIC delivers late are dropped (no op completes
/// twice: the recording switch flags it).
#[test]
fn close_3_4_and_10_ops_a_nic_never_flushed_are_aborted_by_the_engine() {
    let mut cfg = test_config(poller_mode());
    cfg.close.wait_ms = 0;
    cfg.close.quiesce_timeout_ms = 50;
    let h = Host::with_config(cfg);
    let Some(n) = never_flushed(&h, 5661) else {
        eprintln!("skipped on verbs: a real NIC flushes");
        return;
    };
    let hc = h.p.switch_handle(n.c).unwrap();
    let before = h.p.stats().ops_in_use;
    assert_eq!(before, n.ovs.len(), "only c's ops are pending");
    h.p.close_socket(n.c).unwrap();
    h.sw.wait_for("the close-handle upcall", |u| {
        u.contains(&Upcall::Close { handle: hc })
    });
    n.assert_aborted_once(&h);
    let left: Vec<usize> =
        h.sw.upcalls()
            .iter()
            .filter_map(|u| match u {
                Upcall::Complete {
                    handle, ops_in_use, ..
                } if *handle == hc => Some(*ops_in_use),
                _ => None,
            })
            .collect();
    let notified = n.ovs.iter().filter(|ov| ov.wants_upcall()).count();
    assert_eq!(left.len(), notified);
    assert!(
        left.windows(2).all(|w| w[0] > w[1]) && left.iter().all(|&k| k < before),
        "an op's slot was still in use at its upcall: {left:?}"
    );
    assert_eq!(h.p.stats().ops_in_use, 0);
    n.b.fill(2);
    n.release_nic();
    n.assert_untouched(2);
    n.assert_aborted_once(&h);
    h.p.close_socket(n.s).unwrap();
}
