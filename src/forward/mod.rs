//! Forwarding a request to an upstream server and its response back, untouched but for the
//! hop-by-hop and `X-Forwarded-*` headers.
//!
//! Bodies are streamed frame by frame in both directions (trailers included), so memory does not
//! grow with a body's size. Reads only the `UpstreamPool` of the current snapshot.
//!
//! The steps of a forwarded request (`gateway::forward_request`, `forward`, `send`,
//! `UpstreamPool::request`, `Http1Pool::request`) are functions returning an `async` block,
//! not `async fn`s: an `async fn` keeps its arguments twice in its state (as passed, and as
//! moved into its body), and every forwarded request allocates and copies the sum of those
//! states (5,248 B as `async fn`s, 3,352 B as blocks).

pub mod events;
pub mod headers;
pub mod pool;
pub mod sockets;
pub mod upgrade;
pub mod websocket;

use crate::body::{Answered, Body, ClientFault, Resume, SentSignal};
use crate::config::{Config, Protocol, Upstream};
use crate::health::Passive;
use crate::metrics::UpstreamFailure;
use crate::shutdown::Drain;
use crate::state::marks::{self, Marks};
use headers::ClientSide;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use pool::UpstreamPool;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Why a request could not be forwarded: always the upstream side's fault.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: pool::SendError,
    },
    #[error("{server} sent no response head within {timeout:?}")]
    Timeout { server: String, timeout: Duration },
    /// The server took nothing of the streamed request body, and sent no head, for
    /// `response_timeout`: handled as a `Timeout`.
    #[error("{server} took nothing of the request body and sent no response head for {timeout:?}")]
    Unread { server: String, timeout: Duration },
    /// Its health checks took the server out while the request waited for its response head:
    /// handled as a `Timeout` at that moment (`state::marks`).
    #[error("{server} was taken out by its health checks while the request waited for its response head")]
    MarkedDown { server: String },
    #[error("{server} failed before answering: {source}")]
    Failed {
        server: String,
        #[source]
        source: pool::SendError,
    },
    /// An upgrade request refused before any server was asked: tunnels hold their share of
    /// the bound on upstream sockets (`sockets::tunnel_share`).
    #[error(transparent)]
    Tunnels(#[from] sockets::TunnelsFull),
    /// The drain neared its end (`Drain::ending`) while the request waited for its response
    /// head: answered with the drain's own `503` (`gateway::stopping`), where the process's exit
    /// closed the client's connection with nothing said. Nobody's failure: not reported to
    /// the server's checks, nor sent again.
    #[error("the proxy's stop came before {server}'s response head")]
    Stopping { server: String },
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
    /// The client's own request body failed: its answer, since that is no outage.
    pub client: Option<ClientFault>,
    /// What is left of the request's body, which the answer's connection depends on.
    pub rest: Rest,
}

/// What is left unread of a request's body when forwarding failed. hyper's server ends an
/// HTTP/1.x connection whose request body is dropped before its end, unless that end is in
/// what one more read brings, and says nothing of it in the answer: the gateway reads what
/// it can (`Back`) and says `Connection: close` where the connection closes (`Lost`).
pub enum Rest {
    /// Nothing: there was no body, or it was read whole (to be sent again).
    Read,
    /// Given back with none of it read (no server, or none that took the request): to be
    /// read and dropped, as a held request's is. With the connection's `park::Upload` when
    /// the body does not carry it.
    Back(Body, Option<crate::park::Upload>),
    /// Read in part and sent, the rest dropped with the request the server failed on.
    Lost,
}

impl Rest {
    /// `Read`, or `Lost` for a streamed body not sent whole.
    fn of(sent: Option<&SentSignal>) -> Rest {
        match sent {
            Some(sent) if !sent.complete() => Rest::Lost,
            _ => Rest::Read,
        }
    }
}

impl Failed {
    fn upstream(error: Option<UpstreamError>, server: Option<usize>, rest: Rest) -> Failed {
        Failed {
            error,
            server,
            client: None,
            rest,
        }
    }
}

/// Request bodies up to this size are read whole before forwarding when a second attempt is
/// possible, so that they can be sent again. Larger bodies, and bodies without a
/// `Content-Length`, stream and are never replayed: such a request goes to another server
/// only as itself, given back by the pool when none of it left (`pool::UpstreamPool::request`).
const REPLAY_BODY_LIMIT: u64 = 64 * 1024;

/// The longest a native gRPC call's deadline makes its head be waited for
/// (`grpc_head_wait`): a deadline of hours (`grpc-timeout` allows 8 digits of them, and some
/// clients send a day for "none") is left to its client, whose cancel at the deadline ends
/// the wait anyway; a server that hangs keeps a call no longer than this.
const GRPC_HEAD_WAIT_MAX: Duration = Duration::from_secs(3600);

/// How long a native gRPC call (`headers`) waits for its response head: `response_timeout`,
/// or its deadline (`grpc-timeout`) when longer, up to `GRPC_HEAD_WAIT_MAX`, as Envoy's
/// `grpc_timeout_header_max` has it. A unary call that the server takes two minutes on, sent
/// with a five-minute deadline, got `UNAVAILABLE` at `response_timeout`, which the client
/// then retried, to be cut again.
fn grpc_head_wait(headers: &http::HeaderMap, response_timeout: Duration) -> Duration {
    if !native_grpc(headers) {
        return response_timeout;
    }
    crate::hold::negotiate::grpc_deadline(headers).map_or(response_timeout, |deadline| {
        deadline.min(GRPC_HEAD_WAIT_MAX).max(response_timeout)
    })
}

pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a request's body is read whole before it is forwarded, to be replayable: one whose
/// `Content-Length` is within `REPLAY_BODY_LIMIT`, so that a kept connection the server closed
/// as it was sent (keep-alive's race) costs a second try on a new connection, not the
/// client's answer (nginx reads every body first). For an `http://` server, an idempotent
/// request's only: a `POST` on a connection closed under it may have been processed. For an
/// HTTP/2 server (`h2c://`, and an `https://` one that may choose HTTP/2), any method's: such
/// a server says which streams it never processed (a `GOAWAY` as it closes a connection
/// after its `keepalive_requests`, `REFUSED_STREAM`), and those may be sent again whatever
/// their method (RFC 9113 §8.7; `pool::UpstreamPool::h2`). Chunked bodies stream. Trailers
/// an HTTP/2 client's body ends in are kept with it (`Body::Trailed`).
/// Its length when it is.
fn buffer_for_replay(parts: &http::request::Parts, to: Protocol) -> Option<u64> {
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    length.filter(|&n| {
        (idempotent(&parts.method) || to != Protocol::Http)
            && !parts.headers.contains_key(header::TRANSFER_ENCODING)
            && n > 0
            && n <= REPLAY_BODY_LIMIT
    })
}

