//! Plain requests forwarded without hyper (`relay`), over plaintext and TLS, held ones answered
//! there too: every way a server frames an answer reaches the client as hyper's path would
//! deliver it, the request reaches the server rewritten as hyper's path rewrites it, a broken
//! answer becomes the outage response, and the connection stays usable throughout, and the
//! access log says of each request what hyper's path says.
//! The relay is told from hyper's path by the case of header names, which it keeps and hyper
//! lowercases; `intercept_statuses` set sends every request through hyper's path, the one
//! compared against.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::StatusCode;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::tls::*;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server on raw sockets answering each path with fixed bytes (health checks with a 200),
/// `/echo` with the request's method and body, and keeping the request heads it was sent. `/close` answers without a length and closes; every other answer keeps the
/// connection open.
struct Scripted {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    /// `/trickle` sends its head and a first piece, then the rest once this is notified;
    /// `/split` sends its head, then its body once this is notified.
    release: Arc<tokio::sync::Notify>,
    /// Notified when `/split` has sent its head, and `/stall-small` its first piece.
    sent: Arc<tokio::sync::Notify>,
    /// `/hang` never answers, `/stall…` send part of their body; this counts the connections
    /// of any that the proxy closed, and of `/large` once it was sent (a kept connection
    /// stays open).
    hung_up: Arc<AtomicUsize>,
    /// The connection (numbered as accepted) each of `heads` came on.
    conns: Arc<Mutex<Vec<usize>>>,
}

/// `/large`'s body: 16 MiB, more than the sockets between proxy and client hold (Linux lets
/// loopback buffers grow to 4 MiB for sending and 6 MiB for receiving).
const LARGE_BODY: usize = 16 << 20;

static LARGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body: Vec<u8> = (0..LARGE_BODY as u32)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
    answer.push_str(std::str::from_utf8(&body).unwrap());
    answer.into_bytes()
});

/// `/large`'s body, chunked: in chunks of 100,000 bytes, so that the relay re-frames it.
static LARGE_CHUNKED: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = &LARGE[LARGE.len() - LARGE_BODY..];
    let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in body.chunks(100_000) {
        answer.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        answer.extend_from_slice(chunk);
        answer.extend_from_slice(b"\r\n");
    }
    answer.extend_from_slice(b"0\r\n\r\n");
    answer
});

fn answer_for(path: &str) -> &'static [u8] {
    match path {
        "/large" => &LARGE,
        "/large-chunked" => &LARGE_CHUNKED,
        "/length" => b"HTTP/1.1 200 OK\r\nX-Upstream-Case: Kept\r\nContent-Length: 5\r\n\r\nhello",
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
        "/close" => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        "/old" => b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nas in 1996",
        "/interim" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/empty" => b"HTTP/1.1 204 No Content\r\nX-Why: nothing\r\nTrailer: X-Sum\r\n\r\n",
        "/hop" => b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
        "/both" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "/once" => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce",
        "/once-reset" => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce",
        "/not-modified" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 42\r\n\r\n",
        "/same-lengths" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        "/named-length" => b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok",
        "/list-length" => b"HTTP/1.1 200 OK\r\nX-Upstream-Case: Kept\r\nContent-Length: 2, 2\r\n\r\nok",
        "/list-and-line" => b"HTTP/1.1 200 OK\r\nX-Upstream-Case: Kept\r\nContent-Length: 2 ,2\r\nX-Between: 1\r\nContent-Length: 2\r\n\r\nok",
        "/two-lengths" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        "/garbage" => b"SURPRISE\r\n\r\n",
        // A 100 KB header: more than curl or Python's h2 takes, and than the proxy passes on.
        "/huge-head" => {
            static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            HEAD.get_or_init(|| {
                let big = "x".repeat(100_000);
                format!("HTTP/1.1 200 OK\r\nX-Big: {big}\r\nContent-Length: 2\r\n\r\nok")
                    .into_bytes()
            })
        }
        "/switch" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw bytes",
        "/bad-chunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nxx\r\n0\r\n\r\n",
        "/cut" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst",
        // What a broken or careless server sends past an answer's end, or beside an answer
        // that has none: never read as the next request's answer.
        "/extra" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
        "/chunked-extra" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
        "/stray-204" => b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nstray",
        "/head-body" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
        "/said-close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        "/old-kept" => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/spacing" => b"HTTP/1.1 200 Fine\r\nX-Tight:tight\r\nX-Wide: \t wide \t \r\nX-Upstream-Case: Kept\r\nContent-Length: 2\r\n\r\nok",
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    }
}

impl Scripted {
    /// Whether the proxy closes one more of the connections counted in `hung_up` than
    /// `before`, within 10 s.
    async fn closed_one_since(&self, before: usize) -> bool {
        wait_until(Duration::from_secs(10), || {
            self.hung_up.load(Ordering::SeqCst) > before
        })
        .await
    }
}

async fn scripted() -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(tokio::sync::Notify::new());
    let sent = Arc::new(tokio::sync::Notify::new());
    let hung_up = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(Mutex::new(Vec::new()));
    let (seen, held, told, hangs, on) = (
        heads.clone(),
        release.clone(),
        sent.clone(),
        hung_up.clone(),
        conns.clone(),
    );
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut sock, _)) = listener.accept().await {
            let (seen, held, told, hangs, on) = (
                seen.clone(),
                held.clone(),
                told.clone(),
                hangs.clone(),
                on.clone(),
            );
            accepted += 1;
            let conn = accepted;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // After `/once`, the connection's next request is read and the connection
                // closed without an answer, unannounced.
                let mut close_next = false;
                // After `/once-reset`, the connection is closed as the next request arrives,
                // unread, so that the proxy reads a reset rather than an end.
                let mut reset_next = false;
                let mut sent_large = false;
                loop {
                    if reset_next {
                        let _ = sock.readable().await;
                        return;
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                if sent_large {
                                    hangs.fetch_add(1, Ordering::SeqCst);
                                }
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            let named = name.trim().eq_ignore_ascii_case("content-length");
                            named.then(|| value.trim().parse::<usize>().ok()).flatten()
                        })
                        .unwrap_or(0);
                    while buf.len() < length {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..length).collect();
                    if close_next {
                        return;
                    }
                    let target = head.split(' ').nth(1).unwrap_or("/");
                    let path = target.split('?').next().unwrap_or("/").to_owned();
                    let head_only = head.starts_with("HEAD ");
                    let method = head.split(' ').next().unwrap_or_default().to_owned();
                    let echo;
                    let mut answer = if head.to_lowercase().contains("intermission-health-check") {
                        &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..]
                    } else {
                        seen.lock().unwrap().push(head);
                        on.lock().unwrap().push(conn);
                        if path == "/echo" {
                            // The method and the body the request came with.
                            let said = [method.as_bytes(), b" ", &body].concat();
                            let mut bytes = format!(
                                "HTTP/1.1 200 OK\r\nX-Upstream-Case: Kept\r\nContent-Length: {}\r\n\r\n",
                                said.len()
                            )
                            .into_bytes();
                            bytes.extend_from_slice(&said);
                            echo = bytes;
                            &echo[..]
                        } else {
                            answer_for(&path)
                        }
                    };
                    // To a HEAD, the heads only (an interim one's included), as a server sends.
                    if head_only && path != "/head-body" {
                        let mut end = 0;
                        while let Some(at) = answer[end..].windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            end += at + 4;
                            if !answer[end - at - 4..].starts_with(b"HTTP/1.1 1") {
                                break;
                            }
                        }
                        answer = &answer[..end];
                    }
                    close_next = path == "/once";
                    reset_next = path == "/once-reset";
                    if path.starts_with("/stall") {
                        // Too long to be held whole by the relay, or short enough; chunked;
                        // until the server closes.
                        let head: &[u8] = match path.as_str() {
                            "/stall" => b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nfirst",
                            "/stall-chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                            "/stall-close" => b"HTTP/1.1 200 OK\r\n\r\nfirst",
                            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst",
                        };
                        if sock.write_all(head).await.is_ok() {
                            if path == "/stall-small" {
                                told.notify_one();
                            }
                            let mut rest = Vec::new();
                            let _ = sock.read_to_end(&mut rest).await;
                            hangs.fetch_add(1, Ordering::SeqCst);
                        }
                        return;
                    }
                    if path == "/late" {
                        // The head after 1.5 s.
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        if sock.write_all(answer_for("/length")).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if let Some(rest) = path.strip_prefix("/streamed-extra") {
                        // A body that comes in two pieces (read from the socket as it comes,
                        // not whole with its head), its end followed by stray bytes.
                        let (head, tail): (&[u8], &[u8]) = match rest {
                            "-chunked" => (
                                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                                b"6\r\nsecond\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
                            ),
                            _ => (
                                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nfirst",
                                b"secondHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
                            ),
                        };
                        if sock.write_all(head).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if sock.write_all(tail).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if path == "/drip" {
                        // 30,000 bytes (too many to be held whole) in six pieces 400 ms apart.
                        let head = b"HTTP/1.1 200 OK\r\nX-Upstream-Case: Kept\r\nContent-Length: 30000\r\n\r\n";
                        if sock.write_all(head).await.is_err() {
                            return;
                        }
                        for _ in 0..6 {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                            if sock.write_all(&[b'd'; 5000]).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    if path == "/hang" {
                        let mut rest = Vec::new();
                        let _ = sock.read_to_end(&mut rest).await;
                        hangs.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    if path == "/split" {
                        let head =
                            b"HTTP/1.1 200 OK\r\nX-Upstream-Case: Kept\r\nContent-Length: 4\r\n\r\n";
                        if sock.write_all(head).await.is_err() {
                            return;
                        }
                        told.notify_one();
                        held.notified().await;
                        if sock.write_all(b"body").await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if path == "/trickle" {
                        let head = b"HTTP/1.1 200 OK\r\n\r\nfirst";
                        if sock.write_all(head).await.is_ok() {
                            held.notified().await;
                            let _ = sock.write_all(b"second").await;
                        }
                        return;
                    }
                    if sock.write_all(answer).await.is_err() {
                        if path == "/large" {
                            hangs.fetch_add(1, Ordering::SeqCst);
                        }
                        return;
                    }
                    if matches!(path.as_str(), "/close" | "/cut" | "/old") {
                        return;
                    }
                    sent_large = path == "/large";
                }
            });
        }
    });
    Scripted {
        addr,
        heads,
        release,
        sent,
        hung_up,
        conns,
    }
}

/// A proxy of `up`; with `hyper`, one that forwards through hyper's path: it intercepts a
/// status the server never sends (418), which changes nothing else, and the relay leaves
/// every request of a proxy that intercepts to hyper.
fn config(up: &Scripted, hyper: bool) -> String {
    let intercept = if hyper {
        "intercept_statuses = [418]\n"
    } else {
        ""
    };
    // The first check decides at once (README): on a loaded machine the scripted server can
    // take longer than the default 1 s to answer it, and an outage taken from that would
    // answer the tests' requests with the holding response.
    format!(
        "[upstream]\nservers = [\"http://{}\"]\n{intercept}[health]\ninterval = \"60s\"\ntimeout = \"30s\"\n",
        up.addr
    )
}

impl Tls {
    /// A proxy from `config` and a client connection to it: over TLS with `over_tls`, else
    /// plaintext.
    async fn maybe(&self, config: &str, over_tls: bool) -> (Proxy, Client) {
        if over_tls {
            let proxy = self.proxy(config).await;
            let client = Client::connect_tls(tls_addr(&proxy), self).await;
            (proxy, client)
        } else {
            let proxy = spawn_proxy(config).await;
            let client = Client::connect(proxy.addr).await;
            (proxy, client)
        }
    }
}

/// A proxy of a server through the relay and one through hyper's path, with a client
/// connection to each: the relay's client, hyper's, and the two proxies, to be kept for as
/// long as the clients are used. What the tests of both compare is each answer, not the health
/// a run of broken ones leads to: the server is checked before they begin (`wait_checked`),
/// and broken answers do not take it out (`fall` out of reach).
type Both = (Client, Client, (Proxy, Proxy));

fn both_config(up: &Scripted, hyper: bool) -> String {
    config(up, hyper).replacen("[health]\n", "[health]\nfall = 1000000\n", 1)
}

async fn both(up: &Scripted) -> Both {
    let relay = spawn_proxy(&both_config(up, false)).await;
    let hyper = spawn_proxy(&both_config(up, true)).await;
    wait_checked(&relay).await;
    wait_checked(&hyper).await;
    (
        Client::connect(relay.addr).await,
        Client::connect(hyper.addr).await,
        (relay, hyper),
    )
}

/// The same, with the clients connected over TLS.
async fn both_over_tls(up: &Scripted, tls: &Tls) -> Both {
    let relay = tls.proxy(&both_config(up, false)).await;
    let hyper = tls.proxy(&both_config(up, true)).await;
    wait_checked(&relay).await;
    wait_checked(&hyper).await;
    (
        Client::connect_tls(tls_addr(&relay), tls).await,
        Client::connect_tls(tls_addr(&hyper), tls).await,
        (relay, hyper),
    )
}

/// Waits for the first health check of `proxy`'s server. A first result decides a server's
/// health at once: a failure a test provokes must come after it to be one of the `fall` it
/// takes, not the result that takes the server out.
async fn wait_checked(proxy: &Proxy) {
    let checked = || async {
        let health = ctl(proxy, intermission::control::protocol::Request::Health).await;
        health.health.unwrap()[0].healthy == Some(true)
    };
    assert!(wait_until_async(checked).await, "the server is checked");
}

/// A client's stream: plaintext, or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// One keep-alive client connection on raw bytes, reading answers by their framing.
struct Client {
    sock: Box<dyn Stream>,
    buf: Vec<u8>,
}

/// An answer as read off the wire: the head as sent, the body without its framing, and the
/// trailer lines of a chunked one.
struct Answer {
    head: String,
    body: Vec<u8>,
    trailers: Vec<String>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    /// Whether the relay forwarded it: it keeps the case of the server's header names, which
    /// hyper's path lowercases.
    fn relayed(&self) -> bool {
        self.head.contains("\r\nX-Upstream-Case: Kept")
    }

    /// The value of a header, its name matched ignoring case.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            sock: Box::new(TcpStream::connect(addr).await.unwrap()),
            buf: Vec::new(),
        }
    }

    /// A connection over TLS, offering HTTP/1.1 only by ALPN, as most HTTPS clients but
    /// browsers do.
    async fn connect_tls(addr: SocketAddr, tls: &Tls) -> Client {
        Client::over(tls_stream(addr, tls).await)
    }

    fn over(stream: impl Stream + 'static) -> Client {
        Client {
            sock: Box::new(stream),
            buf: Vec::new(),
        }
    }

    /// Waits for the proxy to end the connection cleanly (over TLS, with `close_notify`); how
    /// long that took.
    async fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout_at((start + limit).into(), self.sock.read(&mut chunk)).await
            {
                Err(_) => return None,
                Ok(Ok(0)) => return Some(start.elapsed()),
                Ok(Err(e)) => panic!("the connection ended with an error: {e}"),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "the proxy closed the connection; so far: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Reads until `bytes` have arrived, whatever comes around them.
    async fn fill_until(&mut self, bytes: &[u8]) {
        while !self.buf.windows(bytes.len()).any(|w| w == bytes) {
            self.fill().await;
        }
    }

    async fn send(&mut self, request: &str) {
        self.sock.write_all(request.as_bytes()).await.unwrap();
    }

    async fn get(&mut self, path: &str) -> Answer {
        self.send(&format!(
            "GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n"
        ))
        .await;
        self.read().await
    }

    /// A `HEAD` and its answer, whose head is all there is.
    async fn head(&mut self, path: &str) -> Answer {
        self.send(&format!(
            "HEAD {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n"
        ))
        .await;
        self.read_head().await
    }

    /// The next answer's head, with no body yet.
    async fn read_head(&mut self) -> Answer {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            self.fill().await;
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end + 4);
        Answer {
            head,
            body: Vec::new(),
            trailers: Vec::new(),
        }
    }

    async fn read(&mut self) -> Answer {
        let mut answer = self.read_head().await;
        if answer.status() == 204 || answer.status() == 304 {
            return answer;
        }
        if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let line = loop {
                    if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break at;
                    }
                    self.fill().await;
                };
                let text = String::from_utf8_lossy(&self.buf[..line]).into_owned();
                let size =
                    usize::from_str_radix(text.split(';').next().unwrap().trim(), 16).unwrap();
                self.buf.drain(..line + 2);
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            if at == 0 {
                                self.buf.drain(..2);
                                return answer;
                            }
                            let line = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                            answer.trailers.push(line);
                            self.buf.drain(..at + 2);
                            continue;
                        }
                        self.fill().await;
                    }
                }
                while self.buf.len() < size + 2 {
                    self.fill().await;
                }
                answer.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
        }
        let length: usize = answer
            .header("content-length")
            .expect("a length")
            .parse()
            .unwrap();
        while self.buf.len() < length {
            self.fill().await;
        }
        answer.body = self.buf.drain(..length).collect();
        answer
    }
}

