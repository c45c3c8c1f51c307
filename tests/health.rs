//! Upstream health: outage by itself when the app dies, recovery by itself when it is back,
//! and never a raw error in between.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use intermission::control::protocol::{Request as Ctl, ServerHealth};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

/// Checks often enough for a test to see the health follow the server within a second or so.
/// The timeout (at most the interval) is not short: a check that is merely slow on a loaded
/// machine counts as failed, and the very first result decides at once, so a 100 ms timeout
/// could take out a live server at start.
const FAST: &str = "[health]\ninterval = \"500ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n";

/// Only the check at start, which decides at once, with all the time it may need: for tests
/// that need one result and no check after it that could be slow and change it.
const FIRST_CHECK_ONLY: &str = "[health]\ninterval = \"1h\"\ntimeout = \"10s\"\n";

async fn app() -> Upstream {
    upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await
}

async fn proxy_for(servers: &[&Upstream], extra: &str) -> Proxy {
    let list: Vec<String> = servers.iter().map(|u| format!("\"{}\"", u.url())).collect();
    spawn_proxy(&format!(
        "[upstream]\nservers = [{}]\n{extra}",
        list.join(", ")
    ))
    .await
}

fn is_outage(resp: &Response<bytes::Bytes>) -> bool {
    resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && resp
            .headers()
            .get("x-intermission-mode")
            .is_some_and(|v| v == "outage")
        && resp.headers().contains_key("retry-after")
}

#[tokio::test(flavor = "multi_thread")]
async fn outage_by_itself_and_recovery_by_itself() {
    let up = app().await;
    let proxy = proxy_for(&[&up], FAST).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "app");

    up.stopped().await;
    // fall × interval is 1 s; the bound leaves room for a shared, loaded machine but fails
    // if the configured interval or fall were ignored (the defaults take 4 to 6 s).
    let took = wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    eprintln!("outage detected after {took:?}");
    assert!(took < Duration::from_millis(2500), "outage after {took:?}");
    let resp = get(&proxy.url("/")).await;
    assert!(is_outage(&resp), "{resp:?}");
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["mode"], "outage");
    assert_eq!(
        v["detail"],
        "We are having trouble reaching the service. We are on it."
    );
    assert_eq!(resp.headers()["retry-after"], "30");
    let status: serde_json::Value = json(&get(&proxy.url("/_intermission/status")).await);
    assert_eq!(status["mode"], "outage");

    up.restart().await;
    let took = wait_mode(&proxy, "normal", Duration::from_secs(5)).await;
    eprintln!("recovery detected after {took:?}");
    assert!(
        took < Duration::from_millis(2500),
        "recovery after {took:?}"
    );
    assert_eq!(get(&proxy.url("/")).await.body(), "app");
}

/// A server taken out is checked every `health.down_interval`, not every `interval`: an
/// application back from a restart is found within `rise` of those. With an hour's
/// interval, it would be answered as an outage for an hour.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_taken_out_is_checked_at_its_own_pace_until_it_is_back() {
    let up = app().await;
    let proxy = proxy_for(
        &[&up],
        "[health]\ninterval = \"1h\"\ndown_interval = \"100ms\"\nrise = 2\nfall = 1\n",
    )
    .await;
    assert_eq!(get(&proxy.url("/")).await.body(), "app");
    up.stopped().await;
    // The refused connection counts as a failed check, and `fall = 1` takes it out.
    assert!(is_outage(&get(&proxy.url("/")).await));
    wait_mode(&proxy, "outage", Duration::from_secs(10)).await;
    up.restart().await;
    wait_mode(&proxy, "normal", Duration::from_secs(10)).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "app");
    // Back up, it is checked every `interval` again: no check after the two that brought it
    // back (each counted in `consecutive`), however long the test waits for one.
    let h = first_server_once(&proxy, |h| h.consecutive > 2).await;
    assert_eq!((h.healthy, h.consecutive), (Some(true), 2), "{h:?}");
}

/// `health.kind = "tcp"` connects only: a server answering 500 to everything is up, one that
/// refuses connections is down, and back up when it listens again.
#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_check_follows_whether_the_server_accepts_connections() {
    let up = upstream(|_req: Request<Incoming>| async {
        Response::builder()
            .status(500)
            .body(full("broken"))
            .unwrap()
    })
    .await;
    let proxy = proxy_for(&[&up], &format!("{FAST}kind = \"tcp\"\n")).await;
    // Several checks have passed (an HTTP check would have failed each: 500 is not 200-399).
    let h = first_server_once(&proxy, |h| h.healthy == Some(true) && h.consecutive >= 3).await;
    assert!(
        h.healthy == Some(true) && h.consecutive >= 3,
        "the tcp check did not pass three times in a row: {h:?}"
    );
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resp.body(), "broken");

    up.stop();
    wait_mode(&proxy, "outage", Duration::from_secs(10)).await;
    assert!(is_outage(&get(&proxy.url("/")).await));
    assert_eq!(wait_health(&proxy, Some(false)).await, Some(false));
    up.restart().await;
    wait_mode(&proxy, "normal", Duration::from_secs(10)).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "broken");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_health_endpoint_is_down_and_force_open_forwards_anyway() {
    let up = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/healthz" {
            Response::builder()
                .status(500)
                .body(full("broken"))
                .unwrap()
        } else {
            Response::new(full("app works"))
        }
    })
    .await;
    // The one check (at start) decides: a later one that merely timed out on a loaded
    // machine would replace the "500" of the last error.
    let proxy = proxy_for(&[&up], &format!("{FIRST_CHECK_ONLY}path = \"/healthz\"\n")).await;
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    assert!(is_outage(&get(&proxy.url("/")).await));
    let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
    assert_eq!(h[0].healthy, Some(false));
    assert!(h[0].last_error.as_deref().unwrap().contains("500"), "{h:?}");

    let r = ctl(&proxy, Ctl::ForceOpen { enabled: true }).await;
    assert!(r.state.unwrap().force_open);
    assert_eq!(proxy_mode(&proxy).await, "normal");
    assert_eq!(get(&proxy.url("/")).await.body(), "app works");
    ctl(&proxy, Ctl::ForceOpen { enabled: false }).await;
    assert_eq!(proxy_mode(&proxy).await, "outage");
}

/// An application that answers only the names it serves (Django's `ALLOWED_HOSTS` answers
/// any other `Host` with 400, as does a virtual host) was checked under the server's own
/// `host:port`: every check failed, and the whole site showed the outage page while the
/// application answered its visitors. `health.host` names the site in the checks.
#[tokio::test(flavor = "multi_thread")]
async fn health_host_names_the_site_to_an_application_that_checks_the_host() {
    let up = upstream(|req: Request<Incoming>| async move {
        let host = req.headers().get("host").and_then(|v| v.to_str().ok());
        if host == Some("shop.example.com") {
            Response::new(full(format!("served {}", req.uri().path())))
        } else {
            Response::builder()
                .status(400)
                .body(full("DisallowedHost"))
                .unwrap()
        }
    })
    .await;
    let checks = format!("{FIRST_CHECK_ONLY}path = \"/healthz\"\n");
    // The server's own name, as before: the check is refused, and the site is down.
    let proxy = proxy_for(&[&up], &checks).await;
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
    assert!(h[0].last_error.as_deref().unwrap().contains("400"), "{h:?}");
    drop(proxy);

    let proxy = proxy_for(&[&up], &format!("{checks}host = \"shop.example.com\"\n")).await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    assert_eq!(proxy_mode(&proxy).await, "normal");
    // Visitors' requests keep their own Host.
    let resp = send(
        Request::get(proxy.url("/page"))
            .header("host", "shop.example.com")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.body(), "served /page");
}

#[tokio::test(flavor = "multi_thread")]
async fn planned_maintenance_stays_when_the_upstream_recovers() {
    let up = app().await;
    let proxy = proxy_for(&[&up], FAST).await;
    ctl(
        &proxy,
        Ctl::On {
            message: Some("Planned".into()),
            until: None,
            retry_after: None,
            reason: None,
        },
    )
    .await;
    up.stop();
    let h = wait_health(&proxy, Some(false)).await;
    assert_eq!(h, Some(false));
    assert_eq!(
        proxy_mode(&proxy).await,
        "maintenance",
        "planned maintenance wins over outage"
    );
    up.restart().await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    assert_eq!(
        proxy_mode(&proxy).await,
        "maintenance",
        "recovery must not end planned maintenance"
    );
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.headers()["x-intermission-mode"], "maintenance");
    ctl(&proxy, Ctl::Off).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "app");
}

