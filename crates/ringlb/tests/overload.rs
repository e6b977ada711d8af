//! End to end: a flood of small UDP datagrams through the entry, more than its daemon can
//! read, shows in ringlb's metrics and status as what the kernel dropped before the daemon read
//! it, and the books balance: every datagram sent arrived or was counted somewhere. Needs root
//! (network namespaces, TUN devices); the lab is torn down when the test ends, pass or fail.

use std::net::SocketAddrV4;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use ringlb_netlab::pps::Blast;
use ringlb_netlab::{unique_prefix, Lab, Spec, VIP};

const PORT: u16 = 9999;
const PAYLOAD: usize = 64;
const BLAST: Duration = Duration::from_secs(4);

fn status_json(lab: &Lab, i: usize) -> serde_json::Value {
    let (bin, cfg) = (env!("CARGO_BIN_EXE_ringlb"), lab.config_path(i));
    let text = lab.exec(&lab.node(i), &[bin, "--config", &cfg.to_string_lossy(), "status", "--json"]).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("n{i}'s status --json: {e}: {text}"))
}

fn kernel_drops(v: &serde_json::Value, place: &str) -> u64 {
    v["kernel_drops"][place].as_u64().unwrap_or_else(|| panic!("no kernel_drops.{place} in {v}"))
}

fn ringlb_drops(v: &serde_json::Value) -> u64 {
    v["drops"].as_object().expect("drops").values().filter_map(serde_json::Value::as_u64).sum()
}

#[test]
fn a_flood_the_entry_cannot_keep_up_with_shows_as_kernel_drops_and_the_books_balance() {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix("ovl"), env!("CARGO_BIN_EXE_ringlb"));
    // n1 forwards everything (weight 0) to n2 over the udp carrier.
    spec.nodes = 2;
    spec.weights = vec![0.0, 1.0];
    let lab = Lab::up(spec).expect("lab comes up");
    lab.count_arrivals(2, PORT).expect("arrival counter on n2");
    let hosts = [lab.client(), lab.router(), lab.node(1), lab.node(2)];
    let network_drops = || hosts.iter().map(|h| lab.interface_drops(h).expect("interface drops")).sum::<u64>();
    let (network_before, n1_before, n2_before) = (network_drops(), status_json(&lab, 1), status_json(&lab, 2));
    // The daemons' counters start with the daemon; ringlb's own drops before the flood (none
    // expected) are subtracted all the same.
    let drops_before = ringlb_drops(&n1_before) + ringlb_drops(&n2_before);

    let started = Instant::now();
    let blast = Blast { payload: PAYLOAD, ..Blast::small(SocketAddrV4::new(VIP, PORT), BLAST) };
    // Midway, n2's daemon stops reading for a moment (SIGSTOP, well within failure detection's
    // patience): the entry goes on forwarding, and n2's carrier socket overflows.
    let n2_daemon = lab.ringlb_pids(2).unwrap().into_iter().next().expect("n2's daemon");
    let blasted = std::thread::scope(|s| {
        let sender = s.spawn(|| lab.blast("client", &blast));
        sleep(BLAST / 2);
        let signal = |sig: &str| assert!(Command::new("kill").args([sig, &n2_daemon]).status().unwrap().success());
        signal("-STOP");
        // 600 ms: at the entry's slowest seen (about 40 k/s) twice what the socket's 4 MiB hold.
        sleep(Duration::from_millis(600));
        signal("-CONT");
        sender.join().expect("sender")
    })
    .expect("blast");
    // Until the queues are empty: the arrival count stands still.
    let mut arrived = lab.arrivals(2, PAYLOAD).unwrap();
    loop {
        sleep(Duration::from_millis(300));
        let now = lab.arrivals(2, PAYLOAD).unwrap();
        if now == arrived {
            break;
        }
        arrived = now;
    }
    let (n1, n2) = (status_json(&lab, 1), status_json(&lab, 2));
    let tun_queue = kernel_drops(&n1, "tun_queue");
    let carrier_socket = kernel_drops(&n2, "carrier_socket");
    let ringlb = ringlb_drops(&n1) + ringlb_drops(&n2) - drops_before;
    let network = network_drops() - network_before;
    let forwarded = n1["packets"]["forwarded"].as_u64().unwrap();
    let decapsulated = n2["packets"]["decapsulated"].as_u64().unwrap();
    let counted = arrived + tun_queue + carrier_socket + ringlb + network;
    let unaccounted = blasted.sent as i64 - counted as i64;
    println!(
        "sent {} datagrams in {:.1} s ({:.0}/s) over 64 flows; arrived at n2 {arrived}; kernel drops: n1's TUN \
         queue {tun_queue}, n2's carrier socket {carrier_socket} (n1's carrier socket {}, n2's TUN queue {}); \
         ringlb's drops {ringlb}; the lab's interfaces dropped {network}; n1 forwarded {forwarded}, n2 \
         decapsulated {decapsulated}; unaccounted {unaccounted} ({:.3} % of sent); {:.1} s in all",
        blasted.sent,
        blasted.elapsed.as_secs_f64(),
        blasted.per_second(),
        kernel_drops(&n1, "carrier_socket"),
        kernel_drops(&n2, "tun_queue"),
        unaccounted as f64 * 100.0 / blasted.sent as f64,
        started.elapsed().as_secs_f64(),
    );
    let status = lab.ringlb(1, "status").unwrap();
    println!("{}", status.lines().find(|l| l.starts_with("overload:")).unwrap_or("no overload line"));

    // The flood overflowed the entry's TUN queue, and the operator sees it, everywhere.
    assert!(tun_queue > 0, "the flood never filled n1's TUN queue: sent {}, arrived {arrived}", blasted.sent);
    assert!(carrier_socket > 0, "n2's carrier socket never overflowed while its daemon was stopped");
    assert!(
        status.contains(&format!("dropped {tun_queue} packets at the TUN's queue")),
        "status says nothing of the TUN's drops:\n{status}"
    );
    let metric = lab.metric(1, "ringlb_kernel_dropped_packets_total{node=\"n1\",where=\"tun_queue\"}").unwrap();
    assert!(metric >= tun_queue, "metrics {metric} behind status --json {tun_queue}");
    // The books balance. Every term counts distinct datagrams of this flood (nothing else
    // goes to the port, or through the TUN, here), so the counted may not exceed the sent; a
    // dropped GSO/GRO batch counts once, and only that may leave datagrams unaccounted: the
    // entry forwards one datagram per flow and read (different flows), so batches are rare.
    // 0.5 % covers them.
    assert!(counted <= blasted.sent, "counted {counted} of {} sent: something counts twice", blasted.sent);
    assert!(
        unaccounted as f64 <= 0.005 * blasted.sent as f64,
        "{unaccounted} of {} datagrams sent neither arrived nor were counted as dropped",
        blasted.sent
    );
    // The carrier's own books: what n1 sent over it, n2 took or its socket dropped.
    let n2_drops = ringlb_drops(&n2) - ringlb_drops(&n2_before);
    assert!(
        forwarded.abs_diff(decapsulated + carrier_socket + n2_drops) <= forwarded / 200,
        "n1 forwarded {forwarded}; n2 decapsulated {decapsulated}, its socket dropped {carrier_socket}, ringlb {n2_drops}"
    );
    // And the entry did forward: this is overload, not a broken path.
    assert!(arrived > blasted.sent / 20, "only {arrived} of {} arrived", blasted.sent);
}
