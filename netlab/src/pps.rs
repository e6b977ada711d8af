//! Small UDP datagrams over many flows, and where they arrive: the packets-per-second load of
//! `netlab bench` and of the overload test ([`Lab::blast`], [`Lab::count_arrivals`]).
//!
//! The sender is a thread inside a lab host's network namespace with ordinary UDP sockets (no
//! spoofing), one per flow, each connected to the target and sending batches with `sendmmsg`,
//! as fast as the kernel takes them, for a given time. Arrivals are counted by an nftables
//! counter in the receiving node's input hook, which then drops them: the figure is what the
//! path in between (direct, NAT, ringlb) delivered to the node, not what an app had time to
//! read, and no app competes for the CPU.

use std::io::IoSlice;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rustix::net::{SendAncillaryBuffer, SendFlags};

use crate::{Lab, ROUTER_UNDERLAY, VIP};

/// Datagrams per `sendmmsg` on one flow's socket before the sender moves to the next flow.
const BATCH: usize = 16;

/// What to send.
#[derive(Debug, Clone)]
pub struct Blast {
    /// The VIP or a lab node's address.
    pub to: SocketAddrV4,
    /// Flows: one socket, so one source port, each.
    pub flows: usize,
    /// UDP payload bytes per datagram (64: a 92-byte IP packet).
    pub payload: usize,
    pub duration: Duration,
}

impl Blast {
    /// 64-byte datagrams over 64 flows to `to` for `duration`.
    pub fn small(to: SocketAddrV4, duration: Duration) -> Blast {
        Blast { to, flows: 64, payload: 64, duration }
    }

    fn check(&self) -> Result<()> {
        let ip = *self.to.ip();
        let lab_node = ip.octets()[..3] == [10, 77, 0] && ip != ROUTER_UNDERLAY;
        ensure!(ip == VIP || lab_node, "destination {ip} is neither the VIP nor a lab node");
        ensure!((1..=1024).contains(&self.flows), "flows {} is not 1 to 1024", self.flows);
        ensure!((1..=1472).contains(&self.payload), "payload {} is not 1 to 1472 bytes", self.payload);
        ensure!(self.duration <= Duration::from_secs(120), "a blast of {:?} is too long", self.duration);
        Ok(())
    }
}

/// What a blast did: datagrams the kernel took from the sender, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Blasted {
    pub sent: u64,
    pub elapsed: Duration,
}

impl Blasted {
    pub fn per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl Lab {
    /// Sends `blast` from lab host `host` (`client`, `router`, `nN`); returns when done.
    pub fn blast(&self, host: &str, blast: &Blast) -> Result<Blasted> {
        blast.check()?;
        let blast = blast.clone();
        self.in_host(host, move || send(&blast))?.join().map_err(|_| anyhow::anyhow!("the sender thread panicked"))?
    }

    /// Counts (and drops) UDP datagrams to `port` arriving at node `i`'s IP input (nftables
    /// table `rlpps`, from 0 again on every call); read with [`Lab::arrivals`].
    pub fn count_arrivals(&self, i: usize, port: u16) -> Result<()> {
        // Made anew each time (the counter starts at 0): declared, deleted, then defined.
        let rules = format!(
            "table ip rlpps\ndelete table ip rlpps\ntable ip rlpps {{\n  counter arrived {{ }}\n  chain input {{\n    type filter hook input priority 0;\n    \
             udp dport {port} counter name arrived drop\n  }}\n}}\n"
        );
        let path = self.dir.join(format!("rlpps-n{i}.nft"));
        std::fs::write(&path, rules)?;
        self.exec(&self.node(i), &["nft", "-f", &path.to_string_lossy()]).map(drop)
    }

    /// Datagrams of `payload` bytes counted by [`Lab::count_arrivals`] on node `i` so far.
    ///
    /// From bytes, not packets: a node's ringlb hands what it decapsulates to its kernel
    /// coalesced (UDP GRO), and the input hook sees one buffer for several datagrams. Each
    /// buffer holds one IPv4 and one UDP header (28 bytes) and its datagrams' payloads, so
    /// datagrams = (bytes − 28 × buffers) / payload, exactly.
    pub fn arrivals(&self, i: usize, payload: usize) -> Result<u64> {
        let out = self.exec(&self.node(i), &["nft", "list", "counter", "ip", "rlpps", "arrived"])?;
        let field = |name: &str| -> Result<u64> {
            let v = out.split_whitespace().skip_while(|w| *w != name).nth(1);
            v.and_then(|n| n.parse().ok()).with_context(|| format!("no {name} count in {out:?}"))
        };
        let (buffers, bytes) = (field("packets")?, field("bytes")?);
        Ok(bytes.saturating_sub(28 * buffers) / payload.max(1) as u64)
    }

    /// Packets dropped by the interfaces of lab host `ns` (receive and transmit, `/proc/net/dev`),
    /// the TUN `ring0` excepted (ringlb reports its queue itself): where a veth's backlog
    /// overflowed, say.
    pub fn interface_drops(&self, ns: &str) -> Result<u64> {
        let text = self.exec(ns, &["cat", "/proc/net/dev"])?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.trim() != "ring0")
            .map(|(_, f)| {
                let f: Vec<u64> = f.split_whitespace().filter_map(|v| v.parse().ok()).collect();
                f.get(3).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
            })
            .sum())
    }
}

/// Sends the blast from the calling thread's network namespace.
fn send(blast: &Blast) -> Result<Blasted> {
    let socks = (0..blast.flows)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::V4(blast.to))?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("the sender's sockets")?;
    let payload = vec![0x5au8; blast.payload];
    let iovs: Vec<[IoSlice<'_>; 1]> = (0..BATCH).map(|_| [IoSlice::new(&payload)]).collect();
    let start = Instant::now();
    let mut sent = 0u64;
    'send: loop {
        for sock in &socks {
            if start.elapsed() >= blast.duration {
                break 'send;
            }
            let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
                (0..BATCH).map(|_| SendAncillaryBuffer::default()).collect();
            let mut msgs: Vec<rustix::net::MMsgHdr<'_>> =
                iovs.iter().zip(controls.iter_mut()).map(|(iov, c)| rustix::net::MMsgHdr::new(iov, c)).collect();
            match rustix::net::sendmmsg(sock, &mut msgs, SendFlags::empty()) {
                Ok(n) => sent += n as u64,
                // A full queue, or an ICMP error a moment ago: not sent, not counted.
                Err(rustix::io::Errno::NOBUFS | rustix::io::Errno::AGAIN | rustix::io::Errno::CONNREFUSED) => {}
                Err(e) => return Err(e).context("sendmmsg"),
            }
        }
    }
    Ok(Blasted { sent, elapsed: start.elapsed() })
}
