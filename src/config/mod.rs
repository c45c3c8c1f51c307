//! The validated configuration: real types, every problem named by its key.
//!
//! Loading is two layers (DESIGN habit 2): `file` mirrors the TOML with serde, and this module
//! checks every value, collecting all problems instead of stopping at the first, so that
//! `intermission check` can list them at once. A `Config` that exists is valid.

mod error;
pub mod file;

pub use error::{ConfigError, Problem};

use crate::state::mode::{MAX_RETRY_AFTER, MIN_RETRY_AFTER};
use file::DurationText;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config file used when `-c` is not given.
pub const DEFAULT_PATH: &str = "config.toml";

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from, if any.
    pub source: Option<PathBuf>,
    /// The file a reload reads: `source`, or `./config.toml` for a proxy that found none
    /// there at start and runs on the built-in defaults, so that writing one and reloading
    /// works as a start would.
    pub reload_from: Option<PathBuf>,
    pub proxy: ProxyConfig,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub health: HealthConfig,
    pub maintenance: MaintenanceConfig,
    pub control: ControlConfig,
    pub admin: AdminConfig,
    pub notify: Vec<crate::notify::Target>,
    pub log: LogConfig,
    /// The sections the file writes (`proxy`, `notify`…), for a reload to say which of those
    /// in force a new file no longer has.
    pub sections: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz`; `None`: no admin listener.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthKind {
    /// `GET path`; healthy when the status is in `expect`.
    Http,
    /// A TCP connect succeeds.
    Tcp,
    /// `grpc.health.v1.Health/Check` answers SERVING (HTTP/2: `h2c://` or `https://`).
    Grpc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    /// How often a server taken out is checked (at most `interval`): one back after a restart
    /// is found within `rise` of these, not `rise` intervals of outage answers.
    pub down_interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Inclusive status ranges that count as healthy.
    pub expect: Vec<(u16, u16)>,
    /// The `Host` an HTTP check names (`None`: the server's own `host:port`), for an
    /// application that answers only the names it serves (Django's `ALLOWED_HOSTS`, a
    /// virtual host): its checks failed and took the whole site into `outage`.
    pub host: Option<http::HeaderValue>,
}

impl HealthConfig {
    pub fn expects(&self, status: u16) -> bool {
        self.expect
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

#[derive(Debug, Clone)]
pub struct MaintenanceConfig {
    /// Where the page templates come from.
    pub pages: PagesSource,
    pub message: String,
    pub outage_message: String,
    pub retry_after: Duration,
    pub outage_retry_after: Duration,
    pub status_page: String,
    pub api_prefixes: Vec<String>,
    /// Origins whose scripts may read intermission's own answers (`hold::cors`): `*`, or
    /// origins as browsers send them.
    pub cors_origins: Vec<String>,
    pub allow_paths: Vec<String>,
    pub allow_ips: Vec<IpNet>,
    pub bypass_secret: String,
    pub bypass_ttl: Duration,
    pub reserved_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagesSource {
    /// A folder on disk (named in the config, or `pages` beside it).
    Folder(PathBuf),
    /// The pages compiled into the binary (no `pages` key and no `pages` folder).
    BuiltIn,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub state_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: Vec<SocketAddr>,
    pub threads: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub header_read_timeout: Duration,
    /// How long a client may take nothing of an answer before its connection is closed
    /// (`None`: no limit).
    pub send_timeout: Option<Duration>,
    /// How long a request body may send nothing while the server waits for it before the
    /// client gets 408 (`None`: no limit).
    pub body_read_timeout: Option<Duration>,
    pub shutdown_timeout: Duration,
    pub max_header_bytes: usize,
    /// Client connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Connections not yet past their first request (a TLS handshake, a request head still
    /// arriving) one client address may have open at once, an IPv6 one counted by its /64;
    /// more are closed at accept (`pending`). 0: no such cap.
    pub max_pending_per_client: usize,
    /// Plaintext requests get a 308 to HTTPS (except reserved paths and `allow_paths`).
    pub redirect_https: bool,
    /// The port the redirect names: the public HTTPS port, when it differs from the first
    /// `tls.listen` port (port mapping, a load balancer in front).
    pub https_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    /// The first is the default when SNI names none of them.
    pub certificates: Vec<CertificatePaths>,
    /// The `Strict-Transport-Security` every answer over TLS carries (`tls.hsts_*`).
    pub hsts: Option<Hsts>,
}

/// A `Strict-Transport-Security` header, rendered once from the config: an answer over TLS
/// adds one ready value (hyper's paths) or line (the writers without hyper), and allocates
/// nothing for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsts {
    value: http::HeaderValue,
    /// `strict-transport-security: {value}\r\n`.
    line: Box<[u8]>,
    /// `; preload`: asks to be on the browsers' preload list, which has conditions of its own.
    preload: bool,
}

/// hstspreload.org's least `max-age` for a site on the preload list, and the most taken here:
/// what it and Mozilla recommend. Longer is a slip of units (`"63072000m"`, `"730w"`), and
/// Chrome keeps an HSTS host a year at most whatever it is told.
const HSTS_PRELOAD_MIN: Duration = Duration::from_secs(365 * 86400);
const HSTS_MAX: Duration = Duration::from_secs(2 * 365 * 86400);

impl Hsts {
    fn new(max_age: u64, include_subdomains: bool, preload: bool) -> Option<Hsts> {
        let mut text = format!("max-age={max_age}");
        if include_subdomains {
            text.push_str("; includeSubDomains");
        }
        if preload {
            text.push_str("; preload");
        }
        let value = http::HeaderValue::from_str(&text).ok()?;
        let line = format!("strict-transport-security: {text}\r\n");
        Some(Hsts {
            value,
            line: line.into_bytes().into_boxed_slice(),
            preload,
        })
    }

    pub fn value(&self) -> &http::HeaderValue {
        &self.value
    }

    /// The header's line, ending in CRLF, for an HTTP/1.1 head written without hyper.
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// Adds the header to an answer that has none: the application's own is kept as it is.
    pub fn add_to(&self, headers: &mut http::HeaderMap) {
        if let http::header::Entry::Vacant(e) =
            headers.entry(http::header::STRICT_TRANSPORT_SECURITY)
        {
            e.insert(self.value.clone());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatePaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ProxyConfig {
    /// Whether headers such as `X-Forwarded-For` from this peer are believed.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        let peer = canonical_ip(peer);
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }
}

/// An IPv4 peer that arrives on a dual-stack socket as `::ffff:a.b.c.d` is matched as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A net of IPv4-mapped addresses (`::ffff:10.0.0.0/104`, `::ffff:10.0.0.1`) as the IPv4 net
/// it is: peers are matched as IPv4 (`canonical_ip`), so that as written it matched nobody,
/// while the access log named an IPv4 client of a dual-stack listener that way.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        // The address as written, host bits and all, for `warnings` to find them.
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, IpNet::V4),
        other => other,
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub servers: Vec<Upstream>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// The longest wait for more of a response body once its head has come; `None` (`"0"`)
    /// waits as long as the server likes.
    pub read_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    /// Upstream answers with these statuses become the outage holding response.
    pub intercept_statuses: Vec<u16>,
    /// Roots for `https://` servers instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from `https://` servers. Dangerous; for tests and labs.
    pub danger_accept_invalid_certs: bool,
}

/// How a server is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `http://`: HTTP/1.1.
    Http,
    /// `https://`: TLS, HTTP/2 when the server offers it by ALPN, else HTTP/1.1.
    Https,
    /// `h2c://`: HTTP/2 with prior knowledge, in cleartext (gRPC servers).
    H2c,
}

/// One upstream server, ready to be put into request URIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub protocol: Protocol,
    /// The scheme of request URIs (`h2c` servers are `http`).
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

impl Upstream {
    /// What makes two entries one server: the protocol, the host in any case, and the port,
    /// its scheme's default when none is written.
    fn identity(&self) -> (Protocol, String, u16) {
        let default = match self.protocol {
            Protocol::Https => 443,
            Protocol::Http | Protocol::H2c => 80,
        };
        // An address in any of its spellings (`[::1]`, `[0:0::1]`), a name in any case and
        // with or without its final dot.
        let host = self.authority.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let host = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => host.trim_end_matches('.').to_ascii_lowercase(),
        };
        (
            self.protocol,
            host,
            self.authority.port_u16().unwrap_or(default),
        )
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.protocol {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::H2c => "h2c",
        };
        write!(f, "{scheme}://{}", self.authority)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub access_log: bool,
    pub level: String,
}

impl Config {
    /// Loads the config the CLI names. `None` means `./config.toml` if it exists, else the
    /// built-in defaults; a path that was named explicitly must exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Self::load_file(p),
            None => Self::load_default(Path::new(DEFAULT_PATH)),
        }
    }

    /// `default` if it exists, else the built-in defaults, which a reload will look for
    /// `default` again to replace.
    fn load_default(default: &Path) -> Result<Config, ConfigError> {
        // A link to nothing is a config file gone astray (its release folder cleaned up), not
        // one never written: `exists()` follows it, and the proxy started, and `check` said
        // OK, on the built-in defaults (127.0.0.1:8080, an application on 127.0.0.1:3000).
        if std::fs::symlink_metadata(default).is_ok() {
            return Self::load_file(default);
        }
        let mut defaults = Self::parse("", Path::new("."), None)?;
        defaults.reload_from = Some(default.to_path_buf());
        Ok(defaults)
    }

    /// What is valid but likely not meant, said by `check` after its summary and logged at
    /// start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let mode = self.control.socket_mode;
        if mode & 0o002 != 0 {
            warnings.push(format!(
                "control.socket_mode \"{mode:04o}\" lets every local user connect to the \
                 control socket, and so switch maintenance on and off; use \"0600\", or \
                 \"0660\" and a group for the operators"
            ));
        }
        // Both valid: `allow_ips` a way to open the site for a test, `trusted_proxies` written
        // behind a balancer that alone reaches the proxy (a Kubernetes ingress, nginx's
        // `set_real_ip_from 0.0.0.0/0`); refusing them would stop a config that ran yesterday.
        for (i, net, family) in whole_families(&self.maintenance.allow_ips) {
            warnings.push(format!(
                "maintenance.allow_ips[{i}] \"{net}\" lets every {family} client through \
                 to the application in every mode: maintenance holds none of them; name \
                 the team's addresses instead"
            ));
        }
        // Valid as `allow_ips = ["0.0.0.0/0"]` is (a way to open the site), and as likely a
        // slip: maintenance then holds nothing but requests whose path no server should read.
        let reserved = self.maintenance.reserved_prefix.as_str();
        for (i, prefix) in self.maintenance.allow_paths.iter().enumerate() {
            if prefix == "/" {
                warnings.push(format!(
                    "maintenance.allow_paths[{i}] \"/\" lets every request through to the \
                     application in every mode (but those whose path has a dot segment or an \
                     unusual escape): maintenance holds almost nothing; name the paths meant, \
                     like \"/.well-known/acme-challenge/\""
                ));
            } else if prefix.starts_with(reserved) {
                // Reserved paths are answered before `allow_paths` is looked at.
                warnings.push(format!(
                    "maintenance.allow_paths[{i}] {prefix:?} is under \
                     maintenance.reserved_prefix {reserved:?}, whose paths the proxy answers \
                     itself and never forwards: it lets nothing through"
                ));
            }
        }
        // Valid, and the proxy then answers that part of the application itself, in every mode
        // and before anything else; "/" alone (every path an API path) is no collision, and
        // leaves no reserved_prefix to choose without this warning.
        for (i, api) in self.maintenance.api_prefixes.iter().enumerate() {
            if reserved.starts_with(api.as_str()) && api != "/" && api != reserved {
                warnings.push(format!(
                    "maintenance.reserved_prefix {reserved:?} is under \
                     maintenance.api_prefixes[{i}] {api:?}: the proxy answers every path under \
                     {reserved:?} itself, in every mode, and never forwards one, so that part of \
                     the application's API is never reached; give reserved_prefix a path the \
                     application does not use (the default is \"/_intermission/\")"
                ));
            } else if api.starts_with(reserved) {
                let place = if api == reserved {
                    "is maintenance.reserved_prefix itself".to_owned()
                } else {
                    format!("is under maintenance.reserved_prefix {reserved:?}")
                };
                warnings.push(format!(
                    "maintenance.api_prefixes[{i}] {api:?} {place}: the proxy answers every \
                     path there itself, in every mode, and never forwards one, so the \
                     application's API there is never reached; give reserved_prefix a path \
                     the application does not use (the default is \"/_intermission/\")"
                ));
            }
        }
        for (i, net, family) in whole_families(&self.proxy.trusted_proxies) {
            warnings.push(format!(
                "proxy.trusted_proxies[{i}] \"{net}\" trusts every {family} client as a \
                 proxy: any of them can write an address of maintenance.allow_ips into \
                 X-Forwarded-For or Forwarded and be let through in every mode, be logged \
                 as any address, send X-Forwarded-Proto, X-Original-URL and the like on to \
                 the application, and is not bounded by proxy.max_pending_per_client; name \
                 the load balancer's addresses (or its subnet) instead"
            ));
        }
        // Read by an HTTP check alone, as `host` is (refused with another kind); these two were
        // taken without a word, and an operator who set them believed the checks looked at
        // the page. Not refused: a config that ran yesterday still starts.
        let unread = match self.health.kind {
            HealthKind::Http => None,
            HealthKind::Tcp => Some(("tcp", "only connects")),
            HealthKind::Grpc => Some(("grpc", "asks grpc.health.v1.Health/Check")),
        };
        if let Some((kind, what)) = unread {
            let defaults = file::HealthFile::default();
            if self.health.path.as_str() != defaults.path {
                warnings.push(format!(
                    "health.path {:?} is set, but health.kind = \"{kind}\" {what} and never \
                     requests it: only kind = \"http\" checks do; set kind = \"http\" to check \
                     that page, or leave health.path out",
                    self.health.path.as_str()
                ));
            }
            if parse_status_ranges(&defaults.expect).is_ok_and(|d| d != self.health.expect) {
                warnings.push(format!(
                    "health.expect is set, but health.kind = \"{kind}\" {what} and reads no \
                     HTTP status: only kind = \"http\" checks do; set kind = \"http\" to \
                     check the status, or leave health.expect out"
                ));
            }
        }
        if self.tls.hsts.is_some() && self.tls.listen.is_empty() {
            warnings.push(
                "tls.hsts_max_age is set, but there is no tls.listen: Strict-Transport-Security \
                 is sent over TLS only, so no answer carries it"
                    .to_owned(),
            );
        }
        // The port of the redirects alone: without them it changes nothing, and an operator who
        // set it expecting plaintext to go to HTTPS was told nothing.
        if let (Some(port), false) = (self.proxy.https_port, self.proxy.redirect_https) {
            warnings.push(format!(
                "proxy.https_port = {port} is set, but proxy.redirect_https is not true: it is \
                 the port of those redirects only, so it changes nothing; set \
                 proxy.redirect_https = true, or leave it out"
            ));
        }
        // Valid, and sent as asked: a redirect may be made in front of this proxy (port 80 on
        // a load balancer), which cannot be told from here; but a domain submitted as it is
        // here is refused by hstspreload.org, which asks http:// for a redirect to https://.
        let preload = self.tls.hsts.as_ref().is_some_and(|h| h.preload);
        if preload
            && !self.tls.listen.is_empty()
            && !self.proxy.listen.is_empty()
            && !self.proxy.redirect_https
        {
            warnings.push(
                "tls.hsts_preload = true, but proxy.listen serves plaintext HTTP without \
                 proxy.redirect_https = true: hstspreload.org refuses a domain whose http:// \
                 answers other than with a redirect to https:// on the same host; set \
                 proxy.redirect_https = true (unless something in front of this proxy \
                 redirects port 80)"
                    .to_owned(),
            );
        }
        warnings.extend(self.health_warnings());
        for (key, d, default) in [
            (
                "proxy.header_read_timeout",
                self.proxy.header_read_timeout,
                "10s",
            ),
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                "2s",
            ),
            (
                "upstream.response_timeout",
                self.upstream.response_timeout,
                "60s",
            ),
        ] {
            if d < LOW_TIMEOUT {
                warnings.push(format!(
                    "{key} = \"{}\" is under {}: a client or server a few milliseconds late \
                     (a busy machine, a pause of its runtime, a network hop) is cut off, and \
                     under load nearly every request may be; the default is {default}",
                    humantime::format_duration(d),
                    humantime::format_duration(LOW_TIMEOUT),
                ));
            }
        }
        for (i, &code) in self.upstream.intercept_statuses.iter().enumerate() {
            // 429 is the application saying it is overloaded, which the outage page fits; the
            // other client errors answer one request, and the page would blame the service.
            if (400..500).contains(&code) && code != 429 {
                warnings.push(format!(
                    "upstream.intercept_statuses[{i}] = {code} is a client error: each such \
                     answer of a working application (a page not found, a login refused) \
                     becomes the outage holding response, which says the service is in \
                     trouble; list server errors, like [502, 503, 504]"
                ));
            }
        }
        for (key, nets) in [
            ("proxy.trusted_proxies", &self.proxy.trusted_proxies),
            ("maintenance.allow_ips", &self.maintenance.allow_ips),
        ] {
            for (i, net) in nets.iter().enumerate() {
                // ipnet takes "10.0.0.1/8" as 10.0.0.0/8: likely a host meant, or a prefix
                // mistyped, and either way far more addresses than written.
                if net.addr() != net.network() {
                    warnings.push(format!(
                        "{key}[{i}] \"{net}\" has host bits set: it means the whole network \
                         \"{}\" ({} addresses); write that, or the address alone for one host",
                        net.trunc(),
                        addresses(net)
                    ));
                }
            }
        }
        // The first `tls.listen` port is what the redirects name without `https_port`: port 0
        // is any free port to a listener, and https://HOST:0/ reaches nothing.
        if self.proxy.redirect_https && self.proxy.https_port.is_none() {
            if let Some(first) = self.tls.listen.first().filter(|a| a.port() == 0) {
                warnings.push(format!(
                    "proxy.redirect_https = true sends plaintext visitors to the port of \
                     tls.listen[0] \"{first}\", which is port 0 (any free port): they are \
                     sent to https://HOST:0/, where nothing answers; set proxy.https_port to \
                     the port clients reach HTTPS on"
                ));
            }
        }
        for (i, target) in self.notify.iter().enumerate() {
            // The URL is not shown: its path or userinfo may hold a token.
            let twin = self.notify[..i]
                .iter()
                .position(|t| t.url == target.url && t.headers == target.headers);
            if let Some(first) = twin {
                warnings.push(format!(
                    "notify[{i}].url is the URL of notify[{first}] too, with the same headers: \
                     every change is sent to that webhook twice; remove one of them"
                ));
            }
        }
        for (i, target) in self.notify.iter().enumerate() {
            let short = target.secret.as_ref().map_or(0, |s| s.chars().count());
            if (1..MIN_WEBHOOK_SECRET).contains(&short) {
                // Refusing it would stop a config that ran yesterday; a receiver that checks
                // the signature is only as safe as the key, which one signed event lets anyone
                // guess offline.
                warnings.push(format!(
                    "notify[{i}].secret is too short ({short} of at least \
                     {MIN_WEBHOOK_SECRET} characters; `openssl rand -hex 16` makes one): one \
                     signed event lets anyone guess so short a key offline and sign events of \
                     their own"
                ));
            }
        }
        warnings
    }

    /// How long checks take to notice a server stopped (`fall` × `interval`) or back
    /// (`rise` × `down_interval`), when it is long, and a `fall` past any use.
    fn health_warnings(&self) -> Vec<String> {
        let h = &self.health;
        let mut warnings = Vec::new();
        let down = h.interval.saturating_mul(h.fall);
        if h.fall > FALL_WARNED || down > SLOW_NOTICE {
            warnings.push(format!(
                "health.fall = {} with health.interval = \"{}\": a server that stops \
                 answering is taken out by its checks only after {}, and the site goes into \
                 outage (and notifies) no sooner; the defaults, fall = 3 and interval = \"2s\", \
                 take 6s",
                h.fall,
                humantime::format_duration(h.interval),
                humantime::format_duration(down),
            ));
        }
        let up = h.down_interval.saturating_mul(h.rise);
        if up > SLOW_NOTICE {
            warnings.push(format!(
                "health.rise = {} with a down server checked every \"{}\" \
                 (health.down_interval, at most health.interval): a server back after an \
                 outage is used again only after {}, and the site answers with the outage \
                 page all that time; set health.down_interval shorter",
                h.rise,
                humantime::format_duration(h.down_interval),
                humantime::format_duration(up),
            ));
        }
        warnings
    }

    /// Everything `check` says after its summary of a valid config, and what a start logs
    /// and a reload logs and returns to who asked: what clients would refuse of the
    /// certificates although they load (`certificates`, from
    /// `tls::server_config_checked`), the config's own (`warnings`), and the pages'.
    pub fn load_warnings(
        &self,
        pages: &crate::hold::pages::Pages,
        certificates: Vec<String>,
    ) -> Vec<String> {
        let mut all = certificates;
        all.extend(self.warnings());
        all.extend(
            pages
                .warnings
                .iter()
                .map(|w| format!("maintenance.pages: {w}")),
        );
        all
    }

    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::files::read_text(path, crate::files::MAX_CONFIG_BYTES);
        Self::from_file_text(path, text, None)
    }

    /// `load_file` for a reload: a file changed within the last second is read again until
    /// it has been left alone for a second (`files::read_settled`), so that a file caught
    /// while it is written in place is not put in force cut short. A warning says when it
    /// was still changing after 3 s, and the last read was taken. It sleeps: for a blocking
    /// thread.
    /// `running` is the running proxy's `[control]`, which a reload keeps whatever the file
    /// says: the folder of its state file or socket, gone since the start, does not refuse the
    /// reload (`Validator::running`).
    pub fn reload_file(
        path: &Path,
        running: &ControlConfig,
    ) -> Result<(Config, Option<String>), ConfigError> {
        let settle = crate::files::SETTLE;
        let read = crate::files::read_settled(path, crate::files::MAX_CONFIG_BYTES, &settle);
        let still_changing = read.as_ref().is_ok_and(|r| r.still_changing);
        let text = read.and_then(|r| crate::files::text(r.bytes));
        let config = Self::from_file_text(path, text, Some(running))?;
        let warning = still_changing.then(|| {
            format!(
                "{} was still changing after {} s of reads {} ms apart (written to while the \
                 reload read it?): its last read is in force; if it was not whole, reload \
                 again once it is",
                path.display(),
                settle.give_up.as_secs(),
                settle.pause.as_millis()
            )
        });
        Ok((config, warning))
    }

    fn from_file_text(
        path: &Path,
        text: std::io::Result<String>,
        running: Option<&ControlConfig>,
    ) -> Result<Config, ConfigError> {
        let text = text.map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // A byte-order mark is no setting (toml skips it) and no white space to `trim`: a
        // file an editor emptied and saved as "UTF-8 with BOM" was read as every default.
        if text.trim_start_matches('\u{feff}').trim().is_empty() {
            return Err(ConfigError::Empty {
                path: path.to_path_buf(),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        Self::parse_beside(&text, base, Some(path), running)
    }

    /// Parses and validates config text; relative paths resolve against `base_dir`.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        source: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        Self::parse_beside(text, base_dir, source, None)
    }

    /// `parse` for a reload beside a proxy running with the `[control]` `running`.
    fn parse_beside(
        text: &str,
        base_dir: &Path,
        source: Option<&Path>,
        running: Option<&ControlConfig>,
    ) -> Result<Config, ConfigError> {
        let origin = source.map_or_else(|| "config".to_owned(), |p| p.display().to_string());
        let invalid = |problems| ConfigError::Invalid {
            origin: origin.clone(),
            problems,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let key = e.span().and_then(|s| syntax_key(text, s.start));
            let mut message = syntax_error(text, &e);
            // `socket_mode = 0660`, as chmod writes it, is no TOML number (a leading zero),
            // and "expected newline, `#`" did not say what to write instead.
            if key.as_deref() == Some("control.socket_mode") {
                message.push_str(&format!(" ({SOCKET_MODE_AS_TEXT})"));
            }
            invalid(vec![Problem {
                key: key.unwrap_or_else(|| "(syntax)".into()),
                message,
            }])
        })?;
        let mut v = Validator {
            problems: Vec::new(),
            base_dir: base_dir.to_path_buf(),
            written: &table,
            running,
        };
        for (key, value) in &table {
            if SECTIONS.contains(&key.as_str()) {
                continue;
            }
            let tables = match value {
                toml::Value::Table(_) => true,
                toml::Value::Array(items) => {
                    !items.is_empty() && items.iter().all(toml::Value::is_table)
                }
                _ => false,
            };
            let message = if tables {
                format!("unknown section; expected one of: {}", SECTIONS.join(", "))
            } else {
                // `threads = 2` above every `[section]`: "unknown section" named a section
                // nobody wrote.
                let found = sections_with(key, value);
                let under = if found.is_empty() {
                    "and no section has such a key".to_owned()
                } else {
                    format!("it is a key of {}", found.join(", "))
                };
                format!(
                    "is written before any [section], where no key belongs; {under}: move it \
                     under its section's header"
                )
            };
            v.problem(key, message);
        }
        let proxy = v.section::<file::ProxyFile>(&table, "proxy");
        let tls = v.section::<file::TlsFile>(&table, "tls");
        let certificates = v.list::<file::CertificateFile>(&tls.certificates, "tls.certificates");
        let upstream = v.section::<file::UpstreamFile>(&table, "upstream");
        let health = v.section::<file::HealthFile>(&table, "health");
        let maintenance = v.section::<file::MaintenanceFile>(&table, "maintenance");
        let control = v.section::<file::ControlFile>(&table, "control");
        let admin = v.section::<file::AdminFile>(&table, "admin");
        let notify = v.array(&table, "notify");
        let notify = v.list::<file::NotifyFile>(notify, "notify");
        let log = v.section::<file::LogFile>(&table, "log");
        let config = Config {
            source: source.map(Path::to_path_buf),
            reload_from: source.map(Path::to_path_buf),
            proxy: v.proxy(proxy),
            tls: v.tls(tls, certificates),
            upstream: v.upstream(upstream),
            health: v.health(health),
            maintenance: v.maintenance(maintenance),
            control: v.control(control),
            admin: v.admin(admin),
            notify: v.notify(notify),
            log: v.log(log),
            sections: SECTIONS
                .iter()
                .filter(|name| table.contains_key(**name))
                .map(|name| (*name).to_owned())
                .collect(),
        };
        let state_file = &config.control.state_file;
        // The first save would replace the socket, or this very file, with the state.
        if same_place(state_file, &config.control.socket) {
            v.problem(
                "control.state_file",
                format!(
                    "{} is control.socket's path too; the two need paths of their own",
                    state_file.display()
                ),
            );
        } else if source.is_some_and(|config_file| same_place(state_file, config_file)) {
            v.problem(
                "control.state_file",
                format!(
                    "{} is this config file; the state file is written over at every change: name another path",
                    state_file.display()
                ),
            );
        }
        let bad_listen = v.problems.iter().any(|p| p.key.contains("listen["));
        if config.proxy.listen.is_empty() && config.tls.listen.is_empty() && !bad_listen {
            v.problem(
                "proxy.listen",
                "needs at least one address to listen on (here or in tls.listen)",
            );
        }
        // Found by `check` and a reload rather than by a start that fails "Address already in
        // use". The same address twice in one list is bound once.
        let listeners = (config.proxy.listen.iter().map(|a| ("proxy.listen", *a)))
            .chain(config.tls.listen.iter().map(|a| ("tls.listen", *a)))
            .chain(config.admin.listen.map(|a| ("admin.listen", a)));
        let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
        for (key, addr) in listeners {
            let clash = seen
                .iter()
                .find(|&&(k, b)| !(k == key && b == addr) && overlap(addr, b));
            if let Some((other, b)) = clash {
                v.problem(
                    key,
                    format!(
                        "{addr} and {b} ({other}) cannot both listen: one port on the same \
                         address, or on a wildcard address and another it covers"
                    ),
                );
            }
            seen.push((key, addr));
        }
        if config.health.kind == HealthKind::Grpc
            && config
                .upstream
                .servers
                .iter()
                .any(|s| s.protocol == Protocol::Http)
        {
            v.problem(
                "health.kind",
                "\"grpc\" checks speak HTTP/2: use h2c:// or https:// servers, or another kind",
            );
        }
        if config.health.host.is_some()
            && config
                .upstream
                .servers
                .iter()
                .any(|s| s.protocol == Protocol::H2c)
        {
            v.problem(
                "health.host",
                "h2c:// servers are checked over HTTP/2, which names the server in :authority, not Host",
            );
        }
        if config.proxy.redirect_https && config.tls.listen.is_empty() {
            v.problem(
                "proxy.redirect_https",
                "needs tls.listen: there is no HTTPS listener to redirect to",
            );
        }
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid(v.problems))
        }
    }
}

