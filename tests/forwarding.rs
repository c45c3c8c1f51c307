//! Forwarding in normal mode: the request arrives as the client sent it, the response comes
//! back as the upstream sent it, minus hop-by-hop headers, plus `X-Forwarded-*`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use intermission::control::protocol::Request as Ctl;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

fn upstream_config(up: &Upstream) -> String {
    format!(
        "[upstream]\nservers = [\"{}\"]\n[log]\naccess_log = false\n",
        up.url()
    )
}

#[tokio::test]
async fn request_is_forwarded_exactly() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let req = Request::post(proxy.url("/orders/42?expand=items&sort=desc"))
        .header("host", "shop.example")
        .header("x-custom", "kept")
        .header("cookie", "session=abc")
        .body(full("{\"qty\":3}"))
        .unwrap();
    let resp = send(req).await;
    assert_eq!(resp.status(), 200);
    let seen: Seen = json(&resp);
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/orders/42?expand=items&sort=desc");
    assert_eq!(seen.header("host"), Some("shop.example"));
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("cookie"), Some("session=abc"));
    assert_eq!(seen.body, "{\"qty\":3}");
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
}

#[tokio::test]
async fn every_method_is_forwarded() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"] {
        let req = Request::builder()
            .method(method)
            .uri(proxy.url("/m"))
            .body(empty())
            .unwrap();
        let resp = send(req).await;
        let seen: Seen = json(&resp);
        assert_eq!(seen.method, method);
    }
    // HEAD: the upstream's headers, no body.
    let resp = send(Request::head(proxy.url("/h")).body(empty()).unwrap()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.body().is_empty());
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_removed() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let req = Request::get(proxy.url("/"))
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "gzip")
        // Hop-by-hop even when `Connection` does not name it (RFC 9110 §7.6.1).
        .header("upgrade", "websocket")
        .header("x-end-to-end", "yes")
        .body(empty())
        .unwrap();
    let seen: Seen = json(&send(req).await);
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(!seen.has(gone), "{gone} reached the upstream: {seen:?}");
    }
    // The proxy's own hop may say keep-alive, never the client's tokens.
    assert!(seen
        .header("connection")
        .is_none_or(|c| !c.contains("x-private")));
    assert_eq!(seen.header("x-end-to-end"), Some("yes"));

    // `Host` names the request's target, not the hop: a client that names it in `Connection`
    // does not make the server see another host.
    let req = Request::get(proxy.url("/"))
        .header("host", "shop.example")
        .header("connection", "x-private, Host")
        .header("x-private", "secret")
        .body(empty())
        .unwrap();
    let seen: Seen = json(&send(req).await);
    assert!(!seen.has("x-private"), "{seen:?}");
    assert_eq!(seen.header("host"), Some("shop.example"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    let up = upstream(|_req: Request<Incoming>| async {
        Response::builder()
            .header("connection", "x-internal")
            .header("x-internal", "do not leak")
            .header("keep-alive", "timeout=99")
            .header("proxy-connection", "keep-alive")
            .header("x-app", "kept")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert!(h.get("x-internal").is_none());
    assert!(h.get("keep-alive").is_none());
    assert!(h.get("proxy-connection").is_none());
    assert_eq!(h.get("x-app").unwrap(), "kept");
    assert_eq!(resp.body(), "ok");
}

/// SPEC §3: the proxy appends to `X-Forwarded-For`, whoever sent it (as nginx and HAProxy do):
/// the application reads the last entry as the address this proxy saw. The other two are this
/// hop's unless the peer is a trusted proxy.
#[tokio::test]
async fn forwarded_for_from_an_untrusted_client_is_appended_to() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let req = Request::get(proxy.url("/"))
        .header("host", "site.example")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .body(empty())
        .unwrap();
    let seen: Seen = json(&send(req).await);
    assert_eq!(seen.header("x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("site.example"));
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_is_appended() {
    let up = echo_upstream().await;
    let config = format!(
        "[proxy]\ntrusted_proxies = [\"127.0.0.0/8\"]\n{}",
        upstream_config(&up)
    );
    let proxy = spawn_proxy(&config).await;
    let req = Request::get(proxy.url("/"))
        .header("host", "internal")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "shop.example")
        .body(empty())
        .unwrap();
    let seen: Seen = json(&send(req).await);
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
}

/// `Forwarded` (RFC 7239) names the same host, scheme and client as `X-Forwarded-*`, and
/// frameworks that read it prefer it: from a client that is no trusted proxy it would name
/// the host the application builds its links with, past the `X-Forwarded-Host` this hop sets.
/// So it is dropped, on the relay's path (a plain HTTP/1.1 `GET`) as on hyper's (HTTP/2), and
/// kept from a trusted proxy.
#[tokio::test]
async fn forwarded_from_an_untrusted_client_is_dropped() {
    let up = echo_upstream().await;
    // `Forwarded`, and the other headers frameworks build links from: the port (Spring,
    // Rack), the path prefix (Spring), the scheme (Rack reads `X-Forwarded-Ssl` before
    // `X-Forwarded-Proto`).
    let spoofed = [
        ("forwarded", "for=203.0.113.7;host=evil.example;proto=https"),
        ("x-forwarded-port", "8443"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-scheme", "https"),
        // The path a rewriting proxy saw, which some frameworks route by (CVE-2018-14773):
        // under an allowed path, a way to any other during maintenance.
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        // And the client's address, which middleware reads before `X-Forwarded-For` (Go's
        // chi reads `True-Client-IP` first, then `X-Real-IP`).
        ("true-client-ip", "203.0.113.7"),
        ("x-real-ip", "203.0.113.7"),
    ];
    // The same names with `_` for `-`, which CGI, WSGI, Rack and PHP read as the real ones
    // (`HTTP_X_FORWARDED_FOR`): dropped from anyone, as nginx drops them.
    let aliases = [
        ("x_forwarded_for", "203.0.113.7"),
        ("x_real_ip", "203.0.113.7"),
        ("x-forwarded_host", "evil.example"),
        ("true_client_ip", "203.0.113.7"),
        ("x_forwarded_proto", "https"),
        ("x_rewrite_url", "/admin"),
    ];
    let with_spoofs = |url: String, host: Option<&str>| {
        let mut req = Request::get(url);
        if let Some(host) = host {
            req = req.header("host", host);
        }
        for (name, value) in spoofed.iter().chain(&aliases) {
            req = req.header(*name, *value);
        }
        // Another name with `_` is the application's, and passes.
        req.header("x_tenant", "blue").body(empty()).unwrap()
    };
    let no_aliases = |seen: &Seen, path: &str| {
        for (name, _) in aliases {
            assert!(!seen.has(name), "{path}: {name}: {:?}", seen.headers);
        }
        assert_eq!(seen.header("x_tenant"), Some("blue"), "{path}");
    };
    let untrusted = spawn_proxy(&upstream_config(&up)).await;
    let seen: Seen = json(&send(with_spoofs(untrusted.url("/"), Some("site.example"))).await);
    for (name, _) in spoofed.iter().filter(|(n, _)| *n != "x-real-ip") {
        assert!(!seen.has(name), "relay: {name}: {:?}", seen.headers);
    }
    assert_eq!(seen.header("x-forwarded-host"), Some("site.example"));
    let addresses = seen.headers.iter().filter(|(k, _)| k == "x-real-ip");
    assert_eq!(addresses.count(), 1, "relay: {:?}", seen.headers);
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"), "relay");
    no_aliases(&seen, "relay");
    let resp = h2c_client()
        .request(with_spoofs(untrusted.url("/"), None))
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let seen: Seen = json(&Response::from_parts(
        parts,
        body.collect().await.unwrap().to_bytes(),
    ));
    for (name, _) in spoofed.iter().filter(|(n, _)| *n != "x-real-ip") {
        assert!(!seen.has(name), "h2c: {name}: {:?}", seen.headers);
    }
    let addresses = seen.headers.iter().filter(|(k, _)| k == "x-real-ip");
    assert_eq!(addresses.count(), 1, "h2c: {:?}", seen.headers);
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"), "h2c");
    no_aliases(&seen, "h2c");

    let config = format!(
        "[proxy]\ntrusted_proxies = [\"127.0.0.0/8\"]\n{}",
        upstream_config(&up)
    );
    let trusting = spawn_proxy(&config).await;
    let seen: Seen = json(&send(with_spoofs(trusting.url("/"), Some("internal"))).await);
    for (name, value) in spoofed {
        assert_eq!(seen.header(name), Some(value), "trusted: {name}");
    }
    no_aliases(&seen, "trusted");
}

/// An HTTP/2 connection (prior knowledge) to `addr`, driven by a task of its own, whose end
/// the handle gives.
async fn h2_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

/// A request body that sends `0` and then nothing more, as a stalled upload.
struct StalledAfter(Option<Bytes>);

impl hyper::body::Body for StalledAfter {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(b) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(b)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// The bodies an HTTP/2 connection's requests may have read whole at once, to be sent again,
/// are bounded (`stall::REPLAY_ROOM`, 1 MiB: 16 of 64 KiB): past that they stream. Before,
/// each of a connection's 128 streams held its body of up to 64 KiB for `response_timeout`,
/// some 11 MB a connection, stalled a byte short; none of them reached the server.
#[tokio::test]
async fn h2c_bodies_read_whole_share_their_connections_room() {
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let up = never_answering(arrived.clone()).await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let (sender, _conn) = h2_connection(proxy.addr).await;
    let mut calls = Vec::new();
    for _ in 0..32 {
        let mut sender = sender.clone();
        let req = Request::put(proxy.url("/upload"))
            .header("content-length", "65536")
            .body(StalledAfter(Some(Bytes::from(vec![b'x'; 65535]))).boxed())
            .unwrap();
        calls.push(tokio::spawn(async move {
            let _ = sender.ready().await;
            sender.send_request(req).await
        }));
    }
    // 16 fill the room and wait for their last byte; the others stream to the server.
    let streamed = wait_until(Duration::from_secs(10), || {
        arrived.load(Ordering::SeqCst) >= 16
    })
    .await;
    assert!(
        streamed,
        "uploads that reached the server: {}",
        arrived.load(Ordering::SeqCst)
    );
    for call in calls {
        call.abort();
    }
}

/// An HTTP/2 client may send each cookie as a field of its own; an HTTP/1.1 server reads one
/// `Cookie` line, so the crumbs are joined (RFC 9113 §8.2.3). They count as that one line
/// toward the 100 header fields an HTTP/2 request may carry, as an HTTP/1.1 one may.
#[tokio::test]
async fn h2c_cookie_crumbs_are_joined_and_header_fields_are_limited() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let (sender, _) = h2_connection(proxy.addr).await;
    let send = |req: Request<TestBody>| {
        let mut sender = sender.clone();
        async move {
            sender.ready().await.unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
        }
    };
    let mut req = Request::get(proxy.url("/crumbs"));
    for i in 0..150 {
        req = req.header("cookie", format!("c{i}={i}"));
    }
    let resp = send(req.header("x-other", "1").body(empty()).unwrap()).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
    let seen: Seen = json(&resp);
    let cookies: Vec<_> = seen.headers.iter().filter(|(k, _)| k == "cookie").collect();
    let want: Vec<String> = (0..150).map(|i| format!("c{i}={i}")).collect();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert_eq!(cookies[0].1, want.join("; "));

    let mut req = Request::get(proxy.url("/fields"));
    for i in 0..101 {
        req = req.header(format!("x-field-{i}"), "1");
    }
    let resp = send(req.body(empty()).unwrap()).await;
    assert_eq!(resp.status(), 431, "{resp:?}");
    // The proxy's answer: the server behind it, hyper's too, would have refused it itself.
    assert_eq!(resp.body(), "more than 100 header fields\n");
    // The connection goes on.
    let resp = send(Request::get(proxy.url("/after")).body(empty()).unwrap()).await;
    assert_eq!(resp.status(), 200, "{resp:?}");
}

/// An HTTP/2 client's length given twice, the same (h2 resets a stream whose lengths
/// differ), reaches an `h2c://` server once: h2 passes both lines on, and its server would
/// see both (RFC 9110 §8.6 lets a recipient keep one).
#[tokio::test]
async fn h2c_a_length_given_twice_reaches_an_h2c_server_once() {
    let up = echo_upstream().await;
    let h2c = up.url().replacen("http://", "h2c://", 1);
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{h2c}\"]\n")).await;
    for (method, body, length) in [("GET", "", "0"), ("PUT", "abc", "3"), ("POST", "abc", "3")] {
        let req = Request::builder()
            .method(method)
            .uri(proxy.url("/twice"))
            .header("content-length", length)
            .header("content-length", length)
            .body(full(body))
            .unwrap();
        let resp = h2c_client().request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let resp = Response::from_parts(parts, body.collect().await.unwrap().to_bytes());
        assert_eq!(resp.status(), 200, "{method}: {resp:?}");
        let seen: Seen = json(&resp);
        assert_eq!(seen.version, "HTTP/2.0", "{method}");
        let lengths: Vec<_> = seen
            .headers
            .iter()
            .filter(|(k, _)| k == "content-length")
            .collect();
        assert_eq!(lengths.len(), 1, "{method}: {:?}", seen.headers);
        assert_eq!(lengths[0].1, length, "{method}");
    }
}

#[tokio::test]
async fn h2c_clients_are_forwarded_with_their_authority_as_host() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let resp = h2c_client()
        .request(
            Request::post(proxy.url("/h2?x=1"))
                .body(full("abc"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (parts, body) = resp.into_parts();
    let resp = Response::from_parts(parts, body.collect().await.unwrap().to_bytes());
    let seen: Seen = json(&resp);
    assert_eq!(seen.uri, "/h2?x=1");
    assert_eq!(seen.body, "abc");
    assert_eq!(seen.header("host"), Some(proxy.addr.to_string().as_str()));
    assert_eq!(seen.version, "HTTP/1.1");
    // `:authority` is the request's host, whatever a `Host` beside it says (RFC 9113 §8.3.1).
    let resp = h2c_client()
        .request(
            Request::get(proxy.url("/h2"))
                .header("host", "other.example")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let resp = Response::from_parts(parts, body.collect().await.unwrap().to_bytes());
    let seen: Seen = json(&resp);
    assert_eq!(seen.header("host"), Some(proxy.addr.to_string().as_str()));
    let hosts = seen.headers.iter().filter(|(k, _)| k == "host").count();
    assert_eq!(hosts, 1, "{:?}", seen.headers);
    // An `:authority` that is no `host[:port]` would reach the server as its `Host`: refused
    // as such a `Host` header is, and the connection goes on.
    let (mut sender, _) = h2_connection(proxy.addr).await;
    for (authority, status) in [("a,b", 400), ("a:xx", 400), ("shop.example:8080", 200)] {
        let req = Request::get(format!("http://{authority}/h2"))
            .body(empty())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{authority}");
    }
    // Neither `:authority` nor `Host` is malformed (RFC 9113 §8.3.1), not a request for the
    // server's own name.
    let resp = sender
        .send_request(Request::get("/h2").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

/// A request the server could read as another than the client's is refused with `400`, as
/// nginx refuses it, instead of being forwarded: no `Host` in HTTP/1.1, two of them, a `Host`
/// that is no `host[:port]` or is empty, a target that is no path. An absolute-form target
/// names the host itself (RFC 9112 §3.2.2), and HTTP/1.0 needs no `Host`.
#[tokio::test]
async fn requests_with_no_single_clear_host_get_400() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    for request in [
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b/c\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user@a\r\nConnection: close\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a b\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        // An empty host: the target URI would be `http:///`, which has none.
        "GET /echo HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\nHost:\r\n\r\n",
        "GET foo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET example.com:80 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET http://user@a/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        // An absolute-form target's host becomes `Host`, so it is held to the same rules.
        "GET http://a,b/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET http://a:xx/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        // Chunked applied twice is broken framing, not a coding this hop lacks.
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ] {
        let out = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(10)).await;
        assert!(out.get(8..13) == Some(" 400 "), "{request:?}: {out:?}");
    }
    // A coding hyper does not take off would reach the server with nothing saying so.
    for coding in ["gzip, chunked", "gzip\r\nTransfer-Encoding: chunked"] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        );
        let out = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(10)).await;
        assert!(out.starts_with("HTTP/1.1 501"), "{coding:?}: {out:?}");
    }
    let seen = |out: String| -> Seen {
        assert!(out.get(8..13) == Some(" 200 "), "{out:?}");
        let body = out.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str(body).unwrap()
    };
    let absolute = raw_exchange(
        proxy.addr,
        b"GET http://shop.example/x?y HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    let absolute = seen(absolute);
    assert_eq!(absolute.uri, "/x?y");
    assert_eq!(absolute.header("host"), Some("shop.example"));
    assert_eq!(absolute.header("x-forwarded-host"), Some("shop.example"));
    // It needs no `Host`, so an empty one is no matter.
    let named = raw_exchange(
        proxy.addr,
        b"GET http://shop.example/z HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(seen(named).header("host"), Some("shop.example"));
    let old = raw_exchange(
        proxy.addr,
        b"GET /old HTTP/1.0\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    let old = seen(old);
    assert_eq!(old.uri, "/old");
    assert_eq!(
        old.header("host"),
        Some(up.url().trim_start_matches("http://")),
        "the HTTP/1.1 hop names the server when the client named no host"
    );
    let options = raw_exchange(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(seen(options).uri, "*");
}

/// A request refused for its transfer codings (chunked applied twice, or a coding this hop
/// does not take off) ends its connection: hyper would read its body as one chunked coding
/// and the next request after it, which a client (or a proxy in front that frames the body
/// otherwise) could have put there to be forwarded unseen. nginx closes after such an answer.
#[tokio::test]
async fn a_request_refused_for_its_codings_closes_the_connection() {
    let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = paths.clone();
    let up = upstream(move |req: Request<Incoming>| {
        seen.lock().unwrap().push(req.uri().path().to_owned());
        async { Response::new(full("ok")) }
    })
    .await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    for (coding, status) in [
        ("chunked, chunked", " 400 "),
        ("chunked\r\nTransfer-Encoding: chunked", " 400 "),
        ("gzip, chunked", " 501 "),
    ] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let out = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(10)).await;
        assert!(out.get(8..13) == Some(status), "{coding:?}: {out:?}");
        assert!(
            out.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{coding:?}: {out:?}"
        );
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{coding:?}: {out:?}");
    }
    let paths = paths.lock().unwrap();
    assert!(!paths.iter().any(|p| p == "/smuggled"), "{paths:?}");
}

/// An absolute-form target names its scheme (RFC 9112 §3.2.2), and a scheme other than `http`
/// or `https` (`ftp://`, `foo://`) is no request for the proxy's servers: refused with `400`,
/// where it was forwarded as if it said `http` (nginx 1.22 forwards it so). Either of the two
/// goes on, in any case, its host the `Host` the server sees, and the authority ends at the
/// first `/` (RFC 3986 §3.2), so that an `@` after it is the path's: the server sees the
/// request the client sent, as nginx forwards it. A user named in the authority is refused,
/// as nginx refuses it. HTTP/2's `:scheme` is held to the same rule, its connection going on.
#[tokio::test]
async fn absolute_form_targets_of_other_schemes_get_400() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let exchange = |target: &str| {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        async move { raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(10)).await }
    };
    for target in ["ftp://b/x", "foo://b/x", "FTP://b/x", "ws://b/x"] {
        let out = exchange(target).await;
        assert!(out.get(8..13) == Some(" 400 "), "{target}: {out:?}");
        assert!(
            out.ends_with("\r\n\r\nthe request target's scheme is not http or https\n"),
            "{target}: {out:?}"
        );
    }
    for (target, host, uri) in [
        ("HTTP://b/x", "b", "/x"),
        ("https://b/x?y", "b", "/x?y"),
        ("https://alice:1234/x@host/", "alice:1234", "/x@host/"),
    ] {
        let out = exchange(target).await;
        assert!(out.get(8..13) == Some(" 200 "), "{target}: {out:?}");
        let seen: Seen = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(
            (seen.header("host"), seen.uri.as_str()),
            (Some(host), uri),
            "{target}"
        );
    }
    let out = exchange("http://a@b/").await;
    assert!(out.get(8..13) == Some(" 400 "), "{out:?}");
    let (mut sender, _) = h2_connection(proxy.addr).await;
    for (uri, status) in [("ftp://b/x", 400), ("https://b/x", 200), ("ftp://b/y", 400)] {
        let req = Request::get(uri).body(empty()).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{uri}");
    }
}

#[tokio::test]
async fn trailers_reach_an_http2_client() {
    // HTTP/1.1 sends trailers only when the response declares them in `Trailer`.
    let up = upstream(|_req: Request<Incoming>| async {
        Response::builder()
            .header("trailer", "x-checksum")
            .body(BodyExt::boxed(WithTrailers(0)))
            .unwrap()
    })
    .await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let req = Request::get(proxy.url("/t"))
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("no trailers arrived");
    assert_eq!(trailers.get("x-checksum").unwrap(), "abc123");
    assert_eq!(collected.to_bytes(), "payload");
}

#[tokio::test]
async fn request_trailers_reach_an_http2_upstream() {
    // The upstream answers with what arrived: the body, and the trailer's value.
    let up = upstream(|req: Request<Incoming>| async move {
        let got = req.into_body().collect().await.unwrap();
        let checksum = got
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| "no trailers".into());
        Response::new(full(format!(
            "{}|{checksum}",
            String::from_utf8_lossy(&got.to_bytes())
        )))
    })
    .await;
    let h2c = up.url().replacen("http://", "h2c://", 1);
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{h2c}\"]\n")).await;
    let req = Request::post(proxy.url("/upload"))
        .header("te", "trailers")
        .body(BodyExt::boxed(WithTrailers(0)))
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "payload|abc123");
}

