//! The edge: the network learns which nodes take VIP traffic (`entry.mode`), through a real
//! routing daemon (BIRD, BGP with BFD) or the elected node's ARP answers. Needs root and
//! `bird2` and `tcpdump` (`./bootstrap.sh` installs them), like `e2e.rs`.

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ringlb_netlab::{parse_attempts, unique_prefix, unix_now, Attempt, Entry, Lab, Spec, VIP};

static SERIAL: Mutex<()> = Mutex::new(());

fn lab(tag: &str, entry: Entry) -> Lab {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix(tag), env!("CARGO_BIN_EXE_ringlb"));
    spec.entry = entry;
    Lab::up(spec).expect("lab comes up")
}

/// Polls `f` every 10 ms until it holds; how long that took, or `None` after `within`.
fn time_until(within: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Failed connections that started at least `after` seconds past `t0`; prints every failure.
fn failures_after(attempts: &[Attempt], t0: f64, after: f64, what: &str) -> usize {
    for a in attempts.iter().filter(|a| !a.ok) {
        println!("{what}: a connection started at {:+.3} s failed after {:.3} s: {}", a.t - t0, a.secs, a.node);
    }
    let late = attempts.iter().filter(|a| !a.ok && a.t >= t0 + after).count();
    let total = attempts.iter().filter(|a| a.t >= t0 + after).count();
    println!("{what}: {late} of {total} new connections started {after} s or more after it failed");
    assert!(total >= 5, "{what}: too few connections after it to judge: {attempts:?}");
    late
}

#[test]
fn bgp_routes_follow_each_nodes_readiness() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("bgp", Entry::Bgp);
    assert_eq!(lab.entries().unwrap(), vec![1, 2, 3], "the router learns the VIP from all three nodes");
    let entries_are = |want: &[usize]| lab.entries().is_ok_and(|e| e == want);

    // kill -9 of a daemon: its TUN and the route through it vanish, BIRD withdraws the VIP.
    let conns = lab.start_connloop(6.0, 0.5, None).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let killed = unix_now();
    lab.stop_ringlb(2, true).unwrap();
    let took = time_until(Duration::from_secs(3), || entries_are(&[1, 3]));
    println!("kill -9 of n2's daemon: withdrawn after {took:?}");
    assert!(took.is_some_and(|t| t < Duration::from_secs(1)), "the router kept n2 for {took:?}");
    let attempts = parse_attempts(&conns.wait_with_output().unwrap().stdout);
    assert_eq!(failures_after(&attempts, killed, 1.0, "kill -9 of n2"), 0);

    // Restarted, it announces again.
    lab.start_ringlb(2).unwrap();
    lab.wait_entries(3, Duration::from_secs(5)).unwrap();

    // Drained, it withdraws; undrained, it returns.
    lab.ringlb(3, "drain").unwrap();
    let took = time_until(Duration::from_secs(3), || entries_are(&[1, 2]));
    assert!(took.is_some_and(|t| t < Duration::from_secs(1)), "a drained n3 stayed an entry for {took:?}");
    let status = lab.ringlb(3, "status").unwrap();
    assert!(status.contains("entry: bgp (route in table 201), not announcing the VIP (draining)"), "{status}");
    lab.ringlb(3, "undrain").unwrap();
    lab.wait_entries(3, Duration::from_secs(3)).unwrap();
    let metrics = lab.metrics(3).unwrap();
    assert!(metrics.contains("ringlb_entry_announced{node=\"n3\",mechanism=\"bgp\"} 1"), "{metrics}");

    // A node whose network stops: only BFD can tell the router.
    let conns = lab.start_connloop(6.0, 0.5, None).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let cut = "table inet cut { chain i { type filter hook input priority 0; drop; }; \
               chain o { type filter hook output priority 0; drop; }; }";
    let stopped = unix_now();
    lab.exec(&lab.node(1), &["nft", cut]).unwrap();
    let took = time_until(Duration::from_secs(3), || entries_are(&[2, 3]));
    println!("n1's network stopped: withdrawn after {took:?} (BFD)");
    assert!(took.is_some_and(|t| t < Duration::from_secs(1)), "the router kept n1 for {took:?}");
    let attempts = parse_attempts(&conns.wait_with_output().unwrap().stdout);
    assert_eq!(failures_after(&attempts, stopped, 1.0, "n1's network stopped"), 0);
    lab.exec(&lab.node(1), &["nft", "delete table inet cut"]).unwrap();
    lab.wait_entries(3, Duration::from_secs(15)).unwrap();
}

