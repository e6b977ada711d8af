//! The kernel fast path's rules (`node/offload.rs`), driven through the public `Node` API only:
//! which flows are offered (`Install`), when they are withdrawn (`Remove`), and how the usage
//! the fast path reports flows back into the counters and the flow tables.
//!
//! The node under test is n1 (10.77.0.1, local) in a cluster of three; n2 and n3 are peers.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ringlb_core::cluster::message::DEFAULT_SITE;
use ringlb_core::{
    DropReason, FailurePolicy, FlowConfig, Member, MemberState, Members, Node, NodeConfig, NodeId, OffloadCounters,
    OffloadOp, OffloadUsage, Offloaded, Policy, RecoveryConfig, Timestamp, Update, Verdict,
};
use ringlb_wire::build::{tcp_v4, udp_v4};
use ringlb_wire::FlowKey;

const VIP: [u8; 4] = [10, 200, 0, 10];
const CLIENT: [u8; 4] = [10, 78, 0, 100];
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

const LOCAL: NodeId = NodeId(0);
const N2: NodeId = NodeId(1);
const N3: NodeId = NodeId(2);

fn ip(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn underlay(i: u8) -> IpAddr {
    ip([10, 77, 0, i])
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_duration(Duration::from_millis(ms))
}

fn secs(s: u64) -> Timestamp {
    at(s * 1000)
}

/// n1 (local), n2, n3; flow recovery settled from the start so that it stays out of the way.
fn node() -> Node {
    let members = Members::new((1..=3).map(|i| Member::new(format!("n{i}"), underlay(i), 1.0))).unwrap();
    Node::new(
        NodeConfig {
            local: LOCAL,
            vip: ip(VIP),
            tun_mtu: 1472,
            flows: FlowConfig::default(),
            policy: Policy::PowerOfTwo { margin: 0.1 },
            seed: 42,
            on_failure: FailurePolicy::Reset,
            load_stale_after: Duration::from_secs(1),
            require_load: false,
            recovery: RecoveryConfig {
                settle: Duration::ZERO,
                query_grace: Duration::ZERO,
                ..RecoveryConfig::default()
            },
        },
        members,
    )
}

/// A node offloading at most `max` flows, with both peers eligible.
fn offloading(max: usize) -> Node {
    let mut n = node();
    n.enable_offload(max);
    n.set_offload_eligible(N2, true);
    n.set_offload_eligible(N3, true);
    n
}

fn tcp(port: u16, flags: u8) -> Vec<u8> {
    tcp_v4(CLIENT, VIP, port, 80, flags, &[])
}

fn udp(port: u16) -> Vec<u8> {
    udp_v4(CLIENT, VIP, port, 53, b"q")
}

fn key(pkt: &[u8]) -> FlowKey {
    ringlb_wire::classify(pkt).unwrap().key
}

fn tcp_key(port: u16) -> FlowKey {
    key(&tcp(port, ACK))
}

fn target(v: Verdict) -> NodeId {
    match v {
        Verdict::Deliver => LOCAL,
        Verdict::Forward { peer, .. } => peer,
        Verdict::Drop(r) => panic!("dropped: {r:?}"),
    }
}

fn ops(n: &mut Node) -> Vec<OffloadOp> {
    let mut out = Vec::new();
    n.drain_offload_ops(&mut out);
    out
}

fn counters(n: &Node) -> OffloadCounters {
    n.offload_counters().expect("offload enabled")
}

/// Opens TCP connections (a SYN each, at `now`) from port `from` on until one is placed on
/// `want`; returns its port. The SYNs placed elsewhere stay unconfirmed, never offered.
fn port_placed_on(n: &mut Node, now: Timestamp, from: u16, want: NodeId) -> u16 {
    (from..from + 200)
        .find(|&p| target(n.on_tun_packet(now, &mut tcp(p, SYN))) == want)
        .unwrap_or_else(|| panic!("no flow placed on {want:?}"))
}

/// A TCP connection placed on `want` and established (SYN at `now`, ACK 1 ms later), with the
/// ops that produced drained. Returns its port.
fn established_on(n: &mut Node, now: Timestamp, from: u16, want: NodeId) -> u16 {
    let port = port_placed_on(n, now, from, want);
    let later = now.saturating_add(Duration::from_millis(1));
    assert_eq!(target(n.on_tun_packet(later, &mut tcp(port, ACK))), want);
    port
}

fn usage(key: FlowKey, packets: u64, bytes: u64, last_seen: Timestamp) -> OffloadUsage {
    OffloadUsage { key, packets, bytes, last_seen: Some(last_seen) }
}

fn member_update(name: &str, addr: IpAddr, state: MemberState) -> Update {
    Update::Member { name: name.to_owned(), underlay: addr, weight: 1.0, state, site: DEFAULT_SITE.to_owned() }
}

#[test]
fn a_forwarded_tcp_flow_is_installed_once_it_is_established() {
    let mut n = offloading(16);
    let port = port_placed_on(&mut n, at(0), 1000, N2);
    assert_eq!(ops(&mut n), [], "a SYN (unconfirmed handshake) is never offered");
    let v = n.on_tun_packet(at(1), &mut tcp(port, ACK));
    let Verdict::Forward { peer, addr, flow_hash } = v else { panic!("not forwarded: {v:?}") };
    assert_eq!((peer, addr), (N2, underlay(2)));
    assert_eq!(flow_hash, tcp_key(port).stable_hash());
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(port), Offloaded::Forward { peer, addr, flow_hash })]);
    for ms in 2..6 {
        n.on_tun_packet(at(ms), &mut tcp(port, ACK));
    }
    assert_eq!(ops(&mut n), [], "offered twice");
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn, c.refused_full), (1, 1, 0, 0));
    // Reconciling a flow the tables still back withdraws nothing.
    n.reconcile_offload(at(10), &[]);
    assert_eq!(ops(&mut n), []);
}

