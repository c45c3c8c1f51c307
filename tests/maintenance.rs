//! Maintenance mode as clients see it: every form of the holding response, negotiation,
//! Retry-After, languages, escaping, updates, bypasses, reserved paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use intermission::control::protocol::Request as Ctl;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::*;

const BROWSER: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
const CHROMIUM: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,\
image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";

/// An upstream that counts the requests of clients that reach it (not health checks).
async fn counting_upstream() -> (Upstream, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let h = h.clone();
        let check = is_health_check(&req);
        async move {
            if !check {
                h.fetch_add(1, Ordering::SeqCst);
            }
            Response::new(full("from upstream"))
        }
    })
    .await;
    (up, hits)
}

async fn proxy_for(up: &Upstream, extra: &str) -> Proxy {
    spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n{extra}",
        up.url()
    ))
    .await
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Response<bytes::Bytes> {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(empty()).unwrap()).await
}

fn text(resp: &Response<bytes::Bytes>) -> String {
    String::from_utf8_lossy(resp.body()).into_owned()
}

fn held_headers_ok(resp: &Response<bytes::Bytes>, mode: &str) {
    let h = resp.headers();
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-intermission-mode"], mode);
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
}

#[tokio::test]
async fn browsers_get_the_page_and_the_upstream_sees_nothing() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    assert_eq!(get(&proxy.url("/")).await.body(), "from upstream");
    let before = hits.load(Ordering::SeqCst);
    let r = ctl(&proxy, on(Some("Database upgrade in progress"))).await;
    assert!(r.ok, "{r:?}");

    let resp = get_with(&proxy.url("/shop"), &[("accept", BROWSER)]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    held_headers_ok(&resp, "maintenance");
    assert_eq!(resp.headers()["retry-after"], "300");
    let page = text(&resp);
    assert!(page.contains("Database upgrade in progress"), "{page}");
    assert!(page.contains("lang=\"en\""));

    let post = send(
        Request::post(proxy.url("/checkout"))
            .body(full("order"))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status(), StatusCode::SERVICE_UNAVAILABLE);
    held_headers_ok(&post, "maintenance");
    for method in ["PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = send(
            Request::builder()
                .method(method)
                .uri(proxy.url("/x"))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{method}");
        held_headers_ok(&r, "maintenance");
    }
    // CONNECT, refused with 405 in normal mode, is held like the rest.
    let connect = raw_exchange(
        proxy.addr,
        b"CONNECT shop.example:443 HTTP/1.1\r\nHost: shop.example:443\r\n\r\n",
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 503"), "{connect}");
    let connect = connect.to_ascii_lowercase();
    assert!(connect.contains("\r\nretry-after: 300\r\n"), "{connect}");
    assert!(
        connect.contains("\r\nx-intermission-mode: maintenance\r\n"),
        "{connect}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before,
        "a held request reached the upstream"
    );

    assert!(ctl(&proxy, Ctl::Off).await.ok);
    assert_eq!(get(&proxy.url("/")).await.body(), "from upstream");
}

#[tokio::test]
async fn api_clients_get_problem_json() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(
        &up,
        "[maintenance]\nstatus_page = \"https://status.example.com\"\n",
    )
    .await;
    ctl(&proxy, on(Some("Back soon"))).await;
    for accept in [
        None,
        Some("*/*"),
        Some("application/json"),
        Some("text/html;q=0.5, application/json"),
    ] {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
        let resp = get_with(&proxy.url("/anything"), &headers).await;
        assert_eq!(resp.status(), 503, "{accept:?}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{accept:?}"
        );
        held_headers_ok(&resp, "maintenance");
        let v: serde_json::Value = json(&resp);
        assert_eq!(v["type"], "about:blank");
        assert_eq!(v["title"], "Service Unavailable");
        assert_eq!(v["status"], 503);
        assert_eq!(v["detail"], "Back soon");
        assert_eq!(v["mode"], "maintenance");
        assert_eq!(v["retry_after"], 300);
        assert_eq!(v["status_page"], "https://status.example.com");
        assert!(v["since"].as_str().unwrap().ends_with('Z'));
        assert!(v["until"].is_null());
        assert_eq!(v["updates"][0]["message"], "Back soon");
    }
    // API paths want JSON unless HTML is strictly preferred.
    let resp = get_with(
        &proxy.url("/api/orders"),
        &[("accept", "text/html, application/json")],
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let resp = get_with(
        &proxy.url("/orders"),
        &[("accept", "text/html, application/json")],
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    let resp = get_with(&proxy.url("/api/orders"), &[("accept", BROWSER)]).await;
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    // Chromium's navigation `Accept`, whose `*/*` and signed-exchange type come after HTML.
    let resp = get_with(&proxy.url("/orders"), &[("accept", CHROMIUM)]).await;
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    // Plain text when it is ranked above both.
    let resp = get_with(
        &proxy.url("/x"),
        &[("accept", "text/plain, text/html;q=0.5")],
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert!(text(&resp).contains("Back soon"));
    held_headers_ok(&resp, "maintenance");
}

#[tokio::test]
async fn head_gets_the_same_headers_and_no_body() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(None)).await;
    let get = get_with(&proxy.url("/"), &[("accept", BROWSER)]).await;
    let head = send(
        Request::head(proxy.url("/"))
            .header("accept", BROWSER)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(head.status(), 503);
    assert!(head.body().is_empty());
    for name in [
        "content-type",
        "retry-after",
        "cache-control",
        "x-intermission-mode",
        "content-length",
    ] {
        assert_eq!(head.headers().get(name), get.headers().get(name), "{name}");
    }
    assert_eq!(
        get.headers()["content-length"],
        get.body().len().to_string().as_str()
    );
}

#[tokio::test]
async fn retry_after_counts_down_to_until_or_uses_the_configured_value() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "[maintenance]\nretry_after = \"2m\"\n").await;
    ctl(&proxy, on(None)).await;
    assert_eq!(get(&proxy.url("/")).await.headers()["retry-after"], "120");
    ctl(
        &proxy,
        Ctl::On {
            message: None,
            until: Some("+1h".into()),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    let resp = get(&proxy.url("/")).await;
    let secs: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Up to 3,601: the end is kept to the whole second it is listed with, rounded up.
    assert!((3590..=3601).contains(&secs), "{secs}");
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["retry_after"], secs);
    assert!(v["until"].as_str().is_some());
    // The end taken back (`--until ""`): the configured value again, and no end shown.
    let r = ctl(
        &proxy,
        Ctl::On {
            message: None,
            until: Some(String::new()),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.headers()["retry-after"], "120");
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["until"], serde_json::Value::Null, "{v}");
    // An explicit --retry-after replaces the configured value when no until is ahead.
    let proxy2 = proxy_for(&up, "").await;
    ctl(
        &proxy2,
        Ctl::On {
            message: None,
            until: None,
            retry_after: Some("90s".into()),
            reason: None,
        },
    )
    .await;
    assert_eq!(get(&proxy2.url("/")).await.headers()["retry-after"], "90");
}

#[tokio::test]
async fn an_overrun_falls_back_to_the_configured_retry_after_and_stays_on() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "[maintenance]\nretry_after = \"90s\"\n").await;
    // A whole minute, which overruns at that very time (within a minute: a test that waits).
    // Until then Retry-After counts down from at most 61: the configured 90 is no such value.
    let (end, until) = whole_minute_ahead(std::time::Duration::from_secs(1));
    ctl(
        &proxy,
        Ctl::On {
            message: None,
            until: Some(until),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    let mut overrun = false;
    wait_until(std::time::Duration::from_secs(75), || {
        let state = proxy.running.as_ref().unwrap().state().load();
        overrun = state
            .held
            .as_ref()
            .is_some_and(|h| h.view.retry_after(std::time::SystemTime::now()) == 90);
        overrun
    })
    .await;
    assert!(overrun, "Retry-After never fell back after until passed");
    assert!(
        std::time::SystemTime::now() >= end,
        "fell back before the end"
    );
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.status(), 503, "maintenance must stay on after until");
    assert_eq!(resp.headers()["retry-after"], "90");
    let status = ctl(&proxy, Ctl::Status).await.state.unwrap();
    assert!(status.overrun);
}

