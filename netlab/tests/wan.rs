//! Two sites joined by the lab's emulated WAN (root, network namespaces): plain servers, no
//! ringlb. Round trips across the WAN take twice its delay, within its jitter; it loses what it
//! is told to; a rate limit holds; frames cross one by one (the kernel segments before the
//! bridge); a cut stops everything between the sites and a heal restores it; the teardown
//! leaves nothing, whether the bridge is a thread of this process or a process of its own.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ringlb_netlab::wan::Impairment;
use ringlb_netlab::{node_addr, unique_prefix, Lab, Spec};

const ECHO_PORT: u16 = 7007;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Two sites of two plain nodes each (no ringlb, no control plane: no `ringlb` binary needed).
fn spec(tag: &str, wan: Impairment) -> Spec {
    let mut spec = Spec::new(unique_prefix(tag), "/nonexistent/ringlb");
    spec.nodes = 4;
    spec.sites = 2;
    spec.wan = wan;
    spec.start_ringlb = false;
    spec.control = false;
    spec
}

/// A UDP echo server in lab host `host` until the returned flag is set.
fn start_echo(lab: &Lab, host: &str) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    lab.in_host(host, move || {
        let sock = UdpSocket::bind(("0.0.0.0", ECHO_PORT))?;
        sock.set_read_timeout(Some(ms(50)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        while !stopped.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                sock.send_to(&buf[..n], from)?;
            }
        }
        Ok(())
    })?;
    ready.recv_timeout(Duration::from_secs(5)).context("the echo server did not start")?;
    Ok(stop)
}

/// Sends `count` numbered probes from lab host `from` to `to`'s echo server, one every
/// `interval`, and returns each one's round trip (`None`: no answer within 2 s of the last).
fn probe(lab: &Lab, from: &str, to: Ipv4Addr, count: usize, interval: Duration) -> Result<Vec<Option<Duration>>> {
    let thread = lab.in_host(from, move || {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(SocketAddr::from((to, ECHO_PORT)))?;
        sock.set_read_timeout(Some(ms(1)))?;
        let start = Instant::now();
        let mut sent_at = vec![None; count];
        let mut rtts = vec![None; count];
        let mut buf = [0u8; 64];
        let mut next = 0;
        let mut last_sent = start;
        while next < count || last_sent.elapsed() < Duration::from_secs(2) {
            let now = Instant::now();
            if next < count && now >= start + interval * u32::try_from(next)? {
                sock.send(&u64::try_from(next)?.to_be_bytes())?;
                sent_at[next] = Some(now);
                last_sent = now;
                next += 1;
            }
            if let Ok(8) = sock.recv(&mut buf) {
                let k = usize::try_from(u64::from_be_bytes(buf[..8].try_into()?))?;
                if let (Some(Some(t)), Some(slot)) = (sent_at.get(k), rtts.get_mut(k)) {
                    *slot = Some(t.elapsed());
                }
            }
            if next >= count && rtts.iter().all(Option::is_some) {
                break;
            }
        }
        Ok(rtts)
    })?;
    thread.join().map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

/// The WAN bridge's counters once what was sent has crossed (its stats file is rewritten every
/// 200 ms).
fn settled_stats(lab: &Lab) -> Result<ringlb_netlab::wan::bridge::Stats> {
    std::thread::sleep(ms(400));
    lab.wan_stats()
}

struct Summary {
    received: usize,
    lost: f64,
    min: Duration,
    median: Duration,
    max: Duration,
}

fn summary(rtts: &[Option<Duration>]) -> Summary {
    let mut got: Vec<Duration> = rtts.iter().flatten().copied().collect();
    got.sort_unstable();
    let pick = |q: usize| got.get(q.min(got.len().saturating_sub(1))).copied().unwrap_or(Duration::MAX);
    Summary {
        received: got.len(),
        lost: 1.0 - got.len() as f64 / rtts.len() as f64,
        min: pick(0),
        median: pick(got.len() / 2),
        max: pick(got.len()),
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} answered ({:.1} % lost)", self.received, self.lost * 100.0)?;
        if self.received > 0 {
            write!(f, ", rtt min {:.1?} median {:.1?} max {:.1?}", self.min, self.median, self.max)?;
        }
        Ok(())
    }
}

