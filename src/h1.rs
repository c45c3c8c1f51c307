//! The HTTP/1.1 wire form of a whole response, written as hyper writes it, for the answers
//! sent without hyper (`fast`), and the request targets that the paths without hyper take as
//! `Uri` would take them. The holding responses are encoded once per change of state
//! (`Encoded`, kept by `hold::held` while no answer depends on the moment, else their heads up
//! to `Retry-After`), so that a held request adds only the `Date` of its second (and that
//! number) to bytes ready to send.

use bytes::Bytes;
use http::header;
use http::response::Parts;
use http::StatusCode;
use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A response encoded but for its `Date`, which changes every second.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The status line and the headers, without the blank line that ends them.
    head: Bytes,
    body: Bytes,
    status: StatusCode,
    /// Whether the response carries a `Date` of its own.
    dated: bool,
}

impl Encoded {
    /// `parts` and `body` as `encode` writes them. `head`: the answer to a HEAD request,
    /// whose `body` is empty.
    pub fn new(parts: &Parts, body: Bytes, head: bool) -> Encoded {
        let mut out = Vec::with_capacity(256);
        let dated = encode_head(parts, body.len(), head, &mut out);
        Encoded {
            head: Bytes::from(out),
            body,
            status: parts.status,
            dated,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body's length as sent: 0 for the answer to a `HEAD`.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Appends the response, dated now, to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        self.write_with(b"", out);
    }

    /// `write`, with the header lines `extra` (each ending in CRLF) after the encoded ones.
    pub fn write_with(&self, extra: &[u8], out: &mut Vec<u8>) {
        out.reserve(self.head.len() + extra.len() + 40 + self.body.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(extra);
        end_head(self.dated, &self.body, out);
    }

    /// `write_with` into `out`, whose body stays where it lies when `out` can send it so.
    pub fn answer_with<'s>(&'s self, extra: &[u8], out: &mut Answers<'s, '_>) {
        let buf = &mut *out.buf;
        buf.reserve(self.head.len() + extra.len() + 40);
        buf.extend_from_slice(&self.head);
        buf.extend_from_slice(extra);
        end_head(self.dated, b"", buf);
        out.body(&self.body);
    }
}

/// Bodies an `Answers` sends from where they lie; the bodies of more answers than this to
/// one read are copied.
const BODIES: usize = 8;

/// Pieces of `Answers`, at most: its bodies and the buffer's bytes around them.
pub const PIECES: usize = 2 * BODIES + 1;

/// Answers written for the requests of one read: their bytes in `buf`, but for the bodies
/// of the pre-rendered ones (`Encoded::answer_with`), which stay where they lie (in the
/// snapshot's `Held`) and are sent from there with the heads in one `writev`. Copying the
/// holding page into the buffer was the largest part of writing a held answer.
pub struct Answers<'s, 'b> {
    buf: &'b mut Vec<u8>,
    /// Each body with where it goes in `buf`, in order.
    bodies: [(usize, &'s [u8]); BODIES],
    kept: usize,
    /// The length of the kept bodies.
    kept_len: usize,
    /// Every body copied: for a writer that sends one buffer (`relay`'s).
    copy: bool,
    /// When the last answer was counted (`gateway::write_held`): the reading a parked
    /// connection's deadline is moved from, where it read the clock again.
    counted: Option<std::time::Instant>,
}

impl<'s, 'b> Answers<'s, 'b> {
    /// Answers in `buf`, which is cleared, sent with `pieces`.
    pub fn new(buf: &'b mut Vec<u8>) -> Answers<'s, 'b> {
        buf.clear();
        Answers {
            buf,
            bodies: [(0, &[]); BODIES],
            kept: 0,
            kept_len: 0,
            copy: false,
            counted: None,
        }
    }

    /// Answers written whole into `buf` (after what it holds), bodies included.
    pub fn copied(buf: &'b mut Vec<u8>) -> Answers<'s, 'b> {
        Answers {
            buf,
            bodies: [(0, &[]); BODIES],
            kept: 0,
            kept_len: 0,
            copy: true,
            counted: None,
        }
    }

    /// The buffer, for what is written into it whole.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        self.buf
    }

    /// Adds `body` to the answers, kept where it lies unless the answers are copied.
    pub fn body(&mut self, body: &'s [u8]) {
        match self.bodies.get_mut(self.kept) {
            Some(slot) if !self.copy && !body.is_empty() => {
                *slot = (self.buf.len(), body);
                self.kept += 1;
                self.kept_len += body.len();
            }
            _ => self.buf.extend_from_slice(body),
        }
    }

    /// Notes when an answer written here was counted.
    pub fn counted(&mut self, at: std::time::Instant) {
        self.counted = Some(at);
    }

    /// When the last answer written here was counted; `None` when none was.
    pub fn last_counted(&self) -> Option<std::time::Instant> {
        self.counted
    }

    /// The length of the answers, bodies included.
    pub fn len(&self) -> usize {
        self.buf.len() + self.kept_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The answers in order, as `writev` takes them, in `into`; returns how many pieces.
    pub fn pieces<'a>(&'a self, into: &mut [std::io::IoSlice<'a>; PIECES]) -> usize {
        let mut n = 0;
        let mut at = 0;
        for &(to, body) in &self.bodies[..self.kept] {
            if to > at {
                into[n] = std::io::IoSlice::new(&self.buf[at..to]);
                n += 1;
            }
            into[n] = std::io::IoSlice::new(body);
            n += 1;
            at = to;
        }
        if self.buf.len() > at {
            into[n] = std::io::IoSlice::new(&self.buf[at..]);
            n += 1;
        }
        n
    }
}

/// The response as hyper writes it: status line, the headers in order, then `content-length`
/// (not for HEAD: hyper adds none to a bodiless answer to HEAD, and the held forms that have a
/// body already carry the length a GET would get) and `date` when the response has none.
pub fn encode(parts: &Parts, body: &Bytes, head: bool, out: &mut Vec<u8>) {
    out.reserve(256 + body.len());
    let dated = encode_head(parts, body.len(), head, out);
    end_head(dated, body, out);
}

/// The status line and the header lines of `parts`, as `encode` writes them, without a length,
/// a date or the blank line: for an answer whose other lines depend on the moment.
pub fn encode_fields(parts: &Parts, out: &mut Vec<u8>) {
    encode_head(parts, 0, true, out);
}

/// Writes all of the head but `date` and the blank line; returns whether it had a `Date`.
fn encode_head(parts: &Parts, body_len: usize, head: bool, out: &mut Vec<u8>) -> bool {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A 204 has no body and no length to say (RFC 9110 §8.6), as hyper writes it.
    let bodiless = status == http::StatusCode::NO_CONTENT;
    if !head && !bodiless && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    parts.headers.contains_key(header::DATE)
}

fn end_head(dated: bool, body: &[u8], out: &mut Vec<u8>) {
    if !dated {
        date_header(out);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Appends a `date` header line for now, as hyper's server adds to a response without one.
pub fn date_header(out: &mut Vec<u8>) {
    date_header_at(SystemTime::now(), out);
}

/// `date_header` at `now`: for an answer whose other lines were worked out from the same
/// reading of the clock.
pub fn date_header_at(now: SystemTime, out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    date_at(now, |date| out.extend_from_slice(date));
    out.extend_from_slice(b"\r\n");
}

/// The `Date` value of one second, and the second: from `start` until `end`.
struct Dated {
    start: SystemTime,
    end: SystemTime,
    text: [u8; 29],
}

thread_local! {
    /// The `Date` value of the current second, formatted once per second per thread. Empty
    /// at first (`start == end`), so the first answer formats it.
    static DATE: RefCell<Dated> = const {
        RefCell::new(Dated {
            start: UNIX_EPOCH,
            end: UNIX_EPOCH,
            text: [0; 29],
        })
    };
}

/// Calls `f` with the `Date` value of the second of `now`.
fn date_at(now: SystemTime, f: impl FnOnce(&[u8])) {
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        // Two comparisons of the reading with the second's bounds: `duration_since` (its
        // subtraction, its checks, some 35 instructions) only once a second. A clock stepped
        // back falls before `start` and is formatted anew, as one stepped forward is.
        if now < cached.start || now >= cached.end {
            let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cached.text.copy_from_slice(text.as_bytes());
                let start = UNIX_EPOCH.checked_add(Duration::from_secs(secs));
                let end = start.and_then(|start| start.checked_add(Duration::from_secs(1)));
                // Past the clock's range there is no second to keep: formatted each time.
                if let (Some(start), Some(end)) = (start, end) {
                    (cached.start, cached.end) = (start, end);
                }
            }
        }
        f(&cached.text);
    });
}

/// The path of a request target that `Uri` keeps as written, which is what comes before the
/// first `?`: for the origin form, in visible ASCII but for the bytes `Uri` refuses in a path
/// or a query (`"`, `<`, `>`, `` ` ``) and `#`, which starts a fragment that `Uri` drops.
/// `None` for other targets, which are hyper's to read (it answers those it refuses with a
/// 400). For the requests read without hyper (`fast`, `relay`): no `Uri` is built, nor its
/// copy of the target.
pub fn plain_path(target: &str) -> Option<&str> {
    if !target.starts_with('/') {
        return None;
    }
    // One pass that also notes the first `?`: a second search for it cost every held request
    // as much again as this one.
    let mut query = None;
    for (i, &b) in target.as_bytes().iter().enumerate() {
        if !PLAIN_TARGET[usize::from(b)] {
            return None;
        }
        if b == b'?' && query.is_none() {
            query = Some(i);
        }
    }
    Some(query.map_or(target, |i| &target[..i]))
}

const PLAIN_TARGET: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        table[b] = !matches!(b as u8, b'"' | b'#' | b'<' | b'>' | b'`');
        b += 1;
    }
    table
};

