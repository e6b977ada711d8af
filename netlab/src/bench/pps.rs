//! The packets-per-second case: 64-byte UDP datagrams over 64 flows from the client, as fast as
//! its kernel takes them, through the path under test to n2, counted where they arrive (n2's IP
//! input, [`Lab::arrivals`]). For a ringlb case, also the entry's side: what its daemon
//! forwarded, the CPU time it spent per forwarded packet, and what the kernel dropped before
//! it read (`ringlb_kernel_dropped_packets_total`).
//!
//! Which cases run it is [`CASES`]; a case's stage calls [`measure`] in its own lab (the direct
//! path and NAT from the baselines' lab, ringlb from its forwarding lab with n3 drained). A new
//! ringlb variant is a case in `CASES` of `bench.rs`, a stage that builds its lab and calls
//! `forwarded`, and its key here: the report picks it up. The kernel fast path's case (l) is one.
//!
//! With the fast path, the entry's daemon sees only each flow's first datagrams: the rest are
//! encapsulated by the tc program in the softirq that receives them, which no process is
//! charged for in a way this bench can tell apart (see [`report`]). So beside the daemon's CPU
//! per packet, every case also gives the whole machine's CPU time per arrived packet.

use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context, Result};
use ringlb_netlab::pps::Blast;
use ringlb_netlab::Lab;

use super::{median, num, Bench};

/// The cases that run it, in the report's order: direct, nftables NAT, ringlb forwarding over
/// udp without and with the kernel fast path.
pub(super) const CASES: [char; 4] = ['a', 'f', 'c', 'l'];
/// The cases among them that run the kernel fast path.
const FAST_PATH: [char; 1] = ['l'];
/// The port the datagrams go to (n2 counts and drops them in its input hook).
pub(super) const PORT: u16 = 5204;
const FLOWS: usize = 64;
const PAYLOAD: usize = 64;

/// One run's figures, per second of the sender's run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pps {
    sent: f64,
    arrived: f64,
    /// The ringlb entry's side, in a ringlb case.
    entry: Option<Entry>,
    /// The whole machine's CPU time (both cores, everything not idle) and its softirq part, in
    /// ns per arrived datagram: sender, router, the path under test and the counting receiver.
    machine_ns: f64,
    softirq_ns: f64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Forwarded by the daemon, and by the kernel fast path (0 without it), per second.
    forwarded: f64,
    fast_path: f64,
    /// CPU time (user and system) of the entry's daemon over the packets forwarded (by it and
    /// by the fast path).
    ns_per_packet: f64,
    tun_queue: u64,
    carrier_socket: u64,
}

/// Installs the arrival counter on n2 (once per lab).
pub(super) fn prepare(lab: &Lab) -> Result<()> {
    lab.count_arrivals(2, PORT)
}

/// One run of `secs` to `to`; with `ringlb`, n1's daemon is the entry measured.
pub(super) fn measure(lab: &Lab, to: SocketAddrV4, secs: u32, ringlb: bool) -> Result<Pps> {
    let entry_before = ringlb.then(|| entry_counters(lab)).transpose()?;
    let arrived_before = lab.arrivals(2, PAYLOAD)?;
    let machine_before = MachineTicks::now()?;
    let blast = Blast { flows: FLOWS, payload: PAYLOAD, ..Blast::small(to, Duration::from_secs(secs.into())) };
    let blasted = lab.blast("client", &blast)?;
    // What is still queued arrives within moments: wait until the count stands still.
    let mut arrived = lab.arrivals(2, PAYLOAD)?;
    loop {
        sleep(Duration::from_millis(200));
        let now = lab.arrivals(2, PAYLOAD)?;
        if now == arrived {
            break;
        }
        arrived = now;
    }
    let machine = MachineTicks::now()?.since(machine_before);
    let per_s = |n: u64| n as f64 / blasted.elapsed.as_secs_f64();
    let entry = match entry_before {
        Some(before) => {
            let after = entry_counters(lab)?;
            let forwarded = after.forwarded - before.forwarded;
            let fast_path = after.fast_path - before.fast_path;
            Some(Entry {
                forwarded: per_s(forwarded),
                fast_path: per_s(fast_path),
                ns_per_packet: (after.cpu_s - before.cpu_s) * 1e9 / (forwarded + fast_path).max(1) as f64,
                tun_queue: after.tun_queue - before.tun_queue,
                carrier_socket: after.carrier_socket - before.carrier_socket,
            })
        }
        None => None,
    };
    let arrived = arrived - arrived_before;
    let each = arrived.max(1) as f64;
    Ok(Pps {
        sent: blasted.per_second(),
        arrived: per_s(arrived),
        entry,
        machine_ns: machine.busy_s * 1e9 / each,
        softirq_ns: machine.softirq_s * 1e9 / each,
    })
}

