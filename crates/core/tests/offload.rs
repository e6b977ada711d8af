//! The kernel fast path's rules (`node/offload.rs`), driven through the public `Node` API only:
//! which flows are offered (`Install`), when they are withdrawn (`Remove`), and how the usage
//! the fast path reports flows back into the counters and the flow tables.
//!
//! The node under test is n1 (10.77.0.1, local) in a cluster of three; n2 and n3 are peers.
//!
//! A flow is offered at its first packet (a SYN, a first datagram) while the fast path's table
//! is less than half full (and the flow table has room), otherwise once it has settled; but a
//! TCP connection this node delivers to its own kernel (placed here, or served here for an
//! entry) only once settled, whatever the table holds: its handshake completes in the kernel by
//! the daemon's path. So a SYN a test sends may install a forwarded flow, never a local or a
//! served one; a UDP flow's first datagram may install it anywhere. The node places new flows by consistent hash, a function
//! of the tuple and the members only, so that a test finds a port that lands where it wants on a
//! throwaway copy of the node ([`port_for`]) and the node under test sees only the flows the
//! test means.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ringlb_core::cluster::message::DEFAULT_SITE;
use ringlb_core::{
    ClientFlow, DropReason, FailurePolicy, FlowConfig, FlowMessage, FlowState, Member, MemberState, Members, Node,
    NodeConfig, NodeId, OffloadCounters, OffloadOp, OffloadUsage, Offloaded, Policy, RecoveryConfig, Timestamp, Update,
    Verdict,
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

/// n1 (local), n2, n3, with the flow table `flows`; flow recovery settled from the start so
/// that it stays out of the way. New flows are placed by consistent hash (see the module
/// documentation).
fn node_with(flows: FlowConfig) -> Node {
    let members = Members::new((1..=3).map(|i| Member::new(format!("n{i}"), underlay(i), 1.0))).unwrap();
    Node::new(
        NodeConfig {
            local: LOCAL,
            vip: ip(VIP),
            tun_mtu: 1472,
            flows,
            policy: Policy::ConsistentHash,
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

fn node() -> Node {
    node_with(FlowConfig::default())
}

/// `n` offloading at most `max` flows, with both peers eligible.
fn offloading_with(mut n: Node, max: usize) -> Node {
    n.enable_offload(max);
    n.set_offload_eligible(N2, true);
    n.set_offload_eligible(N3, true);
    n
}

/// A node offloading at most `max` flows, with both peers eligible.
fn offloading(max: usize) -> Node {
    offloading_with(node(), max)
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

fn udp_key(port: u16) -> FlowKey {
    key(&udp(port))
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

/// The state of `key`'s flow in the entry's flow table, and whether it is confirmed.
fn flow(n: &Node, key: &FlowKey) -> Option<(FlowState, bool)> {
    n.flows().find(key).map(|h| (n.flows().state(h), n.flows().is_confirmed(h)))
}

/// The first port from `from` on, not tracked by `n` yet, whose flow `n` places on `want` when
/// `first(port)` starts it. Asked of a fresh node with `n`'s configuration and members, which
/// places alike (consistent hash), so `n` itself sees nothing.
fn port_for(n: &Node, now: Timestamp, from: u16, want: NodeId, first: impl Fn(u16) -> Vec<u8>) -> u16 {
    let mut probe = Node::new(n.config().clone(), n.members().clone());
    (from..from + 200)
        .find(|&p| n.flows().find(&key(&first(p))).is_none() && target(probe.on_tun_packet(now, &mut first(p))) == want)
        .unwrap_or_else(|| panic!("no flow placed on {want:?}"))
}

/// Opens a TCP connection placed on `want` (its SYN, at `now`); returns its port. What the SYN
/// made the offload rules do is left in the ops.
fn port_placed_on(n: &mut Node, now: Timestamp, from: u16, want: NodeId) -> u16 {
    let port = port_for(n, now, from, want, |p| tcp(p, SYN));
    assert_eq!(target(n.on_tun_packet(now, &mut tcp(port, SYN))), want);
    port
}

/// A TCP connection placed on `want` and established (SYN at `now`, ACK 1 ms later). Returns
/// its port; the ops stay for the caller.
fn established_on(n: &mut Node, now: Timestamp, from: u16, want: NodeId) -> u16 {
    let port = port_placed_on(n, now, from, want);
    let later = now.saturating_add(Duration::from_millis(1));
    assert_eq!(target(n.on_tun_packet(later, &mut tcp(port, ACK))), want);
    port
}

fn usage(key: FlowKey, packets: u64, bytes: u64, last_seen: Timestamp) -> OffloadUsage {
    OffloadUsage { key, packets, bytes, last_seen: Some(last_seen), closed: false }
}

/// Usage of a flow whose packets in the fast path included a FIN or RST.
fn closing_usage(key: FlowKey, packets: u64, bytes: u64, last_seen: Timestamp) -> OffloadUsage {
    OffloadUsage { closed: true, ..usage(key, packets, bytes, last_seen) }
}

/// An entry the kernel holds that carried nothing yet.
fn idle_usage(key: FlowKey) -> OffloadUsage {
    OffloadUsage { key, packets: 0, bytes: 0, last_seen: None, closed: false }
}

fn member_update(name: &str, addr: IpAddr, state: MemberState) -> Update {
    Update::Member { name: name.to_owned(), underlay: addr, weight: 1.0, state, site: DEFAULT_SITE.to_owned() }
}

/// The flows `n` tells `home` it serves, in the messages it has to send now.
fn claims_to(n: &mut Node, home: &str) -> Vec<ClientFlow> {
    let mut out = Vec::new();
    while let Some((to, msg)) = n.poll_flow_message() {
        if let (true, FlowMessage::Serves(flows)) = (to == home, msg) {
            out.extend(flows);
        }
    }
    out
}

/// How a TCP flow on `port` forwarded to the peer `peer` (n2 or n3) is offloaded.
fn forward_to(peer: NodeId, port: u16) -> Offloaded {
    let addr = underlay(if peer == N2 { 2 } else { 3 });
    Offloaded::Forward { peer, addr, flow_hash: tcp_key(port).stable_hash() }
}

/// How a flow served here for the entry `entry` (n2 or n3) is offloaded.
fn served_for(entry: NodeId) -> Offloaded {
    Offloaded::Served { entry, from: underlay(if entry == N2 { 2 } else { 3 }) }
}

fn client_flow(key: &FlowKey) -> ClientFlow {
    ClientFlow { proto: key.proto, client: key.src(), client_port: key.src_port, vip_port: key.dst_port }
}

#[test]
fn a_forwarded_tcp_flow_is_installed_at_its_syn() {
    let mut n = offloading(16);
    let port = port_for(&n, at(0), 1000, N2, |p| tcp(p, SYN));
    let v = n.on_tun_packet(at(0), &mut tcp(port, SYN));
    let Verdict::Forward { peer, addr, flow_hash } = v else { panic!("not forwarded: {v:?}") };
    assert_eq!((peer, addr), (N2, underlay(2)));
    assert_eq!(flow_hash, tcp_key(port).stable_hash());
    // Offered at its SYN, while still an unconfirmed handshake: the SYN itself took the
    // daemon's path (placement, MSS clamping), the handshake's ACK and the rest need not.
    assert_eq!(flow(&n, &tcp_key(port)), Some((FlowState::TcpHandshake, false)));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(port), Offloaded::Forward { peer, addr, flow_hash })]);
    for ms in 1..6 {
        assert_eq!(target(n.on_tun_packet(at(ms), &mut tcp(port, ACK))), N2);
    }
    assert_eq!(ops(&mut n), [], "offered twice");
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn, c.refused_full), (1, 1, 0, 0));
    // Reconciling a flow the tables still back withdraws nothing.
    n.reconcile_offload(at(10), &[]);
    assert_eq!(ops(&mut n), []);
}

/// Rule: a TCP connection this node delivers to its own kernel (placed here at an entry, or
/// served here for one) is not offered at its SYN, however empty the fast path's table: its
/// handshake completes in the kernel by the daemon's path first (otherwise the handshake's ACK
/// and the first data reach the kernel on two CPUs at once, and a lookup racing with the
/// kernel's handshake answers RST). It is offered at the handshake's ACK, settled. A
/// connection this node forwards is offered at its SYN; a UDP flow at its first datagram either
/// way.
#[test]
fn tcp_flows_delivered_here_are_offered_once_settled_forwarded_ones_at_their_syn() {
    let mut n = offloading(16);
    // The fast path empty: neither a local SYN nor a served one.
    let local = port_placed_on(&mut n, at(0), 1000, LOCAL);
    assert_eq!(flow(&n, &tcp_key(local)), Some((FlowState::TcpHandshake, false)));
    assert_eq!(ops(&mut n), [], "a local SYN offered");
    assert_eq!(n.on_carrier_packet(at(0), underlay(3), &tcp(4000, SYN)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [], "a served SYN offered");
    assert_eq!(counters(&n).flows, 0);
    // Their handshakes' ACKs: offered, settled.
    assert_eq!(n.on_tun_packet(at(1), &mut tcp(local, ACK)), Verdict::Deliver);
    assert_eq!(flow(&n, &tcp_key(local)), Some((FlowState::TcpEstablished, true)));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(local), Offloaded::Local)], "a local ACK not offered");
    assert_eq!(n.on_carrier_packet(at(1), underlay(3), &tcp(4000, ACK)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(4000), served_for(N3))], "a served ACK not offered");

    // Forwarded: at its SYN, an unconfirmed handshake.
    let fwd = port_placed_on(&mut n, at(2), 1200, N2);
    assert_eq!(flow(&n, &tcp_key(fwd)), Some((FlowState::TcpHandshake, false)));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(fwd), forward_to(N2, fwd))], "a forwarded SYN not offered");
    n.on_tun_packet(at(3), &mut tcp(fwd, ACK));
    assert_eq!(ops(&mut n), [], "offered twice");

    // UDP, delivered here or served here: at the first datagram.
    let udp_port = port_for(&n, at(4), 1, LOCAL, udp);
    assert_eq!(n.on_tun_packet(at(4), &mut udp(udp_port)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(udp_key(udp_port), Offloaded::Local)], "a local datagram");
    assert_eq!(n.on_carrier_packet(at(4), underlay(2), &udp(4001)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(udp_key(4001), served_for(N2))], "a served datagram");
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.refused_full), (5, 5, 0));
}

