//! Placement: which node serves a new flow.
//!
//! Two policies:
//! - [`Policy::PowerOfTwo`] (default): serve locally while this node's utilisation (load per
//!   unit of capacity weight) is not above the cluster's by more than `margin`; otherwise take
//!   two distinct random peers that take new flows and forward to the one with more spare
//!   capacity. Never "the single least loaded": with stale load data every entry would herd onto
//!   the same node, while two random choices spread even then.
//! - [`Policy::ConsistentHash`]: weighted rendezvous hashing of the 5-tuple over the members
//!   that take new flows. Every node computes the same answer without talking, so it is also
//!   the fallback for packets of flows this entry has not seen begin (e.g. after a restart, or
//!   when ECMP moves a connection to another entry). Such a guess can be wrong; then the server
//!   it reaches answers with a RST and the client reconnects.

use ringlb_wire::FlowKey;

use crate::{NodeId, Rng};

/// Which policy places new flows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    PowerOfTwo {
        /// How far above the cluster's utilisation this node may be and still serve locally,
        /// as a fraction (0.1 = 10 %).
        margin: f64,
    },
    ConsistentHash,
}

/// One member as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: NodeId,
    /// Relative capacity; a member with weight 0 is never chosen.
    pub weight: f64,
    /// Load in flows (already discounted for staleness by the caller).
    pub load: f64,
    /// Whether it may take new flows (alive, not draining).
    pub eligible: bool,
    /// Stable per-member hash for rendezvous hashing.
    pub name_hash: u64,
}

impl Candidate {
    fn takes_flows(&self) -> bool {
        self.eligible && self.weight > 0.0
    }

    fn utilisation(&self) -> f64 {
        self.load / self.weight
    }
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Chosen by the policy.
    Chosen(NodeId),
    /// No member takes new flows: the caller serves locally as a last resort.
    NoCandidate,
}

impl Policy {
    /// Places a new flow. `local` is this node's index in `candidates`.
    pub fn place(&self, key: &FlowKey, candidates: &[Candidate], local: usize, rng: &mut Rng) -> Placement {
        match *self {
            Policy::ConsistentHash => consistent_hash(key, candidates),
            Policy::PowerOfTwo { margin } => power_of_two(candidates, local, margin, rng),
        }
    }
}

fn power_of_two(candidates: &[Candidate], local: usize, margin: f64, rng: &mut Rng) -> Placement {
    // One pass for the cluster's utilisation and the number of peers to choose from.
    let (mut load, mut weight, mut peers) = (0.0, 0.0, 0usize);
    for (i, c) in candidates.iter().enumerate() {
        if c.takes_flows() {
            load += c.load;
            weight += c.weight;
            peers += usize::from(i != local);
        }
    }
    if weight == 0.0 {
        return Placement::NoCandidate;
    }
    let me = &candidates[local];
    if me.takes_flows() && me.utilisation() <= load / weight * (1.0 + margin) {
        return Placement::Chosen(me.id);
    }
    // Two distinct random peers by rank among the eligible, found in one more pass.
    let (a, b) = match peers {
        0 => return Placement::Chosen(me.id), // only this node takes flows
        1 => (0, 0),
        n => {
            let a = rng.below(n);
            let mut b = rng.below(n - 1);
            if b >= a {
                b += 1;
            }
            (a, b)
        }
    };
    let (mut x, mut y) = (None, None);
    let eligible_peers = candidates.iter().enumerate().filter(|&(i, c)| i != local && c.takes_flows());
    for (rank, (_, c)) in eligible_peers.enumerate() {
        if rank == a {
            x = Some(c);
        }
        if rank == b {
            y = Some(c);
        }
        if x.is_some() && y.is_some() {
            break;
        }
    }
    match (x, y) {
        (Some(x), Some(y)) => Placement::Chosen(if y.utilisation() < x.utilisation() { y.id } else { x.id }),
        _ => Placement::NoCandidate,
    }
}

