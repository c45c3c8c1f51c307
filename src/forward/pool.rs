//! The upstream servers and the keep-alive connections that reach them.
//!
//! Connections are kept open between requests, so that a busy proxy reuses them instead of
//! leaving a TIME_WAIT socket per request. Plain `http://` servers, the common case and the
//! hot path, are reached through hyper's own HTTP/1.1 connections pooled here (`Http1Pool`),
//! and so are `https://` servers that speak HTTP/1.1, over TLS; the relay's sockets to both
//! (`RawStream`: TLS sessions to an `https://` server) are pooled beside them (`RawList`);
//! `h2c://` servers, and `https://` servers that choose HTTP/2 by ALPN, through
//! HTTP/2 connections kept here by each worker, as many as the streams in use need (`H2Slot`,
//! `UpstreamPool::h2`): only here is an `https://`
//! server's protocol known before the request's host is named (`https_over_h2`), and only
//! here is a request the server refused unprocessed (as one going away refuses those racing
//! its `GOAWAY`) sent again rather than answered as an outage, when its body is empty or held
//! whole: a gRPC call's streamed body is not kept to be sent twice. The pools
//! live as long as the upstream config they were built from: a reload with the same
//! `[upstream]` keeps them. Each worker thread (`crate::workers`) has connections of its own,
//! so that a request never waits on another thread.
//!
//! `upstream.connect_timeout` bounds opening a connection whole, an `https://` server's TLS
//! handshake included (`Timed`). Every connection opened here, on any path, first takes its
//! place under the bound on upstream sockets (`super::sockets`), and carries it until closed.

use super::sockets::{self, Counted, Idle, Sockets};
use super::Hop;
use crate::body::Body;
use crate::config::{Protocol, Upstream, UpstreamConfig};
use crate::health::Passive;
use crate::tls::TlsError;
use crate::workers::PerWorker;
use http::uri::{Parts as UriParts, Uri};
use http::{header, Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

/// `https://` servers (HTTP/2 when ALPN offers it).
pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A `101` to a request that asked for no upgrade, or with no `Upgrade`: the client is left a
/// head it cannot use, so the server failed (the relay and hyper's path judge it alike).
pub const UNASKED_SWITCH: &str = "101 to a request that asked for no upgrade";

/// The largest response head taken from a server, over HTTP/1.1 and HTTP/2; a larger one is
/// refused as malformed, and the client gets the outage answer. Clients give up on much less
/// than hyper's own bound of about 400 KiB (curl at 100 KB, Python's h2 at 64 KiB), which
/// would show them a broken answer; nginx stops at 4–8 KiB with a 502.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why a request got no response from a server.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection could not be opened (refused, unreachable, TCP connect or TLS handshake
    /// past `connect_timeout`).
    #[error("{}", crate::tls::upstream_failure(&**.0))]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed or closed before a response head arrived. Its text names the
    /// causes too: hyper's own says only which step failed ("client error (Connect)"), and the
    /// log line and `ctl health`'s last error would not say why.
    #[error("{}", crate::tls::upstream_failure(.0))]
    Http(#[from] hyper::Error),
    /// The connection failed or closed before a response head arrived (`crate::relay`).
    #[error("{}", crate::tls::upstream_failure(.0))]
    Io(#[source] std::io::Error),
    /// The connection another request was opening for this one could not be opened: that
    /// request tells the server's checker, so this one is not counted again.
    #[error("{0}")]
    Shared(String),
    /// The server's answer broke HTTP/1.1 (`crate::relay`).
    #[error("invalid response: {0}")]
    Protocol(&'static str),
}

impl SendError {
    /// Whether no connection was made, so the request never left.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) | SendError::Shared(_) => true,
            SendError::Http(_) | SendError::Io(_) | SendError::Protocol(_) => false,
        }
    }
}

pub struct UpstreamPool {
    pub servers: Vec<Upstream>,
    /// Each server's name as the access log writes it, made once: a logged request takes a
    /// reference, where writing the name per request allocated.
    pub names: Vec<Arc<str>>,
    pub config: UpstreamConfig,
    /// The TLS settings for `https://` servers, shared with the health checks.
    pub tls: Arc<rustls::ClientConfig>,
    /// `http://` servers.
    http1: Http1Pool,
    /// `h2c://` and `https://` servers, connections per worker, as `Http1Pool` keeps one idle
    /// list per worker: a connection's task runs on the thread that opened it.
    clients: PerWorker<Clients>,
    /// Dials `https://` servers offering HTTP/2 and HTTP/1.1 by ALPN.
    tls_h2: TimedHttps,
    /// By server index: the `https://` server chose HTTP/1.1 when offered HTTP/2, so its
    /// requests go to `Http1Pool` without dialing to ask again. Shared by the workers.
    https_http1: Vec<AtomicBool>,
    /// How many `https://` servers are not known to choose HTTP/1.1: the relay takes requests
    /// only once none is (`relayable`), since it cannot speak HTTP/2.
    https_unknown: AtomicUsize,
    /// By server index: the `https://` server chose HTTP/2 when the relay asked it (`ask`).
    chose_h2: Vec<AtomicBool>,
    /// How many `https://` servers chose HTTP/2 when asked: with one, the relay takes no
    /// request (`may_relay`), since it would never send that server one.
    https_h2: AtomicUsize,
    /// By server index, for an `https://` server whose protocol is not known: when the relay
    /// may ask it (`ask`), in milliseconds after `born`. `0`: never asked yet; `ASKED`: being
    /// asked, or it answered. A server that could not be reached is asked again later, each
    /// time later (`ask_backoff`), and only while its checks count it healthy: asked once
    /// for good, one server down as the proxy started kept the relay off for every server
    /// until a restart.
    ask_at: Vec<AtomicU64>,
    /// By server index: the asks that failed in a row.
    failed_asks: Vec<AtomicU32>,
    /// How many `https://` servers the relay has never asked: they are asked as a request
    /// waits (`learn`), the others in the background (`relay_server`).
    unasked: AtomicUsize,
    born: Instant,
    next: AtomicUsize,
}

struct Clients {
    /// By server index: the HTTP/2 connections to an `h2c://` server, or to an `https://`
    /// server that chose HTTP/2, shared by this worker's requests as HTTP/2 multiplexes them.
    h2: Vec<Arc<H2Slot>>,
}

/// One worker's HTTP/2 connections to one `h2c://` or `https://` server.
///
/// More than one, because a server lets a connection carry only so many streams at once
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`: 100 for Apache and h2o, 128 for nginx, 250 for Go):
/// on a connection whose streams are all taken, by server-sent events, slow downloads or
/// long gRPC calls, a request waits inside h2 for one to end, and got the outage answer
/// after `response_timeout` from a healthy server. So a request goes on the oldest
/// connection with a stream free, and when none has one, another connection is opened, as
/// Go's and Envoy's clients do; the extra ones go idle once the peak has passed, and are let
/// go after `upstream.idle_timeout`.
struct H2Slot {
    /// Oldest first, at most `MAX_H2_PER_SERVER`.
    kept: Mutex<Vec<Kept2>>,
    /// Itself, for the streams taken on its connections (`OpenStream`), and the bound on
    /// upstream sockets: a connection whose last stream ends while a request waits for room
    /// is closed for it, as an HTTP/1.1 one coming back to its pool is.
    me: Weak<H2Slot>,
    sockets: Sockets,
    /// Held while a connection is dialed, so that a burst of requests finding none with room
    /// waits for one handshake rather than making one each (hyper-util's pool did the same).
    /// It keeps when the last dial failed, and why: the requests that waited for it fail with
    /// it.
    dialing: tokio::sync::Mutex<Option<(Instant, String, Option<sockets::LimitReached>)>>,
}

/// At most this many HTTP/2 connections are kept by each worker for each server. Beyond
/// them, with every stream of every one taken, a request waits in h2 on the connection with
/// the fewest waiting, as it did on the one connection kept before: this bounds the
/// connections a server that allows one stream (or none) at a time would have opened, at
/// 6,400 streams at once per worker with the 100 hyper assumes (8,192 with nginx's 128).
/// Each connection counts under the bound on upstream sockets too.
const MAX_H2_PER_SERVER: usize = 64;

/// What one stream's answer from an HTTP/2 server may bring ahead of its client's reading:
/// about what a stalled HTTP/2 client's stream holds on the client's side (a 2 MiB window,
/// hyper's default, let each client that stops reading hold 2 MiB).
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// The connection's window, as wide as the streams a server commonly allows at once (nginx's
/// 128) can take together: a connection's shared window (hyper's default is 5 MiB) was filled
/// by the streams of two or three clients that stopped reading, leaving every other answer on
/// that connection without a byte until `send_timeout` closed them. Not the most h2 allows
/// (2 GiB, as Apache's mod_http2 opens it): what a connection may hold unread stays bounded,
/// at 32 MiB.
const H2_CONNECTION_WINDOW: u32 = 128 * H2_STREAM_WINDOW;

impl H2Slot {
    /// Lets the connections go that no request went on since `before`: each closes once the
    /// streams still open on it are done.
    fn reap(&self, before: Instant) {
        lock(&self.kept).retain(|k| k.used >= before && !k.sender.is_closed());
    }
}

impl Idle for H2Slot {
    /// A connection with no stream open is idle, and closes once let go. The others are
    /// left in place, however old: their requests are under way.
    fn close_oldest(&self) -> bool {
        let idle = {
            let mut kept = lock(&self.kept);
            let i = kept
                .iter()
                .position(|k| k.open.load(Ordering::Relaxed) == 0 && !k.sender.is_closed());
            i.map(|i| kept.remove(i))
        };
        idle.is_some()
    }
}

type Sender2 = http2::SendRequest<Body>;

/// An HTTP/2 connection's sender, with when the connection was opened and a stream taken on
/// it for one request.
struct Taken {
    sender: Sender2,
    dialed: Instant,
    stream: OpenStream,
}

/// A connection an `H2Slot` keeps.
struct Kept2 {
    sender: Sender2,
    /// Its task, which tells how many streams its server allows at once.
    task: Arc<dyn Allowed>,
    /// When it was opened: a request its server refused goes on another connection, and
    /// this one is let go (`take_h2`).
    dialed: Instant,
    /// When a request last went on it.
    used: Instant,
    /// The requests on it whose response has not ended (`OpenStream`).
    open: Arc<AtomicUsize>,
    /// Whether its server's `SETTINGS` have come, and how long they are waited for: until
    /// then it carries only the request that opened it (`waiting`).
    preface: Arc<Preface>,
    settle_by: Instant,
}

impl Kept2 {
    /// How many requests, one more included, would wait in h2 for a stream on it beyond what
    /// its server allows at once: 0 when it has room for one more. Until the server's
    /// `SETTINGS` have come (`settling`) it is taken to allow one, the request that opened
    /// it: hyper would assume 100, as Go's client does, and a burst put on it waited in h2
    /// for a stream in turn, past `response_timeout`, on a server allowing fewer. Once the
    /// wait for them is over without them, hyper's 100 stand, as they did before.
    ///
    /// Read with none open too: a server may allow none for a while
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS` 0, RFC 9113 §6.5.2, as one about to go away may
    /// send), and a request put on such a connection waited in h2 for a stream until
    /// `response_timeout`, then got the outage answer, where a new connection would have
    /// served it at once. The two locks it takes (the connection's task, h2's state) are this
    /// worker's alone: the connection's task runs on its thread.
    fn waiting(&self, now: Instant) -> usize {
        let open = self.open.load(Ordering::Relaxed);
        let allowed = if self.settling(now) {
            1
        } else {
            self.task.streams()
        };
        (open + 1).saturating_sub(allowed)
    }

    /// Whether its server's `SETTINGS` have not come yet, and are still waited for.
    fn settling(&self, now: Instant) -> bool {
        !self.preface.read.load(Ordering::Acquire) && now < self.settle_by
    }

    /// Takes a stream on it, kept in `slot`, for one request.
    fn take(&mut self, now: Instant, slot: &H2Slot) -> Taken {
        self.used = now;
        self.open.fetch_add(1, Ordering::Relaxed);
        Taken {
            sender: self.sender.clone(),
            dialed: self.dialed,
            stream: OpenStream {
                open: self.open.clone(),
                slot: slot.me.clone(),
            },
        }
    }
}

/// One request's place among the streams of an HTTP/2 connection, taken as the request is
/// sent and given back when dropped: with the response's body, which carries it until its
/// end (`Body::Multiplexed`), or with the request, when it failed or was given up. An atomic
/// counter's step each way, on the HTTP/2 path alone.
pub struct OpenStream {
    open: Arc<AtomicUsize>,
    slot: Weak<H2Slot>,
}