#[test]
fn local_tcp_and_udp_flows_are_installed_icmp_never() {
    let mut n = offloading(16);
    let port = established_on(&mut n, at(0), 1000, LOCAL);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(port), Offloaded::Local)]);

    // UDP: the first datagram is unconfirmed, the second settles the flow.
    let (mut first, udp_port) = (1..200)
        .map(|p| (udp(p), p))
        .find(|(pkt, _)| n.on_tun_packet(at(10), &mut pkt.clone()) == Verdict::Deliver)
        .unwrap();
    assert_eq!(ops(&mut n), [], "a first datagram is never offered");
    assert_eq!(n.on_tun_packet(at(11), &mut first), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(key(&udp(udp_port)), Offloaded::Local)]);

    // A UDP flow to a peer is offered with its carrier details.
    let fwd_port = (200..400).find(|&p| target(n.on_tun_packet(at(20), &mut udp(p))) == N3).unwrap();
    let v = n.on_tun_packet(at(21), &mut udp(fwd_port));
    let Verdict::Forward { peer, addr, flow_hash } = v else { panic!("not forwarded: {v:?}") };
    assert_eq!(ops(&mut n), [OffloadOp::Install(key(&udp(fwd_port)), Offloaded::Forward { peer, addr, flow_hash })]);

    // ICMP (an echo request), however often: never.
    let mut echo = udp_v4(CLIENT, VIP, 0, 0, &[]);
    echo.truncate(20);
    echo[9] = 1;
    echo.extend_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    echo[2..4].copy_from_slice(&28u16.to_be_bytes());
    ringlb_wire::build::fix_ipv4_checksum(&mut echo);
    for ms in 30..35 {
        assert_eq!(n.on_tun_packet(at(ms), &mut echo.clone()), Verdict::Deliver);
    }
    assert_eq!(ops(&mut n), [], "icmp offered");
    assert_eq!(counters(&n).flows, 3);
}

