//! Locality-first placement over sites (see [`crate::sites`]): which site's members a new
//! flow's placement may choose among.

use std::time::Duration;

use super::Node;
use crate::sites::{shares, SitePolicy, SiteView};

/// Scratch space for [`Node::restrict_to_site`], reused so that placing allocates nothing
/// once warm.
#[derive(Debug, Default)]
pub(super) struct SiteScratch {
    pub(super) policy: SitePolicy,
    /// The operator's site weights (`sites.weights`); sites not named weigh 1.
    weights: Vec<(String, f64)>,
    /// Load-spill state ([`crate::sites::shares`]'s hysteresis).
    spilling: bool,
    /// Per candidate: the index of its site in `names`.
    site_of: Vec<usize>,
    names: Vec<String>,
    views: Vec<SiteView>,
    /// Sites in the order `shares` takes them: own first, then nearest first.
    order: Vec<usize>,
    ordered: Vec<SiteView>,
    shares: Vec<f64>,
}

/// What [`Node::restrict_to_site`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SiteChoice {
    /// All members share one site: place as if sites did not exist.
    OneSite,
    /// The candidates outside the chosen site are no longer eligible.
    Restricted { cross_site: bool },
    /// No site has a member that takes new flows.
    Nowhere,
}

impl Node {
    /// How entries share new flows between sites (`[sites]` in the configuration).
    pub fn set_site_policy(&mut self, policy: SitePolicy) {
        self.sites.policy = policy;
    }

    /// The operator's weight per site (see [`crate::sites::SiteView::weight`]).
    pub fn set_site_weights(&mut self, weights: Vec<(String, f64)>) {
        self.sites.weights = weights;
    }

    /// The control plane's latest round trip to the member `name`.
    pub fn set_rtt(&mut self, name: &str, rtt: Duration) {
        if let Some(m) = self.members.by_name(name).and_then(|id| self.members.get_mut(id)) {
            m.rtt = Some(rtt);
        }
    }

    /// Whether the load-spill to other sites is on (for status).
    pub fn spilling_to_other_sites(&self) -> bool {
        self.sites.spilling
    }

    /// Leaves eligible only the members of this node's own site, if any of them takes new
    /// flows (for placement by hash under pressure, which looks at no shares).
    pub(super) fn restrict_to_own_site_if_it_takes_flows(&mut self) {
        let Some(own) = self.members.get(self.config.local).map(|m| m.site.as_str()) else { return };
        let members = &self.members;
        let home = |c: &crate::Candidate| members.get(c.id).is_some_and(|m| m.site == own);
        if self.candidates.iter().any(|c| c.takes_flows() && home(c)) {
            for c in &mut self.candidates {
                if !home(c) {
                    c.eligible = false;
                }
            }
        }
    }

