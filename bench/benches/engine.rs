//! One op through the engine on the soft fabric, single thread, run to
//! completion: post a receive, post the matching send, reap both.
//! Also the registration lookup every data call makes.

use criterion::{criterion_group, criterion_main, Criterion};
use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::event::Event;
use sanpath::fabric::soft::{SoftNetwork, SoftNicConfig};
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::{Config, WsaResult};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

struct Quiet;
impl Switch for Quiet {
    fn create_socket_handle(&self, _: u32, c: usize) -> WsaResult<SwitchHandle> {
        Ok(SwitchHandle(c ^ 1 << 62))
    }
    fn close_socket_handle(&self, _: SwitchHandle) -> WsaResult<()> {
        Ok(())
    }
    fn query_socket_handle_context(&self, h: SwitchHandle) -> WsaResult<usize> {
        Ok(h.0 ^ 1 << 62)
    }
    fn complete_overlapped_request(
        &self,
        _: SwitchHandle,
        ov: &Overlapped,
        e: u32,
        b: u32,
    ) -> WsaResult<()> {
        ov.complete(e, b);
        Ok(())
    }
}

fn post_and_poll(c: &mut Criterion) {
    let mut config = Config::default();
    config.poller.mode = PollerMode::RunToCompletion;
    config.mem.mlock = MlockPolicy::Off;
    let ip = Ipv4Addr::new(198, 18, 251, 1);
    let net = SoftNetwork::new();
    let nic = net
        .attach(SoftNicConfig {
            addresses: vec![ip],
            prefix_len: 24,
            connect_timeout: Duration::from_secs(1),
            rnr_queue_max: 8,
        })
        .unwrap();
    let p = Provider::with_nic(config, nic).unwrap();
    p.startup(WSD_VERSION, Arc::new(Quiet), 1).unwrap();
    let l = p
        .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
        .unwrap();
    p.bind(l, SocketAddrV4::new(ip, 9)).unwrap();
    p.listen(l, 1).unwrap();
    let ev = Arc::new(Event::new());
    p.event_select(l, Some(ev.clone()), FD_ACCEPT).unwrap();
    let cs = p
        .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
        .unwrap();
    p.connect(cs, SocketAddrV4::new(ip, 9), &[]).unwrap();
    assert!(ev.wait(Duration::from_secs(10)));
    let (ss, _) = p.accept(l, &mut |_| Condition::Accept).unwrap();
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

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! { name = benches; config = config(); targets = post_and_poll }
criterion_main!(benches);
