//! A flood of TCP SYNs (or bare ACKs) from spoofed sources, to test the flow table under
//! pressure (`netlab flood`, [`Lab::flood`]).
//!
//! It runs only inside a lab: a thread enters one of the lab's network namespaces (which are
//! joined only to each other, so nothing sent there can leave), sends only to the lab's own
//! addresses, spoofs only private sources outside the lab's subnets, and stops after a given
//! count. The packets carry valid checksums, so the servers answer the spoofed sources; the
//! lab's router has no route to them (no default route either) and drops the answers.

use std::fmt;
use std::fs::File;
use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rustix::net::{AddressFamily, SendAncillaryBuffer, SendFlags, SocketAddrAny, SocketType};

use crate::sites::ROUTER2_UNDERLAY;
use crate::{Lab, ROUTER_UNDERLAY, VIP};

/// Packets per `sendmmsg` call.
const BATCH: usize = 64;
/// Far more than any test needs; a mistyped count should not run for hours.
const MAX_COUNT: u64 = 100_000_000;
/// The lab's own subnets: the nodes' underlay (with the routers) and the clients' legs (site b's
/// with `--sites 2`).
const LAB_NETS: [Net; 3] = [
    Net { base: Ipv4Addr::new(10, 77, 0, 0), len: 24 },
    Net { base: Ipv4Addr::new(10, 78, 0, 0), len: 24 },
    Net { base: Ipv4Addr::new(10, 79, 0, 0), len: 24 },
];
const PRIVATE: [Net; 3] = [
    Net { base: Ipv4Addr::new(10, 0, 0, 0), len: 8 },
    Net { base: Ipv4Addr::new(172, 16, 0, 0), len: 12 },
    Net { base: Ipv4Addr::new(192, 168, 0, 0), len: 16 },
];

/// An IPv4 prefix, e.g. `172.16.0.0/12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub base: Ipv4Addr,
    pub len: u8,
}

impl Net {
    fn mask(self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0)
    }

    fn contains(self, a: Ipv4Addr) -> bool {
        a.to_bits() & self.mask() == self.base.to_bits() & self.mask()
    }

    fn within(self, outer: Net) -> bool {
        self.len >= outer.len && outer.contains(self.base)
    }

    fn overlaps(self, other: Net) -> bool {
        self.within(other) || other.within(self)
    }

    fn hosts(self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.len)
    }
}

impl FromStr for Net {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Net> {
        let (base, len) = s.split_once('/').with_context(|| format!("{s:?}: expected address/length"))?;
        let len: u8 = len.parse().with_context(|| format!("{s:?}: bad prefix length"))?;
        ensure!(len <= 32, "{s:?}: prefix length above 32");
        let net = Net { base: base.parse().with_context(|| format!("{s:?}: bad address"))?, len };
        Ok(Net { base: Ipv4Addr::from_bits(net.base.to_bits() & net.mask()), len })
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Flood {
    /// The VIP or another lab address.
    pub to: Ipv4Addr,
    pub port: u16,
    /// Spoofed source addresses; every packet has its own source address and port.
    pub sources: Net,
    pub count: u64,
    /// Packets per second at most; unlimited when `None`.
    pub pps: Option<u64>,
    /// Bare ACKs (mid-stream packets of connections nobody knows) instead of SYNs.
    pub ack: bool,
}

impl Flood {
    /// A SYN flood of `count` packets to the VIP's port 80 from 172.16.0.0/12.
    pub fn syn(count: u64) -> Flood {
        Flood {
            to: VIP,
            port: 80,
            sources: Net { base: Ipv4Addr::new(172, 16, 0, 0), len: 12 },
            count,
            pps: None,
            ack: false,
        }
    }

    /// Refuses anything that could reach beyond the lab.
    pub fn check(&self) -> Result<()> {
        let lab_address = self.to == VIP || LAB_NETS.iter().any(|n| n.contains(self.to));
        ensure!(lab_address, "destination {} is not a lab address ({VIP} or {})", self.to, LAB_NETS[0]);
        ensure!(self.to != ROUTER_UNDERLAY && self.to != ROUTER2_UNDERLAY, "destination {} is a lab router", self.to);
        ensure!(
            PRIVATE.iter().any(|&p| self.sources.within(p)),
            "sources {} are not private address space (10/8, 172.16/12, 192.168/16)",
            self.sources
        );
        let lab = LAB_NETS.iter().chain(&[Net { base: VIP, len: 32 }]).find(|&&n| self.sources.overlaps(n)).copied();
        if let Some(n) = lab {
            bail!("sources {} overlap the lab's own {n}", self.sources);
        }
        ensure!(self.sources.len <= 30, "sources {}: too few addresses", self.sources);
        ensure!((1..=MAX_COUNT).contains(&self.count), "count {} is not 1 to {MAX_COUNT}", self.count);
        ensure!(self.pps != Some(0), "pps 0 sends nothing");
        Ok(())
    }

