use crate::harness::*;
use sanpath::spi::*;
use sanpath::WsaError;

fn caching_host() -> Host {
    let mut c = test_config(poller_mode());
    c.mr_cache.enabled = true;
    Host::with_config(c)
}

#[test]
fn cache_1_reregistration_hits_the_cache() {
    let h = caching_host();
    let (c, _s) = pair(&h, 5800);
    let r = region(8192);
    // SAFETY: the region outlives the registrations.
    unsafe {
        let h1 =
            h.p.register_memory(c, r.as_ptr(), 8192, MEM_READWRITE)
                .unwrap();
        h.p.deregister_memory(c, h1).unwrap();
        let regs = h.p.nic().stats().registrations;
        let h2 =
            h.p.register_memory(c, r.as_ptr(), 8192, MEM_READWRITE)
                .unwrap();
        assert_eq!(
            h.p.nic().stats().registrations,
            regs,
            "no new NIC registration"
        );
        h.p.deregister_memory(c, h2).unwrap();
    }
}

#[test]
fn cache_2_callback_drops_cached_ranges_only() {
    let h = caching_host();
    let (c, _s) = pair(&h, 5801);
    let r = region(8192);
    assert_eq!(
        h.p.memory_registration_cache_callback(r.as_ptr(), 8192)
            .unwrap_err(),
        WsaError::WSAEINVAL,
        "never cached"
    );
    // SAFETY: the region outlives the registrations.
    unsafe {
        let h1 =
            h.p.register_memory(c, r.as_ptr(), 8192, MEM_READWRITE)
                .unwrap();
        h.p.deregister_memory(c, h1).unwrap();
        h.p.memory_registration_cache_callback(r.as_ptr().add(100), 10)
            .unwrap();
        let regs = h.p.nic().stats().registrations;
        let h2 =
            h.p.register_memory(c, r.as_ptr(), 8192, MEM_READWRITE)
                .unwrap();
        assert_eq!(
            h.p.nic().stats().registrations,
            regs + 1,
            "registered again"
        );
        h.p.deregister_memory(c, h2).unwrap();
    }
}

#[test]
fn cache_3_closing_a_connection_releases_its_cached_buffers() {
    let h = caching_host();
    let (c, s) = pair(&h, 5802);
    let r = region(8192);
    let live = h.p.nic().stats().live_regions;
    // SAFETY: the region outlives the registrations.
    unsafe {
        let h1 =
            h.p.register_memory(c, r.as_ptr(), 8192, MEM_READWRITE)
                .unwrap();
        h.p.deregister_memory(c, h1).unwrap();
    }
    assert_eq!(
        h.p.nic().stats().live_regions,
        live + 1,
        "kept in the cache"
    );
    h.p.close_socket(c).unwrap();
    h.p.close_socket(s).unwrap();
    assert_eq!(h.p.nic().stats().live_regions, live);
}
