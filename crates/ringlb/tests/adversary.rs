//! A member with a valid certificate attacks the cluster over real QUIC, against real daemons
//! in network namespaces (issue 7's acceptance): eviction by forged reports, ghost members,
//! traffic steering by weight and by a stolen address, message, join and handshake floods, a
//! record spoken for another member. Each is refused and counted; the victim stays alive on
//! every node and keeps its flows; new connections follow the configured weights.
//!
//! The adversary is `n9`: a real data plane and nginx at 10.77.0.9 (a `ringlb node` without a
//! control plane), whose control plane is played by `netlab adversary` holding the lab CA's
//! certificate for n9: it answers probes and sends load vectors like a member, and lies. It
//! runs on a thread of this test that entered n9's network namespace.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::net::Ipv4Addr;

use ringlb_netlab::adversary::{Attack, Options, Play};
use ringlb_netlab::{unique_prefix, Lab, Spec, VIP};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringlb")
}

/// Starts the adversary in n9's namespace (a thread of this process that entered it).
fn adversary(lab: &Lab, attack: Attack, seconds: f64) -> Play {
    let options = Options {
        pki: lab.dir.join("pki"),
        name: "n9".into(),
        addr: Ipv4Addr::new(10, 77, 0, 9),
        port: 6636,
        seed: ("n1".into(), "10.77.0.1:6636".parse().unwrap()),
        victim: "n3".into(),
        attack,
        seconds,
    };
    lab.adversary("n9", options).expect("the adversary starts")
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netlab").join(name).to_string_lossy().into_owned()
}

/// A keep-alive connection from the client that landed on n3; answers a request per line on
/// its stdin with the node's name.
fn pinned_to_n3(lab: &Lab) -> (Child, std::io::BufReader<std::process::ChildStdout>) {
    let code = format!(
        r#"
import http.client, sys
for i in range(300):
    c = http.client.HTTPConnection("{VIP}", 80, timeout=5)
    c.request("GET", "/")
    if c.getresponse().read().decode().strip() == "n3":
        break
    c.close()
else:
    sys.exit("no connection landed on n3")
print("ready", flush=True)
for line in sys.stdin:
    try:
        c.request("GET", "/")
        print(c.getresponse().read().decode().strip(), flush=True)
    except Exception as e:
        print(type(e).__name__, flush=True)
"#
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.client(), "python3", "-c", &code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "no keep-alive connection on n3");
    (child, out)
}

