//! ringlb's lab: real TUN devices, real kernels' routing, real apps, all on one host.
//!
//! A [`Lab`] is a set of network namespaces named `<prefix>-…`:
//!
//! ```text
//!  client 10.78.0.100 ── router (br0 10.77.0.254, 10.78.0.1) ──┬── n1 10.77.0.1  ┐
//!                       VIP 10.200.0.10 via n1, or ECMP       ├── n2 10.77.0.2  ├ ringlb + nginx
//!                                                              └── n3 10.77.0.3  ┘   on the VIP
//! ```
//!
//! With `--entry bgp` the router and every node run BIRD: each node announces the VIP over BGP
//! while its ringlb says it is ready, and the router installs one ECMP route over the announcing
//! nodes, with BFD to notice a node that stops answering. With `--entry l2` the client sits on
//! the nodes' bridge as 10.77.0.100 with the VIP on-link, and the node the cluster elects
//! answers its ARP requests.
//!
//! Nodes' default route is the router, so a reply from any node goes straight to the client
//! (direct server return) and never crosses the entry node. Every node runs `ringlb node` and an
//! unmodified nginx that answers `/` with the node's name, serves `/blob/…` files and `/1k`,
//! plus a small upload sink on port 9000 that answers with the sha256 of what it received.
//!
//! With `--sites 2` the nodes are split over two sites, each with its own router, client and
//! entry, joined by an emulated WAN that delays, jitters, drops and rate-limits frames (see
//! [`sites`] and [`wan`]).
//!
//! Everything a lab creates lives in its namespaces and in its state directory, so [`down`]
//! (also run when a [`Lab`] is dropped) leaves nothing behind.

#![forbid(unsafe_code)]

pub mod adversary;
pub mod flood;
pub mod pps;
pub mod sites;
pub mod wan;

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 100);
/// The client's address with `--entry l2`, on the nodes' segment.
pub const L2_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// Autonomous system numbers of the lab's router and of every node (`--entry bgp`).
const ROUTER_AS: u32 = 65000;
const NODES_AS: u32 = 65001;
/// The kernel table in which ringlb holds the VIP's route for BIRD to announce.
pub const ENTRY_TABLE: u32 = 201;
pub const ROUTER_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
const CARRIER_PORT: u16 = 6635;
const CONTROL_PORT: u16 = 6636;
/// Requests per second each node's `/cap` answers: a fixed per-node capacity for the
/// scaling bench (excess requests wait in nginx's queue).
pub const CAPACITY: u32 = 1000;
/// Where labs keep configs, logs and pid files.
pub const STATE_ROOT: &str = "/tmp/ringlb-netlab";
/// ringlb's default `node.stop_timeout`: how long a daemon stopped by SIGTERM may drain.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How client traffic for the VIP reaches the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Entry {
    /// The router sends the VIP to node 1 (the single-entry case).
    Single,
    /// The router spreads the VIP over all nodes by L4-hash ECMP.
    Ecmp,
    /// Like `ecmp`, but learned over BGP (BIRD on the router and on every node, with BFD)
    /// from the nodes that ringlb says are ready.
    Bgp,
    /// No router on the way: the client shares the nodes' segment and ARPs for the VIP, which
    /// the node the cluster elects answers.
    L2,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Single => "single",
            Entry::Ecmp => "ecmp",
            Entry::Bgp => "bgp",
            Entry::L2 => "l2",
        }
    }

    fn parse(name: &str) -> Option<Entry> {
        [Entry::Single, Entry::Ecmp, Entry::Bgp, Entry::L2].into_iter().find(|e| e.name() == name)
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub prefix: String,
    pub nodes: usize,
    pub entry: Entry,
    /// `udp` or `ipip`.
    pub carrier: String,
    /// The `ringlb` binary.
    pub bin: PathBuf,
    /// Capacity weight per node (missing entries are 1).
    pub weights: Vec<f64>,
    /// Requests/s each node's `GET /` may serve (missing or `None`: unlimited); excess requests
    /// wait in nginx's queue, so a limited node is a slower one.
    pub service_rates: Vec<Option<u32>>,
    /// Extra TOML appended to every node's config.
    pub extra_config: String,
    /// Extra TOML lines in every node's `[carrier]` section.
    pub carrier_options: String,
    /// Start ringlb on the nodes (false: plain servers, for direct-path baselines).
    pub start_ringlb: bool,
    /// Run the QUIC control plane (certificates issued by the lab, node 1 as the seed);
    /// without it every node gets the static member list.
    pub control: bool,
    /// Every node's `node.stop_timeout` (`None`: ringlb's default, [`DEFAULT_STOP_TIMEOUT`]).
    pub stop_timeout: Option<Duration>,
    /// Run `ringlb node` as uid [`UNPRIVILEGED_UID`] with no capabilities (`tun.owner`): `setup`
    /// (root) makes the TUN, the daemon only attaches to it.
    pub unprivileged: bool,
    /// 1, or 2 for two sites joined by an emulated WAN (see [`sites`]): nodes 1 to ⌈N/2⌉ in
    /// site `a`, the others in site `b`, each site with its own router, client and entry.
    pub sites: usize,
    /// The WAN between the sites (both directions).
    pub wan: wan::Impairment,
    /// Run the WAN bridge as `<this> wan-bridge` (the `netlab` binary) in the WAN namespace, so
    /// it outlives this process (`netlab up`); `None` runs it on a thread of this process,
    /// which stops when the [`Lab`] is dropped, or when the process exits after [`Lab::keep`].
    pub wan_bridge_bin: Option<PathBuf>,
    /// Run the kernel fast path (`[fast_path] enabled = true`) on every node; the default comes
    /// from [`FAST_PATH_ENV`].
    pub fast_path: bool,
    /// The client reuses TIME-WAIT ports (`net.ipv4.tcp_tw_reuse = 1`): the benches' runs of
    /// tens of thousands of short connections set it (see `Lab::build`).
    pub client_reuses_ports: bool,
}

