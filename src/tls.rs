//! TLS with rustls (ring provider): the server side (certificates chosen by SNI, ALPN `h2` and
//! `http/1.1`, TLS 1.2 and 1.3 only) and the client side for `https://` upstreams.
//!
//! Both are built whole at start and at reload; a certificate that does not load, or a key
//! that does not match its certificate, is an error naming the file and its
//! `tls.certificates[N]` entry (every such entry, not only the first), and the running
//! configuration stays.

use crate::config::{CertificatePaths, TlsConfig, UpstreamConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)", .0.display())]
    NoCertificate(PathBuf),
    /// The file holds the other half of the pair alone: `cert` and `key` swapped, or the
    /// certificate named for both. Said as such: "no certificate found" in a file an operator
    /// had just made, beside an "unsupported private key" in the other, sent them looking
    /// at the files' formats.
    #[error(
        "{}: it holds a {holds} and no {wanted}: are cert and key swapped?",
        path.display()
    )]
    OtherHalf {
        path: PathBuf,
        holds: &'static str,
        wanted: &'static str,
    },
    #[error("{}: unsupported private key: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{} does not match the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    /// The key belongs to a certificate of the file other than its first: the chain is out of
    /// order (an intermediate first), which would otherwise be reported as a mismatch.
    #[error(
        "{}: the chain must begin with the server's certificate, but the one for {} is \
         certificate {position} of the file; put it first, then its intermediates",
        cert.display(),
        key.display()
    )]
    ChainOrder {
        cert: PathBuf,
        key: PathBuf,
        position: usize,
    },
    /// The first certificate of the file is not one that can be served (damaged, or a
    /// kind webpki does not read), which would otherwise be reported as a mismatch.
    #[error("{}: the first certificate cannot be used: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    /// `how`: what in the file says so (`encryption`), since the two ways of writing an
    /// encrypted key look nothing alike and an operator looks for the one named.
    #[error(
        "{}: the private key is encrypted ({how}), and intermission has no passphrase to open \
         it; decrypt it (openssl pkey -in KEY -out PLAIN.key)",
        path.display()
    )]
    EncryptedKey { path: PathBuf, how: String },
    /// Every `[[tls.certificates]]` entry that does not load, each with its index, so that
    /// one run of `check` (or one refused start or reload) says all of them.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Certificates(Vec<EntryError>),
    /// At a reload, the file of a certificate clients accept now holds one they refuse
    /// (expired, not valid yet): serving it would turn a working site into one no client
    /// reaches, so the reload is refused and the one served stays.
    #[error(
        "{}: the certificate in it {why}, where the one served from it now is valid: clients \
         would refuse it, so the reload is refused and the one served stays; renew it (a \
         restart serves it anyway)",
        path.display()
    )]
    WorseAtReload { path: PathBuf, why: String },
    #[error("TLS settings: {0}")]
    Settings(String),
    /// `upstream.ca_file` does not load: named by its key, as every other problem is.
    #[error("upstream.ca_file: {0}")]
    CaFile(Box<TlsError>),
}

/// One problem of the `[[tls.certificates]]` entry at `index`.
#[derive(Debug, thiserror::Error)]
#[error("tls.certificates[{index}]: {error}")]
pub struct EntryError {
    pub index: usize,
    pub error: Box<TlsError>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// From this long before a certificate's end, start, reload and `check` warn that it ends.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// What the TLS listeners serve: their settings (`None` without certificates), and when each
/// certificate ends.
#[derive(Clone, Default)]
pub struct ServerTls {
    pub config: Option<Arc<ServerConfig>>,
    pub ends: Arc<[CertificateEnd]>,
    /// The chains served, in entry order: what decides whether a reload may keep the
    /// sessions made before it (`resumption`).
    chains: Arc<[Vec<CertificateDer<'static>>]>,
    /// The file each chain was read from: what a reload compares a renewed certificate with
    /// (`replaced_by_one_refused`).
    files: Arc<[PathBuf]>,
}

/// When the chain of one `[[tls.certificates]]` entry ends: the earliest `notAfter` of the
/// certificates its file serves, the server's own or an intermediate's (Let's Encrypt's
/// chains of 2021 ended with their cross-signed root while every server's own certificate was
/// valid). What the expiry gauge shows, and what a running proxy warns of as the end nears
/// (`expiry_warnings`), since a proxy may run for months between reloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateEnd {
    pub index: usize,
    pub file: PathBuf,
    pub not_after: SystemTime,
    /// The certificate that ends then, when it is not the file's first (the server's own).
    pub chain: Option<ChainEnd>,
}

/// A certificate of a served chain, after the server's own, that ends before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainEnd {
    /// Its place in the file, from 1 (the server's own is 1).
    pub position: usize,
    /// What it is, as the warning names it: "an intermediate, CN=R3".
    pub what: String,
    /// When the server's own certificate ends (`None`: it ends before it begins).
    pub leaf_not_after: Option<SystemTime>,
}

