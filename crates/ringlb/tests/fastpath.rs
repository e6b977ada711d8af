//! The kernel fast path end to end: a tc eBPF program on each node's underlay interface carries
//! flows past the daemon after their first packet, with real TUN devices, carriers and nginx in namespaces.
//!
//! What "past the daemon" means is measured, not assumed: while an upload moves tens of
//! thousands of segments through the VIP, the daemons' own packet counters (the TUN path's)
//! move by a handful (handshake, FIN), and the program's counters carry the rest. The rest of
//! the end-to-end suite also runs with the fast path (`just test` sets
//! `NETLAB_FAST_PATH`), so every behaviour it checks holds on both paths.
//!
//! Needs root and a kernel with TCX (6.6+). A ringlb built without the program (no clang, or
//! the `ebpf` feature off) skips these tests, saying so; `./bootstrap.sh test` installs clang.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use ringlb_netlab::{unique_prefix, Lab, Spec, VIP};

static SERIAL: Mutex<()> = Mutex::new(());

/// Whether this build carries the program; if not, says so once per test.
fn built() -> bool {
    let built = ringlb_fastpath::built_in();
    if !built {
        eprintln!("SKIPPED: ringlb was built without its eBPF program (clang missing); the fast path is off");
    }
    built
}

fn lab(tag: &str, tweak: impl FnOnce(&mut Spec)) -> Lab {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices, BPF)"
    );
    let mut spec = Spec::new(unique_prefix(tag), env!("CARGO_BIN_EXE_ringlb"));
    spec.fast_path = true;
    tweak(&mut spec);
    let lab = Lab::up(spec).expect("lab comes up");
    for i in 1..=lab.spec.nodes {
        let status = lab.ringlb(i, "status").expect("status");
        assert!(
            status.contains("fast path: on"),
            "n{i} runs without its fast path (was ringlb built with clang?):\n{status}"
        );
    }
    lab
}

fn sha256(file: &Path) -> String {
    ringlb_netlab::sha256(file).expect("sha256sum")
}

fn upload(lab: &Lab, file: &Path) -> (String, String) {
    lab.upload(file).expect("upload")
}

/// The packets a node's daemon handled itself (read from the TUN, or from the carrier).
fn daemon_packets(lab: &Lab, i: usize) -> u64 {
    let m = lab.metrics(i).expect("metrics");
    ["ringlb_delivered_local_packets_total{", "ringlb_forwarded_packets_total{", "ringlb_decapsulated_packets_total{"]
        .iter()
        .map(|needle| metric(&m, needle))
        .sum()
}

/// One of a node's fast-path counters: `local`, `forwarded` or `decapsulated`.
fn fast_packets(lab: &Lab, i: usize, action: &str) -> u64 {
    let m = lab.metrics(i).expect("metrics");
    metric(&m, &format!("ringlb_fast_path_packets_total{{node=\"n{i}\",action=\"{action}\"}}"))
}

