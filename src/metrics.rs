//! The process's metrics: one `prometheus-client` registry, its handles, and the text exposition.
//!
//! Owns every metric name, label and help text, so that the README's "Monitoring" section has one
//! place to check. Two kinds of callers, two costs:
//!
//! - The data plane calls [`Metrics::request`] once per request. It costs only relaxed atomic
//!   increments: every series it touches is created in [`Metrics::new`] and kept as a plain handle
//!   in an array indexed by a small enum, so there is no lock, no allocation and no label lookup.
//!   The duration histogram is [`DurationHistogram`], lock-free on observe (prometheus-client's
//!   own `Histogram` takes a mutex per observation).
//! - The control plane (mode changes, health checks, control commands, webhooks) is rare and may
//!   lock and allocate: it goes through `Family::get_or_create`.
//!
//! This module must not know how anything is served: `admin` serves [`Metrics::encode`].

use crate::state::mode::Mode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to the upstream and answered by it.
    Forwarded,
    /// Answered with a holding response (maintenance or outage).
    Held,
    /// Forwarded although held: allow-listed path or client, or a valid bypass cookie.
    Bypassed,
    /// One of intermission's own paths (status, assets, bypass, preview).
    Reserved,
    /// Could not be forwarded; answered with the outage response (or a 4xx when the
    /// client's own request body could not be read).
    Failed,
    /// Forwarded, and its client left before the answer came (the access log's 499).
    Abandoned,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Forwarded,
        Outcome::Held,
        Outcome::Bypassed,
        Outcome::Reserved,
        Outcome::Failed,
        Outcome::Abandoned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Held => "held",
            Outcome::Bypassed => "bypassed",
            Outcome::Reserved => "reserved",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The client connections counted against `proxy.max_connections`: how many are open, and
/// what happened when that many were. `listener::Limit` keeps them; each is an atomic it
/// moves only when a connection opens or closes, or finds the limit reached.
#[derive(Debug, Clone, Default)]
pub struct ClientMetrics {
    /// The connections open, read at a scrape: the very count the limit is checked against,
    /// so that keeping the gauge adds nothing to an accept.
    pub open: OpenCount,
    /// New connections closed at once: the limit reached, and no idle connection to close.
    pub refused: Counter,
    /// New connections served at the limit by closing an idle one for each.
    pub made_room: Counter,
    /// Idle connections picked to close for room: one for each `made_room`, and those closed
    /// beyond it to bring a count over the limit back to it (`Limit::make_room`), which no
    /// series counted.
    pub closed_for_room: Counter,
    /// New connections closed at once: their client had `proxy.max_pending_per_client`
    /// connections not yet past their first request.
    pub pending_per_client: Counter,
    /// Accepts on `proxy.listen` and `tls.listen` that failed (out of descriptors, most
    /// often): `intermission_accept_failures_total{listener="proxy"}`.
    pub accept_failed: Counter,
}

/// A count of things open as a gauge, moved by whoever opens and closes them.
#[derive(Debug, Clone, Default)]
pub struct OpenCount(Arc<AtomicUsize>);

impl std::ops::Deref for OpenCount {
    type Target = AtomicUsize;

    fn deref(&self) -> &AtomicUsize {
        &self.0
    }
}

impl TypedMetric for OpenCount {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for OpenCount {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let open = i64::try_from(self.0.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        encoder.encode_gauge(&open)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// `intermission_mode`: one series per mode, 1 for the current one, rendered from one atomic.
/// Three gauges set one after the other let a scrape read the old mode's 1 before the switch
/// and the new one's after it (or read them mid-switch): two modes at once, which an alert on
/// `intermission_mode{mode="maintenance"} == 1` and a dashboard's "current mode" both took at
/// their word. One load per scrape sees one mode, or none before the first is known.
#[derive(Debug, Clone)]
struct ModeGauge(Arc<AtomicU8>);

impl ModeGauge {
    /// No mode is known yet (every series reads 0).
    const NONE: u8 = u8::MAX;
}

impl TypedMetric for ModeGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for ModeGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let current = usize::from(self.0.load(Ordering::Relaxed));
        for mode in MODES {
            let labels = ModeLabels {
                mode: mode.as_str(),
            };
            let on = i64::from(mode_index(mode) == current);
            encoder.encode_family(&labels)?.encode_gauge(&on)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    outcome: &'static str,
}

/// What became of one webhook delivery.
#[derive(Debug, Clone, Copy)]
pub enum WebhookResult {
    Delivered,
    /// Given up after the retries.
    Failed,
    /// Not delivered and not given up after its retries: the queue was full and the oldest
    /// delivery was dropped, or the proxy stopped before it was delivered.
    Dropped,
}

impl WebhookResult {
    const ALL: [WebhookResult; 3] = [
        WebhookResult::Delivered,
        WebhookResult::Failed,
        WebhookResult::Dropped,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WebhookResult::Delivered => "delivered",
            WebhookResult::Failed => "failed",
            WebhookResult::Dropped => "dropped",
        }
    }
}

/// Why the proxy closed an HTTP/2 client's connection with an error (a GOAWAY frame's code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http2Goaway {
    /// h2's answer to abuse: a rapid reset, a CONTINUATION flood, an HPACK bomb, a flood of
    /// empty DATA frames, more than 1,024 streams reset for the client's errors.
    EnhanceYourCalm,
    ProtocolError,
    /// A window past 2³¹−1, or data past it.
    FlowControlError,
    /// Anything else (COMPRESSION_ERROR, FRAME_SIZE_ERROR).
    Other,
    /// The proxy's own answer, ENHANCE_YOUR_CALM, to a client sending mostly frames that do
    /// no work (`flood`), which h2 does not bound.
    Flood,
}

impl Http2Goaway {
    const ALL: [Http2Goaway; 5] = [
        Http2Goaway::EnhanceYourCalm,
        Http2Goaway::ProtocolError,
        Http2Goaway::FlowControlError,
        Http2Goaway::Other,
        Http2Goaway::Flood,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Http2Goaway::EnhanceYourCalm => "enhance_your_calm",
            Http2Goaway::ProtocolError => "protocol_error",
            Http2Goaway::FlowControlError => "flow_control_error",
            Http2Goaway::Other => "other",
            Http2Goaway::Flood => "flood",
        }
    }

    /// The GOAWAY the proxy's own HTTP/2 server sent for the client's error, if that is how
    /// the connection `e` ended: not one the client sent, nor a reset or a broken socket.
    pub fn of(e: &hyper::Error) -> Option<Http2Goaway> {
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            if let Some(h2) = c.downcast_ref::<h2::Error>() {
                if !(h2.is_go_away() && h2.is_library()) {
                    return None;
                }
                return Some(match h2.reason()? {
                    h2::Reason::NO_ERROR => return None,
                    h2::Reason::ENHANCE_YOUR_CALM => Http2Goaway::EnhanceYourCalm,
                    h2::Reason::PROTOCOL_ERROR => Http2Goaway::ProtocolError,
                    h2::Reason::FLOW_CONTROL_ERROR => Http2Goaway::FlowControlError,
                    _ => Http2Goaway::Other,
                });
            }
            cause = c.source();
        }
        None
    }
}

/// Why the proxy reset an HTTP/2 client's stream for what the client did (an `RST_STREAM`
/// frame's code), the connection going on. h2 resets them itself and tells hyper nothing
/// (nor any hook of its): the frames the proxy writes are read as they pass (`flood`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http2Reset {
    /// A malformed request: a missing or bad pseudo-header, a connection-specific header
    /// (`connection:`), an upload at odds with its `content-length`, trailers without the
    /// stream's end, a malformed header block.
    ProtocolError,
    /// Data past the stream's window, or a window past 2³¹−1.
    FlowControlError,
    /// A stream beyond the connection's concurrent streams.
    RefusedStream,
    /// Anything else of the client's making: a frame on a stream already closed
    /// (STREAM_CLOSED), ENHANCE_YOUR_CALM, ...
    Other,
}

