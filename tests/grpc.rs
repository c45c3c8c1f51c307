//! gRPC end to end: a real tonic client calls a real tonic server behind intermission over
//! `h2c://` — unary, server streaming, error statuses — and in maintenance or outage the same
//! client gets UNAVAILABLE with the operator's message and its retry pushback. The upstream's
//! health is checked with the standard `grpc.health.v1.Health/Check`.
//!
//! No protoc and no build script: the messages are `prost` derives written by hand, the
//! client is `tonic::client::Grpc`, and the server is a hand-written service dispatching by
//! path to `tonic::server::Grpc`, as `tonic-build` would generate it.
// `Result<_, tonic::Status>` is tonic's own API shape; its size is not ours to change.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

mod support;

use http::uri::PathAndQuery;
use intermission::control::protocol::Request as Ctl;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use support::*;
use tonic::body::Body;
use tonic::codec::{ProstCodec, Streaming};
use tonic::codegen::{tokio_stream, BoxFuture};
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower_service::Service;

// ---------------------------------------------------------------------------------------------
// Messages (what `prost-build` would generate from a .proto).

/// `message SayRequest { string text = 1; uint32 count = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
struct SayRequest {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

/// `message SayReply { string text = 1; string request_id = 2; uint32 index = 3; }`
#[derive(Clone, PartialEq, prost::Message)]
struct SayReply {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(string, tag = "2")]
    request_id: String,
    #[prost(uint32, tag = "3")]
    index: u32,
}

/// `grpc.health.v1.HealthCheckRequest { string service = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse { ServingStatus status = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

const SAY: &str = "/test.Echo/Say";
const SAY_MANY: &str = "/test.Echo/SayMany";
const SAY_MANY_THEN_FAIL: &str = "/test.Echo/SayManyThenFail";
const FAIL: &str = "/test.Echo/Fail";
const SAY_GATED: &str = "/test.Echo/SayGated";
const SAY_ALL: &str = "/test.Echo/SayAll";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

// ---------------------------------------------------------------------------------------------
// The server.

/// What the test server saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// Calls to `test.Echo` methods (health checks not counted).
    calls: AtomicUsize,
    health_checks: AtomicUsize,
    /// Whether Health/Check answers NOT_SERVING.
    not_serving: AtomicBool,
    /// `x-request-id` of every `test.Echo` call, in order.
    request_ids: Mutex<Vec<String>>,
    /// Lets `SayGated` send its replies after the first.
    gate: tokio::sync::Notify,
}

impl Seen {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Counts an Echo call and returns its `x-request-id`.
    fn record<T>(&self, req: &tonic::Request<T>) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.request_ids.lock().unwrap().push(id.clone());
        id
    }
}

type ReplyStream = tokio_stream::Iter<std::vec::IntoIter<Result<SayReply, Status>>>;

/// `rpc Say(SayRequest) returns (SayReply)`: echoes the text and the `x-request-id`, and
/// answers with response metadata `x-served-by: grpc-test`.
struct SaySvc(Arc<Seen>);

impl Service<tonic::Request<SayRequest>> for SaySvc {
    type Response = tonic::Response<SayReply>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<SayRequest>) -> Self::Future {
        let request_id = self.0.record(&req);
        let text = format!("echo: {}", req.into_inner().text);
        let mut resp = tonic::Response::new(SayReply {
            text,
            request_id,
            index: 0,
        });
        resp.metadata_mut()
            .insert("x-served-by", MetadataValue::from_static("grpc-test"));
        ready(Ok(resp))
    }
}

/// `rpc SayMany(SayRequest) returns (stream SayReply)`: `count` replies, numbered from 0, and
/// with `fail_after`, then an ABORTED status in the trailers.
struct SayManySvc {
    seen: Arc<Seen>,
    fail_after: bool,
}

impl Service<tonic::Request<SayRequest>> for SayManySvc {
    type Response = tonic::Response<ReplyStream>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<SayRequest>) -> Self::Future {
        let request_id = self.seen.record(&req);
        let SayRequest { text, count } = req.into_inner();
        let mut items: Vec<Result<SayReply, Status>> = (0..count)
            .map(|index| {
                Ok(SayReply {
                    text: format!("{text} #{index}"),
                    request_id: request_id.clone(),
                    index,
                })
            })
            .collect();
        if self.fail_after {
            items.push(Err(Status::aborted("stream gave up after the last reply")));
        }
        ready(Ok(tonic::Response::new(tokio_stream::iter(items))))
    }
}

/// `rpc SayGated(SayRequest) returns (stream SayReply)`: sends reply 0 at once, then waits
/// for the test to open the gate before sending replies 1..count and ending OK.
struct SayGatedSvc(Arc<Seen>);

impl Service<tonic::Request<SayRequest>> for SayGatedSvc {
    type Response =
        tonic::Response<tokio_stream::wrappers::ReceiverStream<Result<SayReply, Status>>>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<SayRequest>) -> Self::Future {
        let request_id = self.0.record(&req);
        let SayRequest { text, count } = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let seen = self.0.clone();
        tokio::spawn(async move {
            for index in 0..count {
                if index == 1 {
                    seen.gate.notified().await;
                }
                let reply = SayReply {
                    text: format!("{text} #{index}"),
                    request_id: request_id.clone(),
                    index,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        ready(Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// `rpc SayAll(stream SayRequest) returns (SayReply)`: the texts of every request, joined,
/// once the client's stream has ended.
struct SayAllSvc(Arc<Seen>);

impl Service<tonic::Request<Streaming<SayRequest>>> for SayAllSvc {
    type Response = tonic::Response<SayReply>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Streaming<SayRequest>>) -> Self::Future {
        let request_id = self.0.record(&req);
        let mut stream = req.into_inner();
        Box::pin(async move {
            let mut texts = Vec::new();
            while let Some(said) = stream.message().await? {
                texts.push(said.text);
            }
            Ok(tonic::Response::new(SayReply {
                text: texts.join(" "),
                request_id,
                index: 0,
            }))
        })
    }
}

/// `rpc Fail(SayRequest) returns (SayReply)`: always NOT_FOUND, with error metadata.
struct FailSvc(Arc<Seen>);

impl Service<tonic::Request<SayRequest>> for FailSvc {
    type Response = tonic::Response<SayReply>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<SayRequest>) -> Self::Future {
        self.0.record(&req);
        let mut status = Status::not_found(format!(
            "no such greeting: {} — 100% gone",
            req.into_inner().text
        ));
        status.metadata_mut().insert(
            "x-error-detail",
            MetadataValue::from_static("looked-everywhere"),
        );
        ready(Err(status))
    }
}

/// `grpc.health.v1.Health/Check`: SERVING unless `not_serving`; the whole server ("") and
/// `test.Echo` are known, any other service is NOT_FOUND (as the standard service does).
struct CheckSvc(Arc<Seen>);

impl Service<tonic::Request<HealthCheckRequest>> for CheckSvc {
    type Response = tonic::Response<HealthCheckResponse>;
    type Error = Status;
    type Future = Ready<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<HealthCheckRequest>) -> Self::Future {
        self.0.health_checks.fetch_add(1, Ordering::SeqCst);
        let service = req.into_inner().service;
        if !(service.is_empty() || service == "test.Echo") {
            return ready(Err(Status::not_found(format!("unknown service {service}"))));
        }
        let status = if self.0.not_serving.load(Ordering::SeqCst) {
            NOT_SERVING
        } else {
            SERVING
        };
        ready(Ok(tonic::Response::new(HealthCheckResponse { status })))
    }
}

/// The response for a path no method answers, as tonic-build generates it.
fn unimplemented() -> http::Response<Body> {
    let mut resp = http::Response::new(Body::default());
    resp.headers_mut()
        .insert("grpc-status", (Code::Unimplemented as i32).into());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// The `test.Echo` service.
#[derive(Clone)]
struct EchoServer(Arc<Seen>);

impl NamedService for EchoServer {
    const NAME: &'static str = "test.Echo";
}

impl Service<http::Request<Body>> for EchoServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let seen = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<SayReply, SayRequest>::default());
            let resp = match req.uri().path() {
                SAY => grpc.unary(SaySvc(seen), req).await,
                FAIL => grpc.unary(FailSvc(seen), req).await,
                SAY_MANY => {
                    let svc = SayManySvc {
                        seen,
                        fail_after: false,
                    };
                    grpc.server_streaming(svc, req).await
                }
                SAY_MANY_THEN_FAIL => {
                    let svc = SayManySvc {
                        seen,
                        fail_after: true,
                    };
                    grpc.server_streaming(svc, req).await
                }
                SAY_GATED => grpc.server_streaming(SayGatedSvc(seen), req).await,
                SAY_ALL => grpc.client_streaming(SayAllSvc(seen), req).await,
                _ => unimplemented(),
            };
            Ok(resp)
        })
    }
}

/// The `grpc.health.v1.Health` service (Check only).
#[derive(Clone)]
struct HealthServer(Arc<Seen>);

impl NamedService for HealthServer {
    const NAME: &'static str = "grpc.health.v1.Health";
}

impl Service<http::Request<Body>> for HealthServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let seen = self.0.clone();
        Box::pin(async move {
            let resp = if req.uri().path() == HEALTH_CHECK {
                let codec = ProstCodec::<HealthCheckResponse, HealthCheckRequest>::default();
                tonic::server::Grpc::new(codec)
                    .unary(CheckSvc(seen), req)
                    .await
            } else {
                unimplemented()
            };
            Ok(resp)
        })
    }
}

/// A running gRPC server on 127.0.0.1 (h2c); stopped when dropped.
struct GrpcServer {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn grpc_server() -> GrpcServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let router = tonic::transport::Server::builder()
        .add_service(EchoServer(seen.clone()))
        .add_service(HealthServer(seen.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
    });
    GrpcServer { addr, seen, task }
}