/// The Ethernet address of node `i`'s underlay.
fn mac_of(lab: &Lab, i: usize) -> String {
    lab.exec(&lab.node(i), &["cat", "/sys/class/net/eth0/address"]).unwrap().trim().to_owned()
}

/// The client's ARP entry for the VIP.
fn client_arp(lab: &Lab) -> String {
    let out = lab.exec(&lab.client(), &["ip", "-j", "neigh", "show", &VIP.to_string()]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["lladdr"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn l2_ownership_moves_within_a_second_of_the_owners_death_and_is_not_taken_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("l2", Entry::L2);
    let owner = lab.wait_l2_owner(Duration::from_secs(5)).unwrap();
    assert!(lab.curl(&[&format!("http://{VIP}/")]).is_ok(), "the VIP answers");
    assert_eq!(client_arp(&lab), mac_of(&lab, owner), "the client's ARP entry names the owner n{owner}");

    // Forged ARP from the client's segment: a request with a foreign hardware type and one with
    // a multicast sender. Counted, dropped, never answered, survived.
    let forge = lab.dir.join("forge_arp.py");
    std::fs::write(
        &forge,
        "import socket\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
         s.bind(('eth0', 0))\n\
         me, vip, src = bytes([10, 77, 0, 100]), bytes([10, 200, 0, 10]), bytes.fromhex('020000000009')\n\
         def frame(htype, sha):\n\
         \x20   arp = htype + bytes.fromhex('080006040001') + sha + me + bytes(6) + vip\n\
         \x20   return b'\\xff' * 6 + src + bytes.fromhex('0806') + arp\n\
         s.send(frame(bytes.fromhex('0006'), src))\n\
         s.send(frame(bytes.fromhex('0001'), bytes.fromhex('010000000009')))\n",
    )
    .unwrap();
    let answered = lab.metric(owner, "ringlb_arp_answered_total{").unwrap();
    lab.exec(&lab.client(), &["python3", &forge.to_string_lossy()]).unwrap();
    let dropped =
        time_until(Duration::from_secs(2), || lab.metric(owner, "ringlb_arp_dropped_total{").is_ok_and(|n| n >= 2));
    assert!(dropped.is_some(), "n{owner} did not count the forged ARP frames: {}", lab.metrics(owner).unwrap());
    assert_eq!(lab.metric(owner, "ringlb_arp_answered_total{").unwrap(), answered, "a forged request was answered");
    assert!(lab.curl(&[&format!("http://{VIP}/")]).is_ok(), "the owner survives forged ARP");

    // Watch the client's segment for gratuitous ARP, with unix timestamps.
    let capture = lab.dir.join("arp.txt");
    let mut tcpdump = Command::new("ip")
        .args(["netns", "exec", &lab.client(), "tcpdump", "-l", "-n", "-e", "-tt", "-i", "eth0", "arp"])
        .stdout(std::fs::File::create(&capture).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump runs (apt install tcpdump)");
    let conns = lab.start_connloop(6.0, 0.5, None).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let killed = unix_now();
    lab.stop_ringlb(owner, true).unwrap();
    let successor = time_until(Duration::from_secs(3), || lab.l2_owners().iter().any(|&o| o != owner))
        .and_then(|_| lab.l2_owners().into_iter().find(|&o| o != owner))
        .expect("another node takes the VIP");
    let attempts = parse_attempts(&conns.wait_with_output().unwrap().stdout);
    std::thread::sleep(Duration::from_millis(200));
    // `-l` writes each line as it is captured, so nothing is lost to the kill.
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    let garp = format!("Request who-has {VIP} tell {VIP}");
    let successor_mac = mac_of(&lab, successor);
    let text = std::fs::read_to_string(&capture).unwrap();
    let first = text
        .lines()
        .filter(|l| l.contains(&garp) && l.contains(&successor_mac))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .find(|&t| t > killed);
    println!("n{owner} killed; n{successor} announced the VIP {:?} s later", first.map(|t| t - killed));
    let first = first.unwrap_or_else(|| panic!("no gratuitous ARP from n{successor} ({successor_mac}):\n{text}"));
    assert!(first - killed < 1.0, "the first gratuitous ARP came {:.3} s after the kill", first - killed);
    assert_eq!(failures_after(&attempts, killed, 1.0, &format!("kill -9 of the owner n{owner}")), 0);
    // Those successes are not the dead owner's fail-open (its kernel would serve them all
    // itself): once the successor announced, the client's connections enter through it, and the
    // dead owner serves none of them.
    let by_old = attempts.iter().filter(|a| a.t >= first + 0.5 && a.node == format!("n{owner}")).count();
    let after = attempts.iter().filter(|a| a.t >= first + 0.5).count();
    println!("{by_old} of {after} connections 0.5 s after the takeover were served by the dead owner n{owner}");
    assert!(after >= 5 && by_old == 0, "traffic still entered through the dead owner: {by_old} of {after}");
    assert_eq!(client_arp(&lab), successor_mac, "the client's ARP entry follows the new owner");

    // The old owner comes back: the VIP stays where it is (no preemption), and one owner only.
    lab.start_ringlb(owner).unwrap();
    let all: Vec<usize> = (1..=3).collect();
    lab.wait_converged(&all, 3, Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(lab.l2_owners(), vec![successor], "n{owner} took the VIP back");
    let status = lab.ringlb(owner, "status").unwrap();
    assert!(status.contains(&format!("owner: n{successor}")), "{status}");

    // Drained, the owner hands the VIP on.
    lab.ringlb(successor, "drain").unwrap();
    let moved = time_until(Duration::from_secs(3), || {
        let owners = lab.l2_owners();
        owners.len() == 1 && owners[0] != successor
    });
    assert!(moved.is_some_and(|t| t < Duration::from_secs(1)), "a drained owner kept the VIP for {moved:?}");
    assert!(lab.curl(&[&format!("http://{VIP}/")]).is_ok(), "the VIP answers after the drain");
}

#[test]
fn the_deployed_bird_config_and_example_config_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bird = Command::new("bird").arg("-p").arg("-c").arg(root.join("deploy/bird/bird.conf")).output();
    let bird = bird.expect("bird runs (apt install bird2)");
    assert!(bird.status.success(), "deploy/bird/bird.conf: {}", String::from_utf8_lossy(&bird.stderr));
    // The example config with the BGP entry switched on.
    let example = std::fs::read_to_string(root.join("deploy/ringlb.example.toml")).unwrap();
    // `check` also looks at the host: the example's eth0 may not exist here, lo does.
    let enabled = example
        .replace("# [entry]\n# mode = \"none\"", "[entry]\nmode = \"bgp\"")
        .replace("underlay_interface = \"eth0\"", "underlay_interface = \"lo\"");
    assert_ne!(enabled, example, "the example shows [entry]");
    let path = std::env::temp_dir().join(format!("{}.toml", unique_prefix("example")));
    std::fs::write(&path, enabled).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_ringlb")).arg("--config").arg(&path).arg("check").output().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("mode: Bgp"));
}