impl Drop for OpenStream {
    /// The last stream of its connection ending while a request waits for room at the bound
    /// on upstream sockets: an idle connection of the slot is closed for it (this one, unless
    /// a request took it meanwhile). Only one idle when the wait began was closed before, and
    /// the request failed after `connect_timeout` while this one sat idle.
    fn drop(&mut self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(slot) = self.slot.upgrade() else {
            return;
        };
        if slot.sockets.wanted() && slot.sockets.claim_close() && !slot.close_oldest() {
            slot.sockets.owe_close();
        }
    }
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

/// The name a server's certificate is checked against: the URL's host, as hyper-rustls takes
/// it, but an IPv6 address without its zone (`[fe80::1%eth0]`, as the config keeps it): the
/// zone says which interface to dial, and is no part of the address a certificate names
/// (RFC 6874). hyper-rustls's own took the whole for a host name, and every connection to an
/// `https://` server or webhook written with a zone failed with "invalid dns name".
fn server_name(
    uri: &Uri,
) -> Result<rustls::pki_types::ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    let host = uri.host().unwrap_or_default();
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(literal) => literal
            .split_once('%')
            .map_or(literal, |(address, _zone)| address),
        None => host,
    };
    rustls::pki_types::ServerName::try_from(host.to_owned())
}

/// The TLS-capable connector over `tcp`.
pub fn https_connector(tcp: HttpConnector, tls: &Arc<rustls::ClientConfig>) -> HttpsConnector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls::ClientConfig::clone(tls))
        .https_or_http()
        .with_server_name_resolver(server_name)
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp)
}

/// The connector for `https://` servers that are not asked for HTTP/2: no ALPN, so the
/// connection is HTTP/1.1 whatever the server prefers.
pub fn https1_connector(tcp: HttpConnector, tls: &Arc<rustls::ClientConfig>) -> HttpsConnector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls::ClientConfig::clone(tls))
        .https_or_http()
        .with_server_name_resolver(server_name)
        .enable_http1()
        .wrap_connector(tcp)
}

/// A connector that must have the connection open within `limit` (`upstream.connect_timeout`):
/// the name lookup of a server named by host name, the TCP connect and, for `https://`, the
/// TLS handshake together, as nginx bounds its upstream handshake by `proxy_connect_timeout`
/// too. `HttpConnector`'s own timeout covers the TCP connect alone: without this one, a server
/// that accepts and never answers the handshake (or a name server that never answers) held
/// each request until `response_timeout`, and failed it as a request sent, where a connect
/// error is retried on another server as one that never left.
///
/// It takes the socket's place under the bound on upstream sockets first, waiting for one at
/// most `limit` too, and the connection carries it (`Counted`).
#[derive(Clone)]
struct Timed<C> {
    inner: C,
    limit: Duration,
    sockets: Sockets,
}

impl<C> Timed<C> {
    fn new(inner: C, limit: Duration, sockets: Sockets) -> Timed<C> {
        Timed {
            inner,
            limit,
            sockets,
        }
    }
}

impl<C> Timed<C>
where
    Timed<C>: Service<Uri, Error = BoxError> + Clone,
{
    /// A new connection to `uri`; any failure is a connect error (the request never left).
    async fn open(&self, uri: Uri) -> Result<<Self as Service<Uri>>::Response, SendError> {
        let mut connector = self.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        connector.call(uri).await.map_err(SendError::Connect)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> Service<Uri> for Timed<C>
where
    C: Service<Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = Counted<C::Response>;
    type Error = BoxError;
    // Boxed, as `HttpConnector`'s future is: connections are opened rarely.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let limit = self.limit;
        let sockets = self.sockets.clone();
        let authority = uri.authority().cloned();
        // Lazy, as the connectors' futures are: nothing is opened before the permit is had.
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            // Waiting for room is not connecting: a connection then has its whole
            // `connect_timeout`, so that a slow start is not taken for the server's.
            let permit = sockets.acquire(limit).await?;
            match tokio::time::timeout(limit, connecting).await {
                Ok(opened) => opened
                    .map(|io| Counted::new(io, permit))
                    .map_err(Into::into),
                Err(_) => {
                    let server = authority.as_ref().map_or("the server", |a| a.as_str());
                    let why =
                        format!("no connection to {server} within connect_timeout ({limit:?})");
                    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why).into())
                }
            }
        })
    }
}

type TimedHttps = Timed<HttpsConnector>;
type TimedTcp = Timed<HttpConnector>;

/// `UpstreamPool::ask_at` of a server being asked its protocol, or that answered.
const ASKED: u64 = u64::MAX;

/// How long after its `failures`-th failed ask in a row an `https://` server that could not
/// be reached is asked its protocol again: 1 s, doubled each time up to 30 s, as it is asked
/// only while its checks count it healthy (`UpstreamPool::relay_server`).
fn ask_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(5);
    Duration::from_secs(1u64 << doublings).min(Duration::from_secs(30))
}

/// At most this many idle connections are kept per server, as hyper-util's pool was set to.
const MAX_IDLE_PER_SERVER: usize = 1024;

/// A request that cannot be sent a second time (a `POST`, a streamed upload) goes only on a
/// kept connection idle for less than this, else on a new one. A server closes a connection
/// idle past its own keep-alive timeout (2 s for gunicorn, 5 s for Node.js, uvicorn and
/// Apache) as the next request arrives; a request that may act twice cannot be sent again
/// then, and its client would get the outage answer from a healthy server. Under load
/// connections never idle this long, so it costs nothing there.
const FRESH: Duration = Duration::from_secs(1);

/// How often kept connections are looked over for those idle too long or closed by their
/// server: a look is a lock and a readiness check per connection kept, mostly no system call.
const SWEEP: Duration = Duration::from_secs(1);

impl UpstreamPool {
    /// `workers`: the data plane's threads (`crate::workers`), each with idle lists of its own.
    /// `sockets`: the bound on upstream sockets, shared with the pools built before and after.
    pub fn new(
        config: &UpstreamConfig,
        workers: usize,
        sockets: &Sockets,
    ) -> Result<UpstreamPool, TlsError> {
        let tls = crate::tls::client_config(config)?;
        let tcp = tcp_connector(config.connect_timeout);
        let clients = PerWorker::new(workers, |_| Clients {
            h2: config
                .servers
                .iter()
                .map(|_| {
                    Arc::new_cyclic(|me| H2Slot {
                        kept: Mutex::default(),
                        dialing: tokio::sync::Mutex::default(),
                        me: me.clone(),
                        sockets: sockets.clone(),
                    })
                })
                .collect(),
        });
        // The HTTP/1.1 pool's reaper lets the HTTP/2 connections idle for `idle_timeout` go
        // too, as hyper-util's pool closed them.
        let h2_slots = clients
            .all()
            .iter()
            .flat_map(|c| c.h2.iter().map(Arc::downgrade))
            .collect();
        // At the bound on upstream sockets, an idle one is closed for a request that needs
        // room, as an idle HTTP/1.1 one is; forgotten with this pool.
        for slot in clients.all().iter().flat_map(|c| c.h2.iter()) {
            let slot: Arc<dyn Idle> = slot.clone();
            sockets.register(Arc::downgrade(&slot));
        }
        Ok(UpstreamPool {
            servers: config.servers.clone(),
            names: config
                .servers
                .iter()
                .map(|s| s.to_string().into())
                .collect(),
            config: config.clone(),
            http1: Http1Pool::new(
                &config.servers,
                Timed::new(tcp.clone(), config.connect_timeout, sockets.clone()),
                Timed::new(
                    https1_connector(tcp.clone(), &tls),
                    config.connect_timeout,
                    sockets.clone(),
                ),
                config.idle_timeout,
                workers,
                h2_slots,
            ),
            clients,
            tls_h2: Timed::new(
                https_connector(tcp.clone(), &tls),
                config.connect_timeout,
                sockets.clone(),
            ),
            https_http1: config
                .servers
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect(),
            https_unknown: AtomicUsize::new(
                config
                    .servers
                    .iter()
                    .filter(|s| s.protocol == Protocol::Https)
                    .count(),
            ),
            chose_h2: config
                .servers
                .iter()
                .map(|_| AtomicBool::new(false))
                .collect(),
            https_h2: AtomicUsize::new(0),
            ask_at: config.servers.iter().map(|_| AtomicU64::new(0)).collect(),
            failed_asks: config.servers.iter().map(|_| AtomicU32::new(0)).collect(),
            unasked: AtomicUsize::new(
                config
                    .servers
                    .iter()
                    .filter(|s| s.protocol == Protocol::Https)
                    .count(),
            ),
            born: Instant::now(),
            tls,
            next: AtomicUsize::new(0),
        })
    }

    /// Sends `req` to server `index` over a connection that speaks its protocol. The response
    /// body of an `http://` server gives its connection back to the pool when read whole; that
    /// of an HTTP/2 server its stream, when it ends or is dropped.
    ///
    /// `hop`: the request came over HTTP/2, its fields not yet rewritten (`forward::Hop`), and
    /// it may go on a kept raw socket (`crate::relay::upstream`) when its server speaks
    /// HTTP/1.1 (`http://`, or `https://` known to choose it) and the request fits
    /// (`crate::relay::fits`), its fields written from hyper's map as the rules make them:
    /// hyper's HTTP/1.1 client cost some 5,000 instructions per request parsing the answer
    /// into its own map, besides its dispatch between the request's task and the
    /// connection's, and the rewritten map some 3,900. Any other has its map rewritten here.
    ///
    /// A request that fails before any of it was sent (no connection could be opened, or
    /// hyper gave it back from a new one that closed first) is put back in `unsent`, as
    /// `forward::aim` and the hop made it, its body untouched: it may go to another server
    /// whatever its method and body (a streamed one too), as nothing of it reached this one.
    /// A request the relay takes has its body held whole, and is not given back.
    #[allow(clippy::manual_async_fn)] // see `forward`'s module docs
    pub fn request<'a>(
        &'a self,
        index: usize,
        mut req: Request<Body>,
        hop: Option<&'a Hop<'a>>,
        unsent: &'a mut Option<Box<Request<Body>>>,
        gave_up: &'a AtomicBool,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + 'a {
        async move {
            let protocol = self.servers.get(index).map(|s| s.protocol);
            let relay = hop.is_some()
                && match protocol {
                    Some(Protocol::Http) => true,
                    Some(Protocol::Https) => self.known_http1(index),
                    _ => false,
                };
            // What `fits_body` says of the fields as they came holds of them rewritten: with
            // no `Connection` to name it, no rule takes out the length. The rest of `fits` is
            // asked as the fields are written (`relay::encoded`), which gives back a request
            // whose rewritten fields do not fit.
            if relay && crate::relay::fits_body(&req) {
                match crate::relay::encoded(req, hop.zip(self.servers.get(index))) {
                    // Boxed, as the rare paths are: its state would make hyper's path's larger.
                    Ok(encoded) => {
                        return Box::pin(crate::relay::upstream(self, index, encoded)).await
                    }
                    Err(rewritten) => req = *rewritten,
                }
            } else if let (Some(hop), Some(server)) = (hop, self.servers.get(index)) {
                hop.apply(req.headers_mut(), server);
            }
            match protocol {
                Some(Protocol::Http) => self.http1.request(index, req, unsent).await,
                // Boxed: the rare paths must not make every request's future larger.
                Some(Protocol::H2c) => Box::pin(self.h2c(index, req, unsent, gave_up)).await,
                _ => Box::pin(self.https(index, req, unsent, gave_up)).await,
            }
        }
    }

    /// Sends `req` to `h2c://` server `index` over one of this worker's HTTP/2 connections to
    /// it. `req` comes as `forward::aim` makes it for HTTP/2 (the server's `:authority`, no
    /// `Host`), and stays so: with prior knowledge there is no protocol to choose, nor HTTP/1.1
    /// to fall back on.
    async fn h2c(
        &self,
        index: usize,
        req: Request<Body>,
        unsent: &mut Option<Box<Request<Body>>>,
        gave_up: &AtomicBool,
    ) -> Result<Response<Body>, SendError> {
        let clients = self.clients.local();
        let slot = clients
            .h2
            .get(index)
            .ok_or_else(|| SendError::Connect("no such server".into()))?;
        match self.h2(index, slot, None, req, unsent, gave_up).await? {
            Ok(resp) => Ok(resp),
            // Never: only an `https://` server's dial can find HTTP/1.1.
            Err(_) => Err(SendError::Connect("the h2c server spoke no HTTP/2".into())),
        }
    }

