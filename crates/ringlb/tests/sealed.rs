//! The sealed carrier end to end: what it hides on the wire, and what it refuses from a host
//! on the underlay that can spoof a member's address (the router here).
//!
//! Needs root (network namespaces, TUN devices, raw sockets). Labs run one at a time.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::thread::sleep;
use std::time::Duration;

use ringlb_netlab::{node_addr, unique_prefix, Capture, Lab, Spec, VIP};

static SERIAL: Mutex<()> = Mutex::new(());

const MARKER: &str = "RINGLB-SEALED-CARRIER-MARKER";

fn lab(tag: &str, carrier_options: &str) -> Lab {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix(tag), env!("CARGO_BIN_EXE_ringlb"));
    spec.nodes = 2;
    // The entry n1 takes no new flows itself: every request crosses the carrier to n2.
    spec.weights = vec![0.0, 1.0];
    spec.carrier_options = carrier_options.into();
    Lab::up(spec).expect("lab comes up")
}

fn spoof() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netlab/carrier_spoof.py").to_string_lossy().into_owned()
}

/// Captures carrier packets to n2 on the nodes' segment (the router's bridge, where the
/// attacker sits) into `<lab>/<name>.pcap`.
fn capture(lab: &Lab, name: &str) -> Capture {
    let filter = ["udp", "dst", "port", "6635", "and", "dst", "host", "10.77.0.2"];
    lab.capture(&lab.router(), "br0", &filter, name).expect("tcpdump starts")
}

