//! The one body type that flows through the proxy in both directions.
//!
//! An enum rather than a boxed trait object: forwarding a streamed body, answering with
//! pre-rendered bytes and sending nothing are the only cases, and an enum costs no allocation
//! per request. `Counted` exists only when the access log is on, so that a proxy with logging off
//! pays nothing for it.

use crate::stall::StallClock;
use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// What a body's frame can fail with: a peer's error (hyper's), a server that let its
/// response body stall past `upstream.read_timeout`, or a client that let its request body
/// stall past `proxy.body_read_timeout`.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub enum Body {
    Empty,
    /// Pre-rendered bytes; taken on first poll.
    Full(Option<Bytes>),
    /// A request body read whole that ended in trailers (an HTTP/2 client's may): its data,
    /// then its trailers. Boxed: bodies without trailers are `Full`.
    Trailed(Box<(Option<Bytes>, Option<http::HeaderMap>)>),
    /// Streamed from a peer, frames passed on as they arrive (trailers included).
    Stream(Incoming),
    /// A response streamed from an upstream connection that goes back to its pool once the
    /// body has been read whole.
    Lent(Incoming, Option<crate::forward::pool::Checkin>),
    /// A response streamed over an upstream HTTP/2 connection, holding its stream's place
    /// among those the connection may carry until the body ends or is dropped.
    Multiplexed(Incoming, Option<crate::forward::pool::OpenStream>),
    /// Counts the data bytes that pass, and reports them when the body is dropped.
    Counted(Box<Counted>),
    /// A streamed request body that says when it has been sent whole, so that the wait for
    /// the response head starts then (an upload's own time is not the upstream's delay), and
    /// fails when it stalls while the server waits for it. Boxed: only an upload pays for it.
    Watched(Box<Upload>),
    /// A server's response body that fails when it stalls longer than its limit.
    Timed(Box<Timed>),
    /// A response read from a raw upstream socket for an HTTP/2 client (`crate::relay::upstream`),
    /// whose socket goes back to its list once the body has been read whole.
    Relayed(Box<crate::relay::Relayed>),
    /// A stream of server-sent events, ended at a drain where its next event ends
    /// (`forward::events`). Boxed: only such an answer pays for it.
    Events(Box<crate::forward::events::Events>),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }

    /// A streamed body, or `Empty` when the peer sent none, so that an empty request can be
    /// sent again (a retry) and carries no framing headers.
    pub fn from_incoming(incoming: Incoming) -> Body {
        if incoming.is_end_stream() {
            Body::Empty
        } else {
            Body::Stream(incoming)
        }
    }

    /// A streamed body and the signal fired when its end has been read; `None` for a body
    /// that is already complete (no signal needed). Until the server answers, the body fails
    /// when nothing of it comes for `limit` (`proxy.body_read_timeout`, nginx's
    /// `client_body_timeout`): a client that stops mid-upload would otherwise hold its
    /// connection and the server's for as long as it likes.
    pub fn watched(
        incoming: Incoming,
        limit: Option<Duration>,
        open: Option<crate::stall::Open>,
        upload: Option<crate::park::Upload>,
    ) -> (Body, Option<SentSignal>) {
        if incoming.is_end_stream() {
            return (Body::Empty, None);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = Arc::new(AtomicU8::new(STREAMING));
        let polls = Arc::new(AtomicU32::new(0));
        let sent = Sent {
            tx,
            state: state.clone(),
            polls: polls.clone(),
            limit,
            clock: StallClock::default(),
            _open: open,
            upload,
        };
        (
            Body::Watched(Box::new(Upload {
                incoming,
                sent: Some(sent),
            })),
            Some(SentSignal { rx, state, polls }),
        )
    }

    /// The bytes of a body that is whole already (pre-rendered or empty), taken without
    /// polling and counted as sent; `None` for a streamed one.
    pub fn into_ready(self) -> Option<Bytes> {
        match self {
            Body::Empty => Some(Bytes::new()),
            Body::Full(bytes) => Some(bytes.unwrap_or_default()),
            Body::Counted(mut c) => {
                let inner = std::mem::replace(&mut c.inner, Body::Empty);
                let bytes = inner.into_ready()?;
                c.bytes += bytes.len() as u64;
                Some(bytes)
            }
            _ => None,
        }
    }

    /// `inner`, a response body from `server`, failing when no frame comes for `limit`
    /// (`upstream.read_timeout`, nginx's `proxy_read_timeout`): a server that stops mid-body
    /// would otherwise hold the client's connection and its own until the client gives up.
    /// With `resume`, an upload still under way is timed again once this answer has ended
    /// (`Resume`). A `grpc` answer that fails, or stalls, ends with `grpc-status: 14` trailers
    /// rather than a reset stream, which gRPC clients take for `INTERNAL` and do not retry:
    /// `UNAVAILABLE` is what they retry, and what the proxy says of a server it cannot reach.
    /// A gRPC-Web one, whose status is a frame of the body, ends so with that frame when it
    /// breaks off between two of its frames (`Frames`).
    pub fn timed(
        inner: Body,
        server: &Arc<str>,
        limit: Option<Duration>,
        resume: Option<Resume>,
        grpc: Grpc,
    ) -> Body {
        // A body held whole (an HTTP/2 client's small answer from the relay, `relay::upstream`)
        // can neither stall nor break: wrapped, it only cost an allocation and a poll more
        // for each such answer. With `resume`, it holds the upload's timing until it ends.
        let whole = matches!(inner, Body::Full(_)) && resume.is_none();
        if whole
            || inner.is_end_stream()
            || (limit.is_none() && resume.is_none() && grpc == Grpc::No)
        {
            return inner;
        }
        Body::Timed(Box::new(Timed {
            inner,
            server: server.clone(),
            limit,
            grpc: match grpc {
                Grpc::No => GrpcEnd::No,
                Grpc::Native => GrpcEnd::Native(Frames::new(false)),
                Grpc::Web => GrpcEnd::Web(Frames::new(false)),
                Grpc::WebText => GrpcEnd::Web(Frames::new(true)),
            },
            clock: StallClock::default(),
            _resume: resume,
            stop: None,
            stopping: false,
        }))
    }

    /// A gRPC answer (`Body::timed`) still streaming when the drain nears its end
    /// (`Drain::ending`) is ended there with `UNAVAILABLE` (native trailers, or gRPC-Web's
    /// status frame), where the next message ends, its server's stream let go: cut by the
    /// connection's close, its client saw a broken stream (tonic reported `Unknown`). Any other
    /// body is left as it is.
    pub fn end_grpc_at(&mut self, drain: &crate::shutdown::Drain) {
        if let Body::Timed(t) = self {
            if matches!(t.grpc, GrpcEnd::Native(_) | GrpcEnd::Web(_)) {
                let mut ending = drain.ending();
                t.stop = Some(Box::pin(async move { ending.fired().await }));
            }
        }
    }

    /// Whether polling the body can fail: not one held whole.
    pub fn can_break(&self) -> bool {
        !matches!(self, Body::Empty | Body::Full(_))
    }

    /// Whether the body, read whole, gives its connection back to a pool (`Lent`).
    pub fn is_lent(&self) -> bool {
        match self {
            Body::Lent(..) | Body::Relayed(_) => true,
            Body::Timed(t) => t.inner.is_lent(),
            Body::Events(e) => e.is_lent(),
            _ => false,
        }
    }

    /// `inner`, its data counted: `on_done` is told the bytes it gave, and whether it failed
    /// (its server broke off or stalled mid-body), when it is dropped.
    pub fn counted(inner: Body, on_done: Box<dyn FnOnce(u64, bool) + Send + Sync>) -> Body {
        Body::Counted(Box::new(Counted {
            inner,
            bytes: 0,
            cut: false,
            on_done: Some(on_done),
        }))
    }
}

