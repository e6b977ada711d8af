//! The packets-per-second case: 64-byte UDP datagrams over 64 flows from the client, as fast as
//! its kernel takes them, through the path under test to n2, counted where they arrive (n2's IP
//! input, [`Lab::arrivals`]). For a ringlb case, also the entry's side: what its daemon
//! forwarded, the CPU time it spent per forwarded packet, and what the kernel dropped before
//! it read (`ringlb_kernel_dropped_packets_total`).
//!
//! Which cases run it is [`CASES`]; a case's stage calls [`measure`] in its own lab (the direct
//! path and NAT from the baselines' lab, ringlb from its forwarding lab with n3 drained). A new
//! ringlb variant (a kernel fast path, say) is a case in `CASES` of `bench.rs`, a stage that
//! builds its lab and calls `forwarded`, and its key here: the report picks it up.

use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context, Result};
use ringlb_netlab::pps::Blast;
use ringlb_netlab::Lab;

use super::{median, num, Bench};

/// The cases that run it, in the report's order: direct, nftables NAT, ringlb forwarding over udp.
pub(super) const CASES: [char; 3] = ['a', 'f', 'c'];
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
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    forwarded: f64,
    /// CPU time (user and system) of the entry's daemon over the packets it forwarded.
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
    let per_s = |n: u64| n as f64 / blasted.elapsed.as_secs_f64();
    let entry = match entry_before {
        Some(before) => {
            let after = entry_counters(lab)?;
            let forwarded = after.forwarded - before.forwarded;
            Some(Entry {
                forwarded: per_s(forwarded),
                ns_per_packet: (after.cpu_s - before.cpu_s) * 1e9 / forwarded.max(1) as f64,
                tun_queue: after.tun_queue - before.tun_queue,
                carrier_socket: after.carrier_socket - before.carrier_socket,
            })
        }
        None => None,
    };
    Ok(Pps { sent: blasted.per_second(), arrived: per_s(arrived - arrived_before), entry })
}

/// The entry's counters at one moment.
struct Counters {
    forwarded: u64,
    cpu_s: f64,
    tun_queue: u64,
    carrier_socket: u64,
}

fn entry_counters(lab: &Lab) -> Result<Counters> {
    let pid = lab.ringlb_pids(1)?.into_iter().next().context("no ringlb daemon on n1")?;
    let cpu_s = cpu_seconds(&pid)?;
    Ok(Counters {
        forwarded: lab.metric(1, "ringlb_forwarded_packets_total{")?,
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
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
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
                    "; the entry forwarded {:.0}/s at {:.0} ns of CPU each, its TUN queue dropped {}, n2's carrier socket {}",
                    e.forwarded, e.ns_per_packet, e.tun_queue, e.carrier_socket
                )
            });
            eprintln!("bench: ({key}) 64-byte datagrams: sent {:.0}/s, arrived {:.0}/s{entry}", p.sent, p.arrived);
            self.pps.entry(key).or_default().push(p);
        }
    }
}

/// The report's section: each case's medians, and ratios against the direct path and NAT.
pub(super) fn report(b: &Bench, name: impl Fn(char) -> &'static str) -> String {
    let runs = |k: char| b.pps.get(&k).map(Vec::as_slice).unwrap_or_default();
    let med = |k: char, f: &dyn Fn(&Pps) -> Option<f64>| median(runs(k).iter().filter_map(f).collect());
    let arrived = |k: char| med(k, &|p| Some(p.arrived));
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
         figure. Where arrived / sent is 1.00 the path kept up with the sender, and the figure is the \
         sender's ceiling: its own system calls carry each datagram through the router (and NAT) into n2. Medians over \
         the rounds.\n\n\
         | case | sent/s | arrived/s | arrived / sent | / direct (a) | / NAT (f) | entry forwarded/s | entry CPU ns/packet \
         | kernel drops: n1 TUN queue / n2 carrier socket |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        PAYLOAD + 28,
        b.secs
    );
    for k in CASES {
        let ratio = |base: char| num(arrived(k).zip(arrived(base)).map(|(x, y)| x / y), 2);
        let drops = |f: fn(&Entry) -> u64| med(k, &|p: &Pps| p.entry.map(|e| f(&e) as f64));
        let _ = writeln!(
            s,
            "| ({k}) {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            name(k),
            num(med(k, &|p| Some(p.sent)), 0),
            num(arrived(k), 0),
            num(arrived(k).zip(med(k, &|p| Some(p.sent))).map(|(a, s)| a / s), 2),
            ratio('a'),
            ratio('f'),
            num(med(k, &|p| p.entry.map(|e| e.forwarded)), 0),
            num(med(k, &|p| p.entry.map(|e| e.ns_per_packet)), 0),
            match (drops(|e| e.tun_queue), drops(|e| e.carrier_socket)) {
                (Some(t), Some(c)) => format!("{t:.0} / {c:.0}"),
                _ => "–".to_owned(),
            },
        );
    }
    s
}
