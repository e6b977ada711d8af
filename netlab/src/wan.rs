//! The lab's WAN: what happens to each frame on a long-distance link (delay, jitter, random
//! loss, a rate limit with a bounded queue), decided by a seeded, sans-IO scheduler, and the
//! user-space bridge ([`bridge`]) that carries frames between two TAP devices and holds each one
//! until the scheduler's release time.
//!
//! The kernel here has no `netem`, so the delay cannot be the kernel's; `tbf`/`htb` could limit
//! the rate, but doing it in the scheduler keeps one clock and one queue per direction.
//!
//! A [`Link`] is one direction. Given `(now, frame length)` it answers a [`Fate`]: dropped (lost
//! at random, or the rate limiter's queue is full) or released at an instant. Choices:
//!
//! - **No reordering.** Each frame draws its delay uniformly from `delay ± jitter`, but its
//!   release is never earlier than the previous frame's: `release = max(arrival + delay + u,
//!   last_release)`. A real path rarely reorders, and TCP would read a reordering as loss.
//!   Frames closer together than the jitter range therefore lean towards `delay + jitter`;
//!   frames further apart (pings) see the full uniform spread.
//! - **Rate.** With `rate_bps`, frames leave a serializer at that rate in arrival order; the
//!   delay starts when a frame's last bit is out. A frame that would wait more than `queue` in
//!   the serializer is dropped (a drop-tail queue sized in time, `queue × rate` bytes).
//! - **Determinism.** Every frame draws exactly two numbers from a SplitMix64 stream (one for
//!   loss, one for jitter), whatever happens to it, so the same seed and the same sequence of
//!   `(now, length)` give the same fates. The two directions use different streams of the same
//!   seed.

pub mod bridge;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// What a WAN link does to frames. The same parameters apply to both directions, each with its
/// own random stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// One-way delay (the mean).
    pub delay: Duration,
    /// Each frame's delay is uniform in `delay ± jitter` (at least zero).
    pub jitter: Duration,
    /// Probability that a frame is lost, 0 to 1.
    pub loss: f64,
    /// Bits per second on the link (Ethernet frames, headers included); `None`: unlimited.
    pub rate_bps: Option<u64>,
    /// With a rate: the longest a frame may wait in the link's queue before it is dropped.
    pub queue: Duration,
    pub seed: u64,
}

impl Default for Impairment {
    /// 40 ms ± 5 ms one way, 1 % loss, no rate limit.
    fn default() -> Self {
        Impairment {
            delay: Duration::from_millis(40),
            jitter: Duration::from_millis(5),
            loss: 0.01,
            rate_bps: None,
            queue: Duration::from_millis(100),
            seed: 1,
        }
    }
}

impl Impairment {
    /// A link that only delays, by exactly `delay`.
    pub fn delay_only(delay: Duration) -> Impairment {
        Impairment { delay, jitter: Duration::ZERO, loss: 0.0, ..Impairment::default() }
    }

    pub fn check(&self) -> Result<()> {
        ensure!((0.0..=1.0).contains(&self.loss), "loss {} is not between 0 and 1", self.loss);
        ensure!(self.rate_bps != Some(0), "rate 0 carries nothing (a cut link is Lab::wan_cut)");
        ensure!(self.delay <= Duration::from_secs(10), "delay {:?} is above 10 s", self.delay);
        ensure!(self.jitter <= Duration::from_secs(10), "jitter {:?} is above 10 s", self.jitter);
        ensure!(self.queue <= Duration::from_secs(10), "queue {:?} is above 10 s", self.queue);
        Ok(())
    }
}

