//! `Snapshot`: everything a request needs, swapped whole so no request sees half a change.
//!
//! Requests `load()` once and decide everything from that one `Arc`. Only the controller
//! builds and stores new ones; building renders every holding response, so serving one is
//! choosing bytes.

use super::marks::Marks;
use super::mode::{Mode, Persisted};
use crate::config::{Config, Protocol};
use crate::forward::pool::UpstreamPool;
use crate::forward::sockets::Sockets;
use crate::health::Passive;
use crate::hold::bypass::BypassKey;
use crate::hold::held::{self, Held, Spliced, View};
use crate::hold::pages::Pages;
use crate::listener::ConnBuilder;
use crate::metrics::Metrics;
use crate::tls::TlsError;
use arc_swap::ArcSwap;
use bytes::Bytes;
use std::sync::Arc;
use std::time::SystemTime;

pub struct Snapshot {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Protocol settings for new client connections.
    pub conn: Arc<ConnBuilder>,
    /// TLS settings for new TLS connections (certificates by SNI).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub pool: Arc<UpstreamPool>,
    pub pages: Arc<Pages>,
    pub bypass: Option<Arc<BypassKey>>,
    pub mode: Mode,
    /// The holding responses; `Some` exactly when `mode` is not `normal`.
    pub held: Option<Held>,
    /// Whether plain requests may be forwarded without hyper (`crate::relay`): nothing is
    /// held, and no setting asks for hyper's path (`intercept_statuses`, an `h2c://` server).
    /// Decided here, not per request; `redirect_https`, which concerns plaintext only, and
    /// whether every `https://` server is known to choose HTTP/1.1, are the relay's to check.
    pub relay: bool,
    /// The outage holding responses, ready in every mode for a request that cannot be
    /// forwarded ("never a raw error").
    pub outage: Held,
    /// Which upstream servers are healthy, by index in `pool.servers`.
    pub up: Arc<[bool]>,
    /// Where to report a failed forward, by server index.
    pub passive: Arc<[Passive]>,
    /// The servers taken out since, for a request still waiting for its answer.
    pub marks: Arc<Marks>,
    /// The public status document.
    pub status: Spliced,
    /// The pages as they would be shown now, by mode, for `{prefix}preview`.
    pub preview_maintenance: Vec<Bytes>,
    pub preview_outage: Vec<Bytes>,
}

/// The long-lived parts a snapshot is made of; they change only on reload.
#[derive(Clone)]
pub struct Parts {
    pub config: Arc<Config>,
    /// Lives as long as the process: counters survive reloads.
    pub metrics: Arc<Metrics>,
    pub conn: Arc<ConnBuilder>,
    /// The TLS listeners' settings (`None` without certificates), and when each certificate
    /// ends.
    pub tls: crate::tls::ServerTls,
    pub pool: Arc<UpstreamPool>,
    /// The bound on upstream sockets, which lives as long as the process: the sockets of a
    /// pool a reload replaced stay counted until they close.
    pub sockets: Sockets,
    pub pages: Arc<Pages>,
    pub bypass: Option<Arc<BypassKey>>,
    /// Lives as long as the process: a request that waits across a reload still hears of its
    /// server being taken out.
    pub marks: Arc<Marks>,
}

impl Parts {
    /// Parts for `config`, keeping `previous`'s connection pool when the upstream settings did
    /// not change, so that a reload does not drop warm connections.
    /// Fails when a certificate, key or CA file does not load. What clients would refuse
    /// of the certificates although they load is logged.
    pub fn new(
        config: Arc<Config>,
        pages: Arc<Pages>,
        previous: Option<&Parts>,
        metrics: Arc<Metrics>,
    ) -> Result<Parts, TlsError> {
        let (parts, warnings) = Parts::checked(config, pages, previous, metrics)?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        Ok(parts)
    }