/// Where an upload stands (`Sent::state`).
const STREAMING: u8 = 0;
const COMPLETE: u8 = 1;
const STALLED: u8 = 2;
/// The server's answer has come: the upload is not timed any more (a gRPC call whose client
/// streams slowly while the server streams back is a conversation, not a stall).
const ANSWERED: u8 = 3;
/// The client's body could not be read (a malformed chunk): a `400` of the client's making,
/// not a failure of the server.
const BROKEN: u8 = 4;
/// The client left mid-body (its connection closed or reset, its HTTP/2 stream reset): no
/// one is left to read an answer, so the request is the access log's `499`, not a `400`.
const LEFT: u8 = 5;

/// A streamed upload (`Body::Watched`) and what says how it ends.
pub struct Upload {
    incoming: Incoming,
    /// Taken once the end has been read.
    sent: Option<Sent>,
}

impl Drop for Upload {
    /// An HTTP/2 upload dropped before its end is read once more, without waiting: h2 resets
    /// a stream whose DATA breaks its `content-length` and hyper then drops the request (and
    /// with it this body, unread) as it drops one its client reset; that read tells the two
    /// apart (`UploadWatch`). A read that has nothing yet, or data, says nothing. Not for
    /// HTTP/1.1, where a read asks hyper's connection for more.
    fn drop(&mut self) {
        let Some(sent) = &self.sent else { return };
        if sent._open.is_none() || sent.state.load(Ordering::Acquire) != STREAMING {
            return;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // What came and was not read yet comes first (bounded by the stream's window, which
        // h2 holds in frames): at most a few reads more.
        for _ in 0..16 {
            match Pin::new(&mut self.incoming).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => {
                    let state = match ClientFault::of(&e) {
                        ClientFault::Left => LEFT,
                        _ => BROKEN,
                    };
                    let (done, now) = (Ordering::AcqRel, Ordering::Acquire);
                    let _ = sent.state.compare_exchange(STREAMING, state, done, now);
                    return;
                }
                Poll::Ready(None) | Poll::Pending => return,
            }
        }
    }
}

