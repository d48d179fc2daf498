//! One thread serves a thousand stream connections with tokio, through the
//! streams' readiness fds (`AsRawFd` + `tokio::io::unix::AsyncFd`), on the
//! soft fabric built into the engine:
//!
//! ```sh
//! cargo run --release --example tokio_echo [CONNECTIONS [ROUNDS]]
//! ```
//!
//! The server (`serve.rs`) runs on a current-thread tokio runtime, one task
//! per connection; four client threads of another runtime (another host on
//! the same soft network) keep every connection open at once, send each
//! a message per round and check the echo. Exits non-zero if anything
//! comes back wrong or a call times out.

mod serve;

use sanpath::config::PollerMode;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let (connections, rounds) = match (args.next(), args.next()) {
        (None, _) => (1000, 4),
        (Some(Ok(c)), None) => (c, 4),
        (Some(Ok(c)), Some(Ok(r))) => (c, r),
        _ => {
            eprintln!("usage: tokio_echo [CONNECTIONS [ROUNDS]]");
            return ExitCode::FAILURE;
        }
    };
    let plan = serve::Plan {
        connections,
        rounds,
        client_threads: 4,
        server_mode: PollerMode::RunToCompletion,
    };
    let start = Instant::now();
    match serve::run(plan) {
        Ok(r) if r.served == connections => {
            println!(
                "served {} connections from one thread: {} messages, {} bytes echoed in {:.2?}",
                r.served,
                connections * rounds,
                r.echoed,
                start.elapsed()
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("tokio_echo: served {} of {connections}", r.served);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tokio_echo: {e}");
            ExitCode::FAILURE
        }
    }
}