#[tokio::test]
async fn the_page_speaks_the_visitors_language() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(None)).await;
    // (Accept-Language, the page's language): the page says it in `Content-Language` too,
    // to a `HEAD` as to a `GET`, and varies by the header it was chosen by.
    for (languages, lang) in [
        ("fr-CA,fr;q=0.9,en;q=0.5", "fr"),
        ("de, en;q=0.3", "en"),
        ("ja", "en"),
    ] {
        let headers = [("accept", BROWSER), ("accept-language", languages)];
        let got = get_with(&proxy.url("/"), &headers).await;
        let page = text(&got);
        assert!(
            page.contains(&format!("lang=\"{lang}\"")),
            "{languages}: {page}"
        );
        assert_eq!(got.headers()["content-language"], lang, "{languages}");
        assert_eq!(got.headers()["vary"], "Accept, Accept-Language");
        let mut head = Request::head(proxy.url("/"));
        for (k, v) in headers {
            head = head.header(k, v);
        }
        let head = send(head.body(empty()).unwrap()).await;
        assert_eq!(head.headers()["content-language"], lang, "HEAD {languages}");
    }
    // The problem document is in no language chosen for its client.
    let json = get_with(
        &proxy.url("/"),
        &[("accept", "application/json"), ("accept-language", "fr")],
    )
    .await;
    assert_eq!(json.headers().get("content-language"), None);
}

#[tokio::test]
async fn messages_are_escaped_everywhere() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(
        &proxy,
        on(Some("<script>alert('x')</script> & \"friends\"")),
    )
    .await;
    let page = text(&get_with(&proxy.url("/"), &[("accept", BROWSER)]).await);
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;friends&quot;"),
        "{page}"
    );
    let v: serde_json::Value = json(&get(&proxy.url("/")).await);
    assert_eq!(v["detail"], "<script>alert('x')</script> & \"friends\"");
}

#[tokio::test]
async fn updates_show_in_the_status_json_and_the_page() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    let s = get(&proxy.url("/_intermission/status")).await;
    let v: serde_json::Value = json(&s);
    assert_eq!(v["mode"], "normal");
    assert!(v["message"].is_null());

    ctl(&proxy, on(Some("Starting the upgrade"))).await;
    let r = ctl(
        &proxy,
        Ctl::Update {
            message: "Halfway there".into(),
        },
    )
    .await;
    assert!(r.ok);
    let v: serde_json::Value = json(&get(&proxy.url("/_intermission/status")).await);
    assert_eq!(v["mode"], "maintenance");
    assert_eq!(v["message"], "Halfway there");
    assert_eq!(v["updates"][0]["message"], "Halfway there");
    assert_eq!(v["updates"][1]["message"], "Starting the upgrade");
    assert!(v["retry_after"].as_u64().is_some());
    assert!(
        v.get("upstream").is_none(),
        "no upstream details in public status"
    );
    let page = text(&get_with(&proxy.url("/"), &[("accept", BROWSER)]).await);
    assert!(page.contains("Halfway there") && page.contains("Starting the upgrade"));
}