/// The sending side of "the body has been sent whole", and the clock on its pauses.
pub struct Sent {
    tx: tokio::sync::oneshot::Sender<()>,
    state: Arc<AtomicU8>,
    /// `SentSignal::polls`, written at each poll.
    polls: Arc<AtomicU32>,
    limit: Option<Duration>,
    clock: StallClock,
    /// Over HTTP/2, the upload counted as a request still in hand until its end has been
    /// read, so that an idle connection is not closed under it (`stall::Answers`).
    _open: Option<crate::stall::Open>,
    /// On a plaintext HTTP/1.1 connection, told when the end has been read, so that the
    /// connection may park before its next request (`park::Upload`).
    upload: Option<crate::park::Upload>,
}

/// Resolves when the body has been sent whole (or has failed); `complete()` and
/// `client_failure()` tell which.
pub struct SentSignal {
    pub rx: tokio::sync::oneshot::Receiver<()>,
    state: Arc<AtomicU8>,
    /// The polls of the body by the client sending it to the server, doubled, plus one when
    /// the last found nothing of the client's yet (`Sent::polled`).
    polls: Arc<AtomicU32>,
}

impl SentSignal {
    /// Whether the server has taken nothing of the body since `seen` was last read here, while
    /// the body had something for it: not one poll since, and the last one gave a frame (or
    /// none came yet), so the request waits on the server's side, its flow-control window or
    /// socket full, not on the client's (whose stall `proxy.body_read_timeout` times). Updates
    /// `seen`.
    pub fn unread_since(&self, seen: &mut u32) -> bool {
        let now = self.polls.load(Ordering::Relaxed);
        let unread = now == *seen && now & 1 == 0;
        *seen = now;
        unread
    }

    pub fn complete(&self) -> bool {
        self.state.load(Ordering::Acquire) == COMPLETE
    }

    /// How the client's own upload failed, if it did.
    pub fn client_failure(&self) -> Option<ClientFault> {
        failure(self.state.load(Ordering::Acquire))
    }

    /// Where the upload stands, for whoever outlives this signal (`UploadWatch`).
    pub fn watch(&self) -> UploadWatch {
        UploadWatch(self.state.clone())
    }

    /// The server has answered: the rest of the body is not timed while the answer streams
    /// back, and is again once the answer's body (which holds the `Resume`) has ended, so
    /// that an upload the server answered early (a 401, a 413) cannot trickle on forever.
    pub fn answered(&self) -> Answered {
        let answered =
            self.state
                .compare_exchange(STREAMING, ANSWERED, Ordering::AcqRel, Ordering::Acquire);
        match answered {
            Ok(_) => Answered::Streaming(Resume(self.state.clone())),
            Err(state) => failure(state).map_or(Answered::Whole, Answered::ClientFailed),
        }
    }
}

