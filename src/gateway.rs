//! The per-request service: load the snapshot once, then answer or forward.
//!
//! Reads only the `Snapshot`; it never talks to the control plane. The access log line is
//! written when the response body is finished (or abandoned), like nginx's `$request_time`
//! (for a holding response written without hyper, `write_held`, once it is encoded, whole),
//! and costs nothing when `log.access_log` is off.

use crate::body::{Body, ClientFault};
use crate::forward::{self, headers::ClientSide};
use crate::hold::bypass;
use crate::hold::fields::Fields;
use crate::metrics::Outcome;
use crate::pending::Pending;
use crate::reserved;
use crate::state::{Snapshot, StateHandle};
use http::header::{self, HeaderMap};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

/// What the gateway knows about one client connection.
pub struct Conn {
    pub peer: SocketAddr,
    /// What forwarding tells the upstream of it, whether it came over TLS included.
    pub client: ClientSide,
    /// Its place among its client's connections not yet past their first request
    /// (`proxy.max_pending_per_client`), until its first request arrives (`arrived`) or it
    /// closes: every connection's handlers hold its `Conn`, which goes when they all have.
    pub(crate) pending: Pending,
    /// The listeners' drain, at which a stream of server-sent events forwarded on this
    /// connection ends at its next event boundary (`forward::events`); none where no
    /// listener serves it.
    pub(crate) drain: Option<Arc<crate::shutdown::Drain>>,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool) -> Conn {
        let ip = crate::config::canonical_ip(peer.ip());
        let peer_value = HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Conn {
            peer,
            client: ClientSide {
                peer: peer_value,
                https: tls,
            },
            pending: Pending::default(),
            drain: None,
        }
    }

    /// A request arrived on this connection, its head whole: it is past its first. Called
    /// by each way a request is served (hyper's, the relay's, held answers written without
    /// hyper); after the first, an atomic load.
    #[inline]
    pub fn arrived(&self) {
        self.pending.end(self.peer.ip());
    }

    /// Whether the client came over TLS.
    pub fn tls(&self) -> bool {
        self.client.https
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.pending.end(self.peer.ip());
    }
}

/// The answer to one request: ready at once (held, reserved, redirected, refused), or to come
/// from the upstream. Only forwarding needs a future with state of its own; it is boxed so
/// that an idle connection does not keep a slot of its size (hyper keeps one per connection),
/// and a held request pays neither that allocation nor the copy of that state.
///
/// The future is a trait object so that the type can be named: a parked connection keeps its
/// service, a named type (`park::Gateway`), and a closure's would hold the state handle and the
/// connection a second time beside `fast`'s. One indirect call per poll of a forwarded request.
pub enum Reply {
    Ready(Option<Response<Body>>),
    Later(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

impl Future for Reply {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Reply::Ready(resp) => Poll::Ready(Ok(resp.take().unwrap_or_else(|| {
                // Polled again after completion: hyper never does; answer something sane.
                reserved::plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
            }))),
            Reply::Later(f) => f.as_mut().poll(cx).map(Ok),
        }
    }
}

pub fn handle(state: &StateHandle, conn: &Arc<Conn>, mut req: Request<Incoming>) -> Reply {
    conn.arrived();
    let snap = state.load();
    let start = Instant::now();
    let judged = Judged::default();
    let log = Logged::if_on(&snap, conn, &req, &judged);
    match decide(&snap, conn, &req, &judged) {
        Decision::Answer(mut resp, outcome) => {
            crate::listener::Upgrading::close_when_declined(&mut req);
            if discard_upload(req) {
                say_close(&mut resp);
            }
            Reply::Ready(Some(finish(&snap, conn, start, log, resp, None, outcome)))
        }
        Decision::Hold => {
            let mut resp = reserved::hold(&snap, &req);
            // A held `CONNECT` ends its connection as the `405` it gets while forwarding does
            // (`refusal`): what follows its head is the tunnel the client meant to open, and
            // read as a next request it would be forwarded when `allow_paths` or a bypass lets
            // it through, past a proxy in front that took it for tunnel bytes.
            if req.method() == Method::CONNECT && req.version() < http::Version::HTTP_2 {
                let close = HeaderValue::from_static("close");
                resp.headers_mut().insert(header::CONNECTION, close);
            }
            crate::listener::Upgrading::close_when_declined(&mut req);
            if discard_upload(req) {
                say_close(&mut resp);
            }
            Reply::Ready(Some(finish(
                &snap,
                conn,
                start,
                log,
                resp,
                None,
                Outcome::Held,
            )))
        }
        Decision::Forward(outcome) => {
            let conn = conn.clone();
            Reply::Later(Box::pin(async move {
                let mut unanswered = Unanswered {
                    log,
                    start,
                    counted_in: Some(&snap),
                    upload: std::sync::OnceLock::new(),
                };
                let upload = &unanswered.upload;
                let http2 = req.version() == http::Version::HTTP_2;
                let (resp, server, outcome) =
                    forward_request(&snap, &conn, req, outcome, upload).await;
                // A client that left mid-upload is told as one that left before its answer
                // (`Unanswered`, dropped here): what is written back reaches nobody, or a
                // client that closed only its sending side. So is an HTTP/2 upload that
                // could not be read, when its read saw it before hyper dropped the request:
                // h2 reset its stream (or closed the connection), and the `400` goes nowhere.
                let reset = http2
                    && upload
                        .get()
                        .and_then(crate::body::UploadWatch::client_failure)
                        == Some(ClientFault::Unreadable);
                if outcome == Outcome::Abandoned || reset {
                    return resp;
                }
                unanswered.counted_in = None;
                finish(
                    &snap,
                    &conn,
                    start,
                    unanswered.log.take(),
                    resp,
                    server,
                    outcome,
                )
            }))
        }
    }
}

