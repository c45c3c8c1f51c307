//! Composition root: loads pages and state, binds the listeners and the control socket, spawns
//! the long-lived tasks, and drains on shutdown. Only this module spawns tasks that outlive a
//! request (the controller asks `Listeners` to, on reload).

use crate::config::Config;
use crate::control::{self, protocol::Request, server::ControlError};
use crate::hold::pages::{Pages, PagesError};
use crate::listener;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::shutdown::{self, Drain, Shutdown, Trigger};
use crate::state::controller::{Controller, ControllerHandle, Rebind, RebindFuture};
use crate::state::snapshot::Parts;
use crate::state::store::{self, StoreError};
use crate::state::StateHandle;
use crate::workers::Workers;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `key`: the config key that names the address, so that an operator knows which line.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A reload refused after closing listeners to free their port, some of which could not
    /// listen again: said, since "the running config stays" would no longer be true.
    #[error("{refused}; and no longer listening on {lost}: taken meanwhile by another program")]
    NotRestored {
        refused: Box<StartError>,
        lost: String,
    },
    #[error("cannot load the pages: {0}")]
    Pages(#[from] PagesError),
    #[error(transparent)]
    State(#[from] StoreError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot start the worker threads: {0}")]
    Workers(#[source] std::io::Error),
    /// Connections to a socket the service manager passed and nothing serves would wait
    /// unanswered in its backlog: a `.socket` unit and the config that disagree.
    #[error(
        "the service manager passed a socket listening on {0}, which no proxy.listen, tls.listen \
         or admin.listen names: name it there (the same address: \"[::]:80\" for ListenStream=80), \
         or remove it from the .socket unit"
    )]
    Unserved(String),
}

/// One bound plaintext listener and the way to stop its accept loop.
struct Bound {
    configured: SocketAddr,
    tls: bool,
    local: SocketAddr,
    stop: Trigger,
    task: JoinHandle<()>,
}

/// The plaintext listeners, keyed by their configured address. A reload binds the new
/// addresses before it is acknowledged and stops accepting on the removed ones; connections
/// already established on a removed listener finish normally.
pub struct Listeners {
    bound: Mutex<Vec<Bound>>,
    /// Set by `stop_all` under the `bound` lock: a reload arriving during shutdown (the
    /// controller still runs then) must not bind listeners again.
    closed: AtomicBool,
    state: StateHandle,
    drain: Arc<Drain>,
    /// Shared by every listener: `proxy.max_connections` counts all client connections.
    limit: Arc<listener::Limit>,
    /// Where the accept loops send the connections.
    workers: Arc<Workers>,
}

impl Listeners {
    /// Binds every wanted address not yet bound, then stops the listeners no longer wanted
    /// and returns once they have closed their sockets. On a bind error nothing changes: the
    /// listeners closed early to free a port (see `take_overlapping`) are bound again.
    /// The new listeners accept once the returned trigger is fired or dropped (`Rebind`).
    async fn apply(&self, plain: &[SocketAddr], tls: &[SocketAddr]) -> Result<Trigger, StartError> {
        let (opening, opened) = shutdown::channel();
        let wanted: Vec<(SocketAddr, bool)> = plain
            .iter()
            .map(|&a| (a, false))
            .chain(tls.iter().map(|&a| (a, true)))
            .collect();
        let mut closed_early = Vec::new();
        loop {
            let err = match self.swap(&wanted, &opened) {
                Ok(gone) => {
                    close(gone).await;
                    return Ok(opening);
                }
                Err(e) => e,
            };
            // Linux refuses a wildcard and a specific address on the same port while both
            // listen, whatever SO_REUSEADDR says: a listener that this reload removes anyway
            // must close before its replacement can bind.
            let early = match &err {
                StartError::Bind { addr, source, .. } if source.kind() == ErrorKind::AddrInUse => {
                    self.take_overlapping(*addr, &wanted)
                }
                _ => Vec::new(),
            };
            if early.is_empty() {
                let lost = self.restore(closed_early);
                if lost.is_empty() {
                    return Err(err);
                }
                let lost: Vec<String> = lost.iter().map(ToString::to_string).collect();
                return Err(StartError::NotRestored {
                    refused: Box::new(err),
                    lost: lost.join(", "),
                });
            }
            closed_early.extend(early.iter().map(|b| (b.configured, b.tls, b.local)));
            close(early).await;
        }
    }

