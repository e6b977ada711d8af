//! Two sites joined by the lab's emulated WAN (`netlab::sites`): site-local service, failover
//! to the other site and back, membership over a lossy WAN, and the sealed carrier on the WAN.
//!
//! Needs root. Labs run one at a time (the WAN bridge shares the two cores).

use std::process::{Child, Command};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ringlb_netlab::wan::Impairment;
use ringlb_netlab::{parse_attempts, unique_prefix, unix_now, Attempt, Lab, Spec, VIP};

static SERIAL: Mutex<()> = Mutex::new(());

fn lab(tag: &str, nodes: usize, tweak: impl FnOnce(&mut Spec)) -> Lab {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix(tag), env!("CARGO_BIN_EXE_ringlb"));
    spec.nodes = nodes;
    spec.sites = 2;
    tweak(&mut spec);
    Lab::up(spec).expect("lab comes up")
}

fn in_site_a(a: &Attempt) -> bool {
    matches!(a.node.as_str(), "n1" | "n2")
}

fn finish(child: Child) -> Vec<Attempt> {
    parse_attempts(&child.wait_with_output().expect("connection loop ends").stdout)
}

/// Waits until node `i`'s data plane sees `member` in `state` (from `ringlb status`).
fn wait_state(lab: &Lab, i: usize, member: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = lab.ringlb(i, "status").unwrap_or_default();
        let seen = status.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first().is_some_and(|n| n.trim_end_matches(" *") == member) && f.contains(&state)
        });
        if seen {
            return;
        }
        assert!(Instant::now() < deadline, "n{i} never saw {member} {state}:\n{status}");
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_site_serves_its_own_clients_spills_when_drained_and_takes_them_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Four nodes: n1, n2 in site a (its entry is n1), n3, n4 in b; WAN 40 ms ± 5 ms one way, 1 %
    // loss.
    let lab = lab("site", 4, |_| {});

    // 500 new connections from site a's client while a is healthy.
    let attempts = finish(lab.start_connloop(120.0, 5.0, Some(500)).unwrap());
    let local = attempts.iter().filter(|a| in_site_a(a)).count();
    let failed = attempts.iter().filter(|a| !a.ok).count();
    println!("healthy: {} connections, {local} served in site a, {failed} failed", attempts.len());
    assert_eq!(attempts.len(), 500);
    assert_eq!(failed, 0);
    assert!(local * 100 >= 95 * 500, "only {local} of 500 served in site a");

    // Drain both of a's nodes while connections keep coming.
    let load = lab.start_paced_connloop(14.0, 5.0, None, 0.02).unwrap();
    sleep(Duration::from_secs(2));
    let drained_at = unix_now();
    assert!(lab.ringlb(1, "drain").unwrap().contains("draining"));
    assert!(lab.ringlb(2, "drain").unwrap().contains("draining"));
    let during = finish(load);
    let after: Vec<&Attempt> = during.iter().filter(|a| a.t >= drained_at + 2.0).collect();
    let in_a = after.iter().filter(|a| in_site_a(a)).count();
    let failed = during.iter().filter(|a| !a.ok).count();
    let last_in_a = during.iter().filter(|a| in_site_a(a)).map(|a| a.t - drained_at).fold(f64::MIN, f64::max);
    println!(
        "drained: {} connections from 2 s after the drain, {in_a} of them in site a; {failed} failed in all; \
         the last connection served in a started {last_in_a:.2} s after the drain",
        after.len()
    );
    assert!(after.len() >= 25, "too few connections after the drain: {}", after.len());
    assert_eq!(in_a, 0, "new connections still served in the drained site");
    assert_eq!(failed, 0, "connections failed across the failover");
    let placed = lab.metric(1, "ringlb_site_placed_flows_total{node=\"n1\",from_site=\"a\",to_site=\"b\"}").unwrap();
    assert!(placed >= after.len() as u64, "n1's per-site metric counts {placed} flows placed in b");
    assert!(lab.ringlb(1, "status").unwrap().contains("sites: new flows placed:"));

    // Undrain: new connections return to a.
    lab.ringlb(1, "undrain").unwrap();
    lab.ringlb(2, "undrain").unwrap();
    wait_state(&lab, 1, "n2", "alive");
    wait_state(&lab, 1, "n1", "alive");
    let back = finish(lab.start_connloop(60.0, 5.0, Some(200)).unwrap());
    let local = back.iter().filter(|a| in_site_a(a)).count();
    println!("undrained: {local} of {} served in site a", back.len());
    assert!(back.iter().all(|a| a.ok));
    assert!(local * 100 >= 95 * back.len(), "only {local} of {} back in site a", back.len());
}

