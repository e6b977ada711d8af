//! Sites: how an entry shares its new flows between its own site and the others.
//!
//! Locality first, after Envoy's priority levels: the entry's own site takes
//! `min(1, overprovisioning × healthy weight / weight)` of the new flows; what it cannot take
//! spills to the other sites, nearest (by the control plane's round-trip time) first, each
//! taking up to its own `overprovisioning × health` of what is left. With the default 1.4 a site
//! keeps all its flows while at least 5/7 of its capacity takes new flows.
//!
//! Load spills too, when the operator says what a site can carry (`spill_above`, flows per unit
//! of healthy weight; off by default, since weights are relative and an idle remote site must
//! not draw flows across the WAN): above it, and while the other sites together are less
//! loaded, the share that would exceed it goes to the nearest other site with a healthy
//! member (whatever that one's own load), until the site is back below 90 % of it
//! (hysteresis: a site at the threshold does not flap). `max_cross_site_share` caps what
//! leaves the site while it has any healthy member; `Strict` never leaves it.
//!
//! Sans-IO and pure: [`shares`] takes each site's view and returns each one's share.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteMode {
    /// Spill to other sites when the own site lacks healthy capacity or is overloaded.
    Failover,
    /// Never place a new flow outside the entry's site (with no healthy member there, the
    /// entry serves it itself).
    Strict,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SitePolicy {
    pub mode: SiteMode,
    /// Envoy's overprovisioning factor.
    pub overprovisioning: f64,
    /// Most of the new flows that may leave the site while it has a healthy member (0 to 1).
    pub max_cross_site_share: f64,
    /// Flows per unit of healthy weight a site carries before it spills for load (`None`: it
    /// spills only for health).
    pub spill_above: Option<f64>,
}

/// A site spilling for load stops below this fraction of `spill_above`.
const SPILL_EXIT: f64 = 0.9;

impl Default for SitePolicy {
    fn default() -> Self {
        SitePolicy { mode: SiteMode::Failover, overprovisioning: 1.4, max_cross_site_share: 1.0, spill_above: None }
    }
}

/// One site as an entry sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteView {
    /// Weight of its members that take new flows.
    pub healthy_weight: f64,
    /// Weight of its members that are not gone (its capacity when all are well).
    pub total_weight: f64,
    /// Flows its healthy members serve.
    pub load: f64,
    /// Round trip to its nearest member; `None` for the own site or when unmeasured.
    pub rtt: Option<Duration>,
    /// The operator's weight for the site (`sites.weights`, default 1): it scales the share
    /// the site takes before the next one is asked; 0 takes none while another site can.
    pub weight: f64,
}

impl Default for SiteView {
    fn default() -> Self {
        SiteView { healthy_weight: 0.0, total_weight: 0.0, load: 0.0, rtt: None, weight: 1.0 }
    }
}

