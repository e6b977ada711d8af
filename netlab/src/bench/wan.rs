//! The bench's cases across an emulated WAN: two sites of one node each, n1 in site a (its
//! entry, weight 0: it forwards every flow) and n2 in site b, joined by the lab's WAN at
//! [`DELAY`] one way with no jitter, loss or rate limit. iperf3 runs from site a's client:
//! (h) straight to n2 with no ringlb, (i) through the VIP with n1 forwarding to n2 over the
//! plain udp carrier (`seal_between_sites = false`), (j) the same, sealed (the default between
//! sites).
//!
//! The WAN bridge is a user-space thread of this process that reads and writes every
//! wire-sized frame on its own, on the same two cores as everything else, so it may be what
//! limits all three cases. Each iperf3 run therefore records the bridge's CPU and the
//! machine's, and the report says when the bridge was the bottleneck.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context, Result};
use ringlb_netlab::wan::bridge::Stats;
use ringlb_netlab::wan::Impairment;
use ringlb_netlab::{node_addr, Lab, VIP};

use super::{iperf, median, num, wait_sealing, Bench, Row, IPERF_PORT};

pub(super) const CASES: [(char, &str); 3] = [
    ('h', "direct across the WAN, client a → n2, no balancer"),
    ('i', "ringlb across the WAN, n1 (site a) forwards to n2 (site b), plain"),
    ('j', "ringlb across the WAN, n1 (site a) forwards to n2 (site b), sealed"),
];
/// The cases' keys, as the bench names a stage.
pub(super) const KEYS: &str = "h, i, j";
/// One way: a modest WAN. The bridge is CPU bound long before a longer one would limit TCP.
const DELAY: Duration = Duration::from_millis(5);
/// A bridge thread at this share of a core or more is taken as saturated.
const BRIDGE_BUSY: f64 = 0.7;
/// A machine at this share of its cores or more is taken as saturated.
const MACHINE_BUSY: f64 = 0.9;
/// The bridge's thread (see `ringlb_netlab::wan::bridge::BridgeThread::spawn`).
const BRIDGE_THREAD: &str = "wan-bridge";

/// What the WAN cases saw besides throughput.
#[derive(Debug, Default)]
pub(super) struct Observed {
    /// Per case and direction (`true`: download), one sample per round.
    cpu: BTreeMap<(char, bool), Vec<Cpu>>,
    /// Per case, the WAN bridge's counters at the end of each round's lab.
    stats: BTreeMap<char, Vec<Stats>>,
}

/// CPU while iperf3 ran.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    /// The WAN bridge's thread, in cores (1.0: one core, the most one thread gets).
    bridge: f64,
    /// The whole machine, as a share of all its cores (1.0: every core busy).
    machine: f64,
}

/// CPU counters at one instant, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct Ticks {
    bridge: u64,
    machine_busy: u64,
    machine_total: u64,
}

impl Ticks {
    fn now() -> Result<Ticks> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        // cpu  user nice system idle iowait irq softirq steal ...
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .context("/proc/stat is empty")?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let total: u64 = cpu.iter().sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        let bridge = bridge_ticks().with_context(|| format!("no thread {BRIDGE_THREAD:?} in this process"))?;
        Ok(Ticks { bridge, machine_busy: total - idle, machine_total: total })
    }

    /// The CPU used between `self` and `later`.
    fn until(self, later: Ticks) -> Cpu {
        let total = later.machine_total.saturating_sub(self.machine_total).max(1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // /proc/stat and a thread's stat count the same ticks; the machine's are all cores'.
        Cpu {
            bridge: later.bridge.saturating_sub(self.bridge) as f64 * cores / total,
            machine: later.machine_busy.saturating_sub(self.machine_busy) as f64 / total,
        }
    }
}