/// How much of an upload answered without it is read and dropped, and for how long.
const DISCARD_LIMIT: usize = 16 << 20;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(10);
const DISCARD_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and drops what is still coming of a request answered without its body (held,
/// reserved, refused), up to `DISCARD_LIMIT` and `DISCARD_TIME`, as nginx discards one.
/// Left unread, an HTTP/2 stream is reset once the answer has gone (`RST_STREAM(NO_ERROR)`,
/// which RFC 9113 §8.1 allows), and clients that take that for a failure (curl before 8,
/// others) showed an upload during maintenance an error rather than the holding page; an
/// HTTP/1.1 connection was closed with the body unread, which resets it under a client still
/// sending, and a client that sends its whole body before it reads (asyncio's, many scripts)
/// lost the answer. Read, the connection is kept. True when an HTTP/1.x connection will
/// close after the answer whatever the client does (`discard`), which the answer must say.
fn discard_upload(req: Request<Incoming>) -> bool {
    use hyper::body::Body as _;
    if req.body().is_end_stream() {
        return false;
    }
    let waits = waits_for_continue(req.headers());
    let version = req.version();
    let (mut parts, body) = req.into_parts();
    // Read to its end, a plaintext HTTP/1.1 connection may park again (`park`).
    let upload = parts.extensions.remove::<crate::park::Upload>();
    discard(version, waits, body, upload)
}

/// Whether the client waits for `100 Continue` before it sends its body.
fn waits_for_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// `discard_upload`'s reading, for any body: the client's as hyper gave it, or as forwarding
/// gave it back unsent (`forward::Rest::Back`). True when an HTTP/1.x connection then closes
/// after the answer whatever the client does, which hyper never says itself (its keep-alive
/// ends with nothing written), so that the answer says `Connection: close` (RFC 9112 §9.6)
/// and a client that pipelined a request behind knows it was not read, rather than lose it
/// with no word:
/// - the client waits for `100 Continue`: reading would ask for the body, where the answer
///   tells it to send none, and hyper, finding none arrived, ends the connection;
/// - the body's `Content-Length` is over `DISCARD_LIMIT`: read that far, and closed.
///
/// A body that stops coming is given up on too (`DISCARD_PAUSE`), and its connection closed,
/// but that is the client's doing, after the answer: nobody can say it beforehand.
fn discard<B>(
    version: http::Version,
    waits: bool,
    mut body: B,
    upload: Option<crate::park::Upload>,
) -> bool
where
    B: hyper::body::Body + Send + Unpin + 'static,
{
    use http_body_util::BodyExt;
    let http1 = version < http::Version::HTTP_2;
    if body.is_end_stream() {
        return false;
    }
    if http1 && waits {
        return true;
    }
    let over = http1 && body.size_hint().lower() > DISCARD_LIMIT as u64;
    tokio::spawn(async move {
        let mut left = DISCARD_LIMIT;
        let read = async {
            // A body that stops is given up on after `DISCARD_PAUSE`, as nginx's
            // `lingering_timeout`: a held connection still reading is neither parked nor
            // closable for room, and a host sending heads whole and bodies never would hold
            // slots during maintenance for the whole `DISCARD_TIME`.
            loop {
                match tokio::time::timeout(DISCARD_PAUSE, body.frame()).await {
                    Ok(Some(Ok(frame))) => {
                        let n = frame.data_ref().map_or(0, bytes::Buf::remaining);
                        left = left.saturating_sub(n);
                        if left == 0 {
                            break;
                        }
                    }
                    Ok(None) => {
                        if let Some(upload) = &upload {
                            upload.ended();
                        }
                        break;
                    }
                    Ok(Some(Err(_))) | Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(DISCARD_TIME, read).await;
    });
    over
}

/// Reads and drops what forwarding left of a request's body when it failed, as a held
/// request's (`discard`); true when the answer must say that its HTTP/1.x connection closes:
/// the body's rest is never to be read (`forward::Rest::Lost`), or `discard` says so.
fn settle(rest: forward::Rest, http2: bool, waits: bool) -> bool {
    let version = if http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    match rest {
        forward::Rest::Read => false,
        forward::Rest::Back(body, upload) => discard(version, waits, body, upload),
        forward::Rest::Lost => !http2,
    }
}

/// Makes an HTTP/1.x answer say that its connection closes after it (`discard`).
fn say_close(resp: &mut Response<Body>) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Writes the holding response to a request, in HTTP/1.1, to `out` when the gateway would
/// answer it with one, counted and logged as `handle` does; false for any other request, with
/// nothing written. For writers other than hyper (`fast`), which read the request's lines
/// without building an `http::Request`. `target` is the request target as sent: one that `Uri`
/// would not keep as written is left to hyper (`h1::plain_path`), so that the log line shows
/// the others as hyper's path shows the `Uri`. The response was encoded when the state
/// changed (`hold::Held`), and a request adds only its date, or while `Retry-After` counts
/// down to an announced end, the number of its moment and what depends on it too.
pub fn write_held<'s, H: Fields + ?Sized>(
    snap: &'s Snapshot,
    conn: &Conn,
    method: &Method,
    target: &str,
    headers: &H,
    out: &mut crate::h1::Answers<'s, '_>,
) -> bool {
    let Some(held) = &snap.held else {
        return false;
    };
    let start = Instant::now();
    let Some(path) = crate::h1::plain_path(target) else {
        return false;
    };
    let judged = Judged::default();
    if !matches!(rule(snap, conn, method, path, headers, &judged), Rule::Hold) {
        return false;
    }
    let head = method == Method::HEAD;
    // An answer a listed origin may read carries its origin: not the one encoded for all.
    let cors = crate::hold::cors::allowed(&snap.config.maintenance.cors_origins, headers);
    let (form, lang) = reserved::choose_form(snap, headers, path, method);
    // Nor a gRPC one, typed and paced by the call's own headers (`reserved::respond`).
    let kept = cors.is_none() && form != crate::hold::negotiate::Form::Grpc;
    let hsts = snap.hsts(conn.tls());
    let extra = hsts.map_or(&[][..], crate::config::Hsts::line);
    let written = match kept {
        true => held.write_encoded(form, lang, head, extra, out),
        false => None,
    };
    let (status, bytes) = match written {
        Some(written) => written,
        None => {
            let answered = reserved::Preflights::Answered;
            let resp = reserved::respond(snap, held, headers, path, method, answered);
            let (mut parts, body) = resp.into_parts();
            if let Some(hsts) = hsts {
                hsts.add_to(&mut parts.headers);
            }
            // A holding response's body is whole (`Held::respond`).
            let body = body.into_ready().unwrap_or_default();
            crate::h1::encode(&parts, &body, head, out.buf());
            (parts.status, body.len())
        }
    };
    let now = Instant::now();
    count_at(snap, start, now, status, Outcome::Held);
    out.counted(now);
    if snap.config.log.access_log {
        // What `finish` would log once the body is sent: it is sent whole or the connection
        // fails, and a held path is never the bypass link that `logged_uri` hides.
        let line = crate::logging::AccessLine {
            peer: conn.peer.ip(),
            client: judged.logged(snap, conn, headers),
            method,
            path: &target,
            status: status.as_u16(),
            upstream: None,
            bytes: bytes as u64,
            cut: false,
        };
        line.write(start);
    }
    true
}

/// What the access log line says of a request, taken before the request is consumed.
struct Logged {
    method: Method,
    uri: http::Uri,
    peer: IpAddr,
    /// The client a trusted peer named (`Judged::logged`).
    client: Option<IpAddr>,
}

impl Logged {
    /// What the line will say, when the access log is on; nothing is copied when it is off.
    fn if_on<B>(snap: &Snapshot, conn: &Conn, req: &Request<B>, judged: &Judged) -> Option<Logged> {
        snap.config.log.access_log.then(|| Logged {
            method: req.method().clone(),
            uri: logged_uri(snap, req.uri()),
            peer: conn.peer.ip(),
            client: judged.logged(snap, conn, req.headers()),
        })
    }
}

/// The client's address as `allow_ips` reads it (`bypass::client_ip`), worked out at most
/// once for a request however many ask (the hold's rules, the access line), and only when
/// one does: behind a load balancer, the walk over `X-Forwarded-For` is the request's.
#[derive(Default)]
struct Judged(Cell<Option<IpAddr>>);

impl Judged {
    /// The client's address: the peer, or the one a trusted peer named.
    fn client<H: Fields + ?Sized>(&self, snap: &Snapshot, conn: &Conn, headers: &H) -> IpAddr {
        if let Some(ip) = self.0.get() {
            return ip;
        }
        let trusted = &snap.config.proxy.trusted_proxies;
        let ip = bypass::client_ip(conn.peer.ip(), headers, trusted);
        self.0.set(Some(ip));
        ip
    }

    /// What the access line says is the client when it is not the peer (an operator behind a
    /// load balancer sees the visitor, not the balancer, as nginx's `realip` shows it); `None`
    /// for every peer that is not trusted, without a look at the headers.
    fn logged<H: Fields + ?Sized>(
        &self,
        snap: &Snapshot,
        conn: &Conn,
        headers: &H,
    ) -> Option<IpAddr> {
        let peer = conn.peer.ip();
        if !snap.config.proxy.is_trusted(peer) {
            return None;
        }
        let client = self.client(snap, conn, headers);
        (client != crate::config::canonical_ip(peer)).then_some(client)
    }
}

/// The access log line of a forwarded request, until its answer comes: a client that leaves
/// first (its connection closed, its HTTP/2 stream reset) drops the request, which is then
/// logged with nginx's `499`, so that the operator sees the requests people gave up on (a
/// server that hangs shows as a run of them), where nothing was written; and counted as
/// `abandoned`, where dashboards showed the traffic to a hanging server fall to nothing.
/// hyper drops the request too when h2 resets the stream for an upload that breaks HTTP/2's
/// rules (DATA frames adding up to more or less than its `content-length`): that one is the
/// client's malformed request, logged `400` and counted `failed`, as a malformed chunk over
/// HTTP/1.1 is, told apart by the upload's own read (`upload`); but with no response counted,
/// since its client got the reset, not the `400`.
struct Unanswered<'a> {
    /// The line to write, with the access log on.
    log: Option<Logged>,
    start: Instant,
    /// Where it is counted, until its answer came.
    counted_in: Option<&'a Arc<Snapshot>>,
    /// A streamed upload's state (`forward::forward` sets it).
    upload: std::sync::OnceLock<crate::body::UploadWatch>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let upload = self.upload.get();
        // h2 wakes the task reading the body and hyper's stream task together: the reset may
        // drop the request before the body's read has seen the error. Then, only for an
        // upload cut short, the read is given a few turns of the runtime to say so.
        if let (Some(snap), Some(watch)) = (self.counted_in, upload) {
            if watch.undecided() {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let late = Unread {
                        snap: snap.clone(),
                        log: self.log.take(),
                        start: self.start,
                        dropped: Instant::now(),
                        upload: watch.clone(),
                    };
                    runtime.spawn(late.settle());
                    return;
                }
            }
        }
        let fault = upload.and_then(crate::body::UploadWatch::client_failure);
        let snap = self.counted_in.map(|s| &**s);
        told_unanswered(snap, self.log.take(), self.start, fault);
    }
}