    /// Sends `req` to `https://` server `index`: over one of this worker's HTTP/2 connections
    /// to it when the server chose HTTP/2 by ALPN, else over HTTP/1.1. `req` comes as
    /// `forward::aim` makes it for HTTP/1.1 (the server's URI, the client's `Host`), and is
    /// made an HTTP/2 request only once an HTTP/2 connection is in hand: hyper-util's client
    /// picks the protocol after the request is made, and would send the client's `Host` beside
    /// an `:authority` naming the server, which is malformed (RFC 9113 §8.3.1).
    async fn https(
        &self,
        index: usize,
        mut req: Request<Body>,
        unsent: &mut Option<Box<Request<Body>>>,
        gave_up: &AtomicBool,
    ) -> Result<Response<Body>, SendError> {
        let clients = self.clients.local();
        let slot = match (clients.h2.get(index), self.https_http1.get(index)) {
            (Some(slot), Some(http1))
                if !http1.load(Ordering::Relaxed)
                    && !req.headers().contains_key(header::UPGRADE) =>
            {
                Some((slot, http1))
            }
            _ => None,
        };
        if let Some((slot, http1)) = slot {
            // As `forward::aim` made it: what the HTTP/1.1 client gets back, should the
            // server no longer choose HTTP/2 after the request was made an HTTP/2 one.
            let made = (
                req.uri().clone(),
                req.headers().get(header::HOST).cloned(),
                req.version(),
            );
            let unmade = |req: &mut Request<Body>, (uri, host, version)| {
                *req.uri_mut() = uri;
                *req.version_mut() = version;
                if let Some(host) = host {
                    req.headers_mut().insert(header::HOST, host);
                }
            };
            req = match self
                .h2(index, slot, Some(http1), req, unsent, gave_up)
                .await
            {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(mut req)) => {
                    unmade(&mut req, made);
                    req
                }
                // Given back as `forward::aim` made it, for a server that may speak either.
                Err(e) => {
                    if let Some(req) = unsent {
                        unmade(req, made);
                    }
                    return Err(e);
                }
            };
        }
        // Over HTTP/1.1 the request names the path alone, as to an `http://` server (RFC 9112
        // §3.2.1), and goes through the same pool: its own lists of kept connections, and its
        // rule for sending again a request a kept connection closed on.
        let path = req.uri().path_and_query().cloned();
        *req.uri_mut() = path.map_or_else(|| Uri::from_static("/"), Uri::from);
        let sent = self.http1.request(index, req, unsent).await;
        if let (Err(_), Some(req)) = (&sent, unsent) {
            // As `forward::aim` made it: the server's URI.
            if let Some(server) = self.servers.get(index) {
                let path = req.uri().path_and_query().cloned();
                *req.uri_mut() =
                    path.map_or_else(Uri::default, |path| super::upstream_uri(server, path));
            }
        }
        sent
    }

    /// Sends `req` over one of this worker's HTTP/2 connections to server `index`, kept in
    /// `slot`. `http1` is an `https://` server's (`https_http1`): `req` is made an HTTP/2
    /// request (`https_over_h2`) once a connection is in hand, and is given back unsent once
    /// the server chose HTTP/1.1. An `h2c://` server has none: it speaks HTTP/2 by prior
    /// knowledge.
    async fn h2(
        &self,
        index: usize,
        slot: &H2Slot,
        http1: Option<&AtomicBool>,
        mut req: Request<Body>,
        unsent: &mut Option<Box<Request<Body>>>,
        gave_up: &AtomicBool,
    ) -> Result<Result<Response<Body>, Request<Body>>, SendError> {
        let idle = self.config.idle_timeout;
        // When the connection that gave the request back, or refused it, was opened: the
        // request goes on another, dialed once however many it failed.
        let mut failed_on = None;
        // A request the server refused unprocessed is sent again once.
        let mut sent_again = false;
        // Kept connections the request was given back by: each is let go, and after
        // `KEPT_TRIES` of them a new one is dialed, as for HTTP/1.1.
        let mut kept_tries = 0;
        loop {
            let reuse = kept_tries < KEPT_TRIES;
            let kept = reuse
                .then(|| take_h2(slot, idle, failed_on, false))
                .flatten();
            let (taken, reused) = match kept {
                Some(taken) => (taken, true),
                // Boxed: a dial's future (the TLS connector's and hyper's handshake) is some
                // 8 KiB, which every request's future would otherwise carry, and copy into
                // its box, on every path through here, HTTP/1.1 to an `https://` server too.
                None => match Box::pin(self.dial_h2(index, slot, http1, failed_on, reuse)).await {
                    Ok(Some(dialed)) => dialed,
                    Ok(None) => return Ok(Err(req)),
                    // The server has a connection open with no stream free, and none more
                    // could be opened (at the bound on upstream sockets, or past
                    // `connect_timeout`): the request waits in h2 for a stream there, as it
                    // did on the one connection kept before, rather than failing at once.
                    Err(e) => match take_h2(slot, idle, failed_on, true) {
                        Some(taken) => (taken, true),
                        None => {
                            *unsent = Some(Box::new(req));
                            return Err(e);
                        }
                    },
                },
            };
            let Taken {
                mut sender,
                dialed,
                stream,
            } = taken;
            if http1.is_some() {
                https_over_h2(&mut req);
            }
            // A stream the server refuses takes the request with it, so a copy is kept to
            // send again when its body can be sent twice: a clone of its header map and URI
            // for every such request on this path (HTTP/2 to an `h2c://` or `https://`
            // server, where HTTP/2 framing, and TLS, cost far more), since a refusal is known
            // only once the request has left.
            let again = (!sent_again).then(|| copy_whole(&req)).flatten();
            let mut waiting = Waiting {
                slot,
                dialed,
                gave_up,
                over: false,
            };
            let sent = sender.try_send_request(req).await;
            waiting.over = true;
            match sent {
                Ok(resp) => return Ok(Ok(multiplexed(resp, stream))),
                Err(mut e) => match (e.take_message(), again) {
                    // A kept connection the server closed (idle, or GOAWAY) before the
                    // request left: sent on a new one, as hyper-util's client does.
                    (Some(unsent), _) if reused => {
                        req = unsent;
                        failed_on = Some(dialed);
                        kept_tries += 1;
                    }
                    // A new connection that closed before the request left: given back.
                    (Some(back), _) => {
                        *unsent = Some(Box::new(back));
                        return Err(SendError::Http(e.into_error()));
                    }
                    // A kept connection that closed under an idempotent request before its
                    // answer's head came (with no `GOAWAY`: the server's process restarted, a
                    // NAT or balancer between that forgot the connection and reset it), as an
                    // HTTP/1.1 one is, whatever else was on it: once, on another connection.
                    (None, Some(copy))
                        if reused
                            && super::idempotent(copy.method())
                            && h2_closed_unanswered(e.error()) =>
                    {
                        tracing::debug!(
                            error = %crate::logging::with_causes(e.error()),
                            "a kept HTTP/2 connection closed before the answer; sending again"
                        );
                        req = copy;
                        sent_again = true;
                        failed_on = Some(dialed);
                    }
                    // Whatever its method: the server says it did nothing with it.
                    (None, Some(copy)) if refused_unprocessed(e.error()) => {
                        tracing::debug!(
                            error = %crate::logging::with_causes(e.error()),
                            "an upstream refused a request unprocessed; sending it again"
                        );
                        req = copy;
                        sent_again = true;
                        failed_on = Some(dialed);
                    }
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// A stream on a new HTTP/2 connection to server `index`, and whether that connection was
    /// kept already: with `reuse`, one another request dialed while this one waited its turn
    /// (after the one opened at `failed_on`, when given), or that a stream ended on meanwhile.
    /// `None` once the `https://` server chose HTTP/1.1.
    async fn dial_h2(
        &self,
        index: usize,
        slot: &H2Slot,
        http1: Option<&AtomicBool>,
        failed_on: Option<Instant>,
        reuse: bool,
    ) -> Result<Option<(Taken, bool)>, SendError> {
        let queued = Instant::now();
        let mut failed = slot.dialing.lock().await;
        if http1.is_some_and(|http1| http1.load(Ordering::Relaxed)) {
            return Ok(None);
        }
        if reuse {
            // The connection the request before this one opened carries only that request
            // until its server's `SETTINGS` say how many it allows at once: those come a round
            // trip after the connect at most, and the burst behind this request waits for them
            // as this one does, holding `dialing`, then finds the connection as it is.
            let settling = {
                let now = Instant::now();
                let kept = lock(&slot.kept);
                kept.iter()
                    .rev()
                    .find(|k| failed_on.is_none_or(|at| k.dialed != at) && k.settling(now))
                    .map(|k| (k.preface.clone(), k.settle_by))
            };
            if let Some((preface, by)) = settling {
                preface.arrived(by).await;
            }
            if let Some(kept) = take_h2(slot, self.config.idle_timeout, failed_on, false) {
                return Ok(Some((kept, true)));
            }
        }
        // A dial that failed while this request waited for it fails this one too (as a
        // connection never opened, so it may go elsewhere): dialing again in turn would keep
        // the n-th request of a burst to a server stuck in its handshake n × connect_timeout.
        // Counted once against the server, by the request that dialed: one failed handshake
        // shared by a burst must not count as one per request and take a server out.
        if let Some((at, why, limit)) = &*failed {
            if *at >= queued {
                // The bound reached is the proxy's, told as such: no server is blamed or
                // tried next for it.
                return Err(match limit {
                    Some(limit) => SendError::Connect(Box::new(limit.clone())),
                    None => SendError::Shared(why.clone()),
                });
            }
        }
        self.http1.start_reaper();
        let dialed = self.connect_h2(index).await;
        *failed = dialed.as_ref().err().map(|e| {
            let limit = sockets::reached_in(e).cloned();
            (Instant::now(), e.to_string(), limit)
        });
        let Some((sender, task, preface)) = dialed? else {
            // The connection is dropped unused: it is made once per server, and hyper-util's
            // client cannot take it.
            if let Some(http1) = http1 {
                if !http1.swap(true, Ordering::Relaxed) {
                    self.https_unknown.fetch_sub(1, Ordering::Relaxed);
                }
                if self
                    .chose_h2
                    .get(index)
                    .is_some_and(|h2| h2.swap(false, Ordering::Relaxed))
                {
                    self.https_h2.fetch_sub(1, Ordering::Relaxed);
                }
            }
            return Ok(None);
        };
        // The request that dialed goes at once, right behind the client preface, as h2
        // clients send their first: it waited for the server's `SETTINGS` too, a round trip
        // more on every new connection. Until they come, the connection takes no other
        // (`Kept2::waiting`): hyper would take it to allow 100 streams at once, and a burst
        // waiting for this dial went on it, those beyond what the server allows waiting in h2
        // for a stream, in turn, past `response_timeout` (a server allowing 1, 50 requests at
        // once: 76 of 500 got the outage answer). The burst waits for them instead.
        let now = Instant::now();
        let mut conn = Kept2 {
            sender,
            task,
            dialed: now,
            used: now,
            open: Arc::new(AtomicUsize::new(0)),
            preface,
            settle_by: now + self.config.connect_timeout,
        };
        let taken = conn.take(now, slot);
        let mut kept = lock(&slot.kept);
        // At the bound, with every stream taken (`take_h2`), the new connection serves the
        // request that dialed it and then closes; it is not kept in place of one in use.
        if kept.len() < MAX_H2_PER_SERVER {
            kept.push(conn);
        }
        Ok(Some((taken, false)))
    }

    /// A new HTTP/2 connection to server `index`: over TCP alone to an `h2c://` server; to an
    /// `https://` one over TLS offering HTTP/2 and HTTP/1.1, `None` when it chose HTTP/1.1.
    /// The TLS server name (SNI and the certificate's check) is the configured server's,
    /// whatever host the request names.
    async fn connect_h2(&self, index: usize) -> Result<Option<Dialed2>, SendError> {
        let (Some(server), Some(dial)) = (
            self.servers.get(index),
            self.http1.servers.get(index).map(|s| s.dial.clone()),
        ) else {
            return Err(SendError::Connect("no such server".into()));
        };
        if server.protocol == Protocol::H2c {
            let io = self.http1.tcp.open(dial).await?;
            return Ok(Some(handshake_h2(io).await?));
        }
        let io = self.tls_h2.open(dial).await?;
        if !io.connected().is_negotiated_h2() {
            return Ok(None);
        }
        Ok(Some(handshake_h2(io).await?))
    }

    /// Whether the relay can reach every server: each is `http://`, or `https://` and known
    /// to choose HTTP/1.1 (`https_http1`). A plain load on the relay's hot path.
    pub fn relayable(&self) -> bool {
        self.https_unknown.load(Ordering::Relaxed) == 0
    }

    /// Whether the relay may take requests: every server is known to it, or none chose
    /// HTTP/2 (those not known are still to be asked, or could not be reached, and the relay
    /// serves the others: `relay_server`). Otherwise each request went through the relay's
    /// parsing and a loop over the servers only to go to hyper, which parsed it again
    /// (helper-142). One relaxed load while every server is known.
    pub fn may_relay(&self) -> bool {
        self.relayable() || self.https_h2.load(Ordering::Relaxed) == 0
    }

    /// Whether an `https://` server has never been asked its protocol (`learn`).
    pub fn unasked(&self) -> bool {
        self.unasked.load(Ordering::Relaxed) > 0
    }

    /// Asks each `https://` server never asked yet which protocol it chooses, as a request
    /// on hyper's path learns it (`dial_h2`: a connection offering HTTP/2 and HTTP/1.1, kept
    /// when the server chooses HTTP/2, let go when it chooses HTTP/1.1), while the request
    /// that brought it waits: without it, the first requests of every client connection went
    /// to hyper's path, and a busy keep-alive connection stays there. One that cannot be
    /// reached is told to its checker (`passive`) as any failed connect is, and asked again
    /// later (`relay_server`).
    pub async fn learn(&self, passive: &[Passive]) {
        for index in 0..self.servers.len() {
            let Some(at) = self.ask_at.get(index) else {
                continue;
            };
            if !self.unknown_https(index)
                || at
                    .compare_exchange(0, ASKED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            self.unasked.fetch_sub(1, Ordering::Relaxed);
            self.ask(index, passive).await;
        }
    }

    /// A server for a request the relay takes while some `https://` server's protocol is not
    /// known: the next healthy one it reaches (`pick_known`), `None` for hyper's path (one
    /// chose HTTP/2, or none it reaches is healthy). Those that could not be reached, and whose
    /// checks count them healthy again, are asked again in the background once their
    /// backoff has passed (`ask_backoff`), the request going on meanwhile: one that never
    /// answers the dial would have held it `connect_timeout`.
    pub fn relay_server(self: &Arc<Self>, up: &[bool], passive: &Arc<[Passive]>) -> Option<usize> {
        if self.https_h2.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let now = self.millis();
        for (index, at) in self.ask_at.iter().enumerate() {
            let due = at.load(Ordering::Relaxed);
            if due == 0
                || due == ASKED
                || due > now
                || !up.get(index).copied().unwrap_or(true)
                || !self.unknown_https(index)
                || at
                    .compare_exchange(due, ASKED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let (pool, passive) = (self.clone(), passive.clone());
            tokio::spawn(async move { pool.ask(index, &passive).await });
        }
        self.pick_known(up, None)
    }

    /// Asks `https://` server `index` its protocol, its `ask_at` taken (`ASKED`).
    async fn ask(&self, index: usize, passive: &[Passive]) {
        let clients = self.clients.local();
        let (Some(slot), Some(http1), Some(at), Some(failed), Some(h2)) = (
            clients.h2.get(index),
            self.https_http1.get(index),
            self.ask_at.get(index),
            self.failed_asks.get(index),
            self.chose_h2.get(index),
        ) else {
            return;
        };
        // A stream taken on an HTTP/2 connection the server chose is given back at once;
        // the connection stays kept for hyper's path.
        match self.dial_h2(index, slot, Some(http1), None, true).await {
            Ok(Some(_)) => {
                failed.store(0, Ordering::Relaxed);
                if !http1.load(Ordering::Relaxed) && !h2.swap(true, Ordering::Relaxed) {
                    self.https_h2.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(None) => failed.store(0, Ordering::Relaxed),
            Err(source) => {
                tracing::debug!(error = %source, "could not learn an https:// server's protocol");
                let server = self
                    .names
                    .get(index)
                    .map_or_else(String::new, |n| n.to_string());
                let error = match source.is_connect() {
                    true => super::UpstreamError::Connect { server, source },
                    false => super::UpstreamError::Failed { server, source },
                };
                super::report(passive, index, &error);
                let failures = failed.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                let wait = ask_backoff(failures).as_millis();
                let wait = u64::try_from(wait).unwrap_or(u64::MAX);
                at.store(
                    self.millis().saturating_add(wait).min(ASKED - 1),
                    Ordering::Relaxed,
                );
            }
        }
    }

    /// Milliseconds since the pool was made, never 0 (`ask_at`'s "never asked").
    fn millis(&self) -> u64 {
        let since = self.born.elapsed().as_millis();
        u64::try_from(since).unwrap_or(ASKED - 1).max(1)
    }

    /// Whether server `index` is `https://` and neither known to choose HTTP/1.1 nor HTTP/2.
    fn unknown_https(&self, index: usize) -> bool {
        self.servers
            .get(index)
            .is_some_and(|s| s.protocol == Protocol::Https)
            && !self.known_http1(index)
            && !self
                .chose_h2
                .get(index)
                .is_some_and(|h2| h2.load(Ordering::Relaxed))
    }

    /// Whether the relay can send to server `index`: `http://`, or `https://` known to
    /// choose HTTP/1.1.
    fn reaches(&self, index: usize) -> bool {
        match self.servers.get(index).map(|s| s.protocol) {
            Some(Protocol::Http) => true,
            Some(Protocol::Https) => self.known_http1(index),
            _ => false,
        }
    }

    /// As `pick`, among the servers the relay reaches (`reaches`), and never one taken out
    /// by its checks: with none healthy, the request is hyper's, whose `pick` knows what to
    /// do then (`force-open`), and may find a healthy server the relay does not reach.
    pub fn pick_known(&self, up: &[bool], avoid: Option<usize>) -> Option<usize> {
        let n = self.servers.len();
        let start = match avoid {
            Some(failed) => failed + 1,
            None => self.next.fetch_add(1, Ordering::Relaxed),
        };
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| Some(i) != avoid && up.get(i).copied().unwrap_or(true) && self.reaches(i))
    }

    /// A kept socket to `http://` server `index`, or TLS session to `https://` one, for
    /// `crate::relay`, from this worker's idle list, with when it was last used. `now` is the caller's reading of the
    /// clock (the relay's, taken as its request began), so that a request reads it once.
    /// `replayable`: whether the request can be sent a second time (`idle_limit`).
    pub fn raw_take(
        &self,
        index: usize,
        now: Instant,
        replayable: bool,
    ) -> Option<(RawSocket, Instant)> {
        let server = self.http1.servers.get(index)?;
        let timeout = self.http1.idle_timeout;
        server
            .raw
            .local()
            .take(now, timeout, idle_limit(timeout, replayable))
    }

    /// Whether `https://` server `index` is known to choose HTTP/1.1 (`https_http1`).
    fn known_http1(&self, index: usize) -> bool {
        self.https_http1
            .get(index)
            .is_some_and(|http1| http1.load(Ordering::Relaxed))
    }

    /// This worker's list of kept sockets to server `index`, for a body that gives its socket
    /// back once read whole, wherever it is then polled.
    pub fn raw_home(&self, index: usize) -> Option<Arc<RawList>> {
        self.http1.servers.get(index).map(|s| s.raw.local().clone())
    }

    /// Gives a socket back after a response read whole from it, at `since` (`RawList::put`).
    pub fn raw_put(&self, index: usize, stream: RawSocket, since: Instant) {
        if let Some(server) = self.http1.servers.get(index) {
            server.raw.local().put(stream, since);
        }
    }

    /// A new plain socket to `http://` server `index`, opened by the connector hyper's
    /// connections use (`connect_timeout` shared across the server's addresses, happy
    /// eyeballs, `TCP_NODELAY`, TCP keepalive); to an `https://` one, a TLS session opened as
    /// hyper's HTTP/1.1 connections open theirs (`Http1Pool::tls`: no ALPN, the server's host
    /// name for SNI and the certificate's check, `upstream.ca_file`, the handshake within
    /// `connect_timeout`).
    pub async fn raw_connect(&self, index: usize) -> Result<RawSocket, SendError> {
        let server = self
            .http1
            .servers
            .get(index)
            .ok_or_else(|| SendError::Connect("no such server".into()))?;
        self.http1.start_reaper();
        if server.dial.scheme() == Some(&http::uri::Scheme::HTTPS) {
            // Boxed: the rare path must not make every request's future larger.
            let io = Box::pin(self.http1.tls.open(server.dial.clone())).await?;
            return match &*io {
                hyper_rustls::MaybeHttpsStream::Https(_) => Ok(io.map(|io| match io {
                    hyper_rustls::MaybeHttpsStream::Https(tls) => {
                        RawStream::Tls(Box::new(tls.into_inner()))
                    }
                    hyper_rustls::MaybeHttpsStream::Http(tcp) => RawStream::Tcp(tcp.into_inner()),
                })),
                // Never: the connector speaks TLS to every `https://` URI.
                hyper_rustls::MaybeHttpsStream::Http(_) => {
                    Err(SendError::Connect("no TLS to an https:// server".into()))
                }
            };
        }
        let io = self.http1.tcp.open(server.dial.clone()).await?;
        Ok(io.map(|io| RawStream::Tcp(io.into_inner())))
    }

    /// The bound on upstream sockets its connections count under, shared with the pools
    /// built before and after it.
    pub fn sockets(&self) -> &Sockets {
        &self.tls_h2.sockets
    }

    /// How many workers this pool was built for.
    pub fn workers(&self) -> usize {
        self.clients.all().len()
    }

    /// The next healthy server in round-robin order; with nothing healthy at all
    /// (force-open), the next server whatever its health, since the operator asked to forward
    /// anyway. For a retry, `avoid` is the server that failed: the first healthy one after it,
    /// `None` when there is none, and the round-robin is not moved on. Moving it would hand
    /// the next request the failing server again: with two servers, one failing, every
    /// request would try it first and pay its failure (a hung one's `response_timeout`)
    /// instead of every other one.
    pub fn pick(&self, up: &[bool], avoid: Option<usize>) -> Option<usize> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        let start = match avoid {
            Some(failed) => failed + 1,
            None => self.next.fetch_add(1, Ordering::Relaxed),
        };
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

    /// Idle HTTP/1.1 connections kept to server `index` (`http://`, and `https://` over
    /// HTTP/1.1).
    #[cfg(test)]
    fn idle_http1(&self, index: usize) -> usize {
        self.http1.servers.get(index).map_or(0, |s| {
            s.idle.all().iter().map(|l| lock(&l.conns).len()).sum()
        })
    }
}

type Sender = http1::SendRequest<Body>;

/// A stream on one of this worker's HTTP/2 connections in `slot`: the oldest with one free,
/// so that the connections opened for a peak go idle after it; with `any`, or with
/// `MAX_H2_PER_SERVER` open, the one with the fewest requests waiting for a stream, when none
/// has one free. On the way it lets go of those its server closed, those no request went on
/// for `idle` (`upstream.idle_timeout`, as for HTTP/1.1 connections), and the one opened at
/// `failed_on` (it gave a request back or refused it, and may be going away; the others,
/// opened before or after it, need not be, and letting them go with it made a server's
/// graceful `GOAWAY` on one connection cost the worker every connection older than it):
/// each closes once the requests still on it are done. Taking a stream counts as a use.
fn take_h2(slot: &H2Slot, idle: Duration, failed_on: Option<Instant>, any: bool) -> Option<Taken> {
    let mut kept = lock(&slot.kept);
    let now = Instant::now();
    kept.retain(|k| {
        !k.sender.is_closed()
            && now.duration_since(k.used) < idle
            && failed_on.is_none_or(|at| k.dialed != at)
    });
    let any = any || kept.len() >= MAX_H2_PER_SERVER;
    let mut fewest: Option<(usize, usize)> = None;
    for (i, k) in kept.iter().enumerate() {
        let waiting = k.waiting(now);
        if waiting == 0 {
            fewest = Some((i, 0));
            break;
        }
        if any && fewest.is_none_or(|(_, w)| waiting < w) {
            fewest = Some((i, waiting));
        }
    }
    let (i, _) = fewest?;
    kept.get_mut(i).map(|k| k.take(now, slot))
}

/// A request on an HTTP/2 connection, waiting for its answer's head. Given up after waiting
/// `response_timeout` or longer (timed out, or a gRPC call's longer wait that its client
/// ended), it lets its connection go: the streams on it finish, and no new request goes on
/// it. A connection whose server no longer answers on it (its handler hung, or a NAT or
/// firewall between that dropped it without a reset) took every later request of the worker
/// as the oldest with a stream free, each answered with the outage response after
/// `response_timeout`, for as long as the proxy ran, while the server's checks, on
/// connections of their own, passed; an HTTP/1.1 connection is closed at that timeout.
struct Waiting<'a> {
    slot: &'a H2Slot,
    dialed: Instant,
    /// Set by `forward::send` once its deadline gave up on the answer's head: not the time
    /// since the stream was taken, which began after a dial the deadline counted, and which a
    /// long upload whose client left passes without anything having timed out.
    gave_up: &'a AtomicBool,
    /// The head came, or the request failed: nothing was given up.
    over: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.over && self.gave_up.load(Ordering::Relaxed) {
            lock(&self.slot.kept).retain(|k| k.dialed != self.dialed);
        }
    }
}

/// The response, carrying its stream's place on the connection (`OpenStream`) until its
/// body ends or is dropped; given back at once when there is no body.
fn multiplexed(resp: Response<Incoming>, stream: OpenStream) -> Response<Body> {
    if resp.body().is_end_stream() {
        return resp.map(Body::Stream);
    }
    resp.map(|body| Body::Multiplexed(body, Some(stream)))
}

/// An HTTP/1.1 connection over `io` (plain TCP, or TLS to an `https://` server), its task
/// spawned on this worker's thread.
async fn handshake_http1<T>(io: T) -> Result<Sender, SendError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .max_header_size(MAX_RESPONSE_HEAD)
        // The read buffer, which a body's pieces are cut from, grows to 400 KiB by
        // default, and a piece keeps all of it until the client has taken the piece:
        // for each answer streaming to a client that stops reading.
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Opens HTTP/2 over `io`, the connection's task on this worker.
async fn handshake_h2<T>(io: T) -> Result<Dialed2, SendError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let preface = Arc::new(Preface::default());
    let io = TokioIo::new(PrefaceWatch {
        io: TokioIo::new(io),
        preface: preface.clone(),
        head: [0; 9],
        read: 0,
    });
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_RESPONSE_HEAD as u32)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .handshake(io)
        .await?;
    // hyper tells the streams the server allows through the connection's task alone, which
    // the spawned task drives: the two share it, each holding the lock only for a call that
    // never waits (its poll, or the read).
    let task = Arc::new(Task2(Mutex::new(conn)));
    let driven = task.clone();
    tokio::spawn(async move {
        let ended = std::future::poll_fn(|cx| Pin::new(&mut *lock(&driven.0)).poll(cx)).await;
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok((sender, task, preface))
}

/// An HTTP/2 connection's sender, its task to read the streams its server allows from, and
/// whether the server's first `SETTINGS` has come.
type Dialed2 = (Sender2, Arc<dyn Allowed>, Arc<Preface>);

/// Whether a server's connection preface, its first `SETTINGS` (RFC 9113 §3.4), has been
/// read: until then hyper assumes the server allows 100 streams at once.
#[derive(Default)]
struct Preface {
    read: AtomicBool,
    told: tokio::sync::Notify,
}

impl Preface {
    /// Waits, until `by` at most, for the server's first `SETTINGS` to have been read. h2
    /// applies them in the same poll of the connection's task as it reads them, which ends
    /// before this task, woken, runs on the worker's thread.
    async fn arrived(&self, by: Instant) {
        let told = self.told.notified();
        tokio::pin!(told);
        // Waiting before the flag is read: told between the two, it is not missed.
        told.as_mut().enable();
        if !self.read.load(Ordering::Acquire) {
            let _ = tokio::time::timeout_at(by, told).await;
        }
    }
}

/// An HTTP/2 connection's I/O, which sees the end of the server's first frame go by (the
/// `SETTINGS` of its preface) and tells `preface`.
struct PrefaceWatch<T> {
    io: T,
    preface: Arc<Preface>,
    /// The first frame's header, as read so far.
    head: [u8; 9],
    /// How much of the first frame has been read.
    read: usize,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for PrefaceWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let (before, room) = (buf.filled().len(), buf.remaining());
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let this = &mut *self;
        if this.read == usize::MAX {
            return polled;
        }
        let new = buf.filled().get(before..).unwrap_or_default();
        for (at, &b) in this.head.iter_mut().skip(this.read).zip(new) {
            *at = b;
        }
        this.read = this.read.saturating_add(new.len());
        let [a, b, c, ..] = this.head;
        let whole = 9 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
        // Ended too at the connection's end, so that no one waits on it.
        let ended = matches!(polled, Poll::Ready(Err(_)))
            || (matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == before && room > 0);
        if (this.read >= 9 && this.read >= whole) || ended {
            this.read = usize::MAX;
            this.preface.read.store(true, Ordering::Release);
            this.preface.told.notify_waiters();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for PrefaceWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How many streams at once an HTTP/2 connection's server allows, of whatever I/O.
trait Allowed: Send + Sync {
    fn streams(&self) -> usize;
}

/// An HTTP/2 connection's task, shared by the task that drives it and its `Kept2`.
struct Task2<T>(Mutex<http2::Connection<T, Body, TokioExecutor>>)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static;

impl<T> Allowed for Task2<T>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn streams(&self) -> usize {
        lock(&self.0).current_max_send_streams()
    }
}

/// Makes a request `forward::aim` made for HTTP/1.1 an HTTP/2 one that names one host, the
/// client's: its `Host` becomes the URI's authority, which hyper sends as `:authority`, and
/// goes, since a `Host` beside a different `:authority` is malformed (RFC 9113 §8.3.1) and
/// strict servers reset such a stream. A `Host` that is no authority leaves the server's
/// (the client's stays in `X-Forwarded-Host`). Does nothing the second time.
fn https_over_h2(req: &mut Request<Body>) {
    *req.version_mut() = http::Version::HTTP_2;
    let Some(host) = req.headers_mut().remove(header::HOST) else {
        return;
    };
    let Ok(authority) = http::uri::Authority::try_from(host.as_bytes()) else {
        return;
    };
    let mut uri = req.uri().clone().into_parts();
    uri.authority = Some(authority);
    if let Ok(uri) = Uri::from_parts(uri) {
        *req.uri_mut() = uri;
    }
}

/// hyper's HTTP/1.1 client connections to the `http://` servers, and over TLS to the
/// `https://` ones that speak HTTP/1.1, pooled by server index.
///
/// Written here rather than taken from hyper-util's client because of what that client costs
/// on every forwarded request: a SipHash of the pool key at each checkout and return, a task
/// spawned per response to give its connection back, and copies of a large request future,
/// some 8,000 of the 43,500 instructions a forwarded request took (and for `https://` servers,
/// which went through it until 2026-12-06, a third of the proxy's user-space instructions
/// per request beside TLS's own); nor could its idle connections be closed to make room at
/// the bound on upstream sockets. Here a checkout takes the
/// last ready entry of a vector under an uncontended lock, and a connection goes back when
/// its response body has been read whole, from the task that read it.
struct Http1Pool {
    /// By server index (those of other protocols unused).
    servers: Vec<Http1Server>,
    tcp: TimedTcp,
    /// `https://` servers over HTTP/1.1: TLS offering no ALPN, so that the server speaks
    /// HTTP/1.1 whatever it prefers (those that chose it when offered HTTP/2, and requests
    /// asking for an upgrade, which HTTP/2 does not carry, RFC 9113 §8.2.2).
    tls: TimedHttps,
    idle_timeout: Duration,
    /// Whether the task closing connections idle for `idle_timeout` has started: it starts
    /// with the first connection (a pool may be built where no runtime runs yet).
    reaper: AtomicBool,
    /// The HTTP/2 connections kept for `h2c://` and `https://` servers, let go by the same
    /// task.
    h2_slots: Vec<Weak<H2Slot>>,
}

struct Http1Server {
    /// A connection is used only by the worker that opened it, whose thread runs its task,
    /// so that a request wakes no other thread.
    idle: PerWorker<Arc<IdleList>>,
    /// Sockets (TLS sessions for an `https://` server) kept by `crate::relay`, by worker as
    /// well.
    raw: PerWorker<Arc<RawList>>,
    /// `http://host:port` (`https://` for an `https://` server): what the connectors dial,
    /// built once. For every server, since HTTP/2 ones dial through it too.
    dial: Uri,
}

/// A socket to a server for `crate::relay`, counted under the bound on upstream sockets while
/// open.
pub type RawSocket = Counted<RawStream>;

/// A TLS session to an `https://` server, as `Http1Pool::tls` opens it.
pub type TlsUpstream =
    tokio_rustls::client::TlsStream<hyper_util::rt::TokioIo<hyper_util::rt::TokioIo<TcpStream>>>;

/// What the relay speaks HTTP/1.1 over: a plain socket to an `http://` server, or TLS to an
/// `https://` one known to choose HTTP/1.1. An enum, not a trait object: the plain socket is
/// the hot path, and pays a branch per call, no allocation nor indirect call.
pub enum RawStream {
    Tcp(TcpStream),
    /// Boxed: a TLS session is over a kilobyte, which every plain socket, moved with each
    /// answer, would carry otherwise. Allocated once per connection.
    Tls(Box<TlsUpstream>),
}

impl RawStream {
    /// Whether a write may stay in the stream until flushed: rustls seals records in a buffer
    /// of its own and writes what the socket takes.
    pub fn buffered(&self) -> bool {
        matches!(self, RawStream::Tls(_))
    }

    /// Whether an idle one has nothing to read (`quiet`). Over TLS, what came while it idled
    /// is pushed through the session first: a server sends records that carry no data
    /// (session tickets, `KeyUpdate`), which are not a close nor stray bytes; `close_notify`
    /// is a close.
    fn quiet(&mut self) -> bool {
        match self {
            RawStream::Tcp(tcp) => quiet(tcp),
            RawStream::Tls(tls) => quiet_tls(tls),
        }
    }
}

impl tokio::io::AsyncRead for RawStream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RawStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            RawStream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for RawStream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            RawStream::Tcp(tcp) => write_first(tcp, cx, buf),
            RawStream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RawStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            RawStream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RawStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            RawStream::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}

/// A write to a plain socket, tried at once and polled only when the socket cannot take it.
/// A socket that is writable (nearly always: a request or an answer is a few hundred bytes)
/// takes the bytes in the `send` alone; `poll_write` spent some 115 instructions around it on
/// the coop budget and the waker's registration, neither of which a write that does not wait
/// needs: the connection's reads still spend the budget, and a write that finds the socket
/// full is polled, which stores the waker. `try_write` forgets the readiness it saw when the
/// socket refuses (`WouldBlock`), so the poll after it waits for the next event.
#[inline]
pub fn write_first(
    tcp: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<std::io::Result<usize>> {
    match tcp.try_write(buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            tokio::io::AsyncWrite::poll_write(Pin::new(tcp), cx, buf)
        }
        written => Poll::Ready(written),
    }
}

/// Idle connections to one server, the most recently used last.
pub struct IdleList {
    conns: Mutex<Vec<IdleConn>>,
    /// At the bound on upstream sockets, a connection coming back is closed for a request
    /// waiting to open one.
    sockets: Sockets,
}

struct IdleConn {
    sender: Sender,
    since: Instant,
}

/// The lock is never held across an await nor while running other code, so a panic cannot
/// leave the list half-changed: a poisoned lock is taken as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Idle sockets to one server (`crate::relay`), the most recently used last.
pub struct RawList {
    conns: Mutex<Vec<RawConn>>,
    /// As `IdleList`'s.
    sockets: Sockets,
}

struct RawConn {
    stream: RawSocket,
    since: Instant,
}

impl RawList {
    fn new(sockets: Sockets) -> RawList {
        RawList {
            conns: Mutex::new(Vec::new()),
            sockets,
        }
    }

    /// The most recently used socket that still looks open. Those idle for `timeout` or more
    /// are closed with all older ones. An idle socket has nothing to read: one that became
    /// readable was closed by the server (or sent what nobody asked for) and is dropped.
    /// One idle for `fresh` or more is left for a request that can be sent again.
    fn take(
        &self,
        now: Instant,
        timeout: Duration,
        fresh: Duration,
    ) -> Option<(RawSocket, Instant)> {
        loop {
            let mut conn = {
                let mut conns = lock(&self.conns);
                let last = conns.last()?;
                let idle = now.saturating_duration_since(last.since);
                if idle >= timeout {
                    conns.clear();
                    return None;
                }
                if idle >= fresh {
                    return None;
                }
                conns.pop()?
            };
            if conn.stream.quiet() {
                return Some((conn.stream, conn.since));
            }
        }
    }

    /// Gives a socket back after a response read whole from it; its idle time counts from
    /// `since`, a reading of the clock taken once the server had sent the whole response (its
    /// own keep-alive timer runs from then), which the caller may have read for its own use.
    pub fn put(&self, stream: RawSocket, since: Instant) {
        if self.sockets.claim_close() {
            return;
        }
        let mut conns = lock(&self.conns);
        if conns.len() < MAX_IDLE_PER_SERVER {
            conns.push(RawConn { stream, since });
        }
    }

    /// Closes the sockets idle since before `before`, and those the server closed: unlike
    /// hyper's connections, whose tasks see a close and end, nothing else reads an idle
    /// socket, which would stay in CLOSE-WAIT, a descriptor and a place under the bound on
    /// upstream sockets, until it was taken or grew old.
    fn reap(&self, before: Instant) {
        lock(&self.conns).retain_mut(|c| c.since >= before && c.stream.quiet());
    }
}

/// Takes the oldest of `list` that is still `open` out and drops it outside the lock, with
/// those before it that are not; false when none is open.
fn drop_oldest<T>(list: &Mutex<Vec<T>>, open: impl Fn(&T) -> bool) -> bool {
    let oldest = {
        let mut conns = lock(list);
        let first = conns.iter().position(open);
        first.map(|i| conns.drain(..=i).collect::<Vec<_>>())
    };
    oldest.is_some()
}

impl Idle for RawList {
    /// A socket the server closed is still a descriptor here: closing it makes room too.
    fn close_oldest(&self) -> bool {
        drop_oldest(&self.conns, |_| true)
    }
}

impl Idle for IdleList {
    /// The connection's task closes its socket once it sees its sender gone. One whose
    /// connection has already ended gave its place back then: dropping it makes no room.
    fn close_oldest(&self) -> bool {
        drop_oldest(&self.conns, |c| !c.sender.is_closed())
    }
}

/// Whether an idle socket has nothing to read, which is what an open one has. Readiness is
/// tokio's record of the last events, so most checks make no system call; a socket marked
/// readable is read once to tell a stale mark (`WouldBlock`, which clears the mark) from a
/// close or stray bytes. `try_read` looks at the mark with one atomic load; `poll_read_ready`
/// with a no-op waker did the same but, the socket not being readable, took the socket's
/// waiters' lock to store that waker, and charged tokio's task budget: some 150
/// instructions a forwarded request, for nothing (no task waits on an idle socket).
fn quiet(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `quiet` for a TLS session: records that came are read through rustls (without a waker:
/// none reads the session while it idles), which answers what asks for an answer on the next
/// write; only data or a close make it not quiet. A session with nothing unread in it and a
/// socket with nothing marked readable is quiet without a read.
fn quiet_tls(tls: &mut TlsUpstream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let (io, session) = tls.get_ref();
    // `wants_read`: no data waiting in the session, and no `close_notify` read.
    if session.wants_read() && io.inner().inner().poll_read_ready(&mut cx).is_pending() {
        return true;
    }
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    tokio::io::AsyncRead::poll_read(Pin::new(tls), &mut cx, &mut buf).is_pending()
}

impl IdleList {
    /// The most recently used connection ready for a request. Connections that closed are
    /// dropped on the way, and those idle for `timeout` or more with all older ones (the list
    /// is in the order connections came back); one whose last response hyper has not finished
    /// with yet is left in place.
    /// One idle for `fresh` or more is left for a request that can be sent again.
    fn take(&self, now: Instant, timeout: Duration, fresh: Duration) -> Option<IdleConn> {
        let mut conns = lock(&self.conns);
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            let idle = now.saturating_duration_since(conns[i].since);
            if idle >= timeout {
                conns.drain(..=i);
                return None;
            }
            if idle >= fresh {
                return None;
            }
            if conns[i].sender.is_ready() {
                return Some(conns.remove(i));
            }
            if conns[i].sender.is_closed() {
                conns.remove(i);
            }
        }
        None
    }

    fn put(&self, sender: Sender) {
        if sender.is_closed() || self.sockets.claim_close() {
            return;
        }
        let mut conns = lock(&self.conns);
        if conns.len() < MAX_IDLE_PER_SERVER {
            conns.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle since before `before`, and those already closed.
    fn reap(&self, before: Instant) {
        lock(&self.conns).retain(|c| c.since >= before && !c.sender.is_closed());
    }
}

/// A connection lent to one response, going back to its list when the body has been read
/// whole. Dropped with a body left unread, the connection closes: its next bytes would be
/// the rest of that body.
pub struct Checkin {
    sender: Sender,
    home: Arc<IdleList>,
}

impl Checkin {
    pub fn give_back(self) {
        self.home.put(self.sender);
    }
}

impl Http1Pool {
    fn new(
        servers: &[Upstream],
        tcp: TimedTcp,
        tls: TimedHttps,
        idle_timeout: Duration,
        workers: usize,
        h2_slots: Vec<Weak<H2Slot>>,
    ) -> Http1Pool {
        let sockets = &tcp.sockets;
        let servers: Vec<Http1Server> = servers
            .iter()
            .map(|s| {
                let mut uri = UriParts::default();
                uri.scheme = Some(s.scheme.clone());
                uri.authority = Some(s.authority.clone());
                uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
                Http1Server {
                    idle: PerWorker::new(workers, |_| {
                        Arc::new(IdleList {
                            conns: Mutex::new(Vec::new()),
                            sockets: sockets.clone(),
                        })
                    }),
                    raw: PerWorker::new(workers, |_| Arc::new(RawList::new(sockets.clone()))),
                    dial: Uri::from_parts(uri).unwrap_or_default(),
                }
            })
            .collect();
        // Asked in turn for room at the bound; forgotten with this pool.
        for server in &servers {
            for list in server.idle.all() {
                let list: Arc<dyn Idle> = list.clone();
                sockets.register(Arc::downgrade(&list));
            }
            for list in server.raw.all() {
                let list: Arc<dyn Idle> = list.clone();
                sockets.register(Arc::downgrade(&list));
            }
        }
        Http1Pool {
            servers,
            tcp,
            tls,
            idle_timeout,
            reaper: AtomicBool::new(false),
            h2_slots,
        }
    }

    /// Sends `req`, whose URI is the path alone (`forward::aim` makes it so: HTTP/1.1 to an
    /// origin server names the path, RFC 9112 §3.2.1, and the client's `Host` names the site).
    #[allow(clippy::manual_async_fn)] // see `forward`'s module docs
    fn request<'a>(
        &'a self,
        index: usize,
        mut req: Request<Body>,
        unsent: &'a mut Option<Box<Request<Body>>>,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + 'a {
        async move {
            let Some(server) = self.servers.get(index) else {
                return Err(SendError::Connect("no such server".into()));
            };
            let home = server.idle.local();
            let tls = server.dial.scheme() == Some(&http::uri::Scheme::HTTPS);
            let now = Instant::now();
            // Each turn uses up a kept connection, up to `KEPT_TRIES`, then dials a new one,
            // which is the last turn.
            let mut kept_tries = 0;
            let fresh = idle_limit(self.idle_timeout, replayable(&req));
            let head = req.method() == http::Method::HEAD;
            loop {
                let kept = if kept_tries < KEPT_TRIES {
                    home.take(now, self.idle_timeout, fresh)
                } else {
                    None
                };
                let (mut sender, since) = match kept {
                    Some(IdleConn { sender, since }) => {
                        kept_tries += 1;
                        (sender, Some(since))
                    }
                    // Boxed: the rare path must not make every request's future larger.
                    None => match Box::pin(self.connect(&server.dial)).await {
                        Ok(sender) => (sender, None),
                        // Nothing of the request left: it is given back.
                        Err(e) => {
                            *unsent = Some(Box::new(req));
                            return Err(e);
                        }
                    },
                };
                // A server closes a connection that idled past its keep-alive timeout (5 s for
                // Node.js and uvicorn, 2 s for gunicorn), or one it said it would keep, as the next
                // request arrives; that request is written before the close can be read. One that
                // can be sent again is copied for that case, as nginx retries a request that
                // failed on a cached connection: without it, a healthy server's client would get
                // the outage response, and the failure would count against the server's health.
                // The copy is a header map's clone per request on a kept connection; the relay,
                // which keeps a request's bytes anyway, has the same rule. Boxed: a request's size
                // in every request's future otherwise.
                let again = since.and_then(|_| copy_to_replay(&req)).map(Box::new);
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(lend(resp, sender, home, head)),
                    Err(mut e) => match (e.take_message(), again) {
                        // Closed before the request was written (its task saw the close first).
                        (Some(unsent), _) if since.is_some() => req = unsent,
                        // A new connection's, that closed first: given back.
                        (Some(back), _) => {
                            *unsent = Some(Box::new(back));
                            return Err(SendError::Http(e.into_error()));
                        }
                        // Closed before an answer's head arrived whole, once the request was
                        // written: sent again once, on a new connection, so that a request that
                        // makes the server fail is not sent once per kept connection.
                        (None, Some(copy))
                            if closed_unanswered(e.error())
                                || (tls && tls_closed_unanswered(e.error())) =>
                        {
                            tracing::debug!("a kept upstream connection was closed; sending again");
                            req = *copy;
                            kept_tries = KEPT_TRIES;
                        }
                        _ => return Err(SendError::Http(e.into_error())),
                    },
                }
            }
        }
    }

    async fn connect(&self, dial: &Uri) -> Result<Sender, SendError> {
        self.start_reaper();
        if dial.scheme() == Some(&http::uri::Scheme::HTTPS) {
            let io = self.tls.open(dial.clone()).await?;
            return handshake_http1(io).await;
        }
        let io = self.tcp.open(dial.clone()).await?;
        handshake_http1(io).await
    }

    fn start_reaper(&self) {
        if self.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let lists: Vec<Weak<IdleList>> = self
            .servers
            .iter()
            .flat_map(|s| s.idle.all().iter().map(Arc::downgrade))
            .collect();
        let raw: Vec<Weak<RawList>> = self
            .servers
            .iter()
            .flat_map(|s| s.raw.all().iter().map(Arc::downgrade))
            .collect();
        let h2 = self.h2_slots.clone();
        let timeout = self.idle_timeout;
        // A connection is closed within a tick (a quarter of `idle_timeout`, at most `SWEEP`)
        // of its `idle_timeout` running out, and a plain socket within a tick of its server's
        // closing it, as nginx closes a cached connection when its server does; the task ends
        // with the pool.
        let every = (timeout / 4).min(SWEEP).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(before) = Instant::now().checked_sub(timeout) else {
                    continue;
                };
                let mut alive = false;
                for list in lists.iter().filter_map(Weak::upgrade) {
                    list.reap(before);
                    alive = true;
                }
                for list in raw.iter().filter_map(Weak::upgrade) {
                    list.reap(before);
                }
                for slot in h2.iter().filter_map(Weak::upgrade) {
                    slot.reap(before);
                }
                if !alive {
                    return;
                }
            }
        });
    }
}

/// Reads an unwanted upstream body (an answer `intercept_statuses` replaced) to its end in
/// the background, so that its connection goes back to the pool instead of closing: during
/// an outage the server answers every request with the status being intercepted, and a new
/// connection for each would leave a TIME_WAIT socket per request. Bounded: a body announced
/// larger than `LIMIT`, still going past it, or slower than `PATIENCE` is dropped, and its
/// connection with it; and at most `AT_ONCE` are read at a time (a connection being drained
/// is in no pool, so a server trickling its error bodies would otherwise have one more
/// connection opened per request).
pub fn read_out(body: Body) {
    const LIMIT: u64 = 64 * 1024;
    const PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);
    const AT_ONCE: usize = 256;
    static DRAINING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(AT_ONCE);
    if !body.is_lent() || body.size_hint().lower() > LIMIT {
        return;
    }
    let Ok(permit) = DRAINING.try_acquire() else {
        return;
    };
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        let _permit = permit;
        let mut body = body;
        let mut read = 0u64;
        let drained = async {
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return };
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > LIMIT {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(PATIENCE, drained).await;
    });
}

/// Kept connections a request may find closed before a new one is dialled.
const KEPT_TRIES: usize = 4;

/// Whether a kept connection failed by closing before the answer's head came whole: at its
/// end (hyper's incomplete message), or reset, as a server's kernel resets a connection that
/// was closed while the request was on its way (the relay's `fetch` takes both alike).
fn closed_unanswered(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    io.is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
        )
    })
}

