//! Who may skip the holding response (SPEC §3 "Always forwarded"): the secret bypass link and
//! the signed cookie it sets, the client address for `allow_ips` (believing `X-Forwarded-For` /
//! `Forwarded` only from trusted proxies). The `allow_paths` match is `gateway::allowed_path`.
//!
//! Pure functions only: no I/O, no clock of its own (callers pass `now`), no routing. Whatever a
//! client sends is at worst "not allowed"; nothing here panics on input. The per-request checks
//! return before allocating in the common case (no cookie, no trusted proxies).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue, COOKIE, FORWARDED};
use ipnet::IpNet;
use ring::{hmac, pbkdf2};

use super::fields::{text, Fields};
use crate::config::canonical_ip;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// How many bypass cookies of one request are checked at most.
const MAX_CANDIDATES: usize = 4;

pub const COOKIE_NAME: &str = "intermission_bypass";

/// Domain separation: a cookie MAC can never be replayed as anything else signed with the key.
const MAC_PREFIX: &[u8] = b"intermission-bypass:";
/// `u64::MAX` has 20 decimal digits; longer expiries are rejected before parsing.
const MAX_EXPIRY_DIGITS: usize = 20;
const MAC_LEN: usize = 32;

/// PBKDF2 rounds that turn the secret into the cookie key. A cookie value reaches the
/// application (and whatever logs its `Cookie` headers); with the secret itself as the key,
/// anyone holding one could test guesses of a weak secret offline at one HMAC each. Each guess
/// now costs this many, paid here once per secret (a reload that keeps it keeps the key).
const KDF_ROUNDS: u32 = 100_000;
/// Domain separation for the derivation: the same secret used elsewhere gives another key.
const KDF_SALT: &[u8] = b"intermission-bypass-cookie-key";

/// The secret bypass link and its cookie. Built once per secret (not per request).
///
/// The cookie key is derived from the secret alone, so cookies survive restarts and reloads
/// that keep the secret, and changing the secret revokes every cookie issued under the old one.
pub struct BypassKey {
    cookie_key: hmac::Key,
    /// The secret check compares fixed-length tags under a separate, public key: the comparison
    /// is constant-time and its length says nothing about the secret's length.
    check_key: hmac::Key,
    secret_tag: hmac::Tag,
    ttl_secs: u64,
    /// What the key was built from, so that a reload keeping it keeps the key (`same`).
    secret: String,
    ttl: Duration,
}

impl fmt::Debug for BypassKey {
    // Snapshots are Debug; the secret and its tags must never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BypassKey")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl BypassKey {
    /// None when `secret` is empty (bypass link disabled).
    pub fn new(secret: &str, ttl: Duration) -> Option<BypassKey> {
        if secret.is_empty() {
            return None;
        }
        let check_key = hmac::Key::new(hmac::HMAC_SHA256, b"intermission-bypass-secret-check");
        let secret_tag = hmac::sign(&check_key, secret.as_bytes());
        // Cookies count whole seconds (Max-Age); a sub-second ttl would issue dead cookies.
        let ttl_secs = ttl.as_secs().max(1);
        let mut derived = [0u8; MAC_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::MIN.saturating_add(KDF_ROUNDS - 1),
            KDF_SALT,
            secret.as_bytes(),
            &mut derived,
        );
        Some(BypassKey {
            cookie_key: hmac::Key::new(hmac::HMAC_SHA256, &derived),
            secret: secret.to_owned(),
            check_key,
            secret_tag,
            ttl_secs,
            ttl,
        })
    }

    /// Whether this key is what `new(secret, ttl)` would build.
    pub fn same(&self, secret: &str, ttl: Duration) -> bool {
        self.secret == secret && self.ttl == ttl
    }

    /// Constant-time check of a candidate secret taken verbatim from the URL path segment.
    pub fn secret_matches(&self, candidate: &str) -> bool {
        hmac::verify(
            &self.check_key,
            candidate.as_bytes(),
            self.secret_tag.as_ref(),
        )
        .is_ok()
    }

