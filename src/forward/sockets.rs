//! The bound on the sockets open to upstream servers, shared by every worker, every path that
//! opens one (the relay's plain sockets, hyper's HTTP/1.1 and HTTP/2 connections, hyper-util's
//! client for `https://` servers) and every pool a reload builds: so that however many
//! requests HTTP/2 clients multiplex (each stream to an `http://` server takes a connection of
//! its own), descriptors remain for client connections, the control socket, the admin
//! listener, health checks, the state file and the logs. The bound comes from the open-file
//! limit (`crate::limits::upstream_sockets`).
//!
//! A socket holds its `Permit` for as long as it is open (`Counted` carries it), pooled or
//! not, so that one closed anywhere gives it back. At the bound a new socket waits, at most
//! `connect_timeout`, for one to close; an idle kept one is closed to make room, and one
//! coming back to a pool is closed instead of kept while another request waits. This module
//! knows nothing of HTTP; health checks and webhooks open their few sockets outside it.
//!
//! Tunnels (WebSocket and other upgrades) hold their upstream socket for as long as they
//! live, hours for a WebSocket, where a request holds one for its answer's time: left alone,
//! enough of them would take every socket under the bound, and every ordinary request would
//! wait `connect_timeout` for the outage answer. So they may hold a share of it
//! (`tunnel_share`), counted from the request that asks for one (`Sockets::tunnel`) to the
//! tunnel's end.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// A pool's list of idle kept sockets, which may be asked to close one to make room.
pub trait Idle: Send + Sync {
    /// Closes the list's oldest idle socket; false when it has none.
    fn close_oldest(&self) -> bool;
}

/// The shared count of upstream sockets open; clones count together.
#[derive(Clone)]
pub struct Sockets(Arc<Inner>);

struct Inner {
    /// One permit per socket that may still be opened. Without a bound it holds as many as a
    /// semaphore can, so that every path takes the same steps.
    semaphore: Semaphore,
    /// `None`: no bound (the open-file limit could not be read).
    bound: Mutex<Option<usize>>,
    /// Permits to forget as sockets close, rather than give back: a lowered bound with more
    /// sockets open than it allows.
    debt: AtomicUsize,
    /// Requests waiting for a permit.
    waiting: AtomicUsize,
    /// Closes owed to waiting requests that found no idle socket to close: each socket coming
    /// back to a pool claims one and is closed rather than kept. Never more than `waiting`:
    /// one close per waiter, so that a proxy at the bound keeps its other connections alive.
    owed: AtomicUsize,
    /// The pools' idle lists, asked in turn to close a socket when a request waits.
    idle: Mutex<Vec<Weak<dyn Idle>>>,
    told: Mutex<Told>,
    open: Gauge,
    limit: Gauge,
    reached: Counter,
    /// Upgrade requests under way and tunnels open, each holding a `TunnelPlace`.
    tunnels: AtomicUsize,
    /// The most of them at once (`tunnel_share` of the bound); `usize::MAX` without a bound.
    tunnel_share: AtomicUsize,
    tunnels_told: Mutex<Told>,
    tunnels_open: Gauge,
    tunnels_refused: Counter,
}

/// The metrics this count moves (`crate::metrics`).
#[derive(Clone, Debug, Default)]
pub struct SocketMetrics {
    /// Upstream sockets open.
    pub open: Gauge,
    /// The bound; 0 when there is none.
    pub limit: Gauge,
    /// Requests that got no socket within `connect_timeout`.
    pub reached: Counter,
    /// Tunnels open (`TunnelPlace::opened`).
    pub tunnels_open: Gauge,
    /// Upgrade requests refused at the tunnels' share of the bound.
    pub tunnels_refused: Counter,
}

/// Warnings at the bound: at most one every `TELL_EVERY`, with how many were not written.
#[derive(Default)]
struct Told {
    said: Option<Instant>,
    unsaid: u64,
}

const TELL_EVERY: Duration = Duration::from_secs(10);

impl Told {
    /// Whether a refusal at `now` is to be told, and then how many were not since the last
    /// line; else it is counted for the next.
    fn tell(&mut self, now: Instant) -> Option<u64> {
        match self.said {
            Some(said) if now.duration_since(said) < TELL_EVERY => {
                self.unsaid += 1;
                None
            }
            _ => {
                self.said = Some(now);
                Some(std::mem::take(&mut self.unsaid))
            }
        }
    }
}