async fn wait_health(proxy: &Proxy, want: Option<bool>) -> Option<bool> {
    first_server_once(proxy, |h| h.healthy == want)
        .await
        .healthy
}

/// The first server's line of `ctl health` once `done` holds of it, or the last one seen
/// after 5 s.
async fn first_server_once(
    proxy: &Proxy,
    mut done: impl FnMut(&ServerHealth) -> bool,
) -> ServerHealth {
    let mut last = ctl(proxy, Ctl::Health).await.health.unwrap().remove(0);
    for _ in 0..250 {
        if done(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        last = ctl(proxy, Ctl::Health).await.health.unwrap().remove(0);
    }
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_requests_take_a_server_out_without_waiting_for_the_next_check() {
    let up = app().await;
    // Only the check at start runs during this test: the rest is passive.
    let proxy = proxy_for(
        &[&up],
        "[health]\ninterval = \"1h\"\ntimeout = \"1s\"\nfall = 2\nrise = 2\n",
    )
    .await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    up.stopped().await;
    for _ in 0..2 {
        assert!(is_outage(&get(&proxy.url("/")).await), "never a raw error");
    }
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    let kept = first_server_once(&proxy, |h| h.healthy == Some(false)).await;
    // A connection the stopping server took and closed is not counted, and brings a check
    // forward instead, which the refusal then fails: either way out in seconds, not the hour.
    let last = kept.last_error.as_deref().unwrap_or_default();
    assert!(
        last.contains("request failed") || last.contains("refused"),
        "{kept:?}"
    );
    // Two failures in a row. A reload that restarts the checkers carries the count on: `ctl
    // health` does not say "down since 09:11 (1 result in a row)", and a server two failures
    // from being taken out is still two failures from it. Nothing but the new checker's
    // first check can move the count now.
    assert_eq!(kept.consecutive, 2, "{kept:?}");
    edit_config(&proxy, |text| {
        text.replace("timeout = \"1s\"", "timeout = \"900ms\"")
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let h = first_server_once(&proxy, |h| h.consecutive != kept.consecutive).await;
    // 3 from the new checker's first check, or more: a server out is checked every
    // `down_interval`, and a loaded machine can run two checks between two looks. A count
    // started again would read 1.
    assert!(h.consecutive >= 3, "{kept:?} then {h:?}");
    assert_eq!((h.healthy, h.since), (kept.healthy, kept.since));
}

/// A proxy in front of `up` alone that only the check at start and the requests' failures
/// can move (`fall = 2`), once that check has found it healthy.
async fn passive_only(up: &Upstream, upstream_extra: &str, health_extra: &str) -> Proxy {
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\"]\n{upstream_extra}\
         [health]\ninterval = \"1h\"\nfall = 2\n{health_extra}",
        up.url()
    ))
    .await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    proxy
}

/// The last error of a server that failed requests not counted against it, once shown, after
/// checking that it is still in and answering.
async fn kept_in_after_uncounted_failures(proxy: &Proxy) -> String {
    let h = first_server_once(proxy, |h| h.last_error.is_some()).await;
    let error = h.last_error.clone().unwrap_or_default();
    assert!(error.contains("request failed, not counted"), "{h:?}");
    assert!(h.last_error_at.is_some(), "when it happened: {h:?}");
    assert_eq!(h.healthy, Some(true), "{h:?}");
    let resp = get(&proxy.url("/")).await;
    assert_eq!(resp.body(), "app", "{resp:?}");
    error
}

/// A timeout says the server was slow, not gone: one slow page reaching `response_timeout`
/// (or, under a burst of new connections, connects waiting past `connect_timeout`) must not
/// take out a server that answers everything else, and with it the whole site. The requests
/// that timed out get the outage answer; the active check decides the server's health.
#[tokio::test(flavor = "multi_thread")]
async fn requests_that_time_out_do_not_take_a_server_out() {
    let up = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/report" {
            std::future::pending::<()>().await;
        }
        Response::new(full("app"))
    })
    .await;
    let proxy = passive_only(&up, "response_timeout = \"200ms\"\n", "").await;
    for _ in 0..3 {
        assert!(
            is_outage(&get(&proxy.url("/report")).await),
            "never a raw error"
        );
    }
    let error = kept_in_after_uncounted_failures(&proxy).await;
    assert!(error.contains("200ms"), "{error}");
}

/// One page whose answer has a head too large to pass on gets the outage answer, on the relay
/// and on hyper's path, and does not take out the server, which answers the rest.
#[tokio::test(flavor = "multi_thread")]
async fn answers_with_a_head_too_large_do_not_take_a_server_out() {
    let up = upstream(|req: Request<Incoming>| async move {
        let mut resp = Response::new(full("app"));
        if req.uri().path() == "/huge" {
            let big = http::HeaderValue::from_str(&"x".repeat(100_000)).unwrap();
            resp.headers_mut().insert("x-big", big);
        }
        resp
    })
    .await;
    let proxy = passive_only(&up, "", "").await;
    for _ in 0..2 {
        assert!(is_outage(&get(&proxy.url("/huge")).await), "relay");
        // An HTTP/2 client's request goes through hyper.
        let resp = h2c_client()
            .request(Request::get(proxy.url("/huge")).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 503, "hyper's path: {resp:?}");
        assert_eq!(resp.headers()["x-intermission-mode"], "outage");
    }
    kept_in_after_uncounted_failures(&proxy).await;
}

/// An application on 127.0.0.1 written byte by byte: `/crash` closes the connection without a
/// word (a worker that dies on that page), `/garbage` answers what is no HTTP, `/upgrade`
/// answers a `101` nobody asked for; anything else (the health check included) gets `app`,
/// unless `broken` is set: then every request is closed unanswered.
async fn crashing_app(broken: Arc<AtomicBool>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let broken = broken.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let answer: &[u8] = if head.starts_with("GET /crash ")
                            || broken.load(Ordering::SeqCst)
                        {
                            return;
                        } else if head.starts_with("GET /garbage ") {
                            b"HTTP/1.1 2oo OK\r\n\r\n"
                        } else if head.starts_with("GET /upgrade ") {
                            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\napp"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A request the server fails after taking its connection (closed unanswered, a malformed or
/// unasked answer) gets the outage answer, and does not count against the server: any client
/// could bring it about on one page, and three of them took a single server out, and with it
/// the whole site. The active check speaks for the server. With TCP checks, which cannot
/// see such a server failing, they still count.
#[tokio::test(flavor = "multi_thread")]
async fn requests_a_server_fails_after_taking_them_do_not_take_it_out() {
    let (addr, _app) = crashing_app(Arc::default()).await;
    let config = |health: &str| {
        format!(
            "[upstream]\nservers = [\"http://{addr}\"]\n\
             [health]\ninterval = \"1h\"\nfall = 2\n{health}"
        )
    };
    let proxy = spawn_proxy(&config("")).await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    for path in ["/crash", "/garbage", "/upgrade"] {
        for _ in 0..3 {
            let resp = get(&proxy.url(path)).await;
            assert!(is_outage(&resp), "{path}: never a raw error: {resp:?}");
            // An HTTP/2 client's request goes through hyper.
            let resp = h2c_client()
                .request(Request::get(proxy.url(path)).body(empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.headers()["x-intermission-mode"], "outage", "{path}");
        }
    }
    kept_in_after_uncounted_failures(&proxy).await;
    assert_eq!(proxy_mode(&proxy).await, "normal");

    let proxy = spawn_proxy(&config("kind = \"tcp\"\n")).await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    for _ in 0..2 {
        assert!(is_outage(&get(&proxy.url("/crash")).await));
    }
    let h = first_server_once(&proxy, |h| h.healthy == Some(false)).await;
    assert!(
        h.last_error
            .as_deref()
            .unwrap_or_default()
            .starts_with("request failed: "),
        "{h:?}"
    );
}

/// A server that goes on taking connections but fails every request, its health path too, is
/// found by the checks its failed requests bring forward (at most one per `health.timeout`):
/// out at once, with an hour between regular checks, as refused connections take a dead one
/// out. Its requests get the outage answer meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_fails_every_request_is_checked_at_once_and_taken_out() {
    let broken = Arc::new(AtomicBool::new(false));
    let (addr, _app) = crashing_app(broken.clone()).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{addr}\"]\n\
         [health]\ninterval = \"1h\"\ntimeout = \"200ms\"\nfall = 2\n"
    ))
    .await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    broken.store(true, Ordering::SeqCst);
    let url = proxy.url("/");
    let out = wait_until_async(|| {
        let (url, proxy) = (url.clone(), &proxy);
        async move {
            let resp = get(&url).await;
            assert!(is_outage(&resp), "never a raw error: {resp:?}");
            proxy_mode(proxy).await == "outage"
        }
    })
    .await;
    assert!(out, "still not taken out");
    // Out by its checks: the requests' failures are not counted (the last error shown may
    // be one of theirs, "not counted", that came after the check that decided).
    let h = first_server_once(&proxy, |h| h.healthy == Some(false)).await;
    assert!(h.last_check.is_some(), "{h:?}");
}

