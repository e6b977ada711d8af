//! A `Node` of three static members fed TUN and carrier packets (raw bytes, or packets of a
//! few clients' flows with bytes changed) while time advances and flows expire. The books
//! balance after every packet: each is exactly one of delivered, forwarded, decapsulated or
//! dropped, and a drop is counted under the reason its verdict names. The flow table's own
//! invariants hold throughout; only a forwarded packet is rewritten (a SYN's MSS, clamped), and
//! its TCP sum stays as it was.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use ringlb_core::{
    Counters, FailurePolicy, FlowConfig, Member, Members, Node, NodeConfig, NodeId, Policy, Timestamp, Verdict,
};
use ringlb_fuzz::{be16, fix_ip_length, fix_ipv4_header, tcp_v4_sum};

const VIP: [u8; 4] = [10, 200, 0, 10];
const TUN_MTU: u16 = 1472;

fn member_addr(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, i + 1))
}

#[derive(Arbitrary, Debug)]
struct Input {
    consistent_hash: bool,
    replace_on_failure: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Tun(Packet),
    /// From member `from % 4` (3 is no member; 0 is this node itself).
    Carrier {
        from: u8,
        packet: Packet,
    },
    /// Milliseconds.
    Advance(u16),
    AdvanceSecs(u8),
    Timeout,
}