/// Rule: a SYN on an offloaded tuple (the client reused its port) withdraws the flow and offers
/// it again at once as it now stands: a new connection this node forwards is installed again in
/// the same step; one it delivers to its own kernel (placed here, served here) is then in its
/// handshake, and is installed again only at its ACK, settled.
#[test]
fn a_syn_on_an_installed_tuple_installs_again_at_once_only_a_forwarded_flow() {
    let mut n = offloading(16);
    let local = established_on(&mut n, at(0), 1000, LOCAL);
    let fwd = established_on(&mut n, at(0), 1200, N2);
    n.on_carrier_packet(at(0), underlay(3), &tcp(4000, SYN));
    n.on_carrier_packet(at(1), underlay(3), &tcp(4000, ACK));
    let (kl, kf, ks) = (tcp_key(local), tcp_key(fwd), tcp_key(4000));
    let (how_l, how_f, how_s) = (Offloaded::Local, forward_to(N2, fwd), served_for(N3));
    assert_eq!(
        ops(&mut n),
        [OffloadOp::Install(kl, how_l), OffloadOp::Install(kf, how_f), OffloadOp::Install(ks, how_s)]
    );

    // Placed here again: withdrawn, not installed again in its handshake.
    assert_eq!(n.on_tun_packet(at(10), &mut tcp(local, SYN)), Verdict::Deliver);
    assert_eq!(flow(&n, &kl).map(|f| f.0), Some(FlowState::TcpHandshake));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(kl)], "a local SYN on an installed tuple");
    // Served here again: the same.
    assert_eq!(n.on_carrier_packet(at(10), underlay(3), &tcp(4000, SYN)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(ks)], "a served SYN on an installed tuple");
    // Forwarded again: withdrawn and installed again at once.
    assert_eq!(target(n.on_tun_packet(at(10), &mut tcp(fwd, SYN))), N2);
    assert_eq!(flow(&n, &kf).map(|f| f.0), Some(FlowState::TcpHandshake));
    assert_eq!(
        ops(&mut n),
        [OffloadOp::Remove(kf), OffloadOp::Install(kf, how_f)],
        "a forwarded SYN on an installed tuple"
    );
    assert_eq!(counters(&n).flows, 1);

    // The handshakes' ACKs: the delivered ones installed again, the forwarded one not twice.
    assert_eq!(n.on_tun_packet(at(11), &mut tcp(local, ACK)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(kl, how_l)]);
    assert_eq!(n.on_carrier_packet(at(11), underlay(3), &tcp(4000, ACK)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(ks, how_s)]);
    assert_eq!(target(n.on_tun_packet(at(11), &mut tcp(fwd, ACK))), N2);
    assert_eq!(ops(&mut n), []);
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn), (3, 6, 3));
}

