//! Conformance tests for spec §8 (WSD-SAN-SPI.md), one test per checklist ID
//! (or a few for IDs with several clauses), named after the ID. They run on
//! the soft fabric through a recording switch double, on real RDMA devices
//! with `SANPATH_CONFORMANCE_FABRIC=verbs` (feature `verbs`; see
//! `harness::fabric` and `tools/rxe-vm/test`), or on the shared-memory fabric
//! with `SANPATH_CONFORMANCE_FABRIC=shm`, the second host of two-host tests in
//! a child process (`xproc`); COVERAGE.md maps every ID to its test(s).

mod harness;

mod block;
mod cache;
mod close;
mod conn;
mod dup;
mod ext;
mod mem;
mod rdma;
mod sock;
mod start;
mod xfer;
mod xproc;

use sanpath::spi::{Overlapped, Switch};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The recording switch's own checks can fail: a second completion of one
/// op and a switch handle never closed are both reported.
#[test]
fn harness_flags_a_double_completion_and_an_unclosed_handle() {
    let sw = harness::RecordingSwitch::new();
    let h = sw.create_socket_handle(1, 0).unwrap();
    let ov = Overlapped::new(0);
    ov.internal.store(
        sanpath::spi::WSS_OPERATION_IN_PROGRESS,
        std::sync::atomic::Ordering::Release,
    );
    sw.complete_overlapped_request(h, &ov, 0, 1).unwrap();
    assert!(sw.violations().is_empty(), "{:?}", sw.violations());
    sw.complete_overlapped_request(h, &ov, 0, 1).unwrap();
    assert_eq!(sw.violations().len(), 1, "{:?}", sw.violations());
    assert!(sw.wait_all_closed(Duration::ZERO).is_err());
    sw.close_socket_handle(h).unwrap();
    assert!(sw.wait_all_closed(Duration::ZERO).is_ok());
}

/// The whole suite once more with every [`harness::Host::new`] in the other
/// poller mode (`run_to_completion`): this binary re-runs itself with
/// [`harness::POLLER_ENV`] set, so `cargo test` covers both modes. The
/// child's own tests are bounded by their timeouts; this bound only
/// catches a child that hangs regardless.
#[test]
fn suite_in_run_to_completion_mode() {
    const NAME: &str = "suite_in_run_to_completion_mode";
    if std::env::var_os(harness::POLLER_ENV).is_some() {
        return;
    }
    // On verbs the hosts of every test share one device's port space: one
    // test at a time there, as tools/rxe-vm/test runs the suite.
    let threads = if harness::on_verbs() { "1" } else { "2" };
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--skip", NAME, "--test-threads", threads])
        .env(harness::POLLER_ENV, "run_to_completion")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-running the suite");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = Duration::from_secs(300);
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out.expect("waiting for the suite"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("the run-to-completion suite did not finish within {limit:?}");
        }
    };
    assert!(
        out.status.success(),
        "the suite failed in run-to-completion mode:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