/// A request dropped unanswered whose upload's end was not known yet (`Unanswered`): told
/// once the body's read has had its turns, or when the task is dropped (a drain's end).
struct Unread {
    snap: Arc<Snapshot>,
    log: Option<Logged>,
    start: Instant,
    /// When hyper dropped it: its line and its duration end there, not after the wait for
    /// the upload's read (up to some 100 ms more, longer on a busy worker).
    dropped: Instant,
    upload: crate::body::UploadWatch,
}

impl Unread {
    async fn settle(self) {
        // On a worker's one thread, the task holding the body runs within a few turns; on
        // a runtime of several threads (a test's), it may take a moment longer. Bounded: a
        // body nobody drops or reads (its server not taking it) says nothing, and the
        // request is told as one its client left.
        for turn in 0..28 {
            if !self.upload.undecided() {
                break;
            }
            if turn < 8 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let fault = self.upload.client_failure();
        // Moved on by the wait, so that both clocks read (now - start) as (dropped - start).
        let waited = self.dropped.elapsed();
        let start = self.start.checked_add(waited).unwrap_or(self.start);
        told_unanswered(Some(&self.snap), self.log.take(), start, fault);
    }
}

/// Counts and logs a forwarded request dropped before its answer: `failed` and logged `400`
/// when its upload could not be read (the client broke the protocol), else nginx's `499` and
/// `abandoned`. Neither got a response: no status class or duration is counted for them.
fn told_unanswered(
    snap: Option<&Snapshot>,
    log: Option<Logged>,
    start: Instant,
    fault: Option<ClientFault>,
) {
    let malformed = fault == Some(ClientFault::Unreadable);
    if let Some(snap) = snap {
        if malformed {
            snap.metrics.reset_unanswered(snap.mode);
        } else {
            snap.metrics.abandoned(snap.mode);
        }
    }
    if let Some(Logged {
        method,
        uri,
        peer,
        client,
    }) = log
    {
        let line = crate::logging::AccessLine {
            peer,
            client,
            method: &method,
            path: &uri,
            status: if malformed { 400 } else { CLIENT_CLOSED },
            upstream: None,
            bytes: 0,
            cut: false,
        };
        line.write(start);
    }
}

/// nginx's status for a request whose client closed before its answer, which the access
/// log shows for lack of a standard one.
pub(crate) const CLIENT_CLOSED: u16 = 499;

/// Counts the request, and with the access log on, logs it when its body is done. Every
/// answer hyper writes for the gateway passes here (intermission's own, forwarded ones, over
/// HTTP/1.1 and HTTP/2), so here it gets `Strict-Transport-Security` over TLS.
fn finish(
    snap: &Snapshot,
    conn: &Conn,
    start: Instant,
    log: Option<Logged>,
    mut resp: Response<Body>,
    server: Option<usize>,
    outcome: Outcome,
) -> Response<Body> {
    if let Some(hsts) = snap.hsts(conn.tls()) {
        hsts.add_to(resp.headers_mut());
    }
    count(snap, start, resp.status(), outcome);
    let status = resp.status().as_u16();
    let Some(Logged {
        method,
        uri,
        peer,
        client,
    }) = log
    else {
        return resp;
    };
    let upstream = server.and_then(|i| snap.pool.names.get(i).cloned());
    let (mut parts, body) = resp.into_parts();
    let write = move |bytes, cut| {
        let line = crate::logging::AccessLine {
            peer,
            client,
            method: &method,
            path: &uri,
            status,
            upstream: upstream.as_deref(),
            bytes,
            cut,
        };
        line.write(start);
    };
    // A switch is logged when its tunnel ends, with what went through it.
    if let Some(tunnel) = parts
        .extensions
        .remove::<crate::forward::upgrade::TunnelLog>()
    {
        tunnel.on_end(Box::new(move |bytes| write(bytes, false)));
        return Response::from_parts(parts, body);
    }
    let body = Body::counted(body, Box::new(write));
    Response::from_parts(parts, body)
}

pub(crate) fn count(snap: &Snapshot, start: Instant, status: StatusCode, outcome: Outcome) {
    count_at(snap, start, Instant::now(), status, outcome);
}

/// `count`, with the clock already read (`now`), for a caller that needs the reading again.
pub(crate) fn count_at(
    snap: &Snapshot,
    start: Instant,
    now: Instant,
    status: StatusCode,
    outcome: Outcome,
) {
    let took = now.saturating_duration_since(start);
    snap.metrics
        .request(outcome, snap.mode, status.as_u16(), took);
}

/// The URI as the access log shows it: the bypass secret never reaches a log file, neither
/// in the link nor in a mistyped form of it (`//bypass/`, `%62ypass/`, `./bypass/`, in a
/// query), which does not bypass but which operators share as readily.
fn logged_uri(snap: &Snapshot, uri: &http::Uri) -> http::Uri {
    let m = &snap.config.maintenance;
    let prefix = m.reserved_prefix.as_str();
    // Only a target under the prefix is searched: an ordinary request pays this prefix
    // check and no more.
    let Some(rest) = uri.path().strip_prefix(prefix) else {
        return without_authority(uri);
    };
    if rest.starts_with("bypass/") && rest.len() > "bypass/".len() {
        return redacted(&format!("{prefix}bypass/REDACTED"));
    }
    let secret = m.bypass_secret.as_str();
    // An empty secret (no bypass link) is in every target: there is none to hide.
    if secret.is_empty() {
        return without_authority(uri);
    }
    let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    // The copies written as they are, replaced where they stand; what is left is still
    // searched for an escaped one: a target may carry both (a `?next=` link escaped whole).
    let shown = target
        .contains(secret)
        .then(|| target.replace(secret, "REDACTED"));
    let left = shown.as_deref().unwrap_or(target);
    // A secret written with `%`-escapes (`%61` for `a`): where it began in the target is not
    // worth working out for a request that can only be a mistake, so all after the prefix
    // goes. The secret is ASCII, so a lossy decoding finds it wherever a strict one would.
    if left.contains('%')
        && percent_encoding::percent_decode_str(left)
            .decode_utf8_lossy()
            .contains(secret)
    {
        return redacted(&format!("{prefix}REDACTED"));
    }
    match shown {
        Some(shown) => redacted(&shown),
        None => without_authority(uri),
    }
}

/// An HTTP/2 request's URI (and an absolute-form target) carries the scheme and host too: the
/// log shows the path and query, as for every other request.
fn without_authority(uri: &http::Uri) -> http::Uri {
    match uri.path_and_query() {
        Some(pq) if uri.authority().is_some() => http::Uri::from(pq.clone()),
        _ => uri.clone(),
    }
}

/// `target`, a valid target with a part of it replaced by letters, as a URI; `/` should it
/// somehow not parse, rather than the secret.
fn redacted(target: &str) -> http::Uri {
    target.parse().unwrap_or_default()
}

/// What becomes of a request, decided without waiting for anything.
enum Decision {
    Answer(Response<Body>, Outcome),
    /// The holding response (`reserved::hold`), left to the caller to build or to find
    /// encoded.
    Hold,
    /// Forwarded or bypassed.
    Forward(Outcome),
}

fn decide(snap: &Snapshot, conn: &Conn, req: &Request<Incoming>, judged: &Judged) -> Decision {
    match rule(
        snap,
        conn,
        req.method(),
        req.uri().path(),
        req.headers(),
        judged,
    ) {
        Rule::Reserved(rest) => {
            // Whether the bypass cookie is `Secure`: the browser came over HTTPS, to this
            // proxy or to a trusted one in front that says so (TLS ended at a load balancer).
            let https = conn.tls()
                || (rest.starts_with("bypass/")
                    && snap.config.proxy.is_trusted(conn.peer.ip())
                    && bypass::https_by_proxy(req.headers()));
            Decision::Answer(reserved::answer(snap, req, rest, https), Outcome::Reserved)
        }
        Rule::Redirect => Decision::Answer(redirect_https(snap, req), Outcome::Reserved),
        // A reverse proxy has no tunnel to offer; RFC 9110 §9.3.6 lets it refuse.
        Rule::Connect => Decision::Answer(
            refusal(
                req,
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported\n",
            ),
            Outcome::Reserved,
        ),
        Rule::Hold => Decision::Hold,
        Rule::Forward(outcome) => match malformed(req) {
            Some((status, why)) => Decision::Answer(refusal(req, status, why), Outcome::Reserved),
            None if tunnel_while_draining(req) => Decision::Answer(stopping(), Outcome::Reserved),
            None => Decision::Forward(outcome),
        },
    }
}

/// The answer to a request the proxy refuses itself (it cannot be forwarded as sent). Over
/// HTTP/1.x the connection closes after it, as nginx closes it after every `400` it gives (and
/// after its `501`): whatever the client sent after the refused head, a body whose framing was
/// the fault or a request pipelined behind, is never read as the connection's next request,
/// which a client (or a proxy in front that frames the bytes otherwise) could have smuggled in
/// to be forwarded unseen; a client that sends such a request is broken or hostile, and a new
/// connection costs a good one nothing. HTTP/2 frames every stream apart from the others, so
/// that nothing of a refused request can become another: its connection goes on, and no
/// `Connection` field (which HTTP/2 forbids, RFC 9113 §8.2.2) is set.
fn refusal<B>(req: &Request<B>, status: StatusCode, why: &'static str) -> Response<Body> {
    let mut resp = reserved::plain(status, why);
    if req.version() < http::Version::HTTP_2 {
        let close = HeaderValue::from_static("close");
        resp.headers_mut().insert(header::CONNECTION, close);
    }
    resp
}

/// Whether `req` would open a tunnel (a WebSocket) while the proxy drains. Opened now, a
/// WebSocket would be closed at once (`forward::websocket`), and another tunnel, which
/// cannot be asked to finish, cut at `shutdown_timeout`, the stop waiting for it. nginx and HAProxy open no new one on a graceful stop either. An
/// `h2c` upgrade is forwarded as a plain request (`forward::headers::upgrade_request`), and
/// answered, so it goes on. hyper marks only the requests that may upgrade (`Upgrading`):
/// the others pay one check of an empty extension map.
fn tunnel_while_draining(req: &Request<Incoming>) -> bool {
    req.extensions()
        .get::<crate::listener::Upgrading>()
        .is_some_and(crate::listener::Upgrading::draining)
        && forward::asks_for_tunnel(req)
}

const STOPPING: &str = "the proxy is shutting down; connect again to be served\n";
/// As a call still streaming is ended at the drain's end (`Body::end_grpc_at`).
const STOPPING_GRPC: &str = "the proxy is shutting down";

/// The answer to a request refused because the proxy is stopping, or still waiting for its
/// answer's head as the drain nears its end (`forward::UpstreamError::Stopping`): `503`, to come back at
/// once (`Retry-After: 1`, the least it can say) on a new connection, which reaches the
/// instance that takes over, or another behind the load balancer.
pub(crate) fn stopping() -> Response<Body> {
    let mut resp = reserved::plain(StatusCode::SERVICE_UNAVAILABLE, STOPPING);
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Why a request cannot be forwarded as the client sent it (RFC 9112 §3.2, §3.2.3): without a
/// `Host` in HTTP/1.1, with more than one, with one that is no `host[:port]`, with userinfo in
/// its target, or with a target that is no path (authority-form, or `*` on anything but
/// `OPTIONS`). Sent on, it would reach the server as another request than the client's, or
/// as one that a server and a cache behind the proxy read as two different hosts. A request
/// that is answered here (held, reserved) needs no host, and is answered as it is. The host
/// of an absolute-form target or an HTTP/2 `:authority` becomes the `Host` the server sees,
/// so it is held to the same rules. A
/// transfer coding other than `chunked` gets 501 (RFC 9112 §6.1), as nginx answers it:
/// hyper takes the chunks off and the hop sends the body as it is, so a `gzip, chunked` body
/// would reach the server still compressed with nothing saying so. A target of another
/// scheme than `http` or `https` is no request for the servers behind (`refusal` says what
/// becomes of the connection).
fn malformed<B>(req: &Request<B>) -> Option<(StatusCode, &'static str)> {
    if too_many_fields(req) {
        return Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "more than 100 header fields\n",
        ));
    }
    // HTTP/2 has no transfer codings (the h2 crate refuses the field): no lookup for it.
    if req.version() < http::Version::HTTP_2 {
        match codings(req.headers()) {
            Codings::None | Codings::Chunked => {}
            Codings::ChunkedAgain => {
                return Some((
                    StatusCode::BAD_REQUEST,
                    "the chunked transfer coding is applied more than once\n",
                ))
            }
            Codings::Other => {
                return Some((
                    StatusCode::NOT_IMPLEMENTED,
                    "only the chunked transfer coding is supported\n",
                ))
            }
        }
    }
    host_problem(req).map(|why| (StatusCode::BAD_REQUEST, why))
}

