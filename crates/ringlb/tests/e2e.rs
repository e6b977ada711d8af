//! End-to-end tests: real TUN devices, real carriers, real nginx, in network namespaces.
//!
//! Each test builds its own lab with a unique namespace prefix; the lab is torn down when the
//! test ends, pass or fail. They need root. Labs run one at a time: the machine has 2 cores
//! and throughput checks would disturb each other.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use ringlb_netlab::{node_addr, unique_prefix, Lab, Spec, VIP};

static SERIAL: Mutex<()> = Mutex::new(());

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringlb")
}

fn lab(tag: &str, tweak: impl FnOnce(&mut Spec)) -> Lab {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix(tag), bin());
    tweak(&mut spec);
    Lab::up(spec).expect("lab comes up")
}

fn inject() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netlab/inject.py").to_string_lossy().into_owned()
}

/// Who answered `GET /` for each of `n` new connections.
fn tally(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for _ in 0..n {
        let who = lab.curl(&[&format!("http://{VIP}/")]).expect("request to the VIP answered");
        *t.entry(who.trim().to_owned()).or_default() += 1;
    }
    t
}

/// Downloads `/blob/NAME`, returning (sha256, the X-Node that served it).
fn download(lab: &Lab, name: &str) -> (String, String) {
    let script = format!(
        "curl -sS --max-time 120 -D /dev/fd/3 -o - http://{VIP}/blob/{name} 3>{dir}/headers | sha256sum; \
         grep -i '^x-node' {dir}/headers",
        dir = lab.dir.display()
    );
    let out = lab.exec(&lab.client(), &["bash", "-c", &script]).expect("download");
    let sha = out.split_whitespace().next().unwrap_or_default().to_owned();
    let node = out.lines().last().and_then(|l| l.split(':').nth(1)).unwrap_or_default().trim().to_owned();
    (sha, node)
}

/// Uploads a file, returning (sha256 the server computed, node that served it).
fn upload(lab: &Lab, file: &Path) -> (String, String) {
    let out = lab
        .curl(&[
            "--max-time",
            "120",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("http://{VIP}:9000/up"),
        ])
        .expect("upload");
    let mut words = out.split_whitespace();
    (words.next().unwrap_or_default().to_owned(), words.next().unwrap_or_default().to_owned())
}

fn sha256(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

#[test]
fn requests_through_one_entry_are_served_by_every_node_and_replies_bypass_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("dsr", |_| {});
    let t = tally(&lab, 30);
    println!("answers: {t:?}");
    for n in ["n1", "n2", "n3"] {
        assert!(t.get(n).copied().unwrap_or(0) >= 5, "{n} served too little: {t:?}");
    }
    assert!(lab.metric(2, "ringlb_decapsulated_packets_total").unwrap() > 0);
    assert!(lab.metric(3, "ringlb_decapsulated_packets_total").unwrap() > 0);

    // DSR: a 64 MiB download served by a peer must not come back through the entry n1.
    lab.make_blob("dsr", 64).unwrap();
    let mut checked = 0;
    for _ in 0..6 {
        let before = lab.rx_bytes(1).unwrap();
        let (_, node) = download(&lab, "dsr");
        let crossed = lab.rx_bytes(1).unwrap() - before;
        println!("download served by {node}: entry n1 received {crossed} bytes");
        if node != "n1" {
            assert!(crossed < 64 << 20 >> 4, "replies crossed the entry: {crossed} bytes for 64 MiB");
            checked += 1;
        }
    }
    assert!(checked >= 2, "too few downloads were forwarded to check DSR");
}

