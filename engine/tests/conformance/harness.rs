//! Test fixtures: a recording switch double that checks upcall rules as it
//! records them, hosts on a private soft network (or on real RDMA devices,
//! see [`fabric`]), connected socket pairs and registered buffers. Every wait
//! has a timeout that fails the test loudly.

use sanpath::config::{MlockPolicy, PollerMode};
use sanpath::event::Event;
use sanpath::fabric::soft::{Fault, QpFaults, SoftNetwork, SoftNic};
use sanpath::mem::region::Region;
use sanpath::spi::*;
use sanpath::{Config, WsaError, WsaResult};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long any test waits for something that should happen promptly.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The bound on a close that must be prompt (spec §6.2: far below any
/// transport timeout): 500 ms, or 1.5 s on verbs under the Soft-RoCE VM's
/// emulation.
pub fn prompt() -> Duration {
    if on_verbs() {
        Duration::from_millis(1500)
    } else {
        Duration::from_millis(500)
    }
}

/// The fabric the suite runs on, from `SANPATH_CONFORMANCE_FABRIC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fabric {
    /// The default: every host on a private soft network of its own.
    Soft,
    /// `verbs`: real RDMA devices (the Soft-RoCE VM of `tools/rxe-vm/test`):
    /// [`Host::new`] is on the device owning 198.18.0.1, [`Host::peer`] on
    /// the device owning the address it is given (rxe1 for 198.18.0.2).
    Verbs,
    /// `shm`: every host a provider with `fabric.kind = shm`, in a private
    /// runtime directory per [`Host::new`]. The second host of the tests
    /// written with [`crate::xproc`] is another process (this binary
    /// re-executed); [`Host::peer`] and [`Host::sibling`] stay in this
    /// process, on addresses of their own.
    Shm,
}

/// The fabric of this run; an unknown value, or `verbs` in a binary built
/// without the `verbs` feature, fails every test with the reason.
pub fn fabric() -> Fabric {
    static FABRIC: OnceLock<Fabric> = OnceLock::new();
    *FABRIC.get_or_init(
        || match std::env::var("SANPATH_CONFORMANCE_FABRIC").as_deref() {
            Err(_) | Ok("") | Ok("soft") => Fabric::Soft,
            Ok("verbs") if cfg!(feature = "verbs") => Fabric::Verbs,
            Ok("shm") => Fabric::Shm,
            Ok("verbs") => panic!(
                "SANPATH_CONFORMANCE_FABRIC=verbs, but this conformance binary was built \
                 without the `verbs` feature: build it with `cargo test -p sanpath \
                 --features verbs --test conformance` (and run it where an RDMA device is, \
                 e.g. through tools/rxe-vm/test)"
            ),
            Ok(other) => {
                panic!("SANPATH_CONFORMANCE_FABRIC={other:?}: expected `soft`, `verbs` or `shm`")
            }
        },
    )
}

pub fn on_verbs() -> bool {
    fabric() == Fabric::Verbs
}

pub fn on_shm() -> bool {
    fabric() == Fabric::Shm
}

/// The runtime directory of one [`Host::new`] on shm and the hosts made
/// from it (peers, siblings, a peer process): removed with what is left in
/// it when the last of them is dropped.
pub struct ShmDir {
    pub path: PathBuf,
    /// Unix sockets that take connection requests and never answer them
    /// ([`Host::add_tcp_only_host`]); open while the directory lives.
    holes: Mutex<Vec<OwnedFd>>,
    /// Whether this process made the directory (a peer process borrows it).
    owned: bool,
}

impl ShmDir {
    /// A fresh private directory (mode 0700) under the temp dir.
    fn create() -> Arc<ShmDir> {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "sanpath-conformance-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap_or_else(|e| panic!("runtime directory {}: {e}", path.display()));
        Arc::new(ShmDir {
            path,
            holes: Mutex::new(Vec::new()),
            owned: true,
        })
    }

