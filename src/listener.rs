//! Accept loops: every plaintext listener serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on
//! the same port, every TLS one HTTP/1.1 and HTTP/2 by ALPN, with upgrades, header limits and a
//! graceful drain. HTTP/1.1 goes to `relay` first, then to hyper from the first request it
//! leaves.
//!
//! hyper does the protocol work: a head larger than `max_header_bytes` gets 431, a malformed one
//! 400, and `header_read_timeout` closes a connection whose headers come too slowly. The
//! protocol is chosen here rather than by hyper-util's `auto` connection: by the client's first
//! bytes (plaintext: read, then served again to hyper) or ALPN (TLS). A connection then
//! carries the state of its own protocol only, which keeps an idle HTTP/1.1 connection small
//! (the `auto` future, sized for HTTP/2, was 6 KB a connection) and spares each request a
//! layer of polling.

use crate::config::ProxyConfig;
use crate::fast::Fast;
use crate::forward::More;
use crate::gateway::{self, Conn};
use crate::metrics::{ClientMetrics, OpenCount, TlsFailure};
use crate::park;
use crate::pending::{self, Pending, PerClient};
use crate::relay;
use crate::shutdown::{until_drained, until_idle, Drain, Shutdown};
use crate::stall::{Answer, Answers, Timed, Timing};
use crate::state::StateHandle;
use crate::watched::{Watch, Watched};
use crate::workers::Workers;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rustls::HandshakeKind;
use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The client connections open, counted across every listener against
/// `proxy.max_connections`. Taken without waiting (a connection over the limit is closed at
/// once), so a counter does what a semaphore's permit would, in one pointer instead of two
/// words: every parked connection keeps its `Slot`, and its state has no room to spare (see
/// `park::parked`). The maximum is the snapshot's at each accept, so a reload applies to the
/// next connection; lowering it closes none of those already open at once (the next ones
/// at the limit close idle ones to come back to it, `make_room`).
///
/// At the limit, the connection idle longest makes room for a new one (`make_room`), as
/// nginx reuses its idle connections: otherwise clients that open connections and leave
/// them idle would lock every new one out until `header_read_timeout`.
///
/// A connection that becomes a tunnel (an upgrade, `forward::upgrade`) outlives the hyper
/// connection that held its slot: the tunnel keeps one of its own (`Upgrading`), and is
/// counted, as nginx counts every connection against `worker_connections`.
#[derive(Default)]
pub struct Limit {
    /// `intermission_client_connections`, read at a scrape.
    open: OpenCount,
    /// Connections picked to make room that have not closed yet (`Closable`): counted in
    /// `open` until they close, but already given away. One stops counting here when it is
    /// gone, not when it sees it was picked: an HTTP/2 connection told to go waits a round
    /// trip for its client's answer to the GOAWAY's PING, and every new client at the limit
    /// was refused meanwhile, idle connections or not.
    closing: AtomicUsize,
    /// Moved on by every pick, so that an idle connection tells without the lock that it was
    /// not picked since it last looked (`Closable::poll_picked`).
    picks: AtomicU64,
    /// `intermission_parked_connections`.
    pub(crate) parked: Gauge,
    /// `intermission_client_connection_limit_reached_total`, by outcome.
    refused: Counter,
    made_room: Counter,
    /// `intermission_client_connections_closed_for_room_total`: every connection picked in
    /// `make_room`, those beyond a new client's own included.
    closed_for_room: Counter,
    pending_per_client: Counter,
    /// `intermission_accept_failures_total{listener="proxy"}`, which the accept loops move.
    pub(crate) accept_failed: Counter,
    /// The connections each client has not yet past their first request
    /// (`proxy.max_pending_per_client`).
    per_client: Arc<PerClient>,
    /// The connections idle now that may be closed for room.
    idle: Mutex<Idlers>,
    /// The listeners' drain, which a tunnel joins as the connection it was did.
    drain: Arc<Drain>,
    /// Set at the drain's end (`close_idle`): every idle connection is picked to close, one
    /// idling from now at once.
    ending: AtomicBool,
    /// Connections the drain's end would not see by a guard or among the idle ones: a
    /// plaintext one from its accept until it holds a guard or is closed (`Fresh`: before its
    /// worker has run it, and between its first bytes and its guard, it is in neither); one
    /// to park from its spawn until that task's first poll (`park::Idle::arriving`). Unseen,
    /// the process could exit over such a connection, one whose request had come among them,
    /// and the kernel reset it.
    starting: AtomicUsize,
}

/// Idle connections by the order they became idle (`ticket`), each with the waker that tells
/// it it was picked. A lock rather than anything cleverer: a connection comes here when it
/// turns idle and when it stops being so, and the lock is held for a map operation only.
#[derive(Default)]
struct Idlers {
    next: u64,
    waiting: BTreeMap<u64, Waker>,
    /// New plaintext connections that have sent nothing and wait their grace out (`Young`),
    /// by the same tickets: never picked to make room, but woken by the drain's end
    /// (`close_idle`), which waits for them (`Limit::starting`) and would otherwise wait
    /// until each one's grace ran out.
    young: BTreeMap<u64, Waker>,
}

/// One open client connection, in its `Limit` until dropped.
pub struct Slot(Arc<Limit>);

impl Limit {
    pub fn new(clients: ClientMetrics, parked: Gauge, drain: Arc<Drain>) -> Limit {
        Limit {
            open: clients.open,
            refused: clients.refused,
            made_room: clients.made_room,
            closed_for_room: clients.closed_for_room,
            pending_per_client: clients.pending_per_client,
            accept_failed: clients.accept_failed,
            parked,
            drain,
            ..Limit::default()
        }
    }

    /// A slot, unless `max` connections are open.
    pub fn take(self: &Arc<Limit>, max: usize) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// A slot beyond `max`, given back by an idle connection (between requests, or before
    /// its first): the one idle longest, woken to close. The count runs over `max` for the
    /// moment those picked take to go (the descriptors' headroom covers it). Over it already
    /// (a lowered limit, or picked connections that a request woke first and so stay: under
    /// a burst of new connections on a busy machine, hundreds), the next idle ones are picked
    /// too, up to `PAYBACK` at a time, so that the count comes back to `max`: refusing while
    /// over it, as this did, refused every new client for as long as the busy connections
    /// kept it there, with every open one idle (helper-139's soak: 440 open at a limit of
    /// 256, new clients refused 62 % of an hour).
    pub fn make_room(self: &Arc<Limit>, max: usize) -> Option<Slot> {
        let mut idlers = self.idlers();
        let (_, picked) = idlers.waiting.pop_first()?;
        let closing = self.closing.load(Ordering::Relaxed);
        let over = (self.open.load(Ordering::Relaxed).saturating_sub(closing))
            .saturating_sub(max)
            .min(PAYBACK);
        let mut more: [Option<Waker>; PAYBACK] = Default::default();
        let mut paid = 0;
        while paid < over {
            let Some((_, waker)) = idlers.waiting.pop_first() else {
                break;
            };
            more[paid] = Some(waker);
            paid += 1;
        }
        self.closing.fetch_add(1 + paid, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        self.picks.fetch_add(1, Ordering::Relaxed);
        drop(idlers);
        // Widened, never truncated: `paid` is at most `PAYBACK`.
        self.closed_for_room.inc_by(1 + paid as u64);
        picked.wake();
        for waker in more.into_iter().flatten() {
            waker.wake();
        }
        Some(Slot(self.clone()))
    }

    /// Whether a drain has begun. An HTTP/1.1 answer hyper writes then says
    /// `Connection: close` (`park::Tracked`, `Serving::http1`): a connection hyper began to
    /// serve after the drain began (woken from a park, or left by the relay) is told to
    /// close only once its first answer is out, and one ready at once (held, reserved) went
    /// without the word, the connection closed under a client that could already be sending
    /// its next request on it.
    pub fn draining(&self) -> bool {
        self.drain.started()
    }

    fn idlers(&self) -> MutexGuard<'_, Idlers> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// At the drain's end: picks every idle connection to close, and any that idles from
    /// now. A parked one closes with a lingering close (`park::parked`), where the process's
    /// exit closed it under a client that could be sending a request on it, and the kernel
    /// answered that request with a reset.
    pub fn close_idle(&self) {
        let mut idlers = self.idlers();
        self.ending.store(true, Ordering::Relaxed);
        let picked = std::mem::take(&mut idlers.waiting);
        let young = std::mem::take(&mut idlers.young);
        self.closing.fetch_add(picked.len(), Ordering::Relaxed);
        self.picks.fetch_add(1, Ordering::Relaxed);
        drop(idlers);
        for waker in picked.into_values().chain(young.into_values()) {
            waker.wake();
        }
    }

    /// Whether the drain's end has closed the idle connections (`close_idle`).
    pub fn ending(&self) -> bool {
        self.ending.load(Ordering::Relaxed)
    }

    /// Connections picked to close that have not closed yet. Acquire, paired with the
    /// decrement's Release (`Closable::busy`): a connection takes its drain guard before it
    /// stops counting, and the drain's end, once it reads 0 here, must see every such guard.
    pub fn closing(&self) -> usize {
        self.closing.load(Ordering::Acquire)
    }

    /// A connection the drain cannot see otherwise from now (`starting`): counted before it
    /// lets go of what it was seen by (a guard, its place among the idle ones or the picked).
    pub(crate) fn arriving(&self) {
        self.starting.fetch_add(1, Ordering::Relaxed);
    }

    /// Seen otherwise from now: what sees it is taken before this. Release, paired with
    /// `unsettled`'s Acquire: the drain's end that reads the count without it sees the guard.
    pub(crate) fn arrived(&self) {
        self.starting.fetch_sub(1, Ordering::Release);
    }

    /// Whether a connection is still picked and not closed (`closing`), or not yet seen
    /// (`starting`): the drain's end waits until neither, then for the guards. Read closing,
    /// starting, closing: a connection goes from one to the other counted in the new one
    /// first, whichever way it goes, and so is seen in one of the three reads.
    pub fn unsettled(&self) -> bool {
        self.closing() > 0 || self.starting.load(Ordering::Acquire) > 0 || self.closing() > 0
    }
}

/// A new plaintext connection's place among the idle ones (`Closable`), counted in
/// `Limit::starting` from its accept, before its worker has run it, until it is dropped:
/// once it holds a drain guard, or is closed. A connection taken from the backlog as the
/// stop came, still waiting for its worker, was seen by nothing, and the process could exit
/// over its request (h201 found it by reading, h203 by test); so was one between its first
/// bytes and its guard. Counted while it is among the idle ones too, where the drain's end
/// picks it: it then wakes, and closes. One atomic add at the accept, on the line
/// `Limit::take` has just written, and one subtract.
pub struct Fresh {
    closable: Closable,
}

impl Fresh {
    fn new(limit: Arc<Limit>) -> Fresh {
        limit.arriving();
        Fresh {
            closable: Closable::new(limit),
        }
    }
}

/// A new plaintext connection's place among those the drain's end wakes (`Idlers::young`),
/// from its first wait for a byte until it has one, or closes (and again while it waits with
/// a prefix of HTTP/2's preface, until more comes): in its grace (`waited`) it is
/// not among the idle ones, and nothing else would wake it at that end, which it holds (it is
/// counted in `Limit::starting`). A lock taken to come in and to go, once per connection
/// whose first bytes were not there at its first read, none per request.
struct Young<'a> {
    limit: &'a Limit,
    ticket: u64,
}