    /// The `i`-th packet: source address and port count through the source range, so no two
    /// of the first `hosts × 64,512` packets share a 5-tuple.
    fn packet(&self, i: u64) -> Vec<u8> {
        let hosts = self.sources.hosts() - 2; // not the network or broadcast address
        let host = u32::try_from(1 + i % hosts).unwrap_or(1);
        let src = Ipv4Addr::from_bits(self.sources.base.to_bits() | host);
        let port = u16::try_from(1024 + (i / hosts) % 64_512).unwrap_or(1024);
        let (flags, options): (u8, &[u8]) = if self.ack { (0x10, &[]) } else { (0x02, &[2, 4, 0x05, 0xb4]) };
        ringlb_wire::build::tcp_v4(src.octets(), self.to.octets(), port, self.port, flags, options)
    }
}

/// What a flood did.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

impl Lab {
    /// Sends `flood` from lab host `host` (`client`, `router` or `nN`), from a thread that
    /// enters that host's network namespace. Returns once every packet is sent.
    pub fn flood(&self, host: &str, flood: &Flood) -> Result<Sent> {
        flood.check()?;
        let flood = flood.clone();
        self.in_host(host, move || send(&flood))?.join().map_err(|_| anyhow::anyhow!("the flood thread panicked"))?
    }

    /// Runs `f` on a thread of its own inside lab host `host`'s network namespace (`client`,
    /// `router` or `nN`; with two sites also `client2`, `router2` and `wan`): every socket it
    /// opens is that host's.
    pub fn in_host<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let ns = match host {
            "client" => self.client(),
            "router" => self.router(),
            "client2" if self.spec.sites > 1 => self.client_of_site(2),
            "router2" if self.spec.sites > 1 => self.router_of_site(2),
            "wan" if self.spec.sites > 1 => self.wan_ns(),
            n if n.strip_prefix('n').and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i >= 1) => {
                format!("{}-{n}", self.spec.prefix)
            }
            other => bail!("unknown lab host {other:?}: use client, router or n1, n2, ..."),
        };
        let path = Path::new("/run/netns").join(&ns);
        let netns = File::open(&path).with_context(|| format!("lab namespace {}", path.display()))?;
        Ok(std::thread::spawn(move || -> Result<T> {
            rustix::thread::move_into_link_name_space(netns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .with_context(|| format!("entering network namespace {ns}"))?;
            f()
        }))
    }
}

/// Sends the flood from the calling thread's network namespace.
fn send(flood: &Flood) -> Result<Sent> {
    // IPPROTO_RAW: the packets carry their own IP header (IP_HDRINCL).
    let sock = rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(rustix::net::ipproto::RAW))
        .context("raw socket (needs CAP_NET_RAW)")?;
    let dst = SocketAddrAny::from(SocketAddrV4::new(flood.to, 0));
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < flood.count {
        let n = usize::try_from((flood.count - sent).min(BATCH as u64)).unwrap_or(BATCH);
        let packets: Vec<Vec<u8>> = (sent..sent + n as u64).map(|i| flood.packet(i)).collect();
        let iovs: Vec<[IoSlice<'_>; 1]> = packets.iter().map(|p| [IoSlice::new(p)]).collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..n).map(|_| SendAncillaryBuffer::default()).collect();
        let mut msgs: Vec<rustix::net::MMsgHdr<'_>> = iovs
            .iter()
            .zip(controls.iter_mut())
            .map(|(iov, control)| rustix::net::MMsgHdr::new_with_addr(&dst, iov, control))
            .collect();
        let mut done = 0;
        while done < n {
            match rustix::net::sendmmsg(&sock, &mut msgs[done..], SendFlags::empty()) {
                Ok(k) => done += k,
                // The qdisc is full: let it drain.
                Err(rustix::io::Errno::NOBUFS | rustix::io::Errno::AGAIN) => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                Err(e) => return Err(e).context("sendmmsg"),
            }
        }
        sent += n as u64;
        if let Some(pps) = flood.pps {
            let due = Duration::from_secs_f64(sent as f64 / pps as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(Sent { packets: sent, elapsed: start.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flood(to: [u8; 4], sources: &str) -> Flood {
        Flood { to: Ipv4Addr::from(to), sources: sources.parse().unwrap(), ..Flood::syn(10) }
    }

    #[test]
    fn only_lab_destinations_and_private_sources_outside_the_lab() {
        for (f, ok) in [
            (flood([10, 200, 0, 10], "172.16.0.0/12"), true),
            (flood([10, 77, 0, 2], "192.168.0.0/16"), true),
            (flood([10, 77, 0, 254], "172.16.0.0/12"), false),
            (flood([8, 8, 8, 8], "172.16.0.0/12"), false),
            (flood([10, 200, 0, 11], "172.16.0.0/12"), false),
            (flood([10, 200, 0, 10], "100.64.0.0/10"), false),
            (flood([10, 200, 0, 10], "10.0.0.0/8"), false),
            (flood([10, 200, 0, 10], "10.78.0.0/25"), false),
            (flood([10, 200, 0, 10], "10.96.0.0/12"), true),
            (flood([10, 200, 0, 10], "172.16.0.1/32"), false),
            (Flood { count: 0, ..Flood::syn(1) }, false),
        ] {
            assert_eq!(f.check().is_ok(), ok, "{f:?}: {:?}", f.check());
        }
    }

    #[test]
    fn every_packet_is_a_well_formed_syn_of_its_own_flow() {
        let f = Flood::syn(10);
        let mut seen = std::collections::HashSet::new();
        for i in (0..3_000_000).step_by(997) {
            let p = f.packet(i);
            assert!(ringlb_wire::build::tcp_checksum_ok(&p));
            let meta = ringlb_wire::classify(&p).unwrap();
            assert!(meta.is_tcp_syn());
            assert!(f.sources.contains(Ipv4Addr::new(p[12], p[13], p[14], p[15])));
            assert!(seen.insert(meta.key), "packet {i} repeats a flow");
        }
    }
}
