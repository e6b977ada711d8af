//! Leaving gracefully: a rolling SIGTERM restart of every daemon while long transfers run
//! breaks none of them. Needs root (network namespaces, TUN devices), like `e2e.rs`.

use std::process::Command;
use std::time::{Duration, Instant};

use ringlb_netlab::{parse_transfers, unique_prefix, unix_now, Entry, Lab, LongTransfers, Spec, Transfer};

/// Transfers in all; each lasts a few seconds, and they start over the length of the restarts.
const CONNECTIONS: usize = 200;
/// The first quarter start at once, the rest over this many seconds.
const SPREAD_SECS: f64 = 30.0;
/// How long each transfer lasts (the client paces it), at least and at most.
const MIN_SECS: f64 = 3.0;
const MAX_SECS: f64 = 9.0;
const BLOB_MIB: usize = 1;
/// SIGTERMs are this far apart at least, so that each finds transfers in flight however fast
/// the daemons go.
const RESTART_EVERY: Duration = Duration::from_secs(6);

/// One node's restart: when its SIGTERM went out, how long it took to exit, and the lines its
/// daemon logged while stopping.
#[derive(Debug)]
struct Restart {
    node: usize,
    signalled: f64,
    exited_after: Duration,
    log: Vec<String>,
}

/// The daemon's log line without terminal colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... a letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn restart(lab: &Lab, i: usize) -> Restart {
    let signalled = unix_now();
    let t = Instant::now();
    lab.stop_ringlb(i, false).unwrap();
    let exited_after = t.elapsed();
    // Read before the restart truncates it.
    let log = std::fs::read_to_string(lab.node_dir(i).join("ringlb.log")).unwrap_or_default();
    let log = log.lines().filter(|l| l.contains("stopping")).map(strip_ansi).collect();
    // n1 is the lab's seed, its own included: it comes back because its peers reach out to
    // the members they hold left.
    lab.start_ringlb(i).unwrap();
    lab.wait_converged(&[1, 2, 3], 3, Duration::from_secs(15)).unwrap();
    Restart { node: i, signalled, exited_after, log }
}

#[test]
fn a_rolling_sigterm_restart_of_every_daemon_breaks_no_transfer() {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix("roll"), env!("CARGO_BIN_EXE_ringlb"));
    spec.entry = Entry::Ecmp;
    let lab = Lab::up(spec).expect("lab comes up");
    let t0 = unix_now();
    let client = lab
        .start_long_transfers(&LongTransfers {
            count: CONNECTIONS,
            spread_secs: SPREAD_SECS,
            min_secs: MIN_SECS,
            max_secs: MAX_SECS,
            blob_mib: BLOB_MIB,
            seed: 7,
        })
        .expect("client starts");
    std::thread::sleep(Duration::from_secs(2));
    let mut restarts: Vec<Restart> = Vec::new();
    for i in 1..=3 {
        if let Some(last) = restarts.last() {
            let next = last.signalled + RESTART_EVERY.as_secs_f64();
            std::thread::sleep(Duration::from_secs_f64((next - unix_now()).max(0.0)));
        }
        restarts.push(restart(&lab, i));
    }
    let transfers = parse_transfers(&client.wait_with_output().unwrap().stdout);

    let in_flight = |at: f64| transfers.iter().filter(|t| t.start < at && t.end > at).count();
    for r in &restarts {
        println!(
            "n{}: SIGTERM {:.1} s into the test with {} transfers in flight; exited {:.1} s later",
            r.node,
            r.signalled - t0,
            in_flight(r.signalled),
            r.exited_after.as_secs_f64()
        );
        for line in &r.log {
            println!("    {line}");
        }
    }
    let broken: Vec<&Transfer> = transfers.iter().filter(|t| !t.ok).collect();
    let mut served = std::collections::BTreeMap::<&str, usize>::new();
    for t in transfers.iter().filter(|t| t.ok) {
        *served.entry(&t.node).or_default() += 1;
    }
    println!("{} transfers, {} broken; the others served by {served:?}", transfers.len(), broken.len());
    for t in &broken {
        println!(
            "broken: {} from port {} (served by {}), {:.1} s to {:.1} s into the test, after {} bytes: {}",
            t.kind,
            t.port,
            t.node,
            t.start - t0,
            t.end - t0,
            t.bytes,
            t.error
        );
    }
    if !broken.is_empty() {
        for i in 1..=3 {
            println!("{}", lab.ringlb(i, "status").unwrap_or_default());
        }
    }
    assert_eq!(transfers.len(), CONNECTIONS, "the client did not report every transfer");
    assert!(broken.is_empty(), "{} of {} transfers broke during the rolling restart", broken.len(), transfers.len());
    for r in &restarts {
        let n = in_flight(r.signalled);
        assert!(n >= 10, "n{} was restarted with only {n} transfers in flight", r.node);
        assert!(!r.log.iter().any(|l| l.contains("stop_timeout passed")), "n{} ran into its stop_timeout", r.node);
    }
    // Some daemon had flows to wait for: the drain was put to work, not only the restarts.
    let waited = |l: &String| l.contains("flows still need this daemon") && !l.contains(" flows=0 ");
    assert!(restarts.iter().any(|r| r.log.iter().any(waited)), "no stopping daemon had a flow to wait for");
}