impl<'a> Young<'a> {
    /// Registers `cx`'s waker, unless the drain's end has come (`None`): `waited` sees it.
    fn new(limit: &'a Limit, cx: &Context<'_>) -> Option<Young<'a>> {
        let mut idlers = limit.idlers();
        if limit.ending.load(Ordering::Relaxed) {
            return None;
        }
        idlers.next += 1;
        let ticket = idlers.next;
        idlers.young.insert(ticket, cx.waker().clone());
        Some(Young { limit, ticket })
    }
}

impl Drop for Young<'_> {
    fn drop(&mut self) {
        self.limit.idlers().young.remove(&self.ticket);
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        // Before `closable`'s own drop gives back a pick: counted in one until it is gone.
        self.closable.limit.arrived();
    }
}

impl Slot {
    pub fn limit(&self) -> &Arc<Limit> {
        &self.0
    }
}

/// Put in the extensions of a request that may upgrade: the limit its connection is counted
/// in, for the tunnel it may become (`forward::upgrade`). hyper's connection, and the slot
/// and drain guard its task holds, end once hyper hands the connection to the tunnel.
/// `Clone` as extensions must be: a clone holds no slot until `keep`.
#[derive(Clone)]
pub struct Upgrading(Arc<Limit>);

impl Upgrading {
    /// Marks `req` when it may upgrade. hyper gives such a request (and a `CONNECT`, which
    /// is refused), and no other, an `OnUpgrade` extension; the others have no extension map
    /// at all, so for them this is one pointer's check, and no clone.
    #[inline]
    pub fn mark<B>(req: &mut Request<B>, limit: &Arc<Limit>) {
        if req
            .extensions()
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some()
        {
            req.extensions_mut().insert(Upgrading(limit.clone()));
        }
    }

    /// Whether a drain has begun: a request that would become a tunnel is then refused
    /// (`gateway`), since a tunnel would be closed at once (a WebSocket) or cut at
    /// `shutdown_timeout`.
    pub fn draining(&self) -> bool {
        self.0.draining()
    }

    /// For a request that may upgrade and is answered without (refused, held): closes its
    /// connection as every other is closed, when hyper hands it over at its end. hyper keeps
    /// such a request's upgrade pending after any answer, and when the connection ends (an
    /// answer said `Connection: close`, the client closed, a drain or `header_read_timeout`
    /// ended it) gives it to the request's `OnUpgrade`; dropped with the request, that dropped
    /// the socket: over TLS with no `close_notify` (the client read a truncated connection),
    /// and with what the client had sent behind unread (a reset, which can throw away the
    /// answer). The task lives until then, one per connection at most: a later request's
    /// upgrade replaces this one, which ends it, as the connection's end without a handover
    /// (picked to make room) does.
    pub fn close_when_declined<B>(req: &mut Request<B>) {
        let Some(upgrading) = req.extensions_mut().remove::<Upgrading>() else {
            return;
        };
        upgrading.close_declined(hyper::upgrade::on(req));
    }

    /// `close_when_declined`'s close, for a request whose `OnUpgrade` was taken already: one
    /// forwarded whose server declined the upgrade (answered anything but `101`) or failed,
    /// whose handover was dropped with the forward's state, over TLS without `close_notify`.
    pub fn close_declined(self, handed: hyper::upgrade::OnUpgrade) {
        // Taken now, not at the handover: the connection's task lets its own guard go as it
        // ends, and a drain that saw no guard left then ended the process before this one
        // took it, over the close it waits to make (h202).
        let Upgrading(limit) = self;
        let guard = limit.drain.guard();
        tokio::spawn(async move {
            if let Ok(upgraded) = handed.await {
                // Counted as the connection was.
                limit.open.fetch_add(1, Ordering::Relaxed);
                let _kept = Tunnelled {
                    _slot: Slot(limit),
                    guard,
                };
                crate::shutdown::linger_io(TokioIo::new(upgraded)).await;
            }
        });
    }

    /// What keeps the connection counted while it is a tunnel: a slot, taken whatever the
    /// maximum as this is no new connection, and a drain guard, so that a drain waits for
    /// the tunnel up to `shutdown_timeout` as for any connection (nginx keeps upgraded
    /// connections until `worker_shutdown_timeout`). Taken when the upstream switched, before
    /// hyper lets go of the connection's own: never uncounted in between, it counts twice for
    /// that moment (a new client at the limit then may be refused, or make room).
    pub fn keep(self) -> Tunnelled {
        let Upgrading(limit) = self;
        limit.open.fetch_add(1, Ordering::Relaxed);
        let guard = limit.drain.guard();
        Tunnelled {
            _slot: Slot(limit),
            guard,
        }
    }
}

/// A tunnel's place among the open connections and in the drain, until dropped. It is never
/// among the idle ones: a tunnel is not closed to make room.
pub struct Tunnelled {
    _slot: Slot,
    guard: Shutdown,
}