impl CertificateEnd {
    /// The warning the entry calls for at `now`, unprefixed: ended, or ending within
    /// `EXPIRY_WARNING`.
    fn warning(&self, now: SystemTime) -> Option<String> {
        let file = self.file.display();
        let date = crate::time::Timestamp(self.not_after).rfc3339();
        let chain = self.chain.as_ref();
        // The server's own certificate ended too: that is what to renew, and what every
        // client refuses, whatever the chain's.
        let leaf_ended = chain
            .and_then(|c| c.leaf_not_after)
            .filter(|end| *end < now);
        if let Some(end) = leaf_ended {
            let date = crate::time::Timestamp(end).rfc3339();
            return Some(format!(
                "the certificate in {file} expired on {date}: clients refuse it; renew it \
                 and reload"
            ));
        }
        let ended = self.not_after < now;
        if !ended && self.not_after > now + EXPIRY_WARNING {
            return None;
        }
        Some(match (chain, ended) {
            (None, true) => format!(
                "the certificate in {file} expired on {date}: clients refuse it; renew it \
                 and reload"
            ),
            (None, false) => {
                format!("the certificate in {file} expires on {date}: renew it and reload")
            }
            (Some(c), true) => format!(
                "certificate {} of {file} ({}) expired on {date}, before the server's own: \
                 clients that follow the chain refuse it; use the chain your certificate \
                 authority issues now (a renewal brings it) and reload",
                c.position, c.what
            ),
            (Some(c), false) => format!(
                "certificate {} of {file} ({}) expires on {date}, before the server's own: \
                 clients that follow the chain refuse it from then; use the chain your \
                 certificate authority issues now (a renewal brings it) and reload",
                c.position, c.what
            ),
        })
    }
}

/// The warnings a running proxy logs at `now` about the certificates it serves: each one that
/// has ended or ends within `EXPIRY_WARNING`, as start and reload say it.
pub fn expiry_warnings(ends: &[CertificateEnd], now: SystemTime) -> Vec<String> {
    ends.iter()
        .filter_map(|e| {
            Some(format!(
                "tls.certificates[{}]: {}",
                e.index,
                e.warning(now)?
            ))
        })
        .collect()
}

/// When `expiry_warnings` has something new to say after `now`, which has just been said: a
/// certificate entering its last `EXPIRY_WARNING`, one ending, and then once a day for each
/// one that is ending or has ended, so that an operator who missed a line meets another.
pub fn next_expiry_check(ends: &[CertificateEnd], now: SystemTime) -> Option<SystemTime> {
    const DAY: Duration = Duration::from_secs(86_400);
    ends.iter()
        .map(|e| {
            let warn_from = e
                .not_after
                .checked_sub(EXPIRY_WARNING)
                .unwrap_or(UNIX_EPOCH);
            // Clients refuse a certificate from the second after its `notAfter`.
            let refused_from = e.not_after + Duration::from_secs(1);
            if now < warn_from {
                warn_from
            } else if now < refused_from {
                refused_from.min(now + DAY)
            } else {
                now + DAY
            }
        })
        .min()
}

/// The server configuration for the TLS listeners. What would let clients down although it
/// loads (`server_config_checked`) is logged as warnings.
pub fn server_config(tls: &TlsConfig) -> Result<ServerTls, TlsError> {
    let (served, warnings) = server_config_checked(tls, SystemTime::now(), None)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    Ok(served)
}

/// `server_config`, with what clients would refuse although it loads, as of `now`, each
/// named by its entry: a certificate expired, not yet valid or ending within
/// `EXPIRY_WARNING`, an expired certificate in its chain, and a file that holds the server's
/// certificate alone when another issued it (`cert.pem` named where `fullchain.pem` was
/// meant: browsers may find the intermediate themselves, most other clients do not).
/// nginx serves all of these without a word.
///
/// `previous`: what served before a reload, whose sessions clients may go on resuming when
/// it served the same certificates (`resumption`).
pub fn server_config_checked(
    tls: &TlsConfig,
    now: SystemTime,
    previous: Option<&ServerTls>,
) -> Result<(ServerTls, Vec<String>), TlsError> {
    if tls.certificates.is_empty() {
        return Ok((ServerTls::default(), Vec::new()));
    }
    let provider = provider();
    let mut certs = Vec::new();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut ends = Vec::new();
    for (index, paths) in tls.certificates.iter().enumerate() {
        match load_certified_key(paths, &provider) {
            Ok(c) => {
                if let Some(why) = replaced_by_one_refused(previous, &paths.cert, &c.leaf, now) {
                    problems.push(EntryError {
                        index,
                        error: Box::new(TlsError::WorseAtReload {
                            path: paths.cert.clone(),
                            why,
                        }),
                    });
                    continue;
                }
                let end = chain_end(&c.key.cert).map(|(not_after, chain)| CertificateEnd {
                    index,
                    file: paths.cert.clone(),
                    not_after,
                    chain,
                });
                warnings.extend(
                    chain_warnings(&paths.cert, &c.key.cert, end.as_ref(), now)
                        .into_iter()
                        .map(|w| format!("tls.certificates[{index}]: {w}")),
                );
                ends.extend(end);
                certs.push(c);
            }
            Err(errors) => problems.extend(errors.into_iter().map(|error| EntryError {
                index,
                error: Box::new(error),
            })),
        }
    }
    if !problems.is_empty() {
        return Err(TlsError::Certificates(problems));
    }
    let chains: Arc<[Vec<CertificateDer<'static>>]> =
        certs.iter().map(|c| c.key.cert.clone()).collect();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { certs }));
    resumption(&mut config, &chains, previous)?;
    // `http/1.0` too: a client that offers it alone is served over HTTP/1, as nginx serves
    // it, where rustls would end the handshake with a fatal alert.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    if tls.listen.is_empty() {
        warnings.push(
            "tls.certificates are set, but tls.listen is empty: nothing serves HTTPS; add an \
             address to tls.listen, such as \"[::]:443\""
                .to_owned(),
        );
    }
    // Certificates nothing serves (said above) have no end to watch or show.
    if tls.listen.is_empty() {
        ends.clear();
    }
    let served = ServerTls {
        config: Some(Arc::new(config)),
        ends: ends.into(),
        chains,
        files: tls.certificates.iter().map(|p| p.cert.clone()).collect(),
    };
    Ok((served, warnings))
}