/// Whether a request body has a meaning for `method` (RFC 9110 §9.3): not for `GET`, `HEAD`,
/// `DELETE`, `OPTIONS` or `TRACE`, whose bodies some servers ignore without reading them.
pub(crate) fn body_has_meaning(method: &[u8]) -> bool {
    !matches!(method, b"GET" | b"HEAD" | b"DELETE" | b"OPTIONS" | b"TRACE")
}

/// Whether `req` carries a body its method gives no meaning (`body_has_meaning`).
fn unmeant_body(req: &Request<Incoming>) -> bool {
    !body_has_meaning(req.method().as_str().as_bytes()) && has_body(req)
}

/// Whether `req` carries a body. An HTTP/2 request whose end comes in a DATA frame of its
/// own, empty, or that says its length is 0, carries none.
fn has_body(req: &Request<Incoming>) -> bool {
    use http_body::Body as _;
    let body = req.body();
    !body.is_end_stream() && body.size_hint().exact() != Some(0)
}

/// The `Upgrade` to pass on with `req` (`headers::upgrade_request`), so that a server's `101`
/// makes the connection a tunnel: an HTTP/1.1 request without a body. One with a body (a
/// WebSocket handshake is a `GET` without one, RFC 6455 §4.1) goes on as a plain request, its
/// offer to switch dropped as RFC 9110 §7.8 lets a recipient ignore one: hyper's server hands
/// the connection over only once the body has been read whole, so the client had the `101`
/// while nothing the server sent reached it, for as long as it kept its body back (to
/// `body_read_timeout`, or for ever with `"0"`). Looked at only when the request has an
/// `Upgrade`.
fn upgrade_offer(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    headers::upgrade_request(req.headers()).filter(|_| !has_body(req))
}

/// Whether forwarding `req` would pass on its `Upgrade` (`upgrade_offer`): not to `h2c`, which
/// goes on as a plain request, nor with a body.
pub fn asks_for_tunnel(req: &Request<Incoming>) -> bool {
    upgrade_offer(req).is_some()
}