/// The machine's CPU counters (`/proc/stat`, all CPUs), in seconds.
#[derive(Debug, Clone, Copy)]
struct MachineTicks {
    busy_s: f64,
    softirq_s: f64,
}

impl MachineTicks {
    fn now() -> Result<MachineTicks> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        // cpu  user nice system idle iowait irq softirq steal ...
        let f: Vec<u64> = stat
            .lines()
            .next()
            .context("/proc/stat is empty")?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| f.get(i).copied().unwrap_or(0);
        let busy = f.iter().sum::<u64>() - field(3) - field(4);
        let hz = clock_ticks();
        Ok(MachineTicks { busy_s: busy as f64 / hz, softirq_s: field(6) as f64 / hz })
    }

    fn since(self, before: MachineTicks) -> MachineTicks {
        MachineTicks { busy_s: self.busy_s - before.busy_s, softirq_s: self.softirq_s - before.softirq_s }
    }
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// The entry's counters at one moment.
struct Counters {
    forwarded: u64,
    fast_path: u64,
    cpu_s: f64,
    tun_queue: u64,
    carrier_socket: u64,
}

fn entry_counters(lab: &Lab) -> Result<Counters> {
    let pid = lab.ringlb_pids(1)?.into_iter().next().context("no ringlb daemon on n1")?;
    let cpu_s = cpu_seconds(&pid)?;
    Ok(Counters {
        forwarded: lab.metric(1, "ringlb_forwarded_packets_total{")?,
        fast_path: lab.metric(1, "ringlb_fast_path_packets_total{node=\"n1\",action=\"forwarded\"}")?,
        cpu_s,
        tun_queue: lab.metric(1, "ringlb_kernel_dropped_packets_total{node=\"n1\",where=\"tun_queue\"}")?,
        carrier_socket: lab.metric(2, "ringlb_kernel_dropped_packets_total{node=\"n2\",where=\"carrier_socket\"}")?,
    })
}

/// User and system CPU time of process `pid` so far (`/proc/PID/stat` utime + stime).
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).context("/proc/PID/stat too short");
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks())
}

/// `just bench-smoke`'s floor for forwarded datagrams over the direct path's: far below what
/// ringlb does (about 0.5 on a quiet machine), so only a collapse fails it.
pub(super) const SMOKE_FLOOR: f64 = 0.1;

/// `just bench-smoke`'s check, in its lab (n1 forwarding everything to n2): 2 s direct, then 2 s
/// through the VIP, up to three tries.
pub(super) fn smoke(lab: &Lab) -> Result<()> {
    prepare(lab)?;
    super::smoke_tries("forwarded datagrams / direct", SMOKE_FLOOR, |_| {
        let direct = measure(lab, SocketAddrV4::new(ringlb_netlab::node_addr(2), PORT), 2, false)?;
        let forwarded = measure(lab, SocketAddrV4::new(ringlb_netlab::VIP, PORT), 2, true)?;
        let ns = forwarded.entry.map_or(0.0, |e| e.ns_per_packet);
        eprintln!(
            "bench smoke: 64-byte datagrams arrived direct {:.0}/s, forwarded over udp {:.0}/s ({ns:.0} ns of the entry's CPU each)",
            direct.arrived, forwarded.arrived
        );
        Ok((forwarded.arrived, forwarded.arrived / direct.arrived.max(1.0)))
    })
    .map(drop)
}