#[tokio::test]
async fn every_framing_reaches_the_client_as_through_hyper_on_one_connection() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    let paths = ["/same-lengths", "/named-length", "/both", "/old"];
    assert_same_answers(
        &mut fast,
        &mut slow,
        &[FRAMINGS.as_slice(), &paths].concat(),
    )
    .await;
    // Chunked beside a length: the chunks frame it, and the length goes (RFC 9112 §6.3).
    let b = slow.get("/both").await;
    assert_eq!(
        (&b.body[..], b.header("content-length")),
        (&b"hello"[..], None)
    );
    // An HTTP/1.0 answer goes on as HTTP/1.1, chunked, and the connection stays open.
    let b = slow.get("/old").await;
    assert!(b.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", b.head);
    assert_eq!(b.body, b"as in 1996");
    assert_eq!(slow.get("/length").await.body, b"hello");
    // The relay kept the server's header names as written; hyper's path lowercased them.
    let a = fast.get("/length").await;
    let b = slow.get("/length").await;
    assert!(a.head.contains("\r\nX-Upstream-Case: Kept"), "{}", a.head);
    assert!(b.head.contains("\r\nx-upstream-case: Kept"), "{}", b.head);
    assert_eq!(fast.get("/hop").await.header("x-kept"), Some("yes"));
}

/// An answer without a length to an HTTP/1.0 client that asked for keep-alive can only end
/// with the connection: it says no `keep-alive` (hyper's server said `connection: keep-alive`
/// and then closed, and a client believing it could send its next request into the close),
/// as nginx says `Connection: close`. One with a length keeps the connection, as before.
#[tokio::test]
async fn an_http10_client_is_not_told_keep_alive_before_an_answer_ended_by_a_close() {
    let up = scripted().await;
    let (_, _, (relay, hyper)) = both(&up).await;
    for proxy in [&relay, &hyper] {
        for (path, body) in [("/close", "until the end"), ("/old", "as in 1996")] {
            let request =
                format!("GET {path} HTTP/1.0\r\nHost: shop.test\r\nConnection: keep-alive\r\n\r\n");
            let got = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(10)).await;
            let (head, rest) = got.split_once("\r\n\r\n").unwrap_or((&got, ""));
            assert_eq!(rest, body, "{path}: {got}");
            assert!(
                !head.to_ascii_lowercase().contains("keep-alive"),
                "{path}: {head}"
            );
        }
        // Two answers with a length on one connection: it stays open between them.
        let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
        let one = b"GET /length HTTP/1.0\r\nHost: shop.test\r\nConnection: keep-alive\r\n\r\n";
        sock.write_all(&[&one[..], &one[..]].concat())
            .await
            .unwrap();
        let mut got = Vec::new();
        let two = |got: &[u8]| got.windows(5).filter(|w| w == b"hello").count() == 2;
        let read = async {
            let mut chunk = [0u8; 4096];
            while !two(&got) {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(two(&got), "{text}");
        assert!(text.contains("connection: keep-alive"), "{text}");
    }
}

/// A length given as a list of one value repeated (`2, 2`), which hyper's client takes and
/// some clients refuse (Go's) or read as no length (Python's, which then waits for a close),
/// reaches the client as one line of digits through both paths, before a body and for a
/// `HEAD`, and the connection goes on.
#[tokio::test]
async fn a_length_given_as_a_list_reaches_the_client_as_one_line_of_digits() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    let one_length = |a: &Answer, what: &str| {
        let lengths: Vec<String> = a
            .head
            .lines()
            .map(str::to_ascii_lowercase)
            .filter(|l| l.starts_with("content-length"))
            .collect();
        assert_eq!(lengths, ["content-length: 2"], "{what}: {}", a.head);
    };
    for path in ["/list-length", "/list-and-line"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n");
        let mut answers = Vec::new();
        for (client, what) in [(&mut fast, "relay"), (&mut slow, "hyper")] {
            client.send(&request).await;
            let a = client.read_head().await;
            one_length(&a, &format!("GET {path} through {what}"));
            while client.buf.len() < 2 {
                client.fill().await;
            }
            assert_eq!(&client.buf[..2], b"ok", "{path} through {what}");
            client.buf.drain(..2);
            assert_eq!(client.get("/length").await.body, b"hello", "{path} {what}");
            let h = client.head(path).await;
            one_length(&h, &format!("HEAD {path} through {what}"));
            assert_eq!(client.get("/length").await.body, b"hello", "{path} {what}");
            answers.push((a, h));
        }
        let (a, b) = (&answers[0], &answers[1]);
        assert!(
            a.0.relayed() && a.1.relayed(),
            "not the relay: {}",
            a.0.head
        );
        assert!(!b.0.relayed(), "not hyper's path: {}", b.0.head);
        assert_eq!(lines(&a.0), lines(&b.0), "{path}");
        assert_eq!(lines(&a.1), lines(&b.1), "HEAD {path}");
    }
}

/// Header lines written in other ways than `name: value` reach the server and the client as
/// hyper writes them, in both directions: the relay copies a line whole only when it is
/// written that way already.
#[tokio::test]
async fn lines_written_unusually_are_passed_on_as_hyper_writes_them() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    up.heads.lock().unwrap().clear();
    let request = "GET /spacing HTTP/1.1\r\nHost:shop.example\r\nX-Tight:tight\r\n\
                   X-Wide: \t wide \t \r\nX-Bare: lf\nX-Plain: as usual\r\n\r\n";
    fast.send(request).await;
    slow.send(request).await;
    let (a, b) = (fast.read().await, slow.read().await);
    assert!(a.relayed(), "not relayed: {}", a.head);
    assert_eq!((lines(&a), &a.body), (lines(&b), &b.body));
    let status_line = |a: &Answer| a.head.lines().next().map(str::to_owned);
    assert_eq!(status_line(&a).as_deref(), Some("HTTP/1.1 200 Fine"));
    assert_eq!(status_line(&a), status_line(&b));
    for line in ["x-tight: tight", "x-wide: wide"] {
        assert!(lines(&a).iter().any(|l| l == line), "{line}: {}", a.head);
    }
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    let lower = |h: &str| {
        let mut lines: Vec<String> = h.split("\r\n").map(str::to_ascii_lowercase).collect();
        lines.sort();
        lines
    };
    assert_eq!(lower(&heads[0]), lower(&heads[1]), "{heads:?}");
    for line in [
        "host: shop.example",
        "x-tight: tight",
        "x-bare: lf",
        "x-plain: as usual",
    ] {
        assert!(
            lower(&heads[0]).iter().any(|l| l == line),
            "{line}: {heads:?}"
        );
    }
}

/// Paths whose answers are framed in each way a server may frame them.
const FRAMINGS: [&str; 8] = [
    "/length",
    "/chunked",
    "/close",
    "/interim",
    "/empty",
    "/hop",
    "/not-modified",
    "/length",
];

/// Asks each path on both connections: the same status and body, the same header lines but
/// the date and the names' case, and the same trailers.
async fn assert_same_answers(fast: &mut Client, slow: &mut Client, paths: &[&str]) {
    for path in paths {
        let a = fast.get(path).await;
        let b = slow.get(path).await;
        let heads = format!("{path}:\n{}\n---\n{}", a.head, b.head);
        assert_eq!((a.status(), &a.body), (b.status(), &b.body), "{heads}");
        assert_eq!(lines(&a), lines(&b), "{heads}");
        assert!(a.header("date").is_some(), "{heads}");
        // Trailers reach a client that asked for them (`TE: trailers`, which hyper serves);
        // to these requests, hyper's path sends none, and neither does the relay.
        assert_eq!(a.trailers, b.trailers, "{path}");
    }
}

/// An answer's header lines but the date, names lowercased (as hyper writes them), sorted.
fn lines(a: &Answer) -> Vec<String> {
    let mut lines: Vec<String> = a
        .head
        .lines()
        .skip(1)
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            format!("{}:{}", n.to_ascii_lowercase(), v)
        })
        .filter(|l| !l.starts_with("date:"))
        .collect();
    lines.sort();
    lines
}

/// A request with a body whole in one read is forwarded by the relay, as hyper's path forwards
/// it: the same answer, the same bytes for the server, and the connection usable after it. A
/// larger body is hyper's, on the relay's connection too.
#[tokio::test]
async fn a_request_with_a_small_body_is_forwarded_as_through_hyper() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    let large = "x".repeat(10_000);
    let cases = [
        ("POST", "{\"order\": 42}", true),
        ("PUT", "replace", true),
        ("PATCH", "a", true),
        ("DELETE", "", true),
        ("OPTIONS", "", true),
        ("POST", "", true),
        ("POST", large.as_str(), false),
    ];
    for (method, body, relayed) in cases {
        let request = format!(
            "{method} /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        fast.send(&request).await;
        slow.send(&request).await;
        let (a, b) = (fast.read().await, slow.read().await);
        let case = format!("{method} of {} bytes", body.len());
        assert_eq!(a.status(), 200, "{case}: {}", a.head);
        assert_eq!(a.body, format!("{method} {body}").as_bytes(), "{case}");
        assert_eq!((lines(&a), &a.body), (lines(&b), &b.body), "{case}");
        let kept_case = a.head.contains("\r\nX-Upstream-Case: Kept");
        assert_eq!(kept_case, relayed, "{case}: {}", a.head);
        // The connection is usable after it: the body was not read as a request.
        assert_eq!(fast.get("/length").await.body, b"hello", "{case}");
        assert_eq!(slow.get("/length").await.body, b"hello", "{case}");
    }
    // What the server was sent, head by head, the same both ways.
    let heads = up.heads.lock().unwrap().clone();
    let sent: Vec<&String> = heads.iter().filter(|h| h.contains("/echo ")).collect();
    assert_eq!(sent.len(), 2 * cases.len());
    let lower = |h: &str| {
        let mut lines: Vec<String> = h.lines().map(str::to_ascii_lowercase).collect();
        lines.sort();
        lines
    };
    for pair in sent.chunks(2) {
        assert_eq!(lower(pair[0]), lower(pair[1]), "{pair:?}");
    }
}

/// A body may come after its head: read at once when it follows closely, and when it is late,
/// the request goes to hyper, which forwards the head and waits for the body, as it would have
/// from the start; the connection's deadline for a head does not close it meanwhile.
#[tokio::test]
async fn a_body_that_comes_after_its_head_is_forwarded_whole() {
    let up = scripted().await;
    let text = config(&up, false).replacen(
        "[upstream]",
        "[proxy]\nheader_read_timeout = \"1s\"\n[upstream]",
        1,
    );
    let proxy = spawn_proxy(&text).await;
    let mut client = Client::connect(proxy.addr).await;
    let head = "POST /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 10\r\n\r\n";
    // Right behind its head.
    client.send(head).await;
    client.send("0123456789").await;
    assert_eq!(client.read().await.body, b"POST 0123456789");
    // Half of it, then the rest after longer than a head may take.
    client.send(&format!("{head}01234")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.send("56789").await;
    let late = client.read().await;
    assert_eq!(late.body, b"POST 0123456789", "{}", late.head);
    // Pipelined behind a body, in one write.
    client
        .send(&format!(
            "{head}abcdefghijGET /length HTTP/1.1\r\nHost: shop.example\r\n\r\n"
        ))
        .await;
    assert_eq!(client.read().await.body, b"POST abcdefghij");
    assert_eq!(client.read().await.body, b"hello");
}

/// A `POST` that reached a server which then closed without an answer is never sent again: the
/// server may have acted on it. A `DELETE` is, once, on a new connection, as on hyper's path.
#[tokio::test]
async fn a_post_on_a_connection_the_server_closes_is_not_sent_twice() {
    let up = scripted().await;
    for hyper in [false, true] {
        let proxy = spawn_proxy(&config(&up, hyper)).await;
        let mut client = Client::connect(proxy.addr).await;
        let echoed = || {
            let heads = up.heads.lock().unwrap();
            heads
                .iter()
                .filter(|h| h.starts_with("POST /echo "))
                .count()
        };
        wait_checked(&proxy).await;
        let before = echoed();
        let post = "POST /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\n\r\norder";
        assert_eq!(client.get("/once").await.body, b"once");
        client.send(post).await;
        let a = client.read().await;
        assert_eq!(a.status(), 503, "hyper's path: {hyper}; {}", a.head);
        assert_eq!(echoed(), before, "hyper's path: {hyper}: sent again");
        assert_eq!(
            client.get("/once").await.body,
            b"once",
            "hyper's path: {hyper}"
        );
        client
            .send("DELETE /echo HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await;
        let b = client.read().await;
        assert_eq!(b.body, b"DELETE ", "hyper's path: {hyper}; {}", b.head);
        let relayed = b.head.contains("X-Upstream-Case: Kept");
        assert_eq!(relayed, !hyper, "{}", b.head);
        if !hyper {
            // The relay holds a body whole, so an idempotent request with one is sent again
            // too (hyper's path holds one whole only when another server could take it).
            assert_eq!(client.get("/once").await.body, b"once");
            let put = "PUT /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 3\r\n\r\nnew";
            client.send(put).await;
            assert_eq!(client.read().await.body, b"PUT new");
        }
    }
}

/// A `HEAD`'s answer as hyper's path gives it, every header the same but the date (names
/// aside, which hyper lowercases), and no body on the connection after it.
#[tokio::test]
async fn a_head_request_is_answered_as_through_hyper() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    for path in [
        "/length",
        "/chunked",
        "/both",
        "/close",
        "/interim",
        "/empty",
        "/hop",
        "/missing",
        "/not-modified",
        "/named-length",
        "/same-lengths",
        "/two-lengths",
        "/garbage",
        "/stray-204",
    ] {
        let (a, b) = (fast.head(path).await, slow.head(path).await);
        assert_eq!(a.status(), b.status(), "{path}");
        assert_eq!(lines(&a), lines(&b), "{path}:\n{}\n---\n{}", a.head, b.head);
        assert!(a.header("date").is_some(), "{path}: {}", a.head);
        // Nothing followed the head: the next answer on the connection is whole.
        assert_eq!(fast.get("/length").await.body, b"hello", "{path}");
        assert_eq!(slow.get("/length").await.body, b"hello", "{path}");
    }
    let a = fast.head("/length").await;
    assert!(
        a.head.contains("\r\nX-Upstream-Case: Kept"),
        "not the relay: {}",
        a.head
    );
    // A 204 carries no length, to a `HEAD` either (RFC 9110 §8.6): hyper's server writes
    // none, and the relay passed the server's on.
    for client in [&mut fast, &mut slow] {
        let a = client.head("/stray-204").await;
        assert_eq!(a.status(), 204, "{}", a.head);
        assert_eq!(a.header("content-length"), None, "{}", a.head);
        assert_eq!(client.get("/length").await.body, b"hello");
    }
    // Two lengths, which no `HEAD` answer's framing reads: the one they agree on is passed
    // on, and none when they differ, on both paths (hyper's server, given two that differ,
    // refused the second and closed the connection without an answer; given the first alone,
    // it made HTTP/2 clients refuse the answer).
    for (path, want) in [("/two-lengths", None), ("/same-lengths", Some("2"))] {
        for client in [&mut fast, &mut slow] {
            let a = client.head(path).await;
            assert_eq!(a.status(), 200, "{}", a.head);
            let lengths = a
                .head
                .to_ascii_lowercase()
                .matches("content-length")
                .count();
            assert_eq!(
                (a.header("content-length"), lengths),
                (want, usize::from(want.is_some())),
                "{}",
                a.head
            );
            assert_eq!(client.get("/length").await.body, b"hello");
        }
    }
}

/// A server that closes a busy connection as the next request arrives, unannounced (a
/// request limit per connection it does not tell of): the request is sent again on a new
/// connection, as nginx sends one again after a cached connection failed, not answered with
/// the outage response, however soon it came after the last answer.
#[tokio::test]
async fn a_request_on_a_connection_the_server_closes_unannounced_is_sent_again() {
    let up = scripted().await;
    for (hyper, once) in [
        (false, "/once"),
        (true, "/once"),
        (false, "/once-reset"),
        (true, "/once-reset"),
    ] {
        let proxy = spawn_proxy(&config(&up, hyper)).await;
        let mut client = Client::connect(proxy.addr).await;
        for _ in 0..3 {
            assert_eq!(client.get(once).await.body, b"once");
            // Sent at once on the kept connection, which the server closes when it arrives.
            let next = client.get("/length").await;
            assert_eq!(
                (next.status(), &next.body[..]),
                (200, &b"hello"[..]),
                "hyper's path: {hyper}, after {once}; {}",
                next.head
            );
            assert_eq!(
                next.head.contains("X-Upstream-Case: Kept"),
                !hyper,
                "hyper's path: {hyper}, after {once}; {}",
                next.head
            );
        }
    }
}

#[tokio::test]
async fn an_answer_until_close_is_sent_chunked_and_the_client_stays_connected() {
    let up = scripted().await;
    let proxy = spawn_proxy(&config(&up, false)).await;
    let mut client = Client::connect(proxy.addr).await;
    let a = client.get("/close").await;
    assert_eq!(a.header("transfer-encoding"), Some("chunked"), "{}", a.head);
    assert_eq!(a.body, b"until the end");
    assert!(
        a.head.contains("\r\nContent-Type: text/plain"),
        "not hyper's path: {}",
        a.head
    );
    let b = client.get("/chunked").await;
    assert_eq!(b.body, b"hello world");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = scripted().await;
    let proxy = spawn_proxy(&config(&up, false)).await;
    let mut client = Client::connect(proxy.addr).await;
    let host = "Host: shop.example\r\n";
    client
        .send(&format!(
            "GET /length HTTP/1.1\r\n{host}\r\nGET /chunked HTTP/1.1\r\n{host}\r\nGET /empty HTTP/1.1\r\n{host}\r\n"
        ))
        .await;
    assert_eq!(client.read().await.body, b"hello");
    assert_eq!(client.read().await.body, b"hello world");
    assert_eq!(client.read().await.status(), 204);
    assert_eq!(client.get("/length").await.body, b"hello");
}

#[tokio::test]
async fn the_server_gets_the_request_rewritten_as_hyper_rewrites_it() {
    let up = scripted().await;
    // (the proxies' [proxy] section, the X-Forwarded-* the server gets)
    let trusting = "[proxy]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let cases = [
        ("", ["6.6.6.6, 127.0.0.1", "shop.example", "http"]),
        (trusting, ["6.6.6.6, 127.0.0.1", "evil", "http"]),
    ];
    for (section, forwarded) in cases {
        let relay = spawn_proxy(&format!("{section}{}", config(&up, false))).await;
        let hyper = spawn_proxy(&format!("{section}{}", config(&up, true))).await;
        let request = "GET /length?q=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive\r\n\
                       Keep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil\r\n\
                       X-Client-Case: Kept\r\n\r\n";
        up.heads.lock().unwrap().clear();
        for proxy in [&relay, &hyper] {
            let mut client = Client::connect(proxy.addr).await;
            client.send(request).await;
            assert_eq!(client.read().await.status(), 200);
        }
        let heads = up.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 2, "{heads:?}");
        let fields = |head: &str| {
            let mut fields: Vec<(String, String)> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.to_lowercase(), v.trim().to_owned()))
                .collect();
            fields.sort();
            fields
        };
        assert_eq!(heads[0].lines().next(), Some("GET /length?q=1 HTTP/1.1"));
        assert_eq!(
            fields(&heads[0]),
            fields(&heads[1]),
            "{section}relay:\n{}\nhyper:\n{}",
            heads[0],
            heads[1]
        );
        let relayed = fields(&heads[0]);
        let get = |name: &str| {
            relayed
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let names = ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"];
        assert_eq!(names.map(get), forwarded.map(Some), "{section}");
        assert_eq!(get("keep-alive"), None);
        assert!(heads[0].contains("\r\nX-Client-Case: Kept"), "{}", heads[0]);
    }
}