/// Forwards `req` to a healthy upstream server; a request that fails before any response
/// head arrives is retried once on another healthy server when it can be replayed or none of
/// it was sent, and so is one whose server `marks` says was taken out while it waited for
/// that head. Every failure
/// the server can be blamed for is reported to its checker. A streamed upload's state is
/// put in `watch`, for the gateway to read if the request is dropped before its answer.
#[allow(clippy::manual_async_fn)] // see the module's docs
#[allow(clippy::too_many_arguments)] // each a reference into the request's snapshot
pub fn forward<'a>(
    pool: &'a UpstreamPool,
    up: &'a [bool],
    passive: &'a [Passive],
    marks: &'a Marks,
    mut req: Request<Incoming>,
    client: &'a ClientSide,
    trusted: bool,
    config: &'a Config,
    drain: Option<&'a Drain>,
    watch: &'a std::sync::OnceLock<crate::body::UploadWatch>,
) -> impl Future<Output = Result<Forwarded, Failed>> + Send + 'a {
    async move {
        let timeout = config.upstream.response_timeout;
        let version = req.version();
        let http2 = version == Version::HTTP_2;
        // An HTTP/2 client's request may go to an HTTP/1.1 server on a kept raw socket
        // (`pool::UpstreamPool::request`); gRPC stays on hyper's path, whose HTTP/2 upstreams
        // it needs.
        let relay = http2 && !native_grpc(req.headers());
        let head_wait = if http2 && !relay {
            grpc_head_wait(req.headers(), timeout)
        } else {
            timeout
        };
        // A body its method gives no meaning closes the server's connection after it
        // (`headers::close_after_unmeant_body`); an upgrade is not passed on with any body
        // (`upgrade_offer`).
        let unmeant = unmeant_body(&req);
        let upgrade = upgrade_offer(&req);
        // What the client offered, which a `101` must switch to (the request takes its own).
        let offered = upgrade.clone();
        // Its place among the tunnels is taken before any server is asked, and refused once
        // tunnels hold their share of the bound on upstream sockets.
        let client_upgrade = match upgrade {
            None => None,
            Some(_) => match pool.sockets().tunnel() {
                Ok(place) => Some(upgrade::Client::of(&mut req, place)),
                // An upgrade is asked for with no body (`upgrade_offer`).
                Err(full) => return Err(Failed::upstream(Some(full.into()), None, Rest::Read)),
            },
        };

        // In a block of its own, so that the request's parts, moved into the new request at
        // its end, keep no slot in this future's state while it waits for the response.
        let (first, req, sent, replay, path, hop, replaying) = {
            let (mut parts, body) = req.into_parts();
            let Some(first) = pool.pick(up, None) else {
                let upload = parts.extensions.remove::<crate::park::Upload>();
                let rest = Rest::Back(Body::Stream(body), upload);
                return Err(Failed::upstream(None, None, rest));
            };
            // Decided before the hop-by-hop headers go: `Transfer-Encoding` is one of them.
            let to = pool.servers[first].protocol;
            // An HTTP/2 connection's (only those carry it): its uploads are counted on it.
            let answers = parts.extensions.remove::<Arc<crate::stall::Answers>>();
            let length = buffer_for_replay(&parts, to).filter(|_| client_upgrade.is_none());
            // An HTTP/2 client's bodies read whole share its connection's room; past it they
            // stream (`stall::REPLAY_ROOM`). An HTTP/1.1 connection reads one at a time.
            let replaying = match (length, &answers) {
                (Some(n), Some(answers)) => usize::try_from(n)
                    .ok()
                    .and_then(|n| answers.replaying(n))
                    .map(Some),
                (Some(_), None) => Some(None),
                (None, _) => None,
            };
            let buffer = replaying.is_some();
            // An HTTP/2 client's request that may go on the relay's sockets keeps its fields
            // as they came until its server is known (`Hop`); any other is rewritten now.
            let hop = if relay && !unmeant {
                Some(Hop::new(parts.uri.authority().cloned(), client, trusted))
            } else {
                let authority = parts.uri.authority();
                let headers = &mut parts.headers;
                rewrite(headers, authority, http2, unmeant, upgrade, client, trusted);
                None
            };
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            // Read to its end, a plaintext HTTP/1.1 connection's body lets it park (`park`).
            let upload = parts.extensions.remove::<crate::park::Upload>();
            let (body, sent, held) = if buffer {
                // Bounded by the limit above, and in time by response_timeout: a client that stalls
                // its upload is answered 408, not waited for.
                let collected =
                    tokio::time::timeout(timeout, http_body_util::BodyExt::collect(body)).await;
                if let (Ok(Ok(_)), Some(upload)) = (&collected, &upload) {
                    upload.ended();
                }
                match collected {
                    // Ended in trailers, it is sent with them: again to the same server when it
                    // refuses it unprocessed (`pool::copy_whole`), but not to another (`replay`
                    // keeps bytes alone).
                    Ok(Ok(collected)) => match collected.trailers().cloned() {
                        None => {
                            let bytes = collected.to_bytes();
                            (Body::full(bytes.clone()), None, Some(bytes))
                        }
                        Some(trailers) => {
                            let held = Box::new((Some(collected.to_bytes()), Some(trailers)));
                            (Body::Trailed(held), None, None)
                        }
                    },
                    Ok(Err(e)) => return Err(client_failed(ClientFault::of(&e))),
                    Err(_) => return Err(client_failed(ClientFault::Stalled)),
                }
            } else {
                // Over HTTP/2 the upload keeps its connection counted as in use until its
                // end has been read, after its answer too (`stall::Answers`).
                let open = answers.map(|answers| answers.open());
                // Watched for a reset by h2 (a malformed upload) over HTTP/2 alone: an
                // HTTP/1.1 upload's end is never read once its request is dropped, and a
                // watch would only make its 499 wait (`Unread`).
                let http2 = open.is_some();
                let limit = config.proxy.body_read_timeout;
                let (body, sent) = Body::watched(body, limit, open, upload);
                if let Some(sent) = sent.as_ref().filter(|_| http2) {
                    let _ = watch.set(sent.watch());
                }
                (body, sent, None)
            };

            // A copy for the second attempt, made only when a second attempt is possible:
            // for any method, since one the server never got may be sent elsewhere. An
            // upgrade's too (a WebSocket's handshake has no body): its client's connection is
            // still the proxy's until a `101` comes, so one the server never got can go on.
            let replay = (matches!(body, Body::Empty | Body::Full(_)) && pool.servers.len() > 1)
                .then(|| (parts.method.clone(), parts.headers.clone(), held));
            let mut req = Request::from_parts(parts, body);
            aim(&mut req, &pool.servers[first], path.clone(), hop.is_none());
            (first, req, sent, replay, path, hop, replaying.flatten())
        };
        // Its share of the connection's room is held as long as its copy for a second try.
        let _replaying = replaying;
        let (mut req, mut server, mut sent, mut replay) = (req, first, sent, replay);
        // The request itself, given back by the pool when it failed before any of it was sent
        // (`pool::UpstreamPool::request`): boxed, so that only such a failure pays for its room.
        let mut unsent: Option<Box<Request<Body>>> = None;
        // Its fields rewritten for the hop already (`Hop::apply`), once it was given back.
        let mut rewritten = false;
        // One call site for both attempts: the future of each would otherwise have a slot of its
        // own in this one's state, which every forwarded request allocates and copies.
        loop {
            // Watched for a mark-down only when it was healthy as the request set out: one
            // sent to a server already down (`force-open`, a bypass during an outage) knew.
            // And only an idempotent request: a `POST` the server has may still be answered
            // (as the relay judges it).
            let healthy = up.get(server).copied().unwrap_or(true);
            let watch = (healthy && idempotent(req.method())).then_some(marks);
            let hop = hop.as_ref().filter(|_| !rewritten);
            let sending = send(
                pool,
                server,
                req,
                (head_wait, drain),
                sent.as_mut(),
                watch,
                hop,
                &mut unsent,
            );
            let error = match sending.await {
                // A switch nobody asked for (or to nothing) leaves the client a head it cannot
                // use: the server failed, as the relay judges it too. So does one to a
                // protocol the client did not offer (RFC 9110 §7.8), whose tunnel would carry
                // the client's next bytes to the server as they are, past every rule here.
                Ok(resp)
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && (client_upgrade.is_none()
                            || !offered.as_ref().is_some_and(|asked| {
                                headers::switch_offered(asked, resp.headers().get(header::UPGRADE))
                            })) =>
                {
                    UpstreamError::Failed {
                        server: pool.servers[server].to_string(),
                        source: pool::SendError::Protocol(pool::UNASKED_SWITCH),
                    }
                }
                Ok(resp) => {
                    // An upload that stalled as the head came: the answer may be cut short
                    // already, and the stall is the client's.
                    let resume = match sent.as_ref().map(SentSignal::answered) {
                        Some(Answered::ClientFailed(fault)) => return Err(client_failed(fault)),
                        Some(Answered::Streaming(resume)) => Some(resume),
                        Some(Answered::Whole) | None => None,
                    };
                    let stall = config.upstream.read_timeout;
                    let name = &pool.names[server];
                    // Only a body that can break off ends a gRPC call with its status
                    // (`Body::timed`): an answer held whole skips the lookup.
                    let grpc = if resp.body().can_break() {
                        grpc_answer(resp.headers(), http2)
                    } else {
                        crate::body::Grpc::No
                    };
                    return Ok(finish(
                        resp,
                        (server, name),
                        client_upgrade,
                        stall,
                        resume,
                        (grpc, version),
                    ));
                }
                Err(e @ UpstreamError::Stopping { .. }) => {
                    let rest = Rest::of(sent.as_ref());
                    return Err(Failed::upstream(Some(e), Some(server), rest));
                }
                Err(e) => e,
            };
            // Only the first server's: there is one second attempt at most.
            let back = unsent.take().filter(|_| server == first);
            // The client's own doing (a stalled or unreadable upload): answered 408 or 400,
            // and no server's fault.
            if let Some(fault) = sent.as_ref().and_then(SentSignal::client_failure) {
                tracing::debug!(server = %pool.servers[server], "{error}; the client's request body failed");
                return Err(client_failed(fault));
            }
            // Only what the upstream can be blamed for counts against its health: a client that
            // stalls or aborts its own upload must not be able to take servers out.
            let body_complete = sent.as_ref().is_none_or(SentSignal::complete);
            if matches!(error, UpstreamError::Connect { .. }) || body_complete {
                report(passive, server, &error);
            }
            // A timeout is retried too, as nginx's default `proxy_next_upstream error timeout`
            // does: the request is idempotent, so a server still working on it does no harm, and
            // a hung server must not cost the client its answer while another one is healthy.
            // The copy is taken: there is one second attempt at most.
            // Not when the proxy itself is short (`local_exhaustion`: at the bound on upstream
            // sockets, out of descriptors or memory): another server's connection would wait
            // for the same room or fail alike, the client twice as long for its outage
            // answer, and a retry would be counted for a server whose failures this is not.
            // An idempotent request once, and any other (a `POST` without a body, or one
            // held whole) only when the server never got it: its connection was not made.
            // A request given back unsent goes whatever its method and body, a streamed
            // one (gRPC, a chunked upload) too: nothing of it left.
            // An upgrade only when the server never got it: a server that did may have
            // switched already (its `101` lost on the way), and a second tunnel for one
            // client is nobody's to open.
            let never_got = matches!(error, UpstreamError::Connect { .. });
            let second = (back.is_some()
                || replay.as_ref().is_some_and(|(method, ..)| {
                    never_got || (client_upgrade.is_none() && idempotent(method))
                }))
            .then_some(())
            .filter(|_| !local_exhaustion(&error))
            .and_then(|()| pool.pick(up, Some(first)))
            // `up` is as the request found it: one taken out since is not tried.
            .filter(|&next| !marks.is_down(&pool.names[next]));
            let Some(second) = second else {
                let rest = match back {
                    // A streamed body (it has a `sent`) given back unread. One buffered for
                    // replay (`Body::Full`/`Trailed`) was read whole already, its `100
                    // Continue` sent: `Read`, and no `Connection: close`.
                    Some(back) if sent.is_some() => Rest::Back(back.into_body(), None),
                    _ => Rest::of(sent.as_ref()),
                };
                return Err(Failed::upstream(Some(error), Some(server), rest));
            };
            let to = &pool.servers[second];
            let from = &pool.servers[first];
            let back =
                back.and_then(|mut b| reaim(&mut b, hop, from, to, path.clone()).then_some(b));
            let again = match (back, replay.take()) {
                // The same body, its signal with it.
                (Some(back), _) => {
                    rewritten |= hop.is_some();
                    *back
                }
                (None, Some((method, headers, held))) => {
                    let mut again = Request::new(held.map_or(Body::Empty, Body::full));
                    *again.method_mut() = method;
                    *again.headers_mut() = headers;
                    aim(&mut again, to, path.clone(), hop.is_none());
                    sent = None;
                    again
                }
                (None, None) => {
                    let rest = Rest::of(sent.as_ref());
                    return Err(Failed::upstream(Some(error), Some(server), rest));
                }
            };
            if let Some(more) = said(passive, Some(server), Line::Retried) {
                tracing::warn!(error = %error, "retrying on {}{more}", pool.servers[second]);
            }
            retried(passive, server);
            (req, server) = (again, second);
        }
    }
}

