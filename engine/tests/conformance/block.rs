use crate::harness::*;
use sanpath::config::PollerMode;
use sanpath::event::Event;
use sanpath::spi::*;
use sanpath::WsaError;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    assert!(
        took < Duration::from_millis(500),
        "close of a pending connect took {took:?}"
    );
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

#[test]
fn block_6_data_calls_never_block_in_nonblocking_mode() {
    let h = Host::new();
    let (c, s) = pair(&h, 5703);
    let ev = Arc::new(Event::new());
    h.p.event_select(s, Some(ev), FD_CONNECT).unwrap();
    let b = buf(&h, s, 4096, MEM_READWRITE);
    let ovs: Vec<Overlapped> = (0..8).map(|_| Overlapped::new(0)).collect();
    for (i, ov) in ovs.iter().enumerate() {
        recv(&h, s, &b, i * 64, 64, ov).unwrap();
    }
    assert!(ovs.iter().all(|o| o.is_pending()));
    h.p.close_socket(s).unwrap();
    for ov in &ovs {
        assert_eq!(wait_ov(&h, ov).0, ABORTED);
    }
    h.p.close_socket(c).unwrap();
}
