//! The control socket inside the proxy: a Unix socket, JSON lines, many requests per
//! connection, every change handed to the controller.
//!
//! Lines are capped before they are buffered whole, so a client cannot make the proxy
//! allocate without bound; a bad request gets an error and the connection stays usable.
//! Connections are capped too, and one that says nothing for a minute is closed, as HAProxy's
//! CLI has `maxconn` and `timeout cli`. At the cap, a new connection takes the place of the one
//! that has waited longest for its next request, as the HTTP listener makes room: leaked or kept
//! clients (a script that never closes its `socat`, an exporter's pool) cannot hold the
//! operator's way in shut, even for the minute; nor can changes held by a state file save
//! that does not return (a hung disk), whose connections make room after `STUCK` too.

use super::protocol::{parse_request, ErrorBody, Request, Response, MAX_LINE};
use crate::shutdown::Shutdown;
use crate::state::controller::{command_name, ControllerHandle, Handed};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: another intermission is already listening there", .0.display())]
    InUse(PathBuf),
    #[error("control socket {}: the path exists and is not a socket; move it away or set control.socket", .0.display())]
    NotASocket(PathBuf),
    /// A socket is there that this proxy cannot connect to (another user's, with a mode that
    /// keeps this one out; a datagram socket): something may be listening, so it is not taken.
    #[error("control socket {}: a socket is there that this proxy cannot connect to ({source}), so whether another intermission (another user's, say) is listening there cannot be told; it is left alone: stop what listens there, remove the file if nothing does, or set control.socket", path.display())]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Found by `check`, run as the proxy's user (systemd's `ExecStartPre`), rather than by
    /// the start it would stop.
    #[error("control.socket: cannot make the control socket {} in its folder ({source}), so the proxy would not start; let the proxy's user write there, or name another path", path.display())]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The bound control socket, and what is needed to find it again at its path.
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
    mode: u32,
    /// The socket file's device and inode, to tell ours from one put at the path since.
    id: Option<(u64, u64)>,
}

/// The device and inode of what is at `path` now, if anything.
fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
}

impl Bound {
    /// Binds the socket at `path` with permissions `mode` (see `bind`).
    pub fn new(path: &Path, mode: u32) -> Result<Bound, ControlError> {
        let listener = bind(path, mode)?;
        Ok(Bound {
            listener,
            path: path.to_path_buf(),
            mode,
            id: file_id(path).ok(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Binds again when the socket's path no longer leads to this socket: removed by hand
    /// or by a cleaner of `/tmp` or `/run`, `ctl` cannot reach the proxy, and a restart to
    /// get it back would refuse clients while it drains. Something else put at the path is
    /// left alone, and said.
    fn find_again(&mut self) {
        match file_id(&self.path) {
            Ok(id) if Some(id) == self.id => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match bind(&self.path, self.mode) {
                    Ok(listener) => {
                        self.listener = listener;
                        self.id = file_id(&self.path).ok();
                        tracing::warn!(
                            socket = %self.path.display(),
                            "the control socket had been removed; bound again"
                        );
                    }
                    // Its folder gone too (a cleaner of /run or /tmp): the bind's own error,
                    // "No such file or directory", said neither which nor what to do. Said at
                    // each SIGHUP, whose reload takes meanwhile (the config's check of the
                    // socket's folder spares the running proxy's own).
                    Err(e) => match self
                        .path
                        .parent()
                        .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
                    {
                        Some(folder) => tracing::error!(
                            socket = %self.path.display(),
                            "the control socket's folder {} does not exist (removed since the start?): ctl cannot reach this proxy, which runs on, and a start would refuse this control.socket; make the folder again, writable by the proxy's user (`install -d -m 0755 -o USER {}`), then `kill -HUP` the proxy, which binds the socket there again",
                            folder.display(),
                            folder.display()
                        ),
                        None => tracing::error!(
                            "the control socket had been removed, and cannot be bound again: {e}"
                        ),
                    },
                }
            }
            Err(e) => tracing::error!(
                socket = %self.path.display(),
                "the control socket cannot be checked: {e}"
            ),
            Ok(_) => tracing::error!(
                socket = %self.path.display(),
                "something else is at the control socket's path now; ctl reaches it, not this proxy"
            ),
        }
    }
}

/// Removes the socket file, if it is still this one, however the server ends: at the stop,
/// or dropped with the runtime when a second signal cut the shutdown short before the
/// server was told to stop (the file was left behind then, for the next start to replace).
impl Drop for Bound {
    fn drop(&mut self) {
        // Compared while the socket is still open (the listener is a field, dropped after
        // this), so that its inode cannot have been given to another file in between.
        if self.id.is_some() && file_id(&self.path).ok() == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the socket at `path` with permissions `mode`, replacing a stale socket left by a
/// crash but never a live one or a file that is not a socket.
fn bind(path: &Path, mode: u32) -> Result<UnixListener, ControlError> {
    // Each try finds the path free, or frees it of a stale socket, then places the socket
    // there unless something took it in between: another proxy starting on the same socket
    // at the same moment, whose socket is then found live, and the start refused.
    let mut tries = 0;
    loop {
        tries += 1;
        match bind_once(path, mode) {
            Err(Placed::Taken(e)) if tries < 3 => {
                tracing::debug!("the control socket's path was taken while binding ({e}); again")
            }
            Err(Placed::Taken(source)) => {
                return Err(ControlError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(Placed::Failed(e)) => return Err(e),
            Ok(listener) => return Ok(listener),
        }
    }
}

/// Why one try of `bind` did not bind.
enum Placed {
    /// Something was put at the path between its check and the placing of the socket.
    Taken(std::io::Error),
    Failed(ControlError),
}

fn bind_once(path: &Path, mode: u32) -> Result<UnixListener, Placed> {
    let io = |source| {
        Placed::Failed(ControlError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Placed::Failed(ControlError::NotASocket(path.to_path_buf())));
        }
        // Stale only when nothing listens: any other failure to connect (this user kept out
        // of another user's live socket, a socket of another type) says nothing of that, and
        // removing the file took the control socket from a running proxy.
        match knock(path) {
            // A full queue is a proxy that is there but stalled (stopped, starved): in use.
            Ok(()) => return Err(Placed::Failed(ControlError::InUse(path.to_path_buf()))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(Placed::Failed(ControlError::InUse(path.to_path_buf())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                match std::fs::remove_file(path) {
                    // Removed in between, by another start that found it stale too.
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                    _ => {}
                }
            }
            // Removed in between: the path is free.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Placed::Failed(ControlError::Unreachable {
                    path: path.to_path_buf(),
                    source,
                }))
            }
        }
    }
    // Bound in a private folder and given its permissions before it appears at `path`, so
    // that no one can connect in the moment between bind and chmod, when the socket has the
    // umask's permissions (with `umask 000`, everyone's).
    let staging = Staging::new(path).map_err(io)?;
    let listener = UnixListener::bind(&staging.socket).map_err(io)?;
    let placed = std::fs::set_permissions(&staging.socket, std::fs::Permissions::from_mode(mode))
        .and_then(|()| place(&staging.socket, path));
    drop(staging);
    match placed {
        Ok(()) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Placed::Taken(e)),
        Err(e) => Err(io(e)),
    }
}

/// Connects to the socket at `path` without waiting, and lets go. A blocking connect to a
/// live proxy whose queue of connections not yet taken is full (it is stopped, or starved)
/// waits until that proxy takes one: a second proxy started on the same socket hung at
/// start, where it is to be refused. Without waiting, a full queue is `WouldBlock`.
fn knock(path: &Path) -> std::io::Result<()> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&socket, &SocketAddrUnix::new(path)?)?;
    Ok(())
}

/// Gives the socket bound at `staging` the name `path` as well, never over what is there
/// (`AlreadyExists`): two proxies started at once on one socket both found the path free,
/// and with a rename the second replaced the first's socket, which then ran on where no
/// `ctl` could reach it. The caller removes `staging`.
fn place(staging: &Path, path: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(staging, path) {
        Err(e)
            if e.kind() != std::io::ErrorKind::AlreadyExists
                && std::fs::symlink_metadata(path).is_err() =>
        {
            // A file system without hard links (vfat, some FUSE): moved, as before; the
            // moment between the look and the move is all that is left of the race there.
            std::fs::rename(staging, path)
        }
        linked => linked,
    }
}

/// Where the socket is bound before it is placed at `path`: `.{pid}/{name}` beside it, in a
/// folder only this user may enter (so no one else can connect there, whatever the socket's
/// own permissions), this process's own (so no other's is ever removed), and no longer than
/// `config::MAX_SOCKET_PATH` allows for. Removed when dropped.
struct Staging {
    folder: PathBuf,
    socket: PathBuf,
}

impl Staging {
    fn new(path: &Path) -> std::io::Result<Staging> {
        use std::os::unix::fs::DirBuilderExt;
        let folder = path.with_file_name(format!(".{}", std::process::id()));
        let socket = folder.join(path.file_name().unwrap_or_default());
        let make = || std::fs::DirBuilder::new().mode(0o700).create(&folder);
        if let Err(e) = make() {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            // A crash's leftover, of an earlier process that had this id: removed only when
            // it is a folder (not a link someone put there, to have a file elsewhere removed)
            // holding nothing but its socket, else its maker's error stands.
            if !std::fs::symlink_metadata(&folder).is_ok_and(|m| m.is_dir()) {
                return Err(e);
            }
            let _ = std::fs::remove_file(&socket);
            std::fs::remove_dir(&folder).map_err(|_| e)?;
            make()?;
        }
        Ok(Staging { folder, socket })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.folder);
    }
}