/// The "forwarding failed" lines the proxy wrote so far: how many, and how many failures they
/// account for (each one, and the "N more since the last line" it says).
fn failure_lines(proxy: &ProxyProcess) -> (u64, u64) {
    let mut tally = (0, 0);
    for line in proxy.log_lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let message = v["message"].as_str().unwrap_or_default();
        if v["level"] != "WARN" || !message.starts_with("forwarding failed") {
            continue;
        }
        let more = message
            .rsplit_once(" (")
            .and_then(|(_, tail)| tail.strip_suffix(" more since the last line)"))
            .map_or(0, |n| n.parse::<u64>().unwrap());
        tally = (tally.0 + 1, tally.1 + 1 + more);
    }
    tally
}

/// A server that closes every request unanswered while its health path answers stays in,
/// and every request gets the outage answer with a warning: one a request wrote 29,088 lines
/// in 25 s at 1,000 requests a second, which buried the health and mode lines. At most one a
/// second is written for the server, through the relay and hyper alike, the next saying how
/// many were not: the counts add up to every failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_fails_every_request_writes_a_line_a_second() {
    let (addr, _app) = crashing_app(Arc::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ProxyProcess::start(
        dir.path(),
        &format!(
            "[upstream]\nservers = [\"http://{addr}\"]\n[health]\ninterval = \"1h\"\n\
             [log]\nformat = \"json\"\naccess_log = false\n"
        ),
    );
    let healthy = wait_until_async(|| async {
        let health = proxy.ctl(&Ctl::Health).await.ok().and_then(|r| r.health);
        health.is_some_and(|h| h[0].healthy == Some(true))
    })
    .await;
    assert!(healthy, "never checked");
    let began = std::time::Instant::now();
    let url = proxy.url("/crash");
    let burst: Vec<_> = (0..200)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                // Every other one over HTTP/2, which goes through hyper.
                let mode = if i % 2 == 0 {
                    get(&url).await.headers()["x-intermission-mode"].clone()
                } else {
                    let req = Request::get(&url).body(empty()).unwrap();
                    h2c_client().request(req).await.unwrap().headers()["x-intermission-mode"]
                        .clone()
                };
                assert_eq!(mode, "outage");
            })
        })
        .collect();
    for request in burst {
        request.await.unwrap();
    }
    // The failures not written yet are told by the next line written, a second after the
    // last: one more failed request at a time until it comes.
    let mut sent = 200;
    let mut added_up = false;
    for _ in 0..50 {
        if wait_until(Duration::from_millis(200), || {
            failure_lines(&proxy).1 == sent
        })
        .await
        {
            added_up = true;
            break;
        }
        assert!(is_outage(&get(&url).await));
        sent += 1;
    }
    let (lines, told) = failure_lines(&proxy);
    assert!(
        added_up,
        "{lines} lines told of {told} failures, not {sent}"
    );
    let seconds = began.elapsed().as_secs();
    assert!(
        lines <= seconds + 2,
        "{lines} lines in {seconds} s for {sent} failed requests"
    );
}

/// With TCP checks, which an application that accepts and never answers passes, the requests
/// that time out are all that shows it hung: they count.
#[tokio::test(flavor = "multi_thread")]
async fn with_tcp_checks_requests_that_time_out_take_a_server_out() {
    let up = upstream(|_req: Request<Incoming>| async move {
        std::future::pending::<()>().await;
        Response::new(full("never"))
    })
    .await;
    let proxy = passive_only(&up, "response_timeout = \"200ms\"\n", "kind = \"tcp\"\n").await;
    for _ in 0..2 {
        assert!(is_outage(&get(&proxy.url("/")).await), "never a raw error");
    }
    let h = first_server_once(&proxy, |h| h.healthy == Some(false)).await;
    let error = h.last_error.clone().unwrap_or_default();
    assert!(
        error.starts_with("request failed: ") && error.contains("200ms"),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_server_dead_from_the_start_every_request_succeeds() {
    let live = app().await;
    let dead = refusing();
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{}\", \"{}\"]\n{FIRST_CHECK_ONLY}",
        dead.addr,
        live.url()
    ))
    .await;
    for i in 0..50 {
        let resp = get(&proxy.url("/")).await;
        assert_eq!(resp.status(), 200, "request {i}: {resp:?}");
        assert_eq!(resp.body(), "app");
    }
    let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
    assert_eq!(h[0].healthy, Some(false));
    assert_eq!(proxy_mode(&proxy).await, "normal");
}

/// Checks once an hour: only the retry can save the requests that go to the dead server.
const SLOW_CHECKS: &str = "[health]\ninterval = \"1h\"\ntimeout = \"1s\"\nfall = 1000\nrise = 1\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_request_to_a_server_that_just_died_is_retried_on_another() {
    let doomed = app().await;
    let live = upstream(|_req: Request<Incoming>| async { Response::new(full("live")) }).await;
    let proxy = proxy_for(&[&doomed, &live], SLOW_CHECKS).await;
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(get(&proxy.url("/")).await.body().clone());
    }
    assert!(
        bodies.iter().any(|b| b == "app"),
        "both are used: {bodies:?}"
    );
    doomed.stopped().await;
    // Round-robin sends every other request to the dead server, which is still counted as
    // healthy (fall = 1000): each of those is refused and must be retried on the live one.
    for i in 0..10 {
        let resp = get(&proxy.url("/")).await;
        assert_eq!(resp.status(), 200, "request {i}: {resp:?}");
        assert_eq!(resp.body(), "live", "request {i}");
    }
    let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
    assert!(
        h[0].last_error
            .as_deref()
            .is_some_and(|e| e.contains("request failed")),
        "the failures were the dead server's: {h:?}"
    );
}

/// A WebSocket asked for while round-robin points at a server that just died (still counted
/// healthy) opens on the live one, as a `GET` would be answered by it: the handshake never
/// reached the dead one. Clients reconnect all at once when their server goes (a deploy),
/// and each that met the dead one got a `503` instead of a tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_to_a_server_that_just_died_opens_on_another() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let doomed = switching_upstream().await;
    let live = switching_upstream().await;
    let proxy = proxy_for(&[&doomed.server, &live.server], SLOW_CHECKS).await;
    assert!(
        all_servers_healthy(&proxy).await,
        "both servers are checked healthy"
    );
    doomed.server.stopped().await;
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = ask_to_switch(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "tunnel {i}: {head}");
        s.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echoed))
            .await
            .expect("bounded")
            .unwrap();
        assert_eq!(&echoed, b"ping", "tunnel {i}");
    }
    assert_eq!(doomed.open.load(Ordering::SeqCst), 0);
}

/// Answers with the request's method and body.
async fn echo_body(name: &'static str) -> Upstream {
    upstream(move |req: Request<Incoming>| async move {
        let method = req.method().clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(format!(
            "{name} {method} {}",
            String::from_utf8_lossy(&body)
        )))
    })
    .await
}