/// `closed_unanswered`, over TLS: a kept connection may also have failed in its session (an
/// alert, a record that does not decrypt, an end without `close_notify`) after its last
/// answer was whole, unseen until the next request; so any failure of the connection before
/// the head, as nginx sends a request again after any error on a cached connection.
fn tls_closed_unanswered(e: &hyper::Error) -> bool {
    let broken = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    closed_unanswered(e) || broken
}

/// A copy of `req` to send again, when it can be sent twice without harm: an idempotent
/// method (RFC 9110 §9.2.2) and no body, or one held whole.
/// Whether `req` could be sent a second time (`copy_to_replay` would copy it), told without
/// copying anything.
fn replayable(req: &Request<Body>) -> bool {
    super::idempotent(req.method())
        && match req.body() {
            Body::Empty => true,
            Body::Full(Some(_)) => true,
            Body::Trailed(held) => held.0.is_some(),
            _ => false,
        }
}

/// How long a connection may have been idle to carry a request: `timeout`, or for one that
/// cannot be sent again (`POST`, a streamed upload) at most `FRESH`.
fn idle_limit(timeout: Duration, replayable: bool) -> Duration {
    if replayable {
        timeout
    } else {
        timeout.min(FRESH)
    }
}

fn copy_to_replay(req: &Request<Body>) -> Option<Request<Body>> {
    if !super::idempotent(req.method()) {
        return None;
    }
    copy_whole(req)
}

