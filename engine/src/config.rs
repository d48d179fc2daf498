//! Engine settings, loaded from TOML (serde). Every field has a default, so a
//! file only needs the keys it changes; `configs/default.toml` spells all the
//! defaults out (a test keeps it equal to [`Config::default`]). Nothing here
//! reads environment variables.

use crate::fabric::soft::SoftNicConfig;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

/// The default configuration file, every key documented.
pub const DEFAULT_TOML: &str = include_str!("../../configs/default.toml");

/// All engine settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub poller: PollerConfig,
    pub ring: RingConfig,
    pub ops: OpsConfig,
    pub qp: QpConfig,
    pub mem: MemConfig,
    pub mr_cache: MrCacheConfig,
    pub close: CloseConfig,
    pub connect: ConnectConfig,
    pub limits: LimitsConfig,
    pub fabric: FabricConfig,
}

/// How completion queues are driven.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PollerMode {
    /// Dedicated poller threads reap CQs into completion rings; a dispatcher
    /// thread drains the rings and makes the upcalls. A thread that waits
    /// for (or polls) an op reaps its socket's CQ itself while it spins,
    /// and the CQ's poller steps aside meanwhile (`poller` module docs).
    Threads,
    /// No polling threads: a thread that waits for a completion (or polls
    /// `get_overlapped_result`, or calls `Provider::progress`) polls the CQs
    /// itself and dispatches inline. The first op that wants an upcall
    /// starts one helper thread that sleeps on the armed CQs and reports
    /// what nobody polled for.
    RunToCompletion,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PollerConfig {
    pub mode: PollerMode,
    /// Number of poller threads (and CQs) in `threads` mode; CQs in the other.
    pub count: usize,
    /// Cores to pin poller threads to, in order; empty = not pinned. The
    /// dispatcher is pinned to `dispatcher_core` when set.
    pub cores: Vec<usize>,
    pub dispatcher_core: Option<usize>,
    /// Empty polls a thread makes before it arms notification and sleeps.
    pub spin_budget: u32,
    /// Whether a spinning thread executes a pause (`spin_loop` hint) after
    /// each empty poll past the first `poller::UNPAUSED_SPINS` (64) since
    /// progress: kinder to a hyperthread sibling, but it delays the next
    /// poll (up to ~140 cycles on recent x86 cores, about 50 ns on an AMD
    /// EPYC under KVM), and under QEMU TCG every pause leaves the vCPU for
    /// QEMU's main loop and its global lock; the first polls of a wait go
    /// back to back either way, so that a short wait notices its
    /// completion at once. `false` polls back to back, as perftest does.
    pub spin_pause: bool,
    /// Work completions reaped per poll call.
    pub batch: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RingConfig {
    /// Capacity of each poller → dispatcher completion ring (rounded up to a
    /// power of two).
    pub capacity: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Overlapped ops in flight at most per provider. The op slab takes
    /// the address space of this many slots (384 bytes each) at
    /// startup and initialises slots as ops need them, so the memory it
    /// uses follows the most ops ever in flight.
    pub slab_size: usize,
    /// Socket table capacity: sockets live or closing at once. The table
    /// is one zeroed allocation whose pages become resident as sockets use
    /// them, so a large limit costs address space, not memory.
    pub max_sockets: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QpConfig {
    pub send_depth: u32,
    pub recv_depth: u32,
    /// Scatter/gather entries per work request (WSABUF count limit).
    pub max_sge: u32,
    /// Completions each completion queue can owe: it admits a queue pair
    /// only while their `send_depth + recv_depth` fit. 0 (the default) is
    /// the fabric's choice: no bound on soft and shm, whose CQs hold no
    /// completions of their own, 16,384 on verbs (`fabric::DEFAULT_CQ_DEPTH`).
    pub cq_depth: u32,
    /// Messages the soft NIC holds for a receiver with no posted receive
    /// before it fails the sender with "RNR retry exceeded" (spec §7-9).
    pub rnr_queue_max: u32,
}

/// Whether registered memory is locked into RAM.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MlockPolicy {
    Off,
    /// Lock when `RLIMIT_MEMLOCK` allows it, otherwise continue unlocked.
    Try,
    /// Fail the allocation with a clear error when it cannot be locked.
    Require,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MemConfig {
    pub mlock: MlockPolicy,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MrCacheConfig {
    /// Keep registrations whose count dropped to zero (spec §5). Off by
    /// default on Linux: without `MmSecureVirtualMemory` only an explicit
    /// `memory_registration_cache_callback` keeps the cache true (spec §7-19).
    pub enabled: bool,
    pub max_entries: usize,
    pub max_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CloseConfig {
    /// How long `close_socket` itself waits for the socket's in-flight work
    /// requests to come back (flushed) before it returns and leaves the rest
    /// of the teardown to the engine: the bound of a close.
    pub wait_ms: u64,
    /// How long after a close the engine waits for the NIC to flush the
    /// socket's work requests. Past it the engine abandons the queue pair
    /// (the NIC then touches none of their memory, `QueuePair::abandon`) and
    /// completes the ops still outstanding itself, `WSA_OPERATION_ABORTED`.
    /// The last `WSPCleanup` waits at most this long for the closes it ends.
    pub quiesce_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectConfig {
    /// Connection-manager timeout: a host that answers only over TCP/IP
    /// yields `WSAETIMEDOUT` after this long (CONN-6).
    pub timeout_ms: u64,
    /// `SOMAXCONN` and larger backlogs are clamped to this (spec §7-17).
    pub backlog_max: u32,
    /// Port of the rejoin service (socket duplication, spec §4.8) on every
    /// address of the NIC; 0 turns the service off (connections to us then
    /// cannot be duplicated by their peers). Outside the ephemeral range.
    pub dup_port: u16,
    /// How long a duplicated connection waits for its target process to
    /// claim it before the peer's receives complete `WSAECONNRESET`.
    pub dup_timeout_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// `SO_MAX_MSG_SIZE`: largest single `send`.
    pub max_msg_size: u32,
    /// `SO_MAX_RDMA_SIZE`: largest single RDMA op.
    pub max_rdma_size: u32,
    /// `SO_RDMA_THRESHOLD_SIZE`: our preferred smallest RDMA transfer.
    pub rdma_threshold: u32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FabricKind {
    Soft,
    Verbs,
    /// Shared memory between processes of one host (`fabric::shm`).
    Shm,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FabricConfig {
    pub kind: FabricKind,
    pub soft: SoftFabricConfig,
    pub verbs: VerbsFabricConfig,
    pub shm: ShmFabricConfig,
}

/// The `shm` fabric: this process's addresses (each a socket in the
/// runtime directory); the prefix length is `fabric.soft.prefix_len`'s.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShmFabricConfig {
    /// IPv4 addresses this process owns; empty: `fabric.soft.addresses`.
    pub addresses: Vec<Ipv4Addr>,
    /// The runtime directory; empty: `$XDG_RUNTIME_DIR/sanpath`, else a
    /// private directory under the temp dir.
    pub runtime_dir: String,
}

/// The RDMA device the `verbs` fabric uses (engine feature `verbs`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VerbsFabricConfig {
    /// Device name (`rxe0`, `mlx5_0`); empty: the first with an active port.
    pub device: String,
    /// Port number (1-based); 0 means 1.
    pub port: u8,
    /// How remote keys of exposed memory are made.
    pub memory_windows: MemoryWindows,
}

/// How the `verbs` fabric makes the remote key of an exposed region. Only a
/// type-2 memory window, bound through one queue pair, limits the key to the
/// peer of that connection (spec §5, MEM-7); a second registration with
/// remote rights gives a key that works through every queue pair of the
/// protection domain.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MemoryWindows {
    /// Type-2 windows when the device has them; without, exposing memory
    /// to the peer fails (`WSAEOPNOTSUPP`).
    #[default]
    Auto,
    /// Type-2 windows, or the NIC does not open.
    Required,
    /// No windows: exposing memory to the peer fails (`WSAEOPNOTSUPP`).
    Off,
    /// No windows: a second registration with remote rights. Its key works
    /// through every connection of the NIC until it is revoked (at the
    /// deregistration or the close): MEM-7 is not enforced. Opt-in.
    SharedKeys,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SoftFabricConfig {
    /// IPv4 addresses of this provider's soft NIC.
    pub addresses: Vec<Ipv4Addr>,
    /// Prefix length of the SAN subnet each address belongs to.
    pub prefix_len: u8,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            mode: PollerMode::Threads,
            count: 1,
            cores: Vec::new(),
            dispatcher_core: None,
            spin_budget: 2000,
            spin_pause: true,
            batch: 32,
        }
    }
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig { capacity: 1024 }
    }
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            slab_size: 1 << 18,
            max_sockets: 65536,
        }
    }
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            send_depth: 256,
            recv_depth: 256,
            max_sge: 16,
            cq_depth: 0,
            rnr_queue_max: 8,
        }
    }
}

