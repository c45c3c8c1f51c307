//! The process's open-file limit: raised at start to the most it may be, compared with
//! `proxy.max_connections`, so that running out of descriptors is told at start rather than
//! found in an incident, and divided: what the clients and the proxy's own files do not need
//! bounds the sockets open to upstream servers (`forward::sockets`).

/// Descriptors kept for the proxy's own whatever its clients and upstream connections: the
/// listeners, the control socket and its clients, the admin listener and its scrapes, the
/// runtime's epoll and wakers, the state file, logs, health checks, webhooks.
pub const RESERVE: u64 = 128;

/// The fewest upstream sockets allowed, whatever the limit: with fewer the proxy forwards
/// next to nothing.
const MIN_UPSTREAM: u64 = 16;

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

/// Descriptors `max_connections` busy clients need so that each may forward a request at
/// once: one each, one for its connection to the server, and the proxy's own.
fn needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(RESERVE)
}

/// How many sockets to upstream servers may be open at once under the open-file `limit`:
/// what `max_connections` clients and `RESERVE` leave, so that however many requests
/// clients multiplex (an HTTP/2 client's streams each take a connection to an `http://`
/// server) the control socket, the admin listener and the health checks still find a
/// descriptor. When `max_connections` leaves less than half of what is beyond `RESERVE`
/// (the start-up warning says so), half: a limit sized for fewer clients than allowed must
/// not leave a handful of upstream connections for all of them.
pub fn upstream_sockets(limit: u64, max_connections: usize) -> usize {
    let beyond = limit.saturating_sub(RESERVE);
    let left = beyond.saturating_sub(max_connections as u64);
    let bound = left.max(beyond / 2).max(MIN_UPSTREAM);
    usize::try_from(bound).unwrap_or(usize::MAX)
}

/// Warns when `limit` leaves `max_connections` busy clients short of descriptors, and says
/// what bounds the upstream connections; the warning, for a reload to return it too.
pub fn warn_if_short(limit: u64, max_connections: usize) -> Option<String> {
    let needed = needed(max_connections);
    let upstream = upstream_sockets(limit, max_connections);
    if limit < needed {
        let warning = format!(
            "proxy.max_connections = {max_connections} may need {needed} open files (a client \
             and its connection to the server each, and {RESERVE} of the proxy's own), but the \
             limit is {limit}: raise it (LimitNOFILE= in a systemd unit, ulimit -n) or lower \
             proxy.max_connections; connections to the servers are bounded at {upstream} at \
             once, and requests beyond them wait up to upstream.connect_timeout for one, then \
             get the outage response"
        );
        tracing::warn!("{warning}");
        Some(warning)
    } else {
        tracing::info!(
            "connections to the servers are bounded at {upstream} at once (the open-file limit \
             {limit}, less proxy.max_connections = {max_connections} and {RESERVE} of the \
             proxy's own): an HTTP/2 client's requests each hold one"
        );
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_client_may_hold_two_descriptors() {
        assert_eq!(super::needed(0), 128);
        assert_eq!(super::needed(20_000), 40_128);
        assert_eq!(super::needed(usize::MAX), u64::MAX);
    }

    #[test]
    fn upstream_sockets_get_what_clients_and_the_proxy_leave() {
        use super::upstream_sockets;
        // A limit with room for the clients and the reserve: the rest.
        assert_eq!(upstream_sockets(2048, 900), 2048 - 900 - 128);
        assert_eq!(upstream_sockets(524_288, 20_000), 524_288 - 20_000 - 128);
        // More clients allowed than the limit has room for with two each (the finding's
        // 990 of 2048): half of what the reserve leaves, and the warning says so.
        assert_eq!(upstream_sockets(2048, 990), (2048 - 128) / 2);
        assert_eq!(upstream_sockets(4096, 20_000), (4096 - 128) / 2);
        // A limit too small for anything: a floor.
        assert_eq!(upstream_sockets(100, 10), 16);
        assert_eq!(upstream_sockets(0, usize::MAX), 16);
        assert!(upstream_sockets(u64::MAX, 0) > 1 << 40);
    }
}
