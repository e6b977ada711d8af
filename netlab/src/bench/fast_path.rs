//! The kernel fast path's cases (issue 11): (k), (l) and (m) are (b), (c) and (d) with
//! `[fast_path] enabled = true` on every node, in labs of their own. Each stage ends with a
//! check that the fast path really carried the traffic ([`Bench::check_fast_path`]); a case
//! where it did not in some round is marked invalid in the report, since its figures would be
//! the TUN path's under another name. [`report`] puts the ratios beside the goals.

use std::fmt::Write as _;

use anyhow::Result;
use ringlb_netlab::Lab;

use super::{against, median, num, pps, Bench, Goal, Row};

/// Each fast-path case and the TUN-path case it mirrors.
pub(super) const MIRRORS: [(char, char); 3] = [('k', 'b'), ('l', 'c'), ('m', 'd')];
/// Below this share of the entry's packets (or the servers'), the fast path did not carry the
/// case: "most of the packets" in the brief's words. A settled TCP flow's packets all take it
/// (only the handshake and FIN/RST go to the daemon), so a working fast path is near 1.
pub(super) const MIN_SHARE: f64 = 0.5;

/// What carried a fast-path case's packets over one round's lab (every load of the stage).
/// Packets are counted as each path sees them: a GSO super-packet is one packet for the
/// daemon (one TUN read) and one for the program (one skb).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Carried {
    /// Every node's daemon said `ringlb_fast_path_enabled 1` (none fell back to the TUN path).
    pub enabled: bool,
    /// The entry n1: packets the program delivered locally or forwarded, and those its daemon did.
    pub entry_fast: u64,
    pub entry_daemon: u64,
    /// n2 and n3: carrier packets the program decapsulated, and those their daemons did.
    pub served_fast: u64,
    pub served_daemon: u64,
}

fn share(fast: u64, daemon: u64) -> Option<f64> {
    (fast + daemon > 0).then(|| fast as f64 / (fast + daemon) as f64)
}

impl Carried {
    pub(super) fn entry_share(&self) -> Option<f64> {
        share(self.entry_fast, self.entry_daemon)
    }

    pub(super) fn served_share(&self) -> Option<f64> {
        share(self.served_fast, self.served_daemon)
    }

    /// Why this round does not count as a fast-path measurement, if it does not.
    fn invalid(&self) -> Option<String> {
        if !self.enabled {
            return Some("a daemon ran without the fast path (ringlb_fast_path_enabled 0)".into());
        }
        let low = |s: Option<f64>| s.is_none_or(|s| s < MIN_SHARE);
        if low(self.entry_share()) {
            return Some(format!(
                "the fast path carried {} of the entry's {} packets",
                self.entry_fast,
                self.entry_fast + self.entry_daemon
            ));
        }
        // A locally served case has no carrier packets: nothing to check on n2 and n3.
        if self.served_fast + self.served_daemon > 0 && low(self.served_share()) {
            return Some(format!(
                "the fast path decapsulated {} of the servers' {} carrier packets",
                self.served_fast,
                self.served_fast + self.served_daemon
            ));
        }
        None
    }
}

