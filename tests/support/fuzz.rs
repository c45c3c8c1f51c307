//! Pieces the generated-input tests share (tests/request_fuzz.rs, tests/response_fuzz.rs): a
//! seeded generator, HTTP/1.1 body framing as a strict peer reads it, and a client that
//! tells what it got.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How many cases to run (`FUZZ_CASES`, else `cases`), and the seed they come from
/// (`FUZZ_SEED`, else `seed`), with a generator seeded from it.
pub fn told_cases(cases: usize, seed: u64) -> (usize, u64, Rng) {
    let told = |name| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let cases = told("FUZZ_CASES").map_or(cases, |n: u64| n as usize);
    let seed = told("FUZZ_SEED").unwrap_or(seed);
    // Odd, so that xorshift never meets zero.
    (cases, seed, Rng(seed.wrapping_mul(2).wrapping_add(1)))
}

/// A small deterministic generator (xorshift64*): the same seed, the same cases.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Header lines a peer must refuse (RFC 9112 §5.1, RFC 9110 §5.5), one mixed in now and then.
const REFUSED_LINES: &[&[u8]] = &[
    b"X-Space : v",
    b" X-Fold: continued",
    b"X-Nul: a\0b",
    b"NoColon",
    b": novalue",
    b"X-Ctl: a\x01b",
    b"X-Cr: a\rb",
];

/// Writes a head's header lines to `out`, each ended by `eol`, then the empty line: `lines`
/// with up to two of `extras` and now and then a line a peer must refuse, shuffled.
pub fn write_lines(
    rng: &mut Rng,
    mut lines: Vec<Vec<u8>>,
    extras: &[&[u8]],
    eol: &[u8],
    out: &mut Vec<u8>,
) {
    for _ in 0..rng.below(3) {
        lines.push(rng.pick(extras).to_vec());
    }
    if rng.one_in(10) {
        lines.push(rng.pick(REFUSED_LINES).to_vec());
    }
    for i in (1..lines.len()).rev() {
        let j = rng.below(i + 1);
        lines.swap(i, j);
    }
    for line in lines {
        out.extend_from_slice(&line);
        out.extend_from_slice(eol);
    }
    out.extend_from_slice(eol);
}

/// How a message's body is framed.
pub enum Framing {
    Length(usize),
    Chunked,
    /// Until the connection closes.
    Close,
}

impl Framing {
    /// The body and the bytes it took, `Ok(None)` while incomplete, `Err` when malformed.
    pub fn body(&self, input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ()> {
        match *self {
            Framing::Length(n) => Ok(input.get(..n).map(|b| (b.to_vec(), n))),
            Framing::Chunked => dechunk(input),
            Framing::Close => Ok(None),
        }
    }
}

pub fn dechunk(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ()> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = input[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&input[at..at + eol]).map_err(|_| ())?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ())?;
        at += eol + 2;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let Some(eol) = input[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if input.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&input[at..at + size]);
        if &input[at + size..at + size + 2] != b"\r\n" {
            return Err(());
        }
        at += size + 2;
    }
}

/// Reads the next request's head from `sock`, on after what `buf` holds: the case its target
/// `/case/N` names, if any; `None` when the connection ends first. The scripted servers' side
/// of one exchange: the proxies send no body with these requests.
pub async fn next_case<S: AsyncRead + Unpin>(
    sock: &mut S,
    buf: &mut Vec<u8>,
) -> Option<Option<usize>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let case = head
                .split(' ')
                .nth(1)
                .and_then(|target| target.strip_prefix("/case/"))
                .and_then(|n| n.parse::<usize>().ok());
            return Some(case);
        }
        if !read_more(sock, buf).await {
            return None;
        }
    }
}

pub async fn read_more<S: AsyncRead + Unpin>(sock: &mut S, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16384];
    match sock.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// The status and type of each answer a client got, and how the exchange ended.
