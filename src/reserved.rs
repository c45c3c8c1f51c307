//! The reserved paths under `maintenance.reserved_prefix`, answered by the proxy in every mode
//! and never forwarded: `status`, `assets/…`, `bypass/{secret}` and `preview`.

use crate::body::Body;
use crate::hold::cors;
use crate::hold::fields::Fields;
use crate::hold::held::Held;
use crate::hold::negotiate::{self, Form};
use crate::state::Snapshot;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use std::time::SystemTime;

/// Answers the reserved path `rest` (the part after the prefix). `tls`: the client came over
/// HTTPS (here, or to a trusted proxy in front), for the bypass cookie's `Secure`.
pub fn answer<B>(snap: &Snapshot, req: &Request<B>, rest: &str, tls: bool) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let readable = head || req.method() == Method::GET;
    if let Some(secret) = rest.strip_prefix("bypass/") {
        return bypass(snap, req, secret, tls);
    }
    let reader = cors::allowed(&snap.config.maintenance.cors_origins, req.headers());
    if let Some(reader) = &reader {
        // Never forwarded, so any allowed origin may call them as it likes.
        if cors::is_preflight(req.method(), req.headers()) {
            let mode = snap.mode.as_str();
            return cors::preflight(reader.clone(), req.headers(), Some("GET, HEAD"), mode);
        }
    }
    if !readable {
        let mut resp = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are allowed here\n",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let resp = match rest {
        "status" => {
            let mut resp = status(snap);
            // A web app on an allowed origin may show the state to its users.
            if let Some(reader) = reader {
                cors::readable(resp.headers_mut(), reader);
            }
            resp
        }
        "preview" => preview(snap, req.uri().query().unwrap_or("")),
        _ => match rest.strip_prefix("assets/") {
            Some(name) => asset(snap, name, req.headers()),
            None => not_found(),
        },
    };
    if head {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::Empty);
    }
    resp
}

fn status(snap: &Snapshot) -> Response<Body> {
    let retry = snap
        .held
        .as_ref()
        .map_or(0, |h| h.view.retry_after(SystemTime::now()));
    let body = snap.status.with(retry);
    let mut resp = Response::new(Body::full(body.clone()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}

fn asset(snap: &Snapshot, name: &str, headers: &http::HeaderMap) -> Response<Body> {
    // Only names found under assets/ at load time exist, so no spelling of `..` can escape;
    // decoding just lets real names with spaces or accents be found.
    let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    let Some(a) = snap.pages.assets.get(decoded.as_ref()) else {
        return not_found();
    };
    // A browser that has the file already is told so, with the headers its `200` had but
    // the ones about the body (RFC 9110 §15.4.5).
    let fresh = a.matches(headers.get_all(header::IF_NONE_MATCH).iter());
    let mut resp = if fresh {
        let mut resp = Response::new(Body::Empty);
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp
    } else {
        let mut resp = Response::new(Body::full(a.bytes.clone()));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(a.content_type),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(a.bytes.len()));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        resp
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, a.etag.clone());
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

/// `mode` left out: the page of the mode in force, the outage page during an outage and the
/// maintenance page otherwise.
fn preview(snap: &Snapshot, query: &str) -> Response<Body> {
    let mut outage = snap.mode == crate::state::Mode::Outage;
    let mut lang = 0;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("mode", "outage")) => outage = true,
            Some(("mode", "maintenance")) => outage = false,
            // A typo (`mode=outgae`) showed the maintenance page, as if it were the one asked
            // for: an operator checking the outage page saw the wrong one, told nothing.
            Some(("mode", _)) => return plain(
                StatusCode::BAD_REQUEST,
                "mode must be maintenance or outage (left out: the page of the mode in force)\n",
            ),
            // Chosen as a visitor's `Accept-Language: CODE` would choose it (`fr-CA`
            // shows the French page), so that the preview shows what they will see.
            Some(("lang", code)) => {
                lang = crate::hold::negotiate::choose_language(
                    Some(code.as_bytes()),
                    &snap.pages.langs,
                )
            }
            _ => {}
        }
    }
    let pages = if outage {
        &snap.preview_outage
    } else {
        &snap.preview_maintenance
    };
    let body = pages
        .get(lang)
        .or(pages.first())
        .cloned()
        .unwrap_or_default();
    // Set here, not left to hyper, so that a `HEAD` (whose body `answer` drops) has it too.
    let length = HeaderValue::from(body.len());
    let mut resp = Response::new(Body::full(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, length);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-robots-tag", HeaderValue::from_static("noindex"));
    // As the held page of that language says it.
    if let Some(language) = snap.pages.content_language(lang) {
        h.insert(header::CONTENT_LANGUAGE, language);
    }
    resp
}