/// A copy of `req` when its body is empty or held whole (with its trailers, if any): a
/// streamed one is consumed by the first attempt, and is never buffered to be sent twice.
fn copy_whole(req: &Request<Body>) -> Option<Request<Body>> {
    let body = match req.body() {
        Body::Empty => Body::Empty,
        Body::Full(Some(bytes)) => Body::Full(Some(bytes.clone())),
        Body::Trailed(held) if held.0.is_some() => Body::Trailed(held.clone()),
        _ => return None,
    };
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether an HTTP/2 request failed because its server refused the stream before processing
/// it, so that it can be sent again whatever its method (RFC 9113 §8.7): a `RST_STREAM` with
/// `REFUSED_STREAM`, or a `GOAWAY`, which h2 reports only to streams above its last stream
/// id (RFC 9113 §6.8) and to requests made after it; a stream at or below it that the server
/// then drops fails with the connection, as an I/O error. Only what the server sent counts:
/// h2's own resets and GOAWAYs say nothing of what the server did.
fn refused_unprocessed(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        cause = c.source();
    }
    false
}

/// Whether an HTTP/2 request failed because its connection ended (closed or reset) before
/// its answer's head: h2 fails every stream still open so, which says nothing of whether the
/// server had begun on it.
fn h2_closed_unanswered(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let io = match c.downcast_ref::<h2::Error>() {
            Some(h2) => h2.get_io(),
            None => c.downcast_ref::<std::io::Error>(),
        };
        if let Some(io) = io {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cause = c.source();
    }
    false
}