/// Requests that may wait for a socket at once: as many as the bound, and at least this.
const MIN_WAITING: usize = 1024;

/// Why a request got no upstream socket: the proxy's own trouble, never the server's
/// (`forward::local_exhaustion` keeps it from the server's health).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "no upstream connection free within connect_timeout ({waited:?}): all {bound} the open-file \
     limit leaves room for are open"
)]
pub struct LimitReached {
    pub bound: usize,
    pub waited: Duration,
}

/// Why an upgrade request was answered without contacting a server: tunnels hold their share
/// of the bound already. The proxy's own limit, never the server's fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{share} tunnels (WebSocket or other upgrades) open or being opened, the most of the {bound} \
     upstream connections the open-file limit leaves room for that tunnels may hold"
)]
pub struct TunnelsFull {
    pub share: usize,
    pub bound: usize,
}

/// How many of `bound` upstream sockets tunnels may hold at once: three quarters, the rest
/// kept for ordinary requests. A request holds its socket for its answer's time, and a kept
/// socket serves one request after another, so a quarter carries far more requests than a
/// quarter of the tunnels; a share rather than a fixed reserve, so that it means the same at
/// the least bound (16: 12 tunnels, 4 sockets for requests) and at a large one.
pub fn tunnel_share(bound: usize) -> usize {
    bound - bound / 4
}