/// Whether the control socket can be made at `path`, for `check`: a socket is bound in its
/// folder as the start binds it (under this process's temporary name, never at `path`, where
/// a running proxy may listen), as the user who runs `check`, and removed.
pub fn probe(path: &Path) -> Result<(), ControlError> {
    let err = |source| ControlError::Unwritable {
        path: path.to_path_buf(),
        source,
    };
    let staging = Staging::new(path).map_err(err)?;
    drop(std::os::unix::net::UnixListener::bind(&staging.socket).map_err(err)?);
    std::fs::remove_file(&staging.socket).map_err(err)
}

/// Control connections open at once. One more takes the place of the connection that has
/// waited longest for its next request (`Room::admit`), or, when every one has a request in
/// hand (for less than `STUCK`) or has waited less than `SETTLED`, is told `busy` and closed.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may wait between requests, or take to send one.
const IDLE: Duration = Duration::from_secs(60);
/// A connection that has waited less than this for its next request is not closed to make
/// room: that request is most likely on its way (a client between its connect and its write,
/// a script reading one answer before it sends the next), and would be refused. A burst of
/// short-lived clients is told `busy` instead, which `ctl` asks again after.
const SETTLED: Duration = Duration::from_secs(1);
/// How long a connection being closed has to take the line that says why (`closing`): a
/// client that reads takes it at once, and one that does not (its buffer full of answers it
/// left unread) must not keep the connection, and its slot, for `IDLE` more. A refusal that
/// closes the connection (`line_too_long`, `idle`) holds the slot while it is written, and
/// such a connection, no longer reading, cannot be closed for room: 64 of them kept the
/// operator out for a minute.
const FAREWELL: Duration = Duration::from_secs(1);
/// How long a request may take to arrive whole, be answered by the controller (a change waits
/// for the state file's save, `ask`), or have its answer taken, before its connection may be
/// closed for room as a waiting one is. On a local socket a line comes in
/// one write and an answer is read at once: a client mid-line this long (a script that never
/// ends its line, a stopped one) or not reading its answers is stuck, and 64 of them shut the
/// operator out for `IDLE`, again and again if they reconnect.
const STUCK: Duration = Duration::from_secs(5);

/// The control connections' slots under `MAX_CONNECTIONS`, and, lent back to it, those of the
/// connections waiting for their next request, which a new connection at the limit may take.
/// A semaphore counts the slots, so that most admissions take no lock; the lock is held for a
/// map operation only, never across an await.
struct Room {
    open: Arc<Semaphore>,
    /// By when each began to wait, then by the order connections came (unique per connection:
    /// each waits for one request at a time), so that the first waited longest.
    waiting: Mutex<BTreeMap<(Instant, u64), Lent>>,
}

/// A waiting connection's slot, and how it is told that a newer connection took it.
struct Lent {
    permit: OwnedSemaphorePermit,
    taken: oneshot::Sender<()>,
}

/// One connection's place under `MAX_CONNECTIONS`.
struct Slot {
    room: Arc<Room>,
    permit: OwnedSemaphorePermit,
    id: u64,
    /// When its connection began to wait for its next request: when it was accepted, then
    /// when its last answer was written.
    since: Instant,
}

