//! `netlab bench`: see `Cmd::Bench`. A benchmark, not a test: it measures and writes a report.
//! Every case runs in a lab of the same topology (client → router → n1..n3); one lab per ringlb
//! configuration, built one after the other and torn down when done. The cases across an
//! emulated WAN (two sites) are in [`wan`]; the kernel fast path's cases, their check and their
//! goals in [`fast_path`].

mod fast_path;
mod pps;
mod wan;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddrV4;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ringlb_netlab::{node_addr, Lab, Spec, CAPACITY, VIP};

const CASES: [(char, &str); 10] = [
    ('a', "direct, client → n2, no balancer"),
    ('b', "ringlb, entry n1 serves locally"),
    ('c', "ringlb, n1 forwards over udp"),
    ('d', "ringlb, n1 forwards over ipip"),
    ('e', "HAProxy TCP mode on n1"),
    ('f', "nftables DNAT + masquerade on n1"),
    ('g', "ringlb, n1 forwards over udp, sealed"),
    ('k', "ringlb, entry n1 serves locally, fast path"),
    ('l', "ringlb, n1 forwards over udp, fast path"),
    ('m', "ringlb, n1 forwards over ipip, fast path"),
];
/// `[carrier]` of the sealed cases: every carrier packet sealed (AES-256-GCM), plaintext refused.
const SEALED: &str = "require_authenticated = true";
const IPERF_PORT: u16 = 5201;

const HAPROXY: &str = "\
global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen http
  bind 10.77.0.1:8080
  balance roundrobin
  server n2 10.77.0.2:80
  server n3 10.77.0.3:80
listen iperf
  bind 10.77.0.1:5202
  balance source
  server n2 10.77.0.2:5201
  server n3 10.77.0.3:5201
";

const NFT: &str = "\
table ip rlbench {
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr 10.77.0.1 tcp dport 8081 dnat to 10.77.0.2:80
    ip daddr 10.77.0.1 tcp dport 5203 dnat to 10.77.0.2:5201
    ip daddr 10.77.0.1 udp dport 5204 dnat to 10.77.0.2:5204
  }
  chain post {
    type nat hook postrouting priority srcnat;
    ip daddr 10.77.0.2 masquerade
  }
}
";

/// One wrk run: requests/s and latency percentiles in ms.
#[derive(Debug, Clone, Copy)]
struct Wrk {
    rps: f64,
    p50: f64,
    p99: f64,
}

/// One case's figures: the median over the rounds of each.
#[derive(Debug, Default)]
struct Row {
    up: Option<f64>,
    down: Option<f64>,
    keep_alive: Option<Wrk>,
    close: Option<Wrk>,
}

/// One case's figures, every round's.
#[derive(Debug, Default)]
struct Samples {
    up: Vec<f64>,
    down: Vec<f64>,
    keep_alive: Vec<Wrk>,
    close: Vec<Wrk>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Largest over smallest: how much a figure moved between rounds.
fn spread(v: &[f64]) -> Option<f64> {
    let (lo, hi) = v.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    (v.len() > 1 && lo > 0.0).then(|| hi / lo)
}

impl Samples {
    fn median(&self) -> Row {
        let wrk = |w: &[Wrk]| {
            let part = |f: fn(&Wrk) -> f64| median(w.iter().map(f).collect());
            Some(Wrk { rps: part(|w| w.rps)?, p50: part(|w| w.p50)?, p99: part(|w| w.p99)? })
        };
        Row {
            up: median(self.up.clone()),
            down: median(self.down.clone()),
            keep_alive: wrk(&self.keep_alive),
            close: wrk(&self.close),
        }
    }