/// `body` sent to `url` with `method` over HTTP/1.1, its length announced.
async fn upload(method: http::Method, url: &str, body: &'static str) -> Response<bytes::Bytes> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-length", body.len())
        .body(full(body))
        .unwrap();
    send(req).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_idempotent_upload_is_retried_whole_on_another_server() {
    let doomed = echo_body("doomed").await;
    let live = echo_body("live").await;
    let proxy = proxy_for(&[&doomed, &live], SLOW_CHECKS).await;
    // The check at start has passed for both (a first result decides at once).
    assert!(
        all_servers_healthy(&proxy).await,
        "both servers are checked healthy"
    );
    doomed.stopped().await;
    // Every other PUT goes to the dead server first; its body was read whole before
    // forwarding, so the retry carries it.
    for i in 0..6 {
        let resp = upload(http::Method::PUT, &proxy.url("/orders/42"), "order-42").await;
        assert_eq!(resp.status(), 200, "request {i}: {resp:?}");
        assert_eq!(resp.body(), "live PUT order-42", "request {i}");
    }
    // A POST whose first server refused the connection never reached it: it goes to the
    // live one, as nginx's `proxy_next_upstream error` sends it (the outage page answered
    // it before, though nothing had been sent).
    for i in 0..4 {
        let resp = upload(http::Method::POST, &proxy.url("/orders"), "order-43").await;
        assert_eq!(resp.status(), 200, "POST {i}: {resp:?}");
        assert_eq!(resp.body(), "live POST order-43", "POST {i}");
    }
    // The same for an HTTP/2 client's bodiless POST (hyper's path).
    for i in 0..4 {
        let resp = h2c_client()
            .request(
                Request::post(proxy.url("/orders/44/confirm"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "HTTP/2 POST {i}: {resp:?}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "live POST ", "HTTP/2 POST {i}");
    }
}

/// A request whose first server refused its connection goes to another whatever its body: a
/// streamed one (chunked over HTTP/1.1, of no stated length over HTTP/2) too, since nothing
/// of it was sent, to `http://` and `h2c://` servers alike. It got the outage answer before,
/// so that each restart of a server cost every upload sent to it until its checks took it
/// out. The request reaches the other server rewritten once (`X-Forwarded-For` names the
/// client once, the host is the client's).
#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_upload_whose_connection_was_refused_goes_to_another_server() {
    for scheme in ["http", "h2c"] {
        let doomed = echo_upstream().await;
        let live = echo_upstream().await;
        let proxy = spawn_proxy(&format!(
            "[upstream]\nservers = [\"{scheme}://{}\", \"{scheme}://{}\"]\n{SLOW_CHECKS}",
            doomed.addr, live.addr
        ))
        .await;
        assert!(
            all_servers_healthy(&proxy).await,
            "both servers are checked healthy"
        );
        doomed.stopped().await;
        for i in 0..4 {
            for http2 in [false, true] {
                let (tx, body) = mpsc_body();
                tx.send("part one, ".into()).await.unwrap();
                tx.send("part two".into()).await.unwrap();
                drop(tx);
                let req = Request::post(proxy.url("/upload")).body(body).unwrap();
                let client = if http2 { h2c_client() } else { client() };
                let what = format!("{scheme} server, HTTP/2 client {http2}, upload {i}");
                let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                    .await
                    .expect("bounded")
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK, "{what}: {resp:?}");
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let seen: Seen = serde_json::from_slice(&body).unwrap();
                assert_eq!(seen.method, "POST", "{what}");
                assert_eq!(seen.body, "part one, part two", "{what}");
                assert_eq!(
                    seen.header("x-forwarded-for"),
                    Some("127.0.0.1"),
                    "{what}: {seen:?}"
                );
                let host = proxy.addr.to_string();
                assert_eq!(
                    seen.header("x-forwarded-host"),
                    Some(host.as_str()),
                    "{what}: {seen:?}"
                );
                if scheme == "http" {
                    assert_eq!(seen.header("host"), Some(host.as_str()), "{what}: {seen:?}");
                }
            }
        }
        // An HTTP/1.0 client names no host: the server that takes its upload gets its own as
        // `Host`, not the refusing one's, which the first try had put there.
        for i in 0..4 {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            if scheme == "h2c" {
                break;
            }
            let body = "z".repeat(70_000);
            let mut raw = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            let head = format!(
                "POST /upload HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            raw.write_all(head.as_bytes()).await.unwrap();
            raw.write_all(body.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
                .await
                .expect("bounded")
                .unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
                "upload {i}: {answer:.300}"
            );
            let json = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
            let seen: Seen = serde_json::from_str(json).unwrap();
            let live = live.addr.to_string();
            assert_eq!(seen.header("host"), Some(live.as_str()), "upload {i}");
            assert_eq!(seen.body.len(), 70_000, "upload {i}");
        }
        // The refusals were counted against the dead server, each retried.
        let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
        assert!(
            h[0].last_error
                .as_deref()
                .is_some_and(|e| e.contains("request failed")),
            "{scheme}: {h:?}"
        );
    }
}

/// An upload answered with the outage response when its server refused it (`force-open`, a
/// bypass): its body is read and dropped, as a held one's, and the connection kept, so that
/// a request pipelined behind it is answered. hyper closed the connection of a body dropped
/// beyond what one read held, and the answer had not said so (no `Connection: close`): the
/// request behind was lost with no word (RFC 9112 §9.6). Where the connection does close (a
/// client waiting for `100 Continue`, a body past the 16 MiB read and dropped), the answer
/// says so.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_answered_with_the_outage_keeps_its_connection_or_says_it_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dead, proxy) = forced_open_to_a_refusing_server().await;
    let within = Duration::from_secs(10);
    // Larger than a read: hyper's path, not the relay's, which holds a body whole.
    let body = "z".repeat(70_000);
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let sent = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}\
         GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len()
    );
    tcp.write_all(sent.as_bytes()).await.unwrap();
    // Both answers may come in one read.
    let answers = read_responses(&mut tcp, 2).await;
    let (first, next) = (&answers[0], &answers[1]);
    assert!(first.starts_with("HTTP/1.1 503"), "{first}");
    assert!(is_outage_head(first), "{first}");
    assert!(!says_close(first), "{first}");
    assert!(next.starts_with("HTTP/1.1 503"), "{next}");
    assert!(is_outage_head(next), "{next}");

    let cases = [
        // Waits for `100 Continue`, which would ask for the body the answer refuses.
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\nExpect: 100-continue\r\n\r\n"
            .to_owned(),
        // More than is read and dropped.
        format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            20 << 20
        ),
    ];
    for case in cases {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(case.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        let closed = tokio::time::timeout(within, tcp.read_to_end(&mut all)).await;
        let all = String::from_utf8_lossy(&all).into_owned();
        assert!(closed.is_ok(), "still open: {all}");
        assert!(all.starts_with("HTTP/1.1 503"), "{all}");
        assert!(is_outage_head(&all), "{all}");
        assert!(says_close(&all), "{all}");
    }
}

/// A proxy forced open to a server that refuses connections, checked too slowly to mark it
/// down: each request meets the refusal, and gets the outage answer.
async fn forced_open_to_a_refusing_server() -> (Refusing, Proxy) {
    let dead = refusing();
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{}\"]\n{SLOW_CHECKS}",
        dead.addr
    ))
    .await;
    assert!(ctl(&proxy, Ctl::ForceOpen { enabled: true }).await.ok);
    (dead, proxy)
}

/// A small upload that waited for `100 Continue` is read whole before it is sent (kept for a
/// retry on another server): answered with the outage once its server refused it, its
/// connection is kept, as any answered request's whose body was read. It said
/// `Connection: close`, taken for a body given back unread.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_upload_read_whole_then_refused_keeps_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dead, proxy) = forced_open_to_a_refusing_server().await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(
        b"PUT /small HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("no answer to the head")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    tcp.write_all(&[b'z'; 2000]).await.unwrap();
    tcp.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answers = read_responses(&mut tcp, 2).await;
    let (first, next) = (&answers[0], &answers[1]);
    assert!(is_outage_head(first), "{first}");
    assert!(!says_close(first), "{first}");
    assert!(next.starts_with("HTTP/1.1 503"), "{next}");
}

/// An upload of which the server took a part before it failed (closed unanswered): the rest
/// of its body is never read, and hyper closes the connection after the outage answer, which
/// says so (RFC 9112 §9.6), so that a client that pipelined a request behind knows it was
/// lost. hyper says so itself when it sees the body dropped before it writes the answer's
/// head (as it did here before `forward::Rest::Lost`); the gateway says it whatever the order.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_its_server_took_part_of_gets_an_outage_answer_that_says_it_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    // Each connection is read until 10,000 bytes of a POST's body have come, then closed
    // unanswered; health checks' too, which `SLOW_CHECKS` never lets mark it down.
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = server.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = conn.read(&mut chunk).await {
                    got.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&got);
                    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
                    if (got.len() >= 4 && !text.starts_with("POST")) || body >= 10_000 {
                        break;
                    }
                }
            });
        }
    });
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{addr}\"]\n{SLOW_CHECKS}"
    ))
    .await;
    assert!(ctl(&proxy, Ctl::ForceOpen { enabled: true }).await.ok);
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The rest of the body (60,000 bytes) and a request behind it are never sent: the
    // connection must close of itself, with the answer saying it does.
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&[b'z'; 10_000]).await.unwrap();
    let mut all = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all)).await;
    let all = String::from_utf8_lossy(&all).into_owned();
    assert!(closed.is_ok(), "still open: {all}");
    assert!(all.starts_with("HTTP/1.1 503"), "{all}");
    assert!(is_outage_head(&all), "{all}");
    assert!(says_close(&all), "{all}");
}

