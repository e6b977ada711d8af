//! The edge: whether the network should send VIP traffic to this node.
//!
//! Every node serves and forwards, but client packets reach the cluster through *entries*, and
//! the network must learn which nodes can be one. Two mechanisms, both decided here and carried
//! out by `ringlb_dataplane::announce`:
//!
//! - **BGP** ([`Mechanism::Bgp`]): every ready node announces the VIP; the routers spread flows
//!   over the announcing nodes by ECMP. The daemon holds a route to the VIP in a kernel table
//!   that a routing daemon (BIRD, FRR) exports. The route goes through the daemon's TUN, so it
//!   dies with the daemon: a crash withdraws the announcement without anyone deciding it.
//! - **L2** ([`Mechanism::L2`]): on one broadcast domain, one node answers ARP for the VIP. The
//!   cluster elects it from the membership with [`l2_claim`]: the current owner keeps the VIP
//!   while it is ready (no preemption: a node that joins or comes back does not take it away);
//!   when there is no owner, the ready member with the lowest name takes it; when two claim
//!   it (a healed partition, views that crossed), the one with the lower name keeps it.
//!
//! Both mechanisms announce only while this node is [`Readiness::check`]-ready: its data plane
//! runs, its app passes its health checks (when it has any), and it neither drains nor stops.

use std::time::Duration;

use crate::{MemberState, Timestamp};

/// How the network learns that this node can take VIP traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// A route a routing daemon exports: announced by every ready node.
    Bgp,
    /// ARP answers and gratuitous ARP: one elected node.
    L2,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Bgp => "bgp",
            Mechanism::L2 => "l2",
        }
    }
}

/// What this node knows of its own ability to take traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// Drained by the operator: takes no new flows.
    pub draining: bool,
    /// Stopping (SIGTERM): leaves once its flows are done.
    pub stopping: bool,
    /// The packet loop did not answer in time.
    pub dataplane_stalled: bool,
    /// The app fails its health checks (`[health]`).
    pub app_unhealthy: bool,
}

/// Why this node does not announce the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    Draining,
    Stopping,
    DataplaneStalled,
    AppUnhealthy,
    /// L2: another member owns the VIP.
    NotElected,
    /// L2: this node started moments ago and first listens for an owner.
    Starting,
}

impl Withheld {
    pub fn name(self) -> &'static str {
        match self {
            Withheld::Draining => "draining",
            Withheld::Stopping => "stopping",
            Withheld::DataplaneStalled => "data plane stalled",
            Withheld::AppUnhealthy => "the app fails its health checks",
            Withheld::NotElected => "another member owns the VIP",
            Withheld::Starting => "starting: listening for an owner",
        }
    }
}

impl Readiness {
    /// Ready to take VIP traffic, or why not (stopping before draining before a stall).
    pub fn check(self) -> Result<(), Withheld> {
        if self.stopping {
            Err(Withheld::Stopping)
        } else if self.draining {
            Err(Withheld::Draining)
        } else if self.dataplane_stalled {
            Err(Withheld::DataplaneStalled)
        } else if self.app_unhealthy {
            Err(Withheld::AppUnhealthy)
        } else {
            Ok(())
        }
    }
}

/// A peer as the layer-2 election sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contender<'a> {
    pub name: &'a str,
    /// Could own the VIP: see [`eligible`].
    pub eligible: bool,
    /// Says, in its latest load vector, that it owns the VIP.
    pub claims: bool,
}

/// Whether a peer could own the VIP: it says it is a candidate (it runs the L2 entry and is
/// ready: not draining, stopping or unhealthy), it is not known to be gone, and it was heard
/// from lately. Suspicion alone does not count against it (one missed probe on a busy host
/// must not move the VIP); silence does: a peer whose load vectors stop for `stale_after` is
/// passed over, which makes a takeover fast when an owner's daemon dies, long before failure
/// detection has ruled on it.
pub fn eligible(state: MemberState, load: Option<(bool, Duration)>, stale_after: Duration) -> bool {
    matches!(state, MemberState::Alive | MemberState::Suspect)
        && load.is_some_and(|(candidate, age)| candidate && age < stale_after)
}