/// Why clients would refuse `leaf` at `now` by its dates alone (expired, not valid yet, ending
/// before it begins), if they would.
fn refused_by_date(leaf: &CertificateDer<'_>, now: SystemTime) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    // No trust anchor: webpki checks the dates before it looks for an issuer.
    let err = cert
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[],
            &[],
            at,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .err()?;
    let date = |t: UnixTime| {
        crate::time::Timestamp(UNIX_EPOCH + Duration::from_secs(t.as_secs())).rfc3339()
    };
    match err {
        webpki::Error::CertExpired { not_after, .. } => {
            Some(format!("expired on {}", date(not_after)))
        }
        webpki::Error::CertNotValidYet { not_before, .. } => Some(format!(
            "is not valid before {} (or this machine's clock is wrong)",
            date(not_before)
        )),
        webpki::Error::InvalidCertValidity => {
            Some("ends before it begins (notAfter before notBefore)".to_owned())
        }
        _ => None,
    }
}

/// At a reload, why the certificate `leaf` now read from `file` is refused: clients would
/// refuse it by its dates, where they accept the one served from the same file until now (a
/// renewal job that copied an old backup, a clock-skewed issuer). At start there is nothing
/// better to serve, and it is served with a warning, as nginx serves it.
fn replaced_by_one_refused(
    previous: Option<&ServerTls>,
    file: &Path,
    leaf: &CertificateDer<'_>,
    now: SystemTime,
) -> Option<String> {
    let previous = previous?;
    let served = previous
        .files
        .iter()
        .zip(previous.chains.iter())
        .find(|(f, _)| f.as_path() == file)
        .and_then(|(_, chain)| chain.first())?;
    if refused_by_date(served, now).is_some() {
        return None;
    }
    // One valid within the hour is taken: issuers backdate a new certificate by only a
    // minute or less (step-ca, Vault), so a proxy whose clock runs a little behind theirs
    // refused a renewal that its hook, run once, never sent again; the old one then served
    // until it expired. The start's and `check`'s warning still says it is not valid yet.
    refused_by_date(leaf, now)?;
    refused_by_date(leaf, now + NOT_YET_VALID_GRACE)
}

/// How far ahead a renewed certificate's `notBefore` may be and still replace a valid one.
const NOT_YET_VALID_GRACE: Duration = Duration::from_secs(3600);

/// How clients resume their sessions (an abbreviated handshake: no certificate sent, no
/// signature made, one round trip less): by tickets the proxy encrypts under keys of its own,
/// rotated every 6 hours (rustls' `Ticketer`), so that every client can, where rustls'
/// default cache holds the last 256 sessions and a busy site's clients fall out of it within
/// seconds. TLS 1.2 clients without tickets still use that cache.
///
/// A reload that serves the very certificates served before keeps both (a changed message or
/// timeout, a `SIGHUP` from a renewal job that renewed nothing): otherwise every client's
/// next connection would make a full handshake. One that changed them starts afresh, as nginx
/// does (its session ID context is a digest of the certificates), so that no session made
/// under an identity no longer served is resumed under another.
fn resumption(
    config: &mut ServerConfig,
    chains: &[Vec<CertificateDer<'static>>],
    previous: Option<&ServerTls>,
) -> Result<(), TlsError> {
    let kept = previous
        .filter(|p| *p.chains == *chains)
        .and_then(|p| p.config.as_ref());
    match kept {
        Some(before) => {
            config.ticketer = before.ticketer.clone();
            config.session_storage = before.session_storage.clone();
        }
        None => {
            config.ticketer = ring::Ticketer::new()
                .map_err(|e| TlsError::Settings(format!("session tickets: {e}")))?;
        }
    }
    Ok(())
}

/// The `notAfter` of a certificate that loads: webpki keeps its dates to itself, but names
/// the end in the error of a check made after it (the year 10000 is after every end X.509 can
/// write). `None` for one that ends before it begins, which `chain_warnings` reports.
fn end_of(leaf: &CertificateDer<'_>) -> Option<SystemTime> {
    const AFTER_EVERY_END: u64 = 253_402_300_800;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let err = cert
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[],
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(AFTER_EVERY_END)),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .err()?;
    match err {
        webpki::Error::CertExpired { not_after, .. } => {
            Some(UNIX_EPOCH + Duration::from_secs(not_after.as_secs()))
        }
        _ => None,
    }
}