fn transfers_keep_integrity(carrier: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Entry n1 has weight 0: it forwards every flow, so every transfer crosses the carrier.
    let lab = lab(&carrier[..1], |s| {
        s.carrier = carrier.into();
        s.weights = vec![0.0, 1.0, 1.0];
    });
    let blob = lab.make_blob("big", 200).unwrap();
    let want = sha256(&blob);
    let (got, node) = download(&lab, "big");
    assert_eq!(got, want, "200 MB download over {carrier} corrupted");
    assert!(node == "n2" || node == "n3", "download served by {node:?}, not forwarded");
    let (got, node) = upload(&lab, &blob);
    assert_eq!(got, want, "200 MB upload over {carrier} corrupted");
    assert!(node == "n2" || node == "n3", "upload served by {node:?}, not forwarded");
    assert!(lab.metric(1, "ringlb_forwarded_packets_total").unwrap() > 100_000, "upload did not go through n1");
    assert!(lab.metric(1, "ringlb_mss_clamped_total").unwrap() >= 2, "forwarded SYNs not clamped");
}

#[test]
fn big_transfers_keep_integrity_over_udp() {
    transfers_keep_integrity("udp");
}

#[test]
fn big_transfers_keep_integrity_over_ipip() {
    transfers_keep_integrity("ipip");
}

#[test]
fn a_keep_alive_connection_stays_on_its_node_while_new_ones_move() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("ka", |_| {});
    let script = format!(
        r#"
import http.client, json
ka = http.client.HTTPConnection("{VIP}", 80, timeout=10)
kept, fresh = [], []
for i in range(150):
    ka.request("GET", "/")
    kept.append(ka.getresponse().read().decode().strip())
    c = http.client.HTTPConnection("{VIP}", 80, timeout=10)
    c.request("GET", "/", headers={{"Connection": "close"}})
    fresh.append(c.getresponse().read().decode().strip())
    c.close()
print(json.dumps({{"kept": kept, "fresh": fresh}}))
"#
    );
    let out = lab.exec(&lab.client(), &["python3", "-c", &script]).unwrap();
    let kept: Vec<&str> = out.split("\"kept\": [").nth(1).unwrap().split(']').next().unwrap().split(", ").collect();
    let fresh = out.split("\"fresh\": [").nth(1).unwrap();
    assert_eq!(kept.len(), 150);
    assert!(kept.iter().all(|k| *k == kept[0]), "keep-alive connection moved: {kept:?}");
    for n in ["n1", "n2", "n3"] {
        assert!(fresh.contains(n), "new connections never reached {n}: {fresh}");
    }
}

#[test]
fn malformed_packets_are_counted_dropped_and_survived() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for carrier in ["udp", "ipip"] {
        let lab = lab(&format!("m{}", &carrier[..1]), |s| s.carrier = carrier.into());
        let peer = node_addr(2).to_string();
        let vip = VIP.to_string();
        let script = inject();
        let args: Vec<&str> = match carrier {
            "udp" => vec!["python3", &script, "carrier-udp", &peer, "6635", &vip],
            _ => vec!["python3", &script, "carrier-ipip", &peer, &vip],
        };
        // From a member (n1): malformed inner packets. From the client: the same, not a member.
        lab.exec(&lab.node(1), &args).unwrap();
        lab.exec(&lab.client(), &args).unwrap();
        lab.exec(&lab.client(), &["python3", &inject(), "tun", &vip]).unwrap();
        std::thread::sleep(Duration::from_millis(300));

        let drops = |i, reason: &str| lab.metric(i, &format!("reason=\"{reason}\"")).unwrap();
        // A total length beyond the packet counts as truncated, like a cut-off header.
        assert_eq!(drops(2, "truncated"), 2, "{carrier}: truncated inner header and bad total length");
        assert_eq!(drops(2, "bad_ip_header"), 1, "{carrier}: bad ihl");
        assert_eq!(drops(2, "not_vip"), 1, "{carrier}: non-VIP inner destination");
        // The client's 5 packets (4 malformed, 1 valid) are all refused: not a member.
        assert_eq!(drops(2, "not_member"), 5, "{carrier}: carrier packets from a non-member");
        // The member's valid packet got through.
        assert_eq!(lab.metric(2, "ringlb_decapsulated_packets_total").unwrap(), 1, "{carrier}");
        // Through the TUN of the entry n1: truncated TCP and UDP headers, a fragment.
        assert_eq!(drops(1, "truncated"), 2, "{carrier}: truncated transport headers via the TUN");
        assert_eq!(drops(1, "fragment"), 1, "{carrier}: fragment via the TUN");

        let t = tally(&lab, 9);
        assert_eq!(t.values().sum::<usize>(), 9, "{carrier}: still serving after malformed input: {t:?}");
        assert!(t.len() == 3, "{carrier}: not every node serves after malformed input: {t:?}");
    }
}

