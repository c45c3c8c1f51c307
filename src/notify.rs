//! Webhooks (`[[notify]]`): every change of mode or message, schedule edge and `until` overrun
//! is POSTed to each configured URL, as the event's JSON or as a Slack-compatible `{"text"}`.
//!
//! This module owns the payloads (`body`, `signature`) and the delivery: one worker task and
//! one bounded queue per target, a timeout per attempt, a few retries with exponential backoff.
//! It must never slow its caller: `Notifier::send` is a mutex-guarded push and a wake-up, never
//! an await, so a dead or slow webhook cannot hold up the controller, the control socket or the
//! data plane, nor another webhook. When a queue is full the oldest event is dropped (counted,
//! and logged: the first drop at once, the rest of a burst summed in one line per `WARN_EVERY`
//! per target), because the newest state is what a receiver needs most.
//!
//! Reload (`set_targets`): a target that stays (same url, format and secret) keeps its queue
//! and its worker; a removed target's worker ends with the try under way, its queue dropped
//! (logged, and counted while its `id` stays shown).
//!
//! Stop (`finish`): the events still queued or under way get a bounded time to be delivered,
//! beside the drain of the requests; what is left at the bound is dropped, counted and logged
//! per target, so that a receiver left on the last state it heard of is told in the log.
//!
//! Logs name a target by scheme and authority only: webhook URLs often carry their secret in
//! the path (Slack's `/services/T…/B…/…`). Beside it they give the target's `id` (its
//! configured `name`, else its index in `[[notify]]`), which is also the `webhook` label of its
//! metrics, so that a failing series can be matched to its log lines.
//!
//! Metrics (`NotifyStats`): each target's counts and queue length go under its `id`. A name
//! keeps its series across reloads while it is configured; an index only while it names the
//! same receiver. An `id` a reload drops (or an index it gives to another receiver) has its
//! series forgotten, and every queue that held it, a removed one still finishing its try
//! included, reports nothing more under it: no series comes back for a webhook the config no
//! longer has, and the label values are never more than the config's entries.

use crate::forward::pool::{https_connector, tcp_connector, HttpsConnector};
use crate::state::mode::Mode;
use crate::time::Timestamp;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio::time::Instant;

pub const SIGNATURE_HEADER: &str = "x-intermission-signature";
/// The signature of the time of sending with the body: `t=<unix seconds>,sha256=<hex
/// HMAC-SHA256(secret, "<t>." + body)>`, made again for each try. `SIGNATURE_HEADER` proves
/// who wrote a body, not when it was sent: a delivery seen on its way could be sent again
/// and check. With this one a receiver refuses what was sent too long ago (Stripe's and
/// Slack's scheme); the other stays for receivers written against it.
pub const TIMED_SIGNATURE_HEADER: &str = "x-intermission-signature-timed";

const AGENT: &str = concat!("intermission/", env!("CARGO_PKG_VERSION"));
/// Events waiting per target (the one being delivered not counted).
const QUEUE_CAPACITY: usize = 256;
/// Attempts per event, the first included: with `BACKOFF` doubling up to `MAX_BACKOFF`, the
/// last comes about a minute after the first, long enough for a receiver (a chat relay, a
/// pager's gateway) to restart, where three tries in 1.5 s lost the outage's news for good.
const ATTEMPTS: u32 = 8;
/// The backoff before the second attempt; it doubles after each failure, up to
/// `MAX_BACKOFF_FACTOR` times itself (30 s).
const BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF_FACTOR: u32 = 60;
/// The longest wait a receiver's `Retry-After` (on a 429 or 503) is followed for: longer
/// would hold every later event of the queue back for it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// At most one "dropped" warning per target in this time; later drops are summed into the next.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Webhooks are rare; a short-lived idle connection is enough to reuse one across a burst.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `notify.timeout` the config takes: a receiver that hangs holds its queue for
/// `ATTEMPTS` times this (8 minutes), plus the backoff between them.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The attempt's own timeout (`Target::timeout`) is what bounds a connect; this is a backstop.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits, once it has told the workers to give up, for them to have counted
/// and logged what they held: they do it as soon as they run, on the same runtime, so this
/// only backs up a worker that is somehow not polled.
const GIVE_UP_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Slack,
}

/// One `[[notify]]` entry, validated by the config layer.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// What metrics (the `webhook` label) and logs call it: its `name`, else its index in
    /// `[[notify]]`. Never the URL, whose path or userinfo may hold a token.
    pub id: String,
    /// `http://` or `https://`.
    pub url: Uri,
    pub format: Format,
    /// Signs the body (`SIGNATURE_HEADER`).
    pub secret: Option<String>,
    /// Per attempt: connect, send and the response head.
    pub timeout: Duration,
    /// `notify.headers`, sent with every POST (values marked sensitive).
    pub headers: http::HeaderMap,
}

impl std::fmt::Debug for Target {
    // Configs and snapshots are Debug: the URL (its path or userinfo may hold a token), the
    // secret and the header values must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("id", &self.id)
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// What makes a target "the same" across a reload; the timeout and the headers may change
    /// in place, so that a token rotated by a reload is what the queued events are sent with.
    fn same_receiver(&self, other: &Target) -> bool {
        self.url == other.url && self.format == other.format && self.secret == other.secret
    }
}

/// One thing that happened, as receivers get it (`format = "json"`: exactly these fields,
/// absent values as `null`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    pub event: EventKind,
    pub mode: Mode,
    pub previous_mode: Mode,
    pub message: Option<String>,
    pub reason: Option<String>,
    pub by: Option<String>,
    pub at: Timestamp,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    /// The schedule window a `schedule_started` or `schedule_ended` is about (its id, as
    /// `schedule list` shows it): with several windows, and the ends a restart tells of, a
    /// receiver can match each end to its start.
    pub window: Option<u64>,
    /// Which proxy is speaking (e.g. the hostname).
    pub instance: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ModeChanged,
    MessageUpdated,
    ScheduleStarted,
    ScheduleEnded,
    UntilOverrun,
    /// An operator announced a new end (`on --until` again) while maintenance is on: "running
    /// late?" is news the team's channel must hear, not only the page.
    UntilChanged,
}

impl EventKind {
    /// The event's name as receivers get it in `event`, for the log lines about it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ModeChanged => "mode_changed",
            EventKind::MessageUpdated => "message_updated",
            EventKind::ScheduleStarted => "schedule_started",
            EventKind::ScheduleEnded => "schedule_ended",
            EventKind::UntilOverrun => "until_overrun",
            EventKind::UntilChanged => "until_changed",
        }
    }
}

/// Counters the notifier reports to (implemented by the metrics module), each by the
/// target's `id`. Calls for one `id` come in order: the notifier makes them with the target's
/// queue locked.
pub trait NotifyStats: Send + Sync {
    /// An event reached a target (2xx).
    fn delivered(&self, webhook: &str);
    /// An event was given up after every attempt failed.
    fn failed(&self, webhook: &str);
    /// An event was dropped undelivered without using up its attempts: from a full queue, or
    /// still queued or under way when the proxy stopped.
    fn dropped(&self, webhook: &str);
    /// The events the target holds now: queued, and the one being tried, until each is
    /// delivered, given up or dropped.
    fn waiting(&self, webhook: &str, events: usize);
    /// `webhook` names a target from now on (at start, or by a reload): its series may start.
    fn added(&self, webhook: &str);
    /// `webhook` no longer names the target it named (a reload removed it, renamed it, or gave
    /// its index to another): its series go, and a new target under it starts from zero.
    fn forget(&self, webhook: &str);
    /// An event of a target whose `id` was forgotten was not delivered: still queued when a
    /// reload removed the target, or under way then and failed or cut short by a stop. No
    /// series of its own is left to count it in, and an operator who removed a webhook
    /// while its receiver was down must still see what it was never told.
    fn dropped_removed(&self);
}

/// The exact body a target receives for `event`.
pub fn body(format: Format, event: &Event) -> Vec<u8> {
    match format {
        // Serializing these plain fields cannot fail; an empty object beats a panic if it did.
        Format::Json => serde_json::to_vec(event).unwrap_or_else(|_| b"{}".to_vec()),
        Format::Slack => serde_json::json!({ "text": slack_escape(&sentence(event)) })
            .to_string()
            .into_bytes(),
    }
}

/// The value of `SIGNATURE_HEADER` for `body`: `sha256=<lowercase hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex_tag("sha256=", ring::hmac::sign(&key, body))
}

/// The value of `TIMED_SIGNATURE_HEADER` for `body` sent at `sent` (unix seconds).
pub fn timed_signature(secret: &str, sent: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = ring::hmac::Context::with_key(&key);
    let stamp = sent.to_string();
    context.update(stamp.as_bytes());
    context.update(b".");
    context.update(body);
    hex_tag(&format!("t={stamp},sha256="), context.sign())
}

