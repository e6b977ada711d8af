//! The edge loop: whether the network should send this node VIP traffic (`entry.mode`).
//!
//! Ten times a second it reads this node's readiness from the packet loop (a snapshot that does
//! not come within a second means a stalled data plane) and, for L2, the peers' claims from
//! the control plane; [`ringlb_core::entry::Edge`] decides, and
//! [`ringlb_dataplane::announce`] carries the decision out. Between ticks it answers ARP.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use ringlb_control::ControlHandle;
use ringlb_core::entry::{eligible, Contender, Edge, Mechanism, Readiness, Withheld};
use ringlb_core::{MemberState, Timestamp};
use ringlb_dataplane::announce::{ArpCounters, ArpSpeaker, RouteAnnouncer};
use ringlb_dataplane::SnapshotRequests;
use tokio::time::Instant;

use crate::health::HealthStatus;

/// How often the edge decides.
const TICK: Duration = Duration::from_millis(100);
/// A packet loop that does not answer within this long is stalled (the control plane uses
/// the same bound before it stops advertising the node).
const DATAPLANE_STALL: Duration = Duration::from_secs(1);
/// Gratuitous ARP after taking the VIP: at once, then these long after, so that a host that
/// missed one (or ignored it while its entry was locked) hears another.
const GARP_AFTER: [Duration; 4] =
    [Duration::from_millis(100), Duration::from_millis(300), Duration::from_secs(1), Duration::from_secs(3)];
/// How long a starting L2 node listens for an existing owner before it may take the VIP.
const LISTEN_FIRST: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub mechanism: Mechanism,
    pub node: String,
    pub vip: Ipv4Addr,
    pub underlay: String,
    pub tun: String,
    /// BGP: the table of the announced route.
    pub table: u32,
    /// L2: a peer whose load vectors stop this long no longer owns the VIP.
    pub takeover_after: Duration,
}

/// What the admin endpoint shows.
#[derive(Debug, Clone)]
pub struct EdgeView {
    pub mechanism: Mechanism,
    pub table: u32,
    pub announced: bool,
    pub since: Instant,
    pub withheld: Option<Withheld>,
    pub changes: u64,
    /// L2: the members that claim the VIP as this node sees them, itself included.
    pub owners: Vec<String>,
    pub arp: ArpCounters,
    /// Announcements or withdrawals the kernel refused.
    pub errors: u64,
}

/// Shared between the edge loop and the admin endpoint.
#[derive(Debug, Clone, Default)]
pub struct EdgeStatus(Arc<Mutex<Option<EdgeView>>>);

impl EdgeStatus {
    pub fn get(&self) -> Option<EdgeView> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, view: EdgeView) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    fn set_arp(&self, arp: ArpCounters) {
        if let Some(view) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            view.arp = arp;
        }
    }
}

/// Opens what the mechanism needs (so that a missing privilege fails the start, naming it) and
/// starts the loop on the current runtime.
pub fn spawn(
    config: EdgeConfig,
    snapshots: SnapshotRequests,
    control: Option<ControlHandle>,
    health: HealthStatus,
    status: EdgeStatus,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let arp = match config.mechanism {
        Mechanism::L2 => Some(ArpSpeaker::open(&config.underlay, config.vip).with_context(|| {
            format!("entry.mode = \"l2\": opening an ARP socket on {} (needs CAP_NET_RAW)", config.underlay)
        })?),
        Mechanism::Bgp => None,
    };
    let route = RouteAnnouncer::new(config.vip.into(), config.table, config.tun.clone());
    if config.mechanism == Mechanism::Bgp {
        // Nothing is announced until the first decision.
        route.withdraw().context("entry.mode = \"bgp\": clearing entry.table (needs CAP_NET_ADMIN)")?;
    }
    Ok(tokio::spawn(run(config, snapshots, control, health, status, arp, route)))
}

