//! Forwarding plain HTTP/1.1 exchanges without hyper: on a keep-alive connection, plaintext or
//! TLS (`Client`), a `GET`, `HEAD`, `POST`, `PUT`, `PATCH`, `DELETE` or `OPTIONS` with no body,
//! or with a `Content-Length` body whole in what one read holds, is checked and rewritten from
//! its own bytes, written with its body to a kept upstream socket (a TLS session to an
//! `https://` server, `RawStream`), and the answer's head is rewritten and written back with
//! its body, all in the connection's own task.
//!
//! Two general-purpose hyper connections joined by channels cost some 33,600 user-space
//! instructions per forwarded request, where nginx spends 18,700 and a relay with no features
//! 5,500 (README, "Performance"): parsing into header maps, encoding them again, the dispatch
//! between the request's task and the upstream connection's. Here a request's head is parsed
//! once with httparse (as hyper does) and copied with its hop-by-hop and `X-Forwarded-*`
//! lines rewritten; the answer's head likewise.
//!
//! What is taken is decided before anything is sent (`prepare`); everything else goes to
//! hyper with the bytes read so far, as `fast` does for held requests: another method, a
//! chunked body, a body larger than a read or a `Content-Length` in another form than plain
//! digits, `Upgrade`, `Expect`, `TE`, a gRPC-Web call (`Body::timed`), a `Connection`
//! other than `keep-alive`, no `Host` or several, HTTP/1.0, an incomplete, oversized or malformed head, a reserved path, a held
//! request (but a plain one, answered here from its encoding as a parked connection answers
//! it, `fast::held`), `intercept_statuses`, `redirect_https` on plaintext, an `h2c://` server or
//! an `https://` one not known to choose HTTP/1.1 (each is asked once, before the first request
//! taken, `UpstreamPool::learn`: one that chooses HTTP/2 stays hyper's), and every request once
//! a drain has begun. So hyper still answers every error to a client, but for a head it would
//! refuse before reading a request (malformed, or too large: `judge`), which is answered here,
//! with words, where hyper's answer has none (`refuse`); one still arriving is read on first
//! (over TLS `read_long`, on plaintext `park::head_wait`). The access log line is written here
//! as hyper's path writes it (`logging::AccessLine`).
//!
//! Once the request is sent, the answer cannot go to hyper, so every way an HTTP/1.1 server
//! answers is handled here as hyper's client and server would together: 1xx answers skipped, no
//! body for 204 and 304, nor for any answer to a `HEAD` (its `Content-Length` passed on when it
//! is one number, as one line, none beside a coding or on a 204, no coding added, `read_head`), a
//! body of `Content-Length` (a small answer written in one piece once it is whole, up to its
//! deadline), chunked (passed through as it comes, its end found by `Chunked`, which holds
//! trailers and extensions to hyper's client's limits), or until the server closes (sent on
//! chunked, so that the client's connection stays open); a stream of server-sent events, either
//! way, is framed again piece by piece, so that a drain can end it where an event ends
//! (`events`, `forward::events`). A failure before the
//! answer's head is reported to the server's checker, tried once more on another server when
//! the method is idempotent, and otherwise answered with the outage response; a failure after
//! it closes the client's connection, as hyper does when a body breaks. A client that closes
//! its connection before its answer is whole has its request given up, as hyper's server gives
//! it up (`wait`). Header names keep the case the peer gave them (hyper's would be lowercase).
//!
//! To an `https://` server the exchange is the same over a TLS session: the request is flushed
//! out of rustls once written (`send`), any failure before the answer's head on a kept session
//! counts as the server's close, as on hyper's path (`fetch`), and a kept session is read
//! through rustls while it idles, so that a ticket or `KeyUpdate` is no stray byte and a
//! `close_notify` a close (`RawStream`).
//!
//! An HTTP/2 client's request, which hyper's server reads, uses the upstream half alone
//! (`upstream`): `encode` writes it as hyper's client would write it once `forward::forward`
//! had rewritten its map, but straight from the fields hyper's server read (`forward::Hop`),
//! on the same kept sockets, and the answer's head goes back to hyper's
//! server as the map hyper's client would have read (`headers_into`), its body read from the
//! socket (`Relayed`). hyper's HTTP/1.1 client cost some 5,000 instructions per request
//! reading the answer into its map, and its dispatch between tasks more.

use crate::config::Upstream;
use crate::forward::pool::{RawSocket, RawStream, SendError, UpstreamPool};
use crate::forward::{self, UpstreamError};
use crate::gateway::{self, Conn};
use crate::h1;
use crate::metrics::Outcome;
use crate::shutdown::{Drain, Shutdown};
use crate::stall;
use crate::state::marks;
use crate::state::{Snapshot, StateHandle};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::ErrorKind;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;

/// What is read from the client at once, and the largest head taken here: the smallest
/// `proxy.max_header_bytes`, so that a head hyper would refuse as too large never is.
const READ_BUF: usize = 8192;

/// Request headers taken here; more, and hyper reads the request.
const MAX_HEADERS: usize = 64;

/// Headers in an answer, and the size of its head, beyond which it is refused as hyper's
/// client refuses it (100 headers; `MAX_RESPONSE_HEAD`).
const UPSTREAM_HEADERS: usize = 100;
const MAX_UPSTREAM_HEAD: usize = crate::forward::pool::MAX_RESPONSE_HEAD;

/// Why an answer whose head is over `MAX_UPSTREAM_HEAD` is refused. Like every failure after
/// the server took the connection, it does not count against the server
/// (`forward::inconclusive`).
const HEAD_TOO_LARGE: &str = "the response head is too large";

/// Room for reading an answer: its head and, for small answers, its whole body.
const COPY_BUF: usize = 16 * 1024;

/// The most a large body's reads grow to (`next_piece`).
const MAX_COPY_BUF: usize = 256 * 1024;

/// The largest answer, head and body, held until whole and written at once (`respond`).
const WHOLE_ANSWER: u64 = COPY_BUF as u64;

/// A client connection served here: a plaintext socket, or TLS over one (HTTP/1.1 by ALPN),
/// whose records rustls opens and seals around the same work.
pub trait Client: AsyncRead + AsyncWrite + Unpin {
    /// Whether a write may stay in the stream until flushed (TLS seals records in a buffer of
    /// its own when the socket is full); a plaintext socket's write is the system call.
    const BUFFERED: bool;

    /// Whether it is TLS: only then do answers carry `Strict-Transport-Security` (RFC 6797
    /// §7.2), decided by the type, so that a plaintext connection does not even ask.
    const TLS: bool;

    /// Whether the client has ended its side (`Ready(true)`), or sent more (`Ready(false)`),
    /// while an answer is on its way; nothing is consumed. Over TLS the session is asked, not
    /// the socket: a `close_notify` ends it as hyper reads it, and a pipelined request may
    /// wait opened in the session with nothing left in the socket.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<bool>;

    /// Whether a read may find something now. A plaintext socket's readiness, so that a
    /// connection takes a buffer set only once there is something to read into it; always for
    /// TLS, whose opened bytes may wait in the session when the socket has nothing.
    fn readable(&self, cx: &mut Context<'_>) -> bool;

    /// A read that does not wait: `WouldBlock` when nothing has arrived.
    fn read_now(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> std::io::Result<usize>;

    /// Sends what the stream queued of its own accord while it read and found nothing for
    /// the caller: over TLS, the alert that refuses a TLS 1.2 client's renegotiation, or the
    /// `KeyUpdate` a TLS 1.3 one asked for. tokio-rustls writes only when written to or
    /// flushed, and a connection waiting for its next request writes nothing: a client that
    /// renegotiated waited `header_read_timeout` for its answer, the close.
    fn poll_send_queued(&mut self, cx: &mut Context<'_>);
}

/// A plaintext client socket, and whether the waker of the task that serves it is known to
/// be stored for its read side (`waiting`), so that the wait for the next request need not
/// store it again: tokio stores it under the socket's waiters' lock, which the watch on the
/// client's end (`poll_gone`) took already while the answer was on its way.
///
/// Why that holds: `waiting` is set only when the watch's last look stored the waker and found
/// nothing to read (its peek returned `Pending` with coop budget left; without budget, tokio
/// returns `Pending` before storing it). tokio takes the waker from that slot only to wake the
/// task for an event that sets the readiness first, and the readiness is cleared only by this
/// socket's reads and peeks: every read here clears `waiting`, and every peek sets it anew. So
/// while `waiting` holds, either the readiness is set, which a look at it reads without the lock,
/// or the waker is in its slot, and the task is woken when something comes.
pub struct Plain<'a> {
    sock: &'a mut TcpStream,
    waiting: bool,
}

impl<'a> Plain<'a> {
    pub fn new(sock: &'a mut TcpStream) -> Self {
        Plain {
            sock,
            waiting: false,
        }
    }
}

impl AsyncRead for Plain<'_> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.waiting = false;
        Pin::new(&mut *this.sock).poll_read(cx, buf)
    }
}

impl AsyncWrite for Plain<'_> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let sock = &mut *self.get_mut().sock;
        crate::forward::pool::write_first(sock, cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.get_mut().sock).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().sock).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().sock).poll_shutdown(cx)
    }
}

impl Client for Plain<'_> {
    const BUFFERED: bool = false;
    const TLS: bool = false;

    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut byte = [MaybeUninit::uninit()];
        let peeked = self.sock.poll_peek(cx, &mut ReadBuf::uninit(&mut byte));
        self.waiting = peeked.is_pending() && tokio::task::coop::has_budget_remaining();
        peeked.map(|peeked| matches!(peeked, Ok(0) | Err(_)))
    }

    fn readable(&self, cx: &mut Context<'_>) -> bool {
        match self.waiting {
            // The readiness alone, one load: the waker is in its slot (`Plain`).
            true => self
                .sock
                .try_io(tokio::io::Interest::READABLE, || Ok(()))
                .is_ok(),
            false => self.sock.poll_read_ready(cx).is_ready(),
        }
    }

    fn read_now(&mut self, _: &mut Context<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
        self.waiting = false;
        self.sock.try_read(buf)
    }

    #[inline]
    fn poll_send_queued(&mut self, _: &mut Context<'_>) {}
}

impl Client for TlsStream<stall::Timed<TcpStream>> {
    const BUFFERED: bool = true;
    const TLS: bool = true;

    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        use tokio::io::AsyncBufRead;
        Pin::new(self)
            .poll_fill_buf(cx)
            .map(|filled| filled.map_or(true, |bytes| bytes.is_empty()))
    }

    fn readable(&self, _: &mut Context<'_>) -> bool {
        true
    }

    fn read_now(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut room = ReadBuf::new(buf);
        match Pin::new(self).poll_read(cx, &mut room) {
            Poll::Ready(read) => read.map(|()| room.filled().len()),
            Poll::Pending => Err(ErrorKind::WouldBlock.into()),
        }
    }

    fn poll_send_queued(&mut self, cx: &mut Context<'_>) {
        if self.get_ref().1.wants_write() {
            // A failure or a full socket is the next read's or write's to meet.
            let _ = Pin::new(self).poll_flush(cx);
        }
    }
}

/// Writes `out` whole to the client, and flushes what the stream kept (`Client::BUFFERED`);
/// whether it went. A client that takes none of it for `proxy.send_timeout` is given up: timed
/// here on a plaintext socket, beneath the session over TLS (`stall::Timed`).
async fn put<C: Client>(sock: &mut C, out: &[u8], snap: &Snapshot) -> bool {
    let limit = match C::BUFFERED {
        true => None,
        false => snap.config.proxy.send_timeout,
    };
    match stall::write_all(sock, out, C::BUFFERED, limit).await {
        Ok(()) => true,
        Err(e) => {
            if stall::is_timed_out(&e) {
                tracing::debug!("{e}; the connection is closed");
            }
            false
        }
    }
}

/// What a connection does once it idles between requests.
pub enum Linger<'a> {
    /// Waits `park::GRACE`, then parks (`After::Park`): a plaintext connection.
    Park,
    /// Waits for its next request up to this long (`header_read_timeout`), then closes, as
    /// hyper would; at once when the drain (`guard`) starts, or when it is picked to make
    /// room for a new connection while it waits with nothing begun. A TLS connection, whose
    /// session state is too large to park.
    Close(Duration, &'a mut Shutdown, &'a crate::listener::Closable),
}

/// Writes `data[piece]`, a piece of a body, as `put` does. A client that cannot take it all
/// at once may have stopped reading: what it has not taken is then kept in a buffer of its
/// own size, and `data` and `spent` (the answer's other buffer, whose bytes are in `data` or
/// written) are let go, so that a client that stalls holds the rest of one piece rather than
/// buffers grown to `MAX_COPY_BUF`. The next read starts at `COPY_BUF` again.
async fn put_piece<C: Client>(
    sock: &mut C,
    data: &mut Vec<u8>,
    piece: std::ops::Range<usize>,
    spent: &mut Vec<u8>,
    snap: &Snapshot,
) -> bool {
    let mut at = piece.start;
    let tried = poll_fn(|cx| {
        while at < piece.end {
            match Pin::new(&mut *sock).poll_write(cx, &data[at..piece.end]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => at += n,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Pending => return Poll::Ready(Ok(true)),
            }
        }
        Poll::Ready(Ok(false))
    })
    .await;
    match tried {
        Err(()) => false,
        Ok(true) if data.capacity() > COPY_BUF || spent.capacity() > COPY_BUF => {
            let rest = data[at..piece.end].to_vec();
            *data = Vec::new();
            *spent = Vec::new();
            put(sock, &rest, snap).await
        }
        // All of it written, on a socket that keeps nothing back: nothing left to do, where
        // `put` would set up a write of nothing.
        Ok(false) if !C::BUFFERED => true,
        // The rest of a piece that waits with buffers still small, or none when all was
        // written: `put` then only flushes what TLS keeps sealed.
        Ok(_) => put(sock, &data[at..piece.end], snap).await,
    }
}

/// What became of a connection when the relay let it go.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// A request is for hyper: its bytes, and what followed them, are in `first`.
    Hyper,
    /// The first head on a connection that parks (`Linger::Park`) has begun and its rest has
    /// not come: its bytes are in `first`, and the connection waits for the rest without
    /// hyper (`park::stalled`). Never with `Linger::Close`.
    Stalled,
    /// Idle for `park::GRACE`: park it. With `Linger::Close`, idle for its time: close it.
    Park,
    /// Closed: by the client, or at the end of its keep-alive or by a drain (over TLS, with
    /// `close_notify`).
    Close,
    /// A head hyper would have refused (`400`, `414`, `431`) was answered so here (`refuse`):
    /// to close as after any last answer, what the client still sends read and thrown away
    /// (`shutdown::linger`), so that its close does not reset the answer away.
    Refused,
    /// Broken off: an answer cut short, or a client gone while it waited. Dropped, as hyper
    /// drops a connection whose body failed (over TLS, without `close_notify`, which would
    /// tell the client that all was sent).
    Broken,
}

/// What the connection does after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Keep,
    /// Closes cleanly: a drain began.
    Close,
    /// Broken off (`After::Broken`).
    Broken,
}

impl Next {
    /// After an answer was written (`sent`), or not, with the connection `closing` or not.
    fn after(sent: bool, closing: bool) -> Next {
        match (sent, closing) {
            (false, _) => Next::Broken,
            (true, true) => Next::Close,
            (true, false) => Next::Keep,
        }
    }
}

/// One connection's buffers, held while it has a request to answer (`Some`). Dropped or
/// released, they go back to this thread's spares (`SPARE`) for the next request served
/// here, whichever way the request ended. Boxed: a set is some 220 bytes, which moving into
/// and out of the spares, and resetting in their place, cost about 100 instructions a
/// forwarded request; a box moves as a pointer. Allocated once per set, which the spares keep.
#[derive(Default)]
struct Buffers(Option<Box<Set>>);

#[derive(Default)]
struct Set {
    /// What the client sent that is not answered yet: `input[..have]`.
    input: Box<[u8]>,
    have: usize,
    /// The request as the upstream gets it.
    request: Vec<u8>,
    /// What is read from the upstream.
    answer: Vec<u8>,
    /// What is written to the client.
    out: Vec<u8>,
    /// For an HTTP/2 client's request (`upstream`), the answer's headers, read into a map for
    /// hyper's server instead of written to `out`; `None` for the relay's own.
    map: Option<http::HeaderMap>,
    /// With `map`, the answer's head copied once, and its body when whole in it: the map's
    /// values and the body are slices of it (`read_head`).
    whole: Bytes,
}

/// The most a thread keeps in buffer sets for its next requests: as many sets as it has
/// requests in flight at once under load, within reason. A set for small answers is about
/// 25 KiB, so this is some 120 of them (more of those whose answer buffers a large answer
/// grew and were let go). With 32 sets at most, the 64 connections of a load test freed and
/// allocated (and zeroed) sets all through it, some 2 % of the proxy's time; with 128 sets of
/// any size, a load of 64 KiB answers left 9 MB behind.
const SPARE_BYTES: usize = 3 << 20;

/// A thread's buffer sets not in use, and their bytes.
struct Spares {
    /// Boxed although in a vector: a set moves between here and a connection (`Buffers`),
    /// which a box does as a pointer.
    #[allow(clippy::vec_box)]
    sets: Vec<Box<Set>>,
    bytes: usize,
    /// The fewest sets kept since the last `trim_spares`: sets below that mark (taken from
    /// the end, they are at the start) were not needed in all that time.
    low: usize,
}

/// How often each worker lets go of the spare sets it did not need since the last time. A
/// burst (1,024 connections at once) left each worker its 3 MiB of sets for good: 190 MiB
/// on 64 cores, and idle RSS 1.5× what it was before the burst. Sets in use under a steady
/// load are kept, as they are taken within every period.
pub const SPARE_TRIM: std::time::Duration = std::time::Duration::from_secs(10);

/// Lets go of the spare sets this thread has not taken since the last call (the first call
/// only marks), and returns how many.
pub fn trim_spares() -> usize {
    SPARE
        .try_with(|spare| {
            let Ok(mut spare) = spare.try_borrow_mut() else {
                return 0;
            };
            let unused = spare.low.min(spare.sets.len());
            let freed: usize = spare.sets.drain(..unused).map(|set| set.size()).sum();
            spare.bytes = spare.bytes.saturating_sub(freed);
            spare.low = spare.sets.len();
            unused
        })
        .unwrap_or(0)
}

/// Runs `trim_spares` every `SPARE_TRIM` on the worker it is spawned on, for ever.
pub async fn trim_spares_regularly() {
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + SPARE_TRIM, SPARE_TRIM);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        trim_spares();
    }
}

thread_local! {
    /// Buffer sets not in use, for the next requests on this thread: a set is held only
    /// while a request is answered, and taken from here rather than allocated, so that
    /// connections waiting between requests hold none and a burst of new connections does
    /// not leave 8 and 16 KiB holes between the parked connections' small allocations.
    static SPARE: RefCell<Spares> = const {
        RefCell::new(Spares {
            sets: Vec::new(),
            bytes: 0,
            low: 0,
        })
    };
}

impl Set {
    /// The bytes its buffers hold.
    fn size(&self) -> usize {
        self.input.len() + self.request.capacity() + self.answer.capacity() + self.out.capacity()
    }
}

impl Buffers {
    fn take() -> Buffers {
        Buffers(Some(Self::spare()))
    }

    fn spare() -> Box<Set> {
        let spare = SPARE.try_with(|spare| {
            let mut spare = spare.try_borrow_mut().ok()?;
            let set = spare.sets.pop()?;
            debug_assert!(spare.bytes >= set.size(), "the spares' bytes are counted");
            spare.bytes = spare.bytes.saturating_sub(set.size());
            spare.low = spare.low.min(spare.sets.len());
            Some(set)
        });
        spare.ok().flatten().unwrap_or_else(|| {
            Box::new(Set {
                input: vec![0; READ_BUF].into_boxed_slice(),
                have: 0,
                request: Vec::with_capacity(512),
                answer: Vec::new(),
                out: Vec::new(),
                map: None,
                whole: Bytes::new(),
            })
        })
    }

    /// The set held, taken from the spares first when none is.
    fn set(&mut self) -> &mut Set {
        self.0.get_or_insert_with(Self::spare)
    }

    /// Gives the set held, if any, back to the spares.
    fn release(&mut self) {
        if let Some(set) = self.0.take() {
            Self::keep(set);
        }
    }

    /// Keeps `set` for the next request on this thread, when there is room; a buffer a
    /// large answer grew is let go.
    fn keep(mut set: Box<Set>) {
        set.have = 0;
        set.map = None;
        set.whole = Bytes::new();
        if set.answer.capacity() > 2 * COPY_BUF || set.out.capacity() > 2 * COPY_BUF {
            set.answer = Vec::new();
            set.out = Vec::new();
        }
        // An HTTP/2 client's request comes with its body (up to 64 KiB) in it.
        if set.request.capacity() > 2 * COPY_BUF {
            set.request = Vec::new();
        }
        let _ = SPARE.try_with(|spare| {
            if let Ok(mut spare) = spare.try_borrow_mut() {
                let size = set.size();
                if spare.bytes + size <= SPARE_BYTES {
                    spare.bytes += size;
                    spare.sets.push(set);
                }
            }
        });
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        self.release();
    }
}

/// Serves requests on an HTTP/1.1 connection while they are plain forwards, starting with the
/// bytes in `first`. Returns when one is not (its bytes back in `first`), when the connection
/// idles as `linger` says, or when it closes.
pub async fn serve<C: Client>(
    first: &mut Bytes,
    sock: &mut C,
    state: &StateHandle,
    conn: &Conn,
    drain: &Drain,
    linger: Linger<'_>,
) -> After {
    if first.len() > READ_BUF {
        return After::Hyper;
    }
    relay(first, sock, state, conn, drain, linger).await
}

