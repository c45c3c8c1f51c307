//! Tunnels for HTTP/1.1 upgrades (WebSocket and others) once the upstream said 101.
//!
//! Both sides' `OnUpgrade` futures resolve after hyper has handed over the raw connections;
//! from then on bytes are copied both ways until either side closes. hyper's connection,
//! and with it the client connection's `max_connections` slot and drain guard, ends at the
//! handover: the tunnel keeps its own (`listener::Upgrading`), so that it counts against
//! `max_connections` and a drain waits for it, up to `shutdown_timeout`; a WebSocket is told
//! to close at a drain, with a close frame each way (`websocket`). So that a tunnel
//! whose peer vanished without a word cannot keep its slot for ever, one over which nothing
//! has moved either way for `upstream.read_timeout` is closed, as nginx closes one whose
//! server says nothing for `proxy_read_timeout`. Its request's access log line is written
//! when it ends (`TunnelLog`), as nginx writes a WebSocket's.

use super::sockets::TunnelPlace;
use super::websocket;
use crate::listener::{Tunnelled, Upgrading};
use crate::watched::{Watch, Watched};
use http::Request;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The client's side of an upgrade: hyper's handover of its connection, what keeps that
/// connection counted once it is a tunnel (none where no listener marked the request), and
/// its place among the tunnels under the bound on upstream sockets.
pub struct Client {
    handover: Handover,
    place: TunnelPlace,
}

/// hyper's handover of the client's connection, with what keeps it counted, until a tunnel
/// takes them. Dropped untaken (the server declined the upgrade with any answer but a `101`,
/// or failed), the connection is closed as every other is once hyper hands it over at its end
/// (`Upgrading::close_declined`): let go with the forward's state, it was dropped, over TLS
/// without `close_notify`, so that the client read a truncated connection.
struct Handover(Option<(OnUpgrade, Option<Upgrading>)>);

impl Drop for Handover {
    fn drop(&mut self) {
        if let Some((on, Some(upgrading))) = self.0.take() {
            upgrading.close_declined(on);
        }
    }
}

impl Client {
    /// Taken from the request, whose parts go on to the upstream: nothing of the client's
    /// connection rides along.
    pub fn of<B>(req: &mut Request<B>, place: TunnelPlace) -> Client {
        let on = hyper::upgrade::on(&mut *req);
        let upgrading = req.extensions_mut().remove::<Upgrading>();
        Client {
            handover: Handover(Some((on, upgrading))),
            place,
        }
    }
}

/// What writes the access log line of a request, given the bytes its answer sent.
pub type LineWriter = Box<dyn FnOnce(u64) + Send + Sync>;

/// The access log line of a request whose answer switched protocols, in the `101`'s
/// extensions: written when its tunnel ends, with the bytes that went to the client through
/// it and (from the request's start) the tunnel's whole life, as nginx logs a WebSocket. At
/// the `101` it would say a few milliseconds and no bytes, however long the WebSocket lived
/// and whatever it carried. Whichever of the two comes second, the line or the end, writes it.
#[derive(Clone)]
pub struct TunnelLog(Arc<Mutex<Logging>>);

enum Logging {
    Waiting,
    Line(LineWriter),
    Ended(u64),
    Written,
}

impl TunnelLog {
    /// `write`, called once the tunnel has ended (at once if it has).
    pub fn on_end(&self, write: LineWriter) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, Logging::Written) {
            Logging::Ended(bytes) => {
                drop(state);
                write(bytes);
            }
            _ => *state = Logging::Line(write),
        }
    }

    fn ended(&self, bytes: u64) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, Logging::Written) {
            Logging::Line(write) => {
                drop(state);
                write(bytes);
            }
            _ => *state = Logging::Ended(bytes),
        }
    }
}

/// Tells the tunnel's log that it ended when dropped: however the tunnel's task ends, a
/// drain's `shutdown_timeout` that drops it included.
struct Ends {
    log: TunnelLog,
    to_client: Arc<AtomicU64>,
}

impl Drop for Ends {
    fn drop(&mut self) {
        self.log.ended(self.to_client.load(Ordering::Relaxed));
    }
}

/// Spawns the tunnel between the client's and the upstream's upgraded connections. Its slot
/// and drain guard are taken here, as the 101 goes to hyper: before hyper's connection lets
/// go of its own. `idle`: how long it may carry nothing either way (`None`: for ever). What
/// it returns goes with the `101` to the access log (`TunnelLog`). A `websocket` is closed
/// with a close frame at a drain (`websocket::relay`); any other upgrade's bytes are copied
/// as they come, and cut at `shutdown_timeout`.
pub fn spawn_tunnel(
    client: Client,
    upstream: OnUpgrade,
    websocket: bool,
    idle: Option<Duration>,
) -> TunnelLog {
    let Client {
        mut handover,
        mut place,
    } = client;
    let log = TunnelLog(Arc::new(Mutex::new(Logging::Waiting)));
    // Always there: only this and the drop take it.
    let Some((client, upgrading)) = handover.0.take() else {
        log.ended(0);
        return log;
    };
    let kept: Option<Tunnelled> = upgrading.map(Upgrading::keep);
    let to_client = Arc::new(AtomicU64::new(0));
    let ends = Ends {
        log: log.clone(),
        to_client: to_client.clone(),
    };
    tokio::spawn(async move {
        // Until the tunnel ends, whichever way.
        let mut kept = kept;
        let _ends = ends;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        // Given back as the task ends, whichever way.
        place.opened();
        let _place = place;
        let moved = Arc::new(AtomicU64::new(0));
        let mut client = Watched {
            io: TokioIo::new(client),
            watch: Moved {
                reads: moved.clone(),
                written: Some(to_client),
            },
        };
        let mut upstream = Watched {
            io: TokioIo::new(upstream),
            watch: Moved {
                reads: moved.clone(),
                written: None,
            },
        };
        // Only a WebSocket's framing is known: another protocol's end cannot be told apart
        // from its bytes, nor asked for.
        let copy = async {
            if !websocket {
                return tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .map(drop);
            }
            let drain = async {
                match kept.as_mut() {
                    Some(kept) => kept.draining().await,
                    None => std::future::pending().await,
                }
            };
            websocket::relay(&mut client, &mut upstream, drain).await
        };
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
    log
}

/// Reads that brought bytes through a tunnel, from either side; and on the client's side,
/// the bytes written to it.
struct Moved {
    reads: Arc<AtomicU64>,
    written: Option<Arc<AtomicU64>>,
}

impl Watch for Moved {
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    fn took(&self, n: usize) {
        if let Some(written) = &self.written {
            written.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
