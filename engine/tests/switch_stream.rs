//! The reference switch's streams (`sanpath::switch`) over the soft fabric:
//! payloads from 1 byte to 64 MiB with checksums, both RDMA flows, many
//! concurrent connections, shutdown and close semantics, peer reset in the
//! middle of a transfer, cancellation of connects and transfers, a rogue
//! peer. Every blocking call runs under a timeout that fails the test
//! loudly; nothing waits on a sleep. The provider runs to completion (the
//! streams' own threads make the progress); `switch_stream_threads.rs` runs
//! the same tests with poller threads and a dispatcher.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::fabric::soft::{SoftNetwork, SoftNicConfig};
use sanpath::switch::proto::HEADER_LEN;
use sanpath::switch::{
    CancelToken, Listener, RdmaFlow, Runtime, RuntimeConfig, Stream, SwitchOptions,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Bound on anything that should happen promptly.
const T: Duration = Duration::from_secs(20);

/// The largest payload: 64 MiB in release builds; 16 MiB in debug builds,
/// where generating and checking 64 MiB twice would take most of the time
/// budget of the suite (`cargo test --release --test switch_stream` runs it).
const BIG: usize = if cfg!(debug_assertions) {
    16 << 20
} else {
    64 << 20
};

fn opts() -> SwitchOptions {
    SwitchOptions {
        read_timeout: Some(T),
        write_timeout: Some(T),
        accept_timeout: Some(T),
        connect_timeout: T,
        handshake_timeout: T,
        ..SwitchOptions::default()
    }
}

/// Run to completion, except in the `switch_stream_threads` test crate.
fn poller_mode() -> PollerMode {
    if env!("CARGO_CRATE_NAME") == "switch_stream_threads" {
        PollerMode::Threads
    } else {
        PollerMode::RunToCompletion
    }
}

fn config(ip: Ipv4Addr, o: SwitchOptions) -> RuntimeConfig {
    let mut c = RuntimeConfig::default();
    c.engine.mem.mlock = MlockPolicy::Off;
    c.engine.poller.spin_budget = 200;
    c.engine.poller.mode = poller_mode();
    c.engine.connect.timeout_ms = 5000;
    c.engine.fabric.soft.addresses = vec![ip];
    c.switch = o;
    c
}

fn runtime_on(net: &Arc<SoftNetwork>, ip: Ipv4Addr, o: SwitchOptions) -> Arc<Runtime> {
    let cfg = config(ip, o);
    let nic = net.attach(cfg.engine.soft_nic(vec![ip])).expect("attach");
    Runtime::with_nic(cfg, nic).expect("runtime")
}

/// Client and server runtimes on a private network.
fn two(client: SwitchOptions, server: SwitchOptions) -> (Arc<Runtime>, Arc<Runtime>) {
    let net = SoftNetwork::new();
    (
        runtime_on(&net, Ipv4Addr::new(198, 18, 9, 1), client),
        runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), server),
    )
}

fn server_addr(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 2), port)
}

/// A connected (client, server) pair.
fn pair(c: &Arc<Runtime>, s: &Arc<Runtime>, port: u16) -> (Stream, Stream) {
    let l = Listener::bind(s, server_addr(port)).expect("bind");
    let acceptor = thread::spawn(move || l.accept().expect("accept").0);
    let client = Stream::connect(c, server_addr(port)).expect("connect");
    (client, acceptor.join().unwrap())
}

/// Deterministic bytes (xorshift words).
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// FNV-1a over 8-byte words (and the tail).
fn checksum(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
    }
    for &x in words.remainder() {
        h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn read_n(s: &Stream, n: usize, chunk: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let end = (got + chunk).min(n);
        let k = s.recv(&mut out[got..end]).expect("recv");
        assert!(k > 0, "unexpected end of stream after {got} of {n} bytes");
        got += k;
    }
    out
}

/// Sends `len` bytes one way and back, checking both copies.
fn echo_round(client: &Stream, server: &Stream, len: usize, seed: u64, chunk: usize) {
    let payload = data(len, seed);
    let sum = checksum(&payload);
    thread::scope(|sc| {
        let srv = sc.spawn(|| {
            let got = read_n(server, len, chunk);
            assert_eq!(checksum(&got), sum, "server copy of {len} bytes");
            let mut w = server;
            w.write_all(&got).expect("echo back");
        });
        let mut w = client;
        w.write_all(&payload).expect("send");
        let back = read_n(client, len, chunk);
        assert_eq!(checksum(&back), sum, "echoed copy of {len} bytes");
        assert!(back == payload);
        srv.join().unwrap();
    });
}

// ----------------------------------------------------------------------
// Payloads and flows
// ----------------------------------------------------------------------

#[test]
fn payloads_from_one_byte_to_big_with_checksums() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7001);
    let threshold = client.rdma_threshold();
    assert_eq!(threshold, 64 << 10, "from SO_RDMA_THRESHOLD_SIZE");
    let sizes = [
        1,
        2,
        100,
        // Across the end of a message buffer's first 256 bytes (where its
        // tail starts), the largest INLINE (4 KiB: the buffer less the
        // header), one more.
        256 - HEADER_LEN,
        256 - HEADER_LEN + 1,
        4096,
        4097,
        8192 - 16,
        8192 - 15,
        8192,
        60_000,
        threshold,
        threshold + 1,
        300_000,
        1 << 20,
        BIG,
    ];
    for (i, &len) in sizes.iter().enumerate() {
        let chunk = if len > (1 << 20) { 4 << 20 } else { len.max(1) };
        echo_round(&client, &server, len, i as u64 + 1, chunk);
    }
    let st = client.stats();
    assert!(
        st.inline_msgs > 0 && st.data_msgs > st.inline_msgs && st.read_offers > 0,
        "{st:?}"
    );
    assert!(client.uses_read_flow());
}

