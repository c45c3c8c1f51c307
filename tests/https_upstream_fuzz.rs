//! `https://` servers that misuse TLS. Generated HTTP/1.1 answers with TLS's own faults mixed in
//! (a close with no `close_notify`, before, within or after the answer; `close_notify` itself;
//! records that do not decrypt; bytes that are no record; a flood of `KeyUpdate`s; a stall),
//! from servers that offer HTTP/1.1 alone by ALPN or no ALPN at all: each case is one request
//! through the proxy, then `GET /end`, and a client must get the server's answer whole when it
//! was, else the outage answer or, once the head has left, that head with its body cut short
//! (never passed on as whole), within the configured timeouts; and the next request is served.
//! The requests are plain ones, which the relay forwards over TLS sessions of its own.
//! Then handshakes that go wrong, on the first connection of either ALPN outcome and on one the
//! HTTP/1.1 path dials later: stalled (bounded by `connect_timeout`), closed, answered in plain
//! HTTP or garbage, a certificate that fails verification. The faults within HTTP/2 answers
//! are in tests/h2_upstream_fuzz.rs, the odd HTTP/1.1 answers of `https://` servers in
//! tests/response_fuzz.rs. `FUZZ_CASES` and `FUZZ_SEED` run more or other cases, `FUZZ_CASE=N`
//! one alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::fuzz::*;
use support::tls::*;
use support::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Cases run in this many lanes at once, each with a server and a proxy of its own.
const LANES: usize = 4;

/// The proxy's timeouts: a head that never comes is answered after `response_timeout`, a body
/// that stops is cut after `read_timeout`, a handshake that never ends fails after
/// `connect_timeout`.
const TIMEOUTS: &str =
    "response_timeout = \"2s\"\nread_timeout = \"1s\"\nconnect_timeout = \"500ms\"\n";

/// One step of a scripted answer.
#[derive(Clone, Debug)]
enum Step {
    Bytes(Vec<u8>),
    Fault(Fault),
    /// Nothing more is written; the connection stays open until the proxy closes it.
    Stall,
}

/// What a case's client must get.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// The server's answer, whole.
    Whole,
    /// The outage answer: no head came.
    Outage,
    /// The outage answer, or the head with its body cut short: never a body passed on as
    /// whole.
    Cut,
    /// The answer whole or, lost with the records that carried its end (when they and an
    /// error come in one read, tokio-rustls fails the read and what rustls decrypted is not
    /// read again), as `Cut`.
    WholeOrCut,
}

struct Case {
    steps: Vec<Step>,
    body: Vec<u8>,
    expect: Expect,
    /// The server closes before its head: on a kept connection, as keep-alive's race closes
    /// one, the request is sent again once. So it may be after any fault that breaks the
    /// session (an alert, a record that does not decrypt), wherever it falls: what came
    /// before it in the same read is lost with it, the head too (see below), and a kept
    /// connection failing before a head is tried again, as nginx tries a cached one.
    twice: bool,
    note: String,
}

/// How the body is framed.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Length,
    Chunked,
    /// Until the close, with `close_notify` or (`false`) without.
    Close(bool),
}