#[test]
fn local_tcp_and_udp_flows_are_installed_icmp_never() {
    let mut n = offloading(16);
    // TCP delivered here: not at its SYN (the fast path empty), at its handshake's ACK
    // (settled), once.
    let port = port_placed_on(&mut n, at(0), 1000, LOCAL);
    assert_eq!(ops(&mut n), [], "a local SYN offered");
    assert_eq!(n.on_tun_packet(at(1), &mut tcp(port, ACK)), Verdict::Deliver);
    assert_eq!(flow(&n, &tcp_key(port)), Some((FlowState::TcpEstablished, true)));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(port), Offloaded::Local)], "a local handshake's ACK");
    assert_eq!(n.on_tun_packet(at(2), &mut tcp(port, ACK)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [], "offered twice");

    // UDP: offered at the first datagram (unconfirmed), once.
    let udp_port = port_for(&n, at(10), 1, LOCAL, udp);
    assert_eq!(n.on_tun_packet(at(10), &mut udp(udp_port)), Verdict::Deliver);
    assert_eq!(flow(&n, &udp_key(udp_port)), Some((FlowState::Udp, false)));
    assert_eq!(ops(&mut n), [OffloadOp::Install(udp_key(udp_port), Offloaded::Local)], "a first datagram");
    assert_eq!(n.on_tun_packet(at(11), &mut udp(udp_port)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [], "offered twice");

    // A UDP flow to a peer is offered with its carrier details.
    let fwd_port = port_for(&n, at(20), 200, N3, udp);
    let v = n.on_tun_packet(at(20), &mut udp(fwd_port));
    let Verdict::Forward { peer: N3, addr, flow_hash } = v else { panic!("not forwarded to n3: {v:?}") };
    assert_eq!(ops(&mut n), [OffloadOp::Install(udp_key(fwd_port), Offloaded::Forward { peer: N3, addr, flow_hash })]);
    n.on_tun_packet(at(21), &mut udp(fwd_port));
    assert_eq!(ops(&mut n), [], "offered twice");

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
    n.on_tun_packet(at(3), &mut udp(3001));
    let forwarded = n.forwarded_to(N2);
    let closed = [closing_usage(tcp_key(local), 5, 500, at(3)), closing_usage(tcp_key(fwd), 5, 500, at(3))];
    n.reconcile_offload(at(4), &closed);
    n.offload_removed(at(4), &closed[0]);
    assert_eq!(ops(&mut n), []);
    assert_eq!(n.offload_counters(), None);
    assert_eq!(n.forwarded_to(N2), forwarded, "usage credited with offload off");
    assert_eq!(flow(&n, &tcp_key(local)), Some((FlowState::TcpEstablished, true)), "closed with offload off");
}

#[test]
fn ineligible_peers_are_not_offered_and_losing_eligibility_withdraws() {
    let mut n = node();
    n.enable_offload(16);
    // Never marked: ineligible, neither at the SYN nor once established. The local node is
    // always eligible.
    let fwd = port_placed_on(&mut n, at(0), 1000, N2);
    assert_eq!(ops(&mut n), [], "a SYN offered to a member never marked eligible");
    n.on_tun_packet(at(1), &mut tcp(fwd, ACK));
    assert_eq!(ops(&mut n), [], "offered to a member never marked eligible");
    let local = port_placed_on(&mut n, at(10), 1200, LOCAL);
    assert_eq!(ops(&mut n), [], "a local SYN offered");
    n.on_tun_packet(at(11), &mut tcp(local, ACK));
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
    let mut flows = Vec::new();
    for (i, flags) in [FIN_ACK, RST, SYN].into_iter().enumerate() {
        let from = 1000 + 200 * u16::try_from(i).unwrap();
        let port = established_on(&mut n, at(0), from, N2);
        let [OffloadOp::Install(k, how)] = ops(&mut n)[..] else { panic!("not offered") };
        assert_eq!(k, tcp_key(port));
        flows.push((port, flags, how));
    }
    // At once, not at the next reconciliation: a SYN on a reused tuple may pin the flow
    // elsewhere, and the handshake's next packet must not follow the old entry.
    for &(port, flags, how) in &flows {
        n.on_tun_packet(at(10), &mut tcp(port, flags));
        let k = tcp_key(port);
        if flags == SYN {
            // A new connection: n2 still takes new flows, so it goes there again, and is
            // offered again at once with a fresh kernel entry (withdrawn first).
            assert_eq!(flow(&n, &k).map(|f| f.0), Some(FlowState::TcpHandshake));
            assert_eq!(ops(&mut n), [OffloadOp::Remove(k), OffloadOp::Install(k, how)], "after a SYN");
        } else {
            assert_eq!(flow(&n, &k).map(|f| f.0), Some(FlowState::TcpClosing));
            assert_eq!(ops(&mut n), [OffloadOp::Remove(k)], "after flags {flags:#x}");
        }
    }
    // A closing flow's stragglers are not offered again.
    n.on_tun_packet(at(21), &mut tcp(flows[0].0, ACK));
    n.on_tun_packet(at(21), &mut tcp(flows[1].0, ACK));
    assert_eq!(ops(&mut n), []);
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn), (1, 4, 3));
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
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn), (1, 2, 1));
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
    let served_n2 = Offloaded::Served { entry: N2, from: underlay(2) };
    // The handshake through the carrier: delivered here, so not offered at the SYN (the fast
    // path empty); at the handshake's ACK (settled), once.
    assert_eq!(n.on_carrier_packet(at(0), underlay(2), &tcp(4000, SYN)), Verdict::Deliver);
    assert_eq!(ops(&mut n), [], "a served SYN offered");
    assert_eq!(n.on_carrier_packet(at(1), underlay(2), &from_n2), Verdict::Deliver);
    assert_eq!(ops(&mut n), [OffloadOp::Install(key(&from_n2), served_n2)], "a served handshake's ACK");
    n.on_carrier_packet(at(2), underlay(2), &from_n2);
    assert_eq!(ops(&mut n), [], "offered twice");

    // UDP served for n3: offered at the first datagram, once.
    n.on_carrier_packet(at(3), underlay(3), &udp(4001));
    let served_n3 = Offloaded::Served { entry: N3, from: underlay(3) };
    assert_eq!(ops(&mut n), [OffloadOp::Install(udp_key(4001), served_n3)], "a first served datagram");
    n.on_carrier_packet(at(4), underlay(3), &udp(4001));
    assert_eq!(ops(&mut n), [], "offered twice");

    // From an address that is no member's, or this node's own: dropped, never offered.
    for src in [ip([10, 77, 0, 9]), underlay(1)] {
        for flags in [SYN, ACK, ACK] {
            let v = n.on_carrier_packet(at(5), src, &tcp(4002, flags));
            assert_eq!(v, Verdict::Drop(DropReason::NotMember));
        }
        assert_eq!(n.on_carrier_packet(at(5), src, &udp(4003)), Verdict::Drop(DropReason::NotMember));
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
    // Nor once a new connection from it (a reused tuple) settles.
    n.on_carrier_packet(at(22), underlay(2), &tcp(4000, SYN));
    assert_eq!(ops(&mut n), [], "a SYN offered from an ineligible entry");
    n.on_carrier_packet(at(23), underlay(2), &from_n2);
    assert_eq!(ops(&mut n), [], "a new connection offered from an ineligible entry");

    // The entry of the UDP flow dies: withdrawn.
    n.apply(at(30), &member_update("n3", underlay(3), MemberState::Dead)).unwrap();
    n.reconcile_offload(at(31), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(udp_key(4001))]);
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
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(4000), Offloaded::Served { entry: N2, from: underlay(2) })]);
    n.on_carrier_packet(at(2), underlay(3), &tcp(4000, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(4000))]);
    n.on_carrier_packet(at(3), underlay(3), &tcp(4000, ACK));
    let [OffloadOp::Install(_, Offloaded::Served { entry, .. })] = ops(&mut n)[..] else { panic!("not offered again") };
    assert_eq!(entry, N3);
    n.on_carrier_packet(at(4), underlay(3), &tcp(4000, ACK));
    assert_eq!(ops(&mut n), [], "offered twice");
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn), (1, 2, 1));
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

