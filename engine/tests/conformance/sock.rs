use crate::harness::*;
use sanpath::spi::*;
use sanpath::WsaError;
use std::net::{Ipv4Addr, SocketAddrV4};

#[test]
fn sock_1_socket_creates_exactly_one_switch_handle() {
    let h = Host::new();
    let s = h.socket();
    let ups = h.sw.upcalls();
    assert_eq!(ups.len(), 1);
    let Upcall::Create { handle, context } = ups[0] else {
        panic!("{ups:?}")
    };
    assert_eq!(context, s.0, "context names our descriptor");
    assert_ne!(handle.0, s.0, "descriptor differs from the switch handle");
    assert_eq!(h.p.switch_handle(s).unwrap(), handle);
    assert_eq!(h.sw.query_socket_handle_context(handle).unwrap(), s.0);
}

#[test]
fn sock_1_bad_arguments_get_their_codes() {
    let h = Host::new();
    let p = &h.p;
    assert_eq!(
        p.socket(23, SOCK_STREAM, IPPROTO_TCP, 0, 1, 0).unwrap_err(),
        WsaError::WSAEAFNOSUPPORT
    );
    assert_eq!(
        p.socket(AF_INET, 2, IPPROTO_TCP, 0, 1, 0).unwrap_err(),
        WsaError::WSAESOCKTNOSUPPORT
    );
    assert_eq!(
        p.socket(AF_INET, SOCK_STREAM, 17, 0, 1, 0).unwrap_err(),
        WsaError::WSAEPROTONOSUPPORT
    );
    assert_eq!(
        p.socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 7, 1, 0)
            .unwrap_err(),
        WsaError::WSAEINVAL
    );
    assert!(h.sw.upcalls().is_empty(), "failed calls make no upcall");
}

#[test]
fn sock_2_upcalls_carry_the_switch_handle() {
    let h = Host::new();
    let (c, s) = pair(&h, 5100);
    let bc = buf(&h, c, 4096, MEM_READWRITE);
    let bs = buf(&h, s, 4096, MEM_READWRITE);
    let (r, w) = (Overlapped::new(0), Overlapped::new(0));
    recv(&h, s, &bs, 0, 64, &r).unwrap();
    send(&h, c, &bc, 0, 64, &w).unwrap();
    wait_ov(&h, &r);
    wait_ov(&h, &w);
    let hs = h.p.switch_handle(s).unwrap();
    let hc = h.p.switch_handle(c).unwrap();
    h.sw.wait_for("two completions", |u| {
        u.iter()
            .filter(|x| matches!(x, Upcall::Complete { .. }))
            .count()
            == 2
    });
    for u in h.sw.upcalls() {
        if let Upcall::Complete { handle, .. } = u {
            assert!(handle == hs || handle == hc);
            assert_ne!(handle.0, s.0);
            assert_ne!(handle.0, c.0);
        }
    }
}

#[test]
fn sock_3_bind_foreign_ip_and_second_bind() {
    let h = Host::new();
    let s = h.socket();
    assert_eq!(
        h.p.bind(s, SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 80))
            .unwrap_err(),
        WsaError::WSAEADDRNOTAVAIL
    );
    h.p.bind(s, h.addr(80)).unwrap();
    assert_eq!(h.p.bind(s, h.addr(81)).unwrap_err(), WsaError::WSAEINVAL);
    let w = h.socket();
    h.p.bind(w, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 82))
        .unwrap();
}