/// `prefix` and the tag in lowercase hex.
fn hex_tag(prefix: &str, tag: ring::hmac::Tag) -> String {
    let mut out = String::with_capacity(prefix.len() + 64);
    out.push_str(prefix);
    for byte in tag.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// How long the episode that just ended lasted (`since` to `at`), as " of 1 h 5 min": what a
/// team reading the all-clear asks first. Empty without a start.
fn lasted(e: &Event) -> String {
    let Some(since) = e.since else {
        return String::new();
    };
    let secs = e.at.0.duration_since(since.0).map_or(0, |d| d.as_secs());
    let (h, m) = (secs / 3600, secs % 3600 / 60);
    match (h, m) {
        (0, 0) => format!(" of {secs} s"),
        (0, m) => format!(" of {m} min"),
        (h, 0) => format!(" of {h} h"),
        (h, m) => format!(" of {h} h {m} min"),
    }
}

/// The readable sentence of a Slack payload.
fn sentence(e: &Event) -> String {
    let on = &e.instance;
    let until = e
        .until
        .map(|u| format!(" (until {})", readable_time(u)))
        .unwrap_or_default();
    let said = |lead: String| match e.message.as_deref() {
        Some(m) => format!("{lead}: {m}"),
        None => lead,
    };
    let main = match e.event {
        EventKind::ModeChanged => match (e.mode, e.previous_mode) {
            (Mode::Maintenance, _) => said(format!("Maintenance started on {on}")) + &until,
            (Mode::Outage, _) => format!("Outage on {on}: no upstream server is healthy"),
            (Mode::Normal, Mode::Maintenance) => {
                format!("{on} is back to normal after maintenance{}", lasted(e))
            }
            (Mode::Normal, Mode::Outage) => {
                format!("{on} is back to normal after an outage{}", lasted(e))
            }
            (Mode::Normal, Mode::Normal) => format!("{on} is in normal mode"),
        },
        EventKind::MessageUpdated => said(format!("Message updated on {on}")),
        EventKind::ScheduleStarted => said(format!("Maintenance window started on {on}")) + &until,
        EventKind::ScheduleEnded => match e.mode {
            Mode::Normal => format!("Maintenance window ended on {on}; back to normal"),
            Mode::Maintenance => {
                format!("Maintenance window ended on {on}; maintenance stays on")
            }
            Mode::Outage => {
                format!("Maintenance window ended on {on}; outage: no upstream server is healthy")
            }
        },
        EventKind::UntilOverrun => {
            let end = e
                .until
                .map(|u| format!(" ({})", readable_time(u)))
                .unwrap_or_default();
            format!("Maintenance on {on} overran its announced end{end}; it stays on until switched off")
        }
        EventKind::UntilChanged => match e.until {
            Some(u) => format!(
                "Maintenance on {on} now expected to end by {}",
                readable_time(u)
            ),
            None => format!("Maintenance on {on} has no announced end any more"),
        },
    };
    let details: Vec<String> = [
        e.reason.as_deref().map(|r| format!("reason: {r}")),
        e.by.as_deref().map(|b| format!("by {b}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if details.is_empty() {
        main
    } else {
        format!("{main} — {}", details.join(", "))
    }
}

/// `2026-11-24 10:42 UTC`: what a person reads in a chat line.
fn readable_time(t: Timestamp) -> String {
    // An announced end, rounded up to the minute as the pages show it (`human_end`): the team
    // and the visitors read the same time.
    let shown = crate::hold::render::human_end(t.0);
    if shown.is_empty() {
        t.rfc3339()
    } else {
        shown
    }
}

/// Slack reads `<…>` as links and mentions (`<!channel>`), so an operator's text is escaped
/// as Slack asks: `&`, `<`, `>`.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A cheap, cloneable handle on the delivery workers. When the last handle is dropped, each
/// worker finishes its queue and ends.
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
}

struct Shared {
    queues: Mutex<Vec<Arc<Queue>>>,
    /// Queues a reload removed, while their worker may still be finishing its try: a later
    /// reload that forgets their `id` must silence them too.
    retired: Mutex<Vec<Arc<Queue>>>,
    deliverer: Arc<Deliverer>,
    capacity: usize,
    runtime: tokio::runtime::Handle,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for queue in lock(&self.queues).drain(..) {
            queue.close();
        }
    }
}

/// What every worker shares: the HTTP clients, the counters and the backoff.
struct Deliverer {
    plain: Client<HttpConnector, Full<Bytes>>,
    /// Built on the first `https://` delivery: reading the system roots costs a few hundred
    /// file reads that a proxy with only `http://` webhooks should not pay.
    https: OnceCell<Result<Client<HttpsConnector, Full<Bytes>>, String>>,
    stats: Arc<dyn NotifyStats>,
    backoff: Duration,
    /// Queued plus being delivered, all targets (removed ones still finishing included).
    pending: AtomicUsize,
    /// Woken each time `pending` falls to zero: what a stop waits for.
    settled: tokio::sync::Notify,
    /// Set when a stop's time for deliveries is over: every worker, removed ones too, gives
    /// up what it holds (counted and logged) and ends.
    halt: tokio::sync::watch::Sender<bool>,
}

impl Deliverer {
    /// `n` deliveries are over (done, given up or dropped).
    fn settle(&self, n: usize) {
        if n > 0 && self.pending.fetch_sub(n, Ordering::SeqCst) == n {
            self.settled.notify_waiters();
        }
    }

    /// Waits until nothing is pending, or `deadline`; whether nothing is.
    async fn settled_by(&self, deadline: Instant) -> bool {
        loop {
            // Registered before the check: a delivery that ends between the two still wakes it.
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return self.pending.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

struct Queue {
    state: Mutex<QueueState>,
    wake: tokio::sync::Notify,
}

struct QueueState {
    target: Target,
    events: VecDeque<Arc<Event>>,
    /// Removed by a reload or the notifier dropped: finish `events`, then end.
    closed: bool,
    /// Removed by a reload: `events` was dropped, and the try under way is the last.
    removed: bool,
    /// Removed by a reload (`removed` is set by a stop too): its `id`, if still shown, is
    /// another queue's now, whose length it must not overwrite.
    retired: bool,
    /// Its `id`'s series were forgotten by a reload: nothing more is reported under it.
    forgotten: bool,
    /// An event taken from `events` is being tried.
    under_way: bool,
    drops: DropLog,
}

impl QueueState {
    /// Tells the stats how many events the target holds, unless its `id` was forgotten.
    /// Called with the queue locked, so that the reports of one target come in order.
    fn report_waiting(&self, stats: &dyn NotifyStats) {
        if !self.forgotten && !self.retired {
            stats.waiting(
                &self.target.id,
                self.events.len() + usize::from(self.under_way),
            );
        }
    }

    /// Counts an outcome under the target's `id`; once that was forgotten, an event not
    /// delivered is counted apart (`NotifyStats::dropped_removed`).
    fn report(&self, stats: &dyn NotifyStats, outcome: Outcome) {
        let id = &self.target.id;
        match (self.forgotten, outcome) {
            (false, Outcome::Delivered) => stats.delivered(id),
            (false, Outcome::Failed) => stats.failed(id),
            (false, Outcome::Dropped) => stats.dropped(id),
            (true, Outcome::Failed | Outcome::Dropped) => stats.dropped_removed(),
            (true, Outcome::Delivered) => {}
        }
    }
}

/// What became of an event, as `QueueState::report` counts it.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Delivered,
    Failed,
    Dropped,
}

/// When to warn of a target's dropped events: the first drop of a burst at once, then the
/// drops since the last warning in one line at most every `WARN_EVERY`, so that a burst of
/// hundreds of events cannot flood the log but every drop is told within `WARN_EVERY`.
#[derive(Debug, Default)]
struct DropLog {
    /// Dropped since the last warning.
    unreported: u64,
    last_warning: Option<Instant>,
    /// A summary is scheduled (`Report::SummaryAt`) and has not run yet.
    summary_scheduled: bool,
}

/// What to do about dropped events now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    /// Warn now that this many of the oldest events were dropped.
    Warn(u64),
    /// Call `DropLog::summary` at this time.
    SummaryAt(Instant),
    Nothing,
}

impl DropLog {
    /// One more event dropped, at `now`.
    fn dropped(&mut self, now: Instant) -> Report {
        self.unreported += 1;
        match self.last_warning {
            Some(at) if now.duration_since(at) < WARN_EVERY => {
                if self.summary_scheduled {
                    Report::Nothing
                } else {
                    self.summary_scheduled = true;
                    Report::SummaryAt(at + WARN_EVERY)
                }
            }
            _ => self.warn(now),
        }
    }

    /// A scheduled summary's time has come (or a timer ran early or late).
    fn summary(&mut self, now: Instant) -> Report {
        match self.last_warning {
            Some(at) if self.unreported > 0 && now.duration_since(at) < WARN_EVERY => {
                Report::SummaryAt(at + WARN_EVERY)
            }
            _ => {
                self.summary_scheduled = false;
                if self.unreported == 0 {
                    Report::Nothing
                } else {
                    self.warn(now)
                }
            }
        }
    }

    fn warn(&mut self, now: Instant) -> Report {
        self.last_warning = Some(now);
        Report::Warn(std::mem::take(&mut self.unreported))
    }
}

impl Queue {
    fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_one();
    }

    /// Waits `wait` between two tries of an event; `false` as soon as the target is removed
    /// meanwhile: a wait is up to a minute, and a receiver removed during it must not be
    /// sent to again. A wake-up for a new event taken here is no loss: the worker looks at
    /// its queue before it waits for one.
    async fn wait_unless_removed(&self, wait: Duration) -> bool {
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            // Registered before the check: a removal between the two still wakes it.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if lock(&self.state).removed {
                return false;
            }
            tokio::select! {
                () = &mut sleep => return true,
                () = &mut woken => {}
            }
        }
    }
}

impl Notifier {
    /// Starts one delivery worker per target.
    ///
    /// # Panics
    /// Outside a tokio runtime (the workers are tokio tasks).
    pub fn start(targets: Vec<Target>, stats: Arc<dyn NotifyStats>) -> Notifier {
        Notifier::start_with(targets, stats, BACKOFF)
    }

    /// `start` with another first backoff (tests use a few milliseconds).
    pub fn start_with(
        targets: Vec<Target>,
        stats: Arc<dyn NotifyStats>,
        backoff: Duration,
    ) -> Notifier {
        Notifier::start_with_capacity(targets, stats, backoff, QUEUE_CAPACITY)
    }