/// When `chain` (a file's certificates, the server's own first) stops being accepted: the
/// earliest `notAfter` of them, and which certificate that is when it is not the first.
/// Of certificates that end at once, the first is named. A certificate webpki does not read
/// (an X.509 v1 root) or that ends before it begins has no end here; `None` when none has.
fn chain_end(chain: &[CertificateDer<'_>]) -> Option<(SystemTime, Option<ChainEnd>)> {
    let leaf_not_after = chain.first().and_then(end_of);
    let (position, not_after) = chain
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, end_of(c)?)))
        .min_by_key(|&(i, end)| (end, i))?;
    if position == 0 {
        return Some((not_after, None));
    }
    let what = chain
        .get(position)
        .map_or_else(String::new, |c| describe(c));
    Some((
        not_after,
        Some(ChainEnd {
            position: position + 1,
            what,
            leaf_not_after,
        }),
    ))
}

/// A certificate of a chain after the server's own, as a warning names it: "an
/// intermediate, CN=R3", or "a root, CN=…" for one that issued itself.
fn describe(cert: &CertificateDer<'_>) -> String {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return "a certificate".to_owned();
    };
    let kind = if parsed.issuer() == parsed.subject() {
        "a root"
    } else {
        "an intermediate"
    };
    match common_name(parsed.subject()) {
        Some(cn) => format!("{kind}, CN={cn}"),
        None => kind.to_owned(),
    }
}

/// The first common name (CN) of a DER `Name`, given without its outer `SEQUENCE`: what
/// operators and `openssl x509 -subject` know an intermediate by. Cut to 64 characters,
/// with control characters as `?`: a name is written into the log.
fn common_name(name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut rdns = name;
    while let Some((_, set, rest)) = der_element(rdns) {
        rdns = rest;
        let mut attributes = set;
        while let Some((_, attribute, rest)) = der_element(attributes) {
            attributes = rest;
            let Some((0x06, oid, value)) = der_element(attribute) else {
                continue;
            };
            let Some((tag, value, _)) = der_element(value) else {
                continue;
            };
            if oid != CN {
                continue;
            }
            let text = match tag {
                // UTF8String, PrintableString, IA5String.
                0x0c | 0x13 | 0x16 => String::from_utf8_lossy(value).into_owned(),
                // TeletexString, as Latin-1 (what issuers that use it write).
                0x14 => value.iter().map(|&b| char::from(b)).collect(),
                // BMPString: UTF-16, big-endian.
                0x1e => char::decode_utf16(
                    value
                        .chunks_exact(2)
                        .map(|p| u16::from_be_bytes([p[0], p[1]])),
                )
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect(),
                _ => continue,
            };
            return Some(
                text.chars()
                    .take(64)
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect(),
            );
        }
    }
    None
}

