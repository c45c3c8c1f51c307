//! The controller: the one task that changes the state, so every change is applied in one
//! order, written to the state file before it is acknowledged, and published as a whole new
//! snapshot.
//!
//! Control commands and reloads arrive as messages. Blocking work (the state file's fsync,
//! reading the config and pages) runs on the blocking pool, so the data plane never waits on
//! the disk even with a single worker thread.

use super::mode::{Change, ChangeError, Mode, Persisted, Window};
use super::snapshot::{Inputs, Parts, Snapshot};
use super::store;
use super::StateHandle;
use crate::config::{parse_duration, Config};
use crate::control::protocol::{
    ErrorBody, Request, Response, SaveOverdue, ServerHealth, StatusView,
};
use crate::health::{self, Checkers, Flip, HealthTable};
use crate::hold::held::View;
use crate::hold::pages::Pages;
use crate::notify::{Event, EventKind, Notifier};
use crate::shutdown::Shutdown;
use crate::time::{parse_time, Clock};
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};

enum Msg {
    Control {
        req: Request,
        by: String,
        reply: oneshot::Sender<Response>,
    },
    /// A request for `command` the socket refused before it reached the controller: counted.
    Refused { command: &'static str },
}

/// The way to reach the controller; cheap to clone.
#[derive(Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Msg>,
    /// What read-only requests are answered from, without the controller's queue.
    published: Arc<ArcSwapOption<Published>>,
    /// When the save under way began, once it has taken `HOLD_EVENTS` (`Controller::saving`).
    overdue: Arc<ArcSwapOption<SystemTime>>,
}

/// What the read-only requests (`status`, `health`, `schedule_list`) are answered from: the
/// state the controller last put in force, with the snapshot it published it in. They are
/// answered by the connection's own task, since in the controller's queue they waited
/// behind changes, each of which waits for the state file's fsync: a slow or hung disk held
/// `ctl status`, the first thing an operator types to see what is going on. A change is
/// published before it is acknowledged, so a client that reads its answer and then asks
/// for `status` sees it.
pub struct Published {
    snapshot: Arc<Snapshot>,
    state: Persisted,
    table: Option<Arc<HealthTable>>,
    reload_refused: Option<crate::state::mode::Update>,
    restart_pending: Vec<String>,
    clock: Clock,
}

impl Published {
    /// The answer to `req` when it only reads; `overdue`, what a `status` says of the save
    /// under way.
    fn answer(&self, req: &Request, overdue: Option<SaveOverdue>) -> Option<Response> {
        Some(match req {
            Request::Status => Response::state(StatusView {
                save_overdue: overdue,
                ..self.status_view()
            }),
            Request::Health => Response::health(self.health()),
            Request::ScheduleList => Response::schedules(self.state.schedules.clone()),
            _ => return None,
        })
    }

    fn health(&self) -> Vec<ServerHealth> {
        self.table.as_ref().map(|t| t.list()).unwrap_or_default()
    }

    fn status_view(&self) -> StatusView {
        let snap = &self.snapshot;
        let config = &snap.config;
        let now = self.clock.now();
        let view = snap.held.as_ref().map(|h| &h.view);
        let planned = self.state.planned.as_ref();
        StatusView {
            mode: snap.mode,
            message: view.map(|v| v.message.clone()),
            since: view.and_then(|v| v.since).map(crate::time::Timestamp),
            until: view.and_then(|v| v.until).map(crate::time::Timestamp),
            retry_after: view.map(|v| v.retry_after(now)),
            overrun: self.state.overrun(now),
            by: planned.map(|p| p.by.clone()),
            reason: planned.and_then(|p| p.reason.clone()),
            force_open: self.state.force_open,
            updates: self.state.updates.iter().rev().cloned().collect(),
            status_page: Some(config.maintenance.status_page.clone()).filter(|s| !s.is_empty()),
            upstream: self.health(),
            config: config.source.as_ref().map(|p| p.display().to_string()),
            next_window: self.state.next_window(now).cloned(),
            schedules: self.state.schedules.clone(),
            reload_refused: self.reload_refused.clone(),
            restart_pending: self.restart_pending.clone(),
            save_overdue: None,
        }
    }
}

impl ControllerHandle {
    /// A handle to no controller, for tests of what reaches it (its requests are refused as
    /// during a shutdown).
    #[cfg(test)]
    pub fn detached() -> ControllerHandle {
        ControllerHandle {
            tx: mpsc::channel(1).0,
            published: Arc::default(),
            overdue: Arc::default(),
        }
    }

    /// Applies one control request on behalf of local user `by`.
    pub async fn request(&self, req: Request, by: String) -> Response {
        match self.hand(req, by).await {
            Handed::Answered(resp) => *resp,
            Handed::Queued(pending) => pending.answer().await,
        }
    }

    /// Hands one control request on behalf of local user `by` to the controller: answered at
    /// once when it only reads, else queued. Waits for room in the queue (64 requests), which
    /// a save that does not return fills; dropped meanwhile, the request was not queued, and
    /// nothing of it is applied.
    pub async fn hand(&self, req: Request, by: String) -> Handed {
        if let Some(resp) = self.read_only(&req) {
            return Handed::Answered(Box::new(resp));
        }
        self.enqueue(req, by).await
    }

    /// Through the controller's queue whatever it asks.
    async fn enqueue(&self, req: Request, by: String) -> Handed {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Msg::Control { req, by, reply }).await.is_err() {
            return Handed::Answered(Box::new(not_applied()));
        }
        Handed::Queued(Pending(answer))
    }

    /// Whether the controller's queue has no room left.
    #[cfg(test)]
    pub(crate) fn queue_full(&self) -> bool {
        self.tx.capacity() == 0
    }

    /// `request`, through the controller's queue whatever it asks: what tests of the
    /// controller's own timing wait on, since only a message wakes it when their clock
    /// jumps.
    #[cfg(test)]
    async fn queued(&self, req: Request, by: String) -> Response {
        match self.enqueue(req, by).await {
            Handed::Answered(resp) => *resp,
            Handed::Queued(pending) => pending.answer().await,
        }
    }

    /// The answer to a request that only reads, from what the controller last published;
    /// `None` for a change, and until the controller runs (its first publish), or once it
    /// has stopped, whose queue then gives the answer (`shutting_down`).
    fn read_only(&self, req: &Request) -> Option<Response> {
        if self.tx.is_closed() {
            return None;
        }
        let published = self.published.load_full()?;
        let overdue = self.overdue.load().as_deref().map(|&since| SaveOverdue {
            since: crate::time::Timestamp(since),
            waiting: self.tx.max_capacity() - self.tx.capacity(),
        });
        let resp = published.answer(req, overdue)?;
        published
            .snapshot
            .metrics
            .control_command(command_name(req), resp.ok);
        Some(resp)
    }

    /// Counts a request for `command` that the socket refused (`bad_request`). Never waits:
    /// when the controller is busy with 64 requests, the count is the one thing let go.
    pub fn refused(&self, command: &'static str) {
        let _ = self.tx.try_send(Msg::Refused { command });
    }
}

/// A control request given to the controller (`ControllerHandle::hand`).
pub enum Handed {
    /// Answered without the controller's queue: a read, or refused as the proxy stops.
    Answered(Box<Response>),
    /// In the controller's queue, whose answer `Pending` waits for.
    Queued(Pending),
}

/// The answer to come to a queued request. The request is applied (or refused) as it would
/// be whether or not this is kept: dropped, only the answer is lost.
pub struct Pending(oneshot::Receiver<Response>);

impl Pending {
    pub async fn answer(self) -> Response {
        // A stopping controller answers every request it took, applied or not; no answer at
        // all means it was ended in the middle of one (a state write that outlived
        // `shutdown_timeout`), and nobody can say whether that one took effect.
        self.0.await.unwrap_or_else(|_| {
            Response::error(ErrorBody::new(
                "internal",
                "the proxy stopped before it answered; the change may or may not be in force: check with `ctl status` once it runs again",
            ))
        })
    }
}

/// Logs the refusal of a request whose client went before its answer came (closed for room
/// while a save hung, or given up on by `ctl` after 15 s): the log is then the only place it
/// is told. An applied change is logged already.
fn unheard(command: &str, by: &str, resp: &Response) {
    if let Some(e) = &resp.error {
        tracing::warn!(
            by,
            "`{command}` was refused ({}) after its client had gone: {}",
            e.code,
            e.message.replace('\n', "\\n")
        );
    }
}

/// The answer to a request the controller will not take because the proxy is stopping.
fn not_applied() -> Response {
    Response::error(ErrorBody::new(
        "shutting_down",
        "the proxy is shutting down; this command was not applied",
    ))
}

/// Rebinds the plaintext listeners to a new address list; implemented by the app.
pub trait Rebind: Send + Sync {
    /// Resolves once removed listeners have closed their sockets. The listeners it bound
    /// accept once the returned trigger is fired or dropped: the kernel queues their first
    /// clients until then, so that none is served by the config being replaced (a new
    /// `tls.listen` with no certificate in force yet closed them unanswered).
    fn rebind<'a>(
        &'a self,
        plain: &'a [std::net::SocketAddr],
        tls: &'a [std::net::SocketAddr],
    ) -> RebindFuture<'a>;
}

pub type RebindFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<crate::shutdown::Trigger, String>> + Send + 'a>,
>;

pub struct Controller {
    rx: mpsc::Receiver<Msg>,
    /// Where read-only requests find the state in force (`Published`).
    published: Arc<ArcSwapOption<Published>>,
    /// Fired when the proxy stops: the controller finishes what it is doing and ends.
    stop: Option<Shutdown>,
    rebind: Option<Arc<dyn Rebind>>,
    handle: StateHandle,
    parts: Parts,
    state: Persisted,
    /// Health by server index, as the checkers last said.
    up: Vec<bool>,
    /// By server index, whether a result has decided `up`: until then a server counts as
    /// healthy (at start, or added by a reload), which is not yet known.
    decided: Vec<bool>,
    checkers: Option<Checkers>,
    generation: u64,
    flips_tx: mpsc::UnboundedSender<Flip>,
    flips_rx: mpsc::UnboundedReceiver<Flip>,
    outage_since: Option<SystemTime>,
    /// The outage the state file says was going on when the proxy last stopped, until the
    /// first checks decide whether it still is: servers count as healthy until then, which
    /// says nothing of the application.
    resumed: Option<Resumed>,
    /// While the first check after a restart tells again the outage the previous instance
    /// told: the mode it was told from then.
    retold_from: Option<Mode>,
    /// When the held episode that last ended began: the all-clear's `since`, so that a
    /// receiver can tell how long it lasted.
    ended_since: Option<SystemTime>,
    /// The overrun of the current `until` has been reported.
    overrun_noted: bool,
    /// The schedule window in force at the last edge, to tell starts and ends apart.
    active_window: Option<u64>,
    /// The start has told what happened while the proxy was down: a window that ends unseen
    /// from now on was jumped over by the wall clock (`passed_unseen`).
    begun: bool,
    /// The wall clock and the monotonic one, read together at the run loop's last look
    /// (`watch_clock`).
    clock_seen: Option<(SystemTime, tokio::time::Instant)>,
    /// The clock reading the published snapshot was built at. The next window edge is looked
    /// for after this moment, not after "now": an edge that passed while the controller was
    /// busy with a control request is then still due, instead of silently skipped (which left
    /// a window that never started, or never ended).
    published_at: SystemTime,
    notifier: Notifier,
    /// Names this proxy in notifications (the host name).
    instance: String,
    clock: Clock,
    reloads: Reloads,
    /// When the served certificates next call for a warning (`tls::next_expiry_check`):
    /// start and reload warn of them, and a proxy may run for months between the two.
    certificates_due: Option<SystemTime>,
    /// The state file as this proxy last read or wrote it: one changed since (by hand) is
    /// not in force, which a reload and the save that replaces it say.
    written: Option<store::Seen>,
    /// A state put in force without an operator (a window's edge, a health flip) failed to
    /// save: the file holds an older one, which a restart would read. Saved again by the
    /// next write, and tried by a reload (what an operator does once the cause is mended).
    unsaved: bool,
    /// The state file's lock, held by the app (`app::Running`), which lets it go at the stop.
    lock: Option<Arc<store::StateLock>>,
    /// The state in force changed by itself (`settle`) since it was last saved: `flush` saves it.
    behind: bool,
    /// Events about a state in force but not saved yet (`behind`), sent once `flush` has
    /// written it: a receiver told of an outage must find it in the state file, so that a
    /// `kill -9` right after the event leaves what a clean stop does (a restart tells it
    /// again as the same outage). Later events wait behind them, in order.
    unsent: Vec<Event>,
    /// A save is under way with events waiting for it (`flush`): those that come meanwhile
    /// queue behind them.
    holding: bool,
    /// The save under way has taken `HOLD_EVENTS`: the events it held went, and those that
    /// come until it returns go at once. Any save, an operator's change's too: an outage found
    /// during a change whose fsync hung waited for that fsync, for ever on a hung disk.
    overdue: bool,
    /// A health flip or window edge was put in force during the write under way
    /// (`write_state`): the change being saved is applied on top of it.
    served: bool,
    /// When the save under way began, once it has taken `HOLD_EVENTS`: what `status` says of
    /// it (`StatusView::save_overdue`), since the changes waiting for it are not shown.
    saving: Arc<ArcSwapOption<SystemTime>>,
    /// Holds state writes while a test wants a slow disk.
    #[cfg(test)]
    write_gate: Option<Arc<tests::Gate>>,
}

/// Reloads asked for. Their files are read off the controller: a file that blocks (a FIFO, a
/// hung network mount) then holds up the reload alone, never a control command, a health
/// change or a window's edge, and is given up after `RELOAD_READ_LIMIT`. One read at a time:
/// who asks while one is under way gets the next, which begins once it is applied, since
/// they asked after it began reading.
#[derive(Default)]
struct Reloads {
    reading: Option<tokio::task::JoinHandle<Result<Prepared, String>>>,
    /// Who asked for the read under way.
    current: Vec<Asker>,
    /// Who asked since it began.
    next: Vec<Asker>,
    /// Set by the last read's blocking work when it returns. Still unset while no read is
    /// under way: that read was given up and its thread still waits on a file; another read
    /// would only wait beside it, one more thread each time, in the pool the control socket
    /// and the state file need too.
    returned: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The last reload, when it was refused: when, and why (`StatusView::reload_refused`).
    refused: Option<crate::state::mode::Update>,
    /// What the file in force changed that waits for a restart (`StatusView::restart_pending`).
    pending: Vec<String>,
}

/// An outage a previous instance of the proxy left going on (`Persisted::outage_since`).
#[derive(Debug, Clone, Copy)]
struct Resumed {
    since: SystemTime,
    /// Whether `outage` is the last mode receivers were told: the previous instance showed
    /// it (no maintenance, no force-open) and this start told nothing else since (a window
    /// that ended while it was down is told as ending in the outage). Only then is an end
    /// of the outage theirs to hear of.
    told: bool,
    /// The mode it was told from (`Persisted::outage_told_from`).
    from: Option<Mode>,
}