/// A slot lent back while its connection waits (`Slot::lend`); the connection closes once
/// `taken` fires. Dropped, it gives the slot up, if still there.
struct Loan {
    room: Arc<Room>,
    key: (Instant, u64),
    /// The slot's `since`, given back with it.
    since: Instant,
    taken: oneshot::Receiver<()>,
}

impl Room {
    fn new(max: usize) -> Arc<Room> {
        Arc::new(Room {
            open: Arc::new(Semaphore::new(max)),
            waiting: Mutex::new(BTreeMap::new()),
        })
    }

    /// A slot for connection `id`: a free one, else the one of the connection that has
    /// waited longest for its next request, at least `SETTLED`, which is told to close. None
    /// when every connection has a request in hand or has waited less: the limit holds, and
    /// nothing is queued.
    fn admit(self: &Arc<Room>, id: u64) -> Option<Slot> {
        let permit = match self.open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let mut waiting = self.waiting();
                let longest = waiting.first_entry()?;
                if longest.key().0.elapsed() < SETTLED {
                    return None;
                }
                let lent = longest.remove();
                drop(waiting);
                // Gone already (its task ended between its last look and now): the slot is
                // free all the same.
                let _ = lent.taken.send(());
                lent.permit
            }
        };
        Some(Slot {
            room: self.clone(),
            permit,
            id,
            since: Instant::now(),
        })
    }

    fn waiting(&self) -> MutexGuard<'_, BTreeMap<(Instant, u64), Lent>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Slot {
    /// Lends the slot back while the connection waits for its next request.
    fn lend(self) -> Loan {
        let at = self.since;
        self.lend_as_of(at)
    }

    /// Lends the slot back while a request arrives or its answer is written: taken for room
    /// only once that has lasted `STUCK`, since it counts as waiting from `STUCK` less
    /// `SETTLED` after now (and after those waiting already).
    fn lend_while_busy(self) -> Loan {
        let at = Instant::now() + (STUCK - SETTLED);
        self.lend_as_of(at)
    }

    fn lend_as_of(self, at: Instant) -> Loan {
        let (taken, told) = oneshot::channel();
        let key = (at, self.id);
        let lent = Lent {
            permit: self.permit,
            taken,
        };
        self.room.waiting().insert(key, lent);
        Loan {
            room: self.room,
            key,
            since: self.since,
            taken: told,
        }
    }
}

impl Loan {
    /// The slot back, as a request comes; none if a newer connection took it.
    fn back(&self) -> Option<Slot> {
        let lent = self.room.waiting().remove(&self.key)?;
        Some(Slot {
            room: self.room.clone(),
            permit: lent.permit,
            id: self.key.1,
            since: self.since,
        })
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        let lent = self.room.waiting().remove(&self.key);
        drop(lent);
    }
}

/// Serves until `shutdown` fires, then waits for the connections: each ends once the
/// exchange in hand is answered, so that an operator whose command the controller finished
/// is told so before the process exits. Each notice on `recheck` (a SIGHUP) finds the
/// socket at its path again (`Bound::find_again`). `accept_failed`: its series of
/// `intermission_accept_failures_total`.
pub async fn serve(
    mut socket: Bound,
    controller: ControllerHandle,
    mut shutdown: Shutdown,
    recheck: std::sync::Arc<tokio::sync::Notify>,
    accept_failed: prometheus_client::metrics::counter::Counter,
) {
    let mut failures = crate::listener::AcceptFailures::new("control socket", accept_failed);
    let room = Room::new(MAX_CONNECTIONS);
    let mut accepted: u64 = 0;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = socket.listener.accept() => match accepted {
                Ok((s, _)) => {
                    failures.recovered();
                    s
                }
                Err(e) => {
                    failures.failed(&e).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = recheck.notified() => {
                socket.find_again();
                continue;
            }
            _ = shutdown.fired() => break,
        };
        accepted += 1;
        match room.admit(accepted) {
            Some(slot) => {
                let controller = controller.clone();
                let stop = shutdown.clone();
                connections.spawn(connection(stream, controller, stop, slot));
            }
            None => refuse(stream),
        }
    }
    failures.stopped();
    drop(socket);
    while connections.join_next().await.is_some() {}
}

/// Tells a connection over `MAX_CONNECTIONS` why it is closed, and closes it, before the
/// next is accepted. Each refusal was a task of its own, holding its descriptor until it
/// ran: a flood of connections (a script looping on connect) held some 130 at once, which
/// the data plane needs (with a limit of 150, one request in eight got the outage response,
/// its connection to a healthy server refused for want of a descriptor). A new socket's
/// buffer is empty, so the line (a few hundred bytes) goes whole in one write that does not
/// wait; a client that has not read it by the close still finds it before the close.
fn refuse(stream: UnixStream) {
    static BUSY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let line = BUSY.get_or_init(|| {
        let why = format!(
            "{MAX_CONNECTIONS} control connections are open, and none has waited {} s for its \
             next request to be closed for room; closing: try again in a moment",
            SETTLED.as_secs()
        );
        let refusal = Response::error(ErrorBody::new("busy", why));
        let mut line = serde_json::to_vec(&refusal).unwrap_or_default();
        line.push(b'\n');
        line
    });
    // Out of the reactor, whose readiness a socket just accepted may not have yet (tokio's
    // `try_write` would then write nothing); the descriptor stays non-blocking.
    if let Ok(stream) = stream.into_std() {
        let _ = std::io::Write::write(&mut &stream, line);
    }
}

/// Says why the connection is about to be closed, if the client still reads, within
/// `FAREWELL`.
async fn closing(w: &mut OwnedWriteHalf, code: &str, why: String) {
    let refusal = Response::error(ErrorBody::new(code, why));
    let _ = tokio::time::timeout(FAREWELL, write(w, &refusal)).await;
}

/// What ended a connection's wait for its next request.
enum Waited {
    /// The first bytes of one came.
    Request,
    /// The client closed its end, or the socket failed.
    Closed,
    /// `IDLE` passed.
    Idle,
    /// A newer connection took its slot.
    Taken,
    Stop,
}

