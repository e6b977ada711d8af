//! Cost of the core's per-packet decisions (`just bench-core`): a flow-table hit, and the
//! placement of a new flow among 64 members.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ringlb_core::{FailurePolicy, FlowConfig, Member, Members, Node, NodeConfig, NodeId, Policy, Timestamp};
use ringlb_wire::build::tcp_v4;

fn node(members: u8) -> Node {
    let m =
        Members::new((1..=members).map(|i| Member::new(format!("n{i}"), IpAddr::V4(Ipv4Addr::new(10, 77, 0, i)), 1.0)))
            .unwrap();
    Node::new(
        NodeConfig {
            local: NodeId(0),
            vip: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10)),
            tun_mtu: 1472,
            flows: FlowConfig { max_flows: 1 << 20, ..FlowConfig::default() },
            policy: Policy::PowerOfTwo { margin: 0.1 },
            seed: 7,
            on_failure: FailurePolicy::Reset,
            load_stale_after: Duration::from_secs(1),
            require_load: false,
        },
        m,
    )
}

fn client(i: u32) -> [u8; 4] {
    let b = i.to_be_bytes();
    [10, b[1] | 0x40, b[2], b[3]]
}

fn decisions(c: &mut Criterion) {
    let vip = [10, 200, 0, 10];
    let ack = tcp_v4(client(7), vip, 40_000, 80, 0x10, &[]);
    c.bench_function("classify (parse, checksum, flow key)", |b| {
        b.iter(|| black_box(ringlb_wire::classify(black_box(&ack))))
    });
    let key = ringlb_wire::classify(&ack).unwrap().key;
    c.bench_function("stable flow hash", |b| b.iter(|| black_box(black_box(&key).stable_hash())));
    // Flow-table hit: 100,000 established flows, ACKs cycling through them.
    let mut n = node(64);
    let now = Timestamp::from_duration(Duration::from_secs(1));
    let acks: Vec<Vec<u8>> = (0..100_000u32).map(|i| tcp_v4(client(i), vip, 40_000, 80, 0x10, &[])).collect();
    for i in 0..100_000u32 {
        let mut syn = tcp_v4(client(i), vip, 40_000, 80, 0x02, &[]);
        n.on_tun_packet(now, &mut syn);
    }
    let mut pkts = acks;
    let mut i = 0;
    c.bench_function("flow table hit (100k flows, 64 members)", |b| {
        b.iter(|| {
            i = (i + 1) % pkts.len();
            black_box(n.on_tun_packet(now, &mut pkts[i]))
        })
    });

    // New flow placed among 64 members (each iteration a SYN of a new flow; the table is big
    // enough that no eviction happens within a measurement).
    let mut n = node(64);
    let mut k = 0u32;
    let mut syn = tcp_v4(client(0), vip, 40_000, 80, 0x02, &[]);
    c.bench_function("new flow placement (64 members)", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            // A new 5-tuple each time (classification checks the IP header checksum, not TCP's).
            syn[20..22].copy_from_slice(&k.to_be_bytes()[2..]);
            syn[12..16].copy_from_slice(&client(k >> 16));
            ringlb_wire::build::fix_ipv4_checksum(&mut syn);
            black_box(n.on_tun_packet(now, &mut syn))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = decisions
}
criterion_main!(benches);