#[test]
fn two_sites_across_an_emulated_wan() -> Result<()> {
    let wan = Impairment { delay: ms(40), jitter: ms(5), loss: 0.10, rate_bps: None, queue: ms(100), seed: 7 };
    let mut lab = Lab::up(spec("wan", wan))?;
    assert_eq!((lab.site_nodes(1), lab.site_nodes(2)), (vec![1, 2], vec![3, 4]));
    assert!(lab.config_toml(3).contains("site = \"b\"") && lab.config_toml(2).contains("site = \"a\""));
    let mut echoes = Vec::new();
    for i in 1..=4 {
        echoes.push(start_echo(&lab, &format!("n{i}"))?);
    }
    // Warm up: ARP across the WAN.
    probe(&lab, "n1", node_addr(3), 10, ms(20))?;

    let local = summary(&probe(&lab, "n1", node_addr(2), 100, ms(10))?);
    println!("n1 → n2 (same site): {local}");
    assert_eq!(local.received, 100, "same site: {local}");
    assert!(local.median < ms(5), "same site: {local}");

    let before = settled_stats(&lab)?;
    let far = summary(&probe(&lab, "n1", node_addr(3), 500, ms(10))?);
    let after = settled_stats(&lab)?;
    println!("n1 → n3 (across the WAN, 40 ± 5 ms, 10 % loss): {far}");
    // Each probe crosses twice: 1 - 0.9² = 19 % lost.
    assert!((0.12..=0.27).contains(&far.lost), "across the WAN: {far}");
    // No frame is released early: a round trip takes at least twice (delay - jitter).
    assert!(far.min >= ms(70), "across the WAN: {far}");
    assert!((ms(70)..=ms(105)).contains(&far.median), "across the WAN: {far}");
    let (frames, lost) = (after.a_to_b.frames - before.a_to_b.frames, after.a_to_b.lost - before.a_to_b.lost);
    println!("the bridge a→b: {frames} frames, {lost} lost; stats {after:?}");
    assert!(frames >= 500 && (0.06..=0.14).contains(&(lost as f64 / frames as f64)), "{frames} frames, {lost} lost");

    // The clients: each reaches its own site's nodes directly and the other site's across the
    // WAN, there and back (the reply leaves by the node's own router).
    lab.set_wan(&Impairment { loss: 0.0, ..wan })?;
    for (from, to, crosses) in
        [("client", 1, false), ("client", 3, true), ("client2", 3, false), ("client2", 1, true), ("client2", 2, true)]
    {
        let s = summary(&probe(&lab, from, node_addr(to), 20, ms(20))?);
        println!("{from} → n{to}: {s}");
        assert_eq!(s.received, 20, "{from} → n{to}: {s}");
        match crosses {
            true => assert!(s.min >= ms(70) && s.median <= ms(105), "{from} → n{to}: {s}"),
            false => assert!(s.median < ms(5), "{from} → n{to}: {s}"),
        }
    }

    // A rate limit, and one frame at a time: a TCP download of 2 MiB from n3 to n1 at 20 Mbit/s.
    lab.set_wan(&Impairment { jitter: Duration::ZERO, loss: 0.0, rate_bps: Some(20_000_000), ..wan })?;
    lab.make_blob("wanblob", 2)?;
    let before = settled_stats(&lab)?;
    let out = lab.exec(
        &lab.node(1),
        &[
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            "http://10.77.0.3/blob/wanblob",
        ],
    )?;
    let after = settled_stats(&lab)?;
    let mut words = out.split_whitespace();
    let (bytes, secs): (f64, f64) = (words.next().context("size")?.parse()?, words.next().context("time")?.parse()?);
    let mbit = bytes * 8.0 / secs / 1e6;
    let frames = after.b_to_a.forwarded - before.b_to_a.forwarded;
    println!("2 MiB from n3 at 20 Mbit/s: {secs:.2} s, {mbit:.1} Mbit/s of payload; {frames} frames b→a, the longest {} bytes", after.b_to_a.max_frame);
    assert_eq!(bytes, 2.0 * 1024.0 * 1024.0);
    assert!((4.0..=20.0).contains(&mbit), "{mbit:.1} Mbit/s through a 20 Mbit/s WAN");
    assert!(after.b_to_a.max_frame <= 1514 && after.a_to_b.max_frame <= 1514, "a super-frame crossed: {after:?}");
    assert!(frames >= 1400, "2 MiB in {frames} frames: not one segment per frame");

    // A cut: nothing crosses; each site still reaches its own nodes. Healed: all is back.
    lab.set_wan(&Impairment { loss: 0.0, ..wan })?;
    lab.wan_cut()?;
    let cut = summary(&probe(&lab, "n1", node_addr(3), 20, ms(10))?);
    let inside = summary(&probe(&lab, "client2", node_addr(4), 20, ms(10))?);
    println!("cut: n1 → n3 {cut}; client2 → n4 {inside}");
    assert_eq!((cut.received, inside.received), (0, 20));
    lab.wan_heal()?;
    let healed = Instant::now();
    let mut back = summary(&probe(&lab, "n1", node_addr(3), 20, ms(10))?);
    while back.received < 20 && healed.elapsed() < Duration::from_secs(10) {
        back = summary(&probe(&lab, "n1", node_addr(3), 20, ms(10))?);
    }
    println!("healed: n1 → n3 {back} ({:?} after the heal)", healed.elapsed());
    assert_eq!(back.received, 20);

    for stop in echoes {
        stop.store(true, Ordering::Relaxed);
    }
    let prefix = lab.spec.prefix.clone();
    drop(lab);
    let left = String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output()?.stdout)?;
    assert!(!left.contains(&format!("{prefix}-")), "left behind: {left}");
    Ok(())
}

#[test]
fn the_bridge_runs_as_a_process_of_its_own() -> Result<()> {
    let mut spec = spec("wanp", Impairment::delay_only(ms(20)));
    spec.wan_bridge_bin = Some(env!("CARGO_BIN_EXE_netlab").into());
    let lab = Lab::up(spec)?;
    let pids =
        String::from_utf8(std::process::Command::new("ip").args(["netns", "pids", &lab.wan_ns()]).output()?.stdout)?;
    let bridge: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(bridge.len(), 1, "processes in the WAN namespace: {pids}");
    let echo = start_echo(&lab, "n4")?;
    let s = summary(&probe(&lab, "n2", node_addr(4), 20, ms(20))?);
    println!("n2 → n4 (20 ms one way, no jitter): {s}");
    assert_eq!(s.received, 20, "{s}");
    assert!(s.min >= ms(40) && s.median <= ms(55), "{s}");
    echo.store(true, Ordering::Relaxed);
    let prefix = lab.spec.prefix.clone();
    drop(lab);
    // Gone, or a zombie (this process started it and never waits for it).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", bridge[0])).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z "), "the bridge outlived the lab: {stat}");
    let left = String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output()?.stdout)?;
    assert!(!left.contains(&format!("{prefix}-")), "left behind: {left}");
    Ok(())
}