    /// Picks the site for a new flow from the candidates `fill_candidates` made, and leaves
    /// eligible only that site's members.
    pub(super) fn restrict_to_site(&mut self) -> SiteChoice {
        let s = &mut self.sites;
        s.site_of.clear();
        s.views.clear();
        let own = self.members.get(self.config.local).map_or("", |m| m.site.as_str());
        let mut count = 0;
        for c in &self.candidates {
            let Some(m) = self.members.get(c.id).filter(|m| !m.is_removed()) else {
                s.site_of.push(usize::MAX);
                continue;
            };
            // Site 0 is always the entry's own.
            if count == 0 {
                if s.names.is_empty() {
                    s.names.push(String::new());
                }
                s.names[0].clear();
                s.names[0].push_str(own);
                s.views.push(SiteView::default());
                count = 1;
            }
            let idx = match s.names[..count].iter().position(|n| *n == m.site) {
                Some(i) => i,
                None => {
                    if s.names.len() == count {
                        s.names.push(String::new());
                    }
                    s.names[count].clone_from(&m.site);
                    s.views.push(SiteView::default());
                    count += 1;
                    count - 1
                }
            };
            s.site_of.push(idx);
            let v = &mut s.views[idx];
            if !m.state.is_gone() {
                v.total_weight += m.weight;
            }
            if c.takes_flows() {
                v.healthy_weight += c.weight;
                v.load += c.load;
            }
            if let Some(rtt) = m.rtt {
                v.rtt = Some(v.rtt.map_or(rtt, |r| r.min(rtt)));
            }
        }
        if count <= 1 {
            return SiteChoice::OneSite;
        }
        s.views[0].rtt = None;
        for (view, name) in s.views.iter_mut().zip(&s.names) {
            view.weight = s.weights.iter().find(|(n, _)| n == name).map_or(1.0, |(_, w)| *w);
        }
        // Own site first, the others nearest first (unmeasured last, then by name).
        s.order.clear();
        s.order.extend(0..count);
        let (names, views) = (&s.names, &s.views);
        s.order[1..].sort_by(|&a, &b| {
            let rtt = |i: usize| views[i].rtt.unwrap_or(Duration::MAX);
            rtt(a).cmp(&rtt(b)).then_with(|| names[a].cmp(&names[b]))
        });
        s.ordered.clear();
        s.ordered.extend(s.order.iter().map(|&i| s.views[i]));
        shares(&s.policy, &s.ordered, &mut s.spilling, &mut s.shares);
        // A draw in [0, 1) picks the site by its share.
        let draw = self.rng.below(1 << 30) as f64 / f64::from(1u32 << 30);
        let mut acc = 0.0;
        let mut chosen = None;
        for (rank, share) in s.shares.iter().enumerate() {
            acc += share;
            if *share > 0.0 && draw < acc {
                chosen = Some(s.order[rank]);
                break;
            }
        }
        // Rounding can leave the draw just above the sum: the last site with a share takes it.
        let chosen = chosen.or_else(|| s.shares.iter().rposition(|x| *x > 0.0).map(|r| s.order[r]));
        let Some(chosen) = chosen else { return SiteChoice::Nowhere };
        for (c, site) in self.candidates.iter_mut().zip(&s.site_of) {
            if *site != chosen {
                c.eligible = false;
            }
        }
        SiteChoice::Restricted { cross_site: chosen != 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, ip, node_with, syn, target};
    use crate::sites::{SiteMode, SitePolicy};
    use crate::{Member, MemberState, NodeId, Policy};
    use std::time::Duration;

    /// n1 (local) and n2 in site a, n3 and n4 in b, n5 in c.
    fn cluster() -> crate::Node {
        let sites = ["a", "a", "b", "b", "c"];
        node_with(
            Policy::PowerOfTwo { margin: 0.1 },
            (1..=5u8).map(|i| {
                let mut m = Member::new(format!("n{i}"), ip([10, 77, 0, i]), 1.0);
                m.site = sites[usize::from(i - 1)].into();
                m
            }),
        )
    }

    /// Where `n` new flows go, per member index.
    fn place(node: &mut crate::Node, from: u16, n: u16) -> [u32; 5] {
        let mut got = [0; 5];
        for port in from..from + n {
            let id = target(node.on_tun_packet(at(0), &mut syn(port))).expect("placed");
            got[id.index()] += 1;
        }
        got
    }

    fn set_state(node: &mut crate::Node, i: u8, state: MemberState) {
        node.upsert_member(&format!("n{i}"), ip([10, 77, 0, i]), 1.0, state).unwrap();
    }

    #[test]
    fn new_flows_stay_in_the_site_and_spill_to_the_nearest_when_it_drains() {
        let mut n = cluster();
        n.set_rtt("n3", Duration::from_millis(40));
        n.set_rtt("n4", Duration::from_millis(45));
        n.set_rtt("n5", Duration::from_millis(10));
        let got = place(&mut n, 1000, 200);
        assert_eq!(got[2] + got[3] + got[4], 0, "a healthy site keeps its flows: {got:?}");
        assert!(got[0] > 50 && got[1] > 50, "{got:?}");
        // Half of site a drains: 0.5 × 1.4 = 70 % stays, 30 % goes to the nearest site, c.
        set_state(&mut n, 2, MemberState::Draining);
        let got = place(&mut n, 2000, 1000);
        assert!((620..780).contains(&got[0]), "{got:?}");
        assert!((220..380).contains(&got[4]) && got[1] + got[2] + got[3] == 0, "{got:?}");
        // All of a drains: c takes what 1.4 × its health allows (all of it), b nothing.
        n.set_draining(true);
        let got = place(&mut n, 4000, 300);
        assert_eq!(got[4], 300, "{got:?}");
        assert!(n.counters().placed_cross_site >= 300);
        // c is gone: b takes everything; then a returns and takes everything back.
        set_state(&mut n, 5, MemberState::Dead);
        let got = place(&mut n, 5000, 300);
        assert_eq!(got[2] + got[3], 300, "{got:?}");
        n.set_draining(false);
        set_state(&mut n, 2, MemberState::Alive);
        let got = place(&mut n, 6000, 300);
        assert_eq!(got[0] + got[1], 300, "{got:?}");
    }

    #[test]
    fn flows_placed_by_hash_under_pressure_stay_in_a_site_that_takes_flows() {
        let mut n = cluster();
        let key = |port: u16| ringlb_wire::classify(&syn(port)).unwrap().key;
        let placed: Vec<NodeId> =
            (0..300).map(|p| n.place(at(0), &key(p), super::super::How::HashUnderPressure)).collect();
        assert!(placed.iter().all(|id| id.index() <= 1), "hashed out of the site: {placed:?}");
        // With all of site a drained, hashing spreads over the others.
        set_state(&mut n, 2, MemberState::Draining);
        n.set_draining(true);
        let placed: Vec<NodeId> =
            (0..300).map(|p| n.place(at(0), &key(p), super::super::How::HashUnderPressure)).collect();
        assert!(placed.iter().all(|id| id.index() >= 2), "{placed:?}");
    }

    #[test]
    fn strict_sites_never_leave_and_serve_at_the_entry_when_all_drained() {
        let mut n = cluster();
        n.set_site_policy(SitePolicy { mode: SiteMode::Strict, ..SitePolicy::default() });
        set_state(&mut n, 2, MemberState::Draining);
        n.set_draining(true);
        let got = place(&mut n, 1000, 100);
        assert_eq!(got[0], 100, "{got:?}");
        assert_eq!(n.counters().placed_cross_site, 0);
        // A peer in doubt takes them from the drained entry, but only one in its own site.
        set_state(&mut n, 2, MemberState::Suspect);
        for i in 3..=5 {
            set_state(&mut n, i, MemberState::Suspect);
        }
        let got = place(&mut n, 2000, 100);
        assert_eq!(got[1], 100, "{got:?}");
        set_state(&mut n, 2, MemberState::Dead);
        let got = place(&mut n, 3000, 100);
        assert_eq!(got[0], 100, "{got:?}");
        assert_eq!(n.counters().placed_cross_site, 0);
    }

    #[test]
    fn one_site_places_as_before() {
        let mut plain = node_with(
            Policy::PowerOfTwo { margin: 0.1 },
            (1..=3u8).map(|i| Member::new(format!("n{i}"), ip([10, 77, 0, i]), 1.0)),
        );
        let mut all_in_a = node_with(
            Policy::PowerOfTwo { margin: 0.1 },
            (1..=3u8).map(|i| {
                let mut m = Member::new(format!("n{i}"), ip([10, 77, 0, i]), 1.0);
                m.site = "a".into();
                m
            }),
        );
        for port in 1..200 {
            let a = target(plain.on_tun_packet(at(0), &mut syn(port)));
            let b = target(all_in_a.on_tun_packet(at(0), &mut syn(port)));
            assert_eq!(a, b, "port {port}");
        }
        assert_eq!(plain.placed_on(NodeId(0)) + plain.placed_on(NodeId(1)) + plain.placed_on(NodeId(2)), 199);
    }
}