/// `serve`'s loop. The connection holds a buffer set (`slot`) only while it has a request to
/// answer: between requests the set goes back to the thread's spares, so that connections
/// waiting for their next request, or for their grace to end, hold none.
async fn relay<C: Client>(
    first: &mut Bytes,
    sock: &mut C,
    state: &StateHandle,
    conn: &Conn,
    drain: &Drain,
    linger: Linger<'_>,
) -> After {
    let mut slot = Buffers::default();
    if !first.is_empty() {
        let bufs = slot.set();
        bufs.have = first.len();
        bufs.input[..first.len()].copy_from_slice(first);
        *first = Bytes::new();
    }
    // The grace timer, armed once and moved only when it fires after requests were served,
    // as `park::serve` does: a timer registered per request would cost more than the rest
    // of the wait.
    let (wait_for, mut guard, closable) = match linger {
        Linger::Park => (crate::park::GRACE, None, None),
        Linger::Close(keep_alive, guard, closable) => (keep_alive, Some(guard), Some(closable)),
    };
    // When the last answer was written, for a connection that closes after `wait_for` of
    // idleness: hyper's keep-alive deadline, kept to the letter (a parking connection's grace
    // may run to twice its time, a parked one's deadline is kept by the parker).
    let mut answered: Option<tokio::time::Instant> = None;
    let closes = guard.is_some();
    // For a parking connection, the instant after which an answer moves the grace later (its
    // deadline less `wait_for`): to twice `wait_for` from the answer, so that it fires only
    // once the connection has idled 10 to 20 ms, and seldom on a busy one. Moving a pending
    // timer later is a compare-and-swap; a grace that fired on a busy connection woke its
    // task for nothing, and was registered again earlier than the driver's next wake, which
    // made tokio write its eventfd (0.05 to 0.4 writes per forwarded request). `None` until
    // the first answer, which moves it.
    let mut move_after: Option<tokio::time::Instant> = None;
    // When the answer to the request just forwarded was written (`Clocks::answered`).
    let mut at: Option<tokio::time::Instant> = None;
    let grace = tokio::time::sleep(wait_for);
    tokio::pin!(grace);
    // Whether `grace` holds the task's waker, pending: it is then looked at, not polled.
    let mut grace_waits = false;
    // The drain, for a connection that closes rather than parks (a parked one is closed by
    // the parker).
    let stop = async {
        match guard.as_mut() {
            Some(guard) => guard.fired().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    // The deadline of an answer's head, kept registered across requests and not moved for
    // each: it stays at an earlier request's deadline, which comes before this one's, and is
    // moved only when it fires before this one's is reached (`Deadline::At`), about once a
    // second on a busy connection. Moving it for every request cost some 100 instructions
    // (tokio turns the instant into its tick and clones its runtime's handle for each move);
    // a `timeout` per request would register a timer and remove it. Set beyond any deadline
    // at first, so that the first request moves it earlier, once.
    let respond_by = tokio::time::sleep(std::time::Duration::MAX);
    tokio::pin!(respond_by);
    // The deadline of a body's next piece (`upstream.read_timeout`), apart from the head's:
    // moved earlier for each request, the head's would be registered again each time.
    let read_by = tokio::time::sleep(std::time::Duration::ZERO);
    tokio::pin!(read_by);
    let (mut served, mut armed) = (0u32, 0u32);
    // The start of a head that came after an answer, waiting for its rest: a client idling
    // with it parks with it, as it would from hyper, rather than holding hyper's state.
    let mut begun = false;
    // Over TLS, where nothing parks, such a head may be picked to make room once it has
    // lasted `STALLED`, as a parked one may (`park::parked`): armed with the head's first
    // wait, let go when it is whole. So may a connection waiting for its first request once
    // that wait has lasted as long: its client sends the request as its handshake ends, and
    // one picked in that moment lost its handshake unserved (`listener::waited`).
    let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if begun || slot.0.as_ref().is_none_or(|bufs| bufs.have == 0) {
            if !begun {
                slot.release();
            }
            // Read through `poll_read`, which forgets the socket's readiness after a read
            // that did not fill the buffer (edge-triggered epoll: more data makes a new
            // event), sparing the next wait a read that would find nothing. A set is taken
            // only once the socket is readable.
            // A whole head whose body is late is a request under way, not a stalled head: it
            // goes to hyper after its wait, and is never picked.
            let whole = begun
                && slot
                    .0
                    .as_ref()
                    .is_some_and(|bufs| head_whole(&bufs.input[..bufs.have]));
            let mut picked = false;
            let read = poll_fn(|cx| {
                if sock.readable(cx) {
                    let bufs = slot.set();
                    let mut room = ReadBuf::new(&mut bufs.input[bufs.have..]);
                    if let Poll::Ready(read) = Pin::new(&mut *sock).poll_read(cx, &mut room) {
                        return Poll::Ready(Some(read.map(|()| room.filled().len())));
                    }
                    sock.poll_send_queued(cx);
                    if slot.0.as_ref().is_some_and(|bufs| bufs.have == 0) {
                        slot.release();
                    }
                }
                if closes && !begun && stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                if let Some(closable) = closable.filter(|_| !whole) {
                    let may = (!begun && served != 0)
                        || stalled
                            .get_or_insert_with(|| {
                                Box::pin(tokio::time::sleep(crate::listener::STALLED))
                            })
                            .as_mut()
                            .poll(cx)
                            .is_ready();
                    if may && closable.poll_picked(cx) {
                        picked = true;
                        return Poll::Ready(None);
                    }
                }
                loop {
                    // Polled once after each move, then looked at: the poll that found it
                    // pending left the task's waker with the timer, which wakes the task when
                    // it fires, after marking it elapsed. A poll per request (its coop
                    // budget, its waker compared) cost some 150 instructions. Not when that
                    // poll ran out of coop budget: tokio then stored no waker.
                    if grace_waits && !grace.is_elapsed() {
                        return Poll::Pending;
                    }
                    if grace.as_mut().poll(cx).is_pending() {
                        grace_waits = tokio::task::coop::has_budget_remaining();
                        return Poll::Pending;
                    }
                    grace_waits = false;
                    if served == armed {
                        return Poll::Ready(None);
                    }
                    armed = served;
                    let since = answered.unwrap_or_else(tokio::time::Instant::now);
                    let later = since + wait_for;
                    grace.as_mut().reset(later);
                    move_after = Some(since);
                }
            })
            .await;
            // Picked, it stays so (counted as closing) until the connection is gone.
            if picked {
                return After::Close;
            }
            if let Some(closable) = closable {
                closable.busy();
            }
            match (read, slot.0.as_deref_mut()) {
                (None, bufs) => {
                    if let Some(bufs) = bufs.filter(|_| begun) {
                        *first = Bytes::copy_from_slice(&bufs.input[..bufs.have]);
                        // A whole head whose body is still on its way is hyper's, which
                        // forwards the head and the body as it comes, as for any request.
                        if head_whole(&bufs.input[..bufs.have]) {
                            return After::Hyper;
                        }
                    }
                    return After::Park;
                }
                (Some(Ok(n)), Some(bufs)) if n > 0 => bufs.have += n,
                _ => return After::Close,
            }
            begun = false;
        }
        let Some(bufs) = slot.0.as_deref_mut() else {
            return After::Close;
        };
        let snap = state.load();
        let mut prepared = prepare(&snap, conn, &bufs.input[..bufs.have], &mut bufs.request);
        // A plain held request is answered as a parked connection answers it (`fast::held`,
        // which counts and logs it), and the connection stays here: over TLS, where nothing
        // parks, it would otherwise stay with hyper after the hold ends. A head still arriving
        // is waited for as one to forward is. During a drain hyper answers, and closes.
        if prepared == Prepared::Hyper && snap.held.is_some() && !drain.started() {
            let input = &bufs.input[..bufs.have];
            bufs.out.clear();
            // Copied whole: `put` sends one buffer, through TLS too.
            let out = &mut crate::h1::Answers::copied(&mut bufs.out);
            prepared = match crate::fast::held(&snap, conn, input, out) {
                Some(head) => Prepared::Held(head),
                None if head_partial(input) => Prepared::Partial,
                None => Prepared::Hyper,
            };
        } else if prepared == Prepared::Hyper && !closes && served == 0 {
            // Hyper's anyway (the relay is off: `redirect_https`, `intercept_statuses`, an
            // `h2c://` server), a first head still arriving waits for its rest with its bytes
            // alone all the same (`After::Stalled`), where hyper held its two 8 KiB buffers
            // until `header_read_timeout`. One parse per such connection as it comes, new or
            // woken from its park (where hyper then builds its state anew), none on the relay's
            // path.
            if head_partial(&bufs.input[..bufs.have]) {
                prepared = Prepared::Partial;
            }
        }
        // A request that could be forwarded here while an `https://` server's protocol is
        // not known: each is asked once as a request waits (boxed: only then is its room
        // paid for), and one that could not be reached again later. Meanwhile the request
        // goes to a server the relay reaches: one server down as the proxy started kept the
        // relay off for all of them. With none healthy, or one that chose HTTP/2, it is
        // hyper's.
        let mut chosen = None;
        if matches!(prepared, Prepared::Take(..)) && !snap.pool.relayable() {
            if !drain.started() && snap.pool.unasked() {
                Box::pin(snap.pool.learn(&snap.passive)).await;
            }
            chosen = match drain.started() {
                true => None,
                false => snap.pool.relay_server(&snap.up, &snap.passive),
            };
            if chosen.is_none() {
                prepared = Prepared::Hyper;
            }
        }
        let (head, forward, client) = match prepared {
            Prepared::Take(head, client) if !drain.started() => (head, true, client),
            Prepared::Held(head) => (head, false, None),
            // A new connection comes with the few bytes that told its protocol, and a request
            // may come in pieces: what has arrived is read, without waiting. A head that is
            // still not whole waits for its rest with its bytes alone (`After::Stalled`), whose
            // deadline is `header_read_timeout`; over TLS, and a whole head whose body is late,
            // it is hyper's, whose timer bounds a client that sends its head slowly. After an
            // answer, it waits here for the connection's grace (`begun`),
            // then a head parks with the connection, whose deadline then bounds it, as it would
            // have from hyper (over TLS, which does not park, it waits `header_read_timeout`
            // and closes), and a whole head whose body is late goes to hyper. A held request's
            // head is waited for the same way (above).
            Prepared::Partial if bufs.have < READ_BUF => {
                let room = &mut bufs.input[bufs.have..];
                match poll_fn(|cx| Poll::Ready(sock.read_now(cx, room))).await {
                    Ok(0) => return After::Close,
                    Ok(n) => {
                        bufs.have += n;
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock && served != 0 => {
                        begun = true;
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        *first = Bytes::copy_from_slice(&bufs.input[..bufs.have]);
                        // A connection that parks waits for the rest of a head with its bytes
                        // alone (`park::stalled`), not in hyper's two 8 KiB buffers.
                        if !closes && !head_whole(&bufs.input[..bufs.have]) {
                            return After::Stalled;
                        }
                        return After::Hyper;
                    }
                    Err(_) => return After::Close,
                }
            }
            _ => {
                let input = &bufs.input[..bufs.have];
                // A head hyper would refuse as it reads it (`judge`): answered here, with
                // words, where hyper's `400` and `431` have none. Only as a connection goes
                // to hyper, never on the relay's own path.
                match judge(input, snap.config.proxy.max_header_bytes) {
                    Judged::Refused(refusal) => {
                        return refuse(sock, &refusal, &mut bufs.out, &snap, state, conn).await;
                    }
                    // A head still arriving that is not the relay's (longer than a read, or
                    // with more fields than it takes): where the connection parks, it waits
                    // for its rest with its bytes alone (`park::head_wait`), which answers
                    // one hyper would refuse as this does.
                    Judged::More if !closes => {
                        *first = Bytes::copy_from_slice(input);
                        return After::Stalled;
                    }
                    // Over TLS, where nothing parks, it is read on here.
                    Judged::More => {
                        let max = snap.config.proxy.max_header_bytes;
                        let wait = snap.config.proxy.header_read_timeout;
                        let mut head = input.to_vec();
                        match read_long(sock, &mut head, max, wait, closable).await {
                            Long::Judged(Judged::Refused(refusal)) => {
                                return refuse(sock, &refusal, &mut bufs.out, &snap, state, conn)
                                    .await;
                            }
                            Long::Judged(_) => {
                                *first = Bytes::from(head);
                                return After::Hyper;
                            }
                            // As hyper's header timer closes it: counted, and closed.
                            Long::Late => {
                                crate::listener::head_timed_out(state, conn.peer.ip(), wait);
                                return After::Refused;
                            }
                            Long::Gone => return After::Close,
                        }
                    }
                    Judged::Whole => {}
                }
                *first = Bytes::copy_from_slice(input);
                return After::Hyper;
            }
        };
        conn.arrived();
        stalled = None;
        let next = if forward {
            let clocks = Clocks {
                respond_by: respond_by.as_mut(),
                read_by: read_by.as_mut(),
                answered: &mut at,
            };
            let asked = Asked {
                head,
                client,
                server: chosen,
            };
            exchange(bufs, &snap, sock, conn, asked, drain, clocks).await
        } else {
            Next::after(put(sock, &bufs.out, &snap).await, false)
        };
        bufs.input.copy_within(head..bufs.have, 0);
        bufs.have -= head;
        served = served.wrapping_add(1);
        if closes {
            answered = Some(tokio::time::Instant::now());
        } else if let Some(at) = at.take() {
            // Without a reading (a held answer, one whose server closes), the grace is moved
            // when it fires, as above.
            if move_after.is_none_or(|after| at > after) {
                // A grace that fired while the answer was on its way holds no waker.
                grace_waits &= !grace.is_elapsed();
                grace.as_mut().reset(at + wait_for + wait_for);
                move_after = Some(at + wait_for);
            }
            armed = served;
        }
        match next {
            Next::Keep => {}
            Next::Close => return After::Close,
            Next::Broken => return After::Broken,
        }
    }
}

/// Whether `name` is `lower`, ignoring case; `lower` has no uppercase letter.
fn is(name: &[u8], lower: &[u8]) -> bool {
    h1::eq_lower(name, lower)
}

/// What `prepare` made of the bytes at the start of a connection's input.
#[derive(Debug, PartialEq, Eq)]
enum Prepared {
    /// A request taken here, this long with its body; and, for its access line, the client
    /// a trusted peer named, when it is not the peer (`gateway::Judged::logged`).
    Take(usize, Option<IpAddr>),
    /// The start of a head that could be taken here.
    Partial,
    /// A held request, this long, whose answer is in `Set::out`.
    Held(usize),
    /// A request for hyper (see the module's docs).
    Hyper,
}

/// The upstream request, into `out`, for the request at the start of `input` when it is taken
/// here.
fn prepare(snap: &Snapshot, conn: &Conn, input: &[u8], out: &mut Vec<u8>) -> Prepared {
    match request(snap, conn, input, out) {
        Ok(Some((head, client))) => Prepared::Take(head, client),
        Ok(None) => Prepared::Partial,
        Err(()) => Prepared::Hyper,
    }
}

/// `prepare`'s work: `Ok(None)` for a head not yet whole, `Err` for a request hyper must read.
fn request(
    snap: &Snapshot,
    conn: &Conn,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<Option<(usize, Option<IpAddr>)>, ()> {
    let config = &snap.config;
    // A redirect to HTTPS is hyper's to answer, and only on plaintext.
    if !snap.relay || !snap.pool.may_relay() || (config.proxy.redirect_https && !conn.tls()) {
        return Err(());
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let used = match req.parse_with_uninit_headers(input, &mut slots) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let method = match req.method {
        Some(m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS"))
            if req.version == Some(1) =>
        {
            m
        }
        _ => return Err(()),
    };
    let target = req.path.ok_or(())?;
    // What hyper would make of it, or hyper reads it (and answers 400 to what it refuses).
    let path = h1::plain_path(target).ok_or(())?;
    if path.starts_with(config.maintenance.reserved_prefix.as_str()) {
        return Err(());
    }
    out.clear();
    let (method, target) = (method.as_bytes(), target.as_bytes());
    // The request line and the lines kept after it, copied a run at a time (`Run`).
    let line = written(input, method, b" ", target, b" HTTP/1.1\r\n");
    if line.is_none() {
        out.extend_from_slice(method);
        out.push(b' ');
        out.extend_from_slice(target);
        out.extend_from_slice(b" HTTP/1.1\r\n");
    }
    let mut run = Run::new(line);
    let mut host: Option<&[u8]> = None;
    // `X-Forwarded-For` is appended to, whoever sent it; a trusted peer's `X-Forwarded-Host`,
    // `-Proto` and `X-Real-IP` are kept, anyone else's replaced, and anyone else's
    // `Forwarded`, `True-Client-IP`, `X-Forwarded-Port`, `-Prefix`, `-Ssl`, `-Scheme`,
    // `X-Original-URL` and `X-Rewrite-URL` dropped (`forward::headers::set_forwarded`).
    let trusted = config.proxy.is_trusted(conn.peer.ip());
    let (mut their_proto, mut their_host, mut their_list) = (false, false, false);
    let (mut their_address, mut their_forwarded) = (false, false);
    let mut length: Option<usize> = None;
    use forward::headers::Kind;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let skip = match forward::headers::kind(name) {
            Kind::Te | Kind::Expect | Kind::Upgrade | Kind::TransferEncoding => return Err(()),
            Kind::Host => {
                if host.is_some() {
                    return Err(());
                }
                host = Some(h.value);
                false
            }
            // As `forward::headers::FROM_TRUSTED_ONLY`: kept from a trusted peer only. A
            // `Forwarded` list is noted for the access line's client (`client_ip`).
            Kind::TrustedOnly => {
                their_forwarded |= name.len() == 9 && is(name, b"forwarded");
                !trusted
            }
            Kind::Connection => {
                if !is(h.value, b"keep-alive") {
                    return Err(());
                }
                true
            }
            // `X_Forwarded_For` and the like: dropped, as hyper's path drops them.
            Kind::KeepAlive | Kind::Alias => true,
            Kind::ContentLength => {
                if length.is_some() {
                    return Err(());
                }
                length = Some(body_length(h.value).ok_or(())?);
                false
            }
            // Written below, after whatever list the peer sent.
            Kind::ForwardedFor => {
                their_list = true;
                true
            }
            Kind::ForwardedHost => {
                their_host |= trusted;
                !trusted
            }
            Kind::RealIp => {
                their_address |= trusted;
                !trusted
            }
            Kind::ForwardedProto => {
                their_proto |= trusted;
                !trusted
            }
            // A gRPC-Web call's answer is hyper's to carry, whose body ends with a status
            // frame should its server break off between two messages (`Body::timed`): cut
            // here, its client would get no status at all.
            Kind::Other if name.len() == 12 && is(name, b"content-type") && grpc_web(h.value) => {
                return Err(());
            }
            Kind::Cookie | Kind::Other => false,
        };
        if !skip {
            run.line(out, input, name, h.value);
        }
    }
    run.flush(out, input);
    // One that is not `host[:port]`, or empty, is hyper's path's to refuse
    // (`gateway::malformed`).
    let host = host
        .filter(|h| !h.is_empty() && h1::valid_host(h))
        .ok_or(())?;
    // A body where the method gives it no meaning goes through hyper's path, which closes
    // the server's connection after it (`forward::headers::close_after_unmeant_body`).
    if length.is_some_and(|n| n > 0) && !forward::body_has_meaning(method) {
        return Err(());
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    // A second pass over the head only when the client sent a list, which few do.
    if their_list {
        let named = req
            .headers
            .iter()
            .filter(|h| is(h.name.as_bytes(), b"x-forwarded-for"));
        for value in named
            .map(|h| h.value.trim_ascii())
            .filter(|v| !v.is_empty())
        {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    }
    // The lines this hop adds, their fixed parts each one copy with what comes next to them:
    // written a name, a separator, a value and an end apiece, they were 15 copies a request.
    let peer = conn.client.peer.as_bytes();
    // And the fixed bytes between two values one copy: the proto line with the start of the
    // host line after it (3 copies a request fewer, some 120 instructions; helper-223).
    let after_peer: &[u8] = match (their_proto, their_host, conn.tls()) {
        (true, true, _) => b"\r\n",
        (true, false, _) => b"\r\nx-forwarded-host: ",
        (false, true, true) => b"\r\nx-forwarded-proto: https\r\n",
        (false, true, false) => b"\r\nx-forwarded-proto: http\r\n",
        (false, false, true) => b"\r\nx-forwarded-proto: https\r\nx-forwarded-host: ",
        (false, false, false) => b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: ",
    };
    out.extend_from_slice(peer);
    out.extend_from_slice(after_peer);
    match (their_host, their_address) {
        (false, false) => {
            out.extend_from_slice(host);
            out.extend_from_slice(b"\r\nx-real-ip: ");
        }
        (false, true) => {
            out.extend_from_slice(host);
            out.extend_from_slice(b"\r\n\r\n");
        }
        (true, false) => out.extend_from_slice(b"x-real-ip: "),
        (true, true) => out.extend_from_slice(b"\r\n"),
    }
    if !their_address {
        out.extend_from_slice(peer);
        out.extend_from_slice(b"\r\n\r\n");
    }
    // A body is taken when it is whole in what a read holds, so that it can be sent with
    // the head and again if need be; a larger one streams through hyper.
    let whole = used + length.unwrap_or(0);
    if whole > READ_BUF {
        return Err(());
    }
    let Some(body) = input.get(used..whole) else {
        return Ok(None);
    };
    out.extend_from_slice(body);
    // The client the access line names: read, by `allow_ips`'s rule, only from a trusted
    // peer's lists, and only with the line on; with no list the client is the peer.
    let client = (trusted && config.log.access_log && (their_list || their_forwarded))
        .then(|| {
            let trusting = &config.proxy.trusted_proxies;
            crate::hold::bypass::client_ip(conn.peer.ip(), &*req.headers, trusting)
        })
        .filter(|&ip| ip != crate::config::canonical_ip(conn.peer.ip()));
    Ok(Some((whole, client)))
}

/// Whether a request's `Content-Type` is gRPC-Web's (`application/grpc-web…`).
fn grpc_web(value: &[u8]) -> bool {
    const WEB: &[u8] = b"application/grpc-web";
    value
        .trim_ascii_start()
        .get(..WEB.len())
        .is_some_and(|v| v.eq_ignore_ascii_case(WEB))
}

/// A request's `Content-Length` as hyper reads it, for the plain form only: digits, at most
/// what a read holds. Anything else (a sign, a list, spaces inside) is left to hyper.
fn body_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 5 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whether the upstream request `request` may be sent a second time: its method is idempotent
/// (RFC 9110 §9.2.2; `forward::idempotent`), its body, if any, being kept whole here.
fn resendable(request: &[u8]) -> bool {
    let method = request.split(|&b| b == b' ').next().unwrap_or_default();
    // `forward::idempotent`'s methods by their bytes (a method's name is case-sensitive), as
    // a test keeps them: a `Method` made for the compare cost every forwarded request some
    // 40 instructions.
    matches!(
        method,
        b"GET" | b"HEAD" | b"PUT" | b"DELETE" | b"OPTIONS" | b"TRACE"
    )
}

/// Whether `input` starts with a whole request head (its body may not have come yet).
pub(crate) fn head_whole(input: &[u8]) -> bool {
    matches!(parse_head(input), Ok(httparse::Status::Complete(_)))
}

/// Whether `input` is the start of a request head, well formed so far.
pub(crate) fn head_partial(input: &[u8]) -> bool {
    matches!(parse_head(input), Ok(httparse::Status::Partial))
}

/// hyper's server's limits on a request head, which the relay's own parse (`MAX_HEADERS`)
/// stays within: its 100 header fields, and its longest target (`MAX_URI_LEN`), past which it
/// answers `414`.
const HYPER_HEADERS: usize = 100;
const HYPER_TARGET: usize = u16::MAX as usize - 1;

/// What hyper's server would make of the bytes a request head begins with (`judge`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Judged {
    /// A head not whole yet, within `max_header_bytes` so far.
    More,
    /// A whole head that hyper reads.
    Whole,
    /// A head hyper refuses as it reads it, before any request: answered here instead, with
    /// words (`refuse`).
    Refused(Refusal),
}

/// A request head refused unread: its status, and what the client is told.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    status: StatusCode,
    why: std::borrow::Cow<'static, str>,
}

impl Refusal {
    fn new(status: StatusCode, why: impl Into<std::borrow::Cow<'static, str>>) -> Refusal {
        Refusal {
            status,
            why: why.into(),
        }
    }
}

/// What hyper's server makes of `input`, a request head's first bytes, as it reads it: with
/// httparse, its parser, at the same first bad byte, and its limits: `max` bytes
/// (`proxy.max_header_bytes`, `431` beyond it, whole or not), 100 header fields (`431`), a
/// target of 65,534 bytes (`414`); a method, target or version that is none, or a header
/// line that is no field, `400`.
pub(crate) fn judge(input: &[u8], max: usize) -> Judged {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; HYPER_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(input, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n > max => Judged::Refused(too_large(max)),
        Ok(httparse::Status::Complete(_)) if req.path.is_some_and(|p| p.len() > HYPER_TARGET) => {
            Judged::Refused(Refusal::new(
                StatusCode::URI_TOO_LONG,
                format!("the request target is too long: more than {HYPER_TARGET} bytes\n"),
            ))
        }
        Ok(httparse::Status::Complete(_)) => Judged::Whole,
        Ok(httparse::Status::Partial) if input.len() >= max => Judged::Refused(too_large(max)),
        Ok(httparse::Status::Partial) => Judged::More,
        Err(httparse::Error::TooManyHeaders) => Judged::Refused(Refusal::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request head is too large: more than 100 header fields\n",
        )),
        Err(_) => Judged::Refused(Refusal::new(StatusCode::BAD_REQUEST, REFUSED_BODY)),
    }
}

/// A head over `max` bytes: what was too large, and the usual cause (a site's cookies grown
/// past it), so that the visitor who sees it on every page can tell.
fn too_large(max: usize) -> Refusal {
    Refusal::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        format!(
            "the request head is too large: its request line and header fields come to more \
             than {max} bytes (often too many or too large cookies)\n"
        ),
    )
}

/// What became of a head read on past a read (`read_long`).
enum Long {
    /// Whole, or one hyper would refuse (never `Judged::More`).
    Judged(Judged),
    /// Not whole within `header_read_timeout`.
    Late,
    /// The client closed, the connection failed, or it was picked to make room.
    Gone,
}

/// Reads the rest of a request head the relay does not take (longer than its read, or with
/// more fields than it takes) onto `head`, over TLS (a plaintext one waits in
/// `park::head_wait`), until it is whole or hyper would refuse it
/// (`judge`): in a buffer that grows as hyper's would, to `max`, for at most `wait`
/// (`header_read_timeout`, hyper's limit), and closable to make room once it has lasted
/// `STALLED`, as hyper's stalled head is. Parsed again only when the bytes just read may end
/// the head, as hyper parses a head that comes in pieces.
async fn read_long<C: Client>(
    sock: &mut C,
    head: &mut Vec<u8>,
    max: usize,
    wait: Duration,
    closable: Option<&crate::listener::Closable>,
) -> Long {
    let late = tokio::time::sleep(wait);
    tokio::pin!(late);
    let stalled = tokio::time::sleep(crate::listener::STALLED);
    tokio::pin!(stalled);
    loop {
        let before = head.len();
        head.reserve(before.min(max.saturating_sub(before)).max(1));
        let picked = async {
            match closable {
                Some(closable) => {
                    stalled.as_mut().await;
                    poll_fn(|cx| match closable.poll_picked(cx) {
                        true => Poll::Ready(()),
                        false => Poll::Pending,
                    })
                    .await;
                }
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            read = sock.read_buf(head) => Some(read),
            () = late.as_mut() => None,
            // Picked, it stays so (counted as closing) until the connection is gone.
            () = picked => return Long::Gone,
        };
        if let Some(closable) = closable {
            closable.busy();
        }
        match read {
            None => return Long::Late,
            Some(Ok(0) | Err(_)) => return Long::Gone,
            Some(Ok(_)) => {}
        }
        let from = before.saturating_sub(3);
        if head.len() < max && !crate::park::may_end(&head[from..]) {
            continue;
        }
        match judge(head, max) {
            Judged::More => {}
            judged => return Long::Judged(judged),
        }
    }
}

/// What a client whose head could not be read is told (`Refusal`): plain text, as every
/// other refusal of the proxy's own (`gateway::refusal`; a head that is no HTTP has no
/// `Accept` to read), and `Connection: close`, since where its next request would begin cannot be known
/// (or, after a head too large, is not worth reading to).
const REFUSED_HEAD: &[u8] = b"content-type: text/plain; charset=utf-8\r\n\
    cache-control: no-store\r\n\
    connection: close\r\n";
const REFUSED_BODY: &str =
    "the request could not be read: its request line or a header is malformed\n";

/// The answer to `refusal`, dated now, into `out`; over TLS `hsts`, the
/// `Strict-Transport-Security` line every answer of the proxy's own carries there.
fn refused_answer(out: &mut Vec<u8>, refusal: &Refusal, hsts: Option<&[u8]>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(refusal.status.as_str().as_bytes());
    out.push(b' ');
    let reason = refusal.status.canonical_reason().unwrap_or_default();
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(REFUSED_HEAD);
    out.extend_from_slice(hsts.unwrap_or_default());
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(refusal.why.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    h1::date_header(out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(refusal.why.as_bytes());
}

/// Answers a head refused unread (`judge`) on `sock`, through `out`, and counts and logs it as
/// hyper's answer was (`bytes` its words'): `After::Refused` to close as after any last
/// answer, or `After::Broken` when it could not be written.
pub(crate) async fn refuse<C: Client>(
    sock: &mut C,
    refusal: &Refusal,
    out: &mut Vec<u8>,
    snap: &Snapshot,
    state: &StateHandle,
    conn: &Conn,
) -> After {
    out.clear();
    let hsts = snap.hsts(C::TLS).map(crate::config::Hsts::line);
    refused_answer(out, refusal, hsts);
    let sent = put(sock, out, snap).await;
    let said = if sent { refusal.why.len() as u64 } else { 0 };
    let status = refusal.status.as_u16();
    crate::listener::refused_unread_said(state, conn.peer.ip(), status, said);
    match sent {
        true => After::Refused,
        false => After::Broken,
    }
}

fn parse_head(input: &[u8]) -> httparse::Result<usize> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    httparse::Request::new(&mut []).parse_with_uninit_headers(input, &mut slots)
}

/// The lines of a head passed on as they came, as one span of `input` (`start..end`) until a
/// line that is not next to the one before it there: one copy for the start line and the
/// lines that follow it unchanged, where a copy a line was some 150 instructions a forwarded
/// request (helper-223). Whatever else is written to `out` is written after a `flush`, so
/// that the bytes and their order are what a copy a line made.
#[derive(Default)]
struct Run {
    start: usize,
    end: usize,
}

impl Run {
    /// The run of a start line that `written` found where it lies, or an empty one.
    fn new(line: Option<(usize, usize)>) -> Run {
        line.map_or(Run::default(), |(at, len)| Run {
            start: at,
            end: at + len,
        })
    }

    /// Appends the header line `name: value`: to the run when it follows it in `input` as
    /// written, else the run is flushed and the line started anew (or written in pieces).
    fn line(&mut self, out: &mut Vec<u8>, input: &[u8], name: &[u8], value: &[u8]) {
        match written(input, name, b": ", value, b"\r\n") {
            Some((at, len)) if at == self.end => self.end = at + len,
            Some((at, len)) => {
                self.flush(out, input);
                self.start = at;
                self.end = at + len;
            }
            None => {
                self.flush(out, input);
                h1::push_header(out, name, value);
            }
        }
    }

    /// Writes the run to `out` and empties it.
    fn flush(&mut self, out: &mut Vec<u8>, input: &[u8]) {
        if let Some(span) = input.get(self.start..self.end) {
            out.extend_from_slice(span);
        }
        self.start = self.end;
    }
}

/// Where in `input` the bytes `first`, `between`, `second` and `end` lie, and how many they
/// are, when `first` and `second` are slices of `input` (as httparse gives them) with exactly
/// `between` and `end` around them there. The lines that a proxy passes on as they came are
/// copied at once rather than in four pieces (1 % of a forwarded request's instructions).
fn written(
    input: &[u8],
    first: &[u8],
    between: &[u8],
    second: &[u8],
    end: &[u8],
) -> Option<(usize, usize)> {
    let at = (first.as_ptr() as usize).checked_sub(input.as_ptr() as usize)?;
    let rest = input.get(at..)?;
    let second_at = first.len() + between.len();
    let bytes = rest.get(..second_at + second.len() + end.len())?;
    let same = bytes.as_ptr() == first.as_ptr()
        && bytes[first.len()..].starts_with(between)
        && bytes[second_at..].as_ptr() == second.as_ptr()
        && bytes.ends_with(end);
    same.then_some((at, bytes.len()))
}

/// What became of a request, for its access log line.
#[derive(Debug)]
struct Served {
    /// A tokio instant, which the answer's deadline is set from (tokio's clock, which tests
    /// may pause).
    start: tokio::time::Instant,
    status: u16,
    /// The server that answered, or was tried last; before the request is sent, the one
    /// picked for it, if any (`Asked::server`).
    server: Option<usize>,
    /// The body's bytes passed to the client (without the chunked framing).
    bytes: u64,
    /// The answer broke off on the server's side mid-body (`logging::AccessLine::cut`).
    cut: bool,
}

/// What `prepare` took of a request for the relay to forward.
struct Asked {
    /// The client's request, body included, is `bufs.input[..head]`.
    head: usize,
    /// The client a trusted peer named, for the access line (`Prepared::Take`).
    client: Option<IpAddr>,
    /// The server picked among those the relay reaches, while one is not
    /// (`UpstreamPool::relay_server`); `None`: any, picked as the request is sent.
    server: Option<usize>,
}

/// Forwards the request `bufs.request` (the client's is `bufs.input[..asked.head]`), writes
/// the answer to the client and, with the access log on, its line, as hyper's path writes it
/// (`logging::AccessLine`); whether the client's connection stays open.
async fn exchange<C: Client>(
    bufs: &mut Set,
    snap: &Snapshot,
    sock: &mut C,
    conn: &Conn,
    asked: Asked,
    drain: &Drain,
    clocks: Clocks<'_>,
) -> Next {
    let served = Served {
        start: tokio::time::Instant::now(),
        status: 0,
        server: asked.server,
        bytes: 0,
        cut: false,
    };
    let head = asked.head;
    let mut told = Told::new(snap, conn, asked.client, &bufs.request, served);
    answer(bufs, snap, sock, head, drain, clocks, &mut told.served).await
}

/// The access log line of a request served as `served` says: 499 with no status, as nginx
/// logs a request its client left before its answer.
fn log_served(
    snap: &Snapshot,
    peer: IpAddr,
    client: Option<IpAddr>,
    method: &dyn std::fmt::Display,
    path: &dyn std::fmt::Display,
    served: &Served,
) {
    let (status, upstream) = match served.status {
        0 => (gateway::CLIENT_CLOSED, None),
        status => (status, served.server.and_then(|i| snap.pool.names.get(i))),
    };
    let line = crate::logging::AccessLine {
        peer,
        client,
        method,
        path,
        status,
        upstream: upstream.map(|name| &**name),
        bytes: served.bytes,
        cut: served.cut,
    };
    line.write(served.start.into_std());
}

/// What became of a request, told when its exchange ends, or when it is dropped while the
/// request is served (a drain's `shutdown_timeout` ends the worker's runtime with it), where
/// nothing was said of it. No status: the client left (or the drain came) before its answer,
/// counted as abandoned and logged with nginx's 499, as `gateway::Unanswered` tells one on
/// hyper's path; with one, counted already (`respond`, `outage`) and logged with the bytes
/// sent so far, as hyper's path logs a body dropped halfway (`Body::counted`). The request
/// line is copied only with the access log on.
struct Told<'a> {
    snap: &'a Snapshot,
    peer: IpAddr,
    /// The client a trusted peer named (`Prepared::Take`).
    client: Option<IpAddr>,
    line: Option<String>,
    served: Served,
}

impl<'a> Told<'a> {
    fn new(
        snap: &'a Snapshot,
        conn: &Conn,
        client: Option<IpAddr>,
        request: &[u8],
        served: Served,
    ) -> Self {
        let line = snap.config.log.access_log.then(|| {
            let (method, path) = request_line(request);
            format!("{method} {path}")
        });
        Told {
            snap,
            peer: conn.peer.ip(),
            client,
            line,
            served,
        }
    }
}

impl Drop for Told<'_> {
    fn drop(&mut self) {
        if self.served.status == 0 {
            self.snap.metrics.abandoned(self.snap.mode);
        }
        if let Some(line) = &self.line {
            let (method, path) = line.split_once(' ').unwrap_or_default();
            let served = &self.served;
            log_served(self.snap, self.peer, self.client, &method, &path, served);
        }
    }
}

/// The method and target of the upstream request `request` (`{method} {target} HTTP/1.1`, as
/// `request` wrote it from what httparse took as a method and a path).
fn request_line(request: &[u8]) -> (&str, &str) {
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = line.strip_suffix(b" HTTP/1.1").unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or_default();
    line.split_once(' ').unwrap_or_default()
}

/// Whether the upstream request `request` is a `HEAD`, whose answer has no body.
fn is_head(request: &[u8]) -> bool {
    request.starts_with(b"HEAD ")
}

/// `exchange`'s work: the answer, from a server or the outage response.
async fn answer<C: Client>(
    bufs: &mut Set,
    snap: &Snapshot,
    sock: &mut C,
    head: usize,
    drain: &Drain,
    clocks: Clocks<'_>,
    served: &mut Served,
) -> Next {
    let Clocks {
        mut respond_by,
        read_by,
        answered,
    } = clocks;
    let pool = &snap.pool;
    let timeout = snap.config.upstream.response_timeout;
    let hsts = snap.hsts(C::TLS).map(crate::config::Hsts::line);
    // Picked already while the relay does not reach every server (`Asked::server`).
    let Some(first) = served.server.or_else(|| pool.pick(&snap.up, None)) else {
        if let Some(more) = forward::said(&snap.passive, None, forward::Line::NoServer) {
            tracing::warn!(
                "no upstream server to forward to; answering with the outage response{more}"
            );
        }
        return outage(bufs, snap, sock, head, drain, served).await;
    };
    // The client's end is watched while its answer is on its way, unless its next request
    // is already read: hyper, too, looks for the end only when nothing is left unread.
    let mut watch = bufs.have == head;
    let mut server = first;
    // The first attempt starts with the request: its clock read serves for both.
    let mut sent = served.start;
    // The head is waited for in two stages on the one timer: until the first look, then, the
    // server being watched for a mark-down (`state::marks`), until `response_timeout`. A
    // request answered before the first look (nearly all) does not move the timer, which an
    // earlier request left set before its own first look (`Deadline::At`).
    let look = marks::first_look(timeout);
    // Read once, for both uses: whether the wait may be cut, and whether to send it again.
    let idempotent = resendable(&bufs.request);
    loop {
        served.server = Some(server);
        let name = || pool.servers[server].to_string();
        let mut due = sent + look;
        // Pinned here and lent to `wait`: passed by value, its state (some 400 bytes) was
        // copied twice per request on its way into `wait`'s.
        let fetched = {
            let mut attempt = std::pin::pin!(fetch(bufs, pool, server, sent, hsts, idempotent));
            let by = Deadline::At(respond_by.as_mut(), due);
            match wait(sock, &mut watch, by, attempt.as_mut()).await {
                Waited::Late if look < timeout => {
                    due = sent + timeout;
                    // Watched only when it was healthy as the request set out: one sent to a
                    // server already down (`force-open`, a bypass during an outage) knew.
                    // And only an idempotent request: a `POST` the server has (a payment on
                    // an overloaded server whose checks time out) may still be answered,
                    // and its client must not read an outage page about an order placed.
                    // Boxed: only a request that waits this long pays for its room.
                    let healthy = snap.up.get(server).copied().unwrap_or(true);
                    let mut down = match healthy && idempotent {
                        true => Some(Box::pin(snap.marks.marked_down(&pool.names[server]))),
                        false => None,
                    };
                    // And the drain's end (`Drain::ending`), where its answer is the drain's
                    // `503` rather than the process's exit closing the connection unanswered.
                    // From the first look alone: a waiter per request on the drain's channel
                    // would take its lock twice, and no request starts here during a drain.
                    let mut ending = Box::pin(async {
                        let mut ending = drain.ending();
                        ending.fired().await;
                    });
                    let either = poll_fn(|cx| {
                        if let Poll::Ready(out) = attempt.as_mut().poll(cx) {
                            return Poll::Ready(Ok(out));
                        }
                        if ending.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(Halt::Ending));
                        }
                        match &mut down {
                            Some(down) => down.as_mut().poll(cx).map(|()| Err(Halt::Down)),
                            None => Poll::Pending,
                        }
                    });
                    wait(
                        sock,
                        &mut watch,
                        Deadline::At(respond_by.as_mut(), due),
                        either,
                    )
                    .await
                }
                Waited::Late => Waited::Late,
                Waited::Gone => Waited::Gone,
                Waited::Done(out) => Waited::Done(Ok(out)),
            }
        };
        let error = match fetched {
            Waited::Gone => return Next::Broken,
            Waited::Done(Ok(Ok((up, answer)))) => {
                served.status = answer.status;
                let to = Respond {
                    server,
                    start: served.start.into_std(),
                    drain,
                    watch,
                    by: respond_by,
                    due,
                    until: sent + timeout,
                    read_by,
                    bytes: &mut served.bytes,
                    cut: &mut served.cut,
                    answered,
                };
                return respond(bufs, snap, sock, up, answer, to).await;
            }
            Waited::Done(Ok(Err(source))) if source.is_connect() => UpstreamError::Connect {
                server: name(),
                source,
            },
            Waited::Done(Ok(Err(source))) => UpstreamError::Failed {
                server: name(),
                source,
            },
            Waited::Done(Err(Halt::Down)) => UpstreamError::MarkedDown { server: name() },
            // Nobody's failure (`UpstreamError::Stopping`): not reported, nor sent again.
            Waited::Done(Err(Halt::Ending)) => {
                return stopped(bufs, snap, sock, served).await;
            }
            Waited::Late => UpstreamError::Timeout {
                server: name(),
                timeout,
            },
        };
        forward::report(&snap.passive, server, &error);
        // Once, on another healthy server, as `forward::forward` retries an idempotent request,
        // or any request the server never got (its connection not made: a `POST` too, as
        // nginx's `proxy_next_upstream error` does; the relay holds every body whole).
        // Not when the proxy itself is short (`forward::local_exhaustion`: the bound on
        // upstream sockets, out of descriptors or memory), as `forward::forward` does not.
        let limited = forward::sockets::reached(&error);
        let short = forward::local_exhaustion(&error);
        let unsent = matches!(error, UpstreamError::Connect { .. });
        let second =
            (server == first && !short && pool.servers.len() > 1 && (unsent || idempotent))
                .then(|| match pool.relayable() {
                    true => pool.pick(&snap.up, Some(first)),
                    // Not to a server the relay does not reach (`UpstreamPool::relay_server`).
                    false => pool.pick_known(&snap.up, Some(first)),
                })
                .flatten()
                // `snap.up` is as the request found it: one taken out since is not tried.
                .filter(|&next| !snap.marks.is_down(&pool.names[next]));
        match second {
            Some(next) => {
                if let Some(more) =
                    forward::said(&snap.passive, Some(server), forward::Line::Retried)
                {
                    tracing::warn!(error = %error, "retrying on {}{more}", pool.servers[next]);
                }
                forward::retried(&snap.passive, server);
                server = next;
                sent = tokio::time::Instant::now();
            }
            // Told once every 10 s with a count (`forward::sockets`), not per request.
            None if limited => {
                tracing::debug!(error = %error, "forwarding failed; answering with the outage response");
                return outage(bufs, snap, sock, head, drain, served).await;
            }
            None => {
                if let Some(more) =
                    forward::said(&snap.passive, Some(server), forward::Line::Failed)
                {
                    tracing::warn!(error = %error, "forwarding failed; answering with the outage response{more}");
                }
                return outage(bufs, snap, sock, head, drain, served).await;
            }
        }
    }
}