/// serde's message with Rust's integer types said as an operator reads them:
/// "expected usize" named a type, not what to write.
fn plain_types(message: String) -> String {
    const TYPES: [(&str, &str); 4] = [
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u16", "expected a whole number from 0 to 65535"),
    ];
    TYPES
        .iter()
        .find(|(rust, _)| message.ends_with(rust) || message.contains(&format!("{rust} ")))
        .map_or_else(
            || message.clone(),
            |(rust, plain)| message.replacen(rust, plain, 1),
        )
}

/// What to write for `control.socket_mode`, said when it is written as a number.
const SOCKET_MODE_AS_TEXT: &str =
    "write the mode as a string of octal digits, like \"0660\", not as a number";

const SECTIONS: &[&str] = &[
    "proxy",
    "tls",
    "upstream",
    "health",
    "maintenance",
    "control",
    "admin",
    "notify",
    "log",
];

/// The sections that have a key `key` (which `value` may not suit), as they are written:
/// `[proxy]`, `[[notify]]`.
fn sections_with(key: &str, value: &toml::Value) -> Vec<&'static str> {
    // What serde says of a key a section does not have, whatever its value.
    fn has<T: DeserializeOwned>(key: &str, value: &toml::Value) -> bool {
        let alone = toml::Table::from_iter([(key.to_owned(), value.clone())]);
        match toml::Value::Table(alone).try_into::<T>() {
            Ok(_) => true,
            Err(e) => !e.to_string().contains("unknown field"),
        }
    }
    [
        ("[proxy]", has::<file::ProxyFile>(key, value)),
        ("[tls]", has::<file::TlsFile>(key, value)),
        (
            "[[tls.certificates]]",
            has::<file::CertificateFile>(key, value),
        ),
        ("[upstream]", has::<file::UpstreamFile>(key, value)),
        ("[health]", has::<file::HealthFile>(key, value)),
        ("[maintenance]", has::<file::MaintenanceFile>(key, value)),
        ("[control]", has::<file::ControlFile>(key, value)),
        ("[admin]", has::<file::AdminFile>(key, value)),
        ("[[notify]]", has::<file::NotifyFile>(key, value)),
        ("[log]", has::<file::LogFile>(key, value)),
    ]
    .into_iter()
    .filter_map(|(name, has)| has.then_some(name))
    .collect()
}

/// Collects every problem; each check returns a placeholder on error so validation goes on.
struct Validator<'t> {
    problems: Vec<Problem>,
    base_dir: PathBuf,
    /// The file as written, for `problem` to know a secret it must not repeat.
    written: &'t toml::Table,
    /// A reload's: the running proxy's `[control]`, its state file and socket, which it keeps
    /// whatever the file says (`control.*` take effect at a restart).
    running: Option<&'t ControlConfig>,
}

/// Below this, a webhook's `secret` is warned about, as `bypass_secret` is refused.
const MIN_WEBHOOK_SECRET: usize = 16;

/// A key whose value is a secret or may hold one (a webhook URL often carries its token in
/// the path: Slack's `/services/T…/B…/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secret {
    Url,
    Token,
    /// A table whose values are tokens more often than not (`Authorization`).
    Headers,
}

impl Secret {
    /// The secret-bearing keys: `maintenance.bypass_secret`, `notify[N].url`, `notify[N].secret`,
    /// `notify[N].headers`.
    fn of(key: &str) -> Option<Secret> {
        if key == "maintenance.bypass_secret" {
            return Some(Secret::Token);
        }
        let (index, field) = key.strip_prefix("notify[")?.split_once("].")?;
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        match field {
            "url" => Some(Secret::Url),
            "secret" => Some(Secret::Token),
            "headers" => Some(Secret::Headers),
            _ => None,
        }
    }

    /// `message` without `value`, whatever built it: serde quotes a value of the wrong type,
    /// and a check may quote the value it refuses.
    fn redact(self, message: String, value: Option<&toml::Value>) -> String {
        if self == Secret::Headers {
            return match value {
                // serde's "invalid type: integer `5`, expected a string" quotes a header's
                // value; the checks' own problems name the header, never its value.
                Some(toml::Value::Table(_)) if message.starts_with("invalid type") => {
                    "must give each header's value as a string".to_owned()
                }
                Some(toml::Value::Table(_)) | None => message,
                Some(_) => "must be a table of header names and values, such as { Authorization \
                            = \"Bearer …\" }"
                    .to_owned(),
            };
        }
        let text = match value {
            Some(toml::Value::String(text)) => text,
            // serde's "invalid type: integer `987654321`, expected a string" is the only
            // problem a value of another type can have.
            Some(_) => {
                return match self {
                    Secret::Url => "must be a string: the webhook's http:// or https:// URL",
                    Secret::Token | Secret::Headers => "must be a string",
                }
                .to_owned()
            }
            None => return message,
        };
        let (shown, path) = match self {
            Secret::Url => url_outline(text),
            Secret::Token | Secret::Headers => ("(the value, not shown)".to_owned(), None),
        };
        let mut message = message.replace(&format!("{text:?}"), &shown);
        // Unquoted, only a value long enough not to be a word of the message itself: "short"
        // must not be cut out of "is too short".
        for part in std::iter::once(text.as_str()).chain(path) {
            if part.chars().count() >= 8 {
                message = message.replace(part, "…");
            }
        }
        message
    }
}

/// A webhook URL as a problem may show it, quoted: its scheme and host, never the userinfo,
/// path or query, which may hold the secret. Also the part not shown, for `redact` to cut.
fn url_outline(text: &str) -> (String, Option<&str>) {
    let scheme_chars = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    };
    match text.split_once("://") {
        Some((scheme, rest)) if scheme_chars(scheme) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            // An `@` further on may end a user name or password that holds a `/`, `?` or
            // `#`: what comes before the cut could be part of it, after an `@` of its own too
            // (`user:p@ss/word@host`).
            let host = match authority.rsplit_once('@') {
                _ if path.contains('@') => "…",
                Some((_, host)) => host,
                None => authority,
            };
            let tail = if path.is_empty() { "" } else { "/…" };
            (
                format!("\"{scheme}://{host}{tail}\""),
                (!path.is_empty()).then_some(path),
            )
        }
        // Without a scheme, a host cannot be told from a token.
        _ => ("a value with no scheme".to_owned(), None),
    }
}

/// Where a file does not parse, and why, without the line itself, which toml's own message
/// quotes: the line may hold a secret (a webhook URL's token), and a refused reload is logged.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    // toml says some on two lines ("invalid table header", then "duplicate key `proxy` in
    // document root"): the second, unindented, read as a problem of its own.
    let message: Vec<&str> = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let message = message.join(": ");
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return message;
    };
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

/// The key that the line at byte `at` sets (`proxy.max_header_bytes`, `notify[1].url`), when
/// that line is `name = …`: a value TOML itself refuses (a number too large, a bad date) is
/// then named as every other problem is. Only names are read, never the value, which may be
/// a secret; `None` when unsure: a line inside a multi-line string, or under a header that is
/// not a bare name (quoted).
fn syntax_key(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at.min(text.len()))?;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let above = before.get(..start)?;
    // Inside a multi-line string, what looks like `name =` is the value's text.
    if above.matches("\"\"\"").count() % 2 == 1 || above.matches("'''").count() % 2 == 1 {
        return None;
    }
    let line = text.get(start..)?.lines().next()?;
    let name = line.split_once('=')?.0.trim();
    let bare = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !bare(name) {
        return None;
    }
    // A header, its comment cut off: `[[notify]]   # webhooks` (a bare name has no `#`).
    let header = |l: &str| -> Option<Option<(String, bool)>> {
        let l = l.split('#').next().unwrap_or_default().trim();
        if !l.starts_with('[') {
            return None;
        }
        let (inner, array) = match l.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            Some(inner) => (inner, true),
            None => (
                l.strip_prefix('[')
                    .and_then(|l| l.strip_suffix(']'))
                    .unwrap_or(""),
                false,
            ),
        };
        let inner = inner.trim();
        Some(bare(inner).then(|| (inner.to_owned(), array)))
    };
    let headers: Vec<Option<(String, bool)>> = above.lines().filter_map(header).collect();
    Some(match headers.last() {
        None => name.to_owned(),
        Some(None) => return None,
        Some(Some((section, false))) => format!("{section}.{name}"),
        Some(Some((section, true))) => {
            let index = headers
                .iter()
                .filter(|h| h.as_ref().is_some_and(|(h, a)| h == section && *a))
                .count()
                - 1;
            format!("{section}[{index}].{name}")
        }
    })
}

/// The value a problem's key names (`notify[1].url`) in the file as written.
fn written<'t>(table: &'t toml::Table, key: &str) -> Option<&'t toml::Value> {
    let mut found: Option<&toml::Value> = None;
    for part in key.split('.') {
        let (name, index) = match part.strip_suffix(']').and_then(|p| p.split_once('[')) {
            Some((name, i)) => (name, Some(i.parse::<usize>().ok()?)),
            None => (part, None),
        };
        let within = match found {
            None => table,
            Some(value) => value.as_table()?,
        };
        let value = within.get(name)?;
        found = Some(match index {
            Some(i) => value.as_array()?.get(i)?,
            None => value,
        });
    }
    found
}

