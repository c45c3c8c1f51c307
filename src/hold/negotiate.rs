//! Content negotiation for held requests: which form (gRPC, event stream, HTML, plain text,
//! problem JSON) and which page language a request gets, from its headers alone (SPEC §3).
//!
//! Pure functions, no I/O. They run on every held request, so they parse headers in place over
//! string splits and never allocate; anything they cannot parse is ignored rather than rejected,
//! because a client with a broken header still deserves a holding response.

use super::fields::{text, Fields};
use http::header::{ACCEPT, CONNECTION, CONTENT_TYPE, UPGRADE};

/// The form of a holding response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Trailers-only gRPC UNAVAILABLE.
    Grpc,
    /// A `200 text/event-stream` that sets the reconnection delay, carries the problem as one
    /// `intermission` event and ends: a browser's `EventSource` gives up for good on any other
    /// status or type, and reconnects after a stream that ends.
    EventStream,
    /// The HTML page of SPEC §4.
    Html,
    /// The message as `text/plain`.
    Text,
    /// RFC 9457 problem JSON; the default.
    Json,
}

/// Which holding response form a request gets (SPEC §3 order).
///
/// `path` is the request path; under any of `api_prefixes` (plain string prefixes) HTML must be
/// strictly preferred over JSON, because API clients that also accept HTML still parse JSON.
pub fn choose_form<H: Fields + ?Sized>(headers: &H, path: &str, api_prefixes: &[String]) -> Form {
    choose(headers, path, api_prefixes, true)
}

/// The form a request that no `EventSource` sends (a `POST`, a `PUT`…) gets: `choose_form`'s
/// but never the event stream, whose `200` would tell a client that POSTs for a stream (an
/// MCP client's `Accept: application/json, text/event-stream`, a chat API's) that its request
/// was taken, and give its library no error to retry on; it gets the `503` instead.
pub fn choose_form_not_streamed<H: Fields + ?Sized>(
    headers: &H,
    path: &str,
    api_prefixes: &[String],
) -> Form {
    choose(headers, path, api_prefixes, false)
}

fn choose<H: Fields + ?Sized>(
    headers: &H,
    path: &str,
    api_prefixes: &[String],
    streams: bool,
) -> Form {
    if is_grpc(headers) {
        return Form::Grpc;
    }
    // An upgrade client (WebSocket) is a program, not a person reading a page, whatever it
    // claims to accept.
    if is_upgrade(headers) {
        return Form::Json;
    }

    let prefs = AcceptPrefs::from_headers(headers);
    let html = prefs.html.q;
    let json = prefs.json_q();
    // Only a client that names the type reads it (`EventSource` sends it alone); under
    // `api_prefixes` too, where event streams usually live: the JSON rule there is about
    // pages, and a stream client that got the problem's 503 would stop for good.
    let events = prefs.events;
    let most = events.q >= html && events.q >= json && events.q >= prefs.text.q;
    if streams && events.named() && most {
        return Form::EventStream;
    }
    let under_api = api_prefixes.iter().any(|p| path.starts_with(p.as_str()));

    // A client that ranks text/plain strictly above HTML gets text even where HTML would
    // otherwise win: the SPEC's order decides ties, not an explicit preference.
    let text_preferred = prefs.text.named() && prefs.text.q > html;
    if prefs.html.named() && !text_preferred {
        let html_wins = if under_api { html > json } else { html >= json };
        if html_wins {
            return Form::Html;
        }
    }
    if prefs.text.named() && prefs.text.q > html && prefs.text.q > json {
        return Form::Text;
    }
    Form::Json
}