#[tokio::test]
async fn servers_are_used_round_robin() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let named = |name: &'static str, hits: Arc<AtomicUsize>| {
        upstream(move |req: Request<Incoming>| {
            let hits = hits.clone();
            let check = is_health_check(&req);
            async move {
                if !check {
                    hits.fetch_add(1, Ordering::SeqCst);
                }
                Response::new(full(name))
            }
        })
    };
    let (ha, hb) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let a = named("a", ha.clone()).await;
    let b = named("b", hb.clone()).await;
    let config = format!("[upstream]\nservers = [\"{}\", \"{}\"]\n", a.url(), b.url());
    let proxy = spawn_proxy(&config).await;
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(String::from_utf8_lossy(get(&proxy.url("/")).await.body()).into_owned());
    }
    assert_eq!(answers, ["a", "b", "a", "b", "a", "b"]);
    assert_eq!(
        (ha.load(Ordering::SeqCst), hb.load(Ordering::SeqCst)),
        (3, 3)
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!(
        "{}[health]\ninterval = \"60s\"\n",
        upstream_config(&up)
    ))
    .await;
    // The first health check (its own connection) runs at start; wait for it to be done.
    let mut checked = false;
    for _ in 0..250 {
        let h = ctl(&proxy, intermission::control::protocol::Request::Health).await;
        checked = h.health.unwrap()[0].last_check.is_some();
        if checked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checked);
    let before = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    let c = client();
    for _ in 0..25 {
        let resp = c
            .request(Request::get(proxy.url("/")).body(empty()).unwrap())
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap();
    }
    let after = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        after - before,
        1,
        "25 requests in a row should share one upstream connection"
    );
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"hello").await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let text = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the answer");
        out.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.contains("\"body\"") && text.ends_with('}') {
            break text;
        }
    };
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body\":\"hello\""), "{text}");
}