    /// Binds the wanted addresses not yet bound and takes out the listeners no longer wanted,
    /// for the caller to close. On a bind error nothing changes.
    fn swap(
        &self,
        wanted: &[(SocketAddr, bool)],
        opened: &Shutdown,
    ) -> Result<Vec<Bound>, StartError> {
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let mut fresh = Vec::new();
        for &(addr, tls) in wanted {
            if bound.iter().any(|b| (b.configured, b.tls) == (addr, tls))
                || fresh.iter().any(|(a, t, _, _)| (*a, *t) == (addr, tls))
            {
                continue;
            }
            let key = listen_key(tls);
            let l = bind(addr, key)?;
            let local = l
                .local_addr()
                .map_err(|source| StartError::Bind { key, addr, source })?;
            fresh.push((addr, tls, local, l));
        }
        let (keep, gone): (Vec<Bound>, Vec<Bound>) = bound
            .drain(..)
            .partition(|b| wanted.contains(&(b.configured, b.tls)));
        *bound = keep;
        for b in &gone {
            if crate::passed::holds(b.configured) {
                // The service manager keeps it open: the kernel still takes connections there.
                tracing::warn!(
                    addr = %b.local,
                    "no longer listening on {}, a socket the service manager passed: connections \
                     to it wait unanswered until a reload listens there again or the .socket \
                     unit drops it",
                    b.local
                );
            } else {
                tracing::info!(addr = %b.local, "no longer listening on {}", b.local);
            }
        }
        for (configured, tls, local, l) in fresh {
            bound.push(self.serve(configured, tls, local, l, Some(opened.clone())));
        }
        Ok(gone)
    }

    /// Takes out the listeners that are not wanted any more and may hold the port `addr`
    /// needs, for the caller to close. Errs on the side of too many (`127.0.0.2:P` does not
    /// block `127.0.0.1:P`, nor `[::1]:P` `0.0.0.0:P`): the reload closes them anyway.
    fn take_overlapping(&self, addr: SocketAddr, wanted: &[(SocketAddr, bool)]) -> Vec<Bound> {
        let overlaps = |b: &Bound| {
            let (a, l) = (addr.ip().to_canonical(), b.local.ip().to_canonical());
            b.local.port() == addr.port()
                && (a == l || a.is_unspecified() || l.is_unspecified())
                && !wanted.contains(&(b.configured, b.tls))
        };
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        let (early, keep): (Vec<Bound>, Vec<Bound>) = bound.drain(..).partition(overlaps);
        *bound = keep;
        for b in &early {
            let local = b.local;
            tracing::info!(addr = %local, "no longer listening on {local}, to free {addr}");
        }
        early
    }

    /// Listens again where the listeners closed early were, after a reload that failed:
    /// best effort, as another process may have taken the port in between.
    /// Returns the addresses it could not listen on again.
    fn restore(&self, closed: Vec<(SocketAddr, bool, SocketAddr)>) -> Vec<SocketAddr> {
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let mut lost = Vec::new();
        for (configured, tls, local) in closed {
            match bind(local, listen_key(tls)) {
                Ok(l) => bound.push(self.serve(configured, tls, local, l, None)),
                Err(e) => {
                    tracing::error!(addr = %local, "no longer listening on {local}: {e}");
                    lost.push(local);
                }
            }
        }
        lost
    }

    /// Starts the accept loop of a bound listener, once `opened` fires or its trigger is
    /// dropped, if given.
    fn serve(
        &self,
        configured: SocketAddr,
        tls: bool,
        local: SocketAddr,
        l: TcpListener,
        opened: Option<Shutdown>,
    ) -> Bound {
        let kind = if tls { "https" } else { "http" };
        tracing::info!(addr = %local, "listening on {local} ({kind})");
        let (stop, mut stopped) = shutdown::channel();
        let looping = listener::accept_loop(
            l,
            self.state.clone(),
            self.drain.clone(),
            self.limit.clone(),
            self.workers.clone(),
            tls,
            stopped.clone(),
        );
        let task = tokio::spawn(async move {
            if let Some(mut opened) = opened {
                // A stop meanwhile: the loop sees it at once and takes what was queued.
                tokio::select! {
                    _ = opened.fired() => {}
                    _ = stopped.fired() => {}
                }
            }
            looping.await
        });
        Bound {
            configured,
            tls,
            local,
            stop,
            task,
        }
    }

