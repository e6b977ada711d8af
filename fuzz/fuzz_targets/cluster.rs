//! A `Cluster` fed datagrams from five certificate holders and time: it never panics, its
//! member table stays within its cap, and every member it holds is a peer that spoke for
//! itself with an address of its own certificate (no ghosts, no stolen addresses), while every
//! datagram it refused is counted.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringlb_core::cluster::{ClusterConfig, Identity, Outcome, Peer, Refusal};
use ringlb_core::{Cluster, Timestamp};

fn addr(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
}

fuzz_target!(|data: &[u8]| {
    let config = ClusterConfig { max_members: 4, ..ClusterConfig::default() };
    let me = Identity {
        name: "n0".into(),
        underlay: addr(100),
        control: SocketAddr::new(addr(100), 6636),
        weight: 1.0,
        flow_hash: 7,
        site: "default".into(),
    };
    let mut now = Timestamp::ZERO;
    let mut c = Cluster::new(me, 1, vec![("n1".into(), SocketAddr::new(addr(1), 6636))], config.clone(), 1, now);
    // Five peers, n1..n5, each with a certificate for 10.0.0.i and connecting from there.
    let peers: Vec<Peer> = (1..=5u8)
        .map(|i| Peer { name: format!("n{i}"), cert_addrs: vec![addr(i)], source: SocketAddr::new(addr(i), 6636) })
        .collect();
    // Records of: who (1 byte), time step (1 byte), length (1 byte), then the datagram.
    let mut rest = data;
    let mut refusals = 0u64;
    while let [who, step, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        now = now.saturating_add(Duration::from_millis(u64::from(*step) * 10));
        let peer = &peers[usize::from(*who) % peers.len()];
        match c.handle_datagram(now, peer, bytes) {
            Outcome::Accepted => {}
            Outcome::Refused(_) | Outcome::Close(_) => refusals += 1,
        }
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
        while c.poll_transmit().is_some() {}
        while c.poll_update().is_some() {}
        assert!(c.members().count() < config.max_members, "the member table outgrew its cap");
        for m in c.members() {
            let p = peers.iter().find(|p| p.name == m.name).unwrap_or_else(|| panic!("ghost member {}", m.name));
            assert!(p.cert_addrs.contains(&m.underlay), "{} holds {} not in its certificate", m.name, m.underlay);
            assert!(m.weight >= config.min_weight && m.weight <= config.max_weight, "weight {}", m.weight);
        }
    }
    let counted: u64 = Refusal::ALL.iter().map(|r| c.stats().refused(*r)).sum();
    assert!(counted >= refusals, "{refusals} refusals, {counted} counted");
});