#[test]
fn without_enable_offload_nothing_is_ever_offered() {
    let mut n = node();
    n.set_offload_eligible(N2, true);
    let local = established_on(&mut n, at(0), 1000, LOCAL);
    let fwd = established_on(&mut n, at(0), 1200, N2);
    n.on_carrier_packet(at(2), underlay(3), &tcp(3000, SYN));
    n.on_carrier_packet(at(3), underlay(3), &tcp(3000, ACK));
    let forwarded = n.forwarded_to(N2);
    n.reconcile_offload(at(4), &[usage(tcp_key(local), 5, 500, at(3)), usage(tcp_key(fwd), 5, 500, at(3))]);
    assert_eq!(ops(&mut n), []);
    assert_eq!(n.offload_counters(), None);
    assert_eq!(n.forwarded_to(N2), forwarded, "usage credited with offload off");
}

#[test]
fn ineligible_peers_are_not_offered_and_losing_eligibility_withdraws() {
    let mut n = node();
    n.enable_offload(16);
    // Never marked: ineligible. The local node is always eligible.
    let fwd = established_on(&mut n, at(0), 1000, N2);
    assert_eq!(ops(&mut n), [], "offered to a member never marked eligible");
    let local = established_on(&mut n, at(10), 1200, LOCAL);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(local), Offloaded::Local)]);
    n.set_offload_eligible(LOCAL, false);
    n.reconcile_offload(at(15), &[]);
    assert_eq!(ops(&mut n), [], "the local node is always eligible");

    // Marked eligible: the flow's next packet offers it.
    n.set_offload_eligible(N2, true);
    n.on_tun_packet(at(20), &mut tcp(fwd, ACK));
    let [OffloadOp::Install(k, Offloaded::Forward { peer: N2, .. })] = ops(&mut n)[..] else { panic!("not offered") };
    assert_eq!(k, tcp_key(fwd));

    // Marked ineligible (the carrier to n2 became sealed): withdrawn at the next
    // reconciliation, not before, and not offered again.
    n.set_offload_eligible(N2, false);
    assert_eq!(ops(&mut n), []);
    n.reconcile_offload(at(30), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(fwd))]);
    n.on_tun_packet(at(31), &mut tcp(fwd, ACK));
    assert_eq!(ops(&mut n), []);
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn), (1, 2, 1));
}

#[test]
fn a_fin_rst_or_new_syn_seen_by_the_daemon_withdraws_at_once() {
    let mut n = offloading(16);
    let mut ports = Vec::new();
    for (i, flags) in [FIN_ACK, RST, SYN].into_iter().enumerate() {
        let from = 1000 + 200 * u16::try_from(i).unwrap();
        let port = established_on(&mut n, at(0), from, N2);
        ports.push((port, flags));
    }
    assert_eq!(ops(&mut n).len(), 3);
    // At once, not at the next reconciliation: a SYN on a reused tuple may pin the flow
    // elsewhere, and the handshake's next packet must not follow the old entry.
    for &(port, flags) in &ports {
        n.on_tun_packet(at(10), &mut tcp(port, flags));
    }
    let mut removed = ops(&mut n);
    removed.sort_by_key(|op| format!("{op:?}"));
    let mut want: Vec<_> = ports.iter().map(|&(p, _)| OffloadOp::Remove(tcp_key(p))).collect();
    want.sort_by_key(|op| format!("{op:?}"));
    assert_eq!(removed, want);
    // A closing flow's stragglers are not offered again.
    n.on_tun_packet(at(21), &mut tcp(ports[0].0, ACK));
    assert_eq!(ops(&mut n), []);
    assert_eq!(counters(&n).flows, 0);
}

/// The established idle timeout of the default flow config.
const IDLE: Duration = Duration::from_secs(900);