/// A WebSocket is tunnelled both ways, and let go (`proxy.send_timeout`) once its client
/// stops reading while the server sends.
#[tokio::test]
async fn websocket_is_tunnelled_both_ways_and_let_go_when_its_client_stops_reading() {
    let cut = Arc::new(AtomicBool::new(false));
    let told = cut.clone();
    let up = upstream(move |mut req: Request<Incoming>| {
        let told = told.clone();
        async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut io = hyper_util::rt::TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 1024];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    if &buf[..n] == b"flood" {
                        // Sends until the tunnel is closed under it.
                        while io.write_all(&[b'f'; 64 * 1024]).await.is_ok() {}
                        told.store(true, Ordering::SeqCst);
                        break;
                    }
                    let mut echoed = b"echo:".to_vec();
                    echoed.extend_from_slice(&buf[..n]);
                    io.write_all(&echoed).await.unwrap();
                }
            });
            switching_to_websocket()
        }
    })
    .await;
    let config = format!("[proxy]\nsend_timeout = \"1s\"\n{}", upstream_config(&up));
    let proxy = spawn_proxy(&config).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed during the handshake: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for msg in ["first", "second"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], format!("echo:{msg}").as_bytes());
    }
    s.write_all(b"flood").await.unwrap();
    let let_go = wait_until(Duration::from_secs(15), || cut.load(Ordering::SeqCst)).await;
    assert!(let_go, "a tunnel whose client reads nothing is still held");
}

/// Reads from `s` into `got` until `done` says so; fails when the connection closes first or
/// nothing comes for 10 s.
async fn read_until(s: &mut tokio::net::TcpStream, got: &mut String, done: impl Fn(&str) -> bool) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 1024];
    while !done(got) {
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await;
        let n = read.unwrap().unwrap();
        assert!(n > 0, "closed after {got:?}");
        got.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
}

/// A request body that cannot be read (a malformed chunk) is the client's fault: `400`,
/// never the outage page, and it counts against no server, however often it comes. One cut
/// short by a half-close gets no outage page either (hyper closes at the end of input).
#[tokio::test]
async fn an_unreadable_upload_gets_400_and_takes_no_server_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream(|req: Request<Incoming>| async move {
        let body = req.into_body().collect().await;
        Response::new(full(format!("read whole: {}", body.is_ok())))
    })
    .await;
    let config = format!("[health]\nfall = 2\n{}", upstream_config(&up));
    let proxy = spawn_proxy(&config).await;
    for _ in 0..3 {
        let out = raw_exchange(
            proxy.addr,
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "a malformed chunk: {out:?}"
        );
        assert!(!out.contains("x-intermission-mode"), "{out:?}");

        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the cut upload was answered or closed in time"
        );
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.is_empty() || out.starts_with("HTTP/1.1 400"),
            "a body cut short: {out:?}"
        );
        assert!(!out.contains("x-intermission-mode"), "{out:?}");
    }
    let out = raw_exchange(
        proxy.addr,
        b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("read whole: true"),
        "the server is still in: {out:?}"
    );
}

