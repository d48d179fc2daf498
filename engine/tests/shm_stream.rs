//! The reference switch's stream sockets between two processes on the shm
//! fabric: this test binary re-executed as the server (`SERVER_ENV` names
//! the runtime directory), which echoes one connection. The server reports
//! on stdout lines; it is killed if the test fails (and its own blocking
//! calls have timeouts), so nothing outlives the test.
#![cfg(not(loom))]

use sanpath::config::{FabricKind, MlockPolicy};
use sanpath::switch::{Listener, RdmaFlow, Runtime, RuntimeConfig, Stream, SwitchOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const SERVER_ENV: &str = "SANPATH_SHM_STREAM_SERVER_DIR";
const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const T: Duration = Duration::from_secs(20);

fn runtime(ip: Ipv4Addr, flow: RdmaFlow, dir: &Path) -> Arc<Runtime> {
    let mut c = RuntimeConfig::default();
    c.engine.mem.mlock = MlockPolicy::Off;
    c.engine.fabric.kind = FabricKind::Shm;
    c.engine.fabric.soft.addresses = vec![ip];
    c.engine.fabric.shm.runtime_dir = dir.to_string_lossy().into_owned();
    c.switch = SwitchOptions {
        rdma_flow: flow,
        read_timeout: Some(T),
        write_timeout: Some(T),
        accept_timeout: Some(T),
        connect_timeout: T,
        handshake_timeout: T,
        ..SwitchOptions::default()
    };
    Runtime::start(c).expect("runtime on shm")
}

/// The server process: echoes one connection until end of stream.
#[test]
fn server() {
    let Some(dir) = std::env::var_os(SERVER_ENV) else {
        return;
    };
    let rt = runtime(*SERVER.ip(), RdmaFlow::Read, Path::new(&dir));
    let l = Listener::bind(&rt, SERVER).expect("bind");
    println!("\nLISTENING");
    let (s, _) = l.accept().expect("accept");
    let mut buf = vec![0u8; 1 << 20];
    let mut echoed = 0u64;
    loop {
        let n = s.recv(&mut buf).expect("server recv");
        if n == 0 {
            break;
        }
        (&s).write_all(&buf[..n]).expect("server send");
        echoed += n as u64;
    }
    s.close();
    println!("\nECHOED {echoed}");
}

/// The server process, killed unless it exited.
struct ServerProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    dir: PathBuf,
}

impl ServerProcess {
    fn spawn(name: &str) -> ServerProcess {
        use std::os::unix::fs::DirBuilderExt;
        let dir =
            std::env::temp_dir().join(format!("sanpath-shm-stream-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "server", "--nocapture", "--test-threads=1"])
            .env(SERVER_ENV, &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("re-executing the test binary as the server");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut s = ServerProcess { child, lines, dir };
        s.expect("LISTENING");
        s
    }

    fn expect(&mut self, word: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(word) => return l,
                Ok(_) => continue,
                Err(_) => panic!("the server process said no {word} within {T:?}"),
            }
        }
    }

    fn wait_success(&mut self) {
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the server process did not exit");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "the server process failed: {status}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `payload` (on a second thread) and reads it back.
fn echo(s: &Stream, payload: &[u8]) -> Vec<u8> {
    let mut back = vec![0u8; payload.len()];
    std::thread::scope(|sc| {
        let sender = sc.spawn(|| {
            let mut w = s;
            w.write_all(payload)
        });
        let mut r = s;
        r.read_exact(&mut back).expect("reading the echo");
        sender.join().unwrap().expect("sending");
    });
    back
}

/// Payloads copied through the control path and moved by RDMA (both
/// flows: the client writes, the server's runtime reads) come back whole
/// from the other process; end of stream reaches each side after every
/// byte, and the server exits cleanly.
#[test]
fn stream_echo_between_two_processes() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return;
    }
    let mut server = ServerProcess::spawn("echo");
    let rt = runtime(CLIENT, RdmaFlow::Write, &server.dir);
    let s = Stream::connect(&rt, SERVER).expect("connect to the server process");
    let threshold = s.rdma_threshold();
    let mut total = 0u64;
    for (i, len) in [1, 100, 8 << 10, threshold + 1, 1 << 20, 4 << 20]
        .into_iter()
        .enumerate()
    {
        let p = pattern(len, i as u8);
        assert!(echo(&s, &p) == p, "{len} bytes came back different");
        total += len as u64;
    }
    let stats = s.stats();
    assert!(
        stats.write_requests > 0 && stats.rdma_reads > 0,
        "both RDMA flows: {stats:?}"
    );
    s.shutdown().unwrap();
    assert_eq!(s.recv(&mut [0u8; 1]).unwrap(), 0, "end of stream");
    assert_eq!(server.expect("ECHOED"), format!("ECHOED {total}"));
    server.wait_success();
    s.close();
}

/// The server process killed in the middle of a transfer: the client's
/// blocked read ends with a reset, well before its timeout, not a hang.
#[test]
fn a_killed_server_process_resets_the_stream() {
    if std::env::var_os(SERVER_ENV).is_some() {
        return;
    }
    let mut server = ServerProcess::spawn("kill");
    let rt = runtime(CLIENT, RdmaFlow::Write, &server.dir);
    let s = Stream::connect(&rt, SERVER).expect("connect to the server process");
    let p = pattern(1000, 7);
    assert!(echo(&s, &p) == p);
    server.child.kill().unwrap();
    let started = Instant::now();
    let e = s.recv(&mut [0u8; 64]).expect_err("a read from a dead peer");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        ),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the reset took {:?}",
        started.elapsed()
    );
    s.close();
}