fn generate(rng: &mut Rng, n: usize) -> Case {
    // Some bodies past a TLS record (16 KiB), so that the faults fall between records too.
    let size = if rng.one_in(4) {
        16_384 + rng.below(30_000)
    } else {
        rng.below(200)
    };
    let mut body = format!("case {n} ").into_bytes();
    body.resize(body.len() + size, b'z');
    let framing = match rng.below(4) {
        0 => Framing::Chunked,
        1 => Framing::Close(!rng.one_in(3)),
        _ => Framing::Length,
    };
    let mut head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n".to_owned();
    match framing {
        Framing::Length => head.push_str(&format!("Content-Length: {}\r\n", body.len())),
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::Close(_) => head.push_str("Connection: close\r\n"),
    }
    head.push_str("\r\n");
    let mut steps = vec![Step::Bytes(head.into_bytes())];
    let pieces = 1 + rng.below(3);
    for piece in body.chunks(body.len().div_ceil(pieces)) {
        match framing {
            Framing::Chunked => {
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(piece);
                chunk.extend_from_slice(b"\r\n");
                steps.push(Step::Bytes(chunk));
            }
            _ => steps.push(Step::Bytes(piece.to_vec())),
        }
    }
    if let Framing::Chunked = framing {
        steps.push(Step::Bytes(b"0\r\n\r\n".to_vec()));
    }
    let mut expect = Expect::Whole;
    let mut twice = false;
    let mut note = vec![format!("{framing:?}, {} bytes in {pieces}", body.len())];
    if let Framing::Close(notify) = framing {
        let fault = if notify {
            Fault::CloseNotify
        } else {
            Fault::Drop
        };
        steps.push(Step::Fault(fault));
        if !notify {
            // To TLS, a close with no `close_notify` may be a truncation (RFC 8446 §6.1):
            // whether the proxy passes such a body on as whole is its choice.
            expect = Expect::WholeOrCut;
        }
    }
    // A fault, in most cases: before the head, within the answer, or after it.
    if !rng.one_in(4) {
        let close = matches!(framing, Framing::Close(_));
        let fault = match *rng.pick(&[
            Some(Fault::Drop),
            Some(Fault::CloseNotify),
            Some(Fault::ClearAlert),
            Some(Fault::Garbage),
            Some(Fault::Corrupt),
            Some(Fault::KeyUpdates(1)),
            Some(Fault::KeyUpdates(5)),
            Some(Fault::KeyUpdates(40)),
            None,
        ]) {
            // A `close_notify` within a body that ends at the close ends it there, as the
            // server's word: a shorter answer, nothing odd.
            Some(Fault::CloseNotify) if close => Some(Fault::Drop),
            fault => fault,
        };
        // Where it goes: a stall, or any fault of a body that ends at the close, before the
        // answer's last step at the latest (in place of its close).
        let room = if fault.is_none() || close {
            steps.len()
        } else {
            steps.len() + 1
        };
        let at = rng.below(room);
        let told = fault.map_or("stall".into(), |f| format!("{f:?}"));
        note.push(format!("{told} at step {at} of {}", steps.len()));
        if let Some(Fault::KeyUpdates(n @ 0..=32)) = fault {
            // Valid TLS: the answer goes on after them.
            steps.insert(at, Step::Fault(Fault::KeyUpdates(n)));
        } else {
            // The answer was all sent before it (its close aside).
            let all_before = at >= steps.len() - usize::from(close);
            expect = match fault {
                _ if at == 0 => Expect::Outage,
                // As the body's own close with no `close_notify`.
                Some(Fault::Drop) if all_before && close => Expect::WholeOrCut,
                // An answer that had ended: a close is none of its business, an error may
                // take it.
                Some(Fault::Drop | Fault::CloseNotify) if all_before => expect,
                Some(_) if all_before && !close => worst(expect, Expect::WholeOrCut),
                _ => Expect::Cut,
            };
            twice = match fault {
                Some(Fault::Drop | Fault::CloseNotify) => at == 0,
                Some(Fault::ClearAlert | Fault::Garbage | Fault::Corrupt) => true,
                Some(Fault::KeyUpdates(n)) => n > 32,
                None => false,
            };
            steps.truncate(at);
            steps.push(fault.map_or(Step::Stall, Step::Fault));
        }
    }
    Case {
        steps,
        body,
        expect,
        twice,
        note: note.join(", "),
    }
}

fn worst(a: Expect, b: Expect) -> Expect {
    let rank = |e| match e {
        Expect::Whole => 0,
        Expect::WholeOrCut => 1,
        Expect::Cut => 2,
        Expect::Outage => 3,
    };
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}

