use crate::harness::*;
use sanpath::spi::*;
use sanpath::WsaError;

#[test]
fn rdma_1_write_lands_exactly_at_offset() {
    let h = Host::new();
    let (c, s) = pair(&h, 5400);
    let target = region(16384);
    let d = expose(&h, s, &target, MEM_WRITE);
    let src = buf(&h, c, 8192, MEM_READWRITE);
    src.fill(11);
    let ov = Overlapped::new(0);
    // Two gather buffers, written at offset 1000.
    // SAFETY: buffers and overlapped outlive the op.
    unsafe {
        h.p.rdma_write(
            c,
            &[src.wsabufex(0, 3000), src.wsabufex(5000, 1234)],
            &d,
            1000,
            0,
            &ov,
        )
        .unwrap();
    }
    assert_eq!(wait_ov(&h, &ov), (OK, 4234));
    let mut got = vec![0u8; 16384];
    target.read_at(0, &mut got).unwrap();
    assert!(got[..1000].iter().all(|&b| b == 0));
    assert_eq!(&got[1000..4000], &src.bytes(0, 3000)[..]);
    assert_eq!(&got[4000..5234], &src.bytes(5000, 1234)[..]);
    assert!(got[5234..].iter().all(|&b| b == 0));
}

#[test]
fn rdma_2_read_fills_local_buffers_from_offset() {
    let h = Host::new();
    let (c, s) = pair(&h, 5401);
    let source = region(8192);
    let pattern: Vec<u8> = (0..8192).map(|i| (i * 7 % 251) as u8).collect();
    source.write_at(0, &pattern).unwrap();
    let d = expose(&h, s, &source, MEM_READ);
    let dst = buf(&h, c, 8192, MEM_READWRITE);
    let ov = Overlapped::new(0);
    rdma_read(&h, c, &dst, 100, 4000, &d, 2000, &ov).unwrap();
    assert_eq!(wait_ov(&h, &ov), (OK, 4000));
    assert_eq!(dst.bytes(100, 4000), pattern[2000..6000].to_vec());
}

#[test]
fn rdma_3_started_ops_pend_failed_ones_never_complete() {
    let h = Host::new();
    let (c, s) = pair(&h, 5402);
    let target = region(4096);
    let d = expose(&h, s, &target, MEM_WRITE);
    let src = buf(&h, c, 4096, MEM_READWRITE);
    let before = h.sw.upcalls().len();
    let bad = Overlapped::new(0);
    // Beyond the exposed length, short descriptor, corrupted magic, foreign handle.
    assert_eq!(
        rdma_write(&h, c, &src, 0, 64, &d, 4090, &bad).unwrap_err(),
        WsaError::WSAEINVAL
    );
    assert_eq!(
        rdma_write(&h, c, &src, 0, 64, &d[..8], 0, &bad).unwrap_err(),
        WsaError::WSAEFAULT
    );
    let mut corrupt = d.clone();
    corrupt[0] ^= 0xFF;
    assert_eq!(
        rdma_write(&h, c, &src, 0, 64, &corrupt, 0, &bad).unwrap_err(),
        WsaError::WSAEINVAL
    );
    // SAFETY: nothing is started.
    let e = unsafe {
        h.p.rdma_write(
            c,
            &[WsaBufEx {
                len: 64,
                buf: src.ptr(),
                handle: 12345,
            }],
            &d,
            0,
            0,
            &bad,
        )
        .unwrap_err()
    };
    assert_eq!(e, WsaError::WSAEINVAL);
    assert_eq!(h.p.stats().ops_in_use, 0);
    assert_eq!(
        h.sw.upcalls().len(),
        before,
        "no completion for calls that failed"
    );
    let ok = Overlapped::new(0);
    rdma_write(&h, c, &src, 0, 64, &d, 0, &ok).unwrap();
    assert_eq!(wait_ov(&h, &ok).0, OK);
}

#[test]
fn rdma_4_completion_follows_the_hevent_rule() {
    let h = Host::new();
    let (c, s) = pair(&h, 5403);
    let target = region(4096);
    let d = expose(&h, s, &target, MEM_WRITE);
    let src = buf(&h, c, 4096, MEM_READWRITE);
    let (notify, quiet) = (Overlapped::new(0x1000), Overlapped::new(0x1001));
    rdma_write(&h, c, &src, 0, 64, &d, 0, &notify).unwrap();
    rdma_write(&h, c, &src, 0, 64, &d, 64, &quiet).unwrap();
    h.sw.wait_completions(&notify, 1);
    assert_eq!(h.p.get_overlapped_result(c, &quiet, true).unwrap(), (64, 0));
    assert_eq!(
        h.p.get_overlapped_result(c, &notify, false).unwrap(),
        (64, 0)
    );
    assert_eq!(h.sw.completions_of(&quiet), 0);
}

#[test]
fn rdma_5_sends_progress_while_rdma_is_pending() {
    let h = Host::new();
    let (c, s) = pair(&h, 5404);
    let target = region(1 << 20);
    let d = expose(&h, s, &target, MEM_WRITE);
    let src = buf(&h, c, 1 << 20, MEM_READWRITE);
    src.fill(5);
    let bs = buf(&h, s, 4096, MEM_READWRITE);
    // Soft: the write stays on the wire, unexecuted, until released.
    let held = h.hold_rdma(c, s);
    let untouched = || {
        let mut got = vec![0u8; 1 << 20];
        target.read_at(0, &mut got).unwrap();
        got.iter().all(|&b| b == 0)
    };
    let w = Overlapped::new(1);
    rdma_write(&h, c, &src, 0, 1 << 20, &d, 0, &w).unwrap();
    // On verbs the NIC may have finished the write already.
    if held.is_some() {
        assert!(untouched(), "a held write touched the target");
        assert_eq!(
            h.p.get_overlapped_result(c, &w, false),
            Err(WsaError::WSA_IO_INCOMPLETE)
        );
        assert!(w.is_pending());
    }
    let sends: Vec<Overlapped> = (0..4).map(|_| Overlapped::new(0)).collect();
    let recvs: Vec<Overlapped> = (0..4).map(|_| Overlapped::new(0)).collect();
    for (i, (sd, rv)) in sends.iter().zip(&recvs).enumerate() {
        recv(&h, s, &bs, i * 64, 64, rv).unwrap();
        send(&h, c, &src, i * 64, 64, sd).unwrap();
    }
    for ov in sends.iter().chain(&recvs) {
        assert_eq!(wait_ov(&h, ov), (OK, 64));
    }
    assert_eq!(bs.bytes(0, 256), src.bytes(0, 256));
    let Some(held) = held else {
        eprintln!(
            "verbs: a real NIC's RDMA cannot be held in flight; checked only that \
             the sends behind a 1 MiB write complete"
        );
        assert_eq!(wait_polled(&h, c, &w), (OK, 1 << 20));
        return;
    };
    // The sends completed around the write, which is still in flight.
    assert!(untouched(), "a held write touched the target");
    assert_eq!(
        h.p.get_overlapped_result(c, &w, false),
        Err(WsaError::WSA_IO_INCOMPLETE)
    );
    assert!(w.is_pending());
    held.release_rdma();
    assert_eq!(wait_polled(&h, c, &w), (OK, 1 << 20));
    let mut got = vec![0u8; 1 << 20];
    target.read_at(0, &mut got).unwrap();
    assert!(got == src.bytes(0, 1 << 20), "the released write's bytes");
}