/// Whether a `Host` value is `host[:port]` as RFC 3986 spells it, or empty: a name or IPv4
/// address (unreserved bytes, `%`-escapes and sub-delimiters, but no `,`, which a server
/// splitting the field would read as two hosts) or a bracketed IP literal, then at most a
/// `:` and digits. Nothing that a server or a cache behind the proxy could read as another
/// host, a path or a user.
pub fn valid_host(value: &[u8]) -> bool {
    if let Some((b'[', rest)) = value.split_first() {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        let ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b":.%-_~".contains(&b));
        return ok && port_ok(&rest[end + 1..]);
    }
    // One pass: the host's bytes up to the first that is not one (`:` is not), then the port.
    // The relay asks this of every request's `Host`.
    let host = value
        .iter()
        .position(|&b| !HOST_BYTE[usize::from(b)])
        .unwrap_or(value.len());
    port_ok(&value[host..])
}

/// Whether `rest` is nothing, or `:` and digits (none at all too, as `Authority` takes).
fn port_ok(rest: &[u8]) -> bool {
    match rest.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// The bytes of a reg-name or IPv4 address (RFC 3986 §3.2.2), less `,`.
const HOST_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b';'
                    | b'='
                    | b'%'
            );
        b += 1;
    }
    table
};

/// Appends the header line `name: value`.
#[inline]
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether `bytes` is `lower` ignoring ASCII case, where `lower` has no uppercase letter (a
/// header name or token as the code writes it). Eight bytes at a time: the relay compares
/// names for every header of every request and answer, and a byte at a time was some 5 % of
/// a forwarded request's instructions.
pub fn eq_lower(bytes: &[u8], lower: &[u8]) -> bool {
    debug_assert!(!lower.iter().any(u8::is_ascii_uppercase), "{lower:?}");
    let n = bytes.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return bytes
            .iter()
            .zip(lower)
            .all(|(a, b)| a.to_ascii_lowercase() == *b);
    }
    // Whole words, the last one overlapping the one before it when `n` is not a multiple of 8.
    let mut at = 0;
    loop {
        if lowercase_word(word(bytes, at)) != word(lower, at) {
            return false;
        }
        if at + 8 == n {
            return true;
        }
        at = (at + 8).min(n - 8);
    }
}

