//! The process's open-file limit: raised at start to the most it may be, and compared with
//! `proxy.max_connections`, so that running out of descriptors is told at start rather than
//! found in an incident.

/// Descriptors the proxy holds whatever its clients: listeners, the control socket, the
/// runtime's epoll and wakers, logs, health checks, webhooks.
const OWN: u64 = 64;

/// Raises the soft limit on open files to the hard one, as Go's runtime does for every
/// program: systemd starts services with a soft limit of 1,024 under a hard one of 524,288,
/// and the soft one is a compatibility default for `select()`, which nothing here uses.
/// Returns the limit in force; a failure to raise it leaves it as it was (logged).
pub fn raise_open_files() -> Option<u64> {
    let Some(before) = open_files() else {
        tracing::warn!("cannot read the open-file limit");
        return None;
    };
    // Up to the hard limit, or what the system allows a process where the hard limit says
    // "unlimited" (macOS), which rlimit looks up.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) if now > before => {
            tracing::info!("open-file limit raised from {before} to {now} (the hard limit)");
            Some(now)
        }
        Ok(now) => Some(now),
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit from {before}: {e}");
            Some(before)
        }
    }
}

/// The open-file limit in force.
pub fn open_files() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// Descriptors `max_connections` busy clients may need: one each, and one for the connection
/// to the server a forwarded request holds. An estimate, not a bound: an HTTP/2 client's
/// requests at once each hold one of their own.
fn needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(OWN)
}

/// Warns when `limit` leaves `max_connections` busy clients short of descriptors.
pub fn warn_if_short(limit: u64, max_connections: usize) {
    let needed = needed(max_connections);
    if limit < needed {
        tracing::warn!(
            "proxy.max_connections = {max_connections} may need {needed} open files (a client \
             and its connection to the server each), but the limit is {limit}: raise it \
             (LimitNOFILE= in a systemd unit, ulimit -n) or lower proxy.max_connections; \
             once they run out, new clients wait unanswered and requests that need a new \
             connection to the server get the outage response"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_client_may_hold_two_descriptors() {
        assert_eq!(super::needed(0), 64);
        assert_eq!(super::needed(20_000), 40_064);
        assert_eq!(super::needed(usize::MAX), u64::MAX);
    }
}
