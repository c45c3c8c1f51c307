//! One checker task per upstream server: active checks on an interval, passive reports from
//! the request path, and a message to the controller only when health flips.

use super::counter::Counter;
use super::probe::{CheckError, Prober};
use crate::config::{HealthConfig, HealthKind, Upstream};
use crate::control::protocol::ServerHealth;
use crate::listener::Lasting;
use crate::time::Timestamp;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use std::time::SystemTime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A server's health changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    /// Which set of checkers sent it; a reload starts a new generation and old flips are ignored.
    pub generation: u64,
    pub index: usize,
    pub healthy: bool,
    pub reason: String,
    /// Whether the health changed. A server's first result is told even when it only
    /// confirms the health the server was counted with until then (`false`): the controller
    /// must not take that assumed health for a fact (`Controller::settle`).
    pub changed: bool,
}

/// Where the request path reports a failed forward (connect error, reset, timeout) and
/// counts it in the server's metrics. The reports are bounded: under a burst, those beyond
/// the queue are dropped, as the checker has plenty to go on; the counts are not.
pub struct Passive {
    reports: mpsc::Sender<Report>,
    counts: crate::metrics::UpstreamCounters,
    /// When each of the lines a failed forward to this server is logged with was last
    /// written (`forward::said`). Locked only on a failure, by whichever worker thread met it;
    /// made anew with the checkers, so a reload that changes the servers starts it afresh.
    told: Mutex<[Lasting; crate::forward::LINES]>,
}

impl Passive {
    /// Counts a failed request, and tells the checker when `report` says so (`None`: a
    /// failure that is not news to it, or not the server's own doing).
    pub fn failed(&self, reason: crate::metrics::UpstreamFailure, report: Option<Report>) {
        self.counts.failed(reason);
        if let Some(report) = report {
            // Never waits: a full queue means the checker already has plenty to go on.
            let _ = self.reports.try_send(report);
        }
    }

    /// A request that failed on this server was sent again to another.
    pub fn retried(&self) {
        self.counts.retried();
    }

    /// Whether `line` is to be written for this server now, with how many were not since
    /// the last that was (`Lasting`).
    pub(crate) fn tell(&self, line: crate::forward::Line) -> Option<u64> {
        let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
        told[line as usize].tell(std::time::Instant::now())
    }
}

/// `n` servers' passive reports, apart from any checker, with the queues they go to.
#[cfg(test)]
pub fn passive_for_tests(n: usize) -> (Arc<[Passive]>, Vec<mpsc::Receiver<Report>>) {
    let metrics = crate::metrics::Metrics::new();
    let (passive, queues): (Vec<_>, Vec<_>) = (0..n)
        .map(|i| {
            let (tx, rx) = mpsc::channel(PASSIVE_QUEUE);
            let counts = metrics.upstream(&format!("server-{i}"));
            (
                Passive {
                    reports: tx,
                    counts,
                    told: Mutex::default(),
                },
                rx,
            )
        })
        .unzip();
    (passive.into(), queues)
}

#[cfg(test)]
impl Passive {
    /// The failed connects counted.
    pub fn failures(&self) -> u64 {
        self.counts.connect_failures()
    }
}

/// A failed forward, as the request path tells the server's checker.
pub struct Report {
    pub why: String,
    /// The failure may not mean the server is down: no connection within `connect_timeout`,
    /// no head within `response_timeout`, or a failure after the server took the connection
    /// (closed or reset unanswered, a malformed, oversized or unasked answer). Under a burst
    /// of new connections a live server's accept queue overflows and connects wait, one slow
    /// page reaches `response_timeout`, one page may crash its worker; counted, each would
    /// take out a server that answers everything else, and with it the whole site. So it
    /// counts only when the checks are `kind = "tcp"`, which cannot see an application that
    /// fails; otherwise it brings the next check forward (`Task::run`), which asks a path of
    /// its own and decides. A refused connection always counts.
    pub inconclusive: bool,
}

const PASSIVE_QUEUE: usize = 16;

/// What is known of every server, for `ctl health`. Locked only by the checkers and the
/// control plane, never by requests.
pub struct HealthTable {
    servers: Vec<Mutex<ServerHealth>>,
}