/// How many members node `i` suspects now.
fn suspect_now(lab: &Lab, i: usize) -> u64 {
    lab.metric(i, &format!("ringlb_members{{node=\"n{i}\",state=\"suspect\"}}")).unwrap_or(0)
}

#[test]
fn a_lossy_slow_wan_declares_nobody_dead_for_a_minute() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 150 ms round trip ± 30 ms, 3 % loss each way.
    let lab = lab("lossy", 4, |s| {
        s.wan = Impairment {
            delay: Duration::from_millis(75),
            jitter: Duration::from_millis(15),
            loss: 0.03,
            ..Impairment::default()
        };
    });
    let start = Instant::now();
    // Per node: since when it has suspected someone without a break.
    let mut since: [Option<Instant>; 5] = [None; 5];
    let mut longest = Duration::ZERO;
    let mut samples = 0;
    while start.elapsed() < Duration::from_secs(60) {
        for (i, since) in since.iter_mut().enumerate().skip(1) {
            let suspect = suspect_now(&lab, i) > 0;
            match (suspect, *since) {
                (true, None) => *since = Some(Instant::now()),
                (false, Some(t)) => {
                    longest = longest.max(t.elapsed());
                    *since = None;
                }
                _ => {}
            }
        }
        samples += 1;
        sleep(Duration::from_millis(250));
    }
    for t in since.iter().flatten() {
        longest = longest.max(t.elapsed());
    }
    let dead: u64 = (1..=4).map(|i| lab.metric(i, "ringlb_member_transitions_total{node=\"n").unwrap_or(0)).sum();
    let died: u64 = (1..=4)
        .map(|i| lab.metric(i, &format!("ringlb_member_transitions_total{{node=\"n{i}\",state=\"dead\"}}")).unwrap())
        .sum();
    let stats = lab.wan_stats().unwrap();
    println!(
        "60 s over the WAN ({samples} samples): {dead} suspect or dead transitions, {died} deaths, \
         longest suspicion seen {longest:?}; WAN: {stats:?}"
    );
    assert_eq!(died, 0, "a live member was declared dead over the WAN");
    // One suspicion period is at least 2 s (control.suspicion_timeout); sampled every 0.25 s.
    assert!(longest < Duration::from_secs(2), "a member was suspected for {longest:?}");
    let all: Vec<usize> = (1..=4).collect();
    lab.wait_converged(&all, 4, Duration::from_secs(5)).expect("all alive after the minute");
}

