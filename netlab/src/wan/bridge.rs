//! The WAN bridge's IO: two TAP devices, `a` and `b`; every frame read from one is given a
//! [`Fate`] by that direction's [`Link`] and, unless dropped, written to the other at its
//! release time. One thread, `poll` with a nanosecond timeout on the next release.
//!
//! Why TAP devices and not AF_PACKET sockets on veths: the kernel never hands a TAP without a
//! virtio-net header (`IFF_VNET_HDR` off, no `TUNSETOFFLOAD`) a GSO super-frame or a frame with
//! a checksum left for the hardware: it segments and checksums before the TAP. So every
//! impairment applies to one wire-sized frame, with no `ethtool` (absent here) to turn offloads
//! off, and nothing the bridge writes is read back by itself. In the lab each TAP is a port of
//! a Linux bridge that also holds a veth to one site's router (see [`crate::Lab::wan_ns`]).
//!
//! It runs either as `netlab wan-bridge` (a process of its own in the WAN namespace, so it
//! outlives `netlab up`) or on a thread of the process that owns the [`crate::Lab`] (tests),
//! which enters the namespace with `setns` and stops when the lab is dropped. It rereads its
//! parameter file (see [`Impairment`]'s `Display`) when it changes, and writes what it did to
//! a stats file.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustix::event::{PollFd, PollFlags, Timespec};
use tun_rs::{DeviceBuilder, Layer, SyncDevice};

use super::{DropReason, Fate, Impairment, Link};

/// The largest frame a TAP hands over (it never segments beyond the MTU, but a larger MTU
/// must not truncate frames).
const MAX_FRAME: usize = 65_600;
/// Frames read from one side before the other gets its turn.
const BATCH: usize = 64;
/// Frames held per direction at most (a bound on memory with no rate limit); more are dropped
/// as a full queue.
const MAX_QUEUED: usize = 100_000;
/// How often the parameter file is checked and the stats file written.
const HOUSEKEEPING: Duration = Duration::from_millis(200);

/// What to run.
#[derive(Debug, Clone)]
pub struct Bridge {
    /// The TAP devices to create (in the calling thread's network namespace).
    pub a: String,
    pub b: String,
    /// The parameters to start with.
    pub impairment: Impairment,
    /// Reread when its content changes; while it is missing, the parameters stay.
    pub params: Option<PathBuf>,
    /// Rewritten (atomically) every 200 ms while something changed.
    pub stats: Option<PathBuf>,
}

/// One direction's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Frames read from the sending side.
    pub frames: u64,
    /// Frames written to the other side, and their bytes.
    pub forwarded: u64,
    pub bytes: u64,
    /// Dropped at random.
    pub lost: u64,
    /// Dropped because the queue was full.
    pub queue_full: u64,
    /// Writes the other side's TAP refused (it is down, or its backlog is full). A cut WAN
    /// (its veths down) drops frames in the Linux bridge behind the TAP, not here.
    pub send_errors: u64,
    /// The longest frame seen: at most the MTU plus 14 when the kernel segmented everything.
    pub max_frame: u64,
}

impl DirectionStats {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "frames": self.frames, "forwarded": self.forwarded, "bytes": self.bytes, "lost": self.lost,
            "queue_full": self.queue_full, "send_errors": self.send_errors, "max_frame": self.max_frame,
        })
    }

    fn from_json(v: &serde_json::Value) -> DirectionStats {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        DirectionStats {
            frames: n("frames"),
            forwarded: n("forwarded"),
            bytes: n("bytes"),
            lost: n("lost"),
            queue_full: n("queue_full"),
            send_errors: n("send_errors"),
            max_frame: n("max_frame"),
        }
    }
}

/// What the bridge has done so far, as its stats file says.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub a_to_b: DirectionStats,
    pub b_to_a: DirectionStats,
    /// The parameters in force.
    pub impairment: Impairment,
}

impl Stats {
    pub fn read(path: &Path) -> Result<Stats> {
        let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Stats {
            a_to_b: DirectionStats::from_json(&v["a_to_b"]),
            b_to_a: DirectionStats::from_json(&v["b_to_a"]),
            impairment: v["params"].as_str().unwrap_or_default().parse()?,
        })
    }

    fn write(path: &Path, dirs: &[DirectionStats; 2], imp: &Impairment) -> io::Result<()> {
        let v = serde_json::json!({ "a_to_b": dirs[0].json(), "b_to_a": dirs[1].json(), "params": imp.to_string() });
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, v.to_string())?;
        fs::rename(&tmp, path)
    }
}

/// The two TAP devices, created and attached.
pub struct Taps([SyncDevice; 2]);

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Taps")
    }
}

/// Creates TAP devices `a` and `b` in the calling thread's network namespace (down: the caller
/// plugs them into bridges and brings them up). They disappear when [`Taps`] is dropped.
pub fn open_taps(a: &str, b: &str) -> Result<Taps> {
    let open = |name: &str| -> Result<SyncDevice> {
        // No `offload`: no virtio-net header, so the kernel segments and checksums for us.
        let dev = DeviceBuilder::new()
            .name(name)
            .layer(Layer::L2)
            .build_sync()
            .with_context(|| format!("creating TAP device {name}"))?;
        dev.set_nonblocking(true).context("non-blocking TAP")?;
        Ok(dev)
    };
    Ok(Taps([open(a)?, open(b)?]))
}

