//! `netlab`: bring a ringlb lab up or down, run commands in it, show its state.

#![forbid(unsafe_code)]

mod bench;
mod soak;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use ringlb_netlab::wan::{self, bridge, Impairment};
use ringlb_netlab::{adversary, down, Entry, Lab, Spec, VIP};

#[derive(Debug, Parser)]
#[command(about = "ringlb's lab in network namespaces")]
struct Cli {
    /// Namespace prefix of the lab.
    #[arg(long, default_value = "rlab", global = true)]
    prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the lab and start ringlb and the services on every node.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, value_enum, default_value_t = Entry::Single)]
        entry: Entry,
        #[arg(long, default_value = "udp")]
        carrier: String,
        #[arg(long, default_value = "target/release/ringlb")]
        bin: PathBuf,
        /// Run every `ringlb node` as uid 65534 with no capabilities (`tun.owner`).
        #[arg(long)]
        unprivileged: bool,
        /// Run the kernel fast path (eBPF) beside the TUN path on every node.
        #[arg(long)]
        fast_path: bool,
        /// 2: two sites (nodes 1 to ⌈N/2⌉ in site a, the others in site b), each with its own
        /// router, client and entry, joined by an emulated WAN.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        sites: u8,
        #[command(flatten)]
        wan: WanArgs,
    },
    /// Change the WAN between the sites of a running two-site lab, cut it, heal it, or show
    /// what it did.
    Wan {
        #[command(subcommand)]
        action: WanAction,
    },
    /// The WAN bridge itself (the lab starts it in its WAN namespace): carries Ethernet frames
    /// between two TAP devices it creates, delayed, jittered, dropped and rate-limited.
    WanBridge {
        /// The TAP devices to create.
        #[arg(long)]
        a: String,
        #[arg(long)]
        b: String,
        /// A parameter file (`delay 40ms` … one per line), reread when it changes.
        #[arg(long)]
        params: Option<PathBuf>,
        /// Where to write counters (JSON), every 200 ms while they change.
        #[arg(long)]
        stats: Option<PathBuf>,
        #[command(flatten)]
        wan: WanArgs,
    },
    /// Stop everything and delete the namespaces.
    Down,
    /// Play a member with a valid certificate that forges control messages (run it inside a
    /// lab host's namespace; see `netlab/src/adversary.rs`). Not a test by itself.
    Adversary {
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        addr: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 6636)]
        port: u16,
        /// Where to join, as name@address:port.
        #[arg(long)]
        seed: String,
        #[arg(long)]
        victim: String,
        #[arg(long, value_enum)]
        attack: adversary::Attack,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Run a command in `client`, `router` or `nN`.
    Exec {
        node: String,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Print every node's member table and counters.
    Status,
    /// Measure throughput, requests/s and latency against the direct path, HAProxy and
    /// nftables DNAT in one run, and write the table to `--out` (not a test).
    Bench {
        #[arg(long, default_value = "target/release/ringlb")]
        bin: PathBuf,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
        /// Shorter runs of every case.
        #[arg(long)]
        quick: bool,
        /// How many times every case runs; the report gives medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only the CI check: forwarded upload against direct, and sealed forwarded upload
        /// against plain, each fails below this ratio.
        #[arg(long)]
        smoke: Option<f64>,
        /// Only the scaling bench (1, 2, 4, 8 nodes behind one entry); writes this PNG.
        #[arg(long)]
        scaling: Option<PathBuf>,
    },
    /// A long run across a slow, lossy WAN (not a test): two sites of two nodes, 150 ms ± 30 ms
    /// round trip, 3 % loss, light traffic from both sites; reports how long members stayed
    /// suspected and whether any was declared dead, and writes its section of `--out`.
    SoakWan {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        #[arg(long, default_value = "target/release/ringlb")]
        bin: PathBuf,
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// Profile the forwarded path under one load with `perf record -a -g` (not a test):
    /// writes `<out>/<load>.perf.data` and a text summary.
    Profile {
        #[arg(value_enum)]
        load: bench::Load,
        #[arg(long, default_value = "target/release/ringlb")]
        bin: PathBuf,
        #[arg(long, default_value = "target/profile")]
        out: PathBuf,
        #[arg(long, default_value = "udp")]
        carrier: String,
        /// Seconds of recording.
        #[arg(long, default_value_t = 6)]
        secs: u32,
        /// Which path: the entry forwarding, the entry serving itself, or no balancer.
        #[arg(long, value_enum, default_value = "forwarded")]
        case: bench::ProfileCase,
    },
    /// Kill a node, cut the path between two nodes with nftables, heal; print what the
    /// cluster saw at each step.
    Chaos,
    /// kill -9 ringlb on a node (its services keep running).
    Kill { node: String },
    /// Stop ringlb on a node with SIGTERM: it drains, then exits (its services keep running).
    Stop { node: String },
    /// Start ringlb on a node again.
    Start { node: String },
    /// Send requests to the VIP from the client and print who answered.
    Demo {
        #[arg(long, default_value_t = 12)]
        requests: usize,
        /// With two sites: the site (1 or 2) whose client sends them.
        #[arg(long, default_value_t = 1)]
        site: usize,
    },
    /// Drain ringlb on a node (it takes no new flows), or undrain it.
    Drain {
        node: String,
        #[arg(long)]
        undo: bool,
    },
    /// Send TCP SYNs (or bare ACKs) from spoofed sources, each its own flow, from a lab host
    /// (not a test). Only to lab addresses, only from private sources outside the lab.
    Flood {
        /// Packets to send.
        #[arg(long)]
        count: u64,
        /// The lab host it runs on: client, router or nN.
        #[arg(long, default_value = "client")]
        from: String,
        #[arg(long, default_value_t = VIP)]
        to: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Spoofed source range (private, outside the lab's subnets).
        #[arg(long, default_value = "172.16.0.0/12")]
        sources: ringlb_netlab::flood::Net,
        /// Packets per second at most (default: as fast as the host sends).
        #[arg(long)]
        pps: Option<u64>,
        /// Bare ACKs instead of SYNs.
        #[arg(long)]
        ack: bool,
    },
}

/// The WAN's parameters (both directions).
#[derive(Debug, clap::Args)]
struct WanArgs {
    /// One-way delay.
    #[arg(long = "wan-delay", default_value = "40ms", value_parser = wan::parse_duration)]
    delay: std::time::Duration,
    /// Each frame's delay is uniform in delay ± jitter.
    #[arg(long = "wan-jitter", default_value = "5ms", value_parser = wan::parse_duration)]
    jitter: std::time::Duration,
    /// Probability that a frame is lost (0 to 1).
    #[arg(long = "wan-loss", default_value_t = 0.01)]
    loss: f64,
    /// Link rate, e.g. 10mbit, or none.
    #[arg(long = "wan-rate", default_value = "none")]
    rate: String,
    /// With a rate: the longest a frame waits in the link's queue before it is dropped.
    #[arg(long = "wan-queue", default_value = "100ms", value_parser = wan::parse_duration)]
    queue: std::time::Duration,
    /// Seed of the loss and jitter draws: the same seed, the same decisions.
    #[arg(long = "wan-seed", default_value_t = 1)]
    seed: u64,
}

impl WanArgs {
    fn impairment(&self) -> Result<Impairment> {
        let imp = Impairment {
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss,
            rate_bps: wan::parse_rate(&self.rate)?,
            queue: self.queue,
            seed: self.seed,
        };
        imp.check()?;
        Ok(imp)
    }
}

#[derive(Debug, Subcommand)]
enum WanAction {
    /// New parameters, applied at once.
    Set {
        #[command(flatten)]
        wan: WanArgs,
    },
    /// Nothing crosses between the sites.
    Cut,
    /// Frames cross again.
    Heal,
    /// The parameters and each direction's counters.
    Stats,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn namespace(prefix: &str, node: &str) -> Result<String> {
    Ok(match node {
        "client" | "c" => format!("{prefix}-c"),
        "router" | "r" => format!("{prefix}-r"),
        "client2" | "c2" => format!("{prefix}-c2"),
        "router2" | "r2" => format!("{prefix}-r2"),
        "wan" | "w" => format!("{prefix}-w"),
        n if n.starts_with('n') && n[1..].parse::<usize>().is_ok() => format!("{prefix}-{n}"),
        other => {
            bail!("unknown lab host {other:?}: use client, router, n1, n2, ... (two sites: client2, router2, wan)")
        }
    })
}

fn node_index(node: &str) -> Option<usize> {
    node.strip_prefix('n')?.parse().ok()
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Up { nodes, entry, carrier, bin, unprivileged, fast_path, sites, wan } => {
            let bin = std::fs::canonicalize(&bin).map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
            let mut spec = Spec::new(&cli.prefix, bin);
            spec.nodes = nodes;
            spec.entry = entry;
            spec.carrier = carrier;
            spec.unprivileged = unprivileged;
            spec.sites = usize::from(sites);
            spec.fast_path |= fast_path;
            spec.wan = wan.impairment()?;
            // The bridge must outlive this command: it runs as this binary's `wan-bridge`.
            spec.wan_bridge_bin = Some(std::env::current_exe()?);
            let lab = Lab::up(spec)?;
            println!("lab {:?} is up: {nodes} nodes, entry {entry:?}, carrier {}", cli.prefix, lab.spec.carrier);
            if lab.spec.sites > 1 {
                let w = &lab.spec.wan;
                println!(
                    "sites: a = n{:?} (client, router), b = n{:?} (client2, router2); WAN {:?} ± {:?}, loss {}, rate {}",
                    lab.site_nodes(1),
                    lab.site_nodes(2),
                    w.delay,
                    w.jitter,
                    w.loss,
                    w.rate_bps.map_or_else(|| "unlimited".to_owned(), |r| format!("{r} bit/s"))
                );
                println!("try:  just netlab-exec client2 curl -s http://{VIP}/     just netlab-wan stats");
            }
            println!("try:  just netlab-exec client curl -s http://{VIP}/");
            println!("      just netlab-status      just netlab-down");
            lab.keep();
            Ok(())
        }
        Cmd::Wan { action } => {
            let mut lab = Lab::attach(&cli.prefix)?;
            match action {
                WanAction::Set { wan } => lab.set_wan(&wan.impairment()?)?,
                WanAction::Cut => lab.wan_cut()?,
                WanAction::Heal => lab.wan_heal()?,
                WanAction::Stats => {}
            }
            print!("{}", wan_summary(&lab));
            Ok(())
        }
        Cmd::WanBridge { a, b, params, stats, wan } => {
            let bridge = bridge::Bridge { a, b, impairment: wan.impairment()?, params, stats };
            let taps = bridge::open_taps(&bridge.a, &bridge.b)?;
            // Runs until killed (the lab's teardown); its TAP devices go with it.
            bridge::run(&taps, &bridge, &std::sync::atomic::AtomicBool::new(false))
        }
        Cmd::Down => down(&cli.prefix),
        Cmd::Adversary { pki, name, addr, port, seed, victim, attack, seconds } => {
            let Some((seed_name, seed_addr)) = seed.split_once('@') else {
                bail!("--seed: expected name@address:port")
            };
            let options = adversary::Options {
                pki,
                name,
                addr,
                port,
                seed: (seed_name.to_owned(), seed_addr.parse()?),
                victim,
                attack,
                seconds,
            };
            // A line on stdin, or its end, stops a forgery early (a flood runs its course).
            let (stop_tx, stop) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                let _ = stop_tx.send(());
            });
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            println!("{}", rt.block_on(adversary::run(options, stop))?);
            Ok(())
        }
        Cmd::Exec { node, cmd } => {
            let status =
                Command::new("ip").args(["netns", "exec", &namespace(&cli.prefix, &node)?]).args(&cmd).status()?;
            if !status.success() {
                bail!("{cmd:?} exited with {status}");
            }
            Ok(())
        }
        Cmd::Status => {
            let lab = Lab::attach(&cli.prefix)?;
            for i in 1..=lab.spec.nodes {
                match lab.ringlb(i, "status") {
                    Ok(s) => println!("{s}"),
                    Err(e) => println!("n{i}: not answering ({e:#})\n"),
                }
            }
            print!("{}", edge(&lab));
            if lab.spec.sites > 1 {
                print!("{}", wan_summary(&lab));
            }
            Ok(())
        }
        Cmd::Bench { bin, out, quick, rounds, smoke, scaling } => {
            let bin = std::fs::canonicalize(&bin).map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
            match (smoke, scaling) {
                (Some(floor), _) => bench::smoke(&format!("{}s", cli.prefix), &bin, floor),
                (None, Some(png)) => bench::scaling(&format!("{}x", cli.prefix), &bin, &png, if quick { 3 } else { 8 }),
                (None, None) => bench::run(&format!("{}b", cli.prefix), &bin, &out, quick, rounds),
            }
        }
        Cmd::SoakWan { minutes, bin, out } => {
            let bin = std::fs::canonicalize(&bin).map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
            soak::run(&format!("{}soak", cli.prefix), &bin, minutes, &out)
        }
        Cmd::Profile { load, bin, out, carrier, secs, case } => {
            let bin = std::fs::canonicalize(&bin).map_err(|e| anyhow::anyhow!("{}: {e}", bin.display()))?;
            bench::profile(&format!("{}p", cli.prefix), &bin, &out, load, &carrier, secs, case)
        }
        Cmd::Kill { node } | Cmd::Stop { node } | Cmd::Start { node } if node_index(&node).is_none() => {
            bail!("unknown node {node:?}: use n1, n2, ...")
        }
        Cmd::Kill { node } => {
            Lab::attach(&cli.prefix)?.stop_ringlb(node_index(&node).unwrap_or(0), true)?;
            println!("killed ringlb on {node}");
            Ok(())
        }
        Cmd::Stop { node } => {
            Lab::attach(&cli.prefix)?.stop_ringlb(node_index(&node).unwrap_or(0), false)?;
            println!("stopped ringlb on {node}");
            Ok(())
        }
        Cmd::Start { node } => {
            Lab::attach(&cli.prefix)?.start_ringlb(node_index(&node).unwrap_or(0))?;
            println!("started ringlb on {node}");
            Ok(())
        }
        Cmd::Drain { node, undo } => {
            let i = node_index(&node).with_context(|| format!("unknown node {node:?}: use n1, n2, ..."))?;
            let out = Lab::attach(&cli.prefix)?.ringlb(i, if undo { "undrain" } else { "drain" })?;
            println!("{}", out.trim());
            Ok(())
        }
        Cmd::Chaos => chaos(&Lab::attach(&cli.prefix)?),
        Cmd::Flood { count, from, to, port, sources, pps, ack } => {
            let lab = Lab::attach(&cli.prefix)?;
            let flood = ringlb_netlab::flood::Flood { to, port, sources, count, pps, ack };
            let sent = lab.flood(&from, &flood)?;
            let secs = sent.elapsed.as_secs_f64();
            println!(
                "sent {} packets from {from} to {to}:{port} in {secs:.2} s ({:.0}/s)",
                sent.packets,
                sent.packets as f64 / secs.max(1e-9)
            );
            Ok(())
        }
        Cmd::Demo { requests, site } => {
            let lab = Lab::attach(&cli.prefix)?;
            ensure!((1..=lab.spec.sites).contains(&site), "site {site}: this lab has {} site(s)", lab.spec.sites);
            let client = lab.client_of_site(site);
            let mut tally = std::collections::BTreeMap::<String, usize>::new();
            for k in 1..=requests {
                let url = format!("http://{VIP}/");
                let who = lab
                    .exec(&client, &["curl", "-sS", "--max-time", "10", &url])
                    .map(|s| {
                        let who = s.trim().to_owned();
                        if lab.spec.sites > 1 {
                            format!("{who} (site {})", Lab::site_name(lab.site_of(node_index(&who).unwrap_or(0))))
                        } else {
                            who
                        }
                    })
                    .unwrap_or_else(|e| format!("error: {e:#}"));
                println!("request {k:>2} to {VIP} answered by {who}");
                *tally.entry(who).or_default() += 1;
            }
            println!("answers: {tally:?}");
            Ok(())
        }
    }
}