/// A `101` to a protocol the request did not offer (RFC 9110 §7.8: a server must not switch
/// to one) is a failed answer, as one to a request that asked for no upgrade: made a tunnel,
/// it would carry the client's next bytes to the server as they are, past the proxy's rules
/// (its `X-Forwarded-For`, the reserved paths, a hold). Upgrades go through hyper's path on
/// both proxies.
#[tokio::test]
async fn a_switch_to_a_protocol_the_client_did_not_offer_is_the_outage_response() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    for client in [&mut fast, &mut slow] {
        client
            .send("GET /switch HTTP/1.1\r\nHost: shop.example\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n")
            .await;
        let a = client.read().await;
        assert_eq!(a.status(), 503, "{}", a.head);
        assert_eq!(
            a.header("x-intermission-mode"),
            Some("outage"),
            "{}",
            a.head
        );
        assert_eq!(client.get("/length").await.body, b"hello");
    }
}

#[tokio::test]
async fn a_broken_answer_is_the_outage_response_and_the_connection_goes_on() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    // A switch the request did not ask for leaves the client nothing it can use.
    for path in ["/two-lengths", "/garbage", "/switch", "/huge-head"] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: shop.example\r\nAccept: application/json\r\n\r\n"
        );
        fast.send(&request).await;
        slow.send(&request).await;
        let (a, b) = (fast.read().await, slow.read().await);
        assert_eq!(
            a.status(),
            StatusCode::SERVICE_UNAVAILABLE.as_u16(),
            "{path}: {}",
            a.head
        );
        assert_eq!(
            a.header("x-intermission-mode"),
            Some("outage"),
            "{path}: {}",
            a.head
        );
        assert_eq!(
            a.header("content-type"),
            b.header("content-type"),
            "{path}: {}",
            b.head
        );
        assert_eq!(a.status(), b.status(), "{path}");
        assert_eq!(fast.get("/length").await.body, b"hello", "after {path}");
    }
}

/// An answer whose chunked body breaks off with a bad chunk: what came whole before it reaches
/// the client, the head included when both came in one read, then the connection closes; on
/// both paths, never an empty reply.
#[tokio::test]
async fn a_bad_chunk_ends_the_answer_after_what_came_whole() {
    let up = scripted().await;
    let (mut fast, mut slow, _proxies) = both(&up).await;
    for (name, client) in [("relay", &mut fast), ("hyper", &mut slow)] {
        client
            .send("GET /bad-chunk HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await;
        let closed = client.closed_within(Duration::from_secs(10)).await;
        assert!(closed.is_some(), "{name}: the connection stayed open");
        let got = String::from_utf8_lossy(&client.buf).into_owned();
        assert!(got.starts_with("HTTP/1.1 200"), "{name}: {got:?}");
        assert!(got.ends_with("\r\n\r\n5\r\nhello\r\n"), "{name}: {got:?}");
    }
}

#[tokio::test]
async fn with_no_server_listening_the_answer_is_the_outage_response() {
    let dead = refusing();
    let addr = dead.addr;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{addr}\"]\nconnect_timeout = \"1s\"\n[health]\ninterval = \"60s\"\n[log]\naccess_log = false\n"
    ))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    let a = client.get("/").await;
    assert_eq!(a.status(), 503, "{}", a.head);
    assert_eq!(
        a.header("x-intermission-mode"),
        Some("outage"),
        "{}",
        a.head
    );
    assert_eq!(
        client.get("/").await.status(),
        503,
        "the connection stays usable"
    );
}

#[tokio::test]
async fn an_answer_until_close_reaches_the_client_as_it_comes() {
    let up = scripted().await;
    let proxy = spawn_proxy(&config(&up, false)).await;
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("GET /trickle HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    // The first piece arrives while the server still holds the rest back.
    client.fill_until(b"first").await;
    assert!(
        client.buf.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&client.buf)
    );
    up.release.notify_one();
    let a = client.read().await;
    assert_eq!(a.body, b"firstsecond");
    assert_eq!(client.get("/length").await.body, b"hello");
}

/// `body` without the outage response's `since`, the second each proxy saw the failure in,
/// which two proxies asked one after the other may see in different seconds.
fn unstamped(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.remove("since");
            serde_json::to_vec(&fields).unwrap()
        }
        _ => body.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_says_of_each_request_what_hyper_s_path_says() {
    let up = scripted().await;
    let log = "[log]\nformat = \"json\"\naccess_log = true\n";
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let relay = ProxyProcess::start(a.path(), &format!("{}{log}", config(&up, false)));
    let hyper = ProxyProcess::start(b.path(), &format!("{}{log}", config(&up, true)));
    // `/garbage` fails: after the check at start, not as the first result, which decides.
    for dir in [a.path(), b.path()] {
        let socket = dir.join("intermission.sock");
        let checked = || async {
            let ask = intermission::control::protocol::Request::Health;
            let answer = intermission::control::client::request(&socket, &ask).await;
            answer.is_ok_and(|a| a.health.is_some_and(|h| h[0].healthy == Some(true)))
        };
        assert!(wait_until_async(checked).await, "the server is checked");
    }
    let mut fast = Client::connect(relay.addr).await;
    let mut slow = Client::connect(hyper.addr).await;
    let paths = [
        "/length?q=1",
        "/chunked",
        "/interim",
        "/empty",
        "/close",
        "/garbage",
    ];
    for path in paths {
        let (x, y) = (fast.get(path).await, slow.get(path).await);
        assert_eq!(unstamped(&x.body), unstamped(&y.body), "{path}");
    }
    let heads = ["/length?head", "/garbage?head"];
    for path in heads {
        assert_eq!(
            fast.head(path).await.status(),
            slow.head(path).await.status()
        );
    }
    let kept = fast.get("/length").await;
    assert!(
        kept.head.contains("\r\nX-Upstream-Case: Kept"),
        "not the relay: {}",
        kept.head
    );
    // An HTTP/2 request, whose URI carries the scheme and host, is logged by its path too.
    let h2 = h2c_client()
        .request(
            http::Request::get(format!("http://{}/length?h2", hyper.addr))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(h2.status(), 200);
    // Every line but its time, by path (one more on each: `kept`, and the HTTP/2 request).
    let lines = ProxyProcess::access_lines;
    let whole = |proxy: &ProxyProcess| lines(proxy).len() > paths.len() + heads.len();
    assert!(wait_until(Duration::from_secs(10), || whole(&relay) && whole(&hyper)).await);
    let (x, y) = (lines(&relay), lines(&hyper));
    for path in paths.into_iter().chain(heads) {
        let of = |l: &Vec<serde_json::Value>| l.iter().find(|v| v["path"] == path).cloned();
        let line = of(&x).unwrap_or_else(|| panic!("{path}: no line in {x:?}"));
        assert_eq!(Some(&line), of(&y).as_ref(), "{path}");
        assert_eq!(line["client"], "127.0.0.1", "{path}");
        assert_eq!(line["upstream"], format!("http://{}", up.addr), "{path}");
    }
    assert!(y.iter().any(|v| v["path"] == "/length?h2"), "{y:?}");
    let of = |path: &str| x.iter().find(|v| v["path"] == path).unwrap().clone();
    assert_eq!(of("/length?q=1")["bytes"], 5);
    assert_eq!(of("/chunked")["bytes"], 11);
    assert_eq!(of("/close")["bytes"], 13);
    assert_eq!(of("/empty")["status"], 204);
    assert_eq!(of("/garbage")["status"], 503);
    for path in heads {
        assert_eq!(of(path)["method"], "HEAD", "{path}");
        assert_eq!(of(path)["bytes"], 0, "{path}");
    }
    assert_eq!(of("/length?head")["status"], 200);
    assert_eq!(of("/garbage?head")["status"], 503);
}

/// Behind a load balancer in `trusted_proxies`, the access line's `client` is the visitor its
/// `X-Forwarded-For` or `Forwarded` names, read as `allow_ips` reads it (right to left past
/// trusted hops: never an entry a client wrote left of them), and the balancer follows as
/// `peer`: on the relay's path and hyper's (HTTP/1.1 with `TE`, and HTTP/2), for an answer,
/// for a request its client left (499) and for a held answer. Any other peer's lists are not
/// believed, and its line, as one whose client is the peer, has no `peer`.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_the_access_line_names_the_client_and_the_peer() {
    let up = scripted().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[proxy]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n{}\
         [log]\nformat = \"json\"\naccess_log = true\n",
        config(&up, false).replacen(
            "[upstream]\n",
            "[upstream]\nresponse_timeout = \"120s\"\n",
            1
        )
    );
    let proxy = ProxyProcess::start(dir.path(), &text);
    let socket = dir.path().join("intermission.sock");
    let checked = || async {
        let ask = intermission::control::protocol::Request::Health;
        let answer = intermission::control::client::request(&socket, &ask).await;
        answer.is_ok_and(|a| a.health.is_some_and(|h| h[0].healthy == Some(true)))
    };
    assert!(wait_until_async(checked).await, "the server is checked");
    let xff = "X-Forwarded-For: 203.0.113.7\r\n";
    let spoofed = "X-Forwarded-For: 198.51.100.66, 203.0.113.9\r\nX-Forwarded-For: 10.1.2.3\r\n";
    let forwarded = "Forwarded: for=198.51.100.66, for=\"[2001:db8::7]:443\";proto=https\r\n";
    let te = "TE: trailers\r\n";
    // (tag, from, lines, the line's client, its peer)
    let mut cases = Vec::new();
    for (via, extra) in [("relay", ""), ("hyper", te)] {
        let trusted = Some("127.0.0.1");
        cases.extend([
            (
                via.to_string(),
                "127.0.0.1",
                format!("{extra}{xff}"),
                "203.0.113.7",
                trusted,
            ),
            (
                format!("{via}-spoofed"),
                "127.0.0.1",
                format!("{extra}{spoofed}"),
                "203.0.113.9",
                trusted,
            ),
            (
                format!("{via}-forwarded"),
                "127.0.0.1",
                format!("{extra}{forwarded}"),
                "2001:db8::7",
                trusted,
            ),
            (
                format!("{via}-direct"),
                "127.0.0.1",
                extra.to_string(),
                "127.0.0.1",
                None,
            ),
            (
                format!("{via}-untrusted"),
                "127.0.0.2",
                format!("{extra}{xff}"),
                "127.0.0.2",
                None,
            ),
        ]);
    }
    for (tag, from, lines, _, _) in &cases {
        let mut client = Client::over(connect_from(from, proxy.addr).await);
        client
            .send(&format!(
                "GET /length?{tag} HTTP/1.1\r\nHost: shop.example\r\n{lines}\r\n"
            ))
            .await;
        let answer = client.read().await;
        assert_eq!(answer.status(), 200, "{tag}: {}", answer.head);
        assert_eq!(
            answer.relayed(),
            tag.starts_with("relay"),
            "{tag}: {}",
            answer.head
        );
    }
    let h2 = h2c_client()
        .request(
            http::Request::get(format!("http://{}/length?h2", proxy.addr))
                .header("x-forwarded-for", "203.0.113.7")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(h2.status(), 200);
    cases.push((
        "h2".into(),
        "127.0.0.1",
        String::new(),
        "203.0.113.7",
        Some("127.0.0.1"),
    ));
    // Requests their clients leave once the server has them.
    for (via, extra) in [("relay", ""), ("hyper", te)] {
        let tag = format!("{via}-left");
        let mut client = Client::over(connect_from("127.0.0.1", proxy.addr).await);
        client
            .send(&format!(
                "GET /hang?{tag} HTTP/1.1\r\nHost: shop.example\r\n{extra}{xff}\r\n"
            ))
            .await;
        let asked = || {
            let heads = up.heads.lock().unwrap();
            heads
                .iter()
                .any(|h| h.starts_with(&format!("GET /hang?{tag} ")))
        };
        assert!(wait_until(Duration::from_secs(10), asked).await, "{tag}");
        drop(client);
        cases.push((
            tag,
            "127.0.0.1",
            String::new(),
            "203.0.113.7",
            Some("127.0.0.1"),
        ));
    }
    // Held answers: written by the relay (`fast::held`), and by hyper for a request that asks
    // more of the connection than keep-alive (which its answer tells).
    assert!(proxy.ctl(&on(None)).await.unwrap().ok);
    for (tag, from, lines, client, peer) in [
        (
            "held",
            "127.0.0.1",
            spoofed.to_string(),
            "203.0.113.9",
            Some("127.0.0.1"),
        ),
        (
            "held-hyper",
            "127.0.0.1",
            format!("Connection: close\r\n{spoofed}"),
            "203.0.113.9",
            Some("127.0.0.1"),
        ),
        (
            "held-untrusted",
            "127.0.0.2",
            xff.to_string(),
            "127.0.0.2",
            None,
        ),
    ] {
        let mut sock = Client::over(connect_from(from, proxy.addr).await);
        sock.send(&format!(
            "GET /length?{tag} HTTP/1.1\r\nHost: shop.example\r\n{lines}\r\n"
        ))
        .await;
        let answer = sock.read().await;
        assert_eq!(answer.status(), 503, "{tag}: {}", answer.head);
        let closes = answer.header("connection") == Some("close");
        assert_eq!(closes, tag == "held-hyper", "{tag}: {}", answer.head);
        cases.push((tag.into(), from, lines, client, peer));
    }
    let lines = || proxy.access_lines();
    let path = |tag: &str| {
        let script = if tag.ends_with("-left") {
            "/hang"
        } else {
            "/length"
        };
        format!("{script}?{tag}")
    };
    let all = || {
        let got = lines();
        cases
            .iter()
            .all(|(tag, ..)| got.iter().any(|v| v["path"] == path(tag)))
    };
    assert!(
        wait_until(Duration::from_secs(10), all).await,
        "{:#?}",
        lines()
    );
    let got = lines();
    for (tag, _, _, client, peer) in &cases {
        let line = got.iter().find(|v| v["path"] == path(tag)).unwrap();
        assert_eq!(line["client"], *client, "{tag}: {line}");
        assert_eq!(
            line.get("peer").and_then(|p| p.as_str()),
            *peer,
            "{tag}: {line}"
        );
        let status = match tag.as_str() {
            t if t.ends_with("-left") => 499,
            t if t.starts_with("held") => 503,
            _ => 200,
        };
        assert_eq!(line["status"], status, "{tag}: {line}");
    }
}