    /// A cookie value `<expiry unix seconds>.<hex hmac-sha256 of "intermission-bypass:<expiry>">`
    /// valid until `now` + ttl.
    pub fn issue(&self, now: SystemTime) -> String {
        let expiry = unix_secs(now).saturating_add(self.ttl_secs).to_string();
        let mut buf = [0u8; MAC_PREFIX.len() + MAX_EXPIRY_DIGITS];
        let tag = match signed_message(expiry.as_bytes(), &mut buf) {
            Some(msg) => hmac::sign(&self.cookie_key, msg),
            // Unreachable: a u64 always fits; an empty MAC just yields a cookie that never verifies.
            None => return format!("{expiry}."),
        };
        let mut value = String::with_capacity(expiry.len() + 1 + 2 * MAC_LEN);
        value.push_str(&expiry);
        value.push('.');
        push_hex(&mut value, tag.as_ref());
        value
    }

    /// The full `Set-Cookie` header value:
    /// `intermission_bypass=<value>; Path=/; Max-Age=<ttl secs>; HttpOnly; SameSite=Lax`,
    /// plus `; Secure` when `secure`.
    pub fn set_cookie_header(&self, now: SystemTime, secure: bool) -> HeaderValue {
        let secure = if secure { "; Secure" } else { "" };
        let text = format!(
            "{COOKIE_NAME}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            self.issue(now),
            self.ttl_secs
        );
        // Only digits, hex and fixed ASCII go in, so this cannot fail; should it ever, clearing
        // the cookie is the harmless answer.
        HeaderValue::try_from(text).unwrap_or_else(|_| {
            HeaderValue::from_static("intermission_bypass=; Path=/; Max-Age=0; HttpOnly")
        })
    }

    /// Whether the request's `Cookie` header(s) carry a valid, unexpired bypass cookie.
    /// Malformed, forged, expired, or future-dated-beyond-ttl values are all just `false`.
    pub fn cookie_valid<H: Fields + ?Sized>(&self, headers: &H, now: SystemTime) -> bool {
        // HTTP/2 may split cookies over several header lines; every line may hold several pairs.
        // Any valid copy wins: a browser can hold a stale one beside a fresh one.
        // At most a few candidates get an HMAC check: a header stuffed with hundreds of
        // forged copies must not make a held request cost hundreds of MACs.
        headers
            .all(&COOKIE)
            .flat_map(|line| line.split(|&b| b == b';'))
            .filter_map(|pair| cookie_value(pair.trim_ascii()))
            .take(MAX_CANDIDATES)
            .any(|value| self.value_valid(value, now))
    }

    fn value_valid(&self, value: &[u8], now: SystemTime) -> bool {
        let Some(dot) = value.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (digits, mac_hex) = (&value[..dot], &value[dot + 1..]);
        let Some(expiry) = parse_expiry(digits) else {
            return false;
        };
        let now = unix_secs(now);
        // A cookie dated further ahead than one ttl was not issued under this config (or the
        // clock jumped back); refuse rather than honour an unbounded lifetime.
        if expiry <= now || expiry > now.saturating_add(self.ttl_secs) {
            return false;
        }
        let Some(mac) = decode_mac(mac_hex) else {
            return false;
        };
        let mut buf = [0u8; MAC_PREFIX.len() + MAX_EXPIRY_DIGITS];
        match signed_message(digits, &mut buf) {
            // The MAC covers the digits exactly as sent, so "0123" cannot reuse the MAC of "123".
            Some(msg) => hmac::verify(&self.cookie_key, msg, &mac).is_ok(),
            None => false,
        }
    }
}

/// The value of one `name=value` cookie pair when its name is ours (quotes allowed, RFC 6265).
fn cookie_value(pair: &[u8]) -> Option<&[u8]> {
    let value = pair
        .strip_prefix(COOKIE_NAME.as_bytes())?
        .strip_prefix(b"=")?;
    match value {
        [b'"', inner @ .., b'"'] => Some(inner),
        _ => Some(value),
    }
}

