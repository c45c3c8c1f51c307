//! Reloads that close a listener: moves to another address or port, on the same port, and a
//! refused move that listens where it was.
//!
//! In a binary of their own because no test here starts a process. A child between fork and
//! exec holds a copy of every socket of the test process, the proxy's listeners included: a
//! listener the reload closes keeps listening until the child execs, so a bind on its port
//! fails and a connection to it is reset. control.rs starts `ctl` and sends signals with `kill`
//! all the time; these tests failed there 1 run in 20 on a busy machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use intermission::control::protocol::Request as Ctl;
use std::time::Duration;
use support::*;

#[tokio::test]
async fn reload_moves_the_listeners_without_dropping_established_connections() {
    let up = echo_upstream().await;
    // On 127.0.0.2, where no other test listens: once this listener closes, another test's
    // listener on 127.0.0.1 could be given its port and answer for it.
    let config = format!(
        "[proxy]\nlisten = [\"127.0.0.2:0\"]\n[upstream]\nservers = [\"{}\"]\n",
        up.url()
    );
    let proxy = spawn_proxy(&config).await;
    let old = proxy.addr;
    // An established keep-alive connection on the old listener.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut established = tokio::net::TcpStream::connect(old).await.unwrap();
    let req = b"GET /kept HTTP/1.1\r\nHost: x\r\n\r\n";
    established.write_all(req).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = established.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // To 127.0.0.1, on a port the proxy picks and reports: a port found free beforehand and
    // let go could be taken by another test before the reload binds it.
    let path = proxy.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("listen = [\"127.0.0.2:0\"]", "listen = [\"127.0.0.1:0\"]"),
    )
    .unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    let running = proxy.running.as_ref().unwrap();
    let new = match running.local_addrs()[..] {
        [new] => new,
        ref addrs => panic!("listening on {addrs:?}, not on one new address"),
    };
    assert_eq!(new.ip(), std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(get(&format!("http://{new}/")).await.status(), 200);
    assert!(
        tokio::net::TcpStream::connect(old).await.is_err(),
        "the old address still accepts"
    );
    established.write_all(req).await.unwrap();
    let n = established.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "the established connection was dropped"
    );

    // An address that cannot be bound refuses the reload; the running listener stays.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"127.0.0.1:0\", \"{busy}\"]"),
        ),
    )
    .unwrap();
    let r = ctl(&proxy, Ctl::Reload).await;
    let e = r.error.unwrap();
    assert_eq!(e.code, "reload_failed");
    assert!(
        e.message
            .contains(&format!("proxy.listen: cannot listen on {busy}")),
        "the key and the address: {}",
        e.message
    );
    assert_eq!(get(&format!("http://{new}/")).await.status(), 200);
}

/// A keep-alive HTTP/1.1 connection to `addr`: every request on it fails once it is closed.
async fn keep_alive(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// The status of a GET on an established connection, within 10 s.
async fn get_on(sender: &mut hyper::client::conn::http1::SendRequest<TestBody>) -> u16 {
    use http_body_util::BodyExt;
    let req = http::Request::get("/kept")
        .header("host", "x")
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), async {
        sender.ready().await?;
        sender.send_request(req).await
    })
    .await
    .expect("no answer within 10 s")
    .expect("the established connection was dropped");
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

/// The status of a GET on a new connection, within 10 s.
async fn get_within(url: &str) -> u16 {
    tokio::time::timeout(Duration::from_secs(10), get(url))
        .await
        .expect("no answer within 10 s")
        .status()
        .as_u16()
}

/// A proxy listening on `127.0.0.1:P` alone (configured as `127.0.0.1:0`), its port, and a
/// kept-alive connection to it that has been answered once.
async fn on_a_loopback_port() -> (
    Upstream,
    Proxy,
    u16,
    hyper::client::conn::http1::SendRequest<TestBody>,
) {
    let up = echo_upstream().await;
    // The proxy picks the port: one found free beforehand and let go could be taken by
    // another test before the proxy binds it.
    let proxy = spawn_proxy(&format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[upstream]\nservers = [\"{}\"]\n",
        up.url()
    ))
    .await;
    let port = proxy.addr.port();
    let mut established = keep_alive(proxy.addr).await;
    assert_eq!(get_on(&mut established).await, 200);
    (up, proxy, port, established)
}

/// Linux refuses `0.0.0.0:P` while `127.0.0.1:P` listens, and the reverse: the reload closes
/// the old listener just before it binds the new one.
#[tokio::test]
async fn reload_moves_a_listener_to_another_address_on_the_same_port() {
    let (_up, proxy, port, mut established) = on_a_loopback_port().await;
    let (loopback, wildcard) = (format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}"));
    // Reached only through the wildcard listener.
    let other = format!("127.0.0.6:{port}");

    // The config says `127.0.0.1:0`; the proxy listens on `127.0.0.1:{port}`.
    edit_config(&proxy, |t| t.replace("127.0.0.1:0", &wildcard));
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(get_on(&mut established).await, 200);
    assert_eq!(get_within(&format!("http://{loopback}/")).await, 200);
    assert_eq!(get_within(&format!("http://{other}/")).await, 200);

    edit_config(&proxy, |t| t.replace(&wildcard, &loopback));
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(get_on(&mut established).await, 200);
    assert_eq!(get_within(&format!("http://{loopback}/")).await, 200);
    assert!(
        tokio::net::TcpStream::connect(&other).await.is_err(),
        "the wildcard listener still accepts"
    );
}