#[test]
fn usage_keeps_a_busy_flow_alive_and_counts_only_what_is_new() {
    let mut n = offloading(16);
    let busy = established_on(&mut n, at(0), 1000, N2);
    let quiet = established_on(&mut n, at(0), 1200, N2);
    assert_eq!(ops(&mut n).len(), 2);
    let forwarded_before = n.forwarded_to(N2);

    // Every packet of `busy` goes through the kernel for longer than the idle timeout; the
    // daemon reconciles every second and runs its timers.
    let (mut packets, mut bytes) = (0, 0);
    let end = IDLE.as_secs() + 60;
    for s in 1..=end {
        packets += 10;
        bytes += 10_000;
        let now = secs(s);
        n.reconcile_offload(now, &[usage(tcp_key(busy), packets, bytes, at(s * 1000 - 100))]);
        n.handle_timeout(now);
    }
    assert!(n.flows().find(&tcp_key(busy)).is_some(), "a busy offloaded flow idled out");
    assert_eq!(n.flows().find(&tcp_key(quiet)), None, "a quiet one did not");
    // The quiet one was withdrawn at the first reconciliation after it expired; the busy one
    // never.
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(quiet))]);
    let c = counters(&n);
    assert_eq!(
        (c.flows, c.forwarded_packets, c.bytes, c.local_packets, c.decapsulated_packets),
        (1, packets, bytes, 0, 0)
    );
    assert_eq!(n.forwarded_to(N2), forwarded_before + packets, "per-peer forwarded count");

    // The same totals again (nothing new), or the totals of a flow not offloaded: nothing.
    let now = secs(end);
    n.reconcile_offload(now, &[usage(tcp_key(busy), packets, bytes, now), usage(tcp_key(quiet), 99, 99, now)]);
    n.reconcile_offload(now, &[usage(tcp_key(busy), packets, bytes, now)]);
    assert_eq!(counters(&n), c);
    // (The kernel's table must not hold a flow the core does not: removed.)
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(quiet))]);

    // Once its packets stop, it idles out from its last one (or the reconciliation that
    // reported it), and is withdrawn.
    let last = at(end * 1000 - 100);
    n.handle_timeout(last.saturating_add(IDLE - Duration::from_millis(1)));
    assert!(n.flows().find(&tcp_key(busy)).is_some());
    n.reconcile_offload(last.saturating_add(IDLE - Duration::from_millis(1)), &[]);
    assert_eq!(ops(&mut n), []);
    n.handle_timeout(now.saturating_add(IDLE));
    assert_eq!(n.flows().find(&tcp_key(busy)), None);
    n.reconcile_offload(now.saturating_add(IDLE), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(busy))]);
    assert_eq!(counters(&n).flows, 0);
}

#[test]
fn local_usage_counts_as_local_and_a_last_seen_in_the_future_is_now() {
    let mut n = offloading(16);
    let port = established_on(&mut n, at(0), 1000, LOCAL);
    assert_eq!(ops(&mut n).len(), 1);
    // A fast-path clock ahead of the daemon's: the flow is touched at `now`, no later.
    n.reconcile_offload(secs(10), &[usage(tcp_key(port), 3, 300, secs(10_000))]);
    let c = counters(&n);
    assert_eq!((c.local_packets, c.forwarded_packets, c.bytes), (3, 0, 300));
    n.handle_timeout(secs(10).saturating_add(IDLE));
    assert_eq!(n.flows().find(&tcp_key(port)), None, "touched later than now");
}

