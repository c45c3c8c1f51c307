//! Cross-origin reads of the answers intermission gives itself (holding, outage, `status`),
//! for the origins in `maintenance.cors_origins` (SPEC §3).
//!
//! A web app served from another origin calls this API with `fetch`. The app answers its CORS
//! itself while it is up; the holding answer carries no CORS headers, so the browser hides it
//! from the app's script, which then shows a network error instead of the operator's message
//! and `Retry-After`, and a call that needs a preflight (JSON bodies, `Authorization`) is not
//! even sent, its `OPTIONS` answered 503. For the listed origins, the holding answers say that
//! they may be read, and a preflight held is answered `204`, so that the call goes on to be
//! held and read. Nothing is ever forwarded on these answers' account: they are the same for
//! everyone and carry no one's data, which is why credentials may come with the call.

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

/// The request's `Origin`, when `origins` (`maintenance.cors_origins`, checked at load: `*`
/// or origins as browsers write them) lets it read intermission's answers. A request with
/// more than one `Origin` is no browser's.
pub fn allowed<H: Fields + ?Sized>(origins: &[String], headers: &H) -> Option<HeaderValue> {
    if origins.is_empty() {
        return None;
    }
    let mut lines = headers.all(&header::ORIGIN);
    let origin = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let listed = origins
        .iter()
        .any(|o| o == "*" || o.as_bytes().eq_ignore_ascii_case(origin));
    listed
        .then(|| HeaderValue::from_bytes(origin).ok())
        .flatten()
}

/// Whether a request is a CORS preflight: an `OPTIONS` that names the method to come.
pub fn is_preflight<H: Fields + ?Sized>(method: &http::Method, headers: &H) -> bool {
    method == http::Method::OPTIONS
        && headers
            .value(&header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_some()
}

/// Marks a holding answer of `form` as readable by `origin`.
pub fn allow(h: &mut HeaderMap, origin: HeaderValue, form: Form) {
    let exposed = if form == Form::Grpc {
        EXPOSED_GRPC
    } else {
        EXPOSED
    };
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed);
    readable(h, origin);
}

/// Marks any answer of intermission's own (`status`) as readable by `origin`.
pub fn readable(h: &mut HeaderMap, origin: HeaderValue) {
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

/// The answer to a preflight held for `origin`: the method and headers asked for are allowed,
/// for this call only (`Max-Age: 0`), so that no approval outlives the hold and reaches the
/// application without its own CORS having been asked.
pub fn preflight<H: Fields + ?Sized>(
    origin: HeaderValue,
    headers: &H,
    mode: &'static str,
) -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    let asked = [
        (
            header::ACCESS_CONTROL_REQUEST_METHOD,
            header::ACCESS_CONTROL_ALLOW_METHODS,
        ),
        (
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            header::ACCESS_CONTROL_ALLOW_HEADERS,
        ),
    ];
    for (request, allow) in asked {
        if let Some(v) = headers.value(&request) {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                h.insert(allow, v);
            }
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
    readable(h, origin);
    resp
}

/// Whether `text` is an origin as `maintenance.cors_origins` takes it: `*`, or
/// `http(s)://host[:port]` as a browser sends it in `Origin` (no path, not even `/`). The
/// error says what is wrong, for the config's message.
pub fn check_origin(text: &str) -> Result<(), String> {
    if text == "*" {
        return Ok(());
    }
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| {
            format!(
                "{text:?} is not an origin: write \"https://app.example.com\", or \"*\" for any"
            )
        })?;
    if let Some(cut) = rest.find(['/', '?', '#']) {
        return Err(format!(
            "{text:?} has more than an origin: write {:?}, as browsers send it in Origin",
            &text[..text.len() - rest.len() + cut]
        ));
    }
    let authority: http::uri::Authority = rest
        .parse()
        .map_err(|_| format!("{text:?} has no valid host"))?;
    if rest.contains('@') || authority.host().is_empty() {
        return Err(format!("{text:?} has no valid host"));
    }
    if rest.contains(':') && !rest.ends_with(']') && authority.port_u16().is_none() {
        return Err(format!("{text:?} has no valid port"));
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
    fn only_a_listed_origin_may_read() {
        let app = "https://app.example.com".to_owned();
        let from_app = map(&[("origin", "https://app.example.com")]);
        let from_elsewhere = map(&[("origin", "https://evil.example")]);
        assert_eq!(
            allowed(std::slice::from_ref(&app), &from_app).unwrap(),
            "https://app.example.com"
        );
        // Browsers write hosts in lowercase; a list written otherwise still matches.
        let upper = ["HTTPS://App.Example.com".to_owned()];
        assert!(allowed(&upper, &from_app).is_some());
        assert!(allowed(std::slice::from_ref(&app), &from_elsewhere).is_none());
        assert!(allowed(&[], &from_app).is_none(), "nothing listed: no CORS");
        assert!(allowed(std::slice::from_ref(&app), &HeaderMap::new()).is_none());
        let any = ["*".to_owned()];
        assert_eq!(
            allowed(&any, &from_elsewhere).unwrap(),
            "https://evil.example"
        );
        let two = map(&[
            ("origin", "https://app.example.com"),
            ("origin", "https://b"),
        ]);
        assert!(allowed(&any, &two).is_none(), "two origins: no browser's");
    }

    #[test]
    fn a_readable_answer_says_so_and_varies_by_origin() {
        let mut h = map(&[("vary", "Accept")]);
        allow(
            &mut h,
            HeaderValue::from_static("https://a.example"),
            Form::Json,
        );
        assert_eq!(h["access-control-allow-origin"], "https://a.example");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(
            h["access-control-expose-headers"],
            "Retry-After, X-Intermission-Mode"
        );
        assert_eq!(h["vary"], "Accept, Origin");
        let mut g = HeaderMap::new();
        allow(
            &mut g,
            HeaderValue::from_static("https://a.example"),
            Form::Grpc,
        );
        assert!(g["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("grpc-status, grpc-message"));
        assert_eq!(g["vary"], "Origin");
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
        let resp = preflight(
            HeaderValue::from_static("https://a.example"),
            &asked,
            "outage",
        );
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
    }

    #[test]
    fn origins_are_checked_as_browsers_write_them() {
        for good in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "https://[::1]:8443",
            "https://[::1]",
        ] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("app.example.com", "is not an origin"),
            ("ftp://app.example.com", "is not an origin"),
            (
                "https://app.example.com/",
                "write \"https://app.example.com\"",
            ),
            (
                "https://app.example.com/x?y",
                "write \"https://app.example.com\"",
            ),
            ("https://", "no valid host"),
            ("https://u:p@app.example.com", "no valid host"),
            ("https://app.example.com:99999", "no valid port"),
            ("https://app.example.com:", "no valid port"),
            ("https://a b", "no valid host"),
        ] {
            let err = check_origin(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