/// `n` requests to the VIP carrying the marker in a header; each must be answered by n2.
fn marked_requests(lab: &Lab, n: usize) {
    for _ in 0..n {
        let who = lab.curl(&["-H", &format!("X-Marker: {MARKER}"), &format!("http://{VIP}/")]).expect("answered");
        assert_eq!(who.trim(), "n2", "the entry n1 (weight 0) forwards every new connection");
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

fn delivered(lab: &Lab) -> u64 {
    lab.metric(2, "ringlb_decapsulated_packets_total").expect("metrics")
}

/// Runs the spoofing tool in the router's namespace (a host on the underlay) with n1's address
/// as the outer source; returns how many packets it sent. Checks that n2 delivered none of them.
fn attack(lab: &Lab, args: &[&str]) -> u64 {
    let mut all = vec!["python3".to_owned(), spoof()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let before = delivered(lab);
    let out = lab.exec(&lab.router(), &refs).expect("spoofing tool runs");
    sleep(Duration::from_millis(300)); // the daemon reads what is queued
    assert_eq!(delivered(lab), before, "n2 delivered carrier packets during the attack {args:?}");
    out.trim().parse().expect("the tool prints how many it sent")
}

fn drops(lab: &Lab, reason: &str) -> u64 {
    lab.metric(2, &format!("reason=\"{reason}\"")).expect("metrics")
}

fn syn_recv(lab: &Lab) -> usize {
    lab.exec(&lab.node(2), &["ss", "-Htn", "state", "syn-recv"]).expect("ss").lines().count()
}

#[test]
fn the_sealed_carrier_hides_the_marker_that_the_plain_carrier_shows() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (options, sealed) in [("require_authenticated = true", true), ("", false)] {
        let lab = lab(if sealed { "seal" } else { "plain" }, options);
        let mut tcpdump = capture(&lab, "marker");
        marked_requests(&lab, 20);
        sleep(Duration::from_millis(300));
        let pcap = tcpdump.stop();
        let markers = count(&pcap, MARKER.as_bytes());
        let sealed_packets = lab.metric(1, "ringlb_carrier_sealed_packets_total").unwrap();
        let opened = lab.metric(2, "ringlb_carrier_opened_packets_total").unwrap();
        println!(
            "{}: capture of {} bytes holds the marker {markers} times; n1 sealed {sealed_packets}, n2 opened {opened}",
            if sealed { "sealed" } else { "plain" },
            pcap.len()
        );
        assert!(pcap.len() > 20 * 200, "the capture saw the requests");
        if sealed {
            assert_eq!(markers, 0, "the marker crossed the sealed carrier in the clear");
            assert!(sealed_packets >= 60 && opened >= 60, "sealed {sealed_packets}, opened {opened}");
            assert_eq!(drops(&lab, "carrier_forged") + drops(&lab, "carrier_no_key"), 0);
        } else {
            assert!(markers >= 20, "the plain carrier shows the marker ({markers} times)");
            assert_eq!(sealed_packets, 0);
        }
    }
}

#[test]
fn spoofed_replayed_and_retired_key_packets_are_refused_and_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("spoof", "require_authenticated = true\nkey_lifetime = \"5s\"");
    let (n1, n2) = (node_addr(1).to_string(), node_addr(2).to_string());
    let mut tcpdump = capture(&lab, "real");
    marked_requests(&lab, 10);
    sleep(Duration::from_millis(300));
    tcpdump.stop();
    let pcap = tcpdump.file.to_string_lossy().into_owned();
    let syn_recv_before = syn_recv(&lab);

    // Plaintext IP-in-UDP SYNs from n1's address: refused, none becomes a half-open socket.
    let sent = attack(&lab, &["plain", &n1, &n2, "6635", &VIP.to_string(), "300"]);
    let refused = drops(&lab, "carrier_plaintext_refused");
    println!("plaintext: sent {sent}, refused {refused}");
    assert_eq!(sent, 300);
    assert_eq!(refused, sent);
    // Made-up key ids.
    let sent = attack(&lab, &["garbage", &n1, &n2, "6635", "300"]);
    let no_key = drops(&lab, "carrier_no_key");
    println!("made-up keys: sent {sent}, refused as no_key {no_key}");
    assert_eq!(no_key, sent);
    // Captured packets with a fresh counter and a flipped bit: they do not authenticate. (A
    // capture's oldest epoch may have been retired meanwhile: those count as stale.)
    let stale_before = drops(&lab, "carrier_stale_key");
    let sent = attack(&lab, &["tamper", &pcap, &n1, &n2, "6635"]);
    let forged = drops(&lab, "carrier_forged");
    let stale = drops(&lab, "carrier_stale_key") - stale_before;
    println!("tampered: sent {sent}, refused as forged {forged}, as stale {stale}");
    assert!(sent >= 30, "the capture holds the real packets");
    assert!(forged > 0 && forged + stale == sent, "forged {forged} + stale {stale} != {sent}");
    // The captured packets replayed unchanged.
    let stale_before = drops(&lab, "carrier_stale_key");
    let sent = attack(&lab, &["replay", &pcap, &n1, &n2, "6635"]);
    let replayed = drops(&lab, "carrier_replayed");
    let stale = drops(&lab, "carrier_stale_key") - stale_before;
    println!("replayed: sent {sent}, refused as replayed {replayed}, as stale {stale}");
    assert!(replayed > 0 && replayed + stale == sent, "replayed {replayed} + stale {stale} != {sent}");

    // Keys move on while traffic flows (5 s each, the old one kept 5 s more): the captured ones
    // are retired, and replaying them now counts as stale.
    for _ in 0..13 {
        marked_requests(&lab, 2);
        sleep(Duration::from_millis(1000));
    }
    assert!(lab.metric(1, "ringlb_carrier_key_rotations_total").unwrap() >= 2);
    let stale_before = drops(&lab, "carrier_stale_key");
    let sent = attack(&lab, &["replay", &pcap, &n1, &n2, "6635"]);
    let stale = drops(&lab, "carrier_stale_key") - stale_before;
    println!("replayed after rotation: sent {sent}, refused as stale {stale}");
    assert_eq!(stale, sent);

    // Nothing the attacker sent reached a socket: n2 delivered none of it (checked around each
    // attack), and no half-open connection appeared.
    assert_eq!(syn_recv(&lab), syn_recv_before);
    // And the real traffic still flows.
    marked_requests(&lab, 3);
}
