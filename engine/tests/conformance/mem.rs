use crate::harness::*;
use sanpath::spi::*;
use sanpath::WsaError;

#[test]
fn mem_1_register_needs_connection_flags_and_mapped_memory() {
    let h = Host::new();
    let (c, _s) = pair(&h, 5300);
    let r = region(8192);
    // SAFETY: the region outlives the registrations.
    unsafe {
        let handle = h.p.register_memory(c, r.as_ptr(), 4096, MEM_READ).unwrap();
        assert_ne!(handle, 0);
        let un = h.socket();
        assert_eq!(
            h.p.register_memory(un, r.as_ptr(), 4096, MEM_READ)
                .unwrap_err(),
            WsaError::WSAENOTCONN
        );
        for bad in [0, 4, 7, 0x100] {
            assert_eq!(
                h.p.register_memory(c, r.as_ptr(), 4096, bad).unwrap_err(),
                WsaError::WSAEINVAL
            );
        }
        // Page 1 is below mmap_min_addr: never mapped, whatever other
        // test threads map meanwhile.
        let addr = 0x1000 as *mut u8;
        assert_eq!(
            h.p.register_memory(c, addr, 4096, MEM_READ).unwrap_err(),
            WsaError::WSAEFAULT
        );
        assert_eq!(
            h.p.register_memory(c, std::ptr::null_mut(), 4096, MEM_READ)
                .unwrap_err(),
            WsaError::WSAEFAULT
        );
        h.p.deregister_memory(c, handle).unwrap();
    }
}

#[test]
fn mem_2_shared_buffer_refcounted_across_sockets() {
    let h = Host::new();
    let (c1, s1) = pair(&h, 5301);
    let (c2, _s2) = pair(&h, 5302);
    let r = region(4096);
    let live0 = h.p.nic().stats().live_regions;
    // SAFETY: the region outlives the registrations.
    let (h1, h2) = unsafe {
        (
            h.p.register_memory(c1, r.as_ptr(), 4096, MEM_READWRITE)
                .unwrap(),
            h.p.register_memory(c2, r.as_ptr(), 4096, MEM_READWRITE)
                .unwrap(),
        )
    };
    assert_eq!(
        h.p.nic().stats().live_regions,
        live0 + 1,
        "one NIC registration shared"
    );
    h.p.deregister_memory(c2, h2).unwrap();
    // Still usable on c1.
    let bs = buf(&h, s1, 4096, MEM_READWRITE);
    let (rv, sd) = (Overlapped::new(0), Overlapped::new(0));
    recv(&h, s1, &bs, 0, 128, &rv).unwrap();
    // SAFETY: r outlives the op.
    unsafe {
        h.p.send(
            c1,
            &[WsaBuf {
                len: 128,
                buf: r.as_ptr(),
            }],
            0,
            &sd,
        )
        .unwrap()
    };
    assert_eq!(wait_ov(&h, &sd).0, OK);
    assert_eq!(wait_ov(&h, &rv), (OK, 128));
    assert_eq!(h.p.nic().stats().live_regions, live0 + 2);
    h.p.deregister_memory(c1, h1).unwrap();
    assert_eq!(
        h.p.nic().stats().live_regions,
        live0 + 1,
        "last deregistration frees"
    );
    assert_eq!(
        h.p.deregister_memory(c1, h1).unwrap_err(),
        WsaError::WSAEINVAL
    );
}

#[test]
fn mem_3_deregister_unknown_or_in_use_is_einval() {
    let h = Host::new();
    let (c, s) = pair(&h, 5303);
    let b = buf(&h, s, 4096, MEM_READWRITE);
    assert_eq!(
        h.p.deregister_memory(s, 0xDEAD).unwrap_err(),
        WsaError::WSAEINVAL
    );
    assert_eq!(
        h.p.deregister_memory(c, b.handle).unwrap_err(),
        WsaError::WSAEINVAL,
        "foreign socket's handle"
    );
    let ov = Overlapped::new(0);
    recv(&h, s, &b, 0, 64, &ov).unwrap();
    assert_eq!(
        h.p.deregister_memory(s, b.handle).unwrap_err(),
        WsaError::WSAEINVAL
    );
    h.p.close_socket(c).unwrap();
    assert_eq!(wait_ov(&h, &ov).0, CONNRESET);
    h.p.deregister_memory(s, b.handle).unwrap();
}