/// A chunked upload whose client leaves mid-chunk is counted `abandoned` (the access log's
/// 499), as a client that leaves before its answer is: it was no failure, and its `400`
/// reached nobody. A malformed chunk stays `failed`.
#[tokio::test]
async fn an_upload_its_client_left_mid_body_is_counted_abandoned() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let up = upstream(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(());
            let body = req.into_body().collect().await;
            Response::new(full(format!("read whole: {}", body.is_ok())))
        }
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        upstream_config(&up)
    ))
    .await;
    let abandoned = "intermission_requests_total{outcome=\"abandoned\",mode=\"normal\"}";
    let failed = "intermission_requests_total{outcome=\"failed\",mode=\"normal\"}";
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /cut HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nhello")
        .await
        .unwrap();
    // Gone once the server is reading the body.
    tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .unwrap();
    drop(s);
    assert_eq!(series_reaches(&proxy, abandoned, 1.0).await, Some(1.0));
    assert_eq!(series(&proxy, failed).await, Some(0.0));

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .unwrap();
    s.write_all(b"zz\r\n").await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the malformed chunk was answered in time");
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 400"),
        "a malformed chunk: {out:?}"
    );
    assert_eq!(series_reaches(&proxy, failed, 1.0).await, Some(1.0));
    assert_eq!(series(&proxy, abandoned).await, Some(1.0));
}

/// `proxy.body_read_timeout`: an upload that stops while the server waits for it is answered
/// 408; one that pauses longer while the server's answer streams back (a conversation, as a
/// gRPC stream) is not cut; one that stops after an early answer has ended is let go.
#[tokio::test]
async fn an_upload_that_stalls_gets_408_unless_the_server_is_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // `/wait` reads the whole body before answering; `/talk` answers at once with the
    // request's own body streamed back; `/early` answers 401 at once and reads the body on.
    let up = upstream(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/talk" => return Response::new(req.into_body().map_err(Into::into).boxed()),
            "/early" => {
                tokio::spawn(req.into_body().collect());
                let mut early = Response::new(full("early"));
                *early.status_mut() = StatusCode::UNAUTHORIZED;
                return early;
            }
            _ => {}
        }
        let body = req.into_body().collect().await;
        Response::new(full(format!("read whole: {}", body.is_ok())))
    })
    .await;
    let config = format!(
        "[proxy]\nbody_read_timeout = \"2s\"\n{}",
        upstream_config(&up)
    );
    let proxy = spawn_proxy(&config).await;

    // A POST that announces 100,000 bytes, sends a few and stops: what came back, if the
    // connection closed within 10 s.
    let addr = proxy.addr;
    let stopped_upload = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
        s.write_all(format!("{head}first bytes").as_bytes())
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        read.is_ok()
            .then(|| String::from_utf8_lossy(&answer).into_owned())
    };

    let asked = std::time::Instant::now();
    let answer = stopped_upload("/wait").await;
    let answer = answer.expect("a stalled upload is still waited for");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        asked.elapsed() >= Duration::from_millis(1900),
        "after {:?}",
        asked.elapsed()
    );

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /talk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let mut got = String::new();
    read_until(&mut s, &mut got, |got| got.contains("hello")).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // A pause longer than the limit, once the server has answered.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    s.write_all(b"5\r\nworld\r\n0\r\n\r\n").await.unwrap();
    read_until(&mut s, &mut got, |got| got.ends_with("0\r\n\r\n")).await;
    assert!(got.contains("world"), "{got}");

    let answer = stopped_upload("/early").await;
    let answer = answer.expect("an upload that stopped after an early answer is still waited for");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.ends_with("early"), "{answer}");
}

#[tokio::test]
async fn oversized_heads_get_431_and_malformed_requests_400() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = raw_exchange(proxy.addr, big.as_bytes(), Duration::from_secs(10)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // At most 100 header fields, as README says: a small head with more is refused by the
    // proxy. (97 are forwarded whole: the test server, hyper, takes 100 with the three
    // `X-Forwarded-*` the proxy adds.)
    for (fields, status) in [(97, "HTTP/1.1 200"), (101, "HTTP/1.1 431")] {
        let extra: String = (3..=fields).map(|i| format!("X-F{i}: v\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
        let out = raw_exchange(proxy.addr, head.as_bytes(), Duration::from_secs(10)).await;
        assert!(out.starts_with(status), "{fields} fields -> {out}");
        let forwarded = out.contains(&format!("\"x-f{fields}\""));
        assert_eq!(forwarded, fields <= 100, "{fields} fields -> {out}");
    }
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n"[..],
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    ] {
        let out = raw_exchange(proxy.addr, bad, Duration::from_secs(10)).await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{:?} -> {out}",
            String::from_utf8_lossy(bad)
        );
    }
    // The proxy is still serving.
    assert_eq!(get(&proxy.url("/")).await.status(), 200);
}

#[tokio::test]
async fn slow_headers_are_cut_off_while_others_are_served() {
    let up = echo_upstream().await;
    let config = format!(
        "[proxy]\nheader_read_timeout = \"500ms\"\n{}",
        upstream_config(&up)
    );
    let proxy = spawn_proxy(&config).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Another client is served meanwhile.
    assert_eq!(get(&proxy.url("/")).await.status(), 200);
    // The slow one is closed by the proxy (bounded wait, far above the timeout).
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the slow connection was never closed");
    // Not before its time: a head still arriving is given header_read_timeout.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "closed after only {took:?}"
    );
    assert!(
        !String::from_utf8_lossy(&buf).contains(" 200 "),
        "an incomplete head was answered"
    );
}

#[tokio::test]
async fn a_silent_upstream_times_out() {
    // Accepts and reads, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut keep = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            keep.push(s);
        }
    });
    let config =
        format!("[upstream]\nservers = [\"http://{addr}\"]\nresponse_timeout = \"300ms\"\n");
    let proxy = spawn_proxy(&config).await;
    let resp = get(&proxy.url("/")).await;
    assert_eq!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "never a raw 504"
    );
    assert_eq!(resp.headers()["x-intermission-mode"], "outage");
    hold.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_that_hangs_gives_up_at_connect_timeout() {
    // A listener that never accepts, its queue filled: Linux drops further SYNs, so a new
    // connection attempt hangs, as it does towards a host that is gone from the network.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) if fillers.len() < 64 => fillers.push(s),
            Ok(Ok(_)) => panic!("the listen queue never filled"),
            Ok(Err(e)) => panic!("connect failed instead of hanging: {e}"),
            Err(_) => break,
        }
    }
    // Checks once an hour and response_timeout far away: only connect_timeout can answer.
    let config = format!(
        "[upstream]\nservers = [\"http://{addr}\"]\nconnect_timeout = \"400ms\"\nresponse_timeout = \"1h\"\n\
         [health]\ninterval = \"1h\"\ntimeout = \"1h\"\n"
    );
    let proxy = spawn_proxy(&config).await;
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(20), get(&proxy.url("/")))
        .await
        .expect("the proxy hung on a connect that never completes");
    let took = started.elapsed();
    assert_eq!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "never a raw 504"
    );
    assert_eq!(resp.headers()["x-intermission-mode"], "outage");
    assert!(
        took >= Duration::from_millis(400),
        "answered before the timeout: {took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn an_unreachable_upstream_is_reported_not_hung() {
    // Nothing listens there, for as long as `dead` is kept.
    let dead = refusing();
    let config = format!("[upstream]\nservers = [\"http://{}\"]\n", dead.addr);
    let proxy = spawn_proxy(&config).await;
    let resp = get(&proxy.url("/")).await;
    assert_eq!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "never a raw 502"
    );
    assert_eq!(resp.headers()["x-intermission-mode"], "outage");
}

/// An upgrade to cleartext HTTP/2 is not passed on: tunnelled, the client would speak HTTP/2
/// to the server itself, its later requests never seen by the proxy (held in no mode, no
/// `X-Forwarded-For`). The request goes on as a plain one, as nginx sends it.
#[tokio::test]
async fn an_upgrade_to_h2c_is_forwarded_as_a_plain_request() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let req = Request::get(proxy.url("/private"))
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .body(empty())
        .unwrap();
    let resp = send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let seen: Seen = json(&resp);
    assert_eq!(seen.uri, "/private");
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(!seen.has(name), "{name} reached the server: {seen:?}");
    }
    assert!(seen.has("x-forwarded-for"));
}

