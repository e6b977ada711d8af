//! No connection lost to ringlb's own changes: daemons restarted without waiting for their
//! flows, a daemon killed, entries added to and removed from the router's ECMP group. Every
//! case runs long, checksummed transfers through an ECMP entry over four nodes, so most
//! connections are forwarded and most move to an entry (or a daemon) that never saw them
//! start: flow recovery (the consistent-hash homes, see `ringlb_core`) must find their
//! servers. The last test upgrades a cluster from the previous release, built from its commit
//! in a worktree. Needs root (network namespaces, TUN devices), like `e2e.rs`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ringlb_netlab::{
    build_release, node_addr, parse_transfers, unique_prefix, unix_now, Entry, Lab, LongTransfers, Spec, Transfer,
    PREVIOUS_RELEASE, VIP,
};

const NODES: usize = 4;
const ALL: [usize; NODES] = [1, 2, 3, 4];
const CONNECTIONS: usize = 300;

fn lab(tag: &str) -> Lab {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix(tag), env!("CARGO_BIN_EXE_ringlb"));
    spec.entry = Entry::Ecmp;
    spec.nodes = NODES;
    // A stopping daemon waits for no flow: the next one (or another entry) must find them.
    spec.stop_timeout = Some(Duration::from_millis(500));
    Lab::up(spec).expect("lab comes up")
}

/// 300 transfers, a quarter at once and the rest over 3 s, each lasting `secs` to `secs` + 4.
fn transfers(lab: &Lab, secs: f64) -> std::process::Child {
    lab.start_long_transfers(&LongTransfers {
        count: CONNECTIONS,
        spread_secs: 3.0,
        min_secs: secs,
        max_secs: secs + 4.0,
        blob_mib: 1,
        seed: 11,
    })
    .expect("client starts")
}

/// Sums a counter over the nodes.
fn total(lab: &Lab, needle: &str) -> u64 {
    ALL.iter().map(|&i| lab.metric(i, needle).unwrap_or(0)).sum()
}

/// Prints what happened and the recovery counters; returns the broken transfers.
fn report<'a>(lab: &Lab, t0: f64, transfers: &'a [Transfer]) -> Vec<&'a Transfer> {
    let broken: Vec<&Transfer> = transfers.iter().filter(|t| !t.ok).collect();
    let mut served = std::collections::BTreeMap::<&str, usize>::new();
    for t in transfers {
        *served.entry(&t.node).or_default() += 1;
    }
    println!("{} transfers, {} broken; served by {served:?}", transfers.len(), broken.len());
    println!(
        "recovered {}, unrecovered {}, second-hop packets {}, unclaimed drops {}, unclaimed delivered {}, claims accepted {}",
        total(lab, "ringlb_flows_recovered_total"),
        total(lab, "ringlb_flows_unrecovered_total"),
        total(lab, "ringlb_second_hop_packets_total"),
        total(lab, "reason=\"unclaimed_flow\""),
        total(lab, "ringlb_unclaimed_delivered_packets_total"),
        total(lab, "result=\"accepted\""),
    );
    let (second, forwarded) =
        (total(lab, "ringlb_second_hop_packets_total"), total(lab, "ringlb_forwarded_packets_total"));
    let recovered = total(lab, "ringlb_flows_recovered_total").max(1);
    println!(
        "second hop: {second} of {} carrier packets ({:.4} %), {:.1} per recovered connection",
        forwarded + second,
        second as f64 * 100.0 / (forwarded + second).max(1) as f64,
        second as f64 / recovered as f64
    );
    for t in &broken {
        println!(
            "broken: {} from port {} (served by {}), {:.1} s to {:.1} s, after {} bytes: {}",
            t.kind,
            t.port,
            t.node,
            t.start - t0,
            t.end - t0,
            t.bytes,
            t.error
        );
    }
    broken
}

/// Transfers running at `at` on a node other than the one given.
fn in_flight(transfers: &[Transfer], at: f64) -> usize {
    transfers.iter().filter(|t| t.start < at && t.end > at).count()
}