#[test]
fn sock_4_rdma_size_options_are_4_bytes() {
    let h = Host::new();
    let s = h.socket();
    let mut v = [0u8; 4];
    assert_eq!(
        h.p.get_sockopt(s, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE, &mut v)
            .unwrap(),
        4
    );
    assert_eq!(u32::from_le_bytes(v), 64 << 10);
    assert_eq!(
        h.p.get_sockopt(s, SOL_SOCKET, SO_MAX_RDMA_SIZE, &mut v)
            .unwrap(),
        4
    );
    assert_eq!(u32::from_le_bytes(v), h.p.config().limits.max_rdma_size);
    assert_eq!(
        h.p.get_sockopt(s, SOL_SOCKET, SO_MAX_MSG_SIZE, &mut v)
            .unwrap(),
        4
    );
    h.p.set_sockopt(
        s,
        SOL_SOCKET,
        SO_RDMA_THRESHOLD_SIZE,
        &4096u32.to_le_bytes(),
    )
    .unwrap();
    h.p.get_sockopt(s, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE, &mut v)
        .unwrap();
    assert_eq!(u32::from_le_bytes(v), 4096);
    h.p.set_sockopt(s, IPPROTO_TCP, TCP_NODELAY, &1u32.to_le_bytes())
        .unwrap();
    h.p.get_sockopt(s, IPPROTO_TCP, TCP_NODELAY, &mut v)
        .unwrap();
    assert_eq!(u32::from_le_bytes(v), 1);
}

#[test]
fn sock_5_unsupported_options_and_short_lengths() {
    let h = Host::new();
    let s = h.socket();
    let mut v = [0u8; 4];
    assert_eq!(
        h.p.get_sockopt(s, SOL_SOCKET, 0x1008, &mut v).unwrap_err(),
        WsaError::WSAENOPROTOOPT
    );
    assert_eq!(
        h.p.get_sockopt(s, SOL_SOCKET, SO_GROUP_ID, &mut v)
            .unwrap_err(),
        WsaError::WSAENOPROTOOPT
    );
    assert_eq!(
        h.p.set_sockopt(s, SOL_SOCKET, SO_GROUP_PRIORITY, &v)
            .unwrap_err(),
        WsaError::WSAENOPROTOOPT
    );
    assert_eq!(
        h.p.get_sockopt(s, SOL_SOCKET, SO_MAX_RDMA_SIZE, &mut v[..3])
            .unwrap_err(),
        WsaError::WSAEFAULT
    );
    assert_eq!(
        h.p.set_sockopt(s, SOL_SOCKET, SO_DEBUG, &[]).unwrap_err(),
        WsaError::WSAEFAULT
    );
    assert_eq!(
        h.p.get_sockopt(s, 41, 1, &mut v).unwrap_err(),
        WsaError::WSAEINVAL
    );
}

/// A set value of 1 to 3 bytes is short of the 4-byte option: `WSAEFAULT`,
/// and the option keeps its value.
#[test]
fn sock_5_short_set_value_is_efault() {
    let h = Host::new();
    let s = h.socket();
    let mut before = [0u8; 4];
    h.p.get_sockopt(s, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE, &mut before)
        .unwrap();
    for (level, name) in [
        (SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE),
        (SOL_SOCKET, SO_DEBUG),
        (IPPROTO_TCP, TCP_NODELAY),
    ] {
        for len in 1..=3 {
            assert_eq!(
                h.p.set_sockopt(s, level, name, &[1, 0, 0][..len])
                    .unwrap_err(),
                WsaError::WSAEFAULT,
                "option {level}/{name} with {len} bytes"
            );
        }
    }
    let mut after = [0u8; 4];
    h.p.get_sockopt(s, SOL_SOCKET, SO_RDMA_THRESHOLD_SIZE, &mut after)
        .unwrap();
    assert_eq!(after, before);
    h.p.set_sockopt(
        s,
        SOL_SOCKET,
        SO_RDMA_THRESHOLD_SIZE,
        &4096u32.to_le_bytes(),
    )
    .unwrap();
}

