//! The access log's line: one per request with the access log on, which is the default.
//!
//! Backs the decision to write the line by hand (`logging::AccessLine::render`), in the shape
//! `tracing`'s formatter gives every other line, instead of through that formatter
//! (`AccessLine::trace`, the subscriber `logging::init` installs). Both write the same line
//! into memory here; neither makes the system call that then writes it out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use intermission::config::LogFormat;
use intermission::logging::AccessLine;
use std::time::SystemTime;

fn line(c: &mut Criterion) {
    let line = AccessLine {
        peer: [203, 0, 113, 7].into(),
        client: None,
        method: &"GET",
        path: &"/products/42?ref=home",
        status: 200,
        upstream: Some("http://10.0.0.5:8080"),
        bytes: 5120,
        cut: false,
    };
    for (name, format) in [("text", LogFormat::Text), ("json", LogFormat::Json)] {
        let mut out = Vec::with_capacity(256);
        c.bench_function(&format!("access line, {name}: by hand"), |b| {
            b.iter(|| {
                out.clear();
                let now = SystemTime::now();
                black_box(&line).render(format, black_box(0.618779), now, &mut out);
                black_box(&out);
            })
        });
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::io::sink);
        let dispatch = match format {
            LogFormat::Text => tracing::Dispatch::new(builder.finish()),
            LogFormat::Json => tracing::Dispatch::new(builder.json().flatten_event(true).finish()),
        };
        tracing::dispatcher::with_default(&dispatch, || {
            c.bench_function(&format!("access line, {name}: tracing's formatter"), |b| {
                b.iter(|| black_box(&line).trace(black_box(0.618779)))
            });
        });
    }
}

criterion_group!(benches, line);
criterion_main!(benches);
