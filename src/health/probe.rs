//! One health check against one server: an HTTP `GET health.path` or a TCP connect.

use crate::body::Body;
use crate::config::{HealthConfig, HealthKind, Upstream};
use http::header::{self, HeaderValue};
use http::{Request, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::{Duration, Instant};

const USER_AGENT: &str = concat!("intermission-health-check/", env!("CARGO_PKG_VERSION"));

/// Runs checks for one server; its client keeps no idle connections, so every check proves
/// that a new connection can be made, as a client's would be.
pub struct Prober {
    client: Client<HttpConnector, Body>,
    config: HealthConfig,
    server: Upstream,
}

impl Prober {
    pub fn new(server: Upstream, config: HealthConfig) -> Prober {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Prober {
            client,
            config,
            server,
        }
    }

    /// Checks once: the latency on success, why on failure.
    pub async fn check(&self) -> Result<Duration, String> {
        let start = Instant::now();
        let outcome = tokio::time::timeout(self.config.timeout, self.attempt()).await;
        match outcome {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(why)) => Err(why),
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
        }
    }

    async fn attempt(&self) -> Result<(), String> {
        match self.config.kind {
            HealthKind::Tcp => {
                let host = self.server.authority.host();
                let port = self.server.authority.port_u16().unwrap_or(80);
                tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
                    .await
                    .map(drop)
                    .map_err(|e| format!("connect: {e}"))
            }
            HealthKind::Http => {
                let uri = Uri::builder()
                    .scheme(self.server.scheme.clone())
                    .authority(self.server.authority.clone())
                    .path_and_query(self.config.path.clone())
                    .build()
                    .map_err(|e| e.to_string())?;
                let host = HeaderValue::from_str(self.server.authority.as_str())
                    .map_err(|e| e.to_string())?;
                let req = Request::get(uri)
                    .header(header::HOST, host)
                    .header(header::USER_AGENT, USER_AGENT)
                    .header(header::CONNECTION, "close")
                    .body(Body::Empty)
                    .map_err(|e| e.to_string())?;
                let resp = self.client.request(req).await.map_err(|e| {
                    let mut why = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        why = format!("{why}: {s}");
                        source = s.source();
                    }
                    why
                })?;
                let status = resp.status().as_u16();
                if self.config.expects(status) {
                    Ok(())
                } else {
                    Err(format!("status {status} is not in health.expect"))
                }
            }
        }
    }
}