    /// The directory another process made (a peer process's view).
    pub fn borrowed(path: PathBuf) -> Arc<ShmDir> {
        Arc::new(ShmDir {
            path,
            holes: Mutex::new(Vec::new()),
            owned: false,
        })
    }

    /// A `SOCK_SEQPACKET` socket listening at `ip`'s address socket path
    /// that nobody ever reads: a connect to `ip` gets through to it and
    /// waits for an answer until `connect.timeout_ms`.
    fn add_hole(&self, ip: Ipv4Addr) {
        let path = self.path.join(format!("{ip}.sock"));
        if path.exists() {
            return;
        }
        let bytes = path.as_os_str().as_encoded_bytes();
        // SAFETY: zero is a valid sockaddr_un.
        let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        assert!(bytes.len() < sa.sun_path.len(), "socket path too long");
        for (d, b) in sa.sun_path.iter_mut().zip(bytes) {
            *d = *b as libc::c_char;
        }
        // SAFETY: plain socket(2) call; the descriptor is owned at once.
        let fd =
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `sa` is a valid sockaddr_un of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(
            r,
            0,
            "bind {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a bound socket.
        let r = unsafe { libc::listen(fd.as_raw_fd(), 16) };
        assert_eq!(r, 0, "listen: {}", std::io::Error::last_os_error());
        self.holes.lock().unwrap().push(fd);
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The environment variable that selects the poller mode of [`Host::new`].
pub const POLLER_ENV: &str = "SANPATH_CONFORMANCE_POLLER";

/// The poller mode of this run, from [`POLLER_ENV`]: `threads` (the
/// default) or `run_to_completion`. `main.rs` runs the suite once more in
/// the second mode.
pub fn poller_mode() -> PollerMode {
    match std::env::var(POLLER_ENV).as_deref() {
        Err(_) | Ok("") | Ok("threads") => PollerMode::Threads,
        Ok("run_to_completion") => PollerMode::RunToCompletion,
        Ok(other) => panic!("{POLLER_ENV}={other:?}: expected `threads` or `run_to_completion`"),
    }
}

/// Lets connection events already on their way arrive. The soft network
/// delivers them inside the call that causes them; on a real wire they take
/// a moment (a reject crossing the link, the peer's CM thread), on shm the
/// NIC's event thread.
pub fn settle() {
    if on_verbs() || on_shm() {
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upcall {
    Create {
        handle: SwitchHandle,
        context: usize,
    },
    Close {
        handle: SwitchHandle,
    },
    Complete {
        handle: SwitchHandle,
        ov: usize,
        error: u32,
        bytes: u32,
        ops_in_use: usize,
    },
}

#[derive(Default)]
struct Log {
    upcalls: Vec<Upcall>,
    live: HashSet<SwitchHandle>,
    closed: HashSet<SwitchHandle>,
    completions: HashMap<usize, u32>,
    violations: Vec<String>,
}

/// The switch double: hands out handles from its own number range, records
/// every upcall, and notes rule violations (SOCK-2, CLOSE-5/6, XFER-6).
pub struct RecordingSwitch {
    log: Mutex<Log>,
    cond: Condvar,
    next: AtomicUsize,
    provider: OnceLock<Provider>,
}

impl RecordingSwitch {
    pub fn new() -> Arc<RecordingSwitch> {
        Arc::new(RecordingSwitch {
            log: Mutex::new(Log::default()),
            cond: Condvar::new(),
            next: AtomicUsize::new(0x7000_0001),
            provider: OnceLock::new(),
        })
    }

    pub fn upcalls(&self) -> Vec<Upcall> {
        self.log.lock().unwrap().upcalls.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.log.lock().unwrap().violations.clone()
    }

    /// Completion upcalls made for `ov`.
    pub fn completions_of(&self, ov: &Overlapped) -> u32 {
        let key = ov as *const Overlapped as usize;
        self.log
            .lock()
            .unwrap()
            .completions
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `pred(upcalls)` holds; panics after [`TIMEOUT`]. `pred`
    /// runs under the log lock: it must not call other methods of `self`.
    pub fn wait_for(&self, what: &str, mut pred: impl FnMut(&[Upcall]) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        let mut log = self.log.lock().unwrap();
        while !pred(&log.upcalls) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {what}; upcalls: {:?}",
                log.upcalls
            );
            log = self.cond.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    pub fn closed(&self, h: SwitchHandle) -> bool {
        self.log.lock().unwrap().closed.contains(&h)
    }

    /// Waits until `ov` got `n` completion upcalls.
    pub fn wait_completions(&self, ov: &Overlapped, n: usize) {
        let key = ov as *const Overlapped as usize;
        self.wait_for("completion upcalls", |u| {
            u.iter()
                .filter(|x| matches!(x, Upcall::Complete { ov, .. } if *ov == key))
                .count()
                == n
        });
    }

    /// Waits up to `timeout` until every switch handle handed out was
    /// closed.
    pub fn wait_all_closed(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut log = self.log.lock().unwrap();
        while !log.live.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "switch handles never closed: {:?}",
                    log.live.iter().collect::<Vec<_>>()
                ));
            }
            log = self.cond.wait_timeout(log, deadline - now).unwrap().0;
        }
        Ok(())
    }

    fn push(&self, u: Upcall) {
        let mut log = self.log.lock().unwrap();
        match u {
            Upcall::Create { handle, .. } => {
                log.live.insert(handle);
            }
            Upcall::Close { handle } => {
                if !log.live.remove(&handle) {
                    log.violations
                        .push(format!("close of unknown or closed handle {handle:?}"));
                }
                log.closed.insert(handle);
            }
            Upcall::Complete { handle, ov, .. } => {
                if !log.live.contains(&handle) {
                    log.violations
                        .push(format!("completion with dead/unknown handle {handle:?}"));
                }
                *log.completions.entry(ov).or_default() += 1;
            }
        }
        log.upcalls.push(u);
        drop(log);
        self.cond.notify_all();
    }
}

impl Switch for RecordingSwitch {
    fn create_socket_handle(&self, _catalog: u32, context: usize) -> WsaResult<SwitchHandle> {
        let handle = SwitchHandle(self.next.fetch_add(1, Ordering::Relaxed));
        self.push(Upcall::Create { handle, context });
        Ok(handle)
    }

    fn close_socket_handle(&self, handle: SwitchHandle) -> WsaResult<()> {
        self.push(Upcall::Close { handle });
        Ok(())
    }

    fn query_socket_handle_context(&self, handle: SwitchHandle) -> WsaResult<usize> {
        let log = self.log.lock().unwrap();
        log.upcalls
            .iter()
            .find_map(|u| match u {
                Upcall::Create { handle: h, context } if *h == handle => Some(*context),
                _ => None,
            })
            .ok_or(WsaError::WSAENOTSOCK)
    }

    fn complete_overlapped_request(
        &self,
        handle: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        let ops_in_use = self.provider.get().map_or(0, |p| p.stats().ops_in_use);
        if !ov.is_pending() {
            // The record of an op in progress says so until this upcall
            // completes it: a second upcall for one op finds it completed.
            self.log.lock().unwrap().violations.push(format!(
                "completion upcall for {:p}, which is not in progress (completed twice?)",
                ov
            ));
        }
        // Logged before the record shows the op complete, so a test that saw
        // it complete finds its upcall counted (a slow run under
        // AddressSanitizer caught the other order).
        self.push(Upcall::Complete {
            handle,
            ov: ov as *const Overlapped as usize,
            error,
            bytes,
            ops_in_use,
        });
        ov.complete(error, bytes);
        // Wakes `wait_ov`, which waits for the record to show the op
        // complete; taking the lock orders this after its last check.
        drop(self.log.lock().unwrap());
        self.cond.notify_all();
        Ok(())
    }
}

/// A provider started with a recording switch: on its own soft network, or
/// on an RDMA device (see [`Fabric`]).
pub struct Host {
    /// The soft network (`None` on verbs).
    net: Option<Arc<SoftNetwork>>,
    /// This host's soft NIC, for fault injection (`None` on verbs and shm).
    nic: Option<Arc<SoftNic>>,
    /// The runtime directory on shm.
    pub shm: Option<Arc<ShmDir>>,
    pub p: Provider,
    pub sw: Arc<RecordingSwitch>,
    pub ip: Ipv4Addr,
}

pub fn test_config(mode: PollerMode) -> Config {
    let mut c = Config::default();
    c.poller.mode = mode;
    c.poller.spin_budget = 200;
    c.mem.mlock = MlockPolicy::Off;
    // Address and route resolution under QEMU's emulation need more room.
    c.connect.timeout_ms = if on_verbs() { 1000 } else { 200 };
    // Close waits for the flushes that come (tests check ops complete by
    // the time it returned); tests of a NIC that never flushes lower it.
    c.close.wait_ms = 5000;
    c.close.quiesce_timeout_ms = 5000;
    c
}

impl Host {
    /// A host in this run's poller mode ([`poller_mode`]).
    pub fn new() -> Host {
        Host::with_config(test_config(poller_mode()))
    }

    pub fn with_config(config: Config) -> Host {
        let ip = Ipv4Addr::new(198, 18, 0, 1);
        match fabric() {
            Fabric::Soft => Host::on(SoftNetwork::new(), ip, config),
            Fabric::Verbs => Host::on_device(ip, config),
            Fabric::Shm => Host::on_shm(ShmDir::create(), ip, config),
        }
    }

    /// A provider with `fabric.kind = shm` owning `ip` in `dir`.
    pub fn on_shm(dir: Arc<ShmDir>, ip: Ipv4Addr, mut config: Config) -> Host {
        config.fabric.kind = sanpath::config::FabricKind::Shm;
        config.fabric.soft.addresses = vec![ip];
        config.fabric.shm.runtime_dir = dir.path.to_string_lossy().into_owned();
        let p = Provider::new(config).unwrap_or_else(|e| panic!("shm provider on {ip}: {e}"));
        let mut h = Host::started(None, None, p, ip);
        h.shm = Some(dir);
        h
    }

    /// Another host on the same network (on verbs: on the device owning `ip`).
    pub fn peer(&self, ip: Ipv4Addr) -> Host {
        self.peer_with(ip, test_config(self.p.config().poller.mode))
    }

    /// [`Host::peer`] with its own config.
    pub fn peer_with(&self, ip: Ipv4Addr, config: Config) -> Host {
        match (&self.net, &self.shm) {
            (Some(net), _) => Host::on(net.clone(), ip, config),
            (None, Some(dir)) => Host::on_shm(dir.clone(), ip, config),
            (None, None) => Host::on_device(ip, config),
        }
    }

    /// A provider with `fabric.kind = verbs` on the RDMA device owning `ip`.
    #[cfg(feature = "verbs")]
    fn on_device(ip: Ipv4Addr, mut config: Config) -> Host {
        let device = verbs_device(ip);
        config.fabric.kind = sanpath::config::FabricKind::Verbs;
        config.fabric.verbs.device = device.clone();
        let p = Provider::new(config)
            .unwrap_or_else(|e| panic!("provider on RDMA device {device} ({ip}): {e}"));
        Host::started(None, None, p, ip)
    }

    #[cfg(not(feature = "verbs"))]
    fn on_device(_: Ipv4Addr, _: Config) -> Host {
        unreachable!("fabric() refuses verbs without the feature")
    }

    /// A second provider on this host's NIC, with its own switch: another
    /// process on the same machine (socket duplication, DUP-*). On verbs:
    /// another provider on the same device; on shm, where each address
    /// belongs to one process, one on 198.18.0.3.
    pub fn sibling(&self) -> Host {
        let config = test_config(self.p.config().poller.mode);
        if let Some(dir) = &self.shm {
            return Host::on_shm(dir.clone(), Ipv4Addr::new(198, 18, 0, 3), config);
        }
        match &self.nic {
            Some(nic) => {
                let nic: Arc<dyn sanpath::fabric::Nic> = nic.clone();
                let mut config = config;
                config.fabric.soft.addresses = vec![self.ip];
                let p = Provider::with_nic(config, nic).expect("provider");
                Host::started(self.net.clone(), self.nic.clone(), p, self.ip)
            }
            None => Host::on_device(self.ip, config),
        }
    }

    pub fn on(net: Arc<SoftNetwork>, ip: Ipv4Addr, mut config: Config) -> Host {
        config.fabric.soft.addresses = vec![ip];
        let nic = net
            .attach(config.soft_nic(vec![ip]))
            .expect("attach soft NIC");
        let p = Provider::with_nic(config, nic.clone()).expect("provider");
        Host::started(Some(net), Some(nic), p, ip)
    }

    fn started(
        net: Option<Arc<SoftNetwork>>,
        nic: Option<Arc<SoftNic>>,
        p: Provider,
        ip: Ipv4Addr,
    ) -> Host {
        let sw = RecordingSwitch::new();
        let _ = sw.provider.set(p.clone());
        p.startup(WSD_VERSION, sw.clone(), 1001).expect("startup");
        Host {
            net,
            nic,
            shm: None,
            p,
            sw,
            ip,
        }
    }

    /// Soft fabric: `answering`'s end of the connection between two
    /// sockets of this host stops answering, so every send and RDMA that
    /// `requesting` posts from now on stays in flight until the link
    /// breaks (a close). Returns false on verbs, where a real NIC cannot be
    /// silenced.
    pub fn stall(&self, requesting: ProviderSocket, answering: ProviderSocket) -> bool {
        self.fault(
            answering,
            requesting,
            Fault::StopResponding {
                timeout: Duration::from_secs(3600),
            },
        )
    }

    /// Soft fabric: arms `fault` on `on`'s end of its connection to `peer`
    /// (both sockets of this host). Returns false on verbs.
    pub fn fault(&self, on: ProviderSocket, peer: ProviderSocket, fault: Fault) -> bool {
        self.hold(on, peer, fault).is_some()
    }

    /// Soft fabric: the RDMA writes and reads `on` posts from now on to
    /// `peer` (a socket of this host) stay in flight, unexecuted, while its
    /// sends go on, until `release_rdma` on the handle returned. `None` on
    /// verbs, where a real NIC cannot be held.
    pub fn hold_rdma(&self, on: ProviderSocket, peer: ProviderSocket) -> Option<QpFaults> {
        self.hold(on, peer, Fault::StallRdma)
    }

    /// Arms `fault` as `fault` does; the end it was armed on, on soft.
    fn hold(&self, on: ProviderSocket, peer: ProviderSocket, fault: Fault) -> Option<QpFaults> {
        let nic = self.nic.as_ref()?;
        let local = |s| self.p.local_addr(s).unwrap().expect("connected socket");
        let q = nic
            .qp_faults(local(on), local(peer))
            .expect("the connection of the two sockets");
        q.arm(fault);
        Some(q)
    }

    /// A host reachable only over TCP/IP (no SAN provider): connects to it
    /// time out (CONN-6). On verbs: a permanent neighbour entry for `ip` on
    /// this host's network device, so that address resolution succeeds at
    /// once and the connection request goes out on the wire, where nothing
    /// answers it, as with a host that runs no RDMA connection manager
    /// (needs root: the VM). On shm: a socket at the address's path that
    /// takes the request and never answers.
    pub fn add_tcp_only_host(&self, ip: Ipv4Addr) {
        match (&self.net, &self.shm) {
            (Some(net), _) => net.add_tcp_only_host(ip),
            (None, Some(dir)) => dir.add_hole(ip),
            (None, None) => {
                let dev = netdev_of(self.ip);
                let ip = ip.to_string();
                ip_cmd(&[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    "02:00:00:00:00:32",
                    "dev",
                    &dev,
                    "nud",
                    "permanent",
                ]);
            }
        }
    }

    /// An address on the SAN subnet where a connect stays pending until the
    /// connection-manager timeout (`connect.timeout_ms`): on the soft
    /// network a TCP-only host; on verbs an address nobody owns, so that
    /// address resolution waits for an answer that never comes.
    pub fn silent_host(&self) -> Ipv4Addr {
        let ip = Ipv4Addr::new(198, 18, 0, 60);
        if self.net.is_some() || self.shm.is_some() {
            self.add_tcp_only_host(ip);
        }
        ip
    }

    pub fn socket(&self) -> ProviderSocket {
        self.p
            .socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0)
            .expect("socket")
    }

    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }

    /// A bound listening socket with an FD_ACCEPT event.
    pub fn listener(&self, port: u16, backlog: i32) -> (ProviderSocket, Arc<Event>) {
        let l = self.socket();
        self.p.bind(l, self.addr(port)).unwrap();
        self.p.listen(l, backlog).unwrap();
        let ev = Arc::new(Event::new());
        self.p.event_select(l, Some(ev.clone()), FD_ACCEPT).unwrap();
        (l, ev)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            while self.p.is_started() {
                self.p.cleanup().unwrap();
            }
            if let Err(e) = self.sw.wait_all_closed(TIMEOUT) {
                self.sw.log.lock().unwrap().violations.push(e);
            }
            let v = self.sw.violations();
            assert!(v.is_empty(), "switch rule violations: {v:?}");
        }
    }
}

/// Runs `ip ARGS`, returning its output; panics if it fails.
fn ip_cmd(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The network device that has `ip` (`rxe_veth0` for 198.18.0.1 in the VM).
fn netdev_of(ip: Ipv4Addr) -> String {
    let addrs = ip_cmd(&["-o", "-4", "addr", "show"]);
    let needle = format!(" inet {ip}/");
    let line = addrs
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no network device has {ip}:\n{addrs}"));
    // "3: rxe_veth0@rxe_veth1    inet 198.18.0.1/24 ..."
    let name = line.split_whitespace().nth(1).expect("device name");
    name.split('@').next().unwrap_or(name).to_string()
}

/// The RDMA device whose port owns `ip` (an IPv4-mapped GID), looked up
/// once per device.
#[cfg(feature = "verbs")]
fn verbs_device(ip: Ipv4Addr) -> String {
    use sanpath::fabric::verbs::{device_names, VerbsConfig, VerbsNic};
    use sanpath::fabric::Nic;
    static OWNERS: OnceLock<Vec<(String, Vec<Ipv4Addr>)>> = OnceLock::new();
    let owners = OWNERS.get_or_init(|| {
        device_names()
            .into_iter()
            .filter_map(|d| {
                let nic = VerbsNic::open(VerbsConfig {
                    device: Some(d.clone()),
                    ..VerbsConfig::default()
                })
                .map_err(|e| eprintln!("RDMA device {d}: {e}"))
                .ok()?;
                Some((d, nic.addresses()))
            })
            .collect()
    });
    owners
        .iter()
        .find(|(_, a)| a.contains(&ip))
        .map(|(d, _)| d.clone())
        .unwrap_or_else(|| {
            panic!(
                "SANPATH_CONFORMANCE_FABRIC=verbs: no RDMA device owns {ip} (devices and \
                 addresses: {owners:?}); run in the Soft-RoCE VM (tools/rxe-vm/test)"
            )
        })
}

/// Starts a connect and returns its final result (immediate or through
/// `FD_CONNECT`).
pub fn connect_result(h: &Host, s: ProviderSocket, to: SocketAddrV4) -> WsaResult<()> {
    let ev = Arc::new(Event::new());
    h.p.event_select(s, Some(ev.clone()), FD_CONNECT).unwrap();
    h.p.connect(s, to, &[])?;
    assert!(ev.wait(TIMEOUT), "FD_CONNECT not signalled");
    let ne = h.p.enum_network_events(s, Some(&ev)).unwrap();
    assert_ne!(ne.network_events & FD_CONNECT, 0);
    match ne.error_codes[FD_CONNECT_BIT] {
        0 => Ok(()),
        c => Err(WsaError::from_code(c).expect("known code")),
    }
}

/// Accepts the next request, waiting for FD_ACCEPT.
pub fn accept_one(h: &Host, l: ProviderSocket, ev: &Event) -> ProviderSocket {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match h.p.accept(l, &mut |_| Condition::Accept) {
            Ok((s, _)) => return s,
            Err(WsaError::WSAEWOULDBLOCK) => {
                assert!(Instant::now() < deadline, "no connection request arrived");
                ev.wait(Duration::from_millis(100));
            }
            Err(e) => panic!("accept failed: {e}"),
        }
    }
}