// ---------------------------------------------------------------------------------------------
// The proxy and the client.

/// A proxy of `server` with gRPC health checks: only the one at start (which decides at once),
/// with all the time it needs, since these tests need the server in and nothing else of the
/// checks. Every test here runs on one thread, proxy, server and client alike: on a loaded
/// machine a check with a short timeout could time out and take the server out.
async fn proxy_for(server: &GrpcServer) -> Proxy {
    proxy_checking(server, "interval = \"1h\"\ntimeout = \"10s\"\n").await
}

async fn proxy_checking(server: &GrpcServer, health: &str) -> Proxy {
    spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{}\"]\n[health]\nkind = \"grpc\"\n{health}",
        server.addr
    ))
    .await
}

/// A tonic client speaking HTTP/2 prior knowledge to the proxy; every call is bounded.
async fn client(proxy: &Proxy) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the proxy");
    tonic::client::Grpc::new(channel)
}

fn request(text: &str, count: u32, request_id: &str) -> tonic::Request<SayRequest> {
    let mut req = tonic::Request::new(SayRequest {
        text: text.to_owned(),
        count,
    });
    req.metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    req
}

async fn say(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    req: tonic::Request<SayRequest>,
) -> Result<tonic::Response<SayReply>, Status> {
    grpc.ready().await.expect("channel ready");
    grpc.unary(
        req,
        PathAndQuery::from_static(path),
        ProstCodec::<SayRequest, SayReply>::default(),
    )
    .await
}

async fn say_many(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    req: tonic::Request<SayRequest>,
) -> Result<tonic::Response<Streaming<SayReply>>, Status> {
    grpc.ready().await.expect("channel ready");
    grpc.server_streaming(
        req,
        PathAndQuery::from_static(path),
        ProstCodec::<SayRequest, SayReply>::default(),
    )
    .await
}

/// A client-streaming call sending what comes from `messages` until it is dropped.
async fn say_all(
    grpc: &mut tonic::client::Grpc<Channel>,
    messages: tokio::sync::mpsc::Receiver<SayRequest>,
) -> Result<tonic::Response<SayReply>, Status> {
    grpc.ready().await.expect("channel ready");
    let stream = tokio_stream::wrappers::ReceiverStream::new(messages);
    grpc.client_streaming(
        tonic::Request::new(stream),
        PathAndQuery::from_static(SAY_ALL),
        ProstCodec::<SayRequest, SayReply>::default(),
    )
    .await
}

fn meta<'a>(map: &'a tonic::metadata::MetadataMap, key: &str) -> Option<&'a str> {
    map.get(key).and_then(|v| v.to_str().ok())
}

/// Waits (bounded) until the proxy's first health check has reached the server, so that the
/// tests start from a checked, healthy upstream.
async fn wait_first_check(server: &GrpcServer) {
    let seen = server.seen.clone();
    assert!(
        wait_until(Duration::from_secs(5), || seen
            .health_checks
            .load(Ordering::SeqCst)
            > 0)
        .await,
        "the proxy never sent grpc.health.v1.Health/Check"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn unary_call_passes_through_with_metadata_both_ways() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    wait_first_check(&server).await;
    let mut grpc = client(&proxy).await;

    let resp = say(&mut grpc, SAY, request("hello", 0, "req-42"))
        .await
        .expect("unary call through the proxy");
    let meta_map = resp.metadata().clone();
    let reply = resp.into_inner();
    assert_eq!(reply.text, "echo: hello");
    assert_eq!(
        reply.request_id, "req-42",
        "x-request-id must reach the server"
    );
    assert_eq!(
        server.seen.request_ids.lock().unwrap().as_slice(),
        ["req-42"]
    );
    // Response headers and trailers both came back (tonic merges trailers into the metadata).
    assert_eq!(meta(&meta_map, "x-served-by"), Some("grpc-test"));
    assert_eq!(
        meta(&meta_map, "grpc-status"),
        Some("0"),
        "the OK status travels in the trailers: {meta_map:?}"
    );
    assert_eq!(server.seen.calls(), 1);

    // The connection is reused for a second call.
    let reply = say(&mut grpc, SAY, request("again", 0, "req-43"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.request_id, "req-43");
    assert_eq!(server.seen.calls(), 2);
}

#[tokio::test]
async fn server_streaming_delivers_every_message_in_order_then_ok() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    wait_first_check(&server).await;
    let mut grpc = client(&proxy).await;

    const N: u32 = 50;
    let resp = say_many(&mut grpc, SAY_MANY, request("tick", N, "stream-1"))
        .await
        .expect("streaming call through the proxy");
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    while let Some(reply) = stream.message().await.expect("stream ends OK") {
        got.push(reply);
    }
    assert_eq!(got.len(), N as usize);
    for (i, reply) in got.iter().enumerate() {
        assert_eq!(reply.index, i as u32);
        assert_eq!(reply.text, format!("tick #{i}"));
        assert_eq!(reply.request_id, "stream-1");
    }
    let trailers = stream
        .trailers()
        .await
        .expect("trailers readable")
        .expect("the stream ends with trailers, not a bare end of stream");
    assert_eq!(meta(&trailers, "grpc-status"), Some("0"), "{trailers:?}");
    assert_eq!(server.seen.calls(), 1);
}

#[tokio::test]
async fn server_streaming_is_not_held_back_by_the_proxy() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    wait_first_check(&server).await;
    let mut grpc = client(&proxy).await;

    let mut stream = say_many(&mut grpc, SAY_GATED, request("live", 3, "gated-1"))
        .await
        .expect("the stream starts before the server has finished")
        .into_inner();
    // The server holds replies 1 and 2 until reply 0 has reached the client: a proxy that
    // buffered the response would never deliver it.
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("reply 0 arrives while the server is still streaming")
        .unwrap()
        .expect("a reply");
    assert_eq!(first.index, 0);
    server.seen.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(reply) = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("bounded")
        .expect("stream ends OK")
    {
        rest.push(reply.index);
    }
    assert_eq!(rest, [1, 2]);
}

#[tokio::test]
async fn server_error_statuses_reach_the_client_intact() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    wait_first_check(&server).await;
    let mut grpc = client(&proxy).await;

    // A unary error: tonic answers trailers-only (the status in the response headers).
    let err = say(&mut grpc, FAIL, request("bonjour", 0, "err-1"))
        .await
        .expect_err("the handler returns NOT_FOUND");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such greeting: bonjour — 100% gone");
    assert_eq!(
        meta(err.metadata(), "x-error-detail"),
        Some("looked-everywhere"),
        "{err:?}"
    );

    // An error after streamed messages: the status is in real HTTP/2 trailers.
    let mut stream = say_many(&mut grpc, SAY_MANY_THEN_FAIL, request("t", 3, "err-2"))
        .await
        .expect("the stream starts")
        .into_inner();
    for i in 0..3 {
        let reply = stream.message().await.unwrap().expect("a reply");
        assert_eq!(reply.index, i);
    }
    let err = stream
        .message()
        .await
        .expect_err("the stream ends with ABORTED in its trailers");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(err.message(), "stream gave up after the last reply");

    // A method the server does not have.
    let err = say(&mut grpc, "/test.Echo/Nope", request("x", 0, "err-3"))
        .await
        .expect_err("no such method");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

    assert_eq!(server.seen.calls(), 2);
}

#[tokio::test]
async fn maintenance_answers_unavailable_with_message_and_pushback() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    wait_first_check(&server).await;
    let mut grpc = client(&proxy).await;

    // The same client works before maintenance (and keeps its connection).
    say(&mut grpc, SAY, request("before", 0, "m-0"))
        .await
        .expect("normal mode forwards");
    assert_eq!(server.seen.calls(), 1);

    let message = "Upgrading the database — back at 10:00";
    let resp = ctl(
        &proxy,
        Ctl::On {
            message: Some(message.into()),
            until: None,
            retry_after: Some("30s".into()),
            reason: Some("grpc test".into()),
        },
    )
    .await;
    assert!(resp.ok, "{resp:?}");
    assert_eq!(proxy_mode(&proxy).await, "maintenance");

    let err = say(&mut grpc, SAY, request("during", 0, "m-1"))
        .await
        .expect_err("held in maintenance");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), message);
    assert_eq!(
        meta(err.metadata(), "grpc-retry-pushback-ms"),
        Some("30000"),
        "{err:?}"
    );
    // A call sent with a deadline (`grpc-timeout`) that ends before the 30 s pushback is told
    // not to retry, so that a retry policy reports this UNAVAILABLE now rather than wait out
    // the deadline.
    let mut timed = request("during", 0, "m-1b");
    timed.set_timeout(Duration::from_secs(5));
    let err = say(&mut grpc, SAY, timed)
        .await
        .expect_err("held in maintenance");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), message);
    assert_eq!(
        meta(err.metadata(), "grpc-retry-pushback-ms"),
        Some("-1"),
        "{err:?}"
    );
    assert_eq!(meta(err.metadata(), "retry-after"), Some("30"), "{err:?}");
    assert_eq!(
        meta(err.metadata(), "x-intermission-mode"),
        Some("maintenance")
    );

    // Streaming calls are held the same way.
    let err = say_many(&mut grpc, SAY_MANY, request("during", 5, "m-2"))
        .await
        .expect_err("held in maintenance");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), message);

    assert_eq!(
        server.seen.calls(),
        1,
        "held calls must never reach the server"
    );

    // Off: the same client goes through again.
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let reply = say(&mut grpc, SAY, request("after", 0, "m-3"))
        .await
        .expect("forwarded again after off")
        .into_inner();
    assert_eq!(reply.request_id, "m-3");
    assert_eq!(server.seen.calls(), 2);
}