/// The lock is held only for a few field updates, never across an await: a poisoned one is
/// taken as it is.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sockets {
    /// At most `bound` sockets open at once; `None` for no bound.
    pub fn new(bound: Option<usize>, metrics: SocketMetrics) -> Sockets {
        // A semaphore holds no more: an unlimited open-file limit gives no bound in effect.
        let bound = bound.map(|b| b.min(Semaphore::MAX_PERMITS));
        metrics.limit.set(gauge_value(bound));
        Sockets(Arc::new(Inner {
            semaphore: Semaphore::new(bound.unwrap_or(Semaphore::MAX_PERMITS)),
            bound: Mutex::new(bound),
            debt: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            told: Mutex::new(Told::default()),
            open: metrics.open,
            limit: metrics.limit,
            reached: metrics.reached,
            tunnels: AtomicUsize::new(0),
            tunnel_share: AtomicUsize::new(bound.map_or(usize::MAX, tunnel_share)),
            tunnels_told: Mutex::new(Told::default()),
            tunnels_open: metrics.tunnels_open,
            tunnels_refused: metrics.tunnels_refused,
        }))
    }

    /// No bound, for pools built where no limit applies (tests, benches).
    pub fn unbounded() -> Sockets {
        Sockets::new(None, SocketMetrics::default())
    }

    /// The bound in force.
    pub fn bound(&self) -> Option<usize> {
        *lock(&self.0.bound)
    }

    /// Sets a new bound (a reload changed `proxy.max_connections`). Sockets already open stay:
    /// over a lowered bound, new ones wait until enough have closed. A count built without a
    /// bound keeps none, as it had no limit to compute one from.
    pub fn set_bound(&self, new: usize) {
        let new = new.min(Semaphore::MAX_PERMITS);
        let mut bound = lock(&self.0.bound);
        let Some(old) = *bound else {
            return;
        };
        if new > old {
            let more = new - old;
            // What is owed is paid first: those permits were never handed back.
            let owed = self
                .0
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    Some(d.saturating_sub(more))
                })
                .unwrap_or(0);
            self.0.semaphore.add_permits(more - owed.min(more));
        } else {
            let fewer = old - new;
            let forgotten = self.0.semaphore.forget_permits(fewer);
            self.0.debt.fetch_add(fewer - forgotten, Ordering::AcqRel);
        }
        *bound = Some(new);
        self.0.limit.set(gauge_value(Some(new)));
        // Tunnels open beyond a lowered share stay; new ones wait for enough to close.
        self.0
            .tunnel_share
            .store(tunnel_share(new), Ordering::Release);
    }

    /// A place for one more tunnel, taken before an upgrade request goes to a server and held
    /// by its tunnel until that ends; refused once tunnels hold their share of the bound
    /// (`tunnel_share`), counted, and told at most every `TELL_EVERY`. Only upgrade requests
    /// ask: an ordinary one pays nothing for it.
    pub fn tunnel(&self) -> Result<TunnelPlace, TunnelsFull> {
        let share = self.0.tunnel_share.load(Ordering::Acquire);
        let taken = self
            .0
            .tunnels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < share).then_some(n + 1)
            });
        if taken.is_ok() {
            return Ok(TunnelPlace {
                inner: self.0.clone(),
                open: false,
            });
        }
        self.0.tunnels_refused.inc();
        let bound = self.bound().unwrap_or(Semaphore::MAX_PERMITS);
        let unsaid = lock(&self.0.tunnels_told).tell(Instant::now());
        if let Some(unsaid) = unsaid {
            let more = super::More(unsaid);
            tracing::warn!(
                "{share} tunnels (WebSocket or other upgrades) hold their share of the {bound} \
                 upstream connections the open-file limit leaves room for (three quarters, the \
                 rest kept for ordinary requests): an upgrade request got the outage response \
                 without reaching a server{more}; raise the open-file limit"
            );
        }
        Err(TunnelsFull { share, bound })
    }

    /// Lets a pool's idle list be asked to close a socket for room; forgotten with the list.
    pub fn register(&self, list: Weak<dyn Idle>) {
        let mut idle = lock(&self.0.idle);
        idle.retain(|l| l.strong_count() > 0);
        idle.push(list);
    }

    /// Whether requests wait for a socket.
    pub fn wanted(&self) -> bool {
        self.0.waiting.load(Ordering::Relaxed) > 0
    }

    /// Whether a socket coming back to a pool is to be closed rather than kept, its permit
    /// going to a waiting request that found no idle one to close; claimed once. One atomic
    /// read on the path of every response that gives its connection back.
    pub fn claim_close(&self) -> bool {
        self.0.owed.load(Ordering::Relaxed) > 0
            && self
                .0
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }

    /// Gives back a close claimed (`claim_close`) that found nothing to close.
    pub fn owe_close(&self) {
        self.0.owed.fetch_add(1, Ordering::AcqRel);
    }

    /// A permit for one more socket, at once when under the bound; else after one closes, an
    /// idle kept one being closed for it, at most `wait` (`upstream.connect_timeout`) later.
    pub async fn acquire(&self, wait: Duration) -> Result<Permit, LimitReached> {
        if let Ok(permit) = self.0.semaphore.try_acquire() {
            permit.forget();
            return Ok(self.permit());
        }
        // Waiters are bounded too: each holds its request's state (hyper-util's client also
        // opens a connection beside every pooled one it hands out, which waits here), and at
        // a high rate they would pile up for `wait` each.
        let most = self.bound().unwrap_or(0).max(MIN_WAITING);
        if self.0.waiting.load(Ordering::Relaxed) >= most {
            return Err(self.refused(wait));
        }
        let _waiting = Waiting::new(&self.0);
        if !self.close_an_idle_one() {
            self.0.owed.fetch_add(1, Ordering::AcqRel);
        }
        match tokio::time::timeout(wait, self.0.semaphore.acquire()).await {
            Ok(Ok(permit)) => {
                permit.forget();
                Ok(self.permit())
            }
            // The semaphore is never closed; either way, no socket.
            Ok(Err(_)) | Err(_) => Err(self.refused(wait)),
        }
    }

    fn permit(&self) -> Permit {
        self.0.open.inc();
        Permit(self.0.clone())
    }

    /// Closes the oldest idle socket of the first list that has one: its permit comes back
    /// once it is closed (at once for a plain socket, when its task sees it dropped for
    /// hyper's), and goes to the first request waiting. False when no list had one.
    fn close_an_idle_one(&self) -> bool {
        let lists: Vec<Arc<dyn Idle>> = lock(&self.0.idle)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        lists.iter().any(|list| list.close_oldest())
    }

    fn refused(&self, waited: Duration) -> LimitReached {
        self.0.reached.inc();
        let bound = self.bound().unwrap_or(Semaphore::MAX_PERMITS);
        let unsaid = lock(&self.0.told).tell(Instant::now());
        if let Some(unsaid) = unsaid {
            let more = super::More(unsaid);
            tracing::warn!(
                "{bound} upstream connections open, the most the open-file limit leaves room \
                 for beside proxy.max_connections clients: a request got none within \
                 connect_timeout ({waited:?}) and the outage response{more}; raise the \
                 open-file limit, or see which clients hold many requests at once (HTTP/2 \
                 streams)"
            );
        }
        LimitReached { bound, waited }
    }
}

