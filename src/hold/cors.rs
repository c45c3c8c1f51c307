//! Cross-origin reads of the answers intermission gives itself (holding, outage, `status`),
//! for the origins in `maintenance.cors_origins` (SPEC §3).
//!
//! A web app served from another origin calls this API with `fetch`. The app answers its CORS
//! itself while it is up; the holding answer carries no CORS headers, so the browser hides it
//! from the app's script, which then shows a network error instead of the operator's message
//! and `Retry-After`, and a call that needs a preflight (JSON bodies, `Authorization`) is not
//! even sent, its `OPTIONS` answered 503.
//!
//! An origin listed by name may read the holding answers with credentials, and its preflights
//! that would be held are answered `204`, so that the call goes on to be held and read. That
//! approval is the application's to give: the call it lets through is forwarded if it is not
//! held after all (a bypass cookie, which preflights never carry; the hold ending in between),
//! and reaches the application without its own preflight. So it is given only to origins the
//! operator names, which the application allows anyway, never under `*`, and never in place of
//! an answer the application gave (`intercept_statuses`). `*` lets any origin read the holding
//! answers, as the public pages they are: `Access-Control-Allow-Origin: *`, without
//! credentials, approving no preflight but those of the reserved paths, which are never
//! forwarded.

use super::fields::Fields;
use super::negotiate::Form;
use crate::body::Body;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

/// What a script may read of a holding answer beyond the headers every response shows it.
const EXPOSED: HeaderValue = HeaderValue::from_static("Retry-After, X-Intermission-Mode");
const EXPOSED_GRPC: HeaderValue = HeaderValue::from_static(
    "Retry-After, X-Intermission-Mode, grpc-status, grpc-message, grpc-retry-pushback-ms",
);

/// Who may read an answer: the calling origin, named in the list, or anyone (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reader {
    Named(HeaderValue),
    Anyone,
}

/// Who may read intermission's answers to this request under `origins`
/// (`maintenance.cors_origins`, checked at load: `*` or origins as browsers write them); `None`
/// when the list is empty or the request is no cross-origin call it allows. A request with more
/// than one `Origin` is no browser's.
pub fn allowed<H: Fields + ?Sized>(origins: &[String], headers: &H) -> Option<Reader> {
    if origins.is_empty() {
        return None;
    }
    let mut lines = headers.all(&header::ORIGIN);
    let origin = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let named = origins
        .iter()
        .any(|o| o != "*" && o.as_bytes().eq_ignore_ascii_case(origin));
    match HeaderValue::from_bytes(origin) {
        Ok(origin) if named => Some(Reader::Named(origin)),
        _ if origins.iter().any(|o| o == "*") => Some(Reader::Anyone),
        _ => None,
    }
}

/// Whether a request is a CORS preflight: an `OPTIONS` that names the method to come.
pub fn is_preflight<H: Fields + ?Sized>(method: &http::Method, headers: &H) -> bool {
    method == http::Method::OPTIONS
        && headers
            .value(&header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_some_and(|m| !m.is_empty())
}

/// Marks a holding answer of `form` as readable by `reader`.
pub fn allow(h: &mut HeaderMap, reader: Reader, form: Form) {
    let exposed = if form == Form::Grpc {
        EXPOSED_GRPC
    } else {
        EXPOSED
    };
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed);
    readable(h, reader);
}

/// Marks any answer of intermission's own (`status`) as readable by `reader`.
pub fn readable(h: &mut HeaderMap, reader: Reader) {
    let origin = match reader {
        Reader::Anyone => {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            return;
        }
        Reader::Named(origin) => origin,
    };
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    // The answer differs by origin. Holding answers are `no-store`; this is for any cache
    // that keeps them anyway.
    let vary = match h.get(header::VARY).map(HeaderValue::as_bytes) {
        Some(v) => HeaderValue::from_bytes(&[v, b", Origin"].concat()).ok(),
        None => Some(HeaderValue::from_static("Origin")),
    };
    if let Some(vary) = vary {
        h.insert(header::VARY, vary);
    }
}

