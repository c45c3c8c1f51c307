//! Generated requests, ordinary and odd (framing, hosts, header lines, versions, line ends),
//! sent to two proxies of one server: one that relays plain requests itself and one that
//! sends every request through hyper's path. What the client gets and what the server is
//! sent must be the same through both, request by request: the relay takes only what it
//! reads exactly as hyper does, so a head the two read apart (the stuff of request
//! smuggling) shows here as a difference. `FUZZ_CASES` and `FUZZ_SEED` run more or other
//! cases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::fuzz::*;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// What the server was sent, by case: each request's line, its fields (names lowercased,
/// sorted) and its body, decoded from whichever framing it came in.
type Seen = Arc<Mutex<BTreeMap<u64, Vec<String>>>>;

/// A server on raw sockets that reads requests as a strict HTTP/1.1 server does, keeps what
/// it read under the request's `X-Case`, and answers each `ok` (`/end`: `end`).
async fn recording_server() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve_recording(sock, kept.clone()));
        }
    });
    (addr, seen)
}

async fn serve_recording(mut sock: TcpStream, seen: Seen) {
    let mut buf = Vec::new();
    loop {
        let Some((used, line, case, mut fields, framing)) = parse_request(&buf) else {
            if !read_more(&mut sock, &mut buf).await {
                return;
            }
            continue;
        };
        let body = loop {
            match framing.body(&buf[used..]) {
                Ok(Some((body, len))) => {
                    buf.drain(..used + len);
                    break body;
                }
                Ok(None) if read_more(&mut sock, &mut buf).await => {}
                _ => return,
            }
        };
        if line.contains("intermission-health-check") {
            continue;
        }
        fields.sort();
        let record = format!(
            "{line} {fields:?} body={:?}",
            String::from_utf8_lossy(&body)
        );
        let end = line.starts_with("GET /end ");
        if let Some(case) = case {
            seen.lock().unwrap().entry(case).or_default().push(record);
        }
        let answer: &[u8] = if end {
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nend"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        if sock.write_all(answer).await.is_err() {
            return;
        }
    }
}

type Parsed = (usize, String, Option<u64>, Vec<String>, Framing);

fn parse_request(buf: &[u8]) -> Option<Parsed> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        _ => return None,
    };
    let line = format!(
        "{} {} HTTP/1.{}",
        req.method.unwrap_or("?"),
        req.path.unwrap_or("?"),
        req.version.unwrap_or(9)
    );
    let mut case = None;
    let mut framing = Framing::Length(0);
    let mut fields = Vec::new();
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(h.value).into_owned();
        match name.as_str() {
            "x-case" => case = value.trim().parse().ok(),
            "content-length" => framing = Framing::Length(value.trim().parse().ok()?),
            "transfer-encoding" if value.to_ascii_lowercase().contains("chunked") => {
                framing = Framing::Chunked;
                // How a body was framed on the way is the proxy's choice; what it carries
                // is compared.
                continue;
            }
            _ => {}
        }
        if name != "content-length" {
            fields.push(format!("{name}: {value}"));
        }
    }
    Some((used, line, case, fields, framing))
}