fn gauge_value(bound: Option<usize>) -> i64 {
    bound.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX))
}

/// Counts a request among those waiting for as long as it waits.
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn new(inner: &'a Inner) -> Waiting<'a> {
        inner.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(inner)
    }
}

impl Drop for Waiting<'_> {
    /// A request done waiting, its close claimed or not, leaves no more owed than waiters.
    fn drop(&mut self) {
        let left = self.0.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        let _ = self
            .0
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n > left).then_some(left)
            });
    }
}

/// An upgrade request's place among the tunnels (`Sockets::tunnel`), given back when dropped:
/// at once when its server did not switch, at the tunnel's end when it did.
pub struct TunnelPlace {
    inner: Arc<Inner>,
    open: bool,
}

impl TunnelPlace {
    /// Its tunnel is open: counted in `intermission_tunnels_open` until dropped.
    pub fn opened(&mut self) {
        if !self.open {
            self.open = true;
            self.inner.tunnels_open.inc();
        }
    }
}

impl Drop for TunnelPlace {
    fn drop(&mut self) {
        if self.open {
            self.inner.tunnels_open.dec();
        }
        self.inner.tunnels.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open upstream socket's place under the bound, given back when dropped.
pub struct Permit(Arc<Inner>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.dec();
        let owed = self
            .0
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if !owed {
            self.0.semaphore.add_permits(1);
        }
    }
}

/// A socket (or a TLS stream over one) with its permit: however it is closed, in a pool, by
/// hyper's connection task, after a tunnel, the permit goes with it.
pub struct Counted<T> {
    io: T,
    _permit: Permit,
    opened: Instant,
}

/// When a connection was opened (`Connected`'s extra), for a client that pools connections
/// it did not open itself (hyper-util's); the proxy's own pools know it otherwise.
#[derive(Clone, Copy)]
pub struct Opened(pub Instant);

impl<T> Counted<T> {
    pub fn new(io: T, permit: Permit) -> Counted<T> {
        Counted {
            io,
            _permit: permit,
            opened: Instant::now(),
        }
    }

    /// The same socket as another type (`TokioIo`'s `TcpStream` for the relay), still counted.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Counted<U> {
        Counted {
            io: f(self.io),
            _permit: self._permit,
            opened: self.opened,
        }
    }
}

impl<T> Deref for Counted<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.io
    }
}

impl<T> DerefMut for Counted<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.io
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl<T: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for Counted<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected().extra(Opened(self.opened))
    }
}

