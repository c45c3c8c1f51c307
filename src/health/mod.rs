//! Upstream health: active checks, passive reports from the request path, and the rise/fall
//! hysteresis that turns results into flips.
//!
//! Each server has one checker task, the single writer of that server's health; it tells the
//! controller only when health flips. The data plane never waits on it: it reads the healthy
//! set from the snapshot and drops failure reports into a bounded channel with `try_send`.

pub mod checker;
pub mod counter;
pub mod probe;

pub use checker::{spawn, Checkers, Flip, HealthTable, Passive, Report};