/// The answer to a preflight for `reader`: the headers asked for, and `methods` (or the one
/// asked for) allowed, for this call only (`Max-Age: 0`), so that no approval is kept past it.
pub fn preflight<H: Fields + ?Sized>(
    reader: Reader,
    headers: &H,
    methods: Option<&'static str>,
    mode: &'static str,
) -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    let method = match methods {
        Some(methods) => Some(HeaderValue::from_static(methods)),
        None => headers
            .value(&header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| HeaderValue::from_bytes(v).ok()),
    };
    if let Some(method) = method {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, method);
    }
    let asked = headers.value(&header::ACCESS_CONTROL_REQUEST_HEADERS);
    if let Some(asked) = asked.filter(|v| !v.is_empty()) {
        if let Ok(asked) = HeaderValue::from_bytes(asked) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
        }
    }
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("0"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        super::held::X_INTERMISSION_MODE.clone(),
        HeaderValue::from_static(mode),
    );
    h.insert(
        header::VARY,
        HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers"),
    );
    readable(h, reader);
    resp
}

/// Whether `text` is an origin as `maintenance.cors_origins` takes it: `*`, or
/// `http(s)://host[:port]` exactly as a browser sends it in `Origin` (no path, not even `/`;
/// no default port; an ASCII host), since one written otherwise would match no request. The
/// error says what is wrong, for the config's message.
pub fn check_origin(text: &str) -> Result<(), String> {
    if text == "*" {
        return Ok(());
    }
    let (scheme, rest, default) = match text.split_once("://") {
        Some(("https", rest)) => ("https", rest, "443"),
        Some(("http", rest)) => ("http", rest, "80"),
        _ => {
            return Err(format!(
                "{text:?} is not an origin: write \"https://app.example.com\", or \"*\" for any"
            ))
        }
    };
    let as_sent = |authority: &str| {
        format!("{text:?} would match no request: browsers send {scheme}://{authority}")
    };
    if let Some(cut) = rest.find(['/', '?', '#']) {
        return Err(as_sent(&rest[..cut]));
    }
    if !rest.is_ascii() {
        return Err(format!(
            "{text:?}: browsers send an international host in its ASCII form (xn--…); write that"
        ));
    }
    let authority: http::uri::Authority = rest
        .parse()
        .map_err(|_| format!("{text:?} has no valid host"))?;
    let host = authority.host();
    if rest.contains('@') || host.is_empty() {
        return Err(format!("{text:?} has no valid host"));
    }
    // The rule of servers' and webhooks' ports; and a default port, which browsers leave out.
    if crate::config::bad_port(&authority).is_some() {
        return Err(format!("{text:?} has no valid port"));
    }
    if authority.port().is_some_and(|p| p.as_str() == default) {
        return Err(as_sent(host));
    }
    if host.ends_with('.') {
        return Err(as_sent(&rest.replacen(host, host.trim_end_matches('.'), 1)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn map(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in lines {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn a_named_origin_reads_with_credentials_and_star_lets_anyone_read_without() {
        let app = "https://app.example.com".to_owned();
        let from_app = map(&[("origin", "https://app.example.com")]);
        let from_elsewhere = map(&[("origin", "https://evil.example")]);
        let named = |v| Some(Reader::Named(HeaderValue::from_static(v)));
        assert_eq!(
            allowed(std::slice::from_ref(&app), &from_app),
            named("https://app.example.com")
        );
        // Browsers write hosts in lowercase; a list written otherwise still matches.
        let upper = ["HTTPS://App.Example.com".to_owned()];
        assert!(allowed(&upper, &from_app).is_some());
        assert!(allowed(std::slice::from_ref(&app), &from_elsewhere).is_none());
        assert!(allowed(&[], &from_app).is_none(), "nothing listed: no CORS");
        assert!(allowed(std::slice::from_ref(&app), &HeaderMap::new()).is_none());
        let any = ["*".to_owned(), app.clone()];
        assert_eq!(allowed(&any, &from_elsewhere), Some(Reader::Anyone));
        assert_eq!(
            allowed(&any, &map(&[("origin", "null")])),
            Some(Reader::Anyone)
        );
        assert_eq!(allowed(&any, &from_app), named("https://app.example.com"));
        let two = map(&[
            ("origin", "https://app.example.com"),
            ("origin", "https://b"),
        ]);
        assert!(allowed(&any, &two).is_none(), "two origins: no browser's");
    }

    #[test]
    fn a_readable_answer_says_so_and_varies_by_origin() {
        let mut h = map(&[("vary", "Accept")]);
        let app = Reader::Named(HeaderValue::from_static("https://a.example"));
        allow(&mut h, app.clone(), Form::Json);
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(
            h["access-control-expose-headers"],
            "Retry-After, X-Intermission-Mode"
        );
        assert_eq!(h["vary"], "Accept, Origin");
        let mut g = HeaderMap::new();
        allow(&mut g, app, Form::Grpc);
        assert!(g["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("grpc-status, grpc-message"));
        assert_eq!(g["vary"], "Origin");
        // Anyone: the same answer for all, without credentials.
        let mut a = map(&[("vary", "Accept")]);
        allow(&mut a, Reader::Anyone, Form::Json);
        assert_eq!(a["access-control-allow-origin"], "*");
        assert!(!a.contains_key("access-control-allow-credentials"));
        assert_eq!(a["vary"], "Accept");
    }

    #[test]
    fn a_preflight_allows_what_it_asks_for_this_once() {
        let asked = map(&[
            ("origin", "https://a.example"),
            ("access-control-request-method", "DELETE"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ]);
        assert!(is_preflight(&Method::OPTIONS, &asked));
        assert!(!is_preflight(&Method::GET, &asked));
        assert!(!is_preflight(&Method::OPTIONS, &map(&[("origin", "x")])));
        let empty = map(&[("access-control-request-method", "")]);
        assert!(!is_preflight(&Method::OPTIONS, &empty));
        let app = Reader::Named(HeaderValue::from_static("https://a.example"));
        let resp = preflight(app.clone(), &asked, None, "outage");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let h = resp.headers();
        assert_eq!(h["access-control-allow-methods"], "DELETE");
        assert_eq!(
            h["access-control-allow-headers"],
            "authorization, content-type"
        );
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-max-age"], "0");
        assert_eq!(h["x-intermission-mode"], "outage");
        assert!(h["vary"].to_str().unwrap().ends_with(", Origin"));
        // A reserved path's: its own methods, whatever is asked.
        let resp = preflight(Reader::Anyone, &asked, Some("GET, HEAD"), "normal");
        assert_eq!(resp.headers()["access-control-allow-methods"], "GET, HEAD");
        assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    }

    #[test]
    fn origins_are_checked_as_browsers_write_them() {
        for good in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "https://[::1]:8443",
            "https://[::1]",
            "https://xn--bcher-kva.example",
        ] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("app.example.com", "is not an origin"),
            ("ftp://app.example.com", "is not an origin"),
            (
                "https://app.example.com/",
                "browsers send https://app.example.com",
            ),
            (
                "https://app.example.com/x?y",
                "browsers send https://app.example.com",
            ),
            (
                "https://app.example.com:443",
                "browsers send https://app.example.com",
            ),
            (
                "http://app.example.com:80",
                "browsers send http://app.example.com",
            ),
            (
                "https://app.example.com.",
                "browsers send https://app.example.com",
            ),
            ("https://bücher.example", "ASCII form (xn--…)"),
            ("https://", "no valid host"),
            ("https://u:p@app.example.com", "no valid host"),
            ("https://app.example.com:99999", "no valid port"),
            ("https://app.example.com:+80", "no valid port"),
            ("https://app.example.com:", "no valid port"),
            ("https://a b", "no valid host"),
        ] {
            let err = check_origin(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