/// A server without the standard Health service answers the check `UNIMPLEMENTED`: the
/// operator is told that, not a bare "grpc-status 12".
#[tokio::test]
async fn a_server_without_the_health_service_is_said_so() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let router = tonic::transport::Server::builder().add_service(EchoServer(seen));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
    });
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{addr}\"]\n[health]\nkind = \"grpc\"\n\
         interval = \"1h\"\ntimeout = \"10s\"\n"
    ))
    .await;
    wait_mode(&proxy, "outage", Duration::from_secs(10)).await;
    let health = ctl(&proxy, Ctl::Health).await;
    let last_error = health.health.unwrap()[0].last_error.clone();
    assert!(
        last_error.as_deref().is_some_and(|e| e.contains(
            "grpc-status 12 (UNIMPLEMENTED): the server has no grpc.health.v1.Health service"
        )),
        "{last_error:?}"
    );
    task.abort();
}

#[tokio::test]
async fn grpc_health_check_drives_outage_and_recovery() {
    let server = grpc_server().await;
    // Checks every second, with the default timeout, and two failures to take the server out:
    // one check that is merely slow on a loaded machine does not.
    let proxy = proxy_checking(
        &server,
        "interval = \"1s\"\ntimeout = \"1s\"\nrise = 1\nfall = 2\n",
    )
    .await;
    wait_first_check(&server).await;
    wait_mode(&proxy, "normal", Duration::from_secs(10)).await;
    let mut grpc = client(&proxy).await;
    say(&mut grpc, SAY, request("up", 0, "h-0"))
        .await
        .expect("healthy upstream forwards");

    // The server says NOT_SERVING: the proxy declares an outage by itself.
    server.seen.not_serving.store(true, Ordering::SeqCst);
    wait_mode(&proxy, "outage", Duration::from_secs(10)).await;
    let health = ctl(&proxy, Ctl::Health).await;
    let last_error = health.health.unwrap()[0].last_error.clone();
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.contains("not SERVING")),
        "the health error should say why: {last_error:?}"
    );

    let calls = server.seen.calls();
    let err = say(&mut grpc, SAY, request("down", 0, "h-1"))
        .await
        .expect_err("held in outage");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(!err.message().is_empty(), "the outage message: {err:?}");
    assert_eq!(meta(err.metadata(), "x-intermission-mode"), Some("outage"));
    assert!(
        meta(err.metadata(), "grpc-retry-pushback-ms").is_some_and(|v| v.parse::<u64>().is_ok()),
        "{err:?}"
    );
    assert_eq!(
        server.seen.calls(),
        calls,
        "held calls never reach the server"
    );

    // SERVING again: back to normal with nobody's help, and calls succeed.
    server.seen.not_serving.store(false, Ordering::SeqCst);
    wait_mode(&proxy, "normal", Duration::from_secs(10)).await;
    let reply = say(&mut grpc, SAY, request("back", 0, "h-2"))
        .await
        .expect("forwarded again after recovery")
        .into_inner();
    assert_eq!(reply.text, "echo: back");
    assert_eq!(server.seen.calls(), calls + 1);
}

#[tokio::test]
async fn held_grpc_answer_is_http_200_trailers_only() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    let message = "100% déjà vu\nline two";
    let resp = ctl(
        &proxy,
        Ctl::On {
            message: Some(message.into()),
            until: None,
            retry_after: Some("2m".into()),
            reason: None,
        },
    )
    .await;
    assert!(resp.ok, "{resp:?}");

    // One empty gRPC frame, as a client with an empty message would send it.
    let req = http::Request::post(proxy.url(SAY))
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc+proto")
        .header("te", "trailers")
        .body(full(vec![0u8, 0, 0, 0, 0]))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), h2c_client().request(req))
        .await
        .expect("bounded")
        .expect("an answer");
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let h = resp.headers().clone();
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(get("grpc-status").as_deref(), Some("14"), "{h:?}");
    assert_eq!(
        get("grpc-message").as_deref(),
        Some("100%25 d%C3%A9j%C3%A0 vu%0Aline two"),
        "{h:?}"
    );
    assert_eq!(get("grpc-retry-pushback-ms").as_deref(), Some("120000"));
    assert_eq!(get("retry-after").as_deref(), Some("120"));
    assert_eq!(get("cache-control").as_deref(), Some("no-store"));
    assert_eq!(get("x-intermission-mode").as_deref(), Some("maintenance"));
    assert!(
        get("content-type").is_some_and(|v| v.starts_with("application/grpc")),
        "{h:?}"
    );
    use http_body_util::BodyExt;
    let collected = resp.into_body().collect().await.unwrap();
    assert!(
        collected.trailers().is_none(),
        "trailers-only: no separate trailers"
    );
    assert!(collected.to_bytes().is_empty(), "trailers-only: no body");
    assert_eq!(server.seen.calls(), 0);
}

/// A client with a retry policy (grpc-core, grpc-go, grpc-java) waits out a pushback even past
/// its call's deadline: a 5 s call told to wait 120 s ended `DEADLINE_EXCEEDED` after 5 s,
/// the operator's message lost. A call whose deadline (`grpc-timeout`) ends first is asked not
/// to retry (`-1`, gRFC A6) and reports `UNAVAILABLE` at once; one with a longer deadline, or
/// none, keeps the pushback.
#[tokio::test]
async fn a_call_whose_deadline_ends_before_the_pushback_is_told_not_to_retry() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    let on = Ctl::On {
        message: Some("Upgrading".into()),
        until: None,
        retry_after: Some("2m".into()),
        reason: None,
    };
    assert!(ctl(&proxy, on).await.ok);

    let pushback = |timeout: Option<&'static str>, content_type: &'static str| {
        let req = empty_call(proxy.url(SAY), http::Version::HTTP_2, content_type, timeout);
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(5), h2c_client().request(req))
                .await
                .expect("bounded")
                .expect("an answer");
            let h = resp.headers();
            assert_eq!(h.get("grpc-status").unwrap(), "14", "{h:?}");
            assert_eq!(h.get("retry-after").unwrap(), "120", "{h:?}");
            h.get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }
    };
    for (timeout, want) in [
        (Some("5S"), "-1"),
        (Some("120S"), "-1"),
        (Some("119999m"), "-1"),
        (Some("120001m"), "120000"),
        (Some("2M"), "-1"),
        (Some("121S"), "120000"),
        (Some("1H"), "120000"),
        (None, "120000"),
        (Some("soon"), "120000"),
    ] {
        for content_type in ["application/grpc", "application/grpc-web+proto"] {
            assert_eq!(
                pushback(timeout, content_type).await.as_deref(),
                Some(want),
                "grpc-timeout {timeout:?}, {content_type}"
            );
        }
    }
    assert_eq!(server.seen.calls(), 0);
}

/// gRPC-Web's answer is typed as its call was on every path: a `GET` is answered without
/// hyper (`fast`), from what was encoded at the last change, which knew no call's type.
#[tokio::test]
async fn a_grpc_web_call_answered_without_hyper_is_typed_as_it_was_sent() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    assert!(
        ctl(
            &proxy,
            Ctl::On {
                message: Some("Upgrading".into()),
                until: None,
                retry_after: None,
                reason: None,
            }
        )
        .await
        .ok
    );
    let request = "GET /pkg.Svc/M HTTP/1.1\r\nHost: x\r\n\
                   Content-Type: application/grpc-web-text\r\ngrpc-timeout: 1S\r\n\
                   Connection: close\r\n\r\n";
    let answer = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await;
    let head = answer.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{answer}");
    assert!(
        head.contains("\r\ncontent-type: application/grpc-web-text\r\n"),
        "{answer}"
    );
    assert!(head.contains("\r\ngrpc-status: 14\r\n"), "{answer}");
    assert!(
        head.contains("\r\ngrpc-retry-pushback-ms: -1\r\n"),
        "{answer}"
    );
}

/// What `h2c_server` saw: the streams it got, and its connections that ended.
#[derive(Clone, Default)]
struct H2cSeen {
    streams: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
}

/// An `h2c://` server that answers `200` "served"; with `refuse_first`, it refuses the first
/// stream it gets unprocessed (`RST_STREAM` with `REFUSED_STREAM`, as a server going away
/// refuses what races its `GOAWAY`).
async fn h2c_server(refuse_first: bool) -> (SocketAddr, H2cSeen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = H2cSeen::default();
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counts = counts.clone();
            tokio::spawn(async move {
                // A TCP health check's connection ends here, uncounted.
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    if counts.streams.fetch_add(1, Ordering::SeqCst) == 0 && refuse_first {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    if let Ok(mut send) = respond.send_response(http::Response::new(()), false) {
                        let _ = send.send_data(bytes::Bytes::from_static(b"served"), true);
                    }
                }
                counts.ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

/// A proxy with `addr` as its one `h2c://` server, checked over TCP alone, so that every
/// stream the server gets is a forwarded request, and found healthy.
async fn proxy_to_h2c(addr: SocketAddr) -> Proxy {
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{addr}\"]\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let checked = wait_until_async(|| async {
        let health = ctl(&proxy, Ctl::Health).await.health.unwrap();
        health[0].healthy == Some(true)
    });
    assert!(checked.await, "the server was never found healthy");
    proxy
}

/// An `h2c://` server on 127.0.0.1 that hands each stream it gets to `each`.
async fn h2c_streams(
    each: impl Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>)
        + Clone
        + Send
        + 'static,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let each = each.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    each(req, respond);
                }
            });
        }
    });
    addr
}

/// A stream an `h2c://` server refused unprocessed (RFC 9113 §8.7) is sent again on a new
/// connection, as to an `https://` server, rather than answered as an outage.
#[tokio::test]
async fn a_request_an_h2c_upstream_refuses_unprocessed_is_sent_again() {
    let (addr, seen) = h2c_server(true).await;
    let proxy = proxy_to_h2c(addr).await;
    let resp = get(&proxy.url("/x")).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    assert_eq!(resp.body(), "served");
    assert_eq!(seen.streams.load(Ordering::SeqCst), 2);
}

