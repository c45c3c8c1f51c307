//! Clocks on stalls: how long a peer may let an exchange stand still. A client that takes
//! nothing of what is written to it (`proxy.send_timeout`, nginx's `send_timeout`), on every
//! path that writes to one; a server's response body that stops (`upstream.read_timeout`) and
//! a client's request body that stops (`proxy.body_read_timeout`), in `body`; and an
//! HTTP/2 stream whose client opens no room in its window (`Answers`).
//!
//! A client that stops reading fills its socket's buffer, and every write to it waits. Left
//! alone, the connection, its buffers, the upstream connection streaming to it and a drain's
//! patience stay held until the client goes. A clock runs only while what it times waits, and
//! restarts whenever that moves: a slow peer is served, a silent one is let go. Its `Sleep` is
//! made at the first wait, so the common poll, ready at once, costs a branch.

use crate::state::StateHandle;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The deadline of a wait: of a write (one per connection, or per `write_all`), or of a body.
#[derive(Default)]
pub struct StallClock {
    /// When the current wait began and its limit; `None` while writes move.
    wait: Option<(Instant, Duration)>,
    /// Made by the first wait and kept: a later wait leaves its deadline where it was and
    /// moves it only when it fires early, so that a large answer, whose writes wait and move
    /// in turn, does not register a timer for every write.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl StallClock {
    /// Whether a wait has gone on, with nothing moving, for its `limit`: called at every poll
    /// of what it times, with whether that poll `moved` (was ready). The limit is read when a
    /// wait begins, so that a reload applies to the next one; `None` is no limit.
    pub fn expired(
        &mut self,
        cx: &mut Context<'_>,
        moved: bool,
        limit: impl FnOnce() -> Option<Duration>,
    ) -> bool {
        if moved {
            self.wait = None;
            return false;
        }
        let (since, limit) = match self.wait {
            Some(wait) => wait,
            None => {
                let Some(limit) = limit() else {
                    return false;
                };
                *self.wait.insert((Instant::now(), limit))
            }
        };
        let deadline = since + limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            // A reload shortened the limit since the deadline was set.
            sleep.as_mut().reset(deadline);
        }
        while sleep.as_mut().poll(cx).is_ready() {
            if sleep.deadline() >= deadline {
                self.wait = None;
                return true;
            }
            // Set by an earlier wait: this one has time left.
            sleep.as_mut().reset(deadline);
        }
        false
    }

    /// Passes on the poll of a write, a flush or a shutdown, unless it has waited, with
    /// nothing moving since, longer than `limit`: then it fails with `TimedOut`.
    pub fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        limit: impl FnOnce() -> Option<Duration>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.expired(cx, polled.is_ready(), limit) {
            return Poll::Ready(Err(timed_out()));
        }
        polled
    }
}

/// A connection's clock, and where its limit is read.
pub struct Timing {
    limit: Limit,
    clock: StallClock,
}

enum Limit {
    /// The current `proxy.send_timeout`, for the proxy's clients.
    Configured(StateHandle),
    /// A limit of its own, for the admin listener's.
    Fixed(Duration),
}

impl Timing {
    pub fn new(state: StateHandle) -> Timing {
        Timing {
            limit: Limit::Configured(state),
            clock: StallClock::default(),
        }
    }

    pub fn fixed(limit: Duration) -> Timing {
        Timing {
            limit: Limit::Fixed(limit),
            clock: StallClock::default(),
        }
    }

    pub fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let limit = &self.limit;
        self.clock.watch(
            cx,
            || match limit {
                Limit::Configured(state) => state.load().config.proxy.send_timeout,
                Limit::Fixed(limit) => Some(*limit),
            },
            polled,
        )
    }
}

/// A client's socket whose writes are timed: beneath TLS, where every write that moves is
/// seen (above it, a flush stays `Pending` until the session's whole buffer has gone, and a
/// client that reads slowly but steadily would be taken for one that reads nothing).
pub struct Timed<S> {
    inner: S,
    timing: Timing,
}