/// The 100 header fields hyper allows an HTTP/1.1 request, held to HTTP/2 requests too, which
/// only `max_header_bytes` bounded. Cookie crumbs count as the one `Cookie` line they are
/// joined into (`headers::join_cookies`): a browser may send each cookie as a field of its own.
fn too_many_fields<B>(req: &Request<B>) -> bool {
    const MAX: usize = 100;
    let fields = req.headers().len();
    if fields <= MAX || req.version() != http::Version::HTTP_2 {
        return false;
    }
    let crumbs = req.headers().get_all(header::COOKIE).iter().count();
    fields - crumbs.saturating_sub(1) > MAX
}

/// What a request's `Transfer-Encoding` lines say, taken together as one list.
#[derive(Debug, PartialEq)]
enum Codings {
    None,
    /// A single `chunked`.
    Chunked,
    /// `chunked` and nothing else, more than once: a framing error (RFC 9112 §6.1 forbids
    /// it), not a coding this hop lacks, so 400 rather than 501.
    ChunkedAgain,
    /// Any other coding.
    Other,
}

fn codings(headers: &HeaderMap) -> Codings {
    let (mut lines, mut chunked) = (0, 0);
    for line in headers.get_all(header::TRANSFER_ENCODING) {
        lines += 1;
        // Empty list elements are allowed and mean nothing (RFC 9110 §5.6.1).
        for coding in line
            .as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
        {
            match coding {
                b"" => {}
                c if c.eq_ignore_ascii_case(b"chunked") => chunked += 1,
                _ => return Codings::Other,
            }
        }
    }
    match chunked {
        // Counted in the loop: a second lookup would cost every request that has none.
        0 if lines == 0 => Codings::None,
        0 => Codings::Other,
        1 => Codings::Chunked,
        _ => Codings::ChunkedAgain,
    }
}

fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let uri = req.uri();
    match uri.scheme_str() {
        // `Uri` reads `HTTP://` as `http` (RFC 9110 §4.2.3: schemes are case-insensitive).
        None if uri.authority().is_some() => return Some("the request target is not a path\n"),
        // `ftp://` and the like were forwarded as if they said `http`, as nginx forwards
        // them: the request the server saw was not the one the client sent.
        Some(s) if !s.eq_ignore_ascii_case("http") && !s.eq_ignore_ascii_case("https") => {
            return Some("the request target's scheme is not http or https\n");
        }
        _ => {}
    }
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return Some("the request target * is for OPTIONS only\n");
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Some("the request target names a user\n");
        }
        // It becomes the `Host` the server sees (`forward::forward`), so it is held to the
        // rules a `Host` header is.
        if !crate::h1::valid_host(authority.as_str().as_bytes()) {
            return Some("the request target's host is not a host\n");
        }
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Some("more than one Host header\n"),
        (Some(host), None) if !crate::h1::valid_host(host.as_bytes()) => {
            Some("the Host header is not a host\n")
        }
        // The target URI would be `http:///path`, which RFC 9110 §4.2.1 has a recipient
        // reject; nginx answers 400. A target that names its host needs none.
        (Some(host), None) if host.is_empty() && uri.authority().is_none() => {
            Some("the Host header is empty\n")
        }
        // HTTP/1.0 may name no host (the server's is sent); HTTP/2 must (RFC 9113 §8.3.1).
        (None, None) if req.version() == http::Version::HTTP_11 && uri.authority().is_none() => {
            Some("no Host header\n")
        }
        (None, None) if req.version() == http::Version::HTTP_2 && uri.authority().is_none() => {
            Some("no :authority or Host\n")
        }
        _ => None,
    }
}

/// What the rules make of a request, from its method, path and header lines alone: `decide`
/// for hyper's requests, `write_held` for the lines `fast` parsed.
enum Rule<'p> {
    /// Under the reserved prefix: the rest of the path.
    Reserved(&'p str),
    /// To HTTPS: the bypass link, or a path not allowed, on plaintext when HTTPS is there.
    Redirect,
    Connect,
    Hold,
    Forward(Outcome),
}

fn rule<'p, H: Fields + ?Sized>(
    snap: &Snapshot,
    conn: &Conn,
    method: &Method,
    path: &'p str,
    headers: &H,
    judged: &Judged,
) -> Rule<'p> {
    let m = &snap.config.maintenance;
    let redirect = !conn.tls() && snap.config.proxy.redirect_https;
    // Before the reserved paths: a `CONNECT` naming one (`CONNECT /_intermission/status`)
    // got their answer (a `405`, or the holding answer for a wrong bypass link) on a kept
    // connection, and the tunnel's bytes behind it were read as the next request.
    if method == Method::CONNECT {
        // Held like every other method (SPEC §3): the client hears when to come back.
        let held = snap.held.is_some() && !bypassed(snap, conn, path, headers, judged);
        return if held { Rule::Hold } else { Rule::Connect };
    }
    if let Some(rest) = path.strip_prefix(m.reserved_prefix.as_str()) {
        // The bypass secret and its cookie never travel in cleartext when HTTPS is there.
        if redirect && rest.starts_with("bypass/") {
            return Rule::Redirect;
        }
        return Rule::Reserved(rest);
    }
    if redirect && !allowed_path(path, &m.allow_paths) {
        return Rule::Redirect;
    }
    match snap.held {
        Some(_) if !bypassed(snap, conn, path, headers, judged) => Rule::Hold,
        Some(_) => Rule::Forward(Outcome::Bypassed),
        None => Rule::Forward(Outcome::Forwarded),
    }
}

#[allow(clippy::manual_async_fn)] // see `forward`'s module docs
fn forward_request<'a>(
    snap: &'a Snapshot,
    conn: &'a Conn,
    req: Request<Incoming>,
    outcome: Outcome,
    upload: &'a std::sync::OnceLock<crate::body::UploadWatch>,
) -> impl Future<Output = (Response<Body>, Option<usize>, Outcome)> + Send + 'a {
    async move {
        let trusted = snap.config.proxy.is_trusted(conn.peer.ip());
        // What the outage answer would need, kept (reference counts, no copies) in case
        // forwarding fails: the request itself goes to the upstream.
        let echo = Echo::of(&req);
        let waits = waits_for_continue(req.headers());
        match forward::forward(
            &snap.pool,
            &snap.up,
            &snap.passive,
            &snap.marks,
            req,
            &conn.client,
            trusted,
            &snap.config,
            conn.drain.as_deref(),
            upload,
        )
        .await
        {
            Ok(f) => {
                let intercept = &snap.config.upstream.intercept_statuses;
                if !intercept.is_empty() && intercept.contains(&f.response.status().as_u16()) {
                    let line = forward::Line::Intercepted;
                    if let Some(more) = forward::said(&snap.passive, Some(f.server), line) {
                        tracing::warn!(
                            status = f.response.status().as_u16(),
                            server = snap.pool.names.get(f.server).map_or("-", |n| &**n),
                            "upstream answer intercepted{more}"
                        );
                    }
                    forward::pool::read_out(f.response.into_body());
                    let resp = echo.outage(snap, reserved::Preflights::Held);
                    return (resp, Some(f.server), Outcome::Failed);
                }
                let mut resp = forward::events::at_drain(f.response, conn.drain.as_deref());
                if let Some(drain) = conn.drain.as_deref() {
                    resp.body_mut().end_grpc_at(drain);
                }
                (resp, Some(f.server), outcome)
            }
            Err(forward::Failed {
                client: Some(fault),
                ..
            }) => {
                let text = match fault {
                    ClientFault::Stalled => "the request body did not arrive in time\n",
                    ClientFault::Unreadable => "the request body could not be read\n",
                    ClientFault::Left => "the request body did not arrive whole\n",
                };
                let outcome = match fault {
                    ClientFault::Left => Outcome::Abandoned,
                    ClientFault::Stalled | ClientFault::Unreadable => Outcome::Failed,
                };
                // Said where the caller looks for it (the streamed read sets it itself).
                if fault == ClientFault::Unreadable {
                    let _ = upload.set(crate::body::UploadWatch::unreadable());
                }
                let resp = match echo.grpc_type() {
                    Some(typed) => {
                        let limit = snap.config.proxy.body_read_timeout;
                        let (status, message) = grpc_client_fault(fault, limit);
                        reserved::grpc_status(typed, status, &message)
                    }
                    None => reserved::plain(fault.status(), text),
                };
                (resp, None, outcome)
            }
            Err(forward::Failed {
                error: Some(forward::UpstreamError::Stopping { .. }),
                server,
                ..
            }) => {
                // A gRPC call reads its status (`UNAVAILABLE`, which its client may send again
                // elsewhere), as a stream cut at the drain's end does (`Body::end_grpc_at`).
                let mut resp = match echo.grpc_type() {
                    Some(typed) => reserved::grpc_status(typed, 14, STOPPING_GRPC),
                    None => stopping(),
                };
                // HTTP/2 has no `Connection` (RFC 9113 §8.2.2): hyper's server closes it with
                // `GOAWAY` as the drain asks.
                if echo.http2 {
                    resp.headers_mut().remove(header::CONNECTION);
                }
                // The proxy's own answer to its stop, as the `503` to an `Upgrade` asked for
                // during a drain is: no server failed, and counted `failed` every deploy
                // with a long poll in flight raised the alerts on failed requests.
                (resp, server, Outcome::Reserved)
            }
            Err(failed) => {
                match &failed.error {
                    // Told once every 10 s with a count (`forward::sockets`), not per request.
                    Some(e)
                        if forward::sockets::reached(e)
                            || matches!(e, forward::UpstreamError::Tunnels(_)) =>
                    {
                        tracing::debug!(error = %e, "forwarding failed; answering with the outage response")
                    }
                    Some(e) => {
                        let line = forward::Line::Failed;
                        if let Some(more) = forward::said(&snap.passive, failed.server, line) {
                            tracing::warn!(error = %e, "forwarding failed; answering with the outage response{more}")
                        }
                    }
                    None => {
                        let line = forward::Line::NoServer;
                        if let Some(more) = forward::said(&snap.passive, None, line) {
                            tracing::warn!(
                                "no upstream server to forward to; answering with the outage response{more}"
                            )
                        }
                    }
                }
                let http2 = echo.http2;
                let mut resp = echo.outage(snap, reserved::Preflights::Answered);
                if settle(failed.rest, http2, waits) {
                    say_close(&mut resp);
                }
                (resp, failed.server, Outcome::Failed)
            }
        }
    }
}

