//! Two sites joined by an emulated WAN (`Spec.sites = 2`).
//!
//! ```text
//!  site a: c  10.78.0.100 ── r  (br0 10.77.0.254) ──┬── n1 … n⌈N/2⌉
//!                                                   wan
//!                    <prefix>-w:  bra ── ta ⇄ wan bridge ⇄ tb ── brb   (delay, jitter, loss, rate)
//!                                                   wan
//!  site b: c2 10.79.0.100 ── r2 (br0 10.77.0.253) ──┴── n⌈N/2⌉+1 … nN
//! ```
//!
//! The WAN is a stretched layer-2 segment: every node keeps its address 10.77.0.i, and each
//! site's router holds the nodes of its site on its own `br0`, whose port `wan` is a veth into
//! the WAN namespace. There each veth shares a Linux bridge with one of the WAN bridge's TAP
//! devices ([`crate::wan::bridge`]); frames between the sites, ARP included, cross the
//! emulated link once. Each router sends the VIP to its own site's entry (the first node of the
//! site, or ECMP or BGP over the site's nodes) and the other site's client subnet to the other
//! router across the WAN; nodes' default route is their own site's router, so a direct-server-
//! return reply to the other site's client crosses the WAN once, as on a real WAN. The routers
//! send no ICMP redirects, which would otherwise teach nodes a shortcut to the other router.

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::wan::bridge::{Bridge, BridgeThread, Stats};
use crate::wan::Impairment;
use crate::{sh, Lab, CLIENT, ROUTER_UNDERLAY};

/// Site b's client (site a's is [`CLIENT`]).
pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 100);
/// Site b's router on the nodes' segment (site a's is [`ROUTER_UNDERLAY`]).
pub const ROUTER2_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 253);
/// The WAN bridge's TAP devices and the bridges and veths around them, in the WAN namespace:
/// side a (towards site a's router) and side b.
const WAN_SIDES: [(&str, &str, &str); 2] = [("ta", "bra", "wa"), ("tb", "brb", "wb")];

impl Lab {
    /// The site (1-based; 1 when the lab has one) of node `i`: site 1 holds nodes 1 to ⌈N/2⌉.
    pub fn site_of(&self, i: usize) -> usize {
        if self.spec.sites > 1 && i > self.spec.nodes.div_ceil(2) {
            2
        } else {
            1
        }
    }

    /// The nodes of site `s`.
    pub fn site_nodes(&self, s: usize) -> Vec<usize> {
        (1..=self.spec.nodes).filter(|&i| self.site_of(i) == s).collect()
    }

