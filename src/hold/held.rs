//! The holding responses, rendered once per change of state and served by cloning `Bytes`;
//! for a held request written without hyper (`crate::fast`), by copying their HTTP/1.1
//! encoding.
//!
//! Only `Retry-After` depends on the moment of the request (it counts down to `until`), so the
//! JSON bodies that carry it are stored split around that one number and joined per request,
//! and while it counts down the encodings are kept up to it, for each request to add it.

use super::negotiate::Form;
use super::pages::Pages;
use super::render::{self, UpdateItem, Values};
use crate::body::Body;
use crate::config::MaintenanceConfig;
use crate::h1::{Answers, Encoded};
use crate::state::mode::{Mode, Persisted, Update, MAX_RETRY_AFTER, MIN_RETRY_AFTER};
use crate::time::{announced_end, seconds_until, whole_seconds, Timestamp};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;
use std::time::SystemTime;

pub static X_INTERMISSION_MODE: HeaderName = HeaderName::from_static("x-intermission-mode");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
static GRPC_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// What the clients are told, derived from the state at one moment.
#[derive(Debug, Clone)]
pub struct View {
    pub mode: Mode,
    pub message: String,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// `until` had passed when the view was taken: maintenance overran its announced end,
    /// and people must not be told to expect it back by a time gone by. The controller takes
    /// a new view at that moment.
    pub overrun: bool,
    /// Seconds for `Retry-After` when there is no `until` ahead.
    pub retry_default: u64,
    /// `until` is a schedule window's end, which switches maintenance off by itself, where an
    /// operator's is an announcement that may be overrun.
    pub ends_by_itself: bool,
    /// Oldest first.
    pub updates: Vec<Update>,
    pub status_page: String,
    /// The next scheduled window: (start, end, message).
    pub next_window: Option<(SystemTime, SystemTime, Option<String>)>,
}

impl View {
    /// The view of `mode` at `now` (which may differ from the current mode, for previews).
    /// Planned maintenance comes from the operator's `on`, else from the window in force.
    pub fn new(
        mode: Mode,
        state: &Persisted,
        cfg: &MaintenanceConfig,
        outage_since: Option<SystemTime>,
        now: SystemTime,
    ) -> View {
        let held = mode == Mode::Maintenance;
        let planned = state.planned.as_ref().filter(|_| held);
        let in_force = state.active_window(now).filter(|_| held);
        // An operator's `on` outlasts the window, so its times are the operator's; but a
        // switch without words still shows the window's (SPEC §3: operator, window, config).
        let window = in_force.filter(|_| planned.is_none());
        let default_message = match mode {
            Mode::Outage => &cfg.outage_message,
            _ => in_force
                .and_then(|w| w.message.as_ref())
                .unwrap_or(&cfg.message),
        };
        // Within the bounds `ctl on --retry-after` keeps to, whatever a state file edited by
        // hand says (`retry_after`).
        let retry_default = match mode {
            Mode::Outage => whole_seconds(cfg.outage_retry_after),
            _ => planned
                .and_then(|p| p.retry_after)
                .unwrap_or_else(|| whole_seconds(cfg.retry_after)),
        }
        .clamp(MIN_RETRY_AFTER.as_secs(), MAX_RETRY_AFTER.as_secs());
        let until = planned
            .and_then(|p| p.until)
            .map(|u| u.0)
            .or(window.map(|w| state.window_until(w)));
        View {
            mode,
            message: state
                .message
                .clone()
                .unwrap_or_else(|| default_message.clone()),
            since: match mode {
                Mode::Maintenance => planned
                    .map(|p| p.since.0)
                    .or(window.map(|w| state.window_since(w))),
                Mode::Outage => outage_since,
                Mode::Normal => None,
            },
            until,
            overrun: until.is_some_and(|u| announced_end(u) <= now),
            retry_default,
            ends_by_itself: planned.is_none() && window.is_some(),
            updates: state.updates.clone(),
            status_page: cfg.status_page.clone(),
            next_window: state
                .next_window(now)
                .map(|w| (w.start.0, w.end.0, w.message.clone())),
        }
    }

    /// Seconds for `Retry-After` now: until the announced end, else the default (also once the
    /// end has passed: an overrun must not tell clients to retry at once). Never more than a
    /// day, as the configured values: an end a month away must not keep clients and crawlers
    /// away for a month when the work ends early.
    ///
    /// Past the end given but before the minute the pages show (`announced_end`), it counts
    /// to that minute, when the overrun comes: until then the page still says "back by" it.
    ///
    /// Past a window's end, a second: the window is over, and the milliseconds the switch
    /// takes to follow it must not tell a client to stay away for the whole default.
    pub fn retry_after(&self, now: SystemTime) -> u64 {
        if self.ends_by_itself && self.until.is_some_and(|u| u <= now) {
            return MIN_RETRY_AFTER.as_secs();
        }
        self.until
            .and_then(|u| seconds_until(u, now).or_else(|| seconds_until(announced_end(u), now)))
            .map_or(self.retry_default, |s| s.min(MAX_RETRY_AFTER.as_secs()))
    }
}

/// A JSON document split around its `retry_after` number.
#[derive(Debug, Clone)]
pub struct Spliced {
    head: Bytes,
    tail: Bytes,
}

/// The problem document carries the latest updates only; the page and `status` have all.
const PROBLEM_UPDATES: usize = 10;

/// The longest an event stream client is told to wait before it reconnects (`retry:`), by
/// mode. A browser's `EventSource` waits exactly that long, and its page shows nothing new
/// meanwhile, so this is how stale a page left open stays once the hold ends: an outage ends
/// by itself when a check passes, unannounced, so as long as its default `Retry-After`; a
/// maintenance's hour-long `Retry-After` would leave pages an hour behind an early end, and a
/// minute costs an open page one held answer a minute, from the fast path. Each page waits
/// from its own last answer, so the reconnections after the end come spread, not at once.
const MAX_RECONNECT_OUTAGE: u64 = 30;
const MAX_RECONNECT_MAINTENANCE: u64 = 60;

/// gRPC clients refuse large metadata (grpc-java: 8 KiB in all), and an oversized
/// `grpc-message` would turn UNAVAILABLE into INTERNAL.
pub(crate) const MAX_GRPC_MESSAGE: usize = 1024;

/// A number no real value reaches, so it marks the split point in the serialized text.
const MARK: u64 = u64::MAX;