impl Default for MemConfig {
    fn default() -> Self {
        MemConfig {
            mlock: MlockPolicy::Try,
        }
    }
}

impl Default for MrCacheConfig {
    fn default() -> Self {
        MrCacheConfig {
            enabled: false,
            max_entries: 1024,
            max_bytes: 256 << 20,
        }
    }
}

impl Default for CloseConfig {
    fn default() -> Self {
        CloseConfig {
            wait_ms: 100,
            quiesce_timeout_ms: 2000,
        }
    }
}

impl Default for ConnectConfig {
    fn default() -> Self {
        ConnectConfig {
            timeout_ms: 3000,
            backlog_max: 128,
            dup_port: 65535,
            dup_timeout_ms: 10_000,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_msg_size: 8 << 20,
            max_rdma_size: 1 << 30,
            rdma_threshold: 64 << 10,
        }
    }
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            kind: FabricKind::Soft,
            soft: SoftFabricConfig::default(),
            shm: ShmFabricConfig::default(),
            verbs: VerbsFabricConfig {
                device: String::new(),
                port: 1,
                memory_windows: MemoryWindows::Auto,
            },
        }
    }
}

impl Default for SoftFabricConfig {
    fn default() -> Self {
        SoftFabricConfig {
            addresses: vec![Ipv4Addr::new(198, 18, 0, 1)],
            prefix_len: 24,
        }
    }
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Checks the relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.poller.count == 0 {
            return bad("poller.count must be at least 1");
        }
        if self.poller.batch == 0 {
            return bad("poller.batch must be at least 1");
        }
        if self.ring.capacity < 2 {
            return bad("ring.capacity must be at least 2");
        }
        if self.ops.slab_size == 0 || self.ops.slab_size > (1 << 24) {
            return bad("ops.slab_size must be in 1..=16777216");
        }
        if self.ops.max_sockets == 0 || self.ops.max_sockets > (1 << 20) {
            return bad("ops.max_sockets must be in 1..=1048576");
        }
        let q = &self.qp;
        if q.send_depth == 0 || q.recv_depth == 0 || q.max_sge == 0 {
            return bad("qp.send_depth, qp.recv_depth and qp.max_sge must be at least 1");
        }
        if q.cq_depth != 0
            && u64::from(q.cq_depth) < u64::from(q.send_depth) + u64::from(q.recv_depth)
        {
            return bad(
                "qp.cq_depth must be 0 (the fabric's choice) or hold at least one queue pair \
                 (send_depth + recv_depth)",
            );
        }
        if self.limits.max_msg_size == 0 || self.limits.max_rdma_size == 0 {
            return bad("limits.max_msg_size and limits.max_rdma_size must be positive");
        }
        if self.fabric.soft.prefix_len > 32 {
            return bad("fabric.soft.prefix_len must be at most 32");
        }
        Ok(())
    }

    pub fn close_quiesce_timeout(&self) -> Duration {
        Duration::from_millis(self.close.quiesce_timeout_ms)
    }

    pub fn close_wait(&self) -> Duration {
        Duration::from_millis(self.close.wait_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect.timeout_ms)
    }

    /// The settings of this engine's shm NIC (`fabric.shm`).
    #[cfg(not(loom))]
    pub fn shm_nic(&self) -> crate::fabric::shm::ShmNicConfig {
        let s = &self.fabric.shm;
        crate::fabric::shm::ShmNicConfig {
            addresses: if s.addresses.is_empty() {
                self.fabric.soft.addresses.clone()
            } else {
                s.addresses.clone()
            },
            prefix_len: self.fabric.soft.prefix_len,
            connect_timeout: self.connect_timeout(),
            runtime_dir: (!s.runtime_dir.is_empty()).then(|| s.runtime_dir.clone().into()),
        }
    }

    pub fn dup_timeout(&self) -> Duration {
        Duration::from_millis(self.connect.dup_timeout_ms)
    }

    /// The settings of a soft NIC with `addresses` for an engine run with
    /// this config (prefix length, connect timeout and RNR hold from it).
    pub fn soft_nic(&self, addresses: Vec<Ipv4Addr>) -> SoftNicConfig {
        SoftNicConfig {
            addresses,
            prefix_len: self.fabric.soft.prefix_len,
            connect_timeout: self.connect_timeout(),
            rnr_queue_max: self.qp.rnr_queue_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_matches_the_defaults() {
        assert_eq!(Config::from_toml(DEFAULT_TOML).unwrap(), Config::default());
        let c = Config::default();
        assert_eq!(c.fabric.kind, FabricKind::Soft);
        assert_eq!(c.limits.rdma_threshold, 64 << 10);
        assert_eq!(c.connect.backlog_max, 128);
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml("[poller]\nmode = \"run_to_completion\"\n").unwrap();
        assert_eq!(c.poller.mode, PollerMode::RunToCompletion);
        assert_eq!(c.ring, RingConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_relations_are_rejected() {
        assert!(matches!(
            Config::from_toml("[poller]\nmood = 1\n"),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            Config::from_toml("[qp]\ncq_depth = 4\n"),
            Err(ConfigError::Invalid(_))
        ));
        // 0: the fabric's choice.
        assert_eq!(
            Config::from_toml("[qp]\ncq_depth = 0\n")
                .unwrap()
                .qp
                .cq_depth,
            0
        );
    }
}