/// One request, ordinary most of the time, with odd parts mixed in, and a last plain
/// request (`/end`) after it on the same connection.
fn generate(rng: &mut Rng, case: u64) -> Vec<u8> {
    let eol: &[u8] = if rng.one_in(25) { b"\n" } else { b"\r\n" };
    let method = if rng.one_in(6) {
        *rng.pick(&[
            "PUT", "DELETE", "OPTIONS", "PATCH", "get", "CONNECT", "TRACE", "G ET",
        ])
    } else {
        *rng.pick(&["GET", "POST"])
    };
    let target = if rng.one_in(5) {
        *rng.pick(&[
            "/a?b=1&c",
            "/%41%2e",
            "//double",
            "/a/../b",
            "http://shop.test/abs",
            "*",
            "/a#frag",
            "/a b",
            "/a\x7fb",
            "/caf\u{e9}",
            "/a\tb",
            "",
            "/_intermission/status",
        ])
    } else {
        "/p"
    };
    let version = if rng.one_in(10) {
        *rng.pick(&[
            "HTTP/1.0",
            "HTTP/1.2",
            "HTTP/2.0",
            "http/1.1",
            "HTTP/1.1 ",
            "HTTP/1",
        ])
    } else {
        "HTTP/1.1"
    };
    let mut head = format!("{method} {target} {version}").into_bytes();
    head.extend_from_slice(eol);
    head.extend_from_slice(format!("X-Case: {case}").as_bytes());
    head.extend_from_slice(eol);
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let host = if rng.one_in(8) {
        *rng.pick(&[
            "",
            "shop.test:8080",
            "a b",
            "shop.test, evil",
            "[::1]:80",
            "shop.test:",
            "shop.test:x",
            "sh\u{f6}p.test",
            "-",
            "shop.test.",
        ])
    } else {
        "shop.test"
    };
    if !rng.one_in(25) {
        lines.push(format!("Host: {host}").into_bytes());
    }
    if rng.one_in(30) {
        lines.push(b"Host: other.test".to_vec());
    }
    // How the body is framed, and the body sent.
    let mut length: Option<String> = None;
    let mut chunked = false;
    if method == "POST" || rng.one_in(5) {
        if rng.one_in(4) {
            let te = *rng.pick(&[
                "chunked",
                "chunked",
                "gzip, chunked",
                "chunked, gzip",
                "xchunked",
                "Chunked",
                "chunked ",
                "identity",
            ]);
            lines.push(format!("Transfer-Encoding: {te}").into_bytes());
            chunked = true;
            if rng.one_in(3) {
                lines.push(b"Content-Length: 5".to_vec());
            }
        } else {
            let value = if rng.one_in(4) {
                (*rng.pick(&[
                    "+5",
                    "5, 5",
                    " 5 ",
                    "05",
                    "-1",
                    "5 5",
                    "99999999999999999999",
                    "0x5",
                    "",
                    "5,",
                ]))
                .to_owned()
            } else {
                rng.below(40).to_string()
            };
            lines.push(format!("Content-Length: {value}").into_bytes());
            length = Some(value.clone());
            if rng.one_in(6) {
                // The same again, or another.
                let again = if rng.one_in(2) {
                    value.clone()
                } else {
                    "6".to_owned()
                };
                lines.push(format!("Content-Length: {again}").into_bytes());
            }
        }
    }
    let extras: &[&[u8]] = &[
        b"Connection: close",
        b"Connection: keep-alive",
        b"Connection: Keep-Alive",
        b"Connection: upgrade",
        b"Connection: keep-alive, x-hop",
        b"Upgrade: websocket",
        b"Expect: 100-continue",
        b"TE: trailers",
        b"Keep-Alive: timeout=5",
        b"X-Forwarded-For: 1.2.3.4",
        b"X-Forwarded-For: ",
        b"X-Forwarded-Host: evil",
        b"X-Forwarded-Proto: https",
        b"Proxy-Connection: keep-alive",
        b"X-Empty:",
        b"X-Tab:\tv\t",
        b"X-High: \x80\xff",
        b"x-lower: v",
        b"Cookie: a=b",
        b"Accept: application/json",
        b"Accept: text/html",
        b"Accept: text/html;q=0, */*",
        b"Accept: text/event-stream",
        b"Content-Type: application/grpc",
        b"Forwarded: for=1.2.3.4",
    ];
    if rng.one_in(20) {
        let n = *rng.pick(&[100, 4000, 9000, 70000]);
        lines.push(format!("X-Long: {}", "a".repeat(n)).into_bytes());
    }
    write_lines(rng, lines, extras, eol, &mut head);
    if chunked {
        head.extend_from_slice(b"5\r\nhello\r\n0\r\n\r\n");
    } else if let Some(value) = length {
        // What a plain length says, else 5 bytes.
        let n = value.parse::<usize>().unwrap_or(5);
        head.extend(std::iter::repeat_n(b'b', n));
    }
    head.extend_from_slice(
        format!("GET /end HTTP/1.1\r\nHost: shop.test\r\nX-Case: {case}\r\n\r\n").as_bytes(),
    );
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_requests_are_read_alike_by_the_relay_and_hyper_s_path() {
    let (up, seen) = recording_server().await;
    let config = |hyper: bool| {
        // `intercept_statuses` sends every request through hyper's path (tests/relay.rs).
        let intercept = if hyper {
            "intercept_statuses = [418]\n"
        } else {
            ""
        };
        format!(
            "[proxy]\nheader_read_timeout = \"2s\"\n[upstream]\nservers = [\"http://{up}\"]\n\
             {intercept}[health]\ninterval = \"60s\"\n"
        )
    };
    let relay = spawn_proxy(&config(false)).await;
    let hyper = spawn_proxy(&config(true)).await;
    assert_paths(relay.addr, hyper.addr).await;
    let (cases, seed, requests) = generated();
    let mut results = Vec::new();
    for proxy in [&relay, &hyper] {
        seen.lock().unwrap().clear();
        let answers = all_exchanges(proxy.addr, &requests, (usize::MAX, false), 50).await;
        let sent = std::mem::take(&mut *seen.lock().unwrap());
        results.push((answers, sent));
    }
    let (relayed, through_hyper) = (&results[0], &results[1]);
    let mut differences = Vec::new();
    for (case, request) in requests.iter().enumerate() {
        let key = case as u64;
        let a = (&relayed.0[case], relayed.1.get(&key));
        let b = (&through_hyper.0[case], through_hyper.1.get(&key));
        if a != b {
            differences.push(format!(
                "case {case}: {:?}\n  relay: {a:?}\n  hyper: {b:?}",
                shown(request)
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {cases} cases differ (seed {seed}):\n{}",
        differences.len(),
        differences[..differences.len().min(15)].join("\n")
    );
}

/// In maintenance, where the proxy answers every request itself (`fast::held` the plain
/// ones, hyper's path the rest, whatever the relay's settings, so there is no second path to
/// compare with): the server is sent nothing, and every client gets answers it can read,
/// ending at its last request or at a close, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_requests_in_maintenance_get_answers_and_reach_no_server() {
    let (up, seen) = recording_server().await;
    let proxy = spawn_proxy(&format!(
        "[proxy]\nheader_read_timeout = \"2s\"\n[upstream]\nservers = [\"http://{up}\"]\n\
         [health]\ninterval = \"60s\"\n"
    ))
    .await;
    ctl(&proxy, on(Some("fuzz"))).await;
    wait_mode(&proxy, "maintenance", Duration::from_secs(10)).await;
    let (cases, seed, requests) = generated();
    let answers = all_exchanges(proxy.addr, &requests, (2, false), 50).await;
    let sent = seen.lock().unwrap().clone();
    assert!(
        sent.is_empty(),
        "sent to the server in maintenance: {sent:?}"
    );
    // What a held request gets (the problem, the page, gRPC's UNAVAILABLE in a 200, an event
    // stream's reconnection, the status JSON at its reserved path), and what a malformed or
    // refused one gets.
    let readable = [
        "503 application/problem+json",
        "503 text/html; charset=utf-8",
        "200 text/event-stream",
        "200 application/grpc",
        "200 application/json",
        "100",
        "400",
        "400 text/plain; charset=utf-8",
        "405 text/plain; charset=utf-8",
        "431",
        "431 text/plain; charset=utf-8",
        "501 text/plain; charset=utf-8",
    ];
    let odd: Vec<String> = requests
        .iter()
        .zip(&answers)
        .filter(|(_, (statuses, ended))| {
            !matches!(*ended, "end" | "closed")
                || statuses.is_empty()
                || statuses.iter().any(|s| !readable.contains(&s.as_str()))
        })
        .map(|(request, got)| format!("{:?}\n  got {got:?}", shown(request)))
        .collect();
    assert!(
        odd.is_empty(),
        "{} of {cases} cases (seed {seed}) got no readable answer:\n{}",
        odd.len(),
        odd[..odd.len().min(15)].join("\n")
    );
}

/// The cases: `FUZZ_CASES` of them (2,000 unless told) from `FUZZ_SEED`.
fn generated() -> (u64, u64, Vec<Vec<u8>>) {
    let (cases, seed, mut rng) = told_cases(2000, 0x001e_570f_5eed);
    let cases = cases as u64;
    let requests = (0..cases).map(|case| generate(&mut rng, case)).collect();
    (cases, seed, requests)
}

fn shown(request: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&request[..request.len().min(600)])
}
