//! The upstream servers and the keep-alive connection pool that reaches them.
//!
//! One hyper-util client holds idle connections per server, so that a busy proxy reuses
//! connections instead of leaving a TIME_WAIT socket per request. The pool lives as long as the
//! upstream config it was built from: a reload with the same `[upstream]` keeps it.

use crate::body::Body;
use crate::config::{Protocol, Upstream, UpstreamConfig};
use crate::tls::TlsError;
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::ResponseFuture;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `http://` and `https://` servers (HTTP/2 when ALPN offers it) share one client.
pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct UpstreamPool {
    pub servers: Vec<Upstream>,
    pub config: UpstreamConfig,
    /// The TLS settings for `https://` servers, shared with the health checks.
    pub tls: Arc<rustls::ClientConfig>,
    client: Client<HttpsConnector, Body>,
    /// `h2c://` servers: HTTP/2 with prior knowledge.
    h2c: Client<HttpConnector, Body>,
    next: AtomicUsize,
}

/// The TCP side of upstream connections.
pub fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // The HTTPS connector wraps this one and needs the https:// scheme to pass.
    connector.enforce_http(false);
    connector
}

/// The TLS-capable connector over `tcp`.
pub fn https_connector(tcp: HttpConnector, tls: &Arc<rustls::ClientConfig>) -> HttpsConnector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls::ClientConfig::clone(tls))
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp)
}

impl UpstreamPool {
    pub fn new(config: &UpstreamConfig) -> Result<UpstreamPool, TlsError> {
        let tls = crate::tls::client_config(config)?;
        let builder = |http2_only: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(config.idle_timeout)
                .pool_max_idle_per_host(1024)
                // The client's own Host would name the upstream; the proxy keeps the client's.
                .set_host(false)
                .http2_only(http2_only);
            b
        };
        let tcp = tcp_connector(config.connect_timeout);
        Ok(UpstreamPool {
            servers: config.servers.clone(),
            config: config.clone(),
            client: builder(false).build(https_connector(tcp.clone(), &tls)),
            h2c: builder(true).build(tcp),
            tls,
            next: AtomicUsize::new(0),
        })
    }

    /// Sends `req` to server `index` with the client that speaks its protocol.
    pub fn request(&self, index: usize, req: Request<Body>) -> ResponseFuture {
        match self.servers.get(index).map(|s| s.protocol) {
            Some(Protocol::H2c) => self.h2c.request(req),
            _ => self.client.request(req),
        }
    }

    /// The next healthy server in round-robin order, other than `avoid`. `None` when no
    /// server other than `avoid` is healthy; with nothing healthy at all (force-open), the
    /// next server whatever its health, since the operator asked to forward anyway.
    pub fn pick(&self, up: &[bool], avoid: Option<usize>) -> Option<usize> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let healthy = |i: usize| up.get(i).copied().unwrap_or(true);
        let candidate = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| Some(i) != avoid && healthy(i));
        match candidate {
            Some(i) => Some(i),
            None if avoid.is_none() => Some(start % n),
            None => None,
        }
    }

    /// Whether this pool was built from the same settings, so a reload can keep its connections.
    pub fn same_config(&self, other: &UpstreamConfig) -> bool {
        self.servers == other.servers
            && self.config.connect_timeout == other.connect_timeout
            && self.config.idle_timeout == other.idle_timeout
            // A CA file may have new contents under the same name: re-read it on reload.
            && self.config.ca_file.is_none()
            && other.ca_file.is_none()
            && self.config.danger_accept_invalid_certs == other.danger_accept_invalid_certs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn pool(n: usize) -> UpstreamPool {
        let servers: Vec<String> = (0..n)
            .map(|i| format!("\"http://127.0.0.1:{}\"", 3000 + i))
            .collect();
        let text = format!("[upstream]\nservers = [{}]\n", servers.join(","));
        UpstreamPool::new(&Config::parse(&text, Path::new("."), None).unwrap().upstream).unwrap()
    }

    #[tokio::test]
    async fn picks_only_healthy_servers_round_robin() {
        let p = pool(3);
        let picks: Vec<_> = (0..6)
            .map(|_| p.pick(&[true, false, true], None).unwrap())
            .collect();
        assert!(!picks.contains(&1), "{picks:?}");
        assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
    }

    #[tokio::test]
    async fn a_retry_goes_elsewhere_or_nowhere() {
        let p = pool(3);
        for _ in 0..6 {
            let second = p.pick(&[true, true, false], Some(0));
            assert_eq!(second, Some(1));
        }
        assert_eq!(p.pick(&[true, false, false], Some(0)), None);
        // Nothing healthy (force-open): forward anyway, but never retry onto the same server.
        assert!(p.pick(&[false, false, false], None).is_some());
        assert_eq!(pool(1).pick(&[true], Some(0)), None);
    }
}