/// `maintenance.reserved_prefix` moves every reserved path, and the page's links with it; the
/// default prefix is then an ordinary path, forwarded or held like any other.
#[tokio::test]
async fn a_reserved_prefix_of_ones_own_moves_every_reserved_path() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "[maintenance]\nreserved_prefix = \"/_maint/\"\n").await;
    let v: serde_json::Value = json(&get(&proxy.url("/_maint/status")).await);
    assert_eq!(v["mode"], "normal");
    let old = get(&proxy.url("/_intermission/status")).await;
    assert_eq!(text(&old), "from upstream");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    ctl(&proxy, on(Some("Moving house"))).await;
    // One client, so that the requests after the first come on a kept (parked) connection,
    // which answers held requests itself and must hand reserved paths on.
    let c = client();
    let ask = |path: &str, accept: &str| {
        Request::get(proxy.url(path))
            .header("accept", accept)
            .body(empty())
            .unwrap()
    };
    for _ in 0..2 {
        let page = c.request(ask("/shop", BROWSER)).await.unwrap();
        assert_eq!(page.status(), 503);
        let page = String::from_utf8_lossy(&page.into_body().collect().await.unwrap().to_bytes())
            .into_owned();
        assert!(page.contains("Moving house"), "{page}");
        assert!(
            page.contains("data-status-url=\"/_maint/status\"")
                && page.contains("src=\"/_maint/assets/status.js\""),
            "the page's links follow the prefix: {page}"
        );
        assert!(!page.contains("/_intermission/"), "{page}");
        let status = c.request(ask("/_maint/status", "*/*")).await.unwrap();
        assert_eq!(status.status(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&status.into_body().collect().await.unwrap().to_bytes())
                .unwrap();
        assert_eq!(v["mode"], "maintenance");
        assert_eq!(v["message"], "Moving house");
        let script = c
            .request(ask("/_maint/assets/status.js", "*/*"))
            .await
            .unwrap();
        assert_eq!(script.status(), 200);
        let old = c
            .request(ask("/_intermission/status", "*/*"))
            .await
            .unwrap();
        assert_eq!(
            old.status(),
            503,
            "the default prefix is held like any path"
        );
        assert_eq!(old.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "nothing held reached the upstream"
    );
}

/// Sends `request`, shuts the sending side, and reads until the proxy closes.
async fn half_closed_exchange(proxy: &Proxy, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no end within 10 s");
    String::from_utf8_lossy(&out).into_owned()
}

/// A client that shuts its sending side after its request still gets an answer the proxy
/// gives itself (held, or a reserved path), on every path hyper serves: a `Connection: close`,
/// an upload, a reserved path. hyper closed about half of them unanswered when it read the
/// end before writing the answer, so each is asked 10 times. (A forwarded request whose
/// client's end comes first is given up, as nginx gives it up: nobody can tell a client that
/// left from one that only stopped sending.)
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_proxys_own_answer() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    let forwarded = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let status = b"GET /_intermission/status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    for _ in 0..10 {
        let out = half_closed_exchange(&proxy, status).await;
        assert!(
            out.starts_with("HTTP/1.1 200") && out.contains("\"mode\":\"normal\""),
            "{out:?}"
        );
    }
    ctl(&proxy, on(Some("Half an ear"))).await;
    let asks: [(&[u8], &str); 4] = [
        (forwarded, "HTTP/1.1 503"),
        (
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
            "HTTP/1.1 503",
        ),
        (
            b"GET /_intermission/status HTTP/1.1\r\nHost: a\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", "HTTP/1.1 503"),
    ];
    for (ask, status) in asks {
        for _ in 0..10 {
            let out = half_closed_exchange(&proxy, ask).await;
            assert!(
                out.starts_with(status) && out.contains("Half an ear"),
                "{}: {out:?}",
                String::from_utf8_lossy(ask)
            );
        }
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn upgrades_are_held_with_json() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(None)).await;
    let out = raw_exchange(
        proxy.addr,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nAccept: text/html\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        std::time::Duration::from_secs(3),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.to_lowercase()
            .contains("content-type: application/problem+json"),
        "{out}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// `curl --http2` and Java's `HttpClient` offer `Upgrade: h2c` on every `http://` request;
/// the proxy declines it and answers the plain request it also is, in the form its `Accept`
/// asks for, as a WebSocket's is not.
#[tokio::test]
async fn an_h2c_upgrade_offer_is_answered_as_the_plain_request_it_also_is() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(None)).await;
    for (accept, status, kind) in [
        ("text/html", "503", "text/html; charset=utf-8"),
        ("text/plain", "503", "text/plain; charset=utf-8"),
        ("text/event-stream", "200", "text/event-stream"),
        ("*/*", "503", "application/problem+json"),
    ] {
        let request = format!(
            "GET /page HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nAccept: {accept}\r\n\r\n"
        );
        let out = raw_exchange(
            proxy.addr,
            request.as_bytes(),
            std::time::Duration::from_secs(3),
        )
        .await;
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{accept}: {out}"
        );
        assert!(
            out.to_lowercase()
                .contains(&format!("\r\ncontent-type: {kind}\r\n")),
            "{accept}: {out}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn grpc_clients_get_unavailable_as_trailers_only() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(
        &proxy,
        Ctl::On {
            message: Some("Back at 10:00 — déjà".into()),
            until: None,
            retry_after: Some("30s".into()),
            reason: None,
        },
    )
    .await;
    let resp = h2c_client()
        .request(grpc_call(&proxy.url("/pkg.Service/Method")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(h["grpc-message"], "Back at 10:00 %E2%80%94 d%C3%A9j%C3%A0");
    assert_eq!(h["grpc-retry-pushback-ms"], "30000");
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["retry-after"], "30");
    use http_body::Body as _;
    assert!(
        resp.body().is_end_stream(),
        "trailers-only: the headers end the stream"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn allow_paths_and_allow_ips_are_forwarded() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(
        &up,
        "[maintenance]\nallow_paths = [\"/.well-known/acme-challenge/\"]\n",
    )
    .await;
    ctl(&proxy, on(None)).await;
    assert_eq!(
        get(&proxy.url("/.well-known/acme-challenge/tok"))
            .await
            .body(),
        "from upstream"
    );
    assert_eq!(get(&proxy.url("/.well-known/other")).await.status(), 503);

    let proxy = proxy_for(&up, "[maintenance]\nallow_ips = [\"127.0.0.1/32\"]\n").await;
    ctl(&proxy, on(None)).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "from upstream");

    // X-Forwarded-For is believed only from trusted proxies.
    let proxy = proxy_for(&up, "[maintenance]\nallow_ips = [\"203.0.113.7\"]\n").await;
    ctl(&proxy, on(None)).await;
    let resp = get_with(&proxy.url("/"), &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(
        resp.status(),
        503,
        "an untrusted peer must not be able to claim an allowed address"
    );
    let proxy = proxy_for(&up, "[proxy]\ntrusted_proxies = [\"127.0.0.1\"]\n[maintenance]\nallow_ips = [\"203.0.113.7\"]\n").await;
    ctl(&proxy, on(None)).await;
    let resp = get_with(&proxy.url("/"), &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(resp.body(), "from upstream");
    let resp = get_with(&proxy.url("/"), &[("x-forwarded-for", "198.51.100.1")]).await;
    assert_eq!(resp.status(), 503);
    // RFC 7239's `Forwarded` names the client the same way, from a trusted proxy only.
    let forwarded = [("forwarded", "for=203.0.113.7;proto=https")];
    assert_eq!(
        get_with(&proxy.url("/"), &forwarded).await.body(),
        "from upstream"
    );
    let other = [("forwarded", "for=198.51.100.1")];
    assert_eq!(get_with(&proxy.url("/"), &other).await.status(), 503);
    let untrusted = proxy_for(&up, "[maintenance]\nallow_ips = [\"203.0.113.7\"]\n").await;
    ctl(&untrusted, on(None)).await;
    assert_eq!(
        get_with(&untrusted.url("/"), &forwarded).await.status(),
        503
    );
}

/// An address written IPv4-mapped (`::ffff:a.b.c.d`, as the access log named an IPv4 client
/// of a dual-stack listener) is that IPv4 address, in allow_ips as in trusted_proxies: it
/// matched nobody, and the team it was meant for got the holding page.
#[tokio::test]
async fn mapped_ipv4_entries_allow_and_trust_their_ipv4_clients() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "[maintenance]\nallow_ips = [\"::ffff:127.0.0.1\"]\n").await;
    ctl(&proxy, on(None)).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "from upstream");
    let proxy = proxy_for(
        &up,
        "[proxy]\ntrusted_proxies = [\"::ffff:127.0.0.0/104\"]\n\
         [maintenance]\nallow_ips = [\"203.0.113.7\"]\n",
    )
    .await;
    ctl(&proxy, on(None)).await;
    let resp = get_with(&proxy.url("/"), &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(resp.body(), "from upstream");
}

const SECRET: &str = "let-the-team-in-0123456789";

#[tokio::test]
async fn the_bypass_link_sets_a_cookie_that_lets_the_browser_through() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(
        &up,
        &format!("[maintenance]\nbypass_secret = \"{SECRET}\"\n"),
    )
    .await;
    ctl(&proxy, on(None)).await;
    let resp = get(&proxy.url(&format!("/_intermission/bypass/{SECRET}"))).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()["location"], "/");
    assert_eq!(resp.headers()["referrer-policy"], "no-referrer");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Lax")
            && cookie.contains("Max-Age="),
        "{cookie}"
    );
    assert!(
        !cookie.contains("Secure"),
        "plaintext listener: no Secure flag"
    );
    let pair = cookie.split(';').next().unwrap();
    let resp = get_with(&proxy.url("/dashboard"), &[("cookie", pair)]).await;
    assert_eq!(resp.body(), "from upstream");
}

/// Behind a load balancer that ends TLS, the browser is on HTTPS though this proxy's listener
/// is plaintext: the cookie, a key past the hold for `bypass_ttl`, must not be sent again in
/// cleartext (`http://`, or an attacker's downgrade). Only a trusted proxy is believed.
#[tokio::test]
async fn the_bypass_cookie_is_secure_when_a_trusted_proxy_says_https() {
    let (up, _) = counting_upstream().await;
    let link = format!("/_intermission/bypass/{SECRET}");
    let cases = [
        (
            "trusted_proxies = [\"127.0.0.1\"]",
            "x-forwarded-proto",
            "https",
            true,
        ),
        (
            "trusted_proxies = [\"127.0.0.1\"]",
            "forwarded",
            "for=192.0.2.1;proto=https",
            true,
        ),
        (
            "trusted_proxies = [\"127.0.0.1\"]",
            "x-forwarded-proto",
            "http",
            false,
        ),
        ("", "x-forwarded-proto", "https", false),
        ("", "forwarded", "proto=https", false),
    ];
    for (trusted, name, value, secure) in cases {
        let proxy = proxy_for(
            &up,
            &format!("[proxy]\n{trusted}\n[maintenance]\nbypass_secret = \"{SECRET}\"\n"),
        )
        .await;
        ctl(&proxy, on(None)).await;
        let resp = get_with(&proxy.url(&link), &[(name, value)]).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        let cookie = resp.headers()["set-cookie"].to_str().unwrap();
        assert_eq!(
            cookie.contains("; Secure"),
            secure,
            "{trusted:?} {name}: {value}: {cookie}"
        );
    }
}

