//! Tunnels for HTTP/1.1 upgrades (WebSocket and others) once the upstream said 101.
//!
//! Both sides' `OnUpgrade` futures resolve after hyper has handed over the raw connections;
//! from then on bytes are copied both ways until either side closes. hyper's connection,
//! and with it the client connection's `max_connections` slot and drain guard, ends at the
//! handover: the tunnel keeps its own (`listener::Upgrading`), so that it counts against
//! `max_connections` and a drain waits for it, up to `shutdown_timeout`. So that a tunnel
//! whose peer vanished without a word cannot keep its slot for ever, one over which nothing
//! has moved either way for `upstream.read_timeout` is closed, as nginx closes one whose
//! server says nothing for `proxy_read_timeout`.

use crate::listener::{Tunnelled, Upgrading};
use crate::watched::{Watch, Watched};
use http::Request;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
/// go of its own. `idle`: how long it may carry nothing either way (`None`: for ever).
pub fn spawn_tunnel(client: Client, upstream: OnUpgrade, idle: Option<Duration>) {
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
        let moved = Arc::new(AtomicU64::new(0));
        let side = |io| Watched {
            io: TokioIo::new(io),
            watch: Moved(moved.clone()),
        };
        let (mut client, mut upstream) = (side(client), side(upstream));
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        let Some(idle) = idle else {
            if let Err(e) = copy.await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
            return;
        };
        // A look every `idle` rather than a deadline moved per read: closed once nothing has
        // moved for `idle`, to twice that.
        let mut seen = 0;
        loop {
            tokio::select! {
                ended = &mut copy => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upgraded connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep(idle) => {
                    let now = moved.load(Ordering::Relaxed);
                    if now == seen {
                        tracing::debug!("nothing moved through an upgraded connection for {idle:?}; closing it");
                        return;
                    }
                    seen = now;
                }
            }
        }
    });
}

/// Reads that brought bytes through a tunnel, from either side.
struct Moved(Arc<AtomicU64>);

impl Watch for Moved {
    fn read(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}