    fn spreads(&self) -> [Option<f64>; 4] {
        let rps = |w: &[Wrk]| w.iter().map(|w| w.rps).collect::<Vec<_>>();
        [spread(&self.up), spread(&self.down), spread(&rps(&self.keep_alive)), spread(&rps(&self.close))]
    }
}

#[derive(Debug)]
struct Bench {
    secs: u32,
    rounds: usize,
    samples: BTreeMap<char, Samples>,
    /// Carrier packets the entry n1 sealed in each round of a forwarding case: the proof that a
    /// sealed case sealed and a plain one did not.
    sealed: BTreeMap<char, Vec<u64>>,
    /// Packets ringlb dropped in each round of a forwarding case, summed over the lab's nodes,
    /// by reason (`ringlb_dropped_packets_total`): a forwarding case should drop none.
    drops: BTreeMap<char, Vec<BTreeMap<String, u64>>>,
    /// The packets-per-second case's runs ([`pps::CASES`]).
    pps: BTreeMap<char, Vec<pps::Pps>>,
    /// What carried each fast-path case, one per round ([`fast_path`]).
    carried: BTreeMap<char, Vec<fast_path::Carried>>,
    /// The cases across the WAN: CPU shares while iperf3 ran, and the WAN bridge's counters.
    wan: wan::Observed,
    problems: Vec<String>,
}

/// Everything after this line in the report is written by hand from other benches.
pub(crate) const KEEP_MARKER: &str = "<!-- measured by other commands: kept by netlab bench -->";

pub fn run(prefix: &str, bin: &Path, out: &Path, quick: bool, rounds: usize) -> Result<()> {
    let (started, load_before) = (Instant::now(), load());
    let rounds = rounds.max(1);
    let mut b = Bench {
        secs: if quick { 2 } else { 5 },
        rounds,
        samples: BTreeMap::new(),
        sealed: BTreeMap::new(),
        drops: BTreeMap::new(),
        pps: BTreeMap::new(),
        carried: BTreeMap::new(),
        wan: wan::Observed::default(),
        problems: Vec::new(),
    };
    type Stage = fn(&mut Bench, &str, &Path) -> Result<()>;
    // (g) right after (c): the sealed-over-plain ratio is taken between neighbours in time; each
    // fast-path case right after the case it mirrors, for the same reason.
    let stages: [(&str, Stage); 9] = [
        ("a, e, f", baselines),
        ("b", |b, p, bin| local(b, p, bin, 'b', false)),
        ("k", |b, p, bin| local(b, p, bin, 'k', true)),
        ("c", |b, p, bin| forwarded(b, p, bin, 'c', "udp", "", false)),
        ("g", |b, p, bin| forwarded(b, p, bin, 'g', "udp", SEALED, false)),
        ("l", |b, p, bin| forwarded(b, p, bin, 'l', "udp", "", true)),
        ("d", |b, p, bin| forwarded(b, p, bin, 'd', "ipip", "", false)),
        ("m", |b, p, bin| forwarded(b, p, bin, 'm', "ipip", "", true)),
        (wan::KEYS, wan::stage),
    ];
    // Every round runs every case, so a slow spell of the machine hits all cases alike.
    for round in 1..=rounds {
        eprintln!("bench: round {round} of {rounds}");
        for (n, (cases, stage)) in stages.into_iter().enumerate() {
            if let Err(e) = stage(&mut b, &format!("{prefix}{}", n + 1), bin) {
                b.problem(format!("round {round}, cases {cases}: {e:#}"));
            }
        }
    }
    let elapsed = started.elapsed().as_secs();
    let report = b.report(quick, elapsed, &load_before);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Sections measured by other commands (core decisions, memory) follow a marker; keep them.
    let kept = fs::read_to_string(out)
        .ok()
        .and_then(|old| old.find(KEEP_MARKER).map(|i| old[i..].to_owned()))
        .unwrap_or_default();
    let report = if kept.is_empty() { report } else { format!("{report}\n{kept}") };
    fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    println!("{report}");
    eprintln!("bench: wrote {} in {elapsed} s", out.display());
    if !b.problems.is_empty() {
        bail!("{} problem(s) in this run, listed in {}", b.problems.len(), out.display());
    }
    Ok(())
}

/// The CI smoke check: forwarded upload (UDP carrier) against the direct path in one lab, and
/// forwarded 64-byte datagrams against the direct path (floor [`pps::SMOKE_FLOOR`]), then
/// the sealed carrier's forwarded upload against that plain one in a second lab, then forwarded
/// upload with the kernel fast path against the direct path in a third (floor
/// [`fast_path::SMOKE_FLOOR`], and the fast path must have carried it); each fails when it falls
/// below its floor in every one of three tries (the machine is shared and noisy; a real
/// regression fails all three).
pub fn smoke(prefix: &str, bin: &Path, floor: f64) -> Result<()> {
    let started = Instant::now();
    let plain = {
        let lab = lab(prefix, bin, |s| {
            s.weights = vec![0.0, 1.0, 1.0];
            s.fast_path = false;
        })?;
        drain_n3(&lab)?; // iperf3's two connections must meet on one server: n2
        let try_once = |_| {
            let direct = iperf(&lab, &node_addr(2).to_string(), IPERF_PORT, false, 3)?;
            let forwarded = iperf(&lab, &VIP.to_string(), IPERF_PORT, false, 3)?;
            eprintln!("bench smoke: upload direct {direct:.2} Gbit/s, forwarded over udp {forwarded:.2} Gbit/s");
            Ok((forwarded, forwarded / direct))
        };
        let upload = smoke_tries("forwarded upload / direct", floor, try_once)?;
        pps::smoke(&lab)?;
        upload
    };
    {
        let lab = lab(&format!("{prefix}g"), bin, |s| {
            s.weights = vec![0.0, 1.0, 1.0];
            s.carrier_options = SEALED.into();
            s.fast_path = false;
        })?;
        wait_sealing(&lab, 1, 2)?;
        drain_n3(&lab)?;
        smoke_tries("sealed forwarded upload / plain", floor, |_| {
            let sealed = iperf(&lab, &VIP.to_string(), IPERF_PORT, false, 3)?;
            eprintln!(
                "bench smoke: upload forwarded over the sealed udp carrier {sealed:.2} Gbit/s (plain {plain:.2})"
            );
            Ok((sealed, sealed / plain))
        })?;
    }
    fast_path::smoke(&format!("{prefix}k"), bin)?;
    eprintln!("bench smoke: passed in {} s", started.elapsed().as_secs());
    Ok(())
}

/// Up to three tries of `once`, which gives a figure and its ratio; the figure of the first
/// try whose ratio reaches `floor`.
fn smoke_tries(what: &str, floor: f64, mut once: impl FnMut(u32) -> Result<(f64, f64)>) -> Result<f64> {
    let mut ratios = Vec::new();
    for attempt in 1..=3 {
        let (figure, ratio) = once(attempt)?;
        eprintln!("bench smoke {attempt}: {what} {ratio:.2}x (floor {floor}x)");
        ratios.push(ratio);
        if ratio >= floor {
            return Ok(figure);
        }
    }
    bail!("{what} below {floor}x in all three tries: {ratios:.2?}")
}

/// Aggregate requests/s of 1, 2, 4 and 8 serving nodes behind one forward-only entry, each
/// node's service capped at `CAPACITY` requests/s; writes a PNG plot with gnuplot and prints
/// the table. Efficiency(N) = throughput(N) / (N x throughput(1)).
pub fn scaling(prefix: &str, bin: &Path, png: &Path, secs: u32) -> Result<()> {
    let mut rows: Vec<(usize, f64)> = Vec::new();
    for n in [1usize, 2, 4, 8] {
        let mut spec = Spec::new(format!("{prefix}{n}"), bin);
        spec.nodes = n + 1;
        spec.weights = std::iter::once(0.0).chain(std::iter::repeat_n(1.0, n)).collect();
        let lab = Lab::up(spec)?;
        // Enough connections to keep every node's queue busy; each is pinned to one node.
        let (w, errors) = wrk_conns(&lab, &format!("http://{VIP}/cap"), false, secs, 24 * n)?;
        if let Some(e) = errors {
            bail!("{n} nodes: {e}");
        }
        eprintln!("bench scaling: {n} nodes: {:.0} req/s", w.rps);
        rows.push((n, w.rps));
    }
    let one = rows[0].1;
    let mut table = String::from("| serving nodes | requests/s | per node | efficiency |\n|--:|--:|--:|--:|\n");
    let mut data = String::new();
    for &(n, rps) in &rows {
        let eff = rps / (n as f64 * one);
        table += &format!("| {n} | {rps:.0} | {:.0} | {eff:.2} |\n", rps / n as f64);
        data += &format!("{n} {rps:.1} {:.1}\n", n as f64 * one);
    }
    let dat = std::env::temp_dir().join(format!("{prefix}-scaling.dat"));
    fs::write(&dat, data)?;
    let script = format!(
        "set terminal png size 800,500\nset output '{png}'\nset title 'ringlb: aggregate requests/s behind one entry ({CAPACITY} req/s per node)'\n\
         set xlabel 'serving nodes'\nset ylabel 'requests/s'\nset key left top\nset grid\nset xtics (1,2,4,8)\n\
         plot '{dat}' using 1:3 with lines dashtype 2 title 'linear (N x one node)', \
         '{dat}' using 1:2 with linespoints pointtype 7 title 'measured'\n",
        png = png.display(),
        dat = dat.display()
    );
    let mut child = std::process::Command::new("gnuplot")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running gnuplot (apt-get install gnuplot-nox)")?;
    if let Some(stdin) = child.stdin.as_mut() {
        std::io::Write::write_all(stdin, script.as_bytes())?;
    }
    if !child.wait()?.success() {
        bail!("gnuplot failed");
    }
    println!("{table}");
    eprintln!("bench scaling: plot written to {}", png.display());
    let eight = rows.last().map_or(0.0, |&(n, rps)| rps / (n as f64 * one));
    if eight < 0.9 {
        bail!("efficiency at 8 nodes is {eight:.2}, below 0.9");
    }
    Ok(())
}

/// Drains n3 and waits until the entry n1 has heard of it, so every new flow goes to n2.
fn drain_n3(lab: &Lab) -> Result<()> {
    lab.ringlb(3, "drain")?;
    let drained = "ringlb_peer_up{node=\"n1\",peer=\"n3\"} 0";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.metrics(1)?.lines().any(|l| l == drained) {
        if Instant::now() > deadline {
            bail!("n1 did not see n3 drained");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A lab with an iperf3 server on every node.
fn lab(prefix: &str, bin: &Path, edit: impl FnOnce(&mut Spec)) -> Result<Lab> {
    let mut spec = Spec::new(prefix, bin);
    spec.client_reuses_ports = true;
    edit(&mut spec);
    let lab = Lab::up(spec)?;
    for i in 1..=lab.spec.nodes {
        let port = IPERF_PORT.to_string();
        lab.spawn(&lab.node(i), &lab.node_dir(i).join("iperf3.log"), &["iperf3", "-s", "-p", &port])?;
    }
    for i in 1..=lab.spec.nodes {
        wait_listening(&lab, i, IPERF_PORT)?;
    }
    Ok(lab)
}

fn wait_listening(lab: &Lab, node: usize, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.exec(&lab.node(node), &["ss", "-Htln", &format!("sport = :{port}")]).is_ok_and(|o| !o.trim().is_empty())
    {
        if Instant::now() > deadline {
            bail!("nothing listens on n{node} port {port}");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// (a), (e) and (f): plain servers, no ringlb.
fn baselines(b: &mut Bench, prefix: &str, bin: &Path) -> Result<()> {
    let lab = lab(prefix, bin, |s| s.start_ringlb = false)?;
    b.measure('a', &lab, Ok(()), &node_addr(2).to_string(), 80, IPERF_PORT);
    b.pps('a', &lab, SocketAddrV4::new(node_addr(2), pps::PORT), false);

    let haproxy = (|| {
        let cfg = lab.dir.join("haproxy.cfg");
        fs::write(&cfg, HAPROXY)?;
        lab.spawn(&lab.node(1), &lab.dir.join("haproxy.log"), &["haproxy", "-f", &cfg.to_string_lossy(), "-db"])?;
        wait_listening(&lab, 1, 8080).and(wait_listening(&lab, 1, 5202)).map_err(|e| {
            anyhow!("{e:#}; haproxy's log: {}", fs::read_to_string(lab.dir.join("haproxy.log")).unwrap_or_default())
        })
    })();
    b.measure('e', &lab, haproxy, &node_addr(1).to_string(), 8080, 5202);

    let nat = (|| {
        let rules = lab.dir.join("rlbench.nft");
        fs::write(&rules, NFT)?;
        lab.exec(&lab.node(1), &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        lab.exec(&lab.node(1), &["nft", "-f", &rules.to_string_lossy()]).map(drop)
    })();
    let nat_ok = nat.is_ok();
    b.measure('f', &lab, nat, &node_addr(1).to_string(), 8081, 5203);
    if nat_ok {
        b.pps('f', &lab, SocketAddrV4::new(node_addr(1), pps::PORT), false);
    }
    Ok(())
}

/// (b), and (k) with the kernel fast path: a margin no node ever exceeds, so the entry n1
/// serves every flow itself.
fn local(b: &mut Bench, prefix: &str, bin: &Path, key: char, fast_path: bool) -> Result<()> {
    let lab = lab(prefix, bin, |s| {
        s.extra_config = "[placement]\nmargin = 1000000000.0\n".into();
        s.fast_path = fast_path;
    })?;
    b.measure(key, &lab, Ok(()), &VIP.to_string(), 80, IPERF_PORT);
    if fast_path {
        b.check_fast_path(key, &lab, true)?;
    }
    Ok(())
}

/// (c), (d), (g), and (l), (m) with the kernel fast path: n1 has weight 0 (forward-only), so
/// every flow is forwarded to n2 or n3, over `carrier` with `carrier_options` in every node's
/// `[carrier]`.
fn forwarded(
    b: &mut Bench,
    prefix: &str,
    bin: &Path,
    key: char,
    carrier: &str,
    carrier_options: &str,
    fast_path: bool,
) -> Result<()> {
    let lab = lab(prefix, bin, |s| {
        s.carrier = carrier.into();
        s.carrier_options = carrier_options.into();
        s.weights = vec![0.0, 1.0, 1.0];
        s.fast_path = fast_path;
    })?;
    if carrier_options.contains("require_authenticated = true") {
        wait_sealing(&lab, 1, 2)?;
    }
    b.http(key, &lab, &VIP.to_string(), 80);
    // iperf3 opens a control and a data connection and both must reach the same server, but
    // placement spreads them over n2 and n3: drain n3, so every flow goes to n2 (still over
    // the carrier), once the entry has heard of it.
    drain_n3(&lab)?;
    b.iperf(key, &lab, &VIP.to_string(), IPERF_PORT);
    if pps::CASES.contains(&key) {
        b.pps(key, &lab, SocketAddrV4::new(VIP, pps::PORT), true);
    }
    if fast_path {
        b.check_fast_path(key, &lab, false)?;
    }
    b.count_carrier(key, &lab)
}

/// Waits until node `i` holds sealing keys for `peers` peers (a key comes with each QUIC
/// session, which may open a little after the members converge): packets before it are dropped.
fn wait_sealing(lab: &Lab, i: usize, peers: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!("ringlb_carrier_sessions_total{{node=\"n{i}\"}}");
    // One secret per session and direction: `peers` to send with, `peers` to open with.
    while lab.metric(i, &needle)? < 2 * peers {
        if Instant::now() > deadline {
            bail!("n{i} has no sealing keys for {peers} peers after 10 s ({needle} = {})", lab.metric(i, &needle)?);
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Bench {
    fn problem(&mut self, p: String) {
        eprintln!("bench: {p}");
        self.problems.push(p);
    }

    /// Records how many carrier packets n1 sealed (a sealed case that sealed nothing, or a plain
    /// one that sealed anything, measured the wrong thing) and what ringlb dropped.
    fn count_carrier(&mut self, key: char, lab: &Lab) -> Result<()> {
        let sealed = lab.metric(1, "ringlb_carrier_sealed_packets_total")?;
        let expected = CASES.iter().chain(wan::CASES.iter()).any(|&(k, name)| k == key && name.ends_with("sealed"));
        if expected != (sealed > 0) {
            self.problem(format!("({key}) the entry n1 sealed {sealed} carrier packets"));
        }
        self.sealed.entry(key).or_default().push(sealed);
        let mut drops = BTreeMap::new();
        for i in 1..=lab.spec.nodes {
            for line in lab.metrics(i)?.lines().filter(|l| l.starts_with("ringlb_dropped_packets_total{")) {
                let reason = line.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
                let n: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
                if n > 0 {
                    *drops.entry(reason.to_owned()).or_default() += n;
                }
            }
        }
        self.drops.entry(key).or_default().push(drops);
        Ok(())
    }

    /// Each forwarding case's drops: every reason seen, its median over the rounds.
    fn drops_line(&self) -> String {
        let cases = self.drops.iter().map(|(k, rounds)| {
            let reasons: std::collections::BTreeSet<&String> = rounds.iter().flat_map(|r| r.keys()).collect();
            let each: Vec<String> = reasons
                .into_iter()
                .map(|reason| {
                    let v = rounds.iter().map(|r| r.get(reason).copied().unwrap_or(0) as f64).collect();
                    format!("{reason} {}", num(median(v), 0))
                })
                .collect();
            format!("({k}) {}", if each.is_empty() { "none".to_owned() } else { each.join(", ") })
        });
        cases.collect::<Vec<_>>().join("; ")
    }

    fn keep<T>(&mut self, key: char, what: &str, r: Result<T>) -> Option<T> {
        r.map_err(|e| self.problem(format!("({key}) {what}: {e:#}"))).ok()
    }

    fn measure(&mut self, key: char, lab: &Lab, setup: Result<()>, host: &str, http_port: u16, iperf_port: u16) {
        if self.keep(key, "setup", setup).is_some() {
            self.iperf(key, lab, host, iperf_port);
            self.http(key, lab, host, http_port);
        }
    }

    fn iperf(&mut self, key: char, lab: &Lab, host: &str, port: u16) {
        let up = self.keep(key, "iperf3 upload", iperf(lab, host, port, false, self.secs));
        let down = self.keep(key, "iperf3 download", iperf(lab, host, port, true, self.secs));
        eprintln!("bench: ({key}) iperf3 upload {} Gbit/s, download {} Gbit/s", num(up, 2), num(down, 2));
        let row = self.samples.entry(key).or_default();
        row.up.extend(up);
        row.down.extend(down);
    }

    fn http(&mut self, key: char, lab: &Lab, host: &str, port: u16) {
        let url = format!("http://{host}:{port}/1k");
        let [keep_alive, close] = [(false, "wrk keep-alive"), (true, "wrk Connection: close")].map(|(close, what)| {
            let (w, errors) = self.keep(key, what, wrk(lab, &url, close, self.secs))?;
            if let Some(e) = errors {
                self.problem(format!("({key}) {what}: {e}"));
            }
            Some(w)
        });
        for (what, w) in [("keep-alive", keep_alive), ("close", close)] {
            let w = w.map_or("–".into(), |w| format!("{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms", w.rps, w.p50, w.p99));
            eprintln!("bench: ({key}) wrk {what}: {w}");
        }
        let row = self.samples.entry(key).or_default();
        row.keep_alive.extend(keep_alive);
        row.close.extend(close);
    }

    fn report(&self, quick: bool, elapsed: u64, load: &str) -> String {
        let mut s = String::from("# ringlb benchmarks\n\n");
        let kernel =
            Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
        let _ = writeln!(
            s,
            "- command: `just bench` (runs `target/release/netlab bench{}`), took {elapsed} s\n- date: {}\n\
             - machine: {} cores (`nproc`), kernel {}, 1-minute load average {load} at the start\n\
             - iperf3: one TCP stream for {secs} s; \
             wrk: `wrk --latency -t1 -c16 -d{secs}s` against `/1k` (a 1 KiB body from nginx)\n\
             - {rounds} round(s), each running every case in turn; every figure below is the median over the \
             rounds, and ratios are taken between medians\n",
            if quick { " --quick" } else { "" },
            date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel.unwrap_or_default(),
            secs = self.secs,
            rounds = self.rounds,
        );
        s.push_str(
            "## Raw numbers\n\n| case | upload Gbit/s | download Gbit/s | keep-alive req/s | keep-alive p50/p99 ms \
             | close req/s | close p50/p99 ms |\n|---|--:|--:|--:|--:|--:|--:|\n",
        );
        let rows: BTreeMap<char, Row> = self.samples.iter().map(|(&k, v)| (k, v.median())).collect();
        let none = Row::default();
        let row = |k: char| rows.get(&k).unwrap_or(&none);
        for (k, name) in CASES {
            let r = row(k);
            let name = match self.fast_path_invalid(k) {
                Some(_) => format!("{name} **(invalid: see the fast path's section)**"),
                None => name.to_owned(),
            };
            let lat = |w: Option<Wrk>| w.map_or("–".into(), |w| format!("{:.2} / {:.2}", w.p50, w.p99));
            let _ = writeln!(
                s,
                "| ({k}) {name} | {} | {} | {} | {} | {} | {} |",
                num(r.up, 2),
                num(r.down, 2),
                num(r.keep_alive.map(|w| w.rps), 0),
                lat(r.keep_alive),
                num(r.close.map(|w| w.rps), 0),
                lat(r.close),
            );
        }
        s.push_str(
            "\n## Ratios\n\nEach figure of a ringlb case divided by the same figure of a baseline; for latency, \
                    the ratio of p99 (lower is better there, higher everywhere else).\n\n\
                    | case / baseline | upload | download | keep-alive req/s | keep-alive p99 | close req/s \
                    | close p99 |\n\
                    |---|--:|--:|--:|--:|--:|--:|\n",
        );
        let metrics: [fn(&Row) -> Option<f64>; 6] = [
            |r| r.up,
            |r| r.down,
            |r| r.keep_alive.map(|w| w.rps),
            |r| r.keep_alive.map(|w| w.p99),
            |r| r.close.map(|w| w.rps),
            |r| r.close.map(|w| w.p99),
        ];
        let pairs = ['b', 'c', 'd', 'g', 'k', 'l', 'm'].into_iter().flat_map(|x| ['a', 'e', 'f'].map(|y| (x, y)));
        // The sealed carrier over the plain one, and each fast-path case over its TUN-path mirror.
        for (x, y) in pairs.chain([('g', 'c')]).chain(fast_path::MIRRORS) {
            let ratios = metrics.map(|f| num(f(row(x)).zip(f(row(y))).map(|(a, b)| a / b), 2));
            let _ = writeln!(s, "| ({x}) / ({y}) | {} |", ratios.join(" | "));
        }
        s.push_str(&targets(row));
        s.push_str(&sealed_targets(row));
        s.push_str(&fast_path::report(self, row));
        s.push_str(&pps::report(self, |k| CASES.iter().find(|c| c.0 == k).map_or("?", |c| c.1)));
        s.push_str(&wan::report(self, row));
        if self.rounds > 1 {
            s.push_str(
                "\n## Spread between rounds\n\nLargest over smallest of each throughput figure across the rounds.\n\n\
                 | case | upload | download | keep-alive req/s | close req/s |\n|---|--:|--:|--:|--:|\n",
            );
            for (k, name) in CASES.into_iter().chain(wan::CASES) {
                let sp = self.samples.get(&k).map(Samples::spreads).unwrap_or_default();
                let _ = writeln!(s, "| ({k}) {name} | {} |", sp.map(|v| num(v, 2)).join(" | "));
            }
        }
        let sealed = |k: char| {
            let v = self.sealed.get(&k).map(|v| v.iter().map(|&n| n as f64).collect()).unwrap_or_default();
            num(median(v), 0)
        };
        let _ = write!(
            s,
            "\n## Notes\n\nTimings on this shared 2-core VM are noisy: load generator, router, balancer and \
             servers all share the same two cores, so absolute figures move from run to run and only the ratios \
             within one run count. Download (`iperf3 -R`) in the ringlb cases is direct server return: the replies \
             bypass the balancer and go from the serving node through the router straight to the client; only the \
             client's packets (upload data, requests, and the ACKs of a download) cross ringlb. ringlb runs on every \
             node in (b)-(d), (g) and (k)-(m), HAProxy and nftables on n1 only. In (c), (d), (g), (l) and (m) wrk's \
             connections are spread over n2 and n3; iperf3 needs its control and data connections on the same server, \
             so for it n3 is drained (`ringlb drain`) and the entry forwards everything to n2. (k), (l) and (m) are \
             (b), (c) and (d) with the kernel fast path on every node (`[fast_path] enabled = true`). HAProxy balances HTTP round-robin over n2 \
             and n3 and iperf3 by source (one backend); nftables sends everything to n2. (g) is (c) with \
             `carrier.require_authenticated = true`: every carrier packet is sealed with AES-256-GCM \
             (32 bytes more per packet) and plaintext is refused; the entry n1 sealed {} carrier packets \
             per round in (g) (median) and {} in (c). Packets ringlb dropped per round (median, all nodes \
             of the lab, by reason of `ringlb_dropped_packets_total`; the counters include wrk's run): {}.\n",
            sealed('g'),
            sealed('c'),
            self.drops_line(),
        );
        if !self.problems.is_empty() {
            s.push_str("\nProblems in this run:\n\n");
            for p in &self.problems {
                let _ = writeln!(s, "- {}", p.replace('\n', " ").replace('\u{1b}', ""));
            }
        }
        s
    }
}

/// A lower bound (at least) or an upper bound (at most, for latency) on a ratio.
#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
    Report,
}

/// Issue 4's table: forwarded flows over udp (c) against (a), (e) and (f), and local upload
/// (b) against (a), each ratio beside its target.
fn targets<'a>(row: impl Fn(char) -> &'a Row) -> String {
    use Goal::{AtLeast, AtMost, Report};
    type Figure = fn(&Row) -> Option<f64>;
    let lines: [(&str, char, Figure, [Goal; 3]); 6] = [
        ("download (iperf3 -R), forwarded", 'c', |r| r.down, [AtLeast(0.9), AtLeast(2.0), AtLeast(1.15)]),
        ("upload (iperf3), forwarded", 'c', |r| r.up, [AtLeast(0.5), AtLeast(1.2), Report]),
        (
            "new connections/s (Connection: close), forwarded",
            'c',
            |r| r.close.map(|w| w.rps),
            [AtLeast(0.7), AtLeast(3.0), AtLeast(1.1)],
        ),
        (
            "keep-alive requests/s, forwarded",
            'c',
            |r| r.keep_alive.map(|w| w.rps),
            [AtLeast(0.8), AtLeast(1.2), Report],
        ),
        (
            "p99 latency, keep-alive, forwarded",
            'c',
            |r| r.keep_alive.map(|w| w.p99),
            [AtMost(1.3), AtMost(1.0), Report],
        ),
        ("upload, served locally by the entry", 'b', |r| r.up, [AtLeast(0.9), Report, Report]),
    ];
    let mut s = String::from(
        "\n## Targets (issue 4)\n\nThe ratios the speed issue sets, each beside its target: met (yes) or not \
         (no, with the shortfall).\n\n| figure | against direct (a) | against HAProxy (e) | against nftables NAT (f) |\n\
         |---|--:|--:|--:|\n",
    );
    for (name, case, figure, goals) in lines {
        let cells = ['a', 'e', 'f']
            .iter()
            .zip(goals)
            .map(|(&base, goal)| against(figure(row(case)).zip(figure(row(base))).map(|(x, y)| x / y), goal));
        let _ = writeln!(s, "| {name} ({case}) | {} |", cells.collect::<Vec<_>>().join(" | "));
    }
    s
}

/// A ratio beside its goal: met (yes) or not (no, with the shortfall).
fn against(r: Option<f64>, goal: Goal) -> String {
    use Goal::{AtLeast, AtMost, Report};
    let Some(r) = r else {
        return "–".to_owned();
    };
    match goal {
        AtLeast(t) if r >= t => format!("{r:.2} (≥ {t}: yes)"),
        AtLeast(t) => format!("{r:.2} (≥ {t}: no, {:.0} % short)", (1.0 - r / t) * 100.0),
        AtMost(t) if r <= t => format!("{r:.2} (≤ {t}: yes)"),
        AtMost(t) => format!("{r:.2} (≤ {t}: no, {:.0} % over)", (r / t - 1.0) * 100.0),
        Report => format!("{r:.2}"),
    }
}

/// The sealed carrier's goal: forwarded upload sealed at least 0.7 times the plain udp carrier
/// in the same run, on the LAN ((g) / (c)) and across the WAN ((j) / (i)); the other figures
/// beside it.
fn sealed_targets<'a>(row: impl Fn(char) -> &'a Row) -> String {
    use Goal::{AtLeast, Report};
    type Figure = fn(&Row) -> Option<f64>;
    let lines: [(&str, Figure, Goal, bool); 5] = [
        ("upload (iperf3), forwarded", |r| r.up, AtLeast(0.7), true),
        ("download (iperf3 -R), forwarded", |r| r.down, Report, true),
        ("keep-alive requests/s, forwarded", |r| r.keep_alive.map(|w| w.rps), Report, false),
        ("new connections/s (Connection: close), forwarded", |r| r.close.map(|w| w.rps), Report, false),
        ("p99 latency, keep-alive, forwarded", |r| r.keep_alive.map(|w| w.p99), Report, false),
    ];
    let mut s = String::from(
        "\n## Targets: the sealed carrier\n\nThe sealed carrier against the plain udp carrier in the same run, \
         on the LAN ((g) / (c)) and across the WAN ((j) / (i), below).\n\n\
         | figure | LAN: sealed (g) / plain (c) | WAN: sealed (j) / plain (i) |\n|---|--:|--:|\n",
    );
    for (name, figure, goal, wan) in lines {
        let ratio = |x: char, y: char| figure(row(x)).zip(figure(row(y))).map(|(a, b)| a / b);
        let across = if wan { against(ratio('j', 'i'), goal) } else { "–".to_owned() };
        let _ = writeln!(s, "| {name} | {} | {across} |", against(ratio('g', 'c'), goal));
    }
    s
}

/// The 1-minute load average, to tell a run that started while the machine was busy.
fn load() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_default()
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.decimals$}"))
}

/// One iperf3 stream from the client; Gbit/s as measured by the receiver.
fn iperf(lab: &Lab, host: &str, port: u16, reverse: bool, secs: u32) -> Result<f64> {
    let (port, t, guard) = (port.to_string(), secs.to_string(), (secs + 20).to_string());
    let mut args =
        vec!["timeout", &guard, "iperf3", "-c", host, "-p", &port, "-t", &t, "-J", "--connect-timeout", "3000"];
    if reverse {
        args.push("-R");
    }
    let out = lab.exec_output(&lab.client(), &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!("iperf3 ({}) printed no JSON: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())
    })?;
    if let Some(e) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let bps = json.pointer("/end/sum_received/bits_per_second").and_then(|v| v.as_f64());
    Ok(bps.context("iperf3's JSON has no end.sum_received.bits_per_second")? / 1e9)
}

/// One wrk run from the client, with keep-alive or `Connection: close`; also wrk's error counts.
fn wrk(lab: &Lab, url: &str, close: bool, secs: u32) -> Result<(Wrk, Option<String>)> {
    wrk_conns(lab, url, close, secs, 16)
}

fn wrk_conns(lab: &Lab, url: &str, close: bool, secs: u32, conns: usize) -> Result<(Wrk, Option<String>)> {
    let (d, guard, c) = (format!("-d{secs}s"), (secs + 20).to_string(), format!("-c{conns}"));
    let mut args = vec!["timeout", &guard, "wrk", "--latency", "-t1", &c, &d];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let text = lab.exec(&lab.client(), &args)?;
    let field = |label: &str| {
        let line = text.lines().map(str::trim).find(|l| l.starts_with(label));
        line.and_then(|l| l[label.len()..].split_whitespace().next())
            .with_context(|| format!("no {label:?} in wrk's output:\n{text}"))
    };
    let rps = field("Requests/sec:")?;
    let w = Wrk {
        rps: rps.parse().with_context(|| format!("wrk's Requests/sec {rps:?}"))?,
        p50: millis(field("50%")?)?,
        p99: millis(field("99%")?)?,
    };
    let errors: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Socket errors:") || l.starts_with("Non-2xx or 3xx responses:"))
        .collect();
    Ok((w, (!errors.is_empty()).then(|| errors.join("; "))))
}

/// wrk's durations ("812.00us", "1.20ms", "2.00s", "1.00m") in milliseconds.
fn millis(s: &str) -> Result<f64> {
    let (n, scale) = [("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 60e3)]
        .iter()
        .find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, *scale)))
        .with_context(|| format!("wrk's latency {s:?} has no known unit"))?;
    Ok(n.parse::<f64>().with_context(|| format!("wrk's latency {s:?}"))? * scale)
}

/// What `netlab profile` puts through the forwarded path while perf records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Load {
    /// iperf3, client to server: data through the entry.
    Upload,
    /// iperf3 -R: data returns directly, only ACKs cross the entry.
    Download,
    /// wrk with `Connection: close`: a new connection per request.
    Close,
    /// wrk with keep-alive.
    KeepAlive,
}

/// What `netlab profile` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileCase {
    /// The entry n1 forwards every flow to n2 (cases (c), (d), and (l), (m) with the fast path).
    Forwarded,
    /// The entry n1 serves every flow itself (cases (b), and (k) with the fast path).
    Local,
    /// The client talks to n2's own address: no balancer in the path (case (a)), in the same
    /// lab, for the comparison.
    Direct,
}

/// `netlab profile`: one case under one load, with `perf record -a -g`
/// running for `secs` in the middle of it. Writes `<out>/<case>-<load>.perf.data` and
/// `<out>/<load>.txt` (CPU by process and binary, ringlb's own hottest symbols, and the
/// system calls of the entry's daemon per forwarded packet), and prints the text. With
/// `NETLAB_FAST_PATH` set, (l) or (m): the same with the kernel fast path on every node.
pub fn profile(
    prefix: &str,
    bin: &Path,
    out: &Path,
    load: Load,
    carrier: &str,
    secs: u32,
    case: ProfileCase,
) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let lab = lab(prefix, bin, |s| {
        s.carrier = carrier.into();
        if case == ProfileCase::Local {
            s.extra_config = "[placement]\nmargin = 1000000000.0\n".into();
        } else {
            s.weights = vec![0.0, 1.0, 1.0];
        }
    })?;
    if case == ProfileCase::Forwarded {
        drain_n3(&lab)?; // everything to n2, as iperf3 needs
    }
    let target = if case == ProfileCase::Direct { node_addr(2).to_string() } else { VIP.to_string() };
    let name = format!("{}-{}", format!("{case:?}").to_lowercase(), format!("{load:?}").to_lowercase());
    let data = out.join(format!("{name}.perf.data"));
    // The load outlasts the recording: 2 s of warm-up, 2 s of syscall counting, then `secs`.
    let run_for = (secs + 8).to_string();
    let url = format!("http://{target}/1k");
    let mut args: Vec<&str> = match load {
        Load::Upload => vec!["iperf3", "-c", &target, "-t", &run_for],
        Load::Download => vec!["iperf3", "-c", &target, "-R", "-t", &run_for],
        Load::Close => vec!["wrk", "-t1", "-c16", "-H", "Connection: close"],
        Load::KeepAlive => vec!["wrk", "-t1", "-c16"],
    };
    let duration = format!("-d{run_for}s");
    if matches!(load, Load::Close | Load::KeepAlive) {
        args.extend([duration.as_str(), url.as_str()]);
    }
    let client = Command::new("ip")
        .args(["netns", "exec", &lab.client()])
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the load")?;
    sleep(Duration::from_secs(2));
    let entry_pid = lab.ringlb_pids(1)?.into_iter().next().context("no ringlb daemon on n1")?;
    // The packets the entry's daemon handled itself (forwarded, or delivered locally).
    let daemon_packets = || -> Result<u64> {
        Ok(lab.metric(1, "ringlb_forwarded_packets_total{")?
            + lab.metric(1, "ringlb_delivered_local_packets_total{")?)
    };
    let handled_before = daemon_packets()?;
    let syscalls = Command::new("perf")
        .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", &entry_pid, "--", "sleep", "2"])
        .output()
        .context("running perf stat (apt-get install linux-perf)")?;
    let handled = daemon_packets()? - handled_before;
    let fast_path = lab.metric(1, "ringlb_fast_path_packets_total{node=\"n1\"")?;
    let secs_s = secs.to_string();
    let rec = Command::new("perf")
        .args(["record", "-a", "-g", "-q", "-o", &data.to_string_lossy(), "--", "sleep", &secs_s])
        .output()
        .context("running perf record (apt-get install linux-perf)")?;
    if !rec.status.success() {
        bail!("perf record: {}", String::from_utf8_lossy(&rec.stderr));
    }
    let load_out = client.wait_with_output()?;
    let report = |extra: &[&str]| -> Result<String> {
        let o = Command::new("perf")
            .args(["report", "-i", &data.to_string_lossy(), "--stdio", "-g", "none", "--percent-limit", "0.5"])
            .args(extra)
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(25)
            .collect::<Vec<_>>()
            .join("\n"))
    };
    let calls: f64 = String::from_utf8_lossy(&syscalls.stderr)
        .lines()
        .find_map(|l| l.split(',').next()?.trim().parse().ok())
        .unwrap_or(0.0);
    let text = format!(
        "# netlab profile: {name}, carrier {carrier}{}, {}, perf record -a -g for {secs} s\n\n\
         ## CPU by process and binary (all of the machine's CPUs = 100 %)\n{}\n\n\
         ## hottest symbols of the whole machine (kernel and user)\n{}\n\n\
         ## ringlb processes, hottest symbols (kernel and user)\n{}\n\n\
         ## the entry's daemon over 2 s: {calls:.0} system calls for {handled} packets it forwarded or \
         delivered ({:.2} per packet)\n\n## the load's own report\n{}\n",
        if lab.spec.fast_path {
            format!(" with the kernel fast path ({fast_path} packets carried by it on n1 when the recording ended)")
        } else {
            String::new()
        },
        match case {
            ProfileCase::Forwarded => "entry n1 forwarding everything to n2",
            ProfileCase::Local => "entry n1 serving everything itself",
            ProfileCase::Direct => "client to n2's own address, no balancer in the path",
        },
        report(&["--no-children", "--sort", "comm,dso"])?,
        report(&["--no-children", "--sort", "sym"])?,
        report(&["--no-children", "--comms", "ringlb", "--sort", "comm,dso,sym"])?,
        calls / (handled.max(1) as f64),
        String::from_utf8_lossy(&load_out.stdout).lines().rev().take(8).collect::<Vec<_>>().join("\n"),
    );
    let txt = out.join(format!("{name}.txt"));
    fs::write(&txt, &text)?;
    println!("{text}");
    eprintln!("profile: wrote {} and {}", txt.display(), data.display());
    Ok(())
}
