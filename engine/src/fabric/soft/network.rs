//! The wire: which NIC owns which IPv4 address, which hosts exist only on
//! the TCP/IP network, and how a destination address resolves.

use super::{lock, NicShared, SoftNic, SoftNicConfig};
use crate::fabric::FabricError;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// NICs and hosts of one process, shared as `Arc<SoftNetwork>`.
pub struct SoftNetwork {
    /// Taken briefly by attach, detach (NIC drop), host declarations and
    /// address resolution; never held while another lock is taken.
    state: Mutex<NetState>,
}

struct NetState {
    /// Attached NICs by id. An entry is removed when its `SoftNic` drops, so
    /// every entry upgrades (the `SoftNic` owns a strong reference).
    nics: Vec<(u64, Weak<NicShared>)>,
    /// Hosts reachable only over TCP/IP: SAN connects to them time out.
    tcp_only: HashSet<Ipv4Addr>,
}

/// Where a destination address leads.
pub(super) enum Route {
    /// A NIC owns the address.
    San(Arc<NicShared>),
    /// A TCP/IP-only host owns it.
    TcpOnly,
    /// On a SAN subnet, owned by nobody.
    NoHost,
    /// On no SAN subnet.
    NoNet,
}

/// Process-unique NIC ids (they order region-table locks).
static NEXT_NIC_ID: AtomicU64 = AtomicU64::new(1);

/// The process-wide network (what `Provider::new` attaches to).
pub fn default_network() -> Arc<SoftNetwork> {
    static NET: OnceLock<Arc<SoftNetwork>> = OnceLock::new();
    NET.get_or_init(SoftNetwork::new).clone()
}

fn prefix_mask(len: u8) -> u32 {
    match len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

impl SoftNetwork {
    pub fn new() -> Arc<SoftNetwork> {
        Arc::new(SoftNetwork {
            state: Mutex::new(NetState {
                nics: Vec::new(),
                tcp_only: HashSet::new(),
            }),
        })
    }

    /// Attaches a new NIC owning `cfg.addresses`. `AddressInUse` if a live
    /// NIC of this network owns one of them; `Invalid` for an empty list or
    /// the unspecified address.
    pub fn attach(self: &Arc<Self>, cfg: SoftNicConfig) -> Result<Arc<SoftNic>, FabricError> {
        if cfg.addresses.is_empty() {
            return Err(FabricError::Invalid("a soft NIC needs an address"));
        }
        if cfg.addresses.iter().any(|a| a.is_unspecified()) {
            return Err(FabricError::Invalid("0.0.0.0 is not a NIC address"));
        }
        if cfg.prefix_len > 32 {
            return Err(FabricError::Invalid("prefix length above 32"));
        }
        let mut st = lock(&self.state);
        let taken = st
            .nics
            .iter()
            .filter_map(|(_, n)| n.upgrade())
            .any(|n| n.addresses.iter().any(|a| cfg.addresses.contains(a)));
        if taken {
            return Err(FabricError::AddressInUse);
        }
        let id = NEXT_NIC_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(NicShared::new(id, cfg));
        st.nics.push((id, Arc::downgrade(&shared)));
        Ok(Arc::new(SoftNic {
            network: self.clone(),
            shared,
        }))
    }

    /// Declares a host that exists on the IP network but has no SAN NIC.
    pub fn add_tcp_only_host(&self, ip: Ipv4Addr) {
        lock(&self.state).tcp_only.insert(ip);
    }

    /// Forgets NIC `id` (its `SoftNic` is being dropped).
    pub(super) fn detach(&self, id: u64) {
        lock(&self.state).nics.retain(|(n, _)| *n != id);
    }

    pub(super) fn route(&self, ip: Ipv4Addr) -> Route {
        let st = lock(&self.state);
        let nics = st.nics.iter().filter_map(|(_, n)| n.upgrade());
        let mut on_subnet = false;
        for nic in nics {
            if nic.addresses.contains(&ip) {
                return Route::San(nic);
            }
            let mask = prefix_mask(nic.prefix_len);
            on_subnet |= nic
                .addresses
                .iter()
                .any(|a| u32::from(*a) & mask == u32::from(ip) & mask);
        }
        if st.tcp_only.contains(&ip) {
            Route::TcpOnly
        } else if on_subnet {
            Route::NoHost
        } else {
            Route::NoNet
        }
    }
}
