use crate::harness::*;
use sanpath::config::PollerMode;
use sanpath::event::Event;
use sanpath::spi::*;
use sanpath::WsaError;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Instant;

#[test]
fn block_2_close_during_connect_is_prompt_and_frees_it() {
    let mut cfg = test_config(poller_mode());
    // A transport timeout far beyond anything the close may take.
    cfg.connect.timeout_ms = 60_000;
    let h = Host::with_config(cfg);
    let ip = h.silent_host();
    let (stats, nic) = (h.p.stats(), h.p.nic().stats());
    let c = h.socket();
    let hc = h.p.switch_handle(c).unwrap();
    let ev = Arc::new(Event::new());
    h.p.event_select(c, Some(ev.clone()), FD_CONNECT).unwrap();
    h.p.connect(c, SocketAddrV4::new(ip, 9), &[]).unwrap();
    let t = Instant::now();
    h.p.close_socket(c).unwrap();
    let took = t.elapsed();
    assert!(took < prompt(), "close of a pending connect took {took:?}");
    // Resources back to where they were before the socket.
    assert!(h.sw.closed(hc));
    assert_eq!(h.p.stats(), stats);
    let after = h.p.nic().stats();
    assert_eq!(
        (after.live_qps, after.live_regions, after.live_remote_keys),
        (nic.live_qps, nic.live_regions, nic.live_remote_keys)
    );
    assert_eq!(ev.set_count(), 0);
}

#[test]
fn block_3_no_half_accepted_socket_after_connector_closed() {
    let h = Host::new();
    let (l, lev) = h.listener(5700, 4);
    let c = h.socket();
    h.p.connect(c, h.addr(5700), &[]).unwrap();
    assert!(lev.wait(TIMEOUT));
    h.p.close_socket(c).unwrap();
    // On a real wire the connector's departure reaches the listener a
    // moment later.
    settle();
    let before = h.sw.upcalls().len();
    assert_eq!(
        h.p.accept(l, &mut |_| Condition::Accept).unwrap_err(),
        WsaError::WSAEWOULDBLOCK
    );
    assert_eq!(
        h.sw.upcalls().len(),
        before,
        "no socket made for a vanished request"
    );
    assert_eq!(h.p.stats().sockets, 1, "only the listener is left");
}

/// A really stalled RDMA (soft fabric: the peer's end answers nothing, as
/// a hung peer or NIC would): close forces the write's and the read's
/// completion with `WSA_OPERATION_ABORTED`, at once, and the stalled write
/// never lands. (Verbs cannot stall a peer: the next test covers it there.)
#[test]
fn block_4_close_forces_a_stalled_rdma_to_complete_aborted() {
    let h = Host::new();
    let (c, s) = pair(&h, 5705);
    let target = region(1 << 16);
    let d = expose(&h, s, &target, MEM_READWRITE);
    let b = buf(&h, c, 1 << 16, MEM_READWRITE);
    b.fill(9);
    if !h.stall(c, s) {
        eprintln!("skipped on verbs: a real peer cannot be silenced");
        return;
    }
    let (w, r) = (Overlapped::new(0), Overlapped::new(1));
    rdma_write(&h, c, &b, 0, 4096, &d, 0, &w).unwrap();
    rdma_read(&h, c, &b, 4096, 4096, &d, 4096, &r).unwrap();
    assert!(w.is_pending() && r.is_pending());
    let t = Instant::now();
    h.p.close_socket(c).unwrap();
    assert!(t.elapsed() < prompt(), "close waited");
    assert_eq!(done_ov(&w), (ABORTED, 0));
    assert_eq!(done_ov(&r), (ABORTED, 0));
    assert_eq!(h.sw.completions_of(&w), 1);
    assert_eq!(h.sw.completions_of(&r), 0);
    let mut back = vec![1u8; 4096];
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0), "the stalled write landed");
}

#[test]
fn block_4_close_forces_rdma_completion_with_abort() {
    // Run-to-completion with polled ops nobody polled: the RDMA ops are
    // executed by the NIC but not yet reported, i.e. pending for the switch.
    let h = Host::with_config(test_config(PollerMode::RunToCompletion));
    let (c, s) = pair(&h, 5701);
    let target = region(1 << 20);
    let d = expose(&h, s, &target, MEM_READWRITE);
    let b = buf(&h, c, 1 << 20, MEM_READWRITE);
    let (w, r) = (Overlapped::new(1), Overlapped::new(1));
    rdma_write(&h, c, &b, 0, 1 << 19, &d, 0, &w).unwrap();
    rdma_read(&h, c, &b, 1 << 19, 1 << 19, &d, 0, &r).unwrap();
    assert!(w.is_pending() && r.is_pending());
    h.p.close_socket(c).unwrap();
    assert_eq!(done_ov(&w), (ABORTED, 0));
    assert_eq!(done_ov(&r), (ABORTED, 0));
    assert_eq!(h.p.stats().ops_in_use, 0);
}