/// The gRPC status, and its message, of a call whose own upload failed (`ClientFault`), for
/// its client to read in place of the `408` or `400` another client gets:
/// - stalled past `proxy.body_read_timeout` (`limit`): `DEADLINE_EXCEEDED` (4), "the deadline
///   expired before the operation could complete" (gRPC's status codes), as Envoy answers its
///   own timeouts on a gRPC call. A time limit ran out, which clients do not retry: with
///   `UNAVAILABLE` they would send the call again, to stall again, and read the server as down;
///   `CANCELLED` says the caller gave up, `RESOURCE_EXHAUSTED` a quota or size.
/// - unreadable (a malformed frame of the client's): `INTERNAL` (13), gRPC's status for a
///   protocol error, as its mapping reads an HTTP `400`.
/// - the client left mid-upload: `CANCELLED` (1); nobody reads it.
fn grpc_client_fault(fault: ClientFault, limit: Option<std::time::Duration>) -> (u16, String) {
    match fault {
        ClientFault::Stalled => {
            let message = match limit {
                Some(limit) => format!(
                    "the request body did not arrive in time: nothing of it came for {limit:?} \
                     (the proxy's body_read_timeout)"
                ),
                None => "the request body did not arrive in time".to_owned(),
            };
            (4, message)
        }
        ClientFault::Unreadable => (13, "the request body could not be read".to_owned()),
        ClientFault::Left => (1, "the request body did not arrive whole".to_owned()),
    }
}

/// The outage holding response to `req`, for a forward that failed outside hyper
/// (`crate::relay`), chosen as `forward_request` chooses it.
pub(crate) fn outage_answer<B>(snap: &Snapshot, req: &Request<B>) -> Response<Body> {
    Echo::of(req).outage(snap, reserved::Preflights::Answered)
}

/// The parts of a request that choose the form of a holding response.
struct Echo {
    method: Method,
    path: Option<http::uri::PathAndQuery>,
    /// The first line of each of `ECHOED`, in its order.
    headers: [Option<HeaderValue>; 9],
    /// Their further lines (an `Accept` or `Connection` may come in several), by index in
    /// `ECHOED`: negotiation reads them all. Empty, and unallocated, for most requests.
    more: Vec<(usize, HeaderValue)>,
    /// When a call with a deadline (`grpc-timeout`) came: its outage answer sees what is
    /// left of the deadline (`Echo::outage`). The clock is read for those calls alone.
    sent: Option<Instant>,
    /// It came over HTTP/2, where `application/grpc` is a native gRPC call.
    http2: bool,
}

/// The request headers that choose the form of a holding response.
static ECHOED: [header::HeaderName; 9] = [
    header::ACCEPT,
    header::ACCEPT_LANGUAGE,
    header::CONTENT_TYPE,
    header::UPGRADE,
    header::CONNECTION,
    // Whether the answer is readable by the calling origin, or answers its preflight
    // (`hold::cors`).
    header::ORIGIN,
    header::ACCESS_CONTROL_REQUEST_METHOD,
    header::ACCESS_CONTROL_REQUEST_HEADERS,
    // A gRPC call's deadline: one that ends before the pushback is told not to retry
    // (`hold::held::grpc_pushback_within`), or a client's retry policy would wait out the
    // pushback past it and end `DEADLINE_EXCEEDED`, the message lost.
    crate::hold::negotiate::GRPC_TIMEOUT,
];

/// `ECHOED`'s index of `grpc-timeout`.
const ECHOED_GRPC_TIMEOUT: usize = 8;
/// `ECHOED`'s index of `content-type`.
const ECHOED_CONTENT_TYPE: usize = 2;

impl Echo {
    fn of<B>(req: &Request<B>) -> Echo {
        let mut headers: [Option<HeaderValue>; 9] = Default::default();
        let mut more = Vec::new();
        // One pass over the request's few headers, not a hash and a probe for each of the
        // names: this runs for every forwarded request, and is used only if it fails.
        for (name, value) in req.headers() {
            if let Some(at) = ECHOED.iter().position(|n| n == name) {
                match &headers[at] {
                    None => headers[at] = Some(value.clone()),
                    Some(_) => more.push((at, value.clone())),
                }
            }
        }
        let sent = headers[ECHOED_GRPC_TIMEOUT].is_some().then(Instant::now);
        Echo {
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
            headers,
            more,
            sent,
            http2: req.version() == http::Version::HTTP_2,
        }
    }

    /// The type of a gRPC answer to this request, whose client reads a status in its headers
    /// (`reserved::grpc_status`): `application/grpc` for a native call (over HTTP/2), the
    /// call's own for a gRPC-Web one; `None` for any other request.
    fn grpc_type(&self) -> Option<HeaderValue> {
        let mut headers = HeaderMap::new();
        let content_type = self.headers[ECHOED_CONTENT_TYPE].clone()?;
        headers.insert(header::CONTENT_TYPE, content_type);
        if let Some(web) = crate::hold::negotiate::grpc_web_type(&headers) {
            return Some(web);
        }
        (self.http2 && forward::native_grpc(&headers))
            .then(|| HeaderValue::from_static("application/grpc"))
    }

    /// The outage holding response this request would get.
    fn outage(self, snap: &Snapshot, preflights: reserved::Preflights) -> Response<Body> {
        let mut headers = HeaderMap::new();
        for (name, value) in ECHOED.iter().zip(self.headers) {
            if let Some(v) = value {
                headers.insert(name.clone(), v);
            }
        }
        for (at, value) in self.more {
            headers.append(&ECHOED[at], value);
        }
        // A forward that failed may have taken much of the deadline (`response_timeout`).
        if let Some(sent) = self.sent {
            crate::hold::negotiate::grpc_deadline_left(&mut headers, sent.elapsed());
        }
        let path = self.path.as_ref().map_or("/", |p| p.path());
        reserved::respond(snap, &snap.outage, &headers, path, &self.method, preflights)
    }
}

/// `308` to the same URL over HTTPS, on the first TLS listener's port.
fn redirect_https<B>(snap: &Snapshot, req: &Request<B>) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let Some(host) = host.and_then(|h| h.parse::<http::uri::Authority>().ok()) else {
        return refusal(req, StatusCode::BAD_REQUEST, "a Host header is needed\n");
    };
    // An authority parses with userinfo (`a@b.example`), which a Host may not carry (RFC 9110
    // §7.2), and the redirect would have dropped it: refused as forwarding refuses it.
    if !crate::h1::valid_host(host.as_str().as_bytes()) {
        return refusal(req, StatusCode::BAD_REQUEST, "bad Host header\n");
    }
    let port = snap
        .config
        .proxy
        .https_port
        .or_else(|| snap.config.tls.listen.first().map(|a| a.port()))
        .unwrap_or(443);
    let authority = if port == 443 {
        host.host().to_owned()
    } else if host.host().contains(':') && !host.host().starts_with('[') {
        format!("[{}]:{port}", host.host())
    } else {
        format!("{}:{port}", host.host())
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{authority}{path}");
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => return refusal(req, StatusCode::BAD_REQUEST, "bad Host header\n"),
    }
    resp
}