/// Whether a response's head, as `read_response` gives it, says `Connection: close`.
fn says_close(resp: &str) -> bool {
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .any(|l| l.eq_ignore_ascii_case("connection: close"))
}

fn is_outage_head(resp: &str) -> bool {
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .any(|l| l.eq_ignore_ascii_case("x-intermission-mode: outage"))
}

/// A POST is never sent twice: one the server got and failed (closed unanswered) gets the
/// outage answer, not a second try on another server, which could place the order twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_post_a_server_got_and_failed_is_not_sent_again() {
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closer = listener.local_addr().unwrap();
    // Reads the request, then closes without a word.
    std::thread::spawn(move || {
        use std::io::Read;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            if stream
                .read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"POST"))
            {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let live = echo_body("live").await;
    // TCP checks, which the closing server passes: it stays in the rotation.
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"http://{closer}\", \"{}\"]\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\nfall = 1000\n",
        live.url()
    ))
    .await;
    let mut held = 0;
    for _ in 0..2 {
        let resp = upload(http::Method::POST, &proxy.url("/orders"), "order-44").await;
        match resp.status().as_u16() {
            200 => assert_eq!(resp.body(), "live POST order-44"),
            503 => held += 1,
            other => panic!("a raw {other}"),
        }
    }
    assert_eq!(held, 1, "one of two POSTs went to the failing server");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the failing server got one POST"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_held_for_a_retry_that_stalls_gets_408() {
    let a = echo_body("a").await;
    let b = echo_body("b").await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\", \"{}\"]\nresponse_timeout = \"300ms\"\n{SLOW_CHECKS}",
        a.url(),
        b.url()
    ))
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Half of the announced body, then nothing.
    s.write_all(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("no answer to a stalled upload")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // Nothing reached either server, and both are still healthy.
    let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
    assert!(h.iter().all(|s| s.healthy != Some(false)), "{h:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_times_out_is_retried_on_another_server() {
    // Answers its health checks, but never a real request.
    let reached = Arc::new(AtomicUsize::new(0));
    let counted = reached.clone();
    let hung = upstream(move |req: Request<Incoming>| {
        let counted = counted.clone();
        async move {
            if !is_health_check(&req) {
                counted.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            Response::new(full("hung"))
        }
    })
    .await;
    let live = upstream(|_req: Request<Incoming>| async { Response::new(full("live")) }).await;
    let proxy = spawn_proxy(&format!(
        "[upstream]\nservers = [\"{}\", \"{}\"]\nresponse_timeout = \"300ms\"\n{SLOW_CHECKS}",
        hung.url(),
        live.url()
    ))
    .await;
    for i in 0..4 {
        let resp = get(&proxy.url("/")).await;
        assert_eq!(resp.status(), 200, "request {i}: {resp:?}");
        assert_eq!(resp.body(), "live", "request {i}");
    }
    // Round-robin still alternates: the retries on the live server did not move it on, which
    // would send every request to the hung one first, each then waiting `response_timeout`.
    assert_eq!(
        reached.load(Ordering::SeqCst),
        2,
        "every other GET went to the hung server first, not every one"
    );
    // A POST cannot be sent twice: when it lands on the hung server, the client gets the
    // outage answer instead (never a 504).
    let mut held = 0;
    for _ in 0..4 {
        let resp = send(Request::post(proxy.url("/")).body(full("order")).unwrap()).await;
        match resp.status().as_u16() {
            200 => assert_eq!(resp.body(), "live"),
            503 => {
                assert!(is_outage(&resp), "{resp:?}");
                held += 1;
            }
            other => panic!("a raw {other}: {resp:?}"),
        }
    }
    assert_eq!(
        held, 2,
        "round-robin sent two of four POSTs to the hung server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn intercepted_statuses_become_the_outage_response() {
    let up = upstream(|req: Request<Incoming>| async move {
        match req.uri().path() {
            "/broken" => Response::builder()
                .status(502)
                .body(full("nginx says bad gateway"))
                .unwrap(),
            _ => Response::new(full("fine")),
        }
    })
    .await;
    let proxy = proxy_for(&[&up], "intercept_statuses = [502, 504]\n").await;
    let resp = get(&proxy.url("/broken")).await;
    assert!(is_outage(&resp), "{resp:?}");
    assert!(!String::from_utf8_lossy(resp.body()).contains("bad gateway"));
    let page = send(
        Request::get(proxy.url("/broken"))
            .header("accept", "text/html")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(get(&proxy.url("/ok")).await.body(), "fine");
}

/// The promise: while the app is killed and restarted again and again under load, every
/// answer is the app's or an outage holding response. No 502, no 504, no reset.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_kill_and_restart_under_load_never_shows_a_raw_error() {
    let up = Arc::new(app().await);
    let proxy = proxy_for(&[&up], FAST).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, held, bad) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut clients = Vec::new();
    for n in 0..2 {
        let (url, stop, ok, held, bad) = (
            proxy.url("/load"),
            stop.clone(),
            ok.clone(),
            held.clone(),
            bad.clone(),
        );
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < 100_000 {
                i += 1;
                // One client also sends POSTs, which are never retried.
                let req = if n == 1 && i % 2 == 0 {
                    Request::post(&url).body(full("order")).unwrap()
                } else {
                    Request::get(&url).body(empty()).unwrap()
                };
                match c.request(req).await {
                    Ok(resp) => {
                        use http_body_util::BodyExt;
                        let (parts, body) = resp.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes());
                        let resp = Response::from_parts(parts, body.unwrap_or_default());
                        if resp.status() == 200 && resp.body() == "app" {
                            ok.fetch_add(1, Ordering::SeqCst);
                        } else if is_outage(&resp) {
                            held.fetch_add(1, Ordering::SeqCst);
                        } else {
                            bad.lock().unwrap().push(format!(
                                "{} {:?}",
                                resp.status(),
                                resp.body()
                            ));
                        }
                    }
                    Err(e) => bad.lock().unwrap().push(format!("connection error: {e}")),
                }
            }
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        up.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        up.restart().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, held) = (ok.load(Ordering::SeqCst), held.load(Ordering::SeqCst));
    let bad = bad.lock().unwrap().clone();
    eprintln!(
        "chaos: {ok} from the app, {held} held as outage, {} bad",
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "raw errors reached clients: {:?}",
        &bad[..bad.len().min(10)]
    );
    assert!(
        ok > 0 && held > 0,
        "the test did not exercise both states: ok={ok} held={held}"
    );
}

use std::sync::Mutex;

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_during_an_outage_keeps_what_is_known_of_health() {
    let up = app().await;
    let proxy = proxy_for(&[&up], FAST).await;
    up.stop();
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    let before = ctl(&proxy, Ctl::Health).await.health.unwrap()[0].clone();
    let down_since = before.since;
    assert!(down_since.is_some());
    // A change to [health] restarts the checkers; the dead server must stay out.
    edit_config(&proxy, |text| {
        text.replace("interval = \"500ms\"", "interval = \"600ms\"")
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    assert_eq!(proxy_mode(&proxy).await, "outage");
    assert!(is_outage(&get(&proxy.url("/")).await));
    // `ctl health` still says since when it has been down, once a new checker has checked.
    let h = first_server_once(&proxy, |h| h.last_check > before.last_check).await;
    assert!(
        h.last_check > before.last_check,
        "no check after the reload"
    );
    assert_eq!((h.healthy, h.since), (Some(false), down_since));
    // A server added meanwhile is not taken for healthy before it has been checked: the
    // reload does not announce a recovery. Once it passes its checks, the outage ends.
    let added = app().await;
    edit_config(&proxy, |text| {
        text.replace(
            &format!("servers = [\"{}\"]", up.url()),
            &format!("servers = [\"{}\", \"{}\"]", up.url(), added.url()),
        )
    });
    let r = ctl(&proxy, Ctl::Reload).await;
    let mode = r.state.as_ref().map(|s| s.mode.as_str());
    assert_eq!(mode, Some("outage"), "{r:?}");
    wait_mode(&proxy, "normal", Duration::from_secs(5)).await;
    assert_eq!(get(&proxy.url("/")).await.body(), "app");
}

/// A server a reload adds during an outage starts down before any check: `ctl health` says
/// why, and what it needs to be back, where it showed a bare `DOWN`.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_added_during_an_outage_says_why_it_is_down() {
    let up = app().await;
    let proxy = proxy_for(&[&up], FAST).await;
    up.stop();
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    let dead = refusing();
    edit_config(&proxy, |text| {
        text.replace(
            &format!("servers = [\"{}\"]", up.url()),
            &format!("servers = [\"http://{}\", \"{}\"]", dead.addr, up.url()),
        )
    });
    assert!(ctl(&proxy, Ctl::Reload).await.ok);
    let h = first_server_once(&proxy, |h| h.last_check.is_some()).await;
    assert_eq!(h.healthy, Some(false), "{h:?}");
    assert!(h.added_in_outage, "{h:?}");
    assert_eq!(h.passes_needed, Some(2), "{h:?}");
    assert!(h.last_check.is_some(), "never checked: {h:?}");
    // The server that was down before the reload is not new.
    let old = ctl(&proxy, Ctl::Health).await.health.unwrap().remove(1);
    assert!(!old.added_in_outage, "{old:?}");
    assert_eq!(old.passes_needed, Some(2), "{old:?}");
    // Back, it is no longer new.
    let listener = dead.listen();
    let served = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(full("app")))
                });
                let io = hyper_util::rt::TokioIo::new(s);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    let h = first_server_once(&proxy, |h| h.healthy == Some(true)).await;
    assert_eq!(h.healthy, Some(true), "{h:?}");
    assert!(!h.added_in_outage, "{h:?}");
    assert_eq!(h.passes_needed, None, "{h:?}");
    served.abort();
}