/// An upgrade asked for with a body (a WebSocket handshake is a `GET` without one, RFC 6455
/// §4.1) goes on as a plain request, its offer to switch dropped (RFC 9110 §7.8 lets a
/// recipient ignore one). It was passed on, and the server's `101` reached the client at once,
/// but hyper hands the client's connection over only once the body has been read: nothing
/// the server sent came through until then, and a client that kept its body back held a
/// tunnel's place, and its upstream socket, to `body_read_timeout` (for ever with `"0"`).
/// A `Content-Length: 0` is no body: that upgrade is tunnelled as any other.
#[tokio::test]
async fn an_upgrade_asked_for_with_a_body_goes_on_as_a_plain_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Speaks first once switched, as many WebSocket servers do; a plain request is answered
    // with its body and whether it asked to switch.
    let up = upstream(|mut req: Request<Incoming>| async move {
        if req.headers().contains_key("upgrade") {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on.await else { return };
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let _ = io.write_all(b"greeting").await;
                let _ = io.flush().await;
            });
            return switching_to_websocket();
        }
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(format!("plain:{}", String::from_utf8_lossy(&body))))
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nbody_read_timeout = \"0\"\n[upstream]\nservers = [\"{}\"]\n\
         [health]\ninterval = \"1h\"\n",
        up.url()
    ))
    .await;
    let asking = "Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    for (framing, body) in [
        ("Content-Length: 5", "hello"),
        ("Transfer-Encoding: chunked", "5\r\nhello\r\n0\r\n\r\n"),
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        // The head alone first, as a client that waits to see the switch before it sends
        // the rest; then the body.
        let head = format!("POST /ws HTTP/1.1\r\n{asking}{framing}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let answer = one_answer(&mut s, body.as_bytes()).await;
        assert_eq!(answer, "plain:hello", "{framing}");
        // The connection goes on as HTTP/1.1.
        let next = one_answer(&mut s, b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(next, "plain:", "{framing}");
    }
    // No body: switched, and the server's first bytes come through at once.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let ask = format!("POST /ws HTTP/1.1\r\n{asking}Content-Length: 0\r\n\r\n");
    s.write_all(ask.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let greeted = tokio::time::timeout(Duration::from_secs(10), async {
        while !got.ends_with(b"greeting") {
            let mut more = [0u8; 1024];
            match s.read(&mut more).await {
                Ok(n @ 1..) => got.extend_from_slice(&more[..n]),
                _ => break,
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        greeted.is_ok() && text.starts_with("HTTP/1.1 101"),
        "{text}"
    );
}

/// A server's 204 that states a length reaches an HTTP/2 client without it: the client would
/// refuse the answer (RFC 9110 §8.6 lets a 204 say none; curl and nghttp fail the stream).
#[tokio::test]
async fn a_no_content_answer_with_a_length_reaches_http2_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = sock.read(&mut buf).await {
                    let heads = buf[..n].windows(4).filter(|w| w == b"\r\n\r\n").count();
                    for _ in 0..heads {
                        let answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n";
                        if sock.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{addr}\"]\n[health]\nkind = \"tcp\"\n"
    ))
    .await;
    let req = Request::delete(proxy.url("/item")).body(empty()).unwrap();
    let resp = h2c_client()
        .request(req)
        .await
        .expect("the answer was refused");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(!resp.headers().contains_key("content-length"));
}

#[tokio::test]
async fn connect_requests_are_refused() {
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let out = raw_exchange(
        proxy.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let up = echo_upstream().await;
    let config = format!(
        "[proxy]\nheader_read_timeout = \"300ms\"\n{}",
        upstream_config(&up)
    );
    let proxy = spawn_proxy(&config).await;
    use tokio::io::AsyncReadExt;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a connection that never spoke was kept open"
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let up = echo_upstream().await;
    let config = format!("[proxy]\nmax_connections = 1\n{}", upstream_config(&up));
    let proxy = spawn_proxy(&config).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // With its next request begun, so that it is not idle: an idle one would be closed to
    // make room (tests/parking.rs).
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let out = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        out, "",
        "the second connection should be closed without an answer"
    );
    // A reload raises the limit for the next connections, with the first still open.
    edit_config(&proxy, |text| {
        text.replace("max_connections = 1", "max_connections = 2")
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let out = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "after the reload: {out:?}");
    edit_config(&proxy, |text| {
        text.replace("max_connections = 2", "max_connections = 1")
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    drop(first);
    // Once the first is gone, a new one is served (bounded wait for the slot to free).
    assert!(served_at_the_limit(&proxy).await);
}

#[tokio::test]
async fn an_http2_preface_without_a_request_is_closed() {
    let up = echo_upstream().await;
    let config = format!(
        "[proxy]\nheader_read_timeout = \"300ms\"\n{}",
        upstream_config(&up)
    );
    let proxy = spawn_proxy(&config).await;
    // A cut-short preface (the sniffing waits for more) and a whole one with no request.
    let out = raw_exchange(
        proxy.addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r",
        Duration::from_secs(10),
    )
    .await;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "an HTTP/2 connection that never asked anything was kept open"
    );
}

/// A body that hands out its steps in turn, each after its delay (ms) from the one before;
/// a step with no bytes ends it.
struct Paced {
    steps: std::collections::VecDeque<(u64, Option<Bytes>)>,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Paced {
    fn new(steps: &[(u64, Option<&'static [u8]>)]) -> Paced {
        let steps = steps
            .iter()
            .map(|&(delay, bytes)| (delay, bytes.map(Bytes::from_static)))
            .collect();
        Paced { steps, wait: None }
    }
}

impl http_body::Body for Paced {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::{ready, Poll};
        let Some(&(delay, _)) = self.steps.front() else {
            return Poll::Ready(None);
        };
        if delay > 0 {
            let wait = self
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(delay))));
            ready!(wait.as_mut().poll(cx));
            self.wait = None;
        }
        let bytes = self.steps.pop_front().and_then(|(_, bytes)| bytes);
        Poll::Ready(bytes.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// An HTTP/2 connection answers the keep-alive pings, so only a limit of ours closes it once
/// it idles: as an idle HTTP/1.1 connection, after `header_read_timeout` without a request
/// (GOAWAY, the streams still open finishing first). A connection in use is kept.
#[tokio::test]
async fn an_http2_connection_no_request_comes_on_is_closed() {
    let up = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() != "/slow" {
            return Response::new(full("ok"));
        }
        let steps = [(0, Some(&b"a"[..])), (2500, Some(&b"b"[..])), (0, None)];
        Response::new(Paced::new(&steps).boxed())
    })
    .await;
    let config = format!(
        "[proxy]\nheader_read_timeout = \"1s\"\n{}",
        upstream_config(&up)
    );
    let proxy = spawn_proxy(&config).await;
    let (mut sender, closed) = h2_connection(proxy.addr).await;
    let get = |path: &str| {
        Request::get(format!("http://{}{path}", proxy.addr))
            .body(empty())
            .unwrap()
    };
    // In use: a request every 300 ms for 3 s.
    for _ in 0..10 {
        let resp = sender.send_request(get("/")).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!closed.is_finished(), "a connection in use was closed");
    // A stream open across the limit is answered whole; then the connection goes.
    let resp = sender.send_request(get("/slow")).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ab");
    let ended = tokio::time::timeout(Duration::from_secs(10), closed).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
}

/// A body that never ends, 16 KiB at a time as fast as it is taken; `dropped` says when the
/// server has let it go (its connection closed under it).
struct Endless {
    dropped: Arc<AtomicBool>,
}

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let piece = Bytes::from_static(&[b'x'; 16 * 1024]);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// An HTTP/2 client with a small window, that reads its socket whether or not its streams'
/// bodies are read: a stream whose body is not read stalls on flow control alone.
async fn small_window_h2(
    addr: std::net::SocketAddr,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

/// An HTTP/2 client that keeps reading its socket but opens no room in a stream's window
/// never fills the socket, so no write waits: the answer's own wait is timed
/// (`proxy.send_timeout`, as nginx's), and once nothing on the connection moves the
/// connection is closed, with the server's connection streaming to it. A client that reads
/// slowly but steadily is served whole.
#[tokio::test]
async fn an_http2_stream_its_client_opens_no_window_for_is_let_go() {
    let dropped = Arc::new(AtomicBool::new(false));
    let told = dropped.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let told = told.clone();
        async move {
            match req.uri().path() {
                "/endless" => Response::new(Endless { dropped: told }.boxed()),
                "/256k" => Response::new(full(vec![b'y'; 256 * 1024])),
                "/32k" => Response::new(full(vec![b'z'; 32 * 1024])),
                _ => Response::new(full("ok")),
            }
        }
    })
    .await;
    let config = format!("[proxy]\nsend_timeout = \"1s\"\n{}", upstream_config(&up));
    let proxy = spawn_proxy(&config).await;
    let url = |path: &str| format!("http://{}{path}", proxy.addr);

    // Slow but steady: 16 KiB every 100 ms, 1.6 s in all; a 64 KiB piece waits 400 ms.
    let (mut sender, _conn) = small_window_h2(proxy.addr, 16 * 1024).await;
    let resp = sender
        .send_request(Request::get(url("/256k")).body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut got = 0;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().into_data().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, 256 * 1024, "a slow reader's answer was cut");

    // Stopped: the head is read, the body never.
    let (mut sender, conn) = small_window_h2(proxy.addr, 16 * 1024).await;
    let resp = sender
        .send_request(Request::get(url("/endless")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let let_go = wait_until(Duration::from_secs(15), || dropped.load(Ordering::SeqCst)).await;
    assert!(
        let_go,
        "the server's answer to a stalled stream is still held"
    );
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok(), "the stalled connection is still open");
    drop(resp);

    // Stopped with the last piece of an answer larger than the room left in the window:
    // hyper is done with the body once it has handed that piece on, so the rest of it would
    // wait in the connection for as long as the client liked, the connection with it.
    let (mut sender, conn) = small_window_h2(proxy.addr, 16 * 1024 + 1).await;
    let resp = sender
        .send_request(Request::get(url("/32k")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(
        closed.is_ok(),
        "a connection holding a stalled last piece is still open"
    );
    drop(resp);
    assert_eq!(get(&url("/")).await.status(), StatusCode::OK);
}

/// hyper lets an answer go once it has handed its last piece to HTTP/2; when the answer's
/// end came only after that piece, what the window could not take of it is left there, and
/// the stream with it, which a graceful GOAWAY waits for. Once the connection has been told
/// to go (no request for `header_read_timeout`) and nothing on it has been in hyper's hands
/// for `send_timeout`, it is closed rather than left open for as long as the client likes.
#[tokio::test]
async fn an_http2_connection_held_only_by_a_closed_window_is_closed_once_told_to_go() {
    // 16 KiB, then 100 bytes, then the end, 300 ms apart, with no length announced: the
    // answer's end is known only after its last piece has been handed on.
    let up = upstream(|_req: Request<Incoming>| async {
        let steps = [
            (0, Some(&[b'c'; 16 * 1024][..])),
            (300, Some(&[b'd'; 100][..])),
            (300, None),
        ];
        Response::new(Paced::new(&steps).boxed())
    })
    .await;
    let config = format!(
        "[proxy]\nsend_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n{}",
        upstream_config(&up)
    );
    let proxy = spawn_proxy(&config).await;
    let (mut sender, conn) = small_window_h2(proxy.addr, 16 * 1024 + 1).await;
    let req = Request::get(format!("http://{}/trickled", proxy.addr))
        .body(empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("content-length").is_none());
    let closed = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(
        closed.is_ok(),
        "a connection held only by a closed window is still open"
    );
    drop(resp);
}

/// An upload may go on after its answer has ended (a server that answers first and reads
/// after): over HTTP/2 it keeps its connection counted as in use, so the idle limit's
/// GOAWAY waits for it instead of the connection being closed under it.
#[tokio::test]
async fn an_http2_upload_that_outlasts_its_answer_is_not_cut_when_the_connection_idles() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<bool>(1);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let post = got.starts_with(b"POST");
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(answer).await.is_err() || !post {
                    return;
                }
                // Answered; now the upload, to its last chunk.
                while !got.ends_with(b"0\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = done.send(got.ends_with(b"0\r\n\r\n")).await;
            });
        }
    });
    let config = format!(
        "[proxy]\nsend_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n\
         [upstream]\nservers = [\"http://{addr}\"]\n"
    );
    let proxy = spawn_proxy(&config).await;
    let (mut sender, _conn) = small_window_h2(proxy.addr, 65_535).await;
    // 1 KiB every 300 ms for 6 s: past the idle limit and two ticks of send_timeout.
    let mut steps = vec![(0, Some(&[b'u'; 1024][..]))];
    steps.extend((0..20).map(|_| (300, Some(&[b'u'; 1024][..]))));
    steps.push((0, None));
    let req = Request::post(format!("http://{}/upload", proxy.addr))
        .body(Paced::new(&steps).boxed())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");
    let whole = tokio::time::timeout(Duration::from_secs(20), done_rx.recv()).await;
    assert_eq!(
        whole,
        Ok(Some(true)),
        "an upload still moving was cut with its connection"
    );
}

/// A server with the "CL.0" flaw: it reads no body, so whatever follows a head is read as
/// the next request on the connection. Each answer's body is its path without the `/`; the
/// one to `/smuggled` comes after 300 ms, as a slow page's would.
async fn cl0_server() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut more = [0u8; 4096];
                        match sock.read(&mut more).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&more[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    if path == "/smuggled" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let body = path.trim_start_matches('/');
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A `GET` (or `HEAD`, `DELETE`, `OPTIONS`) with a body, which a server with the "CL.0"
/// flaw reads as a second request: its answer to that one must not reach the next client
/// whose request takes the pooled connection (RFC 9110 §9.3.1, RFC 9112 §11.2). The
/// server's connection is closed after such a request. Before, the next client got the
/// answer to the request hidden in another client's body: through the relay's pool, through
/// hyper's (a request the relay leaves to it, here by its `TE`), and with an `Upgrade` the
/// server declines, which kept the connection open whatever the body.
#[tokio::test]
async fn a_body_a_get_gives_no_meaning_poisons_no_other_answer() {
    let server = cl0_server().await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"http://{server}\"]\n\
         [health]\ninterval = \"1h\"\n"
    ))
    .await;
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    // (method, the attacker's extra fields, the victim's: each pair on one pool.)
    let hyper = "TE: trailers\r\n";
    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    let cases = [
        ("GET", "", ""),
        ("DELETE", "", ""),
        ("OPTIONS", "", ""),
        ("GET", hyper, hyper),
        ("DELETE", hyper, hyper),
        ("GET", upgrade, hyper),
    ];
    for (method, theirs, mine) in cases {
        let mut attacker = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let mut victim = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!(
            "{method} /a HTTP/1.1\r\nHost: x\r\n{theirs}Content-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        );
        let answered = one_answer(&mut attacker, request.as_bytes()).await;
        assert_eq!(answered, "a", "{method} {theirs:?}");
        let plain = format!("GET /victim HTTP/1.1\r\nHost: x\r\n{mine}\r\n");
        let got = one_answer(&mut victim, plain.as_bytes()).await;
        assert_eq!(
            got, "victim",
            "{method} {theirs:?}: another client's hidden request answered"
        );
    }
}

/// A request whose client leaves before its answer (the access log's 499) is counted in
/// `/metrics` as `abandoned`, on the relay's path and on hyper's: with a server that hangs,
/// dashboards showed the traffic fall to nothing, where every request was given up on.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_its_client_gave_up_on_is_counted_abandoned() {
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let up = never_answering(arrived.clone()).await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nservers = [\"{}\"]\n\
         response_timeout = \"1h\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        up.url()
    ))
    .await;
    let abandoned = "intermission_requests_total{outcome=\"abandoned\",mode=\"normal\"}";
    assert_eq!(series(&proxy, abandoned).await, Some(0.0));
    // HTTP/1.1 (the relay): the client closes once the server has the request.
    give_up_over_http1(proxy.addr, "/gave-up-h1", &arrived).await;
    assert_eq!(series_reaches(&proxy, abandoned, 1.0).await, Some(1.0));
    // HTTP/2 (hyper's path): the stream is dropped with its client.
    give_up_over_h2c(proxy.url("/gave-up-h2"), &arrived).await;
    assert_eq!(series_reaches(&proxy, abandoned, 2.0).await, Some(2.0));
    let forwarded = "intermission_requests_total{outcome=\"forwarded\",mode=\"normal\"}";
    assert_eq!(series(&proxy, forwarded).await, Some(0.0));
}