/// The eight bytes of `bytes` from `at`, where there are eight.
fn word(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|w| <[u8; 8]>::try_from(w).ok())
        .map_or(0, u64::from_le_bytes)
}

/// `word` with each of its bytes `A`..=`Z` made lowercase, at once.
fn lowercase_word(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Each byte's low seven bits, added to so that the top bit says "at least `A`" and "past
    // `Z`"; no sum carries into the next byte.
    let low = word & (ONES * 0x7f);
    let from_a = low + ONES * u64::from(0x80 - b'A');
    let past_z = low + ONES * u64::from(0x80 - b'Z' - 1);
    // ASCII (top bit clear) and in `A`..=`Z`: its 0x20 bit set.
    let upper = from_a & !past_z & !word & (ONES * 0x80);
    word | (upper >> 2)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http::HeaderValue;

    fn parts(status: StatusCode, headers: &[(header::HeaderName, &'static str)]) -> Parts {
        let mut resp = http::Response::new(());
        *resp.status_mut() = status;
        for (name, value) in headers {
            resp.headers_mut()
                .insert(name.clone(), HeaderValue::from_static(value));
        }
        resp.into_parts().0
    }

    /// The text with its date replaced by a fixed one, after checking that it is one.
    pub(crate) fn undated(out: &[u8]) -> String {
        let text = std::str::from_utf8(out).unwrap();
        let (before, after) = text.split_once("\r\ndate: ").unwrap();
        assert!(httpdate::parse_http_date(&after[..29]).is_ok(), "{text}");
        format!("{before}\r\ndate: D{}", &after[29..])
    }

    /// The cached second is told by its bounds: each reading in it gets its text, one in
    /// another second (later, or earlier after the clock was stepped back) gets its own.
    #[test]
    fn the_date_is_the_second_of_each_reading_whichever_way_the_clock_moves() {
        let date = |at: SystemTime| {
            let mut text = String::new();
            date_at(at, |d| text = String::from_utf8(d.to_vec()).unwrap());
            text
        };
        let second = UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let half = Duration::from_millis(500);
        for at in [
            second,
            second + half,
            second + Duration::from_millis(999),
            second + Duration::from_secs(1),
            second + half,
            second - Duration::from_nanos(1),
            second - Duration::from_secs(3600),
            second + Duration::from_secs(86_400) + half,
            second + half,
        ] {
            assert_eq!(date(at), httpdate::fmt_http_date(at), "{at:?}");
        }
    }

    #[test]
    fn a_no_content_answer_says_no_length() {
        let p = parts(StatusCode::NO_CONTENT, &[(header::VARY, "Origin")]);
        let mut out = Vec::new();
        encode(&p, &Bytes::new(), false, &mut out);
        assert_eq!(
            undated(&out),
            "HTTP/1.1 204 No Content\r\nvary: Origin\r\ndate: D\r\n\r\n"
        );
    }

    #[test]
    fn a_response_is_written_as_hyper_writes_it() {
        let p = parts(
            StatusCode::SERVICE_UNAVAILABLE,
            &[(header::RETRY_AFTER, "300")],
        );
        let mut out = Vec::new();
        encode(&p, &Bytes::from_static(b"down"), false, &mut out);
        assert_eq!(
            undated(&out),
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 300\r\n\
             content-length: 4\r\ndate: D\r\n\r\ndown"
        );
    }

    #[test]
    fn an_encoded_response_is_written_as_encode_writes_it() {
        let cases = [
            (
                parts(StatusCode::SERVICE_UNAVAILABLE, &[(header::VARY, "Accept")]),
                "page",
                false,
            ),
            // HEAD: the length a GET would get is a header of its own; no body.
            (
                parts(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &[(header::CONTENT_LENGTH, "4")],
                ),
                "",
                true,
            ),
            (parts(StatusCode::OK, &[]), "", false),
        ];
        for (p, body, head) in cases {
            let body = Bytes::from_static(body.as_bytes());
            let (mut once, mut kept) = (Vec::new(), Vec::new());
            encode(&p, &body, head, &mut once);
            let encoded = Encoded::new(&p, body, head);
            encoded.write(&mut kept);
            assert_eq!(undated(&kept), undated(&once));
            assert_eq!(encoded.status(), p.status);
        }
        // A response with a date of its own keeps it, and gets no second one.
        let p = parts(
            StatusCode::OK,
            &[(header::DATE, "Thu, 03 Dec 2026 07:00:00 GMT")],
        );
        let mut out = Vec::new();
        Encoded::new(&p, Bytes::new(), false).write(&mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "HTTP/1.1 200 OK\r\ndate: Thu, 03 Dec 2026 07:00:00 GMT\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn eq_lower_is_eq_ignore_ascii_case_for_every_byte_at_every_place() {
        for len in 0..=20 {
            let lower: Vec<u8> = (0..len).map(|i| b"content-length-xyz!~"[i]).collect();
            assert!(eq_lower(&lower, &lower));
            assert!(eq_lower(&lower.to_ascii_uppercase(), &lower));
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = lower.clone();
                    bytes[at] = b;
                    assert_eq!(
                        eq_lower(&bytes, &lower),
                        bytes.eq_ignore_ascii_case(&lower),
                        "{len} bytes, {b:#04x} at {at}"
                    );
                }
            }
            assert!(!eq_lower(&lower, &lower[..len.saturating_sub(1)]) || len == 0);
        }
    }

    /// Every host `Authority` takes as a bare `host[:port]` is valid, and nothing that could be
    /// read as a path, a query, a user or a second field.
    #[test]
    fn a_host_is_a_host_and_nothing_more() {
        for good in [
            "",
            "shop.example",
            "shop.example:8080",
            "127.0.0.1:80",
            "[::1]:443",
            "xn--bcher-kva.example",
            "under_score.example",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "user@a",
            "a\tb",
            "a\\b",
            "a\"b",
            "a\r\nb",
            "é.example",
            "a.example,b.example",
            "a:b:c",
            "x.example:abc",
            "a]b",
            "[",
            "[]",
            "[::1",
            "[::1]x",
            "[::1]:8o",
            "a:80:",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
        for good in [
            "a:",
            "[fe80::1%25eth0]:8080",
            "a.example.:443",
            "%41.example",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for b in 0..=255u8 {
            let value = [b'a', b];
            if valid_host(&value) && b != b'%' {
                let authority = http::uri::Authority::try_from(&value[..]);
                assert!(authority.is_ok(), "{:?}", char::from(b));
            }
        }
    }

    /// The one-pass `valid_host` says what the two-pass one it replaced said (split at the
    /// first `:`, then the host's bytes and the port's digits), for every string of up to
    /// three bytes from those that matter, and for longer ones made of them.
    #[test]
    fn the_one_pass_host_check_is_the_two_pass_one() {
        fn two_pass(value: &[u8]) -> bool {
            let (host, port) = match value.split_first() {
                Some((b'[', _)) => return valid_host(value),
                _ => match value.iter().position(|&b| b == b':') {
                    Some(colon) => (&value[..colon], &value[colon..]),
                    None => (value, &[][..]),
                },
            };
            let port_ok = match port.split_first() {
                None => true,
                Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
                Some(_) => false,
            };
            port_ok && host.iter().all(|&b| HOST_BYTE[usize::from(b)])
        }
        let alphabet = b"a1:.,%[]x9 /@\t\xe9-_";
        let mut tried = 0;
        for n in 0..=3u32 {
            for mut i in 0..alphabet.len().pow(n) {
                let mut value = Vec::new();
                for _ in 0..n {
                    value.push(alphabet[i % alphabet.len()]);
                    i /= alphabet.len();
                }
                assert_eq!(valid_host(&value), two_pass(&value), "{value:?}");
                tried += 1;
            }
        }
        assert!(tried > 5000);
        for value in [
            "127.0.0.1:28962",
            "shop.example:",
            "a.b:1:2",
            "a.b:12x",
            "a b:80",
        ] {
            assert_eq!(
                valid_host(value.as_bytes()),
                two_pass(value.as_bytes()),
                "{value}"
            );
        }
    }

    /// What a plain target is taken for holds: `Uri` takes it as written, and its
    /// path is what comes before the `?`.
    #[test]
    fn a_plain_target_is_kept_as_written_by_uri() {
        for b in 0..=255u8 {
            let c = char::from(b);
            let target = format!("/a{c}b?q{c}={c}");
            let plain = PLAIN_TARGET[usize::from(b)];
            if !plain {
                continue;
            }
            let path = plain_path(&target);
            assert!(path.is_some(), "{target:?}");
            let uri: http::Uri = target.parse().unwrap_or_else(|e| panic!("{target:?}: {e}"));
            assert_eq!(uri.to_string(), target);
            assert_eq!(Some(uri.path()), path, "{target:?}");
        }
        for odd in [
            "*",
            "http://a/",
            "/a#b",
            "/a b",
            "/a\"b\"",
            "/<a>",
            "/é",
            "/a\tb",
        ] {
            assert!(plain_path(odd).is_none(), "{odd:?}");
        }
        assert_eq!(
            plain_path("/search?filter[size]=1&q={x}|y^z\\w"),
            Some("/search")
        );
        // The path ends at the first `?`, and a byte refused after it still refuses the
        // whole target, as `Uri` reads them.
        for (target, want) in [
            ("/a?b?c", Some("/a")),
            ("/?", Some("/")),
            ("/a?", Some("/a")),
            ("/a?b#c", None),
            ("/a?b c", None),
        ] {
            assert_eq!(plain_path(target), want, "{target:?}");
            if let Some(path) = want {
                let uri: http::Uri = target.parse().unwrap();
                assert_eq!(uri.path(), path, "{target:?}");
            }
        }
        // Visible ASCII but five.
        assert_eq!(PLAIN_TARGET.iter().filter(|&&p| p).count(), 94 - 5);
    }
}