/// Every answer at a bypass link says `Referrer-Policy: no-referrer`, whether a secret is
/// configured or not (so that it tells nothing of one). The address holds a secret, the right
/// one or nearly (mistyped, or one changed since): the holding page shown there takes its
/// visitor to `/` once the site is back (`status.js`), and that request, and those of the page's
/// assets, would have carried the whole address to the application as `Referer`.
fn bypass<B>(snap: &Snapshot, req: &Request<B>, secret: &str, tls: bool) -> Response<Body> {
    let mut resp = bypass_answer(snap, req, secret, tls);
    resp.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn bypass_answer<B>(snap: &Snapshot, req: &Request<B>, secret: &str, tls: bool) -> Response<Body> {
    let key = snap
        .bypass
        .as_deref()
        .filter(|_| req.method() == Method::GET);
    if let Some(key) = key.filter(|k| k.secret_matches(secret)) {
        let mut resp = Response::new(Body::Empty);
        *resp.status_mut() = StatusCode::SEE_OTHER;
        let h = resp.headers_mut();
        h.insert(header::LOCATION, HeaderValue::from_static("/"));
        h.insert(
            header::SET_COOKIE,
            key.set_cookie_header(SystemTime::now(), tls),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return resp;
    }
    // A wrong secret looks like any other request: held when holding, unknown otherwise.
    match &snap.held {
        Some(_) => hold(snap, req),
        None => not_found(),
    }
}

/// The holding response for `req` under the current snapshot (which must be holding).
pub fn hold<B>(snap: &Snapshot, req: &Request<B>) -> Response<Body> {
    let Some(held) = &snap.held else {
        return not_found();
    };
    let (headers, path, method) = (req.headers(), req.uri().path(), req.method());
    respond(snap, held, headers, path, method, Preflights::Answered)
}

/// Whether a CORS preflight gets the holding answer or, from an origin named in
/// `cors_origins`, its approval (`hold::cors`): not in place of an answer the application gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflights {
    Answered,
    Held,
}

/// `held`'s response in the form and language this request's headers ask for; readable by
/// the calling origin when `cors_origins` allows it (`hold::cors`).
pub fn respond<H: Fields + ?Sized>(
    snap: &Snapshot,
    held: &Held,
    headers: &H,
    path: &str,
    method: &Method,
    preflights: Preflights,
) -> Response<Body> {
    let reader = cors::allowed(&snap.config.maintenance.cors_origins, headers);
    if let Some(named @ cors::Reader::Named(_)) = &reader {
        if preflights == Preflights::Answered && cors::is_preflight(method, headers) {
            let mode = held.view.mode.as_str();
            let mut resp = cors::preflight(named.clone(), headers, None, mode);
            // A held answer like any other (SPEC §3): the call it clears will be held too, and
            // a client that reads no further than the preflight learns when to come back.
            let retry = held.view.retry_after(SystemTime::now());
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
            return resp;
        }
    }
    let (form, lang) = choose_form(snap, headers, path, method);
    let mut resp = held.respond(form, lang, method == Method::HEAD, SystemTime::now);
    if form == Form::Grpc {
        // A gRPC-Web client reads its answer as the type it asked in (gRPC-Web's protocol).
        if let Some(web) = negotiate::grpc_web_type(headers) {
            resp.headers_mut().insert(header::CONTENT_TYPE, web);
        }
        let deadline = negotiate::grpc_deadline(headers);
        crate::hold::held::grpc_pushback_within(resp.headers_mut(), deadline);
    }
    if let Some(reader) = reader {
        cors::allow(resp.headers_mut(), reader, form);
    }
    resp
}

/// The form and the language (an index into the pages' languages) of the holding response
/// a request with these headers gets.
pub fn choose_form<H: Fields + ?Sized>(
    snap: &Snapshot,
    headers: &H,
    path: &str,
    method: &Method,
) -> (Form, usize) {
    let api_prefixes = &snap.config.maintenance.api_prefixes;
    let (form, lang) = negotiate::negotiate(
        headers,
        path,
        api_prefixes,
        &snap.pages.langs,
        snap.pages.id,
    );
    // An `EventSource` only ever GETs: the stream's `200` is for it alone.
    if form == Form::EventStream && !matches!(*method, Method::GET | Method::HEAD) {
        return (
            negotiate::choose_form_not_streamed(headers, path, api_prefixes),
            lang,
        );
    }
    (form, lang)
}

fn not_found() -> Response<Body> {
    plain(StatusCode::NOT_FOUND, "not found\n")
}

/// A gRPC answer from the proxy itself, trailers-only (HTTP 200, `grpc-status` and
/// `grpc-message` in its headers, no body), typed `content_type` (`application/grpc`, or a
/// gRPC-Web call's own type): gRPC's clients read a status only so, and took an HTTP status
/// for an unknown failure (`UNKNOWN: Received http2 header with status: 408`).
pub fn grpc_status(content_type: HeaderValue, status: u16, message: &str) -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("grpc-status", HeaderValue::from(status));
    let max = crate::hold::held::MAX_GRPC_MESSAGE;
    let message = crate::hold::held::grpc_percent_encode(message, max);
    if let Ok(message) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    resp
}

pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Set here, not left to hyper, so that the answer to a `HEAD` (whose body `answer`
    // drops) says the length a `GET` gets, as every other answer of the proxy's does.
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    resp
}