/// Spec §3.1: `WSPDeregisterRdmaMemory` while the exposed memory is used
/// by a pending op of the socket ⇒ `WSAEINVAL`, and the exposure stays.
#[test]
fn mem_3_deregister_rdma_memory_in_use_is_einval() {
    let h = Host::new();
    let (c, s) = pair(&h, 5310);
    let b = buf(&h, s, 8192, MEM_READWRITE);
    let d = expose(&h, s, &b.region, MEM_WRITE);
    let ov = Overlapped::new(0);
    recv(&h, s, &b, 4096, 64, &ov).unwrap();
    assert_eq!(
        h.p.deregister_rdma_memory(s, &d).unwrap_err(),
        WsaError::WSAEINVAL
    );
    // Still exposed: the peer's RDMA write lands.
    let src = buf(&h, c, 4096, MEM_READWRITE);
    src.fill(9);
    let w = Overlapped::new(0);
    rdma_write(&h, c, &src, 0, 64, &d, 0, &w).unwrap();
    assert_eq!(wait_ov(&h, &w), (OK, 64));
    assert_eq!(b.bytes(0, 64), src.bytes(0, 64));
    // The receive done, the exposure can go.
    let sd = Overlapped::new(0);
    send(&h, c, &src, 0, 64, &sd).unwrap();
    assert_eq!(wait_ov(&h, &ov), (OK, 64));
    assert_eq!(wait_ov(&h, &sd), (OK, 64));
    h.p.deregister_rdma_memory(s, &d).unwrap();
}

#[test]
fn mem_4_small_descriptor_block_is_efault_then_retry_works() {
    let h = Host::new();
    let (c, _s) = pair(&h, 5304);
    let r = region(4096);
    let mut small = [0u8; 16];
    // SAFETY: the region outlives the registration.
    unsafe {
        assert_eq!(
            h.p.register_rdma_memory(c, r.as_ptr(), 4096, MEM_WRITE, &mut small)
                .unwrap_err(),
            WsaError::WSAEFAULT
        );
        let mut d = vec![0u8; RDMA_DESCRIPTOR_LEN];
        assert_eq!(
            h.p.register_rdma_memory(c, r.as_ptr(), 4096, MEM_WRITE, &mut d)
                .unwrap(),
            RDMA_DESCRIPTOR_LEN
        );
        h.p.deregister_rdma_memory(c, &d).unwrap();
        assert_eq!(
            h.p.deregister_rdma_memory(c, &d).unwrap_err(),
            WsaError::WSAEINVAL
        );
    }
}

#[test]
fn mem_5_exposure_rights_are_enforced() {
    let h = Host::new();
    // Read-only exposure: the peer's write fails, memory unchanged.
    let (c, s) = pair(&h, 5305);
    let target = region(4096);
    let d = expose(&h, s, &target, MEM_READ);
    let src = buf(&h, c, 4096, MEM_READWRITE);
    src.fill(9);
    let ov = Overlapped::new(0);
    rdma_write(&h, c, &src, 0, 512, &d, 0, &ov).unwrap();
    assert_eq!(wait_ov(&h, &ov).0, CONNRESET);
    let mut back = vec![1u8; 512];
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0), "read-only target was written");
    // Write-only exposure: the peer's read fails.
    let (c, s) = pair(&h, 5306);
    let source = region(4096);
    source.write_at(0, &[0x5A; 4096]).unwrap();
    let d = expose(&h, s, &source, MEM_WRITE);
    let dst = buf(&h, c, 4096, MEM_READWRITE);
    let ov = Overlapped::new(0);
    rdma_read(&h, c, &dst, 0, 512, &d, 0, &ov).unwrap();
    assert_eq!(wait_ov(&h, &ov).0, CONNRESET);
    assert!(
        dst.bytes(0, 512).iter().all(|&b| b == 0),
        "write-only source was read"
    );
}