impl Bench {
    /// Runs the case `key` in `lab` and keeps its figures; a failure is a problem of the run.
    pub(super) fn pps(&mut self, key: char, lab: &Lab, to: SocketAddrV4, ringlb: bool) {
        let r = prepare(lab).and_then(|()| measure(lab, to, self.secs, ringlb));
        if let Some(p) = self.keep(key, "packets per second", r) {
            let entry = p.entry.map_or(String::new(), |e| {
                format!(
                    "; the entry's daemon forwarded {:.0}/s and its fast path {:.0}/s at {:.0} ns of the daemon's CPU each, \
                     its TUN queue dropped {}, n2's carrier socket {}",
                    e.forwarded, e.fast_path, e.ns_per_packet, e.tun_queue, e.carrier_socket
                )
            });
            eprintln!(
                "bench: ({key}) 64-byte datagrams: sent {:.0}/s, arrived {:.0}/s, machine {:.0} ns per arrival{entry}",
                p.sent, p.arrived, p.machine_ns
            );
            self.pps.entry(key).or_default().push(p);
        }
    }
}

/// The report's section: each case's medians, and ratios against the direct path and NAT.
pub(super) fn report(b: &Bench, name: impl Fn(char) -> &'static str) -> String {
    let med = |k: char, f: &dyn Fn(&Pps) -> Option<f64>| med(b, k, f);
    let arrived = |k: char| arrived(b, k);
    let mut s = format!(
        "\n## Packets per second\n\n{PAYLOAD}-byte UDP datagrams ({}-byte IP packets) over {FLOWS} flows (source ports) \
         from the client for {} s, as fast as its kernel takes them (`sendmmsg`), through the path to n2, counted where \
         they arrive: by an nftables counter in n2's input hook, which then drops them (no app competes for the CPU; \
         datagrams coalesced by n2's ringlb are counted one by one). For ringlb (n1 forwarding everything to n2, n3 \
         drained), the entry's side: packets its daemon forwarded (`ringlb_forwarded_packets_total`), the CPU time it \
         spent per forwarded packet (user + system time from `/proc/PID/stat` over the run, divided by those packets; \
         on this lab's veth pairs it includes the kernel's work of receiving each carrier datagram in n2's \
         namespace, which runs inside the entry's send and is charged to it (tick-based CPU accounting, no separate \
         softirq time), so it overstates what the entry alone costs), \
         and what the kernel dropped before a daemon read it (`ringlb_kernel_dropped_packets_total`: n1's TUN queue, \
         n2's carrier socket). nftables NAT works in the kernel's softirqs, charged to whichever process they interrupt: no CPU \
         figure of its own. With the kernel fast path (l) the entry's daemon sees only each flow's first datagrams \
         (`entry forwarded/s` is the daemon's, `fast path/s` the tc program's, `ringlb_fast_path_packets_total`), \
         and its CPU per packet is the daemon's CPU over both: the program's work runs in the softirq that receives \
         each datagram and is not attributed to the daemon, so that figure is not what the entry costs. The machine \
         column is what every case can be compared by: the CPU time of both cores (all but idle, from `/proc/stat`) \
         over the run, divided by the datagrams that arrived, with its softirq part (tick-based: softirq work run \
         on the way out of a system call is charged to that call, not to softirq). It covers the sender, the router, \
         the path under test and n2's counting. Where arrived / sent is 1.00 the path kept up with the sender, and the figure is the \
         sender's ceiling: its own system calls carry each datagram through the router (and NAT) into n2. Medians over \
         the rounds.\n\n\
         | case | sent/s | arrived/s | arrived / sent | / direct (a) | / NAT (f) | entry forwarded/s: daemon / fast path \
         | entry daemon CPU ns/packet | machine CPU ns/arrival (softirq) \
         | kernel drops: n1 TUN queue / n2 carrier socket |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        PAYLOAD + 28,
        b.secs
    );
    for k in CASES {
        let ratio = |base: char| num(arrived(k).zip(arrived(base)).map(|(x, y)| x / y), 2);
        let drops = |f: fn(&Entry) -> u64| med(k, &|p: &Pps| p.entry.map(|e| f(&e) as f64));
        let _ = writeln!(
            s,
            "| ({k}) {}{} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} |",
            name(k),
            if fast_path_invalid(b, k).is_some() { " **invalid**" } else { "" },
            num(med(k, &|p| Some(p.sent)), 0),
            num(arrived(k), 0),
            num(arrived(k).zip(med(k, &|p| Some(p.sent))).map(|(a, s)| a / s), 2),
            ratio('a'),
            ratio('f'),
            match (med(k, &|p| p.entry.map(|e| e.forwarded)), med(k, &|p| p.entry.map(|e| e.fast_path))) {
                (Some(d), Some(f)) => format!("{d:.0} / {f:.0}"),
                _ => "–".to_owned(),
            },
            num(med(k, &|p| p.entry.map(|e| e.ns_per_packet)), 0),
            num(med(k, &|p| Some(p.machine_ns)), 0),
            num(med(k, &|p| Some(p.softirq_ns)), 0),
            match (drops(|e| e.tun_queue), drops(|e| e.carrier_socket)) {
                (Some(t), Some(c)) => format!("{t:.0} / {c:.0}"),
                _ => "–".to_owned(),
            },
        );
    }
    s
}