#[test]
fn the_wan_carries_the_marker_only_when_sealing_between_sites_is_off() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const MARKER: &str = "RINGLB-WAN-MARKER-9f3c";
    // The sealed packets also ride the ipip carrier's raw socket.
    for (sealed, carrier) in [(true, "udp"), (false, "udp"), (true, "ipip")] {
        // n1 alone in site a, with weight 0: every request it enters crosses to n2 in site b.
        let lab = lab(if sealed { "wseal" } else { "wplain" }, 2, |s| {
            s.weights = vec![0.0, 1.0];
            s.carrier = carrier.into();
            if !sealed {
                s.carrier_options = "seal_between_sites = false".into();
            }
        });
        // Every request crosses, even while the lossy WAN makes n2 suspect to n1 for a moment
        // or its load vector late: n1 takes no flows itself and then sends them to n2 in doubt.
        // (Once a flake: n1 served 8 of 20 itself.)
        lab.wait_loads(&[1, 2], Duration::from_secs(5)).expect("n1 and n2 hold each other's load");
        // On the WAN, site a's side (`bra` in the WAN namespace).
        let mut tcpdump = lab.capture(&lab.wan_ns(), "bra", &[], "wan").expect("tcpdump starts");
        let mut crossed = 0;
        for _ in 0..20 {
            let who = lab.curl(&["-H", &format!("X-Marker: {MARKER}"), &format!("http://{VIP}/")]).unwrap();
            assert!(["n1", "n2"].contains(&who.trim()), "answered by {who:?}");
            crossed += usize::from(who.trim() == "n2");
        }
        let metrics = lab.metrics(1).unwrap_or_default();
        let doubtful: Vec<&str> = metrics.lines().filter(|l| l.contains("outcome=\"doubtful_peer\"")).collect();
        if crossed < 20 {
            println!("n1 served {} itself:\n{}", 20 - crossed, lab.ringlb(1, "status").unwrap_or_default());
        }
        sleep(Duration::from_millis(300));
        let pcap = tcpdump.stop();
        let markers = pcap.windows(MARKER.len()).filter(|w| *w == MARKER.as_bytes()).count();
        let sealed_packets = lab.metric(1, "ringlb_carrier_sealed_packets_total").unwrap();
        println!(
            "{carrier}, seal_between_sites = {sealed}: {crossed} of 20 requests crossed to n2; the WAN capture \
             ({} bytes) holds the marker {markers} times; n1 sealed {sealed_packets}; {doubtful:?}",
            pcap.len()
        );
        assert_eq!(crossed, 20, "n1 (weight 0) served some requests itself");
        assert!(pcap.len() > crossed * 300, "the capture saw the traffic");
        if sealed {
            assert_eq!(markers, 0);
            assert!(sealed_packets >= 3 * crossed as u64);
        } else {
            assert!(markers >= crossed, "the plain carrier shows the marker ({markers} times for {crossed} requests)");
            assert_eq!(sealed_packets, 0);
        }
    }
}

/// `n` requests from site `s`'s client: (who answered, failures).
fn requests_from(lab: &Lab, s: usize, n: usize) -> (Vec<String>, usize) {
    let (mut who, mut failed) = (Vec::new(), 0);
    for _ in 0..n {
        let url = format!("http://{VIP}/");
        match lab.exec(&lab.client_of_site(s), &["curl", "-sS", "--max-time", "5", &url]) {
            Ok(out) => who.push(out.trim().to_owned()),
            Err(_) => failed += 1,
        }
    }
    (who, failed)
}

#[test]
fn a_cut_wan_leaves_each_site_serving_its_own_clients_and_heals_within_10_s() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("cut", 4, |_| {});
    lab.wan_cut().unwrap();
    let cut_at = Instant::now();
    // Right after the cut and while the other site turns suspect, then dead: every request is
    // answered, by the client's own site.
    let mut rounds = 0;
    while cut_at.elapsed() < Duration::from_secs(12) {
        for (s, home) in [(1, ["n1", "n2"]), (2, ["n3", "n4"])] {
            let (who, failed) = requests_from(&lab, s, 5);
            assert_eq!(failed, 0, "site {s}'s client lost requests while the WAN was cut");
            assert!(who.iter().all(|w| home.contains(&w.as_str())), "site {s}'s client served by {who:?}");
        }
        rounds += 1;
    }
    let views: Vec<String> = (1..=4).map(|i| lab.ringlb(i, "status").unwrap()).collect();
    let dead_or_suspect =
        views.iter().map(|v| v.matches(" dead ").count() + v.matches(" suspect ").count()).sum::<usize>();
    println!("cut: {rounds} rounds of 10 requests all served at home; {dead_or_suspect} remote views suspect or dead");
    assert_eq!(dead_or_suspect, 8, "each node should see the other site's two members gone:\n{}", views.join("\n"));
    lab.wan_heal().unwrap();
    let healed = Instant::now();
    let all: Vec<usize> = (1..=4).collect();
    lab.wait_converged(&all, 4, Duration::from_secs(10)).expect("whole again within 10 s of healing");
    println!("healed: every node sees 4 alive with fresh loads {:?} after healing", healed.elapsed());
    let (who, failed) = requests_from(&lab, 1, 10);
    assert_eq!(failed, 0);
    assert!(who.iter().all(|w| w == "n1" || w == "n2"), "{who:?}");
}