impl SiteView {
    fn health(&self) -> f64 {
        if self.total_weight > 0.0 {
            (self.healthy_weight / self.total_weight).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    fn utilisation(&self) -> f64 {
        self.load / self.healthy_weight
    }
}

/// Each site's share of new flows into `out` (same order as `sites`: the entry's own site
/// first, then the others nearest first). Shares add up to 1, or are all 0 when no site has
/// a healthy member. `spilling` is the load-spill state kept between calls (hysteresis).
pub fn shares(policy: &SitePolicy, sites: &[SiteView], spilling: &mut bool, out: &mut Vec<f64>) {
    out.clear();
    out.resize(sites.len(), 0.0);
    let Some(own) = sites.first() else { return };
    if policy.mode == SiteMode::Strict {
        out[0] = 1.0;
        return;
    }
    let mut left = 1.0;
    for (share, site) in out.iter_mut().zip(sites) {
        *share = (site.health() * policy.overprovisioning * site.weight.max(0.0)).min(left);
        left -= *share;
    }
    if left > 1e-9 {
        // Every site is short: what remains goes out by healthy weight, as Envoy normalises.
        let healthy: f64 = sites.iter().map(|s| s.healthy_weight).sum();
        if healthy <= 0.0 {
            out.fill(0.0);
            return;
        }
        for (share, site) in out.iter_mut().zip(sites) {
            *share += left * site.healthy_weight / healthy;
        }
    }
    // Load: compare flows per unit of healthy weight with the other sites together.
    let (load, weight) = sites[1..]
        .iter()
        .filter(|s| s.healthy_weight > 0.0)
        .fold((0.0, 0.0), |(l, w), s| (l + s.load, w + s.healthy_weight));
    match policy.spill_above {
        Some(limit) if own.healthy_weight > 0.0 && weight > 0.0 => {
            let (mine, theirs) = (own.utilisation(), load / weight);
            let enter = mine > limit && theirs < mine;
            let leave = mine < limit * SPILL_EXIT || theirs >= mine;
            *spilling = if *spilling { !leave } else { enter };
            if *spilling {
                // Keep the share the site carries at its limit; the rest goes nearest.
                let keep = (limit * SPILL_EXIT / mine).clamp(0.0, 1.0);
                let moved = out[0] * (1.0 - keep);
                out[0] -= moved;
                if let Some(nearest) = sites[1..].iter().position(|s| s.healthy_weight > 0.0) {
                    out[1 + nearest] += moved;
                }
            }
        }
        _ => *spilling = false,
    }
    // The cap on what leaves, while the own site can take flows at all.
    let cap = policy.max_cross_site_share.clamp(0.0, 1.0);
    let away = 1.0 - out[0];
    if own.healthy_weight > 0.0 && away > cap {
        for share in &mut out[1..] {
            *share *= cap / away;
        }
        out[0] = 1.0 - cap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(healthy: f64, total: f64, load: f64) -> SiteView {
        SiteView { healthy_weight: healthy, total_weight: total, load, rtt: None, weight: 1.0 }
    }

    fn run(policy: &SitePolicy, sites: &[SiteView]) -> Vec<f64> {
        let mut out = Vec::new();
        shares(policy, sites, &mut false, &mut out);
        out
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn a_healthy_site_keeps_its_flows_and_a_short_one_spills_nearest_first() {
        let p = SitePolicy::default();
        assert!(close(&run(&p, &[site(2.0, 2.0, 0.0), site(2.0, 2.0, 0.0)]), &[1.0, 0.0]));
        // Three of four healthy: 0.75 × 1.4 > 1, still all local.
        assert!(close(&run(&p, &[site(3.0, 4.0, 0.0), site(2.0, 2.0, 0.0)]), &[1.0, 0.0]));
        // Half healthy: 0.7 stays, 0.3 to the nearest other site.
        assert!(close(&run(&p, &[site(1.0, 2.0, 0.0), site(2.0, 2.0, 0.0), site(2.0, 2.0, 0.0)]), &[0.7, 0.3, 0.0]));
        // Drained: everything leaves, to the nearest site with room, then the next.
        assert!(close(&run(&p, &[site(0.0, 2.0, 0.0), site(1.0, 2.0, 0.0), site(2.0, 2.0, 0.0)]), &[0.0, 0.7, 0.3]));
        // Nobody healthy anywhere: no share at all.
        assert!(close(&run(&p, &[site(0.0, 2.0, 0.0), site(0.0, 2.0, 0.0)]), &[0.0, 0.0]));
    }

    #[test]
    fn site_weights_scale_what_a_site_takes_before_the_next() {
        let p = SitePolicy::default();
        let weighted = |w: [f64; 3]| {
            let mut sites = [site(2.0, 2.0, 0.0), site(2.0, 2.0, 0.0), site(2.0, 2.0, 0.0)];
            for (s, w) in sites.iter_mut().zip(w) {
                s.weight = w;
            }
            run(&p, &sites)
        };
        // The own site at half weight keeps 0.7 and sends 0.3 to the nearest.
        assert!(close(&weighted([0.5, 1.0, 1.0]), &[0.7, 0.3, 0.0]));
        // A drained home with a nearest site at weight 0: everything goes to the next one.
        let mut sites = [site(0.0, 2.0, 0.0), site(2.0, 2.0, 0.0), site(2.0, 2.0, 0.0)];
        sites[1].weight = 0.0;
        assert!(close(&run(&p, &sites), &[0.0, 0.0, 1.0]));
        // If only weight-0 sites are left, they still serve rather than nobody.
        let mut sites = [site(0.0, 2.0, 0.0), site(2.0, 2.0, 0.0)];
        sites[1].weight = 0.0;
        assert!(close(&run(&p, &sites), &[0.0, 1.0]));
    }

    #[test]
    fn strict_never_leaves_and_the_cap_bounds_what_leaves() {
        let strict = SitePolicy { mode: SiteMode::Strict, ..SitePolicy::default() };
        assert!(close(&run(&strict, &[site(0.0, 2.0, 0.0), site(2.0, 2.0, 0.0)]), &[1.0, 0.0]));
        let capped = SitePolicy { max_cross_site_share: 0.1, ..SitePolicy::default() };
        assert!(close(&run(&capped, &[site(1.0, 4.0, 0.0), site(2.0, 2.0, 0.0)]), &[0.9, 0.1]));
        // With no healthy member at home the cap does not hold flows back.
        assert!(close(&run(&capped, &[site(0.0, 4.0, 0.0), site(2.0, 2.0, 0.0)]), &[0.0, 1.0]));
    }

    #[test]
    fn load_spills_above_the_limit_and_stops_only_below_nine_tenths_of_it() {
        let mut spilling = false;
        let mut out = Vec::new();
        let at = |load: f64| [site(2.0, 2.0, load), site(2.0, 2.0, 20.0)];
        // Without a limit, no load ever spills: an idle remote site draws nothing.
        shares(&SitePolicy::default(), &at(10_000.0), &mut spilling, &mut out);
        assert!(!spilling && close(&out, &[1.0, 0.0]));
        let p = SitePolicy { spill_above: Some(100.0), ..SitePolicy::default() };
        shares(&p, &at(300.0), &mut spilling, &mut out); // 150 per unit, above 100
        assert!(spilling);
        assert!((out[0] - 0.6).abs() < 1e-9, "keep 90 / 150: {out:?}");
        shares(&p, &at(190.0), &mut spilling, &mut out); // 95: below the limit, above 90
        assert!(spilling && out[0] < 1.0, "hysteresis holds the spill: {out:?}");
        shares(&p, &at(170.0), &mut spilling, &mut out); // 85: below 90
        assert!(!spilling && close(&out, &[1.0, 0.0]));
        shares(&p, &at(190.0), &mut spilling, &mut out); // 95 again: not enough to start
        assert!(!spilling && close(&out, &[1.0, 0.0]));
        // Never towards a site that is busier still.
        let busier = [site(2.0, 2.0, 300.0), site(2.0, 2.0, 400.0)];
        shares(&p, &busier, &mut spilling, &mut out);
        assert!(!spilling && close(&out, &[1.0, 0.0]));
    }

    #[test]
    fn shares_always_add_up() {
        let p = SitePolicy { max_cross_site_share: 0.3, spill_above: Some(50.0), ..SitePolicy::default() };
        for h in 0..=4 {
            for l in [0.0, 10.0, 500.0] {
                let sites = [site(f64::from(h), 4.0, l), site(1.0, 2.0, 5.0), site(0.0, 2.0, 0.0)];
                let mut spilling = false;
                let mut out = Vec::new();
                shares(&p, &sites, &mut spilling, &mut out);
                let sum: f64 = out.iter().sum();
                assert!((sum - 1.0).abs() < 1e-9, "{h} {l}: {out:?}");
                assert!(out.iter().all(|s| *s >= 0.0));
            }
        }
    }
}
