//! One op through the engine on the soft fabric, single thread, run to
//! completion: post a receive, post the matching send, reap both (the CPU
//! cost of a message with hot caches, no core crossing). Also the
//! registration lookup every data call makes, by how many registrations the
//! socket holds (a buffer found by address, `WSABUF`, and by handle,
//! `WSABUFEX`).

use criterion::{criterion_group, criterion_main, Criterion};
use sanpath::config::{MlockPolicy, MrCacheConfig, PollerMode};
use sanpath::mem::region::Region;
use sanpath::mem::table::{MemFlags, OwnerId, RegistrationTable};
use sanpath::spi::*;
use sanpath::testkit::{self, CompletingSwitch};
use sanpath::Config;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

fn post_and_poll(c: &mut Criterion) {
    let mut config = Config::default();
    config.poller.mode = PollerMode::RunToCompletion;
    config.mem.mlock = MlockPolicy::Off;
    let ip = Ipv4Addr::new(198, 18, 251, 1);
    let (p, _nic, _net) = testkit::soft_provider(config, ip, Arc::new(CompletingSwitch)).unwrap();
    let (cs, ss) = testkit::connected_pair(&p, SocketAddrV4::new(ip, 9)).unwrap();
    let r = Region::new(1 << 16, MlockPolicy::Off).unwrap();
    // SAFETY: the region outlives the sockets (cleanup below runs first).
    unsafe {
        p.register_memory(cs, r.as_ptr(), 1 << 15, MEM_READWRITE)
            .unwrap();
        p.register_memory(ss, r.as_ptr().add(1 << 15), 1 << 15, MEM_READWRITE)
            .unwrap();
    }
    let (rov, sov) = (Overlapped::new(1), Overlapped::new(1));
    let rb = [WsaBuf {
        len: 64,
        buf: r.as_ptr().wrapping_add(1 << 15),
    }];
    let sb = [WsaBuf {
        len: 64,
        buf: r.as_ptr(),
    }];
    c.bench_function("send_recv_64B_post_and_reap", |b| {
        b.iter(|| {
            // SAFETY: buffers and records outlive the ops (reaped below).
            unsafe {
                p.recv(ss, &rb, &rov).unwrap();
                p.send(cs, &sb, 0, &sov).unwrap();
            }
            while rov.is_pending() || sov.is_pending() {
                p.progress();
            }
        })
    });
    c.bench_function("get_overlapped_result_completed", |b| {
        b.iter(|| p.get_overlapped_result(ss, &rov, false).unwrap())
    });
    p.cleanup().unwrap();
}

fn registration_lookup(c: &mut Criterion) {
    let mut config = Config::default();
    config.poller.mode = PollerMode::RunToCompletion;
    config.mem.mlock = MlockPolicy::Off;
    let ip = Ipv4Addr::new(198, 18, 252, 1);
    let (p, _nic, _net) = testkit::soft_provider(config, ip, Arc::new(CompletingSwitch)).unwrap();
    let mut g = c.benchmark_group("registration_lookup");
    for n in [1usize, 16, 256] {
        let page = 4096;
        let r = Region::new(n * page, MlockPolicy::Off).unwrap();
        let table = RegistrationTable::new(
            p.nic().clone(),
            MrCacheConfig {
                enabled: false,
                max_entries: 1024,
                max_bytes: 1 << 30,
            },
        );
        let owner = table.new_owner(OwnerId(1));
        let mut last = 0;
        for i in 0..n {
            // SAFETY: the region outlives the table (dropped first below).
            last = unsafe {
                table.register_memory(&owner, r.as_ptr() as usize + i * page, page, MEM_READWRITE)
            }
            .unwrap()
            .get();
        }
        // The worst case of a scan: the last registration made.
        let addr = r.as_ptr() as usize + (n - 1) * page;
        g.bench_function(format!("by_address_{n}_regs"), |b| {
            b.iter(|| {
                table
                    .acquire_covering(&owner, std::hint::black_box(addr), 64, MemFlags::READ)
                    .unwrap()
            })
        });
        g.bench_function(format!("by_handle_{n}_regs"), |b| {
            b.iter(|| {
                table
                    .acquire_handle(&owner, std::hint::black_box(last), addr, 64, MemFlags::READ)
                    .unwrap()
            })
        });
        table.release_owner(&owner);
        drop(table);
        drop(r);
    }
    g.finish();
    p.cleanup().unwrap();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! { name = benches; config = config(); targets = post_and_poll, registration_lookup }
criterion_main!(benches);
