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
    /// The underlay interface: the program sends encapsulated packets out by it only.
    interface: String,
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
    pub fn new(path: FastPath, local: Ipv4Addr, interface: String) -> Self {
        Offload { path, local, interface, ops: Vec::new(), usage: Vec::new(), install_errors: 0 }
    }

    /// Whether the main routing table sends packets for `peer` out by the underlay interface,
    /// the only one the program sends by (`/proc/net/route`, longest prefix; policy rules are
    /// not consulted). A peer behind another interface stays on the daemon's path.
    pub(crate) fn reaches(&self, peer: IpAddr) -> bool {
        let IpAddr::V4(peer) = peer else { return false };
        let Ok(table) = std::fs::read_to_string("/proc/net/route") else { return true };
        route_interface(&table, peer).is_none_or(|dev| dev == self.interface)
    }

    /// Carries out the core's pending decisions (`now`, read only when there are some: for what
    /// a removed flow did last). Called after every batch of packets; usually there is nothing.
    pub(crate) fn apply(&mut self, node: &mut Node, now: impl FnOnce() -> Timestamp, carrier: &Carrier) {
        node.drain_offload_ops(&mut self.ops);
        if self.ops.is_empty() {
            return;
        }
        let now = now();
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
                        node.offload_removed(
                            now,
                            &OffloadUsage { key, packets: u.packets, bytes: u.bytes, last_seen, closed: u.closed },
                        );
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
            usage.push(OffloadUsage { key, packets: u.packets, bytes: u.bytes, last_seen, closed: u.closed });
        });
        node.reconcile_offload(now, &self.usage);
        self.apply(node, || now, carrier);
    }

    pub fn snapshot(&self, node: &Node) -> OffloadSnapshot {
        OffloadSnapshot {
            program: self.path.stats(),
            core: node.offload_counters().unwrap_or_default(),
            install_errors: self.install_errors,
        }
    }
}

/// The interface of the longest prefix in `/proc/net/route` that holds `addr`.
fn route_interface(table: &str, addr: Ipv4Addr) -> Option<&str> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be);
    let addr = u32::from(addr);
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses in host
            // order as hex of the network-order bytes.
            let (dest, mask) = (hex(f.get(1)?)?, hex(f.get(7)?)?);
            (addr & mask == dest & mask).then_some((mask.count_ones(), f[0]))
        })
        .max_by_key(|&(len, _)| len)
        .map(|(_, dev)| dev)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_names_the_interface() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t014D0A0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     wg0\t05004D0A\t00000000\t0001\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(route_interface(table, Ipv4Addr::new(10, 77, 0, 2)), Some("eth0"));
        assert_eq!(route_interface(table, Ipv4Addr::new(10, 77, 0, 5)), Some("wg0"));
        assert_eq!(route_interface(table, Ipv4Addr::new(192, 0, 2, 1)), Some("eth0"), "default route");
        assert_eq!(route_interface("Iface\tDestination\n", Ipv4Addr::new(10, 0, 0, 1)), None);
    }
}
