//! Telling the network that this node takes VIP traffic: the IO of `ringlb_core::entry`.
//!
//! - [`RouteAnnouncer`] (BGP): holds `VIP/32 dev <tun>` in a kernel routing table that no rule
//!   consults and that a routing daemon (BIRD's `kernel` protocol with `learn`, FRR's
//!   `redistribute table`) exports to the routers. The route goes through the daemon's TUN
//!   device, so the kernel deletes it when the daemon dies, however it dies, and the routing
//!   daemon withdraws the VIP at once.
//! - [`ArpSpeaker`] (L2): a raw packet socket on the underlay that, while this node owns the
//!   VIP, answers ARP requests for it and sends gratuitous ARP when ownership arrives. The
//!   kernel itself never answers for the VIP (`ringlb setup` sets `arp_ignore=1`), so when the
//!   daemon dies, this node stops answering too.

use std::fs;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ringlb_wire::arp::{self, ArpError, Mac};
use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::steering::{ip, SteeringError};

/// The BGP mechanism's route.
#[derive(Debug, Clone)]
pub struct RouteAnnouncer {
    vip: IpAddr,
    table: u32,
    tun: String,
}

impl RouteAnnouncer {
    pub fn new(vip: IpAddr, table: u32, tun: impl Into<String>) -> Self {
        RouteAnnouncer { vip, table, tun: tun.into() }
    }

    fn prefix(&self) -> String {
        format!("{}/32", self.vip)
    }

    /// Adds (or keeps) the route; the routing daemon then announces the VIP.
    pub fn announce(&self) -> Result<(), SteeringError> {
        let table = self.table.to_string();
        ip(&["route", "replace", &self.prefix(), "dev", &self.tun, "table", &table, "proto", "static"]).map(drop)
    }

    /// Deletes the route, if it is there; the routing daemon then withdraws the VIP.
    pub fn withdraw(&self) -> Result<(), SteeringError> {
        let table = self.table.to_string();
        match ip(&["route", "del", &self.prefix(), "table", &table]) {
            Ok(_) => Ok(()),
            // Not there, or the table was never created.
            Err(SteeringError::Command { stderr, .. })
                if stderr.contains("No such process") || stderr.contains("table does not exist") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// What the ARP speaker did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArpCounters {
    /// Requests for the VIP answered while this node owned it.
    pub answered: u64,
    /// Requests for the VIP heard while another node owned it.
    pub ignored: u64,
    pub gratuitous_sent: u64,
    /// Frames that were not well-formed Ethernet/IPv4 ARP (dropped, never answered).
    pub malformed: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
}

/// The L2 mechanism's ARP socket.
#[derive(Debug)]
pub struct ArpSpeaker {
    sock: AsyncFd<Socket>,
    mac: Mac,
    vip: Ipv4Addr,
    counters: ArpCounters,
}

/// `ETH_P_ARP` in network byte order, as `socket` and `sockaddr_ll` want it.
#[allow(clippy::cast_possible_truncation)] // 0x0806
const ETH_P_ARP_BE: u16 = (libc::ETH_P_ARP as u16).to_be();
#[allow(clippy::cast_possible_truncation)] // 17
const AF_PACKET: u16 = libc::AF_PACKET as u16;
#[allow(clippy::cast_possible_truncation)] // 20 bytes
const SOCKADDR_LL_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;

impl ArpSpeaker {
    /// Opens a packet socket for ARP on `interface` (needs CAP_NET_RAW).
    pub fn open(interface: &str, vip: Ipv4Addr) -> io::Result<Self> {
        let sys = std::path::Path::new("/sys/class/net").join(interface);
        let index: i32 = read_trimmed(&sys.join("ifindex"))?
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "ifindex is not a number"))?;
        let mac = parse_mac(&read_trimmed(&sys.join("address"))?).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{interface} has no Ethernet address"))
        })?;
        // SAFETY: socket(2) with constant arguments; the result is checked before it is used.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP_BE),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_ll is a valid value of that plain C struct.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = AF_PACKET;
        addr.sll_protocol = ETH_P_ARP_BE;
        addr.sll_ifindex = index;
        // SAFETY: `addr` is a valid sockaddr_ll that outlives the call, and the length is its size.
        let rc =
            unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), SOCKADDR_LL_LEN) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = Socket::from(fd);
        // SAFETY: `sock` is an open socket that the AsyncFd takes ownership of; Socket's
        // as_raw_fd always returns that same descriptor, which stays open until the AsyncFd drops.
        let sock = unsafe { AsyncFd::register(sock) }?;
        Ok(ArpSpeaker { sock, mac, vip, counters: ArpCounters::default() })
    }

    pub fn counters(&self) -> ArpCounters {
        self.counters
    }

    /// Announces the VIP at this node's address to the whole segment.
    pub fn send_gratuitous(&mut self) {
        let frame = arp::gratuitous(self.mac, self.vip);
        if self.send(&frame) {
            self.counters.gratuitous_sent += 1;
        }
    }

    fn send(&mut self, frame: &[u8]) -> bool {
        match self.sock.get_ref().send(frame) {
            Ok(_) => true,
            Err(e) => {
                self.counters.send_errors += 1;
                tracing::debug!(error = %e, "sending an ARP frame");
                false
            }
        }
    }

    /// Waits for the next ARP frame and handles it: while `owner`, a request for the VIP gets
    /// this node's answer. Returns after each frame, so the caller can decide anew.
    pub async fn serve(&mut self, owner: bool) -> io::Result<()> {
        let mut buf = [0u8; 1514];
        let n = self.sock.async_io(Interest::READABLE, |s| (&*s).read(&mut buf)).await?;
        match arp::parse_request(&buf[..n]) {
            // Our own frames (the socket sees outgoing ones too), gratuitous announcements,
            // and questions about other addresses need no answer.
            Ok(req) if req.sender_mac == self.mac || req.sender_ip == req.target_ip || req.target_ip != self.vip => {}
            Ok(req) if owner => {
                let reply = arp::reply(self.mac, self.vip, &req);
                if self.send(&reply) {
                    self.counters.answered += 1;
                    tracing::trace!(asker = %req.sender_ip, "answered ARP for the VIP");
                }
            }
            Ok(_) => self.counters.ignored += 1,
            Err(ArpError::NotRequest | ArpError::NotArp) => {}
            Err(_) => self.counters.malformed += 1,
        }
        Ok(())
    }
}

fn read_trimmed(path: &std::path::Path) -> io::Result<String> {
    fs::read_to_string(path).map(|s| s.trim().to_owned())
}

fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    (parts.next().is_none() && mac != [0; 6]).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn macs_parse_from_sysfs_text() {
        assert_eq!(parse_mac("02:1a:ff:00:00:0b"), Some([2, 0x1a, 0xff, 0, 0, 0x0b]));
        assert_eq!(parse_mac("00:00:00:00:00:00"), None, "loopback and TUN have none");
        assert_eq!(parse_mac("02:1a:ff:00:00"), None);
        assert_eq!(parse_mac("02:1a:ff:00:00:0b:0c"), None);
    }
}
