//! Header rewriting for forwarding: hop-by-hop removal (RFC 9110 §7.6.1) and `X-Forwarded-*`.
//!
//! Pure functions over `HeaderMap`, so each rule has a table test and the bench can drive them
//! without sockets. Nothing here allocates unless a header it must build is missing.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Whether a comma-separated header (any of its lines) contains `token`, ignoring case.
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade`) to
/// pass on. Not one to HTTP/2 (`h2c`): tunnelled, the client would speak HTTP/2 to the server
/// itself, every later request on it unseen here (held in no mode, no `X-Forwarded-For`: "h2c
/// smuggling"); the request goes on as a plain one, its `Upgrade` dropped as nginx drops it.
pub fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let h2c = offers_h2c(upgrade.as_bytes());
    (!h2c && has_token(headers, &header::CONNECTION, "upgrade")).then(|| upgrade.clone())
}

/// Whether an `Upgrade` value offers HTTP/2 (`h2c`, with a version or among others): such a
/// request is a plain one here, never a tunnel (`upgrade_request`).
pub fn offers_h2c(upgrade: &[u8]) -> bool {
    upgrade.split(|&b| b == b',').any(|protocol| {
        let name = protocol.trim_ascii().split(|&b| b == b'/').next();
        name.is_some_and(|n| n.eq_ignore_ascii_case(b"h2c"))
    })
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1: `Connection` and every header it names,
/// `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding` and `Upgrade`. `TE: trailers`
/// survives as exactly that, because it says the original client accepts trailers (gRPC needs
/// it to reach the server) and this proxy carries trailers through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these but `Connection`,
    // and a removal costs a hash and a probe each (measured: most of this function's cost).
    let (mut connection, mut fixed) = (false, false);
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if is_fixed_hop_by_hop(name) {
            fixed = true;
        }
    }
    if connection {
        strip_connection(headers);
    }
    if fixed {
        strip_fixed(headers);
    }
}

/// The hop-by-hop headers that are so whatever `Connection` says.
fn is_fixed_hop_by_hop(name: &HeaderName) -> bool {
    name == PROXY_CONNECTION
        || name == KEEP_ALIVE
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
}

/// Whether a raw header name is `Connection` or one of `is_fixed_hop_by_hop`'s, ignoring
/// case: for code that reads header lines without a `HeaderMap` (`crate::relay`). A test keeps
/// the two lists the same.
/// By length first: the relay asks it of every field of every answer.
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    use crate::h1::eq_lower as is;
    match name.len() {
        2 => is(name, b"te"),
        7 => is(name, b"upgrade"),
        10 => is(name, b"connection") || is(name, b"keep-alive"),
        16 => is(name, b"proxy-connection"),
        17 => is(name, b"transfer-encoding"),
        _ => false,
    }
}

/// What the forwarding rules make of a request field, by its name in any case: for code that
/// reads header lines without a `HeaderMap`, the relay's HTTP/1.1 requests (`crate::relay`)
/// and HTTP/2 clients' requests written for an HTTP/1.1 server (`write_rewritten`). By length
/// first: it is asked of every field of every request those take. A test keeps it the same as
/// the `HeaderName` rules (`FROM_TRUSTED_ONLY`, the hop-by-hop names, `is_underscore_alias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Host,
    Cookie,
    ContentLength,
    Expect,
    Connection,
    Te,
    TransferEncoding,
    Upgrade,
    /// `Keep-Alive` or `Proxy-Connection`: hop-by-hop, and naming no other field.
    KeepAlive,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    RealIp,
    /// One of `FROM_TRUSTED_ONLY`.
    TrustedOnly,
    /// `is_underscore_alias`.
    Alias,
    Other,
}

/// The `Kind` of the field named `name`, in any case.
#[inline]
pub fn kind(name: &[u8]) -> Kind {
    use crate::h1::eq_lower as is;
    match name.len() {
        2 if is(name, b"te") => Kind::Te,
        4 if is(name, b"host") => Kind::Host,
        6 if is(name, b"expect") => Kind::Expect,
        6 if is(name, b"cookie") => Kind::Cookie,
        7 if is(name, b"upgrade") => Kind::Upgrade,
        9 if is(name, b"forwarded") || is(name, b"client-ip") => Kind::TrustedOnly,
        11 if is(name, b"x-client-ip") || is(name, b"x-forwarded") => Kind::TrustedOnly,
        14 if is(name, b"true-client-ip") || is(name, b"x-original-url") => Kind::TrustedOnly,
        13 if is(name, b"x-rewrite-url") || is(name, b"forwarded-for") => Kind::TrustedOnly,
        15 if is(name, b"x-forwarded-ssl") => Kind::TrustedOnly,
        16 if is(name, b"x-forwarded-port")
            || is(name, b"cf-connecting-ip")
            || is(name, b"fastly-client-ip") =>
        {
            Kind::TrustedOnly
        }
        18 if is(name, b"x-forwarded-prefix") || is(name, b"x-forwarded-scheme") => {
            Kind::TrustedOnly
        }
        19 if is(name, b"x-cluster-client-ip") => Kind::TrustedOnly,
        10 if is(name, b"connection") => Kind::Connection,
        10 if is(name, b"keep-alive") => Kind::KeepAlive,
        14 if is(name, b"content-length") => Kind::ContentLength,
        17 if is(name, b"transfer-encoding") => Kind::TransferEncoding,
        15 if is(name, b"x-forwarded-for") => Kind::ForwardedFor,
        16 if is(name, b"x-forwarded-host") => Kind::ForwardedHost,
        9 | 11 | 13..=19 if is_underscore_alias(name) => Kind::Alias,
        16 if is(name, b"proxy-connection") => Kind::KeepAlive,
        9 if is(name, b"x-real-ip") => Kind::RealIp,
        17 if is(name, b"x-forwarded-proto") => Kind::ForwardedProto,
        _ => Kind::Other,
    }
}

