//! Test harness: real upstream servers and real proxies on 127.0.0.1 with ephemeral ports,
//! HTTP clients, and bounded waits. Shared by every integration test file.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fuzz;
pub mod tls;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A server's `101` switching to a WebSocket (the accept value of RFC 6455's example).
pub fn switching_to_websocket() -> hyper::Response<TestBody> {
    hyper::Response::builder()
        .status(101)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        .body(empty())
        .unwrap()
}

/// A body fed chunk by chunk from the test, of no length known in advance (chunked over
/// HTTP/1.1); it ends when the sender is dropped.
pub fn mpsc_body() -> (tokio::sync::mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    (tx, ChannelBody(rx).boxed())
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// A real HTTP/1.1 + h2c server on 127.0.0.1 running `handler` for every request; it can be
/// stopped (listener and every open connection closed, like a crashed app) and started
/// again on the same port.
pub struct Upstream {
    pub addr: SocketAddr,
    /// How many TCP connections it accepted.
    pub connections: Arc<AtomicUsize>,
    handler: Handler,
    tasks: Tasks,
}

type Tasks = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every connection, as a crash would.
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// `stop`, then waits until the port refuses connections: an abort takes effect when the
    /// runtime next drops the task, and until then the kernel still completes handshakes on
    /// the listening socket, so that a request sent meanwhile reaches a server that then
    /// vanishes, instead of being refused.
    pub async fn stopped(&self) {
        self.stop();
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "{} still accepts connections 5 s after it was stopped",
            self.addr
        );
    }

    /// Listens again on the same port (bounded retries while the old socket goes away).
    pub async fn restart(&self) {
        self.stop();
        for _ in 0..250 {
            if let Ok(l) = TcpListener::bind(self.addr).await {
                serve(
                    l,
                    self.handler.clone(),
                    self.connections.clone(),
                    self.tasks.clone(),
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot listen on {} again", self.addr);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let tasks = Tasks::default();
    serve(
        listener,
        handler.clone(),
        connections.clone(),
        tasks.clone(),
    );
    Upstream {
        addr,
        connections,
        handler,
        tasks,
    }
}

fn serve(listener: TcpListener, handler: Handler, counter: Arc<AtomicUsize>, tasks: Tasks) {
    let all = tasks.clone();
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let conn = tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let h = handler.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
            let mut all = all.lock().unwrap();
            all.retain(|t| !t.is_finished());
            all.push(conn);
        }
    });
    tasks.lock().unwrap().push(accept);
}

/// What the echo upstream saw, returned to the client as JSON.
#[derive(serde::Deserialize, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn has(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

/// An upstream that answers every request with a JSON description of it.
pub async fn echo_upstream() -> Upstream {
    upstream(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let seen = serde_json::json!({
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "version": format!("{:?}", parts.version),
            "headers": parts.headers.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("?"))).collect::<Vec<_>>(),
            "body": String::from_utf8_lossy(&body),
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(full(seen.to_string()))
            .unwrap()
    })
    .await
}

