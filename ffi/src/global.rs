//! The one provider of the process.
//!
//! Created by the first `WSPStartupEx` (and kept for the life of the
//! process: the engine's own startup/cleanup refcount starts and stops its
//! threads; at exit its NIC removes its files, see [`Nic::process_exiting`]).
//!
//! [`Nic::process_exiting`]: sanpath::fabric::Nic::process_exiting Its configuration is the embedded default, or the TOML file
//! named by the environment variable [`CONFIG_ENV`], read once, when the
//! provider is created. If creation fails (unreadable or invalid file, the
//! fabric cannot start), `WSPStartupEx` returns `WSASYSNOTREADY` and the next
//! `WSPStartupEx` tries again.

use sanpath::spi::Provider;
use sanpath::{Config, WsaError, WsaResult};
use std::sync::{Mutex, OnceLock, PoisonError};

/// Environment variable naming a TOML configuration file (keys as in
/// `configs/default.toml`; omitted keys keep their defaults).
pub const CONFIG_ENV: &str = "SANPATH_CONFIG";

static PROVIDER: OnceLock<Provider> = OnceLock::new();
/// Serialises creation so that two racing first startups create one
/// provider (and attach one NIC).
static CREATE: Mutex<()> = Mutex::new(());

/// The provider, if a startup created it.
pub fn provider() -> WsaResult<&'static Provider> {
    PROVIDER.get().ok_or(WsaError::WSANOTINITIALISED)
}

/// The provider, created now if needed; `WSASYSNOTREADY` if that fails.
pub fn provider_or_create() -> WsaResult<&'static Provider> {
    if let Some(p) = PROVIDER.get() {
        return Ok(p);
    }
    let _guard = CREATE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = PROVIDER.get() {
        return Ok(p);
    }
    let config = load_config().ok_or(WsaError::WSASYSNOTREADY)?;
    let provider = Provider::new(config).map_err(|_| WsaError::WSASYSNOTREADY)?;
    let p = PROVIDER.get_or_init(|| provider);
    // SAFETY: `at_exit` is a plain function that stays valid for the life
    // of the process. If registration fails, the files it would remove stay
    // (stale: the next NIC to bind the address removes them).
    unsafe { atexit(at_exit) };
    Ok(p)
}

extern "C" {
    fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
}

/// At a normal exit the static provider is never dropped: its NIC removes
/// what would outlive the process (the shm fabric's address sockets).
extern "C" fn at_exit() {
    if let Some(p) = PROVIDER.get() {
        p.nic().process_exiting();
    }
}

fn load_config() -> Option<Config> {
    match std::env::var_os(CONFIG_ENV) {
        Some(path) if !path.is_empty() => Config::load(std::path::Path::new(&path)).ok(),
        _ => Some(Config::default()),
    }
}
