//! Socket duplication (spec §4.8, DUP-1..3): `WSPDuplicateSocket` in the
//! process that has the socket (the *source*), `WSPSocket` with the value it
//! wrote in the *target* process, and the *peer* at the other end of the
//! connection, which keeps its socket and swaps the connection under it.
//!
//! # The token
//!
//! `dwProviderReserved` is a 32-bit token naming a record file in a
//! per-user runtime directory (`$XDG_RUNTIME_DIR/sanpath-dup`, else
//! `<tmp>/sanpath-dup-<uid>`, mode 0700, checked to be the user's own): the
//! name is the token in hex, created exclusively (so the token is unique on
//! the host while the record lives), mode 0600. The record says which
//! process may claim it, until when, and the socket's state: phase, local
//! and peer address, listen backlog, options, and for a connection a 64-bit
//! random secret. The target claims it by deleting the file (exactly one
//! claimer wins); another process id is refused `WSAEINVAL` and leaves it.
//! Expired records are swept when the next one is written.
//!
//! # A connection moves: suspend, flush, rejoin, swap
//!
//! A fabric connection cannot move to another process, so the target makes
//! a new one to the peer, and the peer's provider swaps it in under the
//! peer's socket. Every provider serves this on `connect.dup_port` of its
//! addresses (the *rejoin service*, a fabric listener whose requests never
//! reach the switch). Requests carry [`Msg`] as connection private data:
//! the peer socket's key (its local and peer address as the peer sees them)
//! and the secret.
//!
//! 1. Source, `WSPDuplicateSocket`: writes the record, then sends SUSPEND to
//!    the peer's service and waits for the answer. The peer marks its
//!    socket suspended and accepts (the accepted connection is only the
//!    acknowledgement: the source breaks it once connected, the peer drops
//!    its end when the suspension ends); a refusal or no answer fails
//!    the duplication with `WSAENETDOWN`, the record removed, nothing else
//!    changed. Acknowledged, the source marks its socket duplicated and
//!    moves its queue pair to the error state: every receive still posted
//!    completes successfully with 0 bytes (one that got data first reports
//!    its data), and the call waits (bounded) until they were reported.
//!    Later calls on the descriptor fail `WSAENOTCONN`; it stays valid until
//!    `WSPCloseSocket` (DUP-3).
//! 2. Peer: the source's teardown flushes the peer's queue pair. While the
//!    socket is suspended, its queue pair's disconnect is not a failure, and
//!    a receive that completes with an error is *parked*: its state (buffers,
//!    registrations, overlapped record, its place in the close gate) is kept,
//!    in completion order, which is posting order. The switch has quiesced
//!    sends and RDMA before duplicating (§4.8 step 1); one that fails anyway
//!    completes `WSAECONNRESET`, since whether it reached the source cannot
//!    be known.
//! 3. Target, `WSPSocket`: claims the record and connects to the peer's
//!    service with REJOIN (key, secret), waiting for the result; the new
//!    socket is `Connected` to the same peer (from a fresh local port).
//! 4. Peer: the service checks the key and secret against the suspended
//!    socket and accepts on the socket's CQ. Once every op of the socket that
//!    was in flight is parked (the old queue pair is drained), the parked
//!    receives are posted on the new queue pair in their order, and only
//!    then the new queue pair becomes the socket's: ops the switch starts
//!    afterwards queue behind them. Each op completes exactly once: a parked
//!    op is either posted again (and completes from the new queue pair), or
//!    completed by close (`WSA_OPERATION_ABORTED`) or by the failure below;
//!    the swap, close and failure take it out of the parked list under one
//!    lock. The peer sends nothing while suspended (§4.8), so the target's
//!    first message finds the receives posted; the fabric's RNR retries
//!    cover the instant between the target's connect completing and the
//!    repost. Queue-pair events carry an epoch: those of a replaced queue
//!    pair, and of the current one while suspended, are ignored.
//! 5. Failure: if the target does not rejoin within `connect.dup_timeout_ms`
//!    of the SUSPEND (it never claims the record, or its connect fails), the
//!    peer's socket fails `WSAECONNRESET`: parked receives complete with it,
//!    and so does everything after (§4.8 step 4).
//!
//!
//! # Ops started during a swap
//!
//! An op reads the socket's queue pair again once it entered the close
//! gate ([`Socket::posting_qp`]): one read before would let a swap that
//! did not count the op yet (it saw the old count) send it to the replaced
//! queue pair, whose flush then reports an error for an op nothing failed
//! (a receive lost to the peer's next message). Entering, then loading the
//! flags, against the swap's storing `SUSPENDED`, then loading the count
//! (both `SeqCst`): an op that saw the socket not suspended is counted by
//! the swap, which waits for it to be parked; one that saw it suspended
//! takes the lock the swap holds, so it finds the swap done (the new queue
//! pair) or not begun (and is counted).
//!
//! A listener is duplicated without the peer: the source stops listening
//! (its fabric listener closes), the target listens on the same address.
//! An open or bound socket carries its address only.
//!
//! Limits: the peer must run a provider whose rejoin service has the same
//! port; on a fabric whose processes share addresses (verbs), the first
//! provider on a host that takes the port serves it, so connections of the
//! others cannot be rejoined (their duplication fails at SUSPEND, harmlessly).
//! The fabric must carry connection private data (`Nic::connect_with_data`).