/// One `key value` per line: `delay 40ms`, `jitter 5ms`, `loss 0.01`, `rate none` or `rate
/// 10mbit`, `queue 100ms`, `seed 1`: the WAN bridge's parameter file.
impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = self.rate_bps.map_or_else(|| "none".to_owned(), |r| format!("{r}bit"));
        writeln!(f, "delay {}", fmt_duration(self.delay))?;
        writeln!(f, "jitter {}", fmt_duration(self.jitter))?;
        writeln!(f, "loss {}", self.loss)?;
        writeln!(f, "rate {rate}")?;
        writeln!(f, "queue {}", fmt_duration(self.queue))?;
        writeln!(f, "seed {}", self.seed)
    }
}

impl FromStr for Impairment {
    type Err = anyhow::Error;

    /// Keys not given keep [`Impairment::default`]'s values.
    fn from_str(s: &str) -> Result<Impairment> {
        let mut imp = Impairment::default();
        for line in s.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (key, value) = line.split_once(char::is_whitespace).with_context(|| format!("{line:?}: no value"))?;
            let value = value.trim();
            match key {
                "delay" => imp.delay = parse_duration(value)?,
                "jitter" => imp.jitter = parse_duration(value)?,
                "loss" => imp.loss = value.parse().with_context(|| format!("loss {value:?}"))?,
                "rate" => imp.rate_bps = parse_rate(value)?,
                "queue" => imp.queue = parse_duration(value)?,
                "seed" => imp.seed = value.parse().with_context(|| format!("seed {value:?}"))?,
                other => bail!("unknown WAN parameter {other:?}"),
            }
        }
        imp.check()?;
        Ok(imp)
    }
}

/// `40ms`, `1.5s`, `250us`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().with_context(|| format!("duration {s:?}: expected e.g. 40ms"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "ns" => n / 1e9,
        "" if n == 0.0 => 0.0,
        _ => bail!("duration {s:?}: unit is s, ms, us or ns"),
    };
    Duration::try_from_secs_f64(secs).with_context(|| format!("duration {s:?}"))
}

fn fmt_duration(d: Duration) -> String {
    format!("{}us", d.as_micros())
}

/// `none`, `10mbit`, `1.5gbit`, `800kbit`, or bits per second (`8000000`, `8000000bit`).
pub fn parse_rate(s: &str) -> Result<Option<u64>> {
    let s = s.trim().to_ascii_lowercase();
    if s == "none" || s == "unlimited" {
        return Ok(None);
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().with_context(|| format!("rate {s:?}: expected e.g. 10mbit"))?;
    let scale = match unit {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => bail!("rate {s:?}: unit is bit, kbit, mbit or gbit"),
    };
    let bps = (n * scale).round();
    ensure!((1.0..=1e12).contains(&bps), "rate {s:?} is not between 1 bit/s and 1 Tbit/s");
    // A whole number between 1 and 1e12: exact as a u64.
    #[allow(clippy::cast_possible_truncation)]
    Ok(Some(bps as u64))
}

/// Why a frame did not cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Random loss.
    Lost,
    /// The rate limiter's queue was full.
    QueueFull,
}

/// What becomes of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Hand it to the other side at this instant.
    Release(Instant),
    Drop(DropReason),
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for loss and jitter.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction of a WAN link: decides each frame's fate (see the module's docs).
#[derive(Debug, Clone)]
pub struct Link {
    imp: Impairment,
    rng: SplitMix64,
    /// The latest release handed out: none may come earlier.
    last_release: Option<Instant>,
    /// When the rate limiter's serializer is free again.
    busy_until: Option<Instant>,
}

impl Link {
    /// Direction `stream` (0 for a→b, 1 for b→a) of a link with `imp`.
    pub fn new(imp: &Impairment, stream: u64) -> Link {
        Link { imp: *imp, rng: Link::rng(imp.seed, stream), last_release: None, busy_until: None }
    }

    fn rng(seed: u64, stream: u64) -> SplitMix64 {
        // Each stream starts at its own point of the seed's sequence, far from the others.
        let mut mix = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        SplitMix64(mix.next())
    }