/// A connected pair on one host: (client, server).
pub fn pair(h: &Host, port: u16) -> (ProviderSocket, ProviderSocket) {
    let (l, ev) = h.listener(port, 8);
    let c = h.socket();
    let ev2 = Arc::new(Event::new());
    h.p.event_select(c, Some(ev2.clone()), FD_CONNECT).unwrap();
    h.p.connect(c, h.addr(port), &[]).unwrap();
    let s = accept_one(h, l, &ev);
    assert!(ev2.wait(TIMEOUT), "FD_CONNECT not signalled");
    let ne = h.p.enum_network_events(c, Some(&ev2)).unwrap();
    assert_eq!(ne.error_codes[FD_CONNECT_BIT], 0, "connect failed");
    h.p.close_socket(l).unwrap();
    (c, s)
}

/// A page-aligned buffer registered on a socket.
pub struct Buf {
    pub region: Region,
    pub handle: u64,
}

impl Buf {
    pub fn ptr(&self) -> *mut u8 {
        self.region.as_ptr()
    }

    pub fn wsabuf(&self, off: usize, len: u32) -> WsaBuf {
        assert!(off + len as usize <= self.region.len());
        // SAFETY: in bounds of the region (asserted above).
        let buf = unsafe { self.ptr().add(off) };
        WsaBuf { len, buf }
    }

