//! A node's daemon restarting: which flows still need it while it stops, where new flows go
//! meanwhile, and which flows the next daemon takes over from the kernel.
//!
//! Once the daemon exits, its TUN device and route are gone and the node's kernel takes all VIP
//! traffic that reaches it (fail-open). That keeps every flow this node serves itself. It loses
//! two kinds: flows this node entered and forwarded to a peer (the kernel has no such
//! connection and answers RST), and flows other entries forward here (nothing takes them off
//! the carrier, and peers reset them once this node has left). A stopping daemon waits for
//! those, and creates no new ones.
//!
//! The next daemon starts with an empty flow table. The flows the kernel kept meanwhile are
//! pinned here before the first packet ([`Node::adopt_local_flow`]); left to the
//! consistent-hash fallback, most of them would be sent to a peer, which answers RST.

use std::time::Duration;

use ringlb_wire::{classify, FlowKey, L4};

use super::{initial_state, next_state, Node, Verdict};
use crate::flow_table::PlacedBy;
use crate::{FlowState, Timestamp};

/// A handshake quiet for this long needs nobody: a live one sends again within a SYN's or
/// SYN-ACK's retransmission (after 1 s, then 2 s more). A quiet one has gone to another node
/// (its entry placed the retransmitted SYN anew, e.g. while this node was suspect) or was given
/// up; it would hold a stop until the handshake timeout.
const QUIET_HANDSHAKE: Duration = Duration::from_secs(3);

/// Live flows (not closing) that break if this node's daemon exits now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowsNeedingDaemon {
    /// Flows that entered here and are pinned to a peer that is not dead.
    pub forwarded: usize,
    /// Flows other entries forward here.
    pub served: usize,
}

impl FlowsNeedingDaemon {
    pub fn total(&self) -> usize {
        self.forwarded + self.served
    }
}

impl Node {
    /// Pins to this node a TCP connection its kernel already serves (the client's `key`), unless
    /// the flow is tracked. For a daemon that starts while the node serves connections: those
    /// it kept through fail-open delivery while no daemon ran, or that a previous daemon placed
    /// here. Returns whether the flow was added.
    pub fn adopt_local_flow(&mut self, now: Timestamp, key: FlowKey) -> bool {
        if !key.dst_is(self.config.vip) || self.flows.find(&key).is_some() {
            return false;
        }
        // Confirmed at once: the kernel holds the connection, so it is no spoofed first packet.
        let Some(ins) = self.flows.insert(now, key, self.config.local, PlacedBy::Policy) else { return false };
        self.flows.touch(ins.handle, now, FlowState::TcpEstablished);
        self.note_served(&key);
        if ins.evicted.is_some() {
            self.counters.flows_evicted += 1;
        }
        true
    }

    /// Counts the flows that still need this daemon at `now` (see [`FlowsNeedingDaemon`]);
    /// handshakes quiet for 3 s do not count. Walks the flow tables: a few times a second while
    /// stopping, never per packet.
    pub fn flows_needing_daemon(&self, now: Timestamp) -> FlowsNeedingDaemon {
        let (local, members) = (self.config.local, &self.members);
        let since = now.saturating_sub(QUIET_HANDSHAKE);
        let on_live_peer = |t| t != local && members.get(t).is_some_and(|m| !m.state.is_gone());
        FlowsNeedingDaemon {
            forwarded: self.flows.count_open(since, on_live_peer),
            served: self.served.count_open(since, |_| true),
        }
    }

