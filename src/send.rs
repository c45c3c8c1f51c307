//! How long a client may take nothing of what is written to it (`proxy.send_timeout`,
//! nginx's `send_timeout`): the clock on writes to a client, on every path that writes to one.
//!
//! A client that stops reading fills its socket's buffer, and every write to it waits. Left
//! alone, the connection, its buffers, the upstream connection streaming to it and a drain's
//! patience stay held until the client goes. The clock runs only while a write waits, and
//! restarts whenever one moves: a slow reader is served, a silent one is let go. Its `Sleep` is
//! made when a write first waits, so the common write, taken at once, costs a branch.

use std::future::{poll_fn, Future};
use std::io::{self, ErrorKind};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::time::Sleep;

/// The deadline of a write that waits. One per connection (or per write, for `write_all`).
#[derive(Default)]
pub struct SendClock {
    /// Armed by a write that waits, dropped by one that moves.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl SendClock {
    /// Passes on the poll of a write or a flush, unless it has waited, with nothing moving
    /// since, longer than `limit` (read only when a wait begins, so that a reload applies to
    /// the next one): then it fails with `TimedOut`.
    pub fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        limit: impl FnOnce() -> Option<Duration>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.sleep = None;
            return polled;
        }
        if self.sleep.is_none() {
            let Some(limit) = limit() else {
                return Poll::Pending;
            };
            self.sleep = Some(Box::pin(tokio::time::sleep(limit)));
        }
        match self.sleep.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {
                self.sleep = None;
                Poll::Ready(Err(timed_out()))
            }
            _ => Poll::Pending,
        }
    }
}

/// The error of a client that took nothing for `proxy.send_timeout`.
pub fn timed_out() -> io::Error {
    io::Error::new(
        ErrorKind::TimedOut,
        "the client took nothing of its answer for proxy.send_timeout",
    )
}

/// Whether `e` is `SendClock`'s: the client stopped reading.
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
    let mut clock = SendClock::default();
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
}
