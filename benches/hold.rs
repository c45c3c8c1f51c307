//! Serving a held request.
//!
//! Backs the decision "render at change time, not at request time" (DESIGN.md): a held request
//! costs negotiation plus a `Bytes` clone, against rendering the template for every request;
//! and written without hyper, a copy of its encoding, against building and encoding it; and
//! the rules reading httparse's lines, against copying them into a header map first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::header::ACCEPT_LANGUAGE;
use http::{HeaderMap, HeaderName, HeaderValue};
use intermission::config::{Config, PagesSource};
use intermission::h1;
use intermission::hold::fields::Fields;
use intermission::hold::held::{self, Held, View};
use intermission::hold::negotiate;
use intermission::hold::pages::Pages;
use intermission::state::mode::{Change, Mode, Persisted};
use std::path::Path;
use std::time::SystemTime;

fn setup() -> (Config, Pages, View) {
    setup_until(None)
}

/// `setup`, maintenance announced to end at `until`.
fn setup_until(until: Option<SystemTime>) -> (Config, Pages, View) {
    let mut config = Config::parse("", Path::new("."), None).unwrap();
    config.maintenance.pages = PagesSource::BuiltIn;
    let pages = Pages::load(&config.maintenance).unwrap();
    let now = SystemTime::now();
    let state = Persisted::default()
        .apply(
            Change::On {
                message: Some("We are upgrading the database. Back by 10:00 UTC.".into()),
                until: until.map(Some),
                retry_after: None,
                reason: None,
                by: "bench".into(),
            },
            now,
            true,
        )
        .unwrap();
    let view = View::new(Mode::Maintenance, &state, &config.maintenance, None, now);
    (config, pages, view)
}

fn browser() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "accept",
        HeaderValue::from_static("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    );
    h.insert(
        "accept-language",
        HeaderValue::from_static("fr-CH, fr;q=0.9, en;q=0.8, de;q=0.7, *;q=0.5"),
    );
    h
}

fn serve(c: &mut Criterion) {
    let (config, pages, view) = setup();
    let prefix = config.maintenance.reserved_prefix.clone();
    let held = Held::new(&pages, view.clone(), &prefix, SystemTime::now()).with_encodings();
    let headers = browser();
    let api = HeaderMap::new();
    let prefixes = config.maintenance.api_prefixes.clone();

    c.bench_function("held page: negotiate + pre-rendered bytes", |b| {
        b.iter(|| {
            let form = negotiate::choose_form(black_box(&headers), "/shop", &prefixes);
            let lang = negotiate::choose_language(headers.value(&ACCEPT_LANGUAGE), &pages.langs);
            held.respond(form, lang, false, SystemTime::now)
        })
    });
    c.bench_function("held page: render the template per request", |b| {
        b.iter(|| {
            let form = negotiate::choose_form(black_box(&headers), "/shop", &prefixes);
            let lang = negotiate::choose_language(headers.value(&ACCEPT_LANGUAGE), &pages.langs);
            // Same response building, plus rendering the page for this request.
            let page = held::render_pages(&pages, &view, &prefix, SystemTime::now());
            black_box(page.into_iter().nth(lang));
            held.respond(form, lang, false, SystemTime::now)
        })
    });
    // Backs "encode once per state change" (`h1::Encoded`): what `fast` writes for a held
    // request on a parked connection, against building the response and encoding it.
    let mut out = Vec::with_capacity(8192);
    c.bench_function("held page written: encoded at change time + date", |b| {
        b.iter(|| {
            out.clear();
            let form = negotiate::choose_form(black_box(&headers), "/shop", &prefixes);
            let lang = negotiate::choose_language(headers.value(&ACCEPT_LANGUAGE), &pages.langs);
            held.encoded(form, lang, false).unwrap().write(&mut out);
            out.len()
        })
    });
    // While `Retry-After` counts down to an announced end ("back by 14:00"): the head kept up
    // to it, the number, length and date of the moment added (`Held::write_encoded`).
    let ends = SystemTime::now() + std::time::Duration::from_secs(2 * 3600);
    let (_, _, counting) = setup_until(Some(ends));
    let counting = Held::new(&pages, counting, &prefix, SystemTime::now()).with_encodings();
    c.bench_function(
        "held page written: counting down, encoded up to Retry-After",
        |b| {
            b.iter(|| {
                let mut answers = h1::Answers::copied(&mut out);
                let form = negotiate::choose_form(black_box(&headers), "/shop", &prefixes);
                let lang =
                    negotiate::choose_language(headers.value(&ACCEPT_LANGUAGE), &pages.langs);
                counting.write_encoded(form, lang, false, b"", &mut answers);
                let len = answers.len();
                out.clear();
                len
            })
        },
    );
    c.bench_function("held page written: build the response + encode it", |b| {
        b.iter(|| {
            out.clear();
            let form = negotiate::choose_form(black_box(&headers), "/shop", &prefixes);
            let lang = negotiate::choose_language(headers.value(&ACCEPT_LANGUAGE), &pages.langs);
            let resp = held.respond(form, lang, false, SystemTime::now);
            let (parts, body) = resp.into_parts();
            let body = body.into_ready().unwrap();
            h1::encode(&parts, &body, false, &mut out);
            out.len()
        })
    });
    c.bench_function("negotiation only: browser Accept + Accept-Language", |b| {
        b.iter(|| {
            let form = negotiate::choose_form(black_box(&headers), "/shop", &prefixes);
            (
                form,
                negotiate::choose_language(headers.value(&ACCEPT_LANGUAGE), &pages.langs),
            )
        })
    });
    c.bench_function("held problem+json: negotiate + splice Retry-After", |b| {
        b.iter(|| {
            let form = negotiate::choose_form(black_box(&api), "/api/orders", &prefixes);
            held.respond(form, 0, false, SystemTime::now)
        })
    });
}

