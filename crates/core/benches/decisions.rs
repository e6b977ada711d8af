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
            recovery: Default::default(),
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
    // Flow-table hit: 100,000 established flows (two clients, 50,000 source ports each), ACKs
    // cycling through them. As on the data path, each packet is read from the same (hot)
    // receive buffer: the bench copies in the next flow's IP header (one of two, prebuilt with
    // their checksums) and writes its source port, a few nanoseconds included in the figure.
    let mut n = node(64);
    let now = Timestamp::from_duration(Duration::from_secs(1));
    const PORTS: u32 = 50_000;
    let flow = |i: u32, flags: u8| {
        let port = u16::try_from(10_000 + i % PORTS).expect("below 65536");
        tcp_v4(client(i / PORTS), vip, port, 80, flags, &[])
    };
    for i in 0..2 * PORTS {
        n.on_tun_packet(now, &mut flow(i, 0x02));
    }
    let headers = [flow(0, 0x10), flow(PORTS, 0x10)];
    let mut buf = flow(0, 0x10);
    let mut i = 0;
    c.bench_function("flow table hit (100k flows, 64 members)", |b| {
        b.iter(|| {
            i = (i + 1) % (2 * PORTS);
            buf[..20].copy_from_slice(&headers[(i / PORTS) as usize][..20]);
            buf[20..22].copy_from_slice(&u16::try_from(10_000 + i % PORTS).unwrap_or(0).to_be_bytes());
            black_box(n.on_tun_packet(now, &mut buf))
        })
    });

    // New flow placed among 64 members: each iteration a SYN of a new flow. Two cases:
    // - "table filling": the table has room, as it does below its limit. Each batch of
    //   iterations starts from a fresh node; its slab and index growth is timed, its setup not.
    // - "table under pressure": SYNs of new flows (a flood) have filled the unconfirmed quota, so
    //   every further one is placed by consistent hash and not tracked.
    let syn_of = |k: u32, syn: &mut Vec<u8>| {
        // A new 5-tuple each time (classification checks the IP header checksum, not TCP's).
        syn[20..22].copy_from_slice(&k.to_be_bytes()[2..]);
        syn[12..16].copy_from_slice(&client(k >> 16));
        ringlb_wire::build::fix_ipv4_checksum(syn);
    };
    let mut syn = tcp_v4(client(0), vip, 40_000, 80, 0x02, &[]);
    c.bench_function("new flow placement (64 members, table filling)", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let batch = (iters - done).min(200_000);
                let mut n = node(64);
                #[allow(clippy::disallowed_methods)] // a bench measures wall time; the core does not
                let start = std::time::Instant::now();
                for k in 0..batch {
                    syn_of(u32::try_from(k).unwrap_or(0), &mut syn);
                    black_box(n.on_tun_packet(now, &mut syn));
                }
                timed += start.elapsed();
                done += batch;
            }
            timed
        })
    });
    let mut n = node(64);
    let limit = u32::try_from(n.config().flows.max_flows).expect("limit fits u32");
    for k in 0..limit {
        syn_of(k, &mut syn);
        n.on_tun_packet(now, &mut syn);
    }
    let mut k = limit;
    c.bench_function("new flow placement (64 members, table under pressure: hash, untracked)", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            syn_of(k, &mut syn);
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
