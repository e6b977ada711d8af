//! Carriers: how a packet travels from the entry to the peer that serves it.
//!
//! Both carry the inner IP packet unchanged. `udp` puts it in a UDP datagram to the peer's
//! carrier port, as Linux FOU does; the outer source port is picked by a hash of the inner
//! 5-tuple so that NICs and ECMP on the underlay spread flows. `ipip` sends it as RFC 2003
//! IP-in-IP (protocol 4) on a raw socket, which needs CAP_NET_RAW.

mod ipip;
mod udp;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

pub use ipip::IpipCarrier;
pub use udp::UdpCarrier;

/// Which carrier to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CarrierKind {
    Udp,
    Ipip,
}

impl CarrierKind {
    /// Bytes added in front of the inner packet.
    pub fn overhead(self) -> u16 {
        match self {
            CarrierKind::Udp => ringlb_wire::UDP_CARRIER_OVERHEAD,
            CarrierKind::Ipip => ringlb_wire::IPIP_CARRIER_OVERHEAD,
        }
    }
}

/// Received carrier packets: who sent them and where the inner packets lie in the buffer:
/// `inner` holds one or more of them back to back, each `stride` bytes (the last may be
/// shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub from: IpAddr,
    pub inner: Range<usize>,
    pub stride: usize,
}

/// Why a received datagram was refused before the core saw it.
#[derive(Debug)]
pub enum RecvError {
    /// The outer header was malformed (raw IP-in-IP only).
    Malformed(ringlb_wire::MalformedReason),
    Io(io::Error),
}

/// One of the carriers.
#[derive(Debug)]
pub enum Carrier {
    Udp(UdpCarrier),
    Ipip(IpipCarrier),
}

impl Carrier {
    /// Opens the carrier on this node's underlay address.
    pub fn open(kind: CarrierKind, local: IpAddr, udp_port: u16, source_ports: usize) -> io::Result<Self> {
        Ok(match kind {
            CarrierKind::Udp => Carrier::Udp(UdpCarrier::open(SocketAddr::new(local, udp_port), source_ports)?),
            CarrierKind::Ipip => Carrier::Ipip(IpipCarrier::open(local)?),
        })
    }

    /// Waits for the next carrier packet.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<Received, RecvError> {
        match self {
            Carrier::Udp(c) => c.recv(buf).await.map_err(RecvError::Io),
            Carrier::Ipip(c) => c.recv(buf).await,
        }
    }

    /// Like [`Carrier::recv`], but returns `WouldBlock` instead of waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> Result<Received, RecvError> {
        match self {
            Carrier::Udp(c) => c.try_recv(buf).map_err(RecvError::Io),
            Carrier::Ipip(c) => c.try_recv(buf),
        }
    }

    /// Sends `inner`, one or more inner packets of `segment` bytes back to back (the last may
    /// be shorter), to the peer at `to`.
    pub async fn send(&self, to: IpAddr, flow_hash: u64, inner: &[u8], segment: usize) -> io::Result<()> {
        match self {
            Carrier::Udp(c) => c.send(to, flow_hash, inner, segment).await,
            Carrier::Ipip(c) => c.send(to, inner, segment).await,
        }
    }

    /// The socket carrier packets arrive on (for its drop counter, [`crate::kernel_drops`]).
    /// For the kernel fast path: the UDP carrier's socket asks for no receive offload (see
    /// `UdpCarrier::disable_receive_offload`); the raw IP-in-IP socket has none.
    pub fn disable_receive_offload(&self) -> io::Result<()> {
        match self {
            Carrier::Udp(c) => c.disable_receive_offload(),
            Carrier::Ipip(_) => Ok(()),
        }
    }

    pub fn receive_socket(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Carrier::Udp(c) => c.receive_socket(),
            Carrier::Ipip(c) => c.receive_socket(),
        }
    }

    /// Most inner packets one [`Carrier::send`] should carry.
    pub fn max_batch(&self) -> usize {
        match self {
            Carrier::Udp(c) => c.max_batch(),
            Carrier::Ipip(_) => 64,
        }
    }
}

/// Socket options shared by both carriers: big buffers, and DF on every packet so that the
/// kernel never fragments a carrier packet (an oversize send fails with EMSGSIZE instead).
pub(crate) fn tune_socket(sock: &socket2::Socket) -> io::Result<()> {
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(8 << 20);
    let _ = sock.set_send_buffer_size(8 << 20);
    set_pmtudisc_do(sock)
}

fn set_pmtudisc_do(sock: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsFd;
    set_int_option(sock.as_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)
}

/// `setsockopt` of an integer option (those socket2 lacks).
pub(crate) fn set_int_option(
    sock: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: the fd is an open socket borrowed for the duration of the call; the option value
    // points to a live c_int and `len` is its size.
    let rc = unsafe { libc::setsockopt(sock.as_raw_fd(), level, name, (&value as *const libc::c_int).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