use super::dispatch::dispatching;
use super::dup_state::{DupCompletion, Suspension, SOURCE, SUSPENDED};
use super::ops::{OpState, KEPT_SGE, MAX_SGE};
use super::socket::{Phase, Socket, SocketQpEvents};
use super::{lock, Inner, Provider, ProviderSocket, Running};
use crate::error::{WsaError, WsaResult};
use crate::fabric::{
    ConnRequest, ConnectError, Listener, ListenerEvents, QpEvents, QpParams, QueuePair, RecvWr,
    WcStatus, WorkCompletion,
};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

impl Socket {
    /// The queue pair an op posts on, read after the op entered the close
    /// gate (`loaded`: the one read before, a fallback that is never used,
    /// since a set queue pair is never unset). See "Ops started during a
    /// swap" in the module docs.
    #[inline]
    pub(super) fn posting_qp<'a>(
        &'a self,
        loaded: &'a Arc<dyn QueuePair>,
    ) -> &'a Arc<dyn QueuePair> {
        if self.dup.flags.load(Ordering::SeqCst) & SUSPENDED != 0 {
            return self.posting_qp_suspended(loaded);
        }
        self.qp.get().unwrap_or(loaded)
    }

    /// [`Socket::posting_qp`] while suspended: under the lock a swap holds,
    /// either the swap is done (its queue pair is current) or it has not
    /// started, and then counts this op, which it waits to see parked.
    #[cold]
    #[inline(never)]
    fn posting_qp_suspended<'a>(
        &'a self,
        loaded: &'a Arc<dyn QueuePair>,
    ) -> &'a Arc<dyn QueuePair> {
        let _st = self.dup.lock();
        self.qp.get().unwrap_or(loaded)
    }
}

// ---------------------------------------------------------------------------
// The wire message (connection private data)
// ---------------------------------------------------------------------------

const MAGIC: [u8; 4] = *b"sDUP";
const VERSION: u8 = 1;
const MSG_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Suspend = 1,
    Rejoin = 2,
}

/// A peer socket as its own provider sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConnKey {
    local: SocketAddrV4,
    peer: SocketAddrV4,
}

/// `magic[4] version kind 0 0 | local ip[4] port[2 LE] 0 0 | peer ip[4]
/// port[2 LE] 0 0 | secret[8 LE]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Msg {
    kind: Kind,
    key: ConnKey,
    secret: u64,
}

impl Msg {
    fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.kind as u8;
        for (at, a) in [(8, self.key.local), (16, self.key.peer)] {
            b[at..at + 4].copy_from_slice(&a.ip().octets());
            b[at + 4..at + 6].copy_from_slice(&a.port().to_le_bytes());
        }
        b[24..32].copy_from_slice(&self.secret.to_le_bytes());
        b
    }

    /// Any trailing bytes (a transport's padding) are ignored.
    fn decode(b: &[u8]) -> Option<Msg> {
        let b = b.get(..MSG_LEN)?;
        if b[..4] != MAGIC || b[4] != VERSION {
            return None;
        }
        let kind = match b[5] {
            1 => Kind::Suspend,
            2 => Kind::Rejoin,
            _ => return None,
        };
        let addr = |at: usize| {
            let ip = Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
            SocketAddrV4::new(ip, u16::from_le_bytes([b[at + 4], b[at + 5]]))
        };
        let mut secret = [0u8; 8];
        secret.copy_from_slice(&b[24..32]);
        Some(Msg {
            kind,
            key: ConnKey {
                local: addr(8),
                peer: addr(16),
            },
            secret: u64::from_le_bytes(secret),
        })
    }
}

// ---------------------------------------------------------------------------
// The record
// ---------------------------------------------------------------------------

/// What the target needs to rebuild the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    target_pid: u32,
    /// Unix time in ms after which the record is void.
    expires_ms: u64,
    phase: Phase,
    local: Option<SocketAddrV4>,
    peer: Option<SocketAddrV4>,
    backlog: u32,
    secret: u64,
    rdma_threshold: u32,
    nodelay: bool,
    debug: bool,
}

const RECORD_HEADER: &str = "sanpath-dup 1";

impl Record {
    fn encode(&self) -> String {
        let addr = |a: Option<SocketAddrV4>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
        let phase = match self.phase {
            Phase::Open => "open",
            Phase::Bound => "bound",
            Phase::Listening => "listening",
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
        };
        format!(
            "{RECORD_HEADER}\ntarget_pid {}\nexpires_ms {}\nphase {phase}\nlocal {}\npeer {}\n\
             backlog {}\nsecret {:016x}\nrdma_threshold {}\nnodelay {}\ndebug {}\n",
            self.target_pid,
            self.expires_ms,
            addr(self.local),
            addr(self.peer),
            self.backlog,
            self.secret,
            self.rdma_threshold,
            u8::from(self.nodelay),
            u8::from(self.debug),
        )
    }