/// Points a request given back unsent (`pool::UpstreamPool::request`) at `server`, as `aim`
/// points a new one: its fields are rewritten for the hop already, and only its `Host` is the
/// first server's. An `h2c` server took it out (`aim_host`): it is the client's again from
/// `hop`'s authority; false, and the request not to be sent there, when it cannot be had
/// back for a server that needs one. A `Host` that `aim_host` gave a request that named none
/// (an HTTP/1.0 client's) is the first server's own, and becomes `server`'s.
fn reaim(
    req: &mut Request<Body>,
    hop: Option<&Hop>,
    first: &Upstream,
    server: &Upstream,
    path: PathAndQuery,
) -> bool {
    if hop.is_none()
        && first.protocol != Protocol::H2c
        && req
            .headers()
            .get(header::HOST)
            .is_some_and(|h| h.as_bytes() == first.authority.as_str().as_bytes())
    {
        req.headers_mut().remove(header::HOST);
        aim(req, server, path, true);
        return true;
    }
    if let Some(host) = hop
        .and_then(|hop| hop.authority.as_ref())
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    if server.protocol != Protocol::H2c && !req.headers().contains_key(header::HOST) {
        return false;
    }
    aim(req, server, path, true);
    true
}

fn client_failed(fault: ClientFault) -> Failed {
    Failed {
        error: None,
        server: None,
        client: Some(fault),
        rest: Rest::Lost,
    }
}

/// Points a request at `server`: its URI (the path alone for an `http://` server, whose
/// connection is the server's already), the HTTP version its protocol speaks, and, with
/// `host`, its `Host` (`aim_host`; a `Hop`'s is set with the rest of its fields).
fn aim(req: &mut Request<Body>, server: &Upstream, path: PathAndQuery, host: bool) {
    *req.uri_mut() = match server.protocol {
        Protocol::Http => Uri::from(path),
        Protocol::Https | Protocol::H2c => upstream_uri(server, path),
    };
    *req.version_mut() = match server.protocol {
        Protocol::H2c => Version::HTTP_2,
        Protocol::Http | Protocol::Https => Version::HTTP_11,
    };
    if host {
        aim_host(req.headers_mut(), server);
    }
}

/// A rewritten request's `Host` for `server`. An `h2c` server gets the client's host only as
/// `X-Forwarded-Host`: HTTP/2 names the host in `:authority`, which is the server's own, and a
/// different `Host` would make the request malformed (RFC 9113 §8.3.1). An `https://`
/// server's request is made for HTTP/1.1 here, the client's `Host` kept: the pool makes it
/// name the client's host as `:authority` instead when the server chose HTTP/2, which is
/// known only there (`pool::UpstreamPool::https`).
fn aim_host(headers: &mut http::HeaderMap, server: &Upstream) {
    match server.protocol {
        Protocol::H2c => {
            headers.remove(header::HOST);
        }
        // An HTTP/1.0 client may name no host, but the hop is HTTP/1.1, which needs one: the
        // server's own, as nginx's default `$proxy_host` (the pool's client adds none).
        Protocol::Http | Protocol::Https if !headers.contains_key(header::HOST) => {
            if let Ok(host) = HeaderValue::from_str(server.authority.as_str()) {
                headers.insert(header::HOST, host);
            }
        }
        Protocol::Http | Protocol::Https => {}
    }
}