/// Why the wait for an answer's head ended after its first look without one.
enum Halt {
    /// Its server was taken out by its health checks (`state::marks`).
    Down,
    /// The drain nears its end (`Drain::ending`).
    Ending,
}

/// What waiting for an answer's head, or a piece of its body, came to.
enum Waited<T> {
    Done(T),
    /// `response_timeout` passed first.
    Late,
    /// The client closed its connection: the request is given up (its upstream socket
    /// closed), as hyper gives one up when it reads the client's end before the answer is
    /// whole.
    Gone,
}

/// How long `wait` waits.
enum Deadline<'a> {
    None,
    /// Until the instant given (the answer's `response_timeout`, or its first look), on a sleep
    /// that may be set earlier, at an earlier request's: moved to the instant when it fires
    /// before it (or at once, when set later).
    At(Pin<&'a mut Sleep>, tokio::time::Instant),
    /// This long from when the work is first found waiting (`upstream.read_timeout`): the
    /// sleep is set only then, so a read that finds its bytes already there costs neither a
    /// clock reading nor a timer.
    Idle(Pin<&'a mut Sleep>, Duration),
}

impl<'a> Deadline<'a> {
    /// `upstream.read_timeout` on `by`, or no limit when it is off.
    fn idle(by: Pin<&'a mut Sleep>, snap: &Snapshot) -> Deadline<'a> {
        match snap.config.upstream.read_timeout {
            Some(limit) => Deadline::Idle(by, limit),
            None => Deadline::None,
        }
    }
}

/// Waits for `work`, until its deadline, and with `watch` for the client closing its
/// connection. A pipelined request that arrives meanwhile is left to be read after this
/// answer, and ends the watch.
async fn wait<C: Client, F: Future>(
    sock: &mut C,
    watch: &mut bool,
    mut by: Deadline<'_>,
    work: F,
) -> Waited<F::Output> {
    tokio::pin!(work);
    let mut armed = false;
    // Polled, not awaited through `peek()`, whose future would queue a waiter (under the
    // socket's lock) for every request; this takes the read side's waker slot, unused while
    // an answer is on its way.
    poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Waited::Done(out));
        }
        if *watch {
            match sock.poll_gone(cx) {
                Poll::Ready(true) => return Poll::Ready(Waited::Gone),
                Poll::Ready(false) => *watch = false,
                Poll::Pending => {}
            }
        }
        let sleep = match &mut by {
            Deadline::None => return Poll::Pending,
            Deadline::At(sleep, due) => {
                if sleep.deadline() > *due {
                    sleep.as_mut().reset(*due);
                }
                loop {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if sleep.deadline() >= *due {
                        return Poll::Ready(Waited::Late);
                    }
                    sleep.as_mut().reset(*due);
                }
            }
            Deadline::Idle(sleep, limit) => {
                if !armed {
                    sleep.as_mut().reset(tokio::time::Instant::now() + *limit);
                    armed = true;
                }
                sleep
            }
        };
        sleep.as_mut().poll(cx).map(|()| Waited::Late)
    })
    .await
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the server closes; sent on chunked.
    Close,
}

/// An answer whose head is at the start of `Set::answer`, rewritten in `Set::out`.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    head: usize,
    framing: Framing,
    /// The server keeps the connection open after this answer.
    reusable: bool,
    /// A stream of server-sent events, chunked or read until the close, which a drain ends
    /// at its next event boundary (`forward::events`); told for an HTTP/1.1 client's answer
    /// (hyper's path tells an HTTP/2 client's).
    events: bool,
}

/// Why an attempt got no answer.
enum Failure {
    /// The request could not be written: the socket was closed.
    Unsent(std::io::Error),
    /// The request was written and nothing of an answer came: a kept socket may have been
    /// closed while it idled.
    Early(std::io::Error),
    Late(SendError),
}