/// Set (to anything) to run every lab with the kernel fast path: `just test` runs the
/// end-to-end suites once without it and once with it.
pub const FAST_PATH_ENV: &str = "NETLAB_FAST_PATH";

/// The uid an unprivileged lab daemon runs as (`nobody`).
pub const UNPRIVILEGED_UID: u32 = 65534;

impl Spec {
    pub fn new(prefix: impl Into<String>, bin: impl Into<PathBuf>) -> Self {
        Spec {
            prefix: prefix.into(),
            nodes: 3,
            entry: Entry::Single,
            carrier: "udp".into(),
            bin: bin.into(),
            weights: Vec::new(),
            service_rates: Vec::new(),
            extra_config: String::new(),
            carrier_options: String::new(),
            start_ringlb: true,
            control: true,
            stop_timeout: None,
            unprivileged: false,
            sites: 1,
            wan: wan::Impairment::default(),
            wan_bridge_bin: None,
            fast_path: std::env::var_os(FAST_PATH_ENV).is_some(),
            client_reuses_ports: false,
        }
    }
}

/// A running lab; dropping it tears it down unless [`Lab::keep`] was called.
#[derive(Debug)]
pub struct Lab {
    pub spec: Spec,
    pub dir: PathBuf,
    keep: bool,
    /// The WAN bridge, when it runs on a thread of this process.
    wan: Option<wan::bridge::BridgeThread>,
}

/// The sha256 of a file, as `sha256sum` prints it.
pub fn sha256(file: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(file))?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned())
}

/// A unique prefix for a test's lab: short (namespace names show in `ip netns`), and unique
/// across processes and within one.
pub fn unique_prefix(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("rlt{tag}{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed))
}

pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, u8::try_from(i).expect("at most 250 nodes"))
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

fn sh(ns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]);
            c.args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    Ok(String::from_utf8_lossy(&run(&mut cmd)?.stdout).into_owned())
}

/// The namespaces of labs with this prefix.
fn namespaces(prefix: &str) -> Result<Vec<String>> {
    let out = sh(None, &["ip", "netns", "list"])?;
    let want = format!("{prefix}-");
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&want))
        .map(String::from)
        .collect())
}

