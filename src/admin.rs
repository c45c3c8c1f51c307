//! The admin HTTP listener, for machines: `/metrics`, `/healthz`, `/readyz`.
//!
//! Separate from the proxy's listeners on purpose: its own port (`[admin] listen`, loopback in the
//! shipped config), plain HTTP/1.1 only, a small connection cap, and nothing of the gateway, so
//! that a scrape can never be held, bypassed or forwarded, and a flood on the proxy's port never
//! hides the metrics that would show it. It only reads: `Metrics::encode` and the `ready` probe.
//! A client that speaks HTTP/2 to it is told to use HTTP/1.1 (`refuse_http2`).

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::stall::Timed;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// What `/readyz` asks: listeners bound and config loaded.
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// The text `Metrics::encode` writes (OpenMetrics 1.0, which Prometheus asks for first).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The text `Metrics::encode_text` writes (the Prometheus text format 0.0.4), for a scraper
/// that does not ask for OpenMetrics, as Prometheus's own Go client answers one.
pub const METRICS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Scrapers and probes are a handful of machines; more connections than this is a mistake or an
/// attack, and closing them keeps descriptors for the proxy. A new connection beyond it takes
/// the place of the oldest of the address that holds the most: turning the new one away let a
/// client that kept 64 connections open shut every scraper and probe out, and taking the
/// oldest of all let one that opened connections in a loop close a scrape in the middle.
const MAX_CONNECTIONS: usize = 64;
/// A request head slower than this is not a scraper.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Nor is a client that takes nothing of its answer for this long: left alone, one that
/// pipelines requests and reads nothing would hold its connection, and 64 of them every one.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Sent by a proxy started while this one drains (`app::holder`) with its
/// `/readyz`: a draining proxy that gets it lets its admin listener go at once, for the next
/// one to take and answer "ready" while it serves. Kept until its own exit, the old
/// listener said "not ready" for up to `shutdown_timeout` of a restart, and a load balancer
/// that asks it took a serving host out. Heeded only while draining, when nothing of this
/// process is ready any more.
pub const SUCCESSOR_HEADER: &str = "x-intermission-successor";
/// How long shutdown waits for a response being written; idle keep-alive connections close at once.
/// A stop's `shutdown_timeout` ends the wait sooner (`app`): this alone bounds the wait of a
/// listener let go to the next proxy.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves GET /metrics (text format, correct Content-Type), GET /healthz (200 "ok": the process is
/// alive), GET /readyz (200 "ready" when `ready()` returns true, else 503 "not ready") on
/// `listener` until `shutdown` fires; anything else 404; non-GET/HEAD 405. HTTP/1.1 via
/// hyper-util; small and separate from the proxy's listeners.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Ready,
    mut shutdown: Shutdown,
) {
    let graceful = GracefulShutdown::new();
    // Oldest first, with the peer's address: each closes its connection when dropped.
    let mut open: VecDeque<(IpAddr, oneshot::Sender<()>)> =
        VecDeque::with_capacity(MAX_CONNECTIONS + 1);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let counted = metrics.accept_failures(crate::metrics::Accepting::Admin);
    let mut failures = crate::listener::AcceptFailures::new("admin", counted);
    let successor = Arc::new(tokio::sync::Notify::new());
    // Set once the listener stops: a connection that has sent nothing yet goes at once, as
    // hyper lets an idle one go on a graceful shutdown.
    let (draining, drained) = watch::channel(false);
    loop {
        let (mut stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    failures.recovered();
                    pair
                }
                Err(e) => {
                    failures.failed(&e).await;
                    continue;
                }
            },
            _ = shutdown.fired() => break,
            () = successor.notified() => {
                tracing::info!("admin: the next proxy asked for admin.listen; letting it go");
                break;
            }
        };
        open.retain(|(_, close)| !close.is_closed());
        if open.len() >= MAX_CONNECTIONS {
            let busiest = busiest(open.iter().map(|(ip, _)| *ip));
            tracing::debug!(%peer, ?busiest, "admin: too many connections; closing the oldest of the address holding the most");
            if let Some(i) = open.iter().position(|(ip, _)| Some(*ip) == busiest) {
                open.remove(i);
            }
        }
        let (close, closed) = oneshot::channel::<()>();
        open.push_back((peer.ip(), close));
        let metrics = metrics.clone();
        let ready = ready.clone();
        let successor = successor.clone();
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
            if req.headers().contains_key(SUCCESSOR_HEADER) && !ready() {
                successor.notify_one();
            }
            let resp = respond(&req, &metrics, ready.as_ref());
            async move { Ok::<_, Infallible>(resp) }
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let mut drained = drained.clone();
        let served = async move {
            // hyper's HTTP/1 closes on the HTTP/2 preface without a word: it is looked for
            // first, and what was read is handed back to hyper.
            let first = tokio::select! {
                first = tokio::time::timeout(HEADER_READ_TIMEOUT, first_bytes(&mut stream)) => first,
                _ = drained.wait_for(|d| *d) => return,
            };
            let first = match first {
                Ok(Some(First::Http1(first))) => first,
                Ok(Some(First::Http2)) => {
                    drop(watcher);
                    refuse_http2(stream).await;
                    return;
                }
                // Closed, or nothing within the time a request head has.
                _ => return,
            };
            let io =
                crate::park::Rewind::new(first, Timed::fixed(stream, SEND_TIMEOUT), None, None);
            let connection = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "admin: connection ended with an error");
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                () = served => {}
                _ = closed => {}
            }
        });
    }
    failures.stopped();
    // Closing the port first tells probes at once that this process is going.
    drop(listener);
    draining.send_replace(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin: connections still open after the drain timeout; leaving them");
    }
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a client's first bytes say it speaks.
enum First {
    /// HTTP/1, with the bytes read.
    Http1(Bytes),
    /// HTTP/2 with prior knowledge: its connection preface.
    Http2,
}