/// The response, with its connection lent to the body (given back when the body has been
/// read whole), given back at once when there is no body, or kept by nobody after a `101`:
/// the connection is then the tunnel's. An answer to a `HEAD` (`head`) that may be followed by
/// a body does not give its connection back (`unkept_after_head`).
fn lend(
    resp: Response<Incoming>,
    sender: Sender,
    home: &Arc<IdleList>,
    head: bool,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return resp.map(Body::Stream);
    }
    if resp.body().is_end_stream() {
        if !(head && unkept_after_head(&resp)) {
            home.put(sender);
        }
        return resp.map(Body::Stream);
    }
    let checkin = Checkin {
        sender,
        home: home.clone(),
    };
    resp.map(|body| Body::Lent(body, Some(checkin)))
}

/// Whether the answer to a `HEAD` leaves its connection unfit to keep, as `relay::read_head`
/// decides for the relay's sockets: a server whose answer announces a body (a length above
/// 0, a coding) may send that body anyway, late, once the connection is back in its list,
/// where hyper's client would read it as the next request's answer, another client's; and
/// one that gives no length may close to end a `GET`'s. Only a `Content-Length: 0` keeps it
/// (a 204 has no body, a 304's length is the representation's). Asked of `HEAD`s alone.
fn unkept_after_head(resp: &Response<Incoming>) -> bool {
    if matches!(resp.status().as_u16(), 204 | 304) {
        return false;
    }
    let headers = resp.headers();
    let lengths = headers.get_all(header::CONTENT_LENGTH);
    headers.contains_key(header::TRANSFER_ENCODING)
        || lengths.iter().next().is_none()
        || lengths.iter().any(|v| v.as_bytes().trim_ascii() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    /// `write_first` tries the socket without polling it: a write that finds it full must
    /// still leave the task's waker with it, so that the task goes on once the peer reads.
    #[tokio::test]
    async fn a_write_tried_first_waits_for_room_when_the_socket_is_full() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut theirs, _) = listener.accept().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        // Filled until the socket refuses, each write tried first.
        let full = loop {
            match std::future::poll_fn(|cx| Poll::Ready(write_first(&mut ours, cx, &chunk))).await {
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break true,
            }
            assert!(sent < 64 << 20, "the socket never filled");
        };
        assert!(full);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            theirs.read_to_end(&mut all).await.map(|_| all.len())
        });
        let more = std::future::poll_fn(|cx| write_first(&mut ours, cx, &chunk));
        let more = tokio::time::timeout(Duration::from_secs(10), more)
            .await
            .expect("the write that found the socket full was never woken")
            .unwrap();
        drop(ours);
        let read = reader.await.unwrap().unwrap();
        assert_eq!(read, sent + more);
    }

    fn pool(n: usize) -> UpstreamPool {
        let servers: Vec<String> = (0..n)
            .map(|i| format!("\"http://127.0.0.1:{}\"", 3000 + i))
            .collect();
        let text = format!("[upstream]\nservers = [{}]\n", servers.join(","));
        let config = Config::parse(&text, Path::new("."), None).unwrap();
        UpstreamPool::new(&config.upstream, 1, &Sockets::unbounded()).unwrap()
    }

    /// A certificate is checked against an IPv6 address without its zone, which only says
    /// which interface to dial; names and other addresses as hyper-rustls takes them.
    #[test]
    fn a_zone_is_no_part_of_the_name_a_certificate_is_checked_against() {
        use rustls::pki_types::ServerName;
        let ip = |s: &str| ServerName::IpAddress(s.parse::<std::net::IpAddr>().unwrap().into());
        for (url, want) in [
            ("https://[fe80::1%eth0]:8443/", ip("fe80::1")),
            ("https://[fe80::1%25eth0]/", ip("fe80::1")),
            ("https://[2001:db8::5]/", ip("2001:db8::5")),
            ("https://10.0.0.5:8443/", ip("10.0.0.5")),
            (
                "https://shop.example.com/",
                ServerName::try_from("shop.example.com").unwrap(),
            ),
        ] {
            let uri: Uri = url.parse().unwrap();
            assert_eq!(server_name(&uri).unwrap(), want, "{url}");
        }
    }

    /// An `https://` server that could not be asked its protocol does not keep the relay
    /// off: requests go to the servers it reaches, the failed dial is counted against the
    /// server, and it is asked again only after its backoff.
    #[tokio::test]
    async fn a_server_that_could_not_be_asked_leaves_the_relay_the_others() {
        assert!(pool(2).may_relay(), "http:// servers alone");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let text = format!(
            "[upstream]\nservers = [\"http://127.0.0.1:3000\", \"https://{addr}\"]\n\
             connect_timeout = \"1s\"\n"
        );
        let config = Config::parse(&text, Path::new("."), None).unwrap();
        let pool = Arc::new(UpstreamPool::new(&config.upstream, 1, &Sockets::unbounded()).unwrap());
        assert!(!pool.relayable());
        assert!(pool.may_relay() && pool.unasked(), "not asked yet");
        let (passive, _reports) = crate::health::checker::passive_for_tests(2);
        pool.learn(&passive).await;
        assert!(!pool.unasked() && !pool.relayable());
        assert!(
            pool.may_relay(),
            "a server down keeps the relay for the others"
        );
        assert_eq!(passive[1].failures(), 1, "the failed dial is counted");
        let up = [true, true];
        for _ in 0..3 {
            assert_eq!(pool.relay_server(&up, &passive), Some(0));
        }
        assert_eq!(pool.relay_server(&[false, true], &passive), None);
        assert!(
            pool.ask_at[1].load(Ordering::Relaxed) >= 1000,
            "asked again later"
        );
    }

    /// A connector that never opens anything: a name server or a TLS handshake that never
    /// answers.
    #[derive(Clone)]
    struct Stuck;

    impl Service<Uri> for Stuck {
        type Response = ();
        type Error = std::io::Error;
        type Future = std::future::Pending<Result<(), std::io::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            std::future::pending()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opening_a_connection_is_cut_off_at_connect_timeout() {
        let mut timed = Timed::new(Stuck, Duration::from_secs(2), Sockets::unbounded());
        let uri = Uri::from_static("http://app.internal:3000/");
        let Err(e) = timed.call(uri).await else {
            panic!("a connection that never opens was reported open");
        };
        let kind = e.downcast_ref::<std::io::Error>().map(|e| e.kind());
        assert_eq!(kind, Some(std::io::ErrorKind::TimedOut));
        assert_eq!(
            e.to_string(),
            "no connection to app.internal:3000 within connect_timeout (2s)"
        );
    }

    /// With two servers, one failing: a retry must not move the round-robin on, or every
    /// request would go to the failing one first.
    #[tokio::test]
    async fn a_retry_leaves_the_round_robin_where_it_was() {
        let p = pool(2);
        let mut first = Vec::new();
        for _ in 0..6 {
            let server = p.pick(&[true, true], None).unwrap();
            first.push(server);
            if server == 0 {
                assert_eq!(p.pick(&[true, true], Some(0)), Some(1));
            }
        }
        assert_eq!(first, [0, 1, 0, 1, 0, 1]);
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
        // The first healthy server after the failed one, wrapping round.
        assert_eq!(p.pick(&[true, true, true], Some(2)), Some(0));
        assert_eq!(p.pick(&[false, true, true], Some(2)), Some(1));
        // Nothing healthy (force-open): forward anyway, but never retry onto the same server.
        assert!(p.pick(&[false, false, false], None).is_some());
        assert_eq!(pool(1).pick(&[true], Some(0)), None);
    }
}

