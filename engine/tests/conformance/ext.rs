use crate::harness::*;
use sanpath::spi::*;
use sanpath::WsaError;
use std::net::Ipv4Addr;

#[test]
fn ext_1_mandatory_extensions_are_available() {
    let h = Host::new();
    for e in [
        Extension::RegisterMemory,
        Extension::DeregisterMemory,
        Extension::RegisterRdmaMemory,
        Extension::DeregisterRdmaMemory,
        Extension::RdmaWrite,
    ] {
        assert_eq!(h.p.extension(&e.guid()).unwrap(), e);
    }
    let mut unknown = Extension::RdmaWrite.guid();
    unknown[15] ^= 0xFF;
    assert_eq!(h.p.extension(&unknown).unwrap_err(), WsaError::WSAEINVAL);
}

#[test]
fn ext_2_rdma_read_is_supported() {
    // EXT-2 applies to providers without RDMA read; this one has it.
    let h = Host::new();
    assert_eq!(
        h.p.extension(&Extension::RdmaRead.guid()).unwrap(),
        Extension::RdmaRead
    );
}

#[test]
fn ext_3_cache_callback_only_when_caching() {
    let h = Host::new();
    let g = Extension::MemoryRegistrationCacheCallback.guid();
    assert_eq!(h.p.extension(&g).unwrap_err(), WsaError::WSAEOPNOTSUPP);
    let mut c = test_config(poller_mode());
    c.mr_cache.enabled = true;
    let h2 = Host::with_config(c);
    assert_eq!(
        h2.p.extension(&g).unwrap(),
        Extension::MemoryRegistrationCacheCallback
    );
}

/// EXT-4: each provider lists exactly its own NIC's addresses; the second
/// host is another process on shm ([`crate::xproc`]).
#[test]
fn ext_4_address_list_is_exactly_our_nic_addresses() {
    let other = Ipv4Addr::new(198, 18, 0, 2);
    crate::xproc::two_hosts(
        "ext::ext_4_address_list_is_exactly_our_nic_addresses",
        other,
        |h, link| {
            assert_eq!(
                h.p.address_list().unwrap(),
                vec![Ipv4Addr::new(198, 18, 0, 1)]
            );
            assert_eq!(link.recv(), other.to_string());
        },
        |peer, link| {
            let list = peer.p.address_list().unwrap();
            assert_eq!(list.len(), 1, "{list:?}");
            link.send(&list[0].to_string());
        },
    );
}