/// Sends the request on a kept socket (or a new one) and reads the answer's head. A kept
/// socket found closed is replaced by a new one once: when the request could not be written,
/// or, for an idempotent method (`resendable`: its body is held whole here), when it was and
/// nothing came back, as nginx sends one again after a cached connection failed
/// (`Http1Pool::request` has the same rule), however short the socket's idle time: a server
/// that closes as a request arrives, unannounced, has closed before the proxy can see it. Once
/// only, and on a new connection: a request that makes the server fail is not sent once per
/// kept socket.
/// `hsts`: the `Strict-Transport-Security` line an answer without one gets (`read_head`).
/// `idempotent`: `resendable(&bufs.request)`, which the caller has asked already.
async fn fetch(
    bufs: &mut Set,
    pool: &UpstreamPool,
    server: usize,
    now: tokio::time::Instant,
    hsts: Option<&[u8]>,
    idempotent: bool,
) -> Result<(RawSocket, Answer), SendError> {
    // `now` is the attempt's start, which the caller has read: a kept socket's idle time is
    // measured from it rather than from a second reading of the clock.
    let mut kept = pool.raw_take(server, now, idempotent);
    loop {
        let since = kept.as_ref().map(|(_, since)| *since);
        let mut up = match kept.take() {
            Some((up, _)) => up,
            None => pool.raw_connect(server).await?,
        };
        match send(bufs, &mut up, hsts).await {
            Ok(answer) => return Ok((up, answer)),
            Err(Failure::Unsent(_)) if since.is_some() => {}
            // A `POST` or `PATCH` that reached a server is never sent twice: it may have
            // acted on it before closing.
            Err(Failure::Early(_)) if since.is_some() && idempotent => {
                tracing::debug!("a kept upstream connection was closed; sending again");
            }
            Err(Failure::Unsent(e) | Failure::Early(e)) => return Err(SendError::Io(e)),
            Err(Failure::Late(e)) => return Err(e),
        }
    }
}

async fn send(bufs: &mut Set, up: &mut RawStream, hsts: Option<&[u8]>) -> Result<Answer, Failure> {
    // A request of which some bytes went out may have reached the server: its failure is
    // `Early`, which a `POST` is not sent again after, not `Unsent`.
    let mut written = 0;
    while written < bufs.request.len() {
        let failed = match up.write(&bufs.request[written..]).await {
            Ok(0) => ErrorKind::WriteZero.into(),
            Ok(n) => {
                written += n;
                continue;
            }
            Err(e) => e,
        };
        // Over TLS a failed write may have sent records already: rustls takes the request
        // into its buffer and writes records out within the same call, which reports the
        // socket's error, not what went before it (helper-135's finding).
        return Err(match written {
            0 if !up.buffered() => Failure::Unsent(failed),
            _ => Failure::Early(failed),
        });
    }
    // rustls takes the request whole and writes what the socket takes: the rest of its
    // records go out here, or the server would wait for them as the relay waits for it.
    if up.buffered() {
        up.flush().await.map_err(Failure::Early)?;
    }
    bufs.answer.clear();
    bufs.answer.reserve(COPY_BUF);
    let head = is_head(&bufs.request);
    let mut got_any = false;
    loop {
        let read = up.read_buf(&mut bufs.answer).await;
        match read {
            Ok(0) if !got_any => {
                return Err(Failure::Early(ErrorKind::UnexpectedEof.into()));
            }
            Ok(0) => {
                return Err(Failure::Late(SendError::Protocol(
                    "the connection closed inside the response head",
                )))
            }
            Ok(_) => got_any = true,
            Err(e) if !got_any => return Err(Failure::Early(e)),
            Err(e) => return Err(Failure::Late(SendError::Io(e))),
        }
        // Interim (1xx) answers are passed over, as hyper's client does.
        loop {
            let sink = match bufs.map.as_mut() {
                Some(map) => Sink::Map(map, &mut bufs.whole),
                None => Sink::Bytes(&mut bufs.out, hsts),
            };
            match read_head(&bufs.answer, head, sink).map_err(Failure::Late)? {
                Head::Partial => break,
                Head::Interim(len) => {
                    bufs.answer.drain(..len);
                }
                Head::Final(answer) => return Ok(answer),
            }
        }
        if bufs.answer.len() >= MAX_UPSTREAM_HEAD {
            return Err(Failure::Late(SendError::Protocol(HEAD_TOO_LARGE)));
        }
        if bufs.answer.capacity() == bufs.answer.len() {
            bufs.answer.reserve(COPY_BUF);
        }
    }
}

enum Head {
    Partial,
    /// A 1xx answer of this length.
    Interim(usize),
    Final(Answer),
}

/// `read_head` for an HTTP/1.1 client, as the relay's own requests call it.
#[cfg(test)]
fn response_head(input: &[u8], head: bool, out: &mut Vec<u8>) -> Result<Head, SendError> {
    read_head(input, head, Sink::Bytes(out, None))
}

/// Where `read_head` puts a final answer's head.
enum Sink<'a> {
    /// Written for an HTTP/1.1 client, with the `Strict-Transport-Security` line (over TLS, when
    /// configured) that the answer gets unless it has its own.
    Bytes(&'a mut Vec<u8>, Option<&'a [u8]>),
    /// Read into a map for hyper's server, as hyper's client reads it (`upstream`), its
    /// values slices of one copy of the head (and of the body, when whole in `input`), kept in
    /// the `Bytes`.
    Map(&'a mut http::HeaderMap, &'a mut Bytes),
}

/// Parses the answer head at the start of `input` and writes the client's head to `sink`:
/// the hop-by-hop headers removed (those `Connection` names too), `date` added when missing,
/// as hyper's server does, and `transfer-encoding: chunked` for a body of unknown length.
/// The answer to a `HEAD` (`head`) has no body, and gets no `transfer-encoding`, as from hyper.
/// Or, for hyper's server (`Sink::Map`), reads the head into a map as hyper's client reads
/// it (`headers_into`). The framing, the refusals and whether the socket is kept are the same.
fn read_head(input: &[u8], head: bool, sink: Sink<'_>) -> Result<Head, SendError> {
    // Uninitialised slots: an answer has a handful of headers, and 100 initialised ones would
    // be 3 KiB written for every answer.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; UPSTREAM_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, input, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Head::Partial),
        Err(_) => return Err(SendError::Protocol("a malformed response head")),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(SendError::Protocol("a malformed response head"));
    };
    if status == 101 {
        return Err(SendError::Protocol(crate::forward::pool::UNASKED_SWITCH));
    }
    if (100..200).contains(&status) {
        return Ok(Head::Interim(len));
    }
    if !(200..1000).contains(&status) {
        return Err(SendError::Protocol("a malformed status"));
    }
    // What `Connection` says, and the framing, before any header is written.
    let (mut close, mut keep_alive) = (false, false);
    let mut named: Vec<&[u8]> = Vec::new();
    let (mut te, mut chunked) = (false, false);
    // The `Content-Length` lines, read as they come rather than gathered: how many, whether
    // one is not `0`, whether a value repeats one before it (`2, 2`, or a second line), and
    // the length they agree on (or why they do not), which counts only when the framing is
    // theirs.
    let (mut lengths, mut nonzero_length, mut repeated) = (0usize, false, false);
    // A length of more than 19 characters (leading zeros) goes on as its number, which
    // HTTP/2 clients can read, as on hyper's path.
    let mut long_length = false;
    let mut length: Result<Option<u64>, &'static str> = Ok(None);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        // By length first: most of an answer's lines are none of the three, and are told so
        // by one compare rather than three.
        let (connection, coding, content_length) = match name.len() {
            10 => (is(name, b"connection"), false, false),
            17 => (false, is(name, b"transfer-encoding"), false),
            14 => (false, false, is(name, b"content-length")),
            _ => continue,
        };
        if connection {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if is(token, b"close") {
                    close = true;
                } else if is(token, b"keep-alive") {
                    keep_alive = true;
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        } else if coding {
            te = true;
            // The last coding decides (RFC 9112 §6.3): chunked there, or read until the close.
            if let Some(last) = h.value.rsplit(|&b| b == b',').next() {
                chunked = is(last.trim_ascii(), b"chunked");
            }
        } else if content_length {
            lengths += 1;
            nonzero_length |= h.value.trim_ascii() != b"0";
            long_length |= h.value.trim_ascii().len() > 19;
            length = length
                .and_then(|known| forward::headers::content_length(h.value, known, &mut repeated));
        }
    }
    // A 204 or 304 has no body whatever its headers say: hyper's client reads none of them,
    // nor those of any answer to a `HEAD`.
    let bodiless = status == 204 || status == 304;
    let unread = bodiless || head;
    if te && version == 0 && !unread {
        // RFC 9112 §6.1: faulty framing; hyper's client refuses it too.
        return Err(SendError::Protocol(
            "Transfer-Encoding in an HTTP/1.0 response",
        ));
    }
    // What the lines say, framing or not, for the one line written of several (below).
    let given = length;
    // With a transfer coding the length is the coding's (RFC 9112 §6.3), as hyper reads it.
    let length = match length {
        _ if te || unread => None,
        Ok(length) => length,
        Err(why) => return Err(SendError::Protocol(why)),
    };
    let framing = match (unread, te, chunked, length) {
        (true, ..) => Framing::None,
        (false, true, true, _) => Framing::Chunked,
        (false, true, false, _) => Framing::Close,
        (false, false, _, Some(n)) => Framing::Length(n),
        (false, false, _, None) => Framing::Close,
    };
    // A 204 with a length or a coding, or a 304 with a coding, may be followed by a body it
    // should not have, which would be read as the next answer: its connection is not kept. A
    // 304's length is the representation's (RFC 9110 §8.6), and common.
    let stray_body = bodiless && (te || (status == 204 && nonzero_length));
    // A server that would close to end a `GET`'s body may close after a `HEAD`'s answer too,
    // and one whose answer announces a body (a length above 0, a coding) may send that body
    // anyway, late: bytes that come once the socket is back in its list, past `pool::quiet`'s
    // look, would be read as the next request's answer, another client's. A `HEAD`'s
    // connection is kept only after a `Content-Length: 0`: `HEAD` is rare, a new connection
    // per such answer cheap.
    let delimited = match head && !bodiless {
        true => !te && lengths > 0 && !nonzero_length,
        false => framing != Framing::Close,
    };
    let reusable = delimited
        && !stray_body
        && match version {
            1 => !close,
            _ => keep_alive && !close,
        };
    let (out, mut hsts) = match sink {
        Sink::Bytes(out, hsts) => (out, hsts),
        Sink::Map(map, whole) => {
            // One copy (and allocation) for the head's values and a small body, where each
            // value and the body were one of their own: some 5 of them in nginx's answers.
            let end = match framing {
                Framing::Length(n) if (input.len() - len) as u64 >= n => len + n as usize,
                _ => len,
            };
            *whole = Bytes::copy_from_slice(&input[..end]);
            headers_into(&resp, input, whole, te, map)?;
            return Ok(Head::Final(Answer {
                status,
                head: len,
                framing,
                reusable,
                events: false,
            }));
        }
    };
    out.clear();
    let reason = resp.reason.unwrap_or("").as_bytes();
    let status_line = input
        .get(..12)
        .filter(|start| start.starts_with(b"HTTP/1.1 "))
        .and_then(|start| written(input, start, b" ", reason, b"\r\n"));
    if status_line.is_none() {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(&[
            b'0' + (status / 100) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
            b' ',
        ]);
        out.extend_from_slice(reason);
        out.extend_from_slice(b"\r\n");
    }
    // The status line and the lines kept after it, copied a run at a time (`Run`).
    let mut run = Run::new(status_line);
    let (mut dated, mut length_written) = (false, false);
    // Which lines are lengths is asked only where it matters, after cheaper tests: a compare
    // per header and answer costs more than the rest of this loop's rules.
    let several_lengths = lengths > 1 || repeated || long_length;
    // A 426 must say which protocol the server requires (RFC 9110 §15.5.22): its `Upgrade`,
    // hop-by-hop, is written again for the client's hop, with the `Connection` option that
    // goes with it (§7.8), as on hyper's path (`forward::finish`).
    let upgrade_required = status == 426;
    let mut upgrade_kept = false;
    // Only a body that is not framed by its length can be an event stream ended at a drain
    // (`forward::events`): an answer of known length pays no compare for it.
    let streamed = matches!(framing, Framing::Chunked | Framing::Close);
    let mut events = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let length = || is(name, b"content-length");
        if streamed && !events && is(name, b"content-type") {
            events = forward::events::is_event_stream(h.value);
        }
        if upgrade_required && is(name, b"upgrade") {
            upgrade_kept = true;
            run.line(out, input, name, h.value);
            continue;
        }
        let hop_by_hop = forward::headers::is_hop_by_hop_name(name)
            // A length named by `Connection` that frames the body stays: hyper's server would
            // write it again from the body's size. It writes none for a body it knows empty.
            // (The server's names may have uppercase letters, which `is` does not expect.)
            || (named.iter().any(|n| name.eq_ignore_ascii_case(n))
                && !(matches!(framing, Framing::Length(_)) && length()));
        let dropped = hop_by_hop
            // With a transfer coding, the length is the coding's, and a proxy removes the line
            // (RFC 9112 §6.3), from a `HEAD`'s answer too, as hyper's client does since 1.13.
            || (te && length())
            // hyper's server writes no length for a `GET`'s 204 or 304, whose body is empty,
            // but a `HEAD`'s 304's as given; none for any 204, which may carry none (RFC 9110
            // §8.6), whatever the method.
            || ((status == 204 || (bodiless && !head)) && length())
            // No trailers can follow an answer with no body: hyper's server drops `Trailer`.
            || (unread && is(name, b"trailer"))
            // A length that is not one number, which no framing reads here (it is refused
            // where it would frame the body), says nothing a client can use, and an HTTP/2
            // client refuses the answer that carries it: none goes on, as on hyper's path.
            || (unread && given.is_err() && length());
        if dropped {
            continue;
        }
        // It writes one length at most. In place of the first, the one its values agree on,
        // whether they frame the body or not (a `HEAD`'s, a 304's): a list (`2, 2`) some
        // clients refuse (Go's) or read as no length (Python's, which then waits for a close).
        if several_lengths && length() {
            if std::mem::replace(&mut length_written, true) {
                continue;
            }
            if let Ok(Some(n)) = given {
                run.flush(out, input);
                h1::push_header(out, name, itoa::Buffer::new().format(n).as_bytes());
                continue;
            }
        }
        dated |= is(name, b"date");
        // The application's own is passed on alone (asked only when one would be added).
        if hsts.is_some() && is(name, b"strict-transport-security") {
            hsts = None;
        }
        run.line(out, input, name, h.value);
    }
    run.flush(out, input);
    if events {
        // A compressed stream has no event boundaries to read (`forward::events::text_coding`):
        // asked of an event stream alone.
        events = resp.headers.iter().all(|h| {
            let name = h.name.as_bytes();
            match () {
                () if is(name, b"content-encoding") => forward::events::text_coding(h.value, b""),
                () if is(name, b"transfer-encoding") => {
                    forward::events::text_coding(h.value, b"chunked")
                }
                () => true,
            }
        });
    }
    if !dated {
        h1::date_header(out);
    }
    if let Some(line) = hsts {
        out.extend_from_slice(line);
    }
    if upgrade_kept {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if matches!(framing, Framing::Chunked | Framing::Close) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Head::Final(Answer {
        status,
        head: len,
        framing,
        reusable,
        events,
    }))
}

/// A connection's two answer deadlines, kept registered across its requests.
struct Clocks<'a> {
    /// The head's (`response_timeout`).
    respond_by: Pin<&'a mut Sleep>,
    /// The body's next piece's (`upstream.read_timeout`).
    read_by: Pin<&'a mut Sleep>,
    /// Set to when the answer was written, when it was read whole and its server's connection
    /// kept, from the reading taken for that (`respond`): the connection's grace is moved
    /// from it.
    answered: &'a mut Option<tokio::time::Instant>,
}

/// What `respond` needs beside the answer.
struct Respond<'a> {
    server: usize,
    start: Instant,
    drain: &'a Drain,
    /// Whether the client's end is watched (`wait`).
    watch: bool,
    /// The answer's deadline (`response_timeout`), which a small answer is held until at
    /// most: `until`, or the first look before it (`answer`), moved to `until` when passed.
    by: Pin<&'a mut Sleep>,
    /// The instant `by` waits for now (`Deadline::At`): the first look or `until`.
    due: tokio::time::Instant,
    until: tokio::time::Instant,
    /// The deadline of the body's next piece (`upstream.read_timeout`).
    read_by: Pin<&'a mut Sleep>,
    /// The body's bytes passed on, counted as they are taken from the server's.
    bytes: &'a mut u64,
    /// Set when the server's side breaks the body off: its end or an error before the body's,
    /// a malformed chunk, a stall past `read_timeout`; not the client's leaving.
    cut: &'a mut bool,
    /// `Clocks::answered`.
    answered: &'a mut Option<tokio::time::Instant>,
}

/// Writes the answer's head and body to the client, and gives the upstream socket back when
/// the answer ended where its framing said; whether the client's connection stays open. Each
/// piece of the body is written as it arrives, before the next is read, but for a small
/// answer of known length, written when whole if that is before its deadline.
async fn respond<C: Client>(
    bufs: &mut Set,
    snap: &Snapshot,
    sock: &mut C,
    mut up: RawSocket,
    answer: Answer,
    to: Respond<'_>,
) -> Next {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    // One reading of the clock for the count and, when the answer came whole with its head
    // (nearly all small ones), for when its socket went idle, as the server's keep-alive
    // timer runs from the end of its answer, not from the end of the client's write. It is
    // set to `None` once more of the body is to be read: a later reading is taken then.
    let now = Instant::now();
    gateway::count_at(snap, to.start, now, status, Outcome::Forwarded);
    let mut idle_since = Some(now);
    let mut watch = to.watch;
    let mut by = to.by;
    let mut due = to.due;
    let mut read_by = to.read_by;
    let Set {
        answer: buf, out, ..
    } = bufs;
    // During a drain the answer closes the connection, as hyper's graceful shutdown does.
    let closing = to.drain.started();
    if closing {
        out.truncate(out.len() - b"\r\n".len());
        out.extend_from_slice(b"connection: close\r\n\r\n");
    }
    let mut at = answer.head;
    // Whether the answer ended exactly where the server stopped sending.
    let clean = match answer.framing {
        Framing::None => {
            if !put(sock, out, snap).await {
                return Next::Broken;
            }
            buf.len() == at
        }
        Framing::Length(length) => {
            // A small answer is written once, whole: a server that writes its head apart
            // from its body (nginx sending a file, many application servers) would otherwise
            // cost the client a second write, segment and read (nginx's `postpone_output`
            // holds such a head too). Not past the answer's deadline, though: a body that
            // stalls has what came of it written then, and the rest as it comes, as a
            // larger answer always has.
            let mut hold = (out.len() as u64).saturating_add(length) <= WHOLE_ANSWER;
            let mut left = length;
            loop {
                let have = (buf.len() - at) as u64;
                let take = have.min(left) as usize;
                // Past the head, a piece is written from where it was read: copied to `out`, it
                // would cost a copy, and a second buffer its size while the client is slow.
                let copy = hold || !out.is_empty();
                if copy {
                    out.extend_from_slice(&buf[at..at + take]);
                }
                left -= take as u64;
                *to.bytes += take as u64;
                if left == 0 || !hold {
                    let whole = at + take == buf.len();
                    let sent = match copy {
                        true => put_piece(sock, out, 0..out.len(), buf, snap).await,
                        false => put_piece(sock, buf, at..at + take, out, snap).await,
                    };
                    if !sent {
                        return Next::Broken;
                    }
                    out.clear();
                    if left == 0 {
                        break whole;
                    }
                }
                at = 0;
                idle_since = None;
                let deadline = match hold {
                    true => Deadline::At(by.as_mut(), due),
                    false => Deadline::idle(read_by.as_mut(), snap),
                };
                let read = match wait(sock, &mut watch, deadline, next_piece(&mut up, buf)).await {
                    Waited::Done(read) => read,
                    Waited::Gone => Err(ErrorKind::ConnectionAborted.into()),
                    Waited::Late if !hold => Err(stalled(snap, to.server)),
                    Waited::Late if due < to.until => {
                        // Only the first look passed: held on, nothing read.
                        due = to.until;
                        buf.clear();
                        continue;
                    }
                    Waited::Late => {
                        // `next_piece` stopped before reading anything: the body has come
                        // no further than `out` holds, which the next turn writes.
                        hold = false;
                        buf.clear();
                        continue;
                    }
                };
                match read {
                    Ok(0) | Err(_) => {
                        *to.cut = servers(&read);
                        // What a held answer had so far still reaches the client, as it
                        // would have unheld, before the connection is broken off.
                        if !out.is_empty() {
                            put(sock, out, snap).await;
                        }
                        return Next::Broken;
                    }
                    Ok(_) => {}
                }
            }
        }
        Framing::Chunked | Framing::Close if answer.events => {
            idle_since = None;
            let stream = EventStream {
                framing: answer.framing,
                server: to.server,
                drain: to.drain,
                bytes: &mut *to.bytes,
                cut: &mut *to.cut,
            };
            let watch = &mut watch;
            match events(
                sock,
                snap,
                &mut up,
                buf,
                out,
                at,
                watch,
                read_by.as_mut(),
                stream,
            )
            .await
            {
                Streamed::Broken => return Next::Broken,
                // The server's answer is left unread: its socket is closed.
                Streamed::Cut => return Next::Close,
                Streamed::Ended(whole) => whole,
            }
        }
        Framing::Chunked => {
            let mut chunks = Chunked::default();
            loop {
                let fed = chunks.feed(&buf[at..], out);
                *to.bytes = chunks.data;
                let Ok(end) = fed else {
                    *to.cut = true;
                    // The chunks that came whole before the bad one still reach the client
                    // (the head too, when both came in one read), as they do when the bad
                    // one comes in a later read, before the connection is broken off.
                    if !out.is_empty() {
                        put(sock, out, snap).await;
                    }
                    return Next::Broken;
                };
                let whole = end.map(|n| at + n == buf.len());
                if !out.is_empty() && !put_piece(sock, out, 0..out.len(), buf, snap).await {
                    return Next::Broken;
                }
                out.clear();
                if let Some(whole) = whole {
                    break whole;
                }
                at = 0;
                idle_since = None;
                let limit = Deadline::idle(read_by.as_mut(), snap);
                let read = piece(sock, &mut watch, &mut up, buf, limit, snap, to.server).await;
                if let Ok(0) | Err(_) = read {
                    *to.cut = servers(&read);
                    return Next::Broken;
                }
            }
        }
        Framing::Close => loop {
            if buf.len() > at {
                *to.bytes += (buf.len() - at) as u64;
                let mut size = [0u8; 16];
                out.extend_from_slice(hex((buf.len() - at) as u64, &mut size));
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&buf[at..]);
                out.extend_from_slice(b"\r\n");
            }
            if !out.is_empty() && !put_piece(sock, out, 0..out.len(), buf, snap).await {
                return Next::Broken;
            }
            out.clear();
            at = 0;
            idle_since = None;
            let limit = Deadline::idle(read_by.as_mut(), snap);
            match piece(sock, &mut watch, &mut up, buf, limit, snap, to.server).await {
                Ok(0) => {
                    if !put(sock, b"0\r\n\r\n", snap).await {
                        return Next::Broken;
                    }
                    break false;
                }
                Ok(_) => {}
                read @ Err(_) => {
                    *to.cut = servers(&read);
                    return Next::Broken;
                }
            }
        },
    };
    if clean && answer.reusable {
        let since = idle_since.map_or_else(tokio::time::Instant::now, |now| now.into());
        snap.pool.raw_put(to.server, up, since);
        *to.answered = Some(since);
    }
    Next::after(true, closing)
}