impl Http2Reset {
    pub const ALL: [Http2Reset; 4] = [
        Http2Reset::ProtocolError,
        Http2Reset::FlowControlError,
        Http2Reset::RefusedStream,
        Http2Reset::Other,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Http2Reset::ProtocolError => "protocol_error",
            Http2Reset::FlowControlError => "flow_control_error",
            Http2Reset::RefusedStream => "refused_stream",
            Http2Reset::Other => "other",
        }
    }

    /// The reason of an `RST_STREAM` the proxy wrote with `code`, if it was for the client's
    /// error: not NO_ERROR (an answer sent whole before its upload was read), INTERNAL_ERROR
    /// (an answer's body that broke, hyper's) or CANCEL (a stream given up, hyper's).
    pub fn of(code: u32) -> Option<Http2Reset> {
        match code {
            0x0 | 0x2 | 0x8 => None,
            0x1 => Some(Http2Reset::ProtocolError),
            0x3 => Some(Http2Reset::FlowControlError),
            0x7 => Some(Http2Reset::RefusedStream),
            _ => Some(Http2Reset::Other),
        }
    }
}

/// Why a TLS handshake failed, in the few kinds an operator acts on differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// Nothing in common with the client: TLS version, ciphers, ALPN (old clients, scanners).
    Protocol,
    /// The client refused the certificate (unknown issuer, expired, wrong name): a chain or
    /// renewal problem, which every client of that kind then has.
    Certificate,
    /// Not finished within `header_read_timeout` after the client began.
    Timeout,
    /// Plain HTTP sent to the TLS port (answered 400).
    PlainHttp,
    /// Anything else: malformed records, a reset.
    Other,
}

impl TlsFailure {
    const ALL: [TlsFailure; 5] = [
        TlsFailure::Protocol,
        TlsFailure::Certificate,
        TlsFailure::Timeout,
        TlsFailure::PlainHttp,
        TlsFailure::Other,
    ];

    fn as_str(self) -> &'static str {
        match self {
            TlsFailure::Protocol => "protocol",
            TlsFailure::Certificate => "certificate",
            TlsFailure::Timeout => "timeout",
            TlsFailure::PlainHttp => "plain_http",
            TlsFailure::Other => "other",
        }
    }

    /// The kind of a failed handshake's error (`tokio_rustls`'s, a rustls error inside).
    pub fn of(e: &std::io::Error) -> TlsFailure {
        use rustls::AlertDescription as A;
        let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return TlsFailure::Other;
        };
        match tls {
            rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
                TlsFailure::Protocol
            }
            rustls::Error::AlertReceived(
                A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                // A signature in the chain that does not verify (an intermediate of another
                // issuer's, with the same name).
                | A::DecryptError,
            ) => TlsFailure::Certificate,
            rustls::Error::AlertReceived(
                A::ProtocolVersion
                | A::HandshakeFailure
                | A::InsufficientSecurity
                | A::NoApplicationProtocol,
            ) => TlsFailure::Protocol,
            _ => TlsFailure::Other,
        }
    }
}

const MODES: [Mode; 3] = [Mode::Normal, Mode::Maintenance, Mode::Outage];