fn counters(lab: &Lab, local: bool) -> Result<Carried> {
    let mut c = Carried { enabled: true, ..Carried::default() };
    for i in 1..=lab.spec.nodes {
        let m = lab.metrics(i)?;
        let get = |needle: &str| {
            m.lines()
                .filter(|l| l.starts_with(needle))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        c.enabled &= get(&format!("ringlb_fast_path_enabled{{node=\"n{i}\"}}")) == 1;
        let fast = |action: &str| get(&format!("ringlb_fast_path_packets_total{{node=\"n{i}\",action=\"{action}\"}}"));
        if i == 1 {
            (c.entry_fast, c.entry_daemon) = if local {
                (fast("local"), get("ringlb_delivered_local_packets_total{"))
            } else {
                (fast("forwarded"), get("ringlb_forwarded_packets_total{"))
            };
        } else {
            c.served_fast += fast("decapsulated");
            c.served_daemon += get("ringlb_decapsulated_packets_total{");
        }
    }
    Ok(c)
}

impl Bench {
    /// After a fast-path stage: what carried its packets; a round where the fast path did not
    /// carry most of them is a problem of the run and makes the case invalid.
    pub(super) fn check_fast_path(&mut self, key: char, lab: &Lab, local: bool) -> Result<()> {
        let c = counters(lab, local)?;
        eprintln!(
            "bench: ({key}) fast path carried {} of the entry's packets, {} of the servers' carrier packets",
            num(c.entry_share(), 3),
            num(c.served_share(), 3)
        );
        if let Some(why) = c.invalid() {
            self.problem(format!("({key}) invalid: {why}"));
        }
        self.carried.entry(key).or_default().push(c);
        Ok(())
    }

    /// Why case `key` is invalid (a round where the fast path did not carry it), if it is.
    pub(super) fn fast_path_invalid(&self, key: char) -> Option<String> {
        let rounds = self.carried.get(&key);
        if rounds.is_none_or(Vec::is_empty) && MIRRORS.iter().any(|m| m.0 == key) {
            return Some("not checked".into());
        }
        let why = rounds?.iter().enumerate().find_map(|(n, c)| c.invalid().map(|w| format!("round {}: {w}", n + 1)));
        why.or_else(|| pps::fast_path_invalid(self, key))
    }
}

/// The report's section: how much of each case the fast path carried, and issue 11's goals.
pub(super) fn report<'a>(b: &Bench, row: impl Fn(char) -> &'a Row) -> String {
    use Goal::{AtLeast, AtMost, Report};
    let mut s = format!(
        "\n## Targets (issue 11): the kernel fast path\n\n\
         (k), (l) and (m) are (b), (c) and (d) with `[fast_path] enabled = true` on every node, in labs of \
         their own, in the same rounds. The tc program carries a forwarded connection from its SYN on at \
         the entry, and a connection served here once its handshake is done; every SYN, those handshakes \
         and whatever the program leaves to it still cross the daemons. First, what carried \
         each case, over every load of its lab (`ringlb_fast_path_packets_total` against the daemons' \
         `ringlb_delivered_local_packets_total`, `ringlb_forwarded_packets_total` and \
         `ringlb_decapsulated_packets_total`; a GSO super-packet counts once on either path): below {:.0} % \
         in any round, or a daemon that fell back to the TUN path, makes the case invalid.\n\n\
         | case | entry: share by the fast path (median; lowest round) | servers n2, n3: share decapsulated by the fast path | valid |\n\
         |---|--:|--:|---|\n",
        MIN_SHARE * 100.0
    );
    let name = |k: char| super::CASES.iter().find(|c| c.0 == k).map_or("?", |c| c.1);
    for (k, _) in MIRRORS {
        let rounds = b.carried.get(&k).map(Vec::as_slice).unwrap_or_default();
        let cell = |f: fn(&Carried) -> Option<f64>| {
            let v: Vec<f64> = rounds.iter().filter_map(f).collect();
            let lo = v.iter().copied().reduce(f64::min);
            match median(v) {
                Some(m) => format!("{:.1} %; {:.1} %", m * 100.0, lo.unwrap_or(m) * 100.0),
                None => "–".into(),
            }
        };
        let valid = b.fast_path_invalid(k).map_or("yes".to_owned(), |w| format!("**no**: {w}"));
        let _ = writeln!(
            s,
            "| ({k}) {} | {} | {} | {valid} |",
            name(k),
            cell(Carried::entry_share),
            cell(Carried::served_share)
        );
    }
    type Figure = fn(&Row) -> Option<f64>;
    let up: Figure = |r| r.up;
    let down: Figure = |r| r.down;
    let ka: Figure = |r| r.keep_alive.map(|w| w.rps);
    let close: Figure = |r| r.close.map(|w| w.rps);
    let p99: Figure = |r| r.keep_alive.map(|w| w.p99);
    // (figure, case, its TUN-path mirror, goals against direct (a), HAProxy (e), nftables NAT (f))
    let lines: [(&str, char, char, Figure, [Goal; 3]); 10] = [
        ("upload (iperf3), forwarded over udp", 'l', 'c', up, [AtLeast(0.85), AtLeast(1.5), AtLeast(1.15)]),
        ("download (iperf3 -R), forwarded over udp", 'l', 'c', down, [AtLeast(0.95), AtLeast(1.5), AtLeast(1.15)]),
        ("new connections/s, forwarded over udp", 'l', 'c', close, [AtLeast(0.7), AtLeast(1.5), AtLeast(1.15)]),
        ("keep-alive requests/s, forwarded over udp", 'l', 'c', ka, [AtLeast(0.9), AtLeast(1.5), AtLeast(1.15)]),
        ("p99 latency, keep-alive, forwarded over udp", 'l', 'c', p99, [AtMost(1.2), Report, Report]),
        ("upload, served locally", 'k', 'b', up, [AtLeast(0.95), Report, Report]),
        ("download, served locally", 'k', 'b', down, [AtLeast(0.95), Report, Report]),
        ("new connections/s, served locally", 'k', 'b', close, [AtLeast(0.95), Report, Report]),
        ("keep-alive requests/s, served locally", 'k', 'b', ka, [AtLeast(0.95), Report, Report]),
        ("upload, forwarded over ipip", 'm', 'd', up, [AtLeast(0.8), Report, Report]),
    ];
    s.push_str(
        "\nThen the goals, each ratio beside its target: met (yes) or not (no, with the shortfall). The last \
         column is the same ratio against direct for the TUN-path case the row mirrors, from the same run. \
         \"Every figure\" for the locally served case is read as every throughput figure; its p99 is in the \
         ratios table above.\n\n\
         | figure | against direct (a) | against HAProxy (e) | against nftables NAT (f) | without the fast path, against direct |\n\
         |---|--:|--:|--:|--:|\n",
    );
    let ratio = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| x / y);
    for (what, case, mirror, figure, goals) in lines {
        let cells = ['a', 'e', 'f']
            .iter()
            .zip(goals)
            .map(|(&base, goal)| against(ratio(figure(row(case)), figure(row(base))), goal));
        let invalid = if b.fast_path_invalid(case).is_some() { " **invalid**" } else { "" };
        let _ = writeln!(
            s,
            "| {what} ({case}){invalid} | {} | {} ({mirror}) |",
            cells.collect::<Vec<_>>().join(" | "),
            num(ratio(figure(row(mirror)), figure(row('a'))), 2)
        );
    }
    // The packets-per-second case: arrivals through ringlb with the fast path over NAT's.
    let arrived = |k: char| pps::arrived(b, k);
    let invalid = if b.fast_path_invalid('l').is_some() { " **invalid**" } else { "" };
    let _ = writeln!(
        s,
        "| 64-byte datagrams/s arriving, forwarded over udp (l){invalid} | {} | – | {} | {} (c) |",
        against(ratio(arrived('l'), arrived('a')), Report),
        against(ratio(arrived('l'), arrived('f')), AtLeast(1.2)),
        num(ratio(arrived('c'), arrived('a')), 2),
    );
    s.push_str(&pps::entry_cost(b));
    s
}