/// Rule: a flow is offered at its first packet (a forwarded SYN, a first datagram; at an entry
/// or served for one) while the fast path's table holds fewer than half its flows; from half
/// full on, only once it settles (the old rule), so that a flood of first packets fills half at
/// most. (A TCP flow delivered here is offered only once settled anyway.)
#[test]
fn a_first_packet_is_offered_only_while_the_fast_path_is_less_than_half_full() {
    // Room for 4: early offers while fewer than 2 are installed.
    let mut n = offloading(4);
    let a = port_placed_on(&mut n, at(0), 1000, N2);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(a), forward_to(N2, a))], "0 of 4: at the SYN");
    let b = port_placed_on(&mut n, at(0), 1200, N3);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(b), forward_to(N3, b))], "1 of 4: at the SYN");

    // Half full: a SYN is not offered; its flow is once established (confirmed).
    let c = port_placed_on(&mut n, at(10), 1400, N2);
    assert_eq!(flow(&n, &tcp_key(c)), Some((FlowState::TcpHandshake, false)));
    assert_eq!(ops(&mut n), [], "2 of 4: offered at the SYN");
    n.on_tun_packet(at(11), &mut tcp(c, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(c), forward_to(N2, c))], "not offered once settled");

    // Above half: a first datagram is not offered, the second (confirmed) is.
    let d = port_for(&n, at(20), 1, LOCAL, udp);
    n.on_tun_packet(at(20), &mut udp(d));
    assert_eq!(ops(&mut n), [], "3 of 4: offered at the first datagram");
    n.on_tun_packet(at(21), &mut udp(d));
    assert_eq!(ops(&mut n), [OffloadOp::Install(udp_key(d), Offloaded::Local)]);
    assert_eq!(counters(&n).flows, 4);

    // Flows closing make room again; below half, SYNs are offered again.
    for (port, flags) in [(a, FIN_ACK), (c, RST)] {
        n.on_tun_packet(at(30), &mut tcp(port, flags));
        assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(port))]);
    }
    let e = port_placed_on(&mut n, at(40), 1600, N2);
    assert_eq!(ops(&mut n), [], "2 of 4: offered at the SYN");
    n.on_tun_packet(at(41), &mut tcp(b, FIN_ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(b))]);
    let f = port_placed_on(&mut n, at(42), 1800, N3);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(f), forward_to(N3, f))], "1 of 4: at the SYN");
    // (`e`'s handshake completes: offered as settled.)
    n.on_tun_packet(at(43), &mut tcp(e, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(e), forward_to(N2, e))]);

    // Served flows, the same: room for 2, a first datagram is offered, the next once settled.
    let mut n = offloading(2);
    n.on_carrier_packet(at(0), underlay(2), &udp(4002));
    assert_eq!(
        ops(&mut n),
        [OffloadOp::Install(udp_key(4002), served_for(N2))],
        "0 of 2: at the first served datagram"
    );
    // (A served TCP connection, once established.)
    n.on_carrier_packet(at(1), underlay(2), &tcp(4000, SYN));
    assert_eq!(ops(&mut n), [], "a served SYN offered");
    n.on_carrier_packet(at(2), underlay(2), &tcp(4000, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(4000), served_for(N2))]);
    // A served datagram, with the table half full again.
    n.on_carrier_packet(at(3), underlay(2), &tcp(4000, RST));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(4000))]);
    n.on_carrier_packet(at(4), underlay(3), &udp(4001));
    assert_eq!(ops(&mut n), [], "1 of 2: offered at the first served datagram");
    n.on_carrier_packet(at(5), underlay(3), &udp(4001));
    assert_eq!(ops(&mut n), [OffloadOp::Install(udp_key(4001), served_for(N3))]);
}

