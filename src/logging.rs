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
use std::time::{Instant, SystemTime};
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
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
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
    let mut directives = log.level.clone();
    let verbose = log.level.split(',').any(|d| {
        let d = d.trim();
        d.eq_ignore_ascii_case("debug") || d.eq_ignore_ascii_case("trace")
    });
    for library in ["rustls", "h2"] {
        if !verbose && !names(&log.level, library) {
            directives.push(',');
            directives.push_str(library);
            directives.push_str("=error");
        }
    }
    // Whatever `access_log` says at start: a reload can turn it on, and each request asks
    // the config in force whether to write its line.
    directives.push_str(",intermission::access=info");
    directives
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

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`, and can turn
/// the access log off as it could any other target.
pub fn init(log: &LogConfig) {
    let directives = directives(log);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directives))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into a log file or journal.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
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
}

/// One access log line. hyper's path (`gateway`) and the relay both write theirs through
/// `write`, so that the two cannot differ in their fields or formats.
pub struct AccessLine<'a> {
    pub peer: IpAddr,
    pub method: &'a dyn std::fmt::Display,
    pub path: &'a dyn std::fmt::Display,
    pub status: u16,
    /// The server that answered, or was tried last; `None` when there was none to try.
    pub upstream: Option<&'a str>,
    /// The response body's bytes as sent, so far when it was abandoned.
    pub bytes: u64,
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
            // One write per line, as `tracing` makes: lines from other threads and other
            // targets never interleave within one. A log that cannot be written is not the
            // client's failure.
            let _ = std::io::stderr().lock().write_all(line);
        });
    }

    /// The line through `tracing`, as at a terminal; and what `benches/access.rs` compares the
    /// line written by hand with.
    pub fn trace(&self, ms: f64) {
        tracing::info!(
            target: TARGET,
            client = %self.peer,
            method = %self.method,
            path = %self.path,
            status = self.status,
            duration_ms = ms,
            upstream = self.upstream.unwrap_or("-"),
            bytes = self.bytes,
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
        let _ = writeln!(
            out,
            "{}  INFO {TARGET}: client={} method={} path={} status={} duration_ms={ms:?} \
             upstream={:?} bytes={}",
            humantime::format_rfc3339_micros(now),
            Peer(self.peer),
            self.method,
            self.path,
            self.status,
            self.upstream.unwrap_or("-"),
            self.bytes,
        );
    }

    /// `tracing`'s JSON line, flattened: its keys in its order, strings escaped and the
    /// duration written by `serde_json`, as its formatter does.
    fn json(&self, ms: f64, now: SystemTime, out: &mut Vec<u8>) {
        let _ = write!(
            out,
            r#"{{"timestamp":"{}","level":"INFO","client":"{}","method":"#,
            humantime::format_rfc3339_micros(now),
            Peer(self.peer)
        );
        json_str(out, self.method);
        out.extend_from_slice(br#","path":"#);
        json_str(out, self.path);
        let _ = write!(out, r#","status":{},"duration_ms":"#, self.status);
        let _ = serde_json::to_writer(&mut *out, &ms);
        out.extend_from_slice(br#","upstream":"#);
        let _ = serde_json::to_writer(&mut *out, self.upstream.unwrap_or("-"));
        let _ = writeln!(out, r#","bytes":{},"target":"{TARGET}"}}"#, self.bytes);
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
/// text goes through `serde_json` only then, whose escapes are those characters'.
fn json_str(out: &mut Vec<u8>, value: &dyn std::fmt::Display) {
    let start = out.len();
    let _ = write!(out, "\"{value}\"");
    let inner = &out[start + 1..out.len() - 1];
    if inner.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        let text = String::from_utf8_lossy(inner).into_owned();
        out.truncate(start);
        let _ = serde_json::to_writer(&mut *out, &text);
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
        let log = crate::config::LogConfig {
            format: crate::config::LogFormat::Text,
            access_log: false,
            level: level.to_owned(),
        };
        let kept = Kept::default();
        let writer = kept.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(super::directives(&log)))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::warn!(target: "h2::proto::ping_pong", "recv PING ack that we never sent");
            tracing::warn!(target: "intermission::health", "server down");
        });
        let text = kept.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
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
        for (peer, upstream) in peers.into_iter().chain([(v6, None)]) {
            for path in paths {
                for ms in [0.618779, 12.0, 1234.5678, 0.0001, 3e-7] {
                    let line = AccessLine {
                        peer,
                        method: &"GET",
                        path: &path,
                        status: 503,
                        upstream,
                        bytes: 1 << 40,
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
}