    pub fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// New parameters from now on; a new seed restarts the random stream. Frames already
    /// scheduled keep their release times, and no later one is released before them.
    pub fn set(&mut self, imp: &Impairment, stream: u64) {
        if imp.seed != self.imp.seed {
            self.rng = Link::rng(imp.seed, stream);
        }
        self.imp = *imp;
    }

    /// The fate of a frame of `len` bytes arriving at `now`. `now` must not go backwards.
    pub fn decide(&mut self, now: Instant, len: usize) -> Fate {
        // Always two draws per frame, so one frame's fate never shifts the next one's numbers.
        let lost = self.rng.unit() < self.imp.loss;
        let jitter_ns = u64::try_from(self.imp.jitter.as_nanos()).unwrap_or(u64::MAX / 4);
        let draw = self.rng.next();
        if lost {
            return Fate::Drop(DropReason::Lost);
        }
        let sent = match self.imp.rate_bps {
            None => now,
            Some(rate) => {
                let start = self.busy_until.map_or(now, |b| b.max(now));
                if start.duration_since(now) > self.imp.queue {
                    return Fate::Drop(DropReason::QueueFull);
                }
                let bits = u128::from(u64::try_from(len).unwrap_or(u64::MAX)) * 8;
                let ns = bits * 1_000_000_000 / u128::from(rate.max(1));
                let done = start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
                self.busy_until = Some(done);
                done
            }
        };
        // Uniform in [0, 2 × jitter], then shifted down by jitter (not below a zero delay).
        let offset = if jitter_ns == 0 { 0 } else { draw % (2 * jitter_ns + 1) };
        let delay_ns = u64::try_from(self.imp.delay.as_nanos()).unwrap_or(u64::MAX / 4);
        let one_way = Duration::from_nanos((delay_ns + offset).saturating_sub(jitter_ns));
        let release = self.last_release.map_or(sent + one_way, |last| last.max(sent + one_way));
        self.last_release = Some(release);
        Fate::Release(release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The fates of `n` frames of `len` bytes arriving every `gap`, as offsets from the start.
    fn run(imp: &Impairment, stream: u64, n: usize, gap: Duration, len: usize) -> Vec<Option<Duration>> {
        let t0 = Instant::now();
        let mut link = Link::new(imp, stream);
        (0..n)
            .map(|k| {
                let now = t0 + gap * u32::try_from(k).unwrap();
                match link.decide(now, len) {
                    Fate::Release(at) => Some(at - now),
                    Fate::Drop(_) => None,
                }
            })
            .collect()
    }

    #[test]
    fn loss_rate_is_the_configured_one() {
        for loss in [0.0, 0.01, 0.1, 0.5, 1.0] {
            let imp = Impairment { loss, seed: 42, ..Impairment::default() };
            let fates = run(&imp, 0, 100_000, ms(1), 100);
            let lost = fates.iter().filter(|f| f.is_none()).count() as f64 / 100_000.0;
            // 5 standard deviations of a binomial over 100k frames, at most 0.8 points.
            let tolerance = 5.0 * (loss * (1.0 - loss) / 100_000.0).sqrt();
            assert!((lost - loss).abs() <= tolerance, "loss {loss}: {lost} of frames lost");
        }
    }

    #[test]
    fn delays_stay_within_the_jitter_and_spread_over_it() {
        let imp = Impairment { delay: ms(40), jitter: ms(5), loss: 0.0, seed: 7, ..Impairment::default() };
        // Frames 20 ms apart: wider than the jitter range, so none is held back by the previous.
        let delays: Vec<Duration> = run(&imp, 0, 20_000, ms(20), 100).into_iter().map(Option::unwrap).collect();
        assert!(delays.iter().all(|d| (ms(35)..=ms(45)).contains(d)), "a delay outside 40 ± 5 ms");
        let mean = delays.iter().sum::<Duration>() / 20_000;
        assert!((mean.as_secs_f64() - 0.040).abs() < 0.000_2, "mean delay {mean:?}");
        assert!(delays.iter().any(|d| *d < ms(36)) && delays.iter().any(|d| *d > ms(44)), "not spread");
    }

    #[test]
    fn releases_never_reorder() {
        let imp = Impairment { delay: ms(40), jitter: ms(10), loss: 0.1, seed: 3, ..Impairment::default() };
        let t0 = Instant::now();
        let mut link = Link::new(&imp, 1);
        let mut last = t0;
        for k in 0..50_000u32 {
            let now = t0 + Duration::from_micros(u64::from(k) * 50);
            if let Fate::Release(at) = link.decide(now, 1500) {
                assert!(at >= last && at >= now + ms(30), "frame {k} released at {:?}", at - t0);
                last = at;
            }
        }
    }

    #[test]
    fn the_same_seed_decides_the_same_and_streams_differ() {
        let imp = Impairment { loss: 0.2, seed: 99, ..Impairment::default() };
        let a = run(&imp, 0, 10_000, ms(3), 1000);
        assert_eq!(a, run(&imp, 0, 10_000, ms(3), 1000));
        assert_ne!(a, run(&imp, 1, 10_000, ms(3), 1000), "both directions drew the same numbers");
        assert_ne!(a, run(&Impairment { seed: 100, ..imp }, 0, 10_000, ms(3), 1000));
    }

    #[test]
    fn a_rate_spaces_frames_and_a_full_queue_drops() {
        // 1 Mbit/s: a 1250-byte frame takes 10 ms to send; a burst of 30 at once.
        let imp = Impairment {
            delay: ms(20),
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: Some(1_000_000),
            queue: ms(100),
            seed: 1,
        };
        let t0 = Instant::now();
        let mut link = Link::new(&imp, 0);
        let fates: Vec<Fate> = (0..30).map(|_| link.decide(t0, 1250)).collect();
        let released: Vec<Duration> = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Release(at) => Some(*at - t0),
                Fate::Drop(_) => None,
            })
            .collect();
        // Frame k starts after k × 10 ms; those starting within the 100 ms queue get through.
        assert_eq!(released, (1..=11).map(|k| ms(20 + 10 * k)).collect::<Vec<_>>());
        assert!(fates[11..].iter().all(|f| *f == Fate::Drop(DropReason::QueueFull)));
        // Once the queue drains, frames pass again at the line rate.
        assert_eq!(link.decide(t0 + ms(200), 1250), Fate::Release(t0 + ms(230)));
    }