    fn local_addrs(&self, tls: bool) -> Vec<SocketAddr> {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound
            .iter()
            .filter(|b| b.tls == tls)
            .map(|b| b.local)
            .collect()
    }

    /// Stops every accept loop and waits for them.
    async fn stop_all(&self) {
        let all: Vec<Bound> = {
            let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
            self.closed.store(true, Ordering::Relaxed);
            bound.drain(..).collect()
        };
        close(all).await;
    }
}

/// Stops the accept loops and returns once their sockets are closed. The connections they
/// accepted run on the workers and stay open.
async fn close(listeners: Vec<Bound>) {
    for b in &listeners {
        b.stop.fire();
    }
    for b in listeners {
        let _ = b.task.await;
    }
}

impl Rebind for Listeners {
    fn rebind<'a>(&'a self, plain: &'a [SocketAddr], tls: &'a [SocketAddr]) -> RebindFuture<'a> {
        Box::pin(async move { self.apply(plain, tls).await.map_err(|e| e.to_string()) })
    }
}

fn listen_key(tls: bool) -> &'static str {
    if tls {
        "tls.listen"
    } else {
        "proxy.listen"
    }
}

/// The listeners' backlog: connections the kernel completes before the proxy accepts them.
pub(crate) const BACKLOG: u32 = 4096;

/// Binds with a deep backlog: a burst of new connections waits in the kernel, not refused.
/// A socket the service manager passed for `addr` is taken instead (`passed`).
fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { key, addr, source };
    if let Some(passed) = crate::passed::listener(addr) {
        return passed.map_err(err);
    }
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)
}

/// How long a start waits for the state file's lock held by another instance before it is
/// refused as a second proxy on that file. A restart by `kill -TERM` and `run` at once
/// started the next process before the old one had seen its signal (under load, some tens
/// of ms): refused on the lock, it left no proxy at all once the old one had drained. The
/// old one lets the lock go once its controller has stopped, after its listeners and its
/// control socket, and after its `/readyz` says "not ready", so holding the lock also
/// settles the admin listener's question (`holder`).
const PREDECESSOR_LETS_GO: Duration = Duration::from_secs(3);