    /// [`Node::on_tun_packet`] while the daemon stops. The node is still an entry (the router
    /// does not know that its daemon stops), and it serves the new flows that enter here
    /// itself, as fail-open delivery will once the daemon is gone: forwarded to a peer, a new
    /// flow would need this daemon for as long as it lasts. A flow pinned here stays here, a
    /// SYN included (with this node draining, [`Node::on_tun_packet`] would move it). Flows
    /// pinned to a peer keep going there. A node of weight 0 serves nothing and forwards as
    /// usual.
    pub fn on_tun_packet_stopping(&mut self, now: Timestamp, pkt: &mut [u8]) -> Verdict {
        let local = self.config.local;
        let serves = self.members.get(local).is_some_and(|m| m.weight > 0.0);
        let meta = match classify(pkt) {
            Ok(m) if serves && m.key.dst_is(self.config.vip) && !matches!(m.l4, L4::Icmp { .. }) => m,
            // Malformed, not for the VIP, ICMP, or no service here: the usual path decides.
            _ => return self.on_tun_packet(now, pkt),
        };
        match self.flows.find(&meta.key) {
            Some(h) if self.flows.target(h) == local => {
                let next = next_state(self.flows.state(h), meta.l4);
                self.flows.touch(h, now, next);
            }
            Some(h) => {
                // A SYN on a tuple pinned to a node that takes no new flows (of weight 0
                // included) starts a new connection, which the usual path would place anew: it
                // is served here.
                let new_connection = meta.is_tcp_syn() && !self.takes_new_flows(now, self.flows.target(h));
                if !new_connection {
                    return self.on_tun_packet(now, pkt);
                }
                self.flows.retarget(h, local);
                self.flows.touch(h, now, initial_state(meta.l4));
                self.counters.placed_local += 1;
                self.counters.served_new_flows += 1;
            }
            // A packet of a connection this entry never saw start (the router moved it here, or
            // the daemon restarted): its server is found as usual (flow recovery); served here,
            // the kernel would reset it.
            None if matches!(meta.l4, L4::Tcp(f) if !f.syn) => return self.on_tun_packet(now, pkt),
            None => {
                // Tracked when the table has room; served here either way.
                match self.flows.insert(now, meta.key, local, PlacedBy::Policy) {
                    Some(ins) => {
                        self.counters.flows_created += 1;
                        if ins.evicted.is_some() {
                            self.counters.flows_evicted += 1;
                        }
                    }
                    None => self.counters.flows_untracked += 1,
                }
                self.counters.placed_local += 1;
                self.counters.served_new_flows += 1;
            }
        }
        self.counters.delivered_local += 1;
        Verdict::Deliver
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use ringlb_wire::build::{tcp_v4, udp_v4};

    use super::*;
    use crate::{FailurePolicy, FlowConfig, Member, MemberState, Members, NodeConfig, NodeId, Policy};

    const VIP: [u8; 4] = [10, 200, 0, 10];
    const CLIENT: [u8; 4] = [10, 78, 0, 100];
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN_ACK: u8 = 0x11;

    fn ip(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    /// Node n1 of three; `weight` is n1's own.
    fn node(weight: f64) -> Node {
        let members = Members::new((1..=3).map(|i| {
            let w = if i == 1 { weight } else { 1.0 };
            Member::new(format!("n{i}"), ip([10, 77, 0, i]), w)
        }))
        .unwrap();
        let config = NodeConfig {
            local: NodeId(0),
            vip: ip(VIP),
            tun_mtu: 1472,
            flows: FlowConfig::default(),
            // No margin and no load: the first SYNs spread over all three.
            policy: Policy::PowerOfTwo { margin: 0.0 },
            seed: 7,
            on_failure: FailurePolicy::Reset,
            load_stale_after: Duration::from_secs(1),
            require_load: false,
            // Settled from the first tick: these tests are about placement.
            recovery: crate::RecoveryConfig {
                settle: Duration::ZERO,
                query_grace: Duration::ZERO,
                ..Default::default()
            },
        };
        Node::new(config, members)
    }

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_duration(Duration::from_millis(ms))
    }

    fn tcp(port: u16, flags: u8) -> Vec<u8> {
        tcp_v4(CLIENT, VIP, port, 80, flags, &[])
    }

    fn peer(v: Verdict) -> Option<NodeId> {
        match v {
            Verdict::Forward { peer, .. } => Some(peer),
            _ => None,
        }
    }

    #[test]
    fn forwarded_and_served_flows_are_counted_until_they_close_or_their_node_dies() {
        let mut n = node(1.0);
        let mut on_peers = Vec::new();
        for port in 1..40 {
            if let Some(p) = peer(n.on_tun_packet(at(0), &mut tcp(port, SYN))) {
                on_peers.push((port, p));
            }
        }
        assert!(on_peers.len() >= 10, "too few flows placed on peers: {}", on_peers.len());
        // Two flows another entry (n2) forwards here, one of them UDP.
        let from_n2 = ip([10, 77, 0, 2]);
        n.on_carrier_packet(at(0), from_n2, &tcp_v4(CLIENT, VIP, 5000, 80, SYN, &[]));
        n.on_carrier_packet(at(0), from_n2, &udp_v4(CLIENT, VIP, 5001, 53, b"q"));
        let want = FlowsNeedingDaemon { forwarded: on_peers.len(), served: 2 };
        assert_eq!(n.flows_needing_daemon(at(1)), want);
        // A FIN closes a forwarded flow and a served one: they may linger, nobody waits.
        n.on_tun_packet(at(1), &mut tcp(on_peers[0].0, FIN_ACK));
        n.on_carrier_packet(at(1), from_n2, &tcp_v4(CLIENT, VIP, 5000, 80, FIN_ACK, &[]));
        let want = FlowsNeedingDaemon { forwarded: on_peers.len() - 1, served: 1 };
        assert_eq!(n.flows_needing_daemon(at(1)), want);
        // n3 dies: its flows are reset whether the daemon runs or not.
        n.upsert_member("n3", ip([10, 77, 0, 3]), 1.0, MemberState::Dead).unwrap();
        let on_n2 = on_peers[1..].iter().filter(|(_, p)| *p == NodeId(1)).count();
        assert_eq!(n.flows_needing_daemon(at(1)).forwarded, on_n2);
        // Handshakes that stay quiet for 3 s have gone elsewhere: only the UDP flow is left.
        assert_eq!(n.flows_needing_daemon(at(3_001)), FlowsNeedingDaemon { forwarded: 0, served: 1 });
    }

    #[test]
    fn a_stopping_node_serves_new_flows_itself_and_keeps_pinned_ones_where_they_are() {
        let mut n = node(1.0);
        let (port, pinned) = (1..40)
            .find_map(|port| peer(n.on_tun_packet(at(0), &mut tcp(port, SYN))).map(|p| (port, p)))
            .expect("a flow placed on a peer");
        n.set_draining(true);
        let (before, delivered) = (n.flows_needing_daemon(at(1)), n.counters().delivered_local);
        for port in 100..140 {
            assert_eq!(n.on_tun_packet_stopping(at(1), &mut tcp(port, SYN)), Verdict::Deliver);
            assert_eq!(n.on_tun_packet_stopping(at(2), &mut tcp(port, ACK)), Verdict::Deliver);
            // A retransmitted SYN stays too, though this node is draining.
            assert_eq!(n.on_tun_packet_stopping(at(3), &mut tcp(port, SYN)), Verdict::Deliver);
        }
        let udp = &mut udp_v4(CLIENT, VIP, 7000, 53, b"q");
        assert_eq!(n.on_tun_packet_stopping(at(3), udp), Verdict::Deliver);
        assert_eq!(n.flows_needing_daemon(at(5)), before, "new flows made the daemon needed longer");
        assert_eq!(peer(n.on_tun_packet_stopping(at(4), &mut tcp(port, ACK))), Some(pinned), "pinned flow moved");
        // Its peer drains too: a new connection on its tuple is served here.
        let m = n.members().get(pinned).unwrap().clone();
        n.upsert_member(&m.name, m.addr, 1.0, MemberState::Draining).unwrap();
        assert_eq!(n.on_tun_packet_stopping(at(5), &mut tcp(port, SYN)), Verdict::Deliver);
        assert_eq!(n.counters().delivered_local - delivered, 40 * 3 + 2);
    }

    #[test]
    fn a_stopping_node_serves_a_new_connection_on_a_tuple_pinned_to_a_peer_of_weight_zero() {
        let mut n = node(1.0);
        let (port, pinned) = (1..40)
            .find_map(|port| peer(n.on_tun_packet(at(0), &mut tcp(port, SYN))).map(|p| (port, p)))
            .expect("a flow placed on a peer");
        n.on_tun_packet(at(1), &mut tcp(port, FIN_ACK));
        n.set_draining(true);
        let m = n.members().get(pinned).unwrap().clone();
        n.upsert_member(&m.name, m.addr, 0.0, MemberState::Alive).unwrap();
        assert_eq!(n.on_tun_packet_stopping(at(2), &mut tcp(port, SYN)), Verdict::Deliver);
        assert_eq!(n.on_tun_packet_stopping(at(3), &mut tcp(port, ACK)), Verdict::Deliver);
    }

    #[test]
    fn a_stopping_node_sends_connections_it_never_saw_start_to_their_home() {
        let mut n = node(1.0);
        n.set_draining(true);
        // Mid-connection packets of unknown flows: those homed at a peer go there, not to the
        // local kernel (which would reset them).
        let homed_away =
            (200..260).filter(|&port| peer(n.on_tun_packet_stopping(at(1), &mut tcp(port, ACK))).is_some()).count();
        assert!(homed_away > 20, "only {homed_away} of 60 unknown connections went to their home");
        assert_eq!(n.counters().placed_by_hash_fallback, 60);
    }

    #[test]
    fn adopted_connections_stay_here_when_peers_take_flows() {
        let mut n = node(1.0);
        let key = |port| ringlb_wire::classify(&tcp(port, ACK)).unwrap().key;
        for port in 1..40 {
            assert!(n.adopt_local_flow(at(0), key(port)));
        }
        assert!(!n.adopt_local_flow(at(0), key(1)), "adopted twice");
        let elsewhere = ringlb_wire::classify(&tcp_v4(CLIENT, [10, 200, 0, 11], 1, 80, ACK, &[])).unwrap().key;
        assert!(!n.adopt_local_flow(at(0), elsewhere), "not for the VIP");
        for port in 1..40 {
            assert_eq!(n.on_tun_packet(at(1), &mut tcp(port, ACK)), Verdict::Deliver, "port {port} moved");
        }
        // Without adoption, the hash fallback sends most of such packets to a peer.
        let moved = (100..140).filter(|&port| peer(n.on_tun_packet(at(1), &mut tcp(port, ACK))).is_some()).count();
        assert!(moved > 10, "only {moved} of 40 unknown connections went to a peer");
        assert_eq!(n.counters().placed_by_hash_fallback, 40);
    }

    #[test]
    fn a_stopping_node_of_weight_zero_still_forwards() {
        let mut n = node(0.0);
        n.set_draining(true);
        for port in 1..20 {
            assert!(peer(n.on_tun_packet_stopping(at(0), &mut tcp(port, SYN))).is_some(), "port {port} served here");
        }
        assert_eq!(n.flows_needing_daemon(at(0)).forwarded, 19);
    }
}