/// A cancelled transfer: the connection broke under an RDMA (the peer
/// revoked its buffer), every call on the socket fails, close succeeds.
#[test]
fn block_5_close_succeeds_after_a_cancelled_transfer() {
    let h = Host::new();
    let (c, s) = pair(&h, 5706);
    let target = region(4096);
    let d = expose(&h, s, &target, MEM_WRITE);
    h.p.deregister_rdma_memory(s, &d).unwrap();
    let b = buf(&h, c, 4096, MEM_READWRITE);
    let (r, w) = (Overlapped::new(0), Overlapped::new(0));
    recv(&h, c, &b, 0, 64, &r).unwrap();
    rdma_write(&h, c, &b, 64, 64, &d, 0, &w).unwrap();
    assert_eq!(wait_ov(&h, &w).0, CONNRESET);
    assert_eq!(wait_ov(&h, &r).0, CONNRESET);
    let ov = Overlapped::new(0);
    assert!(send(&h, c, &b, 0, 8, &ov).is_err());
    assert!(recv(&h, c, &b, 0, 8, &ov).is_err());
    assert!(rdma_write(&h, c, &b, 0, 8, &d, 0, &ov).is_err());
    let hc = h.p.switch_handle(c).unwrap();
    h.p.close_socket(c).unwrap();
    assert!(h.sw.closed(hc));
    assert_eq!(h.p.close_socket(c).unwrap_err(), WsaError::WSAENOTSOCK);
    h.p.close_socket(s).unwrap();
}

#[test]
fn block_5_close_succeeds_after_aborted_connect() {
    let h = Host::new();
    let c = h.socket();
    assert_eq!(
        connect_result(&h, c, h.addr(5702)),
        Err(WsaError::WSAECONNRESET)
    );
    let ov = Overlapped::new(0);
    let r = region(4096);
    // SAFETY: nothing is started on an unconnected socket.
    unsafe {
        assert!(h
            .p
            .recv(
                c,
                &[WsaBuf {
                    len: 8,
                    buf: r.as_ptr()
                }],
                &ov
            )
            .is_err())
    };
    h.p.close_socket(c).unwrap();
}

/// Receives, sends and (soft) RDMA that cannot complete: each call
/// returns with its op pending, on a socket in blocking mode (no
/// `WSPEventSelect`) and in non-blocking mode.
fn data_calls_never_block(port: u16, nonblocking: bool) {
    let h = Host::new();
    let (c, s) = pair(&h, port);
    if nonblocking {
        let ev = Arc::new(Event::new());
        h.p.event_select(s, Some(ev), FD_CONNECT).unwrap();
    }
    let b = buf(&h, s, 1 << 16, MEM_READWRITE);
    let target = region(1 << 16);
    let d = expose(&h, c, &target, MEM_READWRITE);
    // The peer posts no receive (sends wait for one) and, on the soft
    // fabric, answers nothing (RDMA waits too).
    let stalled = h.stall(s, c);
    let ovs: Vec<Overlapped> = (0..12).map(|_| Overlapped::new(0)).collect();
    let mut started = Vec::new();
    for (i, ov) in ovs.iter().enumerate() {
        let off = i * 4096;
        match i % 4 {
            0 => recv(&h, s, &b, off, 64, ov).unwrap(),
            1 => send(&h, s, &b, off, 64, ov).unwrap(),
            2 if stalled => rdma_write(&h, s, &b, off, 64, &d, 0, ov).unwrap(),
            3 if stalled => rdma_read(&h, s, &b, off, 64, &d, 0, ov).unwrap(),
            _ => continue,
        }
        assert!(ov.is_pending(), "op {i} returned complete: the call waited");
        started.push(ov);
    }
    h.p.close_socket(s).unwrap();
    for ov in started {
        assert_eq!(done_ov(ov).0, ABORTED);
    }
    h.p.close_socket(c).unwrap();
}

#[test]
fn block_6_data_calls_never_block_in_nonblocking_mode() {
    data_calls_never_block(5703, true);
}

#[test]
fn block_6_data_calls_never_block_in_blocking_mode() {
    data_calls_never_block(5704, false);
}
