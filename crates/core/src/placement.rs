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
    pub(crate) fn takes_flows(&self) -> bool {
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
    /// No member takes new flows: the caller tries a peer in doubt if it takes no flows itself
    /// (`Node::place_on_doubtful`), and otherwise serves locally as a last resort.
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
///
/// Nodes must agree on it. When all weights are equal it finds the same winner without a
/// logarithm per member (a flood placed by hash calls it for every packet).
pub(crate) fn consistent_hash(key: &FlowKey, candidates: &[Candidate]) -> Placement {
    let flow = key.stable_hash();
    largest_draw(flow, candidates).unwrap_or_else(|| rendezvous(flow, candidates))
}

/// The member's draw for the flow: 53 random bits.
fn draw(flow: u64, c: &Candidate) -> u64 {
    ringlb_wire::mix64(flow ^ c.name_hash) >> 11
}

/// The definition of [`consistent_hash`].
fn rendezvous(flow: u64, candidates: &[Candidate]) -> Placement {
    candidates
        .iter()
        .filter(|c| c.takes_flows())
        .map(|c| {
            // 53 random bits into (0, 1).
            let u = (draw(flow, c) as f64 + 0.5) / (1u64 << 53) as f64;
            (c.id, -c.weight / u.ln())
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(Placement::NoCandidate, |(id, _)| Placement::Chosen(id))
}

/// [`rendezvous`]'s answer when every member that takes flows has the same weight: the score
/// rises with the draw, so the largest draw wins. `None` (compute the scores) when weights
/// differ, or when rounding could order the scores otherwise than the draws: the two largest
/// draws within `MARGIN` of each other (ties go to the last), or the largest so close to 2^53
/// that `u` rounds to 1 (its score is then -inf). Outside those, two draws `MARGIN` apart differ
/// in score by at least 2^-42 relative (`-ln u` is at most 37.4), about a thousand times the
/// rounding error of `ln` and the division.
fn largest_draw(flow: u64, candidates: &[Candidate]) -> Option<Placement> {
    const MARGIN: u64 = 1 << 16;
    let mut weight = None;
    let (mut best, mut top, mut second) = (None, 0, None);
    for c in candidates.iter().filter(|c| c.takes_flows()) {
        if *weight.get_or_insert(c.weight) != c.weight {
            return None;
        }
        let d = draw(flow, c);
        if best.is_none() || d > top {
            if best.is_some() {
                second = Some(top);
            }
            (best, top) = (Some(c.id), d);
        } else if second.is_none_or(|s| d > s) {
            second = Some(d);
        }
    }
    let Some(best) = best else { return Some(Placement::NoCandidate) };
    let clear = second.is_none_or(|s| top - s > MARGIN) && top < (1 << 53) - MARGIN;
    clear.then_some(Placement::Chosen(best))
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

    #[test]
    fn consistent_hash_is_pinned() {
        // Nodes must agree: these answers are what every version so far computes.
        let check = |weights: [f64; 5], want: [u16; 24]| {
            let c: Vec<Candidate> = (0..5).map(|i| cand(i, weights[usize::from(i)], 0.0, true)).collect();
            let got: Vec<u16> = (0..24)
                .map(|p| match consistent_hash(&key(p * 977), &c) {
                    Placement::Chosen(id) => id.0,
                    Placement::NoCandidate => 99,
                })
                .collect();
            assert_eq!(got, want, "weights {weights:?}");
        };
        check([1.0; 5], [4, 1, 0, 3, 3, 4, 0, 3, 3, 2, 3, 0, 4, 3, 1, 1, 2, 0, 2, 3, 4, 0, 2, 3]);
        check([1.0, 2.0, 0.5, 1.0, 3.0], [4, 1, 0, 3, 3, 4, 0, 3, 3, 4, 3, 0, 4, 4, 1, 1, 4, 0, 2, 4, 4, 0, 4, 3]);
    }

    /// The inverse of `mix64`, to give members the draws a test needs.
    fn unmix64(mut z: u64) -> u64 {
        z ^= z >> 31 ^ z >> 62;
        z = z.wrapping_mul(0x3196_42b2_d24d_8ec3);
        z ^= z >> 27 ^ z >> 54;
        z = z.wrapping_mul(0x96de_1b17_3f11_9089);
        z ^ z >> 30 ^ z >> 60
    }

    /// A member whose draw for `key` is `draw`.
    fn with_draw(i: u16, key: &FlowKey, draw: u64) -> Candidate {
        let name_hash = unmix64(draw << 11 | 0x7ff) ^ key.stable_hash();
        Candidate { name_hash, ..cand(i, 1.0, 0.0, true) }
    }

    #[test]
    fn the_shortcut_steps_aside_where_rounding_could_decide() {
        assert_eq!(unmix64(ringlb_wire::mix64(0x1234_5678_9abc_def0)), 0x1234_5678_9abc_def0);
        let k = key(7);
        let top = (1u64 << 53) - 1;
        for draws in [
            vec![5, 5],                       // a tie: the last one wins
            vec![1 << 40, (1 << 40) + 3, 17], // close
            vec![top, 1 << 52],               // u rounds to 1: score -inf, never wins
            vec![top - 1, top, 3],
            vec![1 << 52, 1 << 30], // clear: the shortcut answers
            vec![0, 1],
        ] {
            let c: Vec<Candidate> = draws.iter().zip(0..).map(|(&d, i)| with_draw(i, &k, d)).collect();
            for (c, &d) in c.iter().zip(&draws) {
                assert_eq!(draw(k.stable_hash(), c), d);
            }
            assert_eq!(consistent_hash(&k, &c), rendezvous(k.stable_hash(), &c), "draws {draws:?}");
        }
    }

    proptest! {
        #[test]
        fn the_shortcut_agrees_with_the_definition(
            members in 1usize..64, equal in any::<bool>(), seed in any::<u64>(), port in any::<u16>(),
        ) {
            let mut rng = Rng::seed(seed);
            let c: Vec<Candidate> = (0..members)
                .map(|i| {
                    let weight = if equal { 1.0 } else { [0.5, 1.0, 2.0][rng.below(3)] };
                    Candidate { name_hash: rng.next_u64(), ..cand(u16::try_from(i).unwrap(), weight, 0.0, rng.below(4) > 0) }
                })
                .collect();
            prop_assert_eq!(consistent_hash(&key(port), &c), rendezvous(key(port).stable_hash(), &c));
        }

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
