//! Tunnels for HTTP/1.1 upgrades (WebSocket and others) once the upstream said 101.
//!
//! Both sides' `OnUpgrade` futures resolve after hyper has handed over the raw connections;
//! from then on bytes are copied both ways until either side closes. hyper's connection,
//! and with it the client connection's `max_connections` slot and drain guard, ends at the
//! handover: the tunnel keeps its own (`listener::Upgrading`), so that it counts against
//! `max_connections` and a drain waits for it, up to `shutdown_timeout`.

use crate::listener::{Tunnelled, Upgrading};
use http::Request;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// The client's side of an upgrade: hyper's handover of its connection, and what keeps that
/// connection counted once it is a tunnel (none where no listener marked the request).
pub struct Client {
    on: OnUpgrade,
    upgrading: Option<Upgrading>,
}

impl Client {
    /// Taken from the request, whose parts go on to the upstream: nothing of the client's
    /// connection rides along.
    pub fn of<B>(req: &mut Request<B>) -> Client {
        Client {
            on: hyper::upgrade::on(&mut *req),
            upgrading: req.extensions_mut().remove::<Upgrading>(),
        }
    }
}

/// Spawns the tunnel between the client's and the upstream's upgraded connections. Its slot
/// and drain guard are taken here, as the 101 goes to hyper: before hyper's connection lets
/// go of its own.
pub fn spawn_tunnel(client: Client, upstream: OnUpgrade) {
    let kept: Option<Tunnelled> = client.upgrading.map(Upgrading::keep);
    let client = client.on;
    tokio::spawn(async move {
        // Until the tunnel ends, whichever way.
        let _kept = kept;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}
