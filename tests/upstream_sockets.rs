//! The bound on upstream sockets (README, "Open files"): HTTP/2 clients, each stream of which
//! takes a connection to an `http://` server, cannot use up the proxy's descriptors, so the
//! control socket, new clients and health checks keep working (finding F2).

mod support;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use intermission::control::protocol::Request as Ctl;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// The open-file limit the proxy runs with, and its `max_connections`: the bound is then
/// 256 − 32 − 128 = 96 upstream sockets (`limits::upstream_sockets`).
const LIMIT: usize = 256;
const MAX_CONNECTIONS: usize = 32;
const BOUND: usize = 96;

/// HTTP/2 connections, and streams on each: more streams than the limit has descriptors,
/// which without the bound ran the proxy out of them.
const CLIENTS: usize = 3;
const STREAMS: usize = 100;

#[tokio::test]
async fn http2_streams_beyond_the_upstream_bound_get_the_outage_answer_and_leave_room() {
    if !have_prlimit() {
        return;
    }
    // Holds every request but health checks until released.
    let (release, released) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(AtomicUsize::new(0));
    let seen = arrived.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let mut released = released.clone();
        let seen = seen.clone();
        async move {
            if !is_health_check(&req) {
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = released.wait_for(|r| *r).await;
            }
            Response::new(full("app"))
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[proxy]\nmax_connections = {MAX_CONNECTIONS}\n[upstream]\nservers = [\"{}\"]\n\
         connect_timeout = \"1s\"\nresponse_timeout = \"30s\"\n\
         [health]\ninterval = \"500ms\"\ntimeout = \"500ms\"\n",
        up.url()
    );
    let limit = format!("--nofile={LIMIT}:{LIMIT}");
    let proxy = ProxyProcess::start_via(&["prlimit", &limit, "--"], dir.path(), &config);
    assert!(
        proxy
            .log_lines()
            .iter()
            .any(|l| l.contains(&format!("bounded at {BOUND} at once"))),
        "{:#?}",
        proxy.log_lines()
    );

    // CLIENTS × STREAMS requests at once, each on an HTTP/2 connection of its client's.
    let started = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let client = h2c_client();
        for _ in 0..STREAMS {
            let client = client.clone();
            let req = Request::get(proxy.url("/held")).body(empty()).unwrap();
            streams.spawn(async move {
                let resp = client.request(req).await.expect("no answer");
                let mode = resp
                    .headers()
                    .get("x-intermission-mode")
                    .map(|v| v.to_str().unwrap().to_owned());
                let status = resp.status();
                resp.into_body().collect().await.unwrap();
                (status, mode, started.elapsed())
            });
        }
    }
    // The bound's worth reach the server and wait there; every other stream gets the outage
    // answer once connect_timeout has passed, rather than hanging.
    let mut outage = 0;
    while outage < CLIENTS * STREAMS - BOUND {
        let done = tokio::time::timeout(Duration::from_secs(10), streams.join_next()).await;
        let (status, mode, after) = done
            .expect("streams beyond the bound hang")
            .expect("no stream left")
            .unwrap();
        assert_eq!(status, 503);
        assert_eq!(mode.as_deref(), Some("outage"));
        assert!(after >= Duration::from_millis(900), "{after:?}");
        outage += 1;
    }
    assert!(
        wait_until(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)
            == BOUND)
        .await
    );
    assert_eq!(arrived.load(Ordering::SeqCst), BOUND);

    // The operator still has the control socket; the server is not blamed.
    let status = proxy.ctl(&Ctl::Status).await.expect("ctl status");
    assert_eq!(status.state.unwrap().mode.as_str(), "normal");
    // A new HTTP/1.1 client is answered: the outage answer while no upstream socket frees.
    let resp = tokio::time::timeout(Duration::from_secs(5), get(&proxy.url("/new")))
        .await
        .expect("a new client got no answer");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-intermission-mode"], "outage");
    let on = proxy.ctl(&on(Some("back soon"))).await.expect("ctl on");
    assert!(on.ok, "{on:?}");
    let resp = tokio::time::timeout(Duration::from_secs(5), get(&proxy.url("/new")))
        .await
        .expect("a new client got no answer");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-intermission-mode"], "maintenance");
    assert!(String::from_utf8_lossy(resp.body()).contains("back soon"));
    // Health checks are made (outside the bound) and pass.
    let checked = Instant::now();
    let healthy = wait_until_async(|| async {
        let health = proxy.ctl(&Ctl::Health).await.expect("ctl health");
        let server = &health.health.unwrap()[0];
        assert_eq!(server.healthy, Some(true), "{server:?}");
        server.last_check.is_some() && checked.elapsed() > Duration::from_secs(1)
    })
    .await;
    assert!(healthy);
    // Said once, with a count, not once per request.
    let told = proxy
        .log_lines()
        .iter()
        .filter(|l| l.contains("upstream connections open, the most the open-file limit"))
        .count();
    assert_eq!(told, 1, "{:#?}", proxy.log_lines());

    // Released, the streams the server held are answered whole.
    release.send(true).unwrap();
    while let Some(done) = tokio::time::timeout(Duration::from_secs(10), streams.join_next())
        .await
        .expect("held streams not answered")
    {
        let (status, _, _) = done.unwrap();
        assert_eq!(status, 200);
    }
}

