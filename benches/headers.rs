//! Per-request header rewriting (hop-by-hop removal + X-Forwarded-*).
//!
//! Backs three decisions: (1) rewriting the client's `HeaderMap` in place instead of building a
//! new one, (2) preparing the peer's `X-Forwarded-For` value once per connection instead of
//! formatting the address on every request, and (3) writing an HTTP/2 client's request for an
//! HTTP/1.1 server straight from its fields (`headers::write_rewritten`) rather than rewriting
//! its map and writing that.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use intermission::forward::headers::{self, ClientSide};
use std::net::IpAddr;

fn browser_request() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "shop.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("cookie", "session=0123456789abcdef; theme=dark"),
        ("upgrade-insecure-requests", "1"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn rewrite(c: &mut Criterion) {
    let template = browser_request();
    let client = ClientSide {
        peer: HeaderValue::from_static("192.0.2.10"),
        https: false,
    };
    c.bench_function("rewrite: in place, peer prepared per connection", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| {
                headers::strip_hop_by_hop(h);
                headers::set_forwarded(h, black_box(&client), false);
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let peer: IpAddr = "192.0.2.10".parse().unwrap();
    c.bench_function("rewrite: in place, peer formatted per request", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| {
                headers::strip_hop_by_hop(h);
                let client = ClientSide {
                    peer: HeaderValue::from_str(&black_box(peer).to_string()).unwrap(),
                    https: false,
                };
                headers::set_forwarded(h, &client, false);
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("rewrite: trusted proxy appends to X-Forwarded-For", |b| {
        b.iter_batched_ref(
            || {
                let mut h = template.clone();
                h.insert(
                    "x-forwarded-for",
                    HeaderValue::from_static("203.0.113.5, 198.51.100.7"),
                );
                h
            },
            |h| {
                headers::strip_hop_by_hop(h);
                headers::set_forwarded(h, black_box(&client), true);
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// An HTTP/2 request as h2's decoder hands it on: a map made to the size of what the client
/// sent (here two fields), which the four `X-Forwarded-*` and `X-Real-IP` lines outgrow;
/// `set_forwarded` makes their room at once rather than letting the map grow by doubling.
fn rewrite_h2(c: &mut Criterion) {
    let client = ClientSide {
        peer: HeaderValue::from_static("192.0.2.10"),
        https: true,
    };
    c.bench_function("rewrite: HTTP/2 request, map made to size", |b| {
        b.iter_batched_ref(
            || {
                let mut h = HeaderMap::with_capacity(2);
                h.append(
                    "user-agent",
                    HeaderValue::from_static("h2load nghttp2/1.52.0"),
                );
                h.append("host", HeaderValue::from_static("127.0.0.1:8443"));
                h
            },
            |h| {
                headers::strip_hop_by_hop(h);
                headers::set_forwarded(h, black_box(&client), false);
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// h2load's request as the relay writes it for an HTTP/1.1 server: its map rewritten (the
/// `:authority` made `Host`, the forwarding fields) and then written line by line, against its
/// lines written straight from the fields with the same rules (the same bytes).
fn written_h2(c: &mut Criterion) {
    let client = ClientSide {
        peer: HeaderValue::from_static("192.0.2.10"),
        https: true,
    };
    let request = || {
        let mut h = HeaderMap::with_capacity(3);
        h.append("accept", HeaderValue::from_static("*/*"));
        h.append("accept-encoding", HeaderValue::from_static("gzip, deflate"));
        h.append(
            "user-agent",
            HeaderValue::from_static("h2load nghttp2/1.52.0"),
        );
        h
    };
    let mut out = Vec::with_capacity(1024);
    c.bench_function("written for HTTP/1.1: HTTP/2 request, map rewritten", |b| {
        b.iter_batched_ref(
            request,
            |h| {
                let _ = h.try_reserve(5);
                h.insert("host", HeaderValue::from_static("127.0.0.1:8443"));
                headers::join_cookies(h);
                headers::strip_hop_by_hop(h);
                h.remove("expect");
                headers::set_forwarded(h, black_box(&client), false);
                out.clear();
                for (name, value) in h.iter() {
                    out.extend_from_slice(name.as_str().as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let mut straight = Vec::with_capacity(1024);
    c.bench_function("written for HTTP/1.1: HTTP/2 request, straight", |b| {
        b.iter_batched_ref(
            request,
            |h| {
                straight.clear();
                let authority = Some("127.0.0.1:8443");
                let server = "127.0.0.1:8080";
                let client = black_box(&client);
                headers::write_rewritten(&mut straight, h, authority, client, false, server)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    assert_eq!(out, straight);
}

criterion_group!(benches, rewrite, rewrite_h2, written_h2);
criterion_main!(benches);