/// Every socket call on `s` with arguments that start nothing lasting
/// (unregistered buffers, bad descriptors, caller data); the errors.
fn every_call(h: &Host, s: ProviderSocket, r: &sanpath::mem::region::Region) -> Vec<WsaError> {
    let mut results = Vec::new();
    let ov = Overlapped::new(0);
    let wb = [WsaBuf {
        len: 16,
        buf: r.as_ptr(),
    }];
    let wbx = [WsaBufEx {
        len: 16,
        buf: r.as_ptr(),
        handle: 99,
    }];
    let mut v = [0u8; 4];
    results.push(h.p.bind(s, h.addr(5)).err());
    results.push(h.p.listen(s, 5).err());
    results.push(h.p.accept(s, &mut |_| Condition::Defer).err());
    results.push(h.p.connect(s, h.addr(1), &[1]).err());
    // SAFETY: the buffers are registered nowhere: nothing starts.
    unsafe {
        results.push(h.p.send(s, &wb, 0, &ov).err());
        results.push(h.p.recv(s, &wb, &ov).err());
        results.push(h.p.rdma_write(s, &wbx, &[0; 32], 0, 0, &ov).err());
        results.push(h.p.rdma_read(s, &wbx, &[0; 8], 0, 0, &ov).err());
        results.push(h.p.register_memory(s, r.as_ptr(), 16, 0).err());
        results.push(
            h.p.register_rdma_memory(s, r.as_ptr(), 16, 3, &mut [0; 8])
                .err(),
        );
    }
    results.push(h.p.deregister_memory(s, 1).err());
    results.push(h.p.deregister_rdma_memory(s, &[0; 32]).err());
    results.push(h.p.get_overlapped_result(s, &ov, false).err());
    results.push(h.p.get_sockopt(s, SOL_SOCKET, 0, &mut v).err());
    results.push(
        h.p.get_sockopt(s, SOL_SOCKET, SO_MAX_MSG_SIZE, &mut v)
            .err(),
    );
    results.push(h.p.set_sockopt(s, SOL_SOCKET, SO_DEBUG, &[1]).err());
    results.push(h.p.event_select(s, None, FD_CONNECT).err());
    results.push(h.p.enum_network_events(s, None).err());
    results.push(h.p.ioctl_check(s, SIO_ADDRESS_LIST_QUERY).err());
    results.push(h.p.get_qos_by_name(s).err());
    results.into_iter().flatten().collect()
}

/// Every call in every socket state (open, bound, listening, connecting,
/// connected with ops pending, peer-reset, closed), and with bad
/// arguments: never `WSAEINPROGRESS`.
#[test]
fn sock_6_no_call_returns_wsaeinprogress() {
    let h = Host::new();
    let r = region(4096);
    let mut results = Vec::new();
    let open = h.socket();
    results.extend(every_call(&h, open, &r));
    let bound = h.socket();
    h.p.bind(bound, h.addr(5620)).unwrap();
    results.extend(every_call(&h, bound, &r));
    let (listening, _) = h.listener(5621, 4);
    results.extend(every_call(&h, listening, &r));
    let connecting = h.socket();
    h.p.connect(connecting, SocketAddrV4::new(h.silent_host(), 1), &[])
        .unwrap();
    results.extend(every_call(&h, connecting, &r));
    let (c, s) = pair(&h, 5622);
    let b = buf(&h, s, 4096, MEM_READWRITE);
    let pending = Overlapped::new(0);
    recv(&h, s, &b, 0, 64, &pending).unwrap();
    results.extend(every_call(&h, s, &r));
    h.p.close_socket(c).unwrap();
    assert_eq!(wait_ov(&h, &pending).0, CONNRESET);
    results.extend(every_call(&h, s, &r));
    // Duplication changes the socket: last before close, in each state.
    for sock in [open, bound, listening, connecting, c, s] {
        results.extend(h.p.duplicate_socket(sock, 1).err());
        results.extend(h.p.close_socket(sock).err());
        results.extend(every_call(&h, sock, &r));
        results.extend(h.p.duplicate_socket(sock, 1).err());
        results.extend(h.p.close_socket(sock).err());
    }
    assert!(!results.is_empty());
    assert!(!results.contains(&WsaError::WSAEINPROGRESS), "{results:?}");
}
