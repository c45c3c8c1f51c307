//! Parking idle plaintext HTTP/1.1 connections: between requests a keep-alive connection gives
//! hyper's state back, its two 8 KiB buffers included, and waits for the next request in a
//! small task of its own with only its socket, as nginx frees a keep-alive connection's
//! buffers. Ten thousand idle clients then cost the proxy about 1.3 KB each instead of 13 KB.
//!
//! hyper cannot free its buffers while a connection lives, so the connection is ended the
//! moment it is idle (hyper's graceful shutdown, which closes an idle HTTP/1 connection at
//! once) without shutting the socket, and served again by a fresh hyper connection when the
//! client sends more. What is idle is told by facts gathered on the connection's own task
//! (`Idle`): no response is unfinished (`Busy`), everything written has been flushed, the
//! last read found nothing waiting, and no request body or refused upgrade may still be in
//! hyper's hands.
//!
//! While requests are held, a parked connection answers plain held requests itself (`fast`)
//! and stays parked; hyper is woken only for the others.
//!
//! A new connection whose first request head has begun and stalls (a slowloris) waits for the
//! rest in a small task too (`head_wait`), with its bytes so far in an allocation of their
//! size, where hyper held its two 8 KiB buffers until `header_read_timeout`.

use crate::body::Body;
use crate::fast::{Fast, Step};
use crate::gateway::Reply;
use crate::listener::{Closable, STALLED};
use crate::shutdown::{Drain, Shutdown};
use crate::stall::Timing;
use bytes::{Buf, Bytes};
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What the socket, the responses and the serving loop tell each other about one connection.
/// Atomics only to be `Sync`: all of it happens on the one task that holds the connection at
/// the time, hence `Relaxed`, but for `body`, which the task reading a body to its end clears
/// (`Upload::ended`): a compare-and-swap of that one value, which orders nothing else.
pub struct Idle {
    /// Responses handed out whose body hyper has not finished with.
    busy: AtomicU32,
    /// Requests so far (wrapping): tells a new request from a long idle.
    served: AtomicU32,
    /// The last read from the socket found nothing waiting.
    read_blocked: AtomicBool,
    /// Bytes were read while no response was out: a head begun, until the request it makes
    /// (`Busy::new`). hyper keeps a head it has not parsed whole as idle.
    begun: AtomicBool,
    /// Something was written and not flushed since.
    unflushed: AtomicBool,
    /// A park is under way: hyper's closing of the socket must not reach it.
    parking: AtomicBool,
    /// The last request came with a body, which may still be arriving: what follows on the
    /// socket is its rest, not a new request, and a fresh hyper connection must not read it.
    /// The request's number (`served`, never 0) while its body is awaited, else 0. Cleared
    /// when the body has been read to its end (`Upload`), or by the next request without one
    /// (hyper reads a head only after a body's end).
    body: AtomicU32,
    /// A request asked for an upgrade that was not granted: hyper keeps it pending and would
    /// hand the socket to nobody on a graceful shutdown. Kept for this hyper connection.
    upgrade: AtomicBool,
    /// An upgrade was granted (a `101` went to hyper): the connection is its tunnel's from
    /// then on, never idle, even while hyper still writes the `101` to a client that does
    /// not read (nothing taken by the socket, so nothing unflushed), when a pick would cut it.
    switched: AtomicBool,
    /// Its place among the idle connections that may be closed to make room for a new one,
    /// while it is parked with nothing begun; with the connections' limit, which keeps
    /// `intermission_parked_connections`.
    closable: Closable,
    /// Counted in `Limit::starting` (`arriving`): spawned to park, or to write and then park,
    /// and not yet run. Here rather than in the parked task, whose every byte counts.
    unseen: AtomicBool,
}

impl Idle {
    pub fn new(limit: Arc<crate::listener::Limit>) -> Idle {
        Idle {
            busy: AtomicU32::new(0),
            served: AtomicU32::new(0),
            read_blocked: AtomicBool::new(false),
            begun: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            body: AtomicU32::new(0),
            upgrade: AtomicBool::new(false),
            switched: AtomicBool::new(false),
            closable: Closable::new(limit),
            unseen: AtomicBool::new(false),
        }
    }

    /// Counted for the drain's end until the task it is handed to has run (`seen`): called
    /// before it lets go of what the drain saw it by (a drain guard; a new connection's
    /// `listener::Fresh`), and before the spawn. Between the two, unseen, the drain's end
    /// could come and the process exit over it: a kept-alive client's next request was
    /// then answered with a reset, where the parked connection's first poll, at the drain's
    /// end, closes it with a lingering close. Once a park at most: one atomic add and one
    /// subtract on the connections' count.
    fn arriving(&self) {
        if !self.unseen.swap(true, Relaxed) {
            self.closable.limit().arriving();
        }
    }

    /// Seen by the drain from now: among the idle ones, picked, or holding a drain guard.
    /// A plain load while it is not counted, as on every wait of a parked connection.
    #[inline]
    fn seen(&self) {
        if self.unseen.load(Relaxed) && self.unseen.swap(false, Relaxed) {
            self.closable.limit().arrived();
        }
    }

    /// Whether hyper, having just returned `Pending`, waits for nothing but the next request.
    fn parkable(&self) -> bool {
        self.settled() && self.body.load(Relaxed) == 0
    }

    /// Whether it would be parkable but for a request body not yet read to its end: one
    /// answered before it was (held, or a server that answered early), still arriving, or
    /// read whole by another task a moment ago (`Upload::ended`), which wakes nobody here.
    fn awaits_body(&self) -> bool {
        self.settled() && self.body.load(Relaxed) != 0
    }

    /// Idle but for an upgrade hyper keeps pending since one was declined (a WebSocket held
    /// during maintenance, a server's `200` or `426` to one): it cannot park, as hyper's
    /// graceful shutdown would hand the socket to that upgrade, but it waits for nothing but
    /// the next request (or the rest of its head, `begun`), and may be closed to make room as
    /// a parked one may; with that head begun, only once it has stalled (`serve`), since a
    /// pick loses it.
    fn waits_but_for_upgrade(&self) -> bool {
        self.busy.load(Relaxed) == 0
            && self.read_blocked.load(Relaxed)
            && !self.unflushed.load(Relaxed)
            && self.body.load(Relaxed) == 0
            && self.upgrade.load(Relaxed)
            && !self.switched.load(Relaxed)
    }

    /// Bytes came: with no response out, a head has begun.
    fn read_some(&self) {
        if self.busy.load(Relaxed) == 0 {
            self.begun.store(true, Relaxed);
        }
    }

    /// Whether what hyper waits for is a head that has begun: bytes came with no response
    /// out, and no request body may still be arriving, whose rest they would be.
    fn head_begun(&self) -> bool {
        self.begun.load(Relaxed) && self.body.load(Relaxed) == 0
    }

    /// Nothing unfinished, unflushed or unread, no upgrade pending: idle, but for a body.
    fn settled(&self) -> bool {
        self.busy.load(Relaxed) == 0
            && self.read_blocked.load(Relaxed)
            && !self.unflushed.load(Relaxed)
            && !self.upgrade.load(Relaxed)
    }
}

/// A request body on a parking connection, in the request's extensions: whoever reads it to
/// its end says so (`ended`), and the connection may park again without waiting for a next
/// request. By number, so that a late word about one body never clears the next one's.
#[derive(Clone)]
pub struct Upload {
    idle: Arc<Idle>,
    number: u32,
}