/// Each node's view of the members, one line per node, e.g. `n1 sees n1=alive n2=alive n3=dead`.
fn views(lab: &Lab) -> String {
    let mut out = String::new();
    for i in 1..=lab.spec.nodes {
        let status = lab.ringlb(i, "status").unwrap_or_default();
        let seen: Vec<String> = status
            .lines()
            .filter(|l| l.starts_with('n') && !l.starts_with("node "))
            .filter_map(|l| {
                let mut w = l.split_whitespace().filter(|w| *w != "*");
                let (name, _addr, state) = (w.next()?, w.next()?, w.next()?);
                Some(format!("{name}={state}"))
            })
            .collect();
        if seen.is_empty() {
            out += &format!("  n{i}: not answering\n");
        } else {
            out += &format!("  n{i} sees {}\n", seen.join(" "));
        }
    }
    out
}

fn requests(lab: &Lab, n: usize) -> String {
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..n {
        let who = lab.curl(&["--max-time", "1", &format!("http://{VIP}/")]).map(|s| s.trim().to_owned());
        *tally.entry(who.unwrap_or_else(|_| "failed".into())).or_default() += 1;
    }
    format!("  {n} new connections to the VIP: {tally:?}\n")
}

/// The WAN's parameters and what each direction did.
fn wan_summary(lab: &Lab) -> String {
    let stats = match lab.wan_stats() {
        Ok(s) => s,
        Err(e) => return format!("  the WAN: {e:#}\n"),
    };
    let w = &stats.impairment;
    let rate = w.rate_bps.map_or_else(|| "unlimited".to_owned(), |r| format!("{r} bit/s (queue {:?})", w.queue));
    let mut out =
        format!("  the WAN: {:?} ± {:?} one way, loss {}, rate {rate}, seed {}\n", w.delay, w.jitter, w.loss, w.seed);
    for (name, d) in [("a→b", &stats.a_to_b), ("b→a", &stats.b_to_a)] {
        out += &format!(
            "    {name}: {} frames, {} forwarded ({} bytes), {} lost, {} queue full, {} refused by the other TAP\n",
            d.frames, d.forwarded, d.bytes, d.lost, d.queue_full, d.send_errors
        );
    }
    out
}