#[test]
fn flows_of_a_member_that_dies_leaves_or_moves_are_withdrawn_not_of_one_suspect_or_draining() {
    let mut n = offloading(16);
    let to_n2 = established_on(&mut n, at(0), 1000, N2);
    let to_n3 = established_on(&mut n, at(0), 1200, N3);
    assert_eq!(ops(&mut n).len(), 2);

    // n2 dies, as the cluster state machine reports it.
    n.apply(at(10), &member_update("n2", underlay(2), MemberState::Dead)).unwrap();
    n.reconcile_offload(at(20), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(to_n2))], "only the dead member's flow");
    // Its next packet is reset here (FailurePolicy::Reset): never offloaded to the dead n2.
    assert_eq!(n.on_tun_packet(at(21), &mut tcp(to_n2, ACK)), Verdict::Deliver);
    assert!(!ops(&mut n).iter().any(|op| matches!(op, OffloadOp::Install(_, Offloaded::Forward { peer: N2, .. }))));

    // n3 is suspected, then draining: its pinned flows still flow (the daemon's path would
    // forward them too), so the fast path keeps carrying them.
    n.apply(at(30), &member_update("n3", underlay(3), MemberState::Suspect)).unwrap();
    n.reconcile_offload(at(31), &[]);
    assert_eq!(ops(&mut n), [], "a suspect member's flow withdrawn");
    n.apply(at(32), &member_update("n3", underlay(3), MemberState::Draining)).unwrap();
    n.reconcile_offload(at(33), &[]);
    assert_eq!(ops(&mut n), [], "a draining member's flow withdrawn");
    // Left: withdrawn (its flows go to its kernel through the daemon's path).
    n.apply(at(34), &member_update("n3", underlay(3), MemberState::Left)).unwrap();
    n.reconcile_offload(at(35), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(to_n3))]);

    // Alive again, at a new underlay address: offered with the new address; then moving again
    // withdraws it.
    let moved = ip([10, 77, 0, 33]);
    n.apply(at(40), &member_update("n3", moved, MemberState::Alive)).unwrap();
    let v = n.on_tun_packet(at(41), &mut tcp(to_n3, ACK));
    assert!(matches!(v, Verdict::Forward { peer: N3, addr, .. } if addr == moved));
    let [OffloadOp::Install(_, Offloaded::Forward { peer: N3, addr, .. })] = ops(&mut n)[..] else { panic!() };
    assert_eq!(addr, moved);
    n.apply(at(50), &member_update("n3", underlay(3), MemberState::Alive)).unwrap();
    n.reconcile_offload(at(51), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(to_n3))], "installed with a stale address");

    // Forgotten by the cluster: withdrawn too.
    n.on_tun_packet(at(60), &mut tcp(to_n3, ACK));
    assert_eq!(ops(&mut n).len(), 1);
    n.apply(at(61), &Update::Removed { name: "n3".to_owned() }).unwrap();
    n.reconcile_offload(at(62), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(to_n3))]);
}

#[test]
fn a_flow_pinned_elsewhere_is_withdrawn_even_if_its_member_comes_back() {
    let mut n = offloading(16);
    let port = established_on(&mut n, at(0), 1000, N2);
    assert_eq!(ops(&mut n).len(), 1);
    // n2 is declared dead and the flow's next packet is reset here: it is pinned to this node
    // now. Then n2 refutes its death before the next reconciliation.
    n.apply(at(10), &member_update("n2", underlay(2), MemberState::Dead)).unwrap();
    assert_eq!(n.on_tun_packet(at(11), &mut tcp(port, ACK)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(port))], "the fast path still forwards it to n2");
    n.apply(at(12), &member_update("n2", underlay(2), MemberState::Alive)).unwrap();
    n.reconcile_offload(at(20), &[]);
    assert_eq!(ops(&mut n), [], "withdrawn twice");
    // Offered again as the daemon now handles it.
    assert_eq!(n.on_tun_packet(at(21), &mut tcp(port, ACK)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(port), Offloaded::Local)]);
}