/// The first DER element of `input`: its tag, its contents and what follows it. `None` for
/// one cut short or longer than 4 GiB.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// What clients would refuse in the chain of the file `path`, which loads (its first
/// certificate reads): the server's own certificate not valid yet or ending before it
/// begins, the chain's end (`end`, the earliest of its certificates') past or near, and a
/// file without the intermediate of the server's issuer.
fn chain_warnings(
    path: &Path,
    chain: &[CertificateDer<'static>],
    end: Option<&CertificateEnd>,
    now: SystemTime,
) -> Vec<String> {
    let Some((first, rest)) = chain.split_first() else {
        return Vec::new();
    };
    let Ok(leaf) = webpki::EndEntityCert::try_from(first) else {
        return Vec::new();
    };
    let date = |t: UnixTime| {
        crate::time::Timestamp(UNIX_EPOCH + Duration::from_secs(t.as_secs())).rfc3339()
    };
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    // No trust anchor and no intermediate: webpki checks the dates of the server's own
    // certificate before it looks for an issuer.
    let own = leaf
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[],
            &[],
            at,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .err();
    let file = path.display();
    let mut warnings = Vec::new();
    match own {
        Some(webpki::Error::CertNotValidYet { not_before, .. }) => warnings.push(format!(
            "the certificate in {file} is not valid before {}: clients refuse it until then \
             (or this machine's clock is wrong)",
            date(not_before)
        )),
        Some(webpki::Error::InvalidCertValidity) => warnings.push(format!(
            "the certificate in {file} ends before it begins (notAfter before notBefore): \
             clients refuse it"
        )),
        _ => {}
    }
    warnings.extend(end.and_then(|e| e.warning(now)));
    if rest.is_empty() && leaf.issuer() != leaf.subject() {
        warnings.push(format!(
            "{file} holds only the server's certificate, not the intermediate certificates \
             of its issuer: clients that do not have them already refuse it (Let's Encrypt: \
             name fullchain.pem, not cert.pem); ignore this if clients trust its issuer \
             directly"
        ));
    }
    warnings
}

/// The entry's certificate chain and key; when both files fail to load, both problems.
fn load_certified_key(
    paths: &CertificatePaths,
    provider: &CryptoProvider,
) -> Result<Certified, Vec<TlsError>> {
    let (chain, signing) = match (
        read_served_certs(&paths.cert),
        load_key(&paths.key, provider),
    ) {
        (Ok(chain), Ok(signing)) => (chain, signing),
        (chain, signing) => {
            return Err([chain.err(), signing.err()].into_iter().flatten().collect())
        }
    };
    let leaf = chain[0].clone();
    if let Err(e) = webpki::EndEntityCert::try_from(&leaf) {
        return Err(vec![TlsError::BadCertificate {
            path: paths.cert.clone(),
            reason: certificate_problem(&e),
        }]);
    }
    // Which certificate of the file the key is for, when it is not the first.
    let position = signing.public_key().and_then(|spki| {
        chain.iter().skip(1).position(|c| {
            webpki::EndEntityCert::try_from(c)
                .is_ok_and(|c| c.subject_public_key_info().as_ref() == spki.as_ref())
        })
    });
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        vec![match position {
            Some(i) => TlsError::ChainOrder {
                cert: paths.cert.clone(),
                key: paths.key.clone(),
                position: i + 2,
            },
            None => TlsError::Mismatch {
                cert: paths.cert.clone(),
                key: paths.key.clone(),
            },
        }]
    })?;
    Ok(Certified {
        leaf,
        key: Arc::new(certified),
    })
}

fn load_key(
    path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
    let refused = |reason: String| TlsError::Key {
        path: path.to_path_buf(),
        reason,
    };
    // A file that cannot be read is not a key of the wrong kind: "unsupported private key:
    // Permission denied" sent operators looking at the key's format, not at its mode.
    let bytes =
        crate::files::read(path, crate::files::MAX_PEM_BYTES).map_err(|e| TlsError::Read {
            path: path.to_path_buf(),
            reason: read_problem(&e),
        })?;
    let key = PrivateKeyDer::from_pem_slice(without_bom(&bytes)).map_err(|e| {
        // An encrypted key is skipped by the PEM reader as an unknown section, which would
        // be reported as "no items found": say what it is instead.
        match encryption(&String::from_utf8_lossy(&bytes)) {
            Some(how) => TlsError::EncryptedKey {
                path: path.to_path_buf(),
                how,
            },
            None if holds_certificate(&bytes, &e) => TlsError::OtherHalf {
                path: path.to_path_buf(),
                holds: "certificate",
                wanted: "private key",
            },
            None => refused(pem_problem(&e, "PRIVATE KEY")),
        }
    })?;
    provider.key_provider.load_private_key(key).map_err(|e| {
        // ring's words ("failed to parse private key as RSA, ECDSA, or EdDSA") are all it
        // says for a key it does not take, a 1024-bit RSA or a P-521 one among them.
        refused(format!(
            "{e} (supported: RSA of 2048 to 8192 bits, ECDSA P-256 or P-384, Ed25519)"
        ))
    })
}

/// A PEM file's bytes without the UTF-8 byte order mark an editor may have put first (Windows
/// Notepad, a certificate pasted there from a portal's page): the PEM reader takes the line it
/// is on for text before the first block, and said of a file whose `-----BEGIN` an operator
/// can see that it held no certificate or key, where OpenSSL (nginx) reads it.
fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// What says a PEM key file is encrypted, if anything does: a PKCS#8 `ENCRYPTED PRIVATE KEY`
/// block (`openssl pkcs8 -topk8`, `openssl genpkey -aes256`), or OpenSSL's older way, a
/// `Proc-Type: 4,ENCRYPTED` header in a block of the key's own kind (`RSA PRIVATE KEY`, as
/// `openssl genrsa -aes256` wrote it before 3.0; `EC PRIVATE KEY`). Named as it is in the
/// file: "ENCRYPTED PRIVATE KEY" sent an operator looking for a line not there.
fn encryption(text: &str) -> Option<String> {
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Some("PEM \"ENCRYPTED PRIVATE KEY\"".to_owned());
    }
    const HEADER: &str = "Proc-Type: 4,ENCRYPTED";
    let at = text.find(HEADER)?;
    // The label of the block the header is in, when it reads as one (a few capitals).
    let label = text[..at]
        .rfind("-----BEGIN ")
        .and_then(|begin| text[begin + "-----BEGIN ".len()..at].split_once("-----"))
        .map(|(label, _)| label)
        .filter(|l| {
            (1..=40).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_uppercase() || b == b' ')
        });
    Some(match label {
        Some(label) => format!("PEM \"{label}\" with \"{HEADER}\""),
        None => format!("PEM header \"{HEADER}\""),
    })
}

