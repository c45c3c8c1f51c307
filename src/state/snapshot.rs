//! `Snapshot`: everything a request needs, swapped whole so no request sees half a change.
//!
//! Requests `load()` once and decide everything from that one `Arc`; only the controller (and,
//! until it exists, the app at start and reload) stores a new one.

use crate::config::Config;
use crate::forward::pool::UpstreamPool;
use arc_swap::ArcSwap;
use std::sync::Arc;

pub struct Snapshot {
    pub config: Arc<Config>,
    pub pool: Arc<UpstreamPool>,
}

impl Snapshot {
    /// Builds a snapshot for `config`, keeping `previous`'s connection pool when the upstream
    /// settings did not change (a reload must not drop warm connections).
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let pool = match previous {
            Some(prev) if prev.pool.same_config(&config.upstream) => prev.pool.clone(),
            _ => Arc::new(UpstreamPool::new(&config.upstream)),
        };
        Snapshot { config, pool }
    }
}

/// A cheap, cloneable handle on the current snapshot.
#[derive(Clone)]
pub struct StateHandle(Arc<ArcSwap<Snapshot>>);

impl StateHandle {
    pub fn new(snapshot: Snapshot) -> StateHandle {
        StateHandle(Arc::new(ArcSwap::from_pointee(snapshot)))
    }

    /// The current snapshot; hold it for the whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    pub fn store(&self, snapshot: Snapshot) {
        self.0.store(Arc::new(snapshot));
    }
}