pub type Answers = (Vec<String>, &'static str);

/// What a client sees: the status and type of each answer (with `bodies`, and its body unless
/// it is a 503, whose body tells times), and how the exchange ended (at the answer whose body
/// is `end`, at the `last`th final answer, at a close, or at a deadline).
pub async fn exchange(addr: SocketAddr, request: &[u8], last: usize, bodies: bool) -> Answers {
    let sock = TcpStream::connect(addr).await.unwrap();
    exchange_on(sock, request, last, bodies).await
}

/// `exchange` on a connection already open (over TLS, say).
pub async fn exchange_on<S>(mut sock: S, request: &[u8], last: usize, bodies: bool) -> Answers
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = sock.write_all(request).await;
    let mut buf = Vec::new();
    let mut statuses = Vec::new();
    // The first final answer to a request that begins with `HEAD` has no body.
    let mut head = request.starts_with(b"HEAD ");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            let parsed = match resp.parse(&buf) {
                Ok(httparse::Status::Complete(used)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut code = status.to_string();
                    // No length is read where no body can be, as Go reads none there.
                    let bodiless =
                        (head && status >= 200) || matches!(status, 100..=199 | 204 | 304);
                    // Without a length or chunks, the body runs to the close (RFC 9112
                    // §6.3).
                    let mut framing = Framing::Close;
                    let mut lengths = 0;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-type") {
                            code.push(' ');
                            code.push_str(&String::from_utf8_lossy(h.value));
                        } else if h.name.eq_ignore_ascii_case("content-length") {
                            // Strict, as Go's client is: a length is one line of digits. A
                            // list, even of one value repeated (`11, 11`), fails the answer
                            // there ("bad Content-Length"), and Python's reads it as no length
                            // at all; a second line, which Go takes when it says the same, is
                            // refused too: the proxy promises one.
                            lengths += 1;
                            let length = std::str::from_utf8(h.value)
                                .ok()
                                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                                .and_then(|v| v.parse().ok());
                            match length {
                                Some(n) if lengths == 1 => framing = Framing::Length(n),
                                _ if lengths == 1 && bodiless => {}
                                _ => return "unreadable answer",
                            }
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            framing = Framing::Chunked;
                        }
                    }
                    if bodiless {
                        framing = Framing::Length(0);
                        head &= status < 200;
                    }
                    Some((used, code, framing))
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return "unreadable answer",
            };
            if let Some((used, code, framing)) = parsed {
                if code.starts_with('1') {
                    statuses.push(code);
                    buf.drain(..used);
                    continue;
                }
                if let Framing::Close = framing {
                    while read_more(&mut sock, &mut buf).await {}
                    statuses.push(told(code, &buf[used..], bodies));
                    return "closed";
                }
                match framing.body(&buf[used..]) {
                    Ok(Some((body, len))) => {
                        statuses.push(told(code, &body, bodies));
                        buf.drain(..used + len);
                        if body == b"end" || finals(&statuses) == last {
                            return "end";
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(()) => return "unreadable body",
                }
            }
            if !read_more(&mut sock, &mut buf).await {
                return "closed";
            }
        }
    })
    .await
    .unwrap_or("no end in 5 s");
    (statuses, ended)
}

/// An answer's status and type, with `bodies` and its body unless it is a 503.
pub fn told(mut code: String, body: &[u8], bodies: bool) -> String {
    if bodies && !code.starts_with("503") {
        code.push_str(&format!(" {:?}", String::from_utf8_lossy(body)));
    }
    code
}

/// The proxy at `relay` relays and the one at `hyper` sends all through hyper's path, so
/// that there are two paths to compare: the relay keeps the server's header names as written,
/// hyper lowercases them. The server answers `GET /end` with `Content-Length: 3` and `end`.
pub async fn assert_paths(relay: SocketAddr, hyper: SocketAddr) {
    for (addr, relayed) in [(relay, true), (hyper, false)] {
        let sock = TcpStream::connect(addr).await.unwrap();
        assert_path_on(sock, relayed).await;
    }
}

/// That the proxy at the end of `sock` relays (`relayed`) or sends all through hyper's path,
/// as `assert_paths` tells it, on a connection already open (over TLS, say).
pub async fn assert_path_on<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, relayed: bool) {
    let line = if relayed {
        "\r\nContent-Length: 3\r\n"
    } else {
        "\r\ncontent-length: 3\r\n"
    };
    let request = b"GET /end HTTP/1.1\r\nHost: shop.test\r\n\r\n";
    sock.write_all(request).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"end") && read_more(&mut sock, &mut got).await {}
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains(line), "relayed: {relayed}: {got}");
}

/// How many answers were final (interim `1xx` ones are told but not counted).
fn finals(statuses: &[String]) -> usize {
    statuses.iter().filter(|s| !s.starts_with('1')).count()
}

/// Every request on a connection of its own, `at_once` at a time (thousands at once would
/// overflow the server's accept queue, and the proxy would rightly answer some with its
/// outage response), the answers in the requests' order.
pub async fn all_exchanges(
    addr: SocketAddr,
    requests: &[Vec<u8>],
    (last, bodies): (usize, bool),
    at_once: usize,
) -> Vec<Answers> {
    let mut out = Vec::new();
    for batch in requests.chunks(at_once) {
        let runs: Vec<_> = batch
            .iter()
            .cloned()
            .map(|r| tokio::spawn(async move { exchange(addr, &r, last, bodies).await }))
            .collect();
        for run in runs {
            out.push(run.await.unwrap());
        }
    }
    out
}