/// Reads a client's first bytes until they tell HTTP/2's preface from an HTTP/1 request (no
/// method begins with `PRI`: HTTP/1.1 reserves it for this): at the first byte for every
/// HTTP/1 client. `None` when it closes first.
async fn first_bytes(stream: &mut TcpStream) -> Option<First> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    loop {
        // Never full here: the whole preface decides.
        let n = stream.read(&mut buf[len..]).await.ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        if buf[..len] != H2_PREFACE[..len] {
            return Some(First::Http1(Bytes::copy_from_slice(&buf[..len])));
        }
        if len == H2_PREFACE.len() {
            return Some(First::Http2);
        }
    }
}

/// Answers a client that speaks HTTP/2 with prior knowledge (`curl --http2-prior-knowledge`,
/// a gRPC health probe, a scraper set to h2c) in its own protocol: the server's SETTINGS,
/// which must come first, and a GOAWAY of code `HTTP_1_1_REQUIRED` whose text says so, which
/// clients show (curl: "HTTP_1_1_REQUIRED"; grpc-go: the text too). hyper closed such a
/// connection without a word, and the client said only that the server hung up. HTTP/2 is
/// not served here: this port stays the small HTTP/1.1 server it is, with no HTTP/2 frames
/// of its own to bound.
async fn refuse_http2(mut stream: TcpStream) {
    const WHY: &[u8] = b"intermission's admin listener speaks HTTP/1.1 only \
        (/metrics, /healthz, /readyz): ask it over HTTP/1.1";
    let mut frames = Vec::with_capacity(9 + 9 + 8 + WHY.len());
    // SETTINGS, empty: length 0, type 0x4, no flags, stream 0.
    frames.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    // GOAWAY (type 0x7) on stream 0: the last stream processed (none), the code, the text.
    let length = u32::try_from(8 + WHY.len()).unwrap_or(8).to_be_bytes();
    frames.extend_from_slice(&length[1..]);
    frames.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&0u32.to_be_bytes());
    frames.extend_from_slice(&0xd_u32.to_be_bytes());
    frames.extend_from_slice(WHY);
    let sent = tokio::time::timeout(SEND_TIMEOUT, async {
        stream.write_all(&frames).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    // What the client sent after its preface (its SETTINGS, a request) is read and dropped
    // until it closes, for a moment: closed with bytes unread, the socket would send a reset,
    // which can reach the client before it has read the GOAWAY.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// The address that holds the most of `open` (oldest first); of those that hold as many, the
/// one with the oldest connection.
fn busiest(open: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
    let mut counts: Vec<(IpAddr, usize)> = Vec::new();
    for ip in open {
        match counts.iter_mut().find(|(seen, _)| *seen == ip) {
            Some((_, n)) => *n += 1,
            None => counts.push((ip, 1)),
        }
    }
    // `max_by_key` keeps the last of equals; reversed, that is the first seen.
    counts
        .into_iter()
        .rev()
        .max_by_key(|&(_, n)| n)
        .map(|(ip, _)| ip)
}

/// The whole routing table. An unknown path is 404 whatever the method; a known one answers
/// only GET and HEAD (hyper leaves the body out for HEAD).
fn respond<B>(
    req: &Request<B>,
    metrics: &Metrics,
    ready: &(dyn Fn() -> bool + Send + Sync),
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return reply(StatusCode::NOT_FOUND, TEXT, "not found");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => {
            let mut resp = if asks_for_openmetrics(req) {
                reply(StatusCode::OK, METRICS_CONTENT_TYPE, metrics.encode())
            } else {
                reply(
                    StatusCode::OK,
                    METRICS_TEXT_CONTENT_TYPE,
                    metrics.encode_text(),
                )
            };
            resp.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("accept"));
            resp
        }
        "/readyz" if ready() => reply(StatusCode::OK, TEXT, "ready"),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready"),
        _ => reply(StatusCode::OK, TEXT, "ok"),
    }
}

