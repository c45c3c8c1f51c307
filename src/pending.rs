//! Connections not yet past their first request, counted by client address and capped at
//! `proxy.max_pending_per_client`.
//!
//! At `proxy.max_connections` an idle connection makes room for a new one (`listener::Limit`),
//! but a connection that is doing something cannot be told from one pretending to: a TLS
//! handshake younger than 2 s, a request head begun and not whole. One host that opens such
//! connections faster than they age (a few bytes of a ClientHello, `G` and nothing more) held
//! every slot, and every other client was turned away on both ports. Capped per address, such
//! a host holds its cap's worth of slots and no more, while a client elsewhere is served.
//!
//! Only the start of a connection is counted, from its accept to its first request (or its
//! end): an established connection is never limited by this, so that the thousands of users
//! a university or a mobile carrier puts behind one address keep every connection they have
//! made, and the cap only bounds how many they may be opening at the same instant, which for
//! a real client lasts a round trip or two.
//!
//! An IPv6 client is counted by its /64, the block one network (a LAN, a phone) gets: a host
//! picks any address in it at will (privacy addresses), so counting it by address would let
//! it multiply the cap by as many addresses as it likes. A subscriber given a /56 or a /48
//! (RFC 6177 recommends more than a /64 for an end site) still has 256 or 65,536 of them, each
//! capped apart: the cap bounds one network's share, not one subscriber's. An IPv4 address
//! that arrives on a dual-stack socket as `::ffff:a.b.c.d` is counted as that IPv4 address,
//! not under the /64 that every such address shares.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The address a connection from `peer` is counted under: an IPv4 address, or the /64 of an
/// IPv6 one (its other 64 bits zero).
pub fn client_of(peer: IpAddr) -> IpAddr {
    match crate::config::canonical_ip(peer) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// A client as the log names it: an IPv6 one as its /64.
pub struct Shown(pub IpAddr);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// How many connections each client has that are not yet past their first request. A lock
/// rather than anything cleverer: it is taken for one map operation when a connection is
/// accepted and once when its first request arrives or it closes, never across an await. An
/// entry goes when its count reaches 0, so the map holds no more entries than there are such
/// connections, and its room is given back once it is mostly empty.
#[derive(Default)]
pub struct PerClient {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

impl PerClient {
    /// Counts a new connection of `client` (from `client_of`), unless it has `max` counted
    /// already. No cap at all (`max_pending_per_client = 0`) is the caller's to see
    /// (`listener::pending_cap`): it counts nothing, where `max` 0 here refuses every one.
    pub fn begin(self: &Arc<PerClient>, client: IpAddr, max: usize) -> Option<Begun> {
        let mut counts = self.counts();
        match counts.get_mut(&client) {
            Some(n) if *n as usize >= max || *n == u32::MAX => return None,
            Some(n) => *n += 1,
            None if max == 0 => return None,
            None => {
                counts.insert(client, 1);
            }
        }
        Some(Begun {
            counted: Some(self.clone()),
            client,
        })
    }

    fn end(&self, client: IpAddr) {
        let mut counts = self.counts();
        let Some(n) = counts.get_mut(&client) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&client);
            // After a flood from many addresses, the room it left is given back once the map
            // is mostly empty; halving at a quarter keeps each shrink's cost paid for by the
            // removals before it.
            if counts.capacity() > 64 && counts.len() < counts.capacity() / 4 {
                let len = counts.len();
                counts.shrink_to(len * 2);
            }
        }
    }

    fn counts(&self) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The clients counted now, and their connections.
    #[cfg(test)]
    fn counted(&self) -> Vec<(IpAddr, u32)> {
        let mut all: Vec<_> = self.counts().iter().map(|(&ip, &n)| (ip, n)).collect();
        all.sort();
        all
    }
}

/// A connection counted by `PerClient::begin`, until dropped or made a connection's
/// `Pending`: the accept loop's hold on the count while it may still close the connection
/// (at `max_connections`), so that no way out of it leaves the count behind.
pub struct Begun {
    counted: Option<Arc<PerClient>>,
    client: IpAddr,
}

impl Drop for Begun {
    fn drop(&mut self) {
        if let Some(counted) = self.counted.take() {
            counted.end(self.client);
        }
    }
}

/// A connection's place in its client's count (in `gateway::Conn`), until its first request
/// arrives (`arrived`) or it closes (the `Conn` is dropped). Not the client itself, which
/// the connection's peer gives again, so that every connection's `Conn` stays small.
#[derive(Default)]
pub struct Pending {
    counted: Option<Arc<PerClient>>,
    /// Still counted: read, not written, by every request after the first.
    pending: AtomicBool,
}

/// The count `begun` holds, now the connection's.
impl From<Begun> for Pending {
    fn from(mut begun: Begun) -> Pending {
        let counted = begun.counted.take();
        Pending {
            pending: AtomicBool::new(counted.is_some()),
            counted,
        }
    }
}

impl Pending {
    /// The first request of the connection from `peer` has arrived, or the connection has
    /// closed: it is counted no more. Later calls are a load each.
    #[inline]
    pub fn end(&self, peer: IpAddr) {
        if self.pending.load(Ordering::Relaxed) && self.pending.swap(false, Ordering::Relaxed) {
            if let Some(counted) = &self.counted {
                counted.end(client_of(peer));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{client_of, Pending, PerClient, Shown};
    use std::net::IpAddr;
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_one_its_address() {
        assert_eq!(client_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(
            client_of(ip("::ffff:192.0.2.7")),
            client_of(ip("::ffff:192.0.2.8"))
        );
        assert_eq!(client_of(ip("2001:db8:1:2:a:b:c:d")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_of(ip("2001:db8:1:2:ffff::1")),
            client_of(ip("2001:db8:1:2::99"))
        );
        assert_ne!(
            client_of(ip("2001:db8:1:2::1")),
            client_of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Shown(client_of(ip("2001:db8:1:2::9"))).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(Shown(ip("192.0.2.7")).to_string(), "192.0.2.7");
    }

    /// Up to the cap each client is counted on its own; beyond it, refused; every way a count
    /// ends (a request, a close, a connection closed before it was served) gives its place
    /// back once, and a client at 0 leaves the map.
    #[test]
    fn each_client_is_counted_up_to_the_cap_and_leaves_at_zero() {
        let per = Arc::new(PerClient::default());
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let first = per.begin(a, 2).unwrap();
        let second = Pending::from(per.begin(a, 2).unwrap());
        assert!(per.begin(a, 2).is_none(), "a third beyond the cap of 2");
        let other = Pending::from(per.begin(b, 2).unwrap());
        assert_eq!(per.counted(), vec![(a, 2), (b, 1)]);

        drop(first);
        assert_eq!(per.counted(), vec![(a, 1), (b, 1)]);
        second.end(a);
        second.end(a);
        assert_eq!(per.counted(), vec![(b, 1)], "ended twice, counted once");
        drop(second);
        other.end(b);
        assert!(per.counted().is_empty());
        // Not counted: ending it does nothing.
        Pending::default().end(a);
        assert!(per.begin(a, 1).is_some());
        assert!(per.counted().is_empty());
    }

    #[test]
    fn the_map_gives_its_room_back_once_mostly_empty() {
        let per = Arc::new(PerClient::default());
        let flood: Vec<_> = (0..4096u32)
            .map(|n| per.begin(IpAddr::from(n.to_be_bytes()), 1).unwrap())
            .collect();
        let big = per.counts().capacity();
        drop(flood);
        assert!(per.counts().is_empty());
        assert!(
            per.counts().capacity() < big / 4,
            "{}",
            per.counts().capacity()
        );
    }
}