    pub fn wsabufex(&self, off: usize, len: u32) -> WsaBufEx {
        let b = self.wsabuf(off, len);
        WsaBufEx {
            len,
            buf: b.buf,
            handle: self.handle as usize,
        }
    }

    pub fn fill(&self, seed: u8) {
        let data: Vec<u8> = (0..self.region.len())
            .map(|i| seed.wrapping_add(i as u8))
            .collect();
        self.region.write_at(0, &data).unwrap();
    }

    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.region.read_at(off, &mut v).unwrap();
        v
    }
}

pub fn region(len: usize) -> Region {
    Region::new(len, MlockPolicy::Off).expect("region")
}

/// Registers a fresh buffer of `len` bytes on `s`.
pub fn buf(h: &Host, s: ProviderSocket, len: usize, flags: u32) -> Buf {
    let region = region(len);
    // SAFETY: the region outlives the socket's use of it (tests close
    // sockets or deregister before dropping buffers).
    let handle = unsafe {
        h.p.register_memory(s, region.as_ptr(), region.len() as u32, flags)
    }
    .expect("register_memory");
    Buf { region, handle }
}

/// Posts a receive into `b[off..off+len]`.
pub fn recv(
    h: &Host,
    s: ProviderSocket,
    b: &Buf,
    off: usize,
    len: u32,
    ov: &Overlapped,
) -> WsaResult<()> {
    // SAFETY: buffers and overlapped outlive the op (waited for).
    unsafe { h.p.recv(s, &[b.wsabuf(off, len)], ov) }
}