#[test]
fn ecmp_entry_spreads_over_all_nodes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("ecmp", |s| s.entry = ringlb_netlab::Entry::Ecmp);
    let t = tally(&lab, 30);
    assert_eq!(t.values().sum::<usize>(), 30);
    let entries: Vec<u64> = (1..=3).map(|i| lab.metric(i, "ringlb_flows_created_total").unwrap()).collect();
    println!("answers {t:?}, flows entering per node {entries:?}");
    assert!(entries.iter().filter(|&&e| e > 0).count() >= 2, "ECMP used one entry only: {entries:?}");
}

fn kernel_state(lab: &Lab) -> String {
    let n = lab.node(1);
    let mut s = String::new();
    for cmd in [
        vec!["ip", "rule", "show"],
        vec!["ip", "route", "show", "table", "all"],
        vec!["ip", "addr", "show"],
        vec!["sysctl", "-a", "--pattern", "^net\\.ipv4\\."],
    ] {
        s += &lab.exec(&n, &cmd).unwrap();
    }
    s
}

#[test]
fn teardown_restores_rules_routes_and_sysctls() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab("td", |s| {
        s.nodes = 1;
        s.start_ringlb = false;
    });
    let before = kernel_state(&lab);
    lab.start_ringlb(1).unwrap(); // setup + node
    lab.ringlb(1, "setup").unwrap(); // idempotent
    let during = kernel_state(&lab);
    assert!(during.contains("lookup 100") && during.contains("ring0"), "setup changed nothing:\n{during}");
    assert_ne!(before, during);
    lab.stop_ringlb(1, false).unwrap();
    lab.ringlb(1, "teardown").unwrap();
    lab.ringlb(1, "teardown").unwrap(); // idempotent
    let after = kernel_state(&lab);
    assert_eq!(before, after, "teardown did not restore the kernel state");
}

fn ringlb_with(config: &str, args: &[&str]) -> (i32, String) {
    let dir = std::env::temp_dir().join(unique_prefix("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ringlb.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin()).arg("--config").arg(&path).args(args).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_config_is_refused_naming_key_and_value() {
    let good = "[node]\nname = \"n1\"\nvip = \"10.200.0.10\"\nunderlay_interface = \"lo\"\n\n\
                [[members]]\nname = \"n1\"\naddr = \"10.77.0.1\"\n";
    assert_eq!(ringlb_with(good, &["check"]).0, 0, "the good config is accepted");
    let cases = [
        (good.replace("[[members]]", "[flows]\nmax_flowz = 3\n\n[[members]]"), vec!["check"], vec!["flows.max_flowz"]),
        (good.replace("10.200.0.10", "10.200.0.300"), vec!["check"], vec!["node.vip", "10.200.0.300"]),
        (good.replace("\"lo\"", "\"nope0\""), vec!["setup"], vec!["node.underlay_interface", "nope0"]),
        (good.replace("\"lo\"", "\"nope0\""), vec!["node"], vec!["node.underlay_interface", "nope0"]),
    ];
    for (config, args, needles) in cases {
        let (code, stderr) = ringlb_with(&config, &args);
        assert_ne!(code, 0, "accepted bad config for {args:?}:\n{config}");
        for n in needles {
            assert!(stderr.contains(n), "error {stderr:?} does not name {n:?}");
        }
    }
}