impl Spliced {
    fn new(value: &impl Serialize) -> Spliced {
        let text = serde_json::to_vec(value).unwrap_or_default();
        // The key is part of the needle: a message may contain the digits, but a JSON string
        // cannot contain `"retry_after":` unescaped.
        let key = b"\"retry_after\":";
        let mark = format!("\"retry_after\":{MARK}");
        match find(&text, mark.as_bytes()) {
            Some(at) => Spliced {
                head: Bytes::copy_from_slice(&text[..at + key.len()]),
                tail: Bytes::copy_from_slice(&text[at + mark.len()..]),
            },
            None => Spliced {
                head: Bytes::from(text),
                tail: Bytes::new(),
            },
        }
    }

    /// Joins the parts once when the number cannot change (no `until`), so that serving the
    /// document is a `Bytes` clone.
    pub fn fixed(self, retry_after: u64) -> Spliced {
        Spliced {
            head: self.with(retry_after),
            tail: Bytes::new(),
        }
    }

    pub fn with(&self, retry_after: u64) -> Bytes {
        if self.tail.is_empty() {
            return self.head.clone();
        }
        let mut number = itoa::Buffer::new();
        let digits = number.format(retry_after).as_bytes();
        let mut out = Vec::with_capacity(self.len_with(digits));
        self.write_with(digits, &mut out);
        Bytes::from(out)
    }

    /// The length of the document with the number written `digits`.
    fn len_with(&self, digits: &[u8]) -> usize {
        match self.tail.is_empty() {
            true => self.head.len(),
            false => self.head.len() + digits.len() + self.tail.len(),
        }
    }

    /// Appends the document with the number written `digits` to `out`.
    fn write_with(&self, digits: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        if !self.tail.is_empty() {
            out.extend_from_slice(digits);
            out.extend_from_slice(&self.tail);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Serialize)]
struct UpdateJson<'a> {
    at: Timestamp,
    message: &'a str,
}

fn updates_newest_first(updates: &[Update]) -> Vec<UpdateJson<'_>> {
    updates
        .iter()
        .rev()
        .map(|u| UpdateJson {
            at: u.at,
            message: &u.message,
        })
        .collect()
}

/// The public status document (`{reserved_prefix}status`).
#[derive(Serialize)]
struct StatusJson<'a> {
    mode: Mode,
    message: Option<&'a str>,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
    /// The announced end has passed (`View::overrun`): the page's script shows it as the
    /// server-rendered page does.
    overrun: bool,
    retry_after: Option<u64>,
    updates: Vec<UpdateJson<'a>>,
    status_page: Option<&'a str>,
    next_window: Option<WindowJson<'a>>,
}

/// A scheduled window as the public sees it (not who scheduled it).
#[derive(Serialize)]
struct WindowJson<'a> {
    start: Timestamp,
    end: Timestamp,
    message: Option<&'a str>,
}

/// The RFC 9457 problem document of a held request.
#[derive(Serialize)]
struct ProblemJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: &'a str,
    mode: Mode,
    since: Option<Timestamp>,
    until: Option<Timestamp>,
    overrun: bool,
    retry_after: u64,
    status_page: Option<&'a str>,
    updates: Vec<UpdateJson<'a>>,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The public status document for `view` (`mode: normal` and nulls when nothing is held).
pub fn status_json(view: &View) -> Spliced {
    let held = view.mode != Mode::Normal;
    let doc = Spliced::new(&StatusJson {
        mode: view.mode,
        message: held.then_some(view.message.as_str()),
        since: view.since.map(Timestamp),
        until: view.until.map(Timestamp),
        overrun: view.overrun,
        retry_after: held.then_some(MARK),
        updates: updates_newest_first(&view.updates),
        status_page: non_empty(&view.status_page),
        next_window: view
            .next_window
            .as_ref()
            .map(|(start, end, message)| WindowJson {
                start: Timestamp(*start),
                end: Timestamp(*end),
                message: message.as_deref(),
            }),
    });
    match view.until {
        None => doc.fixed(view.retry_default),
        Some(_) => doc,
    }
}

/// Renders the page of `view.mode` in every language.
pub fn render_pages(pages: &Pages, view: &View, prefix: &str, now: SystemTime) -> Vec<Bytes> {
    let times: Vec<(String, String)> = view
        .updates
        .iter()
        .rev()
        .map(|u| (u.at.rfc3339(), render::human_time_of_day(u.at.0)))
        .collect();
    let items: Vec<UpdateItem<'_>> = view
        .updates
        .iter()
        .rev()
        .zip(&times)
        .map(|(u, (rfc, human))| UpdateItem {
            at_rfc3339: rfc,
            at_human: human,
            message: &u.message,
        })
        .collect();
    // A page that names `until` only (one written before `overrun` existed) stops promising a
    // time gone by without being changed.
    let end = view.until.map(render::human_end).unwrap_or_default();
    let (until, overrun) = if view.overrun {
        (String::new(), end)
    } else {
        (end, String::new())
    };
    let values = Values {
        message: view.message.clone(),
        since: view.since.map(render::human_time).unwrap_or_default(),
        until,
        overrun,
        retry_after: view.retry_after(now).to_string(),
        status_page: view.status_page.clone(),
        updates_html: render::render_updates(&items),
        prefix: prefix.to_owned(),
        mode: view.mode.as_str().to_owned(),
    };
    let outage = view.mode == Mode::Outage;
    (0..pages.langs.len())
        .map(|lang| Bytes::from(pages.template(outage, lang).render(&values)))
        .collect()
}

/// Every form of the holding response for one view, ready to serve.
pub struct Held {
    pub view: View,
    pub html: Vec<Bytes>,
    text: Bytes,
    json: Spliced,
    /// The event stream's body when it cannot change (no announced end to count down to).
    events: Option<Bytes>,
    /// The headers each form always has, by `Form`: a request clones one (no hashing, no
    /// formatting) and adds only what depends on the moment.
    heads: [HeaderMap; 5],
    /// The HTML form's, by language: each says its page's language (`Content-Language`).
    html_heads: Vec<HeaderMap>,
    /// `Retry-After` when it cannot change (no announced end to count down to).
    retry_fixed: Option<(HeaderValue, HeaderValue)>,
    /// Every response `respond` gives, encoded for HTTP/1.1 but for its date: by `Form`, then
    /// language (HTML only), then for GET and HEAD. A held request written without hyper
    /// (`crate::fast`) is then a copy. `None` while `Retry-After` counts down, and unless
    /// asked for (`with_encodings`: the outage answer to a failed forward never needs them).
    encoded: Option<[Vec<[Encoded; 2]>; 5]>,
    /// While `Retry-After` counts down, the heads of those responses encoded up to its value,
    /// which comes last (`respond`), and the line `retry-after: ` started: by `Form`, then
    /// language (HTML only); none for gRPC, which is never written from them. A request adds
    /// the number of its moment, the length, the date and the body (`write_counting`).
    counting: Option<[Vec<Bytes>; 5]>,
}

