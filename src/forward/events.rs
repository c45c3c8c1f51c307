//! A forwarded stream of server-sent events (`Content-Type: text/event-stream`), ended at a
//! drain where its next event ends, as a WebSocket is closed at its next frame boundary
//! (`websocket`).
//!
//! Such a stream never ends by itself: a page's live updates stay open for as long as the
//! page. A drain waited for it the whole of `shutdown_timeout`, then cut it mid-body: every
//! stop with such a page open took that long, and its client saw a broken answer (curl exits
//! 18). Once a drain begins, the stream is ended properly (chunked: its last chunk; HTTP/2:
//! `END_STREAM`; read until the close: the close) at the first point where no event is in
//! flight, at once when it idles between events: the browser's `EventSource` then reconnects,
//! with its `Last-Event-ID`, to the instance that takes over. An event is whole at a blank
//! line, whichever of the line ends the format allows (`\n`, `\r`, `\r\n`; WHATWG HTML,
//! "Server-sent events", §9.2.5) make it. One that never ends is cut at `shutdown_timeout`,
//! as before. An answer framed by a `Content-Length` is left alone: ended early, it would be
//! shorter than it said, which its client reads as broken; and so is a compressed one
//! (`text_coding`), whose bytes show no event's end.
//!
//! Only such an answer pays anything: its type is looked at once, at its head, and every
//! other answer's body passes as it did. An event stream's bytes are looked at from their
//! end only (the state after a piece depends on its last line ends alone), but for the piece
//! under way once the drain has begun.

use crate::body::{Body, Error};
use crate::shutdown::Drain;
use bytes::Bytes;
use http::{header, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

const EVENT_STREAM: &[u8] = b"text/event-stream";

/// Whether a `Content-Type` value names `text/event-stream`: in any case, its parameters
/// (`; charset=utf-8`) aside, blanks around it allowed (RFC 9110 §8.3.1).
pub fn is_event_stream(value: &[u8]) -> bool {
    let value = value.trim_ascii_start();
    value
        .get(..EVENT_STREAM.len())
        .is_some_and(|t| t.eq_ignore_ascii_case(EVENT_STREAM))
        && match value[EVENT_STREAM.len()..].trim_ascii_start() {
            [] => true,
            rest => rest[0] == b';',
        }
}

/// Whether a body whose `Content-Encoding` (or transfer coding) is `value` is still the
/// events' own text: no coding but `identity` or `also` (`chunked`, for a transfer coding,
/// which the relay decodes). A compressed stream (`gzip`, `br`: compression middleware that
/// flushes each event) has no line ends to read: its bytes matched a blank line now and
/// then, and the stream was cut there, inside its compressed data, where its client's decoder
/// failed; or never, and the drain waited all the same. Left alone, it is cut at
/// `shutdown_timeout`, as one framed by its length.
pub fn text_coding(value: &[u8], also: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .all(|c| {
            c.is_empty() || c.eq_ignore_ascii_case(b"identity") || c.eq_ignore_ascii_case(also)
        })
}

/// Where an event stream stands: between events, or in one.
#[derive(Debug, Clone, Copy)]
pub struct Boundary {
    /// At the start of a line: the next line end ends an empty line, which ends the event.
    line_start: bool,
    /// The last byte was a CR: an LF right after it is the same line end.
    cr: bool,
    /// No event is in flight.
    between: bool,
}

impl Default for Boundary {
    fn default() -> Self {
        Boundary {
            line_start: true,
            cr: false,
            between: true,
        }
    }
}

impl Boundary {
    /// No event is in flight: the stream may end here.
    pub fn between(&self) -> bool {
        self.between
    }

    fn step(&mut self, b: u8) {
        match b {
            b'\n' if self.cr => self.cr = false,
            b'\r' | b'\n' => {
                self.between |= self.line_start;
                self.line_start = true;
                self.cr = b == b'\r';
            }
            _ => {
                *self = Boundary {
                    line_start: false,
                    cr: false,
                    between: false,
                }
            }
        }
    }

    /// Moves past `data`. Only its last line ends are read: whatever came before the last
    /// byte that is none, that byte puts the stream inside a line.
    pub fn follow(&mut self, data: &[u8]) {
        let tail = match data.iter().rposition(|&b| b != b'\r' && b != b'\n') {
            Some(last) => {
                self.step(data[last]);
                &data[last + 1..]
            }
            None => data,
        };
        for &b in tail {
            self.step(b);
        }
    }

    /// Moves past `data` up to where its first event ends (with the LF of a CRLF that ends
    /// it, when there): how far that is, or `None`, and all of it passed, when no event
    /// ends in it.
    pub fn cut(&mut self, data: &[u8]) -> Option<usize> {
        for (i, &b) in data.iter().enumerate() {
            let was = self.between;
            self.step(b);
            if self.between && !was {
                let crlf = self.cr && data.get(i + 1) == Some(&b'\n');
                if crlf {
                    self.cr = false;
                }
                return Some(i + 1 + usize::from(crlf));
            }
        }
        None
    }
}

/// An event stream's answer, ended at a drain at its next event boundary (the module's
/// docs), or at once when the stream has no event in flight; with `None`, no drain can come
/// (a connection no listener serves), and it is passed on as it is. Any other answer, and
/// one framed by its `Content-Length` or with no body, is passed on as it is.
pub fn at_drain(resp: Response<Body>, drain: Option<&Drain>) -> Response<Body> {
    let Some(drain) = drain else {
        return resp;
    };
    let events = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| is_event_stream(t.as_bytes()));
    if !events || resp.headers().contains_key(header::CONTENT_LENGTH) || resp.body().is_end_stream()
    {
        return resp;
    }
    // Asked of an event stream alone. A transfer coding besides `chunked`, which no server
    // sends a browser's stream, cannot be told here: its header is gone (hop-by-hop).
    let coded = resp
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !text_coding(v.as_bytes(), b""));
    if coded {
        return resp;
    }
    // Within the connection, which holds its guard: only watched, not counted again.
    let mut guard = drain.watch();
    resp.map(|inner| {
        Body::Events(Box::new(Events {
            inner,
            drain: Some(Box::pin(async move { guard.fired().await })),
            boundary: Boundary::default(),
            ended: false,
            broke: false,
        }))
    })
}