/// At the defaults a copied write of up to 4 KiB is one INLINE message
/// (one send into one receive: the header and the bytes across the end of
/// the buffers' first 256 bytes, where their tails start), a longer one a ring
/// write and a DATA; the bytes arrive whole either way.
#[test]
fn a_copied_write_of_up_to_4_kib_is_one_message() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7030);
    for (len, inline) in [(4096, 1), (4097, 0), (1500, 1), (4096 - 1, 1)] {
        let before = client.stats();
        echo_round(&client, &server, len, len as u64, len);
        let after = client.stats();
        assert_eq!(
            after.data_msgs - before.data_msgs,
            1,
            "{len} B: one message"
        );
        assert_eq!(
            after.inline_msgs - before.inline_msgs,
            inline,
            "{len} B: INLINE (1) or a ring write and a DATA (0)"
        );
    }
}

/// An anonymous private mapping of `len` bytes at `hint` exactly (`None`:
/// anywhere), or `None` if that address is taken.
fn map_at(hint: Option<*mut u8>, len: usize) -> Option<*mut u8> {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | if hint.is_some() {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
    let want = hint.unwrap_or(std::ptr::null_mut());
    // SAFETY: a fresh anonymous mapping (never over an existing one: no
    // MAP_FIXED), owned by the test until it unmaps it.
    let p = unsafe {
        libc::mmap(
            want.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || (hint.is_some() && p.cast() != want) {
        return None;
    }
    Some(p.cast())
}

/// Sends `len` bytes of `p` (filled with `data(len, seed)`) with one
/// blocking write and checks what the server reads.
fn send_from(client: &Stream, server: &Stream, p: *mut u8, len: usize, seed: u64) {
    // SAFETY: `p` is a live mapping of `len` bytes that only this thread
    // touches until the write returned.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, len) };
    buf.copy_from_slice(&data(len, seed));
    thread::scope(|sc| {
        let rd = sc.spawn(|| read_n(server, len, len));
        let mut w = client;
        w.write_all(buf).expect("send");
        assert!(rd.join().unwrap() == data(len, seed), "seed {seed}");
    });
}

#[test]
fn a_released_buffer_leaves_the_registration_cache_and_is_registered_again() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7016);
    let len = 64 << 10;
    let p = map_at(None, len).expect("mmap");
    let base = c.provider().stats();
    send_from(&client, &server, p, len, 1);
    assert!(
        client.stats().bytes_direct >= len as u64,
        "written straight from the application's buffer"
    );
    let cached = c.provider().stats();
    assert_eq!(
        cached.registrations,
        base.registrations + 1,
        "one cached registration"
    );
    assert_eq!(cached.registered_bytes, base.registered_bytes + len as u64);
    // Sending from the same buffer again reuses it.
    send_from(&client, &server, p, len, 2);
    assert_eq!(c.provider().stats().registrations, cached.registrations);
    // The program releases the memory before unmapping it: the registration
    // goes at once, none is left naming those pages.
    c.release_memory(p, len);
    let released = c.provider().stats();
    assert_eq!(released.registrations, base.registrations);
    assert_eq!(released.registered_bytes, base.registered_bytes);
    // SAFETY: the test's own mapping; no call lends it any more.
    assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
    // New memory at the same address (when no other thread took it) with
    // other bytes: registered afresh, and those bytes are what arrives.
    let q = map_at(Some(p), len)
        .or_else(|| map_at(None, len))
        .expect("mmap");
    send_from(&client, &server, q, len, 3);
    assert_eq!(c.provider().stats().registrations, cached.registrations);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::munmap(q.cast(), len) }, 0);
}

#[test]
fn a_buffer_offered_again_keeps_its_nic_registration_but_not_its_exposure() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7017);
    let len = 1 << 20;
    let p = map_at(None, len).expect("mmap");
    let base = c.provider().registration_stats();
    send_from(&client, &server, p, len, 1);
    assert_eq!(client.stats().read_offers, 1, "a read-flow transfer");
    let first = c.provider().registration_stats();
    assert_eq!(first.nic_registrations, base.nic_registrations + 1);
    for seed in 2..4 {
        send_from(&client, &server, p, len, seed);
    }
    let again = c.provider().registration_stats();
    assert_eq!(
        again.nic_registrations, first.nic_registrations,
        "offering the same buffer again registers nothing"
    );
    assert_eq!(
        again.mapping_checks, first.mapping_checks,
        "nor looks up its pages (a system call) again"
    );
    assert_eq!(again.cache_hits, first.cache_hits + 2);
    // MEM-6: every exposure ended with its send; only the NIC registration
    // is kept, reachable by no remote key.
    assert_eq!(again.live_entries, base.live_entries);
    assert_eq!(again.cached_entries, base.cached_entries + 1);
    // Released before unmapping: the provider keeps nothing of it.
    c.release_memory(p, len);
    let released = c.provider().registration_stats();
    assert_eq!(released.cached_entries, base.cached_entries);
    assert_eq!(released.registered_bytes, base.registered_bytes);
    // SAFETY: the test's own mapping; no call lends it any more.
    assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
}