/// A proxy started in this process through the library, as the binary would start it.
pub struct Proxy {
    pub running: Option<intermission::app::Running>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Starts a proxy from config text; `listen` is set to 127.0.0.1:0 unless the text sets it.
pub async fn spawn_proxy(config: &str) -> Proxy {
    spawn_proxy_in(tempfile::tempdir().unwrap(), &with_listen(config)).await
}

/// Starts a proxy from config text written into `dir` (which may already hold certificates
/// or pages the config names).
pub async fn spawn_proxy_in(dir: tempfile::TempDir, text: &str) -> Proxy {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let config = intermission::config::Config::load_file(&path).unwrap();
    let running = intermission::app::start(config).await.unwrap();
    let addr = running.local_addrs()[0];
    Proxy {
        running: Some(running),
        addr,
        dir,
    }
}

pub fn with_listen(config: &str) -> String {
    // Only the plaintext `listen` counts: `[admin] listen` or `[tls] listen` alone would leave
    // the proxy on its default 127.0.0.1:8080, which tests running at the same time would
    // share (one's connection reaching another's proxy), or anything else holds.
    let mut section = "";
    let sets_listen = config.lines().map(str::trim).any(|line| {
        if line.starts_with('[') {
            section = line;
        }
        section == "[proxy]" && line.starts_with("listen")
    });
    if sets_listen {
        config.to_owned()
    } else if config.contains("[proxy]") {
        config.replacen("[proxy]", "[proxy]\nlisten = [\"127.0.0.1:0\"]", 1)
    } else {
        format!("[proxy]\nlisten = [\"127.0.0.1:0\"]\n{config}")
    }
}

/// An HTTP/1.1 client (no pooling surprises: a fresh pool per client).
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A unary gRPC call to `url` with an empty message, as a client library sends one.
pub fn grpc_call(url: &str) -> Request<TestBody> {
    Request::post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(vec![0u8, 0, 0, 0, 0]))
        .unwrap()
}

pub async fn get(url: &str) -> Response<Bytes> {
    send(Request::get(url).body(empty()).unwrap()).await
}

pub async fn send(req: Request<TestBody>) -> Response<Bytes> {
    let resp = client().request(req).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

pub fn json<T: serde::de::DeserializeOwned>(resp: &Response<Bytes>) -> T {
    serde_json::from_slice(resp.body())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(resp.body())))
}

/// Whether the peer of the IPv4 loopback connection `(local, peer)` (the client's ends) has
/// read all that was sent to it: the peer's socket, the one at `peer` connected to `local`,
/// has an empty receive queue in `/proc/net/tcp` (Linux only; true elsewhere). Both ports are
/// matched: a closed socket of another connection that came from the same port would read as
/// empty before this one's bytes were read.
pub fn read_by_peer((local, peer): (SocketAddr, SocketAddr)) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    let (ours, theirs) = (
        format!(":{:04X}", peer.port()),
        format!(":{:04X}", local.port()),
    );
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 4
            && fields[1].ends_with(&ours)
            && fields[2].ends_with(&theirs)
            && fields[4]
                .split_once(':')
                .is_some_and(|(_, rx)| u64::from_str_radix(rx, 16) == Ok(0))
    })
}