#[tokio::test]
async fn a_request_whose_client_leaves_is_given_up_as_on_hyper_s_path() {
    let up = scripted().await;
    let long = "[upstream]\nresponse_timeout = \"120s\"\n";
    for hyper in [false, true] {
        let text = config(&up, hyper).replacen("[upstream]\n", long, 1);
        let proxy = spawn_proxy(&text).await;
        let before = up.hung_up.load(Ordering::SeqCst);
        let mut client = Client::connect(proxy.addr).await;
        client.get("/length").await;
        client
            .send("GET /hang HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await;
        let asked = || {
            up.heads
                .lock()
                .unwrap()
                .iter()
                .any(|h| h.starts_with("GET /hang "))
        };
        assert!(wait_until(Duration::from_secs(10), asked).await);
        drop(client);
        // The proxy closes its upstream connection instead of waiting out the timeout.
        assert!(up.closed_one_since(before).await, "hyper's path: {hyper}");
        up.heads.lock().unwrap().clear();
    }
}

#[tokio::test]
async fn each_request_on_a_connection_has_its_own_response_timeout() {
    let up = scripted().await;
    let short = "[upstream]\nresponse_timeout = \"300ms\"\n";
    let proxy = spawn_proxy(&config(&up, false).replacen("[upstream]\n", short, 1)).await;
    let mut client = Client::connect(proxy.addr).await;
    // Twice: the second time, the deadline has fired once already.
    for round in 0..2 {
        assert_eq!(client.get("/length").await.body, b"hello", "round {round}");
        // Well inside the previous request's deadline: this one's starts when it is sent.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = std::time::Instant::now();
        let a = client.get("/hang").await;
        assert!(
            sent.elapsed() >= Duration::from_millis(300),
            "round {round}: early"
        );
        assert_eq!(a.status(), 503, "round {round}: {}", a.head);
        assert_eq!(
            a.header("x-intermission-mode"),
            Some("outage"),
            "{}",
            a.head
        );
    }
    assert_eq!(client.get("/length").await.body, b"hello");
}

#[tokio::test]
async fn a_body_whose_client_leaves_is_given_up_as_on_hyper_s_path() {
    let up = scripted().await;
    for hyper in [false, true] {
        let proxy = spawn_proxy(&config(&up, hyper)).await;
        for path in ["/stall", "/stall-small"] {
            let before = up.hung_up.load(Ordering::SeqCst);
            let mut client = Client::connect(proxy.addr).await;
            client
                .send(&format!(
                    "GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n"
                ))
                .await;
            // The relay holds a small answer until it is whole: only the server can tell
            // that its first piece went out. The client may leave before the relay has read
            // it, too; either way, holding must not keep the request from being given up.
            match path {
                "/stall" => client.fill_until(b"first").await,
                _ => up.sent.notified().await,
            }
            drop(client);
            assert!(
                up.closed_one_since(before).await,
                "{path}, hyper's path: {hyper}"
            );
        }
    }
}

/// `upstream.read_timeout`, on both paths: a body that stalls longer is cut short (what came
/// of it written, then the client's connection and the server's closed), whatever its
/// framing; a body that keeps coming is not, however long it takes in all (longer than
/// `response_timeout` too), and a head is waited for `response_timeout`, not this.
#[tokio::test]
async fn a_body_that_stalls_past_read_timeout_is_cut_short_on_both_paths() {
    let up = scripted().await;
    for hyper in [false, true] {
        let config = config(&up, hyper).replace(
            "[health]",
            "read_timeout = \"1s\"\nresponse_timeout = \"2s\"\n[health]",
        );
        let proxy = spawn_proxy(&config).await;
        let mut client = Client::connect(proxy.addr).await;
        assert_eq!(
            client.get("/late").await.body,
            b"hello",
            "hyper's path: {hyper}"
        );
        let a = client.get("/drip").await;
        assert_eq!(a.body, vec![b'd'; 30000], "hyper's path: {hyper}");
        assert_eq!(
            client.get("/late").await.body,
            b"hello",
            "the connection goes on"
        );

        for path in ["/stall", "/stall-chunked", "/stall-close", "/stall-small"] {
            let before = up.hung_up.load(Ordering::SeqCst);
            let mut client = Client::connect(proxy.addr).await;
            client
                .send(&format!(
                    "GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n"
                ))
                .await;
            // A small answer is held for its body up to response_timeout, then written.
            client.fill_until(b"first").await;
            let got_first = std::time::Instant::now();
            let mut chunk = [0u8; 1024];
            let end = tokio::time::timeout(Duration::from_secs(15), async {
                loop {
                    match client.sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => client.buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            let waited = got_first.elapsed();
            assert!(end.is_ok(), "{path}, hyper's path {hyper}: never cut short");
            assert!(
                waited >= Duration::from_millis(900),
                "{path}, hyper's path {hyper}: cut after {waited:?}"
            );
            // Cut short, not ended as if whole: no last chunk for the chunked forms.
            assert!(
                !client.buf.ends_with(b"0\r\n\r\n"),
                "{path}, hyper's path {hyper}: {:?}",
                String::from_utf8_lossy(&client.buf)
            );
            assert!(
                up.closed_one_since(before).await,
                "{path}, hyper's path {hyper}: the server's connection was kept"
            );
        }
    }
}

/// A reload that sets `upstream.read_timeout` applies to the next answers, on both paths.
#[tokio::test]
async fn a_reload_sets_the_read_timeout_of_the_next_answers() {
    let up = scripted().await;
    for hyper in [false, true] {
        let proxy =
            spawn_proxy(&config(&up, hyper).replace("[health]", "read_timeout = \"1h\"\n[health]"))
                .await;
        let path = proxy.dir.path().join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace("read_timeout = \"1h\"", "read_timeout = \"1s\""),
        )
        .unwrap();
        let reloaded = ctl(&proxy, intermission::control::protocol::Request::Reload).await;
        assert!(reloaded.ok, "{reloaded:?}");
        let before = up.hung_up.load(Ordering::SeqCst);
        let mut client = Client::connect(proxy.addr).await;
        client
            .send("GET /stall HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await;
        client.fill_until(b"first").await;
        assert!(
            up.closed_one_since(before).await,
            "hyper's path {hyper}: the reloaded read_timeout was not used"
        );
    }
}

/// `GET /large` over HTTP/2 with prior knowledge, from a client that opens its flow-control
/// windows wide (so that only the sockets hold the answer back) and then reads nothing.
static H2C_LARGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let widest = 0x7fff_ffffu32;
    let mut settings = vec![0, 4]; // SETTINGS_INITIAL_WINDOW_SIZE
    settings.extend_from_slice(&widest.to_be_bytes());
    // HPACK: :method GET, :scheme http (static table), then :path and :authority as literals.
    let mut headers = vec![0x82, 0x86, 0x44, 6];
    headers.extend_from_slice(b"/large");
    headers.extend_from_slice(&[0x41, 12]);
    headers.extend_from_slice(b"shop.example");
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(4, 0, 0, &settings));
    bytes.extend(frame(8, 0, 0, &(widest - 65_535).to_be_bytes()));
    bytes.extend(frame(1, 0x5, 1, &headers)); // END_STREAM | END_HEADERS
    bytes
});

/// `proxy.send_timeout`, on the relay (plaintext and TLS), on hyper's path and over HTTP/2: a
/// client that takes nothing of a 16 MiB answer (more than the sockets between it and the proxy hold) is
/// let go, and so is the server's connection streaming to it; reading later, the client
/// finds the answer cut short, not whole.
#[tokio::test]
async fn a_client_that_reads_nothing_is_let_go_after_send_timeout() {
    let up = scripted().await;
    let tls = Tls::new();
    let timed = |hyper| format!("[proxy]\nsend_timeout = \"1s\"\n{}", config(&up, hyper));
    let cases = [
        ("relay", false, false, false),
        ("hyper", true, false, false),
        ("relay over TLS", false, true, false),
        ("HTTP/2", false, false, true),
    ];
    for (case, hyper, over_tls, h2c) in cases {
        let before = up.hung_up.load(Ordering::SeqCst);
        let (_proxy, mut client) = tls.maybe(&timed(hyper), over_tls).await;
        let asked = std::time::Instant::now();
        if h2c {
            client.sock.write_all(&H2C_LARGE).await.unwrap();
        } else {
            client
                .send("GET /large HTTP/1.1\r\nHost: shop.example\r\n\r\n")
                .await;
        }
        assert!(
            up.closed_one_since(before).await,
            "{case}: the server's connection is still held for a client that reads nothing"
        );
        assert!(
            asked.elapsed() >= Duration::from_millis(900),
            "{case}: let go after {:?}",
            asked.elapsed()
        );
        let mut got = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        let end = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match client.sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
        assert!(end.is_ok(), "{case}: the client's connection stays open");
        assert!(
            got < LARGE.len(),
            "{case}: the whole answer came ({got} bytes)"
        );
    }
}

/// `proxy.send_timeout` times a write that makes no progress, not the whole answer: a client
/// that reads 16 MiB slowly but steadily (about 4 MiB/s, so the proxy's writes wait several
/// times `send_timeout` in all) gets every byte, on the relay and on hyper's path, plaintext
/// and TLS, and its connection serves the next request.
#[tokio::test]
async fn a_slow_but_steady_reader_gets_the_whole_answer() {
    let up = scripted().await;
    let tls = Tls::new();
    let timed = |hyper| format!("[proxy]\nsend_timeout = \"1s\"\n{}", config(&up, hyper));
    let cases = [
        ("relay", false, false),
        ("hyper", true, false),
        ("relay over TLS", false, true),
        ("hyper over TLS", true, true),
    ];
    let mut runs = Vec::new();
    for (case, hyper, over_tls) in cases {
        let (proxy, client) = tls.maybe(&timed(hyper), over_tls).await;
        runs.push(tokio::spawn(async move {
            let _proxy = proxy;
            let mut client = client;
            let asked = std::time::Instant::now();
            client
                .send("GET /large HTTP/1.1\r\nHost: shop.example\r\n\r\n")
                .await;
            let mut chunk = vec![0u8; 32 * 1024];
            let whole = |buf: &[u8]| {
                buf.windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .is_some_and(|end| buf.len() >= end + 4 + LARGE_BODY)
            };
            while !whole(&client.buf) {
                let n = tokio::time::timeout(Duration::from_secs(10), client.sock.read(&mut chunk))
                    .await
                    .unwrap_or_else(|_| panic!("{case}: the answer stopped coming"))
                    .unwrap_or_else(|e| panic!("{case}: the answer was cut: {e}"));
                assert!(
                    n > 0,
                    "{case}: the proxy closed the connection after {} bytes",
                    client.buf.len()
                );
                client.buf.extend_from_slice(&chunk[..n]);
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            // The pace held the proxy's writes back longer than `send_timeout` in all: the
            // sockets between the two hold less than 10 MiB of the 16.
            assert!(
                asked.elapsed() >= Duration::from_secs(2),
                "{case}: read too fast to test anything ({:?})",
                asked.elapsed()
            );
            let a = client.read().await;
            assert!(
                a.body == LARGE[LARGE.len() - LARGE_BODY..],
                "{case}: the answer came altered"
            );
            assert_eq!(
                client.get("/length").await.body,
                b"hello",
                "{case}: the connection goes on"
            );
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
}

/// A client that stops reading a large answer for a while, and then reads on, gets it whole
/// through the relay, for each framing it copies: the part of a piece the client did not take
/// when the relay's write waited is kept (its grown buffers let go), and written when the
/// client reads again, before the next piece.
#[tokio::test]
async fn a_client_that_pauses_mid_answer_then_reads_on_gets_it_whole() {
    let up = scripted().await;
    let tls = Tls::new();
    for path in ["/large", "/large-chunked"] {
        let (_proxy, mut client) = tls.maybe(&config(&up, false), false).await;
        client
            .send(&format!(
                "GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n"
            ))
            .await;
        // Longer than the sockets between proxy and client take to fill (they hold less
        // than 10 MiB of the 16), so that the relay's write waits.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let a = tokio::time::timeout(Duration::from_secs(30), client.read())
            .await
            .unwrap_or_else(|_| panic!("{path}: the answer stopped coming"));
        assert!(
            a.body == LARGE[LARGE.len() - LARGE_BODY..],
            "{path}: the answer came altered ({} bytes)",
            a.body.len()
        );
        assert_eq!(
            client.get("/length").await.body,
            b"hello",
            "{path}: the connection goes on"
        );
    }
}

/// A reload that sets `proxy.send_timeout` applies to the next write that waits, on both
/// paths, on a connection opened before it.
#[tokio::test]
async fn a_reload_sets_the_send_timeout_of_connections_already_open() {
    let up = scripted().await;
    for hyper in [false, true] {
        let config = format!("[proxy]\nsend_timeout = \"1h\"\n{}", config(&up, hyper));
        let proxy = spawn_proxy(&config).await;
        let mut client = Client::connect(proxy.addr).await;
        assert_eq!(client.get("/length").await.body, b"hello");
        edit_config(&proxy, |text| text.replace("\"1h\"", "\"1s\""));
        let reloaded = ctl(&proxy, intermission::control::protocol::Request::Reload).await;
        assert!(reloaded.ok, "{reloaded:?}");
        let before = up.hung_up.load(Ordering::SeqCst);
        client
            .send("GET /large HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await;
        assert!(
            up.closed_one_since(before).await,
            "hyper's path {hyper}: the reloaded send_timeout was not used"
        );
    }
}

/// Nothing is written to `client` for `quiet` (the head has reached the proxy, the body not
/// yet); then, the body let go, head and body come in one write, so the first read has both.
async fn written_whole_after(client: &mut Client, up: &Scripted, quiet: Duration) {
    let mut chunk = [0u8; 1024];
    let early = tokio::time::timeout(quiet, client.sock.read(&mut chunk));
    if let Ok(read) = early.await {
        panic!(
            "the head was written before its body: {:?}",
            read.map(|n| String::from_utf8_lossy(&chunk[..n]).into_owned())
        );
    }
    up.release.notify_one();
    client.fill().await;
    assert!(
        client.buf.starts_with(b"HTTP/1.1 200 OK\r\n") && client.buf.ends_with(b"\r\n\r\nbody"),
        "{}",
        String::from_utf8_lossy(&client.buf)
    );
    let a = client.read().await;
    assert_eq!((a.status(), &a.body[..]), (200, &b"body"[..]));
    assert!(a.relayed(), "{}", a.head);
}

#[tokio::test]
async fn a_small_answer_whose_head_comes_alone_is_written_whole_at_once() {
    let up = scripted().await;
    let proxy = spawn_proxy(&config(&up, false)).await;
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("GET /split HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    up.sent.notified().await;
    // The head has reached the proxy, the body not yet: nothing is written meanwhile.
    written_whole_after(&mut client, &up, Duration::from_millis(500)).await;
    assert_eq!(
        client.get("/length").await.body,
        b"hello",
        "the connection goes on"
    );
}

#[tokio::test]
async fn a_small_answer_is_held_no_longer_than_its_response_timeout() {
    let up = scripted().await;
    let config = config(&up, false).replace("[health]", "response_timeout = \"1s\"\n[health]");
    let proxy = spawn_proxy(&config).await;
    let mut client = Client::connect(proxy.addr).await;
    let sent = std::time::Instant::now();
    client
        .send("GET /split HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    // The body never comes on its own: at the deadline the head is written alone.
    let a = client.read_head().await;
    let held = sent.elapsed();
    assert!(a.relayed() && a.status() == 200, "{}", a.head);
    assert!(held >= Duration::from_millis(900), "held only {held:?}");
    up.release.notify_one();
    while client.buf.len() < 4 {
        client.fill().await;
    }
    assert_eq!(client.buf, b"body", "the body follows as it comes");
    client.buf.clear();
    assert_eq!(
        client.get("/length").await.body,
        b"hello",
        "the connection goes on"
    );
}

/// A request still waiting at the first look (`state::marks::FIRST_LOOK`, 1 s) starts
/// watching its server's health; a small answer whose body comes after that is still held
/// whole, up to `response_timeout`, not written in two from then on.
#[tokio::test]
async fn a_small_answer_is_held_whole_past_the_first_look() {
    let up = scripted().await;
    let config = config(&up, false).replace("[health]", "response_timeout = \"1h\"\n[health]");
    let proxy = spawn_proxy(&config).await;
    let mut client = Client::connect(proxy.addr).await;
    client
        .send("GET /split HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    up.sent.notified().await;
    written_whole_after(&mut client, &up, Duration::from_millis(1500)).await;
}

#[tokio::test]
async fn pipelined_requests_then_a_half_close_get_the_first_answer_as_on_hyper_s_path() {
    let up = scripted().await;
    for hyper in [false, true] {
        let proxy = spawn_proxy(&config(&up, hyper)).await;
        let mut client = Client::connect(proxy.addr).await;
        let one = "GET /length HTTP/1.1\r\nHost: shop.example\r\n\r\n";
        client.send(&format!("{one}{one}")).await;
        client.sock.shutdown().await.unwrap();
        // The second request is read with the first: the client's end is not watched for it.
        let a = client.read().await;
        assert_eq!(a.body, b"hello", "hyper's path: {hyper}: {}", a.head);
    }
}

/// Over TLS, HTTP/1.1 requests are relayed too, and reach client and server as hyper's path
/// forwards them, `X-Forwarded-Proto: https` included; a request the relay leaves to hyper
/// hands the connection to hyper, which serves it from there on.
#[tokio::test]
async fn over_tls_requests_are_relayed_as_hyper_s_path_forwards_them() {
    let up = scripted().await;
    let tls = Tls::new();
    let (mut fast, mut slow, _proxies) = both_over_tls(&up, &tls).await;
    assert_same_answers(&mut fast, &mut slow, &FRAMINGS).await;
    let a = fast.get("/length").await;
    assert!(a.relayed(), "not relayed: {}", a.head);
    let b = slow.get("/length").await;
    assert!(b.head.contains("\r\nx-upstream-case: Kept"), "{}", b.head);
    // A body that fills the sockets while the client does not read (nothing to wait for
    // but time): every record the proxy sealed is sent once the client reads again.
    fast.send("GET /large HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = fast.read().await;
    assert!(
        a.body == LARGE[LARGE.len() - LARGE_BODY..],
        "a large body came altered"
    );

    // A JSON call, then three requests in one write.
    up.heads.lock().unwrap().clear();
    let post = "POST /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Type: application/json\r\n\
                Content-Length: 13\r\n\r\n{\"order\": 42}";
    fast.send(post).await;
    slow.send(post).await;
    let (a, b) = (fast.read().await, slow.read().await);
    assert_eq!(a.body, b"POST {\"order\": 42}");
    assert_eq!((lines(&a), &a.body), (lines(&b), &b.body));
    assert!(a.relayed(), "not relayed: {}", a.head);
    let host = "Host: shop.example\r\n";
    fast.send(&format!(
        "GET /length HTTP/1.1\r\n{host}\r\nGET /chunked HTTP/1.1\r\n{host}\r\nHEAD /length HTTP/1.1\r\n{host}\r\n"
    ))
    .await;
    assert_eq!(fast.read().await.body, b"hello");
    assert_eq!(fast.read().await.body, b"hello world");
    assert_eq!(fast.read_head().await.header("content-length"), Some("5"));
    let heads = up.heads.lock().unwrap().clone();
    let sent: Vec<&String> = heads.iter().filter(|h| h.contains("/echo ")).collect();
    assert_eq!(sent.len(), 2, "{heads:?}");
    let lower = |h: &str| {
        let mut lines: Vec<String> = h.lines().map(str::to_ascii_lowercase).collect();
        lines.sort();
        lines
    };
    assert_eq!(lower(sent[0]), lower(sent[1]));
    assert!(
        lower(sent[0]).contains(&"x-forwarded-proto: https".to_owned()),
        "{}",
        sent[0]
    );

    // A body larger than the relay takes is hyper's; the connection stays with hyper.
    let large = "x".repeat(10_000);
    fast.send(&format!(
        "PUT /echo HTTP/1.1\r\n{host}Content-Length: {}\r\n\r\n{large}",
        large.len()
    ))
    .await;
    let a = fast.read().await;
    assert_eq!(a.body, format!("PUT {large}").as_bytes());
    assert!(a.head.contains("\r\nx-upstream-case: Kept"), "{}", a.head);
    let a = fast.get("/length").await;
    assert_eq!(a.body, b"hello");
    assert!(a.head.contains("\r\nx-upstream-case: Kept"), "{}", a.head);
}

/// A relayed TLS connection that idles is closed `header_read_timeout` after its last answer,
/// as hyper closes one, and at once by a drain, which does not wait for it.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_tls_connection_closes_after_header_read_timeout_and_at_a_drain() {
    let up = scripted().await;
    let tls = Tls::new();
    let timeout = format!(
        "[proxy]\nheader_read_timeout = \"400ms\"\n{}",
        config(&up, false)
    );
    let proxy = tls.proxy(&timeout).await;
    let mut client = Client::connect_tls(tls_addr(&proxy), &tls).await;
    let a = client.get("/length").await;
    assert!(a.relayed(), "not relayed: {}", a.head);
    let closed = client.closed_within(Duration::from_secs(5)).await;
    let closed = closed.expect("an idle connection was kept past header_read_timeout");
    assert!(
        closed >= Duration::from_millis(350),
        "closed after {closed:?}"
    );

    let long = format!(
        "[proxy]\nheader_read_timeout = \"60s\"\nshutdown_timeout = \"30s\"\n{}",
        config(&up, false)
    );
    let mut proxy = tls.proxy(&long).await;
    let mut client = Client::connect_tls(tls_addr(&proxy), &tls).await;
    let a = client.get("/length").await;
    assert!(a.relayed(), "not relayed: {}", a.head);
    let drained = tokio::time::timeout(
        Duration::from_secs(10),
        proxy.running.take().unwrap().shutdown(),
    )
    .await
    .expect("the drain waited for an idle TLS connection");
    assert!(drained, "the drain reported connections cut");
    let closed = client.closed_within(Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "the connection stayed open after the drain"
    );
}

/// Over TLS, the client's end is read from the session, as hyper reads it: a request whose
/// client leaves, with `close_notify` or without, is given up; requests pipelined in records
/// of their own, then the client's half-close, get the first answer, as on plaintext.
#[tokio::test]
async fn over_tls_the_client_s_end_is_seen_as_on_hyper_s_path() {
    let up = scripted().await;
    let tls = Tls::new();
    let long = "[upstream]\nresponse_timeout = \"120s\"\n";
    for hyper in [false, true] {
        let proxy = tls
            .proxy(&config(&up, hyper).replacen("[upstream]\n", long, 1))
            .await;
        for notify in [true, false] {
            let case = format!("hyper's path: {hyper}, close_notify: {notify}");
            let before = up.hung_up.load(Ordering::SeqCst);
            let mut stream = tls_stream(tls_addr(&proxy), &tls).await;
            stream
                .write_all(b"GET /hang HTTP/1.1\r\nHost: shop.example\r\n\r\n")
                .await
                .unwrap();
            stream.flush().await.unwrap();
            let asked = || {
                let heads = up.heads.lock().unwrap();
                heads.iter().any(|h| h.starts_with("GET /hang "))
            };
            assert!(wait_until(Duration::from_secs(10), asked).await, "{case}");
            if notify {
                stream.shutdown().await.unwrap();
            } else {
                stream.get_mut().0.shutdown().await.unwrap();
            }
            // The proxy closes its upstream connection instead of waiting out the timeout.
            assert!(up.closed_one_since(before).await, "{case}");
            up.heads.lock().unwrap().clear();
        }

        let mut stream = tls_stream(tls_addr(&proxy), &tls).await;
        for path in ["/length", "/chunked"] {
            let one = format!("GET {path} HTTP/1.1\r\nHost: shop.example\r\n\r\n");
            stream.write_all(one.as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
        }
        stream.get_mut().0.shutdown().await.unwrap();
        let mut client = Client::over(stream);
        assert_eq!(client.read().await.body, b"hello", "hyper's path: {hyper}");
    }
}

/// `redirect_https` concerns plaintext: there hyper answers with the redirect, and over TLS the
/// relay still forwards.
#[tokio::test]
async fn with_redirect_https_tls_is_relayed_and_plaintext_redirected() {
    let up = scripted().await;
    let tls = Tls::new();
    let proxy = tls
        .proxy(&format!(
            "[proxy]\nredirect_https = true\n{}",
            config(&up, false)
        ))
        .await;
    let mut secure = Client::connect_tls(tls_addr(&proxy), &tls).await;
    let a = secure.get("/length").await;
    assert_eq!(a.body, b"hello");
    assert!(a.relayed(), "not relayed: {}", a.head);
    let mut plain = Client::connect(proxy.addr).await;
    plain
        .send("GET /length HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    let a = plain.read_head().await;
    assert_eq!(a.status(), 308, "{}", a.head);
    assert!(a
        .header("location")
        .unwrap()
        .starts_with("https://shop.example"));
}

/// A plain held request on a relayed connection is answered as hyper's path answers it, and
/// the connection stays with the relay: over TLS, where nothing parks, it forwards without
/// hyper again once the hold ends.
#[tokio::test]
async fn over_tls_a_held_request_is_answered_and_the_connection_relays_after_the_hold() {
    use intermission::control::protocol::Request as Ctl;
    let up = scripted().await;
    let tls = Tls::new();
    let (mut fast, mut slow, proxies) = both_over_tls(&up, &tls).await;
    let a = fast.get("/length").await;
    assert!(a.relayed(), "not relayed: {}", a.head);
    let on = || Ctl::On {
        message: Some("Back soon".to_owned()),
        until: None,
        retry_after: None,
        reason: None,
    };
    for proxy in [&proxies.0, &proxies.1] {
        assert!(ctl(proxy, on()).await.ok);
    }
    let host = "Host: shop.example\r\n";
    for accept in ["text/html", "application/json", "*/*"] {
        let request = format!("GET /length HTTP/1.1\r\n{host}Accept: {accept}\r\n\r\n");
        fast.send(&request).await;
        slow.send(&request).await;
        let (a, b) = (fast.read().await, slow.read().await);
        assert_eq!(a.status(), 503, "{accept}: {}", a.head);
        assert_eq!((lines(&a), &a.body), (lines(&b), &b.body), "{accept}");
    }
    let request = format!("HEAD /length HTTP/1.1\r\n{host}Accept: text/html\r\n\r\n");
    fast.send(&request).await;
    slow.send(&request).await;
    let (a, b) = (fast.read_head().await, slow.read_head().await);
    assert_eq!((a.status(), lines(&a)), (b.status(), lines(&b)));
    // A head in two records, the second after a pause (nothing to wait for but time): the
    // relay waits for its rest as for a request to forward, and answers it.
    fast.send(&format!("GET /length HTTP/1.1\r\n{host}")).await;
    fast.sock.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    fast.send("Accept: text/html\r\n\r\n").await;
    assert_eq!(fast.read().await.status(), 503);
    for proxy in [&proxies.0, &proxies.1] {
        assert!(ctl(proxy, Ctl::Off).await.ok);
    }
    let a = fast.get("/length").await;
    assert_eq!(a.body, b"hello");
    assert!(a.relayed(), "left to hyper: {}", a.head);
}

/// An answer cut short ends a TLS connection without `close_notify`, as hyper's path ends it:
/// the client is not told that all was sent.
#[tokio::test]
async fn over_tls_an_answer_cut_short_ends_without_close_notify() {
    let up = scripted().await;
    let tls = Tls::new();
    for hyper in [false, true] {
        let proxy = tls.proxy(&config(&up, hyper)).await;
        let mut stream = tls_stream(tls_addr(&proxy), &tls).await;
        stream
            .write_all(b"GET /cut HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk));
            match read.await.expect("the connection ended within 10 s") {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => break Err(e),
            }
        };
        assert!(got.ends_with(b"first"), "hyper's path: {hyper}: {got:?}");
        let err = end.expect_err("a close_notify after a cut answer");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "hyper's path: {hyper}"
        );
    }
}

/// An `https://` server offering HTTP/1.1 by ALPN, on raw TLS sessions, answering each request
/// `ok` with a header whose name's case the relay keeps. By path, after the answer: `/notify`
/// ends the session with `close_notify`, `/fin` with a bare TCP close, `/key-update` sends a
/// `KeyUpdate` (a record with no data, as a session ticket is) and goes on. The first
/// `/vanish` and `/vanish-fin` are read and their session ended unanswered (with
/// `close_notify`, or without), as keep-alive's race ends one as a request arrives.
struct TlsUp {
    addr: SocketAddr,
    /// Each request's path, with the number of the session it came on.
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    /// Sessions the server ended.
    ended: Arc<AtomicUsize>,
}

impl TlsUp {
    fn seen(&self, path: &str) -> Vec<usize> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(_, p)| p == path)
            .map(|(s, _)| *s)
            .collect()
    }
}

async fn tls_up(tls: &Tls) -> TlsUp {
    tls_up_on(tls, TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// `tls_up` on `listener`.
fn tls_up_on(tls: &Tls, listener: TcpListener) -> TlsUp {
    let acceptor = tls.acceptor(&[b"http/1.1"]);
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(AtomicUsize::new(0));
    let vanished = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let (seen_by, ended_by) = (seen.clone(), ended.clone());
    tokio::spawn(async move {
        let mut sessions = 0;
        while let Ok((sock, _)) = listener.accept().await {
            sessions += 1;
            let session = sessions;
            let (acceptor, seen, ended) = (acceptor.clone(), seen_by.clone(), ended_by.clone());
            let vanished = vanished.clone();
            tokio::spawn(async move {
                // A health check over TCP ends in the handshake.
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let faulty = Faulty::new(tls);
                let mut sock = faulty.clone();
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if !support::fuzz::read_more(&mut sock, &mut buf).await {
                            return;
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    seen.lock().unwrap().push((session, path.clone()));
                    let fault = match path.as_str() {
                        "/vanish" => Some(Fault::CloseNotify),
                        "/vanish-fin" => Some(Fault::Drop),
                        _ => None,
                    };
                    if let Some(fault) = fault {
                        if vanished.lock().unwrap().insert(path.clone()) {
                            faulty.commit(fault).await;
                            ended.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    let answer =
                        b"HTTP/1.1 200 OK\r\nX-Upstream-Case: Kept\r\nContent-Length: 2\r\n\r\nok";
                    if sock.write_all(answer).await.is_err() || sock.flush().await.is_err() {
                        return;
                    }
                    let fault = match path.as_str() {
                        "/notify" => Fault::CloseNotify,
                        "/fin" => Fault::Drop,
                        "/key-update" => Fault::KeyUpdates(1),
                        _ => continue,
                    };
                    let went_on = faulty.commit(fault).await;
                    if fault != Fault::KeyUpdates(1) || !went_on {
                        ended.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    TlsUp { addr, seen, ended }
}

/// A proxy of the `https://` server `up`, trusting `tls`, with one worker (so that requests
/// share its kept sessions) and an `idle_timeout` whose sweep looks at them every second.
async fn tls_up_proxy(tls: &Tls, up: &TlsUp) -> Proxy {
    tls.trusting(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"https://{}\"]\nidle_timeout = \"4s\"\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n",
        up.addr
    ))
    .await
}

/// One of two `https://` servers down as the proxy starts does not keep the relay off: the
/// requests go to the other on one kept session, the failed dial that asked the down one its
/// protocol is counted against it as any failed connect, and once it is up it is asked again
/// and relayed to as well.
#[tokio::test]
async fn an_https_server_down_at_start_leaves_the_relay_the_other_and_is_learned_once_up() {
    let tls = Tls::new();
    let up = tls_up(&tls).await;
    let down = refusing();
    let proxy = tls
        .trusting(&format!(
            "[proxy]\nthreads = 1\n[upstream]\nservers = [\"https://{}\", \"https://{}\"]\n\
             idle_timeout = \"10s\"\n[health]\nkind = \"tcp\"\ninterval = \"200ms\"\n\
             down_interval = \"100ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            up.addr, down.addr
        ))
        .await;
    // Taken out by its first check before any request: hyper's path sends it none.
    let healthy = format!(
        "intermission_upstream_healthy{{server=\"https://{}\"}}",
        down.addr
    );
    assert_eq!(series_reaches(&proxy, &healthy, 0.0).await, Some(0.0));
    let failed = format!(
        "intermission_upstream_failures_total{{server=\"https://{}\",reason=\"connect\"}}",
        down.addr
    );
    assert_eq!(series(&proxy, &failed).await, Some(0.0));
    let mut client = Client::connect(proxy.addr).await;
    let first = client.get("/").await;
    assert_eq!(
        series(&proxy, &failed).await,
        Some(1.0),
        "the dial that asked its protocol failed, and counts"
    );
    assert!(first.relayed() && first.body == b"ok", "{}", first.head);
    for i in 1..4 {
        let a = client.get("/").await;
        assert!(a.relayed() && a.body == b"ok", "request {i}: {}", a.head);
    }
    let mut other = Client::connect(proxy.addr).await;
    assert!(other.get("/").await.relayed(), "another client's");
    let sessions = up.seen("/");
    assert_eq!(sessions.len(), 5);
    assert!(
        sessions.iter().all(|&s| s == sessions[0]),
        "one session kept for all: {sessions:?}"
    );
    assert_eq!(
        series(&proxy, &failed).await,
        Some(1.0),
        "asked once while it was down"
    );
    let back = tls_up_on(&tls, down.listen());
    assert_eq!(series_reaches(&proxy, &healthy, 1.0).await, Some(1.0));
    // Asked again a second after its failed dial, in the background.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while back.seen("/").is_empty() && std::time::Instant::now() < end {
        let a = client.get("/").await;
        assert!(a.relayed() && a.body == b"ok", "{}", a.head);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !back.seen("/").is_empty(),
        "the server back up was relayed to"
    );
    for i in 0..4 {
        let a = client.get("/").await;
        assert!(
            a.relayed() && a.body == b"ok",
            "request {i} once both are known: {}",
            a.head
        );
    }
    assert!(back.seen("/").len() >= 2, "round-robin between both");
}

/// Requests to an `https://` server that speaks HTTP/1.1 are relayed, the first one too (the
/// relay learns the server's protocol before it), over one kept TLS session, and reach it as
/// they would over `http://`.
#[tokio::test]
async fn requests_to_an_https_http1_server_are_relayed_on_a_kept_session() {
    let tls = Tls::new();
    let up = tls_up(&tls).await;
    let proxy = tls_up_proxy(&tls, &up).await;
    let mut client = Client::connect(proxy.addr).await;
    for i in 0..3 {
        let a = client.get("/").await;
        assert!(a.relayed() && a.body == b"ok", "request {i}: {}", a.head);
    }
    let post = "POST /post HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\n\r\nhello";
    client.send(post).await;
    let a = client.read().await;
    assert!(a.relayed() && a.body == b"ok", "{}", a.head);
    let mut other = Client::connect(proxy.addr).await;
    assert!(other.get("/").await.relayed());
    let sessions = up.seen("/");
    assert_eq!(sessions.len(), 4);
    assert!(
        sessions
            .iter()
            .chain(&up.seen("/post"))
            .all(|&s| s == sessions[0]),
        "one session kept for all: {sessions:?}"
    );
}

/// A kept TLS session its server ended while it idled, with `close_notify` or a bare close,
/// is not used for the next request, which is served on a new one, sent once; one that got a
/// record with no data (a `KeyUpdate`, as a session ticket) while it idled is still used.
#[tokio::test]
async fn a_kept_tls_session_is_let_go_when_its_server_ends_it_and_kept_for_other_records() {
    let tls = Tls::new();
    let up = tls_up(&tls).await;
    let proxy = tls_up_proxy(&tls, &up).await;
    let mut client = Client::connect(proxy.addr).await;
    for path in ["/notify", "/fin"] {
        let ended = up.ended.load(Ordering::SeqCst);
        let before = up.seen("/").len();
        let a = client.get(path).await;
        assert!(a.relayed() && a.status() == 200, "{path}: {}", a.head);
        let closed = wait_until(Duration::from_secs(5), || {
            up.ended.load(Ordering::SeqCst) > ended
        })
        .await;
        assert!(closed, "{path}: the server ended its session");
        let a = client.get("/").await;
        assert!(a.relayed() && a.body == b"ok", "after {path}: {}", a.head);
        let seen = up.seen("/");
        assert_eq!(seen.len(), before + 1, "after {path}: sent once");
        let ended_on = up.seen(path)[0];
        assert_ne!(seen[before], ended_on, "after {path}: on a new session");
    }
    let a = client.get("/key-update").await;
    assert!(a.relayed() && a.status() == 200, "{}", a.head);
    // Nothing tells when the record has reached the proxy: long enough for it to, and for
    // the sweep of idle sessions (every second) to have looked at the session.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let a = client.get("/").await;
    assert!(
        a.relayed() && a.body == b"ok",
        "after a KeyUpdate: {}",
        a.head
    );
    let on = up.seen("/key-update")[0];
    assert_eq!(up.seen("/").last(), Some(&on), "the session was kept");
}

/// A kept TLS session its server ends as the next request arrives, unanswered (with
/// `close_notify` or without), costs that request a second try on a new session, as over
/// `http://`, and its client gets the answer, not the outage response.
#[tokio::test]
async fn a_request_on_a_kept_tls_session_the_server_ends_is_sent_again_once() {
    let tls = Tls::new();
    let up = tls_up(&tls).await;
    let proxy = tls_up_proxy(&tls, &up).await;
    let mut client = Client::connect(proxy.addr).await;
    for path in ["/vanish", "/vanish-fin"] {
        let a = client.get("/").await;
        assert!(a.relayed(), "{}", a.head);
        let kept = *up.seen("/").last().unwrap();
        let a = client.get(path).await;
        assert!(a.relayed() && a.body == b"ok", "{path}: {}", a.head);
        let sessions = up.seen(path);
        assert_eq!(sessions.len(), 2, "{path}: sent twice: {sessions:?}");
        assert_eq!(sessions[0], kept, "{path}: first on the kept session");
        assert_ne!(sessions[1], kept, "{path}: then on a new one");
    }
}

/// An HTTP/2 client's request to an `http://` server goes on the relay's kept sockets, not
/// through hyper's HTTP/1.1 client: on the very socket an HTTP/1.1 client's relayed request
/// left kept (hyper's pool has sockets of its own), written as hyper's client writes it
/// (lowercase names, in order: `relay::upstream`'s unit tests compare the bytes), and every
/// way the server frames its answer reaches the HTTP/2 client as hyper's client reads it.
#[tokio::test]
async fn an_http2_client_s_requests_go_on_the_relay_s_kept_sockets() {
    let up = scripted().await;
    // One worker: kept sockets are each worker's, and the two clients' connections would
    // otherwise go to two of them.
    let proxy = spawn_proxy(&format!("[proxy]\nthreads = 1\n{}", config(&up, false))).await;
    wait_checked(&proxy).await;
    let mut client = Client::connect(proxy.addr).await;
    assert_eq!(client.get("/length").await.status(), 200);
    let h2 = h2c_client();
    let send = |method: http::Method, path: &'static str, body: &'static str| {
        h2_ask(
            &h2,
            proxy.addr,
            method,
            path,
            &[("x-client-case", "Kept")],
            body,
        )
    };
    let get = |path: &'static str| send(http::Method::GET, path, "");
    let (parts, _, body) = get("/length").await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"hello"[..]));
    assert_eq!(parts.headers["x-upstream-case"], "Kept");
    let (parts, trailers, body) = get("/chunked").await;
    assert_eq!(
        (parts.status.as_u16(), &body[..]),
        (200, &b"hello world"[..])
    );
    assert_eq!(trailers.unwrap()["x-sum"], "11");
    assert!(!parts.headers.contains_key("transfer-encoding"));
    let (parts, _, body) = get("/interim").await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
    let (parts, _, body) = get("/empty").await;
    assert_eq!((parts.status.as_u16(), &body[..]), (204, &b""[..]));
    assert_eq!(parts.headers["x-why"], "nothing");
    let (parts, _, _) = get("/not-modified").await;
    assert_eq!(parts.status.as_u16(), 304);
    assert_eq!(parts.headers["etag"], "\"v1\"");
    let (parts, _, body) = get("/hop").await;
    assert_eq!(&body[..], b"ok");
    assert_eq!(parts.headers["x-kept"], "yes");
    assert!(!parts.headers.contains_key("x-secret"), "{parts:?}");
    assert!(!parts.headers.contains_key("keep-alive"), "{parts:?}");
    let (parts, _, body) = get("/both").await;
    assert_eq!(&body[..], b"hello");
    assert!(!parts.headers.contains_key("content-length"), "{parts:?}");
    let (parts, _, body) = get("/same-lengths").await;
    assert_eq!(&body[..], b"ok");
    assert_eq!(parts.headers["content-length"], "2");
    // A `PUT` with a small body is held whole (to be sent again), and goes the same way.
    let (_, _, body) = send(http::Method::PUT, "/echo", "abc").await;
    assert_eq!(&body[..], b"PUT abc");
    {
        let heads = up.heads.lock().unwrap();
        let conns = up.conns.lock().unwrap();
        assert_eq!(heads.len(), 10, "{heads:?}");
        // The HTTP/1.1 client's socket, kept, carried every HTTP/2 request after it.
        assert!(conns.iter().all(|&c| c == conns[0]), "{conns:?}\n{heads:?}");
        // As hyper's client writes it: names lowercase, in the map's order.
        let expected = format!(
            "GET /length HTTP/1.1\r\nx-client-case: Kept\r\nhost: {0}\r\n\
             x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: {0}\r\nx-real-ip: 127.0.0.1",
            proxy.addr
        );
        assert_eq!(heads[1], expected);
        assert!(heads[9]
            .starts_with("PUT /echo HTTP/1.1\r\nx-client-case: Kept\r\ncontent-length: 3\r\n"));
    }
    // Bodies that stream: until the close (a new socket after it), as HTTP/1.0, and large.
    let (_, _, body) = get("/close").await;
    assert_eq!(&body[..], b"until the end");
    let (parts, _, body) = get("/old").await;
    assert_eq!(
        (parts.status.as_u16(), &body[..]),
        (200, &b"as in 1996"[..])
    );
    for path in ["/large", "/large-chunked"] {
        let (_, _, body) = get(path).await;
        assert_eq!(body.len(), LARGE_BODY, "{path}");
        assert_eq!(&body[..], &LARGE[LARGE.len() - LARGE_BODY..], "{path}");
    }
    // A broken answer is the outage response; a cut body breaks the stream off.
    let (parts, _, _) = get("/garbage").await;
    assert_eq!(parts.status.as_u16(), 503, "{parts:?}");
    assert_eq!(parts.headers["x-intermission-mode"], "outage");
}

/// An HTTP/2 client's fields reach an `http://` server as hyper's HTTP/1.1 client wrote the
/// map `forward` rewrote, byte for byte, both when the relay writes them straight from the
/// fields (cookie crumbs joined where the first stood, a list appended to where it stood, a
/// replaced `X-Forwarded-Proto` where it stood, the rest added after) and when a field taken
/// out sends them through the map (`TE: trailers` and an untrusted peer's `Forwarded`: the
/// map moves its last field into the place of each, and `TE: trailers` is put back last).
#[tokio::test]
async fn an_http2_client_s_fields_reach_the_server_as_the_rewritten_map_s() {
    let up = scripted().await;
    let proxy = spawn_proxy(&format!("[proxy]\nthreads = 1\n{}", config(&up, false))).await;
    wait_checked(&proxy).await;
    let h2 = h2c_client();
    let straight = [
        ("cookie", "a=1"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("cookie", "b=2"),
        ("accept", "*/*"),
    ];
    let mapped = [
        ("te", "trailers"),
        ("forwarded", "for=203.0.113.9"),
        ("x-one", "1"),
        ("x-two", "2"),
        ("accept", "*/*"),
    ];
    up.heads.lock().unwrap().clear();
    for fields in [&straight[..], &mapped[..]] {
        let (parts, _, _) = h2_ask(
            &h2,
            proxy.addr,
            http::Method::GET,
            "/length?q=1",
            fields,
            "",
        )
        .await;
        assert_eq!(parts.status.as_u16(), 200);
    }
    let heads = up.heads.lock().unwrap().clone();
    let host = proxy.addr;
    let forwarded = "x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http";
    assert_eq!(
        heads,
        [
            format!(
                "GET /length?q=1 HTTP/1.1\r\ncookie: a=1; b=2\r\n\
                 x-forwarded-for: 203.0.113.9, 127.0.0.1\r\nx-forwarded-proto: http\r\n\
                 accept: */*\r\nhost: {host}\r\nx-forwarded-host: {host}\r\n\
                 x-real-ip: 127.0.0.1"
            ),
            format!(
                "GET /length?q=1 HTTP/1.1\r\nhost: {host}\r\nte: trailers\r\nx-one: 1\r\n\
                 x-two: 2\r\naccept: */*\r\n{forwarded}\r\nx-forwarded-host: {host}\r\n\
                 x-real-ip: 127.0.0.1"
            ),
        ]
    );
}

/// An HTTP/2 client's request that gives its length twice, the same (h2 resets one whose
/// lengths differ), reaches an `http://` server with one `Content-Length` line, as hyper's
/// HTTP/1.1 server keeps one (RFC 9110 §8.6): on the relay's sockets (no body; a body held
/// whole) and through hyper's client (a streamed upload). Two lines went on.
#[tokio::test]
async fn an_http2_client_s_length_given_twice_reaches_the_server_once() {
    let up = scripted().await;
    let proxy = spawn_proxy(&format!("[proxy]\nthreads = 1\n{}", config(&up, false))).await;
    wait_checked(&proxy).await;
    let h2 = h2c_client();
    up.heads.lock().unwrap().clear();
    let twice = |n: &'static str| [("content-length", n), ("content-length", n)];
    for (method, body) in [
        (http::Method::GET, ""),
        (http::Method::PUT, "abc"),
        (http::Method::POST, "abc"),
    ] {
        let length: &'static str = if body.is_empty() { "0" } else { "3" };
        let (parts, _, got) = h2_send(
            &h2,
            proxy.addr,
            method.clone(),
            "/echo",
            &twice(length),
            body,
        )
        .await;
        assert_eq!(parts.status.as_u16(), 200, "{method}");
        let got = String::from_utf8_lossy(&got).into_owned();
        if !body.is_empty() {
            assert_eq!(got, format!("{method} {body}"), "{method}");
        }
    }
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 3, "{heads:#?}");
    for head in &heads {
        let lengths = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .count();
        assert_eq!(lengths, 1, "{head}");
    }
}

/// `h2_ask`'s request with its fields as given, no length added.
async fn h2_send(
    h2: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        TestBody,
    >,
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> (http::response::Parts, Option<http::HeaderMap>, bytes::Bytes) {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        h2.request(req.body(full(body)).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .unwrap()
        .unwrap();
    (parts, body.trailers().cloned(), body.to_bytes())
}

/// An HTTP/2 client's requests to an `https://` server known to choose HTTP/1.1 go on the
/// relay's kept TLS sessions too: the one an HTTP/1.1 client's relayed request left kept, and,
/// when the server ends it unanswered as a `GET` arrives, a new one, the `GET` sent again.
#[tokio::test]
async fn an_http2_client_s_requests_to_an_https_http1_server_go_on_kept_sessions() {
    use http_body_util::BodyExt;
    let tls = Tls::new();
    let up = tls_up(&tls).await;
    let proxy = tls_up_proxy(&tls, &up).await;
    let mut client = Client::connect(proxy.addr).await;
    assert!(client.get("/").await.relayed());
    let h2 = h2c_client();
    for path in ["/", "/", "/vanish", "/"] {
        let req = http::Request::get(format!("http://{}{path}", proxy.addr))
            .body(empty())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), h2.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["x-upstream-case"], "Kept", "{path}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok", "{path}");
    }
    let sessions = up.seen("/");
    assert_eq!(sessions.len(), 4, "{sessions:?}");
    // The vanished one's session was the kept one; the last `/` went on the new one.
    let vanished = up.seen("/vanish");
    assert_eq!(vanished.len(), 2, "sent again once: {vanished:?}");
    assert!(
        sessions[..3].iter().all(|&s| s == sessions[0]),
        "{sessions:?}"
    );
    assert_eq!(vanished[0], sessions[0]);
    assert_ne!(vanished[1], vanished[0]);
    assert_eq!(sessions[3], vanished[1]);
}

/// An HTTP/2 client's request on the relay's sockets: a socket goes back to its list only
/// after an answer read whole with nothing past its end, from a server that keeps it open.
/// Bytes past a body's end (whole in the first read, or streamed), a body beside a `HEAD`'s
/// answer or a 204, `Connection: close`, an HTTP/1.0 answer without `keep-alive`, and a
/// stream the client resets mid-body each leave the socket closed: the next request goes on
/// a new one and gets its own answer, never the stray bytes.
#[tokio::test]
async fn an_http2_client_s_socket_is_kept_only_after_an_answer_read_whole_and_clean() {
    use http_body_util::BodyExt;
    let up = scripted().await;
    let proxy = spawn_proxy(&format!("[proxy]\nthreads = 1\n{}", config(&up, false))).await;
    wait_checked(&proxy).await;
    let h2 = h2c_client();
    let addr = proxy.addr;
    let send = |method: http::Method, path: &'static str| {
        let h2 = &h2;
        async move {
            let (parts, _, body) = h2_ask(h2, addr, method, path, &[], "").await;
            (parts.status.as_u16(), body)
        }
    };
    let last_conn = || *up.conns.lock().unwrap().last().unwrap();
    // Kept: the next request goes on the same socket.
    assert_eq!(
        send(http::Method::GET, "/length").await,
        (200, "hello".into())
    );
    let kept = last_conn();
    assert_eq!(
        send(http::Method::GET, "/length").await,
        (200, "hello".into())
    );
    assert_eq!(last_conn(), kept, "a clean answer's socket is kept");
    let cases: [(http::Method, &str, u16, &str); 8] = [
        (http::Method::GET, "/extra", 200, "ok"),
        (http::Method::GET, "/chunked-extra", 200, "ok"),
        (http::Method::GET, "/streamed-extra", 200, "firstsecond"),
        (
            http::Method::GET,
            "/streamed-extra-chunked",
            200,
            "firstsecond",
        ),
        (http::Method::GET, "/stray-204", 204, ""),
        (http::Method::HEAD, "/head-body", 200, ""),
        (http::Method::GET, "/said-close", 200, "ok"),
        (http::Method::GET, "/old-kept", 200, "ok"),
    ];
    for (method, path, status, body) in cases {
        assert_eq!(
            send(method.clone(), path).await,
            (status, body.into()),
            "{method} {path}"
        );
        let on = last_conn();
        assert_eq!(
            send(http::Method::GET, "/length").await,
            (200, "hello".into()),
            "after {method} {path}"
        );
        assert_ne!(
            last_conn(),
            on,
            "after {method} {path}: its socket was kept"
        );
    }
    // A stream the client resets before the answer's head: its socket is closed too.
    let before = up.hung_up.load(Ordering::SeqCst);
    let asked = {
        let req = http::Request::get(format!("http://{addr}/hang"))
            .body(empty())
            .unwrap();
        tokio::spawn(h2.request(req))
    };
    let arrived = wait_until(Duration::from_secs(10), || {
        up.heads
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.starts_with("GET /hang "))
    });
    assert!(arrived.await, "/hang reached the server");
    asked.abort();
    assert!(
        up.closed_one_since(before).await,
        "/hang: its socket was kept"
    );
    // A stream the client resets mid-body: its socket is closed, not kept mid-answer.
    for path in ["/stall", "/stall-chunked"] {
        let before = up.hung_up.load(Ordering::SeqCst);
        let req = http::Request::get(format!("http://{addr}{path}"))
            .body(empty())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), h2.request(req))
            .await
            .unwrap()
            .unwrap();
        let mut body = resp.into_body();
        let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), "first", "{path}");
        drop(body);
        assert!(
            up.closed_one_since(before).await,
            "{path}: its socket was kept"
        );
        assert_eq!(
            send(http::Method::GET, "/length").await,
            (200, "hello".into()),
            "after {path}"
        );
    }
}

/// `upstream.read_timeout` on an HTTP/2 client's answer read from the relay's socket: a body
/// that stalls is cut short (the client's stream reset), and the server's socket closed.
#[tokio::test]
async fn an_http2_client_s_relayed_body_that_stalls_is_cut_short() {
    use http_body_util::BodyExt;
    let up = scripted().await;
    let config = config(&up, false).replace(
        "[health]",
        "read_timeout = \"500ms\"\nresponse_timeout = \"500ms\"\n[health]\nfall = 1000000\n",
    );
    let proxy = spawn_proxy(&format!("[proxy]\nthreads = 1\n{config}")).await;
    wait_checked(&proxy).await;
    let h2 = h2c_client();
    // No head within `response_timeout`: the outage response, and the socket closed.
    let before = up.hung_up.load(Ordering::SeqCst);
    let req = http::Request::get(format!("http://{}/hang", proxy.addr))
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), h2.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(
        up.closed_one_since(before).await,
        "/hang: its socket was kept"
    );
    for path in ["/stall", "/stall-chunked", "/stall-close"] {
        let before = up.hung_up.load(Ordering::SeqCst);
        let req = http::Request::get(format!("http://{}{path}", proxy.addr))
            .body(empty())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), h2.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let collected = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .unwrap();
        assert!(
            collected.is_err(),
            "{path}: the stalled body ended as if whole"
        );
        assert!(
            up.closed_one_since(before).await,
            "{path}: its socket was kept"
        );
    }
}

/// An HTTP/2 client's `POST` on the relay's kept sessions (its small body held whole, as for
/// any `https://` server) is never sent twice: when the server ends the session unanswered as
/// it arrives, it may have acted on it, and the client gets the outage response, as on
/// hyper's path; a `GET` is sent again once.
#[tokio::test]
async fn an_http2_client_s_post_the_server_vanishes_on_is_not_sent_again() {
    let tls = Tls::new();
    let up = tls_up(&tls).await;
    let proxy = tls_up_proxy(&tls, &up).await;
    let mut client = Client::connect(proxy.addr).await;
    assert!(client.get("/").await.relayed());
    let h2 = h2c_client();
    let addr = proxy.addr;
    let send = |method: http::Method, path: &'static str, body: &'static str| {
        let h2 = &h2;
        async move {
            let (parts, _, got) = h2_ask(h2, addr, method, path, &[], body).await;
            let kept = parts.headers.contains_key("x-upstream-case");
            (parts.status.as_u16(), kept, got)
        }
    };
    assert_eq!(send(http::Method::GET, "/", "").await.0, 200);
    let (status, _, _) = send(http::Method::POST, "/vanish", "abc").await;
    assert_eq!(status, 503, "the POST's failure is the outage response");
    let vanished = up.seen("/vanish");
    assert_eq!(vanished.len(), 1, "sent once: {vanished:?}");
    // It went on the relay's kept session (the `GET`'s).
    let sessions = up.seen("/");
    assert_eq!(vanished[0], sessions[1], "{sessions:?} {vanished:?}");
    // A `POST` goes only on a session idle under a second (`FRESH`): past it, on a new one.
    assert_eq!(send(http::Method::GET, "/", "").await.0, 200);
    let kept = *up.seen("/").last().unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(send(http::Method::POST, "/", "abc").await.0, 200);
    let sessions = up.seen("/");
    assert_ne!(sessions[sessions.len() - 1], kept, "{sessions:?}");
}

/// Many HTTP/2 streams at once on the relay's sockets, every framing mixed, with sockets kept,
/// closed and opened under them: each stream gets its own answer (a `PUT`'s own body echoed),
/// never another's, nor stray bytes.
#[tokio::test]
async fn concurrent_http2_streams_each_get_their_own_answer() {
    use http_body_util::BodyExt;
    let up = scripted().await;
    let proxy = spawn_proxy(&format!("[proxy]\nthreads = 1\n{}", config(&up, false))).await;
    wait_checked(&proxy).await;
    let h2 = h2c_client();
    let paths = [
        ("/length", "hello"),
        ("/chunked", "hello world"),
        ("/interim", "ok"),
        ("/extra", "ok"),
        ("/streamed-extra", "firstsecond"),
        ("/said-close", "ok"),
        ("/echo", ""),
        ("/close", "until the end"),
    ];
    let mut runs = Vec::new();
    for i in 0..240 {
        let (path, want) = paths[i % paths.len()];
        let h2 = h2.clone();
        let addr = proxy.addr;
        runs.push(tokio::spawn(async move {
            let mut req = http::Request::builder().uri(format!("http://{addr}{path}"));
            let (body, want) = if path == "/echo" {
                let mine = format!("stream {i}");
                req = req.method("PUT").header("content-length", mine.len());
                (full(mine.clone()), format!("PUT {mine}"))
            } else {
                (empty(), want.to_owned())
            };
            let resp =
                tokio::time::timeout(Duration::from_secs(20), h2.request(req.body(body).unwrap()))
                    .await
                    .unwrap()
                    .unwrap();
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(String::from_utf8_lossy(&got), want, "stream {i}: {path}");
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    // More than one socket, and far fewer than one per request: sockets were kept and shared.
    let conns = up.conns.lock().unwrap();
    let distinct: std::collections::HashSet<_> = conns.iter().collect();
    assert!(distinct.len() < conns.len(), "{distinct:?}");
}

/// What an HTTP/2 client gets for `method path` from the proxy at `addr`, with `headers` and
/// `body` (whole, with its length when it has one): the answer's head, its trailers and its
/// body, each within 10 s.
async fn h2_ask(
    h2: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        TestBody,
    >,
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> (http::response::Parts, Option<http::HeaderMap>, bytes::Bytes) {
    let length = body.len().to_string();
    let mut fields = headers.to_vec();
    if !body.is_empty() {
        fields.push(("content-length", length.as_str()));
    }
    h2_send(h2, addr, method, path, &fields, body).await
}

/// A server on raw sockets that answers a `HEAD` of `/late` with `Content-Length: 46` (of
/// `/late-chunked` with chunks) and then sends 46 stray bytes, an answer of its own, late: on
/// that connection's next request, as if they had crossed it, which no look at an idle
/// connection can see. `/empty` answers a `HEAD` with `Content-Length: 0`, anything else
/// `real`. Counts the connections that carried a request other than a health check.
async fn late_body_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    const STRAY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let conns = counted.clone();
            tokio::spawn(async move {
                let (mut buf, mut owed, mut seen) = (Vec::new(), false, false);
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let mut line = head.split(' ');
                    let (method, path) = (line.next().unwrap(), line.next().unwrap());
                    if path != "/" && !seen {
                        seen = true;
                        conns.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut out = Vec::new();
                    if std::mem::take(&mut owed) {
                        out.extend_from_slice(STRAY);
                    }
                    out.extend_from_slice(match (method, path) {
                        ("HEAD", "/late") => {
                            owed = true;
                            b"HTTP/1.1 200 OK\r\nContent-Length: 46\r\n\r\n"
                        }
                        ("HEAD", "/late-chunked") => {
                            owed = true;
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        }
                        ("HEAD", "/empty") => b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal",
                    });
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// A server that sends a body after its answer to a `HEAD` announced one (a common bug, which
/// any client can provoke): the next request on that server connection, another client's
/// too, would get those bytes as its answer. Such a connection is closed instead, on both
/// paths, for HTTP/1.1 and HTTP/2 clients; one whose answer said `Content-Length: 0` is kept.
#[tokio::test]
async fn a_body_sent_after_a_head_s_answer_reaches_no_later_request() {
    use http_body_util::BodyExt;
    for hyper in [false, true] {
        for h2 in [false, true] {
            let (addr, conns) = late_body_upstream().await;
            let intercept = if hyper {
                "intercept_statuses = [418]\n"
            } else {
                ""
            };
            let proxy = spawn_proxy(&format!(
                "[proxy]\nthreads = 1\n[upstream]\nservers = [\"http://{addr}\"]\n{intercept}\
                 [health]\ninterval = \"60s\"\n"
            ))
            .await;
            let h2c = h2c_client();
            let mut h1 = Client::connect(proxy.addr).await;
            let what = format!("hyper: {hyper}, h2: {h2}");
            let mut ask = async |method: &str, path: &str| -> (u16, Vec<u8>) {
                if h2 {
                    let req = http::Request::builder()
                        .method(method)
                        .uri(format!("http://{}{path}", proxy.addr))
                        .body(empty())
                        .unwrap();
                    let resp = tokio::time::timeout(Duration::from_secs(10), h2c.request(req))
                        .await
                        .unwrap()
                        .unwrap();
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    (status, body.to_vec())
                } else if method == "HEAD" {
                    (h1.head(path).await.status(), Vec::new())
                } else {
                    let a = h1.get(path).await;
                    (a.status(), a.body)
                }
            };
            assert_eq!(ask("HEAD", "/empty").await, (200, Vec::new()), "{what}");
            assert_eq!(ask("GET", "/get").await, (200, b"real".to_vec()), "{what}");
            assert_eq!(
                conns.load(Ordering::SeqCst),
                1,
                "kept after a length of 0: {what}"
            );
            for (path, n) in [("/late", 2), ("/late-chunked", 3)] {
                assert_eq!(ask("HEAD", path).await, (200, Vec::new()), "{what}");
                assert_eq!(
                    ask("GET", "/get").await,
                    (200, b"real".to_vec()),
                    "{path}: {what}"
                );
                assert_eq!(conns.load(Ordering::SeqCst), n, "{path}: {what}");
            }
        }
    }
}

/// Every request the proxy refuses itself over HTTP/1.1 ends its connection once answered,
/// as nginx ends it after every `400`: a `Host` or target it cannot forward, a target of
/// another scheme than `http` or `https`, `CONNECT` (`405`, over TLS as over plaintext), codings
/// it does not take off. Whatever the client sent after it (here a pipelined request; a body
/// the refusal left unread could be one) is never read as its next request, nor forwarded.
/// On a connection the relay served first (it leaves a request it would refuse to hyper's
/// path), and on hyper's path, plaintext and TLS.
#[tokio::test]
async fn every_refusal_closes_its_connection_on_both_paths_plaintext_and_tls() {
    let up = scripted().await;
    let tls = Tls::new();
    let refused = [
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (
            "POST / HTTP/1.1\r\nHost: a b\r\nContent-Length: 2\r\n\r\nhi",
            400,
        ),
        ("GET http://user@a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET example.com:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
    ];
    let mut faults = Vec::new();
    for over_tls in [false, true] {
        for hyper in [false, true] {
            let (_proxy, addr) = match over_tls {
                true => {
                    let proxy = tls.proxy(&config(&up, hyper)).await;
                    let addr = tls_addr(&proxy);
                    (proxy, addr)
                }
                false => {
                    let proxy = spawn_proxy(&config(&up, hyper)).await;
                    let addr = proxy.addr;
                    (proxy, addr)
                }
            };
            for (request, status) in refused {
                let what = format!("hyper: {hyper}, TLS: {over_tls}, {request:?}");
                let mut client = match over_tls {
                    true => Client::connect_tls(addr, &tls).await,
                    false => Client::connect(addr).await,
                };
                let served = client.get("/length").await;
                assert_eq!(served.relayed(), !hyper, "{what}");
                client
                    .send(&format!(
                        "{request}GET /after-refusal HTTP/1.1\r\nHost: shop.example\r\n\r\n"
                    ))
                    .await;
                let answer = client.read().await;
                if answer.status() != status {
                    faults.push(format!("{what}: {}", answer.head));
                    continue;
                }
                let closes = answer.header("connection") == Some("close");
                // Sooner than a connection kept open closes, idle for `header_read_timeout`
                // (10 s).
                let closed = client.closed_within(Duration::from_secs(5)).await.is_some();
                if !closes || !closed || !client.buf.is_empty() {
                    let more = String::from_utf8_lossy(&client.buf);
                    faults.push(format!(
                        "{what}: says close {closes}, closed {closed}, {more:?}"
                    ));
                }
            }
        }
    }
    assert!(faults.is_empty(), "{faults:#?}");
    let heads = up.heads.lock().unwrap();
    assert!(
        !heads.iter().any(|h| h.contains("/after-refusal")),
        "{heads:?}"
    );
}

/// A request that asks to upgrade (`CONNECT`, a WebSocket) and is answered without, here held,
/// leaves its upgrade pending in hyper, which hands the connection to it when the connection
/// ends: it was dropped then, over TLS with no `close_notify`, so that the client read a
/// truncated connection. It is closed as any other now.
#[tokio::test]
async fn a_held_upgrade_request_s_tls_connection_ends_cleanly() {
    let up = scripted().await;
    let tls = Tls::new();
    let proxy = tls.proxy(&config(&up, false)).await;
    assert!(ctl(&proxy, on(None)).await.ok);
    for request in [
        "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nConnection: close\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let mut client = Client::connect_tls(tls_addr(&proxy), &tls).await;
        client.send(request).await;
        let answer = client.read().await;
        assert_eq!(answer.status(), 503, "{request:?}: {}", answer.head);
        assert!(
            client
                .closed_within(Duration::from_secs(10))
                .await
                .is_some(),
            "{request:?}: the connection stays open"
        );
    }
}

/// A held `CONNECT` ends its connection once answered, as its `405` does while forwarding:
/// what follows its head is meant as the tunnel's bytes, and was read as the next request,
/// forwarded when it named an allowed path (a proxy in front that passes `CONNECT` on took it
/// for tunnel bytes and never looked at it). Plaintext and TLS.
#[tokio::test]
async fn a_held_connect_closes_its_connection_and_nothing_behind_is_forwarded() {
    let up = scripted().await;
    let tls = Tls::new();
    let config = format!(
        "{}[maintenance]\nallow_paths = [\"/length\"]\n",
        config(&up, false)
    );
    let mut faults = Vec::new();
    for over_tls in [false, true] {
        let (proxy, mut client) = tls.maybe(&config, over_tls).await;
        assert!(ctl(&proxy, on(None)).await.ok);
        // The path behind is one a hold forwards: sent on its own, it reaches the server.
        assert_eq!(client.get("/length").await.status(), 200);
        client
            .send(
                "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\
                 GET /length?behind-connect HTTP/1.1\r\nHost: shop.example\r\n\r\n",
            )
            .await;
        let answer = client.read().await;
        assert_eq!(answer.status(), 503, "TLS {over_tls}: {}", answer.head);
        let closes = answer.header("connection") == Some("close");
        // Sooner than a kept connection idles out (`header_read_timeout`, 10 s).
        let closed = client.closed_within(Duration::from_secs(5)).await.is_some();
        if !closes || !closed || !client.buf.is_empty() {
            let more = String::from_utf8_lossy(&client.buf);
            faults.push(format!(
                "TLS {over_tls}: says close {closes}, closed {closed}, {more:?}"
            ));
        }
    }
    let heads = up.heads.lock().unwrap();
    assert!(
        heads.iter().any(|h| h.starts_with("GET /length ")),
        "{heads:?}"
    );
    assert!(
        !heads.iter().any(|h| h.contains("/behind-connect")),
        "{faults:#?} {heads:?}"
    );
    assert!(faults.is_empty(), "{faults:#?}");
}

/// The same when the server declines the upgrade (it answers anything but `101`; here `404`):
/// the forwarding path let hyper's pending upgrade go with its request, so that the
/// connection was dropped at its end without `close_notify`, and a client asking with
/// `Connection: close` read a truncated connection. And any HTTPS connection hyper serves (a
/// declined upgrade's, one asking for `TE: trailers`) that idled out (`header_read_timeout`)
/// was dropped so too, where the relay closes its own with `close_notify`: hyper's timer ends
/// it with an error, taken for an answer cut short.
#[tokio::test]
async fn a_tls_connection_left_to_hyper_ends_with_close_notify() {
    let up = scripted().await;
    let tls = Tls::new();
    let proxy = tls
        .proxy(&format!(
            "[proxy]\nheader_read_timeout = \"500ms\"\n{}",
            config(&up, false)
        ))
        .await;
    for (request, status) in [
        (
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n",
            404,
        ),
        // Kept open, then closed for its idling.
        (
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            404,
        ),
        ("GET /length HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n", 200),
    ] {
        let mut client = Client::connect_tls(tls_addr(&proxy), &tls).await;
        client.send(request).await;
        let answer = client.read().await;
        assert_eq!(answer.status(), status, "{request:?}: {}", answer.head);
        assert!(
            client
                .closed_within(Duration::from_secs(10))
                .await
                .is_some(),
            "{request:?}: the connection stays open"
        );
    }
}

/// `proxy.redirect_https` refuses a request whose host it cannot redirect to with `400`: a
/// refusal like the others, after which the connection closes.
#[tokio::test]
async fn a_redirect_s_refusal_closes_its_connection() {
    let up = scripted().await;
    let tls = Tls::new();
    let proxy = tls
        .proxy(&format!(
            "[proxy]\nredirect_https = true\n{}",
            config(&up, false)
        ))
        .await;
    let mut client = Client::connect(proxy.addr).await;
    let redirected = client.get("/x").await;
    assert_eq!(redirected.status(), 308, "{}", redirected.head);
    for request in [
        "GET /x HTTP/1.1\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a@b\r\n\r\n",
    ] {
        let mut client = Client::connect(proxy.addr).await;
        client
            .send(&format!(
                "{request}GET /y HTTP/1.1\r\nHost: shop.example\r\n\r\n"
            ))
            .await;
        let answer = client.read().await;
        assert_eq!(answer.status(), 400, "{request:?}: {}", answer.head);
        assert_eq!(answer.header("connection"), Some("close"), "{request:?}");
        assert!(
            client.closed_within(Duration::from_secs(5)).await.is_some(),
            "{request:?}: the connection stays open"
        );
        assert!(client.buf.is_empty(), "{request:?}: {:?}", client.buf);
    }
}

/// The `write` system calls the proxy process has made (`/proc/PID/io`'s `syscw`): the relay
/// writes to sockets with `send`, which it does not count, so that on a relayed connection
/// these are tokio waking its own driver through its eventfd.
fn writes_made(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let line = io.lines().find(|l| l.starts_with("syscw:")).unwrap();
    line["syscw:".len()..].trim().parse().unwrap()
}

/// Busy keep-alive connections keep their grace from firing, by moving it later as they are
/// answered: fired on a busy connection and registered again, it woke the connection for
/// nothing, and made tokio write its eventfd whenever the new deadline came before the one
/// its driver meant to wake at next (connections begun together fire together, and all of
/// them then did): 0.05 to 0.4 `write`s per forwarded request.
#[tokio::test(flavor = "multi_thread")]
async fn busy_connections_make_no_timer_writes() {
    let up = upstream(|_| async { hyper::Response::new(full("ok")) }).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"{}\"]\n[health]\ninterval = \"1h\"\n\
         [log]\naccess_log = false\n",
        up.url()
    );
    let proxy = ProxyProcess::start(dir.path(), &config);
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(one_answer(&mut sock, request).await, "ok");
        conns.push(sock);
    }
    let pid = proxy.child.id();
    // Each connection asked again as soon as it answers, for 200 ms (the proxy's start-up
    // done with), then counted over a second: 100 graces on each.
    let (warm, busy) = (Duration::from_millis(200), Duration::from_secs(1));
    let start = std::time::Instant::now();
    let (counted, until) = (start + warm, start + warm + busy);
    let before = Arc::new(Mutex::new(None));
    let asking = conns.into_iter().map(|mut sock| {
        let before = before.clone();
        tokio::spawn(async move {
            let mut asked = 0u64;
            loop {
                let now = std::time::Instant::now();
                if now >= until {
                    return asked;
                }
                if now >= counted {
                    before
                        .lock()
                        .unwrap()
                        .get_or_insert_with(|| writes_made(pid));
                    asked += 1;
                }
                assert_eq!(one_answer(&mut sock, request).await, "ok");
            }
        })
    });
    let mut asked = 0;
    for task in asking.collect::<Vec<_>>() {
        asked += task.await.unwrap();
    }
    let before = before.lock().unwrap().unwrap();
    let writes = writes_made(pid) - before;
    assert!(
        writes <= 12,
        "{writes} writes for {asked} requests on 8 busy connections"
    );
}

/// A head hyper's server refuses as it reads it (no HTTP at all, a version that is none, a
/// header line that is no field) is answered `400` with words, plain text, and `Connection:
/// close`, then closed cleanly: hyper's own `400` had an empty body, the one answer of the
/// proxy's without one. On a new connection, with the relay on and off (`intercept_statuses`),
/// in maintenance, over plaintext and TLS, and after a relayed answer on a kept connection.
#[tokio::test]
async fn a_head_that_cannot_be_read_is_answered_400_with_words() {
    const SAID: &[u8] =
        b"the request could not be read: its request line or a header is malformed\n";
    let up = scripted().await;
    let tls = Tls::new();
    let refused = |answer: &Answer, case: &str| {
        assert_eq!(answer.status(), 400, "{case}: {}", answer.head);
        assert_eq!(answer.body, SAID, "{case}: {}", answer.head);
        assert_eq!(answer.header("connection"), Some("close"), "{case}");
        assert_eq!(
            answer.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{case}"
        );
    };
    for (hyper, over_tls, held) in [
        (false, false, false),
        (true, false, false),
        (false, true, false),
        (true, true, false),
        (false, false, true),
    ] {
        let (proxy, _) = tls.maybe(&config(&up, hyper), over_tls).await;
        if held {
            assert!(ctl(&proxy, on(None)).await.ok);
        }
        for bad in [
            "NOT HTTP AT ALL\r\n\r\n",
            "GET / HTTP/1.2\r\nHost: shop.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: shop.example\r\nno colon here\r\n\r\n",
        ] {
            let case = format!("hyper: {hyper}, tls: {over_tls}, held: {held}, {bad:?}");
            let mut client = match over_tls {
                true => Client::connect_tls(tls_addr(&proxy), &tls).await,
                false => Client::connect(proxy.addr).await,
            };
            client.send(bad).await;
            refused(&client.read().await, &case);
            assert!(
                client
                    .closed_within(Duration::from_secs(10))
                    .await
                    .is_some(),
                "{case}: not closed"
            );
        }
        if !hyper && !held {
            // After an answer the relay gave, on the same connection.
            let mut client = match over_tls {
                true => Client::connect_tls(tls_addr(&proxy), &tls).await,
                false => Client::connect(proxy.addr).await,
            };
            client
                .send("GET /length HTTP/1.1\r\nHost: shop.example\r\n\r\n")
                .await;
            assert_eq!(client.read().await.status(), 200);
            client.send("GET / HTTP/1.1\r\n\x01\r\n\r\n").await;
            refused(&client.read().await, &format!("tls: {over_tls}, kept"));
        }
    }
}

/// The requests the proxy refused unread, as `/metrics` counts them: `reserved` requests, and
/// `4xx` answers.
async fn refused_counts(proxy: &Proxy) -> (f64, f64) {
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let got = get(&format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(got.body()).into_owned();
    let sum = |series: &str, label: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(series) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum("intermission_requests_total{", "outcome=\"reserved\""),
        sum("intermission_responses_total{", "class=\"4xx\""),
    )
}

/// A request head over `max_header_bytes` (a visitor's cookies grown too large), whole or
/// still arriving past the limit, in one write or in pieces, and one with more than 100 header
/// fields, is answered `431` in plain text saying what was too large, with `Connection:
/// close`, then closed cleanly: hyper's own `431` had an empty body, a blank page in a
/// browser. On a new connection and after a relayed answer on a kept one, over plaintext and
/// TLS; each counted once.
#[tokio::test]
async fn a_head_over_max_header_bytes_is_answered_431_with_words() {
    const TOO_LARGE: &str = "the request head is too large: its request line and header fields \
                             come to more than 16384 bytes (often too many or too large cookies)\n";
    const TOO_MANY: &str = "the request head is too large: more than 100 header fields\n";
    let up = scripted().await;
    let tls = Tls::new();
    let cookie = format!("Cookie: session={}\r\n", "c".repeat(20_000));
    let whole = format!("GET / HTTP/1.1\r\nHost: shop.example\r\n{cookie}\r\n");
    // Past the limit, and not whole yet.
    let endless = format!("GET / HTTP/1.1\r\nHost: shop.example\r\n{cookie}");
    let fields: String = (0..101).map(|i| format!("X-F{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: shop.example\r\n{fields}\r\n");
    for over_tls in [false, true] {
        let config = format!(
            "[proxy]\nmax_header_bytes = 16384\n{}[admin]\nlisten = \"127.0.0.1:0\"\n",
            config(&up, false)
        );
        let (proxy, _) = tls.maybe(&config, over_tls).await;
        let mut told = 0.0;
        for (kept, head, why) in [
            (false, &whole, TOO_LARGE),
            (false, &endless, TOO_LARGE),
            (false, &many, TOO_MANY),
            (true, &whole, TOO_LARGE),
            (true, &endless, TOO_LARGE),
            (true, &many, TOO_MANY),
        ] {
            for pieces in [1, 3] {
                let case = format!(
                    "tls: {over_tls}, kept: {kept}, {} bytes in {pieces}",
                    head.len()
                );
                let mut client = match over_tls {
                    true => Client::connect_tls(tls_addr(&proxy), &tls).await,
                    false => Client::connect(proxy.addr).await,
                };
                if kept {
                    let answer = client.get("/length").await;
                    assert!(answer.relayed(), "{case}: {}", answer.head);
                }
                // In pieces: the first short of a read's 8 KiB, then the rest past it.
                let cuts = match pieces {
                    1 => vec![0, head.len()],
                    _ => vec![0, 1000, 12_000.min(head.len()), head.len()],
                };
                for cut in cuts.windows(2) {
                    client.send(&head[cut[0]..cut[1]]).await;
                }
                let answer = client.read().await;
                assert_eq!(answer.status(), 431, "{case}: {}", answer.head);
                assert_eq!(String::from_utf8_lossy(&answer.body), why, "{case}");
                assert_eq!(answer.header("connection"), Some("close"), "{case}");
                assert_eq!(
                    answer.header("content-type"),
                    Some("text/plain; charset=utf-8"),
                    "{case}"
                );
                assert!(
                    client
                        .closed_within(Duration::from_secs(10))
                        .await
                        .is_some(),
                    "{case}: not closed"
                );
                told += 1.0;
                // Counted once, as it is answered.
                let counted =
                    wait_until_async(|| async { refused_counts(&proxy).await.0 >= told }).await;
                assert!(counted, "{case}: {:?}", refused_counts(&proxy).await);
                assert_eq!(refused_counts(&proxy).await, (told, told), "{case}");
            }
        }
    }
}
