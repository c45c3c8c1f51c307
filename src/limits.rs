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
    let (soft, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("cannot read the open-file limit: {e}");
            return None;
        }
    };
    if soft >= hard {
        return Some(soft);
    }
    match rlimit::Resource::NOFILE.set(hard, hard) {
        Ok(()) => {
            tracing::info!("open-file limit raised from {soft} to {hard} (the hard limit)");
            Some(hard)
        }
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            Some(soft)
        }
    }
}

/// The open-file limit in force.
pub fn open_files() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// Descriptors `max_connections` busy clients may need: one each, and one for the connection
/// to the server each forwarded request holds.
pub fn needed(max_connections: usize) -> u64 {
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
             until then, clients beyond it are refused"
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