/// What an operator says during an outage, in the tests of its words.
const SAID: &str = "Restoring the database from last night's backup.";

/// Waits up to `limit` for the outage, then says `SAID` in it with `update`.
async fn say_in_outage(proxy: &Proxy, limit: Duration) {
    wait_mode(proxy, "outage", limit).await;
    let r = ctl(
        proxy,
        Ctl::Update {
            message: SAID.into(),
        },
    )
    .await;
    assert!(r.ok, "{r:?}");
}

/// What an operator said during an outage (`update`, and its timeline) outlives a restart of
/// the proxy while the outage goes on: until the first check, the server only counts as
/// healthy, which says nothing of the application. Once a check finds it healthy, they go,
/// so that the next outage starts with the configured message.
#[tokio::test(flavor = "multi_thread")]
async fn an_operators_outage_message_survives_a_restart_during_the_outage() {
    let up = app().await;
    let config = with_listen(&format!("[upstream]\nservers = [\"{}\"]\n{FAST}", up.url()));
    let restart = |mut proxy: Proxy| {
        let config = config.clone();
        async move {
            assert!(proxy.running.take().unwrap().shutdown().await);
            spawn_proxy_in(proxy.dir, &config).await
        }
    };
    let detail = |resp: &Response<bytes::Bytes>| {
        assert!(is_outage(resp), "{resp:?}");
        json::<serde_json::Value>(resp)["detail"].clone()
    };
    let proxy = spawn_proxy_in(tempfile::tempdir().unwrap(), &config).await;
    up.stop();
    say_in_outage(&proxy, Duration::from_secs(5)).await;

    // Restarted while the application is still down: the same words, the same timeline.
    let proxy = restart(proxy).await;
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    let resp = get(&proxy.url("/")).await;
    assert_eq!(detail(&resp), SAID);
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["updates"][0]["message"], SAID, "{v}");

    // Restarted once the application is back: the first check ends the episode, and the
    // next outage says the configured message, not the old words.
    let stopped = {
        let mut proxy = proxy;
        assert!(proxy.running.take().unwrap().shutdown().await);
        proxy
    };
    up.restart().await;
    let proxy = spawn_proxy_in(stopped.dir, &config).await;
    assert!(
        wait_until_async(|| async {
            ctl(&proxy, Ctl::Health).await.health.unwrap()[0].healthy == Some(true)
        })
        .await
    );
    let state = ctl(&proxy, Ctl::Status).await.state.unwrap();
    assert_eq!(state.mode.as_str(), "normal");
    up.stop();
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    assert_eq!(
        detail(&get(&proxy.url("/")).await),
        "We are having trouble reaching the service. We are on it."
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upload_is_not_the_upstreams_fault() {
    use http_body_util::BodyExt;
    let up = upstream(|req: Request<Incoming>| async move {
        let n = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        Response::new(full(format!("got {n}")))
    })
    .await;
    // The upload takes longer than response_timeout; only the wait after it counts.
    let proxy = proxy_for(
        &[&up],
        "response_timeout = \"300ms\"\n[health]\ninterval = \"1h\"\nfall = 1\nrise = 1\n",
    )
    .await;
    let (tx, body) = mpsc_body();
    let url = proxy.url("/upload");
    let pending = tokio::spawn(async move { send(Request::post(url).body(body).unwrap()).await });
    for _ in 0..5 {
        tx.send(bytes::Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(tx);
    let resp = pending.await.unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(resp.body(), "got 50");
    assert_eq!(proxy_mode(&proxy).await, "normal");
}

/// `health.expect` decides which statuses are healthy: a health endpoint that redirects is
/// healthy with the default `200-399`, and down when only `200-299, 204` is expected.
#[tokio::test(flavor = "multi_thread")]
async fn health_expect_decides_which_statuses_are_healthy() {
    let up = upstream(|req: Request<Incoming>| async move {
        if req.uri().path() == "/healthz" {
            Response::builder()
                .status(301)
                .header("location", "/elsewhere")
                .body(full(""))
                .unwrap()
        } else {
            Response::new(full("app works"))
        }
    })
    .await;
    // The one check at start decides each, with no later one that could time out.
    let by_default = proxy_for(&[&up], &format!("{FIRST_CHECK_ONLY}path = \"/healthz\"\n")).await;
    assert_eq!(wait_health(&by_default, Some(true)).await, Some(true));
    let strict = proxy_for(
        &[&up],
        &format!("{FIRST_CHECK_ONLY}path = \"/healthz\"\nexpect = \"200-299, 204\"\n"),
    )
    .await;
    wait_mode(&strict, "outage", Duration::from_secs(5)).await;
    let h = ctl(&strict, Ctl::Health).await.health.unwrap();
    assert_eq!(h[0].healthy, Some(false));
    assert!(h[0].last_error.as_deref().unwrap().contains("301"), "{h:?}");
    assert_eq!(proxy_mode(&by_default).await, "normal");
}

/// A health endpoint that sends its head and then hangs (an application that flushes its
/// headers before asking a database that hangs) fails its checks: the answer must end within
/// `health.timeout`, as Kubernetes' probes read it. One whose answer ends passes, a long one
/// included (read no further than 64 KiB).
#[tokio::test(flavor = "multi_thread")]
async fn a_health_answer_that_never_ends_fails_its_check() {
    // Each answer's sender kept, so that its body neither goes on nor ends.
    let open = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stalling = upstream(move |req: Request<Incoming>| {
        let open = open.clone();
        async move {
            if req.uri().path() == "/healthz" {
                let (more, body) = mpsc_body();
                more.try_send(bytes::Bytes::from_static(b"OK ")).unwrap();
                open.lock().unwrap().push(more);
                Response::new(body)
            } else {
                Response::new(full("app works"))
            }
        }
    })
    .await;
    let long =
        upstream(|_req: Request<Incoming>| async { Response::new(full(vec![b'x'; 1 << 20])) })
            .await;
    let health = "[health]\ninterval = \"1h\"\ntimeout = \"1s\"\npath = \"/healthz\"\n";
    let proxy = proxy_for(&[&stalling], health).await;
    wait_mode(&proxy, "outage", Duration::from_secs(5)).await;
    let h = ctl(&proxy, Ctl::Health).await.health.unwrap();
    let error = h[0].last_error.as_deref().unwrap_or_default();
    assert!(error.contains("head came, but not its end"), "{h:?}");
    let proxy = proxy_for(&[&long], health).await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
}

/// A proxy out of file descriptors is in trouble of its own: it cannot open connections to a
/// healthy server, nor run its health checks, but that is no outage of the application. The
/// server must not be taken out (which would switch every client to the outage page and
/// announce an outage to the webhooks), and forwarding goes on once descriptors are free.
#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_file_descriptors_is_not_an_outage() {
    if !have_prlimit() {
        return;
    }
    let app = upstream(|_req: Request<Incoming>| async {
        let mut resp = Response::new(full("app"));
        resp.headers_mut()
            .insert("connection", http::HeaderValue::from_static("close"));
        resp
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"{}\"]\n\
         [health]\ninterval = \"1s\"\ntimeout = \"1s\"\nfall = 2\n",
        app.url()
    );
    let proxy = ProxyProcess::start(dir.path(), &config);
    let health = || async {
        proxy
            .ctl(&Ctl::Health)
            .await
            .unwrap()
            .health
            .unwrap()
            .remove(0)
    };
    let mut before = health().await;
    for _ in 0..250 {
        if before.healthy == Some(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        before = health().await;
    }
    assert_eq!(before.healthy, Some(true), "{before:?}");

    // Idle clients take the descriptors left, one more each time a request still went
    // through, until a new client gets the last one and the connection to the server for its
    // request finds none (the server closes each connection, so each request needs a new
    // one). The kernel hands connections over in order: an idle client is taken in before
    // the request after it.
    leave_spare_descriptors(proxy.child.id(), 4);
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let answer = raw_exchange(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        if answer.starts_with("HTTP/1.1 503") {
            refused += 1;
            if refused == 3 {
                break;
            }
        } else {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
            idle.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
        }
    }
    assert_eq!(refused, 3, "the proxy never ran out of descriptors");
    // One more takes the last descriptor, which the checks had left.
    idle.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    let starved = |what: &str| {
        proxy
            .log_lines()
            .iter()
            .any(|l| l.contains(what) && l.contains("Too many open files"))
    };
    assert!(starved("forwarding failed"), "no request was starved");
    // Until a check has found no descriptor either, and said so, unless it took the server
    // out (bounded).
    let outage = || proxy.log_lines().iter().any(|l| l.contains("-> outage"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            starved("health check not made") || outage()
        })
        .await,
        "no check was starved"
    );
    assert!(!outage(), "{:#?}", proxy.log_lines());

    drop(idle);
    assert!(
        wait_until_async(|| async { get(&proxy.url("/")).await.status() == 200 }).await,
        "forwarding did not come back"
    );
    let after = health().await;
    assert_eq!(after.healthy, Some(true), "{after:?}");
    assert_eq!(
        after.since, before.since,
        "the server was taken out: {after:?}"
    );
    assert!(!outage(), "{:#?}", proxy.log_lines());
}

/// The latency `ctl health` shows beside the last check is that check's: a failed check shows
/// none, rather than an older success's beside its error.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_check_shows_no_latency() {
    let failing = Arc::new(AtomicBool::new(false));
    let told = failing.clone();
    let up = upstream(move |_req: Request<Incoming>| {
        let failing = told.load(Ordering::SeqCst);
        async move {
            let status = if failing { 500 } else { 200 };
            Response::builder()
                .status(status)
                .body(full("app"))
                .unwrap()
        }
    })
    .await;
    let proxy = proxy_for(&[&up], FAST).await;
    let h = first_server_once(&proxy, |h| h.last_latency_ms.is_some()).await;
    assert!(h.last_latency_ms.is_some(), "{h:?}");
    failing.store(true, Ordering::SeqCst);
    // Once a check has found the 500: every check from then on fails, so the latest one is
    // a failure. (An earlier check that timed out on a loaded machine leaves a last error
    // too, which successes may have followed.)
    let failed = |h: &ServerHealth| h.last_error.as_deref().is_some_and(|e| e.contains("500"));
    let h = first_server_once(&proxy, failed).await;
    assert!(failed(&h), "{h:?}");
    assert_eq!(h.last_latency_ms, None, "{h:?}");
}

/// What an operator said during an outage, and a proxy restarted while it goes on, with a
/// server that takes the whole health timeout to fail its checks. `act` runs at once after the
/// restart, while the first check waits on its timeout; the words must outlive it.
async fn the_words_outlive(act: impl AsyncFnOnce(&Proxy)) {
    // Accepts and never answers: each check takes its whole timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let config = with_listen(&format!(
        "[upstream]\nservers = [\"http://{hung}\"]\n\
         [health]\ninterval = \"2s\"\ntimeout = \"2s\"\nrise = 1\nfall = 1\n"
    ));
    let mut proxy = spawn_proxy_in(tempfile::tempdir().unwrap(), &config).await;
    say_in_outage(&proxy, Duration::from_secs(10)).await;
    // The hung checks' connections may outlast the drain: whether it finished in time is not
    // what this test is about.
    proxy.running.take().unwrap().shutdown().await;
    let proxy = spawn_proxy_in(proxy.dir, &config).await;
    act(&proxy).await;
    wait_mode(&proxy, "outage", Duration::from_secs(10)).await;
    let resp = get(&proxy.url("/")).await;
    assert!(is_outage(&resp), "{resp:?}");
    let v: serde_json::Value = json(&resp);
    assert_eq!(v["detail"], SAID, "{v}");
}