    fn decode(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != RECORD_HEADER {
            return None;
        }
        let mut r = Record {
            target_pid: 0,
            expires_ms: 0,
            phase: Phase::Open,
            local: None,
            peer: None,
            backlog: 0,
            secret: 0,
            rdma_threshold: 0,
            nodelay: false,
            debug: false,
        };
        let mut seen = 0u32;
        for line in lines {
            let (key, value) = line.split_once(' ')?;
            let addr = |v: &str| -> Option<Option<SocketAddrV4>> {
                if v == "-" {
                    Some(None)
                } else {
                    v.parse().ok().map(Some)
                }
            };
            match key {
                "target_pid" => r.target_pid = value.parse().ok()?,
                "expires_ms" => r.expires_ms = value.parse().ok()?,
                "phase" => {
                    r.phase = match value {
                        "open" => Phase::Open,
                        "bound" => Phase::Bound,
                        "listening" => Phase::Listening,
                        "connected" => Phase::Connected,
                        _ => return None,
                    }
                }
                "local" => r.local = addr(value)?,
                "peer" => r.peer = addr(value)?,
                "backlog" => r.backlog = value.parse().ok()?,
                "secret" => r.secret = u64::from_str_radix(value, 16).ok()?,
                "rdma_threshold" => r.rdma_threshold = value.parse().ok()?,
                "nodelay" => r.nodelay = value == "1",
                "debug" => r.debug = value == "1",
                _ => continue,
            }
            seen += 1;
        }
        (seen >= 10).then_some(r)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The user's private record directory, created if needed; refused if it
/// is not a directory of ours closed to others.
fn record_dir() -> io::Result<PathBuf> {
    // The owner of /proc/self is this process's effective uid.
    let uid = std::fs::metadata("/proc/self")?.uid();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("sanpath-dup"),
        _ => std::env::temp_dir().join(format!("sanpath-dup-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let md = std::fs::symlink_metadata(&dir)?;
    if !md.is_dir() || md.uid() != uid || md.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "sanpath-dup directory is not private",
        ));
    }
    Ok(dir)
}

/// 8 random bytes from the kernel.
fn random_u64() -> io::Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Prefix of a record still being written (see [`store`]).
const PARTIAL: &str = "partial.";

/// A partial record older than this belongs to a writer that died.
const PARTIAL_MAX_AGE: Duration = Duration::from_secs(60);

/// Writes `rec` under a fresh token; returns the token (never 0). The
/// record is written under a partial name first and linked to its token's
/// name when complete: another process's [`sweep`] (or [`claim`]) never
/// sees a record half written (it took an empty one for garbage and
/// removed it, so the duplication it named failed).
fn store(rec: &Record) -> io::Result<u32> {
    let dir = record_dir()?;
    sweep(&dir);
    let partial = dir.join(format!(
        "{PARTIAL}{}.{:016x}",
        std::process::id(),
        random_u64()?
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .and_then(|mut f| f.write_all(rec.encode().as_bytes()));
    let linked = written.and_then(|()| loop {
        let token = random_u64()? as u32;
        if token == 0 {
            continue;
        }
        // A hard link fails if the name exists: exactly one record per
        // token, complete from its first appearance.
        match std::fs::hard_link(&partial, dir.join(format!("{token:08x}"))) {
            Ok(()) => return Ok(token),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    });
    let _ = std::fs::remove_file(&partial);
    linked
}

/// Removes expired records (and unreadable ones), and partial ones whose
/// writer died.
fn sweep(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = now_ms();
    for e in entries.flatten() {
        let void = if e.file_name().to_string_lossy().starts_with(PARTIAL) {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > PARTIAL_MAX_AGE)
        } else {
            std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| Record::decode(&t))
                .map_or(true, |r| r.expires_ms < now)
        };
        if void {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn unstore(token: u32) {
    if let Ok(dir) = record_dir() {
        let _ = std::fs::remove_file(dir.join(format!("{token:08x}")));
    }
}

/// Claims record `token` for this process: exactly one claimer gets it.
fn claim(token: u32) -> WsaResult<Record> {
    let dir = record_dir().map_err(|_| WsaError::WSAEINVAL)?;
    let path = dir.join(format!("{token:08x}"));
    let text = std::fs::read_to_string(&path).map_err(|_| WsaError::WSAEINVAL)?;
    let rec = Record::decode(&text).ok_or(WsaError::WSAEINVAL)?;
    if rec.target_pid != std::process::id() {
        return Err(WsaError::WSAEINVAL);
    }
    std::fs::remove_file(&path).map_err(|_| WsaError::WSAEINVAL)?;
    if rec.expires_ms < now_ms() {
        return Err(WsaError::WSAEINVAL);
    }
    Ok(rec)
}

// ---------------------------------------------------------------------------
// Source and target
// ---------------------------------------------------------------------------

/// Events of a connection that is only a SUSPEND's acknowledgement.
struct Ack;

impl QpEvents for Ack {
    fn disconnected(&self) {}
}

impl Provider {
    /// `WSPDuplicateSocket`: returns the value for `dwProviderReserved`,
    /// which only process `process_id` can turn into a socket (see the
    /// module docs). Connecting or failed sockets and sockets already
    /// duplicated (or being moved by their peer) fail `WSAEINVAL`; a peer
    /// that does not take part fails it `WSAENETDOWN`, the socket unchanged.
    pub fn duplicate_socket(&self, s: ProviderSocket, process_id: u32) -> WsaResult<u64> {
        let sock = self.inner.socket(s)?;
        let run = self.inner.running()?;
        let (phase, local, peer, backlog) = {
            let c = sock.ctl();
            (c.phase, c.local, c.peer, c.backlog)
        };
        if sock.dup.engaged() || phase == Phase::Connecting || sock.failure().is_some() {
            return Err(WsaError::WSAEINVAL);
        }
        let mut rec = Record {
            target_pid: process_id,
            expires_ms: now_ms() + self.inner.config.connect.dup_timeout_ms,
            phase,
            local,
            peer,
            backlog,
            secret: 0,
            rdma_threshold: sock.rdma_threshold.load(Ordering::Relaxed),
            nodelay: sock.opts.nodelay.load(Ordering::Relaxed),
            debug: sock.opts.debug.load(Ordering::Relaxed),
        };
        if phase != Phase::Connected {
            let token = store(&rec).map_err(|_| WsaError::WSAENOBUFS)?;
            let listener = {
                let mut c = sock.ctl();
                sock.dup.flags.fetch_or(SOURCE, Ordering::Relaxed);
                c.listener.take()
            };
            if let Some(l) = listener {
                l.close();
            }
            return Ok(u64::from(token));
        }
        let (Some(local), Some(peer)) = (local, peer) else {
            return Err(WsaError::WSAEINVAL);
        };
        let qp = sock.connected_qp()?.clone();
        rec.secret = random_u64().map_err(|_| WsaError::WSAENOBUFS)?;
        let token = store(&rec).map_err(|_| WsaError::WSAENOBUFS)?;
        let msg = Msg {
            kind: Kind::Suspend,
            key: ConnKey {
                local: peer,
                peer: local,
            },
            secret: rec.secret,
        };
        if let Err(e) = self.inner.suspend_peer(&run, &msg) {
            unstore(token);
            return Err(e);
        }
        // Receives flushed from now on complete with success and 0 bytes.
        {
            let _st = sock.dup.lock();
            sock.dup.flags.fetch_or(SOURCE, Ordering::Release);
        }
        sock.record_failure(WsaError::WSAENOTCONN);
        qp.set_error();
        if !dispatching() {
            let deadline = Instant::now() + self.inner.config.close_quiesce_timeout();
            self.inner
                .wait_for(&run, Some(deadline), sock.cq_index(), || {
                    self.inner.sockets.is_quiet(sock.desc)
                });
        }
        Ok(u64::from(token))
    }

    /// `WSPSocket` with a non-zero `dwProviderReserved`: claims the record
    /// and rebuilds the socket in its state (a connection is re-established
    /// to the same peer, see the module docs).
    pub(super) fn recreate(&self, run: &Arc<Running>, token: u64) -> WsaResult<ProviderSocket> {
        let token = u32::try_from(token).map_err(|_| WsaError::WSAEINVAL)?;
        let rec = claim(token)?;
        let sock = self.inner.new_socket(run)?;
        sock.rdma_threshold
            .store(rec.rdma_threshold, Ordering::Relaxed);
        sock.opts.nodelay.store(rec.nodelay, Ordering::Relaxed);
        sock.opts.debug.store(rec.debug, Ordering::Relaxed);
        let built = match rec.phase {
            Phase::Open | Phase::Connecting => Ok(()),
            Phase::Bound | Phase::Listening => self.inner.rebind(&sock, rec.local),
            Phase::Connected => self.inner.rejoin(run, &sock, &rec),
        };
        if let Err(e) = built {
            self.inner.discard(run, &sock);
            return Err(e);
        }
        self.inner.sockets.publish(sock.desc, sock.clone());
        if rec.phase == Phase::Listening {
            if let Err(e) = self.listen(sock.desc, rec.backlog as i32) {
                let _ = self.close_socket(sock.desc);
                return Err(e);
            }
        }
        Ok(sock.desc)
    }
}

impl Inner {
    /// Undoes a socket from `new_socket` that was never published.
    fn discard(&self, run: &Running, sock: &Socket) {
        if let Some(qp) = sock.qp.get() {
            qp.set_error();
        }
        self.sockets.unreserve(sock.desc);
        self.table.release_owner(&sock.regs);
        let _ = run.switch.close_socket_handle(sock.handle);
    }

    fn rebind(&self, sock: &Socket, local: Option<SocketAddrV4>) -> WsaResult<()> {
        let local = local.ok_or(WsaError::WSAEINVAL)?;
        let ip = *local.ip();
        if !ip.is_unspecified() && !self.nic.addresses().contains(&ip) {
            return Err(WsaError::WSAEADDRNOTAVAIL);
        }
        let mut c = sock.ctl();
        c.local = Some(local);
        c.phase = Phase::Bound;
        Ok(())
    }

    /// Target side: the REJOIN connection becomes the socket's.
    fn rejoin(&self, run: &Arc<Running>, sock: &Arc<Socket>, rec: &Record) -> WsaResult<()> {
        let (Some(old_local), Some(peer)) = (rec.local, rec.peer) else {
            return Err(WsaError::WSAEINVAL);
        };
        let local = self.local_for_connect(None, *peer.ip())?;
        let msg = Msg {
            kind: Kind::Rejoin,
            key: ConnKey {
                local: peer,
                peer: old_local,
            },
            secret: rec.secret,
        };
        let params = self.qp_params(run, sock);
        let qp = self
            .cm_call(local, self.service_addr(peer), params, &msg.encode())
            .map_err(|_| WsaError::WSAENETDOWN)?;
        let mut c = sock.ctl();
        c.local = Some(qp.local_addr());
        c.peer = Some(peer);
        c.phase = Phase::Connected;
        let _ = sock.qp.set(qp);
        Ok(())
    }

    fn service_addr(&self, peer: SocketAddrV4) -> SocketAddrV4 {
        SocketAddrV4::new(*peer.ip(), self.config.connect.dup_port)
    }

    /// Source side: SUSPEND to the peer's service; `Ok` once it agreed.
    fn suspend_peer(&self, run: &Running, msg: &Msg) -> WsaResult<()> {
        let peer = msg.key.local;
        let local = self
            .local_for_connect(None, *peer.ip())
            .map_err(|_| WsaError::WSAENETDOWN)?;
        let ack = self
            .cm_call(
                local,
                self.service_addr(peer),
                ack_params(run),
                &msg.encode(),
            )
            .map_err(|_| WsaError::WSAENETDOWN)?;
        ack.set_error();
        Ok(())
    }

    /// Connects with private data and waits for the result (bounded).
    fn cm_call(
        &self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        params: QpParams,
        data: &[u8],
    ) -> Result<Arc<dyn QueuePair>, ConnectError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let done = Box::new(move |r: Result<Arc<dyn QueuePair>, ConnectError>| {
            let _ = tx.send(r);
        });
        let attempt = self
            .nic
            .connect_with_data(local, remote, params, data, done)?;
        let limit = self.config.connect_timeout() + Duration::from_secs(1);
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            // A cancelled attempt never calls back; one that could not be
            // cancelled is calling back now.
            Err(_) if attempt.cancel() => Err(ConnectError::TimedOut),
            Err(_) => rx
                .recv_timeout(limit)
                .unwrap_or(Err(ConnectError::TimedOut)),
        }
    }
}

/// A queue pair that carries nothing (the SUSPEND acknowledgement).
fn ack_params(run: &Running) -> QpParams {
    QpParams {
        cq: run.progress.cq_id(0),
        send_depth: 1,
        recv_depth: 1,
        max_sge: 1,
        events: Arc::new(Ack),
    }
}

// ---------------------------------------------------------------------------
// Peer: the rejoin service
// ---------------------------------------------------------------------------

/// The rejoin service's listener events: requests are served on the thread
/// that reports them (they never reach the switch).
struct Service {
    inner: Weak<Inner>,
    listener: OnceLock<Weak<dyn Listener>>,
    /// One request at a time.
    serial: Mutex<()>,
}

impl ListenerEvents for Service {
    fn request_arrived(&self) {
        let (Some(inner), Some(l)) = (
            self.inner.upgrade(),
            self.listener.get().and_then(Weak::upgrade),
        ) else {
            return;
        };
        let _one = lock(&self.serial);
        let run = inner.running();
        while let Some(req) = l.peek() {
            match &run {
                Ok(run) => inner.serve(run, &*req),
                Err(_) => req.reject(),
            }
        }
    }
}

impl Inner {
    /// Starts the rejoin service on `connect.dup_port` of each address of
    /// the NIC (not the wildcard: on rdma_cm that port space is the host's,
    /// shared by every device); an address whose port is taken (by another
    /// provider on a NIC this one shares) is skipped.
    pub(super) fn start_dup_service(self: &Arc<Self>) -> Vec<Arc<dyn Listener>> {
        let port = self.config.connect.dup_port;
        if port == 0 {
            return Vec::new();
        }
        let mut listeners = Vec::new();
        for ip in self.nic.addresses() {
            let service = Arc::new(Service {
                inner: Arc::downgrade(self),
                listener: OnceLock::new(),
                serial: Mutex::new(()),
            });
            let addr = SocketAddrV4::new(ip, port);
            let Ok(l) = self.nic.listen(addr, 64, service.clone()) else {
                continue;
            };
            let _ = service.listener.set(Arc::downgrade(&l));
            // Requests that arrived before the listener was known.
            service.request_arrived();
            listeners.push(l);
        }
        listeners
    }

    /// Answers one request of the rejoin service.
    fn serve(self: &Arc<Self>, run: &Arc<Running>, req: &dyn ConnRequest) {
        let Some(msg) = Msg::decode(req.private_data()) else {
            return req.reject();
        };
        let Some(sock) = self.find_connected(msg.key) else {
            return req.reject();
        };
        match msg.kind {
            Kind::Suspend => {
                let Some(round) = self.begin_suspension(&sock, msg.secret) else {
                    return req.reject();
                };
                if let Ok(ack) = req.accept(ack_params(run)) {
                    let mut st = sock.dup.lock();
                    if st.round == round {
                        st.ack = Some(ack);
                    } else {
                        ack.set_error();
                    }
                }
                // Even if the source went away before our answer: it then
                // fails the duplication, and the watcher resets this socket
                // unless a target rejoins (it cannot).
                self.watch(&sock, round);
            }
            Kind::Rejoin => {
                let round = {
                    let st = sock.dup.lock();
                    let ok = sock.dup.flags.load(Ordering::Relaxed) & SUSPENDED != 0
                        && st.secret == msg.secret
                        && st.rejoined.is_none();
                    ok.then_some(st.round)
                };
                let Some(round) = round else {
                    return req.reject();
                };
                let q = &self.config.qp;
                let params = QpParams {
                    cq: run.progress.cq_id(sock.cq_index().unwrap_or(0)),
                    send_depth: q.send_depth,
                    recv_depth: q.recv_depth,
                    max_sge: q.max_sge.min(MAX_SGE as u32),
                    events: Arc::new(SocketQpEvents {
                        socket: Arc::downgrade(&sock),
                        epoch: sock.dup.epoch() + 1,
                    }),
                };
                if let Ok(qp) = req.accept(params) {
                    self.rejoined(&sock, round, qp);
                }
            }
        }
    }

    /// The connected socket with this key.
    fn find_connected(&self, key: ConnKey) -> Option<Arc<Socket>> {
        self.sockets.all().into_iter().find(|s| {
            let c = s.ctl();
            c.phase == Phase::Connected && c.local == Some(key.local) && c.peer == Some(key.peer)
        })
    }

    /// Marks a healthy connected socket suspended; returns its round.
    fn begin_suspension(&self, sock: &Socket, secret: u64) -> Option<u64> {
        let mut st = sock.dup.lock();
        if sock.dup.engaged()
            || sock.gate.is_closing()
            || sock.failure().is_some()
            || sock.qp.get().is_none()
        {
            return None;
        }
        st.round += 1;
        st.secret = secret;
        // SeqCst: see `try_swap`.
        sock.dup.flags.fetch_or(SUSPENDED, Ordering::SeqCst);
        Some(st.round)
    }

    /// A thread that fails the suspension `round` of `sock` if it has not
    /// ended by the deadline (woken early when it ends).
    fn watch(self: &Arc<Self>, sock: &Arc<Socket>, round: u64) {
        let deadline = Instant::now() + self.config.dup_timeout();
        let (weak, inner) = (Arc::downgrade(sock), Arc::downgrade(self));
        let spawned = std::thread::Builder::new()
            .name("sanpath-dup".into())
            .spawn(move || loop {
                let Some(s) = weak.upgrade() else { return };
                {
                    let st = s.dup.lock();
                    if st.round != round {
                        return;
                    }
                    let now = Instant::now();
                    if now < deadline {
                        drop(
                            s.dup
                                .ended
                                .wait_timeout(st, deadline - now)
                                .unwrap_or_else(std::sync::PoisonError::into_inner),
                        );
                        continue;
                    }
                }
                if let Some(inner) = inner.upgrade() {
                    inner.end_suspension(&s, Some(round), WsaError::WSAECONNRESET);
                }
                return;
            });
        if spawned.is_err() {
            // Nothing would end the suspension: end it now.
            self.end_suspension(sock, Some(round), WsaError::WSAECONNRESET);
        }
    }

    /// The REJOIN of suspension `round` was accepted: swap once drained.
    fn rejoined(&self, sock: &Socket, round: u64, qp: Arc<dyn QueuePair>) {
        let failed = {
            let mut st = sock.dup.lock();
            if st.round != round
                || sock.dup.flags.load(Ordering::Relaxed) & SUSPENDED == 0
                || sock.gate.is_closing()
            {
                drop(st);
                qp.set_error();
                return;
            }
            st.rejoined = Some(qp);
            self.try_swap(sock, &mut st)
        };
        self.report_failed_reposts(sock, failed);
    }

    /// Swaps the rejoined queue pair in if every op in flight is parked
    /// (the old queue pair is drained): the parked receives are posted on
    /// it in order, then it becomes current. Returns the ops that could not
    /// be posted again (to be reported after the lock is released).
    fn try_swap(&self, sock: &Socket, st: &mut Suspension) -> Vec<OpState> {
        if sock.dup.flags.load(Ordering::Relaxed) & SUSPENDED == 0
            || sock.gate.is_closing()
            || st.rejoined.is_none()
        {
            return Vec::new();
        }
        // Between `SUSPENDED`'s store and the count's load (the posting
        // side enters, then loads the flags): an op that saw the socket
        // not suspended is counted here.
        fence(Ordering::SeqCst);
        if st.parked.len() < self.sockets.in_flight(sock.desc) {
            return Vec::new();
        }
        let Some(new) = st.rejoined.take() else {
            return Vec::new();
        };
        let mut failed = Vec::new();
        for op in st.parked.drain(..) {
            if let Some(op) = self.repost(sock, &*new, op) {
                failed.push(op);
            }
        }
        let old = sock.qp.get().cloned();
        sock.dup.epoch.fetch_add(1, Ordering::AcqRel);
        sock.qp.replace(new.clone());
        sock.ctl().peer = Some(new.peer_addr());
        sock.dup.flags.fetch_and(!SUSPENDED, Ordering::Release);
        st.round += 1;
        sock.dup.ended.notify_all();
        if let Some(old) = old {
            old.set_error();
        }
        if let Some(ack) = st.ack.take() {
            ack.set_error();
        }
        #[cfg(feature = "fault-injection")]
        hooks::swapped(sock);
        failed
    }

    /// Posts a parked receive on `qp` under a fresh op slot (its gate
    /// entry, overlapped record and registrations carry over).
    /// Gives the op back if it could not be posted (also a receive of more
    /// than [`KEPT_SGE`] buffers, whose other entries were not kept).
    fn repost(&self, sock: &Socket, qp: &dyn QueuePair, op: OpState) -> Option<OpState> {
        let n = op.regs.iter().take_while(|r| r.is_some()).count();
        if n > KEPT_SGE {
            return Some(op);
        }
        let sges = op.sges;
        let Some(slot) = self.ops.reserve(sock.cq_index().unwrap_or(0)) else {
            return Some(op);
        };
        self.ops
            .fill(&slot, super::close::owner_tag(sock), |s| *s = op);
        match qp.post_recv(&RecvWr {
            wr_id: slot.wr_id(),
            sges: &sges[..n],
        }) {
            Ok(()) => None,
            Err(_) => self.ops.cancel(slot),
        }
    }

    fn report_failed_reposts(&self, sock: &Socket, failed: Vec<OpState>) {
        for op in failed {
            self.report(&sock.run, op, WsaError::WSAECONNRESET.code() as u32, 0);
        }
    }

    /// The completion path's part for an engaged socket (not closing).
    pub(super) fn dup_completion(
        &self,
        sock: &Socket,
        wc: &WorkCompletion,
        op: OpState,
    ) -> DupCompletion {
        let flags = sock.dup.flags.load(Ordering::Acquire);
        if wc.status == WcStatus::Success {
            return DupCompletion::Normal(op);
        }
        if flags & SOURCE != 0 {
            // The duplicated-away socket's receives end with success and 0
            // bytes (§4.8 step 2); anything else was abandoned.
            return if op.recv {
                DupCompletion::Report(op, 0, 0)
            } else {
                DupCompletion::Report(op, WsaError::WSA_OPERATION_ABORTED.code() as u32, 0)
            };
        }
        if flags & SUSPENDED == 0 {
            return DupCompletion::Normal(op);
        }
        if !op.recv {
            return DupCompletion::Report(op, WsaError::WSAECONNRESET.code() as u32, 0);
        }
        let failed = {
            let mut st = sock.dup.lock();
            if sock.dup.flags.load(Ordering::Relaxed) & SUSPENDED == 0 || sock.gate.is_closing() {
                return DupCompletion::Normal(op);
            }
            st.parked.push(op);
            self.try_swap(sock, &mut st)
        };
        self.report_failed_reposts(sock, failed);
        DupCompletion::Parked
    }

    /// After an engaged socket's op was reported (it left the gate): the
    /// swap may have waited for it.
    pub(super) fn dup_settled(&self, sock: &Socket) {
        if sock.dup.flags.load(Ordering::Acquire) & SUSPENDED == 0 {
            return;
        }
        let failed = self.try_swap(sock, &mut sock.dup.lock());
        self.report_failed_reposts(sock, failed);
    }

    /// Close of a socket whose connection is being moved: its parked
    /// receives complete `WSA_OPERATION_ABORTED`, the rejoined queue pair
    /// (and the current one, in case a swap just made it current) flush.
    pub(super) fn dup_abort(&self, sock: &Socket) {
        if sock.dup.engaged() {
            self.end_suspension(sock, None, WsaError::WSA_OPERATION_ABORTED);
        }
    }

    /// Ends suspension `round` (any, if `None`) with `error`: parked
    /// receives complete with it, the connection breaks. For a reset, later
    /// calls fail with it too.
    fn end_suspension(&self, sock: &Socket, round: Option<u64>, error: WsaError) {
        let (parked, rejoined) = {
            let mut st = sock.dup.lock();
            if round.is_some_and(|r| r != st.round)
                || sock.dup.flags.load(Ordering::Relaxed) & SUSPENDED == 0
            {
                return;
            }
            sock.dup.flags.fetch_and(!SUSPENDED, Ordering::Release);
            st.round += 1;
            sock.dup.ended.notify_all();
            if let Some(ack) = st.ack.take() {
                ack.set_error();
            }
            (std::mem::take(&mut st.parked), st.rejoined.take())
        };
        if error == WsaError::WSAECONNRESET {
            sock.record_failure(error);
        }
        if let Some(q) = rejoined {
            q.set_error();
        }
        if let Some(q) = sock.qp.get() {
            q.set_error();
        }
        for op in parked {
            let code = if sock.gate.is_closing() {
                WsaError::WSA_OPERATION_ABORTED
            } else {
                error
            };
            self.report(&sock.run, op, code.code() as u32, 0);
        }
    }
}

/// Test hooks (feature `fault-injection`): hold an op of a socket at the
/// point of its start where a swap can overtake it (just before it enters
/// the close gate), and wait for a socket's swap. Sockets are named by
/// their local port.
#[cfg(feature = "fault-injection")]
pub mod hooks {
    use super::Socket;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Hooks {
        /// `(port, reached, released)` of each hold.
        holds: Vec<(u16, bool, bool)>,
        /// Local ports of the sockets swapped so far.
        swapped: Vec<u16>,
    }

    static HOOKS: Mutex<Hooks> = Mutex::new(Hooks {
        holds: Vec::new(),
        swapped: Vec::new(),
    });
    static CHANGED: Condvar = Condvar::new();
    /// Whether any hold is set: an op's start pays one load without.
    static HOLDING: AtomicBool = AtomicBool::new(false);
    /// How long a held op waits for its release.
    const HOLD_MAX: Duration = Duration::from_secs(30);

    fn hooks() -> MutexGuard<'static, Hooks> {
        HOOKS.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_until(timeout: Duration, mut done: impl FnMut(&mut Hooks) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut h = hooks();
        while !done(&mut h) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            h = CHANGED
                .wait_timeout(h, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Holds the next op started on the socket bound to `port` until
    /// [`release`].
    pub fn hold_next_op_on(port: u16) {
        hooks().holds.push((port, false, false));
        HOLDING.store(true, Ordering::SeqCst);
    }

    /// Waits until an op is held on `port`; whether one is.
    pub fn wait_held(port: u16, timeout: Duration) -> bool {
        wait_until(timeout, |h| h.holds.iter().any(|x| x.0 == port && x.1))
    }

    /// Lets the op held on `port` go on.
    pub fn release(port: u16) {
        for x in hooks().holds.iter_mut().filter(|x| x.0 == port) {
            x.2 = true;
        }
        CHANGED.notify_all();
    }

    /// Waits until the socket bound to `port` swapped its queue pair;
    /// whether it did.
    pub fn wait_swapped(port: u16, timeout: Duration) -> bool {
        wait_until(timeout, |h| h.swapped.contains(&port))
    }

    /// An op of `sock` is about to enter its close gate.
    pub(in crate::spi) fn before_enter(sock: &Socket) {
        if !HOLDING.load(Ordering::SeqCst) {
            return;
        }
        let Some(port) = sock.ctl().local.map(|a| a.port()) else {
            return;
        };
        let mut h = hooks();
        let Some(i) = h.holds.iter().position(|x| x.0 == port && !x.1) else {
            return;
        };
        h.holds[i].1 = true;
        CHANGED.notify_all();
        // Bounded: an op a failed test never released goes on after
        // HOLD_MAX (the test's own assertions report the failure).
        let deadline = Instant::now() + HOLD_MAX;
        loop {
            let i = h
                .holds
                .iter()
                .position(|x| x.0 == port && x.1)
                .expect("a held op's entry stays until it goes on");
            let now = Instant::now();
            if h.holds[i].2 || now >= deadline {
                h.holds.remove(i);
                break;
            }
            h = CHANGED
                .wait_timeout(h, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        HOLDING.store(!h.holds.is_empty(), Ordering::SeqCst);
    }

    /// `sock` swapped its queue pair (under its duplication lock).
    pub(super) fn swapped(sock: &Socket) {
        let local = sock.ctl().local;
        if let Some(a) = local {
            hooks().swapped.push(a.port());
            CHANGED.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_and_garbage_is_refused() {
        let m = Msg {
            kind: Kind::Rejoin,
            key: ConnKey {
                local: "198.18.0.2:5000".parse().unwrap(),
                peer: "198.18.0.1:49153".parse().unwrap(),
            },
            secret: 0x0123_4567_89ab_cdef,
        };
        let mut padded = m.encode().to_vec();
        padded.resize(56, 0);
        assert_eq!(Msg::decode(&padded), Some(m));
        assert_eq!(Msg::decode(&padded[..MSG_LEN - 1]), None, "short");
        let mut bad = m.encode();
        bad[5] = 9;
        assert_eq!(Msg::decode(&bad), None, "unknown kind");
        bad = m.encode();
        bad[0] ^= 1;
        assert_eq!(Msg::decode(&bad), None, "magic");
    }

    /// A record another thread or process is writing is not garbage to
    /// `sweep` (it removed empty ones, so a concurrent duplication failed:
    /// its claim got `WSAEINVAL`, or its target never rejoined).
    #[test]
    fn a_sweep_leaves_a_record_being_written_alone() {
        let dir = record_dir().unwrap();
        let partial = dir.join(format!("{PARTIAL}{}.test", std::process::id()));
        std::fs::File::create(&partial).unwrap();
        sweep(&dir);
        let kept = partial.exists();
        let _ = std::fs::remove_file(&partial);
        assert!(kept, "sweep removed a record being written");
    }

    #[test]
    fn a_record_round_trips_and_is_claimed_once_by_its_process() {
        let rec = Record {
            target_pid: std::process::id(),
            expires_ms: now_ms() + 60_000,
            phase: Phase::Connected,
            local: Some("198.18.0.1:49153".parse().unwrap()),
            peer: Some("198.18.0.2:5000".parse().unwrap()),
            backlog: 0,
            secret: 42,
            rdma_threshold: 4096,
            nodelay: true,
            debug: false,
        };
        assert_eq!(Record::decode(&rec.encode()), Some(rec.clone()));
        let token = store(&rec).unwrap();
        assert_ne!(token, 0);
        assert_eq!(claim(token).unwrap(), rec);
        assert_eq!(
            claim(token).unwrap_err(),
            WsaError::WSAEINVAL,
            "claimed twice"
        );
        let other = Record {
            target_pid: std::process::id().wrapping_add(1),
            ..rec.clone()
        };
        let token = store(&other).unwrap();
        assert_eq!(claim(token).unwrap_err(), WsaError::WSAEINVAL, "other pid");
        unstore(token);
        let expired = Record {
            expires_ms: now_ms() - 1,
            ..rec
        };
        let token = store(&expired).unwrap();
        assert_eq!(claim(token).unwrap_err(), WsaError::WSAEINVAL, "expired");
    }
}