/// Rewrites a request's fields for the upstream hop, but its `Host` (`aim_host`): the host it
/// names, HTTP/2 cookie crumbs joined, hop-by-hop fields out, `Expect` out, the forwarding
/// fields. `authority`: what the request's target names as its host; `http2`: it came over
/// HTTP/2; `unmeant`: it carries a body its method gives no meaning; `upgrade`: the upgrade
/// passed on.
fn rewrite(
    headers: &mut http::HeaderMap,
    authority: Option<&http::uri::Authority>,
    http2: bool,
    unmeant: bool,
    upgrade: Option<HeaderValue>,
    client: &ClientSide,
    trusted: bool,
) {
    // HTTP/2 clients name the host in :authority, an HTTP/1.1 absolute-form target in
    // itself; either is the host of the request, whatever `Host` says (RFC 9113 §8.3.1, RFC
    // 9112 §3.2.2), and the upstream hop needs it as Host.
    if let Some(authority) = authority {
        // Room for it and the four `headers::set_forwarded` writes, made at once: an HTTP/2
        // request's map is made to the size of what the client sent, and grew up to three
        // times on the way (rehashing each time).
        let _ = headers.try_reserve(5);
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            headers.insert(header::HOST, host);
        }
    }
    if http2 {
        headers::join_cookies(headers);
        // h2 resets a stream whose lengths differ, but passes equal ones on as they came: one
        // line, as hyper's HTTP/1.1 server keeps one (RFC 9110 §8.6 lets a recipient do so).
        headers::one_length(headers);
    }
    headers::strip_hop_by_hop(headers);
    if unmeant {
        headers::close_after_unmeant_body(headers);
    }
    // This hop answered the expectation already: hyper sends `100 Continue` to the client as
    // soon as the body is read, which forwarding starts at once.
    headers.remove(header::EXPECT);
    if let Some(up) = upgrade {
        headers::restore_upgrade(headers, up);
    }
    headers::set_forwarded(headers, client, trusted);
}

/// An HTTP/2 client's request, whose fields are rewritten only once its server is known
/// (`pool::UpstreamPool::request`): for an HTTP/1.1 server on the relay's sockets they are
/// written straight from the fields hyper's server read (`write`), with no rewritten map;
/// for any other, the map is rewritten as any request's (`apply`). The request's URI is
/// already `aim`'s, with no authority: this keeps the client's.
pub struct Hop<'a> {
    authority: Option<http::uri::Authority>,
    client: &'a ClientSide,
    trusted: bool,
}

impl<'a> Hop<'a> {
    /// `authority`: the host the client's target names (its `:authority`); `trusted`: the peer
    /// is in `trusted_proxies`.
    pub fn new(
        authority: Option<http::uri::Authority>,
        client: &'a ClientSide,
        trusted: bool,
    ) -> Hop<'a> {
        Hop {
            authority,
            client,
            trusted,
        }
    }

    /// Rewrites `headers` for `server` as `forward` rewrites any request's (`rewrite`, then
    /// `aim_host`).
    pub fn apply(&self, headers: &mut http::HeaderMap, server: &Upstream) {
        let authority = self.authority.as_ref();
        rewrite(
            headers,
            authority,
            true,
            false,
            None,
            self.client,
            self.trusted,
        );
        aim_host(headers, server);
    }

    /// Writes the lines of `headers` as `apply` makes them for `server`, an HTTP/1.1 one, and
    /// hyper's HTTP/1.1 client writes them (`headers::write_rewritten`); false, and nothing
    /// written, for a request left to `apply`.
    pub fn write(&self, headers: &http::HeaderMap, server: &Upstream, out: &mut Vec<u8>) -> bool {
        let authority = self.authority.as_ref().map(http::uri::Authority::as_str);
        let (client, trusted) = (self.client, self.trusted);
        let server = server.authority.as_str();
        headers::write_rewritten(out, headers, authority, client, trusted, server)
    }
}

fn upstream_uri(server: &Upstream, path: PathAndQuery) -> Uri {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(server.scheme.clone());
    uri.authority = Some(server.authority.clone());
    uri.path_and_query = Some(path);
    Uri::from_parts(uri).unwrap_or_default()
}

/// Tells the server's checker that a request to it failed, and counts it in the server's
/// metrics. A failure of the proxy's own (out of file descriptors or memory, or at the bound
/// on upstream sockets) is not the server's: counted against it, a flood of clients would
/// take a healthy application out and announce an outage. Nor is a failed connection told
/// twice: one shared by the requests that waited for it (`pool::SendError::Shared`) is told
/// by the request that opened it, though each of them failed and is counted.
pub(crate) fn report(passive: &[Passive], server: usize, error: &UpstreamError) {
    if local_exhaustion(error) {
        return;
    }
    let Some(passive) = passive.get(server) else {
        return;
    };
    let shared = matches!(
        error,
        UpstreamError::Connect {
            source: pool::SendError::Shared(_),
            ..
        }
    );
    // A server taken out by its checks has nothing more to tell them.
    let told = !shared && !matches!(error, UpstreamError::MarkedDown { .. });
    let report = told.then(|| crate::health::Report {
        why: error.to_string(),
        inconclusive: inconclusive(error),
    });
    passive.failed(failure_reason(error), report);
}

/// `error` in the few kinds the metrics tell apart.
fn failure_reason(error: &UpstreamError) -> UpstreamFailure {
    match error {
        UpstreamError::Connect { .. } => UpstreamFailure::Connect,
        UpstreamError::Timeout { .. }
        | UpstreamError::Unread { .. }
        | UpstreamError::MarkedDown { .. } => UpstreamFailure::Timeout,
        UpstreamError::Failed { .. } => UpstreamFailure::Error,
        // Never a server's (`local_exhaustion`): not reported.
        UpstreamError::Tunnels(_) => UpstreamFailure::Connect,
        // Not reported either (`forward`, `relay::answer`).
        UpstreamError::Stopping { .. } => UpstreamFailure::Timeout,
    }
}

/// Counts a request that failed on `server` and is sent again to another.
pub(crate) fn retried(passive: &[Passive], server: usize) {
    if let Some(passive) = passive.get(server) {
        passive.retried();
    }
}

/// The lines a failed forward is logged with: each is written at most once a second for a
/// server, the next saying how many were not (`said`). A server that resets, closes or
/// answers garbage to every request while its health path answers stays in, and wrote one
/// or two lines per request: 29,088 in 25 s at 1,000 requests a second, with the access log
/// off, which buried the health and mode lines. `/metrics` counts every one.
#[derive(Clone, Copy)]
pub(crate) enum Line {
    /// "forwarding failed; answering with the outage response"
    Failed,
    /// "retrying on …", about the server that failed.
    Retried,
    /// "upstream answer intercepted" (`upstream.intercept_statuses`)
    Intercepted,
    /// "… the answer is cut short" (`upstream.read_timeout`)
    CutShort,
    /// "a gRPC answer broke off …"
    BrokeOff,
    /// "no upstream server to forward to …", which names none.
    NoServer,
}