/// Form and language together, remembering the last answer on this thread: clients send the
/// same few `Accept` / `Accept-Language` values over and over (a browser's, curl's), and
/// comparing bytes is far cheaper than parsing q-values (see `benches/hold.rs`).
///
/// `langs_id` names the language list (it changes only on reload) so that a remembered index
/// is never applied to another list.
pub fn negotiate<H: Fields + ?Sized>(
    headers: &H,
    path: &str,
    api_prefixes: &[String],
    langs: &[String],
    langs_id: usize,
) -> (Form, usize) {
    let seen = headers.negotiated();
    let (accept, accept_language) = (seen.accept, seen.accept_language);
    // Only the common shapes are remembered: one Accept line, not gRPC, not an upgrade.
    let simple = !seen.accepts_more
        && !is_grpc_type(seen.content_type)
        && !is_upgrade_of(headers, seen.upgrade);
    if !simple {
        return (
            choose_form(headers, path, api_prefixes),
            choose_language(accept_language, langs),
        );
    }
    let api = api_prefixes.iter().any(|p| path.starts_with(p.as_str()));
    let hit = LAST.with(|last| {
        let m = last.borrow();
        let same = m.api == api
            && m.langs_id == langs_id
            && m.accept.is(accept)
            && m.language.is(accept_language);
        m.form.filter(|_| same).map(|form| (form, m.lang))
    });
    if let Some(answer) = hit {
        return answer;
    }
    let answer = (
        choose_form(headers, path, api_prefixes),
        choose_language(accept_language, langs),
    );
    LAST.with(|last| {
        let mut m = last.borrow_mut();
        m.accept.set(accept);
        m.language.set(accept_language);
        m.api = api;
        m.langs_id = langs_id;
        m.form = Some(answer.0);
        m.lang = answer.1;
    });
    answer
}

/// The last answer, and what it was the answer to; `form` is `None` until there is one.
struct Memo {
    accept: Kept,
    language: Kept,
    api: bool,
    langs_id: usize,
    form: Option<Form>,
    lang: usize,
}

/// A header's value, or its absence, in a buffer that is refilled rather than replaced: a
/// thread that serves browsers and scripts in turn misses often, and allocates nothing then.
struct Kept {
    present: bool,
    bytes: Vec<u8>,
}

impl Kept {
    const NONE: Kept = Kept {
        present: false,
        bytes: Vec::new(),
    };

    fn is(&self, value: Option<&[u8]>) -> bool {
        match value {
            Some(value) => self.present && self.bytes == value,
            None => !self.present,
        }
    }

    fn set(&mut self, value: Option<&[u8]>) {
        self.bytes.clear();
        self.bytes.extend_from_slice(value.unwrap_or_default());
        self.present = value.is_some();
    }
}

thread_local! {
    static LAST: std::cell::RefCell<Memo> = const {
        std::cell::RefCell::new(Memo {
            accept: Kept::NONE,
            language: Kept::NONE,
            api: false,
            langs_id: 0,
            form: None,
            lang: 0,
        })
    };
}

/// Index into `available` (language tags like `["en", "fr"]`, index 0 is the default and the
/// fallback) of the best language for this `Accept-Language` value (`None` = header absent).
///
/// Each available tag takes the q of the most specific entry matching it (exact tag, then a
/// primary-subtag match such as `fr-CA` ↔ `fr`, then `*` for the default only), so `fr;q=0`
/// excludes French even after `fr-CA`. The highest q wins; ties go to the entry that came first
/// in the header, then to the tag that entry names more exactly (`fr-CA` gets a `fr-CA` page
/// over a `fr` one), then to the earlier available tag.
pub fn choose_language(accept_language: Option<&[u8]>, available: &[String]) -> usize {
    let Some(header) = accept_language.and_then(text) else {
        return 0;
    };

    // (q, position in header, specificity, index in available)
    let mut best: Option<(u16, usize, u8, usize)> = None;
    for (index, tag) in available.iter().enumerate() {
        let Some((q, position, specificity)) = language_q(header, tag, index == 0) else {
            continue;
        };
        if q == 0 {
            continue;
        }
        let better = match best {
            None => true,
            Some((best_q, best_pos, best_specificity, _)) => {
                q > best_q
                    || (q == best_q && position < best_pos)
                    || (q == best_q && position == best_pos && specificity > best_specificity)
            }
        };
        if better {
            best = Some((q, position, specificity, index));
        }
    }
    best.map_or(0, |(_, _, _, index)| index)
}

/// q-values are kept in thousandths (RFC 9110 allows at most three decimals), so comparisons are
/// exact integer comparisons.
const Q_ONE: u16 = 1000;

/// `application/grpc` and its forms (`+proto`, parameters) and gRPC-Web's
/// (`application/grpc-web…`, whose clients read the status from the headers too); not another
/// type that merely begins so (`application/grpcfoo`).
fn is_grpc<H: Fields + ?Sized>(headers: &H) -> bool {
    is_grpc_type(headers.value(&CONTENT_TYPE))
}