#[test]
fn mem_6_deregistered_exposure_is_unreachable() {
    let h = Host::new();
    let (c, s) = pair(&h, 5307);
    let target = region(4096);
    let d = expose(&h, s, &target, MEM_WRITE);
    h.p.deregister_rdma_memory(s, &d).unwrap();
    let src = buf(&h, c, 4096, MEM_READWRITE);
    src.fill(3);
    let ov = Overlapped::new(0);
    rdma_write(&h, c, &src, 0, 64, &d, 0, &ov).unwrap();
    assert_eq!(wait_ov(&h, &ov).0, CONNRESET);
    let mut back = vec![1u8; 64];
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

/// MEM-6 with the registration cache on: a deregistered exposure stays
/// registered in the cache, yet its descriptor reaches nothing: neither
/// while it is cached, nor once the same buffer is exposed again from the
/// cache under a new descriptor.
#[test]
fn mem_6_with_the_cache_on_a_cached_exposure_is_unreachable() {
    let mut config = test_config(poller_mode());
    config.mr_cache.enabled = true;
    let h = Host::with_config(config);
    let target = region(4096);
    let untouched = |from: usize| {
        let mut back = vec![1u8; 64];
        target.read_at(from, &mut back).unwrap();
        back.iter().all(|&b| b == 0)
    };
    // While cached.
    let (c, s) = pair(&h, 5311);
    let src = buf(&h, c, 4096, MEM_READWRITE);
    src.fill(6);
    let d = expose(&h, s, &target, MEM_WRITE);
    let w = Overlapped::new(0);
    rdma_write(&h, c, &src, 0, 64, &d, 0, &w).unwrap();
    assert_eq!(wait_ov(&h, &w), (OK, 64), "exposed: the write lands");
    h.p.deregister_rdma_memory(s, &d).unwrap();
    assert_eq!(
        h.p.registration_stats().cached_entries,
        1,
        "kept in the cache"
    );
    let stale = Overlapped::new(0);
    rdma_write(&h, c, &src, 0, 64, &d, 64, &stale).unwrap();
    assert_eq!(wait_ov(&h, &stale).0, CONNRESET);
    assert!(untouched(64), "a cached exposure was written");
    // Exposed again from the cache: the old descriptor stays dead.
    let (c2, s2) = pair(&h, 5312);
    let src2 = buf(&h, c2, 4096, MEM_READWRITE);
    src2.fill(7);
    let d2 = expose(&h, s2, &target, MEM_WRITE);
    h.p.deregister_rdma_memory(s2, &d2).unwrap();
    let hits = h.p.registration_stats().cache_hits;
    let d3 = expose(&h, s2, &target, MEM_WRITE);
    assert_eq!(h.p.registration_stats().cache_hits, hits + 1, "a cache hit");
    assert_ne!(d3, d2);
    let stale = Overlapped::new(0);
    rdma_write(&h, c2, &src2, 0, 64, &d2, 128, &stale).unwrap();
    assert_eq!(wait_ov(&h, &stale).0, CONNRESET);
    assert!(
        untouched(128),
        "the old descriptor of a re-exposed buffer was used"
    );
}

#[test]
fn mem_7_descriptor_only_works_on_its_connection() {
    let h = Host::new();
    let (c1, s1) = pair(&h, 5308);
    let (c2, _s2) = pair(&h, 5309);
    let target = region(4096);
    let d = expose(&h, s1, &target, MEM_WRITE);
    let src = buf(&h, c2, 4096, MEM_READWRITE);
    src.fill(4);
    let ov = Overlapped::new(0);
    rdma_write(&h, c2, &src, 0, 64, &d, 0, &ov).unwrap();
    assert_eq!(wait_ov(&h, &ov).0, CONNRESET);
    let mut back = vec![1u8; 64];
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    // And not after its connection closed: neither from its own peer nor
    // from a live connection on the same NIC.
    let src1 = buf(&h, c1, 4096, MEM_READWRITE);
    h.p.close_socket(s1).unwrap();
    let ov = Overlapped::new(0);
    match rdma_write(&h, c1, &src1, 0, 64, &d, 0, &ov) {
        Ok(()) => assert_ne!(wait_ov(&h, &ov).0, OK),
        Err(e) => assert_eq!(e, WsaError::WSAECONNRESET),
    }
    let (c3, _s3) = pair(&h, 5314);
    let src3 = buf(&h, c3, 4096, MEM_READWRITE);
    src3.fill(5);
    let ov = Overlapped::new(0);
    rdma_write(&h, c3, &src3, 0, 64, &d, 0, &ov).unwrap();
    assert_eq!(wait_ov(&h, &ov).0, CONNRESET);
    target.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

/// MEM-7 on a NIC without type-2 memory windows (verbs with
/// `memory_windows = "off"`: in the VM, rxe with its windows forced off):
/// a remote key would work through every connection of the NIC, so
/// exposing memory fails `WSAEOPNOTSUPP` and leaves nothing on the NIC;
/// the connection itself keeps working. The soft NIC binds every key to
/// one queue pair, whatever the setting: nothing to refuse there.
#[test]
fn mem_7_without_memory_windows_exposure_is_refused() {
    if !on_verbs() {
        eprintln!("skipped on soft: its remote keys are bound to one queue pair");
        return;
    }
    let mut cfg = test_config(poller_mode());
    cfg.fabric.verbs.memory_windows = sanpath::config::MemoryWindows::Off;
    let h = Host::with_config(cfg);
    let (c, s) = pair(&h, 5315);
    let before = h.p.nic().stats();
    let target = region(4096);
    let mut d = [0u8; RDMA_DESCRIPTOR_LEN];
    // SAFETY: the region outlives the (failed) exposure.
    let r = unsafe {
        h.p.register_rdma_memory(s, target.as_ptr(), 4096, MEM_WRITE, &mut d)
    };
    assert_eq!(r.unwrap_err(), WsaError::WSAEOPNOTSUPP);
    let after = h.p.nic().stats();
    assert_eq!(after.live_remote_keys, 0);
    assert_eq!(after.live_regions, before.live_regions, "a region leaked");
    let (bc, bs) = (
        buf(&h, c, 4096, MEM_READWRITE),
        buf(&h, s, 4096, MEM_READWRITE),
    );
    bc.fill(9);
    let (r, w) = (Overlapped::new(0), Overlapped::new(0));
    recv(&h, s, &bs, 0, 64, &r).unwrap();
    send(&h, c, &bc, 0, 64, &w).unwrap();
    assert_eq!(wait_ov(&h, &r), (OK, 64));
    assert_eq!(wait_ov(&h, &w), (OK, 64));
    assert_eq!(bs.bytes(0, 64), bc.bytes(0, 64));
}