fn parse_expiry(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > MAX_EXPIRY_DIGITS {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// `MAC_PREFIX` + `digits` in a stack buffer, so checking a cookie does not allocate.
fn signed_message<'b>(
    digits: &[u8],
    buf: &'b mut [u8; MAC_PREFIX.len() + MAX_EXPIRY_DIGITS],
) -> Option<&'b [u8]> {
    let len = MAC_PREFIX.len() + digits.len();
    let out = buf.get_mut(..len)?;
    let (head, tail) = out.split_at_mut(MAC_PREFIX.len());
    head.copy_from_slice(MAC_PREFIX);
    tail.copy_from_slice(digits);
    Some(out)
}

fn unix_secs(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

fn decode_mac(hex: &[u8]) -> Option<[u8; MAC_LEN]> {
    if hex.len() != 2 * MAC_LEN {
        return None;
    }
    let mut mac = [0u8; MAC_LEN];
    for (out, pair) in mac.iter_mut().zip(hex.chunks_exact(2)) {
        *out = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
    }
    Some(mac)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The client's address for `allow_ips` (SPEC §3): the TCP peer, or — only when the peer is in
/// `trusted` — the address taken from `X-Forwarded-For` (or, if absent, `Forwarded`'s `for=`),
/// walking from the right past trusted proxies to the first untrusted address. If all are
/// trusted, the leftmost. An unparseable entry stops the walk at the last good address.
pub fn client_ip<H: Fields + ?Sized>(peer: IpAddr, headers: &H, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical_ip(peer);
    if trusted.is_empty() || !ip_allowed(peer, trusted) {
        return peer;
    }
    if headers.value(&X_FORWARDED_FOR).is_some() {
        // Later lines were appended by later hops, so the rightmost entry is on the last line.
        let entries = headers.all(&X_FORWARDED_FOR).rev().flat_map(|line| {
            let (line, bad) = match text(line) {
                Some(line) => (line, None),
                None => ("", Some(None)),
            };
            bad.into_iter().chain(
                line.rsplit(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(parse_node),
            )
        });
        return walk(peer, entries, trusted);
    }
    let entries = headers.all(&FORWARDED).rev().flat_map(|line| {
        match text(line) {
            Some(text) => forwarded_for(text),
            None => vec![None],
        }
        .into_iter()
        .rev()
    });
    walk(peer, entries, trusted)
}

/// Whether a proxy in front says its client came over HTTPS: the first (the client's hop)
/// of `X-Forwarded-Proto`'s values, or when there is none, `Forwarded`'s first `proto=`. For
/// the bypass cookie's `Secure` behind a load balancer that ends TLS; the caller checks that
/// the peer is trusted.
pub fn https_by_proxy<H: Fields + ?Sized>(headers: &H) -> bool {
    static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    if let Some(line) = headers.value(&X_FORWARDED_PROTO) {
        let first = line.split(|&b| b == b',').next().unwrap_or_default();
        return first.trim_ascii().eq_ignore_ascii_case(b"https");
    }
    let Some(line) = headers.value(&FORWARDED).and_then(text) else {
        return false;
    };
    let first = split_outside_quotes(line, ',')
        .into_iter()
        .next()
        .unwrap_or_default();
    split_outside_quotes(first, ';').into_iter().any(|pair| {
        pair.split_once('=').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("proto")
                && value.trim().trim_matches('"').eq_ignore_ascii_case("https")
        })
    })
}

/// Right-to-left over the hops, `None` marking an entry that cannot be believed.
fn walk(peer: IpAddr, entries: impl Iterator<Item = Option<IpAddr>>, trusted: &[IpNet]) -> IpAddr {
    let mut client = peer;
    for entry in entries {
        let Some(ip) = entry else {
            return client;
        };
        client = canonical_ip(ip);
        if !ip_allowed(client, trusted) {
            return client;
        }
    }
    client
}

/// The `for=` node of each element of one `Forwarded` line, left to right (RFC 7239 §4).
/// An element without `for=` counts as unparseable: that hop did not say who it spoke for.
fn forwarded_for(line: &str) -> Vec<Option<IpAddr>> {
    split_outside_quotes(line, ',')
        .into_iter()
        .map(str::trim)
        .filter(|element| !element.is_empty())
        .map(|element| {
            let value = split_outside_quotes(element, ';')
                .into_iter()
                .find_map(|pair| {
                    let (name, value) = pair.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| value.trim())
                })?;
            let value = match value.strip_prefix('"') {
                // IPs hold no escapes; a backslash or stray quote is garbage, not something to undo.
                Some(rest) => rest
                    .strip_suffix('"')
                    .filter(|v| !v.contains(['"', '\\']))?,
                None => value,
            };
            parse_node(value)
        })
        .collect()
}