#[test]
fn usage_keeps_a_busy_served_flow_alive() {
    const UDP_IDLE: u64 = 120;
    let mut n = offloading(16);
    for ms in [0, 1] {
        n.on_carrier_packet(at(ms), underlay(2), &udp(4000));
        n.on_carrier_packet(at(ms), underlay(2), &udp(4001));
    }
    assert_eq!(ops(&mut n).len(), 2);
    assert_eq!(n.served_flows(), 2);
    for s in 1..=UDP_IDLE + 30 {
        n.reconcile_offload(secs(s), &[usage(key(&udp(4000)), s, s * 100, secs(s))]);
        n.handle_timeout(secs(s));
    }
    assert_eq!(n.served_flows(), 1, "the busy served flow idled out, or the quiet one did not");
    assert_eq!(ops(&mut n), [OffloadOp::Remove(key(&udp(4001)))]);
    assert_eq!(counters(&n).decapsulated_packets, UDP_IDLE + 30);
}

#[test]
fn served_flows_from_a_member_entry_are_installed_from_non_members_never() {
    let mut n = offloading(16);
    let from_n2 = tcp(4000, ACK);
    // The handshake through the carrier: a SYN is not offered, the ACK settles the flow.
    assert_eq!(n.on_carrier_packet(at(0), underlay(2), &tcp(4000, SYN)), Verdict::Deliver);
    assert_eq!(ops(&mut n), []);
    assert_eq!(n.on_carrier_packet(at(1), underlay(2), &from_n2), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(key(&from_n2), Offloaded::Served { entry: N2, from: underlay(2) })]);
    n.on_carrier_packet(at(2), underlay(2), &from_n2);
    assert_eq!(ops(&mut n), [], "offered twice");

    // UDP served for n3.
    n.on_carrier_packet(at(3), underlay(3), &udp(4001));
    assert_eq!(ops(&mut n), []);
    n.on_carrier_packet(at(4), underlay(3), &udp(4001));
    assert_eq!(ops(&mut n), [OffloadOp::Install(key(&udp(4001)), Offloaded::Served { entry: N3, from: underlay(3) })]);

    // From an address that is no member's, or this node's own: dropped, never offered.
    for src in [ip([10, 77, 0, 9]), underlay(1)] {
        for flags in [SYN, ACK, ACK] {
            let v = n.on_carrier_packet(at(5), src, &tcp(4002, flags));
            assert_eq!(v, Verdict::Drop(DropReason::NotMember));
        }
    }
    assert_eq!(ops(&mut n), []);

    // Usage of a served flow counts as decapsulated.
    n.reconcile_offload(at(10), &[usage(key(&from_n2), 4, 400, at(9))]);
    assert_eq!(ops(&mut n), []);
    let c = counters(&n);
    assert_eq!((c.decapsulated_packets, c.forwarded_packets, c.local_packets, c.bytes), (4, 0, 0, 400));

    // The entry turns ineligible: its served flows are withdrawn, the other entry's stay.
    n.set_offload_eligible(N2, false);
    n.reconcile_offload(at(20), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(key(&from_n2))]);
    n.on_carrier_packet(at(21), underlay(2), &from_n2);
    assert_eq!(ops(&mut n), [], "offered from an ineligible entry");

    // The entry of the UDP flow dies: withdrawn.
    n.apply(at(30), &member_update("n3", underlay(3), MemberState::Dead)).unwrap();
    n.reconcile_offload(at(31), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(key(&udp(4001)))]);
    assert_eq!(counters(&n).flows, 0);
}

#[test]
fn a_served_flow_closing_is_withdrawn() {
    let mut n = offloading(16);
    n.on_carrier_packet(at(0), underlay(2), &tcp(4000, SYN));
    n.on_carrier_packet(at(1), underlay(2), &tcp(4000, ACK));
    assert_eq!(ops(&mut n).len(), 1);
    n.on_carrier_packet(at(2), underlay(2), &tcp(4000, FIN_ACK));
    n.reconcile_offload(at(3), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(4000))]);
}

