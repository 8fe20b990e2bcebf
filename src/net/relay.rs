//! `qssh relay`: the tokio driver of [`RelayServer`] on one UDP socket. It answers relay
//! control messages and forwards RELAY_DATA between the two ends of each slot; everything
//! else on the socket is ignored.

use super::udp::UdpMux;
use crate::core::crypto::OsRandom;
use crate::core::relay::RelayServer;
use crate::core::rendezvous::UdpKind;
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{debug, info};

/// Runs a relay on `bind` until `stop` resolves. `ready` receives the bound address.
pub async fn serve(
    bind: SocketAddr,
    ready: impl FnOnce(SocketAddr),
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let (mux, mut control) = UdpMux::bind(bind, true).await?;
    ready(mux.local_addr());
    let mut relay = RelayServer::new(Instant::now(), Box::new(OsRandom));
    let mut out = Vec::new();
    let mut expire = tokio::time::interval(RelayServer::EXPIRE_EVERY);
    let mut last_stats = relay.stats();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            c = control.recv() => {
                let Some(c) = c else { return Ok(()) };
                if !matches!(c.kind, UdpKind::RelayCtrl | UdpKind::RelayData) {
                    continue;
                }
                relay.handle(Instant::now(), c.from, &c.payload, &mut out);
                for (to, payload) in out.drain(..) {
                    if let Err(e) = mux.send_to(&payload, to).await {
                        debug!("relay send to {to}: {e}");
                    }
                }
            }
            _ = expire.tick() => {
                relay.expire(Instant::now());
                let s = relay.stats();
                if s != last_stats {
                    info!(registrations = relay.registrations(), slots = relay.slots(), "relay stats {s:?}");
                    last_stats = s;
                }
            }
            _ = &mut stop => return Ok(()),
        }
    }
}
