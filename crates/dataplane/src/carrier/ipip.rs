//! RFC 2003 IP-in-IP on a raw socket of protocol 4.
//!
//! The kernel writes the outer header on send (we do not set IP_HDRINCL); on receive a raw
//! socket hands over the whole packet, outer header included, which `ringlb_wire::ipip`
//! strips. Works without the kernel's ipip module. A run of inner packets to one peer leaves
//! in one `sendmmsg`.

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

    pub(super) fn receive_socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.sock.get_ref())
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

    /// Sends `inner`, packets of `segment` bytes back to back (the last may be shorter), to
    /// `to`: each becomes one IP-in-IP packet, all in as few `sendmmsg` calls as it takes.
    pub(super) async fn send(&self, to: IpAddr, inner: &[u8], segment: usize) -> io::Result<()> {
        let addr = SockAddr::from(SocketAddr::new(to, 0));
        let mut chunks = inner.chunks(segment.max(1)).peekable();
        let mut batch: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        while chunks.peek().is_some() {
            let mut n = 0;
            for (slot, chunk) in batch.iter_mut().zip(chunks.by_ref()) {
                *slot = chunk;
                n += 1;
            }
            let mut sent = 0;
            while sent < n {
                sent += self.sock.async_io(Interest::WRITABLE, |s| send_many(s, &addr, &batch[sent..n])).await?;
            }
        }
        Ok(())
    }
}

/// Most packets one `sendmmsg` carries.
const MAX_BATCH: usize = 64;

/// One `sendmmsg` of `packets` (at most [`MAX_BATCH`]) to `addr`; returns how many went.
fn send_many(sock: &Socket, addr: &SockAddr, packets: &[&[u8]]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = packets.len().min(MAX_BATCH);
    let mut iovs: [libc::iovec; MAX_BATCH] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_BATCH];
    // SAFETY: mmsghdr is a plain C struct for which all-zero bytes is a valid (empty) value.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec { iov_base: packets[i].as_ptr() as *mut libc::c_void, iov_len: packets[i].len() };
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = addr.as_ptr() as *mut libc::c_void;
        h.msg_namelen = addr.len();
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
    }
    let count = libc::c_uint::try_from(n).unwrap_or(0);
    // SAFETY: the fd is the open socket `sock` owns; `msgs[..n]` point at `iovs[..n]`, which
    // point at the caller's packets, and at `addr`: all live and unmoved for the call. The
    // kernel only reads the buffers (the cast to *mut is what the C signature asks for).
    let rc = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), count, 0) };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}