#[test]
fn a_full_fast_path_refuses_flows_until_one_is_withdrawn() {
    let mut n = offloading(1);
    let first = established_on(&mut n, at(0), 1000, LOCAL);
    let second = established_on(&mut n, at(0), 1200, LOCAL);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(first), Offloaded::Local)]);
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.refused_full), (1, 1, 1));
    // Served flows share the same table.
    n.on_carrier_packet(at(1), underlay(2), &udp(4001));
    n.on_carrier_packet(at(2), underlay(2), &udp(4001));
    assert_eq!(ops(&mut n), []);
    assert_eq!(counters(&n).refused_full, 2);

    // The first closes and is withdrawn: the second's next packet offers it.
    n.on_tun_packet(at(10), &mut tcp(first, FIN_ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(first))]);
    n.reconcile_offload(at(11), &[]);
    n.on_tun_packet(at(12), &mut tcp(second, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(second), Offloaded::Local)]);
    assert_eq!(counters(&n).flows, 1);
}

/// `refused_full` counts flows, not their packets (a busy flow that finds the table full must not
/// inflate it by its packet rate). Once a bug.
#[test]
fn refused_full_counts_flows_not_packets() {
    let mut n = offloading(1);
    established_on(&mut n, at(0), 1000, LOCAL);
    let second = established_on(&mut n, at(0), 1200, LOCAL);
    for ms in 1..10 {
        n.on_tun_packet(at(ms), &mut tcp(second, ACK));
    }
    assert_eq!(counters(&n).refused_full, 1);
}

/// Reconciliation keeps the flow table's lists ordered by last activity. Once a bug: it touched
/// flows at the fast path's `last_seen`, earlier than `now`, while `FlowTable::touch` appends at
/// the tail whatever the time; a flow touched by the daemon's path in between (or an earlier
/// entry of the same usage batch, in the BPF map's order) then sat before it with a later time,
/// and expiry, which looks only at each list's head, ran late for the flows stuck behind.
#[test]
fn reconciliation_keeps_the_flow_lists_ordered() {
    let mut n = offloading(16);
    let a = established_on(&mut n, at(0), 1000, LOCAL);
    let b = established_on(&mut n, at(0), 1200, LOCAL);
    let daemon = established_on(&mut n, at(0), 1400, N2);
    // `daemon`'s flow is not offloaded (n2 ineligible) and sees a packet at 900 ms; the fast
    // path saw `b` at 800 ms and `a` at 500 ms, and reports them in that order.
    n.set_offload_eligible(N2, false);
    n.on_tun_packet(at(900), &mut tcp(daemon, ACK));
    n.reconcile_offload(secs(1), &[usage(tcp_key(b), 1, 100, at(800)), usage(tcp_key(a), 1, 100, at(500))]);
    n.flows().check_invariants();
}

/// "Every member starts ineligible", also one that takes a forgotten member's slot (eligibility
/// is kept by slot index). Once a bug, harmless only because the driver re-marks every member
/// after each member update.
#[test]
fn a_member_in_a_reused_slot_starts_ineligible() {
    let mut n = offloading(16);
    n.apply(at(0), &Update::Removed { name: "n3".to_owned() }).unwrap();
    n.apply(at(0), &member_update("n4", ip([10, 77, 0, 4]), MemberState::Alive)).unwrap();
    let n4 = n.members().by_name("n4").unwrap();
    assert_eq!(n4, N3, "the slot is reused");
    established_on(&mut n, at(1), 1000, n4);
    assert_eq!(ops(&mut n), [], "offered to a member never marked eligible");
}