/// A body of `left` copies of `chunk`, counting in `sent` what the server has taken of it.
struct Repeat {
    chunk: Bytes,
    left: usize,
    sent: Arc<std::sync::atomic::AtomicUsize>,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        self.sent.fetch_add(self.chunk.len(), Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.clone()))))
    }
}

/// Clients that stop reading downloads from an `h2c://` server hold what their streams
/// received unread; that must not take the window the whole connection shares. With hyper's
/// default windows (2 MiB a stream, 5 MiB the connection), three such clients left every
/// other request on the worker's connection to that server without a byte of its body until
/// `send_timeout` closed them.
#[tokio::test]
async fn stalled_downloads_do_not_stall_others_on_an_h2c_connection() {
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sent.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let sent = counted.clone();
        async move {
            let big = req.uri().path() == "/big";
            let body = Repeat {
                chunk: Bytes::from(vec![b'x'; 64 * 1024]),
                // 64 MiB: more than the stalled clients' sockets and windows take.
                left: if big { 1024 } else { 4 },
                sent: if big { sent } else { Default::default() },
            };
            Response::new(BodyExt::boxed(body))
        }
    })
    .await;
    let h2c = up.url().replacen("http://", "h2c://", 1);
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"{h2c}\"]\n[health]\nkind = \"tcp\"\n"
    ))
    .await;
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(proxy.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    // Until the stalled answers have stopped moving: their windows (or sockets) are full.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sent.load(Ordering::SeqCst);
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    let other = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client()
            .request(Request::get(proxy.url("/small")).body(empty()).unwrap())
            .await
            .unwrap();
        resp.into_body().collect().await.unwrap().to_bytes().len()
    })
    .await;
    assert_eq!(
        other.ok(),
        Some(256 * 1024),
        "another client's download stalled behind clients that stopped reading"
    );
    drop(stalled);
}