/// Removes `Connection` and every header it names.
fn strip_connection(headers: &mut HeaderMap) {
    // The lines are cloned out (a reference count, no copy) so that their tokens can be read
    // while the map changes; one line is the common case and needs no allocation.
    let mut lines = headers.get_all(header::CONNECTION).iter();
    if let Some(first) = lines.next() {
        if lines.next().is_none() {
            let line = first.clone();
            headers.remove(header::CONNECTION);
            remove_named(headers, &line);
        } else {
            let all: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            headers.remove(header::CONNECTION);
            for line in &all {
                remove_named(headers, line);
            }
        }
    }
}

/// Removes the fixed hop-by-hop headers, keeping `TE: trailers` as exactly that.
fn strip_fixed(headers: &mut HeaderMap) {
    let te_trailers =
        headers.contains_key(header::TE) && has_token(headers, &header::TE, "trailers");
    for name in [
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes every header a `Connection` line names, but `Host`: that names the request's
/// target, not this hop, and a client that named it would have the server see another host
/// (the server's own address, which `forward` puts in when there is none) and no
/// `X-Forwarded-Host`.
fn remove_named(headers: &mut HeaderMap, line: &HeaderValue) {
    let Ok(text) = line.to_str() else { return };
    for token in text.split(',').map(str::trim) {
        // The common tokens name no header worth a lookup.
        if token.eq_ignore_ascii_case("keep-alive")
            || token.eq_ignore_ascii_case("close")
            || token.eq_ignore_ascii_case("host")
        {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            headers.remove(name);
        }
    }
}

/// Whether an `Upgrade` value names the WebSocket protocol (RFC 6455 §4.1: `websocket`,
/// case-insensitive), among others or alone.
pub fn names_websocket(upgrade: &HeaderValue) -> bool {
    upgrade
        .as_bytes()
        .split(|&b| b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// Whether a `101`'s `Upgrade` (`switched`) names protocols, each one the request's
/// `Upgrade` (`asked`) offered (RFC 9110 §7.8: a server must not switch to another), by name
/// ignoring case; a version after `/` is the server's to choose.
pub fn switch_offered(asked: &HeaderValue, switched: Option<&HeaderValue>) -> bool {
    fn names(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .map(|protocol| {
                let name = protocol.split(|&b| b == b'/').next().unwrap_or_default();
                name.trim_ascii()
            })
            .filter(|name| !name.is_empty())
    }
    let Some(switched) = switched else {
        return false;
    };
    let mut any = false;
    for name in names(switched) {
        any = true;
        if !names(asked).any(|offered| offered.eq_ignore_ascii_case(name)) {
            return false;
        }
    }
    any
}

/// Puts back the two headers an upgrade needs on the next hop after stripping.
pub fn restore_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// The length in a `Content-Length` line's `value`, which must agree with the length `known`
/// from the lines before it, as hyper's client reads them: a list of values (`11, 11`) is
/// taken when they are all the same. `repeated` is set when a value agrees with one before
/// it (a list, or a line after another), so that the length goes on as one line
/// (`one_length`, and `relay::read_head` on the relay's lines).
#[inline]
pub fn content_length(
    value: &[u8],
    mut known: Option<u64>,
    repeated: &mut bool,
) -> Result<Option<u64>, &'static str> {
    for value in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        let n = length_value(value).ok_or("an invalid Content-Length")?;
        if let Some(l) = known {
            if l != n {
                return Err("differing Content-Length values");
            }
            *repeated = true;
        }
        known = Some(n);
    }
    Ok(known)
}

/// One value of a `Content-Length` list, trimmed: plain digits, fewer than 20 of them.
fn length_value(value: &[u8]) -> Option<u64> {
    // Nearly every length: read here rather than through `str::parse`, about half of an
    // answer's `read_head` cost for its length (README, "Performance"); 19 digits always fit.
    if (1..20).contains(&value.len()) && value.iter().all(u8::is_ascii_digit) {
        return Some(value.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')));
    }
    parsed_length(value)
}

/// `length_value`, through `str::parse`: what it reads at once is read alike (a test).
fn parsed_length(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value)
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        // HTTP/2 clients read at most 19 digits (the h2 crate resets a stream with more),
        // and no body is that long.
        .filter(|&n| n < 10_000_000_000_000_000_000)
}

/// Writes an answer's `Content-Length` given as a list of one value (`11, 11`) or on several
/// lines as one line of its digits (RFC 9110 §8.6 lets a recipient do so). hyper's client
/// takes such a length when its values agree, and hyper's server writes its first line as
/// given, which some clients refuse (Go's) or read as no length at all (Python's, which then
/// reads until the close). Values that do not agree or are no number, which hyper's client
/// takes only where it reads no length (a `HEAD`'s answer, a 204 or 304), go, as the relay drops
/// them: they tell the client nothing, hyper's HTTP/2 server would send them, and HTTP/2
/// clients refuse an answer whose length is no number (the h2 crate resets its stream). One
/// line of digits needs nothing. An HTTP/2 client's request passes here too
/// (`forward::rewrite`): h2 refuses one whose lengths differ, not one that repeats its length.
pub fn one_length(headers: &mut HeaderMap) {
    let mut lines = headers.get_all(header::CONTENT_LENGTH).iter();
    match (lines.next(), lines.next()) {
        (None, _) => return,
        // Up to 19 digits always fit a u64; a longer length is parsed below.
        (Some(one), None)
            if (1..20).contains(&one.len()) && one.as_bytes().iter().all(u8::is_ascii_digit) =>
        {
            return
        }
        _ => {}
    }
    let (mut known, mut repeated) = (None, false);
    for line in headers.get_all(header::CONTENT_LENGTH) {
        match content_length(line.as_bytes(), known, &mut repeated) {
            Ok(length) => known = length,
            Err(_) => {
                headers.remove(header::CONTENT_LENGTH);
                return;
            }
        }
    }
    if let Some(n) = known {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// What the proxy knows of the client side of one connection, prepared once per connection.
#[derive(Debug, Clone)]
pub struct ClientSide {
    /// The peer address as an `X-Forwarded-For` element.
    pub peer: HeaderValue,
    /// Whether the client came over TLS: `X-Forwarded-Proto` is `https`, else `http`. A flag,
    /// not the header value: every connection keeps this, parked ones included.
    pub https: bool,
}

impl ClientSide {
    fn proto(&self) -> HeaderValue {
        HeaderValue::from_static(if self.https { "https" } else { "http" })
    }
}

/// Joins an HTTP/2 client's cookie crumbs into one `Cookie` (RFC 9113 §8.2.3 requires it before
/// an HTTP/1.1 hop): HTTP/2 lets a client send each cookie as a field of its own, and an
/// HTTP/1.1 server reads one `Cookie` line (RFC 6265 §5.4), so it would see only some.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in headers.get_all(header::COOKIE) {
        cookie_crumb(&mut joined, 0, crumb.as_bytes());
    }
    if let Ok(cookie) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, cookie);
    }
}

