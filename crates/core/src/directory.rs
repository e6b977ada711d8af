//! The flow directory: for the flows whose home this node is, which member serves each.
//!
//! A flow's home is the member that consistent hashing names for it, the node every entry
//! sends a packet of a flow it does not know (see [`crate::Node`]'s recovery). Servers tell
//! the home of each flow they serve ("I serve this"), again every refresh; a record nobody
//! refreshed for `ttl` is gone. A record names the member that sent it, so a member can claim
//! flows only for itself, and each member holds at most `quota` records here.

use std::time::Duration;

use foldhash::fast::FixedState;
use ringlb_wire::FlowKey;

use crate::{NodeId, Timestamp};

/// Why a claim was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefused {
    /// The member already holds its quota of records here.
    Quota,
    /// Another member holds a fresh record of the flow; the first claim stands until it lapses.
    Conflict,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    server: NodeId,
    refreshed: Timestamp,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Directory {
    map: hashbrown::HashMap<FlowKey, Entry, FixedState>,
    /// Records per server, indexed by [`NodeId`].
    per_server: Vec<u32>,
    quota: u32,
    ttl: Duration,
}

impl Directory {
    /// `seed` keys the hash, so that remote hosts cannot aim collisions at it.
    pub fn new(quota: u32, ttl: Duration, seed: u64) -> Self {
        Directory {
            map: hashbrown::HashMap::with_hasher(FixedState::with_seed(seed)),
            per_server: Vec::new(),
            quota,
            ttl,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn fresh(&self, e: &Entry, now: Timestamp) -> bool {
        now.saturating_since(e.refreshed) < self.ttl
    }

    fn count(&mut self, server: NodeId) -> &mut u32 {
        if self.per_server.len() <= server.index() {
            self.per_server.resize(server.index() + 1, 0);
        }
        &mut self.per_server[server.index()]
    }

    /// `server` says at `now` that it serves `key`.
    pub fn claim(&mut self, now: Timestamp, key: FlowKey, server: NodeId) -> Result<(), ClaimRefused> {
        if let Some(e) = self.map.get(&key).copied() {
            if e.server == server {
                self.map.insert(key, Entry { server, refreshed: now });
                return Ok(());
            }
            if self.fresh(&e, now) {
                return Err(ClaimRefused::Conflict);
            }
            *self.count(e.server) -= 1;
            self.map.remove(&key);
        }
        if *self.count(server) >= self.quota {
            return Err(ClaimRefused::Quota);
        }
        *self.count(server) += 1;
        self.map.insert(key, Entry { server, refreshed: now });
        Ok(())
    }

    /// Who serves `key`, if a fresh record says so.
    pub fn lookup(&self, now: Timestamp, key: &FlowKey) -> Option<NodeId> {
        self.map.get(key).filter(|e| self.fresh(e, now)).map(|e| e.server)
    }

    /// Forgets the records that lapsed; walks them all, so call it a few times per `ttl`.
    pub fn expire(&mut self, now: Timestamp) {
        let (ttl, counts) = (self.ttl, &mut self.per_server);
        self.map.retain(|_, e| {
            let keep = now.saturating_since(e.refreshed) < ttl;
            if !keep {
                counts[e.server.index()] -= 1;
            }
            keep
        });
    }

    /// Forgets every record of `server` (a member forgotten by the cluster: its id may be reused).
    pub fn forget_server(&mut self, server: NodeId) {
        self.map.retain(|_, e| e.server != server);
        if let Some(c) = self.per_server.get_mut(server.index()) {
            *c = 0;
        }
    }

    /// Records held for `server`.
    #[cfg(test)]
    pub fn records_of(&self, server: NodeId) -> u32 {
        self.per_server.get(server.index()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(port: u16) -> FlowKey {
        let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
        FlowKey::new(ip(1), ip(10), port, 80, 6)
    }

    const S: Duration = Duration::from_secs(1);

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_duration(S * u32::try_from(secs).unwrap())
    }

    #[test]
    fn a_claim_is_found_until_it_lapses_and_refreshing_keeps_it() {
        let mut d = Directory::new(10, 30 * S, 1);
        d.claim(at(0), key(1), NodeId(2)).unwrap();
        assert_eq!(d.lookup(at(29), &key(1)), Some(NodeId(2)));
        d.claim(at(20), key(1), NodeId(2)).unwrap();
        assert_eq!(d.lookup(at(49), &key(1)), Some(NodeId(2)));
        assert_eq!(d.lookup(at(50), &key(1)), None);
        d.expire(at(50));
        assert!(d.is_empty());
        assert_eq!(d.records_of(NodeId(2)), 0);
    }

    #[test]
    fn another_server_cannot_take_a_fresh_record_but_may_take_a_lapsed_one() {
        let mut d = Directory::new(10, 30 * S, 1);
        d.claim(at(0), key(1), NodeId(2)).unwrap();
        assert_eq!(d.claim(at(10), key(1), NodeId(3)), Err(ClaimRefused::Conflict));
        assert_eq!(d.lookup(at(10), &key(1)), Some(NodeId(2)));
        d.claim(at(31), key(1), NodeId(3)).unwrap();
        assert_eq!(d.lookup(at(31), &key(1)), Some(NodeId(3)));
        assert_eq!((d.records_of(NodeId(2)), d.records_of(NodeId(3))), (0, 1));
    }

    #[test]
    fn each_server_holds_at_most_its_quota_and_forgetting_a_server_frees_it() {
        let mut d = Directory::new(3, 30 * S, 1);
        for p in 0..3 {
            d.claim(at(0), key(p), NodeId(1)).unwrap();
        }
        assert_eq!(d.claim(at(0), key(9), NodeId(1)), Err(ClaimRefused::Quota));
        // Another server's quota is its own.
        d.claim(at(0), key(9), NodeId(2)).unwrap();
        d.forget_server(NodeId(1));
        assert_eq!(d.len(), 1);
        d.claim(at(0), key(5), NodeId(1)).unwrap();
    }
}