/// How the network reaches the cluster right now: the router's next hops for the VIP (bgp) or
/// the layer-2 owner and the client's ARP entry (l2).
fn edge(lab: &Lab) -> String {
    match lab.spec.entry {
        Entry::Bgp => match lab.entries() {
            Ok(hops) => format!("  the router's next hops for the VIP: {hops:?}\n"),
            Err(e) => format!("  the router's route: {e:#}\n"),
        },
        Entry::L2 => {
            let arp = lab.exec(&lab.client(), &["ip", "neigh", "show", &VIP.to_string()]).unwrap_or_default();
            format!("  layer-2 owner(s) of the VIP: {:?}; the client's ARP entry: {}\n", lab.l2_owners(), arp.trim())
        }
        Entry::Single | Entry::Ecmp => String::new(),
    }
}

/// With `--entry bgp` or `l2`: an entry's daemon dies, the network moves its traffic, and it
/// comes back.
fn entry_chaos(lab: &Lab) -> Result<()> {
    let pause = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
    let victim = match lab.spec.entry {
        Entry::L2 => *lab.l2_owners().first().unwrap_or(&1),
        _ => 1,
    };
    println!("== the edge ({})\n{}{}", lab.spec.entry.name(), edge(lab), requests(lab, 9));
    lab.stop_ringlb(victim, true)?;
    pause(1000);
    println!("== 1 s after kill -9 of ringlb on the entry n{victim}\n{}{}", edge(lab), requests(lab, 9));
    lab.start_ringlb(victim)?;
    let all: Vec<usize> = (1..=lab.spec.nodes).collect();
    lab.wait_converged(&all, lab.spec.nodes, std::time::Duration::from_secs(10))?;
    pause(4000);
    let after = match lab.spec.entry {
        Entry::L2 => "(the VIP stays with its new owner: no preemption)",
        _ => "(it announces the VIP again)",
    };
    println!("== n{victim} restarted {after}\n{}{}", edge(lab), requests(lab, 9));
    Ok(())
}