/// Carries frames between the taps until `stop` is set (or a TAP fails, e.g. its namespace
/// was deleted).
pub fn run(taps: &Taps, bridge: &Bridge, stop: &AtomicBool) -> Result<()> {
    let mut imp = bridge.impairment;
    imp.check()?;
    let mut links = [Link::new(&imp, 0), Link::new(&imp, 1)];
    // queues[d]: frames read from taps[d], for taps[1 - d], in release order.
    let mut queues: [VecDeque<(Instant, Vec<u8>)>; 2] = [VecDeque::new(), VecDeque::new()];
    let mut stats = [DirectionStats::default(); 2];
    let mut buf = vec![0u8; MAX_FRAME];
    let mut params_seen: Option<String> = None;
    let mut written: Option<([DirectionStats; 2], Impairment)> = None;
    let mut housekeeping = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= housekeeping {
            housekeeping = now + HOUSEKEEPING;
            if let Some(path) = &bridge.params {
                let text = fs::read_to_string(path).ok();
                if text.is_some() && text != params_seen {
                    match text.as_deref().unwrap_or_default().parse::<Impairment>() {
                        Ok(new) => {
                            imp = new;
                            for (d, link) in (0u64..).zip(links.iter_mut()) {
                                link.set(&imp, d);
                            }
                        }
                        Err(e) => eprintln!("wan-bridge: keeping the parameters, {}: {e:#}", path.display()),
                    }
                    params_seen = text;
                }
            }
            if let Some(path) = &bridge.stats {
                if written != Some((stats, imp)) {
                    Stats::write(path, &stats, &imp).with_context(|| format!("writing {}", path.display()))?;
                    written = Some((stats, imp));
                }
            }
        }
        for d in 0..2 {
            let to = &taps.0[1 - d];
            while queues[d].front().is_some_and(|(at, _)| *at <= now) {
                let Some((_, frame)) = queues[d].pop_front() else { break };
                match to.send(&frame) {
                    Ok(_) => {
                        stats[d].forwarded += 1;
                        stats[d].bytes += frame.len() as u64;
                    }
                    Err(_) => stats[d].send_errors += 1,
                }
            }
        }
        let next = queues.iter().filter_map(|q| q.front().map(|(at, _)| *at)).fold(housekeeping, Instant::min);
        let timeout = Timespec::try_from(next.saturating_duration_since(Instant::now())).unwrap_or_default();
        let mut fds = [PollFd::new(&taps.0[0], PollFlags::IN), PollFd::new(&taps.0[1], PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        for d in (0..2).filter(|&d| ready[d]) {
            for _ in 0..BATCH {
                let n = match taps.0[d].recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).with_context(|| format!("reading {}", [&bridge.a, &bridge.b][d])),
                };
                let s = &mut stats[d];
                s.frames += 1;
                s.max_frame = s.max_frame.max(n as u64);
                match links[d].decide(Instant::now(), n) {
                    Fate::Drop(DropReason::Lost) => s.lost += 1,
                    Fate::Drop(DropReason::QueueFull) => s.queue_full += 1,
                    Fate::Release(_) if queues[d].len() >= MAX_QUEUED => s.queue_full += 1,
                    Fate::Release(at) => queues[d].push_back((at, buf[..n].to_vec())),
                }
            }
        }
    }
    if let Some(path) = &bridge.stats {
        Stats::write(path, &stats, &imp).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A bridge running on a thread of this process; stopped (and its TAPs removed) when dropped.
#[derive(Debug)]
pub struct BridgeThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl BridgeThread {
    /// Starts `bridge` on a thread inside the network namespace at `netns` (e.g.
    /// `/run/netns/NAME`) and returns once its TAPs exist.
    pub fn spawn(netns: &Path, bridge: Bridge) -> Result<BridgeThread> {
        let ns = File::open(netns).with_context(|| format!("network namespace {}", netns.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name("wan-bridge".into())
            .spawn(move || -> Result<()> {
                let opened = rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .context("entering the WAN namespace")
                .and_then(|()| open_taps(&bridge.a, &bridge.b));
                let taps = match opened {
                    Ok(taps) => taps,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                let _ = ready_tx.send(Ok(()));
                run(&taps, &bridge, &stopped)
            })
            .context("starting the WAN bridge thread")?;
        let mut thread = BridgeThread { stop, handle: Some(handle) };
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => {
                thread.handle = None;
                Err(anyhow!("the WAN bridge: {e}"))
            }
            Err(_) => bail!("the WAN bridge did not start within 10 s"),
        }
    }

    /// Stops the thread and waits for it; returns its error, if it failed.
    pub fn stop(mut self) -> Result<()> {
        self.stop_and_join()
    }

    /// Leaves the thread running (until this process exits).
    pub fn detach(mut self) {
        self.handle = None;
    }

    fn stop_and_join(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow!("the WAN bridge thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for BridgeThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            eprintln!("netlab: the WAN bridge: {e:#}");
        }
    }
}