#[cfg(test)]
mod kept {
    use super::*;
    use crate::config::Config;
    use crate::forward::sockets::SocketMetrics;
    use http_body_util::BodyExt;
    use std::io::{Read, Write};
    use std::path::Path;
    use std::sync::mpsc;

    /// A blocking server on its own thread, so that it can close a connection while the
    /// test's runtime is kept from noticing.
    fn server(close: mpsc::Receiver<()>, closed: mpsc::Sender<()>) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let answer = |s: &mut std::net::TcpStream| {
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "closed before a request");
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .unwrap();
            };
            let (mut first, _) = listener.accept().unwrap();
            answer(&mut first);
            close.recv().unwrap();
            drop(first);
            closed.send(()).unwrap();
            let (mut second, _) = listener.accept().unwrap();
            answer(&mut second);
        });
        addr
    }

    #[tokio::test]
    async fn a_request_written_on_a_kept_connection_the_server_closed_goes_on_a_new_one() {
        let (close_tx, close_rx) = mpsc::channel();
        let (closed_tx, closed_rx) = mpsc::channel();
        let addr = server(close_rx, closed_tx);
        let text = format!("[upstream]\nservers = [\"http://{addr}\"]\n");
        let config = Config::parse(&text, Path::new("."), None).unwrap();
        let pool = UpstreamPool::new(&config.upstream, 1, &Sockets::unbounded()).unwrap();
        let get = || {
            http::Request::get("/")
                .header("host", "x")
                .body(Body::Empty)
                .unwrap()
        };
        let resp = pool
            .request(0, get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        // Until hyper has seen the exchange end, the connection is not ready for another.
        for _ in 0..100 {
            if lock(&pool.http1.servers[0].idle.local().conns)
                .iter()
                .any(|c| c.sender.is_ready())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.idle_http1(0), 1);
        // The server closes the kept connection; this thread blocks meanwhile, so the
        // connection's task has not read the close when the next request is written on it.
        close_tx.send(()).unwrap();
        closed_rx.recv().unwrap();
        let resp = pool
            .request(0, get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    #[tokio::test]
    async fn a_connection_idle_for_idle_timeout_is_not_taken() {
        // A server that answers one request and keeps its connection open.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            let _ = s.read(&mut buf);
        });
        let text = format!("[upstream]\nservers = [\"http://{addr}\"]\nidle_timeout = \"90s\"\n");
        let config = Config::parse(&text, Path::new("."), None).unwrap();
        let pool = UpstreamPool::new(&config.upstream, 1, &Sockets::unbounded()).unwrap();
        let req = http::Request::get("/")
            .header("host", "x")
            .body(Body::Empty)
            .unwrap();
        let resp = pool
            .request(0, req, None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_http1(0), 1);
        let list = pool.http1.servers[0].idle.local();
        for _ in 0..100 {
            if lock(&list.conns).iter().any(|c| c.sender.is_ready()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(lock(&list.conns)[0].sender.is_ready());
        let timeout = config.upstream.idle_timeout;
        // Not before the reaper's round: a connection past idle_timeout is not used, however
        // ready it is, and it is closed.
        let later = Instant::now() + timeout;
        assert!(list.take(later, timeout, timeout).is_none());
        assert_eq!(pool.idle_http1(0), 0);
    }

    /// A blocking server answering every request on every connection with `ok`, for as long
    /// as the test runs; `closed` counts the connections its clients closed.
    fn keep_alive_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let count = closed.clone();
        std::thread::spawn(move || {
            for mut s in listener.incoming().map_while(Result::ok) {
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut got = Vec::new();
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            got.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).is_err() {
                                return;
                            }
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, closed)
    }

    fn bounded_pool(
        servers: &[std::net::SocketAddr],
        bound: usize,
    ) -> (UpstreamPool, Sockets, SocketMetrics) {
        let servers: Vec<String> = servers.iter().map(|a| format!("\"http://{a}\"")).collect();
        let text = format!(
            "[upstream]\nservers = [{}]\nconnect_timeout = \"2s\"\n",
            servers.join(",")
        );
        let config = Config::parse(&text, Path::new("."), None).unwrap();
        let metrics = SocketMetrics::default();
        let sockets = Sockets::new(Some(bound), metrics.clone());
        let pool = UpstreamPool::new(&config.upstream, 1, &sockets).unwrap();
        (pool, sockets, metrics)
    }

    fn get() -> Request<Body> {
        http::Request::get("/")
            .header("host", "x")
            .body(Body::Empty)
            .unwrap()
    }

    /// A kept hyper connection holds its place under the bound while idle; at the bound, a
    /// request to another server has it closed, and its place comes back through its task.
    #[tokio::test]
    async fn a_kept_connection_is_closed_for_a_request_at_the_bound() {
        let (a, a_closed) = keep_alive_server();
        let (b, _) = keep_alive_server();
        let (pool, _, metrics) = bounded_pool(&[a, b], 1);
        let resp = pool
            .request(0, get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_http1(0), 1);
        assert_eq!(metrics.open.get(), 1);
        let resp = pool
            .request(1, get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(pool.idle_http1(0), 0);
        assert_eq!(metrics.open.get(), 1);
        assert_eq!(metrics.reached.get(), 0);
        closed_soon(&a_closed).await;
        drop(resp);
    }

    /// Waits, at most 5 s, for the server counting `closed` to see its connection closed.
    async fn closed_soon(closed: &AtomicUsize) {
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            while closed.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        assert!(seen.await.is_ok(), "the kept connection was not closed");
    }

    /// `keep_alive_server` over TLS, offering no ALPN: an `https://` server that speaks
    /// HTTP/1.1 alone.
    async fn tls_keep_alive_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let count = closed.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, count) = (acceptor.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    let mut got = Vec::new();
                    'conn: loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            got.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                break 'conn;
                            }
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, closed)
    }

    /// An `https://` server's idle HTTP/1.1 connection is kept in the proxy's own pool, as an
    /// `http://` server's: at the bound on upstream sockets it is closed for a request that
    /// needs room. In hyper-util's pool, where such connections were kept before, it could
    /// not be, and the request waited `connect_timeout` and got the outage answer.
    #[tokio::test]
    async fn a_kept_https_connection_is_closed_for_a_request_at_the_bound() {
        let (a, a_closed) = tls_keep_alive_server().await;
        let (b, _) = keep_alive_server();
        let text = format!(
            "[upstream]\nservers = [\"https://{a}\", \"http://{b}\"]\n\
             connect_timeout = \"2s\"\ndanger_accept_invalid_certs = true\n"
        );
        let config = Config::parse(&text, Path::new("."), None).unwrap();
        let metrics = SocketMetrics::default();
        let sockets = Sockets::new(Some(1), metrics.clone());
        let pool = UpstreamPool::new(&config.upstream, 1, &sockets).unwrap();
        // As `forward::aim` makes it for an `https://` server: the server's URI.
        let to_a = || {
            http::Request::get(format!("https://{a}/"))
                .header("host", "x")
                .body(Body::Empty)
                .unwrap()
        };
        // Twice: the first dial asks for HTTP/2 by ALPN and learns the server's choice.
        for _ in 0..2 {
            let resp = pool
                .request(0, to_a(), None, &mut None, &AtomicBool::new(false))
                .await
                .unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
        assert_eq!(pool.idle_http1(0), 1);
        assert_eq!(metrics.open.get(), 1);
        let resp = pool
            .request(1, get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(pool.idle_http1(0), 0);
        assert_eq!(metrics.reached.get(), 0);
        closed_soon(&a_closed).await;
        drop(resp);
    }

    /// A connection coming back while a request waits for room is closed instead of kept.
    #[tokio::test]
    async fn a_connection_coming_back_is_closed_for_a_waiting_request() {
        let (a, _) = keep_alive_server();
        let (b, _) = keep_alive_server();
        let (pool, sockets, _) = bounded_pool(&[a, b], 1);
        let pool = Arc::new(pool);
        let busy = pool
            .request(0, get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.request(1, get(), None, &mut None, &AtomicBool::new(false))
                    .await
                    .map(|r| r.status())
            })
        };
        for _ in 0..250 {
            if sockets.wanted() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(sockets.wanted());
        busy.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_http1(0), 0, "kept while a request waited");
        let status = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(status, Ok(Ok(Ok(StatusCode::OK)))), "{status:?}");
    }

    /// The relay's plain sockets: dropped or kept, their place follows them.
    #[tokio::test]
    async fn a_raw_socket_gives_its_place_back_when_dropped_or_closed_for_room() {
        let (a, _) = keep_alive_server();
        let (b, _) = keep_alive_server();
        let (pool, sockets, metrics) = bounded_pool(&[a, b], 1);
        let socket = pool.raw_connect(0).await.unwrap();
        let limited = pool.raw_connect(1).await.err().unwrap();
        assert!(super::super::sockets::reached(&limited), "{limited}");
        drop(socket);
        let socket = pool.raw_connect(1).await.unwrap();
        // Kept idle, it is closed for the next socket at the bound.
        pool.raw_put(1, socket, Instant::now());
        let socket = pool.raw_connect(0).await.unwrap();
        assert!(pool.raw_take(1, Instant::now(), true).is_none());
        drop(socket);
        assert_eq!(metrics.open.get(), 0);
        assert!(sockets.acquire(Duration::from_millis(1)).await.is_ok());
    }

    /// An `h2c://` server answering every stream with `ok`; `held` keeps a stream's answer
    /// open until its sender is dropped.
    async fn h2c_server(held: HeldStreams) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let held = held.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let hold = req.uri().path() == "/held";
                        let mut send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        send.send_data(bytes::Bytes::from_static(b"ok"), !hold)
                            .unwrap();
                        if hold {
                            lock(&held).push(send);
                        }
                    }
                });
            }
        });
        addr
    }

    /// At the bound, an idle HTTP/2 connection is closed for a request to another server, as
    /// an idle HTTP/1.1 one is; one with a stream open is not.
    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_for_a_request_at_the_bound() {
        let (pool, _, metrics, held) = at_the_bound("300ms").await;
        let kept = |pool: &UpstreamPool| lock(&pool.clients.local().h2[0].kept).len();

        // Busy: its stream stays open, and the request for room waits in vain.
        let resp = pool
            .request(0, held_get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        assert_eq!(kept(&pool), 1);
        let Err(e) = pool
            .request(1, get(), None, &mut None, &AtomicBool::new(false))
            .await
        else {
            panic!("a busy HTTP/2 connection was closed for room");
        };
        assert!(super::super::sockets::reached(&e), "{e}");
        assert_eq!(kept(&pool), 1);

        // Idle once its answer has ended: closed, and its place taken.
        end_held(&held, resp).await;
        let resp = pool
            .request(1, get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(kept(&pool), 0);
        assert_eq!(metrics.open.get(), 1);
    }

    /// A request waiting for room at the bound gets it when an HTTP/2 connection's last
    /// stream ends during the wait, not only when one is idle as the wait begins.
    #[tokio::test]
    async fn an_http2_connection_going_idle_during_the_wait_makes_room() {
        // Long enough that only the connection's close, not the wait's end, can answer.
        let (pool, sockets, _, held) = at_the_bound("30s").await;
        let resp = pool
            .request(0, held_get(), None, &mut None, &AtomicBool::new(false))
            .await
            .unwrap();
        let mut unsent = None;
        let never_gave_up = AtomicBool::new(false);
        let waiting = pool.request(1, get(), None, &mut unsent, &never_gave_up);
        let ending = async {
            // Once the request waits for room, the held answer ends and is read whole.
            while !sockets.wanted() {
                tokio::task::yield_now().await;
            }
            end_held(&held, resp).await;
        };
        let (waited, ()) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(waiting, ending)
        })
        .await
        .expect("the request waited on while the connection sat idle");
        assert_eq!(waited.unwrap().status(), StatusCode::OK);
    }

    type HeldStreams = Arc<Mutex<Vec<h2::SendStream<bytes::Bytes>>>>;

    /// A pool to an `h2c_server` (server 0) and a plain keep-alive one (server 1) under a
    /// bound of one upstream socket, waiting `connect_timeout` for room; with the bound's
    /// metrics and the server's held answers.
    async fn at_the_bound(
        connect_timeout: &str,
    ) -> (UpstreamPool, Sockets, SocketMetrics, HeldStreams) {
        let held = HeldStreams::default();
        let h2c = h2c_server(held.clone()).await;
        let (plain, _) = keep_alive_server();
        let text = format!(
            "[upstream]\nservers = [\"h2c://{h2c}\", \"http://{plain}\"]\n\
             connect_timeout = \"{connect_timeout}\"\n"
        );
        let config = Config::parse(&text, Path::new("."), None).unwrap();
        let metrics = SocketMetrics::default();
        let sockets = Sockets::new(Some(1), metrics.clone());
        let pool = UpstreamPool::new(&config.upstream, 1, &sockets).unwrap();
        (pool, sockets, metrics, held)
    }

    /// Ends the server's held answers, and reads `resp`, the one held through the pool, whole.
    async fn end_held(held: &HeldStreams, resp: Response<Body>) {
        for mut send in lock(held).drain(..) {
            send.send_data(bytes::Bytes::new(), true).unwrap();
        }
        resp.into_body().collect().await.unwrap();
    }

    fn held_get() -> Request<Body> {
        http::Request::get("http://x/held")
            .body(Body::Empty)
            .unwrap()
    }

    /// Every request to an `https://` or `h2c://` server has its future boxed, copied in
    /// whole: with a dial's future inside (the TLS connector's and hyper's HTTP/2 handshake),
    /// it was some 9.8 KiB, allocated and copied for every request (some 5 % of the CPU time
    /// of a request to an `https://` server over HTTP/1.1).
    #[test]
    fn a_request_to_a_tls_server_carries_no_dial_in_its_future() {
        let text = "[upstream]\nservers = [\"http://127.0.0.1:3000\"]\n";
        let config = crate::config::Config::parse(text, std::path::Path::new("."), None).unwrap();
        let pool = UpstreamPool::new(&config.upstream, 1, &Sockets::unbounded()).unwrap();
        let req = || http::Request::get("/").body(Body::Empty).unwrap();
        let (mut a, mut b) = (None, None);
        let gave_up = AtomicBool::new(false);
        let https = std::mem::size_of_val(&pool.https(0, req(), &mut a, &gave_up));
        let h2c = std::mem::size_of_val(&pool.h2c(0, req(), &mut b, &gave_up));
        assert!(https < 4096, "the https future is {https} bytes");
        assert!(h2c < 4096, "the h2c future is {h2c} bytes");
    }

    #[test]
    fn an_http2_request_names_the_clients_host_once() {
        let aimed = |host: Option<&str>| {
            let mut req = http::Request::get("https://10.0.0.1:8443/p?q=1");
            if let Some(host) = host {
                req = req.header("host", host);
            }
            req.body(Body::Empty).unwrap()
        };
        let mut req = aimed(Some("shop.example"));
        https_over_h2(&mut req);
        assert_eq!(req.uri(), "https://shop.example/p?q=1");
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.version(), http::Version::HTTP_2);
        // Made again before a second try on a new connection: nothing changes.
        https_over_h2(&mut req);
        assert_eq!(req.uri(), "https://shop.example/p?q=1");
        // A host that is no authority: the server's, and no `Host` beside it.
        let mut req = aimed(Some("a b"));
        https_over_h2(&mut req);
        assert_eq!(req.uri(), "https://10.0.0.1:8443/p?q=1");
        assert!(req.headers().get(header::HOST).is_none());
    }
}