impl HealthTable {
    pub fn list(&self) -> Vec<ServerHealth> {
        self.servers
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }
}

/// The running checkers of one generation; dropping them stops them.
pub struct Checkers {
    tasks: Vec<JoinHandle<()>>,
    pub passive: Arc<[Passive]>,
    pub table: Arc<HealthTable>,
}

impl Checkers {
    /// Stops every checker and waits until none runs. Aborting alone is not enough: a checker
    /// running on another thread finishes recording its probe first, and could bring back the
    /// metrics of a server that a reload has just forgotten, for ever.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// `stop`, keeping the table: what the checks last found is still read after.
    pub async fn halt(&mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Cancelled, or ended on its own: either way it runs no more.
            let _ = task.await;
        }
    }
}

impl Drop for Checkers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts one checker per server. The first checks run at once.
/// `start[i]`: the health server `i` starts with, if not "healthy until its first check", and
/// what was known of it before a reload, if it was in the list then, so that `ctl health`
/// keeps saying since when it has been healthy or down.
pub fn spawn(
    servers: &[Upstream],
    config: &HealthConfig,
    start: &[(Option<bool>, Option<ServerHealth>)],
    tls: &Arc<rustls::ClientConfig>,
    metrics: &Arc<crate::metrics::Metrics>,
    flips: mpsc::UnboundedSender<Flip>,
    generation: u64,
) -> Checkers {
    let table = Arc::new(HealthTable {
        servers: servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let healthy = start.get(i).and_then(|s| s.0);
                let fresh = ServerHealth {
                    server: s.to_string(),
                    healthy,
                    since: None,
                    last_check: None,
                    last_error: None,
                    last_error_at: None,
                    consecutive: 0,
                    last_latency_ms: None,
                    last_ok: None,
                    // Down from the start with nothing known of it: a reload added it while
                    // no server was healthy (`Controller::start_checkers`).
                    added_in_outage: healthy == Some(false),
                    passes_needed: None,
                };
                Mutex::new(match start.get(i).and_then(|s| s.1.clone()) {
                    Some(w) if w.healthy == healthy => ServerHealth { healthy, ..w },
                    _ => fresh,
                })
            })
            .collect(),
    });
    let mut passive = Vec::new();
    let mut tasks = Vec::new();
    for (index, server) in servers.iter().enumerate() {
        let (tx, rx) = mpsc::channel(PASSIVE_QUEUE);
        passive.push(Passive {
            reports: tx,
            counts: metrics.upstream(&server.to_string()),
            told: Mutex::default(),
        });
        let task = Task {
            index,
            generation,
            prober: Prober::new(server.clone(), config.clone(), tls),
            config: config.clone(),
            table: table.clone(),
            flips: flips.clone(),
            metrics: metrics.clone(),
            name: server.to_string(),
            // Kept across a reload, the count goes on where it was: `ctl health` says
            // "down since 09:11 (5 results in a row)", and a server two failures from being
            // taken out is still two failures from it.
            counter: match start.get(index) {
                Some((Some(healthy), Some(w))) if w.healthy == Some(*healthy) => {
                    Counter::resumed(*healthy, w.last_ok, w.consecutive)
                }
                Some((Some(healthy), _)) => Counter::known(*healthy),
                _ => Counter::new(),
            },
        };
        // What `rise` (perhaps changed by the reload) leaves to pass, for `ctl health`.
        if let Some(mut entry) = task.entry() {
            entry.passes_needed = task.counter.passes_needed(config.rise);
        }
        tasks.push(tokio::spawn(task.run(rx)));
    }
    Checkers {
        tasks,
        passive: passive.into(),
        table,
    }
}

struct Task {
    index: usize,
    generation: u64,
    prober: Prober,
    config: HealthConfig,
    table: Arc<HealthTable>,
    flips: mpsc::UnboundedSender<Flip>,
    counter: Counter,
    metrics: Arc<crate::metrics::Metrics>,
    name: String,
}