    /// Site `s`'s name in node configs (`node.site`): `a`, `b`.
    pub fn site_name(s: usize) -> &'static str {
        match s {
            1 => "a",
            _ => "b",
        }
    }

    /// Namespace of site `s`'s router (`<prefix>-r`, `<prefix>-r2`).
    pub fn router_of_site(&self, s: usize) -> String {
        match s {
            1 => self.router(),
            _ => format!("{}-r{s}", self.spec.prefix),
        }
    }

    /// Namespace of site `s`'s client (`<prefix>-c`, `<prefix>-c2`).
    pub fn client_of_site(&self, s: usize) -> String {
        match s {
            1 => self.client(),
            _ => format!("{}-c{s}", self.spec.prefix),
        }
    }

    /// Site `s`'s router on the nodes' segment.
    pub fn router_addr(s: usize) -> Ipv4Addr {
        match s {
            1 => ROUTER_UNDERLAY,
            _ => ROUTER2_UNDERLAY,
        }
    }

    /// Site `s`'s client.
    pub fn client_addr(s: usize) -> Ipv4Addr {
        match s {
            1 => CLIENT,
            _ => CLIENT2,
        }
    }

    /// The namespace of the WAN between the sites (`<prefix>-w`).
    pub fn wan_ns(&self) -> String {
        format!("{}-w", self.spec.prefix)
    }

    fn wan_file(&self, name: &str) -> PathBuf {
        self.dir.join("wan").join(name)
    }

    /// Site b's router and client, the WAN between the routers and its bridge. Site a's router
    /// and client exist already; the nodes are wired afterwards.
    pub(crate) fn build_site_b(&mut self) -> Result<()> {
        ensure!(self.spec.sites == 2, "{} sites: the lab builds one or two", self.spec.sites);
        ensure!(self.spec.nodes >= 2, "two sites need at least two nodes, not {}", self.spec.nodes);
        ensure!(self.spec.entry != crate::Entry::L2, "entry l2 puts one client on the nodes' segment: one site only");
        self.spec.wan.check()?;
        let (r1, r2, c2, w) = (self.router(), self.router_of_site(2), self.client_of_site(2), self.wan_ns());
        for ns in [&r2, &c2, &w] {
            sh(None, &["ip", "netns", "add", ns])?;
            self.exec(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        self.exec(&r2, &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(&r2, &["ip", "addr", "add", &format!("{ROUTER2_UNDERLAY}/24"), "dev", "br0"])?;
        self.exec(&r2, &["ip", "link", "set", "br0", "up"])?;
        self.exec(&r2, &["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1"])?;
        sh(None, &["ip", "-n", &r2, "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", &c2])?;
        self.exec(&r2, &["ip", "addr", "add", "10.79.0.1/24", "dev", "vc"])?;
        self.exec(&r2, &["ip", "link", "set", "vc", "up"])?;
        self.exec(&c2, &["ip", "addr", "add", &format!("{CLIENT2}/24"), "dev", "eth0"])?;
        self.exec(&c2, &["ip", "link", "set", "eth0", "up"])?;
        self.exec(&c2, &["ip", "route", "add", "default", "via", "10.79.0.1"])?;
        // Each router reaches the other site's client through the other router, across the WAN.
        self.exec(&r1, &["ip", "route", "add", "10.79.0.0/24", "via", &ROUTER2_UNDERLAY.to_string()])?;
        self.exec(&r2, &["ip", "route", "add", "10.78.0.0/24", "via", &ROUTER_UNDERLAY.to_string()])?;
        for r in [&r1, &r2] {
            let off = ["net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.br0.send_redirects=0"];
            self.exec(r, &["sysctl", "-qw", off[0], off[1]])?;
        }
        // The WAN namespace speaks no IPv6 of its own: its bridges would add chatter to the link.
        self.exec(&w, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])?;
        for ((_, br, leg), r) in WAN_SIDES.into_iter().zip([&r1, &r2]) {
            self.exec(&w, &["ip", "link", "add", br, "type", "bridge"])?;
            self.exec(&w, &["ip", "link", "set", br, "up"])?;
            sh(None, &["ip", "-n", &w, "link", "add", leg, "type", "veth", "peer", "name", "wan", "netns", r])?;
            self.exec(&w, &["ip", "link", "set", leg, "master", br, "up"])?;
            self.exec(r, &["ip", "link", "set", "wan", "master", "br0", "up"])?;
        }
        self.start_wan()?;
        for (tap, br, _) in WAN_SIDES {
            self.exec(&w, &["ip", "link", "set", tap, "master", br, "up"])?;
        }
        Ok(())
    }

    /// Starts the WAN bridge with `spec.wan`: as `<wan_bridge_bin> wan-bridge` in the WAN
    /// namespace when set (it outlives this process), else on a thread of this process.
    /// Returns once its TAP devices exist.
    fn start_wan(&mut self) -> Result<()> {
        fs::create_dir_all(self.wan_file(""))?;
        let (params, stats) = (self.wan_file("params"), self.wan_file("stats.json"));
        fs::write(&params, self.spec.wan.to_string())?;
        let [(a, _, _), (b, _, _)] = WAN_SIDES;
        let w = self.wan_ns();
        match self.spec.wan_bridge_bin.clone() {
            None => {
                let bridge = Bridge {
                    a: a.into(),
                    b: b.into(),
                    impairment: self.spec.wan,
                    params: Some(params),
                    stats: Some(stats),
                };
                self.wan = Some(BridgeThread::spawn(&PathBuf::from("/run/netns").join(&w), bridge)?);
            }
            Some(bin) => {
                let log = self.wan_file("bridge.log");
                let (bin, params, stats) = (bin.to_string_lossy(), params.to_string_lossy(), stats.to_string_lossy());
                let args = ["--a", a, "--b", b, "--params", &params, "--stats", &stats];
                let mut all = vec![&*bin, "wan-bridge"];
                all.extend(args);
                self.spawn(&w, &log, &all)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while [a, b].iter().any(|tap| self.exec(&w, &["ip", "link", "show", tap]).is_err()) {
                    if Instant::now() > deadline {
                        let log = fs::read_to_string(&log).unwrap_or_default();
                        bail!("the WAN bridge did not create its TAP devices within 10 s; its log:\n{log}");
                    }
                    sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }

    fn wan_links(&self, state: &str) -> Result<()> {
        ensure!(self.spec.sites > 1, "lab {} has one site and no WAN", self.spec.prefix);
        for (_, _, leg) in WAN_SIDES {
            self.exec(&self.wan_ns(), &["ip", "link", "set", leg, state])?;
        }
        Ok(())
    }

    /// Cuts the WAN: its links to both routers go down, nothing crosses between the sites.
    pub fn wan_cut(&self) -> Result<()> {
        self.wan_links("down")
    }

    /// Heals a cut WAN (frames still delayed, when it was cut, are released as scheduled).
    pub fn wan_heal(&self) -> Result<()> {
        self.wan_links("up")
    }

    /// Changes the WAN's impairment (both directions) and waits until the bridge applies it.
    pub fn set_wan(&mut self, imp: &Impairment) -> Result<()> {
        ensure!(self.spec.sites > 1, "lab {} has one site and no WAN", self.spec.prefix);
        imp.check()?;
        let params = self.wan_file("params");
        let tmp = params.with_extension("tmp");
        fs::write(&tmp, imp.to_string())?;
        fs::rename(&tmp, &params)?;
        self.spec.wan = *imp;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.wan_stats().is_ok_and(|s| s.impairment == *imp) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the WAN bridge did not take the new parameters within 5 s (is it running?)");
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// What the WAN bridge has done so far (a→b is site a to site b); up to 200 ms old.
    pub fn wan_stats(&self) -> Result<Stats> {
        ensure!(self.spec.sites > 1, "lab {} has one site and no WAN", self.spec.prefix);
        Stats::read(&self.wan_file("stats.json")).context("the WAN bridge's stats")
    }

    /// Reads the WAN's current parameters back (for [`Lab::attach`]).
    pub(crate) fn read_wan_params(&self) -> Option<Impairment> {
        fs::read_to_string(self.wan_file("params")).ok()?.parse().ok()
    }
}
