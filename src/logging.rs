//! Log setup and the access log. Logs are text or JSON lines on stderr; the access log is its
//! own target so that it can be on while other logs are quiet. Its lines, one per answered
//! request, are formatted here by hand in the shape `tracing`'s formatter gives every other
//! line: that formatter spent some 12,000 instructions on each (field visitors, styled names
//! even with colours off), more than forwarding the request itself.

use crate::config::{LogConfig, LogFormat};
use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing_subscriber::EnvFilter;

/// How access lines are written, decided once by `init`: through `tracing` until then (for
/// a test's own subscriber), and for a person at a terminal, whose lines keep their colours.
static ACCESS: AtomicU8 = AtomicU8::new(THROUGH_TRACING);
const THROUGH_TRACING: u8 = 0;
const OFF: u8 = 1;
const TEXT: u8 = 2;
const JSON: u8 = 3;

const TARGET: &str = "intermission::access";

/// 10000-01-01T00:00:00Z, in seconds since the epoch.
const YEAR_10000: u64 = 253_402_300_800;

/// An error and its causes on one line ("client error (Connect): tcp connect error: …"), for
/// errors whose own text leaves out the cause that says what happened (hyper's, hyper-util's).
/// A certificate refused is said in words where rustls gives a variant's name
/// (`tls::refusal_in_words`).
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let said = |link: &(dyn std::error::Error + 'static)| {
        crate::tls::refusal_in_words(link).unwrap_or_else(|| link.to_string())
    };
    let mut text = said(e);
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&said(c));
        cause = c.source();
    }
    text
}

/// The filter `log` asks for. Two libraries warn of what a client did wrong, and any client
/// could fill the log with those warnings: rustls once per connection (an IP address sent as
/// SNI, which wrk and some health checkers send), and h2 once per HTTP/2 connection it closes
/// for abuse (a rapid reset: "remotely-reset pending-accept streams reached limit") and once
/// per frame for a PING acknowledgement the proxy never asked for, which one connection sent
/// at some 500,000 lines (76 MB) a second. So only their errors are written, unless the level
/// is `debug` or `trace`, or names the library itself; a failed handshake, and a connection
/// h2 closed, are logged at `debug` by the listener.
fn directives(log: &LogConfig) -> String {
    let mut directives = clamped(&log.level);
    // Whatever `access_log` says at start: a reload can turn it on, and each request asks
    // the config in force whether to write its line.
    directives.push_str(",intermission::access=info");
    directives
}

/// `level` as tracing should read it: each directive trimmed, the empty ones dropped. tracing
/// splits a filter at its commas but trims nothing, and took `" info"` (a space after a comma,
/// a value padded in a unit file or a YAML manifest) for a target of that name, to be logged
/// alone: `check` passed `level = " info "`, and the proxy then wrote the access log and not
/// one other line, no warning, no outage, no refused reload.
pub(crate) fn normalised(level: &str) -> String {
    let directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    directives.join(",")
}

/// `level` with rustls's and h2's warnings kept to their errors, unless it asks for them
/// (see `directives`).
fn clamped(level: &str) -> String {
    let level = &normalised(level);
    let mut directives = level.to_owned();
    let verbose = level.split(',').any(|d| {
        let d = d.trim();
        d.eq_ignore_ascii_case("debug") || d.eq_ignore_ascii_case("trace")
    });
    // Nothing to bound where the default is `off` or `error` already: `rustls=error` added to
    // `off` (`RUST_LOG=off`) let the libraries' errors through where nothing was asked for.
    let quiet = level
        .split(',')
        .map(str::trim)
        .rfind(|d| !d.contains('='))
        .is_some_and(|d| d.eq_ignore_ascii_case("off") || d.eq_ignore_ascii_case("error"));
    for library in ["rustls", "h2"] {
        if !verbose && !quiet && !names(level, library) {
            directives.push(',');
            directives.push_str(library);
            directives.push_str("=error");
        }
    }
    directives
}