impl<S> Timed<S> {
    pub fn new(inner: S, state: StateHandle) -> Timed<S> {
        Timed {
            inner,
            timing: Timing::new(state),
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    pub fn fixed(inner: S, limit: Duration) -> Timed<S> {
        Timed {
            inner,
            timing: Timing::fixed(limit),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.timing.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.timing.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.timing.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.timing.watch(cx, polled)
    }
}

/// The answers of one HTTP/2 connection that wait on its client. An answer waits once it has
/// handed hyper a piece and is not asked for the next: hyper asks only when the stream's
/// flow-control window has room. A client that reads its socket but opens no window never
/// fills the socket, so the write clock (`Timed`) never runs, and each such stream would hold
/// the connection and the server's connection streaming to it for as long as the client
/// likes; nginx times this wait with `send_timeout` too.
///
/// The connection is what is timed, as a socket's writes are: it stalls when an answer has
/// waited a whole period and no answer on it has moved meanwhile. Streams share the
/// connection's window and its socket, so on a slow link one answer may wait its turn for
/// long while the others move; that client is reading. hyper cannot reset one stream from
/// outside it, so a stall closes the connection.
#[derive(Default)]
pub struct Answers {
    /// Moved on by each tick of `stalled`. An answer that begins to wait is counted under
    /// the tick's parity: one still counted under the previous tick's when the next comes
    /// has waited at least a whole period, with no clock read per piece.
    tick: AtomicUsize,
    waiting: [AtomicUsize; 2],
    /// Bumped whenever a waiting answer is asked for its next piece.
    moves: AtomicUsize,
    /// Requests whose answers hyper has not let go yet (`Open`), from their arrival.
    open: AtomicUsize,
    /// Every request that has arrived, for the idle limit (`shutdown::until_idle`).
    pub arrived: AtomicU64,
    /// Set once the connection has been told to go (GOAWAY).
    going: AtomicBool,
    /// Bytes of request bodies on the connection being read whole to be sent again if need be
    /// (`forward::buffer_for_replay`), at most `REPLAY_ROOM`.
    replaying: AtomicUsize,
}

/// What the request bodies of one HTTP/2 connection may hold in memory at once, read whole to
/// be sent again (each at most 64 KiB): 16 such bodies. An HTTP/1.1 connection reads one body
/// at a time, but an HTTP/2 one has 128 streams: each a body of 64 KiB less a byte, stalled,
/// they held some 11 MB on the connection for `response_timeout`, and a hundred connections
/// a gigabyte. Past it a body streams, as a larger one does, and is not sent twice.
pub const REPLAY_ROOM: usize = 1024 * 1024;

/// A body's share of `REPLAY_ROOM`, given back when dropped.
pub struct Replaying(Arc<Answers>, usize);

impl Drop for Replaying {
    fn drop(&mut self) {
        self.0.replaying.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// A request on the connection, from its arrival until hyper lets its answer go.
pub struct Open(Arc<Answers>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Answers {
    /// Counts a request from its arrival: the answer made for it takes the count over.
    pub fn open(self: &Arc<Self>) -> Open {
        self.arrived.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self.clone())
    }

    /// Room for a body of `len` bytes to be read whole, if the connection's bodies leave it
    /// (`REPLAY_ROOM`).
    pub fn replaying(self: &Arc<Self>, len: usize) -> Option<Replaying> {
        let taken = self.replaying.fetch_add(len, Ordering::Relaxed);
        if taken.saturating_add(len) > REPLAY_ROOM {
            self.replaying.fetch_sub(len, Ordering::Relaxed);
            return None;
        }
        Some(Replaying(self.clone(), len))
    }

    /// Whether no request on the connection is open: none in hyper's hands, none waiting.
    pub fn idle(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0
    }

    /// The connection has been told to go: from now on, once nothing on it is left in
    /// hyper's hands, what keeps it open can only be data in a window that does not open.
    pub fn going(&self) {
        self.going.store(true, Ordering::Relaxed);
    }

    fn wait(&self) -> usize {
        let parity = self.tick.load(Ordering::Relaxed) & 1;
        self.waiting[parity].fetch_add(1, Ordering::Relaxed);
        parity
    }

    fn moved(&self, parity: usize) {
        self.left(parity);
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// An answer that stops waiting without moving: dropped, as when its client reset its
    /// stream, which says nothing of whether the client reads.
    fn left(&self, parity: usize) {
        self.waiting[parity].fetch_sub(1, Ordering::Relaxed);
    }

    /// Resolves once an answer has waited on its client for `proxy.send_timeout`, to twice
    /// that, with no answer on the connection moving for the last of it; or once the
    /// connection, told to go, has had no request in hyper's hands for a whole period and is
    /// still open. hyper lets an answer go once it has handed its last piece to HTTP/2, so
    /// what the window could not take of that piece (an answer whose end came after it:
    /// chunked, or ended by trailers) keeps the stream, and the connection, open untimed.
    /// The limit is read at each tick, so that a reload applies from the next one; while it
    /// is off, the ticks come every `otherwise` and find nothing.
    pub async fn stalled(&self, limit: impl Fn() -> Option<Duration>, otherwise: Duration) {
        let mut seen = self.moves.load(Ordering::Relaxed);
        let mut emptied = false;
        loop {
            let limit = limit();
            tokio::time::sleep(limit.unwrap_or(otherwise)).await;
            // After GOAWAY hardly a request comes (hyper's first GOAWAY admits streams until
            // its second, a round trip later): a count of 0 at two ticks in a row has been 0
            // for the period between them but for such a late request that came and went.
            let empty =
                self.going.load(Ordering::Relaxed) && self.open.load(Ordering::Relaxed) == 0;
            if limit.is_some() && empty && emptied {
                return;
            }
            emptied = empty;
            let moves = self.moves.load(Ordering::Relaxed);
            let tick = self.tick.load(Ordering::Relaxed);
            let earlier = tick.wrapping_add(1) & 1;
            let old = self.waiting[earlier].load(Ordering::Relaxed);
            if limit.is_some() && moves == seen && old > 0 {
                return;
            }
            seen = moves;
            // An answer still waiting from before stays where the next tick looks: counted
            // anew under the other parity, it would be looked at only every other tick.
            if old == 0 {
                self.tick.store(tick.wrapping_add(1), Ordering::Relaxed);
            }
        }
    }
}

/// A response body on an HTTP/2 connection, counted in its `Answers` while it waits.
///
/// It hands hyper at most `PIECE` at a time: hyper sends a piece as soon as the window has any
/// room, and the window then holds what went before it, so a wait lasts about as long as the
/// client takes to read one piece. A larger piece would be taken for a stall while a slow
/// but steady client was reading it.
pub struct Answer<B> {
    body: B,
    open: Open,
    /// Whether it has anything to send: an answer with nothing cannot wait.
    timed: bool,
    /// The parity it is counted under while it waits.
    waiting: Option<usize>,
    /// What is left of a piece of the body larger than `PIECE`.
    rest: Bytes,
    /// Whether it answers a `HEAD`.
    head: bool,
}

/// One HTTP/2 DATA frame at the default frame size. Streams take turns on a connection, so
/// with N answers under way a piece can take N × `PIECE` of the client's reading: 16 KiB
/// keeps that within reach of a slow link (100 answers at 27 KB/s within a minute). 64 KiB
/// pieces cost hyper's loop and h2's locks less often (about 3 % less CPU per 64 KiB answer
/// over h2c, measured), but asked four times as much of such a client.
const PIECE: usize = 16 * 1024;

impl<B: HttpBody> Answer<B> {
    pub fn new(body: B, open: Open) -> Answer<B> {
        Answer {
            timed: !body.is_end_stream(),
            body,
            open,
            waiting: None,
            rest: Bytes::new(),
            head: false,
        }
    }

    /// Marks it as the answer to a `HEAD`, which has no body whatever length it gives: its
    /// size then says nothing (`size_hint`).
    pub fn to_head(mut self, head: bool) -> Answer<B> {
        self.head = head;
        self
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Answer<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if !this.timed {
            return Pin::new(&mut this.body).poll_frame(cx);
        }
        let answers = &this.open.0;
        if let Some(parity) = this.waiting.take() {
            answers.moved(parity);
        }
        if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
        let mut piece = this.rest.split_to(this.rest.len().min(PIECE));
        if this.rest.is_empty() && this.body.is_end_stream() && piece.len() > 1 {
            // The last byte goes alone: hyper sends the last piece once the window has room
            // for one byte more than it holds, and then lets the answer go, so what the window
            // could not take of a whole last piece would wait there untimed. A one-byte last
            // piece leaves nothing behind once it is sent.
            this.rest = piece.split_off(piece.len() - 1);
        }
        this.waiting = Some(answers.wait());
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // hyper's HTTP/2 server writes an exact size as `content-length` when the answer has
        // none, and hyper's client sizes a `HEAD`'s body 0 (since 1.13): a `HEAD`'s answer from
        // an HTTP/2 server that gave no length would tell the client that a `GET`'s body is
        // empty.
        if self.head {
            return SizeHint::default();
        }
        let hint = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut with_rest = SizeHint::new();
        with_rest.set_lower(hint.lower().saturating_add(rest));
        if let Some(upper) = hint.upper() {
            with_rest.set_upper(upper.saturating_add(rest));
        }
        with_rest
    }
}

impl<B> Drop for Answer<B> {
    fn drop(&mut self) {
        if let Some(parity) = self.waiting {
            self.open.0.left(parity);
        }
    }
}

/// The error of a client that took nothing for `proxy.send_timeout`.
fn timed_out() -> io::Error {
    io::Error::new(
        ErrorKind::TimedOut,
        "the client took nothing of its answer for proxy.send_timeout",
    )
}

/// Whether `e` is `StallClock`'s: the client stopped reading.
pub fn is_timed_out(e: &io::Error) -> bool {
    e.kind() == ErrorKind::TimedOut
}

/// Writes `buf` whole, then flushes when `flush` (a stream that keeps what it is given, TLS),
/// failing with `TimedOut` when nothing moves for `limit`.
pub async fn write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut buf: &[u8],
    flush: bool,
    limit: Option<Duration>,
) -> io::Result<()> {
    let mut clock = StallClock::default();
    poll_fn(|cx| {
        while !buf.is_empty() {
            let polled = Pin::new(&mut *w).poll_write(cx, buf);
            match ready!(clock.watch(cx, || limit, polled))? {
                0 => return Poll::Ready(Err(ErrorKind::WriteZero.into())),
                n => buf = &buf[n..],
            }
        }
        if flush {
            let polled = Pin::new(&mut *w).poll_flush(cx);
            ready!(clock.watch(cx, || limit, polled))?;
        }
        Poll::Ready(Ok(()))
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A write that waits on `clock` until it fails.
    async fn wait(clock: &mut StallClock, limit: Duration) -> io::Result<()> {
        poll_fn(|cx| clock.watch(cx, || Some(limit), Poll::Pending)).await
    }

    /// A write that moves.
    fn moved(clock: &mut StallClock) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polled = clock.watch(&mut cx, || None, Poll::Ready(Ok(())));
        assert!(matches!(polled, Poll::Ready(Ok(()))));
    }

    /// A wait's deadline is its own: an earlier, later deadline (a limit since shortened by
    /// a reload) does not delay it, and an earlier, sooner one does not end it early.
    #[tokio::test(start_paused = true)]
    async fn each_wait_has_its_own_deadline() {
        let second = Duration::from_secs(1);
        let mut clock = StallClock::default();
        // An hour's wait, ended by a write that moved after a minute.
        let hour = wait(&mut clock, Duration::from_secs(3600));
        assert!(tokio::time::timeout(Duration::from_secs(60), hour)
            .await
            .is_err());
        moved(&mut clock);
        let start = tokio::time::Instant::now();
        assert!(wait(&mut clock, second)
            .await
            .is_err_and(|e| is_timed_out(&e)));
        assert_eq!(start.elapsed(), second);
        // A second's wait, ended after half of it; the next wait gets its whole second.
        let half = wait(&mut clock, second);
        assert!(tokio::time::timeout(second / 2, half).await.is_err());
        moved(&mut clock);
        let start = tokio::time::Instant::now();
        assert!(wait(&mut clock, second).await.is_err());
        assert_eq!(start.elapsed(), second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_nobody_reads_fails_after_the_limit_and_a_slow_reader_is_served() {
        // A pipe of 64 bytes: the writer waits as soon as the reader stops.
        let (client, mut proxy) = tokio::io::duplex(64);
        let answer = vec![b'x'; 1024];
        let limit = Some(Duration::from_secs(60));

        let start = tokio::time::Instant::now();
        let stalled = write_all(&mut proxy, &answer, true, limit).await;
        assert!(stalled.as_ref().is_err_and(is_timed_out), "{stalled:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(60));

        // A reader that takes 64 bytes every 50 s never lets the clock run out.
        let (mut client2, mut proxy2) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut piece = [0u8; 64];
            while got.len() < 1024 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                let n = client2.read(&mut piece).await.unwrap();
                got.extend_from_slice(&piece[..n]);
            }
            got
        });
        write_all(&mut proxy2, &answer, true, limit).await.unwrap();
        assert_eq!(reader.await.unwrap(), answer);

        // No limit: the write waits as long as it must.
        let waiting = write_all(&mut proxy, &answer, false, None);
        let late = tokio::time::timeout(Duration::from_secs(3600), waiting).await;
        assert!(late.is_err(), "a write with no limit gave up");
        drop(client);
    }

    /// An HTTP/2 answer is handed on in pieces of at most `PIECE`, its last byte alone when its
    /// length is known, whole and in order, its length still announced; it is counted as
    /// waiting from each piece until it is asked for the next, and no longer once dropped.
    #[test]
    fn an_answer_is_handed_on_in_pieces_and_counted_while_it_waits() {
        use http_body_util::Full;
        let len = 2 * PIECE + 7_232;
        let text: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let answers = Arc::new(Answers::default());
        let mut answer = Answer::new(Full::new(Bytes::from(text.clone())), answers.open());
        assert_eq!(answer.size_hint().exact(), Some(len as u64));
        let waiting = |answers: &Answers| {
            answers.waiting[0].load(Ordering::Relaxed) + answers.waiting[1].load(Ordering::Relaxed)
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut sizes = Vec::new();
        let mut got = Vec::new();
        while let Poll::Ready(Some(frame)) = Pin::new(&mut answer).poll_frame(&mut cx) {
            let data = frame.unwrap().into_data().unwrap();
            assert_eq!(
                waiting(&answers),
                1,
                "a piece handed on is counted as waiting"
            );
            sizes.push(data.len());
            got.extend_from_slice(&data);
        }
        assert_eq!(sizes, [PIECE, PIECE, 7_231, 1]);
        assert_eq!(got, text);
        assert!(answer.is_end_stream());
        assert_eq!(
            waiting(&answers),
            0,
            "an answer that ended waits for nothing"
        );

        let mut answer = Answer::new(Full::new(Bytes::from_static(b"ab")), answers.open());
        assert!(Pin::new(&mut answer).poll_frame(&mut cx).is_ready());
        assert_eq!(waiting(&answers), 1);
        drop(answer);
        assert_eq!(waiting(&answers), 0, "a dropped answer still counted");
    }

    /// The connection stalls once an answer has waited a whole period with none moving; an
    /// answer that waits its turn while another moves is not a stall, nor is an answer that
    /// is asked for its next piece within the period.
    #[tokio::test(start_paused = true)]
    async fn a_connection_stalls_when_an_answer_waits_and_none_moves() {
        use http_body_util::Full;
        let second = Duration::from_secs(1);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let piece = || Full::new(Bytes::from(vec![b'x'; 3 * PIECE]));
        let answers = Arc::new(Answers::default());
        let stalled = answers.stalled(|| Some(second), second);
        tokio::pin!(stalled);
        let mut waits = Answer::new(piece(), answers.open());
        let mut moves = Answer::new(piece(), answers.open());
        assert!(Pin::new(&mut waits).poll_frame(&mut cx).is_ready());
        // Another answer moves every 900 ms for 2.7 s: no stall, though `waits` waits.
        for _ in 0..3 {
            assert!(Pin::new(&mut moves).poll_frame(&mut cx).is_ready());
            let early = tokio::time::timeout(second * 9 / 10, &mut stalled).await;
            assert!(
                early.is_err(),
                "a connection that moves was taken for stalled"
            );
        }
        // Nothing moves from here: the stall is seen within two periods.
        let start = tokio::time::Instant::now();
        tokio::time::timeout(second * 2, &mut stalled)
            .await
            .unwrap();
        assert!(start.elapsed() <= second * 2);

        // An answer asked again within each period never stalls its connection.
        let answers = Arc::new(Answers::default());
        let stalled = answers.stalled(|| Some(second), second);
        tokio::pin!(stalled);
        let mut answer = Answer::new(piece(), answers.open());
        for _ in 0..3 {
            assert!(Pin::new(&mut answer).poll_frame(&mut cx).is_ready());
            let early = tokio::time::timeout(second * 9 / 10, &mut stalled).await;
            assert!(early.is_err(), "a moving answer was taken for stalled");
        }
        // An answer that began to wait just after a tick is looked at by the next tick that
        // finds nothing moving, not every other tick: here the last move is at 2.05 s and
        // the stall is seen at the 4 s tick, where it would have been at 5 s.
        let answers = Arc::new(Answers::default());
        let start = tokio::time::Instant::now();
        let stalled = answers.stalled(|| Some(second), second);
        tokio::pin!(stalled);
        let mut moves = Answer::new(piece(), answers.open());
        assert!(Pin::new(&mut moves).poll_frame(&mut cx).is_ready());
        let until = |at: u64| tokio::time::sleep_until(start + Duration::from_millis(at));
        tokio::select! { () = &mut stalled => panic!("early"), () = until(1100) => {} }
        let mut waits = Answer::new(piece(), answers.open());
        assert!(Pin::new(&mut waits).poll_frame(&mut cx).is_ready());
        for at in [1500, 2050] {
            tokio::select! { () = &mut stalled => panic!("early"), () = until(at) => {} }
            assert!(Pin::new(&mut moves).poll_frame(&mut cx).is_ready());
        }
        drop(moves);
        stalled.await;
        assert_eq!(start.elapsed(), second * 4);

        // Off: an answer waits as long as it must.
        let answers = Arc::new(Answers::default());
        let mut answer = Answer::new(piece(), answers.open());
        assert!(Pin::new(&mut answer).poll_frame(&mut cx).is_ready());
        let off = answers.stalled(|| None, second);
        assert!(tokio::time::timeout(second * 3600, off).await.is_err());
    }
}