/// `just bench-smoke`'s floor for forwarded upload with the fast path over the direct path's.
/// The TUN path alone reaches about 0.5–0.8 of direct here, so this floor fails when the fast
/// path stops carrying, not when the machine is busy (see [`smoke`]).
pub(super) const SMOKE_FLOOR: f64 = 0.5;

/// `just bench-smoke`'s check: in a lab with the fast path on every node (n1 forwarding
/// everything to n2 over udp), 3 s of upload direct, then 3 s through the VIP, up to three tries;
/// then the entry's fast path must have carried most of the forwarded packets.
pub(super) fn smoke(prefix: &str, bin: &std::path::Path) -> Result<()> {
    use ringlb_netlab::{node_addr, VIP};
    let lab = super::lab(prefix, bin, |s| {
        s.weights = vec![0.0, 1.0, 1.0];
        s.fast_path = true;
    })?;
    super::drain_n3(&lab)?;
    let before = counters(&lab, false)?;
    super::smoke_tries("forwarded upload with the fast path / direct", SMOKE_FLOOR, |_| {
        let direct = super::iperf(&lab, &node_addr(2).to_string(), super::IPERF_PORT, false, 3)?;
        let fast = super::iperf(&lab, &VIP.to_string(), super::IPERF_PORT, false, 3)?;
        eprintln!(
            "bench smoke: upload direct {direct:.2} Gbit/s, forwarded over udp with the fast path {fast:.2} Gbit/s"
        );
        Ok((fast, fast / direct))
    })?;
    let after = counters(&lab, false)?;
    let c = Carried {
        enabled: after.enabled,
        entry_fast: after.entry_fast - before.entry_fast,
        entry_daemon: after.entry_daemon - before.entry_daemon,
        served_fast: after.served_fast - before.served_fast,
        served_daemon: after.served_daemon - before.served_daemon,
    };
    eprintln!(
        "bench smoke: the fast path carried {} of the entry's packets, {} of the server's",
        num(c.entry_share(), 3),
        num(c.served_share(), 3)
    );
    match c.invalid() {
        Some(why) => anyhow::bail!("forwarded upload with the fast path: {why}"),
        None => Ok(()),
    }
}