#[test]
fn small_reads_of_a_large_transfer_and_large_reads_of_small_messages() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7002);
    // A 1 MiB RDMA transfer read 4 KiB at a time (offsets into the offer).
    echo_round(&client, &server, 1 << 20, 7, 4096);
    // Many small messages gathered by large reads.
    let msgs: Vec<Vec<u8>> = (0..200).map(|i| data(1 + i * 7 % 900, i as u64)).collect();
    let all: Vec<u8> = msgs.concat();
    thread::scope(|sc| {
        sc.spawn(|| {
            for m in &msgs {
                client.send(m).unwrap();
            }
        });
        let got = read_n(&server, all.len(), 1 << 20);
        assert!(got == all);
    });
}

#[test]
fn both_rdma_flows_and_the_fallback() {
    for (flow, server_reads, want_read) in [
        (RdmaFlow::Read, true, true),
        (RdmaFlow::Write, true, false),
        (RdmaFlow::Read, false, false),
    ] {
        let co = SwitchOptions {
            rdma_flow: flow,
            ..opts()
        };
        let so = SwitchOptions {
            rdma_flow: flow,
            accept_rdma_read: server_reads,
            ..opts()
        };
        let (c, s) = two(co, so);
        let (client, server) = pair(&c, &s, 7003);
        assert_eq!(
            client.uses_read_flow(),
            want_read,
            "{flow:?}/{server_reads}"
        );
        let payload = data(3 << 20, 11);
        thread::scope(|sc| {
            let r = sc.spawn(|| read_n(&server, payload.len(), 1 << 20));
            client.send(&payload).unwrap();
            assert!(r.join().unwrap() == payload);
        });
        let st = client.stats();
        if want_read {
            assert!(st.read_offers > 0 && st.write_requests == 0, "{st:?}");
            assert!(server.stats().rdma_reads > 0);
        } else {
            assert!(st.write_requests > 0 && st.read_offers == 0, "{st:?}");
            assert!(st.rdma_writes > 0);
        }
    }
}

#[test]
fn threshold_override_moves_payloads_between_paths() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7004);
    client.set_rdma_threshold(1000);
    echo_round(&client, &server, 5000, 3, 5000);
    assert_eq!(client.stats().read_offers, 1);
    client.set_rdma_threshold(1 << 20);
    echo_round(&client, &server, 500_000, 4, 1 << 20);
    assert_eq!(
        client.stats().read_offers,
        1,
        "copy path below the threshold"
    );
}

#[test]
fn many_concurrent_connections() {
    const CONNS: usize = 16;
    const THREADS: usize = 4;
    let (c, s) = two(opts(), opts());
    let l = Listener::bind(&s, server_addr(7005)).unwrap();
    let server = thread::spawn(move || {
        let mut handlers = Vec::new();
        for _ in 0..CONNS {
            let (st, _) = l.accept().expect("accept");
            handlers.push(thread::spawn(move || {
                // Echo until end of stream.
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = st.recv(&mut buf).expect("server recv");
                    if n == 0 {
                        break;
                    }
                    (&st).write_all(&buf[..n]).expect("server send");
                }
            }));
        }
        for h in handlers {
            h.join().unwrap();
        }
    });
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let c = c.clone();
            thread::spawn(move || {
                let streams: Vec<Stream> = (0..CONNS / THREADS)
                    .map(|_| Stream::connect(&c, server_addr(7005)).expect("connect"))
                    .collect();
                // Interleave the connections of this thread.
                for round in 0..4 {
                    for (k, st) in streams.iter().enumerate() {
                        let len = [10, 5000, 70_000, 200_000][(round + k) % 4];
                        let payload = data(len, (t * 100 + k * 10 + round) as u64);
                        thread::scope(|sc| {
                            let r = sc.spawn(|| read_n(st, len, 256 << 10));
                            st.send(&payload).unwrap();
                            assert!(r.join().unwrap() == payload);
                        });
                    }
                }
                for st in &streams {
                    st.shutdown().unwrap();
                }
                for st in &streams {
                    let mut b = [0u8; 8];
                    assert_eq!(st.recv(&mut b).unwrap(), 0, "end of stream");
                }
            })
        })
        .collect();
    for h in clients {
        h.join().unwrap();
    }
    server.join().unwrap();
}

// ----------------------------------------------------------------------
// Shutdown and close
// ----------------------------------------------------------------------

#[test]
fn shutdown_delivers_everything_then_end_of_stream() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7006);
    let small = data(1000, 1);
    let large = data(500_000, 2);
    client.send(&small).unwrap();
    thread::scope(|sc| {
        let r = sc.spawn(|| {
            let got = read_n(&server, small.len() + large.len(), 64 << 10);
            let mut b = [0u8; 16];
            assert_eq!(server.recv(&mut b).unwrap(), 0, "end of stream");
            assert_eq!(server.recv(&mut b).unwrap(), 0, "end of stream stays");
            got
        });
        client.send(&large).unwrap();
        client.shutdown().unwrap();
        assert!(r.join().unwrap() == [small.clone(), large.clone()].concat());
    });
    // Sending after shutdown fails; the other direction still works.
    assert_eq!(client.send(b"x").unwrap_err().kind(), ErrorKind::BrokenPipe);
    server.send(b"half-close").unwrap();
    assert_eq!(read_n(&client, 10, 10), b"half-close");
    // Graceful close of the server: the client reads end of stream.
    server.close();
    let mut b = [0u8; 4];
    assert_eq!(client.recv(&mut b).unwrap(), 0);
}