/// Where an upload stands, read by the gateway when hyper drops a request whose answer had
/// not come: h2 resets the stream of an upload that breaks HTTP/2's rules (its DATA at odds
/// with its `content-length`), and hyper then drops the request as it drops one its client
/// reset, so only the body's own read tells a malformed upload from a client that left.
#[derive(Clone)]
pub struct UploadWatch(Arc<AtomicU8>);

impl UploadWatch {
    /// One already known unreadable: an upload read whole before forwarding
    /// (`forward::forward` buffers a small one) that broke, which no streamed read watched.
    pub fn unreadable() -> UploadWatch {
        UploadWatch(Arc::new(AtomicU8::new(BROKEN)))
    }

    /// How the client's own upload failed, if it did.
    pub fn client_failure(&self) -> Option<ClientFault> {
        failure(self.0.load(Ordering::Acquire))
    }

    /// Whether nothing has told yet how the upload ends (read on while the server has not
    /// answered).
    pub fn undecided(&self) -> bool {
        self.0.load(Ordering::Acquire) == STREAMING
    }
}

fn failure(state: u8) -> Option<ClientFault> {
    match state {
        STALLED => Some(ClientFault::Stalled),
        BROKEN => Some(ClientFault::Unreadable),
        LEFT => Some(ClientFault::Left),
        _ => None,
    }
}

/// How a client's own upload failed: its answer, since that is no outage, and no server's
/// fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFault {
    /// Stalled past `proxy.body_read_timeout`: `408`.
    Stalled,
    /// Could not be read (a malformed chunk, an HTTP/2 stream error of its making): `400`.
    Unreadable,
    /// The client went away mid-body: counted and logged as abandoned (`499`), since nobody
    /// reads the answer.
    Left,
}

impl ClientFault {
    /// Of a request body's read error: whether the client left or sent something unreadable.
    pub fn of(e: &hyper::Error) -> ClientFault {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                if matches!(
                    io.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
                ) {
                    return ClientFault::Left;
                }
            }
            if let Some(h2) = c.downcast_ref::<h2::Error>() {
                // A stream the client reset, or its connection lost; a frame it got wrong
                // is reset by us (`is_remote` false), and stays unreadable.
                if h2.is_io() || (h2.is_remote() && (h2.is_reset() || h2.is_go_away())) {
                    return ClientFault::Left;
                }
            }
            cause = c.source();
        }
        ClientFault::Unreadable
    }

    pub fn status(self) -> StatusCode {
        match self {
            ClientFault::Stalled => StatusCode::REQUEST_TIMEOUT,
            // What a client that only half-closed its side still reads.
            ClientFault::Unreadable | ClientFault::Left => StatusCode::BAD_REQUEST,
        }
    }
}

/// Where an upload stood when the server's head came (`SentSignal::answered`).
pub enum Answered {
    /// Still coming: the answer holds the `Resume`.
    Streaming(Resume),
    /// Sent whole already: nothing is left to time.
    Whole,
    /// It had stalled or broken first: that answer is not the client's to have; it gets
    /// this fault's answer instead.
    ClientFailed(ClientFault),
}

impl Sent {
    /// Counts a poll (`SentSignal::unread_since`): one writer, the body's.
    fn polled(&self, pending: bool) {
        let n = self.polls.load(Ordering::Relaxed) >> 1;
        let n = (n.wrapping_add(1) << 1) | u32::from(pending);
        self.polls.store(n, Ordering::Relaxed);
    }