fn ask(child: &mut Child, out: &mut std::io::BufReader<std::process::ChildStdout>) -> String {
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

fn refused(lab: &Lab, i: usize, reason: &str) -> u64 {
    lab.metric(i, &format!("ringlb_control_refused_total{{node=\"n{i}\",reason=\"{reason}\"}}")).unwrap()
}

/// No node declared anyone dead, and every node sees the four members alive.
fn nobody_died(lab: &Lab, when: &str) {
    for i in 1..=3 {
        let deaths = lab
            .metric(i, "ringlb_member_transitions_total{")
            .map(|_| ())
            .and_then(|()| lab.metric(i, &format!("ringlb_member_transitions_total{{node=\"n{i}\",state=\"dead\"}}")));
        assert_eq!(deaths.unwrap(), 0, "{when}: n{i} declared a member dead:\n{}", lab.ringlb(i, "status").unwrap());
        assert_eq!(
            lab.metric(i, "ringlb_members_alive{").unwrap(),
            4,
            "{when}: n{i}:\n{}",
            lab.ringlb(i, "status").unwrap()
        );
    }
}

#[test]
fn a_member_with_a_valid_certificate_cannot_evict_invent_or_steer() {
    assert!(
        Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n"),
        "the end-to-end tests need root (network namespaces, TUN devices)"
    );
    let mut spec = Spec::new(unique_prefix("adv"), bin());
    // Appended to each node's [control] section: no member may weigh more than the others.
    spec.extra_config = "max_weight = 1.0\n".into();
    let mut lab = Lab::up(spec).expect("lab comes up");

    // n9: a data plane (static members, no control plane) and nginx at 10.77.0.9, and a
    // certificate from the cluster CA.
    lab.add_host(9).unwrap();
    let pki = lab.dir.join("pki").to_string_lossy().into_owned();
    let issued =
        Command::new(bin()).args(["cert", "issue", "--dir", &pki, "--node", "n9", "--ip", "10.77.0.9"]).status();
    assert!(issued.unwrap().success());
    let extra = std::mem::take(&mut lab.spec.extra_config);
    lab.spec.control = false;
    let config = lab.config_toml(9);
    lab.spec.control = true;
    lab.spec.extra_config = extra;
    std::fs::write(lab.config_path(9), config).unwrap();
    lab.start_ringlb(9).unwrap();

    let (mut keep_alive, mut answers) = pinned_to_n3(&lab);

    // Forgeries for as long as 2,000 new connections take.
    let forger = adversary(&lab, Attack::Forge, 300.0);
    lab.wait_converged(&[1, 2, 3], 4, Duration::from_secs(20)).expect("n9 becomes a member");
    let loop_out = Command::new("ip")
        .args(["netns", "exec", &lab.client(), "python3", &script("connloop.py"), &format!("http://{VIP}/")])
        .args(["180", "2", "2000"])
        .output()
        .unwrap();
    let sent = forger.finish().expect("the forgery ran");
    println!("forger: {sent}");
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for l in String::from_utf8_lossy(&loop_out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        *tally.entry(v["node"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    println!("2,000 new connections under forgery: {tally:?}");
    for node in ["n1", "n2", "n3", "n9"] {
        let share = tally.get(node).copied().unwrap_or(0) as f64 / 2000.0;
        assert!(
            (share - 0.25).abs() <= 0.25 * 0.25,
            "{node} served {:.1} %, not 25 % ± 25 %: {tally:?}",
            share * 100.0
        );
    }
    for i in 1..=3 {
        let counts: Vec<(&str, u64)> = ["incarnation", "not_member", "address", "weight_clamped"]
            .into_iter()
            .map(|r| (r, refused(&lab, i, r)))
            .collect();
        println!("n{i} refused: {counts:?}");
        for (reason, n) in counts {
            if i != 3 || reason == "weight_clamped" {
                assert!(n >= 1, "n{i} did not refuse and count `{reason}`");
            }
        }
        let status = lab.ringlb(i, "status").unwrap();
        assert!(!status.contains("zz"), "n{i} took the ghost zz as a member:\n{status}");
        let n9 = status.lines().find(|l| l.starts_with("n9 ")).expect("n9 listed").to_owned();
        assert!(n9.split_whitespace().nth(3) == Some("1"), "n{i} gives n9 another weight than 1: {n9}");
    }
    // Flow recovery's forgeries: "served by n3" for connections nobody sent n9, claims on UDP.
    let teach: u64 = (1..=3).map(|i| lab.metric(i, "ringlb_teach_refused_total").unwrap_or(0)).sum();
    let udp: u64 = (1..=3).map(|i| lab.metric(i, "result=\"invalid\"").unwrap_or(0)).sum();
    println!("flow forgeries refused: teach {teach}, udp claims {udp}");
    assert!(teach >= 40, "unasked answers about flows were not refused");
    assert!(udp >= 40, "claims on UDP flows were not refused");
    nobody_died(&lab, "after the forgeries");
    assert_eq!(ask(&mut keep_alive, &mut answers), "n3", "the connection pinned to n3 broke");

    // Floods, and a record spoken for the victim.
    let flooder = adversary(&lab, Attack::Flood, 12.0);
    let sent = flooder.finish().expect("the flood ran");
    println!("flooder: {sent}");
    std::thread::sleep(Duration::from_secs(1));
    let rate_limited: u64 = (1..=3).map(|i| refused(&lab, i, "rate_limited")).sum();
    let identity: u64 = (1..=3).map(|i| refused(&lab, i, "identity")).sum();
    let handshakes: u64 = (1..=3).map(|i| refused(&lab, i, "handshake_limit")).sum();
    println!("refused: rate_limited {rate_limited}, identity {identity}, handshake_limit {handshakes}");
    assert!(rate_limited >= 1, "a burst of 5,000 joins was not rate-limited");
    assert!(identity >= 1, "a record spoken for n3 was not refused");
    // The adversary's own membership may have suffered from its flood; the others' may not.
    std::thread::sleep(Duration::from_secs(2));
    for i in 1..=3 {
        let dead = lab.metric(i, &format!("ringlb_member_transitions_total{{node=\"n{i}\",state=\"dead\"}}")).unwrap();
        let status = lab.ringlb(i, "status").unwrap();
        let n3 = status.lines().find(|l| l.starts_with("n3")).expect("n3 listed").to_owned();
        assert!(n3.contains("alive"), "n{i} does not see n3 alive: {n3}\n{status}");
        // Only n9 may have died: silent once each of its two plays ended.
        assert!(dead <= 2, "n{i} declared {dead} members dead:\n{status}");
        for live in ["n1", "n2", "n3"] {
            let line = status.lines().find(|l| l.starts_with(live)).expect("listed");
            assert!(line.contains("alive"), "n{i} does not see {live} alive:\n{status}");
        }
    }
    assert_eq!(ask(&mut keep_alive, &mut answers), "n3", "the connection pinned to n3 broke after the floods");
    drop(keep_alive.stdin.take());
    let _ = keep_alive.wait();
}