/// The server's side of one connection: answers `/case/N` with case N's steps and anything
/// else with `end`, until a step ends the connection. Counts how often each case came.
async fn serve<S>(mut sock: S, tls: Faulty, cases: Arc<Vec<Case>>, came: Arc<Mutex<Vec<usize>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    while let Some(case) = next_case(&mut sock, &mut buf).await {
        let Some(n) = case.filter(|&n| n < cases.len()) else {
            let end =
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nend";
            if sock.write_all(end).await.is_err() || sock.flush().await.is_err() {
                return;
            }
            continue;
        };
        came.lock().unwrap()[n] += 1;
        for step in &cases[n].steps {
            match step {
                Step::Bytes(bytes) => {
                    if sock.write_all(bytes).await.is_err() || sock.flush().await.is_err() {
                        return;
                    }
                }
                Step::Fault(fault) => {
                    if !tls.commit(*fault).await {
                        return;
                    }
                    if !matches!(fault, Fault::KeyUpdates(n) if *n <= 32) {
                        // Dropped with its reader: nothing more is said.
                        tls.close_tcp().await;
                        return;
                    }
                }
                Step::Stall => {
                    // Until the proxy gives up and closes.
                    while read_more(&mut sock, &mut Vec::new()).await {}
                    return;
                }
            }
        }
    }
}

/// A server answering the cases over TLS, offering `alpn`; how often each case came.
async fn server(
    tls: &Tls,
    alpn: &[&[u8]],
    cases: Arc<Vec<Case>>,
) -> (SocketAddr, Arc<Mutex<Vec<usize>>>) {
    let acceptor = tls.acceptor(alpn);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let came = Arc::new(Mutex::new(vec![0; cases.len()]));
    let counted = came.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (acceptor, cases, came) = (acceptor.clone(), cases.clone(), counted.clone());
            tokio::spawn(async move {
                // A health check over TCP ends in the handshake.
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let tls = Faulty::new(tls);
                // The proxy's first connection offers HTTP/2 too, and is let go unused when
                // the server chooses HTTP/1.1.
                serve(tls.clone(), tls, cases, came).await;
            });
        }
    });
    (addr, came)
}

/// A proxy before the `https://` server at `up`, trusting `tls`: one worker, so that the cases
/// of a lane share its connections; health checked by TCP alone, rarely, and never taken out,
/// or every later case would get the outage answer.
async fn proxy(tls: &Tls, up: SocketAddr) -> Proxy {
    tls.trusting(&format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"https://{up}\"]\n{TIMEOUTS}\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\nfall = 1000000\n"
    ))
    .await
}

/// What a client got for a case, read from `exchange`'s account of it.
#[derive(Debug, PartialEq)]
enum Got {
    Whole,
    Outage,
    /// The head, then the connection closed short of the body's end.
    Cut,
    Other(String),
}

fn got(case: &Case, (statuses, ended): &Answers) -> Got {
    let whole = format!("200 text/plain {:?}", String::from_utf8_lossy(&case.body));
    match statuses.first() {
        Some(s) if *s == whole => Got::Whole,
        Some(s) if s.starts_with("503 application/problem+json") => Got::Outage,
        None if *ended == "closed" => Got::Cut,
        _ => Got::Other(format!(
            "{:?}, {ended}",
            statuses
                .iter()
                .map(|s| s.chars().take(80).collect::<String>())
                .collect::<Vec<_>>()
        )),
    }
}

fn allowed(expect: Expect, got: &Got) -> bool {
    matches!(
        (expect, got),
        (Expect::Whole, Got::Whole)
            | (Expect::Outage, Got::Outage)
            | (Expect::Cut, Got::Outage | Got::Cut)
            | (Expect::WholeOrCut, Got::Whole | Got::Outage | Got::Cut)
    )
}

const END: &str = "200 text/plain \"end\"";