#[derive(Arbitrary, Debug)]
enum Packet {
    Raw(Vec<u8>),
    /// A packet of one of a few clients' flows, with bytes changed (index, value); `fix`
    /// makes the IP lengths and header sum right again afterwards.
    Flow {
        client: u8,
        port: u8,
        kind: Kind,
        elsewhere: bool,
        edits: Vec<(u16, u8)>,
        fix: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Tcp {
        flags: u8,
        mss: Option<u16>,
    },
    Udp {
        len: u8,
    },
    /// An ICMP error about a packet the VIP sent to the client.
    IcmpError {
        tcp: bool,
    },
    Echo,
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, mss: Option<u16>) -> Vec<u8> {
    let opts: &[u8] = match mss {
        Some(m) => &[2, 4, m.to_be_bytes()[0], m.to_be_bytes()[1]],
        None => &[],
    };
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    p.extend_from_slice(&[u8::try_from(5 + opts.len() / 4).unwrap() << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(opts);
    fix_ip_length(&mut p);
    fix_ipv4_header(&mut p);
    let len = p.len();
    let sum = !tcp_v4_sum(&p, 20, len);
    p[36..38].copy_from_slice(&sum.to_be_bytes());
    p
}

fn build(packet: &Packet) -> Vec<u8> {
    let (client, port, kind, elsewhere, edits, fix) = match packet {
        Packet::Raw(bytes) => return bytes.clone(),
        Packet::Flow { client, port, kind, elsewhere, edits, fix } => (client, port, kind, elsewhere, edits, fix),
    };
    let client = [10, 78, 0, client % 4];
    let dst = if *elsewhere { [10, 200, 0, 11] } else { VIP };
    let port = 40_000 + u16::from(port % 16);
    let mut p = match kind {
        Kind::Tcp { flags, mss } => tcp(client, dst, port, 80, *flags, *mss),
        Kind::Udp { len } => {
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
            p.extend_from_slice(&client);
            p.extend_from_slice(&dst);
            p.extend_from_slice(&port.to_be_bytes());
            p.extend_from_slice(&53u16.to_be_bytes());
            p.extend_from_slice(&(8 + u16::from(len % 32)).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
            p.resize(28 + usize::from(len % 32), 0x5a);
            p
        }
        Kind::IcmpError { tcp: is_tcp } => {
            let quoted =
                if *is_tcp { tcp(dst, client, 80, port, 0x10, None) } else { tcp(dst, client, 53, port, 0, None) };
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0, 10, 77, 0, 254];
            p.extend_from_slice(&dst);
            p.extend_from_slice(&[3, 4, 0, 0, 0, 0, 0x05, 0x78]);
            p.extend_from_slice(&quoted[..28]);
            if !is_tcp {
                p[28 + 9] = 17;
            }
            p
        }
        Kind::Echo => {
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
            p.extend_from_slice(&client);
            p.extend_from_slice(&dst);
            p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
            p
        }
    };
    fix_ip_length(&mut p);
    fix_ipv4_header(&mut p);
    for &(at, v) in edits.iter().take(4) {
        let i = usize::from(at) % p.len();
        p[i] = v;
    }
    if *fix {
        fix_ip_length(&mut p);
        fix_ipv4_header(&mut p);
    }
    p
}

/// Handled packets: delivered from the TUN, forwarded, decapsulated, or dropped.
fn handled(c: &Counters) -> u64 {
    c.delivered_local + c.forwarded + c.decapsulated + c.total_drops()
}

/// Where a handled packet went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Tun,
    Carrier,
}

/// The verdict's counter moved by one, and no other outcome's did.
fn check_books(source: Source, before: &Counters, after: &Counters, verdict: Verdict) {
    assert_eq!(handled(after), handled(before) + 1, "{verdict:?}: not exactly one outcome counted");
    match (source, verdict) {
        (Source::Tun, Verdict::Deliver) => assert_eq!(after.delivered_local, before.delivered_local + 1),
        (Source::Tun, Verdict::Forward { .. }) => assert_eq!(after.forwarded, before.forwarded + 1),
        (Source::Carrier, Verdict::Deliver) => assert_eq!(after.decapsulated, before.decapsulated + 1),
        (Source::Carrier, Verdict::Forward { .. }) => panic!("a carrier packet forwarded again"),
        (_, Verdict::Drop(reason)) => assert_eq!(after.drops(reason), before.drops(reason) + 1, "{reason:?}"),
    }
}

fuzz_target!(|input: Input| {
    let members = Members::new((0..3).map(|i| Member::new(format!("n{}", i + 1), member_addr(i), 1.0))).unwrap();
    let flows = FlowConfig {
        max_flows: 8,
        tcp_handshake_idle: Duration::from_secs(3),
        tcp_established_idle: Duration::from_secs(20),
        tcp_closing_linger: Duration::from_secs(1),
        udp_idle: Duration::from_secs(5),
        // Half the table for unconfirmed flows: the fuzzer reaches pressure (stateless
        // placement, untracked flows) with a handful of packets.
        unconfirmed_share: 0.5,
    };
    let mut node = Node::new(
        NodeConfig {
            local: NodeId(0),
            vip: IpAddr::V4(Ipv4Addr::from(VIP)),
            tun_mtu: TUN_MTU,
            flows,
            policy: if input.consistent_hash { Policy::ConsistentHash } else { Policy::PowerOfTwo { margin: 0.1 } },
            seed: 7,
            on_failure: if input.replace_on_failure { FailurePolicy::Replace } else { FailurePolicy::Reset },
            load_stale_after: Duration::from_secs(1),
            require_load: false,
            recovery: Default::default(),
        },
        members,
    );
    let mut now = Duration::ZERO;
    // Packets handed in, and those of them dropped, by source.
    let (mut tun, mut tun_drops, mut carrier, mut carrier_drops) = (0u64, 0u64, 0u64, 0u64);
    for op in input.ops.iter().take(64) {
        let at = Timestamp::from_duration(now);
        let before = node.counters().clone();
        match op {
            Op::Tun(packet) => {
                let mut pkt = build(packet);
                let sent = pkt.clone();
                let verdict = node.on_tun_packet(at, &mut pkt);
                tun += 1;
                tun_drops += u64::from(matches!(verdict, Verdict::Drop(_)));
                check_books(Source::Tun, &before, node.counters(), verdict);
                match verdict {
                    Verdict::Forward { peer, addr, .. } => {
                        assert!(peer != NodeId(0) && peer.index() < 3, "forwarded to {peer:?}");
                        assert_eq!(addr, member_addr(u8::try_from(peer.index()).unwrap()));
                        if pkt != sent {
                            // Only MSS clamping rewrites, and it keeps the TCP sum.
                            let (ihl, total) = (usize::from(pkt[0] & 0x0f) * 4, usize::from(be16(&pkt, 2)));
                            assert_eq!(tcp_v4_sum(&pkt, ihl, total), tcp_v4_sum(&sent, ihl, total), "tcp sum");
                            assert_eq!(node.counters().mss_clamped, before.mss_clamped + 1);
                        }
                    }
                    _ => assert_eq!(pkt, sent, "rewrote a packet it did not forward"),
                }
            }
            Op::Carrier { from, packet } => {
                let pkt = build(packet);
                let verdict = node.on_carrier_packet(at, member_addr(from % 4), &pkt);
                carrier += 1;
                carrier_drops += u64::from(matches!(verdict, Verdict::Drop(_)));
                check_books(Source::Carrier, &before, node.counters(), verdict);
            }
            Op::Advance(ms) => now += Duration::from_millis(u64::from(*ms)),
            Op::AdvanceSecs(s) => now += Duration::from_secs(u64::from(*s)),
            Op::Timeout => node.handle_timeout(at),
        }
        let c = node.counters();
        assert_eq!(c.delivered_local + c.forwarded + tun_drops, tun, "tun books: {c:?}");
        assert_eq!(c.decapsulated + carrier_drops, carrier, "carrier books: {c:?}");
        assert_eq!(c.total_drops(), tun_drops + carrier_drops, "drops: {c:?}");
        node.flows().check_invariants();
    }
});