#[tokio::test]
async fn a_wrong_secret_or_forged_cookie_looks_like_any_held_request() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(
        &up,
        &format!("[maintenance]\nbypass_secret = \"{SECRET}\"\n"),
    )
    .await;
    ctl(&proxy, on(Some("Hold on"))).await;
    let ordinary = get_with(&proxy.url("/page"), &[("accept", BROWSER)]).await;
    for path in [
        "/_intermission/bypass/wrong",
        "/_intermission/bypass/let-the-team-in",
        "/_intermission/bypass/",
    ] {
        let resp = get_with(&proxy.url(path), &[("accept", BROWSER)]).await;
        assert_eq!(resp.status(), ordinary.status(), "{path}");
        assert!(resp.headers().get("set-cookie").is_none(), "{path}");
        assert_eq!(resp.body(), ordinary.body(), "{path}");
        // The page there goes to `/` once the site is back: the address, a secret right but
        // for a typo or changed since, must not reach the application as `Referer`.
        assert_eq!(resp.headers()["referrer-policy"], "no-referrer", "{path}");
    }
    for forged in [
        "intermission_bypass=9999999999.00ff",
        "intermission_bypass=",
        "intermission_bypass=abc.def",
    ] {
        let resp = get_with(&proxy.url("/"), &[("cookie", forged)]).await;
        assert_eq!(resp.status(), 503, "{forged}");
    }
    // Without a configured secret the link does nothing either.
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(None)).await;
    let resp = get(&proxy.url("/_intermission/bypass/anything")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["referrer-policy"], "no-referrer");
}