/// Whether `Accept` prefers OpenMetrics: its weight is above zero and above that of the 0.0.4
/// text (`text/plain`, or `*/*`, which that text answers as well). Ties go to the text, which
/// every reader of either format reads; Prometheus's Go client breaks them by order. Prometheus asks
/// `application/openmetrics-text;version=1.0.0,…,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`;
/// one configured to put the text format first asks it with the weights the other way.
/// Anything else, no `Accept` and `*/*` included, gets the 0.0.4 text, which every reader of
/// the older format can read.
fn asks_for_openmetrics<B>(req: &Request<B>) -> bool {
    let (mut open, mut text) = (0.0f32, 0.0f32);
    for range in req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or_default();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        let q = if q.is_finite() {
            q.clamp(0.0, 1.0)
        } else {
            0.0
        };
        if kind.eq_ignore_ascii_case("application/openmetrics-text") {
            open = open.max(q);
        } else if kind.eq_ignore_ascii_case("text/plain") || kind == "*/*" {
            text = text.max(q);
        }
    }
    open > 0.0 && open > text
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Probes and scrapes want the present, never a cached past.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::{parse, value};
    use crate::metrics::Outcome;
    use crate::state::mode::Mode;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};

    type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

    async fn call(
        client: &TestClient,
        addr: SocketAddr,
        method: Method,
        path: &str,
    ) -> (StatusCode, http::HeaderMap, String) {
        call_accepting(client, addr, method, path, None).await
    }

    async fn call_accepting(
        client: &TestClient,
        addr: SocketAddr,
        method: Method,
        path: &str,
        accept: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        if let Some(accept) = accept {
            req = req.header(header::ACCEPT, accept);
        }
        let req = req.body(Empty::new()).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .expect("admin answers in time")
            .expect("admin answers");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).expect("utf-8 body"),
        )
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.set_mode(Mode::Maintenance);
        metrics.request(
            Outcome::Held,
            Mode::Maintenance,
            503,
            Duration::from_millis(2),
        );
        let is_ready = Arc::new(AtomicBool::new(false));
        let flag = is_ready.clone();
        let ready: Ready = Arc::new(move || flag.load(Ordering::SeqCst));
        let (trigger, shutdown) = crate::shutdown::channel();
        let server = tokio::spawn(serve(listener, metrics.clone(), ready, shutdown));
        let client: TestClient = Client::builder(TokioExecutor::new()).build_http();

        // Prometheus's own Accept.
        const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,\
            */*;q=0.1";
        let (status, headers, body) =
            call_accepting(&client, addr, Method::GET, "/metrics", Some(PROMETHEUS)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], METRICS_CONTENT_TYPE);
        let samples = parse(&body);
        assert_eq!(
            value(
                &samples,
                "intermission_requests_total",
                &[("outcome", "held"), ("mode", "maintenance")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&samples, "intermission_mode", &[("mode", "maintenance")]),
            Some(1.0)
        );
        assert!(body.ends_with("# EOF\n"));
        // Anything else gets the text format 0.0.4: promtool, and agents that read it alone.
        for accept in [
            None,
            Some("*/*"),
            Some("text/plain;version=0.0.4"),
            Some("application/openmetrics-text; q=0, text/plain"),
            // Prometheus with `scrape_protocols` putting the text format first.
            Some("text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4"),
        ] {
            let (status, headers, text) =
                call_accepting(&client, addr, Method::GET, "/metrics", accept).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                headers[header::CONTENT_TYPE],
                METRICS_TEXT_CONTENT_TYPE,
                "{accept:?}"
            );
            assert_eq!(headers[header::VARY], "accept");
            assert!(
                text.contains("\n# TYPE intermission_requests_total counter\n")
                    && !text.contains("# EOF"),
                "{accept:?}: {text}"
            );
            assert_eq!(parse(&text), samples, "{accept:?}");
        }

        let (status, _, body) = call(&client, addr, Method::GET, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));

        let (status, _, body) = call(&client, addr, Method::GET, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready")
        );
        is_ready.store(true, Ordering::SeqCst);
        let (status, _, body) = call(&client, addr, Method::GET, "/readyz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ready"));

        let (status, headers, body) = call(&client, addr, Method::HEAD, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], METRICS_TEXT_CONTENT_TYPE);
        assert!(body.is_empty(), "HEAD has no body");

        let (status, _, _) = call(&client, addr, Method::GET, "/").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = call(&client, addr, Method::POST, "/nowhere").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, headers, _) = call(&client, addr, Method::POST, "/metrics").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "GET, HEAD");
        let (status, _, _) = call(&client, addr, Method::DELETE, "/readyz").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

        // The client still holds an idle keep-alive connection: shutdown must not wait for it.
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("serve returns promptly after shutdown")
            .expect("serve does not panic");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the port is closed after shutdown"
        );
    }

    /// A client that pipelines requests and reads none of the answers is let go once it has
    /// taken nothing for `SEND_TIMEOUT`, and its slot with it; others are served meanwhile.
    #[tokio::test]
    async fn a_client_that_reads_nothing_is_let_go() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready: Ready = Arc::new(|| true);
        let (_trigger, shutdown) = crate::shutdown::channel();
        tokio::spawn(serve(listener, Arc::new(Metrics::new()), ready, shutdown));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stuck = socket.connect(addr).await.unwrap();
        let flood = async move {
            let request = b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n";
            while stuck.write_all(request).await.is_ok() {}
        };
        let flood = tokio::spawn(flood);
        let client: TestClient = Client::builder(TokioExecutor::new()).build_http();
        let (status, _, _) = call(&client, addr, Method::GET, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        let cut = tokio::time::timeout(SEND_TIMEOUT * 3, flood).await;
        assert!(cut.is_ok(), "a client that reads nothing is still served");
    }

    /// Connections beyond the cap are taken from the address that holds the most: a client
    /// that opens them in a loop closes its own, never a scraper's from another address,
    /// which before lost the oldest connection, whoever held it.
    #[tokio::test]
    async fn a_flood_of_connections_closes_its_own_not_a_scrapers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready: Ready = Arc::new(|| true);
        let (_trigger, shutdown) = crate::shutdown::channel();
        tokio::spawn(serve(listener, Arc::new(Metrics::new()), ready, shutdown));
        async fn ask(conn: &mut tokio::net::TcpStream) -> std::io::Result<String> {
            conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            let mut buf = [0u8; 512];
            while !answer.ends_with(b"ok") {
                let n = conn.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
            Ok(String::from_utf8_lossy(&answer).into_owned())
        }
        // The oldest connection, a scraper's, kept alive between its scrapes.
        let mut scraper = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = ask(&mut scraper).await.unwrap();
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        // Twice the cap from another loopback address, sending nothing.
        let mut flood = Vec::new();
        for _ in 0..2 * MAX_CONNECTIONS {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            flood.push(socket.connect(addr).await.unwrap());
        }
        // Closed by then with either rule: the cap has been applied to the whole flood.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            flood[MAX_CONNECTIONS - 1].read(&mut byte),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the flood's early connections are closed"
        );
        let again = tokio::time::timeout(Duration::from_secs(5), ask(&mut scraper))
            .await
            .expect("answers in time");
        assert!(
            matches!(&again, Ok(a) if a.starts_with("HTTP/1.1 200")),
            "the scraper's connection is still served: {again:?}"
        );
    }

    /// A client that speaks HTTP/2 with prior knowledge, its preface sent in two parts, is
    /// answered in HTTP/2: the server's SETTINGS, then a GOAWAY of code `HTTP_1_1_REQUIRED`
    /// whose text names HTTP/1.1. hyper closed the connection without a byte. A request of
    /// method `PRI` that is no preface is HTTP/1, and HTTP/1.1 is served as before.
    #[tokio::test]
    async fn http2_prior_knowledge_is_told_to_use_http1() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready: Ready = Arc::new(|| true);
        let (_trigger, shutdown) = crate::shutdown::channel();
        tokio::spawn(serve(listener, Arc::new(Metrics::new()), ready, shutdown));
        async fn exchange(addr: SocketAddr, parts: &[&[u8]]) -> Vec<u8> {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            for part in parts {
                conn.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut got = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got));
            assert!(matches!(read.await, Ok(Ok(_))), "the answer ends: {got:?}");
            got
        }
        // The preface, an empty SETTINGS and a request's HEADERS frame (its block elided).
        let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
        let headers = [0u8, 0, 1, 1, 5, 0, 0, 0, 1, 0x82];
        let got = exchange(
            addr,
            &[&H2_PREFACE[..10], &H2_PREFACE[10..], &settings, &headers],
        )
        .await;
        assert_eq!(got[..9], settings, "{got:?}");
        let goaway = &got[9..];
        assert!(goaway.len() > 17, "{got:?}");
        let length = usize::from(goaway[1]) << 8 | usize::from(goaway[2]);
        assert_eq!((goaway[0], goaway[3], length), (0, 7, goaway.len() - 9));
        assert_eq!(goaway[9..17], [0, 0, 0, 0, 0, 0, 0, 0xd]);
        let text = String::from_utf8_lossy(&goaway[17..]);
        assert!(text.contains("speaks HTTP/1.1 only"), "{text}");

        let got = exchange(
            addr,
            &[b"PRI * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"],
        )
        .await;
        assert!(got.starts_with(b"HTTP/1.1 404"), "{got:?}");
        let got = exchange(
            addr,
            &[b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"],
        )
        .await;
        assert!(
            got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"ok"),
            "{got:?}"
        );
    }

    #[test]
    fn the_busiest_address_is_the_one_holding_most_then_the_oldest() {
        let [a, b, c]: [IpAddr; 3] =
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|ip| ip.parse().unwrap());
        assert_eq!(busiest([a, b, b, a, b].into_iter()), Some(b));
        assert_eq!(busiest([c, a, b, a, b].into_iter()), Some(a));
        assert_eq!(busiest([c, a, b].into_iter()), Some(c));
        assert_eq!(busiest(std::iter::empty()), None);
    }

    /// The next proxy's ask lets the address go only while this one drains; a ready proxy
    /// keeps it, whoever sends the header.
    #[tokio::test]
    async fn a_draining_listener_lets_the_next_proxy_have_its_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let draining = Arc::new(AtomicBool::new(false));
        let flag = draining.clone();
        let ready: Ready = Arc::new(move || !flag.load(Ordering::SeqCst));
        let (_trigger, shutdown) = crate::shutdown::channel();
        let server = tokio::spawn(serve(listener, Arc::new(Metrics::new()), ready, shutdown));
        let client: TestClient = Client::builder(TokioExecutor::new()).build_http();
        let ask = || {
            Request::get(format!("http://{addr}/readyz"))
                .header(SUCCESSOR_HEADER, "1")
                .body(Empty::new())
                .unwrap()
        };
        let resp = client.request(ask()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let (status, _, _) = call(&client, addr, Method::GET, "/healthz").await;
        assert_eq!(status, StatusCode::OK, "a ready proxy keeps its listener");
        assert!(!server.is_finished());

        draining.store(true, Ordering::SeqCst);
        let resp = client.request(ask()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("a draining proxy lets its listener go")
            .expect("serve does not panic");
        assert!(tokio::net::TcpListener::bind(addr).await.is_ok());
    }
}
