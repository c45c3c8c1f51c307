//! Forwarding a request to an upstream server and its response back, untouched but for the
//! hop-by-hop and `X-Forwarded-*` headers.
//!
//! Bodies are streamed frame by frame in both directions (trailers included), so memory does not
//! grow with a body's size. Reads only the `UpstreamPool` of the current snapshot.

pub mod headers;
pub mod pool;
pub mod upgrade;

use crate::body::Body;
use headers::ClientSide;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
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

/// Forwards `req` to the next upstream server.
pub async fn forward(
    pool: &UpstreamPool,
    mut req: Request<Incoming>,
    client: &ClientSide,
    trusted: bool,
) -> Result<Forwarded, UpstreamError> {
    let server = pool.pick(None);
    let upstream = &pool.servers[server];

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
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(upstream.scheme.clone());
    uri.authority = Some(upstream.authority.clone());
    uri.path_and_query = Some(path);
    parts.uri = Uri::from_parts(uri).unwrap_or_default();
    parts.version = Version::HTTP_11;

    let req = Request::from_parts(parts, Body::from_incoming(body));
    let timeout = pool.config.response_timeout;
    let mut resp = match tokio::time::timeout(timeout, pool.client.request(req)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(source)) if source.is_connect() => {
            return Err(UpstreamError::Connect {
                server: upstream.to_string(),
                source,
            })
        }
        Ok(Err(source)) => {
            return Err(UpstreamError::Failed {
                server: upstream.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(UpstreamError::Timeout {
                server: upstream.to_string(),
                timeout,
            })
        }
    };

    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upgraded_to = switching
        .then(|| resp.headers().get(header::UPGRADE).cloned())
        .flatten();
    headers::strip_hop_by_hop(resp.headers_mut());
    if let (Some(client_upgrade), Some(proto)) = (client_upgrade, upgraded_to) {
        headers::restore_upgrade(resp.headers_mut(), proto);
        upgrade::spawn_tunnel(client_upgrade, hyper::upgrade::on(&mut resp));
    }
    Ok(Forwarded {
        response: resp.map(Body::Stream),
        server,
    })
}

/// The answer a client gets when no upstream response could be had.
///
/// TEMPORARY until health checks land (issue 4): the outage holding response replaces this,
/// and this is the only place that needs to change.
pub fn failure_response(err: &UpstreamError) -> Response<Body> {
    let (status, text) = match err {
        UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"),
        UpstreamError::Connect { .. } | UpstreamError::Failed { .. } => {
            (StatusCode::BAD_GATEWAY, "upstream unavailable\n")
        }
    };
    let mut resp = Response::new(Body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