/// A kept HTTP/2 connection that no request used for `upstream.idle_timeout` is closed by the
/// proxy, as HTTP/1.1 ones are, rather than held until the server closes it.
#[tokio::test]
async fn an_idle_h2c_connection_is_closed_after_idle_timeout() {
    let (addr, seen) = h2c_server(false).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{addr}\"]\nidle_timeout = \"300ms\"\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let resp = get(&proxy.url("/x")).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.body());
    assert_eq!(seen.ended.load(Ordering::SeqCst), 0);
    let closed = wait_until(Duration::from_secs(10), || {
        seen.ended.load(Ordering::SeqCst) == 1
    });
    assert!(closed.await, "the idle connection was never closed");
}

/// An `h2c://` server that lets each connection carry `streams` at once, as nginx, Apache or
/// Go cap theirs (`SETTINGS_MAX_CONCURRENT_STREAMS`). `/held` is answered with its head and
/// `first,` at once and `last` once `release` gives it a permit, as a server-sent event
/// stream or a slow download keeps its stream; anything else `served`. `connections` counts
/// the HTTP/2 connections it got. The first `/refused` is refused unprocessed
/// (`REFUSED_STREAM`), as a server going away refuses what crosses its `GOAWAY`.
async fn capped_h2c_server(
    streams: u32,
    release: Arc<tokio::sync::Semaphore>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let refuse = Arc::new(AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (counted, release, refuse) = (counted.clone(), release.clone(), refuse.clone());
            tokio::spawn(async move {
                let handshake = h2::server::Builder::new()
                    .max_concurrent_streams(streams)
                    .handshake(tcp);
                // A TCP health check's connection ends here, uncounted.
                let Ok(mut conn) = handshake.await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if req.uri().path() == "/refused" && refuse.swap(false, Ordering::SeqCst) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let held = req.uri().path() == "/held";
                    let Ok(mut send) = respond.send_response(http::Response::new(()), false) else {
                        continue;
                    };
                    if !held {
                        let _ = send.send_data(bytes::Bytes::from_static(b"served"), true);
                        continue;
                    }
                    let _ = send.send_data(bytes::Bytes::from_static(b"first,"), false);
                    let release = release.clone();
                    tokio::spawn(async move {
                        if let Ok(permit) = release.acquire().await {
                            permit.forget();
                        }
                        let _ = send.send_data(bytes::Bytes::from_static(b"last"), true);
                    });
                }
            });
        }
    });
    (addr, connections)
}

/// A proxy with one worker, so that every request shares its connections, to the
/// `capped_h2c_server` at `addr`; the short `response_timeout` only makes a failure come
/// sooner.
async fn proxy_to_capped(addr: SocketAddr) -> Proxy {
    spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"h2c://{addr}\"]\n\
         response_timeout = \"5s\"\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await
}

/// Lets the `held` answers end, and reads each to its end.
async fn end_held(
    held: Vec<http::Response<hyper::body::Incoming>>,
    release: &tokio::sync::Semaphore,
) {
    release.add_permits(held.len());
    for resp in held {
        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
        assert_eq!(body.unwrap().to_bytes().as_ref(), b"last");
    }
}

/// Two `/held` answers through `proxy`, once their heads and first bytes have come (so the
/// server's streams are taken, and the proxy has read its `SETTINGS`, sent before them).
async fn two_held(proxy: &Proxy) -> Vec<http::Response<hyper::body::Incoming>> {
    let mut held = Vec::new();
    for _ in 0..2 {
        let req = http::Request::get(proxy.url("/held"))
            .body(empty())
            .unwrap();
        let mut resp = support::client().request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let first = http_body_util::BodyExt::frame(resp.body_mut()).await;
        let first = first.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.as_ref(), b"first,");
        held.push(resp);
    }
    held
}

/// A server lets an HTTP/2 connection carry only so many streams at once: with all of them
/// held by long answers (server-sent events, slow downloads, gRPC streams), a request goes on
/// another connection at once, rather than waiting in h2 for a stream to end and getting the
/// outage answer after `response_timeout` from a healthy server. A stream whose answer has
/// ended is free again: later requests go on the connections already open.
#[tokio::test]
async fn a_request_finding_every_stream_of_an_h2c_connection_held_goes_on_another() {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (addr, connections) = capped_h2c_server(2, release.clone()).await;
    let proxy = proxy_to_capped(addr).await;

    let held = two_held(&proxy).await;
    // Answered while both streams of the first connection are still held.
    let resp = get(&proxy.url("/quick")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(resp.body(), "served");
    assert_eq!(connections.load(Ordering::SeqCst), 2);

    end_held(held, &release).await;
    // Their streams are free again: two more held ones take the first connection's, and a
    // request beside them the second's, with no third connection.
    let held = two_held(&proxy).await;
    let resp = get(&proxy.url("/quick")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    release.add_permits(2);
    drop(held);
}

/// A `GET` on a kept HTTP/2 connection that its server closes under it without a `GOAWAY`
/// (its process restarted, or a balancer or NAT between forgot the connection and reset it)
/// is sent again once on a new connection, as over HTTP/1.1, rather than answered with the
/// outage response from a healthy server. A `POST` is not: the server may have acted on it.
#[tokio::test]
async fn a_get_on_a_kept_h2c_connection_closed_under_it_is_sent_again() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let counted = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                // The second stream of each connection ends it, unanswered and unannounced.
                let mut on_this = 0;
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    on_this += 1;
                    if on_this == 2 {
                        return;
                    }
                    if let Ok(mut send) = respond.send_response(http::Response::new(()), false) {
                        let _ = send.send_data(bytes::Bytes::from_static(b"served"), true);
                    }
                }
            });
        }
    });
    // One worker, whose connection both requests share.
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"h2c://{addr}\"]\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let resp = get(&proxy.url("/first")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    let resp = get(&proxy.url("/again")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(resp.body(), "served");
    assert_eq!(streams.load(Ordering::SeqCst), 3);
    // The new connection's second stream: a `POST`, not sent again.
    let post = http::Request::post(proxy.url("/form"))
        .body(full("a=b"))
        .unwrap();
    let resp = send(post).await;
    assert_eq!(resp.status(), 503, "{resp:?}");
    assert_eq!(streams.load(Ordering::SeqCst), 4);
}

/// An `h2c` server whose first HTTP/2 connection answers `answered` streams, then none (its
/// handler hung, or a NAT between that dropped the connection without a reset), while later
/// connections answer `served`; each connection's `SETTINGS` come `late`. Counts the HTTP/2
/// connections (the health check's, which speaks none, is not counted).
async fn an_h2c_server_whose_first_connection_hangs(
    late: Duration,
    answered: usize,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                tokio::time::sleep(late).await;
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
                let mut served = 0;
                let mut unanswered = Vec::new();
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    if first && served == answered {
                        unanswered.push(respond);
                        continue;
                    }
                    served += 1;
                    if let Ok(mut send) = respond.send_response(http::Response::new(()), false) {
                        let _ = send.send_data(bytes::Bytes::from_static(b"served"), true);
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// A proxy with one worker in front of `addr`, and a `response_timeout` of a second.
async fn one_second_to_answer(addr: SocketAddr) -> Proxy {
    spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"h2c://{addr}\"]\n\
         response_timeout = \"1s\"\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await
}

/// Three requests after a timed-out one are answered, on the one connection opened after it.
async fn served_after(proxy: &Proxy, connections: &AtomicUsize) {
    for _ in 0..3 {
        let resp = get(&proxy.url("/after")).await;
        assert_eq!(resp.status(), 200, "{resp:?}");
        assert_eq!(resp.body(), "served");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

/// An HTTP/2 connection whose server stops answering on it while the server answers on new
/// ones is let go once a request on it has waited `response_timeout`: the next request goes
/// on a new connection. It stayed the oldest with a stream free, and every later request
/// waited `response_timeout` there for the outage answer, for as long as the proxy ran, with
/// the server's checks passing.
#[tokio::test]
async fn an_h2c_connection_that_stops_answering_is_let_go() {
    let (addr, connections) = an_h2c_server_whose_first_connection_hangs(Duration::ZERO, 1).await;
    let proxy = one_second_to_answer(addr).await;
    let resp = get(&proxy.url("/answered")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    let resp = get(&proxy.url("/hangs")).await;
    assert_eq!(resp.status(), 503, "{resp:?}");
    served_after(&proxy, &connections).await;
}

/// So is a connection the request that timed out had to open first: its deadline counted the
/// dial and the wait for the server's `SETTINGS` (200 ms here), and the connection was kept
/// when the time since the stream was taken fell short of `response_timeout`.
#[tokio::test]
async fn an_h2c_connection_dialed_by_the_request_that_timed_out_is_let_go() {
    let late = Duration::from_millis(200);
    let (addr, connections) = an_h2c_server_whose_first_connection_hangs(late, 0).await;
    let proxy = one_second_to_answer(addr).await;
    let resp = get(&proxy.url("/hangs")).await;
    assert_eq!(resp.status(), 503, "{resp:?}");
    served_after(&proxy, &connections).await;
}

/// An `h2c://` server that allows one stream at a time per connection, and answers each
/// 200 ms after it came. Its first HTTP/2 connection's `SETTINGS` come 200 ms after that
/// connection's first request has (a burst meets them unread, as it does by chance on a busy
/// machine), and `opened` is set then. Counts the connections, a health check's included.
async fn one_stream_at_a_time() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicBool::new(false));
    let (counted, told) = (connections.clone(), opened.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (counted, told) = (counted.clone(), told.clone());
            tokio::spawn(async move {
                counted.fetch_add(1, Ordering::SeqCst);
                if !told.load(Ordering::SeqCst) && first_request_came(&tcp).await {
                    told.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let handshake = h2::server::Builder::new()
                    .max_concurrent_streams(1)
                    .handshake(tcp);
                let Ok(mut conn) = handshake.await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if let Ok(mut send) = respond.send_response(http::Response::new(()), false)
                        {
                            let _ = send.send_data(bytes::Bytes::from_static(b"served"), true);
                        }
                    });
                }
            });
        }
    });
    (addr, connections, opened)
}