/// Rule: a first packet is offered only while the flow table has room too (its unconfirmed
/// quota not used up: beyond, new flows are placed by hash and may be evicted).
#[test]
fn a_first_packet_is_not_offered_while_the_flow_table_has_no_room() {
    // 8 flows, of which 2 unconfirmed.
    let config = FlowConfig { max_flows: 8, unconfirmed_share: 0.25, ..FlowConfig::default() };
    let mut n = offloading_with(node_with(config), 16);
    let a = port_placed_on(&mut n, at(0), 1000, N2);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(a), forward_to(N2, a))], "the flow table had room");
    // This SYN takes the last unconfirmed slot: the table has no room left.
    let b = port_placed_on(&mut n, at(1), 1200, N2);
    assert!(!n.flows().has_room());
    assert_eq!(ops(&mut n), [], "offered at the SYN with the flow table out of room");
    // Once settled (confirmed), it is offered as before.
    n.on_tun_packet(at(2), &mut tcp(b, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(b), forward_to(N2, b))]);
    assert_eq!(counters(&n).flows, 2);
}

/// Rule: the program carries FIN and RST and says so (`closed`); reconciliation moves such a
/// flow to closing, as the daemon would have for the packet, and withdraws it at once.
#[test]
fn kernel_usage_with_a_fin_or_rst_closes_the_flow_and_withdraws_it() {
    let mut n = offloading(16);
    let fin = established_on(&mut n, at(0), 1000, N2);
    let open = established_on(&mut n, at(0), 1200, N2);
    // A connection refused: forwarded, so its SYN installed it; the kernel carried the
    // client's RST.
    let refused = port_placed_on(&mut n, at(0), 1400, N3);
    assert_eq!(flow(&n, &tcp_key(refused)), Some((FlowState::TcpHandshake, false)));
    // A local connection the client resets (installed once established).
    let reset = established_on(&mut n, at(0), 1600, LOCAL);
    assert_eq!(ops(&mut n).len(), 4);
    let (forwarded, forwarded_n3) = (n.forwarded_to(N2), n.forwarded_to(N3));

    n.reconcile_offload(
        secs(1),
        &[
            closing_usage(tcp_key(fin), 6, 600, at(900)),
            usage(tcp_key(open), 6, 600, at(900)),
            closing_usage(tcp_key(refused), 1, 40, at(900)),
            closing_usage(tcp_key(reset), 1, 40, at(900)),
        ],
    );
    let mut removed = ops(&mut n);
    removed.sort_by_key(|op| format!("{op:?}"));
    let mut want =
        [OffloadOp::Remove(tcp_key(fin)), OffloadOp::Remove(tcp_key(refused)), OffloadOp::Remove(tcp_key(reset))];
    want.sort_by_key(|op| format!("{op:?}"));
    assert_eq!(removed, want, "closed flows withdrawn in the same reconciliation, the open one kept");
    for port in [fin, refused, reset] {
        assert_eq!(flow(&n, &tcp_key(port)).map(|f| f.0), Some(FlowState::TcpClosing), "port {port}");
    }
    assert_eq!(flow(&n, &tcp_key(open)), Some((FlowState::TcpEstablished, true)));
    // Counted as any usage.
    let c = counters(&n);
    assert_eq!((c.forwarded_packets, c.local_packets, c.bytes, c.flows, c.withdrawn), (13, 1, 1280, 1, 3));
    assert_eq!(n.forwarded_to(N2), forwarded + 12);
    assert_eq!(n.forwarded_to(N3), forwarded_n3 + 1);
    // A closing flow's last packets take the daemon's path and are not offered again; it
    // lingers as closing (not the established idle timeout).
    assert_eq!(target(n.on_tun_packet(secs(2), &mut tcp(fin, ACK))), N2);
    assert_eq!(ops(&mut n), []);
    let linger = FlowConfig::default().tcp_closing_linger;
    n.handle_timeout(secs(2).saturating_add(linger));
    assert_eq!(flow(&n, &tcp_key(fin)), None, "lingered longer than a closing flow");
    assert!(flow(&n, &tcp_key(open)).is_some());

    // A served flow (installed once established): withdrawn too, and it lingers as closing only.
    n.on_carrier_packet(secs(20), underlay(3), &tcp(4000, SYN));
    assert_eq!(ops(&mut n), [], "a served SYN offered");
    n.on_carrier_packet(secs(20), underlay(3), &tcp(4000, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(4000), served_for(N3))]);
    let served = n.served_flows();
    n.reconcile_offload(secs(21), &[closing_usage(tcp_key(4000), 2, 80, secs(21))]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(4000))]);
    n.handle_timeout(secs(21).saturating_add(linger));
    assert_eq!(n.served_flows(), served - 1, "a served flow closed in the kernel did not close");
    assert_eq!(counters(&n).decapsulated_packets, 2);

    // The last usage of a flow withdrawn for another reason (here its member turned
    // ineligible) closes it as well.
    n.set_offload_eligible(N2, false);
    n.reconcile_offload(secs(30), &[]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(tcp_key(open))]);
    n.offload_removed(secs(30), &closing_usage(tcp_key(open), 9, 900, secs(30)));
    assert_eq!(flow(&n, &tcp_key(open)).map(|f| f.0), Some(FlowState::TcpClosing));
    assert_eq!(counters(&n).forwarded_packets, 16);
}