impl Tunnelled {
    /// Resolves once a drain has begun (at once if it has): a WebSocket is then closed
    /// (`forward::websocket`).
    pub async fn draining(&mut self) {
        self.guard.fired().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many idle connections one new client's `Limit::make_room` closes beyond its own, to
/// bring a count over the limit back to it: each newcomer at the limit pays some of the excess
/// back, and the work under the lock stays small.
const PAYBACK: usize = 8;

/// The `ticket` of a connection that is not to be picked (`Closable::never`).
const NOT_IDLE: u64 = u64::MAX;
/// The `ticket` of a connection that was picked and has seen it: closing, and counted in
/// `Limit::closing` until it is dropped (or a request came first, `Closable::busy`).
const PICKED: u64 = u64::MAX - 1;

/// A connection's place among the idle ones `Limit::make_room` may pick: there from the
/// first poll that says it is idle until it says otherwise, is picked, or is dropped.
pub struct Closable {
    limit: Arc<Limit>,
    /// Its key among the idle ones; 0 while it is not there, `NOT_IDLE` while it must not be.
    ticket: AtomicU64,
    /// `Limit::picks` when it last looked.
    seen: AtomicU64,
}

impl Closable {
    pub fn new(limit: Arc<Limit>) -> Closable {
        Closable {
            limit,
            ticket: AtomicU64::new(0),
            seen: AtomicU64::new(0),
        }
    }

    /// Whether this idle connection was picked to close; its first poll puts it among the
    /// idle ones. No lock while no connection was picked since it last looked, so that a
    /// parked connection answering held requests takes none per request. The waker is the
    /// one of its first poll: each connection is polled by its own task, whose waker stays.
    #[inline]
    pub fn poll_picked(&self, cx: &Context<'_>) -> bool {
        let ticket = self.ticket.load(Ordering::Relaxed);
        if ticket == NOT_IDLE {
            return false;
        }
        if ticket == PICKED {
            return true;
        }
        let picks = self.limit.picks.load(Ordering::Relaxed);
        if ticket != 0 && picks == self.seen.load(Ordering::Relaxed) {
            return false;
        }
        self.poll_picked_locked(ticket, cx)
    }

    /// `poll_picked` under the lock: apart, so that the common case is a few instructions
    /// inline rather than a call that saves registers for this (callgrind: 27 instructions
    /// per call, twice per held request, before it was split).
    #[cold]
    #[inline(never)]
    fn poll_picked_locked(&self, ticket: u64, cx: &Context<'_>) -> bool {
        let mut idlers = self.limit.idlers();
        // Read again under the lock, which every pick moves it under.
        self.seen
            .store(self.limit.picks.load(Ordering::Relaxed), Ordering::Relaxed);
        if ticket == 0 && self.limit.ending.load(Ordering::Relaxed) {
            self.limit.closing.fetch_add(1, Ordering::Relaxed);
            self.ticket.store(PICKED, Ordering::Relaxed);
            return true;
        }
        if ticket == 0 {
            idlers.next += 1;
            let new = idlers.next;
            self.ticket.store(new, Ordering::Relaxed);
            idlers.waiting.insert(new, cx.waker().clone());
            return false;
        }
        if idlers.waiting.contains_key(&ticket) {
            return false;
        }
        drop(idlers);
        self.ticket.store(PICKED, Ordering::Relaxed);
        true
    }

    /// Not idle now (a request came): back of the line when it idles again. An atomic swap
    /// when it was not among the idle ones, as it is not on a busy connection. Picked in the
    /// meantime, it stays, over the limit, until the next connections to make room pay the
    /// excess back (`Limit::make_room`).
    pub fn busy(&self) {
        let ticket = self.ticket.swap(0, Ordering::Relaxed);
        if ticket == 0 || ticket == NOT_IDLE {
            return;
        }
        if ticket == PICKED || self.limit.idlers().waiting.remove(&ticket).is_none() {
            self.limit.closing.fetch_sub(1, Ordering::Release);
        }
    }

    /// Not to be picked until `busy` (a parked connection with a head begun, until it has
    /// lasted `STALLED`).
    pub fn never(&self) {
        self.busy();
        self.ticket.store(NOT_IDLE, Ordering::Relaxed);
    }

    /// Whether it was picked to close, and has seen it, and has not been `busy` since.
    pub fn is_picked(&self) -> bool {
        self.ticket.load(Ordering::Relaxed) == PICKED
    }

    /// Whether it is not to be picked (`never`) and has not been `busy` since.
    pub fn is_never(&self) -> bool {
        self.ticket.load(Ordering::Relaxed) == NOT_IDLE
    }

    pub fn limit(&self) -> &Arc<Limit> {
        &self.limit
    }
}

impl Drop for Closable {
    fn drop(&mut self) {
        self.busy();
    }
}

/// Concurrent streams on one HTTP/2 connection, as nginx's `http2_max_concurrent_streams`.
const MAX_STREAMS: u32 = 128;
/// What hyper's HTTP/2 server keeps of each answer beyond what the socket has taken.
const SEND_BUF: usize = 64 * 1024;
/// What one request's body may bring ahead of its server's reading (hyper's default).
const STREAM_WINDOW: u32 = 1024 * 1024;
/// What all of a connection's request bodies may bring ahead together: twice a stream's, so
/// that one upload its server does not read (yet) leaves room for the others. At hyper's
/// default, the same as a stream's, such an upload left every other request body on the
/// connection (a browser's form posts and API calls beside it) unsent until it moved.
const CONNECTION_WINDOW: u32 = 2 * STREAM_WINDOW;

/// The connection settings for the proxy's listeners, one per protocol.
pub struct ConnBuilder {
    pub(crate) http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// `header_read_timeout`, which also bounds a parked connection's wait for its next
    /// request: kept here, shared, rather than in every parked connection.
    pub(crate) keep_alive: Duration,
    /// `max_header_bytes`, to which a head waited for without hyper is read
    /// (`park::head_wait`), as hyper would read it.
    pub(crate) max_header_bytes: usize,
}

/// The connection settings for the proxy's listeners.
pub fn conn_builder(proxy: &ProxyConfig) -> ConnBuilder {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(proxy.header_read_timeout)
        // The exact limit of a request head (431 beyond it); the buffer limit alone lets a
        // larger head through when one read happens to bring it whole.
        .max_header_size(proxy.max_header_bytes)
        .max_buf_size(proxy.max_header_bytes)
        .keep_alive(true);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        // Pings find dead peers that would otherwise hold a connection for ever.
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(u32::try_from(proxy.max_header_bytes).unwrap_or(u32::MAX))
        // What a client that stops reading can hold is counted per stream (README, "a client
        // that stops reading"): nginx's 128 streams, and hyper's send buffer of each cut from
        // 400 KiB, so that one connection of such a client holds megabytes, not hundreds.
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buf_size(SEND_BUF)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    ConnBuilder {
        http1: h1,
        http2: h2,
        keep_alive: proxy.header_read_timeout,
        max_header_bytes: proxy.max_header_bytes,
    }
}

/// What a client speaks on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells the protocol from the first bytes a client sent: HTTP/2 prior knowledge starts with
/// the preface, and no HTTP/1 method starts with `PRI` (HTTP/1.1 reserves it for this).
/// `None` while the bytes so far could be either (only a prefix of the preface has come).
fn sniff(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Reads the client's first bytes until they tell its protocol; `None` when it closes first,
/// or when, having sent nothing for `STALLED`, it is picked to make room for a newer
/// connection (as nginx reuses a connection that has not sent its first request), or at the
/// drain's end, having sent nothing or only a prefix of HTTP/2's preface. The bytes
/// go back to hyper through `Rewind`. Reading, not peeking: a client that sent part of the preface and
/// stalls is then waited for by readiness, at no cost, where peeking would find the same
/// bytes again and again.
/// `began` is set once a byte has come. `fresh` counts the connection for the drain's end
/// all along, among the idle ones too (picked there at that end, it wakes and closes).
async fn first_bytes(
    stream: &mut TcpStream,
    fresh: &Fresh,
    began: &mut bool,
) -> Option<(Protocol, Bytes)> {
    let mut buf = [0u8; 24];
    let mut len = 0;
    let mut grace = std::pin::pin!(None::<tokio::time::Sleep>);
    let limit = fresh.closable.limit();
    // Let go (`Young`'s drop) with the first bytes, as the connection stops being fresh.
    let mut young = None;
    loop {
        // Never full here: 24 bytes always decide.
        let room = &mut buf[len..];
        let n = poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut *room);
            match Pin::new(&mut *stream).poll_read(cx, &mut read) {
                Poll::Ready(done) => Poll::Ready(done.ok().map(|()| read.filled().len())),
                Poll::Pending
                    if len == 0
                        && {
                            if grace.is_none() {
                                young = Young::new(limit, cx);
                            }
                            waited(grace.as_mut(), limit, cx)
                        }
                        && fresh.closable.poll_picked(cx) =>
                {
                    Poll::Ready(unannounced(stream, room, limit))
                }
                // A prefix of HTTP/2's preface (`PRI * HT`, or `P`) and nothing more: at the
                // drain's end it is closed as one that sent nothing, where it held that end
                // until `header_read_timeout` (to `shutdown_timeout`). Its bytes make no
                // request yet. Not among the idle ones for room.
                Poll::Pending
                    if len > 0
                        && {
                            if young.is_none() {
                                young = Young::new(limit, cx);
                            }
                            limit.ending()
                        }
                        && fresh.closable.poll_picked(cx) =>
                {
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        drop(young.take());
        fresh.closable.busy();
        if n == 0 {
            return None;
        }
        *began = true;
        len += n;
        if let Some(p) = sniff(&buf[..len]) {
            return Some((p, Bytes::copy_from_slice(&buf[..len])));
        }
    }
}

/// What a connection picked at the drain's end before it was ever run had already sent: its
/// worker's reactor tells of bytes that came before the connection was handed to it only on
/// its next turn, after this first poll, and the request was closed unread (taken from the
/// backlog as the stop came, it had been sent before). A read the reactor does not gate, at
/// the drain's end only; a pick for room comes to a connection seen idle already.
fn unannounced(stream: &TcpStream, room: &mut [u8], limit: &Limit) -> Option<usize> {
    if !limit.ending() {
        return None;
    }
    match rustix::io::read(stream, room) {
        Ok(n) if n > 0 => Some(n),
        _ => None,
    }
}

/// A new connection once its first step is done: a plaintext one whose protocol is known (with
/// the bytes that told it), or one whose TLS handshake is still to come.
enum Arrived {
    H2c(Bytes, TcpStream),
    /// With the drain, which the relay reads for each request.
    Tls(TlsAcceptor, TcpStream, Arc<Drain>),
}

/// What an accept loop does when accepting fails, most often for want of file descriptors, a
/// condition that lasts: it waits a moment instead of spinning, and says so at most once a
/// second with how many failed in between, where a line per try wrote some 50 a second.
/// Each failure is counted too (`intermission_accept_failures_total`): the log alone left an
/// alert on metrics blind to a proxy turning clients away.
pub struct AcceptFailures {
    what: &'static str,
    told: Lasting,
    counted: Counter,
}

impl AcceptFailures {
    /// `what`: the listener, as the log names it; `counted`: its series.
    pub fn new(what: &'static str, counted: Counter) -> AcceptFailures {
        AcceptFailures {
            what,
            told: Lasting::default(),
            counted,
        }
    }

    pub async fn failed(&mut self, e: &std::io::Error) {
        self.counted.inc();
        if let Some(unsaid) = self.told.tell(std::time::Instant::now()) {
            let more = More(unsaid);
            tracing::warn!(error = %e, "{}: accept failed{more}", self.what);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    /// Accepting works again: the failures not said yet are said, once a second has passed
    /// since the last line. Said only with the next failure, they were never said when the
    /// burst ended (descriptors freed), and the log showed a lone failure where thousands had
    /// been; said at every accept, a listener short of descriptors, whose accepts fail and
    /// succeed in turn as connections close, wrote a line per failure again (some 50 a
    /// second). One comparison per accepted connection; the clock only with some unsaid.
    #[inline]
    pub fn recovered(&mut self) {
        if let Some(unsaid) = self.told.unsaid(|| Some(std::time::Instant::now())) {
            self.said_since(unsaid);
        }
    }

    /// The listener stops: what was not said is said now, whenever the last line was.
    pub fn stopped(&mut self) {
        if let Some(unsaid) = self.told.unsaid(|| None) {
            self.said_since(unsaid);
        }
    }

    #[cold]
    fn said_since(&self, unsaid: u64) {
        tracing::warn!(
            "{}: accept failed {unsaid} more times since the last line; accepting again",
            self.what
        );
    }
}

/// A condition that may happen thousands of times a second, told at most once a second.
#[derive(Default)]
pub(crate) struct Lasting {
    said: Option<std::time::Instant>,
    unsaid: u64,
}

impl Lasting {
    pub(crate) const fn new() -> Lasting {
        Lasting {
            said: None,
            unsaid: 0,
        }
    }

    /// How many were not written since the last, if any, and if a second has passed since it
    /// at `now()` (or at once, with `None`); taken, and that moment kept as the last line's,
    /// so that they are said once and lines stay a second apart. `now` is read only when
    /// there are some.
    #[inline]
    pub(crate) fn unsaid(
        &mut self,
        now: impl FnOnce() -> Option<std::time::Instant>,
    ) -> Option<u64> {
        if self.unsaid == 0 {
            return None;
        }
        if let Some(now) = now() {
            let since = self.said.map(|said| now.duration_since(said));
            if since.is_some_and(|since| since < Duration::from_secs(1)) {
                return None;
            }
            self.said = Some(now);
        }
        Some(std::mem::take(&mut self.unsaid))
    }

    /// Whether the condition at `now` is to be written, with how many were not since the last.
    pub(crate) fn tell(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.said {
            Some(said) if now.duration_since(said) < Duration::from_secs(1) => {
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

/// What taking a connection already in the listener's backlog, without waiting, found.
enum Queued {
    Taken(TcpStream, std::net::SocketAddr),
    /// This one could not be served (reset while it waited, aborted): the next may be.
    Lost,
    /// The backlog is empty, or no descriptor is left to take another.
    Done,
}

/// At a stop, the listener is closed: the kernel resets the connections still queued in it,
/// whose clients had connected and sent their requests (all 16 of a test's, h197). Taken
/// first, they are served as any connection the drain finds open. A syscall rather than
/// tokio's `accept`, which waits for the reactor to have seen them. One client that reset
/// while queued (Linux still hands it over, and its address is gone) does not end the
/// taking: the connections behind it were reset for it.
fn accept_queued(listener: &TcpListener) -> Queued {
    use rustix::io::Errno;
    use rustix::net::{accept_with, SocketFlags};
    let fd = match accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
        Ok(fd) => fd,
        Err(Errno::AGAIN | Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM) => {
            return Queued::Done
        }
        Err(_) => return Queued::Lost,
    };
    let stream = std::net::TcpStream::from(fd);
    let Ok(peer) = stream.peer_addr() else {
        return Queued::Lost;
    };
    match TcpStream::from_std(stream) {
        Ok(stream) => Queued::Taken(stream, peer),
        Err(_) => Queued::Lost,
    }
}

pub async fn accept_loop(
    listener: TcpListener,
    state: StateHandle,
    drain: Arc<Drain>,
    limit: Arc<Limit>,
    workers: Arc<Workers>,
    tls: bool,
    mut shutdown: Shutdown,
) {
    let mut failures = AcceptFailures::new("listener", limit.accept_failed.clone());
    // At the limit, said at most once a second each, as accept failures are.
    let (mut made_room, mut refused) = (Lasting::default(), Lasting::default());
    let mut over_cap = Lasting::default();
    // Once stopped, the connections the kernel had already queued, at most a backlog's worth.
    let mut queued: Option<usize> = None;
    loop {
        let (stream, peer) = match &mut queued {
            Some(0) => break,
            Some(left) => {
                *left -= 1;
                match accept_queued(&listener) {
                    Queued::Taken(stream, peer) => (stream, peer),
                    Queued::Lost => continue,
                    Queued::Done => break,
                }
            }
            None => tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => {
                        failures.recovered();
                        pair
                    }
                    Err(e) => {
                        failures.failed(&e).await;
                        continue;
                    }
                },
                _ = shutdown.fired() => {
                    failures.stopped();
                    queued = Some(crate::app::BACKLOG as usize);
                    continue;
                }
            },
        };
        // An IPv4 client of a dual-stack (`[::]`) listener, `::ffff:a.b.c.d`, is that IPv4
        // address for everything after: the access log and the warnings named it in its
        // mapped form, where X-Forwarded-For, allow_ips and trusted_proxies read it as IPv4.
        let peer = std::net::SocketAddr::new(crate::config::canonical_ip(peer.ip()), peer.port());
        // At the limit, an idle connection makes room; with none, close at once: a refused
        // client retries elsewhere or later, while an accepted one that is never served
        // would hold a descriptor for nothing.
        let snap = state.load();
        let max = snap.config.proxy.max_connections;
        // Before a slot is sought, so that a connection over its client's cap never closes
        // an idle one to make room. Counted always, refused only once half the slots are
        // taken: below that one host's pending connections shut nobody out, and a load test
        // from one machine (wrk opens its 1,024 connections at once) is served whole.
        let begun = match pending_cap(&snap.config.proxy, peer.ip()) {
            None => None,
            Some(cap) => {
                let client = pending::client_of(peer.ip());
                let pressed = limit.open.load(Ordering::Relaxed) >= max / 2;
                let cap = if pressed { cap } else { usize::MAX };
                match limit.per_client.begin(client, cap) {
                    Some(begun) => Some(begun),
                    None => {
                        limit.pending_per_client.inc();
                        if let Some(unsaid) = over_cap.tell(std::time::Instant::now()) {
                            let more = More(unsaid);
                            tracing::warn!(
                                client = %pending::Shown(client),
                                "proxy.max_pending_per_client ({cap}) reached: the client has \
                                 that many connections not yet past their first request; \
                                 closed a new one{more}"
                            );
                        }
                        continue;
                    }
                }
            }
        };
        let permit = match limit.take(max) {
            Some(permit) => permit,
            None => match limit.make_room(max) {
                Some(permit) => {
                    limit.made_room.inc();
                    if let Some(unsaid) = made_room.tell(std::time::Instant::now()) {
                        let more = More(unsaid);
                        tracing::warn!(
                            "proxy.max_connections ({max}) reached: closed the connection idle \
                             longest to serve a new one{more}"
                        );
                    }
                    permit
                }
                None => {
                    limit.refused.inc();
                    if let Some(unsaid) = refused.tell(std::time::Instant::now()) {
                        let more = More(unsaid);
                        tracing::warn!(
                            %peer,
                            "proxy.max_connections ({max}) reached and no idle connection to \
                             close for room: closed a new one{more}"
                        );
                    }
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let first_byte = snap.config.proxy.header_read_timeout;
        let builder = snap.conn.clone();
        let acceptor = match (tls, &snap.tls) {
            (false, _) => None,
            (true, Some(config)) => Some(TlsAcceptor::from(config.clone())),
            (true, None) => continue,
        };
        drop(snap);
        let mut conn = Conn::new(peer, tls);
        conn.pending = begun.map(Pending::from).unwrap_or_default();
        conn.drain = Some(drain.clone());
        let conn = Arc::new(conn);
        let state = state.clone();
        match acceptor {
            None => {
                let drain = drain.clone();
                // Counted for the drain's end from here: the worker may run it only after.
                let fresh = Fresh::new(permit.limit().clone());
                workers.spawn(stream, move |stream| {
                    plain(
                        stream,
                        (permit, fresh),
                        conn,
                        state,
                        builder,
                        drain,
                        first_byte,
                    )
                });
            }
            Some(acceptor) => {
                // Counted by the drain from now: the handshake may be under way when it starts.
                let guard = drain.guard();
                let drain = drain.clone();
                workers.spawn(stream, move |stream| async move {
                    let arrived = Arrived::Tls(acceptor, stream, drain);
                    let held = (guard, permit);
                    let served =
                        serve_others(arrived, &state, conn, &builder, held, first_byte).await;
                    log_end(peer, served, &state);
                });
            }
        }
    }
}

/// The most connections not yet past their first request that a connection from `peer`'s
/// client may join (`pending`); `None` when they are not capped: `max_pending_per_client` is
/// 0, or the peer is one of `trusted_proxies`, a load balancer or CDN in front that carries
/// many clients' connections on few addresses.
fn pending_cap(proxy: &ProxyConfig, peer: std::net::IpAddr) -> Option<usize> {
    match proxy.max_pending_per_client {
        0 => None,
        _ if proxy.is_trusted(peer) => None,
        cap => Some(cap),
    }
}

/// A plaintext connection: HTTP/1.1, parked whenever it idles (an idle one then moves to a
/// small task of its own, see `park`), or HTTP/2 prior knowledge. The sniffing and HTTP/2
/// states are boxed: a task keeps the size of its largest state for its whole life.
async fn plain(
    mut stream: TcpStream,
    (permit, fresh): (Slot, Fresh),
    conn: Arc<Conn>,
    state: StateHandle,
    builder: Arc<ConnBuilder>,
    drain: Arc<Drain>,
    first_byte: Duration,
) {
    // hyper's header timeout starts with a request head; a client that sends nothing (or a
    // preface and nothing more) is cut off here instead. No drain guard yet: a connection
    // that has sent nothing has nothing to finish (`fresh` has the drain see it meanwhile).
    let mut began = false;
    let first = first_bytes(&mut stream, &fresh, &mut began);
    let sniffed = Box::pin(tokio::time::timeout(first_byte, first)).await;
    let Ok(Some((protocol, first))) = sniffed else {
        // Closed by the drain's end before a byte came: with a lingering close, as a parked
        // connection is (`park::parked`), the guard taken before `fresh` goes. Dropped, its
        // socket answered a request already on its way with a reset.
        if fresh.closable.is_picked() && permit.limit().ending() {
            crate::shutdown::linger(stream, drain.guard(), None);
            return;
        }
        drop(fresh);
        // A few bytes that have not yet told the protocol (a prefix of HTTP/2's preface,
        // `P` of a `POST`) are a head begun as much as hyper's would be.
        match sniffed {
            Err(_) if began => head_timed_out(&state, conn.peer.ip(), first_byte),
            _ => log_end(conn.peer, None, &state),
        }
        return;
    };
    // `fresh` goes once the connection holds a drain guard, or has gone to a task that
    // counts for the drain itself (`park::start`), with no await between.
    let served = if protocol == Protocol::Http1 {
        let idle = Arc::new(park::Idle::new(permit.limit().clone()));
        let timing = Some(Timing::new(state.clone()));
        let io = park::Rewind::new(first, stream, Some(idle.clone()), timing);
        let service = park::Gateway::new(Fast::new(state.clone(), conn.clone()), idle);
        let held = park::Held {
            builder,
            drain,
            permit,
        };
        match park::start(io, service, held) {
            Some((io, service, held)) => {
                let guard = held.drain.guard();
                drop(fresh);
                Some(park::run(io, service, held, None, Some(guard)).await)
            }
            None => Some(Ok(())),
        }
    } else {
        let guard = drain.guard();
        drop(fresh);
        let arrived = Arrived::H2c(first, stream);
        Box::pin(serve_others(
            arrived,
            &state,
            conn.clone(),
            &builder,
            (guard, permit),
            first_byte,
        ))
        .await
    };
    log_end(conn.peer, served, &state);
}

fn log_end(
    peer: std::net::SocketAddr,
    served: Option<Result<(), hyper::Error>>,
    state: &StateHandle,
) {
    match served {
        None => tracing::debug!(%peer, "no request within header_read_timeout; closed"),
        Some(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
            count_unread(&e, state, peer.ip());
            // h2's own warnings of these are not logged (`logging::directives`): counted.
            if let Some(reason) = crate::metrics::Http2Goaway::of(&e) {
                state.load().metrics.http2_goaway(reason);
            }
        }
        Some(Ok(())) => {}
    }
}

/// A head hyper could not read never reaches the gateway, but hyper answered it (400, or
/// 431 for one too large, 414 for a target too long): counted with the requests
/// intermission refuses itself, so that the 4xx a client sees is in the metrics too, and
/// logged, with no method or path since none was read: a visitor whose cookies outgrew
/// `max_header_bytes` gets a `431` on every page, and the access log is where an operator
/// looks for it.
pub(crate) fn count_unread(e: &hyper::Error, state: &StateHandle, peer: std::net::IpAddr) {
    if e.is_parse() && !e.is_parse_version_h2() {
        // hyper's one test for both "too large" kinds; it answers a target over its 64 KiB
        // limit 414, which it names only in its message.
        let status = match (
            e.is_parse_too_large(),
            e.to_string().contains("URI too long"),
        ) {
            (true, true) => 414,
            (true, false) => 431,
            (false, _) => 400,
        };
        refused_unread(state, peer, status);
    }
}

/// Counts and logs a request head refused unread, answered `status` (`count_unread`; h2's own
/// `431` to an HTTP/2 request head over `max_header_bytes`, `flood::Flood`).
pub(crate) fn refused_unread(state: &StateHandle, peer: std::net::IpAddr, status: u16) {
    refused_unread_said(state, peer, status, 0);
}

/// `refused_unread`, for an answer of the proxy's own whose body was `bytes` long (the
/// relay's `400`, `414` or `431` to a head hyper would refuse, `relay::refuse`).
pub(crate) fn refused_unread_said(
    state: &StateHandle,
    peer: std::net::IpAddr,
    status: u16,
    bytes: u64,
) {
    let snap = state.load();
    snap.metrics.unread(snap.mode, status);
    if snap.config.log.access_log {
        unread_line(peer, status, bytes, None);
    }
}

/// A request head begun and not whole by its deadline (`header_read_timeout`): the
/// connection is closed unanswered, as nginx and hyper close it, and the request is logged
/// `408`, as nginx logs it, and counted with the heads refused unread. A client that sent
/// part of a head and stalled (slowloris) showed only in `intermission_client_connections`.
/// `waited`: how long the head was given, its line's `duration_ms`. Only where bytes of a
/// head came: an idle keep-alive connection closed at the same deadline made no request.
pub(crate) fn head_timed_out(state: &StateHandle, peer: std::net::IpAddr, waited: Duration) {
    tracing::debug!(%peer, "request head not whole within header_read_timeout; closed");
    let snap = state.load();
    snap.metrics.head_timed_out(snap.mode);
    if snap.config.log.access_log {
        unread_line(peer, 408, 0, Some(waited));
    }
}

/// The access line of an answer given to a request that was never read: `-` for its method
/// and path, as nginx writes a request line it could not read. Written only with the access
/// log on, as every access line: it was written with it off too, at `info`, one line for
/// each head of garbage any client sent. Its `duration_ms` is `waited` when the head was
/// waited for (a `408`), and otherwise 0: nothing read the clock when the head began, which
/// would cost every request a clock read for the few refused.
fn unread_line(peer: std::net::IpAddr, status: u16, bytes: u64, waited: Option<Duration>) {
    let now = std::time::Instant::now();
    let start = waited.and_then(|w| now.checked_sub(w)).unwrap_or(now);
    let line = crate::logging::AccessLine {
        peer,
        // No header was read that could name another client.
        client: None,
        method: &"-",
        path: &"-",
        status,
        upstream: None,
        bytes,
        cut: false,
    };
    line.write(start);
}

/// Serves HTTP/2 prior knowledge and TLS connections (either protocol, by ALPN). Over TLS,
/// HTTP/1.1 is relayed while its requests are plain forwards (`relay`), as on a plaintext
/// connection, then served by hyper from the first that is not one; it does not park.
/// `held`: the drain's guard, and the connection's slot, kept to the end (an upgrade's tunnel,
/// which outlives hyper's connection, takes its own: `Upgrading`).
async fn serve_others(
    arrived: Arrived,
    state: &StateHandle,
    conn: Arc<Conn>,
    builder: &ConnBuilder,
    held: (Shutdown, Slot),
    first_byte: Duration,
) -> Option<Result<(), hyper::Error>> {
    let (guard, slot) = held;
    // While it waits for a request, it may be closed to make room for a new connection:
    // before its TLS hello, the relay's wait over TLS, an HTTP/1.1 one that hyper serves
    // (over TLS, after a request the relay does not take) between requests, and an HTTP/2
    // connection with no stream open.
    let closable = Closable::new(slot.limit().clone());
    let peer = conn.peer;
    let relaying = (state.clone(), conn.clone());
    let state = state.clone();
    // Decided at once; only forwarding returns a (boxed) future: see `Reply`.
    let service = service_fn(move |req| gateway::handle(&state, &conn, req));
    let mut serving = Serving {
        builder,
        guard,
        deadline: first_byte,
        state: relaying.0.clone(),
        closable: &closable,
        peer,
    };
    match arrived {
        Arrived::H2c(first, stream) => {
            let timing = Some(Timing::new(relaying.0));
            let io = park::Rewind::new(first, stream, None, timing);
            serving.http2(io, service).await
        }
        Arrived::Tls(acceptor, mut stream, drain) => {
            // The handshake gets the same deadline as a request head. Until its hello arrives
            // the client has sent nothing, and is idle as a new plaintext one is
            // (`first_bytes`): it may be closed to make room. Once the handshake is under way
            // it may be too, but only once it has lasted `STALLED`
            // (`unless_picked`).
            let timing = relaying.0.clone();
            // Whether the client began: one that sent nothing is idle, not a failed handshake.
            let mut began = false;
            // The drain's signal. The guard counts the connection from its accept, so the
            // drain's end, which closes the idle connections, waits for it: one that has sent
            // nothing, or was answered as plain HTTP, held every stop for
            // `header_read_timeout` (to `shutdown_timeout`), the listeners closed meanwhile,
            // where a plaintext one that has sent nothing is closed at once.
            let drained = &mut serving.guard;
            let handshake = async {
                // Its byte first: a hello that has come is served as the drain lets one be.
                let hello = tokio::select! {
                    biased;
                    hello = hello(&stream, &closable) => hello,
                    () = drained.fired() => Hello::Picked,
                };
                closable.busy();
                let Hello::Began(first) = hello else {
                    return None;
                };
                began = true;
                if plain_http(first) {
                    // Counted as the 400s hyper gives to heads it cannot read.
                    let snap = timing.load();
                    snap.metrics.unread(snap.mode, 400);
                    snap.metrics.tls_failure(TlsFailure::PlainHttp);
                    let sent = plain_http_on_tls(&mut stream, &closable, drained).await;
                    if timing.load().config.log.access_log {
                        unread_line(peer.ip(), 400, sent, None);
                    }
                    return None;
                }
                // A handshake under way when the drain begins gets what one that has not
                // stalled takes (`STALLED` from its start), as at `max_connections`.
                let begun = tokio::time::Instant::now();
                let cut = async {
                    drained.fired().await;
                    tokio::time::sleep_until(begun + STALLED).await;
                };
                let accepting =
                    unless_picked(acceptor.accept(Timed::new(stream, timing)), &closable);
                let accepted = tokio::select! {
                    biased;
                    accepted = accepting => accepted,
                    () = cut => None,
                };
                closable.busy();
                accepted
            };
            let handshake = tokio::time::timeout(first_byte, handshake).await;
            let tls_stream = match handshake {
                Ok(Some(Ok(s))) => {
                    let resumed = s.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                    relaying.0.load().metrics.tls_handshake(resumed);
                    s
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    relaying.0.load().metrics.tls_failure(TlsFailure::of(&e));
                    return None;
                }
                Err(_) if began => {
                    relaying.0.load().metrics.tls_failure(TlsFailure::Timeout);
                    return None;
                }
                Ok(None) | Err(_) => return None,
            };
            // RFC 9113 §3.3: over TLS, HTTP/2 is chosen by ALPN.
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                let io = park::Rewind::new(Bytes::new(), tls_stream, None, None);
                return serving.http2(io, service).await;
            }
            let (state, conn) = relaying;
            let (mut tls_stream, mut first) = (tls_stream, Bytes::new());
            let keep_alive = builder.keep_alive;
            let linger = relay::Linger::Close(keep_alive, &mut serving.guard, &closable);
            let relayed = relay::serve(&mut first, &mut tls_stream, &state, &conn, &drain, linger);
            // Boxed, as on a plaintext connection (`park::run`): a task keeps the size of its
            // largest state for its whole life.
            match Box::pin(relayed).await {
                // Never `Stalled` here: a TLS connection does not park.
                relay::After::Hyper | relay::After::Stalled => {
                    let io = park::Rewind::new(first, tls_stream, None, None);
                    let guard = serving.guard.clone();
                    let (result, io) = serving.http1(io, service).await;
                    if let Some(io) = io {
                        // An error (an answer cut short, a head hyper refused) is told by a
                        // close without close_notify, which would say that all was sent. Not
                        // hyper's header timer, which ends a connection idle between requests
                        // (or a head too slow, which the relay ends with close_notify too):
                        // nothing was cut, and the client read a truncation.
                        let notify =
                            result.is_ok() || result.as_ref().is_err_and(hyper::Error::is_timeout);
                        let held = (guard, slot, picked_to_make_room(&closable));
                        tls_linger(io.into_inner(), notify, keep_alive, held, &drain).await;
                    }
                    Some(result)
                }
                relay::After::Refused => {
                    let held = (serving.guard.clone(), slot, picked_to_make_room(&closable));
                    tls_linger(tls_stream, true, keep_alive, held, &drain).await;
                    Some(Ok(()))
                }
                relay::After::Park | relay::After::Close => {
                    // Over TLS a head begun comes back only when its time is up.
                    if !first.is_empty() {
                        head_timed_out(&state, peer.ip(), keep_alive);
                    }
                    let held = (serving.guard.clone(), slot, picked_to_make_room(&closable));
                    tls_linger(tls_stream, true, keep_alive, held, &drain).await;
                    Some(Ok(()))
                }
                // Dropped without close_notify, which would say that all was sent.
                relay::After::Broken => Some(Ok(())),
            }
        }
    }
}

/// Closes an HTTPS connection: with `close_notify`, as hyper closes a TLS connection (a
/// client that does not read gets the time it has for a head), then as nginx's lingering
/// close does (`shutdown::linger`): what the client still sends (requests pipelined behind
/// the last answer at a drain, the rest of a body an answer did not wait for) is read and
/// dropped, not left unread in the socket, whose close would then be a reset that can throw
/// away the answer. The records are dropped unread: nothing more is answered. Outside a drain
/// the connection keeps `slot` meanwhile. Without `notify`, no `close_notify` is sent: the
/// client is to see that the connection broke off. One `picked` to make room for a new
/// connection closes once its `close_notify` is out, without lingering, as a plaintext one
/// does (`park`): its slot was given away, and lingering on it (a second, to five, for a client
/// that does not close at once) kept it counted in `max_connections` though no longer among
/// those closing, so that each next client at the limit closed up to `PAYBACK` more idle
/// connections to pay back an excess that was not there.
async fn tls_linger(
    mut tls: TlsStream<Timed<TcpStream>>,
    notify: bool,
    keep_alive: Duration,
    (guard, slot, picked): (Shutdown, Slot, bool),
    drain: &Drain,
) {
    if notify
        && tokio::time::timeout(keep_alive, tls.shutdown())
            .await
            .is_err()
    {
        return;
    }
    if picked {
        return;
    }
    let slot = (!drain.started()).then_some(slot);
    crate::shutdown::linger(tls.into_inner().0.into_inner(), guard, slot);
}

/// Whether the connection closes because it was picked to make room for a new one (not by the
/// drain's end, which lingers on every idle connection it closes).
fn picked_to_make_room(closable: &Closable) -> bool {
    closable.is_picked() && !closable.limit().ending()
}

/// How long a TLS handshake, or a request head after the first, runs before it may be closed
/// to make room at `max_connections`: a client's takes a round trip or two, a second on the
/// slowest mobile links, so one still under way after this has stalled. Left alone (as nginx
/// leaves one), a host that begins handshakes and never ends them, 11 bytes each renewed
/// every `header_read_timeout`, held every slot and shut out every new client on both ports;
/// as did one that sent a whole request on each connection and then a byte of the next
/// (`park`), which `proxy.max_pending_per_client` does not count.
pub const STALLED: Duration = Duration::from_secs(2);

/// Whether a new connection that has sent nothing yet has waited `STALLED` since its first
/// wait (`fresh`, armed then): only then may it be closed to make room. A client sends its
/// request (or its hello) a round trip after it connects at most, and one picked in that
/// moment was closed unserved: with many more clients than `max_connections`, each
/// reconnecting at once, every new connection closed one that had not yet been read, and
/// they closed each other near a livelock (974 requests served in 20 s by 64 slots to 1,000
/// clients, h197). The timer is armed only when the first wait finds nothing to read. At the
/// drain's end at once: a connection first run then is closed (or its request, already sent,
/// answered: `unannounced`) rather than holding the stop; a plaintext one already waiting its
/// grace out is woken by that end (`Young`), where it was picked only when its timer fired,
/// holding the process's exit for up to `STALLED`. (A TLS one is closed at the drain's start,
/// `hello`.)
fn waited(
    mut fresh: Pin<&mut Option<tokio::time::Sleep>>,
    limit: &Limit,
    cx: &mut Context<'_>,
) -> bool {
    if limit.ending() {
        return true;
    }
    if fresh.is_none() {
        fresh.set(Some(tokio::time::sleep(STALLED)));
    }
    fresh
        .as_pin_mut()
        .is_some_and(|grace| grace.poll(cx).is_ready())
}

/// `work` (a TLS handshake), unless it has lasted `STALLED` and is then picked to
/// make room (`Limit::make_room`), the handshake under way longest first among the idle
/// connections; `None` then. The caller takes it out of the idle ones (`Closable::busy`).
async fn unless_picked<F: Future>(work: F, closable: &Closable) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    let mut stalled = std::pin::pin!(tokio::time::sleep(STALLED));
    poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if stalled.as_mut().poll(cx).is_ready() && closable.poll_picked(cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// How a TLS client's wait for its first byte ended.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// It sent something, whose first byte this is.
    Began(u8),
    /// It closed or reset the connection having sent nothing: a TCP health check (a load
    /// balancer's, `nc -z`), a port scan, a client that gave up. No handshake was tried, so
    /// none failed: counting these as failures buried real ones under every probe.
    Closed,
    /// Picked to make room for a newer connection while it had sent nothing.
    Picked,
}

/// Waits for a TLS client's first byte, peeked so that the handshake reads it again:
/// readiness alone may be told before any byte is there. An end of stream or an error (a
/// reset) before it is `Closed`, not a beginning. Picked only once it has waited `STALLED`
/// (`waited`).
async fn hello(stream: &TcpStream, closable: &Closable) -> Hello {
    let mut byte = [0u8; 1];
    let mut fresh = std::pin::pin!(None::<tokio::time::Sleep>);
    poll_fn(|cx| {
        let mut peeked = ReadBuf::new(&mut byte);
        match stream.poll_peek(cx, &mut peeked) {
            Poll::Ready(Ok(_)) => Poll::Ready(
                peeked
                    .filled()
                    .first()
                    .map_or(Hello::Closed, |&b| Hello::Began(b)),
            ),
            Poll::Ready(Err(_)) => Poll::Ready(Hello::Closed),
            Poll::Pending
                if waited(fresh.as_mut(), closable.limit(), cx) && closable.poll_picked(cx) =>
            {
                Poll::Ready(Hello::Picked)
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Whether a TLS client's first byte begins plain HTTP rather than TLS. A TLS record starts
/// with its content type (0x14 to 0x17, 0x16 for the hello) and an SSLv2-style hello with
/// 0x80 or more, none of them printable: any printable ASCII byte, or a line end, is taken
/// for HTTP, so that a lowercase method (`get /`, which a server may refuse but which is
/// still HTTP) and the empty lines RFC 9112 §2.2 lets a client send before its request line
/// get the `400` that says to use https://, not a TLS alert.
fn plain_http(first: u8) -> bool {
    matches!(first, b' '..=b'~' | b'\r' | b'\n')
}

/// A client that speaks plain HTTP to a TLS port (`http://example.com:443/`) gets a `400` that
/// says so, as nginx answers, rather than a TLS alert that its user cannot read. What it sends
/// is read and dropped until it closes (64 KiB at most), as nginx's lingering close does:
/// closed over unread bytes, the connection would be reset, which can lose the answer. All of
/// it is bounded by the handshake's deadline, as the handshake is.
/// Answers plain HTTP sent to a TLS port; the body's bytes sent. A drain ends what is left
/// once the answer is out, as a pick does.
async fn plain_http_on_tls(
    stream: &mut TcpStream,
    closable: &Closable,
    drain: &mut Shutdown,
) -> u64 {
    const BODY: &str = "This port speaks HTTPS: ask for https:// rather than http://.\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return 0;
    }
    let sent = BODY.len() as u64;
    if stream.shutdown().await.is_err() {
        return sent;
    }
    // The answer is out: what is left is a courtesy, and the connection may make room, or
    // clients sending a byte of plain HTTP and waiting would hold every slot as long.
    let mut scratch = vec![0u8; 4096];
    let mut left: usize = 64 * 1024;
    let mut drained = std::pin::pin!(drain.fired());
    poll_fn(|cx| loop {
        if left == 0 {
            return Poll::Ready(());
        }
        let mut read = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                left = left.saturating_sub(read.filled().len());
            }
            Poll::Ready(_) => return Poll::Ready(()),
            Poll::Pending if closable.poll_picked(cx) => return Poll::Ready(()),
            Poll::Pending if drained.as_mut().poll(cx).is_ready() => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    closable.busy();
    sent
}

/// Says `Connection: close` on an HTTP/1.1 answer during a drain (`Limit::draining`), but
/// on a `101`, whose connection becomes a tunnel.
pub(crate) fn close_if_draining<B>(response: &mut Response<B>, limit: &Limit) {
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS && limit.draining() {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

/// What serving one connection needs, whatever its protocol.
struct Serving<'a> {
    builder: &'a ConnBuilder,
    guard: Shutdown,
    deadline: Duration,
    state: StateHandle,
    closable: &'a Closable,
    peer: std::net::SocketAddr,
}

impl Serving<'_> {
    /// An HTTPS HTTP/1.1 connection, from the first request the relay left to hyper, whose
    /// bytes `io` begins with; with `io` back once hyper has ended it (not when it was dropped
    /// to make room, nor once it became a tunnel).
    async fn http1<I, S>(self, io: I, service: S) -> (Result<(), hyper::Error>, Option<I>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<crate::body::Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let between = Arc::new(Between::default());
        let counted = between.clone();
        let limit = self.closable.limit().clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let open = Open::new(&counted);
            let upload = !hyper::body::Body::is_end_stream(req.body());
            counted.upload.store(upload, Ordering::Relaxed);
            Upgrading::mark(&mut req, &limit);
            let reply = service.call(req);
            let limit = limit.clone();
            async move {
                let mut response = reply.await?;
                close_if_draining(&mut response, &limit);
                Ok::<_, S::Error>(Answered::wrap(response, open))
            }
        });
        let io = Watched {
            io,
            watch: between.clone(),
        };
        let connection = self
            .builder
            .http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        // Idle between requests, it may be picked to make room for a new connection, and is
        // closed as hyper closes an idle keep-alive connection (its graceful shutdown does so
        // at once). No wake-up tells that a request ended: hyper drops the answer's body, and
        // reads the next head, while the connection is polled, and this is polled right
        // after it, on the same task.
        let closable = self.closable;
        let told = between.clone();
        // Whether it is among the idle ones, so that a busy connection's wake-ups (a body
        // streaming) take no atomic write each.
        let mut listed = false;
        // A head begun may be picked too once it has lasted `STALLED`, as a parked plaintext
        // connection's (`park`): armed when one is seen under way, let go when it is whole.
        let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let picked = poll_fn(move |cx| {
            let idle = between.idle();
            let may = match idle {
                // A request answered within one poll (held) is never seen under way: the
                // next head's clock must not be the last one's.
                true => {
                    stalled = None;
                    true
                }
                false if between.stalling() => stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(STALLED)))
                    .as_mut()
                    .poll(cx)
                    .is_ready(),
                false => {
                    stalled = None;
                    false
                }
            };
            if !may {
                if listed {
                    closable.busy();
                    listed = false;
                }
                return Poll::Pending;
            }
            listed = true;
            if closable.poll_picked(cx) {
                Poll::Ready(!idle)
            } else {
                Poll::Pending
            }
        });
        // No deadline of our own: hyper's header_read_timeout runs from the first read of
        // every request head, the first one included (the first bytes are already here).
        let mut connection = connection;
        let served = until_drained(&mut connection, self.guard, picked, |c| {
            c.graceful_shutdown()
        });
        match served.await {
            // Ended by hyper: its socket, for a lingering close.
            Some(result) => {
                // hyper's header timer also closes a connection idle between requests: a
                // request only when bytes of its head came. Not after a request with a body,
                // whose rest may be what came.
                let head =
                    told.begun.load(Ordering::Relaxed) && !told.upload.load(Ordering::Relaxed);
                if head && result.as_ref().is_err_and(hyper::Error::is_timeout) {
                    head_timed_out(&self.state, self.peer.ip(), self.builder.keep_alive);
                }
                let io = connection
                    .into_parts()
                    .map(|parts| parts.io.into_inner().io);
                (result, io)
            }
            None => (Ok(()), None),
        }
    }

    async fn http2<I, S>(self, io: I, service: S) -> Option<Result<(), hyper::Error>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<crate::body::Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Each answer is counted while it waits on the client's flow-control window, which
        // no write clock sees (`stall::Answers`).
        let answers = Arc::new(Answers::default());
        let counted = answers.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let open = counted.open();
            if !hyper::body::Body::is_end_stream(req.body()) {
                // An upload may outlast its answer: forwarding counts it too.
                req.extensions_mut().insert(counted.clone());
            }
            let head = req.method() == http::Method::HEAD;
            let reply = service.call(req);
            async move {
                let response = reply.await?;
                Ok::<_, S::Error>(response.map(|body| Answer::new(body, open).to_head(head)))
            }
        });
        // Every HTTP/2 client connection, h2c and TLS, passes here, and only those.
        let io = crate::flood::Flood::new(io, self.state.clone(), self.peer);
        let connection = self
            .builder
            .http2
            .serve_connection(TokioIo::new(io), service);
        // An idle HTTP/2 connection answers the keep-alive pings, so nothing else would ever
        // close it: as an idle HTTP/1.1 connection is (`header_read_timeout`), and as nginx's
        // `keepalive_timeout` closes one, it is told to go (GOAWAY) once no request has come
        // for that long. Streams still open finish first.
        let idle = self.builder.keep_alive;
        let told = answers.clone();
        // Requests are counted as they arrive (`Answers::open`): until the first the
        // connection lives on a deadline, since the HTTP/2 preface has no timer of its own.
        let requests = &answers.arrived;
        // With no stream open, it is idle, and may be picked to make room for a new
        // connection: told to go as an idle one is. Checked whenever the connection's task
        // wakes, as hyper gives no sign of a stream's start or end: one that has just opened
        // may be picked first, and then finishes before the connection closes. Before its
        // first request it is picked only once it has waited `STALLED` (`waited`): its client
        // sends one with the preface, or as its handshake ends.
        let closable = self.closable;
        let mut fresh: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let picked = poll_fn(|cx| {
            if !answers.idle() {
                closable.busy();
                return Poll::Pending;
            }
            if answers.arrived.load(Ordering::Relaxed) == 0 && !closable.limit().ending() {
                let grace = fresh.get_or_insert_with(|| Box::pin(tokio::time::sleep(STALLED)));
                if grace.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            if closable.poll_picked(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let settled = answers.clone();
        let connection = until_idle(
            connection,
            self.guard,
            requests,
            idle,
            picked,
            move || settled.idle(),
            move |c| {
                told.going();
                c.graceful_shutdown()
            },
        );
        let state = self.state;
        let stalled = answers.stalled(move || state.load().config.proxy.send_timeout, idle);
        let connection = async move {
            tokio::select! {
                biased;
                served = connection => served,
                () = stalled => {
                    tracing::debug!(
                        "HTTP/2 answers left waiting on the client for send_timeout; closing"
                    );
                    Ok(())
                }
            }
        };
        until_first_request(connection, self.deadline, requests).await
    }
}

/// An HTTPS HTTP/1.1 connection that hyper serves, as it stands between requests: idle, and
/// so closable for room, once every request it has begun is answered whole and nothing of a
/// next one has been read. hyper's graceful shutdown then closes it at once, where one with a
/// head begun would be closed too, its request lost, since hyper keeps a head it has not
/// parsed as idle. All of it happens on the connection's own task (the service's futures
/// and the answers' bodies live in hyper's connection), hence `Relaxed`; the count is still
/// moved by locked adds, which cost nothing beside the `Arc` clone each request takes, so
/// that it stays right should an `Open` ever be dropped elsewhere.
struct Between {
    /// Requests from hyper's call of the service until it drops their answer's body, which it
    /// does once the last of it is in its write buffer (flushed before it closes).
    open: AtomicUsize,
    /// Bytes were read while no request was open: a head begun, until the request it makes.
    /// The first head, which the relay read, is begun. So is the rest of a body that comes
    /// after its answer: the connection is not idle again until its next request.
    begun: AtomicBool,
    /// Something was written and not flushed since: an answer still going out (to a client
    /// that does not read), which a pick would keep open past its slot until `send_timeout`,
    /// as `park::Idle` does not take for idle either.
    unflushed: AtomicBool,
    /// The last request came with a body: what arrives after its answer may be the rest of
    /// it, an upload under way, not a head stalled. Until a request without one.
    upload: AtomicBool,
}

impl Default for Between {
    fn default() -> Between {
        Between {
            open: AtomicUsize::new(0),
            begun: AtomicBool::new(true),
            unflushed: AtomicBool::new(false),
            upload: AtomicBool::new(false),
        }
    }
}

impl Between {
    fn idle(&self) -> bool {
        self.quiet() && !self.begun.load(Ordering::Relaxed)
    }

    /// No request open and nothing left unflushed.
    fn quiet(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0 && !self.unflushed.load(Ordering::Relaxed)
    }

    /// Whether a head is under way with nothing else: idle but for it. Not after a request
    /// with a body, whose rest may still be coming after its answer: an upload under way,
    /// which a drop would reset under the client, losing the answer it has not read yet.
    fn stalling(&self) -> bool {
        self.quiet() && self.begun.load(Ordering::Relaxed) && !self.upload.load(Ordering::Relaxed)
    }
}

/// One request on a `Between` connection, until hyper lets its answer go.
struct Open(Arc<Between>);

impl Open {
    fn new(between: &Arc<Between>) -> Open {
        between.open.fetch_add(1, Ordering::Relaxed);
        between.begun.store(false, Ordering::Relaxed);
        Open(between.clone())
    }

    /// Counts this request once more, never to be let go: the connection is not idle again.
    fn for_good(&self) {
        self.0.open.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        // Every `Open` added one: it never goes below zero.
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An answer's body on a `Between` connection, its request open until hyper drops it.
struct Answered {
    body: crate::body::Body,
    _open: Open,
}

impl Answered {
    /// `response` with its request open until hyper drops its body; for good when it
    /// switches protocols. A switch hands the connection to its tunnel, which keeps a slot of
    /// its own (`Upgrading`): the connection is never idle again, not even while hyper still
    /// writes the 101 out to a client that does not read, when a pick would cut it before the
    /// tunnel begins.
    fn wrap(response: Response<crate::body::Body>, open: Open) -> Response<Answered> {
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            open.for_good();
        }
        response.map(|body| Answered { body, _open: open })
    }
}

impl hyper::body::Body for Answered {
    type Data = Bytes;
    type Error = crate::body::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What the socket of a `Between` connection tells it: a head begun, what is read while no
/// request is open (what is read while one is, its body or a next head a client sends
/// before its answer, pipelining, which HTTPS clients hardly do, is not told); and an
/// answer written and not yet flushed.
impl Watch for Arc<Between> {
    fn read(&self) {
        if self.open.load(Ordering::Relaxed) == 0 {
            self.begun.store(true, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.unflushed.store(true, Ordering::Relaxed);
    }

    fn flushed(&self) {
        self.unflushed.store(false, Ordering::Relaxed);
    }
}

/// Runs a connection, dropping it if no request has arrived by `deadline`.
async fn until_first_request<F: std::future::Future>(
    connection: F,
    deadline: Duration,
    requests: &AtomicU64,
) -> Option<F::Output> {
    tokio::pin!(connection);
    match tokio::time::timeout(deadline, &mut connection).await {
        Ok(result) => Some(result),
        Err(_) if requests.load(Ordering::Relaxed) == 0 => None,
        Err(_) => Some(connection.await),
    }
}

#[cfg(test)]
mod tests {
    use super::{hello, plain_http, sniff, Answered, Between, Closable, Hello, Lasting, Limit};
    use super::{Open, Protocol, STALLED};
    use crate::watched::Watched;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;

    /// What is read while no request is open is a head begun, which hyper's graceful shutdown
    /// would drop: idle only once its request has come, and been answered.
    #[tokio::test]
    async fn a_connection_hyper_serves_is_idle_between_requests_only() {
        let between = Arc::new(Between::default());
        let mut buf = [0u8; 16];
        assert!(!between.idle(), "the head the relay left is begun");
        let open = Open::new(&between);
        assert!(!between.idle(), "a request is open");
        let mut body = Watched {
            io: &b"its body"[..],
            watch: between.clone(),
        };
        assert_eq!(body.read(&mut buf).await.ok(), Some(8));
        let answer = Answered {
            body: crate::body::Body::full("answer"),
            _open: open,
        };
        assert!(!between.idle(), "an answer is not sent whole");
        drop(answer);
        assert!(between.idle(), "its answer sent, what it read was its body");

        let mut next = Watched {
            io: &b"GET / HT"[..],
            watch: between.clone(),
        };
        assert_eq!(next.read(&mut buf).await.ok(), Some(8));
        assert!(!between.idle(), "a next head is begun");
        drop(Open::new(&between));
        assert!(between.idle());

        // An answer written but not flushed is still being sent.
        let mut out = Watched {
            io: Vec::<u8>::new(),
            watch: between.clone(),
        };
        tokio::io::AsyncWriteExt::write_all(&mut out, b"HTTP/1.1 200 OK\r\n")
            .await
            .unwrap();
        assert!(!between.idle(), "an answer not flushed is still being sent");
        tokio::io::AsyncWriteExt::flush(&mut out).await.unwrap();
        assert!(between.idle());
    }

    /// A connection whose request switched protocols is its tunnel's from then on: never
    /// idle, though the 101 has no body for hyper to keep.
    #[test]
    fn a_connection_that_switched_protocols_is_never_idle_again() {
        let between = Arc::new(Between::default());
        let answer = |status: u16| {
            let response = http::Response::builder()
                .status(status)
                .body(crate::body::Body::Empty)
                .expect("a valid status");
            drop(Answered::wrap(response, Open::new(&between)));
        };
        answer(200);
        assert!(between.idle(), "an answer sent whole leaves it idle");
        answer(101);
        assert!(!between.idle(), "a switched connection was idle");
    }

    #[test]
    fn lasting_accept_failures_are_told_once_a_second() {
        let mut f = Lasting::default();
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        assert_eq!(f.tell(at(0)), Some(0));
        for ms in (20..1000).step_by(20) {
            assert_eq!(f.tell(at(ms)), None);
        }
        assert_eq!(f.tell(at(1000)), Some(49));
        assert_eq!(f.tell(at(1020)), None);
        assert_eq!(f.tell(at(5000)), Some(1));
    }

    /// The failures of a burst's last second are said once accepting works again, not only
    /// with the next failure, which may never come.
    #[test]
    fn the_tail_of_a_burst_of_accept_failures_is_said_when_it_ends() {
        let mut f = Lasting::default();
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let stop = || None;
        assert_eq!(f.unsaid(stop), None);
        assert_eq!(f.tell(at(0)), Some(0));
        assert_eq!(f.unsaid(stop), None, "the first is said at once");
        for ms in (20..400).step_by(20) {
            assert_eq!(f.tell(at(ms)), None);
        }
        assert_eq!(f.unsaid(|| Some(at(420))), None, "within the second");
        assert_eq!(f.unsaid(|| Some(at(1000))), Some(19));
        assert_eq!(f.unsaid(|| Some(at(1000))), None, "said once");
        // Within the second of that line: counted again, and said with the next failure
        // a second after it.
        assert_eq!(f.tell(at(1500)), None);
        assert_eq!(f.tell(at(2000)), Some(1));
        // At a stop, at once.
        assert_eq!(f.tell(at(2100)), None);
        assert_eq!(f.unsaid(stop), Some(1));
    }

    /// Short of descriptors, a listener's accepts fail and succeed in turn as connections
    /// close: the failures are still said at most once a second, not at each accept that
    /// follows one.
    #[test]
    fn accepts_failing_and_succeeding_in_turn_are_said_once_a_second() {
        let mut f = Lasting::default();
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let mut lines = 0;
        for ms in (0..2000).step_by(40) {
            lines += usize::from(f.tell(at(ms)).is_some());
            lines += usize::from(f.unsaid(|| Some(at(ms + 20))).is_some());
        }
        assert!(lines <= 3, "{lines} lines in 2 s");
    }

    /// A TLS client's first byte as the listener sees it, from a real socket after `client`.
    async fn hello_after(client: impl FnOnce(tokio::net::TcpStream)) -> Hello {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connecting = tokio::net::TcpStream::connect(addr);
        let (connected, accepted) = tokio::join!(connecting, listener.accept());
        client(connected.unwrap());
        let (stream, _) = accepted.unwrap();
        let drain = Arc::new(crate::shutdown::Drain::default());
        let limit = Arc::new(Limit::new(Default::default(), Default::default(), drain));
        let closable = Closable::new(limit);
        tokio::time::timeout(Duration::from_secs(10), hello(&stream, &closable))
            .await
            .expect("the client's close is seen")
    }

    /// A connection closed or reset before its first byte (a load balancer's TCP check) is
    /// no handshake begun: it was counted as a failed one, under `other`.
    #[tokio::test]
    async fn a_tls_client_that_closes_or_resets_before_a_byte_has_not_begun() {
        assert_eq!(hello_after(drop).await, Hello::Closed);
        let reset = |s: tokio::net::TcpStream| {
            // Closed with SO_LINGER 0: an RST, not a FIN.
            s.set_zero_linger().unwrap();
            drop(s);
        };
        assert_eq!(hello_after(reset).await, Hello::Closed);
        let hello_byte = |s: tokio::net::TcpStream| {
            s.try_write(&[0x16, 0x03, 0x01]).unwrap();
        };
        assert_eq!(hello_after(hello_byte).await, Hello::Began(0x16));
    }

    /// Plain HTTP is told from TLS by any printable first byte or line end, not by a capital
    /// alone: `get /` and a request after an empty line got a TLS alert.
    #[test]
    fn plain_http_is_told_from_a_tls_record_by_its_first_byte() {
        for b in [b'G', b'g', b'P', b'\r', b'\n', b' ', b'~', b'/', b'0'] {
            assert!(plain_http(b), "{b:#04x}");
        }
        // TLS content types (0x16: handshake), an SSLv2-style hello, other control bytes.
        for b in [0x14, 0x15, 0x16, 0x17, 0x80, 0x00, 0x7f, b'\t', 0xff] {
            assert!(!plain_http(b), "{b:#04x}");
        }
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    /// A proxy's accepting parts, in maintenance (held requests are answered 503 without an
    /// upstream), on `workers`.
    struct Front {
        state: crate::state::StateHandle,
        drain: Arc<crate::shutdown::Drain>,
        limit: Arc<Limit>,
        listener: tokio::net::TcpListener,
    }

    impl Front {
        async fn new() -> Front {
            let snapshot = crate::state::snapshot::for_tests("", true);
            let drain = Arc::new(crate::shutdown::Drain::default());
            let limit = Limit::new(Default::default(), Default::default(), drain.clone());
            Front {
                state: crate::state::StateHandle::new(snapshot),
                drain,
                limit: Arc::new(limit),
                listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            }
        }

        /// Its accept loop, and what stops it.
        fn accept(
            self,
            workers: &Arc<crate::workers::Workers>,
        ) -> (crate::shutdown::Trigger, tokio::task::JoinHandle<()>) {
            let (stop, stopped) = crate::shutdown::channel();
            let looping = super::accept_loop(
                self.listener,
                self.state,
                self.drain,
                self.limit,
                workers.clone(),
                false,
                stopped,
            );
            (stop, tokio::spawn(looping))
        }
    }

    /// A connection taken from the backlog as the stop comes, and not yet run by its worker
    /// (busy: blocked here), holds the drain's end, and its request is answered with
    /// `Connection: close`. Seen by nothing (no guard yet, not among the idle ones), it let
    /// the drain end at once, and the process exit over it: the kernel answered the request
    /// with a reset.
    #[tokio::test]
    async fn a_connection_accepted_and_not_yet_run_is_answered_before_the_drain_ends() {
        use tokio::io::AsyncWriteExt;
        let workers = Arc::new(crate::workers::Workers::start(2).unwrap());
        // Turns: 0 here, 1 the other worker, blocked until `go`, 2 here: the connection
        // accepted next is the blocked worker's.
        let (go, blocked) = std::sync::mpsc::channel::<()>();
        let mut blocked = Some(blocked);
        let side = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        for turn in 0..3 {
            let _client = tokio::net::TcpStream::connect(side.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = side.accept().await.unwrap();
            let blocked = if turn == 1 { blocked.take() } else { None };
            workers.spawn(server, move |_| async move {
                if let Some(blocked) = blocked {
                    let _ = blocked.recv();
                }
            });
        }
        let front = Front::new().await;
        let (drain, limit) = (front.drain.clone(), front.limit.clone());
        let mut client = tokio::net::TcpStream::connect(front.listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(REQUEST).await.unwrap();
        let (stop, accepting) = front.accept(&workers);
        stop.fire();
        accepting.await.unwrap();
        assert_eq!(limit.open.load(std::sync::atomic::Ordering::Relaxed), 1);
        drain.begin();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let ending = crate::app::drain(drain.clone(), &limit, deadline);
        tokio::pin!(ending);
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(ending.as_mut(), cx))
        })
        .await;
        assert!(
            first.is_pending(),
            "the drain ended over a connection accepted and not yet run"
        );
        go.send(()).unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer));
        assert!(matches!(read.await, Ok(Ok(_))), "no clean end");
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 503 "), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(10), ending).await;
        assert_eq!(ended.ok(), Some(true));
    }

    /// A connection that has sent nothing when the drain's end closes it gets a lingering
    /// close, as a parked one: a request sent as that end came is read and thrown away. Its
    /// socket, dropped, answered the request with a reset (and the client's next write
    /// failed).
    #[tokio::test]
    async fn a_connection_closed_at_the_drain_end_before_a_byte_is_closed_cleanly() {
        use tokio::io::AsyncWriteExt;
        let workers = Arc::new(crate::workers::Workers::start(1).unwrap());
        let front = Front::new().await;
        let (drain, limit) = (front.drain.clone(), front.limit.clone());
        let mut client = tokio::net::TcpStream::connect(front.listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stop, accepting) = front.accept(&workers);
        let since = Instant::now();
        while limit.idlers().waiting.is_empty() {
            assert!(since.elapsed() < Duration::from_secs(10), "never idle");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.fire();
        accepting.await.unwrap();
        drain.begin();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let ending = tokio::spawn(async move { crate::app::drain(drain, &limit, deadline).await });
        let mut got = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut got));
        assert!(matches!(read.await, Ok(Ok(0))), "no clean end");
        // Sent as the end came: each write must find the socket still reading (a reset
        // comes back within a loopback's round trip, and fails the write after it).
        for _ in 0..20 {
            let wrote = client.write_all(REQUEST).await;
            assert!(wrote.is_ok(), "reset: {wrote:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(10), ending).await;
        assert!(matches!(ended, Ok(Ok(true))), "{ended:?}");
    }

    /// A connection that has sent nothing, first run before the drain's end and still in its
    /// grace (`waited`), is closed by that end at once: it was among neither the idle ones
    /// nor any other the end wakes, and was closed only once its grace ran out, holding the
    /// drain's end (the process's exit, and the admin listener the next process waits for)
    /// for up to `STALLED` whenever a client kept a silent connection (a browser's preconnect).
    #[tokio::test]
    async fn a_silent_connection_in_its_grace_does_not_hold_the_drain_end() {
        // Silent once accepted, as a preconnect is: its worker has run it, and it waits.
        let took = drain_end_over(b"", |limit| {
            limit.open.load(std::sync::atomic::Ordering::Relaxed) != 0
        })
        .await;
        // Milliseconds when it is woken; `STALLED` less the 100 ms when it waits its grace.
        assert!(
            took < STALLED / 2,
            "the drain's end waited {took:?} for a silent connection"
        );
    }

    /// A connection that has sent only a prefix of HTTP/2's preface and stalls is closed at
    /// the drain's end at once, as one that has sent nothing (above): nothing woke it there,
    /// and it held that end until `header_read_timeout` (10 s here), to `shutdown_timeout`.
    #[tokio::test]
    async fn a_stalled_preface_prefix_does_not_hold_the_drain_end() {
        for prefix in [&b"PRI * HT"[..], b"P"] {
            // Its prefix read, it waits for more among those the drain's end wakes.
            let took = drain_end_over(prefix, |limit| !limit.idlers().young.is_empty()).await;
            assert!(
                took < STALLED / 2,
                "the drain's end waited {took:?} for {:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    /// How long the drain's end takes over one client that sent `sent` and waits, once
    /// `settled` says the proxy has it (then 100 ms more); the client must then read a clean
    /// end (it closes once the proxy has, as a browser does, which ends the lingering close).
    async fn drain_end_over(sent: &[u8], settled: impl Fn(&Limit) -> bool) -> Duration {
        use tokio::io::AsyncWriteExt;
        let workers = Arc::new(crate::workers::Workers::start(1).unwrap());
        let front = Front::new().await;
        let (drain, limit) = (front.drain.clone(), front.limit.clone());
        let mut client = tokio::net::TcpStream::connect(front.listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(sent).await.unwrap();
        let client = tokio::spawn(async move {
            let mut got = [0u8; 64];
            client.read(&mut got).await.ok()
        });
        let (stop, accepting) = front.accept(&workers);
        let since = Instant::now();
        while !settled(&limit) {
            assert!(since.elapsed() < Duration::from_secs(10), "never settled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.fire();
        accepting.await.unwrap();
        drain.begin();
        let began = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        assert!(crate::app::drain(drain, &limit, deadline).await);
        let took = began.elapsed();
        let read = tokio::time::timeout(Duration::from_secs(10), client);
        assert!(matches!(read.await, Ok(Ok(Some(0)))), "no clean end");
        took
    }

    #[test]
    fn first_bytes_tell_the_protocol() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let table: &[(&[u8], Option<Protocol>)] = &[
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"G", Some(Protocol::Http1)),
            (b"POST /orders HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"PUT", Some(Protocol::Http1)),
            (b"PROPFIND / HTTP/1.1\r\n", Some(Protocol::Http1)),
            // Only a prefix of the preface so far: wait for more.
            (b"P", None),
            (b"PR", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (preface, Some(Protocol::Http2)),
            // The preface followed by the client's SETTINGS frame.
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
                Some(Protocol::Http2),
            ),
            // Close to it is not it.
            (b"PRI * HTTP/1.1\r\n\r\n", Some(Protocol::Http1)),
        ];
        for (bytes, want) in table {
            assert_eq!(sniff(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
