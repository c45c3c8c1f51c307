//! The config file as written: serde structs that mirror the TOML, with the documented defaults.
//!
//! Nothing here is validated beyond TOML types; `config::mod` turns these into real types and
//! names the key of every problem. Values that need parsing (durations, addresses, CIDRs, URLs)
//! stay strings here so that their errors can name the key and the fix.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;

/// A duration as written: `"250ms"`, `"5m"`, `"1h30m"`, `"90"` or a bare integer of seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationText(pub String);

impl DurationText {
    fn new(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"250ms\", \"90s\", \"5m\", \"1h30m\" or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText::new(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A list of strings, or one string for a list of one: `listen = "127.0.0.1:8080"` is written
/// as `[admin] listen` is, and refusing it ("expected a sequence") helped nobody. `""` is the
/// empty list, as `admin.listen = ""` is no listener.
fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(if v.is_empty() {
                Vec::new()
            } else {
                vec![v.to_owned()]
            })
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut all = Vec::new();
            while let Some(one) = seq.next_element::<String>()? {
                all.push(one);
            }
            Ok(all)
        }
    }
    d.deserialize_any(V)
}

/// The entries of an array of tables (`[[tls.certificates]]`). One written `[tls.certificates]`
/// is a table, which serde refused as "invalid type: map, expected a sequence": the fix is
/// one more pair of brackets, said so.
fn tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<toml::Value>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<toml::Value>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of tables, each written [[tls.certificates]]")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut all = Vec::new();
            while let Some(one) = seq.next_element::<toml::Value>()? {
                all.push(one);
            }
            Ok(all)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom(
                "is one table; write each certificate as [[tls.certificates]], with two \
                 brackets on each side",
            ))
        }
    }
    d.deserialize_any(V)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyFile {
    #[serde(deserialize_with = "strings")]
    pub listen: Vec<String>,
    pub threads: usize,
    #[serde(deserialize_with = "strings")]
    pub trusted_proxies: Vec<String>,
    pub header_read_timeout: DurationText,
    pub send_timeout: DurationText,
    pub body_read_timeout: DurationText,
    pub shutdown_timeout: DurationText,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_pending_per_client: usize,
    pub redirect_https: bool,
    pub https_port: Option<u16>,
}

impl Default for ProxyFile {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:8080".into()],
            threads: 0,
            trusted_proxies: Vec::new(),
            header_read_timeout: DurationText::new("10s"),
            send_timeout: DurationText::new("60s"),
            body_read_timeout: DurationText::new("60s"),
            shutdown_timeout: DurationText::new("30s"),
            max_header_bytes: 64 * 1024,
            max_connections: 20_000,
            max_pending_per_client: 512,
            redirect_https: false,
            https_port: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamFile {
    #[serde(deserialize_with = "strings")]
    pub servers: Vec<String>,
    pub connect_timeout: DurationText,
    pub response_timeout: DurationText,
    pub read_timeout: DurationText,
    pub idle_timeout: DurationText,
    pub intercept_statuses: Vec<u16>,
    pub ca_file: String,
    pub danger_accept_invalid_certs: bool,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        Self {
            servers: vec!["http://127.0.0.1:3000".into()],
            connect_timeout: DurationText::new("2s"),
            response_timeout: DurationText::new("60s"),
            read_timeout: DurationText::new("5m"),
            idle_timeout: DurationText::new("90s"),
            intercept_statuses: Vec::new(),
            ca_file: String::new(),
            danger_accept_invalid_certs: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    pub format: String,
    pub access_log: bool,
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: "text".into(),
            access_log: true,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceFile {
    /// `None` means "not set": the `pages` folder beside the config if it exists, else the
    /// pages built into the binary.
    pub pages: Option<String>,
    pub message: String,
    pub outage_message: String,
    pub retry_after: DurationText,
    pub outage_retry_after: DurationText,
    pub status_page: String,
    #[serde(deserialize_with = "strings")]
    pub api_prefixes: Vec<String>,
    #[serde(deserialize_with = "strings")]
    pub cors_origins: Vec<String>,
    #[serde(deserialize_with = "strings")]
    pub allow_paths: Vec<String>,
    #[serde(deserialize_with = "strings")]
    pub allow_ips: Vec<String>,
    pub bypass_secret: String,
    pub bypass_ttl: DurationText,
    pub reserved_prefix: String,
}

impl Default for MaintenanceFile {
    fn default() -> Self {
        Self {
            pages: None,
            message: "We are doing some planned maintenance. We will be back shortly.".into(),
            outage_message: "We are having trouble reaching the service. We are on it.".into(),
            retry_after: DurationText::new("5m"),
            outage_retry_after: DurationText::new("30s"),
            status_page: String::new(),
            api_prefixes: vec!["/api/".into()],
            cors_origins: Vec::new(),
            allow_paths: Vec::new(),
            allow_ips: Vec::new(),
            bypass_secret: String::new(),
            bypass_ttl: DurationText::new("12h"),
            reserved_prefix: "/_intermission/".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlFile {
    pub socket: String,
    #[serde(deserialize_with = "octal_text")]
    pub socket_mode: String,
    pub state_file: String,
}

/// A permission mode must be written as a string: TOML reads `0o660` and `432` as the same
/// number, and `660` as a decimal, so a number cannot say which mode the operator meant.
fn octal_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    const NUMBER: &str = super::SOCKET_MODE_AS_TEXT;
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string of octal digits, like \"0660\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
            Err(E::custom(NUMBER))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
            Err(E::custom(NUMBER))
        }
    }
    d.deserialize_any(V)
}

impl Default for ControlFile {
    fn default() -> Self {
        Self {
            socket: "intermission.sock".into(),
            socket_mode: "0600".into(),
            state_file: "intermission-state.json".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFile {
    pub kind: String,
    pub path: String,
    pub interval: DurationText,
    pub down_interval: DurationText,
    pub timeout: DurationText,
    pub rise: u32,
    pub fall: u32,
    pub expect: String,
    pub host: String,
}

impl Default for HealthFile {
    fn default() -> Self {
        Self {
            kind: "http".into(),
            path: "/".into(),
            interval: DurationText::new("2s"),
            down_interval: DurationText::new("500ms"),
            timeout: DurationText::new("1s"),
            rise: 2,
            fall: 3,
            expect: "200-399".into(),
            host: String::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFile {
    #[serde(deserialize_with = "strings")]
    pub listen: Vec<String>,
    /// Each entry is read into a `CertificateFile` on its own, key by key, so that a refused
    /// key names its entry and does not drop the rest of it.
    #[serde(deserialize_with = "tables")]
    pub certificates: Vec<toml::Value>,
    /// `Strict-Transport-Security`'s `max-age`; absent, no such header is sent.
    pub hsts_max_age: Option<DurationText>,
    pub hsts_include_subdomains: bool,
    pub hsts_preload: bool,
}

/// An empty `cert` or `key` is a key left out: validation says it is required, so that
/// each key of an entry can be tried alone.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertificateFile {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    pub listen: String,
}

/// An empty `url` is a key left out: validation says it is required (see `CertificateFile`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyFile {
    /// What metrics (the `webhook` label) and logs call it; its index when empty.
    pub name: String,
    pub url: String,
    pub format: String,
    pub secret: String,
    pub timeout: DurationText,
    /// Sent with every POST, for a receiver that wants a token in a header.
    pub headers: std::collections::BTreeMap<String, String>,
}

impl Default for NotifyFile {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: String::new(),
            format: "json".into(),
            secret: String::new(),
            timeout: DurationText::new("5s"),
            headers: std::collections::BTreeMap::new(),
        }
    }
}
