//! One health check against one server: an HTTP `GET health.path`, a TCP connect, or the
//! standard gRPC health check (`grpc.health.v1.Health/Check`, SERVING = healthy).

use crate::body::Body;
use crate::config::{HealthConfig, HealthKind, Protocol, Upstream};
use crate::forward::pool::{https1_connector, https_connector, tcp_connector, HttpsConnector};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Uri, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USER_AGENT: &str = concat!("intermission-health-check/", env!("CARGO_PKG_VERSION"));

/// An empty `HealthCheckRequest` (service "" = the whole server) in gRPC framing: not
/// compressed, length 0.
const GRPC_CHECK_REQUEST: &[u8] = &[0, 0, 0, 0, 0];

/// What a check reads of an answer's body: a health answer is a few bytes.
const MAX_BODY: usize = 64 * 1024;

/// Why a check failed.
#[derive(Debug)]
pub enum CheckError {
    /// The server failed it.
    Server(String),
    /// The proxy could not run it: out of file descriptors or memory
    /// (`forward::local_exhaustion`). Says nothing of the server.
    Local(String),
}

impl From<String> for CheckError {
    fn from(why: String) -> CheckError {
        CheckError::Server(why)
    }
}

impl CheckError {
    /// What failed, told the same way whoever is to blame.
    fn from_error(e: &(dyn std::error::Error + 'static)) -> CheckError {
        let why = crate::tls::upstream_failure(e);
        if crate::forward::local_exhaustion(e) {
            CheckError::Local(why)
        } else {
            CheckError::Server(why)
        }
    }
}

/// Runs checks for one server; its clients keep no idle connections, so every check proves
/// that a new connection can be made, as a client's would be.
pub struct Prober {
    http: Client<HttpsConnector, Body>,
    h2c: Client<HttpConnector, Body>,
    config: HealthConfig,
    server: Upstream,
}

impl Prober {
    pub fn new(server: Upstream, config: HealthConfig, tls: &Arc<rustls::ClientConfig>) -> Prober {
        let tcp = tcp_connector(config.timeout);
        let builder = |http2_only: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .pool_max_idle_per_host(0)
                .http2_only(http2_only);
            b
        };
        // A `Host` of the operator's goes over HTTP/1.1 only: over HTTP/2 (an `https://` server
        // that chose it by ALPN) `:authority` names the server, and a `Host` beside it that
        // differs makes the request malformed (RFC 9113 §8.3.1), which nginx answers with 400.
        let connector = if config.host.is_some() {
            https1_connector(tcp.clone(), tls)
        } else {
            https_connector(tcp.clone(), tls)
        };
        Prober {
            http: builder(false).build(connector),
            h2c: builder(true).build(tcp),
            config,
            server,
        }
    }

