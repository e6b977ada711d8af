//! RFC 2003 IP-in-IP on a raw socket of protocol 4.
//!
//! The kernel writes the outer header on send (we do not set IP_HDRINCL); on receive a raw
//! socket hands over the whole packet, outer header included, which `ringlb_wire::ipip`
//! strips. Works without the kernel's ipip module.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{Received, RecvError};

#[derive(Debug)]
pub struct IpipCarrier {
    sock: AsyncFd<Socket>,
}

impl IpipCarrier {
    pub fn open(local: IpAddr) -> io::Result<Self> {
        let domain = Domain::for_address(SocketAddr::new(local, 0));
        let sock = Socket::new(domain, Type::RAW, Some(Protocol::from(i32::from(ringlb_wire::ipip::IPPROTO_IPIP))))?;
        super::tune_socket(&sock)?;
        sock.set_nonblocking(true)?;
        sock.bind(&SockAddr::from(SocketAddr::new(local, 0)))?;
        // SAFETY: `sock` is an open socket that the AsyncFd takes ownership of; Socket's
        // as_raw_fd always returns that same descriptor, which stays open until the AsyncFd drops.
        let sock = unsafe { AsyncFd::register(sock) }?;
        Ok(IpipCarrier { sock })
    }

    pub(super) async fn recv(&self, buf: &mut [u8]) -> Result<Received, RecvError> {
        let n = self.sock.async_io(Interest::READABLE, |s| (&*s).read(buf)).await.map_err(RecvError::Io)?;
        let (from, inner) = ringlb_wire::ipip::decap(&buf[..n]).map_err(RecvError::Malformed)?;
        Ok(Received { from: IpAddr::V4(from), stride: inner.len().max(1), inner })
    }

    /// A non-blocking read; readiness bookkeeping stays with tokio, which retries on the next
    /// `recv` if this one drained the socket.
    pub(super) fn try_recv(&self, buf: &mut [u8]) -> Result<Received, RecvError> {
        let mut sock: &Socket = self.sock.get_ref();
        let n = sock.read(buf).map_err(RecvError::Io)?;
        let (from, inner) = ringlb_wire::ipip::decap(&buf[..n]).map_err(RecvError::Malformed)?;
        Ok(Received { from: IpAddr::V4(from), stride: inner.len().max(1), inner })
    }

    pub(super) async fn send(&self, to: IpAddr, inner: &[u8]) -> io::Result<()> {
        let addr = SockAddr::from(SocketAddr::new(to, 0));
        self.sock.async_io(Interest::WRITABLE, |s| s.send_to(inner, &addr)).await.map(drop)
    }
}
