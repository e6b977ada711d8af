//! How long reading the program's per-flow usage back takes (the daemon does it once a
//! second): `ip netns exec NS walk IFACE N`.
use std::net::Ipv4Addr;
use std::time::Instant;

use ringlb_fastpath::{Action, FastPath, FastPathConfig, FlowKey};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u32 = args[2].parse().expect("N");
    let config = FastPathConfig {
        interface: args[1].clone(),
        vip: Ipv4Addr::new(10, 200, 0, 10),
        local: std::net::Ipv4Addr::new(10, 77, 0, 1),
        carrier_port: 6635,
        mark: 0x100_0000,
        rule_pref: 99,
        max_flows: n,
    };
    let mut fast = FastPath::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    for i in 0..n {
        let key = FlowKey::new(Ipv4Addr::from(0x0a00_0000 + i), Ipv4Addr::new(10, 200, 0, 10), 40000, 80, 6);
        fast.install(
            &key,
            Action::Encap {
                carrier: ringlb_fastpath::Carrier::Udp,
                local: Ipv4Addr::new(1, 2, 3, 4),
                peer: Ipv4Addr::new(5, 6, 7, 8),
                source_port: 9,
                port: 10,
            },
        )
        .expect("install");
    }
    let installed = start.elapsed();
    let start = Instant::now();
    let mut seen = 0;
    fast.usage(|_, _| seen += 1);
    let walked = start.elapsed();
    println!(
        "{n} flows: install {:.2} µs each; usage walk {:.1} ms ({:.2} µs per flow, {seen} seen)",
        installed.as_secs_f64() * 1e6 / f64::from(n),
        walked.as_secs_f64() * 1e3,
        walked.as_secs_f64() * 1e6 / f64::from(n)
    );
}
