//! The upstream servers and the keep-alive connection pool that reaches them.
//!
//! One hyper-util client holds idle connections per server, so that a busy proxy reuses
//! connections instead of leaving a TIME_WAIT socket per request. The pool lives as long as the
//! upstream config it was built from: a reload with the same `[upstream]` keeps it.

use crate::body::Body;
use crate::config::{Upstream, UpstreamConfig};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicUsize, Ordering};

pub type HttpClient = Client<HttpConnector, Body>;

pub struct UpstreamPool {
    pub servers: Vec<Upstream>,
    pub client: HttpClient,
    pub config: UpstreamConfig,
    next: AtomicUsize,
}

impl UpstreamPool {
    pub fn new(config: &UpstreamConfig) -> UpstreamPool {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(1024)
            // The client's own Host would name the upstream; the proxy keeps the client's.
            .set_host(false)
            .build(connector);
        UpstreamPool {
            servers: config.servers.clone(),
            client,
            config: config.clone(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next server in round-robin order, skipping `avoid` when there is another.
    pub fn pick(&self, avoid: Option<usize>) -> usize {
        let n = self.servers.len();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        match avoid {
            Some(a) if a == i && n > 1 => (i + 1) % n,
            _ => i,
        }
    }

    /// Whether this pool was built from the same settings, so a reload can keep its connections.
    pub fn same_config(&self, other: &UpstreamConfig) -> bool {
        self.servers == other.servers
            && self.config.connect_timeout == other.connect_timeout
            && self.config.idle_timeout == other.idle_timeout
    }
}