    #[test]
    fn parameters_round_trip_through_the_file_format() {
        let imp = Impairment {
            delay: Duration::from_micros(12_345),
            jitter: ms(3),
            loss: 0.125,
            rate_bps: Some(8_000_000),
            queue: ms(50),
            seed: 77,
        };
        assert_eq!(imp.to_string().parse::<Impairment>().unwrap(), imp);
        assert_eq!("".parse::<Impairment>().unwrap(), Impairment::default());
        for (text, ok) in [("loss 1.5", false), ("rate 0", false), ("speed 3", false), ("delay 5 parsecs", false)] {
            assert_eq!(text.parse::<Impairment>().is_ok(), ok, "{text}");
        }
    }

    #[test]
    fn durations_and_rates_parse() {
        for (s, want) in [("40ms", Some(ms(40))), ("1.5s", Some(ms(1500))), ("250us", Some(Duration::from_micros(250)))]
            .into_iter()
            .chain([("0", Some(Duration::ZERO)), ("5", None), ("ms", None), ("-3ms", None)])
        {
            assert_eq!(parse_duration(s).ok(), want, "{s}");
        }
        for (s, want) in
            [("none", Some(None)), ("10mbit", Some(Some(10_000_000))), ("1.5gbit", Some(Some(1_500_000_000)))]
                .into_iter()
                .chain([("800kbit", Some(Some(800_000))), ("8000", Some(Some(8000))), ("0", None), ("3mb", None)])
        {
            assert_eq!(parse_rate(s).ok(), want, "{s}");
        }
    }
}
