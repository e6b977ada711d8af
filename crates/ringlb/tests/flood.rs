//! End to end: a SYN flood from spoofed sources through the entry, against a small flow table,
//! costs idle keep-alive connections nothing. Needs root (network namespaces, TUN devices, a
//! raw socket); the lab is torn down when the test ends, pass or fail.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringlb_netlab::flood::Flood;
use ringlb_netlab::{unique_prefix, Lab, Spec, VIP};

/// Small, so that the flood fills it (the unconfirmed share of it, with the default quota).
const MAX_FLOWS: usize = 20_000;
const CONNECTIONS: usize = 100;
const FLOOD_PACKETS: u64 = 1_000_000;
/// How long the connections sit idle, the flood included.
const IDLE: Duration = Duration::from_secs(10);

fn lab(tag: &str, tweak: impl FnOnce(&mut Spec)) -> Lab {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix(tag), env!("CARGO_BIN_EXE_ringlb"));
    tweak(&mut spec);
    Lab::up(spec).expect("lab comes up")
}

/// A counter from the router's `nstat` (e.g. `IpExtInNoRoutes`).
fn router_stat(lab: &Lab, name: &str) -> u64 {
    let out = lab.exec(&lab.router(), &["nstat", "-az", name]).expect("nstat in the router");
    out.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

#[test]
fn idle_keep_alive_connections_keep_their_node_through_a_syn_flood() {
    let lab = lab("flood", |s| s.extra_config = format!("[flows]\nmax = {MAX_FLOWS}\n"));
    // The servers answer the spoofed sources; those answers must die in the router, which has
    // no default route and no route to the spoofed range. Reverse-path filtering is off there
    // whatever the host's defaults, so the spoofed packets themselves get through.
    let router = lab.router();
    assert_eq!(
        lab.exec(&router, &["ip", "route", "show", "default"]).unwrap().trim(),
        "",
        "router has a default route"
    );
    let spoofed = Flood::syn(FLOOD_PACKETS).sources;
    let probe = std::net::Ipv4Addr::from_bits(spoofed.base.to_bits() | 1).to_string();
    assert!(lab.exec(&router, &["ip", "route", "get", &probe]).is_err(), "router routes {spoofed}");
    lab.exec(&router, &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.vc.rp_filter=0"]).unwrap();
    let unroutable_before = router_stat(&lab, "IpExtInNoRoutes");

    // 100 keep-alive connections, one request each; then idle until told; then one more
    // request each on the same connection (auto_open off: no silent reconnect).
    let script = format!(
        r#"
import http.client, json, sys
conns, first = [], []
for i in range({CONNECTIONS}):
    c = http.client.HTTPConnection("{VIP}", 80, timeout=5)
    c.auto_open = 0
    c.connect()
    c.request("GET", "/")
    first.append(c.getresponse().read().decode().strip())
    conns.append(c)
print(json.dumps(first), flush=True)
sys.stdin.readline()
second = []
for c in conns:
    try:
        c.request("GET", "/")
        second.append(c.getresponse().read().decode().strip())
    except Exception as e:
        second.append(type(e).__name__)
print(json.dumps(second), flush=True)
"#
    );
    let mut client = Command::new("ip")
        .args(["netns", "exec", &lab.client(), "python3", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("client starts");
    let mut stdout = BufReader::new(client.stdout.take().expect("client stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let first: Vec<String> = serde_json::from_str(line.trim()).expect("the client's first requests");
    let idle_since = Instant::now();
    let mut spread = BTreeMap::<&str, usize>::new();
    for node in &first {
        *spread.entry(node.as_str()).or_default() += 1;
    }
    println!("{CONNECTIONS} keep-alive connections served by {spread:?}");

    let sent = lab.flood("client", &Flood::syn(FLOOD_PACKETS)).expect("flood");
    println!(
        "flood: {} SYNs from {spoofed} in {:.1} s ({:.0}/s)",
        sent.packets,
        sent.elapsed.as_secs_f64(),
        sent.packets as f64 / sent.elapsed.as_secs_f64()
    );
    if let Some(rest) = IDLE.checked_sub(idle_since.elapsed()) {
        std::thread::sleep(rest);
    }

    client.stdin.as_mut().expect("client stdin").write_all(b"go\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let _ = client.wait();
    let second: Vec<String> = serde_json::from_str(line.trim()).expect("the client's second requests");
    let counter = |needle: &str| lab.metric(1, needle).unwrap_or(0);
    let counters: BTreeMap<&str, u64> = [
        ("flows", "ringlb_flows{"),
        ("flows_unconfirmed", "ringlb_flows_unconfirmed{"),
        ("flows_created", "ringlb_flows_created_total{"),
        ("flows_evicted", "ringlb_flows_evicted_total{"),
        ("flows_untracked", "ringlb_flows_untracked_total{"),
        ("placed_local", "outcome=\"local\""),
        ("placed_on_peers", "outcome=\"peer\""),
        ("placed_by_hash_under_pressure", "outcome=\"hash_pressure\""),
        ("placed_by_hash_fallback", "outcome=\"hash_fallback\""),
        ("flows_reset", "ringlb_flows_reset_total{"),
    ]
    .into_iter()
    .map(|(name, needle)| (name, counter(needle)))
    .collect();
    let unroutable = router_stat(&lab, "IpExtInNoRoutes") - unroutable_before;
    let tun_drops = lab.exec(&lab.node(1), &["cat", "/sys/class/net/ring0/statistics/tx_dropped"]).unwrap_or_default();
    println!("entry n1 after the flood: {counters:?}; packets its TUN queue dropped: {}", tun_drops.trim());
    println!("answers to spoofed sources dropped by the router (no route): {unroutable}");

    let broken: Vec<String> = first
        .iter()
        .zip(&second)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| format!("#{i}: {a} -> {b}"))
        .collect();
    println!("{} of {CONNECTIONS} keep-alive connections broke", broken.len());
    assert!(broken.is_empty(), "{} of {CONNECTIONS} connections broke: {broken:?}", broken.len());
    assert!(
        ["n1", "n2", "n3"].iter().all(|n| spread.get(n).copied().unwrap_or(0) >= 5),
        "the connections were not spread over the nodes: {spread:?}"
    );
    // The flood did fill the table: past the unconfirmed quota, new flows went by the hash.
    assert!(counters["flows_untracked"] > 0, "the flood never put the flow table under pressure");
    assert!(counters["placed_by_hash_under_pressure"] > 0);
    assert!(counters["flows"] <= MAX_FLOWS as u64);
    assert!(unroutable > 0, "no answer to a spoofed source reached the router");
}