async fn run(
    config: EdgeConfig,
    snapshots: SnapshotRequests,
    control: Option<ControlHandle>,
    health: HealthStatus,
    status: EdgeStatus,
    mut arp: Option<ArpSpeaker>,
    route: RouteAnnouncer,
) {
    let origin = Instant::now();
    let stamp = |t: Instant| Timestamp::from_duration(t.duration_since(origin));
    let mut edge = Edge::new(config.mechanism, stamp(origin), LISTEN_FIRST);
    let mut since = origin;
    let mut errors = 0u64;
    let mut garps: Vec<Instant> = Vec::new();
    // What the kernel's table holds (BGP) and what the peers were told (L2), as far as known.
    let mut route_applied: Option<bool> = Some(false);
    let mut claim_sent: Option<(bool, bool)> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let owner = edge.announcement().announced;
        tokio::select! {
            _ = tick.tick() => {}
            r = async { arp.as_mut()?.serve(owner).await.err() }, if arp.is_some() => {
                if let Some(e) = r {
                    tracing::warn!(error = %e, "reading ARP");
                    tokio::time::sleep(TICK).await;
                }
                if let Some(arp) = &arp {
                    status.set_arp(arp.counters());
                }
                continue;
            }
        }
        let app_unhealthy = !health.takes_flows();
        let readiness = match tokio::time::timeout(DATAPLANE_STALL, snapshots.get()).await {
            Ok(Some(s)) => Readiness {
                // An unhealthy app drains the data plane too; say which it is.
                draining: !app_unhealthy && s.members.iter().any(|m| m.is_local && m.state == MemberState::Draining),
                stopping: s.stopping.is_some(),
                dataplane_stalled: false,
                app_unhealthy,
            },
            // The packet loop has ended: the daemon is exiting, and its TUN (with the route)
            // goes with it.
            Ok(None) => Readiness { stopping: true, ..Readiness::default() },
            Err(_) => Readiness { dataplane_stalled: true, ..Readiness::default() },
        };
        let peers = control.as_ref().map(ControlHandle::members).unwrap_or_default();
        let contenders: Vec<Contender<'_>> = peers
            .iter()
            .filter(|p| p.name != config.node)
            .map(|p| Contender {
                name: &p.name,
                eligible: eligible(
                    p.state,
                    p.load.as_ref().zip(p.load_age).map(|(l, age)| (l.entry_candidate, age)),
                    config.takeover_after,
                ),
                claims: p.load.as_ref().is_some_and(|l| l.entry_claim),
            })
            .collect();
        let now = Instant::now();
        let ready = readiness.check().is_ok();
        if edge.tick(stamp(now), &config.node, readiness, &contenders) {
            since = now;
            let a = edge.announcement();
            if config.mechanism == Mechanism::L2 {
                garps.clear();
                if a.announced {
                    garps.push(now);
                    garps.extend(GARP_AFTER.iter().map(|d| now + *d));
                }
            }
            match a.withheld {
                None => tracing::info!(mechanism = a.mechanism.name(), vip = %config.vip, "announcing the VIP"),
                Some(why) => tracing::info!(
                    mechanism = a.mechanism.name(), vip = %config.vip, why = why.name(), "not announcing the VIP"
                ),
            }
        }
        // Carried out until it holds: a route change the kernel refused is tried again next tick.
        let want = edge.announcement().announced;
        match config.mechanism {
            Mechanism::Bgp if route_applied != Some(want) => {
                let r = if want { route.announce() } else { route.withdraw() };
                if report(r, if want { "announcing" } else { "withdrawing" }) {
                    errors += 1;
                    route_applied = None;
                } else {
                    route_applied = Some(want);
                }
            }
            Mechanism::L2 if claim_sent != Some((ready, want)) => {
                if let Some(c) = &control {
                    if c.set_entry_claim(ready, want).await {
                        claim_sent = Some((ready, want));
                    }
                }
            }
            _ => {}
        }
        if let Some(arp) = arp.as_mut() {
            let due = garps.iter().filter(|t| **t <= now).count();
            garps.retain(|t| *t > now);
            for _ in 0..due {
                arp.send_gratuitous();
            }
        }
        let a = edge.announcement();
        let mut owners: Vec<String> =
            contenders.iter().filter(|c| c.eligible && c.claims).map(|c| c.name.to_owned()).collect();
        if a.mechanism == Mechanism::L2 && a.announced {
            owners.push(config.node.clone());
        }
        owners.sort();
        status.set(EdgeView {
            mechanism: a.mechanism,
            table: config.table,
            announced: a.announced,
            since,
            withheld: a.withheld,
            changes: a.changes,
            owners,
            arp: arp.as_ref().map(ArpSpeaker::counters).unwrap_or_default(),
            errors,
        });
    }
}

/// Logs a failed route change; true when it failed.
fn report(r: Result<(), ringlb_dataplane::steering::SteeringError>, what: &str) -> bool {
    if let Err(e) = &r {
        tracing::error!(error = %e, "{what} the VIP's route");
    }
    r.is_err()
}
