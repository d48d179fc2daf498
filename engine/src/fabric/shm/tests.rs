//! How a connection end learns that its sends were consumed: from the
//! acknowledgement the peer's own messages carry, and from the outgoing
//! ring's consumed index (the line the peer writes for every message it
//! takes) only when no acknowledgement comes. One NIC connected to itself,
//! one thread driving both ends; the tests reach into the connection to
//! set the consumed index back, which the peer's next poll rewrites.

use super::*;
use std::sync::mpsc;
use std::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

struct Quiet;

impl Waker for Quiet {
    fn wake(&self) {}
}

impl ListenerEvents for Quiet {
    fn request_arrived(&self) {}
}

impl QpEvents for Quiet {
    fn disconnected(&self) {}
    fn failed(&self) {}
}

/// A private runtime directory, removed at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two connected ends of one NIC, each with a CQ, and a registered buffer.
struct Pair {
    client: Arc<dyn QueuePair>,
    server: Arc<dyn QueuePair>,
    ccq: Arc<dyn CompletionQueue>,
    scq: Arc<dyn CompletionQueue>,
    client_conn: Arc<Conn>,
    server_conn: Arc<Conn>,
    buf: Vec<u8>,
    lkey: u32,
    nic: ShmNic,
    _dir: Dir,
}