/// The open-file limit for the tunnels' test: 160 − 128 leaves 32, and `max_connections`
/// more than that, so the bound is half of it, the least, 16; tunnels may hold 12.
const TUNNEL_LIMIT: usize = 160;
const TUNNEL_BOUND: usize = 16;
const TUNNEL_SHARE: usize = 12;

/// Tunnels (WebSockets) hold their upstream socket for as long as they live: enough of them
/// took every socket under the bound, and every ordinary request then waited
/// `connect_timeout` for the outage answer. They may hold three quarters of it; an upgrade
/// asked for beyond that gets the outage answer at once, without reaching the server, and
/// ordinary requests are still forwarded. `intermission_tunnels_open` follows them.
#[tokio::test]
async fn tunnels_hold_at_most_their_share_of_the_upstream_bound() {
    if !have_prlimit() {
        return;
    }
    let switching = switching_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[proxy]\nmax_connections = 64\n[upstream]\nservers = [\"{}\"]\n\
         connect_timeout = \"1s\"\n[health]\ninterval = \"1h\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        switching.server.url()
    );
    let limit = format!("--nofile={TUNNEL_LIMIT}:{TUNNEL_LIMIT}");
    let proxy = ProxyProcess::start_via(&["prlimit", &limit, "--"], dir.path(), &config);
    assert!(
        proxy
            .log_lines()
            .iter()
            .any(|l| l.contains(&format!("bounded at {TUNNEL_BOUND} at once"))),
        "{:#?}",
        proxy.log_lines()
    );
    let mut tunnels = Vec::new();
    for _ in 0..TUNNEL_SHARE {
        tunnels.push(open_tunnel(proxy.addr).await);
    }
    // Beyond the share, refused at once (not after connect_timeout), as the outage answer
    // refuses an upgrade: 503, problem+json, Retry-After. The bound has room for 4 more.
    for _ in 0..TUNNEL_BOUND - TUNNEL_SHARE {
        let asked = Instant::now();
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = ask_to_switch(&mut s).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 503"), "{head}");
        assert!(
            head.contains("content-type: application/problem+json"),
            "{head}"
        );
        assert!(head.contains("retry-after: "), "{head}");
        assert!(asked.elapsed() < Duration::from_millis(900), "{head}");
    }
    assert_eq!(switching.open.load(Ordering::SeqCst), TUNNEL_SHARE);
    let admin = admin_addr(&proxy).await;
    let open = "intermission_tunnels_open";
    assert_eq!(metric_reaches(admin, open, "12").await, "12");
    let refused = "intermission_tunnel_limit_reached_total";
    assert_eq!(metric(admin, refused).await.as_deref(), Some("4"));
    // An ordinary request still gets a connection, and its answer.
    let resp = tokio::time::timeout(Duration::from_secs(5), get(&proxy.url("/plain")))
        .await
        .expect("no answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body().as_ref(), b"ok");
    let told = proxy
        .log_lines()
        .iter()
        .filter(|l| l.contains("tunnels (WebSocket or other upgrades) hold their share"))
        .count();
    assert_eq!(told, 1, "{:#?}", proxy.log_lines());

    // One closed makes room for one more; the gauge follows.
    drop(tunnels.pop());
    assert_eq!(metric_reaches(admin, open, "11").await, "11");
    tunnels.push(open_tunnel(proxy.addr).await);
    assert_eq!(metric_reaches(admin, open, "12").await, "12");
    for tunnel in &mut tunnels {
        assert!(echoes(tunnel, "still").await);
    }
    tunnels.clear();
    assert_eq!(metric_reaches(admin, open, "0").await, "0");
}

/// The admin listener's address, once the log has said it (within 10 s).
async fn admin_addr(proxy: &ProxyProcess) -> std::net::SocketAddr {
    for _ in 0..500 {
        let said = proxy.log_lines().iter().find_map(|l| {
            let rest = &l[l.find("admin listener on ")? + "admin listener on ".len()..];
            rest.split(' ').next()?.parse().ok()
        });
        if let Some(addr) = said {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the admin listener's address was not logged: {:#?}",
        proxy.log_lines()
    )
}

/// The value of the series `key` (a name with its labels) in `/metrics`.
async fn metric(admin: std::net::SocketAddr, key: &str) -> Option<String> {
    let got = get(&format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(got.body()).into_owned();
    text.lines()
        .find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(' ')?.to_owned()))
}

/// Waits until `/metrics` shows `key` at `want`; what it showed last.
async fn metric_reaches(admin: std::net::SocketAddr, key: &str, want: &str) -> String {
    let mut seen = None;
    for _ in 0..200 {
        seen = metric(admin, key).await;
        if seen.as_deref() == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    seen.unwrap_or_default()
}

/// A proxy out of file descriptors fails to connect to its server (`EMFILE`): its own
/// shortage, not the server's, so the server's failures do not count it, and the request is
/// not sent to another server either, which would fail alike. Both paths (the relay's, a plain
/// keep-alive `GET`; hyper's, a `Connection: close` one) sent it again and counted a retry
/// for the first server, whose `intermission_upstream_retries_total` then ran above its
/// `intermission_upstream_failures_total`.
#[tokio::test]
async fn a_request_the_proxy_has_no_descriptor_for_is_not_retried_elsewhere() {
    use tokio::io::AsyncWriteExt;
    if !have_prlimit() {
        return;
    }
    let first = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let second = upstream(|_req: Request<Incoming>| async { Response::new(full("app")) }).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[upstream]\nservers = [\"{}\", \"{}\"]\n[health]\ninterval = \"1h\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
        first.url(),
        second.url()
    );
    let proxy = ProxyProcess::start(dir.path(), &config);
    let admin = admin_addr(&proxy).await;
    let pid = proxy.child.id();
    let open = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    // The first checks made, their connections settled, before the descriptors are counted.
    let checked = wait_until_async(|| async {
        let health = proxy.ctl(&Ctl::Health).await.expect("ctl health");
        health
            .health
            .unwrap()
            .iter()
            .all(|s| s.last_check.is_some())
    })
    .await;
    assert!(checked);
    // Once the connections of those checks and of `ctl health` have closed: the same count
    // for half a second.
    let mut before = open();
    let mut same = 0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = open();
        same = if now == before { same + 1 } else { 0 };
        before = now;
        if same == 10 {
            break;
        }
    }
    assert_eq!(same, 10, "the proxy's descriptors never settled");
    let mut relayed = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut through_hyper = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Both accepted: the proxy holds their descriptors before it is left none.
    assert!(wait_until(Duration::from_secs(10), || open() >= before + 2).await);
    // A new descriptor takes the lowest number free, and fails (`EMFILE`) at or above the
    // soft limit: that number, rather than the count open, leaves none.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let used: std::collections::HashSet<usize> = fds
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !used.contains(n)).unwrap();
    let soft = |n: usize| {
        let set = std::process::Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
            .status()
            .unwrap();
        assert!(set.success());
    };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let was: usize = limits
        .lines()
        .find_map(|l| {
            l.strip_prefix("Max open files")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    soft(lowest_free);
    let mut answers = Vec::new();
    for (sock, request) in [
        (&mut relayed, &b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"[..]),
        (
            &mut through_hyper,
            &b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        ),
    ] {
        sock.write_all(request).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_response(sock))
            .await
            .expect("no answer");
        answers.push(answer);
    }
    for answer in &answers {
        let lower = answer.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 503"), "{answer}");
        assert!(lower.contains("x-intermission-mode: outage"), "{answer}");
    }
    assert!(
        proxy
            .log_lines()
            .iter()
            .any(|l| l.contains("Too many open files")),
        "the connections did not fail for want of a descriptor: {:#?}",
        proxy.log_lines()
    );
    // Room again for the scrape's connection.
    soft(was);
    drop((relayed, through_hyper));
    let counted = |prefix: &'static str| async move {
        let text = raw_exchange(
            admin,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        let series: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!series.is_empty()).then(|| series.iter().sum::<f64>())
    };
    let mut retries = None;
    for _ in 0..250 {
        retries = counted("intermission_upstream_retries_total{").await;
        if retries.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(retries, Some(0.0), "{:#?}", proxy.log_lines());
    let failures = counted("intermission_upstream_failures_total{").await;
    assert_eq!(failures, Some(0.0));
}