pub fn send(
    h: &Host,
    s: ProviderSocket,
    b: &Buf,
    off: usize,
    len: u32,
    ov: &Overlapped,
) -> WsaResult<()> {
    // SAFETY: as `recv`.
    unsafe { h.p.send(s, &[b.wsabuf(off, len)], 0, ov) }
}

/// `(error, bytes)` of a completed op's record.
fn result_of(ov: &Overlapped) -> (u32, u32) {
    (
        ov.offset_high.load(Ordering::Acquire),
        ov.internal_high.load(Ordering::Acquire) as u32,
    )
}

/// Waits for the completion upcall of an op whose `hEvent` bit 0 is clear
/// and returns its `(error, bytes)`. It makes no provider call: in every
/// poller mode the provider must deliver the upcall by itself, to a switch
/// that only waits for it.
pub fn wait_ov(h: &Host, ov: &Overlapped) -> (u32, u32) {
    assert!(
        ov.wants_upcall(),
        "hEvent bit 0 set: no upcall comes; use wait_polled or done_ov"
    );
    h.sw.wait_for("a completion upcall", |_| !ov.is_pending());
    result_of(ov)
}

/// Polls a started op with `WSPGetOverlappedResult(fWait = FALSE)`, as a
/// switch that set `hEvent` bit 0 does, until it completed; returns its
/// `(error, bytes)`.
pub fn wait_polled(h: &Host, s: ProviderSocket, ov: &Overlapped) -> (u32, u32) {
    let deadline = Instant::now() + TIMEOUT;
    while let Err(WsaError::WSA_IO_INCOMPLETE) = h.p.get_overlapped_result(s, ov, false) {
        assert!(
            Instant::now() < deadline,
            "polling WSPGetOverlappedResult: the op never completed"
        );
        std::thread::yield_now();
    }
    assert!(!ov.is_pending(), "get_overlapped_result gave up early");
    result_of(ov)
}