impl Task {
    async fn run(mut self, mut passive: mpsc::Receiver<Report>) {
        let mut pace = self.pace();
        // When the next check is due, kept here rather than in a `tokio::time::Interval`,
        // whose next tick cannot be read: a failed request may only ever bring it forward
        // (`sooner`). The first check runs at once.
        let mut due = Instant::now();
        let next = tokio::time::sleep_until(due);
        tokio::pin!(next);
        // When the last check began: a failed request not counted brings the next one forward
        // to `health.timeout` after it (at once when that has passed), so that a flood of them
        // costs a check per timeout, and one that came just after a check is not forgotten.
        let mut checked = Instant::now();
        loop {
            let (result, active) = tokio::select! {
                () = next.as_mut() => {
                    checked = Instant::now();
                    let result = self.prober.check().await;
                    // A slow check must not be followed by a burst of catch-up checks.
                    due = next_beat(due, pace, Instant::now());
                    next.as_mut().reset(due);
                    match result {
                        Ok(latency) => (Ok(latency), true),
                        Err(CheckError::Server(why)) => (Err(why), true),
                        Err(CheckError::Local(why)) => {
                            self.not_run(why);
                            continue;
                        }
                    }
                }
                report = passive.recv() => match report {
                    Some(Report { why, inconclusive }) if !inconclusive || self.config.kind == HealthKind::Tcp => {
                        (Err(format!("request failed: {why}")), false)
                    }
                    Some(Report { why, .. }) => {
                        self.not_counted(why);
                        // A server that takes connections and fails every request fails its
                        // check too: found in a few checks, not `fall` intervals.
                        let sooner = sooner(due, checked, self.config.timeout, Instant::now());
                        if sooner != due {
                            due = sooner;
                            next.as_mut().reset(due);
                        }
                        continue;
                    }
                    None => return,
                },
            };
            self.record(result, active);
            // Taken out, the server is checked every `down_interval` until it is back, as
            // HAProxy's `downinter` does: an application restarting for a second was answered
            // as an outage for `rise × interval` after it was back (3 to 4 s by default).
            if self.pace() != pace {
                pace = self.pace();
                due = Instant::now() + pace;
                next.as_mut().reset(due);
            }
        }
    }

    /// How often the server is checked now: every `down_interval` while it is taken out.
    fn pace(&self) -> std::time::Duration {
        if self.counter.decided() && !self.counter.healthy() {
            self.config.down_interval
        } else {
            self.config.interval
        }
    }

    /// A check the proxy could not make (out of file descriptors or memory):
    /// shown as the last error, and counted neither way, since it says nothing of the server.
    fn not_run(&mut self, why: String) {
        tracing::warn!(server = %self.name, "health check not made, not counted: {why}");
        if let Some(mut entry) = self.entry() {
            let now = Timestamp(SystemTime::now());
            entry.last_check = Some(now);
            entry.last_error = Some(format!("check not made: {why}"));
            entry.last_error_at = Some(now);
            entry.last_latency_ms = None;
        }
    }

    /// A failed request that says too little of the server to count: shown as the last
    /// error, so that an operator sees why clients got the outage answer.
    fn not_counted(&mut self, why: String) {
        if let Some(mut entry) = self.entry() {
            entry.last_error = Some(format!("request failed, not counted: {why}"));
            entry.last_error_at = Some(Timestamp(SystemTime::now()));
        }
    }

