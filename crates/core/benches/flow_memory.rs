//! Resident memory of 1,000,000 tracked flows (`just bench-memory`): inserts them through the
//! real `Node` and reads the process's RSS before and after.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ringlb_core::{FailurePolicy, FlowConfig, Member, Members, Node, NodeConfig, NodeId, Policy, Timestamp};
use ringlb_wire::build::tcp_v4;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    const FLOWS: u32 = 1_000_000;
    let members =
        Members::new((1..=8).map(|i| Member::new(format!("n{i}"), IpAddr::V4(Ipv4Addr::new(10, 77, 0, i)), 1.0)))
            .expect("members");
    let before = rss_kib();
    let mut node = Node::new(
        NodeConfig {
            local: NodeId(0),
            vip: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10)),
            tun_mtu: 1472,
            flows: FlowConfig { max_flows: FLOWS as usize, ..FlowConfig::default() },
            policy: Policy::PowerOfTwo { margin: 0.1 },
            seed: 1,
            on_failure: FailurePolicy::Reset,
            load_stale_after: Duration::from_secs(1),
            require_load: false,
            recovery: Default::default(),
        },
        members,
    );
    let now = Timestamp::from_duration(Duration::from_secs(1));
    let mut syn = tcp_v4([10, 0, 0, 0], [10, 200, 0, 10], 1, 80, 0x02, &[]);
    for i in 0..FLOWS {
        let b = i.to_be_bytes();
        syn[12..16].copy_from_slice(&[10, 64 | b[0], b[1], b[2]]);
        syn[20] = b[3];
        ringlb_wire::build::fix_ipv4_checksum(&mut syn);
        node.on_tun_packet(now, &mut syn);
    }
    let after = rss_kib();
    let flows = node.flows().len();
    let mib = (after.saturating_sub(before)) as f64 / 1024.0;
    println!("flows tracked: {flows}");
    println!(
        "resident memory for them: {mib:.1} MiB ({:.0} bytes per flow); limit 128 MiB",
        mib * 1_048_576.0 / flows as f64
    );
    assert_eq!(flows, FLOWS as usize, "flows were evicted or lost");
    if mib > 128.0 {
        eprintln!("over the 128 MiB budget");
        std::process::exit(1);
    }
}