fn chaos(lab: &Lab) -> Result<()> {
    let pause = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
    let last = lab.spec.nodes;
    if matches!(lab.spec.entry, Entry::Bgp | Entry::L2) {
        entry_chaos(lab)?;
    }
    println!("== before\n{}{}", views(lab), requests(lab, 9));
    lab.stop_ringlb(last, true)?;
    pause(1500);
    println!("== 1.5 s after kill -9 of ringlb on n{last}\n{}{}", views(lab), requests(lab, 9));
    pause(2500);
    println!("== 4 s after the kill\n{}", views(lab));
    lab.start_ringlb(last)?;
    let all: Vec<usize> = (1..=last).collect();
    lab.wait_converged(&all, last, std::time::Duration::from_secs(10))?;
    pause(500);
    println!("== n{last} restarted and rejoined\n{}{}", views(lab), requests(lab, 9));
    let peer = ringlb_netlab::node_addr(last);
    let cut = format!(
        "table inet chaos {{ chain in {{ type filter hook input priority 0; ip saddr {peer} drop; }}; \
         chain out {{ type filter hook output priority 0; ip daddr {peer} drop; }}; }}"
    );
    lab.exec(&lab.node(2), &["nft", &cut])?;
    pause(4000);
    println!("== 4 s into a cut between n2 and n{last} (others still reach both)\n{}{}", views(lab), requests(lab, 9));
    lab.exec(&lab.node(2), &["nft", "delete table inet chaos"])?;
    pause(2000);
    println!("== 2 s after healing\n{}{}", views(lab), requests(lab, 9));
    Ok(())
}