    /// This server's line in `ctl health`.
    fn entry(&self) -> Option<MutexGuard<'_, ServerHealth>> {
        let entry = self.table.servers.get(self.index)?;
        Some(entry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn record(&mut self, result: Result<std::time::Duration, String>, active: bool) {
        let ok = result.is_ok();
        if active {
            let latency = result.as_ref().map_or(self.config.timeout, |d| *d);
            self.metrics.health_check(&self.name, ok, latency);
        }
        let (rise, fall) = (self.config.rise, self.config.fall);
        let was_decided = self.counter.decided();
        // What the request path reports is always a failure.
        let flipped = if active {
            self.counter.record(ok, rise, fall)
        } else {
            self.counter.record_failed_request(rise, fall)
        };
        let now = SystemTime::now();
        {
            let Some(mut entry) = self.entry() else {
                return;
            };
            if active {
                entry.last_check = Some(Timestamp(now));
            }
            match &result {
                Ok(latency) => entry.last_latency_ms = Some(latency.as_secs_f64() * 1000.0),
                Err(why) => {
                    entry.last_error = Some(why.clone());
                    entry.last_error_at = Some(Timestamp(now));
                }
            }
            // The latency shown beside the last check is that check's: a failed one has none
            // worth showing (a timeout's is the timeout), and an older success's would mislead.
            if active && !ok {
                entry.last_latency_ms = None;
            }
            entry.consecutive = self.counter.run();
            entry.last_ok = Some(ok);
            entry.passes_needed = self.counter.passes_needed(rise);
            // A failed request before the first check has decided nothing: `ctl health`
            // still says "not checked yet", not healthy since that failure.
            if self.counter.decided() {
                if entry.healthy.is_none() || flipped.is_some() {
                    entry.since = Some(Timestamp(now));
                }
                entry.healthy = Some(self.counter.healthy());
                entry.added_in_outage &= !self.counter.healthy();
            }
        }
        let first = !was_decided && self.counter.decided();
        if flipped.is_some() || first {
            let reason = match result {
                Ok(_) => format!("{} consecutive checks passed", self.counter.run()),
                Err(why) => why,
            };
            let _ = self.flips.send(Flip {
                generation: self.generation,
                index: self.index,
                healthy: self.counter.healthy(),
                reason,
                changed: flipped.is_some(),
            });
        }
    }
}

/// The check after one that was due at `due`, checked every `pace`, once it is done at `now`:
/// `pace` later, or, when a slow check has made that pass, the first beat after `now` (the
/// beats missed are skipped, as tokio's `MissedTickBehavior::Skip` skips them).
fn next_beat(due: Instant, pace: Duration, now: Instant) -> Instant {
    let next = due + pace;
    if next > now || pace.is_zero() {
        return next.max(now);
    }
    let behind = now.duration_since(due).as_nanos();
    let beats = behind / pace.as_nanos() + 1;
    let ahead = pace.as_nanos() * beats - behind;
    now + Duration::from_nanos(u64::try_from(ahead).unwrap_or(u64::MAX))
}

/// When the next check is due after a failed request that is not counted, at `now`: at
/// `timeout` after the last check began (`checked`), or at once when that has passed, but
/// never later than it was due already. While a server is down its checks come every
/// `health.down_interval` (500 ms by default), sooner than a `timeout` (1 s) after the last:
/// such a request (under `force-open`, `allow_ips` or a bypass) put the next check off, and
/// halved how soon a server back from a restart was found.
fn sooner(due: Instant, checked: Instant, timeout: Duration, now: Instant) -> Instant {
    due.min((checked + timeout).max(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// A failed request not counted brings the next check forward, never puts it off: with
    /// a server down, checked every 500 ms (`down_interval`), a `timeout` of 1 s moved the
    /// next check from 500 ms after the last to 1 s after it.
    #[test]
    fn a_failed_request_only_ever_brings_the_next_check_forward() {
        let checked = Instant::now();
        // Down: due 500 ms after the last check; the timeout is 1 s.
        let due = checked + MS(500);
        for after in [0, 100, 499, 500, 900, 1500] {
            let at = sooner(due, checked, MS(1000), checked + MS(after));
            assert!(
                at <= due,
                "{after} ms after the check: put off by {:?}",
                at - due
            );
        }
        // Up: due 2 s after the last check; the timeout brings it to 1 s after it.
        let due = checked + MS(2000);
        assert_eq!(
            sooner(due, checked, MS(1000), checked + MS(10)),
            checked + MS(1000)
        );
        // The timeout has passed since the last check: at once.
        let now = checked + MS(1200);
        assert_eq!(sooner(due, checked, MS(1000), now), now);
    }

    #[test]
    fn a_slow_check_skips_the_beats_it_missed() {
        let due = Instant::now();
        // Done in time: one pace after the last was due.
        assert_eq!(next_beat(due, MS(500), due + MS(20)), due + MS(500));
        // A check of 1.2 s on a 500 ms pace: the next beat after it, at 1.5 s, not three at once.
        assert_eq!(next_beat(due, MS(500), due + MS(1200)), due + MS(1500));
        // Done right on a beat: the next one.
        assert_eq!(next_beat(due, MS(500), due + MS(1000)), due + MS(1500));
    }
}
