use crate::harness::*;
use sanpath::config::PollerMode;
use sanpath::spi::*;
use sanpath::WsaError;

#[test]
fn start_1_version_below_2_2_is_refused() {
    let h = Host::new();
    for v in [0x0101u16, 0x0002, 0x0102, 0x0201] {
        assert_eq!(
            h.p.startup(v, h.sw.clone(), 1).unwrap_err(),
            WsaError::WSAVERNOTSUPPORTED,
            "version {v:#06x}"
        );
    }
    // 2.2 and anything newer are served at 2.2.
    let d = h.p.startup(0x0302, h.sw.clone(), 1).unwrap();
    assert_eq!((d.version, d.high_version), (WSD_VERSION, WSD_VERSION));
    h.p.cleanup().unwrap();
}

#[test]
fn start_5_refcount_only_last_cleanup_releases() {
    let h = Host::new();
    h.p.startup(WSD_VERSION, h.sw.clone(), 1).unwrap();
    h.p.startup(WSD_VERSION, h.sw.clone(), 1).unwrap();
    h.p.cleanup().unwrap();
    h.p.cleanup().unwrap();
    // Still fully usable after N-1 cleanups.
    let (c, s) = pair(&h, 5000);
    let b = buf(&h, s, 4096, MEM_READWRITE);
    let ov = Overlapped::new(0);
    recv(&h, s, &b, 0, 64, &ov).unwrap();
    h.p.cleanup().unwrap();
    assert!(!h.p.is_started());
    assert_eq!(
        h.p.socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, 1, 0)
            .unwrap_err(),
        WsaError::WSANOTINITIALISED
    );
    assert_eq!(
        h.p.close_socket(c).unwrap_err(),
        WsaError::WSANOTINITIALISED
    );
    assert_eq!(wait_ov(&h, &ov).0, ABORTED);
    assert_eq!(h.p.stats().ops_in_use, 0);
}

#[test]
fn start_6_cleanup_without_startup_is_not_initialised() {
    let h = Host::new();
    h.p.cleanup().unwrap();
    assert_eq!(h.p.cleanup().unwrap_err(), WsaError::WSANOTINITIALISED);
}

#[test]
fn start_7_final_cleanup_aborts_every_pending_op() {
    for mode in [PollerMode::Threads, PollerMode::RunToCompletion] {
        let h = Host::with_config(test_config(mode));
        let (c, s) = pair(&h, 5001);
        let bs = buf(&h, s, 4096, MEM_READWRITE);
        let bc = buf(&h, c, 4096, MEM_READWRITE);
        let ovs: Vec<Overlapped> = (0..4).map(|_| Overlapped::new(0)).collect();
        recv(&h, s, &bs, 0, 100, &ovs[0]).unwrap();
        recv(&h, s, &bs, 100, 100, &ovs[1]).unwrap();
        recv(&h, c, &bc, 0, 100, &ovs[2]).unwrap();
        let polled = Overlapped::new(1);
        recv(&h, c, &bc, 100, 100, &polled).unwrap();
        let handles = [h.p.switch_handle(c).unwrap(), h.p.switch_handle(s).unwrap()];
        h.p.cleanup().unwrap();
        for ov in &ovs[..3] {
            assert_eq!(wait_ov(&h, ov).0, ABORTED);
            assert_eq!(h.sw.completions_of(ov), 1);
        }
        assert_eq!(done_ov(&polled).0, ABORTED);
        assert_eq!(h.sw.completions_of(&polled), 0);
        for hd in handles {
            assert!(h.sw.closed(hd));
        }
    }
}

#[test]
fn start_8_get_qos_by_name_is_not_supported() {
    let h = Host::new();
    let s = h.socket();
    assert_eq!(h.p.get_qos_by_name(s).unwrap_err(), WsaError::WSAEOPNOTSUPP);
}

#[test]
fn start_14_repeated_startup_keeps_the_first_switch() {
    let h = Host::new();
    let other = RecordingSwitch::new();
    h.p.startup(WSD_VERSION, other.clone(), 2).unwrap();
    let _s = h.socket();
    assert!(other.upcalls().is_empty());
    h.p.cleanup().unwrap();
}

/// START-7 and CLOSE-5 when the NIC never flushes: the last cleanup ends
/// both a close that returned before its ops were over and the close of a
/// socket still open, within `close.quiesce_timeout_ms` (not the test's
/// hour): every op is aborted once and every socket gets its close-handle
/// upcall by the time cleanup returned.
#[test]
fn start_7_final_cleanup_ends_closes_whose_nic_never_flushed() {
    use sanpath::fabric::soft::Fault;
    let mut cfg = test_config(poller_mode());
    cfg.close.wait_ms = 0;
    cfg.close.quiesce_timeout_ms = 100;
    let h = Host::with_config(cfg);
    let (c1, s1) = pair(&h, 5062);
    let (c2, s2) = pair(&h, 5063);
    let mut faults = Vec::new();
    let mut bufs = Vec::new();
    // A notified and a polled receive on each of c1 and c2.
    let ovs: Vec<Overlapped> = [0, 1, 0, 1].map(Overlapped::new).into();
    for (k, (c, s)) in [(c1, s1), (c2, s2)].into_iter().enumerate() {
        let Some(q) = h.hold_rdma(c, s) else {
            eprintln!("skipped on verbs: a real NIC flushes");
            return;
        };
        q.arm(Fault::NoFlush);
        let b = buf(&h, c, 4096, MEM_READWRITE);
        for (i, ov) in ovs[2 * k..2 * k + 2].iter().enumerate() {
            recv(&h, c, &b, i * 1024, 1024, ov).unwrap();
        }
        faults.push(q);
        bufs.push(b);
    }
    let handles: Vec<SwitchHandle> = [c1, s1, c2, s2]
        .iter()
        .map(|&s| h.p.switch_handle(s).unwrap())
        .collect();
    h.p.close_socket(c1).unwrap();
    let p = h.p.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(p.cleanup()));
    rx.recv_timeout(TIMEOUT)
        .expect("the last cleanup did not return")
        .unwrap();
    for (i, ov) in ovs.iter().enumerate() {
        assert!(
            !ov.is_pending(),
            "op {i} still pending after the last cleanup"
        );
        assert_eq!(done_ov(ov).0, ABORTED);
        assert_eq!(h.sw.completions_of(ov), u32::from(ov.wants_upcall()));
    }
    for hd in handles {
        assert!(h.sw.closed(hd), "a socket lost its close-handle upcall");
    }
    for q in faults {
        q.release_flush();
    }
}