impl Validator<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        let mut message = message.into();
        // Every problem passes here, so that no check, nor serde, can print a secret: problems
        // reach `check`'s output, the control socket's answer to a reload and the log of a
        // refused SIGHUP, read by people and pipelines that have no need of the secrets.
        if let Some(secret) = Secret::of(key) {
            message = secret.redact(message, written(self.written, key));
        }
        self.problems.push(Problem {
            key: key.to_owned(),
            message,
        });
    }

    /// Whether the file writes `key` (`health.timeout`), rather than leaving its default.
    fn has_value(&self, key: &str) -> bool {
        written(self.written, key).is_some()
    }

    fn has_problem(&self, key: &str) -> bool {
        self.problems.iter().any(|p| p.key == key)
    }

    /// A top-level array of tables (`[[name]]`): its entries, for `list`.
    fn array<'t>(&mut self, table: &'t toml::Table, name: &str) -> &'t [toml::Value] {
        match table.get(name) {
            None => &[],
            Some(toml::Value::Array(items)) => items,
            Some(_) => {
                self.problem(
                    name,
                    format!("must be a list of tables, written [[{name}]]"),
                );
                &[]
            }
        }
    }

    /// The entries of an array of tables, each read key by key as a section is, so that a
    /// problem names its entry and key (`notify[1].url`) and a refused key does not hide the
    /// entry's other problems. Each entry keeps its index, for later problems to name it by.
    fn list<E: DeserializeOwned + Default>(
        &mut self,
        items: &[toml::Value],
        name: &str,
    ) -> Vec<(usize, E)> {
        let mut entries = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let key = format!("{name}[{i}]");
            if !item.is_table() {
                self.problem(&key, format!("must be a table of keys, written [[{name}]]"));
            } else if let Some(entry) = self.table(item, &key) {
                entries.push((i, entry));
            }
        }
        entries
    }

    /// Deserializes one section on its own, so that a problem in one section does not hide
    /// the problems of the others.
    fn section<T: DeserializeOwned + Default>(&mut self, table: &toml::Table, name: &str) -> T {
        match table.get(name) {
            // `[[proxy]]` (or `proxy = 5`): serde read its first field from what it found and
            // said "expected a string or a list of strings", of a key nobody wrote.
            Some(value) if !value.is_table() => {
                let not = if value.is_array() {
                    format!(", not [[{name}]]")
                } else {
                    String::new()
                };
                self.problem(
                    name,
                    format!("must be a table of keys, written [{name}]{not}"),
                );
                T::default()
            }
            Some(value) => self.table(value, name).unwrap_or_default(),
            None => T::default(),
        }
    }

    /// Reads a table named `name`. A key that serde refuses (unknown, or of the wrong type)
    /// is reported under its own name and left out, and the table is built from the other
    /// keys, so that their problems are found too. `None`: not a table at all.
    fn table<T: DeserializeOwned + Default>(
        &mut self,
        value: &toml::Value,
        name: &str,
    ) -> Option<T> {
        let error = match value.clone().try_into::<T>() {
            Ok(section) => return Some(section),
            Err(e) => plain_types(e.to_string().trim().replace('\n', " ")),
        };
        let Some(keys) = value.as_table() else {
            self.problem(name, error);
            return None;
        };
        // Every field has a default, so each key can be tried on its own.
        let mut kept = toml::Table::new();
        for (key, v) in keys {
            let alone = toml::Table::from_iter([(key.clone(), v.clone())]);
            match toml::Value::Table(alone).try_into::<T>() {
                Ok(_) => {
                    kept.insert(key.clone(), v.clone());
                }
                Err(e) => {
                    let message = plain_types(e.to_string().trim().replace('\n', " "));
                    // The key is named already; toml's "in `key`" would say it twice.
                    let message = message
                        .strip_suffix(&format!(" in `{key}`"))
                        .unwrap_or(&message);
                    self.problem(&format!("{name}.{key}"), message);
                }
            }
        }
        match toml::Value::Table(kept).try_into::<T>() {
            Ok(section) => Some(section),
            Err(_) => {
                // Keys that pass alone but not together: say what serde said of the whole.
                self.problem(name, error);
                Some(T::default())
            }
        }
    }

    fn duration(&mut self, key: &str, text: &DurationText) -> Duration {
        match parse_duration(&text.0) {
            Ok(d) if d.is_zero() => {
                self.problem(
                    key,
                    format!(
                        "{:?} is zero, which here would mean at once (only \
                         proxy.send_timeout, proxy.body_read_timeout and upstream.read_timeout \
                         take \"0\" for no limit, and tls.hsts_max_age to turn it off); write a length such as \"5s\"",
                        text.0
                    ),
                );
                Duration::from_secs(1)
            }
            // Longer is a typo, and deadlines beyond it would overflow the clock's arithmetic.
            Ok(d) if d > MAX_DURATION => {
                self.problem(
                    key,
                    format!(
                        "{:?} is longer than 366 days, the longest duration here (a typo?)",
                        text.0
                    ),
                );
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(why) => {
                self.problem(key, why);
                Duration::from_secs(1)
            }
        }
    }

    /// A duration where `"0"` means no limit at all.
    fn duration_or_off(&mut self, key: &str, text: &DurationText) -> Option<Duration> {
        match parse_duration(&text.0) {
            Ok(d) if d.is_zero() => None,
            _ => Some(self.duration(key, text)),
        }
    }

    fn proxy(&mut self, f: file::ProxyFile) -> ProxyConfig {
        let listen = self.addrs(
            "proxy.listen",
            &f.listen,
            "\"127.0.0.1:8080\" or \"[::]:80\"",
        );

        let trusted_proxies = self.cidrs("proxy.trusted_proxies", &f.trusted_proxies);
        if f.max_connections == 0 {
            self.problem("proxy.max_connections", "must be at least 1");
        }
        if f.max_header_bytes < 8192 {
            self.problem("proxy.max_header_bytes", "must be at least 8192");
        }
        // It is also how far hyper lets a connection's read buffer grow while a body streams
        // in: a typo's extra zeros would let each upload hold that much.
        if f.max_header_bytes > MAX_HEADER_BYTES {
            self.problem(
                "proxy.max_header_bytes",
                format!(
                    "must be at most {MAX_HEADER_BYTES} (1 MiB; nginx's and HAProxy's defaults \
                     are 8 and 16 KiB)"
                ),
            );
        }
        // Each is a thread with a runtime of its own, started at once: a typo must not start
        // a million of them.
        if f.threads > MAX_THREADS {
            self.problem(
                "proxy.threads",
                format!("must be at most {MAX_THREADS} (0 is one per core)"),
            );
        }
        // Port 0 is "any free port" to a listener, but in a redirect it names no port at all:
        // every plaintext visitor would be sent to https://HOST:0/, where nothing answers.
        if f.https_port == Some(0) {
            self.problem(
                "proxy.https_port",
                "port \"0\" is not from 1 to 65535: it is the port HTTPS redirects send visitors \
                 to (https://HOST:0/ reaches nothing)",
            );
        }
        ProxyConfig {
            listen,
            threads: f.threads,
            trusted_proxies,
            header_read_timeout: self.duration("proxy.header_read_timeout", &f.header_read_timeout),
            send_timeout: self.duration_or_off("proxy.send_timeout", &f.send_timeout),
            body_read_timeout: self
                .duration_or_off("proxy.body_read_timeout", &f.body_read_timeout),
            shutdown_timeout: self.duration("proxy.shutdown_timeout", &f.shutdown_timeout),
            max_header_bytes: f.max_header_bytes.max(8192),
            max_connections: f.max_connections.max(1),
            max_pending_per_client: f.max_pending_per_client,
            redirect_https: f.redirect_https,
            https_port: f.https_port,
        }
    }

    /// Socket addresses; `example` shows the form in the error.
    fn addrs(&mut self, key: &str, list: &[String], example: &str) -> Vec<SocketAddr> {
        let mut addrs = Vec::new();
        for (i, a) in list.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(addr) => addrs.push(addr),
                Err(_) => self.problem(
                    &format!("{key}[{i}]"),
                    format!("{a:?} is not an address; write IP:PORT such as {example}"),
                ),
            }
        }
        addrs
    }

    fn cidrs(&mut self, key: &str, list: &[String]) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (i, s) in list.iter().enumerate() {
            // A bare address means that one host.
            let parsed = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => nets.push(canonical_net(net)),
                Err(_) => self.problem(
                    &format!("{key}[{i}]"),
                    format!("{s:?} is not a CIDR; write \"10.0.0.0/8\", \"::1/128\" or a single address"),
                ),
            }
        }
        nets
    }

    fn upstream(&mut self, f: file::UpstreamFile) -> UpstreamConfig {
        let mut servers = Vec::new();
        let mut listed: Vec<(usize, (Protocol, String, u16))> = Vec::new();
        for (i, s) in f.servers.iter().enumerate() {
            match parse_upstream(s) {
                // Once each: a server's health, its metrics and its mark-down go by its
                // name, and a second entry got a second checker that `ctl health` listed
                // beside the first, with counts of its own. Written alike or not: `App`
                // and `app`, `:80` and none, are one server.
                Ok(u) => match listed.iter().find(|(_, key)| *key == u.identity()) {
                    Some((first, _)) => self.problem(
                        &format!("upstream.servers[{i}]"),
                        format!("{u} is listed already, as upstream.servers[{first}]: list each server once"),
                    ),
                    None => {
                        listed.push((i, u.identity()));
                        servers.push(u);
                    }
                },
                Err(why) => self.problem(&format!("upstream.servers[{i}]"), why),
            }
        }
        if f.servers.is_empty() {
            self.problem(
                "upstream.servers",
                "needs at least one server, e.g. \"http://127.0.0.1:3000\"",
            );
        }
        for (i, &code) in f.intercept_statuses.iter().enumerate() {
            let key = format!("upstream.intercept_statuses[{i}]");
            if !(100..=599).contains(&code) {
                self.problem(&key, format!("{code} is not an HTTP status (100-599)"));
            } else if code < 200 {
                // The only 1xx a forward ever ends in is a 101, whose connection is then the
                // tunnel's: replacing it would leave the client waiting on a switch that
                // never comes. The others are interim, never replaced.
                self.problem(
                    &key,
                    format!("{code} is not a final answer; only 400-599 can be replaced"),
                );
            } else if code < 400 {
                // `[200]` passed, and every page the application served became the outage
                // page; a 3xx is no failure either (`304` answers a browser's revalidation).
                self.problem(
                    &key,
                    format!(
                        "{code} is not an error: every such answer of a working application \
                         would become the outage holding response; list failures only, like \
                         [502, 503, 504] (400-599)"
                    ),
                );
            }
        }
        let ca_file = (!f.ca_file.is_empty()).then(|| self.path(&f.ca_file));
        if let Some(ca) = &ca_file {
            if let Some(why) = not_a_file(ca) {
                self.problem(
                    "upstream.ca_file",
                    format!(
                        "{} is not a readable file of PEM certificates: {why}",
                        ca.display()
                    ),
                );
            }
        }
        UpstreamConfig {
            ca_file,
            danger_accept_invalid_certs: f.danger_accept_invalid_certs,
            intercept_statuses: f.intercept_statuses,
            servers,
            connect_timeout: self.duration("upstream.connect_timeout", &f.connect_timeout),
            response_timeout: self.duration("upstream.response_timeout", &f.response_timeout),
            read_timeout: self.duration_or_off("upstream.read_timeout", &f.read_timeout),
            idle_timeout: self.duration("upstream.idle_timeout", &f.idle_timeout),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Origins, each as a browser sends it (`hold::cors::check_origin`).
    fn origins(&mut self, key: &str, list: Vec<String>) -> Vec<String> {
        for (i, o) in list.iter().enumerate() {
            if let Err(why) = crate::hold::cors::check_origin(o) {
                self.problem(&format!("{key}[{i}]"), why);
            }
        }
        list
    }

    /// Path prefixes: each must start with '/'.
    fn prefixes(&mut self, key: &str, list: &[String]) -> Vec<String> {
        for (i, p) in list.iter().enumerate() {
            if !p.starts_with('/') {
                self.problem(&format!("{key}[{i}]"), format!("{p:?} must start with '/'"));
            }
        }
        list.to_vec()
    }

    /// `entries`: those of `f.certificates` that are tables, each with its index.
    fn tls(&mut self, f: file::TlsFile, entries: Vec<(usize, file::CertificateFile)>) -> TlsConfig {
        let listen = self.addrs("tls.listen", &f.listen, "\"0.0.0.0:443\"");
        let mut certificates = Vec::new();
        for (i, c) in entries {
            let key = |what: &str| format!("tls.certificates[{i}].{what}");
            certificates.push(CertificatePaths {
                cert: self.pem_file(&key("cert"), &c.cert),
                key: self.pem_file(&key("key"), &c.key),
            });
        }
        // An entry that is there but wrong has its own problems; this is for none written.
        if !listen.is_empty() && f.certificates.is_empty() && !self.has_problem("tls.certificates")
        {
            self.problem(
                "tls.certificates",
                "tls.listen needs at least one [[tls.certificates]] entry",
            );
        }
        let hsts = self.hsts(&f);
        TlsConfig {
            listen,
            certificates,
            hsts,
        }
    }

    /// `tls.hsts_*`: the header as RFC 6797 and hstspreload.org take it, or each key that
    /// would not make one named. `"0"` is a `max-age` like any other: it is how a site tells
    /// browsers to forget what an earlier one said (RFC 6797 §6.1.1).
    fn hsts(&mut self, f: &file::TlsFile) -> Option<Hsts> {
        let Some(text) = &f.hsts_max_age else {
            for (set, key) in [
                (f.hsts_include_subdomains, "tls.hsts_include_subdomains"),
                (f.hsts_preload, "tls.hsts_preload"),
            ] {
                if set {
                    self.problem(
                        key,
                        "needs tls.hsts_max_age, which turns Strict-Transport-Security on \
                         (\"365d\", say)",
                    );
                }
            }
            return None;
        };
        let key = "tls.hsts_max_age";
        let max_age = match parse_duration(&text.0) {
            Ok(d) if d > HSTS_MAX => {
                self.problem(
                    key,
                    format!(
                        "{:?} is longer than 2 years (\"730d\"), the most hstspreload.org asks \
                         for; browsers keep a host a year or two at most",
                        text.0
                    ),
                );
                None
            }
            Ok(d) if d.subsec_nanos() != 0 => {
                self.problem(
                    key,
                    format!("{:?}: max-age is a whole number of seconds", text.0),
                );
                None
            }
            Ok(d) => Some(d),
            Err(why) => {
                // The header's own text (copied from an nginx config) or years, which the
                // durations here do not have.
                let hint = if text.0.contains("max-age") {
                    "; write the length alone (\"365d\"): includeSubDomains and preload are \
                     keys of their own"
                } else if text.0.trim_end().ends_with('y') {
                    "; a year is \"365d\""
                } else {
                    ""
                };
                self.problem(key, format!("{why}{hint}"));
                None
            }
        };
        // hstspreload.org refuses a site that asks without both (and its list, once on it,
        // takes months to leave): better said here than by its form.
        let mut preload_ok = true;
        if f.hsts_preload && !f.hsts_include_subdomains {
            preload_ok = false;
            self.problem(
                "tls.hsts_preload",
                "needs tls.hsts_include_subdomains = true: the preload list takes a whole \
                 domain (hstspreload.org)",
            );
        }
        if f.hsts_preload && max_age.is_some_and(|d| d < HSTS_PRELOAD_MIN) {
            preload_ok = false;
            self.problem(
                "tls.hsts_preload",
                format!(
                    "needs tls.hsts_max_age of at least a year (\"365d\"), where it is {:?} \
                     (hstspreload.org)",
                    text.0
                ),
            );
        }
        let max_age = max_age.filter(|_| preload_ok)?;
        Hsts::new(max_age.as_secs(), f.hsts_include_subdomains, f.hsts_preload)
    }

    /// A certificate entry's `cert` or `key`, which must name a file.
    fn pem_file(&mut self, key: &str, text: &str) -> PathBuf {
        if text.is_empty() {
            // A value of the wrong type was refused already, under this key.
            if !self.has_problem(key) {
                self.problem(key, "is required: the path of a PEM file");
            }
            return PathBuf::new();
        }
        let path = self.path(text);
        if let Some(why) = not_a_file(&path) {
            self.problem(
                key,
                format!("{} is not a readable file: {why}", path.display()),
            );
        }
        path
    }

    fn health(&mut self, f: file::HealthFile) -> HealthConfig {
        let kind = match f.kind.as_str() {
            "http" => HealthKind::Http,
            "tcp" => HealthKind::Tcp,
            "grpc" => HealthKind::Grpc,
            other => {
                self.problem(
                    "health.kind",
                    format!("{other:?} is not a kind of check; use \"http\", \"tcp\" or \"grpc\""),
                );
                HealthKind::Http
            }
        };
        let path = match f.path.parse::<http::uri::PathAndQuery>() {
            Ok(p) if f.path.starts_with('/') => p,
            _ => {
                self.problem(
                    "health.path",
                    format!(
                        "{:?} must be a path starting with '/', like \"/healthz\"",
                        f.path
                    ),
                );
                http::uri::PathAndQuery::from_static("/")
            }
        };
        let interval = self.duration("health.interval", &f.interval);
        let down_interval = self.duration("health.down_interval", &f.down_interval);
        for (key, d) in [
            ("health.interval", interval),
            ("health.down_interval", down_interval),
        ] {
            if d < MIN_CHECK_INTERVAL && !self.has_problem(key) {
                self.problem(
                    key,
                    format!(
                        "{} is shorter than {}, the shortest pace of checks: each server \
                         would be checked {} times a second by each proxy, and an answer \
                         slower than that (timeout is at most the interval) would take it out",
                        humantime::format_duration(d),
                        humantime::format_duration(MIN_CHECK_INTERVAL),
                        1000 / d.as_millis().max(1)
                    ),
                );
            }
        }
        let timeout = self.duration("health.timeout", &f.timeout);
        if timeout < MIN_CHECK_TIMEOUT && !self.has_problem("health.timeout") {
            self.problem(
                "health.timeout",
                format!(
                    "{} is shorter than {}, the shortest check timeout: a live server whose \
                     answer is a little late (a pause of its runtime, a busy machine, a TLS \
                     handshake) fails its check, and every server that does, at once, takes \
                     the whole site into outage; the default is 1s",
                    humantime::format_duration(timeout),
                    humantime::format_duration(MIN_CHECK_TIMEOUT),
                ),
            );
        }
        // An interval refused already is said once, under its own key.
        if timeout > interval && !self.has_problem("health.interval") {
            // Said with both values: an `interval = "500ms"` alone is refused under
            // `timeout`, a key the operator never wrote, whose default (1s) is the cause.
            let unset = if self.has_value("health.timeout") {
                ""
            } else {
                " (its default, as it is not set)"
            };
            self.problem(
                "health.timeout",
                format!(
                    "must not be longer than health.interval: {}{unset} is longer than {}; \
                     set health.timeout to at most the interval",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            );
        }
        if f.rise == 0 {
            self.problem("health.rise", "must be at least 1");
        } else if f.rise > MAX_RISE {
            self.problem(
                "health.rise",
                format!(
                    "{} is more than {MAX_RISE}: a server back after an outage would be used \
                     again only after that many passed checks in a row, and the site would stay \
                     in outage all that time; to wait out a flapping server, lengthen \
                     health.down_interval instead (the default rise is 2)",
                    f.rise
                ),
            );
        }
        if f.fall == 0 {
            self.problem("health.fall", "must be at least 1");
        }
        let expect = match parse_status_ranges(&f.expect) {
            Ok(r) => r,
            Err(why) => {
                self.problem("health.expect", why);
                vec![(200, 399)]
            }
        };
        let host = self.health_host(&f.host, kind);
        HealthConfig {
            kind,
            path,
            interval,
            // Longer than `interval` would check a server that is down less often than one
            // that is up: taken as `interval`, as HAProxy's `downinter` is a faster pace only.
            down_interval: down_interval.min(interval),
            timeout,
            rise: f.rise.clamp(1, MAX_RISE),
            fall: f.fall.max(1),
            expect,
            host,
        }
    }

    /// `health.host`: a host name or address, with a port if it is not the default, as a
    /// `Host` header carries it. Only HTTP checks send one: a TCP check sends nothing, and a
    /// gRPC check is HTTP/2, which names the server in `:authority`, where a `Host` beside it
    /// that differs makes the request malformed (RFC 9113 §8.3.1).
    fn health_host(&mut self, text: &str, kind: HealthKind) -> Option<http::HeaderValue> {
        if text.is_empty() {
            return None;
        }
        if kind != HealthKind::Http {
            self.problem(
                "health.host",
                "only kind = \"http\" checks send a Host; leave it empty for \"tcp\" and \"grpc\"",
            );
            return None;
        }
        let authority = text.parse::<http::uri::Authority>().ok().filter(|a| {
            // No `user@`, which a Host never carries, no empty host (":80"), and a port that
            // is a number ("shop:port" parses as an authority).
            let port = a.as_str().get(a.host().len()..).unwrap_or("x");
            !a.as_str().contains('@')
                && !a.host().is_empty()
                && a.as_str() == text
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok_and(|n| n > 0)))
        });
        match authority.and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()) {
            Some(v) => Some(v),
            None => {
                self.problem(
                    "health.host",
                    format!("{text:?} is not a host as a Host header names it, like \"shop.example.com\" or \"shop.example.com:8443\""),
                );
                None
            }
        }
    }

    fn maintenance(&mut self, f: file::MaintenanceFile) -> MaintenanceConfig {
        let pages = match &f.pages {
            // Read as the config's own folder, it was refused as "cannot read
            // ./maintenance.html", a file nobody named.
            Some(p) if p.trim().is_empty() => {
                self.problem(
                    "maintenance.pages",
                    "is empty; name the folder of the pages, or leave the key out for the \
                     `pages` folder beside the config (else the built-in pages)",
                );
                PagesSource::BuiltIn
            }
            Some(p) => {
                let dir = self.path(p);
                if !dir.is_dir() {
                    self.problem(
                        "maintenance.pages",
                        format!(
                            "{} is not a folder; it must hold maintenance.html and outage.html",
                            dir.display()
                        ),
                    );
                }
                PagesSource::Folder(dir)
            }
            None => {
                let dir = self.base_dir.join("pages");
                if dir.is_dir() {
                    PagesSource::Folder(dir)
                } else {
                    PagesSource::BuiltIn
                }
            }
        };
        let prefix = &f.reserved_prefix;
        if !(prefix.starts_with('/') && prefix.ends_with('/') && prefix.len() > 2) {
            self.problem(
                "maintenance.reserved_prefix",
                format!("{prefix:?} must start and end with '/' and name a path, like \"/_intermission/\""),
            );
        } else if !is_plain_prefix(prefix) {
            self.problem(
                "maintenance.reserved_prefix",
                format!(
                    "{prefix:?} must be a plain path: letters, digits and - . _ ~ ! $ & ' ( ) * \
                     + , ; = : @ between single slashes, no `.` or `..` segment (a browser \
                     would rewrite the page's links to it, and its status, assets and preview \
                     would never be reached)"
                ),
            );
        }
        // With a host and no space or control character: such a link led nowhere, on the
        // page shown to every visitor. Not parsed as `http::Uri`, which refuses the
        // non-ASCII a browser takes (`https://statut.exemple.fr/état`).
        let rest = f
            .status_page
            .strip_prefix("https://")
            .or_else(|| f.status_page.strip_prefix("http://"));
        let status_page_ok = f.status_page.is_empty()
            || rest.is_some_and(|rest| {
                let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
                !host.is_empty() && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
            });
        if !status_page_ok {
            self.problem(
                "maintenance.status_page",
                format!(
                    "{:?} must be an http:// or https:// URL (with a host, no spaces), or empty",
                    f.status_page
                ),
            );
        }
        if !f.bypass_secret.is_empty() && f.bypass_secret.len() < 16 {
            self.problem(
                "maintenance.bypass_secret",
                "is too short to resist guessing; use at least 16 characters (or leave it empty to disable the bypass link)",
            );
        }
        if f.bypass_secret
            .contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        {
            self.problem(
                "maintenance.bypass_secret",
                "must use only letters, digits, '-', '_' and '.', since it appears in a URL path",
            );
        }
        // The limits `ctl on` and `update` are held to: the config must not allow what the
        // control socket refuses, nor the other way round.
        for (key, message) in [
            ("maintenance.message", &f.message),
            ("maintenance.outage_message", &f.outage_message),
        ] {
            let text = crate::state::mode::Text::Message;
            if let Some(why) = crate::state::mode::text_problem(text, message.trim()) {
                self.problem(key, why);
            }
        }
        let mut retry_after = |key: &str, text: &DurationText| {
            let d = self.duration(key, text);
            if d < MIN_RETRY_AFTER {
                self.problem(
                    key,
                    "must be at least 1s: Retry-After is whole seconds, and a shorter wait would be announced as 1",
                );
            } else if d > MAX_RETRY_AFTER {
                self.problem(
                    key,
                    "must be at most a day: clients told to wait longer would not come back",
                );
            }
            d
        };
        MaintenanceConfig {
            pages,
            retry_after: retry_after("maintenance.retry_after", &f.retry_after),
            outage_retry_after: retry_after(
                "maintenance.outage_retry_after",
                &f.outage_retry_after,
            ),
            api_prefixes: self.prefixes("maintenance.api_prefixes", &f.api_prefixes),
            cors_origins: self.origins("maintenance.cors_origins", f.cors_origins),
            allow_paths: self.prefixes("maintenance.allow_paths", &f.allow_paths),
            allow_ips: self.cidrs("maintenance.allow_ips", &f.allow_ips),
            bypass_ttl: self.duration("maintenance.bypass_ttl", &f.bypass_ttl),
            // Trimmed as `ctl on --message` trims it: the limits above are the trimmed
            // text's, and a message padded past them (a multi-line string's last line end, a
            // megabyte of blank lines) was served whole, beyond the page-size budget.
            message: f.message.trim().to_owned(),
            outage_message: f.outage_message.trim().to_owned(),
            status_page: f.status_page,
            bypass_secret: f.bypass_secret,
            reserved_prefix: f.reserved_prefix,
        }
    }

    fn control(&mut self, f: file::ControlFile) -> ControlConfig {
        // Octal digits alone, after one `0o` at most: `from_str_radix` also takes a leading
        // `+` (`"+600"`), and `trim_start_matches` took `"0o0o600"`, neither what chmod writes.
        let digits = f.socket_mode.strip_prefix("0o").unwrap_or(&f.socket_mode);
        let octal = !digits.is_empty() && digits.bytes().all(|b| matches!(b, b'0'..=b'7'));
        let parsed = octal.then(|| u32::from_str_radix(digits, 8).ok()).flatten();
        let socket_mode = match parsed {
            // The proxy's own user runs `ctl` (and systemd's `ExecReload` may too): a mode
            // that keeps its owner out leaves nobody able to switch maintenance off but by a
            // restart, and was found only when `ctl` was needed.
            Some(m) if m <= 0o777 && m & 0o600 != 0o600 => {
                self.problem(
                    "control.socket_mode",
                    format!(
                        "{:?} keeps the proxy's own user out of its control socket; the owner \
                         needs read and write, as in \"0600\" or \"0660\"",
                        f.socket_mode
                    ),
                );
                0o600
            }
            Some(m) if m <= 0o777 => m,
            // Octal, but with setuid, setgid or sticky bits ("1777", "2770"), which a socket
            // has no use for: "write it in octal" said to write what was written.
            Some(m) if m <= 0o7777 => {
                self.problem(
                    "control.socket_mode",
                    format!(
                        "{:?} sets bits beyond 0777 (setuid, setgid or sticky), which a socket \
                         has no use for; write the permission digits alone, like \"0660\"",
                        f.socket_mode
                    ),
                );
                0o600
            }
            _ => {
                self.problem(
                    "control.socket_mode",
                    format!("{:?} is not a permission mode; write it in octal, like \"0600\" or \"0660\"", f.socket_mode),
                );
                0o600
            }
        };
        let socket = self.path(&f.socket);
        if f.socket.is_empty() {
            self.problem("control.socket", "must name a path for the control socket");
        } else if self.running.map(|r| &r.socket) != Some(&socket) {
            // Found by `check` and a reload, not by the next restart, which would fail. Not
            // of the running proxy's own, its folder removed since it started (a cleaner of
            // /run or /tmp) or something put in its place: as for the state file below,
            // refusing the reload would keep a renewed certificate out and mend nothing. The
            // SIGHUP that asks the reload also binds the socket again, or says loudly why it
            // cannot (`control::server::Bound::find_again`).
            if let Err(why) = socket_path(&socket) {
                self.problem("control.socket", why);
            }
        }
        let state_file = self.path(&f.state_file);
        if f.state_file.is_empty() {
            self.problem("control.state_file", "must name a path for the state file");
        } else if let Err(why) = state_file_folder(&state_file) {
            // Found now, not at the first `ctl on` of an incident, refused as not saved. But
            // the running proxy's own, its folder removed since it started, is the proxy's
            // problem and not the file's: refusing the reload would keep a renewed
            // certificate or a new message out and mend nothing, since the proxy keeps its
            // state file whatever the file says. The reload says so instead (`prepare`).
            if self.running.map(|r| &r.state_file) != Some(&state_file) {
                self.problem("control.state_file", why);
            }
        }
        ControlConfig {
            socket,
            socket_mode,
            state_file,
        }
    }

    fn admin(&mut self, f: file::AdminFile) -> AdminConfig {
        if f.listen.is_empty() {
            return AdminConfig { listen: None };
        }
        match f.listen.parse::<SocketAddr>() {
            Ok(addr) => AdminConfig { listen: Some(addr) },
            Err(_) => {
                self.problem(
                    "admin.listen",
                    format!("{:?} is not an address; write IP:PORT such as \"127.0.0.1:9090\", or \"\" for none", f.listen),
                );
                AdminConfig { listen: None }
            }
        }
    }

    /// `list`: the `[[notify]]` entries that are tables, each with its index.
    fn notify(&mut self, list: Vec<(usize, file::NotifyFile)>) -> Vec<crate::notify::Target> {
        let mut targets = Vec::new();
        // Each name given, with the entry that gave it first.
        let mut names: Vec<(String, usize)> = Vec::new();
        for (i, n) in list {
            let key = |k: &str| format!("notify[{i}].{k}");
            let id = self.notify_name(&key("name"), &n.name, i, &mut names);
            let url = match n.url.parse::<http::Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
                    let authority = u.authority().cloned();
                    let problem = authority.as_ref().and_then(|a| {
                        // A password holding a `/`, `?` or `#` ends the authority before
                        // its `@`, and its start reads as a port (`alice:pa/ss@host`).
                        let cut = n.url.contains('@') && bad_port(a).is_some();
                        if a.as_str().contains('@') || cut {
                            // hyper's client drops it without a word, and logs show the
                            // authority.
                            Some(
                                "has a user name or password (before the @, not shown here), \
                                 which intermission does not send: give it as `headers = { \
                                 Authorization = \"Basic …\" }` (the base64 of user:password), \
                                 sign the events with `secret`, or give the receiver's token \
                                 in the path"
                                    .to_owned(),
                            )
                        } else {
                            bad_port(a)
                                .map(|p| format!("port {p:?} is not from 1 to 65535"))
                                .or_else(|| not_ipv4(a.host()))
                                .or_else(|| zone_problem(a.host()))
                        }
                    });
                    match problem {
                        Some(why) => {
                            let (outline, _) = url_outline(&n.url);
                            self.problem(&key("url"), format!("{outline} {why}"));
                            None
                        }
                        None => Some(webhook_dialled(u)),
                    }
                }
                // A value of the wrong type was refused already, under this key.
                _ if n.url.is_empty() && self.has_problem(&key("url")) => None,
                _ if n.url.is_empty() => {
                    self.problem(
                        &key("url"),
                        "is required: the webhook's http:// or https:// URL",
                    );
                    None
                }
                _ => {
                    self.problem(
                        &key("url"),
                        format!("{:?} is not an http:// or https:// URL", n.url),
                    );
                    None
                }
            };
            let format = match n.format.as_str() {
                "json" => crate::notify::Format::Json,
                "slack" => crate::notify::Format::Slack,
                other => {
                    self.problem(
                        &key("format"),
                        format!("{other:?} is not a format; use \"json\" or \"slack\""),
                    );
                    crate::notify::Format::Json
                }
            };
            let timeout = self.duration(&key("timeout"), &n.timeout);
            if timeout > crate::notify::MAX_TIMEOUT {
                self.problem(
                    &key("timeout"),
                    "must be at most 60s: each of an event's 8 tries waits this long on a receiver that hangs, and the webhook's later events wait behind it (\"1d\" held them for 8 days)",
                );
            }
            let headers = self.notify_headers(&key("headers"), n.headers);
            if let Some(url) = url {
                targets.push(crate::notify::Target {
                    id,
                    url,
                    format,
                    secret: (!n.secret.is_empty()).then_some(n.secret),
                    timeout,
                    headers,
                });
            }
        }
        targets
    }

    /// The id of `[[notify]]` entry `index` (`key` is its `name`): the name when given, else
    /// the index. It is a metric label and a log field, so it is short and plain; it must be
    /// its entry's own, and not all digits, which would be taken for another entry's index.
    fn notify_name(
        &mut self,
        key: &str,
        name: &str,
        index: usize,
        names: &mut Vec<(String, usize)>,
    ) -> String {
        const LONGEST: usize = 64;
        if name.is_empty() {
            return index.to_string();
        }
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        if name.len() > LONGEST || !name.chars().all(plain) {
            self.problem(
                key,
                format!(
                    "{name:?} is not a webhook name: use 1 to {LONGEST} letters, digits, '_', '-' and '.'"
                ),
            );
        } else if name.bytes().all(|b| b.is_ascii_digit()) {
            self.problem(
                key,
                format!(
                    "{name:?} is all digits, which is how a webhook without a name is labelled (by its index): put a letter in it"
                ),
            );
        } else if let Some((_, first)) = names.iter().find(|(n, _)| n == name) {
            self.problem(
                key,
                format!(
                    "{name:?} is the name of notify[{first}] too: each webhook's name must be its own, since metrics and logs tell them apart by it"
                ),
            );
        } else {
            names.push((name.to_owned(), index));
        }
        name.to_owned()
    }

    /// A webhook's own headers: any but those the POST itself decides (its body's framing,
    /// its host, its signature), each name once whatever its case. The values are secrets
    /// (tokens): problems name the header, never its value.
    fn notify_headers(
        &mut self,
        key: &str,
        given: std::collections::BTreeMap<String, String>,
    ) -> http::HeaderMap {
        const OURS: &[&str] = &[
            "content-type",
            "content-length",
            "content-encoding",
            "transfer-encoding",
            "host",
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "expect",
            crate::notify::SIGNATURE_HEADER,
            crate::notify::TIMED_SIGNATURE_HEADER,
        ];
        let mut headers = http::HeaderMap::new();
        for (name, value) in given {
            let Ok(parsed) = http::HeaderName::from_bytes(name.as_bytes()) else {
                self.problem(
                    key,
                    format!("{name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"),
                );
                continue;
            };
            if OURS.contains(&parsed.as_str()) {
                self.problem(
                    key,
                    format!("{name:?} is set by intermission for each event; leave it out"),
                );
                continue;
            }
            if headers.contains_key(&parsed) {
                self.problem(
                    key,
                    format!("{name:?} is given twice (header names are case-insensitive)"),
                );
                continue;
            }
            // `HeaderValue` takes any byte from 0x80 (obs-text), and an `é` was sent as its
            // raw UTF-8, which receivers read as they like.
            match http::HeaderValue::from_str(value.trim()) {
                Ok(mut v) if !value.trim().is_empty() && value.is_ascii() => {
                    v.set_sensitive(true);
                    headers.insert(parsed, v);
                }
                _ => self.problem(
                    key,
                    format!(
                        "{name:?}: its value (not shown here) must be printable ASCII on one \
                         line, not empty"
                    ),
                ),
            }
        }
        headers
    }

    fn log(&mut self, f: file::LogFile) -> LogConfig {
        let format = match f.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                self.problem(
                    "log.format",
                    format!("{other:?} is not a log format; use \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        if crate::logging::normalised(&f.level).is_empty() {
            self.problem(
                "log.level",
                format!(
                    "{:?} is empty, which logs nothing of the proxy's own (its start, \
                     warnings, outages, refused reloads), the access log alone; write a level \
                     such as \"info\" (the default), \"off\" for none, or leave the key out",
                    f.level
                ),
            );
        } else if !level_or_filter(&f.level) {
            self.problem(
                "log.level",
                format!(
                    "{:?} is not a level; use \"error\", \"warn\", \"info\", \"debug\" or \
                     \"trace\", or a filter that gives each target its level, such as \
                     \"info,hyper=debug\"",
                    f.level
                ),
            );
        } else if !sets_own_level(&f.level) {
            let level = crate::logging::normalised(&f.level);
            self.problem(
                "log.level",
                format!(
                    "{:?} gives no level to the proxy's own lines: a filter of targets alone \
                     logs nothing else, so the start, warnings, outages and refused reloads \
                     would go unlogged (the access log alone is written); put a level first, \
                     like \"info,{level}\", or name intermission's, like \
                     \"intermission=info,{level}\"",
                    f.level
                ),
            );
        }
        LogConfig {
            format,
            access_log: f.access_log,
            level: f.level,
        }
    }
}