/// An HTTP/2 client's upload that its server does not read (yet) holds what it sent in the
/// proxy's windows; one such upload must leave room in the connection's window for the
/// client's other requests. With hyper's defaults (1 MiB a stream and the connection alike),
/// a single stuck upload left every other request body on the connection unsent.
#[tokio::test]
async fn a_stuck_upload_does_not_stall_the_other_bodies_of_an_h2_client() {
    let up = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/stuck" {
            // Read nothing, answer nothing: a server busy elsewhere.
            let _unread = req;
            return std::future::pending::<Response<TestBody>>().await;
        }
        let got = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(got.len().to_string()))
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n[health]\nkind = \"tcp\"\n",
        up.url()
    ))
    .await;
    let client = h2c_client();
    let (tx, body) = mpsc_body();
    let stuck = tokio::spawn({
        let client = client.clone();
        let url = proxy.url("/stuck");
        async move { client.request(Request::post(url).body(body).unwrap()).await }
    });
    let pushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pushing = tokio::spawn({
        let pushed = pushed.clone();
        async move {
            let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
            // 64 MiB: more than the server's socket, the proxy and the windows take.
            for _ in 0..1024 {
                if tx.send(chunk.clone()).await.is_err() {
                    return;
                }
                pushed.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        }
    });
    // Until the stuck upload has stopped moving: it has taken all the room it can.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = pushed.load(Ordering::SeqCst);
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    let other = tokio::time::timeout(Duration::from_secs(10), async {
        let req = Request::post(proxy.url("/other"))
            .body(full(vec![b'o'; 100_000]))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    })
    .await;
    assert_eq!(
        other.ok(),
        Some(Bytes::from("100000")),
        "a request body stalled behind an upload its server does not read"
    );
    pushing.abort();
    stuck.abort();
}

/// A server's `426 Upgrade Required` keeps its `Upgrade`, which RFC 9110 §15.5.22 says it
/// must carry (the protocol the client is to switch to), with `Connection: upgrade` beside
/// it: on the relay's path, on hyper's (a request the relay leaves to it, here by its `TE`),
/// and to a request that asked to upgrade itself. It was dropped as hop-by-hop, as a `101`'s
/// is not, and the client could not tell what to switch to. The connection is kept.
#[tokio::test]
async fn a_426_keeps_its_upgrade() {
    let up = upstream(|req: Request<Incoming>| async move {
        // The health check's path is answered.
        if req.uri().path() == "/" {
            return Response::new(full("ok"));
        }
        Response::builder()
            .status(426)
            .header("upgrade", "TLS/1.2, HTTP/1.1")
            .header("connection", "Upgrade")
            .body(full("switch"))
            .unwrap()
    })
    .await;
    let proxy = spawn_proxy(&upstream_config(&up)).await;
    let relay = "";
    let hyper = "TE: trailers\r\n";
    let asking = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    for extra in [relay, hyper, asking] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!("GET /a HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        for round in 0..2 {
            tokio::io::AsyncWriteExt::write_all(&mut s, request.as_bytes())
                .await
                .unwrap();
            let answer = read_response(&mut s).await.to_ascii_lowercase();
            assert!(
                answer.starts_with("http/1.1 426"),
                "{extra:?} {round}: {answer}"
            );
            assert!(
                answer.contains("\r\nupgrade: tls/1.2, http/1.1\r\n"),
                "{extra:?}: {answer}"
            );
            assert!(
                answer.contains("\r\nconnection: upgrade\r\n"),
                "{extra:?}: {answer}"
            );
            assert!(answer.ends_with("\r\n\r\nswitch"), "{extra:?}: {answer}");
        }
    }
}

/// A server of server-sent events that sends two whole events, then `rest` (nothing, or an
/// event's first part), then resets its connection: a crash, a restart, a killed worker.
async fn events_server_that_dies(rest: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                    Transfer-Encoding: chunked\r\n\r\n"
                    .to_vec();
                for piece in [&b"id: 1\ndata: one\n\n"[..], b"id: 2\ndata: two\n\n", rest] {
                    if !piece.is_empty() {
                        answer.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                        answer.extend_from_slice(piece);
                        answer.extend_from_slice(b"\r\n");
                    }
                }
                let _ = s.write_all(&answer).await;
                // Time for the proxy to pass it on before the reset, which may drop what is
                // still unread in its socket.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = s.set_zero_linger();
            });
        }
    });
    addr
}