async fn connection(
    stream: UnixStream,
    controller: ControllerHandle,
    mut stop: Shutdown,
    mut slot: Slot,
) {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    // Reading the user database is disk work: off the async workers.
    let by = tokio::task::spawn_blocking(move || peer_user(uid))
        .await
        .unwrap_or_else(|_| "unknown".into());
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        // Moved on by requests only: blank lines do not keep a connection open, nor move it
        // back among those waiting.
        let deadline = slot.since + IDLE;
        // Waiting, the connection lends its slot back, for a newer one to take should it have
        // waited longest when the limit is reached. It counts as waiting until the first byte
        // of its next request: one begun is not closed for room (`IDLE` still bounds it).
        let mut loan = slot.lend();
        let waited = tokio::select! {
            // A request already sent is taken first, to be answered (refused as not applied
            // once the controller has stopped); only a connection waiting for its next one
            // is closed by the stop, saying so: a client whose request was on its way (it
            // connected as the stop began) reads that it was not applied, not a bare close
            // that says nothing of it.
            biased;
            filled = tokio::time::timeout_at(deadline, r.fill_buf()) => match filled {
                Ok(Ok(bytes)) if !bytes.is_empty() => Waited::Request,
                Ok(_) => Waited::Closed,
                Err(_) => Waited::Idle,
            },
            Ok(()) = &mut loan.taken => Waited::Taken,
            () = stop.fired() => Waited::Stop,
        };
        match waited {
            Waited::Closed => return,
            Waited::Stop => return stopping(&mut w, &mut r).await,
            Waited::Idle => {
                let why = format!("no request for {} s; closing", IDLE.as_secs());
                return closing(&mut w, "idle", why).await;
            }
            Waited::Request | Waited::Taken => {}
        }
        // Taken as its request came, the connection goes all the same: that request is not
        // read, and `idle` tells its client so, as when it is taken while it waits.
        slot = match loan.back() {
            Some(slot) => slot,
            None => {
                let why = format!(
                    "closed to make room for a newer control connection: {MAX_CONNECTIONS} \
                     are open, and this one had waited longest for its next request ({} s)",
                    loan.key.0.elapsed().as_secs()
                );
                closing(&mut w, "idle", why).await;
                return;
            }
        };
        drop(loan);
        line.clear();
        // Room for the longest line allowed and its ending (CR LF): one byte more, with no
        // LF, is already too long.
        let mut capped = (&mut r).take(MAX_LINE as u64 + 2);
        let mut arriving = slot.lend_while_busy();
        let read = tokio::select! {
            // As above: a request being sent is read first.
            biased;
            read = tokio::time::timeout_at(deadline, capped.read_until(b'\n', &mut line)) => read,
            Ok(()) = &mut arriving.taken => return stuck_request(&mut w).await,
            () = stop.fired() => return stopping(&mut w, &mut r).await,
        };
        slot = match arriving.back() {
            Some(slot) => slot,
            None => return stuck_request(&mut w).await,
        };
        drop(arriving);
        match read {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                let why = format!("no request for {} s; closing", IDLE.as_secs());
                closing(&mut w, "idle", why).await;
                return;
            }
        }
        let complete = line.last() == Some(&b'\n');
        if content_len(&line) > MAX_LINE {
            let why = format!("request lines are limited to {MAX_LINE} bytes; closing");
            closing(&mut w, "line_too_long", why).await;
            return;
        }
        // Past a UTF-8 byte order mark, as the state file is read (RFC 8259 §8.1 lets a
        // reader skip one): PowerShell and other Windows tools write one before what they
        // pipe, and the request was refused as "not a JSON object" though it showed whole.
        let text = line.trim_ascii();
        let text = text.strip_prefix(BOM).unwrap_or(text).trim_ascii();
        if text.is_empty() {
            continue;
        }
        let resp = match parse_request(text) {
            Ok(req) => match ask(&controller, req, by.clone(), slot, &mut w).await {
                Some((back, resp)) => {
                    slot = back;
                    resp
                }
                None => return,
            },
            Err(e) => {
                // A broken script's requests count as failures of the command it meant, and
                // one that names none (not JSON, no `cmd`, an unknown one) under `unknown`:
                // a fixed label, so that a prober shows without growing the series.
                let named = crate::control::protocol::named_command(text);
                controller.refused(named.unwrap_or("unknown"));
                Response::error(e)
            }
        };
        let mut answering = slot.lend_while_busy();
        let written = tokio::select! {
            biased;
            written = write(&mut w, &resp) => written,
            // Applied, and its answer left unread for `STUCK`: only the answer is lost, to a
            // client that was not reading it, and nothing can be said to it.
            Ok(()) = &mut answering.taken => return,
            // Nor does such a client hold up a stop for `IDLE`: the drain waited on it to
            // `shutdown_timeout`, blamed "a control command still in hand", and kept the
            // state file's lock from the next instance meanwhile. A reading client has its
            // answer within `FAREWELL`.
            () = async {
                stop.fired().await;
                tokio::time::sleep(FAREWELL).await;
            } => return,
        };
        slot = match answering.back() {
            Some(slot) => slot,
            None => return,
        };
        drop(answering);
        if written.is_err() || !complete {
            return;
        }
        slot.since = Instant::now();
    }
}

/// Hands `req` to the controller and waits for its answer, the slot lent meanwhile as while
/// a request arrives: a change waits for the state file's save, and for those queued before
/// it, which a hung disk (a network mount gone, a frozen volume) makes last as long as it
/// hangs. Held, 64 such requests (a few `ctl on` given up on after 15 s, a script retrying)
/// kept every other client out, `ctl status` too, for the whole incident. Taken for room, the
/// connection is told what became of its request, and closed: `None`, as when the answer
/// came as its slot was taken (it is then written, and the connection closed).
async fn ask(
    controller: &ControllerHandle,
    req: Request,
    by: String,
    slot: Slot,
    w: &mut OwnedWriteHalf,
) -> Option<(Slot, Response)> {
    let command = command_name(&req);
    let began = Instant::now();
    let mut waiting = slot.lend_while_busy();
    let handed = tokio::select! {
        biased;
        handed = controller.hand(req, by) => handed,
        // Not queued: dropped with the send, so nothing of it is applied.
        Ok(()) = &mut waiting.taken => {
            unqueued(w, command, began.elapsed()).await;
            return None;
        }
    };
    let resp = match handed {
        Handed::Answered(resp) => *resp,
        Handed::Queued(pending) => tokio::select! {
            biased;
            resp = pending.answer() => resp,
            // Queued: the controller applies it (or refuses it, which it logs) all the same.
            Ok(()) = &mut waiting.taken => {
                unanswered(w, command, began.elapsed()).await;
                return None;
            }
        },
    };
    match waiting.back() {
        Some(slot) => Some((slot, resp)),
        None => {
            // The answer is what its client waited for: it is the connection's last line.
            let _ = tokio::time::timeout(FAREWELL, write(w, &resp)).await;
            None
        }
    }
}