/// Why a certificate or key file cannot be read, with what to do when the proxy's user may
/// not read it (certbot keeps its keys to root).
pub fn read_problem(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(
            "{e}: the user the proxy runs as may not read it (or a folder on its path); make \
             it readable by that user (see \"Running it as a service\" in the README)"
        )
    } else {
        e.to_string()
    }
}

/// A PEM reader's error in words: its own name the missing end line and the bad start line
/// as lists of bytes.
fn pem_problem(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a PEM block has no \"-----END {}-----\" line: the file is cut short or damaged",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { .. } => {
            "a \"-----BEGIN\" line is malformed: the file is damaged".to_owned()
        }
        Error::Base64Decode(_) => {
            "a PEM block is not valid base64: the file is damaged or cut short".to_owned()
        }
        Error::NoItemsFound => format!("no PEM \"{what}\" block found"),
        e => e.to_string(),
    }
}

/// Why webpki cannot read the first certificate of a chain.
fn certificate_problem(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnsupportedCertVersion => {
            "it is an X.509 version 1 certificate, which is not supported; issue it again as \
             version 3 (with subjectAltName)"
                .to_owned()
        }
        webpki::Error::BadDer | webpki::Error::BadDerTime | webpki::Error::TrailingData(_) => {
            "it is not a well-formed X.509 certificate (damaged?)".to_owned()
        }
        e => e.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |reason: String| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = crate::files::read(path, crate::files::MAX_PEM_BYTES)
        .map_err(|e| read(read_problem(&e)))?;
    let certs = CertificateDer::pem_slice_iter(without_bom(&bytes))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(pem_problem(&e, "CERTIFICATE")))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// `read_certs` for a `[[tls.certificates]]` entry's `cert`, whose file may hold the entry's
/// key instead (not for `upstream.ca_file`, which has no key beside it to swap with).
fn read_served_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    read_certs(path).map_err(|e| match e {
        TlsError::NoCertificate(path)
            if crate::files::read(&path, crate::files::MAX_PEM_BYTES)
                .is_ok_and(|bytes| PrivateKeyDer::from_pem_slice(without_bom(&bytes)).is_ok()) =>
        {
            TlsError::OtherHalf {
                path,
                holds: "private key",
                wanted: "certificate",
            }
        }
        e => e,
    })
}

/// Whether a key file the PEM reader found no key in (`e`) holds a certificate instead.
fn holds_certificate(bytes: &[u8], e: &rustls::pki_types::pem::Error) -> bool {
    matches!(e, rustls::pki_types::pem::Error::NoItemsFound)
        && CertificateDer::pem_slice_iter(without_bom(bytes)).any(|c| c.is_ok())
}

#[derive(Debug)]
struct Certified {
    leaf: CertificateDer<'static>,
    key: Arc<CertifiedKey>,
}

/// Picks a certificate valid for the SNI name (wildcards included, as webpki checks them),
/// else the first certificate. Among several valid for the name, one whose key can sign in a
/// scheme the client offers comes first (an ECDSA and an RSA certificate for the same names,
/// as nginx serves them: a client that verifies RSA alone got the ECDSA one, listed first,
/// and failed), then one that names it exactly rather than by a wildcard (`shop.example.com`
/// before `*.example.com`, as nginx chooses: listed after the wildcard, the exact one was
/// never served), then the first listed.
#[derive(Debug)]
struct BySni {
    certs: Vec<Certified>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|asked| {
            let name = ServerName::try_from(asked).ok()?;
            let asked = asked.trim_end_matches('.');
            self.certs
                .iter()
                .filter_map(|c| {
                    let cert = webpki::EndEntityCert::try_from(&c.leaf).ok()?;
                    cert.verify_is_valid_for_subject_name(&name).ok()?;
                    let exact = cert
                        .valid_dns_names()
                        .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(asked));
                    let signs = c.key.key.choose_scheme(hello.signature_schemes()).is_some();
                    Some((c, signs, exact))
                })
                // `min_by_key` keeps the first of equals: the order the operator listed.
                .min_by_key(|&(_, signs, exact)| (!signs, !exact))
                .map(|(c, _, _)| c)
        });
        // No name, or one none has: the first listed whose key the client verifies, as for
        // a name (an RSA-only client without SNI got a first-listed ECDSA one and failed).
        let fallback = || {
            self.certs
                .iter()
                .find(|c| c.key.key.choose_scheme(hello.signature_schemes()).is_some())
                .or(self.certs.first())
        };
        chosen.or_else(fallback).map(|c| c.key.clone())
    }
}