impl Pair {
    fn new(name: &str) -> Pair {
        use std::os::unix::fs::DirBuilderExt;
        let dir =
            std::env::temp_dir().join(format!("sanpath-shm-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let ip = Ipv4Addr::new(10, 78, 0, 1);
        let nic = ShmNic::new(ShmNicConfig {
            addresses: vec![ip],
            prefix_len: 24,
            connect_timeout: Duration::from_secs(5),
            runtime_dir: Some(dir.clone()),
        })
        .unwrap();
        let ccq = nic.create_cq(64, Arc::new(Quiet)).unwrap();
        let scq = nic.create_cq(64, Arc::new(Quiet)).unwrap();
        let params = |cq: &Arc<dyn CompletionQueue>| QpParams {
            cq: cq.id(),
            send_depth: 8,
            recv_depth: 8,
            max_sge: 2,
            events: Arc::new(Quiet),
        };
        let me = SocketAddrV4::new(ip, 6000);
        let l = nic.listen(me, 1, Arc::new(Quiet)).unwrap();
        let (tx, rx) = mpsc::channel();
        let _attempt = nic
            .connect(
                SocketAddrV4::new(ip, 0),
                me,
                params(&ccq),
                Box::new(move |r| tx.send(r).unwrap()),
            )
            .unwrap();
        let until = Instant::now() + WAIT;
        let req = loop {
            if let Some(r) = l.peek() {
                break r;
            }
            assert!(Instant::now() < until, "no connection request");
            std::thread::yield_now();
        };
        let server = req.accept(params(&scq)).unwrap();
        let client = rx.recv_timeout(WAIT).unwrap().unwrap();
        let conn = |qp: &Arc<dyn QueuePair>| {
            lock(&nic.inner.conns)
                .get(&qp.num().0)
                .and_then(Weak::upgrade)
                .unwrap()
        };
        let (client_conn, server_conn) = (conn(&client), conn(&server));
        let buf = vec![0u8; 256];
        // SAFETY: `buf` lives in the pair, beside the NIC, and is never
        // moved (a Vec's heap block); the queue pairs are dropped first.
        let lkey = unsafe { nic.register(buf.as_ptr() as usize, buf.len(), Access::LOCAL_WRITE) }
            .unwrap()
            .lkey;
        Pair {
            client,
            server,
            ccq,
            scq,
            client_conn,
            server_conn,
            buf,
            lkey,
            nic,
            _dir: Dir(dir),
        }
    }

    fn sge(&self, off: usize) -> Sge {
        Sge {
            addr: self.buf.as_ptr() as usize + off,
            len: 8,
            lkey: self.lkey,
        }
    }

    fn send(&self, qp: &Arc<dyn QueuePair>, wr_id: WrId, off: usize) {
        let s = [self.sge(off)];
        qp.post_send(&SendWr {
            wr_id,
            op: SendOp::Send,
            sges: &s,
        })
        .unwrap();
    }

    fn recv(&self, qp: &Arc<dyn QueuePair>, wr_id: WrId, off: usize) {
        let s = [self.sge(off)];
        qp.post_recv(&RecvWr { wr_id, sges: &s }).unwrap();
    }

    /// One poll's completions, with their statuses.
    fn poll_wcs(cq: &Arc<dyn CompletionQueue>) -> Vec<(WrId, WcStatus)> {
        let mut out = [WorkCompletion::EMPTY; 8];
        let n = cq.poll(&mut out);
        out[..n].iter().map(|c| (c.wr_id, c.status)).collect()
    }

    /// One poll's completions.
    fn poll(cq: &Arc<dyn CompletionQueue>) -> Vec<WrId> {
        let mut out = [WorkCompletion::EMPTY; 8];
        let n = cq.poll(&mut out);
        out[..n]
            .iter()
            .inspect(|c| assert_eq!(c.status, WcStatus::Success, "{c:?}"))
            .map(|c| c.wr_id)
            .collect()
    }

    /// Polls until `wr_id` completes; how many polls that took.
    fn polls_until(cq: &Arc<dyn CompletionQueue>, wr_id: WrId) -> usize {
        let until = Instant::now() + WAIT;
        for polls in 1.. {
            if Pair::poll(cq).contains(&wr_id) {
                return polls;
            }
            assert!(Instant::now() < until, "{wr_id} never completed");
        }
        unreachable!()
    }

    /// Sets the client's outgoing consumed index back to 0, as if the
    /// server's publication had not reached it.
    fn hide_consumed(&self) {
        self.client_conn.out_ring.set_consumed(0);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.client.set_error();
        self.server.set_error();
        self.nic.deregister(self.lkey);
    }
}

/// A request and its answer: the request's send completes from the
/// acknowledgement in the answer's cell, with the consumed index set back
/// (an end that read it would still wait). Then a request the server
/// consumes but does not answer completes only after the end waited for an
/// acknowledgement (not at the first poll: a peer that answers would see
/// the line pulled away for every message), from the consumed index.
#[test]
fn a_send_completes_from_the_answer_s_acknowledgement() {
    let p = Pair::new("ack");
    let (c, s) = (&p.client, &p.server);
    p.recv(s, 10, 64);
    p.recv(c, 20, 128);
    p.send(c, 1, 0);
    assert_eq!(Pair::poll(&p.scq), [10], "the server takes the request");
    p.send(s, 2, 8);
    p.hide_consumed();
    let got = Pair::poll(&p.ccq);
    assert!(
        got.contains(&20) && got.contains(&1),
        "the answer and the request's send at one poll: {got:?}"
    );
    assert_eq!(Pair::polls_until(&p.scq, 2), 1, "nothing hidden there");
    // The server's next poll rewrote the index; consumed but unanswered:
    p.recv(s, 11, 64);
    p.send(c, 3, 0);
    assert_eq!(Pair::poll(&p.scq), [11]);
    assert!(
        Pair::poll(&p.ccq).is_empty(),
        "the consumed index read at the first poll of a wait"
    );
    // Later, from the consumed index (how many polls that takes depends on
    // the time they take: ACK_WAIT_TICKS).
    Pair::polls_until(&p.ccq, 3);
}

/// An end whose peer never answers reads the consumed index at the first
/// poll of each wait (the single-thread pattern of `tools/icount-gate`):
/// its sends complete at once after the peer took them.
#[test]
fn a_send_the_peer_never_answers_completes_at_the_first_poll() {
    let p = Pair::new("oneway");
    let (c, s) = (&p.client, &p.server);
    for i in 0..20u64 {
        p.recv(s, 100 + i, 64);
        p.send(c, i, 0);
        assert_eq!(Pair::poll(&p.scq), [100 + i]);
        assert_eq!(Pair::poll(&p.ccq), [i], "send {i}");
    }
}

/// A send the peer took just before it closed completes with success, as
/// the peer's receive does: the close waits for the peer's poller to
/// publish what it took before it stores the state word that makes this
/// end flush. The server's poller is held (test hook) after it took the
/// message and before it published the consumed index, while another
/// thread closes the server; the client polls meanwhile (once the close
/// waits for the pass, or returned) and after the pass.
#[test]
fn a_send_the_peer_took_as_it_closed_completes_with_success() {
    let p = Pair::new("closing");
    let (c, s) = (&p.client, &p.server);
    p.recv(s, 10, 64);
    p.send(c, 1, 0);
    let hook = &p.server_conn.hook;
    hook.hold_after_next_message();
    let mut client = Vec::new();
    let server = std::thread::scope(|scope| {
        let poller = scope.spawn(|| Pair::poll_wcs(&p.scq));
        assert!(hook.wait_held(WAIT), "the server took nothing");
        let closer = scope.spawn(|| {
            s.set_error();
            hook.note_break();
        });
        assert!(
            hook.wait_break(WAIT),
            "the close neither waited nor returned"
        );
        client.extend(Pair::poll_wcs(&p.ccq));
        hook.release();
        let server = poller.join().unwrap();
        closer.join().unwrap();
        server
    });
    assert_eq!(server, [(10, WcStatus::Success)], "the server's receive");
    let until = Instant::now() + WAIT;
    while !client.iter().any(|w| w.0 == 1) {
        assert!(Instant::now() < until, "the send never completed");
        client.extend(Pair::poll_wcs(&p.ccq));
    }
    assert_eq!(client, [(1, WcStatus::Success)], "the client's send");
}

/// A CQ dropped while ends are still attached to it (their handles
/// dropped, no poll since to forget them) frees them, and the part of the
/// CQ they held. Dropping the pair drops the queue pairs, then the CQs,
/// then the NIC (its event thread joined, so it holds no end either).
#[test]
fn a_cq_dropped_unpolled_frees_its_ends() {
    let p = Pair::new("dropcq");
    let ends = [&p.client_conn, &p.server_conn].map(Arc::downgrade);
    let shared = [&p.client_conn, &p.server_conn].map(|c| Arc::downgrade(&c.cq));
    drop(p);
    for (end, shared) in ends.iter().zip(&shared) {
        assert_eq!(end.strong_count(), 0, "an end outlived its CQ");
        assert_eq!(shared.strong_count(), 0, "a CQ's shared part outlived it");
    }
}