#[test]
fn close_with_data_pending_is_abortive() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7007);
    client.send(b"unread").unwrap();
    // Make sure the message arrived before the server closes.
    let mut one = [0u8; 1];
    assert_eq!(server.recv(&mut one).unwrap(), 1);
    server.close(); // 5 bytes unread: reset, not FIN
    let mut b = [0u8; 8];
    let e = client.recv(&mut b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    let e = client.send(b"more").unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        ),
        "{e}"
    );
}

#[test]
fn data_sent_before_a_graceful_close_is_not_lost() {
    // Rings for the whole payload (the session uses the smaller of both
    // sides' sizes): the send returns at once.
    let roomy = SwitchOptions {
        ring_size: 256 << 10,
        ..opts()
    };
    let (c, s) = two(roomy.clone(), roomy);
    let (client, server) = pair(&c, &s, 7008);
    let payload = data(200_000, 5);
    client.set_rdma_threshold(1 << 20); // all by copy
    assert_eq!(client.send(&payload).unwrap(), payload.len());
    client.close();
    let got = read_n(&server, payload.len(), 1 << 20);
    assert!(got == payload);
    let mut b = [0u8; 4];
    assert_eq!(
        server.recv(&mut b).unwrap(),
        0,
        "FIN, then the reset is not an error"
    );
}

/// A connection's buffers by default: 2 rings of 92 KiB and 8 + 8
/// message buffers of 4 KiB and the header (their first 256 bytes in one
/// pool page, the rest in whole pages apart, where a send buffer has room
/// for a whole message), 252 KiB in all (README); configurable.
#[test]
fn default_buffers_fit_in_256_kib_and_follow_the_options() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7012);
    let page = 4096;
    let slot = 4096 + HEADER_LEN;
    let tails =
        |recv: usize, send: usize| (recv * (slot - 256) + send * slot).div_ceil(page) * page;
    let want = 2 * (92 << 10) + page + tails(8, 8);
    assert_eq!(client.buffer_bytes(), want);
    assert_eq!(server.buffer_bytes(), want);
    assert_eq!(want, 252 << 10);
    let small = SwitchOptions {
        ring_size: 8 << 10,
        recv_slots: 8,
        send_slots: 4,
        ..opts()
    };
    let (c, s) = two(small.clone(), opts());
    let (client, server) = pair(&c, &s, 7013);
    assert_eq!(client.buffer_bytes(), 2 * (8 << 10) + page + tails(8, 4));
    // Buffers no longer than a head have no tails.
    let heads_only = SwitchOptions {
        slot_size: 256,
        ..small.clone()
    };
    let (c2, s2) = two(heads_only, opts());
    let (client2, server2) = pair(&c2, &s2, 7014);
    assert_eq!(client2.buffer_bytes(), 2 * (8 << 10) + page);
    echo_round(&client2, &server2, 10_000, 8, 4096);
    // The session runs on the smaller ring: data still flows both ways.
    echo_round(&client, &server, 100_000, 9, 4096);
}

/// A client that connects, writes, shuts down and closes at once: the
/// server's accept may find the connection already torn down by the time
/// its negotiation wait returns. It still returns the stream, with the data
/// and the end of stream (it used to drop such a connection and wait for
/// another). Many rounds, since the window is a thread switch wide.
#[test]
fn a_connection_closed_right_after_negotiation_is_accepted_with_its_data() {
    let (c, s) = two(opts(), opts());
    let l = Listener::bind(&s, server_addr(7011)).expect("bind");
    for round in 0..30u64 {
        let c = c.clone();
        let client = thread::spawn(move || {
            let mut k = Stream::connect(&c, server_addr(7011)).expect("connect");
            k.write_all(&round.to_le_bytes()).unwrap();
            k.shutdown().unwrap();
            k.close();
        });
        let (mut server, _) = l
            .accept_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let mut got = Vec::new();
        server.set_read_timeout(Some(Duration::from_secs(10)));
        server
            .read_to_end(&mut got)
            .expect("data, then end of stream");
        assert_eq!(got, round.to_le_bytes(), "round {round}");
        client.join().unwrap();
    }
}

// ----------------------------------------------------------------------
// Resets and cancellation
// ----------------------------------------------------------------------

#[test]
fn peer_reset_in_the_middle_of_a_transfer() {
    for flow in [RdmaFlow::Read, RdmaFlow::Write] {
        let o = SwitchOptions {
            rdma_flow: flow,
            ..opts()
        };
        let (c, s) = two(o.clone(), o);
        let (client, server) = pair(&c, &s, 7009);
        let payload = data(8 << 20, 9);
        let start = Instant::now();
        thread::scope(|sc| {
            let sender = sc.spawn(|| client.send(&payload));
            // The server takes the first megabyte of the transfer, then
            // resets the connection.
            let got = read_n(&server, 1 << 20, 1 << 20);
            assert!(got[..] == payload[..1 << 20]);
            server.abort();
            let e = sender.join().unwrap().unwrap_err();
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ),
                "{flow:?}: {e}"
            );
        });
        assert!(start.elapsed() < T, "{flow:?}: reset not noticed promptly");
        assert_eq!(
            client.recv(&mut [0u8; 4]).unwrap_err().kind(),
            ErrorKind::ConnectionReset
        );
    }
}