/// Waits for `cond` to hold, checking every 20 ms, for at most `limit`.
pub async fn wait_until<F: FnMut() -> bool>(limit: Duration, mut cond: F) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Polls an async condition every 20 ms, for at most 5 s.
pub async fn wait_until_async<F, Fut>(mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Sends raw bytes on a new connection and reads until the peer closes or `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange_on(s, request, limit).await
}

/// A connection to `addr` from the loopback address `local` (`127.0.0.2`…: Linux routes all
/// of 127.0.0.0/8 to the loopback), for a client the proxy sees as another host.
pub async fn connect_from(local: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// `raw_exchange` from the loopback address `local`.
pub async fn raw_exchange_from(
    local: &str,
    addr: SocketAddr,
    request: &[u8],
    limit: Duration,
) -> String {
    exchange_on(connect_from(local, addr).await, request, limit).await
}

/// Sends `request` on `s` and reads all that comes back within `limit`.
async fn exchange_on(mut s: tokio::net::TcpStream, request: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The head and body of the answer `got` holds, once it holds it whole (framed by its
/// `Content-Length`, none being 0).
pub fn whole_answer(got: &[u8]) -> Option<(String, String)> {
    let text = String::from_utf8_lossy(got);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (body.len() >= length).then(|| (head.to_owned(), body.to_owned()))
}

/// Sends `request` on `sock` and reads one answer (framed by its `Content-Length`): its body.
pub async fn one_answer(sock: &mut tokio::net::TcpStream, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        loop {
            let mut more = [0u8; 4096];
            let n = sock.read(&mut more).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&more[..n]);
            if let Some((_, body)) = whole_answer(&got) {
                return body;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no answer within 10 s")
}

/// An address on 127.0.0.1 where nothing listens, for as long as it is kept: a socket bound to
/// an ephemeral port and never listening. Connections to it are refused, and no other socket
/// can be given its port meanwhile (it does not set `SO_REUSEADDR`). A port bound and let go
/// at once, instead, could be given to another test's listener before the proxy under test
/// connects to it, which would then answer for the "dead" server.
pub struct Refusing {
    pub addr: SocketAddr,
    _held: tokio::net::TcpSocket,
}

impl Refusing {
    /// Starts listening on its address: a server that was down comes up.
    pub fn listen(self) -> tokio::net::TcpListener {
        self._held.listen(1024).unwrap()
    }
}

pub fn refusing() -> Refusing {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    Refusing {
        addr: socket.local_addr().unwrap(),
        _held: socket,
    }
}

/// The value of one series of `/metrics` as written (`name{labels}`), if there is one.
pub async fn series(proxy: &Proxy, key: &str) -> Option<f64> {
    let admin = proxy.running.as_ref().unwrap().admin_addr().unwrap();
    let got = get(&format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(got.body()).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `/metrics` shows `key` at `want`; what it showed last.
pub async fn series_reaches(proxy: &Proxy, key: &str, want: f64) -> Option<f64> {
    let mut seen = None;
    for _ in 0..200 {
        seen = series(proxy, key).await;
        if seen == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    seen
}

/// What a new plaintext client that sends `GET /new` and closes gets: empty when it was
/// refused at `max_connections`.
pub async fn new_client(proxy: &Proxy) -> String {
    raw_exchange(
        proxy.addr,
        b"GET /new HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
}

/// A new client at `max_connections`, tried until it is served (a connection that makes
/// room is among the idle ones only once the proxy has seen it idle).
pub async fn served_at_the_limit(proxy: &Proxy) -> bool {
    for _ in 0..100 {
        if new_client(proxy).await.starts_with("HTTP/1.1 200") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// At `max_connections`, with one connection whose request head began at `begun` and
/// stalled: a new client is refused while the head is young (when this gets there soon enough
/// to tell: a machine slow enough to take the whole two seconds proves nothing either way),
/// then served once the head has lasted its 2 s, well within its deadline (which would free
/// the slot too). `what` names the case in failures.
pub async fn room_made_once_stalled(proxy: &Proxy, begun: Instant, what: &str) {
    let out = new_client(proxy).await;
    if begun.elapsed() < Duration::from_millis(1500) {
        assert_eq!(out, "", "a young head was closed ({what})");
    }
    let mut served = out.starts_with("HTTP/1.1 200");
    while !served && begun.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        served = new_client(proxy).await.starts_with("HTTP/1.1 200");
    }
    assert!(served, "no room was made for a new client ({what})");
    assert!(
        begun.elapsed() >= Duration::from_secs(2),
        "made room before the head stalled ({what})"
    );
}

/// At `max_connections`, a new client is served and the idle `what` connection whose task
/// is `closed` makes room: it is closed.
pub async fn assert_makes_room<T>(proxy: &Proxy, closed: tokio::task::JoinHandle<T>, what: &str) {
    assert!(
        served_at_the_limit(proxy).await,
        "the new client was not served"
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), closed).await;
    assert!(ended.is_ok(), "the idle {what} connection was not closed");
}

/// The real binary, started as a user would start it.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Set once the proxy's stderr is read to its end: every line it wrote is in `log`.
    pub read_all: Arc<std::sync::atomic::AtomicBool>,
}

impl ProxyProcess {
    pub fn start(dir: &Path, config: &str) -> ProxyProcess {
        ProxyProcess::start_via(&[], dir, config)
    }

    /// Started by `wrapper` (a command that runs the one it is given, as `prlimit … --`).
    pub fn start_via(wrapper: &[&str], dir: &Path, config: &str) -> ProxyProcess {
        ProxyProcess::launch(wrapper, dir, config, Stdio::null())
    }

    /// Started as systemd starts a socket-activated service: with `socket` passed as
    /// descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` naming the proxy. The caller keeps its
    /// own copy open, as systemd does across restarts.
    pub fn start_passed(dir: &Path, config: &str, socket: &std::net::TcpListener) -> ProxyProcess {
        let copy = std::os::fd::OwnedFd::from(socket.try_clone().unwrap());
        // The shell moves its standard input to descriptor 3 and execs: the proxy keeps the
        // shell's process id, which `LISTEN_PID` names.
        let wrapper = [
            "sh",
            "-c",
            "exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
        ];
        ProxyProcess::launch(&wrapper, dir, config, Stdio::from(copy))
    }

    pub fn launch(wrapper: &[&str], dir: &Path, config: &str, stdin: Stdio) -> ProxyProcess {
        let path = dir.join("config.toml");
        std::fs::write(&path, with_listen(config)).unwrap();
        let binary = env!("CARGO_BIN_EXE_intermission");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let mut child = command
            .args(["run", "-c"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        let read_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = read_all.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[proxy] {line}");
                if let Some(addr) = listening_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                lines.lock().unwrap().push(line);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the proxy did not say where it listens");
        ProxyProcess {
            child,
            addr,
            dir: dir.to_path_buf(),
            log,
            read_all,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends `req` on this proxy's control socket, on a connection of its own.
    pub async fn ctl(
        &self,
        req: &intermission::control::protocol::Request,
    ) -> Result<intermission::control::protocol::Response, intermission::control::client::ClientError>
    {
        intermission::control::client::request(&self.dir.join("intermission.sock"), req).await
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// The address of the listener whose start line names `kind` (`http`, `https`), once
    /// the log has said it (each listener says so in turn, the first one at the start).
    pub async fn listening(&self, kind: &str) -> SocketAddr {
        let said = || {
            self.log_lines()
                .iter()
                .filter(|l| l.contains(&format!("({kind})")))
                .find_map(|l| listening_addr(l))
        };
        assert!(
            wait_until(Duration::from_secs(10), || said().is_some()).await,
            "no {kind} listener said where it listens"
        );
        said().expect("said")
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The access log's lines so far, when `log.format = "json"`, each without its time
    /// (`timestamp`, and `duration_ms`, checked to be a number): what two runs can compare.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.log_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "intermission::access")
            .map(|mut v| {
                let fields = v.as_object_mut().unwrap();
                assert!(fields.remove("duration_ms").unwrap().as_f64().is_some());
                fields.remove("timestamp");
                v
            })
            .collect()
    }

    /// Waits for the process to exit, for at most `limit`, and then for the lines it wrote
    /// last to be read (on a loaded machine the reader thread lags the exit).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                let read = Instant::now() + Duration::from_secs(10);
                while !self.read_all.load(std::sync::atomic::Ordering::SeqCst)
                    && Instant::now() < read
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident memory of the process in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Sends one control request to an in-process proxy.
/// `on`, with `message` or none, and nothing else.
/// The first whole minute at least `ahead` from now, and as `on --until` takes it: an end
/// that is a whole minute overruns at that very time (one that is not, at the minute the
/// pages show it, rounded up).
pub fn whole_minute_ahead(ahead: Duration) -> (std::time::SystemTime, String) {
    let end = intermission::time::announced_end(std::time::SystemTime::now() + ahead);
    (end, intermission::time::Timestamp(end).rfc3339())
}

pub fn on(message: Option<&str>) -> intermission::control::protocol::Request {
    intermission::control::protocol::Request::On {
        message: message.map(str::to_owned),
        until: None,
        retry_after: None,
        reason: None,
    }
}

pub async fn ctl(
    proxy: &Proxy,
    req: intermission::control::protocol::Request,
) -> intermission::control::protocol::Response {
    let socket = proxy.dir.path().join("intermission.sock");
    intermission::control::client::request(&socket, &req)
        .await
        .unwrap()
}

/// Waits (bounded, as `wait_until_async`) until the proxy's checks find every server healthy.
pub async fn all_servers_healthy(proxy: &Proxy) -> bool {
    wait_until_async(|| async {
        let health = ctl(proxy, intermission::control::protocol::Request::Health).await;
        health
            .health
            .is_some_and(|h| h.iter().all(|s| s.healthy == Some(true)))
    })
    .await
}

/// Whether a request is intermission's own health check.
pub fn is_health_check<B>(req: &Request<B>) -> bool {
    req.headers()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with("intermission-health-check/"))
}

/// The proxy's mode as `ctl status` tells it.
pub async fn proxy_mode(proxy: &Proxy) -> String {
    let state = ctl(proxy, intermission::control::protocol::Request::Status)
        .await
        .state;
    state.unwrap().mode.as_str().to_owned()
}

/// Waits (bounded) for the proxy's mode to become `want`; returns how long it took.
pub async fn wait_mode(proxy: &Proxy, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if proxy_mode(proxy).await == want {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "mode did not become {want} within {limit:?} (it is {})",
        proxy_mode(proxy).await
    );
}

/// Rewrites the proxy's config file (before a reload).
pub fn edit_config(proxy: &Proxy, edit: impl FnOnce(String) -> String) {
    let path = proxy.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
}

/// Whether `tool` runs (`tool version_arg` exits 0): when it does not, the test is skipped
/// and says so on the process's stderr (where the harness does not capture it, so a passing
/// run shows it), except under `CI=true`, which installs every tool (`.ci/packages`): there
/// it fails.
pub fn tool_present(tool: &str, version_arg: &str, package: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let line = format!("SKIPPED: needs `{tool}` (apt-get install {package})");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{line}, and CI=true, so this is a failure"
        );
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    found
}

/// Whether `prlimit` (util-linux) is here to lower a running proxy's descriptor limit.
pub fn have_prlimit() -> bool {
    tool_present("prlimit", "--version", "util-linux")
}

/// A server that switches every request asking for an upgrade (101, as a WebSocket server
/// answers) and then echoes what comes through the tunnel until its client closes; other
/// requests (health checks) get 200. `open` counts its tunnels not yet closed.
pub struct Switching {
    pub server: Upstream,
    pub open: Arc<AtomicUsize>,
}

pub async fn switching_upstream() -> Switching {
    let open = Arc::new(AtomicUsize::new(0));
    let counted = open.clone();
    let server = upstream(move |mut req: Request<Incoming>| {
        let open = counted.clone();
        async move {
            if !req.headers().contains_key("upgrade") {
                return Response::new(full("ok"));
            }
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on.await else { return };
                open.fetch_add(1, Ordering::SeqCst);
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(empty())
                .unwrap()
        }
    })
    .await;
    Switching { server, open }
}

/// Asks for a WebSocket upgrade on `s` and returns the answer's head, read byte by byte so
/// that nothing of the tunnel is taken with it; empty when the connection closes first.
pub async fn ask_to_switch<S>(s: &mut S) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask =
        b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    if s.write_all(ask).await.is_err() {
        return String::new();
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A tunnel through the proxy at `addr` to a `switching_upstream`.
pub async fn open_tunnel(addr: SocketAddr) -> tokio::net::TcpStream {
    tunnel_over(tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

/// `s`, a connection to a proxy before a `switching_upstream` (over TLS, say), made a tunnel
/// that echoes.
pub async fn tunnel_over<S>(mut s: S) -> S
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let head = ask_to_switch(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "no switch: {head:?}");
    assert!(echoes(&mut s, "first").await, "a new tunnel does not echo");
    s
}

/// Whether `msg`, sent through a tunnel, comes back within 10 s.
pub async fn echoes<S>(s: &mut S, msg: &str) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(msg.as_bytes()).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == msg.as_bytes()
}

/// A body that sends `payload` (7 bytes), then the trailer `x-checksum: abc123`.
pub struct WithTrailers(pub u8);

impl http_body::Body for WithTrailers {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0 += 1;
        std::task::Poll::Ready(match self.0 {
            1 => Some(Ok(http_body::Frame::data(Bytes::from_static(b"payload")))),
            2 => {
                let mut t = http::HeaderMap::new();
                t.insert("x-checksum", "abc123".parse().unwrap());
                Some(Ok(http_body::Frame::trailers(t)))
            }
            _ => None,
        })
    }
}

/// A response head's `Content-Length`, 0 when it has none.
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0)
}

/// Leaves the process `pid` `spare` file descriptors beyond those it has open now
/// (`prlimit`), so that its accepts soon fail for want of one (`EMFILE`).
pub fn leave_spare_descriptors(pid: u32, spare: usize) {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let lowered = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={}", open + spare),
        ])
        .status()
        .unwrap();
    assert!(lowered.success());
}