/// Rule: the program carries no SYN, so packets it carried for a flow still in its handshake
/// completed it: reconciliation moves it to established and confirms it, as the daemon would
/// have at the handshake's ACK, and it stays in the fast path. Only a forwarded flow is ever
/// offloaded in its handshake: one this node delivers to its own kernel (placed here, served
/// here) completes its handshake on the daemon's path, which establishes it (and claims it to
/// its home, for flow recovery) before it is offered.
#[test]
fn kernel_usage_on_a_handshake_establishes_and_confirms_the_flow() {
    let handshake_idle = FlowConfig::default().tcp_handshake_idle;
    let mut n = offloading(16);
    let to_n2 = port_placed_on(&mut n, at(0), 1000, N2);
    let to_n3 = port_placed_on(&mut n, at(0), 1200, N3);
    let local = port_placed_on(&mut n, at(0), 1400, LOCAL);
    assert_eq!(
        ops(&mut n),
        [
            OffloadOp::Install(tcp_key(to_n2), forward_to(N2, to_n2)),
            OffloadOp::Install(tcp_key(to_n3), forward_to(N3, to_n3)),
        ],
        "forwarded SYNs offered, and only they"
    );
    for port in [to_n2, to_n3, local] {
        assert_eq!(flow(&n, &tcp_key(port)), Some((FlowState::TcpHandshake, false)));
    }
    let (forwarded_n2, forwarded_n3) = (n.forwarded_to(N2), n.forwarded_to(N3));
    n.reconcile_offload(secs(1), &[usage(tcp_key(to_n2), 3, 300, at(900)), usage(tcp_key(to_n3), 4, 400, at(900))]);
    for port in [to_n2, to_n3] {
        assert_eq!(flow(&n, &tcp_key(port)), Some((FlowState::TcpEstablished, true)), "port {port}");
    }
    assert_eq!(flow(&n, &tcp_key(local)), Some((FlowState::TcpHandshake, false)));
    assert_eq!(ops(&mut n), [], "an established flow withdrawn");
    let c = counters(&n);
    assert_eq!((c.local_packets, c.forwarded_packets, c.bytes, c.flows), (0, 7, 700, 2));
    assert_eq!((n.forwarded_to(N2), n.forwarded_to(N3)), (forwarded_n2 + 3, forwarded_n3 + 4));
    // Established, they outlive the handshake's idle timeout, and stay installed; the local
    // handshake that never completed does not.
    let later = secs(1).saturating_add(handshake_idle).saturating_add(Duration::from_secs(1));
    n.handle_timeout(later);
    n.reconcile_offload(later, &[]);
    assert!(flow(&n, &tcp_key(to_n2)).is_some() && flow(&n, &tcp_key(to_n3)).is_some());
    assert_eq!(flow(&n, &tcp_key(local)), None);
    assert_eq!(ops(&mut n), []);

    // Served here: not offered at its SYN, nor claimed to its home in its handshake; the
    // daemon's path establishes it at the handshake's ACK, claims it (flow recovery) and offers
    // it. The kernel's usage then keeps it alive.
    let mut n = offloading(16);
    n.handle_timeout(at(0));
    claims_to(&mut n, "n3");
    // A port whose home is n3 (homes are placed by the same consistent hash).
    let port = port_for(&n, at(0), 5000, N3, |p| tcp(p, SYN));
    n.on_carrier_packet(at(10), underlay(2), &tcp(port, SYN));
    assert_eq!(ops(&mut n), [], "a served SYN offered");
    n.handle_timeout(at(20));
    assert_eq!(claims_to(&mut n, "n3"), [], "a handshake claimed");
    n.on_carrier_packet(at(30), underlay(2), &tcp(port, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(port), served_for(N2))], "not offered once established");
    n.handle_timeout(at(40));
    assert_eq!(claims_to(&mut n, "n3"), [client_flow(&tcp_key(port))], "not claimed once established");
    n.reconcile_offload(secs(1), &[usage(tcp_key(port), 2, 120, at(900))]);
    assert_eq!(ops(&mut n), []);
    assert_eq!(counters(&n).decapsulated_packets, 2);
    let later = secs(1).saturating_add(handshake_idle).saturating_add(Duration::from_secs(1));
    n.handle_timeout(later);
    assert_eq!(n.served_flows(), 1, "expired as a handshake");
    n.reconcile_offload(later, &[]);
    assert_eq!(ops(&mut n), []);
}