/// `store::lock`, waiting up to `PREDECESSOR_LETS_GO` for an instance that holds it.
async fn lock_state(path: &std::path::Path) -> Result<store::StateLock, StoreError> {
    let began = tokio::time::Instant::now();
    let mut said = false;
    loop {
        match store::StateLock::take(path) {
            Err(StoreError::InUse { lock, .. }) if began.elapsed() < PREDECESSOR_LETS_GO => {
                if !said {
                    said = true;
                    tracing::info!(
                        "control.state_file {} is held by another intermission ({}): waiting up \
                         to {} s for it to let go, as a predecessor that is stopping does",
                        path.display(),
                        lock.display(),
                        PREDECESSOR_LETS_GO.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            held => return held,
        }
    }
}

/// The admin listener's socket at start: bound, or held by a predecessor still draining.
enum AdminSocket {
    Bound(TcpListener),
    Later(SocketAddr),
}

/// Who holds an address the admin listener could not bind (`holder`).
#[derive(Debug, PartialEq, Eq)]
enum Holder {
    /// A proxy that is draining: its `/readyz` answers `503` "not ready".
    Draining,
    /// Nothing listens there (the connection is refused), or it closed or reset the
    /// connection unanswered: a predecessor in the instant it lets the address go, or exits.
    Leaving,
    /// A program that answers otherwise, or not within a second: it holds the address for
    /// good, and the start is refused as before.
    Other,
}

/// How long a start tries `admin.listen` again while its holder is `Leaving`. A restart
/// (`kill -TERM`, then `run`) met its predecessor exiting between the failed bind and the
/// question to its `/readyz`, found nobody to answer, and was refused with "Address already
/// in use" (h197, h201): the address was free a moment later.
const ADMIN_LETS_GO: Duration = Duration::from_secs(2);

/// The admin listener's socket at start: bound at once, or once a holder that is `Leaving`
/// has let it go (within `ADMIN_LETS_GO`), or left to a predecessor still draining.
async fn admin_socket(addr: SocketAddr) -> Result<AdminSocket, StartError> {
    let began = tokio::time::Instant::now();
    loop {
        let e = match bind(addr, "admin.listen") {
            Ok(listener) => return Ok(AdminSocket::Bound(listener)),
            Err(e) => e,
        };
        let in_use =
            matches!(&e, StartError::Bind { source, .. } if source.kind() == ErrorKind::AddrInUse);
        if !in_use {
            return Err(e);
        }
        match holder(addr, false).await {
            // A restart that starts this proxy as its predecessor drains (whose admin
            // listener says "not ready" until it exits): refused, the restart left no proxy
            // at all once that drain ended.
            Holder::Draining => {
                tracing::warn!(
                    %addr,
                    "admin.listen {addr} is held by a proxy still draining: /metrics, /healthz \
                     and /readyz are served here once it lets it go (at once, or at its exit \
                     for a version before 2026-12)"
                );
                return Ok(AdminSocket::Later(addr));
            }
            Holder::Leaving if began.elapsed() < ADMIN_LETS_GO => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Holder::Leaving | Holder::Other => return Err(e),
        }
    }
}

/// Who holds `addr`, which the admin listener could not bind: a proxy draining there answers
/// `/readyz` with `503` "not ready". `successor`: ask it to let the address go now (see
/// `admin::SUCCESSOR_HEADER`), once this proxy is ready to answer there; one that does not
/// know the header answers all the same.
async fn holder(addr: SocketAddr, successor: bool) -> Holder {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        let header = if successor {
            format!("{}: 1\r\n", crate::admin::SUCCESSOR_HEADER)
        } else {
            String::new()
        };
        let ask = format!(
            "GET /readyz HTTP/1.1\r\nHost: intermission\r\n{header}Connection: close\r\n\r\n"
        );
        sock.write_all(ask.as_bytes()).await?;
        let mut answer = Vec::new();
        sock.take(4096).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(1), ask).await {
        Ok(Ok(answer))
            if answer.starts_with(b"HTTP/1.1 503 ") && answer.ends_with(b"not ready") =>
        {
            Holder::Draining
        }
        Ok(Ok(answer)) if answer.is_empty() => Holder::Leaving,
        Ok(Err(e))
            if matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
            ) =>
        {
            Holder::Leaving
        }
        _ => Holder::Other,
    }
}

/// Binds `addr` once its holder (a predecessor ending its drain, `shutdown_timeout` at most)
/// has let it go.
async fn bind_when_free(addr: SocketAddr) -> TcpListener {
    let mut said = false;
    loop {
        match bind(addr, "admin.listen") {
            Ok(l) => return l,
            Err(e) => {
                let in_use = matches!(&e, StartError::Bind { source, .. } if source.kind() == ErrorKind::AddrInUse);
                if !in_use && !said {
                    tracing::warn!("{e}; trying again");
                    said = true;
                }
            }
        }
        // Often: asked to, the predecessor lets the address go at once, and probes meet a
        // refused connection until this binds it.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A started proxy: its bound addresses, and the handles to reload or stop it.
pub struct Running {
    admin_addr: Option<SocketAddr>,
    state: StateHandle,
    controller: ControllerHandle,
    listeners: Arc<Listeners>,
    stop_control: Trigger,
    /// Told at each SIGHUP to find the control socket at its path again.
    recheck_control: Arc<tokio::sync::Notify>,
    background: Vec<JoinHandle<()>>,
    drain: Arc<Drain>,
    /// Set when shutdown starts: `/readyz` answers 503 from then on, so that a load balancer
    /// stops sending while the open connections drain.
    draining: Arc<AtomicBool>,
    /// The admin listener outlives the drain (it is stopped last), to say so.
    admin: Option<(Trigger, JoinHandle<()>)>,
    /// Kept until the drain is over: the connections being drained run on them.
    workers: Arc<Workers>,
    /// The webhooks' queues, given their time to be delivered at the stop (`finish`).
    notifier: Notifier,
    /// The state file's lock (`store::lock`), let go once the controller has stopped, so that
    /// a new instance started during the drain (its control socket is gone already) can take
    /// the state file over, as it takes the socket. The controller takes it again when its
    /// file was removed (`StateLock::renew`).
    state_lock: Arc<store::StateLock>,
}

/// Loads pages and state, binds every listener and the control socket, and starts serving.
/// Anything that would make the proxy answer wrongly stops the start with an error.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let pages = Pages::load(&config.maintenance)?;
    // Found now, not at the first `ctl on` of an incident, refused as not saved.
    store::probe(&config.control.state_file)?;
    // Held before it is read: a proxy started while its predecessor drains (whose controller
    // may still save a change until it lets the lock go) read the state first, and could
    // take the lock a moment later and run on a state older than the file.
    let state_lock = Arc::new(lock_state(&config.control.state_file).await?);
    let persisted = store::load(&config.control.state_file)?;
    if let Some(p) = &persisted.planned {
        tracing::warn!(since = %p.since.rfc3339(), by = %p.by, "maintenance is on (restored from the state file)");
    }
    let control = control::server::Bound::new(&config.control.socket, config.control.socket_mode)?;
    let socket_path = config.control.socket.clone();
    // A start that fails from here on leaves no socket behind for the next one to find.
    let unbind = Unbind(Some(socket_path.clone()));
    let listen = config.proxy.listen.clone();
    let listen_tls = config.tls.listen.clone();
    let threads = config.proxy.threads;
    let metrics = Arc::new(Metrics::new());
    let notifier = Notifier::start(config.notify.clone(), metrics.clone());
    let kept_notifier = notifier.clone();
    let admin_listen = config.admin.listen;
    let admin = match config.admin.listen {
        Some(addr) => Some(admin_socket(addr).await?),
        None => None,
    };
    let (parts, certificates) =
        Parts::checked(Arc::new(config), Arc::new(pages), None, metrics.clone())?;
    for warning in parts.config.load_warnings(&parts.pages, certificates) {
        tracing::warn!("{warning}");
    }
    let (mut controller, handle, state) =
        Controller::new(parts, persisted, notifier, crate::time::Clock::system());
    let drain = Arc::new(Drain::default());
    let workers =
        Arc::new(Workers::start(crate::workers::count(threads)).map_err(StartError::Workers)?);
    let listeners = Arc::new(Listeners {
        bound: Mutex::new(Vec::new()),
        closed: AtomicBool::new(false),
        state: state.clone(),
        drain: drain.clone(),
        limit: Arc::new(listener::Limit::new(
            metrics.clients(),
            metrics.parked(),
            drain.clone(),
        )),
        workers: workers.clone(),
    });
    if let Err(e) = listeners.apply(&listen, &listen_tls).await {
        listeners.stop_all().await;
        return Err(e);
    }
    let served: Vec<SocketAddr> = (listen.iter().chain(&listen_tls).copied())
        .chain(admin_listen)
        .collect();
    let unserved = crate::passed::unserved(&served);
    if !unserved.is_empty() {
        listeners.stop_all().await;
        let unserved: Vec<String> = unserved.iter().map(ToString::to_string).collect();
        return Err(StartError::Unserved(unserved.join(", ")));
    }
    unbind.keep();
    controller.set_rebind(listeners.clone());
    controller.set_lock(state_lock.clone());
    let (stop_control, control_stopped) = shutdown::channel();
    controller.stop_on(control_stopped.clone());
    let recheck_control = Arc::new(tokio::sync::Notify::new());
    tracing::info!(socket = %socket_path.display(), "control socket ready");
    let background = vec![
        tokio::spawn(controller.run()),
        tokio::spawn(control::server::serve(
            control,
            handle.clone(),
            control_stopped,
            recheck_control.clone(),
            metrics.accept_failures(crate::metrics::Accepting::Control),
        )),
    ];
    let admin_addr = admin.as_ref().and_then(|a| match a {
        AdminSocket::Bound(l) => l.local_addr().ok(),
        AdminSocket::Later(addr) => Some(*addr),
    });
    let draining = Arc::new(AtomicBool::new(false));
    let admin = admin.map(|a| {
        // Ready from here (listeners bound, config and state loaded) until shutdown starts.
        let flag = draining.clone();
        let ready: crate::admin::Ready = Arc::new(move || !flag.load(Ordering::Relaxed));
        let (stop, mut stopped) = shutdown::channel();
        let task = tokio::spawn(async move {
            let l = match a {
                AdminSocket::Bound(l) => l,
                AdminSocket::Later(addr) => tokio::select! {
                    // Asked only now, when this proxy serves: the address is never let go
                    // for a start that fails, nor refuses probes while this one starts.
                    l = async {
                        holder(addr, true).await;
                        bind_when_free(addr).await
                    } => l,
                    () = stopped.fired() => return,
                },
            };
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "admin listener on {addr} (/metrics, /healthz, /readyz)");
            }
            crate::admin::serve(l, metrics, ready, stopped).await;
        });
        (stop, task)
    });
    Ok(Running {
        admin_addr,
        state,
        controller: handle,
        listeners,
        stop_control,
        recheck_control,
        background,
        drain,
        draining,
        admin,
        workers,
        notifier: kept_notifier,
        state_lock,
    })
}