/// Whether a request's `HEADERS` come on `tcp` (within two seconds), seen without reading
/// them: `false` for a health check's connection, which ends with nothing sent.
async fn first_request_came(tcp: &tokio::net::TcpStream) -> bool {
    let mut buf = vec![0; 16 * 1024];
    for _ in 0..400 {
        let Ok(n) = tcp.peek(&mut buf).await else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let mut at = 24;
        while let Some(head) = buf[..n].get(at..at + 9) {
            if head[3] == 1 {
                return true;
            }
            at += 9 + payload_length(head);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// A proxy with one worker in front of `one_stream_at_a_time` at `addr`, once its check's
/// connection has come and gone (it is not counted).
async fn proxy_to_one_stream(addr: SocketAddr, connections: &AtomicUsize) -> Proxy {
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"h2c://{addr}\"]\n\
         response_timeout = \"3s\"\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let checked = wait_until(Duration::from_secs(10), || {
        connections.load(Ordering::SeqCst) == 1
    });
    assert!(checked.await, "the server was never checked");
    connections.store(0, Ordering::SeqCst);
    proxy
}

/// `count` requests made by `made` through `proxy` at once: each must be answered.
async fn all_served(count: usize, made: impl Fn() -> http::Request<TestBody>) {
    let calls: Vec<_> = (0..count).map(|_| tokio::spawn(send(made()))).collect();
    let mut failed = Vec::new();
    for call in calls {
        let resp = call.await.unwrap();
        if resp.status() != 200 {
            failed.push(resp);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {count} failed: {:?}",
        failed.len(),
        failed.first()
    );
}

/// A burst of requests to a server that allows one stream at a time per connection, met
/// with no connection open: each gets its answer. The requests that waited for the first
/// connection's dial went on it while hyper still took the server to allow 100 streams, its
/// `SETTINGS` not read yet, and waited in h2 for its one stream in turn: those past
/// `response_timeout` got the outage answer from a healthy server (76 of 500 requests from
/// 50 clients).
#[tokio::test]
async fn a_burst_does_not_queue_on_a_new_connection_beyond_what_its_server_allows() {
    let (addr, connections, _) = one_stream_at_a_time().await;
    let proxy = proxy_to_one_stream(addr, &connections).await;
    all_served(30, || {
        http::Request::get(proxy.url("/x")).body(empty()).unwrap()
    })
    .await;
}

/// So does a burst that comes after the request that opened the connection went on it
/// (that one does not wait for the server's `SETTINGS`), while they are still to come: the
/// connection takes no other request until they have. Put on it, the burst's streams beyond
/// the one the server allows are refused unprocessed (`REFUSED_STREAM`, as h2's, Go's and
/// nginx's servers refuse streams past their limit), and uploads streamed through, which
/// cannot be sent again, get the outage answer.
#[tokio::test]
async fn a_burst_behind_the_request_that_opened_a_connection_waits_for_its_settings() {
    let (addr, connections, opened) = one_stream_at_a_time().await;
    let proxy = proxy_to_one_stream(addr, &connections).await;
    let url = proxy.url("/first");
    let first = tokio::spawn(async move { get(&url).await });
    let came = wait_until(Duration::from_secs(10), || opened.load(Ordering::SeqCst));
    assert!(came.await, "the first request never came");
    all_served(30, || {
        let (tx, body) = mpsc_body();
        let _ = tx.try_send(bytes::Bytes::from_static(b"streamed"));
        http::Request::post(proxy.url("/upload"))
            .body(body)
            .unwrap()
    })
    .await;
    assert_eq!(first.await.unwrap().status(), 200);
}

/// The length of the payload of the HTTP/2 frame whose header begins `head`.
fn payload_length(head: &[u8]) -> usize {
    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2])
}

/// An `h2c://` server's side of one connection, read frame by frame with no HTTP/2 library,
/// so that a test decides when each frame goes.
struct RawH2 {
    tcp: tokio::net::TcpStream,
    got: Vec<u8>,
    /// Where the next frame begins in `got`: past the client preface's 24 bytes.
    at: usize,
}

impl RawH2 {
    fn new(tcp: tokio::net::TcpStream) -> RawH2 {
        RawH2 {
            tcp,
            got: Vec::new(),
            at: 24,
        }
    }

    /// The next frame's type, flags and stream, or `None` at the connection's end.
    async fn frame(&mut self) -> Option<(u8, u8, [u8; 4])> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(head) = self.got.get(self.at..self.at + 9) {
                let len = payload_length(head);
                if self.got.len() >= self.at + 9 + len {
                    let frame = (head[3], head[4], [head[5], head[6], head[7], head[8]]);
                    self.at += 9 + len;
                    return Some(frame);
                }
            }
            let mut buf = [0; 4096];
            match self.tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The stream of the next request whose end (`END_STREAM`) has come.
    async fn request(&mut self) -> Option<[u8; 4]> {
        loop {
            let (kind, flags, stream) = self.frame().await?;
            // HEADERS or DATA, ending the stream.
            if kind <= 1 && flags & 1 == 1 {
                return Some(stream);
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        self.tcp.write_all(bytes).await.is_ok()
    }

    /// `SETTINGS` (none changed) and the `ACK` of the client's.
    async fn settings(&mut self) -> bool {
        self.write(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0])
            .await
    }

    /// `:status: 200` (HPACK's static entry 8) on `stream`, ending it.
    async fn ok(&mut self, stream: [u8; 4]) -> bool {
        let mut frame = vec![0, 0, 1, 1, 5];
        frame.extend_from_slice(&stream);
        frame.push(0x88);
        self.write(&frame).await
    }

    /// Reads on to the connection's end, at most `limit`.
    async fn drain(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async { while self.frame().await.is_some() {} }).await;
    }
}