async fn run_lane(
    tls: Arc<Tls>,
    cases: Arc<Vec<Case>>,
    lane: usize,
    only: Option<usize>,
) -> Vec<String> {
    // Half the lanes' servers offer HTTP/1.1 by ALPN, the others no ALPN at all.
    let alpn: &[&[u8]] = if lane % 2 == 0 { &[b"http/1.1"] } else { &[] };
    let (up, came) = server(&tls, alpn, cases.clone()).await;
    let proxy = proxy(&tls, up).await;
    // The cases are the relay's, which reads the server's TLS sessions itself.
    assert_path_on(TcpStream::connect(proxy.addr).await.unwrap(), true).await;
    let mut failures = Vec::new();
    for n in (lane..cases.len()).step_by(LANES) {
        if only.is_some_and(|only| only != n) {
            continue;
        }
        let case = &cases[n];
        let started = Instant::now();
        let request = format!(
            "GET /case/{n} HTTP/1.1\r\nHost: shop.test\r\n\r\nGET /end HTTP/1.1\r\nHost: shop.test\r\n\r\n"
        );
        let answers = exchange(proxy.addr, request.as_bytes(), 2, true).await;
        let took = started.elapsed();
        let mut wrong = Vec::new();
        let got = got(case, &answers);
        if !allowed(case.expect, &got) {
            wrong.push(format!("got {got:?}"));
        }
        // The next request, on the same connection when it stayed open, is served.
        let end_here = answers.0.get(1).map(String::as_str);
        if end_here != Some(END) {
            let again = exchange(
                proxy.addr,
                b"GET /end HTTP/1.1\r\nHost: shop.test\r\n\r\n",
                1,
                true,
            )
            .await;
            if answers.1 != "closed" || again.0.first().map(String::as_str) != Some(END) {
                wrong.push(format!("`/end` got {:?}, then {again:?}", end_here));
            }
        }
        let times = came.lock().unwrap()[n];
        if times != 1 && !(case.twice && times == 2) {
            wrong.push(format!("sent to the server {times} times"));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "case {n} ({}; ALPN {:?}; expected {:?}) in {took:?}: {}",
                case.note,
                alpn,
                case.expect,
                wrong.join("; ")
            ));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_faults_in_http1_answers_get_the_server_s_answer_or_a_documented_one() {
    let (cases, seed, mut rng) = told_cases(120, 0x0001_7150_fa17);
    let all: Arc<Vec<Case>> = Arc::new((0..cases).map(|n| generate(&mut rng, n)).collect());
    let only = std::env::var("FUZZ_CASE").ok().and_then(|n| n.parse().ok());
    let tls = Arc::new(Tls::new());
    let lanes: Vec<_> = (0..LANES)
        .map(|lane| tokio::spawn(run_lane(tls.clone(), all.clone(), lane, only)))
        .collect();
    let mut failures = Vec::new();
    for lane in lanes {
        failures.extend(lane.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed (seed {seed}; FUZZ_SEED={seed} FUZZ_CASES={cases} replays them, FUZZ_CASE=N one alone):\n{}",
        failures.len(),
        failures[..failures.len().min(15)].join("\n")
    );
}

// Handshakes.

/// How a server's handshake goes wrong.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Handshake {
    /// Reads the ClientHello and says nothing.
    Silent,
    /// Sends the first half of its flight, then nothing.
    Half,
    /// Closes on the ClientHello.
    Closes,
    /// Answers the ClientHello as a plain HTTP server would (`http://` behind an `https://`
    /// URL), and closes.
    PlainHttp,
    /// Bytes that are no TLS record, and the connection kept open.
    Garbage,
    /// A fatal `handshake_failure` alert, as a server with no cipher in common sends.
    Alert,
    /// A certificate from an issuer the proxy does not trust.
    UnknownIssuer,
    /// A trusted certificate for another name.
    WrongName,
    /// A trusted certificate whose time has passed.
    Expired,
    /// ALPN chose HTTP/2, and the server speaks HTTP/1.1 (a server that offers what it does not
    /// speak).
    LiesAboutH2,
}

const HANDSHAKES: &[Handshake] = &[
    Handshake::Silent,
    Handshake::Half,
    Handshake::Closes,
    Handshake::PlainHttp,
    Handshake::Garbage,
    Handshake::Alert,
    Handshake::UnknownIssuer,
    Handshake::WrongName,
    Handshake::Expired,
    Handshake::LiesAboutH2,
];

/// A server that, while `armed`, fails every handshake as `how` says, and otherwise answers
/// every request `end` (with `Connection: close` to `/warm`), over HTTP/2 or HTTP/1.1 as ALPN
/// chose. Its certificates: `tls` (trusted), `other` (not) and `wrong`/`expired` (trusted,
/// not valid here).
struct Faulting {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    handshakes: Arc<AtomicUsize>,
}

struct Certs {
    trusted: Tls,
    other: Tls,
    wrong: Tls,
    expired: Tls,
}

impl Certs {
    fn new() -> Certs {
        Certs {
            trusted: Tls::new(),
            other: Tls::new(),
            wrong: Tls::for_names(&["elsewhere.test"], false),
            expired: Tls::for_names(&["localhost", "127.0.0.1"], true),
        }
    }
}

async fn faulting(certs: &Certs, how: Handshake, h2: bool) -> Faulting {
    let alpn: &[&[u8]] = if h2 || how == Handshake::LiesAboutH2 {
        &[b"h2", b"http/1.1"]
    } else {
        &[b"http/1.1"]
    };
    let good = certs.trusted.acceptor(alpn);
    let bad = match how {
        Handshake::UnknownIssuer => certs.other.acceptor(alpn),
        Handshake::WrongName => certs.wrong.acceptor(alpn),
        Handshake::Expired => certs.expired.acceptor(alpn),
        _ => good.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let (is_armed, counted) = (armed.clone(), handshakes.clone());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let armed = is_armed.load(Ordering::SeqCst);
            let acceptor = if armed { bad.clone() } else { good.clone() };
            let counted = counted.clone();
            tokio::spawn(async move {
                if armed {
                    fail_handshake(sock, how, &acceptor, &counted).await;
                } else {
                    serve_well(sock, &acceptor).await;
                }
            });
        }
    });
    Faulting {
        addr,
        armed,
        handshakes,
    }
}