impl Running {
    /// The addresses the plaintext listeners are bound to now.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.local_addrs(false)
    }

    /// Where the admin listener is bound, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The addresses the TLS listeners are bound to now.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.local_addrs(true)
    }

    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    pub fn controller(&self) -> &ControllerHandle {
        &self.controller
    }

    /// Asks for the config file and pages to be read again (as `ctl reload` does), and for
    /// the control socket to be bound again if its path was removed, and
    /// returns at once: the signal loop must go on hearing SIGTERM while the files are read.
    /// On error the running config stays and the controller logs the error.
    pub fn reload(&self) {
        self.recheck_control.notify_one();
        let controller = self.controller.clone();
        tokio::spawn(async move { controller.request(Request::Reload, "SIGHUP".into()).await });
    }

    /// The webhooks, for a stop cut short by a second signal to count and log what they
    /// still hold (`Notifier::finish`).
    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    /// Stops accepting, lets in-flight requests finish for up to `shutdown_timeout`, and
    /// the webhook events still queued be delivered meanwhile for up to `NOTIFY_AT_STOP`
    /// (or `shutdown_timeout` if shorter); returns whether every connection finished in time.
    pub async fn shutdown(self) -> bool {
        self.stop().await.cut == 0
    }

    /// `shutdown`, saying how many connections the drain had and how many it cut.
    async fn stop(self) -> Stopped {
        let began = tokio::time::Instant::now();
        let grace = self.state.load().config.proxy.shutdown_timeout;
        // Listeners first: once `/readyz` says not ready, a new connection is refused (the
        // other order let a client connect in between).
        self.listeners.stop_all().await;
        self.draining.store(true, Ordering::Relaxed);
        // The drain begins now, not once the controller below has ended: an answer given in
        // between, to a client on a kept connection, went without `Connection: close`, and
        // the connection was closed under it as it sent its next request.
        self.drain.begin();
        // The controller finishes the command in hand and refuses those after it, and the
        // control connections write their answers, before anything else stops: aborted
        // mid-write, a change was saved and in force after the restart while `ctl` was told
        // "refused". A state write that outlives the grace period is given up (its `ctl`
        // told that nobody knows whether it took effect), as a request still in flight is.
        // The controller holds the listener set (and with it the drain handle): end it first.
        self.stop_control.fire();
        let deadline = tokio::time::Instant::now() + grace;
        for mut task in self.background {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(
                    "shutdown_timeout reached with a control command still in hand; it is given up"
                );
                task.abort();
                let _ = task.await;
            }
        }
        self.state_lock.release();
        let limit = self.listeners.limit.clone();
        drop(self.listeners);
        // The controller has ended: no more events will come. Beside the drain, bounded by
        // it: past `shutdown_timeout` only by the second a worker that is somehow not polled
        // is given to count what it held (`notify::GIVE_UP_WAIT`).
        let notified_by = deadline.min(began + NOTIFY_AT_STOP);
        let open = self.drain.count();
        let counted = self.drain.clone();
        let (drained, ()) = tokio::join!(
            drain(self.drain, &limit, deadline),
            self.notifier.finish(notified_by),
        );
        // Read at once, before the workers below drop what they still run.
        let cut = if drained { 0 } else { counted.count() };
        // The admin listener's own drain (a `/metrics` answer still being written) ends at
        // `shutdown_timeout` too: begun only now and given its `DRAIN_TIMEOUT` in full, a
        // scraper that read slowly held the stop 5 s past it. What it leaves open closes
        // with the runtime, a moment later.
        if let Some((stop, mut task)) = self.admin {
            stop.fire();
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::debug!("admin: connections still open at shutdown_timeout; closing them");
                task.abort();
            }
        }
        // Only now: a worker's runtime ends with the last handle on it, and every
        // connection still on it (parked ones) with it.
        drop(self.workers);
        Stopped { open, cut }
    }
}