pub(crate) const LINES: usize = 6;

/// The lines of failures no server's `Passive` keeps: those that name no server, and those
/// said where only the server's name is at hand (`body::Timed`), for all servers together.
static ELSEWHERE: std::sync::Mutex<[crate::listener::Lasting; LINES]> =
    std::sync::Mutex::new([const { crate::listener::Lasting::new() }; LINES]);

/// Whether `line`, about `server`, is to be written now: with what to add to it, how many
/// were not since the last one that was. Taken only on a failure's way: a lock shared by the
/// worker threads, per server.
pub(crate) fn said(passive: &[Passive], server: Option<usize>, line: Line) -> Option<More> {
    let unsaid = match server.and_then(|s| passive.get(s)) {
        Some(passive) => passive.tell(line),
        None => ELSEWHERE.lock().unwrap_or_else(|e| e.into_inner())[line as usize]
            .tell(std::time::Instant::now()),
    };
    unsaid.map(More)
}

/// How many lines were not written since the last one: " (N more since the last line)", or
/// nothing for none.
pub(crate) struct More(pub u64);

impl std::fmt::Display for More {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} more since the last line)"),
        }
    }
}

/// Whether the failure may not mean the server is down (`health::Report::inconclusive`): no
/// response head within `response_timeout`, no connection within `connect_timeout` (the
/// kernel's own connect timeout included), or any failure after the server took the
/// connection (reset or closed before the answer, a malformed, oversized or unasked answer).
/// A request can bring those about itself: a page that crashes its worker, a worker killed
/// for a slow request. Counted, a few of them from any client took a single server out, and
/// with it the whole site into `outage`. The active check, which asks a path of its own,
/// speaks for the server, and such a failure brings it forward; a refused or failed connection
/// still counts, as no request causes that.
fn inconclusive(error: &UpstreamError) -> bool {
    if matches!(
        error,
        UpstreamError::Timeout { .. }
            | UpstreamError::Unread { .. }
            | UpstreamError::MarkedDown { .. }
            | UpstreamError::Failed { .. }
    ) {
        return true;
    }
    // A connection that timed out: the kernel's own connect timeout, or a TLS handshake past
    // `connect_timeout`.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether `e`, or one of its causes, says that this process or host ran out of something a
/// new connection needs (file descriptors, memory, room under the bound on upstream sockets,
/// `sockets::LimitReached`): the proxy's trouble, which says nothing of the server's health,
/// and which a flood of clients could otherwise turn into an outage of the whole site. Not `EADDRNOTAVAIL`: besides local ports running out, it is what
/// an IPv6 server gets on a host without IPv6, which must show as the server down.
pub fn local_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    if sockets::reached(e)
        || matches!(
            e.downcast_ref::<UpstreamError>(),
            Some(UpstreamError::Tunnels(_))
        )
    {
        return true;
    }
    let mut cause = Some(e);
    while let Some(c) = cause {
        let errno = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error);
        if matches!(
            errno,
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        ) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Sends one request to one server, waiting at most `response_timeout` for the head once the
/// request body (if it streams) has been sent whole, as nginx's `proxy_read_timeout` does,
/// and, with `watch`, no longer than the server stays in: taken out by its health checks
/// meanwhile, it will not answer either (`state::marks`), nor once the drain nears its end
/// (`Drain::ending`: `Cut::Ending`). A request that failed before any of it left is put in
/// `unsent`.
#[allow(clippy::manual_async_fn)] // see the module's docs
#[allow(clippy::too_many_arguments)] // each a reference into the request's state
fn send<'a>(
    pool: &'a UpstreamPool,
    server: usize,
    req: Request<Body>,
    (timeout, drain): (Duration, Option<&'a Drain>),
    sent: Option<&'a mut SentSignal>,
    watch: Option<&'a Marks>,
    hop: Option<&'a Hop<'a>>,
    unsent: &'a mut Option<Box<Request<Body>>>,
) -> impl Future<Output = Result<Response<Body>, UpstreamError>> + Send + 'a {
    async move {
        let name = || pool.servers[server].to_string();
        // One pinned response future for both cases: moving it into `tokio::time::timeout` would
        // keep a second copy of its kilobyte in this future's state, which every forwarded
        // request allocates and copies.
        // Set once the deadline gave up on the answer's head, before `response` is dropped: an
        // HTTP/2 connection it waited on is then let go (`pool::Waiting`), and only then (not
        // when its client left, nor when a long upload simply took its time).
        let gave_up = std::sync::atomic::AtomicBool::new(false);
        let response = pool.request(server, req, hop, unsent, &gave_up);
        tokio::pin!(response);
        let deadline = async {
            // The drain's end is watched from the start by a request sent during a drain, and
            // from the first look by one still waiting then: a waiter on the drain's channel
            // per request would take its lock twice. A drain longer than the first look (and
            // its `GRPC_END_AHEAD`) finds every request sent before it watching.
            let mut ending = drain.filter(|d| d.started()).map(ending_of);
            if let Some(sent) = sent {
                // A body that ends in error drops the sender: the timer starts then too. Until
                // then, a server that takes nothing of the body for `timeout` (its flow-control
                // window kept shut, its socket full, no stream free for it) has stopped, as
                // nginx's `proxy_send_timeout` finds it: the request waited for it for ever,
                // its client and both connections held.
                let mut seen = 0;
                let tick = tokio::time::sleep(timeout);
                tokio::pin!(tick);
                loop {
                    let ticked = tokio::select! {
                        biased;
                        _ = &mut sent.rx => false,
                        () = ended(&mut ending) => return Cut::Ending,
                        () = tick.as_mut() => true,
                    };
                    if !ticked {
                        break;
                    }
                    if sent.unread_since(&mut seen) {
                        return Cut::Unread;
                    }
                    let next = tick.deadline() + timeout;
                    tick.as_mut().reset(next);
                }
            }
            // In two stages, on one timer: a request answered within the first look (nearly
            // all) costs what one sleep of `timeout` did; one still waiting then watches its
            // server's mark and the drain's end for the rest (boxed: only those pay for its
            // room).
            let look = marks::first_look(timeout);
            let sleep = tokio::time::sleep(look);
            tokio::pin!(sleep);
            tokio::select! {
                biased;
                () = sleep.as_mut() => {}
                () = ended(&mut ending) => return Cut::Ending,
            }
            if look < timeout {
                let until = sleep.deadline() + (timeout - look);
                sleep.as_mut().reset(until);
                if ending.is_none() {
                    ending = drain.map(ending_of);
                }
                let down = async {
                    match watch {
                        Some(marks) => Box::pin(marks.marked_down(&pool.names[server])).await,
                        None => std::future::pending().await,
                    }
                };
                return tokio::select! {
                    biased;
                    () = sleep => Cut::Late,
                    () = down => Cut::Down,
                    () = ended(&mut ending) => Cut::Ending,
                };
            }
            Cut::Late
        };
        // Biased: a response that is ready when the deadline passes is taken.
        let outcome = tokio::select! {
            biased;
            r = &mut response => Ok(r),
            cut = deadline => Err(cut),
        };
        if matches!(outcome, Err(Cut::Late | Cut::Unread)) {
            gave_up.store(true, std::sync::atomic::Ordering::Relaxed);
        }
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
            Err(Cut::Late) => Err(UpstreamError::Timeout {
                server: name(),
                timeout,
            }),
            Err(Cut::Unread) => Err(UpstreamError::Unread {
                server: name(),
                timeout,
            }),
            Err(Cut::Down) => Err(UpstreamError::MarkedDown { server: name() }),
            Err(Cut::Ending) => Err(UpstreamError::Stopping { server: name() }),
        }
    }
}