impl Upload {
    /// The body has been read to its end: hyper is done with it.
    pub fn ended(&self) {
        let _ = self
            .idle
            .body
            .compare_exchange(self.number, 0, Relaxed, Relaxed);
    }
}

/// One response in hyper's hands: counted from the request until hyper drops the body.
pub struct Busy(Arc<Idle>);

impl Busy {
    /// With the request's `Upload` when it has a body.
    pub fn new<B: HttpBody>(idle: &Arc<Idle>, req: &http::Request<B>) -> (Busy, Option<Upload>) {
        idle.busy.fetch_add(1, Relaxed);
        idle.begun.store(false, Relaxed);
        let number = idle.served.fetch_add(1, Relaxed).wrapping_add(1).max(1);
        let upload = (!req.body().is_end_stream()).then(|| Upload {
            idle: idle.clone(),
            number,
        });
        idle.body
            .store(upload.as_ref().map_or(0, |u| u.number), Relaxed);
        if req.headers().contains_key(http::header::UPGRADE) {
            idle.upgrade.store(true, Relaxed);
        }
        (Busy(idle.clone()), upload)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Relaxed);
    }
}

/// The answer to a request on a parking connection: the gateway's, carrying its `Busy`.
pub struct Tracked<F> {
    reply: F,
    busy: Option<Busy>,
}

impl<F> Tracked<F> {
    pub fn new(reply: F, busy: Busy) -> Tracked<F> {
        Tracked {
            reply,
            busy: Some(busy),
        }
    }
}

impl<F> Future for Tracked<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>> + Unpin,
{
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        Pin::new(&mut this.reply).poll(cx).map(|resp| {
            let mut resp = resp?;
            if let Some(busy) = &this.busy {
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    busy.0.switched.store(true, Relaxed);
                }
                crate::listener::close_if_draining(&mut resp, busy.0.closable.limit());
            }
            Ok(resp.map(|body| TrackedBody {
                body,
                _busy: this.busy.take(),
            }))
        })
    }
}