/// A short flow can start and end between two reconciliations: what the fast path did for it,
/// read as its entry is removed, still counts.
#[test]
fn a_flow_withdrawn_between_reconciliations_still_counts_what_it_did() {
    let mut n = offloading(16);
    let port = established_on(&mut n, at(0), 1000, N2);
    assert_eq!(ops(&mut n).len(), 1);
    n.on_tun_packet(at(10), &mut tcp(port, FIN_ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(port))]);
    let before = n.forwarded_to(N2);
    n.offload_removed(at(11), &usage(tcp_key(port), 30_000, 40_000_000, at(9)));
    assert_eq!(n.forwarded_to(N2) - before, 30_000);
    assert_eq!(counters(&n).forwarded_packets, 30_000);
    // Reported once only; and nothing for a flow never withdrawn.
    n.offload_removed(at(12), &usage(tcp_key(port), 30_000, 40_000_000, at(9)));
    n.offload_removed(at(12), &usage(tcp_key(4242), 5, 500, at(9)));
    assert_eq!(counters(&n).forwarded_packets, 30_000);
}

/// A served flow whose entry changes (ECMP moved it, a new layer-2 owner) is withdrawn and
/// offered again for the new entry, rather than left installed for the old one, whose packets
/// no longer come. (Found in review.)
#[test]
fn a_served_flow_whose_entry_changes_is_offered_again_for_the_new_one() {
    let mut n = offloading(16);
    n.on_carrier_packet(at(0), underlay(2), &tcp(4000, SYN));
    n.on_carrier_packet(at(1), underlay(2), &tcp(4000, ACK));
    assert_eq!(ops(&mut n).len(), 1);
    n.on_carrier_packet(at(2), underlay(3), &tcp(4000, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(4000))]);
    n.on_carrier_packet(at(3), underlay(3), &tcp(4000, ACK));
    let [OffloadOp::Install(_, Offloaded::Served { entry, .. })] = ops(&mut n)[..] else { panic!("not offered again") };
    assert_eq!(entry, N3);
}

/// Two spoofed packets settle a made-up flow (an entry never sees replies). While the fast
/// path's table is nearly full, flows that carry nothing are withdrawn within seconds, so such
/// flows cannot keep real ones out for long. (Found in review.)
#[test]
fn under_pressure_flows_that_carry_nothing_make_room() {
    let mut n = offloading(100);
    for p in 20000..20100u16 {
        n.on_tun_packet(at(0), &mut tcp(p, ACK));
        n.on_tun_packet(at(1), &mut tcp(p, ACK));
    }
    assert_eq!(counters(&n).flows, 100, "made-up flows fill the table");
    ops(&mut n);
    // One of them is real and busy.
    let busy = tcp_key(20000);
    n.reconcile_offload(secs(1), &[usage(busy, 10, 10_000, secs(1))]);
    assert_eq!(ops(&mut n), [], "withdrawn before they could have carried anything");
    n.reconcile_offload(secs(3), &[usage(busy, 500, 500_000, secs(3))]);
    let removed = ops(&mut n).len();
    assert_eq!(removed, 99, "the idle ones make room, the busy one stays");
    assert_eq!(counters(&n).flows, 1);
    // Below the pressure mark, idle flows stay (a quiet keep-alive connection is no attack).
    let mut quiet = offloading(100);
    established_on(&mut quiet, at(0), 1000, LOCAL);
    ops(&mut quiet);
    quiet.reconcile_offload(secs(60), &[]);
    assert_eq!(ops(&mut quiet), []);
}

/// An entry in the kernel's table that the core does not know (a delete that failed) is
/// removed at the next reconciliation; a flow the kernel refused is forgotten and offered again.
#[test]
fn the_kernel_table_and_the_core_agree_after_a_reconciliation() {
    let mut n = offloading(16);
    n.reconcile_offload(at(0), &[usage(tcp_key(4321), 3, 300, at(0))]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(4321))]);
    let port = established_on(&mut n, at(1), 1000, LOCAL);
    assert_eq!(ops(&mut n).len(), 1);
    n.offload_failed(&tcp_key(port));
    assert_eq!(counters(&n).flows, 0);
    n.on_tun_packet(at(2), &mut tcp(port, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(port), Offloaded::Local)]);
}