fn metric(text: &str, needle: &str) -> u64 {
    text.lines().filter(|l| l.starts_with(needle)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

/// Uploads through entry n1 until one upload was served by n1 itself and one by a peer; each
/// must arrive whole and (but for its first and last packets) bypass every daemon.
fn settled_flows_bypass_the_daemons(carrier: &str) {
    if !built() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab(&format!("fp{carrier}"), |s| s.carrier = carrier.into());
    // 48 MiB: at least 33,000 segments of at most 1,500 bytes, and at least 760 super-packets
    // of 64 KiB, which is the fewest the daemons could count if they carried it.
    let blob = lab.make_blob("up48", 48).expect("blob");
    let want = sha256(&blob);
    let (mut local, mut forwarded) = (false, false);
    for attempt in 1..=10 {
        let daemons_before: Vec<u64> = (1..=3).map(|i| daemon_packets(&lab, i)).collect();
        let fast_before = (
            fast_packets(&lab, 1, "local"),
            fast_packets(&lab, 1, "forwarded"),
            (2..=3).map(|i| fast_packets(&lab, i, "decapsulated")).sum::<u64>(),
        );
        let (sha, server) = upload(&lab, &blob);
        assert_eq!(sha, want, "upload {attempt} (served by {server}) arrived corrupted");
        let daemons: Vec<u64> = (1..=3).map(|i| daemon_packets(&lab, i) - daemons_before[i - 1]).collect();
        let fast = (
            fast_packets(&lab, 1, "local") - fast_before.0,
            fast_packets(&lab, 1, "forwarded") - fast_before.1,
            (2..=3).map(|i| fast_packets(&lab, i, "decapsulated")).sum::<u64>() - fast_before.2,
        );
        println!("{carrier} upload {attempt}: served by {server}; daemons handled {daemons:?} packets; fast path (local, forwarded, decapsulated) {fast:?}");
        // The handshake, the FIN exchange and what was in flight while the flow was handed over.
        for (i, n) in daemons.iter().enumerate() {
            assert!(
                *n < 100,
                "n{}'s daemon handled {n} packets of a 48 MiB upload: the fast path did not carry it",
                i + 1
            );
        }
        if server == "n1" {
            local = true;
            assert!(fast.0 >= 20_000, "n1 served the upload but its fast path delivered only {} packets", fast.0);
        } else {
            forwarded = true;
            assert!(fast.1 >= 20_000, "n1 forwarded to {server} but its fast path sent only {} packets", fast.1);
            assert!(
                fast.2 >= 20_000,
                "{server} served the upload but its fast path decapsulated only {} packets",
                fast.2
            );
        }
        if local && forwarded {
            break;
        }
    }
    assert!(local && forwarded, "ten uploads were not served both by the entry and by a peer");
    // What the kernel carried flows back into the daemons' figures within a reconciliation.
    std::thread::sleep(Duration::from_millis(1500));
    let m = lab.metrics(1).expect("metrics");
    let to_peers = metric(&m, "ringlb_peer_forwarded_packets_total{");
    assert!(
        to_peers >= 20_000,
        "n1 counts only {to_peers} packets forwarded to peers after a 48 MiB upload went to one"
    );
}

#[test]
fn settled_flows_bypass_the_daemons_over_udp() {
    settled_flows_bypass_the_daemons("udp");
}

#[test]
fn settled_flows_bypass_the_daemons_over_ipip() {
    settled_flows_bypass_the_daemons("ipip");
}

/// The program lives and dies with the daemon that loaded it: a killed daemon leaves neither
/// a program still forwarding nor a black hole.
#[test]
fn a_killed_daemon_takes_its_fast_path_with_it() {
    if !built() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // n1 takes no new flows itself: every upload through it is forwarded.
    let lab = lab("fpkill", |s| s.weights = vec![0.0, 1.0, 1.0]);
    let blob = lab.make_blob("up32", 32).expect("blob");
    let log = lab.dir.join("slow-upload.log");
    let url = format!("http://{VIP}:9000/up");
    let file = format!("@{}", blob.display());
    // About 30 s at 1 MiB/s: still sending when n1's daemon is killed.
    lab.spawn(
        &lab.client(),
        &log,
        &["curl", "-sS", "--max-time", "20", "--limit-rate", "1M", "--data-binary", &file, &url],
    )
    .expect("slow upload");
    let decapsulated = |lab: &Lab| (2..=3).map(|i| fast_packets(lab, i, "decapsulated")).sum::<u64>();
    let start = decapsulated(&lab);
    std::thread::sleep(Duration::from_secs(3));
    let running = decapsulated(&lab);
    assert!(running >= start + 500, "the slow upload is not on the fast path ({start} then {running} decapsulated)");

    lab.stop_ringlb(1, true).expect("kill -9 n1's daemon");
    std::thread::sleep(Duration::from_secs(1));
    let after_kill = decapsulated(&lab);
    std::thread::sleep(Duration::from_secs(3));
    let later = decapsulated(&lab);
    println!("decapsulated by the peers: {start} at start, {running} while running, {after_kill} 1 s after the kill, {later} 3 s later");
    assert_eq!(later, after_kill, "n1's program still sends the flow's packets after its daemon was killed");

    // No black hole: with no daemon, the entry serves new connections itself (fail-open).
    let who = lab.curl(&["--max-time", "5", &format!("http://{VIP}/")]).expect("a new connection is answered");
    assert_eq!(who.trim(), "n1", "with its daemon gone the entry should serve locally");

    // A new daemon loads its own program again.
    lab.start_ringlb(1).expect("restart n1");
    lab.wait_converged(&[1, 2, 3], 3, Duration::from_secs(15)).expect("cluster whole again");
    let status = lab.ringlb(1, "status").expect("status");
    assert!(status.contains("fast path: on"), "the restarted daemon runs without its fast path:\n{status}");
    let who = lab.curl(&["--max-time", "5", &format!("http://{VIP}/")]).expect("answered after the restart");
    assert!(["n2", "n3"].contains(&who.trim()), "after the restart n1 (weight 0) forwards again, got {who}");
}

/// Short connections, each handed to the fast path after its SYN: none waits for a
/// retransmission, and they need the entry's daemon for their SYN only. (The entry's program
/// may send a connection's packets while the peer's daemon still holds an earlier one, so they
/// reach the peer's daemon, not its program, with the checksum their sender left to the veth to
/// finish; the daemon must finish it. Before it did, about a quarter of these connections
/// waited 200 ms for a retransmission.)
#[test]
fn short_connections_wait_for_no_retransmission() {
    if !built() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("fpshort", |_| {});
    let out =
        lab.start_paced_connloop(30.0, 1.0, Some(300), 0.014).expect("connloop").wait_with_output().expect("wait");
    let attempts = ringlb_netlab::parse_attempts(&out.stdout);
    assert_eq!(attempts.len(), 300, "the loop ran short");
    let failed = attempts.iter().filter(|a| !a.ok).count();
    let slow = attempts.iter().filter(|a| a.secs > 0.15).count();
    let forwarded = attempts.iter().filter(|a| a.node != "n1").count();
    println!("300 connections: {failed} failed, {slow} took over 150 ms, {forwarded} served by a peer");
    assert_eq!(failed, 0);
    assert!(forwarded >= 100, "too few connections crossed the carrier to tell: {forwarded}");
    // A busy machine may delay a few; a lost first packet delays a quarter by 200 ms.
    assert!(slow <= 6, "{slow} of 300 connections took over 150 ms (a lost packet waits 200 ms to be resent)");
    let carried = fast_packets(&lab, 1, "forwarded");
    assert!(carried >= 100, "the connections' data did not take the fast path ({carried} packets)");

    // The entry's daemon sees a forwarded connection's SYN (and its handshake's ACK when that
    // overtakes the install), one it serves itself until its handshake is done (SYN, ACK, and
    // the request, which follows the ACK closely), and a closed connection's stragglers after
    // its withdrawal; the rest, the close included (FIN, RST), is the program's, which tells
    // the daemon that the connection closed. Without that, each connection took four to five
    // packets through the daemon (measured: 580 for 190 forwarded and 110 served).
    let daemon = daemon_packets(&lab, 1);
    let local = fast_packets(&lab, 1, "local");
    let served_here = 300 - forwarded as u64;
    println!(
        "entry n1: its daemon handled {daemon} packets for {forwarded} connections forwarded and {served_here} \
         served, the program {carried} forwarded and {local} local"
    );
    assert!(
        daemon <= 2 * forwarded as u64 + 4 * served_here,
        "the entry's daemon handled {daemon} packets for {forwarded} forwarded and {served_here} served connections"
    );
    // Closed connections leave the program's tables within a reconciliation or two (not at the
    // established flows' idle timeout, 15 minutes).
    let offloaded = |i| metric(&lab.metrics(i).expect("metrics"), "ringlb_fast_path_flows{");
    assert!(
        wait_until(Duration::from_secs(5), || (1..=3).all(|i| offloaded(i) == 0)),
        "closed connections are still offloaded: n1 {}, n2 {}, n3 {}",
        offloaded(1),
        offloaded(2),
        offloaded(3)
    );
    // And what the program carried for them reached the tables, to the packet: the entry's
    // per-peer counts (the daemon's forwards plus the kernel usage the core was credited,
    // read at each withdrawal) equal the daemon's forwards plus the program's own counter.
    let m = lab.metrics(1).expect("metrics");
    let per_peer = metric(&m, "ringlb_peer_forwarded_packets_total{");
    let by_daemon = metric(&m, "ringlb_forwarded_packets_total{");
    let by_program = metric(&m, "ringlb_fast_path_packets_total{node=\"n1\",action=\"forwarded\"}");
    assert_eq!(per_peer, by_daemon + by_program, "the kernel's usage of closed flows was not all credited");
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

fn spoof() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netlab/carrier_spoof.py").to_string_lossy().into_owned()
}

/// The program decapsulates a flow's carrier packets only from the entry the daemon recorded for
/// it. ACKs of an offloaded connection sent from the nodes' segment with a non-member's address
/// as the outer source are all left to the daemon, which refuses them, and the flow stays
/// offloaded; one sent as another member is left to the daemon too (which takes it, as it takes
/// any member's carrier packet: that member becomes the flow's entry, as after an ECMP change).
#[test]
fn an_offloaded_flow_takes_carrier_packets_only_from_its_own_entry() {
    if !built() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("fpspoof", |s| s.weights = vec![0.0, 1.0, 1.0]);
    let blob = lab.make_blob("up32", 32).expect("blob");
    let log = lab.dir.join("slow-upload.log");
    let (url, file) = (format!("http://{VIP}:9000/up"), format!("@{}", blob.display()));
    lab.spawn(
        &lab.client(),
        &log,
        &["curl", "-sS", "--max-time", "15", "--limit-rate", "1M", "--data-binary", &file, &url],
    )
    .expect("slow upload");
    std::thread::sleep(Duration::from_secs(2));
    let ss =
        lab.exec(&lab.client(), &["ss", "-Htn", "state", "established", "dst", &format!("{VIP}:9000")]).expect("ss");
    let client = ss.split_whitespace().nth(2).expect("the upload's connection").to_owned();
    let flows =
        |i: usize| metric(&lab.metrics(i).expect("metrics"), &format!("ringlb_fast_path_flows{{node=\"n{i}\"}}"));
    let server = [2, 3].into_iter().find(|&i| flows(i) > 0).expect("a peer carries the upload on its fast path");
    let other = 5 - server;
    let counters = |lab: &Lab| {
        let m = lab.metrics(server).expect("metrics");
        (
            metric(&m, &format!("ringlb_fast_path_passed_packets_total{{node=\"n{server}\",reason=\"wrong_source\"}}")),
            metric(&m, &format!("ringlb_dropped_packets_total{{node=\"n{server}\",reason=\"not_member\"}}")),
            fast_packets(lab, server, "decapsulated"),
        )
    };
    let dst = ringlb_netlab::node_addr(server).to_string();
    let spoof_from = |src: &str, n: &str| {
        let args = ["python3", &spoof(), "ack", src, &dst, "6635", &client, &format!("{VIP}:9000"), n];
        let sent = lab.exec(&lab.router(), &args).expect("spoof");
        assert_eq!(sent.trim(), n);
    };
    let before = counters(&lab);
    spoof_from("10.77.0.250", "100");
    std::thread::sleep(Duration::from_millis(1000));
    let after = counters(&lab);
    println!("n{server} serves {client}'s upload; 100 ACKs as 10.77.0.250: {before:?} -> {after:?} (wrong source, not member, decapsulated)");
    assert_eq!(after.0 - before.0, 100, "the program took carrier packets of the flow from a non-member");
    assert_eq!(after.1 - before.1, 100, "the daemon did not refuse the non-member's packets");
    assert!(after.2 > before.2 + 100, "the upload left the fast path ({} then {})", before.2, after.2);

    spoof_from(&ringlb_netlab::node_addr(other).to_string(), "1");
    std::thread::sleep(Duration::from_millis(300));
    let last = counters(&lab);
    println!("1 ACK as n{other}: {after:?} -> {last:?}");
    assert_eq!(last.0 - after.0, 1, "the program took a carrier packet of the flow from another member");
}

/// Flows over the sealed carrier stay on the daemon's path: the program would send them in
/// plaintext. Two sites, sealed between them (the default); site a's nodes have weight 0, so
/// every upload entering at n1 crosses to site b, sealed, and n1 offloads none of them.
#[test]
fn flows_over_the_sealed_carrier_are_never_offloaded() {
    if !built() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("fpseal", |s| {
        s.nodes = 4;
        s.sites = 2;
        s.weights = vec![0.0, 0.0, 1.0, 1.0];
    });
    lab.wait_converged(&[1, 2, 3, 4], 4, Duration::from_secs(20)).expect("both sites converge");
    let blob = lab.make_blob("up16", 16).expect("blob");
    let want = sha256(&blob);
    for _ in 0..3 {
        let (sha, server) = upload(&lab, &blob);
        assert_eq!(sha, want, "upload served by {server} corrupted");
        assert!(server == "n3" || server == "n4", "site a (weight 0) served an upload: {server}");
    }
    for i in 1..=4 {
        let m = lab.metrics(i).expect("metrics");
        let installed = metric(&m, "ringlb_fast_path_flows_installed_total{");
        let sealed =
            metric(&m, "ringlb_carrier_sealed_packets_total{") + metric(&m, "ringlb_carrier_opened_packets_total{");
        println!("n{i}: {installed} flows offloaded, {sealed} packets sealed or opened");
        assert_eq!(installed, 0, "n{i} offloaded a flow of the sealed carrier");
        if i == 1 {
            assert!(sealed >= 10_000, "the uploads did not cross the sealed carrier ({sealed})");
        }
    }
}