/// Whether this node (`me`, `claiming` now) should claim the VIP at layer 2, given its own
/// readiness and the peers it knows. Every member runs the same rule on its own view; views
/// converge, and so does the owner.
pub fn l2_claim(me: &str, ready: bool, claiming: bool, peers: &[Contender<'_>]) -> bool {
    if !ready {
        return false;
    }
    let mut owners = peers.iter().filter(|p| p.eligible && p.claims && p.name != me);
    if claiming {
        // Keep it unless a member with a lower name claims it too.
        return !owners.any(|p| p.name < me);
    }
    if owners.next().is_some() {
        return false;
    }
    // No owner: the ready member with the lowest name takes it.
    !peers.iter().any(|p| p.eligible && p.name != me && p.name < me)
}

/// What this node announces, since when, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub mechanism: Mechanism,
    pub announced: bool,
    /// When `announced` last changed (or the daemon started).
    pub since: Timestamp,
    /// Why not, while not announced.
    pub withheld: Option<Withheld>,
    /// Times `announced` changed.
    pub changes: u64,
}

impl Announcement {
    pub fn new(mechanism: Mechanism, now: Timestamp) -> Self {
        Announcement { mechanism, announced: false, since: now, withheld: Some(Withheld::Starting), changes: 0 }
    }

    /// Records the decision; true when `announced` changed, which the caller then carries out.
    pub fn set(&mut self, now: Timestamp, decision: Result<(), Withheld>) -> bool {
        let announced = decision.is_ok();
        self.withheld = decision.err();
        if announced == self.announced {
            return false;
        }
        self.announced = announced;
        self.since = now;
        self.changes += 1;
        true
    }
}

/// Decides, tick by tick, whether this node announces the VIP.
#[derive(Debug, Clone)]
pub struct Edge {
    announcement: Announcement,
    started: Timestamp,
    /// L2: how long a starting node listens for an owner before it may take the VIP.
    listen_first: Duration,
}

impl Edge {
    pub fn new(mechanism: Mechanism, now: Timestamp, listen_first: Duration) -> Self {
        Edge { announcement: Announcement::new(mechanism, now), started: now, listen_first }
    }

    pub fn announcement(&self) -> &Announcement {
        &self.announcement
    }

    /// One decision. For [`Mechanism::L2`], `peers` are the other members (unused for BGP).
    /// True when the announcement changed.
    pub fn tick(&mut self, now: Timestamp, me: &str, readiness: Readiness, peers: &[Contender<'_>]) -> bool {
        let ready = readiness.check();
        let decision = match self.announcement.mechanism {
            Mechanism::Bgp => ready,
            Mechanism::L2 => ready.and_then(|()| {
                let claiming = self.announcement.announced;
                if l2_claim(me, true, claiming, peers) {
                    // A starting node first listens, so that it does not take the VIP from an
                    // owner whose load vector has not reached it yet.
                    if !claiming && now.saturating_since(self.started) < self.listen_first {
                        Err(Withheld::Starting)
                    } else {
                        Ok(())
                    }
                } else {
                    Err(Withheld::NotElected)
                }
            }),
        };
        self.announcement.set(now, decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_millis(ms))
    }

    fn c(name: &str, eligible: bool, claims: bool) -> Contender<'_> {
        Contender { name, eligible, claims }
    }

    const READY: Readiness =
        Readiness { draining: false, stopping: false, dataplane_stalled: false, app_unhealthy: false };

    #[test]
    fn readiness_names_the_first_reason() {
        assert_eq!(READY.check(), Ok(()));
        let r = Readiness { draining: true, stopping: true, dataplane_stalled: true, app_unhealthy: true };
        assert_eq!(r.check(), Err(Withheld::Stopping));
        assert_eq!(Readiness { app_unhealthy: true, ..READY }.check(), Err(Withheld::AppUnhealthy));
        assert_eq!(Readiness { draining: true, ..READY }.check(), Err(Withheld::Draining));
        assert_eq!(Readiness { dataplane_stalled: true, ..READY }.check(), Err(Withheld::DataplaneStalled));
    }

    #[test]
    fn eligibility_needs_a_fresh_candidate_that_is_not_gone() {
        let s = Duration::from_millis(600);
        assert!(eligible(MemberState::Alive, Some((true, Duration::from_millis(100))), s));
        assert!(eligible(MemberState::Suspect, Some((true, Duration::from_millis(100))), s), "suspicion alone");
        assert!(!eligible(MemberState::Alive, Some((true, Duration::from_millis(700))), s), "stale");
        assert!(!eligible(MemberState::Alive, Some((false, Duration::ZERO)), s), "not a candidate");
        assert!(!eligible(MemberState::Alive, None, s), "never heard");
        for st in [MemberState::Draining, MemberState::Left, MemberState::Dead] {
            assert!(!eligible(st, Some((true, Duration::ZERO)), s), "{st:?}");
        }
    }