/// A response body that ends its request's `Busy` when hyper drops it.
pub struct TrackedBody {
    body: Body,
    _busy: Option<Busy>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = crate::body::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection whose first bytes were read before hyper (to choose the protocol, kept from a
/// parked connection, or left by `relay`): they are served again before the rest. On a
/// parking connection it also notes what `Idle` needs. Plaintext, or TLS (after the relay, or
/// HTTP/2). A plaintext one's writes are timed here (`proxy.send_timeout`): hyper has no clock
/// of its own on a client that does not read. A TLS one's are timed beneath the session
/// (`stall::Timed`), where every write that moves is seen.
///
/// It also tells hyper of the client's end one poll late (`end_deferred`). hyper looks for
/// that end as soon as it has read a request, before it polls the answer: a client that shuts
/// its sending side once its request is out (a script, `curl` fed from a closed stdin) lost
/// about half its answers that way, held ones and reserved paths included, which are ready at
/// once. A poll later the answer is written, and a forwarded request whose client left is
/// still given up then, as the relay gives it up.
pub struct Rewind<S = TcpStream> {
    first: Bytes,
    inner: S,
    idle: Option<Arc<Idle>>,
    timing: Option<Timing>,
    end_deferred: bool,
}

impl<S> Rewind<S> {
    pub fn new(
        first: Bytes,
        inner: S,
        idle: Option<Arc<Idle>>,
        timing: Option<Timing>,
    ) -> Rewind<S> {
        Rewind {
            first,
            inner,
            idle,
            timing,
            end_deferred: false,
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// `polled`, through the send clock when this connection has one.
    fn timed<T>(
        timing: &mut Option<Timing>,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match timing {
            Some(timing) => timing.watch(cx, polled),
            None => polled,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.first.is_empty() || buf.remaining() == 0 {
            let before = buf.remaining();
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if let Some(idle) = &this.idle {
                idle.read_blocked.store(polled.is_pending(), Relaxed);
                if buf.remaining() < before {
                    idle.read_some();
                }
            }
            let end =
                matches!(polled, Poll::Ready(Ok(()))) && before > 0 && buf.remaining() == before;
            if end && !this.end_deferred {
                this.end_deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return polled;
        }
        if let Some(idle) = &this.idle {
            idle.read_blocked.store(false, Relaxed);
            idle.read_some();
        }
        let n = this.first.len().min(buf.remaining());
        buf.put_slice(&this.first[..n]);
        this.first.advance(n);
        if !this.first.is_empty() {
            return Poll::Ready(Ok(()));
        }
        // Let the allocation go for the connection's idle life.
        this.first = Bytes::new();
        // The rest of what has arrived comes in the same read, so that hyper sees the whole
        // head at once (a 24-byte first read would make it grow its buffer to 16 KiB). What
        // is not there yet, or an error, comes with the next read.
        let _ = Pin::new(&mut this.inner).poll_read(cx, buf);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(idle) = &this.idle {
            idle.unflushed.store(true, Relaxed);
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        Self::timed(&mut this.timing, cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(idle) = &this.idle {
            idle.unflushed.store(true, Relaxed);
        }
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        Self::timed(&mut this.timing, cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // hyper flushes its socket only once its own buffer has been written out whole.
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        let flushed = Self::timed(&mut this.timing, cx, flushed);
        if let (Some(idle), Poll::Ready(Ok(()))) = (&this.idle, &flushed) {
            idle.unflushed.store(false, Relaxed);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.idle.as_ref().is_some_and(|i| i.parking.load(Relaxed)) {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        Self::timed(&mut this.timing, cx, polled)
    }
}

/// One parked connection in `intermission_parked_connections`, for as long as it lives, and
/// among the idle ones that may be closed for room while it waits with nothing begun: a
/// task dropped while parked (the runtime ending) leaves neither behind.
struct Parked<'a>(&'a Idle);

impl<'a> Parked<'a> {
    fn new(idle: &'a Idle, closable: bool) -> Parked<'a> {
        idle.closable.limit().parked.inc();
        if !closable {
            idle.closable.never();
        }
        Parked(idle)
    }

    /// Whether this connection was picked to close, to make room for a new one.
    #[inline]
    fn picked(&self, cx: &Context<'_>) -> bool {
        self.0.closable.poll_picked(cx)
    }

    /// Whether its head is begun and has not lasted `STALLED` yet: not closable. With a
    /// `keep_alive` no longer than that, a head begun is never closable (`never` as well), and
    /// its deadline is the park's own.
    fn stalling(&self, keep_alive: Duration) -> bool {
        keep_alive > STALLED && self.0.closable.is_never()
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.closable.limit().parked.dec();
        // Counted in one until gone from the other.
        self.0.seen();
        self.0.closable.busy();
    }
}

impl Drop for Idle {
    /// A task handed a connection and dropped before it ran (its runtime ending) leaves no
    /// count behind for a drain to wait for.
    fn drop(&mut self) {
        self.seen();
    }
}

/// How long a connection idles before it parks: between one and two graces after its last
/// answer, since the timer is checked, not moved, by each request. Rebuilding hyper's state
/// costs about 8,000 instructions (some 3 µs) per park, and a connection parks at most once
/// per grace: at 10 ms that is at most 0.03% of a core per connection, while a busy
/// keep-alive connection, whose next request comes within microseconds, never parks at all.
pub const GRACE: Duration = Duration::from_millis(10);

/// What ended one hyper connection's turn on the socket.
enum Turn {
    Ended(Result<(), hyper::Error>),
    /// Picked to make room for a new connection: dropped.
    Dropped,
    /// The deadline of a head begun before a park passed: dropped.
    Late,
    Idle,
    Drain,
}

/// The gateway as the service of a parking connection: each response counted (`Busy`) until
/// hyper is done with it. A named type rather than a closure: a parked connection keeps it,
/// and `fast` reaches the state and the connection's facts through it, not through a second
/// copy of them.
pub struct Gateway {
    pub fast: Fast,
    idle: Arc<Idle>,
}

impl Gateway {
    /// A parked connection's socket, served again with what it sent first.
    fn rewind(&self, first: Bytes, inner: TcpStream) -> Rewind {
        let timing = Timing::new(self.fast.parts().0.clone());
        Rewind::new(first, inner, Some(self.idle.clone()), Some(timing))
    }

    pub fn new(fast: Fast, idle: Arc<Idle>) -> Gateway {
        Gateway { fast, idle }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Gateway {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Tracked<Reply>;

    fn call(&self, mut req: http::Request<Incoming>) -> Tracked<Reply> {
        let (busy, upload) = Busy::new(&self.idle, &req);
        if let Some(upload) = upload {
            req.extensions_mut().insert(upload);
        }
        crate::listener::Upgrading::mark(&mut req, self.idle.closable.limit());
        Tracked::new(self.fast.handle(req), busy)
    }
}

/// What a plaintext HTTP/1.1 connection keeps, served or parked.
pub struct Held {
    /// Its `keep_alive` (`header_read_timeout`) bounds a parked connection's wait for its
    /// next request.
    pub builder: Arc<crate::listener::ConnBuilder>,
    pub drain: Arc<Drain>,
    pub permit: crate::listener::Slot,
}

/// Starts a new plaintext HTTP/1.1 connection, whose first bytes `io` holds: held requests
/// are answered at once (`fast`) and the connection parks. What hyper must serve comes back,
/// for `serve`. Not `async`: the caller's task, which serves busy connections for their
/// whole life, keeps the size of `serve` alone.
pub fn start(mut io: Rewind, service: Gateway, held: Held) -> Option<(Rewind, Gateway, Held)> {
    let first = std::mem::take(&mut io.first);
    match service.fast.serve(&io.inner, first.clone(), &held.drain) {
        Step::Declined => io.first = first,
        Step::Closed => return None,
        Step::Served {
            unwritten, rest, ..
        } => {
            io.first = rest;
            if !unwritten.is_empty() {
                service.idle.arriving();
                tokio::spawn(write_then_go_on(io, service, held, unwritten));
                return None;
            }
            if io.first.is_empty() {
                service.idle.arriving();
                tokio::spawn(parked(io.first, io.inner, service, held));
                return None;
            }
        }
    }
    Some((io, service, held))
}

/// Writes the part of the answers the socket did not take at once, then goes on as the
/// connection would have: parked, or served by hyper when a request is left to it. A task of
/// its own, as this is rare: awaited in `parked`, the write would add its state to every
/// parked connection. It holds a drain guard: a drain waits for an answer under way. Spawned
/// counted for the drain (`Idle::arriving`), which `parked` ends.
fn write_then_go_on(
    mut io: Rewind,
    service: Gateway,
    held: Held,
    unwritten: Bytes,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let guard = held.drain.guard();
        // Through `Rewind`, whose writes are timed.
        if tokio::io::AsyncWriteExt::write_all(&mut io, &unwritten)
            .await
            .is_err()
        {
            return;
        }
        if io.first.is_empty() {
            drop(guard);
            parked(io.first, io.inner, service, held).await;
        } else {
            service.idle.seen();
            serve_again(io, service, held, None, guard).await;
        }
    })
}

/// Serves a plaintext HTTP/1.1 connection until it ends or idles for `GRACE`; then it parks:
/// this task ends and a small one (`parked`) waits for the next request, so that the memory
/// of an idle connection is that small task's, not this one's. A parked connection holds no
/// drain guard: it has nothing in flight, and a drain does not wait for it. `head_deadline`
/// is set when a request head began before a park.
pub async fn serve(
    mut io: Rewind,
    service: Gateway,
    held: Held,
    head_deadline: Option<Instant>,
    guard: Option<Shutdown>,
) -> Result<(), hyper::Error> {
    let idle = service.idle.clone();
    // The grace timer: moving a registered deadline later is a compare-and-swap, where a new
    // timer would be registered (under the driver's lock) for each request.
    let timer = tokio::time::sleep(held.builder.keep_alive);
    tokio::pin!(timer);
    // A woken connection's guard was taken by `parked` before it spawned this task, so that
    // a drain starting in between still counts it. Woken during a drain, the request that
    // woke it is still answered (with keep-alive off): closing unanswered would reset it.
    let mut guard = guard.unwrap_or_else(|| held.drain.guard());
    let mut conn = Box::new(
        held.builder
            .http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
    );
    let turn = {
        let mut drained = Box::pin(guard.fired());
        // The request count when the grace timer was last armed. A request since does not
        // move the timer (a clock read and a timer update for every request): when it fires,
        // a connection that has served one since is given another grace instead of parking.
        let mut grace_for: Option<u32> = None;
        // How long until a connection awaiting an answered request's body looks again.
        let mut recheck = GRACE;
        // hyper closes a connection at once on a graceful shutdown only once it has
        // answered a request; before, it would finish the first with keep-alive off.
        let fresh = idle.served.load(Relaxed);
        // A head begun before a park keeps its deadline: hyper's own timer, new with this
        // connection, would give it a full header_read_timeout again.
        if let Some(deadline) = head_deadline {
            timer.as_mut().reset(deadline);
        }
        // Until hyper has read its first head whole, that head is under way (this connection
        // was made for bytes that came), and once it has lasted `STALLED` the connection may
        // be closed for room, as a parked one with a head begun. Armed only when a poll
        // finds the head unfinished: a timer for each whole head would cost every hyper
        // connection a registration. From the park, for a head begun before it.
        let keep_alive = held.builder.keep_alive;
        let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let closable = &idle.closable;
        // Whether it is among the idle ones while a declined upgrade keeps it from parking.
        let mut listed = false;
        // A head begun on such a connection, closable once it has lasted `STALLED`, as a
        // parked one's: armed when one is seen under way, let go when it is whole.
        let mut head_stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let turn = poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(&mut *conn).poll(cx) {
                return Poll::Ready(Turn::Ended(result));
            }
            if drained.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Turn::Drain);
            }
            let served = idle.served.load(Relaxed);
            let waits = idle.waits_but_for_upgrade();
            let head_begun = waits && idle.begun.load(Relaxed);
            if !head_begun {
                head_stalled = None;
            }
            // After a declined upgrade, whether it may be closed to make room: idle, or with
            // a head begun that has stalled.
            let room = waits
                && (!head_begun
                    || (keep_alive > STALLED
                        && head_stalled
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(STALLED)))
                            .as_mut()
                            .poll(cx)
                            .is_ready()));
            // A request came since it was listed, or a head began: back of the line when it
            // idles again.
            if listed && !room {
                listed = false;
                closable.busy();
            }
            if served == fresh {
                let stalled = stalled.get_or_insert_with(|| {
                    let began = head_deadline.map_or_else(Instant::now, |d| d - keep_alive);
                    Box::pin(tokio::time::sleep_until(began + STALLED))
                });
                if stalled.as_mut().poll(cx).is_ready() && closable.poll_picked(cx) {
                    return Poll::Ready(Turn::Dropped);
                }
            } else if stalled.take().is_some() {
                closable.busy();
            }
            if served == fresh && head_deadline.is_some() {
                return timer.as_mut().poll(cx).map(|()| Turn::Late);
            }
            if served == fresh {
                return Poll::Pending;
            }
            if idle.awaits_body() {
                // Answered, its body still unread: looked at again after a grace, then after
                // twice as long each time up to a second, since the task that reads it to its
                // end (`Upload`) has no way to wake this one, and a body hyper drains itself
                // (one the answer did not read) is never said to end.
                grace_for = None;
                let next = Instant::now() + recheck;
                if timer.deadline() > next || timer.as_mut().poll(cx).is_ready() {
                    timer.as_mut().reset(next);
                    let _ = timer.as_mut().poll(cx);
                    recheck = (recheck * 2).min(Duration::from_secs(1));
                }
                return Poll::Pending;
            }
            recheck = GRACE;
            if !idle.parkable() {
                // A grace running out while a response streams disarms it, so that a long
                // response costs one wake-up, not one per grace.
                if grace_for.is_some() && timer.as_mut().poll(cx).is_ready() {
                    grace_for = None;
                }
                // Idle, but for a declined upgrade that keeps it from parking: it may still
                // make room. Otherwise a client that sends `Upgrade` with each request (held
                // during maintenance, or to a path that is no WebSocket) kept every slot it
                // held from new clients until `header_read_timeout`.
                if room {
                    listed = true;
                    if closable.poll_picked(cx) {
                        return Poll::Ready(Turn::Dropped);
                    }
                }
                return Poll::Pending;
            }
            loop {
                match grace_for {
                    Some(armed) if armed == served => {
                        return timer.as_mut().poll(cx).map(|()| Turn::Idle)
                    }
                    Some(_) if timer.as_mut().poll(cx).is_pending() => return Poll::Pending,
                    _ => {
                        grace_for = Some(served);
                        timer.as_mut().reset(Instant::now() + GRACE);
                    }
                }
            }
        })
        .await;
        // Out of the idle ones, whose waker is this task's: a park registers anew.
        closable.busy();
        turn
    };
    match turn {
        Turn::Ended(result) => return lingering(conn, guard, held, result),
        Turn::Dropped => return Ok(()),
        Turn::Late => {
            if let Some(parts) = conn.into_parts() {
                let (state, conn) = parts.service.fast.parts();
                crate::listener::head_timed_out(state, conn.peer.ip(), held.builder.keep_alive);
            }
            return Ok(());
        }
        Turn::Drain => {
            Pin::new(&mut *conn).graceful_shutdown();
            let ended = poll_fn(|cx| Pin::new(&mut *conn).poll(cx)).await;
            return lingering(conn, guard, held, ended);
        }
        Turn::Idle => {}
    }
    // An idle hyper connection closes at once on a graceful shutdown; the socket stays.
    idle.parking.store(true, Relaxed);
    Pin::new(&mut *conn).graceful_shutdown();
    let closed = poll_fn(|cx| Poll::Ready(Pin::new(&mut *conn).poll(cx))).await;
    idle.parking.store(false, Relaxed);
    match closed {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(e)) => return Err(e),
        // Not idle after all: hyper is still reading a request body that its answer did
        // not wait for. This exchange ends with keep-alive off, as hyper chooses.
        Poll::Pending => {
            let result = tokio::select! {
                result = &mut *conn => result,
                () = Box::pin(guard.fired()) => {
                    Pin::new(&mut *conn).graceful_shutdown();
                    (&mut *conn).await
                }
            };
            return lingering(conn, guard, held, result);
        }
    }
    let Some(parts) = conn.into_parts() else {
        return Ok(());
    };
    let http1::Parts {
        io: socket,
        read_buf,
        service,
        ..
    } = parts;
    io = socket.into_inner();
    // A park comes only after an answer, so a head begun before an earlier park has ended:
    // the wait (and any head begun since) gets a fresh deadline.
    if !read_buf.is_empty() {
        io.first = read_buf;
    }
    park(io, service, held, guard);
    Ok(())
}

/// Parks a connection that has gone idle: `parked` in a task of its own, and `guard` let go.
/// Counted for the drain (`Idle::arriving`) before the guard goes, until the parked task's
/// first poll has put it among the idle ones that the drain's end closes
/// (`Limit::close_idle`), or has seen that end: let go before, the drain could end, and the
/// process exit, with the connection not yet there, and it was closed with the process.
fn park(io: Rewind, service: Gateway, held: Held, guard: Shutdown) {
    service.idle.arriving();
    drop(guard);
    tokio::spawn(parked(io.first, io.inner, service, held));
}

/// The most of a head a stalled connection keeps in an allocation of its exact size
/// (`head_wait`): the relay's read. A longer one is read on in a buffer that grows as hyper's
/// would, to `max_header_bytes`.
const HEAD_KEPT: usize = 8192;

/// Hands a connection whose request head has begun and stalls (its rest not there when the
/// relay looked, or longer than the relay's read, `relay::After::Stalled`) to a small task of
/// its own (`head_wait`), in place of hyper: hyper would hold its two 8 KiB buffers, and this
/// task, for `header_read_timeout` (a slowloris' 2,000 connections: 16.4 KB each; here
/// 1.2 KB; nginx's 9.8 KB with 2 workers on the same machine).
/// The guard goes with it: a drain waits for the head, as it waits for hyper's.
fn stalled(io: Rewind, service: Gateway, held: Held, guard: Shutdown) {
    let deadline = Instant::now() + held.builder.keep_alive;
    tokio::spawn(head_wait(
        io.first, io.inner, service, held, guard, deadline,
    ));
}

/// Waits for the rest of a request head begun (`first`), which it keeps in an allocation of
/// its exact size, reading each piece as it comes, until the head is whole, or hyper would
/// refuse it (`relay::judge`: over `max_header_bytes`, or not a head), or the client closes.
/// A whole head is then served as any (`run`: the relay, then hyper), in a task of its own,
/// as a woken parked one is; a refused one is answered here, with words and `Connection:
/// close`, where hyper's `431` or `400` had none (`relay::refuse`), and closed with a
/// lingering close; one cut off by the client's close is closed unanswered, as hyper closes
/// it. Its `deadline` is `header_read_timeout` from the head's wait (or its park's, for a head
/// begun before one), as hyper's was; it passes as hyper's header timer does: counted and
/// logged (`head_timed_out`), and closed unanswered with a lingering close. After `STALLED`
/// it may be closed to make room, as hyper's stalled head may (`serve`). It holds the drain
/// guard, as hyper did: a drain waits for the head, which is answered with `Connection:
/// close` if it is whole in time, and it is not closed at the drain's end as an idle one is.
#[allow(clippy::manual_async_fn)]
fn head_wait(
    mut first: Bytes,
    mut inner: TcpStream,
    service: Gateway,
    held: Held,
    guard: Shutdown,
    deadline: Instant,
) -> impl Future<Output = ()> + Send {
    async move {
        let keep_alive = held.builder.keep_alive;
        let max = held.builder.max_header_bytes;
        // One timer: `STALLED` first, when it is the shorter, then the deadline.
        let mut closable = false;
        let timer = tokio::time::sleep_until(match keep_alive > STALLED {
            true => (Instant::now() + STALLED).min(deadline),
            false => deadline,
        });
        tokio::pin!(timer);
        let room = &service.idle.closable;
        loop {
            let woken = poll_fn(|cx| {
                if let Poll::Ready(wake) = Wake::read(&inner, cx) {
                    return Poll::Ready(wake);
                }
                if closable && room.poll_picked(cx) {
                    return Poll::Ready(Wake::Picked);
                }
                timer.as_mut().poll(cx).map(|()| Wake::Late)
            })
            .await;
            match woken {
                Wake::Ready if !read_more(&inner, &mut first, max) => continue,
                Wake::Ready | Wake::Broken => break,
                Wake::Late if !closable && timer.deadline() < deadline => {
                    closable = true;
                    timer.as_mut().reset(deadline);
                }
                Wake::Late => {
                    let (state, conn) = service.fast.parts();
                    crate::listener::head_timed_out(state, conn.peer.ip(), keep_alive);
                    let slot = (!held.drain.started()).then_some(held.permit);
                    crate::shutdown::linger(inner, guard, slot);
                    return;
                }
                // At the drain's end, which closes the idle ones: a head is waited for (its
                // guard holds that end), as hyper's was, never to be picked again.
                Wake::Picked if room.limit().ending() => room.never(),
                Wake::Picked => return,
            }
        }
        room.busy();
        match crate::relay::judge(&first, max) {
            // Bytes that are no head go through the relay too, which answers them.
            crate::relay::Judged::Whole => {}
            crate::relay::Judged::Refused(refusal) => {
                let (state, conn) = service.fast.parts();
                let snap = state.load();
                let mut sock = crate::relay::Plain::new(&mut inner);
                let mut out = Vec::new();
                let after = crate::relay::refuse(&mut sock, &refusal, &mut out, &snap, state, conn);
                // Boxed: rare, and inline its state would be every stalled head's (a test
                // below keeps the waiting state small).
                if Box::pin(after).await == crate::relay::After::Refused {
                    let slot = (!held.drain.started()).then_some(held.permit);
                    crate::shutdown::linger(inner, guard, slot);
                }
                return;
            }
            // Cut off by the client's close (or the socket's failure): it can never be whole.
            crate::relay::Judged::More => return,
        }
        let io = service.rewind(first, inner);
        tokio::spawn(serve_again(io, service, held, None, guard));
    }
}

/// Reads what has come of a stalled head onto `first`: whether the connection is to be served
/// now (the head is whole, or one hyper would refuse, `relay::judge`; the client closed, or
/// the socket failed). Up to `HEAD_KEPT` in a new allocation of their joint size; beyond, in
/// one that grows (by doubling, to `max`), parsed again only when the bytes just read may end
/// the head, as hyper parses a head it reads in pieces: a head of `max` bytes sent a few at
/// a time is not parsed for each.
fn read_more(inner: &TcpStream, first: &mut Bytes, max: usize) -> bool {
    let before = first.len();
    let read = if before < HEAD_KEPT {
        let mut room = [0u8; HEAD_KEPT];
        let room = &mut room[..HEAD_KEPT - before];
        inner.try_read(room).inspect(|&n| {
            if n > 0 {
                let mut head = Vec::with_capacity(before + n);
                head.extend_from_slice(first);
                head.extend_from_slice(&room[..n]);
                *first = Bytes::from(head);
            }
        })
    } else {
        let mut head = std::mem::take(first)
            .try_into_mut()
            .unwrap_or_else(|kept| bytes::BytesMut::from(&kept[..]));
        head.reserve(before.min(max.saturating_sub(before)).max(1));
        let read = inner.try_read_buf(&mut head);
        *first = head.freeze();
        read
    };
    match read {
        Ok(0) => true,
        Ok(_) if before >= HEAD_KEPT && first.len() < max && !may_end(&first[before - 3..]) => {
            false
        }
        Ok(_) => crate::relay::judge(first, max) != crate::relay::Judged::More,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Whether `bytes` hold an empty line's start (`\n\r` or `\n\n`): only then can a head whose
/// earlier bytes held none be whole.
pub(crate) fn may_end(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .any(|w| w[0] == b'\n' && matches!(w[1], b'\r' | b'\n'))
}

/// hyper's connection on a plaintext HTTP/1.1 socket.
type Connection = http1::UpgradeableConnection<TokioIo<Rewind>, Gateway>;

/// A connection hyper has ended (its last answer said `Connection: close`, or was an error
/// hyper gave itself: a `400` or `431` to a head it could not read, an answer that did not
/// wait for its body), closed with a lingering close (`shutdown::linger`): the socket, hyper's
/// to drop, would otherwise be closed with what the client still sends unread (requests
/// pipelined behind that answer, the rest of a body), and reset, which can throw away the
/// answer. Outside a drain it keeps its slot while it lingers (and may be picked to make
/// room); `result` is hyper's, passed on.
fn lingering(
    conn: Box<Connection>,
    guard: Shutdown,
    held: Held,
    result: Result<(), hyper::Error>,
) -> Result<(), hyper::Error> {
    if let Some(parts) = conn.into_parts() {
        // hyper's header timer also closes a connection that idles between requests without
        // parking (awaiting a body, or with an upgrade declined): a request only when bytes
        // of its head came.
        let service = &parts.service;
        if result.as_ref().is_err_and(hyper::Error::is_timeout) && service.idle.head_begun() {
            let (state, conn) = service.fast.parts();
            crate::listener::head_timed_out(state, conn.peer.ip(), held.builder.keep_alive);
        }
        let slot = (!held.drain.started()).then_some(held.permit);
        crate::shutdown::linger(parts.io.into_inner().inner, guard, slot);
    }
    result
}

/// A parked connection: its socket, the bytes of a head begun before the park, its service
/// and a deadline, waiting for the next request. Serving it again is a new task
/// (`serve_again`), so that this one stays small.
///
/// Its state is kept at most 280 B, which makes its task 384 B (tokio aligns a task to
/// 128 B; 8 B more would make it 512). Hence the socket and the bytes apart rather than in a
/// `Rewind` (whose `Idle` the service has already), the deadline computed here rather than
/// passed, and a function returning an `async` block rather than an `async fn`, which keeps
/// its arguments twice in its state (as passed, and as moved into its body).
#[allow(clippy::manual_async_fn)]
fn parked(
    mut first: Bytes,
    inner: TcpStream,
    service: Gateway,
    held: Held,
) -> impl Future<Output = ()> + Send {
    async move {
        // A head begun is not idle: such a connection is not closed for room until it has
        // lasted `STALLED` (its first wait, when it is the shorter), as a stalled handshake.
        // `keep_alive` is read where it is needed, not kept: 16 B more in every parked task.
        let stalls = !first.is_empty() && held.builder.keep_alive > STALLED;
        let deadline = tokio::time::sleep(match stalls {
            true => STALLED,
            false => held.builder.keep_alive,
        });
        tokio::pin!(deadline);
        let count = Parked::new(&service.idle, first.is_empty());
        // A head begun before the park keeps its deadline. One that arrives now gets hyper's
        // own, which starts with it.
        let mut begun = false;
        loop {
            // Readiness is polled rather than awaited through `readable()`, whose future
            // would add its size to every parked connection.
            // Picked only while nothing waits to be read: a request that came first is
            // answered, and the connection closes when it idles again.
            let woken = poll_fn(|cx| {
                if let Poll::Ready(wake) = Wake::read(&inner, cx) {
                    return Poll::Ready(wake);
                }
                if count.picked(cx) {
                    return Poll::Ready(Wake::Picked);
                }
                // Among the idle ones (or not closable, with a head begun, as before a
                // drain): no longer counted as arriving (`Idle::arriving`).
                count.0.seen();
                deadline.as_mut().poll(cx).map(|()| Wake::Late)
            })
            .await;
            if woken != Wake::Ready && count.stalling(held.builder.keep_alive) {
                // Its head has stalled: closable from now, until the park's deadline.
                count.0.closable.busy();
                let end = deadline.deadline() - STALLED + held.builder.keep_alive;
                deadline.as_mut().reset(end);
                continue;
            }
            if woken != Wake::Ready {
                if woken == Wake::Late && !first.is_empty() {
                    let (state, conn) = service.fast.parts();
                    let waited = held.builder.keep_alive;
                    crate::listener::head_timed_out(state, conn.peer.ip(), waited);
                }
                // Picked at the drain's end (`Limit::close_idle`): dropped with the
                // process, a request sent on it meanwhile would be answered with a reset.
                // The guard is taken before `count` goes, which the drain's end waits for.
                if count.0.closable.limit().ending() {
                    crate::shutdown::linger(inner, held.drain.guard(), None);
                }
                return;
            }
            if !first.is_empty() {
                begun = true;
                break;
            }
            // Nothing here is held across an await: what is, every parked connection keeps.
            match service.fast.serve(&inner, Bytes::new(), &held.drain) {
                Step::Declined => break,
                Step::Closed => return,
                Step::Served {
                    answered,
                    unwritten,
                    rest,
                } => {
                    first = rest;
                    // It keeps its place among the idle ones: moved to the back for each
                    // held answer, it would take the lock twice per request.
                    if let Some(counted) = answered {
                        // Later, so a compare-and-swap, not a new registration. From the
                        // clock reading that counted the answer, microseconds before its
                        // write: a second reading cost some 37 instructions a held answer.
                        let later = Instant::from_std(counted) + held.builder.keep_alive;
                        deadline.as_mut().reset(later);
                    }
                    if !unwritten.is_empty() {
                        // Counted after `count` goes, whose drop takes such a count back
                        // (`Parked`), and under a guard meanwhile, as `park` counts it: the
                        // drain's end sees it throughout (rare: an answer the socket did not
                        // take whole).
                        let guard = held.drain.guard();
                        drop(count);
                        service.idle.arriving();
                        drop(guard);
                        let io = service.rewind(first, inner);
                        tokio::spawn(write_then_go_on(io, service, held, unwritten));
                        return;
                    }
                    if !first.is_empty() {
                        break;
                    }
                }
            }
        }
        // Only a head begun before the park sets `begun`, and then no answer has moved the
        // deadline: it is still the park's, or its stalling point.
        let head = begun.then(|| match count.stalling(held.builder.keep_alive) {
            true => deadline.deadline() - STALLED + held.builder.keep_alive,
            false => deadline.deadline(),
        });
        // The guard before `count` goes: at the drain's end, a connection woken by a request
        // as it was picked to close is then waited for.
        let guard = held.drain.guard();
        drop(count);
        let io = service.rewind(first, inner);
        tokio::spawn(serve_again(io, service, held, head, guard));
    }
}

/// What ended a parked connection's wait.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The client sent something, or closed.
    Ready,
    /// The socket failed.
    Broken,
    /// Picked to make room, or closed at the drain's end.
    Picked,
    /// Its deadline passed.
    Late,
}

impl Wake {
    /// The socket's read side as a wake: something came (or a close), or the socket failed.
    fn read(inner: &TcpStream, cx: &mut Context<'_>) -> Poll<Wake> {
        inner.poll_read_ready(cx).map(|ready| match ready {
            Ok(()) => Wake::Ready,
            Err(_) => Wake::Broken,
        })
    }
}

/// `run` as a task of its own. Boxed: `serve` spawns `parked`, which spawns this, and a
/// future type cannot contain itself.
fn serve_again(
    io: Rewind,
    service: Gateway,
    held: Held,
    head_deadline: Option<Instant>,
    guard: Shutdown,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let state = service.fast.parts().0.clone();
        let peer = service.fast.parts().1.peer.ip();
        if let Err(e) = run(io, service, held, head_deadline, Some(guard)).await {
            tracing::debug!(error = %e, "connection ended with an error");
            crate::listener::count_unread(&e, &state, peer);
        }
    })
}

/// Serves a plaintext HTTP/1.1 connection: plain forwards without hyper (`relay`) while they
/// come, then hyper (`serve`) from the first request that is not one. A head begun before a
/// park (`head_deadline`) waits for its rest with that deadline (`head_wait`).
pub async fn run(
    mut io: Rewind,
    service: Gateway,
    held: Held,
    head_deadline: Option<Instant>,
    guard: Option<Shutdown>,
) -> Result<(), hyper::Error> {
    let guard = guard.unwrap_or_else(|| held.drain.guard());
    // A head begun before a park waits for its rest without hyper, which would answer one
    // that grows too large without words (`head_wait`).
    if let Some(deadline) = head_deadline {
        if crate::relay::judge(&io.first, held.builder.max_header_bytes)
            == crate::relay::Judged::More
        {
            tokio::spawn(head_wait(
                io.first, io.inner, service, held, guard, deadline,
            ));
            return Ok(());
        }
    }
    if head_deadline.is_none() {
        let (state, conn) = service.fast.parts();
        // Boxed: inline, its 1.3 KB made every new connection's task that much larger, and
        // those tasks, freed between the parked connections' small long-lived ones, left the
        // heap fragmented (RSS with 10,000 idle connections 25 MB against 19 MB boxed).
        let linger = crate::relay::Linger::Park;
        let mut sock = crate::relay::Plain::new(&mut io.inner);
        let relayed =
            crate::relay::serve(&mut io.first, &mut sock, state, conn, &held.drain, linger);
        match Box::pin(relayed).await {
            crate::relay::After::Hyper => {}
            // Closed by a drain: with requests pipelined behind the answer that said so
            // unread, a plain close would reset the connection, and the answer with it.
            crate::relay::After::Close if held.drain.started() => {
                crate::shutdown::linger(io.inner, guard, None);
                return Ok(());
            }
            crate::relay::After::Close | crate::relay::After::Broken => return Ok(()),
            // Within `max_connections` (its slot kept) while it lingers, as any close outside
            // a drain.
            crate::relay::After::Refused => {
                crate::shutdown::linger(io.inner, guard, Some(held.permit));
                return Ok(());
            }
            crate::relay::After::Park => {
                park(io, service, held, guard);
                return Ok(());
            }
            crate::relay::After::Stalled => {
                stalled(io, service, held, guard);
                return Ok(());
            }
        }
    }
    serve(io, service, held, head_deadline, Some(guard)).await
}

#[cfg(test)]
mod tests {
    use super::{parked, Busy, Gateway, Held, Idle};
    use crate::config::Config;
    use crate::fast::Fast;
    use crate::gateway::Conn;
    use crate::hold::pages::Pages;
    use crate::metrics::Metrics;
    use crate::shutdown::Drain;
    use crate::state::mode::Persisted;
    use crate::state::snapshot::{Inputs, Parts};
    use crate::state::{Snapshot, StateHandle};
    use std::future::{poll_fn, Future};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;
    use std::task::Poll;

    /// What ten thousand idle clients cost is mostly their parked tasks. tokio aligns a task
    /// to 128 B and adds 104 B to its future: up to 280 B of state it is 384 B, beyond that
    /// 512 B (1.3 MB more for 10,000 connections). A canary on 64-bit targets: its figure
    /// moves with tokio's, hyper's and the compiler's layouts (272 B in release, 280 B in
    /// debug builds since it polls whether it was picked to close for room, 8 B more than
    /// when written); when it fails, measure before raising it.
    #[tokio::test]
    async fn a_parked_connection_stays_in_the_384_byte_task() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config::parse("", dir.path(), None).expect("config");
        let pages = Pages::load(&config.maintenance).expect("pages");
        let metrics = Arc::new(Metrics::new());
        let parts = Parts::new(Arc::new(config), Arc::new(pages), None, metrics).expect("parts");
        let inputs = Inputs {
            state: &Persisted::default(),
            up: &[true],
            passive: Arc::from(Vec::new()),
            outage_since: None,
            now: std::time::SystemTime::now(),
        };
        let state = StateHandle::new(Snapshot::build(&parts, &inputs));
        let state_again = state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (socket, peer) = listener.accept().await.expect("accept");
        let idle = Arc::new(Idle::new(Default::default()));
        let fast = Fast::new(state, Arc::new(Conn::new(peer, false)));
        let held = Held {
            builder: parts.conn.clone(),
            drain: Arc::new(Drain::default()),
            permit: Arc::<crate::listener::Limit>::default()
                .take(1)
                .expect("slot"),
        };
        let task = parked(bytes::Bytes::new(), socket, Gateway::new(fast, idle), held);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 280, "a parked connection's state is {size} B");
        // A connection whose head stalls waits for its rest in `head_wait`: a flood of them
        // (slowloris) costs this each. Its rare refusal is boxed: inline, its answer's write
        // made the waiting state 704 B where it was 336 before heads too large were answered
        // there; 432 with it boxed.
        let _stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (socket, peer) = listener.accept().await.expect("accept");
        let fast = Fast::new(state_again, Arc::new(Conn::new(peer, false)));
        let held = Held {
            builder: parts.conn.clone(),
            drain: Arc::new(Drain::default()),
            permit: Arc::<crate::listener::Limit>::default()
                .take(1)
                .expect("slot"),
        };
        let (_trigger, guard) = crate::shutdown::channel();
        let idle = Arc::new(Idle::new(Default::default()));
        let now = tokio::time::Instant::now();
        let task = super::head_wait(
            bytes::Bytes::new(),
            socket,
            Gateway::new(fast, idle),
            held,
            guard,
            now,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 432, "a stalled head's waiting state is {size} B");
    }

    /// A held proxy's state, its drain and connection limit, and a connection to it: the
    /// client's end, and the proxy's socket with the client's address.
    struct DrainLab {
        builder: Arc<crate::listener::ConnBuilder>,
        state: StateHandle,
        drain: Arc<Drain>,
        limit: Arc<crate::listener::Limit>,
        client: tokio::net::TcpStream,
        socket: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    }

    impl DrainLab {
        async fn new() -> DrainLab {
            DrainLab::with("", true).await
        }

        /// With the config `toml`, held or not.
        async fn with(toml: &str, hold: bool) -> DrainLab {
            let snapshot = crate::state::snapshot::for_tests(toml, hold);
            let builder = snapshot.conn.clone();
            let state = StateHandle::new(snapshot);
            let drain = Arc::new(Drain::default());
            let limit =
                crate::listener::Limit::new(Default::default(), Default::default(), drain.clone());
            let limit = Arc::new(limit);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let client = tokio::net::TcpStream::connect(listener.local_addr().expect("address"))
                .await
                .expect("connect");
            let (socket, peer) = listener.accept().await.expect("accept");
            DrainLab {
                builder,
                state,
                drain,
                limit,
                client,
                socket,
                peer,
            }
        }

        /// Sends a held request, and waits until the proxy's socket has it.
        async fn ask(&mut self) {
            use tokio::io::AsyncWriteExt;
            self.client
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("sent");
            self.socket.readable().await.expect("readable");
        }

        fn held(&self) -> Held {
            Held {
                builder: self.builder.clone(),
                drain: self.drain.clone(),
                permit: self.limit.take(10).expect("slot"),
            }
        }
    }

    /// Begins the drain and polls its end once: it must wait (`not_yet` says for what). Then
    /// the client sends `then`, reads its answer (`Some(at_start)`: at the start, or
    /// anywhere) and a clean end, and the drain's end comes.
    async fn drain_waits_for_the_answer(
        drain: Arc<Drain>,
        limit: &crate::listener::Limit,
        mut client: tokio::net::TcpStream,
        (at_start, then): (bool, &[u8]),
        not_yet: &str,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        drain.begin();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        let ending = crate::app::drain(drain.clone(), limit, deadline);
        tokio::pin!(ending);
        let first = poll_fn(|cx| Poll::Ready(ending.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "{not_yet}");
        client.write_all(then).await.expect("sent");
        let mut answer = Vec::new();
        let wait = std::time::Duration::from_secs(10);
        let read = tokio::time::timeout(wait, client.read_to_end(&mut answer));
        assert!(matches!(read.await, Ok(Ok(_))), "no clean end");
        let answer = String::from_utf8_lossy(&answer);
        if at_start {
            assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        } else {
            assert!(answer.contains("HTTP/1.1 503 "), "no answer");
        }
        drop(client);
        let ended = tokio::time::timeout(wait, ending).await;
        assert_eq!(ended.ok(), Some(true));
    }

    /// A kept-alive connection whose held request was answered at once, handed to a task to
    /// park, holds the drain's end until that task has run (and closed it, with a lingering
    /// close, the drain's end having come): seen by nothing meanwhile (no guard, not yet among
    /// the idle ones), it let the drain end at once, and the process exit over it, the
    /// client's next request answered with a reset.
    #[tokio::test]
    async fn a_connection_handed_to_park_and_not_yet_run_holds_the_drain_end() {
        let mut lab = DrainLab::new().await;
        lab.ask().await;
        let held = lab.held();
        let DrainLab {
            state,
            drain,
            limit,
            client,
            socket,
            peer,
            ..
        } = lab;
        let idle = Arc::new(Idle::new(limit.clone()));
        let io = super::Rewind::new(bytes::Bytes::new(), socket, Some(idle.clone()), None);
        let fast = Fast::new(state, Arc::new(Conn::new(peer, false)));
        let started = super::start(io, Gateway::new(fast, idle), held);
        assert!(started.is_none(), "answered at once, and handed to park");
        drain_waits_for_the_answer(
            drain,
            &limit,
            client,
            (true, b""),
            "the drain ended over a connection handed to park and not yet run",
        )
        .await;
    }

    /// A parked connection woken by a held request whose answer the socket does not take
    /// whole, handed to a task to write the rest, holds the drain's end until that task has
    /// run: its count for the drain (`Idle::arriving`) was taken back at once by the park's
    /// own going (`Parked`'s drop), and the drain's end, come between the spawn and the
    /// task's first poll, saw nothing and let the process exit over the answer.
    #[tokio::test]
    async fn a_parked_connection_handed_to_write_the_rest_holds_the_drain_end() {
        let mut lab = DrainLab::new().await;
        // The client reads nothing yet: the socket takes no answer now.
        let filler = [0u8; 64 * 1024];
        loop {
            match lab.socket.try_write(&filler) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        lab.ask().await;
        let held = lab.held();
        let DrainLab {
            state,
            drain,
            limit,
            client,
            socket,
            peer,
            ..
        } = lab;
        let idle = Arc::new(Idle::new(limit.clone()));
        let fast = Fast::new(state, Arc::new(Conn::new(peer, false)));
        let task = parked(bytes::Bytes::new(), socket, Gateway::new(fast, idle), held);
        tokio::pin!(task);
        // Polled here, not spawned: the task it spawns cannot run before this one awaits.
        let woke = poll_fn(|cx| Poll::Ready(task.as_mut().poll(cx))).await;
        assert!(woke.is_ready(), "answered, and handed to write the rest");
        drain_waits_for_the_answer(
            drain,
            &limit,
            client,
            (false, b""),
            "the drain ended over an answer handed to a task not yet run",
        )
        .await;
    }

    /// A connection whose first head has begun and stalls: its client has sent
    /// `GET / HTTP/1.1\r\nHost: x\r\n` and nothing more, which the proxy's socket has.
    async fn stalled_head() -> DrainLab {
        stalled_head_in(DrainLab::new().await).await
    }

    /// `stalled_head` in `lab`.
    async fn stalled_head_in(mut lab: DrainLab) -> DrainLab {
        use tokio::io::AsyncWriteExt;
        lab.client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("sent");
        lab.socket.readable().await.expect("readable");
        lab
    }

    /// The client, and `run` serving the connection (its drain guard taken now, as `plain`
    /// takes it), which says whether it was done with the connection within `within`: handed
    /// to a task of its own rather than still in `run`'s.
    fn serve_new(
        lab: DrainLab,
        within: std::time::Duration,
    ) -> (tokio::net::TcpStream, impl Future<Output = bool>) {
        let held = lab.held();
        let guard = held.drain.guard();
        let DrainLab {
            state,
            limit,
            client,
            socket,
            peer,
            ..
        } = lab;
        let idle = Arc::new(Idle::new(limit));
        let io = super::Rewind::new(bytes::Bytes::new(), socket, Some(idle.clone()), None);
        let fast = Fast::new(state, Arc::new(Conn::new(peer, false)));
        let ran = super::run(io, Gateway::new(fast, idle), held, None, Some(guard));
        let done = async move { matches!(tokio::time::timeout(within, ran).await, Ok(Ok(()))) };
        (client, done)
    }

    /// The head of the answer to a stalled head's rest (its blank line), sent by `client`.
    async fn rest_answered(
        client: &mut tokio::net::TcpStream,
        wait: std::time::Duration,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(b"\r\n").await.expect("sent");
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(wait, client.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&chunk[..n]),
                other => panic!("no answer: {other:?}"),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// A new connection whose first head has begun and stalls waits for its rest with its
    /// bytes alone (`stalled`), not in hyper, which held its two 8 KiB buffers (some 16 KB a
    /// connection: a slowloris' 2,000 connections took RSS from 9.5 to 41.5 MB) until
    /// `header_read_timeout` (10 s here): `run`'s task is done with it at once. Its head, once
    /// whole, is answered on the same connection.
    #[tokio::test]
    async fn a_stalled_first_head_waits_without_hyper() {
        let wait = std::time::Duration::from_secs(5);
        let (mut client, served) = serve_new(stalled_head().await, wait);
        assert!(served.await, "a stalled head stayed with hyper");
        let answer = rest_answered(&mut client, wait).await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    }

    /// So does one that hyper serves anyway, the relay being off (`intercept_statuses` here,
    /// `redirect_https`, an `h2c://` server): it stayed in hyper, two 8 KiB buffers, until
    /// `header_read_timeout`. Once whole, hyper answers it (the server is down: the outage
    /// answer).
    #[tokio::test]
    async fn a_stalled_first_head_for_hyper_waits_without_hyper_too() {
        let wait = std::time::Duration::from_secs(5);
        let toml = "[upstream]\nservers = [\"http://127.0.0.1:9\"]\nintercept_statuses = [502]\n";
        let lab = stalled_head_in(DrainLab::with(toml, false).await).await;
        assert!(!lab.state.load().relay, "the relay is off");
        let (mut client, served) = serve_new(lab, wait);
        assert!(served.await, "a stalled head stayed with hyper");
        let answer = rest_answered(&mut client, wait).await;
        assert!(answer.starts_with("HTTP/1.1 5"), "{answer}");
    }

    /// A stalled first head holds the drain's end, as it did in hyper: once whole, it is
    /// answered with `Connection: close`, and the drain ends.
    #[tokio::test]
    async fn a_stalled_first_head_holds_the_drain_end_until_answered() {
        let lab = stalled_head().await;
        let (drain, limit) = (lab.drain.clone(), lab.limit.clone());
        let (client, served) = serve_new(lab, std::time::Duration::from_secs(30));
        let served = tokio::spawn(served);
        drain_waits_for_the_answer(
            drain,
            &limit,
            client,
            (true, b"\r\n"),
            "the drain ended over a stalled head",
        )
        .await;
        assert!(served.await.expect("served"));
    }

    #[test]
    fn idle_means_nothing_unfinished_unflushed_or_unread() {
        let get = http::Request::new(crate::body::Body::Empty);
        let idle = Arc::new(Idle::new(Default::default()));
        assert!(!idle.parkable(), "no read has blocked yet");
        idle.read_blocked.store(true, Relaxed);
        assert!(idle.parkable());
        idle.unflushed.store(true, Relaxed);
        assert!(!idle.parkable(), "a response is still being written");
        idle.unflushed.store(false, Relaxed);
        let (busy, _) = Busy::new(&idle, &get);
        assert!(!idle.parkable(), "a response is not finished");
        drop(busy);
        assert!(idle.parkable());

        // A request body may still be coming after its answer: not idle until a request
        // without one shows that it ended.
        let put = http::Request::new(crate::body::Body::full("data"));
        let (busy, upload) = Busy::new(&idle, &put);
        drop(busy);
        assert!(
            !idle.parkable(),
            "the rest of a body would be read as a request"
        );
        assert!(idle.awaits_body());
        drop(Busy::new(&idle, &get));
        assert!(idle.parkable());

        // Read to its end, the body no longer holds the connection up; a word about an
        // earlier body does not clear a later one's.
        let (busy, second) = Busy::new(&idle, &put);
        drop(busy);
        upload.expect("a body").ended();
        assert!(!idle.parkable(), "an earlier body's end cleared this one");
        second.expect("a body").ended();
        assert!(idle.parkable());

        // An upgrade that was refused stays pending in hyper for the connection's life.
        let mut upgrade = http::Request::new(crate::body::Body::Empty);
        upgrade.headers_mut().insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        drop(Busy::new(&idle, &upgrade));
        drop(Busy::new(&idle, &get));
        assert!(!idle.parkable(), "a pending upgrade would take the socket");
        assert!(
            idle.waits_but_for_upgrade(),
            "a declined upgrade may make room"
        );
        idle.switched.store(true, Relaxed);
        assert!(
            !idle.waits_but_for_upgrade(),
            "a switched connection is the tunnel's"
        );
    }
}