async fn fail_handshake(
    mut sock: TcpStream,
    how: Handshake,
    acceptor: &tokio_rustls::TlsAcceptor,
    handshakes: &AtomicUsize,
) {
    let mut hello = Vec::new();
    match how {
        Handshake::UnknownIssuer | Handshake::WrongName | Handshake::Expired => {
            handshakes.fetch_add(1, Ordering::SeqCst);
            if let Ok(tls) = acceptor.accept(sock).await {
                // Not reached unless the proxy took the certificate.
                serve_well_on(tls).await;
            }
            return;
        }
        Handshake::LiesAboutH2 => {
            let Ok(mut tls) = acceptor.accept(sock).await else {
                return;
            };
            handshakes.fetch_add(1, Ordering::SeqCst);
            let mut preface = Vec::new();
            let _ = read_more(&mut tls, &mut preface).await;
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlied";
            let _ = tls.write_all(answer).await;
            let _ = tls.flush().await;
            while read_more(&mut tls, &mut Vec::new()).await {}
            return;
        }
        _ => {}
    }
    // A TCP health check sends nothing.
    if !read_more(&mut sock, &mut hello).await {
        return;
    }
    handshakes.fetch_add(1, Ordering::SeqCst);
    match how {
        Handshake::Silent => {}
        Handshake::Half => {
            let mut conn = rustls::ServerConnection::new(acceptor.config().clone()).unwrap();
            let mut flight = Vec::new();
            if conn.read_tls(&mut &hello[..]).is_ok() && conn.process_new_packets().is_ok() {
                while conn.wants_write() && conn.write_tls(&mut flight).is_ok() {}
            }
            let _ = sock.write_all(&flight[..flight.len() / 2]).await;
        }
        Handshake::Closes => return,
        Handshake::PlainHttp => {
            let answer = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 43\r\nConnection: close\r\n\r\nThis port speaks HTTP, not HTTPS. Goodbye.\n";
            let _ = sock.write_all(answer).await;
            return;
        }
        Handshake::Garbage => {
            let _ = sock.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64)).await;
        }
        Handshake::Alert => {
            let _ = sock
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
                .await;
            return;
        }
        _ => unreachable!(),
    }
    // Held open until the proxy lets go.
    while read_more(&mut sock, &mut Vec::new()).await {}
}

