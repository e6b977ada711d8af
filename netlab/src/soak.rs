//! `netlab soak-wan`: a long run of membership across a slow, lossy WAN (a bench, not a test).
//!
//! Two sites of two nodes each (n1, n2 in site a; n3, n4 in site b) joined by the lab's WAN at
//! 75 ms ± 15 ms one way (a 150 ms round trip ± 30 ms) with 3 % loss each way. Both sites'
//! clients open new connections to the VIP at a light, steady pace for the whole run. Every
//! 0.25 s each node's `ringlb_members{state="suspect"}` gauge is read, which gives each node's
//! longest unbroken stretch of suspecting someone; at the end the nodes' transition counters
//! say how many suspicions began and whether anyone was declared dead. The goals: nobody
//! suspected for longer than one suspicion period (`control.suspicion_timeout`, the shortest a
//! suspicion can last before death), and nobody declared dead.
//!
//! It prints a summary and writes it as the "WAN soak" section of the benchmarks page, after
//! the marker below which `netlab bench` keeps what other commands measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringlb_netlab::wan::bridge::DirectionStats;
use ringlb_netlab::wan::Impairment;
use ringlb_netlab::{parse_attempts, Attempt, Lab, Spec, VIP};

use crate::bench::KEEP_MARKER;

const NODES: usize = 4;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// `control.suspicion_timeout`'s default: the shortest a suspicion lasts before the member is
/// declared dead (longer with fewer confirmations, with local health, and for far members).
const SUSPICION_PERIOD: Duration = Duration::from_secs(2);
/// Each client's pause after each connection: about 9 new connections a second per site.
const PAUSE_SECS: f64 = 0.1;
const CONNECT_TIMEOUT_SECS: f64 = 5.0;
const HEADING: &str = "## WAN soak";

/// The WAN of the soak: 150 ms round trip ± 30 ms, 3 % loss each way.
fn impairment() -> Impairment {
    Impairment {
        delay: Duration::from_millis(75),
        jitter: Duration::from_millis(15),
        loss: 0.03,
        ..Impairment::default()
    }
}

/// One node's suspicions as the samples saw them.
#[derive(Debug, Default, Clone, Copy)]
struct Watch {
    /// Since when it has suspected someone without a break (at the sample that first saw it).
    since: Option<Instant>,
    longest: Duration,
    /// Unbroken stretches of samples with a suspect.
    stretches: u64,
    /// Samples at which its metrics could not be read.
    unread: u64,
    /// The most members it held dead at once.
    dead_seen: u64,
}

impl Watch {
    fn sample(&mut self, now: Instant, suspects: u64, dead: u64) {
        self.dead_seen = self.dead_seen.max(dead);
        match (suspects > 0, self.since) {
            (true, None) => {
                self.since = Some(now);
                self.stretches += 1;
            }
            (false, Some(t)) => {
                self.longest = self.longest.max(now - t);
                self.since = None;
            }
            _ => {}
        }
    }

    fn end(&mut self, now: Instant) {
        if let Some(t) = self.since.take() {
            self.longest = self.longest.max(now - t);
        }
    }
}

/// What the soak measured.
#[derive(Debug)]
struct Outcome {
    minutes: f64,
    date: String,
    load_start: String,
    load_max: f64,
    samples: u64,
    /// Per node: the samples' view, and its counters at the end.
    watch: [Watch; NODES],
    suspected: [u64; NODES],
    died: [u64; NODES],
    refuted: [u64; NODES],
    /// Each site's client's connections.
    attempts: [Vec<Attempt>; 2],
    /// Round trips across the WAN, n1 → n3, as n1's control plane measured them (QUIC's smoothed
    /// RTT), one per sample, in ms.
    rtt_ms: Vec<f64>,
    wan: Option<[DirectionStats; 2]>,
    converged: Result<(), String>,
}