/// What a stop's drain had to do, for its last line.
struct Stopped {
    /// The connections being served when the drain began (parked ones are not counted).
    open: usize,
    /// Those still open at `shutdown_timeout`, closed unfinished.
    cut: usize,
}

/// How a stop went, for its last line (`Stop::say`).
pub struct Stop {
    signalled: std::time::Instant,
    open: usize,
    cut: usize,
    /// What ended the drain early: `shutdown_timeout`, or a second signal.
    why: String,
}

impl Stop {
    /// The last line of a stop, whatever it had to drain, written once the connections are
    /// gone (their access lines come as they close): without it a log that ended at "SIGTERM
    /// received" (nothing to drain, so no `draining for up to` either) could not be told from
    /// one whose process died, to an operator reading the journal after a restart.
    pub fn say(&self) {
        let (open, cut, why) = (self.open, self.cut, &self.why);
        let took = crate::time::for_people(self.signalled.elapsed());
        let s = |n: usize| if n == 1 { "" } else { "s" };
        if cut > 0 {
            tracing::warn!(
                connections = open,
                cut,
                "stopped after {took}: {cut} connection{} still open closed unfinished ({why})",
                s(cut)
            );
        } else if open > 0 {
            tracing::info!(
                connections = open,
                cut,
                "stopped after {took}: {open} connection{} drained, none cut",
                s(open)
            );
        } else {
            tracing::info!(
                connections = open,
                cut,
                "stopped after {took}: no connection to drain"
            );
        }
    }
}