/// Who asked for a reload (`ctl`'s user, or the signal), and where the answer goes.
type Asker = (String, oneshot::Sender<Response>);

/// What a reload read and built from its files, before anything of it is in force.
struct Prepared {
    parts: Parts,
    notify: Vec<crate::notify::Target>,
    /// Valid but likely not meant (what `check` would say), or read but kept until a
    /// restart: logged, and returned to who asked, since `ctl reload` exited 0 without a
    /// word of them.
    warnings: Vec<String>,
    /// The keys read but kept as they run until a restart, as `warnings` say them.
    pending: Vec<String>,
}

/// Marks a reload's read as returned when dropped: by its blocking work, however that ends
/// (a panic too), or with the task when there was nothing to read.
struct Returned(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Returned {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// How long a reload may take to read and build its files: a local disk takes milliseconds.
const RELOAD_READ_LIMIT: Duration = Duration::from_secs(10);

/// How long a webhook event waits for the save of the state it tells (`Controller::unsent`)
/// before it goes anyway, said in the log: a receiver must be able to rely on a restart
/// knowing what it was told, but not at the price of an outage's alert held by a hung disk.
#[cfg(not(test))]
const HOLD_EVENTS: Duration = Duration::from_secs(5);
#[cfg(test)]
const HOLD_EVENTS: Duration = Duration::from_secs(2);

/// A controller given up at a stop (its last save hung past `shutdown_timeout`) hands the
/// events still waiting for a save to the webhooks' queues, where the stop's own bound counts
/// and logs what is not delivered (README, "Notifications"), rather than dropping them unsaid.
impl Drop for Controller {
    fn drop(&mut self) {
        for event in std::mem::take(&mut self.unsent) {
            self.notifier.send(event);
        }
    }
}

impl Controller {
    /// Builds the first snapshot and the controller that will own every later one.
    pub fn new(
        parts: Parts,
        state: Persisted,
        notifier: Notifier,
        clock: Clock,
    ) -> (Controller, ControllerHandle, StateHandle) {
        let now = clock.now();
        let up = vec![true; parts.config.upstream.servers.len()];
        let decided = vec![false; up.len()];
        let snapshot = Snapshot::build(
            &parts,
            &Inputs {
                state: &state,
                up: &up,
                passive: Arc::from(Vec::new()),
                outage_since: None,
                now,
            },
        );
        let (flips_tx, flips_rx) = mpsc::unbounded_channel();
        let handle = StateHandle::new(snapshot);
        parts.metrics.set_certificate_ends(&parts.tls.ends);
        let certificates_due = crate::tls::next_expiry_check(&parts.tls.ends, now);
        let (tx, rx) = mpsc::channel(64);
        let overrun_noted = false;
        // As the start just read it.
        let written = store::seen(&parts.config.control.state_file);
        let published = Arc::new(ArcSwapOption::empty());
        let saving = Arc::new(ArcSwapOption::empty());
        let controller = Controller {
            rx,
            published: published.clone(),
            stop: None,
            rebind: None,
            handle: handle.clone(),
            parts,
            state,
            up,
            decided,
            checkers: None,
            generation: 0,
            flips_tx,
            flips_rx,
            outage_since: None,
            resumed: None,
            retold_from: None,
            ended_since: None,
            overrun_noted,
            active_window: None,
            begun: false,
            clock_seen: None,
            published_at: now,
            notifier,
            instance: instance_name(),
            clock,
            reloads: Reloads::default(),
            certificates_due,
            written,
            unsaved: false,
            lock: None,
            behind: false,
            unsent: Vec::new(),
            holding: false,
            overdue: false,
            served: false,
            saving: saving.clone(),
            #[cfg(test)]
            write_gate: None,
        };
        let control = ControllerHandle {
            tx,
            published,
            overdue: saving,
        };
        (controller, control, handle)
    }

    /// Lets saves and reloads take the state file's lock again when its file is gone.
    pub fn set_lock(&mut self, lock: Arc<store::StateLock>) {
        self.lock = Some(lock);
    }

    /// Lets reloads change the listen addresses.
    pub fn set_rebind(&mut self, rebind: Arc<dyn Rebind>) {
        self.rebind = Some(rebind);
    }

    /// Ends the controller once `stop` fires, after the work in hand: a command it has begun
    /// (its state write under way) is finished and answered, since it may already be saved,
    /// and every one it has not begun is refused as not applied.
    pub fn stop_on(&mut self, stop: Shutdown) {
        self.stop = Some(stop);
    }

    pub async fn run(mut self) {
        let mut stop = self.stop.take();
        let now = self.clock.now();
        // What happened while the proxy was down is told now: a window that ended, one that
        // started, an announced end that passed. Nothing records what was told before, so
        // every start announces again the window in force and an end already passed
        // (receivers take it as a repeat); a lost event would leave a status page wrong.
        // Only a running proxy removes ended windows, so those are told exactly once: by
        // `settle`, as the windows a clock jump passes over are (`passed_unseen`).
        let left = self.state.clone();
        // A window that ended while the proxy was down ended in the outage (with no
        // operator's `on`, which `mode` would show), and is told so (`ended_while_down`):
        // the outage is still the last word, whose end receivers must hear.
        self.resumed = left.outage_since.map(|since| Resumed {
            since: since.0,
            told: left.mode(false, now) == Mode::Outage,
            from: left.outage_told_from,
        });
        self.start_checkers().await;
        let (before, mode) = self.settle(now, "started");
        self.begun = true;
        self.parts.metrics.set_mode(mode);
        // A window in force at start began before it: it took over from the mode of the
        // moment before its start, not from the mode this start first published (the
        // window's own), nor from the servers counted healthy until their first checks.
        let taken_over = self.state.taken_over(self.published_at).unwrap_or(before);
        self.window_events(taken_over);
        loop {
            // What the last message put in force by itself, once it has told it.
            self.flush(true).await;
            // Checked before each message, not only raced with it: once the stop has begun,
            // no further command is applied, however many wait.
            if stop.as_ref().is_some_and(Shutdown::is_fired) {
                break;
            }
            self.watch_clock();
            let overrun_at = self.pending_overrun().map(|t| self.clock.until(t));
            let certificates_at = self.certificates_due.map(|t| self.clock.until(t));
            let edge = self
                .state
                .next_edge(self.published_at)
                .map(|t| self.clock.until(t));
            tokio::select! {
                () = stopped(&mut stop) => break,
                // Round again to the flush; a message ready too is as likely to go first.
                () = std::future::ready(()), if self.behind => {}
                _ = sleep_capped(edge), if edge.is_some() => self.on_edge(),
                msg = self.rx.recv() => match msg {
                    Some(Msg::Control { req: Request::Reload, by, reply }) => {
                        self.ask_reload(by, reply);
                    }
                    Some(Msg::Control { req, by, reply }) => {
                        let command = command_name(&req);
                        let resp = self.control(req, by.clone()).await;
                        if let Err(resp) = reply.send(resp) {
                            unheard(command, &by, &resp);
                        }
                    }
                    Some(Msg::Refused { command }) => {
                        self.parts.metrics.control_command(command, false);
                    }
                    None => break,
                },
                read = read(&mut self.reloads.reading), if self.reloads.reading.is_some() => {
                    self.finish_reload(read).await;
                }
                Some(flip) = self.flips_rx.recv() => self.on_flip(flip),
                _ = sleep_capped(overrun_at), if overrun_at.is_some() => self.note_overrun(),
                _ = sleep_capped(certificates_at), if certificates_at.is_some() => {
                    self.note_certificates();
                }
            }
        }
        self.refuse_the_rest();
        // The last state in force, saved before the proxy exits (a flip during the stop).
        self.flush(false).await;
    }

    /// Answers every request still waiting, and the reloads still reading, as not applied.
    fn refuse_the_rest(&mut self) {
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Control { reply, .. } = msg {
                let _ = reply.send(not_applied());
            }
        }
        let reloads = std::mem::take(&mut self.reloads);
        for (_, reply) in reloads.current.into_iter().chain(reloads.next) {
            let _ = reply.send(not_applied());
        }
    }

    fn healthy(&self) -> bool {
        self.up.iter().any(|&u| u)
    }

    /// Whether a server is known to be healthy: one counted healthy only until its first
    /// check (at start) does not say that the application is back.
    fn known_healthy(&self) -> bool {
        self.up.iter().zip(&self.decided).any(|(&u, &d)| u && d)
    }

    /// (Re)starts one checker per server; every server counts as healthy until its first
    /// check, which runs at once.
    /// A server that stays in the list across a reload keeps its health, so that a reload
    /// during an outage does not send traffic to servers known to be down; one added by it
    /// during an outage starts down.
    async fn start_checkers(&mut self) {
        self.generation += 1;
        let cfg = &self.parts.config;
        let previous = self
            .checkers
            .as_ref()
            .map(|c| c.table.list())
            .unwrap_or_default();
        let was = |s: &crate::config::Upstream| {
            let name = s.to_string();
            previous.iter().find(|h| h.server == name)
        };
        // Only what a check decided: a server not checked yet when the checkers restart (a
        // reload just after the start) stays undecided, counted healthy but not known to be,
        // as at start (`known_healthy`).
        let known = |s: &crate::config::Upstream| was(s).and_then(|h| h.healthy);
        // A server new at a reload during an outage starts down and must pass `rise` checks:
        // counted healthy until its first check, as at start, it would end the outage on
        // paper, and webhooks would announce a recovery that its first failed check takes back.
        let new = (self.checkers.is_some() && !self.up.iter().any(|&u| u)).then_some(false);
        let start: Vec<Option<bool>> = cfg
            .upstream
            .servers
            .iter()
            .map(|s| known(s).or(new))
            .collect();
        let seeds: Vec<_> = cfg
            .upstream
            .servers
            .iter()
            .zip(&start)
            .map(|(s, &up)| (up, was(s).cloned()))
            .collect();
        let names: Vec<String> = cfg
            .upstream
            .servers
            .iter()
            .map(ToString::to_string)
            .collect();
        // The old checkers are gone before their servers' metrics are: none records after.
        if let Some(old) = self.checkers.take() {
            old.stop().await;
        }
        for gone in previous.iter().filter(|h| !names.contains(&h.server)) {
            self.parts.metrics.forget_upstream(&gone.server);
        }
        self.up = start.iter().map(|h| h.unwrap_or(true)).collect();
        self.decided = start.iter().map(Option::is_some).collect();
        for (server, up) in cfg.upstream.servers.iter().zip(&self.up) {
            self.parts
                .metrics
                .set_upstream_health(&server.to_string(), *up);
        }
        if self.healthy() {
            self.outage_since = None;
        } else if self.outage_since.is_none() {
            // A reload that leaves only servers known to be down (the healthy one taken off
            // the list) begins the outage here, with no flip to begin it: without a start,
            // its event, pages, `status` and state file had no `since`.
            self.outage_begins(self.clock.now());
        }
        let cfg = &self.parts.config;
        self.checkers = Some(health::spawn(
            &cfg.upstream.servers,
            &cfg.health,
            &seeds,
            &self.parts.pool.tls,
            &self.parts.metrics,
            self.flips_tx.clone(),
            self.generation,
        ));
    }

    fn on_flip(&mut self, flip: Flip) {
        if flip.generation != self.generation {
            return;
        }
        let Some(slot) = self.up.get_mut(flip.index) else {
            return;
        };
        *slot = flip.healthy;
        if let Some(decided) = self.decided.get_mut(flip.index) {
            *decided = true;
        }
        // A server known healthy ends an outage left going on by the previous instance, which
        // `settle` then clears from the state file.
        let back = self.resumed.filter(|_| self.known_healthy());
        if back.is_some() {
            self.resumed = None;
        }
        if !flip.changed {
            // A first check that found the server as it was counted: nothing changed for
            // clients, but a healthy server is now known, which may end an episode whose
            // words were kept since the start (`settle`).
            let (before, after) = self.settle(self.clock.now(), "first health check");
            if !self.window_events(before) && before == after {
                self.tell_resumed_end(back, after, &flip);
            }
            return;
        }
        let server = self.server_name(flip.index);
        if flip.healthy {
            tracing::info!(%server, reason = %flip.reason, "upstream server is healthy again");
        } else {
            tracing::warn!(%server, reason = %flip.reason, "upstream server is down");
        }
        let healthy = self.healthy();
        let now = self.clock.now();
        match (healthy, self.outage_since) {
            // An outage the previous instance left going on goes on from its own start, in
            // what clients are shown and in the event that tells it again.
            (false, None) => self.outage_begins(now),
            (true, Some(_)) => self.outage_since = None,
            _ => {}
        }
        self.parts
            .metrics
            .set_upstream_health(&server, flip.healthy);
        if !flip.healthy {
            self.parts.metrics.upstream_marked_down(&server);
        }
        // Back to normal clears the episode's words; that is a change of the saved state.
        let reason = format!("{server}: {}", flip.reason);
        let (before, after) = self.settle(now, &reason);
        let previous = match self.retold_from.take() {
            Some(from) if before != after && after == Mode::Outage => from,
            _ => before,
        };
        if !self.window_events(before) {
            if before != after {
                self.notify(EventKind::ModeChanged, previous, None, Some(reason));
            } else {
                self.tell_resumed_end(back, after, &flip);
            }
        }
    }

    /// No server is healthy any more, and no outage was going on: it begins `now`, or goes on
    /// from its own start if the previous instance left it going on, in what clients are
    /// shown and in the event that tells it again.
    fn outage_begins(&mut self, now: SystemTime) {
        let resumed = self.resumed.take();
        self.outage_since = Some(resumed.map_or(now, |r| r.since));
        self.retold_from = resumed.filter(|r| r.told).and_then(|r| r.from);
    }

    /// The server a health flip is about, as the config names it.
    fn server_name(&self, index: usize) -> String {
        self.parts
            .config
            .upstream
            .servers
            .get(index)
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// Tells receivers that the outage the previous instance told them of is over, when the
    /// first check after the start finds a server healthy: no mode changes here (the start
    /// counted the servers healthy), and nothing else would ever tell them, leaving alerts
    /// and status pages on `outage`. `since` is when the outage began, as a running proxy's
    /// return to normal carries it.
    fn tell_resumed_end(&mut self, back: Option<Resumed>, mode: Mode, flip: &Flip) {
        let Some(r) = back.filter(|r| r.told && mode == Mode::Normal) else {
            return;
        };
        let server = self.server_name(flip.index);
        tracing::info!(
            %server,
            since = %crate::time::Timestamp(r.since).rfc3339(),
            "the outage going on when the proxy stopped is over: telling the webhooks"
        );
        self.ended_since = Some(r.since);
        let reason = format!(
            "{server}: {}, at its first check since the proxy restarted",
            flip.reason
        );
        self.notify(EventKind::ModeChanged, Mode::Outage, None, Some(reason));
    }

    /// Warns of a system clock set back (NTP stepping a clock that ran fast, `date -s`) since
    /// the last look, by as much as it went back: times in `status` and the log then run
    /// behind ones already written, and a window in force stays so until its end
    /// (`Window::started`), which comes later by as much. Told by the monotonic clock, which
    /// no step moves: the wall clock compared with the last publish's alone missed a step
    /// made during a window with nothing published until its end (by then later than that
    /// publish again), which the operator then saw end late without a word, and told a step
    /// less what the wall clock had run since. Looked at each round of the run loop, at
    /// least once a minute while a window or an announced end is pending (`sleep_capped`).
    fn watch_clock(&mut self) {
        let seen = (self.clock.now(), tokio::time::Instant::now());
        let Some((wall, mono)) = self.clock_seen.replace(seen) else {
            return;
        };
        let ran = seen.1.saturating_duration_since(mono);
        // Where the wall clock would be, had it run as the monotonic one did.
        let Some(expected) = wall.checked_add(ran) else {
            return;
        };
        let Ok(back) = expected.duration_since(seen.0) else {
            return;
        };
        // A second at least, and more than NTP's slewing of a clock (at most 500 ppm) over a
        // quiet day could make it look.
        if back >= Duration::from_secs(1).max(ran / 1000) {
            tracing::warn!(
                "the system clock went back by {} (from {} to {}); windows and announced ends are wall-clock times, and a window in force stays in force until its end",
                humantime::format_duration(Duration::from_secs(back.as_secs())),
                crate::time::Timestamp(expected).rfc3339(),
                crate::time::Timestamp(seen.0).rfc3339()
            );
        }
    }

    /// A schedule window started or ended: drop the ended ones (a change of the saved state)
    /// and publish the mode of the moment.
    fn on_edge(&mut self) {
        let now = self.clock.now();
        // A capped sleep wakes before the edge: nothing to do yet.
        if self
            .state
            .next_edge(self.published_at)
            .is_some_and(|t| t > now)
        {
            return;
        }
        let (before, _) = self.settle(now, "scheduled maintenance window");
        self.window_events(before);
    }

    /// Drops the windows ended by `now` (saving the state) and publishes the state of `now`.
    /// Every publish that may cross a window edge goes through here and is followed by
    /// `window_events`, since `published_at` moves past the edge: the edge's own wake-up
    /// will not come again.
    fn settle(&mut self, now: SystemTime, reason: &str) -> (Mode, Mode) {
        let passed = self.passed_unseen(now);
        // The episode's words (an operator's `update` during an outage, and its timeline) go
        // once the application is known to be back, not while a server only counts as healthy
        // until its first check: a restart during an outage would otherwise lose them, on
        // disk too, before that check found the outage still going on.
        let mut next = self.state.clone().tidied(self.known_healthy(), now);
        // Kept as saved until the first checks decide, for the same reason as the words.
        if self.resumed.is_none() {
            next.outage_since = self.outage_since.map(crate::time::Timestamp);
            next.outage_told_from = self.outage_told_from(&next, now);
        }
        // Published now and saved after (`flush`): what comes here is in force already (a
        // health flip, a window's edge, an announced end passing), with no operator waiting
        // to be told it was saved, and a slow or hung disk held the outage's holding page
        // back from clients for as long as the fsync took: the data plane kept forwarding to
        // servers known down. Saved once whatever handles it now has told it (webhooks, log):
        // a flip that comes during the save is handled whole, and its own words never go out
        // before those of what came first.
        if next != self.state {
            self.state = next;
            self.behind = true;
        }
        let modes = self.publish(now, reason);
        self.tell_passed(passed);
        modes
    }

    /// The windows that have ended by `now` without this proxy seeing them in force (not the
    /// window of its last edge), with the state that held them: those that ended while the
    /// proxy was down, at the start, and, once running, those the wall clock jumped over (a
    /// suspend, a VM paused, the clock set forward), whose start and end both passed between
    /// two of its looks. Tidied away unsaid, such a window was told neither started nor
    /// ended, nor logged, where one that passed while the proxy was down is told ended.
    fn passed_unseen(&self, now: SystemTime) -> Option<(Persisted, Vec<Window>)> {
        let passed: Vec<Window> = (self.state.schedules.iter())
            .filter(|w| w.end.0 <= now && Some(w.id) != self.active_window)
            .cloned()
            .collect();
        (!passed.is_empty()).then(|| (self.state.clone(), passed))
    }

    /// Tells the windows `passed_unseen` found as the running proxy would have told their
    /// ends (`ended_while_down`), in the order of their starts.
    fn tell_passed(&mut self, passed: Option<(Persisted, Vec<Window>)>) {
        let Some((left, windows)) = passed else {
            return;
        };
        for w in &windows {
            if self.begun {
                tracing::warn!(
                    "maintenance window {} ({} to {}) passed without being in force: the system clock jumped past it (a suspend, or the clock set forward)",
                    w.id,
                    w.start.rfc3339(),
                    w.end.rfc3339()
                );
            } else {
                tracing::info!("maintenance window {} ended while the proxy was down", w.id);
            }
            let event = self.ended_while_down(&left, w);
            self.send(event);
        }
    }

    /// What `next`, about to be saved and published at `now`, keeps as the mode its outage was
    /// told from: the mode shown now if `next` shows the outage first (the event that tells
    /// it names that mode), else what was kept. Saved with the change that shows it, so that
    /// a restart tells it again as it was told.
    fn outage_told_from(&self, next: &Persisted, now: SystemTime) -> Option<Mode> {
        next.outage_since?;
        let shown = self.handle.load().mode;
        if shown != Mode::Outage && next.mode(self.healthy(), now) == Mode::Outage {
            Some(self.retold_from.unwrap_or(shown))
        } else {
            next.outage_told_from
        }
    }

    /// Sends the start and end events of schedule windows, whatever caused them (a clock
    /// edge, an operator adding a window that starts now or removing the one in force).
    /// Returns whether it sent any.
    fn window_events(&mut self, previous: Mode) -> bool {
        self.window_events_by(previous, None)
    }

    /// `window_events`, for a change an operator made (`by`, described as `summary`): a
    /// window their command ended is told as theirs (`off`, `schedule remove`), not as an end
    /// that came by itself with nobody named.
    fn window_events_by(&mut self, previous: Mode, cause: Option<(&str, &str)>) -> bool {
        // The published snapshot's clock, so that the events agree with what clients see.
        let active = self
            .state
            .active_window(self.published_at)
            .map(|w| (w.id, w.by.clone()));
        let was = self.active_window;
        self.active_window = active.as_ref().map(|(id, _)| *id);
        let mut sent = false;
        if let Some(id) = was.filter(|id| Some(*id) != self.active_window) {
            tracing::info!("maintenance window {id} ended");
            let event = Event {
                window: Some(id),
                ..self.event(
                    EventKind::ScheduleEnded,
                    previous,
                    cause.map(|(by, _)| by.to_owned()),
                    cause.map(|(_, summary)| summary.to_owned()),
                )
            };
            self.send(event);
            sent = true;
        }
        if let Some((id, by)) = active.filter(|(id, _)| Some(*id) != was) {
            tracing::info!("maintenance window {id} started");
            self.notify_window(EventKind::ScheduleStarted, previous, Some(by), id);
            sent = true;
        }
        sent
    }

    /// Tells the webhooks what just happened, with the state of the moment.
    fn notify(
        &mut self,
        kind: EventKind,
        previous: Mode,
        by: Option<String>,
        reason: Option<String>,
    ) {
        let event = self.event(kind, previous, by, reason);
        self.send(event);
    }

    /// Sends `event` to the webhooks, or keeps it until the state it tells of is saved
    /// (`unsent`).
    fn send(&mut self, event: Event) {
        if !self.overdue && (self.behind || self.holding || !self.unsent.is_empty()) {
            self.unsent.push(event);
        } else {
            self.notifier.send(event);
        }
    }

    /// `notify`, of the start or end of schedule window `id`.
    fn notify_window(&mut self, kind: EventKind, previous: Mode, by: Option<String>, id: u64) {
        let event = Event {
            window: Some(id),
            ..self.event(kind, previous, by, None)
        };
        self.send(event);
    }

    /// The `schedule_ended` of window `w`, which ended while the proxy was down, as a running
    /// proxy would have sent it at the end (`left` is the state the proxy left, with `w`):
    /// `at` the end, and the mode, words and times of that moment, not of this start, so that
    /// a receiver reads how long the window lasted (`since` its start), as it would have.
    fn ended_while_down(&self, left: &Persisted, w: &Window) -> Event {
        let at = w.end.0;
        let mut then = left.clone();
        // An operator's `on` holds from its own start only.
        then.planned = then.planned.filter(|p| p.since.0 <= at);
        // The servers' health then is the outage the state file kept, going on since before
        // the stop (as `Persisted::taken_over` reads it): at a start they count healthy until
        // their first checks, which told an outage's window as ending in a return to normal,
        // and the outage again right after.
        let outage = left.outage_since.map(|s| s.0).filter(|s| *s <= at);
        let healthy = outage.is_none();
        let m = &self.parts.config.maintenance;
        let mode = then.mode(healthy, at);
        // Seen as the running proxy's edge left it: tidied at `at`, which hands the start of
        // windows put end to end on to the one after (`continues`), so that the maintenance
        // going on is told from the chain's first start, as the restart's `schedule_started`
        // of the window in force tells it, not from the next window's own.
        let after = then.clone().tidied(healthy, at);
        // Told as ending in the outage, it carries the outage's start as a running proxy's does.
        let view = (mode != Mode::Normal).then(|| View::new(mode, &after, m, outage, at));
        // A return to normal carries when the episode it ends began: the `since` shown just
        // before the end (the window's start, or an operator's `on` before it).
        let began = || {
            let just_before = at.checked_sub(Duration::from_nanos(1))?;
            let mode = then.mode(healthy, just_before);
            View::new(mode, &then, m, None, just_before).since
        };
        let planned = then.planned.as_ref();
        Event {
            event: EventKind::ScheduleEnded,
            mode,
            previous_mode: Mode::Maintenance,
            message: view.as_ref().map(|v| v.message.clone()),
            reason: planned.and_then(|p| p.reason.clone()),
            by: planned.map(|p| p.by.clone()),
            at: crate::time::Timestamp(at),
            since: match &view {
                Some(v) => v.since,
                None => began(),
            }
            .map(crate::time::Timestamp),
            until: view.and_then(|v| v.until).map(crate::time::Timestamp),
            window: Some(w.id),
            instance: self.instance.clone(),
        }
    }

    fn event(
        &self,
        kind: EventKind,
        previous: Mode,
        by: Option<String>,
        reason: Option<String>,
    ) -> Event {
        let snap = self.handle.load();
        let view = snap.held.as_ref().map(|h| &h.view);
        let planned = self.state.planned.as_ref();
        Event {
            event: kind,
            mode: snap.mode,
            previous_mode: previous,
            message: view.map(|v| v.message.clone()),
            reason: reason.or_else(|| planned.and_then(|p| p.reason.clone())),
            by: by.or_else(|| planned.map(|p| p.by.clone())),
            at: crate::time::Timestamp(self.clock.now()),
            since: match view {
                Some(v) => v.since.map(crate::time::Timestamp),
                None => self.ended_since.map(crate::time::Timestamp),
            },
            until: view.and_then(|v| v.until).map(crate::time::Timestamp),
            window: None,
            instance: self.instance.clone(),
        }
    }

    /// Saves the state in force when `settle` changed it (a clock edge, a health flip): a
    /// failure is logged, since there is no operator to refuse. `serve`: as `write_state`;
    /// what that puts in force during the write is saved by the next one, all together, one
    /// round of the run loop later: a message that waits may go first (a server flapping
    /// faster than the disk writes would otherwise keep every command waiting).
    /// The events about what it saves go once it is written (or failed, said in the log);
    /// those of what comes during the write wait for the next.
    async fn flush(&mut self, serve: bool) {
        if std::mem::take(&mut self.behind) {
            let state = self.state.clone();
            // The events about `state`; `write_state` lets them go if the save takes too long.
            let about = self.unsent.len();
            self.holding = about > 0;
            let written = self.write_state(&state, serve).await;
            self.holding = false;
            if let Err((e, advice)) = written {
                tracing::error!("{e}; {advice}, then reload to save the state in force");
                self.unsaved = true;
            }
            // Still here unless the save's bound let them go (and everything after them).
            let told: Vec<Event> = self.unsent.drain(..about.min(self.unsent.len())).collect();
            for event in told {
                self.notifier.send(event);
            }
        }
        // Nothing left unsaved: what came during the write goes too.
        if !self.behind {
            for event in std::mem::take(&mut self.unsent) {
                self.notifier.send(event);
            }
        }
    }

    /// The save under way has taken `HOLD_EVENTS`: what it holds goes now, in order, and what
    /// comes before it returns goes at once (`send`). A stalled disk (NFS, a throttled
    /// volume) must not keep an outage's webhook back for as long as the fsync hangs.
    fn save_overdue(&mut self) {
        self.overdue = true;
        let late = std::mem::take(&mut self.unsent);
        // Said whatever it holds: an operator's change waits for it, and those after it, and
        // nothing else said that the disk had stopped answering.
        let sent = match late.len() {
            0 => String::new(),
            n => format!("; {n} webhook event(s) sent before it is saved"),
        };
        tracing::warn!(
            path = %self.parts.config.control.state_file.display(),
            "the state file's save is taking over {}s (is its disk slow or hung?): changes wait for it, one at a time, while `status` answers with the state in force{sent}",
            HOLD_EVENTS.as_secs(),
        );
        for event in late {
            self.notifier.send(event);
        }
    }

    /// Writes the state file on the blocking pool (an fsync must not stall the data plane).
    /// A failure is said with what to do about it (`StoreError::advice`).
    /// With `serve`, the health flips and window edges that come meanwhile are put in force
    /// at once (and saved after, `flush`): a slow or hung disk held an outage found during an
    /// operator's change back from clients, who were forwarded to servers known down for as
    /// long as the fsync took. Only where nothing of what is being saved is told after the
    /// write (an operator's change is put in force once saved): a flip's words must not come
    /// before those of what came first.
    async fn write_state(
        &mut self,
        next: &Persisted,
        serve: bool,
    ) -> Result<(), (String, &'static str)> {
        let path = self.parts.config.control.state_file.clone();
        let saved = next.clone();
        let lock = self.lock.clone();
        #[cfg(test)]
        let gate = self.write_gate.clone();
        let mut writing = tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            if let Some(gate) = gate {
                gate.pass();
            }
            let before = store::seen(&path);
            // Saved only under the lock: a second instance that took the state file while
            // its lock file was gone would have its changes overwritten, and overwrite ours.
            let saved = renew(lock.as_deref()).and_then(|()| store::save(&path, &saved));
            (before, saved, store::seen(&path))
        });
        let began = self.clock.now();
        let hold = tokio::time::sleep(HOLD_EVENTS);
        tokio::pin!(hold);
        let written = loop {
            let edge = self
                .state
                .next_edge(self.published_at)
                .map(|t| self.clock.until(t))
                .filter(|_| serve);
            tokio::select! {
                written = &mut writing => break written,
                Some(flip) = self.flips_rx.recv(), if serve => {
                    self.served = true;
                    self.on_flip(flip);
                }
                _ = sleep_capped(edge), if edge.is_some() => {
                    self.served = true;
                    self.on_edge();
                }
                () = &mut hold, if !self.overdue => {
                    self.saving.store(Some(Arc::new(began)));
                    self.save_overdue();
                }
            }
        };
        self.saving.store(None);
        self.overdue = false;
        let (before, saved, after) = written.map_err(|e| {
            let advice = "Make room on that file system (or let the proxy's user write there)";
            (format!("state file writer failed: {e}"), advice)
        })?;
        saved.map_err(|e| (e.to_string(), e.advice()))?;
        if before != self.written {
            // An edit by hand, now gone: said, since whoever made it believes it in force.
            tracing::warn!(
                path = %self.parts.config.control.state_file.display(),
                "the state file was changed since this proxy last wrote it (by hand?), and is replaced with the running state: a running proxy reads it at start only; change the state with `intermission ctl`"
            );
        }
        self.written = after;
        // The whole state is written: whatever an earlier save failed to keep is kept now.
        self.unsaved = false;
        Ok(())
    }

    /// What a reload finds of a state file not as this proxy last read or wrote it: changed,
    /// to be said, since an operator who edits it by hand and reloads would otherwise believe
    /// it in force; or removed, to be written again.
    async fn state_file_edited(&self) -> Option<Edited> {
        let path = self.parts.config.control.state_file.clone();
        let shown = path.display().to_string();
        let (now, gone) = tokio::task::spawn_blocking(move || {
            let gone = crate::config::state_file_folder(&path).is_err();
            (store::seen(&path), gone)
        })
        .await
        .ok()?;
        // No edit: its folder is gone, which the reload's read said.
        if gone || now == self.written {
            return None;
        }
        if now.is_none() {
            return Some(Edited::Gone);
        }
        Some(Edited::Changed(format!(
            "control.state_file {shown} was changed since this proxy last wrote it: a running proxy reads it at start only, so the state in force stays (see `ctl status`), and its next change replaces the file; change the state with `intermission ctl`"
        )))
    }

    /// The end clients are shown now, if anything is held and has one.
    fn shown_until(&self) -> Option<SystemTime> {
        self.handle.load().held.as_ref().and_then(|h| h.view.until)
    }

    /// The message clients are shown now, if anything is held.
    fn shown_message(&self) -> Option<String> {
        self.handle
            .load()
            .held
            .as_ref()
            .map(|h| h.view.message.clone())
    }

    fn pending_overrun(&self) -> Option<SystemTime> {
        if self.overrun_noted {
            return None;
        }
        let until = self.state.planned.as_ref()?.until?;
        Some(crate::time::announced_end(until.0))
    }

    fn note_overrun(&mut self) {
        // A capped sleep wakes before the announced end: nothing to say yet.
        if self.pending_overrun().is_some_and(|t| t > self.clock.now()) {
            return;
        }
        self.overrun_noted = true;
        if let Some(p) = &self.state.planned {
            tracing::warn!(
                until = %p.until.map(|u| u.rfc3339()).unwrap_or_default(),
                "planned maintenance overran its announced end; it stays on until `off`, and Retry-After falls back to the configured value"
            );
            let (before, mode) = self.settle(self.clock.now(), "announced end passed");
            // A window that ended at the same moment says so first.
            self.window_events(before);
            self.notify(EventKind::UntilOverrun, mode, None, None);
        }
    }

    /// Warns of the certificates that end soon or have ended, when that is due.
    fn note_certificates(&mut self) {
        let now = self.clock.now();
        // A capped sleep wakes before it is due: nothing to say yet.
        if self.certificates_due.is_some_and(|t| t > now) {
            return;
        }
        for warning in crate::tls::expiry_warnings(&self.parts.tls.ends, now) {
            tracing::warn!("{warning}");
        }
        self.certificates_due = crate::tls::next_expiry_check(&self.parts.tls.ends, now);
    }

    async fn control(&mut self, req: Request, by: String) -> Response {
        let name = command_name(&req);
        let resp = self.apply_request(req, by).await;
        self.parts.metrics.control_command(name, resp.ok);
        resp
    }

    async fn apply_request(&mut self, req: Request, by: String) -> Response {
        match req {
            Request::Status => Response::state(self.status_view()),
            Request::Health => Response::health(self.health()),
            Request::ScheduleList => Response::schedules(self.state.schedules.clone()),
            other => {
                let now = self.clock.now();
                let change = match to_change(other, by.clone(), now) {
                    Ok(c) => c,
                    Err(e) => return Response::error(e),
                };
                let known: Vec<u64> = self.state.schedules.iter().map(|w| w.id).collect();
                let added = matches!(change, Change::ScheduleAdd { .. });
                match self.change(change, now, &by).await {
                    Ok(notes) => {
                        let window = added.then(|| self.new_window(&known)).flatten();
                        Response::state(self.status_view())
                            .with_warnings(notes)
                            .with_window(window)
                    }
                    Err(e) => Response::error(e),
                }
            }
        }
    }

    /// The window scheduled since the ids `known` were: the one a `schedule_add` made.
    fn new_window(&self, known: &[u64]) -> Option<Window> {
        self.state
            .schedules
            .iter()
            .find(|w| !known.contains(&w.id))
            .cloned()
    }

    /// Applies an operator's change; returns what the operator should be told beside it.
    async fn change(
        &mut self,
        change: Change,
        now: SystemTime,
        by: &str,
    ) -> Result<Vec<String>, ErrorBody> {
        let mut summary = describe(&change);
        let known: Vec<u64> = self.state.schedules.iter().map(|w| w.id).collect();
        // A mode that force-open changed is not the application's doing: the webhook says so,
        // or "back to normal after an outage" would read as a recovery mid-incident.
        let forced = matches!(change, Change::ForceOpen(_)).then(|| summary.clone());
        let change_is_off = matches!(change, Change::Off);
        // An `update` speaks of the mode clients are in (refused in `normal`); any other
        // change is tidied as `settle` tidies, once a server is known to be healthy, not while
        // one only counts as healthy until its first check: a change made just after a
        // restart during an outage would otherwise lose the operator's words.
        let healthy = match change {
            Change::Update { .. } => self.healthy(),
            _ => self.known_healthy(),
        };
        let next = self
            .state
            .apply(change, now, healthy)
            .map_err(|e| match e {
                ChangeError::BadValue(m) => ErrorBody::new("bad_request", m),
                e @ (ChangeError::NothingHeld | ChangeError::TooManyWindows) => {
                    ErrorBody::new("conflict", e.to_string())
                }
                e @ ChangeError::NoSuchWindow(_) => ErrorBody::new("not_found", e.to_string()),
            })?;
        let next = Persisted {
            outage_told_from: self.outage_told_from(&next, now),
            ..next
        };
        // A window `off` ended along with the operator's maintenance: said, since the
        // operator may not know one was in force, and its later windows stay scheduled.
        let notes: Vec<String> = match change_is_off {
            true => self
                .state
                .schedules
                .iter()
                .filter(|w| w.in_force(now) && !next.schedules.iter().any(|n| n.id == w.id))
                .map(|w| {
                    format!(
                        "maintenance window {} (scheduled until {}) was in force: `off` ended it; later windows stay scheduled",
                        w.id,
                        w.end.rfc3339()
                    )
                })
                .collect(),
            false => Vec::new(),
        };
        // A flip or edge put in force during the write comes first; the change, then in force
        // on top of it, is told after it, on the clock reading it was published at.
        self.served = false;
        let mut now = now;
        let mut passed = None;
        if next != self.state {
            self.write_state(&next, true).await.map_err(|(e, advice)| {
                // What to do, for an operator mid-incident whose `off` a full disk refused:
                // the refusal itself is the promise (a restart keeps every change acknowledged).
                ErrorBody::new(
                    "state_not_saved",
                    format!(
                        "{e}; nothing was changed: a change is made only once it is saved, so \
                         that a restart keeps it. {advice}, and send it again"
                    ),
                )
            })?;
            // Tidied away by the change itself (`apply`), as `settle` tells them.
            passed = self.passed_unseen(now);
            let until = |s: &Persisted| s.planned.as_ref().and_then(|p| p.until);
            if until(&next) != until(&self.state) {
                self.overrun_noted = false;
            }
            let mut next = next;
            if self.served {
                // What the outage found meanwhile is part of the state (no change touches
                // it), saved by the `flush` after this change.
                next.outage_since = self.state.outage_since;
                next.outage_told_from = self.state.outage_told_from;
                // At the clock reading the change is published at: a window's edge taken
                // during the write is in force then, and the outage was told from its mode.
                now = now.max(self.published_at);
                next.outage_told_from = self.outage_told_from(&next, now);
            }
            self.state = next;
        }
        // The window as it is kept, with its id: the times asked for may have had a fraction
        // of a second (`+3s`), which the log wrote cut to the second before, one second ahead
        // of the window's own, and the id was nowhere in the log.
        if let Some(w) = self.new_window(&known) {
            summary = format!(
                "maintenance window {} scheduled from {} to {}",
                w.id,
                w.start.rfc3339(),
                w.end.rfc3339()
            );
        }
        // On one line: a line end in a reason or message (which may have them) would begin a
        // line of its own in the text log, such as a forged one; the JSON log escapes it.
        tracing::info!(by, "{}", summary.replace('\n', "\\n"));
        let message_before = self.shown_message();
        let until_before = self.shown_until();
        // The same clock reading as the change itself: a window ending during the state
        // file's fsync is then still due as an edge, and is tidied away by it.
        let (before, after) = self.publish(now, &format!("{summary} (by {by})"));
        self.tell_passed(passed);
        let message_after = self.shown_message();
        let windows_told = self.window_events_by(before, Some((by, &summary)));
        if windows_told {
            // The window's own event says it.
        } else if before != after {
            // Left in `outage` by an operator's change (maintenance off, force-open off while
            // no server is healthy): the operator is not its cause, and a receiver reading
            // "Outage ... by alice" with no reason has to ask what is. Say it.
            let reason = if after == Mode::Outage {
                Some(format!("{summary}; {}", self.outage_cause()))
            } else {
                forced
            };
            self.notify(EventKind::ModeChanged, before, Some(by.to_owned()), reason);
        } else if message_before != message_after && after != Mode::Normal {
            self.notify(EventKind::MessageUpdated, before, Some(by.to_owned()), None);
        }
        // A new end clients are shown, while maintenance stays on: its own event, beside a
        // message update given with it. Compared as shown, so that an `on --until` taking
        // over a window's end is told too, and so is a window added at the end of the one in
        // force (or the one after it removed), which moves the end of the maintenance it
        // carries on (`Persisted::window_until`); an `on` that starts maintenance is told by
        // its start's event.
        if !windows_told
            && before == Mode::Maintenance
            && after == Mode::Maintenance
            && self.shown_until() != until_before
        {
            self.notify(EventKind::UntilChanged, before, Some(by.to_owned()), None);
        }
        if std::mem::take(&mut self.served) {
            // Tidied as the flip would have tidied it, had it come after the change (an
            // `update` whose episode a server's return ended meanwhile).
            let (before, _) = self.settle(self.clock.now().max(now), "the state in force");
            self.window_events(before);
        }
        Ok(notes)
    }

    /// Takes a request for a reload: it begins a read, or waits for the next one.
    fn ask_reload(&mut self, by: String, reply: oneshot::Sender<Response>) {
        if self.reloads.reading.is_some() {
            self.reloads.next.push((by, reply));
            return;
        }
        self.reloads.current.push((by, reply));
        self.begin_read();
    }

    fn begin_read(&mut self) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let path = self.parts.config.reload_from.clone();
        let previous = self.parts.clone();
        if let Some(returned) = &self.reloads.returned {
            if !returned.load(Ordering::Acquire) {
                self.reloads.reading = Some(tokio::spawn(async {
                    Err(format!(
                        "the read of a reload given up earlier (after {} s) has still not returned: a file it reads does not answer (a network mount?); reloads are refused until it does",
                        RELOAD_READ_LIMIT.as_secs()
                    ))
                }));
                return;
            }
        }
        let flag = Arc::new(AtomicBool::new(false));
        self.reloads.returned = Some(flag.clone());
        let returned = Returned(flag);
        self.reloads.reading = Some(tokio::spawn(async move {
            let Some(path) = path else {
                return Err(
                    "the proxy was started without a config file; there is nothing to re-read"
                        .into(),
                );
            };
            // A read that never ends keeps its blocking thread; the reload is given up.
            let built = tokio::task::spawn_blocking(move || {
                let _returned = returned;
                prepare(&path, &previous)
            });
            match tokio::time::timeout(RELOAD_READ_LIMIT, built).await {
                Ok(done) => done.map_err(|e| e.to_string())?,
                Err(_) => Err(format!(
                    "reading the config, its pages and certificates took longer than {} s: is one of them on a mount that does not answer?",
                    RELOAD_READ_LIMIT.as_secs()
                )),
            }
        }));
    }

    /// Applies a read that ended, answers who asked for it, and begins the next read for
    /// who asked since.
    async fn finish_reload(&mut self, read: Result<Prepared, String>) {
        let askers = std::mem::take(&mut self.reloads.current);
        let resp = match read {
            Ok(prepared) => self.apply_reload(prepared).await,
            Err(e) => Err(e),
        };
        // Before the answer's status is built: the reload that mends a refused one answered
        // "LAST RELOAD REFUSED" with the old reason, and the operator who had just fixed the
        // file read that the fix was refused too.
        self.reloads.refused = resp
            .as_ref()
            .err()
            .map(|message| crate::state::mode::Update {
                at: crate::time::Timestamp(self.clock.now()),
                message: message.clone(),
            });
        let resp = match resp {
            Ok(warnings) => Response::state(self.status_view()).with_warnings(warnings),
            // Logged whoever asked (`ctl reload` or SIGHUP): the log is the record of what
            // was tried on the running proxy, not only of what changed.
            Err(message) => {
                let by = askers
                    .iter()
                    .map(|(by, _)| by.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                tracing::error!(by = %by, "reload refused, the running config stays: {message}");
                Response::error(ErrorBody::new("reload_failed", message))
            }
        };
        self.parts.metrics.reloaded(resp.ok);
        // The refusal kept, or cleared, before anyone reads the answer and asks for `status`.
        self.share();
        for (_, reply) in askers {
            self.parts.metrics.control_command("reload", resp.ok);
            let _ = reply.send(resp.clone());
        }
        if !self.reloads.next.is_empty() {
            self.reloads.current = std::mem::take(&mut self.reloads.next);
            self.begin_read();
        }
    }

    /// Puts in force what a reload read: only one read is under way at a time, so the parts
    /// it was built beside are still the running ones.
    /// Its warnings, with those of its own: the read's are logged already.
    async fn apply_reload(&mut self, prepared: Prepared) -> Result<Vec<String>, String> {
        let Prepared {
            parts,
            notify,
            mut warnings,
            pending,
        } = prepared;
        let (old, config) = (&self.parts.config, &parts.config);
        // A new pool may carry new TLS settings, which the checks must use too.
        let restart = config.upstream.servers != old.upstream.servers
            || config.health != old.health
            || !Arc::ptr_eq(&parts.pool, &self.parts.pool);
        let moved = config.proxy.listen != old.proxy.listen || config.tls.listen != old.tls.listen;
        let message_before = self.shown_message();
        // Held until the new snapshot is published, below.
        let mut opening = None;
        if moved {
            match &self.rebind {
                Some(r) => {
                    opening = Some(r.rebind(&config.proxy.listen, &config.tls.listen).await?)
                }
                None => {
                    let warning = "listen addresses changed; they take effect at the next restart";
                    tracing::warn!("{warning}");
                    warnings.push(warning.to_owned());
                }
            }
        }
        // A `pages` folder found beside the config at the last read, and gone at this one (a
        // deploy that moves it in a moment later): the built-in pages were served instead,
        // and nothing said so.
        if parts.pages.origin != self.parts.pages.origin && parts.pages.is_built_in() {
            let warning = format!(
                "the pages in force were {}; they are not found now, and the built-in pages are served",
                self.parts.pages.origin
            );
            tracing::warn!("{warning}");
            warnings.push(warning);
        }
        let max_connections = config.proxy.max_connections;
        let resize = max_connections != old.proxy.max_connections;
        if restart {
            // What the old checkers found and sent before they stop is told under the config
            // they checked: a flip left queued would be of an old generation once the new
            // checkers start, and dropped with its log line, its count and its webhook's
            // reason; a first check's flip dropped so kept an outage the previous instance
            // left going on from ever being told over.
            if let Some(checkers) = self.checkers.as_mut() {
                checkers.halt().await;
            }
            while let Ok(flip) = self.flips_rx.try_recv() {
                self.on_flip(flip);
            }
        }
        self.parts = parts;
        self.reloads.pending = pending;
        // The reload's load has warned of the new certificates already.
        self.parts
            .metrics
            .set_certificate_ends(&self.parts.tls.ends);
        self.certificates_due =
            crate::tls::next_expiry_check(&self.parts.tls.ends, self.clock.now());
        if resize {
            // The bound on upstream sockets leaves room for the clients, so it moves with
            // their limit, from the open-file limit as it is now.
            // Said once the reload is in force, not when a refused one was read.
            if let Some(limit) = crate::limits::open_files() {
                warnings.extend(crate::limits::warn_if_short(limit, max_connections));
                let bound = crate::limits::upstream_sockets(limit, max_connections);
                self.parts.sockets.set_bound(bound);
                tracing::info!("upstream connections now bounded at {bound} at once");
            }
        }
        if restart {
            self.start_checkers().await;
        }
        let file = self
            .parts
            .config
            .source
            .as_ref()
            .map(|p| p.display().to_string());
        tracing::info!(
            file = file.as_deref().unwrap_or("-"),
            pages = %self.parts.pages.origin,
            "config and pages reloaded"
        );
        match self.state_file_edited().await {
            Some(Edited::Changed(warning)) => {
                tracing::warn!("{warning}");
                warnings.push(warning);
            }
            // Removed, with its folder made again or alone: a restart would read no state
            // and forget a `ctl on` or the windows, so the reload writes it again below.
            Some(Edited::Gone) => self.unsaved = true,
            None => {}
        }
        let (before, after) = self.settle(self.clock.now(), "config reloaded");
        // Saved here, flips waiting: the reload's own words come after, and depend on it.
        self.flush(false).await;
        // Only now: the events that waited for that save (`unsent`) are queued for the
        // webhooks configured when they happened, and the reload then does to them what it
        // does to any queued event, as it would have had the disk been quick: a webhook it
        // keeps sends them, one it removes (or changes) drops them, counted and logged. Taken
        // before, they went to the new targets alone: a webhook the reload added was told of
        // what happened before it was there, and a removed one's drops were never counted.
        self.notifier.set_targets(notify);
        // The new listeners' first clients, queued by the kernel since the bind, now meet the
        // config that listens there.
        drop(opening);
        if !self.unsaved {
            // Its folder made again, as the log said to, then SIGHUP: the lock is taken again
            // now, not at the next change, which a second instance could start before.
            let lock = self.lock.clone();
            let renewed = tokio::task::spawn_blocking(move || renew(lock.as_deref())).await;
            if let Ok(Err(e)) = renewed {
                let warning = format!(
                    "the state file's lock, removed since the start (with its folder?), cannot \
                     be taken again: {e}; every change is refused as not saved \
                     (state_not_saved) until it is. {}, then reload",
                    e.advice()
                );
                tracing::warn!("{warning}");
                warnings.push(warning);
            }
        } else {
            let state = self.state.clone();
            match self.write_state(&state, false).await {
                Ok(()) => tracing::info!("the state in force, not saved before, is saved now"),
                Err((e, advice)) => {
                    let warning = format!(
                        "the state in force is not saved, and a restart would read an older \
                         one: {e}; {advice}, then reload"
                    );
                    tracing::warn!("{warning}");
                    warnings.push(warning);
                }
            }
        }
        // An outage the previous instance left going on, which this reload showed again.
        let previous = match self.retold_from.take() {
            Some(from) if before != after && after == Mode::Outage => from,
            _ => before,
        };
        if self.window_events(before) {
            // The window's own event says it.
        } else if before != after {
            // Left in `outage` by a reload, as by an `off`: the reload is not its cause.
            let reason = match after {
                Mode::Outage => format!("config reloaded; {}", self.outage_cause()),
                _ => "config reloaded".to_owned(),
            };
            self.notify(EventKind::ModeChanged, previous, None, Some(reason));
        } else if after != Mode::Normal && self.shown_message() != message_before {
            // SPEC §2: webhooks hear of every change of message, and a reload changes the
            // one shown when no operator or window gave one (SPEC §3).
            self.notify(
                EventKind::MessageUpdated,
                before,
                None,
                Some("config reloaded".into()),
            );
        }
        Ok(warnings)
    }

    /// Builds and swaps in the snapshot of the moment `now`; returns the modes before and
    /// after, logs a change of mode once with its `reason`, and keeps the mode metrics in step.
    fn publish(&mut self, now: SystemTime, reason: &str) -> (Mode, Mode) {
        let (before, began) = {
            let old = self.handle.load();
            (old.mode, old.held.as_ref().and_then(|h| h.view.since))
        };
        self.published_at = now;
        let snapshot = Snapshot::build(
            &self.parts,
            &Inputs {
                state: &self.state,
                up: &self.up,
                passive: self
                    .checkers
                    .as_ref()
                    .map_or_else(|| Arc::from(Vec::new()), |c| c.passive.clone()),
                outage_since: self.outage_since,
                now,
            },
        );
        let after = snapshot.mode;
        if after == Mode::Normal && before != Mode::Normal {
            self.ended_since = began;
        }
        self.handle.store(snapshot);
        self.share();
        // After the store: a request woken by a mark-down that retries finds the new healthy
        // set. Not under `force-open`, which forwards to servers whatever their checks say: a
        // request waiting for one is not cut either.
        let down = match self.state.force_open {
            true => Vec::new(),
            false => (self.parts.pool.names.iter().zip(&self.up))
                .filter(|&(_, &up)| !up)
                .map(|(name, _)| name.clone())
                .collect(),
        };
        self.parts.marks.publish(down);
        if before != after {
            match after {
                Mode::Normal => tracing::info!(
                    reason,
                    "mode {} -> {}: forwarding again",
                    before.as_str(),
                    after.as_str()
                ),
                _ => tracing::warn!(
                    reason,
                    "mode {} -> {}: requests are held",
                    before.as_str(),
                    after.as_str()
                ),
            }
            self.parts.metrics.set_mode(after);
            self.parts.metrics.mode_transition(before, after);
        }
        (before, after)
    }

    /// Why no server is healthy, as `ctl health` tells each one's last error.
    fn outage_cause(&self) -> String {
        let servers: Vec<String> = self
            .health()
            .into_iter()
            .map(|h| match h.last_error {
                Some(why) => format!("{}: {why}", h.server),
                None => h.server,
            })
            .collect();
        format!("no upstream server is healthy ({})", servers.join("; "))
    }

    fn health(&self) -> Vec<ServerHealth> {
        match &self.checkers {
            Some(c) => c.table.list(),
            None => Vec::new(),
        }
    }

    /// What is in force now, as read-only requests are answered from it.
    fn published_now(&self) -> Published {
        Published {
            snapshot: self.handle.load(),
            state: self.state.clone(),
            table: self.checkers.as_ref().map(|c| c.table.clone()),
            reload_refused: self.reloads.refused.clone(),
            restart_pending: self.reloads.pending.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Lets read-only requests see what is in force now.
    fn share(&self) {
        self.published.store(Some(Arc::new(self.published_now())));
    }

    fn status_view(&self) -> StatusView {
        self.published_now().status_view()
    }
}

/// The change a request asks for, its times and durations read against `now`; `ctl` calls it
/// too, so that a value the proxy would refuse is bad usage before anything is sent.
pub fn to_change(req: Request, by: String, now: SystemTime) -> Result<Change, ErrorBody> {
    let bad = |m: String| ErrorBody::new("bad_request", m);
    Ok(match req {
        Request::On {
            message,
            until,
            retry_after,
            reason,
        } => Change::On {
            message,
            // Blank, as a blank reason: the announced end taken back.
            until: until
                .map(|u| match u.trim() {
                    "" => Ok(None),
                    u => parse_time(u, now)
                        .map(Some)
                        .map_err(|e| bad(format!("until: {e}"))),
                })
                .transpose()?,
            retry_after: retry_after
                .map(|r| parse_duration(&r).map_err(|e| bad(format!("retry_after: {e}"))))
                .transpose()?,
            reason,
            by,
        },
        Request::Update { message } => Change::Update { message },
        Request::Off => Change::Off,
        Request::ForceOpen { enabled } => Change::ForceOpen(enabled),
        Request::ScheduleAdd {
            start,
            end,
            message,
        } => Change::ScheduleAdd {
            start: parse_time(&start, now).map_err(|e| bad(format!("start: {e}")))?,
            end: parse_time(&end, now).map_err(|e| bad(format!("end: {e}")))?,
            message,
            by,
        },
        Request::ScheduleRemove { id } => Change::ScheduleRemove { id },
        Request::Status | Request::Health | Request::Reload | Request::ScheduleList => {
            return Err(ErrorBody::new("internal", "not a change"));
        }
    })
}

/// Reads and builds what a reload puts in force, beside the running `old` parts, on the
/// blocking pool: everything that can fail is built before anything changes. What takes
/// effect only at a restart is kept as it runs, with a warning.
fn prepare(path: &std::path::Path, old: &Parts) -> Result<Prepared, String> {
    let running = &old.config.control.state_file;
    let (mut config, still_changing) =
        Config::reload_file(path, &old.config.control).map_err(|e| e.to_string())?;
    let pages = Pages::load(&config.maintenance).map_err(|e| e.to_string())?;
    let old_config = &old.config;
    // Valid, and likely not meant: a file cut short by a write the settling did not outlast,
    // or a section deleted with what the operator meant to delete. Said first.
    let mut said: Vec<String> = still_changing.into_iter().collect();
    // The folder of the state file in force, gone since the start (removed by hand or by a
    // cleanup, a mount lost): the reload takes, since refusing it mends nothing, and says
    // loudly what no longer works.
    if let Err(why) = crate::config::state_file_folder(running) {
        said.push(format!(
            "control.state_file: {why}. It was there at the start (removed since?): this \
             reload is in force, but every change is refused as not saved (state_not_saved) \
             until the folder is made again, writable by the proxy's user, and a start would \
             refuse it; reload once it is, to save the state in force"
        ));
    }
    for gone in old_config
        .sections
        .iter()
        .filter(|s| !config.sections.contains(s))
    {
        let (written, now) = match gone.as_str() {
            "notify" => (
                "[[notify]]".to_owned(),
                "no webhook is told of changes any more",
            ),
            _ => (format!("[{gone}]"), "its keys are back to their defaults"),
        };
        said.push(format!(
            "{} has no {written} any more, which the file in force had: {now} (a file cut \
             short while it was written? if so, reload again once it is whole)",
            path.display()
        ));
    }
    let mut restart = Vec::new();
    if config.control.socket != old_config.control.socket
        || config.control.socket_mode != old_config.control.socket_mode
        || config.control.state_file != old_config.control.state_file
    {
        restart.push(
            "control.socket / control.socket_mode / control.state_file changed; they take effect at the next restart",
        );
    }
    config.control = old_config.control.clone();
    if config.admin != old_config.admin {
        // Bound once at start, beside the control socket.
        restart.push("admin.listen changed; it takes effect at the next restart");
        config.admin = old_config.admin.clone();
    }
    if config.log.format != old_config.log.format || config.log.level != old_config.log.level {
        // The log's subscriber is set once per process; `log.access_log` does reload.
        restart.push("log.format / log.level changed; they take effect at the next restart");
        config.log.format = old_config.log.format;
        config.log.level = old_config.log.level.clone();
    }
    if config.proxy.threads != old_config.proxy.threads {
        restart.push("proxy.threads changed; it takes effect at the next restart");
        config.proxy.threads = old_config.proxy.threads;
    }
    let notify = config.notify.clone();
    // Certificates, keys and CA files are read here too.
    let (parts, certificates) = Parts::checked(
        Arc::new(config),
        Arc::new(pages),
        Some(old),
        old.metrics.clone(),
    )
    .map_err(|e| e.to_string())?;
    // What `check` would say of the config now in force (a changed control.socket_mode is
    // not, until a restart, which is said), then what waits for a restart.
    let mut warnings = said;
    warnings.extend(parts.config.load_warnings(&parts.pages, certificates));
    let pending: Vec<String> = restart.into_iter().map(str::to_owned).collect();
    warnings.extend(pending.iter().cloned());
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    Ok(Prepared {
        parts,
        notify,
        warnings,
        pending,
    })
}

/// The end of the reload's read under way (never, while there is none: its branch is off).
/// Cancel-safe: the read stays where it is until it has ended.
async fn read(
    reading: &mut Option<tokio::task::JoinHandle<Result<Prepared, String>>>,
) -> Result<Prepared, String> {
    let Some(task) = reading else {
        return std::future::pending().await;
    };
    let done = task.await;
    *reading = None;
    done.map_err(|e| format!("the reload's reader failed: {e}"))?
}

/// The protocol's name of a command (a fixed set: safe as a metric label).
/// Takes the state file's lock again if its file is gone (`StateLock::renew`), and says so.
/// Blocking.
/// What a reload finds of the state file this proxy last wrote, when it is not as left.
enum Edited {
    /// Changed by another hand: the warning to give.
    Changed(String),
    /// Removed (its folder with it, made again since): to be written again.
    Gone,
}

fn renew(lock: Option<&store::StateLock>) -> Result<(), store::StoreError> {
    if lock.map(store::StateLock::renew).transpose()? == Some(true) {
        tracing::warn!(
            "the state file's lock file had been removed (with its folder?), which let a second \
             intermission take the same state file: taken again"
        );
    }
    Ok(())
}

pub(crate) fn command_name(req: &Request) -> &'static str {
    match req {
        Request::Status => "status",
        Request::On { .. } => "on",
        Request::Update { .. } => "update",
        Request::Off => "off",
        Request::ForceOpen { .. } => "force_open",
        Request::Health => "health",
        Request::Reload => "reload",
        Request::ScheduleAdd { .. } => "schedule_add",
        Request::ScheduleList => "schedule_list",
        Request::ScheduleRemove { .. } => "schedule_remove",
    }
}

fn describe(change: &Change) -> String {
    match change {
        // A blank reason clears the one before: nothing to show.
        Change::On { reason, until, .. } => {
            let taken_back = if *until == Some(None) {
                ", its announced end taken back"
            } else {
                ""
            };
            match reason.as_deref().map(str::trim) {
                Some(r) if !crate::state::mode::shows_nothing(r) => {
                    format!("maintenance on ({r}){taken_back}")
                }
                _ => format!("maintenance on{taken_back}"),
            }
        }
        Change::Update { message } => format!("message updated: {message}"),
        Change::Off => "maintenance off".to_owned(),
        Change::ForceOpen(true) => {
            "force-open on: forwarding whatever health checks say".to_owned()
        }
        Change::ForceOpen(false) => "force-open off".to_owned(),
        Change::ScheduleAdd { start, end, .. } => format!(
            "maintenance window scheduled from {} to {}",
            crate::time::Timestamp(*start).rfc3339(),
            crate::time::Timestamp(*end).rfc3339()
        ),
        Change::ScheduleRemove { id } => format!("maintenance window {id} removed"),
    }
}

fn instance_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "intermission".to_owned())
}