/// An `h2c://` server that writes its connection preface (`SETTINGS`) only once the client's
/// first request has come (or after three seconds), then answers it `200`: on a network with
/// any delay, a server's `SETTINGS` reach the client a round trip after its connect. Says for
/// each HTTP/2 connection whether a request came before its `SETTINGS` were sent.
async fn settings_after_the_first_request() -> (SocketAddr, Arc<Mutex<Vec<bool>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let said = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let said = said.clone();
            tokio::spawn(async move {
                let mut conn = RawH2::new(tcp);
                let headers = async {
                    loop {
                        match conn.frame().await? {
                            (1, _, stream) => return Some(stream),
                            _ => continue,
                        }
                    }
                };
                let stream = match tokio::time::timeout(Duration::from_secs(3), headers).await {
                    // A TCP health check's connection, which speaks no HTTP/2.
                    Ok(None) => return,
                    Ok(Some(stream)) => Some(stream),
                    Err(_) => None,
                };
                said.lock().unwrap().push(stream.is_some());
                if !conn.settings().await {
                    return;
                }
                let stream = match stream {
                    Some(stream) => Some(stream),
                    None => conn.request().await,
                };
                if let Some(stream) = stream {
                    if conn.ok(stream).await {
                        conn.drain(Duration::from_secs(5)).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The request that opens an HTTP/2 connection goes right behind the client preface, as h2
/// clients send theirs, without waiting for the server's `SETTINGS`: only the requests
/// behind it wait for them, to learn how many streams the server allows. It waited too, a
/// round trip more for every new connection's first request.
#[tokio::test]
async fn the_request_that_opens_an_http2_connection_does_not_wait_for_settings() {
    let (addr, seen) = settings_after_the_first_request().await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{addr}\"]\nconnect_timeout = \"5s\"\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let resp = get(&proxy.url("/first")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(*seen.lock().unwrap(), [true]);
}

/// An `h2c://` server whose first HTTP/2 connection, once `requests` have come on it (or two
/// seconds passed), answers the first and goes away (`GOAWAY`, `NO_ERROR`) naming it the
/// last it processed, as a server restarting gracefully leaves the requests racing its
/// `GOAWAY` unprocessed (RFC 9113 §6.8); later connections answer every request. Counts the
/// requests each connection got.
async fn going_away_below_its_streams(requests: usize) -> (SocketAddr, Arc<Mutex<Vec<usize>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let said = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let said = said.clone();
            tokio::spawn(async move {
                let mut conn = RawH2::new(tcp);
                // A TCP health check's connection ends before any frame, uncounted.
                if conn.frame().await.is_none() || !conn.settings().await {
                    return;
                }
                let first = {
                    let mut said = said.lock().unwrap();
                    said.push(0);
                    said.len() == 1
                };
                let count = |said: &Mutex<Vec<usize>>| {
                    if let Some(n) = said.lock().unwrap().last_mut() {
                        *n += 1;
                    }
                };
                if !first {
                    while let Some(stream) = conn.request().await {
                        count(&said);
                        if !conn.ok(stream).await {
                            return;
                        }
                    }
                    return;
                }
                let mut streams = Vec::new();
                let all = async {
                    while streams.len() < requests {
                        let Some(stream) = conn.request().await else {
                            break;
                        };
                        count(&said);
                        streams.push(stream);
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), all).await;
                let Some(&lowest) = streams.iter().min_by_key(|s| u32::from_be_bytes(**s)) else {
                    return;
                };
                let mut away = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                away.extend_from_slice(&lowest);
                away.extend_from_slice(&[0, 0, 0, 0]);
                if conn.ok(lowest).await && conn.write(&away).await {
                    conn.drain(Duration::from_secs(5)).await;
                }
            });
        }
    });
    (addr, seen)
}

/// Requests on an HTTP/2 connection above the last stream its server's `GOAWAY` says it
/// processed are sent again on a new connection, a `POST` too (its body held whole): the
/// server promises it never acted on them (RFC 9113 §6.8). They got the outage answer.
#[tokio::test]
async fn requests_above_a_goaway_are_sent_again_on_a_new_connection() {
    let (addr, seen) = going_away_below_its_streams(3).await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"h2c://{addr}\"]\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let requests = [
        http::Request::get(proxy.url("/a")).body(empty()).unwrap(),
        http::Request::get(proxy.url("/b")).body(empty()).unwrap(),
        http::Request::post(proxy.url("/form"))
            .body(full("a=b"))
            .unwrap(),
    ];
    let calls: Vec<_> = requests
        .into_iter()
        .map(|req| tokio::spawn(send(req)))
        .collect();
    for call in calls {
        let resp = call.await.unwrap();
        assert_eq!(resp.status(), 200, "{resp:?}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.first(), Some(&3), "{seen:?}");
    assert_eq!(seen.iter().sum::<usize>(), 5, "{seen:?}");
}

/// An upload to an `h2c://` server that takes none of it (its flow-control window kept shut,
/// as a server whose workers are all stuck leaves it) and sends no head gets the outage
/// answer once `response_timeout` has passed with nothing taken, as nginx's
/// `proxy_send_timeout` ends it. The wait for the head began only once the body had been
/// sent whole, so such an upload waited for ever, its client and both connections held.
#[tokio::test]
async fn an_upload_its_h2c_server_never_takes_is_not_waited_for_forever() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let counted = arrived.clone();
    let addr = h2c_streams(move |req, respond| {
        counted.fetch_add(1, Ordering::SeqCst);
        // Neither read (so its window stays shut) nor answered, for as long as the test runs.
        tokio::spawn(async move {
            let _kept = (req, respond);
            std::future::pending::<()>().await;
        });
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{addr}\"]\nresponse_timeout = \"1s\"\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    // Larger than the 64 KiB read whole before forwarding, and than the stream's window.
    let req = http::Request::post(proxy.url("/upload"))
        .body(full(vec![b'x'; 512 * 1024]))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), send(req)).await;
    let resp = resp.expect("no answer: the upload was waited for past response_timeout");
    assert_eq!(resp.status(), 503, "{resp:?}");
    assert_eq!(arrived.load(Ordering::SeqCst), 1);
}

/// A stream one connection refused says nothing of the others: the request goes on another,
/// and only the refusing connection is let go. Letting every connection older than it go
/// too made one server's graceful `GOAWAY` cost the worker all of them, each dialed again.
#[tokio::test]
async fn a_refusing_http2_connection_is_let_go_alone() {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (addr, connections) = capped_h2c_server(2, release.clone()).await;
    let proxy = proxy_to_capped(addr).await;
    // The first connection's streams held; a second connection opened for `/refused`,
    // which refuses it; sent again on a third.
    let held = two_held(&proxy).await;
    let resp = get(&proxy.url("/refused")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    end_held(held, &release).await;
    // The first connection is still kept: two held answers take its streams, and a request
    // beside them goes on the third, with no fourth dialed.
    let held = two_held(&proxy).await;
    let resp = get(&proxy.url("/quick")).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    release.add_permits(2);
    drop(held);
}

/// A gRPC answer that breaks off (its server reset the stream, or died) ends with
/// `grpc-status: 14` trailers rather than a reset stream: clients read a reset as `INTERNAL`,
/// which they do not retry, and `UNAVAILABLE` is what a proxy says of a server it lost. So
/// whatever the server's reset says: `PROTOCOL_ERROR` too, which reaches a non-gRPC client
/// as the proxy's `INTERNAL_ERROR` (`forwarding::an_h2_servers_broken_answer_is_not_blamed_on_the_client`).
#[tokio::test]
async fn a_grpc_answer_that_breaks_off_ends_unavailable() {
    let addr = h2c_streams(|req, mut respond| {
        let reason = match req.uri().path() {
            "/pkg.Service/Malformed" => h2::Reason::PROTOCOL_ERROR,
            _ => h2::Reason::INTERNAL_ERROR,
        };
        let head = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        if let Ok(mut send) = respond.send_response(head, false) {
            // One whole message, then, while the call streams, the server fails.
            let message = bytes::Bytes::from_static(b"\0\0\0\0\x02hi");
            let _ = send.send_data(message, false);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                send.send_reset(reason);
            });
        }
    })
    .await;
    let proxy = proxy_to_h2c(addr).await;
    for path in ["/pkg.Service/Stream", "/pkg.Service/Malformed"] {
        let resp = h2c_client()
            .request(grpc_call(&proxy.url(path)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            !resp.headers().contains_key("x-intermission-mode"),
            "the server's own answer, not the outage one: {resp:?}"
        );
        let body = tokio::time::timeout(
            Duration::from_secs(10),
            http_body_util::BodyExt::collect(resp.into_body()),
        )
        .await
        .expect("the answer never ended")
        .expect("the answer was reset, not ended with a status");
        let trailers = body.trailers().cloned().expect("no trailers");
        assert_eq!(body.to_bytes().as_ref(), b"\0\0\0\0\x02hi", "{path}");
        assert_eq!(trailers["grpc-status"], "14", "{path}");
        assert!(trailers.contains_key("grpc-message"), "{path}");
    }
}

/// A `HEAD`'s answer from an HTTP/2 server gets no `Content-Length` the server did not give:
/// hyper's client sizes such a body 0, which hyper's HTTP/2 server would have written as the
/// length, telling the client that a `GET`'s body is empty. A length the server gave stays.
#[tokio::test]
async fn a_head_answer_from_an_h2c_server_gets_no_length_it_did_not_give() {
    let addr = h2c_streams(|req, mut respond| {
        let mut resp = http::Response::new(());
        if req.uri().path() == "/sized" {
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, 42.into());
        }
        if let Ok(mut send) = respond.send_response(resp, false) {
            // The end of the stream comes apart from the head, as a server that ends it in an
            // empty DATA frame may send it.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = send.send_data(bytes::Bytes::new(), true);
            });
        }
    })
    .await;
    let proxy = proxy_to_h2c(addr).await;

    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    for (path, length) in [("/x", None), ("/sized", Some("42"))] {
        let req = http::Request::head(format!("http://{}{path}", proxy.addr))
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let got = resp.headers().get(http::header::CONTENT_LENGTH);
        assert_eq!(got.map(|v| v.to_str().unwrap()), length, "{path}: {resp:?}");
    }

    // Over HTTP/1.1 too.
    let head = raw_exchange(
        proxy.addr,
        b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
}

/// The outage answer to a gRPC call whose forward failed (its server reset the stream, or
/// sent no head within `response_timeout`) is paced by the call's deadline as a held call's
/// is: `-1` when what is left of the deadline ends before the pushback. With the pushback, a
/// client's retry policy waited it out past the deadline and ended `DEADLINE_EXCEEDED`, the
/// message lost.
#[tokio::test]
async fn a_failed_forward_tells_a_call_whose_deadline_ends_first_not_to_retry() {
    let addr = h2c_streams(|req, mut respond| {
        if req.uri().path() == "/health" {
            let _ = respond.send_response(http::Response::new(()), true);
        } else if req.uri().path() == "/pkg.Svc/Hang" {
            // No head, ever: the proxy's `response_timeout` ends the wait.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop((req, respond));
            });
        } else {
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    })
    .await;
    // Checked over HTTP, whose checks alone take a server out: the resets below, counted as
    // failed checks with `kind = "tcp"`, would turn every call after them into a held one.
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{addr}\"]\nresponse_timeout = \"1s\"\n\
         [health]\npath = \"/health\"\ninterval = \"1h\"\n\
         [maintenance]\noutage_retry_after = \"2s\"\n"
    ))
    .await;
    assert!(
        all_servers_healthy(&proxy).await,
        "the server was never found healthy"
    );

    let call = |path: &'static str, version, content_type, timeout: Option<&'static str>| {
        let req = empty_call(proxy.url(path), version, content_type, timeout);
        let client = match version {
            http::Version::HTTP_2 => h2c_client(),
            _ => support::client(),
        };
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .expect("bounded")
                .expect("an answer");
            let h = resp.headers();
            assert_eq!(
                h.get("grpc-status").unwrap(),
                "14",
                "{path} {timeout:?}: {h:?}"
            );
            assert_eq!(h.get("x-intermission-mode").unwrap(), "outage", "{h:?}");
            h.get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }
    };
    let h2 = http::Version::HTTP_2;
    let h1 = http::Version::HTTP_11;
    for (version, content_type) in [(h2, "application/grpc"), (h1, "application/grpc-web+proto")] {
        for (timeout, want) in [(Some("1S"), "-1"), (None, "2000"), (Some("10S"), "2000")] {
            assert_eq!(
                call("/pkg.Svc/Reset", version, content_type, timeout)
                    .await
                    .as_deref(),
                Some(want),
                "reset, {content_type}, grpc-timeout {timeout:?}"
            );
        }
    }
    // 2.5 s, of which the second the proxy waited for a head leaves less than the pushback.
    assert_eq!(
        call("/pkg.Svc/Hang", h2, "application/grpc", Some("2500m"))
            .await
            .as_deref(),
        Some("-1"),
        "what is left of the deadline counts"
    );
}

