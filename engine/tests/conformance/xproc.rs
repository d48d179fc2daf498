//! Tests whose ID needs two hosts, written as two sides that talk over a
//! [`Link`]: on shm ([`Fabric::Shm`]) the peer side runs in another process
//! (this test binary re-executed on the one test, with [`ROLE_ENV`] naming
//! it and [`DIR_ENV`] the runtime directory), so the two providers share
//! nothing but the fabric; on soft and verbs it runs on a thread of this
//! process, on [`Host::peer`]. The same test code runs either way.
//!
//! A side that fails panics: the other sees the link end (the child's
//! output is in the message) or its own wait time out. A peer process is
//! killed when the test ends early, and its exit status is checked when the
//! test ends normally; nothing outlives the test.

use crate::harness::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Set in a peer process: the name of the test whose peer side it runs.
pub const ROLE_ENV: &str = "SANPATH_CONFORMANCE_PEER_OF";
/// Set in a peer process: the runtime directory of the test's hosts.
pub const DIR_ENV: &str = "SANPATH_CONFORMANCE_SHM_DIR";
/// What a peer process writes before each message on its stdout.
const TAG: &str = "XPROC ";

/// Messages between the two sides of a test: text lines.
pub struct Link {
    rx: Receiver<Option<String>>,
    tx: Out,
}

enum Out {
    Thread(Sender<Option<String>>),
    /// The peer process's stdin.
    Child(ChildStdin),
    /// This process's stdout (in the peer process).
    Stdout,
}

impl Link {
    pub fn send(&mut self, msg: &str) {
        assert!(!msg.contains('\n'), "one line per message");
        let ok = match &mut self.tx {
            Out::Thread(t) => t.send(Some(msg.to_string())).is_ok(),
            Out::Child(c) => writeln!(c, "{msg}").and_then(|_| c.flush()).is_ok(),
            Out::Stdout => {
                let mut o = std::io::stdout().lock();
                // On a line of its own: libtest may have written half of one.
                writeln!(o, "\n{TAG}{msg}").and_then(|_| o.flush()).is_ok()
            }
        };
        assert!(ok, "the other side of the test is gone (sending {msg:?})");
    }

    /// The next message; panics after [`TIMEOUT`] or if the other side
    /// ended.
    pub fn recv(&mut self) -> String {
        match self.rx.recv_timeout(TIMEOUT) {
            Ok(Some(m)) => m,
            Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                panic!("the other side of the test ended")
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("the other side of the test said nothing within {TIMEOUT:?}")
            }
        }
    }

    /// Receives `want` exactly.
    pub fn expect(&mut self, want: &str) {
        let got = self.recv();
        assert_eq!(got, want, "unexpected message from the other side");
    }
}

/// A peer process, killed unless it was waited for.
struct PeerProcess {
    child: Child,
    /// Its stderr, gathered by a thread (its output when it fails).
    stderr: Receiver<String>,
    waited: bool,
}

impl PeerProcess {
    fn spawn(test: &str, dir: &std::path::Path) -> (PeerProcess, Link) {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, test)
            .env(DIR_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("re-executing the test binary as the peer");
        let (tx, rx) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { break };
                if let Some(m) = line.strip_prefix(TAG) {
                    // (Only lines that start with the tag: the test's output
                    // may mention it.)
                    if tx.send(Some(m.to_string())).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(None);
        });
        let (etx, erx) = mpsc::channel();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        let stdin = child.stdin.take().unwrap();
        let link = Link {
            rx,
            tx: Out::Child(stdin),
        };
        (
            PeerProcess {
                child,
                stderr: erx,
                waited: false,
            },
            link,
        )
    }

    /// Waits (bounded) for the peer to exit and asserts it succeeded.
    fn finish(mut self) {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("waiting for the peer") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "the peer process did not exit within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        self.waited = true;
        let err = self
            .stderr
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| "(its stderr did not close)".into());
        assert!(
            status.success(),
            "the peer process failed ({status}):\n{err}"
        );
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if !self.waited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if let Ok(err) = self.stderr.recv_timeout(Duration::from_secs(1)) {
                eprintln!("the peer process's stderr:\n{err}");
            }
        }
    }
}

/// Runs a test of two hosts: `main` on [`Host::new`] here, `peer` on a
/// host owning `peer_ip` (in another process on shm). `test` is the test's
/// path in this binary (`module::name`), the name the peer process runs.
pub fn two_hosts(
    test: &str,
    peer_ip: Ipv4Addr,
    main: impl FnOnce(&Host, &mut Link),
    peer: impl FnOnce(&Host, &mut Link) + Send,
) {
    if let Some(role) = std::env::var_os(ROLE_ENV) {
        // A peer process: only its test runs (`--exact`).
        assert_eq!(role.to_string_lossy(), test, "peer process of another test");
        let dir = std::env::var_os(DIR_ENV).expect("the peer process's runtime directory");
        let host = Host::on_shm(
            ShmDir::borrowed(dir.into()),
            peer_ip,
            test_config(poller_mode()),
        );
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(Some(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
        let mut link = Link {
            rx,
            tx: Out::Stdout,
        };
        peer(&host, &mut link);
        return;
    }
    let h = Host::new();
    if let Some(dir) = &h.shm {
        let (child, mut link) = PeerProcess::spawn(test, &dir.path);
        main(&h, &mut link);
        drop(link);
        child.finish();
        return;
    }
    let other = h.peer(peer_ip);
    let (to_peer, peer_rx) = mpsc::channel();
    let (to_main, main_rx) = mpsc::channel();
    let main_link = Link {
        rx: main_rx,
        tx: Out::Thread(to_peer),
    };
    let mut peer_link = Link {
        rx: peer_rx,
        tx: Out::Thread(to_main),
    };
    std::thread::scope(|s| {
        let t = s.spawn(|| peer(&other, &mut peer_link));
        // Dropped as this closure ends or unwinds: the peer thread's wait
        // ends with it rather than at its timeout.
        let mut main_link = main_link;
        main(&h, &mut main_link);
        drop(main_link);
        if let Err(e) = t.join() {
            std::panic::resume_unwind(e);
        }
    });
}