/// The filter in force: `RUST_LOG` (`env`), when set and valid, else `log.level`. `RUST_LOG`
/// is held to the same bounds on the libraries' warnings as `log.level`: read as it was
/// written, `RUST_LOG=info` (a common line in a unit file or an image) let any client write a
/// line per PING acknowledgement frame it sent, some 76 MB a second. It does not turn the
/// access log on: `RUST_LOG=warn` turns it off, as it turns off every target's `info`. Nor is
/// it read unless it is what `log.level` may be (`rust_log_ignored`): a mistyped
/// `RUST_LOG=warnn` was a filter that logged that one (non-existent) target, and the proxy
/// wrote nothing at all, its access log included.
/// Nor is one that gives the proxy's own lines no level (`RUST_LOG=hyper=debug`, or
/// `intermission[conn]=debug`, a span's alone) read alone (`over_level`).
fn chosen(log: &LogConfig, env: Option<&str>) -> EnvFilter {
    env.filter(|env| !rust_log_ignored(env))
        .and_then(|env| {
            let read = if crate::config::sets_own_level(env) {
                clamped(env)
            } else {
                over_level(log, env)
            };
            EnvFilter::try_new(read).ok()
        })
        .or_else(|| EnvFilter::try_new(directives(log)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
}

/// `RUST_LOG` (`env`) that names no level for the proxy's own lines, read on top of
/// `log.level`: its directives in place of the level's for the same targets, the level's
/// others kept. Read alone, as it was, it silenced the start, every warning and the outages,
/// as a `log.level` of targets alone did before `check` refused it: tracing gives a target
/// no directive names no level. An error would not do: a variable left in a unit file or an
/// image, which the operator may not know of, would keep the proxy from starting over its
/// log. Who wants those targets alone says so with a level first: `off,hyper=debug`.
fn over_level(log: &LogConfig, env: &str) -> String {
    let target = |d: &str| d.split_once('=').map(|(t, _)| t.trim().to_owned());
    let env = normalised(env);
    let named: Vec<String> = env.split(',').filter_map(target).collect();
    let level = normalised(&log.level);
    let kept = level
        .split(',')
        .filter(|d| target(d).is_none_or(|t| !named.contains(&t)));
    let merged: Vec<&str> = kept.chain(env.split(',')).collect();
    let mut directives = clamped(&merged.join(","));
    // As `log.level` alone would (`directives`), unless `RUST_LOG` says otherwise.
    if !named.iter().any(|t| t == TARGET) {
        directives.push_str(",intermission::access=info");
    }
    directives
}

/// Whether `RUST_LOG` set to `env` is not read, `log.level` being read in its place: it is not
/// a level or a filter of levels, as `log.level` must be (`config::level_or_filter`).
fn rust_log_ignored(env: &str) -> bool {
    !crate::config::level_or_filter(env)
}

/// Whether a directive of `level` is for `library` or one of its modules (`h2=warn`,
/// `h2::proto=debug`), not merely a target whose name contains it (`hyper::proto::h2`).
fn names(level: &str, library: &str) -> bool {
    level.split(',').any(|d| {
        let target = d.trim().split(['=', '[']).next().unwrap_or_default();
        target == library
            || target
                .strip_prefix(library)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// The lines waiting for the writer thread, at most this many bytes (some 16,000 access
/// lines); beyond, lines are dropped and counted, rather than the proxy waiting for room.
const QUEUED: usize = 4 << 20;

/// Every line dropped for want of room in the queue, since the start: `/metrics`'
/// `intermission_log_lines_dropped_total`, since the warning that says so is itself a line
/// that reaches nobody while stderr is blocked.
pub static DROPPED: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);

/// How long the end of the process waits for the lines still queued to be written.
const FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// Every line, written to stderr by a thread of its own. A write to stderr blocks when what
/// reads it does not (a pipe nobody reads, a stalled journald or container log driver, a
/// full disk behind a FIFO): made by the thread serving requests, as it was, it froze every
/// connection of that worker, `/healthz` included, once the pipe's 64 KiB were full.
struct Queue {
    pending: Mutex<Pending>,
    /// The writer waits here for lines.
    arrived: Condvar,
    /// `flush` waits here for the writer to have written all it was given.
    written: Condvar,
}

struct Pending {
    lines: Vec<u8>,
    /// Lines dropped for want of room since the writer last said so.
    dropped: u64,
    /// Whether the writer is writing lines it took (`flush` waits for those too).
    writing: bool,
    /// Whether there is a writer thread: until `init` starts one (or if it cannot), lines
    /// are written by whoever logs, as before.
    started: bool,
}

static QUEUE: Queue = Queue {
    pending: Mutex::new(Pending {
        lines: Vec::new(),
        dropped: 0,
        writing: false,
        started: false,
    }),
    arrived: Condvar::new(),
    written: Condvar::new(),
};

/// The queue, whatever a panic that held it left: poisoned, every line after would have been
/// lost, and not counted.
fn pending() -> std::sync::MutexGuard<'static, Pending> {
    QUEUE
        .pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Queues `line` (whole lines, as one), or with no writer thread writes it.
fn push(line: &[u8]) {
    let mut pending = pending();
    if !pending.started {
        drop(pending);
        let _ = std::io::stderr().lock().write_all(line);
        return;
    }
    if pending.lines.len() + line.len() > QUEUED {
        pending.dropped += 1;
        DROPPED.inc();
        return;
    }
    // The writer waits only with nothing queued: a line added to others needs no wake-up.
    let was_empty = pending.lines.is_empty();
    pending.lines.extend_from_slice(line);
    drop(pending);
    if was_empty {
        QUEUE.arrived.notify_one();
    }
}

/// The writer thread: writes what is queued, as it comes, in one `write` a batch, and once
/// stderr takes lines again says how many were dropped while it did not.
fn write_queued() {
    let mut taken = Vec::new();
    let mut stderr = Stderr::default();
    loop {
        let mut pending = pending();
        pending.writing = false;
        while pending.lines.is_empty() && pending.dropped == 0 {
            QUEUE.written.notify_all();
            pending = QUEUE
                .arrived
                .wait(pending)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        std::mem::swap(&mut pending.lines, &mut taken);
        let dropped = std::mem::take(&mut pending.dropped);
        pending.writing = true;
        drop(pending);
        if dropped > 0 {
            // Queued behind what is being written now, so said after the lines before the gap.
            tracing::warn!(
                dropped,
                "{dropped} log lines dropped: stderr did not take them as fast as they came \
                 (what reads the proxy's stderr is blocked or too slow); requests were served \
                 meanwhile"
            );
        }
        let lost = write_out(&mut std::io::stderr().lock(), &taken, &mut stderr);
        if let Some((lost, why)) = lost {
            tracing::warn!(
                lost,
                "{lost} log lines lost: writing them to stderr failed ({why}); \
                 intermission_log_lines_dropped_total counts them"
            );
        }
        taken.clear();
        // A burst's buffer is not kept for good.
        taken.shrink_to(64 << 10);
    }
}

/// What the writer knows of stderr from one batch to the next.
#[derive(Default)]
struct Stderr {
    /// A write failed in the middle of a line (a file on a disk that filled up: a part of the
    /// batch, then `ENOSPC`), whose start is out: the next line would be glued to it, two
    /// entries in one (in JSON, a line that parses as neither), at the moment space came back.
    torn: bool,
    /// Lines lost to failed writes since one last went through, and why the last failed.
    lost: u64,
    why: String,
}

/// Writes `lines` to `out` (stderr) whole. A stderr left non-blocking by whoever started the
/// process (`O_NONBLOCK`, inherited: some supervisors and Node.js parents) refuses a write it
/// has no room for, where `write_all` would give up the whole batch uncounted: it is tried
/// again until it takes it. Lines a failed stderr never takes are counted as dropped; once it
/// takes lines again, how many were lost, and why, to be said in the log, which had a gap
/// that nothing in it explained.
fn write_out(out: &mut impl Write, lines: &[u8], stderr: &mut Stderr) -> Option<(u64, String)> {
    // The torn line is ended first, so that the next begins a line of its own.
    let mended;
    let was_torn = stderr.torn;
    let lines = match was_torn {
        true => {
            mended = [&b"\n"[..], lines].concat();
            &mended[..]
        }
        false => lines,
    };
    let mut rest = lines;
    let mut failed = None;
    while !rest.is_empty() {
        match out.write(rest) {
            Ok(0) => {
                failed = Some("it took nothing".to_owned());
                break;
            }
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    let written = lines.len() - rest.len();
    if let Some(last) = written.checked_sub(1).and_then(|i| lines.get(i)) {
        stderr.torn = *last != b'\n';
    }
    // The line end written first ends no line of this batch.
    let mending = usize::from(was_torn && written == 0);
    let lost = rest
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        .saturating_sub(mending);
    let lost = u64::try_from(lost).unwrap_or(u64::MAX);
    DROPPED.inc_by(lost);
    match failed {
        Some(why) => {
            stderr.lost = stderr.lost.saturating_add(lost);
            stderr.why = why;
            None
        }
        None if written > 0 && stderr.lost > 0 => Some((
            std::mem::take(&mut stderr.lost),
            std::mem::take(&mut stderr.why),
        )),
        None => None,
    }
}

/// Says why the proxy stops (`what`, an error), last, and waits (a little) for it to be
/// written: `eprintln!` would wait for stderr's lock, which a writer blocked on a stderr nobody
/// reads holds, and the process would never exit. Once the log is set up it is a line of the
/// log's own, an `ERROR` in its format: written as plain text ("intermission: …"), it was the
/// one line of a JSON log that was not JSON, the reason the proxy died, which a pipeline that
/// parses each line dropped. Before (a config that does not load), or with errors filtered
/// out, it is plain text, which a person starting the proxy by hand reads.
pub fn last_words(what: &str) {
    if pending().started && tracing::enabled!(target: "intermission", tracing::Level::ERROR) {
        tracing::error!(target: "intermission", "{what}");
    } else {
        push(format!("intermission: {what}\n").as_bytes());
    }
    flush(FLUSH_LIMIT);
}

/// Kept by `main` while the proxy runs: dropped, it waits (a little) for the lines still
/// queued to be written, the last ones said at the stop among them.
#[must_use = "dropped, the log lines still queued are written at once"]
pub struct Flush(());

impl Drop for Flush {
    fn drop(&mut self) {
        flush(FLUSH_LIMIT);
    }
}

/// Waits, for at most `limit`, until every line queued has been written.
fn flush(limit: Duration) {
    let _ = QUEUE.written.wait_timeout_while(pending(), limit, |p| {
        p.started && (p.writing || !p.lines.is_empty() || p.dropped > 0)
    });
}

/// What `tracing` writes with: each line (an event, which it writes whole, in one call) into
/// the queue, as `escaped` leaves it for a log in `format`; as it is when `None`, for a
/// terminal, whose colours are escape sequences.
#[derive(Clone, Copy)]
struct Queued(Option<LogFormat>);

impl Write for Queued {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0 {
            Some(format) => push(&escaped(format, buf)),
            None => push(buf),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the writer thread, unless one runs already.
fn start_writer() {
    let mut pending = pending();
    if pending.started {
        return;
    }
    pending.started = std::thread::Builder::new()
        .name("log".into())
        .spawn(write_queued)
        .is_ok();
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`, and can turn
/// the access log off as it could any other target. Lines are written by a thread of their
/// own (`Queue`), which the returned guard lets finish.
pub fn init(log: &LogConfig) -> Flush {
    // Set to nothing (`Environment=RUST_LOG=`), it is not set.
    let env = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|env| !env.trim().is_empty());
    let filter = chosen(log, env.as_deref());
    // Colours only for a person at a terminal, never into a log file or journal.
    let ansi = std::io::stderr().is_terminal();
    let queued = Queued((!ansi).then_some(log.format));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(move || queued);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    let access = if installed.is_err() || ansi {
        THROUGH_TRACING
    } else if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        OFF
    } else if let LogFormat::Json = log.format {
        JSON
    } else {
        TEXT
    };
    ACCESS.store(access, Relaxed);
    if installed.is_ok() {
        start_writer();
        let standard = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if tracing::enabled!(target: PANIC, tracing::Level::ERROR) {
                panicked(info);
            } else {
                standard(info);
            }
        }));
    }
    if let Some(env) = env.as_deref().filter(|env| rust_log_ignored(env)) {
        // Said, since the operator who set it expects its levels.
        tracing::warn!(
            "RUST_LOG={env:?} is not a level (error, warn, info, debug, trace) nor a filter \
             that gives each target its level (\"info,hyper=debug\"): it is ignored, and \
             log.level {:?} is read",
            log.level
        );
    } else if let Some(env) = env.as_deref().filter(|e| !crate::config::sets_own_level(e)) {
        // Said, since its levels are not all that is written.
        tracing::warn!(
            "RUST_LOG={env:?} gives intermission's own lines no level (it names other \
             targets, or spans, alone), which would silence its start, its warnings and its \
             outages: it is read on top of log.level {:?}; for those targets alone, write a \
             level first (RUST_LOG=\"off,{}\")",
            log.level,
            normalised(env)
        );
    }
    Flush(())
}

const PANIC: &str = "intermission::panic";

/// A panic (a bug), said as a line of the log, through the queue. The standard hook wrote it to
/// stderr itself, in lines of text: in a JSON log the one entry that was not an object (over
/// several lines, its message's own among them), and with a stderr that takes nothing, the
/// queue's reason, a write that blocked the thread that panicked, and with it a worker and
/// every connection it serves, until something read it.
fn panicked(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("Box<dyn Any>");
    let thread = std::thread::current();
    let at = info.location().map(ToString::to_string);
    // As the standard hook, only when RUST_BACKTRACE asks for one.
    let trace = std::backtrace::Backtrace::capture();
    let trace =
        (trace.status() == std::backtrace::BacktraceStatus::Captured).then(|| trace.to_string());
    // The payload and the trace as fields, quoted on one line in the text log.
    tracing::error!(
        target: PANIC,
        thread = thread.name().unwrap_or("<unnamed>"),
        at = at.as_deref(),
        panic = what,
        backtrace = trace.as_deref(),
        "a thread panicked (a bug: please report it with this line)"
    );
}

/// Called by every test that installs a scoped subscriber (`set_default`, `with_default`) to
/// look at what is logged: installs, once, a global subscriber that takes every event and
/// keeps none. tracing caches one interest per call site for the whole process, and while a
/// single dispatcher is registered it asks the thread that first reaches the call site: a
/// sibling test's thread with no subscriber then cached `never`, and this test's warning was
/// lost (CI, twice in a day, tokio-rs/tracing#3611). With a global one, every thread asks a
/// subscriber that is interested.
#[cfg(test)]
pub(crate) fn capture_ready() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

/// One access log line. hyper's path (`gateway`) and the relay both write theirs through
/// `write`, so that the two cannot differ in their fields or formats.
pub struct AccessLine<'a> {
    /// The TCP peer: the line's `client`, unless `client` is set.
    pub peer: IpAddr,
    /// The client a trusted peer (`proxy.trusted_proxies`) named, by the rule `allow_ips`
    /// reads (`hold::bypass::client_ip`), when it is not the peer: written as `client`, with
    /// the peer after it as `peer`, so that the balancer that sent the request is still told.
    /// `None` leaves the line as it was before there was one.
    pub client: Option<IpAddr>,
    pub method: &'a dyn std::fmt::Display,
    pub path: &'a dyn std::fmt::Display,
    pub status: u16,
    /// The server that answered, or was tried last; `None` when there was none to try.
    pub upstream: Option<&'a str>,
    /// The response body's bytes as sent, so far when it was abandoned.
    pub bytes: u64,
    /// The answer broke off before its end, its server having failed or stalled mid-body
    /// (over HTTP/1.1 its connection was closed, over HTTP/2 its stream reset): written as
    /// `cut`, after `bytes`, on such lines only.
    pub cut: bool,
}

thread_local! {
    /// The line being written: one buffer per thread, kept, so that a line allocates nothing.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
}

/// `d` in milliseconds from whole microseconds: `as_secs_f64() * 1000.0` wrote float noise
/// into the line (`0.017591000000000002`, and `2.7e-5` in JSON), which log pipelines trip on.
fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

impl AccessLine<'_> {
    /// Writes the line, the request having started at `start`.
    pub fn write(&self, start: Instant) {
        let ms = millis(start.elapsed());
        let format = match ACCESS.load(Relaxed) {
            THROUGH_TRACING => return self.trace(ms),
            TEXT => LogFormat::Text,
            JSON => LogFormat::Json,
            _ => return,
        };
        let now = SystemTime::now();
        if !formattable(now) {
            return self.trace(ms);
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            self.render(format, ms, now, line);
            // Queued whole, as `tracing` queues its lines: lines from other threads and
            // other targets never interleave within one, and a stderr that takes nothing
            // never holds up the request (`Queue`).
            push(line);
        });
    }

    /// The line through `tracing`, as at a terminal; and what `benches/access.rs` compares the
    /// line written by hand with.
    pub fn trace(&self, ms: f64) {
        tracing::info!(
            target: TARGET,
            client = %self.client.unwrap_or(self.peer),
            // Recorded only when there is one: `tracing` writes nothing for a `None`.
            peer = self.client.map(|_| tracing::field::display(self.peer)),
            method = %self.method,
            path = %Clean(self.path),
            status = self.status,
            duration_ms = ms,
            upstream = self.upstream.unwrap_or("-"),
            bytes = self.bytes,
            // Recorded only on a line of an answer cut off.
            cut = self.cut.then_some(true),
        );
    }

    /// The line as `write` writes it in `format`, the request having taken `ms` and the clock
    /// reading `now` (which `humantime` must be able to write: see `write`).
    pub fn render(&self, format: LogFormat, ms: f64, now: SystemTime, out: &mut Vec<u8>) {
        match format {
            LogFormat::Text => self.text(ms, now, out),
            LogFormat::Json => self.json(ms, now, out),
        }
    }

    /// `tracing`'s text line, without colours: values as its visitor records them, a
    /// string's quoted as `Debug` quotes it.
    fn text(&self, ms: f64, now: SystemTime, out: &mut Vec<u8>) {
        // Writing into a `Vec` cannot fail.
        let (at, method) = (humantime::format_rfc3339_micros(now), self.method);
        let _ = match self.client {
            None => write!(
                out,
                "{at}  INFO {TARGET}: client={} method={method} path=",
                Peer(self.peer),
            ),
            Some(client) => write!(
                out,
                "{at}  INFO {TARGET}: client={} peer={} method={method} path=",
                Peer(client),
                Peer(self.peer),
            ),
        };
        let start = out.len();
        let _ = write!(out, "{}", self.path);
        clean(out, start);
        let _ = write!(
            out,
            " status={} duration_ms={ms:?} upstream={:?} bytes={}",
            self.status,
            self.upstream.unwrap_or("-"),
            self.bytes,
        );
        out.extend_from_slice(if self.cut { &b" cut=true\n"[..] } else { b"\n" });
    }

    /// `tracing`'s JSON line, flattened: its keys in its order, strings escaped and the
    /// duration written by `serde_json`, as its formatter does.
    fn json(&self, ms: f64, now: SystemTime, out: &mut Vec<u8>) {
        let at = humantime::format_rfc3339_micros(now);
        let _ = match self.client {
            None => write!(
                out,
                r#"{{"timestamp":"{at}","level":"INFO","client":"{}","method":"#,
                Peer(self.peer)
            ),
            Some(client) => write!(
                out,
                r#"{{"timestamp":"{at}","level":"INFO","client":"{}","peer":"{}","method":"#,
                Peer(client),
                Peer(self.peer)
            ),
        };
        json_str(out, self.method);
        out.extend_from_slice(br#","path":"#);
        json_str(out, self.path);
        let _ = write!(out, r#","status":{},"duration_ms":"#, self.status);
        let _ = serde_json::to_writer(&mut *out, &ms);
        out.extend_from_slice(br#","upstream":"#);
        let _ = serde_json::to_writer(&mut *out, self.upstream.unwrap_or("-"));
        let cut = if self.cut { r#","cut":true"# } else { "" };
        let _ = writeln!(out, r#","bytes":{}{cut},"target":"{TARGET}"}}"#, self.bytes);
    }
}

/// A peer's address as `IpAddr` writes it, an IPv4 one in a single piece: `Ipv4Addr`'s
/// `Display` formats each number through `fmt` (some 900 instructions a line).
struct Peer(IpAddr);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let IpAddr::V4(v4) = self.0 else {
            return self.0.fmt(f);
        };
        let mut text = [0u8; 15];
        let mut at = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                text[at] = b'.';
                at += 1;
            }
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(octet).as_bytes();
            text[at..at + digits.len()].copy_from_slice(digits);
            at += digits.len();
        }
        // Digits and dots only.
        f.write_str(std::str::from_utf8(&text[..at]).unwrap_or_default())
    }
}

/// Whether `humantime` can write `now`: the years 1970 to 9999 only (it panics before and
/// fails after). A clock that far off is left to `tracing`, which writes any.
fn formattable(now: SystemTime) -> bool {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() < YEAR_10000)
}

/// `value` as a JSON string. Request methods and paths need no escaping, but a path may: the
/// text goes through `serde_json` only then, whose escapes are those characters', after
/// `clean`'s.
fn json_str(out: &mut Vec<u8>, value: &dyn std::fmt::Display) {
    let start = out.len();
    let _ = write!(out, "{value}");
    clean(out, start);
    let inner = &out[start..];
    if inner.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        let text = String::from_utf8_lossy(inner).into_owned();
        out.truncate(start);
        let _ = serde_json::to_writer(&mut *out, &text);
    } else {
        out.insert(start, b'"');
        out.push(b'"');
    }
}

/// Whether `c` would be read as something other than text by what shows a log or splits it
/// into lines: a control character (C0, DEL, and C1, which xterm obeys: U+009B is a CSI, so
/// "\u{9b}2J" clears the screen of an operator's `tail -f`, U+0085 is a new line to it and to
/// Python's `splitlines`), a line or paragraph separator, or a mark that reverses the text
/// shown after it.
fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Escapes, as Rust writes them (`\u{9b}`), the characters of `out[start..]` that `unprintable`
/// finds. A path is written raw: hyper refuses C0 controls in it, but lets UTF-8 through, and
/// with it U+0085 or U+009B, with which a client could write a line of its own into a text
/// log, or send an operator's terminal commands. Plain ASCII, every line but a rare one, is
/// only read.
fn clean(out: &mut Vec<u8>, start: usize) {
    if out[start..].iter().all(|&b| (0x20..0x7f).contains(&b)) {
        return;
    }
    let text = String::from_utf8_lossy(&out[start..]).into_owned();
    if !text.chars().any(unprintable) {
        return;
    }
    out.truncate(start);
    for c in text.chars() {
        if unprintable(c) {
            let _ = write!(out, "{}", c.escape_unicode());
        } else {
            let mut utf8 = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
}

/// `line`, one line `tracing` wrote, with none of the characters `unprintable` finds but the
/// `\n` that ends it. The access line's path was escaped so, and nothing else: a message with
/// line ends of its own (a refused reload's list of problems, one a line) began lines that had
/// no time nor level, read as entries of their own by whatever splits the log into lines, and
/// an operator's reason or an upstream's error could carry a C1 control or a mark that
/// reverses the text to a terminal. As text escaped as the path is (`\u{9b}`), a line end and a
/// tab as `\n` and `\t`; in JSON, where `tracing` has escaped those already, the rest as JSON's
/// own `\u009b`, which keeps the object valid and its value the same.
fn escaped(format: LogFormat, line: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    use std::fmt::Write as _;
    let (body, end) = match line.strip_suffix(b"\n") {
        Some(body) => (body, "\n"),
        None => (line, ""),
    };
    if body.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        return Cow::Borrowed(line);
    }
    let text = String::from_utf8_lossy(body);
    if matches!(text, Cow::Borrowed(_)) && !text.chars().any(unprintable) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 32);
    for c in text.chars() {
        let _ = match (unprintable(c), format) {
            (false, _) => out.write_char(c),
            // Every character `unprintable` finds is in the Basic Multilingual Plane.
            (true, LogFormat::Json) => write!(out, "\\u{:04x}", u32::from(c)),
            (true, LogFormat::Text) => match c {
                '\n' => out.write_str("\\n"),
                '\t' => out.write_str("\\t"),
                c => write!(out, "{}", c.escape_unicode()),
            },
        };
    }
    out.push_str(end);
    Cow::Owned(out.into_bytes())
}

/// A path as `clean` writes it, for `tracing`'s formatter.
struct Clean<'a>(&'a dyn std::fmt::Display);

impl std::fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = Vec::new();
        let _ = write!(text, "{}", self.0);
        clean(&mut text, 0);
        f.write_str(&String::from_utf8_lossy(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::AccessLine;

    /// The duration is written as a plain decimal of whole microseconds, in both forms.
    #[test]
    fn durations_are_plain_decimals() {
        let ms = super::millis;
        assert_eq!(
            ms(std::time::Duration::from_nanos(17_591_400)).to_string(),
            "17.591"
        );
        assert_eq!(ms(std::time::Duration::from_nanos(27)).to_string(), "0");
        let json = serde_json::to_string(&ms(std::time::Duration::from_micros(27))).unwrap();
        assert_eq!(json, "0.027");
    }
    use std::io::Write;
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, SystemTime};

    /// What a subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a subscriber filtered as `init` filters for `level` writes of a client's mistakes
    /// reported by rustls and h2, and of a warning of ours.
    fn filtered(level: &str) -> String {
        filtered_with(level, None)
    }

    /// What `filtered` says, with `RUST_LOG` set to `env`; and an access line.
    fn filtered_with(level: &str, env: Option<&str>) -> String {
        let log = crate::config::LogConfig {
            format: crate::config::LogFormat::Text,
            access_log: false,
            level: level.to_owned(),
        };
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(super::chosen(&log, env))
            .with_writer(move || writer.clone())
            .finish();
        super::capture_ready();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::warn!(target: "h2::proto::ping_pong", "recv PING ack that we never sent");
            tracing::warn!(target: "intermission::health", "server down");
            tracing::info!(target: "intermission::access", "an access line");
            tracing::error!(target: "rustls::conn", "an error of rustls's");
        });
        let text = kept.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    /// `RUST_LOG` wins over `log.level`, but lets clients fill the log no more than it does.
    #[test]
    fn rust_log_keeps_the_warnings_a_client_causes_out_too() {
        for env in [
            "info",
            "warn",
            "intermission=info",
            "info,hyper::proto::h2=debug",
        ] {
            let out = filtered_with("debug", Some(env));
            assert!(out.contains("server down"), "{env}: {out}");
            assert!(!out.contains("Illegal SNI"), "{env}: {out}");
            assert!(!out.contains("PING ack"), "{env}: {out}");
        }
        for env in ["debug", "info,rustls=warn,h2=warn"] {
            let out = filtered_with("info", Some(env));
            assert!(
                out.contains("Illegal SNI") && out.contains("PING ack"),
                "{env}: {out}"
            );
        }
        // `off` is off for the libraries too; their errors pass under any other level.
        assert!(!filtered_with("info", Some("off")).contains("an error of rustls's"));
        assert!(filtered_with("info", Some("info")).contains("an error of rustls's"));
        assert!(filtered_with("info", None).contains("an error of rustls's"));
        // RUST_LOG turns the access log off as any other target, and on.
        assert!(!filtered_with("info", Some("warn")).contains("an access line"));
        assert!(filtered_with("warn", Some("info")).contains("an access line"));
        // Without it, or with one that is not a filter, `log.level` is read.
        for env in [None, Some("info,=[")] {
            let out = filtered_with("info", env);
            assert!(
                out.contains("an access line") && !out.contains("PING ack"),
                "{out}"
            );
        }
    }

    /// A `RUST_LOG` that names targets or spans alone, no level for the proxy's own lines,
    /// silenced its start, its warnings and its outages, as such a `log.level` (refused by
    /// `check`) did: it is read on top of `log.level`, its targets' directives in place of
    /// the level's. One with a level first is read as written.
    #[test]
    fn a_rust_log_of_other_targets_alone_silences_not_the_proxys_own_lines() {
        for env in [
            "hyper=debug",
            "intermission[conn]=debug",
            "intermission::gateway=debug",
        ] {
            let out = filtered_with("info", Some(env));
            assert!(
                out.contains("server down") && out.contains("an access line"),
                "{env}: {out}"
            );
            assert!(!out.contains("PING ack"), "{env}: {out}");
        }
        let log = |level: &str| crate::config::LogConfig {
            format: crate::config::LogFormat::Text,
            access_log: true,
            level: level.to_owned(),
        };
        assert_eq!(
            super::over_level(&log("warn, hyper=warn,tower=info"), " hyper=debug"),
            "warn,tower=info,hyper=debug,rustls=error,h2=error,intermission::access=info"
        );
        // Turned off by RUST_LOG itself, the access log stays off.
        let off = filtered_with("info", Some("intermission::access=off"));
        assert!(
            off.contains("server down") && !off.contains("an access line"),
            "{off}"
        );
        // Those targets alone, said so.
        let alone = filtered_with("info", Some("off,hyper=debug"));
        assert!(!alone.contains("server down"), "{alone}");
    }

    /// A space around a directive, in `log.level` or `RUST_LOG`, and a `RUST_LOG` that is not
    /// a level, silence no line: each was a target of its own to be logged alone.
    #[test]
    fn spaces_or_a_mistyped_rust_log_silence_nothing() {
        for level in [" info ", "info ,hyper=warn", "info, intermission=info"] {
            let out = filtered(level);
            assert!(
                out.contains("server down")
                    && out.contains("an access line")
                    && !out.contains("PING ack"),
                "{level:?}: {out}"
            );
        }
        for env in [" info ", "warnn", " warn", "info ,rustls=warn"] {
            let out = filtered_with("info", Some(env));
            assert!(out.contains("server down"), "{env:?}: {out}");
            assert!(!out.contains("PING ack"), "{env:?}: {out}");
        }
        // Ignored, `log.level` is read in its place.
        assert!(filtered_with("info", Some("warnn")).contains("an access line"));
        assert!(super::rust_log_ignored("warnn") && super::rust_log_ignored("intermission"));
        assert!(!super::rust_log_ignored(" debug ") && !super::rust_log_ignored("h2=warn"));
    }

    #[test]
    fn warnings_a_client_causes_are_written_only_when_asked_for() {
        for level in [
            "info",
            "warn",
            "info,hyper=warn",
            "info,hyper::proto::h2=debug",
        ] {
            let out = filtered(level);
            assert!(out.contains("server down"), "{level}: {out}");
            assert!(!out.contains("Illegal SNI"), "{level}: {out}");
            assert!(!out.contains("PING ack"), "{level}: {out}");
        }
        for level in ["debug", "trace", "info,rustls=warn,h2=warn"] {
            let out = filtered(level);
            assert!(out.contains("server down"), "{level}: {out}");
            assert!(out.contains("Illegal SNI"), "{level}: {out}");
            assert!(out.contains("PING ack"), "{level}: {out}");
        }
        let out = filtered("info,h2::proto=warn");
        assert!(
            out.contains("PING ack") && !out.contains("Illegal SNI"),
            "{out}"
        );
    }

    /// The line `tracing`'s formatter writes for `line`, through the subscriber `init`
    /// installs for `json` or text, without colours.
    fn traced(line: &AccessLine, ms: f64, json: bool) -> String {
        let kept = Kept::default();
        let writer = kept.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let dispatch = if json {
            tracing::Dispatch::new(builder.json().flatten_event(true).finish())
        } else {
            tracing::Dispatch::new(builder.finish())
        };
        super::capture_ready();
        tracing::dispatcher::with_default(&dispatch, || line.trace(ms));
        let text = kept.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    /// `line` without its timestamp, which must be `now`'s to the microsecond or, from
    /// `tracing`, the clock's at most a minute from it.
    fn untimed(line: &str, now: Option<SystemTime>) -> String {
        let (at, from) = match line.find(r#""timestamp":""#) {
            Some(i) => (i + 13, i + 13 + 27),
            None => (0, 27),
        };
        let stamp = humantime::parse_rfc3339(&line[at..from]).unwrap();
        match now {
            Some(now) => assert_eq!(
                humantime::format_rfc3339_micros(stamp).to_string(),
                humantime::format_rfc3339_micros(now).to_string()
            ),
            None => assert!(
                stamp
                    .duration_since(SystemTime::now() - Duration::from_secs(60))
                    .is_ok(),
                "{line}"
            ),
        }
        format!("{}{}", &line[..at], &line[from..])
    }

    /// No client can end a line, or send a terminal commands, through its path: the characters
    /// that would are escaped, in both forms, and nothing else is.
    #[test]
    fn a_path_writes_no_control_character() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_770_437);
        for (path, want) in [
            ("/a\u{85}FAKE", r"/a\u{85}FAKE"),
            ("/x?q=\u{9b}2J", r"/x?q=\u{9b}2J"),
            ("/\u{2028}\u{202e}t\x1b\n", r"/\u{2028}\u{202e}t\u{1b}\u{a}"),
            ("/caf\u{e9}?q=1&r=%0a", "/caf\u{e9}?q=1&r=%0a"),
        ] {
            let line = AccessLine {
                peer: [127, 0, 0, 1].into(),
                client: None,
                method: &"GET",
                path: &path,
                status: 200,
                upstream: None,
                bytes: 0,
                cut: false,
            };
            let mut text = Vec::new();
            line.text(1.0, now, &mut text);
            let text = String::from_utf8(text).unwrap();
            assert!(text.contains(&format!(" path={want} status=")), "{text}");
            assert_eq!(text.lines().count(), 1, "{text}");
            let mut json = Vec::new();
            line.json(1.0, now, &mut json);
            let json = String::from_utf8(json).unwrap();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["path"], want, "{json}");
            assert!(!json.trim_end().chars().any(super::unprintable), "{json}");
            assert_eq!(json.matches('\n').count(), 1, "{json}");
        }
    }

    /// Any line `tracing` writes is one line, with no control character or reversing mark in
    /// it: escaped as text, and in JSON as JSON escapes, the value the same.
    #[test]
    fn a_line_of_tracing_is_one_line_with_no_control_character() {
        use super::escaped;
        use crate::config::LogFormat::{Json, Text};
        let plain = b"2026-12-03T14:00:37Z  INFO intermission: caf\xc3\xa9 ok\n";
        assert!(matches!(
            escaped(Text, plain),
            std::borrow::Cow::Borrowed(_)
        ));
        let text = "ERROR x: refused (2 problems):\n  - a\n  - b\u{2028}c\u{9b}2J\td by=\"root\"\n";
        let out = String::from_utf8(escaped(Text, text.as_bytes()).into_owned()).unwrap();
        assert_eq!(
            out,
            "ERROR x: refused (2 problems):\\n  - a\\n  - b\\u{2028}c\\u{9b}2J\\td by=\"root\"\n"
        );
        let value = "r\u{202e}x\u{85}y\u{7f}\"\\";
        let json = format!("{}\n", serde_json::json!({ "message": value }));
        let out = String::from_utf8(escaped(Json, json.as_bytes()).into_owned()).unwrap();
        assert!(!out.trim_end().chars().any(super::unprintable), "{out}");
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["message"], value, "{out}");
        // Bytes that are not UTF-8 do not make a line that is not.
        let out = escaped(Text, b"bad \xff\n").into_owned();
        assert_eq!(String::from_utf8(out).unwrap(), "bad \u{fffd}\n");
    }

    /// A stderr that fails in the middle of a line (a disk that filled up) and takes lines
    /// again later: the torn line is ended before the next, which is whole, and the writer is
    /// told how many were lost and why, once a write goes through.
    #[test]
    fn a_write_that_fails_mid_line_tears_no_later_line() {
        struct Disk {
            kept: Vec<u8>,
            room: usize,
        }
        impl Write for Disk {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if self.room == 0 {
                    return Err(std::io::Error::from_raw_os_error(28));
                }
                let n = b.len().min(self.room);
                self.kept.extend_from_slice(&b[..n]);
                self.room -= n;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut disk = Disk {
            kept: Vec::new(),
            room: 32,
        };
        let mut stderr = super::Stderr::default();
        let first = b"{\"line\":\"one, whole\"}\n{\"line\":\"two, torn\"}\n";
        assert_eq!(super::write_out(&mut disk, first, &mut stderr), None);
        assert_eq!(
            super::write_out(&mut disk, b"{\"line\":3}\n", &mut stderr),
            None
        );
        disk.room = 1000;
        let said = super::write_out(&mut disk, b"{\"line\":4}\n", &mut stderr);
        let (lost, why) = said.unwrap();
        assert_eq!(lost, 2);
        assert!(why.contains("No space left"), "{why}");
        let kept = String::from_utf8(disk.kept.clone()).unwrap();
        let lines: Vec<&str> = kept.lines().collect();
        assert_eq!(
            lines,
            [r#"{"line":"one, whole"}"#, r#"{"line":"t"#, r#"{"line":4}"#],
            "{kept}"
        );
        // Said once.
        assert_eq!(super::write_out(&mut disk, b"5\n", &mut stderr), None);
    }

    /// A clock outside what `humantime` writes is told apart before it is asked to.
    #[test]
    fn only_times_humantime_writes_are_formatted_by_hand() {
        let epoch = SystemTime::UNIX_EPOCH;
        let last = epoch + Duration::from_secs(super::YEAR_10000) - Duration::from_micros(1);
        for at in [epoch, last] {
            assert!(super::formattable(at));
            let text = humantime::format_rfc3339_micros(at).to_string();
            assert!(text == "1970-01-01T00:00:00.000000Z" || text == "9999-12-31T23:59:59.999999Z");
        }
        assert!(!super::formattable(epoch - Duration::from_secs(1)));
        assert!(!super::formattable(last + Duration::from_micros(1)));
    }

    /// Every line as `tracing` would have written it, in both formats: fields, their order,
    /// quoting and escapes, and the duration's digits.
    #[test]
    fn access_lines_are_those_tracing_writes() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let v4s: [IpAddr; 4] = [
            [203, 0, 113, 7].into(),
            [0, 0, 0, 0].into(),
            [255, 255, 255, 255].into(),
            [10, 20, 100, 9].into(),
        ];
        let paths = ["/", "/a/b?q=1&r=%20", "/odd\"quote\\slash\ttab\u{1}é"];
        let now = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_770_437_543_388);
        let peers = v4s.map(|v4| (v4, Some("http://127.0.0.1:8080")));
        // A client a trusted peer named, written with the peer beside it.
        let clients = [None, Some(v4s[0]), Some(v6)];
        for (peer, upstream) in peers.into_iter().chain([(v6, None)]) {
            for (path, client) in paths.into_iter().flat_map(|p| clients.map(|c| (p, c))) {
                for (ms, cut) in [0.618779, 12.0, 1234.5678, 0.0001, 3e-7]
                    .into_iter()
                    .flat_map(|ms| [(ms, false), (ms, true)])
                {
                    let line = AccessLine {
                        peer,
                        client,
                        method: &"GET",
                        path: &path,
                        status: 503,
                        upstream,
                        bytes: 1 << 40,
                        cut,
                    };
                    for json in [false, true] {
                        let mut ours = Vec::new();
                        if json {
                            line.json(ms, now, &mut ours);
                        } else {
                            line.text(ms, now, &mut ours);
                        }
                        let ours = String::from_utf8(ours).unwrap();
                        assert_eq!(
                            untimed(&ours, Some(now)),
                            untimed(&traced(&line, ms, json), None),
                            "json: {json}"
                        );
                    }
                }
            }
        }
    }

    /// A client a trusted peer named is the line's `client`, the peer right after it as
    /// `peer`, in both forms; without one the line has no `peer`.
    #[test]
    fn a_named_client_comes_first_and_the_peer_after_it() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_770_437);
        let named: IpAddr = [203, 0, 113, 7].into();
        for (client, text_want, json_want) in [
            (
                Some(named),
                " client=203.0.113.7 peer=10.0.0.1 method=GET path=/ ",
                r#""client":"203.0.113.7","peer":"10.0.0.1","method":"GET""#,
            ),
            (
                None,
                " client=10.0.0.1 method=GET path=/ ",
                r#""client":"10.0.0.1","method":"GET""#,
            ),
        ] {
            let line = AccessLine {
                peer: [10, 0, 0, 1].into(),
                client,
                method: &"GET",
                path: &"/",
                status: 200,
                upstream: None,
                bytes: 0,
                cut: false,
            };
            let mut text = Vec::new();
            line.text(1.0, now, &mut text);
            let text = String::from_utf8(text).unwrap();
            assert!(text.contains(text_want), "{text}");
            assert_eq!(text.matches("peer=").count(), usize::from(client.is_some()));
            let mut json = Vec::new();
            line.json(1.0, now, &mut json);
            let json = String::from_utf8(json).unwrap();
            assert!(json.contains(json_want), "{json}");
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v.get("peer").is_some(), client.is_some(), "{json}");
        }
    }
}