/// A reload that restarts the checkers before the first check after a restart has answered
/// does not take the servers' assumed health for a fact.
#[tokio::test(flavor = "multi_thread")]
async fn an_operators_outage_message_survives_a_reload_before_the_first_check() {
    the_words_outlive(async |proxy: &Proxy| {
        edit_config(proxy, |text| {
            text.replace("interval = \"2s\"", "interval = \"3s\"")
        });
        assert!(ctl(proxy, Ctl::Reload).await.ok);
    })
    .await;
}

/// Nor does an operator's change made before the first check (a window scheduled).
#[tokio::test(flavor = "multi_thread")]
async fn an_operators_outage_message_survives_a_change_before_the_first_check() {
    the_words_outlive(async |proxy: &Proxy| {
        let r = ctl(
            proxy,
            Ctl::ScheduleAdd {
                start: "+2h".into(),
                end: "+3h".into(),
                message: None,
            },
        )
        .await;
        assert!(r.ok, "{r:?}");
    })
    .await;
}

/// Checks that take a server that stops answering out within a second: `fall` checks
/// `timeout` apart (not so short that a live server on a loaded machine fails one).
const HANG_CHECKS: &str =
    "[health]\ninterval = \"250ms\"\ntimeout = \"250ms\"\nrise = 1\nfall = 2\n";

/// A proxy in front of `servers` whose checks take a hanging server out within a second and
/// which would wait an hour for an answer (so that only the mark-down can end a wait),
/// returned once its servers are counted healthy.
async fn watching_for_a_hang(servers: &[&Upstream]) -> Proxy {
    let proxy = proxy_for(
        servers,
        &format!("response_timeout = \"1h\"\n{HANG_CHECKS}"),
    )
    .await;
    assert_eq!(wait_health(&proxy, Some(true)).await, Some(true));
    proxy
}

/// An application that takes its requests and never answers them (its database locked, its
/// threads all busy), counting those it took in `took`; its health path answers until `hang`
/// is set, and then hangs too.
async fn hanging(hang: Arc<AtomicBool>, took: Arc<AtomicUsize>) -> Upstream {
    upstream(move |req: Request<Incoming>| {
        let (hang, took) = (hang.clone(), took.clone());
        async move {
            if !is_health_check(&req) {
                took.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            if hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Response::new(full("hung"))
        }
    })
    .await
}

/// A GET over HTTP/1.1 (the relay) or, with `h2`, HTTP/2 with prior knowledge (hyper's path),
/// under way in a task of its own.
fn get_in_task(url: String, h2: bool) -> tokio::task::JoinHandle<Response<bytes::Bytes>> {
    tokio::spawn(async move {
        let client = if h2 { h2c_client() } else { client() };
        let resp = client
            .request(Request::get(url).body(empty()).unwrap())
            .await
            .expect("request failed");
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    })
}

/// Sends GETs until one is taken by the server counting in `took`, and returns that one,
/// still waiting (those that reach another server are answered by it at once).
async fn one_waiting(
    proxy: &Proxy,
    h2: bool,
    took: &AtomicUsize,
) -> tokio::task::JoinHandle<Response<bytes::Bytes>> {
    for _ in 0..4 {
        let before = took.load(Ordering::SeqCst);
        let asked = get_in_task(proxy.url("/orders"), h2);
        let taken = || took.load(Ordering::SeqCst) > before || asked.is_finished();
        assert!(wait_until(Duration::from_secs(5), taken).await);
        if !asked.is_finished() {
            return asked;
        }
        let resp = asked.await.unwrap();
        assert_eq!(resp.body(), "live", "{resp:?}");
    }
    panic!("no GET reached the hanging server");
}

/// A request already waiting for a server that stops answering is answered when the checks
/// take it out (HAProxy's `on-marked-down shutdown-sessions`), not after `response_timeout`:
/// with one server, with the outage response, as new requests are.
async fn a_waiting_request_is_answered_at_the_mark_down(h2: bool) {
    let (hang, took) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let app = hanging(hang.clone(), Arc::clone(&took)).await;
    let proxy = watching_for_a_hang(&[&app]).await;
    let asked = one_waiting(&proxy, h2, &took).await;
    hang.store(true, Ordering::SeqCst);
    let resp = tokio::time::timeout(Duration::from_secs(20), asked)
        .await
        .expect("still waiting after the server was taken out")
        .unwrap();
    assert!(is_outage(&resp), "{resp:?}");
    assert_eq!(wait_health(&proxy, Some(false)).await, Some(false));
    // A request answered this way blames the server no further: one flip, one log line.
    assert!(is_outage(&get(&proxy.url("/")).await));
}

/// SPEC §3: a GET waiting for its server is not cut by maintenance switched on (the server is
/// up and answers what it was sent), nor, under `force-open`, by its server being taken out
/// (requests go to it whatever the checks say).
#[tokio::test(flavor = "multi_thread")]
async fn maintenance_and_force_open_cut_no_request_waiting() {
    for force_open in [false, true] {
        let (hang, took) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let app = hanging(hang.clone(), Arc::clone(&took)).await;
        let proxy = watching_for_a_hang(&[&app]).await;
        let asked = one_waiting(&proxy, false, &took).await;
        let r = if force_open {
            ctl(&proxy, Ctl::ForceOpen { enabled: true }).await
        } else {
            ctl(&proxy, on(None)).await
        };
        assert!(r.ok, "{r:?}");
        if force_open {
            hang.store(true, Ordering::SeqCst);
            assert_eq!(wait_health(&proxy, Some(false)).await, Some(false));
        }
        // Past the first look (`state::marks::FIRST_LOOK`, 1 s), when a cut would have come.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !asked.is_finished(),
            "a waiting GET was cut (force-open: {force_open})"
        );
    }
}