/// When the new address on the same port cannot be bound even once the old listener is
/// closed, the reload is refused and the proxy listens where it was.
#[tokio::test]
async fn a_refused_move_on_the_same_port_listens_where_it_was() {
    let (_up, proxy, port, mut established) = on_a_loopback_port().await;
    let (loopback, wildcard) = (format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}"));
    // Listening on the same port as the proxy, on another address: 0.0.0.0 cannot be bound.
    let holder = std::net::TcpListener::bind(format!("127.0.0.5:{port}")).unwrap();

    // The config says `127.0.0.1:0`; the proxy listens on `127.0.0.1:{port}`.
    edit_config(&proxy, |t| t.replace("127.0.0.1:0", &wildcard));
    let r = ctl(&proxy, Ctl::Reload).await;
    let e = r.error.unwrap();
    assert_eq!(e.code, "reload_failed");
    assert!(e.message.contains(&wildcard), "{}", e.message);
    assert!(
        !e.message.contains("no longer listening"),
        "the old listener was not opened again: {}",
        e.message
    );
    assert_eq!(get_within(&format!("http://{loopback}/")).await, 200);
    assert_eq!(get_on(&mut established).await, 200);
    let running = proxy.running.as_ref().unwrap();
    assert_eq!(running.local_addrs(), [proxy.addr]);

    // The listener opened again is the running one: the same move works once the port is free.
    drop(holder);
    let r = ctl(&proxy, Ctl::Reload).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(get_within(&format!("http://127.0.0.5:{port}/")).await, 200);
    assert_eq!(get_on(&mut established).await, 200);
}

/// A restart (`kill -TERM`, then `run`) whose predecessor lets `admin.listen` go a moment
/// after the start tried it: nobody answers there, as in the instant a proxy exits. The start
/// was refused with "Address already in use" (h197, h201); it tries again, and binds it once
/// it is free. A socket bound there without listening stands for the predecessor: a bind
/// fails on it, and a connection to it is refused.
#[tokio::test]
async fn the_admin_listener_is_bound_once_a_leaving_holder_lets_it_go() {
    let up = echo_upstream().await;
    // Bound without SO_REUSEADDR and not listening: the proxy's bind (with it) fails.
    let holder = tokio::net::TcpSocket::new_v4().unwrap();
    holder.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let admin = holder.local_addr().unwrap();
    let held = std::net::TcpListener::bind(admin);
    assert!(held.is_err(), "the holder does not hold {admin}");
    let config = format!(
        "[upstream]\nservers = [\"{}\"]\n[admin]\nlisten = \"{admin}\"\n",
        up.url()
    );
    let lets_go = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(holder);
    });
    let proxy = spawn_proxy(&config).await;
    lets_go.await.unwrap();
    assert_eq!(proxy.running.as_ref().unwrap().admin_addr(), Some(admin));
    let metrics = get(&format!("http://{admin}/metrics")).await;
    assert_eq!(metrics.status(), 200);
}

/// A reload that turns HTTPS on (a first `tls.listen`, with its certificate) bound the new
/// listener before that certificate was in force: a client that came in between was closed
/// unanswered, as the running config had none to serve (some 20 of 8,000 connections tried
/// by 8 clients, on a release build). The kernel now queues the new listeners' first clients
/// until the config that listens there is published. Plaintext listeners were served by the
/// config being replaced as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_clients_of_a_listener_a_reload_adds_meet_its_config() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let up = echo_upstream().await;
    let tls = support::tls::Tls::new();
    let proxy = spawn_proxy(&format!("[upstream]\nservers = [\"{}\"]\n", up.url())).await;
    let dir = proxy.dir.path();
    std::fs::write(dir.join("site.pem"), &tls.cert).unwrap();
    std::fs::write(dir.join("site.key"), &tls.key).unwrap();
    // On 127.0.0.9, where no other test listens, so that the port found free stays so.
    let port = std::net::TcpListener::bind("127.0.0.9:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let https: std::net::SocketAddr = format!("127.0.0.9:{port}").parse().unwrap();
    let plain = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let with_tls = format!(
        "{plain}[tls]\nlisten = [\"{https}\"]\n[[tls.certificates]]\ncert = \"site.pem\"\nkey = \"site.key\"\n"
    );
    let mut closed = 0;
    for _ in 0..5 {
        let bound = Arc::new(AtomicBool::new(false));
        // Threads of their own, trying to connect while the reload runs on the runtime.
        let probers: Vec<_> = (0..4)
            .map(|_| {
                let bound = bound.clone();
                std::thread::spawn(move || first_connections(https, &bound))
            })
            .collect();
        std::fs::write(dir.join("config.toml"), &with_tls).unwrap();
        let r = ctl(&proxy, Ctl::Reload).await;
        assert!(r.ok, "{r:?}");
        bound.store(true, Ordering::Relaxed);
        closed += probers
            .into_iter()
            .map(|p| p.join().unwrap())
            .sum::<usize>();
        std::fs::write(dir.join("config.toml"), &plain).unwrap();
        let r = ctl(&proxy, Ctl::Reload).await;
        assert!(r.ok, "{r:?}");
    }
    assert_eq!(
        closed, 0,
        "connections closed unanswered by the new TLS listener"
    );
}

/// Connects to `addr` until it listens (refused before), then 3 times more; returns how
/// many of those connections were closed before a byte was sent, where a TLS listener waits
/// for the client's hello. Gives up trying once `bound` is set and still nothing listens.
fn first_connections(addr: std::net::SocketAddr, bound: &std::sync::atomic::AtomicBool) -> usize {
    use std::io::{ErrorKind, Read};
    let (mut tried, mut closed) = (0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tried < 4 && std::time::Instant::now() < deadline {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            if bound.load(std::sync::atomic::Ordering::Relaxed) && tried == 0 {
                break;
            }
            continue;
        };
        tried += 1;
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match s.read(&mut [0u8; 1]) {
            Ok(0) => closed += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => closed += 1,
            other => panic!("a TLS listener sent a byte unasked: {other:?}"),
        }
    }
    closed
}