    /// `new`, with what clients would refuse of the certificates although they load
    /// (`tls::server_config_checked`) returned for the caller to say, to the log and to
    /// whoever asked for a reload.
    pub fn checked(
        config: Arc<Config>,
        pages: Arc<Pages>,
        previous: Option<&Parts>,
        metrics: Arc<Metrics>,
    ) -> Result<(Parts, Vec<String>), TlsError> {
        // The workers are counted once, at start: `threads = 0` follows the cores available,
        // which may change while the proxy runs, and a reload cannot add workers.
        let workers = previous.map_or_else(
            || crate::workers::count(config.proxy.threads),
            |prev| prev.pool.workers(),
        );
        // Sized at start from the open-file limit then in force (raised by `main` already);
        // a reload that changes `proxy.max_connections` resizes it once in force
        // (`Controller::apply_reload`).
        let sockets = previous.map_or_else(
            || {
                let limit = crate::limits::open_files();
                let bound = limit.map(|limit| {
                    crate::limits::upstream_sockets(limit, config.proxy.max_connections)
                });
                if bound.is_none() {
                    tracing::info!(
                        "the open-file limit cannot be read: connections to the servers are not bounded"
                    );
                }
                Sockets::new(bound, metrics.sockets())
            },
            |prev| prev.sockets.clone(),
        );
        let pool = match previous {
            Some(prev) if prev.pool.same_config(&config.upstream) => prev.pool.clone(),
            _ => Arc::new(UpstreamPool::new(&config.upstream, workers, &sockets)?),
        };
        let (tls, warnings) = crate::tls::server_config_checked(
            &config.tls,
            std::time::SystemTime::now(),
            previous.map(|prev| &prev.tls),
        )?;
        let marks = previous.map_or_else(Arc::default, |prev| prev.marks.clone());
        let m = &config.maintenance;
        // The key's derivation is deliberately slow: a reload that keeps the secret keeps it.
        let bypass = match previous.and_then(|prev| prev.bypass.as_ref()) {
            Some(key) if key.same(&m.bypass_secret, m.bypass_ttl) => Some(key.clone()),
            _ => BypassKey::new(&m.bypass_secret, m.bypass_ttl).map(Arc::new),
        };
        let parts = Parts {
            metrics,
            conn: Arc::new(crate::listener::conn_builder(&config.proxy)),
            tls,
            config,
            pool,
            sockets,
            pages,
            bypass,
            marks,
        };
        Ok((parts, warnings))
    }
}

/// The dynamic inputs: what operators decided and what health checks see.
pub struct Inputs<'a> {
    pub state: &'a Persisted,
    pub up: &'a [bool],
    pub passive: Arc<[Passive]>,
    pub outage_since: Option<SystemTime>,
    pub now: SystemTime,
}

impl Snapshot {
    /// The `Strict-Transport-Security` an answer on a connection carries: configured, and over
    /// TLS only (RFC 6797 §7.2: never over plaintext, where anyone on the path could forge it).
    #[inline]
    pub fn hsts(&self, tls: bool) -> Option<&crate::config::Hsts> {
        match tls {
            true => self.config.tls.hsts.as_ref(),
            false => None,
        }
    }

    pub fn build(parts: &Parts, inputs: &Inputs<'_>) -> Snapshot {
        let m = &parts.config.maintenance;
        let prefix = m.reserved_prefix.as_str();
        let healthy = inputs.up.iter().any(|&u| u);
        let mode = inputs.state.mode(healthy, inputs.now);
        let current = View::new(mode, inputs.state, m, inputs.outage_since, inputs.now);
        let status = held::status_json(&current);
        // A preview of the mode in force shows exactly what clients get; a preview of another
        // mode shows that mode's page as it would start now: its configured message, no timeline.
        let preview = |of: Mode| {
            if of == mode {
                return held::render_pages(&parts.pages, &current, prefix, inputs.now);
            }
            let mut v = View::new(of, &Persisted::default(), m, Some(inputs.now), inputs.now);
            v.since = Some(inputs.now);
            held::render_pages(&parts.pages, &v, prefix, inputs.now)
        };
        let preview_maintenance = preview(Mode::Maintenance);
        let preview_outage = preview(Mode::Outage);
        // The answer to a failed forward while no outage is in force says no start: that of
        // this snapshot was the last change of state, hours or days before the failure, and
        // the page said "Started" then, the JSON forms `since` so, of a failure just met.
        let outage_view = View::new(
            Mode::Outage,
            inputs.state,
            m,
            inputs.outage_since,
            inputs.now,
        );
        let outage = Held::new(&parts.pages, outage_view, prefix, inputs.now);
        // Only held requests are written from their encoding (`crate::fast`); the outage
        // answer to a failed forward goes through hyper.
        let held = (mode != Mode::Normal)
            .then(|| Held::new(&parts.pages, current, prefix, inputs.now).with_encodings());
        let c = &parts.config;
        // `redirect_https` is checked per connection (`relay::request`): TLS is relayed.
        let relay = held.is_none()
            && c.upstream.intercept_statuses.is_empty()
            && parts
                .pool
                .servers
                .iter()
                // `https://` ones too, once known to choose HTTP/1.1 (`UpstreamPool::relayable`).
                .all(|s| matches!(s.protocol, Protocol::Http | Protocol::Https));
        Snapshot {
            config: parts.config.clone(),
            metrics: parts.metrics.clone(),
            conn: parts.conn.clone(),
            tls: parts.tls.config.clone(),
            pool: parts.pool.clone(),
            pages: parts.pages.clone(),
            bypass: parts.bypass.clone(),
            mode,
            held,
            relay,
            outage,
            up: inputs.up.into(),
            passive: inputs.passive.clone(),
            marks: parts.marks.clone(),
            status,
            preview_maintenance,
            preview_outage,
        }
    }
}