/// Asks an HTTP/1.1 server to close its connection after a request whose body the method
/// gives no meaning (`forward::body_has_meaning`): a server that ignores such a body without
/// reading it (a static file handler, a redirect) takes it for the next request on the
/// connection, and its answer to that would reach whichever client's request came next on
/// the pooled connection (a "CL.0" desync, RFC 9110 §9.3.1; RFC 9112 §11.2). Not reused, the
/// connection takes the stray answer with it. HTTP/2 frames each stream's body, and hyper
/// drops the field for an HTTP/2 server.
pub fn close_after_unmeant_body(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Whether `name` is one of the names `set_forwarded` manages written with `_` for `-`
/// (`X_Forwarded_For`): CGI, WSGI, Rack and PHP read `-` and `_` alike (both are
/// `HTTP_X_FORWARDED_FOR`), so a client's `X_Forwarded_For` or `X_Real_IP` could stand in for
/// the proxy's own, which the application trusts. Dropped, as nginx drops every name with
/// `_` by default (`underscores_in_headers off`); other such names pass on.
pub fn is_underscore_alias(name: &[u8]) -> bool {
    let written = [
        &X_FORWARDED_FOR,
        &X_FORWARDED_HOST,
        &X_FORWARDED_PROTO,
        &X_REAL_IP,
    ];
    name.contains(&b'_')
        && FROM_TRUSTED_ONLY.iter().chain(written).any(|managed| {
            let managed = managed.as_str().as_bytes();
            managed.len() == name.len()
                && managed
                    .iter()
                    .zip(name)
                    .all(|(&m, &n)| m == n.to_ascii_lowercase() || (m == b'-' && n == b'_'))
        })
}

/// Headers passed on from a peer in `trusted_proxies` only (`set_forwarded`; the relay's
/// `request` drops the same).
///
/// `X-Original-URL` and `X-Rewrite-URL` are the path a rewriting proxy in front (IIS) saw,
/// which some frameworks route by in place of the request's own (Symfony before 3.4.14 and
/// 4.1.3, zend-http, zend-diactoros: CVE-2018-14773): from a client, `GET /status` (under
/// `allow_paths`) with `X-Original-URL: /admin` reached `/admin` during maintenance.
///
/// `Client-IP` to `Forwarded-For` are the client address as CDNs and load balancers write it,
/// which the most used helpers read before `X-Forwarded-For` or instead of it (Node's
/// `request-ip`: `X-Client-IP` first; django-ipware; PHP's ubiquitous `HTTP_CLIENT_IP`;
/// Rails' `Client-IP`): from a client, its own word for its address in rate limits and audit
/// logs.
pub const FROM_TRUSTED_ONLY: [HeaderName; 15] = [
    header::FORWARDED,
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-forwarded"),
    HeaderName::from_static("forwarded-for"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// Appends the peer to `X-Forwarded-For` (SPEC §3), whoever sent the list, as nginx's
/// `$proxy_add_x_forwarded_for` and HAProxy's `option forwardfor` do: the last entry is always
/// the address this proxy saw, and what came before is the client's word, which the
/// application believes only from proxies it trusts (as this proxy's own `allow_ips` does,
/// `hold::bypass`). Sets `X-Forwarded-Proto` / `X-Forwarded-Host` / `X-Real-IP` (kept from a
/// trusted peer that set them, else this hop's). `trusted`: the peer is in `trusted_proxies`.
///
/// `X-Real-IP` is the peer's address, as the `proxy_set_header X-Real-IP $remote_addr` of
/// nearly every nginx setup writes it: middleware that reads it before `X-Forwarded-For`
/// (Go's chi `RealIP`, Gin) would otherwise take a client's own word for its address, in
/// rate limits and audit logs. `True-Client-IP`, which chi reads first of all, is one of
/// `FROM_TRUSTED_ONLY`.
///
/// `Forwarded` (RFC 7239) says the same as those three in one field, and frameworks that read
/// it prefer it to them (Spring's `ForwardedHeaderFilter`, Quarkus, Vert.x); the others of
/// `FROM_TRUSTED_ONLY` name the port, path prefix and scheme links are built with (Spring,
/// Rack). They are kept from a trusted peer only: from anyone else they would let a client
/// name the links the application writes, which replacing `X-Forwarded-Host` is there to stop.
pub fn set_forwarded(headers: &mut HeaderMap, client: &ClientSide, trusted: bool) {
    // One pass over the names first: a client seldom sends an alias or a name kept from
    // trusted peers only, and each removal costs a hash and a probe, some 180 instructions
    // apiece for these names (callgrind, HTTP/2 over TLS: six per request went to
    // `FROM_TRUSTED_ONLY` alone).
    let (mut aliases, mut untrusted) = (false, false);
    for name in headers.keys() {
        aliases |= is_underscore_alias(name.as_str().as_bytes());
        untrusted |= !trusted && FROM_TRUSTED_ONLY.contains(name);
    }
    if aliases {
        let aliases: Vec<HeaderName> = headers
            .keys()
            .filter(|name| is_underscore_alias(name.as_str().as_bytes()))
            .cloned()
            .collect();
        for alias in aliases {
            headers.remove(alias);
        }
    }
    if untrusted {
        for name in &FROM_TRUSTED_ONLY {
            headers.remove(name);
        }
    }
    // Room for the four written below at once: an HTTP/2 request's map is made to the size
    // of what the client sent, and grew up to three times on the way (rehashing each time).
    let _ = headers.try_reserve(4);
    let xff = if headers.contains_key(&X_FORWARDED_FOR) {
        append_to_list(headers, &X_FORWARDED_FOR, &client.peer)
    } else {
        client.peer.clone()
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), client.proto());
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match headers.get(header::HOST).cloned() {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST.clone(), host);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
    if !(trusted && headers.contains_key(&X_REAL_IP)) {
        headers.insert(X_REAL_IP.clone(), client.peer.clone());
    }
}

fn append_to_list(headers: &HeaderMap, name: &HeaderName, last: &HeaderValue) -> HeaderValue {
    let mut out = Vec::with_capacity(64);
    for v in headers.get_all(name) {
        list_item(&mut out, v.as_bytes());
    }
    out.extend_from_slice(last.as_bytes());
    // Built from valid header values joined by ", ", so it is valid; fall back to the peer alone.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| last.clone())
}

/// Adds one line's entries to a list being joined (`X-Forwarded-For`), as `append_to_list`.
fn list_item(out: &mut Vec<u8>, value: &[u8]) {
    let value = value.trim_ascii();
    if !value.is_empty() {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
}

/// Adds a cookie crumb to the `Cookie` being joined (`join_cookies`), whose value so far is
/// `out[from..]`.
fn cookie_crumb(out: &mut Vec<u8>, from: usize, crumb: &[u8]) {
    if out.len() > from {
        out.extend_from_slice(b"; ");
    }
    out.extend_from_slice(crumb);
}

/// Whether `HeaderValue::from_bytes` takes `bytes` (which it would copy to say so).
fn valid_value(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// Writes the fields of an HTTP/2 client's request (`fields`, as hyper's server read them) as
/// `forward::rewrite` and then `forward::aim_host` leave them for an HTTP/1.1 server, and as
/// hyper's HTTP/1.1 client writes such a map: one `name: value` line for each value, names
/// lowercase, in the map's order, fields that rules replace where they stood and those they
/// add after the rest, in the order they are added. The same rules, written as they go: the
/// map's hashing, its growth, and the values made and dropped were some 3,900 of the 48,000
/// instructions of h2load's request over TLS (callgrind, README's Performance). `authority`: the client's
/// `:authority`; `server`: the server's own, the `Host` of a request that names none.
///
/// False, and nothing written, for a request from which a rule takes a field out (`TE`,
/// `Expect`, hop-by-hop names, `_` aliases, names kept from trusted peers only from anyone
/// else, an `X-Forwarded-Host` with no host to put in it): the map moves its last field into
/// the place of one taken out (`HeaderMap::remove`), an order left to the map itself
/// (`forward::Hop::apply`); few clients send any of those.
pub fn write_rewritten(
    out: &mut Vec<u8>,
    fields: &HeaderMap,
    authority: Option<&str>,
    client: &ClientSide,
    trusted: bool,
    server: &str,
) -> bool {
    let start = out.len();
    if write_fields(out, fields, authority, client, trusted, server).is_none() {
        out.truncate(start);
        return false;
    }
    true
}

/// `write_rewritten`'s work; `None` for a request it leaves to the map.
fn write_fields(
    out: &mut Vec<u8>,
    fields: &HeaderMap,
    authority: Option<&str>,
    client: &ClientSide,
    trusted: bool,
    server: &str,
) -> Option<()> {
    use crate::h1::push_header as line;
    // `Host` is the client's `:authority` when there is one that makes a value.
    let authority = authority.map(str::as_bytes).filter(|a| valid_value(a));
    let peer = client.peer.as_bytes();
    let proto: &[u8] = if client.https { b"https" } else { b"http" };
    let (mut host, mut list, mut proto_seen, mut host_seen, mut address_seen) =
        (None::<&[u8]>, false, false, false, false);
    let mut cookie = None::<usize>;
    let mut previous: Option<&HeaderName> = None;
    let mut current = Kind::Other;
    // Each value of a field comes after the one before it (the map keeps a field's values
    // together), the field's name the same reference.
    for (name, value) in fields {
        let first = !previous.is_some_and(|p| std::ptr::eq(p, name));
        if first {
            previous = Some(name);
            current = kind(name.as_str().as_bytes());
        }
        let name = name.as_str().as_bytes();
        let value = value.as_bytes();
        match current {
            Kind::Host => {
                if first {
                    host = Some(authority.unwrap_or(value));
                }
                match authority {
                    Some(authority) if first => line(out, name, authority),
                    Some(_) => {}
                    None => line(out, name, value),
                }
            }
            Kind::Cookie if first => {
                line(out, name, value);
                cookie = Some(out.len() - 2 - value.len());
            }
            // The crumbs after the first are joined into its line (`join_cookies`).
            Kind::Cookie => {
                out.truncate(out.len() - 2);
                cookie_crumb(out, cookie?, value);
                out.extend_from_slice(b"\r\n");
            }
            // The list, whoever sent it, then the peer (`set_forwarded`).
            Kind::ForwardedFor => {
                if first {
                    list = true;
                    out.extend_from_slice(name);
                    out.extend_from_slice(b": ");
                } else {
                    out.truncate(out.len() - peer.len() - 2);
                }
                list_item(out, value);
                out.extend_from_slice(peer);
                out.extend_from_slice(b"\r\n");
            }
            Kind::ForwardedProto | Kind::ForwardedHost | Kind::RealIp | Kind::TrustedOnly
                if trusted =>
            {
                proto_seen |= current == Kind::ForwardedProto;
                host_seen |= current == Kind::ForwardedHost;
                address_seen |= current == Kind::RealIp;
                line(out, name, value);
            }
            Kind::ForwardedProto => {
                if first {
                    proto_seen = true;
                    line(out, name, proto);
                }
            }
            Kind::ForwardedHost => {
                if first {
                    host_seen = true;
                    // The host as the map has it by then: the `:authority`, else the first
                    // `Host` (which may come later); with none, the field goes.
                    let theirs = || fields.get(header::HOST).map(HeaderValue::as_bytes);
                    line(out, name, authority.or(host).or_else(theirs)?);
                }
            }
            Kind::RealIp => {
                if first {
                    address_seen = true;
                    line(out, name, peer);
                }
            }
            Kind::TrustedOnly
            | Kind::Alias
            | Kind::Te
            | Kind::Expect
            | Kind::Connection
            | Kind::TransferEncoding
            | Kind::Upgrade
            | Kind::KeepAlive => return None,
            // h2 passes a length given again only when it is the same value: one line, as
            // `forward::rewrite` leaves it in the map.
            Kind::ContentLength if first => line(out, name, value),
            Kind::ContentLength => {}
            Kind::Other => line(out, name, value),
        }
    }
    // What the rules add, in their order: `Host` from the `:authority`, the four forwarding
    // fields, and the server's own host when the request names none (each name and its `: `
    // written at once).
    let added = |out: &mut Vec<u8>, named: &[u8], value: &[u8]| {
        out.extend_from_slice(named);
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    if host.is_none() {
        if let Some(authority) = authority {
            added(out, b"host: ", authority);
            host = Some(authority);
        }
    }
    if !list {
        added(out, b"x-forwarded-for: ", peer);
    }
    if !proto_seen {
        added(out, b"x-forwarded-proto: ", proto);
    }
    if let (false, Some(host)) = (host_seen, host) {
        added(out, b"x-forwarded-host: ", host);
    }
    if !address_seen {
        added(out, b"x-real-ip: ", peer);
    }
    if host.is_none() && valid_value(server.as_bytes()) {
        added(out, b"host: ", server.as_bytes());
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_raw_hop_by_hop_names_are_the_map_s() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "transfer-encoding",
            "upgrade",
            "trailer",
            "accept",
            "host",
            "content-length",
            "x-forwarded-for",
        ] {
            let parsed = HeaderName::from_bytes(name.as_bytes()).unwrap();
            let want = parsed == header::CONNECTION || is_fixed_hop_by_hop(&parsed);
            assert_eq!(is_hop_by_hop_name(name.as_bytes()), want, "{name}");
            let upper = name.to_ascii_uppercase();
            assert_eq!(is_hop_by_hop_name(upper.as_bytes()), want, "{upper}");
        }
    }

    /// `kind`, for lines read without a map, says what the `HeaderName` rules say of each name,
    /// in any case.
    #[test]
    fn the_kinds_of_raw_names_are_the_rules_s() {
        let mut names: Vec<String> = FROM_TRUSTED_ONLY
            .iter()
            .chain([
                &X_FORWARDED_FOR,
                &X_FORWARDED_HOST,
                &X_FORWARDED_PROTO,
                &X_REAL_IP,
            ])
            .flat_map(|n| [n.as_str().to_owned(), n.as_str().replace('-', "_")])
            .collect();
        for other in [
            "host",
            "cookie",
            "content-length",
            "expect",
            "connection",
            "te",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "trailer",
            "accept",
            "user-agent",
            "accept-encoding",
            "x-forwarded-hosts",
            "x-forwarded-fo",
            "x_custom",
            "x-real_ip",
        ] {
            names.push(other.to_owned());
        }
        for name in names {
            let parsed = HeaderName::from_bytes(name.as_bytes()).unwrap();
            let want = if parsed == header::HOST {
                Kind::Host
            } else if parsed == header::COOKIE {
                Kind::Cookie
            } else if parsed == header::CONTENT_LENGTH {
                Kind::ContentLength
            } else if parsed == header::EXPECT {
                Kind::Expect
            } else if parsed == header::CONNECTION {
                Kind::Connection
            } else if parsed == header::TE {
                Kind::Te
            } else if parsed == header::TRANSFER_ENCODING {
                Kind::TransferEncoding
            } else if parsed == header::UPGRADE {
                Kind::Upgrade
            } else if parsed == KEEP_ALIVE || parsed == PROXY_CONNECTION {
                Kind::KeepAlive
            } else if parsed == X_FORWARDED_FOR {
                Kind::ForwardedFor
            } else if parsed == X_FORWARDED_PROTO {
                Kind::ForwardedProto
            } else if parsed == X_FORWARDED_HOST {
                Kind::ForwardedHost
            } else if parsed == X_REAL_IP {
                Kind::RealIp
            } else if FROM_TRUSTED_ONLY.contains(&parsed) {
                Kind::TrustedOnly
            } else if is_underscore_alias(name.as_bytes()) {
                Kind::Alias
            } else {
                Kind::Other
            };
            assert_eq!(kind(name.as_bytes()), want, "{name}");
            let upper = name.to_ascii_uppercase();
            assert_eq!(kind(upper.as_bytes()), want, "{upper}");
        }
    }

    #[test]
    fn valid_values_are_the_map_s() {
        for b in 0..=255u8 {
            let value = [b'a', b, b'z'];
            assert_eq!(
                valid_value(&value),
                HeaderValue::from_bytes(&value).is_ok(),
                "{b:#x}"
            );
        }
    }

    #[test]
    fn hop_by_hop_rules() {
        // (input headers, headers that must remain)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let table: &[Case] = &[
            (&[("connection", "close"), ("accept", "*/*")], &["accept"]),
            (
                &[("keep-alive", "timeout=5"), ("accept", "*/*")],
                &["accept"],
            ),
            (&[("proxy-connection", "keep-alive")], &[]),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("content-type", "text/plain"),
                ],
                &["content-type"],
            ),
            (&[("upgrade", "websocket")], &[]),
            (&[("te", "gzip")], &[]),
            // Headers named in Connection go, whatever their case and spacing.
            (
                &[
                    ("connection", "X-Secret ,  x-other"),
                    ("x-secret", "1"),
                    ("x-other", "2"),
                    ("x-kept", "3"),
                ],
                &["x-kept"],
            ),
            // Several Connection lines all count.
            (
                &[
                    ("connection", "x-a"),
                    ("connection", "x-b"),
                    ("x-a", "1"),
                    ("x-b", "2"),
                ],
                &[],
            ),
            // A Connection token that is not a header name is ignored, not an error.
            (
                &[
                    ("connection", "bad token, x-a"),
                    ("x-a", "1"),
                    ("accept", "*/*"),
                ],
                &["accept"],
            ),
            // End-to-end headers stay.
            (
                &[
                    ("host", "a"),
                    ("content-length", "3"),
                    ("cookie", "c=1"),
                    ("authorization", "x"),
                ],
                &["authorization", "content-length", "cookie", "host"],
            ),
        ];
        for (input, want) in table {
            let mut h = map(input);
            strip_hop_by_hop(&mut h);
            assert_eq!(
                names(&h),
                want.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn te_trailers_survives_alone() {
        let mut h = map(&[("te", "gzip, trailers")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = map(&[("te", "trailers"), ("connection", "te")]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none(), "named in Connection, so it goes");
    }

    #[test]
    fn upgrade_detection() {
        assert!(upgrade_request(&map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket")
        ]))
        .is_some());
        assert!(upgrade_request(&map(&[("upgrade", "websocket")])).is_none());
        assert!(upgrade_request(&map(&[("connection", "upgrade")])).is_none());
        // An upgrade to HTTP/2 is never passed on, however it is written.
        for h2c in ["h2c", "H2C", "websocket, h2c", " h2c/1 "] {
            let asked = map(&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", h2c)]);
            assert!(upgrade_request(&asked).is_none(), "{h2c}");
        }
        let not_h2c = map(&[("connection", "upgrade"), ("upgrade", "h2cx")]);
        assert!(upgrade_request(&not_h2c).is_some());
    }

    fn client(peer: &str) -> ClientSide {
        ClientSide {
            peer: HeaderValue::from_str(peer).unwrap(),
            https: false,
        }
    }

    #[test]
    fn forwarded_for_rules() {
        // (incoming XFF lines, trusted peer?, expected XFF)
        let table: &[(&[&str], bool, &str)] = &[
            (&[], false, "192.0.2.1"),
            (&[], true, "192.0.2.1"),
            (&["203.0.113.9"], false, "203.0.113.9, 192.0.2.1"),
            (&["203.0.113.9"], true, "203.0.113.9, 192.0.2.1"),
            (
                &["203.0.113.9, 198.51.100.2"],
                true,
                "203.0.113.9, 198.51.100.2, 192.0.2.1",
            ),
            (
                &["203.0.113.9", "198.51.100.2"],
                true,
                "203.0.113.9, 198.51.100.2, 192.0.2.1",
            ),
        ];
        for (xff, trusted, want) in table {
            let mut h = HeaderMap::new();
            for v in *xff {
                h.append(X_FORWARDED_FOR.clone(), HeaderValue::from_str(v).unwrap());
            }
            set_forwarded(&mut h, &client("192.0.2.1"), *trusted);
            assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
            assert_eq!(
                h.get(&X_FORWARDED_FOR).unwrap(),
                want,
                "{xff:?} trusted={trusted}"
            );
        }
    }

    #[test]
    fn forwarded_proto_and_host() {
        let mut h = map(&[
            ("host", "shop.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
        ]);
        set_forwarded(&mut h, &client("192.0.2.1"), false);
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "http");
        assert_eq!(h.get(&X_FORWARDED_HOST).unwrap(), "shop.example");

        let mut h = map(&[
            ("host", "internal:8080"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
        ]);
        set_forwarded(&mut h, &client("10.0.0.2"), true);
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "https");
        assert_eq!(h.get(&X_FORWARDED_HOST).unwrap(), "shop.example");
    }

    #[test]
    fn forwarded_is_kept_from_a_trusted_peer_only() {
        let theirs = [
            ("host", "shop.example"),
            ("forwarded", "for=203.0.113.9;host=evil.example;proto=https"),
            ("forwarded", "for=198.51.100.2"),
        ];
        let mut h = map(&theirs);
        set_forwarded(&mut h, &client("192.0.2.1"), false);
        assert!(!h.contains_key(header::FORWARDED));
        let mut h = map(&theirs);
        set_forwarded(&mut h, &client("10.0.0.2"), true);
        let kept: Vec<_> = h.get_all(header::FORWARDED).iter().collect();
        assert_eq!(
            kept,
            [
                "for=203.0.113.9;host=evil.example;proto=https",
                "for=198.51.100.2"
            ]
        );
    }

    /// Each name kept from trusted peers only goes from anyone else, whichever of them comes
    /// and wherever it stands among the others (`set_forwarded` looks before it removes);
    /// the `_` aliases of all of them go from everyone; the map keeps no other change.
    #[test]
    fn every_name_kept_from_trusted_peers_only_goes_from_others() {
        for (i, only) in FROM_TRUSTED_ONLY.iter().enumerate() {
            // `Forwarded` has no `-`, so no alias either.
            let alias = only.as_str().replace('-', "_");
            let mut theirs = vec![
                ("host", "shop.example"),
                ("user-agent", "h2load"),
                (only.as_str(), "theirs"),
                ("accept", "*/*"),
            ];
            if alias != only.as_str() {
                theirs.insert(3, (alias.as_str(), "alias"));
            }
            let mut h = map(&theirs);
            set_forwarded(&mut h, &client("192.0.2.1"), false);
            assert!(
                !h.contains_key(only),
                "case {i}: {only} kept from an untrusted peer"
            );
            assert!(!h.contains_key(alias.as_str()), "case {i}: {alias} kept");
            assert_eq!(h.get("user-agent").unwrap(), "h2load");
            assert_eq!(h.get("accept").unwrap(), "*/*");
            assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "192.0.2.1");
            assert_eq!(h.len(), 7, "case {i}: {h:?}");

            let mut h = map(&theirs);
            set_forwarded(&mut h, &client("10.0.0.2"), true);
            assert_eq!(h.get(only).unwrap(), "theirs", "case {i}");
            if alias != only.as_str() {
                assert!(!h.contains_key(alias.as_str()), "case {i}: {alias} kept");
            }
        }
        // The client-address names CDNs write, which helpers read before X-Forwarded-For.
        let theirs = [
            ("host", "shop.example"),
            ("client-ip", "6.6.6.6"),
            ("x-client-ip", "6.6.6.6"),
            ("x-cluster-client-ip", "6.6.6.6"),
            ("cf-connecting-ip", "6.6.6.6"),
            ("fastly-client-ip", "6.6.6.6"),
            ("x-forwarded", "for=6.6.6.6"),
            ("forwarded-for", "6.6.6.6"),
        ];
        let mut h = map(&theirs);
        set_forwarded(&mut h, &client("192.0.2.1"), false);
        assert_eq!(h.len(), 5, "Host and the four written: {h:?}");
        // None of them: nothing removed, the four written.
        let mut h = map(&[("host", "shop.example"), ("user-agent", "h2load")]);
        set_forwarded(&mut h, &client("192.0.2.1"), false);
        assert_eq!(h.len(), 6, "{h:?}");
    }

    /// A length whose values repeat one another and agree becomes one line of its digits; one
    /// line of digits stays as it is; values that do not agree or are no number go.
    #[test]
    fn a_repeated_length_becomes_one_line() {
        let lengths = |h: &HeaderMap| -> Vec<String> {
            h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };
        let table: &[(&[&str], &[&str])] = &[
            (&["11, 11"], &["11"]),
            (&["11,11"], &["11"]),
            (&["11 ,\t11, 11"], &["11"]),
            (&["11", "11"], &["11"]),
            (&["11", "11, 11"], &["11"]),
            (&["011", "11"], &["11"]),
            (&["0, 0"], &["0"]),
            // One line of digits is left as it is, leading zeros too (RFC 9110 §8.6 allows
            // them, and every client reads them).
            (&["11"], &["11"]),
            (&["011"], &["011"]),
            (&[], &[]),
            // Values that do not agree or are no number, read nowhere a length frames a body:
            // none.
            (&["10, 11"], &[]),
            (&["10", "11"], &[]),
            (&["11, x"], &[]),
            (&["11,"], &[]),
            (&["11", "+11"], &[]),
            (&["x", "11"], &[]),
            (&["0x0b"], &[]),
            (&["+11"], &[]),
            (&["11 11"], &[]),
            (&[""], &[]),
            (&["99999999999999999999"], &[]),
            (&["18446744073709551615"], &[]),
            (&["10000000000000000000"], &[]),
            (&["9999999999999999999"], &["9999999999999999999"]),
            // Longer than 19 digits with leading zeros: its number, which HTTP/2 clients read.
            (&["00000000000000000011"], &["11"]),
        ];
        for (given, want) in table {
            let pairs: Vec<(&str, &str)> = given.iter().map(|v| ("content-length", *v)).collect();
            let mut h = map(&pairs);
            h.append("x-after", HeaderValue::from_static("1"));
            one_length(&mut h);
            assert_eq!(lengths(&h), *want, "{given:?}");
            assert_eq!(h.get("x-after").unwrap(), "1", "{given:?}");
        }
    }

    /// A length read at once (plain digits, fewer than 20) is the number `str::parse` reads,
    /// and every other value is left to it.
    #[test]
    fn a_length_of_plain_digits_is_read_as_str_parse_reads_it() {
        let mut values: Vec<Vec<u8>> = [
            "",
            "0",
            "00",
            "7",
            "100",
            "0100",
            "+1",
            "-1",
            "1a",
            "a1",
            " 1",
            "1 ",
            "1.0",
            "18446744073709551615",
            "18446744073709551616",
            "9999999999999999999",
            "10000000000000000000",
            "0000000000000000000",
            "00000000000000000001",
        ]
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
        // Every length of digits up to 25, each digit drawn (a fixed linear congruence).
        let mut seed = 0x9e37_79b9_u64;
        for len in 1..=25 {
            for _ in 0..40 {
                let value = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        b'0' + ((seed >> 33) % 10) as u8
                    })
                    .collect();
                values.push(value);
            }
        }
        values.push(vec![b'9'; 19]);
        values.push(b"\xd9\xa1".to_vec());
        for value in values {
            assert_eq!(
                length_value(&value),
                parsed_length(&value),
                "{:?}",
                String::from_utf8_lossy(&value)
            );
        }
    }

    #[test]
    fn content_length_reads_lists_and_tells_a_repeat() {
        let read = |value: &str, known| {
            let mut repeated = false;
            let got = content_length(value.as_bytes(), known, &mut repeated);
            (got, repeated)
        };
        assert_eq!(read("11", None), (Ok(Some(11)), false));
        assert_eq!(read("011", None), (Ok(Some(11)), false));
        assert_eq!(read("11, 11", None), (Ok(Some(11)), true));
        assert_eq!(read("11", Some(11)), (Ok(Some(11)), true));
        assert_eq!(
            read("11", Some(10)),
            (Err("differing Content-Length values"), false)
        );
        for bad in [
            "",
            "+11",
            "-1",
            "0x0b",
            "11 11",
            "11,",
            "99999999999999999999",
            "10000000000000000000",
        ] {
            assert_eq!(
                read(bad, None).0,
                Err("an invalid Content-Length"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_switch_is_only_to_a_protocol_the_client_offered() {
        let v = HeaderValue::from_static;
        for (asked, switched) in [
            ("websocket", "websocket"),
            ("WebSocket", "websocket"),
            ("foo/1, websocket", "websocket"),
            ("HTTP/2.0, SHTTP/1.3", "SHTTP/1.4"),
        ] {
            assert!(
                switch_offered(&v(asked), Some(&v(switched))),
                "{asked} -> {switched}"
            );
        }
        for (asked, switched) in [
            ("foo", Some("websocket")),
            ("websocket", Some("websocket, foo")),
            ("websocket", Some("")),
            ("websocket", Some(" , ")),
            ("websocket", None),
            ("websocketx", Some("websocket")),
        ] {
            let switched = switched.map(v);
            assert!(
                !switch_offered(&v(asked), switched.as_ref()),
                "{asked} -> {switched:?}"
            );
        }
    }
}