/// Reads `n` responses with `Content-Length` bodies from a keep-alive connection, in order,
/// from one buffer: for requests pipelined on it, whose answers may arrive in one read, which
/// `read_response` would take whole for the first (what it reads past one answer is lost).
pub async fn read_responses<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while out.len() < n {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length = content_length(&head);
            if buf.len() >= end + 4 + length {
                let rest = buf.split_off(end + 4 + length);
                out.push(String::from_utf8_lossy(&buf).into_owned());
                buf = rest;
                continue;
            }
        }
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(s, &mut chunk),
        )
        .await
        .unwrap_or_else(|_| panic!("no response {} within 5 s: {out:?}", out.len() + 1))
        .unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(
            read > 0,
            "closed before response {}: {out:?} {text:?}",
            out.len() + 1
        );
        buf.extend_from_slice(&chunk[..read]);
    }
    out
}

/// Reads one response with a `Content-Length` body from a keep-alive connection. What it
/// reads past that response is dropped: for pipelined requests, `read_responses`.
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = content_length(&text[..end]);
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(s, &mut chunk),
        )
        .await
        .expect("no response within 5 s")
        .unwrap();
        assert!(n > 0, "closed before a whole response: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A `GET path` over HTTP/1.1 to `addr` whose client closes once the application has it:
/// once `arrived` (counted by `never_answering`) has gone up by one.
pub async fn give_up_over_http1(
    addr: std::net::SocketAddr,
    path: &str,
    arrived: &std::sync::atomic::AtomicUsize,
) {
    use std::sync::atomic::Ordering;
    let before = arrived.load(Ordering::SeqCst);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes())
        .await
        .unwrap();
    let came = wait_until(Duration::from_secs(10), || {
        arrived.load(Ordering::SeqCst) > before
    });
    assert!(came.await, "{path} never reached the application");
}

/// The same over HTTP/2 prior knowledge: the stream is dropped with its client.
pub async fn give_up_over_h2c(url: String, arrived: &std::sync::atomic::AtomicUsize) {
    use std::sync::atomic::Ordering;
    let before = arrived.load(Ordering::SeqCst);
    let client = h2c_client();
    let call = tokio::spawn(async move { client.get(url.parse().unwrap()).await });
    let came = wait_until(Duration::from_secs(10), || {
        arrived.load(Ordering::SeqCst) > before
    });
    assert!(
        came.await,
        "the HTTP/2 request never reached the application"
    );
    call.abort();
    let _ = call.await;
}

/// An application that answers its health checks (`/`) and never answers any other request,
/// counting those in `arrived`.
pub async fn never_answering(arrived: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Upstream {
    upstream(move |req: Request<Incoming>| {
        let seen = arrived.clone();
        async move {
            if req.uri().path() == "/" {
                return Response::new(full("ok"));
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full("never"))
        }
    })
    .await
}