/// Tells a connection closed for room while its request waited for a place in the
/// controller's queue that it was not applied: `idle`, which `ctl` asks again after.
async fn unqueued(w: &mut OwnedWriteHalf, command: &str, waited: Duration) {
    let why = format!(
        "closed to make room for a newer control connection: {MAX_CONNECTIONS} are open, and \
         this one's `{command}` had waited {} s for a place among the changes waiting to be \
         applied (they wait, one at a time, for the state file's save, which has not returned: \
         is its disk slow or hung?); it was not applied",
        waited.as_secs()
    );
    closing(w, "idle", why).await;
}

/// Tells a connection closed for room while the controller had its request that the request
/// is still to be applied: `pending`, which `ctl` does not send again (a second `update` or
/// `schedule_add` would apply twice).
async fn unanswered(w: &mut OwnedWriteHalf, command: &str, waited: Duration) {
    let why = format!(
        "closed to make room for a newer control connection: {MAX_CONNECTIONS} are open, and \
         this one's `{command}` had waited {} s to be applied: changes wait, one at a time, for \
         the state file's save, which has not returned (is its disk slow or hung?). It is not \
         lost: it takes effect once saved, or is refused if the save fails (the proxy's log \
         says which, and `status` shows the state in force, which a change joins only once \
         saved): check with `ctl status` before sending it again",
        waited.as_secs()
    );
    closing(w, "pending", why).await;
}

/// The UTF-8 byte order mark, taken at the start of a request line.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// Tells a connection closed for room while its request was still arriving that it was not
/// applied: `idle`, which `ctl` asks again after.
async fn stuck_request(w: &mut OwnedWriteHalf) {
    let why = format!(
        "closed to make room for a newer control connection: {MAX_CONNECTIONS} are open, and \
         this one's request had been arriving for {} s without its line end; it was not applied",
        STUCK.as_secs()
    );
    closing(w, "idle", why).await;
}

/// Closes a connection as the proxy stops, saying that what it sent was not applied.
async fn stopping(w: &mut OwnedWriteHalf, r: &mut BufReader<OwnedReadHalf>) {
    let why = "the proxy is shutting down; this command was not applied".to_owned();
    closing(w, "shutting_down", why).await;
    // Closed with the client's request unread, the socket would be reset, and the client
    // could lose this answer with it: what it sends is read and dropped until it closes, for
    // a moment at most.
    let mut sink = tokio::io::sink();
    let mut rest = r.take(MAX_LINE as u64 + 2);
    let drop_rest = tokio::io::copy(&mut rest, &mut sink);
    let _ = tokio::time::timeout(Duration::from_secs(1), drop_rest).await;
}

/// The length of a line without its ending: the limit is on what was said, so that CR LF
/// and LF count the same.
fn content_len(line: &[u8]) -> usize {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line).len()
}

