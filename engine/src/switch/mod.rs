//! The reference switch: the session protocol the Windows Sockets switch runs
//! on top of a SAN provider (spec §4.1 step 5, §4.2 step 5, §4.3, §4.5,
//! §6.2), so that tests, benchmarks and Linux programs can use the engine as
//! ordinary connected stream sockets — the role rsockets plays for
//! rdma-core. It uses only the public SPI ([`crate::spi::Provider`] and the
//! [`crate::spi::Switch`] upcalls).
//!
//! - [`proto`]: the session protocol as a deterministic state machine
//!   (credits, small data in control messages, large data by RDMA read or
//!   write with descriptor exchange, graceful shutdown, error handling).
//! - `runtime`: [`Runtime`] (a provider and its switch: the upcalls, whose
//!   switch handles index a slot table).
//! - `connection` (with `io`, the switch's unsafe): one socket's protocol
//!   machine, driven by the thread that waits for it; `inbox_lock`: its
//!   state lock, which upcalls never wait for.
//! - [`stream`]: [`Listener`], [`Stream`] (blocking with timeouts,
//!   non-blocking `try_*`, `Read`/`Write`, graceful shutdown, abortive
//!   close, cancellation).
//! - `ready`: their readiness fd (`AsRawFd`, for epoll, mio or tokio's
//!   `AsyncFd`) and the runtime's hub, which gets the completion queues
//!   reaped while no thread is inside a call.
//!
//! ```no_run
//! use sanpath::switch::{Listener, Runtime, RuntimeConfig, Stream};
//! use std::io::{Read, Write};
//! use std::net::{Ipv4Addr, SocketAddrV4};
//!
//! let rt = Runtime::start(RuntimeConfig::default())?;
//! let addr = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7000);
//! let listener = Listener::bind(&rt, addr)?;
//! let server = std::thread::spawn(move || -> std::io::Result<()> {
//!     let (mut s, _) = listener.accept()?;
//!     let mut buf = [0u8; 5];
//!     s.read_exact(&mut buf)?;
//!     s.write_all(&buf)
//! });
//! let mut c = Stream::connect(&rt, addr)?;
//! c.write_all(b"hello")?;
//! let mut back = [0u8; 5];
//! c.read_exact(&mut back)?;
//! server.join().unwrap()?;
//! # Ok::<(), std::io::Error>(())
//! ```

mod connection;
mod inbox_lock;
mod io;
pub mod proto;
mod ready;
mod regcache;
mod runtime;
pub mod stream;

pub use proto::RdmaFlow;
pub use runtime::{Runtime, RuntimeConfig, SwitchOptions};
pub use stream::{CancelToken, Listener, Stream};