/// Splits on `sep` except inside quoted strings (which may hold `,` or `;` and `\"` escapes).
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts
}

/// An address with an optional port: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:80`; RFC 7239 obfuscated ports (`:_abc`) are accepted, obfuscated or `unknown`
/// nodes are not addresses.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let ip = addr.parse::<Ipv6Addr>().ok()?;
        return match after {
            "" => Some(IpAddr::V6(ip)),
            _ => after
                .strip_prefix(':')
                .filter(|p| valid_port(p))
                .map(|_| IpAddr::V6(ip)),
        };
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    let (addr, port) = node.split_once(':')?;
    let ip = addr.parse::<Ipv4Addr>().ok()?;
    valid_port(port).then_some(IpAddr::V4(ip))
}

fn valid_port(port: &str) -> bool {
    match port.strip_prefix('_') {
        Some(obf) => {
            !obf.is_empty()
                && obf
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => port.parse::<u16>().is_ok() && port.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// Whether `ip` is inside any of `nets` (after `canonical_ip`).
pub fn ip_allowed(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = canonical_ip(ip);
    nets.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    const SECRET: &str = "s3cret-bypass-token-0123";
    const TTL: Duration = Duration::from_secs(3600);

    fn key() -> BypassKey {
        BypassKey::new(SECRET, TTL).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn cookie_headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(COOKIE, HeaderValue::from_str(line).unwrap());
        }
        h
    }

    fn valid_with(value: &str, now: SystemTime) -> bool {
        key().cookie_valid(&cookie_headers(&[&format!("{COOKIE_NAME}={value}")]), now)
    }

    #[test]
    fn empty_secret_disables_bypass() {
        assert!(BypassKey::new("", TTL).is_none());
    }

    #[test]
    fn debug_hides_secret() {
        let text = format!("{:?}", key());
        assert!(!text.contains(SECRET));
        assert!(text.contains("ttl_secs"));
    }

    #[test]
    fn secret_matches_table() {
        let k = key();
        let table = [
            (SECRET, true),
            ("wrong-wrong-wrong-wrong", false),
            ("", false),
            (&SECRET[..SECRET.len() - 1], false),
            ("s3cret", false),
            ("S3CRET-BYPASS-TOKEN-0123", false),
        ];
        for (candidate, want) in table {
            assert_eq!(k.secret_matches(candidate), want, "{candidate:?}");
        }
    }

    /// A cookie's MAC is keyed by the secret's PBKDF2 derivation, not by the secret: the
    /// value the application sees cannot be checked against guesses at one HMAC each.
    /// Pinned, since changing the derivation revokes every cookie in browsers.
    #[test]
    fn the_cookie_key_is_derived_from_the_secret() {
        let value = key().issue(at(1_000));
        let (expiry, mac) = value.split_once('.').unwrap();
        let message = format!("intermission-bypass:{expiry}");
        let hex = |tag: hmac::Tag| {
            let mut s = String::new();
            push_hex(&mut s, tag.as_ref());
            s
        };
        let raw = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
        assert_ne!(mac, hex(hmac::sign(&raw, message.as_bytes())));
        let mut derived = [0u8; MAC_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(100_000).unwrap(),
            b"intermission-bypass-cookie-key",
            SECRET.as_bytes(),
            &mut derived,
        );
        let derived = hmac::Key::new(hmac::HMAC_SHA256, &derived);
        assert_eq!(mac, hex(hmac::sign(&derived, message.as_bytes())));
    }

    #[test]
    fn issued_cookie_shape() {
        let value = key().issue(at(1_000));
        let (expiry, mac) = value.split_once('.').unwrap();
        assert_eq!(expiry, "4600");
        assert_eq!(mac.len(), 64);
        assert!(mac
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn issued_cookie_validity_over_time() {
        let value = key().issue(at(1_000));
        let table = [
            (1_000, true),
            (1_001, true),
            (4_599, true),
            (4_600, false), // expired exactly at now + ttl, as Max-Age would
            (100_000, false),
            // The clock stepped back more than one ttl: the cookie looks future-dated.
            (500, false),
        ];
        for (now, want) in table {
            assert_eq!(valid_with(&value, at(now)), want, "now={now}");
        }
    }

    #[test]
    fn tampered_and_garbage_cookies_rejected() {
        let now = at(1_000);
        let good = key().issue(now);
        let (expiry, mac) = good.split_once('.').unwrap();
        let mut flipped = mac.to_owned().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        let other = BypassKey::new("another-secret-entirely", TTL)
            .unwrap()
            .issue(now);
        let table = [
            format!("{}.{mac}", expiry.parse::<u64>().unwrap() - 1),
            format!("0{expiry}.{mac}"),
            format!("+{expiry}.{mac}"),
            format!("{expiry}.{flipped}"),
            format!("{expiry}.{}", &mac[..63]),
            format!("{expiry}.{mac}0"),
            format!("{expiry}.{mac}.x"),
            other,
            String::new(),
            ".".into(),
            "abc".into(),
            format!(".{mac}"),
            format!("{expiry}."),
            "999999999999999999999999.zz".into(),
            format!("18446744073709551616.{mac}"),
        ];
        for value in table {
            assert!(!valid_with(&value, now), "{value:?}");
        }
        // Uppercase hex decodes to the same MAC.
        assert!(valid_with(&format!("{expiry}.{}", mac.to_uppercase()), now));
    }

    #[test]
    fn cookie_found_among_others_and_across_lines() {
        let now = at(1_000);
        let value = key().issue(now);
        let ours = format!("{COOKIE_NAME}={value}");
        let table: Vec<(Vec<String>, bool)> = vec![
            (vec![], false),
            (vec!["a=1; b=2".into()], false),
            (vec![format!("a=1; {ours}; b=2")], true),
            (vec![format!("a=1;{ours}")], true),
            (vec![format!("{COOKIE_NAME}=\"{value}\"")], true),
            (vec!["a=1".into(), ours.clone(), "b=2".into()], true),
            // A stale copy beside a fresh one still lets the browser through.
            (vec![format!("{COOKIE_NAME}=1.00; {ours}")], true),
            (vec![format!("x{COOKIE_NAME}={value}")], false),
            (vec![format!("{COOKIE_NAME}x={value}")], false),
            (vec![format!("INTERMISSION_BYPASS={value}")], false),
            (vec![format!("other={value}")], false),
        ];
        let k = key();
        for (lines, want) in table {
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            assert_eq!(
                k.cookie_valid(&cookie_headers(&refs), now),
                want,
                "{lines:?}"
            );
        }
    }

    #[test]
    fn non_utf8_cookie_header_is_just_false() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"a=\xff; intermission_bypass=\xfe").unwrap(),
        );
        assert!(!key().cookie_valid(&h, at(1_000)));
    }

    #[test]
    fn set_cookie_header_attributes() {
        let k = key();
        let plain = k.set_cookie_header(at(1_000), false);
        let plain = plain.to_str().unwrap();
        assert!(
            plain.starts_with(&format!("{COOKIE_NAME}=4600.")),
            "{plain}"
        );
        for attr in ["; Path=/", "; Max-Age=3600", "; HttpOnly", "; SameSite=Lax"] {
            assert!(plain.contains(attr), "{plain} lacks {attr}");
        }
        assert!(!plain.contains("Secure"), "{plain}");

        let tls = k.set_cookie_header(at(1_000), true);
        assert!(tls.to_str().unwrap().ends_with("; Secure"));

        // The value set is one the key accepts back.
        let value = plain.split(';').next().unwrap();
        assert!(k.cookie_valid(&cookie_headers(&[value]), at(1_000)));
    }

    #[test]
    fn sub_second_ttl_still_issues_a_live_cookie() {
        let k = BypassKey::new(SECRET, Duration::from_millis(250)).unwrap();
        let header = k.set_cookie_header(at(10), false);
        assert!(header.to_str().unwrap().contains("Max-Age=1;"));
        let value = k.issue(at(10));
        assert!(k.cookie_valid(
            &cookie_headers(&[&format!("{COOKIE_NAME}={value}")]),
            at(10)
        ));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    const XFF: &str = "x-forwarded-for";
    const FWD: &str = "forwarded";

    /// (why, peer, header lines, expected client)
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );

    // One case a line reads as a table; rustfmt would spread each over six.
    #[rustfmt::skip]
    const CLIENT_IP_CASES: &[Case] = &[
        ("untrusted peer ignores XFF", "203.0.113.9", &[(XFF, "1.1.1.1")], "203.0.113.9"),
        ("untrusted peer ignores Forwarded", "203.0.113.9", &[(FWD, "for=1.1.1.1")], "203.0.113.9"),
        ("IPv4-mapped untrusted peer", "::ffff:203.0.113.9", &[(XFF, "1.1.1.1")], "203.0.113.9"),
        ("IPv4-mapped trusted peer", "::ffff:10.0.0.1", &[(XFF, "1.1.1.1")], "1.1.1.1"),
        ("trusted peer, no headers", "10.0.0.1", &[], "10.0.0.1"),
        ("rightmost untrusted", "10.0.0.1", &[(XFF, "6.6.6.6, 1.1.1.1")], "1.1.1.1"),
        ("trusted chain skipped", "10.0.0.1", &[(XFF, "6.6.6.6, 1.1.1.1, 10.0.0.7, fd00::8")], "1.1.1.1"),
        ("all trusted: leftmost", "10.0.0.1", &[(XFF, "10.0.0.5, 10.0.0.6")], "10.0.0.5"),
        ("XFF lines", "10.0.0.1", &[(XFF, "6.6.6.6, 1.1.1.1"), (XFF, "10.0.0.7")], "1.1.1.1"),
        ("XFF lines, last wins", "10.0.0.1", &[(XFF, "6.6.6.6"), (XFF, "2.2.2.2, 10.0.0.7")], "2.2.2.2"),
        ("XFF ports", "10.0.0.1", &[(XFF, "1.2.3.4:5678, [fd00::9]:80")], "1.2.3.4"),
        ("XFF bare IPv6", "10.0.0.1", &[(XFF, "2001:db8::1")], "2001:db8::1"),
        ("XFF bracketed IPv6", "10.0.0.1", &[(XFF, "[2001:db8::1]")], "2001:db8::1"),
        ("XFF mapped entries", "10.0.0.1", &[(XFF, "::ffff:10.0.0.9, ::ffff:10.0.0.7")], "10.0.0.9"),
        ("XFF empty elements", "10.0.0.1", &[(XFF, "1.1.1.1, ,10.0.0.7,")], "1.1.1.1"),
        ("garbage rightmost", "10.0.0.1", &[(XFF, "1.1.1.1, nonsense")], "10.0.0.1"),
        ("garbage stops walk", "10.0.0.1", &[(XFF, "1.1.1.1, garbage, 10.0.0.7")], "10.0.0.7"),
        ("garbage port", "10.0.0.1", &[(XFF, "1.1.1.1:99999")], "10.0.0.1"),
        ("garbage bracket", "10.0.0.1", &[(XFF, "[1.1.1.1]")], "10.0.0.1"),
        ("XFF over Forwarded", "10.0.0.1", &[(FWD, "for=2.2.2.2"), (XFF, "1.1.1.1")], "1.1.1.1"),
        ("Forwarded", "10.0.0.1", &[(FWD, "for=192.0.2.60;proto=http;by=10.0.0.1")], "192.0.2.60"),
        ("Forwarded quoted IPv6", "10.0.0.1", &[(FWD, "for=\"[2001:db8::1]:4711\"")], "2001:db8::1"),
        ("Forwarded name case", "10.0.0.1", &[(FWD, "For=\"192.0.2.43:47011\"")], "192.0.2.43"),
        ("Forwarded list", "10.0.0.1", &[(FWD, "for=192.0.2.43, for=\"[fd00::1]\"")], "192.0.2.43"),
        ("Forwarded lines", "10.0.0.1", &[(FWD, "for=6.6.6.6"), (FWD, "for=10.1.1.1, for=10.2.2.2")], "6.6.6.6"),
        ("Forwarded quoted comma", "10.0.0.1", &[(FWD, "for=1.1.1.1;x=\"a,b\", for=10.9.9.9")], "1.1.1.1"),
        ("Forwarded unknown", "10.0.0.1", &[(FWD, "for=1.1.1.1, for=unknown")], "10.0.0.1"),
        ("Forwarded obfuscated", "10.0.0.1", &[(FWD, "for=1.1.1.1, for=_hidden, for=10.3.3.3")], "10.3.3.3"),
        ("Forwarded obfuscated port", "10.0.0.1", &[(FWD, "for=\"[2001:db8::2]:_p1\"")], "2001:db8::2"),
        ("Forwarded without for", "10.0.0.1", &[(FWD, "for=1.1.1.1, proto=https")], "10.0.0.1"),
        ("Forwarded open quote", "10.0.0.1", &[(FWD, "for=\"1.1.1.1")], "10.0.0.1"),
    ];

    #[test]
    fn client_ip_table() {
        let trusted = nets(&["10.0.0.0/8", "fd00::/8"]);
        for (why, peer, lines, want) in CLIENT_IP_CASES {
            let got = client_ip(ip(peer), &headers(lines), &trusted);
            assert_eq!(got, ip(want), "{why}");
        }
    }

    #[test]
    fn https_by_proxy_table() {
        let table: &[(&[(&'static str, &str)], bool)] = &[
            (&[], false),
            (&[("x-forwarded-proto", "https")], true),
            (&[("x-forwarded-proto", "HTTPS ")], true),
            (&[("x-forwarded-proto", "http")], false),
            (&[("x-forwarded-proto", "https, http")], true),
            (&[("x-forwarded-proto", "http, https")], false),
            (
                &[("x-forwarded-proto", "http"), ("forwarded", "proto=https")],
                false,
            ),
            (&[("forwarded", "for=1.2.3.4;proto=https")], true),
            (
                &[(
                    "forwarded",
                    "for=1.2.3.4;Proto=\"https\", for=5.6.7.8;proto=http",
                )],
                true,
            ),
            (
                &[(
                    "forwarded",
                    "for=1.2.3.4;proto=http, for=5.6.7.8;proto=https",
                )],
                false,
            ),
            (
                &[("forwarded", "for=\"a;proto=https\""), ("x-other", "1")],
                false,
            ),
        ];
        for (lines, want) in table {
            assert_eq!(https_by_proxy(&headers(lines)), *want, "{lines:?}");
        }
    }

    #[test]
    fn client_ip_without_trusted_proxies_is_peer() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(client_ip(ip("::ffff:10.0.0.1"), &h, &[]), ip("10.0.0.1"));
    }

    #[test]
    fn non_utf8_forwarding_header_stops_walk() {
        let trusted = nets(&["10.0.0.0/8"]);
        for name in ["x-forwarded-for", "forwarded"] {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_bytes(b"1.1.1.1\xff").unwrap());
            assert_eq!(
                client_ip(ip("10.0.0.1"), &h, &trusted),
                ip("10.0.0.1"),
                "{name}"
            );
        }
    }

    #[test]
    fn ip_allowed_table() {
        let allow = nets(&["192.0.2.0/24", "2001:db8::/32"]);
        let table = [
            ("192.0.2.7", true),
            ("::ffff:192.0.2.7", true),
            ("192.0.3.7", false),
            ("2001:db8::5", true),
            ("2001:db9::5", false),
        ];
        for (addr, want) in table {
            assert_eq!(ip_allowed(ip(addr), &allow), want, "{addr}");
        }
        assert!(!ip_allowed(ip("192.0.2.7"), &[]));
    }
}