/// Whether `level` is a level or a tracing filter whose every bare word is a level. A tracing
/// filter takes any other bare word as a target to log at every level: a mistyped `"warnn"`
/// would log nothing but that (non-existent) target, silencing the start, the warnings and the
/// outages while the config looked valid.
/// Spaces around a directive are not part of it (`logging::normalised`). `RUST_LOG` is held
/// to the same.
/// Nothing but spaces and commas is no filter either: tracing reads it as no directive at all,
/// and `level = ""` passed `check`, then the proxy wrote its access log and not one other line
/// (no start, no warning, no outage, no refused reload).
pub(crate) fn level_or_filter(level: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let directives = crate::logging::normalised(level);
    !directives.is_empty()
        && tracing_subscriber::EnvFilter::try_new(directives).is_ok()
        && level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && !d.contains('='))
            .all(|d| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)))
}

/// Whether the filter `level` (valid: `level_or_filter`) decides the level of the proxy's own
/// lines: a bare level, or a directive for `intermission` itself. tracing gives a target no
/// directive names no level at all: `"hyper=debug"` passed `check`, and the proxy then logged
/// hyper and its access log, and not its start, a warning or an outage. `RUST_LOG` is held to
/// it too, less strictly (`logging::chosen`): one that fails it is read on top of `log.level`.
pub(crate) fn sets_own_level(level: &str) -> bool {
    // Not one naming a span (`intermission[conn]=debug`): it gives a level inside that span
    // alone, and the start, warnings and outages, logged in none, went unlogged too.
    level.split(',').map(str::trim).any(|d| {
        !d.is_empty()
            && !d.contains('[')
            && (!d.contains('=') || d.split('=').next() == Some("intermission"))
    })
}

const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// The shortest `health.interval` and `down_interval`: ten checks a second per server, per
/// proxy, already more than HAProxy's and nginx's defaults (2 s, 5 s) by far. `"1ms"` passed,
/// a thousand checks a second at each server, each timed out at the next millisecond's hiccup.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// The shortest `health.timeout`, as short as the shortest interval (the timeout is at most
/// the interval). `"1ms"` passed: a check fails at the first millisecond a live server, its
/// machine or the network is late by (even over loopback, a scheduling delay or a pause of
/// the server's runtime is several), and a failed check counts towards `fall` as a dead
/// server's does: every server taken out alike is an outage answered to every client. 10 ms
/// would still fail at an ordinary garbage-collection pause or a TLS handshake to another
/// host; a check that must notice a hung server sooner has no use for less than the 100 ms
/// between two checks.
const MIN_CHECK_TIMEOUT: Duration = Duration::from_millis(100);

/// The most `health.rise` may be. `4294967295` passed: a server back after an outage was
/// never used again, and the outage never ended. Load balancers' own bounds are lower still
/// (AWS's and Google Cloud's healthy thresholds stop at 10); 100 checks are 10 s at the
/// shortest down_interval and over 3 minutes at the default 2 s. `fall` has no such bound,
/// only a warning (`FALL_WARNED`): a large one delays the outage mode and its notifications,
/// while each request to the dead server is still retried or held, and tests keep a failing
/// server in rotation with it.
const MAX_RISE: u32 = 100;

/// Above this, `health.fall` is warned of.
const FALL_WARNED: u32 = 100;

/// Below this, `proxy.header_read_timeout`, `upstream.connect_timeout` and
/// `upstream.response_timeout` are warned of: a client's head or a server's answer a few
/// milliseconds late (a busy machine, a pause of its runtime, a network hop) is cut off.
const LOW_TIMEOUT: Duration = Duration::from_millis(100);

/// Past this, the time health checks take to notice that a server stopped or came back
/// (`fall` × `interval`, `rise` × `down_interval`) is warned of: ten minutes of clients
/// sent to a dead server, or of outage answers after it is back.
const SLOW_NOTICE: Duration = Duration::from_secs(600);

/// `proxy.threads` at most: far more cores than any machine this runs on has.
const MAX_THREADS: usize = 1024;

/// The largest `proxy.max_header_bytes`.
const MAX_HEADER_BYTES: usize = 1 << 20;

/// The units a duration may use. humantime also reads months (`M`), years, `us` and `ns`: a
/// `5M` typed for five minutes would be five months, so those are refused. Weeks are kept:
/// nothing else is spelled `w`, and a config that said `bypass_ttl = "1w"` keeps working.
const DURATION_UNITS: &[&str] = &[
    "ms", "msec", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes",
    "h", "hr", "hrs", "hour", "hours", "d", "day", "days", "w", "week", "weeks",
];

const DURATION_FORMS: &str =
    "write \"250ms\", \"90s\", \"5m\", \"1h30m\", \"2d\" or a number of seconds";

/// `"250ms"`, `"90s"`, `"1h30m"`, `"1.5h"`, or a plain number of seconds; units from
/// `DURATION_UNITS` only. Used by the config and by `ctl` (`--retry-after`, `+DURATION`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{text:?} is too large"));
    }
    // humantime does the arithmetic; the units are checked first. Any run of letters after
    // a number is a unit to humantime, so every one is checked. Text with no number at all
    // ("soon") is no duration, whatever its letters, and humantime says so.
    let units = t
        .split(|c: char| !c.is_alphabetic())
        .filter(|u| !u.is_empty() && t.contains(|c: char| c.is_ascii_digit()));
    for unit in units {
        if !DURATION_UNITS.contains(&unit) {
            let case = if DURATION_UNITS.contains(&unit.to_lowercase().as_str()) {
                " (units are lower case)"
            } else {
                ""
            };
            return Err(format!(
                "{text:?}: {unit:?} is not a unit of duration here{case}; use ms, s, m, h, d or w: {DURATION_FORMS}"
            ));
        }
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        // humantime takes a fraction only when it comes out exact: 1.5h, not 1.333h.
        let exact = if t.contains('.') && e == humantime::DurationError::NumberOverflow {
            "; a fraction must come out exact, in whole seconds for h and d (\"1.5h\", not \"1.333h\")"
        } else {
            ""
        };
        format!("{text:?} is not a duration ({e}){exact}; {DURATION_FORMS}")
    })?;
    // `"100us"` is refused by its unit, and `"0.0001s"` said the same in a fraction: nothing
    // here is timed to less than a millisecond, and such a value is a slip.
    if !d.is_zero() && d < Duration::from_millis(1) {
        return Err(format!(
            "{text:?} is less than a millisecond ({}); the shortest duration is \"1ms\"",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

/// Whether listeners on `a` and `b` cannot both be bound: the same port (not 0, which picks a
/// free one) on the same address, or on a wildcard address and another of its family. A
/// wildcard IPv6 address takes IPv4 too (Linux's default `bindv6only = 0`).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, o: SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv4() == o.is_ipv4() || w.is_ipv6())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// The state file may not exist yet (it is written at the first change), but the folder it
/// is written in must, since the atomic write creates its temporary file there.
pub fn state_file_folder(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!(
            "{} is a folder; name a file in it, like {}",
            path.display(),
            path.join("intermission-state.json").display()
        ));
    }
    folder_of(path, "the state file")
}

/// Whether `a` and `b` name one file: the same file where both exist (links included), else
/// the same name in the same folder once the folder's links are followed.
fn same_place(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return (x.dev(), x.ino()) == (y.dev(), y.ino());
    }
    let place = |p: &Path| {
        let folder = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let folder = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf());
        (folder, p.file_name().map(ToOwned::to_owned))
    };
    place(a) == place(b)
}

/// The longest control socket path: a Unix socket's address holds 107 bytes, and the socket
/// is bound under a temporary name beside it (`.{pid}/{name}`, `control::server::bind`),
/// nine bytes longer with the longest process id.
const MAX_SOCKET_PATH: usize = 107 - 9;

/// Why `path` is too long for a control socket, if it is: said alike by `check`, `run` and a
/// reload of a config, and by `ctl` of the socket it was told to reach, where the system's
/// "path must be shorter than SUN_LEN" said neither the limit nor by how much.
pub fn socket_path_too_long(path: &Path) -> Option<String> {
    let len = path.as_os_str().len();
    (len > MAX_SOCKET_PATH).then(|| {
        format!(
            "{} is {len} bytes long; a control socket's path takes at most {MAX_SOCKET_PATH} \
             (the system's limit for a Unix socket, less the temporary name it is made under)",
            path.display()
        )
    })
}

/// What would stop the control socket being made at start: its folder missing, a path too
/// long for a Unix socket, or a file that is not a socket in its place (never replaced).
fn socket_path(path: &Path) -> Result<(), String> {
    if let Some(long) = socket_path_too_long(path) {
        return Err(format!(
            "{long}: name one nearer the root, like /run/intermission/intermission.sock"
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; the proxy never replaces it: name another path",
                path.display()
            ));
        }
    }
    folder_of(path, "the control socket")
}

/// The folder `path` (`what`) is made in exists and is a folder.
fn folder_of(path: &Path, what: &str) -> Result<(), String> {
    let folder = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(folder) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a folder, so {what} {} cannot be made in it",
            folder.display(),
            path.display()
        )),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Err(format!(
                "the folder {} does not exist, so {what} {} cannot be made; create it, or name \
                 a file in a folder that exists",
                folder.display(),
                path.display()
            ))
        }
        // Not ours to see (`check` run by another user than the service, a folder behind a
        // 0700 one as systemd's `StateDirectory` makes): whoever runs the proxy may reach it,
        // and a start that cannot use it says so.
        Err(_) => Ok(()),
    }
}

/// `"200-399"`, `"200,204"`, `"200-299, 301"`: inclusive status ranges.
fn parse_status_ranges(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let bad = || format!("{text:?} is not a list of statuses; write \"200-399\" or \"200,204\"");
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: u16 = lo.parse().map_err(|_| bad())?;
        let hi: u16 = hi.parse().map_err(|_| bad())?;
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(bad());
        }
        out.push((lo, hi));
    }
    Ok(out)
}

/// The port of `authority` when it is no port: the `http` crate accepts any digits
/// (`port_u16()` is then `None`), and a connector then falls back to the scheme's default
/// port, so `:80800` would reach whatever listens on port 80. Only digits: Rust reads `+80`
/// as 80, which no one writes meaning a port.
pub(crate) fn bad_port(authority: &http::uri::Authority) -> Option<&str> {
    authority
        .as_str()
        .strip_prefix(authority.host())
        .and_then(|rest| rest.strip_prefix(':'))
        .filter(|port| {
            !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..))
        })
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    // The `http` crate keeps userinfo in the authority, and connecting would drop it
    // silently while `ctl health`, logs and metrics labels showed it. A server's address has
    // no path, so any `@` is one: a password holding a `/`, `?` or `#` ends the authority
    // before the `@` for a URL parser, and the problems below quoted the text, password and
    // all (`port "pa" is not from 1 to 65535`).
    if let Some((before, after)) = s.rsplit_once('@') {
        let scheme = before
            .split_once("://")
            .map_or("http", |(scheme, _)| scheme);
        let host = after.split(['/', '?', '#']).next().unwrap_or_default();
        return Err(format!(
            "{scheme}://…@{host}: a user name or password (before the @, not repeated here) does \
             not belong in a server address: intermission does not send it, and the address is \
             shown in `ctl health`, logs and metrics; write \"{scheme}://{host}\""
        ));
    }
    // The `http` crate drops a fragment without a word: the address `check` passed was not
    // the one written.
    if let Some((before, _)) = s.split_once('#') {
        return Err(format!(
            "{s:?} has a fragment (from the #), which a server address has no use for; write \
             \"{before}\""
        ));
    }
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}); write \"http://HOST:PORT\""))?;
    let (protocol, scheme) = match uri.scheme_str() {
        Some("http") => (Protocol::Http, http::uri::Scheme::HTTP),
        Some("https") => (Protocol::Https, http::uri::Scheme::HTTPS),
        Some("h2c") => (Protocol::H2c, http::uri::Scheme::HTTP),
        Some(other) => {
            return Err(format!(
                "{s:?}: scheme {other}:// is not supported; use http://, https:// or h2c://"
            ));
        }
        None => return Err(format!("{s:?} has no scheme; write \"http://{s}\"")),
    };
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!("{s:?} has no host; write \"http://HOST:PORT\""));
    };
    if authority.host().is_empty() {
        return Err(format!("{s:?} has no host; write \"http://HOST:PORT\""));
    }
    let authority = unescaped_zone(authority);
    if let Some(port) = bad_port(&authority) {
        return Err(format!("{s:?}: port {port:?} is not from 1 to 65535"));
    }
    if let Some(why) = not_ipv4(authority.host()).or_else(|| zone_problem(authority.host())) {
        return Err(format!("{s:?}: {why}"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!(
            "{s:?} has a path; requests keep their own path, so give only scheme, host and port"
        ));
    }
    Ok(Upstream {
        protocol,
        scheme,
        authority,
    })
}