/// `is_grpc`, of the request's first `Content-Type`.
fn is_grpc_type(content_type: Option<&[u8]>) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    // What may follow a media type's name: nothing, a suffix, or parameters.
    let ends = |rest: &[u8]| matches!(rest, [] | [b'+' | b';' | b' ' | b'\t', ..]);
    let strip = |v: &'static [u8], rest: &[u8]| -> Option<usize> {
        (rest.len() >= v.len() && rest[..v.len()].eq_ignore_ascii_case(v)).then_some(v.len())
    };
    content_type.is_some_and(|v| {
        let Some(n) = strip(GRPC, v) else {
            return false;
        };
        let rest = &v[n..];
        let Some(web) = strip(b"-web", rest) else {
            return ends(rest);
        };
        let rest = &rest[web..];
        ends(rest) || strip(b"-text", rest).is_some_and(|t| ends(&rest[t..]))
    })
}

/// The media type of a gRPC-Web request (`application/grpc-web`, `-web+proto`, `-web-text`…),
/// parameters left out, for its answer's `Content-Type`; `None` for any other request.
pub fn grpc_web_type<H: Fields + ?Sized>(headers: &H) -> Option<http::HeaderValue> {
    const WEB: &[u8] = b"application/grpc-web";
    let value = headers.value(&CONTENT_TYPE)?;
    let media = value.split(|&b| b == b';').next()?.trim_ascii();
    let web = media.len() >= WEB.len() && media[..WEB.len()].eq_ignore_ascii_case(WEB);
    (web && is_grpc(headers))
        .then(|| http::HeaderValue::from_bytes(media).ok())
        .flatten()
}