/// What `events` streams, beside the buffers.
struct EventStream<'a> {
    framing: Framing,
    server: usize,
    drain: &'a Drain,
    /// The body's bytes passed on.
    bytes: &'a mut u64,
    /// `Respond::cut`.
    cut: &'a mut bool,
}

/// Whether a read of the server's body that ended it early (`read`, an end or an error) was
/// the server's doing, a stall past `read_timeout` included, rather than the client's leaving
/// (`piece`, `wait`).
fn servers(read: &std::io::Result<usize>) -> bool {
    !matches!(read, Err(e) if e.kind() == ErrorKind::ConnectionAborted)
}

/// How an event stream's answer ended (`events`).
enum Streamed {
    /// Broken off, as any answer whose server or client fails.
    Broken,
    /// Where the server ended it; whether exactly where the server stopped sending.
    Ended(bool),
    /// Ended at a drain, between two events, the rest of the server's answer unread.
    Cut,
}

/// Writes the body of a stream of server-sent events (`Answer::events`), chunked or read
/// until the close, as `respond` writes any such body, on chunked; but once a drain has begun
/// (before the answer, or during it), ends it with its last chunk at its next event boundary,
/// at once when no event is in flight (`forward::events`). Its data is decoded from the
/// server's chunks and framed again for each piece, so that a piece can be cut short where
/// an event ends: only such answers pay for that, and for reading their pieces' last bytes.
#[allow(clippy::too_many_arguments)] // `respond`'s buffers and clocks, lent
async fn events<C: Client>(
    sock: &mut C,
    snap: &Snapshot,
    up: &mut RawStream,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    mut at: usize,
    watch: &mut bool,
    mut read_by: Pin<&mut Sleep>,
    stream: EventStream<'_>,
) -> Streamed {
    let EventStream {
        framing,
        server,
        drain,
        bytes,
        cut: server_cut,
    } = stream;
    let mut chunks = Chunked {
        decode: true,
        ..Chunked::default()
    };
    let mut boundary = forward::events::Boundary::default();
    // Within the connection, which holds its guard: only watched, not counted again.
    let mut guard = drain.watch();
    let fired = guard.fired();
    tokio::pin!(fired);
    let mut draining = false;
    loop {
        // The piece's data goes after what `out` holds (the answer's head, at first).
        let start = out.len();
        let (ended, broken) = match framing {
            Framing::Chunked => match chunks.feed(&buf[at..], out) {
                Ok(end) => (end.map(|n| at + n == buf.len()), false),
                // The chunks that came whole before the bad one still reach the client.
                Err(()) => (None, true),
            },
            _ => {
                out.extend_from_slice(&buf[at..]);
                (None, false)
            }
        };
        draining = draining || drain.started();
        let cut = match draining && !broken {
            true => boundary.cut(&out[start..]),
            false => {
                boundary.follow(&out[start..]);
                None
            }
        };
        if let Some(n) = cut {
            out.truncate(start + n);
        }
        *bytes += (out.len() - start) as u64;
        chunk(out, start);
        if cut.is_some() || ended.is_some() {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if broken {
            *server_cut = true;
            if boundary.between() {
                out.extend_from_slice(b"0\r\n\r\n");
                return ended_between(sock, out, snap).await;
            }
            put(sock, out, snap).await;
            return Streamed::Broken;
        }
        if !out.is_empty() && !put_piece(sock, out, 0..out.len(), buf, snap).await {
            return Streamed::Broken;
        }
        out.clear();
        if cut.is_some() {
            return Streamed::Cut;
        }
        if let Some(whole) = ended {
            return Streamed::Ended(whole);
        }
        at = 0;
        loop {
            if draining && boundary.between() {
                return match put(sock, b"0\r\n\r\n", snap).await {
                    true => Streamed::Cut,
                    false => Streamed::Broken,
                };
            }
            let read = {
                let mut next = std::pin::pin!(next_piece(up, buf));
                let either = poll_fn(|cx| {
                    if let Poll::Ready(read) = next.as_mut().poll(cx) {
                        return Poll::Ready(Some(read));
                    }
                    match draining {
                        true => Poll::Pending,
                        false => fired.as_mut().poll(cx).map(|()| None),
                    }
                });
                wait(sock, watch, Deadline::idle(read_by.as_mut(), snap), either).await
            };
            match read {
                // The drain began while the stream waited: ended now if between events.
                Waited::Done(None) => draining = true,
                Waited::Done(Some(Ok(0))) if framing == Framing::Close => {
                    return match put(sock, b"0\r\n\r\n", snap).await {
                        true => Streamed::Ended(false),
                        false => Streamed::Broken,
                    };
                }
                Waited::Done(Some(Ok(0) | Err(_))) => {
                    *server_cut = true;
                    if boundary.between() {
                        return ended_between(sock, b"0\r\n\r\n", snap).await;
                    }
                    return Streamed::Broken;
                }
                Waited::Gone => return Streamed::Broken,
                Waited::Done(Some(Ok(_))) => break,
                Waited::Late => {
                    stalled(snap, server);
                    *server_cut = true;
                    if boundary.between() {
                        return ended_between(sock, b"0\r\n\r\n", snap).await;
                    }
                    return Streamed::Broken;
                }
            }
        }
    }
}

/// Ends an event stream whose server broke off (reset, closed mid-body, malformed chunk,
/// silent for `upstream.read_timeout`) between two events, as a drain ends one (`last` ends
/// with the last chunk): no event is lost, and the client's `EventSource` reconnects as after
/// any end, where a broken answer (curl exits 18) is a failure to other SSE clients. The
/// server's connection is closed, as after a drain's cut; the access log still says `cut`.
/// Broken off mid-event, a stream is still broken off: a part must not pass for an event.
async fn ended_between<C: Client>(sock: &mut C, last: &[u8], snap: &Snapshot) -> Streamed {
    match put(sock, last, snap).await {
        true => Streamed::Cut,
        false => Streamed::Broken,
    }
}

/// Frames `out[start..]`, a piece of a body's data, as one chunk; nothing when it is empty.
fn chunk(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len == 0 {
        return;
    }
    let mut digits = [0u8; 16];
    let size = hex(len as u64, &mut digits);
    out.splice(start..start, size.iter().chain(b"\r\n").copied());
    out.extend_from_slice(b"\r\n");
}

/// `next_piece`, given up (an error) when the client closes its connection meanwhile: a body
/// that stalls is not waited for once nobody wants it, as hyper's server stops reading it
/// when it reads the client's end mid-message; nor past `by` (`upstream.read_timeout`), said
/// in the log with the `server`.
async fn piece<C: Client>(
    sock: &mut C,
    watch: &mut bool,
    up: &mut RawStream,
    buf: &mut Vec<u8>,
    by: Deadline<'_>,
    snap: &Snapshot,
    server: usize,
) -> std::io::Result<usize> {
    match wait(sock, watch, by, next_piece(up, buf)).await {
        Waited::Done(read) => read,
        Waited::Gone => Err(ErrorKind::ConnectionAborted.into()),
        Waited::Late => Err(stalled(snap, server)),
    }
}

/// Says why an answer is cut short when the server let its body stall past
/// `upstream.read_timeout` (nginx's `proxy_read_timeout`): the client then sees its
/// connection closed mid-answer, which only the server's silence explains.
fn stalled(snap: &Snapshot, server: usize) -> std::io::Error {
    if let Some(limit) = snap.config.upstream.read_timeout {
        let stalled = crate::body::Stalled(limit);
        if let Some(more) = forward::said(&snap.passive, Some(server), forward::Line::CutShort) {
            tracing::warn!(server = %snap.pool.servers[server], "{stalled}; the answer is cut short{more}");
        }
    }
    ErrorKind::TimedOut.into()
}

/// Reads the next piece of a body into `buf`, emptied first. A read that filled the buffer
/// doubles it, up to `MAX_COPY_BUF`, so that a large body moves in fewer system calls, as
/// hyper's adaptive read buffer does; `serve` lets a grown buffer go after the answer, and
/// `put_piece` when the client stalls, after which it starts again from `COPY_BUF`.
async fn next_piece(up: &mut RawStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let filled = buf.len() == buf.capacity();
    buf.clear();
    if buf.capacity() < COPY_BUF {
        buf.reserve(COPY_BUF);
    } else if filled && buf.capacity() < MAX_COPY_BUF {
        buf.reserve(buf.capacity() * 2);
    }
    up.read_buf(buf).await
}

/// `n` in lowercase hexadecimal, in `buf`.
fn hex(mut n: u64, buf: &mut [u8; 16]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[(n % 16) as usize];
        n /= 16;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Writes the outage response this request would get from hyper's path; whether the client's
/// connection stays open.
async fn outage<C: Client>(
    bufs: &mut Set,
    snap: &Snapshot,
    sock: &mut C,
    head: usize,
    drain: &Drain,
    served: &mut Served,
) -> Next {
    let mut req = echoed(&bufs.input[..head]);
    // A gRPC-Web call's deadline, less the time the failed forward took of it.
    let elapsed = served.start.elapsed();
    crate::hold::negotiate::grpc_deadline_left(req.headers_mut(), elapsed);
    let resp = gateway::outage_answer(snap, &req);
    let closing = drain.started();
    let failed = Outcome::Failed;
    own_answer(resp, failed, closing, bufs, snap, sock, served).await
}

/// Writes the drain's `503` (`gateway::stopping`) to a request still waiting for its answer's
/// head as the drain nears its end, as hyper's path answers it; the connection closes.
async fn stopped<C: Client>(
    bufs: &mut Set,
    snap: &Snapshot,
    sock: &mut C,
    served: &mut Served,
) -> Next {
    // Counted as hyper's path counts it (`gateway`): the proxy's own answer, no failure.
    let stopping = Outcome::Reserved;
    own_answer(
        gateway::stopping(),
        stopping,
        true,
        bufs,
        snap,
        sock,
        served,
    )
    .await
}

/// Writes an answer of the proxy's own to a request it did not forward, counted as
/// `outcome`; with `closing`, it says `Connection: close` and the connection closes after it.
async fn own_answer<C: Client>(
    resp: http::Response<crate::body::Body>,
    outcome: Outcome,
    closing: bool,
    bufs: &mut Set,
    snap: &Snapshot,
    sock: &mut C,
    served: &mut Served,
) -> Next {
    gateway::count(snap, served.start.into_std(), resp.status(), outcome);
    served.status = resp.status().as_u16();
    let (mut parts, body) = resp.into_parts();
    // Whole (`Held::respond`, `gateway::stopping`).
    let body = body.into_ready().unwrap_or_default();
    let head_only = is_head(&bufs.request);
    served.bytes = if head_only { 0 } else { body.len() as u64 };
    if closing {
        let close = HeaderValue::from_static("close");
        parts.headers.insert(http::header::CONNECTION, close);
    }
    if let Some(hsts) = snap.hsts(C::TLS) {
        hsts.add_to(&mut parts.headers);
    }
    bufs.out.clear();
    h1::encode(&parts, &body, head_only, &mut bufs.out);
    Next::after(put(sock, &bufs.out, snap).await, closing)
}

/// The request `head` holds (taken by `prepare`, so it parses), as the outage response's
/// negotiation reads it. Only on a failed forward.
fn echoed(head: &[u8]) -> Request<()> {
    let mut req = Request::new(());
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    if parsed.parse_with_uninit_headers(head, &mut slots).is_err() {
        return req;
    }
    // `HEAD` gets no body; a preflight is answered as such (`hold::cors`).
    if let Some(method) = parsed.method.and_then(|m| m.parse().ok()) {
        *req.method_mut() = method;
    }
    if let Some(uri) = parsed.path.and_then(|p| p.parse().ok()) {
        *req.uri_mut() = uri;
    }
    for h in parsed.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            req.headers_mut().append(name, value);
        }
    }
    req
}

/// A chunked body read as it comes and written again as hyper's server writes it: the same
/// chunks, without chunk extensions or trailers (hyper sends trailers only to a request that
/// asked for them with `TE: trailers`, which the relay leaves to hyper). Its framing is read
/// byte by byte, as strictly as hyper's decoder reads it; its data is copied in runs.
#[derive(Debug, Default)]
struct Chunked {
    state: ChunkState,
    /// The size of the chunk being read, then what is left of its data.
    size: u64,
    /// The data passed on so far, for the access log.
    data: u64,
    /// The bytes of chunk extensions read so far, over the whole body.
    extensions: u64,
    /// The trailer section as read, kept to be checked once whole (not passed on); empty,
    /// and unallocated, for the body that has none.
    trailers: Vec<u8>,
    /// Its lines so far.
    trailer_lines: usize,
    /// Decoding for an HTTP/2 client (`Relayed`): the data alone is written, with no chunk
    /// framing, and the trailer section is kept, to be passed on as trailers.
    decode: bool,
}

/// What hyper's client takes of a chunked body before it breaks it off (`proto::h1::decode`:
/// `CHUNKED_EXTENSIONS_LIMIT`, its head size limit for the trailers, `DEFAULT_MAX_HEADERS`),
/// so that an answer the relay passes on is one hyper's path would pass on too.
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
const TRAILERS_LIMIT: usize = crate::forward::pool::MAX_RESPONSE_HEAD;
const TRAILER_LINES_LIMIT: usize = 100;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Before the chunk size's first digit.
    #[default]
    Size,
    SizeDigits,
    /// Blanks after the size: only an extension or the line's end may follow.
    SizeBlank,
    /// In a chunk extension, dropped.
    Extension,
    /// The size line's LF.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
}

impl Chunked {
    /// Follows `input`, the next bytes of the body, and appends them re-framed to `out`; the
    /// length of `input` that ends the body, when it does. `Err` for what is not chunked
    /// framing.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, ()> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() {
            if self.state == Data {
                let take = self.size.min((input.len() - i) as u64) as usize;
                out.extend_from_slice(&input[i..i + take]);
                i += take;
                self.size -= take as u64;
                self.data += take as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size | SizeDigits, b) if b.is_ascii_hexdigit() => {
                    let digit = u64::from((b as char).to_digit(16).ok_or(())?);
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .ok_or(())?;
                    SizeDigits
                }
                (SizeDigits | SizeBlank, b' ' | b'\t') => SizeBlank,
                (SizeDigits | SizeBlank, b';') => Extension,
                (SizeDigits | SizeBlank | Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(()),
                (Extension, _) => {
                    self.extensions += 1;
                    if self.extensions >= EXTENSIONS_LIMIT {
                        return Err(());
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => {
                    if !self.decode {
                        let mut digits = [0u8; 16];
                        out.extend_from_slice(hex(self.size, &mut digits));
                        out.extend_from_slice(b"\r\n");
                    }
                    Data
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    if !self.decode {
                        out.extend_from_slice(b"\r\n");
                    }
                    Size
                }
                (TrailerStart, b'\r') => {
                    self.trailer(b)?;
                    EndLf
                }
                (TrailerStart | TrailerLine, b'\n') => return Err(()),
                (TrailerLine, b'\r') => {
                    self.trailer(b)?;
                    TrailerLf
                }
                (TrailerStart | TrailerLine, _) => {
                    // Kept from a line's first byte on, as hyper keeps it.
                    self.trailers.push(b);
                    if self.trailers.len() >= TRAILERS_LIMIT {
                        return Err(());
                    }
                    TrailerLine
                }
                (TrailerLf, b'\n') => {
                    if self.trailer_lines >= TRAILER_LINES_LIMIT {
                        return Err(());
                    }
                    self.trailer_lines += 1;
                    self.trailer(b)?;
                    TrailerStart
                }
                (EndLf, b'\n') => {
                    self.trailer(b)?;
                    if !self.trailers.is_empty()
                        && !trailers_valid(&self.trailers, self.trailer_lines)
                    {
                        return Err(());
                    }
                    if !self.decode {
                        self.trailers = Vec::new();
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return Ok(Some(i));
                }
                _ => return Err(()),
            };
        }
        Ok(None)
    }

    /// Keeps a line end of the trailer section once it has begun, within `TRAILERS_LIMIT`.
    fn trailer(&mut self, b: u8) -> Result<(), ()> {
        if self.trailers.is_empty() {
            return Ok(());
        }
        self.trailers.push(b);
        if self.trailers.len() >= TRAILERS_LIMIT {
            return Err(());
        }
        Ok(())
    }
}

/// Whether hyper's client reads `section`, a chunked body's trailer lines with the empty line
/// that ends them, as fields (`decode_trailers`): each a valid header name and value, so that a
/// server's broken trailers break the answer off on both paths alike. Trailers themselves are
/// not passed on.
fn trailers_valid(section: &[u8], lines: usize) -> bool {
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => fields.iter().all(|f| {
            HeaderName::from_bytes(f.name.as_bytes()).is_ok()
                && HeaderValue::from_bytes(f.value).is_ok()
        }),
        _ => false,
    }
}

/// Whether `req`, an HTTP/2 client's request as `forward::forward` made it for an HTTP/1.1
/// server, is sent by `upstream` exactly as hyper's HTTP/1.1 client would write it: no body,
/// or one held whole (`Body::Full`) with one `Content-Length` of plain digits that says its
/// size, and nothing that asks hyper for more than its head and body as they are (`CONNECT`,
/// `Connection`, `Transfer-Encoding`, `Upgrade`). Everything else (a streamed upload, a
/// body with trailers) stays on hyper's path.
pub fn fits(req: &Request<crate::body::Body>) -> bool {
    use http::header;
    let headers = req.headers();
    fits_body(req)
        && !headers.contains_key(header::CONNECTION)
        && !headers.contains_key(header::TRANSFER_ENCODING)
        && !headers.contains_key(header::UPGRADE)
}