/// What a client reads of an event stream through the proxy over HTTP/1.1 (through the relay,
/// or hyper's path with `extra` headers), until the answer or its connection ends.
async fn raw_events(proxy: &Proxy, extra: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let ask = format!(
        "GET /events HTTP/1.1\r\nHost: shop.test\r\nAccept: text/event-stream\r\n{extra}\r\n"
    );
    s.write_all(ask.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        // Its end: the last chunk (hyper's path keeps the connection for the next
        // request), or the connection's close.
        while !got.ends_with(b"\r\n0\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), read).await;
    assert!(
        ended.is_ok(),
        "{extra:?}: the proxy did not end the stream: {}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// An event stream whose server dies between two events ends properly (the last chunk over
/// HTTP/1.1, the stream's end over HTTP/2), on the relay and on hyper's path: the client's
/// `EventSource` reconnects as after any end, and other SSE clients see no failure. It was
/// cut (no last chunk: curl exited 18; an HTTP/2 stream reset with INTERNAL_ERROR). One that
/// dies mid-event is still cut: the part that came is no event.
#[tokio::test]
async fn an_event_stream_whose_server_dies_between_events_ends_properly() {
    let between = events_server_that_dies(b"").await;
    let config = |addr| {
        format!(
            "[upstream]\nservers = [\"http://{addr}\"]\n[health]\nkind = \"tcp\"\n\
             [log]\naccess_log = false\n"
        )
    };
    let proxy = spawn_proxy(&config(between)).await;
    for extra in ["", "TE: trailers\r\nConnection: TE\r\n"] {
        let got = raw_events(&proxy, extra).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{extra:?}: {text}");
        assert!(text.contains("data: two\n\n"), "{extra:?}: {text}");
        assert!(
            text.ends_with("\r\n0\r\n\r\n"),
            "{extra:?}: no last chunk: {text}"
        );
    }
    let resp = h2c_client()
        .request(
            Request::get(proxy.url("/events"))
                .header("accept", "text/event-stream")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .unwrap()
        .expect("the HTTP/2 stream was reset")
        .to_bytes();
    assert_eq!(&body[..], b"id: 1\ndata: one\n\nid: 2\ndata: two\n\n");

    let mid = events_server_that_dies(b"id: 3\ndata: thr").await;
    let proxy = spawn_proxy(&config(mid)).await;
    for extra in ["", "TE: trailers\r\nConnection: TE\r\n"] {
        let got = raw_events(&proxy, extra).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("data: two\n\n"), "{extra:?}: {text}");
        assert!(
            !text.ends_with("0\r\n\r\n"),
            "{extra:?}: ended as whole: {text}"
        );
    }
}

/// An HTTP/2 upload whose DATA frames add up to more or less than its `content-length` is a
/// request the client made malformed (RFC 9113 §8.1.1), not one it left: h2 resets the stream
/// (`PROTOCOL_ERROR`), and it is counted `failed`, as a malformed chunk over HTTP/1.1 is,
/// never `abandoned`. The client got no response: none is counted (it was a `4xx` in
/// `intermission_responses_total`), nor a duration, streamed to its server or read whole
/// before (a `PUT`, kept to be sent again).
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_upload_at_odds_with_its_content_length_is_failed_not_abandoned() {
    let (tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<()>();
    let up = upstream(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(());
            let body = req.into_body().collect().await;
            Response::new(full(format!("read whole: {}", body.is_ok())))
        }
    })
    .await;
    let proxy = spawn_proxy(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        upstream_config(&up)
    ))
    .await;
    let abandoned = "intermission_requests_total{outcome=\"abandoned\",mode=\"normal\"}";
    let failed = "intermission_requests_total{outcome=\"failed\",mode=\"normal\"}";
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    // Fewer bytes than announced, then END_STREAM; more than announced.
    for (n, (length, sent)) in [("10", "hello"), ("2", "hello")].into_iter().enumerate() {
        let mut client = client.clone().ready().await.unwrap();
        let req = Request::post(proxy.url("/odd"))
            .header("content-length", length)
            .body(())
            .unwrap();
        let (response, mut upload) = client.send_request(req, false).unwrap();
        upload.send_data(Bytes::from_static(b"h"), false).unwrap();
        // Sent on once the server is reading the body, so that the request is forwarded.
        tokio::time::timeout(Duration::from_secs(10), arrived.recv())
            .await
            .unwrap();
        upload
            .send_data(Bytes::from(&sent.as_bytes()[1..]), true)
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("neither answered nor reset in time");
        let reason = got.map(|r| r.status()).map_err(|e| e.reason());
        assert_eq!(
            reason,
            Err(Some(h2::Reason::PROTOCOL_ERROR)),
            "content-length {length}, {sent:?} sent"
        );
        let want = (n + 1) as f64;
        assert_eq!(series_reaches(&proxy, failed, want).await, Some(want));
        assert_eq!(series(&proxy, abandoned).await, Some(0.0));
    }
    // Read whole before it is forwarded: its server never sees it.
    let mut client = client.clone().ready().await.unwrap();
    let req = Request::put(proxy.url("/odd"))
        .header("content-length", "10")
        .body(())
        .unwrap();
    let (response, mut upload) = client.send_request(req, false).unwrap();
    upload
        .send_data(Bytes::from_static(b"hello"), true)
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("neither answered nor reset in time");
    let reason = got.map(|r| r.status()).map_err(|e| e.reason());
    assert_eq!(reason, Err(Some(h2::Reason::PROTOCOL_ERROR)));
    assert_eq!(series_reaches(&proxy, failed, 3.0).await, Some(3.0));
    // Counted as the requests are, before anything is told: none more comes after.
    let none = [
        "intermission_responses_total{class=\"4xx\"}",
        "intermission_request_duration_seconds_count",
    ];
    for key in none {
        assert_eq!(series(&proxy, key).await, Some(0.0), "{key}");
    }
    assert_eq!(series(&proxy, abandoned).await, Some(0.0));
    let resets = "intermission_http2_client_stream_resets_total{reason=\"protocol_error\"}";
    assert_eq!(series_reaches(&proxy, resets, 3.0).await, Some(3.0));
}

/// A request h2 finds malformed (a `connection:` header, no `:path`) gets its stream reset
/// (`PROTOCOL_ERROR`) by h2 before hyper sees a request, and the connection goes on: such
/// resets were in no metric. They are counted in
/// `intermission_http2_client_stream_resets_total{reason="protocol_error"}`.
#[tokio::test(flavor = "multi_thread")]
async fn http2_streams_reset_as_malformed_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = echo_upstream().await;
    let proxy = spawn_proxy(&format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        upstream_config(&up)
    ))
    .await;
    let key = "intermission_http2_client_stream_resets_total{reason=\"protocol_error\"}";
    assert_eq!(series(&proxy, key).await, Some(0.0));
    let headers = |stream: u32, block: &[u8]| {
        let len = (block.len() as u32).to_be_bytes();
        // END_STREAM | END_HEADERS.
        let mut f = vec![len[1], len[2], len[3], 0x1, 0x5];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(block);
        f
    };
    // `:method GET`, `:scheme http`, `:authority x` (HPACK, RFC 7541 Appendix A).
    let base: &[u8] = &[0x82, 0x86, 0x41, 0x01, b'x'];
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    // `:path /` and a literal `connection: close`.
    let mut connection = base.to_vec();
    connection.extend_from_slice(&[0x84, 0x00, 0x0a]);
    connection.extend_from_slice(b"connection");
    connection.extend_from_slice(&[0x05]);
    connection.extend_from_slice(b"close");
    out.extend(headers(1, &connection));
    out.extend(headers(3, base));
    // A well-formed one after them: answered on the same connection.
    let mut fine = base.to_vec();
    fine.push(0x84);
    out.extend(headers(5, &fine));
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(&out).await.unwrap();
    // Frames read until stream 5's answer: the resets of streams 1 and 3 come before it.
    let mut got = Vec::new();
    let (mut resets, mut answered) = (Vec::new(), false);
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !answered {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {resets:?}");
            got.extend_from_slice(&buf[..n]);
            while got.len() >= 9 {
                let len = u32::from_be_bytes([0, got[0], got[1], got[2]]) as usize;
                if got.len() < 9 + len {
                    break;
                }
                let frame: Vec<u8> = got.drain(..9 + len).collect();
                let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                match frame[3] {
                    0x3 => {
                        let code = u32::from_be_bytes([frame[9], frame[10], frame[11], frame[12]]);
                        resets.push((stream, code));
                    }
                    0x1 if stream == 5 => answered = true,
                    _ => {}
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "stream 5 not answered: {resets:?}");
    assert_eq!(resets, [(1, 1), (3, 1)]);
    assert_eq!(series_reaches(&proxy, key, 2.0).await, Some(2.0));
}

/// An HTTP/2 server's answer that breaks off mid-body (the server resets its stream with
/// `PROTOCOL_ERROR`, or sends past its `content-length`, which the proxy's h2 client resets
/// so) resets an HTTP/2 client's stream with `INTERNAL_ERROR`, the proxy's code for an answer
/// that broke: hyper's server passed the server's code on, telling the client that its request
/// was malformed, and `intermission_http2_client_stream_resets_total` counted it so. With
/// `upstream.read_timeout` on (the answer timed) and off (not).
#[tokio::test(flavor = "multi_thread")]
async fn an_h2_servers_broken_answer_is_not_blamed_on_the_client() {
    // A permit for each answer's server to break it, once its client has the first piece.
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let permits = go.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let go = permits.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let go = go.clone();
                    tokio::spawn(async move {
                        let overrun = req.uri().path() == "/overrun";
                        let head = Response::builder().header("content-length", "8");
                        let head = if overrun { head } else { Response::builder() };
                        let Ok(mut send) = respond.send_response(head.body(()).unwrap(), false)
                        else {
                            return;
                        };
                        let _ = send.send_data(Bytes::from_static(b"part"), false);
                        let Ok(permit) = go.acquire().await else {
                            return;
                        };
                        permit.forget();
                        if overrun {
                            let _ = send.send_data(Bytes::from_static(b" and more"), false);
                        } else {
                            send.send_reset(h2::Reason::PROTOCOL_ERROR);
                        }
                        // Held until the proxy lets the stream go.
                        let _ = std::future::poll_fn(|cx| send.poll_reset(cx)).await;
                    });
                }
            });
        }
    });
    let key = |reason: &str| {
        format!("intermission_http2_client_stream_resets_total{{reason=\"{reason}\"}}")
    };
    for read_timeout in ["5m", "0"] {
        let proxy = spawn_proxy(&format!(
            "[upstream]\nservers = [\"h2c://{up}\"]\nread_timeout = \"{read_timeout}\"\n\
             [health]\nkind = \"tcp\"\ninterval = \"1h\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[log]\naccess_log = false\n"
        ))
        .await;
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        for path in ["/reset", "/overrun"] {
            let what = format!("{path}, read_timeout {read_timeout}");
            let mut client = client.clone().ready().await.unwrap();
            let req = Request::get(proxy.url(path)).body(()).unwrap();
            let (response, _) = client.send_request(req, true).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), async {
                let resp = response.await.expect("no answer's head");
                assert_eq!(resp.status(), 200, "{what}");
                let mut body = resp.into_body();
                let first = body.data().await.expect("no body").expect("reset at once");
                assert_eq!(&first[..], b"part", "{what}");
                go.add_permits(1);
                loop {
                    match body.data().await {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break e.reason(),
                        None => panic!("{what}: ended as whole"),
                    }
                }
            })
            .await
            .expect("neither ended nor reset in time");
            assert_eq!(got, Some(h2::Reason::INTERNAL_ERROR), "{what}");
        }
        // The connection goes on.
        let mut client = client.ready().await.unwrap();
        let (response, _) = client
            .send_request(Request::get(proxy.url("/reset")).body(()).unwrap(), true)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), response).await;
        assert_eq!(
            resp.unwrap().unwrap().status(),
            200,
            "read_timeout {read_timeout}"
        );
        go.add_permits(1);
        for reason in [
            "protocol_error",
            "flow_control_error",
            "refused_stream",
            "other",
        ] {
            let got = series(&proxy, &key(reason)).await;
            assert_eq!(got, Some(0.0), "{reason}, read_timeout {read_timeout}");
        }
    }
}

/// The drain's `503` to a request still waiting for its answer's head as a stop's
/// `shutdown_timeout` nears its end is the proxy's own answer, as the one to an `Upgrade`
/// asked for during a drain is: counted `reserved`, on the relay's path (plaintext HTTP/1.1)
/// and hyper's (h2c), never `failed`, which no server's failure brought about.
#[tokio::test(flavor = "multi_thread")]
async fn the_drains_503_is_counted_reserved_not_failed() {
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let up = never_answering(arrived.clone()).await;
    let mut proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\nresponse_timeout = \"1h\"\n\
         [proxy]\nshutdown_timeout = \"2s\"\n",
        up.url()
    ))
    .await;
    let state = proxy.running.as_ref().unwrap().state().clone();
    let addr = proxy.addr;
    let h1 = tokio::spawn(async move {
        raw_exchange(
            addr,
            b"GET /slow-h1 HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(30),
        )
        .await
    });
    let h2c = tokio::spawn(async move {
        let req = Request::get(format!("http://{addr}/slow-h2"))
            .body(empty())
            .unwrap();
        h2c_client().request(req).await.map(|r| r.status())
    });
    assert!(
        wait_until(Duration::from_secs(10), || arrived.load(Ordering::SeqCst)
            >= 2)
        .await,
        "both requests reached the server"
    );
    assert!(proxy.running.take().unwrap().shutdown().await);
    let h1 = tokio::time::timeout(Duration::from_secs(10), h1)
        .await
        .unwrap()
        .unwrap();
    assert!(h1.starts_with("HTTP/1.1 503 "), "{h1:?}");
    let h2c = tokio::time::timeout(Duration::from_secs(10), h2c)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h2c.ok(), Some(StatusCode::SERVICE_UNAVAILABLE));
    let text = state.load().metrics.encode_text();
    let value = |outcome: &str| {
        let key = format!("intermission_requests_total{{outcome=\"{outcome}\",mode=\"normal\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key)?.parse::<f64>().ok())
    };
    assert_eq!(value("failed"), Some(0.0), "{text}");
    assert_eq!(value("reserved"), Some(2.0), "{text}");
}