/// The result of an op that must already be complete (e.g. once close or
/// cleanup returned).
pub fn done_ov(ov: &Overlapped) -> (u32, u32) {
    assert!(!ov.is_pending(), "the op is still in progress");
    result_of(ov)
}

pub const OK: u32 = 0;
pub const ABORTED: u32 = WsaError::WSA_OPERATION_ABORTED.code() as u32;
pub const CONNRESET: u32 = WsaError::WSAECONNRESET.code() as u32;

/// Exposes `r` on `s` for the peer's RDMA; returns the descriptor.
pub fn expose(h: &Host, s: ProviderSocket, r: &Region, flags: u32) -> Vec<u8> {
    let mut d = [0u8; RDMA_DESCRIPTOR_LEN];
    // SAFETY: the region outlives its exposure (tests deregister or
    // close first).
    let n = unsafe {
        h.p.register_rdma_memory(s, r.as_ptr(), r.len() as u32, flags, &mut d)
    }
    .expect("register_rdma_memory");
    d[..n].to_vec()
}

#[allow(clippy::too_many_arguments)]
pub fn rdma_write(
    h: &Host,
    s: ProviderSocket,
    src: &Buf,
    off: usize,
    len: u32,
    desc: &[u8],
    at: u32,
    ov: &Overlapped,
) -> WsaResult<()> {
    // SAFETY: buffers and overlapped outlive the op (waited for).
    unsafe {
        h.p.rdma_write(s, &[src.wsabufex(off, len)], desc, at, 0, ov)
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rdma_read(
    h: &Host,
    s: ProviderSocket,
    dst: &Buf,
    off: usize,
    len: u32,
    desc: &[u8],
    at: u32,
    ov: &Overlapped,
) -> WsaResult<()> {
    // SAFETY: as `rdma_write`.
    unsafe { h.p.rdma_read(s, &[dst.wsabufex(off, len)], desc, at, 0, ov) }
}