/// User and system ticks of this process's WAN bridge thread.
fn bridge_ticks() -> Option<u64> {
    fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|task| {
        let dir = task.path();
        if fs::read_to_string(dir.join("comm")).ok()?.trim() != BRIDGE_THREAD {
            return None;
        }
        let stat = fs::read_to_string(dir.join("stat")).ok()?;
        // After "pid (comm)": state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    })
}

/// One round of (h), (i) and (j), each in a lab of its own.
pub(super) fn stage(b: &mut Bench, prefix: &str, bin: &Path) -> Result<()> {
    for (key, _) in CASES {
        if let Err(e) = case(b, &format!("{prefix}{key}"), bin, key) {
            b.problem(format!("({key}): {e:#}"));
        }
    }
    Ok(())
}

fn case(b: &mut Bench, prefix: &str, bin: &Path, key: char) -> Result<()> {
    let lab = super::lab(prefix, bin, |s| {
        s.nodes = 2;
        s.sites = 2;
        s.wan = Impairment::delay_only(DELAY);
        s.weights = vec![0.0, 1.0];
        s.fast_path = false; // the WAN cases measure the TUN path, whatever NETLAB_FAST_PATH says
        match key {
            'h' => s.start_ringlb = false,
            'i' => s.carrier_options = "seal_between_sites = false".into(),
            _ => {}
        }
    })?;
    if key == 'j' {
        wait_sealing(&lab, 1, 1)?;
    }
    let host = if key == 'h' { node_addr(2) } else { VIP }.to_string();
    for reverse in [false, true] {
        let what = if reverse { "iperf3 download" } else { "iperf3 upload" };
        let measured = b.keep(key, what, measure(&lab, &host, reverse, b.secs));
        let Some((gbits, cpu)) = measured else { continue };
        eprintln!(
            "bench: ({key}) {what} {gbits:.2} Gbit/s; WAN bridge {:.2} cores, machine {:.0} % busy",
            cpu.bridge,
            cpu.machine * 100.0
        );
        let row = b.samples.entry(key).or_default();
        if reverse { &mut row.down } else { &mut row.up }.push(gbits);
        b.wan.cpu.entry((key, reverse)).or_default().push(cpu);
    }
    let stats = lab.wan_stats()?;
    b.wan.stats.entry(key).or_default().push(stats);
    if key != 'h' {
        b.count_carrier(key, &lab)?;
    }
    Ok(())
}

/// One iperf3 run, and the CPU used in its middle (from 1 s in to 1 s before its end, so that
/// neither the connection's setup nor its report counts).
fn measure(lab: &Lab, host: &str, reverse: bool, secs: u32) -> Result<(f64, Cpu)> {
    std::thread::scope(|scope| {
        let run = scope.spawn(|| iperf(lab, host, IPERF_PORT, reverse, secs));
        sleep(Duration::from_secs(1));
        let before = Ticks::now();
        sleep(Duration::from_secs(u64::from(secs.saturating_sub(2).max(1))));
        let cpu = before.and_then(|b| Ok(b.until(Ticks::now()?)));
        let gbits = run.join().map_err(|_| anyhow::anyhow!("the iperf3 thread panicked"))??;
        Ok((gbits, cpu?))
    })
}

/// The WAN section of the report.
pub(super) fn report<'a>(b: &Bench, row: impl Fn(char) -> &'a Row) -> String {
    let cpu = |key: char, reverse: bool, f: fn(&Cpu) -> f64| {
        let v = b.wan.cpu.get(&(key, reverse)).map(|v| v.iter().map(f).collect()).unwrap_or_default();
        median(v)
    };
    let mut s = format!(
        "\n## Across an emulated WAN\n\nTwo sites of one node each, joined by the lab's WAN: {} ms one way \
         (a {} ms round trip), no jitter, no loss, no rate limit. The entry n1 (site a) has weight 0, so it forwards \
         every flow across the WAN to n2 (site b), and n2's replies cross the WAN back to the client directly. \
         iperf3 runs from site a's client, one stream for {} s; medians over the rounds. The WAN bridge is one \
         user-space thread that carries every wire-sized frame on its own: its CPU is given in cores (1.00 is one \
         core, all one thread can get), the machine's as a share of both cores, each measured in the middle of the \
         iperf3 run.\n\n\
         | case | upload Gbit/s | download Gbit/s | WAN bridge, cores: upload / download | machine busy: upload / download |\n\
         |---|--:|--:|--:|--:|\n",
        DELAY.as_millis(),
        2 * DELAY.as_millis(),
        b.secs
    );
    let pct = |v: Option<f64>| v.map_or("–".into(), |v| format!("{:.0} %", v * 100.0));
    for (k, name) in CASES {
        let r = row(k);
        let _ = writeln!(
            s,
            "| ({k}) {name} | {} | {} | {} / {} | {} / {} |",
            num(r.up, 2),
            num(r.down, 2),
            num(cpu(k, false, |c| c.bridge), 2),
            num(cpu(k, true, |c| c.bridge), 2),
            pct(cpu(k, false, |c| c.machine)),
            pct(cpu(k, true, |c| c.machine)),
        );
    }
    s.push_str("\n| case / baseline | upload | download |\n|---|--:|--:|\n");
    for (x, y) in [('i', 'h'), ('j', 'h'), ('j', 'i')] {
        let ratio = |f: fn(&Row) -> Option<f64>| num(f(row(x)).zip(f(row(y))).map(|(a, b)| a / b), 2);
        let _ = writeln!(s, "| ({x}) / ({y}) | {} | {} |", ratio(|r| r.up), ratio(|r| r.down));
    }
    // What the bridge itself did: a refused write or a full queue is a loss TCP reacts to.
    let mut counters = Vec::new();
    for (k, _) in CASES {
        let Some(all) = b.wan.stats.get(&k) else { continue };
        let sum = |f: fn(&Stats) -> u64| all.iter().map(f).sum::<u64>();
        let frames = sum(|s| s.a_to_b.frames + s.b_to_a.frames);
        let dropped = sum(|s| [s.a_to_b, s.b_to_a].iter().map(|d| d.lost + d.queue_full + d.send_errors).sum::<u64>());
        let largest = all.iter().map(|s| s.a_to_b.max_frame.max(s.b_to_a.max_frame)).max().unwrap_or(0);
        counters.push(format!("({k}) {frames} frames, {dropped} dropped, the largest {largest} bytes"));
    }
    let _ = writeln!(s, "\nThe WAN bridge's counters over all rounds: {}.", counters.join("; "));
    // What limited each run, from the CPU figures: a busy machine, or a busy bridge thread on a
    // machine with room to spare (the direct path tells the bridge's ceiling apart from ringlb's).
    let (mut machine, mut bridge, mut neither) = (Vec::new(), Vec::new(), Vec::new());
    for (k, reverse) in CASES.iter().flat_map(|&(k, _)| [(k, false), (k, true)]) {
        let (Some(b), Some(m)) = (cpu(k, reverse, |c| c.bridge), cpu(k, reverse, |c| c.machine)) else { continue };
        let run = format!("({k}) {}", if reverse { "download" } else { "upload" });
        match (m >= MACHINE_BUSY, b >= BRIDGE_BUSY) {
            (true, _) => machine.push(run),
            (false, true) => bridge.push(run),
            (false, false) => neither.push(format!("{run} (bridge {b:.2}, machine {:.0} %)", m * 100.0)),
        }
    }
    let mut verdict = Vec::new();
    if !bridge.is_empty() {
        verdict.push(format!(
            "Bound by the WAN bridge, likely: {}. There its one thread used {BRIDGE_BUSY} of a core or more (it \
             sleeps between bursts of frames, so it tops out below 1.00) while the machine had more than {:.0} % \
             left, and the direct path across the WAN (h), with no ringlb in it, carried {} Gbit/s upload against \
             {} on the LAN (a). The bridge, not ringlb, then sets the throughput, and a ratio between these cases \
             says little about ringlb.",
            bridge.join(", "),
            (1.0 - MACHINE_BUSY) * 100.0,
            num(row('h').up, 2),
            num(row('a').up, 2),
        ));
    }
    if !machine.is_empty() {
        verdict.push(format!(
            "Bound by the machine (both cores {:.0} % busy or more): {}.",
            MACHINE_BUSY * 100.0,
            machine.join(", ")
        ));
    }
    if !neither.is_empty() {
        verdict.push(format!(
            "Bound by neither, so by something else, such as lost packets (see the drops under Notes): {}.",
            neither.join(", ")
        ));
    }
    if !verdict.is_empty() {
        let _ = writeln!(s, "\n{}", verdict.join(" "));
    }
    s
}