    fn start_with_capacity(
        targets: Vec<Target>,
        stats: Arc<dyn NotifyStats>,
        backoff: Duration,
        capacity: usize,
    ) -> Notifier {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT);
        let notifier = Notifier {
            shared: Arc::new(Shared {
                queues: Mutex::new(Vec::new()),
                retired: Mutex::new(Vec::new()),
                deliverer: Arc::new(Deliverer {
                    plain: builder.build(tcp_connector(CONNECT_TIMEOUT)),
                    https: OnceCell::new(),
                    stats,
                    backoff,
                    pending: AtomicUsize::new(0),
                    settled: tokio::sync::Notify::new(),
                    halt: tokio::sync::watch::channel(false).0,
                }),
                capacity: capacity.max(1),
                runtime: tokio::runtime::Handle::current(),
            }),
        };
        notifier.set_targets(targets);
        notifier
    }

    /// Queues `event` for every target. Never waits: a full queue loses its oldest event.
    pub fn send(&self, event: Event) {
        let event = Arc::new(event);
        let queues = lock(&self.shared.queues);
        for queue in queues.iter() {
            self.push(queue, event.clone());
        }
    }

    fn push(&self, queue: &Arc<Queue>, event: Arc<Event>) {
        let d = &self.shared.deliverer;
        let mut report = Report::Nothing;
        let (mut url, mut id) = (String::new(), String::new());
        {
            let mut s = lock(&queue.state);
            if s.removed {
                // Given up by a stop (its worker has ended): nothing would send it. Only a
                // second signal, which cuts the stop short, leaves events coming after it.
                s.report(&*d.stats, Outcome::Dropped);
                let id = s.target.id.clone();
                drop(s);
                tracing::warn!(
                    webhook_id = id,
                    event = event.event.as_str(),
                    "webhook event not delivered: the proxy is stopping"
                );
                return;
            }
            if s.events.len() >= self.shared.capacity && s.events.pop_front().is_some() {
                // Out of the queue and into it again at once: never zero in between.
                d.pending.fetch_sub(1, Ordering::SeqCst);
                s.report(&*d.stats, Outcome::Dropped);
                report = s.drops.dropped(Instant::now());
                if let Report::Warn(_) = report {
                    url = shown(&s.target.url);
                    id = s.target.id.clone();
                }
            }
            s.events.push_back(event);
            d.pending.fetch_add(1, Ordering::SeqCst);
            s.report_waiting(&*d.stats);
        }
        // Logged outside the lock: a slow log sink must not hold up the worker.
        match report {
            Report::Warn(count) => warn_dropped(&url, &id, count),
            // The rest of a burst waits for a timer of its own, not for the worker: the worker
            // may spend three whole timeouts on one event, or sleep with nothing left to send,
            // and a summary that waited for its next delivery or event could come much later
            // than `WARN_EVERY`, or never.
            Report::SummaryAt(at) => {
                self.shared
                    .runtime
                    .spawn(summarize_drops(queue.clone(), at));
            }
            Report::Nothing => {}
        }
        queue.wake.notify_one();
    }

    /// Replaces the targets (config reload). A target with the same url, format and secret
    /// keeps its queue (and takes the new timeout, headers and `id`); new ones start empty;
    /// removed ones end with the try under way, their queues dropped (logged, and counted
    /// under a name that stays, else apart: `NotifyStats::dropped_removed`). The series of an `id` that no longer names the same webhook
    /// are forgotten.
    pub fn set_targets(&self, targets: Vec<Target>) {
        let d = &self.shared.deliverer;
        let stats = &*d.stats;
        let mut queues = lock(&self.shared.queues);
        let mut retired = lock(&self.shared.retired);
        // The others' workers have ended: nothing of theirs is left to report.
        retired.retain(|q| Arc::strong_count(q) > 1);
        let old: Vec<Arc<Queue>> = std::mem::take(&mut *queues);
        // Every queue stays locked until the `id`s are settled: a try that ends meanwhile is
        // counted under the `id` in force after the reload, never into a series being
        // forgotten (which would bring it back).
        let mut states: Vec<MutexGuard<'_, QueueState>> =
            old.iter().map(|q| lock(&q.state)).collect();
        let mut retired_states: Vec<MutexGuard<'_, QueueState>> =
            retired.iter().map(|q| lock(&q.state)).collect();
        let mut taken = vec![false; old.len()];
        let mut placed: Vec<(Target, Option<usize>)> = Vec::with_capacity(targets.len());
        for target in targets {
            let kept =
                (0..old.len()).find(|&i| !taken[i] && states[i].target.same_receiver(&target));
            if let Some(i) = kept {
                taken[i] = true;
            }
            placed.push((target, kept));
        }
        // A removed target ends with the try under way, and what it had queued is dropped:
        // whoever removes a receiver wants it to stop hearing, and finishing the queue kept
        // sending to a receiver that hangs for hours (256 events, eight timeouts each),
        // beside the queue of its replacement, one more for each reload. The drops are
        // counted below, once it is known whether its `id` stays shown.
        let mut removals = Vec::new();
        for (i, s) in states.iter_mut().enumerate() {
            if taken[i] {
                continue;
            }
            s.closed = true;
            s.removed = true;
            s.retired = true;
            let dropped = s.events.len();
            s.events.clear();
            removals.push((i, dropped, shown(&s.target.url), s.target.id.clone()));
        }
        // A name keeps its counts while it is configured, whatever its URL; an index only
        // while it names the same receiver: one that comes to mean another webhook (entries
        // removed or reordered) starts again from zero, as a counter reset, rather than adding
        // one receiver's deliveries to another's.
        let mut forgotten: Vec<String> = Vec::new();
        for (i, s) in states.iter().enumerate() {
            let id = &s.target.id;
            let keeps = placed
                .iter()
                .find(|(t, _)| t.id == *id)
                .is_some_and(|(_, kept)| !is_index(id) || *kept == Some(i));
            if !keeps {
                stats.forget(id);
                forgotten.push(id.clone());
            }
        }
        for s in states.iter_mut().chain(retired_states.iter_mut()) {
            if forgotten.contains(&s.target.id) {
                s.forgotten = true;
            }
        }
        // Counted once its `id`'s fate is known: under the name it keeps, else apart, not
        // into series removed a moment later.
        for &(i, dropped, ..) in &removals {
            for _ in 0..dropped {
                states[i].report(stats, Outcome::Dropped);
            }
        }
        for (target, kept) in placed {
            let queue = match kept {
                Some(i) => {
                    let s = &mut states[i];
                    s.target = target;
                    s.forgotten = false;
                    stats.added(&s.target.id);
                    s.report_waiting(stats);
                    old[i].clone()
                }
                None => {
                    stats.added(&target.id);
                    // A name kept for a new receiver: what the old one held is not its.
                    stats.waiting(&target.id, 0);
                    let queue = Arc::new(Queue {
                        state: Mutex::new(QueueState {
                            target,
                            events: VecDeque::new(),
                            closed: false,
                            removed: false,
                            retired: false,
                            forgotten: false,
                            under_way: false,
                            drops: DropLog::default(),
                        }),
                        wake: tokio::sync::Notify::new(),
                    });
                    self.shared.runtime.spawn(work(queue.clone(), d.clone()));
                    queue
                }
            };
            queues.push(queue);
        }
        drop(states);
        drop(retired_states);
        for (i, dropped, url, id) in removals {
            if dropped > 0 {
                tracing::warn!(
                    webhook = url,
                    webhook_id = id,
                    dropped,
                    "webhook removed by a reload: dropped its {dropped} queued event(s)"
                );
            }
            // Said before settled, as `give_up_at_stop` says it.
            d.settle(dropped);
            // Its worker sees `removed` at once, even in a wait between two tries.
            old[i].wake.notify_one();
            retired.push(old[i].clone());
        }
    }

    /// Deliveries waiting or under way, all targets (removed ones still finishing included).
    pub fn pending(&self) -> usize {
        self.shared.deliverer.pending.load(Ordering::SeqCst)
    }

    /// At a stop, once no more events will come: lets the events still queued or under way
    /// be delivered (in order, retried as usual) until none is left or `deadline`, whichever
    /// comes first; then each worker gives up what it still holds, counted as dropped and
    /// logged in one line per target. Returns at once when nothing is pending. Delivery is
    /// at least once, and the next start does not tell again what this one failed to send:
    /// a receiver not told of the return to normal would stay on "maintenance".
    pub async fn finish(&self, deadline: Instant) {
        let d = &self.shared.deliverer;
        let pending = self.pending();
        if pending == 0 {
            return;
        }
        let within = deadline.saturating_duration_since(Instant::now());
        if !within.is_zero() {
            tracing::info!(
                pending,
                "delivering {pending} webhook event(s) before stopping, for up to {within:?}"
            );
        }
        if d.settled_by(deadline).await {
            tracing::info!("webhook events delivered; stopping");
            return;
        }
        d.halt.send_replace(true);
        if !d.settled_by(Instant::now() + GIVE_UP_WAIT).await {
            tracing::warn!(
                pending = self.pending(),
                "webhook workers did not give up their events in time; stopping anyway"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent at every await-free step, so a panic elsewhere while
    // holding the lock leaves nothing half-done worth refusing over.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits for a `Report::SummaryAt`, then warns of the drops since the last warning. It holds
/// the queue alone, not the notifier: a notifier dropped meanwhile still gets its summary.
async fn summarize_drops(queue: Arc<Queue>, mut at: Instant) {
    loop {
        tokio::time::sleep_until(at).await;
        let (report, url, id) = {
            let mut s = lock(&queue.state);
            (
                s.drops.summary(Instant::now()),
                shown(&s.target.url),
                s.target.id.clone(),
            )
        };
        match report {
            Report::Warn(count) => {
                warn_dropped(&url, &id, count);
                return;
            }
            Report::SummaryAt(later) => at = later,
            Report::Nothing => return,
        }
    }
}

fn warn_dropped(url: &str, id: &str, count: u64) {
    tracing::warn!(
        webhook = url,
        webhook_id = id,
        dropped = count,
        "webhook queue full: dropped the {count} oldest queued event(s); the receiver is slow or down"
    );
}

/// Whether `id` is an entry's index rather than its `name`: the config refuses names made of
/// digits alone, so that the two never meet.
fn is_index(id: &str) -> bool {
    id.bytes().all(|b| b.is_ascii_digit())
}

/// A URL as logs may show it: scheme, host and port, never the userinfo or the path that may
/// hold a secret.
fn shown(url: &Uri) -> String {
    match (url.scheme_str(), url.authority()) {
        (Some(scheme), Some(authority)) => {
            let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
            format!("{scheme}://{host_port}/…")
        }
        _ => "(webhook)".to_owned(),
    }
}

/// One target's worker: delivers its events one at a time, in order, until its queue is
/// closed and empty, or a stop's time is over (`Deliverer::halt`).
async fn work(queue: Arc<Queue>, d: Arc<Deliverer>) {
    let mut halt = d.halt.subscribe();
    loop {
        if *halt.borrow() {
            give_up_at_stop(&queue, &d, None);
            return;
        }
        let next = {
            let mut s = lock(&queue.state);
            match s.events.pop_front() {
                Some(event) => {
                    // Still held, now by the worker: the length it reports does not change.
                    s.under_way = true;
                    Some((event, s.target.clone()))
                }
                None if s.closed => return,
                None => None,
            }
        };
        match next {
            Some((event, target)) => {
                // The stop first: once its time is over, an attempt under way is not known
                // to have arrived, and is counted with the rest as not delivered.
                tokio::select! {
                    biased;
                    _ = halt.wait_for(|halted| *halted) => {
                        give_up_at_stop(&queue, &d, Some(&event));
                        return;
                    }
                    delivered = deliver(&d, target, &event, &queue) => {
                        {
                            let mut s = lock(&queue.state);
                            s.under_way = false;
                            if delivered {
                                s.report(&*d.stats, Outcome::Delivered);
                            } else {
                                s.report(&*d.stats, Outcome::Failed);
                            }
                            s.report_waiting(&*d.stats);
                        }
                        d.settle(1);
                    }
                }
            }
            None => tokio::select! {
                _ = halt.wait_for(|halted| *halted) => {}
                () = queue.wake.notified() => {}
            },
        }
    }
}

/// A stop's time for deliveries is over: the event under way (if any) and those queued are
/// dropped, counted, and told in one line for the target, by kind, so that whoever runs the
/// receiver knows what it was not told. The queue takes no more events.
fn give_up_at_stop(queue: &Queue, d: &Deliverer, under_way: Option<&Event>) {
    let (left, url, id) = {
        let mut s = lock(&queue.state);
        s.closed = true;
        s.removed = true;
        s.under_way = false;
        let left: Vec<EventKind> = under_way
            .map(|e| e.event)
            .into_iter()
            .chain(s.events.drain(..).map(|e| e.event))
            .collect();
        for _ in 0..left.len() {
            s.report(&*d.stats, Outcome::Dropped);
        }
        s.report_waiting(&*d.stats);
        (left, shown(&s.target.url), s.target.id.clone())
    };
    if left.is_empty() {
        return;
    }
    let dropped = left.len();
    let kinds = by_kind(&left);
    tracing::warn!(
        webhook = url,
        webhook_id = id,
        dropped,
        events = kinds,
        "stopping: {dropped} webhook event(s) not delivered ({kinds}); the receiver may still show the state before them"
    );
    // Settled once said: `finish` returns when all are, and the process may end right after,
    // before a line still to be written (CI once looked for it in that moment, and missed it).
    d.settle(dropped);
}

/// `2 mode_changed, 1 message_updated`: how many of each kind, in the order first seen.
fn by_kind(kinds: &[EventKind]) -> String {
    let mut counted: Vec<(EventKind, usize)> = Vec::new();
    for &kind in kinds {
        match counted.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => counted.push((kind, 1)),
        }
    }
    counted
        .iter()
        .map(|(kind, n)| format!("{n} {}", kind.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Tries `event` until it is delivered (`true`) or given up (`false`); the caller counts it.
async fn deliver(d: &Deliverer, mut target: Target, event: &Event, queue: &Queue) -> bool {
    let payload = Bytes::from(body(target.format, event));
    let signed = target
        .secret
        .as_deref()
        .map(|secret| signature(secret, &payload));
    let mut delay = d.backoff;
    let longest = d.backoff.saturating_mul(MAX_BACKOFF_FACTOR);
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            // A reload between two tries may have rotated the receiver's token or changed
            // its timeout (a kept queue keeps its receiver: the URL, format and secret, so the
            // payload and its signature stand): the operator who fixed a revoked token after
            // the first `401` must not see this event given up with the old one.
            target = lock(&queue.state).target.clone();
        }
        let outcome = tokio::time::timeout(
            target.timeout,
            post(d, &target, payload.clone(), signed.as_deref()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Failed::from(format!(
                "no answer within {:?}",
                target.timeout
            )))
        });
        match outcome {
            Ok(()) => {
                if attempt == 1 {
                    tracing::debug!(
                        webhook = shown(&target.url),
                        webhook_id = target.id,
                        event = event.event.as_str(),
                        attempt,
                        "webhook delivered"
                    );
                } else {
                    // The failure was warned of: its end is told too.
                    tracing::info!(
                        webhook = shown(&target.url),
                        webhook_id = target.id,
                        event = event.event.as_str(),
                        attempts = attempt,
                        "webhook delivered after {attempt} tries"
                    );
                }
                return true;
            }
            Err(Failed { why, retry_after }) => {
                let last = attempt == ATTEMPTS;
                let mut removed = lock(&queue.state).removed;
                if !removed && !last {
                    // A receiver that says when to come back (a rate limit) is followed,
                    // within bounds; otherwise the backoff's own time.
                    let wait =
                        retry_after.map_or(delay, |asked| asked.min(MAX_RETRY_AFTER).max(delay));
                    if attempt == 1 {
                        // At once, not only after the last try about a minute later: a receiver
                        // that is down is seen while it can still be fixed. The tries after are
                        // quiet until the event is delivered or given up.
                        tracing::warn!(
                            webhook = shown(&target.url),
                        webhook_id = target.id,
                            event = event.event.as_str(),
                            retry_in = ?wait,
                            "webhook not delivered: {why}; trying again in {} (up to {ATTEMPTS} tries)",
                            crate::time::for_people(wait)
                        );
                    } else {
                        tracing::debug!(webhook = shown(&target.url), webhook_id = target.id, attempt, retry_in = ?wait, "webhook attempt failed: {why}");
                    }
                    removed = !queue.wait_unless_removed(wait).await;
                }
                if removed {
                    tracing::warn!(
                        webhook = shown(&target.url),
                        webhook_id = target.id,
                        event = event.event.as_str(),
                        attempt,
                        "webhook not delivered, and removed by a reload: not tried again: {why}"
                    );
                } else if last {
                    tracing::warn!(
                        webhook = shown(&target.url),
                        webhook_id = target.id,
                        event = event.event.as_str(),
                        attempts = ATTEMPTS,
                        "webhook not delivered, giving up: {why}"
                    );
                } else {
                    delay = delay.saturating_mul(2).min(longest);
                    continue;
                }
                return false;
            }
        }
    }
    false
}

/// Why an attempt failed, and when the receiver asked to be tried again, if it did.
struct Failed {
    why: String,
    retry_after: Option<Duration>,
}

impl From<String> for Failed {
    fn from(why: String) -> Self {
        Failed {
            why,
            retry_after: None,
        }
    }
}

/// A `Retry-After` of a 429 or 503, in seconds or as an HTTP date.
fn retry_after(status: http::StatusCode, headers: &http::HeaderMap) -> Option<Duration> {
    if status != http::StatusCode::TOO_MANY_REQUESTS
        && status != http::StatusCode::SERVICE_UNAVAILABLE
    {
        return None;
    }
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    // Up to the second the date names: what is left of it to the nanosecond was the wait
    // told in the log (`trying again in 29.998126114s`).
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(Duration::from_secs(
        left.as_secs() + u64::from(left.subsec_nanos() > 0),
    ))
}

/// One attempt: success is a 2xx answer. The response body is not read; receivers have
/// nothing to say to us beyond the status (and, refusing, when to come back).
async fn post(
    d: &Deliverer,
    target: &Target,
    payload: Bytes,
    signed: Option<&str>,
) -> Result<(), Failed> {
    let url = &target.url;
    // Signed as this try is sent, not when the event was: the time is what a receiver checks.
    let timed = target.secret.as_deref().map(|secret| {
        let sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        timed_signature(secret, sent, &payload)
    });
    let mut req = Request::post(url.clone())
        .body(Full::new(payload))
        .map_err(|e| e.to_string())?;
    // Ours first, so that a `User-Agent` the target gives replaces it.
    let headers = req.headers_mut();
    headers.insert(USER_AGENT, HeaderValue::from_static(AGENT));
    for (name, value) in &target.headers {
        headers.insert(name, value.clone());
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(value) = signed {
        let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        req.headers_mut().insert(SIGNATURE_HEADER, value);
    }
    if let Some(timed) = timed {
        let value = HeaderValue::from_str(&timed).map_err(|e| e.to_string())?;
        req.headers_mut().insert(TIMED_SIGNATURE_HEADER, value);
    }
    let response = if url.scheme() == Some(&http::uri::Scheme::HTTPS) {
        let client = d
            .https
            .get_or_init(https_client)
            .await
            .as_ref()
            .map_err(|e| Failed::from(e.clone()))?;
        client.request(req).await
    } else {
        d.plain.request(req).await
    }
    .map_err(|e| crate::logging::with_causes(&e))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(Failed {
            why: format!("status {status}"),
            retry_after: retry_after(status, response.headers()),
        })
    }
}

/// The client for `https://` webhooks, verifying against the system's roots.
async fn https_client() -> Result<Client<HttpsConnector, Full<Bytes>>, String> {
    // Reading the system store is blocking file I/O.
    let roots = tokio::task::spawn_blocking(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "no system root certificates found; https:// webhooks will fail verification"
            );
        }
        roots
    })
    .await
    .map_err(|e| format!("loading root certificates: {e}"))?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| format!("TLS settings: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT);
    Ok(builder.build(https_connector(
        tcp_connector(CONNECT_TIMEOUT),
        &Arc::new(tls),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    /// What the notifier reported: the totals of every webhook, reported or forgotten since,
    /// and, as the metrics keep them, the counts and queue length of each webhook shown now.
    #[derive(Default)]
    struct Counts {
        delivered: AtomicUsize,
        failed: AtomicUsize,
        dropped: AtomicUsize,
        /// Undelivered events of webhooks whose series were forgotten.
        removed: AtomicUsize,
        shown: Mutex<std::collections::BTreeMap<String, Shown>>,
    }

    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    struct Shown {
        delivered: usize,
        failed: usize,
        dropped: usize,
        waiting: usize,
    }

    impl Counts {
        fn show(&self, webhook: &str, change: impl FnOnce(&mut Shown)) {
            let mut shown = self.shown.lock().unwrap();
            change(shown.entry(webhook.to_owned()).or_default());
        }
    }

    impl NotifyStats for Counts {
        fn delivered(&self, webhook: &str) {
            self.delivered.fetch_add(1, Ordering::SeqCst);
            self.show(webhook, |s| s.delivered += 1);
        }
        fn failed(&self, webhook: &str) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            self.show(webhook, |s| s.failed += 1);
        }
        fn dropped(&self, webhook: &str) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            self.show(webhook, |s| s.dropped += 1);
        }
        fn waiting(&self, webhook: &str, events: usize) {
            self.show(webhook, |s| s.waiting = events);
        }
        fn added(&self, webhook: &str) {
            self.show(webhook, |_| {});
        }
        fn forget(&self, webhook: &str) {
            self.shown.lock().unwrap().remove(webhook);
        }
        fn dropped_removed(&self) {
            self.removed.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Counts {
        fn get(&self) -> (usize, usize, usize) {
            (
                self.delivered.load(Ordering::SeqCst),
                self.failed.load(Ordering::SeqCst),
                self.dropped.load(Ordering::SeqCst),
            )
        }

        /// The webhooks shown now, each with (delivered, failed, dropped, waiting).
        fn shown(&self) -> Vec<(String, (usize, usize, usize, usize))> {
            self.shown
                .lock()
                .unwrap()
                .iter()
                .map(|(id, s)| (id.clone(), (s.delivered, s.failed, s.dropped, s.waiting)))
                .collect()
        }

        fn waiting(&self, webhook: &str) -> Option<usize> {
            self.shown.lock().unwrap().get(webhook).map(|s| s.waiting)
        }
    }

    fn time(text: &str) -> Timestamp {
        Timestamp(humantime::parse_rfc3339(text).unwrap())
    }

    fn event(kind: EventKind, mode: Mode, previous_mode: Mode, message: Option<&str>) -> Event {
        Event {
            event: kind,
            mode,
            previous_mode,
            message: message.map(str::to_owned),
            reason: None,
            by: None,
            at: time("2026-11-24T09:00:00Z"),
            since: None,
            until: None,
            window: None,
            instance: "shop-1".into(),
        }
    }

    /// An event whose message is its number, to check order.
    fn numbered(n: usize) -> Event {
        let m = n.to_string();
        event(
            EventKind::MessageUpdated,
            Mode::Maintenance,
            Mode::Maintenance,
            Some(&m),
        )
    }

    #[derive(Clone)]
    enum Answer {
        Ok,
        /// 500 to the first n requests, then 200.
        FailFirst(usize),
        /// Never answers.
        Hang,
        /// Answers 200 once a permit is given, one per request.
        Gate(Arc<Semaphore>),
        /// 429 with `Retry-After: 1` to the first request, then 200.
        Limited,
        /// 200 after this long.
        Slow(Duration),
        /// 301 to this URL.
        Moved(Uri),
    }

    struct Received {
        headers: http::HeaderMap,
        body: Bytes,
    }

    /// A real HTTP receiver on 127.0.0.1:0 that records every request as it arrives.
    struct Receiver {
        url: Uri,
        got: Arc<Mutex<Vec<Received>>>,
    }

    impl Receiver {
        async fn start(answer: Answer) -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url: Uri = format!(
                "http://{}/hooks/secret-path",
                listener.local_addr().unwrap()
            )
            .parse()
            .unwrap();
            Receiver::start_on(listener, url, answer)
        }

        /// A receiver on `listener`, which `url` names.
        fn start_on(listener: TcpListener, url: Uri, answer: Answer) -> Receiver {
            let got = Arc::new(Mutex::new(Vec::new()));
            let calls = Arc::new(AtomicUsize::new(0));
            let recorded = got.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (got, calls, answer) = (recorded.clone(), calls.clone(), answer.clone());
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (got, calls, answer) = (got.clone(), calls.clone(), answer.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            got.lock().unwrap().push(Received {
                                headers: parts.headers,
                                body,
                            });
                            let n = calls.fetch_add(1, Ordering::SeqCst);
                            let status = match answer {
                                Answer::Ok => 200,
                                Answer::Limited if n == 0 => {
                                    let response = http::Response::builder()
                                        .status(429)
                                        .header("retry-after", "1")
                                        .body(Full::new(Bytes::new()))
                                        .unwrap();
                                    return Ok(response);
                                }
                                Answer::Limited => 200,
                                Answer::FailFirst(k) if n < k => 500,
                                Answer::FailFirst(_) => 204,
                                Answer::Hang => std::future::pending().await,
                                Answer::Slow(after) => {
                                    tokio::time::sleep(after).await;
                                    200
                                }
                                Answer::Gate(gate) => {
                                    gate.acquire().await.unwrap().forget();
                                    200
                                }
                                Answer::Moved(to) => {
                                    let response = http::Response::builder()
                                        .status(301)
                                        .header("location", to.to_string())
                                        .body(Full::new(Bytes::new()))
                                        .unwrap();
                                    return Ok(response);
                                }
                            };
                            let response = http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    tokio::spawn(async move {
                        let io = TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
            Receiver { url, got }
        }

        fn count(&self) -> usize {
            self.got.lock().unwrap().len()
        }

        /// The `message` of every JSON body received, in order.
        fn messages(&self) -> Vec<String> {
            self.got
                .lock()
                .unwrap()
                .iter()
                .map(|r| {
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                    v["message"].as_str().unwrap_or("").to_owned()
                })
                .collect()
        }

        fn target(&self, secret: Option<&str>) -> Target {
            Target {
                id: "hook".into(),
                url: self.url.clone(),
                format: Format::Json,
                secret: secret.map(str::to_owned),
                timeout: Duration::from_secs(10),
                headers: http::HeaderMap::new(),
            }
        }
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const FAST: Duration = Duration::from_millis(10);

    #[test]
    fn a_target_s_debug_shows_no_secret() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer header-token".parse().unwrap());
        let target = Target {
            id: "ops".into(),
            url: "https://user:url-password@hooks.example/path-token"
                .parse()
                .unwrap(),
            format: Format::Json,
            secret: Some("signing-secret".into()),
            timeout: Duration::from_secs(5),
            headers,
        };
        let shown = format!("{target:?}");
        assert!(shown.contains("ops"), "{shown}");
        for secret in [
            "url-password",
            "path-token",
            "signing-secret",
            "header-token",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn json_body_has_exactly_the_documented_fields() {
        let e = Event {
            reason: Some("INC-1234".into()),
            by: Some("alice".into()),
            since: Some(time("2026-11-24T09:00:00Z")),
            until: Some(time("2026-11-24T10:00:00Z")),
            ..event(
                EventKind::ModeChanged,
                Mode::Maintenance,
                Mode::Normal,
                Some("Database upgrade"),
            )
        };
        let v: serde_json::Value = serde_json::from_slice(&body(Format::Json, &e)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "event": "mode_changed", "mode": "maintenance", "previous_mode": "normal",
                "message": "Database upgrade", "reason": "INC-1234", "by": "alice",
                "at": "2026-11-24T09:00:00Z", "since": "2026-11-24T09:00:00Z",
                "until": "2026-11-24T10:00:00Z", "window": null, "instance": "shop-1"
            })
        );
        // Absent values are null, not missing: receivers can rely on every key.
        let bare = event(EventKind::ModeChanged, Mode::Outage, Mode::Normal, None);
        let v: serde_json::Value = serde_json::from_slice(&body(Format::Json, &bare)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = [
            "event",
            "mode",
            "previous_mode",
            "message",
            "reason",
            "by",
            "at",
            "since",
            "until",
            "window",
            "instance",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert!(v["until"].is_null() && v["message"].is_null());
        for (kind, name) in [
            (EventKind::ModeChanged, "mode_changed"),
            (EventKind::MessageUpdated, "message_updated"),
            (EventKind::ScheduleStarted, "schedule_started"),
            (EventKind::ScheduleEnded, "schedule_ended"),
            (EventKind::UntilOverrun, "until_overrun"),
            (EventKind::UntilChanged, "until_changed"),
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), name);
        }
    }

    #[test]
    fn slack_sentences() {
        use EventKind::*;
        use Mode::*;
        let until = Some(time("2026-11-24T10:00:00Z"));
        let db = Some("Database upgrade");
        let back = event(ModeChanged, Normal, Outage, None);
        let cases = [
            (
                Event {
                    until,
                    ..event(ModeChanged, Maintenance, Normal, db)
                },
                "Maintenance started on shop-1: Database upgrade (until 2026-11-24 10:00 UTC)",
            ),
            (
                Event {
                    reason: Some("INC-1234".into()),
                    by: Some("alice".into()),
                    ..event(ModeChanged, Maintenance, Outage, None)
                },
                "Maintenance started on shop-1 — reason: INC-1234, by alice",
            ),
            (
                event(ModeChanged, Normal, Maintenance, None),
                "shop-1 is back to normal after maintenance",
            ),
            (
                event(ModeChanged, Outage, Normal, Some("We are on it")),
                "Outage on shop-1: no upstream server is healthy",
            ),
            (
                event(ModeChanged, Normal, Outage, None),
                "shop-1 is back to normal after an outage",
            ),
            (
                Event {
                    since: Some(Timestamp(back.at.0 - Duration::from_secs(3900))),
                    ..back.clone()
                },
                "shop-1 is back to normal after an outage of 1 h 5 min",
            ),
            (
                Event {
                    since: Some(Timestamp(back.at.0 - Duration::from_secs(42))),
                    ..back.clone()
                },
                "shop-1 is back to normal after an outage of 42 s",
            ),
            (
                event(MessageUpdated, Maintenance, Maintenance, Some("15 more minutes.")),
                "Message updated on shop-1: 15 more minutes.",
            ),
            (
                Event {
                    until,
                    ..event(ScheduleStarted, Maintenance, Normal, db)
                },
                "Maintenance window started on shop-1: Database upgrade (until 2026-11-24 10:00 UTC)",
            ),
            (
                event(ScheduleEnded, Normal, Maintenance, None),
                "Maintenance window ended on shop-1; back to normal",
            ),
            (
                event(ScheduleEnded, Maintenance, Maintenance, None),
                "Maintenance window ended on shop-1; maintenance stays on",
            ),
            (
                event(ScheduleEnded, Outage, Maintenance, None),
                "Maintenance window ended on shop-1; outage: no upstream server is healthy",
            ),
            (
                Event {
                    until,
                    ..event(UntilOverrun, Maintenance, Maintenance, db)
                },
                "Maintenance on shop-1 overran its announced end (2026-11-24 10:00 UTC); it stays on until switched off",
            ),
            (
                Event {
                    until,
                    by: Some("alice".into()),
                    ..event(UntilChanged, Maintenance, Maintenance, db)
                },
                "Maintenance on shop-1 now expected to end by 2026-11-24 10:00 UTC — by alice",
            ),
            (
                // Rounded up to the minute, as the pages show it.
                Event {
                    until: Some(time("2026-11-24T10:41:30Z")),
                    ..event(ModeChanged, Maintenance, Normal, db)
                },
                "Maintenance started on shop-1: Database upgrade (until 2026-11-24 10:42 UTC)",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(sentence(&e), want, "{e:?}");
            let v: serde_json::Value = serde_json::from_slice(&body(Format::Slack, &e)).unwrap();
            assert_eq!(v, serde_json::json!({ "text": want }));
        }
    }

    #[test]
    fn slack_text_cannot_ping_or_link() {
        let e = event(
            EventKind::MessageUpdated,
            Mode::Maintenance,
            Mode::Maintenance,
            Some("<!channel> R&D <http://x|y>"),
        );
        let v: serde_json::Value = serde_json::from_slice(&body(Format::Slack, &e)).unwrap();
        assert_eq!(
            v["text"],
            "Message updated on shop-1: &lt;!channel&gt; R&amp;D &lt;http://x|y&gt;"
        );
    }

    #[test]
    fn signature_matches_rfc_4231_test_case_2() {
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn logs_never_show_the_path() {
        let url: Uri = "https://hooks.slack.com/services/T0/B0/XXXX?token=y"
            .parse()
            .unwrap();
        assert_eq!(shown(&url), "https://hooks.slack.com/…");
    }

    #[test]
    fn dropped_warnings_are_rate_limited_and_summed() {
        let mut log = DropLog::default();
        let t0 = Instant::now();
        let secs = |n| t0 + Duration::from_secs(n);
        assert_eq!(log.dropped(t0), Report::Warn(1), "the first drop at once");
        assert_eq!(
            log.dropped(secs(1)),
            Report::SummaryAt(t0 + WARN_EVERY),
            "the rest of the burst waits for a summary"
        );
        for n in 2..=42 {
            assert_eq!(log.dropped(secs(n % 9)), Report::Nothing, "scheduled once");
        }
        assert_eq!(
            log.summary(t0 + WARN_EVERY),
            Report::Warn(42),
            "the whole rest"
        );
        assert_eq!(log.summary(t0 + WARN_EVERY), Report::Nothing, "told once");
        // A drop within `WARN_EVERY` of the summary waits for the next one.
        assert_eq!(
            log.dropped(secs(11)),
            Report::SummaryAt(t0 + WARN_EVERY * 2)
        );
        // A timer that runs early waits again; the window is what matters.
        assert_eq!(
            log.summary(secs(15)),
            Report::SummaryAt(t0 + WARN_EVERY * 2)
        );
        assert_eq!(log.summary(secs(20)), Report::Warn(1));
        // After a quiet window, the next burst starts with a warning at once.
        assert_eq!(log.dropped(secs(100)), Report::Warn(1));
    }

    /// A `MakeWriter` that keeps what the subscriber writes.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The audit's case: a receiver that hangs, a burst that overflows its queue, then
    /// nothing at all. Every drop must reach the log by itself, within `WARN_EVERY`, naming
    /// the target without its path.
    #[tokio::test(start_paused = true)]
    async fn every_dropped_event_is_logged_without_a_later_event() {
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        // The test's runtime is single-threaded: the workers and timers log on this thread.
        crate::logging::capture_ready();
        let _logging = tracing::subscriber::set_default(subscriber);
        let receiver = Receiver::start(Answer::Hang).await;
        let stats = Arc::new(Counts::default());
        let target = Target {
            // No delivery ends while the test watches: only a timer can tell the rest.
            timeout: Duration::from_secs(3600),
            ..receiver.target(None)
        };
        let notifier = Notifier::start_with_capacity(vec![target], stats.clone(), FAST, 4);
        notifier.send(numbered(0));
        wait_until("event 0 in flight", || receiver.count() == 1).await;
        for n in 1..=50 {
            notifier.send(numbered(n));
        }
        assert_eq!(stats.get(), (0, 0, 46), "50 sent, 4 queued");
        tokio::time::sleep(WARN_EVERY + Duration::from_secs(1)).await;
        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|v| v["fields"]["dropped"].is_u64())
            .collect();
        let counts: Vec<u64> = warnings
            .iter()
            .map(|v| v["fields"]["dropped"].as_u64().unwrap())
            .collect();
        assert_eq!(
            counts,
            [1, 45],
            "the first at once, the rest summed: {text}"
        );
        let authority = receiver.url.authority().unwrap();
        for w in &warnings {
            assert_eq!(w["level"], "WARN");
            assert_eq!(w["fields"]["webhook"], format!("http://{authority}/…"));
            let message = w["fields"]["message"].as_str().unwrap();
            assert!(message.contains("oldest"), "{message}");
        }
        assert!(
            warnings[1]["fields"]["message"]
                .as_str()
                .unwrap()
                .contains("dropped the 45 oldest"),
            "{text}"
        );
        assert!(!text.contains("secret-path"), "{text}");
        assert_eq!(stats.get(), (0, 0, 46));
    }

    #[tokio::test]
    async fn delivers_in_order_with_headers_and_signature() {
        let receiver = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let notifier =
            Notifier::start_with(vec![receiver.target(Some("s3cret"))], stats.clone(), FAST);
        for n in 0..5 {
            notifier.send(numbered(n));
        }
        wait_until("5 deliveries", || stats.get().0 == 5).await;
        assert_eq!(receiver.messages(), strings(&["0", "1", "2", "3", "4"]));
        for r in receiver.got.lock().unwrap().iter() {
            assert_eq!(r.headers["content-type"], "application/json");
            assert_eq!(r.headers["user-agent"], AGENT);
            assert!(AGENT.starts_with("intermission/"));
            // What a receiver does: recompute the HMAC over the raw body, compare in constant time.
            let header = r.headers[SIGNATURE_HEADER].to_str().unwrap();
            assert_eq!(header, signature("s3cret", &r.body));
            let hex = header.strip_prefix("sha256=").unwrap();
            let tag: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
            assert!(ring::hmac::verify(&key, &r.body, &tag).is_ok());
            // The timed one: the time of sending, and the HMAC of "<t>." and the body.
            let timed = r.headers[TIMED_SIGNATURE_HEADER].to_str().unwrap();
            let (t, mac) = timed
                .strip_prefix("t=")
                .and_then(|rest| rest.split_once(",sha256="))
                .unwrap();
            let sent: u64 = t.parse().unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            assert!(now.abs_diff(sent) <= 5, "{timed}");
            let mut signed = format!("{t}.").into_bytes();
            signed.extend_from_slice(&r.body);
            let want = signature("s3cret", &signed);
            assert_eq!(Some(mac), want.strip_prefix("sha256="), "{timed}");
        }
        assert_eq!(stats.get(), (5, 0, 0));
        assert_eq!(notifier.pending(), 0);
    }

    #[tokio::test]
    async fn no_secret_no_signature_and_slack_format() {
        let receiver = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let target = Target {
            format: Format::Slack,
            ..receiver.target(None)
        };
        let notifier = Notifier::start_with(vec![target], stats.clone(), FAST);
        notifier.send(event(
            EventKind::ModeChanged,
            Mode::Outage,
            Mode::Normal,
            None,
        ));
        wait_until("a delivery", || stats.get().0 == 1).await;
        let got = receiver.got.lock().unwrap();
        assert!(got[0].headers.get(SIGNATURE_HEADER).is_none());
        assert!(got[0].headers.get(TIMED_SIGNATURE_HEADER).is_none());
        let v: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"text": "Outage on shop-1: no upstream server is healthy"})
        );
    }

    #[tokio::test]
    async fn retries_after_server_errors() {
        let receiver = Receiver::start(Answer::FailFirst(2)).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        notifier.send(numbered(7));
        wait_until("the delivery", || stats.get().0 == 1).await;
        assert_eq!(
            receiver.messages(),
            strings(&["7", "7", "7"]),
            "two 500s, then 204"
        );
        assert_eq!(stats.get(), (1, 0, 0));
        assert_eq!(notifier.pending(), 0);
    }

    /// A redirect is not followed: it would send the body, signed, wherever `Location` says,
    /// another host included. It fails the try as a 500 does, and the tries after it go to
    /// the configured URL alone.
    #[tokio::test]
    async fn a_redirect_is_not_followed_and_fails_the_try() {
        let elsewhere = Receiver::start(Answer::Ok).await;
        let moved = Receiver::start(Answer::Moved(elsewhere.url.clone())).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![moved.target(None)], stats.clone(), FAST);
        notifier.send(numbered(1));
        wait_until("given up", || notifier.pending() == 0).await;
        assert_eq!(moved.count(), ATTEMPTS as usize);
        assert_eq!(elsewhere.count(), 0, "the redirect was followed");
        assert_eq!(stats.get(), (0, 1, 0));
    }

    #[tokio::test]
    async fn gives_up_after_eight_attempts_and_goes_on() {
        let receiver = Receiver::start(Answer::FailFirst(8)).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        notifier.send(numbered(1));
        notifier.send(numbered(2));
        wait_until("both events settled", || notifier.pending() == 0).await;
        let mut expected = vec!["1"; 8];
        expected.push("2");
        assert_eq!(receiver.messages(), strings(&expected));
        assert_eq!(stats.get(), (1, 1, 0));
    }

    /// A receiver down for longer than a second or two (restarting) still gets the event:
    /// three tries within 1.5 s lost it for good. The backoff doubles from its first step.
    #[tokio::test]
    async fn a_receiver_back_after_a_few_failures_gets_the_event() {
        let receiver = Receiver::start(Answer::FailFirst(6)).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        let started = std::time::Instant::now();
        notifier.send(numbered(1));
        wait_until("delivered", || stats.get().0 == 1).await;
        assert_eq!(receiver.count(), 7);
        // 10 + 20 + 40 + 80 + 160 + 320 ms between the tries.
        assert!(started.elapsed() >= Duration::from_millis(630));
    }

    /// A receiver that answers 429 with `Retry-After` is tried again when it asked, not at
    /// the backoff's first step.
    #[tokio::test]
    async fn a_receivers_retry_after_is_followed() {
        let receiver = Receiver::start(Answer::Limited).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        let started = std::time::Instant::now();
        notifier.send(numbered(1));
        wait_until("delivered", || stats.get().0 == 1).await;
        assert_eq!(receiver.count(), 2);
        assert!(
            started.elapsed() >= Duration::from_millis(990),
            "tried again after {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn retry_after_is_read_from_a_429_or_503_only() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("120"));
        let too_many = http::StatusCode::TOO_MANY_REQUESTS;
        assert_eq!(retry_after(too_many, &h), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after(http::StatusCode::SERVICE_UNAVAILABLE, &h),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(http::StatusCode::INTERNAL_SERVER_ERROR, &h),
            None
        );
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(&later).unwrap(),
        );
        let got = retry_after(too_many, &h).unwrap();
        assert!(
            got > Duration::from_secs(25) && got <= Duration::from_secs(30),
            "{got:?}"
        );
        assert_eq!(got.subsec_nanos(), 0, "whole seconds, as the date: {got:?}");
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(too_many, &h), None);
    }

    #[tokio::test]
    async fn an_unreachable_or_slow_receiver_fails_within_its_timeout() {
        // A port nothing listens on, and a receiver that never answers.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused: Uri = format!("http://{}/", closed.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(closed);
        let hanging = Receiver::start(Answer::Hang).await;
        let stats = Arc::new(Counts::default());
        let short = Duration::from_millis(100);
        let targets = vec![
            Target {
                timeout: short,
                ..hanging.target(None)
            },
            Target {
                url: refused,
                timeout: short,
                ..hanging.target(None)
            },
        ];
        let started = std::time::Instant::now();
        let notifier = Notifier::start_with(targets, stats.clone(), FAST);
        notifier.send(numbered(1));
        wait_until("both given up", || stats.get().1 == 2).await;
        assert_eq!(hanging.count(), 8, "eight attempts");
        // 8 timeouts of 100 ms and 10 + 20 + … + 600 ms of backoff.
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(notifier.pending(), 0);
    }

    /// A link-local address of this machine, with its interface's name and index, read from
    /// `/proc/net/if_inet6` (address, index, prefix, scope, flags, name; scope 0x20 is link).
    fn link_local() -> Option<(std::net::Ipv6Addr, String, u32)> {
        let table = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
        table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [hex, index, _, "20", _, name] = fields[..] else {
                return None;
            };
            let address = std::net::Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
            Some((
                address,
                name.to_owned(),
                u32::from_str_radix(index, 16).ok()?,
            ))
        })
    }

    /// A webhook written with an IPv6 zone, as a URL writes it (`%25eth0`), is delivered to:
    /// `check` passed it, and every try failed as a name that does not resolve.
    #[tokio::test]
    async fn a_webhook_with_an_ipv6_zone_is_delivered_to() {
        let Some((address, interface, index)) = link_local() else {
            eprintln!("SKIPPED: no link-local IPv6 address here");
            return;
        };
        let bound = std::net::SocketAddrV6::new(address, 0, 0, index);
        let Ok(listener) = TcpListener::bind(bound).await else {
            eprintln!("SKIPPED: cannot listen on {address}%{interface}");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let written = format!("http://[{address}%25{interface}]:{port}/hooks/secret-path");
        let config = crate::config::Config::parse(
            &format!("[[notify]]\nurl = \"{written}\"\ntimeout = \"5s\"\n"),
            std::path::Path::new("."),
            None,
        )
        .unwrap();
        let rx = Receiver::start_on(listener, written.parse().unwrap(), Answer::Ok);
        let counts = Arc::new(Counts::default());
        let n = Notifier::start_with(config.notify, counts.clone(), Duration::from_millis(10));
        n.send(event(
            EventKind::ModeChanged,
            Mode::Outage,
            Mode::Normal,
            Some("zoned"),
        ));
        wait_until("the delivery", || counts.get() != (0, 0, 0)).await;
        assert_eq!(counts.get(), (1, 0, 0), "delivered, failed, dropped");
        assert_eq!(rx.messages(), strings(&["zoned"]));
    }

    #[tokio::test]
    async fn https_targets_speak_tls() {
        // A plain-HTTP receiver behind an https:// URL: the handshake fails, nothing is
        // delivered, and the worker gives up without a panic.
        let receiver = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let authority = receiver.url.authority().unwrap().clone();
        let target = Target {
            url: format!("https://{authority}/hook").parse().unwrap(),
            timeout: Duration::from_secs(2),
            ..receiver.target(None)
        };
        let notifier = Notifier::start_with(vec![target], stats.clone(), FAST);
        notifier.send(numbered(1));
        wait_until("given up", || stats.get().1 == 1).await;
        assert_eq!(receiver.count(), 0);
        assert!(matches!(notifier.shared.deliverer.https.get(), Some(Ok(_))));
    }

    #[tokio::test]
    async fn a_hanging_receiver_does_not_delay_another() {
        let hanging = Receiver::start(Answer::Hang).await;
        let fine = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(
            vec![hanging.target(None), fine.target(None)],
            stats.clone(),
            FAST,
        );
        let started = std::time::Instant::now();
        for n in 0..3 {
            notifier.send(numbered(n));
        }
        // The hanging receiver holds each try for its 10 s timeout: waiting on it would show
        // in seconds, where a loaded machine's scheduling shows in milliseconds.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "send never waits"
        );
        wait_until("the healthy receiver has all three", || fine.count() == 3).await;
        // The two deliver side by side: on a loaded machine the healthy one can be done before
        // the hanging one has even been sent the first event, and a receiver counts a request
        // before the notifier has its answer (and counts it delivered).
        wait_until("the hanging receiver has the first", || {
            hanging.count() >= 1
        })
        .await;
        wait_until("the healthy receiver's three counted delivered", || {
            notifier.pending() == 3
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(9));
        assert_eq!(fine.messages(), strings(&["0", "1", "2"]));
        assert_eq!(hanging.count(), 1, "still on the first event");
        assert_eq!(notifier.pending(), 3, "the hanging receiver's three");
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest() {
        let gate = Arc::new(Semaphore::new(0));
        let receiver = Receiver::start(Answer::Gate(gate.clone())).await;
        let stats = Arc::new(Counts::default());
        let notifier =
            Notifier::start_with_capacity(vec![receiver.target(None)], stats.clone(), FAST, 2);
        notifier.send(numbered(0));
        wait_until("event 0 in flight", || receiver.count() == 1).await;
        for n in 1..=4 {
            notifier.send(numbered(n));
        }
        // 1 and 2 made room for 3 and 4.
        assert_eq!(stats.get(), (0, 0, 2));
        assert_eq!(notifier.pending(), 3, "one in flight, two queued");
        gate.add_permits(10);
        wait_until("the rest delivered", || notifier.pending() == 0).await;
        assert_eq!(receiver.messages(), strings(&["0", "3", "4"]));
        assert_eq!(stats.get(), (3, 0, 2));
    }

    #[tokio::test]
    async fn reload_keeps_the_queue_of_a_kept_target() {
        let gate = Arc::new(Semaphore::new(0));
        let kept = Receiver::start(Answer::Gate(gate.clone())).await;
        let added = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![kept.target(None)], stats.clone(), FAST);
        notifier.send(numbered(0));
        wait_until("event 0 in flight", || kept.count() == 1).await;
        notifier.send(numbered(1));
        notifier.send(numbered(2));
        // Same receiver with a new timeout, and a new one.
        let retimed = Target {
            timeout: Duration::from_secs(20),
            ..kept.target(None)
        };
        notifier.set_targets(vec![retimed, added.target(None)]);
        assert_eq!(notifier.pending(), 3, "nothing lost, nothing copied");
        assert_eq!(lock(&notifier.shared.queues).len(), 2);
        gate.add_permits(10);
        wait_until("the kept queue delivered", || notifier.pending() == 0).await;
        assert_eq!(kept.messages(), strings(&["0", "1", "2"]));
        assert_eq!(added.count(), 0, "a new target starts empty");
        notifier.send(numbered(3));
        // Counted once the answer is back, after the receiver counted the request.
        wait_until("both got event 3", || {
            kept.count() == 4 && added.count() == 1 && stats.get().0 == 5
        })
        .await;
        assert_eq!(stats.get(), (5, 0, 0));
    }

    /// A receiver that wants a token (Opsgenie's `Authorization: GenieKey …`, a Basic
    /// password) gets it with every event; a reload that rotates it sends the events still
    /// queued with the new one, which is the one the receiver still takes.
    #[tokio::test]
    async fn a_targets_headers_go_with_every_event_and_a_reload_rotates_them() {
        let gate = Arc::new(Semaphore::new(0));
        let receiver = Receiver::start(Answer::Gate(gate.clone())).await;
        let stats = Arc::new(Counts::default());
        let with = |token: &'static str| Target {
            headers: http::HeaderMap::from_iter([
                (http::header::AUTHORIZATION, HeaderValue::from_static(token)),
                (USER_AGENT, HeaderValue::from_static("theirs/1")),
            ]),
            ..receiver.target(None)
        };
        let notifier = Notifier::start_with(vec![with("Bearer old")], stats.clone(), FAST);
        notifier.send(numbered(0));
        wait_until("event 0 in flight", || receiver.count() == 1).await;
        notifier.send(numbered(1));
        notifier.set_targets(vec![with("Bearer new")]);
        gate.add_permits(10);
        wait_until("both delivered", || notifier.pending() == 0).await;
        assert_eq!(receiver.messages(), strings(&["0", "1"]));
        let got = receiver.got.lock().unwrap();
        let header = |i: usize, name: http::header::HeaderName| {
            got[i]
                .headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            header(0, http::header::AUTHORIZATION).as_deref(),
            Some("Bearer old")
        );
        assert_eq!(
            header(1, http::header::AUTHORIZATION).as_deref(),
            Some("Bearer new")
        );
        assert_eq!(header(1, USER_AGENT).as_deref(), Some("theirs/1"));
        assert_eq!(header(1, CONTENT_TYPE).as_deref(), Some("application/json"));
        assert_eq!(stats.get(), (2, 0, 0));
    }

    /// The usual rotation: the old token is revoked, the first try fails, the operator puts
    /// the new one in and reloads while the event waits for its next try: that try carries
    /// the new token, not the revoked one until the event is given up.
    #[tokio::test]
    async fn an_event_waiting_to_be_tried_again_goes_with_the_rotated_token() {
        let receiver = Receiver::start(Answer::Limited).await;
        let stats = Arc::new(Counts::default());
        let with = |token: &'static str| Target {
            headers: http::HeaderMap::from_iter([(
                http::header::AUTHORIZATION,
                HeaderValue::from_static(token),
            )]),
            ..receiver.target(None)
        };
        let notifier = Notifier::start_with(vec![with("Bearer old")], stats.clone(), FAST);
        notifier.send(numbered(0));
        // Answered 429 with `Retry-After: 1`: the worker waits a second before its next try.
        wait_until("the first try", || receiver.count() == 1).await;
        notifier.set_targets(vec![with("Bearer new")]);
        wait_until("delivered", || notifier.pending() == 0).await;
        let got = receiver.got.lock().unwrap();
        let tokens: Vec<&str> = got
            .iter()
            .map(|r| r.headers[http::header::AUTHORIZATION].to_str().unwrap())
            .collect();
        assert_eq!(tokens, ["Bearer old", "Bearer new"]);
        drop(got);
        assert_eq!(stats.get(), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_removed_target_ends_with_the_try_under_way_and_drops_its_queue() {
        let gate = Arc::new(Semaphore::new(0));
        let receiver = Receiver::start(Answer::Gate(gate.clone())).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        notifier.send(numbered(0));
        wait_until("event 0 in flight", || receiver.count() == 1).await;
        notifier.send(numbered(1));
        // A new secret makes it another target: the old queue is removed.
        notifier.set_targets(vec![receiver.target(Some("new"))]);
        assert_eq!(stats.get(), (0, 0, 1), "event 1 dropped with its queue");
        notifier.send(numbered(2));
        assert_eq!(
            notifier.pending(),
            2,
            "0 in flight, 2 queued for the new target"
        );
        gate.add_permits(10);
        wait_until("all delivered", || notifier.pending() == 0).await;
        let got = receiver.got.lock().unwrap();
        let signed: Vec<bool> = got
            .iter()
            .map(|r| r.headers.contains_key(SIGNATURE_HEADER))
            .collect();
        // The old worker finished 0 unsigned; the new one sent 2 signed.
        assert_eq!(signed, [false, true]);
        drop(got);
        assert_eq!(receiver.messages(), strings(&["0", "2"]));
        assert_eq!(stats.get(), (2, 0, 1));
    }

    /// A receiver removed while its worker waits to try an event again (a `Retry-After` of
    /// up to a minute) is not sent it again once the wait is over.
    #[tokio::test]
    async fn a_target_removed_between_two_tries_is_not_tried_again() {
        let receiver = Receiver::start(Answer::Limited).await;
        let other = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        notifier.send(numbered(1));
        // Answered 429 with `Retry-After: 1`: the worker waits a second.
        wait_until("the first try", || receiver.count() == 1).await;
        notifier.set_targets(vec![other.target(None)]);
        wait_until("the removed worker gone", || notifier.pending() == 0).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(receiver.count(), 1, "tried again after its removal");
        assert_eq!(stats.get(), (0, 1, 0));
    }

    /// A removed receiver that fails is not tried again: removing and adding it back, reload
    /// after reload, leaves one worker sending to it, not one more per reload.
    #[tokio::test]
    async fn a_removed_target_that_fails_is_not_tried_again() {
        let receiver = Receiver::start(Answer::Hang).await;
        let other = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let hanging = Target {
            timeout: Duration::from_millis(200),
            ..receiver.target(None)
        };
        let notifier = Notifier::start_with(vec![hanging.clone()], stats.clone(), FAST);
        for round in 0..5 {
            notifier.send(numbered(round));
            notifier.send(numbered(100 + round));
            wait_until("a try", || receiver.count() > round).await;
            notifier.set_targets(vec![other.target(None)]);
            wait_until("the removed worker gone", || notifier.pending() == 0).await;
            notifier.set_targets(vec![hanging.clone()]);
        }
        // One try of each first event (its retries cut short), none of the second.
        assert_eq!(receiver.count(), 5);
        assert_eq!(stats.get(), (0, 5, 5));
    }

    /// A reload that removes a webhook removes its series; what it had not delivered (its
    /// queue, and the try under way, which then fails) is counted apart rather than lost
    /// with them. A webhook whose index another takes is removed alike.
    #[tokio::test]
    async fn a_removed_webhooks_undelivered_events_are_counted_apart() {
        let hanging = Receiver::start(Answer::Hang).await;
        let other = Receiver::start(Answer::Ok).await;
        for (id, replaced_by) in [
            ("going", vec![]),
            ("0", vec![called("0", other.target(None))]),
        ] {
            let stats = Arc::new(Counts::default());
            let target = Target {
                timeout: Duration::from_millis(200),
                ..called(id, hanging.target(None))
            };
            let tried = hanging.count();
            let notifier = Notifier::start_with(vec![target], stats.clone(), FAST);
            for n in 0..3 {
                notifier.send(numbered(n));
            }
            wait_until("the first try", || hanging.count() == tried + 1).await;
            notifier.set_targets(replaced_by);
            assert_eq!(stats.removed.load(Ordering::SeqCst), 2, "{id}: the queued");
            wait_until("the removed worker gone", || notifier.pending() == 0).await;
            assert_eq!(
                stats.removed.load(Ordering::SeqCst),
                3,
                "{id}: the one under way"
            );
            assert_eq!(stats.get(), (0, 0, 0), "{id}: nothing under its id");
            assert!(
                stats
                    .shown()
                    .iter()
                    .all(|(_, counts)| *counts == (0, 0, 0, 0)),
                "{id}: {:?}",
                stats.shown()
            );
        }
    }

    /// `target` under another id.
    fn called(id: &str, target: Target) -> Target {
        Target {
            id: id.to_owned(),
            ..target
        }
    }

    /// Two webhooks, one answering and one failing every try, are counted apart: an operator
    /// can tell which one fails.
    #[tokio::test]
    async fn each_webhook_is_counted_under_its_own_id() {
        let fine = Receiver::start(Answer::Ok).await;
        let down = Receiver::start(Answer::FailFirst(usize::MAX)).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(
            vec![
                called("alerts", fine.target(None)),
                called("status", down.target(None)),
            ],
            stats.clone(),
            FAST,
        );
        assert_eq!(
            stats.shown(),
            [
                ("alerts".to_owned(), (0, 0, 0, 0)),
                ("status".to_owned(), (0, 0, 0, 0))
            ],
            "both shown from the start"
        );
        notifier.send(numbered(1));
        notifier.send(numbered(2));
        wait_until("both settled", || notifier.pending() == 0).await;
        assert_eq!(
            stats.shown(),
            [
                ("alerts".to_owned(), (2, 0, 0, 0)),
                ("status".to_owned(), (0, 2, 0, 0))
            ]
        );
    }

    /// The queue length counts every event a webhook holds, the one being tried included,
    /// and is back to zero once they are delivered.
    #[tokio::test]
    async fn the_queue_length_is_what_a_webhook_holds() {
        let gate = Arc::new(Semaphore::new(0));
        let slow = Receiver::start(Answer::Gate(gate.clone())).await;
        let fine = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(
            vec![
                called("slow", slow.target(None)),
                called("fine", fine.target(None)),
            ],
            stats.clone(),
            FAST,
        );
        for n in 0..3 {
            notifier.send(numbered(n));
        }
        wait_until("the first in flight", || slow.count() == 1).await;
        wait_until("the other delivered", || fine.count() == 3).await;
        wait_until("the other's queue empty", || {
            stats.waiting("fine") == Some(0)
        })
        .await;
        assert_eq!(stats.waiting("slow"), Some(3), "{:?}", stats.shown());
        gate.add_permits(1);
        wait_until("the first delivered", || stats.waiting("slow") == Some(2)).await;
        gate.add_permits(10);
        wait_until("all delivered", || notifier.pending() == 0).await;
        assert_eq!(stats.waiting("slow"), Some(0));
        assert_eq!(stats.shown()[1], ("slow".to_owned(), (3, 0, 0, 0)));
    }

    /// A reload that removes a webhook forgets its series, even when its worker reports the
    /// try it was finishing later; the webhook it keeps keeps its counts and its queue.
    #[tokio::test]
    async fn a_reload_forgets_a_removed_webhook_and_keeps_the_others_counts() {
        let gate = Arc::new(Semaphore::new(0));
        let going = Receiver::start(Answer::Gate(gate.clone())).await;
        let kept = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let kept_target = called("kept", kept.target(None));
        let notifier = Notifier::start_with(
            vec![called("going", going.target(None)), kept_target.clone()],
            stats.clone(),
            FAST,
        );
        notifier.send(numbered(0));
        notifier.send(numbered(1));
        wait_until("going's first in flight", || going.count() == 1).await;
        wait_until("kept's delivered", || kept.count() == 2).await;
        // Counted once each answer is back, after the receiver counted the request.
        wait_until("kept's counted", || stats.get().0 == 2).await;
        notifier.set_targets(vec![kept_target]);
        assert_eq!(stats.shown(), [("kept".to_owned(), (2, 0, 0, 0))]);
        // The removed worker's try ends now, and must not bring its series back.
        gate.add_permits(10);
        wait_until("the removed worker done", || notifier.pending() == 0).await;
        assert_eq!(going.count(), 1);
        notifier.send(numbered(2));
        wait_until("kept's third", || kept.count() == 3).await;
        wait_until("counted", || stats.get().0 >= 3).await;
        assert_eq!(stats.shown(), [("kept".to_owned(), (3, 0, 0, 0))]);
    }

    /// An index is a label only while it names the same receiver: a reload that removes the
    /// first of two unnamed webhooks makes the second "0", which starts from zero rather than
    /// showing the removed one's counts as its own. A name keeps its counts when its URL
    /// changes.
    #[tokio::test]
    async fn an_index_given_to_another_webhook_starts_again_and_a_name_keeps_its_counts() {
        let a = Receiver::start(Answer::Ok).await;
        let b = Receiver::start(Answer::Ok).await;
        let c = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(
            vec![
                called("0", a.target(None)),
                called("1", b.target(None)),
                called("pager", c.target(None)),
            ],
            stats.clone(),
            FAST,
        );
        notifier.send(numbered(0));
        wait_until("delivered", || stats.get().0 == 3).await;
        // `a` removed: `b` is "0" now; `pager` moves to `a`'s URL.
        notifier.set_targets(vec![
            called("0", b.target(None)),
            called("pager", a.target(None)),
        ]);
        assert_eq!(
            stats.shown(),
            [
                ("0".to_owned(), (0, 0, 0, 0)),
                ("pager".to_owned(), (1, 0, 0, 0))
            ]
        );
        notifier.send(numbered(1));
        wait_until("delivered", || stats.get().0 == 5).await;
        assert_eq!(
            stats.shown(),
            [
                ("0".to_owned(), (1, 0, 0, 0)),
                ("pager".to_owned(), (2, 0, 0, 0))
            ]
        );
        assert_eq!((a.count(), b.count(), c.count()), (2, 2, 1));
    }

    /// A name moved to another URL keeps its counts, the removed receiver's last try
    /// included, but its queue length is the new receiver's alone.
    #[tokio::test]
    async fn a_name_moved_to_another_url_shows_the_new_queue_alone() {
        let (gate_a, gate_b) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
        let a = Receiver::start(Answer::Gate(gate_a.clone())).await;
        let b = Receiver::start(Answer::Gate(gate_b.clone())).await;
        let stats = Arc::new(Counts::default());
        let notifier =
            Notifier::start_with(vec![called("pager", a.target(None))], stats.clone(), FAST);
        notifier.send(numbered(0));
        notifier.send(numbered(1));
        wait_until("a's first in flight", || a.count() == 1).await;
        assert_eq!(stats.waiting("pager"), Some(2));
        notifier.set_targets(vec![called("pager", b.target(None))]);
        assert_eq!(stats.shown(), [("pager".to_owned(), (0, 0, 1, 0))]);
        notifier.send(numbered(2));
        wait_until("b's first in flight", || b.count() == 1).await;
        assert_eq!(stats.waiting("pager"), Some(1));
        // The removed worker's try ends: counted, but it holds nothing of the new queue's.
        gate_a.add_permits(1);
        wait_until("a's try counted", || stats.get().0 == 1).await;
        assert_eq!(stats.shown(), [("pager".to_owned(), (1, 0, 1, 1))]);
        gate_b.add_permits(1);
        wait_until("all delivered", || notifier.pending() == 0).await;
        assert_eq!(stats.shown(), [("pager".to_owned(), (2, 0, 1, 0))]);
    }

    /// The JSON lines a test's subscriber wrote, and a guard that keeps it in place.
    fn kept_logs() -> (Kept, tracing::subscriber::DefaultGuard) {
        crate::logging::capture_ready();
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        (kept, tracing::subscriber::set_default(subscriber))
    }

    fn lines(kept: &Kept) -> Vec<serde_json::Value> {
        String::from_utf8(kept.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// A stop lets a slow receiver have what is queued for it, in order: the return to
    /// normal behind the start of maintenance was thrown away at SIGTERM.
    #[tokio::test]
    async fn a_stop_delivers_what_is_queued_to_a_slow_receiver() {
        let receiver = Receiver::start(Answer::Slow(Duration::from_millis(300))).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        for n in 0..3 {
            notifier.send(numbered(n));
        }
        let started = Instant::now();
        notifier.finish(started + Duration::from_secs(5)).await;
        assert!(started.elapsed() >= Duration::from_millis(850));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(receiver.messages(), strings(&["0", "1", "2"]));
        assert_eq!(stats.get(), (3, 0, 0));
        assert_eq!(notifier.pending(), 0);
    }

    /// A receiver that fails at first is tried again within the stop's time.
    #[tokio::test]
    async fn a_stop_retries_within_its_time() {
        let receiver = Receiver::start(Answer::FailFirst(2)).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        notifier.send(numbered(1));
        notifier
            .finish(Instant::now() + Duration::from_secs(5))
            .await;
        assert_eq!(receiver.messages(), strings(&["1", "1", "1"]));
        assert_eq!(stats.get(), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_stop_with_nothing_queued_returns_at_once() {
        let receiver = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        let started = Instant::now();
        notifier.finish(started + Duration::from_secs(10)).await;
        // Not the 10 s it may wait, with room for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// A receiver that hangs holds the stop until its bound, no longer; the event under way
    /// and those queued are counted as dropped and told in one line for the target, by kind,
    /// without its path. A receiver that answers is not held back by it.
    #[tokio::test]
    async fn a_stop_gives_up_at_its_bound_counted_and_logged() {
        let (kept, _logging) = kept_logs();
        let hanging = Receiver::start(Answer::Hang).await;
        let fine = Receiver::start(Answer::Ok).await;
        let stats = Arc::new(Counts::default());
        let target = Target {
            timeout: Duration::from_secs(3600),
            ..hanging.target(None)
        };
        let notifier = Notifier::start_with(vec![target, fine.target(None)], stats.clone(), FAST);
        let kinds = [
            (EventKind::ModeChanged, Mode::Maintenance, Mode::Normal),
            (
                EventKind::MessageUpdated,
                Mode::Maintenance,
                Mode::Maintenance,
            ),
            (EventKind::ModeChanged, Mode::Normal, Mode::Maintenance),
        ];
        for (kind, mode, previous) in kinds {
            notifier.send(event(kind, mode, previous, None));
        }
        wait_until("the first in flight", || hanging.count() == 1).await;
        let started = Instant::now();
        notifier.finish(started + Duration::from_millis(300)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(fine.count(), 3);
        assert_eq!(stats.get(), (3, 0, 3));
        assert_eq!(notifier.pending(), 0);
        // Nothing more is sent to it once given up.
        assert_eq!(hanging.count(), 1);
        let logged = lines(&kept);
        let lost: Vec<&serde_json::Value> = logged
            .iter()
            .filter(|v| {
                v["fields"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("not delivered")
            })
            .collect();
        assert_eq!(lost.len(), 1, "{logged:#?}");
        let authority = hanging.url.authority().unwrap();
        assert_eq!(lost[0]["level"], "WARN");
        assert_eq!(
            lost[0]["fields"]["webhook"],
            format!("http://{authority}/…")
        );
        assert_eq!(lost[0]["fields"]["dropped"], 3);
        assert_eq!(lost[0]["fields"]["webhook_id"], "hook");
        assert_eq!(
            lost[0]["fields"]["events"],
            "2 mode_changed, 1 message_updated"
        );
        assert!(!format!("{logged:?}").contains("secret-path"));
    }

    /// A stop cut short (a second signal: no time at all) still counts and logs what the
    /// workers hold, a removed target's try under way included.
    #[tokio::test]
    async fn a_stop_without_time_counts_what_is_held() {
        let hanging = Receiver::start(Answer::Hang).await;
        let other = Receiver::start(Answer::Hang).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![hanging.target(None)], stats.clone(), FAST);
        notifier.send(numbered(0));
        wait_until("the first in flight", || hanging.count() == 1).await;
        // Removed by a reload: its try under way is the last, and still pending.
        notifier.set_targets(vec![other.target(None)]);
        notifier.send(numbered(1));
        notifier.send(numbered(2));
        wait_until("the other's first in flight", || other.count() == 1).await;
        assert_eq!(notifier.pending(), 3);
        notifier.finish(Instant::now()).await;
        assert_eq!(notifier.pending(), 0);
        assert_eq!(stats.get(), (0, 0, 3));
        // An event after the stop (a second signal leaves the controller running) is counted.
        notifier.send(numbered(3));
        assert_eq!(stats.get(), (0, 0, 4));
        assert_eq!(notifier.pending(), 0);
    }

    /// A failure is warned of at its first try, not only after the last one a minute later;
    /// the tries after it are quiet until the event is delivered (said at info) or given up.
    #[tokio::test]
    async fn the_first_failure_is_warned_of_at_once_then_its_end() {
        let (kept, _logging) = kept_logs();
        let receiver = Receiver::start(Answer::FailFirst(2)).await;
        let stats = Arc::new(Counts::default());
        let notifier = Notifier::start_with(vec![receiver.target(None)], stats.clone(), FAST);
        notifier.send(numbered(1));
        wait_until("the first try", || receiver.count() >= 1).await;
        wait_until("the warning", || !lines(&kept).is_empty()).await;
        let first = lines(&kept);
        assert_eq!(first.len(), 1, "{first:#?}");
        assert_eq!(first[0]["level"], "WARN");
        let message = first[0]["fields"]["message"].as_str().unwrap();
        assert!(
            message.contains("500") && message.contains("trying again in 10ms"),
            "{message}"
        );
        let authority = receiver.url.authority().unwrap();
        assert_eq!(
            first[0]["fields"]["webhook"],
            format!("http://{authority}/…")
        );
        // The label of its metrics, so that a failing series leads to its lines.
        assert_eq!(first[0]["fields"]["webhook_id"], "hook");
        wait_until("delivered", || stats.get().0 == 1).await;
        let all = lines(&kept);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert_eq!(all[1]["level"], "INFO");
        assert_eq!(
            all[1]["fields"]["message"],
            "webhook delivered after 3 tries"
        );

        // Given up: the first failure and the end, nothing between.
        let failing = Receiver::start(Answer::FailFirst(8)).await;
        notifier.set_targets(vec![failing.target(None)]);
        notifier.send(numbered(2));
        wait_until("given up", || stats.get().1 == 1).await;
        let all = lines(&kept);
        let levels: Vec<&str> = all[2..]
            .iter()
            .map(|v| v["level"].as_str().unwrap())
            .collect();
        assert_eq!(levels, ["WARN", "WARN"], "{all:#?}");
        assert!(all[3]["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("giving up"));
        assert_eq!(all[3]["fields"]["webhook_id"], "hook");
        assert!(!format!("{all:?}").contains("secret-path"));
    }
}