fn med(b: &Bench, k: char, f: &dyn Fn(&Pps) -> Option<f64>) -> Option<f64> {
    median(b.pps.get(&k).map(Vec::as_slice).unwrap_or_default().iter().filter_map(f).collect())
}

/// Case `k`'s datagrams arrived per second (median over the rounds).
pub(super) fn arrived(b: &Bench, k: char) -> Option<f64> {
    med(b, k, &|p| Some(p.arrived))
}

/// Why a fast-path case's datagrams do not count as carried by the fast path (a run where the
/// tc program forwarded less than [`super::fast_path::MIN_SHARE`] of what the entry forwarded).
pub(super) fn fast_path_invalid(b: &Bench, k: char) -> Option<String> {
    if !FAST_PATH.contains(&k) {
        return None;
    }
    let runs = b.pps.get(&k)?;
    runs.iter().enumerate().find_map(|(n, p)| {
        let e = p.entry?;
        let share = e.fast_path / (e.fast_path + e.forwarded).max(1.0);
        (share < super::fast_path::MIN_SHARE).then(|| {
            format!(
                "datagrams, round {}: the fast path forwarded {:.0} % of what the entry forwarded",
                n + 1,
                share * 100.0
            )
        })
    })
}

/// Issue 11's per-packet cost on the entry, for the fast-path report: the daemon's CPU per
/// packet with and without the fast path, and the whole machine's beside NAT's.
pub(super) fn entry_cost(b: &Bench) -> String {
    let ns = |k: char| med(b, k, &|p| p.entry.map(|e| e.ns_per_packet));
    let machine = |k: char| med(b, k, &|p| Some(p.machine_ns));
    format!(
        "\nPer-packet CPU on the entry, 64-byte datagrams (medians; see \"Packets per second\" below): the entry's \
         daemon spent {} ns of CPU per forwarded datagram with the fast path (l), {} ns without it (c). With the fast \
         path that is nearly nothing because the daemon no longer touches settled flows' packets: the tc program's \
         work runs in the kernel's softirq, which is not attributed to any process in a way this bench can separate, \
         so the entry's own cost per packet is not measured here. The whole machine's CPU per arrived datagram \
         (sender, router, path, receiver, both cores) bounds it from above: {} ns with the fast path (l), {} ns \
         through the daemon (c), {} ns through nftables NAT (f), {} ns direct (a).\n",
        num(ns('l'), 0),
        num(ns('c'), 0),
        num(machine('l'), 0),
        num(machine('c'), 0),
        num(machine('f'), 0),
        num(machine('a'), 0),
    )
}
