//! Readiness of the reference switch's streams and listeners (their
//! `AsRawFd` eventfd, `switch::ready`): the `tokio_echo` example's server
//! serving a thousand connections from one thread, and the fd's rules one
//! by one, with the provider run to completion (the hub picks a waiting
//! stream to reap) and with poller threads (the dispatcher delivers).
//! Every wait is a `poll` with a timeout that fails loudly; "not readable"
//! is checked after the event that must not make it readable was
//! processed.

#[path = "../examples/tokio_echo/serve.rs"]
mod serve;

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::fabric::soft::SoftNetwork;
use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream, SwitchOptions};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

/// Bound on anything that should happen promptly.
const T: Duration = Duration::from_secs(20);

/// Bound on the thousand-connection echo (a debug build on a loaded
/// two-core machine).
const ECHO_BOUND: Duration = Duration::from_secs(300);

fn echo_1000(mode: PollerMode) {
    let plan = serve::Plan {
        connections: 1000,
        rounds: 2,
        client_threads: 4,
        server_mode: mode,
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(serve::run(plan)));
    let report = match rx.recv_timeout(ECHO_BOUND) {
        Ok(r) => r.expect("echo run"),
        Err(_) => panic!("1000 connections not echoed within {ECHO_BOUND:?} ({mode:?})"),
    };
    assert_eq!(report.served, 1000, "{mode:?}");
    let sent: u64 = (0..1000)
        .flat_map(|c| (0..2).map(move |r| ((c * 131 + r * 977) % 5000 + 1) as u64))
        .sum();
    assert_eq!(report.echoed, sent, "every byte echoed once ({mode:?})");
}

#[test]
fn one_tokio_thread_echoes_1000_connections_run_to_completion() {
    echo_1000(PollerMode::RunToCompletion);
}

#[test]
fn one_tokio_thread_echoes_1000_connections_with_poller_threads() {
    echo_1000(PollerMode::Threads);
}

fn runtime_on(net: &Arc<SoftNetwork>, ip: Ipv4Addr, mode: PollerMode) -> Arc<Runtime> {
    let mut c = RuntimeConfig::default();
    c.engine.mem.mlock = MlockPolicy::Off;
    c.engine.poller.spin_budget = 20;
    c.engine.poller.mode = mode;
    c.engine.fabric.soft.addresses = vec![ip];
    c.switch = SwitchOptions {
        read_timeout: Some(T),
        write_timeout: Some(T),
        accept_timeout: Some(T),
        connect_timeout: T,
        handshake_timeout: T,
        ..SwitchOptions::default()
    };
    let nic = net.attach(c.engine.soft_nic(vec![ip])).expect("attach");
    Runtime::with_nic(c, nic).expect("runtime")
}

const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 8, 2), 7100);

/// Client and server runtimes on a private network, and a listener.
fn hosts(mode: PollerMode) -> (Arc<Runtime>, Arc<Runtime>, Listener) {
    let net = SoftNetwork::new();
    let c = runtime_on(&net, Ipv4Addr::new(198, 18, 8, 1), mode);
    let s = runtime_on(&net, *SERVER.ip(), mode);
    let l = Listener::bind(&s, SERVER).expect("bind");
    (c, s, l)
}

/// A connected (client, server) pair; the server's stream is non-blocking
/// with its fd.
fn pair(mode: PollerMode) -> (Stream, Stream) {
    let (c, _s, l) = hosts(mode);
    let acceptor = thread::spawn(move || l.accept().expect("accept").0);
    let client = Stream::connect(&c, SERVER).expect("connect");
    let server = acceptor.join().unwrap();
    server.set_nonblocking(true).expect("non-blocking");
    (client, server)
}

/// Whether `fd` becomes readable within `timeout`.
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents & libc::POLLIN != 0
}

fn now(fd: RawFd) -> bool {
    readable(fd, Duration::ZERO)
}

/// After a `WouldBlock` of `retry`: the fd is clear, but for wake-ups by
/// completions still in flight (spurious wake-ups are allowed), each of
/// which finds nothing to do (`retry` fails with `WouldBlock` again); a
/// fd that stays readable fails.
fn clear_after<T>(fd: RawFd, mut retry: impl FnMut() -> std::io::Result<T>) {
    for _ in 0..16 {
        if !readable(fd, Duration::from_millis(20)) {
            return;
        }
        would_block(retry());
    }
    panic!("the fd stays readable while nothing can go on");
}

fn would_block<T>(r: std::io::Result<T>) {
    match r {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => panic!("expected WouldBlock, got {e}"),
        Ok(_) => panic!("expected WouldBlock, the call succeeded"),
    }
}