/// Rule: a SYN on an offloaded tuple (the client reused its port) withdraws the flow at once,
/// then offers it again as it now stands (a forwarded flow at once; one delivered here once its
/// handshake completes); the final usage of the withdrawn entry is the old connection's, so a
/// FIN or RST in it does not close the new one (its packets still count).
#[test]
fn a_syn_on_an_installed_tuple_is_withdrawn_offered_again_and_the_old_close_is_ignored() {
    let mut n = offloading(16);
    let port = established_on(&mut n, at(0), 1000, N2);
    let k = tcp_key(port);
    let [OffloadOp::Install(_, how)] = ops(&mut n)[..] else { panic!("not offered") };
    n.reconcile_offload(secs(1), &[usage(k, 10, 1000, at(900))]);

    // The same node takes the new connection: the same entry again, fresh.
    assert_eq!(target(n.on_tun_packet(secs(2), &mut tcp(port, SYN))), N2);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(k), OffloadOp::Install(k, how)]);
    let forwarded = n.forwarded_to(N2);
    assert_eq!(flow(&n, &k).map(|f| f.0), Some(FlowState::TcpHandshake));
    // The old entry's last figures: the old connection's FIN among them.
    n.offload_removed(secs(2), &closing_usage(k, 14, 1400, secs(2)));
    assert_ne!(flow(&n, &k).map(|f| f.0), Some(FlowState::TcpClosing), "the old connection's FIN closed the new one");
    assert!(flow(&n, &k).is_some());
    let c = counters(&n);
    assert_eq!((c.forwarded_packets, c.bytes, c.flows, c.installed, c.withdrawn), (14, 1400, 1, 2, 1));
    assert_eq!(n.forwarded_to(N2), forwarded + 4);
    // Still offloaded: the new kernel entry's usage counts from zero.
    n.reconcile_offload(secs(3), &[usage(k, 5, 500, secs(3))]);
    assert_eq!(ops(&mut n), []);
    assert_eq!(counters(&n).forwarded_packets, 19);
    // And the new connection's own FIN, carried by the kernel, closes it.
    n.reconcile_offload(secs(4), &[closing_usage(k, 6, 600, secs(4))]);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(k)]);
    assert_eq!(flow(&n, &k).map(|f| f.0), Some(FlowState::TcpClosing));

    // Its node takes no new flows now (draining): the new connection goes elsewhere, and the
    // flow is installed for its new node in the same step if forwarded, at its handshake's ACK
    // if delivered here.
    let port = established_on(&mut n, secs(10), 1200, N3);
    let k = tcp_key(port);
    assert_eq!(ops(&mut n).len(), 1);
    n.apply(secs(11), &member_update("n3", underlay(3), MemberState::Draining)).unwrap();
    n.reconcile_offload(secs(11), &[]);
    assert_eq!(ops(&mut n), [], "a draining member's flow withdrawn");
    match n.on_tun_packet(secs(12), &mut tcp(port, SYN)) {
        Verdict::Deliver => {
            assert_eq!(ops(&mut n), [OffloadOp::Remove(k)], "installed again here in its handshake");
            assert_eq!(n.on_tun_packet(secs(13), &mut tcp(port, ACK)), Verdict::Deliver);
            assert_eq!(ops(&mut n), [OffloadOp::Install(k, Offloaded::Local)]);
        }
        Verdict::Forward { peer, addr, flow_hash } => {
            assert_ne!(peer, N3, "a new connection placed on a draining member");
            let how = Offloaded::Forward { peer, addr, flow_hash };
            assert_eq!(ops(&mut n), [OffloadOp::Remove(k), OffloadOp::Install(k, how)]);
        }
        Verdict::Drop(r) => panic!("dropped: {r:?}"),
    }

    // A served flow: the same, for the same entry, installed again once the new connection's
    // handshake completes (delivered here).
    let served = served_for(N2);
    let k = tcp_key(4000);
    n.on_carrier_packet(secs(20), underlay(2), &tcp(4000, SYN));
    n.on_carrier_packet(secs(20), underlay(2), &tcp(4000, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(k, served)]);
    n.on_carrier_packet(secs(21), underlay(2), &tcp(4000, SYN));
    assert_eq!(ops(&mut n), [OffloadOp::Remove(k)], "a served flow installed again in its handshake");
    n.offload_removed(secs(21), &closing_usage(k, 3, 300, secs(21)));
    // (Closed, the flow would not be offered again.)
    n.on_carrier_packet(secs(21), underlay(2), &tcp(4000, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(k, served)], "the old connection's FIN closed the new one");
    n.reconcile_offload(secs(22), &[usage(k, 1, 100, secs(22))]);
    assert_eq!(ops(&mut n), []);
    assert_eq!(counters(&n).decapsulated_packets, 4);
}

