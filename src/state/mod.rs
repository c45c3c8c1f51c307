//! The state every request reads, and the one writer that changes it.
//!
//! `mode`: pure transitions; `store`: the state file; `snapshot`: what requests read;
//! `controller`: the task that applies every change in order; `marks`: the servers taken out,
//! for requests still waiting for their answers.

pub mod controller;
pub mod marks;
pub mod mode;
pub mod snapshot;
pub mod store;

pub use mode::Mode;
pub use snapshot::{Snapshot, StateHandle};