/// The same over the relay (an HTTP/1.1 gRPC-Web call to an `http://` server): what is left
/// of the call's deadline when the server's head did not come in `response_timeout` is what
/// the pushback is measured against.
#[tokio::test]
async fn a_grpc_web_call_the_relay_gave_up_on_is_paced_by_what_is_left_of_its_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Takes every connection and never answers on it (a health check's included).
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{addr}\"]\nresponse_timeout = \"1s\"\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n\
         [maintenance]\noutage_retry_after = \"2s\"\n"
    ))
    .await;
    let checked = wait_until_async(|| async {
        let health = ctl(&proxy, Ctl::Health).await.health.unwrap();
        health[0].healthy == Some(true)
    });
    assert!(checked.await, "the server was never found healthy");
    for (timeout, want) in [("2500m", "-1"), ("10S", "2000")] {
        let request = format!(
            "POST /pkg.Svc/M HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\n\
             grpc-timeout: {timeout}\r\nContent-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0"
        );
        let answer = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(10)).await;
        let head = answer.to_ascii_lowercase();
        assert!(head.contains("\r\ngrpc-status: 14\r\n"), "{answer}");
        assert!(
            head.contains(&format!("\r\ngrpc-retry-pushback-ms: {want}\r\n")),
            "grpc-timeout {timeout}: {answer}"
        );
    }
    server.abort();
}

/// A call whose first server refused its connection goes to the other: gRPC bodies stream
/// (no `Content-Length`), and were never sent again, so that each restart of one of two
/// servers cost every other call `UNAVAILABLE` until its checks took it out. Nothing of the
/// call had left: unary, server- and client-streaming calls all reach the live server.
#[tokio::test]
async fn a_call_whose_server_refuses_the_connection_goes_to_another() {
    let doomed = grpc_server().await;
    let live = grpc_server().await;
    // Checked once at start, and never taken out by the refusals (`fall`): only the retry
    // can save the calls sent to the dead server.
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{}\", \"h2c://{}\"]\n\
         [health]\nkind = \"grpc\"\ninterval = \"1h\"\ntimeout = \"10s\"\nfall = 1000\n",
        doomed.addr, live.addr
    ))
    .await;
    assert!(
        all_servers_healthy(&proxy).await,
        "both servers are checked healthy"
    );
    let (doomed_addr, doomed_seen) = (doomed.addr, doomed.seen.clone());
    // Its listener closes with its task: connections to it are refused.
    drop(doomed);
    assert!(
        wait_until_async(|| async { tokio::net::TcpStream::connect(doomed_addr).await.is_err() })
            .await,
        "the dead server still takes connections"
    );
    let mut grpc = client(&proxy).await;
    for i in 0..6 {
        let resp = say(&mut grpc, SAY, request("hi", 0, &format!("u{i}"))).await;
        let resp = resp.unwrap_or_else(|e| panic!("unary call {i}: {e:?}"));
        assert_eq!(resp.get_ref().text, "echo: hi");
    }
    for i in 0..2 {
        let resp = say_many(&mut grpc, SAY_MANY, request("hey", 3, &format!("s{i}"))).await;
        let mut stream = resp
            .unwrap_or_else(|e| panic!("server streaming call {i}: {e:?}"))
            .into_inner();
        let mut got = 0;
        while let Some(reply) = stream.message().await.unwrap() {
            assert_eq!(reply.index, got);
            got += 1;
        }
        assert_eq!(got, 3);
    }
    for i in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        for text in ["one", "two"] {
            tx.send(SayRequest {
                text: text.into(),
                count: 0,
            })
            .await
            .unwrap();
        }
        drop(tx);
        let resp = say_all(&mut grpc, rx).await;
        let resp = resp.unwrap_or_else(|e| panic!("client streaming call {i}: {e:?}"));
        assert_eq!(resp.get_ref().text, "one two");
    }
    assert_eq!(live.seen.calls(), 10, "every call reached the live server");
    assert_eq!(doomed_seen.calls(), 0);
}

/// A client-streaming call whose client pauses longer than `proxy.body_read_timeout` while
/// its server waits for the rest is answered as gRPC, trailers-only: `DEADLINE_EXCEEDED`,
/// saying which limit ran out. The `408` it got before read as `UNKNOWN: Received http2
/// header with status: 408`. A gRPC-Web call's (over HTTP/1.1) is the same, typed as it came.
#[tokio::test]
async fn a_call_whose_client_stalls_its_stream_gets_deadline_exceeded() {
    let server = grpc_server().await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nbody_read_timeout = \"1s\"\n[upstream]\nservers = [\"h2c://{}\"]\n\
         [health]\nkind = \"grpc\"\ninterval = \"1h\"\ntimeout = \"10s\"\n",
        server.addr
    ))
    .await;
    wait_first_check(&server).await;
    let mut grpc = client(&proxy).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SayRequest {
        text: "one".into(),
        count: 0,
    })
    .await
    .unwrap();
    // `tx` is kept: the stream stays open, and nothing more comes.
    let status = say_all(&mut grpc, rx).await.expect_err("a stalled call");
    drop(tx);
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status
            .message()
            .contains("1s (the proxy's body_read_timeout)"),
        "{status:?}"
    );
    let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
    assert_eq!(h[0].healthy, Some(true), "the server is not blamed: {h:?}");

    // gRPC-Web over HTTP/1.1, to a server that waits for the whole body.
    let web = upstream(|req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let _ = req.into_body().collect().await;
        http::Response::new(full("never"))
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nbody_read_timeout = \"1s\"\n[upstream]\nservers = [\"{}\"]\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n",
        web.url()
    ))
    .await;
    let request =
        "POST /pkg.Svc/M HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc-web+proto\r\n\
                   Transfer-Encoding: chunked\r\n\r\n5\r\n\0\0\0\0\0\r\n";
    let answer = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(10)).await;
    let head = answer.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{answer}");
    assert!(head.contains("\r\ngrpc-status: 4\r\n"), "{answer}");
    assert!(
        head.contains("\r\ncontent-type: application/grpc-web+proto\r\n"),
        "{answer}"
    );
}

/// A call whose deadline (`grpc-timeout`) is longer than `response_timeout` has its head waited
/// for up to that deadline: a slow unary call reaches its client, where it was cut at
/// `response_timeout` with `UNAVAILABLE`. Without a deadline, or with a shorter one,
/// `response_timeout` holds.
#[tokio::test]
async fn a_call_waits_for_its_head_as_long_as_its_deadline_allows() {
    let addr = h2c_streams(|req, mut respond| {
        if req.uri().path() == "/health" {
            let _ = respond.send_response(http::Response::new(()), true);
            return;
        }
        // Answers OK, trailers-only, 2 s after the call came.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let resp = http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "0")
                .body(())
                .unwrap();
            let _ = respond.send_response(resp, true);
            drop(req);
        });
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"h2c://{addr}\"]\nresponse_timeout = \"1s\"\n\
         [health]\npath = \"/health\"\ninterval = \"1h\"\n"
    ))
    .await;
    assert!(
        all_servers_healthy(&proxy).await,
        "the server was never found healthy"
    );
    let call = |timeout: Option<&'static str>| {
        let req = empty_call(
            proxy.url("/pkg.Svc/Slow"),
            http::Version::HTTP_2,
            "application/grpc",
            timeout,
        );
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), h2c_client().request(req))
                .await
                .expect("bounded")
                .expect("an answer");
            let h = resp.headers();
            let status = h.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
            (status, h.contains_key("x-intermission-mode"))
        }
    };
    assert_eq!(
        call(Some("3S")).await,
        (Some("0".into()), false),
        "the server's answer, after 2 s"
    );
    assert_eq!(call(None).await, (Some("14".into()), true), "no deadline");
    assert_eq!(
        call(Some("1500m")).await,
        (Some("14".into()), true),
        "a deadline shorter than the answer"
    );
}

/// A call of one empty message (its 5-byte frame), with `grpc-timeout` when given.
fn empty_call(
    url: String,
    version: http::Version,
    content_type: &str,
    timeout: Option<&str>,
) -> http::Request<TestBody> {
    let mut req = http::Request::post(url)
        .version(version)
        .header("content-type", content_type)
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        req = req.header("grpc-timeout", timeout);
    }
    req.body(full(vec![0u8, 0, 0, 0, 0])).unwrap()
}

/// A gRPC-Web answer from an `h2c://` server that sends `first` of its body, then, while the
/// call streams, fails (resets the stream). Its type is the path's: `/text` is base64.
async fn breaking_grpc_web_server(first: &'static [u8]) -> SocketAddr {
    h2c_streams(move |req, mut respond| {
        let kind = if req.uri().path() == "/text" {
            "application/grpc-web-text+proto"
        } else {
            "application/grpc-web+proto"
        };
        let head = http::Response::builder()
            .header("content-type", kind)
            .body(())
            .unwrap();
        if let Ok(mut send) = respond.send_response(head, false) {
            let _ = send.send_data(bytes::Bytes::from_static(first), false);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                send.send_reset(h2::Reason::INTERNAL_ERROR);
            });
        }
    })
    .await
}

fn grpc_web_call(url: &str, text: bool) -> http::Request<TestBody> {
    let kind = if text {
        "application/grpc-web-text"
    } else {
        "application/grpc-web"
    };
    http::Request::post(url)
        .header("content-type", kind)
        .header("x-grpc-web", "1")
        .body(full(if text {
            b"AAAAAAA=".to_vec()
        } else {
            vec![0u8; 5]
        }))
        .unwrap()
}

/// The body of `resp` once it ends, or `None` when it broke off.
async fn grpc_web_body(resp: http::Response<hyper::body::Incoming>) -> Option<bytes::Bytes> {
    let collected = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("the answer never ended");
    collected.ok().map(|c| c.to_bytes())
}

const WEB_UNAVAILABLE: &[u8] =
    b"\x80\0\0\0\x41grpc-status:14\r\ngrpc-message:the%20server%20stopped%20answering\r\n";