/// Sleeps `wait`, but never more than a minute: the deadline is a wall-clock time, and a
/// clock step or a suspend (which the monotonic timer does not see) must not delay it for
/// long. Waking early is harmless: the edge is looked for again and not yet due.
async fn sleep_capped(wait: Option<Duration>) {
    const CAP: Duration = Duration::from_secs(60);
    tokio::time::sleep(wait.unwrap_or_default().min(CAP)).await;
}

/// Resolves when `stop` fires; never when there is none to fire (a controller under test).
async fn stopped(stop: &mut Option<Shutdown>) {
    match stop {
        Some(s) => s.fired().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The controller's own clock work, on a manual wall clock: nothing here waits for real
    //! time, so edges can be put exactly where a race would hide them.
    use super::*;
    use crate::metrics::Metrics;
    use std::time::{Duration, UNIX_EPOCH};

    /// The log line for `on` says what it changed that no field shows: a reason cleared is
    /// none (not "()"), an end taken back is said.
    #[test]
    fn an_on_is_described_as_what_it_changes() {
        let on = |reason: Option<&str>, until: Option<Option<SystemTime>>| Change::On {
            message: None,
            until,
            retry_after: None,
            reason: reason.map(str::to_owned),
            by: "alice".into(),
        };
        assert_eq!(describe(&on(Some("INC-1"), None)), "maintenance on (INC-1)");
        assert_eq!(describe(&on(Some("  "), None)), "maintenance on");
        assert_eq!(describe(&on(Some("\u{202E}"), None)), "maintenance on");
        assert_eq!(
            describe(&on(None, Some(None))),
            "maintenance on, its announced end taken back"
        );
        assert_eq!(
            describe(&on(Some("INC-1"), Some(Some(UNIX_EPOCH)))),
            "maintenance on (INC-1)"
        );
    }

    struct Rig {
        handle: ControllerHandle,
        clock: Clock,
        start: SystemTime,
        _dir: tempfile::TempDir,
        /// The webhooks' deliveries, to the config's `[[notify]]`.
        notifier: Notifier,
    }

    impl Rig {
        /// Alice's `on` with `message`, sent once its state write has reached `gate` (closed):
        /// its answer waits there.
        async fn on_while_written(
            &self,
            gate: &Gate,
            message: &str,
        ) -> tokio::task::JoinHandle<Response> {
            let before = gate.reached();
            let handle = self.handle.clone();
            let on = Request::On {
                message: Some(message.into()),
                until: None,
                retry_after: None,
                reason: None,
            };
            let on = tokio::spawn(async move { handle.request(on, "alice".into()).await });
            // `until`, not `eventually`: a paused clock stands still once the save is held.
            assert!(until(|| gate.reached() > before).await, "no write began");
            on
        }

        /// Through the queue, `status` too: the controller then runs before it answers.
        async fn ask(&self, req: Request) -> Response {
            self.handle.queued(req, "tester".into()).await
        }

        /// As a control connection asks: `status` from what is published.
        async fn ask_now(&self, req: Request) -> Response {
            self.handle.request(req, "tester".into()).await
        }

        async fn mode(&self) -> Mode {
            self.ask(Request::Status)
                .await
                .state
                .expect("status answers a state")
                .mode
        }

        /// Asks for the mode until it is `want`, letting the controller run in between.
        async fn mode_becomes(&self, want: Mode) -> bool {
            for _ in 0..20 {
                if self.mode().await == want {
                    return true;
                }
                tokio::task::yield_now().await;
            }
            false
        }

        fn at(&self, secs: u64) -> SystemTime {
            self.start + Duration::from_secs(secs)
        }
    }

    async fn rig() -> Rig {
        rig_with(|_, _| {}).await
    }

    /// Checks an hour apart (the upstream plays no part here), the state file in a folder of
    /// the rig's own.
    fn rig_text(dir: &std::path::Path) -> String {
        format!(
            "[health]\ninterval = \"1h\"\n[control]\nstate_file = \"{}\"\n",
            dir.join("state.json").display()
        )
    }

    /// A rig whose config `edit` has changed, given the rig's folder.
    async fn rig_with(edit: impl FnOnce(&mut Config, &std::path::Path)) -> Rig {
        // Forced open: whatever the checks of the (absent) upstream say, no outage.
        let state = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        build_rig(edit, "", state, None).0
    }

    /// A rig on the config `more` adds to, starting from `state`, whose state writes wait for
    /// `gate` if given; with the data plane's view of the state.
    fn build_rig(
        edit: impl FnOnce(&mut Config, &std::path::Path),
        more: &str,
        state: Persisted,
        gate: Option<Arc<Gate>>,
    ) -> (Rig, StateHandle) {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = rig_text(dir.path()) + more;
        let mut config = Config::parse(&text, dir.path(), None).expect("config");
        edit(&mut config, dir.path());
        let pages = Pages::load(&config.maintenance).expect("pages");
        let metrics = Arc::new(Metrics::new());
        let notifier = Notifier::start(config.notify.clone(), metrics.clone());
        let parts = Parts::new(Arc::new(config), Arc::new(pages), None, metrics).expect("parts");
        let start = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let clock = Clock::manual(start);
        let (mut controller, handle, shown) =
            Controller::new(parts, state, notifier.clone(), clock.clone());
        controller.write_gate = gate;
        tokio::spawn(controller.run());
        let rig = Rig {
            handle,
            clock,
            start,
            _dir: dir,
            notifier,
        };
        (rig, shown)
    }

    /// A running controller whose state writes wait until `open` (a hung disk), for the
    /// control socket's tests; the gate opens when it is dropped. Forced open: no outage.
    pub(crate) struct HeldSaves {
        pub(crate) handle: ControllerHandle,
        gate: Arc<Gate>,
        _opens: Opens,
        _rig: Rig,
    }

    impl HeldSaves {
        pub(crate) fn start() -> HeldSaves {
            let gate = Arc::new(Gate::default());
            let state = Persisted {
                force_open: true,
                ..Persisted::default()
            };
            let (rig, _) = build_rig(|_, _| {}, "", state, Some(gate.clone()));
            HeldSaves {
                handle: rig.handle.clone(),
                _opens: Opens(gate.clone()),
                gate,
                _rig: rig,
            }
        }

        /// How many saves have come to the gate.
        pub(crate) fn reached(&self) -> usize {
            self.gate.reached()
        }

        /// The disk answers again.
        pub(crate) fn open(&self) {
            self.gate.open();
        }
    }

    /// A disk that does not answer: state writes wait in `pass` until the gate is opened.
    #[derive(Default)]
    pub(super) struct Gate {
        open: std::sync::Mutex<bool>,
        moved: std::sync::Condvar,
        waiting: std::sync::atomic::AtomicUsize,
    }

    impl Gate {
        pub(super) fn pass(&self) {
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            while !*open {
                open = self.moved.wait(open).unwrap_or_else(|e| e.into_inner());
            }
        }

        fn open(&self) {
            *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.moved.notify_all();
        }

        /// Holds the writes that come next.
        fn close(&self) {
            *self.open.lock().unwrap_or_else(|e| e.into_inner()) = false;
        }

        /// How many writes have come to the gate.
        fn reached(&self) -> usize {
            self.waiting.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Opens the gate however the test ends: the runtime waits for the blocking pool's
    /// threads at its end, and a write left waiting would hang the test run.
    struct Opens(Arc<Gate>);

    impl Drop for Opens {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    /// Waits, a bounded time, for `cond`.
    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    /// `status`, `health` and `schedule_list` are answered while a change's state write
    /// hangs (a disk that does not answer), with the state in force, which that change is
    /// not part of until it is saved. They waited behind it in the controller's queue, and
    /// `ctl status` gave up after 15 s.
    #[tokio::test]
    async fn read_only_requests_are_answered_while_a_state_write_hangs() {
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        let state = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        let (rig, _) = build_rig(|_, _| {}, "", state, Some(gate.clone()));
        // Published once the controller runs.
        assert!(rig.mode_becomes(Mode::Normal).await);
        let on = rig.on_while_written(&gate, "Disk upgrade").await;
        let within = |req| tokio::time::timeout(Duration::from_secs(5), rig.ask_now(req));
        let status = within(Request::Status)
            .await
            .expect("status waited for the write");
        let state = status.state.expect("a state");
        assert_eq!(state.mode, Mode::Normal, "shown before it was saved");
        assert!(state.force_open);
        let health = within(Request::Health).await.expect("health waited");
        assert_eq!(health.health.map(|h| h.len()), Some(1));
        let list = within(Request::ScheduleList)
            .await
            .expect("schedule_list waited");
        assert_eq!(list.schedules.map(|l| l.len()), Some(0));
        assert!(!on.is_finished(), "the write was not held");
        gate.open();
        let on = on.await.expect("on answered");
        assert!(on.ok, "{:?}", on.error);
        // Published before it was acknowledged: the next `status` shows it.
        let state = rig.ask_now(Request::Status).await.state.expect("a state");
        assert_eq!(state.mode, Mode::Maintenance);
        assert_eq!(state.message.as_deref(), Some("Disk upgrade"));
    }

    /// What a test's subscriber writes, as JSON lines.
    #[derive(Clone, Default)]
    struct Kept(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Kept {
        /// Whether a line logged so far has `text` in its message.
        fn said(&self, text: &str) -> bool {
            let kept = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            kept.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["fields"]["message"].as_str().map(|m| m.contains(text)))
                    .unwrap_or(false)
            })
        }
    }

    /// Waits, a bounded time, for `cond`, while the clock stands still (a save held at the
    /// gate keeps it from moving by itself): the blocking pool's threads run meanwhile.
    async fn until(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..5_000 {
            if cond() {
                return true;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(1));
        }
        cond()
    }

    /// A hung save is said in the log once it has taken `HOLD_EVENTS`, though it holds no
    /// event: an operator's change waits for it, and nothing said the disk had stopped. And a
    /// change refused after its client went (closed for room while the save hung, given up
    /// on by `ctl`) is logged, the only place it is told then.
    #[tokio::test(start_paused = true)]
    async fn a_hung_save_and_a_refusal_nobody_heard_are_logged() {
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        crate::logging::capture_ready();
        let _logging = tracing::subscriber::set_default(subscriber);
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        let state = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        let (rig, _) = build_rig(|_, _| {}, "", state, Some(gate.clone()));
        let on = rig.on_while_written(&gate, "Disk upgrade").await;
        let remove = Request::ScheduleRemove { id: 99 };
        let Handed::Queued(pending) = rig.handle.hand(remove, "bob".into()).await else {
            panic!("not queued");
        };
        drop(pending);
        tokio::time::advance(HOLD_EVENTS).await;
        let hung = "the state file's save is taking over 2s (is its disk slow or hung?)";
        assert!(
            until(|| kept.said(hung)).await,
            "the hung save was not said"
        );
        gate.open();
        assert!(on.await.unwrap().ok);
        let refused = "`schedule_remove` was refused (not_found) after its client had gone";
        assert!(
            until(|| kept.said(refused)).await,
            "the refusal went unsaid"
        );
    }

    /// `status` says that a save is overdue, since when and what waits behind it, as long as
    /// it is: an operator whose `ctl on` gave up saw the mode before it, with nothing to say
    /// why.
    #[tokio::test(start_paused = true)]
    async fn status_says_a_save_is_overdue() {
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        let state = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        let (rig, _) = build_rig(|_, _| {}, "", state, Some(gate.clone()));
        assert!(rig.mode_becomes(Mode::Normal).await, "never published");
        let began = rig.clock.now();
        let on = rig.on_while_written(&gate, "Disk upgrade").await;
        let overdue = || async {
            let status = rig.ask_now(Request::Status).await;
            status.state.expect("a state").save_overdue
        };
        assert_eq!(overdue().await, None, "said before HOLD_EVENTS");
        let mut waiting = Vec::new();
        for _ in 0..2 {
            match rig.handle.hand(Request::Off, "bob".into()).await {
                Handed::Queued(pending) => waiting.push(pending),
                Handed::Answered(resp) => panic!("{resp:?}"),
            }
        }
        tokio::time::advance(HOLD_EVENTS).await;
        let mut said = None;
        for _ in 0..1000 {
            said = overdue().await;
            if said.is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let said = said.expect("the overdue save not said");
        assert_eq!(said.since.0, began);
        // The two, and the `on` too when a save of the first check's finding came first.
        assert!((2..=3).contains(&said.waiting), "{said:?}");
        gate.open();
        assert!(on.await.unwrap().ok);
        for pending in waiting {
            assert!(pending.answer().await.ok);
        }
        assert_eq!(overdue().await, None, "said once saved");
    }

    /// An `[upstream]` of one server on a port nothing listens on (yet), and that port: its
    /// first check, at once, finds it down.
    /// A server's flip still queued when a reload that restarts the checkers is applied (the
    /// run loop's `select!` may take the reload first) is told: the server marked down and
    /// counted, not dropped as of an old generation.
    #[tokio::test]
    async fn a_flip_queued_when_a_reload_restarts_the_checkers_is_still_told() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, servers) = dead_server();
        let path = dir.path().join("intermission.toml");
        let text = |interval: &str| {
            format!(
                "{servers}[health]\ninterval = \"{interval}\"\n[control]\nstate_file = \"{}\"\n",
                dir.path().join("state.json").display()
            )
        };
        std::fs::write(&path, text("1h")).expect("config written");
        let config = Config::load(Some(&path)).expect("config");
        let pages = Pages::load(&config.maintenance).expect("pages");
        let metrics = Arc::new(Metrics::new());
        let notifier = Notifier::start(config.notify.clone(), metrics.clone());
        let parts =
            Parts::new(Arc::new(config), Arc::new(pages), None, metrics.clone()).expect("parts");
        let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        let (mut controller, _handle, _shown) =
            Controller::new(parts, Persisted::default(), notifier, clock);
        controller
            .flips_tx
            .send(Flip {
                generation: controller.generation,
                index: 0,
                healthy: false,
                reason: "connection refused".into(),
                changed: true,
            })
            .expect("queued");
        std::fs::write(&path, text("2h")).expect("config written again");
        let prepared = prepare(&path, &controller.parts).expect("prepared");
        controller.apply_reload(prepared).await.expect("reloaded");
        let server = format!("http://127.0.0.1:{port}");
        let marked = format!("intermission_upstream_marked_down_total{{server=\"{server}\"}} 1");
        let text = metrics.encode_text();
        assert!(text.contains(&marked), "{marked} in\n{text}");
    }

    fn dead_server() -> (u16, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let servers = format!("[upstream]\nservers = [\"http://127.0.0.1:{port}\"]\n");
        (port, servers)
    }

    /// An outage is held for clients as soon as the checks find it, though saving it waits
    /// on the disk: the snapshot was swapped only after the fsync, and a hung disk left the
    /// data plane forwarding to servers known down.
    #[tokio::test]
    async fn an_outage_is_shown_while_its_state_write_hangs() {
        let (_, servers) = dead_server();
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        let (rig, shown) = build_rig(
            |_, _| {},
            &servers,
            Persisted::default(),
            Some(gate.clone()),
        );
        assert!(
            eventually(|| shown.load().mode == Mode::Outage).await,
            "clients were not held while the outage's save waited"
        );
        // Published first, then saved by the run loop's next round: the write reaches the
        // gate a moment after clients are held.
        assert!(
            eventually(|| gate.reached() > 0).await,
            "the outage's save never began"
        );
        let state = rig.ask_now(Request::Status).await.state.expect("a state");
        assert_eq!(state.mode, Mode::Outage);
        let file = rig._dir.path().join("state.json");
        let saved = || std::fs::read_to_string(&file).is_ok_and(|t| t.contains("outage_since"));
        assert!(!saved(), "saved through a closed gate");
        gate.open();
        assert!(
            eventually(saved).await,
            "the outage was not saved once the disk answered"
        );
    }

    /// A rig whose server is dead and whose state writes wait at a closed gate, with a
    /// webhook receiver that never answers (an event sent stays pending), once the outage
    /// is held for clients and its save has begun.
    async fn an_outage_saved_behind_a_closed_gate() -> (Rig, Arc<Gate>, Opens, std::net::TcpListener)
    {
        let (_, servers) = dead_server();
        let hook = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = hook.local_addr().expect("its address").port();
        let more = format!("{servers}[[notify]]\nurl = \"http://127.0.0.1:{port}/\"\n");
        let gate = Arc::new(Gate::default());
        let opens = Opens(gate.clone());
        let (rig, shown) = build_rig(|_, _| {}, &more, Persisted::default(), Some(gate.clone()));
        assert!(
            eventually(|| shown.load().mode == Mode::Outage && gate.reached() > 0).await,
            "the outage was not held, or its save never began"
        );
        (rig, gate, opens, hook)
    }

    /// A webhook told of the outage finds it in the state file: the event waits for the save
    /// of what it tells (a `kill -9` right after it would otherwise leave a restart not
    /// knowing the outage it told). Clients are held meanwhile. The event went out at once,
    /// before the save, since outages were put in force ahead of their saves.
    #[tokio::test]
    async fn an_outage_is_told_once_it_is_saved() {
        let (rig, gate, _opens, _hook) = an_outage_saved_behind_a_closed_gate().await;
        assert_eq!(
            rig.notifier.pending(),
            0,
            "the outage was told before it was saved"
        );
        gate.open();
        assert!(
            eventually(|| rig.notifier.pending() > 0).await,
            "the outage was not told once saved"
        );
    }

    /// A save that hangs holds the outage's event no longer than `HOLD_EVENTS`: a hung disk
    /// kept the alert back for as long as it hung.
    #[tokio::test]
    async fn an_outage_is_told_when_its_save_hangs_too_long() {
        let (rig, _gate, _opens, _hook) = an_outage_saved_behind_a_closed_gate().await;
        // `eventually` waits 5 s, more than `HOLD_EVENTS`.
        assert!(
            eventually(|| rig.notifier.pending() > 0).await,
            "the outage was not told while its save hung"
        );
        let file = rig._dir.path().join("state.json");
        assert!(
            !std::fs::read_to_string(&file).is_ok_and(|t| t.contains("outage_since")),
            "saved through a closed gate"
        );
    }

    /// An event that waits for the save of what it tells is for the webhooks configured
    /// when it happened: a reload that comes first (a flip during a slow save, then a
    /// reload read meanwhile) does to it what it does to an event queued, not send it to
    /// its own webhooks. A webhook it added was told of what happened before it was there.
    #[tokio::test]
    async fn a_reload_leaves_an_event_held_for_its_save_to_the_webhooks_of_its_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Receivers that never answer: an event sent to one stays pending.
        let old = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let new = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let hook = |name: &str, to: &std::net::TcpListener| {
            let to = to.local_addr().expect("its address");
            format!("[[notify]]\nname = \"{name}\"\nurl = \"http://{to}/\"\n")
        };
        let text = rig_text(dir.path()) + &hook("old", &old);
        let config = Config::parse(&text, dir.path(), None).expect("config");
        let pages = Pages::load(&config.maintenance).expect("pages");
        let metrics = Arc::new(Metrics::new());
        let notifier = Notifier::start(config.notify.clone(), metrics.clone());
        let parts =
            Parts::new(Arc::new(config), Arc::new(pages), None, metrics.clone()).expect("parts");
        let state = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        let (mut controller, _handle, _shown) =
            Controller::new(parts, state, notifier.clone(), clock);
        // A change in force whose save `flush` has still to make, as `settle` leaves it.
        controller.behind = true;
        controller.notify(EventKind::ModeChanged, Mode::Normal, None, None);
        assert_eq!(notifier.pending(), 0, "told before it was saved");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text.clone() + &hook("new", &new)).expect("config file");
        let read = prepare(&path, &controller.parts).expect("the reload's read");
        controller.apply_reload(read).await.expect("reloaded");
        let queued = |name: &str| {
            let key = format!("intermission_webhook_queue_length{{webhook=\"{name}\"}} ");
            let text = metrics.encode_text();
            text.lines()
                .find_map(|l| l.strip_prefix(key.as_str())?.parse::<f64>().ok())
        };
        assert_eq!(queued("new"), Some(0.0), "told to a webhook added after it");
        assert_eq!(queued("old"), Some(1.0), "not told to its own webhook");
        assert_eq!(notifier.pending(), 1);
    }

    /// A controller aborted at a stop while events wait for a save that hangs hands them to
    /// the webhooks, whose stop then counts and logs what it cannot deliver: they were
    /// dropped with the controller, neither counted nor said.
    #[tokio::test]
    async fn events_waiting_for_a_save_go_to_the_webhooks_when_the_controller_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A receiver that never answers: an event sent to it stays pending.
        let hook = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let to = hook.local_addr().expect("its address");
        let text = rig_text(dir.path()) + &format!("[[notify]]\nurl = \"http://{to}/\"\n");
        let config = Config::parse(&text, dir.path(), None).expect("config");
        let pages = Pages::load(&config.maintenance).expect("pages");
        let metrics = Arc::new(Metrics::new());
        let notifier = Notifier::start(config.notify.clone(), metrics.clone());
        let parts = Parts::new(Arc::new(config), Arc::new(pages), None, metrics).expect("parts");
        let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        let (mut controller, _handle, _shown) =
            Controller::new(parts, Persisted::default(), notifier.clone(), clock);
        // A change in force whose save has not been made, as a hung disk leaves it.
        controller.behind = true;
        controller.notify(EventKind::ModeChanged, Mode::Normal, None, None);
        assert_eq!(notifier.pending(), 0, "told before it was saved");
        drop(controller);
        assert_eq!(notifier.pending(), 1, "dropped unsaid with the controller");
    }

    /// A server for `tcp` checks, up while its task runs: it accepts and closes. Aborted, its
    /// socket is closed and the next check is refused.
    async fn tcp_server() -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let port = listener.local_addr().expect("its address").port();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        });
        (port, task)
    }

    /// `tcp` checks every 50 ms, one failure enough to take a server out.
    fn quick_checks(config: &mut Config) {
        config.health.kind = crate::config::HealthKind::Tcp;
        config.health.interval = Duration::from_millis(50);
        config.health.down_interval = Duration::from_millis(50);
        config.health.timeout = Duration::from_millis(500);
        config.health.rise = 1;
        config.health.fall = 1;
    }

    /// Waits, a bounded time, for every server to be known healthy by a check.
    async fn known_up(rig: &Rig) -> bool {
        for _ in 0..500 {
            let health = rig.ask_now(Request::Health).await.health;
            if health.is_some_and(|h| !h.is_empty() && h.iter().all(|s| s.healthy == Some(true))) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// An outage found while an operator's change is being saved is held for clients at once,
    /// not once that save returns: the controller waited for the fsync before it took the
    /// flip, and a hung disk left the data plane forwarding to servers known down. The
    /// change is answered after its save, and the state saved next has both.
    #[tokio::test]
    async fn an_outage_found_during_an_operators_save_is_held_before_the_save_returns() {
        let (port, server) = tcp_server().await;
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        gate.open();
        let servers = format!("[upstream]\nservers = [\"http://127.0.0.1:{port}\"]\n");
        let (rig, shown) = build_rig(
            |c, _| quick_checks(c),
            &servers,
            Persisted::default(),
            Some(gate.clone()),
        );
        assert!(known_up(&rig).await, "the server was never found healthy");
        assert_eq!(shown.load().mode, Mode::Normal);
        gate.close();
        let before = gate.reached();
        let handle = rig.handle.clone();
        let add = tokio::spawn(async move {
            let add = Request::ScheduleAdd {
                start: "+1h".into(),
                end: "+2h".into(),
                message: None,
            };
            handle.request(add, "alice".into()).await
        });
        assert!(
            eventually(|| gate.reached() > before).await,
            "no write began"
        );
        server.abort();
        let _ = server.await;
        assert!(
            eventually(|| shown.load().mode == Mode::Outage).await,
            "the outage waited for the operator's save"
        );
        let state = rig.ask_now(Request::Status).await.state.expect("a state");
        assert_eq!(state.mode, Mode::Outage);
        assert!(!add.is_finished(), "answered before its save");
        gate.open();
        let add = add.await.expect("schedule_add answered");
        assert!(add.ok, "{:?}", add.error);
        let state = add.state.expect("a state");
        assert_eq!((state.mode, state.schedules.len()), (Mode::Outage, 1));
        let file = rig._dir.path().join("state.json");
        let saved = || {
            // Read as written: `store::load` mends times ahead of the system clock, and the
            // rig's clock is years ahead.
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            serde_json::from_str::<Persisted>(&text)
                .is_ok_and(|s| s.outage_since.is_some() && s.schedules.len() == 1)
        };
        assert!(
            eventually(saved).await,
            "the window and the outage were not both saved: {:?}",
            std::fs::read_to_string(&file)
        );
    }

    /// An outage found while an operator's change is being saved is told within
    /// `HOLD_EVENTS` however long that save hangs: its event waited for the operator's save
    /// (for ever on a hung disk), outside the bound `flush` puts on its own saves.
    #[tokio::test]
    async fn an_outage_found_during_an_operators_hung_save_is_told_all_the_same() {
        let (port, server) = tcp_server().await;
        let hook = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let hook_port = hook.local_addr().expect("its address").port();
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        gate.open();
        let config = format!(
            "[upstream]\nservers = [\"http://127.0.0.1:{port}\"]\n\
             [[notify]]\nurl = \"http://127.0.0.1:{hook_port}/\"\n"
        );
        let (rig, shown) = build_rig(
            |c, _| quick_checks(c),
            &config,
            Persisted::default(),
            Some(gate.clone()),
        );
        assert!(known_up(&rig).await, "the server was never found healthy");
        gate.close();
        let before = gate.reached();
        let handle = rig.handle.clone();
        let add = tokio::spawn(async move {
            let add = Request::ScheduleAdd {
                start: "+1h".into(),
                end: "+2h".into(),
                message: None,
            };
            handle.request(add, "alice".into()).await
        });
        assert!(
            eventually(|| gate.reached() > before).await,
            "no write began"
        );
        let pending = rig.notifier.pending();
        server.abort();
        let _ = server.await;
        assert!(
            eventually(|| shown.load().mode == Mode::Outage).await,
            "no outage"
        );
        // `eventually` waits 5 s, more than `HOLD_EVENTS` (2 s under test).
        assert!(
            eventually(|| rig.notifier.pending() > pending).await,
            "the outage was not told while the operator's save hung"
        );
        assert!(!add.is_finished(), "answered before its save");
        gate.open();
        assert!(add.await.expect("answered").ok);
        drop(hook);
    }

    /// A server back while the outage's own save hangs is forwarded to at once, and the
    /// next write saves where things stand (no outage), not each finding in turn.
    #[tokio::test]
    async fn a_server_back_while_the_outages_save_hangs_is_forwarded_to_at_once() {
        let (port, servers) = dead_server();
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        let (rig, shown) = build_rig(
            |c, _| quick_checks(c),
            &servers,
            Persisted::default(),
            Some(gate.clone()),
        );
        assert!(
            eventually(|| shown.load().mode == Mode::Outage).await,
            "no outage"
        );
        assert!(eventually(|| gate.reached() > 0).await, "no write began");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the server's port");
        let server = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        });
        assert!(
            eventually(|| shown.load().mode == Mode::Normal).await,
            "the server's return waited for the outage's save"
        );
        assert_eq!(gate.reached(), 1, "a second write began beside the first");
        gate.open();
        let file = rig._dir.path().join("state.json");
        let saved = || {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            serde_json::from_str::<Persisted>(&text).is_ok_and(|s| s.outage_since.is_none())
        };
        assert!(eventually(|| gate.reached() == 2 && saved()).await);
        server.abort();
    }

    /// A change whose save fails is refused as before (`state_not_saved`, nothing changed),
    /// and an outage found while that save hung was held meanwhile and stays in force.
    #[tokio::test]
    async fn a_change_that_fails_to_save_is_refused_while_the_outage_found_meanwhile_holds() {
        let (port, server) = tcp_server().await;
        let gate = Arc::new(Gate::default());
        let _opens = Opens(gate.clone());
        gate.open();
        let servers = format!("[upstream]\nservers = [\"http://127.0.0.1:{port}\"]\n");
        let (rig, shown) = build_rig(
            |c, dir| {
                quick_checks(c);
                std::fs::create_dir(dir.join("sub")).expect("a folder");
                c.control.state_file = dir.join("sub").join("state.json");
            },
            &servers,
            Persisted::default(),
            Some(gate.clone()),
        );
        assert!(known_up(&rig).await, "the server was never found healthy");
        gate.close();
        let on = rig.on_while_written(&gate, "Lost").await;
        // The state file's folder becomes a file: the write under way fails once it runs.
        let sub = rig._dir.path().join("sub");
        std::fs::remove_dir_all(&sub).expect("folder removed");
        std::fs::write(&sub, "not a folder").expect("file written");
        server.abort();
        let _ = server.await;
        assert!(
            eventually(|| shown.load().mode == Mode::Outage).await,
            "the outage waited for the operator's save"
        );
        gate.open();
        let on = on.await.expect("on answered");
        let error = on.error.expect("refused");
        assert_eq!(error.code, "state_not_saved");
        assert!(
            error.message.contains("nothing was changed")
                && error.message.contains("send it again"),
            "{}",
            error.message
        );
        let state = rig.ask_now(Request::Status).await.state.expect("a state");
        assert_eq!(state.mode, Mode::Outage, "the refused `on` is not in force");
        assert_ne!(state.message.as_deref(), Some("Lost"));
        assert_eq!(shown.load().mode, Mode::Outage);
    }

    /// Started on the built-in defaults (no `./config.toml`), the proxy reads the file written
    /// since at a reload, as a start would; until there is one, a reload says what is missing.
    #[tokio::test]
    async fn a_proxy_on_the_defaults_reloads_the_config_file_written_since() {
        let rig = rig_with(|config, dir| config.reload_from = Some(dir.join("config.toml"))).await;
        let path = rig._dir.path().join("config.toml");
        let refused = rig.ask(Request::Reload).await;
        assert!(!refused.ok);
        let error = refused.error.expect("an error").message;
        assert!(error.contains("config.toml"), "{error}");
        let text = rig_text(rig._dir.path()) + "[maintenance]\nmessage = \"Written later\"\n";
        std::fs::write(&path, text).expect("config file");
        let reloaded = rig.ask(Request::Reload).await;
        assert!(reloaded.ok, "{:?}", reloaded.error);
        let status = rig.ask(Request::Status).await.state.expect("a state");
        assert_eq!(status.config, Some(path.display().to_string()));
    }

    /// Reloads asked for while one reads are all answered, by the read after it (they asked
    /// after it began): each reload sees the file as it was when it was asked for, and
    /// control commands are answered meanwhile.
    #[tokio::test]
    async fn reloads_asked_together_are_all_answered_with_the_latest_file() {
        let rig = rig_with(|config, dir| config.reload_from = Some(dir.join("config.toml"))).await;
        let path = rig._dir.path().join("config.toml");
        let write = |message: &str| {
            let text =
                rig_text(rig._dir.path()) + &format!("[maintenance]\nmessage = \"{message}\"\n");
            std::fs::write(&path, text).expect("config file");
        };
        let on = Request::On {
            message: None,
            until: None,
            retry_after: None,
            reason: None,
        };
        // Held with no message of its own: the config's is shown.
        assert!(rig.ask(on).await.ok);
        write("first");
        let (first, second, third, status) = tokio::join!(
            rig.ask(Request::Reload),
            rig.ask(Request::Reload),
            async {
                write("latest");
                rig.ask(Request::Reload).await
            },
            rig.ask(Request::Status),
        );
        assert!(status.ok);
        for resp in [first, second, third] {
            assert!(resp.ok, "{:?}", resp.error);
        }
        let status = rig.ask(Request::Status).await.state.expect("a state");
        assert_eq!(status.message.as_deref(), Some("latest"));
    }

    fn window(start: &str, end: &str) -> Request {
        Request::ScheduleAdd {
            start: start.into(),
            end: end.into(),
            message: Some("window".into()),
        }
    }

    /// The edge passes while the controller is busy with a request: a loop that looked for
    /// the next edge after "now" skipped it, and the window never started (or never ended).
    #[tokio::test(start_paused = true)]
    async fn an_edge_passed_during_a_request_is_still_taken() {
        let r = rig().await;
        assert!(r.ask(window("+10s", "+20s")).await.ok);
        assert_eq!(r.mode().await, Mode::Normal);
        // The wall clock jumps past the start; tokio's timers do not move at all, so only
        // the controller's own bookkeeping can notice.
        r.clock.set(r.at(10) + Duration::from_millis(1));
        assert!(
            r.mode_becomes(Mode::Maintenance).await,
            "the start was skipped"
        );
        r.clock.set(r.at(20) + Duration::from_millis(1));
        assert!(r.mode_becomes(Mode::Normal).await, "the end was skipped");
        let list = r.ask(Request::ScheduleList).await.schedules.expect("list");
        assert!(list.is_empty(), "an ended window is removed: {list:?}");
    }

    /// An edge with nothing else happening is taken by the controller's own timer.
    #[tokio::test(start_paused = true)]
    async fn edges_are_taken_on_time_by_the_timer() {
        let r = rig().await;
        assert!(r.ask(window("+90s", "+150s")).await.ok);
        // Both clocks move together, as they do in production.
        r.clock.set(r.at(89));
        tokio::time::advance(Duration::from_secs(89)).await;
        assert_eq!(r.mode().await, Mode::Normal, "not before its start");
        r.clock.set(r.at(90));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(r.mode_becomes(Mode::Maintenance).await);
        r.clock.set(r.at(150));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(r.mode_becomes(Mode::Normal).await);
    }

    /// The wall clock set back during a window, to before its start (NTP stepping a clock
    /// that ran fast, `date -s`): the window that has begun stays in force until its end, as
    /// the wall clock reaches it, whatever publishes meanwhile. Before, the next publish (here
    /// a command; a health check's flip as well) ended it mid-work and sent traffic to the
    /// application, and it began again at its start: two starts and two ends told.
    #[tokio::test(start_paused = true)]
    async fn a_window_in_force_stays_so_when_the_clock_goes_back() {
        let r = rig().await;
        assert!(r.ask(window("+10s", "+20s")).await.ok);
        r.clock.set(r.at(12));
        assert!(r.mode_becomes(Mode::Maintenance).await);
        r.clock.set(r.at(5));
        // Anything that publishes: a command that changes nothing.
        assert!(r.ask(Request::ForceOpen { enabled: true }).await.ok);
        let state = r.ask(Request::Status).await.state.expect("state");
        assert_eq!(state.mode, Mode::Maintenance, "ended by a clock set back");
        assert_eq!(
            state.next_window, None,
            "the window in force is not the next one"
        );
        assert_eq!(state.until.map(|u| u.0), Some(r.at(20)));
        r.clock.set(r.at(19));
        assert!(r.ask(Request::ForceOpen { enabled: true }).await.ok);
        assert_eq!(r.mode().await, Mode::Maintenance);
        // `off` ends it, as it ends any window in force.
        assert!(r.ask(Request::Off).await.ok);
        assert_eq!(r.mode().await, Mode::Normal);
        let list = r.ask(Request::ScheduleList).await.schedules.expect("list");
        assert!(list.is_empty(), "{list:?}");
    }

    /// The same window, left to its end: it ends at its end by the wall clock, once.
    #[tokio::test(start_paused = true)]
    async fn a_window_begun_before_the_clock_went_back_ends_at_its_end() {
        let r = rig().await;
        assert!(r.ask(window("+10s", "+20s")).await.ok);
        r.clock.set(r.at(12));
        assert!(r.mode_becomes(Mode::Maintenance).await);
        r.clock.set(r.at(3));
        for at in [4, 9, 10, 15, 19] {
            r.clock.set(r.at(at));
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(r.mode().await, Mode::Maintenance, "at {at}");
        }
        r.clock.set(r.at(20));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(r.mode_becomes(Mode::Normal).await);
    }

    /// An overrun and a window's end at the same moment: whichever the controller takes
    /// first, the window still ends (before, taking the overrun first skipped the edge).
    #[tokio::test(start_paused = true)]
    async fn an_overrun_at_a_windows_end_does_not_hide_the_end() {
        for _ in 0..8 {
            let r = rig().await;
            assert!(r.ask(window("+10s", "+20s")).await.ok);
            let on = Request::On {
                message: None,
                until: Some("+20s".into()),
                retry_after: None,
                reason: None,
            };
            assert!(r.ask(on).await.ok);
            r.clock.set(r.at(21));
            tokio::time::advance(Duration::from_secs(21)).await;
            let mut listed = usize::MAX;
            for _ in 0..20 {
                listed = r
                    .ask(Request::ScheduleList)
                    .await
                    .schedules
                    .expect("list")
                    .len();
                if listed == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(listed, 0, "the ended window is gone");
            let state = r.ask(Request::Status).await.state.expect("state");
            assert!(state.overrun);
            assert_eq!(state.mode, Mode::Maintenance, "the operator's switch holds");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_announced_end_that_passes_is_an_overrun_and_maintenance_stays() {
        let r = rig().await;
        let on = Request::On {
            message: Some("upgrade".into()),
            until: Some("+30m".into()),
            retry_after: None,
            reason: None,
        };
        assert!(r.ask(on).await.ok);
        let state = r.ask(Request::Status).await.state.expect("state");
        assert!(!state.overrun);
        assert_eq!(state.retry_after, Some(1800));
        // Past the end given, the minute shown may not have come: not yet an overrun.
        let until = state.until.expect("until").0;
        let shown = crate::time::announced_end(until);
        let before = shown.duration_since(r.at(0)).unwrap() - Duration::from_millis(1);
        r.clock.set(r.at(0) + before);
        tokio::time::advance(before).await;
        let state = r.ask(Request::Status).await.state.expect("state");
        assert!(!state.overrun, "overran before the minute people were told");
        r.clock.set(shown);
        tokio::time::advance(Duration::from_millis(1)).await;
        let state = r.ask(Request::Status).await.state.expect("state");
        assert!(state.overrun);
        assert_eq!(state.mode, Mode::Maintenance, "maintenance stays until off");
        assert_eq!(state.retry_after, Some(300), "back to the configured value");
    }

    /// Windows put end to end whose edges passed while the proxy was down: each one's
    /// `schedule_ended`, told at the restart, carries the `since` of the maintenance that goes
    /// on, the chain's first start, as a running proxy's edge tells it (and as the restart's
    /// `schedule_started` of the window in force does). It carried the next window's own start.
    #[tokio::test]
    async fn a_window_ended_while_down_tells_the_since_of_the_chain_it_hands_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config::parse(&rig_text(dir.path()), dir.path(), None).expect("config");
        let pages = Pages::load(&config.maintenance).expect("pages");
        let metrics = Arc::new(Metrics::new());
        let notifier = Notifier::start(config.notify.clone(), metrics.clone());
        let parts = Parts::new(Arc::new(config), Arc::new(pages), None, metrics).expect("parts");
        let t = |secs: u64| UNIX_EPOCH + Duration::from_secs(1_900_000_000 + secs);
        let mut left = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        for (start, end) in [(100, 200), (200, 300), (300, 400)] {
            let add = Change::ScheduleAdd {
                start: t(start),
                end: t(end),
                message: None,
                by: "ops".into(),
            };
            left = left.apply(add, t(0), true).expect("added");
        }
        // The proxy stopped during the first window.
        let left = left.tidied(true, t(150));
        let clock = Clock::manual(t(350));
        let (controller, _handle, _shown) = Controller::new(parts, left.clone(), notifier, clock);
        for w in &left.schedules[..2] {
            let ended = controller.ended_while_down(&left, w);
            assert_eq!(ended.mode, Mode::Maintenance, "{ended:?}");
            assert_eq!(
                ended.since,
                Some(crate::time::Timestamp(t(100))),
                "{ended:?}"
            );
        }
    }

    /// A window whose start and end the wall clock jumps over (a suspend, a VM paused, the
    /// clock set forward) between two of the controller's looks is told ended, as one that
    /// passed while the proxy was down is: tidied away unsaid, it was told neither started
    /// nor ended. Found by the edge's timer, or by a command that comes first.
    #[tokio::test]
    async fn a_window_the_clock_jumps_over_is_told_ended() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A receiver that never answers: an event sent to it stays pending.
        let hook = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let text = format!(
            "{}[[notify]]\nurl = \"http://{}/\"\n",
            rig_text(dir.path()),
            hook.local_addr().expect("its address")
        );
        let t = |secs: u64| UNIX_EPOCH + Duration::from_secs(1_900_000_000 + secs);
        let add = |start: u64, end: u64| Change::ScheduleAdd {
            start: t(start),
            end: t(end),
            message: None,
            by: "ops".into(),
        };
        let state = Persisted {
            force_open: true,
            ..Persisted::default()
        };
        let state = state.apply(add(100, 200), t(0), true).expect("added");
        let state = state.apply(add(300, 400), t(0), true).expect("added");
        let config = Config::parse(&text, dir.path(), None).expect("config");
        let pages = Pages::load(&config.maintenance).expect("pages");
        let metrics = Arc::new(Metrics::new());
        let notifier = Notifier::start(config.notify.clone(), metrics.clone());
        let parts = Parts::new(Arc::new(config), Arc::new(pages), None, metrics).expect("parts");
        let clock = Clock::manual(t(0));
        let (mut controller, _handle, _shown) =
            Controller::new(parts, state, notifier.clone(), clock.clone());
        controller.begun = true;

        // The edge's timer wakes past the first window's end.
        clock.set(t(250));
        controller.on_edge();
        assert_eq!(controller.handle.load().mode, Mode::Normal);
        let told: Vec<_> = (controller.unsent.iter())
            .map(|e| (e.event, e.window, e.at, e.since))
            .collect();
        let at = |secs| Some(crate::time::Timestamp(t(secs)));
        assert_eq!(
            told,
            [(EventKind::ScheduleEnded, Some(1), at(200).unwrap(), at(100))],
            "{:?}",
            controller.unsent
        );
        controller.flush(false).await;
        assert_eq!(notifier.pending(), 1);

        // A command before the timer: the change tidies the second window away.
        clock.set(t(450));
        let change = Change::ForceOpen(true);
        controller
            .change(change, t(450), "alice")
            .await
            .expect("applied");
        assert!(controller.state.schedules.is_empty());
        // Told once, by the change or by the edge its save's wait took (`served`), which
        // the run loop's next `flush` saves and sends.
        controller.flush(false).await;
        assert_eq!(notifier.pending(), 2, "the second window told ended too");
    }

    /// The wall clock set back ten minutes during a window, with nothing published until its
    /// end: the log says so, by as much, at the controller's next look. Compared with the
    /// last publish alone (the window's start), the step went unsaid, and the window ended
    /// ten minutes late without a word.
    #[tokio::test(start_paused = true)]
    async fn a_clock_set_back_during_a_window_is_warned_of_by_as_much() {
        crate::logging::capture_ready();
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // The test's runtime is single-threaded: the controller logs on this thread.
        let _logging = tracing::subscriber::set_default(subscriber);
        let r = rig().await;
        assert!(r.ask(window("+10s", "+3600s")).await.ok);
        r.clock.set(r.at(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(r.mode_becomes(Mode::Maintenance).await);
        // A second later, the clock is set back ten minutes.
        r.clock.set(r.at(11) - Duration::from_secs(600));
        tokio::time::advance(Duration::from_secs(1)).await;
        // A look that publishes nothing.
        assert_eq!(r.mode().await, Mode::Maintenance);
        assert_eq!(r.mode().await, Mode::Maintenance);
        let logs =
            String::from_utf8_lossy(&kept.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
        let warned: Vec<&str> = logs.lines().filter(|l| l.contains("went back")).collect();
        assert_eq!(warned.len(), 1, "{logs}");
        assert!(warned[0].contains("went back by 10m "), "{logs}");
    }
}