pub fn run(prefix: &str, bin: &Path, minutes: f64, out: &Path) -> Result<()> {
    let secs = minutes * 60.0;
    let date = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    let date = date.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let load_start = load().map_or("?".into(), |l| format!("{l:.2}"));
    let mut spec = Spec::new(prefix, bin);
    spec.nodes = NODES;
    spec.sites = 2;
    spec.wan = impairment();
    let lab = Lab::up(spec)?;
    eprintln!("soak: lab up; running for {minutes} min");
    // The counters count from the daemons' start (joining included); the run's are the change.
    let counters = |lab: &Lab| {
        let at = |i: usize, needle: &str| lab.metric(i, needle).unwrap_or(0);
        let transitions = |i: usize, state: &str| {
            at(i, &format!("ringlb_member_transitions_total{{node=\"n{i}\",state=\"{state}\"}}"))
        };
        [1, 2, 3, 4].map(|i| [transitions(i, "suspect"), transitions(i, "dead"), at(i, "ringlb_refutations_total")])
    };
    let before = counters(&lab);

    let loops = [1, 2].map(|site| connloop(&lab, site, secs));
    let started = Instant::now();
    let mut watch = [Watch::default(); NODES];
    let mut rtt_ms = Vec::new();
    let (mut samples, mut load_max, mut next_report) = (0u64, 0.0f64, 60u64);
    let mut next = started;
    while started.elapsed().as_secs_f64() < secs {
        let now = Instant::now();
        // The four reads in parallel: each is a `ringlb metrics` process.
        let texts: Vec<Result<String>> = std::thread::scope(|scope| {
            let lab = &lab;
            let reads: Vec<_> = (1..=NODES).map(|i| scope.spawn(move || lab.metrics(i))).collect();
            reads.into_iter().map(|r| r.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
        });
        for (i, (w, text)) in watch.iter_mut().zip(texts).enumerate() {
            match text {
                Ok(t) => {
                    if i == 0 {
                        rtt_ms.extend(float(&t, "ringlb_peer_rtt_seconds{node=\"n1\",peer=\"n3\"}").map(|s| s * 1e3));
                    }
                    let gauge =
                        |state: &str| value(&t, &format!("ringlb_members{{node=\"n{}\",state=\"{state}\"}}", i + 1));
                    w.sample(now, gauge("suspect"), gauge("dead"));
                }
                Err(_) => w.unread += 1,
            }
        }
        samples += 1;
        load_max = load_max.max(load().unwrap_or(0.0));
        if started.elapsed().as_secs() >= next_report {
            next_report += 60;
            let longest = watch.iter().map(|w| w.longest).max().unwrap_or_default();
            let stretches: u64 = watch.iter().map(|w| w.stretches).sum();
            eprintln!(
                "soak: {} of {minutes} min: {stretches} suspicions sampled, the longest {longest:.2?}",
                started.elapsed().as_secs() / 60
            );
        }
        next += SAMPLE_EVERY;
        sleep(next.saturating_duration_since(Instant::now()));
    }
    let end = Instant::now();
    for w in &mut watch {
        w.end(end);
    }
    let mut attempts: [Vec<Attempt>; 2] = [Vec::new(), Vec::new()];
    for (site, (child, file)) in loops.into_iter().enumerate() {
        match child {
            Ok(mut c) => {
                let _ = c.wait();
                attempts[site] = parse_attempts(&fs::read(&file).unwrap_or_default());
            }
            Err(e) => eprintln!("soak: site {}'s connection loop did not start: {e:#}", site + 1),
        }
    }
    let after = counters(&lab);
    let change = |k: usize| [0, 1, 2, 3].map(|n| after[n][k].saturating_sub(before[n][k]));
    let nodes: Vec<usize> = (1..=NODES).collect();
    let outcome = Outcome {
        minutes,
        date,
        load_start,
        load_max,
        samples,
        watch,
        suspected: change(0),
        died: change(1),
        refuted: change(2),
        attempts,
        rtt_ms,
        wan: lab.wan_stats().ok().map(|s| [s.a_to_b, s.b_to_a]),
        converged: lab.wait_converged(&nodes, NODES, Duration::from_secs(5)).map_err(|e| format!("{e:#}")),
    };
    drop(lab);
    let section = outcome.section();
    println!("{section}");
    write_section(out, &section)?;
    eprintln!("soak: wrote the {HEADING:?} section of {}", out.display());
    let longest = outcome.watch.iter().map(|w| w.longest).max().unwrap_or_default();
    let died: u64 = outcome.died.iter().sum();
    if died > 0 || longest >= SUSPICION_PERIOD {
        bail!("goal missed: {died} member(s) declared dead, the longest suspicion {longest:.2?}");
    }
    Ok(())
}

impl Outcome {
    fn rtt(&self) -> String {
        let mut v = self.rtt_ms.clone();
        v.sort_by(f64::total_cmp);
        match (v.first(), v.get(v.len() / 2), v.last()) {
            (Some(min), Some(mid), Some(max)) => format!("{min:.0} / {mid:.0} / {max:.0} ms"),
            _ => "not reported".to_owned(),
        }
    }

    fn section(&self) -> String {
        let imp = impairment();
        let mut s = format!(
            "{HEADING}\n\n\
             - command: `just bench-wan-soak {m}` (`netlab soak-wan --minutes {m}`), {date}; 1-minute load average \
             {load} at the start, at most {max:.2} during the run\n\
             - lab: two sites of two nodes (n1, n2 in site a; n3, n4 in site b), the WAN {d} ms ± {j} ms one way \
             ({rtt} ms round trip ± {rj} ms) with {loss} % loss each way (seed {seed}); the round trip n1 → n3 as \
             n1's control plane measured it (QUIC's smoothed RTT) at each sample, min / median / max: {measured}\n\
             - load: each site's client opens a new connection to the VIP, sends `GET /` and closes it, pausing \
             {PAUSE_SECS} s after each one (`connloop.py`, {CONNECT_TIMEOUT_SECS} s timeout); each site serves its \
             own clients, so the WAN carries the members' control traffic\n\
             - sampled: every {every} s ({samples} samples), each node's `ringlb_members{{state=\"suspect\"}}`; an \
             unbroken stretch of samples above 0 counts as one suspicion (it may join suspicions of different \
             members, and one shorter than a sample can fall between two). The counters are their change over the \
             run (`ringlb_member_transitions_total`, `ringlb_refutations_total`).\n\n",
            m = self.minutes,
            date = self.date,
            load = self.load_start,
            max = self.load_max,
            d = imp.delay.as_millis(),
            j = imp.jitter.as_millis(),
            rtt = 2 * imp.delay.as_millis(),
            rj = 2 * imp.jitter.as_millis(),
            loss = imp.loss * 100.0,
            seed = imp.seed,
            measured = self.rtt(),
            every = SAMPLE_EVERY.as_secs_f64(),
            samples = self.samples,
        );
        s.push_str(
            "| node | suspicions begun (counter) | suspicions sampled | longest sampled | declared dead (counter) \
             | refutations of itself | unread samples |\n|---|--:|--:|--:|--:|--:|--:|\n",
        );
        for i in 0..NODES {
            let w = &self.watch[i];
            let _ = writeln!(
                s,
                "| n{} | {} | {} | {:.2} s | {} | {} | {} |",
                i + 1,
                self.suspected[i],
                w.stretches,
                w.longest.as_secs_f64(),
                self.died[i],
                self.refuted[i],
                w.unread
            );
        }
        let longest = self.watch.iter().map(|w| w.longest).max().unwrap_or_default();
        let died: u64 = self.died.iter().sum();
        let dead_seen = self.watch.iter().map(|w| w.dead_seen).max().unwrap_or(0);
        let yes = |ok: bool| if ok { "yes" } else { "no" };
        let _ = write!(
            s,
            "\nGoals: nobody suspected for longer than one suspicion period ({} s, `control.suspicion_timeout`, \
             the shortest a suspicion lasts before death): longest {:.2} s, {}; nobody declared dead: {died} \
             deaths{}, {}. After the run: {}.\n\n",
            SUSPICION_PERIOD.as_secs(),
            longest.as_secs_f64(),
            yes(longest < SUSPICION_PERIOD),
            if dead_seen > 0 { format!(" (a sample saw {dead_seen} member(s) dead)") } else { String::new() },
            yes(died == 0 && dead_seen == 0),
            match &self.converged {
                Ok(()) => "every node sees all four alive".to_owned(),
                Err(e) => format!("not converged: {e}"),
            }
        );
        s.push_str("| client | connections | failed | served by | p99 / slowest s |\n|---|--:|--:|---|--:|\n");
        for (site, attempts) in self.attempts.iter().enumerate() {
            let failed = attempts.iter().filter(|a| !a.ok).count();
            let mut by: BTreeMap<&str, usize> = BTreeMap::new();
            for a in attempts {
                *by.entry(a.node.as_str()).or_default() += 1;
            }
            let by: Vec<String> = by.iter().map(|(n, c)| format!("{n} {c}")).collect();
            let mut secs: Vec<f64> = attempts.iter().map(|a| a.secs).collect();
            secs.sort_by(f64::total_cmp);
            let p99 = secs.get(secs.len().saturating_sub(1) * 99 / 100).copied().unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| site {}'s | {} | {failed} | {} | {p99:.3} / {:.3} |",
                ["a", "b"][site],
                attempts.len(),
                by.join(", "),
                secs.last().copied().unwrap_or(0.0)
            );
        }
        match &self.wan {
            Some(dirs) => {
                let parts: Vec<String> = ["a → b", "b → a"]
                    .iter()
                    .zip(dirs)
                    .map(|(name, d)| {
                        format!(
                            "{name} {} frames, {} lost ({:.2} %), {} refused by the receiving side",
                            d.frames,
                            d.lost,
                            d.lost as f64 * 100.0 / d.frames.max(1) as f64,
                            d.send_errors + d.queue_full
                        )
                    })
                    .collect();
                let _ = writeln!(s, "\nThe WAN: {}.", parts.join("; "));
            }
            None => s.push_str("\nThe WAN's counters could not be read.\n"),
        }
        s
    }
}