/// How long a stop gives the webhook events still queued to be delivered, at most: a receiver
/// that answers within seconds gets the last changes (the return to normal above all), and
/// one that hangs holds the stop no longer than this, well within systemd's stop timeout
/// (`TimeoutStopSec`, 90 s by default, 45 s in the README's unit) when `shutdown_timeout`
/// leaves the drain longer.
const NOTIFY_AT_STOP: Duration = Duration::from_secs(10);

/// How long before the drain's end a gRPC call still streaming is ended with its status
/// (`shutdown::Drain::ending`): time for the status to be written and the connection, its
/// last stream ended, to close as its client is told to, rather than by the process's exit.
const GRPC_END_AHEAD: Duration = Duration::from_millis(250);

/// Waits for the connections being served until `deadline`; then, once they have all ended,
/// closes the idle (parked) ones with a lingering close and waits for those closes, and for
/// any request one of them was woken by, until `deadline` still: dropped with the process, a
/// parked connection a client had just sent a request on was reset, where the lingering close
/// lets it read a clean end (and send the request again, to the next instance). Whether every
/// connection being served finished in time.
pub(crate) async fn drain(
    drain: Arc<Drain>,
    limit: &listener::Limit,
    deadline: tokio::time::Instant,
) -> bool {
    let open = drain.count();
    if open > 0 {
        let grace = deadline.saturating_duration_since(tokio::time::Instant::now());
        tracing::info!(
            connections = open,
            "draining for up to {}",
            crate::time::for_people(grace)
        );
    }
    // The gRPC calls still streaming near the end are ended with `UNAVAILABLE` where a
    // message ends (`Body::end_grpc_at`), with time left to write that and close.
    let near = deadline
        .checked_sub(GRPC_END_AHEAD)
        .unwrap_or(deadline)
        .max(tokio::time::Instant::now());
    let shut = drain.shutdown();
    tokio::pin!(shut);
    let ended = tokio::select! {
        () = &mut shut => true,
        () = tokio::time::sleep_until(near) => {
            drain.end_near();
            tokio::time::timeout_at(deadline, &mut shut).await.is_ok()
        }
    };
    if !ended {
        tracing::warn!("shutdown_timeout reached; closing the connections still open");
        return false;
    }
    // The guards just seen gone were let go after what counts the connections that had them
    // from then on (`Limit::arriving`): read after them (the guard count's read is Relaxed).
    std::sync::atomic::fence(Ordering::Acquire);
    limit.close_idle();
    // Each connection picked, or not yet seen (accepted and not yet run by its worker, or
    // spawned to park and not yet run: `Limit::starting`), takes its drain guard on its
    // worker's thread, or goes among the idle ones (picked at once now), before it stops
    // counting there: only then has every one a guard the drain's end can wait for. Again
    // until all is settled at once: a guard let go for a park counts it as arriving first.
    loop {
        while limit.unsettled() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if tokio::time::timeout_at(deadline, drain.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("shutdown_timeout reached with idle connections still closing");
            break;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        if !limit.unsettled() || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    true
}

/// Removes the control socket when dropped, unless kept: the start failed after binding it.
struct Unbind(Option<std::path::PathBuf>);

impl Unbind {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Unbind {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs the proxy until SIGTERM or SIGINT, reloading on SIGHUP, and says how the stop went,
/// for the binary to log once the runtime, and the connections on it, are gone.
pub async fn run_until_signal(config: Config) -> Result<Stop, RunError> {
    // Handlers first: a signal during start must not kill the process. A SIGTERM then stops
    // it as soon as it has started.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut terminate = shutdown::Terminate::new()?;
    let running = start(config).await?;
    let name = loop {
        tokio::select! {
            sig = terminate.recv() => break sig,
            _ = hup.recv() => running.reload(),
        }
    };
    tracing::info!("{name} received; shutting down (send it again to stop at once)");
    let signalled = std::time::Instant::now();
    let notifier = running.notifier();
    let counted = running.drain.clone();
    let open = counted.count();
    // A second signal ends the drain: an operator who cannot wait out `shutdown_timeout`
    // (a tunnel open for minutes, a request that hangs) is not left with SIGKILL, which
    // would leave the control socket and the state lock behind. Dropping the shutdown
    // drops what it owns (the socket unbound, the lock let go); the process then exits and
    // the connections still open are closed with it, as nginx's fast stop does.
    let shutdown = running.stop();
    tokio::pin!(shutdown);
    let stop = loop {
        tokio::select! {
            done = &mut shutdown => {
                break Stop {
                    signalled,
                    open: done.open,
                    cut: done.cut,
                    why: "shutdown_timeout reached".to_owned(),
                };
            }
            sig = terminate.recv() => {
                // "again" only for the same signal: a Ctrl-C after a `kill -TERM` is not one.
                let when = if sig == name { "again" } else { "while stopping" };
                tracing::warn!("{sig} received {when}; stopping now, closing the connections still open");
                // What the webhooks still hold is counted and logged as not delivered, not
                // lost without a word.
                notifier.finish(tokio::time::Instant::now()).await;
                // Counted before the drain's future, which holds the connections' runtimes,
                // is dropped below with them.
                let cut = counted.count();
                break Stop {
                    signalled,
                    open: open.max(cut),
                    cut,
                    why: format!("{sig} received"),
                };
            }
            // A certbot hook or a `systemctl reload` during the stop: said, not silently
            // dropped (the next process reads the config anyway).
            _ = hup.recv() => tracing::warn!("SIGHUP received while stopping: no reload"),
        }
    };
    Ok(stop)
}

/// What stops the binary.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[from] std::io::Error),
}