#[tokio::test]
async fn assets_are_served_and_nothing_outside_them() {
    let (up, _) = counting_upstream().await;
    let pages = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/pages");
    for f in [
        "maintenance.html",
        "outage.html",
        "maintenance.fr.html",
        "outage.fr.html",
    ] {
        std::fs::copy(format!("{src}/{f}"), pages.path().join(f)).unwrap();
    }
    std::fs::create_dir(pages.path().join("assets")).unwrap();
    std::fs::copy(
        format!("{src}/assets/style.css"),
        pages.path().join("assets/style.css"),
    )
    .unwrap();
    std::fs::write(pages.path().join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(
        pages.path().join("secret.txt"),
        pages.path().join("assets/link.txt"),
    )
    .unwrap();
    let proxy = proxy_for(
        &up,
        &format!("[maintenance]\npages = \"{}\"\n", pages.path().display()),
    )
    .await;
    let css = get(&proxy.url("/_intermission/assets/style.css")).await;
    assert_eq!(css.status(), 200);
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    for attempt in [
        "/_intermission/assets/../secret.txt",
        "/_intermission/assets/%2e%2e/secret.txt",
        "/_intermission/assets/%2E%2E%2Fsecret.txt",
        "/_intermission/assets/..%2fsecret.txt",
        "/_intermission/assets/..%5csecret.txt",
        "/_intermission/assets/link.txt",
        "/_intermission/assets/",
        "/_intermission/assets//etc/passwd",
    ] {
        let out = raw_exchange(
            proxy.addr,
            format!("GET {attempt} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            std::time::Duration::from_secs(5),
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 404") || out.starts_with("HTTP/1.1 400"),
            "{attempt}: {out}"
        );
        assert!(!out.contains("top secret"), "{attempt}");
    }
}

/// A `pages` folder with the least templates and the assets `assets` (name, bytes).
fn pages_with_assets(assets: &[(&str, &str)]) -> tempfile::TempDir {
    let pages = tempfile::tempdir().unwrap();
    for page in ["maintenance.html", "outage.html"] {
        std::fs::write(pages.path().join(page), "<p>{{message}}</p>").unwrap();
    }
    for (name, bytes) in assets {
        let path = pages.path().join("assets").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    pages
}

/// Browsers left on the holding page through an incident reload it every few seconds: its
/// assets carry an `ETag`, the same on every answer (computed at load), and a browser that
/// sends it back in `If-None-Match` gets a `304` without the file; a file changed and
/// reloaded gets a new tag, and the old one the new bytes.
#[tokio::test]
async fn assets_carry_an_etag_and_a_browser_that_has_them_gets_304() {
    let (up, _) = counting_upstream().await;
    let pages = pages_with_assets(&[("site.css", "body { color: red }"), ("img/a.svg", "<svg/>")]);
    let proxy = proxy_for(
        &up,
        &format!("[maintenance]\npages = \"{}\"\n", pages.path().display()),
    )
    .await;
    let url = proxy.url("/_intermission/assets/site.css");
    let first = get(&url).await;
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert!(
        etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
        "a strong entity tag: {etag}"
    );
    assert_eq!(get(&url).await.headers()["etag"], etag.as_str());
    let other = get(&proxy.url("/_intermission/assets/img/a.svg")).await;
    assert_ne!(
        other.headers()["etag"],
        etag.as_str(),
        "another file, another tag"
    );
    for value in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
        format!("\"nope\",{etag} , \"nor\""),
        "*".to_owned(),
    ] {
        let resp = get_with(&url, &[("if-none-match", &value)]).await;
        assert_eq!(resp.status(), 304, "If-None-Match: {value}");
        assert!(resp.body().is_empty(), "{value}");
        assert_eq!(resp.headers()["etag"], etag.as_str(), "{value}");
        assert_eq!(resp.headers()["cache-control"], "public, max-age=300");
    }
    let head = Request::head(&url)
        .header("if-none-match", &etag)
        .body(empty())
        .unwrap();
    assert_eq!(send(head).await.status(), 304);
    for value in ["\"nope\"", "", "W/\"nope\""] {
        let resp = get_with(&url, &[("if-none-match", value)]).await;
        assert_eq!(resp.status(), 200, "If-None-Match: {value}");
        assert_eq!(resp.body().as_ref(), b"body { color: red }");
    }
    // The built-in pages' assets have theirs too.
    let built_in = proxy_for(&up, "").await;
    let url_built_in = built_in.url("/_intermission/assets/style.css");
    let tag = get(&url_built_in).await.headers()["etag"].clone();
    let resp = get_with(&url_built_in, &[("if-none-match", tag.to_str().unwrap())]).await;
    assert_eq!(resp.status(), 304);
    // A changed file has a new tag from the reload on, and the old tag gets the new bytes.
    std::fs::write(pages.path().join("assets/site.css"), "body { color: blue }").unwrap();
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let resp = get_with(&url, &[("if-none-match", &etag)]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body().as_ref(), b"body { color: blue }");
    assert_ne!(resp.headers()["etag"], etag.as_str());
}

/// RFC 9110 §9.3.2: a `HEAD` gets the headers of the `GET`, its length included, from the
/// proxy's own short answers (an unknown reserved path, a refused preview) too.
#[tokio::test]
async fn a_head_of_the_proxys_own_refusals_says_the_length_a_get_gets() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    for path in [
        "/_intermission/nothing",
        "/_intermission/preview?mode=party",
    ] {
        let get = get(&proxy.url(path)).await;
        let head = send(Request::head(proxy.url(path)).body(empty()).unwrap()).await;
        assert!(get.status().is_client_error(), "{path}: {}", get.status());
        assert_eq!(head.status(), get.status(), "{path}");
        assert!(head.body().is_empty(), "{path}");
        assert_eq!(
            head.headers().get("content-length"),
            Some(&get.body().len().into()),
            "{path}"
        );
    }
}

#[tokio::test]
async fn reserved_paths_are_never_forwarded() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    let preview = get(&proxy.url("/_intermission/preview?mode=outage&lang=fr")).await;
    assert_eq!(preview.status(), 200);
    let page = text(&preview);
    assert!(page.contains("lang=\"fr\""));
    assert_eq!(preview.headers()["content-language"], "fr");
    assert!(
        page.contains("We are having trouble reaching the service"),
        "the outage message, not the maintenance one: {page}"
    );
    let preview = get(&proxy.url("/_intermission/preview")).await;
    assert!(text(&preview).contains("We are doing some planned maintenance"));
    assert_eq!(preview.headers()["content-language"], "en");
    // A regional tag shows its language's page, as a visitor's `Accept-Language` does.
    let preview = text(&get(&proxy.url("/_intermission/preview?lang=fr-CA")).await);
    assert!(preview.contains("lang=\"fr\""), "{preview}");
    // A language no page has falls back to the first (English), as a visitor's would.
    let preview = text(&get(&proxy.url("/_intermission/preview?lang=xx")).await);
    assert!(
        preview.contains("lang=\"en\"") && preview.contains("We are doing some planned"),
        "{preview}"
    );
    // A `HEAD` of each gets the headers a `GET` gets, its length included, and no body.
    for path in ["preview", "status", "assets/style.css"] {
        let url = proxy.url(&format!("/_intermission/{path}"));
        let got = get(&url).await;
        let head = send(Request::head(&url).body(empty()).unwrap()).await;
        assert_eq!(head.status(), 200, "{path}");
        assert!(head.body().is_empty(), "{path}");
        for name in [
            "content-type",
            "content-length",
            "cache-control",
            "content-language",
        ] {
            assert_eq!(
                head.headers().get(name),
                got.headers().get(name),
                "{path}: {name}"
            );
        }
        assert_eq!(
            head.headers().get("content-length").map(|v| v.as_bytes()),
            Some(got.body().len().to_string().as_bytes()),
            "{path}"
        );
    }
    assert_eq!(
        get(&proxy.url("/_intermission/nothing-here"))
            .await
            .status(),
        404
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_allowed_prefix_is_no_way_around_the_hold() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "[maintenance]\nallow_paths = [\"/public/\"]\n").await;
    ctl(&proxy, on(None)).await;
    // Spellings that some server decodes into `/public/../admin`: overlong UTF-8 (lenient
    // Java decoders), IIS's `%u`, a space or NUL after `..` (Windows trims, C stops), `...`.
    let paths = [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%c0%ae%c0%ae/admin",
        "/public/..%c0%afadmin",
        "/public/%u002e%u002e/admin",
        "/public/..%20/admin",
        "/public/..%00/admin",
        "/public/.../admin",
    ];
    for path in paths {
        // Once to hyper (`Connection: close`), once as a plain keep-alive GET answered
        // without it (`fast`), pipelined before one that closes.
        for keep in ["Connection: close\r\n", ""] {
            let mut request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{keep}\r\n");
            if keep.is_empty() {
                request.push_str("GET /held HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            }
            let out = raw_exchange(
                proxy.addr,
                request.as_bytes(),
                std::time::Duration::from_secs(5),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 503"), "{path} {keep:?}: {out}");
            let answers = if keep.is_empty() { 2 } else { 1 };
            assert_eq!(
                out.matches("HTTP/1.1 503").count(),
                answers,
                "{path}: {out}"
            );
        }
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_preview_of_the_other_mode_shows_that_modes_own_words() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(Some("Operator words for the maintenance"))).await;
    let current = text(&get(&proxy.url("/_intermission/preview?mode=maintenance")).await);
    assert!(current.contains("Operator words for the maintenance"));
    let other = text(&get(&proxy.url("/_intermission/preview?mode=outage")).await);
    assert!(!other.contains("Operator words"), "{other}");
    assert!(
        other.contains("We are having trouble reaching the service"),
        "{other}"
    );
}

/// A mode the preview does not know is said to be so: `mode=outgae` showed the maintenance
/// page as if it were the one asked for. Left out, the page of the mode in force is shown.
#[tokio::test]
async fn a_preview_of_an_unknown_mode_is_refused_saying_which_there_are() {
    let down = refusing();
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{}\"]\n[health]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n",
        down.addr
    ))
    .await;
    for query in ["mode=outgae", "mode=", "mode=Outage", "lang=fr&mode=bogus"] {
        let resp = get(&proxy.url(&format!("/_intermission/preview?{query}"))).await;
        assert_eq!(resp.status(), 400, "{query}");
        let said = text(&resp);
        assert!(
            said.contains("maintenance") && said.contains("outage"),
            "{query}: {said}"
        );
    }
    wait_mode(&proxy, "outage", std::time::Duration::from_secs(10)).await;
    let page = text(&get(&proxy.url("/_intermission/preview")).await);
    assert!(
        page.contains("We are having trouble reaching the service"),
        "no mode during an outage: the outage page: {page}"
    );
    let page = text(&get(&proxy.url("/_intermission/preview?mode=maintenance")).await);
    assert!(
        page.contains("We are doing some planned maintenance"),
        "{page}"
    );
}

/// An HTTP/2 upload answered while held is read to its end, as nginx discards one, rather
/// than reset once the answer has gone: RFC 9113 allows the reset (`NO_ERROR`), but clients
/// such as curl before version 8 then report a failed upload instead of the holding page.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_upload_answered_while_held_is_read_not_reset() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    let on = Ctl::On {
        message: Some("Uploads later".into()),
        until: None,
        retry_after: None,
        reason: None,
    };
    assert!(ctl(&proxy, on).await.ok);
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::post(proxy.url("/upload")).body(()).unwrap();
    let (response, mut upload) = client.send_request(req, false).unwrap();
    // Far more than the stream's window (hyper's is 1 MiB): the server must read it to take it.
    const TOTAL: usize = 3 << 20;
    let chunk = bytes::Bytes::from(vec![b'x'; 16 << 10]);
    let sent = async {
        let mut sent = 0;
        while sent < TOTAL {
            upload.reserve_capacity(chunk.len());
            let room = std::future::poll_fn(|cx| upload.poll_capacity(cx)).await;
            let room = match room {
                Some(Ok(room)) => room,
                Some(Err(e)) => return Err(format!("reset after {sent} bytes: {e}")),
                None => return Err(format!("closed after {sent} bytes")),
            };
            let n = room.min(chunk.len()).min(TOTAL - sent);
            upload
                .send_data(chunk.slice(..n), false)
                .map_err(|e| format!("reset after {sent} bytes: {e}"))?;
            sent += n;
        }
        upload
            .send_data(bytes::Bytes::new(), true)
            .map_err(|e| format!("reset at the end: {e}"))?;
        Ok(sent)
    };
    let within = std::time::Duration::from_secs(20);
    let sent = tokio::time::timeout(within, sent)
        .await
        .expect("upload stalled");
    assert_eq!(sent, Ok(TOTAL));
    let resp = tokio::time::timeout(within, response)
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-intermission-mode"], "maintenance");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "never forwarded");
}

