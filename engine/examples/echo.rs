//! An echo over sanpath's stream sockets, on the soft fabric built into the
//! engine (no RDMA hardware, no root):
//!
//! ```sh
//! cargo run --release --example echo
//! ```
//!
//! Two runtimes, like two hosts on one SAN: the server echoes every byte
//! back until end of stream; the client sends payloads from 1 byte to
//! 16 MiB and checks the checksum of what comes back. Payloads above the
//! RDMA threshold (`SO_RDMA_THRESHOLD_SIZE`, 64 KiB by default) go by RDMA
//! instead of being copied through control messages: the client's runtime
//! uses the RDMA-write flow and the server's the RDMA-read flow, so the echo
//! crosses both. Every blocking call has a timeout. Exits non-zero if
//! anything comes back wrong.
//!
//! With `--shm` the two hosts are two processes on the shared-memory fabric
//! (`fabric.kind = "shm"`, a private runtime directory): this program runs
//! itself again as the server, which owns 198.18.0.1 and echoes one
//! connection; the server is killed if it does not finish in time.
//!
//! ```sh
//! cargo run --release --example echo -- --shm
//! ```

use sanpath::config::FabricKind;
use sanpath::switch::{Listener, RdmaFlow, Runtime, RuntimeConfig, Stream, SwitchOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// Bound on every blocking call (connect, accept, send, receive).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Payload sizes: below, at and above the 8 KiB control buffers and the
/// 64 KiB RDMA threshold, up to 16 MiB.
const SIZES: [usize; 7] = [1, 100, 8 << 10, 64 << 10, (64 << 10) + 1, 1 << 20, 16 << 20];

const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7007);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Set in the server process of `--shm`: the runtime directory.
const SERVER_ENV: &str = "SANPATH_ECHO_SERVER_DIR";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("echo: FAILED");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A runtime (a provider with the reference switch on top) owning `ip` on
/// the process-wide soft network, or with `shm` on the shm fabric in that
/// runtime directory, whose large sends use `rdma_flow`.
fn runtime(ip: Ipv4Addr, rdma_flow: RdmaFlow, shm: Option<&Path>) -> io::Result<Arc<Runtime>> {
    let mut config = RuntimeConfig::default();
    config.engine.fabric.soft.addresses = vec![ip];
    if let Some(dir) = shm {
        config.engine.fabric.kind = FabricKind::Shm;
        config.engine.fabric.shm.runtime_dir = dir.to_string_lossy().into_owned();
    }
    config.switch = SwitchOptions {
        rdma_flow,
        connect_timeout: TIMEOUT,
        accept_timeout: Some(TIMEOUT),
        read_timeout: Some(TIMEOUT),
        write_timeout: Some(TIMEOUT),
        ..SwitchOptions::default()
    };
    Runtime::start(config)
}

/// Accepts one connection and echoes it until end of stream; returns the
/// bytes echoed.
fn serve(listener: Listener) -> io::Result<u64> {
    let (stream, _peer) = listener.accept()?;
    // Receives of up to 1 MiB, so that large payloads go back by RDMA too.
    let mut buf = vec![0u8; 1 << 20];
    let mut echoed = 0;
    loop {
        let n = stream.recv(&mut buf)?;
        if n == 0 {
            break; // the client shut down its side
        }
        (&stream).write_all(&buf[..n])?;
        echoed += n as u64;
    }
    stream.close(); // graceful: the client reads end of stream
    Ok(echoed)
}

/// Sends `payload` and reads it back. The send runs on a second thread:
/// the echo comes back while the payload is still going out, and the
/// server's receive buffers fill if nobody reads.
fn echo(stream: &Stream, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut back = vec![0u8; payload.len()];
    thread::scope(|s| {
        let sender = s.spawn(|| {
            let mut w = stream;
            w.write_all(payload)
        });
        let mut r = stream;
        let read = r.read_exact(&mut back);
        sender.join().expect("sender thread panicked")?;
        read
    })?;
    Ok(back)
}

/// The server: a thread of this process, or (`--shm`) another process.
enum Server {
    /// Taken by `join`.
    Thread(Option<thread::JoinHandle<io::Result<u64>>>),
    Process {
        child: Child,
        lines: mpsc::Receiver<String>,
        dir: PathBuf,
    },
}

impl Server {
    /// The server process on shm: this program again, with [`SERVER_ENV`];
    /// returns once it listens.
    fn spawn(dir: PathBuf) -> io::Result<Server> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(SERVER_ENV, &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut s = Server::Process { child, lines, dir };
        s.expect("LISTENING")?;
        Ok(s)
    }