async fn serve_well(sock: TcpStream, acceptor: &tokio_rustls::TlsAcceptor) {
    if let Ok(tls) = acceptor.accept(sock).await {
        serve_well_on(tls).await;
    }
}

async fn serve_well_on(tls: tokio_rustls::server::TlsStream<TcpStream>) {
    use hyper::body::Incoming;
    let service = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
        let mut resp = http::Response::builder().header("content-type", "text/plain");
        if req.uri().path() == "/warm" {
            resp = resp.header("connection", "close");
        }
        Ok::<_, std::convert::Infallible>(resp.body(full("end")).unwrap())
    });
    // Header names in title case, which the relay passes on as written and hyper's path
    // lowercases (`assert_path_on`).
    let mut server =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    server.http1().title_case_headers(true);
    let _ = server
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await;
}

/// One request on a connection of its own: what the client got, and how long it took.
async fn ask(proxy: &Proxy, path: &str) -> (Answers, Duration) {
    let started = Instant::now();
    let request = format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    let got = exchange(proxy.addr, request.as_bytes(), 1, true).await;
    (got, started.elapsed())
}

/// Each way a handshake goes wrong, on the proxy's first connection to a server that chooses
/// HTTP/2 or HTTP/1.1, and on one the relay dials later (after a `Connection: close`):
/// the outage answer, within `connect_timeout` of stalling (well before `response_timeout`);
/// and once the server handshakes again, the next request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_go_wrong_get_the_outage_answer_within_connect_timeout() {
    let certs = Arc::new(Certs::new());
    let mut runs = Vec::new();
    let only = std::env::var("FUZZ_CASE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok());
    let mut n = 0;
    for &how in HANDSHAKES {
        for (h2, warm) in [(true, false), (false, false), (false, true)] {
            if how == Handshake::LiesAboutH2 && !h2 {
                continue;
            }
            n += 1;
            if only.is_some_and(|only| only != n - 1) {
                continue;
            }
            let certs = certs.clone();
            let case = n - 1;
            runs.push(tokio::spawn(async move {
                handshake_case(&certs, how, h2, warm)
                    .await
                    .map_err(|why| format!("case {case} ({how:?}, h2 {h2}, warm {warm}): {why}"))
            }));
        }
    }
    let mut failures = Vec::new();
    for run in runs {
        if let Err(why) = run.await.unwrap() {
            failures.push(why);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

async fn handshake_case(certs: &Certs, how: Handshake, h2: bool, warm: bool) -> Result<(), String> {
    let server = faulting(certs, how, h2).await;
    // Longer than the rest, so that a handshake held to it shows.
    let config = format!(
        "[proxy]\nthreads = 1\n[upstream]\nservers = [\"https://{}\"]\n\
         response_timeout = \"4s\"\nread_timeout = \"1s\"\nconnect_timeout = \"500ms\"\n\
         [health]\nkind = \"tcp\"\ninterval = \"1h\"\nfall = 1000000\n",
        server.addr
    );
    let proxy = certs.trusted.trusting(&config).await;
    if warm {
        // The relay's own session, dialed once the server is known to speak HTTP/1.1, is the
        // one the warm-up closes: the handshake that fails is then the relay's.
        assert_path_on(TcpStream::connect(proxy.addr).await.unwrap(), true).await;
        let (got, _) = ask(&proxy, "/warm").await;
        if got.0.first().map(String::as_str) != Some(END) {
            return Err(format!("the warm-up got {got:?}"));
        }
    }
    server.armed.store(true, Ordering::SeqCst);
    let (got, took) = ask(&proxy, "/case").await;
    let outage = got
        .0
        .first()
        .is_some_and(|s| s.starts_with("503 application/problem+json"));
    if !outage {
        return Err(format!("got {got:?} in {took:?}"));
    }
    if took > Duration::from_secs(3) {
        return Err(format!("the outage answer took {took:?}"));
    }
    if server.handshakes.load(Ordering::SeqCst) == 0 {
        return Err("no handshake was tried".into());
    }
    server.armed.store(false, Ordering::SeqCst);
    let (got, took) = ask(&proxy, "/end").await;
    if got.0.first().map(String::as_str) != Some(END) {
        return Err(format!("then `/end` got {got:?} in {took:?}"));
    }
    Ok(())
}

/// A certificate that fails verification is logged as such, with the outage answer, by the
/// real binary: the log names the failure, so that whoever reads it knows it is no crash.
#[tokio::test]
async fn a_certificate_that_fails_verification_is_logged() {
    let certs = Certs::new();
    let server = faulting(&certs, Handshake::UnknownIssuer, true).await;
    server.armed.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &certs.trusted.cert).unwrap();
    let proxy = ProxyProcess::start(
        dir.path(),
        &format!(
            "[upstream]\nservers = [\"https://{}\"]\nca_file = \"ca.pem\"\n\
             connect_timeout = \"500ms\"\n[health]\nkind = \"tcp\"\ninterval = \"1h\"\n",
            server.addr
        ),
    );
    let (got, _) = {
        let request = b"GET /x HTTP/1.1\r\nHost: shop.test\r\n\r\n";
        (exchange(proxy.addr, request, 1, true).await, ())
    };
    assert!(
        got.0
            .first()
            .is_some_and(|s| s.starts_with("503 application/problem+json")),
        "{got:?}"
    );
    let logged = wait_until(Duration::from_secs(5), || {
        proxy
            .log_lines()
            .iter()
            .any(|l| l.contains("forwarding failed") && l.contains("certificate"))
    })
    .await;
    assert!(logged, "{:#?}", proxy.log_lines());
}

/// A kept `https://` connection over HTTP/1.1 that the server closes as the next request
/// arrives (its keep-alive timeout, keep-alive's race) costs that request a second try on a new
/// connection, as it does for an `http://` server (tests/upstream_pool.rs), not the outage
/// answer. So does one whose session fails then (a fatal alert in the clear, which does not
/// decrypt: as a server's TLS library gone wrong after its last answer, unseen until the next
/// request), as nginx sends a request again after any error on a cached connection.
#[tokio::test]
async fn a_kept_https_connection_the_server_closed_as_the_request_came_is_no_outage() {
    for clear_alert in [false, true] {
        kept_https_connection_failing_at_the_next_request(clear_alert).await;
    }
}

async fn kept_https_connection_failing_at_the_next_request(clear_alert: bool) {
    let tls = Tls::new();
    let acceptor = tls.acceptor(&[b"http/1.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut sock) = acceptor.accept(sock).await else {
                    return;
                };
                let mut buf = Vec::new();
                let heads = |buf: &[u8]| buf.windows(4).filter(|w| w == b"\r\n\r\n").count();
                for answered in [false, true] {
                    while heads(&buf) < 1 + usize::from(answered) {
                        if !read_more(&mut sock, &mut buf).await {
                            return;
                        }
                    }
                    // The next request is closed on, unanswered (with `close_notify`), or
                    // gets an alert in the clear.
                    if answered && clear_alert {
                        let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50];
                        let _ = sock.get_mut().0.write_all(&alert).await;
                        return;
                    }
                    if answered {
                        let _ = sock.shutdown().await;
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if sock.write_all(answer).await.is_err() || sock.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = tls
        .trusting(&format!(
            "[proxy]\nthreads = 1\n[upstream]\nservers = [\"https://{addr}\"]\n\
             [health]\nkind = \"tcp\"\ninterval = \"1h\"\n"
        ))
        .await;
    for i in 0..6 {
        let (got, took) = ask(&proxy, "/").await;
        assert_eq!(
            got.0.first().map(String::as_str),
            Some("200 \"ok\""),
            "request {i} (clear alert: {clear_alert}): {got:?} in {took:?}"
        );
    }
}
