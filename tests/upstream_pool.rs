//! The keep-alive connections to `http://` servers: kept between requests, never the cause of
//! an error when the server closed one, closed after `upstream.idle_timeout`, and never given
//! to a second request while the first one's response is still unread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP/1.1 server written on raw sockets, so that a test decides when a connection
/// closes. It answers `GET /big` with 1 MiB, `GET /trailers` with a chunked body ending in a
/// trailer, `GET /unavailable` with a 503, closes the connection on `GET /boom` without a word (counting those), and answers
/// anything else with `ok`. It counts the connections that carried a request other than a
/// health check, and how many of those the proxy closed.
struct Raw {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    closed_by_proxy: Arc<AtomicUsize>,
    booms: Arc<AtomicUsize>,
}

const BIG: usize = 1024 * 1024;

async fn raw_upstream(close_after_each_answer: bool) -> Raw {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let closed_by_proxy = Arc::new(AtomicUsize::new(0));
    let booms = Arc::new(AtomicUsize::new(0));
    let (s, c, b) = (served.clone(), closed_by_proxy.clone(), booms.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (served, closed, booms) = (s.clone(), c.clone(), b.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut counted = false;
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                if counted {
                                    closed.fetch_add(1, Ordering::SeqCst);
                                }
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    buf.drain(..end + 4);
                    if !head.contains("intermission-health-check") && !counted {
                        counted = true;
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    if head.starts_with("get /boom ") {
                        booms.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let answer = if head.starts_with("get /unavailable ") {
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 11\r\n\r\nrestarting\n".to_vec()
                    } else if head.starts_with("get /trailers ") {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n2\r\nok\r\n0\r\nx-sum: 1\r\n\r\n".to_vec()
                    } else {
                        let body = if head.starts_with("get /big ") {
                            vec![b'x'; BIG]
                        } else {
                            b"ok".to_vec()
                        };
                        let mut answer =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                                .into_bytes();
                        answer.extend_from_slice(&body);
                        answer
                    };
                    if sock.write_all(&answer).await.is_err() {
                        return;
                    }
                    if close_after_each_answer {
                        // Closed without a word, as a server whose keep-alive timeout ran out.
                        return;
                    }
                }
            });
        }
    });
    Raw {
        addr,
        served,
        closed_by_proxy,
        booms,
    }
}

/// One worker: each test counts the upstream connections that one worker's pool opens, and a
/// client connection goes to the next worker (each has a pool of its own).
fn config(up: &Raw, extra: &str) -> String {
    config_threads(up, extra, 1)
}

fn config_threads(up: &Raw, extra: &str, threads: usize) -> String {
    format!(
        "[proxy]\nthreads = {threads}\n[upstream]\nservers = [\"http://{}\"]\n{extra}[health]\ninterval = \"60s\"\n[log]\naccess_log = false\n",
        up.addr
    )
}

async fn get_ok(proxy: &Proxy, path: &str) -> String {
    let resp = get(&proxy.url(path)).await;
    assert_eq!(resp.status(), StatusCode::OK, "{path}");
    String::from_utf8_lossy(resp.body()).into_owned()
}