#[test]
fn a_rolling_restart_that_waits_for_no_flow_breaks_no_connection_not_even_a_drained_nodes() {
    let lab = lab("surv-roll");
    let t0 = unix_now();
    let client = transfers(&lab, 30.0);
    std::thread::sleep(Duration::from_secs(5));
    // n4 drains: it takes no new flows, and its connections must still reach it through the
    // entries restarted below.
    assert!(lab.ringlb(4, "drain").unwrap().contains("draining"));
    let mut signalled = Vec::new();
    for i in ALL {
        signalled.push(unix_now());
        lab.stop_ringlb(i, false).unwrap();
        lab.start_ringlb(i).unwrap();
        lab.wait_loads(&ALL, Duration::from_secs(15)).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    let done = unix_now();
    let transfers = parse_transfers(&client.wait_with_output().unwrap().stdout);
    let broken = report(&lab, t0, &transfers);
    for (i, at) in ALL.iter().zip(&signalled) {
        println!("n{i} restarted {:.1} s in, {} transfers in flight", at - t0, in_flight(&transfers, *at));
    }
    assert_eq!(transfers.len(), CONNECTIONS, "the client did not report every transfer");
    assert!(transfers.iter().all(|t| t.end > done), "a transfer ended before the last restart: the test proves less");
    let on_drained = transfers.iter().filter(|t| t.node == "n4").count();
    assert!(on_drained >= 20, "only {on_drained} transfers on the drained n4");
    assert!(total(&lab, "ringlb_flows_recovered_total") > 0, "no flow needed recovering: the test proves nothing");
    assert!(broken.is_empty(), "{} of {} transfers broke across the rolling restart", broken.len(), transfers.len());
}

#[test]
fn kill_9_of_an_entry_daemon_and_its_restart_break_at_most_one_percent() {
    let lab = lab("surv-kill");
    let t0 = unix_now();
    let client = transfers(&lab, 20.0);
    std::thread::sleep(Duration::from_secs(6));
    let killed = unix_now();
    lab.stop_ringlb(2, true).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    lab.start_ringlb(2).unwrap();
    println!("n2's daemon killed {:.1} s in and back {:.1} s later", killed - t0, unix_now() - killed);
    let transfers = parse_transfers(&client.wait_with_output().unwrap().stdout);
    let broken = report(&lab, t0, &transfers);
    assert_eq!(transfers.len(), CONNECTIONS, "the client did not report every transfer");
    assert!(in_flight(&transfers, killed) >= CONNECTIONS * 9 / 10, "transfers were not in flight at the kill");
    println!("broken by kill -9: {} of {} ({:.1} %)", broken.len(), CONNECTIONS, broken.len() as f64 * 100.0 / 300.0);
    assert!(broken.len() * 100 <= CONNECTIONS, "{} of {CONNECTIONS} transfers broke (more than 1 %)", broken.len());
}

/// Replaces the router's route to the VIP with one ECMP next hop per node in `nodes`.
fn ecmp(lab: &Lab, nodes: &[usize]) {
    let mut args = vec!["ip".to_owned(), "route".into(), "replace".into(), format!("{VIP}/32")];
    for &i in nodes {
        args.extend(["nexthop".into(), "via".into(), node_addr(i).to_string()]);
    }
    lab.exec(&lab.router(), &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    // The router's cached routes go with the change.
    let _ = lab.exec(&lab.router(), &["ip", "route", "flush", "cache"]);
}

#[test]
fn entries_joining_and_leaving_the_routers_ecmp_group_break_no_connection() {
    let lab = lab("surv-ecmp");
    ecmp(&lab, &[1, 2, 3]);
    let t0 = unix_now();
    let client = transfers(&lab, 20.0);
    std::thread::sleep(Duration::from_secs(6));
    let grew = unix_now();
    ecmp(&lab, &[1, 2, 3, 4]);
    std::thread::sleep(Duration::from_secs(5));
    let shrank = unix_now();
    ecmp(&lab, &[1, 2, 3]);
    let transfers = parse_transfers(&client.wait_with_output().unwrap().stdout);
    let broken = report(&lab, t0, &transfers);
    assert_eq!(transfers.len(), CONNECTIONS, "the client did not report every transfer");
    assert!(transfers.iter().all(|t| t.end > shrank), "a transfer ended before the group shrank");
    println!("the group grew {:.1} s in and shrank {:.1} s in", grew - t0, shrank - t0);
    assert!(total(&lab, "ringlb_flows_recovered_total") > 0, "no connection moved entries: the test proves nothing");
    assert!(broken.is_empty(), "{} of {} transfers broke as the ECMP group changed", broken.len(), transfers.len());
}

#[test]
fn an_upgrade_from_the_previous_release_node_by_node_breaks_no_connection() {
    let old = build_release(PREVIOUS_RELEASE).expect("the previous release builds");
    let new = Path::new(env!("CARGO_BIN_EXE_ringlb"));
    let mut spec = Spec::new(unique_prefix("surv-upgr"), &old);
    spec.entry = Entry::Ecmp;
    spec.nodes = NODES;
    // The previous release has no `[fast_path]` section: the lab runs the path both releases
    // have, also when the suite runs with the fast path.
    spec.fast_path = false;
    // The previous release has no flow recovery: its SIGTERM waits (up to the default 30 s)
    // for the flows that need it, as an operator's `systemctl restart` would.
    let lab = Lab::up(spec).expect("lab comes up on the previous release");
    let t0 = unix_now();
    // A steady load across the whole upgrade: new transfers keep starting for 90 s.
    let client = lab
        .start_long_transfers(&LongTransfers {
            count: CONNECTIONS,
            spread_secs: 90.0,
            min_secs: 20.0,
            max_secs: 24.0,
            blob_mib: 1,
            seed: 13,
        })
        .expect("client starts");
    std::thread::sleep(Duration::from_secs(5));
    let mut signalled = Vec::new();
    for i in ALL {
        signalled.push(unix_now());
        lab.stop_ringlb(i, false).unwrap();
        lab.start_ringlb_bin(i, new).unwrap();
        lab.wait_loads(&ALL, Duration::from_secs(15)).unwrap();
        println!("n{i} upgraded {:.1} s in, after {:.1} s", signalled[i - 1] - t0, unix_now() - signalled[i - 1]);
    }
    let transfers = parse_transfers(&client.wait_with_output().unwrap().stdout);
    let broken = report(&lab, t0, &transfers);
    assert_eq!(transfers.len(), CONNECTIONS, "the client did not report every transfer");
    for (i, at) in ALL.iter().zip(&signalled) {
        let n = in_flight(&transfers, *at);
        assert!(n >= 10, "n{i} was upgraded with only {n} transfers in flight");
    }
    assert!(broken.is_empty(), "{} of {} transfers broke across the upgrade", broken.len(), transfers.len());
}