/// The body of a counting answer (`Held::write_counting`).
enum Counted<'s, 'n> {
    /// The same at every moment, sent from where it lies.
    Kept(Option<&'s Bytes>),
    /// The problem document, with the number of the moment.
    Json,
    /// The event stream, with its reconnection delay (written so) and the number.
    Events(&'n [u8]),
}

/// What comes after the value of `Retry-After` in a counting answer's head, before its length.
const AFTER_RETRY: &[u8] = b"\r\ncontent-length: ";

/// In `form_index` order.
const FORMS: [Form; 5] = [
    Form::Grpc,
    Form::EventStream,
    Form::Html,
    Form::Text,
    Form::Json,
];

fn form_index(form: Form) -> usize {
    match form {
        Form::Grpc => 0,
        Form::EventStream => 1,
        Form::Html => 2,
        Form::Text => 3,
        Form::Json => 4,
    }
}

/// The event stream a held `EventSource` gets: the reconnection delay, then the problem as
/// one `intermission` event, which a page can listen for and the app's own `message`
/// listeners never see. No `id:` field, so that the browser keeps the app's last event ID
/// and sends it back to the app when the hold ends, to resume where it left off.
fn event_stream(mode: Mode, retry_after: u64, problem: &Spliced) -> Bytes {
    let (mut secs, mut ms) = (itoa::Buffer::new(), itoa::Buffer::new());
    let secs = secs.format(retry_after).as_bytes();
    let ms = ms.format(reconnect_ms(mode, retry_after)).as_bytes();
    let mut out = Vec::with_capacity(events_len(ms, secs, problem));
    write_events(ms, secs, problem, &mut out);
    Bytes::from(out)
}

/// The event stream's reconnection delay for `retry_after`, in milliseconds.
fn reconnect_ms(mode: Mode, retry_after: u64) -> u64 {
    let most = match mode {
        Mode::Outage => MAX_RECONNECT_OUTAGE,
        _ => MAX_RECONNECT_MAINTENANCE,
    };
    retry_after.min(most).saturating_mul(1000)
}

const EVENTS_BEFORE: &[u8] = b"retry: ";
const EVENTS_BETWEEN: &[u8] = b"\nevent: intermission\ndata: ";
const EVENTS_AFTER: &[u8] = b"\n\n";

/// The length of the event stream whose delay is written `ms` and whose problem's number is
/// written `secs`.
fn events_len(ms: &[u8], secs: &[u8], problem: &Spliced) -> usize {
    EVENTS_BEFORE.len()
        + ms.len()
        + EVENTS_BETWEEN.len()
        + problem.len_with(secs)
        + EVENTS_AFTER.len()
}

/// Appends that event stream to `out`.
fn write_events(ms: &[u8], secs: &[u8], problem: &Spliced, out: &mut Vec<u8>) {
    out.extend_from_slice(EVENTS_BEFORE);
    out.extend_from_slice(ms);
    out.extend_from_slice(EVENTS_BETWEEN);
    // serde_json's compact output escapes every line break, so the document is one line.
    problem.write_with(secs, out);
    out.extend_from_slice(EVENTS_AFTER);
}

/// The status of `form`'s answer: 200 where the client reads the hold from what follows
/// (`grpc-status`, the event), as an `EventSource` gives up for good at any other.
fn status_of(form: Form) -> StatusCode {
    match form {
        Form::Grpc | Form::EventStream => StatusCode::OK,
        Form::Html | Form::Text | Form::Json => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The headers of `form` that do not depend on the moment of the request.
fn fixed_headers(form: Form, mode: HeaderValue, grpc_message: &HeaderValue) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    let content_type = match form {
        Form::Grpc => "application/grpc",
        Form::EventStream => "text/event-stream",
        Form::Html => "text/html; charset=utf-8",
        Form::Text => "text/plain; charset=utf-8",
        Form::Json => "application/problem+json",
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_INTERMISSION_MODE.clone(), mode);
    match form {
        Form::Grpc => {
            h.insert(GRPC_STATUS.clone(), HeaderValue::from_static("14"));
            h.insert(GRPC_MESSAGE.clone(), grpc_message.clone());
        }
        Form::Html => {
            h.insert(
                header::VARY,
                HeaderValue::from_static("Accept, Accept-Language"),
            );
        }
        Form::EventStream | Form::Text | Form::Json => {
            h.insert(header::VARY, HeaderValue::from_static("Accept"));
        }
    }
    h
}

impl Held {
    pub fn new(pages: &Pages, view: View, prefix: &str, now: SystemTime) -> Held {
        let html = render_pages(pages, &view, prefix, now);
        let mut text = view.message.clone();
        match view.until {
            Some(u) if view.overrun => text.push_str(&format!(
                "\nWe planned to be back by {}; it is taking longer than planned.",
                render::human_end(u)
            )),
            Some(u) => text.push_str(&format!("\nExpected back by {}.", render::human_end(u))),
            None => {}
        }
        if !view.status_page.is_empty() {
            text.push_str(&format!("\nStatus: {}", view.status_page));
        }
        text.push('\n');
        let json = Spliced::new(&ProblemJson {
            kind: "about:blank",
            title: "Service Unavailable",
            status: 503,
            detail: &view.message,
            mode: view.mode,
            since: view.since.map(Timestamp),
            until: view.until.map(Timestamp),
            overrun: view.overrun,
            retry_after: MARK,
            status_page: non_empty(&view.status_page),
            updates: updates_newest_first(&view.updates)
                .into_iter()
                .take(PROBLEM_UPDATES)
                .collect(),
        });
        let json = match view.until {
            None => json.fixed(view.retry_default),
            Some(_) => json,
        };
        let events = view
            .until
            .is_none()
            .then(|| event_stream(view.mode, view.retry_default, &json));
        let grpc_message =
            HeaderValue::from_str(&grpc_percent_encode(&view.message, MAX_GRPC_MESSAGE))
                .unwrap_or_else(|_| HeaderValue::from_static("unavailable"));
        let mode = HeaderValue::from_static(view.mode.as_str());
        let heads = FORMS.map(|form| fixed_headers(form, mode.clone(), &grpc_message));
        let html_heads = (0..pages.langs.len())
            .map(|lang| {
                let mut h = heads[form_index(Form::Html)].clone();
                if let Some(language) = pages.content_language(lang) {
                    h.insert(header::CONTENT_LANGUAGE, language);
                }
                h
            })
            .collect();
        let retry_fixed = view.until.is_none().then(|| {
            let secs = view.retry_default;
            (
                HeaderValue::from(secs),
                HeaderValue::from(secs.saturating_mul(1000)),
            )
        });
        Held {
            view,
            html,
            text: Bytes::from(text),
            json,
            events,
            heads,
            html_heads,
            retry_fixed,
            encoded: None,
            counting: None,
        }
    }

    /// The same, with every answer also kept encoded (`encoded`), or while `Retry-After`
    /// counts down, every head up to it (`counting`): for the answers to held requests, which
    /// `crate::fast` writes without hyper (`write_encoded`).
    pub fn with_encodings(mut self) -> Held {
        let langs = |form: Form| match form {
            Form::Html => self.html.len().max(1),
            _ => 1,
        };
        if self.retry_fixed.is_some() {
            self.encoded = Some(FORMS.map(|form| {
                (0..langs(form))
                    .map(|lang| [false, true].map(|head| self.encode(form, lang, head)))
                    .collect()
            }));
        } else {
            self.counting = Some(FORMS.map(|form| {
                match form {
                    Form::Grpc => Vec::new(),
                    _ => (0..langs(form))
                        .map(|lang| self.counting_head(form, lang))
                        .collect(),
                }
            }));
        }
        self
    }

    /// The head of `respond`'s answer up to the value of its `Retry-After`.
    fn counting_head(&self, form: Form, lang: usize) -> Bytes {
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status_of(form);
        parts.headers = self.fixed_head(form, lang).clone();
        let mut out = Vec::with_capacity(256);
        crate::h1::encode_fields(&parts, &mut out);
        out.extend_from_slice(header::RETRY_AFTER.as_str().as_bytes());
        out.extend_from_slice(b": ");
        Bytes::from(out)
    }

    fn encode(&self, form: Form, lang: usize, head: bool) -> Encoded {
        let (parts, body) = self.respond(form, lang, head, SystemTime::now).into_parts();
        Encoded::new(&parts, body.into_ready().unwrap_or_default(), head)
    }

    /// `respond`'s answer, encoded, when it does not depend on the moment and was kept
    /// (`with_encodings`).
    pub fn encoded(&self, form: Form, lang: usize, head: bool) -> Option<&Encoded> {
        let by_lang = self.encoded.as_ref()?.get(form_index(form))?;
        let pair = by_lang.get(lang).or(by_lang.first())?;
        Some(&pair[usize::from(head)])
    }

    /// Writes `respond`'s answer now to `out` from what `with_encodings` kept, with the header
    /// lines `extra` (each ending in CRLF) after the encoded ones; its status and the length
    /// of the body sent. `None`, with nothing written, when nothing was kept for it.
    pub fn write_encoded<'s>(
        &'s self,
        form: Form,
        lang: usize,
        head: bool,
        extra: &[u8],
        out: &mut Answers<'s, '_>,
    ) -> Option<(StatusCode, usize)> {
        if let Some(encoded) = self.encoded(form, lang, head) {
            encoded.answer_with(extra, out);
            return Some((encoded.status(), encoded.body_len()));
        }
        self.write_counting(form, lang, head, SystemTime::now(), extra, out)
    }

    /// `write_encoded` while `Retry-After` counts down, at `now`: the head kept, then what
    /// depends on the moment, worked out from the one reading of the clock that also dates
    /// the answer, so that its number and its date are of the same second. No lock and no
    /// allocation: the number is spliced in where it goes, not re-encoded once a second into
    /// answers that each thread would have to share or keep (with `until` not on a whole
    /// second, its steps do not fall on `Date`'s either), for `View::retry_after` and two or
    /// three numbers formatted per request (the date needed the clock anyway). The bodies
    /// that carry the number (JSON, the event stream) are copied; the page and the text stay
    /// where they lie (`Answers::body`).
    fn write_counting<'s>(
        &'s self,
        form: Form,
        lang: usize,
        head: bool,
        now: SystemTime,
        extra: &[u8],
        out: &mut Answers<'s, '_>,
    ) -> Option<(StatusCode, usize)> {
        let by_lang = self.counting.as_ref()?.get(form_index(form))?;
        let start = by_lang.get(lang).or(by_lang.first())?;
        let retry = self.view.retry_after(now);
        let (mut secs, mut ms, mut len) = (
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        );
        let secs = secs.format(retry).as_bytes();
        let body = match form {
            Form::Html => Counted::Kept(self.html.get(lang).or(self.html.first())),
            Form::Text => Counted::Kept(Some(&self.text)),
            Form::Json => Counted::Json,
            Form::EventStream => {
                Counted::Events(ms.format(reconnect_ms(self.view.mode, retry)).as_bytes())
            }
            Form::Grpc => return None,
        };
        let body_len = match body {
            Counted::Kept(kept) => kept.map_or(0, Bytes::len),
            Counted::Json => self.json.len_with(secs),
            Counted::Events(ms) => events_len(ms, secs, &self.json),
        };
        let buf = out.buf();
        let copied = if matches!(body, Counted::Kept(_)) {
            0
        } else {
            body_len
        };
        buf.reserve(start.len() + extra.len() + 80 + copied);
        buf.extend_from_slice(start);
        buf.extend_from_slice(secs);
        buf.extend_from_slice(AFTER_RETRY);
        buf.extend_from_slice(len.format(body_len).as_bytes());
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(extra);
        crate::h1::date_header_at(now, buf);
        buf.extend_from_slice(b"\r\n");
        if head {
            return Some((status_of(form), 0));
        }
        match body {
            Counted::Kept(kept) => out.body(kept.map_or(&[][..], |b| &b[..])),
            Counted::Json => self.json.write_with(secs, buf),
            Counted::Events(ms) => write_events(ms, secs, &self.json, buf),
        }
        Some((status_of(form), body_len))
    }

    /// The headers of `form`'s answer in language `lang` that do not depend on the moment.
    fn fixed_head(&self, form: Form, lang: usize) -> &HeaderMap {
        let heads = match form {
            Form::Html => self.html_heads.get(lang).or(self.html_heads.first()),
            _ => None,
        };
        heads.unwrap_or(&self.heads[form_index(form)])
    }

    /// The response for one held request. The clock is read only when `Retry-After` counts
    /// down to an announced end.
    pub fn respond(
        &self,
        form: Form,
        lang: usize,
        head: bool,
        now: impl FnOnce() -> SystemTime,
    ) -> Response<Body> {
        let retry = match self.retry_fixed {
            Some(_) => self.view.retry_default,
            None => self.view.retry_after(now()),
        };
        let body = match form {
            Form::Grpc => Bytes::new(),
            Form::EventStream => match &self.events {
                Some(events) => events.clone(),
                None => event_stream(self.view.mode, retry, &self.json),
            },
            Form::Html => self
                .html
                .get(lang)
                .or(self.html.first())
                .cloned()
                .unwrap_or_default(),
            Form::Text => self.text.clone(),
            Form::Json => self.json.with(retry),
        };
        // `write_counting` writes these answers from `fixed_head`, with `Retry-After` after
        // it and the length (for HEAD here, from the encoder for GET) after that.
        let mut headers = self.fixed_head(form, lang).clone();
        let fixed = self.retry_fixed.as_ref();
        headers.insert(
            header::RETRY_AFTER,
            fixed.map_or_else(|| HeaderValue::from(retry), |(r, _)| r.clone()),
        );
        if form == Form::Grpc {
            let pushback = fixed.map_or_else(
                || HeaderValue::from(retry.saturating_mul(1000)),
                |(_, p)| p.clone(),
            );
            headers.insert(GRPC_PUSHBACK.clone(), pushback);
        } else if head {
            // Without a body to measure, the length of the one a GET would get (RFC 9110
            // §9.3.2); with one, hyper writes Content-Length from its exact size.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let mut resp = Response::new(if head { Body::Empty } else { Body::full(body) });
        *resp.status_mut() = status_of(form);
        *resp.headers_mut() = headers;
        resp
    }
}

/// Asks a gRPC client not to retry (`grpc-retry-pushback-ms: -1`, gRFC A6) when the call's
/// deadline ends before the pushback does: a library with a retry policy (grpc-core, grpc-go,
/// grpc-java) honours a pushback even past the deadline, so the call would wait out its whole
/// deadline and end `DEADLINE_EXCEEDED` with the operator's message lost, where `-1` makes it
/// report this `UNAVAILABLE` at once. A call without a deadline keeps the pushback.
pub fn grpc_pushback_within(headers: &mut HeaderMap, deadline: Option<std::time::Duration>) {
    let Some(deadline) = deadline else {
        return;
    };
    let pushback = headers
        .get(&GRPC_PUSHBACK)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if pushback.is_some_and(|ms| std::time::Duration::from_millis(ms) >= deadline) {
        headers.insert(GRPC_PUSHBACK.clone(), HeaderValue::from_static("-1"));
    }
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`; cut to
/// at most `max` bytes, never inside a `%XX` or a character. A cut message ends with `…`, so
/// that nobody reads its last words as the whole of it.
pub fn grpc_percent_encode(s: &str, max: usize) -> String {
    const ELLIPSIS: &str = "%E2%80%A6";
    let whole = encode_within(s, usize::MAX);
    if whole.len() <= max {
        return whole;
    }
    if max < ELLIPSIS.len() {
        return encode_within(s, max);
    }
    let mut cut = encode_within(s, max.saturating_sub(ELLIPSIS.len()));
    cut.push_str(ELLIPSIS);
    cut
}

fn encode_within(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let mut utf8 = [0u8; 4];
        let bytes = c.encode_utf8(&mut utf8).as_bytes();
        let printable = bytes.len() == 1 && (0x20..=0x7e).contains(&bytes[0]) && bytes[0] != b'%';
        let needed = if printable { 1 } else { 3 * bytes.len() };
        if out.len().saturating_add(needed) > max {
            break;
        }
        if printable {
            out.push(c);
        } else {
            for b in bytes {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::tests::undated;

    fn pages(langs: &[&str]) -> Pages {
        let templates = |page: &str| {
            langs
                .iter()
                .map(|l| render::Template::parse(&format!("<p>{page} {l}: {{{{message}}}}</p>")))
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        };
        Pages {
            id: 7,
            langs: langs.iter().map(|l| l.to_string()).collect(),
            fallback_english: true,
            maintenance: templates("maintenance"),
            outage: templates("outage"),
            assets: Default::default(),
            origin: String::new(),
            warnings: Vec::new(),
        }
    }

    fn view(until: Option<SystemTime>) -> View {
        View {
            mode: Mode::Maintenance,
            message: "Back soon".into(),
            since: None,
            until,
            overrun: false,
            retry_default: 300,
            ends_by_itself: false,
            updates: Vec::new(),
            status_page: String::new(),
            next_window: None,
        }
    }

    /// SPEC §1: once the announced end passes, `Retry-After` falls back to the configured
    /// value: the operator's `--retry-after` when given, else `maintenance.retry_after`.
    #[test]
    fn an_overrun_falls_back_to_the_operators_retry_after_else_the_configs() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse(
            "[maintenance]\nretry_after = \"45s\"\n",
            dir.path(),
            None,
        )
        .unwrap();
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let later = t0 + std::time::Duration::from_secs(61);
        for (given, after) in [(Some(600), 600), (None, 45)] {
            let on = crate::state::mode::Change::On {
                message: None,
                until: Some(Some(t0 + std::time::Duration::from_secs(60))),
                retry_after: given.map(std::time::Duration::from_secs),
                reason: None,
                by: "op".into(),
            };
            let state = Persisted::default().apply(on, t0, true).unwrap();
            let view = View::new(Mode::Maintenance, &state, &config.maintenance, None, t0);
            assert_eq!(view.retry_after(t0), 60, "counts down to `until`");
            assert_eq!(view.retry_after(later), after, "--retry-after {given:?}");
        }
    }

    /// In the milliseconds between a window's end and the switch that follows it, a held
    /// answer says to come back in a second, not the default's minutes; an operator's end
    /// passed is an overrun, which keeps the default.
    #[test]
    fn past_a_windows_end_retry_after_is_a_second() {
        use crate::state::mode::Change;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse("", dir.path(), None).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (start, end) = (t0 + Duration::from_secs(60), t0 + Duration::from_secs(120));
        let window = Change::ScheduleAdd {
            start,
            end,
            message: None,
            by: "op".into(),
        };
        let state = Persisted::default().apply(window, t0, true).unwrap();
        let view = View::new(Mode::Maintenance, &state, &config.maintenance, None, start);
        assert_eq!(view.retry_after(start), 60);
        for late in [0, 4, 25, 900] {
            assert_eq!(
                view.retry_after(end + Duration::from_millis(late)),
                1,
                "{late} ms"
            );
        }

        let on = Change::On {
            message: None,
            until: Some(Some(end)),
            retry_after: None,
            reason: None,
            by: "op".into(),
        };
        let state = Persisted::default().apply(on, t0, true).unwrap();
        let view = View::new(Mode::Maintenance, &state, &config.maintenance, None, t0);
        assert_eq!(view.retry_after(end + Duration::from_millis(25)), 300);
    }

    /// Windows put end to end are one maintenance: its end is the last one's, in what pages,
    /// `status` and `Retry-After` tell, not the end of the one in force, past which the proxy
    /// already knows it holds. A gap breaks the chain.
    #[test]
    fn windows_put_end_to_end_end_with_the_last() {
        use crate::state::mode::Change;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse("", dir.path(), None).unwrap();
        let t = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs);
        let mut state = Persisted::default();
        for (start, end) in [(100, 200), (200, 300), (300, 400), (401, 500)] {
            let window = Change::ScheduleAdd {
                start: t(start),
                end: t(end),
                message: None,
                by: "op".into(),
            };
            state = state.apply(window, t(0), true).unwrap();
        }
        for (at, until) in [(150, 400), (250, 400), (350, 400), (450, 500)] {
            let state = state.clone().tidied(true, t(at));
            let view = View::new(Mode::Maintenance, &state, &config.maintenance, None, t(at));
            assert_eq!(view.until, Some(t(until)), "at {at}");
            assert_eq!(view.retry_after(t(at)), until - at, "at {at}");
        }
    }

    /// An announced end a month away tells clients to come back within a day, not a month;
    /// a state file edited by hand cannot make `Retry-After` 0 or years.
    #[test]
    fn retry_after_stays_within_a_second_and_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse("", dir.path(), None).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let month = std::time::Duration::from_secs(30 * 24 * 3600);
        let on = |until: Option<SystemTime>, retry_after: Option<u64>| {
            let on = crate::state::mode::Change::On {
                message: None,
                until: until.map(Some),
                retry_after: retry_after.map(std::time::Duration::from_secs),
                reason: None,
                by: "op".into(),
            };
            let state = Persisted::default().apply(on, t0, true).unwrap();
            View::new(Mode::Maintenance, &state, &config.maintenance, None, t0)
        };
        assert_eq!(on(Some(t0 + month), None).retry_after(t0), 86_400);
        let mut edited = Persisted::default()
            .apply(
                crate::state::mode::Change::On {
                    message: None,
                    until: None,
                    retry_after: None,
                    reason: None,
                    by: "op".into(),
                },
                t0,
                true,
            )
            .unwrap();
        for (written, served) in [(0, 1), (u64::MAX, 86_400)] {
            if let Some(p) = edited.planned.as_mut() {
                p.retry_after = Some(written);
            }
            let view = View::new(Mode::Maintenance, &edited, &config.maintenance, None, t0);
            assert_eq!(view.retry_after(t0), served, "{written}");
        }
    }

    /// Past the announced end, maintenance stays on: the page, the text and both JSON
    /// documents say it overran, and no form tells people to expect it back by a time gone
    /// by. Before it, they show the end as announced.
    #[test]
    fn past_its_announced_end_every_form_says_it_is_taking_longer() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse("", dir.path(), None).unwrap();
        let pages = Pages::load(&config.maintenance).unwrap();
        let t0 = SystemTime::now();
        // Half a minute past a whole one: shown as the next minute, a promise kept.
        let whole = t0.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 60 * 60;
        let end = std::time::UNIX_EPOCH + std::time::Duration::from_secs(whole + 3630);
        let on = crate::state::mode::Change::On {
            message: Some("Database upgrade".into()),
            until: Some(Some(end)),
            retry_after: None,
            reason: None,
            by: "op".into(),
        };
        let state = Persisted::default().apply(on, t0, true).unwrap();
        let shown = render::human_time(end + std::time::Duration::from_secs(30));
        let body = |held: &Held, form: Form, lang: usize| {
            let body = held.respond(form, lang, false, || t0).into_body();
            String::from_utf8(body.into_ready().unwrap().to_vec()).unwrap()
        };
        // Between the end given and the minute shown, Retry-After counts to that minute, when
        // the overrun comes; then it is the configured value.
        let retry = |at: SystemTime| {
            View::new(Mode::Maintenance, &state, &config.maintenance, None, at).retry_after(at)
        };
        assert_eq!(retry(end - std::time::Duration::from_secs(10)), 10);
        assert_eq!(retry(end), 30);
        assert_eq!(retry(end + std::time::Duration::from_secs(20)), 10);
        assert_eq!(retry(end + std::time::Duration::from_secs(30)), 300);
        // Past the end given, but not the minute shown, no form says it is taking longer than
        // that minute: from that minute on, every form does.
        for (at, overrun) in [
            (t0, false),
            (end, false),
            (end + std::time::Duration::from_millis(29_999), false),
            (end + std::time::Duration::from_secs(30), true),
            (end + std::time::Duration::from_secs(60), true),
        ] {
            let view = View::new(Mode::Maintenance, &state, &config.maintenance, None, at);
            assert_eq!(view.overrun, overrun, "at {at:?}");
            let status = String::from_utf8(status_json(&view).with(300).to_vec()).unwrap();
            let held = Held::new(&pages, view, "/_i/", at);
            let (html, html_fr) = (body(&held, Form::Html, 0), body(&held, Form::Html, 1));
            let (text, json) = (body(&held, Form::Text, 0), body(&held, Form::Json, 0));
            let flag = format!("\"overrun\":{overrun}");
            assert!(
                json.contains(&flag) && status.contains(&flag),
                "{json}\n{status}"
            );
            assert!(
                json.contains("\"until\":\"") && status.contains("\"until\":\""),
                "the announced end stays in the JSON"
            );
            if overrun {
                assert!(html.contains(&format!("id=\"overrun-line\" class=\"meta\">We planned to be back by <strong><time id=\"overrun\">{shown}</time>")), "{html}");
                assert!(
                    html.contains("id=\"until-line\" class=\"meta\" hidden>"),
                    "{html}"
                );
                assert!(
                    html_fr.contains("id=\"overrun-line\" class=\"meta\">Nous pensions revenir"),
                    "{html_fr}"
                );
                assert!(!text.contains("Expected back by"), "{text}");
                assert!(
                    text.contains(&format!(
                        "We planned to be back by {shown}; it is taking longer than planned."
                    )),
                    "{text}"
                );
            } else {
                assert!(html.contains(&format!("id=\"until-line\" class=\"meta\">Expected back by <strong><time id=\"until\">{shown}</time>")), "{html}");
                assert!(
                    html.contains("id=\"overrun-line\" class=\"meta\" hidden>"),
                    "{html}"
                );
                assert!(
                    text.contains(&format!("Expected back by {shown}.")),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn the_encoded_answers_are_the_answers_encoded() {
        let pages = pages(&["en", "fr"]);
        let held = Held::new(&pages, view(None), "/_i/", SystemTime::now()).with_encodings();
        let mut html = Vec::new();
        for form in FORMS {
            // Language 2 does not exist: the first one answers, as `respond` does.
            for lang in 0..3 {
                for head in [false, true] {
                    let resp = held.respond(form, lang, head, SystemTime::now);
                    let (parts, body) = resp.into_parts();
                    let mut want = Vec::new();
                    let body = body.into_ready().unwrap();
                    crate::h1::encode(&parts, &body, head, &mut want);
                    let mut got = Vec::new();
                    held.encoded(form, lang, head).unwrap().write(&mut got);
                    assert_eq!(undated(&got), undated(&want), "{form:?} {lang} {head}");
                    if form == Form::Html && !head {
                        html.push(undated(&got));
                    }
                }
            }
        }
        assert!(
            html[0].ends_with("<p>maintenance en: Back soon</p>"),
            "{}",
            html[0]
        );
        assert!(
            html[1].ends_with("<p>maintenance fr: Back soon</p>"),
            "{}",
            html[1]
        );
        assert_eq!(html[2], html[0]);
    }

    /// While `Retry-After` counts down to an announced end, the answers written from the
    /// heads kept (`write_counting`) are those `respond` gives at the same moment, encoded:
    /// in every form and language, for GET and HEAD, as the number's width changes, in the
    /// last seconds before the end, past it (the minute shown, then the overrun, or a
    /// window's end), capped at a day; dated by the same reading of the clock.
    #[test]
    fn the_answers_counting_down_are_the_answers_encoded_at_their_moment() {
        use std::time::Duration;
        let pages = pages(&["en", "fr"]);
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        // An end on a whole minute, and one not even on a whole second: the steps of
        // `Retry-After` are not those of `Date`.
        let minute = SystemTime::UNIX_EPOCH + secs(1_800_000_000);
        let odd = minute + secs(1234) + ms(250);
        let mut seen = std::collections::BTreeSet::new();
        for (end, overrun, by_itself, mode) in [
            (minute, false, false, Mode::Maintenance),
            (odd, false, false, Mode::Maintenance),
            (minute, true, false, Mode::Maintenance),
            (odd, true, false, Mode::Maintenance),
            (minute, false, true, Mode::Maintenance),
            (odd, false, false, Mode::Outage),
        ] {
            let mut v = view(Some(end));
            (v.overrun, v.ends_by_itself, v.mode) = (overrun, by_itself, mode);
            let held = Held::new(&pages, v, "/_i/", end - secs(60)).with_encodings();
            assert!(held.encoded(Form::Html, 0, false).is_none());
            let before = [
                secs(3 * 86_400),
                secs(86_401),
                secs(86_400),
                secs(86_399) + ms(1),
                secs(86_399),
                secs(100_000) + ms(999),
                secs(600),
                secs(100),
                secs(99) + ms(500),
                secs(99),
                secs(61),
                secs(60),
                secs(59) + ms(1),
                secs(10),
                secs(9) + ms(999),
                secs(9),
                secs(2),
                secs(1),
                ms(999),
                ms(1),
                Duration::ZERO,
            ];
            let after = [ms(1), ms(500), secs(1), secs(29), secs(45), secs(3600)];
            let moments = (before.iter().map(|&d| end - d)).chain(after.iter().map(|&d| end + d));
            for at in moments {
                let retry = held.view.retry_after(at);
                seen.insert(retry);
                for form in FORMS {
                    for lang in 0..3 {
                        for head in [false, true] {
                            let case = format!("{end:?} {overrun} {by_itself} {mode:?} at {at:?}: {form:?} {lang} {head}");
                            let (parts, body) = held.respond(form, lang, head, || at).into_parts();
                            let body = body.into_ready().unwrap_or_default();
                            let mut want = Vec::new();
                            crate::h1::encode(&parts, &body, head, &mut want);
                            let mut got = Vec::new();
                            let mut out = Answers::copied(&mut got);
                            let written = held.write_counting(form, lang, head, at, b"", &mut out);
                            if form == Form::Grpc {
                                assert_eq!(written, None, "{case}");
                                assert!(got.is_empty());
                                continue;
                            }
                            assert_eq!(written, Some((parts.status, body.len())), "{case}");
                            assert_eq!(undated(&got), undated(&want), "{case}");
                            let date = format!("\r\ndate: {}\r\n", httpdate::fmt_http_date(at));
                            let text = String::from_utf8(got.clone()).unwrap();
                            assert!(text.contains(&date), "{case}: {text}");
                            assert!(text.contains(&format!("\r\nretry-after: {retry}\r\n")));
                            // Lines of its own (HSTS) go before the date, as `Encoded`'s do;
                            // the body kept where it lies is sent in its place.
                            let mut with = Vec::new();
                            let mut out = Answers::new(&mut with);
                            let extra = b"x-extra: 1\r\n";
                            held.write_counting(form, lang, head, at, extra, &mut out);
                            let mut pieces = [std::io::IoSlice::new(&[]); crate::h1::PIECES];
                            let n = out.pieces(&mut pieces);
                            let sent: Vec<u8> =
                                pieces[..n].iter().flat_map(|p| p.to_vec()).collect();
                            let added = text.replacen("\r\ndate: ", "\r\nx-extra: 1\r\ndate: ", 1);
                            assert_eq!(String::from_utf8(sent).unwrap(), added, "{case}");
                        }
                    }
                }
            }
        }
        // Every width of the number and of the event stream's delay was written.
        for want in [1, 9, 10, 99, 100, 300, 86_399, 86_400] {
            assert!(seen.contains(&want), "{want}: {seen:?}");
        }
        assert!(seen.iter().all(|&r| (1..=86_400).contains(&r)), "{seen:?}");
    }

    /// Each page says its language, so that a crawler, a translating CDN or a screen reader
    /// need not guess it; the unsuffixed page of a site whose English page is named
    /// (`pages::ANY_OTHER`) is in a language nobody named, and says none. No other form is
    /// in a language chosen for the client, and none says one.
    #[test]
    fn the_page_says_its_language_and_no_other_form_does() {
        let language = |held: &Held, form: Form, lang: usize, head: bool| {
            let resp = held.respond(form, lang, head, SystemTime::now);
            let value = resp.headers().get(header::CONTENT_LANGUAGE);
            value.map(|v| v.to_str().unwrap().to_owned())
        };
        let cases: [(&[&str], &[Option<&str>]); 2] = [
            (
                &["en", "fr", "fr-ca"],
                &[Some("en"), Some("fr"), Some("fr-ca")],
            ),
            (&["*", "en"], &[None, Some("en")]),
        ];
        for (langs, want) in cases {
            let held = Held::new(&pages(langs), view(None), "/_i/", SystemTime::now());
            for (lang, want) in want.iter().enumerate() {
                for head in [false, true] {
                    let got = language(&held, Form::Html, lang, head);
                    assert_eq!(got.as_deref(), *want, "{langs:?} {lang} head {head}");
                }
            }
            // A language there is no page of gets the first page, and says its language.
            let got = language(&held, Form::Html, langs.len(), false);
            assert_eq!(got.as_deref(), want[0]);
            for form in [Form::Grpc, Form::EventStream, Form::Text, Form::Json] {
                assert_eq!(language(&held, form, 1, false), None, "{form:?}");
            }
        }
    }

    /// The fields of an event stream as a browser reads them (HTML, "Interpreting an event
    /// stream"): `(retry, [(event type, data)])`.
    fn read_events(body: &str) -> (Option<u64>, Vec<(String, String)>) {
        let (mut retry, mut events) = (None, Vec::new());
        let (mut kind, mut data) = (String::new(), Vec::new());
        for line in body.split('\n') {
            if line.is_empty() {
                if !data.is_empty() {
                    events.push((std::mem::take(&mut kind), data.join("\n")));
                    data.clear();
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "retry" => retry = value.parse().ok(),
                "event" => kind = value.to_owned(),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
        (retry, events)
    }

    /// A held `EventSource` gets 200, its reconnection delay (the `Retry-After` of the moment,
    /// but at most a minute in maintenance and half of one in an outage), and the problem
    /// document every other client gets, as one `intermission` event on one line.
    #[test]
    fn an_event_stream_says_when_to_reconnect_and_carries_the_problem() {
        let pages = pages(&["en"]);
        let read = |held: &Held, at: SystemTime| {
            let resp = held.respond(Form::EventStream, 0, false, || at);
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
            assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
            let retry_after: u64 = resp.headers()[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body = resp.into_body().into_ready().unwrap();
            let (retry, events) = read_events(std::str::from_utf8(&body).unwrap());
            assert_eq!(events.len(), 1, "{body:?}");
            assert_eq!(events[0].0, "intermission");
            let problem: serde_json::Value = serde_json::from_str(&events[0].1).unwrap();
            assert_eq!(problem["retry_after"], retry_after);
            (retry_after, retry, problem)
        };
        let mut multiline = view(None);
        multiline.message = "Back soon\r\nreally\nsoon".into();
        let held = Held::new(&pages, multiline, "/_i/", SystemTime::now());
        let (after, retry, problem) = read(&held, SystemTime::now());
        assert_eq!((after, retry), (300, Some(60_000)));
        assert_eq!(problem["detail"], "Back soon\r\nreally\nsoon");
        assert_eq!(problem["mode"], "maintenance");

        let mut outage = view(None);
        outage.mode = Mode::Outage;
        let held = Held::new(&pages, outage.clone(), "/_i/", SystemTime::now());
        assert_eq!(read(&held, SystemTime::now()).1, Some(30_000));
        outage.retry_default = 5;
        let held = Held::new(&pages, outage, "/_i/", SystemTime::now());
        assert_eq!(read(&held, SystemTime::now()).1, Some(5_000));

        // Counting down to an announced end, the delay shrinks with it.
        let now = SystemTime::now();
        let held = Held::new(
            &pages,
            view(Some(now + std::time::Duration::from_secs(20))),
            "/_i/",
            now,
        );
        assert_eq!(read(&held, now).1, Some(20_000));
        let later = now + std::time::Duration::from_secs(15);
        assert_eq!(read(&held, later).1, Some(5_000));
        let head = held.respond(Form::EventStream, 0, true, || now);
        assert_eq!(head.headers()[header::CONTENT_TYPE], "text/event-stream");
        assert!(head.into_body().into_ready().unwrap_or_default().is_empty());
    }

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(grpc_percent_encode("Back at 10:00", 100), "Back at 10:00");
        assert_eq!(
            grpc_percent_encode("100% déjà\n", 100),
            "100%25 d%C3%A9j%C3%A0%0A"
        );
        // Cut before a character that would not fit whole, and marked as cut.
        assert_eq!(grpc_percent_encode("abé", 8), "ab%C3%A9");
        assert_eq!(grpc_percent_encode("abcdefgé", 13), "abcdefg%C3%A9");
        assert_eq!(grpc_percent_encode("abcdefgé", 12), "abc%E2%80%A6");
        assert_eq!(grpc_percent_encode("abcdefgéh", 13), "abcd%E2%80%A6");
        let long = grpc_percent_encode(&"é".repeat(2000), MAX_GRPC_MESSAGE);
        assert!(
            long.len() <= MAX_GRPC_MESSAGE && long.ends_with("%E2%80%A6"),
            "{long}"
        );
    }

    #[test]
    fn spliced_json_carries_the_number_of_the_moment() {
        let s = Spliced::new(&serde_json::json!({"a": 1, "retry_after": MARK, "z": "x"}));
        let v: serde_json::Value = serde_json::from_slice(&s.with(42)).unwrap();
        assert_eq!(v["retry_after"], 42);
        assert_eq!(v["z"], "x");
        let plain = Spliced::new(&serde_json::json!({"a": 1}));
        assert_eq!(&plain.with(5)[..], b"{\"a\":1}");
        // The digits of the mark inside a message do not move the splice point.
        let tricky = Spliced::new(
            &serde_json::json!({"detail": format!("code {MARK}"), "retry_after": MARK}),
        );
        let v: serde_json::Value = serde_json::from_slice(&tricky.with(7)).unwrap();
        assert_eq!(v["detail"], format!("code {MARK}"));
        assert_eq!(v["retry_after"], 7);
        assert_eq!(tricky.clone().fixed(9).with(1), tricky.with(9));
    }
}