/// The drain's end, watched (`send`): boxed, so that the request's future, which every
/// forwarded request allocates and copies, keeps a pointer to it and not the waiter itself.
type Ending = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

fn ending_of(drain: &Drain) -> Ending {
    let mut ending = drain.ending();
    Box::pin(async move { ending.fired().await })
}

/// Resolves once the drain nears its end (`Drain::ending`), when watched.
fn ended(ending: &mut Option<Ending>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match ending {
        Some(ending) => ending.as_mut().poll(cx),
        None => std::task::Poll::Pending,
    })
}

/// Why the wait for a response head ended without one.
enum Cut {
    /// `response_timeout` passed.
    Late,
    /// The server took nothing of a streamed body for `response_timeout`.
    Unread,
    /// The server was taken out by its health checks.
    Down,
    /// The drain nears its end.
    Ending,
}

/// Whether an answer is gRPC over HTTP/2 (`application/grpc`, `+proto`, `;charset=…`), whose
/// client reads its status in HTTP trailers. Not gRPC-Web (`application/grpc-web…`), whose
/// status is a frame of the body and whose browsers never see HTTP trailers: for it, and for
/// any HTTP/1.1 client, trailers added to a broken answer would be dropped and leave it
/// looking complete.
pub(crate) fn native_grpc(headers: &http::HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.get(..GRPC.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(GRPC))
            && matches!(v.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// What a broken answer with these headers ends with (`Body::timed`): native gRPC's trailers
/// to an HTTP/2 client; gRPC-Web's status frame (to any client: it is part of the body) when
/// the answer has no `Content-Length`, which a frame added would overrun.
fn grpc_answer(headers: &http::HeaderMap, http2: bool) -> crate::body::Grpc {
    use crate::body::Grpc;
    const WEB: &[u8] = b"application/grpc-web";
    const TEXT: &[u8] = b"-text";
    if http2 && native_grpc(headers) {
        return Grpc::Native;
    }
    let Some(v) = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes) else {
        return Grpc::No;
    };
    let starts = |v: &[u8], with: &[u8]| {
        v.get(..with.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(with))
    };
    if !starts(v, WEB) || headers.contains_key(header::CONTENT_LENGTH) {
        return Grpc::No;
    }
    let rest = &v[WEB.len()..];
    let ends = |rest: &[u8]| matches!(rest, [] | [b'+' | b';' | b' ' | b'\t', ..]);
    if ends(rest) {
        Grpc::Web
    } else if starts(rest, TEXT) && ends(&rest[TEXT.len()..]) {
        Grpc::WebText
    } else {
        Grpc::No
    }
}

/// Prepares the upstream's response for the client, and the tunnel if it switched protocols;
/// its body may stall no longer than `stall` (`upstream.read_timeout`, read from the config
/// in force, so that a reload changes it), holds `resume` (an upload still under way) until
/// it ends, and, for a `grpc` answer, ends with `UNAVAILABLE` if it breaks off
/// (`Body::timed`). `server`: its index, and its name for the log. `client`: the client's
/// version.
fn finish(
    resp: Response<Body>,
    (server, name): (usize, &Arc<str>),
    client_upgrade: Option<upgrade::Client>,
    stall: Option<Duration>,
    resume: Option<Resume>,
    (grpc, client): (crate::body::Grpc, Version),
) -> Forwarded {
    let http2 = client == Version::HTTP_2;
    let mut resp = resp.map(|body| Body::timed(body, name, stall, resume, grpc));
    // A `Content-Length` beside a transfer coding is gone already: hyper's client removes it
    // since 1.13 (RFC 9112 §6.3), which Cargo.toml requires; before, hyper's server framed the
    // body by it and cut it short (`relay::every_framing_reaches_the_client_as_through_hyper_on_one_connection`).
    // A length given as a list (`11, 11`) or on several lines, which hyper's client takes
    // when its values agree, goes on as one line: hyper's server would write the first line as
    // given (and refuse a second line beside a `HEAD`'s answer, closing the connection). One
    // that is no number, which only a `HEAD`'s answer, a 204 or a 304 gets past hyper's client,
    // goes: an HTTP/2 client would refuse the answer.
    headers::one_length(resp.headers_mut());
    // A 204 has no body and may say no length (RFC 9110 §8.6): hyper's HTTP/1.1 server drops
    // one, but an HTTP/2 client refuses the whole answer for it (curl, nghttp), as nginx's
    // HTTP/2 side never sends it.
    if resp.status() == StatusCode::NO_CONTENT {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    // The server's version is its hop's: an HTTP/1.0 answer goes to an HTTP/1.1 client as
    // HTTP/1.1, chunked when it has no length, so that the client's connection stays open
    // (hyper's server answers an HTTP/1.0 client as HTTP/1.0 whatever this says; the relay
    // writes HTTP/1.1 too). But an answer without a length to an HTTP/1.0 client can only end
    // with the connection: said as HTTP/1.1, hyper's server tells a client that asked for
    // keep-alive `connection: keep-alive` and then closes, and the client, believing it, may
    // send its next request into the closing connection. Said as HTTP/1.0, hyper writes no
    // `keep-alive` (a close, for HTTP/1.0), as nginx says `Connection: close`.
    let unframed = || {
        use http_body::Body as _;
        let body = resp.body();
        !body.is_end_stream() && body.size_hint().exact().is_none()
    };
    if client == Version::HTTP_10 && unframed() {
        *resp.version_mut() = Version::HTTP_10;
    } else if resp.version() == Version::HTTP_10 {
        *resp.version_mut() = Version::HTTP_11;
    }
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upgraded_to = switching
        .then(|| resp.headers().get(header::UPGRADE).cloned())
        .flatten();
    // A 426 must say which protocol the server requires (RFC 9110 §15.5.22), in `Upgrade`,
    // which is hop-by-hop: put back for the client's hop, as the relay writes it. HTTP/2 has
    // no such header (hyper's server would drop it).
    let required = (resp.status() == StatusCode::UPGRADE_REQUIRED && !http2)
        .then(|| resp.headers().get(header::UPGRADE).cloned())
        .flatten();
    headers::strip_hop_by_hop(resp.headers_mut());
    if let Some(proto) = required {
        headers::restore_upgrade(resp.headers_mut(), proto);
    }
    if let (Some(client_upgrade), Some(proto)) = (client_upgrade, upgraded_to) {
        let websocket = headers::names_websocket(&proto);
        headers::restore_upgrade(resp.headers_mut(), proto);
        let upstream = hyper::upgrade::on(&mut resp);
        let log = upgrade::spawn_tunnel(client_upgrade, upstream, websocket, stall);
        resp.extensions_mut().insert(log);
    }
    Forwarded {
        response: resp,
        server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_calls_deadline_extends_the_wait_for_its_head() {
        let wait = |content_type: &str, timeout: Option<&str>| {
            let mut h = http::HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(content_type).unwrap(),
            );
            if let Some(t) = timeout {
                h.insert("grpc-timeout", HeaderValue::from_str(t).unwrap());
            }
            grpc_head_wait(&h, Duration::from_secs(60))
        };
        let secs = Duration::from_secs;
        assert_eq!(wait("application/grpc", None), secs(60));
        assert_eq!(
            wait("application/grpc", Some("5S")),
            secs(60),
            "never shorter"
        );
        assert_eq!(wait("application/grpc", Some("5M")), secs(300));
        assert_eq!(wait("application/grpc+proto", Some("120000m")), secs(120));
        assert_eq!(wait("application/grpc", Some("24H")), secs(3600), "capped");
        assert_eq!(wait("application/grpc", Some("5X")), secs(60), "unparsed");
        assert_eq!(
            wait("application/grpc-web", Some("5M")),
            secs(60),
            "not gRPC-Web"
        );
        assert_eq!(wait("application/json", Some("5M")), secs(60));
    }

    #[test]
    fn a_grpc_answer_is_told_what_it_ends_with_if_it_breaks() {
        use crate::body::Grpc;
        let kind = |t: &str, length: bool, http2: bool| {
            let mut h = http::HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(t).unwrap());
            if length {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
            }
            grpc_answer(&h, http2)
        };
        assert_eq!(kind("application/grpc", false, true), Grpc::Native);
        assert_eq!(kind("application/grpc", false, false), Grpc::No);
        for http2 in [false, true] {
            assert_eq!(kind("application/grpc-web", false, http2), Grpc::Web);
            assert_eq!(kind("Application/gRPC-Web+proto", false, http2), Grpc::Web);
            assert_eq!(
                kind("application/grpc-web-text", false, http2),
                Grpc::WebText
            );
            assert_eq!(
                kind("application/grpc-web-text+proto", false, http2),
                Grpc::WebText
            );
            assert_eq!(
                kind("application/grpc-web", true, http2),
                Grpc::No,
                "its length"
            );
            assert_eq!(kind("application/grpc-webfoo", false, http2), Grpc::No);
            assert_eq!(kind("text/html", false, http2), Grpc::No);
        }
    }

    #[test]
    fn grpc_is_told_from_grpc_web() {
        let typed = |t: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(t).unwrap());
            native_grpc(&h)
        };
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC;charset=utf-8",
        ] {
            assert!(typed(yes), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/grpc-web-text+proto",
            "application/json",
        ] {
            assert!(!typed(no), "{no}");
        }
        assert!(!native_grpc(&http::HeaderMap::new()));
    }

    /// Sent again after the server may have acted on them: only idempotent methods (RFC 9110
    /// §9.2.2). Any method goes to another server when the first never got it.
    #[test]
    fn which_requests_are_sent_again() {
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
            assert_eq!(idempotent(&method), want, "{method}");
        }
    }

    #[test]
    fn which_bodies_are_held_for_a_retry() {
        let parts = |method: Method, version: Version, headers: &[(&str, &str)]| {
            let mut b = Request::builder().method(method).version(version);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        let h11 = Version::HTTP_11;
        let length = |n: &'static str| [("content-length", n)];
        // (request, held for an `http://` server, held for an HTTP/2 one)
        let table = [
            (parts(Method::PUT, h11, &length("10")), true, true),
            (parts(Method::PUT, h11, &length("65536")), true, true),
            (parts(Method::PUT, h11, &length("65537")), false, false),
            (parts(Method::PUT, h11, &length("0")), false, false),
            (parts(Method::PUT, h11, &length("ten")), false, false),
            // An HTTP/2 server says which streams it never processed, whatever their method.
            (parts(Method::POST, h11, &length("10")), false, true),
            (parts(Method::PATCH, h11, &length("10")), false, true),
            (parts(Method::POST, h11, &length("65537")), false, false),
            (
                parts(Method::PUT, h11, &[("transfer-encoding", "chunked")]),
                false,
                false,
            ),
            // An HTTP/2 client's body is held with its trailers, if any (`Body::Trailed`).
            (
                parts(Method::DELETE, Version::HTTP_2, &length("10")),
                true,
                true,
            ),
            (
                parts(Method::POST, Version::HTTP_2, &length("10")),
                false,
                true,
            ),
        ];
        for (i, (p, http, h2)) in table.iter().enumerate() {
            assert_eq!(
                buffer_for_replay(p, Protocol::Http).is_some(),
                *http,
                "case {i}: {p:?}"
            );
            for to in [Protocol::H2c, Protocol::Https] {
                assert_eq!(
                    buffer_for_replay(p, to).is_some(),
                    *h2,
                    "case {i} to {to:?}: {p:?}"
                );
            }
        }
    }
}