/// Writes one answer, giving up after `IDLE`: a client that sends requests and never reads
/// the answers must not keep its connection (and a slot under `MAX_CONNECTIONS`) for ever.
async fn write(w: &mut OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    match tokio::time::timeout(IDLE, w.write_all(&out)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Who is on the other end: the local user's name from the socket's peer credentials, which
/// the client cannot forge (unlike a name it would send).
fn peer_user(uid: Option<u32>) -> String {
    let Some(uid) = uid else {
        return "unknown".into();
    };
    user_name(uid).unwrap_or_else(|| format!("uid {uid}"))
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::mode::Mode;
    use tokio::io::AsyncBufReadExt;

    /// Blank lines are no requests: they do not keep a connection open past the minute.
    #[tokio::test(start_paused = true)]
    async fn blank_lines_do_not_keep_a_connection_open() {
        let (client, server) = UnixStream::pair().unwrap();
        let served = tokio::spawn(connection(
            server,
            ControllerHandle::detached(),
            never(),
            slot(),
        ));
        let (r, mut w) = client.into_split();
        let started = tokio::time::Instant::now();
        let mut lines = BufReader::new(r).lines();
        let blanks = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                if w.write_all(b"\n").await.is_err() {
                    return;
                }
            }
        };
        let hour = std::time::Duration::from_secs(3600);
        let line = tokio::select! {
            line = tokio::time::timeout(hour, lines.next_line()) => line,
            () = blanks => panic!("the blank lines stopped before the answer"),
        };
        let line = line.expect("still open after an hour").unwrap().unwrap();
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(60));
        assert!(line.contains(r#""code":"idle""#), "{line}");
        served.await.unwrap();
    }

    /// A client that sends requests and never reads the answers is let go once an answer
    /// has waited a minute to be written.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_let_go() {
        let (client, server) = UnixStream::pair().unwrap();
        let served = tokio::spawn(connection(
            server,
            ControllerHandle::detached(),
            never(),
            slot(),
        ));
        let (_unread, mut w) = client.into_split();
        // Each request gets an answer (an error: no controller is behind this handle) that
        // nobody reads, until the socket's buffer is full.
        let hour = std::time::Duration::from_secs(3600);
        let flood = async { while w.write_all(b"{\"cmd\":\"status\"}\n").await.is_ok() {} };
        tokio::time::timeout(hour, async {
            tokio::join!(flood, async { served.await.unwrap() });
        })
        .await
        .expect("still served after an hour");
    }

    /// Nor does such a client hold up a stop: its connection ends within `FAREWELL` of it,
    /// where the answer's write would have waited for `IDLE`.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_does_not_hold_up_a_stop() {
        let (client, server) = UnixStream::pair().unwrap();
        let (trigger, stop) = crate::shutdown::channel();
        let served = tokio::spawn(connection(
            server,
            ControllerHandle::detached(),
            stop,
            slot(),
        ));
        let (_unread, mut w) = client.into_split();
        // Requests until the socket's buffers are full both ways: an answer's write waits.
        let full = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while w.write_all(b"{\"cmd\":\"status\"}\n").await.is_ok() {}
        });
        assert!(full.await.is_err(), "the connection closed before its stop");
        let stopped = tokio::time::Instant::now();
        trigger.fire();
        tokio::time::timeout(std::time::Duration::from_secs(3600), served)
            .await
            .expect("still served an hour after the stop")
            .unwrap();
        assert!(stopped.elapsed() <= FAREWELL, "{:?}", stopped.elapsed());
    }

    /// Half a request, then silence: closed after `IDLE`, saying why.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_a_minute() {
        let (client, server) = UnixStream::pair().unwrap();
        let served = tokio::spawn(connection(
            server,
            ControllerHandle::detached(),
            never(),
            slot(),
        ));
        let (r, mut w) = client.into_split();
        w.write_all(br#"{"cmd":"sta"#).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut lines = BufReader::new(r).lines();
        let hour = std::time::Duration::from_secs(3600);
        let line = tokio::time::timeout(hour, lines.next_line())
            .await
            .expect("still open after an hour")
            .unwrap()
            .unwrap();
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(60));
        let resp: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(resp["error"]["code"], "idle", "{line}");
        assert_eq!(lines.next_line().await.unwrap(), None, "closed");
        served.await.unwrap();
    }

    /// A connection waiting for its request when the proxy stops says the request was not
    /// applied before it closes: its client may have sent one as the stop began.
    #[tokio::test]
    async fn a_stop_tells_a_waiting_connection_nothing_was_applied() {
        let (client, server) = UnixStream::pair().unwrap();
        let (trigger, stop) = crate::shutdown::channel();
        let served = tokio::spawn(connection(
            server,
            ControllerHandle::detached(),
            stop,
            slot(),
        ));
        trigger.fire();
        let mut lines = BufReader::new(client).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        assert!(!resp.ok);
        let error = resp.error.unwrap();
        assert!(error.message.contains("not applied"), "{line}");
        // Its own code, which a client may act on: safe to send again to the next proxy.
        assert_eq!(error.code, "shutting_down");
        assert!(lines.next_line().await.unwrap().is_none(), "then closed");
        served.await.unwrap();
    }

    /// A slot in a room of its own.
    fn slot() -> Slot {
        Room::new(1).admit(1).unwrap()
    }

    /// At the limit, a new connection takes the slot of the one that has waited longest for
    /// its next request; never one with a request in hand, nor one that waited less than
    /// `SETTLED`, whose request may be on its way. With none to take, nothing is queued.
    #[tokio::test(start_paused = true)]
    async fn room_is_made_from_the_connection_waiting_longest() {
        let room = Room::new(3);
        let mut older = room.admit(1).unwrap().lend();
        tokio::time::advance(Duration::from_secs(5)).await;
        let newer = room.admit(2).unwrap().lend();
        let _in_hand = room.admit(3).unwrap();
        let _fourth = room.admit(4).expect("the older one waited 5 s");
        assert!(older.back().is_none(), "its slot was given away");
        assert_eq!(older.taken.try_recv(), Ok(()), "and it was told");
        assert!(
            room.admit(5).is_none(),
            "the newer one waited less than SETTLED"
        );
        tokio::time::advance(SETTLED).await;
        let _sixth = room.admit(6).expect("the newer one has waited SETTLED");
        assert!(newer.back().is_none());
        assert!(room.admit(7).is_none(), "every slot has a request in hand");
    }

    /// A connection given back waits again from where it left off, and a dropped loan frees
    /// its slot.
    #[tokio::test(start_paused = true)]
    async fn a_slot_taken_back_is_not_given_away() {
        let room = Room::new(1);
        let began = Instant::now();
        let loan = room.admit(1).unwrap().lend();
        tokio::time::advance(SETTLED).await;
        let slot = loan.back().unwrap();
        drop(loan);
        assert_eq!(
            slot.since, began,
            "a blank line does not move it back in the line"
        );
        tokio::time::advance(SETTLED * 2).await;
        assert!(room.admit(2).is_none(), "a request in hand keeps its slot");
        drop(slot.lend());
        assert!(room.admit(3).is_some(), "a dropped loan frees its slot");
    }

    /// A connection whose slot a newer one takes is told why, with `idle`, and closed; one
    /// that has begun a request is not taken.
    #[tokio::test(start_paused = true)]
    async fn a_connection_closed_for_room_is_told_idle() {
        let room = Room::new(2);
        let (client, server) = UnixStream::pair().unwrap();
        let detached = ControllerHandle::detached();
        let served = tokio::spawn(connection(
            server,
            detached,
            never(),
            room.admit(1).unwrap(),
        ));
        let (busy, server) = UnixStream::pair().unwrap();
        let detached = ControllerHandle::detached();
        let begun = tokio::spawn(connection(
            server,
            detached,
            never(),
            room.admit(2).unwrap(),
        ));
        let (_, mut begun_w) = busy.into_split();
        begun_w.write_all(br#"{"cmd":"sta"#).await.unwrap();
        tokio::time::sleep(SETTLED).await;
        let _newer = room.admit(3).expect("the waiting connection makes room");
        let mut lines = BufReader::new(client).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        let resp: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(resp["error"]["code"], "idle", "{line}");
        assert!(line.contains("make room"), "{line}");
        assert_eq!(lines.next_line().await.unwrap(), None, "closed");
        served.await.unwrap();
        assert!(room.admit(4).is_none(), "the begun request keeps its slot");
        begun.abort();
    }

    /// A connection stuck mid-request is closed for room once it has been so for `STUCK`,
    /// and told that the request was not applied; one whose answers its client does not read
    /// likewise. 64 of either shut the operator out for `IDLE`, and again as they reconnect.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_connection_makes_room_after_a_while() {
        let room = Room::new(1);
        let (client, server) = UnixStream::pair().unwrap();
        let detached = ControllerHandle::detached();
        let served = tokio::spawn(connection(
            server,
            detached,
            never(),
            room.admit(1).unwrap(),
        ));
        let (r, mut w) = client.into_split();
        w.write_all(br#"{"cmd":"sta"#).await.unwrap();
        tokio::time::sleep(STUCK - Duration::from_millis(100)).await;
        assert!(
            room.admit(2).is_none(),
            "a request arriving is not taken at once"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _newer = room.admit(3).expect("a request stuck mid-line makes room");
        let mut lines = BufReader::new(r).lines();
        let line = lines.next_line().await.unwrap().unwrap();
        let resp: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(resp["error"]["code"], "idle", "{line}");
        assert!(line.contains("not applied"), "{line}");
        served.await.unwrap();

        let room = Room::new(1);
        let (client, server) = UnixStream::pair().unwrap();
        let detached = ControllerHandle::detached();
        let served = tokio::spawn(connection(
            server,
            detached,
            never(),
            room.admit(1).unwrap(),
        ));
        let (_unread, mut w) = client.into_split();
        let flood = async { while w.write_all(b"{\"cmd\":\"status\"}\n").await.is_ok() {} };
        let taken = async {
            tokio::time::sleep(SETTLED).await;
            assert!(
                room.admit(2).is_none(),
                "an answer being written is not taken at once"
            );
            tokio::time::sleep(STUCK).await;
            let newer = room.admit(3).expect("an answer nobody reads makes room");
            served.await.unwrap();
            newer
        };
        let hour = Duration::from_secs(3600);
        tokio::time::timeout(hour, async { tokio::join!(flood, taken) })
            .await
            .expect("still served after an hour");
    }

    /// Waits, a bounded time, for `cond`, while the clock stands still: the blocking pool's
    /// threads (a save held at its gate, the peer's name looked up) run meanwhile.
    async fn until(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..10_000 {
            if cond() {
                return true;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
        cond()
    }

    /// `MAX_CONNECTIONS` connections, each admitted to `room` and served by `controller`,
    /// whose clients sent `line(i)`; their clients' ends.
    async fn served(
        room: &Arc<Room>,
        controller: &ControllerHandle,
        ids: std::ops::Range<u64>,
        line: impl Fn(u64) -> String,
    ) -> Vec<UnixStream> {
        let mut clients = Vec::new();
        for id in ids {
            let slot = room.admit(id).expect("no room for a new connection");
            let (client, server) = UnixStream::pair().unwrap();
            tokio::spawn(connection(server, controller.clone(), never(), slot));
            let (r, mut w) = client.into_split();
            w.write_all(format!("{}\n", line(id)).as_bytes())
                .await
                .unwrap();
            clients.push(r.reunite(w).unwrap());
        }
        clients
    }

    /// Whether every slot of `room` is lent by a connection whose request is in hand (as of
    /// `at`, the clock standing still): all of them wait for the controller.
    fn all_in_hand(room: &Room, at: Instant) -> bool {
        let waiting = room.waiting();
        waiting.len() == MAX_CONNECTIONS && waiting.keys().all(|k| k.0 == at + (STUCK - SETTLED))
    }

    /// The one line a connection closed for room was told.
    async fn told(client: UnixStream) -> serde_json::Value {
        let mut lines = BufReader::new(client).lines();
        let line = lines.next_line().await.unwrap().expect("a line");
        assert_eq!(lines.next_line().await.unwrap(), None, "then closed");
        serde_json::from_str(&line).unwrap()
    }

    /// A state file whose disk hangs (a network mount gone) holds every change for as long
    /// as it hangs: 64 of them, each a connection with its request in hand, kept every other
    /// client out, `ctl status` included, for the whole incident. A request waiting for the
    /// controller lends its slot after `STUCK`: the operator's `status` is answered; the
    /// connection closed for room is told that its change, queued, still takes effect once
    /// saved (and it does), or, when it had found no room in the queue, that it was not
    /// applied.
    #[tokio::test(start_paused = true)]
    async fn a_hung_save_does_not_shut_the_operator_out() {
        let held = crate::state::controller::tests::HeldSaves::start();
        let controller = held.handle.clone();
        // A first change, held at the gate: from then on the clock moves only as told.
        let first = controller.clone();
        tokio::spawn(async move {
            let on = Request::On {
                message: Some("first".into()),
                until: None,
                retry_after: None,
                reason: None,
            };
            first.request(on, "alice".into()).await
        });
        assert!(until(|| held.reached() > 0).await, "no save began");
        let room = Room::new(MAX_CONNECTIONS);
        let at = Instant::now();
        let max = MAX_CONNECTIONS as u64;
        let on = |id| format!(r#"{{"cmd":"on","message":"m{id}"}}"#);
        let stuck = served(&room, &controller, 0..max, on).await;
        assert!(
            until(|| controller.queue_full()).await,
            "changes not queued"
        );
        // Each lends its slot as it hands its request to the controller.
        until(|| all_in_hand(&room, at)).await;
        assert!(room.admit(max).is_none(), "taken before STUCK");
        tokio::time::advance(STUCK).await;

        // The operator, then 63 more changes: the controller's queue (64) is full.
        let status = r#"{"cmd":"status"}"#.to_owned();
        let line = |id| if id == max { status.clone() } else { on(id) };
        let mut newer = served(&room, &controller, max..2 * max, line).await;
        let operator = newer.remove(0);
        let mut lines = BufReader::new(operator).lines();
        let answer = lines.next_line().await.unwrap().expect("status answered");
        let answer: Response = serde_json::from_str(&answer).unwrap();
        assert!(answer.ok, "{:?}", answer.error);
        let state = answer.state.expect("a state");
        assert_eq!(state.mode, Mode::Normal, "none saved yet");
        let mut pending = 0;
        for client in stuck {
            let said = told(client).await;
            let code = said["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let message = said["error"]["message"].as_str().unwrap_or_default();
            match code.as_str() {
                "pending" => {
                    assert!(message.contains("not lost"), "{said}");
                    pending += 1;
                }
                "idle" => assert!(message.contains("not applied"), "{said}"),
                _ => panic!("{said}"),
            }
        }
        // Queued behind the first change (or behind a save of the first check's finding).
        assert!(pending >= MAX_CONNECTIONS - 1, "{pending}");

        // Those left waiting for room in the queue are told nothing of theirs was applied.
        let at = Instant::now();
        let newer_handed = until(|| {
            let busy = at + (STUCK - SETTLED);
            let waiting = room.waiting();
            waiting.keys().filter(|k| k.0 == busy).count() == MAX_CONNECTIONS - 1
        })
        .await;
        assert!(newer_handed, "the newer changes are not waiting for room");
        tokio::time::advance(STUCK).await;
        let _takers: Vec<Slot> = (2 * max..3 * max)
            .map(|id| room.admit(id).expect("no room for a new connection"))
            .collect();
        let mut unqueued = 0;
        for client in newer {
            let said = told(client).await;
            if said["error"]["code"] == "idle" {
                let message = said["error"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("it was not applied"), "{said}");
                unqueued += 1;
            }
        }
        assert!(unqueued >= MAX_CONNECTIONS - 3, "{unqueued}");

        // The disk answers again: the changes whose connections were closed are applied.
        held.open();
        let mut shown = None;
        for _ in 0..10_000 {
            let status = controller.request(Request::Status, "tester".into()).await;
            shown = status.state.and_then(|s| s.message);
            if shown
                .as_deref()
                .is_some_and(|m| ["m62", "m63"].contains(&m))
            {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
        // The last change queued (behind the first, and perhaps the first check's finding),
        // from a connection closed before it was applied.
        let shown = shown.unwrap_or_default();
        assert!(["m62", "m63"].contains(&shown.as_str()), "{shown}");
    }

    /// A stop that never fires.
    fn never() -> Shutdown {
        let (trigger, stop) = crate::shutdown::channel();
        // Kept for the test's life: a dropped trigger counts as fired.
        std::mem::forget(trigger);
        stop
    }

    /// Dropped however the server ends, the socket removes its file, and only its own: a
    /// file put at the path since is left alone.
    #[tokio::test]
    async fn a_dropped_socket_removes_its_own_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        drop(Bound::new(&path, 0o600).unwrap());
        assert!(!path.exists(), "the socket file was left behind");
        let bound = Bound::new(&path, 0o600).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "someone else's").unwrap();
        drop(bound);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's");
    }

    /// A socket at the path that cannot be connected to, though something holds it open (a
    /// datagram socket here; another user's proxy behind a mode that keeps this user out),
    /// is not taken as one a crash left: the start is refused and the file stays.
    #[tokio::test]
    async fn a_socket_that_cannot_be_connected_to_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let held = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let before = file_id(&path).unwrap();
        let e = Bound::new(&path, 0o600)
            .err()
            .expect("the socket was taken");
        assert!(matches!(e, ControlError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("c.sock"), "{e}");
        assert_eq!(file_id(&path).unwrap(), before, "the file was replaced");
        drop(held);
        // One nobody listens on any more is a crash's leftover, and is replaced.
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).unwrap();
        drop(listener);
        Bound::new(&dir.path().join("s.sock"), 0o600).unwrap();
    }

    /// A live proxy that takes no connection (stopped, starved) and whose queue is full is
    /// still a proxy: a second one started on its socket is refused as "already listening",
    /// at once, where its connect to tell a stale socket waited for the first to run again,
    /// and the start hung.
    #[test]
    fn a_stalled_proxy_s_socket_is_in_use() {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let stalled = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&stalled, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::listen(&stalled, 0).unwrap();
        let mut queued = Vec::new();
        while queued.len() < 100 {
            let socket = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::NONBLOCK,
                None,
            )
            .unwrap();
            match rustix::net::connect(&socket, &SocketAddrUnix::new(&path).unwrap()) {
                Ok(()) => queued.push(socket),
                Err(e) if e == rustix::io::Errno::AGAIN => break,
                Err(e) => panic!("{e}"),
            }
        }
        let (said, heard) = std::sync::mpsc::channel();
        let starting = path.clone();
        std::thread::spawn(move || {
            let _ = said.send(Bound::new(&starting, 0o600).err().map(|e| e.to_string()));
        });
        let e = heard
            .recv_timeout(Duration::from_secs(10))
            .expect("the start hung on the stalled proxy's socket");
        assert!(e.is_some_and(|e| e.contains("already listening")), "taken");
        assert!(path.exists());
        drop(queued);
    }

    /// A socket another proxy put at the path after this one found it free (both started at
    /// once) stays, and still answers: it is not replaced by this one's, which left the other
    /// proxy running where no `ctl` reached it.
    #[test]
    fn a_socket_placed_meanwhile_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let before = file_id(&path).unwrap();
        let staging = Staging::new(&path).unwrap();
        let staging = &staging.socket;
        let _ours = std::os::unix::net::UnixListener::bind(staging).unwrap();
        let e = place(staging, &path).expect_err("placed over the other socket");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(
            file_id(&path).unwrap(),
            before,
            "the other socket was replaced"
        );
        drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
        drop(other);
        // And with the path free, it is placed, the same socket under both names.
        let free = dir.path().join("free.sock");
        place(staging, &free).unwrap();
        assert_eq!(file_id(&free).unwrap(), file_id(staging).unwrap());
    }

    /// Binding leaves no temporary name beside the socket.
    #[tokio::test]
    async fn binding_leaves_only_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let _bound = Bound::new(&path, 0o600).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["c.sock"]);
        drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
    }

    /// The socket is bound where only this user may reach it, so that the moment before its
    /// permissions are set (it has the umask's, everyone's under `umask 000`) lets no one in;
    /// and that folder is gone after, with a crash's leftover of it.
    #[test]
    fn the_socket_is_staged_in_a_folder_only_its_user_may_enter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let leftover = dir.path().join(format!(".{}", std::process::id()));
        std::fs::create_dir(&leftover).unwrap();
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o777)).unwrap();
        drop(std::os::unix::net::UnixListener::bind(leftover.join("c.sock")).unwrap());
        let staging = Staging::new(&path).unwrap();
        assert_eq!(staging.socket.parent(), Some(leftover.as_path()));
        let mode = std::fs::metadata(&leftover).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "{mode:o}");
        // Its path is no longer than the limit the config holds socket paths to allows for.
        let longer = staging.socket.as_os_str().len() - path.as_os_str().len();
        assert!(longer <= 107 - 98, "{longer}");
        drop(std::os::unix::net::UnixListener::bind(&staging.socket).unwrap());
        drop(staging);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(names.is_empty(), "{names:?}");
    }

    /// A link in the place of the staging folder (another local user's, in a shared folder)
    /// is not followed: the file it leads to stays, and the bind fails.
    #[test]
    fn a_link_where_the_staging_folder_goes_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("c.sock"), "precious").unwrap();
        let folder = dir.path().join(format!(".{}", std::process::id()));
        std::os::unix::fs::symlink(&elsewhere, &folder).unwrap();
        assert!(Staging::new(&dir.path().join("c.sock")).is_err());
        assert_eq!(
            std::fs::read_to_string(elsewhere.join("c.sock")).unwrap(),
            "precious"
        );
    }

    #[test]
    fn the_limit_does_not_count_the_line_ending() {
        let body = vec![b'x'; MAX_LINE];
        for ending in [&b""[..], b"\n", b"\r\n"] {
            let line = [&body[..], ending].concat();
            assert_eq!(content_len(&line), MAX_LINE, "{ending:?}");
        }
        let over = [&body[..], b"x\r"].concat();
        assert_eq!(
            content_len(&over),
            MAX_LINE + 1,
            "cut at the limit, no LF yet"
        );
    }
}
