//! 8-byte ping-pong between two processes over the shm fabric, at the
//! fabric's own interface (no engine above it): the one-way latency is half
//! a round trip. The process re-executes itself as the server; the client
//! runs on core 0, the server on core 1, both polling (bounded: the run
//! ends after the given number of round trips).
//!
//! `cargo run --release -p sanpath --example shm_pingpong [ROUND_TRIPS]`

use sanpath::fabric::shm::{ShmNic, ShmNicConfig};
use sanpath::fabric::*;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const PORT: u16 = 9000;
const ROLE: &str = "SHM_PINGPONG_SERVER";

struct Nothing;
impl Waker for Nothing {
    fn wake(&self) {}
}
impl QpEvents for Nothing {
    fn disconnected(&self) {}
}
impl ListenerEvents for Nothing {
    fn request_arrived(&self) {}
}

fn nic(ip: Ipv4Addr, dir: &std::path::Path) -> ShmNic {
    ShmNic::new(ShmNicConfig {
        addresses: vec![ip],
        prefix_len: 24,
        connect_timeout: Duration::from_secs(5),
        runtime_dir: Some(dir.to_path_buf()),
    })
    .expect("shm NIC")
}

/// Polls until a receive completes (sends are reaped on the way); false if
/// the connection broke.
fn await_recv(cq: &dyn CompletionQueue, out: &mut [WorkCompletion]) -> Option<WrId> {
    loop {
        let n = cq.poll(out);
        for c in &out[..n] {
            if c.status != WcStatus::Success {
                return None;
            }
            if c.opcode == WcOpcode::Recv {
                return Some(c.wr_id);
            }
        }
        std::hint::spin_loop();
    }
}

fn run(server: bool, dir: &std::path::Path, trips: u64) {
    let core = usize::from(server);
    core_affinity::set_for_current(core_affinity::CoreId { id: core });
    let me = if server { SERVER } else { CLIENT };
    let nic = nic(me, dir);
    let cq = nic.create_cq(256, Arc::new(Nothing)).unwrap();
    let params = QpParams {
        cq: cq.id(),
        send_depth: 64,
        recv_depth: 64,
        max_sge: 1,
        events: Arc::new(Nothing),
    };
    let qp: Arc<dyn QueuePair> = if server {
        let l = nic
            .listen(SocketAddrV4::new(SERVER, PORT), 1, Arc::new(Nothing))
            .unwrap();
        println!("ready");
        let deadline = Instant::now() + Duration::from_secs(10);
        let req = loop {
            if let Some(r) = l.peek() {
                break r;
            }
            assert!(Instant::now() < deadline, "no client");
            std::thread::sleep(Duration::from_millis(1));
        };
        req.accept(params).unwrap()
    } else {
        let (tx, rx) = std::sync::mpsc::channel();
        let _a = nic
            .connect(
                SocketAddrV4::new(CLIENT, 0),
                SocketAddrV4::new(SERVER, PORT),
                params,
                Box::new(move |r| tx.send(r).unwrap()),
            )
            .unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap()
    };
    let buf = vec![0u8; 64 * 8 + 8];
    // SAFETY: `buf` outlives the NIC's use of it (the queue pair and the
    // NIC are dropped at the end of this function, before `buf`).
    let lkey = unsafe { nic.register(buf.as_ptr() as usize, buf.len(), Access::LOCAL_WRITE) }
        .unwrap()
        .lkey;
    let sge = |i: usize| Sge {
        addr: buf.as_ptr() as usize + i * 8,
        len: 8,
        lkey,
    };
    for i in 0..32 {
        qp.post_recv(&RecvWr {
            wr_id: i,
            sges: &[sge(i as usize)],
        })
        .unwrap();
    }
    let ping = [sge(64)];
    let mut out = [WorkCompletion::EMPTY; 32];
    let warmup = trips / 10;
    let mut start = Instant::now();
    for t in 0..warmup + trips {
        if t == warmup {
            start = Instant::now();
        }
        if !server {
            qp.post_send(&SendWr {
                wr_id: 1000,
                op: SendOp::Send,
                sges: &ping,
            })
            .unwrap();
        }
        let Some(r) = await_recv(cq.as_ref(), &mut out) else {
            break;
        };
        qp.post_recv(&RecvWr {
            wr_id: r,
            sges: &[sge(r as usize)],
        })
        .unwrap();
        if server {
            qp.post_send(&SendWr {
                wr_id: 1000,
                op: SendOp::Send,
                sges: &ping,
            })
            .unwrap();
        }
    }
    if !server {
        let per_trip = start.elapsed().as_secs_f64() / trips as f64;
        println!(
            "shm 8 B ping-pong, {trips} round trips: {:.3} us round trip, {:.3} us one way",
            per_trip * 1e6,
            per_trip * 0.5e6
        );
    }
}

fn main() {
    let trips: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUND_TRIPS"))
        .unwrap_or(200_000);
    if let Some(dir) = std::env::var_os(ROLE) {
        run(true, std::path::Path::new(&dir), trips);
        return;
    }
    let dir = std::env::temp_dir().join(format!("sanpath-pingpong-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg(trips.to_string())
        .env(ROLE, &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    run(false, &dir, trips);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
