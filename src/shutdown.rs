//! The shutdown signals: the one set once and seen by every accept loop and the app, and the
//! drain that asks every open client connection to finish.

use crate::listener::{Closable, Slot};
use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub struct Trigger(watch::Sender<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Whether shutdown has been fired already.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has been fired (at once if it already was).
    pub async fn fired(&mut self) {
        // An error means the trigger is gone, which only happens when the app is done.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

/// The SIGTERM and SIGINT handlers, installed at once by `new`. Installed before the proxy
/// starts, not when first waited on after it: a signal during start is then kept for a
/// graceful stop, where the default action would kill the process and leave its control
/// socket behind. Kept through the drain, so that a second signal can cut it short.
pub struct Terminate {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Terminate {
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Terminate {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT, named.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The open client connections, and the request that they finish: each connection holds a
/// `Shutdown` from `guard()` while it is served (a parked one holds none: it has nothing in
/// flight); `Drain::shutdown` fires it, so that every one
/// closes once its in-flight requests are done, and waits until all have. (hyper-util's
/// graceful watcher does the same but cannot watch an HTTP/1 connection with upgrades.)
/// A tunnel (an upgraded connection, `forward::upgrade`) holds one too, until it closes.
/// A WebSocket is closed with a close frame each way (`forward::websocket`) and ends once its
/// ends have answered; any other tunnel carries bytes that are not HTTP and cannot be asked
/// to finish. A drain waits for each, as nginx does, up to `shutdown_timeout`. A forwarded
/// stream of server-sent events is ended at its next event boundary (`forward::events`).
/// The second trigger fires with the first, for what only watches for the drain (`watch`).
/// The third fires just before `shutdown_timeout` ends the drain (`ending`).
pub struct Drain(Trigger, Trigger, Trigger);

impl Default for Drain {
    fn default() -> Self {
        Drain(channel().0, channel().0, channel().0)
    }
}

impl Drain {
    pub fn guard(&self) -> Shutdown {
        Shutdown(self.0 .0.subscribe())
    }

    /// Resolves (`Shutdown::fired`) once a drain begins, for what lives inside a connection
    /// that holds a `guard` already (a stream of server-sent events, `forward::events`): not
    /// counted among the connections, nor waited for. A guard of its own counted each such
    /// stream twice in `draining for up to … connections=`.
    pub fn watch(&self) -> Shutdown {
        Shutdown(self.1 .0.subscribe())
    }

    /// Resolves just before the drain's `shutdown_timeout` closes what is still open: a
    /// gRPC call still streaming then is ended with its status (`Body::end_grpc_at`), where
    /// its connection's close would reach its client as a broken stream (tonic: `Unknown`).
    pub fn ending(&self) -> Shutdown {
        Shutdown(self.2 .0.subscribe())
    }

    /// Fires `ending`.
    pub fn end_near(&self) {
        self.2.fire();
    }

    /// Whether a drain has been asked for.
    pub fn started(&self) -> bool {
        *self.0 .0.borrow()
    }

    /// How many connections are being served (parked ones are not counted).
    pub fn count(&self) -> usize {
        self.0 .0.receiver_count()
    }

    /// Asks every connection to finish, without waiting: at once when the listeners have
    /// stopped, so that an answer given meanwhile says `Connection: close` (`started`).
    pub fn begin(&self) {
        self.0.fire();
        self.1.fire();
    }

    /// Asks every connection to finish, and resolves once none is open.
    pub async fn shutdown(&self) {
        self.begin();
        self.0 .0.closed().await;
    }
}

/// As `until_drained`, and also once no request has come for between `idle` and twice that:
/// `requests` is counted by each, and a tick compares it instead of each request reading
/// the clock; and once `picked` resolves. Told to go, it is given `PICKED_GRACE` to close as
/// `graceful` asks, then dropped once `settled` (nothing in flight on it): hyper's HTTP/2
/// graceful shutdown waits for the client's answer to its PING, and a client that never
/// answers held its slot, over `max_connections`, until the keep-alive pings gave up on it,
/// and a drain until `shutdown_timeout`.
pub async fn until_idle<C, E>(
    conn: C,
    mut guard: Shutdown,
    requests: &std::sync::atomic::AtomicU64,
    idle: std::time::Duration,
    picked: impl std::future::Future<Output = ()>,
    settled: impl Fn() -> bool,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    use std::sync::atomic::Ordering;
    tokio::pin!(conn);
    tokio::pin!(picked);
    let start = tokio::time::Instant::now() + idle;
    let mut tick = tokio::time::interval_at(start, idle.max(std::time::Duration::from_millis(1)));
    // A busy moment must not fire two ticks back to back with no request between them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = requests.load(Ordering::Relaxed);
    let for_room = loop {
        tokio::select! {
            // The connection first, so that `picked` sees what it has just done.
            biased;
            out = &mut conn => return out,
            () = guard.fired() => break false,
            _ = tick.tick() => {
                let now = requests.load(Ordering::Relaxed);
                if now == seen {
                    tracing::debug!("connection idle for header_read_timeout; closing it");
                    break false;
                }
                seen = now;
            }
            () = &mut picked => {
                tracing::debug!("idle connection picked to make room for a new one; closing it");
                break true;
            }
        }
    };
    graceful(conn.as_mut());
    // Told to go however (picked, idle, or a drain), it is given `PICKED_GRACE` to close as
    // asked, then dropped once nothing is in flight on it: a client that never answers the
    // PING (gone without a word, a phone out of reach; or hostile) otherwise held it until the
    // keep-alive pings gave up on it, up to 80 s, and held every drain it was in for the whole
    // of `shutdown_timeout`. nginx closes an idle HTTP/2 connection at once on a graceful stop.
    let mut deadline = tokio::time::Instant::now() + PICKED_GRACE;
    loop {
        tokio::select! {
            biased;
            out = &mut conn => return out,
            () = tokio::time::sleep_until(deadline) => {}
        }
        // A stream the client opened as it was told is served to its end.
        if settled() {
            match for_room {
                true => {
                    tracing::debug!("connection picked to make room did not close in time; dropped")
                }
                false => tracing::debug!("connection told to go did not close in time; dropped"),
            }
            return Ok(());
        }
        deadline += PICKED_GRACE;
    }
}

/// How long a connection picked to make room has to close as asked (a client's round trip,
/// with room to spare) before it is dropped.
pub const PICKED_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `conn` to its end; once a drain is asked for, or `picked` resolves, `graceful` tells
/// it to finish its in-flight requests and close, and it is run until it has. Picked with a
/// head stalled (`picked` says true), it is dropped at once (`None`): it has nothing in
/// flight, and hyper would wait for a first request's head to end before closing.
pub async fn until_drained<C, E>(
    conn: &mut C,
    mut guard: Shutdown,
    picked: impl std::future::Future<Output = bool>,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
) -> Option<Result<(), E>>
where
    C: std::future::Future<Output = Result<(), E>> + Unpin,
{
    tokio::pin!(picked);
    tokio::select! {
        // The connection first, so that `picked` sees what it has just done.
        biased;
        out = &mut *conn => return Some(out),
        () = guard.fired() => {}
        stalled = &mut picked => {
            tracing::debug!("idle connection picked to make room for a new one; closing it");
            if stalled {
                return None;
            }
        }
    }
    graceful(std::pin::Pin::new(&mut *conn));
    Some(conn.await)
}

/// How long a lingering close (`linger`) waits for the client's next bytes before it closes:
/// what a request sent as the proxy's `FIN` was on its way takes to arrive (a round trip, with
/// room to spare), after which a client that neither sends nor closes has nothing in flight.
pub const LINGER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most a lingering close lasts, however the client keeps sending (nginx:
/// `lingering_time`, 30 s; a drain's is bounded by `shutdown_timeout` besides).
pub const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// `linger`'s close, awaited, for a connection that is no `TcpStream` of its own (one hyper
/// handed over, TLS or not): shut (over TLS, `close_notify` first), then read and thrown away
/// as `linger` reads it.
pub async fn linger_io<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut io: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let end = tokio::time::Instant::now() + LINGER_TIME;
    if !matches!(
        tokio::time::timeout_at(end, io.shutdown()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let mut room = [0u8; 4096];
    loop {
        let quiet = (tokio::time::Instant::now() + LINGER_TIMEOUT).min(end);
        match tokio::time::timeout_at(quiet, io.read(&mut room)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Closes a client's connection as nginx's lingering close does, in a task of its own: its
/// sending side is shut (a `FIN` after what is queued), and what the client still sends is
/// read and thrown away until it closes its side, or sends nothing for `LINGER_TIMEOUT`, or
/// `LINGER_TIME` has passed. A socket closed with unread bytes in its receive buffer (requests
/// pipelined behind the last answer, or one sent as the close came, or the rest of a body the
/// answer did not wait for) makes the kernel send a reset, which throws away what the client
/// has not read yet, the last answer with it; and bytes that arrive once it is closed are
/// answered with a reset too.
///
/// `guard` is a drain guard, kept until the close is done: a drain (and the process's exit)
/// waits for it, up to `shutdown_timeout`. `slot`, the connection's place in
/// `max_connections`, is kept too when given (a close outside a drain), so that lingering
/// connections are bounded with the others and cannot be made to hold descriptors beyond
/// it; meanwhile the connection is idle, and picked to make room for a new one it closes at
/// once. A client that closed already, with nothing left unread, is closed at once.
pub fn linger(sock: tokio::net::TcpStream, guard: Shutdown, slot: Option<Slot>) {
    if !discard(&sock) {
        return;
    }
    tokio::spawn(lingering(sock, guard, slot));
}

async fn lingering(mut sock: tokio::net::TcpStream, _guard: Shutdown, slot: Option<Slot>) {
    use tokio::io::AsyncWriteExt;
    // The system call itself, which does not wait: the FIN goes once what is queued has.
    if sock.shutdown().await.is_err() {
        return;
    }
    let mut room = slot.map(|slot| {
        let closable = Closable::new(slot.limit().clone());
        (slot, closable)
    });
    let end = tokio::time::Instant::now() + LINGER_TIME;
    let quiet = tokio::time::sleep(LINGER_TIMEOUT.min(LINGER_TIME));
    tokio::pin!(quiet);
    loop {
        let more = std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(ready) = sock.poll_read_ready(cx) {
                return std::task::Poll::Ready(ready.is_ok());
            }
            if let Some((_, closable)) = &room {
                if closable.poll_picked(cx) {
                    // Picked by the drain's end, which closes the idle connections: this one
                    // is closing already, and the drain's guard bounds it.
                    if !closable.limit().ending() {
                        return std::task::Poll::Ready(false);
                    }
                    room = None;
                }
            }
            std::future::Future::poll(quiet.as_mut(), cx).map(|()| false)
        })
        .await;
        if !more || !discard(&sock) {
            return;
        }
        let now = tokio::time::Instant::now();
        quiet.as_mut().reset(end.min(now + LINGER_TIMEOUT));
    }
}

/// Reads what `sock` holds and throws it away; false once the client has closed (or the
/// socket failed). No buffer is kept across the wait for readiness: a drain's end lingers on
/// every idle connection at once (10,000 of them are 160 MiB at 16 KiB each).
fn discard(sock: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 2048];
    // A few reads a wake, so that a client that never stops sending leaves the worker to
    // others; `LINGER_TIME` ends it.
    for _ in 0..8 {
        match sock.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A lingering close keeps no buffer while it waits: a drain's end starts one for every
    /// idle connection at once. What the client sends is read (its writes go through), it
    /// gets a clean end, and the drain guard is let go.
    #[tokio::test]
    async fn a_lingering_close_is_small_and_ends_when_the_client_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let drain = Drain::default();
        let closing = lingering(server, drain.guard(), None);
        let size = std::mem::size_of_val(&closing);
        assert!(size < 1024, "{size} bytes");
        let task = tokio::spawn(closing);
        client.write_all(&[b'x'; 100_000]).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest));
        assert!(matches!(read.await, Ok(Ok(0))), "no clean end");
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(ended.is_ok(), "still lingering past LINGER_TIME");
        assert_eq!(drain.count(), 0, "the drain guard was kept");
    }
}