/// Whether a request is forwarded even though the mode holds requests (SPEC §3).
fn bypassed<H: Fields + ?Sized>(
    snap: &Snapshot,
    conn: &Conn,
    path: &str,
    headers: &H,
    judged: &Judged,
) -> bool {
    let m = &snap.config.maintenance;
    if allowed_path(path, &m.allow_paths) {
        return true;
    }
    if !m.allow_ips.is_empty() {
        let ip = judged.client(snap, conn, headers);
        if bypass::ip_allowed(ip, &m.allow_ips) {
            return true;
        }
    }
    snap.bypass
        .as_ref()
        .is_some_and(|key| key.cookie_valid(headers, SystemTime::now()))
}

/// Whether `path` is under `maintenance.allow_paths`, which lets it past the hold and keeps it
/// on plaintext when `redirect_https` is on, without a dot segment that would take it out
/// from under its prefix upstream, and with nothing after the prefix that a server could
/// decode into one (`plain_after_prefix`).
fn allowed_path(path: &str, prefixes: &[String]) -> bool {
    // The prefixes first: with none configured (the default), or none matching, every held
    // request would otherwise pay for the dot-segment scan: 244 of a held answer's 4,260
    // instructions (`docs/performance-history.md`, helper-218).
    prefixes.iter().any(|prefix| {
        path.strip_prefix(prefix.as_str())
            .is_some_and(plain_after_prefix)
    }) && without_dot_segments(path)
}

/// Whether the part of an allowed path after its prefix holds only RFC 3986 path characters
/// but `;`, and escapes only of those that no server reads as structure. A list of the
/// spellings of `.` and `/` to refuse is never whole: overlong UTF-8 (`%c0%ae`, which
/// lenient Java decoders take for `.`), IIS's `%u002e`, a `%20` or `%00` after `..` (Windows
/// trims trailing spaces; C code stops at NUL) all reached `/admin` on some server. What is
/// let through instead is what ACME tokens, health checks and webhooks use, and anything
/// else is held, which costs nothing but a holding answer.
fn plain_after_prefix(rest: &str) -> bool {
    // pchar (RFC 3986 §3.3) and `/`, without `;` (path parameters, `..;/`) or `%`, which is
    // checked with what follows it.
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@/".contains(&b);
    // What an escape may stand for: the above, without `.` and `/`.
    let escaped = |b: u8| b != b'.' && b != b'/' && plain(b);
    let bytes = rest.as_bytes();
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        if b == b'%' {
            let hex = |i: usize| bytes.get(i).and_then(|&h| char::from(h).to_digit(16));
            match (hex(at + 1), hex(at + 2)) {
                (Some(hi), Some(lo)) if u8::try_from(hi * 16 + lo).is_ok_and(escaped) => at += 3,
                _ => return false,
            }
        } else if plain(b) {
            at += 1;
        } else {
            return false;
        }
    }
    true
}

