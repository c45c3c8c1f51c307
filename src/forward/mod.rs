//! Forwarding a request to an upstream server and its response back, untouched but for the
//! hop-by-hop and `X-Forwarded-*` headers.
//!
//! Bodies are streamed frame by frame in both directions (trailers included), so memory does not
//! grow with a body's size. Reads only the `UpstreamPool` of the current snapshot.

pub mod headers;
pub mod pool;
pub mod upgrade;

use crate::body::{Body, SentSignal};
use crate::config::{Protocol, Upstream};
use crate::health::Passive;
use headers::ClientSide;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use pool::UpstreamPool;
use std::time::Duration;

/// Why a request could not be forwarded: always the upstream side's fault.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{server} sent no response head within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    #[error("{server} failed before answering: {source}")]
    Failed {
        server: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

/// What forwarding produced: the response, and which server answered (for the access log).
pub struct Forwarded {
    pub response: Response<Body>,
    pub server: usize,
}

/// Why forwarding produced no response, with the last server tried (if any).
pub struct Failed {
    pub error: Option<UpstreamError>,
    pub server: Option<usize>,
}

/// Whether a request may be sent a second time: its method is idempotent (RFC 9110 §9.2.2)
/// and it has no body, so nothing was consumed by the first attempt.
pub fn replayable(method: &Method, body: &Body) -> bool {
    let idempotent = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    idempotent && matches!(body, Body::Empty)
}

/// Forwards `req` to a healthy upstream server; a request that fails before any response
/// head arrives is retried once on another healthy server when it can be replayed. Every
/// failure is reported to that server's checker.
pub async fn forward(
    pool: &UpstreamPool,
    up: &[bool],
    passive: &[Passive],
    mut req: Request<Incoming>,
    client: &ClientSide,
    trusted: bool,
    timeout: Duration,
) -> Result<Forwarded, Failed> {
    let upgrade = match req.version() {
        Version::HTTP_11 => headers::upgrade_request(req.headers()),
        _ => None,
    };
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    // HTTP/2 clients name the host in :authority, which the upstream hop needs as Host.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    // This hop answered the expectation already: hyper sends `100 Continue` to the client as
    // soon as the body is read, which forwarding starts at once.
    parts.headers.remove(header::EXPECT);
    if let Some(up) = upgrade {
        headers::restore_upgrade(&mut parts.headers, up);
    }
    headers::set_forwarded(&mut parts.headers, client, trusted);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let (body, sent) = Body::watched(body);

    let Some(first) = pool.pick(up, None) else {
        return Err(Failed {
            error: None,
            server: None,
        });
    };
    // A copy for the second attempt, made only when a second attempt is possible.
    let replay =
        (client_upgrade.is_none() && replayable(&parts.method, &body) && pool.servers.len() > 1)
            .then(|| (parts.method.clone(), parts.headers.clone()));
    let mut req = Request::from_parts(parts, body);
    aim(&mut req, &pool.servers[first], path.clone());
    let mut sent = sent;
    let error = match send(pool, first, req, timeout, sent.as_mut()).await {
        Ok(resp) => return Ok(finish(resp, first, client_upgrade)),
        Err(e) => e,
    };
    // Only what the upstream can be blamed for counts against its health: a client that
    // stalls or aborts its own upload must not be able to take servers out.
    let body_complete = sent.as_ref().is_none_or(SentSignal::complete);
    if matches!(error, UpstreamError::Connect { .. }) || body_complete {
        report(passive, first, &error);
    }
    // A timeout is retried too, as nginx's default `proxy_next_upstream error timeout` does:
    // the request is idempotent, so a server still working on it does no harm, and a hung
    // server must not cost the client its answer while another one is healthy.
    // Picked only when there is something to retry: a pick moves the round-robin on.
    let second = replay.as_ref().and_then(|_| pool.pick(up, Some(first)));
    let (Some((method, headers)), Some(second)) = (replay, second) else {
        return Err(Failed {
            error: Some(error),
            server: Some(first),
        });
    };
    tracing::warn!(error = %error, "retrying on {}", pool.servers[second]);
    let mut again = Request::new(Body::Empty);
    *again.method_mut() = method;
    *again.headers_mut() = headers;
    aim(&mut again, &pool.servers[second], path);
    match send(pool, second, again, timeout, None).await {
        Ok(resp) => Ok(finish(resp, second, None)),
        Err(e) => {
            report(passive, second, &e);
            Err(Failed {
                error: Some(e),
                server: Some(second),
            })
        }
    }
}

/// Points a request at `server`: its URI, and the HTTP version its protocol speaks. An `h2c`
/// server gets the client's host only as `X-Forwarded-Host`: HTTP/2 names the host in
/// `:authority`, which is the server's own, and a different `Host` would make the request
/// malformed (RFC 9113 §8.3.1).
fn aim(req: &mut Request<Body>, server: &Upstream, path: PathAndQuery) {
    *req.uri_mut() = upstream_uri(server, path);
    *req.version_mut() = match server.protocol {
        Protocol::H2c => Version::HTTP_2,
        Protocol::Http | Protocol::Https => Version::HTTP_11,
    };
    if server.protocol == Protocol::H2c {
        req.headers_mut().remove(header::HOST);
    }
}

fn upstream_uri(server: &Upstream, path: PathAndQuery) -> Uri {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(server.scheme.clone());
    uri.authority = Some(server.authority.clone());
    uri.path_and_query = Some(path);
    Uri::from_parts(uri).unwrap_or_default()
}

fn report(passive: &[Passive], server: usize, error: &UpstreamError) {
    if let Some(tx) = passive.get(server) {
        // Never waits: a full queue means the checker already has plenty to go on.
        let _ = tx.try_send(error.to_string());
    }
}

/// Sends one request to one server, waiting at most `response_timeout` for the head once the
/// request body (if it streams) has been sent whole, as nginx's `proxy_read_timeout` does.
async fn send(
    pool: &UpstreamPool,
    server: usize,
    req: Request<Body>,
    timeout: Duration,
    sent: Option<&mut SentSignal>,
) -> Result<Response<Incoming>, UpstreamError> {
    let name = || pool.servers[server].to_string();
    let response = pool.request(server, req);
    let outcome = match sent {
        None => tokio::time::timeout(timeout, response).await,
        Some(sent) => {
            tokio::pin!(response);
            let deadline = async {
                // A body that ends in error drops the sender: the timer starts then too.
                let _ = (&mut sent.rx).await;
                tokio::time::sleep(timeout).await;
            };
            tokio::select! {
                r = &mut response => Ok(r),
                () = deadline => tokio::time::timeout(Duration::ZERO, response).await,
            }
        }
    };
    match outcome {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(source)) if source.is_connect() => Err(UpstreamError::Connect {
            server: name(),
            source,
        }),
        Ok(Err(source)) => Err(UpstreamError::Failed {
            server: name(),
            source,
        }),
        Err(_) => Err(UpstreamError::Timeout {
            server: name(),
            timeout,
        }),
    }
}

/// Prepares the upstream's response for the client, and the tunnel if it switched protocols.
fn finish(
    mut resp: Response<Incoming>,
    server: usize,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Forwarded {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upgraded_to = switching
        .then(|| resp.headers().get(header::UPGRADE).cloned())
        .flatten();
    headers::strip_hop_by_hop(resp.headers_mut());
    if let (Some(client_upgrade), Some(proto)) = (client_upgrade, upgraded_to) {
        headers::restore_upgrade(resp.headers_mut(), proto);
        upgrade::spawn_tunnel(client_upgrade, hyper::upgrade::on(&mut resp));
    }
    Forwarded {
        response: resp.map(Body::Stream),
        server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_requests_are_replayed() {
        let table = [
            (Method::GET, true),
            (Method::HEAD, true),
            (Method::OPTIONS, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::POST, false),
            (Method::PATCH, false),
            (Method::CONNECT, false),
        ];
        for (method, want) in table {
            assert_eq!(
                replayable(&method, &Body::Empty),
                want,
                "{method} without a body"
            );
            assert!(
                !replayable(&method, &Body::full("x")),
                "{method} with a body"
            );
        }
    }
}