/// An HTTP/1.1 upload answered while held is read to its end too, as nginx discards one
/// before it closes: closed with the body unread, the connection was reset under a client
/// still sending, which lost the answer (asyncio's and other clients that send the whole
/// body before reading reported a reset, not the holding page). With `Expect: 100-continue`
/// nothing is read: the client is answered without sending its body.
#[tokio::test(flavor = "multi_thread")]
async fn an_http1_upload_answered_while_held_is_read_not_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    assert!(ctl(&proxy, on(None)).await.ok);
    // Far more than the sockets' buffers hold: the proxy must read it for it all to go.
    const TOTAL: usize = 8 << 20;
    let within = std::time::Duration::from_secs(20);
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {TOTAL}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let body = vec![b'x'; TOTAL];
    let sent = tokio::time::timeout(within, tcp.write_all(&body))
        .await
        .expect("upload stalled");
    assert!(sent.is_ok(), "the upload was cut: {sent:?}");
    let resp = tokio::time::timeout(within, read_response(&mut tcp))
        .await
        .expect("no answer");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(!says_close(&resp), "{resp}");
    // The body read, the connection serves the next request.
    tcp.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let next = tokio::time::timeout(within, read_response(&mut tcp))
        .await
        .expect("no answer");
    assert!(next.starts_with("HTTP/1.1 503"), "{next}");

    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {TOTAL}\r\nExpect: 100-continue\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // Its body never read, the connection closes after the answer, which says so (RFC 9112
    // §9.6), as does the answer to a body longer than is read and dropped (16 MiB): a
    // request pipelined behind is then known to be lost.
    let mut got = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut got))
        .await
        .expect("still open")
        .unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 503"), "no 100 Continue: {got}");
    assert!(says_close(&got), "{got}");
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        20 << 20
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body[..100_000]).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut got))
        .await
        .expect("still open")
        .unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(says_close(&got), "{got}");

    // A body that stops is given up on after a pause (1 s), not read for the whole 10 s:
    // a host sending heads whole and bodies never would hold slots meanwhile.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        .await
        .unwrap();
    let mut all = Vec::new();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(6), tcp.read_to_end(&mut all)).await;
    assert!(closed.is_ok(), "still open after 6 s");
    assert!(
        all.starts_with(b"HTTP/1.1 503"),
        "{:?}",
        String::from_utf8_lossy(&all)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0, "never forwarded");
}

/// Whether a response's head says `Connection: close`.
fn says_close(resp: &str) -> bool {
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .any(|l| l.eq_ignore_ascii_case("connection: close"))
}

const APP: &str = "https://app.example.com";

/// `maintenance.cors_origins` listing the web app that calls this API from another origin.
const CORS: &str = "[maintenance]\ncors_origins = [\"https://app.example.com\"]\n";

fn readable_by(resp: &Response<bytes::Bytes>, origin: &str) {
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], origin, "{h:?}");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("Retry-After"), "{exposed}");
    assert!(h["vary"].to_str().unwrap().contains("Origin"), "{h:?}");
}

