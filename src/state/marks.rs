//! `Marks`: tells a request still waiting for a server's response head that its health checks
//! have just taken that server out, so that it is answered then (retried on another healthy
//! server, or with the outage response) rather than at `upstream.response_timeout`.
//!
//! A server that hangs (it takes connections and never answers) is out after `fall` failed
//! checks, seconds in; every request already waiting for it would otherwise wait the whole
//! `response_timeout` (a minute by default) while new requests read the outage message at
//! once. HAProxy's `on-marked-down shutdown-sessions` does the same.
//!
//! Lives as long as the process (`snapshot::Parts` carries it across reloads); only the
//! controller publishes into it, after each snapshot it stores. The data plane pays nothing
//! for requests answered within `FIRST_LOOK`: only a request still waiting then looks here
//! (one `ArcSwap` load) and registers to be woken (`Notify`, one lock); until then its only
//! clock is the one its `response_timeout` already had, set earlier.

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long a request waits for its response head before it watches for its server being
/// taken out. Any delay is correct (the request looks at the marks of the moment when it
/// starts watching); this one only bounds how late a request younger than it learns of a
/// mark-down, which itself takes `fall` checks, seconds.
pub const FIRST_LOOK: Duration = Duration::from_secs(1);

/// The first stage of a wait for a response head of `timeout`: `FIRST_LOOK`, or the whole
/// timeout when that is shorter (there is then nothing to watch for).
pub fn first_look(timeout: Duration) -> Duration {
    timeout.min(FIRST_LOOK)
}

/// The servers taken out by their health checks, by name, and the waiters to wake when one is.
#[derive(Default)]
pub struct Marks {
    /// The servers marked down as of the last snapshot published; none while `force-open` is
    /// on, when requests go to them anyway and nothing waiting for them is to be cut.
    down: ArcSwap<Vec<Arc<str>>>,
    /// Woken when a server joins `down`.
    changed: Notify,
}

impl Marks {
    /// Records `down` (the servers marked down now) and wakes the waiters when a server is
    /// among them that was not before. Only the controller calls this.
    pub fn publish(&self, down: Vec<Arc<str>>) {
        let before = self.down.load();
        let newly = down.iter().any(|name| !before.contains(name));
        if !newly && down.len() == before.len() {
            return;
        }
        self.down.store(Arc::new(down));
        if newly {
            self.changed.notify_waiters();
        }
    }

    /// Whether server `name` is marked down now.
    pub fn is_down(&self, name: &str) -> bool {
        self.down.load().iter().any(|n| **n == *name)
    }

    /// Resolves once server `name` is marked down (at once if it is already). Registered
    /// before it looks, so a mark-down published in between is not missed.
    pub async fn marked_down(&self, name: &str) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_down(name) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll};

    fn names(list: &[&str]) -> Vec<Arc<str>> {
        list.iter().map(|&n| Arc::from(n)).collect()
    }

    #[test]
    fn a_waiter_is_woken_by_its_server_s_mark_down_alone() {
        let marks = Marks::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut waiting = pin!(marks.marked_down("http://a"));
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        marks.publish(names(&["http://b"]));
        assert!(
            waiting.as_mut().poll(&mut cx).is_pending(),
            "another server"
        );
        marks.publish(names(&["http://b", "http://a"]));
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(()));
        assert!(marks.is_down("http://a"));
        // Already down when the wait starts: at once.
        assert!(pin!(marks.marked_down("http://a")).poll(&mut cx).is_ready());
        marks.publish(Vec::new());
        assert!(!marks.is_down("http://a"));
    }
}