/// Whether a path has no `.`/`..` segment in any spelling, so that an allowed prefix cannot
/// be a way around the hold (`/public/../admin` would reach `/admin` upstream).
fn without_dot_segments(path: &str) -> bool {
    let lower_has = |needle: &[u8]| {
        path.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    // `;` carries path parameters that some servers strip before resolving (`..;/`), and
    // `%25` hides a second round of decoding.
    // A segment of dots only: `...` is `..` to Windows, which trims trailing dots.
    !(path
        .split('/')
        .any(|seg| !seg.is_empty() && seg.bytes().all(|b| b == b'.'))
        || path.contains(';')
        || lower_has(b"%25")
        || path.contains('\\')
        || lower_has(b"%2e")
        || lower_has(b"%5c")
        || lower_has(b"%2f"))
}

#[cfg(test)]
mod tests {
    use crate::h1::tests::undated;
    use crate::hold::negotiate::Form;
    use http::Request;

    /// A snapshot holding requests (maintenance on), from the config text `toml`.
    fn holding(toml: &str) -> super::Snapshot {
        crate::state::snapshot::for_tests(toml, true)
    }

    #[test]
    fn a_held_request_written_without_hyper_is_the_held_answer_encoded() {
        let conn = super::Conn::new("127.0.0.1:40000".parse().unwrap(), false);
        // Two days away, `Retry-After` is a day at every moment of the test.
        let ends = std::time::SystemTime::now() + std::time::Duration::from_secs(2 * 86_400);
        for (log, until) in [
            ("", None),
            ("[log]\naccess_log = true\n", None),
            ("", Some(ends)),
        ] {
            let snap = crate::state::snapshot::for_tests_until(log, true, until);
            // The snapshot keeps the encodings, whether the access log is on or off, and
            // whether `Retry-After` counts down or not: the page is sent from where it lies,
            // not built and copied into the buffer.
            let kept = snap.held.as_ref().unwrap().encoded(Form::Html, 0, false);
            assert_eq!(kept.is_some(), until.is_none(), "{log:?}");
            let browser = Request::get("/shop").header("accept", "text/html");
            let req = browser.body(()).unwrap();
            let mut buf = Vec::new();
            let mut out = crate::h1::Answers::new(&mut buf);
            let (get, headers) = (req.method(), req.headers());
            assert!(super::write_held(
                &snap, &conn, get, "/shop", headers, &mut out
            ));
            let mut pieces = [std::io::IoSlice::new(&[]); crate::h1::PIECES];
            assert_eq!(
                out.pieces(&mut pieces),
                2,
                "{until:?}: the head, then the page"
            );
            for (method, accept) in [("GET", "text/html"), ("HEAD", "application/json")] {
                let req = Request::builder()
                    .method(method)
                    .uri("/shop")
                    .header("accept", accept)
                    .body(())
                    .unwrap();
                let mut got = Vec::new();
                let (method, target) = (req.method(), "/shop");
                let mut out = crate::h1::Answers::copied(&mut got);
                assert!(super::write_held(
                    &snap,
                    &conn,
                    method,
                    target,
                    req.headers(),
                    &mut out
                ));
                let (parts, body) = crate::reserved::hold(&snap, &req).into_parts();
                let mut want = Vec::new();
                let body = body.into_ready().unwrap();
                crate::h1::encode(&parts, &body, method == "HEAD", &mut want);
                let case = format!("{log:?} {until:?} {method} {accept}");
                assert_eq!(undated(&got), undated(&want), "{case}");
            }
            // Not a held request: nothing written, left to hyper.
            let reserved = "/_intermission/status";
            let (get, none) = (http::Method::GET, http::HeaderMap::new());
            let mut buf = Vec::new();
            let mut out = crate::h1::Answers::new(&mut buf);
            assert!(!super::write_held(
                &snap, &conn, &get, reserved, &none, &mut out
            ));
            assert!(out.is_empty());
        }
    }

    /// A `CONNECT` whose target is a reserved path is held, or refused, as every `CONNECT`
    /// is, and its connection closed (`handle`, `refusal`): it had the reserved path's
    /// answer on a kept connection, and what followed its head was read as a next request.
    #[test]
    fn a_connect_naming_a_reserved_path_is_held_or_refused_as_any_connect() {
        let conn = super::Conn::new("127.0.0.1:40000".parse().unwrap(), false);
        let none = http::HeaderMap::new();
        for (holds, path) in [
            (true, "/_intermission/status"),
            (true, "/_intermission/bypass/wrong"),
            (false, "/_intermission/status"),
        ] {
            let snap = crate::state::snapshot::for_tests("", holds);
            let judged = super::Judged::default();
            let connect = http::Method::CONNECT;
            let rule = super::rule(&snap, &conn, &connect, path, &none, &judged);
            let as_any = match holds {
                true => matches!(rule, super::Rule::Hold),
                false => matches!(rule, super::Rule::Connect),
            };
            assert!(as_any, "holding {holds}, {path}");
        }
    }

    /// A mistyped or non-canonical bypass link does not bypass, but its secret went into the
    /// access log as sent, where only the canonical link's was hidden.
    #[test]
    fn the_access_log_hides_the_bypass_secret_however_the_link_is_spelled() {
        const SECRET: &str = "a-secret-that-stays-secret-42";
        let snap = holding(&format!("[maintenance]\nbypass_secret = \"{SECRET}\"\n"));
        let logged = |target: &str| super::logged_uri(&snap, &target.parse().unwrap()).to_string();
        for (sent, shown) in [
            (
                format!("/_intermission/bypass/{SECRET}"),
                "/_intermission/bypass/REDACTED",
            ),
            (
                format!("/_intermission/bypass/{SECRET}?x=1"),
                "/_intermission/bypass/REDACTED",
            ),
            (
                format!("/_intermission//bypass/{SECRET}"),
                "/_intermission//bypass/REDACTED",
            ),
            (
                format!("/_intermission/./bypass/{SECRET}"),
                "/_intermission/./bypass/REDACTED",
            ),
            (
                format!("/_intermission/%62ypass/{SECRET}"),
                "/_intermission/%62ypass/REDACTED",
            ),
            (
                format!("/_intermission/bypas/{SECRET}junk"),
                "/_intermission/bypas/REDACTEDjunk",
            ),
            (
                format!("/_intermission/status?s={SECRET}"),
                "/_intermission/status?s=REDACTED",
            ),
            (
                format!("http://example.com/_intermission//bypass/{SECRET}"),
                "/_intermission//bypass/REDACTED",
            ),
            // Escaped, the secret cannot be pointed at cheaply: all after the prefix goes.
            (
                "/_intermission//bypass/%61-secret-that-stays-secret-42".into(),
                "/_intermission/REDACTED",
            ),
            (
                "/_intermission/x?%61-secret-that-stays-secret-%342".into(),
                "/_intermission/REDACTED",
            ),
            // Written as it is and escaped in one target: the escaped copy is not left.
            (
                format!("/_intermission//bypass/{SECRET}?next=%61-secret-that-stays-secret-42"),
                "/_intermission/REDACTED",
            ),
            // Nothing to hide: as sent.
            (
                "/_intermission/status?x=%61".into(),
                "/_intermission/status?x=%61",
            ),
            ("/_intermission/bypass/".into(), "/_intermission/bypass/"),
            ("/shop?q=1".into(), "/shop?q=1"),
            ("http://example.com/shop?q=1".into(), "/shop?q=1"),
        ] {
            assert_eq!(logged(&sent), shown, "{sent}");
        }
        // With no bypass link there is no secret: nothing is replaced.
        let snap = holding("");
        let uri = "/_intermission/status?x=1".parse().unwrap();
        assert_eq!(super::logged_uri(&snap, &uri), "/_intermission/status?x=1");
    }

    #[test]
    fn an_echo_keeps_every_line_of_the_headers_that_choose_the_form() {
        let req = Request::head("/shop?x=1")
            .header("accept-language", "fr")
            .header("accept", "application/json")
            .header("x-other", "1")
            .header("accept", "text/html")
            .header("connection", "upgrade")
            .header("origin", "https://app.example.com")
            .body(())
            .unwrap();
        let echo = super::Echo::of(&req);
        assert_eq!(echo.method, http::Method::HEAD);
        assert_eq!(echo.path.as_ref().map(|p| p.as_str()), Some("/shop?x=1"));
        let kept: Vec<(&str, Option<&str>)> = super::ECHOED
            .iter()
            .zip(&echo.headers)
            .map(|(n, v)| (n.as_str(), v.as_ref().map(|v| v.to_str().unwrap())))
            .collect();
        assert_eq!(
            kept,
            [
                ("accept", Some("application/json")),
                ("accept-language", Some("fr")),
                ("content-type", None),
                ("upgrade", None),
                ("connection", Some("upgrade")),
                ("origin", Some("https://app.example.com")),
                ("access-control-request-method", None),
                ("access-control-request-headers", None),
                ("grpc-timeout", None),
            ]
        );
        // The second Accept line too: negotiation reads every line.
        let more: Vec<(&str, &str)> = echo
            .more
            .iter()
            .map(|(at, v)| (super::ECHOED[*at].as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(more, [("accept", "text/html")]);
    }

    #[test]
    fn dot_segments_in_any_spelling_are_caught() {
        for ok in [
            "/",
            "/.well-known/acme-challenge/x",
            "/a/b.c/d",
            "/file..txt",
        ] {
            assert!(super::without_dot_segments(ok), "{ok}");
        }
        for bad in [
            "/public/../admin",
            "/public/./x",
            "/public/..",
            "/public/%2e%2e/admin",
            "/public/%2E./x",
            "/public\\..\\admin",
            "/public/..%2fadmin",
            "/public%5c..%5cadmin",
            "/public/..;/admin",
            "/public/%252e%252e/admin",
            "/public/.../admin",
        ] {
            assert!(!super::without_dot_segments(bad), "{bad}");
        }
    }

    #[test]
    fn allowed_paths_are_plain_prefixes() {
        let prefixes = vec![
            "/health".to_owned(),
            "/.well-known/acme-challenge/".to_owned(),
        ];
        let table = [
            ("/health", true),
            ("/healthz", true), // plain prefix, as documented
            ("/health/deep", true),
            ("/.well-known/acme-challenge/tok", true),
            ("/.well-known/other", false),
            ("/", false),
            ("/Health", false),
        ];
        for (path, want) in table {
            assert_eq!(super::allowed_path(path, &prefixes), want, "{path}");
        }
        assert!(!super::allowed_path("/health", &[]));
    }

    #[test]
    fn only_plain_paths_pass_under_an_allowed_prefix() {
        let prefixes = ["/public/".to_owned(), "/my%20files/".to_owned()];
        for ok in [
            "/public/",
            "/public/a-b_c~d.e",
            "/public/Zx9!$&'()*+,=:@/deep",
            "/public/caf%41%7e%2D",
            // The operator's own prefix is taken as written.
            "/my%20files/report",
        ] {
            assert!(super::allowed_path(ok, &prefixes), "{ok}");
        }
        for held in [
            "/private/x",
            "/public/%c0%ae%c0%ae/admin",
            "/public/%C0%AF",
            "/public/caf%C3%A9",
            "/public/%e0%80%ae%e0%80%ae/",
            "/public/%u002e%u002e/admin",
            "/public/..%20/admin",
            "/public/..%09/admin",
            "/public/..%00/admin",
            "/public/.%00./admin",
            "/public/%2e",
            "/public/%2F",
            "/public/%3b",
            "/public/%25",
            "/public/%",
            "/public/%4",
            "/public/%zz",
            "/public/a;b",
            "/public/a\\b",
            "/public/a|b",
            "/public/{x}",
            "/public/.../admin",
            "/my%20files/%20",
        ] {
            assert!(!super::allowed_path(held, &prefixes), "{held}");
        }
    }

    #[test]
    fn transfer_codings_are_read_as_one_list() {
        use http::header::{self, HeaderMap, HeaderValue};
        let of = |lines: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(header::TRANSFER_ENCODING, HeaderValue::from_static(line));
            }
            super::codings(&headers)
        };
        assert_eq!(of(&[]), super::Codings::None);
        for one in [
            &["chunked"][..],
            &["Chunked "],
            &["chunked,"],
            &[", chunked"],
        ] {
            assert_eq!(of(one), super::Codings::Chunked, "{one:?}");
        }
        for again in [&["chunked, chunked"][..], &["chunked", "chunked"]] {
            assert_eq!(of(again), super::Codings::ChunkedAgain, "{again:?}");
        }
        for other in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["identity"],
            &[""],
        ] {
            assert_eq!(of(other), super::Codings::Other, "{other:?}");
        }
    }
}