#[tokio::test]
async fn a_connection_the_server_closed_while_kept_is_never_an_error() {
    let up = raw_upstream(true).await;
    let proxy = spawn_proxy(&config(&up, "")).await;
    // Each kept connection is closed by the server right after its answer; the proxy may
    // pick it before it has seen the close, and must then send the request on another.
    let c = client();
    for i in 0..100 {
        let resp = c
            .request(Request::get(proxy.url("/")).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
    }
    assert!(up.served.load(Ordering::SeqCst) >= 100);
}

/// A server that answers one request on each connection, and closes it, unanswered, when the
/// next request arrives there: keep-alive's race, every time.
async fn one_answer_per_connection() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let heads = |buf: &[u8]| buf.windows(4).filter(|w| w == b"\r\n\r\n").count();
                for answered in [false, true] {
                    while heads(&buf) < 1 + usize::from(answered) {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    // The next request is closed on, unanswered.
                    if answered {
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if sock.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The same race for uploads of HTTP/2 clients (whose bodies hyper's path forwards): a `PUT`
/// or `DELETE` with a small body is read whole first, as nginx reads every body, so that it
/// can be sent again on a new connection; streamed, it got the outage answer.
#[tokio::test]
async fn an_upload_on_a_connection_the_server_closed_while_kept_is_sent_again() {
    let addr = one_answer_per_connection().await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"http://{addr}\"]\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let c = h2c_client();
    for i in 0..6 {
        let method = if i % 2 == 0 { "PUT" } else { "DELETE" };
        let req = Request::builder()
            .method(method)
            .uri(proxy.url("/item"))
            .header("content-length", "3")
            .body(full("abc"))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{method} {i}");
    }
}

/// A `POST` cannot be sent again once it may have reached the server, so it goes on a kept
/// connection only while that one has idled less than a second: past it, a server's own
/// keep-alive timeout (2 s for gunicorn) may close it as the request arrives, and a healthy
/// application's client got the outage answer. Through the relay (a small body in one read)
/// and hyper's path (an HTTP/2 client's) alike.
#[tokio::test]
async fn a_post_does_not_go_on_a_connection_idle_past_a_second() {
    let addr = one_answer_per_connection().await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"http://{addr}\"]\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
    ))
    .await;
    let post = b"POST /order HTTP/1.1\r\nHost: shop.example\r\ncontent-length: 3\r\n\r\nabc";
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let h2 = h2c_client();
    let h2_post = || {
        Request::builder()
            .method("POST")
            .uri(proxy.url("/order"))
            .header("content-length", "3")
            .body(full("abc"))
            .unwrap()
    };
    for round in 0..3 {
        let relayed = one_answer(&mut client, post).await;
        let through_hyper = h2.request(h2_post()).await.unwrap().status();
        assert_eq!(
            (relayed.as_str(), through_hyper),
            ("ok", StatusCode::OK),
            "round {round}"
        );
        // The server would close each kept connection as the next request comes: the idle
        // time itself is what is tested.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}

/// Each worker keeps upstream connections of its own, whose tasks run on its thread, so that
/// a forwarded request wakes no other thread: client connections take turns on the two
/// workers, and each worker opens one upstream connection and keeps it.
#[tokio::test]
async fn each_worker_keeps_its_own_upstream_connections() {
    let up = raw_upstream(false).await;
    let proxy = spawn_proxy(&config_threads(&up, "", 2)).await;
    for _ in 0..6 {
        // A new client connection each time (`get`), and the request done before the next.
        assert_eq!(get_ok(&proxy, "/").await, "ok");
    }
    assert_eq!(
        up.served.load(Ordering::SeqCst),
        2,
        "one upstream connection per worker"
    );
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_idle_timeout() {
    let up = raw_upstream(false).await;
    let proxy = spawn_proxy(&config(&up, "idle_timeout = \"300ms\"\n")).await;
    for _ in 0..3 {
        assert_eq!(get_ok(&proxy, "/").await, "ok");
    }
    assert_eq!(up.served.load(Ordering::SeqCst), 1, "one connection, kept");
    let closed = wait_until(Duration::from_secs(10), || {
        up.closed_by_proxy.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(closed, "the idle connection was not closed");
    // And the next request opens a new one.
    assert_eq!(get_ok(&proxy, "/").await, "ok");
    assert_eq!(up.served.load(Ordering::SeqCst), 2);
}

/// A kept socket its server closed is closed by the proxy too, not left in CLOSE-WAIT, a
/// descriptor and a place under the bound on upstream sockets, until `idle_timeout` (90 s).
#[tokio::test]
async fn a_kept_connection_its_server_closed_is_closed_at_once() {
    let up = raw_upstream(true).await;
    let text = format!("{}[admin]\nlisten = \"127.0.0.1:0\"\n", config(&up, ""));
    let proxy = spawn_proxy(&text).await;
    assert_eq!(get_ok(&proxy, "/").await, "ok");
    let open = series_reaches(&proxy, "intermission_upstream_connections", 0.0).await;
    assert_eq!(open, Some(0.0), "the closed connection is still open");
}

#[tokio::test]
async fn a_connection_whose_response_was_not_read_whole_is_not_used_again() {
    let up = raw_upstream(false).await;
    let proxy = spawn_proxy(&config(&up, "")).await;
    // A client that reads the head of a large response and goes away: the rest of that
    // body is still on the upstream connection, which must not carry another request.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 256];
    let n = s.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    drop(s);
    for _ in 0..5 {
        assert_eq!(get_ok(&proxy, "/").await, "ok");
    }
    // A large body read whole gives its connection back like any other.
    let before = up.served.load(Ordering::SeqCst);
    assert_eq!(get_ok(&proxy, "/big").await.len(), BIG);
    assert_eq!(get_ok(&proxy, "/").await, "ok");
    assert_eq!(up.served.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn a_request_that_makes_the_server_close_is_sent_again_at_most_once() {
    let up = raw_upstream(false).await;
    let proxy = spawn_proxy(&config(&up, "")).await;
    // Several kept connections, idle long enough for a request on one to be sent again.
    let gets: Vec<_> = (0..6)
        .map(|_| {
            let (c, url) = (client(), proxy.url("/big"));
            tokio::spawn(async move {
                let resp = c.request(Request::get(url).body(empty()).unwrap()).await;
                resp.unwrap().into_body().collect().await.unwrap();
            })
        })
        .collect();
    for get in gets {
        get.await.unwrap();
    }
    assert!(
        up.served.load(Ordering::SeqCst) >= 2,
        "connections were kept"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let resp = get(&proxy.url("/boom")).await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    assert_eq!(
        up.booms.load(Ordering::SeqCst),
        2,
        "sent once and again once, not once per kept connection"
    );
}

#[tokio::test]
async fn a_response_ending_in_trailers_gives_its_connection_back() {
    let up = raw_upstream(false).await;
    let proxy = spawn_proxy(&config(&up, "")).await;
    for _ in 0..5 {
        assert_eq!(get_ok(&proxy, "/trailers").await, "ok");
    }
    assert_eq!(
        up.served.load(Ordering::SeqCst),
        1,
        "one connection for all five"
    );
}

#[tokio::test]
async fn an_intercepted_answer_keeps_its_connection() {
    let up = raw_upstream(false).await;
    let proxy = spawn_proxy(&config(&up, "intercept_statuses = [503]\n")).await;
    // A server that answers every request 503 while it restarts: each answer is replaced
    // by the outage response, and its connection must not be thrown away with its body.
    for _ in 0..5 {
        let resp = get(&proxy.url("/unavailable")).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!String::from_utf8_lossy(resp.body()).contains("restarting"));
    }
    assert_eq!(get_ok(&proxy, "/").await, "ok");
    // Exact, not racy, while this test runs on one thread (`#[tokio::test]`, `threads = 1`):
    // the intercepted body is drained by a task the proxy spawns before it answers, and that
    // task and the connection task it wakes are queued ahead of anything the next request
    // needs (the answer read, a new connection, its accept), so the connection is back in
    // the pool first. On a multi-threaded runtime the next request could win and open a
    // second connection.
    assert_eq!(
        up.served.load(Ordering::SeqCst),
        1,
        "one connection for all six"
    );
}
