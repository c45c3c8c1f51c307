//! intermission: a maintenance-mode reverse proxy.
//!
//! In normal mode it forwards every request untouched; when the upstream is down or an operator
//! says so, it answers by itself. The shape:
//!
//! ```text
//!  client ─► listener (TCP, hyper-util auto h1/h2c) ─► gateway ─► forward ─► upstream pool ─► app
//!                                                        │
//!                                    StateHandle: ArcSwap<Snapshot>, loaded once per request
//! ```
//!
//! Layout:
//! - `config`: the TOML file (`config::file`) and the validated `Config` with every problem
//!   named by its key.
//! - `app`: composition root; binds, spawns, reloads, drains. `shutdown`: the one stop signal.
//! - `listener`: accept loops and per-connection protocol settings; `workers`: the data
//!   plane's threads, one single-threaded runtime each, that the accept loops hand
//!   connections to.
//! - `gateway`: the per-request service; `body`: the body type both directions share.
//! - `pending`: connections not yet past their first request, capped per client address.
//!   `flood`: HTTP/2 client connections closed when they send mostly frames that do no work.
//! - `park`: idle HTTP/1.1 connections without hyper's state; `fast`: held requests answered
//!   on them without hyper, in the wire form `h1` writes.
//! - `forward`: forwarding (`headers` for hop-by-hop and `X-Forwarded-*`, `pool` for upstream
//!   connections, `sockets` for their bound from the open-file limit, `upgrade` for tunnels).
//! - `state`: the snapshot every request reads. `watched`: sockets that tell what moved on
//!   them, for the idleness checks.
//! - `logging`: text/JSON logs and the access log.
//!
//! Seams: `gateway` and `forward` read only the `Snapshot`. Only `app` spawns long-lived tasks
//! and starts the worker threads (`workers`).

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod control;
pub mod fast;
pub mod files;
pub mod flood;
pub mod forward;
pub mod gateway;
pub mod h1;
pub mod health;
pub mod hold;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod park;
pub mod passed;
pub mod pending;
pub mod relay;
pub mod reserved;
pub mod shutdown;
pub mod stall;
pub mod state;
pub mod time;
pub mod tls;
pub mod watched;
pub mod workers;
