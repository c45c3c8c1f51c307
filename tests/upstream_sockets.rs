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