    /// Checks once: the latency on success, why on failure.
    pub async fn check(&self) -> Result<Duration, CheckError> {
        let start = Instant::now();
        let head = AtomicBool::new(false);
        let outcome = tokio::time::timeout(self.config.timeout, self.attempt(&head)).await;
        match outcome {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(why)) => Err(why),
            Err(_) if head.load(Ordering::Relaxed) => Err(format!(
                "the answer's head came, but not its end within {:?}",
                self.config.timeout
            )
            .into()),
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout).into()),
        }
    }

    /// `head` is set once the answer's head has come, so that a timeout can say which part
    /// of the answer was missing.
    async fn attempt(&self, head: &AtomicBool) -> Result<(), CheckError> {
        match self.config.kind {
            HealthKind::Tcp => {
                let host = self.server.authority.host();
                let default = if self.server.protocol == Protocol::Https {
                    443
                } else {
                    80
                };
                let port = self.server.authority.port_u16().unwrap_or(default);
                tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
                    .await
                    .map(drop)
                    .map_err(|e| match CheckError::from_error(&e) {
                        CheckError::Server(why) => CheckError::Server(format!("connect: {why}")),
                        local => local,
                    })
            }
            HealthKind::Http => {
                let req = self.request(self.config.path.as_str(), Body::Empty)?;
                let resp = self.send(req).await?;
                head.store(true, Ordering::Relaxed);
                let status = resp.status().as_u16();
                if !self.config.expects(status) {
                    return Err(format!("status {status} is not in health.expect").into());
                }
                // The answer must end too, as Kubernetes' probes read it: an application that
                // sends its head at once and then hangs on its database answers nothing else
                // either. A long one is read no further than a health page needs.
                let mut body = resp.into_body();
                let mut read = 0;
                while read < MAX_BODY {
                    match body.frame().await {
                        None => break,
                        Some(Ok(frame)) => {
                            read += frame.data_ref().map_or(0, Bytes::len);
                        }
                        Some(Err(e)) => {
                            return Err(format!(
                                "reading the answer: {}",
                                crate::logging::with_causes(&e)
                            )
                            .into())
                        }
                    }
                }
                Ok(())
            }
            HealthKind::Grpc => {
                let mut req = self.request(
                    "/grpc.health.v1.Health/Check",
                    Body::full(Bytes::from_static(GRPC_CHECK_REQUEST)),
                )?;
                req.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                req.headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
                *req.method_mut() = http::Method::POST;
                let resp = self.send(req).await?;
                head.store(true, Ordering::Relaxed);
                let (parts, body) = resp.into_parts();
                // A health answer is a few bytes; a server streaming more is not healthy.
                let collected = http_body_util::Limited::new(body, MAX_BODY)
                    .collect()
                    .await
                    .map_err(|e| format!("reading the answer: {e}"))?;
                let trailers = collected.trailers().cloned();
                let data = collected.to_bytes();
                // A trailers-only answer carries grpc-status in the headers.
                let field = |name: &str| {
                    trailers
                        .as_ref()
                        .and_then(|t| t.get(name))
                        .or_else(|| parts.headers.get(name))
                        .and_then(|v| v.to_str().ok())
                };
                let status = field("grpc-status").unwrap_or("missing");
                if status != "0" {
                    return Err(grpc_failure(status, field("grpc-message")).into());
                }
                match serving_status(&data) {
                    Some(1) => Ok(()),
                    Some(other) => Err(format!("health status {other} (not SERVING)").into()),
                    None => Err(CheckError::Server("unreadable HealthCheckResponse".into())),
                }
            }
        }
    }

    fn request(&self, path: &str, body: Body) -> Result<Request<Body>, String> {
        let uri = Uri::builder()
            .scheme(self.server.scheme.clone())
            .authority(self.server.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = Request::get(uri)
            .header(header::USER_AGENT, USER_AGENT)
            .body(body)
            .map_err(|e| e.to_string())?;
        // No `Host` of our own: hyper-util's client writes one from the URI over HTTP/1.1, and
        // over HTTP/2 (an `https://` server that chose it by ALPN) `:authority` says it, where
        // a `Host` beside it is a duplicate that nginx answers with 400, taking the server out.
        if self.server.protocol == Protocol::H2c {
            *req.version_mut() = Version::HTTP_2;
        } else if let (HealthKind::Http, Some(host)) = (self.config.kind, &self.config.host) {
            // hyper-util's client writes its own only when there is none.
            req.headers_mut().insert(header::HOST, host.clone());
        }
        Ok(req)
    }

    async fn send(
        &self,
        req: Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, CheckError> {
        let pending: ResponseFuture = match self.server.protocol {
            Protocol::H2c => self.h2c.request(req),
            Protocol::Http | Protocol::Https => self.http.request(req),
        };
        pending.await.map_err(|e| CheckError::from_error(&e))
    }
}

/// The `status` field (1, varint) of a gRPC-framed `HealthCheckResponse`. The message is one
/// enum field, so reading it does not justify a protobuf library.
fn serving_status(framed: &[u8]) -> Option<u64> {
    let (&compressed, rest) = framed.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let msg = rest.get(4..4 + len)?;
    let mut i = 0;
    let mut status = Some(0); // proto3: an absent field is 0 (UNKNOWN)
    while i < msg.len() {
        let (key, n) = varint(&msg[i..])?;
        i += n;
        match key & 7 {
            0 => {
                let (value, n) = varint(&msg[i..])?;
                i += n;
                if key >> 3 == 1 {
                    status = Some(value);
                }
            }
            2 => {
                let (len, n) = varint(&msg[i..])?;
                i = i.checked_add(n)?.checked_add(usize::try_from(len).ok()?)?;
            }
            _ => return None,
        }
    }
    status
}

fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_responses() {
        // (framed message, status)
        let table: &[(&[u8], Option<u64>)] = &[
            (&[0, 0, 0, 0, 2, 0x08, 0x01], Some(1)), // SERVING
            (&[0, 0, 0, 0, 2, 0x08, 0x02], Some(2)), // NOT_SERVING
            (&[0, 0, 0, 0, 0], Some(0)),             // empty message: UNKNOWN
            (&[1, 0, 0, 0, 2, 0x08, 0x01], None),    // compressed: not understood
            (&[0, 0, 0, 0, 9, 0x08], None),          // truncated
            (&[], None),
        ];
        for (framed, want) in table {
            assert_eq!(serving_status(framed), *want, "{framed:?}");
        }
    }
}

/// A failed gRPC check as an operator can act on it: the code's name, the server's own
/// message (percent-decoded, at most 200 characters), and what the two usual codes mean
/// here. "grpc-status 12" alone sent people reading the gRPC specification at 3 a.m.
fn grpc_failure(status: &str, message: Option<&str>) -> String {
    let name = match status {
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "13" => "INTERNAL",
        "12" => "UNIMPLEMENTED",
        "14" => "UNAVAILABLE",
        "16" => "UNAUTHENTICATED",
        _ => "",
    };
    let mut said = format!("grpc-status {status}");
    if !name.is_empty() {
        said.push_str(&format!(" ({name})"));
    }
    match status {
        "12" => said.push_str(
            ": the server has no grpc.health.v1.Health service (register one, or check with \
             health.kind = \"tcp\")",
        ),
        "5" => said.push_str(": the server's Health service does not know the service asked for"),
        _ => {}
    }
    let message = message
        .map(|m| percent_encoding::percent_decode_str(m).decode_utf8_lossy())
        .filter(|m| !m.trim().is_empty());
    if let Some(m) = message {
        let m: String = m.chars().filter(|c| !c.is_control()).take(200).collect();
        said.push_str(&format!(" (the server said: {m})"));
    }
    said
}

#[cfg(test)]
mod grpc_failures {
    use super::grpc_failure;

    #[test]
    fn a_failed_grpc_check_names_its_code_and_what_the_server_said() {
        assert_eq!(
            grpc_failure("12", None),
            "grpc-status 12 (UNIMPLEMENTED): the server has no grpc.health.v1.Health service \
             (register one, or check with health.kind = \"tcp\")"
        );
        assert_eq!(
            grpc_failure("14", Some("db%20down%0A")),
            "grpc-status 14 (UNAVAILABLE) (the server said: db down)"
        );
        assert_eq!(grpc_failure("99", Some("  ")), "grpc-status 99");
        assert_eq!(grpc_failure("missing", None), "grpc-status missing");
        let long = "x".repeat(500);
        assert_eq!(grpc_failure("13", Some(&long)).matches('x').count(), 200);
    }
}