    #[test]
    fn with_no_owner_the_lowest_ready_name_takes_it() {
        let peers = [c("n1", true, false), c("n3", true, false)];
        assert!(!l2_claim("n2", true, false, &peers));
        assert!(l2_claim("n1", true, false, &[c("n2", true, false), c("n3", true, false)]));
        // n1 not eligible (dead, stale, draining): n2 is next.
        assert!(l2_claim("n2", true, false, &[c("n1", false, false), c("n3", true, false)]));
        assert!(!l2_claim("n2", false, false, &[c("n1", false, false)]), "not ready");
    }

    #[test]
    fn an_owner_keeps_the_vip_when_a_lower_name_comes_back() {
        // n3 owns; n1 returns and sees n3's claim: no preemption.
        assert!(!l2_claim("n1", true, false, &[c("n2", true, false), c("n3", true, true)]));
        assert!(l2_claim("n3", true, true, &[c("n1", true, false), c("n2", true, false)]));
        // But an ineligible claimant (its loads stopped) does not count.
        assert!(l2_claim("n1", true, false, &[c("n2", true, false), c("n3", false, true)]));
    }

    #[test]
    fn of_two_claimants_the_lower_name_keeps_it() {
        assert!(!l2_claim("n3", true, true, &[c("n1", true, true)]));
        assert!(l2_claim("n1", true, true, &[c("n3", true, true)]));
        // Any view of the same facts elects exactly one.
        let names = ["a", "b", "c", "d"];
        for claims in 0u8..16 {
            for eligible in 0u8..16 {
                let owners: Vec<&str> = names
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| eligible & (1 << i) != 0)
                    .filter(|&(i, me)| {
                        let peers: Vec<Contender<'_>> = names
                            .iter()
                            .enumerate()
                            .filter(|&(j, _)| j != i)
                            .map(|(j, n)| c(n, eligible & (1 << j) != 0, claims & (1 << j) != 0))
                            .collect();
                        l2_claim(me, true, claims & (1 << i) != 0, &peers)
                    })
                    .map(|(_, n)| *n)
                    .collect();
                let any = eligible != 0;
                assert_eq!(owners.len(), usize::from(any), "claims {claims:04b} eligible {eligible:04b}: {owners:?}");
            }
        }
    }

    #[test]
    fn bgp_announces_while_ready_and_records_since_when() {
        let mut e = Edge::new(Mechanism::Bgp, at(0), Duration::ZERO);
        assert!(e.tick(at(10), "n1", READY, &[]));
        assert!(e.announcement().announced);
        assert_eq!(e.announcement().since, at(10));
        assert!(!e.tick(at(20), "n1", READY, &[]), "no change");
        assert!(e.tick(at(30), "n1", Readiness { draining: true, ..READY }, &[]));
        let a = e.announcement();
        assert_eq!((a.announced, a.since, a.withheld, a.changes), (false, at(30), Some(Withheld::Draining), 2));
    }

    #[test]
    fn a_starting_l2_node_listens_before_it_takes_an_unowned_vip() {
        let mut e = Edge::new(Mechanism::L2, at(0), Duration::from_millis(3000));
        let peers = [c("n2", true, false)];
        assert!(!e.tick(at(1000), "n1", READY, &peers));
        assert_eq!(e.announcement().withheld, Some(Withheld::Starting));
        // The owner's load vector arrives in time: it keeps the VIP.
        assert!(!e.tick(at(2000), "n1", READY, &[c("n2", true, true)]));
        assert_eq!(e.announcement().withheld, Some(Withheld::NotElected));
        // The owner dies: n1 takes over at once (it has listened long enough).
        assert!(e.tick(at(3500), "n1", READY, &[c("n2", false, true)]));
        // Draining gives it up.
        assert!(e.tick(at(4000), "n1", Readiness { draining: true, ..READY }, &[c("n2", false, true)]));
        assert_eq!(e.announcement().withheld, Some(Withheld::Draining));
    }
}
