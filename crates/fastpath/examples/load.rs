//! Loads the fast path on an interface and prints its counters every second:
//! `ip netns exec NS load IFACE VIP` (a smoke check of the verifier and the attachment).
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = ringlb_fastpath::FastPathConfig {
        interface: args[1].clone(),
        vip: args[2].parse().expect("VIP"),
        local: std::net::Ipv4Addr::new(10, 77, 0, 1),
        carrier_port: 6081,
        mark: 0x100_0000,
        rule_pref: 99,
        max_flows: 1024,
    };
    let fast = ringlb_fastpath::FastPath::load(&config).unwrap_or_else(|e| panic!("{e}"));
    println!("loaded: {fast:?}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        println!("{:?} flows={}", fast.stats(), fast.len());
    }
}