/// `authority` with its IPv6 zone unescaped. A URL writes the zone escaped (RFC 6874:
/// `[fe80::1%25eth0]`), and the system's resolver, which the connector asks for any host that
/// is not a plain address, reads only `%eth0`: the escaped form passed `check`, then failed
/// every connect as a name that does not resolve (a server: the site in outage; a webhook:
/// every event given up).
fn unescaped_zone(authority: http::uri::Authority) -> http::uri::Authority {
    match authority.as_str().split_once("%25") {
        Some((literal, zone)) if literal.starts_with('[') => {
            format!("{literal}%{zone}").parse().unwrap_or(authority)
        }
        _ => authority,
    }
}

/// Why the IPv6 zone of `host` (`[fe80::1%eth0]`, escaped or not) cannot be dialled: the
/// system's resolver takes a zone on a link-local address only (`fe80::/10`, and multicast of
/// link scope), and read `[2001:db8::5%eth0]` as a name that does not resolve, every connect
/// failing after `check` had passed it.
fn zone_problem(host: &str) -> Option<String> {
    let inner = host.strip_prefix('[')?.strip_suffix(']')?;
    let (address, zone) = inner.split_once('%')?;
    let first = address.parse::<std::net::Ipv6Addr>().ok()?.segments()[0];
    let link_local = first & 0xffc0 == 0xfe80 || first & 0xff0f == 0xff02;
    (!link_local).then(|| {
        format!(
            "the zone %{zone} is for a link-local address (fe80::…) only, and {address} is \
             none: write [{address}] without it"
        )
    })
}

/// A webhook's URL as it is dialled: its IPv6 zone unescaped (`unescaped_zone`).
fn webhook_dialled(url: http::Uri) -> http::Uri {
    let mut parts = url.clone().into_parts();
    parts.authority = parts.authority.map(unescaped_zone);
    http::Uri::from_parts(parts).unwrap_or(url)
}

/// Why `host` is no host, when it ends in a number as an IPv4 address does (WHATWG URL's
/// "ends in a number": no top-level domain is numeric) and is no IPv4 address either:
/// `256.1.1.1`, `10.1`, `010.0.0.1`, `0x7f.1`. The resolver took `256.1.1.1` for a name,
/// which never resolves (the site in outage, `check` having passed it), and reads `10.1` as
/// `inet_aton` does, 10.0.0.1, and `010.0.0.1` as 8.0.0.1: another server than written.
fn not_ipv4(host: &str) -> Option<String> {
    let last = host.rsplit('.').next().unwrap_or_default();
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    let number = hex || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()));
    if !number || host.parse::<std::net::Ipv4Addr>().is_ok() {
        return None;
    }
    Some(format!(
        "host {host:?} is not an IPv4 address: write four numbers from 0 to 255 without \
         leading zeros, like 10.0.0.5 (a host name cannot end in a number)"
    ))
}

/// A reserved prefix that browsers request as it is written: the pages link to
/// `{prefix}assets/…` and poll `{prefix}status`, and a browser percent-encodes a character
/// outside RFC 3986's path characters (`"`, `é`, a space) and resolves `.` and `..` segments
/// before it asks, so that such a prefix would never match the requests made for it.
fn is_plain_prefix(prefix: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c);
    let Some(inner) = prefix
        .strip_prefix('/')
        .and_then(|rest| rest.strip_suffix('/'))
    else {
        return false;
    };
    inner
        .split('/')
        .all(|segment| !matches!(segment, "" | "." | "..") && segment.chars().all(allowed))
}

/// Why `path` names no file a certificate or key can be read from, when it does not: a
/// missing file, a symbolic link to nothing (a Kubernetes secret's `..data` swapped away), a
/// folder on the path the proxy's user may not enter (certbot's `live/` is root's alone), or
/// something other than a file. "is not a readable file" alone left an operator guessing.
fn not_a_file(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => None,
        Ok(meta) if meta.is_dir() => Some("it is a folder".to_owned()),
        Ok(_) => Some("it is not a regular file".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(match std::fs::read_link(path) {
                Ok(target) => format!(
                    "it is a symbolic link to {}, which does not exist",
                    target.display()
                ),
                Err(_) => "it does not exist".to_owned(),
            })
        }
        Err(e) => Some(crate::tls::read_problem(&e)),
    }
}

/// The entries of `nets` that cover a whole address family, with their index and the
/// family's name.
fn whole_families(nets: &[IpNet]) -> impl Iterator<Item = (usize, &IpNet, &'static str)> {
    nets.iter()
        .enumerate()
        .filter(|(_, net)| net.prefix_len() == 0)
        .map(|(i, net)| {
            let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
            (i, net, family)
        })
}