/// A gRPC-Web answer that breaks off between two of its frames ends with a status frame,
/// `UNAVAILABLE`, as a native call ends with its trailers: gRPC-Web's status travels in the
/// body, and a reset (HTTP/2) or a chunked body never ended (HTTP/1.1) left its client with
/// no status at all (grpc-web's JS reports that as a network failure or "Incomplete
/// response"). In base64 for `grpc-web-text`, in a piece of its own.
#[tokio::test]
async fn a_grpc_web_answer_that_breaks_off_between_frames_ends_unavailable() {
    let message: &[u8] = b"\0\0\0\0\x02hi";
    let addr = h2c_streams(move |req, respond| {
        let first: &'static [u8] = if req.uri().path() == "/text" {
            b"AAAAAAJoaQ=="
        } else {
            b"\0\0\0\0\x02hi"
        };
        let mut respond = respond;
        let kind = if req.uri().path() == "/text" {
            "application/grpc-web-text+proto"
        } else {
            "application/grpc-web+proto"
        };
        let head = http::Response::builder()
            .header("content-type", kind)
            .body(())
            .unwrap();
        if let Ok(mut send) = respond.send_response(head, false) {
            let _ = send.send_data(bytes::Bytes::from_static(first), false);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                send.send_reset(h2::Reason::INTERNAL_ERROR);
            });
        }
    })
    .await;
    assert_eq!(WEB_UNAVAILABLE[4] as usize, WEB_UNAVAILABLE.len() - 5);
    let proxy = proxy_to_h2c(addr).await;
    for (name, client) in [("HTTP/2", h2c_client()), ("HTTP/1.1", support::client())] {
        let resp = client
            .request(grpc_web_call(&proxy.url("/binary"), false))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert!(
            !resp.headers().contains_key("x-intermission-mode"),
            "{name}"
        );
        let body = grpc_web_body(resp).await;
        let body = body.unwrap_or_else(|| panic!("{name}: broken off, with no status"));
        assert_eq!(body, [message, WEB_UNAVAILABLE].concat(), "{name}");

        let resp = client
            .request(grpc_web_call(&proxy.url("/text"), true))
            .await
            .unwrap();
        let body = grpc_web_body(resp).await;
        let body = body.unwrap_or_else(|| panic!("{name}: text broken off, with no status"));
        let (first, status) = body.split_at(12);
        assert_eq!(first, b"AAAAAAJoaQ==", "{name}");
        assert_eq!(
            status,
            b"gAAAAEFncnBjLXN0YXR1czoxNA0KZ3JwYy1tZXNzYWdlOnRoZSUyMHNlcnZlciUyMHN0b3BwZWQlMjBhbnN3ZXJpbmcNCg==",
            "{name}: the status frame in base64"
        );
    }
}

/// Cut inside a frame, a gRPC-Web answer is left broken: a status frame added there would be
/// read as the rest of the frame under way. Cut after the server's own status frame, it ends
/// as it is: the call was whole.
#[tokio::test]
async fn a_grpc_web_answer_cut_inside_a_frame_or_after_its_status_gets_none_added() {
    // A frame of 16 bytes, 2 of them sent.
    let inside = breaking_grpc_web_server(b"\0\0\0\0\x10hi").await;
    let proxy = proxy_to_h2c(inside).await;
    let resp = h2c_client()
        .request(grpc_web_call(&proxy.url("/binary"), false))
        .await
        .unwrap();
    assert_eq!(
        grpc_web_body(resp).await,
        None,
        "a cut mid-frame stays a cut"
    );

    let done = breaking_grpc_web_server(b"\0\0\0\0\x02hi\x80\0\0\0\x0fgrpc-status:0\r\n").await;
    let proxy = proxy_to_h2c(done).await;
    let resp = h2c_client()
        .request(grpc_web_call(&proxy.url("/binary"), false))
        .await
        .unwrap();
    let body = grpc_web_body(resp)
        .await
        .expect("a call whose status came was cut");
    assert_eq!(
        body.as_ref(),
        b"\0\0\0\0\x02hi\x80\0\0\0\x0fgrpc-status:0\r\n",
        "nothing added after the server's own status"
    );
}

/// An HTTP/1.1 gRPC-Web call to an `http://` server (a gRPC-Web gateway) whose answer breaks
/// off between two frames ends with the status frame too: such a call goes through hyper's
/// path, where the relay, which answers most HTTP/1.1 requests, closed the connection on a
/// chunked body never ended.
#[tokio::test]
async fn an_http1_grpc_web_call_to_an_http_server_that_breaks_off_ends_unavailable() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                // A health check's connection sends nothing and ends here.
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer: &[u8] =
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc-web+proto\r\n\
                    transfer-encoding: chunked\r\n\r\n7\r\n\0\0\0\0\x02hi\r\n";
                let _ = tcp.write_all(answer).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Gone mid-answer: no last chunk.
            });
        }
    });
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{addr}\"]\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let checked = wait_until_async(|| async {
        let health = ctl(&proxy, Ctl::Health).await.health.unwrap();
        health[0].healthy == Some(true)
    });
    assert!(checked.await, "the server was never found healthy");
    let resp = support::client()
        .request(grpc_web_call(&proxy.url("/pkg.Service/Stream"), false))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = grpc_web_body(resp)
        .await
        .expect("broken off, with no status");
    assert_eq!(body, [&b"\0\0\0\0\x02hi"[..], WEB_UNAVAILABLE].concat());
}

/// Maintenance switched on while a streaming call is open holds the calls that come after,
/// not the one under way: it was forwarded before the hold, and goes on to its own end.
#[tokio::test]
async fn a_stream_open_when_maintenance_begins_goes_on_to_its_end() {
    let server = grpc_server().await;
    let proxy = proxy_for(&server).await;
    wait_first_check(&server).await;
    let mut grpc = client(&proxy).await;
    let mut stream = say_many(&mut grpc, SAY_GATED, request("live", 3, "open-1"))
        .await
        .expect("the stream starts")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("reply 0 arrives")
        .unwrap()
        .expect("a reply");
    assert_eq!(first.index, 0);
    let on = Ctl::On {
        message: Some("Wartung bis 12:00 — zurück bald".into()),
        until: None,
        retry_after: Some("30s".into()),
        reason: None,
    };
    assert!(ctl(&proxy, on).await.ok);
    let err = say(&mut grpc, SAY, request("during", 0, "open-2"))
        .await
        .expect_err("a new call is held");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "Wartung bis 12:00 — zurück bald");
    server.seen.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(reply) = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("bounded")
        .expect("the open stream ends OK, not cut by the hold")
    {
        rest.push(reply.index);
    }
    assert_eq!(rest, [1, 2]);
}

/// Trailers of 20 KiB (a `grpc-status-details-bin` of rich error details) from an `h2c://`
/// server reach an HTTP/2 client whole: the proxy takes up to 64 KiB of a server's header
/// block, trailers too (hyper's client stopped at 16 KiB).
#[tokio::test]
async fn large_grpc_trailers_pass_whole() {
    let details = "A".repeat(20 * 1024);
    let sent = details.clone();
    let addr = h2c_streams(move |_, mut respond| {
        let head = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        if let Ok(mut send) = respond.send_response(head, false) {
            let _ = send.send_data(bytes::Bytes::from_static(b"\0\0\0\0\x02hi"), false);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("3"));
            trailers.insert(
                "grpc-status-details-bin",
                http::HeaderValue::from_str(&sent).unwrap(),
            );
            let _ = send.send_trailers(trailers);
        }
    })
    .await;
    let proxy = proxy_to_h2c(addr).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_max_header_list_size(1 << 20)
        .build_http();
    let resp = client
        .request(grpc_call(&proxy.url("/pkg.Service/Fail")))
        .await
        .unwrap();
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("the answer never ended")
    .expect("the answer broke off");
    let trailers = body.trailers().cloned().expect("no trailers");
    assert_eq!(trailers["grpc-status"], "3");
    assert_eq!(trailers["grpc-status-details-bin"], details.as_str());
}

/// The proxy does not end a call at its deadline (`grpc-timeout`) itself: the client does,
/// cancelling its stream, and the cancel reaches the server (`RST_STREAM` `CANCEL`), which
/// stops working on a call nobody waits for, as it would without the proxy.
#[tokio::test]
async fn a_call_its_client_cancels_at_its_deadline_is_cancelled_at_the_server() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = h2c_streams(move |_, mut respond| {
        let tx = tx.clone();
        tokio::spawn(async move {
            // Never answers; tells what the stream ended with.
            let reason = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
            let _ = tx.send(reason.ok());
        });
    })
    .await;
    let proxy = proxy_to_h2c(addr).await;
    let mut call = grpc_call(&proxy.url("/pkg.Service/Slow"));
    call.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("300m"));
    let client = h2c_client();
    // The client library's deadline: the call is dropped, its stream reset.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), client.request(call)).await;
    assert!(gave_up.is_err(), "answered: {gave_up:?}");
    let reason = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the server's stream was never reset");
    assert_eq!(reason.flatten(), Some(h2::Reason::CANCEL));
}

/// A streaming call still open as a stop's `shutdown_timeout` runs out is ended with
/// `UNAVAILABLE` ("the proxy is shutting down") where a message ends, just before: the
/// connection's close that ended it before reached tonic as `Unknown` ("h2 protocol error:
/// error reading a body from connection"), a status its callers do not retry on. A stream
/// that ends by itself during the drain is not touched (the other tests' calls).
#[tokio::test]
async fn a_stream_still_open_at_the_end_of_a_stop_is_told_unavailable() {
    let server = grpc_server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = ProxyProcess::start(
        dir.path(),
        &format!(
            "[proxy]\nshutdown_timeout = \"2s\"\n[upstream]\nservers = [\"h2c://{}\"]\n\
             [health]\nkind = \"tcp\"\ninterval = \"1h\"\n",
            server.addr
        ),
    );
    let channel = Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut stream = say_many(&mut grpc, SAY_GATED, request("live", 3, "stop-1"))
        .await
        .expect("the stream starts")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("reply 0 arrives")
        .unwrap()
        .expect("a reply");
    assert_eq!(first.index, 0);
    let began = std::time::Instant::now();
    proxy.signal("TERM");
    let got = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream was never ended");
    let err = got.expect_err("the stream went on");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "the proxy is shutting down");
    let after = began.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "ended at once: {after:?}"
    );
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