/// A reset reaches the machine in an upcall (the completion of a receive
/// the peer's close flushed); the SAN socket is then closed by the stream's
/// own thread once the upcall returned, before its call reports the reset.
/// Closed inside the upcall, the provider would have to defer the close to
/// its closer thread (spec §6.1: a close made while dispatching cannot wait
/// for its flushes), which at 10,000 connections polls thousands of
/// deferred sockets.
#[test]
fn a_reset_fed_by_an_upcall_closes_the_socket_without_deferral() {
    let net = SoftNetwork::new();
    let rt = |ip: Ipv4Addr| {
        let mut cfg = config(ip, opts());
        // Only a close made while dispatching may defer, not a slow one.
        cfg.engine.close.wait_ms = T.as_millis() as u64;
        let nic = net.attach(cfg.engine.soft_nic(vec![ip])).expect("attach");
        Runtime::with_nic(cfg, nic).expect("runtime")
    };
    let (c, s) = (
        rt(Ipv4Addr::new(198, 18, 9, 1)),
        rt(Ipv4Addr::new(198, 18, 9, 2)),
    );
    let (client, server) = pair(&c, &s, 7021);
    let open = s.provider().stats().sockets;
    thread::scope(|sc| {
        let reader = sc.spawn(|| server.recv(&mut [0u8; 4]));
        client.abort();
        let e = reader.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    });
    let st = s.provider().stats();
    assert_eq!(
        st.sockets,
        open - 1,
        "the reset stream's SAN socket is closed"
    );
    assert_eq!(st.deferred_closes, 0, "closed outside the upcall: {st:?}");
    drop(server);
    assert_eq!(s.provider().stats().deferred_closes, 0);
}

#[test]
fn cancelled_blocking_connect_closes_the_san_socket() {
    let net = SoftNetwork::new();
    let rt = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 1), opts());
    let tcp_only = Ipv4Addr::new(198, 18, 9, 77);
    net.add_tcp_only_host(tcp_only);
    let before = rt.provider().stats().sockets;
    let token = CancelToken::new();
    let start = Instant::now();
    thread::scope(|sc| {
        let t = token.clone();
        let canceller = sc.spawn(move || {
            // Cancels whether or not the connect has started waiting yet:
            // either way it must return Interrupted.
            thread::yield_now();
            t.cancel();
        });
        let r = Stream::connect_with(
            &rt,
            SocketAddrV4::new(tcp_only, 80),
            Some(Duration::from_secs(30)),
            Some(&token),
        );
        canceller.join().unwrap();
        assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::Interrupted));
    });
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "cancel took {:?}; the SAN connect times out only after 5 s",
        start.elapsed()
    );
    assert_eq!(rt.provider().stats().sockets, before, "SAN socket closed");
    // A connect that times out closes its socket too.
    let start = Instant::now();
    let r = Stream::connect_with(
        &rt,
        SocketAddrV4::new(tcp_only, 80),
        Some(Duration::from_millis(200)),
        None,
    );
    assert_eq!(r.err().map(|e| e.kind()), Some(ErrorKind::TimedOut));
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(rt.provider().stats().sockets, before);
}

#[test]
fn connect_failures_map_to_io_errors() {
    let (c, _s) = two(opts(), opts());
    let e = Stream::connect(&c, server_addr(7999)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "no listener: {e}");
    let nowhere = SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 200), 1);
    let e = Stream::connect(&c, nowhere).err().unwrap();
    // `ErrorKind::HostUnreachable` is named only from Rust 1.83 on.
    let host_unreachable = std::io::Error::from_raw_os_error(libc::EHOSTUNREACH).kind();
    assert_eq!(e.kind(), host_unreachable, "{e}");
}

#[test]
fn cancel_pending_withdraws_a_waiting_receive_and_the_stream_survives() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7010);
    thread::scope(|sc| {
        let r = sc.spawn(|| client.recv(&mut [0u8; 100]));
        // Keep cancelling until the receive gave up (it may not have started
        // waiting at the first call).
        while !r.is_finished() {
            client.cancel_pending();
            thread::yield_now();
        }
        assert_eq!(
            r.join().unwrap().unwrap_err().kind(),
            ErrorKind::Interrupted
        );
    });
    server.send(b"still fine").unwrap();
    assert_eq!(read_n(&client, 10, 100), b"still fine");
}