/// Tears down every namespace `<prefix>-*` and the state directory: processes first (TERM,
/// then KILL), then the namespaces, then the files. Safe to run when nothing is there.
pub fn down(prefix: &str) -> Result<()> {
    let nss = namespaces(prefix)?;
    let pids = |ns: &str| -> Vec<String> {
        sh(None, &["ip", "netns", "pids", ns]).map(|o| o.lines().map(String::from).collect()).unwrap_or_default()
    };
    for signal in ["-TERM", "-KILL"] {
        let all: Vec<String> = nss.iter().flat_map(|ns| pids(ns)).collect();
        if all.is_empty() {
            break;
        }
        let _ = Command::new("kill").arg(signal).args(&all).stderr(Stdio::null()).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && nss.iter().any(|ns| !pids(ns).is_empty()) {
            sleep(Duration::from_millis(50));
        }
    }
    for ns in &nss {
        sh(None, &["ip", "netns", "del", ns])?;
    }
    let dir = Path::new(STATE_ROOT).join(prefix);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

impl Lab {
    /// Reattaches to a lab started by another process (e.g. `netlab up`), to inspect or stop it.
    pub fn attach(prefix: &str) -> Result<Lab> {
        let dir = Path::new(STATE_ROOT).join(prefix);
        let nodes = fs::read_to_string(dir.join("nodes")).with_context(|| format!("no lab {prefix:?} is up"))?;
        let bin = fs::read_to_string(dir.join("bin"))?;
        let mut spec = Spec::new(prefix, bin.trim());
        spec.nodes = nodes.trim().parse()?;
        spec.control = dir.join("pki").exists();
        if let Some(entry) = fs::read_to_string(dir.join("entry")).ok().and_then(|e| Entry::parse(e.trim())) {
            spec.entry = entry;
        }
        if let Ok(sites) = fs::read_to_string(dir.join("sites")) {
            spec.sites = sites.trim().parse()?;
        }
        let mut lab = Lab { spec, dir, keep: true, wan: None };
        if let Some(wan) = lab.read_wan_params() {
            lab.spec.wan = wan;
        }
        Ok(lab)
    }

    /// Builds and starts a lab. On failure everything built so far is torn down.
    pub fn up(spec: Spec) -> Result<Lab> {
        down(&spec.prefix)?;
        let dir = Path::new(STATE_ROOT).join(&spec.prefix);
        fs::create_dir_all(&dir)?;
        let keep_failed = std::env::var_os("NETLAB_KEEP_FAILED").is_some();
        fs::write(dir.join("nodes"), spec.nodes.to_string())?;
        fs::write(dir.join("bin"), spec.bin.to_string_lossy().as_bytes())?;
        fs::write(dir.join("entry"), spec.entry.name())?;
        if spec.sites != 1 {
            fs::write(dir.join("sites"), spec.sites.to_string())?;
        }
        let mut lab = Lab { spec, dir, keep: false, wan: None };
        if let Err(e) = lab.build() {
            lab.keep = keep_failed;
            return Err(e.context("building the lab"));
        }
        Ok(lab)
    }

    /// Leaves the lab running when this handle is dropped.
    pub fn keep(mut self) {
        self.keep = true;
    }

    pub fn router(&self) -> String {
        format!("{}-r", self.spec.prefix)
    }

    pub fn client(&self) -> String {
        format!("{}-c", self.spec.prefix)
    }

    /// The pids of node `i`'s `ringlb node` daemon (normally one). Namespaces share the host's
    /// pid space, so it is found among the namespace's pids (`ip netns pids`), never by name.
    pub fn ringlb_pids(&self, i: usize) -> Result<Vec<String>> {
        let pids = sh(None, &["ip", "netns", "pids", &self.node(i)])?;
        Ok(pids
            .lines()
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
                args.first().is_some_and(|a| a.ends_with(b"ringlb")) && args.last() == Some(&&b"node"[..])
            })
            .map(str::to_owned)
            .collect())
    }

    /// Namespace of node `i` (1-based).
    pub fn node(&self, i: usize) -> String {
        format!("{}-n{i}", self.spec.prefix)
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}"))
    }

    /// Node `i`'s admin socket (in a directory of its own that an unprivileged daemon may write).
    pub fn admin_socket(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("run").join("admin.sock")
    }

    pub fn config_path(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("ringlb.toml")
    }

    /// Runs a command in a namespace and returns its stdout; fails if it fails.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        sh(Some(ns), args)
    }

    /// Runs a command in a namespace and returns its whole output, success or not.
    pub fn exec_output(&self, ns: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip").args(["netns", "exec", ns]).args(args).output().context("spawning ip netns exec")
    }

    /// Starts a long-running process in a namespace, logging to `<dir>/<log>`.
    pub fn spawn(&self, ns: &str, log: &Path, args: &[&str]) -> Result<()> {
        let out = fs::File::create(log)?;
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {args:?} in {ns}"))?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let s = &self.spec;
        let (r, c) = (self.router(), self.client());
        for ns in [r.clone(), c.clone()] {
            sh(None, &["ip", "netns", "add", &ns])?;
            self.exec(&ns, &["ip", "link", "set", "lo", "up"])?;
        }
        // Router: a bridge for the nodes' underlay, a leg to the client.
        self.exec(&r, &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(&r, &["ip", "addr", "add", &format!("{ROUTER_UNDERLAY}/24"), "dev", "br0"])?;
        self.exec(&r, &["ip", "link", "set", "br0", "up"])?;
        self.exec(&r, &["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1"])?;
        // The client opens tens of thousands of short connections to one address and port (the
        // benches' `Connection: close` runs). Whichever side closes first keeps the tuple in
        // TIME-WAIT for 60 s. Through the VIP the client often closes first (its close crosses
        // nginx's FIN: 40 % of connections against 1 % direct, measured with wrk), and without
        // reuse its 28,000 ports ran out within seconds: connect() took 4 ms and the rate fell
        // to 470 requests/s. Load generators set this; every case gets it alike.
        if s.client_reuses_ports {
            self.exec(&c, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        }
        sh(None, &["ip", "-n", &r, "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", &c])?;
        let vip = format!("{VIP}/32");
        if s.entry == Entry::L2 {
            // The client on the nodes' segment, the VIP on-link: it ARPs for the VIP itself.
            self.exec(&r, &["ip", "link", "set", "vc", "master", "br0", "up"])?;
            self.exec(&c, &["ip", "addr", "add", &format!("{L2_CLIENT}/24"), "dev", "eth0"])?;
            self.exec(&c, &["ip", "link", "set", "eth0", "up"])?;
            self.exec(&c, &["ip", "route", "add", &vip, "dev", "eth0"])?;
        } else {
            self.exec(&r, &["ip", "addr", "add", "10.78.0.1/24", "dev", "vc"])?;
            self.exec(&r, &["ip", "link", "set", "vc", "up"])?;
            self.exec(&c, &["ip", "addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])?;
            self.exec(&c, &["ip", "link", "set", "eth0", "up"])?;
            self.exec(&c, &["ip", "route", "add", "default", "via", "10.78.0.1"])?;
        }
        if s.sites != 1 {
            self.build_site_b()?;
        }
        let s = &self.spec;
        for i in 1..=s.nodes {
            self.wire_node(i)?;
        }
        for site in 1..=s.sites {
            // Each site's router sends the VIP to its own site's nodes.
            let (r, nodes) = (self.router_of_site(site), self.site_nodes(site));
            match s.entry {
                Entry::Single => drop(self.exec(
                    &r,
                    &["ip", "route", "add", &vip, "via", &node_addr(nodes.first().copied().unwrap_or(1)).to_string()],
                )?),
                Entry::Ecmp => {
                    let mut args = vec!["ip".to_owned(), "route".into(), "add".into(), vip.clone()];
                    for i in nodes {
                        args.extend(["nexthop".into(), "via".into(), node_addr(i).to_string()]);
                    }
                    self.exec(&r, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
                }
                Entry::Bgp => self.start_router_bird(site)?,
                Entry::L2 => {}
            }
        }
        fs::write(self.dir.join("blob-small"), vec![b'x'; 1024])?;
        if s.control {
            self.issue_certs()?;
        }
        for i in 1..=s.nodes {
            fs::create_dir_all(self.node_dir(i))?;
            self.start_services(i)?;
            if s.entry == Entry::Bgp {
                self.start_node_bird(i)?;
            }
            if s.start_ringlb {
                self.start_ringlb(i)?;
            }
        }
        for i in 1..=s.nodes {
            self.wait_ready(i)?;
        }
        if s.control && s.start_ringlb {
            let all: Vec<usize> = (1..=s.nodes).collect();
            self.wait_converged(&all, s.nodes, Duration::from_secs(15))?;
        }
        match s.entry {
            Entry::Bgp if s.start_ringlb => {
                for site in 1..=s.sites {
                    self.wait_site_entries(site, self.site_nodes(site).len(), Duration::from_secs(20))?;
                }
            }
            Entry::L2 if s.start_ringlb => {
                // A starting node listens for an owner for 3 s before it takes the VIP.
                self.wait_l2_owner(Duration::from_secs(10))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// BIRD's files for a host: config, control socket, log.
    fn bird_paths(&self, host: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.join(format!("bird-{host}"));
        (d.join("bird.conf"), d.join("bird.ctl"))
    }

    /// Starts BIRD in a namespace with `conf` (foreground, so the lab's teardown finds it).
    fn start_bird(&self, ns: &str, host: &str, conf: &str) -> Result<()> {
        let (conf_path, ctl) = self.bird_paths(host);
        fs::create_dir_all(conf_path.parent().expect("bird dir"))?;
        fs::write(&conf_path, conf)?;
        let (c, s) = (conf_path.to_string_lossy().into_owned(), ctl.to_string_lossy().into_owned());
        run(Command::new("bird").args(["-p", "-c", &c]))
            .with_context(|| format!("BIRD refuses {c} (is bird2 installed?)"))?;
        self.spawn(ns, &conf_path.with_file_name("bird.log"), &["bird", "-f", "-c", &c, "-s", &s])
    }

    /// The router's BIRD: a BGP session with BFD to every node, and every VIP route it learns
    /// installed as one multipath route (`merge paths`), hashed on the L4 header by the kernel
    /// (`fib_multipath_hash_policy=1`). No graceful restart: a router that kept a dead node's
    /// route while it "restarts" would send it traffic for minutes.
    fn start_router_bird(&self, site: usize) -> Result<()> {
        let me = Lab::router_addr(site);
        let mut conf = format!(
            "router id {me};\nlog stderr all;\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             protocol bfd {{ interface \"br0\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }}; }}\n\
             template bgp ringlb {{ local {me} as {ROUTER_AS}; bfd on; graceful restart off;\n  \
             connect delay time 1; connect retry time 2; error wait time 1, 4;\n  \
             ipv4 {{ import where net = {VIP}/32; export none; }};\n}}\n"
        );
        for i in self.site_nodes(site) {
            let _ = writeln!(conf, "protocol bgp n{i} from ringlb {{ neighbor {} as {NODES_AS}; }}", node_addr(i));
        }
        self.start_bird(&self.router_of_site(site), &Lab::bird_router_host(site), &conf)
    }

    /// Node `i`'s BIRD: learns the VIP's route from the table ringlb holds it in (while ringlb
    /// is ready) and announces it to the router, with BFD.
    fn start_node_bird(&self, i: usize) -> Result<()> {
        let (me, router) = (node_addr(i), Lab::router_addr(self.site_of(i)));
        let conf = format!(
            "router id {me};\nlog stderr all;\nprotocol device {{}}\n\
             protocol kernel ringlb {{ kernel table {ENTRY_TABLE}; learn; ipv4 {{ import where net = {VIP}/32; export none; }}; }}\n\
             protocol bfd {{ interface \"eth0\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }}; }}\n\
             protocol bgp uplink {{ local {me} as {NODES_AS}; neighbor {router} as {ROUTER_AS}; bfd on;\n  \
             graceful restart off; connect delay time 1; connect retry time 2; error wait time 1, 4;\n  \
             ipv4 {{ import none; export where net = {VIP}/32; }};\n}}\n"
        );
        self.start_bird(&self.node(i), &format!("n{i}"), &conf)
    }

    /// BIRD's host name (its files' directory) for site `site`'s router.
    fn bird_router_host(site: usize) -> String {
        match site {
            1 => "router".into(),
            _ => format!("router{site}"),
        }
    }

    /// The next hops of the router's route to the VIP (`--entry bgp`), as node numbers.
    pub fn entries(&self) -> Result<Vec<usize>> {
        self.site_entries(1)
    }

    /// The next hops of site `site`'s router's route to the VIP, as node numbers.
    pub fn site_entries(&self, site: usize) -> Result<Vec<usize>> {
        let json = self.exec(&self.router_of_site(site), &["ip", "-j", "route", "show", &format!("{VIP}/32")])?;
        let routes: serde_json::Value = serde_json::from_str(&json).context("ip -j route")?;
        let mut hops = Vec::new();
        for route in routes.as_array().into_iter().flatten() {
            let gateways: Vec<&serde_json::Value> = match route.get("nexthops").and_then(|n| n.as_array()) {
                Some(list) => list.iter().filter_map(|h| h.get("gateway")).collect(),
                None => route.get("gateway").into_iter().collect(),
            };
            for g in gateways {
                let ip: Ipv4Addr = g.as_str().unwrap_or_default().parse().context("a next hop")?;
                hops.push(usize::from(ip.octets()[3]));
            }
        }
        hops.sort_unstable();
        Ok(hops)
    }

    /// Waits until the router's VIP route has `n` next hops (`--entry bgp`).
    pub fn wait_entries(&self, n: usize, within: Duration) -> Result<Vec<usize>> {
        self.wait_site_entries(1, n, within)
    }

    /// Waits until site `site`'s router's VIP route has `n` next hops (`--entry bgp`).
    pub fn wait_site_entries(&self, site: usize, n: usize, within: Duration) -> Result<Vec<usize>> {
        let deadline = Instant::now() + within;
        loop {
            let hops = self.site_entries(site)?;
            if hops.len() == n {
                return Ok(hops);
            }
            if Instant::now() > deadline {
                let (_, ctl) = self.bird_paths(&Lab::bird_router_host(site));
                let protocols = self
                    .exec(&self.router_of_site(site), &["birdc", "-s", &ctl.to_string_lossy(), "show", "protocols"])
                    .unwrap_or_default();
                bail!("the router's VIP route has next hops {hops:?}, not {n}; its BGP sessions:\n{protocols}");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// The nodes that say they own the VIP at layer 2 (`--entry l2`), from their metrics.
    pub fn l2_owners(&self) -> Vec<usize> {
        (1..=self.spec.nodes)
            .filter(|&i| {
                self.metrics(i)
                    .is_ok_and(|m| m.lines().any(|l| l.starts_with("ringlb_entry_announced{") && l.ends_with(" 1")))
            })
            .collect()
    }

    /// Waits until exactly one node owns the VIP at layer 2, and returns it.
    pub fn wait_l2_owner(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let owners = self.l2_owners();
            if let [one] = owners[..] {
                return Ok(one);
            }
            if Instant::now() > deadline {
                bail!("no single layer-2 owner of the VIP: {owners:?}");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Creates node `i`'s namespace and plugs it into the router's bridge as 10.77.0.i.
    fn wire_node(&self, i: usize) -> Result<()> {
        let (r, n) = (self.router_of_site(self.site_of(i)), self.node(i));
        sh(None, &["ip", "netns", "add", &n])?;
        self.exec(&n, &["ip", "link", "set", "lo", "up"])?;
        // No IPv6 duplicate address detection on the node's link: an address that turns from
        // tentative to valid a second or two later would change what the teardown test compares.
        self.exec(&n, &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])?;
        let leg = format!("vn{i}");
        sh(None, &["ip", "-n", &r, "link", "add", &leg, "type", "veth", "peer", "name", "eth0", "netns", &n])?;
        self.exec(&r, &["ip", "link", "set", &leg, "master", "br0", "up"])?;
        self.exec(&n, &["ip", "addr", "add", &format!("{}/24", node_addr(i)), "dev", "eth0"])?;
        self.exec(&n, &["ip", "link", "set", "eth0", "up"])?;
        self.exec(&n, &["ip", "route", "add", "default", "via", &Lab::router_addr(self.site_of(i)).to_string()])?;
        Ok(())
    }

    /// Adds one more host on the underlay (namespace `<prefix>-n<i>`, address 10.77.0.i) with
    /// the lab's services but no ringlb; the caller writes its config and starts it.
    pub fn add_host(&self, i: usize) -> Result<()> {
        self.wire_node(i)?;
        fs::create_dir_all(self.node_dir(i))?;
        self.start_services(i)?;
        self.wait_ready(i)
    }

    /// The node's ringlb config.
    pub fn config_toml(&self, i: usize) -> String {
        let s = &self.spec;
        let weight = |j: usize| s.weights.get(j - 1).copied().unwrap_or(1.0);
        let mut stop_timeout = s.stop_timeout.map(|t| format!("stop_timeout = \"{}ms\"\n", t.as_millis()));
        if s.sites > 1 {
            let site = format!("site = \"{}\"\n", Lab::site_name(self.site_of(i)));
            stop_timeout = Some(stop_timeout.unwrap_or_default() + &site);
        }
        let mut t = format!(
            "[node]\nname = \"n{i}\"\nvip = \"{VIP}\"\nunderlay_interface = \"eth0\"\naddress = \"{}\"\nweight = {:?}\n{}\n\
             [carrier]\nkind = \"{}\"\nport = {CARRIER_PORT}\n{}\n\
             [steering]\nstate_dir = \"{}\"\n\n[admin]\nsocket = \"{}\"\n\n",
            node_addr(i),
            weight(i),
            stop_timeout.unwrap_or_default(),
            s.carrier,
            s.carrier_options,
            self.node_dir(i).display(),
            self.admin_socket(i).display()
        );
        if s.unprivileged {
            let _ = write!(t, "[tun]\nowner = \"{UNPRIVILEGED_UID}\"\n\n");
        }
        if s.fast_path {
            t.push_str("[fast_path]\nenabled = true\n\n");
        }
        match s.entry {
            Entry::Bgp => {
                let _ = write!(t, "[entry]\nmode = \"bgp\"\ntable = {ENTRY_TABLE}\n\n");
            }
            Entry::L2 => t.push_str("[entry]\nmode = \"l2\"\n\n"),
            Entry::Single | Entry::Ecmp => {}
        }
        if s.control {
            let pki = self.dir.join("pki");
            let _ = write!(
                t,
                "[control]\nlisten = \"{}:{CONTROL_PORT}\"\nseeds = [\"n1@{}:{CONTROL_PORT}\"]\n\
                 ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n",
                node_addr(i),
                node_addr(1),
                pki.join("ca.pem").display(),
                pki.join(format!("n{i}.pem")).display(),
                pki.join(format!("n{i}.key")).display(),
            );
        }
        t.push_str(&s.extra_config);
        t.push('\n');
        if !s.control {
            for j in 1..=s.nodes {
                let _ = write!(
                    t,
                    "\n[[members]]\nname = \"n{j}\"\naddr = \"{}\"\nweight = {:?}\n",
                    node_addr(j),
                    weight(j)
                );
            }
        }
        t
    }

    /// Issues the cluster CA and one certificate per node into `<lab>/pki`.
    fn issue_certs(&self) -> Result<()> {
        let pki = self.dir.join("pki");
        let pki_s = pki.to_string_lossy().into_owned();
        let bin = self.spec.bin.to_string_lossy().into_owned();
        run(Command::new(&bin).args(["cert", "init", "--dir", &pki_s]))?;
        for i in 1..=self.spec.nodes {
            let (name, ip) = (format!("n{i}"), node_addr(i).to_string());
            run(Command::new(&bin).args(["cert", "issue", "--dir", &pki_s, "--node", &name, "--ip", &ip]))?;
        }
        Ok(())
    }

    /// Waits until every running node sees `n` members alive (itself included) and holds a
    /// fresh load vector (younger than 1 s) from each of its `n - 1` peers: only then does
    /// placement consider them all.
    pub fn wait_converged(&self, nodes: &[usize], n: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let seen: Vec<(u64, usize)> = nodes.iter().map(|&i| self.converged_view(i)).collect();
            if seen.iter().all(|&(alive, fresh)| alive == n as u64 && fresh + 1 == n) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "cluster did not converge to {n} alive members with fresh load: \
                     nodes {nodes:?} see (alive, fresh peer loads) {seen:?}"
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node of `nodes` holds a fresh load vector from each of the others,
    /// whatever their state (a draining member still sends its load).
    pub fn wait_loads(&self, nodes: &[usize], within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let fresh: Vec<usize> = nodes.iter().map(|&i| self.converged_view(i).1).collect();
            if fresh.iter().all(|&f| f + 1 == nodes.len()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nodes {nodes:?} hold fresh loads from {fresh:?} peers, not all");
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// (members alive, peers whose load vector is younger than 1 s) as node `i` sees them.
    fn converged_view(&self, i: usize) -> (u64, usize) {
        let Ok(text) = self.metrics(i) else { return (0, 0) };
        let me = format!("peer=\"n{i}\"");
        let alive = sum_metric(&text, "ringlb_members_alive{");
        let fresh = text
            .lines()
            .filter(|l| l.starts_with("ringlb_peer_load_age_seconds{") && !l.contains(&me))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .filter(|&age| age < 1.0)
            .count();
        (alive, fresh)
    }

    /// Runs `ringlb setup` and starts `ringlb node` on node `i`, writing its config first
    /// unless it has one (a restarted node keeps the config it was built with).
    pub fn start_ringlb(&self, i: usize) -> Result<()> {
        self.start_ringlb_bin(i, &self.spec.bin)
    }

    /// [`Lab::start_ringlb`] with another `ringlb` binary (an upgrade or a downgrade).
    pub fn start_ringlb_bin(&self, i: usize, bin: &Path) -> Result<()> {
        let cfg = self.config_path(i);
        if !cfg.exists() {
            fs::write(&cfg, self.config_toml(i))?;
        }
        let bin = bin.to_string_lossy().into_owned();
        let cfg = cfg.to_string_lossy().into_owned();
        self.exec(&self.node(i), &[&bin, "--config", &cfg, "setup"])?;
        let log = self.node_dir(i).join("ringlb.log");
        if self.spec.unprivileged {
            self.spawn_unprivileged(i, &log, &[&bin, "--config", &cfg, "node"])?;
        } else {
            self.spawn(&self.node(i), &log, &[&bin, "--config", &cfg, "node"])?;
        }
        // Ready when the TUN route exists and is in use (a persistent TUN's route is "linkdown"
        // until the daemon attaches).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .exec(&self.node(i), &["ip", "route", "show", "table", "100"])
                .is_ok_and(|o| o.contains("ring0") && !o.contains("linkdown"))
            {
                return Ok(());
            }
            sleep(Duration::from_millis(50));
        }
        let log = fs::read_to_string(self.node_dir(i).join("ringlb.log")).unwrap_or_default();
        bail!("ringlb on n{i} did not come up; its log:\n{log}")
    }

    /// Starts `args` in node `i`'s namespace as uid [`UNPRIVILEGED_UID`] with every capability
    /// dropped (`setpriv`). It reads its certificate key, and opens `/dev/net/tun` through a
    /// device node of its own bind-mounted over it in a private mount namespace, so the host's
    /// `/dev/net/tun` keeps its permissions.
    fn spawn_unprivileged(&self, i: usize, log: &Path, args: &[&str]) -> Result<()> {
        let uid = UNPRIVILEGED_UID.to_string();
        let dir = self.node_dir(i);
        let tun = dir.join("net-tun");
        if !tun.exists() {
            run(Command::new("mknod").arg(&tun).args(["c", "10", "200"]))?;
        }
        run(Command::new("chown").arg(&uid).arg(&tun))?;
        let run_dir = self.admin_socket(i).parent().expect("a directory").to_owned();
        fs::create_dir_all(&run_dir)?;
        run(Command::new("chown").arg(&uid).arg(&run_dir))?;
        if self.spec.control {
            run(Command::new("chown").arg(&uid).arg(self.dir.join("pki").join(format!("n{i}.key"))))?;
        }
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let script = format!(
            "mount --bind '{}' /dev/net/tun && exec setpriv --reuid={uid} --regid={uid} --clear-groups \
             --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs {}",
            tun.display(),
            quoted.join(" ")
        );
        self.spawn(&self.node(i), log, &["unshare", "--mount", "sh", "-c", &script])
    }

    /// Stops `ringlb node` on node `i` (SIGTERM, or SIGKILL with `hard`) and waits until it has
    /// exited. After SIGTERM the daemon drains first: it exits once no live flow needs it, at
    /// the latest after its `node.stop_timeout`.
    pub fn stop_ringlb(&self, i: usize, hard: bool) -> Result<()> {
        let sig = if hard { "-KILL" } else { "-TERM" };
        let mut killed = Vec::new();
        for pid in self.ringlb_pids(i)? {
            let _ = Command::new("kill").args([sig, &pid]).status();
            killed.push(pid);
        }
        // Gone means the process has exited (its sockets closed), not only its TUN. A zombie
        // (its parent, maybe this process, has not reaped it yet) has exited.
        let running = |pid: &String| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).is_some_and(|st| st != "Z")
        };
        let within = match hard {
            true => Duration::from_secs(5),
            false => self.spec.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT) + Duration::from_secs(5),
        };
        let deadline = Instant::now() + within;
        while killed.iter().any(running) {
            if Instant::now() > deadline {
                bail!("ringlb on n{i} did not exit within {within:?}");
            }
            sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn start_services(&self, i: usize) -> Result<()> {
        let d = self.node_dir(i);
        let (rate_zone, root_limit) = match self.spec.service_rates.get(i - 1).copied().flatten() {
            Some(rate) => {
                (format!("limit_req_zone $host zone=root:1m rate={rate}r/s;\n"), "limit_req zone=root burst=100000; ")
            }
            None => (String::new(), ""),
        };
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp-body;\n  proxy_temp_path {d}/tmp-proxy;\n\
             fastcgi_temp_path {d}/tmp-fcgi;\n  uwsgi_temp_path {d}/tmp-uwsgi;\n  scgi_temp_path {d}/tmp-scgi;\n\
             keepalive_requests 1000000;\n  sendfile on;\n\
             limit_req_zone $host zone=cap:1m rate={CAPACITY}r/s;\n{rate_zone}\
             server {{\n    listen 80 backlog=4096;\n    add_header X-Node n{i} always;\n\
             location = / {{ {root_limit}root {d}; try_files /name =500; default_type text/plain; }}\n\
             location = /cap {{ limit_req zone=cap burst=100000; alias {lab}/blob-small; default_type text/plain; }}\n\
             location = /1k {{ alias {lab}/blob-small; default_type application/octet-stream; }}\n\
             location /blob/ {{ alias {lab}/; default_type application/octet-stream; }}\n  }}\n}}\n",
            d = d.display(),
            lab = self.dir.display(),
        );
        // `GET /` answers with the node's name, from a file: nginx's `return` would answer
        // before `limit_req` could hold the request.
        fs::write(d.join("name"), format!("n{i}\n"))?;
        fs::write(d.join("nginx.conf"), conf)?;
        self.start_nginx(i)?;
        let n = self.node(i);
        let sink = Path::new(env!("CARGO_MANIFEST_DIR")).join("upload_sink.py");
        self.spawn(&n, &d.join("sink.log"), &["python3", &sink.to_string_lossy(), "9000", &format!("n{i}")])?;
        Ok(())
    }

    /// Starts node `i`'s nginx (its config written by the lab); does not wait for it.
    pub fn start_nginx(&self, i: usize) -> Result<()> {
        let d = self.node_dir(i);
        let conf_path = d.join("nginx.conf");
        self.spawn(
            &self.node(i),
            &d.join("nginx.log"),
            &["nginx", "-c", &conf_path.to_string_lossy(), "-p", &d.to_string_lossy()],
        )
    }

    /// Stops node `i`'s nginx (the app on the VIP) and waits until port 80 is closed.
    pub fn stop_nginx(&self, i: usize) -> Result<()> {
        let pid = fs::read_to_string(self.node_dir(i).join("nginx.pid")).context("nginx.pid")?;
        run(Command::new("kill").arg(pid.trim()))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.exec(&self.node(i), &["ss", "-Htln", "sport = :80"]).is_ok_and(|o| !o.trim().is_empty()) {
            if Instant::now() > deadline {
                bail!("nginx on n{i} did not stop");
            }
            sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until node `i`'s services (nginx on 80, the upload sink on 9000) listen.
    pub fn wait_ready(&self, i: usize) -> Result<()> {
        let n = self.node(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = ["80", "9000"].iter().all(|port| {
                self.exec(&n, &["ss", "-Htln", &format!("sport = :{port}")]).is_ok_and(|o| !o.trim().is_empty())
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.node_dir(i).join("nginx.log")).unwrap_or_default();
                bail!("services on n{i} did not come up: {log}");
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// `curl` from the client; returns stdout.
    pub fn curl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["curl", "-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        self.exec(&self.client(), &all)
    }

    /// Uploads a file to the VIP's upload sink (port 9000) from the client: (the sha256 the
    /// server computed, the node that served it).
    pub fn upload(&self, file: &Path) -> Result<(String, String)> {
        let data = format!("@{}", file.display());
        let out = self.curl(&["--max-time", "120", "--data-binary", &data, &format!("http://{VIP}:9000/up")])?;
        let mut words = out.split_whitespace();
        Ok((words.next().unwrap_or_default().to_owned(), words.next().unwrap_or_default().to_owned()))
    }

    /// Writes a file of `mib` MiB of random bytes into the lab directory (served as /blob/NAME).
    pub fn make_blob(&self, name: &str, mib: usize) -> Result<PathBuf> {
        let path = self.dir.join(name);
        run(Command::new("dd")
            .args(["if=/dev/urandom", &format!("of={}", path.display()), "bs=1M", &format!("count={mib}")])
            .stderr(Stdio::null()))?;
        Ok(path)
    }

    /// Reads one counter from node `i`'s metrics (summing all label sets matching `needle`).
    /// Starts tcpdump on `iface` in namespace `ns`, writing what `filter` matches to
    /// `<lab>/<name>.pcap`, and returns once it listens. `--immediate-mode`: otherwise packets
    /// wait in the capture ring's current block (up to a second), and those still there when
    /// tcpdump stops are never written.
    pub fn capture(&self, ns: &str, iface: &str, filter: &[&str], name: &str) -> Result<Capture> {
        let file = self.dir.join(format!("{name}.pcap"));
        let log = self.dir.join(format!("{name}.tcpdump.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", iface, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting tcpdump")?;
        let mut capture = Capture { child, file };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&log).unwrap_or_default().contains("listening on") {
            if Instant::now() > deadline {
                capture.stop();
                bail!("tcpdump did not start: {}", log.display());
            }
            sleep(Duration::from_millis(20));
        }
        sleep(Duration::from_millis(100));
        Ok(capture)
    }

    pub fn metric(&self, i: usize, needle: &str) -> Result<u64> {
        Ok(sum_metric(&self.metrics(i)?, needle))
    }

    pub fn metrics(&self, i: usize) -> Result<String> {
        self.ringlb(i, "metrics")
    }

    /// Runs a `ringlb` subcommand against node `i`'s config, inside its namespace.
    pub fn ringlb(&self, i: usize, sub: &str) -> Result<String> {
        let bin = self.spec.bin.to_string_lossy().into_owned();
        let cfg = self.config_path(i).to_string_lossy().into_owned();
        self.exec(&self.node(i), &[&bin, "--config", &cfg, sub])
    }

    /// Bytes received on a node's underlay interface so far.
    pub fn rx_bytes(&self, i: usize) -> Result<u64> {
        let out = self.exec(&self.node(i), &["cat", "/sys/class/net/eth0/statistics/rx_bytes"])?;
        Ok(out.trim().parse()?)
    }
}

/// One new connection made by [`Lab::start_connloop`].
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When it started (unix seconds).
    pub t: f64,
    /// How long the connection and its request took.
    pub secs: f64,
    pub ok: bool,
    /// The node that answered, or the error.
    pub node: String,
}

/// A running tcpdump ([`Lab::capture`]).
#[derive(Debug)]
pub struct Capture {
    child: std::process::Child,
    pub file: PathBuf,
}

impl Capture {
    /// Stops tcpdump (SIGINT: it writes what it holds) and returns the pcap's bytes.
    pub fn stop(&mut self) -> Vec<u8> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        fs::read(&self.file).unwrap_or_default()
    }
}

/// The attempts a finished connection loop printed.
pub fn parse_attempts(out: &[u8]) -> Vec<Attempt> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Attempt {
            t: v["t"].as_f64().unwrap_or(0.0),
            secs: v["s"].as_f64().unwrap_or(0.0),
            ok: v["ok"].as_bool().unwrap_or(false),
            node: v["node"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

/// Long, paced, checksummed transfers through the VIP (`longconns.py`): half downloads from
/// nginx, half uploads to the sink, each checked by sha256.
#[derive(Debug, Clone)]
pub struct LongTransfers {
    pub count: usize,
    /// A quarter start at once, the rest over this many seconds.
    pub spread_secs: f64,
    /// Each lasts between these (the client paces it).
    pub min_secs: f64,
    pub max_secs: f64,
    pub blob_mib: usize,
    pub seed: u64,
}

/// One transfer as `longconns.py` reported it.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Unix seconds.
    pub start: f64,
    pub end: f64,
    pub ok: bool,
    pub error: String,
    /// `download` or `upload`.
    pub kind: String,
    /// The server's name (`?` if it never answered).
    pub node: String,
    /// The client's port.
    pub port: u64,
    /// Moved before the end.
    pub bytes: u64,
}

/// The transfers a finished `longconns.py` printed.
pub fn parse_transfers(out: &[u8]) -> Vec<Transfer> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Transfer {
            start: v["start"].as_f64().unwrap_or(0.0),
            end: v["end"].as_f64().unwrap_or(0.0),
            ok: v["ok"].as_bool().unwrap_or(false),
            error: v["error"].as_str().unwrap_or_default().to_owned(),
            kind: v["kind"].as_str().unwrap_or_default().to_owned(),
            node: v["node"].as_str().unwrap_or("?").to_owned(),
            port: v["port"].as_u64().unwrap_or(0),
            bytes: v["bytes"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The release the upgrade test starts from: the last commit before flow recovery.
pub const PREVIOUS_RELEASE: &str = "0cabd9017130fc76c33de11b55d52eefdd57904d";

/// Builds `ringlb` as it was at `commit`, in a git worktree of this checkout with a target
/// directory of its own (both under `target/`, so a second run only checks them), and returns
/// the binary's path.
pub fn build_release(commit: &str) -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the workspace root")?.to_owned();
    let short = &commit[..commit.len().min(12)];
    let tree = root.join("target").join(format!("release-{short}"));
    let head = Command::new("git").arg("-C").arg(&tree).args(["rev-parse", "HEAD"]).output();
    if !head.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == commit) {
        let _ = fs::remove_dir_all(&tree);
        let _ = run(Command::new("git").arg("-C").arg(&root).args(["worktree", "prune"]));
        run(Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(["worktree", "add", "--detach", "--force"])
            .arg(&tree)
            .arg(commit))
        .with_context(|| format!("checking out {commit} (a clone with its history is needed)"))?;
    }
    let target = tree.join("target");
    run(Command::new("cargo")
        .args(["build", "--release", "--offline", "-p", "ringlb", "--bin", "ringlb"])
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", &target))
    .with_context(|| format!("building ringlb at {commit}"))?;
    Ok(target.join("release").join("ringlb"))
}

/// Now, in unix seconds (the connection loop's clock).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Lab {
    /// Starts `connloop.py` in the client: new connections to the VIP one after another for
    /// `seconds` (or `count` of them), each given `timeout`; its stdout is piped for
    /// [`parse_attempts`].
    pub fn start_connloop(&self, seconds: f64, timeout: f64, count: Option<usize>) -> Result<std::process::Child> {
        self.start_paced_connloop(seconds, timeout, count, 0.0)
    }

    /// Starts `longconns.py` in the client (see [`LongTransfers`]); its stdout is piped for
    /// [`parse_transfers`].
    pub fn start_long_transfers(&self, t: &LongTransfers) -> Result<std::process::Child> {
        let blob = self.make_blob("long", t.blob_mib)?;
        let sha = run(Command::new("sha256sum").arg(&blob))?;
        let sha = String::from_utf8_lossy(&sha.stdout).split_whitespace().next().unwrap_or_default().to_owned();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("longconns.py");
        Command::new("ip")
            .args(["netns", "exec", &self.client(), "python3"])
            .arg(&script)
            .args([VIP.to_string(), t.count.to_string(), t.spread_secs.to_string()])
            .args([t.min_secs.to_string(), t.max_secs.to_string(), "/blob/long".into()])
            .args([(t.blob_mib << 20).to_string(), sha, t.seed.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting longconns.py")
    }

    /// [`Lab::start_connloop`], pausing `pause` seconds after each connection.
    pub fn start_paced_connloop(
        &self,
        seconds: f64,
        timeout: f64,
        count: Option<usize>,
        pause: f64,
    ) -> Result<std::process::Child> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("connloop.py");
        let mut args = vec![
            "netns".to_owned(),
            "exec".into(),
            self.client(),
            "python3".into(),
            script.to_string_lossy().into_owned(),
            format!("http://{VIP}/"),
            seconds.to_string(),
            timeout.to_string(),
        ];
        args.push(count.map_or_else(|| "0".to_owned(), |c| c.to_string()));
        args.push(pause.to_string());
        Command::new("ip").args(&args).stdout(Stdio::piped()).spawn().context("starting connloop.py")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(wan) = self.wan.take() {
            match self.keep {
                true => wan.detach(),
                // Stopped before the teardown: its TAPs go with it.
                false => drop(wan),
            }
        }
        if !self.keep {
            if let Err(e) = down(&self.spec.prefix) {
                eprintln!("netlab: tearing down {}: {e:#}", self.spec.prefix);
            }
        }
    }
}

/// The sum of the integer samples in Prometheus `text` whose line contains `needle`.
fn sum_metric(text: &str, needle: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