/// The client configuration for `https://` upstreams: the system's roots, or
/// `upstream.ca_file`, or (loudly) no verification at all.
pub fn client_config(upstream: &UpstreamConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Settings(e.to_string()))?;
    let config = if upstream.danger_accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match &upstream.ca_file {
            Some(path) => {
                let ca_file = |e| TlsError::CaFile(Box::new(e));
                let certs = read_certs(path).map_err(ca_file)?;
                for cert in &certs {
                    roots
                        .add(cert.clone())
                        .map_err(|e| TlsError::Read {
                            path: path.clone(),
                            reason: e.to_string(),
                        })
                        .map_err(ca_file)?;
                }
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError::Read {
                    path: path.clone(),
                    reason: e.to_string(),
                })
                .map_err(ca_file)?;
                let verifier = CaFile {
                    inner,
                    pinned: certs,
                };
                return Ok(Arc::new(
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(verifier))
                        .with_no_client_auth(),
                ));
            }
            // The system store is read only when an https:// server needs it: it is a few
            // hundred files and a few hundred KiB in memory.
            None if upstream
                .servers
                .iter()
                .any(|s| s.protocol == crate::config::Protocol::Https) =>
            {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    tracing::warn!("no system root certificates found; https:// upstreams will fail verification (set upstream.ca_file)");
                }
            }
            None => {}
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    // ALPN (h2, http/1.1) is set by the connector, which insists on setting it itself.
    Ok(Arc::new(config))
}

/// A refused certificate in words, for a link of an error's chain (`logging::with_causes`),
/// and an answer that is not TLS at all:
/// rustls names some refusals by their variant alone, and wraps webpki's in two more
/// (`invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))`), which is what an
/// operator met for the commonest backend of all, one with a certificate of its own made by
/// `openssl req -x509`. The variant's name stays, for searching. `None`: not a refusal, or
/// one rustls says well (a wrong name, an expired certificate, with their details).
pub(crate) fn refusal_in_words(link: &(dyn std::error::Error + 'static)) -> Option<String> {
    let refused = match rustls_error(link)? {
        rustls::Error::InvalidCertificate(refused) => refused,
        // A record that begins with no TLS content type: a plaintext server answering (an
        // `https://` written for an `http://` one), which said only "received corrupt message
        // of type InvalidContentType".
        e @ rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
            return Some(format!(
                "{e} (what came back is not TLS: a server speaking plaintext?)"
            ))
        }
        _ => return None,
    };
    let words = match refused {
        rustls::CertificateError::UnknownIssuer => {
            "UnknownIssuer (issued by an authority not trusted here: a private one, or the \
             certificate signed itself)"
                .to_owned()
        }
        // Dates, where rustls gives seconds since 1970 ("not valid after 1609459200 (187211590
        // seconds ago)"); the time checked at too, since a clock that is wrong is one cause.
        rustls::CertificateError::ExpiredContext { time, not_after } => format!(
            "certificate expired on {} (checked at {})",
            date(not_after),
            date(time)
        ),
        rustls::CertificateError::NotValidYetContext { time, not_before } => format!(
            "certificate not valid before {} (checked at {}: is a clock behind?)",
            date(not_before),
            date(time)
        ),
        rustls::CertificateError::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CaUsedAsEndEntity) => "CaUsedAsEndEntity (a self-signed \
                 certificate marked a CA, as `openssl req -x509` makes it, not trusted here)"
                .to_owned(),
            Some(e) => format!("{e:?}"),
            None => other.0.to_string(),
        },
        _ => return None,
    };
    Some(format!("invalid peer certificate: {words}"))
}

/// A certificate's time as the log writes times.
fn date(time: &UnixTime) -> String {
    crate::time::Timestamp(UNIX_EPOCH + Duration::from_secs(time.as_secs())).rfc3339()
}

/// The rustls error `link` is, or carries inside I/O errors (tokio-rustls hands it on in
/// one, and the connector wraps that in another). An I/O error's `source` is its inner
/// error's source, not the inner error, so the chain alone never reaches it.
fn rustls_error<'a>(link: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut link = link;
    loop {
        if let Some(tls) = link.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        link = link.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
}

/// Whether `e` (or a cause) is an `https://` server's certificate refused for want of trust,
/// which `upstream.ca_file` mends.
fn untrusted(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut link = Some(e);
    while let Some(l) = link {
        if let Some(rustls::Error::InvalidCertificate(refused)) = rustls_error(l) {
            return match refused {
                rustls::CertificateError::UnknownIssuer => true,
                rustls::CertificateError::Other(other) => matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ),
                _ => false,
            };
        }
        link = l.source();
    }
    false
}

/// An `https://` server's failure and its causes (`logging::with_causes`), with what mends
/// a certificate refused for want of trust: the forwarding log line and `ctl health`'s last
/// error said `UnknownIssuer`, and nothing of `upstream.ca_file`.
pub fn upstream_failure(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = crate::logging::with_causes(e);
    if untrusted(e) {
        text.push_str(
            "; to trust it, put the certificate of the authority that issued it (or the \
             self-signed certificate itself) in upstream.ca_file",
        );
    }
    text
}