/// Calls of one direction from several threads pass one at a time (the
/// stream's gate, taken and opened under its state lock): each blocking
/// send is one op and arrives whole, each blocking receive returns one
/// message. In debug builds the switch asserts that no second op of a
/// direction starts while one is pending, so a gate that lets two pass
/// fails here.
#[test]
fn concurrent_calls_of_one_direction_pass_one_at_a_time() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7031);
    // Four writers at once, payloads from an INLINE to RDMA sizes: the
    // stream is their payloads, each whole, in some order.
    let lens = [100, 5000, 200 << 10, 1 << 20];
    let payloads: Vec<Vec<u8>> = lens.iter().zip(1..).map(|(&n, i)| data(n, i)).collect();
    let total: usize = lens.iter().sum();
    let got = thread::scope(|sc| {
        for p in &payloads {
            let mut w = &client;
            sc.spawn(move || w.write_all(p).expect("write_all"));
        }
        read_n(&server, total, 1 << 20)
    });
    let mut at = 0;
    let mut seen = [false; 4];
    while at < total {
        let i = (0..4)
            .find(|&i| !seen[i] && got[at..].starts_with(&payloads[i]))
            .unwrap_or_else(|| panic!("bytes at {at} start no unsent payload"));
        seen[i] = true;
        at += lens[i];
    }
    // Four readers at once, one message at a time: each returns one.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::scope(|sc| {
        for _ in 0..4 {
            let tx = tx.clone();
            let server = &server;
            sc.spawn(move || {
                let mut buf = [0u8; 64];
                let n = server.recv(&mut buf).expect("recv");
                tx.send(buf[..n].to_vec()).unwrap();
            });
        }
        let mut w = &client;
        for i in 0..4u8 {
            w.write_all(&[i; 10]).unwrap();
            assert_eq!(rx.recv_timeout(T).expect("a reader returned"), [i; 10]);
        }
    });
}

#[test]
fn receive_timeout_leaves_the_connection_usable() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7011);
    client.set_read_timeout(Some(Duration::from_millis(100)));
    let start = Instant::now();
    let e = client.recv(&mut [0u8; 10]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert!(start.elapsed() >= Duration::from_millis(100));
    client.set_read_timeout(Some(T));
    server.send(b"late").unwrap();
    assert_eq!(read_n(&client, 4, 10), b"late");
}

#[test]
fn send_whose_buffer_is_exposed_waits_then_aborts_the_connection() {
    let o = SwitchOptions {
        rdma_cancel_timeout: Duration::from_millis(200),
        ..opts()
    };
    let (c, s) = two(o.clone(), o);
    let (client, server) = pair(&c, &s, 7012);
    client.set_write_timeout(Some(Duration::from_millis(100)));
    let payload = data(1 << 20, 12);
    // The server never reads: the offer stays outstanding, the buffer
    // exposed. Timeout → wait for the RDMA → abort via close_socket.
    let start = Instant::now();
    let e = client.send(&payload).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(5));
    // The connection was aborted: the server sees a reset after the offer.
    let e = server.recv(&mut [0u8; 10]).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        ),
        "{e}"
    );
}

#[test]
fn cancelled_copy_send_reports_what_was_sent() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7013);
    client.set_rdma_threshold(usize::MAX);
    // 2 MiB by copy: 30 credits × 8 KiB fit, the rest waits for the reader.
    let payload = data(2 << 20, 13);
    let n = client
        .send_timeout(&payload, Some(Duration::from_millis(100)))
        .unwrap();
    assert!(n > 0 && n < payload.len(), "partial send of {n}");
    let got = read_n(&server, n, 1 << 20);
    assert!(got[..] == payload[..n]);
    // The stream continues after the partial send (the rest, too, needs
    // the reader: it is more than the receive buffers hold).
    thread::scope(|sc| {
        let r = sc.spawn(|| read_n(&server, payload.len() - n, 1 << 20));
        assert_eq!(client.send(&payload[n..]).unwrap(), payload.len() - n);
        assert!(r.join().unwrap()[..] == payload[n..]);
    });
}