/// Starts `connloop.py` in site `site`'s client for `secs`, its output into a file of the lab.
fn connloop(lab: &Lab, site: usize, secs: f64) -> (Result<Child>, PathBuf) {
    let file = lab.dir.join(format!("soak-connloop-{site}.jsonl"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("connloop.py");
    let child = File::create(&file).context("creating the connection loop's output").and_then(|out| {
        Command::new("ip")
            .args(["netns", "exec", &lab.client_of_site(site), "python3"])
            .arg(&script)
            .args([format!("http://{VIP}/"), secs.to_string(), CONNECT_TIMEOUT_SECS.to_string()])
            .args(["0".to_owned(), PAUSE_SECS.to_string()])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .context("starting connloop.py")
    });
    (child, file)
}

/// The value of the sample `name{labels}` in Prometheus text.
fn float(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
}

/// The value of the integer sample `name{labels}` in Prometheus text (0 when absent).
fn value(text: &str, series: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok()).unwrap_or(0)
}

fn load() -> Option<f64> {
    fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Writes `section` into `out` in place of its previous version, or at the end; always below
/// the marker, so that `netlab bench` keeps it.
fn write_section(out: &Path, section: &str) -> Result<()> {
    let old = fs::read_to_string(out).unwrap_or_default();
    let (head, tail) = match old.find(KEEP_MARKER) {
        Some(i) => old.split_at(i),
        None => (old.as_str(), KEEP_MARKER),
    };
    let section = section.trim_end();
    let tail = match tail.find(&format!("\n{HEADING}\n")).map(|i| i + 1) {
        Some(start) => {
            let after = start + HEADING.len();
            match tail[after..].find("\n## ").map(|i| after + i + 1) {
                Some(end) => format!("{}{section}\n\n{}", &tail[..start], &tail[end..]),
                None => format!("{}{section}\n", &tail[..start]),
            }
        }
        None => format!("{}\n\n{section}\n", tail.trim_end()),
    };
    let head = if head.is_empty() || head.ends_with('\n') { head.to_owned() } else { format!("{head}\n") };
    fs::write(out, head + &tail).with_context(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_in_place_or_appended_below_the_marker() {
        let dir = std::env::temp_dir().join(format!("netlab-soak-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("b.md");
        let check = |before: &str, want: &str| {
            fs::write(&out, before).unwrap();
            write_section(&out, "## WAN soak\n\nnew\n").unwrap();
            assert_eq!(fs::read_to_string(&out).unwrap(), want, "from {before:?}");
        };
        let m = KEEP_MARKER;
        check(&format!("top\n{m}\n## A\n\na\n"), &format!("top\n{m}\n## A\n\na\n\n## WAN soak\n\nnew\n"));
        check(
            &format!("top\n{m}\n## A\n\na\n\n## WAN soak\n\nold\nold\n\n## B\n\nb\n"),
            &format!("top\n{m}\n## A\n\na\n\n## WAN soak\n\nnew\n\n## B\n\nb\n"),
        );
        check(&format!("top\n{m}\n## WAN soak\n\nold\n"), &format!("top\n{m}\n## WAN soak\n\nnew\n"));
        check("top\n", &format!("top\n{m}\n\n## WAN soak\n\nnew\n"));
        // A heading above the marker is the bench's, not this one.
        check(
            &format!("## WAN soak\n\nx\n{m}\n## A\n"),
            &format!("## WAN soak\n\nx\n{m}\n## A\n\n## WAN soak\n\nnew\n"),
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_suspicion_lasts_from_the_first_sample_that_sees_it_to_the_first_that_does_not() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        for (k, suspects) in [0, 1, 2, 1, 0, 0, 1, 0, 1].into_iter().enumerate() {
            w.sample(t0 + SAMPLE_EVERY * u32::try_from(k).unwrap(), suspects, 0);
        }
        w.end(t0 + SAMPLE_EVERY * 10);
        assert_eq!((w.stretches, w.longest), (3, SAMPLE_EVERY * 3));
    }
}