/// `fits` but for the three fields, which `forward::Hop::write` refuses as it writes the rest
/// (`encode_for` asks `fits` of a request it leaves to the map): three lookups in the map
/// were some 350 instructions of each HTTP/2 client's request (README, "Performance").
pub fn fits_body(req: &Request<crate::body::Body>) -> bool {
    use crate::body::Body;
    if req.method() == http::Method::CONNECT {
        return false;
    }
    match req.body() {
        Body::Empty => true,
        Body::Full(Some(bytes)) => {
            let mut lengths = req.headers().get_all(http::header::CONTENT_LENGTH).iter();
            match (lengths.next(), lengths.next()) {
                (Some(length), None) => {
                    let digits = length.as_bytes();
                    !digits.is_empty()
                        && digits.len() <= 19
                        && digits.iter().all(u8::is_ascii_digit)
                        && std::str::from_utf8(digits)
                            .ok()
                            .and_then(|d| d.parse::<u64>().ok())
                            == Some(bytes.len() as u64)
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// Writes `req` (`fits`) as hyper's HTTP/1.1 client writes it: the method, the path (the
/// target of an `http://` server's request, and of an `https://` one's over HTTP/1.1, as
/// `UpstreamPool::https` makes it), its headers as the map holds them, lowercase and in its
/// order, and the body after the head. With `hop`, the fields as the hop's rules make them
/// for its server (`forward::Hop::write`): false, and `out` to be written again, for a request
/// whose rewrite is left to its map.
fn encode(
    req: &Request<crate::body::Body>,
    hop: Option<(&forward::Hop<'_>, &Upstream)>,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    match hop {
        Some((hop, server)) => {
            if !hop.write(req.headers(), server, out) {
                return false;
            }
        }
        None => {
            for (name, value) in req.headers() {
                h1::push_header(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    if let crate::body::Body::Full(Some(bytes)) = req.body() {
        out.extend_from_slice(bytes);
    }
    true
}

/// Writes `req` (`fits_body`) into `out`, with `hop` its fields rewritten for `server`: from
/// the fields as they came where `forward::Hop::write` can (which refuses what `fits` would),
/// else through the map (`forward::Hop::apply`). A request whose rewritten map does not `fit`
/// is given back, rewritten, for hyper's path; without `hop` it must `fit` already.
fn encode_for(
    mut req: Request<crate::body::Body>,
    hop: Option<(&forward::Hop<'_>, &Upstream)>,
    out: &mut Vec<u8>,
) -> Option<Request<crate::body::Body>> {
    if !encode(&req, hop, out) {
        if let Some((hop, server)) = hop {
            hop.apply(req.headers_mut(), server);
            if !fits(&req) {
                out.clear();
                return Some(req);
            }
        }
        encode(&req, None, out);
    }
    None
}

/// A request written for its server (`encoded`), in the buffer set its exchange will use.
pub struct Encoded(Buffers);

/// Writes `req`, an HTTP/2 client's request that `fits_body` (with `hop`, its fields as they
/// came; else rewritten already, and `fits`), for HTTP/1.1 server `server` (`encode_for`), to
/// be sent by `upstream`; or gives it back, rewritten by `hop`, when what the rewrite left does
/// not `fit`, for hyper's path to send.
pub fn encoded(
    req: Request<crate::body::Body>,
    hop: Option<(&forward::Hop<'_>, &Upstream)>,
) -> Result<Encoded, Box<Request<crate::body::Body>>> {
    let mut set = Buffers::take();
    match encode_for(req, hop, &mut set.set().request) {
        None => Ok(Encoded(set)),
        Some(req) => Err(Box::new(req)),
    }
}

/// Sends `req` (`encoded`) to HTTP/1.1 server `server` on a kept raw socket (or a new one), as
/// the relay sends its own requests (`fetch`: the same sockets, the same rule for sending one
/// again on a new socket, `FRESH` for one that cannot be), and gives the answer as hyper's
/// client gives it to `forward::finish`: its head read into a header map as hyper reads it
/// (names lowercase, in order, a `Content-Length` beside a `Transfer-Encoding` removed), its
/// body streamed from the socket (`Relayed`), which goes back to its list once the body is
/// read whole. Interim answers are passed over, and an answer hyper's client would refuse is
/// refused (`read_head`).
pub async fn upstream(
    pool: &UpstreamPool,
    server: usize,
    req: Encoded,
) -> Result<http::Response<crate::body::Body>, SendError> {
    use crate::body::Body;
    let mut set = req.0;
    let bufs = set.set();
    bufs.map = Some(http::HeaderMap::new());
    // Its head goes to hyper's server, whose answers get the header in `gateway::finish`.
    let idempotent = resendable(&bufs.request);
    let now = tokio::time::Instant::now();
    let (up, answer) = fetch(bufs, pool, server, now, None, idempotent).await?;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(answer.status)
        .map_err(|_| SendError::Protocol("a malformed status"))?;
    // hyper's client says HTTP/1.0 of an HTTP/1.0 answer, which `forward::finish` makes
    // HTTP/1.1 (the version of the client's hop is its own): HTTP/1.1 either way.
    parts.version = http::Version::HTTP_11;
    parts.headers = bufs.map.take().unwrap_or_default();
    let whole = std::mem::take(&mut bufs.whole);
    let rest = &bufs.answer[answer.head..];
    let give_back = |up: RawSocket, clean: bool| {
        if clean && answer.reusable {
            pool.raw_put(server, up, tokio::time::Instant::now());
        }
    };
    let body = match answer.framing {
        Framing::None | Framing::Length(0) => {
            give_back(up, rest.is_empty());
            Body::Empty
        }
        Framing::Length(length) if rest.len() as u64 >= length => {
            // Whole in the first read (nearly every small answer): given at once, its socket
            // back before the client has it, as a `Lent` body gives its connection back with
            // its last piece. Its bytes are in the copy its header values share (`read_head`).
            let length = length as usize;
            give_back(up, rest.len() == length);
            Body::Full(Some(whole.slice(answer.head..answer.head + length)))
        }
        framing => {
            let flow = match framing {
                Framing::Length(left) => Flow::Length(left),
                Framing::Chunked => Flow::Chunked,
                Framing::None | Framing::Close => Flow::Close,
            };
            let mut buf = vec![0; rest.len().max(body_room(framing))];
            buf[..rest.len()].copy_from_slice(rest);
            Body::Relayed(Box::new(Relayed {
                up: Some(up),
                end: rest.len(),
                buf,
                at: 0,
                flow,
                reusable: answer.reusable,
                // Only a body read later needs its list at hand: the others are given back
                // here, with no handle taken.
                home: pool.raw_home(server),
                chunks: Chunked {
                    decode: true,
                    ..Chunked::default()
                },
                out: Vec::new(),
                trailers: None,
                done: false,
            }))
        }
    };
    Ok(http::Response::from_parts(parts, body))
}

/// Room for reading a `Relayed` body of `framing`: `COPY_BUF`, or less for a shorter body
/// of known length (a head and a small body read apart, as from a server that sends a file
/// after its head), with a byte more to see one sent past its end, which closes the socket
/// (`Relayed::ended`) as it does with more room. Initialised room (no unsafe code here): 16
/// KiB zeroed for every such answer, however small.
fn body_room(framing: Framing) -> usize {
    match framing {
        Framing::Length(left) => left.saturating_add(1).min(COPY_BUF as u64) as usize,
        _ => COPY_BUF,
    }
}

/// The answer's headers (`resp`) as hyper's client reads them into its map
/// (`proto::h1::role::Client::parse`): every line, names lowercase, in order, and no
/// `Content-Length` beside a `Transfer-Encoding` (`te`). `forward::finish` then takes out the
/// hop-by-hop ones, as for an answer from hyper's client.
fn headers_into(
    resp: &httparse::Response<'_, '_>,
    input: &[u8],
    whole: &Bytes,
    te: bool,
    map: &mut http::HeaderMap,
) -> Result<(), SendError> {
    const MALFORMED: SendError = SendError::Protocol("a malformed response head");
    map.clear();
    map.reserve(resp.headers.len());
    for h in resp.headers.iter() {
        // A `Connection` naming no field (nginx's `keep-alive` on every answer) was put in
        // the map only for `forward::finish` to take it out again, some 1,000 instructions
        // of an HTTP/2 client's request; whether the socket is kept was read before. One that
        // names fields stays, for `finish` to drop them.
        if h.name.len() == 10 && is(h.name.as_bytes(), b"connection") && names_no_field(h.value) {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| MALFORMED)?;
        // The value where it lies in `whole`, a copy of `input`'s start (httparse gives
        // slices of `input`): the same bytes, and the same checks, as `from_bytes`'s copy.
        let at = (h.value.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
        let value = match at.checked_add(h.value.len()) {
            Some(end) if end <= whole.len() => HeaderValue::from_maybe_shared(whole.slice(at..end)),
            _ => HeaderValue::from_bytes(h.value),
        };
        map.append(name, value.map_err(|_| MALFORMED)?);
    }
    if te {
        map.remove(http::header::CONTENT_LENGTH);
    }
    Ok(())
}

/// Whether a `Connection` value holds only `keep-alive` and `close` tokens (or none).
fn names_no_field(value: &[u8]) -> bool {
    value.split(|&b| b == b',').all(|token| {
        let token = token.trim_ascii();
        token.is_empty() || is(token, b"keep-alive") || is(token, b"close")
    })
}

/// How a `Relayed` body ends.
#[derive(Debug)]
enum Flow {
    /// After this many more bytes.
    Length(u64),
    /// At its last chunk and trailers (`Chunked`, decoding).
    Chunked,
    /// When the server closes.
    Close,
}

/// An answer's body read from its raw upstream socket for hyper's server (an HTTP/2
/// client's, `upstream`), as hyper's client's body would give it: its data as it comes, a
/// chunked body's trailers as trailers, an error where hyper's would fail (the socket closed
/// before the end, broken chunked framing). The socket goes back to its list when the body
/// ended cleanly (nothing read past its end) and the server keeps it open; dropped, it closes.
pub struct Relayed {
    up: Option<RawSocket>,
    /// Read bytes are `buf[at..end]`. Initialised once: a read needs initialised room, and
    /// this crate has no unsafe code to grow a vector past its length.
    buf: Vec<u8>,
    at: usize,
    end: usize,
    flow: Flow,
    reusable: bool,
    home: Option<std::sync::Arc<crate::forward::pool::RawList>>,
    chunks: Chunked,
    /// A chunked body's data, decoded from `buf`.
    out: Vec<u8>,
    /// A chunked body's trailers, given after its data.
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl Relayed {
    /// The body has ended: its socket goes back when `clean` (nothing past the end) and the
    /// server keeps it, or is closed.
    fn ended(&mut self, clean: bool) {
        self.done = true;
        if let Some(up) = self.up.take() {
            if let Some(home) = self.home.as_ref().filter(|_| clean && self.reusable) {
                home.put(up, tokio::time::Instant::now());
            }
        }
    }

    /// Breaks the body off with `why`, closing its socket.
    fn broken(&mut self, why: std::io::Error) -> Poll<Option<Result<Frame, crate::body::Error>>> {
        self.done = true;
        self.up = None;
        self.trailers = None;
        Poll::Ready(Some(Err(why.into())))
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame, crate::body::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if self.at < self.end {
                let have = &self.buf[self.at..self.end];
                match &mut self.flow {
                    Flow::Length(left) => {
                        let take = (*left).min(have.len() as u64) as usize;
                        let data = Bytes::copy_from_slice(&have[..take]);
                        *left -= take as u64;
                        self.at += take;
                        if *left == 0 {
                            self.ended(self.at == self.end);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Flow::Close => {
                        let data = Bytes::copy_from_slice(have);
                        self.at = self.end;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Flow::Chunked => {
                        self.out.clear();
                        match self.chunks.feed(have, &mut self.out) {
                            Err(()) => {
                                return self.broken(std::io::Error::new(
                                    ErrorKind::InvalidData,
                                    "invalid chunked framing in the response body",
                                ))
                            }
                            Ok(None) => self.at = self.end,
                            Ok(Some(n)) => {
                                self.at += n;
                                let section = std::mem::take(&mut self.chunks.trailers);
                                if !section.is_empty() {
                                    match trailer_map(&section, self.chunks.trailer_lines) {
                                        Some(map) => self.trailers = Some(map),
                                        None => {
                                            return self.broken(std::io::Error::new(
                                                ErrorKind::InvalidData,
                                                "invalid trailers in the response body",
                                            ))
                                        }
                                    }
                                }
                                self.ended(self.at == self.end);
                            }
                        }
                        if !self.out.is_empty() {
                            let data = Bytes::copy_from_slice(&self.out);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        continue;
                    }
                }
            }
            (self.at, self.end) = (0, 0);
            let Some(up) = self.up.as_mut() else {
                return Poll::Ready(None);
            };
            let mut room = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut **up).poll_read(cx, &mut room) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return self.broken(e),
                Poll::Ready(Ok(())) => {}
            }
            let read = room.filled().len();
            if read == 0 {
                if matches!(self.flow, Flow::Close) {
                    self.ended(false);
                    continue;
                }
                return self.broken(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the connection closed before the response body's end",
                ));
            }
            self.end = read;
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match self.flow {
            Flow::Length(left) if !self.done => http_body::SizeHint::with_exact(left),
            Flow::Length(_) => http_body::SizeHint::with_exact(0),
            Flow::Chunked | Flow::Close => http_body::SizeHint::default(),
        }
    }
}

type Frame = http_body::Frame<Bytes>;

/// A trailer section (`Chunked::trailers`, whole) as hyper's client reads it
/// (`decode_trailers`); `None` where it would fail.
fn trailer_map(section: &[u8], lines: usize) -> Option<http::HeaderMap> {
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(section, &mut fields)
    else {
        return None;
    };
    let mut map = http::HeaderMap::new();
    for f in fields.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(f.value).ok()?;
        map.append(name, value);
    }
    Some(map)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The spare sets a burst left are let go of once a whole period passed without them,
    /// and those a steady load takes in every period are kept.
    #[test]
    fn spare_sets_unused_for_a_period_are_let_go_of() {
        let spares = || SPARE.with(|s| (s.borrow().sets.len(), s.borrow().bytes));
        let one = Buffers::take().set().size();
        trim_spares();
        trim_spares();
        assert_eq!(spares(), (0, 0));
        // A burst: 40 requests at once.
        let burst: Vec<Buffers> = (0..40).map(|_| Buffers::take()).collect();
        drop(burst);
        assert_eq!(spares().0, 40);
        assert_eq!(
            trim_spares(),
            0,
            "a period with the burst in it keeps its sets"
        );
        // Then a steady trickle of 3 at once: 37 sets not taken in the whole period.
        for _ in 0..100 {
            let load: Vec<Buffers> = (0..3).map(|_| Buffers::take()).collect();
            drop(load);
        }
        assert_eq!(trim_spares(), 37);
        let (sets, bytes) = spares();
        assert_eq!(sets, 3);
        assert_eq!(bytes, 3 * one, "the bytes follow the sets");
        // Idle for a whole period: none kept.
        assert_eq!(trim_spares(), 3);
        assert_eq!(spares(), (0, 0));
    }

    /// A buffer set moves in and out of the spares as a pointer: inline, its 220 bytes were
    /// copied three times, and a default built in its place, for every forwarded request.
    #[test]
    fn a_buffer_set_moves_as_a_pointer() {
        assert_eq!(std::mem::size_of::<Buffers>(), std::mem::size_of::<usize>());
        let mut held = Buffers::default();
        assert!(
            held.0.is_none(),
            "a connection between requests holds no set"
        );
        held.set().have = 5;
        held.release();
        assert!(held.0.is_none());
        assert_eq!(
            held.set().have,
            0,
            "a set comes back from the spares emptied"
        );
    }

    /// The wait for a client's next request relies on the waker the watch on its end stored
    /// (`Plain`) only when that watch did store it: out of coop budget, tokio's peek returns
    /// `Pending` having stored none, and a wait that relied on it would never be woken. When
    /// it did, the next request wakes the task, and a look finds it without the lock.
    #[tokio::test]
    async fn the_wait_for_a_request_relies_only_on_a_waker_the_watch_stored() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut served, _) = listener.accept().await.unwrap();
        let mut plain = Plain::new(&mut served);
        poll_fn(|cx| {
            while let Poll::Ready(spent) = tokio::task::coop::poll_proceed(cx) {
                spent.made_progress();
            }
            assert!(plain.poll_gone(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert!(!plain.waiting, "out of budget, the peek stored no waker");
        // The budget is renewed for the task's next poll.
        tokio::task::yield_now().await;
        let pending = poll_fn(|cx| Poll::Ready(plain.poll_gone(cx).is_pending())).await;
        assert!(pending);
        assert!(plain.waiting);
        assert!(!poll_fn(|cx| Poll::Ready(plain.readable(cx))).await);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let woken = poll_fn(|cx| match plain.readable(cx) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        });
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("the request wakes the task through the waker the watch stored");
        let mut room = [0u8; 64];
        let read = poll_fn(|cx| Pin::new(&mut plain).poll_read(cx, &mut ReadBuf::new(&mut room)));
        read.await.unwrap();
        assert!(
            !plain.waiting,
            "a read forgets the waker: the readiness may be cleared"
        );
    }

    const CONFIG: &str =
        "[upstream]\nservers = [\"http://127.0.0.1:9\"]\n[log]\naccess_log = false\n";

    fn conn() -> Conn {
        Conn::new("192.0.2.7:40000".parse().unwrap(), false)
    }

    fn prepared(snap: &Snapshot, input: &str) -> Option<String> {
        let mut out = Vec::new();
        let Prepared::Take(used, _) = prepare(snap, &conn(), input.as_bytes(), &mut out) else {
            return None;
        };
        assert_eq!(
            used,
            input.find("\r\n\r\n").unwrap() + 4,
            "the head's length"
        );
        Some(String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_plain_get_is_rewritten_from_its_own_bytes() {
        let snap = crate::state::snapshot::for_tests(CONFIG, false);
        let got = prepared(
            &snap,
            "GET /a/b?c=d HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 6.6.6.6\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nAccept: text/html\r\n\
             FORWARDED: for=6.6.6.6;host=evil\r\nContent-Length: 0\r\nX-Mixed-Case: Yes\r\n\
             X-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\n\r\nGET /next",
        )
        .unwrap();
        assert_eq!(
            got,
            "GET /a/b?c=d HTTP/1.1\r\nHost: shop.example\r\nAccept: text/html\r\n\
             Content-Length: 0\r\nX-Mixed-Case: Yes\r\nx-forwarded-for: 6.6.6.6, 192.0.2.7\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\n\
             x-real-ip: 192.0.2.7\r\n\r\n"
        );
        // The access log line's method and path are read back from it.
        assert_eq!(request_line(got.as_bytes()), ("GET", "/a/b?c=d"));
        let head = prepared(&snap, "HEAD /h HTTP/1.1\r\nHost: shop.example\r\n\r\n").unwrap();
        assert_eq!(
            head,
            "HEAD /h HTTP/1.1\r\nHost: shop.example\r\nx-forwarded-for: 192.0.2.7\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\nx-real-ip: 192.0.2.7\r\n\r\n"
        );
        assert_eq!(request_line(head.as_bytes()), ("HEAD", "/h"));
        // Lines copied as runs of the input, broken where a line is dropped or is written
        // again in pieces (no space after its colon, spaces around its value).
        let pieces = prepared(
            &snap,
            "\r\nGET / HTTP/1.1\r\nHost: a\r\nX-A:b\r\nX-B: c\r\nX-C: d\r\n\
             Connection: keep-alive\r\nX-D: e  \r\nX-E: f\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            pieces,
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\nX-B: c\r\nX-C: d\r\nX-D: e\r\nX-E: f\r\n\
             x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: a\r\n\
             x-real-ip: 192.0.2.7\r\n\r\n"
        );
    }

    /// Every name hyper's path keeps from trusted peers only, in any case, goes from anyone
    /// else here too, and its `_` alias from everyone; a trusted peer's passes as sent.
    #[test]
    fn every_name_kept_from_trusted_peers_only_goes_from_others_on_the_relay() {
        let trusting = "[proxy]\ntrusted_proxies = [\"192.0.2.0/24\"]\n\
                        [upstream]\nservers = [\"http://127.0.0.1:9\"]\n";
        let trusted = crate::state::snapshot::for_tests(trusting, false);
        let others = crate::state::snapshot::for_tests(CONFIG, false);
        for only in &forward::headers::FROM_TRUSTED_ONLY {
            let upper = only.as_str().to_ascii_uppercase();
            let alias = only.as_str().replace('-', "_");
            let request = format!(
                "GET / HTTP/1.1\r\nHost: shop.example\r\n{upper}: theirs\r\n\
                 {alias}: alias\r\nAccept: */*\r\n\r\n"
            );
            let got = prepared(&others, &request).unwrap();
            assert!(!got.contains("theirs"), "{only} kept: {got}");
            assert!(!got.contains("alias"), "{alias} kept: {got}");
            assert!(got.contains("Accept: */*\r\n"), "{got}");
            let got = prepared(&trusted, &request).unwrap();
            assert!(
                got.contains(&format!("{upper}: theirs\r\n")),
                "{only}: {got}"
            );
            assert_eq!(
                alias != only.as_str(),
                !got.contains("alias"),
                "{alias}: {got}"
            );
        }
    }

    /// The client a trusted peer names, for the access line, is the one `allow_ips` reads
    /// (`bypass::client_ip`), looked for only with the access log on, from a trusted peer;
    /// the peer itself is no other client.
    #[test]
    fn the_client_a_trusted_peer_names_is_the_one_allow_ips_reads() {
        let trusting = "[proxy]\ntrusted_proxies = [\"192.0.2.0/24\", \"10.0.0.0/8\"]\n\
                        [upstream]\nservers = [\"http://127.0.0.1:9\"]\n";
        let logged = |config: &str| {
            crate::state::snapshot::for_tests(&format!("{config}[log]\naccess_log = true\n"), false)
        };
        let untrusting = "[upstream]\nservers = [\"http://127.0.0.1:9\"]\n";
        let (trusted, others) = (logged(trusting), logged(untrusting));
        let quiet = format!("{trusting}[log]\naccess_log = false\n");
        let quiet = crate::state::snapshot::for_tests(&quiet, false);
        let named = |snap: &Snapshot, lines: &str| {
            let request = format!("GET / HTTP/1.1\r\nHost: a\r\n{lines}\r\n");
            match prepare(snap, &conn(), request.as_bytes(), &mut Vec::new()) {
                Prepared::Take(_, client) => client.map(|ip| ip.to_string()),
                got => panic!("{got:?}"),
            }
        };
        let client = Some("203.0.113.9".to_string());
        for lines in [
            "X-Forwarded-For: 203.0.113.9\r\n",
            "x-forwarded-for: 198.51.100.66, 203.0.113.9, 10.1.2.3\r\n",
            "X-Forwarded-For: 198.51.100.66\r\nX-Forwarded-For: 203.0.113.9, 10.1.2.3\r\n",
            "Forwarded: for=203.0.113.9;proto=https\r\n",
            "FORWARDED: for=198.51.100.66, for=\"203.0.113.9:443\"\r\n",
        ] {
            assert_eq!(named(&trusted, lines), client, "{lines:?}");
            assert_eq!(named(&others, lines), None, "untrusted: {lines:?}");
            assert_eq!(named(&quiet, lines), None, "access log off: {lines:?}");
        }
        // No list, a list of trusted hops only, or one naming the peer: the peer.
        for lines in [
            "",
            "Accept: */*\r\n",
            "X-Forwarded-For: 192.0.2.7\r\n",
            "X-Forwarded-For: ::ffff:192.0.2.7\r\n",
            "X-Client-IP: 203.0.113.9\r\n",
        ] {
            assert_eq!(named(&trusted, lines), None, "{lines:?}");
        }
        // An entry that is no address ends the walk at the last one that was.
        let garbled = "X-Forwarded-For: 203.0.113.9, nonsense, 10.1.2.3\r\n";
        assert_eq!(named(&trusted, garbled), Some("10.1.2.3".into()));
    }

    #[test]
    fn a_trusted_peer_s_forwarded_headers_are_kept_and_appended_to() {
        let trusting = "[proxy]\ntrusted_proxies = [\"192.0.2.0/24\"]\n\
                        [upstream]\nservers = [\"http://127.0.0.1:9\"]\n";
        let snap = crate::state::snapshot::for_tests(trusting, false);
        let others = crate::state::snapshot::for_tests(CONFIG, false);
        let host = "Host: shop.example\r\n";
        // (the peer's X-Forwarded-* lines, what the server gets from a trusted peer)
        let cases = [
            ("", "x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\nx-real-ip: 192.0.2.7\r\n"),
            (
                "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n",
                "X-Forwarded-Proto: https\r\nx-forwarded-for: 203.0.113.9, 192.0.2.7\r\nx-forwarded-host: shop.example\r\nx-real-ip: 192.0.2.7\r\n",
            ),
            (
                "Forwarded: for=203.0.113.9;proto=https\r\n",
                "Forwarded: for=203.0.113.9;proto=https\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\nx-real-ip: 192.0.2.7\r\n",
            ),
            (
                "X-Forwarded-For: 203.0.113.9 \r\nX-Forwarded-For: \r\nX-Forwarded-For: 198.51.100.2, 10.0.0.1\r\n\
                 X-Forwarded-Host: www.example\r\nX-Forwarded-Host: other\r\n",
                "X-Forwarded-Host: www.example\r\nX-Forwarded-Host: other\r\n\
                 x-forwarded-for: 203.0.113.9, 198.51.100.2, 10.0.0.1, 192.0.2.7\r\nx-forwarded-proto: http\r\nx-real-ip: 192.0.2.7\r\n",
            ),
            (
                "X-Real-IP: 203.0.113.9\r\nTrue-Client-IP: 203.0.113.9\r\n",
                "X-Real-IP: 203.0.113.9\r\nTrue-Client-IP: 203.0.113.9\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\n",
            ),
        ];
        for (theirs, want) in cases {
            let request = format!("GET / HTTP/1.1\r\n{host}{theirs}\r\n");
            let got = prepared(&snap, &request).unwrap();
            assert_eq!(
                got,
                format!("GET / HTTP/1.1\r\n{host}{want}\r\n"),
                "{theirs:?}"
            );
            // What hyper's path makes of the same lines.
            let mut map = http::HeaderMap::new();
            for line in format!("{host}{theirs}").lines() {
                let (name, value) = line.split_once(':').unwrap();
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                map.append(name, HeaderValue::from_str(value.trim()).unwrap());
            }
            forward::headers::set_forwarded(&mut map, &conn().client, true);
            for line in want.lines() {
                let (name, value) = line.split_once(": ").unwrap();
                let all: Vec<_> = map
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect();
                assert!(all.contains(&value), "{theirs:?}: {name}: {all:?}");
                assert_eq!(
                    all.len(),
                    want.matches(&format!("{name}:")).count(),
                    "{name}"
                );
            }
            // From anyone else, the list is appended to all the same (SPEC §3), the other
            // three are this hop's, and `Forwarded` and `True-Client-IP` go.
            let got = prepared(&others, &request).unwrap();
            assert!(
                !got.lines().any(|l| {
                    let l = l.to_ascii_lowercase();
                    l.starts_with("forwarded:") || l.starts_with("true-client-ip:")
                }),
                "{got}"
            );
            let addresses = got
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("x-real-ip:"));
            assert_eq!(
                addresses.collect::<Vec<_>>(),
                ["x-real-ip: 192.0.2.7"],
                "{got}"
            );
            let xff = want.lines().find(|l| l.starts_with("x-forwarded-for: "));
            assert!(
                got.ends_with(&format!(
                    "{}\r\nx-forwarded-proto: http\r\nx-forwarded-host: shop.example\r\n\
                     x-real-ip: 192.0.2.7\r\n\r\n",
                    xff.unwrap()
                )),
                "{got}"
            );
        }
    }

    #[test]
    fn what_hyper_must_read_is_left_to_it() {
        let snap = crate::state::snapshot::for_tests(CONFIG, false);
        let host = "Host: a\r\n";
        let cases = [
            format!("CONNECT a:443 HTTP/1.1\r\n{host}\r\n"),
            format!("TRACE / HTTP/1.1\r\n{host}\r\n"),
            format!("OPTIONS * HTTP/1.1\r\n{host}\r\n"),
            format!("GET / HTTP/1.0\r\n{host}\r\n"),
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
            format!("POST / HTTP/1.1\r\n{host}Content-Length: +5\r\n\r\nhello"),
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 5, 5\r\n\r\nhello"),
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 0x5\r\n\r\nhello"),
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 123456\r\n\r\n"),
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 8193\r\n\r\n"),
            format!("POST / HTTP/1.1\r\n{host}Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{host}Expect: 100-continue\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{host}TE: trailers\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
            format!("GET / HTTP/1.1\r\n{host}{host}\r\n"),
            "GET / HTTP/1.1\r\nAccept: */*\r\n\r\n".to_string(),
            format!("GET http://a/ HTTP/1.1\r\n{host}\r\n"),
            format!("GET /a#frag HTTP/1.1\r\n{host}\r\n"),
            format!("GET /_intermission/status HTTP/1.1\r\n{host}\r\n"),
            format!("GET /_intermission/status?a=/b HTTP/1.1\r\n{host}\r\n"),
            format!("GET /a\"b\" HTTP/1.1\r\n{host}\r\n"),
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n".to_string(),
            format!(
                "GET / HTTP/1.1\r\n{}\r\n",
                "X-A: 1\r\n".repeat(MAX_HEADERS + 1)
            ),
        ];
        for case in &cases {
            let got = prepare(&snap, &conn(), case.as_bytes(), &mut Vec::new());
            assert_eq!(got, Prepared::Hyper, "{case:?}");
        }
        let plain = format!("GET / HTTP/1.1\r\n{host}\r\n");
        assert!(prepared(&snap, &plain).is_some());
        // A body whole in what has arrived goes with its head; one still arriving waits for
        // the rest.
        let post = format!("POST /orders HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\nhelloGET");
        let mut out = Vec::new();
        let got = prepare(&snap, &conn(), post.as_bytes(), &mut out);
        assert_eq!(got, Prepared::Take(post.len() - 3, None), "{post:?}");
        assert!(
            out.ends_with(b"\r\n\r\nhello"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(out.starts_with(b"POST /orders HTTP/1.1\r\n"));
        let partial = &post.as_bytes()[..post.len() - 6];
        let got = prepare(&snap, &conn(), partial, &mut out);
        assert_eq!(got, Prepared::Partial, "{partial:?}");
        // Up to a read's worth in all, head and body.
        let head = format!("PUT /x HTTP/1.1\r\n{host}Content-Length: ");
        let fits = READ_BUF - head.len() - "dddd\r\n\r\n".len();
        let full = format!("{head}{fits:04}\r\n\r\n{}", "b".repeat(fits));
        assert_eq!(full.len(), READ_BUF);
        let got = prepare(&snap, &conn(), full.as_bytes(), &mut out);
        assert_eq!(got, Prepared::Take(READ_BUF, None));
        let over = format!("{head}{:04}\r\n\r\n{}", fits + 1, "b".repeat(fits));
        let got = prepare(&snap, &conn(), over.as_bytes(), &mut out);
        assert_eq!(got, Prepared::Hyper, "a byte over");
        let zeros = format!("POST /x HTTP/1.1\r\n{host}Content-Length: 005\r\n\r\nhello");
        let got = prepare(&snap, &conn(), zeros.as_bytes(), &mut out);
        assert_eq!(got, Prepared::Take(zeros.len(), None), "its length padded");
        // A body a method gives no meaning: hyper's path closes the server's connection after.
        for method in ["GET", "HEAD", "DELETE", "OPTIONS"] {
            let odd = format!("{method} /x HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\nhello");
            let got = prepare(&snap, &conn(), odd.as_bytes(), &mut out);
            assert_eq!(got, Prepared::Hyper, "{odd:?}");
        }
        assert!(head_whole(partial) && !head_whole(&partial[..partial.len() - 3]));
        for method in ["PUT", "PATCH", "DELETE", "OPTIONS"] {
            let empty = format!("{method} /x HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n");
            assert!(prepared(&snap, &empty).is_some(), "{empty:?}");
        }
        let query = format!("GET /s?f[a]=1|2&p=/_intermission/ HTTP/1.1\r\n{host}\r\n");
        assert!(prepared(&snap, &query).is_some());
        let servers = "[upstream]\nservers = [\"http://127.0.0.1:9\"]\n";
        // The access log is written here too.
        let logged = crate::state::snapshot::for_tests(
            &format!("{servers}[log]\naccess_log = true\n"),
            false,
        );
        assert!(prepared(&logged, &plain).is_some());
        for (config, why) in [
            (
                format!("{servers}intercept_statuses = [502]\n"),
                "an intercepted answer",
            ),
            (
                "[upstream]\nservers = [\"h2c://127.0.0.1:9\"]\n".into(),
                "an h2c server",
            ),
        ] {
            let snap = crate::state::snapshot::for_tests(&config, false);
            let got = prepare(&snap, &conn(), plain.as_bytes(), &mut Vec::new());
            assert_eq!(got, Prepared::Hyper, "{why}");
            let got = prepare(&snap, &conn(), b"GET / HT", &mut Vec::new());
            assert_eq!(got, Prepared::Hyper, "{why}, before the head is whole");
        }
        let held = crate::state::snapshot::for_tests(CONFIG, true);
        let got = prepare(&held, &conn(), plain.as_bytes(), &mut Vec::new());
        assert_eq!(got, Prepared::Hyper, "held");
        // The start of a head that may be taken is read on.
        for cut in [1, 8, plain.len() - 1] {
            let got = prepare(&snap, &conn(), &plain.as_bytes()[..cut], &mut Vec::new());
            assert_eq!(got, Prepared::Partial, "{cut} bytes");
        }
    }

    fn head(input: &str) -> (String, Answer) {
        answer_to(input, false)
    }

    /// The client's head and the answer made of `input`, the answer to a `HEAD` with `head`.
    fn answer_to(input: &str, head: bool) -> (String, Answer) {
        let mut out = Vec::new();
        match response_head(input.as_bytes(), head, &mut out).unwrap() {
            Head::Final(answer) => (String::from_utf8(out).unwrap(), answer),
            _ => panic!("no final head in {input:?}"),
        }
    }

    /// No answer to a `HEAD` has a body; its server connection is kept only after a
    /// `Content-Length: 0`: not when the server would have closed to end a `GET`'s body, nor
    /// when it announced one, which it may send late, as the next request's answer.
    #[test]
    fn an_answer_to_a_head_has_no_body_and_is_kept_only_when_it_announces_none() {
        let date = "Date: Thu, 03 Dec 2026 09:00:00 GMT\r\n";
        for (headers, kept) in [
            ("Content-Length: 0\r\n", true),
            ("Content-Length: 5\r\n", false),
            ("Transfer-Encoding: chunked\r\n", false),
            ("Transfer-Encoding: chunked\r\nContent-Length: 7\r\n", false),
            ("Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", false),
            ("Content-Length: nonsense\r\n", false),
            ("Content-Length: 0\r\nConnection: close\r\n", false),
            ("", false),
            ("Transfer-Encoding: gzip\r\n", false),
            ("Content-Length: 5\r\nConnection: close\r\n", false),
        ] {
            let (out, answer) = answer_to(&format!("HTTP/1.1 200 OK\r\n{date}{headers}\r\n"), true);
            assert_eq!(answer.framing, Framing::None, "{headers}");
            assert_eq!(answer.reusable, kept, "{headers}");
            assert!(!out.contains("transfer-encoding"), "{out}");
            // Beside a transfer coding a length is void, and removed (RFC 9112 §6.3); one that
            // is no number goes too.
            let length = headers
                .lines()
                .find(|l| l.starts_with("Content-Length"))
                .filter(|_| !headers.contains("Transfer-Encoding"))
                .filter(|l| !l.contains("nonsense"));
            assert_eq!(
                length,
                out.lines().find(|l| l.starts_with("Content-Length")),
                "{out}"
            );
        }
        // A 204's, to a `HEAD` too, is delimited by its status; a 304's length is the
        // representation's.
        let (_, answer) = answer_to(&format!("HTTP/1.1 204 No Content\r\n{date}\r\n"), true);
        assert!(answer.reusable);
        let input = format!("HTTP/1.1 304 Not Modified\r\n{date}Content-Length: 5\r\n\r\n");
        assert!(answer_to(&input, true).1.reusable);
    }

    #[test]
    fn an_answer_head_loses_its_hop_by_hop_headers_and_keeps_its_framing() {
        let input = "HTTP/1.1 200 Fine\r\nDate: Thu, 03 Dec 2026 09:00:00 GMT\r\nConnection: X-Secret, keep-alive\r\n\
             X-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: Yes\r\nContent-Length: 2\r\n\r\nok";
        let (out, answer) = head(input);
        assert_eq!(answer.head, input.len() - "ok".len());
        assert_eq!(
            out,
            "HTTP/1.1 200 Fine\r\nDate: Thu, 03 Dec 2026 09:00:00 GMT\r\nX-Kept: Yes\r\n\
             Content-Length: 2\r\n\r\n"
        );
        assert_eq!(answer.framing, Framing::Length(2));
        assert_eq!(answer.status, 200);
        assert!(answer.reusable);

        // Chunked wins over a length, which goes; the coding is this hop's and is said again.
        let (out, answer) =
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n");
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(!out.to_lowercase().contains("content-length"), "{out}");
        assert!(
            out.contains("date: "),
            "a date is added when the server gave none: {out}"
        );
        assert_eq!(answer.framing, Framing::Chunked);

        // A length named by `Connection` still frames the body.
        let (out, answer) =
            head("HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\n");
        assert!(out.contains("\r\nContent-Length: 2\r\n"), "{out}");
        assert_eq!(answer.framing, Framing::Length(2));

        let cases = [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Framing::Close,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::Close, false),
            // A body it should not have may follow: not kept.
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                Framing::None,
                false,
            ),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
                Framing::None,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::None,
                false,
            ),
            // A 304's length is the representation's; nothing in its headers is read.
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                Framing::None,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 10, 11\r\n\r\n",
                Framing::None,
                true,
            ),
            (
                "HTTP/1.0 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::None,
                false,
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", Framing::None, true),
            // The coding decides; a length beside it is not even read.
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n",
                Framing::Length(3),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
                Framing::Length(3),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
                Framing::Length(3),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n",
                Framing::Length(3),
                true,
            ),
        ];
        for (input, framing, reusable) in cases {
            let (out, answer) = head(input);
            assert_eq!(
                (answer.framing, answer.reusable),
                (framing, reusable),
                "{input:?}"
            );
            assert!(out.starts_with("HTTP/1.1 "), "{out}");
            assert_eq!(
                out.contains("transfer-encoding: chunked"),
                matches!(framing, Framing::Chunked | Framing::Close),
                "{input:?}: {out}"
            );
        }
    }

    /// An answer of type `text/event-stream` that is not framed by its length is an event
    /// stream the relay ends at a drain, unless its bytes are coded (compressed), where no
    /// event boundary can be read.
    #[test]
    fn only_an_uncoded_event_stream_is_told_an_event_stream() {
        let date = "Date: Thu, 03 Dec 2026 09:00:00 GMT\r\n";
        let sse = "Content-Type: text/event-stream\r\n";
        for (headers, events) in [
            ("Transfer-Encoding: chunked\r\n", true),
            ("", true),
            (
                "Content-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
                true,
            ),
            ("Content-Length: 5\r\n", false),
            (
                "Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                false,
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Encoding: br\r\n",
                false,
            ),
            ("Content-Encoding: gzip\r\n", false),
            ("Transfer-Encoding: gzip, chunked\r\n", false),
            ("Transfer-Encoding: gzip\r\n", false),
        ] {
            let input = format!("HTTP/1.1 200 OK\r\n{date}{sse}{headers}\r\n");
            let (_, answer) = answer_to(&input, false);
            assert_eq!(answer.events, events, "{headers}");
        }
    }

    /// Over TLS with `tls.hsts_*`, an answer gets the `Strict-Transport-Security` line unless
    /// the server sent its own, which goes on alone; one the server named in `Connection`
    /// (hop-by-hop, so dropped) is replaced.
    #[test]
    fn an_answer_gets_the_hsts_line_unless_it_has_its_own() {
        let line = b"strict-transport-security: max-age=600\r\n";
        let date = "Date: Thu, 03 Dec 2026 09:00:00 GMT\r\n";
        for (headers, want) in [
            ("", vec!["strict-transport-security: max-age=600"]),
            (
                "Strict-Transport-Security: max-age=5\r\n",
                vec!["Strict-Transport-Security: max-age=5"],
            ),
            (
                "Connection: strict-transport-security\r\nStrict-Transport-Security: max-age=5\r\n",
                vec!["strict-transport-security: max-age=600"],
            ),
        ] {
            let input = format!("HTTP/1.1 200 OK\r\n{date}{headers}Content-Length: 0\r\n\r\n");
            let mut out = Vec::new();
            let read = read_head(input.as_bytes(), false, Sink::Bytes(&mut out, Some(line)));
            assert!(matches!(read, Ok(Head::Final(_))), "{input:?}");
            let out = String::from_utf8(out).unwrap();
            let sts = |out: &str| -> Vec<String> {
                out.split("\r\n")
                    .filter(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("strict-transport-security:")
                    })
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(sts(&out), want, "{input:?}");
            assert!(out.ends_with("\r\n\r\n"), "{out:?}");
            // Without the setting (or over plaintext) the server's own alone goes on.
            let (plain, _) = head(&input);
            let own: Vec<&str> = want.into_iter().filter(|l| !l.ends_with("600")).collect();
            assert_eq!(sts(&plain), own, "{plain:?}");
        }
    }

    /// An answer's status line and header lines reach the client as `written` copies them
    /// when they are written as the relay writes them, and written again when they are not:
    /// always HTTP/1.1, one space before the reason and after the colon, CRLF.
    #[test]
    fn answer_lines_are_passed_on_as_written_or_written_again() {
        let date = "Date: Thu, 03 Dec 2026 09:00:00 GMT\r\n";
        for (status, line) in [
            ("HTTP/1.1 200 OK", "HTTP/1.1 200 OK"),
            ("HTTP/1.1 200 ", "HTTP/1.1 200 "),
            ("HTTP/1.1 204", "HTTP/1.1 204 "),
            ("HTTP/1.0 200 Fine", "HTTP/1.1 200 Fine"),
            ("\r\nHTTP/1.1 200 OK", "HTTP/1.1 200 OK"),
        ] {
            let input = format!("{status}\r\n{date}Content-Length: 0\r\n\r\n");
            let (out, _) = head(&input);
            assert_eq!(out.split("\r\n").next(), Some(line), "{input:?}");
        }
        for (header, written) in [
            ("X-A: b", "X-A: b"),
            ("X-A:b", "X-A: b"),
            ("X-A:  b \t", "X-A: b"),
            ("X-A:", "X-A: "),
            ("X-A: ", "X-A: "),
        ] {
            for end in ["\r\n", "\n"] {
                let input =
                    format!("HTTP/1.1 200 OK\r\n{date}{header}{end}Content-Length: 0\r\n\r\n");
                let (out, _) = head(&input);
                let lines: Vec<&str> = out.split("\r\n").collect();
                assert!(lines.contains(&written), "{input:?} gave {out:?}");
            }
        }
    }

    /// Which fault an answer's head is refused for, where it has several.
    #[test]
    fn an_answer_head_is_refused_for_its_first_fault() {
        let mut out = Vec::new();
        for (bad, why) in [
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 response",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: x\r\n\r\n",
                "an invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: x\r\nContent-Length: 2\r\n\r\n",
                "an invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\nContent-Length: x\r\n\r\n",
                "differing Content-Length values",
            ),
        ] {
            match response_head(bad.as_bytes(), false, &mut out) {
                Err(SendError::Protocol(got)) => assert_eq!(got, why, "{bad:?}"),
                other => panic!("{bad:?}: {:?}", other.is_ok()),
            }
        }
        // Agreeing lines frame the body, and one is written.
        let (out, answer) =
            head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(answer.framing, Framing::Length(3));
        assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
    }

    /// A length whose values repeat one another and agree (a list, several lines) goes on as
    /// one line of its digits, in place of the first and with its name as given, where it is
    /// written at all: a `HEAD`'s answer and a 304 to one included. One line of digits goes on
    /// as given. Values that do not agree or are no number, read by no framing there, go: an
    /// HTTP/2 client refuses an answer with such a length, and it tells no one anything.
    #[test]
    fn a_repeated_length_goes_on_as_one_line_of_digits() {
        let cases = [
            (
                "Content-Length: 3, 3\r\n",
                false,
                &["Content-Length: 3"][..],
            ),
            ("content-LENGTH: 3,3\r\n", false, &["content-LENGTH: 3"]),
            (
                "Content-Length: 3 ,\t3, 3\r\n",
                false,
                &["Content-Length: 3"],
            ),
            (
                "Content-Length: 3, 3\r\nContent-Length: 3\r\n",
                false,
                &["Content-Length: 3"],
            ),
            (
                "Content-Length: 3\r\nContent-Length: 3, 3\r\n",
                false,
                &["Content-Length: 3"],
            ),
            (
                "Content-Length: 003\r\nContent-Length: 3\r\n",
                false,
                &["Content-Length: 3"],
            ),
            ("Content-Length: 3\r\n", false, &["Content-Length: 3"]),
            ("Content-Length: 003\r\n", false, &["Content-Length: 003"]),
            ("Content-Length:  3 \t\r\n", false, &["Content-Length: 3"]),
            ("Content-Length: 3, 3\r\n", true, &["Content-Length: 3"]),
            (
                "Content-Length: 3\r\nContent-Length: 3\r\n",
                true,
                &["Content-Length: 3"],
            ),
            ("Content-Length: 2, 3\r\n", true, &[]),
            ("Content-Length: 2\r\nContent-Length: 3\r\n", true, &[]),
            ("Content-Length: 0x03\r\n", true, &[]),
            ("Content-Length: +3\r\n", true, &[]),
            ("Content-Length: 3 3\r\n", true, &[]),
            ("Content-Length: 99999999999999999999\r\n", true, &[]),
            ("Content-Length: 10000000000000000000\r\n", true, &[]),
            (
                "Content-Length: 00000000000000000003\r\n",
                false,
                &["Content-Length: 3"],
            ),
            (
                "Content-Length: 00000000000000000003\r\n",
                true,
                &["Content-Length: 3"],
            ),
            ("Content-Length: 3\r\nContent-Length: x\r\n", true, &[]),
        ];
        for (lengths, to_head, want) in cases {
            for status in ["200 OK", "304 Not Modified"] {
                if status.starts_with("304") && !to_head {
                    continue;
                }
                let input = format!("HTTP/1.1 {status}\r\nX-A: b\r\n{lengths}X-Z: y\r\n\r\n");
                let (out, answer) = answer_to(&input, to_head);
                let lines: Vec<&str> = out
                    .split("\r\n")
                    .filter(|l| l.to_ascii_lowercase().starts_with("content-length"))
                    .collect();
                assert_eq!(lines, want, "{input:?}: {out}");
                let lower = out.to_ascii_lowercase();
                let next = if want.is_empty() { "x-z" } else { "content-" };
                assert!(
                    lower.contains(&format!("x-a: b\r\n{next}")),
                    "{input:?}: {out}"
                );
                if !to_head {
                    assert_eq!(answer.framing, Framing::Length(3), "{input:?}");
                }
            }
        }
    }

    /// The lines this hop adds, whichever of them a trusted peer's own replace, over either
    /// transport.
    #[test]
    fn the_added_lines_are_whole_whichever_a_trusted_peer_sent() {
        let trusting = "[proxy]\ntrusted_proxies = [\"192.0.2.0/24\"]\n\
                        [upstream]\nservers = [\"http://127.0.0.1:9\"]\n";
        let snap = crate::state::snapshot::for_tests(trusting, false);
        for tls in [false, true] {
            let conn = Conn::new("192.0.2.7:40000".parse().unwrap(), tls);
            for mask in 0..8 {
                let (proto, host, address) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
                let mut request = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
                let mut want = request.clone();
                for (sent, line) in [
                    (proto, "X-Forwarded-Proto: p\r\n"),
                    (host, "X-Forwarded-Host: h\r\n"),
                    (address, "X-Real-IP: 1.2.3.4\r\n"),
                ] {
                    if sent {
                        request.push_str(line);
                        want.push_str(line);
                    }
                }
                request.push_str("\r\n");
                want.push_str("x-forwarded-for: 192.0.2.7\r\n");
                if !proto {
                    let scheme = if tls { "https" } else { "http" };
                    want.push_str(&format!("x-forwarded-proto: {scheme}\r\n"));
                }
                if !host {
                    want.push_str("x-forwarded-host: a\r\n");
                }
                if !address {
                    want.push_str("x-real-ip: 192.0.2.7\r\n");
                }
                want.push_str("\r\n");
                let mut out = Vec::new();
                let got = prepare(&snap, &conn, request.as_bytes(), &mut out);
                assert!(matches!(got, Prepared::Take(..)), "{request:?}: {got:?}");
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    want,
                    "{request:?} tls {tls}"
                );
            }
        }
    }

    /// `resendable` reads a request's method as `forward::idempotent` does, whatever its case.
    #[test]
    fn resendable_is_idempotent_by_the_methods_bytes() {
        for method in [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "get",
            "Head", "PROPFIND", "GETS", "GE", "", "G\u{7f}T",
        ] {
            let want =
                http::Method::from_bytes(method.as_bytes()).is_ok_and(|m| forward::idempotent(&m));
            let request = format!("{method} / HTTP/1.1\r\n\r\n");
            assert_eq!(resendable(request.as_bytes()), want, "{method:?}");
        }
    }

    /// `written` finds a line only where the slices it is given sit in the input.
    #[test]
    fn written_copies_only_what_sits_in_the_input() {
        let input = b"Host: a\r\nX: b\r\n";
        let (name, value) = (&input[..4], &input[6..7]);
        assert_eq!(written(input, name, b": ", value, b"\r\n"), Some((0, 9)));
        let (second, its) = (&input[9..10], &input[12..13]);
        assert_eq!(written(input, second, b": ", its, b"\r\n"), Some((9, 6)));
        // The same bytes elsewhere, a value that is not the line's, the wrong separator.
        let copy = input.to_vec();
        assert_eq!(written(input, &copy[..4], b": ", value, b"\r\n"), None);
        assert_eq!(written(&input[2..], name, b": ", value, b"\r\n"), None);
        assert_eq!(written(input, name, b": ", &input[14..15], b"\r\n"), None);
        assert_eq!(written(input, name, b":", value, b"\r\n"), None);
    }

    /// An answer's lines go out in order, whatever is dropped or written again between them.
    #[test]
    fn answer_lines_go_out_in_order_around_what_is_dropped_or_rewritten() {
        let (out, _) = head(
            "HTTP/1.1 200 OK\r\nServer: s\r\nConnection: keep-alive, X-Gone\r\n\
             Date: Thu, 03 Dec 2026 09:00:00 GMT\r\nX-A:b\r\nX-Gone: 1\r\n\
             Content-Length: 0\r\nKeep-Alive: timeout=5\r\nX-B: c\r\nX-C: d\r\n\r\n",
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nServer: s\r\nDate: Thu, 03 Dec 2026 09:00:00 GMT\r\n\
             X-A: b\r\nContent-Length: 0\r\nX-B: c\r\nX-C: d\r\n\r\n"
        );
        // Two lengths written as one, between lines passed on as they came.
        let (out, _) = head(
            "HTTP/1.1 200 OK\r\nX-A: a\r\nContent-Length: 2, 2\r\nX-B: b\r\n\
             Date: Thu, 03 Dec 2026 09:00:00 GMT\r\n\r\nhi",
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nX-A: a\r\nContent-Length: 2\r\nX-B: b\r\n\
             Date: Thu, 03 Dec 2026 09:00:00 GMT\r\n\r\n"
        );
    }

    #[test]
    fn a_broken_or_interim_answer_head_is_told_apart() {
        let mut out = Vec::new();
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "NOT HTTP AT ALL\r\n\r\n",
        ] {
            assert!(
                response_head(bad.as_bytes(), false, &mut out).is_err(),
                "{bad:?}"
            );
        }
        let interim = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        assert!(matches!(
            response_head(interim.as_bytes(), false, &mut out),
            Ok(Head::Interim(n)) if n == interim.len()
        ));
        assert!(matches!(
            response_head(b"HTTP/1.1 200 OK\r\nContent-Le", false, &mut out),
            Ok(Head::Partial)
        ));
    }

    #[test]
    fn a_chunked_body_is_written_again_without_extensions_or_trailers_however_it_is_split() {
        let body = b"4;name=value\r\nWiki\r\n5 \t;x\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Sum: 1\r\nX-More: 2\r\n\r\n";
        let want = b"4\r\nWiki\r\n5\r\npedia\r\ne\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n";
        let mut whole = body.to_vec();
        whole.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let mut out = Vec::new();
        assert_eq!(
            Chunked::default().feed(&whole, &mut out),
            Ok(Some(body.len()))
        );
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want));
        for split in 0..body.len() {
            let (mut chunks, mut out) = (Chunked::default(), Vec::new());
            assert_eq!(
                chunks.feed(&body[..split], &mut out),
                Ok(None),
                "split at {split}"
            );
            let rest = chunks.feed(&body[split..], &mut out);
            assert_eq!(rest, Ok(Some(body.len() - split)), "split at {split}");
            assert_eq!(out, want, "split at {split}");
        }
        let mut out = Vec::new();
        assert_eq!(Chunked::default().feed(b"0\r\n\r\n", &mut out), Ok(Some(5)));
        assert_eq!(out, b"0\r\n\r\n");
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"4\r\nWikiX\r\n",
            b"4\nWiki\r\n",
            b"5 garbage\r\n",
            b"4;a\nWiki\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX-Sum: 1\n",
        ] {
            assert_eq!(
                Chunked::default().feed(bad, &mut Vec::new()),
                Err(()),
                "{bad:?}"
            );
        }
    }

    /// A chunked body's trailers and extensions are held to what hyper's client reads: fields
    /// it can parse, at most 100 lines and 64 KiB of them, 16 KiB of extensions in a body.
    #[test]
    fn trailers_and_extensions_are_read_as_hyper_s_client_reads_them() {
        let end = |trailers: &str| format!("1\r\nx\r\n0\r\n{trailers}\r\n");
        let fed = |body: &str| {
            Chunked::default()
                .feed(body.as_bytes(), &mut Vec::new())
                .map(|end| end.is_some())
        };
        assert_eq!(fed(&end("X-A: 1\r\nX-B:\r\n")), Ok(true));
        assert_eq!(fed(&end(&"X-T: 1\r\n".repeat(100))), Ok(true));
        assert_eq!(fed(&end(&"X-T: 1\r\n".repeat(101))), Err(()));
        for bad in [
            "no-colon\r\n",
            "Bad Name: 1\r\n",
            "X-A: 1\r\n folded\r\n",
            ": v\r\n",
            "X-C: a\u{1}b\r\n",
        ] {
            assert_eq!(fed(&end(bad)), Err(()), "{bad:?}");
        }
        // The section counts its line ends and the empty line: 9 bytes beside the value.
        let limit = crate::forward::pool::MAX_RESPONSE_HEAD;
        let long = |n: usize| end(&format!("X-T: {}\r\n", "t".repeat(n)));
        assert_eq!(fed(&long(limit - 10)), Ok(true));
        assert_eq!(fed(&long(limit - 9)), Err(()));
        let extended = |n: usize| format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(n));
        assert_eq!(fed(&extended(16 * 1024 - 1)), Ok(true));
        assert_eq!(fed(&extended(16 * 1024)), Err(()));
    }

    /// A drain that begins while an answer is awaited: the answer says the connection ends,
    /// and it does, as hyper's graceful shutdown would have it.
    #[tokio::test]
    async fn during_a_drain_the_answer_in_flight_closes_the_connection() {
        use tokio::net::TcpListener;
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut sock, _) = upstream.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await.unwrap();
            arrived_tx.send(()).unwrap();
            released.await.unwrap();
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            sock.write_all(answer).await.unwrap();
        });
        let config =
            format!("[upstream]\nservers = [\"http://{up_addr}\"]\n[log]\naccess_log = false\n");
        let state = StateHandle::new(crate::state::snapshot::for_tests(&config, false));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (mut sock, peer) = front.accept().await.unwrap();
        let drain = std::sync::Arc::new(Drain::default());
        let relayed = {
            let drain = drain.clone();
            tokio::spawn(async move {
                let conn = Conn::new(peer, false);
                let linger = Linger::Park;
                serve(
                    &mut Bytes::new(),
                    &mut Plain::new(&mut sock),
                    &state,
                    &conn,
                    &drain,
                    linger,
                )
                .await
            })
        };
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
            .await
            .unwrap();
        arrived.await.unwrap();
        drain.shutdown().await;
        release.send(()).unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer));
        read.await.expect("the connection ends").unwrap();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        assert_eq!(relayed.await.unwrap(), After::Close);
    }

    /// Requests as `forward::forward` makes them of an HTTP/2 client's (`fits`), and how
    /// hyper's HTTP/1.1 client writes each: `encode` writes the same bytes.
    fn h2_requests() -> Vec<Request<crate::body::Body>> {
        use crate::body::Body;
        let get = Request::get("/a?b=c")
            .header("x-one", "1")
            .header("host", "shop.example")
            .header("x-one", "2")
            .header("cookie", "a=1; b=2")
            .header("x-forwarded-for", "127.0.0.1")
            .body(Body::Empty);
        let put = Request::put("/p")
            .header("content-length", "3")
            .header("host", "h")
            .body(Body::full("abc"));
        let head = Request::head("/").header("host", "h").body(Body::Empty);
        let delete = Request::delete("/d")
            .header("content-length", "0")
            .body(Body::Empty);
        let options = Request::options("*").body(Body::Empty);
        // An HTTP/2 client's `POST` that ends with its head: no length is written for it,
        // by hyper's client either; one the client gave is passed on as it is.
        let post = Request::post("/p").header("host", "h").body(Body::Empty);
        let post_zero = Request::post("/p")
            .header("content-length", "0")
            .body(Body::Empty);
        let patch = Request::patch("/p?q")
            .header("content-length", "2")
            .header("x-obs", &b"caf\xc3\xa9 \t end"[..])
            .body(Body::full("{}"));
        let long = Request::get("/l")
            .header("x-long", "v".repeat(20_000))
            .body(Body::Empty);
        [
            get, put, head, delete, options, post, post_zero, patch, long,
        ]
        .into_iter()
        .map(Result::unwrap)
        .collect()
    }

    #[tokio::test]
    async fn a_request_is_written_as_hyper_s_client_writes_it() {
        use tokio::io::AsyncReadExt;
        for (i, (req, copy)) in h2_requests().into_iter().zip(h2_requests()).enumerate() {
            assert!(fits(&req), "case {i}");
            let mut ours = Vec::new();
            assert!(encode(&req, None, &mut ours));
            let (client, mut server) = tokio::io::duplex(64 * 1024);
            let io = hyper_util::rt::TokioIo::new(client);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            tokio::spawn(async move { sender.send_request(copy).await });
            let mut theirs = vec![0; ours.len()];
            let read = tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut theirs));
            read.await.unwrap().unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs),
                "case {i}"
            );
            // Nothing more: hyper wrote no more than `encode`.
            let mut more = [0u8; 1];
            let extra = tokio::time::timeout(Duration::from_millis(50), server.read(&mut more));
            assert!(extra.await.is_err(), "case {i}");
        }
        use crate::body::Body;
        let unfit = [
            Request::connect("h:1").body(Body::Empty),
            Request::get("/")
                .header("connection", "close")
                .body(Body::Empty),
            Request::put("/").body(Body::full("abc")),
            Request::put("/")
                .header("content-length", "4")
                .body(Body::full("abc")),
            Request::put("/")
                .header("content-length", "+3")
                .body(Body::full("abc")),
        ];
        for (i, req) in unfit.into_iter().enumerate() {
            assert!(!fits(&req.unwrap()), "unfit case {i}");
        }
    }

    /// What `forward` made of an HTTP/2 client's fields before `forward::Hop`, step by step as
    /// it was written then, for `server`: the map `encode` wrote.
    fn rewritten_as_before(
        fields: &http::HeaderMap,
        authority: Option<&http::uri::Authority>,
        client: &forward::headers::ClientSide,
        trusted: bool,
        server: &Upstream,
    ) -> http::HeaderMap {
        use forward::headers;
        use http::header;
        let mut headers = fields.clone();
        if let Some(authority) = authority {
            let _ = headers.try_reserve(5);
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, host);
            }
        }
        headers::join_cookies(&mut headers);
        headers::strip_hop_by_hop(&mut headers);
        headers.remove(header::EXPECT);
        headers::set_forwarded(&mut headers, client, trusted);
        if !headers.contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(server.authority.as_str()) {
                headers.insert(header::HOST, host);
            }
        }
        headers
    }

    /// An HTTP/2 client's request for an HTTP/1.1 server on the relay's sockets, written from
    /// its fields as they came (`forward::Hop::write`, through `encode_for` as `upstream` writes
    /// it), is byte for byte the request hyper's client wrote of the map `forward` rewrote
    /// (`rewritten_as_before`; `encode` writes a map as hyper's client does,
    /// `a_request_is_written_as_hyper_s_client_writes_it`): for thousands of shapes of fields
    /// (any order, repeated fields, cookie crumbs, lists, `Host` beside an `:authority` or
    /// alone, names kept from trusted peers only, aliases, `TE: trailers`, `Expect`), from
    /// trusted peers and others, over TLS or not, with and without an `:authority`, for each
    /// method and body the relay takes, to `http://` and `https://` servers. Those whose
    /// rewrite takes a field out are written through the map; the rest straight. (`fits` keeps
    /// a `Connection`, which no HTTP/2 request carries, from the relay.)
    #[test]
    fn an_http2_request_is_written_as_its_rewritten_map_is() {
        use crate::body::Body;
        use crate::config::Protocol;
        use forward::headers::ClientSide;
        const FIELDS: &[(&str, &[u8])] = &[
            ("accept", b"*/*"),
            ("user-agent", b"h2load nghttp2/1.52.0"),
            ("accept-encoding", b"gzip, deflate"),
            ("host", b"shop.example"),
            ("host", b"other.example"),
            ("cookie", b"a=1"),
            ("cookie", b"b=2"),
            ("cookie", b""),
            ("x-forwarded-for", b"203.0.113.9"),
            ("x-forwarded-for", b" 198.51.100.2, 10.0.0.1 "),
            ("x-forwarded-for", b""),
            ("x-forwarded-proto", b"https"),
            ("x-forwarded-host", b"www.example"),
            ("x-forwarded-host", b"two.example"),
            ("x-real-ip", b"203.0.113.7"),
            ("forwarded", b"for=203.0.113.9;proto=https"),
            ("true-client-ip", b"6.6.6.6"),
            ("x-forwarded-port", b"443"),
            ("te", b"trailers"),
            ("expect", b"100-continue"),
            ("x_forwarded_for", b"alias"),
            ("x_real_ip", b"alias"),
            ("keep-alive", b"timeout=5"),
            ("x-obs", b"caf\xc3\xa9 \t end"),
            ("authorization", b"Bearer x"),
        ];
        // (method, target, length, body)
        type Shape = (
            http::Method,
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
        );
        let shapes: [Shape; 6] = [
            (http::Method::GET, "/a?b=c&d=%20e", None, None),
            (http::Method::HEAD, "/", None, None),
            (http::Method::DELETE, "/d", Some("0"), None),
            (http::Method::POST, "/p", None, None),
            (http::Method::PUT, "/p?q", Some("3"), Some("abc")),
            (http::Method::OPTIONS, "*", None, None),
        ];
        let authorities = [
            None,
            Some(http::uri::Authority::from_static("shop.example")),
            Some(http::uri::Authority::from_static("shop.example:8443")),
        ];
        let servers = [Protocol::Http, Protocol::Https].map(|protocol| Upstream {
            protocol,
            scheme: http::uri::Scheme::HTTP,
            authority: http::uri::Authority::from_static("127.0.0.1:8080"),
        });
        let clients = [false, true].map(|https| ClientSide {
            peer: HeaderValue::from_static("192.0.2.7"),
            https,
        });
        // The URI as `forward::aim` makes it: the path alone for an `http://` server, the
        // server's absolute URI for an `https://` one.
        let request = |shape: usize, fields: &http::HeaderMap, server: &Upstream| {
            let (method, target, length, body) = &shapes[shape];
            let mut req = Request::new(body.map_or(Body::Empty, Body::full));
            *req.method_mut() = method.clone();
            *req.uri_mut() = match server.protocol {
                Protocol::Https if *target != "*" => {
                    format!("https://{}{target}", server.authority)
                        .parse()
                        .unwrap()
                }
                _ => http::Uri::from_static(target),
            };
            *req.headers_mut() = fields.clone();
            if let Some(length) = length {
                req.headers_mut().append(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from_static(length),
                );
            }
            req
        };
        // xorshift: the same shapes on every run.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut straight, mut mapped) = (0, 0);
        for round in 0..3000 {
            // The first round is h2load's request, as the harness's HTTPS row sends it.
            let count = if round == 0 { 3 } else { next(9) };
            let mut fields = http::HeaderMap::new();
            for i in 0..count {
                let (name, value) = FIELDS[if round == 0 { i } else { next(FIELDS.len()) }];
                fields.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_bytes(value).unwrap(),
                );
            }
            let shape = if round == 0 { 0 } else { next(shapes.len()) };
            for authority in &authorities {
                for client in &clients {
                    for trusted in [false, true] {
                        for server in &servers {
                            let req = request(shape, &fields, server);
                            assert!(fits(&req), "round {round}");
                            let hop = forward::Hop::new(authority.clone(), client, trusted);
                            let mut ours = Vec::new();
                            if encode(&req, Some((&hop, server)), &mut ours) {
                                straight += 1;
                            } else {
                                mapped += 1;
                            }
                            let back = encode_for(req, Some((&hop, server)), &mut ours);
                            assert!(back.is_none(), "round {round}");
                            let mut before = request(shape, &fields, server);
                            *before.headers_mut() = rewritten_as_before(
                                before.headers(),
                                authority.as_ref(),
                                client,
                                trusted,
                                server,
                            );
                            let mut theirs = Vec::new();
                            assert!(encode(&before, None, &mut theirs));
                            assert_eq!(
                                String::from_utf8_lossy(&ours),
                                String::from_utf8_lossy(&theirs),
                                "round {round}: {fields:?}, {authority:?}, https {}, \
                                 trusted {trusted}, {:?}",
                                client.https,
                                server.protocol,
                            );
                            if round == 0 {
                                assert_eq!(mapped, 0, "h2load's request is written straight");
                            }
                        }
                    }
                }
            }
        }
        // Both ways were taken, each many times (a third of the fields drawn send a request
        // through the map).
        let (many, taken) = (10_000, format!("{straight} straight, {mapped} mapped"));
        assert!(straight > many && mapped > many, "{taken}");
    }

    /// An HTTPS client at 192.0.2.7, and an `http://` server: the two ends of the hop that
    /// the writer tests rewrite requests for.
    fn an_https_client_and_a_plain_server() -> (forward::headers::ClientSide, Upstream) {
        let client = forward::headers::ClientSide {
            peer: HeaderValue::from_static("192.0.2.7"),
            https: true,
        };
        let server = Upstream {
            protocol: crate::config::Protocol::Http,
            scheme: http::uri::Scheme::HTTP,
            authority: http::uri::Authority::from_static("127.0.0.1:8080"),
        };
        (client, server)
    }

    /// The shapes that take fields out are left to the map; those the rules only replace and
    /// add to are written straight.
    #[test]
    fn which_http2_requests_are_written_straight() {
        use crate::body::Body;
        let (client, server) = an_https_client_and_a_plain_server();
        let authority = Some(http::uri::Authority::from_static("shop.example"));
        let straight = |fields: &[(&'static str, &'static str)], trusted: bool| {
            let mut req = Request::get("/").body(Body::Empty).unwrap();
            for (name, value) in fields {
                req.headers_mut().append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            let hop = forward::Hop::new(authority.clone(), &client, trusted);
            encode(&req, Some((&hop, &server)), &mut Vec::new())
        };
        // (fields, the peer trusted, written straight)
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, bool);
        let table: &[Case] = &[
            (&[("accept", "*/*")], false, true),
            (
                &[("cookie", "a=1"), ("x", "1"), ("cookie", "b=2")],
                false,
                true,
            ),
            (&[("x-forwarded-for", "203.0.113.9")], false, true),
            (
                &[("x-forwarded-host", "www.example"), ("host", "h")],
                false,
                true,
            ),
            (&[("forwarded", "for=203.0.113.9")], true, true),
            (&[("forwarded", "for=203.0.113.9")], false, false),
            (&[("x_forwarded_for", "alias")], true, false),
            (&[("te", "trailers")], false, false),
            (&[("expect", "100-continue")], false, false),
        ];
        for (i, (fields, trusted, want)) in table.iter().enumerate() {
            assert_eq!(straight(fields, *trusted), *want, "case {i}: {fields:?}");
        }
    }

    /// `fits` is asked of a request as its fields are written (`encode_for`): one the writer
    /// refuses is rewritten through its map, then written from it when what the rewrite left
    /// fits, else given back for hyper's path, rewritten and with nothing written.
    #[test]
    fn a_request_the_writer_refuses_is_written_from_its_map_or_given_back() {
        use crate::body::Body;
        use http::header;
        let (client, server) = an_https_client_and_a_plain_server();
        let authority = Some(http::uri::Authority::from_static("shop.example"));
        let rules = forward::Hop::new(authority, &client, false);
        let hop = Some((&rules, &server));
        // Its `Connection` names the length its body needs, which the rewrite takes out.
        let named = Request::post("/p")
            .header("connection", "content-length")
            .header("content-length", "3")
            .body(Body::full("abc"))
            .unwrap();
        assert!(fits_body(&named) && !fits(&named));
        let mut out = b"stale".to_vec();
        let back = encode_for(named, hop, &mut out).expect("given back");
        assert!(out.is_empty());
        let fields = back.headers();
        assert!(!fields.contains_key(header::CONNECTION));
        assert!(!fields.contains_key(header::CONTENT_LENGTH));
        assert!(
            fields.contains_key("x-forwarded-for"),
            "rewritten: {fields:?}"
        );
        // Refused by the writer, and fit once rewritten: as `encode` writes the rewritten map.
        let unfit = [
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("expect", "100-continue"),
        ];
        for (name, value) in unfit {
            let req = || {
                Request::get("/")
                    .header(name, value)
                    .header("accept", "*/*")
                    .body(Body::Empty)
                    .unwrap()
            };
            let mut rewritten = req();
            rules.apply(rewritten.headers_mut(), &server);
            assert!(fits(&rewritten), "{name}");
            let mut theirs = Vec::new();
            assert!(encode(&rewritten, None, &mut theirs));
            let mut ours = Vec::new();
            assert!(!encode(&req(), hop, &mut ours), "{name}");
            assert!(encode_for(req(), hop, &mut ours).is_none(), "{name}");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs),
                "{name}"
            );
        }
    }

    /// An answer's head reads as hyper's client reads it (`headers_into`): the same status and
    /// header map, in the same order, once `forward::finish` has taken the hop-by-hop fields
    /// out (a `Connection` naming no field is not put in).
    #[tokio::test]
    async fn an_answer_head_is_read_as_hyper_s_client_reads_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answers: [&[u8]; 10] = [
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nx-a: 2\r\nSet-Cookie: a\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection: Keep-Alive, X-Hop\r\nX-End: 2\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n0\r\n\r\n",
            b"HTTP/1.0 404 Gone Fishing\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nX-Why: nothing\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Tight:tight\r\nX-Wide: \t wide \t \r\nContent-Length: 2, 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-Obs: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Last: z\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nX-Part: 1\r\nContent-Length: 10\r\n\r\nabc",
        ];
        for (i, answer) in answers.into_iter().enumerate() {
            let mut headers = http::HeaderMap::new();
            let mut whole = Bytes::new();
            let sink = Sink::Map(&mut headers, &mut whole);
            let (status, end) = match read_head(answer, false, sink) {
                Ok(Head::Final(a)) => (
                    a.status,
                    match a.framing {
                        Framing::Length(n) if answer.len() - a.head >= n as usize => {
                            a.head + n as usize
                        }
                        _ => a.head,
                    },
                ),
                _ => panic!("case {i}"),
            };
            // The values' copy: the head, and the body when whole, as they came.
            assert_eq!(&whole[..], &answer[..end], "case {i}");
            let (client, mut server) = tokio::io::duplex(64 * 1024);
            let io = hyper_util::rt::TokioIo::new(client);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let req = Request::get("/").body(crate::body::Body::Empty).unwrap();
            let asked = tokio::spawn(async move { sender.send_request(req).await });
            let mut head = [0u8; 64];
            let _ = server.read(&mut head).await.unwrap();
            server.write_all(answer).await.unwrap();
            let mut theirs = asked.await.unwrap().unwrap();
            assert_eq!(status, theirs.status().as_u16(), "case {i}");
            // Put in only when it names a field for `finish` to drop.
            let names = i == 2;
            assert_eq!(
                headers.contains_key(http::header::CONNECTION),
                names,
                "case {i}"
            );
            crate::forward::headers::strip_hop_by_hop(&mut headers);
            crate::forward::headers::strip_hop_by_hop(theirs.headers_mut());
            assert_eq!(&headers, theirs.headers(), "case {i}");
            let order = |h: &http::HeaderMap| {
                h.iter()
                    .map(|(n, v)| format!("{n}: {v:?}"))
                    .collect::<Vec<_>>()
            };
            assert_eq!(order(&headers), order(theirs.headers()), "case {i}");
        }
    }

    #[test]
    fn a_relayed_body_of_known_length_gets_room_for_it_and_a_byte() {
        assert_eq!(body_room(Framing::Length(5)), 6);
        assert_eq!(body_room(Framing::Length(COPY_BUF as u64 - 1)), COPY_BUF);
        assert_eq!(body_room(Framing::Length(1 << 40)), COPY_BUF);
        assert_eq!(body_room(Framing::Length(u64::MAX)), COPY_BUF);
        assert_eq!(body_room(Framing::Chunked), COPY_BUF);
        assert_eq!(body_room(Framing::Close), COPY_BUF);
    }

    #[test]
    fn chunk_sizes_are_written_in_hex() {
        let mut buf = [0u8; 16];
        assert_eq!(hex(0, &mut buf), b"0");
        assert_eq!(hex(255, &mut buf), b"ff");
        assert_eq!(hex(16384, &mut buf), b"4000");
    }
}