#[test]
fn non_blocking_calls() {
    let (c, s) = two(opts(), opts());
    let (client, server) = pair(&c, &s, 7014);
    assert_eq!(
        server.try_recv(&mut [0u8; 10]).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    let big = data(1 << 20, 14);
    let mut sent = 0;
    loop {
        match client.try_send(&big[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        sent > 0 && sent < big.len(),
        "credits bound try_send: {sent}"
    );
    assert_eq!(client.stats().read_offers, 0, "try_send copies");
    // try_recv drains what arrived (the messages are in flight on the soft
    // fabric already: it executes sends at post time).
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = Instant::now() + T;
    while got.len() < sent {
        match server.try_recv(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "data did not arrive");
                thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(got[..] == big[..sent]);
    // try_recv also pulls an RDMA transfer at the head of the stream.
    client.set_rdma_threshold(1000);
    thread::scope(|sc| {
        sc.spawn(|| client.send(&big[..100_000]).unwrap());
        let mut got = Vec::new();
        let deadline = Instant::now() + T;
        while got.len() < 100_000 {
            match server.try_recv(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "offer did not arrive");
                    thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(got[..] == big[..100_000]);
    });
}

#[test]
fn read_write_traits_and_addresses() {
    let (c, s) = two(opts(), opts());
    let (mut client, mut server) = pair(&c, &s, 7015);
    assert_eq!(client.peer_addr(), server_addr(7015));
    assert_eq!(server.local_addr(), server_addr(7015));
    assert_eq!(*client.local_addr().ip(), Ipv4Addr::new(198, 18, 9, 1));
    client.write_all(b"hello, san").unwrap();
    client.flush().unwrap();
    let mut b = [0u8; 10];
    server.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello, san");
    client.shutdown().unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

// ----------------------------------------------------------------------
// A rogue peer (raw provider calls, not the switch)
// ----------------------------------------------------------------------

mod rogue {
    use super::*;
    use sanpath::event::Event;
    use sanpath::mem::region::Region;
    use sanpath::spi::*;
    use sanpath::switch::proto::{Body, Message, DESC_LEN, MAX_HEAD, MIN_RING, VERSION};
    use sanpath::testkit::CompletingSwitch;
    use sanpath::Config;
    use std::sync::mpsc;

    /// A raw SAN client on `net`: connects to `to` (which completes only
    /// once the server accepts: call it beside the accepting thread),
    /// registers a buffer and sends each message in `msgs` (no credit
    /// discipline at all), the rest only once the first one landed in a
    /// posted receive (so that the flood waits in posted receives, not in
    /// the provider's bounded RNR queue) and, with `go`, once told to.
    fn raw_send(
        net: &Arc<SoftNetwork>,
        to: SocketAddrV4,
        msgs: &[Vec<u8>],
        go: Option<mpsc::Receiver<()>>,
    ) -> Provider {
        let ip = Ipv4Addr::new(198, 18, 9, 66);
        let mut cfg = Config::default();
        cfg.mem.mlock = MlockPolicy::Off;
        cfg.poller.spin_budget = 200;
        let nic = net
            .attach(SoftNicConfig {
                addresses: vec![ip],
                prefix_len: 24,
                connect_timeout: Duration::from_secs(5),
                rnr_queue_max: 8,
            })
            .unwrap();
        let p = Provider::with_nic(cfg, nic).unwrap();
        p.startup(WSD_VERSION, Arc::new(CompletingSwitch), 1)
            .unwrap();
        let s = p
            .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
            .unwrap();
        let ev = Arc::new(Event::new());
        p.event_select(s, Some(ev.clone()), FD_CONNECT).unwrap();
        p.connect(s, to, &[]).unwrap();
        assert!(ev.wait(T), "rogue connect");
        let ne = p.enum_network_events(s, Some(&ev)).unwrap();
        assert_eq!(ne.error_codes[FD_CONNECT_BIT], 0);
        let region = Region::new(64 << 10, MlockPolicy::Off).unwrap();
        // SAFETY: the region outlives the socket's ops (waited for below,
        // and the region is leaked with the provider).
        unsafe {
            p.register_memory(s, region.as_ptr(), region.len() as u32, MEM_READWRITE)
                .unwrap();
        }
        for (i, m) in msgs.iter().enumerate() {
            let off = i * 512;
            region.write_at(off, m).unwrap();
            let ov = Box::leak(Box::new(Overlapped::new(0)));
            let buf = WsaBuf {
                len: m.len() as u32,
                buf: region.as_ptr().wrapping_add(off),
            };
            // SAFETY: buffer and record are leaked: valid for ever.
            let posted = unsafe { p.send(s, &[buf], 0, ov) };
            if i > 0 && posted.is_err() {
                break; // the server noticed the flood and reset the connection
            }
            posted.unwrap();
            let deadline = Instant::now() + T;
            while i == 0 && ov.is_pending() {
                assert!(Instant::now() < deadline, "first message not received");
                thread::yield_now();
            }
            if let (0, Some(go)) = (i, &go) {
                go.recv_timeout(T).expect("go");
            }
        }
        std::mem::forget(region);
        p
    }

    fn encode(seq: u32, body: Body) -> Vec<u8> {
        let m = Message {
            credits: 0,
            seq,
            ack: 0,
            body,
        };
        let mut head = [0u8; MAX_HEAD];
        let n = m.encode(&mut head);
        head[..n].to_vec()
    }

    /// The rogue's HELLO: 8 receives, a ring the server never writes to
    /// (it only reads in these tests).
    fn rogue_hello() -> Vec<u8> {
        encode(
            0,
            Body::Hello {
                recv_slots: 8,
                slot_size: 8192,
                caps: 0,
                ring_size: MIN_RING,
                ring: [0; DESC_LEN],
            },
        )
    }

    /// Accepts the rogue's connection, lets its messages go and reads until
    /// the error; returns the error and the bytes read.
    fn read_until_error(
        l: &Listener,
        net: Arc<SoftNetwork>,
        port: u16,
        msgs: Vec<Vec<u8>>,
    ) -> (std::io::Error, usize) {
        let (go, gate) = mpsc::channel();
        let rogue = thread::spawn(move || raw_send(&net, server_addr(port), &msgs, Some(gate)));
        let (server, _) = l.accept().expect("accept");
        go.send(()).unwrap();
        let _p = rogue.join().unwrap();
        // A switch that misses the error fails with TimedOut, not a hang.
        server.set_read_timeout(Some(T));
        let mut got = 0;
        let e = loop {
            match server.recv(&mut [0u8; 16]) {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        (e, got)
    }

    #[test]
    fn a_peer_of_another_protocol_version_is_refused_with_a_clear_error() {
        let net = SoftNetwork::new();
        let s = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), opts());
        let l = Listener::bind(&s, server_addr(7023)).unwrap();
        let mut hello = rogue_hello();
        hello[2] = 1;
        let rogue = thread::spawn(move || raw_send(&net, server_addr(7023), &[hello], None));
        let deadline = Instant::now() + T;
        let e = loop {
            match l.try_accept() {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "request did not arrive");
                    thread::yield_now();
                }
                Err(e) => break e,
                Ok(_) => panic!("a version-1 peer was accepted"),
            }
        };
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("version 1") && text.contains(&format!("version {VERSION}")),
            "{text}"
        );
        let _p = rogue.join().unwrap();
    }

    /// DATA at another ring offset than the next free byte (a peer that
    /// lies about where it wrote) ends the connection; the data before it
    /// is delivered first.
    #[test]
    fn a_bogus_ring_offset_is_refused() {
        let net = SoftNetwork::new();
        let s = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), opts());
        let l = Listener::bind(&s, server_addr(7024)).unwrap();
        let msgs = vec![
            rogue_hello(),
            encode(1, Body::Data { offset: 0, len: 3 }),
            encode(
                2,
                Body::Data {
                    offset: 100,
                    len: 3,
                },
            ),
        ];
        let (e, got) = read_until_error(&l, net, 7024, msgs);
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("ring offset"), "{e}");
        assert!(got <= 3, "read {got} bytes");
    }

    /// An INLINE whose header claims more payload than arrived ends the
    /// connection; the INLINE before it is delivered first.
    #[test]
    fn an_inline_shorter_than_its_length_is_refused() {
        let net = SoftNetwork::new();
        let s = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), opts());
        let l = Listener::bind(&s, server_addr(7026)).unwrap();
        let mut good = encode(1, Body::Inline { len: 3 });
        good.extend_from_slice(b"abc");
        let mut short = encode(2, Body::Inline { len: 100 });
        short.extend_from_slice(&[7; 50]);
        let msgs = vec![rogue_hello(), good, short];
        let (e, got) = read_until_error(&l, net, 7026, msgs);
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("malformed"), "{e}");
        assert!(got <= 3, "read {got} bytes");
    }

    /// A peer that acks more ring bytes than this side wrote ends the
    /// connection.
    #[test]
    fn a_ring_ack_beyond_what_was_written_is_refused() {
        let net = SoftNetwork::new();
        let s = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), opts());
        let l = Listener::bind(&s, server_addr(7025)).unwrap();
        let mut credit = encode(1, Body::Credit);
        credit[16..20].copy_from_slice(&4096u32.to_le_bytes());
        let (e, _) = read_until_error(&l, net, 7025, vec![rogue_hello(), credit]);
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("ring ack"), "{e}");
    }

    #[test]
    fn garbage_instead_of_hello_fails_the_negotiation() {
        let net = SoftNetwork::new();
        let s = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), opts());
        let l = Listener::bind(&s, server_addr(7020)).unwrap();
        let rogue =
            thread::spawn(move || raw_send(&net, server_addr(7020), &[vec![0xEE; 64]], None));
        let deadline = Instant::now() + T;
        let e = loop {
            match l.try_accept() {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "request did not arrive");
                    thread::yield_now();
                }
                Err(e) => break e,
                Ok(_) => panic!("garbage was accepted"),
            }
        };
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("malformed"), "{e}");
        let _p = rogue.join().unwrap();
    }

    /// A DATA announcing more bytes than the ring holds fails the
    /// connection; the data before it is delivered first, nothing after.
    #[test]
    fn an_oversize_length_is_refused() {
        let net = SoftNetwork::new();
        let s = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), opts());
        let l = Listener::bind(&s, server_addr(7022)).unwrap();
        let msgs = vec![
            rogue_hello(),
            encode(1, Body::Data { offset: 0, len: 3 }),
            encode(
                2,
                Body::Data {
                    offset: 3,
                    len: u32::MAX,
                },
            ),
            encode(3, Body::Data { offset: 3, len: 3 }),
        ];
        let (e, got) = read_until_error(&l, net, 7022, msgs);
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("end of the ring"), "{e}");
        assert!(got <= 3, "read {got} bytes");
    }

    #[test]
    fn flooding_beyond_credits_is_a_credit_violation() {
        let net = SoftNetwork::new();
        let o = SwitchOptions {
            recv_slots: 8,
            credit_batch: Some(0),
            ..opts()
        };
        let s = runtime_on(&net, Ipv4Addr::new(198, 18, 9, 2), o);
        let l = Listener::bind(&s, server_addr(7021)).unwrap();
        // HELLO claiming 8 receives, then 12 DATA messages on 6 credits.
        let mut msgs = vec![rogue_hello()];
        for seq in 1..=12 {
            let offset = (seq - 1) * 3;
            msgs.push(encode(seq, Body::Data { offset, len: 3 }));
        }
        // The flood follows once the server accepted (a connection that
        // fails before its negotiation completed is not accepted).
        let (go, gate) = mpsc::channel();
        let rogue = thread::spawn(move || raw_send(&net, server_addr(7021), &msgs, Some(gate)));
        let (server, _) = l.accept().expect("accept");
        go.send(()).unwrap();
        let _p = rogue.join().unwrap();
        // The app reads: receives are re-posted but not announced (no
        // credit batch), so the flood lands in them and the switch notices.
        let mut got = 0;
        let e = loop {
            match server.recv(&mut [0u8; 3]) {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("credit violation"), "{e}");
        assert!(got <= 6 * 3 + 3, "read {got} bytes");
    }
}
