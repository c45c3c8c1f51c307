//! Accept loops: every plaintext listener serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on
//! the same port, with upgrades, header limits and a graceful drain.
//!
//! hyper does the protocol work: a head larger than `max_header_bytes` gets 431, a malformed one
//! 400, and `header_read_timeout` closes a connection whose headers come too slowly.

use crate::config::ProxyConfig;
use crate::gateway::{self, Conn};
use crate::shutdown::Shutdown;
use crate::state::StateHandle;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

pub type ConnBuilder = auto::Builder<TokioExecutor>;

/// The connection settings for the proxy's listeners.
pub fn conn_builder(proxy: &ProxyConfig) -> ConnBuilder {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.header_read_timeout)
        .max_buf_size(proxy.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Pings find dead peers that would otherwise hold a connection for ever.
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(u32::try_from(proxy.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    builder
}

pub async fn accept_loop(
    listener: TcpListener,
    state: StateHandle,
    graceful: Arc<GracefulShutdown>,
    limit: Arc<Semaphore>,
    tls: bool,
    mut shutdown: Shutdown,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually out of file descriptors: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = shutdown.fired() => break,
        };
        // Over the limit, close at once: a refused client retries elsewhere or later, while
        // an accepted one that is never served would hold a descriptor for nothing.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "proxy.max_connections reached; closing a new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let snap = state.load();
        let first_byte = snap.config.proxy.header_read_timeout;
        let builder = snap.conn.clone();
        let acceptor = match (tls, &snap.tls) {
            (false, _) => None,
            (true, Some(config)) => Some(TlsAcceptor::from(config.clone())),
            (true, None) => continue,
        };
        drop(snap);
        let watcher = graceful.watcher();
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // hyper's header timeout starts once it knows the protocol; a client that sends
            // nothing at all is cut off here instead.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = Arc::new(Conn::new(peer, tls));
            // Set by the first request: until then the connection lives on a deadline, since
            // neither the protocol sniffing nor the HTTP/2 preface has a timer of its own.
            let asked = Arc::new(AtomicBool::new(false));
            let seen = asked.clone();
            let service = service_fn(move |req| {
                seen.store(true, Ordering::Relaxed);
                let state = state.clone();
                let conn = conn.clone();
                // The request's work is boxed: hyper keeps a slot of this future's size for
                // every connection while it idles (4.5 KB unboxed); boxed, that memory exists
                // only while a request is in flight, for one allocation per request.
                async move {
                    let work = Box::pin(async move { gateway::handle(&state, &conn, req).await });
                    Ok::<_, Infallible>(work.await)
                }
            });
            let result = match acceptor {
                None => {
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    until_first_request(watcher.watch(connection.into_owned()), first_byte, &asked)
                        .await
                }
                Some(acceptor) => {
                    // The handshake gets the same deadline as a request head.
                    let tls_stream =
                        match tokio::time::timeout(first_byte, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), service);
                    until_first_request(watcher.watch(connection.into_owned()), first_byte, &asked)
                        .await
                }
            };
            let Some(result) = result else {
                tracing::debug!(%peer, "no request within header_read_timeout; closed");
                return;
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Runs a connection, dropping it if no request has arrived by `deadline`.
async fn until_first_request<F: std::future::Future>(
    connection: F,
    deadline: Duration,
    asked: &AtomicBool,
) -> Option<F::Output> {
    tokio::pin!(connection);
    match tokio::time::timeout(deadline, &mut connection).await {
        Ok(result) => Some(result),
        Err(_) if !asked.load(Ordering::Relaxed) => None,
        Err(_) => Some(connection.await),
    }
}