    /// Whether the upload, at a poll that `moved` or waits, has stalled past its limit;
    /// marked so unless the server has answered meanwhile. Never timed while the server's
    /// answer streams back.
    fn stalls(&mut self, cx: &mut Context<'_>, moved: bool) -> bool {
        let answered = self.state.load(Ordering::Acquire) == ANSWERED;
        let limit = self.limit.filter(|_| !answered);
        self.clock.expired(cx, moved || answered, || limit)
            && self
                .state
                .compare_exchange(STREAMING, STALLED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// Held by an answer while its upload is not timed; dropped with the answer, it times the
/// rest of the upload again.
pub struct Resume(Arc<AtomicU8>);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = self
            .0
            .compare_exchange(ANSWERED, STREAMING, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// An HTTP/2 server's answer that broke off mid-body (it reset the stream, went away, or
/// h2 reset it for sending more or less than its `content-length`), said with its causes, none
/// of them given as a `source`. hyper's server resets the client's stream with the first h2
/// reason in the chain of the error its body gave (`Error::h2_reason`, else `INTERNAL_ERROR`):
/// the server's `PROTOCOL_ERROR` reached the client as if the client had erred, and was
/// counted in `intermission_http2_client_stream_resets_total` as its malformed request.
/// Without the chain, the client's stream is reset `INTERNAL_ERROR`, the proxy's own code
/// for an answer that broke, as over an HTTP/1.1 server.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Broke(String);

impl Broke {
    /// Only on the error's path: an answer that streams pays nothing for it.
    fn hide(e: hyper::Error) -> Error {
        Box::new(Broke(crate::logging::with_causes(&e)))
    }
}

/// The error of a request body that stalled.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for {0:?} (proxy.body_read_timeout)")]
pub struct UploadStalled(pub Duration);

pub struct Timed {
    inner: Body,
    /// The server's name, for the log.
    server: Arc<str>,
    limit: Option<Duration>,
    /// For a gRPC answer: how it ends if it breaks off, and whether it has.
    grpc: GrpcEnd,
    clock: StallClock,
    _resume: Option<Resume>,
    /// For a gRPC answer: resolves as the drain nears its end (`Body::end_grpc_at`).
    stop: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>>,
    /// `stop` resolved: the answer ends at its next message boundary.
    stopping: bool,
}

/// What kind of gRPC answer a body is (`Body::timed`), for what it ends with if it breaks off.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Grpc {
    No,
    /// `application/grpc` to an HTTP/2 client: its status goes in HTTP trailers.
    Native,
    /// gRPC-Web (`application/grpc-web`, `+proto`): its status is a frame of the body.
    Web,
    /// `application/grpc-web-text`: the same frames, in base64.
    WebText,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GrpcEnd {
    No,
    /// Its frames followed for a stop (`Body::end_grpc_at`).
    Native(Frames),
    Web(Frames),
    Ended,
}

/// Where a gRPC answer stands in its frames (a flag byte, a 4-byte big-endian length, the
/// payload; for gRPC-Web, the flag's high bit marks the status frame, gRPC's PROTOCOL-WEB.md),
/// so that one that breaks off, or is still open at a stop's end, between two frames can be
/// ended with a status of the proxy's: inside a frame, it would be read as the rest of it. Counting costs nothing per
/// payload byte but in base64 (`-text`), where each byte is decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Frames {
    text: bool,
    /// Base64 characters of a quad not yet whole (`text`).
    quad: [u8; 4],
    quad_len: u8,
    /// The frame head under way, and how much of it came.
    head: [u8; 5],
    head_len: u8,
    /// Payload bytes still to come of the frame under way.
    left: u32,
    /// The frame under way is the server's status frame.
    status: bool,
    /// The server's own status frame came whole: a break after it loses nothing.
    ended: bool,
    /// Not gRPC-Web framing after all (a character outside base64): a cut is left a cut.
    lost: bool,
}

impl Frames {
    fn new(text: bool) -> Self {
        Frames {
            text,
            quad: [0; 4],
            quad_len: 0,
            head: [0; 5],
            head_len: 0,
            left: 0,
            status: false,
            ended: false,
            lost: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if self.lost || self.ended {
            return;
        }
        if !self.text {
            self.frames(data);
            return;
        }
        for &c in data {
            if !is_base64(c) && c != b'=' {
                self.lost = true;
                return;
            }
            self.quad[usize::from(self.quad_len)] = c;
            self.quad_len += 1;
            if self.quad_len == 4 {
                self.quad_len = 0;
                let Some((bytes, n)) = decode_quad(self.quad) else {
                    self.lost = true;
                    return;
                };
                self.frames(&bytes[..n]);
            }
        }
    }

    fn frames(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.left > 0 {
                let n = data.len().min(self.left as usize);
                // `n` is at most `left`, a u32.
                self.left -= n as u32;
                data = &data[n..];
                self.ended |= self.status && self.left == 0;
                continue;
            }
            let n = data.len().min(5 - usize::from(self.head_len));
            let at = usize::from(self.head_len);
            self.head[at..at + n].copy_from_slice(&data[..n]);
            // `n` is at most 5.
            self.head_len += n as u8;
            data = &data[n..];
            if self.head_len == 5 {
                self.head_len = 0;
                self.status = self.head[0] & 0x80 != 0;
                self.left =
                    u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                self.ended |= self.status && self.left == 0;
            }
        }
    }

    /// Whether the answer stands between two frames, where a frame of the proxy's can follow.
    fn between(&self) -> bool {
        !self.lost && self.quad_len == 0 && self.head_len == 0 && self.left == 0
    }

    /// The status frame that ends an answer the proxy ends: `UNAVAILABLE`, as native gRPC's
    /// trailers, with `message` (percent-encoded).
    fn unavailable(&self, message: &str) -> Bytes {
        let status = format!("grpc-status:14\r\ngrpc-message:{message}\r\n");
        let mut frame = Vec::with_capacity(5 + status.len());
        frame.push(0x80);
        // One of the constant messages below: some 70 bytes.
        frame.extend_from_slice(&(status.len() as u32).to_be_bytes());
        frame.extend_from_slice(status.as_bytes());
        if self.text {
            Bytes::from(base64_encode(&frame))
        } else {
            Bytes::from(frame)
        }
    }
}

/// gRPC-Web-text's alphabet with its padding: each piece a server flushes is padded on its own.
const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn is_base64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'+' || c == b'/'
}

/// A quad of base64 (padded with `=` at its end, as each of gRPC-Web-text's pieces may be),
/// its bytes and how many; `None` for padding out of place.
fn decode_quad(quad: [u8; 4]) -> Option<([u8; 3], usize)> {
    use base64::Engine as _;
    let mut out = [0u8; 3];
    let n = BASE64.decode_slice(quad, &mut out).ok()?;
    Some((out, n))
}

fn base64_encode(bytes: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    BASE64.encode(bytes).into_bytes()
}

/// The error of a body that stalled.
#[derive(Debug, thiserror::Error)]
#[error("the response body stalled for {0:?} (upstream.read_timeout)")]
pub struct Stalled(pub Duration);

impl Timed {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.grpc == GrpcEnd::Ended {
            return Poll::Ready(None);
        }
        if let Some(stop) = &mut self.stop {
            if stop.as_mut().poll(cx).is_ready() {
                self.stop = None;
                self.stopping = true;
            }
        }
        if self.stopping {
            if let Some(end) = self.end_at_stop() {
                return Poll::Ready(Some(Ok(end)));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (GrpcEnd::Native(frames) | GrpcEnd::Web(frames), Poll::Ready(Some(Ok(frame)))) =
            (&mut self.grpc, &polled)
        {
            if let Some(data) = frame.data_ref() {
                frames.feed(data);
            }
        }
        let failed: Error = match (polled, self.limit) {
            (Poll::Ready(Some(Err(e))), _) => e,
            (polled, Some(limit)) if self.clock.expired(cx, polled.is_ready(), || Some(limit)) => {
                let line = crate::forward::Line::CutShort;
                if let Some(more) = crate::forward::said(&[], None, line) {
                    tracing::warn!(server = %self.server, "{}; the answer is cut short{more}", Stalled(limit));
                }
                Stalled(limit).into()
            }
            (polled, _) => return polled,
        };
        let end = match self.grpc {
            GrpcEnd::No | GrpcEnd::Ended => return Poll::Ready(Some(Err(failed))),
            // Its status came: what broke is past the end of the call.
            GrpcEnd::Web(web) if web.ended => {
                self.grpc = GrpcEnd::Ended;
                return Poll::Ready(None);
            }
            GrpcEnd::Web(web) if !web.between() => return Poll::Ready(Some(Err(failed))),
            GrpcEnd::Web(web) => Some(web.unavailable(STOPPED_ANSWERING)),
            GrpcEnd::Native(_) => None,
        };
        self.grpc = GrpcEnd::Ended;
        if let Some(more) = crate::forward::said(&[], None, crate::forward::Line::BrokeOff) {
            tracing::warn!(
                server = %self.server,
                error = %crate::logging::with_causes(&*failed),
                "a gRPC answer broke off; the client is told UNAVAILABLE{more}"
            );
        }
        if let Some(frame) = end {
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        Poll::Ready(Some(Ok(unavailable_trailers(STOPPED_ANSWERING))))
    }

    /// At a stop's end (`stopping`), the frame that ends the answer where a message ends;
    /// `None` inside one, or once the server's own status came.
    fn end_at_stop(&mut self) -> Option<Frame<Bytes>> {
        let end = match self.grpc {
            GrpcEnd::Native(frames) if frames.between() => unavailable_trailers(SHUTTING_DOWN),
            GrpcEnd::Web(web) if web.between() && !web.ended => {
                Frame::data(web.unavailable(SHUTTING_DOWN))
            }
            _ => return None,
        };
        tracing::debug!(server = %self.server, "a gRPC call still open at the stop's end is told UNAVAILABLE");
        self.grpc = GrpcEnd::Ended;
        // Its server's stream is let go (reset, `CANCEL`), as a client's cancel would.
        self.inner = Body::Empty;
        Some(end)
    }
}

/// The `grpc-message` (percent-encoded) of an answer its server broke off.
const STOPPED_ANSWERING: &str = "the%20server%20stopped%20answering";
/// The `grpc-message` of a call still open as a stop ends.
const SHUTTING_DOWN: &str = "the%20proxy%20is%20shutting%20down";

/// Native gRPC's trailers for `UNAVAILABLE` with `message` (percent-encoded already).
fn unavailable_trailers(message: &'static str) -> Frame<Bytes> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
    trailers.insert("grpc-message", http::HeaderValue::from_static(message));
    Frame::trailers(trailers)
}

pub struct Counted {
    inner: Body,
    bytes: u64,
    /// The body failed: hyper then breaks the answer off (over HTTP/2, resets its stream,
    /// which drops what h2 had not sent of it yet, the head too when it had not gone).
    cut: bool,
    on_done: Option<Box<dyn FnOnce(u64, bool) + Send + Sync>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(done) = self.on_done.take() {
            done(self.bytes, self.cut);
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Trailed(held) => Poll::Ready(match held.0.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => held.1.take().map(|t| Ok(Frame::trailers(t))),
            }),
            Body::Stream(incoming) => Pin::new(incoming).poll_frame(cx).map_err(Into::into),
            Body::Watched(upload) => {
                let Upload {
                    incoming,
                    sent: done,
                } = &mut **upload;
                let polled = Pin::new(&mut *incoming).poll_frame(cx);
                if finished(&polled, incoming) {
                    if let Some(sent) = done.take() {
                        sent.state.store(COMPLETE, Ordering::Release);
                        if let Some(upload) = &sent.upload {
                            upload.ended();
                        }
                        let _ = sent.tx.send(());
                    }
                } else if let Some(sent) = done {
                    sent.polled(polled.is_pending());
                    if let Poll::Ready(Some(Err(e))) = &polled {
                        let state = match ClientFault::of(e) {
                            ClientFault::Left => LEFT,
                            _ => BROKEN,
                        };
                        let _ = sent.state.compare_exchange(
                            STREAMING,
                            state,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    } else if sent.stalls(cx, polled.is_ready()) {
                        let limit = sent.limit.unwrap_or_default();
                        return Poll::Ready(Some(Err(UploadStalled(limit).into())));
                    }
                }
                polled.map_err(Into::into)
            }
            Body::Lent(incoming, checkin) => {
                let polled = Pin::new(&mut *incoming).poll_frame(cx);
                if finished(&polled, incoming) {
                    if let Some(checkin) = checkin.take() {
                        checkin.give_back();
                    }
                }
                polled.map_err(Into::into)
            }
            Body::Multiplexed(incoming, stream) => {
                let polled = Pin::new(&mut *incoming).poll_frame(cx);
                if finished(&polled, incoming) {
                    drop(stream.take());
                }
                polled.map_err(Broke::hide)
            }
            Body::Counted(c) => {
                let polled = Pin::new(&mut c.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            c.bytes += data.len() as u64;
                        }
                    }
                    Poll::Ready(Some(Err(_))) => c.cut = true,
                    Poll::Ready(None) => {
                        if let Body::Events(e) = &c.inner {
                            c.cut |= e.broke();
                        }
                    }
                    _ => {}
                }
                polled
            }
            Body::Timed(t) => t.poll_frame(cx),
            Body::Relayed(r) => r.poll_frame(cx),
            Body::Events(e) => e.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(bytes) => bytes.is_none(),
            Body::Trailed(held) => held.0.is_none() && held.1.is_none(),
            Body::Watched(upload) => upload.incoming.is_end_stream(),
            Body::Stream(incoming) | Body::Lent(incoming, _) | Body::Multiplexed(incoming, _) => {
                incoming.is_end_stream()
            }
            Body::Counted(c) => c.inner.is_end_stream(),
            Body::Timed(t) => t.grpc == GrpcEnd::Ended || t.inner.is_end_stream(),
            Body::Relayed(r) => r.is_end_stream(),
            Body::Events(e) => e.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Trailed(held) => {
                SizeHint::with_exact(held.0.as_ref().map_or(0, |b| b.len() as u64))
            }
            Body::Watched(upload) => upload.incoming.size_hint(),
            Body::Stream(incoming) | Body::Lent(incoming, _) | Body::Multiplexed(incoming, _) => {
                incoming.size_hint()
            }
            Body::Counted(c) => c.inner.size_hint(),
            Body::Timed(t) => t.inner.size_hint(),
            Body::Relayed(r) => r.size_hint(),
            Body::Events(e) => e.size_hint(),
        }
    }
}

/// Whether `polled` ended the body: its end, its trailers (nothing follows them, and hyper
/// stops polling a body once it has them), or its last data (hyper knows a body of known
/// length has ended with its last frame, before the next poll).
fn finished(
    polled: &Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
    incoming: &Incoming,
) -> bool {
    match polled {
        Poll::Ready(None) => true,
        Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || incoming.is_end_stream(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body held whole is passed on as it is: it cannot stall nor break, and a `Timed` box
    /// around it was an allocation and a poll more for each of an HTTP/2 client's small
    /// answers. One that holds an upload's timing (`Resume`) is still wrapped.
    #[test]
    fn a_whole_body_is_not_timed() {
        let server: Arc<str> = Arc::from("http://127.0.0.1:9");
        let limit = Some(Duration::from_secs(1));
        for grpc in [Grpc::No, Grpc::Native, Grpc::Web, Grpc::WebText] {
            let body = Body::timed(Body::full("whole"), &server, limit, None, grpc);
            assert!(matches!(body, Body::Full(Some(_))), "grpc {grpc:?}");
            assert!(!body.can_break());
        }
        let resume = Resume(Arc::new(AtomicU8::new(ANSWERED)));
        let body = Body::timed(Body::full("whole"), &server, limit, Some(resume), Grpc::No);
        assert!(matches!(body, Body::Timed(_)));
    }

    /// A gRPC-Web answer is followed frame by frame however its pieces split it, in base64
    /// too (each piece padded on its own, as servers flush them): only between two frames may
    /// a status frame of the proxy's follow, and none once the server's own came.
    #[test]
    fn grpc_web_frames_are_followed_across_any_split() {
        let message = b"\0\0\0\0\x03abc";
        let status = b"\x80\0\0\0\x0fgrpc-status:0\r\n";
        for text in [false, true] {
            let enc = |b: &[u8]| if text { base64_encode(b) } else { b.to_vec() };
            let whole = enc(message);
            for cut in 0..=whole.len() {
                let mut web = Frames::new(text);
                web.feed(&whole[..cut]);
                let edge = cut == 0 || cut == whole.len();
                assert_eq!(web.between(), edge, "text {text}, cut at {cut}");
                web.feed(&whole[cut..]);
                assert!(web.between() && !web.ended, "text {text}, cut at {cut}");
            }
            let mut web = Frames::new(text);
            for b in [enc(message), enc(message), enc(status)].concat() {
                assert!(!web.ended);
                web.feed(&[b]);
            }
            assert!(web.ended, "text {text}");
        }
        let mut web = Frames::new(true);
        web.feed(b"AA AA");
        assert!(!web.between(), "not base64: lost");
        // The frame added decodes to the status it says.
        let frame = Frames::new(true).unavailable(STOPPED_ANSWERING);
        let mut web = Frames::new(true);
        web.feed(&frame);
        assert!(web.ended);
        let frame = Frames::new(false).unavailable(STOPPED_ANSWERING);
        assert_eq!(frame[0], 0x80);
        assert_eq!(usize::from(frame[4]) + 5, frame.len());
        assert!(frame.ends_with(b"grpc-message:the%20server%20stopped%20answering\r\n"));
    }
}