/// Whether `e`, or one of its causes, is the bound reached.
pub fn reached(e: &(dyn std::error::Error + 'static)) -> bool {
    reached_in(e).is_some()
}

/// The `LimitReached` among `e` and its causes, if any.
pub fn reached_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a LimitReached> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        // An `io::Error`'s `source()` skips the error it wraps.
        let wrapped = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<LimitReached>());
        if let Some(limit) = wrapped.or_else(|| c.downcast_ref::<LimitReached>()) {
            return Some(limit);
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(bound: usize) -> (Sockets, SocketMetrics) {
        let metrics = SocketMetrics::default();
        (Sockets::new(Some(bound), metrics.clone()), metrics)
    }

    const NOW: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn a_dropped_socket_gives_its_permit_back() {
        let (sockets, metrics) = counted(2);
        let a = sockets.acquire(NOW).await.unwrap();
        let b = sockets.acquire(NOW).await.unwrap();
        assert_eq!(metrics.open.get(), 2);
        let e = sockets.acquire(NOW).await.err().unwrap();
        assert_eq!(e.bound, 2);
        assert_eq!(metrics.reached.get(), 1);
        drop(a);
        let c = sockets.acquire(NOW).await.unwrap();
        drop((b, c));
        assert_eq!(metrics.open.get(), 0);
        assert_eq!(sockets.0.semaphore.available_permits(), 2);
    }

    /// A waiting request gets the next permit given back. With no idle socket to close, it
    /// is owed one close, not every one: the first socket coming back is closed for it, the
    /// next kept, and nothing stays owed once it is done waiting, served or not.
    #[tokio::test]
    async fn a_waiting_request_gets_the_next_permit_and_one_close() {
        let (sockets, _) = counted(1);
        let held = sockets.acquire(NOW).await.unwrap();
        let waiter = {
            let sockets = sockets.clone();
            tokio::spawn(async move { sockets.acquire(Duration::from_secs(10)).await })
        };
        let told = tokio::time::timeout(Duration::from_secs(5), async {
            while !sockets.wanted() {
                tokio::task::yield_now().await;
            }
        });
        assert!(told.await.is_ok(), "the waiting request was not counted");
        assert!(
            sockets.claim_close(),
            "the first socket back is closed for it"
        );
        assert!(!sockets.claim_close(), "the next is kept");
        drop(held);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(Ok(_)))));
        assert!(!sockets.wanted());
        assert!(!sockets.claim_close());

        // One that gives up unserved, its close unclaimed, leaves none owed.
        let (sockets, _) = counted(1);
        let _held = sockets.acquire(NOW).await.unwrap();
        assert!(sockets.acquire(Duration::from_millis(20)).await.is_err());
        assert!(!sockets.claim_close());
    }

    /// The first refusal is told at once, the rest of a burst summed in the next line at
    /// most every `TELL_EVERY`.
    #[tokio::test(start_paused = true)]
    async fn refusals_are_told_at_most_every_ten_seconds_with_a_count() {
        let mut told = Told::default();
        assert_eq!(told.tell(Instant::now()), Some(0));
        for _ in 0..5 {
            assert_eq!(told.tell(Instant::now()), None);
        }
        tokio::time::advance(TELL_EVERY - Duration::from_millis(1)).await;
        assert_eq!(told.tell(Instant::now()), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(told.tell(Instant::now()), Some(6));
        assert_eq!(told.tell(Instant::now()), None);
    }

    /// Beyond as many waiters as the bound (at least `MIN_WAITING`), a request is refused at
    /// once rather than kept waiting with the others.
    #[tokio::test(start_paused = true)]
    async fn waiters_are_bounded_too() {
        let (sockets, _) = counted(1);
        let _held = sockets.acquire(NOW).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..MIN_WAITING {
            let sockets = sockets.clone();
            waiters.push(tokio::spawn(async move {
                sockets.acquire(Duration::from_secs(3600)).await.is_ok()
            }));
        }
        while sockets.0.waiting.load(Ordering::Relaxed) < MIN_WAITING {
            tokio::task::yield_now().await;
        }
        let next = tokio::time::timeout(
            Duration::from_millis(1),
            sockets.acquire(Duration::from_secs(3600)),
        )
        .await;
        assert!(matches!(next, Ok(Err(_))), "not refused at once");
        for w in waiters {
            w.abort();
        }
    }

    struct List(Mutex<Vec<Permit>>);

    impl Idle for List {
        fn close_oldest(&self) -> bool {
            let mut list = lock(&self.0);
            if list.is_empty() {
                return false;
            }
            list.remove(0);
            true
        }
    }

    #[tokio::test]
    async fn at_the_bound_an_idle_kept_socket_is_closed_for_room() {
        let (sockets, metrics) = counted(2);
        let list = Arc::new(List(Mutex::new(Vec::new())));
        let weak: Weak<dyn Idle> = Arc::downgrade(&(list.clone() as Arc<dyn Idle>));
        sockets.register(weak);
        let busy = sockets.acquire(NOW).await.unwrap();
        let idle = sockets.acquire(NOW).await.unwrap();
        lock(&list.0).push(idle);
        let new = sockets.acquire(NOW).await;
        assert!(
            new.is_ok(),
            "the idle socket was not closed for the new one"
        );
        assert!(lock(&list.0).is_empty());
        assert_eq!(metrics.open.get(), 2);
        assert_eq!(metrics.reached.get(), 0);
        drop((busy, new));
    }

    #[tokio::test]
    async fn a_lowered_bound_waits_for_enough_sockets_to_close() {
        let (sockets, metrics) = counted(3);
        let a = sockets.acquire(NOW).await.unwrap();
        let b = sockets.acquire(NOW).await.unwrap();
        sockets.set_bound(1);
        assert!(sockets.acquire(NOW).await.is_err());
        drop(a);
        assert!(sockets.acquire(NOW).await.is_err(), "still one open of one");
        drop(b);
        let c = sockets.acquire(NOW).await.unwrap();
        assert!(sockets.acquire(NOW).await.is_err());
        // Raised again: exactly the new bound.
        sockets.set_bound(4);
        let more: Vec<Permit> = [
            sockets.acquire(NOW).await.unwrap(),
            sockets.acquire(NOW).await.unwrap(),
            sockets.acquire(NOW).await.unwrap(),
        ]
        .into();
        assert!(sockets.acquire(NOW).await.is_err());
        assert_eq!(metrics.limit.get(), 4);
        drop((c, more));
        assert_eq!(sockets.0.semaphore.available_permits(), 4);
    }

    #[tokio::test]
    async fn a_lowered_bound_owes_what_is_open_beyond_it() {
        let (sockets, _) = counted(3);
        let open: Vec<Permit> = [
            sockets.acquire(NOW).await.unwrap(),
            sockets.acquire(NOW).await.unwrap(),
            sockets.acquire(NOW).await.unwrap(),
        ]
        .into();
        sockets.set_bound(1);
        sockets.set_bound(2);
        drop(open);
        assert_eq!(sockets.0.semaphore.available_permits(), 2);
    }

    /// Tunnels hold three quarters of the bound at most, counted from their request to their
    /// end; the gauge counts those whose tunnel opened; a lowered bound lowers the share.
    #[test]
    fn tunnels_hold_their_share_of_the_bound_and_no_more() {
        assert_eq!(tunnel_share(16), 12);
        assert_eq!(tunnel_share(96), 72);
        assert_eq!(tunnel_share(1), 1);
        let (sockets, metrics) = counted(16);
        let mut places: Vec<TunnelPlace> = (0..12).map(|_| sockets.tunnel().unwrap()).collect();
        let full = sockets.tunnel().err().unwrap();
        assert_eq!((full.share, full.bound), (12, 16));
        assert_eq!(metrics.tunnels_refused.get(), 1);
        assert_eq!(metrics.tunnels_open.get(), 0, "none opened yet");
        for place in &mut places[..5] {
            place.opened();
        }
        places[0].opened();
        assert_eq!(metrics.tunnels_open.get(), 5);
        // An upgrade its server declined gives its place back, and so does a tunnel's end.
        places.truncate(10);
        assert_eq!(metrics.tunnels_open.get(), 5);
        places.remove(0);
        assert_eq!(metrics.tunnels_open.get(), 4);
        places.push(sockets.tunnel().unwrap());
        places.push(sockets.tunnel().unwrap());
        places.push(sockets.tunnel().unwrap());
        assert!(sockets.tunnel().is_err());
        sockets.set_bound(8);
        places.truncate(6);
        assert!(
            sockets.tunnel().is_err(),
            "six open, six the share of eight"
        );
        places.truncate(5);
        assert!(sockets.tunnel().is_ok());
        drop(places);
        assert_eq!(metrics.tunnels_open.get(), 0);
        // Without a bound, no share.
        let sockets = Sockets::unbounded();
        let many: Vec<TunnelPlace> = (0..1000).map(|_| sockets.tunnel().unwrap()).collect();
        assert_eq!(many.len(), 1000);
    }

    #[tokio::test]
    async fn without_a_bound_nothing_waits() {
        let sockets = Sockets::unbounded();
        let open: Vec<Permit> = acquire_many(&sockets, 1000).await;
        assert_eq!(open.len(), 1000);
        sockets.set_bound(1);
        assert!(sockets.acquire(NOW).await.is_ok());
    }

    async fn acquire_many(sockets: &Sockets, n: usize) -> Vec<Permit> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(sockets.acquire(NOW).await.unwrap());
        }
        v
    }

    #[test]
    fn the_error_is_found_among_causes() {
        let limit = LimitReached {
            bound: 5,
            waited: Duration::from_secs(1),
        };
        let wrapped = std::io::Error::other(limit);
        assert!(reached(&wrapped));
        let limit = LimitReached {
            bound: 5,
            waited: Duration::from_secs(1),
        };
        let failed = crate::forward::UpstreamError::Connect {
            server: "http://127.0.0.1:1".into(),
            source: crate::forward::pool::SendError::Connect(Box::new(limit)),
        };
        assert!(reached(&failed));
        assert!(crate::forward::local_exhaustion(&failed));
        assert!(!reached(&std::io::Error::other("refused")));
    }
}