    /// The server process's next line, which must start with `word`.
    fn expect(&mut self, word: &str) -> io::Result<String> {
        let Server::Process { lines, .. } = self else {
            unreachable!("only a server process talks")
        };
        match lines.recv_timeout(TIMEOUT) {
            Ok(l) if l.starts_with(word) => Ok(l),
            Ok(l) => Err(io::Error::other(format!(
                "server process: {l:?}, not {word}"
            ))),
            Err(_) => Err(io::Error::other(format!(
                "the server process said no {word} within {TIMEOUT:?}"
            ))),
        }
    }

    /// The bytes the server echoed, once it finished (bounded).
    fn join(mut self) -> io::Result<u64> {
        if let Server::Thread(t) = &mut self {
            let t = t.take().expect("joined once");
            return t.join().expect("server thread panicked");
        }
        let line = self.expect("ECHOED")?;
        let Server::Process { child, .. } = &mut self else {
            unreachable!()
        };
        let deadline = Instant::now() + TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                return Err(io::Error::other("the server process did not exit"));
            }
            thread::sleep(Duration::from_millis(5));
        }
        line["ECHOED".len()..]
            .trim()
            .parse()
            .map_err(|_| io::Error::other(format!("server process: {line:?}")))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Process { child, dir, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The server process of `--shm`: listens, says so, echoes one connection.
fn server_process(dir: &Path) -> io::Result<bool> {
    let rt = runtime(*SERVER.ip(), RdmaFlow::Read, Some(dir))?;
    let listener = Listener::bind(&rt, SERVER)?;
    println!("LISTENING");
    let echoed = serve(listener)?;
    println!("ECHOED {echoed}");
    Ok(true)
}

/// A private runtime directory (mode 0700) for `--shm`.
fn private_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("sanpath-echo-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn run() -> io::Result<bool> {
    if let Some(dir) = std::env::var_os(SERVER_ENV) {
        return server_process(Path::new(&dir));
    }
    let shm = std::env::args().skip(1).any(|a| a == "--shm");
    let (client_rt, server) = if shm {
        let dir = private_dir()?;
        let server = Server::spawn(dir.clone())?;
        (runtime(CLIENT_IP, RdmaFlow::Write, Some(&dir))?, server)
    } else {
        let server_rt = runtime(*SERVER.ip(), RdmaFlow::Read, None)?;
        let listener = Listener::bind(&server_rt, SERVER)?;
        let server = Server::Thread(Some(thread::spawn(move || serve(listener))));
        (runtime(CLIENT_IP, RdmaFlow::Write, None)?, server)
    };

    let client = Stream::connect(&client_rt, SERVER)?;
    let threshold = client.rdma_threshold();
    println!(
        "echo: {} -> {}{}, RDMA above {threshold} bytes",
        client.local_addr(),
        client.peer_addr(),
        if shm { " (another process, shm)" } else { "" }
    );
    println!(
        "{:>10}  {:<4}  {:>9}  {:>8}  {:<16}  check",
        "bytes", "path", "ms", "MB/s", "fnv-1a"
    );
    let started = Instant::now();
    let (mut all_ok, mut total) = (true, 0u64);
    for (i, &len) in SIZES.iter().enumerate() {
        let payload = pattern(len, i as u64);
        let sum = fnv1a(&payload);
        let t0 = Instant::now();
        let back = echo(&client, &payload)?;
        let secs = t0.elapsed().as_secs_f64();
        let ok = fnv1a(&back) == sum;
        all_ok &= ok;
        total += len as u64;
        println!(
            "{len:>10}  {:<4}  {:>9.3}  {:>8.1}  {sum:016x}  {}",
            if len > threshold { "rdma" } else { "copy" },
            secs * 1e3,
            2.0 * len as f64 / secs / 1e6,
            if ok { "ok" } else { "MISMATCH" }
        );
    }

    // Graceful shutdown: the server reads end of stream, closes, and we
    // read end of stream in turn.
    client.shutdown()?;
    let end = client.recv(&mut [0u8; 1])?;
    let echoed = server.join()?;
    let stats = client.stats();
    client.close();
    let elapsed = started.elapsed();

    let flows_ok = stats.write_requests > 0 && stats.rdma_reads > 0;
    let done_ok = end == 0 && echoed == total;
    println!(
        "large transfers: client -> server by RDMA write ({} requests), \
         server -> client by RDMA read ({} reads)",
        stats.write_requests, stats.rdma_reads
    );
    println!(
        "{}: {} payloads, {total} bytes each way in {:.0} ms, end of stream {}",
        if all_ok && flows_ok && done_ok {
            "ok"
        } else {
            "FAILED"
        },
        SIZES.len(),
        elapsed.as_secs_f64() * 1e3,
        if done_ok {
            "after every byte"
        } else {
            "early or missing"
        },
    );
    Ok(all_ok && flows_ok && done_ok)
}

/// `len` deterministic bytes (an xorshift sequence seeded by `seed`).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
