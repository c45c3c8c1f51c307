//! Serving a held request.
//!
//! Backs the decision "render at change time, not at request time" (DESIGN.md): a held request
//! costs negotiation plus a `Bytes` clone, against rendering the template for every request;
//! and written without hyper, a copy of its encoding, against building and encoding it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::header::ACCEPT_LANGUAGE;
use http::{HeaderMap, HeaderValue};
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
    let config = Config::parse("", Path::new("."), None).unwrap();
    let pages = Pages::load(&PagesSource::BuiltIn).unwrap();
    let now = SystemTime::now();
    let state = Persisted::default()
        .apply(
            Change::On {
                message: Some("We are upgrading the database. Back by 10:00 UTC.".into()),
                until: None,
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

criterion_group!(benches, serve);
criterion_main!(benches);