/// `upstream.ca_file`'s verification: webpki's, which also takes a server that presents one
/// of the file's certificates itself. `openssl req -x509`, the usual way to make a
/// self-signed certificate, marks it a CA (`CA:TRUE`), and webpki refuses a CA's certificate
/// as a server's (`CaUsedAsEndEntity`): the application behind such a certificate was shown
/// as down, everyone getting the outage page, where nginx, HAProxy and Go's proxies (OpenSSL,
/// crypto/x509) take the certificate trusted as it is. Trusting a CA trusts whatever it
/// signs, itself included: accepting it is no wider trust. Its time was checked before the
/// refusal (webpki checks validity first); its name is checked here; the handshake's
/// signature by its key, as for any other.
#[derive(Debug)]
struct CaFile {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for CaFile {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            &verified
        else {
            return verified;
        };
        let ca_as_server = matches!(
            other.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        );
        if !ca_as_server
            || !self
                .pinned
                .iter()
                .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return verified;
        }
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `upstream.danger_accept_invalid_certs`: signatures are still checked, identities are not.
#[derive(Debug)]
struct AcceptAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    /// An encrypted key is named as the file writes it: a PKCS#1 key encrypted the old way
    /// was said to be a PEM "ENCRYPTED PRIVATE KEY", which the file does not hold.
    #[test]
    fn an_encrypted_key_is_named_as_its_file_writes_it() {
        let dir = tempfile::tempdir().expect("a folder");
        let pem = rcgen::KeyPair::generate().expect("a key").serialize_pem();
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .join("\n");
        let legacy = |label: &str| {
            format!(
                "-----BEGIN {label}-----\nProc-Type: 4,ENCRYPTED\n\
                 DEK-Info: AES-256-CBC,0123456789ABCDEF0123456789ABCDEF\n\n{body}\n\
                 -----END {label}-----\n"
            )
        };
        let pkcs8 = pem.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY");
        for (text, says) in [
            (
                legacy("RSA PRIVATE KEY"),
                "(PEM \"RSA PRIVATE KEY\" with \"Proc-Type: 4,ENCRYPTED\")",
            ),
            (
                legacy("EC PRIVATE KEY"),
                "(PEM \"EC PRIVATE KEY\" with \"Proc-Type: 4,ENCRYPTED\")",
            ),
            (pkcs8, "(PEM \"ENCRYPTED PRIVATE KEY\")"),
        ] {
            let path = dir.path().join("site.key");
            std::fs::write(&path, &text).expect("written");
            let refused = load_key(&path, &provider()).err().map(|e| e.to_string());
            let refused = refused.unwrap_or_default();
            assert!(
                refused.contains("the private key is encrypted") && refused.contains(says),
                "{says}: {refused}"
            );
        }
    }

    fn end(index: usize, not_after: SystemTime) -> CertificateEnd {
        CertificateEnd {
            index,
            file: PathBuf::from(format!("/etc/site{index}.pem")),
            not_after,
            chain: None,
        }
    }

    /// A running proxy warns as a certificate enters its last 14 days, daily after, at its end,
    /// and daily after that; a certificate far from its end says nothing and wakes nobody
    /// before its window.
    #[test]
    fn a_certificate_is_warned_of_from_14_days_before_its_end_and_daily() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ends = [end(0, t0 + 20 * DAY), end(1, t0 + 400 * DAY)];
        assert!(expiry_warnings(&ends, t0).is_empty());
        // The first wakes at its window's start.
        let due = next_expiry_check(&ends, t0);
        assert_eq!(due, Some(t0 + 6 * DAY));
        let said = expiry_warnings(&ends, t0 + 6 * DAY);
        assert_eq!(
            said,
            [
                "tls.certificates[0]: the certificate in /etc/site0.pem expires on \
              2027-02-04T08:00:00Z: renew it and reload"
            ]
        );
        assert_eq!(next_expiry_check(&ends, t0 + 6 * DAY), Some(t0 + 7 * DAY));
        // The last day wakes at the end itself, not a day after it.
        let late = t0 + 20 * DAY - Duration::from_secs(3600);
        let at_end = t0 + 20 * DAY + Duration::from_secs(1);
        assert_eq!(next_expiry_check(&ends, late), Some(at_end));
        // Its last second is still served; from the next, refused: and then once a day.
        assert!(expiry_warnings(&ends, t0 + 20 * DAY)[0].contains("expires on"));
        let said = expiry_warnings(&ends, at_end);
        assert_eq!(said.len(), 1);
        assert!(
            said[0].starts_with("tls.certificates[0]: ")
                && said[0].contains("expired on 2027-02-04T08:00:00Z: clients refuse it"),
            "{said:?}"
        );
        assert_eq!(next_expiry_check(&ends, at_end), Some(at_end + DAY));
        // Without certificates, nothing is ever due.
        assert_eq!(next_expiry_check(&[], t0), None);
    }
}
