//! Building blocks for tests and benchmarks that drive the engine directly:
//! a switch that only completes overlapped records, a provider on a private
//! soft network, and a connected socket pair on it; and the bodies of the
//! fuzz targets ([`fuzz`]).

pub mod fuzz;

use crate::config::Config;
use crate::error::{WsaError, WsaResult};
use crate::event::Event;
use crate::fabric::soft::{SoftNetwork, SoftNic};
use crate::spi::{
    Condition, Overlapped, Provider, ProviderSocket, Switch, SwitchHandle, AF_INET, FD_ACCEPT,
    FD_CONNECT, IPPROTO_TCP, SOCK_STREAM, WSA_FLAG_OVERLAPPED, WSD_VERSION,
};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

/// A switch that keeps no books: switch handle = our descriptor with bit 62
/// flipped, and a completion upcall only stores the result in the record.
pub struct CompletingSwitch;

const HANDLE_BIT: usize = 1 << 62;

impl Switch for CompletingSwitch {
    fn create_socket_handle(&self, _: u32, context: usize) -> WsaResult<SwitchHandle> {
        Ok(SwitchHandle(context ^ HANDLE_BIT))
    }
    fn close_socket_handle(&self, _: SwitchHandle) -> WsaResult<()> {
        Ok(())
    }
    fn query_socket_handle_context(&self, h: SwitchHandle) -> WsaResult<usize> {
        Ok(h.0 ^ HANDLE_BIT)
    }
    fn complete_overlapped_request(
        &self,
        _: SwitchHandle,
        ov: &Overlapped,
        error: u32,
        bytes: u32,
    ) -> WsaResult<()> {
        ov.complete(error, bytes);
        Ok(())
    }
}

/// A started provider whose soft NIC has address `ip` on its own network.
/// Keep the returned NIC (statistics) and network as long as needed.
pub fn soft_provider(
    config: Config,
    ip: Ipv4Addr,
    switch: Arc<dyn Switch>,
) -> Result<(Provider, Arc<SoftNic>, Arc<SoftNetwork>), String> {
    let net = SoftNetwork::new();
    let nic = net
        .attach(config.soft_nic(vec![ip]))
        .map_err(|e| e.to_string())?;
    let p = Provider::with_nic(config, nic.clone()).map_err(|e| e.to_string())?;
    p.startup(WSD_VERSION, switch, 1)
        .map_err(|e| e.to_string())?;
    Ok((p, nic, net))
}

/// A connected pair `(client, server)` through a listener on `addr` (closed
/// again before returning), waiting at most 10 s for the request.
pub fn connected_pair(
    p: &Provider,
    addr: SocketAddrV4,
) -> WsaResult<(ProviderSocket, ProviderSocket)> {
    let socket = || p.socket(AF_INET, SOCK_STREAM, IPPROTO_TCP, 0, WSA_FLAG_OVERLAPPED, 0);
    let l = socket()?;
    p.bind(l, addr)?;
    p.listen(l, 1)?;
    let ev = Arc::new(Event::new());
    p.event_select(l, Some(ev.clone()), FD_ACCEPT)?;
    let c = socket()?;
    // On a fabric whose connector learns of the accept later (shm, verbs),
    // the client is connected only once FD_CONNECT says so.
    let connected = Arc::new(Event::new());
    p.event_select(c, Some(connected.clone()), FD_CONNECT)?;
    p.connect(c, addr, &[])?;
    if !ev.wait(Duration::from_secs(10)) {
        return Err(WsaError::WSAETIMEDOUT);
    }
    let (s, _) = p.accept(l, &mut |_| Condition::Accept)?;
    p.close_socket(l)?;
    if !connected.wait(Duration::from_secs(10)) {
        return Err(WsaError::WSAETIMEDOUT);
    }
    p.event_select(c, None, 0)?;
    Ok((c, s))
}