/// How many addresses `net` holds, said as a number up to 2^64 and as a power of two past it.
fn addresses(net: &IpNet) -> String {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    if host_bits < 64 {
        (1u64 << host_bits).to_string()
    } else {
        format!("2^{host_bits}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::mode::MAX_MESSAGE_CHARS;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::parse(text, Path::new("."), None) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// Each problem as (key, message), for comparing a list whole.
    fn said(p: &[Problem]) -> Vec<(&str, &str)> {
        p.iter()
            .map(|p| (p.key.as_str(), p.message.as_str()))
            .collect()
    }

    fn keys(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn cors_origins_must_be_origins_and_are_named_when_not() {
        let c = Config::parse(
            "[maintenance]\ncors_origins = [\"https://app.example.com\", \"*\"]\n",
            Path::new("."),
            None,
        )
        .unwrap();
        assert_eq!(c.maintenance.cors_origins.len(), 2);
        let p = problems(
            "[maintenance]\ncors_origins = [\"https://ok.example\", \"https://app.example.com/\"]\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "maintenance.cors_origins[1]");
        assert!(
            p[0].message
                .contains("browsers send https://app.example.com"),
            "{p:?}"
        );
        assert!(Config::parse("", Path::new("."), None)
            .unwrap()
            .maintenance
            .cors_origins
            .is_empty());
    }

    #[test]
    fn empty_config_gives_documented_defaults() {
        let c = Config::parse("", Path::new("."), None).unwrap();
        assert_eq!(
            c.proxy.listen,
            vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.proxy.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.proxy.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.upstream.servers[0].to_string(), "http://127.0.0.1:3000");
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(60));
        assert_eq!(c.upstream.read_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.proxy.send_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.proxy.body_read_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.log.format, LogFormat::Text);
        assert!(c.log.access_log);
        assert_eq!(c.maintenance.retry_after, Duration::from_secs(300));
        assert_eq!(c.maintenance.outage_retry_after, Duration::from_secs(30));
        assert_eq!(c.maintenance.reserved_prefix, "/_intermission/");
        assert_eq!(c.maintenance.api_prefixes, vec!["/api/".to_owned()]);
        assert_eq!(c.control.socket_mode, 0o600);
        assert_eq!(c.control.socket, Path::new("./intermission.sock"));
    }

    #[test]
    fn a_status_page_must_be_a_whole_url() {
        for bad in [
            "https://status.example.com/ x",
            "https://",
            "http:///path",
            "ftp://status",
        ] {
            let p = problems(&format!("[maintenance]\nstatus_page = \"{bad}\"\n"));
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert_eq!(p[0].key, "maintenance.status_page", "{bad}");
        }
        for good in [
            "",
            "https://status.example.com",
            "https://status.example.com/incidents?id=1#now",
            "http://10.0.0.1:8080/status",
            "https://statut.exemple.fr/état",
        ] {
            let p = problems(&format!("[maintenance]\nstatus_page = \"{good}\"\n"));
            assert!(p.is_empty(), "{good}: {p:?}");
        }
    }

    /// Read as the config's own folder, it was refused as "cannot read ./maintenance.html".
    #[test]
    fn an_empty_pages_key_says_to_leave_it_out() {
        let p = problems("[maintenance]\npages = \"\"\n");
        assert_eq!(
            said(&p),
            [(
                "maintenance.pages",
                "is empty; name the folder of the pages, or leave the key out for the `pages` \
                 folder beside the config (else the built-in pages)"
            )]
        );
    }

    /// `threads = 2` above every header was "unknown section; expected one of: …".
    #[test]
    fn a_key_before_any_section_says_where_it_belongs() {
        let p = problems("threads = 2\nlisten = \"1\"\nnope = 1\n[proxy]\n[proxi]\n");
        assert_eq!(
            said(&p),
            [
                (
                    "listen",
                    "is written before any [section], where no key belongs; it is a key of \
                     [proxy], [tls], [admin]: move it under its section's header"
                ),
                (
                    "nope",
                    "is written before any [section], where no key belongs; and no section \
                     has such a key: move it under its section's header"
                ),
                (
                    "proxi",
                    "unknown section; expected one of: proxy, tls, upstream, health, \
                     maintenance, control, admin, notify, log"
                ),
                (
                    "threads",
                    "is written before any [section], where no key belongs; it is a key of \
                     [proxy]: move it under its section's header"
                ),
            ]
        );
    }

    /// `hsts_preload` with a plaintext listener that answers rather than redirects is warned
    /// of, naming the keys: hstspreload.org refuses such a domain. With `redirect_https`, or
    /// no plaintext listener (a redirect made elsewhere), it is not.
    #[test]
    fn hsts_preload_without_a_redirect_from_plaintext_is_warned_of() {
        let tls = "[tls]\nlisten = [\"127.0.0.1:8443\"]\nhsts_max_age = \"365d\"\n\
                   hsts_include_subdomains = true\nhsts_preload = true\n\
                   [[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "").unwrap();
        std::fs::write(dir.path().join("b"), "").unwrap();
        let warned = |text: &str| {
            let c = Config::parse(text, dir.path(), None).unwrap();
            c.warnings()
                .into_iter()
                .filter(|w| w.starts_with("tls.hsts_preload"))
                .collect::<Vec<_>>()
        };
        let plain = "[proxy]\nlisten = [\"127.0.0.1:8080\"]\n";
        let w = warned(&format!("{plain}{tls}"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("proxy.redirect_https = true") && w[0].contains("hstspreload.org"),
            "{w:?}"
        );
        let redirect = "[proxy]\nlisten = [\"127.0.0.1:8080\"]\nredirect_https = true\n";
        assert!(warned(&format!("{redirect}{tls}")).is_empty());
        assert!(warned(&format!("[proxy]\nlisten = []\n{tls}")).is_empty());
        let no_preload = tls.replace("hsts_preload = true\n", "");
        assert!(warned(&format!("{plain}{no_preload}")).is_empty());
    }

    /// The header is rendered once, as RFC 6797 writes it; set with no TLS listener, which
    /// alone sends it, it is said to do nothing, not refused (a config staged before its
    /// certificates).
    #[test]
    fn hsts_is_rendered_once_and_warned_of_with_nothing_to_send_it() {
        let c = Config::parse(
            "[tls]\nhsts_max_age = \"1h\"\nhsts_include_subdomains = true\n",
            Path::new("."),
            None,
        )
        .unwrap();
        let hsts = c.tls.hsts.as_ref().unwrap();
        assert_eq!(hsts.value(), "max-age=3600; includeSubDomains");
        assert_eq!(
            hsts.line(),
            b"strict-transport-security: max-age=3600; includeSubDomains\r\n"
        );
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("tls.hsts_max_age is set, but there is no tls.listen"));
        let off = Config::parse("", Path::new("."), None).unwrap();
        assert!(off.tls.hsts.is_none());
        let p = problems("[tls]\nhsts_max_age = \"2y\"\nhsts_preload = true\n");
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["tls.hsts_max_age", "tls.hsts_preload"]);
        assert!(p[0].message.ends_with("; a year is \"365d\""), "{p:?}");
        let p = problems("[tls]\nhsts_max_age = \"max-age=31536000; includeSubDomains\"\n");
        assert!(p[0].message.contains("write the length alone"), "{p:?}");
    }

    /// Valid, and it turns maintenance off for every client of a family: said, not refused.
    #[test]
    fn allowing_every_address_is_warned_of() {
        let c = Config::parse(
            "[maintenance]\nallow_ips = [\"10.0.0.0/8\", \"0.0.0.0/0\", \"::/0\"]\n",
            Path::new("."),
            None,
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("maintenance.allow_ips[1] \"0.0.0.0/0\" lets every IPv4 client"),
            "{w:?}"
        );
        assert!(w[1].starts_with("maintenance.allow_ips[2] \"::/0\" lets every IPv6 client"));
    }

    /// Valid, and of no effect: said, not refused.
    #[test]
    fn an_https_port_without_redirects_is_warned_of() {
        let c = Config::parse("[proxy]\nhttps_port = 8443\n", Path::new("."), None).unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "proxy.https_port = 8443 is set, but proxy.redirect_https is not true"
            ),
            "{w:?}"
        );
    }

    /// Valid, and maintenance then holds almost nothing, or the entry nothing: said, not
    /// refused.
    #[test]
    fn allowing_every_path_or_a_reserved_one_is_warned_of() {
        let c = Config::parse(
            "[maintenance]\nallow_paths = [\"/health\", \"/\", \"/_intermission/status\", \"/_\"]\n",
            Path::new("."),
            None,
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("maintenance.allow_paths[1] \"/\" lets every request through"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with(
                "maintenance.allow_paths[2] \"/_intermission/status\" is under \
                 maintenance.reserved_prefix \"/_intermission/\""
            ),
            "{w:?}"
        );
    }

    /// Valid, and the proxy then answers part of the application's API itself in every mode:
    /// said, not refused, whichever of the two prefixes is under the other. Apart is silent,
    /// and so is `"/"` (an application that is all API), which every reserved_prefix is under.
    #[test]
    fn a_reserved_prefix_overlapping_an_api_prefix_is_warned_of() {
        let warnings = |text: &str| {
            Config::parse(&format!("[maintenance]\n{text}\n"), Path::new("."), None)
                .unwrap()
                .warnings()
        };
        // The default api_prefixes, ["/api/"].
        let w = warnings("reserved_prefix = \"/api/\"");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "maintenance.api_prefixes[0] \"/api/\" is maintenance.reserved_prefix itself"
            ),
            "{w:?}"
        );
        let w = warnings(
            "reserved_prefix = \"/api/\"\napi_prefixes = [\"/v1/\", \"/api/v2/\", \"/ap\", \"/\"]",
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with(
                "maintenance.api_prefixes[1] \"/api/v2/\" is under \
                 maintenance.reserved_prefix \"/api/\""
            ),
            "{w:?}"
        );
        assert!(
            w[1].starts_with(
                "maintenance.reserved_prefix \"/api/\" is under maintenance.api_prefixes[2] \"/ap\""
            ),
            "{w:?}"
        );
        for apart in [
            "reserved_prefix = \"/_maint/\"",
            "api_prefixes = [\"/\"]",
            "reserved_prefix = \"/apis/\"\napi_prefixes = [\"/api/\"]",
        ] {
            assert_eq!(warnings(apart), Vec::<String>::new(), "{apart}");
        }
    }

    /// `path` and `expect` are read by HTTP checks alone, as `host` (refused with another
    /// kind) is: set with another kind, said, not refused; left at their defaults, silent.
    #[test]
    fn a_health_path_or_expect_no_check_reads_is_warned_of() {
        let warnings = |text: &str| {
            Config::parse(&format!("[health]\n{text}\n"), Path::new("."), None)
                .unwrap()
                .warnings()
        };
        let w = warnings("kind = \"tcp\"\npath = \"/healthz\"\nexpect = \"200\"");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("health.path \"/healthz\" is set, but health.kind = \"tcp\""),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("health.expect is set, but health.kind = \"tcp\""),
            "{w:?}"
        );
        let w = warnings(
            "kind = \"grpc\"\nexpect = \"204\"\n[upstream]\nservers = [\"h2c://127.0.0.1:50051\"]",
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("health.expect is set, but health.kind = \"grpc\""),
            "{w:?}"
        );
        for quiet in [
            "kind = \"tcp\"",
            "kind = \"tcp\"\npath = \"/\"\nexpect = \"200-399\"",
            "kind = \"http\"\npath = \"/healthz\"\nexpect = \"200\"",
        ] {
            assert_eq!(warnings(quiet), Vec::<String>::new(), "{quiet}");
        }
    }

    /// Valid, and it lets any client forge the address `allow_ips` and the log go by: said,
    /// not refused. `::ffff:0:0/96` is every IPv4 client too.
    #[test]
    fn trusting_every_address_as_a_proxy_is_warned_of() {
        let c = Config::parse(
            "[proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"::ffff:0:0/96\", \"::/0\"]\n",
            Path::new("."),
            None,
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with(
                "proxy.trusted_proxies[1] \"0.0.0.0/0\" trusts every IPv4 client as a proxy: \
                 any of them can write an address of maintenance.allow_ips into \
                 X-Forwarded-For"
            ),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("proxy.trusted_proxies[2] \"::/0\" trusts every IPv6 client"),
            "{w:?}"
        );
        assert!(w[1].ends_with("name the load balancer's addresses (or its subnet) instead"));
    }

    /// A check given a millisecond fails a live server at the least delay, and every
    /// server alike: an outage of a site that is up.
    #[test]
    fn a_health_timeout_under_100ms_is_refused() {
        for (timeout, shown) in [("1ms", "1ms"), ("0.099s", "99ms")] {
            let p = problems(&format!("[health]\ntimeout = \"{timeout}\"\n"));
            assert_eq!(
                said(&p),
                [(
                    "health.timeout",
                    format!(
                        "{shown} is shorter than 100ms, the shortest check timeout: a live \
                         server whose answer is a little late (a pause of its runtime, a busy \
                         machine, a TLS handshake) fails its check, and every server that \
                         does, at once, takes the whole site into outage; the default is 1s"
                    )
                    .as_str()
                )]
            );
        }
        let c = Config::parse("[health]\ntimeout = \"100ms\"\n", Path::new("."), None).unwrap();
        assert_eq!(c.health.timeout, Duration::from_millis(100));
    }

    /// The sections written, for a reload to say which one a new file no longer has.
    #[test]
    fn the_sections_written_are_kept() {
        let c = Config::parse(
            "[log]\n[proxy]\n[[notify]]\nurl = \"https://h.example/x\"\n",
            Path::new("."),
            None,
        )
        .unwrap();
        assert_eq!(c.sections, ["proxy", "notify", "log"]);
    }

    #[test]
    fn maintenance_and_control_problems_name_their_keys() {
        let text = r#"
            [maintenance]
            pages = "no/such/folder"
            reserved_prefix = "_x"
            status_page = "ftp://status"
            bypass_secret = "short"
            allow_paths = ["acme/"]
            allow_ips = ["nope"]
            retry_after = "later"
            [control]
            socket_mode = "rw-------"
        "#;
        assert_eq!(
            keys(text),
            vec![
                "maintenance.pages",
                "maintenance.reserved_prefix",
                "maintenance.status_page",
                "maintenance.bypass_secret",
                "maintenance.retry_after",
                "maintenance.allow_paths[0]",
                "maintenance.allow_ips[0]",
                "control.socket_mode",
            ]
        );
    }

    /// A prefix a browser would rewrite (percent-encoded, dot segments resolved) is refused:
    /// the page's status, assets and preview would never be reached under it.
    #[test]
    fn a_reserved_prefix_must_be_requested_as_written() {
        for bad in [
            "/é/", "/_im\"x/", "/_i/../", "/./", "/a//b/", "/_i<x>/", "/a b/", "/a%2e/", "/a?/",
        ] {
            let text = format!("[maintenance]\nreserved_prefix = {bad:?}\n");
            assert_eq!(keys(&text), vec!["maintenance.reserved_prefix"], "{bad}");
        }
        for good in [
            "/_intermission/",
            "/-/",
            "/.well-known/intermission/",
            "/a.b~c/d_e/",
        ] {
            let text = format!("[maintenance]\nreserved_prefix = {good:?}\n");
            assert!(keys(&text).is_empty(), "{good}: {:?}", keys(&text));
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("run")).expect("folder");
        let c = Config::parse("[control]\nsocket = \"run/x.sock\"\n", dir.path(), None).unwrap();
        assert_eq!(c.control.socket, dir.path().join("run/x.sock"));
        assert_eq!(
            c.control.state_file,
            dir.path().join("intermission-state.json")
        );
        assert_eq!(c.maintenance.pages, PagesSource::BuiltIn);
    }

    /// The state file is written at the first change: a folder that is not there must be
    /// found by `check`, not by the first `ctl on` of an incident.
    #[test]
    fn the_state_file_s_folder_must_exist() {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path();
        std::fs::write(base.join("plain"), "").expect("file");
        for (state_file, says) in [
            ("nodir/state.json", "does not exist"),
            ("plain/state.json", "is not a folder"),
            // A file where a folder should be, further up.
            ("plain/sub/state.json", "does not exist"),
            (".", "is a folder"),
        ] {
            let text = format!("[control]\nstate_file = \"{state_file}\"\n");
            let p = match Config::parse(&text, base, None) {
                Err(ConfigError::Invalid { problems, .. }) => problems,
                other => panic!("{state_file}: {other:?}"),
            };
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].key, "control.state_file");
            assert!(p[0].message.contains(says), "{p:?}");
        }
        // The file itself need not exist yet; its folder does.
        let text = "[control]\nstate_file = \"new.json\"\n";
        assert!(Config::parse(text, base, None).is_ok());
    }

    /// A state file on the control socket's path or on the config file itself would be
    /// written over by the first save: refused, naming the keys.
    #[test]
    fn the_state_file_has_a_path_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        for (text, says) in [
            (
                "[control]\nsocket = \"im.sock\"\nstate_file = \"./im.sock\"\n",
                "control.socket",
            ),
            (
                "[control]\nstate_file = \"config.toml\"\n",
                "this config file",
            ),
        ] {
            std::fs::write(&config, text).unwrap();
            let p = match Config::load_file(&config) {
                Err(ConfigError::Invalid { problems, .. }) => problems,
                other => panic!("{text}: {other:?}"),
            };
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].key, "control.state_file");
            assert!(p[0].message.contains(says), "{}", p[0].message);
        }
    }

    /// What would stop the control socket being made at start is found by `check` and reload.
    #[test]
    fn the_control_socket_can_be_made() {
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path();
        std::fs::write(base.join("notes.txt"), "keep me").expect("file");
        let long = format!("{}/x.sock", "d".repeat(120));
        for (socket, says) in [
            ("nodir/x.sock", "does not exist"),
            ("notes.txt", "exists and is not a socket"),
            (long.as_str(), "bytes long"),
        ] {
            let text = format!("[control]\nsocket = \"{socket}\"\n");
            let p = match Config::parse(&text, base, None) {
                Err(ConfigError::Invalid { problems, .. }) => problems,
                other => panic!("{socket}: {other:?}"),
            };
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].key, "control.socket");
            assert!(p[0].message.contains(says), "{p:?}");
        }
        let text = "[control]\nsocket = \"new.sock\"\n";
        assert!(Config::parse(text, base, None).is_ok());
        assert_eq!(
            std::fs::read_to_string(base.join("notes.txt"))
                .ok()
                .as_deref(),
            Some("keep me")
        );
    }

    /// Two listeners on one port of one address (or a wildcard and an address it covers)
    /// would fail the start with "Address already in use".
    #[test]
    fn listeners_that_would_clash_are_named() {
        // The certificates' files do not exist here: only the listeners' problems are looked at.
        let clash = |text: &str| -> Vec<String> {
            keys(text)
                .into_iter()
                .filter(|k| k.ends_with("listen"))
                .collect()
        };
        assert_eq!(
            clash("[proxy]\nlisten = [\"127.0.0.1:8080\"]\n[admin]\nlisten = \"127.0.0.1:8080\"\n"),
            ["admin.listen"]
        );
        let tls = "[tls]\nlisten = [\"127.0.0.1:8443\"]\n[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n";
        assert_eq!(
            clash(&format!("[proxy]\nlisten = [\"0.0.0.0:8443\"]\n{tls}")),
            ["tls.listen"]
        );
        assert_eq!(
            clash("[proxy]\nlisten = [\"[::]:8080\", \"127.0.0.1:8080\"]\n"),
            ["proxy.listen"]
        );
        // Different ports, another family's specific address, port 0 and a repeat are fine.
        for fine in [
            "[proxy]\nlisten = [\"127.0.0.1:8080\"]\n[admin]\nlisten = \"127.0.0.1:9090\"\n",
            "[proxy]\nlisten = [\"0.0.0.0:8080\", \"[::1]:8080\"]\n",
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            "[proxy]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:8080\"]\n",
        ] {
            assert!(clash(fine).is_empty(), "{fine}");
        }
    }

    /// A mode that keeps the proxy's own user out of its socket is refused; one that lets
    /// every local user in is warned of.
    #[test]
    fn a_socket_mode_must_let_its_owner_in_and_is_warned_of_when_open_to_all() {
        for mode in [
            "0000", "0400", "0200", "0500", "0300", "0100", "0066", "0466",
        ] {
            let p = problems(&format!("[control]\nsocket_mode = \"{mode}\"\n"));
            assert_eq!(p.len(), 1, "{mode}: {p:?}");
            assert_eq!(p[0].key, "control.socket_mode");
            assert!(
                p[0].message.contains("the owner needs read and write"),
                "{mode}: {}",
                p[0].message
            );
        }
        let warnings = |mode: &str| {
            let text = format!("[control]\nsocket_mode = \"{mode}\"\n");
            Config::parse(&text, Path::new("."), None)
                .map(|c| c.warnings())
                .unwrap_or_else(|e| panic!("{mode}: {e}"))
        };
        for mode in ["0600", "0660", "0700", "0770", "0640", "0604"] {
            assert_eq!(warnings(mode), Vec::<String>::new(), "{mode}");
        }
        for mode in ["0777", "0666", "0602", "0o622"] {
            let w = warnings(mode);
            assert_eq!(w.len(), 1, "{mode}: {w:?}");
            assert!(w[0].contains("lets every local user connect"), "{w:?}");
        }
        assert!(warnings("0777")[0].starts_with("control.socket_mode \"0777\""));
    }

    #[test]
    fn a_short_webhook_secret_is_warned_about_and_never_shown() {
        let warnings = |secret: &str| {
            let text = format!(
                "[[notify]]\nurl = \"https://hooks.example/x\"\n\n[[notify]]\n\
                 url = \"https://hooks.example/y\"\nsecret = \"{secret}\"\n"
            );
            Config::parse(&text, Path::new("."), None)
                .map(|c| c.warnings())
                .unwrap_or_else(|e| panic!("{secret}: {e}"))
        };
        for secret in ["", "0123456789abcdef", "ééééééééééééééééé"] {
            assert_eq!(warnings(secret), Vec::<String>::new(), "{secret:?}");
        }
        for secret in ["Z", "hunter2", "0123456789abcde"] {
            let w = warnings(secret);
            assert_eq!(w.len(), 1, "{secret:?}: {w:?}");
            let n = secret.len();
            assert!(
                w[0].starts_with(&format!(
                    "notify[1].secret is too short ({n} of at least 16"
                )),
                "{w:?}"
            );
            assert!(!w[0].contains(secret), "{w:?}");
        }
    }

    #[test]
    fn a_socket_mode_written_as_a_number_says_to_write_a_string() {
        let p = problems("[control]\nsocket_mode = 0o660\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "control.socket_mode");
        assert_eq!(
            p[0].message,
            "write the mode as a string of octal digits, like \"0660\", not as a number"
        );
        // As chmod writes it: not even a TOML number, so a syntax error, which says the same.
        let p = problems("[control]\nsocket_mode = 0660\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "control.socket_mode");
        assert!(p[0].message.starts_with("line 2, column "), "{p:?}");
        assert!(
            p[0].message.ends_with("like \"0660\", not as a number)"),
            "{p:?}"
        );
        let c = Config::parse("[control]\nsocket_mode = \"0660\"\n", Path::new("."), None);
        assert_eq!(c.map(|c| c.control.socket_mode).ok(), Some(0o660));
    }

    #[test]
    fn durations() {
        let secs = |s| Some(Duration::from_secs(s));
        let table = [
            ("250ms", Some(Duration::from_millis(250))),
            ("90s", secs(90)),
            ("5m", secs(300)),
            ("1h30m", secs(5400)),
            ("1h 30m", secs(5400)),
            ("2d", secs(2 * 86400)),
            ("42", secs(42)),
            ("0", secs(0)),
            // The long spellings humantime reads, for the same units.
            ("250msec", Some(Duration::from_millis(250))),
            ("1sec 2secs 3second 4seconds", secs(10)),
            ("1min 2mins 3minute 4minutes", secs(600)),
            ("1hr 2hrs 3hour 4hours", secs(36000)),
            ("1day 2days", secs(3 * 86400)),
            ("1w 2week 3weeks", secs(6 * 7 * 86400)),
            ("5 minutes", secs(300)),
            // Exact fractions, as humantime reads them.
            ("1.5h", secs(5400)),
            ("0.5s", Some(Duration::from_millis(500))),
            ("1.333h", None),
            ("1.5", None),
            // Units humantime reads too, refused: 5M is five months to it, not five minutes.
            ("5M", None),
            ("1month", None),
            ("2months", None),
            ("1y", None),
            ("1yr", None),
            ("2years", None),
            ("2wk", None),
            ("10us", None),
            ("10µs", None),
            ("10usec", None),
            ("10ns", None),
            ("10nsec", None),
            ("10millis", None),
            ("5S", None),
            ("1h5M", None),
            ("soon", None),
            ("", None),
            ("-5s", None),
            ("5m30", None),
        ];
        for (text, want) in table {
            assert_eq!(parse_duration(text).ok(), want, "{text}");
        }
        let why = parse_duration("5M").unwrap_err();
        assert!(
            why.contains("\"M\" is not a unit") && why.contains("ms, s, m, h, d or w"),
            "{why}"
        );
        let why = parse_duration("1.333h").unwrap_err();
        assert!(why.contains("fraction"), "{why}");
        assert!(!parse_duration("1.5").unwrap_err().contains("fraction"));
    }

    /// Less than a millisecond, written as a fraction of a unit, is refused as `"100us"` is;
    /// `"0"`, where it means none, stays so.
    #[test]
    fn a_duration_under_a_millisecond_is_refused() {
        for text in ["0.0001s", "0.5ms", "0.000001m"] {
            let why = parse_duration(text).unwrap_err();
            assert!(why.contains("less than a millisecond"), "{text}: {why}");
        }
        assert_eq!(parse_duration("0.001s"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration("0.0s"), Ok(Duration::ZERO));
        let p = problems("[proxy]\nsend_timeout = \"0.0001s\"\nheader_read_timeout = \"0.5ms\"\n");
        assert_eq!(
            keys_of(&p),
            ["proxy.header_read_timeout", "proxy.send_timeout"],
            "{p:?}"
        );
        assert!(p[0].message.contains("\"1ms\""), "{p:?}");
    }

    fn keys_of(p: &[Problem]) -> Vec<&str> {
        let mut keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        keys
    }

    /// A thousand checks a second at each server passed as `interval = "1ms"`.
    #[test]
    fn health_checks_are_at_most_ten_a_second() {
        let p = problems("[health]\ninterval = \"1ms\"\ndown_interval = \"99ms\"\n");
        assert_eq!(
            said(&p),
            [
                (
                    "health.interval",
                    "1ms is shorter than 100ms, the shortest pace of checks: each server would \
                     be checked 1000 times a second by each proxy, and an answer slower than \
                     that (timeout is at most the interval) would take it out"
                ),
                (
                    "health.down_interval",
                    "99ms is shorter than 100ms, the shortest pace of checks: each server \
                     would be checked 10 times a second by each proxy, and an answer slower \
                     than that (timeout is at most the interval) would take it out"
                ),
            ]
        );
        let c = Config::parse(
            "[health]\ninterval = \"100ms\"\ndown_interval = \"100ms\"\ntimeout = \"100ms\"\n",
            Path::new("."),
            None,
        )
        .unwrap();
        assert_eq!(c.health.interval, Duration::from_millis(100));
    }

    #[test]
    fn integer_duration_is_seconds() {
        let c = Config::parse("[proxy]\nshutdown_timeout = 7\n", Path::new("."), None).unwrap();
        assert_eq!(c.proxy.shutdown_timeout, Duration::from_secs(7));
    }

    #[test]
    fn a_stall_timeout_of_zero_is_no_limit() {
        let timeouts = [
            ("upstream", "read_timeout"),
            ("proxy", "send_timeout"),
            ("proxy", "body_read_timeout"),
        ];
        for (table, key) in timeouts {
            let read = |c: &Config| match key {
                "read_timeout" => c.upstream.read_timeout,
                "send_timeout" => c.proxy.send_timeout,
                _ => c.proxy.body_read_timeout,
            };
            let text = format!("[{table}]\n{key} = \"0\"\n");
            assert_eq!(
                read(&Config::parse(&text, Path::new("."), None).unwrap()),
                None
            );
            let text = format!("[{table}]\n{key} = 30\n");
            let c = Config::parse(&text, Path::new("."), None).unwrap();
            assert_eq!(read(&c), Some(Duration::from_secs(30)));
            for bad in ["\"whenever\"", "\"2y\""] {
                let text = format!("[{table}]\n{key} = {bad}\n");
                assert_eq!(keys(&text), vec![format!("{table}.{key}")], "{text}");
            }
        }
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let text = r#"
            [proxy]
            listen = ["127.0.0.1:8080", "nowhere"]
            trusted_proxies = ["10.0.0.0/33"]
            header_read_timeout = "soon"
            [upstream]
            servers = ["ftp://x", "http://a:1/app"]
            connect_timeout = "0s"
            [log]
            format = "xml"
            [frobnicate]
        "#;
        assert_eq!(
            keys(text),
            vec![
                "frobnicate",
                "proxy.listen[1]",
                "proxy.trusted_proxies[0]",
                "proxy.header_read_timeout",
                "upstream.servers[0]",
                "upstream.servers[1]",
                "upstream.connect_timeout",
                "log.format",
            ]
        );
    }

    /// What the control socket refuses (`ctl on --retry-after 2d`, a message over 2,000
    /// characters) the config refuses too.
    #[test]
    fn the_config_is_held_to_the_control_socket_s_limits() {
        let long = "x".repeat(MAX_MESSAGE_CHARS + 1);
        let p = problems(&format!(
            "[maintenance]\nretry_after = \"2d\"\noutage_retry_after = \"25h\"\nmessage = \"{long}\"\n"
        ));
        let got = said(&p);
        assert_eq!(
            got,
            [
                (
                    "maintenance.message",
                    "is longer than 2000 characters: a page, not a novel"
                ),
                (
                    "maintenance.retry_after",
                    "must be at most a day: clients told to wait longer would not come back"
                ),
                (
                    "maintenance.outage_retry_after",
                    "must be at most a day: clients told to wait longer would not come back"
                ),
            ]
        );
        let at_the_limits = format!(
            "[maintenance]\nretry_after = \"24h\"\noutage_retry_after = \"1s\"\nmessage = \"{}\"\n",
            "x".repeat(MAX_MESSAGE_CHARS)
        );
        assert!(problems(&at_the_limits).is_empty());
        let p = problems("[maintenance]\nretry_after = \"500ms\"\noutage_retry_after = \"0.1s\"\n");
        let got: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            got,
            ["maintenance.retry_after", "maintenance.outage_retry_after"]
        );
        assert!(p[0].message.starts_with("must be at least 1s"), "{p:?}");
    }

    /// A config message is checked trimmed, as `ctl on --message` is, and so must be served:
    /// padded, it passed the 2,000-character limit and the pages' size budget unseen.
    #[test]
    fn config_messages_are_trimmed_as_the_control_socket_trims_them() {
        let padding = "\\n".repeat(MAX_MESSAGE_CHARS);
        let text = format!(
            "[maintenance]\nmessage = \"\"\"\n  Back at noon.\n\"\"\"\noutage_message = \"Down.{padding}\\r\"\n"
        );
        let c = Config::parse(&text, Path::new("."), None).expect("valid");
        assert_eq!(c.maintenance.message, "Back at noon.");
        assert_eq!(c.maintenance.outage_message, "Down.");
    }

    /// Zero, too long, or a mode with bits a socket has no use for: each says why.
    #[test]
    fn refused_durations_and_modes_say_why() {
        let p = problems(
            "[proxy]\nshutdown_timeout = \"0s\"\n[maintenance]\nbypass_ttl = \"400d\"\n\
             [control]\nsocket_mode = \"1770\"\n",
        );
        let got = said(&p);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].1.contains("would mean at once"), "{got:?}");
        assert!(got[1].1.contains("longer than 366 days"), "{got:?}");
        assert!(got[2].1.contains("beyond 0777"), "{got:?}");
        // Past any mode's bits, it is no permission mode at all.
        let p = problems("[control]\nsocket_mode = \"77777\"\n");
        assert!(said(&p)[0].1.contains("not a permission mode"), "{p:?}");
    }

    /// A file an editor emptied and saved with a byte-order mark is empty, not the defaults.
    #[test]
    fn a_byte_order_mark_alone_is_an_empty_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "\u{feff}\r\n").expect("write");
        assert!(matches!(
            Config::load_file(&path),
            Err(ConfigError::Empty { .. })
        ));
    }

    /// A mistyped level would otherwise be read as a target to log alone, silencing the rest.
    #[test]
    fn a_log_level_is_a_level_or_a_filter_of_levels() {
        for good in [
            "info",
            "WARN",
            "off",
            "info,hyper=warn",
            "warn,intermission=debug",
            // Spaces around a directive are not part of it.
            " info ",
            "info, hyper=warn",
        ] {
            assert!(
                problems(&format!("[log]\nlevel = \"{good}\"\n")).is_empty(),
                "{good}"
            );
        }
        // Read by tracing as no directive: the access log and nothing else.
        for empty in ["", " ", ",", " , "] {
            let p = problems(&format!("[log]\nlevel = \"{empty}\"\n"));
            assert!(
                p.len() == 1 && p[0].key == "log.level" && p[0].message.contains("is empty"),
                "{empty:?}: {p:?}"
            );
            assert!(!level_or_filter(empty), "{empty:?}");
        }
        for bad in [
            "warnn",
            "loud",
            "info,hyperr",
            "intermission",
            "info,hyper=loud",
        ] {
            let p = problems(&format!("[log]\nlevel = \"{bad}\"\n"));
            assert!(
                p.len() == 1 && p[0].key == "log.level" && p[0].message.contains("is not a level"),
                "{bad}: {p:?}"
            );
        }
    }

    /// A filter of targets alone gives none to the proxy's own lines, which tracing then
    /// drops: the start, warnings and outages went unlogged.
    #[test]
    fn a_log_filter_of_targets_alone_is_refused() {
        for bad in [
            "hyper=debug",
            "hyper=debug, h2=info",
            "intermission::gateway=debug",
            "intermission[conn]=debug",
        ] {
            let p = problems(&format!("[log]\nlevel = \"{bad}\"\n"));
            assert!(
                p.len() == 1
                    && p[0].key == "log.level"
                    && p[0]
                        .message
                        .contains("gives no level to the proxy's own lines"),
                "{bad}: {p:?}"
            );
        }
        let p = problems("[log]\nlevel = \"hyper=debug\"\n");
        assert!(p[0].message.contains("\"info,hyper=debug\""), "{p:?}");
        for good in [
            "info,hyper=debug",
            "hyper=debug,warn",
            "intermission=info,hyper=debug",
            "info,intermission[conn]=debug",
        ] {
            assert!(
                problems(&format!("[log]\nlevel = \"{good}\"\n")).is_empty(),
                "{good}"
            );
        }
    }

    fn warned(text: &str) -> Vec<String> {
        Config::parse(text, Path::new("."), None)
            .map(|c| c.warnings())
            .unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    /// `rise = 4294967295` passed: a server back after an outage was never used again.
    #[test]
    fn a_rise_past_100_is_refused() {
        for rise in ["101", "4294967295"] {
            let p = problems(&format!("[health]\nrise = {rise}\n"));
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].key, "health.rise");
            assert!(
                p[0].message
                    .starts_with(&format!("{rise} is more than 100")),
                "{p:?}"
            );
        }
        assert!(problems("[health]\nrise = 100\n").is_empty());
    }

    /// Legal, and the outage is noticed late or never: said with the time it takes.
    #[test]
    fn health_checks_slow_to_notice_are_warned_of() {
        assert_eq!(warned(""), Vec::<String>::new());
        let w = warned("[health]\nfall = 4294967295\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("health.fall = 4294967295 with health.interval = \"2s\""));
        let w = warned("[health]\ninterval = \"365d\"\ndown_interval = \"1s\"\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("health.fall = 3 with health.interval = \""),
            "{w:?}"
        );
        let w = warned("[health]\ninterval = \"1h\"\ndown_interval = \"1h\"\nfall = 1\n");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("only after 1h,"), "{w:?}");
        assert!(
            w[1].starts_with("health.rise = 2 with a down server checked every"),
            "{w:?}"
        );
        assert!(w[1].contains("only after 2h,"), "{w:?}");
        // Ten minutes each way is not yet warned of.
        let ten = "[health]\ninterval = \"200s\"\ndown_interval = \"5m\"\nfall = 3\nrise = 2\n";
        assert_eq!(warned(ten), Vec::<String>::new());
        assert!(warned("[health]\nfall = 100\n").is_empty());
    }

    /// `"1ms"` passed: every request cut off but those answered at once.
    #[test]
    fn timeouts_under_100ms_are_warned_of() {
        let w = warned(
            "[proxy]\nheader_read_timeout = \"1ms\"\n\
             [upstream]\nconnect_timeout = \"99ms\"\nresponse_timeout = \"5ms\"\n",
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("proxy.header_read_timeout = \"1ms\" is under 100ms"));
        assert!(w[0].ends_with("the default is 10s"), "{w:?}");
        assert!(
            w[1].starts_with("upstream.connect_timeout = \"99ms\""),
            "{w:?}"
        );
        assert!(
            w[2].starts_with("upstream.response_timeout = \"5ms\""),
            "{w:?}"
        );
        let at = "[proxy]\nheader_read_timeout = \"100ms\"\n\
                  [upstream]\nconnect_timeout = \"100ms\"\nresponse_timeout = \"0.1s\"\n";
        assert_eq!(warned(at), Vec::<String>::new());
        // Zero is refused, as before.
        assert_eq!(
            keys_of(&problems("[upstream]\nresponse_timeout = \"0s\"\n")),
            ["upstream.response_timeout"]
        );
    }

    /// `[200]` passed, and every page served became the outage page.
    #[test]
    fn intercepting_a_success_is_refused_and_a_client_error_warned_of() {
        for code in [200, 204, 301, 304, 399] {
            let p = problems(&format!("[upstream]\nintercept_statuses = [502, {code}]\n"));
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].key, "upstream.intercept_statuses[1]");
            assert!(
                p[0].message.starts_with(&format!("{code} is not an error")),
                "{p:?}"
            );
        }
        let w = warned("[upstream]\nintercept_statuses = [404, 429, 500, 503]\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("upstream.intercept_statuses[0] = 404 is a client error"),
            "{w:?}"
        );
    }

    /// ipnet reads "10.0.0.1/8" as 10.0.0.0/8: said, naming the network it means.
    #[test]
    fn a_cidr_with_host_bits_is_warned_of() {
        let w = warned(
            "[proxy]\ntrusted_proxies = [\"10.0.0.1/8\", \"10.0.0.0/8\", \"10.1.2.3\", \
             \"::ffff:192.168.1.9/120\"]\n\
             [maintenance]\nallow_ips = [\"2001:db8::1/32\", \"192.168.1.0/24\"]\n",
        );
        assert_eq!(
            w,
            [
                "proxy.trusted_proxies[0] \"10.0.0.1/8\" has host bits set: it means the whole \
                 network \"10.0.0.0/8\" (16777216 addresses); write that, or the address alone \
                 for one host",
                "proxy.trusted_proxies[3] \"192.168.1.9/24\" has host bits set: it means the \
                 whole network \"192.168.1.0/24\" (256 addresses); write that, or the address \
                 alone for one host",
                "maintenance.allow_ips[0] \"2001:db8::1/32\" has host bits set: it means the \
                 whole network \"2001:db8::/32\" (2^96 addresses); write that, or the address \
                 alone for one host",
            ]
        );
    }

    /// `from_str_radix` took a sign, and the prefix was trimmed however many times written.
    #[test]
    fn a_socket_mode_is_octal_digits_alone() {
        for mode in [
            "+600", "0o+600", "0o0o600", "-600", "", "0o", " 0600", "0x180",
        ] {
            let p = problems(&format!("[control]\nsocket_mode = \"{mode}\"\n"));
            assert_eq!(p.len(), 1, "{mode}: {p:?}");
            assert_eq!(p[0].key, "control.socket_mode");
            assert!(p[0].message.contains("is not a permission mode"), "{p:?}");
        }
        for (mode, bits) in [("600", 0o600), ("0o660", 0o660), ("00600", 0o600)] {
            let c = Config::parse(
                &format!("[control]\nsocket_mode = \"{mode}\"\n"),
                Path::new("."),
                None,
            );
            assert_eq!(c.map(|c| c.control.socket_mode).ok(), Some(bits), "{mode}");
        }
    }

    /// The redirects name the first TLS port without `https_port`: port 0 there is
    /// https://HOST:0/.
    #[test]
    fn redirecting_to_a_tls_listener_on_port_0_is_warned_of() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "").unwrap();
        std::fs::write(dir.path().join("b"), "").unwrap();
        let warned = |extra: &str, port: u16| {
            let text = format!(
                "[proxy]\nredirect_https = true\n{extra}[tls]\nlisten = [\"127.0.0.1:{port}\"]\n\
                 [[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\n"
            );
            Config::parse(&text, dir.path(), None).unwrap().warnings()
        };
        let w = warned("", 0);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("proxy.redirect_https = true sends plaintext visitors to the port of tls.listen[0] \"127.0.0.1:0\""),
            "{w:?}"
        );
        assert!(w[0].contains("https://HOST:0/"), "{w:?}");
        assert_eq!(warned("https_port = 8443\n", 0), Vec::<String>::new());
        assert_eq!(warned("", 8443), Vec::<String>::new());
    }

    /// Every change would be posted to that webhook twice.
    #[test]
    fn a_webhook_listed_twice_is_warned_of_without_its_url() {
        let w = warned(
            "[[notify]]\nurl = \"https://hooks.example/t0ken\"\n\
             [[notify]]\nurl = \"https://hooks.example/other\"\n\
             [[notify]]\nurl = \"https://hooks.example/t0ken\"\nformat = \"slack\"\n\
             [[notify]]\nurl = \"https://hooks.example/t0ken\"\nheaders = { X-Team = \"a\" }\n",
        );
        assert_eq!(
            w,
            [
                "notify[2].url is the URL of notify[0] too, with the same headers: every change \
              is sent to that webhook twice; remove one of them"
            ]
        );
        assert!(!w[0].contains("t0ken"));
    }

    #[test]
    fn unknown_keys_are_named_in_every_section() {
        let p = problems("[proxy]\nlissten = []\n[upstream]\nserver = []\n");
        assert_eq!(p.len(), 2);
        assert!(
            p[0].key == "proxy.lissten" && p[0].message.contains("unknown field"),
            "{p:?}"
        );
        assert!(
            p[1].key == "upstream.server" && p[1].message.contains("unknown field"),
            "{p:?}"
        );
    }

    #[test]
    fn a_default_config_that_links_to_nothing_is_refused_not_taken_for_none() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(DEFAULT_PATH);
        std::os::unix::fs::symlink(dir.path().join("releases/41/config.toml"), &path)
            .expect("link");
        match Config::load_default(&path) {
            Err(e @ ConfigError::Read { .. }) => assert!(
                e.to_string().contains("it is a symbolic link to ")
                    && e.to_string()
                        .ends_with("releases/41/config.toml, which does not exist"),
                "{e}"
            ),
            other => panic!("read as {other:?}"),
        }
    }

    #[test]
    fn without_a_file_the_defaults_remember_where_a_reload_looks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(DEFAULT_PATH);
        let defaults = Config::load_default(&path).expect("defaults");
        assert_eq!(defaults.source, None);
        assert_eq!(defaults.reload_from.as_deref(), Some(path.as_path()));
        std::fs::write(&path, "[maintenance]\nmessage = \"from the file\"\n").expect("file");
        let loaded = Config::load_default(&path).expect("the file");
        assert_eq!(loaded.source.as_deref(), Some(path.as_path()));
        assert_eq!(loaded.maintenance.message, "from the file");
    }

    #[test]
    fn a_notify_entry_s_problem_names_the_entry_and_key() {
        let p = problems(
            "[[notify]]\nurl = \"http://127.0.0.1:9/a\"\n[[notify]]\nurl = \"http://127.0.0.1:9/b\"\nbogus = 1\n[[notify]]\nformat = \"json\"\n",
        );
        let named: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(named, ["notify[1].bogus", "notify[2].url"], "{p:?}");
        assert!(p[0].message.contains("unknown field `bogus`"), "{p:?}");
        assert!(p[1].message.contains("is required"), "{p:?}");
        let p = problems("notify = 3\n");
        assert_eq!(p[0].key, "notify", "{p:?}");
        // An entry that is not a table does not shift the index the next one is named by.
        let p = problems("notify = [1, {url = \"ftp://x\"}]\n");
        let named: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(named, ["notify[0]", "notify[1].url"], "{p:?}");
        // A value of the wrong type is one problem, not also "required".
        assert_eq!(keys("[[notify]]\nurl = 5\n"), ["notify[0].url"]);
    }

    /// A webhook is called by its `name` in metrics and logs, else by its index; a name is
    /// short and plain, its entry's own, and never taken for another entry's index.
    #[test]
    fn a_webhook_is_called_by_its_name_else_its_index() {
        let c = Config::parse(
            "[[notify]]\nurl = \"http://127.0.0.1:9/a\"\nname = \"pager.v2\"\n\
             [[notify]]\nurl = \"http://127.0.0.1:9/b\"\n\
             [[notify]]\nurl = \"http://127.0.0.1:9/c\"\nname = \"status-page_1\"\n",
            Path::new("."),
            None,
        )
        .unwrap();
        let ids: Vec<&str> = c.notify.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["pager.v2", "1", "status-page_1"]);
        let long = "x".repeat(65);
        let p = problems(&format!(
            "[[notify]]\nurl = \"http://h/a\"\nname = \"alerts\"\n\
             [[notify]]\nurl = \"http://h/b\"\nname = \"alerts\"\n\
             [[notify]]\nurl = \"http://h/c\"\nname = \"2\"\n\
             [[notify]]\nurl = \"http://h/d\"\nname = \"has space\"\n\
             [[notify]]\nurl = \"http://h/e\"\nname = \"{long}\"\n\
             [[notify]]\nurl = \"http://h/f\"\nname = 7\n"
        ));
        // A value of the wrong type is refused first, as it is read.
        let mut named: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        named.sort_unstable();
        assert_eq!(
            named,
            [
                "notify[1].name",
                "notify[2].name",
                "notify[3].name",
                "notify[4].name",
                "notify[5].name"
            ],
            "{p:?}"
        );
        let said = |key: &str| p.iter().find(|p| p.key == key).unwrap().message.clone();
        assert!(said("notify[1].name").contains("notify[0] too"), "{p:?}");
        assert!(said("notify[2].name").contains("all digits"), "{p:?}");
        assert!(said("notify[3].name").contains("letters, digits"), "{p:?}");
        assert!(said("notify[4].name").contains("letters, digits"), "{p:?}");
        assert!(
            said("notify[5].name").contains("expected a string"),
            "{p:?}"
        );
    }

    /// A refused key in an entry is named with the entry's index, and the entry's other
    /// keys are still checked: the entry is not dropped, so it still counts as one.
    #[test]
    fn a_refused_key_does_not_drop_its_entry() {
        let text = r#"
            [tls]
            listen = ["127.0.0.1:8443"]
            [[tls.certificates]]
            cert = "missing.pem"
            key = "missing.key"
            bogus = 1
            [[notify]]
            url = "ftp://x"
            timeout = "soon"
            extra = true
        "#;
        assert_eq!(
            keys(text),
            vec![
                "tls.certificates[0].bogus",
                "notify[0].extra",
                "tls.certificates[0].cert",
                "tls.certificates[0].key",
                "notify[0].url",
                "notify[0].timeout",
            ]
        );
        let p = problems("[tls]\nlisten = [\"127.0.0.1:8443\"]\ncertificates = [1, {cert = 5}]\n");
        let named: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            named,
            [
                "tls.certificates[0]",
                "tls.certificates[1].cert",
                "tls.certificates[1].key"
            ],
            "{p:?}"
        );
        assert!(p[2].message.contains("is required"), "{p:?}");
        // None written at all is still a problem.
        assert_eq!(
            keys("[tls]\nlisten = [\"127.0.0.1:8443\"]\n"),
            ["tls.certificates"]
        );
    }

    #[test]
    fn problems_about_secrets_never_show_them() {
        const BYPASS: &str = "bypass/with*bad!chars-XOXO";
        let text = format!(
            r#"
            [maintenance]
            bypass_secret = "{BYPASS}"
            [[notify]]
            url = "htps://hooks.example.com/services/T000/B000/XOXOSECRETTOKEN"
            secret = 987654321
            [[notify]]
            url = 987654321
            secret = ["XOXOSECRETTOKEN"]
            [[notify]]
            url = "hooks.example.com/services/T000/B000/XOXOSECRETTOKEN?t=XOXOSECRETTOKEN"
            [[notify]]
            url = "https://user:XOXOSECRETTOKEN@/services/XOXOSECRETTOKEN"
            [[notify]]
            url = "https://user:XOXOSECRETTOKEN@hooks.example.com/services/XOXOSECRETTOKEN"
            [[notify]]
            url = "http://127.0.0.1:99999/XOXOSECRETTOKEN"
            [[notify]]
            url = "https://XOXOuser:XO/XOSECRET@hooks.example.com/services/XOXO"
            [[notify]]
            url = "https://XOXOuser:XO?XO@hooks.example.com/x"
            [[notify]]
            url = "https://XOXOuser:XO XO@hooks.example.com/x"
            [[notify]]
            url = "https://XOXOuser:XO@XO/XO@hooks.example.com/x"
            "#
        );
        let p = problems(&text);
        let said = said(&p);
        assert_eq!(
            said,
            [
                ("notify[0].secret", "must be a string"),
                (
                    "notify[1].secret",
                    "must be a string",
                ),
                (
                    "notify[1].url",
                    "must be a string: the webhook's http:// or https:// URL",
                ),
                (
                    "maintenance.bypass_secret",
                    "must use only letters, digits, '-', '_' and '.', since it appears in a URL path",
                ),
                (
                    "notify[0].url",
                    "\"htps://hooks.example.com/…\" is not an http:// or https:// URL",
                ),
                (
                    "notify[2].url",
                    "a value with no scheme is not an http:// or https:// URL",
                ),
                (
                    "notify[3].url",
                    "\"https:///…\" is not an http:// or https:// URL",
                ),
                // Sent by no one, and shown by logs: refused rather than dropped silently.
                (
                    "notify[4].url",
                    "\"https://hooks.example.com/…\" has a user name or password (before the @, not shown here), which intermission does not send: give it as `headers = { Authorization = \"Basic …\" }` (the base64 of user:password), sign the events with `secret`, or give the receiver's token in the path",
                ),
                // The `http` crate's port: any digits. Delivered to port 80 before.
                (
                    "notify[5].url",
                    "\"http://127.0.0.1:99999/…\" port \"99999\" is not from 1 to 65535",
                ),
                // A password with a `/` or `?` ends the authority before the `@` for a URL
                // parser: its start read as a port, and was quoted with the user's name.
                (
                    "notify[6].url",
                    "\"https://…/…\" has a user name or password (before the @, not shown here), which intermission does not send: give it as `headers = { Authorization = \"Basic …\" }` (the base64 of user:password), sign the events with `secret`, or give the receiver's token in the path",
                ),
                (
                    "notify[7].url",
                    "\"https://…/…\" has a user name or password (before the @, not shown here), which intermission does not send: give it as `headers = { Authorization = \"Basic …\" }` (the base64 of user:password), sign the events with `secret`, or give the receiver's token in the path",
                ),
                (
                    "notify[8].url",
                    "\"https://hooks.example.com/…\" is not an http:// or https:// URL",
                ),
                // A password holding an `@` before its `/`: the text between them is no host.
                (
                    "notify[9].url",
                    "\"https://…/…\" has a user name or password (before the @, not shown here), which intermission does not send: give it as `headers = { Authorization = \"Basic …\" }` (the base64 of user:password), sign the events with `secret`, or give the receiver's token in the path",
                ),
            ],
            "{p:#?}"
        );
        for secret in ["XOXO", "987654321", BYPASS] {
            let whole = ConfigError::Invalid {
                origin: "config".into(),
                problems: p.clone(),
            }
            .to_string();
            assert!(!whole.contains(secret), "{secret}: {whole}");
        }
        // serde's type errors of the bypass secret, and a check's, keep it too.
        let p = problems("[maintenance]\nbypass_secret = 98765432109876543210.5\n");
        assert_eq!(p[0].key, "maintenance.bypass_secret");
        assert_eq!(p[0].message, "must be a string");
        let p = problems("[maintenance]\nbypass_secret = \"XOXO!\"\n");
        assert!(p.iter().all(|p| p.key == "maintenance.bypass_secret"));
        assert!(p.iter().all(|p| !p.message.contains("XOXO")), "{p:?}");
        // The other keys still say what they were given.
        let p = problems("[[notify]]\nurl = \"https://h/x\"\nformat = \"xml\"\ntimeout = 5.5\n");
        assert!(p[0].message.contains("5.5"), "{p:?}");
        assert!(p[1].message.contains("\"xml\""), "{p:?}");
    }

    #[test]
    fn a_webhooks_headers_are_checked_and_their_values_never_shown() {
        let p = problems(
            r#"
            [[notify]]
            url = "https://hooks.example.com/a"
            headers = { Authorization = "GenieKey XOXO-1", "X-Api-Key" = "XOXO-2" }
            [[notify]]
            url = "https://hooks.example.com/b"
            headers = { "Bad Name" = "XOXO-3", Host = "XOXO-4", authorization = "XOXO-5", Authorization = "XOXO-6", "X-Two" = "XOXO-7\u0007XOXO-8", "X-Empty" = " ", "X-Intermission-Signature" = "XOXO-9", "X-Intermission-Signature-Timed" = "XOXO-11", "X-Accent" = "Basic XOXO-é" }
            [[notify]]
            url = "https://hooks.example.com/c"
            headers = { Authorization = 987654321 }
            [[notify]]
            url = "https://hooks.example.com/d"
            headers = "Authorization: XOXO-10"
            "#,
        );
        let said = said(&p);
        assert_eq!(
            said,
            [
                ("notify[2].headers", "must give each header's value as a string"),
                (
                    "notify[3].headers",
                    "must be a table of header names and values, such as { Authorization = \"Bearer …\" }"
                ),
                (
                    "notify[1].headers",
                    "\"Bad Name\" is not a header name (letters, digits and !#$%&'*+-.^_`|~)"
                ),
                (
                    "notify[1].headers",
                    "\"Host\" is set by intermission for each event; leave it out"
                ),
                (
                    "notify[1].headers",
                    "\"X-Accent\": its value (not shown here) must be printable ASCII on one line, not empty"
                ),
                (
                    "notify[1].headers",
                    "\"X-Empty\": its value (not shown here) must be printable ASCII on one line, not empty"
                ),
                (
                    "notify[1].headers",
                    "\"X-Intermission-Signature\" is set by intermission for each event; leave it out"
                ),
                (
                    "notify[1].headers",
                    "\"X-Intermission-Signature-Timed\" is set by intermission for each event; leave it out"
                ),
                (
                    "notify[1].headers",
                    "\"X-Two\": its value (not shown here) must be printable ASCII on one line, not empty"
                ),
                (
                    "notify[1].headers",
                    "\"authorization\" is given twice (header names are case-insensitive)"
                ),
            ],
            "{p:#?}"
        );
        let whole = ConfigError::Invalid {
            origin: "config".into(),
            problems: p,
        }
        .to_string();
        assert!(!whole.contains("XOXO"), "{whole}");
    }

    #[test]
    fn a_secret_bearing_key_is_told_by_its_name() {
        for (key, secret) in [
            ("maintenance.bypass_secret", Some(Secret::Token)),
            ("notify[0].secret", Some(Secret::Token)),
            ("notify[12].url", Some(Secret::Url)),
            ("notify[0].timeout", None),
            ("notify[3].headers", Some(Secret::Headers)),
            ("notify[x].url", None),
            ("maintenance.message", None),
            ("upstream.servers[0]", None),
        ] {
            assert_eq!(Secret::of(key), secret, "{key}");
        }
    }

    /// 512 by default, 0 for no cap; a value that is no count is named by its key.
    #[test]
    fn max_pending_per_client_defaults_to_512_and_0_turns_it_off() {
        let c = Config::parse("", Path::new("."), None).unwrap();
        assert_eq!(c.proxy.max_pending_per_client, 512);
        let c = Config::parse(
            "[proxy]\nmax_pending_per_client = 0\n",
            Path::new("."),
            None,
        );
        assert_eq!(c.unwrap().proxy.max_pending_per_client, 0);
        for bad in ["-1", "\"many\"", "1.5"] {
            let p = problems(&format!("[proxy]\nmax_pending_per_client = {bad}\n"));
            assert_eq!(p[0].key, "proxy.max_pending_per_client", "{bad}: {p:?}");
        }
    }

    #[test]
    fn too_many_threads_is_refused() {
        let p = problems("[proxy]\nthreads = 100000\n");
        assert_eq!(p[0].key, "proxy.threads");
        assert!(p[0].message.contains("at most 1024"), "{p:?}");
        assert!(problems("[proxy]\nthreads = 1024\n").is_empty());
    }

    /// `listen = "127.0.0.1:8080"`, as `[admin] listen` is written, was refused as "expected a
    /// sequence": every list of strings takes one string for a list of one, and "" for none.
    #[test]
    fn a_list_key_takes_one_string_for_a_list_of_one() {
        let c = Config::parse(
            r#"
            [proxy]
            listen = "127.0.0.1:18080"
            trusted_proxies = "10.0.0.0/8"
            [upstream]
            servers = "http://127.0.0.1:3001"
            [maintenance]
            api_prefixes = "/v1/"
            cors_origins = "https://app.example.com"
            allow_paths = "/status"
            allow_ips = "192.0.2.7"
            [tls]
            listen = ""
            "#,
            Path::new("."),
            None,
        )
        .unwrap();
        assert_eq!(c.proxy.listen, vec!["127.0.0.1:18080".parse().unwrap()]);
        assert_eq!(c.proxy.trusted_proxies, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(c.upstream.servers.len(), 1);
        assert_eq!(c.maintenance.api_prefixes, vec!["/v1/".to_owned()]);
        assert_eq!(c.maintenance.cors_origins.len(), 1);
        assert_eq!(c.maintenance.allow_paths, vec!["/status".to_owned()]);
        assert_eq!(
            c.maintenance.allow_ips,
            vec!["192.0.2.7/32".parse().unwrap()]
        );
        assert!(c.tls.listen.is_empty());
        // One string is judged as the list's only entry, and other types are still named.
        assert_eq!(
            keys("[proxy]\nlisten = \"nowhere\"\n"),
            vec!["proxy.listen[0]"]
        );
        let p = problems("[upstream]\nservers = 5\n");
        assert_eq!(p[0].key, "upstream.servers");
        assert!(
            p[0].message.contains("a string or a list of strings"),
            "{p:?}"
        );
        assert_eq!(
            problems("[proxy]\nlisten = \"\"\n")[0].message,
            "needs at least one address to listen on (here or in tls.listen)"
        );
    }

    #[test]
    fn a_section_not_written_as_a_table_says_how_to_write_it() {
        let p = problems("[[proxy]]\nthreads = 1\n[[health]]\n");
        assert_eq!(
            said(&p),
            vec![
                (
                    "proxy",
                    "must be a table of keys, written [proxy], not [[proxy]]"
                ),
                (
                    "health",
                    "must be a table of keys, written [health], not [[health]]"
                ),
            ]
        );
        let p = problems("log = \"json\"\n");
        assert_eq!(
            said(&p),
            vec![("log", "must be a table of keys, written [log]")]
        );
    }

    #[test]
    fn one_certificate_table_says_to_write_two_brackets() {
        let text = "[tls]\nlisten = \"127.0.0.1:8443\"\n[tls.certificates]\ncert = \"a.pem\"\nkey = \"a.key\"\n";
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "tls.certificates");
        assert!(
            p[0].message
                .starts_with("is one table; write each certificate as [[tls.certificates]]"),
            "{p:?}"
        );
    }

    #[test]
    fn whole_numbers_are_said_in_words_not_rust_types() {
        let text = "[proxy]\nthreads = -1\nhttps_port = 70000\nmax_connections = \"100\"\n\
                    [health]\nfall = 4294967296\n[upstream]\nintercept_statuses = [\"502\"]\n";
        let p = problems(text);
        assert_eq!(
            said(&p),
            vec![
                ("proxy.https_port", "invalid value: integer `70000`, expected a whole number from 0 to 65535"),
                ("proxy.max_connections", "invalid type: string \"100\", expected a whole number, 0 or more"),
                ("proxy.threads", "invalid value: integer `-1`, expected a whole number, 0 or more"),
                ("upstream.intercept_statuses", "invalid type: string \"502\", expected a whole number from 0 to 65535"),
                ("health.fall", "invalid value: integer `4294967296`, expected a whole number from 0 to 4294967295"),
            ]
        );
    }

    #[test]
    fn a_health_timeout_over_the_interval_says_both_and_whether_it_is_the_default() {
        let p = problems("[health]\ninterval = \"500ms\"\n");
        assert_eq!(
            said(&p),
            vec![(
                "health.timeout",
                "must not be longer than health.interval: 1s (its default, as it is not set) \
                 is longer than 500ms; set health.timeout to at most the interval"
            )]
        );
        let p = problems("[health]\ninterval = \"2s\"\ntimeout = \"3s\"\n");
        assert_eq!(
            said(&p),
            vec![(
                "health.timeout",
                "must not be longer than health.interval: 3s is longer than 2s; set \
                 health.timeout to at most the interval"
            )]
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let p = problems("[proxy]\nthreads = \"many\"\n");
        assert_eq!(p[0].key, "proxy.threads");
        assert!(p[0].message.contains("invalid type"), "{p:?}");
    }

    #[test]
    fn a_refused_key_does_not_hide_the_rest_of_its_section() {
        let text = r#"
            [upstream]
            servers = ["ftp://x"]
            retries = 3
            connect_timeout = "soon"
            [proxy]
            threads = "many"
            listen = ["nowhere"]
        "#;
        assert_eq!(
            keys(text),
            vec![
                "proxy.threads",
                "upstream.retries",
                "proxy.listen[0]",
                "upstream.servers[0]",
                "upstream.connect_timeout",
            ]
        );
    }

    #[test]
    fn syntax_errors_say_where() {
        let p = problems("[proxy\n");
        assert_eq!(p[0].key, "(syntax)");
        assert!(p[0].message.starts_with("line 1, column "), "{p:?}");
        // Without the line, which may hold a secret.
        let p = problems("[[notify]]\nurl = \"https://h/services/XOXOSECRETTOKEN\" oops\n");
        assert_eq!(p[0].key, "notify[0].url");
        assert!(p[0].message.starts_with("line 2, column "), "{p:?}");
        assert!(!p[0].message.contains("XOXO"), "{p:?}");
        // One problem, on one line: toml's second line read as a problem of its own.
        let p = problems("[proxy]\nthreads = 1\n[proxy]\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].message
                .contains("invalid table header: duplicate key `proxy`"),
            "{p:?}"
        );
        assert!(!p[0].message.contains('\n'), "{p:?}");
        let listed = ConfigError::Invalid {
            origin: "config.toml".into(),
            problems: vec![Problem {
                key: "(syntax)".into(),
                message: "one\ntwo".into(),
            }],
        }
        .to_string();
        assert_eq!(
            listed,
            "config.toml is not valid (1 problem):\n  - (syntax): one\n    two"
        );
    }

    #[test]
    fn max_header_bytes_is_bounded_both_ways() {
        let p = problems("[proxy]\nmax_header_bytes = 10485760\n");
        assert_eq!(p[0].key, "proxy.max_header_bytes", "{p:?}");
        assert!(p[0].message.contains("at most 1048576"), "{p:?}");
        assert!(problems("[proxy]\nmax_header_bytes = 1048576\n").is_empty());
        assert!(!problems("[proxy]\nmax_header_bytes = 8191\n").is_empty());
    }

    /// A value TOML itself refuses is named by its key, as every other problem is.
    #[test]
    fn a_value_toml_refuses_names_its_key() {
        let p = problems("[proxy]\nmax_header_bytes = 99999999999999999999\n");
        assert_eq!(p[0].key, "proxy.max_header_bytes", "{p:?}");
        assert!(p[0].message.starts_with("line 2, column "), "{p:?}");
        let p = problems(
            "threads = 1\n[[notify]]\nurl = \"https://a\"\n[[notify]]\ntimeout = 1e999999\n",
        );
        assert_eq!(p[0].key, "notify[1].timeout", "{p:?}");
        let p = problems("[upstream]\nservers = [\n  \"http://a\",\n  oops,\n]\n");
        assert_eq!(p[0].key, "(syntax)", "inside a multi-line value: {p:?}");
        // Headers with comments, as SPEC's example writes them, and CR LF line ends.
        let p = problems(
            "[log] # logs\r\nlevel = \"info\"\r\n[[notify]]   # hooks\r\nurl = \"https://a\"\r\n\
             [[notify]]#2\r\ntimeout = 1e999999\r\n",
        );
        assert_eq!(p[0].key, "notify[1].timeout", "{p:?}");
        let p = problems("[\"proxy\"]\nmax_header_bytes = 99999999999999999999\n");
        assert_eq!(p[0].key, "(syntax)", "a quoted header: {p:?}");
        let p = problems("[maintenance]\nmessage = \"\"\"\nsecret_word = \\q\n\"\"\"\n");
        assert_eq!(p[0].key, "(syntax)", "inside a multi-line string: {p:?}");
        assert!(!p[0].message.contains("secret_word"), "{p:?}");
    }

    #[test]
    fn health_settings() {
        let c = Config::parse("", Path::new("."), None).unwrap();
        assert_eq!(c.health.kind, HealthKind::Http);
        assert_eq!((c.health.rise, c.health.fall), (2, 3));
        assert_eq!(c.health.down_interval, Duration::from_millis(500));
        // Never slower than `interval`: a server that is down is checked no less often.
        let slow = Config::parse(
            "[health]\ninterval = \"300ms\"\ntimeout = \"100ms\"\ndown_interval = \"5s\"\n",
            Path::new("."),
            None,
        )
        .unwrap();
        assert_eq!(slow.health.down_interval, Duration::from_millis(300));
        assert_eq!(
            keys("[health]\ndown_interval = \"0s\"\n"),
            vec!["health.down_interval"]
        );
        assert!(c.health.expects(200) && c.health.expects(399) && !c.health.expects(404));
        assert_eq!(
            parse_status_ranges("200,204, 300-302").unwrap(),
            vec![(200, 200), (204, 204), (300, 302)]
        );
        for bad in ["", "2xx", "300-200", "99", "200-600", "a-b"] {
            assert!(parse_status_ranges(bad).is_err(), "{bad}");
        }
        let text = "[health]\nkind = \"icmp\"\npath = \"healthz\"\ninterval = \"1s\"\ntimeout = \"2s\"\nrise = 0\nexpect = \"ok\"\n[upstream]\nintercept_statuses = [502, 700, 101]\n";
        assert_eq!(
            keys(text),
            vec![
                "upstream.intercept_statuses[1]",
                "upstream.intercept_statuses[2]",
                "health.kind",
                "health.path",
                "health.timeout",
                "health.rise",
                "health.expect"
            ]
        );
    }

    #[test]
    fn grpc_checks_need_http2_servers() {
        let p =
            problems("[upstream]\nservers = [\"http://127.0.0.1:1\"]\n[health]\nkind = \"grpc\"\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "health.kind");
        assert!(problems(
            "[upstream]\nservers = [\"h2c://127.0.0.1:1\"]\n[health]\nkind = \"grpc\"\n"
        )
        .is_empty());
        let long = problems("[proxy]\nheader_read_timeout = \"18446744073709551615\"\n");
        assert_eq!(long[0].key, "proxy.header_read_timeout");
    }

    /// `health.host`: what a `Host` header may carry, for HTTP checks over HTTP/1.1 only.
    #[test]
    fn a_health_host_is_a_host_for_http_checks() {
        let with = |host: &str, rest: &str| format!("[health]\nhost = {host:?}\n{rest}");
        for good in [
            "shop.example.com",
            "shop.example.com:8443",
            "10.0.0.5",
            "[::1]:80",
        ] {
            let c = Config::parse(&with(good, ""), Path::new("."), None).unwrap();
            assert_eq!(c.health.host.unwrap(), good);
        }
        assert_eq!(
            Config::parse("", Path::new("."), None).unwrap().health.host,
            None
        );
        for bad in [
            "user@shop",
            "shop/x",
            "shop example",
            ":80",
            "shop:port",
            "shop:0",
            "shop:",
            "http://shop",
        ] {
            assert_eq!(keys(&with(bad, "")), vec!["health.host"], "{bad}");
        }
        for kind in ["tcp", "grpc"] {
            let rest = format!("kind = {kind:?}\n[upstream]\nservers = [\"h2c://127.0.0.1:1\"]\n");
            assert_eq!(keys(&with("shop", &rest)), vec!["health.host"], "{kind}");
        }
        let h2c = with("shop", "[upstream]\nservers = [\"h2c://127.0.0.1:1\"]\n");
        assert_eq!(keys(&h2c), vec!["health.host"]);
        let https = with("shop", "[upstream]\nservers = [\"https://127.0.0.1:1\"]\n");
        assert!(problems(&https).is_empty());
    }

    /// A fragment was dropped without a word, and a host ending in a number that is no IPv4
    /// address was taken for a name (which never resolves) or read as `inet_aton` reads it.
    #[test]
    fn a_server_address_has_no_fragment_and_a_numeric_host_is_an_ipv4_address() {
        let why = parse_upstream("http://h:80#frag").unwrap_err();
        assert_eq!(
            why,
            "\"http://h:80#frag\" has a fragment (from the #), which a server address has no \
             use for; write \"http://h:80\""
        );
        for host in [
            "256.1.1.1",
            "10.1",
            "010.0.0.1",
            "0x7f.1",
            "1.2.3.4.5",
            "3232235777",
        ] {
            let why = parse_upstream(&format!("http://{host}:80")).unwrap_err();
            assert!(
                why.contains(&format!("host \"{host}\" is not an IPv4 address")),
                "{why}"
            );
        }
        for fine in [
            "10.0.0.5",
            "app1",
            "app.internal",
            "1.example",
            "[::1]",
            "v4.0x7fz",
        ] {
            assert!(
                parse_upstream(&format!("http://{fine}:80")).is_ok(),
                "{fine}"
            );
        }
        let p = problems(
            "[upstream]\nservers = [\"http://256.1.1.1:80\"]\n\
             [[notify]]\nurl = \"https://300.1.1.1/hook\"\n",
        );
        assert_eq!(
            keys_of(&p),
            ["notify[0].url", "upstream.servers[0]"],
            "{p:?}"
        );
    }

    #[test]
    fn upstreams() {
        let ok = parse_upstream("http://127.0.0.1:3000").unwrap();
        assert_eq!(ok.authority.as_str(), "127.0.0.1:3000");
        assert!(parse_upstream("http://app.internal/").is_ok());
        assert!(parse_upstream("127.0.0.1:3000").is_err());
        assert!(parse_upstream("http://a/b").is_err());
        assert!(parse_upstream("gopher://a").is_err());
    }

    #[test]
    fn upstream_ports_outside_1_to_65535_are_refused_with_the_key() {
        for ok in [
            "http://127.0.0.1:1",
            "h2c://127.0.0.1:65535",
            "http://[::1]:8080",
        ] {
            assert!(parse_upstream(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://127.0.0.1:99999",
            "http://127.0.0.1:112847",
            "h2c://127.0.0.1:65536",
            "http://127.0.0.1:0",
            "https://[::1]:70000",
            "http://127.0.0.1:+80",
        ] {
            let why = parse_upstream(bad).err().unwrap_or_default();
            assert!(why.contains("1 to 65535"), "{bad}: {why:?}");
        }
        let found = problems("[upstream]\nservers = [\"http://a:3000\", \"http://a:99999\"]\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "upstream.servers[1]");
    }

    /// Port 0 passed, and every plaintext visitor was then redirected to https://HOST:0/.
    #[test]
    fn an_https_port_of_0_is_refused_with_the_key() {
        let found = problems("[proxy]\nhttps_port = 0\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "proxy.https_port");
        assert!(
            found[0].message.contains("\"0\" is not from 1 to 65535"),
            "{found:?}"
        );
        for ok in [1, 8443, 65535] {
            let text = format!("[proxy]\nhttps_port = {ok}\n");
            let found = problems(&text);
            assert!(found.is_empty(), "{ok}: {found:?}");
        }
    }

    /// A server listed twice is refused under the second entry, naming the first.
    #[test]
    fn a_server_is_listed_once() {
        let found = problems(
            "[upstream]\nservers = [\"http://a:3000\", \"http://b:3000\", \"http://a:3000\"]\n",
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "upstream.servers[2]");
        assert!(
            found[0]
                .message
                .contains("http://a:3000 is listed already, as upstream.servers[0]"),
            "{found:?}"
        );
        assert!(
            problems("[upstream]\nservers = [\"http://a:3000\", \"h2c://a:3000\"]\n").is_empty()
        );
        // Written otherwise, the same server.
        let found = problems(
            "[upstream]\nservers = [\"http://App:3000\", \"http://app:3000\", \"https://b\", \"https://B:443\"]\n",
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["upstream.servers[1]", "upstream.servers[3]"],
            "{found:?}"
        );
        let found = problems(
            "[upstream]\nservers = [\"http://[::1]:3000\", \"http://[0:0::1]:3000\", \"http://a.example:1\", \"http://A.example.:1\"]\n",
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["upstream.servers[1]", "upstream.servers[3]"],
            "{found:?}"
        );
    }

    /// An IPv6 zone as a URL writes it (`%25eth0`) is dialled as the resolver reads it.
    #[test]
    fn an_upstream_zone_is_dialled_unescaped() {
        for (given, dialled) in [
            ("http://[fe80::1%25eth0]:3000", "[fe80::1%eth0]:3000"),
            ("http://[fe80::1%eth0]:3000", "[fe80::1%eth0]:3000"),
            ("h2c://[fe80::1%25lo]", "[fe80::1%lo]"),
            ("http://[::1]:3000", "[::1]:3000"),
        ] {
            let u = parse_upstream(given).unwrap();
            assert_eq!(u.authority.as_str(), dialled, "{given}");
        }
    }

    /// A zone on an address that is not link-local is refused, naming the entry: the resolver
    /// read `[2001:db8::5%eth0]` as a name that does not resolve, and every connect failed.
    #[test]
    fn a_zone_on_an_address_that_is_not_link_local_is_refused() {
        for (text, key) in [
            (
                "[upstream]\nservers = [\"http://[2001:db8::5%25eth0]:3000\"]\n",
                "upstream.servers[0]",
            ),
            (
                "[upstream]\nservers = [\"h2c://[::1%lo]\"]\n",
                "upstream.servers[0]",
            ),
            (
                "[[notify]]\nurl = \"http://[::1%25lo]:9/hook\"\n",
                "notify[0].url",
            ),
        ] {
            let p = problems(text);
            assert_eq!(p.len(), 1, "{text}: {p:?}");
            assert_eq!(p[0].key, key, "{text}");
            assert!(p[0].message.contains("link-local"), "{text}: {p:?}");
        }
        // Link-local ones, unicast or multicast, are dialled.
        for ok in [
            "[upstream]\nservers = [\"http://[fe80::5%25eth0]:3000\"]\n",
            "[upstream]\nservers = [\"http://[febf::5%eth0]:3000\"]\n",
            "[[notify]]\nurl = \"http://[ff02::1%25lo]:9/hook\"\n",
        ] {
            assert!(problems(ok).is_empty(), "{ok}: {:?}", problems(ok));
        }
    }

    /// A webhook's IPv6 zone as a URL writes it (`%25eth0`) is dialled as the resolver reads
    /// it, as a server's is: kept escaped, it passed `check`, and every try of every event
    /// then failed as a name that does not resolve.
    #[test]
    fn a_webhook_zone_is_dialled_unescaped() {
        for (given, dialled) in [
            (
                "http://[fe80::1%25lo]:9/hooks/x?a=1",
                "http://[fe80::1%lo]:9/hooks/x?a=1",
            ),
            ("https://[fe80::1%25eth0]/x", "https://[fe80::1%eth0]/x"),
            ("http://[fe80::1%eth0]:9/", "http://[fe80::1%eth0]:9/"),
            ("http://[::1]:9/x", "http://[::1]:9/x"),
            ("http://hooks.example/a%25b", "http://hooks.example/a%25b"),
        ] {
            let c = Config::parse(
                &format!("[[notify]]\nurl = \"{given}\"\n"),
                Path::new("."),
                None,
            )
            .unwrap_or_else(|e| panic!("{given}: {e}"));
            assert_eq!(c.notify[0].url.to_string(), dialled, "{given}");
        }
    }

    #[test]
    fn upstream_credentials_are_refused_with_the_key() {
        for bad in [
            "http://alice:s3cret@127.0.0.1:3000",
            "https://alice@127.0.0.1:3000",
            // A password holding a character that ends the authority before the `@`: the
            // problem quoted the whole address ("port \"s3\" is not from 1 to 65535").
            "http://alice:s3/cret@127.0.0.1:3000",
            "http://alice:s3?cret@127.0.0.1:3000",
            "http://alice:s3#cret@127.0.0.1:3000",
            "http://alice:s3 cret@127.0.0.1:3000",
        ] {
            let why = parse_upstream(bad).err().unwrap_or_default();
            assert!(
                why.contains("does not belong in a server address"),
                "{bad}: {why:?}"
            );
            // The credentials are not echoed into `check` output or reload logs.
            assert!(
                !why.contains("s3") && !why.contains("cret") && !why.contains("alice"),
                "{why:?}"
            );
            assert!(why.contains("127.0.0.1:3000"), "{why:?}");
        }
        let found = problems("[upstream]\nservers = [\"http://alice:s3cret@a:3000\"]\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "upstream.servers[0]");
    }

    #[test]
    fn trusted_proxy_matching_handles_mapped_ipv4() {
        let c = Config::parse(
            "[proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\n",
            Path::new("."),
            None,
        )
        .unwrap();
        assert!(c.proxy.is_trusted("10.1.2.3".parse().unwrap()));
        assert!(c.proxy.is_trusted("::ffff:10.1.2.3".parse().unwrap()));
        assert!(c.proxy.is_trusted("192.0.2.7".parse().unwrap()));
        assert!(!c.proxy.is_trusted("192.0.2.8".parse().unwrap()));
    }

    /// An entry written as IPv4-mapped IPv6 (as the access log wrote an IPv4 client of a
    /// dual-stack listener) means those IPv4 addresses: it matched no peer at all.
    #[test]
    fn mapped_ipv4_entries_match_their_ipv4_peers() {
        let c = Config::parse(
            "[proxy]\ntrusted_proxies = [\"::ffff:10.0.0.0/104\", \"::ffff:192.0.2.7\"]\n\
             [maintenance]\nallow_ips = [\"::ffff:203.0.113.0/120\", \"::ffff:0:0/95\"]\n",
            Path::new("."),
            None,
        )
        .unwrap();
        for trusted in [
            "10.1.2.3",
            "::ffff:10.1.2.3",
            "192.0.2.7",
            "::ffff:192.0.2.7",
        ] {
            assert!(c.proxy.is_trusted(trusted.parse().unwrap()), "{trusted}");
        }
        for untrusted in ["11.0.0.1", "192.0.2.8", "::1"] {
            assert!(
                !c.proxy.is_trusted(untrusted.parse().unwrap()),
                "{untrusted}"
            );
        }
        let allowed: Vec<String> = c
            .maintenance
            .allow_ips
            .iter()
            .map(ToString::to_string)
            .collect();
        // A prefix shorter than the mapped block's /96 holds more than IPv4: kept as written.
        assert_eq!(allowed, ["203.0.113.0/24", "::ffff:0.0.0.0/95"]);
    }

    /// A webhook's `timeout` is bounded as the config's other waits are: `"1d"` passed, and a
    /// receiver that hung then held its queue (every later event) for eight days.
    #[test]
    fn a_webhook_timeout_is_at_most_a_minute() {
        let text = |t: &str| format!("[[notify]]\nurl = \"https://h/x\"\ntimeout = \"{t}\"\n");
        for ok in ["5s", "60s", "1m"] {
            assert_eq!(problems(&text(ok)), Vec::new(), "{ok}");
        }
        for long in ["61s", "1d"] {
            let p = problems(&text(long));
            assert_eq!(p.len(), 1, "{p:?}");
            assert_eq!(p[0].key, "notify[0].timeout");
            assert!(p[0].message.starts_with("must be at most 60s"), "{p:?}");
        }
    }

    /// The shipped `config.toml` says that the values it writes are the defaults, but for
    /// the keys it marks "shipped:": a default changed in the code and not in the file (or the
    /// other way round) would have the reference teach operators a value they do not get.
    #[test]
    fn the_shipped_config_writes_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = include_str!("../../config.toml");
        let mut shipped = Config::parse(shipped, dir.path(), None).unwrap();
        let defaults = Config::parse("# the built-in defaults\n", dir.path(), None).unwrap();
        // The one key marked "shipped:".
        assert_eq!(
            shipped.admin.listen,
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(defaults.admin.listen, None);
        shipped.admin.listen = None;
        // Which sections are written is no value.
        shipped.sections.clear();
        assert_eq!(format!("{shipped:#?}"), format!("{defaults:#?}"));
    }
}