/// With the fast path half full a SYN on an offloaded tuple still withdraws the flow, but its
/// new connection waits to settle before it is offered again. (Forwarded flows: one delivered
/// here waits to settle anyway.)
#[test]
fn a_syn_on_an_installed_tuple_above_half_full_is_offered_again_once_settled() {
    let mut n = offloading(2);
    let port = established_on(&mut n, at(0), 1000, N2);
    let (k, how) = (tcp_key(port), forward_to(N2, port));
    assert_eq!(ops(&mut n), [OffloadOp::Install(k, how)]);
    assert_eq!(target(n.on_tun_packet(at(10), &mut tcp(port, SYN))), N2);
    // One of two installed before the SYN: withdrawn, then offered at once (0 of 2).
    assert_eq!(ops(&mut n), [OffloadOp::Remove(k), OffloadOp::Install(k, how)]);
    // Another flow takes the second place; now a SYN on the first leaves it out until its ACK.
    let other = established_on(&mut n, at(20), 1200, N2);
    assert_eq!(ops(&mut n), [OffloadOp::Install(tcp_key(other), forward_to(N2, other))]);
    assert_eq!(target(n.on_tun_packet(at(30), &mut tcp(port, SYN))), N2);
    assert_eq!(ops(&mut n), [OffloadOp::Remove(k)], "1 of 2 after the withdrawal: offered at the SYN");
    n.on_tun_packet(at(31), &mut tcp(port, ACK));
    assert_eq!(ops(&mut n), [OffloadOp::Install(k, how)]);
}

/// A spoofed SYN (or a half-open connection) forwarded to a peer is offered at once and never
/// carries anything in the kernel: it is withdrawn once the flow table expires its handshake.
/// One delivered here (placed here, or served here) is never offered.
#[test]
fn a_half_open_syn_is_withdrawn_when_its_handshake_expires() {
    let handshake_idle = FlowConfig::default().tcp_handshake_idle.as_secs();
    let mut n = offloading(16);
    let to_n2 = port_placed_on(&mut n, at(0), 1000, N2);
    let to_n3 = port_placed_on(&mut n, at(0), 1200, N3);
    let local = port_placed_on(&mut n, at(0), 1400, LOCAL);
    n.on_carrier_packet(at(0), underlay(3), &tcp(4000, SYN));
    assert_eq!(
        ops(&mut n),
        [
            OffloadOp::Install(tcp_key(to_n2), forward_to(N2, to_n2)),
            OffloadOp::Install(tcp_key(to_n3), forward_to(N3, to_n3)),
        ],
        "a half-open SYN delivered here offered"
    );
    assert_eq!(n.served_flows(), 2, "the local and the served handshake");
    // What the kernel holds: both entries, which carry nothing.
    let mut kernel = vec![idle_usage(tcp_key(to_n2)), idle_usage(tcp_key(to_n3))];
    let mut withdrawn_at = Vec::new();
    for s in 1..=handshake_idle + 5 {
        n.reconcile_offload(secs(s), &kernel);
        let removed = ops(&mut n);
        if !removed.is_empty() {
            withdrawn_at.push((s, removed.len()));
        }
        kernel.retain(|u| !removed.contains(&OffloadOp::Remove(u.key)));
        n.handle_timeout(secs(s));
    }
    // Withdrawn at the reconciliation after the expiry, both in one go.
    assert_eq!(withdrawn_at, [(handshake_idle + 1, 2)], "withdrawn before its handshake expired, or never");
    for port in [to_n2, to_n3, local] {
        assert_eq!(flow(&n, &tcp_key(port)), None);
    }
    assert_eq!(n.served_flows(), 0);
    let c = counters(&n);
    assert_eq!((c.flows, c.installed, c.withdrawn, c.forwarded_packets, c.decapsulated_packets), (0, 2, 2, 0, 0));
    assert!(kernel.is_empty());
}

/// Two SYNs on an offloaded tuple before the IO layer carries out the first removal (a
/// retransmitted SYN, or a spoofer's): each removal's report is credited against its own record,
/// in order, so nothing is counted twice; and the old connection's packets in those reports
/// neither close nor establish the new connection.
#[test]
fn two_withdrawals_of_one_tuple_are_credited_each_against_its_own_record() {
    let mut n = offloading(16);
    let port = established_on(&mut n, at(0), 1000, N2);
    let k = tcp_key(port);
    let [OffloadOp::Install(_, how)] = ops(&mut n)[..] else { panic!("not offered") };
    n.reconcile_offload(secs(1), &[usage(k, 100, 10_000, at(900))]);
    assert_eq!(counters(&n).forwarded_packets, 100);

    n.on_tun_packet(secs(2), &mut tcp(port, SYN));
    n.on_tun_packet(secs(2), &mut tcp(port, SYN));
    let expected = [OffloadOp::Remove(k), OffloadOp::Install(k, how), OffloadOp::Remove(k), OffloadOp::Install(k, how)];
    assert_eq!(ops(&mut n), expected);
    // The first kernel entry ended at 110 packets (with the old connection's FIN); the second,
    // installed and removed at once, carried nothing.
    n.offload_removed(secs(2), &closing_usage(k, 110, 11_000, secs(2)));
    n.offload_removed(secs(2), &usage(k, 0, 0, secs(2)));
    let c = counters(&n);
    assert_eq!((c.forwarded_packets, c.bytes), (110, 11_000), "usage credited twice");
    assert_eq!(flow(&n, &k), Some((FlowState::TcpHandshake, true)), "the old connection moved the new one on");
}