/// A fresh fd says "try"; after a `WouldBlock` it is clear until data
/// arrives; then readable (without a call on the receiving side), and the
/// data is there; reading it all and hitting `WouldBlock` clears it again.
fn readable_only_after_data_arrives(mode: PollerMode) {
    let (client, server) = pair(mode);
    let fd = server.as_raw_fd();
    assert!(now(fd), "a fresh fd is readable");
    let mut buf = [0u8; 64];
    would_block(server.try_recv(&mut buf));
    clear_after(fd, || server.try_recv(&mut buf));
    // A round trip in the other direction: the server's send and its
    // completion are processed, and the client's reply is what wakes it.
    assert_eq!(server.try_send(b"ping").expect("send"), 4);
    let mut ping = [0u8; 4];
    std::io::Read::read_exact(&mut &client, &mut ping).expect("client reads");
    client.send(b"hello").expect("client sends");
    assert!(readable(fd, T), "readable once data arrived ({mode:?})");
    let mut got = Vec::new();
    while got.len() < 5 {
        match server.try_recv(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(readable(fd, T), "more data is coming ({mode:?})")
            }
            Err(e) => panic!("try_recv: {e}"),
        }
    }
    assert_eq!(got, b"hello");
    would_block(server.try_recv(&mut buf));
    clear_after(fd, || server.try_recv(&mut buf));
}

#[test]
fn readable_only_after_data_arrives_run_to_completion() {
    readable_only_after_data_arrives(PollerMode::RunToCompletion);
}

#[test]
fn readable_only_after_data_arrives_with_poller_threads() {
    readable_only_after_data_arrives(PollerMode::Threads);
}

/// Sends until `WouldBlock` (the peer reads nothing, so credits run out):
/// the fd is clear; once the peer reads and its credits come back, it is
/// readable and the send goes on.
fn writable_after_credits_return(mode: PollerMode) {
    let (client, server) = pair(mode);
    let fd = server.as_raw_fd();
    let chunk = vec![7u8; 4096];
    let mut sent = 0usize;
    let mut woken = 0;
    loop {
        match server.try_send(&chunk) {
            Ok(n) => sent += n,
            // Send buffers come back as their sends complete (the fd says
            // so); credits do not while the peer reads nothing: the fd
            // stays clear.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !readable(fd, Duration::from_millis(200)) {
                    break;
                }
                woken += 1;
                assert!(
                    woken < 1000,
                    "the fd stays readable while nothing can go on"
                );
            }
            Err(e) => panic!("try_send: {e}"),
        }
        assert!(sent < 64 << 20, "credits never ran out");
    }
    assert!(sent > 0);
    assert!(!now(fd));
    // The client reads everything sent so far: its receives are re-posted
    // and the credits travel back.
    let mut got = vec![0u8; sent];
    std::io::Read::read_exact(&mut &client, &mut got).expect("client reads");
    assert!(got.iter().all(|&b| b == 7));
    assert!(readable(fd, T), "readable once credits returned ({mode:?})");
    let mut more = 0;
    while more == 0 {
        match server.try_send(&chunk) {
            Ok(n) => more = n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(readable(fd, T), "credits are coming ({mode:?})")
            }
            Err(e) => panic!("try_send: {e}"),
        }
    }
}

#[test]
fn writable_after_credits_return_run_to_completion() {
    writable_after_credits_return(PollerMode::RunToCompletion);
}

#[test]
fn writable_after_credits_return_with_poller_threads() {
    writable_after_credits_return(PollerMode::Threads);
}

/// A listener's fd: clear after a `WouldBlock`, readable once a
/// connection request waits, and `try_accept` then returns it.
fn listener_readable_when_a_connection_waits(mode: PollerMode) {
    let (c, _s, l) = hosts(mode);
    l.set_nonblocking(true).expect("non-blocking");
    let fd = l.as_raw_fd();
    assert!(now(fd), "a fresh fd is readable");
    would_block(l.try_accept());
    assert!(!now(fd), "cleared by WouldBlock");
    would_block(l.accept());
    assert!(!now(fd), "cleared by WouldBlock");
    let connector = thread::spawn(move || Stream::connect(&c, SERVER).map(|s| s.local_addr()));
    assert!(readable(fd, T), "readable once a request waits ({mode:?})");
    let (s, peer) = l.try_accept().expect("accept");
    assert_eq!(connector.join().unwrap().expect("connect"), peer);
    would_block(l.try_accept());
    assert!(!now(fd), "cleared again ({mode:?})");
    drop(s);
}

#[test]
fn listener_readable_when_a_connection_waits_run_to_completion() {
    listener_readable_when_a_connection_waits(PollerMode::RunToCompletion);
}

#[test]
fn listener_readable_when_a_connection_waits_with_poller_threads() {
    listener_readable_when_a_connection_waits(PollerMode::Threads);
}

/// A non-blocking stream's `Read`/`Write` fail with `WouldBlock` instead
/// of waiting; turned off, they block again.
#[test]
fn set_nonblocking_makes_read_and_write_non_blocking() {
    let (client, server) = pair(PollerMode::RunToCompletion);
    let mut buf = [0u8; 8];
    would_block(std::io::Read::read(&mut &server, &mut buf));
    client.send(b"abc").expect("send");
    server.set_nonblocking(false).expect("blocking");
    assert_eq!(
        std::io::Read::read(&mut &server, &mut buf).expect("read"),
        3
    );
}
