//! The state every request reads: one immutable `Snapshot` behind one `ArcSwap`.

mod snapshot;

pub use snapshot::{Snapshot, StateHandle};