/// The deadline a gRPC call was sent with (`grpc-timeout`: at most 8 digits and a unit,
/// `H`, `M`, `S`, `m`, `u` or `n`); `None` without one, or for one that does not parse, which
/// the call's own library would not have sent.
pub fn grpc_deadline<H: Fields + ?Sized>(headers: &H) -> Option<std::time::Duration> {
    use std::time::Duration;
    static NAME: http::HeaderName = GRPC_TIMEOUT;
    let value = headers.value(&NAME)?.trim_ascii();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The header a gRPC call's deadline comes in.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Rewrites a call's `grpc-timeout` to what is left of it `elapsed` after the call came, in
/// milliseconds (rounded down, so that a pushback is never allowed past the deadline). A
/// deadline too long for 8 digits of milliseconds (27 hours) is left as it was.
pub fn grpc_deadline_left(headers: &mut http::HeaderMap, elapsed: std::time::Duration) {
    let Some(deadline) = grpc_deadline(headers) else {
        return;
    };
    let left = deadline.saturating_sub(elapsed).as_millis();
    if left <= 99_999_999 {
        let value = http::HeaderValue::from_str(&format!("{left}m"));
        if let Ok(value) = value {
            headers.insert(GRPC_TIMEOUT, value);
        }
    }
}

/// An upgrade that would be tunnelled if forwarded (a WebSocket): not one to `h2c`, which
/// `curl --http2` and Java's `HttpClient` offer on every `http://` request they make, and
/// which the proxy declines and answers as the plain request it also is
/// (`forward::headers::upgrade_request`); such a client gets the form its `Accept` asks for.
fn is_upgrade<H: Fields + ?Sized>(headers: &H) -> bool {
    is_upgrade_of(headers, headers.value(&UPGRADE))
}

/// `is_upgrade`, given the request's first `Upgrade`.
fn is_upgrade_of<H: Fields + ?Sized>(headers: &H, upgrade: Option<&[u8]>) -> bool {
    match upgrade {
        Some(upgrade) if !crate::forward::headers::offers_h2c(upgrade) => {}
        _ => return false,
    }
    headers
        .all(&CONNECTION)
        .filter_map(text)
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// How well one media range matched a target type: 3 = exact, 2 = `type/*`, 1 = `*/*`, 0 = none.
#[derive(Debug, Clone, Copy, Default)]
struct Ranked {
    specificity: u8,
    q: u16,
}

impl Ranked {
    /// Keeps the most specific match; among equally specific ones the highest q, so that
    /// `text/html;level=1;q=0, text/html` (parameters are not compared) still accepts HTML.
    fn offer(&mut self, specificity: u8, q: u16) {
        if specificity == 0 {
            return;
        }
        if specificity > self.specificity || (specificity == self.specificity && q > self.q) {
            *self = Ranked { specificity, q };
        }
    }

    /// The Accept header names this type itself (not through a wildcard) with q > 0.
    fn named(self) -> bool {
        self.specificity == 3 && self.q > 0
    }
}

/// The q-values the Accept header gives the types negotiation cares about.
#[derive(Debug, Default)]
struct AcceptPrefs {
    events: Ranked,
    html: Ranked,
    text: Ranked,
    json: Ranked,
    problem_json: Ranked,
    /// The highest q of the named `+json` types (RFC 6839: `application/vnd.api+json`,
    /// `application/hal+json`): a client naming one is a program that parses JSON.
    suffix_json: u16,
}

impl AcceptPrefs {
    fn from_headers<H: Fields + ?Sized>(headers: &H) -> AcceptPrefs {
        let mut prefs = AcceptPrefs::default();
        let entries = headers
            .all(&ACCEPT)
            .filter_map(text)
            .flat_map(|v| v.split(','));
        for entry in entries {
            let Some((kind, subtype, q)) = parse_media_range(entry) else {
                continue;
            };
            prefs
                .events
                .offer(specificity(kind, subtype, "text", "event-stream"), q);
            prefs
                .html
                .offer(specificity(kind, subtype, "text", "html"), q);
            prefs
                .text
                .offer(specificity(kind, subtype, "text", "plain"), q);
            prefs
                .json
                .offer(specificity(kind, subtype, "application", "json"), q);
            let problem = specificity(kind, subtype, "application", "problem+json");
            prefs.problem_json.offer(problem, q);
            if is_json_suffix(subtype) {
                prefs.suffix_json = prefs.suffix_json.max(q);
            }
        }
        prefs
    }

    /// How high the Accept header ranks JSON: its best-ranked JSON type.
    fn json_q(&self) -> u16 {
        self.json.q.max(self.problem_json.q).max(self.suffix_json)
    }
}

/// `…/…+json`, a JSON type by its structured syntax suffix (`*/*` has none, and
/// `parse_media_range` refuses `*/json`).
fn is_json_suffix(subtype: &str) -> bool {
    const SUFFIX: &[u8] = b"+json";
    let sub = subtype.as_bytes();
    sub.len() > SUFFIX.len() && sub[sub.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX)
}

/// How specifically the range `kind/subtype` matches `target_kind/target_subtype`.
fn specificity(kind: &str, subtype: &str, target_kind: &str, target_subtype: &str) -> u8 {
    if kind == "*" {
        // `*/html` is not a valid range; parse_media_range already dropped it.
        return 1;
    }
    if !kind.eq_ignore_ascii_case(target_kind) {
        return 0;
    }
    if subtype == "*" {
        2
    } else if subtype.eq_ignore_ascii_case(target_subtype) {
        3
    } else {
        0
    }
}

/// Splits one Accept entry into type, subtype and q. `None` for anything malformed, including an
/// invalid q: guessing a q for it could turn a refusal into a preference.
fn parse_media_range(entry: &str) -> Option<(&str, &str, u16)> {
    let mut parts = entry.split(';');
    let range = parts.next()?.trim();
    let (kind, subtype) = range.split_once('/')?;
    let (kind, subtype) = (kind.trim(), subtype.trim());
    if !is_token(kind) || !is_token(subtype) || (kind == "*" && subtype != "*") {
        return None;
    }
    let q = parse_q_params(parts)?;
    Some((kind, subtype, q))
}

/// Finds the `q` parameter among `;`-separated parameters; q=1 when absent, `None` when invalid.
fn parse_q_params<'a>(params: impl Iterator<Item = &'a str>) -> Option<u16> {
    let mut q = Q_ONE;
    for param in params {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (name, value) = param.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("q") {
            q = parse_qvalue(value.trim())?;
        }
    }
    Some(q)
}

/// RFC 9110 §12.4.2 `qvalue`: `0[.ddd]` or `1[.000]`, in thousandths.
fn parse_qvalue(s: &str) -> Option<u16> {
    let (int, frac) = match s.split_once('.') {
        Some((int, frac)) => (int, frac),
        None => (s, ""),
    };
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = 0;
    let mut scale: u16 = 100;
    for b in frac.bytes() {
        thousandths += u16::from(b - b'0') * scale;
        scale /= 10;
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(Q_ONE),
        _ => None,
    }
}

/// RFC 9110 `token` characters, enough to reject garbage such as `te xt/html` or `/`.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The q the Accept-Language `header` gives `tag`, with the position of the entry that decided
/// it; `None` when no entry matches. `is_default` lets `*` match.
fn language_q(header: &str, tag: &str, is_default: bool) -> Option<(u16, usize, u8)> {
    // (specificity, q, position)
    let mut best: Option<(u8, u16, usize)> = None;
    for (position, entry) in header.split(',').enumerate() {
        let mut parts = entry.split(';');
        let Some(range) = parts.next().map(str::trim) else {
            continue;
        };
        if !is_language_range(range) {
            continue;
        }
        let Some(q) = parse_q_params(parts) else {
            continue;
        };
        let specificity = if range.eq_ignore_ascii_case(tag) {
            3
        } else if primary_subtag(range).eq_ignore_ascii_case(tag)
            || primary_subtag(tag).eq_ignore_ascii_case(range)
        {
            2
        } else if range == "*" && is_default {
            1
        } else {
            continue;
        };
        // The first of equally specific entries decides; a later duplicate does not override.
        if best.is_none_or(|(s, _, _)| specificity > s) {
            best = Some((specificity, q, position));
        }
    }
    best.map(|(specificity, q, position)| (q, position, specificity))
}

fn primary_subtag(tag: &str) -> &str {
    tag.split('-').next().unwrap_or(tag)
}

/// `*` or `alpha{1,8}(-alphanum{1,8})*` (RFC 4647 §2.1).
pub(crate) fn is_language_range(range: &str) -> bool {
    if range == "*" {
        return true;
    }
    range.split('-').enumerate().all(|(i, sub)| {
        (1..=8).contains(&sub.len())
            && sub.bytes().all(|b| {
                if i == 0 {
                    b.is_ascii_alphabetic()
                } else {
                    b.is_ascii_alphanumeric()
                }
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::ACCEPT_LANGUAGE;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn remembered_answers_match_fresh_ones() {
        let langs = vec!["en".to_string(), "fr".to_string()];
        let api = vec!["/api/".to_string()];
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("accept", "text/html"), ("accept-language", "fr")], "/"),
            (&[("accept", "text/html"), ("accept-language", "fr")], "/"),
            (
                &[("accept", "text/html"), ("accept-language", "fr")],
                "/api/x",
            ),
            (&[("accept", "text/html"), ("accept-language", "en")], "/"),
            (&[("accept", "application/json")], "/"),
            (&[("accept", "text/event-stream")], "/api/x"),
            (&[("accept", "text/event-stream")], "/"),
            (
                &[("accept", "text/html"), ("accept", "application/json;q=2")],
                "/",
            ),
            (
                &[
                    ("content-type", "application/grpc"),
                    ("accept", "text/html"),
                ],
                "/",
            ),
            (&[], "/"),
        ];
        for _ in 0..2 {
            for (pairs, path) in cases {
                let h = headers(pairs);
                let fresh = (
                    choose_form(&h, path, &api),
                    choose_language(h.value(&ACCEPT_LANGUAGE), &langs),
                );
                assert_eq!(
                    negotiate(&h, path, &api, &langs, 1),
                    fresh,
                    "{pairs:?} {path}"
                );
            }
        }
        // Another language list is never answered from memory.
        let h = headers(&[("accept", "text/html"), ("accept-language", "fr")]);
        assert_eq!(negotiate(&h, "/", &api, &langs, 1).1, 1);
        assert_eq!(negotiate(&h, "/", &api, &["en".to_string()], 2).1, 0);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn api() -> Vec<String> {
        vec!["/api/".to_string()]
    }

    const BROWSER: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

    #[test]
    fn what_is_left_of_a_grpc_deadline_is_written_in_milliseconds() {
        use std::time::Duration;
        let left = |v: &str, elapsed: u64| {
            let mut h = headers(&[("grpc-timeout", v)]);
            grpc_deadline_left(&mut h, Duration::from_millis(elapsed));
            h.get("grpc-timeout")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(left("5S", 1_200).as_deref(), Some("3800m"));
        assert_eq!(left("1500u", 0).as_deref(), Some("1m"));
        assert_eq!(left("1S", 2_000).as_deref(), Some("0m"));
        // Past 8 digits of milliseconds, the deadline stays as it came.
        assert_eq!(left("99999H", 1_000).as_deref(), Some("99999H"));
        assert_eq!(left("soon", 1_000).as_deref(), Some("soon"));
        let mut none = HeaderMap::new();
        grpc_deadline_left(&mut none, Duration::from_secs(1));
        assert!(none.is_empty());
    }

    #[test]
    fn grpc_deadlines_are_read_in_every_unit_and_nothing_else() {
        use std::time::Duration;
        let deadline = |v: &str| grpc_deadline(&headers(&[("grpc-timeout", v)]));
        assert_eq!(deadline("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(deadline("3M"), Some(Duration::from_secs(180)));
        assert_eq!(deadline("5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            deadline("99999999m"),
            Some(Duration::from_millis(99_999_999))
        );
        assert_eq!(deadline("250u"), Some(Duration::from_micros(250)));
        assert_eq!(deadline("7n"), Some(Duration::from_nanos(7)));
        for bad in [
            "",
            "S",
            "5",
            "5s",
            "123456789m",
            "-5S",
            "5 S",
            "1.5S",
            "5SS",
        ] {
            assert_eq!(deadline(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_deadline(&HeaderMap::new()), None);
    }

    #[test]
    fn form_table() {
        use Form::*;
        // (accept header lines, path, expected)
        let cases: &[(&[&str], &str, Form)] = &[
            (&[BROWSER], "/", Html),
            (&["*/*"], "/", Json),
            (&[], "/", Json),
            (&["application/json"], "/", Json),
            (&["text/html;q=0.5, application/json"], "/", Json),
            (&["application/json;q=0.5, text/html"], "/", Html),
            (&["text/html, application/json"], "/", Html),
            (&["text/html, application/json"], "/api/users", Json),
            (&["text/html, application/json;q=0.9"], "/api/users", Html),
            (&["text/html, */*;q=0.8"], "/api/users", Html),
            (&[BROWSER], "/api/users", Html),
            (&["*/*;q=0.9, text/html;q=0.5"], "/", Json),
            (&["text/plain"], "/", Text),
            (&["text/plain, text/html"], "/", Html),
            (&["text/plain, application/json"], "/", Json),
            // An explicit preference for text beats HTML.
            (&["text/plain, text/html;q=0.5"], "/", Text),
            (
                &["text/plain, application/json;q=0.8, text/html;q=0.5"],
                "/",
                Text,
            ),
            (&["text/plain, */*;q=0.5"], "/", Text),
            (&["text/plain, */*"], "/", Json),
            (&["text/*"], "/", Json),
            (&["text/*, application/json;q=0.5"], "/", Json),
            (&["text/html;q=0"], "/", Json),
            (&["text/html;q=0, */*"], "/", Json),
            (&["TEXT/HTML"], "/", Html),
            (&["Text/Html; Q=0.7, application/JSON;q=0.6"], "/", Html),
            (&[";;;,,"], "/", Json),
            (&["text/html;q=abc"], "/", Json),
            (&["text/html;q=1.5"], "/", Json),
            (&["text/html;q=0.1234"], "/", Json),
            (
                &["text/html;q=1.000, application/json;q=0.999"],
                "/api/",
                Html,
            ),
            (&["text/html;q=0.001"], "/", Html),
            (&["text/html;level=1;q=0, text/html"], "/", Html),
            (&["text/html;charset=utf-8"], "/", Html),
            (&["*/html"], "/", Json),
            (&["text/html;q"], "/", Json),
            (
                &["application/problem+json;q=0.9, text/html;q=0.8"],
                "/",
                Json,
            ),
            (&["application/*;q=0.9, text/html;q=0.8"], "/", Json),
            // Every JSON type counts, by its `+json` suffix too.
            (&["application/vnd.api+json, text/html;q=0.5"], "/", Json),
            (&["application/HAL+JSON;q=0.6, text/html;q=0.5"], "/", Json),
            (
                &["application/vnd.api+json;q=0.4, text/html;q=0.5"],
                "/",
                Html,
            ),
            (
                &["application/vnd.api+json;q=0, text/html;q=0.5"],
                "/",
                Html,
            ),
            (&["text/plain, application/ld+json"], "/", Json),
            (&["application/+json, text/html;q=0.5"], "/", Html),
            (&["application/json;q=0.5", "text/html"], "/", Html),
            (&["text/html;q=0.5", "application/json"], "/", Json),
            // What `EventSource` sends, and the forms of it a stream client may send.
            (&["text/event-stream"], "/", EventStream),
            (&["text/event-stream"], "/api/events", EventStream),
            (&["Text/Event-Stream; charset=utf-8"], "/", EventStream),
            (&["text/event-stream, */*"], "/", EventStream),
            (
                &["text/event-stream", "application/json"],
                "/api/",
                EventStream,
            ),
            (
                &["application/json;q=0.9, text/event-stream"],
                "/",
                EventStream,
            ),
            (&["text/event-stream, text/html"], "/", EventStream),
            // Ranked below another kind, or refused, it is not asked for.
            (&["text/event-stream;q=0.5, */*"], "/", Json),
            (&["text/event-stream;q=0.5, text/html"], "/", Html),
            (&["text/event-stream;q=0.5, text/plain"], "/", Text),
            (&["text/event-stream;q=0"], "/", Json),
            (&["text/*"], "/api/events", Json),
            (
                &["  text/html  ;  q=0.9  ,application/json;q=0.9"],
                "/",
                Html,
            ),
        ];
        for (accept, path, expected) in cases {
            let pairs: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
            let got = choose_form(&headers(&pairs), path, &api());
            assert_eq!(got, *expected, "Accept {accept:?} on {path}");
        }
    }

    #[test]
    fn grpc_wins_over_accept() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
        ] {
            let h = headers(&[("content-type", ct), ("accept", "text/html")]);
            assert_eq!(choose_form(&h, "/", &[]), Form::Grpc, "{ct}");
        }
        let h = headers(&[
            ("content-type", "application/grpc"),
            ("accept", "text/event-stream"),
        ]);
        assert_eq!(choose_form(&h, "/", &[]), Form::Grpc);
        let h = headers(&[
            ("content-type", "application/json"),
            ("accept", "text/html"),
        ]);
        assert_eq!(choose_form(&h, "/", &[]), Form::Html);
        for ct in [
            "application/grpc; charset=utf-8",
            "application/grpc-web+proto",
            "application/grpc-web-text",
            "application/grpc-web-text+proto",
        ] {
            let h = headers(&[("content-type", ct), ("accept", "text/html")]);
            assert_eq!(choose_form(&h, "/", &[]), Form::Grpc, "{ct}");
        }
        // A type that only begins like gRPC's is not gRPC.
        for ct in ["application/grpcfoo", "application/grpc-webfoo"] {
            let h = headers(&[("content-type", ct), ("accept", "text/html")]);
            assert_eq!(choose_form(&h, "/", &[]), Form::Html, "{ct}");
        }
    }

    #[test]
    fn a_grpc_web_answer_is_typed_as_asked() {
        for (ct, want) in [
            ("application/grpc-web", Some("application/grpc-web")),
            (
                "application/grpc-web+proto",
                Some("application/grpc-web+proto"),
            ),
            (
                "Application/gRPC-Web-Text; x=1",
                Some("Application/gRPC-Web-Text"),
            ),
            (
                "application/grpc-web-text+proto",
                Some("application/grpc-web-text+proto"),
            ),
            ("application/grpc", None),
            ("application/grpc+proto", None),
            ("application/grpc-webfoo", None),
            ("text/html", None),
        ] {
            let h = headers(&[("content-type", ct)]);
            let got = grpc_web_type(&h);
            assert_eq!(got.as_ref().map(|v| v.to_str().unwrap()), want, "{ct}");
        }
    }

    #[test]
    fn upgrade_gets_json() {
        let h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("accept", BROWSER),
        ]);
        assert_eq!(choose_form(&h, "/", &[]), Form::Json);
        // Connection: upgrade without an Upgrade header is not an upgrade request.
        let h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("accept", "text/event-stream"),
        ]);
        assert_eq!(choose_form(&h, "/", &[]), Form::Json);
        let h = headers(&[("connection", "upgrade"), ("accept", BROWSER)]);
        assert_eq!(choose_form(&h, "/", &[]), Form::Html);
        // Connection tokens may come on several lines.
        let h = headers(&[
            ("connection", "keep-alive"),
            ("connection", "UPGRADE"),
            ("upgrade", "websocket"),
            ("accept", BROWSER),
        ]);
        assert_eq!(choose_form(&h, "/", &[]), Form::Json);
    }

    #[test]
    fn an_h2c_upgrade_offer_is_negotiated_as_a_plain_request() {
        for upgrade in ["h2c", "H2C", " h2c/1 ", "websocket, h2c"] {
            let h = headers(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
                ("accept", BROWSER),
            ]);
            assert_eq!(choose_form(&h, "/", &[]), Form::Html, "{upgrade}");
        }
        let h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "h2cx"),
            ("accept", BROWSER),
        ]);
        assert_eq!(choose_form(&h, "/", &[]), Form::Json);
    }

    #[test]
    fn non_utf8_accept_is_ignored() {
        let mut h = HeaderMap::new();
        h.append(ACCEPT, HeaderValue::from_bytes(b"text/html\xff").unwrap());
        assert_eq!(choose_form(&h, "/", &[]), Form::Json);
        h.append(ACCEPT, HeaderValue::from_static("text/html"));
        assert_eq!(choose_form(&h, "/", &[]), Form::Html);
    }

    #[test]
    fn never_panics_on_odd_input() {
        let odd = [
            "",
            ",",
            ";",
            "/",
            "*",
            "*/",
            "/*",
            "a/b/c",
            "text/html;=",
            "text/html;q=",
            "text/html;q=.",
            "text/html;q=0.",
            "text/html;q=1.",
            "text/html;q=-1",
            "text/html;q=00.5",
            "text/html;q=0.9.9",
            "\t",
            "é/é",
        ];
        for accept in odd {
            if let Ok(v) = HeaderValue::from_str(accept) {
                let mut h = HeaderMap::new();
                h.insert(ACCEPT, v.clone());
                let _ = choose_form(&h, "/", &api());
                let _ = choose_language(Some(v.as_bytes()), &["en".into(), "fr".into()]);
            }
        }
    }

    #[test]
    fn qvalue_parsing() {
        assert_eq!(parse_qvalue("1"), Some(1000));
        assert_eq!(parse_qvalue("1."), Some(1000));
        assert_eq!(parse_qvalue("1.000"), Some(1000));
        assert_eq!(parse_qvalue("0"), Some(0));
        assert_eq!(parse_qvalue("0.5"), Some(500));
        assert_eq!(parse_qvalue("0.05"), Some(50));
        assert_eq!(parse_qvalue("0.123"), Some(123));
        assert_eq!(parse_qvalue("1.001"), None);
        assert_eq!(parse_qvalue("0.1234"), None);
        assert_eq!(parse_qvalue("2"), None);
        assert_eq!(parse_qvalue(""), None);
        assert_eq!(parse_qvalue("0.a"), None);
    }

    #[test]
    fn language_table() {
        let available = vec!["en".to_string(), "fr".to_string()];
        let cases: &[(Option<&str>, usize)] = &[
            (Some("fr"), 1),
            (Some("fr-CA,fr;q=0.9,en;q=0.8"), 1),
            (Some("fr-CA;q=0.8, en;q=0.5, *;q=0.1"), 1),
            (Some("de, en;q=0.5"), 0),
            (Some("de, fr;q=0.5"), 1),
            (Some("de"), 0),
            (Some("en;q=0.2, fr;q=0.9"), 1),
            (Some("fr;q=0"), 0),
            (Some("fr-CA, fr;q=0"), 0),
            (Some("fr;q=0.5, en;q=0.5"), 1),
            (Some("en;q=0.5, fr;q=0.5"), 0),
            (Some("*, fr;q=0.5"), 0),
            (Some("FR-ca"), 1),
            (None, 0),
            (Some(";;;,,"), 0),
            (Some("fr;q=bad"), 0),
            (Some("fr_FR"), 0),
            (Some(""), 0),
        ];
        for (header, expected) in cases {
            let got = choose_language(header.map(str::as_bytes), &available);
            assert_eq!(got, *expected, "Accept-Language {header:?}");
        }
    }

    #[test]
    fn language_matches_regional_available_tag() {
        let available = vec!["en".to_string(), "pt-BR".to_string()];
        assert_eq!(choose_language(Some(b"pt"), &available), 1);
        assert_eq!(choose_language(Some(b"pt-PT"), &available), 0);
    }

    /// A visitor whose browser sends only its regional tag (`fr-CA`, as Safari does) gets the
    /// regional page when there is one, not the generic page that sorts before it.
    #[test]
    fn a_regional_page_beats_the_generic_one_for_its_own_tag() {
        let available: Vec<String> = ["en", "fr", "fr-ca", "pt", "pt-br"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        let cases: &[(&str, usize)] = &[
            ("fr-CA", 2),
            ("fr-ca", 2),
            ("fr-CA,fr;q=0.9", 2),
            ("fr, fr-CA", 1),
            ("fr-BE", 1),
            ("fr", 1),
            ("pt-BR", 4),
            ("pt-PT", 3),
            ("pt-BR;q=0.5, pt", 3),
        ];
        for (header, expected) in cases {
            let got = choose_language(Some(header.as_bytes()), &available);
            assert_eq!(got, *expected, "Accept-Language {header:?}");
        }
    }

    #[test]
    fn language_with_no_available_tags() {
        assert_eq!(choose_language(Some(b"fr"), &[]), 0);
    }
}