fn mode_index(mode: Mode) -> usize {
    match mode {
        Mode::Normal => 0,
        Mode::Maintenance => 1,
        Mode::Outage => 2,
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index into `STATUS_CLASSES`. hyper accepts codes up to 999; none of them has a class, so
/// they are left out rather than counted as something they are not.
fn status_class(status: u16) -> Option<usize> {
    match status {
        100..=199 => Some(0),
        200..=299 => Some(1),
        300..=399 => Some(2),
        400..=499 => Some(3),
        500..=599 => Some(4),
        _ => None,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    outcome: &'static str,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthCheckLabels {
    server: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamFailureLabels {
    server: String,
    reason: &'static str,
}

/// How a request failed on an upstream server before its response head, in the kinds an
/// operator tells apart: a server that takes no connections, one that hangs, one that breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection: refused, or not made within `connect_timeout` (a name lookup or an
    /// `https://` server's handshake included).
    Connect,
    /// No response head within `response_timeout`, or the server taken out by its health
    /// checks while the request waited for one.
    Timeout,
    /// Anything after the server took the connection: closed or reset unanswered, a
    /// malformed, oversized or unasked answer.
    Error,
}

impl UpstreamFailure {
    const ALL: [UpstreamFailure; 3] = [
        UpstreamFailure::Connect,
        UpstreamFailure::Timeout,
        UpstreamFailure::Error,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Error => "error",
        }
    }
}

/// One upstream server's request failures and retries, kept by the request path as plain
/// handles (relaxed increments, no label lookup), from its checker's `health::Passive`.
#[derive(Debug, Clone, Default)]
pub struct UpstreamCounters {
    /// Indexed like `UpstreamFailure::ALL`.
    failures: [Counter; 3],
    retries: Counter,
}

impl UpstreamCounters {
    pub fn failed(&self, reason: UpstreamFailure) {
        self.failures[reason as usize].inc();
    }

    /// A request that failed on this server was sent again to another.
    pub fn retried(&self) {
        self.retries.inc();
    }

    #[cfg(test)]
    pub fn connect_failures(&self) -> u64 {
        self.failures[UpstreamFailure::Connect as usize].get()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
    result: &'static str,
}

/// `webhook` is a `[[notify]]` entry's `name`, else its index: as many as the config has
/// entries, and never its URL, whose path or userinfo may hold a token.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    webhook: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookQueueLabels {
    webhook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsFailureLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptLabels {
    listener: &'static str,
}

/// A listener whose accepts may fail: its series of `intermission_accept_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepting {
    /// `proxy.listen` and `tls.listen`, which share the clients' descriptors.
    Proxy,
    Admin,
    /// The control socket.
    Control,
}

impl Accepting {
    const ALL: [Accepting; 3] = [Accepting::Proxy, Accepting::Admin, Accepting::Control];

    fn as_str(self) -> &'static str {
        match self {
            Accepting::Proxy => "proxy",
            Accepting::Admin => "admin",
            Accepting::Control => "control",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Http2GoawayLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsHandshakeLabels {
    kind: &'static str,
}

fn result_label(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "fail"
    }
}

/// OpenMetrics text, as prometheus-client writes it, in the Prometheus text format 0.0.4: a
/// counter's `# HELP` and `# TYPE` name its samples (`x_total`, where OpenMetrics names the
/// family `x`), an `info` is a gauge named as its sample (`x_info`), and the `# UNIT` lines and
/// `# EOF`, which 0.0.4 has not, are left out. Samples are written alike in both.
fn to_text_004(open: &str) -> String {
    let kinds: std::collections::HashMap<&str, &str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?.split_once(' ')?)));
        match meta {
            Some((prefix, (name, rest))) => {
                out.push_str(prefix);
                out.push_str(name);
                match kinds.get(name).copied() {
                    Some("counter") => out.push_str("_total"),
                    Some("info") => out.push_str("_info"),
                    _ => {}
                }
                out.push(' ');
                out.push_str(match (prefix, rest) {
                    ("# TYPE ", "info") => "gauge",
                    _ => rest,
                });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Upper bounds of the duration buckets, in microseconds (0.5 ms to 60 s), so that observing
/// compares integers. `+Inf` is the extra last bucket. Up to 60 s, `upstream.response_timeout`'s
/// default: a server slower than 10 s showed only in `+Inf`, its 20 s and its timeouts alike.
const BUCKETS_MICROS: [u64; 16] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// One observation adds at most a day to the sum, so that no absurd duration can wrap it.
const MAX_OBSERVATION_MICROS: u64 = 24 * 3600 * 1_000_000;

/// A histogram of durations in seconds whose `observe` is two relaxed atomic increments.
///
/// Buckets are stored non-cumulative (one increment per observation, not one per bucket above
/// it) and the count is their total, computed when encoding: so the `+Inf` bucket always equals
/// `_count` in a scrape, even one taken in the middle of an observation. The sum, kept in whole
/// microseconds, may lag its buckets by an observation or two during a scrape; Prometheus only
/// ever takes rates of it. Clones share the same cells, like `Counter`.
#[derive(Debug, Clone, Default)]
pub struct DurationHistogram {
    inner: Arc<HistogramCells>,
}

#[derive(Debug, Default)]
struct HistogramCells {
    buckets: [AtomicU64; BUCKETS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl DurationHistogram {
    pub fn observe(&self, duration: Duration) {
        let micros = u64::try_from(duration.as_micros())
            .unwrap_or(u64::MAX)
            .min(MAX_OBSERVATION_MICROS);
        // Fourteen integer comparisons beat a binary search at this size and never branch far.
        let i = BUCKETS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(BUCKETS_MICROS.len());
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0); BUCKETS_MICROS.len() + 1];
        let mut count = 0;
        for (i, slot) in buckets.iter_mut().enumerate() {
            let upper = BUCKETS_MICROS
                .get(i)
                .map_or(f64::INFINITY, |&micros| micros as f64 / 1e6);
            let n = self.inner.buckets[i].load(Ordering::Relaxed);
            count += n;
            *slot = (upper, n);
        }
        let sum = self.inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        // The encoder accumulates the per-bucket counts itself.
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The registry and every handle into it. Shared as `Arc<Metrics>`; it lives as long as the
/// process, across config reloads, so counters never restart.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `[outcome][mode]`.
    requests: [[Counter; 3]; 6],
    /// Indexed like `STATUS_CLASSES`.
    responses: [Counter; 5],
    request_duration: DurationHistogram,
    /// The current mode's `mode_index` (`ModeGauge::NONE` until the first is known).
    mode: ModeGauge,
    /// `[from][to]`; the diagonal stays unused.
    transitions: [[Counter; 3]; 3],
    upstream_healthy: Family<ServerLabels, Gauge>,
    /// Times each server was taken out.
    upstream_downs: Family<ServerLabels, Counter>,
    health_checks: Family<HealthCheckLabels, Counter>,
    health_check_duration: Family<ServerLabels, DurationHistogram>,
    upstream_failures: Family<UpstreamFailureLabels, Counter>,
    upstream_retries: Family<ServerLabels, Counter>,
    control_commands: Family<CommandLabels, Counter>,
    /// By webhook (`notify::Target::id`) and result.
    webhooks: Family<WebhookLabels, Counter>,
    webhook_queues: Family<WebhookQueueLabels, Gauge>,
    /// Events of webhooks whose series a reload removed, not delivered.
    webhook_removed_dropped: Counter,
    /// Indexed like `TlsFailure::ALL`.
    tls_failures: [Counter; 5],
    /// Full, then resumed.
    tls_handshakes: [Counter; 2],
    /// Indexed like `Http2Goaway::ALL`.
    http2_goaways: [Counter; 5],
    /// Indexed like `Accepting::ALL`.
    accept_failures: [Counter; 3],
    /// Indexed like `Http2Reset::ALL`.
    http2_resets: [Counter; 4],
    certificate_ends: Family<CertificateLabels, Gauge>,
    parked: Gauge,
    /// Whether the last reload was put in force (1) or refused (0); 1 from the start.
    reload_ok: Gauge,
    /// When the config last came in force (the start, or a reload), in Unix seconds.
    reload_at: Gauge,
    /// Moved by `listener::Limit`.
    clients: ClientMetrics,
    /// Moved by `forward::sockets`, which counts every upstream socket.
    sockets: crate::forward::sockets::SocketMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric. Series with a fixed label set are created here, at zero, so that
    /// they exist from the first scrape (a rate over a series that appears late misses its start)
    /// and so that the hot path never has to create one.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();

        let requests_family = Family::<RequestLabels, Counter>::default();
        let requests = Outcome::ALL.map(|outcome| {
            MODES.map(|mode| {
                requests_family.get_or_create_owned(&RequestLabels {
                    outcome: outcome.as_str(),
                    mode: mode.as_str(),
                })
            })
        });
        registry.register(
            "intermission_requests",
            "Requests by what became of them (forwarded, held, bypassed, reserved, failed, \
             abandoned) and the mode they were decided in",
            requests_family,
        );

        let responses_family = Family::<ClassLabels, Counter>::default();
        let responses = STATUS_CLASSES
            .map(|class| responses_family.get_or_create_owned(&ClassLabels { class }));
        registry.register(
            "intermission_responses",
            "Responses sent to clients, by status class",
            responses_family,
        );

        let request_duration = DurationHistogram::default();
        registry.register_with_unit(
            "intermission_request_duration",
            "Time from receiving a request to having its response head, in seconds",
            Unit::Seconds,
            request_duration.clone(),
        );

        let mode = ModeGauge(Arc::new(AtomicU8::new(ModeGauge::NONE)));
        registry.register(
            "intermission_mode",
            "The mode clients see: 1 for the current one, 0 for the others",
            mode.clone(),
        );

        let transitions_family = Family::<TransitionLabels, Counter>::default();
        let transitions = MODES.map(|from| {
            MODES.map(|to| {
                let labels = TransitionLabels {
                    from: from.as_str(),
                    to: to.as_str(),
                };
                if from == to {
                    // Never incremented, so never shown.
                    Counter::default()
                } else {
                    transitions_family.get_or_create_owned(&labels)
                }
            })
        });
        registry.register(
            "intermission_mode_transitions",
            "Changes of mode, by the mode left and the mode entered",
            transitions_family,
        );

        let upstream_healthy = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "intermission_upstream_healthy",
            "Whether the health checks count an upstream server as healthy (1) or not (0)",
            upstream_healthy.clone(),
        );

        // The gauge alone misses a server out and back between two scrapes (a second or two
        // with the defaults, against a scrape interval of 15 s or more).
        let upstream_downs = Family::<ServerLabels, Counter>::default();
        registry.register(
            "intermission_upstream_marked_down",
            "Times an upstream server was taken out, by its health checks or by failed \
             requests: a server that goes out and back between two scrapes shows here",
            upstream_downs.clone(),
        );

        let health_checks = Family::<HealthCheckLabels, Counter>::default();
        registry.register(
            "intermission_health_checks",
            "Health check probes by upstream server and result (ok or fail)",
            health_checks.clone(),
        );

        let health_check_duration = Family::<ServerLabels, DurationHistogram>::default();
        registry.register_with_unit(
            "intermission_health_check_duration",
            "Time a health check probe took, by upstream server, in seconds (a failed probe \
             counts as health.timeout, whatever it took)",
            Unit::Seconds,
            health_check_duration.clone(),
        );

        // Beside the checks: a failure that a retry on another server hid from the client,
        // or one the checks do not see (a page that hangs while `health.path` answers), is
        // otherwise only in the log.
        let upstream_failures = Family::<UpstreamFailureLabels, Counter>::default();
        registry.register(
            "intermission_upstream_failures",
            "Requests that failed on an upstream server before its response head, by server \
             and reason (connect: no connection; timeout: no head within response_timeout; \
             error: closed, reset or a malformed answer), retried on another server or not",
            upstream_failures.clone(),
        );
        let upstream_retries = Family::<ServerLabels, Counter>::default();
        registry.register(
            "intermission_upstream_retries",
            "Requests sent again to another upstream server after failing on this one",
            upstream_retries.clone(),
        );

        let control_commands = Family::<CommandLabels, Counter>::default();
        // Every command and result at 0 from the start, so that an alert on the `increase()`
        // of failures sees the first (a series that appears at 1 shows no increase).
        for command in crate::control::protocol::COMMANDS
            .iter()
            .chain(&["unknown"])
        {
            for ok in [true, false] {
                drop(control_commands.get_or_create(&CommandLabels {
                    command: (*command).to_owned(),
                    result: result_label(ok),
                }));
            }
        }
        registry.register(
            "intermission_control_commands",
            "Commands received on the control socket, by command and result (ok or fail)",
            control_commands.clone(),
        );

        let webhooks = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "intermission_webhook_deliveries",
            "Webhook deliveries by webhook (its name, else its index in [[notify]]) and result \
             (delivered, failed after retries, dropped from a full queue or at a stop)",
            webhooks.clone(),
        );

        let webhook_queues = Family::<WebhookQueueLabels, Gauge>::default();
        registry.register(
            "intermission_webhook_queue_length",
            "Events a webhook holds, queued or being tried, not yet delivered, given up or \
             dropped, by webhook (its name, else its index in [[notify]])",
            webhook_queues.clone(),
        );

        // Apart from the deliveries by webhook: a reload that removes a webhook removes its
        // series, and what it then drops would otherwise be counted nowhere.
        let webhook_removed_dropped = Counter::default();
        registry.register(
            "intermission_webhook_removed_dropped",
            "Webhook events not delivered because a reload removed their webhook, whose \
             series went with it: still queued then, or under way then and failed",
            webhook_removed_dropped.clone(),
        );

        // One count for the process (the log is), shared by every registry a test makes.
        registry.register(
            "intermission_log_lines_dropped",
            "Log lines (access lines included) dropped because stderr did not take them as \
             fast as they came: what reads it is blocked or too slow, and requests were served \
             meanwhile",
            crate::logging::DROPPED.clone(),
        );

        let tls_family = Family::<TlsFailureLabels, Counter>::default();
        let tls_failures = TlsFailure::ALL
            .map(|r| tls_family.get_or_create_owned(&TlsFailureLabels { reason: r.as_str() }));
        registry.register(
            "intermission_tls_handshake_failures",
            "TLS handshakes that failed after the client began, by reason (protocol: nothing \
             in common; certificate: the client refused it; timeout; plain_http; other)",
            tls_family,
        );

        let goaways_family = Family::<Http2GoawayLabels, Counter>::default();
        let http2_goaways = Http2Goaway::ALL
            .map(|r| goaways_family.get_or_create_owned(&Http2GoawayLabels { reason: r.as_str() }));
        registry.register(
            "intermission_http2_client_goaways",
            "HTTP/2 client connections closed with an error GOAWAY for what the client did, by \
             its code (enhance_your_calm: abuse, such as a rapid reset, a CONTINUATION flood, an \
             HPACK bomb or too many stream errors; protocol_error; flow_control_error; other; \
             flood: the proxy's own ENHANCE_YOUR_CALM to a client sending 8 times more than \
             its requests, bodies and answers, past 8 MiB)",
            goaways_family,
        );

        let resets_family = Family::<Http2GoawayLabels, Counter>::default();
        let http2_resets = Http2Reset::ALL
            .map(|r| resets_family.get_or_create_owned(&Http2GoawayLabels { reason: r.as_str() }));
        registry.register(
            "intermission_http2_client_stream_resets",
            "HTTP/2 client streams the proxy reset (RST_STREAM) for what the client did, the \
             connection going on, by its code (protocol_error: a malformed request, such as a \
             bad or missing pseudo-header, a connection: header, an upload at odds with its \
             content-length; flow_control_error; refused_stream: beyond the concurrent \
             streams; other)",
            resets_family,
        );

        let handshakes_family = Family::<TlsHandshakeLabels, Counter>::default();
        let tls_handshakes = ["full", "resumed"]
            .map(|kind| handshakes_family.get_or_create_owned(&TlsHandshakeLabels { kind }));
        registry.register(
            "intermission_tls_handshakes",
            "TLS handshakes completed, by kind: full, or resumed (a returning client's session, \
             no certificate sent and no signature made)",
            handshakes_family,
        );

        let certificate_ends = Family::<CertificateLabels, Gauge>::default();
        registry.register_with_unit(
            "intermission_tls_certificate_expiry_timestamp",
            "When each served certificate chain ends (the earliest notAfter of the file's \
             certificates, the server's own or an intermediate's), in seconds since the Unix \
             epoch, by the file it was read from; alert on it minus time()",
            Unit::Seconds,
            certificate_ends.clone(),
        );

        let parked = Gauge::default();
        registry.register(
            "intermission_parked_connections",
            "Idle keep-alive HTTP/1.1 client connections waiting for their next request with \
             no buffers held",
            parked.clone(),
        );

        // Prometheus's own names for the same facts, so that an alert written for one
        // (`config_last_reload_successful == 0`) reads the same here: a refused reload
        // (SIGHUP, `systemctl reload`, a certbot hook) is otherwise only in the log.
        let reload_ok = Gauge::default();
        reload_ok.set(1);
        registry.register(
            "intermission_config_last_reload_successful",
            "Whether the last config reload was put in force (1) or refused, the running \
             config kept (0); 1 from the start",
            reload_ok.clone(),
        );
        let reload_at = Gauge::default();
        reload_at.set(unix_now());
        registry.register(
            "intermission_config_last_reload_success_timestamp_seconds",
            "When the running config came in force, at the start or by a reload, in Unix time",
            reload_at.clone(),
        );

        // The log says a burst of failed accepts once a second (`listener::AcceptFailures`);
        // an alert reads metrics, and a proxy out of descriptors turns clients away unseen.
        let accept_family = Family::<AcceptLabels, Counter>::default();
        let accept_failures = Accepting::ALL.map(|l| {
            accept_family.get_or_create_owned(&AcceptLabels {
                listener: l.as_str(),
            })
        });
        registry.register(
            "intermission_accept_failures",
            "Connections the proxy failed to accept, by listener (proxy: proxy.listen and \
             tls.listen; admin; control: the control socket), most often for want of file \
             descriptors (EMFILE, ENFILE): each failed try counts, and the client waits in the \
             listen queue or is refused by the kernel",
            accept_family,
        );

        let limit_family = Family::<LimitLabels, Counter>::default();
        let reached = |outcome| limit_family.get_or_create_owned(&LimitLabels { outcome });
        let clients = ClientMetrics {
            open: OpenCount::default(),
            refused: reached("refused"),
            made_room: reached("made_room"),
            closed_for_room: Counter::default(),
            pending_per_client: reached("pending_per_client"),
            accept_failed: accept_failures[Accepting::Proxy as usize].clone(),
        };
        registry.register(
            "intermission_client_connections",
            "Client connections open on the proxy's listeners (plaintext and TLS, tunnels \
             included), counted against proxy.max_connections",
            clients.open.clone(),
        );
        registry.register(
            "intermission_client_connection_limit_reached",
            "New client connections that met a connection limit, by outcome (refused: \
             proxy.max_connections open and no idle connection could be closed for it, closed \
             at once; made_room: proxy.max_connections open, an idle connection was closed for \
             it; pending_per_client: its address had proxy.max_pending_per_client connections \
             not yet past their first request, closed at once)",
            limit_family,
        );
        registry.register(
            "intermission_client_connections_closed_for_room",
            "Idle client connections picked to close to make room at proxy.max_connections: one \
             for each made_room, and those picked beyond it while more are open than the limit \
             (a lowered one), up to 8 per new client, to bring the count back to it; one whose \
             request arrives first is served and stays",
            clients.closed_for_room.clone(),
        );

        let sockets = crate::forward::sockets::SocketMetrics::default();
        registry.register(
            "intermission_upstream_connections",
            "Sockets open to upstream servers (idle kept ones included), counted against \
             intermission_upstream_connection_limit",
            sockets.open.clone(),
        );
        registry.register(
            "intermission_upstream_connection_limit",
            "The most sockets to upstream servers open at once, from the open-file limit less \
             proxy.max_connections and the proxy's own; 0 when there is none",
            sockets.limit.clone(),
        );
        registry.register(
            "intermission_upstream_connection_limit_reached",
            "Requests answered with the outage response because no upstream connection could \
             be opened within connect_timeout under that limit (the server is not blamed)",
            sockets.reached.clone(),
        );
        registry.register(
            "intermission_tunnels_open",
            "Upgraded connections (WebSocket and other upgrades) tunnelled to upstream servers, \
             each holding one of intermission_upstream_connections",
            sockets.tunnels_open.clone(),
        );
        registry.register(
            "intermission_tunnel_limit_reached",
            "Upgrade requests answered with the outage response without reaching a server: \
             tunnels held their share (three quarters) of intermission_upstream_connection_limit",
            sockets.tunnels_refused.clone(),
        );

        registry.register(
            "intermission_build",
            "The running version of intermission; the value is always 1",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );

        Metrics {
            registry,
            requests,
            responses,
            request_duration,
            mode,
            transitions,
            upstream_healthy,
            upstream_downs,
            health_checks,
            health_check_duration,
            upstream_failures,
            upstream_retries,
            control_commands,
            webhooks,
            webhook_queues,
            webhook_removed_dropped,
            tls_failures,
            tls_handshakes,
            http2_goaways,
            accept_failures,
            http2_resets,
            certificate_ends,
            parked,
            reload_ok,
            reload_at,
            clients,
            sockets,
        }
    }

    /// A reload was put in force (`ok`) or refused.
    pub fn reloaded(&self, ok: bool) {
        self.reload_ok.set(i64::from(ok));
        if ok {
            self.reload_at.set(unix_now());
        }
    }

    /// The client connections' metrics, for `listener::Limit` to keep.
    pub fn clients(&self) -> ClientMetrics {
        self.clients.clone()
    }

    /// The upstream sockets' metrics, for `forward::sockets` to move.
    pub fn sockets(&self) -> crate::forward::sockets::SocketMetrics {
        self.sockets.clone()
    }

    /// The gauge of parked connections, for a connection to move as it parks and wakes.
    pub fn parked(&self) -> Gauge {
        self.parked.clone()
    }

    /// Counts one request. Hot path: relaxed atomic increments only (ordering between different
    /// counters does not matter to anyone reading them).
    pub fn request(&self, outcome: Outcome, mode: Mode, status: u16, duration: Duration) {
        self.requests[outcome.index()][mode_index(mode)].inc();
        if let Some(class) = status_class(status) {
            self.responses[class].inc();
        }
        self.request_duration.observe(duration);
    }

    /// Counts a forwarded request whose client left before its answer: no response was sent,
    /// so neither its class nor a duration is counted.
    pub fn abandoned(&self, mode: Mode) {
        self.requests[Outcome::Abandoned.index()][mode_index(mode)].inc();
    }

    /// Counts a forwarded request whose HTTP/2 stream h2 reset for the client's malformed
    /// upload (`RST_STREAM`, `PROTOCOL_ERROR`): `failed`, the client's fault, but no response
    /// was sent, so neither its class nor a duration is counted. Counted as a `4xx`, it made
    /// `intermission_responses_total` tell of answers no client got.
    pub fn reset_unanswered(&self, mode: Mode) {
        self.requests[Outcome::Failed.index()][mode_index(mode)].inc();
    }

    /// Counts a request head hyper refused and answered itself (`status`) before anything of
    /// ours saw it: no duration, since nobody timed it, so it leaves the histogram alone.
    pub fn unread(&self, mode: Mode, status: u16) {
        self.requests[Outcome::Reserved.index()][mode_index(mode)].inc();
        if let Some(class) = status_class(status) {
            self.responses[class].inc();
        }
    }

    /// Counts a request head begun and not whole within `header_read_timeout` (logged `408`)
    /// with the heads refused unread: no response, since the connection is closed unanswered,
    /// and no duration.
    pub fn head_timed_out(&self, mode: Mode) {
        self.requests[Outcome::Reserved.index()][mode_index(mode)].inc();
    }

    /// Marks `mode` as the current one: one store, so that a scrape sees exactly one mode at 1.
    pub fn set_mode(&self, mode: Mode) {
        // Three modes: an index fits a byte.
        let index = u8::try_from(mode_index(mode)).unwrap_or(ModeGauge::NONE);
        self.mode.0.store(index, Ordering::Relaxed);
    }

    /// Counts a change of mode. `from == to` is not a change and is not counted.
    pub fn mode_transition(&self, from: Mode, to: Mode) {
        if from != to {
            self.transitions[mode_index(from)][mode_index(to)].inc();
        }
    }

    /// Shows `server`'s health; its count of times taken out is shown from then on, at 0
    /// until the first.
    pub fn set_upstream_health(&self, server: &str, healthy: bool) {
        let labels = ServerLabels {
            server: server.to_owned(),
        };
        self.upstream_healthy
            .get_or_create(&labels)
            .set(i64::from(healthy));
        drop(self.upstream_downs.get_or_create(&labels));
    }

    /// Counts `server` taken out (its health flipped from healthy to not).
    pub fn upstream_marked_down(&self, server: &str) {
        self.upstream_downs
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .inc();
    }

    /// Forgets a server that a reload removed, so that no alert fires for it for ever.
    pub fn forget_upstream(&self, server: &str) {
        let labels = ServerLabels {
            server: server.to_owned(),
        };
        self.upstream_healthy.remove(&labels);
        self.upstream_downs.remove(&labels);
        self.health_check_duration.remove(&labels);
        self.upstream_retries.remove(&labels);
        for reason in UpstreamFailure::ALL {
            self.upstream_failures.remove(&UpstreamFailureLabels {
                server: server.to_owned(),
                reason: reason.as_str(),
            });
        }
        for result in [true, false] {
            self.health_checks.remove(&HealthCheckLabels {
                server: server.to_owned(),
                result: result_label(result),
            });
        }
    }

    /// `server`'s failure and retry counters, every series shown from now on at zero (so
    /// that a rate of failures starts from zero rather than from nothing), its health checks'
    /// too: created at its first probe, a server failing from the start began at `fail` 1,
    /// and an `increase()` never saw that first failure. A server a reload keeps keeps its
    /// counts.
    pub fn upstream(&self, server: &str) -> UpstreamCounters {
        for result in [true, false] {
            drop(self.health_checks.get_or_create(&HealthCheckLabels {
                server: server.to_owned(),
                result: result_label(result),
            }));
        }
        let failures = UpstreamFailure::ALL.map(|reason| {
            self.upstream_failures
                .get_or_create_owned(&UpstreamFailureLabels {
                    server: server.to_owned(),
                    reason: reason.as_str(),
                })
        });
        let retries = self.upstream_retries.get_or_create_owned(&ServerLabels {
            server: server.to_owned(),
        });
        UpstreamCounters { failures, retries }
    }

    /// Counts one probe and its latency. Both results' series are there from the server's
    /// start (`upstream`); made here too for a probe that would come first.
    pub fn health_check(&self, server: &str, ok: bool, latency: Duration) {
        for result in [true, false] {
            let counter = self.health_checks.get_or_create(&HealthCheckLabels {
                server: server.to_owned(),
                result: result_label(result),
            });
            if result == ok {
                counter.inc();
            }
        }
        self.health_check_duration
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .observe(latency);
    }

    /// Counts one control command. `command` must be the protocol's command name (a fixed, small
    /// set), never anything a client wrote, or the number of series would be unbounded.
    pub fn control_command(&self, command: &str, ok: bool) {
        for result in [true, false] {
            let counter = self.control_commands.get_or_create(&CommandLabels {
                command: command.to_owned(),
                result: result_label(result),
            });
            if result == ok {
                counter.inc();
            }
        }
    }

    fn webhook_labels(webhook: &str, result: WebhookResult) -> WebhookLabels {
        WebhookLabels {
            webhook: webhook.to_owned(),
            result: result.as_str(),
        }
    }

    /// Counts one delivery's end for `webhook`, a configured entry's id (see `WebhookLabels`).
    pub fn webhook(&self, webhook: &str, result: WebhookResult) {
        self.webhooks
            .get_or_create(&Metrics::webhook_labels(webhook, result))
            .inc();
    }

    /// Shows `webhook`'s series, every result at zero and an empty queue, so that a rate of
    /// failures starts from zero rather than from nothing.
    pub fn add_webhook(&self, webhook: &str) {
        // Created, and the family's lock let go at once.
        for result in WebhookResult::ALL {
            drop(
                self.webhooks
                    .get_or_create(&Metrics::webhook_labels(webhook, result)),
            );
        }
        drop(self.webhook_queues.get_or_create(&WebhookQueueLabels {
            webhook: webhook.to_owned(),
        }));
    }

    /// Forgets a webhook that a reload removed (or whose id now names another), so that its
    /// series neither linger nor carry its counts into another receiver's.
    pub fn forget_webhook(&self, webhook: &str) {
        for result in WebhookResult::ALL {
            self.webhooks
                .remove(&Metrics::webhook_labels(webhook, result));
        }
        self.webhook_queues.remove(&WebhookQueueLabels {
            webhook: webhook.to_owned(),
        });
    }

    pub fn set_webhook_queue(&self, webhook: &str, events: usize) {
        self.webhook_queues
            .get_or_create(&WebhookQueueLabels {
                webhook: webhook.to_owned(),
            })
            .set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// Shows the ends of the certificates now served, and only those: a file a reload
    /// stopped serving is forgotten, so that no alert fires for it. Only the controller calls
    /// this, at start and at reload; a scrape in between its steps may miss them for an
    /// instant.
    pub fn set_certificate_ends(&self, ends: &[crate::tls::CertificateEnd]) {
        self.certificate_ends.clear();
        for end in ends {
            let seconds = end
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.certificate_ends
                .get_or_create(&CertificateLabels {
                    file: end.file.display().to_string(),
                })
                .set(seconds);
        }
    }

    pub fn tls_failure(&self, reason: TlsFailure) {
        self.tls_failures[reason as usize].inc();
    }

    pub fn tls_handshake(&self, resumed: bool) {
        self.tls_handshakes[usize::from(resumed)].inc();
    }

    /// The count of failed accepts on `listener`, for its accept loop to move.
    pub fn accept_failures(&self, listener: Accepting) -> Counter {
        self.accept_failures[listener as usize].clone()
    }

    pub fn http2_goaway(&self, reason: Http2Goaway) {
        self.http2_goaways[reason as usize].inc();
    }

    pub fn http2_reset(&self, reason: Http2Reset) {
        self.http2_resets[reason as usize].inc();
    }

    /// Everything in the Prometheus text format 0.0.4, for the scrapers and tools that do not
    /// ask for OpenMetrics (`promtool check metrics`, agents that read the older format alone);
    /// serve it as `text/plain; version=0.0.4; charset=utf-8`. prometheus-client writes
    /// OpenMetrics only, and the two differ in the few ways `to_text_004` undoes.
    pub fn encode_text(&self) -> String {
        to_text_004(&self.encode())
    }

    /// Everything, in the OpenMetrics text format (`# EOF` included); serve it as
    /// `application/openmetrics-text; version=1.0.0; charset=utf-8`.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail; only a metric's own encoder could, and then the
        // truncated OpenMetrics text (no `# EOF`) makes the scrape fail visibly instead of
        // lying. The 0.0.4 text has no end marker to lose: such a failure is in the log.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Webhook deliveries, as the notifier reports them.
impl crate::notify::NotifyStats for Metrics {
    fn delivered(&self, webhook: &str) {
        self.webhook(webhook, WebhookResult::Delivered);
    }
    fn failed(&self, webhook: &str) {
        self.webhook(webhook, WebhookResult::Failed);
    }
    fn dropped(&self, webhook: &str) {
        self.webhook(webhook, WebhookResult::Dropped);
    }
    fn waiting(&self, webhook: &str, events: usize) {
        self.set_webhook_queue(webhook, events);
    }
    fn added(&self, webhook: &str) {
        self.add_webhook(webhook);
    }
    fn forget(&self, webhook: &str) {
        self.forget_webhook(webhook);
    }
    fn dropped_removed(&self) {
        self.webhook_removed_dropped.inc();
    }
}

/// Now, in whole Unix seconds (0 for a clock before 1970).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_failed_handshake_is_told_by_its_error() {
        use rustls::AlertDescription as A;
        let of = |e: rustls::Error| {
            TlsFailure::of(&std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        };
        assert_eq!(
            of(rustls::Error::AlertReceived(A::UnknownCA)),
            TlsFailure::Certificate
        );
        assert_eq!(
            of(rustls::Error::AlertReceived(A::CertificateExpired)),
            TlsFailure::Certificate
        );
        assert_eq!(
            of(rustls::Error::NoApplicationProtocol),
            TlsFailure::Protocol
        );
        assert_eq!(
            of(rustls::Error::AlertReceived(A::ProtocolVersion)),
            TlsFailure::Protocol
        );
        assert_eq!(of(rustls::Error::DecryptError), TlsFailure::Other);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(TlsFailure::of(&reset), TlsFailure::Other);
    }
    use std::collections::BTreeMap;

    /// One sample line of the text format: `name{k="v",...} value`.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    /// A small parser of the exposition text, strict enough to fail on malformed lines.
    pub(crate) fn parse(text: &str) -> Vec<Sample> {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match head.split_once('{') {
                None => (head.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    (name.to_owned(), parse_labels(body))
                }
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        samples
    }

    fn parse_labels(body: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        let mut chars = body.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "label value is quoted in {body:?}");
            let mut value = String::new();
            loop {
                match chars.next().expect("label value is closed") {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => panic!("dangling escape in {body:?}"),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.next() {
                None | Some(',') => {}
                Some(c) => panic!("unexpected {c:?} after a label in {body:?}"),
            }
        }
        labels
    }

    /// The value of the one sample named `name` with exactly `labels`.
    pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut found = samples
            .iter()
            .filter(|s| s.name == name && s.labels == want);
        let first = found.next()?;
        assert!(found.next().is_none(), "{name} {labels:?} appears twice");
        Some(first.value)
    }

    fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        value(samples, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn requests_by_outcome_and_mode() {
        let m = Metrics::new();
        m.request(Outcome::Forwarded, Mode::Normal, 200, MS);
        m.request(Outcome::Forwarded, Mode::Normal, 200, MS);
        m.request(Outcome::Held, Mode::Maintenance, 503, MS);
        m.request(Outcome::Bypassed, Mode::Maintenance, 200, MS);
        m.request(Outcome::Reserved, Mode::Outage, 200, MS);
        m.request(Outcome::Failed, Mode::Normal, 503, MS);
        let s = parse(&m.encode());

        let total = "intermission_requests_total";
        assert_eq!(
            get(&s, total, &[("outcome", "forwarded"), ("mode", "normal")]),
            2.0
        );
        assert_eq!(
            get(&s, total, &[("outcome", "held"), ("mode", "maintenance")]),
            1.0
        );
        assert_eq!(
            get(
                &s,
                total,
                &[("outcome", "bypassed"), ("mode", "maintenance")]
            ),
            1.0
        );
        assert_eq!(
            get(&s, total, &[("outcome", "reserved"), ("mode", "outage")]),
            1.0
        );
        assert_eq!(
            get(&s, total, &[("outcome", "failed"), ("mode", "normal")]),
            1.0
        );
        // Every combination exists from the start, at zero when nothing happened.
        assert_eq!(
            get(&s, total, &[("outcome", "held"), ("mode", "outage")]),
            0.0
        );
        assert_eq!(s.iter().filter(|x| x.name == total).count(), 18);
        // A request its client gave up on: no response, no duration.
        m.abandoned(Mode::Normal);
        let s = parse(&m.encode());
        assert_eq!(
            get(&s, total, &[("outcome", "abandoned"), ("mode", "normal")]),
            1.0
        );
        let classes: f64 = s
            .iter()
            .filter(|x| x.name == "intermission_responses_total")
            .map(|x| x.value)
            .sum();
        assert_eq!(classes, 6.0);
    }

    #[test]
    fn responses_by_status_class() {
        let m = Metrics::new();
        for status in [101, 200, 204, 301, 404, 429, 503, 600, 0] {
            m.request(Outcome::Forwarded, Mode::Normal, status, MS);
        }
        let s = parse(&m.encode());
        let class = |c| get(&s, "intermission_responses_total", &[("class", c)]);
        assert_eq!(
            [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx")
            ],
            [1.0, 2.0, 1.0, 2.0, 1.0]
        );
        assert_eq!(
            s.iter()
                .filter(|x| x.name == "intermission_responses_total")
                .count(),
            5,
            "codes without a class are not counted under an invented one"
        );
        let requests: f64 = s
            .iter()
            .filter(|x| x.name == "intermission_requests_total")
            .map(|x| x.value)
            .sum();
        assert_eq!(
            requests, 9.0,
            "every request is counted, whatever its status"
        );
    }

    #[test]
    fn request_duration_histogram() {
        let m = Metrics::new();
        let observed = [
            Duration::from_micros(100),
            Duration::from_millis(1), // on a bound: counted in that bucket (le means <=)
            Duration::from_millis(30),
            Duration::from_secs(20),
            Duration::from_secs(61), // above the last bound: only in +Inf
        ];
        for d in observed {
            m.request(Outcome::Forwarded, Mode::Normal, 200, d);
        }
        let s = parse(&m.encode());
        let name = "intermission_request_duration_seconds";
        assert_eq!(get(&s, &format!("{name}_count"), &[]), 5.0);
        let sum = get(&s, &format!("{name}_sum"), &[]);
        assert!((sum - 81.0311).abs() < 1e-9, "sum is {sum}");

        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter(|x| x.name == format!("{name}_bucket"))
            .map(|x| {
                let le = &x.labels["le"];
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le is a number")
                };
                (le, x.value)
            })
            .collect();
        assert_eq!(buckets.len(), BUCKETS_MICROS.len() + 1);
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "cumulative buckets never decrease: {buckets:?}"
        );
        let at = |le: f64| buckets.iter().find(|b| b.0 == le).map(|b| b.1);
        assert_eq!(at(0.0005), Some(1.0));
        assert_eq!(at(0.001), Some(2.0));
        assert_eq!(at(0.025), Some(2.0));
        assert_eq!(at(0.05), Some(3.0));
        assert_eq!(at(10.0), Some(3.0));
        assert_eq!(
            at(30.0),
            Some(4.0),
            "a slow server's 20 s has a bucket of its own"
        );
        assert_eq!(at(60.0), Some(4.0));
        assert_eq!(at(f64::INFINITY), Some(5.0), "+Inf equals the count");
    }

    /// A scrape during a switch sees one mode at 1, never two: three gauges set in turn let a
    /// scrape read the old mode's 1 and the new one's.
    #[test]
    fn a_scrape_never_sees_two_modes() {
        let m = Arc::new(Metrics::new());
        m.set_mode(Mode::Normal);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let switcher = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut switches = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for mode in [Mode::Maintenance, Mode::Outage, Mode::Normal] {
                        m.set_mode(mode);
                        switches += 1;
                    }
                }
                switches
            })
        };
        // How many scrapes saw no mode, one, two and three at 1.
        let mut seen = [0; 4];
        for _ in 0..3000 {
            let text = m.encode();
            let on = text
                .lines()
                .filter(|l| l.starts_with("intermission_mode{") && l.ends_with(" 1"))
                .count();
            seen[on.min(3)] += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let switches = switcher.join().unwrap();
        assert!(switches > 0);
        assert_eq!(seen, [0, 3000, 0, 0], "scrapes by the modes they saw at 1");
    }

    #[test]
    fn mode_is_one_hot_and_transitions_are_counted() {
        let m = Metrics::new();
        let s = parse(&m.encode());
        let modes = |s: &[Sample]| {
            ["normal", "maintenance", "outage"]
                .map(|mode| get(s, "intermission_mode", &[("mode", mode)]))
        };
        assert_eq!(modes(&s), [0.0, 0.0, 0.0], "unknown until the app says");

        m.set_mode(Mode::Normal);
        m.set_mode(Mode::Maintenance);
        m.mode_transition(Mode::Normal, Mode::Maintenance);
        assert_eq!(modes(&parse(&m.encode())), [0.0, 1.0, 0.0]);

        m.set_mode(Mode::Outage);
        m.mode_transition(Mode::Maintenance, Mode::Outage);
        m.mode_transition(Mode::Outage, Mode::Normal);
        m.mode_transition(Mode::Normal, Mode::Maintenance);
        m.mode_transition(Mode::Normal, Mode::Normal);
        let s = parse(&m.encode());
        assert_eq!(modes(&s), [0.0, 0.0, 1.0]);

        let t = |from, to| {
            get(
                &s,
                "intermission_mode_transitions_total",
                &[("from", from), ("to", to)],
            )
        };
        assert_eq!(t("normal", "maintenance"), 2.0);
        assert_eq!(t("maintenance", "outage"), 1.0);
        assert_eq!(t("outage", "normal"), 1.0);
        assert_eq!(t("maintenance", "normal"), 0.0);
        assert_eq!(
            s.iter()
                .filter(|x| x.name == "intermission_mode_transitions_total")
                .count(),
            6,
            "the six real transitions, never a mode to itself"
        );
    }

    #[test]
    fn control_plane_metrics() {
        let m = Metrics::new();
        m.set_upstream_health("10.0.0.1:3000", true);
        m.set_upstream_health("10.0.0.2:3000", true);
        m.set_upstream_health("10.0.0.2:3000", false);
        m.health_check("10.0.0.1:3000", true, Duration::from_millis(3));
        m.health_check("10.0.0.1:3000", true, Duration::from_millis(4));
        m.health_check("10.0.0.2:3000", false, Duration::from_secs(2));
        m.control_command("on", true);
        m.control_command("on", false);
        m.control_command("status", true);
        m.add_webhook("alerts");
        m.webhook("alerts", WebhookResult::Delivered);
        m.webhook("alerts", WebhookResult::Delivered);
        m.webhook("alerts", WebhookResult::Dropped);
        let s = parse(&m.encode());

        let up = |server| get(&s, "intermission_upstream_healthy", &[("server", server)]);
        assert_eq!((up("10.0.0.1:3000"), up("10.0.0.2:3000")), (1.0, 0.0));

        let checks = |server, result| {
            get(
                &s,
                "intermission_health_checks_total",
                &[("server", server), ("result", result)],
            )
        };
        assert_eq!(checks("10.0.0.1:3000", "ok"), 2.0);
        assert_eq!(checks("10.0.0.1:3000", "fail"), 0.0);
        assert_eq!(checks("10.0.0.2:3000", "fail"), 1.0);
        let hc = "intermission_health_check_duration_seconds";
        let server1 = [("server", "10.0.0.1:3000")];
        assert_eq!(get(&s, &format!("{hc}_count"), &server1), 2.0);
        assert!((get(&s, &format!("{hc}_sum"), &server1) - 0.007).abs() < 1e-9);
        assert_eq!(
            get(
                &s,
                &format!("{hc}_bucket"),
                &[("server", "10.0.0.2:3000"), ("le", "1.0")]
            ),
            0.0
        );
        assert_eq!(
            get(
                &s,
                &format!("{hc}_bucket"),
                &[("server", "10.0.0.2:3000"), ("le", "2.5")]
            ),
            1.0
        );

        let cmd = |command, result| {
            get(
                &s,
                "intermission_control_commands_total",
                &[("command", command), ("result", result)],
            )
        };
        assert_eq!(
            (cmd("on", "ok"), cmd("on", "fail"), cmd("status", "ok")),
            (1.0, 1.0, 1.0)
        );
        assert_eq!(cmd("status", "fail"), 0.0);

        let hook = |result| {
            get(
                &s,
                "intermission_webhook_deliveries_total",
                &[("webhook", "alerts"), ("result", result)],
            )
        };
        assert_eq!(
            (hook("delivered"), hook("failed"), hook("dropped")),
            (2.0, 0.0, 1.0)
        );

        assert_eq!(
            get(
                &s,
                "intermission_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
    }

    /// A failed control command shows as an increase from 0, its first one too.
    #[test]
    fn every_control_command_is_shown_at_zero_from_the_start() {
        let s = parse(&Metrics::new().encode());
        for command in crate::control::protocol::COMMANDS
            .iter()
            .chain(&["unknown"])
        {
            for result in ["ok", "fail"] {
                assert_eq!(
                    value(
                        &s,
                        "intermission_control_commands_total",
                        &[("command", command), ("result", result)]
                    ),
                    Some(0.0),
                    "{command} {result}"
                );
            }
        }
    }

    /// Each webhook's deliveries and queue under its own label; a forgotten webhook's series
    /// are gone from the text, and one added again starts from zero.
    #[test]
    fn notifier_reports_into_each_webhooks_series() {
        let m = Arc::new(Metrics::new());
        let stats: Arc<dyn crate::notify::NotifyStats> = m.clone();
        stats.added("alerts");
        stats.added("0");
        stats.delivered("alerts");
        stats.failed("0");
        stats.failed("0");
        stats.dropped("alerts");
        stats.waiting("0", 3);
        let s = parse(&m.encode());
        let hook = |s: &[Sample], webhook, result| {
            value(
                s,
                "intermission_webhook_deliveries_total",
                &[("webhook", webhook), ("result", result)],
            )
        };
        let queue = |s: &[Sample], webhook| {
            value(
                s,
                "intermission_webhook_queue_length",
                &[("webhook", webhook)],
            )
        };
        assert_eq!(
            ["delivered", "failed", "dropped"].map(|r| hook(&s, "alerts", r)),
            [Some(1.0), Some(0.0), Some(1.0)]
        );
        assert_eq!(
            ["delivered", "failed", "dropped"].map(|r| hook(&s, "0", r)),
            [Some(0.0), Some(2.0), Some(0.0)]
        );
        assert_eq!(
            (queue(&s, "alerts"), queue(&s, "0")),
            (Some(0.0), Some(3.0))
        );

        stats.forget("0");
        let s = parse(&m.encode());
        assert!(
            !s.iter()
                .any(|x| x.labels.get("webhook").map(String::as_str) == Some("0")),
            "{s:?}"
        );
        assert_eq!(hook(&s, "alerts", "delivered"), Some(1.0));
        stats.added("0");
        let s = parse(&m.encode());
        assert_eq!(hook(&s, "0", "failed"), Some(0.0));
        assert_eq!(queue(&s, "0"), Some(0.0));
    }

    /// The HELP texts are what a scraper's user reads of a label: one that left out
    /// `abandoned`, and another that put the flood allowance at 1 MiB where the proxy allows
    /// 8, told a different story from the README and from what the proxy does.
    #[test]
    fn help_texts_name_every_outcome_and_the_flood_allowance() {
        let text = Metrics::new().encode();
        let help = |family: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("# HELP {family} ")))
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let requests = help("intermission_requests");
        for outcome in Outcome::ALL {
            assert!(
                requests.contains(outcome.as_str()),
                "{outcome:?}: {requests}"
            );
        }
        let mib = crate::flood::ALLOWANCE / (1024 * 1024);
        let goaways = help("intermission_http2_client_goaways");
        assert!(goaways.contains(&format!("past {mib} MiB")), "{goaways}");
    }

    #[test]
    fn every_metric_is_documented_and_the_text_is_complete() {
        let m = Metrics::new();
        m.set_upstream_health("a:1", true);
        m.health_check("a:1", true, MS);
        m.control_command("status", true);
        m.add_webhook("0");
        let text = m.encode();
        for family in [
            "intermission_requests",
            "intermission_responses",
            "intermission_request_duration_seconds",
            "intermission_mode",
            "intermission_mode_transitions",
            "intermission_upstream_healthy",
            "intermission_health_checks",
            "intermission_health_check_duration_seconds",
            "intermission_control_commands",
            "intermission_webhook_deliveries",
            "intermission_webhook_queue_length",
            "intermission_webhook_removed_dropped",
            "intermission_http2_client_goaways",
            "intermission_http2_client_stream_resets",
            "intermission_accept_failures",
            "intermission_parked_connections",
            "intermission_config_last_reload_successful",
            "intermission_config_last_reload_success_timestamp_seconds",
            "intermission_client_connections",
            "intermission_client_connection_limit_reached",
            "intermission_client_connections_closed_for_room",
            "intermission_upstream_connections",
            "intermission_upstream_connection_limit",
            "intermission_upstream_connection_limit_reached",
            "intermission_tunnels_open",
            "intermission_tunnel_limit_reached",
            "intermission_build",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("# HELP {family} ")) && l.len() > 30),
                "{family} has no HELP text"
            );
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("# TYPE {family} "))),
                "{family} has no TYPE"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// The 0.0.4 text holds each family as that format's readers (promtool, the Go and Python
    /// parsers) demand it: `# HELP` then `# TYPE` naming the samples that follow (counters
    /// with `_total`, histograms by their `_bucket`, `_sum`, `_count`), only the types 0.0.4
    /// knows, no `# UNIT` and no `# EOF`; and the samples are the OpenMetrics text's.
    #[test]
    fn the_text_format_0_0_4_names_each_family_as_its_samples() {
        let m = Metrics::new();
        m.set_upstream_health("a:1", true);
        m.health_check("a:1", true, MS);
        m.request(Outcome::Held, Mode::Maintenance, 503, MS);
        let (open, text) = (m.encode(), m.encode_text());
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&open), samples(&text));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let mut family: Option<(String, String)> = None;
        let mut help: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, words) = rest.split_once(' ').unwrap();
                assert!(!words.contains('\\'), "{line}");
                help = Some(name.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(help.as_deref(), Some(name), "HELP before {line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(seen.insert(name.to_owned()), "{name} twice");
                family = Some((name.to_owned(), kind.to_owned()));
            } else {
                let (name, kind) = family.as_ref().expect("a sample before any TYPE");
                let sample = line.split(['{', ' ']).next().unwrap();
                let belongs = match kind.as_str() {
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| sample.strip_suffix(s) == Some(name)),
                    _ => sample == name,
                };
                assert!(belongs, "{sample} under # TYPE {name} {kind}");
            }
        }
        for expected in [
            "# TYPE intermission_requests_total counter",
            "# TYPE intermission_build_info gauge",
            "# TYPE intermission_request_duration_seconds histogram",
            "# TYPE intermission_mode gauge",
        ] {
            assert!(text.lines().any(|l| l == expected), "{expected}: {text}");
        }
    }

    #[test]
    fn concurrent_requests_give_exact_totals() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 20_000;
        let m = Arc::new(Metrics::new());
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let outcome = if t % 2 == 0 {
                        Outcome::Forwarded
                    } else {
                        Outcome::Held
                    };
                    for i in 0..PER_THREAD {
                        let d = Duration::from_micros((i % 3) as u64 * 1000);
                        m.request(outcome, Mode::Normal, 200, d);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("worker thread");
        }
        let s = parse(&m.encode());
        let half = (THREADS / 2 * PER_THREAD) as f64;
        let total = "intermission_requests_total";
        assert_eq!(
            get(&s, total, &[("outcome", "forwarded"), ("mode", "normal")]),
            half
        );
        assert_eq!(
            get(&s, total, &[("outcome", "held"), ("mode", "normal")]),
            half
        );
        let all = (THREADS * PER_THREAD) as f64;
        assert_eq!(
            get(&s, "intermission_responses_total", &[("class", "2xx")]),
            all
        );
        let name = "intermission_request_duration_seconds";
        assert_eq!(get(&s, &format!("{name}_count"), &[]), all);
        // Per thread, i % 3 cycles 0, 1, 2 ms: 0 + 1 + 2 ms per three requests.
        let per_thread_micros: u64 = (0..PER_THREAD as u64).map(|i| (i % 3) * 1000).sum();
        let expected_sum = (per_thread_micros * THREADS as u64) as f64 / 1e6;
        assert!((get(&s, &format!("{name}_sum"), &[]) - expected_sum).abs() < 1e-6);
    }
}