/// A `POST` waiting for a server that its checks take out is not cut: the server has it and
/// may still answer (a payment on an overloaded server whose checks time out), and its
/// client must not read an outage page about an order that went through. It waits for its
/// answer up to `response_timeout`, as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_post_waiting_for_a_server_taken_out_is_not_cut() {
    let (hang, took) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let app = hanging(hang.clone(), Arc::clone(&took)).await;
    let proxy = watching_for_a_hang(&[&app]).await;
    let mut asked = Vec::new();
    for h2 in [false, true] {
        let url = proxy.url("/orders");
        asked.push(tokio::spawn(async move {
            let client = if h2 { h2c_client() } else { client() };
            let req = Request::post(url)
                .header("content-length", "8")
                .body(full("order-45"))
                .unwrap();
            client.request(req).await.map(|r| r.status())
        }));
    }
    assert!(wait_until(Duration::from_secs(5), || took.load(Ordering::SeqCst) == 2).await);
    hang.store(true, Ordering::SeqCst);
    assert_eq!(wait_health(&proxy, Some(false)).await, Some(false));
    // Past the first look (`state::marks::FIRST_LOOK`, 1 s), when a GET would have been cut.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, post) in asked.iter().enumerate() {
        assert!(!post.is_finished(), "POST {i} was cut at the mark-down");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_over_http1_gets_the_outage_answer_when_its_server_is_taken_out() {
    a_waiting_request_is_answered_at_the_mark_down(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_over_h2_gets_the_outage_answer_when_its_server_is_taken_out() {
    a_waiting_request_is_answered_at_the_mark_down(true).await;
}

/// With another server healthy, the GETs waiting for the one taken out go to it, over either
/// path, as a timeout would send them.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_waiting_for_a_server_taken_out_is_answered_by_another() {
    let (hang, took) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let hung = hanging(hang.clone(), Arc::clone(&took)).await;
    let reached = Arc::new(AtomicUsize::new(0));
    let counted = reached.clone();
    let live = upstream(move |req: Request<Incoming>| {
        if !is_health_check(&req) {
            counted.fetch_add(1, Ordering::SeqCst);
        }
        async { Response::new(full("live")) }
    })
    .await;
    let proxy = watching_for_a_hang(&[&hung, &live]).await;
    let over_h1 = one_waiting(&proxy, false, &took).await;
    let over_h2 = one_waiting(&proxy, true, &took).await;
    let before = reached.load(Ordering::SeqCst);
    hang.store(true, Ordering::SeqCst);
    for (asked, path) in [(over_h1, "HTTP/1.1"), (over_h2, "h2c")] {
        let resp = tokio::time::timeout(Duration::from_secs(20), asked)
            .await
            .unwrap_or_else(|_| panic!("{path}: still waiting after its server was taken out"))
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}: {resp:?}");
        assert_eq!(resp.body(), "live", "{path}");
    }
    assert_eq!(reached.load(Ordering::SeqCst), before + 2);
    assert_eq!(wait_health(&proxy, Some(false)).await, Some(false));
}

/// An answer whose head has come is the server's, whatever its checks say after: a body
/// still streaming when they take it out goes on to its end, over either path.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_under_way_is_not_cut_when_its_server_is_taken_out() {
    let hang = Arc::new(AtomicBool::new(false));
    let (bodies_tx, mut bodies) = tokio::sync::mpsc::unbounded_channel();
    let hung = hang.clone();
    let app = upstream(move |req: Request<Incoming>| {
        let (hang, bodies) = (hung.clone(), bodies_tx.clone());
        async move {
            if is_health_check(&req) && hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if is_health_check(&req) {
                return Response::new(full("ok"));
            }
            let (tx, body) = mpsc_body();
            bodies.send(tx).unwrap();
            Response::new(body)
        }
    })
    .await;
    let proxy = watching_for_a_hang(&[&app]).await;
    let mut under_way = Vec::new();
    let started = tokio::time::Instant::now();
    for h2 in [false, true] {
        let client = if h2 { h2c_client() } else { client() };
        let req = Request::get(proxy.url("/stream")).body(empty()).unwrap();
        let fetch = tokio::spawn(client.request(req));
        let tx = bodies.recv().await.unwrap();
        tx.send(bytes::Bytes::from_static(b"first ")).await.unwrap();
        let resp = fetch.await.unwrap().expect("the head came");
        assert_eq!(resp.status(), 200);
        under_way.push((resp, tx));
    }
    hang.store(true, Ordering::SeqCst);
    assert_eq!(wait_health(&proxy, Some(false)).await, Some(false));
    // Until both have waited past the first look (`state::marks::FIRST_LOOK`, 1 s), after
    // which a request still waiting for its head would have been cut by now.
    tokio::time::sleep_until(started + Duration::from_millis(1500)).await;
    for (resp, tx) in under_way {
        tx.send(bytes::Bytes::from_static(b"and last"))
            .await
            .unwrap();
        drop(tx);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "first and last");
    }
}

/// A server's health-check counts are at 0 from when it is added, at start and at a reload,
/// before its first check has ended: made by its first result, those of a server failing from
/// the start began at `fail` 1, which an alert on their `increase()` never saw. A reload that
/// removes the server takes them away.
#[tokio::test]
async fn health_check_counts_are_at_zero_from_a_servers_start() {
    // Servers that take the connection (the kernel's backlog) and never answer: their first
    // check is still under way for the whole test.
    let silent_a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = format!("http://{}", silent_a.local_addr().unwrap());
    let b = format!("http://{}", silent_b.local_addr().unwrap());
    let config = |servers: &[&str]| {
        let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nservers = [{}]\n\
             [health]\ninterval = \"1h\"\ntimeout = \"1m\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            list.join(", ")
        )
    };
    let proxy = spawn_proxy(&config(&[&a])).await;
    let count = |server: &str, result: &str| {
        format!("intermission_health_checks_total{{server=\"{server}\",result=\"{result}\"}}")
    };
    for result in ["ok", "fail"] {
        assert_eq!(
            series(&proxy, &count(&a, result)).await,
            Some(0.0),
            "{result}"
        );
    }

    let path = proxy.dir.path().join("config.toml");
    std::fs::write(&path, config(&[&a, &b])).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    for server in [&a, &b] {
        for result in ["ok", "fail"] {
            let key = count(server, result);
            assert_eq!(series(&proxy, &key).await, Some(0.0), "{key}");
        }
    }

    std::fs::write(&path, config(&[&b])).unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(series(&proxy, &count(&a, "fail")).await, None);
    assert_eq!(series(&proxy, &count(&b, "fail")).await, Some(0.0));
}
