//! The kernel fast path in the packet loop: carries out the core's offload decisions
//! ([`ringlb_core::OffloadOp`]) in the eBPF program's table, and reads back what the program
//! did for [`Node::reconcile_offload`]. The rules are the core's (its `offload` module); this
//! is only IO.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ringlb_core::{Node, OffloadCounters, OffloadOp, OffloadUsage, Offloaded, Timestamp};
use ringlb_fastpath::{Action, FastPath, FastPathStats, FlowKey};
use ringlb_wire::FlowKey as WireKey;

use crate::carrier::Carrier;

/// How often the program's per-flow usage is read back (well within the shortest idle timeout
/// of a settled flow; the configuration enforces at least 10 s).
pub(crate) const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// The fast path as the packet loop sees it.
pub struct Offload {
    path: FastPath,
    /// This node's underlay address: the outer source of what it encapsulates.
    local: Ipv4Addr,
    ops: Vec<OffloadOp>,
    usage: Vec<OffloadUsage>,
    /// Installs the program's table refused (full, or a syscall error): the flow stays on the
    /// TUN path.
    install_errors: u64,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload").field("local", &self.local).finish_non_exhaustive()
    }
}

/// The fast path's figures for metrics and status.
#[derive(Debug, Clone, Copy, Default)]
pub struct OffloadSnapshot {
    pub program: FastPathStats,
    pub core: OffloadCounters,
    pub install_errors: u64,
}

fn key_of(key: &WireKey) -> Option<FlowKey> {
    match (key.src(), key.dst()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(FlowKey::new(s, d, key.src_port, key.dst_port, key.proto)),
        _ => None,
    }
}

impl Offload {
    pub fn new(path: FastPath, local: Ipv4Addr) -> Self {
        Offload { path, local, ops: Vec::new(), usage: Vec::new(), install_errors: 0 }
    }

    /// Carries out the core's pending decisions (`now`: for what a removed flow did last).
    pub(crate) fn apply(&mut self, node: &mut Node, now: Timestamp, carrier: &Carrier) {
        node.drain_offload_ops(&mut self.ops);
        for op in self.ops.drain(..) {
            match op {
                OffloadOp::Install(key, how) => {
                    let (Some(k), Some(action)) = (key_of(&key), action(how, self.local, carrier)) else {
                        continue;
                    };
                    if let Err(e) = self.path.install(&k, action) {
                        self.install_errors += 1;
                        node.offload_failed(&key);
                        tracing::debug!(error = %e, ?key, "fast path: flow not offloaded");
                    }
                }
                OffloadOp::Remove(key) => {
                    let Some(k) = key_of(&key) else { continue };
                    if let Some(u) = self.path.remove(&k) {
                        let last_seen = last_seen(now, ringlb_fastpath::monotonic_ns(), u.last_seen_ns);
                        node.offload_removed(now, &OffloadUsage { key, packets: u.packets, bytes: u.bytes, last_seen });
                    }
                }
            }
        }
    }

    /// Reads what the program did since the last time, hands it to the core (which touches the
    /// flows and withdraws those no longer backed), and carries out the withdrawals.
    pub(crate) fn reconcile(&mut self, node: &mut Node, now: Timestamp, carrier: &Carrier) {
        let now_ns = ringlb_fastpath::monotonic_ns();
        self.usage.clear();
        let usage = &mut self.usage;
        self.path.usage(|k, u| {
            let key = WireKey::new(IpAddr::V4(k.src()), IpAddr::V4(k.dst()), k.src_port(), k.dst_port(), k.proto());
            let last_seen = last_seen(now, now_ns, u.last_seen_ns);
            usage.push(OffloadUsage { key, packets: u.packets, bytes: u.bytes, last_seen });
        });
        node.reconcile_offload(now, &self.usage);
        self.apply(node, now, carrier);
    }

    pub fn snapshot(&self, node: &Node) -> OffloadSnapshot {
        OffloadSnapshot {
            program: self.path.stats(),
            core: node.offload_counters().unwrap_or_default(),
            install_errors: self.install_errors,
        }
    }
}

/// The program's CLOCK_MONOTONIC stamp as the core's time (`None`: no packet yet).
fn last_seen(now: Timestamp, now_ns: u64, seen_ns: u64) -> Option<Timestamp> {
    (seen_ns != 0).then(|| now.saturating_sub(Duration::from_nanos(now_ns.saturating_sub(seen_ns))))
}

/// What the program is to do for a decision, in the carrier's own format.
fn action(how: Offloaded, local: Ipv4Addr, carrier: &Carrier) -> Option<Action> {
    use ringlb_fastpath::Carrier as Kind;
    Some(match how {
        Offloaded::Local => Action::Local,
        Offloaded::Forward { addr: IpAddr::V4(peer), flow_hash, .. } => match carrier {
            Carrier::Udp(c) => Action::Encap {
                carrier: Kind::Udp,
                local,
                peer,
                source_port: c.source_port_for(flow_hash),
                port: c.port(),
            },
            Carrier::Ipip(_) => Action::Encap { carrier: Kind::Ipip, local, peer, source_port: 0, port: 0 },
        },
        Offloaded::Served { from: IpAddr::V4(from), .. } => Action::Decap {
            carrier: match carrier {
                Carrier::Udp(_) => Kind::Udp,
                Carrier::Ipip(_) => Kind::Ipip,
            },
            from,
        },
        _ => return None,
    })
}