/// The body of an event stream's answer, ended at a drain (`at_drain`).
pub struct Events {
    inner: Body,
    /// Resolves when the drain begins; `None` once it has.
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    boundary: Boundary,
    ended: bool,
    /// Ended so because its server broke off: the access log still says `cut`.
    broke: bool,
}

impl Events {
    /// Ends the body: the server's answer, unread, is let go (its connection closed).
    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.ended = true;
        self.inner = Body::Empty;
        Poll::Ready(None)
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(drain) = &mut self.drain {
            if drain.as_mut().poll(cx).is_ready() {
                self.drain = None;
            }
        }
        let draining = self.drain.is_none();
        if draining && self.boundary.between() {
            return self.end();
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let frame = match polled {
            Poll::Ready(Some(Ok(frame))) => frame,
            // The server broke off (its connection reset or closed mid-body, or silent for
            // `upstream.read_timeout`) between two events: nothing of an event is lost, so the
            // stream ends properly, as a drain ends it, and the client's `EventSource`
            // reconnects as after any end. Passed on, the error cut the answer (curl exits 18,
            // an HTTP/2 stream reset), which an SSE library other than a browser's reports as
            // a failure. Broken off mid-event, it is still cut: the client must not take the
            // part it got for a whole event.
            Poll::Ready(Some(Err(e))) if self.boundary.between() => {
                tracing::debug!(error = %e, "an event stream's server broke off between events; ended it there");
                self.broke = true;
                return self.end();
            }
            polled => return polled,
        };
        let frame = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => return Poll::Ready(Some(Ok(frame))),
        };
        if !draining {
            self.boundary.follow(&frame);
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        match self.boundary.cut(&frame) {
            Some(n) => {
                // The event's end is the stream's: nothing after it is passed on.
                self.ended = true;
                self.inner = Body::Empty;
                Poll::Ready(Some(Ok(Frame::data(frame.slice(..n)))))
            }
            None => Poll::Ready(Some(Ok(Frame::data(frame)))),
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.ended {
            true => SizeHint::with_exact(0),
            // Its length unknown: it may end early.
            false => SizeHint::default(),
        }
    }

    pub fn is_lent(&self) -> bool {
        self.inner.is_lent()
    }

    /// Whether it ended where its server broke off.
    pub fn broke(&self) -> bool {
        self.broke
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_stream_type_is_told_in_any_case_and_with_parameters() {
        for yes in [
            "text/event-stream",
            "Text/Event-Stream",
            "TEXT/EVENT-STREAM;charset=utf-8",
            "text/event-stream; charset=utf-8",
            " text/event-stream ",
            "text/event-stream ;charset=utf-8",
        ] {
            assert!(is_event_stream(yes.as_bytes()), "{yes:?}");
        }
        for no in [
            "",
            "text/event",
            "text/event-streams",
            "text/event-stream2",
            "text/plain",
            "application/text/event-stream",
            "text/event-stream,text/plain",
        ] {
            assert!(!is_event_stream(no.as_bytes()), "{no:?}");
        }
    }

    /// A compressed event stream is not read for event boundaries: its bytes are no text.
    #[test]
    fn only_an_uncoded_event_stream_is_ended_at_a_drain() {
        let drain = Drain::default();
        let answer = |coding: Option<&str>| {
            let mut resp = Response::new(Body::Full(Some(Bytes::from_static(b"\x1f\x8b\n\n"))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            if let Some(coding) = coding {
                resp.headers_mut().append(
                    header::CONTENT_ENCODING,
                    http::HeaderValue::from_str(coding).unwrap(),
                );
            }
            matches!(at_drain(resp, Some(&drain)).body(), Body::Events(_))
        };
        assert!(answer(None));
        assert!(answer(Some("identity")));
        assert!(answer(Some("")));
        for coded in ["gzip", "br", "identity, gzip", "GZIP", "deflate"] {
            assert!(!answer(Some(coded)), "{coded}");
        }
        assert!(text_coding(b"chunked", b"chunked"));
        assert!(text_coding(b" identity , Chunked", b"chunked"));
        assert!(!text_coding(b"gzip, chunked", b"chunked"));
        assert!(!text_coding(b"chunked", b""));
    }

    /// A stream watches the drain from within its connection, which the drain counts and
    /// waits for already: it is not counted again (the log's `connections=` said 2 for one
    /// client), and it still ends once the drain begins.
    #[tokio::test]
    async fn a_stream_watches_the_drain_without_counting_as_a_connection() {
        let drain = Drain::default();
        let mut resp = Response::new(Body::Full(Some(Bytes::from_static(b"data: a\n\n"))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        let mut body = at_drain(resp, Some(&drain)).into_body();
        assert!(matches!(body, Body::Events(_)));
        assert_eq!(drain.count(), 0, "a stream is no connection of its own");
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let first = first.map(|f| f.ok().and_then(|f| f.into_data().ok()));
        assert_eq!(first, Some(Some(Bytes::from_static(b"data: a\n\n"))));
        drain.begin();
        let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(end.is_none(), "not ended at the drain");
    }

    /// Where the events of `stream` end, fed in pieces of `step` bytes, with `cut`.
    fn ends(stream: &[u8], step: usize) -> Vec<usize> {
        let mut found = Vec::new();
        let mut b = Boundary::default();
        let mut at = 0;
        for piece in stream.chunks(step) {
            let mut rest = piece;
            let mut base = at;
            while let Some(n) = b.cut(rest) {
                found.push(base + n);
                rest = &rest[n..];
                base += n;
            }
            at += piece.len();
        }
        found
    }

    #[test]
    fn an_event_ends_at_a_blank_line_of_any_line_end() {
        let lf = b"data: a\n\ndata: b\nid: 2\n\n";
        let crlf = b"data: a\r\n\r\ndata: b\r\nid: 2\r\n\r\n";
        let cr = b"data: a\r\rdata: b\rid: 2\r\r";
        let mixed = b"data: a\r\n\ndata: b\n\r\n:comment\r\r";
        // Where a CRLF ends the event, the cut comes after its LF when the same piece has
        // it, after its CR when not: either ends the event for the client.
        let within = |got: Vec<usize>, want: &[(usize, usize)]| {
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(g, (lo, hi))| (lo..=hi).contains(&g))
        };
        for step in [1, 2, 3, 5, 100] {
            assert_eq!(ends(lf, step), [9, 24], "{step}");
            assert!(within(ends(crlf, step), &[(10, 11), (28, 29)]), "{step}");
            assert_eq!(ends(cr, step), [9, 24], "{step}");
            assert!(
                within(ends(mixed, step), &[(10, 10), (19, 20), (30, 30)]),
                "{step}"
            );
        }
        assert_eq!(ends(crlf, 100), [11, 29]);
        // A CRLF split between pieces: the CR ends the event; the LF after it is its line
        // end's, not an empty line of its own.
        let mut b = Boundary::default();
        assert_eq!(b.cut(b"data: a\r\n\r"), Some(10));
        assert!(b.between());
        assert_eq!(b.cut(b"\ndata: b\r\n"), None);
        assert!(!b.between());
    }

    /// `follow`, which reads a piece from its end, leaves the stream where `cut` byte by byte
    /// does.
    #[test]
    fn following_from_the_end_agrees_with_reading_every_byte() {
        let pieces: [&[u8]; 12] = [
            b"data: a",
            b"\n",
            b"\n",
            b"\r",
            b"\n",
            b"data: b\r",
            b"\n\r",
            b"\n",
            b"\r\r",
            b"x\n\n\r\nid",
            b"",
            b":\r",
        ];
        let mut fast = Boundary::default();
        let mut slow = Boundary::default();
        for piece in pieces {
            fast.follow(piece);
            for &byte in piece {
                slow.step(byte);
            }
            assert_eq!(fast.between, slow.between, "{piece:?}");
            assert_eq!(fast.line_start, slow.line_start, "{piece:?}");
            assert_eq!(fast.cr, slow.cr, "{piece:?}");
        }
    }
}