/// A preflight as a browser sends it before a JSON `POST` with credentials.
fn preflight(url: &str, origin: &str) -> Request<TestBody> {
    Request::options(url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .body(empty())
        .unwrap()
}

/// A web app on a listed origin that calls the API while it is held reads the 503, its message
/// and `Retry-After`, over every path that answers (HTTP/1.1 without hyper, HTTP/2, gRPC-Web,
/// the status JSON), and its preflight is answered so that the call is made; no other origin
/// gets any of it, and nothing reaches the upstream.
#[tokio::test]
async fn a_listed_origin_reads_the_holding_answer_across_origins() {
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, CORS).await;
    ctl(&proxy, on(Some("Moving to new servers"))).await;
    let api = proxy.url("/api/orders");

    // A plain GET over HTTP/1.1 (answered without hyper), and the same over HTTP/2.
    let resp = get_with(&api, &[("origin", APP)]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    held_headers_ok(&resp, "maintenance");
    readable_by(&resp, APP);
    assert!(text(&resp).contains("Moving to new servers"));
    let req = Request::get(&api)
        .header("origin", APP)
        .body(empty())
        .unwrap();
    let h2 = h2c_client().request(req).await.unwrap();
    assert_eq!(h2.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (parts, _) = h2.into_parts();
    readable_by(&Response::from_parts(parts, bytes::Bytes::new()), APP);

    // The preflight of a JSON POST is answered, for this call only; the POST is then held.
    let pre = send(preflight(&api, APP)).await;
    assert_eq!(pre.status(), StatusCode::NO_CONTENT);
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-methods"], "POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type, authorization"
    );
    assert_eq!(h["access-control-max-age"], "0");
    held_headers_ok(&pre, "maintenance");
    let post = Request::post(&api)
        .header("origin", APP)
        .header("content-type", "application/json")
        .body(full("{}"))
        .unwrap();
    let resp = send(post).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    readable_by(&resp, APP);

    // The status JSON's preflight (a fetch wrapper adding `Authorization`): never forwarded.
    let pre = send(preflight(&proxy.url("/_intermission/status"), APP)).await;
    assert_eq!(pre.status(), StatusCode::NO_CONTENT);
    assert_eq!(pre.headers()["access-control-allow-methods"], "GET, HEAD");

    // gRPC-Web from the browser: its own type back, its status readable.
    let call = Request::post(proxy.url("/pkg.Service/Method"))
        .header("origin", APP)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(full(vec![0u8, 0, 0, 0, 0]))
        .unwrap();
    let resp = send(call).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()["content-type"], "application/grpc-web+proto");
    readable_by(&resp, APP);
    let exposed = resp.headers()["access-control-expose-headers"].clone();
    assert!(exposed.to_str().unwrap().contains("grpc-status"));

    // The status JSON, which an app may poll to show a banner.
    let status = get_with(&proxy.url("/_intermission/status"), &[("origin", APP)]).await;
    assert_eq!(status.status(), StatusCode::OK);
    assert_eq!(status.headers()["access-control-allow-origin"], APP);

    // Another origin: no CORS, its preflight held as any request.
    let other = "https://elsewhere.example";
    let resp = get_with(&api, &[("origin", other)]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    let pre = send(preflight(&api, other)).await;
    assert_eq!(pre.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!pre.headers().contains_key("access-control-allow-origin"));
    let status = get_with(&proxy.url("/_intermission/status"), &[("origin", other)]).await;
    assert!(!status.headers().contains_key("access-control-allow-origin"));
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was forwarded");
}

/// `*` lets any origin read the holding answers, as public pages, without credentials; it
/// approves no preflight that could let a call through to the application, only those of the
/// reserved paths. An origin also named keeps what naming gives.
#[tokio::test]
async fn any_origin_reads_the_holding_answer_without_credentials_or_approvals() {
    let (up, hits) = counting_upstream().await;
    let extra = "[maintenance]\ncors_origins = [\"*\", \"https://app.example.com\"]\n";
    let proxy = proxy_for(&up, extra).await;
    ctl(&proxy, on(None)).await;
    let api = proxy.url("/api/orders");
    for origin in ["https://elsewhere.example", "null"] {
        let resp = get_with(&api, &[("origin", origin)]).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let h = resp.headers();
        assert_eq!(h["access-control-allow-origin"], "*", "{origin}");
        assert!(
            !h.contains_key("access-control-allow-credentials"),
            "{origin}"
        );
        assert!(h["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("Retry-After"));
        let pre = send(preflight(&api, origin)).await;
        assert_eq!(pre.status(), StatusCode::SERVICE_UNAVAILABLE, "{origin}");
        let status = send(preflight(&proxy.url("/_intermission/status"), origin)).await;
        assert_eq!(status.status(), StatusCode::NO_CONTENT, "{origin}");
        assert_eq!(status.headers()["access-control-allow-origin"], "*");
    }
    let pre = send(preflight(&api, APP)).await;
    assert_eq!(pre.status(), StatusCode::NO_CONTENT);
    assert_eq!(pre.headers()["access-control-allow-origin"], APP);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// Without `cors_origins`, nothing changes: no CORS headers, a preflight held as any request.
#[tokio::test]
async fn without_cors_origins_holding_answers_carry_no_cors() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(None)).await;
    let api = proxy.url("/api/orders");
    let resp = get_with(&api, &[("origin", APP)]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    let pre = send(preflight(&api, APP)).await;
    assert_eq!(pre.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!pre.headers().contains_key("access-control-allow-origin"));
}

/// A gRPC-Web call gets its answer typed as it asked, whoever calls.
#[tokio::test]
async fn a_grpc_web_call_is_answered_in_its_own_type() {
    let (up, _) = counting_upstream().await;
    let proxy = proxy_for(&up, "").await;
    ctl(&proxy, on(None)).await;
    for ct in ["application/grpc-web+proto", "application/grpc-web-text"] {
        let call = Request::post(proxy.url("/pkg.Service/Method"))
            .header("content-type", ct)
            .body(full(vec![0u8, 0, 0, 0, 0]))
            .unwrap();
        let resp = send(call).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["content-type"], ct);
    }
}

/// The outage answer to a forward that failed is readable too, on the relay's path and on
/// hyper's, and a preflight that could not be forwarded is answered.
#[tokio::test]
async fn a_failed_forward_answers_a_listed_origin_readably() {
    // A server that takes connections (so a TCP check keeps it in) and closes each unanswered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let config = format!(
        "[upstream]\nservers = [\"http://{addr}\"]\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\n{CORS}"
    );
    let proxy = spawn_proxy(&config).await;
    let api = proxy.url("/api/orders");
    // A plain GET (the relay's) and one with a chunked upload (hyper's).
    let resp = get_with(&api, &[("origin", APP)]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    held_headers_ok(&resp, "outage");
    readable_by(&resp, APP);
    let (tx, body) = mpsc_body();
    drop(tx);
    let put = Request::put(&api).header("origin", APP).body(body).unwrap();
    let resp = send(put).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    readable_by(&resp, APP);
    let pre = send(preflight(&api, APP)).await;
    assert_eq!(pre.status(), StatusCode::NO_CONTENT);
    assert_eq!(pre.headers()["x-intermission-mode"], "outage");
    assert_eq!(pre.headers()["access-control-allow-origin"], APP);
    // Written without hyper, the 204 says no length (RFC 9110 §8.6), and the connection
    // goes on to the next request.
    let out = raw_exchange(
        proxy.addr,
        format!(
            "OPTIONS /api/orders HTTP/1.1\r\nHost: x\r\nOrigin: {APP}\r\n\
             Access-Control-Request-Method: POST\r\n\r\n\
             GET /api/orders HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        std::time::Duration::from_secs(5),
    )
    .await;
    let (first, second) = out.split_once("\r\n\r\n").unwrap();
    assert!(first.starts_with("HTTP/1.1 204"), "{out}");
    assert!(!first.to_lowercase().contains("content-length"), "{out}");
    assert!(second.starts_with("HTTP/1.1 503"), "{out}");
}

/// An answer the application gave, replaced by the outage answer (`intercept_statuses`), is
/// readable, but a preflight it answered is not approved in its place.
#[tokio::test]
async fn an_intercepted_preflight_is_not_approved() {
    let up = upstream(|req: Request<Incoming>| async move {
        let status = if is_health_check(&req) { 200 } else { 503 };
        Response::builder()
            .status(status)
            .body(full("app"))
            .unwrap()
    })
    .await;
    let extra = format!("intercept_statuses = [503]\n{CORS}");
    let proxy = proxy_for(&up, &extra).await;
    let api = proxy.url("/api/orders");
    let pre = send(preflight(&api, APP)).await;
    assert_eq!(pre.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(pre.headers()["x-intermission-mode"], "outage");
    readable_by(&pre, APP);
    let resp = get_with(&api, &[("origin", APP)]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    readable_by(&resp, APP);
}

/// The fields of an event stream as a browser's `EventSource` reads them (HTML, "Interpreting
/// an event stream"): the last `retry`, and each event's type and data.
fn read_event_stream(body: &[u8]) -> (Option<u64>, Vec<(String, String)>) {
    let text = std::str::from_utf8(body).expect("an event stream is UTF-8");
    let (mut retry, mut events) = (None, Vec::new());
    let (mut kind, mut data): (String, Vec<&str>) = (String::new(), Vec::new());
    for line in text.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        if line.is_empty() {
            if !data.is_empty() {
                let kind = std::mem::take(&mut kind);
                events.push((
                    if kind.is_empty() {
                        "message".into()
                    } else {
                        kind
                    },
                    data.join("\n"),
                ));
                data.clear();
            }
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "retry" if value.bytes().all(|b| b.is_ascii_digit()) => retry = value.parse().ok(),
            "event" => kind = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    (retry, events)
}

/// What an `EventSource` must be given to keep reconnecting: 200, `text/event-stream`, the
/// headers of every held answer, then a `retry` and the problem as one `intermission` event;
/// returns the reconnection delay.
fn assert_held_event_stream(
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    message: &str,
) -> u64 {
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-intermission-mode"], "maintenance");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    let (retry, events) = read_event_stream(body);
    assert_eq!(events.len(), 1, "{}", String::from_utf8_lossy(body));
    let (kind, data) = &events[0];
    assert_eq!(kind, "intermission");
    let problem: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(problem["detail"], message, "{problem}");
    assert_eq!(problem["mode"], "maintenance");
    assert_eq!(problem["retry_after"], retry_after);
    let retry = retry.expect("a reconnection delay");
    assert_eq!(retry, retry_after.min(60) * 1000);
    retry
}

/// One request on an open connection, and its answer, read as far as its `Content-Length`:
/// (status, headers, body).
async fn exchange_on(
    sock: &mut tokio::net::TcpStream,
    request: &str,
    head_only: bool,
) -> (u16, http::HeaderMap, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut lines = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut lines);
        if let httparse::Status::Complete(used) = parsed.parse(&buf).unwrap() {
            let mut headers = http::HeaderMap::new();
            for line in parsed.headers.iter() {
                headers.append(
                    http::HeaderName::from_bytes(line.name.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(line.value).unwrap(),
                );
            }
            let status = parsed.code.unwrap();
            let len: usize = match head_only {
                true => 0,
                false => headers["content-length"].to_str().unwrap().parse().unwrap(),
            };
            while buf.len() < used + len {
                let mut more = [0u8; 4096];
                let n = sock.read(&mut more).await.unwrap();
                assert!(n > 0, "closed before the body was whole");
                buf.extend_from_slice(&more[..n]);
            }
            return (status, headers, buf[used..used + len].to_vec());
        }
        let mut more = [0u8; 4096];
        let n = sock.read(&mut more).await.unwrap();
        assert!(n > 0, "closed before an answer");
        buf.extend_from_slice(&more[..n]);
    }
}

/// Only a `GET` is an `EventSource`'s: a request of another method that asks for a stream (an
/// MCP client's `POST` with `Accept: application/json, text/event-stream`, a chat API's
/// streamed `POST`) gets the `503` problem, which its library reports as the error it is and
/// retries on, not a `200` saying its request was taken and a stream that ends with nothing
/// it knows. A `GET` asking the same still gets the stream.
#[tokio::test]
async fn a_request_of_another_method_asking_for_a_stream_gets_the_503() {
    const MESSAGE: &str = "Database upgrade in progress";
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "[maintenance]\napi_prefixes = [\"/api/\"]\n").await;
    assert!(ctl(&proxy, on(Some(MESSAGE))).await.ok);
    for accept in ["text/event-stream", "application/json, text/event-stream"] {
        for (method, path) in [("POST", "/mcp"), ("POST", "/api/chat"), ("PUT", "/api/x")] {
            for h2 in [false, true] {
                let req = Request::builder()
                    .method(method)
                    .uri(proxy.url(path))
                    .header("accept", accept)
                    .header("content-type", "application/json")
                    .body(full(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#))
                    .unwrap();
                let resp = match h2 {
                    false => client().request(req).await.unwrap(),
                    true => h2c_client().request(req).await.unwrap(),
                };
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let told = format!("{method} {path} {accept} h2={h2}");
                assert_eq!(parts.status, 503, "{told}");
                assert_eq!(
                    parts.headers["content-type"], "application/problem+json",
                    "{told}"
                );
                assert_eq!(parts.headers["retry-after"], "300", "{told}");
                let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(problem["detail"], MESSAGE, "{told}");
            }
        }
        let stream = get_with(&proxy.url("/mcp"), &[("accept", accept)]).await;
        assert_held_event_stream(
            stream.status().as_u16(),
            stream.headers(),
            stream.body(),
            MESSAGE,
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// A browser's `EventSource` gives up for good on any answer but a 200 event stream, so a held
/// one gets a stream that tells it when to reconnect and ends, on every path a held answer
/// takes: a new connection's first request and a parked keep-alive connection's next one
/// (answered without hyper), `Connection: close` (hyper's path), HTTP/2, under `api_prefixes`
/// and while `Retry-After` counts down to an announced end. Once the hold ends, it reaches the
/// application again.
#[tokio::test]
async fn an_event_source_is_told_to_reconnect_rather_than_refused() {
    const MESSAGE: &str = "Database upgrade in progress";
    let (up, hits) = counting_upstream().await;
    let proxy = proxy_for(&up, "[maintenance]\napi_prefixes = [\"/api/\"]\n").await;
    assert!(ctl(&proxy, on(Some(MESSAGE))).await.ok);
    let sse = [("accept", "text/event-stream")];

    let first = get_with(&proxy.url("/api/events"), &sse).await;
    let retry = assert_held_event_stream(
        first.status().as_u16(),
        first.headers(),
        first.body(),
        MESSAGE,
    );
    assert_eq!(
        retry, 60_000,
        "five minutes of Retry-After, at most a minute"
    );
    assert_eq!(first.headers()["retry-after"], "300");

    let request = |path: &str, method: &str, connection: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: shop.test\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\n{connection}\r\n"
        )
    };
    let mut sock = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    for path in ["/events", "/events?again"] {
        let (status, headers, body) =
            exchange_on(&mut sock, &request(path, "GET", ""), false).await;
        assert_held_event_stream(status, &headers, &body, MESSAGE);
    }
    let (status, headers, body) =
        exchange_on(&mut sock, &request("/events", "HEAD", ""), true).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(
        headers["content-length"],
        first.body().len().to_string().as_str()
    );
    assert!(body.is_empty());

    let closing = raw_exchange(
        proxy.addr,
        request("/events", "GET", "Connection: close\r\n").as_bytes(),
        std::time::Duration::from_secs(10),
    )
    .await;
    let (head, body) = closing.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{closing}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\ncontent-type: text/event-stream\r\n"),
        "{closing}"
    );
    assert_eq!(body.as_bytes(), first.body());

    let req = Request::get(proxy.url("/events"))
        .header("accept", "text/event-stream")
        .body(empty())
        .unwrap();
    let resp = h2c_client().request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_held_event_stream(parts.status.as_u16(), &parts.headers, &body, MESSAGE);

    // Counting down to an announced end: the delay counts down with `Retry-After`.
    let r = ctl(
        &proxy,
        Ctl::On {
            message: Some(MESSAGE.into()),
            until: Some("+20s".into()),
            retry_after: None,
            reason: None,
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
    let counting = get_with(&proxy.url("/events"), &sse).await;
    let retry = assert_held_event_stream(
        counting.status().as_u16(),
        counting.headers(),
        counting.body(),
        MESSAGE,
    );
    assert!((10_000..=21_000).contains(&retry), "{retry}");

    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a held request reached the app"
    );
    assert!(ctl(&proxy, Ctl::Off).await.ok);
    let back = get_with(&proxy.url("/events"), &sse).await;
    assert_eq!(back.body(), "from upstream");
}

/// The outage answer to a forward that failed while no outage is in force says no start: it
/// said the last change of state (here the proxy's start, in practice the last `off`, hours
/// or days before), the page "Started" then, for a failure just met. Over HTTP/1.1 (the
/// relay's answer) and HTTP/2 (hyper's), the JSON form and the page alike.
#[tokio::test]
async fn a_failed_forward_outside_an_outage_tells_no_start() {
    let arrived = Arc::new(AtomicUsize::new(0));
    let up = never_answering(arrived.clone()).await;
    let proxy = proxy_for(&up, "response_timeout = \"300ms\"\n").await;
    assert_eq!(proxy_mode(&proxy).await, "normal");

    let json_answer = get(&proxy.url("/slow")).await;
    assert_eq!(json_answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json_answer.headers()["x-intermission-mode"], "outage");
    let doc: serde_json::Value = json(&json_answer);
    assert_eq!(doc["since"], serde_json::Value::Null, "{doc}");

    let page = get_with(&proxy.url("/slow"), &[("accept", BROWSER)]).await;
    assert_eq!(page.headers()["x-intermission-mode"], "outage");
    assert!(
        text(&page).contains("<p id=\"since-line\" class=\"meta\" hidden>"),
        "{}",
        text(&page)
    );

    let req = Request::get(proxy.url("/slow")).body(empty()).unwrap();
    let over_h2 = h2c_client().request(req).await.unwrap();
    assert_eq!(over_h2.headers()["x-intermission-mode"], "outage");
    let body = over_h2.into_body().collect().await.unwrap().to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["since"], serde_json::Value::Null, "{doc}");

    // Still normal: a timed-out answer is no failed check, and no outage began.
    assert_eq!(proxy_mode(&proxy).await, "normal");
    assert!(arrived.load(Ordering::SeqCst) >= 3);
}