/// Backs "the rules read httparse's lines where they lie" (`hold::fields`): what `fast` does
/// with a browser's held request before its answer, against copying the lines into a
/// `HeaderMap` first, as it did before.
fn read(c: &mut Criterion) {
    let (config, pages, _) = setup();
    let prefixes = config.maintenance.api_prefixes.clone();
    let input = Bytes::from_static(
        b"GET /shop?page=2 HTTP/1.1\r\nHost: shop.example\r\n\
        User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
        Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
        Accept-Language: fr-CH, fr;q=0.9, en;q=0.8, de;q=0.7, *;q=0.5\r\n\
        Accept-Encoding: gzip, deflate, br, zstd\r\nReferer: https://shop.example/\r\n\
        Cookie: session=abc123; theme=dark\r\nSec-Fetch-Dest: document\r\n\
        Sec-Fetch-Mode: navigate\r\nSec-Fetch-Site: same-origin\r\n\
        Upgrade-Insecure-Requests: 1\r\nPriority: u=0, i\r\n\r\n",
    );
    c.bench_function("held request read: negotiate over httparse's lines", |b| {
        b.iter(|| {
            let mut lines = [httparse::EMPTY_HEADER; 48];
            let mut req = httparse::Request::new(&mut lines);
            req.parse(black_box(&input)).unwrap();
            let lines: &[httparse::Header<'_>] = req.headers;
            let form = negotiate::choose_form(lines, "/shop", &prefixes);
            let lang = negotiate::choose_language(lines.value(&ACCEPT_LANGUAGE), &pages.langs);
            (form, lang)
        })
    });
    c.bench_function("held request read: copied into a HeaderMap first", |b| {
        b.iter(|| {
            let mut lines = [httparse::EMPTY_HEADER; 48];
            let mut req = httparse::Request::new(&mut lines);
            req.parse(black_box(&input)).unwrap();
            let mut map = HeaderMap::with_capacity(req.headers.len());
            for line in req.headers.iter() {
                let name = HeaderName::from_bytes(line.name.as_bytes()).unwrap();
                let value = HeaderValue::from_maybe_shared(input.slice_ref(line.value)).unwrap();
                map.append(name, value);
            }
            let form = negotiate::choose_form(&map, "/shop", &prefixes);
            let lang = negotiate::choose_language(map.value(&ACCEPT_LANGUAGE), &pages.langs);
            (form, lang)
        })
    });
}

criterion_group!(benches, serve, read);
criterion_main!(benches);
