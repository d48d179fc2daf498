//! The data path allocates nothing per op: after warm-up, send/receive
//! round trips and RDMA writes through the provider (run-to-completion mode,
//! soft fabric) make zero heap allocations. A counting global allocator
//! counts the allocations of the test's thread, which in run-to-completion
//! mode runs the whole data path (the provider starts no thread for polled
//! ops); the test harness's own threads allocate meanwhile (its main thread
//! books the running test, late when the machine is loaded), so counting
//! the whole process made the test fail at random.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::testkit::{self, CompletingSwitch};
use sanpath::Config;
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread's allocations count (the test's thread only).
    static COUNTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn count() {
    if COUNTED.with(std::cell::Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn wait(p: &Provider, ov: &Overlapped) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ov.is_pending() {
        assert!(Instant::now() < deadline, "op did not complete");
        p.progress();
    }
    assert_eq!(ov.offset_high.load(Ordering::Relaxed), 0, "op failed");
}

#[test]
fn data_path_makes_no_allocation_per_op() {
    let mut config = Config::default();
    config.poller.mode = PollerMode::RunToCompletion;
    config.mem.mlock = MlockPolicy::Off;
    let ip = Ipv4Addr::new(198, 18, 9, 1);
    let (p, _nic, _net) = testkit::soft_provider(config, ip, Arc::new(CompletingSwitch)).unwrap();
    let (c, s) = testkit::connected_pair(&p, SocketAddrV4::new(ip, 7000)).unwrap();

    let rc = Region::new(1 << 16, MlockPolicy::Off).unwrap();
    let rs = Region::new(1 << 16, MlockPolicy::Off).unwrap();
    let mut desc = [0u8; RDMA_DESCRIPTOR_LEN];
    // SAFETY: the regions outlive the sockets' use (closed below first).
    let hc = unsafe {
        p.register_memory(s, rs.as_ptr(), 1 << 15, MEM_READWRITE)
            .unwrap();
        p.register_rdma_memory(s, rs.as_ptr().add(1 << 15), 1 << 15, MEM_WRITE, &mut desc)
            .unwrap();
        p.register_memory(c, rc.as_ptr(), 1 << 16, MEM_READWRITE)
            .unwrap()
    };
    let (r, w, x) = (Overlapped::new(1), Overlapped::new(1), Overlapped::new(1));
    let rb = [WsaBuf {
        len: 4096,
        buf: rs.as_ptr(),
    }];
    let sb = [WsaBuf {
        len: 512,
        buf: rc.as_ptr(),
    }];
    let xb = [WsaBufEx {
        len: 8192,
        buf: rc.as_ptr(),
        handle: hc as usize,
    }];
    let round = || {
        // SAFETY: buffers and overlapped records outlive each op (waited for).
        unsafe {
            p.recv(s, &rb, &r).unwrap();
            p.send(c, &sb, 0, &w).unwrap();
            p.rdma_write(c, &xb, &desc, 100, 0, &x).unwrap();
        }
        wait(&p, &r);
        wait(&p, &w);
        wait(&p, &x);
    };
    for _ in 0..100 {
        round();
    }
    COUNTED.with(|c| c.set(true));
    let before = ALLOCS.load(Ordering::SeqCst);
    for _ in 0..10_000 {
        round();
    }
    let after = ALLOCS.load(Ordering::SeqCst);
    COUNTED.with(|c| c.set(false));
    assert_eq!(after - before, 0, "allocations during 30000 ops");
    p.close_socket(c).unwrap();
    p.close_socket(s).unwrap();
    p.cleanup().unwrap();
}