/// Weighted rendezvous hashing: each member scores `-weight / ln(u)` with `u` a uniform draw
/// from hash(flow, member); the highest score wins. Removing a member moves only its flows.
pub(crate) fn consistent_hash(key: &FlowKey, candidates: &[Candidate]) -> Placement {
    let flow = key.stable_hash();
    candidates
        .iter()
        .filter(|c| c.takes_flows())
        .map(|c| {
            let h = ringlb_wire::mix64(flow ^ c.name_hash);
            // 53 random bits into (0, 1).
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (c.id, -c.weight / u.ln())
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(Placement::NoCandidate, |(id, _)| Placement::Chosen(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(port: u16) -> FlowKey {
        FlowKey::new(IpAddr::V4(Ipv4Addr::new(10, 78, 0, 100)), IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10)), port, 80, 6)
    }

    fn cand(i: u16, weight: f64, load: f64, eligible: bool) -> Candidate {
        Candidate { id: NodeId(i), weight, load, eligible, name_hash: u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) }
    }

    #[test]
    fn serves_locally_until_above_the_cluster() {
        let mut rng = Rng::seed(1);
        let p = Policy::PowerOfTwo { margin: 0.1 };
        let idle = [cand(0, 1.0, 0.0, true), cand(1, 1.0, 0.0, true), cand(2, 1.0, 0.0, true)];
        assert_eq!(p.place(&key(1), &idle, 0, &mut rng), Placement::Chosen(NodeId(0)));
        let busy = [cand(0, 1.0, 10.0, true), cand(1, 1.0, 2.0, true), cand(2, 1.0, 5.0, true)];
        // Only two peers: both are drawn, the less loaded wins.
        assert_eq!(p.place(&key(1), &busy, 0, &mut rng), Placement::Chosen(NodeId(1)));
        // Within the margin: local.
        let close = [cand(0, 1.0, 10.5, true), cand(1, 1.0, 10.0, true), cand(2, 1.0, 10.0, true)];
        assert_eq!(p.place(&key(1), &close, 0, &mut rng), Placement::Chosen(NodeId(0)));
        // Weight counts: node 2 has twice the capacity, so 5 flows on it is less busy than 3 on node 1.
        let weighted = [cand(0, 1.0, 9.0, true), cand(1, 1.0, 3.0, true), cand(2, 2.0, 5.0, true)];
        assert_eq!(p.place(&key(1), &weighted, 0, &mut rng), Placement::Chosen(NodeId(2)));
        // A forward-only entry (weight 0) never serves.
        let entry_only = [cand(0, 0.0, 0.0, true), cand(1, 1.0, 0.0, true)];
        assert_eq!(p.place(&key(1), &entry_only, 0, &mut rng), Placement::Chosen(NodeId(1)));
        // Nobody takes flows.
        let none = [cand(0, 0.0, 0.0, true), cand(1, 1.0, 0.0, false)];
        assert_eq!(p.place(&key(1), &none, 0, &mut rng), Placement::NoCandidate);
    }

    #[test]
    fn spreads_sequential_flows_evenly() {
        // The single-entry case with load = flows placed so far: flows go round the ring, and
        // the margin lets the entry keep at most that much more than its share.
        let run = |margin: f64| {
            let mut rng = Rng::seed(3);
            let p = Policy::PowerOfTwo { margin };
            let mut c = [cand(0, 1.0, 0.0, true), cand(1, 1.0, 0.0, true), cand(2, 1.0, 0.0, true)];
            for i in 0..300 {
                if let Placement::Chosen(id) = p.place(&key(i), &c, 0, &mut rng) {
                    c[id.index()].load += 1.0;
                }
            }
            c.map(|c| c.load)
        };
        assert_eq!(run(0.0), [100.0, 100.0, 100.0]);
        let [local, a, b] = run(0.1);
        assert!(local <= 110.0 && local > 100.0, "local {local}");
        assert!((a - b).abs() <= 1.0, "peers {a} {b}");
    }

    #[test]
    fn consistent_hash_moves_only_the_lost_members_flows() {
        let all = [cand(0, 1.0, 0.0, true), cand(1, 1.0, 0.0, true), cand(2, 1.0, 0.0, true)];
        let mut without_1 = all;
        without_1[1].eligible = false;
        let mut counts = [0u32; 3];
        for port in 0..3000 {
            let Placement::Chosen(before) = consistent_hash(&key(port), &all) else { panic!() };
            let Placement::Chosen(after) = consistent_hash(&key(port), &without_1) else { panic!() };
            counts[before.index()] += 1;
            if before != NodeId(1) {
                assert_eq!(before, after, "flow of a surviving member moved");
            }
            assert_ne!(after, NodeId(1));
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    proptest! {
        #[test]
        fn never_picks_an_ineligible_or_weightless_member(
            members in proptest::collection::vec((0.0f64..4.0, 0.0f64..100.0, any::<bool>()), 1..40),
            local in any::<prop::sample::Index>(),
            seed in any::<u64>(), port in any::<u16>(), hash in any::<bool>(),
        ) {
            let cands: Vec<Candidate> = members.iter().enumerate()
                .map(|(i, &(w, l, e))| cand(u16::try_from(i).unwrap(), w, l, e)).collect();
            let local = local.index(cands.len());
            let policy = if hash { Policy::ConsistentHash } else { Policy::PowerOfTwo { margin: 0.1 } };
            match policy.place(&key(port), &cands, local, &mut Rng::seed(seed)) {
                Placement::Chosen(id) => {
                    let c = &cands[id.index()];
                    prop_assert!(c.eligible && c.weight > 0.0, "picked {c:?}");
                }
                Placement::NoCandidate => prop_assert!(cands.iter().all(|c| !c.eligible || c.weight == 0.0)),
            }
        }
    }
}