/// A cheap, cloneable handle on the current snapshot.
#[derive(Clone)]
pub struct StateHandle(Arc<ArcSwap<Snapshot>>);

impl StateHandle {
    pub fn new(snapshot: Snapshot) -> StateHandle {
        StateHandle(Arc::new(ArcSwap::from_pointee(snapshot)))
    }

    /// The current snapshot; hold it for the whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    /// Only the controller calls this.
    pub fn store(&self, snapshot: Snapshot) {
        self.0.store(Arc::new(snapshot));
    }
}

/// A snapshot built from the config text `toml`, with maintenance on (`hold`) or off and every
/// server healthy, for unit tests of what reads one.
#[cfg(test)]
pub(crate) fn for_tests(toml: &str, hold: bool) -> Snapshot {
    for_tests_until(toml, hold, None)
}

/// `for_tests`, maintenance announced to end at `until`.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn for_tests_until(
    toml: &str,
    hold: bool,
    until: Option<std::time::SystemTime>,
) -> Snapshot {
    use crate::state::mode::{Change, Persisted};
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::Config::parse(toml, dir.path(), None).unwrap();
    let pages = crate::hold::pages::Pages::load(&config.maintenance).unwrap();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let parts = Parts::new(Arc::new(config), Arc::new(pages), None, metrics).unwrap();
    let now = std::time::SystemTime::now();
    let mut state = Persisted::default();
    if hold {
        let on = Change::On {
            message: Some("Back soon".into()),
            until: until.map(Some),
            retry_after: None,
            reason: None,
            by: "test".into(),
        };
        state = state.apply(on, now, true).unwrap();
    }
    let up = vec![true; parts.config.upstream.servers.len()];
    let inputs = Inputs {
        state: &state,
        up: &up,
        passive: Arc::from(Vec::new()),
        outage_since: None,
        now,
    };
    Snapshot::build(&parts, &inputs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parts(toml: &str, previous: Option<&Parts>) -> Parts {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::parse(toml, dir.path(), None).unwrap();
        let pages = crate::hold::pages::Pages::load(&config.maintenance).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        Parts::new(Arc::new(config), Arc::new(pages), previous, metrics).unwrap()
    }

    /// The bypass key's derivation is slow on purpose: a reload keeping the secret and its
    /// ttl keeps the key, and one changing either builds a new one.
    #[test]
    fn a_reload_keeps_the_bypass_key_while_its_secret_stays() {
        let a = "[maintenance]\nbypass_secret = \"first-secret-0123456789\"\n";
        let first = parts(a, None);
        let kept = parts(&format!("{a}message = \"other\"\n"), Some(&first));
        let (k1, k2) = (
            first.bypass.as_ref().unwrap(),
            kept.bypass.as_ref().unwrap(),
        );
        assert!(Arc::ptr_eq(k1, k2), "the same secret derived again");

        let other = parts(
            "[maintenance]\nbypass_secret = \"second-secret-0123456789\"\n",
            Some(&kept),
        );
        assert!(!Arc::ptr_eq(k2, other.bypass.as_ref().unwrap()));
        let ttl = parts(&format!("{a}bypass_ttl = \"1h\"\n"), Some(&kept));
        assert!(!Arc::ptr_eq(k2, ttl.bypass.as_ref().unwrap()));
        assert!(parts("", Some(&kept)).bypass.is_none());
    }
}
